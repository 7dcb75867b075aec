//! `eps server`: the HTTP front of the log.
//!
//! [`Server::bind`] does everything that can fail at start-up (open and repair the log, bind the port,
//! check the token policy) before anything is served, so a misconfigured server exits at once with one
//! readable line. The one exception is a file log whose recovery takes longer than [`RECOVERY_GRACE`]:
//! the server then listens meanwhile, answering 503 to what needs the log (`recovering.rs`), and a
//! recovery that fails later stops it with the error. [`Server::run`] serves until the shutdown future resolves, then stops accepting,
//! lets in-flight requests finish (each waits for the sync that covers it) and stops the log writer
//! after its last sync.
//!
//! The store is opened in the background: ingest never depends on the database being up, and
//! `GET /userEvents` answers 503 until it is reachable.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::log::nats::NatsLog;
use crate::log::writer::{DEFAULT_DEDUP_MAX_IDS, DEFAULT_DEDUP_WINDOW_SECS, DEFAULT_SEGMENT_BYTES};
use crate::log::{producers::DEFAULT_HORIZON_SECS, EventLog, FileLogOptions, LogBackend, LOG_DIR};
use crate::store::{self, Store};

pub mod auth;
mod console;
mod error;
mod openapi;
mod recovering;
mod routes;
pub mod serve;
pub mod tls;

use error::ApiError;

/// The seed's token. Accepted for compatibility, but only on a loopback address.
pub const DEFAULT_TOKEN: &str = "secret";
/// The default of `--listen`: the loopback address, port 8000.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8000));
/// The default of `--body-limit`: the largest `POST /liveEvent` body, 1 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;
/// The default of `--batch-body-limit`: the largest `POST /events` body, 16 MiB.
pub const DEFAULT_BATCH_BODY_LIMIT: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub token: String,
    /// `--tokens-file`: scoped tokens, re-read on SIGHUP; when set, `token` is not used.
    pub tokens_file: Option<PathBuf>,
    /// Each token's rate limit unless its entry sets one (`--rate-limit-events-per-second`).
    pub rate_limit: Option<auth::RateLimit>,
    /// `--cors-origin`: origins whose pages may POST events from a browser (ingest routes only).
    pub cors_origins: Vec<String>,
    pub database_url: Option<String>,
    pub body_limit: usize,
    /// Largest accepted `POST /events` body, in bytes.
    pub batch_body_limit: usize,
    pub segment_bytes: u64,
    pub dedup_window: Duration,
    pub dedup_max_ids: usize,
    /// How long the file log remembers a producer of scheme ids after its last event.
    pub dedup_horizon: Duration,
    pub limits: serve::Limits,
    /// Longest a client may take to send a request body (408 after).
    pub body_timeout: Duration,
    /// Where events go: the file log in the data directory, or a JetStream stream (`--log`).
    pub log: LogBackend,
    /// Serve HTTPS with these PEM files (re-read on SIGHUP); `None` serves plain HTTP.
    pub tls: Option<tls::TlsFiles>,
}

impl ServerOptions {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        ServerOptions {
            listen: DEFAULT_LISTEN,
            data_dir: data_dir.into(),
            token: DEFAULT_TOKEN.into(),
            tokens_file: None,
            rate_limit: None,
            cors_origins: Vec::new(),
            database_url: None,
            body_limit: DEFAULT_BODY_LIMIT,
            batch_body_limit: DEFAULT_BATCH_BODY_LIMIT,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            dedup_window: Duration::from_secs(DEFAULT_DEDUP_WINDOW_SECS),
            dedup_max_ids: DEFAULT_DEDUP_MAX_IDS,
            dedup_horizon: Duration::from_secs(DEFAULT_HORIZON_SECS),
            limits: serve::Limits::default(),
            body_timeout: serve::DEFAULT_REQUEST_TIMEOUT,
            log: LogBackend::File,
            tls: None,
        }
    }
}

pub use crate::error::ConfigError;

pub(crate) struct AppState {
    pub(crate) log: Arc<dyn EventLog>,
    pub(crate) auth: auth::Auth,
    pub(crate) body_limit: usize,
    pub(crate) batch_body_limit: usize,
    pub(crate) body_timeout: Duration,
    store: OnceLock<Arc<dyn Store>>,
    pub(crate) console: console::Console,
    data_dir: PathBuf,
    /// When the store's gauges were last refreshed for `/metrics` (see [`refresh_store_metrics`]).
    store_metrics_at: tokio::sync::Mutex<Option<std::time::Instant>>,
    /// Why the last attempt to open the store failed (the database's own error, without the URL),
    /// while it is not open: what `/readyz` shows.
    store_error: std::sync::Mutex<Option<String>>,
    /// The file log while it is recovered in the background (`None` for the JetStream log).
    recovering: Option<Arc<recovering::RecoveringLog>>,
}

impl AppState {
    /// Why the log cannot take events now (`None`: it can): still being recovered, or the last append
    /// failed.
    fn log_not_ready(&self) -> Option<String> {
        if let Some(why) = self.recovering.as_ref().and_then(|log| log.not_open()) {
            return Some(why);
        }
        (!self.log.ready()).then(|| "the last append failed; see the server's log".to_string())
    }

    /// Why the store is not open yet: the last attempt's error, with its cause.
    pub(crate) fn store_not_open(&self) -> String {
        match &*self.store_error.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(cause) => format!("not connected yet: {cause}"),
            None => "not connected yet".to_string(),
        }
    }

    fn store(&self) -> Result<&Arc<dyn Store>, ApiError> {
        self.store.get().ok_or_else(|| ApiError::Unavailable("database not reachable yet, retry later".into()))
    }
}

pub struct Server {
    listener: TcpListener,
    /// With `--tls-cert`: the certificate in force, and the SIGHUPs that re-read it (subscribed at bind,
    /// so none is missed between bind and run).
    tls: Option<(Arc<tls::Certificates>, tokio::sync::watch::Receiver<u64>)>,
    state: Arc<AppState>,
    log: Arc<dyn EventLog>,
    opts: ServerOptions,
    /// SIGHUPs, watched to re-read the tokens file (subscribed at bind, so none is missed).
    hangups: Option<tokio::sync::watch::Receiver<u64>>,
    /// CORS for the ingest routes, when origins are given.
    cors: Option<tower_http::cors::CorsLayer>,
}

/// How long [`Server::bind`] waits for the file log's recovery before it listens anyway (answering 503
/// to what needs the log until recovery ends): a small log is open by then, and a start-up failure
/// (the directory cannot be written, another server holds it) stops the server before it listens.
const RECOVERY_GRACE: Duration = Duration::from_millis(500);

impl Server {
    pub async fn bind(opts: ServerOptions) -> anyhow::Result<Server> {
        store::check_database_url(opts.database_url.as_deref())?;
        crate::telemetry::register_server_counters();
        let loopback = opts.listen.ip().is_loopback();
        let source = match &opts.tokens_file {
            Some(path) => auth::TokenSource::File(path.clone()),
            None => auth::TokenSource::Single(opts.token.clone()),
        };
        let auth = auth::Auth::new(source, opts.rate_limit, loopback)?;
        let cors = cors_layer(&opts.cors_origins)?;
        if opts.tokens_file.is_some() && opts.token != DEFAULT_TOKEN {
            tracing::warn!("--token (EPS_TOKEN) is ignored: the tokens come from --tokens-file");
        }
        if opts.tokens_file.is_none() && opts.token == DEFAULT_TOKEN {
            tracing::warn!("running with the default token {DEFAULT_TOKEN:?}: set --token or EPS_TOKEN (or --tokens-file) before exposing the server");
        }
        let tls = match &opts.tls {
            Some(files) => Some((tls::Certificates::load(files.clone())?, hangups())),
            None => {
                if !opts.listen.ip().is_loopback() {
                    tracing::warn!(
                        listen = %opts.listen,
                        "serving plain HTTP on a non-loopback address: the token and the revenue cross the network \
                         unencrypted, readable and replayable by anyone on the path; set --tls-cert and --tls-key \
                         (or terminate TLS in a proxy in front)"
                    );
                }
                None
            }
        };
        let mut recovering = None;
        let log: Arc<dyn EventLog> = match &opts.log {
            LogBackend::JetStream(nats) => {
                let log = Arc::new(NatsLog::connect(nats.clone()).await?);
                // The stream's identity is known at once (GET /healthz), not at the first append, and
                // kept current while the server is idle.
                tokio::spawn({
                    let log = Arc::clone(&log);
                    async move { log.keep_checked().await }
                });
                log
            }
            LogBackend::File => {
                let mut log_opts = FileLogOptions::new(opts.data_dir.join(LOG_DIR));
                log_opts.segment_bytes = opts.segment_bytes;
                log_opts.dedup_window = opts.dedup_window;
                log_opts.dedup_max_ids = opts.dedup_max_ids;
                log_opts.dedup_horizon = opts.dedup_horizon;
                let (data_dir, database_url) = (opts.data_dir.clone(), opts.database_url.clone());
                // Recovered in the background: a large log takes seconds, during which the server
                // listens and says so (503 with Retry-After) instead of being silent and unreachable.
                let log = recovering::RecoveringLog::start(log_opts, move || {
                    // Which store this log is applied to: processors and `eps status` check it.
                    if let Some(previous) = store::record_store(&data_dir, database_url.as_deref())? {
                        tracing::warn!(previous = %previous, store = %store::store_name(database_url.as_deref()),
                            "this data directory's server used another store before: processors must now use this one");
                    }
                    Ok(())
                });
                if let Ok(Err(why)) = tokio::time::timeout(RECOVERY_GRACE, log.finished()).await {
                    return Err(anyhow::anyhow!(why));
                }
                recovering = Some(log.clone());
                log
            }
        };
        let listener = match TcpListener::bind(opts.listen).await {
            Ok(listener) => listener,
            Err(e) => {
                log.shutdown().await;
                return Err(anyhow::anyhow!("cannot listen on {}: {e}", opts.listen));
            }
        };
        let state = Arc::new(AppState {
            log: log.clone(),
            auth,
            body_limit: opts.body_limit,
            batch_body_limit: opts.batch_body_limit,
            body_timeout: opts.body_timeout,
            store: OnceLock::new(),
            console: console::Console::new(matches!(opts.log, LogBackend::File).then(|| opts.data_dir.join(LOG_DIR))),
            data_dir: opts.data_dir.clone(),
            store_metrics_at: tokio::sync::Mutex::new(None),
            store_error: std::sync::Mutex::new(None),
            recovering,
        });
        let hangups = state.auth.file().is_some().then(hangups);
        Ok(Server { listener, tls, state, log, opts, hangups, cors })
    }

    /// While the file log is still being recovered: a future that resolves once recovery has ended
    /// (true when the log is open). `None` when the log is open already.
    pub fn log_recovery(&self) -> Option<impl Future<Output = bool> + Send + 'static> {
        let log = self.state.recovering.clone().filter(|log| log.not_open().is_some())?;
        Some(async move { log.finished().await.is_ok() })
    }

    /// `https` with `--tls-cert`, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    pub fn router(&self) -> Router {
        use auth::Scope;
        type Route = axum::routing::MethodRouter<Arc<AppState>>;
        // The token check is a layer on each route that needs one, by scope: `ingest` for the ingest
        // routes, `read` for GET /userEvents and the console's data (`label` names the route in the
        // refusal counters).
        // Browsers may send events (CORS, when origins are configured) to the ingest routes only: the
        // layer is on their method routers, so no other route ever answers a preflight or allows a
        // cross-origin read.
        // The layer answers a preflight (OPTIONS) before the route's OPTIONS handler, which answers
        // any other OPTIONS 405 as before; both without a token (the check is on POST only), and the
        // token's refusals carry the CORS headers (the CORS layer wraps the check).
        let ingest = |label, route: Route| {
            let route = auth::guard(route, &self.state, Scope::Ingest, label);
            match &self.cors {
                Some(cors) => route.options(routes::method_not_allowed).layer(cors.clone()),
                None => route,
            }
        };
        let read = |label, route: Route| auth::guard(route, &self.state, Scope::Read, label);
        Router::new()
            .route("/liveEvent", ingest("/liveEvent", post(routes::live_event)))
            .route("/events", ingest("/events", post(routes::post_events)))
            .route("/userEvents/{user_id}", read("/userEvents/{user_id}", get(routes::user_events)))
            .route("/healthz", get(routes::healthz))
            .route("/readyz", get(routes::readyz))
            .route("/metrics", get(routes::metrics))
            .route("/openapi.json", get(openapi::openapi_json))
            .route("/", get(console::index))
            .route("/console/console.css", get(console::css))
            .route("/console/console.js", get(console::js))
            .route("/console/summary", read("/console/summary", get(console::summary)))
            .route("/console/stream", read("/console/stream", get(console::stream)))
            .fallback(routes::not_found)
            .method_not_allowed_fallback(routes::method_not_allowed)
            .layer(DefaultBodyLimit::max(self.opts.body_limit))
            .layer(axum::middleware::from_fn(crate::telemetry::track_requests))
            .with_state(self.state.clone())
    }

    /// Serves until `shutdown` resolves; returns once every accepted request is answered and synced.
    ///
    /// A store refused as misconfigured (a `users_revenue` that would round, see [`store`]) stops the
    /// server the same graceful way, and `run` returns that configuration error (exit code 2): a
    /// `GET /userEvents` answering 503 forever would hide it.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let (refused_tx, refused_rx) = oneshot::channel();
        // A recovery that fails after the server began to listen stops it the same graceful way.
        let recovering = self.state.recovering.clone();
        let recovery_failed = async move {
            match recovering {
                Some(log) => match log.finished().await {
                    Err(why) => why,
                    Ok(()) => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        };
        let store_task = tokio::spawn(connect_store(self.state.clone(), self.opts.clone(), refused_tx));
        let sampler_task = tokio::spawn(console::run_sampler(self.state.clone()));
        let tokens_task = self.hangups.clone().map(|hangups| tokio::spawn(reload_tokens(self.state.clone(), hangups)));
        let router = self.router();
        if self.state.recovering.as_ref().is_some_and(|log| log.not_open().is_some()) {
            tracing::info!(addr = %self.local_addr(), data_dir = %self.opts.data_dir.display(),
                "eps server listening while the log is recovered: 503 to what needs the log until it is open");
        } else {
            tracing::info!(addr = %self.local_addr(), data_dir = %self.opts.data_dir.display(), "eps server listening");
        }
        // At shutdown the consoles' event streams end first, so the drain does not wait for them.
        let state = self.state.clone();
        let refused = Arc::new(std::sync::Mutex::new(None));
        let refusal = refused.clone();
        let shutdown = async move {
            tokio::select! {
                () = shutdown => {}
                Ok(e) = refused_rx => {
                    tracing::error!("the database is misconfigured; stopping the server");
                    *refusal.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                }
                why = recovery_failed => {
                    tracing::error!(error = %why, "the log could not be opened; stopping the server");
                    *refusal.lock().unwrap_or_else(|p| p.into_inner()) = Some(anyhow::anyhow!(why));
                }
            }
            state.console.close();
        };
        let (certificates, reload_task) = match self.tls {
            Some((certificates, hangups)) => (Some(certificates.clone()), Some(certificates.reload_on(hangups))),
            None => (None, None),
        };
        serve::serve(self.listener, router, self.opts.limits.clone(), certificates, shutdown).await?;
        if let Some(task) = reload_task {
            task.abort();
        }
        store_task.abort();
        sampler_task.abort();
        if let Some(task) = tokens_task {
            task.abort();
        }
        self.log.shutdown().await;
        tracing::info!("eps server stopped; every acknowledged event is synced");
        let refused = refused.lock().unwrap_or_else(|p| p.into_inner()).take();
        refused.map_or(Ok(()), Err)
    }
}

/// The CORS layer of the ingest routes: the origins given (or any, for "*"), POST with the headers
/// eps reads, no credentials (the token is a header, never a cookie), Retry-After readable by the
/// page. `None` without origins: no CORS header at all.
fn cors_layer(origins: &[String]) -> Result<Option<tower_http::cors::CorsLayer>, ConfigError> {
    use axum::http::{header, HeaderValue, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let origins: Vec<&str> = origins.iter().map(|o| o.trim()).filter(|o| !o.is_empty()).collect();
    if origins.is_empty() {
        return Ok(None);
    }
    let allow = if origins.contains(&"*") {
        AllowOrigin::any()
    } else {
        let mut list = Vec::new();
        for origin in origins {
            match HeaderValue::from_str(origin.trim_end_matches('/')) {
                Ok(value) if valid_origin(origin) => list.push(value),
                _ => {
                    return Err(ConfigError(format!(
                    "invalid --cors-origin {origin:?}: give scheme://host[:port], e.g. https://shop.example, or \"*\""
                )))
                }
            }
        }
        AllowOrigin::list(list)
    };
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::POST])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, header::CONTENT_ENCODING])
            .expose_headers([header::RETRY_AFTER])
            .max_age(Duration::from_secs(600)),
    ))
}

/// `scheme://host[:port]`: what a browser sends as `Origin` (no path, no trailing slash).
fn valid_origin(origin: &str) -> bool {
    let origin = origin.trim_end_matches('/');
    let Some((scheme, rest)) = origin.split_once("://") else { return false };
    matches!(scheme, "http" | "https") && !rest.is_empty() && !rest.contains(['/', ' ', '?', '#'])
}

/// Re-reads the tokens file on each SIGHUP. A file that cannot be read or is not valid leaves the
/// tokens in force as they were, and the reason is logged (never a token).
async fn reload_tokens(state: Arc<AppState>, mut hangups: tokio::sync::watch::Receiver<u64>) {
    while hangups.changed().await.is_ok() {
        let path = state.auth.file().map(|p| p.display().to_string()).unwrap_or_default();
        match state.auth.reload() {
            Ok(count) => {
                tracing::info!(file = %path, tokens = count, "tokens file re-read; the new tokens are in force")
            }
            Err(e) => tracing::error!(error = %e, "tokens file not re-read; the tokens in force are unchanged"),
        }
    }
}

/// Opens the store, retrying until it works: the server takes events whether the database is up or not.
/// A configuration error is not retried: it goes to `refused`, which stops the server.
async fn connect_store(state: Arc<AppState>, opts: ServerOptions, refused: oneshot::Sender<anyhow::Error>) {
    let mut delays = crate::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(10)).delays();
    loop {
        match store::open(opts.database_url.as_deref(), &opts.data_dir).await {
            Ok(store) => {
                tracing::info!(backend = store.backend(), "database connected");
                let _ = state.store.set(store);
                return;
            }
            Err(e) if e.downcast_ref::<ConfigError>().is_some() => {
                let _ = refused.send(e);
                return;
            }
            Err(e) => {
                let cause = format!("{e:#}");
                // A permanent error (unknown database or role, refused password) is retried too, since
                // the server takes events without the database; but it says so, with the cause.
                let what = if store::is_transient(&e) {
                    "database not reachable; GET /userEvents answers 503 meanwhile"
                } else {
                    "database refused the connection (fix the cause; retrying meanwhile); GET /userEvents answers 503 meanwhile"
                };
                let delay = delays.next_delay();
                tracing::warn!(error = %cause, retry_in_secs = delay.as_secs_f64(), "{what}");
                // /readyz is unauthenticated: it shows the database's own error, not the URL around it.
                let root = e.chain().last().map_or_else(String::new, ToString::to_string);
                *state.store_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(root);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Sets the `eps_store_*` gauges of the server's `/metrics`: the processors' progress as the store
/// records it (checkpoint, lag, age of the oldest unapplied event, time since the last commit), so one
/// scrape of the server shows whether processing keeps up, whatever runs the processors.
///
/// Bounded cost: done on a scrape (nothing when nobody scrapes), at most once a second (a scrape
/// meanwhile renders the previous values), within 2 s; the lag is read as the console reads it, the
/// segment sizes plus at most 1 MiB of lines after the checkpoint, never a scan of the whole log.
/// With JetStream only the store-wide figures (last commit, events applied) are set. The data
/// directory's filesystem space is refreshed with them.
pub(crate) async fn refresh_store_metrics(state: &AppState) {
    let Ok(mut last) = state.store_metrics_at.try_lock() else { return };
    if last.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
        return;
    }
    *last = Some(std::time::Instant::now());
    if let Ok((available, size)) = crate::fsutil::disk_space(&state.data_dir) {
        metrics::gauge!("eps_data_dir_available_bytes").set(available as f64);
        metrics::gauge!("eps_data_dir_size_bytes").set(size as f64);
    }
    let Some(store) = state.store.get() else { return };
    let refresh = async {
        if let Ok(Some(age)) = store.last_commit_age().await {
            metrics::gauge!("eps_store_last_commit_age_seconds").set(age);
        }
        if let Ok(applied) = store.events_applied().await {
            metrics::gauge!("eps_store_events_applied").set(applied as f64);
        }
        let Some(dir) = state.console.log_dir.clone() else { return };
        let Ok(progress) = store.progress(crate::store::FILE_STREAM).await else { return };
        metrics::gauge!("eps_store_checkpoint_bytes").set(progress.position as f64);
        if let Ok(Ok(view)) = tokio::task::spawn_blocking(move || console::file_log_view(&dir, progress.position)).await
        {
            metrics::gauge!("eps_store_lag_bytes").set(view.lag_bytes as f64);
            metrics::gauge!("eps_store_lag_events").set(view.lag_events as f64);
            let lag_seconds = view.oldest_unapplied.map_or(0.0, |ts| {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                (now.as_millis() as u64).saturating_sub(ts) as f64 / 1000.0
            });
            metrics::gauge!("eps_store_lag_seconds").set(lag_seconds);
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), refresh).await;
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not when the future
/// is first polled, so a signal that arrives during start-up is not lost (nor fatal).
///
/// SIGHUP is ignored (eps has no configuration to reload): its default action would kill the process
/// without the graceful drain, so a handler is installed here too, which logs each one and does nothing.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate()).ok();
    let int = signal(SignalKind::interrupt()).ok();
    ignore_hangup();
    async move {
        let wait = |s: Option<tokio::signal::unix::Signal>| async move {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = wait(term) => {},
            _ = wait(int) => {},
        }
        tracing::info!("shutdown requested: finishing what is in flight");
    }
}

/// Every SIGHUP the process received so far, as a count that subscribers watch ([`hangups`]): the
/// parts that re-read a file on SIGHUP (certificates, tokens) wait for it to change.
static HANGUPS: OnceLock<tokio::sync::watch::Sender<u64>> = OnceLock::new();

fn hangup_counter() -> &'static tokio::sync::watch::Sender<u64> {
    HANGUPS.get_or_init(|| tokio::sync::watch::channel(0).0)
}

/// A receiver that sees the SIGHUP count change; subscribe before [`ignore_hangup`]'s handler may fire.
pub fn hangups() -> tokio::sync::watch::Receiver<u64> {
    hangup_counter().subscribe()
}

/// Replaces SIGHUP's default action (terminate, no drain) with a log line and a tick of [`hangups`], so
/// the parts that reload something can. Idempotent enough: each call adds a listener; the binary calls
/// it once per command.
pub fn ignore_hangup() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    let watchers = hangup_counter().receiver_count();
                    hangup_counter().send_modify(|n| *n += 1);
                    if watchers == 0 {
                        tracing::info!(
                            "SIGHUP received and ignored (eps reloads no configuration; SIGTERM or SIGINT stop it gracefully)"
                        );
                    } else {
                        tracing::info!("SIGHUP received: re-reading the files eps reloads");
                    }
                }
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot install the SIGHUP handler; a SIGHUP would stop eps without its drain")
        }
    }
}
