//! The servers' health: round-robin over those up, failover to the next, a backoff per down server,
//! and how long every server has been down (for `--give-up-after`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub(crate) use crate::backoff::Backoff;

/// Which server a request goes to: round-robin over the servers considered up, failover to the next
/// one after a failure, a down server left out for a backoff of its own (doubling from `base` to
/// `cap` while it keeps failing, reset by a success) and then probed by a single request. When every
/// server is down the choice is round-robin over all of them, flagged `all_down` so that the caller
/// sleeps its backoff between attempts. It only decides; it never waits. Shared by the sending tasks.
#[derive(Debug)]
pub(crate) struct ServerPool {
    pub(super) state: Mutex<PoolState>,
    pub(super) down: Backoff,
}

#[derive(Debug)]
pub(super) struct PoolState {
    /// Where the round-robin of new requests continues.
    pub(super) next: usize,
    pub(super) servers: Vec<Health>,
    /// Since when every server has been down (failing, with no success since).
    pub(super) all_down_since: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Health {
    /// `None` while up; while down, when its backoff expires and a probe may go to it.
    pub(super) down_until: Option<Instant>,
    /// Its current backoff (meaningful while down).
    pub(super) backoff: Duration,
    /// A probe is in flight: no second one until it is answered.
    pub(super) probing: bool,
}

/// A server chosen for an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pick {
    /// Its position in the list of servers.
    pub index: usize,
    /// No server was up or due for a probe: this one was chosen anyway.
    pub all_down: bool,
}

impl ServerPool {
    /// `servers` servers (at least one), all up.
    pub(crate) fn new(servers: usize, down: Backoff) -> ServerPool {
        let health = Health { down_until: None, backoff: down.base, probing: false };
        let state = PoolState { next: 0, servers: vec![health; servers.max(1)], all_down_since: None };
        ServerPool { state: Mutex::new(state), down }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The server for a new request: the next usable one in round-robin order.
    pub(crate) fn pick(&self, now: Instant) -> Pick {
        let mut state = self.lock();
        let start = state.next;
        let pick = state.choose(start, None, now);
        state.next = (pick.index + 1) % state.servers.len();
        pick
    }

    /// The server for a retry of a request that just failed on `failed`: the next usable one after
    /// it, never `failed` itself when there are others.
    pub(crate) fn pick_after(&self, failed: usize, now: Instant) -> Pick {
        let mut state = self.lock();
        state.choose(failed + 1, Some(failed), now)
    }

    /// `server` answered (any answer but a retryable one): it is up, its backoff reset. True if it
    /// was down until now.
    pub(crate) fn succeeded(&self, server: usize) -> bool {
        let base = self.down.base;
        let mut state = self.lock();
        state.all_down_since = None;
        let Some(health) = state.servers.get_mut(server) else { return false };
        let was_down = health.down_until.is_some();
        *health = Health { down_until: None, backoff: base, probing: false };
        was_down
    }

    /// An attempt on `server` failed with a retryable error at `now`. An up server goes down for the
    /// base backoff; a down one whose backoff had expired (a probe, or an attempt made while all were
    /// down) goes down again for twice as long, up to the cap; the failure of a request sent before
    /// it was marked down changes nothing. True if it was up until now.
    pub(crate) fn failed(&self, server: usize, now: Instant) -> bool {
        let base = self.down.base;
        let mut state = self.lock();
        let state = &mut *state;
        let Some(health) = state.servers.get_mut(server) else { return false };
        health.probing = false;
        let was_up = match health.down_until {
            None => {
                health.backoff = base;
                health.down_until = Some(now + base);
                true
            }
            Some(until) if now >= until => {
                health.backoff = self.down.after(health.backoff);
                health.down_until = Some(now + health.backoff);
                false
            }
            Some(_) => false,
        };
        if state.all_down_since.is_none() && state.servers.iter().all(|h| h.down_until.is_some()) {
            state.all_down_since = Some(now);
        }
        was_up
    }

    /// How long every server has been down (each failed, none answered since), if they all are.
    pub(crate) fn unreachable_for(&self, now: Instant) -> Option<Duration> {
        self.lock().all_down_since.map(|since| now.saturating_duration_since(since))
    }
}

impl PoolState {
    /// The first server from `start` on (wrapping) that is up or due for a probe, skipping `skip`
    /// when there are others; failing that, the one at `start`, flagged `all_down`.
    pub(super) fn choose(&mut self, start: usize, skip: Option<usize>, now: Instant) -> Pick {
        let n = self.servers.len();
        for k in 0..n {
            let index = (start + k) % n;
            if n > 1 && skip == Some(index) {
                continue;
            }
            let health = &mut self.servers[index];
            match health.down_until {
                None => return Pick { index, all_down: false },
                Some(until) if now >= until && !health.probing => {
                    health.probing = true;
                    return Pick { index, all_down: false };
                }
                Some(_) => {}
            }
        }
        Pick { index: start % n, all_down: true }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOWN: Backoff = Backoff { base: Duration::from_millis(500), cap: Duration::from_secs(5) };

    fn picks(pool: &ServerPool, now: Instant, n: usize) -> Vec<usize> {
        (0..n).map(|_| pool.pick(now).index).collect()
    }

    #[test]
    fn the_pool_goes_round_robin_over_up_servers() {
        let pool = ServerPool::new(3, DOWN);
        let now = Instant::now();
        assert_eq!(picks(&pool, now, 7), [0, 1, 2, 0, 1, 2, 0]);
        assert!(!pool.pick(now).all_down);
        // Answers keep them up and do not disturb the order.
        assert!(!pool.succeeded(2));
        assert_eq!(picks(&pool, now, 3), [2, 0, 1]);

        let one = ServerPool::new(1, DOWN);
        assert_eq!(picks(&one, now, 3), [0, 0, 0]);
    }

    #[test]
    fn a_failed_request_goes_to_the_next_server_never_the_same() {
        let pool = ServerPool::new(3, DOWN);
        let now = Instant::now();
        assert!(pool.failed(0, now), "an up server that fails goes down");
        assert_eq!(pool.pick_after(0, now), Pick { index: 1, all_down: false });
        assert!(pool.failed(2, now));
        assert_eq!(pool.pick_after(2, now), Pick { index: 1, all_down: false }, "0 is down: skipped");
        assert!(pool.failed(1, now));
        // Every server down: still the next one, flagged so that the caller sleeps its backoff.
        assert_eq!(pool.pick_after(1, now), Pick { index: 2, all_down: true });
        assert_eq!(pool.pick_after(2, now), Pick { index: 0, all_down: true });
        assert!(pool.pick(now).all_down);

        // With one server there is no other: the same one, after the backoff sleep.
        let one = ServerPool::new(1, DOWN);
        assert!(one.failed(0, now));
        assert_eq!(one.pick_after(0, now), Pick { index: 0, all_down: true });
        assert_eq!(one.pick(now), Pick { index: 0, all_down: true });
    }

    #[test]
    fn a_down_server_is_skipped_until_its_backoff_expires_then_probed_once() {
        let pool = ServerPool::new(3, DOWN);
        let t0 = Instant::now();
        assert!(pool.failed(1, t0));
        // A second failure of a request sent before it was marked down changes nothing.
        assert!(!pool.failed(1, t0 + Duration::from_millis(100)));
        assert_eq!(picks(&pool, t0 + Duration::from_millis(499), 4), [0, 2, 0, 2]);

        // Backoff expired: one probe, and no other request while it is out.
        let t1 = t0 + DOWN.base;
        assert_eq!(picks(&pool, t1, 5), [0, 1, 2, 0, 2]);
        // The probe fails: left out twice as long (from the failure on).
        assert!(!pool.failed(1, t1));
        assert_eq!(picks(&pool, t1 + Duration::from_millis(999), 4), [0, 2, 0, 2]);
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(picks(&pool, t2, 4), [0, 1, 2, 0]);
        // The probe succeeds: up again, back in the rotation, its backoff reset.
        assert!(pool.succeeded(1), "it was down");
        assert_eq!(picks(&pool, t2, 3), [1, 2, 0]);
        assert!(pool.failed(1, t2));
        assert_eq!(picks(&pool, t2 + Duration::from_millis(499), 2), [2, 0]);
        assert_eq!(picks(&pool, t2 + DOWN.base, 2), [1, 2]);
    }

    #[test]
    fn every_server_down_is_timed_from_the_last_one_to_fail_until_any_answer() {
        let pool = ServerPool::new(2, DOWN);
        let t0 = Instant::now();
        assert!(pool.failed(0, t0));
        assert_eq!(pool.unreachable_for(t0 + Duration::from_secs(9)), None, "one is still up");
        let t1 = t0 + Duration::from_secs(1);
        assert!(pool.failed(1, t1));
        assert_eq!(pool.unreachable_for(t1 + Duration::from_secs(3)), Some(Duration::from_secs(3)));
        // Further failures do not restart the clock; an answer stops it.
        assert!(!pool.failed(0, t1 + Duration::from_secs(2)));
        assert_eq!(pool.unreachable_for(t1 + Duration::from_secs(4)), Some(Duration::from_secs(4)));
        pool.succeeded(0);
        assert_eq!(pool.unreachable_for(t1 + Duration::from_secs(5)), None);
    }

    #[test]
    fn a_down_servers_backoff_doubles_up_to_the_cap() {
        let pool = ServerPool::new(2, DOWN);
        let mut now = Instant::now();
        assert!(pool.failed(1, now));
        let mut expected = DOWN.base;
        for _ in 0..8 {
            let almost = now + expected - Duration::from_millis(1);
            assert_eq!(pool.pick(almost).index, 0, "down for {expected:?}: only 0 is usable");
            now += expected;
            assert_eq!(pool.pick_after(0, now), Pick { index: 1, all_down: false }, "probe after {expected:?}");
            assert!(!pool.failed(1, now));
            expected = (expected * 2).min(DOWN.cap);
        }
        assert_eq!(expected, DOWN.cap);
    }
}
