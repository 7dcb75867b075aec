//! The store: where revenue totals and processing checkpoints live.
//!
//! [`Store`] is the whole interface the rest of eps sees; a backend is one module implementing it
//! (`sqlite` embedded by default, `postgres` when a `postgres://` URL is given).
//!
//! Invariant (the exactly-once rule): revenue changes and the checkpoint that says which log positions
//! they cover are only ever written together, in one transaction, by [`Store::commit`], and only if the
//! checkpoint is still where the caller read it (compare-and-set). A processor that crashes before the
//! commit leaves no trace; one that loses the race to another processor gets [`CommitOutcome::Conflict`]
//! and reads again from the new checkpoint.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

use crate::config::ConfigError;
use crate::money::Total;

pub mod postgres;
pub mod sqlite;

/// File name of the embedded database inside the data directory.
pub const SQLITE_FILE: &str = "eps.sqlite3";

/// One processor batch, ready to commit.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// Checkpoint the batch was read from; the commit only happens if the stored one still equals it.
    pub from: u64,
    /// Checkpoint after the batch: always the end of a whole line.
    pub to: u64,
    /// Summed change per user (each user at most once), exact and of any size.
    pub deltas: Vec<(String, Total)>,
    /// Number of valid events the deltas sum.
    pub events: u64,
    /// Lines in `from..to` that were not valid events.
    pub invalid: Vec<InvalidLine>,
}

/// A log line that is not a valid event, recorded so an operator can find and fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidLine {
    /// Global log position (byte offset) where the line starts.
    pub position: u64,
    /// Segment file name holding the line.
    pub segment: String,
    /// Byte offset of the line inside the segment.
    pub segment_offset: u64,
    pub error: String,
    /// The line itself (lossy UTF-8, truncated to a few KiB).
    pub line: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    Committed,
    /// Another processor moved the checkpoint first; nothing was written.
    Conflict { current: u64 },
}

/// Progress of one stream, for summaries and `eps status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamProgress {
    pub position: u64,
    pub events_applied: u64,
    pub invalid_lines: u64,
}

/// What `eps status` shows of the store as a whole.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub users: u64,
    /// The sum of all revenues, exact.
    pub revenue: Total,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or is busy: retry later (HTTP 503).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Other(String),
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Short name for logs: "sqlite" or "postgres".
    fn backend(&self) -> &'static str;

    /// Where `stream`'s checkpoint stands (all zero when it was never processed).
    async fn progress(&self, stream: &str) -> Result<StreamProgress, StoreError>;

    /// In ONE transaction, if `stream`'s checkpoint still equals `batch.from`: add every delta to its
    /// user's revenue (creating the user at 0 first), record the invalid lines, add the counts, and move
    /// the checkpoint to `batch.to`. Otherwise write nothing and return `Conflict`.
    async fn commit(&self, stream: &str, batch: &Batch) -> Result<CommitOutcome, StoreError>;

    /// A user's revenue, or `None` when no event of theirs was ever applied.
    async fn revenue(&self, user_id: &str) -> Result<Option<Total>, StoreError>;

    /// Users in `user_id` order, at most `limit` of them.
    async fn users(&self, limit: usize) -> Result<Vec<(String, Total)>, StoreError>;

    /// Number of users and the exact sum of all revenues.
    async fn totals(&self) -> Result<Totals, StoreError>;

    /// The `limit` users with the highest revenue, highest first (equal revenues by user id), ordered
    /// exactly: revenues that differ in their last digit are told apart whatever their size.
    async fn top_users(&self, limit: usize) -> Result<Vec<(String, Total)>, StoreError>;

    /// Events applied so far, over every stream's checkpoint (the file log, or every partition).
    async fn events_applied(&self) -> Result<u64, StoreError>;

    /// Seconds since a processor last committed to any stream, by the database's clock (`None` before
    /// the first commit). One row per stream is read: cheap enough for every metrics scrape.
    async fn last_commit_age(&self) -> Result<Option<f64>, StoreError>;

    /// Cheap reachability check.
    async fn ping(&self) -> Result<(), StoreError>;

    /// The invalid lines recorded for `stream` after position `after` (all of them for `None`), in
    /// position order, at most `limit`: what the dead-letter file is derived from.
    async fn invalid_lines_after(
        &self,
        stream: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<InvalidLine>, StoreError>;
}

/// Refuses, up front, a database URL no backend can use (a configuration error, not an outage).
pub fn check_database_url(database_url: Option<&str>) -> Result<(), ConfigError> {
    match database_url {
        None => Ok(()),
        Some(url) if ["postgres://", "postgresql://", "sqlite://"].iter().any(|p| url.starts_with(p)) => Ok(()),
        Some(url) => Err(ConfigError(format!(
            "unsupported database URL {:?}: use postgres://... or sqlite://PATH",
            url.split_once("://").map_or(url, |(scheme, _)| scheme)
        ))),
    }
}

/// Opens the store a URL names, running its migrations: PostgreSQL for `postgres://` or
/// `postgresql://`, otherwise the SQLite file in `data_dir` (a `sqlite://PATH` URL picks another file).
pub async fn open(database_url: Option<&str>, data_dir: &Path) -> anyhow::Result<Arc<dyn Store>> {
    check_database_url(database_url)?;
    match database_url {
        Some(url) if url.starts_with("sqlite://") => {
            Ok(Arc::new(sqlite::SqliteStore::open(Path::new(&url["sqlite://".len()..])).await?))
        }
        Some(url) => Ok(Arc::new(postgres::PostgresStore::connect(url).await?)),
        None => {
            crate::fsutil::create_dir_durable(data_dir)?;
            let store = sqlite::SqliteStore::open(&data_dir.join(SQLITE_FILE)).await?;
            // The database file's own entry: SQLite syncs its journals' directory, not always its own.
            crate::fsutil::sync_dir(data_dir)?;
            Ok(Arc::new(store))
        }
    }
}
