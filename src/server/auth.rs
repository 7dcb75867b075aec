//! Who may do what: the tokens the server accepts, the scopes each holds, and each one's rate limit.
//!
//! A token is known by the SHA-256 digest of its bytes: a request's token is hashed once and compared
//! with every known digest in constant time (every digest, whatever matched), so neither the timing
//! nor the file (which may hold only digests) reveals a token. Tokens are never logged; their names
//! are.
//!
//! The set in force is replaced whole ([`Auth::reload`], on SIGHUP): a request holds the set it was
//! checked against, so a rotation never fails a request in flight, and a file that does not parse
//! leaves the old set in force. A token's rate limiter (GCRA, `governor`) is kept across a reload when
//! the token keeps its name and its limit, so a SIGHUP does not refill anyone's bucket.
//!
//! Scopes: `ingest` (POST /liveEvent, POST /events), `read` (GET /userEvents, the console's data),
//! `admin` (everything). `/healthz`, `/readyz`, `/metrics`, `/openapi.json` and the console's page
//! and assets need no token.
//!
//! The check is a layer on each route that needs a token ([`guard`]), run before the route's handler
//! (and so before any other check of the request): a refusal is answered there, and a request that
//! passes carries its [`Grant`] in its extensions, for the handler to charge its events to.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::MethodRouter;
use governor::clock::Clock;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::AppState;
use crate::error::ConfigError;

type Limiter = governor::DefaultDirectRateLimiter;

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    Ingest,
    Read,
}

const INGEST: u8 = 1;
const READ: u8 = 2;
const ADMIN: u8 = INGEST | READ;

/// A rate limit in events: `per_second` sustained, `burst` at once (at least one batch's worth).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

impl RateLimit {
    /// `per_second` events a second with a burst of one second's worth; `None` for 0 (no limit).
    pub fn per_second(per_second: u32) -> Option<RateLimit> {
        let per_second = NonZeroU32::new(per_second)?;
        Some(RateLimit { per_second, burst: per_second })
    }
}

struct Token {
    name: String,
    digest: [u8; 32],
    scopes: u8,
    limit: Option<RateLimit>,
    limiter: Option<Arc<Limiter>>,
}

/// The tokens in force, replaced whole on a reload.
pub(crate) struct TokenSet {
    tokens: Vec<Token>,
}

/// Where the tokens come from: `--token` (one token, every scope) or `--tokens-file`.
#[derive(Debug, Clone)]
pub enum TokenSource {
    Single(String),
    File(PathBuf),
}

pub(crate) struct Auth {
    source: TokenSource,
    default_limit: Option<RateLimit>,
    /// Whether the server listens on loopback only (the seed's token is refused elsewhere).
    loopback: bool,
    current: RwLock<Arc<TokenSet>>,
}

/// A request's token, found and holding the scope: what its rate limit is charged to. Put in the
/// request's extensions by [`guard`]'s layer (`Extension<Grant>` in a handler).
#[derive(Clone)]
pub(crate) struct Grant {
    limiter: Option<Arc<Limiter>>,
    burst: u32,
}

impl Auth {
    /// Reads the tokens (a configuration error if they are not usable).
    pub(crate) fn new(
        source: TokenSource,
        default_limit: Option<RateLimit>,
        loopback: bool,
    ) -> Result<Auth, ConfigError> {
        let set = load(&source, default_limit, loopback, None)?;
        Ok(Auth { source, default_limit, loopback, current: RwLock::new(Arc::new(set)) })
    }

    pub(crate) fn file(&self) -> Option<&Path> {
        match &self.source {
            TokenSource::File(path) => Some(path),
            TokenSource::Single(_) => None,
        }
    }

    fn snapshot(&self) -> Arc<TokenSet> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Re-reads the tokens file; on any error the set in force stays and the error is returned.
    pub(crate) fn reload(&self) -> Result<usize, ConfigError> {
        let old = self.snapshot();
        let set = load(&self.source, self.default_limit, self.loopback, Some(&old))?;
        let count = set.tokens.len();
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
        Ok(count)
    }

    /// The token of `Authorization: <token>` or `Authorization: Bearer <token>`, if it is known and
    /// holds `scope`: 401 if missing or unknown, 403 if it lacks the scope. Refusals are counted in
    /// `eps_http_auth_refusals_total{route, reason}`.
    pub(crate) fn authorize(&self, headers: &HeaderMap, scope: Scope, route: &'static str) -> Result<Grant, ApiError> {
        let Some(given) = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()) else {
            refused(route, "missing_token");
            return Err(ApiError::Unauthorized);
        };
        let given = given.strip_prefix(b"Bearer ").unwrap_or(given);
        let digest: [u8; 32] = Sha256::digest(given).into();
        let set = self.snapshot();
        let mut found: Option<&Token> = None;
        for token in &set.tokens {
            // Every digest is compared, so the time taken does not depend on which one matched.
            if bool::from(token.digest.ct_eq(&digest)) {
                found = Some(token);
            }
        }
        let Some(token) = found else {
            refused(route, "unknown_token");
            return Err(ApiError::Unauthorized);
        };
        let need = match scope {
            Scope::Ingest => INGEST,
            Scope::Read => READ,
        };
        if token.scopes & need == 0 {
            refused(route, "scope");
            let scope = match scope {
                Scope::Ingest => "ingest",
                Scope::Read => "read",
            };
            return Err(ApiError::Forbidden(format!("the token {:?} does not hold the {scope:?} scope", token.name)));
        }
        Ok(Grant { limiter: token.limiter.clone(), burst: token.limit.map_or(u32::MAX, |l| l.burst.get()) })
    }
}

impl Grant {
    /// Takes `events` from the token's rate limit, all or nothing: 429 with the seconds until they
    /// would fit if the bucket is short, 413 if they can never fit (more than the burst).
    pub(crate) fn charge(&self, events: usize, route: &'static str) -> Result<(), ApiError> {
        let Some(limiter) = &self.limiter else { return Ok(()) };
        let Some(n) = NonZeroU32::new(u32::try_from(events).unwrap_or(u32::MAX)) else { return Ok(()) };
        match limiter.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                refused(route, "rate_limited");
                let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
                Err(ApiError::TooManyRequests { retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64 })
            }
            Err(_) => {
                refused(route, "over_burst");
                Err(ApiError::PayloadTooLarge(format!(
                    "{events} events in one request are more than this token's burst of {}: nothing was stored; \
                     send smaller batches",
                    self.burst
                )))
            }
        }
    }
}

/// What one route needs of a request's token: the scope, and the route's label in the refusal
/// counters (the route's path as the router has it, e.g. `/userEvents/{user_id}`).
#[derive(Clone)]
struct Guard {
    state: Arc<AppState>,
    scope: Scope,
    route: &'static str,
}

/// `route` (a method router of one path) with its token check: each of its methods registered so far
/// answers 401 or 403 before its handler runs. Methods added after (the CORS routes' OPTIONS) are not
/// checked; layers added after wrap the check.
pub(crate) fn guard(
    route: MethodRouter<Arc<AppState>>,
    state: &Arc<AppState>,
    scope: Scope,
    label: &'static str,
) -> MethodRouter<Arc<AppState>> {
    let guard = Guard { state: state.clone(), scope, route: label };
    route.route_layer(axum::middleware::from_fn_with_state(guard, check))
}

/// The layer of [`guard`]: accepts `Authorization: <token>` (what the seed's client sends) and
/// `Authorization: Bearer <token>`, for a token holding the route's scope.
async fn check(State(guard): State<Guard>, mut request: Request, next: Next) -> Result<Response, ApiError> {
    let grant = guard.state.auth.authorize(request.headers(), guard.scope, guard.route)?;
    request.extensions_mut().insert(grant);
    Ok(next.run(request).await)
}

fn refused(route: &'static str, reason: &'static str) {
    metrics::counter!("eps_http_auth_refusals_total", "route" => route, "reason" => reason).increment(1);
}

/// The tokens file: `[[token]]` tables.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    scopes: Vec<String>,
    value: Option<String>,
    sha256: Option<String>,
    events_per_second: Option<u32>,
    burst: Option<u32>,
}

fn load(
    source: &TokenSource,
    default_limit: Option<RateLimit>,
    loopback: bool,
    old: Option<&TokenSet>,
) -> Result<TokenSet, ConfigError> {
    let mut tokens = match source {
        TokenSource::Single(token) => {
            if token.is_empty() {
                return Err(ConfigError("the token must not be empty".into()));
            }
            vec![Token {
                name: "token".into(),
                digest: Sha256::digest(token.as_bytes()).into(),
                scopes: ADMIN,
                limit: default_limit,
                limiter: None,
            }]
        }
        TokenSource::File(path) => parse_file(path, default_limit)?,
    };
    let seed: [u8; 32] = Sha256::digest(super::DEFAULT_TOKEN.as_bytes()).into();
    if !loopback {
        if let Some(t) = tokens.iter().find(|t| t.digest == seed) {
            return Err(ConfigError(match source {
                TokenSource::Single(_) => format!(
                    "refusing to listen on a non-loopback address with the default token {:?}: set --token or EPS_TOKEN",
                    super::DEFAULT_TOKEN
                ),
                TokenSource::File(path) => format!(
                    "the tokens file {}: token {:?} is the default token {:?}, refused on a non-loopback address",
                    path.display(),
                    t.name,
                    super::DEFAULT_TOKEN
                ),
            }));
        }
    }
    for token in &mut tokens {
        let kept = old
            .and_then(|old| old.tokens.iter().find(|o| o.name == token.name && o.limit == token.limit))
            .and_then(|o| o.limiter.clone());
        token.limiter = kept.or_else(|| {
            token
                .limit
                .map(|l| Arc::new(Limiter::direct(governor::Quota::per_second(l.per_second).allow_burst(l.burst))))
        });
    }
    Ok(TokenSet { tokens })
}

fn parse_file(path: &Path, default_limit: Option<RateLimit>) -> Result<Vec<Token>, ConfigError> {
    let shown = path.display();
    let text =
        std::fs::read_to_string(path).map_err(|e| ConfigError(format!("cannot read the tokens file {shown}: {e}")))?;
    let file: TokensFile =
        toml::from_str(&text).map_err(|e| ConfigError(format!("the tokens file {shown} is not valid: {e}")))?;
    if file.token.is_empty() {
        return Err(ConfigError(format!("the tokens file {shown} holds no [[token]]")));
    }
    let mut tokens: Vec<Token> = Vec::with_capacity(file.token.len());
    for entry in file.token {
        let bad = |why: String| ConfigError(format!("the tokens file {shown}: token {:?}: {why}", entry.name));
        if entry.name.trim().is_empty() {
            return Err(ConfigError(format!("the tokens file {shown}: a token has an empty name")));
        }
        if tokens.iter().any(|t| t.name == entry.name) {
            return Err(bad("two tokens have this name".into()));
        }
        let mut scopes = 0;
        for scope in &entry.scopes {
            scopes |= match scope.as_str() {
                "ingest" => INGEST,
                "read" => READ,
                "admin" => ADMIN,
                other => return Err(bad(format!("unknown scope {other:?}: use \"ingest\", \"read\" or \"admin\""))),
            };
        }
        if scopes == 0 {
            return Err(bad("no scope: give scopes = [\"ingest\"], [\"read\"] or [\"admin\"]".into()));
        }
        let digest: [u8; 32] = match (&entry.value, &entry.sha256) {
            (Some(value), None) if !value.is_empty() => Sha256::digest(value.as_bytes()).into(),
            (Some(_), None) => return Err(bad("the value is empty".into())),
            (None, Some(hex_digest)) => hex::decode(hex_digest.trim())
                .ok()
                .and_then(|d| <[u8; 32]>::try_from(d).ok())
                .ok_or_else(|| bad("sha256 must be 64 hexadecimal digits (the SHA-256 of the token)".into()))?,
            _ => return Err(bad("give exactly one of value and sha256".into())),
        };
        if let Some(other) = tokens.iter().find(|t| t.digest == digest) {
            return Err(bad(format!("the same token as {:?}", other.name)));
        }
        let limit = match (entry.events_per_second, entry.burst) {
            (None, None) => default_limit,
            (None, Some(_)) => return Err(bad("burst needs events_per_second".into())),
            (Some(0), _) => None,
            (Some(per_second), burst) => {
                let per_second = NonZeroU32::new(per_second).expect("0 is handled above");
                let burst = match burst {
                    None => per_second,
                    Some(b) => NonZeroU32::new(b).ok_or_else(|| bad("burst must be at least 1".into()))?,
                };
                Some(RateLimit { per_second, burst })
            }
        };
        tokens.push(Token { name: entry.name, digest, scopes, limit, limiter: None });
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, token.parse().unwrap());
        h
    }

    #[test]
    fn scopes_digests_and_a_broken_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let digest = hex::encode(Sha256::digest(b"reader-1"));
        std::fs::write(
            &path,
            format!(
                "[[token]]\nname = \"web\"\nscopes = [\"ingest\"]\nvalue = \"ingest-1\"\nevents_per_second = 10\nburst = 5\n\n\
                 [[token]]\nname = \"analyst\"\nscopes = [\"read\"]\nsha256 = \"{digest}\"\n"
            ),
        )
        .unwrap();
        let auth = Auth::new(TokenSource::File(path.clone()), None, true).unwrap();
        assert!(auth.authorize(&headers("ingest-1"), Scope::Ingest, "/t").is_ok());
        assert!(matches!(auth.authorize(&headers("Bearer ingest-1"), Scope::Read, "/t"), Err(ApiError::Forbidden(_))));
        assert!(auth.authorize(&headers("reader-1"), Scope::Read, "/t").is_ok());
        assert!(matches!(auth.authorize(&headers("nope"), Scope::Read, "/t"), Err(ApiError::Unauthorized)));
        let grant = auth.authorize(&headers("ingest-1"), Scope::Ingest, "/t").unwrap();
        assert!(grant.charge(5, "/t").is_ok());
        assert!(matches!(grant.charge(1, "/t"), Err(ApiError::TooManyRequests { .. })));
        assert!(matches!(grant.charge(6, "/t"), Err(ApiError::PayloadTooLarge(_))));
        std::fs::write(&path, "[[token]]\nname = 3\n").unwrap();
        assert!(auth.reload().is_err());
        assert!(auth.authorize(&headers("ingest-1"), Scope::Ingest, "/t").is_ok(), "a broken file keeps the old set");
    }

    #[test]
    fn the_server_wide_limit_applies_to_the_single_token() {
        let auth = Auth::new(TokenSource::Single("t".into()), RateLimit::per_second(5), true).unwrap();
        let grant = auth.authorize(&headers("t"), Scope::Read, "/t").unwrap();
        assert!(grant.charge(5, "/t").is_ok());
        assert!(matches!(grant.charge(1, "/t"), Err(ApiError::TooManyRequests { retry_after_secs: 1 })));
        assert!(Auth::new(TokenSource::Single("secret".into()), None, false).is_err(), "the seed's token off loopback");
    }
}
