//! The PostgreSQL backend (chosen by a `postgres://` URL).
//!
//! Owns: the eps schema in the target database (versioned migrations in `eps_schema_migrations`,
//! compatible with the seed's `users_revenue` table when it already exists), the connection pool,
//! and the mapping of PostgreSQL errors to [`StoreError`].
//!
//! Invariants:
//! - An existing `users_revenue` is adopted only where exact (see `adoption_problems`): its catalog
//!   entry is read in the migration transaction before any migration runs, and a table that would round,
//!   truncate or refuse is refused with the `ALTER TABLE` statements that fix it, the transaction
//!   rolled back.
//! - `revenue` is the seed's unconstrained NUMERIC, so sums are exact in the database and of any size
//!   (NUMERIC holds 131,072 integer digits). Totals cross the wire as exact decimal text both ways
//!   (`$2::text[]` cast to NUMERIC in, `revenue::text` out) into a [`Total`]: no binding to a
//!   fixed-size decimal narrows them. (Versions 1 and 2 of the schema bounded totals to what a
//!   `Decimal` holds with the `eps_revenue_exact_range` CHECK; version 3 drops it.)
//! - `commit` is one transaction whose first act is to lock the stream's checkpoint row
//!   (`SELECT ... FOR UPDATE`): concurrent processors, in any number of processes, are serialised
//!   there, and the compare-and-set is decided under the lock.
//! - Deltas are applied in `user_id` order in one statement, so two transactions touching the same
//!   users lock their rows in the same order (no deadlock even across streams). They reach the server
//!   by binary COPY into a temporary table, in that order: the cost per user is the database's own.
//! - Every wait is bounded (connect, pool wait/create/recycle): with the database down a call fails
//!   with `Unavailable` within seconds instead of hanging.

use std::borrow::Cow;
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
#[cfg(test)]
use tokio_postgres::NoTls;

use super::{
    quote_ident, schema_refusal, Batch, CommitOutcome, InvalidLine, LostRange, SchemaProblem, Store, StoreError,
    StreamProgress, Totals,
};
use crate::error::ConfigError;
use crate::event::MAX_USER_ID_BYTES;
use crate::money::Total;

/// From this many users a commit sends its sums by binary COPY into a temporary table and applies
/// them with one statement (the database's own pace for large commits, docs/PERFORMANCE.md "A million
/// users"); below it, one `UNNEST` statement: a single round trip, which is what the small commits of
/// followers and JetStream partitions need.
const COPY_FROM_USERS: usize = 1_000;

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
const MIGRATIONS: &[(i32, &str)] = &[
    (
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
    ),
    (
        2,
        // Narrowed version 1's CHECK to what a Decimal reads back exactly; totals are unbounded now.
        "ALTER TABLE users_revenue DROP CONSTRAINT IF EXISTS eps_revenue_exact_range;",
    ),
    (
        3,
        // Totals are exact decimals of any size: the narrowing CHECK of versions 1 and 2 goes.
        "ALTER TABLE users_revenue DROP CONSTRAINT IF EXISTS eps_revenue_exact_range;",
    ),
    (
        4,
        // What the checkpoints count (a stream's creation time and partition count, a file log's id), and
        // the ranges found removed from the log before they were applied.
        "CREATE TABLE IF NOT EXISTS eps_log_identity (
         scope TEXT PRIMARY KEY,
         identity TEXT NOT NULL,
         bound_at TIMESTAMPTZ NOT NULL DEFAULT now()
     );
     CREATE TABLE IF NOT EXISTS eps_lost_messages (
         scope TEXT NOT NULL,
         part BIGINT NOT NULL,
         first_position BIGINT NOT NULL,
         last_position BIGINT NOT NULL,
         identity TEXT NOT NULL,
         detected_at TIMESTAMPTZ NOT NULL DEFAULT now(),
         PRIMARY KEY (scope, part, first_position)
     );",
    ),
];

pub struct PostgresStore {
    pool: Pool,
}

impl PostgresStore {
    /// Builds the pool and runs the migrations; fails if the database is unreachable now, so a
    /// misconfigured URL is reported at start-up rather than as 503s later.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        // `sslmode` and `sslrootcert` as libpq reads them (see `pg_tls`); a bad value is a ConfigError.
        let (mut config, tls) = super::pg_tls::connect_config(url)?;
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
        let manager = Manager::from_config(config, tls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(POOL_TIMEOUT))
            .create_timeout(Some(POOL_TIMEOUT))
            .recycle_timeout(Some(POOL_TIMEOUT))
            .runtime(Runtime::Tokio1)
            .build()
            .context("cannot build the PostgreSQL connection pool")?;
        let store = PostgresStore { pool };
        let doing = || format!("cannot prepare the PostgreSQL store at {}", redact(url));
        // A certificate that does not verify, or no TLS where the URL requires it, is the
        // configuration's fault: exit code 2 and no retry, with the cause (see `pg_tls`).
        if let Err(PoolError::Backend(e)) = store.pool.get().await {
            if let Some(why) = super::pg_tls::tls_refusal(&e) {
                return Err(anyhow::Error::new(ConfigError(format!("{}: TLS refused: {why}", doing()))));
            }
        }
        match store.migrate().await {
            Ok(Ok(())) => Ok(store),
            // A ConfigError under the context: main exits 2 and the retry loops give up at once.
            Ok(Err(refused)) => Err(anyhow::Error::new(refused).context(doing())),
            Err(e) => Err(anyhow::Error::new(e).context(doing())),
        }
    }

    /// Applies the pending migrations, after checking an existing `users_revenue` (see
    /// [`adoption_problems`]). The outer error is the database's; the inner one refuses the table,
    /// and then the whole transaction is rolled back: nothing in the database changes.
    async fn migrate(&self) -> Result<Result<(), ConfigError>, StoreError> {
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
        if let Some(table) = inspect_users_revenue(&tx).await? {
            // Versions 1 and 2 added this CHECK themselves; version 3 drops it.
            let ours = if current < 3 { Some("eps_revenue_exact_range") } else { None };
            let (problems, fix) = adoption_problems(&table, ours);
            if !problems.is_empty() {
                // Dropping `tx` rolls back: not even eps_schema_migrations is created.
                return Ok(Err(schema_refusal("PostgreSQL", &problems, &fix)));
            }
        }
        for &(version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            tx.batch_execute(sql).await.map_err(|e| pg_error(&format!("applying migration {version}"), e))?;
            tx.execute("INSERT INTO eps_schema_migrations (version) VALUES ($1)", &[&version])
                .await
                .map_err(|e| pg_error(&format!("recording migration {version}"), e))?;
        }
        tx.commit().await.map_err(|e| pg_error("committing the migrations", e))?;
        Ok(Ok(()))
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(|e| match e {
            PoolError::NoRuntimeSpecified => StoreError::Other(format!("PostgreSQL pool misconfigured: {e}")),
            // Refused by TLS after start-up (a certificate replaced by one that does not verify): not an
            // outage to wait out, so not Unavailable.
            PoolError::Backend(e) => match super::pg_tls::tls_refusal(&e) {
                Some(why) => StoreError::Other(format!("PostgreSQL refused by TLS while connecting: {why}")),
                None => pg_error("connecting", e),
            },
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

/// A column of an existing `users_revenue`, as the catalog describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PgColumn {
    name: String,
    /// `format_type`: "numeric(12,2)", "character varying(64)", a domain's name.
    declared: String,
    /// The type itself, without modifier (`regtype`): "numeric", "character varying", a domain's name.
    type_name: String,
    is_domain: bool,
    /// -1 when unconstrained; otherwise the length or precision/scale, plus 4.
    typmod: i32,
    not_null: bool,
    /// Has a default, or is generated or an identity: eps's INSERT need not name it.
    filled: bool,
    /// The column's collation tells equal only what is byte for byte equal.
    deterministic: bool,
}

/// What start-up checks of an existing `users_revenue`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PgTable {
    columns: Vec<PgColumn>,
    /// A valid, immediate, non-partial unique index on exactly `user_id`: what `ON CONFLICT (user_id)`
    /// needs.
    user_id_unique: bool,
    /// CHECK constraints: (name, definition).
    checks: Vec<(String, String)>,
}

/// The `users_revenue` the unqualified statements of eps would use (the search path's), if any.
async fn inspect_users_revenue(tx: &tokio_postgres::Transaction<'_>) -> Result<Option<PgTable>, StoreError> {
    let doing = "inspecting the existing users_revenue";
    let oid: Option<u32> = tx
        .query_one("SELECT to_regclass('users_revenue')::oid", &[])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(|e| pg_error(doing, e))?;
    let Some(oid) = oid else { return Ok(None) };
    let rows = tx
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.atttypid::regtype::text,
                    t.typtype = 'd', a.atttypmod, a.attnotnull,
                    a.atthasdef OR a.attgenerated <> '' OR a.attidentity <> '',
                    COALESCE(c.collisdeterministic, true)
             FROM pg_attribute a
             JOIN pg_type t ON t.oid = a.atttypid
             LEFT JOIN pg_collation c ON c.oid = a.attcollation
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(|e| pg_error(doing, e))?;
    let columns = rows
        .iter()
        .map(|r| {
            Ok(PgColumn {
                name: r.try_get(0)?,
                declared: r.try_get(1)?,
                type_name: r.try_get(2)?,
                is_domain: r.try_get(3)?,
                typmod: r.try_get(4)?,
                not_null: r.try_get(5)?,
                filled: r.try_get(6)?,
                deterministic: r.try_get(7)?,
            })
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()
        .map_err(|e| pg_error(doing, e))?;
    let user_id_unique: bool = tx
        .query_one(
            "SELECT EXISTS (
                 SELECT 1 FROM pg_index i
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                 WHERE i.indrelid = $1 AND i.indisunique AND i.indimmediate AND i.indisvalid
                   AND i.indnkeyatts = 1 AND i.indpred IS NULL AND i.indexprs IS NULL
                   AND a.attname = 'user_id')",
            &[&oid],
        )
        .await
        .and_then(|row| row.try_get(0))
        .map_err(|e| pg_error(doing, e))?;
    let checks = tx
        .query(
            "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint
             WHERE conrelid = $1 AND contype = 'c' ORDER BY conname",
            &[&oid],
        )
        .await
        .map_err(|e| pg_error(doing, e))?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()
        .map_err(|e| pg_error(doing, e))?;
    Ok(Some(PgTable { columns, user_id_unique, checks }))
}

/// PostgreSQL's typmod header (VARHDRSZ): a modifier is stored as its value plus 4.
const TYPMOD_HEADER: i32 = 4;

/// What in `table` would round, truncate, convert or refuse what eps stores, and the statements that
/// fix it. Exact means:
/// - `revenue`: NUMERIC without precision or scale (any size, any scale), NOT NULL (NULL + x is NULL).
/// - `user_id`: TEXT, or VARCHAR without a length or with one of at least [`MAX_USER_ID_BYTES`]
///   characters (a userId has at most that many bytes, so at most that many characters), with a
///   deterministic collation (one that tells "A" from "a"), and a unique index on it alone.
/// - no CHECK constraint (one could refuse a total or an id eps must store), except `ours`, which a
///   pending migration drops; and no other column eps's INSERT would leave NULL against a NOT NULL.
fn adoption_problems(table: &PgTable, ours: Option<&str>) -> (Vec<SchemaProblem>, Vec<String>) {
    let (mut problems, mut fix) = (Vec::new(), Vec::new());
    let mut problem = |column: Option<&str>, found: &str, why: String, statement: String| {
        problems.push(SchemaProblem { column: column.map(str::to_owned), found: found.to_owned(), why });
        if !fix.contains(&statement) {
            fix.push(statement);
        }
    };
    let column = |name: &str| table.columns.iter().find(|c| c.name == name);
    match column("revenue") {
        None => problem(
            None,
            "no column revenue",
            "eps keeps each user's total there".into(),
            "ALTER TABLE users_revenue ADD COLUMN revenue NUMERIC NOT NULL DEFAULT 0;".into(),
        ),
        Some(c) => {
            let why = if c.is_domain {
                let why = "a domain, which may narrow NUMERIC with a precision or a CHECK; eps needs plain NUMERIC";
                Some(why.to_owned())
            } else {
                match c.type_name.as_str() {
                    "numeric" if c.typmod == -1 => None,
                    "numeric" => {
                        let scale = (c.typmod - TYPMOD_HEADER) & 0xffff;
                        let precision = ((c.typmod - TYPMOD_HEADER) >> 16) & 0xffff;
                        Some(format!(
                            "it rounds every amount to {scale} decimal places (0.004 + 0.004 would depend on the \
                             batching) and refuses totals of more than {} integer digits; eps stores exact \
                             decimals of any scale and size",
                            precision - scale
                        ))
                    }
                    "smallint" | "integer" | "bigint" => Some(
                        "it rounds every amount to a whole number (10.5 would become 11, 0.3 would become 0)"
                            .to_owned(),
                    ),
                    "real" | "double precision" => {
                        Some("binary floating point cannot hold most decimals exactly (0.1 + 0.2 is not 0.3)".into())
                    }
                    "money" => Some("it rounds every amount to the currency's fraction digits".into()),
                    _ => Some("not a NUMERIC: eps adds totals with exact NUMERIC arithmetic".into()),
                }
            };
            if let Some(why) = why {
                let numeric_like = c.is_domain
                    || matches!(
                        c.type_name.as_str(),
                        "numeric" | "smallint" | "integer" | "bigint" | "real" | "double precision" | "money"
                    );
                let using = if numeric_like { "" } else { " USING revenue::numeric" };
                problem(
                    Some("revenue"),
                    &c.declared,
                    why,
                    format!("ALTER TABLE users_revenue ALTER COLUMN revenue TYPE NUMERIC{using};"),
                );
            }
            if !c.not_null {
                problem(
                    Some("revenue"),
                    &format!("{} without NOT NULL", c.declared),
                    "a NULL total swallows every amount added to it (NULL + x is NULL)".into(),
                    "ALTER TABLE users_revenue ALTER COLUMN revenue SET NOT NULL;".into(),
                );
            }
        }
    }
    match column("user_id") {
        None => problem(
            None,
            "no column user_id",
            "eps keys each total by userId".into(),
            format!("ALTER TABLE users_revenue ADD COLUMN user_id VARCHAR({MAX_USER_ID_BYTES});"),
        ),
        Some(c) => {
            let long_enough = |typmod: i32| typmod == -1 || typmod - TYPMOD_HEADER >= MAX_USER_ID_BYTES as i32;
            let why = if c.is_domain {
                Some("a domain, which may narrow the text with a length or a CHECK".to_owned())
            } else {
                match c.type_name.as_str() {
                    "text" => None,
                    "character varying" if long_enough(c.typmod) => None,
                    "character varying" => Some(format!(
                        "it refuses a userId longer than {} characters, and eps accepts userIds of up to \
                         {MAX_USER_ID_BYTES} bytes: processing would halt on the first such event",
                        c.typmod - TYPMOD_HEADER
                    )),
                    "character" => Some(
                        "CHAR pads ids with spaces and ignores trailing ones, so \"a\" and \"a \" would share \
                         one total"
                            .into(),
                    ),
                    _ => Some("not a text type: eps stores each userId as text, as it is".into()),
                }
            };
            let collate = if c.deterministic { "" } else { " COLLATE \"default\"" };
            if let Some(why) = why {
                problem(
                    Some("user_id"),
                    &c.declared,
                    why,
                    format!(
                        "ALTER TABLE users_revenue ALTER COLUMN user_id TYPE VARCHAR({MAX_USER_ID_BYTES}){collate};"
                    ),
                );
            } else if !c.deterministic {
                let statement = format!(
                    "ALTER TABLE users_revenue ALTER COLUMN user_id TYPE {}{collate};",
                    if c.type_name == "text" { "TEXT".to_owned() } else { c.declared.to_uppercase() }
                );
                problem(
                    Some("user_id"),
                    &format!("{} with a nondeterministic collation", c.declared),
                    "ids it deems equal (\"A\" and \"a\", say) would share one total".into(),
                    statement,
                );
            }
        }
    }
    if column("user_id").is_some() && !table.user_id_unique {
        problem(
            None,
            "no unique index on user_id alone",
            "eps adds to a user's row with INSERT ... ON CONFLICT (user_id), which needs one (processing \
             would halt at the first commit)"
                .into(),
            "CREATE UNIQUE INDEX users_revenue_user_id_key ON users_revenue (user_id);".into(),
        );
    }
    for (name, definition) in &table.checks {
        if Some(name.as_str()) == ours {
            continue;
        }
        problem(
            None,
            &format!("the constraint {name} {definition}"),
            "a CHECK may refuse a total or an id eps must store, which halts processing for everyone".into(),
            format!("ALTER TABLE users_revenue DROP CONSTRAINT {};", quote_ident(name)),
        );
    }
    for c in &table.columns {
        if c.name != "user_id" && c.name != "revenue" && c.not_null && !c.filled {
            problem(
                Some(&quote_ident(&c.name)),
                &format!("{} NOT NULL without a default", c.declared),
                "eps's INSERT does not name it, so adding a new user would fail".into(),
                format!("ALTER TABLE users_revenue ALTER COLUMN {} DROP NOT NULL;", quote_ident(&c.name)),
            );
        }
    }
    (problems, fix)
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
pub(crate) fn redact(url: &str) -> Cow<'_, str> {
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
        if !deltas.is_empty() && deltas.len() < COPY_FROM_USERS {
            // A small commit (a follower's, a JetStream partition's): one statement, one round trip.
            let (users, amounts): (Vec<&str>, Vec<&str>) = deltas.iter().map(|(u, a)| (*u, a.as_str())).unzip();
            tx.execute(
                "INSERT INTO users_revenue (user_id, revenue)
                 SELECT d.user_id, d.revenue::numeric FROM UNNEST($1::varchar[], $2::text[]) AS d(user_id, revenue)
                 ON CONFLICT (user_id) DO UPDATE SET revenue = users_revenue.revenue + EXCLUDED.revenue",
                &[&users, &amounts],
            )
            .await
            .map_err(|e| pg_error("updating revenues", e))?;
        } else if !deltas.is_empty() {
            // The sums go in by binary COPY into this session's temporary table (emptied at every commit),
            // then into users_revenue by one statement. Exact decimal text, cast by PostgreSQL: NUMERIC
            // takes any size the text has. The table is scanned in the order it was filled (a fresh
            // temporary table: no synchronised or parallel scan), which is user_id order.
            tx.batch_execute(
                "SET LOCAL client_min_messages = warning;
                 CREATE TEMP TABLE IF NOT EXISTS eps_commit_deltas (user_id TEXT, revenue TEXT) ON COMMIT DELETE ROWS",
            )
            .await
            .map_err(|e| pg_error("preparing the revenue deltas", e))?;
            let sink = tx
                .copy_in("COPY eps_commit_deltas (user_id, revenue) FROM STDIN (FORMAT binary)")
                .await
                .map_err(|e| pg_error("sending the revenue deltas", e))?;
            let writer = BinaryCopyInWriter::new(sink, &[Type::TEXT, Type::TEXT]);
            futures::pin_mut!(writer);
            for (user, amount) in &deltas {
                writer.as_mut().write(&[user, amount]).await.map_err(|e| pg_error("sending the revenue deltas", e))?;
            }
            writer.finish().await.map_err(|e| pg_error("sending the revenue deltas", e))?;
            tx.execute(
                "INSERT INTO users_revenue (user_id, revenue)
                 SELECT d.user_id, d.revenue::numeric FROM eps_commit_deltas AS d
                 ON CONFLICT (user_id) DO UPDATE SET revenue = users_revenue.revenue + EXCLUDED.revenue",
                &[],
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
        // Prepared once per pooled connection: a read is then one round trip instead of two.
        let statement = client
            .prepare_cached("SELECT revenue::text FROM users_revenue WHERE user_id = $1")
            .await
            .map_err(|e| pg_error("reading a revenue", e))?;
        let row = client.query_opt(&statement, &[&user_id]).await.map_err(|e| pg_error("reading a revenue", e))?;
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

    async fn log_identity(&self, scope: &str) -> Result<Option<String>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT identity FROM eps_log_identity WHERE scope = $1", &[&scope])
            .await
            .map_err(|e| pg_error("reading the log identity", e))?;
        row.map(|r| r.try_get(0)).transpose().map_err(|e| pg_error("reading the log identity", e))
    }

    async fn bind_log_identity(
        &self,
        scope: &str,
        expected: Option<&str>,
        identity: &str,
        reset_to: Option<u64>,
    ) -> Result<(bool, Vec<(String, u64)>), StoreError> {
        let doing = "binding the checkpoints to the log";
        let reset_to = reset_to.map(|p| to_i64(p, "checkpoint")).transpose()?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| pg_error(doing, e))?;
        // Serialised with other binders (and with commits, through the checkpoint rows' locks below).
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&(MIGRATION_LOCK_KEY + 1)])
            .await
            .map_err(|e| pg_error(doing, e))?;
        let current: Option<String> = tx
            .query_opt("SELECT identity FROM eps_log_identity WHERE scope = $1", &[&scope])
            .await
            .map_err(|e| pg_error(doing, e))?
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(|e| pg_error(doing, e))?;
        let prefix = format!("{}/%", scope.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_"));
        let rows = tx
            .query(
                "SELECT stream, position FROM eps_checkpoints WHERE stream = $1 OR stream LIKE $2 ORDER BY stream FOR UPDATE",
                &[&scope, &prefix],
            )
            .await
            .map_err(|e| pg_error(doing, e))?;
        let checkpoints = rows
            .iter()
            .map(|r| Ok((r.try_get::<_, String>(0)?, r.try_get::<_, i64>(1)? as u64)))
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(|e| pg_error(doing, e))?;
        if current.as_deref() != expected {
            return Ok((false, checkpoints));
        }
        tx.execute(
            "INSERT INTO eps_log_identity (scope, identity) VALUES ($1, $2)
             ON CONFLICT (scope) DO UPDATE SET identity = EXCLUDED.identity, bound_at = now()",
            &[&scope, &identity],
        )
        .await
        .map_err(|e| pg_error(doing, e))?;
        if let Some(position) = reset_to {
            tx.execute(
                "UPDATE eps_checkpoints SET position = $3, updated_at = now() WHERE stream = $1 OR stream LIKE $2",
                &[&scope, &prefix, &position],
            )
            .await
            .map_err(|e| pg_error(doing, e))?;
        }
        tx.commit().await.map_err(|e| pg_error(doing, e))?;
        Ok((true, checkpoints))
    }

    async fn record_lost(&self, lost: &LostRange) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let (first, last) = (to_i64(lost.first, "position")?, to_i64(lost.last, "position")?);
        let n = client
            .execute(
                "INSERT INTO eps_lost_messages (scope, part, first_position, last_position, identity)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                &[&lost.scope, &i64::from(lost.partition), &first, &last, &lost.identity],
            )
            .await
            .map_err(|e| pg_error("recording lost messages", e))?;
        Ok(n > 0)
    }

    async fn lost_ranges(&self, scope: &str) -> Result<Vec<LostRange>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT part, first_position, last_position, identity FROM eps_lost_messages
                 WHERE scope = $1 ORDER BY part, first_position",
                &[&scope],
            )
            .await
            .map_err(|e| pg_error("listing lost messages", e))?;
        rows.iter()
            .map(|r| {
                Ok(LostRange {
                    scope: scope.to_string(),
                    partition: r.try_get::<_, i64>(0)? as u32,
                    first: r.try_get::<_, i64>(1)? as u64,
                    last: r.try_get::<_, i64>(2)? as u64,
                    identity: r.try_get(3)?,
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(|e| pg_error("listing lost messages", e))
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

    fn column(name: &str, declared: &str, type_name: &str, typmod: i32) -> PgColumn {
        PgColumn {
            name: name.into(),
            declared: declared.into(),
            type_name: type_name.into(),
            is_domain: false,
            typmod,
            not_null: true,
            filled: false,
            deterministic: true,
        }
    }

    /// The seed's table (`VARCHAR(255) PRIMARY KEY`, `NUMERIC NOT NULL`), with `revenue` and `user_id`
    /// replaced as given.
    fn seed_with(user_id: PgColumn, revenue: PgColumn) -> PgTable {
        PgTable { columns: vec![user_id, revenue], user_id_unique: true, checks: vec![] }
    }

    fn seed_user_id() -> PgColumn {
        column("user_id", "character varying(255)", "character varying", 255 + TYPMOD_HEADER)
    }

    fn seed_revenue() -> PgColumn {
        column("revenue", "numeric", "numeric", -1)
    }

    /// The fix statements for a table, or none when it is exact.
    fn fix_for(table: &PgTable) -> Vec<String> {
        let (problems, fix) = adoption_problems(table, None);
        assert_eq!(problems.is_empty(), fix.is_empty(), "{problems:?} {fix:?}");
        fix
    }

    #[test]
    fn only_columns_that_hold_every_total_and_id_exactly_are_adopted() {
        let alter_revenue = vec!["ALTER TABLE users_revenue ALTER COLUMN revenue TYPE NUMERIC;".to_string()];
        assert_eq!(fix_for(&seed_with(seed_user_id(), seed_revenue())), Vec::<String>::new());
        // NUMERIC(12,2): typmod (12 << 16 | 2) + 4.
        let narrowed = column("revenue", "numeric(12,2)", "numeric", (12 << 16 | 2) + TYPMOD_HEADER);
        let (problems, fix) = adoption_problems(&seed_with(seed_user_id(), narrowed), None);
        assert_eq!(fix, alter_revenue);
        assert!(problems[0].why.contains("2 decimal places") && problems[0].why.contains("10 integer digits"));
        for (declared, type_name) in
            [("integer", "integer"), ("bigint", "bigint"), ("double precision", "double precision"), ("money", "money")]
        {
            assert_eq!(fix_for(&seed_with(seed_user_id(), column("revenue", declared, type_name, -1))), alter_revenue);
        }
        assert_eq!(
            fix_for(&seed_with(seed_user_id(), column("revenue", "text", "text", -1))),
            ["ALTER TABLE users_revenue ALTER COLUMN revenue TYPE NUMERIC USING revenue::numeric;"]
        );
        let domain = PgColumn { is_domain: true, ..column("revenue", "cents", "cents", -1) };
        assert_eq!(fix_for(&seed_with(seed_user_id(), domain)), alter_revenue);
        let nullable = PgColumn { not_null: false, ..seed_revenue() };
        assert_eq!(
            fix_for(&seed_with(seed_user_id(), nullable)),
            ["ALTER TABLE users_revenue ALTER COLUMN revenue SET NOT NULL;"]
        );

        // user_id: long enough for MAX_USER_ID_BYTES characters, or unbounded text.
        let varchar = |n: i32| column("user_id", &format!("character varying({n})"), "character varying", n + 4);
        let alter_user_id = vec!["ALTER TABLE users_revenue ALTER COLUMN user_id TYPE VARCHAR(255);".to_string()];
        assert_eq!(fix_for(&seed_with(varchar(64), seed_revenue())), alter_user_id);
        assert_eq!(fix_for(&seed_with(varchar(254), seed_revenue())), alter_user_id);
        for exact in [
            varchar(255),
            varchar(1000),
            column("user_id", "character varying", "character varying", -1),
            column("user_id", "text", "text", -1),
        ] {
            assert_eq!(fix_for(&seed_with(exact.clone(), seed_revenue())), Vec::<String>::new(), "{exact:?}");
        }
        let padded = column("user_id", "character(255)", "character", 259);
        assert_eq!(fix_for(&seed_with(padded, seed_revenue())), alter_user_id);
        let caseless = PgColumn { deterministic: false, ..column("user_id", "text", "text", -1) };
        assert_eq!(
            fix_for(&seed_with(caseless, seed_revenue())),
            ["ALTER TABLE users_revenue ALTER COLUMN user_id TYPE TEXT COLLATE \"default\";"]
        );

        // The table: a unique index for ON CONFLICT, no CHECK but the one a migration drops, no
        // other column eps's INSERT would leave NULL against a NOT NULL.
        let mut table = seed_with(seed_user_id(), seed_revenue());
        table.user_id_unique = false;
        table.checks = vec![
            ("eps_revenue_exact_range".into(), "CHECK (scale(revenue) <= 28)".into()),
            ("Positive".into(), "CHECK ((revenue >= (0)::numeric))".into()),
        ];
        table.columns.push(column("note", "text", "text", -1));
        table.columns.push(PgColumn { filled: true, ..column("created", "timestamp", "timestamp", -1) });
        table.columns.push(PgColumn { not_null: false, ..column("memo", "text", "text", -1) });
        let (problems, fix) = adoption_problems(&table, Some("eps_revenue_exact_range"));
        assert_eq!(
            fix,
            [
                "CREATE UNIQUE INDEX users_revenue_user_id_key ON users_revenue (user_id);",
                "ALTER TABLE users_revenue DROP CONSTRAINT \"Positive\";",
                "ALTER TABLE users_revenue ALTER COLUMN note DROP NOT NULL;",
            ]
        );
        assert_eq!(problems.len(), 3);
        assert_eq!(adoption_problems(&table, None).1.len(), 4, "a version-3 database keeps no CHECK of its own");
    }

    /// The catalog as eps reads it: the tables eps creates pass, and a table whose domain, collation
    /// and missing index would change what eps stores is refused as a configuration error, untouched,
    /// until the printed statements are run.
    #[tokio::test]
    async fn the_catalog_is_read_as_the_rules_expect() {
        with_database(|url| async move {
            let store = PostgresStore::connect(&url).await.unwrap();
            let mut client = store.client().await.unwrap();
            let tx = client.transaction().await.unwrap();
            let ours = inspect_users_revenue(&tx).await.unwrap().expect("eps created users_revenue");
            assert_eq!(ours, seed_with(seed_user_id(), seed_revenue()));
            drop(tx);
            drop((client, store));

            let (client, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
            tokio::spawn(conn);
            client
                .batch_execute(
                    "DROP TABLE users_revenue; DROP TABLE eps_schema_migrations;
                     CREATE DOMAIN cents AS NUMERIC(12,2) CHECK (VALUE >= 0);
                     CREATE COLLATION caseless (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
                     CREATE TABLE users_revenue (user_id TEXT COLLATE caseless, revenue cents NOT NULL);
                     INSERT INTO users_revenue VALUES ('kept', 1.25);",
                )
                .await
                .unwrap();
            let err = PostgresStore::connect(&url).await.err().expect("the table was adopted");
            assert!(err.downcast_ref::<ConfigError>().is_some(), "not a configuration error: {err:#}");
            let message = format!("{err:#}");
            for part in ["column revenue is cents: a domain", "nondeterministic collation", "no unique index"] {
                assert!(message.contains(part), "{part:?} missing from {message}");
            }
            let versions: Option<u32> =
                client.query_one("SELECT to_regclass('eps_schema_migrations')::oid", &[]).await.unwrap().get(0);
            assert_eq!(versions, None, "the refusal changed the database");
            let fix: Vec<&str> = message.lines().filter_map(|l| l.strip_prefix("    ")).collect();
            client.batch_execute(&fix.join("\n")).await.unwrap();
            let store = PostgresStore::connect(&url).await.unwrap();
            assert_eq!(store.revenue("kept").await.unwrap(), Some(dec("1.25")));
            let b = Batch { from: 0, to: 1, deltas: vec![("Kept".into(), dec("0.001"))], events: 1, invalid: vec![] };
            assert_eq!(store.commit("main", &b).await.unwrap(), CommitOutcome::Committed);
            assert_eq!(store.revenue("kept").await.unwrap(), Some(dec("1.25")), "\"Kept\" is another user");
            assert_eq!(store.revenue("Kept").await.unwrap(), Some(dec("0.001")));
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
