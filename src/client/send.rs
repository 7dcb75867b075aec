//! Sending one request: attempts and retries over the server pool, what became of it (accepted,
//! duplicate, rejected per line, failed), and asking the servers which logs they append to.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::StatusCode;
use tokio::task::JoinSet;

use super::http::{certificate_refused, describe, gzip, trust, CERTIFICATE_REFUSAL_SAID};
use super::pool::{Backoff, ServerPool};
use super::reply::{read_capped, reason, reply_error, retry_after, retryable, Reply};
use super::stop::Stop;
use super::summary::Counters;
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
