//! Stopping a run: the stop switch and its causes (a signal, or giving up on unreachable servers);
//! the task that watches for them is the run's (`run.rs`).

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Why a run stopped before the end of its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// A signal, by number: 2 (SIGINT) or 15 (SIGTERM).
    Signal(i32),
    /// Every server failed every request for `after`.
    GaveUp { after: Duration, urls: Vec<String> },
}

impl Stopped {
    /// 128 + the signal's number (130 for SIGINT, 143 for SIGTERM); 1 when the client gave up.
    pub fn exit_code(&self) -> u8 {
        match self {
            Stopped::Signal(n) => u8::try_from(128 + n).unwrap_or(1),
            Stopped::GaveUp { .. } => 1,
        }
    }
}

impl fmt::Display for Stopped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stopped::Signal(2) => write!(f, "interrupted (SIGINT)"),
            Stopped::Signal(15) => write!(f, "stopped (SIGTERM)"),
            Stopped::Signal(n) => write!(f, "stopped by signal {n}"),
            Stopped::GaveUp { after, urls } => {
                write!(f, "giving up: no server has taken a request for {}s ({})", after.as_secs(), urls.join(", "))
            }
        }
    }
}

/// The run's stop switch: set once, by a signal or by giving up; the reading loop, the waits and the
/// sending tasks' retries watch it.
#[derive(Default)]
pub(super) struct Stop {
    pub(super) set: AtomicBool,
    pub(super) cause: Mutex<Option<Stopped>>,
    pub(super) notify: tokio::sync::Notify,
}

impl Stop {
    pub(super) fn trigger(&self, cause: Stopped) {
        let mut current = self.cause.lock().unwrap_or_else(|p| p.into_inner());
        if current.is_none() {
            *current = Some(cause);
            self.set.store(true, Ordering::SeqCst);
            self.notify.notify_waiters();
        }
    }

    pub(super) fn is_set(&self) -> bool {
        self.set.load(Ordering::Relaxed)
    }

    pub(super) fn cause(&self) -> Option<Stopped> {
        self.cause.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Returns once the stop is set.
    pub(super) async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.set.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }
}
