//! De-duplication for days (issue 17, items 3 and 4), against a real `eps server` on the file log: ids
//! of the producer scheme (`<16 hex>-<sequence>`, what `eps client` sends) are recognised whatever the
//! traffic in between, across a SIGKILL, across `eps compact` (the producer snapshot keeps what the
//! removed segments held), with a torn or garbage snapshot (start-up falls back), until the producer has
//! been idle past `--dedup-horizon-secs`; an id that comes again with other content is answered 409
//! (per line in a batch) and stores nothing, a repeat with the same content `200 duplicate`.
//!
//! To push the id window past its cap cheaply, the servers here run with `--dedup-max-ids 1000` and
//! small segments: 10,000 events from other producers then forget every id of the first file in the
//! window, which is what 10,000,000 events do with the default cap.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use rust_decimal::Decimal;
use serde_json::Value;

const N: usize = 1000;
/// The id window's cap in these tests: 10,000 other events push the first file's ids out of it.
const SMALL_WINDOW: &[&str] = &["--dedup-max-ids", "1000", "--segment-bytes", "65536"];

fn lines(n: usize, user: &str) -> Vec<String> {
    (1..=n).map(|i| event_line(&format!("{user}{}", i % 20), "add_revenue", &i.to_string())).collect()
}

/// `eps client FILE` with a fresh state directory (as on another machine): `(sent, accepted, duplicates)`.
async fn send_fresh(env: &Env, file: &Path, url: &str) -> (u64, u64, u64, Output) {
    let state = env.tmp.path().join(format!("state-{:016x}", rand::random::<u64>()));
    let a = args(&[
        "client",
        &file.display().to_string(),
        "--url",
        url,
        "--progress",
        "quiet",
        "--state-dir",
        &state.display().to_string(),
    ]);
    let out = run_eps_in(env.tmp.path(), &a, &[]).await;
    let line =
        out.stdout.lines().find(|l| l.starts_with("sent ")).unwrap_or_else(|| panic!("no summary: {out}")).to_string();
    let number_after = |word: &str| -> u64 {
        let rest = line.split(word).nth(1).unwrap_or_else(|| panic!("no {word:?} in {line:?}"));
        rest.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
    };
    (number_after("sent "), number_after("accepted "), number_after("("), out)
}

/// 10,000 events from 50 other producers (scheme ids), in batches.
async fn other_traffic(url: &str) {
    let http = http();
    for p in 0..50u64 {
        let producer = format!("{:016x}", 0xabcd_0000_0000_0000u64 + p);
        let body: Vec<String> = (1..=200)
            .map(|i| format!(r#"{{"userId":"other{p}","name":"add_revenue","value":1,"id":"{producer}-{i}"}}"#))
            .collect();
        let (status, answer) = post_ndjson(&http, url, body.join("\n")).await;
        assert_eq!((status, answer["accepted"].as_u64()), (200, Some(200)), "{answer}");
    }
}

fn ids_in_log(log_dir: &Path) -> BTreeMap<String, usize> {
    let mut ids = BTreeMap::new();
    for line in log_lines(log_dir) {
        if let Some(id) = line["id"].as_str() {
            *ids.entry(id.to_string()).or_insert(0) += 1;
        }
    }
    ids
}

fn snapshots(log_dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(log_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name().unwrap().to_string_lossy().starts_with(".producers-")
                && p.extension().is_some_and(|e| e == "snap")
        })
        .collect();
    out.sort();
    out
}

/// Sends the first file and the other traffic; returns the file.
async fn first_file_then_others(env: &Env, url: &str) -> PathBuf {
    let file = env.write_file("first.jsonl", &lines(N, "first"));
    let (sent, accepted, dups, out) = send_fresh(env, &file, url).await;
    assert_eq!((sent, accepted, dups), (N as u64, N as u64, 0), "{out}");
    other_traffic(url).await;
    assert_eq!(log_lines(&env.log_dir()).len(), N + 10_000);
    file
}

/// The first file re-sent with a fresh state directory: all duplicates, nothing stored.
async fn assert_all_duplicates(env: &Env, file: &Path, url: &str) {
    let (sent, accepted, dups, out) = send_fresh(env, file, url).await;
    assert_eq!((sent, accepted, dups), (N as u64, N as u64, N as u64), "the re-sent file: {out}");
    let twice: Vec<_> = ids_in_log(&env.log_dir()).into_iter().filter(|(_, c)| *c > 1).take(5).collect();
    assert!(twice.is_empty(), "ids stored twice: {twice:?}");
}

/// Newlines in a log, read one segment at a time (the long run's log is a gigabyte).
fn count_lines(log_dir: &Path) -> usize {
    segments(log_dir).iter().map(|(_, p)| std::fs::read(p).unwrap().iter().filter(|&&b| b == b'\n').count()).sum()
}

/// `events` events from 1,000 other producers (scheme ids, as other `eps client` runs send them), in
/// 1,000-event batches of one producer, 4 in flight.
async fn other_runs(url: &str, events: usize) {
    use futures::StreamExt as _;
    let per_producer = events / 1000;
    let http = http();
    let batches: Vec<(usize, usize)> =
        (1..=per_producer).step_by(1000).flat_map(|first| (0..1000).map(move |p| (p, first))).collect();
    let mut answers = futures::stream::iter(batches)
        .map(|(p, first)| {
            let http = http.clone();
            async move {
                let producer = format!("{:016x}", 0x0123_0000_0000_0000u64 + p as u64);
                let last = (first + 999).min(per_producer);
                let body: Vec<String> = (first..=last)
                    .map(|i| format!(r#"{{"userId":"run{p}","name":"add_revenue","value":1,"id":"{producer}-{i}"}}"#))
                    .collect();
                let (status, answer) = post_ndjson(&http, url, body.join("\n")).await;
                assert_eq!((status, answer["accepted"].as_u64()), (200, Some((last - first + 1) as u64)), "{answer}");
            }
        })
        .buffer_unordered(4);
    while answers.next().await.is_some() {}
}

/// A 1,000-event file, then 10,000 events from other producers (past the id window's cap), the server
/// SIGKILLed and restarted, the file re-sent with a fresh state dir: 1,000 duplicates, nothing stored.
/// The long run (scripts/fault-suite) does it at full size with the server's defaults: 10,000,000
/// events from 1,000 other producers after the file, far past the default id window (458,752 ids).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_resent_after_others_traffic_and_a_sigkill_is_all_duplicates() {
    let scenario = "file_resent_after_10m_others_and_a_sigkill";
    let seed = common::fault::seed(scenario);
    let started = std::time::Instant::now();
    let env = Env::new(StoreKind::Sqlite).await;
    let settings: &[&str] = common::fault::scaled(SMALL_WINDOW, &[]);
    let others = common::fault::scaled(10_000, 10_000_000);
    let mut server = env.server_with(settings).await;
    let file = if common::fault::long() {
        let file = env.write_file("first.jsonl", &lines(N, "first"));
        let (sent, accepted, dups, out) = send_fresh(&env, &file, &server.url).await;
        assert_eq!((sent, accepted, dups), (N as u64, N as u64, 0), "{out}");
        other_runs(&server.url, others).await;
        file
    } else {
        first_file_then_others(&env, &server.url).await
    };
    assert_eq!(count_lines(&env.log_dir()), N + others);
    server.kill().await;
    let restarted = std::time::Instant::now();
    let server = env.server_with(settings).await;
    let startup = restarted.elapsed();
    let (sent, accepted, dups, out) = send_fresh(&env, &file, &server.url).await;
    assert_eq!((sent, accepted, dups), (N as u64, N as u64, N as u64), "the re-sent file: {out}");
    assert_eq!(count_lines(&env.log_dir()), N + others, "nothing stored by the re-send");
    if !common::fault::long() {
        let twice: Vec<_> = ids_in_log(&env.log_dir()).into_iter().filter(|(_, c)| *c > 1).take(5).collect();
        assert!(twice.is_empty(), "ids stored twice: {twice:?}");
    }
    common::fault::Report {
        scenario,
        store: "sqlite",
        seed,
        events_sent: (N + others + N) as u64,
        kills: 1,
        duration: started.elapsed(),
        notes: format!(
            "a {N}-event file sent by eps client, then {others} events from 1000 other producers (scheme ids){}, the \
             server SIGKILLed and restarted (ready in {:.1} s), the file re-sent with a fresh state dir: {dups} \
             duplicates, the log {} lines before and after",
            if common::fault::long() { ", server defaults" } else { " past a 1000-id window" },
            startup.as_secs_f64(),
            N + others
        ),
        ..Default::default()
    }
    .write();
}

/// The same after `eps compact` removed every segment that held the first file: the restarted server
/// loads the producer snapshot, which kept what those segments held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_resent_after_compaction_removed_its_segments_is_all_duplicates() {
    let env = Env::new(StoreKind::Sqlite).await;
    let mut server = env.server_with(SMALL_WINDOW).await;
    let file = first_file_then_others(&env, &server.url).await;
    server.kill().await;
    env.process(&[]).await;
    let mut a = args(&["compact", "--data-dir", &env.data_dir.display().to_string(), "--min-age-secs", "0"]);
    a.extend(env.db.args());
    let out = run_eps(&a, &[]).await;
    assert!(out.status.success(), "eps compact: {out}");
    let left = ids_in_log(&env.log_dir());
    assert!(
        !left.keys().any(|id| id.ends_with("-1") && !id.starts_with("abcd")),
        "compaction left the first file's segment"
    );
    assert!(left.len() < 10_000, "compaction removed little: {} ids left", left.len());
    let server = env.server_with(SMALL_WINDOW).await;
    assert_all_duplicates(&env, &file, &server.url).await;
    assert_eq!(log_lines(&env.log_dir()).len(), left.len(), "nothing stored by the re-send");
}

/// The newest snapshot garbage and the one before it torn: the server starts, falls back to reading the
/// whole log, and answers the re-sent file as duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_or_garbage_snapshot_falls_back_to_the_log() {
    let env = Env::new(StoreKind::Sqlite).await;
    let mut server = env.server_with(SMALL_WINDOW).await;
    let file = first_file_then_others(&env, &server.url).await;
    server.kill().await;
    let snaps = snapshots(&env.log_dir());
    assert!(snaps.len() >= 2, "snapshots: {snaps:?}");
    let newest = snaps.last().unwrap();
    std::fs::write(newest, b"not a snapshot at all").unwrap();
    let older = &snaps[snaps.len() - 2];
    let len = std::fs::metadata(older).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(older).unwrap().set_len(len / 2).unwrap();
    let server = env.server_with(SMALL_WINDOW).await;
    assert_all_duplicates(&env, &file, &server.url).await;
    assert_eq!(log_lines(&env.log_dir()).len(), N + 10_000);
}

/// With a 4-second horizon (and a 1-second id window): a re-send 1.5 s later is all duplicates (only the
/// producer ranges know it), also after a SIGKILL and restart (the horizon measured from the log's
/// `ts`); once the producer has been idle past the horizon, it is forgotten and the file stored again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_idle_past_the_horizon_is_forgotten() {
    let env = Env::new(StoreKind::Sqlite).await;
    let flags = &["--dedup-horizon-secs", "4", "--dedup-window-secs", "1"];
    let mut server = env.server_with(flags).await;
    let n = 100;
    let file = env.write_file("short.jsonl", &lines(n, "h"));
    let (_, accepted, dups, out) = send_fresh(&env, &file, &server.url).await;
    assert_eq!((accepted, dups), (n as u64, 0), "{out}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.kill().await;
    let server = env.server_with(flags).await;
    let (_, accepted, dups, out) = send_fresh(&env, &file, &server.url).await;
    assert_eq!((accepted, dups), (n as u64, n as u64), "within the horizon, after a restart: {out}");
    assert_eq!(log_lines(&env.log_dir()).len(), n);
    // The duplicates above are no activity (nothing stored): the producer was last active at the send.
    tokio::time::sleep(Duration::from_millis(4000)).await;
    let (_, accepted, dups, out) = send_fresh(&env, &file, &server.url).await;
    assert_eq!((accepted, dups), (n as u64, 0), "past the horizon: {out}");
    assert_eq!(log_lines(&env.log_dir()).len(), 2 * n);
}

/// An id that comes again with other content: 409 on /liveEvent, a line error in a batch (the client
/// counts it as refused and does not retry it), nothing stored; the same content stays 200 duplicate;
/// after a restart too (the id window keeps each id's content digest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_again_with_other_content_is_a_conflict_and_stores_nothing() {
    let env = Env::new(StoreKind::Sqlite).await;
    let mut server = env.server().await;
    let http = http();
    let event = |user: &str, value: &str, id: &str| {
        format!(r#"{{"userId":"{user}","name":"add_revenue","value":{value},"id":"{id}"}}"#)
    };
    let scheme = "00000000000000aa-7";
    for id in ["order-1", scheme] {
        let (status, answer) = post_event(&http, &server.url, &event("a", "10", id)).await;
        assert_eq!((status, answer["duplicate"].as_bool()), (200, None), "{answer}");
        let (status, answer) = post_event(&http, &server.url, &event("a", "10.0", id)).await;
        assert_eq!(
            (status, answer["duplicate"].as_bool()),
            (200, Some(true)),
            "the same content (10.0 = 10): {answer}"
        );
        for changed in [
            event("a", "11", id),
            event("b", "10", id),
            format!(r#"{{"userId":"a","name":"subtract_revenue","value":10,"id":"{id}"}}"#),
        ] {
            let (status, answer) = post_event(&http, &server.url, &changed).await;
            assert_eq!(status, 409, "{changed}: {answer}");
            assert!(answer["error"].as_str().unwrap().contains("other content"), "{answer}");
        }
    }
    assert_eq!(log_lines(&env.log_dir()).len(), 2);

    server.kill().await;
    let server = env.server().await;
    let body = [
        event("a", "10", "order-1"),
        event("a", "12", "order-1"),
        event("c", "1", "order-2"),
        "{\"bad\":".into(),
        event("z", "1", scheme),
    ];
    let (status, answer) = post_ndjson(&http, &server.url, body.join("\n")).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (answer["accepted"].as_u64(), answer["duplicates"].as_u64(), answer["rejected"].as_u64()),
        (Some(2), Some(1), Some(3)),
        "{answer}"
    );
    let lines: Vec<u64> = answer["errors"].as_array().unwrap().iter().map(|e| e["line"].as_u64().unwrap()).collect();
    assert_eq!(lines, vec![2, 4, 5], "{answer}");
    assert!(answer["errors"][0]["error"].as_str().unwrap().starts_with("conflict"), "{answer}");
    assert_eq!(log_lines(&env.log_dir()).len(), 3);

    // The client: a conflicting line is refused once, not retried, and named.
    let file = env.write_file("conflict.jsonl", &[event("a", "99", "order-1"), event("d", "5", "order-3")]);
    let state = env.tmp.path().join("state");
    for batch in ["1", "100"] {
        let a = args(&[
            "client",
            &file.display().to_string(),
            "--url",
            &server.url,
            "--progress",
            "quiet",
            "--batch",
            batch,
            "--state-dir",
            &state.display().to_string(),
            "--from-start",
        ]);
        let out = run_eps_in(env.tmp.path(), &a, &[]).await;
        assert_eq!(out.code(), Some(1), "{out}");
        assert!(out.stdout.contains("rejected 1"), "batch {batch}: {out}");
        assert!(out.stderr.contains("line 1") && out.stderr.contains("other content"), "batch {batch}: {out}");
    }
    assert_eq!(log_lines(&env.log_dir()).len(), 4, "order-3 stored once, order-1 never again");
    let stored: Vec<Value> = log_lines(&env.log_dir());
    assert_eq!(stored.iter().filter(|l| l["id"] == "order-1").count(), 1);
}

/// Producer snapshots that cannot be written (every create of one fails, as on a full or broken disk)
/// fail no append and delay no reader: a `--follow` processor applies every event exactly, and a
/// restart without any snapshot reads the producers back from the log, so the re-sent file is all
/// duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_that_cannot_be_written_fail_no_append_and_no_reader() {
    let env = Env::new(StoreKind::Sqlite).await;
    let shim = common::shim::Shim::new(env.tmp.path(), ".producers-");
    shim.fail_create(1_000_000);
    let mut server = env.server_with_env(SMALL_WINDOW, &shim.env()).await;
    let _follower = env.spawn_process(&["--follow"]);
    let file = first_file_then_others(&env, &server.url).await;
    assert!(snapshots(&env.log_dir()).is_empty(), "a snapshot was written through the shim");
    assert!(server.stderr().contains("cannot write the producer snapshot"), "{}", server.stderr());

    // Every event applied once: 1 + 2 + … + 1000 from the first file, 10,000 × 1 from the others.
    let want = Decimal::from(N * (N + 1) / 2 + 10_000);
    within(Duration::from_secs(60), "the follower to apply every event", async {
        while env.revenues().await.values().sum::<Decimal>() != want {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;

    server.kill().await;
    let server = env.server_with(SMALL_WINDOW).await;
    assert_all_duplicates(&env, &file, &server.url).await;
    assert_eq!(log_lines(&env.log_dir()).len(), N + 10_000);
}
