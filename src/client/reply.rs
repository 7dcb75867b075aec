//! What an answer means to the client: retryable or not, `Retry-After`, the JSON it reads (`duplicate`,
//! per-line errors, `error`), the server's explanation for a message, a body read up to a cap.

use std::time::Duration;

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::StatusCode;
use serde::Deserialize;

pub(super) fn retryable(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT || status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// `Retry-After` in whole seconds (the HTTP-date form is ignored: the backoff applies).
pub(super) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    value.parse::<u64>().ok().map(Duration::from_secs)
}

/// What the client reads from an answer: `POST /liveEvent`'s `duplicate`, `POST /events`'s counts
/// and per-line errors, any error's `error`.
#[derive(Deserialize, Default)]
pub(super) struct Reply {
    #[serde(default)]
    pub(super) duplicate: bool,
    #[serde(default)]
    pub(super) duplicates: u64,
    #[serde(default)]
    pub(super) errors: Vec<ReplyLineError>,
    #[serde(default)]
    pub(super) error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
pub(super) struct ReplyLineError {
    pub(super) line: usize,
    pub(super) error: String,
}

impl Reply {
    pub(super) fn line_errors(&self) -> Vec<(usize, String)> {
        self.errors.iter().map(|e| (e.line, e.error.clone())).collect()
    }
}

/// The server's explanation: the JSON `error` field, else the body's text, else the status reason.
pub(super) fn reply_error(status: StatusCode, body: &[u8]) -> String {
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

pub(super) fn reason(status: StatusCode) -> &'static str {
    status.canonical_reason().unwrap_or("no reason given")
}

pub(super) async fn read_capped(mut response: reqwest::Response, cap: usize) -> Result<Vec<u8>, reqwest::Error> {
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

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;

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
}
