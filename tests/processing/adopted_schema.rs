//! An existing `users_revenue` whose columns would round, truncate or convert what eps stores (issue
//! 15, item 5). Each is refused at start-up by `eps process` (with and without `--follow`), `eps
//! status` and `eps server`, with exit code 2 and the statements that fix it; after an operator runs
//! exactly those statements, eps starts and the totals are exact. Rows already in the table survive.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// The PostgreSQL statement every refused revenue type is fixed with.
const PG_REVENUE_FIX: &str = "ALTER TABLE users_revenue ALTER COLUMN revenue TYPE NUMERIC;";
/// How every SQLite fix begins: SQLite has no ALTER COLUMN TYPE, the table is rebuilt.
const SQLITE_REBUILD: &str = "CREATE TABLE eps_users_revenue_rebuilt (user_id TEXT PRIMARY KEY, revenue TEXT NOT NULL";

store_tests!(an_integer_revenue_column_is_refused_until_altered_then_10_5_plus_0_3_is_10_8);

async fn an_integer_revenue_column_is_refused_until_altered_then_10_5_plus_0_3_is_10_8(store: StoreKind) {
    let (table, fix, found) = match store {
        StoreKind::Postgres => {
            ("user_id VARCHAR(255) PRIMARY KEY, revenue INTEGER NOT NULL", PG_REVENUE_FIX, "integer")
        }
        StoreKind::Sqlite => {
            ("user_id TEXT PRIMARY KEY, revenue INTEGER NOT NULL", SQLITE_REBUILD, "INTEGER (Integer affinity)")
        }
    };
    let env = adopted(store, table, "INSERT INTO users_revenue VALUES ('seeded', 7)").await;
    refused_everywhere(&env, fix, found).await;
    run_printed_fix(&env).await;
    let server = env.server().await;
    apply_one_by_one(&env, &server, "u", &["10.5", "0.3"]).await;
    let http = http();
    assert_eq!(revenue_of(&http, &server.url, "u").await, "10.8");
    assert_eq!(revenue_of(&http, &server.url, "seeded").await, "7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_numeric_12_2_is_refused_until_altered_then_0_004_plus_0_004_is_0_008() {
    let env = adopted(
        StoreKind::Postgres,
        "user_id VARCHAR(255) PRIMARY KEY, revenue NUMERIC(12,2) NOT NULL",
        "INSERT INTO users_revenue VALUES ('seeded', 12.50)",
    )
    .await;
    refused_everywhere(&env, PG_REVENUE_FIX, "numeric(12,2)").await;
    run_printed_fix(&env).await;
    let server = env.server().await;
    // One event per batch: a NUMERIC(12,2) rounded each commit, so the total depended on the batching.
    apply_one_by_one(&env, &server, "u", &["0.004", "0.004"]).await;
    let http = http();
    assert_eq!(revenue_of(&http, &server.url, "u").await, "0.008");
    assert_eq!(revenue_of(&http, &server.url, "seeded").await, "12.5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_varchar_64_user_id_is_refused_until_altered_then_a_long_id_is_applied() {
    let env = adopted(StoreKind::Postgres, "user_id VARCHAR(64) PRIMARY KEY, revenue NUMERIC NOT NULL", "").await;
    refused_everywhere(
        &env,
        "ALTER TABLE users_revenue ALTER COLUMN user_id TYPE VARCHAR(255);",
        "character varying(64)",
    )
    .await;
    run_printed_fix(&env).await;
    let server = env.server().await;
    // 120 characters: within eps's limit (255 bytes), beyond the table's 64.
    let long_id = format!("user-{}", "x".repeat(115));
    apply_one_by_one(&env, &server, &long_id, &["1.5", "2"]).await;
    assert_eq!(revenue_of(&http(), &server.url, &long_id).await, "3.5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_real_revenue_column_is_refused_until_rebuilt_then_0_1_plus_0_2_is_0_3() {
    let env = adopted(
        StoreKind::Sqlite,
        "user_id TEXT PRIMARY KEY, revenue REAL NOT NULL, note TEXT DEFAULT 'kept'",
        "INSERT INTO users_revenue (user_id, revenue) VALUES ('seeded', 2.5)",
    )
    .await;
    refused_everywhere(&env, SQLITE_REBUILD, "REAL (Real affinity)").await;
    run_printed_fix(&env).await;
    let server = env.server().await;
    apply_one_by_one(&env, &server, "u", &["0.1", "0.2"]).await;
    let http = http();
    assert_eq!(revenue_of(&http, &server.url, "u").await, "0.3");
    assert_eq!(revenue_of(&http, &server.url, "seeded").await, "2.5");
    // The rebuilt table keeps the operator's other column, and stores text.
    let path = env.data_dir.join("eps.sqlite3");
    let (note, kind): (String, String) = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("SELECT note, typeof(revenue) FROM users_revenue WHERE user_id = 'seeded'", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((note.as_str(), kind.as_str()), ("kept", "text"));
}

// ---------------------------------------------------------------------------------------------------

/// A test world whose database already has `users_revenue (COLUMNS)` (and the rows `insert` adds), as
/// an operator or the seed's SQL made it before eps ever ran.
async fn adopted(store: StoreKind, columns: &str, insert: &str) -> Env {
    let env = Env::new(store).await;
    execute(&env, &format!("CREATE TABLE users_revenue ({columns}); {insert};")).await;
    env
}

/// Runs `sql` (several statements) on the test's database.
async fn execute(env: &Env, sql: &str) {
    match env.db.kind {
        StoreKind::Sqlite => {
            std::fs::create_dir_all(&env.data_dir).unwrap();
            let conn = rusqlite::Connection::open(env.data_dir.join("eps.sqlite3")).unwrap();
            conn.execute_batch(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        StoreKind::Postgres => {
            let url = env.db.url.as_deref().unwrap();
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(connection);
            client.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        }
    }
}

fn data_dir_args(env: &Env, command: &str) -> Vec<String> {
    let mut args = vec![command.to_string(), "--data-dir".into(), env.data_dir.display().to_string()];
    args.extend(env.db.args());
    args
}

/// The statements a refusal prints after "Run these statements", one per line, as one script.
fn printed_fix(stderr: &str) -> String {
    let (_, after) = stderr
        .split_once("Run these statements")
        .unwrap_or_else(|| panic!("no statements to run in the refusal:\n{stderr}"));
    after.lines().skip(1).take_while(|l| l.starts_with("    ")).map(str::trim).collect::<Vec<_>>().join("\n")
}

/// Asserts a refusal: exit code 2, the table, the column's type and the fix statement in the message.
fn assert_refused(what: &str, code: Option<i32>, stderr: &str, fix: &str, found: &str) {
    assert_eq!(code, Some(2), "{what} was not refused as a configuration error; stderr:\n{stderr}");
    for part in ["users_revenue", found, fix] {
        assert!(stderr.contains(part), "{what}: {part:?} missing from the refusal:\n{stderr}");
    }
}

/// `eps process`, `eps process --follow`, `eps status` and `eps server` all refuse the table at
/// start-up, and the refusal leaves the database as it was (the check is repeatable).
async fn refused_everywhere(env: &Env, fix: &str, found: &str) {
    let out = env.process_unchecked(&[]).await;
    assert_refused("eps process", out.code(), &out.stderr, fix, found);
    // --follow retries an unreachable database forever; a refused table is not retried.
    let out = run_eps_limited(
        env.tmp.path(),
        &data_dir_args(env, "process").into_iter().chain(["--follow".into()]).collect::<Vec<_>>(),
        &[],
        Duration::from_secs(60),
    )
    .await
    .expect("eps process --follow kept running on a refused table");
    assert_refused("eps process --follow", out.code(), &out.stderr, fix, found);
    let out = run_eps(&data_dir_args(env, "status"), &[]).await;
    assert_refused("eps status", out.code(), &out.stderr, fix, found);
    // The server listens at once (it takes events while the database is down), then stops on the
    // refusal instead of answering 503 forever.
    let mut server = env.server().await;
    let status = server.wait(Duration::from_secs(60)).await;
    assert_refused("eps server", status.code(), &server.stderr(), fix, found);
    assert_eq!(eps_tables(env).await, Vec::<String>::new(), "a refusal changed the database");
}

/// The tables eps would have created beside `users_revenue`.
async fn eps_tables(env: &Env) -> Vec<String> {
    let sql = "SELECT name FROM (SELECT 'eps_schema_migrations' AS name UNION ALL SELECT 'eps_checkpoints') AS t";
    match env.db.kind {
        StoreKind::Sqlite => {
            let conn = rusqlite::Connection::open(env.data_dir.join("eps.sqlite3")).unwrap();
            let mut stmt = conn.prepare(&format!("{sql} WHERE name IN (SELECT name FROM sqlite_master)")).unwrap();
            stmt.query_map([], |r| r.get(0)).unwrap().map(|r| r.unwrap()).collect()
        }
        StoreKind::Postgres => {
            let url = env.db.url.as_deref().unwrap();
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(connection);
            let rows = client.query(&format!("{sql} WHERE to_regclass(name) IS NOT NULL"), &[]).await.unwrap();
            rows.iter().map(|r| r.get(0)).collect()
        }
    }
}

/// Runs the statements the refusal printed, exactly, on the test's database.
async fn run_printed_fix(env: &Env) {
    let out = run_eps(&data_dir_args(env, "status"), &[]).await;
    let script = printed_fix(&out.stderr);
    execute(env, &script).await;
    let out = run_eps(&data_dir_args(env, "status"), &[]).await;
    assert!(out.status.success(), "eps status after running the printed fix:\n{script}\n{out}");
}

/// Sends one event per value for `user` and processes after each, so each is its own batch.
async fn apply_one_by_one(env: &Env, server: &ServerProc, user: &str, values: &[&str]) {
    for (i, value) in values.iter().enumerate() {
        let file = env.write_file(&format!("event-{i}.jsonl"), &[event_line(user, "add_revenue", value)]);
        // The same value twice is the same file twice: `--new-run` makes it new events, not a re-send.
        let sent = client(Path::new(&file), &server.url, &["--new-run"]).await;
        assert!(sent.status.success(), "eps client: {sent}");
        let out = env.process(&[]).await;
        assert_eq!(applied_count(&out.stdout), 1, "{out}");
    }
}
