//! Helpers shared by the integration tests: the real `eps` binary as child processes (killed on drop),
//! a fresh data directory and a fresh database per test, and readers for the log and the stores.
//!
//! Every store test runs twice through [`store_tests!`]: on the embedded SQLite and on PostgreSQL (a
//! database `eps_it_<random hex>` created from `EPS_TEST_PG_URL` for the test and dropped after it).
//! Without `EPS_TEST_PG_URL` the PostgreSQL variants fail: run them through `scripts/test`.

#![allow(dead_code)]

pub mod browser;
pub mod fault;
pub mod nats;
pub mod pg;
pub mod shim;
pub mod tls;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::str::FromStr;
use std::time::Duration;

use rand::Rng as _;
use rust_decimal::Decimal;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

/// The token the server and client use by default (the seed's).
pub const TOKEN: &str = "secret";
/// Longest a server may take to print its address.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest any one-shot `eps` command (client, process, --help) may run.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(90);

/// Path of the binary under test.
pub fn eps_bin() -> &'static str {
    env!("CARGO_BIN_EXE_eps")
}

/// Defines `mod sqlite { #[test] fn NAME }` and `mod postgres { #[test] fn NAME }` for each
/// `async fn NAME(store: StoreKind)` listed, so each behaviour is written once and run on both stores.
#[allow(unused_macros)]
macro_rules! store_tests {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::StoreKind::Sqlite).await
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::StoreKind::Postgres).await
                }
            )+
        }
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

impl StoreKind {
    /// The store's name in fault reports.
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Sqlite => "sqlite",
            StoreKind::Postgres => "postgres",
        }
    }
}

/// Waits for `fut`, failing the test with `what` if it takes longer than `limit`.
pub async fn within<T>(limit: Duration, what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

// ---------------------------------------------------------------------------------------------------
// Databases

/// The database of one test: nothing for SQLite (the file lives in the data directory), a fresh
/// PostgreSQL database for PostgreSQL, dropped (best effort) when this value is dropped.
pub struct TestDb {
    pub kind: StoreKind,
    /// `--database-url` to pass, if any.
    pub url: Option<String>,
    pg: Option<PgDb>,
}

struct PgDb {
    admin_url: String,
    name: String,
}

/// The URL of the throwaway cluster's admin database, or a failure telling how to get one.
pub fn pg_admin_url() -> String {
    match std::env::var("EPS_TEST_PG_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "EPS_TEST_PG_URL is not set: the PostgreSQL tests need a database. Run them with scripts/test \
             (it starts a throwaway PostgreSQL), or first: eval \"$(scripts/pg-throwaway start)\""
        ),
    }
}

/// `url` with its database name replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let (base, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let authority_end = base[scheme_end..].find('/').map_or(base.len(), |i| scheme_end + i);
    format!("{}/{db}{query}", &base[..authority_end])
}

async fn pg_connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = within(
        Duration::from_secs(20),
        "connecting to PostgreSQL",
        tokio_postgres::connect(url, tokio_postgres::NoTls),
    )
    .await
    .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL at {url}: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

impl TestDb {
    pub async fn new(kind: StoreKind) -> TestDb {
        match kind {
            StoreKind::Sqlite => TestDb { kind, url: None, pg: None },
            StoreKind::Postgres => {
                let admin_url = pg_admin_url();
                let name = format!("eps_it_{:016x}", rand::rng().random::<u64>());
                let admin = pg_connect(&admin_url).await;
                admin
                    .batch_execute(&format!("CREATE DATABASE {name}"))
                    .await
                    .unwrap_or_else(|e| panic!("cannot create the test database {name}: {e:?}"));
                let url = with_database(&admin_url, &name);
                TestDb { kind, url: Some(url), pg: Some(PgDb { admin_url, name }) }
            }
        }
    }

    /// `["--database-url", URL]` for PostgreSQL, nothing for SQLite.
    pub fn args(&self) -> Vec<String> {
        match &self.url {
            Some(url) => vec!["--database-url".into(), url.clone()],
            None => vec![],
        }
    }

    /// One user's revenue exactly as the database holds it (SQLite TEXT, PostgreSQL NUMERIC as text).
    pub async fn raw_revenue(&self, data_dir: &Path, user: &str) -> Option<String> {
        let user = user.to_string();
        match self.kind {
            StoreKind::Sqlite => {
                let path = data_dir.join("eps.sqlite3");
                tokio::task::spawn_blocking(move || {
                    let conn = rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                        .ok()?;
                    conn.query_row("SELECT revenue FROM users_revenue WHERE user_id = ?1", [&user], |r| r.get(0)).ok()
                })
                .await
                .unwrap()
            }
            StoreKind::Postgres => {
                let client = pg_connect(self.url.as_deref().unwrap()).await;
                match client.query_opt("SELECT revenue::text FROM users_revenue WHERE user_id = $1", &[&user]).await {
                    Ok(row) => row.map(|r| r.get(0)),
                    // Not made yet (the processor or the server has not opened the store): no revenue.
                    Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => None,
                    Err(e) => panic!("reading {user}'s revenue: {e}"),
                }
            }
        }
    }

    /// Every user's revenue, read from the database itself (not through eps). Exactly: a total a
    /// `Decimal` cannot hold fails the test here instead of being read rounded (use `raw_revenue`).
    pub async fn revenues(&self, data_dir: &Path) -> BTreeMap<String, Decimal> {
        match self.kind {
            StoreKind::Sqlite => {
                let path = data_dir.join("eps.sqlite3");
                tokio::task::spawn_blocking(move || {
                    let conn = rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
                    let mut stmt = conn.prepare("SELECT user_id, revenue FROM users_revenue").unwrap();
                    let rows = stmt
                        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                        .unwrap()
                        .map(|r| r.unwrap())
                        .map(|(u, t)| {
                            let d =
                                Decimal::from_str_exact(&t).unwrap_or_else(|e| panic!("revenue {t:?} of {u:?}: {e}"));
                            (u, d)
                        })
                        .collect();
                    rows
                })
                .await
                .unwrap()
            }
            StoreKind::Postgres => {
                let client = pg_connect(self.url.as_deref().unwrap()).await;
                let rows = client.query("SELECT user_id, revenue::text FROM users_revenue", &[]).await.unwrap();
                rows.iter()
                    .map(|r| {
                        let u: String = r.get(0);
                        let t: String = r.get(1);
                        let d = Decimal::from_str_exact(&t).unwrap_or_else(|e| panic!("revenue {t:?} of {u:?}: {e}"));
                        (u, d)
                    })
                    .collect()
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(pg) = self.pg.take() else { return };
        // Drop runs inside the test's runtime: do the async clean-up on a thread of its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async {
                let connect = tokio_postgres::connect(&pg.admin_url, tokio_postgres::NoTls);
                let Ok(Ok((client, connection))) = tokio::time::timeout(Duration::from_secs(10), connect).await else {
                    return;
                };
                tokio::spawn(connection);
                let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", pg.name);
                let _ = tokio::time::timeout(Duration::from_secs(10), client.batch_execute(&sql)).await;
            });
        })
        .join();
    }
}

// ---------------------------------------------------------------------------------------------------
// A test's world: a data directory and a database

/// A fresh temporary directory with `data/` (the data directory) inside, and the test's database.
pub struct Env {
    pub tmp: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub db: TestDb,
}

impl Env {
    pub async fn new(kind: StoreKind) -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = tmp.path().join("data");
        Env { db: TestDb::new(kind).await, data_dir, tmp }
    }

    pub fn log_dir(&self) -> PathBuf {
        self.data_dir.join("log")
    }

    /// Starts `eps server` on this data directory and database.
    pub async fn server(&self) -> ServerProc {
        self.server_with(&[]).await
    }

    pub async fn server_with(&self, extra: &[&str]) -> ServerProc {
        self.server_with_env(extra, &[]).await
    }

    /// Starts `eps server` with extra flags and environment variables (e.g. a fault shim's).
    pub async fn server_with_env(&self, extra: &[&str], envs: &[(&str, String)]) -> ServerProc {
        let mut args: Vec<String> = vec![
            "server".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            self.data_dir.display().to_string(),
        ];
        args.extend(self.db.args());
        args.extend(extra.iter().map(|s| s.to_string()));
        ServerProc::start(&args, envs, self.tmp.path()).await
    }

    /// Runs `eps process` on this data directory and database; asserts it exits 0.
    pub async fn process(&self, extra: &[&str]) -> Output {
        let out = self.process_unchecked(extra).await;
        assert!(out.status.success(), "eps process failed: {out}");
        out
    }

    /// Starts `eps process ARGS` on this data directory and database in the background.
    pub fn spawn_process(&self, extra: &[&str]) -> ChildGuard {
        let mut args: Vec<String> = vec!["process".into(), "--data-dir".into(), self.data_dir.display().to_string()];
        args.extend(self.db.args());
        args.extend(extra.iter().map(|s| s.to_string()));
        ChildGuard::spawn(&args, &[], self.tmp.path())
    }

    pub async fn process_unchecked(&self, extra: &[&str]) -> Output {
        let mut args: Vec<String> = vec!["process".into(), "--data-dir".into(), self.data_dir.display().to_string()];
        args.extend(self.db.args());
        args.extend(extra.iter().map(|s| s.to_string()));
        run_eps(&args, &[]).await
    }

    /// Every user's revenue, straight from the database.
    pub async fn revenues(&self) -> BTreeMap<String, Decimal> {
        self.db.revenues(&self.data_dir).await
    }

    /// Writes `lines` (each without newline) to a file in the temporary directory; returns its path.
    pub fn write_file(&self, name: &str, lines: &[String]) -> PathBuf {
        let path = self.tmp.path().join(name);
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(&path, text).unwrap();
        path
    }
}

// ---------------------------------------------------------------------------------------------------
// Child processes

/// A command for the binary under test, with no `EPS_*`, `DATABASE_URL` or proxy variable inherited
/// from the environment of whoever runs the tests.
pub fn eps_command(args: &[String], envs: &[(&str, String)]) -> Command {
    eps_command_via(&[], args, envs)
}

/// [`eps_command`] run through `wrapper` (`wrapper[0] wrapper[1..] eps ARGS`, e.g. `ip netns exec NAME`).
pub fn eps_command_via(wrapper: &[&str], args: &[String], envs: &[(&str, String)]) -> Command {
    let mut cmd = match wrapper.split_first() {
        None => Command::new(eps_bin()),
        Some((program, rest)) => {
            let mut cmd = Command::new(program);
            cmd.args(rest).arg(eps_bin());
            cmd
        }
    };
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("EPS_") || k == "DATABASE_URL" || k == "RUST_LOG" || k.to_ascii_lowercase().ends_with("_proxy")
        {
            cmd.env_remove(&key);
        }
    }
    cmd.args(args).envs(envs.iter().map(|(k, v)| (k, v))).stdin(Stdio::null()).kill_on_drop(true);
    // `eps client` keeps a checkpoint per file content in its state directory: a test that does not
    // choose one gets a fresh one, so that two tests sending files of the same content (or the user's
    // own state) never resume each other's sends.
    if args.first().is_some_and(|a| a == "client") && !envs.iter().any(|(k, _)| *k == "EPS_STATE_DIR") {
        let dir =
            std::env::temp_dir().join("eps-tests-client-state").join(format!("{:016x}", rand::rng().random::<u64>()));
        cmd.env("EPS_STATE_DIR", dir);
    }
    cmd
}

/// What a finished one-shot command did.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}\n--- stdout ---\n{}\n--- stderr ---\n{}", self.status, self.stdout, self.stderr)
    }
}

impl Output {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// Runs `eps ARGS` to completion (killed and failed after [`RUN_TIMEOUT`]), in the system's temporary
/// directory (so a default `./data` never lands in the repository).
pub async fn run_eps(args: &[String], envs: &[(&str, String)]) -> Output {
    run_eps_in(&std::env::temp_dir(), args, envs).await
}

/// Runs `eps ARGS` to completion in `cwd`.
pub async fn run_eps_in(cwd: &Path, args: &[String], envs: &[(&str, String)]) -> Output {
    match run_eps_limited(cwd, args, envs, RUN_TIMEOUT).await {
        Some(out) => out,
        None => panic!("timed out after {RUN_TIMEOUT:?}: eps {}", args.join(" ")),
    }
}

/// Runs `eps ARGS` in `cwd`; `None` (and the child killed) if it is still running after `limit`.
pub async fn run_eps_limited(cwd: &Path, args: &[String], envs: &[(&str, String)], limit: Duration) -> Option<Output> {
    let mut cmd = eps_command(args, envs);
    cmd.current_dir(cwd);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().expect("cannot start the eps binary");
    // On time-out the future is dropped with the child, which kill_on_drop kills.
    let out = tokio::time::timeout(limit, child.wait_with_output()).await.ok()?.expect("waiting for eps");
    Some(Output {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

pub fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// `eps client FILE --url URL --progress quiet [extra]`; does not check the outcome.
pub async fn client(file: &Path, url: &str, extra: &[&str]) -> Output {
    let mut a = args(&["client", &file.display().to_string(), "--url", url, "--progress", "quiet"]);
    a.extend(extra.iter().map(|s| s.to_string()));
    run_eps(&a, &[]).await
}

/// A running `eps server`, killed (SIGKILL) when dropped.
pub struct ServerProc {
    pub child: Child,
    pub port: u16,
    pub url: String,
    pub stderr_path: PathBuf,
    /// Kept open so a late write to stdout cannot fail with a broken pipe.
    _stdout: BufReader<ChildStdout>,
}

impl ServerProc {
    /// Spawns `eps ARGS` (a server) in the directory `dir` and waits for its "listening on" line;
    /// stderr goes to a file in `dir` (shown when something fails).
    pub async fn start(args: &[String], envs: &[(&str, String)], dir: &Path) -> ServerProc {
        let stderr_path = dir.join(format!("server-{:08x}.stderr", rand::rng().random::<u32>()));
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut cmd = eps_command(args, envs);
        cmd.current_dir(dir);
        cmd.stdout(Stdio::piped()).stderr(Stdio::from(stderr));
        let mut child = cmd.spawn().expect("cannot start eps server");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let mut read = within(START_TIMEOUT, "the server's first stdout line", stdout.read_line(&mut line)).await;
        // A server still recovering its log says so first; "listening" follows once it is ready.
        if line.starts_with("eps server recovering the log") {
            line.clear();
            read = within(START_TIMEOUT, "the server's listening line", stdout.read_line(&mut line)).await;
        }
        let prefix = "eps server listening on http://";
        // With --tls-cert the line says https://.
        let scheme = if line.starts_with("eps server listening on https://") { "https" } else { "http" };
        let Some(addr) = line
            .trim_end()
            .strip_prefix(prefix)
            .or_else(|| line.trim_end().strip_prefix("eps server listening on https://"))
        else {
            let _ = child.start_kill();
            let _ = within(Duration::from_secs(10), "the failed server to exit", child.wait()).await;
            panic!(
                "the server did not print {prefix:?} (read {read:?}, got {line:?}); stderr:\n{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        };
        let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap_or_else(|e| panic!("port in {line:?}: {e}"));
        ServerProc { child, port, url: format!("{scheme}://127.0.0.1:{port}"), stderr_path, _stdout: stdout }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the server is still running")
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// SIGKILL, and wait until the process is gone.
    pub async fn kill(&mut self) {
        self.child.start_kill().expect("SIGKILL the server");
        within(Duration::from_secs(10), "the killed server to exit", self.child.wait()).await.unwrap();
    }

    /// Sends SIGTERM (graceful shutdown) without waiting.
    pub async fn sigterm(&self) {
        sigterm(self.pid()).await
    }

    /// Waits for the server to exit on its own.
    pub async fn wait(&mut self, limit: Duration) -> ExitStatus {
        within(limit, "the server to exit", self.child.wait()).await.unwrap()
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        // Also covered by kill_on_drop; explicit so a panicking test never leaves a server behind.
        let _ = self.child.start_kill();
    }
}

/// Sends SIGTERM to `pid` with the system's `kill`.
pub async fn sigterm(pid: u32) {
    let pid = pid.to_string();
    let status = within(Duration::from_secs(10), "kill -TERM", Command::new("kill").args(["-TERM", &pid]).status())
        .await
        .expect("running kill");
    assert!(status.success(), "kill -TERM {pid} failed");
}

/// A long-running `eps` child other than a server (e.g. `process --follow`), killed when dropped.
pub struct ChildGuard {
    pub child: Child,
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
}

impl ChildGuard {
    /// Spawns `eps ARGS` in `dir`, its stdout and stderr going to files there.
    pub fn spawn(args: &[String], envs: &[(&str, String)], dir: &Path) -> ChildGuard {
        ChildGuard::spawn_via(&[], args, envs, dir)
    }

    /// [`ChildGuard::spawn`] through `wrapper` (see [`eps_command_via`]); the wrapper must exec eps, so
    /// that killing the child kills eps.
    pub fn spawn_via(wrapper: &[&str], args: &[String], envs: &[(&str, String)], dir: &Path) -> ChildGuard {
        let tag = format!("{:08x}", rand::rng().random::<u32>());
        let stdout_path = dir.join(format!("child-{tag}.stdout"));
        let stderr_path = dir.join(format!("child-{tag}.stderr"));
        let mut cmd = eps_command_via(wrapper, args, envs);
        cmd.current_dir(dir)
            .stdout(Stdio::from(std::fs::File::create(&stdout_path).unwrap()))
            .stderr(Stdio::from(std::fs::File::create(&stderr_path).unwrap()));
        let child = cmd.spawn().expect("cannot start eps");
        ChildGuard { child, stdout_path, stderr_path }
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

// ---------------------------------------------------------------------------------------------------
// HTTP

/// A reqwest client that never uses a proxy (everything is on 127.0.0.1).
pub fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().unwrap()
}

/// `POST /events` with the default token and a JSON Lines body; status and JSON answer (status 0 and
/// `null` when the request itself failed or timed out after 30 s: a killed or unreachable server).
pub async fn post_ndjson(http: &reqwest::Client, url: &str, body: impl Into<String>) -> (u16, Value) {
    let sent = http
        .post(format!("{url}/events"))
        .header("Authorization", TOKEN)
        .header("Content-Type", "application/x-ndjson")
        .body(body.into())
        .send()
        .await;
    match sent {
        Ok(response) => {
            let status = response.status().as_u16();
            (status, response.json().await.unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}

/// `POST /liveEvent` with the default token and a JSON body; returns status and the JSON answer.
pub async fn post_event(http: &reqwest::Client, url: &str, body: &str) -> (u16, Value) {
    let response = http
        .post(format!("{url}/liveEvent"))
        .header("Authorization", TOKEN)
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST /liveEvent {body}: {e}"));
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("answer {text:?} is not JSON: {e}"));
    (status, json)
}

/// `GET /userEvents/{user}`; waits while the server answers 503 (its store still connecting).
pub async fn get_user(http: &reqwest::Client, url: &str, user: &str) -> (u16, Value) {
    within(Duration::from_secs(30), &format!("GET /userEvents/{user} to stop answering 503"), async {
        loop {
            let response = http
                .get(format!("{url}/userEvents/{user}"))
                .header("Authorization", TOKEN)
                .send()
                .await
                .unwrap_or_else(|e| panic!("GET /userEvents/{user}: {e}"));
            let status = response.status().as_u16();
            let text = response.text().await.unwrap();
            if status == 503 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("answer {text:?} is not JSON: {e}"));
            return (status, json);
        }
    })
    .await
}

/// `GET /userEvents/{user}` once, whatever the answer; the body as text.
pub async fn get_user_once(http: &reqwest::Client, url: &str, user: &str) -> (u16, String) {
    let response = http
        .get(format!("{url}/userEvents/{user}"))
        .header("Authorization", TOKEN)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET /userEvents/{user}: {e}"));
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// The revenue string of a user, asserting 200 and the answer's shape.
pub async fn revenue_of(http: &reqwest::Client, url: &str, user: &str) -> String {
    let (status, body) = get_user(http, url, user).await;
    assert_eq!(status, 200, "GET /userEvents/{user}: {body}");
    assert_eq!(body["userId"], user, "{body}");
    body["revenue"].as_str().unwrap_or_else(|| panic!("revenue is not a JSON string: {body}")).to_string()
}

// ---------------------------------------------------------------------------------------------------
// The log

/// The segment files of a log directory, sorted by base position.
pub fn segments(log_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(log_dir) else { return out };
    for entry in entries {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(digits) = name.strip_prefix("server-events-").and_then(|s| s.strip_suffix(".jsonl")) {
            if let Ok(base) = digits.parse() {
                out.push((base, entry.path()));
            }
        }
    }
    out.sort();
    out
}

/// The file name of the segment starting at `base` (as src/log/mod.rs names them).
pub fn segment_name(base: u64) -> String {
    format!("server-events-{base:020}.jsonl")
}

/// The whole log as bytes (all segments, in order).
pub fn log_bytes(log_dir: &Path) -> Vec<u8> {
    segments(log_dir).iter().flat_map(|(_, p)| std::fs::read(p).unwrap()).collect()
}

/// Every line of the log parsed as JSON.
pub fn log_lines(log_dir: &Path) -> Vec<Value> {
    let bytes = log_bytes(log_dir);
    String::from_utf8(bytes)
        .expect("the log is UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("log line {l:?} is not JSON: {e}")))
        .collect()
}

/// Writes `lines` into the log directory as segments of about `segment_bytes` each, each named by the
/// global position of its first byte. Returns (base, bytes) of each segment written.
pub fn write_log(log_dir: &Path, lines: &[String], segment_bytes: usize) -> Vec<(u64, usize)> {
    std::fs::create_dir_all(log_dir).unwrap();
    let mut written = Vec::new();
    let mut base = 0u64;
    let mut buf = Vec::new();
    let flush = |base: u64, buf: &mut Vec<u8>, written: &mut Vec<(u64, usize)>| {
        std::fs::write(log_dir.join(segment_name(base)), &buf).unwrap();
        written.push((base, buf.len()));
        let len = buf.len() as u64;
        buf.clear();
        base + len
    };
    for line in lines {
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        if buf.len() >= segment_bytes {
            base = flush(base, &mut buf, &mut written);
        }
    }
    if !buf.is_empty() || written.is_empty() {
        flush(base, &mut buf, &mut written);
    }
    written
}

/// An event line in the seed's format.
pub fn event_line(user: &str, name: &str, value: &str) -> String {
    format!(r#"{{"userId":{},"name":"{name}","value":{value}}}"#, serde_json::to_string(user).unwrap())
}

/// The signed change of an event value written as JSON number text (plain or with an exponent).
pub fn decimal_of(text: &str) -> Decimal {
    if text.contains(['e', 'E']) {
        Decimal::from_scientific(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    } else {
        Decimal::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }
}

/// Sum per user of `(user, name, value text)` events, computed here, independently of eps.
pub fn expected_totals<'a>(events: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>) -> BTreeMap<String, Decimal> {
    let mut totals = BTreeMap::new();
    for (user, name, value) in events {
        let v = decimal_of(value);
        let delta = match name {
            "add_revenue" => v,
            "subtract_revenue" => -v,
            other => panic!("unknown name {other}"),
        };
        *totals.entry(user.to_string()).or_insert(Decimal::ZERO) += delta;
    }
    totals
}

/// Asserts two revenue maps are equal as numbers (7.50 == 7.5), naming the first differences.
pub fn assert_totals(got: &BTreeMap<String, Decimal>, want: &BTreeMap<String, Decimal>) {
    let mut diffs = Vec::new();
    for (user, w) in want {
        match got.get(user) {
            Some(g) if g == w => {}
            other => diffs.push(format!("{user}: want {w}, got {other:?}")),
        }
    }
    for user in got.keys().filter(|u| !want.contains_key(*u)) {
        diffs.push(format!("{user}: unexpected user with {}", got[user]));
    }
    assert!(
        diffs.is_empty(),
        "{} of {} users differ; first: {:?}",
        diffs.len(),
        want.len(),
        &diffs[..diffs.len().min(10)]
    );
}

/// The number N in "applied N events" of a processor summary.
pub fn applied_count(summary: &str) -> u64 {
    let rest = summary.split("applied ").nth(1).unwrap_or_else(|| panic!("no 'applied N' in {summary:?}"));
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

/// The number N in "N conflicts" of a processor summary: batches another processor committed first.
pub fn conflict_count(summary: &str) -> u64 {
    let before = summary.split(" conflicts").next().filter(|b| b.len() < summary.len());
    let before = before.unwrap_or_else(|| panic!("no 'N conflicts' in {summary:?}"));
    before.rsplit(' ').next().unwrap().parse().unwrap_or_else(|e| panic!("conflicts in {summary:?}: {e}"))
}
