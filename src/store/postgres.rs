//! The PostgreSQL backend (chosen by a `postgres://` URL).
//!
//! Owns: the eps schema in the target database (versioned migrations in `eps_schema_migrations`,
//! compatible with the seed's `users_revenue` table when it already exists), the connection pool,
//! and the mapping of PostgreSQL errors to [`StoreError`].
//!
//! Invariants:
//! - `revenue` is the seed's unconstrained NUMERIC, so sums are exact in the database and of any size
//!   (NUMERIC holds 131,072 integer digits). Totals cross the wire as exact decimal text both ways
//!   (`$2::text[]` cast to NUMERIC in, `revenue::text` out) into a [`Total`]: no binding to a
//!   fixed-size decimal narrows them. (Versions 1 and 2 of the schema bounded totals to what a
//!   `Decimal` holds with the `eps_revenue_exact_range` CHECK; version 3 drops it.)
//! - `commit` is one transaction whose first act is to lock the stream's checkpoint row
//!   (`SELECT ... FOR UPDATE`): concurrent processors, in any number of processes, are serialised
//!   there, and the compare-and-set is decided under the lock.
//! - Deltas are applied in `user_id` order in one statement, so two transactions touching the same
//!   users lock their rows in the same order (no deadlock even across streams).
//! - Every wait is bounded (connect, pool wait/create/recycle): with the database down a call fails
//!   with `Unavailable` within seconds instead of hanging.

use std::borrow::Cow;
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use super::{Batch, CommitOutcome, InvalidLine, Store, StoreError, StreamProgress, Totals};
use crate::money::Total;

const POOL_SIZE: usize = 8;
/// Bound on every wait for a connection: pool slot, new connection, recycle check.
const POOL_TIMEOUT: Duration = Duration::from_secs(5);
/// See `connect`: bounds how long a dead peer can keep a query waiting.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);
/// Key of the transaction-scoped advisory lock that serialises migrations across processes
/// (arbitrary, fixed: the bytes of "epsmigr").
const MIGRATION_LOCK_KEY: i64 = 0x0065_7073_6d69_6772;

/// Schema versions, applied in order, each exactly once. Statements are idempotent on their own
/// as well, because version 1 must adopt a `users_revenue` table created by the seed's SQL.
///
/// Versions 1 and 2 used to add the `eps_revenue_exact_range` CHECK (totals within a `Decimal`); a
/// valid pair of events could then stop processing for good. They no longer add it, and version 3
/// drops it from databases that have it.
const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    "CREATE TABLE IF NOT EXISTS users_revenue (user_id VARCHAR(255) PRIMARY KEY, revenue NUMERIC NOT NULL);
     CREATE TABLE IF NOT EXISTS eps_checkpoints (
         stream TEXT PRIMARY KEY,
         position BIGINT NOT NULL,
         events_applied BIGINT NOT NULL DEFAULT 0,
         invalid_lines BIGINT NOT NULL DEFAULT 0,
         updated_at TIMESTAMPTZ
     );
     CREATE TABLE IF NOT EXISTS eps_invalid_lines (
         stream TEXT,
         position BIGINT,
         segment TEXT,
         segment_offset BIGINT,
         error TEXT,
         line TEXT,
         PRIMARY KEY (stream, position)
     );",
), (
    2,
    // Narrowed version 1's CHECK to what a Decimal reads back exactly; totals are unbounded now.
    "ALTER TABLE users_revenue DROP CONSTRAINT IF EXISTS eps_revenue_exact_range;",
), (
    3,
    // Totals are exact decimals of any size: the narrowing CHECK of versions 1 and 2 goes.
    "ALTER TABLE users_revenue DROP CONSTRAINT IF EXISTS eps_revenue_exact_range;",
)];

pub struct PostgresStore {
    pool: Pool,
}

impl PostgresStore {
    /// Builds the pool and runs the migrations; fails if the database is unreachable now, so a
    /// misconfigured URL is reported at start-up rather than as 503s later.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let mut config: tokio_postgres::Config =
            url.parse().context("invalid PostgreSQL URL (expected postgres://user@host:port/dbname)")?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(POOL_TIMEOUT);
        }
        // A server that vanishes without closing the socket (host down, network cut) must not hang a
        // query forever: the kernel drops the connection once sent data stays unacknowledged this long.
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("eps");
        }
        // Fast recycling only checks that the socket is open; a connection that died since is
        // reported by the query that uses it (as Unavailable) and then discarded by the pool.
        let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(POOL_TIMEOUT))
            .create_timeout(Some(POOL_TIMEOUT))
            .recycle_timeout(Some(POOL_TIMEOUT))
            .runtime(Runtime::Tokio1)
            .build()
            .context("cannot build the PostgreSQL connection pool")?;
        let store = PostgresStore { pool };
        store.migrate().await.with_context(|| format!("cannot prepare the PostgreSQL store at {}", redact(url)))?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| pg_error("starting the migration", e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
            .await
            .map_err(|e| pg_error("taking the migration lock", e))?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS eps_schema_migrations (version INTEGER PRIMARY KEY)")
            .await
            .map_err(|e| pg_error("creating eps_schema_migrations", e))?;
        let current: i32 = tx
            .query_one("SELECT COALESCE(MAX(version), 0) FROM eps_schema_migrations", &[])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|e| pg_error("reading the schema version", e))?;
        for &(version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            tx.batch_execute(sql).await.map_err(|e| pg_error(&format!("applying migration {version}"), e))?;
            tx.execute("INSERT INTO eps_schema_migrations (version) VALUES ($1)", &[&version])
                .await
                .map_err(|e| pg_error(&format!("recording migration {version}"), e))?;
        }
        tx.commit().await.map_err(|e| pg_error("committing the migrations", e))
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(|e| match e {
            PoolError::NoRuntimeSpecified => StoreError::Other(format!("PostgreSQL pool misconfigured: {e}")),
            PoolError::Backend(e) => pg_error("connecting", e),
            // Timeouts, a closed pool, a failed post-create hook: the database is not reachable now.
            e => StoreError::Unavailable(format!("no PostgreSQL connection: {e}")),
        })
    }

    /// `(user_id, revenue::text)` rows of a query taking the row limit as `$1`.
    async fn user_rows(&self, sql: &str, limit: usize, doing: &str) -> Result<Vec<(String, Total)>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let client = self.client().await?;
        let rows = client.query(sql, &[&limit]).await.map_err(|e| pg_error(doing, e))?;
        let mut users = Vec::with_capacity(rows.len());
        for row in &rows {
            let user_id: String = row.try_get(0).map_err(|e| pg_error(doing, e))?;
            let text: String = row.try_get(1).map_err(|e| pg_error(doing, e))?;
            let revenue = parse_revenue(&user_id, &text)?;
            users.push((user_id, revenue));
        }
        Ok(users)
    }
}

/// Connection-class failures (the server is down, restarting, out of connections, or our socket
/// died) and transient concurrency aborts are `Unavailable`: the caller retries later.
fn pg_error(doing: &str, e: tokio_postgres::Error) -> StoreError {
    let transient = e.is_closed()
        || match e.code() {
            Some(code) => {
                let c = code.code();
                c.starts_with("08")
                    || c.starts_with("53")
                    || c.starts_with("57P")
                    || *code == SqlState::T_R_SERIALIZATION_FAILURE
                    || *code == SqlState::T_R_DEADLOCK_DETECTED
            }
            // Without a SQLSTATE the failure is on our side (a type conversion) unless it is an I/O
            // error or tokio-postgres's connect timeout ("timeout waiting for server").
            None => {
                std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>())
                    || e.to_string().contains("timeout")
            }
        };
    // tokio_postgres's Display says only "db error"; the server's message is in the DbError.
    let detail = match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    };
    if transient {
        StoreError::Unavailable(format!("PostgreSQL unavailable while {doing}: {detail}"))
    } else {
        StoreError::Other(format!("PostgreSQL error while {doing}: {detail}"))
    }
}

/// PostgreSQL TEXT cannot hold NUL; an invalid log line may contain one. It is replaced by U+FFFD,
/// the same mark the lossy UTF-8 decoding of the line already uses.
fn pg_text(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(s)
    }
}

fn to_i64(v: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Other(format!("{what} {v} does not fit PostgreSQL's BIGINT")))
}

/// A revenue as `revenue::text` gives it (NUMERIC keeps its inputs' scale: "1.0"; a `Total` is
/// normalised when shown).
fn parse_revenue(user_id: &str, text: &str) -> Result<Total, StoreError> {
    text.parse().map_err(|e| StoreError::Other(format!("stored revenue of user {user_id:?}: {e}")))
}

/// The URL without its password, for error messages.
fn redact(url: &str) -> Cow<'_, str> {
    let Some((scheme, rest)) = url.split_once("://") else { return Cow::Borrowed(url) };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => match rest[..at].split_once(':') {
            Some((user, _)) => Cow::Owned(format!("{scheme}://{user}:***{}", &rest[at..])),
            None => Cow::Borrowed(url),
        },
        None => Cow::Borrowed(url),
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn progress(&self, stream: &str) -> Result<StreamProgress, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT position, events_applied, invalid_lines FROM eps_checkpoints WHERE stream = $1",
                &[&stream],
            )
            .await
            .map_err(|e| pg_error("reading the checkpoint", e))?;
        let Some(row) = row else { return Ok(StreamProgress::default()) };
        let get =
            |i: usize| row.try_get::<_, i64>(i).map(|v| v as u64).map_err(|e| pg_error("reading the checkpoint", e));
        Ok(StreamProgress { position: get(0)?, events_applied: get(1)?, invalid_lines: get(2)? })
    }

    async fn commit(&self, stream: &str, batch: &Batch) -> Result<CommitOutcome, StoreError> {
        let to = to_i64(batch.to, "batch end position")?;
        let events = to_i64(batch.events, "event count")?;
        let mut deltas: Vec<(&str, String)> = batch.deltas.iter().map(|(u, d)| (u.as_str(), d.to_string())).collect();
        deltas.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let (users, amounts): (Vec<&str>, Vec<String>) = deltas.into_iter().unzip();

        let mut positions = Vec::with_capacity(batch.invalid.len());
        let mut offsets = Vec::with_capacity(batch.invalid.len());
        for l in &batch.invalid {
            positions.push(to_i64(l.position, "invalid line position")?);
            offsets.push(to_i64(l.segment_offset, "invalid line segment offset")?);
        }
        let segments: Vec<Cow<'_, str>> = batch.invalid.iter().map(|l| pg_text(&l.segment)).collect();
        let errors: Vec<Cow<'_, str>> = batch.invalid.iter().map(|l| pg_text(&l.error)).collect();
        let lines: Vec<Cow<'_, str>> = batch.invalid.iter().map(|l| pg_text(&l.line)).collect();
        let (segments, errors, lines): (Vec<&str>, Vec<&str>, Vec<&str>) = (
            segments.iter().map(|s| s.as_ref()).collect(),
            errors.iter().map(|s| s.as_ref()).collect(),
            lines.iter().map(|s| s.as_ref()).collect(),
        );

        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| pg_error("starting the commit", e))?;
        tx.execute("INSERT INTO eps_checkpoints (stream, position) VALUES ($1, 0) ON CONFLICT DO NOTHING", &[&stream])
            .await
            .map_err(|e| pg_error("creating the checkpoint", e))?;
        let current: i64 = tx
            .query_one("SELECT position FROM eps_checkpoints WHERE stream = $1 FOR UPDATE", &[&stream])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|e| pg_error("locking the checkpoint", e))?;
        if current as u64 != batch.from {
            // Dropping `tx` rolls back (and releases the row lock).
            return Ok(CommitOutcome::Conflict { current: current as u64 });
        }
        if !users.is_empty() {
            // Exact decimal text, cast by PostgreSQL: NUMERIC takes any size the text has.
            tx.execute(
                "INSERT INTO users_revenue (user_id, revenue)
                 SELECT d.user_id, d.revenue::numeric FROM UNNEST($1::varchar[], $2::text[]) AS d(user_id, revenue)
                 ON CONFLICT (user_id) DO UPDATE SET revenue = users_revenue.revenue + EXCLUDED.revenue",
                &[&users, &amounts],
            )
            .await
            .map_err(|e| pg_error("updating revenues", e))?;
        }
        let new_invalid = if batch.invalid.is_empty() {
            0
        } else {
            tx.execute(
                "INSERT INTO eps_invalid_lines (stream, position, segment, segment_offset, error, line)
                 SELECT $1, * FROM UNNEST($2::bigint[], $3::text[], $4::bigint[], $5::text[], $6::text[])
                 ON CONFLICT DO NOTHING",
                &[&stream, &positions, &segments, &offsets, &errors, &lines],
            )
            .await
            .map_err(|e| pg_error("recording invalid lines", e))? as i64
        };
        tx.execute(
            "UPDATE eps_checkpoints
             SET position = $2, events_applied = events_applied + $3, invalid_lines = invalid_lines + $4,
                 updated_at = now()
             WHERE stream = $1",
            &[&stream, &to, &events, &new_invalid],
        )
        .await
        .map_err(|e| pg_error("moving the checkpoint", e))?;
        tx.commit().await.map_err(|e| pg_error("committing the batch", e))?;
        Ok(CommitOutcome::Committed)
    }

    async fn revenue(&self, user_id: &str) -> Result<Option<Total>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT revenue::text FROM users_revenue WHERE user_id = $1", &[&user_id])
            .await
            .map_err(|e| pg_error("reading a revenue", e))?;
        let Some(row) = row else { return Ok(None) };
        let text: String = row.try_get(0).map_err(|e| pg_error("reading a revenue", e))?;
        parse_revenue(user_id, &text).map(Some)
    }

    async fn users(&self, limit: usize) -> Result<Vec<(String, Total)>, StoreError> {
        // Ordered by the primary key's collation (the database default), so the index serves it.
        let sql = "SELECT user_id, revenue::text FROM users_revenue ORDER BY user_id LIMIT $1";
        self.user_rows(sql, limit, "listing users").await
    }

    async fn totals(&self) -> Result<Totals, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT count(*), COALESCE(sum(revenue), 0)::text FROM users_revenue", &[])
            .await
            .map_err(|e| pg_error("summing revenues", e))?;
        let users: i64 = row.try_get(0).map_err(|e| pg_error("summing revenues", e))?;
        let sum: String = row.try_get(1).map_err(|e| pg_error("summing revenues", e))?;
        Ok(Totals { users: users as u64, revenue: parse_revenue("(all users)", &sum)? })
    }

    async fn top_users(&self, limit: usize) -> Result<Vec<(String, Total)>, StoreError> {
        // NUMERIC orders exactly, at any size. (A full sort per call: PostgreSQL has no index on
        // revenue; the console asks once a second.) The output column is named apart: ORDER BY
        // `revenue` would otherwise sort the text.
        let sql = "SELECT user_id, revenue::text AS revenue_text FROM users_revenue
                   ORDER BY revenue DESC, user_id LIMIT $1";
        self.user_rows(sql, limit, "listing the top users").await
    }

    async fn events_applied(&self) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT COALESCE(SUM(events_applied), 0)::bigint FROM eps_checkpoints", &[])
            .await
            .map_err(|e| pg_error("reading the checkpoints", e))?;
        Ok(row.try_get::<_, i64>(0).map_err(|e| pg_error("reading the checkpoints", e))? as u64)
    }

    async fn last_commit_age(&self) -> Result<Option<f64>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT EXTRACT(EPOCH FROM now() - MAX(updated_at))::float8 FROM eps_checkpoints", &[])
            .await
            .map_err(|e| pg_error("reading the last commit time", e))?;
        let age = row.try_get::<_, Option<f64>>(0).map_err(|e| pg_error("reading the last commit time", e))?;
        Ok(age.map(|a| a.max(0.0)))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client.simple_query("SELECT 1").await.map_err(|e| pg_error("pinging", e))?;
        Ok(())
    }

    async fn invalid_lines_after(
        &self,
        stream: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<InvalidLine>, StoreError> {
        let after = match after {
            Some(p) => to_i64(p, "invalid line position")?,
            None => -1,
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let doing = "listing invalid lines";
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT position, segment, segment_offset, error, line FROM eps_invalid_lines
                 WHERE stream = $1 AND position > $2 ORDER BY position LIMIT $3",
                &[&stream, &after, &limit],
            )
            .await
            .map_err(|e| pg_error(doing, e))?;
        rows.iter()
            .map(|r| {
                Ok(InvalidLine {
                    position: r.try_get::<_, i64>(0)? as u64,
                    segment: r.try_get(1)?,
                    segment_offset: r.try_get::<_, i64>(2)? as u64,
                    error: r.try_get(3)?,
                    line: r.try_get(4)?,
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(|e| pg_error(doing, e))
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::panic::AssertUnwindSafe;
    use std::sync::Arc;

    use futures::FutureExt as _;

    use super::*;
    use crate::store::sqlite::behaviours::dec;
    use crate::store::sqlite::store_behaviour_tests;

    /// The test server's URL. Missing means the tests were not started by `scripts/test`: fail
    /// loudly, since a silently skipped backend would look like a passing one.
    fn server_url() -> String {
        std::env::var("EPS_TEST_PG_URL").unwrap_or_else(|_| {
            panic!(
                "EPS_TEST_PG_URL is not set: the PostgreSQL tests need a server. Run them with scripts/test, \
                 or: eval \"$(scripts/pg-throwaway start)\"; cargo test; scripts/pg-throwaway stop \"$EPS_TEST_PG_DIR\""
            )
        })
    }

    async fn admin() -> tokio_postgres::Client {
        let url = server_url();
        let (client, conn) = tokio_postgres::connect(&url, NoTls)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to EPS_TEST_PG_URL={url}: {e}"));
        tokio::spawn(conn);
        client
    }

    /// `url` with its database name replaced by `db`.
    fn url_for(url: &str, db: &str) -> String {
        let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
        let authority_start = base.find("://").map_or(0, |i| i + 3);
        let base = match base[authority_start..].find('/') {
            Some(slash) => &base[..authority_start + slash],
            None => base,
        };
        match query {
            Some(q) => format!("{base}/{db}?{q}"),
            None => format!("{base}/{db}"),
        }
    }

    /// Runs `test` with the URL of a fresh database, then drops the database (even if the test panicked).
    async fn with_database<F, Fut>(test: F)
    where
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = ()>,
    {
        let name = format!("eps_test_{:016x}", rand::random::<u64>());
        let admin = admin().await;
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        let outcome = AssertUnwindSafe(test(url_for(&server_url(), &name))).catch_unwind().await;
        if let Err(e) = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await {
            eprintln!("could not drop test database {name}: {e}");
        }
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }

    async fn with_store<F, Fut>(behaviour: F)
    where
        F: FnOnce(Arc<dyn Store>) -> Fut,
        Fut: Future<Output = ()>,
    {
        with_database(|url| async move {
            let store = PostgresStore::connect(&url).await.unwrap();
            behaviour(Arc::new(store)).await;
        })
        .await;
    }

    store_behaviour_tests!(with_store);

    #[tokio::test]
    async fn adopts_the_seed_table_and_migrates_once() {
        with_database(|url| async move {
            let (client, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
            tokio::spawn(conn);
            // The seed's create_table.sql, with a row already in it.
            client
                .batch_execute(
                    "CREATE TABLE users_revenue (user_id VARCHAR(255) PRIMARY KEY, revenue NUMERIC NOT NULL);
                     INSERT INTO users_revenue VALUES ('seeded', 12.50);",
                )
                .await
                .unwrap();
            // Several processes starting at once: the advisory lock lets one migrate, the others wait.
            let (a, b, c) =
                tokio::join!(PostgresStore::connect(&url), PostgresStore::connect(&url), PostgresStore::connect(&url));
            let (store, _b, _c) = (a.unwrap(), b.unwrap(), c.unwrap());
            assert_eq!(store.revenue("seeded").await.unwrap(), Some(dec("12.5")));
            let versions: i64 =
                client.query_one("SELECT COUNT(*) FROM eps_schema_migrations", &[]).await.unwrap().get(0);
            assert_eq!(versions, MIGRATIONS.len() as i64);
            // Re-running migration 1 by hand (e.g. after eps_schema_migrations was lost) is harmless.
            client.batch_execute(MIGRATIONS[0].1).await.unwrap();
            let checks: i64 = client
                .query_one("SELECT COUNT(*) FROM pg_constraint WHERE conname = 'eps_revenue_exact_range'", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(checks, 0, "totals are not bounded");
        })
        .await;
    }

    /// A database an older eps prepared (schema version 2, totals bounded by a CHECK) is upgraded: the
    /// CHECK goes, and a total no `Decimal` holds commits.
    #[tokio::test]
    async fn the_range_check_of_older_schemas_is_dropped() {
        with_database(|url| async move {
            let (client, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
            tokio::spawn(conn);
            client
                .batch_execute(
                    "CREATE TABLE eps_schema_migrations (version INTEGER PRIMARY KEY);
                     INSERT INTO eps_schema_migrations VALUES (1), (2);
                     CREATE TABLE users_revenue (user_id VARCHAR(255) PRIMARY KEY, revenue NUMERIC NOT NULL);
                     ALTER TABLE users_revenue ADD CONSTRAINT eps_revenue_exact_range CHECK (
                         scale(revenue) <= 28
                         AND abs(revenue) * power(10::numeric, scale(revenue)) < 79228162514264337593543950336);
                     CREATE TABLE eps_checkpoints (stream TEXT PRIMARY KEY, position BIGINT NOT NULL,
                         events_applied BIGINT NOT NULL DEFAULT 0, invalid_lines BIGINT NOT NULL DEFAULT 0,
                         updated_at TIMESTAMPTZ);
                     CREATE TABLE eps_invalid_lines (stream TEXT, position BIGINT, segment TEXT,
                         segment_offset BIGINT, error TEXT, line TEXT, PRIMARY KEY (stream, position));
                     INSERT INTO users_revenue VALUES ('old', 100000000000);",
                )
                .await
                .unwrap();
            let store = PostgresStore::connect(&url).await.unwrap();
            let checks: i64 = client
                .query_one("SELECT COUNT(*) FROM pg_constraint WHERE conname = 'eps_revenue_exact_range'", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(checks, 0);
            let b = Batch {
                from: 0,
                to: 1,
                deltas: vec![("old".into(), dec("0.0000000000000000000000000001"))],
                events: 1,
                invalid: vec![],
            };
            assert_eq!(store.commit("main", &b).await.unwrap(), CommitOutcome::Committed);
            let got = store.revenue("old").await.unwrap().map(|t| t.to_string());
            assert_eq!(got.as_deref(), Some("100000000000.0000000000000000000000000001"));
        })
        .await;
    }

    #[tokio::test]
    async fn unreachable_server_fails_fast_with_a_clear_error() {
        // A port nobody listens on: bind one, then free it.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let started = std::time::Instant::now();
        let err = match PostgresStore::connect(&format!("postgres://eps:secret@127.0.0.1:{port}/eps")).await {
            Ok(_) => panic!("connected to a closed port"),
            Err(e) => format!("{e:#}"),
        };
        assert!(started.elapsed() < POOL_TIMEOUT * 2, "took {:?}", started.elapsed());
        assert!(err.contains("cannot prepare the PostgreSQL store") && err.contains("unavailable"), "{err}");
        assert!(!err.contains("secret"), "the password leaked into {err}");
    }

    #[tokio::test]
    async fn a_terminated_connection_is_unavailable_then_recovers() {
        with_database(|url| async move {
            let store = PostgresStore::connect(&url).await.unwrap();
            store.ping().await.unwrap();
            // An administrator (or a server restart) kills the pooled connection.
            let admin = admin().await;
            let db = url.rsplit('/').next().unwrap().to_owned();
            admin
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                    &[&db],
                )
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            // Either the dead connection is noticed by the recycle check and replaced, or the query
            // on it fails as Unavailable; never a generic error, and the next call works.
            match store.revenue("x").await {
                Ok(None) | Err(StoreError::Unavailable(_)) => {}
                other => panic!("expected None or Unavailable, got {other:?}"),
            }
            assert_eq!(store.revenue("x").await.unwrap(), None);
        })
        .await;
    }

    #[test]
    fn urls_are_rewritten_and_redacted() {
        assert_eq!(url_for("postgres://postgres@127.0.0.1:5/postgres", "x"), "postgres://postgres@127.0.0.1:5/x");
        assert_eq!(url_for("postgres://h:5/db?sslmode=disable", "x"), "postgres://h:5/x?sslmode=disable");
        assert_eq!(redact("postgres://u:pw@h:5/db"), "postgres://u:***@h:5/db");
        assert_eq!(redact("postgres://u@h:5/db"), "postgres://u@h:5/db");
    }
}
