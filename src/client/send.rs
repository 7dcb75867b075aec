//! Sending one request: the HTTP client, attempts and retries over the server pool, and what an answer
//! means (accepted, duplicate, rejected per line, retryable).

use std::error::Error as StdError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;
use serde::Deserialize;
use tokio::task::JoinSet;

use super::pool::{Backoff, ServerPool};
use super::progress::Counters;
use super::stop::Stop;
use super::{ClientOptions, Tuning, MAX_RETRY_AFTER};

/// Most bytes of an answer's body the client reads.
pub(super) const MAX_REPLY_BYTES: usize = 64 * 1024;
/// One request handed to a sending task: its frontier ticket, the file line of each event, and (with
/// `--failed-out`) each line as read, with whether it had an id of its own.
pub(super) struct Request {
    pub(super) seq: u64,
    pub(super) lines: Vec<u64>,
    pub(super) originals: Vec<(Vec<u8>, bool)>,
}

/// The request being filled: its body, the file line number of each event in it, and (with
/// `--failed-out`) each line as read.
#[derive(Default)]
pub(super) struct Pending {
    pub(super) body: Vec<u8>,
    pub(super) lines: Vec<u64>,
    pub(super) originals: Vec<(Vec<u8>, bool)>,
}

impl Pending {
    /// Hands the request to a sending task and starts an empty one.
    pub(super) fn send(
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

/// What became of one request (one event, or a batch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Outcome {
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
pub(super) struct Sender {
    pub(super) http: reqwest::Client,
    /// The servers, in the order given.
    pub(super) servers: Vec<Server>,
    /// Which server each request goes to.
    pub(super) pool: ServerPool,
    pub(super) headers: HeaderMap,
    pub(super) timeout: Duration,
    pub(super) max_attempts: u32,
    pub(super) backoff: Backoff,
    /// Set when the run stops: no retry is made after it.
    pub(super) stop: Arc<Stop>,
    /// Bodies are sent gzip-compressed.
    pub(super) gzip: bool,
}

/// What the servers said of the logs they append to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Logs {
    /// Their identities, sorted, each once.
    Known(Vec<String>),
    /// A server answered without naming a log (an eps older than log identities): nothing to check
    /// against.
    NotReported,
    /// No server named its log (none answered, or the run stopped first); `answered`: some answered,
    /// without a log yet.
    Unanswered { answered: bool },
}

/// One server: its URL as given (for messages and the summary) and where requests go.
pub(super) struct Server {
    pub(super) name: String,
    pub(super) endpoint: reqwest::Url,
}

impl Sender {
    pub(super) fn new(opts: &ClientOptions, tuning: &Tuning, stop: Arc<Stop>) -> anyhow::Result<Sender> {
        let path = if opts.batch <= 1 { "liveEvent" } else { "events" };
        let mut servers = Vec::new();
        for url in opts.urls.iter().map(|u| u.trim()).filter(|u| !u.is_empty()) {
            let base = url.trim_end_matches('/');
            // "127.0.0.1:8000" or "localhost:8000": a host, not a URL; say what to add.
            if !base.contains("://") {
                return Err(crate::error::ConfigError(format!(
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
    pub(super) async fn logs(&self) -> Logs {
        let mut round = 0;
        let mut answered = false;
        loop {
            let mut known = Vec::new();
            let mut unnamed = false;
            for (index, server) in self.servers.iter().enumerate() {
                let Ok(url) = server.endpoint.join("healthz") else { return Logs::NotReported };
                let answer = async {
                    let response = self.http.get(url).timeout(self.timeout).send().await?.error_for_status()?;
                    response.json::<serde_json::Value>().await
                };
                match answer.await {
                    Ok(health) => {
                        self.pool.succeeded(index);
                        answered = true;
                        match health.get("log") {
                            None => unnamed = true,
                            Some(serde_json::Value::String(log)) => known.push(log.clone()),
                            Some(_) => {}
                        }
                    }
                    Err(e) => {
                        let error = describe(&e, self.timeout);
                        self.say_certificate_refusal(index, &e, &error);
                        tracing::debug!(server = %server.name, error, "asking the server for its log failed");
                        self.pool.failed(index, Instant::now());
                    }
                }
            }
            // Those that name their log decide; only when none does and one answered without the
            // field at all (an eps older than log identities) is there nothing to check against.
            if !known.is_empty() {
                known.sort();
                known.dedup();
                return Logs::Known(known);
            }
            if unnamed {
                return Logs::NotReported;
            }
            round += 1;
            if round >= self.max_attempts {
                return Logs::Unanswered { answered };
            }
            tokio::select! {
                () = self.stop.wait() => return Logs::Unanswered { answered },
                () = tokio::time::sleep(self.backoff.full_jitter(round)) => {}
            }
        }
    }

    /// A certificate refusal is retried like any failed connection (a server may be given a new
    /// certificate), but said once at the default level: otherwise the run only ends with "no server
    /// has taken a request".
    fn say_certificate_refusal(&self, server: usize, e: &reqwest::Error, error: &str) {
        if (certificate_refused(e) || error.contains("invalid peer certificate"))
            && !CERTIFICATE_REFUSAL_SAID.swap(true, Ordering::Relaxed)
        {
            tracing::error!(
                server = %self.servers[server].name, error,
                "the server's TLS certificate is not trusted: give the CA that signed it with --ca-cert (EPS_CA_CERT)"
            );
        }
    }

    /// Sends one request until it is accepted, rejected, or out of attempts. Each attempt goes to the
    /// server the pool chooses: round-robin for the first, the next server after the failed one for
    /// a retry. The sleep between attempts is only taken when no server is up.
    pub(super) async fn deliver(&self, body: Vec<u8>) -> Outcome {
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
                    None => self.backoff.full_jitter(attempt),
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

    pub(super) async fn attempt(&self, server: usize, body: Vec<u8>) -> Attempt {
        let endpoint = &self.servers[server].endpoint;
        let request = self.http.post(endpoint.clone()).headers(self.headers.clone()).timeout(self.timeout).body(body);
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => {
                let error = describe(&e, self.timeout);
                self.say_certificate_refusal(server, &e, &error);
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

pub(super) enum Attempt {
    Done(Outcome),
    Retry { error: String, retry_after: Option<Duration> },
}

/// `body` as one gzip member.
pub(super) fn gzip(body: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder =
        flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 4 + 64), flate2::Compression::default());
    encoder.write_all(body).expect("writing to memory");
    encoder.finish().expect("writing to memory")
}

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

/// The roots https URLs are verified with: only `ca_cert` when given (a private CA, like curl's
/// `--cacert`), else the platform's trust store, else (a platform without one) reqwest's bundled roots.
pub(super) fn trust(
    builder: reqwest::ClientBuilder,
    ca_cert: Option<&std::path::Path>,
) -> anyhow::Result<reqwest::ClientBuilder> {
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

pub(super) static CERTIFICATE_REFUSAL_SAID: AtomicBool = AtomicBool::new(false);

/// Whether rustls refused the server's certificate (somewhere in the error's causes; an `io::Error`
/// hides its inner error from `source`, so it is opened with `get_ref`). reqwest's connector may carry
/// it as text only, hence the caller's second test on rustls's wording.
pub(super) fn certificate_refused(e: &reqwest::Error) -> bool {
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
pub(super) fn describe(e: &reqwest::Error, timeout: Duration) -> String {
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

#[cfg(test)]
mod tests {
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
