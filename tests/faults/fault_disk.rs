//! Faults of the disk and the clock, injected into a running server by an LD_PRELOAD shim
//! (`tests/common/faultshim.c`) while processors follow the log: failing and slow syncs, writes that
//! stop half-way (a full disk), a roll that fails at each of its steps, a kill between a write and its
//! sync, a wall clock that steps, directories that must be durable.
//!
//! The oracle is the tests' own bookkeeping of what the server answered: every event of a request
//! answered 200 must be counted exactly once, every event of a request answered 503 (and not retried)
//! never. Expected totals are counts of value-1 events, kept by the test from its own input.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fault::{scaled, seed, Report};
use common::shim::Shim;
use common::*;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;

/// Posts NDJSON lines to `POST /events`; the status (0 when the request itself failed).
async fn post_lines(http: &reqwest::Client, url: &str, lines: &[String]) -> (u16, serde_json::Value) {
    post_ndjson(http, url, lines.join("\n") + "\n").await
}

fn line(user: &str, id: &str) -> String {
    format!(r#"{{"userId":"{user}","name":"add_revenue","value":1,"id":"{id}"}}"#)
}

fn lines(user: &str, tag: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| line(user, &format!("{tag}-{i}"))).collect()
}

/// Waits until the store's totals equal `want` (the followers caught up), or the limit passes.
async fn settle(env: &Env, want: &BTreeMap<String, Decimal>, limit: Duration) -> BTreeMap<String, Decimal> {
    let deadline = Instant::now() + limit;
    loop {
        let got = env.revenues().await;
        if &got == want || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_alive(follower: &mut ChildGuard, what: &str) {
    let exited = follower.child.try_wait().unwrap();
    assert!(exited.is_none(), "{what} exited ({exited:?}); stderr:\n{}", follower.stderr());
    let stderr = follower.stderr();
    assert!(!stderr.contains("not in the log"), "{what} met a position that is not in the log:\n{stderr}");
}

/// Item 1 of the review: a refused append must never be applied, even by a processor that follows
/// the log closely enough to see the refused bytes before the writer cuts them off. The sync is made
/// to stall (the bytes sit in the page cache for 300 ms) and then fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_append_is_never_applied_while_a_processor_follows() {
    let env = Env::new(StoreKind::Sqlite).await;
    let shim = Shim::new(env.tmp.path(), "server-events-");
    let server = env.server_with_env(&[], &shim.env()).await;
    let mut follower = env.spawn_process(&["--follow", "--poll-ms", "1"]);
    let http = http();
    let mut want = BTreeMap::new();
    for round in 0..4 {
        let (status, _) = post_lines(&http, &server.url, &lines("good", &format!("g{round}"), 20)).await;
        assert_eq!(status, 200);
        *want.entry("good".to_string()).or_insert(Decimal::ZERO) += Decimal::from(20);
        shim.stall_syncs_ms(300);
        shim.fail_fdatasync(1);
        let (status, body) = post_lines(&http, &server.url, &lines("ghost", &format!("x{round}"), 50)).await;
        shim.disarm();
        assert_eq!(status, 503, "{body}");
    }
    // After the fault: the log goes on, at the positions the refused groups had.
    let (status, _) = post_lines(&http, &server.url, &lines("after", "a", 7)).await;
    assert_eq!(status, 200);
    want.insert("after".to_string(), Decimal::from(7));
    let got = settle(&env, &want, Duration::from_secs(30)).await;
    assert_eq!(got, want, "refused events applied, or acknowledged ones missing");
    assert_alive(&mut follower, "the follower");
    // And a fresh one-shot run from the checkpoint agrees: the checkpoint denotes the same bytes.
    env.process(&[]).await;
    assert_eq!(env.revenues().await, want);
}

/// Item 1 on a real full disk: the data directory on a 1 MiB tmpfs, filled and freed repeatedly while
/// a processor follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_appends_and_none_of_them_is_applied() {
    let env = Env::new(StoreKind::Sqlite).await;
    let mount = Tmpfs::mount(&env.tmp.path().join("small"), "1m");
    // The store stays outside the small disk: the log is the subject here.
    let data_dir = mount.path.join("data");
    let db = env.tmp.path().join("eps.sqlite3");
    let db_url = format!("sqlite://{}", db.display());
    let server_args = args(&[
        "server",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &data_dir.display().to_string(),
        "--database-url",
        &db_url,
    ]);
    let server = ServerProc::start(&server_args, &[], env.tmp.path()).await;
    let process_args = |extra: &[&str]| {
        let mut a = args(&["process", "--data-dir", &data_dir.display().to_string(), "--database-url", &db_url]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let mut follower = ChildGuard::spawn(&process_args(&["--follow", "--poll-ms", "1"]), &[], env.tmp.path());
    let http = http();
    let filler = mount.path.join("filler");
    let (mut acked, mut refused) = (0u64, 0u64);
    for round in 0..scaled(3, 20) {
        // Leave about 96 KiB free, then send until the disk refuses, then free it again.
        let free = mount.free_bytes();
        let fill = free.saturating_sub(96 * 1024);
        std::fs::write(&filler, vec![b'x'; fill as usize]).unwrap();
        for batch in 0..100 {
            let (status, _) = post_lines(&http, &server.url, &lines("ghost", &format!("r{round}-{batch}"), 200)).await;
            match status {
                200 => acked += 200,
                503 => refused += 200,
                other => panic!("unexpected status {other}"),
            }
        }
        std::fs::remove_file(&filler).unwrap();
    }
    assert!(refused > 0, "the disk never filled: the scenario tested nothing");
    let (status, _) = post_lines(&http, &server.url, &lines("after", "a", 3)).await;
    assert_eq!(status, 200, "the log did not recover once the disk had room again");
    let want = BTreeMap::from([("ghost".to_string(), Decimal::from(acked)), ("after".to_string(), Decimal::from(3))]);
    let read = || async {
        let out =
            run_eps(&args(&["status", "--data-dir", &data_dir.display().to_string(), "--database-url", &db_url]), &[])
                .await;
        out
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let got = loop {
        let got = revenues_in(&db).await;
        if got == want || Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(got, want, "acked {acked}, refused {refused}; status:\n{}", read().await);
    assert_alive(&mut follower, "the follower");
    drop(server);
}

/// The totals in an SQLite store file, by a plain query of the seed's table.
async fn revenues_in(db: &Path) -> BTreeMap<String, Decimal> {
    let Ok(conn) = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return BTreeMap::new();
    };
    let Ok(mut stmt) = conn.prepare("SELECT user_id, revenue FROM users_revenue") else { return BTreeMap::new() };
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))).unwrap();
    rows.map(|r| {
        let (user, revenue) = r.unwrap();
        (user, decimal_of(&revenue))
    })
    .collect()
}

/// A tmpfs of the given size, unmounted when dropped.
struct Tmpfs {
    path: std::path::PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(status.success(), "mounting a tmpfs failed (the fault tests run as root)");
        Tmpfs { path: path.to_path_buf() }
    }

    fn free_bytes(&self) -> u64 {
        let out = std::process::Command::new("df").args(["-B1", "--output=avail"]).arg(&self.path).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().nth(1).unwrap().trim().parse().unwrap()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Item 2: a roll that fails at any of its steps (creating the new segment, its sync, the directory's
/// sync) must not leave two segments claiming the same positions; the next group retries the roll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_roll_failing_at_each_step_leaves_a_log_the_reader_continues_from() {
    #[allow(clippy::type_complexity)] // a table of cases reads best as one
    let steps: [(&str, &str, fn(&Shim)); 3] = [
        ("the new segment's creation", "server-events-", |shim| shim.fail_create(1)),
        ("the new segment's sync", "server-events-", |shim| shim.fail_fsync(1)),
        ("the directory's sync", "/log$", |shim| shim.fail_fsync(1)),
    ];
    for (step, filter, arm) in steps {
        let env = Env::new(StoreKind::Sqlite).await;
        let shim = Shim::new(env.tmp.path(), filter);
        let server = env.server_with_env(&["--segment-bytes", "4096"], &shim.env()).await;
        let http = http();
        let mut acked = 0u64;
        // About 2 KiB of the 4 KiB segment.
        let (status, _) = post_lines(&http, &server.url, &lines("u", "first", 25)).await;
        assert_eq!(status, 200);
        acked += 25;
        // A group that does not fit: the roll fails at this step, the group is refused.
        arm(&shim);
        let (status, body) = post_lines(&http, &server.url, &lines("ghost", "big", 30)).await;
        assert_eq!(status, 503, "{step}: {body}");
        // Small groups that would still fit the old segment must not go there.
        for i in 0..5 {
            let (status, body) = post_lines(&http, &server.url, &lines("u", &format!("small{i}"), 1)).await;
            assert_eq!(status, 200, "{step}: {body}");
            acked += 1;
        }
        let out = env.process_unchecked(&[]).await;
        assert!(out.status.success(), "{step}: eps process failed after a failed roll: {out}");
        let want = BTreeMap::from([("u".to_string(), Decimal::from(acked))]);
        assert_eq!(env.revenues().await, want, "{step}");
        drop(server);
    }
}

/// Item 6: a server killed between its write and its sync must, when restarted, sync those bytes
/// before it trusts them; otherwise a retry would be answered `duplicate` for bytes a power cut could
/// still take back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_syncs_what_a_killed_server_left_before_trusting_it() {
    let env = Env::new(StoreKind::Sqlite).await;
    let shim = Shim::new(env.tmp.path(), "server-events-");
    let mut server = env.server_with_env(&[], &shim.env()).await;
    shim.stall_syncs_ms(10_000);
    let url = server.url.clone();
    let pending = tokio::spawn(async move { post_lines(&http(), &url, &[line("k", "kill-1")]).await });
    within(Duration::from_secs(10), "the append's sync to stall", async {
        while !shim.stalled() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // Written, not synced, not answered: kill now.
    server.kill().await;
    let (status, _) = pending.await.unwrap();
    assert_ne!(status, 200, "an append whose sync never finished was acknowledged");
    shim.disarm();
    shim.count_syncs();
    let server = env.server_with_env(&[], &shim.env()).await;
    assert!(
        shim.syncs_seen() >= 1,
        "the restarted server trusted the newest segment without syncing it; syncs:\n{}",
        shim.trace()
    );
    let (status, body) = post_lines(&http(), &server.url, &[line("k", "kill-1")]).await;
    assert_eq!(status, 200);
    assert_eq!(body["duplicates"], 1, "the retry of the killed append: {body}");
}

/// Item 7: de-duplication expiry follows the monotonic clock; a wall clock stepped forward (and back)
/// forgets no id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wall_clock_step_forgets_no_id() {
    let env = Env::new(StoreKind::Sqlite).await;
    let shim = Shim::new(env.tmp.path(), "server-events-");
    let server = env.server_with_env(&[], &shim.env()).await;
    let http = http();
    let (status, body) = post_lines(&http, &server.url, &[line("c", "clock-1")]).await;
    assert_eq!((status, &body["duplicates"]), (200, &serde_json::json!(0)));
    for step_ms in [1_000_000i64, -1_000_000] {
        shim.wall_clock_offset_ms(step_ms);
        // Another append lets the window expire what it believes is old.
        let (status, _) = post_lines(&http, &server.url, &[line("c", &format!("step{step_ms}"))]).await;
        assert_eq!(status, 200);
        shim.wall_clock_offset_ms(0);
        let (status, body) = post_lines(&http, &server.url, &[line("c", "clock-1")]).await;
        assert_eq!(status, 200);
        assert_eq!(body["duplicates"], 1, "after a {step_ms} ms step the retry was stored again: {body}");
    }
    env.process(&[]).await;
    assert_eq!(env.revenues().await, BTreeMap::from([("c".to_string(), Decimal::from(3))]));
}

/// Item 9: every directory eps creates is synced into its parent before anything in it is
/// acknowledged: a power cut could otherwise take the whole log away with its directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_directory_eps_creates_is_synced_into_its_parent() {
    let env = Env::new(StoreKind::Sqlite).await;
    let shim = Shim::new(env.tmp.path(), "");
    let root = env.tmp.path().canonicalize().unwrap();
    let data_dir = root.join("deep/er/data");
    let server_args = args(&["server", "--listen", "127.0.0.1:0", "--data-dir", &data_dir.display().to_string()]);
    let server = ServerProc::start(&server_args, &shim.env(), env.tmp.path()).await;
    let (status, _) = post_lines(&http(), &server.url, &[line("d", "dir-1")]).await;
    assert_eq!(status, 200);
    let trace = shim.trace();
    for dir in [root.join("deep"), root.join("deep/er"), data_dir.clone(), data_dir.join("log")] {
        let parent = dir.parent().unwrap().display().to_string();
        assert!(
            trace.lines().any(|l| l.split_once(' ').is_some_and(|(_, p)| p == parent)),
            "{} was created but its parent {parent} never synced; syncs:\n{trace}",
            dir.display()
        );
    }
    drop(server);
    // The processor's own files: the dead-letter file's directory and the store's.
    let out = run_eps(&args(&["process", "--data-dir", &data_dir.display().to_string()]), &shim.env()).await;
    assert!(out.status.success(), "{out}");
}

/// The long scenario: random sync failures, half-written groups and slow syncs under load, with two
/// processors following; every 200 applied once, every 503 never, the processors never stall.
async fn random_disk_faults_under_load_with_followers(kind: StoreKind) {
    let scenario = "disk_faults_followers";
    let seed = seed(scenario);
    let started = Instant::now();
    let env = Env::new(kind).await;
    let shim = Arc::new(Shim::new(env.tmp.path(), "server-events-"));
    let server = env.server_with_env(&["--segment-bytes", "65536"], &shim.env()).await;
    let mut followers: Vec<ChildGuard> = (0..2).map(|_| env.spawn_process(&["--follow", "--poll-ms", "1"])).collect();
    let run_for = scaled(Duration::from_secs(4), Duration::from_secs(120));
    let users = 40;
    let want: Arc<Mutex<BTreeMap<String, Decimal>>> = Arc::default();
    let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The fault task: every few milliseconds, one fault of a random kind, then a pause.
    let faults = {
        let (shim, stop) = (shim.clone(), stop.clone());
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut injected = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match rng.random_range(0..4) {
                    0 => shim.fail_fdatasync(1),
                    1 => shim.fail_pwrite(1),
                    2 => {
                        shim.stall_syncs_ms(rng.random_range(5..60));
                        shim.fail_fdatasync(1);
                    }
                    _ => shim.stall_syncs_ms(rng.random_range(5..40)),
                }
                injected += 1;
                tokio::time::sleep(Duration::from_millis(rng.random_range(10..60))).await;
                shim.disarm();
                tokio::time::sleep(Duration::from_millis(rng.random_range(10..80))).await;
            }
            shim.disarm();
            injected
        })
    };
    let senders: Vec<_> = (0..4)
        .map(|sender| {
            let (url, want, refused) = (server.url.clone(), want.clone(), refused.clone());
            tokio::spawn(async move {
                let http = http();
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ sender);
                let deadline = Instant::now() + run_for;
                for b in 0.. {
                    if Instant::now() > deadline {
                        break;
                    }
                    let user = format!("user{}", rng.random_range(0..users));
                    let batch = lines(&user, &format!("s{sender}-b{b}"), rng.random_range(1..40));
                    // A refused batch is retried (same ids) half of the time, else given up.
                    loop {
                        let (status, body) = post_lines(&http, &url, &batch).await;
                        match status {
                            200 => {
                                assert_eq!(body["duplicates"], 0, "a refused attempt was stored: {body}");
                                *want.lock().unwrap().entry(user.clone()).or_insert(Decimal::ZERO) +=
                                    Decimal::from(batch.len());
                                break;
                            }
                            503 if rng.random_bool(0.5) => continue,
                            503 => {
                                refused.fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
                                break;
                            }
                            other => panic!("unexpected status {other}: {body}"),
                        }
                    }
                }
            })
        })
        .collect();
    for s in senders {
        s.await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let injected = faults.await.unwrap();
    let want = want.lock().unwrap().clone();
    let got = settle(&env, &want, Duration::from_secs(60)).await;
    let tally = common::fault::tally(&want, &got, Decimal::ONE);
    for (i, f) in followers.iter_mut().enumerate() {
        assert_alive(f, &format!("follower {i}"));
    }
    let sent: u64 = want.values().map(|d| u64::try_from(d.mantissa()).unwrap()).sum::<u64>()
        + refused.load(std::sync::atomic::Ordering::Relaxed);
    Report {
        scenario,
        store: kind.name(),
        seed,
        events_sent: sent,
        kills: injected,
        events_lost: tally.events_lost,
        events_doubled: tally.events_doubled,
        duration: started.elapsed(),
        notes: "fdatasync EIO, half-written groups (ENOSPC), slow syncs at random moments under load, 2 processors following; kills = faults injected".into(),
        ..Report::default()
    }
    .write();
    let refused = refused.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "{scenario}: {sent} events sent, {refused} refused and not retried, {injected} faults injected, {tally:?}"
    );
    assert!(refused > 0, "no append was refused: the faults never met a group");
    assert_eq!(got, want, "{tally:?}");
}

store_tests!(random_disk_faults_under_load_with_followers);
