//! `POST /events`: many events in one request, one durable append, a result per line.

use crate::common;

use common::*;
use serde_json::Value;

async fn post_batch(url: &str, headers: &[(&str, &str)], body: impl Into<Vec<u8>>) -> (u16, Value) {
    let mut request = http().post(format!("{url}/events")).body(body.into());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("POST /events");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("answer {text:?} is not JSON: {e}")))
}

const AUTH: (&str, &str) = ("Authorization", "secret");
const NDJSON: (&str, &str) = ("Content-Type", "application/x-ndjson");

async fn fsyncs(url: &str) -> u64 {
    let text = http().get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("eps_log_fsync_total "))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_lines_are_stored_in_one_sync_and_invalid_ones_reported_by_line() {
    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server().await;
    let body = [
        r#"{"userId":"a","name":"add_revenue","value":10}"#,
        r#"{"userId":"b","name":"refund","value":1}"#,
        "",
        r#"{"userId":"c","name":"subtract_revenue","value":0.5,"id":"x-1"}"#,
        r#"{"userId":"d","name":"add_revenue"}"#,
        "   ",
        "{\"userId\":\"e\",\"name\":\"add_revenue\",\"value\":1.25}\r",
        "",
    ]
    .join("\n");
    let before = fsyncs(&server.url).await;
    let (status, answer) = post_batch(&server.url, &[AUTH, NDJSON], body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["accepted"], 3, "{answer}");
    assert_eq!(answer["duplicates"], 0, "{answer}");
    assert_eq!(answer["rejected"], 2, "{answer}");
    let errors = answer["errors"].as_array().unwrap();
    assert_eq!(errors[0]["line"], 2, "{answer}");
    assert!(errors[0]["error"].as_str().unwrap().contains("refund"), "{answer}");
    assert_eq!(errors[1]["line"], 5, "{answer}");
    assert!(errors[1]["error"].as_str().unwrap().contains("value"), "{answer}");
    assert_eq!(fsyncs(&server.url).await, before + 1, "the whole batch should take one sync");

    let lines = log_lines(&env.log_dir());
    let stored: Vec<(&str, &str, String)> = lines
        .iter()
        .map(|l| (l["userId"].as_str().unwrap(), l["name"].as_str().unwrap(), l["value"].to_string()))
        .collect();
    assert_eq!(
        stored,
        [
            ("a", "add_revenue", "10".to_string()),
            ("c", "subtract_revenue", "0.5".to_string()),
            ("e", "add_revenue", "1.25".to_string())
        ]
    );
    assert_eq!(lines[1]["id"], "x-1");

    env.process(&[]).await;
    let http = http();
    assert_eq!(revenue_of(&http, &server.url, "a").await, "10");
    assert_eq!(revenue_of(&http, &server.url, "c").await, "-0.5");
    assert_eq!(revenue_of(&http, &server.url, "e").await, "1.25");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_batch_is_stored_once() {
    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server().await;
    let body: String = (1..=50)
        .map(|i| format!("{{\"userId\":\"u{}\",\"name\":\"add_revenue\",\"value\":{i},\"id\":\"run-{i}\"}}\n", i % 7))
        .collect();
    let (status, first) = post_batch(&server.url, &[AUTH, NDJSON], body.clone()).await;
    assert_eq!((status, &first["accepted"], &first["duplicates"]), (200, &50.into(), &0.into()), "{first}");
    let (status, again) = post_batch(&server.url, &[AUTH, NDJSON], body).await;
    assert_eq!((status, &again["accepted"], &again["duplicates"]), (200, &50.into(), &50.into()), "{again}");
    // The same id twice within one batch: the second is the duplicate.
    let twice = "{\"userId\":\"v\",\"name\":\"add_revenue\",\"value\":1,\"id\":\"t\"}\n".repeat(2);
    let (status, answer) = post_batch(&server.url, &[AUTH, NDJSON], twice).await;
    assert_eq!((status, &answer["accepted"], &answer["duplicates"]), (200, &2.into(), &1.into()), "{answer}");
    assert_eq!(log_lines(&env.log_dir()).len(), 51);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_batches_are_refused_and_store_nothing() {
    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server_with(&["--batch-body-limit", "100000"]).await;
    let line = r#"{"userId":"u","name":"add_revenue","value":1}"#;
    let ok_body = format!("{line}\n");

    let (status, answer) = post_batch(&server.url, &[NDJSON], ok_body.clone()).await;
    assert_eq!(status, 401, "{answer}");
    let (status, answer) = post_batch(&server.url, &[("Authorization", "wrong"), NDJSON], ok_body.clone()).await;
    assert_eq!(status, 401, "{answer}");
    let (status, answer) = post_batch(&server.url, &[AUTH, ("Content-Type", "text/csv")], ok_body.clone()).await;
    assert_eq!(status, 415, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("text/csv"), "{answer}");

    let (status, answer) = post_batch(&server.url, &[AUTH, NDJSON], "\n  \n").await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("no event"), "{answer}");

    let (status, answer) = post_batch(&server.url, &[AUTH, NDJSON], "not json\n[1,2]\n").await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["rejected"].as_u64(), Some(2), "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("nothing was stored"), "{answer}");
    assert!(answer["errors"][1]["error"].as_str().unwrap().contains("object"), "{answer}");

    // 10,001 short events fit in the byte limit but not in the count limit.
    let too_many = "{\"userId\":\"u\",\"name\":\"add_revenue\",\"value\":1}\n".repeat(10_001);
    let server_big = env_with_big_limit(&env).await;
    let (status, answer) = post_batch(&server_big.url, &[AUTH, NDJSON], too_many).await;
    assert_eq!(status, 413, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("10000"), "{answer}");
    drop(server_big);
    assert_eq!(log_bytes(&env.tmp.path().join("big/log")).len(), 0, "a refused batch must store nothing");

    let too_big = ok_body.repeat(100_000 / ok_body.len() + 1);
    let (status, answer) = post_batch(&server.url, &[AUTH, NDJSON], too_big).await;
    assert_eq!(status, 413, "{answer}");

    assert_eq!(log_bytes(&env.log_dir()).len(), 0, "a refused batch must store nothing");
}

/// A second server on another data directory, with the default (16 MiB) batch body limit.
async fn env_with_big_limit(env: &Env) -> ServerProc {
    let dir = env.tmp.path().join("big");
    let args = args(&["server", "--listen", "127.0.0.1:0", "--data-dir", &dir.display().to_string()]);
    ServerProc::start(&args, &[], env.tmp.path()).await
}

/// The client's two modes against the real server: batches (the default, with an invalid line and a
/// batch cut mid-file) and `--batch 1` (single events, what a seed-compatible server takes) store the
/// same events; the processor makes the same exact totals of both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_sends_batches_by_default_and_single_events_with_batch_1() {
    let events: Vec<(String, &str, String)> = (0..2_500)
        .map(|i| {
            (
                format!("user{}", i % 37),
                ["add_revenue", "subtract_revenue"][i % 3 / 2],
                format!("{}.{:02}", i % 50, i % 100),
            )
        })
        .collect();
    let mut lines: Vec<String> = events.iter().map(|(u, n, v)| event_line(u, n, v)).collect();
    const BAD: usize = 1_234;
    lines[BAD] = r#"{"userId":"bad","name":"add_revenue","value":-1}"#.to_string();
    let want = expected_totals(
        events.iter().enumerate().filter(|(i, _)| *i != BAD).map(|(_, (u, n, v))| (u.as_str(), *n, v.as_str())),
    );

    for extra in [&[][..], &["--batch", "1"][..]] {
        let env = Env::new(StoreKind::Sqlite).await;
        let server = env.server().await;
        let file = env.write_file("events.jsonl", &lines);
        let out = client(&file, &server.url, extra).await;
        assert_eq!(out.code(), Some(1), "an invalid line makes the run fail: {out}");
        assert!(
            out.stdout.contains("sent 2499, accepted 2499 (0 duplicates), rejected 0, invalid 1"),
            "{extra:?}: {out}"
        );
        assert!(out.stderr.contains("line 1235: invalid event"), "{extra:?}: {out}");
        assert_eq!(log_lines(&env.log_dir()).len(), 2_499, "{extra:?}");
        env.process(&[]).await;
        assert_totals(&env.revenues().await, &want);
    }
}
