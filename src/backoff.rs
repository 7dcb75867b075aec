//! Exponential backoff, the one kind eps has: a delay that starts at a base and doubles after each
//! failure up to a cap, back to the base after a success; optionally "full jitter" (a random delay
//! between zero and that ceiling, so that many clients retrying together spread out).
//!
//! [`Backoff`] is the shape (base, cap) and answers by attempt; [`Delays`] is one running sequence of
//! it, for a loop that retries until something works.

use std::time::Duration;

use rand::Rng as _;

/// An exponential backoff: `base` after the first failure, doubling, at most `cap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Backoff {
    pub const fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff { base, cap }
    }

    /// The delay after the `attempt`-th (1-based) failed attempt: `base` doubled `attempt - 1` times,
    /// at most `cap`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// Full jitter: a random delay in `[0, ceiling(attempt)]`.
    pub fn full_jitter(&self, attempt: u32) -> Duration {
        let ceiling = u64::try_from(self.ceiling(attempt).as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(rand::rng().random_range(0..=ceiling))
    }

    /// The delay that follows `delay`: twice as long, at most `cap`, at least `base`.
    pub fn after(&self, delay: Duration) -> Duration {
        delay.saturating_mul(2).min(self.cap).max(self.base)
    }

    /// A running sequence of this backoff's delays, starting at `base`.
    pub fn delays(self) -> Delays {
        Delays { backoff: self, current: self.base }
    }
}

/// One running backoff: each [`Delays::next_delay`] is twice the one before, up to the cap;
/// [`Delays::reset`] (after a success) starts again from the base.
#[derive(Debug, Clone, Copy)]
pub struct Delays {
    backoff: Backoff,
    current: Duration,
}

impl Delays {
    /// The delay the next [`Delays::next_delay`] returns (to say it before sleeping it).
    pub fn current(&self) -> Duration {
        self.current
    }

    /// The delay to wait now; the next one is doubled.
    pub fn next_delay(&mut self) -> Duration {
        let now = self.current;
        self.current = self.backoff.after(now);
        now
    }

    /// Back to the base.
    pub fn reset(&mut self) {
        self.current = self.backoff.base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn delays_double_from_the_base_up_to_the_cap() {
        let mut delays = Backoff::new(100 * MS, 5000 * MS).delays();
        let got: Vec<u64> = (0..9).map(|_| delays.next_delay().as_millis() as u64).collect();
        assert_eq!(got, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        let mut delays = Backoff::new(Duration::from_secs(1), Duration::from_secs(30)).delays();
        let got: Vec<u64> = (0..7).map(|_| delays.next_delay().as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 30, 30]);
    }

    #[test]
    fn current_is_the_next_delay_and_reset_goes_back_to_the_base() {
        let mut delays = Backoff::new(50 * MS, 2000 * MS).delays();
        assert_eq!(delays.current(), 50 * MS);
        for _ in 0..4 {
            let said = delays.current();
            assert_eq!(delays.next_delay(), said);
        }
        assert_eq!(delays.current(), 800 * MS);
        delays.reset();
        assert_eq!(delays.current(), 50 * MS);
        assert_eq!(delays.next_delay(), 50 * MS);
        assert_eq!(delays.next_delay(), 100 * MS);
    }

    #[test]
    fn after_doubles_within_the_base_and_the_cap() {
        let b = Backoff::new(500 * MS, 5000 * MS);
        assert_eq!(b.after(500 * MS), 1000 * MS);
        assert_eq!(b.after(4000 * MS), 5000 * MS);
        assert_eq!(b.after(5000 * MS), 5000 * MS);
        assert_eq!(b.after(Duration::ZERO), 500 * MS);
        assert_eq!(b.after(Duration::MAX), 5000 * MS);
    }

    #[test]
    fn ceiling_doubles_from_the_base_up_to_the_cap_and_full_jitter_stays_below_it() {
        let b = Backoff::new(50 * MS, Duration::from_secs(5));
        assert_eq!(b.ceiling(1), Duration::from_millis(50));
        assert_eq!(b.ceiling(2), Duration::from_millis(100));
        assert_eq!(b.ceiling(7), Duration::from_millis(3200));
        assert_eq!(b.ceiling(8), Duration::from_secs(5));
        assert_eq!(b.ceiling(1000), Duration::from_secs(5));
        for attempt in 1..20 {
            assert!(b.full_jitter(attempt) <= b.ceiling(attempt));
        }
    }
}
