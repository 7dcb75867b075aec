//! The processor: applies an event log to the store, exactly once, whichever log it is.
//!
//! The rule both log backends follow: a processor reads the log after the store's checkpoint (a byte
//! offset of the file log, or a JetStream partition's stream sequence), sums the changes per user, and
//! hands the sums plus the new checkpoint to [`Store::commit`], which applies both in one transaction
//! and only if the checkpoint has not moved meanwhile (compare-and-set). Hence a crash before the commit
//! leaves nothing, a crash after it leaves the checkpoint past everything it applied, and processors
//! racing for the same work each learn where the checkpoint is now and go on from there.
//!
//! This module owns what the two backends share: the options and the summary, how a line becomes an
//! event ([`parse_line`]), the bounds of one commit, the retries while the database is away
//! ([`open_store`], [`with_retry`]), and the binding of the checkpoints to the log they count
//! ([`bind_log_identity`]). The backends: [`file`] (the file log), [`jetstream`] (NATS JetStream, with
//! [`ownership`] sharing its partitions between processors). A shutdown request ([`Stop`]) is honoured
//! within [`STOP_GRACE`] in every wait and retry loop.

use std::collections::HashSet;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::error::ConfigError;
use crate::event::EventRef;
pub(crate) use crate::money::ExactSum;
use crate::store::{self, Store, StoreError};

pub mod file;
pub mod jetstream;
pub mod ownership;
pub mod stop;

pub use file::{run, run_with_store, DEAD_LETTER_FILE};
pub use stop::{Stop, STOP_GRACE};

/// Longest excerpt of an invalid line that is kept.
pub(crate) const MAX_INVALID_EXCERPT: usize = 4096;

/// Defaults of [`ProcessOptions`], shared with the command line's flags.
pub const DEFAULT_BATCH_BYTES: usize = 256 * 1024 * 1024;
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(5);
pub const DEFAULT_RETRY_FOR: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct ProcessOptions {
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    /// Keep tailing the log instead of exiting when caught up.
    pub follow: bool,
    /// Most bytes of log committed per transaction (read 8 MiB at a time).
    pub batch_bytes: usize,
    /// How often a caught-up `--follow` looks for new lines.
    pub poll_interval: Duration,
    /// How long a one-shot run keeps retrying an unreachable database before it gives up.
    pub retry_for: Duration,
    /// Re-bind the store's checkpoints to the log as it is now (a new or recreated log), starting at
    /// its first position, instead of refusing a log other than the one they count.
    pub adopt_new_log: bool,
    /// Apply the file log to this store even though the data directory's server uses another one
    /// (see [`store::check_store_record`]).
    pub allow_other_store: bool,
}

impl ProcessOptions {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        ProcessOptions {
            data_dir: data_dir.into(),
            database_url: None,
            follow: false,
            batch_bytes: DEFAULT_BATCH_BYTES,
            poll_interval: DEFAULT_POLL_INTERVAL,
            retry_for: DEFAULT_RETRY_FOR,
            adopt_new_log: false,
            allow_other_store: false,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessSummary {
    pub events_applied: u64,
    /// Distinct users the run touched, counted up to [`MAX_USERS_COUNTED`].
    pub users_touched: u64,
    /// More users than [`MAX_USERS_COUNTED`] were touched: `users_touched` is a lower bound.
    pub users_over: bool,
    pub invalid_lines: u64,
    pub batches: u64,
    /// Chunks another processor committed first.
    pub conflicts: u64,
    pub position: u64,
    pub elapsed: Duration,
    /// Time spent in `Store::commit` (the store phase), over `batches` commits.
    pub store_time: Duration,
}

impl std::fmt::Display for ProcessSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        let rate = if secs > 0.0 { self.events_applied as f64 / secs } else { 0.0 };
        write!(
            f,
            "applied {} events for {}{} users, {} invalid lines, {} conflicts, in {:.2}s ({:.0} events/s); checkpoint at byte {}; \
             store {:.3}s in {} commits",
            self.events_applied,
            if self.users_over { "over " } else { "" },
            self.users_touched,
            self.invalid_lines,
            self.conflicts,
            secs,
            rate,
            self.position,
            self.store_time.as_secs_f64(),
            self.batches
        )
    }
}

/// Opens the store, retrying while the database is unreachable (forever with `follow`, else for
/// `retry_for`); `None` when the shutdown was requested first. Only a connection-level failure is
/// retried ([`store::is_transient`]); anything else (a refused `users_revenue`, an unknown database or
/// role, a failed authentication, a file that cannot be opened) is returned at once with its own
/// message: waiting cannot fix it. Each retry line carries the cause.
pub(crate) async fn open_store(opts: &ProcessOptions, stop: &Stop) -> anyhow::Result<Option<Arc<dyn Store>>> {
    let deadline = Instant::now() + opts.retry_for;
    let mut delays = Backoff::new(Duration::from_millis(100), Duration::from_secs(5)).delays();
    loop {
        let opened = tokio::select! {
            opened = store::open(opts.database_url.as_deref(), &opts.data_dir) => opened,
            () = stop.requested() => return Ok(None),
        };
        match opened {
            Ok(store) => return Ok(Some(store)),
            // A refused table (or URL) stays refused: no retry, exit code 2 at once.
            Err(e) if e.downcast_ref::<ConfigError>().is_some() || !store::is_transient(&e) => return Err(e),
            Err(e) if opts.follow || Instant::now() < deadline => {
                let delay = delays.next_delay();
                tracing::warn!(
                    error = format!("{e:#}"),
                    retry_in_secs = delay.as_secs_f64(),
                    "database not reachable; retrying"
                );
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stop.requested() => return Ok(None),
                }
            }
            Err(e) => return Err(e.context("cannot open the database")),
        }
    }
}

/// Binds the checkpoints of `scope` (the checkpoint named `scope` and those named `scope/…`) to the
/// log they count, `identity`: the first time by recording it; afterwards a processor goes on only
/// if the log is still that one. A log of another identity (deleted and recreated, replaced, another
/// directory or stream) is refused with both identities named, never read from a checkpoint that
/// counts another log; with `adopt_new_log` the checkpoints are moved, in the same transaction as the
/// new binding, to `first_position` of the new log, and the old positions are reported.
/// `None` when the shutdown was requested first.
pub(crate) async fn bind_log_identity(
    opts: &ProcessOptions,
    stop: &Stop,
    store: &dyn Store,
    scope: &str,
    identity: &str,
    first_position: u64,
) -> anyhow::Result<Option<()>> {
    loop {
        let Some(bound) = with_retry(opts, stop, || store.log_identity(scope)).await? else { return Ok(None) };
        let (expected, reset_to) = match bound {
            Some(bound) if bound == identity => return Ok(Some(())),
            None => (None, None),
            Some(bound) if opts.adopt_new_log => (Some(bound), Some(first_position)),
            Some(bound) => {
                return Err(IdentityMismatch { scope: scope.to_string(), bound, found: identity.to_string() }.into())
            }
        };
        let Some((won, old)) =
            with_retry(opts, stop, || store.bind_log_identity(scope, expected.as_deref(), identity, reset_to)).await?
        else {
            return Ok(None);
        };
        if !won {
            continue; // another processor bound it meanwhile: check against what it bound
        }
        match expected {
            None => {
                let applied: Vec<String> =
                    old.iter().filter(|(_, p)| *p > 0).map(|(n, p)| format!("{n} at {p}")).collect();
                if applied.is_empty() {
                    tracing::info!(scope, identity, "the checkpoints are bound to this log");
                } else {
                    // Checkpoints made before eps recorded identities: they are taken to count this log.
                    tracing::warn!(scope, identity, checkpoints = ?applied,
                        "checkpoints made before eps recorded what they count: bound to this log as it is now");
                }
            }
            Some(old_identity) => {
                let unapplied: Vec<String> = old.iter().map(|(n, p)| format!("{n} had applied up to {p}")).collect();
                tracing::warn!(
                    scope, old = %old_identity, new = identity, first_position,
                    checkpoints = ?unapplied,
                    "adopted a new log (--adopt-new-log): the checkpoints now count it from its first position; whatever \
                     the old log held after those checkpoints was never applied and is not in the new log"
                );
                eprintln!(
                    "adopted {identity} in place of {old_identity}: checkpoints moved to {first_position}; the old log's \
                     messages after {} were never applied",
                    if unapplied.is_empty() { "its start".to_string() } else { unapplied.join(", ") }
                );
            }
        }
        return Ok(Some(()));
    }
}

/// The store's checkpoints count another log than the one this processor reads.
#[derive(Debug)]
pub struct IdentityMismatch {
    pub scope: String,
    pub bound: String,
    pub found: String,
}

impl std::fmt::Display for IdentityMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the store's checkpoints ({}) count {}, but the log is now {}: it was deleted and recreated, replaced, or \
             this processor reads another log. Nothing was applied from it. To process the new log from its start, \
             run `eps process --adopt-new-log` once (what the old log held after the checkpoints, if anything, was \
             never applied and is gone); see docs/SCALING.md",
            self.scope, self.bound, self.found
        )
    }
}

impl std::error::Error for IdentityMismatch {}

/// Retries a store call while the database is unavailable: forever with `follow`, else for `retry_for`.
/// `None` once the shutdown is requested: the pause between attempts ends at once, and an attempt in
/// flight gets [`STOP_GRACE`] to finish (its answer is returned if it does; abandoned, it commits
/// nothing).
pub(crate) async fn with_retry<T, F, Fut>(opts: &ProcessOptions, stop: &Stop, mut call: F) -> anyhow::Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let deadline = Instant::now() + opts.retry_for;
    let mut delays = Backoff::new(Duration::from_millis(50), Duration::from_secs(5)).delays();
    loop {
        let attempt = call();
        tokio::pin!(attempt);
        let result = tokio::select! {
            result = &mut attempt => result,
            () = stop.requested() => match tokio::time::timeout(STOP_GRACE, &mut attempt).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!("shutdown requested: abandoning a database call that did not finish in time");
                    return Ok(None);
                }
            },
        };
        match result {
            Ok(value) => return Ok(Some(value)),
            Err(StoreError::Unavailable(e)) if stop.is_requested() => {
                tracing::warn!(error = %e, "database unavailable at shutdown; stopping with what was committed");
                return Ok(None);
            }
            Err(StoreError::Unavailable(e)) if opts.follow || Instant::now() < deadline => {
                let delay = delays.next_delay();
                tracing::warn!(error = %e, retry_in_secs = delay.as_secs_f64(), "database unavailable; nothing was committed, retrying");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stop.requested() => return Ok(None),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The summary counts distinct users up to this many; past it, it says "over" (a `--follow` run that
/// lasts months must not keep a digest of every user it ever touched).
pub const MAX_USERS_COUNTED: usize = 1_000_000;

/// Adds a commit's users to the run's distinct users, never holding more than `cap` of them.
pub(crate) fn count_users(
    users: &mut HashSet<u64>,
    batch_users: impl IntoIterator<Item = u64>,
    cap: usize,
    over: &mut bool,
) {
    for user in batch_users {
        if users.len() >= cap {
            *over |= !users.contains(&user);
            if *over {
                return;
            }
            continue;
        }
        users.insert(user);
    }
}

/// The file log's transaction is committed once it touches this many users (bounds the memory of the
/// sums)...
///
/// A commit's cost in either database grows with the pages it touches, and users spread over a large
/// table put nearly every one on its own page: five commits of 200,000 such users rewrite the table five
/// times where one commit of 1,000,000 writes it once (docs/PERFORMANCE.md, "A million users").
pub(crate) const MAX_USERS_PER_COMMIT: usize = 1_000_000;
/// ... and a JetStream partition's batch at this many. Lower than the file log's because a JetStream
/// processor gathers one batch per partition it owns, all at once (each committed in its own
/// transaction), where the file processor gathers one; a partition's reader waits while its batch is full.
pub(crate) const MAX_USERS_PER_PARTITION_COMMIT: usize = 200_000;
/// Either log's batch is committed once it holds this many invalid lines (each keeps an excerpt of up
/// to [`MAX_INVALID_EXCERPT`] bytes).
pub(crate) const MAX_INVALID_PER_COMMIT: usize = 1_000;

/// One line of a log (as [`crate::log::reader::lines_of`] gives it) as an event: the canonical fast path, else the general
/// parser; `None` for a blank line (skipped); the error and the line's bytes when it is not an event.
/// `torn` says what a line without its newline means where it was read. Both logs' processors use it.
pub(crate) fn parse_line<'a>(
    line: Result<&'a [u8], &'a [u8]>,
    torn: &str,
) -> Option<Result<EventRef<'a>, (String, &'a [u8])>> {
    Some(match line {
        Ok(line) => match EventRef::parse_canonical_log_line(line) {
            Some(event) => Ok(event),
            None if line.iter().all(u8::is_ascii_whitespace) => return None,
            None => EventRef::parse_log_line(line).map_err(|e| (e.to_string(), line)),
        },
        Err(cut) => Err((torn.to_string(), cut)),
    })
}

pub(crate) fn excerpt(line: &[u8]) -> String {
    let cut = &line[..line.len().min(MAX_INVALID_EXCERPT)];
    String::from_utf8_lossy(cut).into_owned()
}

pub(crate) fn user_digest(user: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    user.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_of_users_holds_at_most_its_cap_and_says_over() {
        let (mut users, mut over) = (HashSet::new(), false);
        count_users(&mut users, [1, 2, 3, 2], 3, &mut over);
        assert_eq!((users.len(), over), (3, false));
        count_users(&mut users, [3, 1], 3, &mut over);
        assert_eq!((users.len(), over), (3, false), "users already counted are not more");
        count_users(&mut users, [4, 5, 6], 3, &mut over);
        assert_eq!((users.len(), over), (3, true), "never more than the cap");
        let summary = ProcessSummary { users_touched: 3, users_over: true, ..Default::default() };
        assert!(summary.to_string().contains("for over 3 users"), "{summary}");
    }
}
