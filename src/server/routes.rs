//! The HTTP routes: the seed's `POST /liveEvent` and `GET /userEvents/{userId}`.
//!
//! Order of checks on ingest: token, content type, body size, event validity, then the durable append.
//! Nothing is written unless every check passed, and 200 is only sent after the log's sync.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use serde::Serialize;
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::AppState;
use crate::event::{Event, MAX_USER_ID_BYTES};
use crate::log::Appended;

/// Accepts `Authorization: <token>` (what the seed's client sends) and `Authorization: Bearer <token>`.
pub(super) fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()).unwrap_or_default();
    let given = given.strip_prefix(b"Bearer ").unwrap_or(given);
    // Constant time over the bytes, so response timing does not reveal how much of a guess was right.
    if bool::from(given.ct_eq(state.token.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// JSON or nothing: a missing Content-Type is taken as JSON (old clients omit it); any other is refused.
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else { return Ok(()) };
    let text = value.to_str().unwrap_or("").to_ascii_lowercase();
    let mime = text.split(';').next().unwrap_or("").trim();
    if mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json")) {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType(text))
    }
}

/// Reads the whole body, within the size limit (413) and the time limit (408: slow-loris bodies).
async fn body_bytes(state: &AppState, body: Body) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::Body {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: format!("request body larger than the limit of {} bytes", state.body_limit),
    };
    match tokio::time::timeout(state.body_timeout, axum::body::to_bytes(body, state.body_limit)).await {
        Err(_) => Err(ApiError::Body {
            status: StatusCode::REQUEST_TIMEOUT,
            message: format!("request body not received within {:?}", state.body_timeout),
        }),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => {
            let inner = e.into_inner();
            if inner.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                Err(too_large())
            } else {
                Err(ApiError::BadRequest(format!("cannot read the request body: {inner}")))
            }
        }
    }
}

/// The seed's answer, plus `duplicate: true` when the event id was already stored.
#[derive(Debug, Serialize)]
pub(super) struct Received {
    message: &'static str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
}

#[derive(Debug, Serialize)]
pub(super) struct UserRevenue {
    #[serde(rename = "userId")]
    user_id: String,
    /// The exact decimal as a string: JSON numbers are read as floats by most clients.
    revenue: String,
}

pub(super) async fn live_event(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Received>, ApiError> {
    authorize(&state, &headers)?;
    require_json(&headers)?;
    let body = body_bytes(&state, body).await?;
    let event = Event::parse_request(&body)?;
    let answer = state.log.append(vec![event]).await?;
    let duplicate = answer.first() == Some(&Appended::Duplicate);
    Ok(Json(Received { message: "Event received", duplicate }))
}

pub(super) async fn user_events(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    user_id: Result<Path<String>, PathRejection>,
) -> Result<Json<UserRevenue>, ApiError> {
    authorize(&state, &headers)?;
    let Path(user_id) = user_id.map_err(|r| ApiError::BadRequest(r.body_text()))?;
    if user_id.is_empty() || user_id.len() > MAX_USER_ID_BYTES {
        return Err(ApiError::BadRequest(format!("userId must be 1 to {MAX_USER_ID_BYTES} bytes long")));
    }
    let store = state.store()?;
    match store.revenue(&user_id).await? {
        Some(revenue) => Ok(Json(UserRevenue { user_id, revenue: revenue.normalize().to_string() })),
        None => Err(ApiError::UnknownUser(user_id)),
    }
}

pub(super) async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(uri.path().to_string())
}

pub(super) async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// `GET /healthz`: the process is up and serving. Unauthenticated, no I/O.
pub(super) async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// `GET /readyz`: ready to take events (the log is writable) and to answer queries (the database
/// answers a ping within a second). Unauthenticated and cheap: no write, one trivial query.
pub(super) async fn readyz(State(state): State<Arc<AppState>>) -> (StatusCode, Json<serde_json::Value>) {
    let log_ok = state.log_ready();
    let database = match state.store() {
        Err(_) => Err("not connected yet".to_string()),
        Ok(store) => match tokio::time::timeout(std::time::Duration::from_secs(1), store.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer within 1s".to_string()),
        },
    };
    let ready = log_ok && database.is_ok();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "not ready" },
        "log": if log_ok { "ok".to_string() } else { "the last append failed; see the server's log".to_string() },
        "database": database.err().unwrap_or_else(|| "ok".to_string()),
    });
    (status, Json(body))
}

/// `GET /metrics`: Prometheus text format. Unauthenticated like most scrape targets; it holds counts
/// and timings only, never event contents or the token.
pub(super) async fn metrics() -> ([(header::HeaderName, &'static str); 1], String) {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], crate::telemetry::metrics().render())
}
