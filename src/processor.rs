//! `eps process`: applies the log to the store, exactly once.
//!
//! Each round reads a bounded chunk of whole lines after the checkpoint, sums the changes per user, and
//! hands the sums plus the new checkpoint to [`Store::commit`], which applies both in one transaction
//! and only if the checkpoint has not moved meanwhile. Hence:
//! - a crash before the commit leaves nothing behind, a crash after it leaves the checkpoint past
//!   everything it applied: each line's effect lands exactly once;
//! - several processors may run at once: they race for each chunk, one commits, the others are told
//!   where the checkpoint now is and go on from there;
//! - memory is bounded by one chunk and its distinct users, whatever the size of the log.
//!
//! A line that is not a valid event is not applied; it is recorded in the same transaction (so it is
//! reported exactly once) and then appended to the dead-letter file with its segment and byte offset.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rust_decimal::Decimal;

use crate::event::EventRef;
use crate::log::reader::{Chunk, LogReader};
use crate::log::LOG_DIR;
use crate::store::{self, Batch, CommitOutcome, InvalidLine, Store, StoreError};

/// The checkpoint name of the file log.
pub const FILE_STREAM: &str = "file";
/// Dead-letter file, in the data directory.
pub const DEAD_LETTER_FILE: &str = "dead-letter.jsonl";
/// Longest excerpt of an invalid line that is kept.
const MAX_INVALID_EXCERPT: usize = 4096;

#[derive(Debug, Clone)]
pub struct ProcessOptions {
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    /// Keep tailing the log instead of exiting when caught up.
    pub follow: bool,
    /// Bytes of log read (and committed) per transaction.
    pub batch_bytes: usize,
    /// How often a caught-up `--follow` looks for new lines.
    pub poll_interval: Duration,
    /// How long a one-shot run keeps retrying an unreachable database before it gives up.
    pub retry_for: Duration,
}

impl ProcessOptions {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        ProcessOptions {
            data_dir: data_dir.into(),
            database_url: None,
            follow: false,
            batch_bytes: 16 * 1024 * 1024,
            poll_interval: Duration::from_millis(5),
            retry_for: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessSummary {
    pub events_applied: u64,
    pub users_touched: u64,
    pub invalid_lines: u64,
    pub batches: u64,
    /// Chunks another processor committed first.
    pub conflicts: u64,
    pub position: u64,
    pub elapsed: Duration,
}

impl std::fmt::Display for ProcessSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        let rate = if secs > 0.0 { self.events_applied as f64 / secs } else { 0.0 };
        write!(
            f,
            "applied {} events for {} users, {} invalid lines, in {:.2}s ({:.0} events/s); checkpoint at byte {}",
            self.events_applied, self.users_touched, self.invalid_lines, secs, rate, self.position
        )
    }
}

/// Runs until caught up (or, with `follow`, until `shutdown` resolves).
pub async fn run(opts: ProcessOptions, shutdown: impl Future<Output = ()>) -> anyhow::Result<ProcessSummary> {
    store::check_database_url(opts.database_url.as_deref())?;
    tokio::pin!(shutdown);
    let store = tokio::select! {
        store = open_store(&opts) => store?,
        () = &mut shutdown => return Ok(ProcessSummary::default()),
    };
    run_with_store(opts, store, shutdown).await
}

async fn open_store(opts: &ProcessOptions) -> anyhow::Result<Arc<dyn Store>> {
    let deadline = Instant::now() + opts.retry_for;
    let mut delay = Duration::from_millis(100);
    loop {
        match store::open(opts.database_url.as_deref(), &opts.data_dir).await {
            Ok(store) => return Ok(store),
            Err(e) if opts.follow || Instant::now() < deadline => {
                tracing::warn!(error = %e, retry_in = ?delay, "database not reachable; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e.context("cannot open the database")),
        }
    }
}

pub async fn run_with_store(
    opts: ProcessOptions,
    store: Arc<dyn Store>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<ProcessSummary> {
    tokio::pin!(shutdown);
    let started = Instant::now();
    let mut summary = ProcessSummary::default();
    let mut users = HashSet::new();
    let mut reader = LogReader::new(opts.data_dir.join(LOG_DIR), opts.batch_bytes);
    let mut dead_letters = DeadLetters::new(opts.data_dir.join(DEAD_LETTER_FILE));
    let mut position = with_retry(&opts, || store.progress(FILE_STREAM)).await?.position;
    // For the events-lag estimate; refined by every committed batch.
    let mut bytes_per_event = 100.0;
    record_lag(&reader, position, bytes_per_event);
    loop {
        let chunk = tokio::task::block_in_place(|| reader.read(position))?;
        let Some(chunk) = chunk else {
            // Caught up: the lag was recorded after the last commit; a --follow poll every few
            // milliseconds need not list the log directory again.
            if !opts.follow {
                break;
            }
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(opts.poll_interval) => continue,
            }
        };
        let (batch, batch_users) = summarize(&chunk)?;
        let commit_started = Instant::now();
        let outcome = with_retry(&opts, || store.commit(FILE_STREAM, &batch)).await?;
        metrics::histogram!("eps_processor_commit_duration_seconds").record(commit_started.elapsed().as_secs_f64());
        match outcome {
            CommitOutcome::Committed => {
                metrics::counter!("eps_processor_commits_total").increment(1);
                metrics::counter!("eps_processor_events_applied_total").increment(batch.events);
                metrics::counter!("eps_processor_invalid_lines_total").increment(batch.invalid.len() as u64);
                let lines = batch.events + batch.invalid.len() as u64;
                if lines > 0 {
                    bytes_per_event = (batch.to - batch.from) as f64 / lines as f64;
                }
                dead_letters.append(&batch.invalid)?;
                summary.events_applied += batch.events;
                summary.invalid_lines += batch.invalid.len() as u64;
                summary.batches += 1;
                users.extend(batch_users);
                position = batch.to;
            }
            CommitOutcome::Conflict { current } => {
                metrics::counter!("eps_processor_conflicts_total").increment(1);
                summary.conflicts += 1;
                position = current;
            }
        }
        record_lag(&reader, position, bytes_per_event);
        // Between transactions, in both modes: SIGTERM stops a one-shot run cleanly too.
        if futures::poll!(&mut shutdown).is_ready() {
            break;
        }
    }
    summary.users_touched = users.len() as u64;
    summary.position = position;
    summary.elapsed = started.elapsed();
    Ok(summary)
}

fn record_lag(reader: &LogReader, position: u64, bytes_per_event: f64) {
    let end = reader.end_position().unwrap_or(position);
    let lag = end.saturating_sub(position);
    metrics::gauge!("eps_processor_checkpoint_bytes").set(position as f64);
    metrics::gauge!("eps_processor_lag_bytes").set(lag as f64);
    metrics::gauge!("eps_processor_lag_events").set((lag as f64 / bytes_per_event).round());
}

/// Retries a store call while the database is unavailable: forever with `follow`, else for `retry_for`.
async fn with_retry<T, F, Fut>(opts: &ProcessOptions, mut call: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let deadline = Instant::now() + opts.retry_for;
    let mut delay = Duration::from_millis(50);
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(StoreError::Unavailable(e)) if opts.follow || Instant::now() < deadline => {
                tracing::warn!(error = %e, retry_in = ?delay, "database unavailable; nothing was committed, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sums one chunk per user. Returns the batch and a digest of each user touched (for the summary).
fn summarize(chunk: &Chunk) -> anyhow::Result<(Batch, Vec<u64>)> {
    let mut sums: HashMap<String, Decimal> = HashMap::new();
    let mut batch = Batch { from: chunk.start, to: chunk.end, ..Batch::default() };
    for (position, line) in chunk.lines() {
        let parsed = match line {
            Ok(line) if line.iter().all(u8::is_ascii_whitespace) => continue,
            Ok(line) => EventRef::parse_log_line(line).map_err(|e| (e.to_string(), line)),
            Err(torn) => Err(("line without its newline at the end of an older segment (a torn write)".into(), torn)),
        };
        match parsed {
            Ok(event) => {
                let delta = event.delta();
                let sum = match sums.get_mut(event.user_id.as_ref()) {
                    Some(sum) => sum,
                    None => sums.entry(event.user_id.into_owned()).or_default(),
                };
                *sum = crate::event::exact_add(*sum, delta).with_context(|| {
                    format!(
                        "the changes to one user's revenue near log byte {position} cannot be summed exactly \
                         (more than 28 digits); nothing of this batch was applied"
                    )
                })?;
                batch.events += 1;
            }
            Err((error, line)) => batch.invalid.push(InvalidLine {
                position,
                segment: chunk.segment.clone(),
                segment_offset: position - chunk.segment_base,
                error,
                line: excerpt(line),
            }),
        }
    }
    let digests = sums.keys().map(|user| user_digest(user)).collect();
    batch.deltas = sums.into_iter().collect();
    Ok((batch, digests))
}

fn excerpt(line: &[u8]) -> String {
    let cut = &line[..line.len().min(MAX_INVALID_EXCERPT)];
    String::from_utf8_lossy(cut).into_owned()
}

fn user_digest(user: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    user.hash(&mut h);
    h.finish()
}

/// The dead-letter file: one JSON line per invalid log line, appended after the commit that recorded it.
struct DeadLetters {
    path: PathBuf,
}

impl DeadLetters {
    fn new(path: PathBuf) -> Self {
        DeadLetters { path }
    }

    fn append(&mut self, invalid: &[InvalidLine]) -> anyhow::Result<()> {
        if invalid.is_empty() {
            return Ok(());
        }
        let mut out = Vec::new();
        for line in invalid {
            tracing::warn!(
                segment = %line.segment, offset = line.segment_offset, error = %line.error,
                "invalid line in the log: not applied, copied to the dead-letter file"
            );
            let record = serde_json::json!({
                "segment": line.segment,
                "offset": line.segment_offset,
                "position": line.position,
                "error": line.error,
                "line": line.line,
            });
            serde_json::to_writer(&mut out, &record)?;
            out.push(b'\n');
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot open the dead-letter file {}", self.path.display()))?;
        file.write_all(&out)?;
        file.sync_data()?;
        Ok(())
    }
}
