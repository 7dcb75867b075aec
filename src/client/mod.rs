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

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng as _;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt as _, AsyncSeekExt as _, BufReader};
use tokio::task::{JoinError, JoinSet};

use crate::event::{Event, EventKind};
use state::{Checkpoint, Frontier, Mark, PrefixHash, FINGERPRINT_BYTES};

/// Events per request by default.
pub const DEFAULT_BATCH: usize = 1000;
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
/// How many invalid lines are shown before they are only counted.
const INVALID_SHOWN: u64 = 10;

/// Longest input line the client buffers; a longer line is reported invalid without being read whole.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;
/// Longest `Retry-After` the client obeys.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// How many times each distinct rejection or failure message is printed before it is only counted.
const REPORTS_PER_MESSAGE: u64 = 5;
/// How many distinct messages are tracked for that purpose (beyond, everything is printed).
const MAX_TRACKED_MESSAGES: usize = 1000;
/// Most bytes of an answer's body the client reads.
const MAX_REPLY_BYTES: usize = 64 * 1024;
/// How often Plain progress prints a line.
const PLAIN_EVERY: Duration = Duration::from_secs(2);
/// How often the progress bar's counts are refreshed.
const BAR_EVERY: Duration = Duration::from_millis(200);

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
            file: PathBuf::from("events.jsonl"),
            urls: vec!["http://127.0.0.1:8000".to_owned()],
            token: String::new(),
            batch: DEFAULT_BATCH,
            concurrency: default_concurrency(DEFAULT_BATCH),
            max_attempts: 10,
            timeout: Duration::from_secs(10),
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

/// What a run did. `sent = accepted + rejected + failed` and `lines = sent + invalid` once it ends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientSummary {
    /// Non-blank lines read.
    pub lines: u64,
    /// Valid events handed to the network.
    pub sent: u64,
    /// Events the server answered with 2xx (duplicates included).
    pub accepted: u64,
    /// Of the accepted, those the server already had (`"duplicate":true`).
    pub duplicates: u64,
    /// Events the server refused (4xx other than 408/429); not retried.
    pub rejected: u64,
    /// Lines that are not valid events; not sent.
    pub invalid: u64,
    /// Events still not accepted after `max_attempts` attempts.
    pub failed: u64,
    /// Events whose requests were not answered when the run stopped (a signal, or giving up); the
    /// next run sends them again.
    pub interrupted: u64,
    pub elapsed: Duration,
    /// With more than one server: each server's URL (as given, less a trailing `/`) and the events it
    /// accepted, in the order given. Empty with a single server.
    pub per_server: Vec<(String, u64)>,
    /// Why the run stopped before the end of the file, if it did.
    pub stopped: Option<Stopped>,
    /// The run continued a checkpoint: after this line.
    pub resumed_after: Option<u64>,
    /// The checkpoint at the end: every line up to this one is done; where it is kept.
    pub checkpoint: Option<(u64, PathBuf)>,
    /// Lines written to `--failed-out`.
    pub failed_out: u64,
    /// Writing `--failed-out` failed.
    pub failed_out_error: bool,
}

impl ClientSummary {
    /// Whether every line was a valid event the server accepted (and the run went to the end).
    pub fn ok(&self) -> bool {
        self.rejected == 0
            && self.invalid == 0
            && self.failed == 0
            && self.interrupted == 0
            && self.stopped.is_none()
            && !self.failed_out_error
    }

    /// `per server: http://a:8000 → 600, http://b:8000 → 400` with more than one server (printed
    /// after the summary line, on a line of its own), `None` with one.
    pub fn per_server_line(&self) -> Option<String> {
        if self.per_server.len() < 2 {
            return None;
        }
        let each: Vec<String> = self.per_server.iter().map(|(url, n)| format!("{url} → {n}")).collect();
        Some(format!("per server: {}", each.join(", ")))
    }

    /// Events sent per second of the run.
    pub fn events_per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.sent as f64 / secs
        } else {
            0.0
        }
    }
}

impl fmt::Display for ClientSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sent {}, accepted {} ({} duplicates), rejected {}, invalid {}, failed {} in {:.2}s ({:.0} events/s)",
            self.sent,
            self.accepted,
            self.duplicates,
            self.rejected,
            self.invalid,
            self.failed,
            self.elapsed.as_secs_f64(),
            self.events_per_sec()
        )?;
        if self.interrupted > 0 {
            write!(f, "; {} unanswered when the run stopped", self.interrupted)?;
        }
        Ok(())
    }
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
            backoff: Backoff::default(),
            server_down: Backoff { base: SERVER_DOWN_BASE, cap: SERVER_DOWN_CAP },
            capture: None,
        }
    }
}

/// How long a server that failed is left out at first.
pub const SERVER_DOWN_BASE: Duration = Duration::from_millis(500);
/// The longest a failing server is left out between probes.
pub const SERVER_DOWN_CAP: Duration = Duration::from_secs(5);

/// Full-jitter exponential backoff.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { base: Duration::from_millis(50), cap: Duration::from_secs(5) }
    }
}

impl Backoff {
    /// The longest sleep after the `attempt`-th (1-based) failed attempt.
    fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A random sleep in `[0, ceiling(attempt)]`.
    fn delay(&self, attempt: u32) -> Duration {
        let ceiling = u64::try_from(self.ceiling(attempt).as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(rand::rng().random_range(0..=ceiling))
    }
}

pub(crate) async fn run_with(
    opts: ClientOptions,
    tuning: Tuning,
    stop_signal: impl Future<Output = Stopped> + Send + 'static,
) -> anyhow::Result<ClientSummary> {
    let started = Instant::now();
    let stop = Arc::new(Stop::default());
    let sender = Arc::new(Sender::new(&opts, &tuning, Arc::clone(&stop))?);
    // From here a signal, or every server failing for `give_up_after`, stops the run.
    let watcher = tokio::spawn(watch_for_stop(stop_signal, Arc::clone(&stop), Arc::clone(&sender), opts.give_up_after));
    let mut file = tokio::fs::File::open(&opts.file)
        .await
        .with_context(|| format!("cannot open the input file {}", opts.file.display()))?;
    let (size, regular) = match file.metadata().await {
        Ok(m) if m.is_file() => (m.len(), true),
        _ => (0, false),
    };

    // The file's first bytes: its fingerprint, and where its checkpoint is found.
    let mut head = Vec::with_capacity(FINGERPRINT_BYTES.min(size as usize).max(4096));
    (&mut file)
        .take(FINGERPRINT_BYTES as u64)
        .read_to_end(&mut head)
        .await
        .with_context(|| format!("reading {}", opts.file.display()))?;
    let fp = state::fingerprint(&head);
    let state_dir = opts.state_dir.clone().filter(|_| regular).map(|dir| state::StateDir { dir });
    let found = match &state_dir {
        Some(dir) => {
            let dir = dir.clone();
            let head = head.clone();
            tokio::task::spawn_blocking(move || dir.find(&head)).await?.context("reading the client's state")?
        }
        None => None,
    };
    let producer = if opts.new_run {
        state::hex64(rand::random::<u64>())
    } else {
        found.as_ref().map_or_else(|| state::hex64(fp), |f| f.checkpoint.producer.clone())
    };
    // Which logs the servers append to: a checkpoint holds for the logs that acknowledged its lines.
    let logs = match &state_dir {
        Some(_) => sender.logs().await,
        None => Logs::NotReported,
    };
    if let Some(found) = found.as_ref().filter(|f| !opts.from_start && !opts.new_run && f.checkpoint.line > 0) {
        if logs == Logs::Unanswered && !stop.is_set() {
            let urls = sender.servers.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ");
            anyhow::bail!(
                "no server said which log it appends to ({urls}: GET /healthz failed {} times each), so the \
                 checkpoint of {} (line {}, {}) cannot be checked against it; nothing was sent and the checkpoint \
                 is kept: run again once a server answers (or with --from-start to send the file from its first \
                 line with the same ids)",
                sender.max_attempts,
                opts.file.display(),
                found.checkpoint.line,
                found.path.display()
            );
        }
    }
    let mut start = Mark::default();
    let mut resumed_after = None;
    let other_log =
        found.as_ref().filter(|f| !opts.from_start && !opts.new_run && f.checkpoint.line > 0).and_then(|found| {
            let Logs::Known(now) = &logs else { return None };
            let recorded = &found.checkpoint.logs;
            (!now.iter().all(|log| recorded.contains(log))).then(|| (recorded.clone(), now.clone()))
        });
    if let Some(found) = found.as_ref().filter(|_| !opts.from_start && !opts.new_run && other_log.is_none()) {
        let cp = &found.checkpoint;
        let (path, offset) = (opts.file.clone(), cp.offset);
        let prefix = tokio::task::spawn_blocking(move || state::hash_prefix(&path, offset))
            .await?
            .with_context(|| format!("reading {}", opts.file.display()))?;
        match prefix {
            Some(hash) if hash.hex() == cp.prefix_hash => {
                start = Mark { line: cp.line, offset: cp.offset, hash };
                resumed_after = (cp.line > 0).then_some(cp.line);
            }
            _ => anyhow::bail!(
                "{} has changed since it was last sent: it no longer begins with the {} bytes (lines 1 to {}) \
                 acknowledged then (checkpoint {}). Run again with --from-start to send it from its first line \
                 with the same ids (what the server already has is recognised as duplicates), or with --new-run \
                 to send every line as a new event",
                opts.file.display(),
                cp.offset,
                cp.line,
                found.path.display()
            ),
        }
    }
    let checkpoint_path = match (&found, &state_dir) {
        (Some(found), _) => Some(found.path.clone()),
        (None, Some(dir)) => Some(dir.path_for(fp, head.len() as u64)),
        (None, None) => None,
    };
    let mut saver = checkpoint_path.map(|path| Saver {
        template: Checkpoint {
            version: 1,
            file: std::path::absolute(&opts.file).unwrap_or_else(|_| opts.file.clone()).display().to_string(),
            fingerprint: found.as_ref().map_or_else(|| state::hex64(fp), |f| f.checkpoint.fingerprint.clone()),
            fingerprint_bytes: found.as_ref().map_or(head.len() as u64, |f| f.checkpoint.fingerprint_bytes),
            producer: producer.clone(),
            line: 0,
            offset: 0,
            prefix_hash: String::new(),
            updated_ms: 0,
            logs: match &logs {
                Logs::Known(now) => {
                    // A resumed run adds to the logs its earlier runs reached (one server of a pool
                    // may be down now); a run from the start counts only what it reaches.
                    let mut all = now.clone();
                    if resumed_after.is_some() {
                        all.extend(found.iter().flat_map(|f| f.checkpoint.logs.iter().cloned()));
                    }
                    all.sort();
                    all.dedup();
                    all
                }
                // Kept (the same checkpoint, resumed), or none known: a later run cannot check this
                // one and sends the file from its first line.
                Logs::NotReported | Logs::Unanswered => match (&found, resumed_after) {
                    (Some(found), Some(_)) => found.checkpoint.logs.clone(),
                    _ => Vec::new(),
                },
            },
        },
        saved: found
            .as_ref()
            .filter(|f| f.checkpoint.producer == producer)
            .map(|f| (f.checkpoint.line, f.checkpoint.offset)),
        last: Instant::now(),
        path,
        error_shown: false,
    });

    // Reading starts after the checkpoint (a regular file), or at the start, the head first.
    let source: Box<dyn tokio::io::AsyncRead + Unpin + Send> = if regular {
        file.seek(std::io::SeekFrom::Start(start.offset))
            .await
            .with_context(|| format!("reading {}", opts.file.display()))?;
        Box::new(file)
    } else {
        Box::new(std::io::Cursor::new(head).chain(file))
    };
    let mut reader = BufReader::with_capacity(256 * 1024, source);

    let urls = sender.servers.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ");
    tracing::info!(producer, file = %opts.file.display(), urls, resumed_after, "client run starts");

    let counters = Arc::new(Counters::new(sender.servers.len()));
    counters.bytes.store(start.offset, Ordering::Relaxed);
    let console = Console::start(opts.progress, size, Arc::clone(&counters), started, tuning.capture);
    if let (Some((recorded, now)), Some(found)) = (&other_log, &found) {
        let recorded = if recorded.is_empty() { "no log recorded".to_string() } else { recorded.join(", ") };
        console.report(&format!(
            "eps client: the checkpoint of {} (line {}, {}) was acknowledged by {recorded}, but the servers now append \
             to {}: sending the file from its first line with the same ids (what that log already has is recognised \
             as duplicates)",
            opts.file.display(),
            found.checkpoint.line,
            found.path.display(),
            now.join(", ")
        ));
    }
    if let (Some(line), Some(saver)) = (resumed_after, &saver) {
        console.report(&format!(
            "eps client: resuming {} after line {line}, the last acknowledged (checkpoint {}); --from-start sends it \
             from its first line again",
            opts.file.display(),
            saver.path.display()
        ));
    }
    let failed_out = match &opts.failed_out {
        Some(path) => Some(FailedOut::open(path, resumed_after.is_some())?),
        None => None,
    };
    let mut books = Books {
        counters: Arc::clone(&counters),
        reports: Reports::default(),
        console,
        frontier: Frontier::new(start.clone()),
        failed_out,
        producer: producer.clone(),
    };
    let concurrency = opts.concurrency.max(1);

    let batch_size = opts.batch.max(1);
    let keep_originals = books.failed_out.is_some();
    let mut in_flight: JoinSet<(Request, Outcome)> = JoinSet::new();
    let mut pending = Pending::default();
    let mut buf = Vec::with_capacity(4096);
    let Mark { line: mut line_no, mut offset, mut hash } = start;
    let read_result: anyhow::Result<()> = loop {
        while let Some(done) = in_flight.try_join_next() {
            books.tally(done);
        }
        if let Some(saver) = saver.as_mut() {
            saver.maybe_save(&books.frontier, &books.console, false).await;
        }
        if stop.is_set() {
            break Ok(());
        }
        let read = tokio::select! {
            biased;
            () = stop.wait() => break Ok(()),
            read = read_line(&mut reader, &mut buf, MAX_LINE_BYTES, &mut hash) => read,
        };
        let read = match read {
            Ok(Some(read)) => read,
            Ok(None) => break Ok(()),
            Err(e) => {
                break Err(
                    anyhow::Error::new(e).context(format!("reading {} (after line {line_no})", opts.file.display()))
                )
            }
        };
        line_no += 1;
        offset += read.bytes;
        counters.bytes.fetch_add(read.bytes, Ordering::Relaxed);
        let mut line = trim_line(&buf);
        if line_no == 1 {
            line = line.strip_prefix(b"\xEF\xBB\xBF".as_slice()).unwrap_or(line);
        }
        if !read.too_long && line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        counters.lines.fetch_add(1, Ordering::Relaxed);
        let prepared = if read.too_long {
            Err(format!("line is longer than {MAX_LINE_BYTES} bytes"))
        } else if batch_size == 1 {
            prepare(line, line_no, &producer).map(|(body, own_id)| {
                pending.body.extend_from_slice(&body);
                own_id
            })
        } else {
            prepare_line(line, line_no, &producer, &mut pending.body)
        };
        let own_id = match prepared {
            Ok(own_id) => own_id,
            Err(message) => {
                counters.invalid.fetch_add(1, Ordering::Relaxed);
                books.reports.invalid(&books.console, line_no, &message);
                if let Some(out) = books.failed_out.as_mut() {
                    if read.too_long {
                        books.console.report(&format!("line {line_no} is too long to be written to --failed-out"));
                    } else {
                        out.write(&buf);
                    }
                }
                continue;
            }
        };
        pending.lines.push(line_no);
        if keep_originals {
            pending.originals.push((trim_line(&buf).to_vec(), own_id));
        }
        if pending.lines.len() >= batch_size || pending.body.len() >= MAX_BATCH_BYTES {
            if !wait_for_room(&mut in_flight, concurrency, &mut books, &stop).await {
                break Ok(());
            }
            let seq = books.frontier.issue(Mark { line: line_no, offset, hash: hash.clone() });
            pending.send(seq, &sender, &counters, &mut in_flight);
        }
    };
    if read_result.is_ok() && !stop.is_set() {
        if !pending.lines.is_empty() && wait_for_room(&mut in_flight, concurrency, &mut books, &stop).await {
            let seq = books.frontier.issue(Mark { line: line_no, offset, hash: hash.clone() });
            pending.send(seq, &sender, &counters, &mut in_flight);
        }
        if !stop.is_set() {
            // The end of the file: blank or invalid lines after the last request are done too.
            let seq = books.frontier.issue(Mark { line: line_no, offset, hash: hash.clone() });
            books.frontier.complete(seq, true);
        }
    }
    drain(&mut in_flight, &mut books, &stop, opts.timeout + STOP_GRACE_EXTRA).await;
    watcher.abort();
    let stopped = stop.cause();
    // Events of a sending task that panicked or was abandoned were counted as sent but never
    // answered: failed, or interrupted when the run was stopped.
    let unanswered = counters.sent.load(Ordering::Relaxed).saturating_sub(counters.done());
    let unanswered_to = if stopped.is_some() { &counters.interrupted } else { &counters.failed };
    unanswered_to.fetch_add(unanswered, Ordering::Relaxed);
    books.reports.finish(&books.console);
    let mut failed_out_error = false;
    let mut failed_out_lines = 0;
    if let Some(out) = books.failed_out.as_mut() {
        failed_out_lines = out.lines;
        if let Err(e) = out.finish() {
            failed_out_error = true;
            books.console.report(&format!("eps client: error: writing {}: {e}", out.path.display()));
        }
    }
    let mut checkpoint = None;
    if let Some(saver) = saver.as_mut() {
        saver.maybe_save(&books.frontier, &books.console, true).await;
        checkpoint = Some((books.frontier.done().line, saver.path.clone()));
    }
    books.console.finish();
    read_result?;

    let mut summary = counters.summary(started.elapsed());
    if sender.servers.len() > 1 {
        summary.per_server = sender
            .servers
            .iter()
            .zip(&counters.per_server)
            .map(|(server, n)| (server.name.clone(), n.load(Ordering::Relaxed)))
            .collect();
    }
    summary.stopped = stopped;
    summary.resumed_after = resumed_after;
    summary.checkpoint = checkpoint;
    summary.failed_out = failed_out_lines;
    summary.failed_out_error = failed_out_error;
    tracing::info!(producer, %summary, per_server = summary.per_server_line(), "client run ends");
    Ok(summary)
}

/// How much longer than one request's timeout a stopping run waits for the requests in flight.
const STOP_GRACE_EXTRA: Duration = Duration::from_secs(1);
/// How often the checkpoint is written while the run goes on (and once at its end).
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// How often the client checks whether every server has been failing for `give_up_after`.
const GIVE_UP_CHECK: Duration = Duration::from_millis(200);

/// Why a run stopped before the end of its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// A signal, by number: 2 (SIGINT) or 15 (SIGTERM).
    Signal(i32),
    /// Every server failed every request for `after`.
    GaveUp { after: Duration, urls: Vec<String> },
}

impl Stopped {
    /// 128 + the signal's number (130 for SIGINT, 143 for SIGTERM); 1 when the client gave up.
    pub fn exit_code(&self) -> u8 {
        match self {
            Stopped::Signal(n) => u8::try_from(128 + n).unwrap_or(1),
            Stopped::GaveUp { .. } => 1,
        }
    }
}

impl fmt::Display for Stopped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stopped::Signal(2) => write!(f, "interrupted (SIGINT)"),
            Stopped::Signal(15) => write!(f, "stopped (SIGTERM)"),
            Stopped::Signal(n) => write!(f, "stopped by signal {n}"),
            Stopped::GaveUp { after, urls } => {
                write!(f, "giving up: no server has taken a request for {}s ({})", after.as_secs(), urls.join(", "))
            }
        }
    }
}

/// The run's stop switch: set once, by a signal or by giving up; the reading loop, the waits and the
/// sending tasks' retries watch it.
#[derive(Default)]
struct Stop {
    set: AtomicBool,
    cause: Mutex<Option<Stopped>>,
    notify: tokio::sync::Notify,
}

impl Stop {
    fn trigger(&self, cause: Stopped) {
        let mut current = self.cause.lock().unwrap_or_else(|p| p.into_inner());
        if current.is_none() {
            *current = Some(cause);
            self.set.store(true, Ordering::SeqCst);
            self.notify.notify_waiters();
        }
    }

    fn is_set(&self) -> bool {
        self.set.load(Ordering::Relaxed)
    }

    fn cause(&self) -> Option<Stopped> {
        self.cause.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Returns once the stop is set.
    async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.set.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }
}

/// Sets the stop on `signal`, or once every server has been failing for `give_up_after`.
async fn watch_for_stop(
    signal: impl Future<Output = Stopped>,
    stop: Arc<Stop>,
    sender: Arc<Sender>,
    give_up_after: Option<Duration>,
) {
    tokio::pin!(signal);
    let mut every = tokio::time::interval(GIVE_UP_CHECK);
    loop {
        tokio::select! {
            cause = &mut signal => {
                stop.trigger(cause);
                return;
            }
            _ = every.tick() => {
                let Some(limit) = give_up_after else { continue };
                if sender.pool.unreachable_for(Instant::now()).is_some_and(|d| d >= limit) {
                    let urls = sender.servers.iter().map(|s| s.name.clone()).collect();
                    stop.trigger(Stopped::GaveUp { after: limit, urls });
                    return;
                }
            }
        }
    }
}

/// What the reading loop keeps about the requests' fates: counts, reports, the frontier of done
/// lines, the file of failed lines.
struct Books {
    counters: Arc<Counters>,
    reports: Reports,
    console: Console,
    frontier: Frontier,
    failed_out: Option<FailedOut>,
    producer: String,
}

/// Writes the checkpoint: every `SAVE_EVERY` while the frontier moves, and at the end.
struct Saver {
    path: PathBuf,
    template: Checkpoint,
    /// (line, offset) last written (or found, for the same producer).
    saved: Option<(u64, u64)>,
    last: Instant,
    error_shown: bool,
}

impl Saver {
    async fn maybe_save(&mut self, frontier: &Frontier, console: &Console, force: bool) {
        if !force && self.last.elapsed() < SAVE_EVERY {
            return;
        }
        let done = frontier.done();
        if self.saved == Some((done.line, done.offset)) {
            return;
        }
        self.last = Instant::now();
        let checkpoint = Checkpoint {
            line: done.line,
            offset: done.offset,
            prefix_hash: done.hash.hex(),
            updated_ms: crate::clock::wall_millis(),
            ..self.template.clone()
        };
        let path = self.path.clone();
        let saved = tokio::task::spawn_blocking(move || state::save(&path, &checkpoint)).await;
        match saved {
            Ok(Ok(())) => self.saved = Some((done.line, done.offset)),
            Ok(Err(e)) if !self.error_shown => {
                self.error_shown = true;
                console.report(&format!(
                    "eps client: cannot save the checkpoint (a re-run will send again what it does not cover): {e}"
                ));
            }
            Ok(Err(_)) => {}
            Err(e) => console.report(&format!("eps client: saving the checkpoint failed: {e}")),
        }
    }
}

/// `--failed-out`: every invalid, refused or undelivered line, one per line.
struct FailedOut {
    path: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
    lines: u64,
    error: Option<std::io::Error>,
}

impl FailedOut {
    /// Created (emptied) for a new send; appended to when the run resumes one.
    fn open(path: &std::path::Path, append: bool) -> anyhow::Result<FailedOut> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(path)
            .with_context(|| format!("cannot open --failed-out {}", path.display()))?;
        Ok(FailedOut { path: path.to_owned(), out: std::io::BufWriter::new(file), lines: 0, error: None })
    }

    fn write(&mut self, line: &[u8]) {
        use std::io::Write as _;
        if self.error.is_some() {
            return;
        }
        match self.out.write_all(line).and_then(|()| self.out.write_all(b"\n")) {
            Ok(()) => self.lines += 1,
            Err(e) => self.error = Some(e),
        }
    }

    fn finish(&mut self) -> std::io::Result<()> {
        use std::io::Write as _;
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        self.out.flush()?;
        self.out.get_ref().sync_all()
    }
}

/// `line` (a valid event, as read) with `"id":"<producer>-<line_no>",` after its opening brace, unless
/// it has an id of its own: the line as it was sent.
fn with_id(line: &[u8], own_id: bool, producer: &str, line_no: u64) -> Vec<u8> {
    let Some(brace) = line.iter().position(|&b| b == b'{').filter(|_| !own_id) else { return line.to_vec() };
    let mut out = Vec::with_capacity(line.len() + 40);
    out.extend_from_slice(&line[..=brace]);
    out.extend_from_slice(format!("\"id\":\"{producer}-{line_no}\",").as_bytes());
    out.extend_from_slice(&line[brace + 1..]);
    out
}

/// Waits until fewer than `concurrency` requests are in flight, counting those that end. False if the
/// run was stopped meanwhile.
async fn wait_for_room(
    in_flight: &mut JoinSet<(Request, Outcome)>,
    concurrency: usize,
    books: &mut Books,
    stop: &Stop,
) -> bool {
    while in_flight.len() >= concurrency {
        tokio::select! {
            biased;
            () = stop.wait() => return false,
            done = in_flight.join_next() => match done {
                Some(done) => books.tally(done),
                None => break,
            },
        }
    }
    !stop.is_set()
}

/// Waits for the requests in flight. Once the run is stopped they get `grace` more (their retries
/// stop at once; an attempt under way may take up to the request timeout); those still out then are
/// abandoned.
async fn drain(in_flight: &mut JoinSet<(Request, Outcome)>, books: &mut Books, stop: &Stop, grace: Duration) {
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        if deadline.is_none() && stop.is_set() {
            deadline = Some(tokio::time::Instant::now() + grace);
        }
        let done = match deadline {
            None => tokio::select! {
                () = stop.wait() => continue,
                done = in_flight.join_next() => done,
            },
            Some(deadline) => match tokio::time::timeout_at(deadline, in_flight.join_next()).await {
                Ok(done) => done,
                Err(_) => {
                    in_flight.abort_all();
                    // The abandoned tasks end as cancelled: their lines are not done.
                    while let Some(done) = in_flight.join_next().await {
                        books.tally(done);
                    }
                    return;
                }
            },
        };
        match done {
            Some(done) => books.tally(done),
            None => return,
        }
    }
}

/// One request handed to a sending task: its frontier ticket, the file line of each event, and (with
/// `--failed-out`) each line as read, with whether it had an id of its own.
struct Request {
    seq: u64,
    lines: Vec<u64>,
    originals: Vec<(Vec<u8>, bool)>,
}

/// The request being filled: its body, the file line number of each event in it, and (with
/// `--failed-out`) each line as read.
#[derive(Default)]
struct Pending {
    body: Vec<u8>,
    lines: Vec<u64>,
    originals: Vec<(Vec<u8>, bool)>,
}

impl Pending {
    /// Hands the request to a sending task and starts an empty one.
    fn send(
        &mut self,
        seq: u64,
        sender: &Arc<Sender>,
        counters: &Counters,
        in_flight: &mut JoinSet<(Request, Outcome)>,
    ) {
        let Pending { body, lines, originals } = std::mem::take(self);
        counters.sent.fetch_add(lines.len() as u64, Ordering::Relaxed);
        let sender = Arc::clone(sender);
        in_flight.spawn(async move {
            let outcome = sender.deliver(body).await;
            (Request { seq, lines, originals }, outcome)
        });
    }
}

/// Validates one line and appends it to a batch body, with its id: a line without one gets
/// `"id":"<producer>-<line>",` inserted after its opening brace, so the rest of the line is sent as
/// written. True if the line has an id of its own.
fn prepare_line(line: &[u8], line_no: u64, producer: &str, body: &mut Vec<u8>) -> Result<bool, String> {
    let event = crate::event::EventRef::parse_request(line).map_err(|e| e.to_string())?;
    // A valid event is a JSON object with at least one field: its first non-blank byte is `{`.
    let brace = line.iter().position(|&b| b == b'{').ok_or("an event must be a JSON object")?;
    let line = &line[brace..];
    let own_id = event.id.is_some();
    if own_id {
        body.extend_from_slice(line);
    } else {
        body.push(b'{');
        body.extend_from_slice(format!("\"id\":\"{producer}-{line_no}\",").as_bytes());
        body.extend_from_slice(&line[1..]);
    }
    body.push(b'\n');
    Ok(own_id)
}

/// Validates one line and builds the body to send (and whether the line has an id of its own), or
/// says why the line is invalid.
fn prepare(line: &[u8], line_no: u64, producer: &str) -> Result<(Vec<u8>, bool), String> {
    let event = Event::parse_request(line).map_err(|e| e.to_string())?;
    let id = match &event.id {
        Some(id) => id.clone(),
        None => format!("{producer}-{line_no}"),
    };
    Ok((body(&event, &id)?, event.id.is_some()))
}

/// `{"userId":..,"name":..,"value":<decimal text>,"id":..}`.
fn body(event: &Event, id: &str) -> Result<Vec<u8>, String> {
    #[derive(Serialize)]
    struct Body<'a> {
        #[serde(rename = "userId")]
        user_id: &'a str,
        name: EventKind,
        value: &'a RawValue,
        id: &'a str,
    }
    // A Decimal's Display is digits with an optional '.', which is a JSON number.
    let value = RawValue::from_string(event.value.normalize().to_string())
        .map_err(|e| format!("value {} cannot be written as JSON: {e}", event.value))?;
    let body = Body { user_id: &event.user_id, name: event.kind, value: &value, id };
    serde_json::to_vec(&body).map_err(|e| format!("cannot serialise the event: {e}"))
}

/// One line as read: how many bytes it took from the file, and whether it was cut short.
struct LineRead {
    bytes: u64,
    too_long: bool,
}

/// Reads the next line (without its `\n`) into `buf`, keeping at most `max` bytes of it; the rest of
/// a longer line is skipped. Every byte taken from the reader goes into `hash`. `None` at the end of
/// the input.
async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
    hash: &mut PrefixHash,
) -> std::io::Result<Option<LineRead>> {
    buf.clear();
    let mut read = LineRead { bytes: 0, too_long: false };
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok((read.bytes > 0).then_some(read));
        }
        let (chunk, used, end) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], i + 1, true),
            None => (available, available.len(), false),
        };
        if !read.too_long {
            if buf.len() + chunk.len() > max {
                read.too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(chunk);
            }
        }
        hash.write(&available[..used]);
        read.bytes += used as u64;
        reader.consume(used);
        if end {
            return Ok(Some(read));
        }
    }
}

fn trim_line(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// What became of one request (one event, or a batch).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// The server took the request. `rejected` lists the lines of a batch it refused, by their
    /// 1-based position in the request.
    Accepted {
        server: usize,
        duplicates: u64,
        rejected: Vec<(usize, String)>,
    },
    /// The whole request was refused.
    Rejected {
        status: StatusCode,
        error: String,
        lines: Vec<(usize, String)>,
    },
    Failed {
        attempts: u32,
        error: String,
    },
    /// The run was stopped before the request was answered: its retries were not made.
    Interrupted,
}

/// What the sending tasks share.
struct Sender {
    http: reqwest::Client,
    /// The servers, in the order given.
    servers: Vec<Server>,
    /// Which server each request goes to.
    pool: ServerPool,
    headers: HeaderMap,
    timeout: Duration,
    max_attempts: u32,
    backoff: Backoff,
    /// Set when the run stops: no retry is made after it.
    stop: Arc<Stop>,
    /// Bodies are sent gzip-compressed.
    gzip: bool,
}

/// What the servers said of the logs they append to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Logs {
    /// Their identities, sorted, each once.
    Known(Vec<String>),
    /// A server answered without naming a log (an eps older than log identities): nothing to check
    /// against.
    NotReported,
    /// No server named its log (none answered, or the run stopped first).
    Unanswered,
}

/// One server: its URL as given (for messages and the summary) and where requests go.
struct Server {
    name: String,
    endpoint: reqwest::Url,
}

impl Sender {
    fn new(opts: &ClientOptions, tuning: &Tuning, stop: Arc<Stop>) -> anyhow::Result<Sender> {
        let path = if opts.batch <= 1 { "liveEvent" } else { "events" };
        let mut servers = Vec::new();
        for url in opts.urls.iter().map(|u| u.trim()).filter(|u| !u.is_empty()) {
            let base = url.trim_end_matches('/');
            // "127.0.0.1:8000" or "localhost:8000": a host, not a URL; say what to add.
            if !base.contains("://") {
                return Err(crate::config::ConfigError(format!(
                    "invalid server URL {url:?}: it has no scheme; add http:// (--url http://{base})"
                ))
                .into());
            }
            let endpoint = reqwest::Url::parse(&format!("{base}/{path}"))
                .with_context(|| format!("invalid server URL {url:?}"))?;
            if !matches!(endpoint.scheme(), "http" | "https") {
                anyhow::bail!("invalid server URL {url:?}: the scheme must be http or https");
            }
            servers.push(Server { name: base.to_owned(), endpoint });
        }
        if servers.is_empty() {
            anyhow::bail!("no server URL given");
        }
        let mut headers = HeaderMap::new();
        let content_type = if opts.batch <= 1 { "application/json" } else { "application/x-ndjson" };
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        if opts.gzip {
            headers.insert(reqwest::header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        if !opts.token.is_empty() {
            let mut token = HeaderValue::from_str(&opts.token)
                .context("the token contains characters not allowed in an HTTP header")?;
            token.set_sensitive(true);
            headers.insert(AUTHORIZATION, token);
        }
        let http = reqwest::Client::builder()
            .user_agent(concat!("eps-client/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(opts.concurrency.max(1))
            .connect_timeout(opts.timeout)
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none());
        let http = trust(http, opts.ca_cert.as_deref())?.build().context("cannot build the HTTP client")?;
        Ok(Sender {
            http,
            pool: ServerPool::new(servers.len(), tuning.server_down),
            servers,
            headers,
            timeout: opts.timeout,
            max_attempts: opts.max_attempts.max(1),
            backoff: tuning.backoff,
            stop,
            gzip: opts.gzip,
        })
    }

    /// The logs the servers append to (`GET /healthz`, field `log`), asked of every server in turn
    /// until at least one names its log; while none does (all down, or a JetStream server that has
    /// not reached its stream), asked again, as many times as a request is attempted, unless the run
    /// stops first (a signal, or every server failing for `--give-up-after`).
    async fn logs(&self) -> Logs {
        let mut round = 0;
        loop {
            let mut known = Vec::new();
            for (index, server) in self.servers.iter().enumerate() {
                let Ok(url) = server.endpoint.join("healthz") else { return Logs::NotReported };
                let answer = async {
                    let response = self.http.get(url).timeout(self.timeout).send().await?.error_for_status()?;
                    response.json::<serde_json::Value>().await
                };
                match answer.await {
                    Ok(health) => {
                        self.pool.succeeded(index);
                        match health.get("log") {
                            None => return Logs::NotReported,
                            Some(serde_json::Value::String(log)) => known.push(log.clone()),
                            Some(_) => {}
                        }
                    }
                    Err(e) => {
                        tracing::debug!(server = %server.name, error = %e, "asking the server for its log failed");
                        self.pool.failed(index, Instant::now());
                    }
                }
            }
            if !known.is_empty() {
                known.sort();
                known.dedup();
                return Logs::Known(known);
            }
            round += 1;
            if round >= self.max_attempts {
                return Logs::Unanswered;
            }
            tokio::select! {
                () = self.stop.wait() => return Logs::Unanswered,
                () = tokio::time::sleep(self.backoff.delay(round)) => {}
            }
        }
    }

    /// Sends one request until it is accepted, rejected, or out of attempts. Each attempt goes to the
    /// server the pool chooses: round-robin for the first, the next server after the failed one for
    /// a retry. The sleep between attempts is only taken when no server is up.
    async fn deliver(&self, body: Vec<u8>) -> Outcome {
        // Compressed once; every attempt sends the same bytes.
        let body = if self.gzip { gzip(&body) } else { body };
        let mut attempt: u32 = 1;
        let mut server = self.pool.pick(Instant::now()).index;
        loop {
            let (error, retry_after) = match self.attempt(server, body.clone()).await {
                Attempt::Done(outcome) => {
                    if self.pool.succeeded(server) && self.servers.len() > 1 {
                        tracing::info!(server = %self.servers[server].name, "server is answering again");
                    }
                    return outcome;
                }
                Attempt::Retry { error, retry_after } => (error, retry_after),
            };
            if self.pool.failed(server, Instant::now()) && self.servers.len() > 1 {
                tracing::warn!(server = %self.servers[server].name, error, "server marked down, failing over");
            }
            if attempt >= self.max_attempts {
                return Outcome::Failed { attempts: attempt, error };
            }
            if self.stop.is_set() {
                return Outcome::Interrupted;
            }
            let mut next = self.pool.pick_after(server, Instant::now());
            if next.all_down {
                let pause = match retry_after {
                    Some(after) => after.min(MAX_RETRY_AFTER),
                    None => self.backoff.delay(attempt),
                };
                tracing::debug!(attempt, ?pause, error, "retrying a request");
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = self.stop.wait() => return Outcome::Interrupted,
                }
                // A server may have come back, or be due for a probe, after the sleep.
                next = self.pool.pick_after(server, Instant::now());
            } else {
                tracing::debug!(attempt, error, to = %self.servers[next.index].name, "retrying a request on the next server");
            }
            server = next.index;
            attempt += 1;
        }
    }

    async fn attempt(&self, server: usize, body: Vec<u8>) -> Attempt {
        let endpoint = &self.servers[server].endpoint;
        let request = self.http.post(endpoint.clone()).headers(self.headers.clone()).timeout(self.timeout).body(body);
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => {
                let error = describe(&e, self.timeout);
                // Retried like any failed connection (a server may be given a new certificate), but said
                // once at the default level: otherwise the run only ends with "no server has taken a request".
                if (certificate_refused(&e) || error.contains("invalid peer certificate"))
                    && !CERTIFICATE_REFUSAL_SAID.swap(true, Ordering::Relaxed)
                {
                    tracing::error!(
                        server = %self.servers[server].name, error,
                        "the server's TLS certificate is not trusted: give the CA that signed it with --ca-cert (EPS_CA_CERT)"
                    );
                }
                return Attempt::Retry { error, retry_after: None };
            }
        };
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let reply = read_capped(response, MAX_REPLY_BYTES).await;
        let parsed = reply.as_ref().ok().and_then(|b| serde_json::from_slice::<Reply>(b).ok());
        if status.is_success() {
            // The server has taken the request; a broken reply body does not change that.
            let reply = parsed.unwrap_or_default();
            let duplicates = if reply.duplicate { 1 } else { reply.duplicates };
            return Attempt::Done(Outcome::Accepted { server, duplicates, rejected: reply.line_errors() });
        }
        if status == StatusCode::BAD_REQUEST {
            if let Some(lines) = parsed.map(|r| r.line_errors()).filter(|l| !l.is_empty()) {
                // A batch none of whose lines is valid: each line has its own error.
                return Attempt::Done(Outcome::Rejected { status, error: String::new(), lines });
            }
        }
        let error = match reply {
            Ok(bytes) => reply_error(status, &bytes),
            Err(e) => format!("{} (reading the answer failed: {})", reason(status), describe(&e, self.timeout)),
        };
        if retryable(status) {
            // With several servers, say which one answered (a connection error names its URL already).
            let from =
                if self.servers.len() > 1 { format!(" from {}", self.servers[server].name) } else { String::new() };
            Attempt::Retry { error: format!("HTTP {status}{from}: {error}"), retry_after }
        } else {
            Attempt::Done(Outcome::Rejected { status, error, lines: Vec::new() })
        }
    }
}

/// Which server a request goes to: round-robin over the servers considered up, failover to the next
/// one after a failure, a down server left out for a backoff of its own (doubling from `base` to
/// `cap` while it keeps failing, reset by a success) and then probed by a single request. When every
/// server is down the choice is round-robin over all of them, flagged `all_down` so that the caller
/// sleeps its backoff between attempts. It only decides; it never waits. Shared by the sending tasks.
#[derive(Debug)]
pub(crate) struct ServerPool {
    state: Mutex<PoolState>,
    down: Backoff,
}

#[derive(Debug)]
struct PoolState {
    /// Where the round-robin of new requests continues.
    next: usize,
    servers: Vec<Health>,
    /// Since when every server has been down (failing, with no success since).
    all_down_since: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Health {
    /// `None` while up; while down, when its backoff expires and a probe may go to it.
    down_until: Option<Instant>,
    /// Its current backoff (meaningful while down).
    backoff: Duration,
    /// A probe is in flight: no second one until it is answered.
    probing: bool,
}

/// A server chosen for an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pick {
    /// Its position in the list of servers.
    pub index: usize,
    /// No server was up or due for a probe: this one was chosen anyway.
    pub all_down: bool,
}

impl ServerPool {
    /// `servers` servers (at least one), all up.
    pub(crate) fn new(servers: usize, down: Backoff) -> ServerPool {
        let health = Health { down_until: None, backoff: down.base, probing: false };
        let state = PoolState { next: 0, servers: vec![health; servers.max(1)], all_down_since: None };
        ServerPool { state: Mutex::new(state), down }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The server for a new request: the next usable one in round-robin order.
    pub(crate) fn pick(&self, now: Instant) -> Pick {
        let mut state = self.lock();
        let start = state.next;
        let pick = state.choose(start, None, now);
        state.next = (pick.index + 1) % state.servers.len();
        pick
    }

    /// The server for a retry of a request that just failed on `failed`: the next usable one after
    /// it, never `failed` itself when there are others.
    pub(crate) fn pick_after(&self, failed: usize, now: Instant) -> Pick {
        let mut state = self.lock();
        state.choose(failed + 1, Some(failed), now)
    }

    /// `server` answered (any answer but a retryable one): it is up, its backoff reset. True if it
    /// was down until now.
    pub(crate) fn succeeded(&self, server: usize) -> bool {
        let base = self.down.base;
        let mut state = self.lock();
        state.all_down_since = None;
        let Some(health) = state.servers.get_mut(server) else { return false };
        let was_down = health.down_until.is_some();
        *health = Health { down_until: None, backoff: base, probing: false };
        was_down
    }

    /// An attempt on `server` failed with a retryable error at `now`. An up server goes down for the
    /// base backoff; a down one whose backoff had expired (a probe, or an attempt made while all were
    /// down) goes down again for twice as long, up to the cap; the failure of a request sent before
    /// it was marked down changes nothing. True if it was up until now.
    pub(crate) fn failed(&self, server: usize, now: Instant) -> bool {
        let Backoff { base, cap } = self.down;
        let mut state = self.lock();
        let state = &mut *state;
        let Some(health) = state.servers.get_mut(server) else { return false };
        health.probing = false;
        let was_up = match health.down_until {
            None => {
                health.backoff = base;
                health.down_until = Some(now + base);
                true
            }
            Some(until) if now >= until => {
                health.backoff = health.backoff.saturating_mul(2).min(cap).max(base);
                health.down_until = Some(now + health.backoff);
                false
            }
            Some(_) => false,
        };
        if state.all_down_since.is_none() && state.servers.iter().all(|h| h.down_until.is_some()) {
            state.all_down_since = Some(now);
        }
        was_up
    }

    /// How long every server has been down (each failed, none answered since), if they all are.
    pub(crate) fn unreachable_for(&self, now: Instant) -> Option<Duration> {
        self.lock().all_down_since.map(|since| now.saturating_duration_since(since))
    }
}

impl PoolState {
    /// The first server from `start` on (wrapping) that is up or due for a probe, skipping `skip`
    /// when there are others; failing that, the one at `start`, flagged `all_down`.
    fn choose(&mut self, start: usize, skip: Option<usize>, now: Instant) -> Pick {
        let n = self.servers.len();
        for k in 0..n {
            let index = (start + k) % n;
            if n > 1 && skip == Some(index) {
                continue;
            }
            let health = &mut self.servers[index];
            match health.down_until {
                None => return Pick { index, all_down: false },
                Some(until) if now >= until && !health.probing => {
                    health.probing = true;
                    return Pick { index, all_down: false };
                }
                Some(_) => {}
            }
        }
        Pick { index: start % n, all_down: true }
    }
}

enum Attempt {
    Done(Outcome),
    Retry { error: String, retry_after: Option<Duration> },
}

/// `body` as one gzip member.
fn gzip(body: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder =
        flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 4 + 64), flate2::Compression::default());
    encoder.write_all(body).expect("writing to memory");
    encoder.finish().expect("writing to memory")
}

fn retryable(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT || status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// `Retry-After` in whole seconds (the HTTP-date form is ignored: the backoff applies).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    value.parse::<u64>().ok().map(Duration::from_secs)
}

/// What the client reads from an answer: `POST /liveEvent`'s `duplicate`, `POST /events`'s counts
/// and per-line errors, any error's `error`.
#[derive(Deserialize, Default)]
struct Reply {
    #[serde(default)]
    duplicate: bool,
    #[serde(default)]
    duplicates: u64,
    #[serde(default)]
    errors: Vec<ReplyLineError>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ReplyLineError {
    line: usize,
    error: String,
}

impl Reply {
    fn line_errors(&self) -> Vec<(usize, String)> {
        self.errors.iter().map(|e| (e.line, e.error.clone())).collect()
    }
}

/// The server's explanation: the JSON `error` field, else the body's text, else the status reason.
fn reply_error(status: StatusCode, body: &[u8]) -> String {
    if let Ok(Reply { error: Some(error), .. }) = serde_json::from_slice::<Reply>(body) {
        return match error {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return reason(status).to_owned();
    }
    let mut short: String = text.chars().take(200).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    short
}

fn reason(status: StatusCode) -> &'static str {
    status.canonical_reason().unwrap_or("no reason given")
}

async fn read_capped(mut response: reqwest::Response, cap: usize) -> Result<Vec<u8>, reqwest::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = cap.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= cap {
            break;
        }
    }
    Ok(out)
}

/// The roots https URLs are verified with: only `ca_cert` when given (a private CA, like curl's
/// `--cacert`), else the platform's trust store, else (a platform without one) reqwest's bundled roots.
fn trust(builder: reqwest::ClientBuilder, ca_cert: Option<&std::path::Path>) -> anyhow::Result<reqwest::ClientBuilder> {
    if let Some(path) = ca_cert {
        let pem = std::fs::read(path).with_context(|| format!("cannot read the CA certificate {}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("{} is not a PEM certificate", path.display()))?;
        anyhow::ensure!(!certs.is_empty(), "{} holds no PEM certificate", path.display());
        return Ok(certs.into_iter().fold(builder.tls_built_in_root_certs(false), |b, c| b.add_root_certificate(c)));
    }
    let native: Vec<_> = rustls_native_certs::load_native_certs()
        .unwrap_or_default()
        .iter()
        .filter_map(|der| reqwest::Certificate::from_der(der).ok())
        .collect();
    if native.is_empty() {
        return Ok(builder);
    }
    Ok(native.into_iter().fold(builder.tls_built_in_root_certs(false), |b, c| b.add_root_certificate(c)))
}

static CERTIFICATE_REFUSAL_SAID: AtomicBool = AtomicBool::new(false);

/// Whether rustls refused the server's certificate (somewhere in the error's causes; an `io::Error`
/// hides its inner error from `source`, so it is opened with `get_ref`). reqwest's connector may carry
/// it as text only, hence the caller's second test on rustls's wording.
fn certificate_refused(e: &reqwest::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(rustls::Error::InvalidCertificate(_)) = c.downcast_ref::<rustls::Error>() {
            return true;
        }
        if let Some(inner) = c.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            if let Some(rustls::Error::InvalidCertificate(_)) = inner.downcast_ref::<rustls::Error>() {
                return true;
            }
        }
        cause = c.source();
    }
    false
}

/// A reqwest error with its causes ("error sending request" alone says nothing).
fn describe(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!("no answer within {timeout:?}");
    }
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Counts shared with the progress display.
#[derive(Default)]
struct Counters {
    bytes: AtomicU64,
    lines: AtomicU64,
    sent: AtomicU64,
    accepted: AtomicU64,
    duplicates: AtomicU64,
    rejected: AtomicU64,
    invalid: AtomicU64,
    failed: AtomicU64,
    interrupted: AtomicU64,
    /// Events accepted by each server, in the order of `ClientOptions::urls`.
    per_server: Vec<AtomicU64>,
}

impl Counters {
    fn new(servers: usize) -> Counters {
        Counters { per_server: (0..servers).map(|_| AtomicU64::new(0)).collect(), ..Default::default() }
    }

    fn summary(&self, elapsed: Duration) -> ClientSummary {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ClientSummary {
            lines: get(&self.lines),
            sent: get(&self.sent),
            accepted: get(&self.accepted),
            duplicates: get(&self.duplicates),
            rejected: get(&self.rejected),
            invalid: get(&self.invalid),
            failed: get(&self.failed),
            interrupted: get(&self.interrupted),
            elapsed,
            ..Default::default()
        }
    }

    fn done(&self) -> u64 {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        get(&self.accepted) + get(&self.rejected) + get(&self.failed) + get(&self.interrupted)
    }
}

impl Books {
    /// Counts what became of one request, reports its errors, moves the frontier past it if every
    /// line of it is done, and writes its failed lines to `--failed-out`.
    fn tally(&mut self, done: Result<(Request, Outcome), JoinError>) {
        let counters = &self.counters;
        // The file line of the request's `n`-th event (1-based); a position the request does not have
        // (a confused server) is reported against the request's first line.
        let file_line = |lines: &[u64], n: usize| lines.get(n.wrapping_sub(1)).or(lines.first()).copied().unwrap_or(0);
        let (request, outcome) = match done {
            Ok(done) => done,
            Err(e) => {
                // A sending task panicked or was abandoned: its events are not known to be delivered. (The
                // line numbers and ticket went down with the task; the whole count is kept by `sent`.)
                self.frontier.block();
                if !e.is_cancelled() {
                    self.console.report(&format!("a request was lost by a failed sending task: {e}"));
                }
                return;
            }
        };
        let Request { seq, lines, originals } = request;
        let mut failed_lines: Vec<usize> = Vec::new();
        let mut undelivered = false;
        let done = match outcome {
            Outcome::Accepted { server, duplicates, rejected } => {
                let refused = (rejected.len() as u64).min(lines.len() as u64);
                counters.accepted.fetch_add(lines.len() as u64 - refused, Ordering::Relaxed);
                if let Some(n) = counters.per_server.get(server) {
                    n.fetch_add(lines.len() as u64 - refused, Ordering::Relaxed);
                }
                counters.duplicates.fetch_add(duplicates, Ordering::Relaxed);
                counters.rejected.fetch_add(refused, Ordering::Relaxed);
                for (n, error) in rejected {
                    self.reports.report(
                        &self.console,
                        file_line(&lines, n),
                        format!("HTTP 200, line refused: {error}"),
                    );
                    failed_lines.push(n);
                }
                true
            }
            Outcome::Rejected { status, error, lines: per_line } => {
                counters.rejected.fetch_add(lines.len() as u64, Ordering::Relaxed);
                if per_line.is_empty() {
                    for &line in &lines {
                        self.reports.report(&self.console, line, format!("HTTP {status}: {error}"));
                    }
                    failed_lines.extend(1..=lines.len());
                } else {
                    for (n, error) in per_line {
                        self.reports.report(&self.console, file_line(&lines, n), format!("HTTP {status}: {error}"));
                        failed_lines.push(n);
                    }
                }
                // A verdict on the lines themselves (400, 409 conflict, 422) is final: sending them again
                // changes nothing. Any other refusal (a wrong token or URL, 413) leaves them to be sent again.
                status == StatusCode::BAD_REQUEST
                    || status == StatusCode::CONFLICT
                    || status == StatusCode::UNPROCESSABLE_ENTITY
            }
            Outcome::Failed { attempts, error } => {
                counters.failed.fetch_add(lines.len() as u64, Ordering::Relaxed);
                for &line in &lines {
                    self.reports.report(&self.console, line, format!("failed after {attempts} attempts: {error}"));
                }
                failed_lines.extend(1..=lines.len());
                undelivered = true;
                false
            }
            Outcome::Interrupted => {
                counters.interrupted.fetch_add(lines.len() as u64, Ordering::Relaxed);
                false
            }
        };
        self.frontier.complete(seq, done);
        if let Some(out) = self.failed_out.as_mut() {
            for n in failed_lines {
                let (Some((original, own_id)), Some(&line_no)) =
                    (originals.get(n.wrapping_sub(1)), lines.get(n.wrapping_sub(1)))
                else {
                    continue;
                };
                if undelivered {
                    // As it was sent, with its id: sending it again, and a resumed run, store it once.
                    out.write(&with_id(original, *own_id, &self.producer, line_no));
                } else {
                    out.write(original);
                }
            }
        }
    }
}

/// Rate-limits repeated rejection and failure messages, and invalid-line messages.
#[derive(Default)]
struct Reports {
    seen: HashMap<String, u64>,
    suppressed: u64,
    invalid_shown: u64,
    invalid_suppressed: u64,
}

impl Reports {
    fn report(&mut self, console: &Console, line: u64, message: String) {
        let count = if let Some(count) = self.seen.get_mut(&message) {
            *count += 1;
            *count
        } else {
            if self.seen.len() < MAX_TRACKED_MESSAGES {
                self.seen.insert(message.clone(), 1);
            }
            1
        };
        if count <= REPORTS_PER_MESSAGE {
            console.report(&format!("line {line}: {message}"));
            if count == REPORTS_PER_MESSAGE {
                console.report("(further errors with that message are counted, not shown)");
            }
        } else {
            self.suppressed += 1;
        }
    }

    /// An invalid line: the first [`INVALID_SHOWN`] are shown (their messages differ in details such
    /// as a column), the rest counted.
    fn invalid(&mut self, console: &Console, line: u64, message: &str) {
        if self.invalid_shown < INVALID_SHOWN {
            self.invalid_shown += 1;
            console.report(&format!("line {line}: {message}"));
            if self.invalid_shown == INVALID_SHOWN {
                console.report("(further invalid lines are counted, not shown)");
            }
        } else {
            self.invalid_suppressed += 1;
        }
    }

    fn finish(&self, console: &Console) {
        if self.suppressed > 0 {
            console
                .report(&format!("({} more errors repeating a message shown above were not shown)", self.suppressed));
        }
        if self.invalid_suppressed > 0 {
            console.report(&format!("({} more invalid lines were not shown)", self.invalid_suppressed));
        }
    }
}

/// Progress on stderr, and the one way errors are printed (so they do not tear the bar).
struct Console {
    bar: Option<ProgressBar>,
    ticker: Option<tokio::task::JoinHandle<()>>,
    capture: Option<Arc<Mutex<Vec<String>>>>,
}

impl Console {
    fn start(
        mode: Progress,
        size: u64,
        counters: Arc<Counters>,
        started: Instant,
        capture: Option<Arc<Mutex<Vec<String>>>>,
    ) -> Console {
        let mode = match mode {
            Progress::Auto if std::io::stderr().is_terminal() => Progress::Bar,
            Progress::Auto => Progress::Plain,
            other => other,
        };
        match mode {
            Progress::Bar => {
                let bar = if size > 0 {
                    let bar = ProgressBar::new(size);
                    let style = ProgressStyle::with_template(
                        "{spinner:.green} [{elapsed_precise}] [{wide_bar:.cyan/blue}] {percent:>3}% ETA {eta}\n  {msg}",
                    )
                    .map(|s| s.progress_chars("=> "))
                    .unwrap_or_else(|_| ProgressStyle::default_bar());
                    bar.set_style(style);
                    bar
                } else {
                    let bar = ProgressBar::new_spinner();
                    let style = ProgressStyle::with_template("{spinner:.green} [{elapsed_precise}] {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner());
                    bar.set_style(style);
                    bar
                };
                bar.enable_steady_tick(Duration::from_millis(100));
                let ticking = bar.clone();
                let ticker = tokio::spawn(async move {
                    let mut every = tokio::time::interval(BAR_EVERY);
                    loop {
                        every.tick().await;
                        ticking.set_position(counters.bytes.load(Ordering::Relaxed));
                        ticking.set_message(progress_line(
                            &counters,
                            counters.done() as f64 / started.elapsed().as_secs_f64().max(1e-3),
                        ));
                    }
                });
                Console { bar: Some(bar), ticker: Some(ticker), capture }
            }
            Progress::Plain => {
                let ticker = tokio::spawn(async move {
                    let mut every = tokio::time::interval_at(tokio::time::Instant::now() + PLAIN_EVERY, PLAIN_EVERY);
                    let (mut last_done, mut last_at) = (0u64, Instant::now());
                    loop {
                        every.tick().await;
                        let (done, now) = (counters.done(), Instant::now());
                        let rate = done.saturating_sub(last_done) as f64 / (now - last_at).as_secs_f64().max(1e-3);
                        (last_done, last_at) = (done, now);
                        eprintln!("eps client: {}", progress_line(&counters, rate));
                    }
                });
                Console { bar: None, ticker: Some(ticker), capture }
            }
            Progress::Quiet | Progress::Auto => Console { bar: None, ticker: None, capture },
        }
    }

    fn report(&self, message: &str) {
        if let Some(capture) = &self.capture {
            capture.lock().unwrap_or_else(|p| p.into_inner()).push(message.to_owned());
            return;
        }
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{message}")),
            None => eprintln!("{message}"),
        }
    }

    fn finish(&self) {
        if let Some(ticker) = &self.ticker {
            ticker.abort();
        }
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.finish();
    }
}

fn progress_line(c: &Counters, rate: f64) -> String {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    format!(
        "sent {}, accepted {} ({} duplicates), rejected {}, invalid {}, failed {}, {:.0} events/s",
        get(&c.sent),
        get(&c.accepted),
        get(&c.duplicates),
        get(&c.rejected),
        get(&c.invalid),
        get(&c.failed),
        rate
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::io::Write as _;
    use std::sync::atomic::AtomicUsize;

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
                    return (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"error": "busy"})))
                        .into_response();
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
        assert_eq!(
            bodies[2].0,
            format!("{{\"id\":\"{run}-6\",\"userId\":\"u5\",\"name\":\"add_revenue\",\"value\":3}}\n")
        );
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

        let expected = ClientSummary {
            lines: 4,
            sent: 3,
            accepted: 3,
            invalid: 1,
            elapsed: summary.elapsed,
            ..Default::default()
        };
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
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        [("retry-after", "0")],
                        Json(serde_json::json!({"error": "busy"})),
                    )
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
            Box::pin(async {
                Json(serde_json::json!({"message": "Event received", "duplicate": true})).into_response()
            })
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
        let (summary, reports) =
            within_secs(60, run_fast(ClientOptions { max_attempts: 3, ..options(&file, &url) })).await;
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
    async fn lines_are_read_with_a_length_limit() {
        let data = b"abc\r\n\xEF\xBB\xBFx\n0123456789\nlast".to_vec();
        let mut reader = BufReader::with_capacity(4, data.as_slice());
        let mut buf = Vec::new();
        let mut lines = Vec::new();
        let mut hash = PrefixHash::default();
        while let Some(read) = read_line(&mut reader, &mut buf, 8, &mut hash).await.unwrap() {
            lines.push((trim_line(&buf).to_vec(), read.bytes, read.too_long));
        }
        let mut whole = PrefixHash::default();
        whole.write(&data);
        assert_eq!(hash.hex(), whole.hex(), "every byte read, skipped ones included, is hashed");
        assert_eq!(
            lines,
            vec![
                (b"abc".to_vec(), 5, false),
                (b"\xEF\xBB\xBFx".to_vec(), 5, false),
                (Vec::new(), 11, true),
                (b"last".to_vec(), 4, false),
            ]
        );
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

    #[test]
    fn backoff_doubles_from_the_base_up_to_the_cap() {
        let b = Backoff::default();
        assert_eq!(b.ceiling(1), Duration::from_millis(50));
        assert_eq!(b.ceiling(2), Duration::from_millis(100));
        assert_eq!(b.ceiling(7), Duration::from_millis(3200));
        assert_eq!(b.ceiling(8), Duration::from_secs(5));
        assert_eq!(b.ceiling(1000), Duration::from_secs(5));
        for attempt in 1..20 {
            assert!(b.delay(attempt) <= b.ceiling(attempt));
        }
    }

    #[test]
    fn retry_after_is_read_in_seconds() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(RETRY_AFTER, HeaderValue::from_static(" 3 "));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"));
        assert_eq!(retry_after(&headers), None);
        assert!(retryable(StatusCode::REQUEST_TIMEOUT) && retryable(StatusCode::TOO_MANY_REQUESTS));
        assert!(retryable(StatusCode::BAD_GATEWAY) && !retryable(StatusCode::UNAUTHORIZED));
    }

    #[test]
    fn summary_line_and_ok() {
        let s = ClientSummary {
            lines: 10,
            sent: 9,
            accepted: 8,
            duplicates: 2,
            rejected: 1,
            invalid: 1,
            failed: 0,
            elapsed: Duration::from_millis(1500),
            ..Default::default()
        };
        assert_eq!(
            s.to_string(),
            "sent 9, accepted 8 (2 duplicates), rejected 1, invalid 1, failed 0 in 1.50s (6 events/s)"
        );
        assert_eq!(s.per_server_line(), None);
        assert!(!s.ok());
        assert!(ClientSummary { sent: 1, accepted: 1, ..Default::default() }.ok());
        assert_eq!(ClientSummary::default().events_per_sec(), 0.0);
        let two = ClientSummary { per_server: vec![("http://a".into(), 6), ("http://b".into(), 2)], ..s.clone() };
        assert_eq!(two.to_string(), s.to_string(), "the summary line keeps its shape");
        assert_eq!(two.per_server_line().as_deref(), Some("per server: http://a → 6, http://b → 2"));
    }

    // -----------------------------------------------------------------------------------------------
    // Several servers

    const DOWN: Backoff = Backoff { base: Duration::from_millis(500), cap: Duration::from_secs(5) };

    fn picks(pool: &ServerPool, now: Instant, n: usize) -> Vec<usize> {
        (0..n).map(|_| pool.pick(now).index).collect()
    }

    #[test]
    fn the_pool_goes_round_robin_over_up_servers() {
        let pool = ServerPool::new(3, DOWN);
        let now = Instant::now();
        assert_eq!(picks(&pool, now, 7), [0, 1, 2, 0, 1, 2, 0]);
        assert!(!pool.pick(now).all_down);
        // Answers keep them up and do not disturb the order.
        assert!(!pool.succeeded(2));
        assert_eq!(picks(&pool, now, 3), [2, 0, 1]);

        let one = ServerPool::new(1, DOWN);
        assert_eq!(picks(&one, now, 3), [0, 0, 0]);
    }

    #[test]
    fn a_failed_request_goes_to_the_next_server_never_the_same() {
        let pool = ServerPool::new(3, DOWN);
        let now = Instant::now();
        assert!(pool.failed(0, now), "an up server that fails goes down");
        assert_eq!(pool.pick_after(0, now), Pick { index: 1, all_down: false });
        assert!(pool.failed(2, now));
        assert_eq!(pool.pick_after(2, now), Pick { index: 1, all_down: false }, "0 is down: skipped");
        assert!(pool.failed(1, now));
        // Every server down: still the next one, flagged so that the caller sleeps its backoff.
        assert_eq!(pool.pick_after(1, now), Pick { index: 2, all_down: true });
        assert_eq!(pool.pick_after(2, now), Pick { index: 0, all_down: true });
        assert!(pool.pick(now).all_down);

        // With one server there is no other: the same one, after the backoff sleep.
        let one = ServerPool::new(1, DOWN);
        assert!(one.failed(0, now));
        assert_eq!(one.pick_after(0, now), Pick { index: 0, all_down: true });
        assert_eq!(one.pick(now), Pick { index: 0, all_down: true });
    }

    #[test]
    fn a_down_server_is_skipped_until_its_backoff_expires_then_probed_once() {
        let pool = ServerPool::new(3, DOWN);
        let t0 = Instant::now();
        assert!(pool.failed(1, t0));
        // A second failure of a request sent before it was marked down changes nothing.
        assert!(!pool.failed(1, t0 + Duration::from_millis(100)));
        assert_eq!(picks(&pool, t0 + Duration::from_millis(499), 4), [0, 2, 0, 2]);

        // Backoff expired: one probe, and no other request while it is out.
        let t1 = t0 + DOWN.base;
        assert_eq!(picks(&pool, t1, 5), [0, 1, 2, 0, 2]);
        // The probe fails: left out twice as long (from the failure on).
        assert!(!pool.failed(1, t1));
        assert_eq!(picks(&pool, t1 + Duration::from_millis(999), 4), [0, 2, 0, 2]);
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(picks(&pool, t2, 4), [0, 1, 2, 0]);
        // The probe succeeds: up again, back in the rotation, its backoff reset.
        assert!(pool.succeeded(1), "it was down");
        assert_eq!(picks(&pool, t2, 3), [1, 2, 0]);
        assert!(pool.failed(1, t2));
        assert_eq!(picks(&pool, t2 + Duration::from_millis(499), 2), [2, 0]);
        assert_eq!(picks(&pool, t2 + DOWN.base, 2), [1, 2]);
    }

    #[test]
    fn every_server_down_is_timed_from_the_last_one_to_fail_until_any_answer() {
        let pool = ServerPool::new(2, DOWN);
        let t0 = Instant::now();
        assert!(pool.failed(0, t0));
        assert_eq!(pool.unreachable_for(t0 + Duration::from_secs(9)), None, "one is still up");
        let t1 = t0 + Duration::from_secs(1);
        assert!(pool.failed(1, t1));
        assert_eq!(pool.unreachable_for(t1 + Duration::from_secs(3)), Some(Duration::from_secs(3)));
        // Further failures do not restart the clock; an answer stops it.
        assert!(!pool.failed(0, t1 + Duration::from_secs(2)));
        assert_eq!(pool.unreachable_for(t1 + Duration::from_secs(4)), Some(Duration::from_secs(4)));
        pool.succeeded(0);
        assert_eq!(pool.unreachable_for(t1 + Duration::from_secs(5)), None);
    }

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
        assert_eq!(
            resume_command(&args),
            r#"eps client 'my events.jsonl' --url http://a:1,http://b:2 --token 'it'\''s'"#
        );
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

    #[test]
    fn a_down_servers_backoff_doubles_up_to_the_cap() {
        let pool = ServerPool::new(2, DOWN);
        let mut now = Instant::now();
        assert!(pool.failed(1, now));
        let mut expected = DOWN.base;
        for _ in 0..8 {
            let almost = now + expected - Duration::from_millis(1);
            assert_eq!(pool.pick(almost).index, 0, "down for {expected:?}: only 0 is usable");
            now += expected;
            assert_eq!(pool.pick_after(0, now), Pick { index: 1, all_down: false }, "probe after {expected:?}");
            assert!(!pool.failed(1, now));
            expected = (expected * 2).min(DOWN.cap);
        }
        assert_eq!(expected, DOWN.cap);
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
        assert!(
            elapsed < Duration::from_secs(25),
            "took {elapsed:?}: a Retry-After was obeyed instead of failing over"
        );
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
        let err =
            run(ClientOptions { urls: vec!["http://127.0.0.1:1".into(), "ftp://y".into()], ..options(&file, "") })
                .await
                .unwrap_err();
        assert!(format!("{err:#}").contains("ftp://y"), "{err:#}");
    }
}
