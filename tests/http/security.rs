//! Issue 18, items 3 to 6, against the real binary: scoped tokens (the 401/403/200 matrix of every
//! route), their rotation by SIGHUP with requests in flight, rate limits (429 and `eps client` still
//! storing every event once), CORS on the ingest routes only, the console page's security headers,
//! and gzip bodies (batches, a bomb, a truncated stream).

use crate::common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const EVENT: &str = r#"{"userId":"u1","name":"add_revenue","value":1}"#;

/// Writes the tokens file atomically (a rename), as an operator's tooling should.
fn write_tokens(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn token(name: &str, scopes: &str, value: &str) -> String {
    format!("[[token]]\nname = \"{name}\"\nscopes = {scopes}\nvalue = \"{value}\"\n\n")
}

fn sighup(pid: u32) {
    // SAFETY: kill(2) with a pid of our own child and a valid signal number.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0, "kill -HUP");
}

/// One request to `path` (GET, or POST with an event body for the ingest routes) with `token`;
/// returns the status.
async fn status_of(http: &reqwest::Client, url: &str, method: &str, path: &str, token: Option<&str>) -> u16 {
    let mut request = match method {
        "POST" => {
            let (body, content_type) = if path == "/events" {
                (format!("{EVENT}\n"), "application/x-ndjson")
            } else {
                (EVENT.to_string(), "application/json")
            };
            http.post(format!("{url}{path}")).header("Content-Type", content_type).body(body)
        }
        _ => http.get(format!("{url}{path}")),
    };
    if let Some(token) = token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let response = request.send().await.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    // The console's stream never ends: the status is all that is read.
    response.status().as_u16()
}

const PROTECTED: &[(&str, &str, &str)] = &[
    ("POST", "/liveEvent", "ingest"),
    ("POST", "/events", "ingest"),
    ("GET", "/userEvents/u1", "read"),
    ("GET", "/console/summary", "read"),
    ("GET", "/console/stream", "read"),
];

const OPEN: &[&str] = &["/healthz", "/metrics", "/openapi.json", "/", "/console/console.js", "/console/console.css"];

/// Every protected route with every kind of token: no token and an unknown one get 401, a known token
/// without the route's scope 403 with a JSON error, one with it (or admin) gets through. The open
/// routes need no token. `/metrics` counts the refusals by route and reason.
#[tokio::test]
async fn every_route_answers_401_403_or_200_by_token_and_scope() {
    let env = Env::new(StoreKind::Sqlite).await;
    let tokens = env.tmp.path().join("tokens.toml");
    write_tokens(
        &tokens,
        &format!(
            "{}{}{}[[token]]\nname = \"analyst\"\nscopes = [\"read\"]\nsha256 = \"{}\"\n",
            token("web", "[\"ingest\"]", "ingest-token-1"),
            token("ops", "[\"admin\"]", "admin-token-1"),
            token("old-reader", "[\"read\"]", "read-token-0"),
            // sha256 of "read-token-1": the file need not hold the token.
            "3fdda857fb17b8429826c42d7ab77eaf4417f5ad7a8f4d50f18bb87ecd38c2fd",
        ),
    );
    let server = env.server_with(&["--tokens-file", &tokens.display().to_string()]).await;
    let http = http();
    for &(method, path, scope) in PROTECTED {
        assert_eq!(status_of(&http, &server.url, method, path, None).await, 401, "{method} {path} without a token");
        assert_eq!(
            status_of(&http, &server.url, method, path, Some("nope")).await,
            401,
            "{method} {path} unknown token"
        );
        // The seed's token is not in the file: unknown too.
        assert_eq!(
            status_of(&http, &server.url, method, path, Some("secret")).await,
            401,
            "{method} {path} seed token"
        );
        for (token, holds) in [
            ("ingest-token-1", scope == "ingest"),
            ("read-token-1", scope == "read"),
            ("read-token-0", scope == "read"),
            ("admin-token-1", true),
        ] {
            let status = status_of(&http, &server.url, method, path, Some(token)).await;
            if holds {
                assert!(![401, 403].contains(&status), "{method} {path} with {token}: {status}");
                // 404 (no event applied yet) and 503 (store connecting) are past the token check.
                assert!([200, 404, 503].contains(&status), "{method} {path} with {token}: {status}");
            } else {
                assert_eq!(status, 403, "{method} {path} with {token} (lacks {scope:?})");
            }
        }
    }
    // The 403's body names the missing scope, as JSON.
    let refused = http
        .get(format!("{}/userEvents/u1", server.url))
        .header("Authorization", "ingest-token-1")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 403);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("read"), "{body}");
    for path in OPEN {
        assert_eq!(status_of(&http, &server.url, "GET", path, None).await, 200, "GET {path} needs no token");
    }
    let readyz = status_of(&http, &server.url, "GET", "/readyz", None).await;
    assert!([200, 503].contains(&readyz), "GET /readyz needs no token: {readyz}");
    let metrics = http.get(format!("{}/metrics", server.url)).send().await.unwrap().text().await.unwrap();
    for line in [
        r#"eps_http_auth_refusals_total{route="/userEvents/{user_id}",reason="scope"}"#,
        r#"eps_http_auth_refusals_total{route="/liveEvent",reason="missing_token"}"#,
        r#"eps_http_auth_refusals_total{route="/events",reason="unknown_token"}"#,
    ] {
        assert!(metrics.contains(line), "no {line} in /metrics:\n{metrics}");
    }
    let stderr = server.stderr();
    for secret in ["ingest-token-1", "admin-token-1", "read-token-0", "read-token-1"] {
        assert!(!stderr.contains(secret), "a token is in the server's log:\n{stderr}");
    }
    drop(server);

    // `--token` is still one token holding every scope.
    let server = env.server_with(&["--token", "only-one"]).await;
    for &(method, path, _) in PROTECTED {
        assert_eq!(status_of(&http, &server.url, method, path, Some("wrong")).await, 401, "{method} {path}");
        let status = status_of(&http, &server.url, method, path, Some("only-one")).await;
        assert!([200, 404, 503].contains(&status), "{method} {path} with --token: {status}");
    }
}

/// Rotation by SIGHUP while producers keep sending: a token valid before and after every reload never
/// gets a refusal; a token added becomes valid, one removed invalid; a broken file keeps the set in
/// force. Each producer's event is stored (200) every time.
#[tokio::test]
async fn sighup_rotates_the_tokens_without_failing_requests_in_flight() {
    let env = Env::new(StoreKind::Sqlite).await;
    let tokens = env.tmp.path().join("tokens.toml");
    let v1 = token("a", "[\"ingest\"]", "token-a");
    let v2 = format!("{}{}", token("a", "[\"ingest\"]", "token-a"), token("b", "[\"ingest\"]", "token-b"));
    let v3 = token("b", "[\"ingest\"]", "token-b");
    write_tokens(&tokens, &v1);
    let server = env.server_with(&["--tokens-file", &tokens.display().to_string()]).await;
    let http = http();
    assert_eq!(status_of(&http, &server.url, "POST", "/liveEvent", Some("token-b")).await, 401);

    // Producers with token a, which every file up to v2 holds.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let mut producers = Vec::new();
    for p in 0..4 {
        let (http, url, stop, sent) = (http.clone(), server.url.clone(), stop.clone(), sent.clone());
        producers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let body = format!(r#"{{"userId":"p{p}","name":"add_revenue","value":1,"id":"p{p}-{n}"}}"#);
                let response = http
                    .post(format!("{url}/liveEvent"))
                    .header("Authorization", "token-a")
                    .header("Content-Type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .expect("request");
                assert_eq!(response.status().as_u16(), 200, "a request with a token valid throughout failed");
                n += 1;
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for round in 0..10 {
        write_tokens(&tokens, if round % 2 == 0 { &v2 } else { &v1 });
        sighup(server.pid());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    write_tokens(&tokens, &v2);
    sighup(server.pid());
    within(Duration::from_secs(10), "token b to be accepted after the reload", async {
        while status_of(&http, &server.url, "POST", "/liveEvent", Some("token-b")).await != 200 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // A broken file: the set in force (a and b) stays, and the log says why.
    write_tokens(&tokens, "[[token]]\nname = \"a\"\nscopes = [\"everything\"]\nvalue = \"x\"\n");
    sighup(server.pid());
    within(Duration::from_secs(10), "the refusal of the broken file to be logged", async {
        while !server.stderr().contains("tokens file not re-read") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(server.stderr().contains("unknown scope"), "{}", server.stderr());
    stop.store(true, Ordering::Relaxed);
    for producer in producers {
        producer.await.expect("a producer saw a refusal");
    }
    assert!(sent.load(Ordering::Relaxed) > 0);
    assert_eq!(status_of(&http, &server.url, "POST", "/liveEvent", Some("token-a")).await, 200);
    assert_eq!(status_of(&http, &server.url, "POST", "/liveEvent", Some("token-b")).await, 200);
    // v3 drops token a.
    write_tokens(&tokens, &v3);
    sighup(server.pid());
    within(Duration::from_secs(10), "token a to be refused after its removal", async {
        while status_of(&http, &server.url, "POST", "/liveEvent", Some("token-a")).await != 401 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(status_of(&http, &server.url, "POST", "/liveEvent", Some("token-b")).await, 200);
    assert!(!server.stderr().contains("token-a") && !server.stderr().contains("token-b"), "a token was logged");
}

/// A token limited to 200 events a second (burst 100) and a client that sends 1,000 events in
/// batches of 50, 8 at a time: the server answers 429 with Retry-After (nothing stored) to what is
/// over the limit, and the client, honouring it, ends with every event stored exactly once.
#[tokio::test]
async fn a_burst_over_the_rate_limit_gets_429_and_the_client_stores_every_event_once() {
    let env = Env::new(StoreKind::Sqlite).await;
    let tokens = env.tmp.path().join("tokens.toml");
    write_tokens(
        &tokens,
        "[[token]]\nname = \"producer\"\nscopes = [\"ingest\"]\nvalue = \"limited\"\nevents_per_second = 200\nburst = 100\n",
    );
    let server = env.server_with(&["--tokens-file", &tokens.display().to_string()]).await;
    let http = http();
    // Over the burst at once: 429 with Retry-After, and nothing of the refused batch stored.
    let batch = |from: usize, n: usize| -> String {
        (from..from + n)
            .map(|i| format!("{{\"userId\":\"direct\",\"name\":\"add_revenue\",\"value\":1,\"id\":\"d-{i}\"}}\n"))
            .collect()
    };
    let first = http
        .post(format!("{}/events", server.url))
        .header("Authorization", "limited")
        .header("Content-Type", "application/x-ndjson")
        .body(batch(0, 100))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status().as_u16(), 200);
    let second = http
        .post(format!("{}/events", server.url))
        .header("Authorization", "limited")
        .header("Content-Type", "application/x-ndjson")
        .body(batch(100, 100))
        .send()
        .await
        .unwrap();
    assert_eq!(second.status().as_u16(), 429, "{:?}", second.text().await);
    let retry_after: u64 = second.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(log_lines(&env.log_dir()).len(), 100, "the refused batch was stored");
    // More than the burst in one request can never pass: 413, not an endless 429.
    let huge = http
        .post(format!("{}/events", server.url))
        .header("Authorization", "limited")
        .body(batch(1000, 101))
        .send()
        .await
        .unwrap();
    assert_eq!(huge.status().as_u16(), 413);

    let lines: Vec<String> =
        (0..1000).map(|i| format!("{{\"userId\":\"c{}\",\"name\":\"add_revenue\",\"value\":1}}", i % 10)).collect();
    let file = env.write_file("events.jsonl", &lines);
    let out = client(&file, &server.url, &["--token", "limited", "--batch", "50", "--concurrency", "8"]).await;
    assert!(out.status.success(), "the client did not complete: {out}");
    let stored = log_lines(&env.log_dir());
    let from_client: Vec<_> = stored.iter().filter(|e| e["userId"].as_str().unwrap().starts_with('c')).collect();
    assert_eq!(from_client.len(), 1000, "every event of the client once: {out}");
    let ids: std::collections::BTreeSet<_> = from_client.iter().map(|e| e["id"].to_string()).collect();
    assert_eq!(ids.len(), 1000, "an event stored twice");
    let metrics = http.get(format!("{}/metrics", server.url)).send().await.unwrap().text().await.unwrap();
    let limited = metrics
        .lines()
        .find(|l| l.starts_with(r#"eps_http_auth_refusals_total{route="/events",reason="rate_limited"}"#))
        .unwrap_or_else(|| panic!("no rate_limited count in /metrics:\n{metrics}"));
    let count: f64 = limited.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 2.0, "the client's burst met no 429: {limited}");
}

async fn preflight(http: &reqwest::Client, url: &str, path: &str, origin: &str) -> reqwest::Response {
    http.request(reqwest::Method::OPTIONS, format!("{url}{path}"))
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "authorization, content-type, content-encoding")
        .send()
        .await
        .unwrap()
}

fn allowed_origin(response: &reqwest::Response) -> Option<String> {
    response.headers().get("access-control-allow-origin").map(|v| v.to_str().unwrap().to_string())
}

/// A page of an allowed origin may send events (its preflight is answered, the POST's answer carries
/// the CORS header); another origin gets no CORS header, so its browser blocks the request; the read
/// routes never allow a cross-origin read, from any origin.
#[tokio::test]
async fn cors_preflights_are_answered_for_allowed_origins_on_the_ingest_routes_only() {
    let env = Env::new(StoreKind::Sqlite).await;
    let mut server = env
        .server_with_env(
            &["--cors-origin", "https://shop.example"],
            &[("EPS_CORS_ORIGINS", "https://ignored.example".into())],
        )
        .await;
    let http = http();
    for path in ["/liveEvent", "/events"] {
        let ok = preflight(&http, &server.url, path, "https://shop.example").await;
        assert!(ok.status().is_success(), "preflight {path}: {}", ok.status());
        assert_eq!(allowed_origin(&ok).as_deref(), Some("https://shop.example"), "preflight {path}");
        let methods = ok.headers()["access-control-allow-methods"].to_str().unwrap().to_ascii_uppercase();
        assert!(methods.contains("POST"), "{methods}");
        let headers = ok.headers()["access-control-allow-headers"].to_str().unwrap().to_ascii_lowercase();
        assert!(headers.contains("authorization") && headers.contains("content-encoding"), "{headers}");
        let refused = preflight(&http, &server.url, path, "https://evil.example").await;
        assert_eq!(allowed_origin(&refused), None, "preflight {path} from a refused origin");
    }
    let posted = http
        .post(format!("{}/liveEvent", server.url))
        .header("Origin", "https://shop.example")
        .header("Authorization", "secret")
        .header("Content-Type", "application/json")
        .body(EVENT)
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status().as_u16(), 200);
    assert_eq!(allowed_origin(&posted).as_deref(), Some("https://shop.example"));
    for path in ["/userEvents/u1", "/console/summary", "/metrics", "/"] {
        let pre = preflight(&http, &server.url, path, "https://shop.example").await;
        assert_eq!(allowed_origin(&pre), None, "preflight {path} allowed a cross-origin read");
        let get = http
            .get(format!("{}{path}", server.url))
            .header("Origin", "https://shop.example")
            .header("Authorization", "secret")
            .send()
            .await
            .unwrap();
        assert_eq!(allowed_origin(&get), None, "GET {path} allowed a cross-origin read");
    }
    // Gone before the next server takes the data directory's writer lock.
    server.kill().await;
    // The environment's comma-separated list, when no flag is given.
    let server = env.server_with_env(&[], &[("EPS_CORS_ORIGINS", "https://a.example, https://b.example".into())]).await;
    let b = preflight(&http, &server.url, "/events", "https://b.example").await;
    assert_eq!(allowed_origin(&b).as_deref(), Some("https://b.example"));
}

/// The console page and its assets carry a Content-Security-Policy that forbids framing, and
/// `X-Content-Type-Options: nosniff`. (tests/http/console_browser.rs shows the page works under it.)
#[tokio::test]
async fn the_console_page_carries_its_security_headers() {
    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server().await;
    let http = http();
    for path in ["/", "/console/console.js", "/console/console.css"] {
        let response = http.get(format!("{}{path}", server.url)).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let header = |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap().to_string());
        let csp = header("content-security-policy").unwrap_or_else(|| panic!("GET {path}: no Content-Security-Policy"));
        for directive in ["frame-ancestors 'none'", "script-src 'self'", "default-src 'none'"] {
            assert!(csp.contains(directive), "GET {path}: no {directive:?} in {csp:?}");
        }
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{csp}");
        assert_eq!(header("x-content-type-options").as_deref(), Some("nosniff"), "GET {path}");
    }
}

fn gz(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

async fn post_gzip(http: &reqwest::Client, url: &str, path: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
    let content_type = if path == "/events" { "application/x-ndjson" } else { "application/json" };
    let response = http
        .post(format!("{url}{path}"))
        .header("Authorization", "secret")
        .header("Content-Type", content_type)
        .header("Content-Encoding", "gzip")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(serde_json::Value::Null))
}

/// The server's peak resident memory (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// gzip bodies on both ingest routes: a batch and an event are stored; a bomb (512 MiB of zeros in
/// 512 KiB) gets 413 after at most the limit's worth of decompression (the server's peak memory stays
/// far below what inflating it would take); a truncated stream gets 400; nothing of either is stored.
/// `eps client --compress gzip` delivers a file.
#[tokio::test]
async fn gzip_bodies_are_taken_and_bombs_and_truncated_streams_refused() {
    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server_with(&["--body-limit", "65536", "--batch-body-limit", "1048576"]).await;
    let http = http();
    let batch: String =
        (0..300).map(|i| format!("{{\"userId\":\"g{}\",\"name\":\"add_revenue\",\"value\":1}}\n", i % 7)).collect();
    let (status, answer) = post_gzip(&http, &server.url, "/events", gz(batch.as_bytes())).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["accepted"], 300, "{answer}");
    let (status, answer) = post_gzip(&http, &server.url, "/liveEvent", gz(EVENT.as_bytes())).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(log_lines(&env.log_dir()).len(), 301);

    // 1 MiB of zeros compresses to about 1 KiB; 512 such members make a 512 MiB body.
    let member = gz(&vec![0u8; 1 << 20]);
    let bomb = member.repeat(512);
    assert!(bomb.len() < 1 << 20, "the bomb itself is within the limit: {}", bomb.len());
    let before = peak_rss(server.pid());
    for path in ["/events", "/liveEvent"] {
        let limit_ok = if path == "/events" { bomb.clone() } else { member.repeat(2) };
        let (status, answer) = post_gzip(&http, &server.url, path, limit_ok).await;
        assert_eq!(status, 413, "{path}: {answer}");
        assert!(answer["error"].as_str().unwrap().contains("decompressed"), "{answer}");
    }
    let grown = peak_rss(server.pid()).saturating_sub(before);
    assert!(grown < 64 << 20, "the bomb was inflated: peak memory grew by {grown} bytes");

    let whole = gz(batch.as_bytes());
    for cut in [whole.len() - 4, whole.len() / 2, 5] {
        let (status, answer) = post_gzip(&http, &server.url, "/events", whole[..cut].to_vec()).await;
        assert_eq!(status, 400, "cut at {cut}: {answer}");
    }
    assert_eq!(log_lines(&env.log_dir()).len(), 301, "a refused body was stored");

    let lines: Vec<String> =
        (0..500).map(|i| format!("{{\"userId\":\"z{}\",\"name\":\"add_revenue\",\"value\":2}}", i % 5)).collect();
    let file = env.write_file("gz.jsonl", &lines);
    let out = client(&file, &server.url, &["--compress", "gzip", "--batch", "100"]).await;
    assert!(out.status.success(), "{out}");
    assert_eq!(log_lines(&env.log_dir()).len(), 801);
}
