//! Telemetry: logs (tracing) and metrics (Prometheus text format), set up once per process.
//!
//! Metric names are listed in README.md ("Operating eps"); each is recorded where the thing it counts
//! happens (the log writer counts syncs, the processor counts commits), and rendered by whoever serves
//! `/metrics`. Nothing here ever records the token.
//!
//! Every `/metrics` (the server's and a processor's) is made by [`render`], which first samples the
//! process itself (`process_*`: memory, CPU, file descriptors, start time) so those series are as fresh
//! as the scrape, and always carries `eps_build_info{version,commit}`.

pub mod tally;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Log format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Sets up the global tracing subscriber: `filter` in EnvFilter syntax; text (colours only on a
/// terminal) or JSON lines.
pub fn init_tracing(filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(quiet_dependencies("info")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// The filter eps logs with, from `--log-level`: a bare level (`info`, `debug`, `trace`) is eps's own
/// level, while every other target (the dependencies: async_nats, tokio_postgres, hyper, rustls, …) is
/// held to warnings, so the default log has no third-party notices ("connected successfully", a
/// PostgreSQL NOTICE of `IF NOT EXISTS`). A directive that names a target (`info,async_nats=debug`)
/// still applies to it; a level of `warn` or quieter, and a filter without a bare level, are used as
/// given.
pub fn quiet_dependencies(filter: &str) -> String {
    let verbose =
        |directive: &str| ["info", "debug", "trace"].contains(&directive.trim().to_ascii_lowercase().as_str());
    if !filter.split(',').any(verbose) {
        return filter.to_string();
    }
    let mut out = vec!["warn".to_string()];
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        out.push(if verbose(directive) { format!("eps={directive}") } else { directive.to_string() });
    }
    out.join(",")
}

/// The process's metrics recorder, installed on first use. Durations are histograms in seconds;
/// batch sizes histograms in events.
pub fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let seconds = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
        let sizes = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0, 10000.0, 100000.0];
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_events".into()), &sizes))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_requests".into()), &sizes))
            .expect("bucket lists are not empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Histogram samples are kept until they are folded into their buckets, which rendering does;
        // without a scrape they would pile up (8 bytes per request, forever). Fold them regularly.
        let upkeep = handle.clone();
        let _ = std::thread::Builder::new().name("eps-metrics-upkeep".into()).spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_secs(5));
            upkeep.run_upkeep();
        });
        // Fails only if another recorder is installed; then metrics go there and this handle renders
        // nothing, which is harmless.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        process_collector().describe();
        metrics::gauge!("eps_build_info", "version" => env!("CARGO_PKG_VERSION"), "commit" => BUILD_COMMIT).set(1.0);
        handle
    })
}

/// The commit eps was built from (`git describe` at build time, see build.rs), or "unknown" when it
/// was built outside a git checkout (from a source tarball).
pub const BUILD_COMMIT: &str = env!("EPS_BUILD_COMMIT");

fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// The process's metrics in Prometheus text format, with the `process_*` series sampled now (a few
/// reads of /proc/self). What every `/metrics` answers.
pub fn render() -> String {
    let handle = metrics();
    process_collector().collect();
    handle.render()
}

/// Per-request metrics and the debug-level request log line. Routes are labelled by their pattern
/// (`/userEvents/{user_id}`), never the concrete path, so user ids do not become label values.
///
/// The metric handles are looked up once per (route, method, status) and per thread, then reused:
/// building a labelled key (a vector of labels, hashed into the registry) on every request cost a
/// measurable share of single-event ingest.
pub async fn track_requests(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| intern(p.as_str()));
    let response = next.run(request).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    tally::TALLY.record(status, route == "/events" || route == "/liveEvent", elapsed);
    REQUEST_METRICS.with(|handles| {
        let mut handles = handles.borrow_mut();
        let (count, duration) = handles.entry((route, method, status)).or_insert_with(|| {
            let status = status.to_string();
            (
                metrics::counter!("eps_http_requests_total", "route" => route, "method" => method, "status" => status),
                metrics::histogram!("eps_http_request_duration_seconds", "route" => route),
            )
        });
        count.increment(1);
        duration.record(elapsed.as_secs_f64());
    });
    tracing::debug!(%method, %route, status, micros = elapsed.as_micros() as u64, "request");
    response
}

type RequestHandles = HashMap<(&'static str, &'static str, u16), (metrics::Counter, metrics::Histogram)>;

thread_local! {
    static REQUEST_METRICS: RefCell<RequestHandles> = RefCell::new(HashMap::new());
}

/// The method as a static label; methods outside the standard ones share one label (a client could
/// otherwise invent a new label value with every request).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "other",
    }
}

/// A route pattern as a `'static` label. Patterns come from the router's fixed table, so the set
/// kept here is as small as that table. Each thread asks the shared set once per pattern.
fn intern(pattern: &str) -> &'static str {
    thread_local! {
        static LOCAL: RefCell<HashSet<&'static str>> = RefCell::new(HashSet::new());
    }
    if let Some(known) = LOCAL.with(|local| local.borrow().get(pattern).copied()) {
        return known;
    }
    let known = intern_shared(pattern);
    LOCAL.with(|local| local.borrow_mut().insert(known));
    known
}

fn intern_shared(pattern: &str) -> &'static str {
    static PATTERNS: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut patterns = PATTERNS.get_or_init(Mutex::default).lock().unwrap_or_else(|e| e.into_inner());
    match patterns.get(pattern) {
        Some(known) => known,
        None => {
            let leaked: &'static str = Box::leak(pattern.to_owned().into_boxed_str());
            patterns.insert(leaked);
            leaked
        }
    }
}

/// Every metric eps records, with its meaning (rendered as `# HELP` lines).
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("eps_http_requests_total", "HTTP requests answered, by route pattern, method and status");
    describe_histogram!("eps_http_request_duration_seconds", Unit::Seconds, "HTTP request latency, by route pattern");
    describe_counter!(
        "eps_http_auth_refusals_total",
        "Requests refused by the token check, by route and reason (missing_token, unknown_token, scope, rate_limited, over_burst)"
    );
    describe_counter!("eps_events_appended_total", "Events written to the log and synced");
    describe_counter!("eps_events_duplicate_total", "Events not written because their id was already in the log");
    describe_counter!("eps_log_bytes_written_total", "Bytes appended to the log");
    describe_gauge!("eps_log_end_position_bytes", "Log position just past the last synced line");
    describe_gauge!("eps_log_segments", "Segment files the writer has opened");
    describe_counter!("eps_log_fsync_total", "Successful log syncs (one per group commit)");
    describe_histogram!(
        "eps_log_fsync_duration_seconds",
        Unit::Seconds,
        "Time to write and fdatasync one group commit"
    );
    describe_histogram!("eps_log_commit_batch_events", "Events per group commit");
    describe_histogram!(
        "eps_log_commit_batch_requests",
        "Requests per group commit (on JetStream: per grouped message of id-less events)"
    );
    describe_counter!("eps_log_append_errors_total", "Group commits that failed (the requests got 503)");
    describe_counter!("eps_processor_events_applied_total", "Events applied to the store by this processor");
    describe_counter!("eps_processor_invalid_lines_total", "Log lines that were not valid events (dead-lettered)");
    describe_counter!("eps_processor_commits_total", "Batches committed by this processor");
    describe_counter!("eps_processor_conflicts_total", "Batches another processor committed first");
    describe_counter!(
        "eps_processor_read_errors_total",
        "Log reads that failed while following (retried from the checkpoint)"
    );
    describe_counter!(
        "eps_processor_dead_letter_errors_total",
        "Failed attempts to write the dead-letter file (retried; the lines are recorded in the store)"
    );
    describe_histogram!("eps_processor_commit_duration_seconds", Unit::Seconds, "Time to commit one batch");
    describe_counter!(
        "eps_jetstream_lost_ranges_total",
        "Ranges of stream sequences found removed (retention, a purge) before they were applied, one per range"
    );
    describe_counter!("eps_jetstream_lost_sequences_total", "Stream sequences in those ranges");
    describe_gauge!(
        "eps_jetstream_lost_last_sequence",
        "Last stream sequence of the latest range found removed before it was applied"
    );
    describe_gauge!("eps_processor_checkpoint_bytes", "Log position the store's checkpoint has reached");
    describe_gauge!("eps_processor_lag_bytes", "Log bytes not yet applied (log end minus checkpoint)");
    describe_gauge!("eps_processor_lag_events", "Events not yet applied (estimated from the average line size)");
    describe_gauge!("eps_build_info", "Always 1; its labels say which version and commit this binary was built from");
    describe_gauge!(
        "eps_store_checkpoint_bytes",
        "Server's view of the store: log position the file log's checkpoint has reached"
    );
    describe_gauge!(
        "eps_store_lag_bytes",
        "Server's view of the store: file-log bytes the processors have not applied yet"
    );
    describe_gauge!(
        "eps_store_lag_events",
        "Server's view of the store: file-log events not applied yet (counted over the first MiB, estimated beyond)"
    );
    describe_gauge!(
        "eps_store_lag_seconds",
        Unit::Seconds,
        "Server's view of the store: age of the oldest event not applied yet (0 when caught up)"
    );
    describe_gauge!(
        "eps_store_last_commit_age_seconds",
        Unit::Seconds,
        "Server's view of the store: time since a processor last committed, over every stream (database clock)"
    );
    describe_gauge!("eps_data_dir_available_bytes", Unit::Bytes, "Bytes available on the data directory's filesystem");
    describe_gauge!("eps_data_dir_size_bytes", Unit::Bytes, "Size of the data directory's filesystem in bytes");
    describe_gauge!("eps_store_events_applied", "Server's view of the store: events applied, over every stream");
}

/// Counters that alerts and dashboards read with `rate`/`increase`, exported at 0 from the start: a
/// series that first appears at 1 has no earlier sample, so `increase` would miss that first error,
/// and a missing series cannot be told from a missing scrape.
const SERVER_COUNTERS: &[&str] =
    &["eps_events_appended_total", "eps_events_duplicate_total", "eps_log_append_errors_total", "eps_log_fsync_total"];
const PROCESSOR_COUNTERS: &[&str] = &[
    "eps_processor_events_applied_total",
    "eps_processor_invalid_lines_total",
    "eps_processor_commits_total",
    "eps_processor_conflicts_total",
    "eps_processor_read_errors_total",
    "eps_processor_dead_letter_errors_total",
];

/// Registers the server's counters at 0 (see [`SERVER_COUNTERS`]).
pub fn register_server_counters() {
    metrics();
    for name in SERVER_COUNTERS {
        metrics::counter!(*name).increment(0);
    }
}

/// Serves `/metrics` (and `/healthz`) on `addr` in the background: how a processor, which has no HTTP
/// server of its own, is scraped. Returns the bound address (useful with port 0).
pub async fn serve_metrics(addr: std::net::SocketAddr) -> anyhow::Result<std::net::SocketAddr> {
    use axum::routing::get;
    metrics();
    for name in PROCESSOR_COUNTERS {
        metrics::counter!(*name).increment(0);
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for metrics on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let router = axum::Router::new()
        .route("/metrics", get(|| async { render() }))
        .route("/healthz", get(|| async { axum::Json(serde_json::json!({ "status": "ok" })) }));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "metrics listener stopped");
        }
    });
    tracing::info!(addr = %bound, "serving processor metrics");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_bare_level_is_eps_own_and_dependencies_stay_at_warn_unless_named() {
        use super::quiet_dependencies as q;
        assert_eq!(q("info"), "warn,eps=info");
        assert_eq!(q("DEBUG"), "warn,eps=DEBUG");
        assert_eq!(q("info,async_nats=debug"), "warn,eps=info,async_nats=debug");
        assert_eq!(q("warn"), "warn");
        assert_eq!(q("error"), "error");
        assert_eq!(q("eps=debug"), "eps=debug");
        assert_eq!(q("eps::server=trace,hyper=info"), "eps::server=trace,hyper=info");
    }
}
