//! What survives a crash, a retry and a shutdown: acknowledged events are in the log exactly once.

use crate::common;

use std::collections::{BTreeSet, HashMap};
use std::io::Write as _;
use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

store_tests!(
    acknowledged_events_survive_sigkill_and_a_torn_last_line_is_cut,
    a_retried_event_id_is_stored_and_counted_once_even_across_a_restart,
    process_follow_applies_new_events_as_they_arrive_and_exits_0_on_sigterm,
);

fn events_file(
    env: &Env,
    name: &str,
    prefix: &str,
    count: usize,
) -> (std::path::PathBuf, Vec<(String, &'static str, String)>) {
    let events: Vec<(String, &'static str, String)> = (0..count)
        .map(|i| {
            let user = format!("{prefix}-{}", i % 37);
            let name = if i % 5 == 4 { "subtract_revenue" } else { "add_revenue" };
            let value = format!("{}.{:02}", i % 1000, (i * 7) % 100);
            (user, name, value)
        })
        .collect();
    let lines: Vec<String> = events.iter().map(|(u, n, v)| event_line(u, n, v)).collect();
    (env.write_file(name, &lines), events)
}

async fn acknowledged_events_survive_sigkill_and_a_torn_last_line_is_cut(store: StoreKind) {
    let env = Env::new(store).await;
    let mut server = env.server().await;

    let (first_file, mut events) = events_file(&env, "first.jsonl", "crash", 2_000);
    let sent = client(&first_file, &server.url, &[]).await;
    assert!(sent.status.success(), "eps client: {sent}");
    assert!(sent.stdout.contains("accepted 2000 "), "client summary: {sent}");

    server.kill().await;
    // A crash in the middle of a write leaves a partial last line.
    let (_, last) = segments(&env.log_dir()).pop().expect("a segment");
    let mut f = std::fs::OpenOptions::new().append(true).open(&last).unwrap();
    f.write_all(br#"{"userId":"torn-user","name":"add_revenue","val"#).unwrap();
    drop(f);

    let server = env.server().await;
    let (second_file, more) = events_file(&env, "second.jsonl", "after", 10);
    let sent = client(&second_file, &server.url, &[]).await;
    assert!(sent.status.success(), "eps client after the restart: {sent}\nserver stderr:\n{}", server.stderr());
    assert!(sent.stdout.contains("accepted 10 "), "client summary: {sent}");
    events.extend(more);

    let out = env.process(&[]).await;
    assert_eq!(applied_count(&out.stdout), 2_010, "{out}");
    assert!(out.stdout.contains(" 0 invalid lines"), "{out}");
    let want = expected_totals(events.iter().map(|(u, n, v)| (u.as_str(), *n, v.as_str())));
    assert_totals(&env.revenues().await, &want);

    let log = log_bytes(&env.log_dir());
    assert!(!String::from_utf8_lossy(&log).contains("torn-user"), "the torn bytes are still in the log");
    assert!(log.ends_with(b"\n"));
    assert_eq!(log_lines(&env.log_dir()).len(), 2_010);
}

async fn a_retried_event_id_is_stored_and_counted_once_even_across_a_restart(store: StoreKind) {
    let env = Env::new(store).await;
    let mut server = env.server().await;
    let http = http();
    let event = r#"{"userId":"retry-user","name":"add_revenue","value":7.5,"id":"retry-0001"}"#;

    let first = post_event(&http, &server.url, event).await;
    assert_eq!(first, (200, json!({"message": "Event received"})));
    let second = post_event(&http, &server.url, event).await;
    assert_eq!(second, (200, json!({"message": "Event received", "duplicate": true})));

    server.kill().await;
    let server = env.server().await;
    let third = post_event(&http, &server.url, event).await;
    assert_eq!(third, (200, json!({"message": "Event received", "duplicate": true})));
    // A different id is a different event.
    let other = r#"{"userId":"retry-user","name":"add_revenue","value":7.5,"id":"retry-0002"}"#;
    assert_eq!(post_event(&http, &server.url, other).await, (200, json!({"message": "Event received"})));

    let lines = log_lines(&env.log_dir());
    let copies = lines.iter().filter(|l| l["id"] == "retry-0001").count();
    assert_eq!(copies, 1, "log: {lines:?}");
    assert_eq!(lines.len(), 2, "log: {lines:?}");

    env.process(&[]).await;
    assert_eq!(revenue_of(&http, &server.url, "retry-user").await, "15");
}

/// Sends the head of a POST and half its body over a raw connection: a request the server is in the
/// middle of reading. Returns the stream and the rest of the body.
async fn start_slow_request(url_port: u16, user: &str) -> (TcpStream, Vec<u8>) {
    let body = format!(r#"{{"userId":"{user}","name":"add_revenue","value":1}}"#);
    let head = format!(
        "POST /liveEvent HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: secret\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut stream = TcpStream::connect(("127.0.0.1", url_port)).await.unwrap();
    let (first, rest) = body.as_bytes().split_at(body.len() / 2);
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(first).await.unwrap();
    stream.flush().await.unwrap();
    (stream, rest.to_vec())
}

/// Connections that never sent a byte hold no request: SIGTERM does not wait for them (it used to wait
/// for their first-byte timeout, --request-timeout-secs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_does_not_wait_for_connections_that_sent_nothing() {
    let env = Env::new(StoreKind::Sqlite).await;
    let mut server = env.server_with(&["--request-timeout-secs", "60"]).await;
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(("127.0.0.1", server.port)).await.unwrap());
    }
    // One request answered, so the server is surely serving (and the silent ones are accepted).
    let (status, _) = post_event(&http(), &server.url, r#"{"userId":"u","name":"add_revenue","value":1}"#).await;
    assert_eq!(status, 200);
    server.sigterm().await;
    // A server that waited for the silent connections would be held until the end of its drain timeout
    // (30 s, before their 60 s request timeout) and say so; that message is what is checked. The 40 s
    // limit only guards against a hang (no speed is asserted).
    let status = server.wait(Duration::from_secs(40)).await;
    assert_eq!(status.code(), Some(0), "server exit: {status}\nstderr:\n{}", server.stderr());
    assert!(
        !server.stderr().contains("still in flight at the end of the drain timeout"),
        "shutdown waited for 3 silent connections:\n{}",
        server.stderr()
    );
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_requests_in_flight_finish_and_exits_0_with_every_200_in_the_log() {
    let env = Env::new(StoreKind::Sqlite).await;
    let mut server = env.server().await;
    let http = http();

    // Requests the server has started reading when the signal comes.
    let mut slow = Vec::new();
    for i in 0..10 {
        slow.push((format!("slow-{i}"), start_slow_request(server.port, &format!("slow-{i}")).await));
    }

    // 200 concurrent POSTs; SIGTERM once the first of them is answered.
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    let first_tx = std::sync::Mutex::new(Some(first_tx));
    let first_tx = std::sync::Arc::new(first_tx);
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let http = http.clone();
            let url = server.url.clone();
            let first_tx = first_tx.clone();
            tokio::spawn(async move {
                let user = format!("fast-{i}");
                let body = format!(r#"{{"userId":"{user}","name":"add_revenue","value":1}}"#);
                let answer = http
                    .post(format!("{url}/liveEvent"))
                    .header("Authorization", TOKEN)
                    .header("Content-Type", "application/json")
                    .body(body)
                    .send()
                    .await;
                if let Some(tx) = first_tx.lock().unwrap().take() {
                    let _ = tx.send(());
                }
                (user, answer.map(|r| r.status().as_u16()))
            })
        })
        .collect();
    within(Duration::from_secs(30), "a first answer", first_rx).await.unwrap();
    server.sigterm().await;

    // Wait until the server no longer accepts connections: shutdown has begun.
    within(Duration::from_secs(20), "the server to stop accepting connections", async {
        while TcpStream::connect(("127.0.0.1", server.port)).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    // The requests in flight are still answered, and answered 200.
    let mut answered: HashMap<String, u16> = HashMap::new();
    for (user, (mut stream, rest)) in slow {
        within(Duration::from_secs(20), "finishing a slow request", async {
            stream.write_all(&rest).await.unwrap();
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await.unwrap();
            let text = String::from_utf8_lossy(&response);
            assert!(text.starts_with("HTTP/1.1 200"), "{user} in flight during shutdown got: {text:?}");
        })
        .await;
        answered.insert(user, 200);
    }
    let mut errors = 0;
    for task in tasks {
        let (user, result) = within(Duration::from_secs(30), "a POST", task).await.unwrap();
        match result {
            Ok(status) => {
                assert_eq!(status, 200, "{user} was answered {status} during shutdown");
                answered.insert(user, status);
            }
            // Not yet connected when the listener closed: refused, never stored as far as it knows.
            Err(_) => errors += 1,
        }
    }
    eprintln!("{} answered 200, {errors} not connected", answered.len());

    let status = server.wait(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "server exit: {status}\nstderr:\n{}", server.stderr());

    let lines = log_lines(&env.log_dir());
    let logged: BTreeSet<String> = lines.iter().map(|l| l["userId"].as_str().unwrap().to_string()).collect();
    assert_eq!(logged.len(), lines.len(), "an event was logged twice");
    let missing: Vec<_> = answered.keys().filter(|u| !logged.contains(*u)).collect();
    assert!(missing.is_empty(), "answered 200 but not in the log: {missing:?}");
}

async fn process_follow_applies_new_events_as_they_arrive_and_exits_0_on_sigterm(store: StoreKind) {
    let env = Env::new(store).await;
    let server = env.server().await;
    let http = http();
    let mut follower = env.spawn_process(&["--follow", "--poll-ms", "5"]);

    for (i, want) in [(1, "3"), (2, "6")] {
        let body = event_line("follow-user", "add_revenue", "3");
        assert_eq!(post_event(&http, &server.url, &body).await.0, 200, "event {i}");
        within(Duration::from_secs(20), "the follower to apply the new event", async {
            loop {
                let (status, body) = get_user_once(&http, &server.url, "follow-user").await;
                if status == 200 && body.contains(&format!("\"revenue\":\"{want}\"")) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }

    sigterm(follower.child.id().expect("the follower is running")).await;
    let status = within(Duration::from_secs(20), "the follower to stop", follower.child.wait()).await.unwrap();
    assert_eq!(status.code(), Some(0), "eps process --follow after SIGTERM: {status}\nstderr:\n{}", follower.stderr());
    assert_eq!(applied_count(&follower.stdout()), 2, "summary: {}", follower.stdout());
}
