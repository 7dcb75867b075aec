//! The embedded SQLite backend (the default store: one file in the data directory).
//!
//! Owns: the schema of the SQLite file (versioned migrations in `eps_schema_migrations`), the small
//! connection pool, and the mapping of SQLite errors to [`StoreError`].
//!
//! Invariants:
//! - Revenue is stored as TEXT holding the normalised decimal string ("100.00" is stored as "100"),
//!   of any size. A NUMERIC column would hand 0.1 to SQLite's floating point; TEXT keeps it exact, and
//!   all arithmetic happens in `eps_dec_add`, a scalar function that adds with `rust_decimal` when the
//!   exact sum fits a `Decimal` and with an arbitrary-precision [`Total`] otherwise: it never fails
//!   on a valid total and never rounds.
//! - `revenue_key` is maintained with `revenue` in the same statement (`eps_dec_key`, see
//!   [`crate::money::order_key`]): text whose byte order is the revenue's numeric order, indexed, so
//!   the top users are read exactly from the index (`limit` rows), never through a REAL approximation.
//! - Every write is one `BEGIN IMMEDIATE` transaction: the write lock is taken before the checkpoint
//!   is read, so the compare-and-set of [`Store::commit`] cannot interleave with another writer,
//!   in this process or another one.
//! - `synchronous=FULL` in WAL mode: once `commit` returns `Committed`, the change survives a power cut.
//! - rusqlite is blocking: every call runs in `spawn_blocking`, never on the async executor.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use rusqlite::functions::FunctionFlags;
use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior};
use rust_decimal::Decimal;

use super::{Batch, CommitOutcome, InvalidLine, Store, StoreError, StreamProgress, Totals};
use crate::money::{ExactSum, Total};

/// How long a statement waits for another writer's lock before the store reports `Unavailable`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections kept open; more are opened on demand and closed when returned to a full pool.
const MAX_IDLE_CONNECTIONS: usize = 8;

/// Schema versions, applied in order, each exactly once (recorded in `eps_schema_migrations`).
const MIGRATIONS: &[(i64, &str)] = &[(
    1,
    "CREATE TABLE users_revenue (
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
), (
    2,
    // The exact order of revenues for the top users (version 1 ordered by CAST(revenue AS REAL), which
    // cannot tell 10^20 from 10^20 + 1). Existing rows get their key here, once.
    "ALTER TABLE users_revenue ADD COLUMN revenue_key TEXT;
     UPDATE users_revenue SET revenue_key = eps_dec_key(revenue);
     CREATE INDEX users_revenue_top ON users_revenue (revenue_key DESC, user_id);",
)];

pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and brings its schema up to date.
    pub async fn open(path: &Path) -> anyhow::Result<Self> {
        let inner = Arc::new(Inner { path: path.to_path_buf(), idle: Mutex::new(Vec::new()) });
        let store = SqliteStore { inner };
        store.with_conn(migrate).await.with_context(|| format!("cannot open the SQLite store {}", path.display()))?;
        Ok(store)
    }

    /// Runs `f` on a pooled connection in a blocking thread. A connection is returned to the pool
    /// only when it is outside any transaction (a failed `f` may have left one open).
    async fn with_conn<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let pooled = inner.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let mut conn = match pooled {
                Some(conn) => conn,
                None => open_connection(&inner.path)?,
            };
            let result = f(&mut conn);
            if conn.is_autocommit() {
                let mut idle = inner.idle.lock().unwrap_or_else(|p| p.into_inner());
                if idle.len() < MAX_IDLE_CONNECTIONS {
                    idle.push(conn);
                }
            }
            result
        })
        .await
        .map_err(|e| StoreError::Other(format!("SQLite worker thread failed: {e}")))?
    }
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(|e| sql_error(&format!("opening {}", path.display()), e))?;
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
        if let Some(sum) = crate::event::exact_add(x, y) {
            return Ok(sum.normalize().to_string());
        }
    }
    Ok((Total::from_str(a)? + Total::from_str(b)?).to_string())
}

fn function_error(e: crate::money::ParseTotalError) -> rusqlite::Error {
    rusqlite::Error::UserFunctionError(format!("stored revenue: {e}").into())
}

/// Applies the pending migrations. `BEGIN IMMEDIATE` holds the write lock from the version check to
/// the last migration, so two processes opening a new file at once cannot both apply version 1.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| sql_error("starting the migration", e))?;
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
    tx.commit().map_err(|e| sql_error("committing the migrations", e))
}

fn commit_batch(conn: &mut Connection, stream: &str, batch: &Batch) -> Result<CommitOutcome, StoreError> {
    let to = to_i64(batch.to, "batch end position")?;
    let events = to_i64(batch.events, "event count")?;
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
        for (user_id, delta) in &batch.deltas {
            upsert
                .execute((user_id, delta.to_string(), delta.order_key()))
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
                .query_row("SELECT revenue FROM users_revenue WHERE user_id = ?1", [&user_id], |r| r.get(0))
                .optional()
                .map_err(|e| sql_error("reading a revenue", e))?;
            text.map(|t| parse_revenue(&user_id, &t)).transpose()
        })
        .await
    }

    async fn users(&self, limit: usize) -> Result<Vec<(String, Total)>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with_conn(move |conn| {
            user_rows(conn, "SELECT user_id, revenue FROM users_revenue ORDER BY user_id LIMIT ?1", limit, "listing users")
        })
        .await
    }

    async fn totals(&self) -> Result<Totals, StoreError> {
        self.with_conn(|conn| {
            let mut stmt =
                conn.prepare("SELECT user_id, revenue FROM users_revenue").map_err(|e| sql_error("summing revenues", e))?;
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
        assert_eq!(top, vec![("rich".to_string(), dec("79228162514264337593543951335")), ("precise".to_string(), dec("100000000000.0000000000000000000000000001"))]);
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
}

/// Expands to one `#[tokio::test]` per behaviour in [`behaviours`], each running it through
/// `$with_store`: an async fn that builds a fresh store, runs the behaviour on it and cleans up.
#[cfg(test)]
macro_rules! store_behaviour_tests {
    ($with_store:path) => {
        $crate::store::sqlite::store_behaviour_tests!(@each $with_store;
            commit_applies_deltas_and_moves_checkpoint,
            stale_commit_conflicts_and_changes_nothing,
            tenths_sum_exactly,
            subtraction_can_go_negative,
            unknown_user_has_no_revenue,
            invalid_lines_are_stored_once,
            totals_beyond_a_decimal_are_exact,
            top_users_are_exact_where_doubles_tie,
            concurrent_processors_apply_each_batch_once,
            top_users_are_ordered_exactly_and_applied_events_summed,
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
