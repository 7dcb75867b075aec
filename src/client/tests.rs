//! Runs of the client against small test servers that record what they receive and answer as told.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tokio::io::{AsyncBufReadExt as _, BufReader};

use super::pool::Backoff;
use super::*;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap as AxumHeaders;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request as the test server saw it.
#[derive(Debug, Clone)]
struct Received {
    body: String,
    id: String,
    auth: Option<String>,
    content_type: Option<String>,
}

/// Decides the answer from how many times this id has been seen (1 for the first time).
type Answer = Arc<dyn Fn(usize) -> BoxFuture<'static, Response> + Send + Sync>;

#[derive(Clone)]
struct Recorder {
    seen: Arc<Mutex<Vec<Received>>>,
    answer: Answer,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
}

impl Recorder {
    fn new(answer: impl Fn(usize) -> BoxFuture<'static, Response> + Send + Sync + 'static) -> Recorder {
        Recorder {
            seen: Arc::default(),
            answer: Arc::new(answer),
            in_flight: Arc::default(),
            max_in_flight: Arc::default(),
        }
    }

    fn received(&self) -> Vec<Received> {
        self.seen.lock().unwrap().clone()
    }

    /// How many requests arrived per id.
    fn counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for r in self.received() {
            *counts.entry(r.id).or_insert(0) += 1;
        }
        counts
    }
}

fn accepted() -> BoxFuture<'static, Response> {
    Box::pin(async { Json(serde_json::json!({"message": "Event received"})).into_response() })
}

async fn record(State(rec): State<Recorder>, headers: AxumHeaders, body: Bytes) -> Response {
    let now = rec.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    rec.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let body = String::from_utf8(body.to_vec()).unwrap();
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let id = json["id"].as_str().unwrap().to_owned();
    let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_owned());
    let nth = {
        let mut seen = rec.seen.lock().unwrap();
        seen.push(Received {
            body,
            id: id.clone(),
            auth: header("authorization"),
            content_type: header("content-type"),
        });
        seen.iter().filter(|r| r.id == id).count()
    };
    let response = (rec.answer)(nth).await;
    rec.in_flight.fetch_sub(1, Ordering::SeqCst);
    response
}

async fn serve(rec: &Recorder) -> String {
    let app = Router::new().route("/liveEvent", post(record)).with_state(rec.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn input(lines: &[&str]) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    for line in lines {
        writeln!(file, "{line}").unwrap();
    }
    file.flush().unwrap();
    file
}

fn events(n: usize) -> tempfile::NamedTempFile {
    let lines: Vec<String> =
        (0..n).map(|i| format!(r#"{{"userId":"user{i}","name":"add_revenue","value":{i}}}"#)).collect();
    input(&lines.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Single events to `POST /liveEvent`: most tests below are about one event's fate.
fn options(file: &tempfile::NamedTempFile, url: &str) -> ClientOptions {
    ClientOptions {
        file: file.path().to_owned(),
        urls: vec![url.to_owned()],
        token: "secret-token".to_owned(),
        batch: 1,
        concurrency: 8,
        max_attempts: 5,
        timeout: Duration::from_secs(5),
        progress: Progress::Quiet,
        ..Default::default()
    }
}

/// Runs with a millisecond backoff, returning the summary and the error reports.
/// `fut`, failing the test if it has not finished after `secs` (a guard against hangs, not a speed check).
async fn within_secs<T>(secs: u64, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .unwrap_or_else(|_| panic!("still running after {secs} s: a hang"))
}

async fn run_fast(opts: ClientOptions) -> (ClientSummary, Vec<String>) {
    let capture = Arc::new(Mutex::new(Vec::new()));
    let tuning = Tuning {
        backoff: Backoff { base: Duration::from_millis(1), cap: Duration::from_millis(10) },
        capture: Some(Arc::clone(&capture)),
        ..Tuning::default()
    };
    let summary = run_with(opts, tuning, std::future::pending()).await.unwrap();
    let reports = capture.lock().unwrap().clone();
    (summary, reports)
}

fn run_id_of(id: &str) -> &str {
    let (run, _) = id.split_once('-').unwrap();
    assert_eq!(run.len(), 16, "{id}");
    assert!(run.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    run
}

/// Each request's body and Content-Type, in arrival order.
type Bodies = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// A `POST /events` stand-in: records each body; answers 503 to the first request, then 200 with
/// line 2 of every batch refused.
async fn serve_batches() -> (String, Bodies) {
    let bodies: Bodies = Arc::default();
    let seen = Arc::clone(&bodies);
    let handler = move |headers: AxumHeaders, body: Bytes| {
        let seen = Arc::clone(&seen);
        async move {
            let content_type = headers.get("content-type").map(|v| v.to_str().unwrap().to_owned());
            let text = String::from_utf8(body.to_vec()).unwrap();
            let lines = text.lines().count();
            let first = {
                let mut seen = seen.lock().unwrap();
                seen.push((text, content_type));
                seen.len() == 1
            };
            if first {
                return (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"error": "busy"}))).into_response();
            }
            let refused = usize::from(lines >= 2);
            let errors: Vec<_> = (refused == 1)
                .then(|| serde_json::json!({"line": 2, "error": "invalid event: made up"}))
                .into_iter()
                .collect();
            let answer = serde_json::json!({
                "accepted": lines - refused, "duplicates": 1, "rejected": refused, "errors": errors,
            });
            Json(answer).into_response()
        }
    };
    let app = Router::new().route("/events", post(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), bodies)
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

#[tokio::test]
async fn sends_each_valid_line_once_with_run_and_line_ids() {
    let rec = Recorder::new(|_| accepted());
    let url = serve(&rec).await;
    let file = input(&[
        r#"{"userId":"u1","name":"add_revenue","value":100}"#,
        "",
        r#"{"userId":"u2","name":"refund","value":1}"#,
        "   \t",
        r#"{"userId":"u3","name":"subtract_revenue","value":50,"id":"mine-7"}"#,
        r#"{"userId":"u4","name":"add_revenue","value":2}"#,
    ]);
    let (summary, reports) = run_fast(options(&file, &format!("{url}/"))).await;

    let expected =
        ClientSummary { lines: 4, sent: 3, accepted: 3, invalid: 1, elapsed: summary.elapsed, ..Default::default() };
    assert_eq!(summary, expected);
    assert!(!summary.ok(), "an invalid line makes the run not ok");
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert!(reports[0].starts_with("line 3: invalid event: "), "{reports:?}");

    let received = rec.received();
    assert_eq!(received.len(), 3);
    let run = run_id_of(&received.iter().find(|r| r.id != "mine-7").unwrap().id).to_owned();
    let ids: HashSet<String> = received.iter().map(|r| r.id.clone()).collect();
    let want: HashSet<String> = [format!("{run}-1"), "mine-7".to_owned(), format!("{run}-6")].into();
    assert_eq!(ids, want);
    for r in &received {
        assert_eq!(r.auth.as_deref(), Some("secret-token"));
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
    }
    let first = received.iter().find(|r| r.id == format!("{run}-1")).unwrap();
    assert_eq!(first.body, format!(r#"{{"userId":"u1","name":"add_revenue","value":100,"id":"{run}-1"}}"#));

    // A second run (no checkpoint kept here) sends the same ids: the producer is the file's
    // fingerprint, so a server recognises the events it has.
    let (again, _) = run_fast(options(&file, &url)).await;
    assert_eq!(again.accepted, 3);
    let received = rec.received();
    let second_run = run_id_of(&received[3..].iter().find(|r| r.id != "mine-7").unwrap().id).to_owned();
    assert_eq!(second_run, run);
    assert_eq!(run, state::hex64(state::fingerprint(&std::fs::read(file.path()).unwrap())));
    // --new-run draws another.
    let (third, _) = run_fast(ClientOptions { new_run: true, ..options(&file, &url) }).await;
    assert_eq!(third.accepted, 3);
    let received = rec.received();
    let third_run = run_id_of(&received[6..].iter().find(|r| r.id != "mine-7").unwrap().id).to_owned();
    assert_ne!(third_run, run);
}

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
async fn never_more_requests_in_flight_than_the_concurrency() {
    let rec = Recorder::new(|_| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Json(serde_json::json!({"message": "Event received"})).into_response()
        })
    });
    let url = serve(&rec).await;
    let file = events(60);
    let (summary, _) = run_fast(ClientOptions { concurrency: 4, ..options(&file, &url) }).await;
    assert!(summary.ok());
    assert_eq!(summary.accepted, 60);
    let max = rec.max_in_flight.load(Ordering::SeqCst);
    assert!(max <= 4, "{max} requests in flight");
    assert!(max >= 2, "requests should overlap, saw at most {max}");
}

#[tokio::test]
async fn values_are_sent_exactly() {
    let rec = Recorder::new(|_| accepted());
    let url = serve(&rec).await;
    let file = input(&[
        r#"{"userId":"a","name":"add_revenue","value":0.1}"#,
        r#"{"userId":"b","name":"add_revenue","value":1e3}"#,
        r#"{"userId":"c","name":"subtract_revenue","value":1.50}"#,
        r#"{"userId":"d\"e","name":"add_revenue","value":0.000,"id":"x"}"#,
        r#"{"userId":"f","name":"add_revenue","value":12345678901234567890.12345678}"#,
    ]);
    let (summary, _) = run_fast(options(&file, &url)).await;
    assert!(summary.ok());
    let received = rec.received();
    let run = run_id_of(&received.iter().find(|r| r.id != "x").unwrap().id).to_owned();
    let bodies: HashSet<String> = received.into_iter().map(|r| r.body).collect();
    let want: HashSet<String> = [
        format!(r#"{{"userId":"a","name":"add_revenue","value":0.1,"id":"{run}-1"}}"#),
        format!(r#"{{"userId":"b","name":"add_revenue","value":1000,"id":"{run}-2"}}"#),
        format!(r#"{{"userId":"c","name":"subtract_revenue","value":1.5,"id":"{run}-3"}}"#),
        r#"{"userId":"d\"e","name":"add_revenue","value":0,"id":"x"}"#.to_owned(),
        format!(r#"{{"userId":"f","name":"add_revenue","value":12345678901234567890.12345678,"id":"{run}-5"}}"#),
    ]
    .into();
    assert_eq!(bodies, want);
}

#[tokio::test]
async fn a_missing_file_is_an_error_naming_it() {
    let opts = ClientOptions {
        file: PathBuf::from("/nonexistent/eps-events.jsonl"),
        progress: Progress::Quiet,
        ..Default::default()
    };
    let err = run(opts).await.unwrap_err();
    assert!(format!("{err:#}").contains("/nonexistent/eps-events.jsonl"), "{err:#}");
}

#[tokio::test]
async fn a_bad_url_is_an_error() {
    let file = events(1);
    let err = run(ClientOptions { urls: vec!["ftp://x".into()], ..options(&file, "") }).await.unwrap_err();
    assert!(format!("{err:#}").contains("ftp://x"), "{err:#}");
}

#[tokio::test]
async fn an_overlong_line_and_a_bom_are_handled() {
    let rec = Recorder::new(|_| accepted());
    let url = serve(&rec).await;
    let long = format!(r#"{{"userId":"{}","name":"add_revenue","value":1}}"#, "a".repeat(MAX_LINE_BYTES));
    let first = "\u{feff}{\"userId\":\"u\",\"name\":\"add_revenue\",\"value\":1}";
    let file = input(&[first, &long]);
    let (summary, reports) = run_fast(options(&file, &url)).await;
    assert_eq!((summary.lines, summary.accepted, summary.invalid), (2, 1, 1));
    assert_eq!(reports, vec![format!("line 2: line is longer than {MAX_LINE_BYTES} bytes")]);
}

// -----------------------------------------------------------------------------------------------
// Several servers

#[test]
fn the_resume_command_is_the_command_line_less_the_one_time_flags() {
    let args: Vec<std::ffi::OsString> = [
        "eps",
        "client",
        "my events.jsonl",
        "--new-run",
        "--url",
        "http://a:1,http://b:2",
        "--from-start=true",
        "--token",
        "it's",
    ]
    .iter()
    .map(Into::into)
    .collect();
    assert_eq!(resume_command(&args), r#"eps client 'my events.jsonl' --url http://a:1,http://b:2 --token 'it'\''s'"#);
}

#[tokio::test]
async fn a_stop_ends_the_run_without_sending_the_rest_and_without_retrying() {
    // Every request fails (503): without the stop the run would retry each for a long time.
    let rec = Recorder::new(|_| {
        Box::pin(async {
            (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"error": "busy"}))).into_response()
        })
    });
    let url = serve(&rec).await;
    let file = events(1000);
    let opts = ClientOptions { max_attempts: 1000, concurrency: 2, ..options(&file, &url) };
    let capture = Arc::new(Mutex::new(Vec::new()));
    let tuning = Tuning { capture: Some(Arc::clone(&capture)), ..Tuning::default() };
    let stop = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Stopped::Signal(2)
    };
    let summary = within_secs(60, run_with(opts, tuning, stop)).await.unwrap();
    assert_eq!(summary.stopped, Some(Stopped::Signal(2)));
    assert_eq!(summary.accepted + summary.failed, 0);
    assert_eq!(summary.interrupted, summary.sent);
    assert!(summary.sent <= 2, "no request after the stop: {summary}");
    assert!(!summary.ok());
    assert_eq!(Stopped::Signal(2).exit_code(), 130);
    assert_eq!(Stopped::Signal(15).exit_code(), 143);
}

/// Two recorders, the first answering `first`, the second accepting everything.
async fn two_servers(
    first: impl Fn(usize) -> BoxFuture<'static, Response> + Send + Sync + 'static,
) -> (Recorder, String, Recorder, String) {
    let a = Recorder::new(first);
    let b = Recorder::new(|_| accepted());
    let (url_a, url_b) = (serve(&a).await, serve(&b).await);
    (a, url_a, b, url_b)
}

#[tokio::test]
async fn requests_are_spread_round_robin_and_counted_per_server() {
    let (a, url_a, b, url_b) = two_servers(|_| accepted()).await;
    let file = events(40);
    let opts = ClientOptions { urls: vec![url_a.clone(), url_b.clone()], concurrency: 1, ..options(&file, "") };
    let (summary, reports) = run_fast(opts).await;
    assert!(summary.ok(), "{summary} {reports:?}");
    assert_eq!((a.received().len(), b.received().len()), (20, 20));
    assert_eq!(summary.per_server, vec![(url_a.clone(), 20), (url_b.clone(), 20)]);
    assert_eq!(summary.per_server_line().unwrap(), format!("per server: {url_a} → 20, {url_b} → 20"));
    let ids: HashSet<String> = a.counts().into_keys().chain(b.counts().into_keys()).collect();
    assert_eq!(ids.len(), 40, "each event went to one server");
}

#[tokio::test]
async fn a_failing_server_is_left_out_and_its_requests_go_to_the_next_at_once() {
    // The first server always answers 503 with a long Retry-After: obeying it instead of failing
    // over would take 30 s a request.
    let (a, url_a, b, url_b) = two_servers(|_| {
        Box::pin(async {
            (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "30")], Json(serde_json::json!({"error": "down"})))
                .into_response()
        })
    })
    .await;
    let file = events(300);
    let opts = ClientOptions { urls: vec![url_a.clone(), url_b.clone()], concurrency: 4, ..options(&file, "") };
    let capture = Arc::new(Mutex::new(Vec::new()));
    // The default backoffs: 500 ms before a probe of the failing server.
    let tuning = Tuning { capture: Some(Arc::clone(&capture)), ..Tuning::default() };
    let started = Instant::now();
    let summary = run_with(opts, tuning, std::future::pending()).await.unwrap();
    let elapsed = started.elapsed();
    assert!(summary.ok(), "{summary} {:?}", capture.lock().unwrap());
    assert_eq!(summary.accepted, 300);
    // The failing server asks for 30 s (Retry-After): a client that obeyed it instead of failing
    // over would take at least that long. 25 s separates the two with room for a loaded machine.
    assert!(elapsed < Duration::from_secs(25), "took {elapsed:?}: a Retry-After was obeyed instead of failing over");
    assert_eq!(summary.per_server, vec![(url_a, 0), (url_b, 300)]);

    // The failing server saw the requests sent before it was found down (at most one per
    // request in flight), then one probe per backoff (500 ms, doubling).
    let to_a = a.received();
    let probes = elapsed.as_millis() as usize / 500 + 1;
    assert!(!to_a.is_empty());
    assert!(to_a.len() <= 4 + probes, "{} requests to the down server in {elapsed:?}", to_a.len());
    // Each of them went again to the other server, as the same bytes.
    let to_b = b.received();
    assert_eq!(b.counts().len(), 300);
    for r in &to_a {
        let again = to_b.iter().find(|o| o.id == r.id).expect("failed over");
        assert_eq!(again.body, r.body);
    }
}

#[tokio::test]
async fn with_every_server_down_the_backoff_applies_and_events_fail_after_max_attempts() {
    let dead = || {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let file = events(6);
    let opts = ClientOptions { urls: vec![dead(), dead()], max_attempts: 3, ..options(&file, "") };
    // A guard against a hang only (generous, for a loaded machine).
    let (summary, reports) = within_secs(60, run_fast(opts)).await;
    assert_eq!((summary.sent, summary.failed, summary.accepted), (6, 6, 0));
    assert!(reports[0].contains("failed after 3 attempts: "), "{reports:?}");
    assert_eq!(summary.per_server.iter().map(|(_, n)| n).sum::<u64>(), 0);
}

#[tokio::test]
async fn urls_are_checked_and_blank_ones_ignored() {
    let file = events(1);
    let err = run(ClientOptions { urls: vec![" ".into(), String::new()], ..options(&file, "") }).await.unwrap_err();
    assert!(format!("{err:#}").contains("no server URL"), "{err:#}");
    let err = run(ClientOptions { urls: vec!["http://127.0.0.1:1".into(), "ftp://y".into()], ..options(&file, "") })
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("ftp://y"), "{err:#}");
}
