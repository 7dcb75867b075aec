//! Start-up that speaks (issue 20, item 3): a server recovering a large log listens at once, answers
//! `GET /healthz` 200 and what needs the log (`POST /liveEvent`, `POST /events`, `GET /readyz`) 503 with
//! `Retry-After` and an error saying the log is being recovered; it logs the recovery's progress every
//! few seconds and its duration at the end, then serves. A SIGTERM during that recovery stops the server
//! gracefully and soon, without waiting for the rest of the recovery.
//!
//! The slow disk is the fault shim's read stall on the log's segments (tests/common/faultshim.c), so the
//! recovery lasts seconds whatever the machine; the log (tens of MiB) is written directly as segments in
//! the server's line format.

use crate::common;

use std::time::Duration;

use common::shim::Shim;
use common::*;
use serde_json::Value;

const MIB: usize = 1024 * 1024;

/// Writes about `mib` MiB of log as segments of 4 MiB, every line with an id and a receive time of now
/// (so the whole log is inside the de-duplication window and start-up reads all of it).
fn write_large_log(env: &Env, mib: usize) -> usize {
    let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    let mut lines = Vec::new();
    let mut bytes = 0;
    while bytes < mib * MIB {
        let i = lines.len();
        let line =
            format!(r#"{{"userId":"user-{}","name":"add_revenue","value":1,"id":"startup-{i}","ts":{ts}}}"#, i % 997);
        bytes += line.len() + 1;
        lines.push(line);
    }
    let segments = write_log(&env.log_dir(), &lines, 4 * MIB);
    assert!(segments.len() >= 4, "{segments:?}");
    lines.len()
}

/// Starts `eps server` on the env's data directory under `shim`, and waits for its first stdout line.
async fn start_recovering_server(env: &Env, shim: &Shim) -> (ChildGuard, String) {
    let mut a = args(&["server", "--listen", "127.0.0.1:0", "--data-dir", &env.data_dir.display().to_string()]);
    a.extend(env.db.args());
    let server = ChildGuard::spawn(&a, &shim.env(), env.tmp.path());
    let prefix = "eps server recovering the log on http://";
    let addr = within(START_TIMEOUT, "the server's first line", async {
        loop {
            let out = server.stdout();
            if let Some(line) = out.lines().next() {
                match line.strip_prefix(prefix).and_then(|rest| rest.split(": ").next()) {
                    Some(addr) => return addr.to_string(),
                    None => panic!(
                        "the server's first line is not {prefix:?} while its log is recovered: {line:?}\nstderr:\n{}",
                        server.stderr()
                    ),
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    (server, format!("http://{addr}"))
}

/// Status, Retry-After and JSON body of a request.
async fn answer(request: reqwest::RequestBuilder) -> (u16, Option<String>, Value) {
    let response = request.send().await.expect("the server answers while it recovers its log");
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    (status, retry_after, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_recovering_a_large_log_answers_503_with_retry_after_logs_its_progress_then_serves() {
    let env = Env::new(StoreKind::Sqlite).await;
    let events = write_large_log(&env, 24);
    let shim = Shim::new(env.tmp.path(), "server-events-");
    // Each read(2) of a segment waits 150 ms: 6 segments read twice (producers, then the id window),
    // at least 12 reads (each is a few read calls), so recovery lasts seconds.
    shim.stall_reads_ms(150);
    let (server, url) = start_recovering_server(&env, &shim).await;
    let http = http();

    // Up: /healthz answers at once.
    let (status, _, body) = answer(http.get(format!("{url}/healthz"))).await;
    assert_eq!(status, 200, "{body}");
    // Not ready, and saying why, with Retry-After.
    let (status, retry_after, body) = answer(http.get(format!("{url}/readyz"))).await;
    assert_eq!((status, retry_after.as_deref()), (503, Some("1")), "{body}");
    assert!(body["log"].as_str().unwrap_or_default().contains("the log is being recovered"), "{body}");
    // What needs the log: 503 with Retry-After, and the error says the log is being recovered.
    let live = http
        .post(format!("{url}/liveEvent"))
        .header("Authorization", TOKEN)
        .header("Content-Type", "application/json")
        .body(event_line("during-recovery", "add_revenue", "1"));
    let (status, retry_after, body) = answer(live).await;
    assert_eq!((status, retry_after.as_deref()), (503, Some("1")), "{body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("the log is being recovered"), "{body}");
    let batch = http
        .post(format!("{url}/events"))
        .header("Authorization", TOKEN)
        .header("Content-Type", "application/x-ndjson")
        .body(format!("{}\n", event_line("during-recovery", "add_revenue", "1")));
    let (status, retry_after, body) = answer(batch).await;
    assert_eq!((status, retry_after.as_deref()), (503, Some("1")), "{body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("the log is being recovered"), "{body}");
    assert!(!server.stdout().contains("eps server listening"), "ready already? {}", server.stdout());

    // Once recovered: the "listening" line, 200 to an event and to /readyz.
    within(Duration::from_secs(120), "the server to finish recovering", async {
        while !server.stdout().contains(&format!("eps server listening on {url}")) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let (status, body) = post_event(&http, &url, &event_line("after-recovery", "add_revenue", "1")).await;
    assert_eq!(status, 200, "{body}");
    within(Duration::from_secs(30), "/readyz to answer 200", async {
        while answer(http.get(format!("{url}/readyz"))).await.0 != 200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // The event sent before, and the recovered ones, are all there.
    let lines = log_lines(&env.log_dir());
    assert_eq!(lines.len(), events + 1);

    // Its log told the story: progress while reading (bytes and segment reads), then the duration.
    let stderr = server.stderr();
    let progress: Vec<&str> = stderr.lines().filter(|l| l.contains("recovering the log:")).collect();
    assert!(
        progress.iter().any(|l| l.contains("MiB (") && l.contains("segment reads)")),
        "no progress line with bytes and segment reads:\n{stderr}"
    );
    let opened = stderr.lines().find(|l| l.contains("log opened: recovered in")).unwrap_or_else(|| panic!("{stderr}"));
    let took: f64 = opened
        .split("took_secs=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no took_secs in {opened:?}"));
    assert!(took >= 1.8, "the recovery took {took} s by its own line; the stalls alone are over 1.8 s: {opened}");

    sigterm(server.child.id().unwrap()).await;
    let mut server = server;
    let status = within(Duration::from_secs(20), "the server to stop", server.child.wait()).await.unwrap();
    assert!(status.success(), "{status}: {}", server.stderr());
}

/// A SIGTERM during a long recovery: the server stops at the next segment read, gracefully (exit 0),
/// without reading the rest of the log first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_long_recovery_stops_the_server_soon_and_gracefully() {
    let env = Env::new(StoreKind::Sqlite).await;
    write_large_log(&env, 16);
    let shim = Shim::new(env.tmp.path(), "server-events-");
    // At least 8 reads of 2 s: 16 s of recovery, were it not stopped.
    shim.stall_reads_ms(2_000);
    let (mut server, url) = start_recovering_server(&env, &shim).await;
    let (status, _, _) = answer(http().get(format!("{url}/readyz"))).await;
    assert_eq!(status, 503);
    let asked = std::time::Instant::now();
    sigterm(server.child.id().unwrap()).await;
    let status = within(Duration::from_secs(30), "the server to stop", server.child.wait()).await.unwrap();
    let stderr = server.stderr();
    assert!(status.success(), "{status}:\n{stderr}");
    // One read under way is waited for (2 s), not the remaining ones.
    assert!(asked.elapsed() < Duration::from_secs(8), "stopping took {:?}:\n{stderr}", asked.elapsed());
    assert!(!stderr.contains("log opened"), "the recovery ran to its end:\n{stderr}");
}
