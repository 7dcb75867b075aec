//! Fault-injection suite, infrastructure faults (issue 3, scenarios 5-7): what happens to eps when what
//! it stands on fails, rather than eps itself.
//!
//! - `database_outage_mid_run`: PostgreSQL is stopped under a running server and `eps process --follow`,
//!   alternately crashed (`pg_ctl stop -m immediate`: connections cut with no goodbye, WAL recovery at
//!   restart) and shut down (`-m fast`), and started again. Reads answer 503 meanwhile, ingest goes on, the processor
//!   resumes by itself, and the totals are exact.
//! - `disk_full`: the data directory lives on a small tmpfs that is filled up. The server answers 503 with
//!   `Retry-After` for what it cannot make durable, never 200, leaves no partial line, stays up, and takes
//!   events again as soon as space returns.
//! - `lost_acknowledgements`: a proxy between client and server swallows a deterministic subset of the
//!   server's answers after the server has synced the event. The client retries, the server answers
//!   `duplicate`, and every event is in the log exactly once.
//!
//! Every scenario has a fixed seed (`EPS_FAULT_SEED` replays another), a short version for `cargo test`
//! and a long one with `EPS_FAULT_LONG=1`, writes a `fault::Report` and asserts exact totals. Every event of
//! a scenario has the same value ([`UNIT`]), so `fault::tally` counts lost and doubled events.
//! Everything listens on 127.0.0.1 only.

use crate::common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fault::{self, Report};
use common::pg::PgCluster;
use common::*;
use rand::{Rng as _, SeedableRng as _};
use rust_decimal::Decimal;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The value of every event (so a difference in a total is a whole number of events).
const UNIT: &str = "1.25";

fn unit() -> Decimal {
    Decimal::from_str(UNIT).unwrap()
}

// ---------------------------------------------------------------------------------------------------
// Events

/// One event of a scenario: its user and its id (the value is always [`UNIT`]).
#[derive(Debug, Clone)]
struct Ev {
    user: String,
    id: String,
}

impl Ev {
    /// The request body / input line, with its own id.
    fn line(&self) -> String {
        format!(r#"{{"userId":"{}","name":"add_revenue","value":{UNIT},"id":"{}"}}"#, self.user, self.id)
    }
}

/// `count` events numbered from `first`, spread pseudo-randomly (from `seed`) over `users` users.
fn make_events(scenario: &str, seed: u64, first: usize, count: usize, users: usize) -> Vec<Ev> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (first as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    (first..first + count)
        .map(|i| Ev {
            user: format!("{scenario}-u{}", rng.random_range(0..users)),
            id: format!("{scenario}-{seed}-{i}"),
        })
        .collect()
}

fn totals_of<'a>(events: impl IntoIterator<Item = &'a Ev>) -> BTreeMap<String, Decimal> {
    expected_totals(events.into_iter().map(|e| (e.user.as_str(), "add_revenue", UNIT)))
}

fn write_events(dir: &Path, name: &str, events: &[Ev]) -> PathBuf {
    let path = dir.join(name);
    let mut text = String::with_capacity(events.len() * 96);
    for e in events {
        text.push_str(&e.line());
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
    path
}

/// `(sent, accepted, duplicates, rejected, invalid, failed)` of an `eps client` summary line.
fn client_counts(out: &Output) -> [u64; 6] {
    let line = out.stdout.lines().find(|l| l.starts_with("sent ")).unwrap_or_else(|| panic!("no summary: {out}"));
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit() && c != '.')
        .filter(|s| !s.is_empty() && !s.contains('.'))
        .map(|s| s.parse().unwrap())
        .collect();
    assert!(numbers.len() >= 6, "cannot read the summary {line:?}");
    [numbers[0], numbers[1], numbers[2], numbers[3], numbers[4], numbers[5]]
}

/// Runs `eps client FILE --url URL --progress quiet EXTRA`, killed and failed after `limit`.
async fn run_client(file: &Path, url: &str, extra: &[&str], limit: Duration) -> Output {
    let mut a = args(&["client", &file.display().to_string(), "--url", url, "--progress", "quiet"]);
    a.extend(extra.iter().map(|s| s.to_string()));
    match run_eps_limited(&std::env::temp_dir(), &a, &[], limit).await {
        Some(out) => out,
        None => panic!("timed out after {limit:?}: eps {}", a.join(" ")),
    }
}

/// Ids of the log's lines, each with how often it occurs; fails on any line that is not a whole event.
fn log_id_counts(log_dir: &Path) -> HashMap<String, u32> {
    let bytes = log_bytes(log_dir);
    assert!(bytes.is_empty() || bytes.ends_with(b"\n"), "the log ends with a partial line: {:?}", tail(&bytes));
    let text = String::from_utf8(bytes).expect("the log is UTF-8");
    let mut ids = HashMap::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("torn or invalid log line {line:?}: {e}"));
        let id = v["id"].as_str().unwrap_or_else(|| panic!("log line without id: {line}"));
        assert_eq!(v["value"].to_string(), UNIT, "{line}");
        *ids.entry(id.to_string()).or_insert(0) += 1;
    }
    ids
}

fn tail(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(200)..]).into_owned()
}

/// One request's answer, whatever it is.
#[derive(Debug)]
struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: String,
    took: Duration,
}

async fn send(request: reqwest::RequestBuilder) -> Result<Answer, String> {
    let start = Instant::now();
    let response = request.header("Authorization", TOKEN).send().await.map_err(|e| format!("{e:?}"))?;
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap_or("<not text>").to_string());
    let body = response.text().await.map_err(|e| format!("reading the body: {e:?}"))?;
    Ok(Answer { status, retry_after, body, took: start.elapsed() })
}

async fn post(http: &reqwest::Client, url: &str, ev: &Ev) -> Result<Answer, String> {
    send(http.post(format!("{url}/liveEvent")).header("Content-Type", "application/json").body(ev.line())).await
}

async fn get(http: &reqwest::Client, url: &str, user: &str) -> Result<Answer, String> {
    send(http.get(format!("{url}/userEvents/{user}"))).await
}

/// Asserts a 503 has `Retry-After` (whole seconds, at least 1) and a JSON body with an `error` string.
fn assert_proper_503(what: &str, a: &Answer) {
    assert_eq!(a.status, 503, "{what}: {a:?}");
    let after = a.retry_after.as_deref().unwrap_or_else(|| panic!("{what}: 503 without Retry-After: {a:?}"));
    assert!(after.trim().parse::<u64>().is_ok_and(|s| s >= 1), "{what}: Retry-After {after:?} is not whole seconds");
    let body: Value =
        serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("{what}: 503 body {:?} is not JSON: {e}", a.body));
    assert!(body["error"].as_str().is_some_and(|s| !s.is_empty()), "{what}: 503 body without an error string: {body}");
}

/// Asserts a 200 to a new event (not a duplicate).
fn assert_stored(what: &str, a: &Answer) {
    assert_eq!(a.status, 200, "{what}: {a:?}");
    let body: Value = serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("{what}: body {:?}: {e}", a.body));
    assert_eq!(body["message"], "Event received", "{what}: {body}");
    assert!(body.get("duplicate").is_none(), "{what}: a new event answered as a duplicate: {body}");
}

fn no_proxy_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(timeout).build().unwrap()
}

// ---------------------------------------------------------------------------------------------------
// 5. database_outage_mid_run

/// A PostgreSQL cluster of this test alone, made by `scripts/pg-throwaway start` and removed by
/// `scripts/pg-throwaway stop` when dropped (also when the test fails).
impl PgCluster {
    /// `pg_ctl stop -m MODE` (`fast`: a clean shutdown; `immediate`: a crash): the cluster is down, its
    /// data kept.
    async fn pause(&self, mode: &str) -> Duration {
        self.script("pause", &[mode]).await
    }

    /// Starts the same cluster again on the same port.
    async fn resume(&self) -> Duration {
        self.script("resume", &[]).await
    }

    /// `(position, events_applied)` of the processor's checkpoint, if any.
    async fn checkpoint(&self) -> Option<(i64, i64)> {
        Self::checkpoint_with(&self.connect().await).await
    }

    async fn checkpoint_with(client: &tokio_postgres::Client) -> Option<(i64, i64)> {
        let row = client
            .query_opt("SELECT position, events_applied FROM eps_checkpoints WHERE stream = 'file'", &[])
            .await
            .ok()??;
        Some((row.get(0), row.get(1)))
    }

    async fn revenues(&self) -> BTreeMap<String, Decimal> {
        let client = self.connect().await;
        let rows = client.query("SELECT user_id, revenue::text FROM users_revenue", &[]).await.unwrap();
        rows.iter()
            .map(|r| {
                let (u, t): (String, String) = (r.get(0), r.get(1));
                let d = Decimal::from_str(&t).unwrap_or_else(|e| panic!("revenue {t:?} of {u:?}: {e}"));
                (u, d)
            })
            .collect()
    }
}

/// Only a guard against a request that hangs while the database is down (it must answer 503 and
/// Retry-After, which `assert_proper_503` checks): generous, so a loaded machine cannot fail it; how
/// long the answers took is reported, not asserted.
const OUTAGE_ANSWER_LIMIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_outage_mid_run() {
    const SCENARIO: &str = "database_outage_mid_run";
    let seed = fault::seed(SCENARIO);
    let started = Instant::now();
    // At least one crash (-m immediate) and one clean shutdown (-m fast), alternately.
    let outages = fault::scaled(2usize, 6);
    let outage_for = fault::scaled(Duration::from_secs(3), Duration::from_secs(5));
    let per_part = fault::scaled(1_000usize, 20_000);
    let users = fault::scaled(50usize, 500);

    let pg = PgCluster::start(&[]).await;
    let env = Env::new(StoreKind::Sqlite).await; // a data directory; the database is `pg`
    let db = ["--database-url", pg.url.as_str()];
    let server = env.server_with(&db).await;
    let mut processor = env.spawn_process(&["--follow", "--database-url", &pg.url]);
    let http = no_proxy_client(Duration::from_secs(20));

    let mut sent: Vec<Ev> = Vec::new();
    let next_part = |sent: &mut Vec<Ev>, n: usize| {
        let part = make_events(SCENARIO, seed, sent.len(), n, users);
        sent.extend(part.iter().cloned());
        part
    };
    let send_part = |part: Vec<Ev>, name: String| {
        let file = write_events(env.tmp.path(), &name, &part);
        let url = server.url.clone();
        async move {
            let limit = fault::scaled(Duration::from_secs(60), Duration::from_secs(240));
            let out = run_client(&file, &url, &["--concurrency", "64"], limit).await;
            assert!(out.status.success(), "eps client ({name}): {out}");
            let [s, accepted, ..] = client_counts(&out);
            assert_eq!((s, accepted), (part.len() as u64, part.len() as u64), "eps client ({name}): {out}");
        }
    };

    // The database works before the outage: reads are answered (200 or 404, not 503).
    let (status, body) = get_user(&http, &server.url, &format!("{SCENARIO}-u0")).await;
    assert!(status == 200 || status == 404, "GET before the outage: {status} {body}");

    let mut probes = 0u64;
    let mut slowest_probe = Duration::ZERO;
    let mut posts_during_outage = 0u64;
    let mut down_total = Duration::ZERO;
    for outage in 0..outages {
        // The database goes while a client is sending and the processor applying: once the processor
        // has applied half of this client's events.
        let target = (sent.len() + per_part / 2) as i64;
        let part = next_part(&mut sent, per_part);
        let client_before = tokio::spawn(send_part(part, format!("before-{outage}.jsonl")));
        let watcher = pg.connect().await;
        within(Duration::from_secs(60), "the processor to apply half of the client's events", async {
            while PgCluster::checkpoint_with(&watcher).await.is_none_or(|(_, applied)| applied < target) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        drop(watcher);

        let mode = if outage % 2 == 0 { "immediate" } else { "fast" };
        let stop_took = pg.pause(mode).await;
        eprintln!("outage {outage}: PostgreSQL stopped (-m {mode}) in {stop_took:?}");
        let outage_started = Instant::now();
        // During the outage: a client run, single POSTs and reads, all at once.
        let part = next_part(&mut sent, per_part);
        let client_run = send_part(part, format!("during-{outage}.jsonl"));
        let mut singles: Vec<Ev> = Vec::new();
        let probing = async {
            let mut i = 0usize;
            while outage_started.elapsed() < outage_for {
                let user = format!("{SCENARIO}-u{}", i % users);
                let a =
                    within(OUTAGE_ANSWER_LIMIT, "GET /userEvents during the outage", get(&http, &server.url, &user))
                        .await
                        .unwrap_or_else(|e| panic!("GET /userEvents/{user} during the outage: {e}"));
                assert_proper_503(&format!("GET /userEvents/{user} during outage {outage}"), &a);
                probes += 1;
                slowest_probe = slowest_probe.max(a.took);

                let ev = Ev {
                    user: format!("{SCENARIO}-u{}", (i * 7) % users),
                    id: format!("{SCENARIO}-{seed}-single-{outage}-{i}"),
                };
                let a = within(OUTAGE_ANSWER_LIMIT, "POST /liveEvent during the outage", post(&http, &server.url, &ev))
                    .await
                    .unwrap_or_else(|e| panic!("POST during the outage: {e}"));
                assert_stored(&format!("POST /liveEvent during outage {outage}"), &a);
                singles.push(ev);
                i += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let (before, (), ()) = tokio::join!(client_before, client_run, probing);
        before.expect("the client run started before the outage");
        posts_during_outage += singles.len() as u64;
        sent.extend(singles);
        assert!(
            processor.child.try_wait().unwrap().is_none(),
            "eps process --follow exited during the outage:\n{}",
            processor.stderr()
        );

        let start_took = pg.resume().await;
        down_total += outage_started.elapsed();
        eprintln!(
            "outage {outage}: PostgreSQL down for {:?}, started again in {start_took:?}",
            outage_started.elapsed()
        );
        // Reads work again without restarting the server (200, or 404 for a user not applied yet).
        let (status, body) = get_user(&http, &server.url, &format!("{SCENARIO}-u0")).await;
        assert!(status == 200 || status == 404, "GET after the outage: {status} {body}");
    }
    // Traffic after the last outage.
    let part = next_part(&mut sent, per_part);
    send_part(part, "after.jsonl".into()).await;

    // The processor catches up by itself: its checkpoint reaches the end of the log.
    let log_end = log_bytes(&env.log_dir()).len() as i64;
    let caught_up =
        within(fault::scaled(Duration::from_secs(60), Duration::from_secs(180)), "the processor to catch up", async {
            loop {
                if let Some((position, applied)) = pg.checkpoint().await {
                    if position >= log_end {
                        return applied;
                    }
                }
                if let Some(status) = processor.child.try_wait().unwrap() {
                    panic!("eps process --follow exited ({status}):\n{}", processor.stderr());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
    let processor_stderr = processor.stderr();
    sigterm(processor.child.id().unwrap()).await;
    let status =
        within(Duration::from_secs(20), "eps process to stop on SIGTERM", processor.child.wait()).await.unwrap();
    assert!(status.success(), "eps process --follow: {status}\n{}", processor.stderr());

    let expected = totals_of(&sent);
    let actual = pg.revenues().await;
    let t = fault::tally(&expected, &actual, unit());
    Report {
        scenario: SCENARIO,
        store: "postgres",
        seed,
        events_sent: sent.len() as u64,
        kills: outages as u64,
        events_lost: t.events_lost,
        events_doubled: t.events_doubled,
        duration: started.elapsed(),
        notes: format!(
            "PostgreSQL stopped {outages} time(s) (pg_ctl stop -m immediate and -m fast alternately), {:.1}s down in all, under a running server and \
             eps process --follow; {probes} reads during the outages all answered 503 + Retry-After (slowest {slowest_probe:?}), \
             {posts_during_outage} single POSTs and {per_part} client events per outage were taken meanwhile; the processor \
             resumed by itself",
            down_total.as_secs_f64()
        ),
        ..Report::default()
    }
    .write();
    eprintln!(
        "{SCENARIO}: {} events, {outages} outages, {probes} probes (slowest {slowest_probe:?}), lost {}, doubled {}, {:?}",
        sent.len(),
        t.events_lost,
        t.events_doubled,
        started.elapsed()
    );

    assert!(probes > 0, "no read was made during the outage");
    assert!(
        processor_stderr.contains("database unavailable"),
        "the processor never met the outage (no 'database unavailable' in its log):\n{processor_stderr}"
    );
    assert_eq!((t.events_lost, t.events_doubled), (0, 0), "{t:?}");
    assert!(t.exact(), "{t:?}");
    assert_totals(&actual, &expected);
    assert_eq!(caught_up, sent.len() as i64, "events_applied in the checkpoint row");
    // Reads through the server agree with the database.
    for (user, want) in expected.iter().take(20) {
        let got = revenue_of(&http, &server.url, user).await;
        assert_eq!(Decimal::from_str(&got).unwrap(), *want, "GET /userEvents/{user}");
    }
    let ids = log_id_counts(&env.log_dir());
    assert_eq!(ids.len(), sent.len(), "distinct ids in the log");
    assert!(ids.values().all(|&n| n == 1), "an id is in the log twice");
    drop(server);
}

// ---------------------------------------------------------------------------------------------------
// 6. disk_full

/// A tmpfs mounted for the test, lazily unmounted when dropped (also when the test fails).
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .unwrap_or_else(|e| panic!("disk_full needs `mount` (and root): cannot run it: {e}"));
        assert!(
            out.status.success(),
            "disk_full needs to mount a small tmpfs (run the tests as root, or in a container with CAP_SYS_ADMIN): \
             `mount -t tmpfs -o size={size} tmpfs {}` failed ({}): {}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Tmpfs { path: path.to_path_buf() }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let status = std::process::Command::new("umount").arg("-l").arg(&self.path).status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("could not unmount {}: {status:?}", self.path.display());
        }
    }
}

/// Fills the file system holding `path` with a file at `path`, then gives back `leave` bytes.
/// Returns the filler's size.
fn fill_leaving(path: &Path, leave: u64) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0xA5u8; 64 * 1024];
    let mut len = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => len += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("writing the filler {}: {e}", path.display()),
        }
    }
    assert!(len > leave, "the tmpfs is too small: only {len} bytes free, {leave} to leave");
    f.set_len(len - leave).unwrap();
    f.sync_all().unwrap();
    len - leave
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disk_full() {
    const SCENARIO: &str = "disk_full";
    let seed = fault::seed(SCENARIO);
    let started = Instant::now();
    let cycles = fault::scaled(1usize, 30);
    // Free space left by the filler in each cycle, drawn from the seed so the disk runs out at a
    // different place in a line each time.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let after_free = fault::scaled(200usize, 400);
    let concurrency = 16usize;
    let users = 40usize;

    let tmp = tempfile::tempdir().unwrap();
    let mnt = Tmpfs::mount(&tmp.path().join("mnt"), "4m");
    let data_dir = mnt.path.join("data");
    // The store lives outside the small disk: only the log fills it.
    let store_dir = tmp.path().join("store");
    std::fs::create_dir_all(&store_dir).unwrap();
    let db_url = format!("sqlite://{}", store_dir.join("eps.sqlite3").display());
    let server_args = args(&[
        "server",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &data_dir.display().to_string(),
        "--database-url",
        &db_url,
        // Small segments, so that segments are also started while the disk is full.
        "--segment-bytes",
        "32768",
    ]);
    let mut server = ServerProc::start(&server_args, &[], tmp.path()).await;
    let log_dir = data_dir.join("log");
    let filler = mnt.path.join("filler");
    let http = no_proxy_client(Duration::from_secs(20));

    let mut acknowledged: Vec<Ev> = Vec::new();
    let mut attempted = 0usize;
    let mut refused = 0u64;
    let mut resent = 0usize;
    let mut next = 0usize;
    let mut take = |n: usize| {
        let evs = make_events(SCENARIO, seed, next, n, users);
        next += n;
        evs
    };

    for cycle in 0..cycles {
        let leave: u64 = rng.random_range(8 * 1024..64 * 1024);
        let filled = fill_leaving(&filler, leave);
        eprintln!("cycle {cycle}: filler of {filled} bytes, {leave} bytes left");

        // POST until the server says it cannot store, and a little longer.
        let mut batches_with_503 = 0;
        let mut refused_this_cycle: Vec<Ev> = Vec::new();
        let cap = (leave as usize / 50) + 2_000;
        let mut sent_this_cycle = 0usize;
        while batches_with_503 < 3 {
            assert!(
                sent_this_cycle < cap,
                "{sent_this_cycle} events sent in cycle {cycle} with {leave} bytes free and not one 503: is the disk \
                 full?\nserver stderr:\n{}",
                server.stderr()
            );
            let batch = take(concurrency);
            attempted += batch.len();
            sent_this_cycle += batch.len();
            let answers = within(
                Duration::from_secs(30),
                "POSTs on a full disk",
                futures::future::join_all(batch.iter().map(|ev| post(&http, &server.url, ev))),
            )
            .await;
            let mut any_503 = false;
            for (ev, answer) in batch.into_iter().zip(answers) {
                let a = answer.unwrap_or_else(|e| {
                    panic!("POST on a full disk got no answer: {e}\nserver stderr:\n{}", server.stderr())
                });
                match a.status {
                    200 => {
                        assert_stored("POST on a nearly full disk", &a);
                        acknowledged.push(ev);
                    }
                    _ => {
                        assert_proper_503("POST on a full disk", &a);
                        any_503 = true;
                        refused_this_cycle.push(ev);
                    }
                }
            }
            if any_503 {
                batches_with_503 += 1;
            }
        }
        refused += refused_this_cycle.len() as u64;

        // While the disk is full: the server is up, answers reads, and its log holds exactly the
        // acknowledged events, each once, with no partial line at the end.
        assert!(server.child.try_wait().unwrap().is_none(), "the server died on a full disk:\n{}", server.stderr());
        let (status, body) = get_user(&http, &server.url, &format!("{SCENARIO}-u0")).await;
        assert!(status == 404 || status == 200, "GET /userEvents on a full disk: {status} {body}");
        assert!(
            server.stderr().contains("No space left on device"),
            "the server did not log the cause of its 503s:\n{}",
            server.stderr()
        );
        let ids = log_id_counts(&log_dir);
        let want: HashSet<&str> = acknowledged.iter().map(|e| e.id.as_str()).collect();
        let have: HashSet<&str> = ids.keys().map(|s| s.as_str()).collect();
        let missing: Vec<_> = want.difference(&have).take(5).collect();
        let extra: Vec<_> = have.difference(&want).take(5).collect();
        assert!(missing.is_empty(), "acknowledged but not in the log (first few): {missing:?}");
        assert!(extra.is_empty(), "in the log but answered 503 (first few): {extra:?}");
        assert!(ids.values().all(|&n| n == 1), "an id is in the log twice");
        eprintln!(
            "cycle {cycle}: {sent_this_cycle} POSTs, {} answered 503, log at {} events",
            refused_this_cycle.len(),
            acknowledged.len()
        );

        // Space returns: events are taken again, by the same server. First the refused ones, with the
        // same ids (what a retrying client does): they were not stored, so they must be stored now, not
        // answered `duplicate` (which would lose them).
        std::fs::remove_file(&filler).unwrap();
        resent += refused_this_cycle.len();
        let mut batch = std::mem::take(&mut refused_this_cycle);
        batch.extend(take(after_free));
        attempted += after_free;
        for chunk in batch.chunks(concurrency) {
            let answers = within(
                Duration::from_secs(30),
                "POSTs after space returned",
                futures::future::join_all(chunk.iter().map(|ev| post(&http, &server.url, ev))),
            )
            .await;
            for (ev, answer) in chunk.iter().zip(answers) {
                let a = answer.unwrap_or_else(|e| panic!("POST after space returned: {e}"));
                assert_stored("POST after space returned (no restart)", &a);
                acknowledged.push(ev.clone());
            }
        }
    }

    server.sigterm().await;
    let status = server.wait(Duration::from_secs(30)).await;
    assert!(status.success(), "the server's exit after a full disk: {status}\n{}", server.stderr());
    let server_log = server.stderr();
    let segments_started = server_log.matches("started a new log segment").count();
    let failed_appends = server_log.matches("log append failed").count();
    let failed_rolls = server_log.matches("cannot start a new log segment").count();
    eprintln!(
        "{SCENARIO}: server log: {segments_started} segments started, {failed_appends} failed appends, \
         {failed_rolls} failed segment starts"
    );

    let ids = log_id_counts(&log_dir);
    assert_eq!(ids.len(), acknowledged.len(), "events in the log vs acknowledged");
    assert!(acknowledged.iter().all(|e| ids.get(&e.id) == Some(&1)), "an acknowledged event is missing or twice");

    let process_args = args(&["process", "--data-dir", &data_dir.display().to_string(), "--database-url", &db_url]);
    let out = run_eps(&process_args, &[]).await;
    assert!(out.status.success(), "eps process: {out}");
    assert_eq!(applied_count(&out.stdout), acknowledged.len() as u64, "{out}");
    assert!(out.stdout.contains(" 0 invalid lines"), "{out}");

    let expected = totals_of(&acknowledged);
    let actual = TestDb::new(StoreKind::Sqlite).await.revenues(&store_dir).await;
    let t = fault::tally(&expected, &actual, unit());
    Report {
        scenario: SCENARIO,
        store: "sqlite",
        seed,
        events_sent: attempted as u64,
        events_lost: t.events_lost,
        events_doubled: t.events_doubled,
        bad_inputs: 0,
        duration: started.elapsed(),
        notes: format!(
            "data directory on a 4 MiB tmpfs filled {cycles} time(s) to 8-64 KiB free: {refused} POSTs answered \
             503 + Retry-After, none answered 200 without being in the log, no partial line; after freeing space the \
             same server (no restart) stored the {resent} refused events (same ids) and {} new ones; {} acknowledged \
             events applied exactly",
            cycles * after_free,
            acknowledged.len()
        ),
        ..Report::default()
    }
    .write();
    eprintln!(
        "{SCENARIO}: {attempted} POSTs, {} acknowledged, {refused} refused (503), lost {}, doubled {}, {:?}",
        acknowledged.len(),
        t.events_lost,
        t.events_doubled,
        started.elapsed()
    );
    assert!(refused > 0, "the server never answered 503");
    assert_eq!((t.events_lost, t.events_doubled), (0, 0), "{t:?}");
    assert!(t.exact(), "{t:?}");
    assert_totals(&actual, &expected);
    drop(server);
    drop(mnt);
}

// ---------------------------------------------------------------------------------------------------
// 7. lost_acknowledgements

/// Percentage of requests whose answer the proxy swallows.
const CUT_PERCENT: u64 = 30;
/// The proxy swallows at most this many answers for one event id (so no event runs out of attempts).
const MAX_CUTS_PER_ID: u32 = 3;

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Whether the proxy swallows the answer to the `attempt`-th (0-based) request carrying `id`: a pure
/// function of seed, id and attempt, so the same events are cut in every run with the same seed.
fn cut(seed: u64, id: &str, attempt: u32) -> bool {
    attempt < MAX_CUTS_PER_ID && splitmix(seed ^ splitmix(fnv1a(id) ^ splitmix(u64::from(attempt)))) % 100 < CUT_PERCENT
}

#[derive(Default)]
struct ProxyStats {
    connections: AtomicU64,
    /// Requests forwarded whose full answer came back from the server.
    forwarded: AtomicU64,
    /// Of those, answers swallowed (connection closed instead).
    cut: AtomicU64,
    /// Answers from the server other than 200.
    not_200: AtomicU64,
    /// Connections that failed somewhere (client gone, server unreachable, malformed request).
    errors: AtomicU64,
    attempts: Mutex<HashMap<String, u32>>,
    first_error: Mutex<Option<String>>,
}

/// A TCP proxy on 127.0.0.1:0 in front of the server: one request per connection; for the requests
/// [`cut`] picks, it forwards the request, reads the server's whole answer (so the event is synced) and
/// closes the client's connection without a byte of it.
struct CuttingProxy {
    url: String,
    stats: Arc<ProxyStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CuttingProxy {
    async fn start(upstream: SocketAddr, seed: u64) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stats = Arc::new(ProxyStats::default());
        let shared = stats.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let stats = shared.clone();
                stats.connections.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let outcome =
                        tokio::time::timeout(Duration::from_secs(30), proxy_one(stream, upstream, seed, &stats))
                            .await
                            .unwrap_or_else(|_| Err("timed out".into()));
                    if let Err(e) = outcome {
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                        stats.first_error.lock().unwrap().get_or_insert(e);
                    }
                });
            }
        });
        CuttingProxy { url, stats, task }
    }
}

/// Reads one HTTP/1.1 message (head and `Content-Length` body) from `stream`.
async fn read_message(stream: &mut TcpStream) -> Result<Option<(String, Vec<u8>)>, String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await.map_err(|e| format!("reading: {e}"))?;
        if n == 0 {
            return if buf.is_empty() { Ok(None) } else { Err("connection closed inside a message head".into()) };
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 64 * 1024 {
            return Err("message head too large".into());
        }
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).map_err(|_| "head is not UTF-8".to_string())?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim().eq_ignore_ascii_case("content-length").then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await.map_err(|e| format!("reading a body: {e}"))?;
        if n == 0 {
            return Err(format!("connection closed after {} of {length} body bytes", body.len()));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    Ok(Some((head, body)))
}

/// `head` without its `Connection` header and with `Connection: close` (one message per connection).
fn with_connection_close(head: &str) -> String {
    let mut out = String::with_capacity(head.len() + 20);
    for line in head.trim_end_matches("\r\n").split("\r\n") {
        if line.split_once(':').is_some_and(|(name, _)| name.trim().eq_ignore_ascii_case("connection")) {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out
}

async fn proxy_one(mut client: TcpStream, upstream: SocketAddr, seed: u64, stats: &ProxyStats) -> Result<(), String> {
    let Some((head, body)) = read_message(&mut client).await? else { return Ok(()) };
    // A request is named by its first event's id: the only one for `POST /liveEvent`, the first line
    // of a `POST /events` batch.
    let first_line = body.split(|&b| b == b'\n').next().unwrap_or_default();
    let id = serde_json::from_slice::<Value>(first_line).ok().and_then(|v| v["id"].as_str().map(str::to_string));
    let swallow = match &id {
        Some(id) => {
            let mut attempts = stats.attempts.lock().unwrap();
            let n = attempts.entry(id.clone()).or_insert(0);
            let attempt = *n;
            *n += 1;
            cut(seed, id, attempt)
        }
        None => false,
    };
    let mut server = TcpStream::connect(upstream).await.map_err(|e| format!("connecting to the server: {e}"))?;
    server.set_nodelay(true).ok();
    let mut request = with_connection_close(&head).into_bytes();
    request.extend_from_slice(&body);
    server.write_all(&request).await.map_err(|e| format!("forwarding a request: {e}"))?;
    let (answer_head, answer_body) =
        read_message(&mut server).await?.ok_or_else(|| "the server closed without answering".to_string())?;
    stats.forwarded.fetch_add(1, Ordering::Relaxed);
    if !answer_head.starts_with("HTTP/1.1 200 ") {
        stats.not_200.fetch_add(1, Ordering::Relaxed);
        stats.first_error.lock().unwrap().get_or_insert(format!(
            "the server answered {:?} {}",
            answer_head.lines().next(),
            String::from_utf8_lossy(&answer_body)
        ));
    }
    if swallow {
        // The server has answered (so the event is synced); the client never hears of it.
        stats.cut.fetch_add(1, Ordering::Relaxed);
        drop(client);
        return Ok(());
    }
    let mut response = with_connection_close(&answer_head).into_bytes();
    response.extend_from_slice(&answer_body);
    client.write_all(&response).await.map_err(|e| format!("answering the client: {e}"))?;
    let _ = client.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_acknowledgements() {
    lost_acknowledgements_with("lost_acknowledgements", 1).await
}

/// The same with the client's batches (`POST /events`): a swallowed answer makes the client resend the
/// whole batch, and every event of it is answered duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_acknowledgements_of_batches() {
    lost_acknowledgements_with("lost_acknowledgements_of_batches", 50).await
}

async fn lost_acknowledgements_with(scenario: &'static str, batch: usize) {
    let seed = fault::seed(scenario);
    let started = Instant::now();
    let count = fault::scaled(5_000usize, 100_000);
    let users = fault::scaled(100usize, 1_000);

    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server().await;
    let proxy = CuttingProxy::start(SocketAddr::from(([127, 0, 0, 1], server.port)), seed).await;
    let events = make_events(scenario, seed, 0, count, users);
    let file = write_events(env.tmp.path(), "events.jsonl", &events);
    // Every request whose first answer is swallowed is retried and then answered `duplicate` for each
    // of its events. The client's requests are the file's events in runs of `batch`.
    let requests = || events.chunks(batch);
    let expected_duplicates = requests().filter(|r| cut(seed, &r[0].id, 0)).map(|r| r.len() as u64).sum::<u64>();
    let expected_cuts: u64 = requests().map(|r| (0..).take_while(|&a| cut(seed, &r[0].id, a)).count() as u64).sum();
    let batch_arg = batch.to_string();

    let out = run_client(
        &file,
        &proxy.url,
        // A long per-request timeout: a slow answer must not be retried, so that every duplicate
        // comes from a swallowed answer and the count below is exact.
        &["--batch", &batch_arg, "--concurrency", "128", "--max-attempts", "10", "--timeout-secs", "60"],
        fault::scaled(Duration::from_secs(90), Duration::from_secs(300)),
    )
    .await;
    let proxy_error = proxy.stats.first_error.lock().unwrap().clone();
    let stat = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let (cuts, forwarded, not_200, errors) =
        (stat(&proxy.stats.cut), stat(&proxy.stats.forwarded), stat(&proxy.stats.not_200), stat(&proxy.stats.errors));
    eprintln!(
        "{scenario}: client {}; proxy: {} connections, {forwarded} forwarded, {cuts} answers swallowed, {not_200} not 200, \
         {errors} errors (first: {proxy_error:?})",
        out.stdout.trim(),
        stat(&proxy.stats.connections)
    );
    assert!(out.status.success(), "eps client through the proxy: {out}");
    let [sent, accepted, duplicates, rejected, invalid, failed] = client_counts(&out);
    assert_eq!((sent, accepted, rejected, invalid, failed), (count as u64, count as u64, 0, 0, 0), "{out}");
    assert_eq!(not_200, 0, "the server answered something else than 200: {proxy_error:?}");
    assert!(duplicates > 0, "no duplicates: the proxy cut nothing? {out}");

    // The log holds each event exactly once.
    let ids = log_id_counts(&env.log_dir());
    let twice: Vec<_> = ids.iter().filter(|(_, &n)| n > 1).map(|(id, _)| id).take(5).collect();
    assert!(twice.is_empty(), "ids stored more than once (first few): {twice:?}");
    let want: BTreeSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    let have: BTreeSet<&str> = ids.keys().map(|s| s.as_str()).collect();
    assert_eq!(have.len(), ids.len());
    assert!(want == have, "the log's ids differ from the events sent ({} vs {})", have.len(), want.len());

    let processed = env.process(&[]).await;
    assert_eq!(applied_count(&processed.stdout), count as u64, "{processed}");
    let expected = totals_of(&events);
    let actual = env.revenues().await;
    let t = fault::tally(&expected, &actual, unit());
    Report {
        scenario,
        store: "sqlite",
        seed,
        events_sent: count as u64,
        events_lost: t.events_lost,
        events_doubled: t.events_doubled,
        duration: started.elapsed(),
        notes: format!(
            "a proxy swallowed the server's answer (after the sync) to {cuts} of {forwarded} requests \
             ({CUT_PERCENT}% of attempts, at most {MAX_CUTS_PER_ID} per request of {batch} event(s)); the client \
             retried and was answered duplicate for {duplicates} events; each event is in the log once"
        ),
        ..Report::default()
    }
    .write();
    eprintln!(
        "{scenario}: {count} events, {cuts} answers swallowed, {duplicates} duplicates, lost {}, doubled {}, {:?}",
        t.events_lost,
        t.events_doubled,
        started.elapsed()
    );
    assert_eq!((t.events_lost, t.events_doubled), (0, 0), "{t:?}");
    assert!(t.exact(), "{t:?}");
    assert_totals(&actual, &expected);
    // Every swallowed answer was to a request the server had stored or de-duplicated: the client saw
    // exactly the predicted number of duplicates, and the proxy cut exactly what the rule says.
    assert_eq!(errors, 0, "proxy errors: {proxy_error:?}");
    assert_eq!(cuts, expected_cuts, "answers swallowed vs the rule");
    assert_eq!(duplicates, expected_duplicates, "duplicates the client saw vs events whose first answer was cut");
    drop(proxy);
    drop(server);
}

/// Issue 15, item 10: SIGTERM to `eps process --follow` while PostgreSQL is down (the processor is in
/// its retry loop, with a batch it cannot commit) stops it cleanly, exit 0, with what was committed.
/// The limit is a hang guard, not a speed check (the stated time is 5 s, `processor::STOP_GRACE`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_database_is_down() {
    let pg = PgCluster::start(&[]).await;
    let env = Env::new(StoreKind::Sqlite).await; // a data directory; the database is `pg`
    let log_dir = env.log_dir();
    write_log(&log_dir, &[event_line("term-a", "add_revenue", "1")], usize::MAX);
    let mut processor = env.spawn_process(&["--follow", "--database-url", &pg.url]);
    within(Duration::from_secs(60), "the first event to be applied", async {
        while pg.checkpoint().await.is_none_or(|(_, applied)| applied < 1) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let committed = pg.checkpoint().await;

    pg.pause("fast").await;
    // New lines the processor reads and cannot commit: it is in its retry loop.
    let base = std::fs::metadata(log_dir.join(segment_name(0))).unwrap().len();
    std::fs::write(log_dir.join(segment_name(base)), format!("{}\n", event_line("term-a", "add_revenue", "2")))
        .unwrap();
    within(Duration::from_secs(60), "the processor to retry the commit", async {
        while !processor.stderr().contains("nothing was committed, retrying") {
            assert!(processor.child.try_wait().unwrap().is_none(), "the processor exited: {}", processor.stderr());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    let asked = Instant::now();
    sigterm(processor.child.id().unwrap()).await;
    let status = within(
        Duration::from_secs(20),
        "the processor to honour SIGTERM while the database is down",
        processor.child.wait(),
    )
    .await
    .unwrap();
    eprintln!("exited {status} {:?} after SIGTERM", asked.elapsed());
    assert!(status.success(), "{status}: {}", processor.stderr());

    // Nothing half-done: the checkpoint is the one committed before the outage.
    pg.resume().await;
    assert_eq!(pg.checkpoint().await, committed);
}

/// The same for the JetStream processor: SIGTERM while PostgreSQL is down and a partition's batch waits
/// to be committed stops it, exit 0, within the hang guard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_database_is_down_jetstream() {
    let pg = PgCluster::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let nats = common::nats::Nats::start(dir.path()).await;
    let a = args(&["process", "--log", &nats.url(), "--database-url", &pg.url, "--follow"]);
    let mut processor = ChildGuard::spawn(&a, &[], dir.path());
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let publish = |user: &'static str| {
        let js = js.clone();
        async move {
            let line = format!("{}\n", event_line(user, "add_revenue", "1"));
            within(Duration::from_secs(30), "publishing", async {
                loop {
                    // The processor creates the stream when it starts; wait for it.
                    if let Ok(ack) = js.publish("eps.events.0", line.clone().into()).await {
                        if ack.await.is_ok() {
                            break;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
            .await
        }
    };
    publish("term-js-a").await;
    let watcher = pg.connect().await;
    within(Duration::from_secs(60), "the first event to be applied", async {
        loop {
            let applied: Option<i64> = watcher
                .query_opt("SELECT sum(events_applied)::bigint FROM eps_checkpoints", &[])
                .await
                .ok()
                .flatten()
                .and_then(|r| r.get(0));
            if applied.unwrap_or(0) >= 1 {
                break;
            }
            assert!(processor.child.try_wait().unwrap().is_none(), "the processor exited: {}", processor.stderr());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    drop(watcher);

    pg.pause("fast").await;
    publish("term-js-b").await;
    within(Duration::from_secs(60), "the processor to meet the outage", async {
        while !processor.stderr().contains("nothing was committed, retrying") {
            assert!(processor.child.try_wait().unwrap().is_none(), "the processor exited: {}", processor.stderr());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let asked = Instant::now();
    sigterm(processor.child.id().unwrap()).await;
    let status = within(
        Duration::from_secs(20),
        "the JetStream processor to honour SIGTERM while the database is down",
        processor.child.wait(),
    )
    .await
    .unwrap();
    eprintln!("exited {status} {:?} after SIGTERM", asked.elapsed());
    assert!(status.success(), "{status}: {}", processor.stderr());
}
