//! A checkpoint counts one log. A JetStream stream deleted and recreated, a stream whose partition
//! count or limits differ from the processes', messages removed by retention before they were applied,
//! a file log replaced under the same store: each is refused or reported, loudly, never skipped in
//! silence (issue 15, items 1, 3 and 4).
//!
//! Each test starts its own `nats-server -js` on a free port (or none) and uses a fresh store.

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::nats::{follower, free_ports, Nats};
use common::*;
use serde_json::Value;

/// `eps server --log URL` with extra flags, its own data directory.
async fn nats_server(dir: &Path, nats: &str, name: &str, extra: &[&str]) -> ServerProc {
    let data = dir.join(name);
    std::fs::create_dir_all(&data).unwrap();
    let mut a = args(&["server", "--listen", "127.0.0.1:0", "--data-dir", &data.display().to_string(), "--log", nats]);
    a.extend(extra.iter().map(|s| s.to_string()));
    ServerProc::start(&a, &[], dir).await
}

/// One event as a JSON Lines body.
fn event(user: &str, value: u32, id: &str) -> String {
    format!("{{\"userId\":\"{user}\",\"name\":\"add_revenue\",\"value\":{value},\"id\":\"{id}\"}}\n")
}

/// Posts `body` until it is answered 200 (a client retrying 503s), for at most `limit`.
async fn post_until_accepted(url: &str, body: &str, limit: Duration) -> Value {
    let http = http();
    let started = Instant::now();
    loop {
        let (status, answer) = post_ndjson(&http, url, body).await;
        if status == 200 {
            return answer;
        }
        assert!(started.elapsed() < limit, "still {status} after {limit:?}: {answer}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `eps process --log URL [extra]` once, on `db`.
async fn process(nats: &str, db: &TestDb, extra: &[&str]) -> Output {
    let mut a = args(&["process", "--log", nats]);
    a.extend(db.args());
    a.extend(extra.iter().map(|s| s.to_string()));
    run_eps(&a, &[]).await
}

/// `eps status --log URL --json`.
async fn status_json(nats: &str, db: &TestDb, extra: &[&str]) -> Value {
    let mut a = args(&["status", "--json", "--log", nats]);
    a.extend(db.args());
    a.extend(extra.iter().map(|s| s.to_string()));
    let out = run_eps(&a, &[]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

/// `eps status --log URL` as text.
async fn status_text(nats: &str, db: &TestDb) -> String {
    let mut a = args(&["status", "--log", nats]);
    a.extend(db.args());
    let out = run_eps(&a, &[]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    out.stdout
}

async fn jetstream_of(nats: &str) -> jetstream::Context {
    jetstream::new(async_nats::connect(nats).await.unwrap())
}

/// The stream's creation time as eps names it in identities (RFC 3339, nanoseconds, UTC).
async fn created(nats: &str) -> String {
    let c = common::nats::stream_info(nats, "EPS_EVENTS").await.unwrap().created;
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
        c.year(),
        c.month() as u8,
        c.day(),
        c.hour(),
        c.minute(),
        c.second(),
        c.nanosecond()
    )
}

/// The revenue of `user` in the database (0 when it has none).
async fn revenue(db: &TestDb, dir: &Path, user: &str) -> String {
    db.raw_revenue(dir, user).await.unwrap_or_else(|| "0".into())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_and_recreated_stream_is_refused_until_adopted_and_nothing_acknowledged_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start(dir.path()).await;
    let db = TestDb::new(StoreKind::Postgres).await;
    let server = nats_server(dir.path(), &nats.url(), "server", &[]).await;

    // 23 events, one message each, applied: the checkpoint of u1's partition is far into the stream.
    for i in 0..23 {
        post_until_accepted(&server.url, &event("u1", 1, &format!("old-{i}")), Duration::from_secs(20)).await;
    }
    let out = process(&nats.url(), &db, &[]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains("applied 23 events"), "{out}");
    let old_created = created(&nats.url()).await;
    // A --follow processor is running when the stream goes.
    let mut running = follower(dir.path(), &nats.url(), &db, &[]);

    // An operator deletes the stream. The server notices at its next append and makes it again: the
    // client's retries of 503 get through, 5 events for u1 are acknowledged in the new stream.
    let js = jetstream_of(&nats.url()).await;
    js.delete_stream("EPS_EVENTS").await.unwrap();
    for i in 0..5 {
        post_until_accepted(&server.url, &event("u1", 1, &format!("new-{i}")), Duration::from_secs(30)).await;
    }

    // The running processor stops, naming both streams; nothing of the new stream was applied.
    let exit = within(Duration::from_secs(30), "the --follow processor to refuse the new stream", running.child.wait())
        .await
        .unwrap();
    let stderr = running.stderr();
    assert!(!exit.success(), "the processor went on: {stderr}");
    assert!(stderr.contains(&old_created) && stderr.contains("--adopt-new-log"), "{stderr}");
    assert!(
        server.stderr().contains("the JetStream stream is gone"),
        "the server did not say so:\n{}",
        server.stderr()
    );
    // A new one-shot run refuses too, with both identities, exit 1.
    let out = process(&nats.url(), &db, &[]).await;
    assert_eq!(out.code(), Some(1), "{out}");
    let new_created = created(&nats.url()).await;
    assert_ne!(new_created, old_created);
    assert!(out.stderr.contains(&old_created) && out.stderr.contains(&new_created), "{out}");
    assert_eq!(revenue(&db, dir.path(), "u1").await, "23");
    // eps status does not say "lag 0": it says the checkpoints count another stream.
    let status = status_json(&nats.url(), &db, &[]).await;
    assert!(status["identity_mismatch"].as_str().is_some_and(|s| s.contains(&old_created)), "{status}");
    assert!(status["identity"].as_str().is_some_and(|s| s.contains(&new_created)), "{status}");
    assert!(status["partitions"].as_array().unwrap().iter().all(|p| p["lag_messages"].is_null()), "{status}");
    let text = status_text(&nats.url(), &db).await;
    assert!(!text.contains("lag              0") && text.contains("MISMATCH"), "{text}");

    // The documented way out: adopt the new stream from its first message, once.
    let out = process(&nats.url(), &db, &["--adopt-new-log"]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains("applied 5 events"), "{out}");
    assert!(out.stderr.contains("adopted") && out.stderr.contains("had applied up to 23"), "{out}");
    assert_eq!(revenue(&db, dir.path(), "u1").await, "28");
    let status = status_json(&nats.url(), &db, &[]).await;
    assert!(status["identity_mismatch"].is_null(), "{status}");
    let lag: u64 = status["partitions"].as_array().unwrap().iter().map(|p| p["lag_messages"].as_u64().unwrap()).sum();
    assert_eq!(lag, 0, "{status}");
    // And afterwards processing is ordinary again: nothing twice.
    let out = process(&nats.url(), &db, &[]).await;
    assert!(out.code() == Some(0) && out.stdout.contains("applied 0 events"), "{out}");
    assert_eq!(revenue(&db, dir.path(), "u1").await, "28");
}

#[tokio::test(flavor = "multi_thread")]
async fn servers_and_processors_with_another_partition_count_are_refused_with_both_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start(dir.path()).await;
    let db = TestDb::new(StoreKind::Postgres).await;
    let sixteen = nats_server(dir.path(), &nats.url(), "sixteen", &[]).await;
    let four = nats_server(dir.path(), &nats.url(), "four", &["--nats-partitions", "4"]).await;

    // The same 20-event batch (same ids) to both: the first stores it; the second must not store it
    // again under another partitioning (JetStream's de-duplication works per message, and the
    // processors' per partition, so a second partitioning would count events twice).
    let body: String = (0..20).map(|i| event(&format!("user{i}"), 1, &format!("batch-{i}"))).collect();
    let answer = post_until_accepted(&sixteen.url, &body, Duration::from_secs(20)).await;
    assert_eq!((answer["accepted"].as_u64(), answer["duplicates"].as_u64()), (Some(20), Some(0)), "{answer}");
    let (status, answer) = post_ndjson(&http(), &four.url, body.clone()).await;
    assert_eq!(status, 503, "a 4-partition server appended to a 16-partition stream: {answer}");
    let log = four.stderr();
    assert!(log.contains("partitions") && log.contains("has 16") && log.contains("expects 4"), "{log}");

    // A processor told 4 partitions refuses to start, with both numbers.
    let out = process(&nats.url(), &db, &["--nats-partitions", "4"]).await;
    assert!(out.code().is_some_and(|c| c != 0), "a 4-partition processor ran on a 16-partition stream: {out}");
    assert!(out.stderr.contains("has 16") && out.stderr.contains("expects 4"), "{out}");
    // eps status tells the same.
    let status = status_json(&nats.url(), &db, &["--nats-partitions", "4"]).await;
    assert!(status["settings_mismatches"].to_string().contains("has 16"), "{status}");

    // With the stream's count, each event is applied once.
    let out = process(&nats.url(), &db, &[]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains("applied 20 events"), "{out}");
    let total: u64 = db.revenues(dir.path()).await.values().map(|v| v.to_string().parse::<u64>().unwrap()).sum();
    assert_eq!(total, 20);
}

/// The Prometheus text of `http://addr/metrics`.
async fn metrics_text(addr: &str) -> String {
    match http().get(format!("http://{addr}/metrics")).send().await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reconfigured_stream_is_refused_and_messages_removed_before_they_were_applied_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start(dir.path()).await;
    let db = TestDb::new(StoreKind::Postgres).await;
    let server = nats_server(dir.path(), &nats.url(), "server", &[]).await;
    for i in 0..3 {
        post_until_accepted(&server.url, &event("u1", 1, &format!("a-{i}")), Duration::from_secs(20)).await;
    }
    let out = process(&nats.url(), &db, &[]).await;
    assert!(out.code() == Some(0) && out.stdout.contains("applied 3 events"), "{out}");
    let js = jetstream_of(&nats.url()).await;

    // An operator lowers the stream's max_msgs to 5: the limits eps relies on are no longer the
    // stream's. A processor refuses to start, with both values; the server refuses appends.
    let mut config = js.get_stream("EPS_EVENTS").await.unwrap().info().await.unwrap().config.clone();
    config.max_messages = 5;
    js.update_stream(config.clone()).await.unwrap();
    let out = process(&nats.url(), &db, &[]).await;
    assert_ne!(out.code(), Some(0), "{out}");
    assert!(
        out.stderr.contains("max_msgs (--nats-max-msgs): the stream has 5, this process expects unlimited"),
        "{out}"
    );
    let started = Instant::now();
    loop {
        let (status, _) = post_ndjson(&http(), &server.url, event("u1", 1, "refused")).await;
        if status == 503 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the server still appends to the reconfigured stream");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(server.stderr().contains("max_msgs (--nats-max-msgs): the stream has 5"), "{}", server.stderr());
    config.max_messages = -1;
    js.update_stream(config).await.unwrap();
    // (Probes the server stored before it looked again are applied here.)
    let out = process(&nats.url(), &db, &[]).await;
    assert_eq!(out.code(), Some(0), "{out}");

    // Removing what was applied loses nothing, and nothing is reported: every partition's checkpoint
    // is past those messages, not only u1's (the processor moves idle partitions past the others').
    js.get_stream("EPS_EVENTS").await.unwrap().purge().await.unwrap();
    let out = process(&nats.url(), &db, &[]).await;
    assert!(out.code() == Some(0) && !out.stderr.contains("LOST"), "{out}");
    let status = status_json(&nats.url(), &db, &[]).await;
    assert_eq!(status["lost"], serde_json::json!([]), "{status}");
    let partition = eps::log::user_key("u1") % 16;
    let checkpoint = status["partitions"][partition as usize]["checkpoint"].as_u64().unwrap();
    let applied: u64 = revenue(&db, dir.path(), "u1").await.parse().unwrap();

    // Eight more events, then messages removed before they were applied (a purge keeping the last 5).
    for i in 0..8 {
        post_until_accepted(&server.url, &event("u1", 1, &format!("b-{i}")), Duration::from_secs(30)).await;
    }
    let mut stream = js.get_stream("EPS_EVENTS").await.unwrap();
    stream.purge().keep(5).await.unwrap();
    let first = stream.info().await.unwrap().state.first_sequence;
    assert!(first > checkpoint + 1, "the purge removed nothing unapplied (first sequence {first})");

    // A processor reports the range, in its log, its metrics and the store; and goes on.
    let metrics = free_ports(1)[0];
    let addr = format!("127.0.0.1:{metrics}");
    let mut running = follower(dir.path(), &nats.url(), &db, &["--metrics-listen", &addr]);
    let started = Instant::now();
    let text = loop {
        let text = metrics_text(&addr).await;
        if text.lines().any(|l| l.starts_with("eps_jetstream_lost_ranges_total") && !l.ends_with(" 0")) {
            break text;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no lost-range metric:\n{text}\n{}", running.stderr());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let range = format!("{}..={}", checkpoint + 1, first - 1);
    let gauge = text
        .lines()
        .find_map(|l| l.strip_prefix("eps_jetstream_lost_last_sequence "))
        .map(|v| v.trim().parse::<f64>().unwrap());
    assert_eq!(gauge, Some((first - 1) as f64), "{text}");
    // The 5 kept messages are applied: processing went on.
    let expected = applied + 5;
    let started = Instant::now();
    while revenue(&db, dir.path(), "u1").await != expected.to_string() {
        assert!(started.elapsed() < Duration::from_secs(30), "u1 has {}", revenue(&db, dir.path(), "u1").await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sigterm(running.child.id().unwrap()).await;
    within(Duration::from_secs(20), "the processor to stop", running.child.wait()).await.unwrap();
    let stderr = running.stderr();
    assert_eq!(stderr.matches("LOST").count(), 1, "one report of the range: {stderr}");
    assert!(stderr.contains(&format!("stream sequences {range}")), "{stderr}");
    // The store has it for eps status: u1's partition lost the range. (nats-server does not say which
    // subjects removed messages were on: the partitions whose checkpoint was before the range report
    // it too; here no processor ran while the 8 events came, so every partition does.)
    let status = status_json(&nats.url(), &db, &[]).await;
    let lost = status["lost"].as_array().unwrap();
    assert!(
        lost.iter().any(|l| (l["partition"].as_u64(), l["first"].as_u64(), l["last"].as_u64())
            == (Some(partition), Some(checkpoint + 1), Some(first - 1))),
        "{status}"
    );
    assert!(lost.iter().all(|l| l["first"] == checkpoint + 1 && l["last"] == first - 1), "{status}");
    let text = status_text(&nats.url(), &db).await;
    assert_eq!(text.matches("LOST ").count(), 1, "{text}");
    assert!(text.contains(&format!("LOST             stream sequences {range} removed")), "{text}");
    // Reported once: a second processor finds it recorded and says nothing more.
    let out = process(&nats.url(), &db, &[]).await;
    assert!(out.code() == Some(0) && !out.stderr.contains("LOST"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_eps_was_told_is_recorded_and_what_it_removes_unapplied_is_reported() {
    // The case: 11 events acknowledged on a stream keeping 5 messages, "applied 5 events",
    // exit 0, nothing said. The limit is now an eps setting, recorded in the stream and checked.
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start(dir.path()).await;
    let db = TestDb::new(StoreKind::Postgres).await;
    let limit = ["--nats-max-msgs", "5"];
    let server = nats_server(dir.path(), &nats.url(), "server", &limit).await;
    for i in 0..11 {
        post_until_accepted(&server.url, &event("u1", 1, &format!("e-{i}")), Duration::from_secs(20)).await;
    }
    // A processor not told the limit refuses, with both values.
    let out = process(&nats.url(), &db, &[]).await;
    assert!(out.code().is_some_and(|c| c != 0), "{out}");
    assert!(
        out.stderr.contains("max_msgs (--nats-max-msgs): the stream has 5, this process expects unlimited"),
        "{out}"
    );
    // One told it applies what is left and reports what is not, in its log and in the store.
    let out = process(&nats.url(), &db, &limit).await;
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains("applied 5 events"), "{out}");
    assert!(out.stderr.contains("LOST") && out.stderr.contains("stream sequences 1..=6"), "{out}");
    // `eps status` takes no stream-creation settings: it reads the limit from the stream, and finds
    // nothing amiss.
    let status = status_json(&nats.url(), &db, &[]).await;
    assert_eq!(status["settings_mismatches"], serde_json::json!([]), "{status}");
    let partition = eps::log::user_key("u1") % 16;
    let lost = status["lost"].as_array().unwrap();
    assert!(
        lost.iter().any(|l| (l["partition"].as_u64(), l["first"].as_u64(), l["last"].as_u64())
            == (Some(partition), Some(1), Some(6))),
        "{status}"
    );
}

/// `eps server` on the file log in `data`, with the store at `store`.
async fn file_server(dir: &Path, data: &Path, store: &str) -> ServerProc {
    let a = args(&[
        "server",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &data.display().to_string(),
        "--database-url",
        store,
    ]);
    ServerProc::start(&a, &[], dir).await
}

async fn file_process(data: &Path, store: &str, extra: &[&str]) -> Output {
    let mut a = args(&["process", "--data-dir", &data.display().to_string(), "--database-url", store]);
    a.extend(extra.iter().map(|s| s.to_string()));
    run_eps(&a, &[]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_log_made_again_under_the_same_store_is_refused_until_adopted() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = format!("sqlite://{}", dir.path().join("store.sqlite3").display());
    let mut server = file_server(dir.path(), &data, &store).await;
    for i in 0..3 {
        post_until_accepted(&server.url, &event("u1", 1, &format!("old-{i}")), Duration::from_secs(10)).await;
    }
    server.kill().await;
    let out = file_process(&data, &store, &[]).await;
    assert!(out.code() == Some(0) && out.stdout.contains("applied 3 events"), "{out}");

    // The log directory is lost and made again by the server: positions start at 0 again, and the
    // old checkpoint (3 lines in) falls on a line boundary of the new log.
    std::fs::remove_dir_all(data.join("log")).unwrap();
    let mut server = file_server(dir.path(), &data, &store).await;
    for i in 0..10 {
        post_until_accepted(&server.url, &event("u1", 1, &format!("new-{i}")), Duration::from_secs(10)).await;
    }
    server.kill().await;
    let out = file_process(&data, &store, &[]).await;
    assert_eq!(out.code(), Some(1), "the processor read a log its checkpoint does not count: {out}");
    assert!(out.stderr.matches("file log ").count() >= 2 && out.stderr.contains("--adopt-new-log"), "{out}");
    let mut a = args(&["status", "--json", "--data-dir", &data.display().to_string(), "--database-url", &store]);
    let status = run_eps(&a, &[]).await;
    let json: Value = serde_json::from_str(&status.stdout).unwrap_or_else(|e| panic!("{e}: {status}"));
    assert!(json["identity_mismatch"].is_string() && json["lag_events"].is_null(), "{json}");
    // Compaction does not remove anything on the word of a checkpoint of another log.
    a = args(&["compact", "--data-dir", &data.display().to_string(), "--database-url", &store, "--min-age-secs", "0"]);
    let out = run_eps(&a, &[]).await;
    assert_ne!(out.code(), Some(0), "{out}");

    let out = file_process(&data, &store, &["--adopt-new-log"]).await;
    assert!(out.code() == Some(0) && out.stdout.contains("applied 10 events"), "{out}");
    let out = file_process(&data, &store, &[]).await;
    assert!(out.code() == Some(0) && out.stdout.contains("applied 0 events"), "{out}");
    let a = args(&["status", "--json", "--data-dir", &data.display().to_string(), "--database-url", &store]);
    let json: Value = serde_json::from_str(&run_eps(&a, &[]).await.stdout).unwrap();
    assert_eq!((json["total_revenue"].as_str(), json["lag_events"].as_u64()), (Some("13"), Some(0)), "{json}");
}
