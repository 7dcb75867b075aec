//! The processors' shutdown request, as something every wait and retry loop can watch.
//!
//! A processor is given its shutdown as one future (SIGTERM/SIGINT in the binary). [`until`] polls that
//! future beside the work and turns it into a [`Stop`]: a cheap, cloneable handle that any loop (the
//! retries while the database is down, the JetStream commits of every partition at once) can wait on or
//! test. Nothing is cancelled from outside: each loop sees the request and returns what it committed.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;

/// How long a store call already in flight when the shutdown is requested may still take (a healthy
/// commit finishes well within it and is counted); after it the call is abandoned, which commits
/// nothing (the transaction is atomic). With the retry pauses also cut short, a processor stops within
/// this time (plus the moment to return) in every wait and retry loop.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Whether the shutdown was requested; clones share it.
#[derive(Clone, Debug)]
pub struct Stop(watch::Receiver<bool>);

impl Stop {
    /// A handle whose shutdown is never requested (and the sender that would request it).
    pub fn new() -> (watch::Sender<bool>, Stop) {
        let (tx, rx) = watch::channel(false);
        (tx, Stop(rx))
    }

    pub fn is_requested(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the shutdown is requested (never, if it cannot be any more).
    pub async fn requested(&self) {
        let mut rx = self.0.clone();
        if rx.wait_for(|stop| *stop).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Runs `work` to its end, handing it a [`Stop`] that is requested when `shutdown` resolves.
pub async fn until<T, F>(shutdown: impl Future<Output = ()>, work: impl FnOnce(Stop) -> F) -> T
where
    F: Future<Output = T>,
{
    let (tx, stop) = Stop::new();
    let work = work(stop);
    tokio::pin!(work, shutdown);
    let mut requested = false;
    loop {
        tokio::select! {
            result = &mut work => return result,
            () = &mut shutdown, if !requested => {
                requested = true;
                let _ = tx.send(true);
            }
        }
    }
}
