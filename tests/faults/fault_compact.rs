//! `eps compact` running beside everything else (issue 15, items 7 and 8): a processor stopped behind
//! the segments compaction removes keeps following from the store's checkpoint; a server whose start-up
//! lists segments that compaction then removes starts anyway; compaction's minimum age is the server's
//! de-duplication window unless told otherwise.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use common::fault::{seed, tally, Report};
use common::shim::Shim;
use common::*;
use rust_decimal::Decimal;

store_tests!(a_processor_behind_a_compacted_segment_goes_on_from_the_checkpoint);

/// Every event of these tests adds this much, so the tally counts events.
const UNIT: &str = "0.25";

type Sent = Vec<(String, &'static str, String)>;

/// Sends `count` events (users `<prefix>-0..6`) one per request, so small segments roll often.
async fn send(env: &Env, url: &str, prefix: &str, count: usize, sent: &mut Sent) {
    let events: Sent = (0..count).map(|i| (format!("{prefix}-{}", i % 7), "add_revenue", UNIT.to_string())).collect();
    let lines: Vec<String> = events.iter().map(|(u, n, v)| event_line(u, n, v)).collect();
    let file = env.write_file(&format!("{prefix}.jsonl"), &lines);
    let out = client(&file, url, &["--batch", "1", "--concurrency", "4"]).await;
    assert!(out.status.success() && out.stdout.contains(&format!("accepted {count} ")), "eps client: {out}");
    sent.extend(events);
}

fn want(sent: &Sent) -> BTreeMap<String, Decimal> {
    expected_totals(sent.iter().map(|(u, n, v)| (u.as_str(), *n, v.as_str())))
}

async fn compact(env: &Env, extra: &[&str], envs: &[(&str, String)]) -> Output {
    let mut a = args(&["compact", "--data-dir", &env.data_dir.display().to_string()]);
    a.extend(env.db.args());
    a.extend(extra.iter().map(|s| s.to_string()));
    let out = run_eps(&a, envs).await;
    assert!(out.status.success(), "eps compact {extra:?}: {out}");
    out
}

async fn checkpoint(env: &Env) -> u64 {
    let mut a = args(&["status", "--json", "--data-dir", &env.data_dir.display().to_string()]);
    a.extend(env.db.args());
    let out = run_eps(&a, &[]).await;
    assert!(out.status.success(), "eps status: {out}");
    serde_json::from_str::<serde_json::Value>(&out.stdout).unwrap()["checkpoint"].as_u64().unwrap()
}

async fn signal(pid: u32, sig: &str) {
    let status = tokio::process::Command::new("kill").args([sig, &pid.to_string()]).status().await.unwrap();
    assert!(status.success(), "kill {sig} {pid}");
}

/// Sets the last-write time of `path` to `ago` before now.
fn backdate(path: &Path, ago: Duration) {
    let file = std::fs::File::options().write(true).open(path).unwrap();
    file.set_modified(SystemTime::now() - ago).unwrap();
}

/// Item 7: processor A follows, is stopped (SIGSTOP) at its position; processor B applies everything
/// after it; `eps compact` removes the segments holding A's position; A resumes. Before the fix A died
/// with "position … is not in the log"; now it re-reads the store's checkpoint and goes on following.
async fn a_processor_behind_a_compacted_segment_goes_on_from_the_checkpoint(kind: StoreKind) {
    let scenario = "compact_slow_processor";
    let seed = seed(scenario);
    let started = Instant::now();
    let env = Env::new(kind).await;
    let server = env.server_with(&["--segment-bytes", "2000"]).await;
    let mut sent = Sent::new();
    send(&env, &server.url, "cs-a", 40, &mut sent).await;

    checkpoint(&env).await; // opens the store first: its tables exist before the polling below
    let mut slow = env.spawn_process(&["--follow"]);
    within(RUN_TIMEOUT, "the follower to apply the first events", async {
        while env.revenues().await != want(&sent) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let slow_pid = slow.child.id().unwrap();
    signal(slow_pid, "-STOP").await;
    let slow_at = checkpoint(&env).await;

    send(&env, &server.url, "cs-b", 100, &mut sent).await;
    let out = env.process(&[]).await;
    assert_eq!(applied_count(&out.stdout), 100, "{out}");
    let out = compact(&env, &["--min-age-secs", "0"], &[]).await;
    let log_start = segments(&env.log_dir())[0].0;
    assert!(log_start > slow_at, "the segment at the stopped follower's byte {slow_at} was not removed: {out}");

    signal(slow_pid, "-CONT").await;
    send(&env, &server.url, "cs-c", 30, &mut sent).await;
    let exited = within(RUN_TIMEOUT, "the follower to apply the last events", async {
        loop {
            if let Some(status) = slow.child.try_wait().unwrap() {
                return Some(status);
            }
            if env.revenues().await == want(&sent) {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(exited.is_none(), "the follower behind the compacted segments exited ({exited:?}): {}", slow.stderr());
    sigterm(slow_pid).await;
    let status = within(Duration::from_secs(20), "the follower to stop", slow.child.wait()).await.unwrap();
    assert!(status.success(), "follower: {status:?}: {}", slow.stderr());
    assert_eq!(
        applied_count(&slow.stdout()),
        70,
        "the follower applies the first and the last events: {}",
        slow.stdout()
    );

    let got = env.revenues().await;
    let t = tally(&want(&sent), &got, UNIT.parse().unwrap());
    Report {
        scenario,
        store: kind.name(),
        seed,
        events_sent: sent.len() as u64,
        events_lost: t.events_lost,
        events_doubled: t.events_doubled,
        duration: started.elapsed(),
        notes: "a --follow processor SIGSTOPped while another applied 100 events and `eps compact` removed the segments at its position, then resumed".into(),
        ..Report::default()
    }
    .write();
    assert_totals(&got, &want(&sent));
}

/// Item 8: the server's start-up lists the segments, then (stalled in the sync of the newest segment by
/// the shim) `eps compact` with its default settings removes the old applied ones, then the
/// de-duplication rebuild reads the list. Before the fix the server exited with "No such file or
/// directory (os error 2)".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_during_the_servers_start_up() {
    let scenario = "compact_during_start_up";
    let seed = seed(scenario);
    let started = Instant::now();
    let env = Env::new(StoreKind::Sqlite).await;
    let mut server = env.server_with(&["--segment-bytes", "2000"]).await;
    let mut sent = Sent::new();
    send(&env, &server.url, "cu-a", 60, &mut sent).await;
    env.process(&[]).await;
    server.sigterm().await;
    server.wait(Duration::from_secs(20)).await;
    // All but the newest segment were last written 25 hours ago (older than the default window, 24 hours,
    // so the default minimum age lets them go); the newest is recent, so the rebuild reads from the start.
    let listed = segments(&env.log_dir());
    assert!(listed.len() >= 3, "{listed:?}");
    for (_, path) in &listed[..listed.len() - 1] {
        backdate(path, Duration::from_secs(25 * 3600));
    }

    let shim = Shim::new(env.tmp.path(), "server-events-");
    shim.stall_syncs_ms(5000);
    let mut a = args(&["server", "--listen", "127.0.0.1:0", "--data-dir", &env.data_dir.display().to_string()]);
    a.extend(env.db.args());
    let mut starting = ChildGuard::spawn(&a, &shim.env(), env.tmp.path());
    within(START_TIMEOUT, "the start-up's sync of the newest segment", async {
        while !shim.stalled() {
            assert!(starting.child.try_wait().unwrap().is_none(), "the server exited: {}", starting.stderr());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let out = compact(&env, &[], &[]).await;
    assert!(shim.stalled(), "compaction outlasted the stall: the race was not exercised; raise the stall");
    shim.disarm();
    assert_eq!(segments(&env.log_dir()).len(), 1, "the default minimum age should remove the old segments: {out}");

    let url = within(START_TIMEOUT, "the server's listening line", async {
        loop {
            let stdout = starting.stdout();
            if let Some(addr) = stdout.lines().find_map(|l| l.strip_prefix("eps server listening on http://")) {
                return format!("http://{addr}");
            }
            if let Some(status) = starting.child.try_wait().unwrap() {
                panic!("the server exited ({status:?}) at start-up: {}", starting.stderr());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    send(&env, &url, "cu-b", 10, &mut sent).await;
    env.process(&[]).await;
    let got = env.revenues().await;
    let t = tally(&want(&sent), &got, UNIT.parse().unwrap());
    Report {
        scenario,
        store: "sqlite",
        seed,
        events_sent: sent.len() as u64,
        events_lost: t.events_lost,
        events_doubled: t.events_doubled,
        duration: started.elapsed(),
        notes: "`eps compact` removed segments between the server's start-up listing them and its de-duplication rebuild reading them (start-up stalled by the shim)".into(),
        ..Report::default()
    }
    .write();
    assert_totals(&got, &want(&sent));
}

/// Item 8, the default: compaction's minimum age is the server's de-duplication window, read from the
/// same variable or configuration key, unless --min-age-secs says otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_minimum_age_is_the_servers_dedup_window() {
    let env = Env::new(StoreKind::Sqlite).await;
    let lines: Vec<String> = (0..40).map(|i| event_line(&format!("ma-{}", i % 3), "add_revenue", UNIT)).collect();
    let written = write_log(&env.log_dir(), &lines, 500);
    assert!(written.len() >= 3, "{written:?}");
    assert_eq!(applied_count(&env.process(&[]).await.stdout), 40);
    // A server once ran on the log: its producer snapshot covers the segments (compaction needs one).
    let mut server = env.server().await;
    within(Duration::from_secs(10), "the server's start-up snapshot", async {
        while !std::fs::read_dir(env.log_dir())
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".snap"))
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    server.kill().await;
    // Written 20 minutes ago: younger than the window the server is given here (1 hour).
    for (_, path) in segments(&env.log_dir()) {
        backdate(&path, Duration::from_secs(20 * 60));
    }
    let count = || segments(&env.log_dir()).len();

    let out = compact(&env, &[], &[("EPS_DEDUP_WINDOW_SECS", "3600".into())]).await;
    assert_eq!(count(), written.len(), "removed segments younger than EPS_DEDUP_WINDOW_SECS: {out}");
    let config = env.tmp.path().join("eps.toml");
    std::fs::write(&config, "dedup-window-secs = 3600\n").unwrap();
    let out = compact(&env, &["--config", &config.display().to_string()], &[]).await;
    assert_eq!(count(), written.len(), "removed segments younger than the server's window (configuration file): {out}");
    // Told otherwise.
    let out = compact(&env, &["--min-age-secs", "600"], &[("EPS_DEDUP_WINDOW_SECS", "3600".into())]).await;
    assert_eq!(count(), 1, "--min-age-secs 600 should remove every applied segment but the newest: {out}");

    // A store's checkpoint that is itself not in the log (here: unapplied bytes gone) stays an error.
    let (base, path) = segments(&env.log_dir()).remove(0);
    let end = base + std::fs::metadata(&path).unwrap().len();
    std::fs::rename(&path, env.log_dir().join(segment_name(end + 100))).unwrap();
    let out = env.process_unchecked(&[]).await;
    let said = format!("the store's checkpoint (byte {end}) is not in the log");
    assert!(!out.status.success() && out.stderr.contains(&said), "{out}");
}
