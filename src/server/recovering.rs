//! The file log while it is being recovered: the server listens at once and answers what needs the log
//! with 503 and `Retry-After` (the error says the log is being recovered, and how far it has got) until
//! [`FileLog::open`] is done in the background.
//!
//! Recovery of a large log (syncing the newest segment, reading segments to rebuild the de-duplication
//! state) can take seconds; a server that is silent and not listening meanwhile looks dead. Here its
//! progress is logged every [`PROGRESS_EVERY`], and the log's own "log opened" line gives the duration.
//! A shutdown during recovery stops it between two segment reads (a syscall under way is waited for),
//! then the server stops gracefully as usual.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::log::recovery::RecoveryProgress;
use crate::log::{Appended, EventLog, FileLog, FileLogOptions, LogBatch, LogError};

/// How often the progress of a recovery still under way is logged.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// Where recovery stands.
#[derive(Debug, Clone)]
pub(crate) enum Recovery {
    Running,
    Done,
    /// Why it failed (the error's text; the server stops with it).
    Failed(String),
}

/// An [`EventLog`] that is the file log once recovered, and answers `Unavailable` (503) until then.
pub(crate) struct RecoveringLog {
    log: OnceLock<Arc<FileLog>>,
    progress: Arc<RecoveryProgress>,
    state: watch::Sender<Recovery>,
}

impl RecoveringLog {
    /// Starts recovering the log of `opts` on a blocking thread; `then` runs on that thread once it is
    /// open, before any append is let through (a failure there fails the recovery).
    pub(crate) fn start(
        mut opts: FileLogOptions,
        then: impl FnOnce() -> anyhow::Result<()> + Send + 'static,
    ) -> Arc<RecoveringLog> {
        let progress = Arc::new(RecoveryProgress::default());
        opts.progress = progress.clone();
        let this =
            Arc::new(RecoveringLog { log: OnceLock::new(), progress, state: watch::channel(Recovery::Running).0 });
        let recovering = this.clone();
        let task = tokio::task::spawn_blocking(move || {
            let log = FileLog::open(opts)?;
            then()?;
            anyhow::Ok(log)
        });
        tokio::spawn(async move {
            let mut task = task;
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
            let outcome = loop {
                tokio::select! {
                    joined = &mut task => break joined,
                    _ = tick.tick() => {
                        let now = recovering.progress.snapshot();
                        tracing::info!(
                            bytes_read = now.bytes_read, bytes_planned = now.bytes_planned,
                            segment_reads = now.segments_read, segment_reads_planned = now.segments_planned,
                            elapsed_secs = now.elapsed_secs,
                            "recovering the log: {now}; requests that need the log are answered 503 meanwhile"
                        );
                    }
                }
            };
            let state = match outcome {
                Ok(Ok(log)) => {
                    let _ = recovering.log.set(Arc::new(log));
                    Recovery::Done
                }
                Ok(Err(e)) => Recovery::Failed(format!("{e:#}")),
                Err(e) => Recovery::Failed(format!("the log's recovery ended abnormally: {e}")),
            };
            recovering.state.send_replace(state);
        });
        this
    }

    /// Resolves once recovery has ended: `Ok` when the log is open, else why it failed.
    pub(crate) async fn finished(&self) -> Result<(), String> {
        let mut state = self.state.subscribe();
        let ended = state.wait_for(|s| !matches!(s, Recovery::Running)).await.map(|s| s.clone());
        match ended {
            Ok(Recovery::Failed(why)) => Err(why),
            _ => Ok(()),
        }
    }

    /// Why the log cannot take events yet (`None` once it is open).
    pub(crate) fn not_open(&self) -> Option<String> {
        match &*self.state.borrow() {
            Recovery::Done => None,
            Recovery::Running => {
                Some(format!("the log is being recovered ({}); retry shortly", self.progress.snapshot()))
            }
            Recovery::Failed(why) => Some(format!("the log could not be opened: {why}")),
        }
    }
}

#[async_trait]
impl EventLog for RecoveringLog {
    async fn append(&self, batch: LogBatch) -> Result<Vec<Appended>, LogError> {
        match self.log.get() {
            Some(log) => log.append(batch).await,
            None => Err(LogError::Unavailable(self.not_open().unwrap_or_else(|| "the log is not open".into()))),
        }
    }

    fn ready(&self) -> bool {
        self.log.get().is_some_and(|log| log.ready())
    }

    /// Unknown until the log is open (a client asking waits, as its appends would).
    fn identity(&self) -> Option<String> {
        self.log.get().and_then(|log| log.identity())
    }

    /// Stops a recovery under way (at its next check) and waits for it; then shuts the log down if it
    /// was opened.
    async fn shutdown(&self) {
        self.progress.cancel();
        let _ = self.finished().await;
        if let Some(log) = self.log.get() {
            log.shutdown().await;
        }
    }
}
