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
//!
//! Invariant (the adoption rule): eps uses an existing `users_revenue` (the seed's SQL creates one,
//! an operator may have made their own) only if its columns hold exactly what eps stores: every
//! userId eps accepts, as itself, and every total, unrounded, of any size. Each backend inspects the
//! table at start-up, in its migration transaction, before it changes anything; a table that would
//! round, truncate, convert or refuse is a configuration error ([`schema_refusal`], exit code 2) that
//! names the column, its type, why, and the statements that fix it. The tables eps creates itself
//! always pass (tested).

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::ConfigError;
use crate::money::Total;

pub mod pg_tls;
pub mod postgres;
pub mod sqlite;

/// File name of the embedded database inside the data directory.
pub const SQLITE_FILE: &str = "eps.sqlite3";
/// The checkpoint name of the file log (a JetStream partition's is `jetstream/<stream>/<partition>`).
pub const FILE_STREAM: &str = "file";

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
    Conflict {
        current: u64,
    },
}

/// Progress of one stream, for summaries and `eps status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamProgress {
    pub position: u64,
    pub events_applied: u64,
    pub invalid_lines: u64,
}

/// Messages removed from the log before they were applied (retention, a purge), as the processor
/// found them: reported, recorded once, never applied.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LostRange {
    /// The log the range belongs to: `jetstream/<stream>` (or `file`).
    pub scope: String,
    /// The partition whose reader found the gap (0 for the file log).
    pub partition: u32,
    /// First and last position (stream sequence) removed before it was applied, inclusive. With
    /// JetStream the range is of the whole stream: the partition's own messages are among them.
    pub first: u64,
    pub last: u64,
    /// The identity of the log the range was found in.
    pub identity: String,
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

    /// The identity of the log the checkpoints of `scope` count (`file`, or `jetstream/<stream>` for
    /// every partition's checkpoint), `None` before the first processor bound them.
    async fn log_identity(&self, scope: &str) -> Result<Option<String>, StoreError>;

    /// In ONE transaction, if `scope` is still bound to `expected` (`None`: to nothing): bind it to
    /// `identity`, and with `reset_to` move every checkpoint of the scope (the checkpoint named `scope`
    /// and those named `scope/…`) to that position, keeping their counts. Returns the checkpoints as
    /// they were (name, position) and whether it bound; `false` writes nothing (another process
    /// bound it first: read it again).
    async fn bind_log_identity(
        &self,
        scope: &str,
        expected: Option<&str>,
        identity: &str,
        reset_to: Option<u64>,
    ) -> Result<(bool, Vec<(String, u64)>), StoreError>;

    /// Records a lost range once (by scope, partition and first position); true if it is new.
    async fn record_lost(&self, lost: &LostRange) -> Result<bool, StoreError>;

    /// The lost ranges recorded for `scope`, in (partition, first) order.
    async fn lost_ranges(&self, scope: &str) -> Result<Vec<LostRange>, StoreError>;

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

/// One reason an existing `users_revenue` cannot hold exactly what eps stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaProblem {
    /// The column concerned, or `None` for the table as a whole (a missing index, a CHECK).
    pub column: Option<String>,
    /// What the database declares (a type, a constraint), as it spells it.
    pub found: String,
    /// Why eps cannot use it: what would happen to the money or to processing.
    pub why: String,
}

/// The refusal of an adopted `users_revenue`: the table, each problem, and the statements that fix
/// it. A configuration error (exit code 2, no retry): waiting cannot change a column's type.
pub fn schema_refusal(store: &str, problems: &[SchemaProblem], fix: &[String]) -> ConfigError {
    let mut message = format!(
        "the existing table users_revenue in the {store} store cannot hold exactly what eps stores, so eps \
         refuses to use it (no table was changed):"
    );
    for p in problems {
        match &p.column {
            Some(column) => message.push_str(&format!("\n  - column {column} is {}: {}", p.found, p.why)),
            None => message.push_str(&format!("\n  - {}: {}", p.found, p.why)),
        }
    }
    message.push_str(
        "\nRun these statements on the database, then start eps again (amounts the table already rounded \
         stay rounded):",
    );
    for statement in fix {
        message.push_str("\n    ");
        message.push_str(statement);
    }
    ConfigError(message)
}

/// `name` as an SQL identifier (both dialects): bare when it is a plain lower-case name, otherwise
/// double-quoted with inner quotes doubled.
pub(crate) fn quote_ident(name: &str) -> String {
    let plain = name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        name.to_owned()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// Whether `e` (from [`open`] or a store call) is worth retrying: only a connection-level failure or
/// a busy database ([`StoreError::Unavailable`]) is. Everything else (an unknown database or role, a
/// refused password or permission, a directory that cannot be created, a file that cannot be opened)
/// stays as it is however long one waits, and is reported at once with its own message.
pub fn is_transient(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| matches!(cause.downcast_ref::<StoreError>(), Some(StoreError::Unavailable(_))))
}

/// File in the data directory naming the store its server uses (see [`record_store`]).
pub const STORE_RECORD_FILE: &str = "store";

/// The store a URL names, as the data directory records it and errors show it: `sqlite` for the file
/// in the data directory, a `sqlite://` URL with its path.
///
/// A PostgreSQL store is named by what identifies the database, its hosts, ports and name: not the role,
/// the password or the connection options (`sslmode`, `application_name`, …), so a processor that
/// connects to the same database another way is not refused.
pub fn store_name(database_url: Option<&str>) -> String {
    let Some(url) = database_url else { return "sqlite".to_string() };
    let Some(rest) = url.strip_prefix("postgres://").or_else(|| url.strip_prefix("postgresql://")) else {
        return postgres::redact(url).into_owned();
    };
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let hosts = authority.rsplit_once('@').map_or(authority, |(_, hosts)| hosts);
    format!("postgres://{hosts}/{path}")
}

/// Records in `data_dir` which store the server of its file log uses (one line, [`store_name`]), so
/// that a processor, `eps status` or `eps compact` pointed at another store is refused instead of
/// silently applying the log to a database nobody reads ([`check_store_record`]). Written by the
/// server at start-up, atomically and durably; returns the store it replaced when that was another.
pub fn record_store(data_dir: &Path, database_url: Option<&str>) -> std::io::Result<Option<String>> {
    use std::io::Write;
    let name = store_name(database_url);
    let path = data_dir.join(STORE_RECORD_FILE);
    let previous = read_store_record(data_dir)?;
    if previous.as_deref() == Some(name.as_str()) {
        return Ok(None);
    }
    let with_path = |e, what| crate::fsutil::with_path(e, what, &path);
    let mut tmp =
        tempfile::NamedTempFile::new_in(data_dir).map_err(|e| with_path(e, "cannot create a temporary file for"))?;
    tmp.write_all(format!("{name}\n").as_bytes())
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| with_path(e, "cannot write"))?;
    tmp.persist(&path).map_err(|e| with_path(e.error, "cannot write"))?;
    crate::fsutil::sync_dir(data_dir)
        .map_err(|e| crate::fsutil::with_path(e, "cannot sync the directory", data_dir))?;
    Ok(previous)
}

/// The store recorded in `data_dir` by its server; `None` when none was (no server ran there yet, or
/// one older than the record).
pub fn read_store_record(data_dir: &Path) -> std::io::Result<Option<String>> {
    let path = data_dir.join(STORE_RECORD_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(text.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(crate::fsutil::with_path(e, "cannot read", &path)),
    }
}

/// Refuses a store other than the one the data directory's server uses (the invariant: the file log
/// of a data directory is applied to its server's store, the one `GET /userEvents` answers from).
/// `allow` (`--allow-other-store`) lets it through, for a deliberate copy into another database.
pub fn check_store_record(data_dir: &Path, database_url: Option<&str>, allow: bool) -> anyhow::Result<()> {
    let Some(recorded) = read_store_record(data_dir)? else { return Ok(()) };
    let ours = store_name(database_url);
    if recorded == ours {
        return Ok(());
    }
    if allow {
        tracing::warn!(server_store = %recorded, store = %ours, "another store than the server's, as --allow-other-store says");
        return Ok(());
    }
    Err(ConfigError(format!(
        "the server of {} uses the store {recorded}, but this command was given {ours}: set --database-url (or \
         DATABASE_URL) to the server's store, or pass --allow-other-store to use {ours} anyway",
        data_dir.display()
    ))
    .into())
}

/// How the data directory is chosen, for errors that name a wrong one.
pub const DATA_DIR_SOURCE: &str = "set by --data-dir, EPS_DATA_DIR or data-dir in the --config file";

/// Checks that the data directory exists, for the commands that read it and must not create it
/// (`status`, `compact`, `process` of the file log): a mistyped path is an error naming it.
pub fn require_data_dir(data_dir: &Path) -> Result<(), ConfigError> {
    match std::fs::metadata(data_dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(ConfigError(format!(
            "the data directory {} is not a directory ({DATA_DIR_SOURCE})",
            data_dir.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ConfigError(format!(
            "the data directory {} does not exist ({DATA_DIR_SOURCE}); eps server creates it",
            data_dir.display()
        ))),
        Err(e) => {
            Err(ConfigError(format!("cannot read the data directory {}: {e} ({DATA_DIR_SOURCE})", data_dir.display())))
        }
    }
}

/// [`open`] for the commands that only read or tidy a data directory (`status`, `compact`): it never
/// creates a directory or a database. Without a URL, the data directory and its SQLite file must exist
/// already (the server creates both); a missing one is a configuration error naming it.
pub async fn open_existing(database_url: Option<&str>, data_dir: &Path) -> anyhow::Result<Arc<dyn Store>> {
    check_database_url(database_url)?;
    match database_url {
        Some(url) if url.starts_with("sqlite://") => {
            Ok(Arc::new(sqlite::SqliteStore::open_existing(Path::new(&url["sqlite://".len()..])).await?))
        }
        Some(url) => Ok(Arc::new(postgres::PostgresStore::connect(url).await?)),
        None => {
            require_data_dir(data_dir)?;
            Ok(Arc::new(sqlite::SqliteStore::open_existing(&data_dir.join(SQLITE_FILE)).await?))
        }
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

#[cfg(test)]
mod tests {
    #[test]
    fn a_store_is_named_by_its_database_not_by_how_it_is_reached() {
        let name = |url| super::store_name(Some(url));
        assert_eq!(super::store_name(None), "sqlite");
        assert_eq!(
            name("postgres://eps:pw@db.example:5433/revenue?sslmode=verify-full&sslrootcert=/ca.pem"),
            "postgres://db.example:5433/revenue"
        );
        assert_eq!(
            name("postgresql://other@db.example:5433/revenue"),
            name("postgres://db.example:5433/revenue?sslmode=require")
        );
        assert_ne!(name("postgres://db.example:5433/revenue"), name("postgres://db.example:5433/other"));
        assert!(!name("postgres://eps:secret@h/db").contains("secret"));
    }
}
