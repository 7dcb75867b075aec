//! Fault-injection suite, crashes (issue 3, scenarios 1-3): the parts of eps SIGKILLed at random moments
//! and restarted, and every event still counted exactly once.
//!
//! - `server_killed_at_random_while_the_client_retries`: `eps client` sends a file while the server is
//!   SIGKILLed at random moments and restarted on the same port and data directory. The client ends with
//!   every event accepted, the log holds each client id exactly once (the retries of events that were
//!   synced but not acknowledged were recognised as duplicates, also across restarts), and `eps process`
//!   gives exact totals, on SQLite and on PostgreSQL (the kill phase runs once; its log is processed into
//!   both stores).
//! - `server_killed_between_write_and_sync_mid_write_and_during_start_up`: the test is the client (batches
//!   with ids, each retried until answered 200) and aims each SIGKILL with the fault shim: while a group's
//!   sync is stalled (written, not synced), while a group's write is stalled half-way (a torn tail, which
//!   every restart after it must report cutting), while the restarting server's start-up sync of the newest
//!   segment is stalled (which must come before it listens), and at random moments of start-up. Each id in
//!   the log once, totals equal to the test's own count of events per user.
//! - `processor_killed_at_random`: a log written by the test is applied by `eps process --batch-bytes 65536`
//!   SIGKILLed at random moments, restarted each time, then left to finish: exact totals.
//! - `processor_following_the_log_killed_at_random`: `eps process --follow` SIGKILLed at random moments and
//!   restarted while the test (the only writer) appends whole lines to the log; once it has caught up, the
//!   totals are exact.
//! - `four_processors_killed_and_restarted_at_random`: four `eps process` at once, each SIGKILLed and
//!   restarted at random, then a final run: exact totals.
//!
//! Two defects the suite ran into (both fixed) have a regression test of their own at the end of this
//! file: a reader that returned a line still being written when a new segment started meanwhile, and
//! `eps process --follow` dying of a SIGTERM that arrived before its first commit.
//!
//! Every scenario has a fixed seed (`EPS_FAULT_SEED` replays another), a short version for `cargo test` and
//! a long one with `EPS_FAULT_LONG=1`, writes a `fault::Report` and asserts exact totals. Every event has
//! the value [`UNIT`]; a user only ever adds or only ever subtracts (see [`subtracts`]), so a difference in
//! a total is a whole number of events whose direction says whether they were lost or doubled.
//!
//! The kill moments are aimed at points of progress, not at times: [`KillPoints`] draws one random point
//! of the work (log bytes written, or the checkpoint's position) in each of equal stretches of it, and a
//! kill is due when the work passes its point. So the kills owed always land while there is work left,
//! spread over the whole run, whatever the speed of the build, the store and the machine, and no
//! assertion rests on how long anything takes (the time limits are hang guards only). Everything listens
//! on 127.0.0.1 only.

use crate::common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::fault::{self, Report, Tally};
use common::shim::Shim;
use common::*;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use rust_decimal::Decimal;

store_tests!(
    processor_killed_at_random,
    processor_following_the_log_killed_at_random,
    four_processors_killed_and_restarted_at_random,
);

/// The value of every event.
const UNIT: &str = "1.25";
/// Users the events are spread over.
const USERS: u64 = 1_000;
/// Kills each scenario must deliver at least (the `--follow` variant: [`follow_kills`]).
const KILLS: u64 = 20;
/// Hang guard: a SIGKILLed process not reaped after this long is a hung test, not a slow machine.
const REAP_TIMEOUT: Duration = Duration::from_secs(60);

fn unit() -> Decimal {
    Decimal::from_str(UNIT).unwrap()
}

// ---------------------------------------------------------------------------------------------------
// Events and exactness

/// Whether user `u<k>` subtracts (one user in four); the others add.
fn subtracts(user: &str) -> bool {
    user.strip_prefix('u').and_then(|k| k.parse::<u64>().ok()).is_some_and(|k| k % 4 == 3)
}

/// `count` seed-format lines, users drawn from `rng`, and the totals they must give.
struct Events {
    lines: Vec<String>,
    totals: BTreeMap<String, Decimal>,
}

impl Events {
    fn new() -> Events {
        Events { lines: Vec::new(), totals: BTreeMap::new() }
    }

    fn generate(rng: &mut StdRng, count: usize) -> Events {
        let mut events = Events::new();
        events.extend(rng, count);
        events
    }

    /// Appends `count` new events; returns the range of their indexes in `lines`.
    fn extend(&mut self, rng: &mut StdRng, count: usize) -> std::ops::Range<usize> {
        let first = self.lines.len();
        let unit = unit();
        for _ in 0..count {
            let user = format!("u{}", rng.random_range(0..USERS));
            let (name, delta) = if subtracts(&user) { ("subtract_revenue", -unit) } else { ("add_revenue", unit) };
            self.lines.push(event_line(&user, name, UNIT));
            *self.totals.entry(user).or_default() += delta;
        }
        first..self.lines.len()
    }
}

/// [`fault::tally`] with each subtracting user's totals negated, so a missing subtraction counts as a
/// lost event (not as a doubled one).
fn tally(want: &BTreeMap<String, Decimal>, got: &BTreeMap<String, Decimal>) -> Tally {
    let split = |m: &BTreeMap<String, Decimal>| {
        let (minus, plus): (BTreeMap<_, _>, BTreeMap<_, _>) =
            m.iter().map(|(u, d)| (u.clone(), *d)).partition(|(u, _)| subtracts(u));
        (plus, minus.into_iter().map(|(u, d)| (u, -d)).collect::<BTreeMap<_, _>>())
    };
    let (want_plus, want_minus) = split(want);
    let (got_plus, got_minus) = split(got);
    let a = fault::tally(&want_plus, &got_plus, unit());
    let b = fault::tally(&want_minus, &got_minus, unit());
    Tally {
        users_expected: a.users_expected + b.users_expected,
        users_wrong: a.users_wrong + b.users_wrong,
        events_lost: a.events_lost + b.events_lost,
        events_doubled: a.events_doubled + b.events_doubled,
    }
}

/// Asserts the totals are exact: no user wrong, nothing lost, nothing doubled (naming the first users).
fn assert_exact(what: &str, t: &Tally, want: &BTreeMap<String, Decimal>, got: &BTreeMap<String, Decimal>) {
    if t.exact() && t.events_lost == 0 && t.events_doubled == 0 {
        return;
    }
    let wrong: Vec<String> = want
        .keys()
        .chain(got.keys().filter(|u| !want.contains_key(*u)))
        .filter(|u| want.get(*u) != got.get(*u))
        .take(10)
        .map(|u| format!("{u}: want {:?}, got {:?}", want.get(u), got.get(u)))
        .collect();
    panic!(
        "{what}: totals not exact: {} of {} users wrong, {} events lost, {} doubled; first: {wrong:?}",
        t.users_wrong, t.users_expected, t.events_lost, t.events_doubled
    );
}

// ---------------------------------------------------------------------------------------------------
// Kills

/// Where a run's kills are due: `target` points of progress (fractions of the work), one drawn at random
/// in each of `target` equal stretches of the first `target / (target + 1)` of the work. Nothing here
/// measures time: a kill lands when the work passes a point, so every kill owed lands while work is
/// left, however fast or slow the run.
struct KillPoints {
    points: Vec<f64>,
    next: usize,
}

impl KillPoints {
    fn new(seed: u64, target: u64) -> KillPoints {
        let mut rng = StdRng::seed_from_u64(seed);
        let stretch = 1.0 / (target as f64 + 1.0);
        let points = (0..target).map(|k| (k as f64 + rng.random_range(0.0..1.0)) * stretch).collect();
        KillPoints { points, next: 0 }
    }

    /// Whether a kill is due with this fraction of the work done.
    fn due(&self, done: f64) -> bool {
        self.points.get(self.next).is_some_and(|&p| done >= p)
    }

    fn delivered(&mut self) {
        self.next += 1;
    }

    fn owed(&self) -> bool {
        self.next < self.points.len()
    }
}

/// How often the kill loops look at the progress: short, so that a point is seen soon after it is passed.
const LOOK_EVERY: Duration = Duration::from_millis(2);

/// SIGKILLs `p` if it still runs and reaps it: `None` if the signal killed it, else how it had exited.
async fn kill_or_status(p: &mut ChildGuard) -> Option<ExitStatus> {
    if let Some(status) = p.child.try_wait().expect("try_wait") {
        return Some(status);
    }
    let _ = p.child.start_kill();
    let status = within(REAP_TIMEOUT, "a SIGKILLed eps to exit", p.child.wait()).await.expect("wait");
    if status.signal() == Some(9) {
        None
    } else {
        Some(status)
    }
}

fn assert_exit_0(status: ExitStatus, p: &ChildGuard, what: &str) {
    assert!(status.success(), "{what} exited with {status}\nstdout:\n{}\nstderr:\n{}", p.stdout(), p.stderr());
}

// ---------------------------------------------------------------------------------------------------
// The store's checkpoint

/// Reads the `file` row of `eps_checkpoints` straight from the database, while processors run.
struct Checkpoints {
    kind: StoreKind,
    sqlite: PathBuf,
    pg: Option<tokio_postgres::Client>,
    pg_url: Option<String>,
}

impl Checkpoints {
    fn new(env: &Env) -> Checkpoints {
        Checkpoints {
            kind: env.db.kind,
            sqlite: env.data_dir.join("eps.sqlite3"),
            pg: None,
            pg_url: env.db.url.clone(),
        }
    }

    /// `(position, events_applied)`; `None` while it cannot be read (no table yet, database busy).
    async fn read(&mut self) -> Option<(u64, u64)> {
        const SQL: &str = "SELECT position, events_applied FROM eps_checkpoints WHERE stream = 'file'";
        match self.kind {
            StoreKind::Sqlite => {
                let path = self.sqlite.clone();
                tokio::task::spawn_blocking(move || {
                    if !path.exists() {
                        return None;
                    }
                    let conn = rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                        .ok()?;
                    conn.busy_timeout(Duration::from_secs(2)).ok()?;
                    match conn.query_row(SQL, [], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))) {
                        Ok((p, e)) => Some((p as u64, e as u64)),
                        Err(rusqlite::Error::QueryReturnedNoRows) => Some((0, 0)),
                        Err(_) => None,
                    }
                })
                .await
                .unwrap()
            }
            StoreKind::Postgres => {
                if self.pg.as_ref().is_none_or(|c| c.is_closed()) {
                    let url = self.pg_url.clone().unwrap();
                    let connect = tokio_postgres::connect(&url, tokio_postgres::NoTls);
                    let (client, connection) =
                        tokio::time::timeout(Duration::from_secs(10), connect).await.ok()?.ok()?;
                    tokio::spawn(connection);
                    self.pg = Some(client);
                }
                let client = self.pg.as_ref().unwrap();
                let query = client.query_opt(SQL, &[]);
                match tokio::time::timeout(Duration::from_secs(10), query).await {
                    Ok(Ok(Some(row))) => Some((row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64)),
                    Ok(Ok(None)) => Some((0, 0)),
                    _ => None,
                }
            }
        }
    }

    /// Polls until the checkpoint is at `end`; returns the events applied.
    async fn wait_for(&mut self, end: u64, limit: Duration, what: &str) -> u64 {
        let mut last = None;
        let reached = tokio::time::timeout(limit, async {
            loop {
                let now = self.read().await;
                if let Some((position, events)) = now {
                    if position == end {
                        return events;
                    }
                    assert!(position < end, "{what}: checkpoint {position} is past the end of the log {end}");
                }
                last = now.or(last);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        reached.unwrap_or_else(|_| panic!("timed out after {limit:?}: {what} (checkpoint {last:?}, log end {end})"))
    }
}

// ---------------------------------------------------------------------------------------------------
// Scenario 1: the server

/// A free port on 127.0.0.1, below the kernel's ephemeral range. A port the kernel hands out for
/// `127.0.0.1:0` lies inside that range, which is also where the client's own outgoing connections get
/// their local ports: while the server is down, one of the client's connection attempts can then draw the
/// server's port and connect to itself (a TCP self-connect), holding the port so that the restart fails
/// with "address in use". Ports below the range are never drawn that way.
fn free_port() -> u16 {
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32768);
    let mut rng = rand::rng();
    if low > 11_000 {
        for _ in 0..200 {
            let port = rng.random_range(10_000..low);
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Position just past the last byte of the log.
fn log_end(log_dir: &Path) -> u64 {
    segments(log_dir).last().map_or(0, |(base, path)| base + std::fs::metadata(path).map_or(0, |m| m.len()))
}

/// How many times each line number of a client run appears in the log, by the `id` field
/// (`<run-id>-<line>`), for lines `1..=lines`. Also checks every line has an id of one run.
fn id_counts(log_dir: &Path, lines: usize) -> (Vec<u32>, usize) {
    #[derive(serde::Deserialize)]
    struct IdOnly<'a> {
        #[serde(borrow)]
        id: Option<std::borrow::Cow<'a, str>>,
    }
    let mut counts = vec![0u32; lines + 1];
    let mut run: Option<String> = None;
    let mut log_lines = 0;
    for (_, path) in segments(log_dir) {
        let data = std::fs::read(&path).unwrap();
        assert!(data.is_empty() || data.ends_with(b"\n"), "{} does not end with a newline", path.display());
        for line in data.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            log_lines += 1;
            let parsed: IdOnly = serde_json::from_slice(line)
                .unwrap_or_else(|e| panic!("log line {:?}: {e}", String::from_utf8_lossy(line)));
            let id = parsed.id.unwrap_or_else(|| panic!("log line without id: {:?}", String::from_utf8_lossy(line)));
            let (r, n) = id.rsplit_once('-').unwrap_or_else(|| panic!("id {id:?} is not <run>-<line>"));
            match &run {
                None => run = Some(r.to_string()),
                Some(run) => assert_eq!(run, r, "ids of two client runs in the log"),
            }
            let n: usize = n.parse().unwrap_or_else(|e| panic!("id {id:?}: {e}"));
            assert!((1..=lines).contains(&n), "id {id:?} names a line the file does not have");
            counts[n] += 1;
        }
    }
    (counts, log_lines)
}

/// In a module of its own so that it sorts, and therefore starts, first: it is the longest of the short
/// versions (the debug client is slow), the others run beside it.
mod ingest {
    /// Single events (`--batch 1`, `POST /liveEvent`), 32 in flight.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn server_killed_at_random_while_the_client_retries() {
        super::server_killed_at_random_while_the_client_retries(
            "server_killed_at_random_while_the_client_retries",
            &["--batch", "1", "--concurrency", "32"],
        )
        .await
    }

    /// Batches (`POST /events`): a kill between a batch's sync and its answer makes the client resend
    /// the whole batch. Small batches, few in flight: the run lasts long enough for the kills (larger
    /// ones in the long run, whose million events would otherwise take many minutes).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn server_killed_at_random_while_the_client_retries_batches() {
        let (batch, concurrency) = super::fault::scaled(("10", "4"), ("20", "4"));
        super::server_killed_at_random_while_the_client_retries(
            "server_killed_at_random_while_the_client_retries_batches",
            &["--batch", batch, "--concurrency", concurrency],
        )
        .await
    }
}

async fn server_killed_at_random_while_the_client_retries(scenario: &'static str, client_args: &[&str]) {
    let started = Instant::now();
    let seed = fault::seed(scenario);
    let mut rng = StdRng::seed_from_u64(seed);
    let env = Env::new(StoreKind::Sqlite).await;
    let count = fault::scaled(20_000, 1_000_000);
    let events = Events::generate(&mut rng, count);
    let file = env.write_file("events.jsonl", &events.lines);
    // The log as the server writes it: each input line plus `,"id":"<16 hex>-<line>","ts":<13 digits>`.
    let expected_log_bytes: u64 =
        events.lines.iter().enumerate().map(|(i, l)| (l.len() + 45 + (i + 1).to_string().len()) as u64).sum();
    // Small segments, so that some kills land while the server starts a new one.
    let segment_bytes = fault::scaled(256 * 1024, 8 * 1024 * 1024).to_string();

    let port = free_port();
    let server_args = args(&[
        "server",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
        &env.data_dir.display().to_string(),
        "--segment-bytes",
        &segment_bytes,
    ]);
    let mut server = ServerProc::start(&server_args, &[], env.tmp.path()).await;
    let url = server.url.clone();

    let mut client = ChildGuard::spawn(
        &args(&["client", &file.display().to_string(), "--url", &url, "--progress", "quiet", "--max-attempts", "1000"])
            .into_iter()
            .chain(client_args.iter().map(|a| a.to_string()))
            .collect::<Vec<_>>(),
        &[],
        env.tmp.path(),
    );

    // Kill the server each time the log passes a kill point, for as long as the client runs.
    let mut points = KillPoints::new(seed ^ 1, KILLS);
    let mut kills = 0u64;
    let mut restart_time = Duration::ZERO;
    let mut torn_tails = 0u64;
    // Hang guard only.
    let limit = fault::scaled(Duration::from_secs(600), Duration::from_secs(3600));
    let client_status = within(limit, "the client to finish while the server is killed (hang guard)", async {
        loop {
            if let Some(status) = client.child.try_wait().expect("wait for the client") {
                break status;
            }
            let done = log_end(&env.log_dir()) as f64 / expected_log_bytes as f64;
            if !points.due(done) {
                tokio::time::sleep(LOOK_EVERY).await;
                continue;
            }
            server.kill().await;
            points.delivered();
            kills += 1;
            let restart = Instant::now();
            server = ServerProc::start(&server_args, &[], env.tmp.path()).await;
            restart_time += restart.elapsed();
            if server.stderr().contains("cut a torn last line") {
                torn_tails += 1;
            }
            assert_eq!(server.url, url, "the server came back on another port");
        }
    })
    .await;
    let client_out = client.stdout();
    assert!(
        client_status.success(),
        "eps client exited {client_status} after {kills} kills\nstdout:\n{client_out}\nstderr (tail):\n{}",
        tail(&client.stderr(), 40)
    );
    assert!(
        client_out.contains(&format!("accepted {count} (")) && client_out.contains(" failed 0 "),
        "client summary: {client_out}"
    );
    let duplicates: u64 = client_out
        .split(" duplicates)")
        .next()
        .and_then(|s| s.rsplit('(').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no duplicate count in {client_out:?}"));
    eprintln!(
        "{scenario}: {kills} kills (restarts took {restart_time:.1?} in all, {torn_tails} cut a torn last line), \
         client: {}",
        client_out.trim()
    );
    // Every kill point lies before the last 1/(KILLS+1) of the log, which the client cannot have written
    // while nobody looked: the kills were all delivered under load.
    assert_eq!(kills, KILLS, "the client finished before the log passed every kill point");
    // Some events were synced, then the server was killed before it answered: their retries must have been
    // recognised (with 32 requests in flight at each kill, a run without any is all but impossible).
    assert!(duplicates > 0, "no retry was answered as a duplicate in {kills} kills: {client_out}");

    // A graceful stop: the log stays as it is.
    server.sigterm().await;
    let status = server.wait(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "server exit after SIGTERM: {status}\nstderr:\n{}", server.stderr());

    // Each event is in the log exactly once.
    let (counts, log_lines) = id_counts(&env.log_dir(), count);
    let missing: Vec<usize> = (1..=count).filter(|&n| counts[n] == 0).collect();
    let doubled: Vec<usize> = (1..=count).filter(|&n| counts[n] > 1).collect();

    // The log applied to each store.
    let mut tallies = Vec::new();
    let out = env.process(&[]).await;
    let sqlite = env.revenues().await;
    tallies.push(("sqlite", tally(&events.totals, &sqlite), out, sqlite));
    let pg = TestDb::new(StoreKind::Postgres).await;
    // The server's store is SQLite: applying its log to PostgreSQL too is deliberate here.
    let mut process_args = args(&["process", "--allow-other-store", "--data-dir", &env.data_dir.display().to_string()]);
    process_args.extend(pg.args());
    let out = run_eps(&process_args, &[]).await;
    assert!(out.status.success(), "eps process into PostgreSQL: {out}");
    let postgres = pg.revenues(&env.data_dir).await;
    tallies.push(("postgres", tally(&events.totals, &postgres), out, postgres));

    eprintln!("{scenario}: finished in {:.1?}", started.elapsed());
    Report {
        scenario,
        store: "sqlite+postgres",
        seed,
        events_sent: count as u64,
        kills,
        events_lost: tallies.iter().map(|t| t.1.events_lost).sum(),
        events_doubled: tallies.iter().map(|t| t.1.events_doubled).sum(),
        duration: started.elapsed(),
        notes: format!(
            "eps server SIGKILLed {kills} times at random moments and restarted on the same port and data directory \
             while eps client sent {count} events ({}, retries); the client ended with all accepted, \
             {duplicates} answered as duplicates of a copy synced before the kill; {torn_tails} restarts cut a torn \
             last line; the log held each client id exactly once ({} missing, {} doubled); lost/doubled are those of the totals, the log processed into \
             SQLite and into PostgreSQL",
            client_args.join(" "),
            missing.len(),
            doubled.len()
        ),
        ..Report::default()
    }
    .write();

    assert!(
        missing.is_empty() && doubled.is_empty() && log_lines == count,
        "the log has {log_lines} lines for {count} events: {} line numbers missing (first {:?}), {} more than once \
         (first {:?})",
        missing.len(),
        &missing[..missing.len().min(10)],
        doubled.len(),
        &doubled[..doubled.len().min(10)]
    );
    for (store, t, out, got) in &tallies {
        assert_eq!(applied_count(&out.stdout), count as u64, "{store}: {out}");
        assert!(out.stdout.contains(" 0 invalid lines"), "{store}: {out}");
        assert_exact(store, t, &events.totals, got);
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------------
// Scenario 1b: kills aimed at the moments random kills rarely hit

/// In a module of its own so that it starts early, beside the other long server scenario.
mod aimed {
    /// Kills aimed with the fault shim: while a group's sync is stalled, in the middle of a group's write
    /// (a torn tail), during start-up's sync of the newest segment, and at random moments of start-up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn server_killed_between_write_and_sync_mid_write_and_during_start_up() {
        super::server_killed_at_aimed_moments().await
    }
}

/// Where an aimed kill lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Aim {
    /// A group is written, its fdatasync is stalled: the write is done, the sync is not.
    StalledSync,
    /// A group is half written (a prefix ending mid-line) and the write stalls: the tail is torn.
    TornWrite,
    /// The restarting server stalls in its start-up sync of the newest segment (recovery).
    StartUpSync,
    /// The restarting server is killed at a random moment of its start-up (recovery, the
    /// de-duplication rebuild), drawn up to the time the last start-up took.
    DuringStartUp,
}

/// A stall the test always ends by a kill; its length only bounds a test whose kill never comes.
const AIMED_STALL_MS: i32 = 120_000;

/// `eps server` spawned without waiting for it to listen (so that it can be killed while starting).
fn spawn_server(server_args: &[String], shim: &Shim, dir: &Path) -> ChildGuard {
    let env = shim.env();
    let envs: Vec<(&str, String)> = env.iter().map(|(k, v)| (*k, v.clone())).collect();
    ChildGuard::spawn(server_args, &envs, dir)
}

fn listening(server: &ChildGuard) -> bool {
    server.stdout().contains("eps server listening on http://")
}

/// Hang guard for anything the aimed scenario waits for (start-up, a stall under load): generous, it
/// only turns a hang into a failure.
const AIMED_WAIT: Duration = Duration::from_secs(120);

/// Waits until `server` listens; panics if it exits first.
async fn wait_listening(server: &mut ChildGuard) {
    within(AIMED_WAIT, "the restarted server to listen", async {
        while !listening(server) {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("the server exited with {status} while starting\nstderr:\n{}", server.stderr());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
}

/// Waits until the shim reports a stall in `server`; panics if the server exits first.
async fn wait_stalled(shim: &Shim, server: &mut ChildGuard, what: &str) {
    within(AIMED_WAIT, what, async {
        while !shim.stalled() {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("{what}: the server exited with {status}\nstderr:\n{}", server.stderr());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
}

async fn sigkill(p: &mut ChildGuard) {
    assert!(kill_or_status(p).await.is_none(), "the server had exited before its kill\nstderr:\n{}", p.stderr());
}

/// The test is the client: `WORKERS` tasks each take the next batch of events (value 1, each with an id)
/// and POST it until it is answered 200, whatever happens in between (refused connections while the
/// server is down, answers lost to a kill, 503s). A kill is due each time the events answered pass the
/// next threshold, so the kills are spread over the run whatever the speed. After the run: every event
/// answered 200, each id in the log exactly once, and the totals `eps process` gives equal the test's own
/// count of events per user.
async fn server_killed_at_aimed_moments() {
    const SCENARIO: &str = "server_killed_between_write_and_sync_mid_write_and_during_start_up";
    const AIMS: [Aim; 4] = [Aim::StalledSync, Aim::TornWrite, Aim::StartUpSync, Aim::DuringStartUp];
    const BATCH: usize = 20;
    const WORKERS: usize = 8;
    let started = Instant::now();
    let seed = fault::seed(SCENARIO);
    let mut rng = StdRng::seed_from_u64(seed);
    let env = Env::new(StoreKind::Sqlite).await;
    let count = fault::scaled(12_000, 400_000);
    let rounds = fault::scaled(3, 8);
    let run = format!("{:016x}", rng.random::<u64>());
    let mut want: BTreeMap<String, Decimal> = BTreeMap::new();
    let bodies: Vec<String> = (0..count)
        .collect::<Vec<_>>()
        .chunks(BATCH)
        .map(|batch| {
            batch
                .iter()
                .map(|i| {
                    let user = format!("a{}", rng.random_range(0..USERS));
                    *want.entry(user.clone()).or_default() += Decimal::ONE;
                    format!(r#"{{"userId":"{user}","name":"add_revenue","value":1,"id":"{run}-{}"}}"#, i + 1)
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect();

    let shim = Shim::new(env.tmp.path(), "server-events-");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let server_args = args(&[
        "server",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
        &env.data_dir.display().to_string(),
        "--segment-bytes",
        &fault::scaled(256 * 1024, 8 * 1024 * 1024).to_string(),
    ]);
    let mut server = spawn_server(&server_args, &shim, env.tmp.path());
    wait_listening(&mut server).await;

    let next = AtomicU64::new(0);
    let answered = AtomicU64::new(0);
    let duplicates = AtomicU64::new(0);
    let attempts = AtomicU64::new(0);
    let worker = || async {
        let http = http();
        loop {
            let b = next.fetch_add(1, Ordering::SeqCst) as usize;
            let Some(body) = bodies.get(b) else { return };
            let events = body.lines().count();
            loop {
                attempts.fetch_add(1, Ordering::Relaxed);
                let sent = http
                    .post(format!("{url}/events"))
                    .header("Authorization", TOKEN)
                    .header("Content-Type", "application/x-ndjson")
                    .body(body.clone())
                    .send()
                    .await;
                if let Ok(response) = sent {
                    let status = response.status().as_u16();
                    if let Ok(text) = response.text().await {
                        if status == 200 {
                            let answer: serde_json::Value = serde_json::from_str(&text)
                                .unwrap_or_else(|e| panic!("answer {text:?} is not JSON: {e}"));
                            assert_eq!(answer["accepted"], events, "batch {b}: {answer}");
                            duplicates.fetch_add(answer["duplicates"].as_u64().unwrap(), Ordering::SeqCst);
                            answered.fetch_add(events as u64, Ordering::SeqCst);
                            break;
                        }
                        assert!(status == 503, "batch {b} answered {status}: {text}");
                    }
                }
                // Refused while the server is down, cut by a kill, or 503: the same batch again.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };

    let kills_due = rounds * AIMS.len();
    let mut kills: BTreeMap<&str, u64> = BTreeMap::new();
    let mut torn_tails = 0u64;
    let mut killed_before_listening = 0u64;
    let mut last_start_up = Duration::from_millis(100);
    let killer = async {
        for k in 0..kills_due {
            let aim = AIMS[k % AIMS.len()];
            // Due once this fraction of the events is answered: work is always left for the retries.
            let threshold = (count as u64) * (k as u64 + 1) / (kills_due as u64 + 2);
            within(AIMED_WAIT, "the client's progress towards the next kill", async {
                while answered.load(Ordering::SeqCst) < threshold {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
            .await;
            match aim {
                Aim::StalledSync => {
                    shim.stall_syncs_ms(AIMED_STALL_MS);
                    wait_stalled(&shim, &mut server, "a sync of the log to stall under load").await;
                    sigkill(&mut server).await;
                }
                Aim::TornWrite => {
                    shim.stall_after_partial_write_ms(AIMED_STALL_MS);
                    wait_stalled(&shim, &mut server, "a write of the log to stall half-way").await;
                    sigkill(&mut server).await;
                }
                Aim::StartUpSync => {
                    sigkill(&mut server).await;
                    shim.stall_syncs_ms(AIMED_STALL_MS);
                    let mut starting = spawn_server(&server_args, &shim, env.tmp.path());
                    wait_stalled(&shim, &mut starting, "the restarting server to sync the newest segment").await;
                    // The sync is stalled: nothing may be trusted or answered yet.
                    assert!(
                        !listening(&starting),
                        "the server listened before its start-up sync of the newest segment\nstderr:\n{}",
                        starting.stderr()
                    );
                    sigkill(&mut starting).await;
                    killed_before_listening += 1;
                }
                Aim::DuringStartUp => {
                    sigkill(&mut server).await;
                    let mut starting = spawn_server(&server_args, &shim, env.tmp.path());
                    let delay = rng.random_range(Duration::ZERO..last_start_up);
                    tokio::time::sleep(delay).await;
                    let before = !listening(&starting);
                    sigkill(&mut starting).await;
                    killed_before_listening += u64::from(before);
                }
            }
            shim.disarm();
            shim.clear_stalled();
            *kills.entry(format!("{aim:?}").leak()).or_default() += 1;
            let restart = Instant::now();
            server = spawn_server(&server_args, &shim, env.tmp.path());
            wait_listening(&mut server).await;
            last_start_up = restart.elapsed();
            if server.stderr().contains("cut a torn last line") {
                torn_tails += 1;
            }
        }
    };
    let limit = fault::scaled(Duration::from_secs(300), Duration::from_secs(1800));
    within(limit, "the aimed kills while the client sends (hang guard)", async {
        futures::join!(killer, futures::future::join_all((0..WORKERS).map(|_| worker())))
    })
    .await;
    let kills_total: u64 = kills.values().sum();
    let (duplicates, attempts) = (duplicates.into_inner(), attempts.into_inner());
    assert_eq!(answered.into_inner(), count as u64);
    eprintln!(
        "{SCENARIO}: {kills_total} kills {kills:?}, {killed_before_listening} before the server listened, \
         {torn_tails} restarts cut a torn last line; {duplicates} events answered as duplicates, {attempts} requests"
    );

    server.child.start_kill().unwrap();
    server.child.wait().await.unwrap();
    let (counts, log_lines) = id_counts(&env.log_dir(), count);
    let missing: Vec<usize> = (1..=count).filter(|&n| counts[n] == 0).collect();
    let doubled: Vec<usize> = (1..=count).filter(|&n| counts[n] > 1).collect();
    let out = env.process(&[]).await;
    let got = env.revenues().await;
    let t = fault::tally(&want, &got, Decimal::ONE);

    Report {
        scenario: SCENARIO,
        store: "sqlite",
        seed,
        events_sent: count as u64,
        kills: kills_total,
        events_lost: t.events_lost,
        events_doubled: t.events_doubled,
        duration: started.elapsed(),
        notes: format!(
            "eps server SIGKILLed {kills_total} times at aimed moments while the test posted {count} events in \
             batches of {BATCH} with ids, {WORKERS} at a time, retrying each until answered 200: {} while a \
             group's sync was stalled (written, not synced), {} while a group's write was stalled half-way \
             ({torn_tails} restarts cut a torn last line), {} while the restarting server's start-up sync was \
             stalled, {} at random moments of start-up ({killed_before_listening} kills in all before the \
             server listened); {duplicates} events answered as duplicates; the log held each id exactly once \
             ({} missing, {} doubled); totals of eps process into SQLite against the test's own count per user",
            kills.get("StalledSync").unwrap_or(&0),
            kills.get("TornWrite").unwrap_or(&0),
            kills.get("StartUpSync").unwrap_or(&0),
            kills.get("DuringStartUp").unwrap_or(&0),
            missing.len(),
            doubled.len()
        ),
        ..Report::default()
    }
    .write();

    assert!(
        missing.is_empty() && doubled.is_empty() && log_lines == count,
        "the log has {log_lines} lines for {count} events: {} ids missing (first {:?}), {} more than once (first {:?})",
        missing.len(),
        &missing[..missing.len().min(10)],
        doubled.len(),
        &doubled[..doubled.len().min(10)]
    );
    assert!(out.stdout.contains(" 0 invalid lines"), "eps process: {out}");
    assert_eq!(applied_count(&out.stdout), count as u64, "eps process: {out}");
    assert_exact(SCENARIO, &t, &want, &got);
    // Each kill in a stalled write left a torn line, and each restart after one must have cut it.
    let torn_kills = *kills.get("TornWrite").unwrap_or(&0);
    assert!(
        torn_kills > 0 && torn_tails == torn_kills,
        "{torn_tails} restarts cut a torn tail after {torn_kills} kills mid-write"
    );
    // Groups written but not synced at a kill were unanswered; their retries must have been recognised.
    assert!(
        duplicates > 0,
        "no retry answered as a duplicate after {} kills between write and sync",
        kills["StalledSync"]
    );
}

// ---------------------------------------------------------------------------------------------------
// Scenarios 2 and 3: processors

/// Processor arguments: small batches, so that there are many commits to interrupt.
const BATCH: [&str; 2] = ["--batch-bytes", "65536"];

/// Writes the scenario's log (segments of `segment_bytes`); returns its size in bytes.
fn write_scenario_log(env: &Env, events: &Events, segment_bytes: usize) -> u64 {
    let written = write_log(&env.log_dir(), &events.lines, segment_bytes);
    assert!(written.len() >= 3, "expected several segments, got {}", written.len());
    written.iter().map(|(_, len)| *len as u64).sum()
}

/// After the last run: totals exact, the checkpoint at the end of the log, every event counted once.
async fn check_processed(env: &Env, what: &str, events: &Events, end: u64) -> Tally {
    let got = env.revenues().await;
    let t = tally(&events.totals, &got);
    let mut checkpoints = Checkpoints::new(env);
    let (position, applied) = checkpoints.read().await.expect("the checkpoint after the last run");
    assert_eq!(position, end, "{what}: the checkpoint is not at the end of the log");
    assert_eq!(applied, events.lines.len() as u64, "{what}: eps_checkpoints.events_applied");
    t
}

async fn processor_killed_at_random(store: StoreKind) {
    const SCENARIO: &str = "processor_killed_at_random";
    let started = Instant::now();
    let seed = fault::seed(SCENARIO);
    let mut rng = StdRng::seed_from_u64(seed);
    let env = Env::new(store).await;
    let count = fault::scaled(200_000, 1_000_000);
    let events = Events::generate(&mut rng, count);
    let end = write_scenario_log(&env, &events, fault::scaled(1 << 20, 4 << 20));

    let mut points = KillPoints::new(seed ^ 2, KILLS);
    let mut jitter = StdRng::seed_from_u64(seed ^ 6);
    let mut checkpoints = Checkpoints::new(&env);
    let mut kills = 0u64;
    let mut done = 0.0;
    // Hang guard only.
    let limit = fault::scaled(Duration::from_secs(600), Duration::from_secs(3600));
    within(limit, "the processor kills (hang guard)", async {
        while points.owed() {
            let mut p = env.spawn_process(&BATCH);
            let spawned = Instant::now();
            loop {
                if let Some(status) = p.child.try_wait().expect("try_wait") {
                    assert_exit_0(status, &p, "eps process");
                    panic!(
                        "eps process finished the log after {kills} kills, before its checkpoint passed a kill point"
                    );
                }
                if let Some((position, _)) = checkpoints.read().await {
                    done = position as f64 / end as f64;
                }
                if points.due(done) {
                    break;
                }
                tokio::time::sleep(LOOK_EVERY).await;
            }
            // Not always just after a commit: somewhere in the next stretch of work.
            tokio::time::sleep(spawned.elapsed().mul_f64(jitter.random_range(0.0..0.25))).await;
            assert!(kill_or_status(&mut p).await.is_none(), "eps process exited before its kill:\n{}", p.stderr());
            points.delivered();
            kills += 1;
        }
    })
    .await;
    eprintln!(
        "{SCENARIO} ({}): {kills} kills in {:.1?}, {:.1}% applied before the final run",
        store.name(),
        started.elapsed(),
        done * 100.0
    );
    let last = env.process(&BATCH).await;
    let t = check_processed(&env, SCENARIO, &events, end).await;

    eprintln!("{SCENARIO}: finished in {:.1?}", started.elapsed());
    Report {
        scenario: SCENARIO,
        store: store.name(),
        seed,
        events_sent: count as u64,
        kills,
        events_lost: t.events_lost,
        events_doubled: t.events_doubled,
        duration: started.elapsed(),
        notes: format!(
            "eps process --batch-bytes 65536 SIGKILLed {kills} times at random moments over a {count}-event log \
             ({:.0}% applied by the killed runs), restarted each time, then a final run",
            done * 100.0
        ),
        ..Report::default()
    }
    .write();
    assert!(last.stdout.contains(" 0 invalid lines"), "final run: {last}");
    assert_exact(SCENARIO, &t, &events.totals, &env.revenues().await);
}

/// Kills `eps process --follow` owes in this variant.
fn follow_kills() -> u64 {
    fault::scaled(5, KILLS)
}

/// The test's own log writer: appends whole lines to the last segment (one `write` per burst), and
/// starts a new segment, named by its position, when the last one is full.
struct Appender {
    log_dir: PathBuf,
    segment_bytes: u64,
    base: u64,
    len: u64,
}

impl Appender {
    fn new(log_dir: &Path, segment_bytes: u64) -> Appender {
        let (base, path) = segments(log_dir).pop().expect("a segment");
        let len = std::fs::metadata(path).unwrap().len();
        Appender { log_dir: log_dir.to_path_buf(), segment_bytes, base, len }
    }

    fn end(&self) -> u64 {
        self.base + self.len
    }

    fn append(&mut self, lines: &[String]) {
        let mut buf = Vec::with_capacity(lines.len() * 64);
        for line in lines {
            buf.extend_from_slice(line.as_bytes());
            buf.push(b'\n');
        }
        if self.len > 0 && self.len + buf.len() as u64 > self.segment_bytes {
            self.base += self.len;
            self.len = 0;
            std::fs::File::create_new(self.log_dir.join(segment_name(self.base))).unwrap();
        }
        let path = self.log_dir.join(segment_name(self.base));
        let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
        file.write_all(&buf).unwrap();
        self.len += buf.len() as u64;
    }
}

async fn processor_following_the_log_killed_at_random(store: StoreKind) {
    const SCENARIO: &str = "processor_following_the_log_killed_at_random";
    let started = Instant::now();
    let seed = fault::seed(SCENARIO);
    let mut rng = StdRng::seed_from_u64(seed);
    let env = Env::new(store).await;
    let initial = fault::scaled(10_000, 100_000);
    let appended = fault::scaled(40_000, 900_000);
    let segment_bytes = fault::scaled(1 << 20, 4 << 20);
    let mut events = Events::generate(&mut rng, initial);
    write_scenario_log(&env, &events, 128 * 1024);
    let new = events.extend(&mut rng, appended);
    // Bursts of whole lines with pauses between them, for about this long.
    let bursts = fault::scaled(150, 600);
    let writing_for = fault::scaled(Duration::from_secs(3), Duration::from_secs(30));
    let mut appender = Appender::new(&env.log_dir(), segment_bytes as u64);
    let follow = ["--follow", "--poll-ms", "5"];

    let writing = AtomicBool::new(true);
    // The last lines are held back for the last follower: it has to apply them itself (the killed ones
    // may have applied everything else), so the test knows it runs before it asks it to stop.
    let held_back = (new.end - 1000)..new.end;
    let writer = async {
        let mut rng = StdRng::seed_from_u64(seed ^ 3);
        let per_burst = appended / bursts;
        let mut next = new.start;
        while next < held_back.start {
            let n = rng.random_range(1..=2 * per_burst).min(held_back.start - next);
            appender.append(&events.lines[next..next + n]);
            next += n;
            let pause = writing_for.as_secs_f64() / bursts as f64;
            tokio::time::sleep(Duration::from_secs_f64(rng.random_range(0.0..2.0 * pause))).await;
        }
        writing.store(false, Ordering::SeqCst);
    };
    let target = follow_kills();
    let killer = async {
        let mut rng = StdRng::seed_from_u64(seed ^ 4);
        let mut kills = 0u64;
        let (lo, hi) = fault::scaled((0.1, 0.6), (0.2, 2.5));
        while writing.load(Ordering::SeqCst) || kills < target {
            let mut p = env.spawn_process(&follow);
            tokio::time::sleep(Duration::from_secs_f64(rng.random_range(lo..hi))).await;
            match kill_or_status(&mut p).await {
                None => kills += 1,
                Some(status) => panic!("eps process --follow exited by itself with {status}\nstderr:\n{}", p.stderr()),
            }
        }
        kills
    };
    let limit = fault::scaled(Duration::from_secs(120), Duration::from_secs(600));
    let ((), kills) =
        within(limit, "appending while the follower is killed", async { futures::join!(writer, killer) }).await;

    // A last follower catches up, then stops on SIGTERM.
    let mut p = env.spawn_process(&follow);
    let caught_up = Instant::now();
    appender.append(&events.lines[held_back]);
    let end = appender.end();
    assert_eq!(end, log_end(&env.log_dir()));
    let mut checkpoints = Checkpoints::new(&env);
    checkpoints.wait_for(end, limit, "the last follower to catch up").await;
    let catch_up = caught_up.elapsed();
    // No pause before the SIGTERM: it stops with exit 0 at any moment, even while it starts (see
    // `eps_process_follow_stopped_by_sigterm_while_it_starts_exits_0`).
    sigterm(p.child.id().expect("the follower runs")).await;
    let status = within(Duration::from_secs(30), "the follower to stop on SIGTERM", p.child.wait()).await.unwrap();
    assert_exit_0(status, &p, "eps process --follow after SIGTERM");
    eprintln!(
        "{SCENARIO} ({}): {kills} kills while {appended} events were appended; the last follower caught up in {catch_up:?}",
        store.name()
    );
    let t = check_processed(&env, SCENARIO, &events, end).await;

    eprintln!("{SCENARIO}: finished in {:.1?}", started.elapsed());
    Report {
        scenario: SCENARIO,
        store: store.name(),
        seed,
        events_sent: events.lines.len() as u64,
        kills,
        events_lost: t.events_lost,
        events_doubled: t.events_doubled,
        duration: started.elapsed(),
        notes: format!(
            "eps process --follow SIGKILLed {kills} times at random moments and restarted while the test appended \
             {appended} events in whole-line writes (new segments every {} KiB) to a {initial}-event log; a last \
             follower caught up and stopped on SIGTERM",
            segment_bytes / 1024
        ),
        ..Report::default()
    }
    .write();
    assert!(p.stdout().contains(" 0 invalid lines"), "last follower: {}", p.stdout());
    assert_exact(SCENARIO, &t, &events.totals, &env.revenues().await);
}

async fn four_processors_killed_and_restarted_at_random(store: StoreKind) {
    const SCENARIO: &str = "four_processors_killed_and_restarted_at_random";
    const PROCESSORS: u32 = 4;
    let started = Instant::now();
    let seed = fault::seed(SCENARIO);
    let mut rng = StdRng::seed_from_u64(seed);
    let env = Env::new(store).await;
    let count = fault::scaled(200_000, 1_000_000);
    let events = Events::generate(&mut rng, count);
    let end = write_scenario_log(&env, &events, fault::scaled(1 << 20, 4 << 20));

    // The four run all along; each time the checkpoint passes a kill point one of them, drawn at random,
    // is SIGKILLed and restarted.
    let mut points = KillPoints::new(seed ^ 5, KILLS);
    let mut pick = StdRng::seed_from_u64(seed ^ 6);
    let mut checkpoints = Checkpoints::new(&env);
    let mut done = 0.0f64;
    let mut per_processor = vec![0u64; PROCESSORS as usize];
    let mut running: Vec<ChildGuard> = (0..PROCESSORS).map(|_| env.spawn_process(&BATCH)).collect();
    // Hang guard only.
    let limit = fault::scaled(Duration::from_secs(600), Duration::from_secs(3600));
    within(limit, "the four processors' kills (hang guard)", async {
        while points.owed() {
            if let Some((position, _)) = checkpoints.read().await {
                done = position as f64 / end as f64;
            }
            for (i, p) in running.iter_mut().enumerate() {
                if let Some(status) = p.child.try_wait().expect("try_wait") {
                    assert_exit_0(status, p, &format!("processor {i}"));
                    // With a log that does not grow, exiting 0 means the checkpoint is at its end.
                    panic!("processor {i} finished the log before its checkpoint passed every kill point");
                }
            }
            if !points.due(done) {
                tokio::time::sleep(LOOK_EVERY).await;
                continue;
            }
            let i = pick.random_range(0..running.len());
            assert!(kill_or_status(&mut running[i]).await.is_none(), "processor {i} exited before its kill");
            running[i] = env.spawn_process(&BATCH);
            per_processor[i] += 1;
            points.delivered();
        }
    })
    .await;
    for mut p in running {
        // The last runs of the four: stopped by SIGKILL too (or finished, which is as good).
        if let Some(status) = kill_or_status(&mut p).await {
            assert_exit_0(status, &p, "a processor");
        }
    }
    let kills: u64 = per_processor.iter().sum();
    eprintln!(
        "{SCENARIO} ({}): {kills} kills {per_processor:?} in {:.1?}, {:.1}% applied before the final run",
        store.name(),
        started.elapsed(),
        done * 100.0
    );
    let last = env.process(&BATCH).await;
    let t = check_processed(&env, SCENARIO, &events, end).await;

    eprintln!("{SCENARIO}: finished in {:.1?}", started.elapsed());
    Report {
        scenario: SCENARIO,
        store: store.name(),
        seed,
        events_sent: count as u64,
        kills,
        events_lost: t.events_lost,
        events_doubled: t.events_doubled,
        duration: started.elapsed(),
        notes: format!(
            "four eps process --batch-bytes 65536 at once over a {count}-event log, each SIGKILLed at random \
             moments and restarted ({kills} kills: {per_processor:?}; {:.0}% applied by then), then a final run",
            done * 100.0
        ),
        ..Report::default()
    }
    .write();
    assert!(last.stdout.contains(" 0 invalid lines"), "final run: {last}");
    assert_exact(SCENARIO, &t, &events.totals, &env.revenues().await);
}

// ---------------------------------------------------------------------------------------------------
// Defects found by this suite, each reduced to a regression test of its own

/// The reader's promise (src/log/reader.rs): "a last line still being written (no newline yet) is never
/// returned from the newest segment". It used to decide whether a segment is the newest *after* reading
/// the segment's length: when the writer finished the line and started a new segment in between, the
/// reader took the old length for final and returned the half-written line. The processor then recorded it
/// as an invalid line, moved its checkpoint to the middle of the line, recorded the rest as a second invalid
/// line, and the event was never applied. This test plays the writer (half a line, the rest, a new segment, as the
/// server's writer does when a segment is full) against a reader that polls the newest segment.
#[test]
fn the_reader_never_returns_a_line_still_being_written_even_when_a_new_segment_starts() {
    use eps::log::reader::LogReader;
    use std::sync::Arc;

    const LINE: &[u8] = br#"{"userId":"u1","name":"add_revenue","value":1}"#;
    // A fixed number of rounds, each a chance for the defect, however long they take.
    const ROUNDS: u64 = 500;
    let seed = fault::seed("the_reader_never_returns_a_line_still_being_written");
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().to_path_buf();
    std::fs::write(log_dir.join(segment_name(0)), b"").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader_at = Arc::new(AtomicU64::new(0));
    // Hang guard only (500 rounds take about 3 s in a debug build): the test fails if it is reached.
    let deadline = Instant::now() + Duration::from_secs(300);

    let writer = {
        let (log_dir, stop, reads, reader_at) = (log_dir.clone(), stop.clone(), reads.clone(), reader_at.clone());
        std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut base = 0u64;
            for round in 0..ROUNDS {
                if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
                    eprintln!("the writer stopped after {round} rounds");
                    break;
                }
                let mut segment =
                    std::fs::OpenOptions::new().append(true).open(log_dir.join(segment_name(base))).unwrap();
                let cut = rng.random_range(1..LINE.len());
                segment.write_all(&LINE[..cut]).unwrap();
                // Let the reader look at the half-written line a few times.
                let (seen, looks) = (reads.load(Ordering::SeqCst), rng.random_range(1..4));
                while reads.load(Ordering::SeqCst) < seen + looks
                    && !stop.load(Ordering::SeqCst)
                    && Instant::now() < deadline
                {
                    std::thread::yield_now();
                }
                segment.write_all(&LINE[cut..]).unwrap();
                segment.write_all(b"\n").unwrap();
                let previous = base;
                base += LINE.len() as u64 + 1;
                std::fs::write(log_dir.join(segment_name(base)), b"").unwrap();
                while reader_at.load(Ordering::SeqCst) < base
                    && !stop.load(Ordering::SeqCst)
                    && Instant::now() < deadline
                {
                    std::thread::yield_now();
                }
                if reader_at.load(Ordering::SeqCst) < base {
                    // Stopped or out of time before the reader got past it: the segment must stay
                    // (deleting it under the reader would be this harness's fault, not the reader's).
                    break;
                }
                // The reader is past it: keep the directory small, so that each round stays fast.
                let _ = std::fs::remove_file(log_dir.join(segment_name(previous)));
            }
            stop.store(true, Ordering::SeqCst);
        })
    };

    let mut reader = LogReader::new(&log_dir, 1 << 20);
    let (mut position, mut whole, mut broken) = (0u64, 0u64, Vec::new());
    while !stop.load(Ordering::SeqCst) {
        let chunk = reader.read(position).unwrap();
        reads.fetch_add(1, Ordering::SeqCst);
        let Some(chunk) = chunk else { continue };
        for (at, line) in chunk.lines() {
            match line {
                Ok(line) if line == LINE => whole += 1,
                other => broken.push(format!(
                    "at byte {at}: {:?}",
                    other.map(String::from_utf8_lossy).map_err(String::from_utf8_lossy)
                )),
            }
        }
        position = chunk.end;
        reader_at.store(position, Ordering::SeqCst);
        if !broken.is_empty() {
            stop.store(true, Ordering::SeqCst);
        }
    }
    writer.join().unwrap();
    assert!(
        !broken.is_empty() || whole == ROUNDS,
        "the round-trip of writer and reader stopped after {whole} of {ROUNDS} lines (hang guard reached)"
    );
    assert!(
        broken.is_empty(),
        "after {whole} whole lines the reader returned a line still being written, cut in two: {broken:?}"
    );
}

/// README: "`eps process --follow` stops the same way [on SIGTERM]: after its current transaction", exit 0.
/// Its SIGTERM handler used to be installed only when the processor first polled its shutdown future
/// (`server::shutdown_signal()` was an `async fn` whose signal streams were created on first poll, and the
/// loop in src/processor/file.rs polled it only once caught up or after a commit). Until then SIGTERM had its
/// default effect: the process died by the signal (exit status 143, no summary). Nothing half-done was left
/// (the transaction rolls back), but a supervisor saw a failure. Found by the `--follow` scenario, whose
/// last follower used to be stopped before it had anything to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eps_process_follow_stopped_by_sigterm_while_it_starts_exits_0() {
    let seed = fault::seed("eps_process_follow_stopped_by_sigterm_while_it_starts_exits_0");
    let env = Env::new(StoreKind::Sqlite).await;
    // A first chunk that takes a while to read and sum (one segment, read in one batch).
    let events = Events::generate(&mut StdRng::seed_from_u64(seed), 50_000);
    write_log(&env.log_dir(), &events.lines, 64 << 20);
    let mut p = env.spawn_process(&["--follow"]);
    // The database file appears when the processor opens its store: it is running, and working.
    let database = env.data_dir.join("eps.sqlite3");
    within(Duration::from_secs(30), "eps process to open its database", async {
        while !database.exists() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    sigterm(p.child.id().expect("eps process runs")).await;
    let status = within(Duration::from_secs(60), "eps process --follow to stop", p.child.wait()).await.unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "eps process --follow stopped by SIGTERM while starting: {status}\nstdout:\n{}\nstderr:\n{}",
        p.stdout(),
        p.stderr()
    );
    assert!(p.stdout().contains("applied "), "no summary: {}", p.stdout());
}
