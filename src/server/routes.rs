//! The HTTP routes: the seed's `POST /liveEvent` and `GET /userEvents/{userId}`.
//!
//! Order of checks on ingest: token and scope (the layer of [`super::auth::guard`], before the
//! handler), content type, content encoding and body size (of the decompressed body), event validity,
//! the token's rate limit, then the durable append.
//! Nothing is written unless every check passed, and 200 is only sent after the log's sync.
//! The OpenAPI document gathers these handlers' annotations in `openapi.rs`.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::{Extension, Json};
use serde::Serialize;

use super::auth::Grant;
use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::event::{EventRef, UserId};
use crate::log::{Appended, LogBatch};

/// JSON or nothing: a missing Content-Type is taken as JSON (old clients omit it); any other is refused.
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    require_media_type(headers, |mime| {
        mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
    })
}

/// A batch is JSON Lines: `application/x-ndjson` (and its aliases), JSON, plain text, or no Content-Type.
fn require_json_lines(headers: &HeaderMap) -> Result<(), ApiError> {
    const ACCEPTED: &[&str] =
        &["application/x-ndjson", "application/jsonl", "application/json-lines", "application/json", "text/plain"];
    require_media_type(headers, |mime| ACCEPTED.contains(&mime))
}

/// Checks the Content-Type's media type (lower-cased, parameters dropped) with `accepts`; a request
/// without Content-Type passes. Refusals (415) quote the header as sent.
fn require_media_type(headers: &HeaderMap, accepts: impl Fn(&str) -> bool) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else { return Ok(()) };
    let text = value.to_str().unwrap_or("").to_ascii_lowercase();
    let mime = text.split(';').next().unwrap_or("").trim();
    if accepts(mime) {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType(text))
    }
}

/// Reads the whole body, within the size limit (413) and the time limit (408: slow-loris bodies). A
/// `Content-Encoding: gzip` body is decompressed, and the limit applies to the decompressed bytes as
/// they are produced (see [`gunzip`]).
async fn body_bytes(state: &AppState, headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let gzip = content_encoding(headers)?;
    let too_large = || ApiError::PayloadTooLarge(format!("request body larger than the limit of {limit} bytes"));
    let bytes = match tokio::time::timeout(state.body_timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => {
            return Err(ApiError::RequestTimeout(format!("request body not received within {:?}", state.body_timeout)))
        }
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            let inner = e.into_inner();
            return if inner.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                Err(too_large())
            } else {
                Err(ApiError::BadRequest(format!("cannot read the request body: {inner}")))
            };
        }
    };
    if !gzip {
        return Ok(bytes);
    }
    // CPU work bounded by the limit (below): off the async workers.
    tokio::task::spawn_blocking(move || gunzip(&bytes, limit))
        .await
        .map_err(|e| ApiError::BadRequest(format!("cannot decompress the request body: {e}")))?
}

/// `true` for `Content-Encoding: gzip` (or `x-gzip`); `false` without one (or `identity`); 415 for
/// any other coding, or several.
fn content_encoding(headers: &HeaderMap) -> Result<bool, ApiError> {
    let Some(value) = headers.get(header::CONTENT_ENCODING) else { return Ok(false) };
    let text = String::from_utf8_lossy(value.as_bytes()).trim().to_ascii_lowercase();
    match text.as_str() {
        "identity" => Ok(false),
        "gzip" | "x-gzip" => Ok(true),
        _ => Err(ApiError::UnsupportedEncoding(text)),
    }
}

/// Decompresses a gzip body (one or more members) into at most `limit` bytes: decompression stops at
/// the first byte past the limit (413), so a compression bomb costs at most the limit's worth of
/// memory and work; a stream that is truncated or not gzip is a 400.
fn gunzip(compressed: &[u8], limit: usize) -> Result<Bytes, ApiError> {
    use std::io::Read;
    let decoder = flate2::read::MultiGzDecoder::new(compressed);
    let mut out = Vec::with_capacity(compressed.len().saturating_mul(4).min(limit).saturating_add(1));
    decoder.take(limit as u64 + 1).read_to_end(&mut out).map_err(|e| {
        ApiError::BadRequest(format!("the gzip body cannot be decompressed (truncated or not gzip): {e}"))
    })?;
    if out.len() > limit {
        return Err(ApiError::PayloadTooLarge(format!(
            "request body larger than the limit of {limit} bytes once decompressed"
        )));
    }
    Ok(Bytes::from(out))
}

/// The seed's answer, plus `duplicate: true` when the event id was already stored.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct Received {
    /// Always "Event received".
    #[schema(example = "Event received")]
    message: &'static str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    #[schema(required = false)]
    duplicate: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct UserRevenue {
    #[serde(rename = "userId")]
    user_id: String,
    /// The exact decimal as a string (JSON numbers are read as floats by most clients), of any size:
    /// totals are not bounded, only each event's value is.
    #[schema(example = "50")]
    revenue: String,
}

/// One event, as `POST /liveEvent` takes it (documentation only: parsing is `Event::parse_request`).
/// Fields other than these four are refused.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub(super) struct EventBody {
    /// 1 to 255 bytes of UTF-8, no control characters.
    #[serde(rename = "userId")]
    #[schema(example = "user1", min_length = 1, max_length = 255, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]+$")]
    user_id: String,
    #[schema(inline, example = "add_revenue")]
    name: crate::event::EventKind,
    #[schema(schema_with = value_schema)]
    value: String,
    /// Idempotency key: a repeat within the server's window is answered `duplicate` and not stored.
    #[schema(min_length = 1, max_length = 128, required = false, example = "9f2c4e61a0b3d7e8-1")]
    id: Option<String>,
}

/// The schema of an event's `value`: exactly the JSON numbers `event::parse_decimal_number` takes, so
/// a schema-valid value is never refused and a refused one is never schema-valid. The rule is "at
/// least 0, at most 28 significant digits and 28 decimal places, and a `Decimal` can hold it"; JSON
/// Schema has no keyword for digits, but a number of magnitude [10^k, 10^(k+1)) has at most 28
/// significant digits exactly when it is a multiple of 10^(k-27), and at most 28 places exactly when it
/// is a multiple of 10^-28; so one band per magnitude, each with its `multipleOf`. (`multipleOf` is
/// about the number's exact value; schemathesis reads it so.) The top band ends at 7.922816251426433e28,
/// the largest number a double's shortest text writes below `Decimal::MAX`: every number a JSON
/// encoder writes from a double above it is refused, and only 17-digit-or-longer spellings between
/// it and `Decimal::MAX` (79228162514264337593543950335) are accepted by the server but not here.
fn value_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{AnyOfBuilder, ObjectBuilder, Type};
    let band = |minimum: f64, exclusive: Option<f64>, maximum: Option<f64>, step: f64| {
        ObjectBuilder::new()
            .schema_type(Type::Number)
            .minimum(Some(minimum))
            .exclusive_maximum(exclusive)
            .maximum(maximum)
            .multiple_of(Some(step))
    };
    let mut bands = AnyOfBuilder::new().item(band(0.0, Some(1.0), None, 1e-28));
    for k in 0..28 {
        let low: f64 = format!("1e{k}").parse().expect("a power of ten");
        let high: f64 = format!("1e{}", k + 1).parse().expect("a power of ten");
        let step: f64 = format!("1e{}", k - 27).parse().expect("a power of ten");
        bands = bands.item(band(low, Some(high), None, step));
    }
    bands = bands.item(band(1e28, None, Some(7.922816251426433e28), 10.0));
    bands
        .description(Some(
            "A JSON number >= 0 with at most 28 significant digits and at most 28 decimal places, below 7.9e28 \
             (what an exact 96-bit decimal holds): read from the number's text, never through a float.",
        ))
        .examples([serde_json::json!(100), serde_json::json!(12.5)])
        .into()
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct Health {
    #[schema(example = "ok")]
    status: String,
    /// The identity of the log this server appends to (the file log's id, or the JetStream stream's
    /// name and creation time); null while not known (the stream not reached yet). A producer binds
    /// its checkpoint to it: a log that is not the one that acknowledged its lines is sent them again.
    #[schema(example = "file log 5f0c2b9e8d7a4c1e9b3f6a2d4e8c1b7a")]
    log: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct Readiness {
    /// "ready" or "not ready".
    status: String,
    /// "ok", or why the log cannot take events.
    log: String,
    /// "ok", or why the database cannot be reached.
    database: String,
    /// With the JetStream log, once the stream was found: what a 200 promises (the connected
    /// nats-server's version, the stream's replicas, whether the servers sync before acknowledging).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    jetstream: Option<crate::log::nats_promise::Promise>,
}

#[utoipa::path(
    post, path = "/liveEvent", tag = "events",
    security(("token" = [])),
    request_body(content = EventBody, content_type = "application/json",
        description = "The event; may be sent with Content-Encoding: gzip (the size limit applies to the decompressed body)"),
    responses(
        (status = 200, description = "The event is on stable storage (or its id already was)", body = Received),
        (status = 400, description = "Not a valid event, or a gzip body that is truncated or not gzip", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "The token is known but does not hold the scope this route needs (see docs/SECURITY.md)", body = ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = ErrorBody),
        (status = 409, description = "The id is already stored with other content (userId, name or value), or (ids of the \
         producer scheme) its producer holds the most sequence ranges allowed: nothing stored, and a retry is refused the same way", body = ErrorBody),
        (status = 413, description = "Body larger than the limit (decompressed), or (JetStream log) the event larger than the NATS server's max_payload", body = ErrorBody),
        (status = 415, description = "Content-Type is not JSON, or Content-Encoding is neither gzip nor absent", body = ErrorBody),
        (status = 429, description = "The token's rate limit is reached: nothing stored; retry after Retry-After seconds", body = ErrorBody,
         headers(("Retry-After" = u32, description = "Seconds to wait"))),
        (status = 503, description = "The log cannot be written now; retry after Retry-After seconds", body = ErrorBody,
         headers(("Retry-After" = u32, description = "Seconds to wait"))),
    )
)]
pub(super) async fn live_event(
    State(state): State<Arc<AppState>>,
    Extension(grant): Extension<Grant>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Received>, ApiError> {
    require_json(&headers)?;
    let body = body_bytes(&state, &headers, body, state.body_limit).await?;
    let event = EventRef::parse_request(&body)?;
    grant.charge(1, "/liveEvent")?;
    let ts = crate::clock::wall_millis();
    let mut batch = LogBatch::with_capacity(1);
    batch.push(&event, ts);
    let mut sampler = state.console.sampler();
    if let Some(sampler) = sampler.as_mut() {
        sampler.offer(&state.console, 0, &event, ts);
    }
    let answer = state.log.append(batch).await?;
    if let Some(why) = answer.first().and_then(|a| refusal(*a, event.id().unwrap_or_default())) {
        return Err(ApiError::Conflict(why));
    }
    let duplicate = answer.first() == Some(&Appended::Duplicate);
    if !duplicate {
        state.console.accepted(1);
    }
    if let Some(sampler) = sampler {
        state.console.push_tail(sampler, &answer);
    }
    Ok(Json(Received { message: "Event received", duplicate }))
}

/// The body of `POST /events` as its schema describes it (documentation only: parsing is line by line
/// in [`post_events`]): the lines' JSON values as an array, OpenAPI 3.2's reading of JSON Lines.
pub(super) struct EventLines;

impl utoipa::PartialSchema for EventLines {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::extensions::Extensions;
        use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, SchemaType};
        let mut contains = Extensions::default();
        contains.insert("contains".into(), serde_json::json!({"$ref": "#/components/schemas/EventBody"}));
        ArrayBuilder::new()
            .items(ObjectBuilder::new().schema_type(SchemaType::AnyValue))
            .max_items(Some(MAX_BATCH_EVENTS))
            .extensions(Some(contains))
            .examples([serde_json::json!([
                {"userId": "user1", "name": "add_revenue", "value": 100, "id": "run7-1"},
                {"userId": "user2", "name": "add_revenue", "value": 200, "id": "run7-2"},
            ])])
            .into()
    }
}

impl utoipa::ToSchema for EventLines {}

/// Most events one `POST /events` may carry.
pub const MAX_BATCH_EVENTS: usize = 10_000;

/// The answer to `POST /events`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct BatchReceived {
    /// Valid events now on stable storage: stored by this request or already stored (duplicates).
    accepted: usize,
    /// Of the accepted, those whose `id` the log already had: not stored again.
    duplicates: usize,
    /// Lines not stored: not valid events, or (a conflict, what `POST /liveEvent` answers 409) an id
    /// already stored with other content. Each is listed in `errors`, by line.
    rejected: usize,
    errors: Vec<LineError>,
}

/// The answer to a `POST /events` of which nothing could be stored.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct BatchRefused {
    /// What is wrong with the request as a whole.
    error: String,
    /// Lines that are not valid events (0 when the body holds no event at all).
    rejected: usize,
    errors: Vec<LineError>,
}

/// Why one line of a batch was not stored.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct LineError {
    /// 1-based line number in the request body (blank lines count).
    #[schema(example = 3)]
    line: usize,
    error: String,
}

#[utoipa::path(
    post, path = "/events", tag = "events",
    security(("token" = [])),
    request_body(
        description = "JSON Lines: one JSON value per line, each line checked as POST /liveEvent checks its body; \
                       blank lines are skipped. The schema describes the body as an array of the lines' values, \
                       as OpenAPI 3.2 reads a sequential media type: at most 10,000 lines, at least one a valid \
                       event (the others are refused line by line, in the answer). The same body is accepted as \
                       application/jsonl, application/json-lines, application/json, text/plain or without Content-Type, and may be \
                       sent with Content-Encoding: gzip (the size limit applies to the decompressed body).",
        content((inline(EventLines) = "application/x-ndjson")),
    ),
    responses(
        (status = 200, description = "Every valid line is on stable storage (in one sync); invalid lines, and lines whose id is \
         already stored with other content (a conflict), are listed in errors and not stored", body = BatchReceived),
        (status = 400, description = "No line is a valid event, or the body holds no event: nothing stored", body = BatchRefused),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "The token is known but does not hold the scope this route needs (see docs/SECURITY.md)", body = ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = ErrorBody),
        (status = 413, description = "Body larger than the limit (decompressed), more than 10,000 events, more events than the token's rate-limit burst, or (JetStream log) an event larger than the NATS server's max_payload", body = ErrorBody),
        (status = 415, description = "Content-Type is not JSON Lines, or Content-Encoding is neither gzip nor absent", body = ErrorBody),
        (status = 429, description = "The token's rate limit cannot take the batch's events now: nothing stored; retry after Retry-After seconds", body = ErrorBody,
         headers(("Retry-After" = u32, description = "Seconds to wait"))),
        (status = 503, description = "The log cannot be written now: nothing of the batch is acknowledged; retry after Retry-After seconds", body = ErrorBody,
         headers(("Retry-After" = u32, description = "Seconds to wait"))),
    )
)]
/// `POST /events`: many events in one request and one durable append. Each line is checked like a
/// `POST /liveEvent` body; valid lines are stored (all in the same group commit), invalid ones are
/// reported by line number and change nothing.
pub(super) async fn post_events(
    State(state): State<Arc<AppState>>,
    Extension(grant): Extension<Grant>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<BatchReceived>, BatchError> {
    require_json_lines(&headers)?;
    let body = body_bytes(&state, &headers, body, state.batch_body_limit).await?;
    let ts = crate::clock::wall_millis();
    let mut batch = LogBatch::with_capacity(body.len() / 64 + 1);
    let mut errors = Vec::new();
    let mut sampler = state.console.sampler();
    // The body's line (0-based) of each event in the batch, to name a line the log refuses.
    let mut line_of = Vec::with_capacity(body.len() / 64 + 1);
    for (index, line) in body.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if batch.len() + errors.len() == MAX_BATCH_EVENTS {
            return Err(ApiError::PayloadTooLarge(format!(
                "a batch holds at most {MAX_BATCH_EVENTS} events; split it"
            ))
            .into());
        }
        match EventRef::parse_request(line) {
            Ok(event) => {
                if let Some(sampler) = sampler.as_mut() {
                    sampler.offer(&state.console, batch.len(), &event, ts);
                }
                batch.push(&event, ts);
                line_of.push(index);
            }
            Err(e) => errors.push(LineError { line: index + 1, error: e.to_string() }),
        }
    }
    let invalid = errors.len();
    if batch.is_empty() {
        let error = if errors.is_empty() {
            "the body holds no event (JSON Lines: one event per line)".to_string()
        } else {
            format!("none of the {invalid} lines is a valid event; nothing was stored")
        };
        return Err(BatchError::Refused(BatchRefused { error, rejected: invalid, errors }));
    }
    // A batch costs its events: refused whole (nothing stored) if the token's limit cannot take them.
    grant.charge(batch.len(), "/events")?;
    let answers = state.log.append(batch).await?;
    let duplicates = answers.iter().filter(|a| **a == Appended::Duplicate).count();
    let stored = answers.iter().filter(|a| **a == Appended::Stored).count();
    if stored + duplicates < answers.len() {
        // Rare (conflicts): find the refused lines' ids again to name them.
        let lines: Vec<&[u8]> = body.split(|&b| b == b'\n').collect();
        for (answer, &index) in answers.iter().zip(&line_of) {
            let line = lines.get(index).map(|l| l.strip_suffix(b"\r").unwrap_or(l)).unwrap_or_default();
            let id = EventRef::parse_request(line).ok().and_then(|e| e.id().map(str::to_owned));
            if let Some(why) = refusal(*answer, id.as_deref().unwrap_or_default()) {
                errors.push(LineError { line: index + 1, error: why });
            }
        }
        errors.sort_by_key(|e| e.line);
    }
    state.console.accepted(stored as u64);
    if let Some(sampler) = sampler {
        state.console.push_tail(sampler, &answers);
    }
    Ok(Json(BatchReceived { accepted: stored + duplicates, duplicates, rejected: errors.len(), errors }))
}

/// Why the log refused an event (409 for `POST /liveEvent`, a line error in a batch), or `None` if it
/// took it (stored or a duplicate).
fn refusal(answer: Appended, id: &str) -> Option<String> {
    match answer {
        Appended::Stored | Appended::Duplicate => None,
        Appended::Conflict => Some(format!(
            "conflict: the id {id:?} is already stored with other content (userId, name or value); nothing was \
             stored. An event that differs needs an id of its own"
        )),
        Appended::RangesFull => Some(format!(
            "conflict: the producer of the id {id:?} already holds {} separate ranges of stored sequences; nothing \
             was stored. Send these events with ids of another producer (eps client --new-run)",
            crate::log::producers::MAX_RANGES_PER_PRODUCER
        )),
    }
}

/// `POST /events`'s failures: a refused batch (400 with its lines' errors), or any [`ApiError`].
pub(super) enum BatchError {
    Refused(BatchRefused),
    Api(ApiError),
}

impl<E: Into<ApiError>> From<E> for BatchError {
    fn from(e: E) -> Self {
        BatchError::Api(e.into())
    }
}

impl axum::response::IntoResponse for BatchError {
    fn into_response(self) -> axum::response::Response {
        match self {
            BatchError::Refused(body) => (StatusCode::BAD_REQUEST, Json(body)).into_response(),
            BatchError::Api(e) => e.into_response(),
        }
    }
}

#[utoipa::path(
    get, path = "/userEvents/{userId}", tag = "events",
    security(("token" = [])),
    params(("userId" = String, Path, description = "The user: 1 to 255 bytes of UTF-8, no control characters (the rule of an event's userId)",
        min_length = 1, max_length = 255, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]+$")),
    responses(
        (status = 200, description = "The user's revenue as applied by the processor", body = UserRevenue),
        (status = 400, description = "Not a valid userId", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "The token is known but does not hold the scope this route needs (see docs/SECURITY.md)", body = ErrorBody),
        (status = 404, description = "No event of this user was applied", body = ErrorBody),
        (status = 503, description = "The database is unreachable; retry after Retry-After seconds", body = ErrorBody,
         headers(("Retry-After" = u32, description = "Seconds to wait"))),
    )
)]
pub(super) async fn user_events(
    State(state): State<Arc<AppState>>,
    user_id: Result<Path<String>, PathRejection>,
) -> Result<Json<UserRevenue>, ApiError> {
    let Path(user_id) = user_id.map_err(|r| ApiError::BadRequest(r.body_text()))?;
    // The same rule as an event's userId: an id no event can carry is a 400 on every store, and never
    // reaches the database (PostgreSQL refuses a NUL with an error that would read as an outage).
    let user_id =
        UserId::parse(user_id).map_err(|e| ApiError::BadRequest(format!("invalid userId in the path: {e}")))?;
    let store = state.store()?;
    match store.revenue(user_id.as_str()).await? {
        Some(revenue) => Ok(Json(UserRevenue { user_id: user_id.into_string(), revenue: revenue.to_string() })),
        None => Err(ApiError::UnknownUser(user_id.into_string())),
    }
}

pub(super) async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(uri.path().to_string())
}

pub(super) async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// `GET /healthz`: the process is up and serving, and which log it appends to. Unauthenticated, no
/// I/O.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "Up", body = Health)))]
pub(super) async fn healthz(State(state): State<Arc<AppState>>) -> Json<Health> {
    Json(Health { status: "ok".into(), log: state.log.identity() })
}

/// `GET /readyz`: ready to take events (the log is writable) and to answer queries (the database
/// answers a ping within a second). Unauthenticated and cheap: no write, one trivial query.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses(
    (status = 200, description = "Ready: the log is writable and the database answers", body = Readiness),
    (status = 503, description = "Not ready (the log still being recovered at start-up, an append failing, the database away); the body says which part is not; retry after Retry-After seconds", body = Readiness,
        headers(("Retry-After" = u64, description = "Seconds to wait before asking again"))),
))]
pub(super) async fn readyz(State(state): State<Arc<AppState>>) -> axum::response::Response {
    let log_not_ready = state.log_not_ready();
    let log_ok = log_not_ready.is_none();
    let database = match state.store() {
        Err(_) => Err(state.store_not_open()),
        Ok(store) => match tokio::time::timeout(std::time::Duration::from_secs(1), store.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer within 1s".to_string()),
        },
    };
    let ready = log_ok && database.is_ok();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = Readiness {
        status: if ready { "ready" } else { "not ready" }.into(),
        log: log_not_ready.unwrap_or_else(|| "ok".to_string()),
        database: database.err().unwrap_or_else(|| "ok".to_string()),
        jetstream: state.log.promise(),
    };
    let mut response = axum::response::IntoResponse::into_response((status, Json(body)));
    if !ready {
        response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    response
}

/// `GET /metrics`: Prometheus text format. Unauthenticated like most scrape targets; it holds counts
/// and timings only, never event contents or the token.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses(
    (status = 200, description = "Prometheus text exposition format", body = String, content_type = "text/plain"),
))]
pub(super) async fn metrics(State(state): State<Arc<AppState>>) -> ([(header::HeaderName, &'static str); 1], String) {
    super::refresh_store_metrics(&state).await;
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], crate::telemetry::render())
}
