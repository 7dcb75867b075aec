//! Runs of the client against small test servers that record what they receive and answer as told: the
//! harness here, the tests beside the part they are about (`send`, `pool`, `run`).

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

mod pool;
mod run;
mod send;

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
