//! The live console: `GET /` serves a page embedded in the binary; `GET /console/summary` and
//! `GET /console/stream` (Server-Sent Events) feed it.
//!
//! Cost to ingest: with no console open, one relaxed atomic add per request (the accepted counter),
//! one into the request tally (`telemetry::tally`: the ingest latency's bucket, and a failed answer's
//! error counter) and one atomic load (is a console open?). A sampler task wakes once a second: it
//! records the accepted counter, the store's applied count (one small query) and the tally's
//! differences as the chart's points (`series.rs`: 5 minutes, an hour and 24 hours, bounded), and only
//! while a console is open (a summary or stream was requested in the last 30 s) also computes the rest
//! of the summary (totals, top users, the log's size and lag, the processor's state) once, shared by
//! every open console. The tail of accepted events takes at most 20 events a second, and only while a
//! console is open.
//!
//! Accepted and applied totals are on one basis, all time: applied is the store's checkpoint count,
//! accepted is applied plus the events in the log past the checkpoint (the file log; unknown on the
//! JetStream log, whose stream `eps status` reports).

mod series;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::Stream;
use serde::Serialize;
use tokio::sync::watch;

use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::clock::{mono_millis, wall_millis as now_millis};
use crate::event::EventRef;
use crate::log::measure::measure_past;
use crate::log::Appended;
use crate::store::FILE_STREAM;
use crate::telemetry::tally::{TallySnapshot, TALLY};
pub(crate) use series::{Point, Range};
use series::{Second, Series};

const INDEX_HTML: &str = include_str!("console/index.html");
const CONSOLE_CSS: &str = include_str!("console/console.css");
const CONSOLE_JS: &str = include_str!("console/console.js");

/// Events kept in the tail, and taken into it per second at most.
const TAIL_EVENTS: usize = 100;
const TAIL_PER_SECOND: i64 = 20;
/// Rows of the top users table.
const TOP_USERS: usize = 20;
/// A console counts as open this long after its last request (the page polls or streams far more often).
const OPEN_FOR_MILLIS: u64 = 30_000;
/// Lag up to this many bytes is counted in lines exactly; beyond, estimated from the lines counted.
const COUNT_LAG_BYTES: u64 = 1024 * 1024;
/// A processor that committed this recently is applying.
const RECENT_COMMIT_SECONDS: f64 = 5.0;

/// The console's shared state, in [`AppState`].
pub(crate) struct Console {
    accepted: AtomicU64,
    /// Until when (Unix ms) a console is open.
    open_until: AtomicU64,
    tail_budget: AtomicI64,
    tail_skipped: AtomicBool,
    tail: Mutex<Tail>,
    series: Mutex<Series>,
    /// The latest summary, for every open page; `None` until one was computed.
    latest: watch::Sender<Option<Arc<Summary>>>,
    /// Set at shutdown: streams end so the server can drain.
    closing: AtomicBool,
    /// The file log's directory (`None` with the JetStream log).
    pub(super) log_dir: Option<PathBuf>,
    /// The store's whole-table figures, kept between their spaced refreshes.
    store_figures: tokio::sync::Mutex<StoreFigures>,
}

/// How many times as long as its last refresh took the store's figures wait before the next one: their
/// queries (a count and sum over every user, the top users) then run at most 1/(1 + 59) of the time,
/// whatever the number of users. The spacing counts wall time, and a database may spread one query
/// over several processes (PostgreSQL's parallel workers: two by default, so three processes), so the
/// bound on CPU is 3/60 = 5 % of one core. Below ~17 ms a refresh they come every second, as the rest.
pub(super) const STORE_FIGURES_SPACING: u32 = 59;

/// The summary's figures that read the whole users table: users, total revenue, top users.
#[derive(Default)]
struct StoreFigures {
    users: Option<u64>,
    total_revenue: Option<String>,
    top_users: Vec<TopUser>,
    /// When they were read (Unix ms).
    read_at: Option<u64>,
    spacing: Spacing,
}

/// When a repeated, costly job is due again: not before `factor` times as long as it last took has
/// passed since it ended (a duty cycle of at most 1 / (1 + factor)).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Spacing {
    last: Option<(std::time::Instant, Duration)>,
}

impl Spacing {
    pub(super) fn due(&self, now: std::time::Instant, factor: u32) -> bool {
        self.last.is_none_or(|(ended, took)| now.saturating_duration_since(ended) >= took * factor)
    }

    pub(super) fn done(&mut self, started: std::time::Instant, ended: std::time::Instant) {
        self.last = Some((ended, ended.saturating_duration_since(started)));
    }
}

#[derive(Default)]
struct Tail {
    events: VecDeque<TailEvent>,
    next_seq: u64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct TailEvent {
    /// Increasing, to tell new events from ones already shown.
    seq: u64,
    #[serde(rename = "userId")]
    user_id: String,
    /// `add_revenue` or `subtract_revenue`.
    name: String,
    /// The exact decimal, as a string.
    value: String,
    /// When the server accepted it (Unix ms).
    ts: u64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct TopUser {
    #[serde(rename = "userId")]
    user_id: String,
    /// The exact decimal, as a string.
    revenue: String,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct LogSize {
    bytes: u64,
    segments: u64,
}

/// What the processor is doing, as the store shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ProcessorState {
    /// A processor committed in the last 5 s.
    Applying,
    /// No commit in the last 5 s, and nothing waits in the log (or, on the JetStream log, the wait is
    /// not known here).
    Idle,
    /// Events wait in the log and no processor committed in the last 5 s.
    Lagging,
    /// No processor has ever committed to this store.
    None,
}

/// The processor tile.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct ProcessorView {
    state: ProcessorState,
    /// Seconds since a processor last committed, by the database's clock (`null` before the first).
    last_commit_age_seconds: Option<f64>,
}

impl ProcessorView {
    fn new(last_commit_age_seconds: Option<f64>, lag_events: Option<u64>) -> ProcessorView {
        let state = match (last_commit_age_seconds, lag_events) {
            (None, _) => ProcessorState::None,
            (Some(age), _) if age < RECENT_COMMIT_SECONDS => ProcessorState::Applying,
            (Some(_), Some(lag)) if lag > 0 => ProcessorState::Lagging,
            (Some(_), _) => ProcessorState::Idle,
        };
        ProcessorView { state, last_commit_age_seconds }
    }
}

/// Everything the console shows.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct Summary {
    /// When this summary was made (Unix ms).
    now: u64,
    /// The same moment on the monotonic clock: what freshness is judged by.
    #[serde(skip)]
    made_at: u64,
    /// The range of `series` asked for (`range=`; 5 minutes when not given).
    range: Range,
    /// Seconds each point of `series` covers: 1 (5 minutes), 10 (an hour) or 60 (24 hours).
    step_seconds: u32,
    /// What happened in each interval of the range, oldest first: events accepted and applied, 4xx and
    /// 5xx answers, the ingest routes' p99 latency. Counts are per interval: divide by `step_seconds`
    /// for a rate.
    series: Vec<Point>,
    /// Events accepted (stored in the log) over all time: `applied_total` plus `lag_events` (the
    /// events in the log past the processor's checkpoint). `null` on the JetStream log (its stream's
    /// counts are in `eps status`) and while the database is unreachable.
    accepted_total: Option<u64>,
    /// True when `accepted_total` and `lag_events` are estimates: past the first MiB after the
    /// checkpoint, the log's lines are estimated from those counted.
    accepted_estimated: bool,
    /// Events accepted by this server since it started (the rate's counter).
    accepted_since_start: u64,
    /// Events applied by the processor, over all time: the checkpoints' count (on the file log, the
    /// same checkpoint `lag_events` counts from; `null` while the database is unreachable).
    applied_total: Option<u64>,
    /// Events in the log the processor has not applied yet (file log; `null` otherwise or unknown).
    lag_events: Option<u64>,
    /// Age of the oldest event not applied yet, in seconds (0 when caught up; `null` when unknown).
    lag_seconds: Option<f64>,
    /// The file log's size on disk (`null` with the JetStream log).
    log: Option<LogSize>,
    /// Users with a revenue (`null` until the store was first read; while the database is
    /// unreachable, the last reading, as of `store_figures_at`).
    users: Option<u64>,
    /// The sum of all revenues, exact (as `users`).
    total_revenue: Option<String>,
    /// The 20 users with the highest revenue, highest first.
    top_users: Vec<TopUser>,
    /// When `users`, `total_revenue` and `top_users` were read (Unix ms). They read the whole users
    /// table, so they are refreshed no sooner than 19 times as long as their last reading took: with
    /// many users they can be some seconds older than `now`.
    store_figures_at: Option<u64>,
    /// The latest accepted events, oldest first (at most 100).
    tail: Vec<TailEvent>,
    /// True when the tail holds a sample: more events arrived than it takes (20 a second).
    tail_sampled: bool,
    /// The processor's state, from the store's checkpoints and the lag (`null` while the database is
    /// unreachable).
    processor: Option<ProcessorView>,
}

impl Summary {
    /// This summary with the points of `range`.
    fn with_series(&self, console: &Console, range: Range) -> Summary {
        let mut summary = self.clone();
        summary.series = console.series.lock().expect("console series").points(range);
        summary.range = range;
        summary.step_seconds = range.step_seconds();
        summary
    }
}

impl Console {
    pub(crate) fn new(log_dir: Option<PathBuf>) -> Console {
        Console {
            accepted: AtomicU64::new(0),
            open_until: AtomicU64::new(0),
            tail_budget: AtomicI64::new(TAIL_PER_SECOND),
            tail_skipped: AtomicBool::new(false),
            tail: Mutex::new(Tail::default()),
            series: Mutex::new(Series::default()),
            latest: watch::channel(None).0,
            closing: AtomicBool::new(false),
            log_dir,
            store_figures: tokio::sync::Mutex::default(),
        }
    }

    fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Relaxed) > mono_millis()
    }

    fn mark_open(&self) {
        self.open_until.store(mono_millis() + OPEN_FOR_MILLIS, Ordering::Relaxed);
    }

    /// Counts events the log stored.
    pub(crate) fn accepted(&self, events: u64) {
        self.accepted.fetch_add(events, Ordering::Relaxed);
    }

    /// A sampler for one request's events, or `None` (nothing to do) when no console is open.
    pub(crate) fn sampler(&self) -> Option<TailSampler> {
        self.is_open().then(TailSampler::default)
    }

    /// Adds a request's sampled events to the tail once the log answered, those it stored (not the
    /// duplicates it dropped).
    pub(crate) fn push_tail(&self, sampler: TailSampler, answers: &[Appended]) {
        if sampler.events.is_empty() {
            return;
        }
        let mut tail = self.tail.lock().expect("console tail");
        for (index, mut event) in sampler.events {
            if answers.get(index) != Some(&Appended::Stored) {
                continue;
            }
            event.seq = tail.next_seq;
            tail.next_seq += 1;
            tail.events.push_back(event);
        }
        while tail.events.len() > TAIL_EVENTS {
            tail.events.pop_front();
        }
    }

    /// Ends the event streams (at shutdown).
    pub(crate) fn close(&self) {
        self.closing.store(true, Ordering::Relaxed);
        self.latest.send_replace(None);
    }
}

/// Takes a request's events into the tail within the per-second budget.
#[derive(Default)]
pub(crate) struct TailSampler {
    /// Each event with its index in the request's batch.
    events: Vec<(usize, TailEvent)>,
}

impl TailSampler {
    /// Offers the request's event number `index` (its place in the batch appended).
    pub(crate) fn offer(&mut self, console: &Console, index: usize, event: &EventRef<'_>, ts: u64) {
        // Loads before writes: once the second's budget is spent, requests only read shared state.
        if console.tail_budget.load(Ordering::Relaxed) <= 0 || console.tail_budget.fetch_sub(1, Ordering::Relaxed) <= 0
        {
            if !console.tail_skipped.load(Ordering::Relaxed) {
                console.tail_skipped.store(true, Ordering::Relaxed);
            }
            return;
        }
        self.events.push((
            index,
            TailEvent {
                seq: 0,
                user_id: event.user_id().to_string(),
                name: event.kind().as_str().to_string(),
                value: event.value().normalize().to_string(),
                ts,
            },
        ));
    }
}

/// Once a second: a chart point, the tail's budget, and (while a console is open) a new summary.
pub(crate) async fn run_sampler(state: Arc<AppState>) {
    let console = &state.console;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<(u64, Option<u64>, TallySnapshot)> = None;
    let mut skipped_recently = 0u32;
    loop {
        tick.tick().await;
        if console.closing.load(Ordering::Relaxed) {
            return;
        }
        let accepted = console.accepted.load(Ordering::Relaxed);
        let applied = match state.store.get() {
            Some(store) => {
                tokio::time::timeout(Duration::from_millis(800), store.events_applied()).await.ok().and_then(Result::ok)
            }
            None => None,
        };
        let requests = TALLY.snapshot();
        if let Some((last_accepted, last_applied, last_requests)) = &last {
            let second = Second {
                t: now_millis(),
                accepted: accepted - last_accepted,
                applied: match (applied, last_applied) {
                    (Some(now), Some(before)) => Some(now.saturating_sub(*before)),
                    _ => None,
                },
                requests: requests.since(last_requests),
            };
            console.series.lock().expect("console series").push(second);
        }
        last = Some((accepted, applied, requests));
        // The tail's sample flag stays up for 5 s after events were skipped.
        skipped_recently =
            if console.tail_skipped.swap(false, Ordering::Relaxed) { 5 } else { skipped_recently.saturating_sub(1) };
        console.tail_budget.store(TAIL_PER_SECOND, Ordering::Relaxed);
        if console.is_open() {
            let summary = summarize(&state, accepted, applied, skipped_recently > 0).await;
            console.latest.send_replace(Some(Arc::new(summary)));
        }
    }
}

/// The summary every open console shares, without its series (added per range by
/// [`Summary::with_series`]).
async fn summarize(
    state: &AppState,
    accepted_since_start: u64,
    applied_total: Option<u64>,
    tail_sampled: bool,
) -> Summary {
    let console = &state.console;
    let tail: Vec<TailEvent> = console.tail.lock().expect("console tail").events.iter().cloned().collect();
    let mut summary = Summary {
        now: now_millis(),
        made_at: mono_millis(),
        range: Range::default(),
        step_seconds: Range::default().step_seconds(),
        series: Vec::new(),
        accepted_total: None,
        accepted_estimated: false,
        accepted_since_start,
        applied_total,
        lag_events: None,
        lag_seconds: None,
        log: None,
        users: None,
        total_revenue: None,
        top_users: Vec::new(),
        store_figures_at: None,
        tail,
        tail_sampled,
        processor: None,
    };
    let Some(store) = state.store.get() else { return summary };
    {
        let mut figures = console.store_figures.lock().await;
        let started = std::time::Instant::now();
        if figures.spacing.due(started, STORE_FIGURES_SPACING) {
            let (totals, top) = (store.totals().await, store.top_users(TOP_USERS).await);
            if let (Ok(totals), Ok(top)) = (totals, top) {
                figures.users = Some(totals.users);
                figures.total_revenue = Some(totals.revenue.to_string());
                figures.top_users =
                    top.into_iter().map(|(user_id, r)| TopUser { user_id, revenue: r.to_string() }).collect();
                figures.read_at = Some(now_millis());
                // Spaced after a success only: a failed reading (the database away) is tried again at
                // the next second, not after 19 times its timeout.
                figures.spacing.done(started, std::time::Instant::now());
            }
        }
        summary.users = figures.users;
        summary.total_revenue = figures.total_revenue.clone();
        summary.top_users = figures.top_users.clone();
        summary.store_figures_at = figures.read_at;
    }
    if let Some(dir) = console.log_dir.clone() {
        if let Ok(progress) = store.progress(FILE_STREAM).await {
            let view = tokio::task::spawn_blocking(move || file_log_view(&dir, progress.position)).await;
            if let Ok(Ok(view)) = view {
                summary.log = Some(LogSize { bytes: view.bytes, segments: view.segments });
                // Applied and accepted from the same checkpoint row: one basis.
                summary.applied_total = Some(progress.events_applied);
                summary.accepted_total = Some(progress.events_applied + view.lag_events);
                summary.accepted_estimated = view.lag_estimated;
                summary.lag_events = Some(view.lag_events);
                summary.lag_seconds =
                    Some(view.oldest_unapplied.map_or(0.0, |ts| now_millis().saturating_sub(ts) as f64 / 1000.0));
            }
        }
    }
    if let Ok(age) = store.last_commit_age().await {
        summary.processor = Some(ProcessorView::new(age, summary.lag_events));
    }
    summary
}

pub(super) struct LogView {
    pub(super) bytes: u64,
    pub(super) segments: u64,
    /// Bytes after the checkpoint.
    pub(super) lag_bytes: u64,
    pub(super) lag_events: u64,
    /// True when `lag_events` is estimated (more than 1 MiB after the checkpoint).
    pub(super) lag_estimated: bool,
    /// `ts` of the first line after the checkpoint, if there is one.
    pub(super) oldest_unapplied: Option<u64>,
}

/// The file log's size, and what lies after the checkpoint: lines (counted up to 1 MiB of lag,
/// estimated beyond from the lines counted) and the acceptance time of the first one.
pub(super) fn file_log_view(dir: &std::path::Path, checkpoint: u64) -> std::io::Result<LogView> {
    let past = measure_past(dir, checkpoint, COUNT_LAG_BYTES)?;
    // No first line: empty, not JSON, no `ts`.
    let oldest_unapplied = serde_json::from_slice::<serde_json::Value>(&past.first_line)
        .ok()
        .and_then(|line| line.get("ts").and_then(serde_json::Value::as_u64));
    Ok(LogView {
        bytes: past.log_bytes,
        segments: past.segments as u64,
        lag_bytes: past.bytes_after,
        lag_events: past.lines_after(),
        lag_estimated: past.lines_estimated(),
        oldest_unapplied,
    })
}

/// The latest summary, made now if none is fresh (the first request of a newly opened console).
async fn current_summary(state: &AppState) -> Arc<Summary> {
    let console = &state.console;
    console.mark_open();
    if let Some(summary) = console.latest.borrow().clone() {
        if mono_millis().saturating_sub(summary.made_at) < 2_000 {
            return summary;
        }
    }
    let accepted = console.accepted.load(Ordering::Relaxed);
    let applied = match state.store.get() {
        Some(store) => store.events_applied().await.ok(),
        None => None,
    };
    let sampled = console.tail_skipped.load(Ordering::Relaxed);
    let summary = Arc::new(summarize(state, accepted, applied, sampled).await);
    console.latest.send_replace(Some(summary.clone()));
    summary
}

/// The query of a console request.
#[derive(serde::Deserialize)]
pub(super) struct RangeQuery {
    range: Option<String>,
}

/// The `range=` of a console request (5 minutes when not given).
fn range_of(query: Result<Query<RangeQuery>, QueryRejection>) -> Result<Range, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(format!("query: {}", e.body_text())))?;
    match query.range {
        None => Ok(Range::default()),
        Some(text) => Range::parse(&text)
            .ok_or_else(|| ApiError::BadRequest(format!("range must be 5m, 1h or 24h (got {text:?})"))),
    }
}

#[utoipa::path(
    get, path = "/console/summary", tag = "console",
    security(("token" = [])),
    params(("range" = Option<Range>, Query, description = "The chart's range: `5m` (one point a second, the default), `1h` (one per 10 s) or `24h` (one a minute)")),
    responses(
        (status = 200, description = "What the console shows: the range's points (rates, 4xx/5xx, ingest p99), totals on one basis, lag, the processor's state, log, users, top users, tail", body = Summary),
        (status = 400, description = "A range other than 5m, 1h or 24h", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "The token is known but does not hold the scope this route needs (see docs/SECURITY.md)", body = ErrorBody),
    )
)]
/// `GET /console/summary`: the console's data now.
pub(super) async fn summary(
    State(state): State<Arc<AppState>>,
    query: Result<Query<RangeQuery>, QueryRejection>,
) -> Result<Json<Summary>, ApiError> {
    let range = range_of(query)?;
    Ok(Json(current_summary(&state).await.with_series(&state.console, range)))
}

/// One event of `GET /console/stream`, for the OpenAPI document (OpenAPI 3.1 has the schema of a
/// `text/event-stream` describe each event): `event: summary`, and `data` the JSON text of a [`Summary`]
/// (`contentMediaType` and `contentSchema` say so, so a checker parses and checks it).
pub(super) struct SummaryEvent;

impl utoipa::PartialSchema for SummaryEvent {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::extensions::Extensions;
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        let mut content_schema = Extensions::default();
        content_schema.insert("contentSchema".into(), serde_json::json!({"$ref": "#/components/schemas/Summary"}));
        ObjectBuilder::new()
            .property("event", ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["summary"])))
            .required("event")
            .property(
                "data",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .content_media_type("application/json")
                    .extensions(Some(content_schema))
                    .description(Some("The JSON of GET /console/summary")),
            )
            .required("data")
            .into()
    }
}

impl utoipa::ToSchema for SummaryEvent {}

#[utoipa::path(
    get, path = "/console/stream", tag = "console",
    security(("token" = [])),
    params(("range" = Option<Range>, Query, description = "The chart's range: `5m` (the default), `1h` or `24h`")),
    responses(
        (status = 200, description = "Server-Sent Events: an `event: summary` whose data is the JSON of GET /console/summary (with the same range), about every second, until the server stops",
         content_type = "text/event-stream", body = inline(SummaryEvent)),
        (status = 400, description = "A range other than 5m, 1h or 24h", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "The token is known but does not hold the scope this route needs (see docs/SECURITY.md)", body = ErrorBody),
    )
)]
/// `GET /console/stream`: the summary pushed as Server-Sent Events about every second.
pub(super) async fn stream(
    State(state): State<Arc<AppState>>,
    query: Result<Query<RangeQuery>, QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let range = range_of(query)?;
    let first = current_summary(&state).await;
    let rx = state.console.latest.subscribe();
    let events = futures::stream::unfold((Some(first), rx, state), move |(first, mut rx, state)| async move {
        let summary = match first {
            Some(summary) => summary,
            None => {
                rx.changed().await.ok()?;
                let next = rx.borrow_and_update().clone()?;
                next
            }
        };
        state.console.mark_open();
        let data = serde_json::to_string(&summary.with_series(&state.console, range)).unwrap_or_default();
        Some((Ok(SseEvent::default().event("summary").data(data)), (None, rx, state)))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// The console's Content-Security-Policy: the page loads its one script and one stylesheet from this
/// server (no inline script or style, no `eval`), draws on a canvas, fetches only from this server,
/// and may not be framed (clickjacking), nor given a `<base>` or plugins.
pub(crate) const CONSOLE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// A console resource with its security headers: the CSP, no MIME sniffing, no framing (also for
/// browsers without `frame-ancestors`), no referrer.
fn console_response(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CONSOLE_CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}

/// `GET /`: the console page (nothing secret in it: the data needs the token).
pub(super) async fn index() -> Response {
    console_response("text/html; charset=utf-8", INDEX_HTML)
}

pub(super) async fn css() -> Response {
    console_response("text/css; charset=utf-8", CONSOLE_CSS)
}

pub(super) async fn js() -> Response {
    console_response("text/javascript; charset=utf-8", CONSOLE_JS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_log(dir: &std::path::Path, lines: &[&str]) {
        std::fs::create_dir_all(dir).unwrap();
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(dir.join(crate::log::segment_name(0)), text).unwrap();
    }

    #[test]
    fn whole_table_readings_are_spaced_by_59_times_what_the_last_one_took() {
        let t0 = std::time::Instant::now();
        let ms = Duration::from_millis;
        let mut spacing = Spacing::default();
        assert!(spacing.due(t0, STORE_FIGURES_SPACING), "the first reading is due at once");
        // A 5 ms reading (a small table): due again at the next second's tick.
        spacing.done(t0, t0 + ms(5));
        assert!(spacing.due(t0 + ms(1005), STORE_FIGURES_SPACING));
        // A 300 ms reading (a million users): not before 59 × 300 ms = 17.7 s after it ended.
        spacing.done(t0, t0 + ms(300));
        for second in 1..=17 {
            assert!(!spacing.due(t0 + ms(300 + 1000 * second), STORE_FIGURES_SPACING), "{second} s after");
        }
        // Then due: busy at most 300 ms out of every 300 + 17,700, 1/60 of the time.
        assert!(spacing.due(t0 + ms(300 + 17_700), STORE_FIGURES_SPACING));
    }

    #[test]
    fn the_log_view_counts_what_is_after_the_checkpoint_and_its_age() {
        let dir = tempfile::tempdir().unwrap();
        let first = r#"{"userId":"a","name":"add_revenue","value":1,"ts":1000}"#;
        let second = r#"{"userId":"b","name":"add_revenue","value":2,"ts":2000}"#;
        write_log(dir.path(), &[first, second]);
        let all = file_log_view(dir.path(), 0).unwrap();
        assert_eq!((all.segments, all.lag_events, all.oldest_unapplied), (1, 2, Some(1000)));
        assert_eq!(all.bytes, (first.len() + second.len() + 2) as u64);
        let after_first = file_log_view(dir.path(), first.len() as u64 + 1).unwrap();
        assert_eq!((after_first.lag_events, after_first.oldest_unapplied), (1, Some(2000)));
        let caught_up = file_log_view(dir.path(), all.bytes).unwrap();
        assert_eq!((caught_up.lag_events, caught_up.oldest_unapplied), (0, None));
    }

    #[test]
    fn the_processor_state_follows_the_last_commit_and_the_lag() {
        let state = |age, lag| ProcessorView::new(age, lag).state;
        assert_eq!(state(None, Some(5)), ProcessorState::None);
        assert_eq!(state(None, None), ProcessorState::None);
        assert_eq!(state(Some(1.0), Some(5)), ProcessorState::Applying);
        assert_eq!(state(Some(60.0), Some(0)), ProcessorState::Idle);
        assert_eq!(state(Some(60.0), None), ProcessorState::Idle);
        assert_eq!(state(Some(60.0), Some(5)), ProcessorState::Lagging);
        let range = |query: &str| {
            let uri: axum::http::Uri = format!("/console/summary?{query}").parse().unwrap();
            range_of(Query::try_from_uri(&uri))
        };
        assert_eq!(range("").unwrap(), Range::FiveMinutes);
        assert_eq!(range("x=1&range=24h").unwrap(), Range::Day);
        assert_eq!(range("range=%31h").unwrap(), Range::Hour);
        assert!(range("range=2d").is_err());
    }

    #[test]
    fn the_tail_takes_twenty_events_a_second_and_keeps_the_last_hundred() {
        let console = Console::new(None);
        assert!(console.sampler().is_none(), "no console open: nothing sampled");
        console.mark_open();
        let event = EventRef::parse_request(br#"{"userId":"u","name":"add_revenue","value":1.50}"#).unwrap();
        let mut sampler = console.sampler().unwrap();
        for i in 0..30 {
            sampler.offer(&console, i, &event, 7);
        }
        assert!(console.tail_skipped.load(Ordering::Relaxed));
        // The log dropped event 3 as a duplicate: it is not in the tail.
        let mut answers = vec![Appended::Stored; 30];
        answers[3] = Appended::Duplicate;
        console.push_tail(sampler, &answers);
        let tail = console.tail.lock().unwrap();
        assert_eq!(tail.events.len(), 19);
        assert_eq!((tail.events[0].value.as_str(), tail.events[0].name.as_str()), ("1.5", "add_revenue"));
        drop(tail);
        for _ in 0..10 {
            console.tail_budget.store(TAIL_PER_SECOND, Ordering::Relaxed);
            let mut sampler = console.sampler().unwrap();
            for i in 0..20 {
                sampler.offer(&console, i, &event, 8);
            }
            console.push_tail(sampler, &[Appended::Stored; 20]);
        }
        let tail = console.tail.lock().unwrap();
        assert_eq!(tail.events.len(), TAIL_EVENTS);
        let seqs: Vec<u64> = tail.events.iter().map(|e| e.seq).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1) && *seqs.last().unwrap() == 218);
    }
}
