//! What a run did: its counts as it goes (`Counters`), and the summary line they end as.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::stop::Stopped;

/// What a run did. `sent = accepted + rejected + failed` and `lines = sent + invalid` once it ends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientSummary {
    /// Non-blank lines read.
    pub lines: u64,
    /// Valid events handed to the network.
    pub sent: u64,
    /// Events the server answered with 2xx (duplicates included).
    pub accepted: u64,
    /// Of the accepted, those the server already had (`"duplicate":true`).
    pub duplicates: u64,
    /// Events the server refused (4xx other than 408/429); not retried.
    pub rejected: u64,
    /// Lines that are not valid events; not sent.
    pub invalid: u64,
    /// Events still not accepted after `max_attempts` attempts.
    pub failed: u64,
    /// Events whose requests were not answered when the run stopped (a signal, or giving up); the
    /// next run sends them again.
    pub interrupted: u64,
    pub elapsed: Duration,
    /// With more than one server: each server's URL (as given, less a trailing `/`) and the events it
    /// accepted, in the order given. Empty with a single server.
    pub per_server: Vec<(String, u64)>,
    /// Why the run stopped before the end of the file, if it did.
    pub stopped: Option<Stopped>,
    /// The run continued a checkpoint: after this line.
    pub resumed_after: Option<u64>,
    /// The checkpoint at the end: every line up to this one is done; where it is kept.
    pub checkpoint: Option<(u64, PathBuf)>,
    /// Lines written to `--failed-out`.
    pub failed_out: u64,
    /// Writing `--failed-out` failed.
    pub failed_out_error: bool,
}

impl ClientSummary {
    /// Whether every line was a valid event the server accepted (and the run went to the end).
    pub fn ok(&self) -> bool {
        self.rejected == 0
            && self.invalid == 0
            && self.failed == 0
            && self.interrupted == 0
            && self.stopped.is_none()
            && !self.failed_out_error
    }

    /// `per server: http://a:8000 → 600, http://b:8000 → 400` with more than one server (printed
    /// after the summary line, on a line of its own), `None` with one.
    pub fn per_server_line(&self) -> Option<String> {
        if self.per_server.len() < 2 {
            return None;
        }
        let each: Vec<String> = self.per_server.iter().map(|(url, n)| format!("{url} → {n}")).collect();
        Some(format!("per server: {}", each.join(", ")))
    }

    /// Events sent per second of the run.
    pub fn events_per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.sent as f64 / secs
        } else {
            0.0
        }
    }
}

impl fmt::Display for ClientSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sent {}, accepted {} ({} duplicates), rejected {}, invalid {}, failed {} in {:.2}s ({:.0} events/s)",
            self.sent,
            self.accepted,
            self.duplicates,
            self.rejected,
            self.invalid,
            self.failed,
            self.elapsed.as_secs_f64(),
            self.events_per_sec()
        )?;
        if self.interrupted > 0 {
            write!(f, "; {} unanswered when the run stopped", self.interrupted)?;
        }
        Ok(())
    }
}

/// The run's counts as it goes, shared by the sending tasks and the progress display; the summary at
/// the end.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) bytes: AtomicU64,
    pub(super) lines: AtomicU64,
    pub(super) sent: AtomicU64,
    pub(super) accepted: AtomicU64,
    pub(super) duplicates: AtomicU64,
    pub(super) rejected: AtomicU64,
    pub(super) invalid: AtomicU64,
    pub(super) failed: AtomicU64,
    pub(super) interrupted: AtomicU64,
    /// Events accepted by each server, in the order of `ClientOptions::urls`.
    pub(super) per_server: Vec<AtomicU64>,
}

impl Counters {
    pub(super) fn new(servers: usize) -> Counters {
        Counters { per_server: (0..servers).map(|_| AtomicU64::new(0)).collect(), ..Default::default() }
    }

    pub(super) fn summary(&self, elapsed: Duration) -> ClientSummary {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ClientSummary {
            lines: get(&self.lines),
            sent: get(&self.sent),
            accepted: get(&self.accepted),
            duplicates: get(&self.duplicates),
            rejected: get(&self.rejected),
            invalid: get(&self.invalid),
            failed: get(&self.failed),
            interrupted: get(&self.interrupted),
            elapsed,
            ..Default::default()
        }
    }

    pub(super) fn done(&self) -> u64 {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        get(&self.accepted) + get(&self.rejected) + get(&self.failed) + get(&self.interrupted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_line_and_ok() {
        let s = ClientSummary {
            lines: 10,
            sent: 9,
            accepted: 8,
            duplicates: 2,
            rejected: 1,
            invalid: 1,
            failed: 0,
            elapsed: Duration::from_millis(1500),
            ..Default::default()
        };
        assert_eq!(
            s.to_string(),
            "sent 9, accepted 8 (2 duplicates), rejected 1, invalid 1, failed 0 in 1.50s (6 events/s)"
        );
        assert_eq!(s.per_server_line(), None);
        assert!(!s.ok());
        assert!(ClientSummary { sent: 1, accepted: 1, ..Default::default() }.ok());
        assert_eq!(ClientSummary::default().events_per_sec(), 0.0);
        let two = ClientSummary { per_server: vec![("http://a".into(), 6), ("http://b".into(), 2)], ..s.clone() };
        assert_eq!(two.to_string(), s.to_string(), "the summary line keeps its shape");
        assert_eq!(two.per_server_line().as_deref(), Some("per server: http://a → 6, http://b → 2"));
    }
}
