//! The embedded SQLite backend (the default store: one file in the data directory).
//!
//! Owns: the schema of the SQLite file (versioned migrations in `eps_schema_migrations`), the small
//! connection pool, and the mapping of SQLite errors to [`StoreError`].
//!
//! Invariants:
//! - An existing `users_revenue` (a `sqlite://` file made before eps) is adopted only where its
//!   columns keep the text eps stores (see `adoption_problems`); otherwise opening fails with the
//!   statements that rebuild it, before anything was written.
//! - Revenue is stored as TEXT holding the normalised decimal string ("100.00" is stored as "100"),
//!   of any size. A NUMERIC column would hand 0.1 to SQLite's floating point; TEXT keeps it exact, and
//!   all arithmetic happens in `eps_dec_add`, a scalar function that adds with `rust_decimal` when the
//!   exact sum fits a `Decimal` and with an arbitrary-precision [`Total`] otherwise: it never fails
//!   on a valid total and never rounds.
//! - `revenue_key` is maintained with `revenue` in the same statement (`eps_dec_key`, see
//!   [`crate::money::order_key`]): text whose byte order is the revenue's numeric order, indexed, so
//!   the top users are read exactly from the index (`limit` rows), never through a REAL approximation.
//! - A commit writes its users in key order through one prepared upsert; one touching 10,000 users or
//!   more has a page cache of up to 128 MiB for its duration (then SQLite's default again), so the
//!   pages it revisits are not evicted and spilled meanwhile.
//! - Every write is one `BEGIN IMMEDIATE` transaction: the write lock is taken before the checkpoint
//!   is read, so the compare-and-set of [`Store::commit`] cannot interleave with another writer,
//!   in this process or another one.
//! - `synchronous=FULL` in WAL mode: once `commit` returns `Committed`, the change survives a power cut.
//! - rusqlite is blocking: every call runs in `spawn_blocking`, never on the async executor.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::functions::FunctionFlags;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};
use rust_decimal::Decimal;

use super::{
    quote_ident, schema_refusal, Batch, CommitOutcome, InvalidLine, LostRange, SchemaProblem, Store, StoreError,
    StreamProgress, Totals,
};
use crate::error::ConfigError;
use crate::money::{ExactSum, Total};

/// How long a statement waits for another writer's lock before the store reports `Unavailable`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections open at once, each on a blocking thread of its own: as many as the machine has cores
/// (at least two, so that a long read such as the console's whole-table sum leaves one for the
/// others). Callers beyond it wait for one to come back rather than open another: under many
/// concurrent reads a connection per call would be opened, configured (WAL, functions) and closed
/// again, and more threads than cores only add switches and SQLite's own lock contention (measured
/// with `read_user_p99`, docs/PERFORMANCE.md).
fn max_connections() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).max(2)
}

/// A commit touching at least this many users gets the large page cache for its duration...
const LARGE_COMMIT_USERS: usize = 10_000;
/// ... of this many KiB (an upper bound: pages are allocated as they are read). 865,000 users' rows and
/// index entries take 89 MiB.
const COMMIT_CACHE_KIB: i64 = 128 * 1024;
/// SQLite's own default `cache_size` (2,000 KiB), restored after a large commit.
const DEFAULT_CACHE_SIZE: i64 = -2000;

/// Schema versions, applied in order, each exactly once (recorded in `eps_schema_migrations`).
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        // IF NOT EXISTS: a users_revenue made before eps is adopted (when `adoption_problems` finds it exact).
        "CREATE TABLE IF NOT EXISTS users_revenue (
         user_id TEXT PRIMARY KEY,
         revenue TEXT NOT NULL
     );
     CREATE TABLE eps_checkpoints (
         stream TEXT PRIMARY KEY,
         position INTEGER NOT NULL,
         events_applied INTEGER NOT NULL DEFAULT 0,
         invalid_lines INTEGER NOT NULL DEFAULT 0,
         updated_at TEXT
     );
     CREATE TABLE eps_invalid_lines (
         stream TEXT,
         position INTEGER,
         segment TEXT,
         segment_offset INTEGER,
         error TEXT,
         line TEXT,
         PRIMARY KEY (stream, position)
     );",
    ),
    (
        2,
        // The exact order of revenues for the top users (version 1 ordered by CAST(revenue AS REAL), which
        // cannot tell 10^20 from 10^20 + 1). Existing rows get their key here, once.
        "ALTER TABLE users_revenue ADD COLUMN revenue_key TEXT;
     UPDATE users_revenue SET revenue_key = eps_dec_key(revenue);
     CREATE INDEX users_revenue_top ON users_revenue (revenue_key DESC, user_id);",
    ),
    (
        3,
        // What the checkpoints count (a stream's creation time and partition count, a file log's id), and
        // the ranges found removed from the log before they were applied.
        "CREATE TABLE eps_log_identity (
         scope TEXT PRIMARY KEY,
         identity TEXT NOT NULL,
         bound_at TEXT
     );
     CREATE TABLE eps_lost_messages (
         scope TEXT NOT NULL,
         part INTEGER NOT NULL,
         first_position INTEGER NOT NULL,
         last_position INTEGER NOT NULL,
         identity TEXT NOT NULL,
         detected_at TEXT,
         PRIMARY KEY (scope, part, first_position)
     );",
    ),
];

pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// Whether opening a connection may create the file (not for the read-only commands).
    create: bool,
    idle: Mutex<Vec<Connection>>,
    /// One permit per connection that may be in use ([`max_connections`]).
    permits: Arc<tokio::sync::Semaphore>,
    max_connections: usize,
    /// Connections opened over the store's life.
    opened: std::sync::atomic::AtomicUsize,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and brings its schema up to date.
    pub async fn open(path: &Path) -> anyhow::Result<Self> {
        Self::open_with(path, true).await
    }

    /// Opens the database file only if it exists (never creates it), and brings its schema up to date:
    /// for the commands that read a data directory. A missing file is a configuration error naming it.
    pub async fn open_existing(path: &Path) -> anyhow::Result<Self> {
        if !path.is_file() {
            return Err(ConfigError(format!(
                "no SQLite store {}: nothing was ever stored in this data directory (eps server creates the file; \
                 with PostgreSQL set --database-url or DATABASE_URL)",
                path.display()
            ))
            .into());
        }
        Self::open_with(path, false).await
    }

    async fn open_with(path: &Path, create: bool) -> anyhow::Result<Self> {
        let max_connections = max_connections();
        let inner = Arc::new(Inner {
            path: path.to_path_buf(),
            create,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(tokio::sync::Semaphore::new(max_connections)),
            max_connections,
            opened: std::sync::atomic::AtomicUsize::new(0),
        });
        let store = SqliteStore { inner };
        let doing = || format!("cannot open the SQLite store {}", path.display());
        match store.with_conn(migrate).await {
            Ok(Ok(())) => Ok(store),
            // A ConfigError under the context: main exits 2 and the retry loops give up at once.
            Ok(Err(refused)) => Err(anyhow::Error::new(refused).context(doing())),
            Err(e) => Err(anyhow::Error::new(e).context(doing())),
        }
    }

    /// Runs `f` on a pooled connection in a blocking thread, once one of the [`max_connections`] is
    /// free. A connection is returned to the pool only when it is outside any transaction (a failed `f`
    /// may have left one open).
    async fn with_conn<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        // The semaphore is never closed.
        let permit = Arc::clone(&inner.permits)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Other("the SQLite connection pool is closed".into()))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let pooled = inner.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let mut conn = match pooled {
                Some(conn) => conn,
                None => {
                    inner.opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    open_connection(&inner.path, inner.create)?
                }
            };
            let result = f(&mut conn);
            if conn.is_autocommit() {
                let mut idle = inner.idle.lock().unwrap_or_else(|p| p.into_inner());
                if idle.len() < inner.max_connections {
                    idle.push(conn);
                }
            }
            result
        })
        .await
        .map_err(|e| StoreError::Other(format!("SQLite worker thread failed: {e}")))?
    }
}

fn open_connection(path: &Path, create: bool) -> Result<Connection, StoreError> {
    let mut flags = OpenFlags::default();
    if !create {
        flags.remove(OpenFlags::SQLITE_OPEN_CREATE);
    }
    let conn =
        Connection::open_with_flags(path, flags).map_err(|e| sql_error(&format!("opening {}", path.display()), e))?;
    let setup = || -> rusqlite::Result<()> {
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // journal_mode answers with a row, hence query_row; WAL lets readers run beside the writer.
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(%mode, "SQLite refused WAL mode; readers will wait for writers");
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        let flags = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC;
        conn.create_scalar_function("eps_dec_add", 2, flags, |ctx| {
            dec_add(&ctx.get::<String>(0)?, &ctx.get::<String>(1)?).map_err(function_error)
        })?;
        conn.create_scalar_function("eps_dec_key", 1, flags, |ctx| {
            Ok(Total::from_str(&ctx.get::<String>(0)?).map_err(function_error)?.order_key())
        })
    };
    setup().map_err(|e| sql_error("configuring the connection", e))?;
    Ok(conn)
}

/// The exact sum of two decimal texts, as normalised text. `rust_decimal` when the sum fits a
/// `Decimal` exactly (the common case, no allocation beyond the answer), arbitrary precision otherwise.
fn dec_add(a: &str, b: &str) -> Result<String, crate::money::ParseTotalError> {
    if let (Ok(x), Ok(y)) = (Decimal::from_str_exact(a), Decimal::from_str_exact(b)) {
        if let Some(sum) = crate::money::exact_add(x, y) {
            return Ok(sum.normalize().to_string());
        }
    }
    Ok((Total::from_str(a)? + Total::from_str(b)?).to_string())
}

fn function_error(e: crate::money::ParseTotalError) -> rusqlite::Error {
    rusqlite::Error::UserFunctionError(format!("stored revenue: {e}").into())
}

/// Applies the pending migrations, after checking an existing `users_revenue` (see
/// [`adoption_problems`]). `BEGIN IMMEDIATE` holds the write lock from the check and the version
/// check to the last migration, so two processes opening a new file at once cannot both apply version
/// 1. The outer error is the database's; the inner one refuses the table, and then nothing was written.
fn migrate(conn: &mut Connection) -> Result<Result<(), ConfigError>, StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| sql_error("starting the migration", e))?;
    let existing = inspect_users_revenue(&tx).map_err(|e| sql_error("inspecting the existing users_revenue", e))?;
    if let Some(table) = existing {
        let (problems, fix) = adoption_problems(&table);
        if !problems.is_empty() {
            // Dropping `tx` rolls back; the check itself wrote nothing.
            return Ok(Err(schema_refusal("SQLite", &problems, &fix)));
        }
    }
    tx.execute_batch("CREATE TABLE IF NOT EXISTS eps_schema_migrations (version INTEGER PRIMARY KEY)")
        .map_err(|e| sql_error("creating eps_schema_migrations", e))?;
    let current: i64 = tx
        .query_row("SELECT COALESCE(MAX(version), 0) FROM eps_schema_migrations", [], |r| r.get(0))
        .map_err(|e| sql_error("reading the schema version", e))?;
    for &(version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tx.execute_batch(sql).map_err(|e| sql_error(&format!("applying migration {version}"), e))?;
        tx.execute("INSERT INTO eps_schema_migrations (version) VALUES (?1)", [version])
            .map_err(|e| sql_error(&format!("recording migration {version}"), e))?;
    }
    // A row without its order key (a table rebuilt by the statements `adoption_problems` prints, or a
    // row inserted by hand) gets it here; the index finds them without a scan.
    tx.execute("UPDATE users_revenue SET revenue_key = eps_dec_key(revenue) WHERE revenue_key IS NULL", [])
        .map_err(|e| sql_error("filling missing order keys", e))?;
    tx.commit().map_err(|e| sql_error("committing the migrations", e))?;
    Ok(Ok(()))
}

/// A column of an existing `users_revenue`, as `pragma table_info` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SqliteColumn {
    name: String,
    /// The declared type, as written ("" when none).
    declared: String,
    not_null: bool,
    /// The DEFAULT expression's text, if any.
    default: Option<String>,
}

/// What start-up checks of an existing `users_revenue`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SqliteTable {
    columns: Vec<SqliteColumn>,
    /// A non-partial unique index on exactly `user_id` with the BINARY collation (a primary key
    /// counts): what `ON CONFLICT (user_id)` needs, telling "A" from "a".
    user_id_unique: bool,
    /// The CREATE TABLE statement has a CHECK constraint.
    has_check: bool,
}

fn inspect_users_revenue(conn: &Connection) -> rusqlite::Result<Option<SqliteTable>> {
    let sql: Option<String> = conn
        .query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'users_revenue' COLLATE NOCASE",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let Some(sql) = sql else { return Ok(None) };
    let columns = conn
        .prepare("SELECT name, type, \"notnull\", dflt_value FROM pragma_table_info('users_revenue') ORDER BY cid")?
        .query_map([], |r| {
            Ok(SqliteColumn { name: r.get(0)?, declared: r.get(1)?, not_null: r.get(2)?, default: r.get(3)? })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let unique_indexes = conn
        .prepare("SELECT name FROM pragma_index_list('users_revenue') WHERE \"unique\" AND NOT partial")?
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut user_id_unique = false;
    for index in unique_indexes {
        let keys = conn
            .prepare("SELECT name, coll FROM pragma_index_xinfo(?1) WHERE key")?
            .query_map([&index], |r| Ok((r.get::<_, Option<String>>(0)?, r.get::<_, Option<String>>(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        user_id_unique |= matches!(keys.as_slice(),
            [(Some(name), Some(coll))] if name.eq_ignore_ascii_case("user_id") && coll.eq_ignore_ascii_case("BINARY"));
    }
    Ok(Some(SqliteTable { columns, user_id_unique, has_check: has_check_constraint(&sql) }))
}

/// SQLite's type affinity of a declared type (the rules of section 3.1 of "Datatypes In SQLite", in
/// their order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Affinity {
    Integer,
    Text,
    Blob,
    Real,
    Numeric,
}

fn affinity(declared: &str) -> Affinity {
    let t = declared.to_ascii_uppercase();
    if t.contains("INT") {
        Affinity::Integer
    } else if ["CHAR", "CLOB", "TEXT"].iter().any(|s| t.contains(s)) {
        Affinity::Text
    } else if t.contains("BLOB") || t.trim().is_empty() {
        Affinity::Blob
    } else if ["REAL", "FLOA", "DOUB"].iter().any(|s| t.contains(s)) {
        Affinity::Real
    } else {
        Affinity::Numeric
    }
}

/// Whether a CREATE TABLE statement has a CHECK constraint: the keyword CHECK followed by "(", outside
/// string literals and quoted identifiers.
fn has_check_constraint(sql: &str) -> bool {
    // The statement with every quoted token blanked out and words upper-cased.
    let mut plain = String::with_capacity(sql.len());
    let mut chars = sql.chars();
    while let Some(c) = chars.next() {
        let close = match c {
            '\'' => '\'',
            '"' => '"',
            '`' => '`',
            '[' => ']',
            _ => {
                plain.push(c.to_ascii_uppercase());
                continue;
            }
        };
        // A doubled quote inside just closes and reopens the token: blank either way.
        for q in chars.by_ref() {
            if q == close {
                break;
            }
        }
        plain.push(' ');
    }
    let word = |c: char| c.is_alphanumeric() || c == '_' || c == '$';
    plain.match_indices("CHECK").any(|(at, _)| {
        let before = plain[..at].chars().next_back();
        let after = plain[at + "CHECK".len()..].trim_start();
        !before.is_some_and(word) && after.starts_with('(')
    })
}

/// What in `table` would convert, narrow or refuse what eps stores, and the statements that fix it.
/// SQLite keeps a value as given only in a column of TEXT or BLOB affinity; INTEGER, REAL and NUMERIC
/// affinity turn the decimal text eps stores into a number (0.1 into a binary fraction, "007" into 7).
/// Exact means: `user_id` and `revenue` (and `revenue_key`, when present) of TEXT or BLOB affinity,
/// `revenue` NOT NULL, a BINARY unique index on `user_id` alone, no CHECK, and no other column NOT NULL
/// without a default. SQLite has no ALTER COLUMN TYPE: the fix rebuilds the table, keeping its rows and
/// other columns.
fn adoption_problems(table: &SqliteTable) -> (Vec<SchemaProblem>, Vec<String>) {
    let mut problems = Vec::new();
    let mut problem = |column: Option<&str>, found: String, why: &str| {
        problems.push(SchemaProblem { column: column.map(str::to_owned), found, why: why.to_owned() })
    };
    let column = |name: &str| table.columns.iter().find(|c| c.name.eq_ignore_ascii_case(name));
    let shown = |c: &SqliteColumn| {
        let declared = if c.declared.is_empty() { "(no type)" } else { c.declared.as_str() };
        format!("{declared} ({:?} affinity)", affinity(&c.declared))
    };
    let converts = |c: &SqliteColumn| !matches!(affinity(&c.declared), Affinity::Text | Affinity::Blob);
    match column("revenue") {
        None => problem(None, "no column revenue".into(), "eps keeps each user's total there"),
        Some(c) => {
            if converts(c) {
                problem(
                    Some("revenue"),
                    shown(c),
                    "it converts the exact decimal text eps stores to a number (REAL keeps 15 significant \
                     digits and 0.1 becomes a binary fraction; INTEGER loses the fraction of 10.5), and eps \
                     cannot add such totals",
                );
            }
            if !c.not_null {
                problem(Some("revenue"), format!("{} without NOT NULL", shown(c)), "a NULL total cannot be added to");
            }
        }
    }
    match column("user_id") {
        None => problem(None, "no column user_id".into(), "eps keys each total by userId"),
        Some(c) if converts(c) => problem(
            Some("user_id"),
            shown(c),
            "it converts ids that look like numbers (\"007\" would be stored as 7 and share a total with \"7\")",
        ),
        Some(_) => {}
    }
    if let Some(c) = column("revenue_key").filter(|c| converts(c)) {
        problem(Some("revenue_key"), shown(c), "eps keeps each total's order key there as text");
    }
    if column("user_id").is_some() && !table.user_id_unique {
        problem(
            None,
            "no unique index on user_id alone with the BINARY collation".into(),
            "eps adds to a user's row with INSERT ... ON CONFLICT (user_id), which needs one, and a NOCASE \
             one would let \"A\" and \"a\" share one total",
        );
    }
    if table.has_check {
        let why = "it may refuse a total or an id eps must store, which halts processing";
        problem(None, "a CHECK constraint".into(), why);
    }
    for c in &table.columns {
        let ours = ["user_id", "revenue", "revenue_key"].iter().any(|n| c.name.eq_ignore_ascii_case(n));
        if !ours && c.not_null && c.default.is_none() {
            problem(
                Some(&quote_ident(&c.name)),
                format!("{} NOT NULL without a default", shown(c)),
                "eps's INSERT does not name it, so adding a new user would fail",
            );
        }
    }
    if problems.is_empty() {
        return (problems, Vec::new());
    }
    (problems, rebuild_statements(table))
}

/// The statements that rebuild `users_revenue` as eps declares it, keeping its rows (converted to
/// text) and its other columns (their type and default; no NOT NULL, CHECK or index). Order keys are
/// left NULL: eps computes them when it next opens the file.
fn rebuild_statements(table: &SqliteTable) -> Vec<String> {
    let ours = |name: &str| ["user_id", "revenue", "revenue_key"].iter().any(|n| name.eq_ignore_ascii_case(n));
    let has = |name: &str| table.columns.iter().any(|c| c.name.eq_ignore_ascii_case(name));
    let mut definitions = vec!["user_id TEXT PRIMARY KEY".to_owned(), "revenue TEXT NOT NULL".to_owned()];
    let mut names = vec!["user_id".to_owned(), "revenue".to_owned()];
    let mut values = vec![
        if has("user_id") { "CAST(user_id AS TEXT)" } else { "NULL" }.to_owned(),
        if has("revenue") { "CAST(revenue AS TEXT)" } else { "'0'" }.to_owned(),
    ];
    if has("revenue_key") {
        definitions.push("revenue_key TEXT".into());
    }
    for c in table.columns.iter().filter(|c| !ours(&c.name)) {
        let name = quote_ident(&c.name);
        let mut definition = format!("{name} {}", c.declared);
        if let Some(default) = &c.default {
            definition.push_str(&format!(" DEFAULT {default}"));
        }
        definitions.push(definition.trim_end().to_owned());
        names.push(name.clone());
        values.push(name);
    }
    let mut statements = vec![
        "BEGIN;".to_owned(),
        format!("CREATE TABLE eps_users_revenue_rebuilt ({});", definitions.join(", ")),
        format!(
            "INSERT INTO eps_users_revenue_rebuilt ({}) SELECT {} FROM users_revenue;",
            names.join(", "),
            values.join(", ")
        ),
        "DROP TABLE users_revenue;".to_owned(),
        "ALTER TABLE eps_users_revenue_rebuilt RENAME TO users_revenue;".to_owned(),
    ];
    if has("revenue_key") {
        statements.push("CREATE INDEX users_revenue_top ON users_revenue (revenue_key DESC, user_id);".into());
    }
    statements.push("COMMIT;".into());
    statements
}

fn commit_batch(conn: &mut Connection, stream: &str, batch: &Batch) -> Result<CommitOutcome, StoreError> {
    let to = to_i64(batch.to, "batch end position")?;
    let events = to_i64(batch.events, "event count")?;
    // A page cache that holds the pages a large commit touches (users' rows and both indexes), for this
    // commit only: a small cache would evict (and spill to the WAL) pages it reads again moments later.
    let large = batch.deltas.len() >= LARGE_COMMIT_USERS;
    if large {
        conn.pragma_update(None, "cache_size", -COMMIT_CACHE_KIB).map_err(|e| sql_error("sizing the page cache", e))?;
    }
    let outcome = commit_in_tx(conn, stream, batch, to, events);
    if large {
        // Gives the pages back (a smaller cache frees what is over it).
        conn.pragma_update(None, "cache_size", DEFAULT_CACHE_SIZE)
            .map_err(|e| sql_error("sizing the page cache", e))?;
    }
    outcome
}

fn commit_in_tx(
    conn: &mut Connection,
    stream: &str,
    batch: &Batch,
    to: i64,
    events: i64,
) -> Result<CommitOutcome, StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| sql_error("starting the commit", e))?;
    let current: u64 = tx
        .query_row("SELECT position FROM eps_checkpoints WHERE stream = ?1", [stream], |r| r.get::<_, i64>(0))
        .optional()
        .map_err(|e| sql_error("reading the checkpoint", e))?
        .map_or(0, |p| p as u64);
    if current != batch.from {
        // Dropping `tx` rolls back; nothing was written.
        return Ok(CommitOutcome::Conflict { current });
    }
    {
        let mut upsert = tx
            .prepare(
                "INSERT INTO users_revenue (user_id, revenue, revenue_key) VALUES (?1, ?2, ?3)
                 ON CONFLICT (user_id) DO UPDATE SET
                     revenue = eps_dec_add(users_revenue.revenue, excluded.revenue),
                     revenue_key = eps_dec_key(eps_dec_add(users_revenue.revenue, excluded.revenue))",
            )
            .map_err(|e| sql_error("preparing the revenue upsert", e))?;
        // In key order: each page of the primary key's index is visited once, in order.
        let mut deltas: Vec<&(String, Total)> = batch.deltas.iter().collect();
        deltas.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (user_id, delta) in deltas {
            // `Total::order_key` of the same text, formatted once.
            let text = delta.to_string();
            upsert
                .execute((user_id, &text, crate::money::order_key(&text)))
                .map_err(|e| sql_error(&format!("updating the revenue of {user_id:?}"), e))?;
        }
    }
    let mut new_invalid: i64 = 0;
    {
        let mut insert = tx
            .prepare(
                "INSERT OR IGNORE INTO eps_invalid_lines (stream, position, segment, segment_offset, error, line)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .map_err(|e| sql_error("preparing the invalid-line insert", e))?;
        for l in &batch.invalid {
            let position = to_i64(l.position, "invalid line position")?;
            let offset = to_i64(l.segment_offset, "invalid line segment offset")?;
            new_invalid += insert
                .execute((stream, position, &l.segment, offset, &l.error, &l.line))
                .map_err(|e| sql_error("recording an invalid line", e))? as i64;
        }
    }
    tx.execute(
        "INSERT INTO eps_checkpoints (stream, position, events_applied, invalid_lines, updated_at)
         VALUES (?1, ?2, ?3, ?4, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
         ON CONFLICT (stream) DO UPDATE SET
             position = excluded.position,
             events_applied = eps_checkpoints.events_applied + excluded.events_applied,
             invalid_lines = eps_checkpoints.invalid_lines + excluded.invalid_lines,
             updated_at = excluded.updated_at",
        (stream, to, events, new_invalid),
    )
    .map_err(|e| sql_error("moving the checkpoint", e))?;
    tx.commit().map_err(|e| sql_error("committing the batch", e))?;
    Ok(CommitOutcome::Committed)
}

fn parse_revenue(user_id: &str, text: &str) -> Result<Total, StoreError> {
    Total::from_str(text).map_err(|e| StoreError::Other(format!("stored revenue of user {user_id:?}: {e}")))
}

fn to_i64(v: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Other(format!("{what} {v} does not fit SQLite's INTEGER")))
}

/// Busy or locked after the busy timeout means another writer holds the database: retry later.
fn sql_error(doing: &str, e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            StoreError::Unavailable(format!("SQLite is busy ({doing}): {e}"))
        }
        _ => StoreError::Other(format!("SQLite error while {doing}: {e}")),
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn progress(&self, stream: &str) -> Result<StreamProgress, StoreError> {
        let stream = stream.to_owned();
        self.with_conn(move |conn| {
            let row = conn
                .query_row(
                    "SELECT position, events_applied, invalid_lines FROM eps_checkpoints WHERE stream = ?1",
                    [&stream],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)),
                )
                .optional()
                .map_err(|e| sql_error("reading the checkpoint", e))?;
            Ok(row.map_or_else(StreamProgress::default, |(p, e, i)| StreamProgress {
                position: p as u64,
                events_applied: e as u64,
                invalid_lines: i as u64,
            }))
        })
        .await
    }

    async fn commit(&self, stream: &str, batch: &Batch) -> Result<CommitOutcome, StoreError> {
        // The closure must own its data ('static); a batch is at most a few thousand users.
        let stream = stream.to_owned();
        let batch = batch.clone();
        self.with_conn(move |conn| commit_batch(conn, &stream, &batch)).await
    }

    async fn revenue(&self, user_id: &str) -> Result<Option<Total>, StoreError> {
        let user_id = user_id.to_owned();
        self.with_conn(move |conn| {
            let text: Option<String> = conn
                .prepare_cached("SELECT revenue FROM users_revenue WHERE user_id = ?1")
                .and_then(|mut stmt| stmt.query_row([&user_id], |r| r.get(0)))
                .optional()
                .map_err(|e| sql_error("reading a revenue", e))?;
            text.map(|t| parse_revenue(&user_id, &t)).transpose()
        })
        .await
    }

    async fn users(&self, limit: usize) -> Result<Vec<(String, Total)>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with_conn(move |conn| {
            user_rows(
                conn,
                "SELECT user_id, revenue FROM users_revenue ORDER BY user_id LIMIT ?1",
                limit,
                "listing users",
            )
        })
        .await
    }

    async fn totals(&self) -> Result<Totals, StoreError> {
        self.with_conn(|conn| {
            let mut stmt = conn
                .prepare("SELECT user_id, revenue FROM users_revenue")
                .map_err(|e| sql_error("summing revenues", e))?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .map_err(|e| sql_error("summing revenues", e))?;
            let (mut users, mut sum) = (0, ExactSum::default());
            for row in rows {
                let (user_id, text) = row.map_err(|e| sql_error("summing revenues", e))?;
                // Most totals fit a Decimal: summed in 128 bits, the rest exactly beside.
                match Decimal::from_str_exact(&text) {
                    Ok(revenue) => sum.add_decimal(revenue),
                    Err(_) => sum.add_total(&parse_revenue(&user_id, &text)?),
                }
                users += 1;
            }
            Ok(Totals { users, revenue: sum.total() })
        })
        .await
    }

    async fn top_users(&self, limit: usize) -> Result<Vec<(String, Total)>, StoreError> {
        // `revenue_key` orders exactly (see the module's invariants) and the index users_revenue_top
        // serves this order as it is: `limit` rows read, whatever the number of users.
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let sql = "SELECT user_id, revenue FROM users_revenue ORDER BY revenue_key DESC, user_id LIMIT ?1";
        self.with_conn(move |conn| user_rows(conn, sql, limit, "listing the top users")).await
    }

    async fn events_applied(&self) -> Result<u64, StoreError> {
        self.with_conn(|conn| {
            conn.query_row("SELECT COALESCE(SUM(events_applied), 0) FROM eps_checkpoints", [], |r| r.get::<_, i64>(0))
                .map(|n| n as u64)
                .map_err(|e| sql_error("reading the checkpoints", e))
        })
        .await
    }

    async fn last_commit_age(&self) -> Result<Option<f64>, StoreError> {
        self.with_conn(|conn| {
            conn.query_row(
                "SELECT (julianday('now') - julianday(MAX(updated_at))) * 86400.0 FROM eps_checkpoints",
                [],
                |r| r.get::<_, Option<f64>>(0),
            )
            .map(|age| age.map(|a| a.max(0.0)))
            .map_err(|e| sql_error("reading the last commit time", e))
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.with_conn(|conn| conn.query_row("SELECT 1", [], |_| Ok(())).map_err(|e| sql_error("pinging", e))).await
    }

    async fn log_identity(&self, scope: &str) -> Result<Option<String>, StoreError> {
        let scope = scope.to_owned();
        self.with_conn(move |conn| {
            conn.query_row("SELECT identity FROM eps_log_identity WHERE scope = ?1", [&scope], |r| r.get(0))
                .optional()
                .map_err(|e| sql_error("reading the log identity", e))
        })
        .await
    }

    async fn bind_log_identity(
        &self,
        scope: &str,
        expected: Option<&str>,
        identity: &str,
        reset_to: Option<u64>,
    ) -> Result<(bool, Vec<(String, u64)>), StoreError> {
        let (scope, expected, identity) = (scope.to_owned(), expected.map(str::to_owned), identity.to_owned());
        let reset_to = reset_to.map(|p| to_i64(p, "checkpoint")).transpose()?;
        self.with_conn(move |conn| {
            let doing = "binding the checkpoints to the log";
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| sql_error(doing, e))?;
            let current: Option<String> = tx
                .query_row("SELECT identity FROM eps_log_identity WHERE scope = ?1", [&scope], |r| r.get(0))
                .optional()
                .map_err(|e| sql_error(doing, e))?;
            // Names are compared by prefix with substr: no LIKE wildcards to escape.
            let checkpoints = {
                let mut stmt = tx
                    .prepare(
                        "SELECT stream, position FROM eps_checkpoints
                         WHERE stream = ?1 OR substr(stream, 1, length(?1) + 1) = ?1 || '/' ORDER BY stream",
                    )
                    .map_err(|e| sql_error(doing, e))?;
                let rows = stmt
                    .query_map([&scope], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))
                    .map_err(|e| sql_error(doing, e))?;
                rows.collect::<Result<Vec<_>, _>>().map_err(|e| sql_error(doing, e))?
            };
            if current != expected {
                return Ok((false, checkpoints));
            }
            tx.execute(
                "INSERT INTO eps_log_identity (scope, identity, bound_at)
                 VALUES (?1, ?2, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
                 ON CONFLICT (scope) DO UPDATE SET identity = excluded.identity, bound_at = excluded.bound_at",
                (&scope, &identity),
            )
            .map_err(|e| sql_error(doing, e))?;
            if let Some(position) = reset_to {
                tx.execute(
                    "UPDATE eps_checkpoints SET position = ?2, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
                     WHERE stream = ?1 OR substr(stream, 1, length(?1) + 1) = ?1 || '/'",
                    (&scope, position),
                )
                .map_err(|e| sql_error(doing, e))?;
            }
            tx.commit().map_err(|e| sql_error(doing, e))?;
            Ok((true, checkpoints))
        })
        .await
    }

    async fn record_lost(&self, lost: &LostRange) -> Result<bool, StoreError> {
        let lost = lost.clone();
        let (first, last) = (to_i64(lost.first, "position")?, to_i64(lost.last, "position")?);
        self.with_conn(move |conn| {
            let n = conn
                .execute(
                    "INSERT OR IGNORE INTO eps_lost_messages (scope, part, first_position, last_position, identity, detected_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
                    (&lost.scope, i64::from(lost.partition), first, last, &lost.identity),
                )
                .map_err(|e| sql_error("recording lost messages", e))?;
            Ok(n > 0)
        })
        .await
    }

    async fn lost_ranges(&self, scope: &str) -> Result<Vec<LostRange>, StoreError> {
        let scope = scope.to_owned();
        self.with_conn(move |conn| {
            let doing = "listing lost messages";
            let mut stmt = conn
                .prepare(
                    "SELECT part, first_position, last_position, identity FROM eps_lost_messages
                     WHERE scope = ?1 ORDER BY part, first_position",
                )
                .map_err(|e| sql_error(doing, e))?;
            let rows = stmt
                .query_map([&scope], |r| {
                    Ok(LostRange {
                        scope: scope.clone(),
                        partition: r.get::<_, i64>(0)? as u32,
                        first: r.get::<_, i64>(1)? as u64,
                        last: r.get::<_, i64>(2)? as u64,
                        identity: r.get(3)?,
                    })
                })
                .map_err(|e| sql_error(doing, e))?;
            rows.collect::<Result<Vec<_>, _>>().map_err(|e| sql_error(doing, e))
        })
        .await
    }

    async fn invalid_lines_after(
        &self,
        stream: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<InvalidLine>, StoreError> {
        let stream = stream.to_owned();
        let after = match after {
            Some(p) => to_i64(p, "invalid line position")?,
            None => -1,
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with_conn(move |conn| {
            let doing = "listing invalid lines";
            let mut stmt = conn
                .prepare_cached(
                    "SELECT position, segment, segment_offset, error, line FROM eps_invalid_lines
                     WHERE stream = ?1 AND position > ?2 ORDER BY position LIMIT ?3",
                )
                .map_err(|e| sql_error(doing, e))?;
            let rows = stmt
                .query_map(rusqlite::params![stream, after, limit], |r| {
                    Ok(InvalidLine {
                        position: r.get::<_, i64>(0)? as u64,
                        segment: r.get(1)?,
                        segment_offset: r.get::<_, i64>(2)? as u64,
                        error: r.get(3)?,
                        line: r.get(4)?,
                    })
                })
                .map_err(|e| sql_error(doing, e))?;
            rows.collect::<Result<Vec<_>, _>>().map_err(|e| sql_error(doing, e))
        })
        .await
    }
}

/// `(user_id, revenue)` rows of a query taking the row limit as `?1`, revenues parsed exactly.
fn user_rows(conn: &Connection, sql: &str, limit: i64, doing: &str) -> Result<Vec<(String, Total)>, StoreError> {
    let mut stmt = conn.prepare(sql).map_err(|e| sql_error(doing, e))?;
    let rows = stmt
        .query_map([limit], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .map_err(|e| sql_error(doing, e))?;
    let mut users = Vec::new();
    for row in rows {
        let (user_id, text) = row.map_err(|e| sql_error(doing, e))?;
        let revenue = parse_revenue(&user_id, &text)?;
        users.push((user_id, revenue));
    }
    Ok(users)
}

/// The behaviours every backend must show, written once and run against real databases by each
/// backend's tests through [`store_behaviour_tests!`].
#[cfg(test)]
pub(crate) mod behaviours {
    use std::str::FromStr;
    use std::sync::Arc;

    use crate::money::Total;
    use crate::store::{Batch, CommitOutcome, InvalidLine, Store, StreamProgress};

    pub fn dec(s: &str) -> Total {
        Total::from_str(s).unwrap()
    }

    fn batch(from: u64, to: u64, deltas: &[(&str, &str)]) -> Batch {
        Batch {
            from,
            to,
            deltas: deltas.iter().map(|(u, d)| (u.to_string(), dec(d))).collect(),
            events: deltas.len() as u64,
            invalid: Vec::new(),
        }
    }

    pub async fn commit_applies_deltas_and_moves_checkpoint(s: Arc<dyn Store>) {
        assert_eq!(s.progress("main").await.unwrap(), StreamProgress::default());
        let b = batch(0, 100, &[("alice", "100.00"), ("bob", "2.5")]);
        assert_eq!(s.commit("main", &b).await.unwrap(), CommitOutcome::Committed);
        let b = batch(100, 150, &[("alice", "-30")]);
        assert_eq!(s.commit("main", &b).await.unwrap(), CommitOutcome::Committed);
        assert_eq!(s.revenue("alice").await.unwrap(), Some(dec("70")));
        assert_eq!(s.revenue("bob").await.unwrap(), Some(dec("2.5")));
        assert_eq!(
            s.progress("main").await.unwrap(),
            StreamProgress { position: 150, events_applied: 3, invalid_lines: 0 }
        );
        // Streams are independent.
        assert_eq!(s.progress("other").await.unwrap(), StreamProgress::default());
        assert_eq!(s.users(10).await.unwrap(), vec![("alice".into(), dec("70")), ("bob".into(), dec("2.5"))]);
        assert_eq!(s.users(1).await.unwrap().len(), 1);
        s.ping().await.unwrap();
    }

    pub async fn top_users_are_ordered_exactly_and_applied_events_summed(s: Arc<dyn Store>) {
        assert_eq!(s.top_users(3).await.unwrap(), vec![]);
        assert_eq!(s.events_applied().await.unwrap(), 0);
        // Two revenues a float cannot tell apart, a negative one, a tie broken by user id.
        let big = "1000000000000000000.000000002";
        let bigger = "1000000000000000000.000000003";
        let b = batch(0, 10, &[("a", big), ("b", bigger), ("c", "-5"), ("d", "7"), ("e", "7")]);
        assert_eq!(s.commit("one", &b).await.unwrap(), CommitOutcome::Committed);
        assert_eq!(s.commit("two", &batch(0, 5, &[("f", "1")])).await.unwrap(), CommitOutcome::Committed);
        let top = s.top_users(4).await.unwrap();
        let names: Vec<&str> = top.iter().map(|(u, _)| u.as_str()).collect();
        assert_eq!(names, ["b", "a", "d", "e"]);
        assert_eq!(top[0].1, dec(bigger));
        assert_eq!(s.top_users(100).await.unwrap().len(), 6);
        assert_eq!(s.events_applied().await.unwrap(), 6, "summed over every stream");
    }

    pub async fn stale_commit_conflicts_and_changes_nothing(s: Arc<dyn Store>) {
        let b = batch(0, 10, &[("alice", "5")]);
        assert_eq!(s.commit("main", &b).await.unwrap(), CommitOutcome::Committed);
        let stale = batch(0, 20, &[("alice", "7"), ("carol", "1")]);
        assert_eq!(s.commit("main", &stale).await.unwrap(), CommitOutcome::Conflict { current: 10 });
        assert_eq!(s.revenue("alice").await.unwrap(), Some(dec("5")));
        assert_eq!(s.revenue("carol").await.unwrap(), None);
        assert_eq!(s.progress("main").await.unwrap().position, 10);
        // A checkpoint that was never written is 0: committing from elsewhere conflicts too.
        let ahead = batch(10, 20, &[("carol", "1")]);
        assert_eq!(s.commit("fresh", &ahead).await.unwrap(), CommitOutcome::Conflict { current: 0 });
        assert_eq!(s.revenue("carol").await.unwrap(), None);
    }

    pub async fn tenths_sum_exactly(s: Arc<dyn Store>) {
        for i in 0..10 {
            let b = batch(i, i + 1, &[("tenths", "0.1")]);
            assert_eq!(s.commit("main", &b).await.unwrap(), CommitOutcome::Committed);
        }
        let total = s.revenue("tenths").await.unwrap().unwrap();
        assert_eq!(total, dec("1"));
        assert_eq!(total.to_string(), "1", "revenue is returned normalised");
    }

    pub async fn subtraction_can_go_negative(s: Arc<dyn Store>) {
        let b = batch(0, 1, &[("dave", "10")]);
        assert_eq!(s.commit("main", &b).await.unwrap(), CommitOutcome::Committed);
        let b = batch(1, 2, &[("dave", "-25.75")]);
        assert_eq!(s.commit("main", &b).await.unwrap(), CommitOutcome::Committed);
        assert_eq!(s.revenue("dave").await.unwrap(), Some(dec("-15.75")));
        // A user's first event may be a subtraction: they start at 0.
        let b = batch(2, 3, &[("erin", "-1")]);
        assert_eq!(s.commit("main", &b).await.unwrap(), CommitOutcome::Committed);
        assert_eq!(s.revenue("erin").await.unwrap(), Some(dec("-1")));
    }

    pub async fn unknown_user_has_no_revenue(s: Arc<dyn Store>) {
        assert_eq!(s.revenue("nobody").await.unwrap(), None);
        assert_eq!(s.users(10).await.unwrap(), vec![]);
    }

    pub async fn invalid_lines_are_stored_once(s: Arc<dyn Store>) {
        let line = |position: u64| InvalidLine {
            position,
            segment: "00000000000000000000.jsonl".into(),
            segment_offset: position,
            error: "body is not valid JSON: EOF".into(),
            line: "{\"userId\": \u{0}".into(),
        };
        let mut b = batch(0, 40, &[("frank", "1")]);
        b.invalid = vec![line(0), line(20)];
        assert_eq!(s.commit("main", &b).await.unwrap(), CommitOutcome::Committed);
        assert_eq!(s.commit("main", &b).await.unwrap(), CommitOutcome::Conflict { current: 40 });
        // A later batch repeating a recorded line (a replay after a crash) does not count it again.
        let mut b2 = batch(40, 60, &[]);
        b2.invalid = vec![line(20), line(40)];
        assert_eq!(s.commit("main", &b2).await.unwrap(), CommitOutcome::Committed);
        assert_eq!(
            s.progress("main").await.unwrap(),
            StreamProgress { position: 60, events_applied: 1, invalid_lines: 3 }
        );
        assert_eq!(s.revenue("frank").await.unwrap(), Some(dec("1")));
        // Listed in position order, after a position, paged, per stream (the dead-letter file's source).
        let pg_line = |position: u64| InvalidLine { line: "{\"userId\": \u{fffd}".into(), ..line(position) };
        let stored = s.invalid_lines_after("main", None, 10).await.unwrap();
        let want = |l: InvalidLine| if s.backend() == "postgres" { pg_line(l.position) } else { l };
        assert_eq!(stored, vec![want(line(0)), want(line(20)), want(line(40))]);
        let positions = |v: Vec<InvalidLine>| v.into_iter().map(|l| l.position).collect::<Vec<_>>();
        assert_eq!(positions(s.invalid_lines_after("main", Some(0), 1).await.unwrap()), vec![20]);
        assert_eq!(positions(s.invalid_lines_after("main", Some(20), 10).await.unwrap()), vec![40]);
        assert_eq!(positions(s.invalid_lines_after("main", Some(40), 10).await.unwrap()), Vec::<u64>::new());
        assert_eq!(positions(s.invalid_lines_after("other", None, 10).await.unwrap()), Vec::<u64>::new());
    }

    /// Issue 14, item 3: totals no `Decimal` holds are committed, read back and summed exactly (they
    /// used to fail the commit, which stopped processing for every user). Expected values are text.
    pub async fn totals_beyond_a_decimal_are_exact(s: Arc<dyn Store>) {
        let nines = "9999999999999999999999999999";
        let b = batch(0, 1, &[("rich", "79228162514264337593543950335"), ("precise", "100000000000"), ("grace", "5")]);
        assert_eq!(s.commit("main", &b).await.unwrap(), CommitOutcome::Committed);
        let b = batch(1, 2, &[("rich", "1000"), ("precise", "0.0000000000000000000000000001"), ("grace", "1")]);
        assert_eq!(s.commit("main", &b).await.unwrap(), CommitOutcome::Committed);
        let text = |t: Option<Total>| t.map(|t| t.to_string());
        assert_eq!(text(s.revenue("rich").await.unwrap()).as_deref(), Some("79228162514264337593543951335"));
        assert_eq!(
            text(s.revenue("precise").await.unwrap()).as_deref(),
            Some("100000000000.0000000000000000000000000001")
        );
        // A delta of any size, and back across zero.
        let huge = format!("{nines}{nines}.{nines}");
        let b = batch(2, 3, &[("huge", &huge)]);
        assert_eq!(s.commit("main", &b).await.unwrap(), CommitOutcome::Committed);
        let b = batch(3, 4, &[("huge", &format!("-{nines}{nines}.{nines}1"))]);
        assert_eq!(s.commit("main", &b).await.unwrap(), CommitOutcome::Committed);
        assert_eq!(text(s.revenue("huge").await.unwrap()).as_deref(), Some("-0.00000000000000000000000000001"));
        let totals = s.totals().await.unwrap();
        assert_eq!(totals.users, 4);
        // 79228162514264337593543951335 + 100000000000.0000000000000000000000000001 + 6 - 1e-29
        assert_eq!(totals.revenue.to_string(), "79228162514264337693543951341.00000000000000000000000000009");
        let top = s.top_users(2).await.unwrap();
        assert_eq!(
            top,
            vec![
                ("rich".to_string(), dec("79228162514264337593543951335")),
                ("precise".to_string(), dec("100000000000.0000000000000000000000000001"))
            ]
        );
        assert_eq!(s.users(10).await.unwrap().len(), 4);
        assert_eq!(
            s.progress("main").await.unwrap(),
            StreamProgress { position: 4, events_applied: 8, invalid_lines: 0 }
        );
    }

    /// Issue 14, item 8: 500 revenues at 10^20 + k are one and the same double; the top 20 must still
    /// be the 20 highest, in order. Users are named in an order unrelated to their revenue.
    pub async fn top_users_are_exact_where_doubles_tie(s: Arc<dyn Store>) {
        let users: Vec<(String, String)> =
            (0..500u32).map(|k| (format!("user-{:03}", (k * 317) % 500), format!("1{k:020}"))).collect();
        let deltas: Vec<(&str, &str)> = users.iter().map(|(u, r)| (u.as_str(), r.as_str())).collect();
        for (i, part) in deltas.chunks(100).enumerate() {
            let b = batch(i as u64, i as u64 + 1, part);
            assert_eq!(s.commit("main", &b).await.unwrap(), CommitOutcome::Committed);
        }
        let want: Vec<(String, String)> = users.iter().rev().take(20).cloned().collect();
        assert_eq!(want[0].1, "100000000000000000499");
        let got: Vec<(String, String)> =
            s.top_users(20).await.unwrap().into_iter().map(|(u, r)| (u, r.to_string())).collect();
        assert_eq!(got, want);
        // A tie at the top is broken by user id.
        let b = batch(5, 6, &[("a-tie", "499")]);
        assert_eq!(s.commit("main", &b).await.unwrap(), CommitOutcome::Committed);
        let b = batch(6, 7, &[("a-tie", "100000000000000000000")]);
        assert_eq!(s.commit("main", &b).await.unwrap(), CommitOutcome::Committed);
        let top2: Vec<String> = s.top_users(2).await.unwrap().into_iter().map(|(u, _)| u).collect();
        assert_eq!(top2, vec!["a-tie".to_string(), want[0].0.clone()]);
    }

    pub async fn concurrent_processors_apply_each_batch_once(s: Arc<dyn Store>) {
        const END: u64 = 200;
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let s = Arc::clone(&s);
                tokio::spawn(async move {
                    let mut conflicts = 0u64;
                    loop {
                        let from = s.progress("main").await.unwrap().position;
                        if from >= END {
                            return conflicts;
                        }
                        match s.commit("main", &batch(from, from + 1, &[("u", "1")])).await.unwrap() {
                            CommitOutcome::Committed => {}
                            CommitOutcome::Conflict { current } => {
                                assert!(current > from, "the checkpoint only moves forward");
                                conflicts += 1;
                            }
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(s.revenue("u").await.unwrap(), Some(dec("200")));
        assert_eq!(
            s.progress("main").await.unwrap(),
            StreamProgress { position: END, events_applied: END, invalid_lines: 0 }
        );
    }

    pub async fn log_identity_is_bound_once_and_rebound_with_its_checkpoints(s: Arc<dyn Store>) {
        let scope = "jetstream/S";
        assert_eq!(s.log_identity(scope).await.unwrap(), None);
        for (name, to) in [("jetstream/S/0", 7), ("jetstream/S/1", 9), ("jetstream/S2/0", 5), ("file", 3)] {
            s.commit(name, &batch(0, to, &[("u", "1")])).await.unwrap();
        }
        let (bound, _) = s.bind_log_identity(scope, None, "A", None).await.unwrap();
        assert!(bound);
        // A second first-binder loses and writes nothing.
        let (bound, _) = s.bind_log_identity(scope, None, "B", None).await.unwrap();
        assert!(!bound);
        assert_eq!(s.log_identity(scope).await.unwrap().as_deref(), Some("A"));
        // Re-binding moves exactly the scope's checkpoints, keeping their counts.
        let (bound, old) = s.bind_log_identity(scope, Some("A"), "B", Some(0)).await.unwrap();
        assert!(bound);
        assert_eq!(old, vec![("jetstream/S/0".to_string(), 7), ("jetstream/S/1".to_string(), 9)]);
        assert_eq!(
            s.progress("jetstream/S/1").await.unwrap(),
            StreamProgress { position: 0, events_applied: 1, invalid_lines: 0 }
        );
        assert_eq!(s.progress("jetstream/S2/0").await.unwrap().position, 5);
        assert_eq!(s.progress("file").await.unwrap().position, 3);
        assert_eq!(s.log_identity(scope).await.unwrap().as_deref(), Some("B"));
        // Lost ranges are recorded once.
        let lost =
            crate::store::LostRange { scope: scope.into(), partition: 1, first: 10, last: 19, identity: "B".into() };
        assert!(s.record_lost(&lost).await.unwrap());
        assert!(!s.record_lost(&lost).await.unwrap());
        assert_eq!(s.lost_ranges(scope).await.unwrap(), vec![lost]);
        assert_eq!(s.lost_ranges("file").await.unwrap(), vec![]);
    }

    /// A commit of many users (the large-commit path of each backend: SQLite's page cache, PostgreSQL's
    /// COPY), given in no particular order, half of them already stored: every total exact, the top
    /// users ordered, the checkpoint and counts moved once.
    pub async fn a_commit_of_many_users_is_exact(s: Arc<dyn Store>) {
        let n = 20_000u64;
        let first: Vec<(String, Total)> = (0..n / 2).map(|i| (format!("u{i:05}"), dec("1.5"))).collect();
        let b1 = Batch { from: 0, to: 10, deltas: first, events: n / 2, invalid: vec![] };
        assert_eq!(s.commit("main", &b1).await.unwrap(), CommitOutcome::Committed);
        // Descending ids, odd ones negative and beyond a Decimal's 28 digits for one of them.
        let mut second: Vec<(String, Total)> =
            (0..n).rev().map(|i| (format!("u{i:05}"), if i % 2 == 1 { dec("-0.25") } else { dec("0.1") })).collect();
        second[0].1 = dec("123456789012345678901234567890.5");
        let b2 = Batch { from: 10, to: 20, deltas: second, events: n, invalid: vec![] };
        assert_eq!(s.commit("main", &b2).await.unwrap(), CommitOutcome::Committed);
        let last = format!("u{:05}", n - 1);
        assert_eq!(s.revenue(&last).await.unwrap(), Some(dec("123456789012345678901234567890.5")));
        assert_eq!(s.revenue("u00000").await.unwrap(), Some(dec("1.6")));
        assert_eq!(s.revenue("u00001").await.unwrap(), Some(dec("1.25")));
        assert_eq!(s.revenue("u10000").await.unwrap(), Some(dec("0.1")));
        assert_eq!(s.revenue("u10001").await.unwrap(), Some(dec("-0.25")));
        let totals = s.totals().await.unwrap();
        assert_eq!(totals.users, n);
        // 10,000 x 1.5 + 10,000 x 0.1 (even) - 9,999 x 0.25 (odd, the last one replaced by the large one).
        let want = dec("15000") + dec("1000") + dec("-2499.75") + dec("123456789012345678901234567890.5");
        assert_eq!(totals.revenue, want);
        assert_eq!(s.top_users(1).await.unwrap(), vec![(last, dec("123456789012345678901234567890.5"))]);
        let p = s.progress("main").await.unwrap();
        assert_eq!((p.position, p.events_applied), (20, n + n / 2));
    }
}

/// Expands to one `#[tokio::test]` per behaviour in [`behaviours`], each running it through
/// `$with_store`: an async fn that builds a fresh store, runs the behaviour on it and cleans up.
#[cfg(test)]
macro_rules! store_behaviour_tests {
    ($with_store:path) => {
        $crate::store::sqlite::store_behaviour_tests!(@each $with_store;
            commit_applies_deltas_and_moves_checkpoint,
            log_identity_is_bound_once_and_rebound_with_its_checkpoints,
            stale_commit_conflicts_and_changes_nothing,
            tenths_sum_exactly,
            subtraction_can_go_negative,
            unknown_user_has_no_revenue,
            invalid_lines_are_stored_once,
            totals_beyond_a_decimal_are_exact,
            top_users_are_exact_where_doubles_tie,
            concurrent_processors_apply_each_batch_once,
            top_users_are_ordered_exactly_and_applied_events_summed,
            a_commit_of_many_users_is_exact,
        );
    };
    (@each $with_store:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                $with_store($crate::store::sqlite::behaviours::$name).await;
            }
        )*
    };
}
#[cfg(test)]
pub(crate) use store_behaviour_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::behaviours::dec;

    async fn with_store<F, Fut>(behaviour: F)
    where
        F: FnOnce(Arc<dyn Store>) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("eps.sqlite3")).await.unwrap();
        behaviour(Arc::new(store)).await;
    }

    store_behaviour_tests!(with_store);

    /// A large commit's page cache is for that commit only: the pooled connection gets SQLite's default
    /// back (else every idle connection could keep 128 MiB).
    #[tokio::test]
    async fn a_large_commit_gives_its_page_cache_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("eps.sqlite3")).await.unwrap();
        let deltas = (0..LARGE_COMMIT_USERS).map(|i| (format!("u{i}"), dec("1"))).collect();
        let b = Batch { from: 0, to: 1, deltas, events: LARGE_COMMIT_USERS as u64, invalid: vec![] };
        let seen = store
            .with_conn(move |conn| {
                let outcome = commit_batch(conn, "main", &b)?;
                let cache: i64 = conn.pragma_query_value(None, "cache_size", |r| r.get(0)).unwrap();
                Ok((outcome, cache))
            })
            .await
            .unwrap();
        assert_eq!(seen, (CommitOutcome::Committed, DEFAULT_CACHE_SIZE));
        assert_eq!(store.totals().await.unwrap().users, LARGE_COMMIT_USERS as u64);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reads_share_the_pooled_connections_instead_of_opening_more() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("eps.sqlite3")).await.unwrap());
        let b = Batch { from: 0, to: 5, deltas: vec![("a".into(), dec("1.5"))], events: 1, invalid: vec![] };
        assert_eq!(store.commit("main", &b).await.unwrap(), CommitOutcome::Committed);
        let reads: Vec<_> = (0..64)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.revenue("a").await })
            })
            .collect();
        for read in reads {
            assert_eq!(read.await.unwrap().unwrap().unwrap().to_string(), "1.5");
        }
        let opened = store.inner.opened.load(std::sync::atomic::Ordering::Relaxed);
        assert!(opened <= store.inner.max_connections, "{opened} connections opened for 64 concurrent reads");
    }

    #[tokio::test]
    async fn revenue_is_stored_as_normalised_text_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("eps.sqlite3");
        let store = SqliteStore::open(&path).await.unwrap();
        let b = Batch {
            from: 0,
            to: 5,
            deltas: vec![("a".into(), dec("100.00")), ("b".into(), dec("0.10"))],
            events: 2,
            invalid: vec![],
        };
        assert_eq!(store.commit("main", &b).await.unwrap(), CommitOutcome::Committed);
        drop(store);

        // Migrations are idempotent: a second open (and a concurrent one) finds the schema ready.
        let (s1, s2) = tokio::join!(SqliteStore::open(&path), SqliteStore::open(&path));
        let (s1, _s2) = (s1.unwrap(), s2.unwrap());
        assert_eq!(s1.revenue("a").await.unwrap(), Some(dec("100")));
        assert_eq!(s1.progress("main").await.unwrap().position, 5);

        let conn = Connection::open(&path).unwrap();
        let raw: Vec<(String, String, String)> = conn
            .prepare("SELECT user_id, revenue, typeof(revenue) FROM users_revenue ORDER BY user_id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(raw, vec![("a".into(), "100".into(), "text".into()), ("b".into(), "0.1".into(), "text".into())]);
        let versions: i64 = conn.query_row("SELECT COUNT(*) FROM eps_schema_migrations", [], |r| r.get(0)).unwrap();
        assert_eq!(versions, MIGRATIONS.len() as i64);
    }

    /// A file an older eps wrote (schema version 1, no `revenue_key`) gets every row's key once, so its
    /// top users are exact at once.
    #[tokio::test]
    async fn older_files_get_their_order_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("eps.sqlite3");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0].1).unwrap();
            conn.execute_batch(
                "CREATE TABLE eps_schema_migrations (version INTEGER PRIMARY KEY);
                 INSERT INTO eps_schema_migrations VALUES (1);
                 INSERT INTO users_revenue VALUES ('low', '100000000000000000001'), ('high', '100000000000000000002'),
                                                  ('neg', '-5'), ('mid', '100000000000000000001.5');",
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path).await.unwrap();
        let top: Vec<String> = store.top_users(10).await.unwrap().into_iter().map(|(u, _)| u).collect();
        assert_eq!(top, ["high", "mid", "low", "neg"]);
    }

    #[test]
    fn affinity_follows_sqlites_rules_in_their_order() {
        use Affinity::*;
        for (declared, want) in [
            ("TEXT", Text),
            ("VARCHAR(64)", Text),
            ("CLOB", Text),
            ("", Blob),
            ("BLOB", Blob),
            ("INTEGER", Integer),
            ("BIGINT", Integer),
            ("POINT", Integer),   // contains INT
            ("CHARINT", Integer), // INT wins over CHAR
            ("REAL", Real),
            ("DOUBLE PRECISION", Real),
            ("FLOAT", Real),
            ("NUMERIC", Numeric),
            ("DECIMAL(12,2)", Numeric),
            ("STRING", Numeric), // the classic trap: not TEXT
            ("MONEY", Numeric),
        ] {
            assert_eq!(affinity(declared), want, "{declared:?}");
        }
    }

    #[test]
    fn check_constraints_are_found_outside_quotes_only() {
        assert!(has_check_constraint("CREATE TABLE t (a TEXT CHECK (length(a) < 64))"));
        assert!(has_check_constraint("create table t (a text, constraint c check(a <> ''))"));
        assert!(!has_check_constraint("CREATE TABLE users_revenue (user_id TEXT PRIMARY KEY, revenue TEXT NOT NULL)"));
        assert!(!has_check_constraint("CREATE TABLE t (a TEXT DEFAULT 'check (x)', \"check\" TEXT, recheck TEXT)"));
        assert!(!has_check_constraint("CREATE TABLE t ([check(] TEXT, `check (` TEXT, check_col TEXT)"));
    }

    /// The columns of a fresh table `users_revenue (COLUMNS)`, as start-up inspects them.
    fn inspected(columns: &str) -> SqliteTable {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(&format!("CREATE TABLE users_revenue ({columns})")).unwrap();
        inspect_users_revenue(&conn).unwrap().expect("the table exists")
    }

    #[test]
    fn only_tables_that_keep_the_text_eps_stores_are_adopted() {
        let problems = |columns: &str| {
            let (problems, fix) = adoption_problems(&inspected(columns));
            assert_eq!(problems.is_empty(), fix.is_empty());
            problems.into_iter().map(|p| format!("{}: {}", p.column.unwrap_or_default(), p.found)).collect::<Vec<_>>()
        };
        let none = Vec::<String>::new();
        // eps's own version-1 table, the seed's, and a BLOB-affinity (untyped) one keep text as given.
        assert_eq!(problems("user_id TEXT PRIMARY KEY, revenue TEXT NOT NULL"), none);
        assert_eq!(problems("user_id VARCHAR(255) PRIMARY KEY, revenue TEXT NOT NULL"), none);
        assert_eq!(problems("user_id PRIMARY KEY, revenue NOT NULL, note TEXT NOT NULL DEFAULT ''"), none);
        assert_eq!(problems("user_id TEXT NOT NULL, revenue TEXT NOT NULL, UNIQUE (user_id)"), none);
        let revenue = |declared: &str| problems(&format!("user_id TEXT PRIMARY KEY, revenue {declared} NOT NULL"));
        assert_eq!(revenue("INTEGER"), ["revenue: INTEGER (Integer affinity)"]);
        assert_eq!(revenue("REAL"), ["revenue: REAL (Real affinity)"]);
        assert_eq!(revenue("DECIMAL"), ["revenue: DECIMAL (Numeric affinity)"]);
        assert_eq!(
            problems("user_id INT PRIMARY KEY, revenue TEXT"),
            ["revenue: TEXT (Text affinity) without NOT NULL", "user_id: INT (Integer affinity)"]
        );
        let no_index = ": no unique index on user_id alone with the BINARY collation";
        assert_eq!(problems("user_id TEXT, revenue TEXT NOT NULL"), [no_index]);
        assert_eq!(problems("user_id TEXT COLLATE NOCASE PRIMARY KEY, revenue TEXT NOT NULL"), [no_index]);
        assert_eq!(problems("user_id TEXT, revenue TEXT NOT NULL, PRIMARY KEY (user_id, revenue)"), [no_index]);
        assert_eq!(
            problems("user_id TEXT PRIMARY KEY, revenue TEXT NOT NULL CHECK (revenue NOT LIKE '-%')"),
            [": a CHECK constraint"]
        );
        assert_eq!(
            problems("user_id TEXT PRIMARY KEY, revenue TEXT NOT NULL, \"Note\" TEXT NOT NULL"),
            ["\"Note\": TEXT (Text affinity) NOT NULL without a default"]
        );
    }

    /// A file an older eps migrated whose users_revenue was later rebuilt by hand with REAL totals: the
    /// refusal leaves it as it was, the printed statements (run as printed) rebuild it with its order
    /// keys and other columns, and eps then computes the keys, so the top users are exact.
    #[tokio::test]
    async fn a_refused_file_is_untouched_and_the_printed_rebuild_makes_it_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("eps.sqlite3");
        drop(SqliteStore::open(&path).await.unwrap());
        {
            let conn = Connection::open(&path).unwrap();
            let ours = inspect_users_revenue(&conn).unwrap().expect("eps created users_revenue");
            assert_eq!(adoption_problems(&ours), (vec![], vec![]), "eps's own table is exact");
            conn.execute_batch(
                "DROP TABLE users_revenue;
                 CREATE TABLE users_revenue (user_id TEXT PRIMARY KEY, revenue REAL NOT NULL, revenue_key TEXT,
                                             region TEXT DEFAULT 'eu');
                 INSERT INTO users_revenue (user_id, revenue, region) VALUES ('a', 10.5, 'us'), ('b', 2, NULL);",
            )
            .unwrap();
        }
        let err = SqliteStore::open(&path).await.err().expect("the REAL column was adopted");
        assert!(err.downcast_ref::<ConfigError>().is_some(), "not a configuration error: {err:#}");
        let message = format!("{err:#}");
        assert!(message.contains("column revenue is REAL (Real affinity)"), "{message}");
        let conn = Connection::open(&path).unwrap();
        let keys: i64 = conn.query_row("SELECT count(revenue_key) FROM users_revenue", [], |r| r.get(0)).unwrap();
        assert_eq!(keys, 0, "the refusal wrote to the table");
        let fix: Vec<&str> = message.lines().filter_map(|l| l.strip_prefix("    ")).collect();
        conn.execute_batch(&fix.join("\n")).unwrap();
        let store = SqliteStore::open(&path).await.unwrap();
        let b = Batch { from: 0, to: 1, deltas: vec![("b".into(), dec("0.1"))], events: 1, invalid: vec![] };
        assert_eq!(store.commit("main", &b).await.unwrap(), CommitOutcome::Committed);
        assert_eq!(store.top_users(5).await.unwrap(), vec![("a".into(), dec("10.5")), ("b".into(), dec("2.1"))]);
        let rows: Vec<(String, String, Option<String>)> = conn
            .prepare("SELECT user_id, typeof(revenue), region FROM users_revenue ORDER BY user_id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows, [("a".into(), "text".into(), Some("us".into())), ("b".into(), "text".into(), None)]);
        let index: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_master WHERE name = 'users_revenue_top'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(index, 1);
    }

    #[tokio::test]
    async fn a_held_write_lock_reports_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("eps.sqlite3");
        let store = SqliteStore::open(&path).await.unwrap();
        // Another process holds the write lock longer than the busy timeout.
        let blocker = Connection::open(&path).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let b = Batch { from: 0, to: 1, deltas: vec![("a".into(), dec("1"))], events: 1, invalid: vec![] };
        let started = std::time::Instant::now();
        match store.commit("main", &b).await {
            Err(StoreError::Unavailable(msg)) => assert!(msg.contains("busy"), "{msg}"),
            other => panic!("expected Unavailable, got {other:?}"),
        }
        assert!(started.elapsed() >= BUSY_TIMEOUT - Duration::from_millis(500));
        // Readers are not blocked by the writer (WAL).
        assert_eq!(store.revenue("a").await.unwrap(), None);
        blocker.execute_batch("ROLLBACK").unwrap();
        assert_eq!(store.commit("main", &b).await.unwrap(), CommitOutcome::Committed);
    }
}
