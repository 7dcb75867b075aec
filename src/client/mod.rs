//! `eps client`: sends a JSON Lines file of events to one or more servers' `POST /events` (or
//! `POST /liveEvent`, one event per request).
//!
//! This module owns the sending side of ingest: streaming the input file line by line (memory stays
//! bounded whatever the file size), validating each line with the server's own rules
//! ([`Event::parse_request`]), giving each event its idempotency id, sending with at most
//! `concurrency` requests in flight over one keep-alive [`reqwest::Client`], retrying what may be
//! retried, showing progress, and counting the outcome in a [`ClientSummary`]. Printing the summary
//! and choosing the exit code is the caller's job.
//!
//! # Idempotency (the client's half of exactly-once)
//!
//! Every event is sent with an `id`. A line that carries its own `id` keeps it; otherwise the id is
//! `<producer>-<line number>`, where the producer is the file's fingerprint (or, after `--new-run`,
//! a random number kept in the checkpoint; see [`state`]) and the line number is the 1-based physical
//! line of the file (blank lines count). Every retry of an event carries the same id and the same body,
//! and so do a resumed run and a re-send of the same file, so the server, which de-duplicates ids
//! within a window and answers a repeat with `200 {"duplicate":true}`, stores the event once.
//!
//! # Checkpoint and stopping
//!
//! With a state directory, the run starts after the file's checkpoint and moves it as requests are
//! answered ([`state::Frontier`]: the contiguous prefix of done lines), writing it every second and
//! at the end. The run stops early on the `stop` future of [`run_until`] (the binary's SIGINT and
//! SIGTERM) or when every server has failed for `give_up_after`: no new request, no more retries, the
//! requests in flight get the request timeout (plus a second) and are then abandoned; their lines stay
//! after the checkpoint, for the next run.
//!
//! The body is the validated event re-serialised as `{"userId":..,"name":..,"value":..,"id":..}`;
//! the value is the decimal's own text written as a raw JSON number (`0.1` stays `0.1`, `1e3` becomes
//! `1000`), never passed through floating point.
//!
//! # Responses and retries
//!
//! - 2xx: accepted (counted as a duplicate too when the JSON body says `"duplicate":true`).
//! - 408, 429, 5xx, connection errors and timeouts (the per-request timeout covers connecting,
//!   sending and reading the answer): retried, up to `max_attempts` attempts in all, then `failed`
//!   with the last error. Between attempts the client sleeps a "full jitter" exponential backoff —
//!   uniform in `[0, min(5 s, 50 ms * 2^(attempt-1))]` — unless the answer has a `Retry-After`
//!   header in whole seconds, which is obeyed as is, capped at 30 s.
//! - Any other status (other 4xx, and 3xx, as redirects are not followed): `rejected`, never retried,
//!   reported as `line N: HTTP <status>: <the body's "error" field>`.
//!
//! # Several servers: spreading and failover
//!
//! With several URLs, each new request goes to the next server, round-robin, among those currently
//! considered up (`ServerPool`). A request that fails with a retryable error is retried on the next
//! server after the one that failed, at once (no backoff sleep while another server is up), and the
//! failing server is marked down for a backoff of its own (500 ms, doubling to 5 s, reset by its next
//! success). A down server gets no new request until its backoff expires; then one request probes it,
//! and its answer marks it up again or doubles its backoff. When every server is down the requests
//! still go round-robin, with the sleeps above between attempts, exactly as with one server.
//! A retry on another server carries the same bytes (the same ids): servers sharing one de-duplicating
//! log (JetStream) store it once; servers with logs of their own store it again only if the first one
//! stored it without its answer arriving. The summary counts the events each server accepted.
//!
//! Invalid lines are reported as `line N: <error>` (the first ten, then counted) and not sent.
//! Rejections and failures that repeat the same message (a wrong token rejects every event alike) are
//! reported a few times each, then summarised, so a bad run does not print ten million lines.

pub mod state;

mod http;
mod input;
mod pool;
mod progress;
mod reply;
mod resume;
mod run;
mod send;
mod stop;
mod summary;
#[cfg(test)]
mod tests;

pub use stop::Stopped;
pub use summary::ClientSummary;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pool::Backoff;
use run::run_with;

/// The input file by default.
pub const DEFAULT_FILE: &str = "events.jsonl";
/// The server by default: `eps server`'s default address.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8000";
/// Events per request by default.
pub const DEFAULT_BATCH: usize = 1000;
/// Attempts per event by default, the first included.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;
/// Per-request timeout by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// A batch is sent once its body reaches this size, even with fewer events (well under the server's
/// default limit of 16 MiB for `POST /events`).
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// Requests in flight by default: many single events share each of the server's syncs, while a few
/// batches in flight already keep both the network and the server's writer busy.
pub fn default_concurrency(batch: usize) -> usize {
    if batch <= 1 {
        64
    } else {
        8
    }
}

/// How long every server may fail before the run gives up, by default.
pub const DEFAULT_GIVE_UP_AFTER: Duration = Duration::from_secs(30);
/// Longest input line the client buffers; a longer line is reported invalid without being read whole.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;
/// Longest `Retry-After` the client obeys.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// What `eps client` does. See the module documentation for the behaviour.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// JSON Lines input (default `events.jsonl`).
    pub file: PathBuf,
    /// Base URLs of the servers, e.g. `http://127.0.0.1:8000` (no trailing path): at least one.
    /// Requests are spread round-robin over them, with failover (see the module documentation).
    pub urls: Vec<String>,
    /// Sent as `Authorization: <token>` (bare, like the seed's client); no header when empty.
    pub token: String,
    /// Events per request: 1 sends each event to `POST /liveEvent` (what any seed-compatible server
    /// takes), more sends JSON Lines batches to `POST /events` (default 1000; 0 counts as 1).
    pub batch: usize,
    /// Requests in flight at most (default 64 for single events, 8 for batches; 0 counts as 1).
    pub concurrency: usize,
    /// Attempts per event, the first included (default 10; 0 counts as 1).
    pub max_attempts: u32,
    /// Per request: connecting, sending and reading the answer (default 10 s).
    pub timeout: Duration,
    /// How progress is shown on stderr.
    pub progress: Progress,
    /// Where the checkpoint of each input file is kept; `None` keeps none (every run reads the file
    /// from its start; the ids are the same all the same).
    pub state_dir: Option<PathBuf>,
    /// Send from the first line whatever the checkpoint says (same ids).
    pub from_start: bool,
    /// Send the file as new events: a new random producer for the ids, recorded in the checkpoint.
    pub new_run: bool,
    /// Stop once every server has failed every request for this long (`None`: never).
    pub give_up_after: Option<Duration>,
    /// Write every invalid, refused or undelivered line here.
    pub failed_out: Option<PathBuf>,
    /// Trust only this CA (PEM file) for https URLs; `None`: the platform's roots.
    pub ca_cert: Option<PathBuf>,
    /// Send request bodies gzip-compressed (`Content-Encoding: gzip`).
    pub gzip: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            file: PathBuf::from(DEFAULT_FILE),
            urls: vec![DEFAULT_URL.to_owned()],
            token: String::new(),
            batch: DEFAULT_BATCH,
            concurrency: default_concurrency(DEFAULT_BATCH),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            timeout: DEFAULT_TIMEOUT,
            progress: Progress::Auto,
            state_dir: None,
            from_start: false,
            new_run: false,
            give_up_after: Some(DEFAULT_GIVE_UP_AFTER),
            failed_out: None,
            ca_cert: None,
            gzip: false,
        }
    }
}

/// How progress is shown on stderr. Errors are printed in every mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Progress {
    /// A bar if stderr is a terminal, else Plain.
    #[default]
    Auto,
    /// An indicatif bar (by bytes of the file read, with ETA; a spinner when the size is unknown).
    Bar,
    /// One line of counts every ~2 s.
    Plain,
    /// Nothing but errors.
    Quiet,
}

/// Sends the events of `opts.file` to the servers of `opts.urls`; see the module documentation.
///
/// Errors only for what stops the whole run: the file cannot be opened or read, the URL or token is
/// unusable. Per-event problems are counted in the summary and reported on stderr.
pub async fn run(opts: ClientOptions) -> anyhow::Result<ClientSummary> {
    run_until(opts, std::future::pending()).await
}

/// [`run`], stopped early when `stop` completes (the binary passes SIGINT and SIGTERM): no new
/// request is sent, the requests in flight get up to the request timeout (plus a second) to be
/// answered, the checkpoint is saved, and the summary says why it stopped.
pub async fn run_until(
    opts: ClientOptions,
    stop: impl Future<Output = Stopped> + Send + 'static,
) -> anyhow::Result<ClientSummary> {
    run_with(opts, Tuning::default(), stop).await
}

/// The command line to run to continue a stopped run: the same arguments, less `--from-start` and
/// `--new-run` (the checkpoint holds the new run's ids), quoted for a POSIX shell.
pub fn resume_command(args: &[std::ffi::OsString]) -> String {
    let once = |a: &str| {
        ["--from-start", "--new-run"]
            .iter()
            .any(|flag| a == *flag || a.strip_prefix(flag).is_some_and(|r| r.starts_with('=')))
    };
    args.iter().map(|a| a.to_string_lossy()).filter(|a| !once(a)).map(|a| shell_quote(&a)).collect::<Vec<_>>().join(" ")
}

fn shell_quote(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./,:=@%+".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}

/// Internal knobs: the backoffs (tests shorten them) and where error reports go (tests capture them).
#[derive(Debug, Clone)]
pub(crate) struct Tuning {
    /// Between attempts of a request when no other server is up (full jitter).
    pub backoff: Backoff,
    /// How long a failing server is left out: `base` after its first failure, doubling up to `cap`.
    pub server_down: Backoff,
    /// When set, reports are appended here instead of printed.
    pub capture: Option<Arc<Mutex<Vec<String>>>>,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            backoff: REQUEST_BACKOFF,
            server_down: Backoff { base: SERVER_DOWN_BASE, cap: SERVER_DOWN_CAP },
            capture: None,
        }
    }
}

/// Between attempts of a request when no other server is up: 50 ms doubling to 5 s, full jitter.
const REQUEST_BACKOFF: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));

/// How long a server that failed is left out at first.
pub const SERVER_DOWN_BASE: Duration = Duration::from_millis(500);
/// The longest a failing server is left out between probes.
pub const SERVER_DOWN_CAP: Duration = Duration::from_secs(5);
