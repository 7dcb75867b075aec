//! What an operator relies on: `/metrics` (server and processor), `/healthz` and `/readyz`, the OpenAPI
//! document against the routes really served, the configuration file's precedence, logs that never
//! hold the token, `eps compact` never removing an unapplied event, and `eps status` numbers.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

store_tests!(
    compact_never_removes_a_segment_holding_an_unapplied_event,
    the_servers_metrics_show_the_processors_lag_and_last_commit_from_the_store,
    status_json_counts_the_log_the_lag_and_the_exact_totals,
    a_processor_or_status_given_another_store_than_the_servers_is_refused_naming_both,
);

/// A token unlike any word the server writes by itself, so finding it anywhere means it leaked.
const OPS_TOKEN: &str = "tok-Q7xZ93kP";

// ---------------------------------------------------------------------------------------------------
// Helpers

/// `METHOD url` with optional token and JSON body; status, Content-Type and body text.
async fn call(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String, String) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = http.request(method.clone(), url);
    if let Some(token) = token {
        request = request.header("Authorization", token);
    }
    if let Some(body) = body {
        request = request.header("Content-Type", "application/json").body(body.to_string());
    }
    let response = request.send().await.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = response.status().as_u16();
    let content_type =
        response.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    (status, content_type, response.text().await.unwrap())
}

async fn get_json(http: &reqwest::Client, url: &str) -> (u16, Value) {
    let (status, _, text) = call(http, "GET", url, None, None).await;
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {url}: {text:?} is not JSON: {e}")))
}

/// The metrics text of `base_url`, asserting 200 and the Prometheus content type.
async fn scrape(http: &reqwest::Client, base_url: &str) -> String {
    let (status, content_type, text) = call(http, "GET", &format!("{base_url}/metrics"), None, None).await;
    assert_eq!(status, 200, "GET /metrics: {text}");
    assert!(content_type.starts_with("text/plain"), "GET /metrics Content-Type {content_type:?}");
    text
}

/// The value of the sample whose name and labels are exactly `series` (e.g. `name{a="b"}`).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?.strip_prefix(' ')?;
        Some(rest.trim().parse().unwrap_or_else(|e| panic!("sample {line:?}: {e}")))
    })
}

fn must_sample(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no sample {series:?} in the metrics:\n{text}"))
}

/// Polls `check` every 20 ms until it returns `Some`, failing with `what` after `limit`.
async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    within(limit, what, async {
        loop {
            if let Some(v) = check().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// Starts `eps ARGS` (a server) with stdout and stderr captured in files, and waits for its address.
async fn spawn_server(args: &[String], envs: &[(&str, String)], dir: &Path) -> (ChildGuard, String) {
    let child = ChildGuard::spawn(args, envs, dir);
    let prefix = "eps server listening on http://";
    let url = eventually(START_TIMEOUT, "the server's listening line", || {
        let out = child.stdout();
        async move { out.lines().find_map(|l| l.strip_prefix(prefix)).map(|a| format!("http://{a}")) }
    })
    .await;
    (child, url)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `eps status --json` on the env's data directory and database.
async fn status_json(env: &Env) -> Value {
    let mut a = args(&["status", "--json", "--data-dir", &env.data_dir.display().to_string()]);
    a.extend(env.db.args());
    let out = run_eps(&a, &[]).await;
    assert!(out.status.success(), "eps status --json: {out}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("eps status --json is not JSON ({e}): {out}"))
}

/// `eps compact EXTRA` on the env's data directory and database; asserts exit 0.
async fn compact(env: &Env, extra: &[&str]) -> Output {
    let mut a = args(&["compact", "--data-dir", &env.data_dir.display().to_string()]);
    a.extend(env.db.args());
    a.extend(extra.iter().map(|s| s.to_string()));
    let out = run_eps(&a, &[]).await;
    assert!(out.status.success(), "eps compact {extra:?}: {out}");
    out
}

/// Every segment file of a directory: name → bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    segments(dir)
        .into_iter()
        .map(|(_, p)| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect()
}

// ---------------------------------------------------------------------------------------------------
// 1. Server metrics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_metrics_count_requests_by_route_pattern_and_the_logs_syncs_without_user_ids_or_token() {
    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server_with(&["--token", OPS_TOKEN]).await;
    let http = http();
    let user = "metrics-user-5c1e";
    for value in ["1", "2.5", "3"] {
        let body = event_line(user, "add_revenue", value);
        let (status, _, text) =
            call(&http, "POST", &format!("{}/liveEvent", server.url), Some(OPS_TOKEN), Some(&body)).await;
        assert_eq!(status, 200, "{text}");
    }
    let bad = event_line(user, "add_revenue", "-1");
    let (status, _, text) =
        call(&http, "POST", &format!("{}/liveEvent", server.url), Some(OPS_TOKEN), Some(&bad)).await;
    assert_eq!(status, 400, "{text}");
    // The store connects in the background: 503 until then, then 404 (nothing applied yet).
    let user_url = format!("{}/userEvents/{user}", server.url);
    let status = eventually(Duration::from_secs(20), "GET /userEvents to answer other than 503", || {
        let (http, user_url) = (http.clone(), user_url.clone());
        async move {
            let (status, _, _) = call(&http, "GET", &user_url, Some(OPS_TOKEN), None).await;
            (status != 503).then_some(status)
        }
    })
    .await;
    assert_eq!(status, 404);

    let text = scrape(&http, &server.url).await;
    assert_eq!(must_sample(&text, r#"eps_http_requests_total{route="/liveEvent",method="POST",status="200"}"#), 3.0);
    assert_eq!(must_sample(&text, r#"eps_http_requests_total{route="/liveEvent",method="POST",status="400"}"#), 1.0);
    assert!(
        must_sample(&text, r#"eps_http_requests_total{route="/userEvents/{user_id}",method="GET",status="404"}"#)
            >= 1.0
    );
    assert_eq!(must_sample(&text, "eps_events_appended_total"), 3.0);
    let syncs = must_sample(&text, "eps_log_fsync_total");
    assert!((1.0..=3.0).contains(&syncs), "3 appends took {syncs} syncs");
    assert_eq!(must_sample(&text, "eps_log_fsync_duration_seconds_count"), syncs);
    assert!(text.contains("eps_log_fsync_duration_seconds_bucket{le=\""), "{text}");
    assert!(text.contains("eps_log_commit_batch_events_bucket{le=\""), "{text}");
    // The rejected event never reached the writer: 3 events in all group commits together.
    assert_eq!(must_sample(&text, "eps_log_commit_batch_events_sum"), 3.0);
    assert_eq!(must_sample(&text, "eps_log_segments"), 1.0);
    let log_end = std::fs::metadata(segments(&env.log_dir())[0].1.clone()).unwrap().len();
    assert_eq!(must_sample(&text, "eps_log_end_position_bytes"), log_end as f64);
    assert!(text.contains(r#"eps_http_request_duration_seconds_bucket{route="/userEvents/{user_id}",le=""#), "{text}");
    assert!(text.contains(r#"eps_http_request_duration_seconds_bucket{route="/liveEvent",le=""#), "{text}");
    assert!(text.contains("# HELP eps_events_appended_total "), "{text}");
    assert!(!text.contains(user), "a concrete user id is in the metrics:\n{text}");
    assert!(!text.contains(OPS_TOKEN), "the token is in the metrics:\n{text}");

    // An unknown path is counted under one label, not under the path it asked for.
    let (status, _, _) = call(&http, "GET", &format!("{}/no-such-path-7f2a", server.url), None, None).await;
    assert_eq!(status, 404);
    let text = scrape(&http, &server.url).await;
    assert!(!text.contains("no-such-path-7f2a"), "an unmatched path became a label value:\n{text}");
    // The previous scrape is counted too.
    assert!(must_sample(&text, r#"eps_http_requests_total{route="/metrics",method="GET",status="200"}"#) >= 1.0);
}

// ---------------------------------------------------------------------------------------------------
// 2. Processor metrics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_metrics_listen_serves_applied_events_commits_and_zero_lag_once_caught_up() {
    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server().await;
    let http = http();
    for i in 0..5 {
        let (status, body) = post_event(&http, &server.url, &event_line(&format!("pm-{i}"), "add_revenue", "2")).await;
        assert_eq!(status, 200, "{body}");
    }
    let follower = env.spawn_process(&["--follow", "--poll-ms", "5", "--metrics-listen", "127.0.0.1:0"]);
    let prefix = "eps process metrics on http://";
    let metrics_url = eventually(START_TIMEOUT, "eps process to print its metrics address", || {
        let out = follower.stdout();
        async move {
            let line = out.lines().find(|l| l.starts_with(prefix))?.to_string();
            let addr = line.strip_prefix(prefix)?.strip_suffix("/metrics")?;
            let port: u16 = addr.strip_prefix("127.0.0.1:")?.parse().ok()?;
            assert_ne!(port, 0, "the printed address must be the bound port: {line}");
            Some(format!("http://{addr}"))
        }
    })
    .await;

    for want in [5.0, 8.0] {
        if want == 8.0 {
            for i in 0..3 {
                let line = event_line(&format!("pm-late-{i}"), "add_revenue", "1");
                assert_eq!(post_event(&http, &server.url, &line).await.0, 200);
            }
        }
        let text = eventually(Duration::from_secs(20), "the processor's metrics to show every event applied", || {
            let (http, url) = (http.clone(), metrics_url.clone());
            async move {
                let text = scrape(&http, &url).await;
                let applied = sample(&text, "eps_processor_events_applied_total");
                let lag = sample(&text, "eps_processor_lag_bytes");
                (applied == Some(want) && lag == Some(0.0)).then_some(text)
            }
        })
        .await;
        let commits = must_sample(&text, "eps_processor_commits_total");
        assert!(commits >= 1.0 && commits <= want, "{want} events in {commits} commits");
        assert_eq!(must_sample(&text, "eps_processor_lag_events"), 0.0);
        let log_end = log_bytes(&env.log_dir()).len() as f64;
        assert_eq!(must_sample(&text, "eps_processor_checkpoint_bytes"), log_end);
        assert!(text.contains("eps_processor_commit_duration_seconds_bucket{le=\""), "{text}");
    }
    let (status, body) = get_json(&http, &format!("{metrics_url}/healthz")).await;
    assert_eq!((status, body), (200, json!({"status": "ok"})));
    drop(follower);
}

/// The address a processor started with `--metrics-listen 127.0.0.1:0` prints.
async fn processor_metrics_url(process: &ChildGuard) -> String {
    let prefix = "eps process metrics on http://";
    eventually(START_TIMEOUT, "eps process to print its metrics address", || {
        let out = process.stdout();
        async move {
            let line = out.lines().find(|l| l.starts_with(prefix))?.to_string();
            Some(format!("http://{}", line.strip_prefix(prefix)?.strip_suffix("/metrics")?))
        }
    })
    .await
}

/// `promtool check metrics` on a scrape: the exposition format is valid and follows Prometheus's
/// naming rules. promtool comes with Debian's prometheus package (scripts/test-deps installs it).
fn promtool_check_metrics(what: &str, text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run promtool ({e}): run scripts/test-deps, or apt-get install prometheus"));
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics on {what}: {said}");
}

/// The process series every `/metrics` carries, checked for plausible values of a live process.
fn assert_process_series(what: &str, text: &str) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(must_sample(text, "process_resident_memory_bytes") > 1_000_000.0, "{what}: resident memory\n{text}");
    assert!(must_sample(text, "process_cpu_seconds_total") >= 0.0, "{what}");
    let (open, max) = (must_sample(text, "process_open_fds"), must_sample(text, "process_max_fds"));
    assert!(open >= 3.0 && max >= open, "{what}: {open} open of {max} file descriptors");
    let started = must_sample(text, "process_start_time_seconds");
    assert!(started <= now + 1.0 && started > now - 600.0, "{what}: started at {started}, now {now}");
    assert!(text.contains("# TYPE process_cpu_seconds_total counter"), "{what}:\n{text}");
    // The build: this crate's version, and the commit of the checkout it was built from.
    let commit = env!("EPS_BUILD_COMMIT");
    let series = format!(r#"eps_build_info{{version="{}",commit="{commit}"}}"#, env!("CARGO_PKG_VERSION"));
    assert_eq!(must_sample(text, &series), 1.0, "{what}");
    let manifest = env!("CARGO_MANIFEST_DIR");
    let git = std::process::Command::new("git").args(["-C", manifest, "describe", "--always", "--abbrev=12"]).output();
    let top = std::process::Command::new("git").args(["-C", manifest, "rev-parse", "--show-toplevel"]).output();
    match (git, top) {
        (Ok(git), Ok(top))
            if git.status.success()
                && std::fs::canonicalize(String::from_utf8_lossy(&top.stdout).trim()).ok()
                    == std::fs::canonicalize(manifest).ok() =>
        {
            assert_eq!(commit, String::from_utf8_lossy(&git.stdout).trim(), "{what}: the build's commit")
        }
        _ => assert_eq!(commit, "unknown", "{what}: built outside a git checkout"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metrics_endpoint_has_process_series_and_build_info_and_passes_promtool() {
    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server().await;
    let http = http();
    assert_eq!(post_event(&http, &server.url, &event_line("ps-1", "add_revenue", "1")).await.0, 200);
    let text = scrape(&http, &server.url).await;
    assert_process_series("the server", &text);
    promtool_check_metrics("the server", &text);

    let follower = env.spawn_process(&["--follow", "--metrics-listen", "127.0.0.1:0"]);
    let url = processor_metrics_url(&follower).await;
    let text = eventually(Duration::from_secs(20), "the processor to apply the event", || {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let text = scrape(&http, &url).await;
            (sample(&text, "eps_processor_events_applied_total") == Some(1.0)).then_some(text)
        }
    })
    .await;
    assert_process_series("the processor", &text);
    promtool_check_metrics("the processor", &text);
    // Two processes, two start times: each series is its own process's.
    let pid_start = |t: &str| must_sample(t, "process_start_time_seconds");
    assert!(pid_start(&text) >= pid_start(&scrape(&http, &server.url).await), "the processor started after the server");
}

async fn the_servers_metrics_show_the_processors_lag_and_last_commit_from_the_store(store: StoreKind) {
    let env = Env::new(store).await;
    let server = env.server().await;
    let http = http();
    for i in 0..5 {
        assert_eq!(post_event(&http, &server.url, &event_line(&format!("lag-{i}"), "add_revenue", "1")).await.0, 200);
    }
    let log_end = log_bytes(&env.log_dir()).len() as f64;
    // Nothing applied yet: the whole log is lag, and there was no commit to be old.
    let text = eventually(Duration::from_secs(20), "the server's store gauges", || {
        let (http, url) = (http.clone(), server.url.clone());
        async move {
            let text = scrape(&http, &url).await;
            sample(&text, "eps_store_lag_bytes").is_some().then_some(text)
        }
    })
    .await;
    assert_eq!(must_sample(&text, "eps_store_lag_bytes"), log_end, "{text}");
    assert_eq!(must_sample(&text, "eps_store_lag_events"), 5.0);
    assert_eq!(must_sample(&text, "eps_store_checkpoint_bytes"), 0.0);
    assert_eq!(must_sample(&text, "eps_store_events_applied"), 0.0);
    assert!(must_sample(&text, "eps_store_lag_seconds") >= 0.0);
    assert_eq!(sample(&text, "eps_store_last_commit_age_seconds"), None, "no commit yet:\n{text}");
    let (available, size) =
        (must_sample(&text, "eps_data_dir_available_bytes"), must_sample(&text, "eps_data_dir_size_bytes"));
    assert!(available > 0.0 && size >= available, "{available} of {size} bytes free");

    // A processor (not scraped: it has no metrics port) applies everything; the server sees it.
    env.process(&[]).await;
    let text = eventually(Duration::from_secs(20), "the server to see the processor's commit", || {
        let (http, url) = (http.clone(), server.url.clone());
        async move {
            let text = scrape(&http, &url).await;
            (sample(&text, "eps_store_lag_bytes") == Some(0.0)).then_some(text)
        }
    })
    .await;
    assert_eq!(must_sample(&text, "eps_store_lag_events"), 0.0);
    assert_eq!(must_sample(&text, "eps_store_lag_seconds"), 0.0);
    assert_eq!(must_sample(&text, "eps_store_checkpoint_bytes"), log_end);
    assert_eq!(must_sample(&text, "eps_store_events_applied"), 5.0);
    let age = must_sample(&text, "eps_store_last_commit_age_seconds");
    assert!((0.0..30.0).contains(&age), "last commit {age} s ago");
    // The age is the commit's, not the scrape's: with no processor running it keeps growing.
    let later = eventually(Duration::from_secs(20), "the last-commit age to grow", || {
        let (http, url) = (http.clone(), server.url.clone());
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let text = scrape(&http, &url).await;
            sample(&text, "eps_store_last_commit_age_seconds").filter(|later| *later >= age + 1.5)
        }
    })
    .await;
    assert!(later < age + 30.0, "{later}");
    // New events are lag again, seen on the next refresh.
    assert_eq!(post_event(&http, &server.url, &event_line("lag-late", "add_revenue", "1")).await.0, 200);
    eventually(Duration::from_secs(20), "the new event to show as lag", || {
        let (http, url) = (http.clone(), server.url.clone());
        async move { (sample(&scrape(&http, &url).await, "eps_store_lag_events") == Some(1.0)).then_some(()) }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------------
// 3. Health and readiness

/// `/readyz` until it answers `want` (the store connects in the background), then its body.
async fn readyz_until(http: &reqwest::Client, url: &str, want: u16) -> Value {
    let url = format!("{url}/readyz");
    eventually(Duration::from_secs(20), &format!("GET /readyz to answer {want}"), || {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let (status, body) = get_json(&http, &url).await;
            (status == want).then_some(body)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_needs_no_token_and_readyz_is_200_with_log_and_sqlite_ok() {
    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server_with(&["--token", OPS_TOKEN]).await;
    let http = http();
    let (status, body) = get_json(&http, &format!("{}/healthz", server.url)).await;
    // The log it appends to: the id in the data directory's log/log-id.
    let id = std::fs::read_to_string(env.log_dir().join("log-id")).unwrap();
    assert_eq!((status, body), (200, json!({"status": "ok", "log": format!("file log {}", id.trim())})));
    let body = readyz_until(&http, &server.url, 200).await;
    assert_eq!(body, json!({"status": "ready", "log": "ok", "database": "ok"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_naming_the_database_when_postgres_is_unreachable_and_ingest_still_works() {
    let env = Env::new(StoreKind::Sqlite).await;
    // Nothing listens on port 1.
    let server = env.server_with(&["--database-url", "postgres://postgres@127.0.0.1:1/x"]).await;
    let http = http();
    let (status, body) = get_json(&http, &format!("{}/healthz", server.url)).await;
    assert_eq!((status, body["status"].clone()), (200, json!("ok")), "{body}");
    // Give the server time to try the database; it must still not be ready.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = get_json(&http, &format!("{}/readyz", server.url)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "not ready", "{body}");
    assert_eq!(body["log"], "ok", "{body}");
    let database = body["database"].as_str().unwrap_or_else(|| panic!("no database reason: {body}"));
    assert!(!database.is_empty() && database != "ok", "{body}");
    assert!(!database.contains("postgres://"), "the database URL (a secret) is in /readyz: {body}");
    // Ingest never depends on the database.
    assert_eq!(post_event(&http, &server.url, &event_line("r", "add_revenue", "1")).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_on_postgres_is_503_for_a_missing_database_and_200_for_a_real_one() {
    let db = TestDb::new(StoreKind::Postgres).await;
    let real = db.url.clone().unwrap();
    let (base, _) = real.rsplit_once('/').unwrap();
    let missing = format!("{base}/eps_missing_{:08x}", std::process::id());
    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server_with(&["--database-url", &missing]).await;
    let http = http();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = get_json(&http, &format!("{}/readyz", server.url)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "not ready", "{body}");
    assert_eq!(body["log"], "ok", "{body}");
    assert_ne!(body["database"], "ok", "{body}");
    assert!(body["database"].as_str().is_some_and(|s| !s.is_empty()), "{body}");
    drop(server);

    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server_with(&["--database-url", &real]).await;
    let body = readyz_until(&http, &server.url, 200).await;
    assert_eq!(body, json!({"status": "ready", "log": "ok", "database": "ok"}));
}

// ---------------------------------------------------------------------------------------------------
// 4. OpenAPI against the router

/// Resolves a `$ref` inside the document.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let pointer = reference.strip_prefix('#').unwrap_or_else(|| panic!("external $ref {reference}"));
            doc.pointer(pointer).unwrap_or_else(|| panic!("dangling $ref {reference}"))
        }
        None => schema,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_lists_exactly_the_served_routes_and_documents_error_bodies() {
    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server().await;
    let http = http();
    let (status, content_type, text) = call(&http, "GET", &format!("{}/openapi.json", server.url), None, None).await;
    assert_eq!(status, 200, "{text}");
    assert!(content_type.starts_with("application/json"), "{content_type}");
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "{doc}");
    let paths = doc["paths"].as_object().expect("paths");

    // Sanity of the detection below: the router's fallback and 405 look like this.
    let (status, _, text) = call(&http, "GET", &format!("{}/nope", server.url), Some(TOKEN), None).await;
    assert_eq!(status, 404);
    assert!(text.contains("\"not found: /nope\""), "{text}");
    let (status, _, _) = call(&http, "GET", &format!("{}/liveEvent", server.url), Some(TOKEN), None).await;
    assert_eq!(status, 405);

    // Every documented operation is served, and answers a documented status.
    let mut documented = BTreeSet::new();
    let valid_event = r#"{"userId":"openapi-user","name":"add_revenue","value":1}"#;
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            if !["get", "post", "put", "delete", "patch", "head", "options"].contains(&method.as_str()) {
                continue;
            }
            documented.insert((path.clone(), method.to_uppercase()));
            let concrete = path.replace("{userId}", "openapi-user");
            assert!(!concrete.contains('{'), "a path parameter this test does not know: {path}");
            let body = (method == "post").then_some(valid_event);
            let (status, text) = if concrete == "/console/stream" {
                // An endless event stream: its status and type are the answer, the body never ends.
                let response =
                    http.get(format!("{}{concrete}", server.url)).header("Authorization", TOKEN).send().await.unwrap();
                let kind = response.headers()["content-type"].to_str().unwrap().to_string();
                assert!(kind.starts_with("text/event-stream"), "{kind}");
                (response.status().as_u16(), String::new())
            } else {
                let (status, _, text) =
                    call(&http, &method.to_uppercase(), &format!("{}{concrete}", server.url), Some(TOKEN), body).await;
                (status, text)
            };
            assert_ne!(status, 405, "{method} {path} is documented but not routed: {text}");
            assert!(
                !(status == 404 && text.contains("\"not found: ")),
                "{method} {path} is documented but falls to the router's fallback: {text}"
            );
            let responses =
                operation["responses"].as_object().unwrap_or_else(|| panic!("{method} {path}: no responses"));
            assert!(
                responses.contains_key(&status.to_string()),
                "{method} {path} answered {status}, which is not documented ({:?}): {text}",
                responses.keys().collect::<Vec<_>>()
            );
        }
    }

    // Every route the server serves is documented (but the console's page and its files at `/` and
    // `/console/console.{css,js}`: a page, not an API).
    let served: BTreeSet<(String, String)> = [
        ("/liveEvent", "POST"),
        ("/events", "POST"),
        ("/userEvents/{userId}", "GET"),
        ("/healthz", "GET"),
        ("/readyz", "GET"),
        ("/metrics", "GET"),
        ("/openapi.json", "GET"),
        ("/console/summary", "GET"),
        ("/console/stream", "GET"),
    ]
    .iter()
    .map(|(p, m)| (p.to_string(), m.to_string()))
    .collect();
    let missing: Vec<_> = served.difference(&documented).collect();
    assert!(missing.is_empty(), "served but not documented: {missing:?}");
    let extra: Vec<_> = documented.difference(&served).collect();
    assert!(extra.is_empty(), "documented but not in this test's list of served routes: {extra:?}");

    // Every answer /liveEvent can give is documented with a JSON body; errors carry `error`.
    let responses = doc["paths"]["/liveEvent"]["post"]["responses"].as_object().unwrap();
    for code in ["200", "400", "401", "408", "413", "415", "503"] {
        let response = resolve(&doc, responses.get(code).unwrap_or_else(|| panic!("/liveEvent {code} not documented")));
        let schema = response["content"]["application/json"]["schema"].clone();
        assert!(!schema.is_null(), "/liveEvent {code}: no application/json schema: {response}");
        let schema = resolve(&doc, &schema);
        let property = if code == "200" { "message" } else { "error" };
        assert!(schema["properties"][property].is_object(), "/liveEvent {code}: no {property:?} property: {schema}");
        assert!(
            schema["required"].as_array().is_some_and(|r| r.contains(&json!(property))),
            "/liveEvent {code}: {property:?} is not required: {schema}"
        );
    }
    assert!(
        resolve(&doc, &responses["503"])["headers"]["Retry-After"].is_object(),
        "/liveEvent 503 does not document Retry-After"
    );
    // The token is documented as the Authorization header on the routes that check it.
    let scheme = &doc["components"]["securitySchemes"]["token"];
    assert_eq!(
        (scheme["type"].as_str(), scheme["in"].as_str(), scheme["name"].as_str()),
        (Some("apiKey"), Some("header"), Some("Authorization"))
    );
    for (path, method) in [("/liveEvent", "post"), ("/events", "post"), ("/userEvents/{userId}", "get")] {
        assert_eq!(doc["paths"][path][method]["security"], json!([{"token": []}]), "{method} {path}");
    }
}

// ---------------------------------------------------------------------------------------------------
// 5. Configuration precedence

/// POSTs one event with each token; the tokens answered 200.
async fn accepted_tokens(http: &reqwest::Client, url: &str, tokens: &[&str]) -> Vec<String> {
    let mut accepted = Vec::new();
    for token in tokens {
        let body = event_line("config-user", "add_revenue", "1");
        let (status, _, text) = call(http, "POST", &format!("{url}/liveEvent"), Some(token), Some(&body)).await;
        match status {
            200 => accepted.push(token.to_string()),
            401 => {}
            other => panic!("token {token}: answered {other}: {text}"),
        }
    }
    accepted
}

/// The `key = value  # source` line of `eps config` output in the `[section]` table (or the
/// `# key = …` comment of a secret or an unset setting).
fn config_line<'a>(out: &'a str, section: &str, key: &str) -> &'a str {
    let body = out.split(&format!("[{section}]\n")).nth(1).unwrap_or_else(|| panic!("no [{section}] in:\n{out}"));
    let body = body.split("\n\n").next().unwrap();
    body.lines()
        .find(|l| l.starts_with(&format!("{key} = ")) || l.starts_with(&format!("# {key} = ")))
        .unwrap_or_else(|| panic!("no {key} in [{section}] of:\n{out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_precedence_is_flag_then_env_then_file_and_config_redacts_the_token() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let file = tmp.path().join("eps.toml");
    std::fs::write(&file, format!("[server]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"fromfile\"\n")).unwrap();
    let file_s = file.display().to_string();
    let secrets = ["fromfile", "fromenv", "fromflag"];

    // eps config: where each value came from, the token never shown.
    let out = run_eps(&args(&["--config", &file_s, "config"]), &[("EPS_TOKEN", "fromenv".into())]).await;
    assert!(out.status.success(), "{out}");
    assert_eq!(
        config_line(&out.stdout, "server", "token"),
        "# token = <redacted>  # env EPS_TOKEN; set it here or in EPS_TOKEN"
    );
    assert_eq!(config_line(&out.stdout, "server", "listen"), format!(r#"listen = "127.0.0.1:{port}"  # file"#));
    assert_eq!(config_line(&out.stdout, "server", "body-limit"), r#"body-limit = "1048576"  # default"#);
    for s in secrets {
        assert!(!out.stdout.contains(s) && !out.stderr.contains(s), "eps config shows {s}: {out}");
    }
    let out = run_eps(&args(&["config"]), &[("EPS_CONFIG", file_s.clone())]).await;
    assert!(out.status.success(), "{out}");
    assert_eq!(
        config_line(&out.stdout, "server", "token"),
        "# token = <redacted>  # file; set it here or in EPS_TOKEN"
    );
    assert!(!out.stdout.contains("fromfile") && !out.stderr.contains("fromfile"), "{out}");

    // The server: flag over env over file.
    let http = http();
    let all = ["fromflag", "fromenv", "fromfile", TOKEN];
    #[allow(clippy::type_complexity)] // a table of cases reads best as one
    let cases: [(&[&str], &[(&str, String)], &str); 3] = [
        (&["--token", "fromflag"], &[("EPS_TOKEN", "fromenv".into())], "fromflag"),
        (&[], &[("EPS_TOKEN", "fromenv".into())], "fromenv"),
        (&[], &[], "fromfile"),
    ];
    for (i, (flags, envs, want)) in cases.iter().enumerate() {
        let data_dir = tmp.path().join(format!("data-{i}"));
        let mut a = args(&["--config", &file_s, "server", "--data-dir", &data_dir.display().to_string()]);
        a.extend(args(flags));
        let mut server = ServerProc::start(&a, envs, tmp.path()).await;
        assert_eq!(server.port, port, "the server did not take listen from the file");
        assert_eq!(accepted_tokens(&http, &server.url, &all).await, vec![want.to_string()], "case {i}: {a:?} {envs:?}");
        server.kill().await;
        let stderr = server.stderr();
        for s in secrets {
            assert!(!stderr.contains(s), "the server logged the token {s}:\n{stderr}");
        }
    }

    // An unknown key, in a table or at the top: exit 2, one line naming it.
    for (name, text, key) in
        [("table.toml", "[server]\ntokn = \"x\"\n", "tokn"), ("top.toml", "lisen = \"x\"\n", "lisen")]
    {
        let bad = tmp.path().join(name);
        std::fs::write(&bad, text).unwrap();
        for command in ["config", "server"] {
            let out = run_eps(&args(&["--config", &bad.display().to_string(), command]), &[]).await;
            assert_eq!(out.code(), Some(2), "{out}");
            assert_eq!(out.stderr.trim_end().lines().count(), 1, "not one line: {out}");
            assert!(out.stderr.contains(key), "the error does not name {key}: {out}");
        }
    }
}

/// A command's table configures that command only: `[client] token` is the client's token, not the
/// server's, and `[process] data-dir` does not move the server's data directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_in_a_command_table_applies_to_that_command_only() {
    let tmp = tempfile::tempdir().unwrap();
    let server_dir = tmp.path().join("server-data");
    let process_dir = tmp.path().join("process-data");
    let file = tmp.path().join("eps.toml");
    std::fs::write(
        &file,
        format!(
            "[server]\ntoken = \"servertok\"\ndata-dir = \"{}\"\n\n[client]\ntoken = \"clienttok\"\n\n[process]\ndata-dir = \"{}\"\n",
            server_dir.display(),
            process_dir.display()
        ),
    )
    .unwrap();
    let file_s = file.display().to_string();
    let mut wrong = Vec::new();
    let server =
        ServerProc::start(&args(&["--config", &file_s, "server", "--listen", "127.0.0.1:0"]), &[], tmp.path()).await;
    let accepted = accepted_tokens(&http(), &server.url, &["servertok", "clienttok"]).await;
    if accepted != ["servertok"] {
        wrong.push(format!("the server accepts {accepted:?}; [server] token is \"servertok\""));
    }
    if !server_dir.join("log").is_dir() || process_dir.exists() {
        wrong.push(format!(
            "the server's log is in {} instead of [server] data-dir {}",
            if process_dir.exists() { process_dir.display().to_string() } else { "neither".into() },
            server_dir.display()
        ));
    }
    let out = run_eps(&args(&["--config", &file_s, "config"]), &[]).await;
    assert!(out.status.success(), "{out}");
    let line = config_line(&out.stdout, "server", "data-dir");
    if line != format!("data-dir = {:?}  # file", server_dir.display().to_string()) {
        wrong.push(format!("eps config shows for [server]: {line}"));
    }
    assert!(wrong.is_empty(), "a command's table leaks into other commands:\n{}", wrong.join("\n"));
}

// ---------------------------------------------------------------------------------------------------
// 6. Logs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_debug_logs_are_json_lines_with_one_request_line_each_and_never_the_token() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let a = args(&[
        "server",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &data_dir.display().to_string(),
        "--log-format",
        "json",
        "--log-level",
        "debug",
        "--token",
        OPS_TOKEN,
    ]);
    let (mut server, url) = spawn_server(&a, &[], tmp.path()).await;
    let http = http();
    let wrong = "wrong-Kd81mZ";
    let bearer = format!("Bearer {OPS_TOKEN}");
    let event = event_line("log-user", "add_revenue", "1");
    #[allow(clippy::type_complexity)] // a table of cases reads best as one
    let requests: Vec<(&str, String, Option<&str>, Option<&str>, u16)> = vec![
        ("POST", format!("{url}/liveEvent"), Some(OPS_TOKEN), Some(&event), 200),
        ("POST", format!("{url}/liveEvent"), Some(&bearer), Some(&event), 200),
        ("POST", format!("{url}/liveEvent"), Some(wrong), Some(&event), 401),
        ("POST", format!("{url}/liveEvent"), None, Some(&event), 401),
        ("GET", format!("{url}/userEvents/log-user"), Some(wrong), None, 401),
        ("GET", format!("{url}/healthz"), None, None, 200),
        ("GET", format!("{url}/metrics"), Some(OPS_TOKEN), None, 200),
    ];
    for (method, u, token, body, want) in &requests {
        let (status, _, text) = call(&http, method, u, *token, *body).await;
        assert_eq!(status, *want, "{method} {u}: {text}");
    }
    // Let the last request's log line be written, then stop the server cleanly.
    tokio::time::sleep(Duration::from_millis(200)).await;
    sigterm(server.child.id().unwrap()).await;
    let status = within(Duration::from_secs(20), "the server to stop", server.child.wait()).await.unwrap();
    assert_eq!(status.code(), Some(0));

    let stderr = server.stderr();
    let stdout = server.stdout();
    let mut request_lines = Vec::new();
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        let value: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("stderr line is not JSON ({e}): {line}"));
        if value["fields"]["message"] == "request" {
            assert_eq!(value["level"], "DEBUG", "{line}");
            request_lines.push(value["fields"].clone());
        }
    }
    assert_eq!(request_lines.len(), requests.len(), "one request line per request; got {request_lines:#?}");
    for ((method, _, _, _, want), fields) in requests.iter().zip(&request_lines) {
        assert_eq!(fields["method"], *method, "{fields}");
        // Numbers stay numbers in JSON logs (a log pipeline compares and sums them).
        assert_eq!(fields["status"], json!(want), "{fields}");
        assert!(fields["route"].is_string() && fields["micros"].is_u64(), "{fields}");
    }
    assert_eq!(request_lines[4]["route"], "/userEvents/{user_id}");
    for secret in [OPS_TOKEN, wrong] {
        assert!(!stderr.contains(secret), "{secret} is in the server's stderr:\n{stderr}");
        assert!(!stdout.contains(secret), "{secret} is in the server's stdout:\n{stdout}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_json_logs_the_fatal_error_is_a_json_line_and_retry_delays_are_numbers() {
    // A runtime failure (the port is taken): exit 1, and the last stderr line is JSON naming the cause.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data").display().to_string();
    for (extra, code, want) in [
        (vec!["server", "--listen", addr.as_str(), "--data-dir", &data_dir], 1, format!("cannot listen on {addr}")),
        // A configuration error (exit 2), found before anything starts.
        (
            vec!["server", "--listen", "127.0.0.1:0", "--data-dir", &data_dir, "--token", ""],
            2,
            "token must not be empty".into(),
        ),
    ] {
        let mut a = args(&["--log-format", "json"]);
        a.extend(args(&extra));
        let out = run_eps(&a, &[]).await;
        assert_eq!(out.code(), Some(code), "{out}");
        let last = out.stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
        let line: Value =
            serde_json::from_str(last).unwrap_or_else(|e| panic!("the fatal line is not JSON ({e}): {out}"));
        assert_eq!(line["level"], "ERROR", "{last}");
        assert_eq!(line["fields"]["exit_code"], json!(code), "{last}");
        let message = line["fields"]["message"].as_str().unwrap_or_default();
        assert!(message.starts_with("eps: error: ") && message.contains(&want), "{last}");
    }
    drop(taken);

    // The server's database retry line carries its delay as a number of seconds.
    let port = free_port();
    let a = args(&[
        "--log-format",
        "json",
        "server",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &data_dir,
        "--database-url",
        &format!("postgres://eps@127.0.0.1:{port}/eps"),
    ]);
    let (server, _url) = spawn_server(&a, &[], tmp.path()).await;
    let retry = eventually(Duration::from_secs(20), "the server's database retry line", || {
        let stderr = server.stderr();
        async move {
            stderr
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|v| v["fields"]["message"].as_str().is_some_and(|m| m.starts_with("database not reachable")))
        }
    })
    .await;
    assert!(retry["fields"]["retry_in_secs"].is_f64(), "{retry}");
}

// ---------------------------------------------------------------------------------------------------
// 7. Retention

/// Writes `count` events of users `prefix-0..7` to a file; returns its path and the (user, name, value)s.
fn numbered_events(
    env: &Env,
    name: &str,
    prefix: &str,
    count: usize,
) -> (PathBuf, Vec<(String, &'static str, String)>) {
    let events: Vec<_> = (0..count)
        .map(|i| {
            let kind = if i % 4 == 3 { "subtract_revenue" } else { "add_revenue" };
            (format!("{prefix}-{}", i % 7), kind, format!("{}.{:02}", i % 50, i % 100))
        })
        .collect();
    let lines: Vec<String> = events.iter().map(|(u, n, v)| event_line(u, n, v)).collect();
    (env.write_file(name, &lines), events)
}

async fn send_all(env: &Env, url: &str, name: &str, prefix: &str, count: usize) -> Vec<(String, &'static str, String)> {
    let (file, events) = numbered_events(env, name, prefix, count);
    // Single events and few requests per group commit, so the small segments roll often.
    let out = client(&file, url, &["--batch", "1", "--concurrency", "4"]).await;
    assert!(out.status.success() && out.stdout.contains(&format!("accepted {count} ")), "eps client: {out}");
    events
}

/// Asserts what a compaction removed: exactly the segments before `checkpoint` other than the newest,
/// the others untouched. Returns the names removed.
fn check_compacted(
    before: &BTreeMap<String, Vec<u8>>,
    after: &BTreeMap<String, Vec<u8>>,
    checkpoint: u64,
) -> Vec<String> {
    let newest = before.keys().last().unwrap().clone();
    let mut removed = Vec::new();
    for (name, bytes) in before {
        let base: u64 = name.trim_start_matches("server-events-").trim_end_matches(".jsonl").parse().unwrap();
        let end = base + bytes.len() as u64;
        let all_applied = end <= checkpoint;
        if all_applied && *name != newest {
            assert!(!after.contains_key(name), "{name} (bytes {base}..{end}, checkpoint {checkpoint}) was kept");
            removed.push(name.clone());
        } else {
            let kept = after.get(name).unwrap_or_else(|| {
                panic!("{name} (bytes {base}..{end}) holds unapplied events or is the newest, and was removed (checkpoint {checkpoint})")
            });
            assert!(kept == bytes, "{name} changed");
        }
    }
    assert_eq!(after.len(), before.len() - removed.len(), "new segment files appeared");
    removed
}

async fn compact_never_removes_a_segment_holding_an_unapplied_event(store: StoreKind) {
    let env = Env::new(store).await;
    let mut server = env.server_with(&["--segment-bytes", "2000"]).await;
    let mut sent = send_all(&env, &server.url, "a.jsonl", "ret-a", 200).await;
    let out = env.process(&[]).await;
    assert_eq!(applied_count(&out.stdout), 200, "{out}");
    sent.extend(send_all(&env, &server.url, "b.jsonl", "ret-b", 100).await);

    let log_dir = env.log_dir();
    let before = snapshot(&log_dir);
    let status = status_json(&env).await;
    let checkpoint = status["checkpoint"].as_u64().unwrap();
    // Both kinds of segment exist, and unapplied events span more than the newest segment.
    let ends: Vec<u64> = segments(&log_dir).iter().map(|(b, p)| b + std::fs::metadata(p).unwrap().len()).collect();
    let applied = ends.iter().filter(|e| **e <= checkpoint).count();
    assert!(applied >= 2 && ends.len() - applied >= 2, "segment ends {ends:?}, checkpoint {checkpoint}");
    assert_eq!(status["lag_events"], 100, "{status}");
    assert_eq!(status["log_start"], 0, "{status}");

    // The default minimum age keeps everything just written.
    let out = compact(&env, &[]).await;
    assert_eq!(snapshot(&log_dir), before, "the default --min-age-secs removed a fresh segment: {out}");
    // A dry run changes nothing but says what would go.
    let out = compact(&env, &["--min-age-secs", "0", "--dry-run"]).await;
    assert_eq!(snapshot(&log_dir), before, "--dry-run changed the log: {out}");
    assert!(out.stdout.contains("dry run"), "{out}");

    // Archive: the applied segments move, byte for byte.
    let archive = env.tmp.path().join("archive");
    let out = compact(&env, &["--min-age-secs", "0", "--archive-dir", &archive.display().to_string()]).await;
    let after = snapshot(&log_dir);
    let removed = check_compacted(&before, &after, checkpoint);
    assert!(!removed.is_empty(), "nothing removed although {checkpoint} bytes are applied: {out}");
    let archived = snapshot(&archive);
    assert_eq!(archived.keys().cloned().collect::<Vec<_>>(), removed, "{out}");
    for name in &removed {
        assert!(archived[name] == before[name], "{name} differs in the archive");
    }
    let status = status_json(&env).await;
    let first_kept: u64 =
        after.keys().next().unwrap().trim_start_matches("server-events-").trim_end_matches(".jsonl").parse().unwrap();
    assert!(first_kept > 0);
    assert_eq!(status["log_start"], first_kept, "{status}");
    assert_eq!(status["checkpoint"], checkpoint, "{status}");
    assert_eq!(status["lag_events"], 100, "compaction lost unapplied events: {status}");

    // The remaining events are all applied.
    let out = env.process(&[]).await;
    assert_eq!(applied_count(&out.stdout), 100, "{out}");
    let want = expected_totals(sent.iter().map(|(u, n, v)| (u.as_str(), *n, v.as_str())));
    assert_totals(&env.revenues().await, &want);

    // Delete mode, with unapplied events again in the newest segments.
    sent.extend(send_all(&env, &server.url, "c.jsonl", "ret-c", 100).await);
    let before = snapshot(&log_dir);
    let checkpoint = status_json(&env).await["checkpoint"].as_u64().unwrap();
    let out = compact(&env, &["--min-age-secs", "0"]).await;
    let removed = check_compacted(&before, &snapshot(&log_dir), checkpoint);
    assert!(!removed.is_empty(), "{out}");
    assert_eq!(snapshot(&archive).len(), archived.len(), "delete mode wrote to the archive");
    assert_eq!(status_json(&env).await["lag_events"], 100);

    // A server restarted on a compacted log, and a processor, still work.
    server.kill().await;
    let server = env.server_with(&["--segment-bytes", "2000"]).await;
    sent.extend(send_all(&env, &server.url, "d.jsonl", "ret-d", 20).await);
    let out = env.process(&[]).await;
    assert_eq!(applied_count(&out.stdout), 120, "{out}");
    let want = expected_totals(sent.iter().map(|(u, n, v)| (u.as_str(), *n, v.as_str())));
    assert_totals(&env.revenues().await, &want);
    let status = status_json(&env).await;
    assert_eq!(status["events_applied"], 420, "{status}");
    assert_eq!(status["lag_events"], 0, "{status}");

    // Everything applied: only the newest segment stays.
    let before = snapshot(&log_dir);
    compact(&env, &["--min-age-secs", "0"]).await;
    let after = snapshot(&log_dir);
    assert_eq!(after.keys().collect::<Vec<_>>(), vec![before.keys().last().unwrap()], "only the newest segment stays");
}

// ---------------------------------------------------------------------------------------------------
// 8. Status

async fn status_json_counts_the_log_the_lag_and_the_exact_totals(store: StoreKind) {
    let env = Env::new(store).await;
    let server = env.server_with(&["--segment-bytes", "500"]).await;
    let http = http();
    let mut events: Vec<(&str, &str, &str)> = vec![("st-a", "add_revenue", "0.1"); 10];
    events.extend([
        ("st-b", "add_revenue", "12.345"),
        ("st-b", "subtract_revenue", "0.005"),
        ("st-c", "add_revenue", "100"),
        ("st-c", "subtract_revenue", "100"),
    ]);
    for (u, n, v) in &events {
        assert_eq!(post_event(&http, &server.url, &event_line(u, n, v)).await.0, 200);
    }
    let log_end = log_bytes(&env.log_dir()).len() as u64;
    assert!(segments(&env.log_dir()).len() >= 2, "the lag should span segments");

    let status = status_json(&env).await;
    assert_eq!(status["log_end"], log_end, "{status}");
    assert_eq!(status["log_start"], 0, "{status}");
    assert_eq!(status["checkpoint"], 0, "{status}");
    assert_eq!(status["lag_events"], events.len(), "{status}");
    assert_eq!(status["lag_bytes"], log_end, "{status}");
    assert_eq!(status["events_applied"], 0, "{status}");
    assert_eq!(status["users"], 0, "{status}");
    assert_eq!(status["total_revenue"], "0", "{status}");

    env.process(&[]).await;
    let status = status_json(&env).await;
    assert_eq!(status["log_end"], log_end, "{status}");
    assert_eq!(status["checkpoint"], log_end, "{status}");
    assert_eq!(status["lag_events"], 0, "{status}");
    assert_eq!(status["lag_bytes"], 0, "{status}");
    assert_eq!(status["events_applied"], events.len(), "{status}");
    assert_eq!(status["users"], 3, "{status}");
    // 10 × 0.1 + 12.345 − 0.005 + 100 − 100, exactly.
    assert_eq!(status["total_revenue"], "13.34", "{status}");

    // Three more, not applied: the lag counts them exactly, across the segment boundary.
    for v in ["1", "2", "3"] {
        assert_eq!(post_event(&http, &server.url, &event_line("st-d", "add_revenue", v)).await.0, 200);
    }
    let new_end = log_bytes(&env.log_dir()).len() as u64;
    let status = status_json(&env).await;
    assert_eq!(status["log_end"], new_end, "{status}");
    assert_eq!(status["checkpoint"], log_end, "{status}");
    assert_eq!(status["lag_events"], 3, "{status}");
    assert_eq!(status["lag_bytes"], new_end - log_end, "{status}");
    assert_eq!(status["users"], 3, "{status}");
    assert_eq!(status["total_revenue"], "13.34", "{status}");
    assert_eq!(status["segments"], segments(&env.log_dir()).len(), "{status}");

    // The text form says the same.
    let mut a = args(&["status", "--data-dir", &env.data_dir.display().to_string()]);
    a.extend(env.db.args());
    let out = run_eps(&a, &[]).await;
    assert!(out.status.success(), "{out}");
    assert!(out.stdout.contains("lag              3 events"), "{out}");
    assert!(out.stdout.contains("total revenue    13.34"), "{out}");
}

// ---------------------------------------------------------------------------------------------------
// 8. Errors that say what to do

/// Every entry under `dir`, recursively, as paths relative to it (what a command created there).
fn tree(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(at) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&at) else { continue };
        for entry in entries.map(Result::unwrap) {
            out.insert(entry.path().strip_prefix(dir).unwrap().display().to_string());
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_be_opened_stops_the_processor_at_once_and_the_server_shows_the_cause() {
    // The SQLite file's place is taken by a directory: nothing can open it, however long one waits
    // (unlike permissions, this holds for root too).
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("log")).unwrap();
    let sqlite = data.join("eps.sqlite3");
    std::fs::create_dir(&sqlite).unwrap();
    let data_arg = data.display().to_string();

    // The processor does not retry it: exit 1, one line naming the file, the operation and the cause.
    let out = run_eps(&args(&["process", "--data-dir", &data_arg, "--retry-secs", "5"]), &[]).await;
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(!out.stderr.contains("retrying"), "a permanent error was retried: {out}");
    let last = out.stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
    assert!(last.starts_with("eps: error: "), "{out}");
    assert!(last.contains(&format!("cannot open the SQLite store {}", sqlite.display())), "{out}");
    assert!(last.contains("unable to open database file"), "the cause is missing: {out}");

    // The server takes events without its store, and says why it has none: in its log and /readyz.
    let (server, url) =
        spawn_server(&args(&["server", "--listen", "127.0.0.1:0", "--data-dir", &data_arg]), &[], tmp.path()).await;
    let http = http();
    let body = eventually(Duration::from_secs(20), "/readyz to name the cause", || {
        let (http, url) = (http.clone(), format!("{url}/readyz"));
        async move {
            let (status, body) = get_json(&http, &url).await;
            (status == 503 && body["database"].as_str().is_some_and(|d| d.contains("unable to open database file")))
                .then_some(body)
        }
    })
    .await;
    assert!(body["database"].as_str().unwrap().contains(&sqlite.display().to_string()), "{body}");
    let retry =
        server.stderr().lines().find(|l| l.contains("GET /userEvents answers 503 meanwhile")).map(str::to_string);
    let retry = retry.unwrap_or_else(|| panic!("no retry line: {}", server.stderr()));
    assert!(retry.contains("unable to open database file"), "the retry line has no cause: {retry}");

    // A data directory that cannot be created (under /proc): the path and the operation, exit 1.
    let proc_dir = format!("/proc/eps-no-such-{}/data", std::process::id());
    let out = run_eps(&args(&["server", "--listen", "127.0.0.1:0", "--data-dir", &proc_dir]), &[]).await;
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stderr.lines().any(|l| l.starts_with("eps: error: cannot create the directory /proc/eps-no-such-")),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_that_read_a_data_directory_never_create_one_and_name_the_missing_one() {
    let tmp = tempfile::tempdir().unwrap();
    // A mistyped path: an error naming it and how it is set (exit 2), and nothing created.
    let typo = tmp.path().join("daat");
    let typo_arg = typo.display().to_string();
    for command in
        [vec!["status"], vec!["status", "--json"], vec!["compact", "--dry-run"], vec!["compact"], vec!["process"]]
    {
        let mut a = args(&command);
        a.extend(args(&["--data-dir", &typo_arg]));
        let out = run_eps(&a, &[]).await;
        assert_eq!(out.code(), Some(2), "eps {command:?}: {out}");
        assert!(out.stderr.contains(&typo_arg) && out.stderr.contains("--data-dir"), "eps {command:?}: {out}");
        assert!(!typo.exists(), "eps {command:?} created {typo_arg}: {out}");
    }
    // The same through the environment, and `eps config` (which only prints) creates nothing either.
    let out = run_eps(&args(&["status"]), &[("EPS_DATA_DIR", typo_arg.clone())]).await;
    assert_eq!(out.code(), Some(2), "{out}");
    let out = run_eps(&args(&["config"]), &[("EPS_DATA_DIR", typo_arg.clone())]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(!typo.exists(), "{out}");

    // An existing directory no server wrote to: status says there is no store, process that there is
    // no log; neither creates a database or a log in it.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let empty_arg = empty.display().to_string();
    let out = run_eps(&args(&["status", "--data-dir", &empty_arg]), &[]).await;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains(&format!("no SQLite store {}", empty.join("eps.sqlite3").display())), "{out}");
    let out = run_eps(&args(&["process", "--data-dir", &empty_arg]), &[]).await;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains(&format!("no log in {}", empty.join("log").display())), "{out}");
    assert_eq!(tree(&empty), BTreeSet::new(), "something was created in a data directory that had nothing");

    // `--follow` waits for a server to make the log, creating nothing meanwhile, then applies it.
    let process = ChildGuard::spawn(&args(&["process", "--follow", "--data-dir", &empty_arg]), &[], tmp.path());
    eventually(Duration::from_secs(20), "the processor's waiting line", || {
        let stderr = process.stderr();
        async move { stderr.contains("waiting for it").then_some(()) }
    })
    .await;
    assert_eq!(tree(&empty), BTreeSet::new(), "the waiting processor created something");
    let (_server, url) =
        spawn_server(&args(&["server", "--listen", "127.0.0.1:0", "--data-dir", &empty_arg]), &[], tmp.path()).await;
    let http = http();
    assert_eq!(post_event(&http, &url, &event_line("wait-u", "add_revenue", "2.5")).await.0, 200);
    eventually(Duration::from_secs(20), "the waiting processor to apply the event", || {
        let (http, url) = (http.clone(), format!("{url}/userEvents/wait-u"));
        async move {
            let (status, _, body) = call(&http, "GET", &url, Some("secret"), None).await;
            (status == 200 && body.contains("2.5")).then_some(())
        }
    })
    .await;
}

/// The data directory records its server's store; `eps process`, `eps status` and `eps compact` given
/// another one (the classic: the server on PostgreSQL, a processor without DATABASE_URL) refuse with
/// a line naming both, create nothing, and `--allow-other-store` lets them through.
async fn a_processor_or_status_given_another_store_than_the_servers_is_refused_naming_both(store: StoreKind) {
    let env = Env::new(store).await;
    let server = env.server().await;
    let http = http();
    assert_eq!(post_event(&http, &server.url, &event_line("os-u", "add_revenue", "4")).await.0, 200);
    // Its store open (the SQLite files it makes are there) before the data directory is compared.
    readyz_until(&http, &server.url, 200).await;
    let data_arg = env.data_dir.display().to_string();
    // The store as the record and the errors name it: "sqlite", or the URL without its password.
    let (ours, other_args, other): (String, Vec<String>, String) = match store {
        StoreKind::Postgres => {
            // The store is named by its database: hosts, ports and name, no role, password or options.
            let url = env.db.url.clone().unwrap();
            let rest = url.split_once("://").unwrap().1.split('?').next().unwrap();
            let named = format!("postgres://{}", rest.rsplit_once('@').map_or(rest, |(_, host)| host));
            (named, vec![], "sqlite".into())
        }
        StoreKind::Sqlite => {
            let url = format!("postgres://eps:pw@127.0.0.1:{}/eps", free_port());
            ("sqlite".into(), vec!["--database-url".into(), url], "postgres://127.0.0.1:".into())
        }
    };
    let before = tree(&env.data_dir);
    for command in [vec!["process"], vec!["status"], vec!["compact", "--dry-run"]] {
        let mut a = args(&command);
        a.extend(args(&["--data-dir", &data_arg]));
        a.extend(other_args.clone());
        let out = run_eps(&a, &[]).await;
        assert_eq!(out.code(), Some(2), "eps {command:?}: {out}");
        let line = out.stderr.lines().find(|l| l.starts_with("eps: error: ")).unwrap_or_default();
        assert!(line.contains(&ours) && line.contains(&other), "eps {command:?} does not name both stores: {out}");
        assert!(line.contains("--allow-other-store") && line.contains("DATABASE_URL"), "no fix in: {out}");
        assert!(!line.contains(":pw@"), "a password in: {out}");
    }
    assert_eq!(tree(&env.data_dir), before, "a refused command changed the data directory");

    // With the override (SQLite only: the other PostgreSQL store does not exist), the processor applies
    // the log to the store it was given, which the server does not read.
    if store == StoreKind::Postgres {
        let out = run_eps(&args(&["process", "--data-dir", &data_arg, "--allow-other-store"]), &[]).await;
        assert_eq!(out.code(), Some(0), "{out}");
        assert!(out.stdout.contains("applied 1 events"), "{out}");
        let out = run_eps(&args(&["status", "--data-dir", &data_arg, "--allow-other-store"]), &[]).await;
        assert_eq!(out.code(), Some(0), "{out}");
        assert!(out.stdout.contains("database         sqlite"), "{out}");
    }
    // The right store still works; the record is the one line the errors showed.
    env.process(&[]).await;
    assert_eq!(std::fs::read_to_string(env.data_dir.join("store")).unwrap(), format!("{ours}\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_postgres_errors_stop_the_processor_at_once_with_the_databases_message() {
    let db = TestDb::new(StoreKind::Postgres).await;
    let real = db.url.clone().unwrap();
    let (base, _) = real.rsplit_once('/').unwrap();
    let (scheme, rest) = base.split_once("://").unwrap();
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let tag = format!("{:08x}", std::process::id());
    // A data directory with a log (made by hand: no server recorded a store in it).
    let env = Env::new(StoreKind::Sqlite).await;
    std::fs::create_dir_all(env.log_dir()).unwrap();
    let data_arg = env.data_dir.display().to_string();
    let cases = [
        (format!("{base}/eps_missing_{tag}"), "3D000", "does not exist"),
        (format!("{scheme}://eps_no_role_{tag}@{host}/postgres"), "28", "eps_no_role_"),
    ];
    for (url, code, words) in &cases {
        // Even with a long retry budget: the first answer is final.
        let a = args(&["process", "--data-dir", &data_arg, "--database-url", url, "--retry-secs", "20"]);
        let out = run_eps(&a, &[]).await;
        assert_eq!(out.code(), Some(1), "{url}: {out}");
        assert!(!out.stderr.contains("retrying"), "a permanent error was retried: {out}");
        let last = out.stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
        assert!(
            last.starts_with("eps: error: ") && last.contains(&format!("({code}")) && last.contains(words),
            "{out}"
        );
    }
    // The server takes events meanwhile, and its /readyz and log show the database's own message.
    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server_with(&["--database-url", &cases[0].0]).await;
    let http = http();
    let body = readyz_until(&http, &server.url, 503).await;
    let body = if body["database"].as_str().is_some_and(|d| d.contains("3D000")) {
        body
    } else {
        eventually(Duration::from_secs(20), "/readyz to show 3D000", || {
            let (http, url) = (http.clone(), format!("{}/readyz", server.url));
            async move {
                let (_, body) = get_json(&http, &url).await;
                body["database"].as_str().is_some_and(|d| d.contains("3D000")).then_some(body)
            }
        })
        .await
    };
    assert!(body["database"].as_str().unwrap().contains("does not exist"), "{body}");
    assert!(!body["database"].as_str().unwrap().contains("postgres://"), "the URL in /readyz: {body}");
    let stderr = server.stderr();
    assert!(stderr.lines().any(|l| l.contains("database refused") && l.contains("3D000")), "{stderr}");
}

/// `key = value` of the uncommented lines of `eps config`'s output, per section, without the comments.
fn config_values(text: &str) -> Vec<String> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        if line.starts_with('[') {
            section = line.to_string();
        } else {
            out.push(format!("{section} {}", line.split("  #").next().unwrap()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_output_of_eps_config_is_a_configuration_file_that_every_command_accepts_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data").display().to_string();
    let out = run_eps(&args(&["config"]), &[("EPS_DATA_DIR", data.clone()), ("EPS_TOKEN", OPS_TOKEN.into())]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(!out.stdout.contains(OPS_TOKEN), "the token is in eps config: {out}");
    let file = tmp.path().join("eps.toml");
    std::fs::write(&file, &out.stdout).unwrap();
    let f = file.display().to_string();

    // Before any server: the file is accepted, and the one thing wrong is said (no data directory yet).
    let out = run_eps_in(tmp.path(), &args(&["--config", &f, "status"]), &[]).await;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains(&format!("the data directory {data} does not exist")), "{out}");

    let (_server, url) = spawn_server(
        &args(&["--config", &f, "server", "--listen", "127.0.0.1:0", "--token", OPS_TOKEN]),
        &[],
        tmp.path(),
    )
    .await;
    let (status, _) = get_json(&http(), &format!("{url}/healthz")).await;
    assert_eq!(status, 200);
    for command in [vec!["process"], vec!["status"], vec!["compact", "--dry-run"]] {
        let mut a = args(&["--config", &f]);
        a.extend(args(&command));
        let out = run_eps_in(tmp.path(), &a, &[]).await;
        assert_eq!(out.code(), Some(0), "eps --config FILE {command:?}: {out}");
    }
    let out = run_eps_in(tmp.path(), &args(&["--config", &f, "status"]), &[]).await;
    assert!(out.stdout.contains(&data), "status did not read the file's data-dir: {out}");
    // Printed again from the file, every setting has the same value (now from the file).
    let again = run_eps_in(tmp.path(), &args(&["--config", &f, "config"]), &[]).await;
    assert_eq!(again.code(), Some(0), "{again}");
    assert_eq!(config_values(&again.stdout), config_values(&out_of(&file)));
    assert!(again.stdout.contains(&format!("data-dir = \"{data}\"  # file")), "{again}");
}

fn out_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_processors_retry_lines_carry_the_delay_as_a_number_and_the_cause() {
    // A data directory with a log, and a PostgreSQL port nothing listens on: a connection failure,
    // retried for --retry-secs.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("data/log")).unwrap();
    let url = format!("postgres://eps@127.0.0.1:{}/eps", free_port());
    let a = args(&[
        "--log-format",
        "json",
        "process",
        "--data-dir",
        &tmp.path().join("data").display().to_string(),
        "--database-url",
        &url,
        "--retry-secs",
        "1",
    ]);
    let out = run_eps(&a, &[]).await;
    assert_eq!(out.code(), Some(1), "{out}");
    let retries: Vec<Value> = out
        .stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["message"].as_str().is_some_and(|m| m.contains("retrying")))
        .collect();
    assert!(!retries.is_empty(), "no retry line: {out}");
    for line in &retries {
        assert!(line["fields"]["retry_in_secs"].is_f64(), "the delay is not a number: {line}");
        assert!(line["fields"].get("retry_in").is_none(), "{line}");
        let error = line["fields"]["error"].as_str().unwrap_or_default();
        assert!(error.contains("PostgreSQL unavailable while connecting"), "the retry line has no cause: {line}");
    }
}

/// Issue 20, item 4: at the default log level no dependency writes a line at info (async_nats'
/// "connected successfully", tokio_postgres relaying PostgreSQL's NOTICEs of `IF NOT EXISTS`): a server
/// and processors on the JetStream log and PostgreSQL, run twice (a new database, then an existing one),
/// log only eps's own lines below warnings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_default_level_no_dependency_logs_at_info_on_jetstream_and_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let nats = common::nats::Nats::start(dir.path()).await;
    let db = TestDb::new(StoreKind::Postgres).await;
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut a = args(&["server", "--listen", "127.0.0.1:0", "--data-dir", &data.display().to_string()]);
    a.extend(["--log".to_string(), nats.url()]);
    a.extend(db.args());
    let mut server = ServerProc::start(&a, &[], dir.path()).await;
    let http = http();
    eventually(Duration::from_secs(30), "an event accepted on JetStream", || {
        let (http, url) = (http.clone(), server.url.clone());
        async move {
            let (status, _) = post_ndjson(&http, &url, format!("{}\n", event_line("quiet", "add_revenue", "1"))).await;
            (status == 200).then_some(())
        }
    })
    .await;
    let mut logs = Vec::new();
    for _ in 0..2 {
        let mut a = args(&["process", "--log", &nats.url()]);
        a.extend(db.args());
        let out = run_eps(&a, &[]).await;
        assert!(out.status.success(), "{out}");
        logs.push(out.stderr);
    }
    server.sigterm().await;
    assert!(server.wait(Duration::from_secs(20)).await.success(), "{}", server.stderr());
    logs.push(server.stderr());
    let logs = logs.join("");

    // Text lines: "<time> <LEVEL> <target>: <message>".
    let below_warn: Vec<(&str, &str)> = logs
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let (_, level, target) = (words.next()?, words.next()?, words.next()?);
            ["INFO", "DEBUG", "TRACE"].contains(&level).then(|| (target.trim_end_matches(':'), line))
        })
        .collect();
    let foreign: Vec<&str> =
        below_warn.iter().filter(|(target, _)| !target.starts_with("eps")).map(|(_, line)| *line).collect();
    assert!(foreign.is_empty(), "dependencies logging at info by default:\n{}", foreign.join("\n"));
    // eps's own info lines are still there: the filter holds back the dependencies, not eps.
    assert!(below_warn.iter().any(|(target, _)| *target == "eps::log::nats"), "{logs}");
    assert!(below_warn.iter().any(|(target, _)| *target == "eps::server"), "{logs}");
}
