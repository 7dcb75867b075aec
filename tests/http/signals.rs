//! Signals (issue 15, item 10): SIGHUP is ignored (logged) by the server and by a `--follow` processor,
//! which keep working; it never stops either without the graceful drain. SIGTERM during a database
//! outage is in `fault_infra.rs` (it needs a PostgreSQL cluster of its own). A SIGTERM during start-up is
//! a graceful stop too.

use crate::common;

use std::time::Duration;

use common::shim::Shim;
use common::*;

async fn send_signal(signal: &str, pid: u32) {
    let pid = pid.to_string();
    let status =
        within(Duration::from_secs(10), "kill", tokio::process::Command::new("kill").args([signal, &pid]).status())
            .await
            .expect("running kill");
    assert!(status.success(), "kill {signal} {pid} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_is_ignored_by_the_server_and_a_following_processor() {
    let env = Env::new(StoreKind::Sqlite).await;
    let mut server = env.server().await;
    let mut processor = env.spawn_process(&["--follow"]);
    let http = http();
    let (status, body) = post_event(&http, &server.url, &event_line("hup-a", "add_revenue", "1")).await;
    assert_eq!(status, 200, "{body}");
    within(Duration::from_secs(30), "the first event to be applied", async {
        while get_user(&http, &server.url, "hup-a").await.0 != 200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    send_signal("-HUP", server.pid()).await;
    send_signal("-HUP", processor.child.id().expect("the processor runs")).await;
    // Time for a SIGHUP's default action (terminate) to take effect, were it not handled.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(server.child.try_wait().unwrap().is_none(), "SIGHUP stopped the server: {}", server.stderr());
    assert!(processor.child.try_wait().unwrap().is_none(), "SIGHUP stopped the processor: {}", processor.stderr());

    // Both keep working: a request is answered, an event is still applied.
    let (status, body) = post_event(&http, &server.url, &event_line("hup-a", "add_revenue", "2")).await;
    assert_eq!(status, 200, "{body}");
    within(Duration::from_secs(30), "an event sent after SIGHUP to be applied", async {
        while revenue_of(&http, &server.url, "hup-a").await != "3" {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(server.stderr().contains("SIGHUP received and ignored"), "{}", server.stderr());
    assert!(processor.stderr().contains("SIGHUP received and ignored"), "{}", processor.stderr());

    // SIGTERM still stops both cleanly.
    server.sigterm().await;
    sigterm(processor.child.id().unwrap()).await;
    assert!(server.wait(Duration::from_secs(20)).await.success(), "{}", server.stderr());
    let status = within(Duration::from_secs(20), "the processor to stop", processor.child.wait()).await.unwrap();
    assert!(status.success(), "{status}: {}", processor.stderr());
}

/// A SIGTERM while the server is still starting (here: stalled in recovery's sync of the newest segment,
/// as on a slow disk) is a graceful stop (exit 0), never the default action's kill: the handlers are
/// installed before the log is opened, not after the "listening" line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_start_up_is_a_graceful_stop() {
    let env = Env::new(StoreKind::Sqlite).await;
    // A log to recover: one event, then a clean stop.
    let mut first = env.server().await;
    let (status, body) = post_event(&http(), &first.url, &event_line("early", "add_revenue", "1")).await;
    assert_eq!(status, 200, "{body}");
    first.sigterm().await;
    assert!(first.wait(Duration::from_secs(20)).await.success(), "{}", first.stderr());

    let shim = Shim::new(env.tmp.path(), "server-events-");
    shim.stall_syncs_ms(2_000);
    let mut args = args(&["server", "--listen", "127.0.0.1:0", "--data-dir"]);
    args.push(env.data_dir.display().to_string());
    args.extend(env.db.args());
    let stderr_path = env.tmp.path().join("starting-server.stderr");
    let mut child = eps_command(&args, &shim.env())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("cannot start eps server");
    within(Duration::from_secs(20), "the server's start-up to reach the stalled sync", async {
        while !shim.stalled() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    sigterm(child.id().expect("the server runs")).await;
    let status = within(Duration::from_secs(30), "the server to stop", child.wait()).await.unwrap();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert!(status.success(), "a SIGTERM during start-up ended the server with {status}:\n{stderr}");
}
