//! The catalogue of bad (and borderline good) requests against the real server: each gets the right
//! status and a JSON `error`, and only the accepted ones reach the log.

use crate::common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const AUTH: (&str, &str) = ("Authorization", "secret");
const JSON: (&str, &str) = ("Content-Type", "application/json");

struct Case {
    what: &'static str,
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    body: Vec<u8>,
    status: u16,
    /// For 200: the event expected in the log as (userId, name, value). Otherwise: a substring of
    /// the JSON `error` (compared case-insensitively).
    expect: Expect,
}

enum Expect {
    Stored(String, &'static str, &'static str),
    Error(&'static str),
}

fn post(
    what: &'static str,
    headers: &[(&'static str, &'static str)],
    body: impl Into<Vec<u8>>,
    status: u16,
    expect: Expect,
) -> Case {
    Case { what, method: "POST", path: "/liveEvent", headers: headers.to_vec(), body: body.into(), status, expect }
}

fn bad(what: &'static str, body: impl Into<Vec<u8>>, error: &'static str) -> Case {
    post(what, &[AUTH, JSON], body, 400, Expect::Error(error))
}

fn stored(user: &str, value: &'static str) -> Expect {
    Expect::Stored(user.to_string(), "add_revenue", value)
}

fn catalogue() -> Vec<Case> {
    let ok = |user: &str, value: &str| format!(r#"{{"userId":"{user}","name":"add_revenue","value":{value}}}"#);
    let user_255 = "u".repeat(255);
    let user_256 = "u".repeat(256);
    // A valid event padded with JSON whitespace to exactly `len` bytes.
    let padded = |user: &str, len: usize| {
        let mut body = ok(user, "1").into_bytes();
        body.resize(len, b' ');
        body
    };
    vec![
        // Authorization.
        post("no token", &[JSON], ok("rejected-1", "1"), 401, Expect::Error("token")),
        post("wrong token", &[("Authorization", "wrong"), JSON], ok("rejected-2", "1"), 401, Expect::Error("token")),
        post(
            "wrong bearer token",
            &[("Authorization", "Bearer wrong"), JSON],
            ok("rejected-3", "1"),
            401,
            Expect::Error("token"),
        ),
        post("bare token", &[AUTH, JSON], ok("ok-bare", "1"), 200, stored("ok-bare", "1")),
        post(
            "Bearer token",
            &[("Authorization", "Bearer secret"), JSON],
            ok("ok-bearer", "2"),
            200,
            stored("ok-bearer", "2"),
        ),
        // Body shape.
        bad("an array of the field values", r#"["rejected-arr","add_revenue",1]"#, "must be a JSON object"),
        bad("malformed JSON", r#"{"userId": "rejected-4", name: "add_revenue", "value": 1}"#, "not valid JSON"),
        bad("truncated JSON", r#"{"userId":"rejected-5","name":"add_revenue","value":1"#, "not valid JSON"),
        bad("empty body", "", "not valid JSON"),
        bad("missing field", r#"{"userId":"rejected-6","name":"add_revenue"}"#, "missing field `value`"),
        bad("userId a number", r#"{"userId":5,"name":"add_revenue","value":1}"#, "invalid type"),
        bad("unknown name", r#"{"userId":"rejected-7","name":"refund","value":1}"#, "refund"),
        bad("extra unknown field", r#"{"userId":"rejected-8","name":"add_revenue","value":1,"extra":1}"#, "extra"),
        bad(
            "duplicate key",
            r#"{"userId":"rejected-9","userId":"rejected-10","name":"add_revenue","value":1}"#,
            "duplicate",
        ),
        bad("a JSON array", r#"[{"userId":"rejected-11","name":"add_revenue","value":1}]"#, "invalid"),
        // Value.
        bad("value as a string", r#"{"userId":"rejected-12","name":"add_revenue","value":"10"}"#, "not a string"),
        bad("value null", r#"{"userId":"rejected-13","name":"add_revenue","value":null}"#, "must be a number"),
        bad("negative value", r#"{"userId":"rejected-14","name":"add_revenue","value":-5}"#, "negative"),
        bad("negative zero", r#"{"userId":"rejected-15","name":"add_revenue","value":-0}"#, "negative"),
        bad("1e400", r#"{"userId":"rejected-16","name":"add_revenue","value":1e400}"#, "range"),
        bad(
            "40 digits",
            format!(r#"{{"userId":"rejected-17","name":"add_revenue","value":{}}}"#, "1234567890".repeat(4)),
            "significant digits",
        ),
        bad(
            "29 decimal places",
            r#"{"userId":"rejected-18","name":"add_revenue","value":0.00000000000000000000000000001}"#,
            "decimal places",
        ),
        bad("NaN literal", r#"{"userId":"rejected-19","name":"add_revenue","value":NaN}"#, "not valid JSON"),
        bad("Infinity literal", r#"{"userId":"rejected-20","name":"add_revenue","value":Infinity}"#, "not valid JSON"),
        // userId.
        bad("empty userId", r#"{"userId":"","name":"add_revenue","value":1}"#, "userId"),
        bad("control character in userId", r#"{"userId":"rejected\u0007","name":"add_revenue","value":1}"#, "control"),
        post("255-byte userId", &[AUTH, JSON], ok(&user_255, "3"), 200, stored(&user_255, "3")),
        bad("256-byte userId", ok(&user_256, "1"), "256 bytes"),
        // Idempotency key.
        bad("empty id", r#"{"userId":"rejected-21","name":"add_revenue","value":1,"id":""}"#, "id must be"),
        bad(
            "129-byte id",
            format!(r#"{{"userId":"rejected-22","name":"add_revenue","value":1,"id":"{}"}}"#, "i".repeat(129)),
            "id must be",
        ),
        // Size and media type.
        post("body of exactly 1 MiB", &[AUTH, JSON], padded("ok-1mib", 1024 * 1024), 200, stored("ok-1mib", "1")),
        post("body over 1 MiB", &[AUTH, JSON], padded("rejected-23", 1024 * 1024 + 1), 413, Expect::Error("limit")),
        post(
            "Content-Type text/plain",
            &[AUTH, ("Content-Type", "text/plain")],
            ok("rejected-24", "1"),
            415,
            Expect::Error("Content-Type"),
        ),
        post(
            "JSON with a charset",
            &[AUTH, ("Content-Type", "application/json; charset=utf-8")],
            ok("ok-charset", "4"),
            200,
            stored("ok-charset", "4"),
        ),
        post("no Content-Type", &[AUTH], ok("ok-no-type", "5"), 200, stored("ok-no-type", "5")),
        // Routes.
        Case {
            what: "GET /liveEvent",
            method: "GET",
            path: "/liveEvent",
            headers: vec![AUTH],
            body: vec![],
            status: 405,
            expect: Expect::Error("method"),
        },
        Case {
            what: "unknown path",
            method: "GET",
            path: "/nope",
            headers: vec![AUTH],
            body: vec![],
            status: 404,
            expect: Expect::Error("not found"),
        },
        Case {
            what: "POST to an unknown path",
            method: "POST",
            path: "/liveEvents",
            headers: vec![AUTH, JSON],
            body: ok("rejected-25", "1").into(),
            status: 404,
            expect: Expect::Error("not found"),
        },
        Case {
            what: "GET /userEvents without token",
            method: "GET",
            path: "/userEvents/ok-bare",
            headers: vec![],
            body: vec![],
            status: 401,
            expect: Expect::Error("token"),
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_its_status_and_a_json_error_and_only_accepted_events_are_logged() {
    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server().await;
    let http = http();
    let mut failures = Vec::new();
    let mut want_log = Vec::new();

    for case in catalogue() {
        let method = reqwest::Method::from_bytes(case.method.as_bytes()).unwrap();
        let mut request = http.request(method, format!("{}{}", server.url, case.path)).body(case.body.clone());
        for (name, value) in &case.headers {
            request = request.header(*name, *value);
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{}: request failed: {e}", case.what));
                continue;
            }
        };
        let status = response.status().as_u16();
        let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap_or("").to_string());
        let text = response.text().await.unwrap_or_default();
        let body: Option<Value> = serde_json::from_str(&text).ok();
        if status != case.status {
            failures.push(format!("{}: want {}, got {status} {text}", case.what, case.status));
            continue;
        }
        if !content_type.as_deref().is_some_and(|t| t.starts_with("application/json")) {
            failures.push(format!("{}: Content-Type {content_type:?}, not JSON", case.what));
        }
        match (&case.expect, &body) {
            (Expect::Stored(user, name, value), Some(body)) => {
                if *body != json!({"message": "Event received"}) {
                    failures.push(format!("{}: unexpected answer {body}", case.what));
                }
                want_log.push((user.clone(), name.to_string(), value.to_string()));
            }
            (Expect::Error(part), Some(body)) => match body["error"].as_str() {
                Some(error) if error.to_lowercase().contains(&part.to_lowercase()) => {}
                Some(error) => failures.push(format!("{}: error {error:?} does not mention {part:?}", case.what)),
                None => failures.push(format!("{}: no `error` string in {body}", case.what)),
            },
            (_, None) => failures.push(format!("{}: answer is not JSON: {text:?}", case.what)),
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}\nserver stderr:\n{}",
        failures.len(),
        failures.join("\n"),
        server.stderr()
    );

    // The log holds the accepted events, in order, and nothing from a rejected request.
    let got_log: Vec<(String, String, String)> = log_lines(&env.log_dir())
        .iter()
        .map(|l| {
            (l["userId"].as_str().unwrap().to_string(), l["name"].as_str().unwrap().to_string(), l["value"].to_string())
        })
        .collect();
    assert_eq!(got_log, want_log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_user_events_validates_the_user_id_and_answers_404_for_unknown_users() {
    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server().await;
    let http = http();
    let (status, body) = get_user(&http, &server.url, &"u".repeat(256)).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].is_string(), "{body}");
    let (status, body) = get_user(&http, &server.url, "nobody").await;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("nobody")), "{body}");
    let response =
        http.get(format!("{}/userEvents/nobody", server.url)).header("Authorization", "wrong").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 401);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].is_string(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_arrive_in_time_gets_408_with_a_json_error_and_is_not_logged() {
    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server_with(&["--request-timeout-secs", "1"]).await;
    let body = r#"{"userId":"slow","name":"add_revenue","value":1}"#;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", server.port)).await.unwrap();
    let head = format!(
        "POST /liveEvent HTTP/1.1\r\nHost: x\r\nAuthorization: secret\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{}",
        body.len(),
        &body[..10]
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    within(Duration::from_secs(10), "the 408 answer", stream.read_to_end(&mut response)).await.unwrap();
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let json_body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    let json_body: Value =
        serde_json::from_str(json_body).unwrap_or_else(|e| panic!("408 body is not JSON ({e}): {text}"));
    assert!(json_body["error"].is_string(), "{text}");
    assert!(log_lines(&env.log_dir()).is_empty());
}

/// Issue 16: one `UserId` rule for an event's `userId` and the path of `GET /userEvents/{userId}`:
/// every id the body refuses the path refuses too (400, with the same reason), and every id the body
/// takes the path takes (404 here: nothing was applied). Each path byte is percent-encoded, so the
/// server decodes exactly the id the body carried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_path_and_the_body_take_the_same_user_ids() {
    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server().await;
    let http = http();
    let (status, body) = get_user(&http, &server.url, "nobody-yet").await;
    assert_eq!(status, 404, "the store is connected: {body}");
    let ids = [
        "u".repeat(255),
        "u".repeat(256),
        "é".repeat(127),
        "é".repeat(128),
        " spaces inside ".to_string(),
        "a\tb".to_string(),
        "\u{85}".to_string(),
        "\u{7f}".to_string(),
        "zero\u{200b}width".to_string(),
    ];
    for id in &ids {
        let event = json!({"userId": id, "name": "add_revenue", "value": 0}).to_string();
        let (body_status, body_answer) = post_event(&http, &server.url, &event).await;
        let path: String = id.bytes().map(|b| format!("%{b:02X}")).collect();
        let (path_status, text) = get_user_once(&http, &server.url, &path).await;
        let path_answer: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        match body_status {
            200 => assert_eq!(path_status, 404, "{id:?}: the body took it, the path answered {path_answer}"),
            400 => {
                assert_eq!(
                    path_status, 400,
                    "{id:?}: the body refused it ({body_answer}), the path answered {path_answer}"
                );
                let reason = body_answer["error"].as_str().unwrap().strip_prefix("invalid event: ").unwrap();
                let path_error = path_answer["error"].as_str().unwrap();
                assert_eq!(path_error, format!("invalid userId in the path: {reason}"), "{id:?}");
            }
            other => panic!("{id:?}: POST /liveEvent answered {other} {body_answer}"),
        }
    }
}

/// The token is checked before anything else of the request: a wrong token with a bad body, a bad
/// Content-Type or a bad path is a 401, not the 400/415 the request would get with the right token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_refused_before_the_request_is_looked_at() {
    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server().await;
    let http = http();
    let url = &server.url;
    let requests = [
        http.post(format!("{url}/liveEvent")).header("Content-Type", "application/json").body("not json"),
        http.post(format!("{url}/liveEvent")).header("Content-Type", "text/html").body("{}"),
        http.post(format!("{url}/liveEvent")).header("Content-Encoding", "br").body("{}"),
        http.post(format!("{url}/events")).body("not json\n"),
        http.get(format!("{url}/userEvents/%00")),
        http.get(format!("{url}/userEvents/{}", "u".repeat(256))),
    ];
    for request in requests {
        let response = request.header("Authorization", "wrong").send().await.unwrap();
        let what = format!("{} {}", response.url().path(), response.status());
        assert_eq!(response.status().as_u16(), 401, "{what}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer", "{what}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body, json!({"error": "missing or wrong token in the Authorization header"}), "{what}");
    }
}
