//! The API's one error type: every failure a handler can have, mapped to a status and a JSON body in
//! one place, so no error reaches a client as an HTML page, an empty body or a stack trace. Also
//! [`ErrorBody`], that body's schema for the OpenAPI document.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::json;

use crate::event::EventError;
use crate::log::LogError;
use crate::store::StoreError;

/// Seconds a client is asked to wait before retrying a 503.
const RETRY_AFTER_SECS: &str = "1";

/// The body of every error answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorBody {
    /// What went wrong, for a person.
    pub(crate) error: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or wrong token in the Authorization header")]
    Unauthorized,
    /// A known token without the scope the route needs.
    #[error("{0}")]
    Forbidden(String),
    /// The token's rate limit: nothing stored; the client may retry after the given seconds.
    #[error("rate limit of this token reached: nothing was stored; retry after {retry_after_secs} s")]
    TooManyRequests { retry_after_secs: u64 },
    #[error("{0}")]
    BadRequest(String),
    /// The body did not arrive within the time limit.
    #[error("{0}")]
    RequestTimeout(String),
    /// Too large to take: the body, a batch's events, more events than the token's burst, or an event
    /// the log cannot hold. Nothing stored, and a retry is refused the same way.
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("Content-Type must be application/json (got {0:?})")]
    UnsupportedMediaType(String),
    /// A `Content-Encoding` other than gzip (or none).
    #[error("Content-Encoding {0:?} is not supported: send gzip or no Content-Encoding")]
    UnsupportedEncoding(String),
    #[error("no events for user {0:?}")]
    UnknownUser(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The event's id is held with other content (or its producer's ranges are full): nothing stored.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
}

impl From<EventError> for ApiError {
    fn from(e: EventError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

impl From<LogError> for ApiError {
    fn from(e: LogError) -> Self {
        match e {
            // The writer has already logged the cause; the client learns only that it should retry.
            LogError::Unavailable(_) => ApiError::Unavailable(format!("event not stored, retry later: {e}")),
            // Nothing was stored and a retry would be refused the same way: not a 503.
            LogError::TooLarge(why) => ApiError::PayloadTooLarge(format!("nothing was stored: {why}")),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::warn!(error = %e, "database request failed");
        ApiError::Unavailable("database unavailable, retry later".into())
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) | ApiError::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::UnknownUser(_) | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (status, Json(json!({ "error": self.to_string() }))).into_response();
        let headers = response.headers_mut();
        match self {
            ApiError::Unavailable(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
            }
            ApiError::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::TooManyRequests { retry_after_secs } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            }
            _ => {}
        }
        response
    }
}
