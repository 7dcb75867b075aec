//! The console's data endpoints (`GET /console/summary`, `GET /console/stream`) and page (`GET /`),
//! over real HTTP against the real binary. The page itself is driven in a browser by
//! tests/http/console_browser.rs.

use crate::common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// `GET /console/summary` with `token`: status and JSON.
async fn summary(http: &reqwest::Client, url: &str, token: &str) -> (u16, Value) {
    let response = http.get(format!("{url}/console/summary")).header("Authorization", token).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// Polls the summary until `check` holds (the server refreshes it about once a second).
async fn summary_until(http: &reqwest::Client, url: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let (status, body) = summary(http, url, TOKEN).await;
            assert_eq!(status, 200, "{body}");
            if check(&body) {
                return body;
            }
            last = body;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("the console summary never showed {what}; last: {last:#}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_summary_shows_exact_counts_totals_top_users_lag_and_tail() {
    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server().await;
    let http = http();

    // Nothing without the token.
    let (status, body) = summary(&http, &server.url, "wrong").await;
    assert_eq!(status, 401, "{body}");
    assert!(body["error"].is_string());

    // Opening the console (first summary) starts the tail; then 12 events over 4 users.
    summary(&http, &server.url, TOKEN).await;
    let values = ["10.10", "0.05", "7", "100"];
    for i in 0..12 {
        let body = format!(r#"{{"userId":"u{}","name":"add_revenue","value":{}}}"#, i % 4, values[i % 4]);
        assert_eq!(post_event(&http, &server.url, &body).await.0, 200);
    }
    // A duplicate is not counted twice.
    let dup = r#"{"userId":"u0","name":"add_revenue","value":1,"id":"same"}"#;
    post_event(&http, &server.url, dup).await;
    post_event(&http, &server.url, dup).await;

    let before = summary_until(&http, &server.url, "13 accepted and 13 waiting", |s| {
        s["accepted_total"] == 13 && s["lag_events"] == 13
    })
    .await;
    assert_eq!(before["applied_total"], 0, "{before:#}");
    assert!(before["lag_seconds"].as_f64().unwrap() >= 0.0, "{before:#}");
    assert_eq!(before["log"]["segments"], 1, "{before:#}");
    assert!(before["log"]["bytes"].as_u64().unwrap() > 13 * 50, "{before:#}");
    let tail = before["tail"].as_array().unwrap();
    assert_eq!(tail.len(), 13, "every event of a slow stream is in the tail: {before:#}");
    assert_eq!((tail[0]["userId"].as_str(), tail[0]["value"].as_str()), (Some("u0"), Some("10.1")));
    assert!(tail.windows(2).all(|w| w[1]["seq"].as_u64() > w[0]["seq"].as_u64()));
    assert_eq!(before["tail_sampled"], false);
    let accepted: u64 = before["series"].as_array().unwrap().iter().map(|p| p["accepted"].as_u64().unwrap()).sum();
    assert!(accepted <= 13, "{before:#}");

    env.process(&[]).await;
    let after = summary_until(&http, &server.url, "13 applied", |s| s["applied_total"] == 13).await;
    assert_eq!(after["lag_events"], 0, "{after:#}");
    assert_eq!(after["lag_seconds"], 0.0, "{after:#}");
    assert_eq!(after["users"], 4, "{after:#}");
    // The whole-table figures say when they were read: a small table is read every second.
    let (now, read_at) = (after["now"].as_u64().unwrap(), after["store_figures_at"].as_u64().unwrap());
    assert!(read_at.abs_diff(now) < 2_000, "{after:#}");
    // u0: 3 x 10.10 + 1, u1: 3 x 0.05, u2: 3 x 7, u3: 3 x 100.
    assert_eq!(after["total_revenue"], "352.45", "{after:#}");
    let top: Vec<(String, String)> = after["top_users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| (u["userId"].as_str().unwrap().into(), u["revenue"].as_str().unwrap().into()))
        .collect();
    let expected = [("u3", "300"), ("u0", "31.3"), ("u2", "21"), ("u1", "0.15")];
    assert_eq!(top, expected.map(|(u, r)| (u.to_string(), r.to_string())), "{after:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_stream_pushes_summaries_and_ends_when_the_server_stops() {
    let env = Env::new(StoreKind::Sqlite).await;
    let mut server = env.server().await;
    let http = http();

    let refused = http.get(format!("{}/console/stream", server.url)).send().await.unwrap();
    assert_eq!(refused.status().as_u16(), 401);

    let mut response =
        http.get(format!("{}/console/stream", server.url)).header("Authorization", TOKEN).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    post_event(&http, &server.url, r#"{"userId":"s","name":"add_revenue","value":2}"#).await;
    // Frames until one counts the event: the stream keeps pushing.
    let mut text = String::new();
    let mut frames = 0;
    let counted = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let chunk = response.chunk().await.unwrap().expect("the stream ended early");
            text.push_str(std::str::from_utf8(&chunk).unwrap());
            while let Some(end) = text.find("\n\n") {
                let frame: String = text.drain(..end + 2).collect();
                let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data:")) else { continue };
                assert!(frame.contains("event: summary") || frame.contains("event:summary"), "{frame}");
                frames += 1;
                let summary: Value = serde_json::from_str(data.trim()).unwrap();
                if summary["accepted_total"] == 1 {
                    return;
                }
            }
        }
    })
    .await;
    assert!(counted.is_ok(), "no pushed summary counted the event ({frames} frames)");

    // SIGTERM: the open stream does not hold the server up.
    server.sigterm().await;
    let status = server.wait(Duration::from_secs(10)).await;
    assert!(status.success(), "{status}");
    let rest =
        tokio::time::timeout(Duration::from_secs(5), async { while let Ok(Some(_)) = response.chunk().await {} }).await;
    assert!(rest.is_ok(), "the stream did not end with the server");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_page_is_served_without_the_token_and_holds_no_secret() {
    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server_with(&["--token", "a-long-secret-token"]).await;
    let http = http();
    for (path, kind) in
        [("/", "text/html"), ("/console/console.js", "text/javascript"), ("/console/console.css", "text/css")]
    {
        let response = http.get(format!("{}{path}", server.url)).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200, "{path}");
        assert!(response.headers()["content-type"].to_str().unwrap().starts_with(kind), "{path}");
        let text = response.text().await.unwrap();
        assert!(!text.is_empty(), "{path}");
        assert!(!text.contains("a-long-secret-token"), "{path} holds the token");
    }
    let page = http.get(&server.url).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("/console/console.js") && page.contains("/console/console.css"), "{page}");
    // The documented endpoints.
    let doc: Value = http.get(format!("{}/openapi.json", server.url)).send().await.unwrap().json().await.unwrap();
    assert!(doc["paths"]["/console/summary"]["get"].is_object() && doc["paths"]["/console/stream"]["get"].is_object());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_summary_counts_on_one_basis_and_shows_the_processor_errors_latency_and_ranges() {
    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server().await;
    let http = http();

    // No processor has run: nothing applied, the processor tile says so.
    let first = summary_until(&http, &server.url, "the processor's state", |s| s["processor"].is_object()).await;
    assert_eq!(first["processor"]["state"], "none", "{first:#}");
    assert!(first["processor"]["last_commit_age_seconds"].is_null(), "{first:#}");
    assert_eq!((first["range"].as_str(), first["step_seconds"].as_u64()), (Some("5m"), Some(1)), "{first:#}");

    for i in 0..6 {
        let body = format!(r#"{{"userId":"b{i}","name":"add_revenue","value":1}}"#);
        assert_eq!(post_event(&http, &server.url, &body).await.0, 200);
    }
    env.process(&[]).await;
    for i in 0..4 {
        let body = format!(r#"{{"userId":"c{i}","name":"add_revenue","value":1}}"#);
        assert_eq!(post_event(&http, &server.url, &body).await.0, 200);
    }
    // Some refused requests: bad JSON, 400 each.
    for _ in 0..3 {
        assert_eq!(post_event(&http, &server.url, "{not json").await.0, 400);
    }

    // Accepted, all time = applied (the checkpoint) + waiting in the log past it.
    let s = summary_until(&http, &server.url, "10 accepted = 6 applied + 4 waiting", |s| {
        s["accepted_total"] == 10 && s["applied_total"] == 6 && s["lag_events"] == 4
    })
    .await;
    assert_eq!(s["accepted_estimated"], false, "{s:#}");
    assert!(s["accepted_since_start"].as_u64().unwrap() <= 10, "{s:#}");
    let state = s["processor"]["state"].as_str().unwrap();
    assert!(state == "applying" || state == "lagging", "{s:#}");
    assert!(s["processor"]["last_commit_age_seconds"].as_f64().unwrap() >= 0.0, "{s:#}");
    // Events wait and nothing is committed for 5 s: lagging.
    let s = summary_until(&http, &server.url, "a lagging processor", |s| s["processor"]["state"] == "lagging").await;
    assert_eq!(s["lag_events"], 4, "{s:#}");

    // The errors and the ingest p99 are in the per-second points.
    let s = summary_until(&http, &server.url, "3 4xx answers and an ingest p99", |s| {
        let points = s["series"].as_array().unwrap();
        let errors: u64 = points.iter().map(|p| p["http_4xx"].as_u64().unwrap()).sum();
        errors >= 3 && points.iter().any(|p| p["ingest_p99_ms"].as_f64().is_some_and(|ms| ms > 0.0))
    })
    .await;
    let points = s["series"].as_array().unwrap();
    assert!(points.iter().all(|p| p["http_5xx"] == 0), "{s:#}");

    // Processed to the end: caught up (applying for 5 s after the commit, then idle).
    env.process(&[]).await;
    let s = summary_until(&http, &server.url, "an idle processor, caught up", |s| {
        s["processor"]["state"] == "idle" && s["lag_events"] == 0
    })
    .await;
    assert_eq!((s["accepted_total"].as_u64(), s["applied_total"].as_u64()), (Some(10), Some(10)), "{s:#}");

    // The ranges: an hour is asked in points of 10 s, 24 hours in points of a minute; others refused.
    for (range, step) in [("5m", 1), ("1h", 10), ("24h", 60)] {
        let response =
            http.get(format!("{}/console/summary?range={range}", server.url)).header("Authorization", TOKEN).send();
        let body: Value = response.await.unwrap().json().await.unwrap();
        assert_eq!((body["range"].as_str(), body["step_seconds"].as_u64()), (Some(range), Some(step)), "{body:#}");
        if range == "5m" {
            assert!(!body["series"].as_array().unwrap().is_empty(), "{body:#}");
        }
    }
    let refused = http
        .get(format!("{}/console/summary?range=2d", server.url))
        .header("Authorization", TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 400);
    let body: Value = refused.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("range"), "{body}");

    // The stream takes the same range.
    let stream = |range: &str| {
        http.get(format!("{}/console/stream?range={range}", server.url)).header("Authorization", TOKEN).send()
    };
    assert_eq!(stream("1d").await.unwrap().status().as_u16(), 400);
    let mut response = stream("24h").await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let mut text = String::new();
    let frame = tokio::time::timeout(Duration::from_secs(10), async {
        while !text.contains("\n\n") {
            let chunk = response.chunk().await.unwrap().expect("the stream ended early");
            text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
        text.clone()
    })
    .await
    .expect("a first frame");
    let data = frame.lines().find_map(|l| l.strip_prefix("data:")).expect("a data line");
    let first: Value = serde_json::from_str(data.trim()).unwrap();
    assert_eq!((first["range"].as_str(), first["step_seconds"].as_u64()), (Some("24h"), Some(60)), "{first:#}");
}
