//! `eps server --log nats://…`: events go to a JetStream stream, partitioned by user, acknowledged only
//! once JetStream has stored them, retried publishes dropped by JetStream, 503 while it is away.
//!
//! Each test starts its own `nats-server -js` on a free port with a fresh store directory (never the
//! machine's shared server) and stops it at the end.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::nats::{expected_sync, nats_server_version, stream_events, stream_messages, synced, Nats};
use common::*;
use serde_json::Value;

async fn post_batch(url: &str, body: String) -> (u16, Value) {
    let response = http()
        .post(format!("{url}/events"))
        .header("Authorization", TOKEN)
        .header("Content-Type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, serde_json::from_str(&response.text().await.unwrap()).unwrap())
}

fn batch_body(run: &str, n: usize) -> String {
    (0..n)
        .map(|i| {
            format!("{{\"userId\":\"u{}\",\"name\":\"add_revenue\",\"value\":{i},\"id\":\"{run}-{i}\"}}\n", i % 10)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_go_to_their_users_partition_once_and_a_resent_batch_is_a_duplicate() {
    let env = Env::new(StoreKind::Sqlite).await;
    let nats = Nats::start(env.tmp.path()).await;
    let server = env.server_with(&["--log", &nats.url(), "--nats-partitions", "4"]).await;
    let http = http();

    let (status, answer) =
        post_event(&http, &server.url, r#"{"userId":"seed","name":"add_revenue","value":100}"#).await;
    assert_eq!(status, 200, "{answer}");
    let (status, first) = post_batch(&server.url, batch_body("run", 100)).await;
    assert_eq!((status, &first["accepted"], &first["duplicates"]), (200, &100.into(), &0.into()), "{first}");
    let (status, again) = post_batch(&server.url, batch_body("run", 100)).await;
    assert_eq!((status, &again["accepted"], &again["duplicates"]), (200, &100.into(), &100.into()), "{again}");

    let messages = stream_messages(&nats.url(), "EPS_EVENTS").await;
    // One message for the single event, one per partition the batch touched (at most 4); the resent
    // batch added none.
    assert!(messages.len() <= 5, "{} messages: the batch was not grouped by partition", messages.len());
    let mut ids = BTreeSet::new();
    let mut per_user: BTreeMap<String, String> = BTreeMap::new();
    for (subject, lines) in &messages {
        for line in lines {
            let user = line["userId"].as_str().unwrap().to_string();
            let partition = eps::log::user_key(&user) % 4;
            assert_eq!(subject, &format!("eps.events.{partition}"), "{line} is in the wrong partition");
            if let Some(previous) = per_user.insert(user.clone(), subject.clone()) {
                assert_eq!(previous, *subject, "user {user} is in two partitions");
            }
            if let Some(id) = line["id"].as_str() {
                assert!(ids.insert(id.to_string()), "id {id} stored twice");
            }
        }
    }
    let lines: usize = messages.iter().map(|(_, l)| l.len()).sum();
    assert_eq!(lines, 101, "every acknowledged event once");
    assert_eq!(ids.len(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_jetstream_is_away_appends_answer_503_and_the_server_recovers_by_itself() {
    let env = Env::new(StoreKind::Sqlite).await;
    let mut nats = Nats::start(env.tmp.path()).await;
    let server = env.server_with(&["--log", &nats.url()]).await;
    let http = http();
    let event = |i: usize| format!(r#"{{"userId":"u{i}","name":"add_revenue","value":1,"id":"e-{i}"}}"#);

    let (status, answer) = post_event(&http, &server.url, &event(1)).await;
    assert_eq!(status, 200, "{answer}");

    nats.stop();
    let response = http
        .post(format!("{}/liveEvent", server.url))
        .header("Authorization", TOKEN)
        .header("Content-Type", "application/json")
        .body(event(2))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(response.headers().get("retry-after").map(|v| v.to_str().unwrap()), Some("1"));
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("retry later"), "{body}");
    let ready = http.get(format!("{}/readyz", server.url)).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503, "readiness while JetStream is away");

    nats.resume().await;
    // The client library reconnects by itself: the same retried event is taken again.
    within(Duration::from_secs(30), "the server to take events again", async {
        loop {
            let (status, _) = post_event(&http, &server.url, &event(2)).await;
            if status == 200 {
                return;
            }
            assert_eq!(status, 503);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let (status, answer) = post_event(&http, &server.url, &event(3)).await;
    assert_eq!(status, 200, "{answer}");

    let ids: Vec<String> = stream_events(&nats.url(), "EPS_EVENTS")
        .await
        .into_iter()
        .map(|event| event["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["e-1", "e-2", "e-3"], "each acknowledged event once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_larger_than_max_payload_is_refused_with_413_not_503() {
    // No valid event's log line exceeds 1,391 bytes, so this takes a server configured far below any
    // sane max_payload (here 1 KiB): the event can never be published, and a retry cannot change that.
    let env = Env::new(StoreKind::Sqlite).await;
    let nats = Nats::start_with_config(env.tmp.path(), Some("max_payload: 1024\n")).await;
    let server = env.server_with(&["--log", &nats.url()]).await;
    let http = http();

    let (status, answer) =
        post_event(&http, &server.url, r#"{"userId":"small","name":"add_revenue","value":1,"id":"s-1"}"#).await;
    assert_eq!(status, 200, "{answer}");
    // A userId of 255 quotes (each escaped in the log line, 512 bytes with its own quotes) and an id
    // of 128 control characters (6 bytes each): a line of about 1,360 bytes.
    let big = format!(
        r#"{{"userId":"{}","name":"add_revenue","value":1,"id":"{}"}}"#,
        "\\\"".repeat(255),
        "\\u0001".repeat(128)
    );
    let body = format!("{big}\n{}\n", r#"{"userId":"small","name":"add_revenue","value":1,"id":"s-2"}"#);
    let (status, answer) = post_batch(&server.url, body.clone()).await;
    assert_eq!(status, 413, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(error.contains("nothing was stored") && error.contains("max_payload"), "{error}");
    let (status, _) = post_batch(&server.url, body).await;
    assert_eq!(status, 413, "the same answer on a retry");
    // Nothing of the refused request reached the stream; the server still takes events.
    let (status, answer) =
        post_event(&http, &server.url, r#"{"userId":"small","name":"add_revenue","value":1,"id":"s-3"}"#).await;
    assert_eq!(status, 200, "{answer}");
    let ids: Vec<String> = stream_events(&nats.url(), "EPS_EVENTS")
        .await
        .into_iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["s-1", "s-3"]);
}

/// `GET /readyz`'s status and JSON once the database is open (the server opens it in the background).
async fn readiness(http: &reqwest::Client, url: &str) -> (u16, Value) {
    within(Duration::from_secs(20), "the database to be open (GET /readyz)", async {
        loop {
            let response = http.get(format!("{url}/readyz")).send().await.unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            if body["database"] == "ok" {
                return (status, body);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_shows_what_a_200_promises_version_replicas_and_sync() {
    let env = Env::new(StoreKind::Sqlite).await;
    let nats = Nats::start(env.tmp.path()).await;
    let http = http();
    let event = r#"{"userId":"u","name":"add_revenue","value":1,"id":"promise-1"}"#;

    // As the servers run: declared when they sync always, not declared otherwise.
    let mut flags = vec!["--log".to_string(), nats.url()];
    if synced() {
        flags.push("--nats-sync-always".into());
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut server = env.server_with(&flags).await;
    let (status, answer) = post_event(&http, &server.url, event).await;
    assert_eq!(status, 200, "{answer}");
    let (status, ready) = readiness(&http, &server.url).await;
    assert_eq!(status, 200, "{ready}");
    let promise = &ready["jetstream"];
    assert_eq!(promise["server_version"].as_str(), Some(nats_server_version().as_str()), "{ready}");
    assert_eq!((promise["stream"].as_str(), promise["replicas"].as_u64()), (Some("EPS_EVENTS"), Some(1)), "{ready}");
    assert_eq!(promise["sync"].as_str(), Some(expected_sync(synced())), "{ready}");
    let summary = promise["summary"].as_str().unwrap();
    assert!(
        summary
            .starts_with(&format!("nats-server {}, stream EPS_EVENTS with 1 replicas, sync: ", nats_server_version())),
        "{summary}"
    );
    server.kill().await;

    // Declared: a server that cannot sync contradicts it, and appends answer 503 until it is fixed.
    let server = env.server_with(&["--log", &nats.url(), "--nats-sync-always"]).await;
    let (status, answer) = post_event(&http, &server.url, event).await;
    let (ready_status, ready) = readiness(&http, &server.url).await;
    match expected_sync(true) {
        "contradicted" => {
            assert_eq!((status, ready_status), (503, 503), "{answer} {ready}");
            assert_eq!(ready["jetstream"]["sync"], "contradicted", "{ready}");
            assert!(
                server.stderr().contains("CONTRADICTED: --nats-sync-always is given but nats-server"),
                "{}",
                server.stderr()
            );
        }
        sync => {
            assert_eq!((status, ready_status), (200, 200), "{answer} {ready}");
            assert_eq!(ready["jetstream"]["sync"].as_str(), Some(sync), "{ready}");
        }
    }
    assert!(server.stderr().contains("JetStream promise: nats-server "), "{}", server.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_single_events_without_ids_share_messages_and_those_with_ids_keep_their_own() {
    let env = Env::new(StoreKind::Sqlite).await;
    let nats = Nats::start(env.tmp.path()).await;
    let server = env.server_with(&["--log", &nats.url(), "--nats-partitions", "4"]).await;
    let http = http();

    // 400 id-less events of one user (one partition), 100 at a time, each with its own value.
    for round in 0..4 {
        let answers = futures::future::join_all((0..100).map(|i| {
            let (http, url) = (http.clone(), server.url.clone());
            async move {
                let body = format!(r#"{{"userId":"one","name":"add_revenue","value":{}}}"#, round * 100 + i + 1);
                post_event(&http, &url, &body).await
            }
        }))
        .await;
        for (status, answer) in answers {
            assert_eq!(status, 200, "{answer}");
        }
    }
    // An event with an id is a message of its own: sent again, JetStream drops it.
    let with_id = r#"{"userId":"one","name":"add_revenue","value":1000,"id":"own-1"}"#;
    assert_eq!(post_event(&http, &server.url, with_id).await.0, 200);
    let (status, again) = post_event(&http, &server.url, with_id).await;
    assert_eq!((status, &again["duplicate"]), (200, &Value::Bool(true)), "{again}");

    let messages = stream_messages(&nats.url(), "EPS_EVENTS").await;
    let mut values: Vec<u64> = Vec::new();
    for (_, lines) in &messages {
        for line in lines {
            assert_eq!(line["userId"], "one");
            values.push(line["value"].as_str().map_or_else(|| line["value"].as_u64(), |v| v.parse().ok()).unwrap());
        }
    }
    values.sort_unstable();
    let expected: Vec<u64> = (1..=400).chain([1000]).collect();
    assert_eq!(values, expected, "every acknowledged event once");
    let own: Vec<_> = messages.iter().filter(|(_, lines)| lines.iter().any(|l| l["id"] == "own-1")).collect();
    assert_eq!(own.len(), 1, "the event with an id is stored once");
    assert_eq!(own[0].1.len(), 1, "the event with an id is alone in its message");
    assert!(
        messages.len() < 300,
        "{} messages for 401 events: concurrent id-less events were not grouped",
        messages.len()
    );
}
