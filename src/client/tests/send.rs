//! Sending: retries with the same id and body (503, 429, timeouts, dropped connections), answers that are
//! final (400, duplicates), batches and their per-line errors, an unreachable server.

use super::*;

#[tokio::test]
async fn retries_503_with_the_same_id_and_body() {
    let rec = Recorder::new(|nth| {
        if nth <= 2 {
            Box::pin(async {
                (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "0")], Json(serde_json::json!({"error": "busy"})))
                    .into_response()
            })
        } else {
            accepted()
        }
    });
    let url = serve(&rec).await;
    let file = events(20);
    let (summary, reports) = run_fast(ClientOptions { max_attempts: 3, ..options(&file, &url) }).await;
    assert!(summary.ok(), "{summary} {reports:?}");
    assert_eq!((summary.sent, summary.accepted), (20, 20));
    let counts = rec.counts();
    assert_eq!(counts.len(), 20);
    assert!(counts.values().all(|&n| n == 3), "{counts:?}");
    let received = rec.received();
    for r in &received {
        let same_id: Vec<_> = received.iter().filter(|o| o.id == r.id).collect();
        assert!(same_id.iter().all(|o| o.body == r.body));
    }
}

#[tokio::test]
async fn retries_on_429_and_timeouts() {
    let rec = Recorder::new(|nth| match nth {
        1 => Box::pin(async { (StatusCode::TOO_MANY_REQUESTS, "slow down").into_response() }),
        // An answer that never comes while the test runs: only the client's timeout ends the wait.
        2 => Box::pin(async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Json(serde_json::json!({"message": "too late"})).into_response()
        }),
        _ => accepted(),
    });
    let url = serve(&rec).await;
    let file = events(5);
    let opts = ClientOptions { timeout: Duration::from_millis(300), ..options(&file, &url) };
    // A guard against a hang only (generous for a loaded machine): without the timeout the second
    // attempts wait an hour.
    let (summary, reports) = tokio::time::timeout(Duration::from_secs(60), run_fast(opts))
        .await
        .expect("the client waited for answers that never come: its timeout did not cut them short");
    assert!(summary.ok(), "{summary} {reports:?}");
    assert_eq!(summary.accepted, 5);
    assert!(rec.counts().values().all(|&n| n == 3));
}

/// A raw HTTP/1.1 server that reads each request whole and, the first time it sees an id, drops
/// the connection without answering.
async fn dropping_server() -> (String, Arc<Mutex<HashMap<String, usize>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let shared = Arc::clone(&counts);
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let counts = Arc::clone(&shared);
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                loop {
                    let mut line = String::new();
                    if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut length = 0;
                    loop {
                        line.clear();
                        stream.read_line(&mut line).await.unwrap();
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':') {
                            if name.eq_ignore_ascii_case("content-length") {
                                length = value.trim().parse().unwrap();
                            }
                        }
                    }
                    let mut body = vec![0; length];
                    stream.read_exact(&mut body).await.unwrap();
                    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    let id = json["id"].as_str().unwrap().to_owned();
                    let nth = {
                        let mut counts = counts.lock().unwrap();
                        let n = counts.entry(id).or_insert(0);
                        *n += 1;
                        *n
                    };
                    if nth == 1 {
                        return; // drops the socket: no answer
                    }
                    let reply = r#"{"message":"Event received"}"#;
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{reply}",
                        reply.len()
                    );
                    stream.get_mut().write_all(response.as_bytes()).await.unwrap();
                }
            });
        }
    });
    (format!("http://{addr}"), counts)
}

#[tokio::test]
async fn retries_when_the_connection_is_dropped_without_an_answer() {
    let (url, counts) = dropping_server().await;
    let file = events(10);
    let (summary, reports) = run_fast(options(&file, &url)).await;
    assert!(summary.ok(), "{summary} {reports:?}");
    assert_eq!(summary.accepted, 10);
    let counts = counts.lock().unwrap().clone();
    assert_eq!(counts.len(), 10);
    assert!(counts.values().all(|&n| n == 2), "{counts:?}");
}

#[tokio::test]
async fn answers_400_are_rejected_not_retried_and_reported_sparingly() {
    let rec = Recorder::new(|_| {
        Box::pin(async {
            (StatusCode::BAD_REQUEST, Json(serde_json::json!({"error": "invalid event: no"}))).into_response()
        })
    });
    let url = serve(&rec).await;
    let file = events(12);
    let (summary, reports) = run_fast(options(&file, &url)).await;
    assert_eq!((summary.sent, summary.rejected, summary.accepted, summary.failed), (12, 12, 0, 0));
    assert!(!summary.ok());
    assert!(rec.counts().values().all(|&n| n == 1));
    assert_eq!(rec.received().len(), 12);
    // Five with line numbers, a note that more are only counted, and the count at the end.
    assert_eq!(reports.len(), 7, "{reports:?}");
    assert!(reports[0].starts_with("line ") && reports[0].ends_with(": HTTP 400 Bad Request: invalid event: no"));
    assert_eq!(reports[6], "(7 more errors repeating a message shown above were not shown)");
}

#[tokio::test]
async fn duplicates_are_accepted_and_counted() {
    let rec = Recorder::new(|_| {
        Box::pin(async { Json(serde_json::json!({"message": "Event received", "duplicate": true})).into_response() })
    });
    let url = serve(&rec).await;
    let file = events(4);
    let (summary, _) = run_fast(options(&file, &url)).await;
    assert!(summary.ok());
    assert_eq!((summary.accepted, summary.duplicates), (4, 4));
}

#[tokio::test]
async fn an_unreachable_server_fails_every_event_after_max_attempts() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let file = events(6);
    // What is checked is that the client gives up after max_attempts and says so; the time limits
    // only guard against a hang (generous, for a loaded machine), they are not speed checks.
    let (summary, reports) = within_secs(60, run_fast(ClientOptions { max_attempts: 3, ..options(&file, &url) })).await;
    assert_eq!((summary.sent, summary.failed, summary.accepted), (6, 6, 0));
    assert!(!summary.ok());
    assert!(reports[0].contains("failed after 3 attempts: "), "{reports:?}");

    // The default backoff (50 ms doubling, full jitter) also gives up after max_attempts.
    let summary =
        within_secs(60, run(ClientOptions { max_attempts: 3, progress: Progress::Quiet, ..options(&file, &url) }))
            .await
            .unwrap();
    assert_eq!(summary.failed, 6);
}

#[tokio::test]
async fn batches_carry_ids_are_retried_whole_and_map_line_errors_to_the_file() {
    let (url, bodies) = serve_batches().await;
    let file = input(&[
        r#"{"userId":"u1","name":"add_revenue","value":100}"#,
        r#"  {"userId":"u2","name":"add_revenue","value":1.50,"id":"mine"}"#,
        r#"{"userId":"u3","name":"refund","value":1}"#,
        "",
        r#"{"userId":"u4","name":"subtract_revenue","value":2}"#,
        r#"{"userId":"u5","name":"add_revenue","value":3}"#,
    ]);
    let opts = ClientOptions { batch: 3, concurrency: 1, ..options(&file, &url) };
    let (summary, reports) = run_fast(opts).await;
    // Two batches: lines 1, 2, 5 and line 6; line 3 is invalid and never sent. The stand-in
    // refuses the second line of each batch (only batch one has one) and calls one a duplicate.
    let expected = ClientSummary {
        lines: 5,
        sent: 4,
        accepted: 3,
        duplicates: 2,
        rejected: 1,
        invalid: 1,
        elapsed: summary.elapsed,
        ..Default::default()
    };
    assert_eq!(summary, expected, "{reports:?}");
    assert!(reports.iter().any(|r| r.starts_with("line 3: invalid event")), "{reports:?}");
    assert!(reports.iter().any(|r| r == "line 2: HTTP 200, line refused: invalid event: made up"), "{reports:?}");

    let bodies = bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 3, "the first batch once refused with 503, then again, then the second");
    assert_eq!(bodies[0], bodies[1], "a retried batch is the same bytes, hence the same ids");
    let lines: Vec<serde_json::Value> = bodies[0].0.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let run = run_id_of(lines[0]["id"].as_str().unwrap()).to_owned();
    let ids: Vec<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [format!("{run}-1").as_str(), "mine", format!("{run}-5").as_str()]);
    // The rest of each line is sent as written (the value's text included).
    assert!(bodies[0].0.lines().nth(1).unwrap().contains(r#""value":1.50"#), "{}", bodies[0].0);
    assert_eq!(bodies[0].1.as_deref(), Some("application/x-ndjson"));
    assert_eq!(bodies[2].0, format!("{{\"id\":\"{run}-6\",\"userId\":\"u5\",\"name\":\"add_revenue\",\"value\":3}}\n"));
}
