//! One module per scenario; each adds its figures to `ctx.report`.

pub mod auth;
pub mod client;
pub mod console;
pub mod dedup;
pub mod freshness;
pub mod ingest;
pub mod nats;
pub mod process;
pub mod scale;
pub mod served;
pub mod users;

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;

use crate::util::{free_port, Proc};
use crate::Ctx;

/// A fresh `eps server` on a free port with its data in `data_dir`, ready to take requests.
pub fn start_eps_server(ctx: &Ctx, data_dir: &Path, log: &Path) -> anyhow::Result<(Proc, SocketAddr)> {
    start_eps_server_with(ctx, data_dir, log, &[] as &[&OsStr])
}

/// [`start_eps_server`] with more arguments (e.g. `--log nats://…`).
pub fn start_eps_server_with<S: AsRef<OsStr>>(
    ctx: &Ctx,
    data_dir: &Path,
    log: &Path,
    extra: &[S],
) -> anyhow::Result<(Proc, SocketAddr)> {
    std::fs::create_dir_all(data_dir)?;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let mut proc = Proc::spawn(
        "eps server",
        ctx.eps_cmd().arg("server").arg("--listen").arg(addr.to_string()).arg("--data-dir").arg(data_dir).args(extra),
        log,
    )?;
    proc.wait_listening(addr, Duration::from_secs(30))?;
    Ok((proc, addr))
}

/// Waits for the first 200 of `GET {base}/readyz` (polled every `poll`), failing if `server` exits or
/// `limit` passes; answers how long it took from `since`.
pub fn wait_ready(
    ctx: &Ctx,
    http: &reqwest::Client,
    server: &mut Proc,
    base: &str,
    since: std::time::Instant,
    poll: Duration,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let url = format!("{base}/readyz");
    loop {
        server.check_alive()?;
        let ready = ctx.rt.block_on(async {
            http.get(&url).timeout(Duration::from_secs(2)).send().await.is_ok_and(|r| r.status().is_success())
        });
        if ready {
            return Ok(since.elapsed());
        }
        if since.elapsed() > limit {
            anyhow::bail!("eps server at {base} not ready after {} s", limit.as_secs());
        }
        std::thread::sleep(poll);
    }
}

/// The noop reference server on a free port, ready to take requests.
pub fn start_noop_server(ctx: &Ctx, log: &Path) -> anyhow::Result<(Proc, SocketAddr)> {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let mut proc = Proc::spawn("noop-server", std::process::Command::new(&ctx.noop_server).arg(addr.to_string()), log)?;
    proc.wait_listening(addr, Duration::from_secs(10))?;
    Ok((proc, addr))
}

/// POSTs a JSON Lines batch to `url` (`…/events`) with the seed's token; what the server answered:
/// `(accepted, duplicates)`. A non-2xx answer is an error naming it.
pub async fn post_batch(
    http: &reqwest::Client,
    url: &str,
    body: impl Into<reqwest::Body>,
) -> anyhow::Result<(u64, u64)> {
    let resp = http
        .post(url)
        .header("Authorization", "secret")
        .header("Content-Type", "application/x-ndjson")
        .body(body)
        .send()
        .await?;
    let status = resp.status();
    let text = resp.text().await?;
    if !status.is_success() {
        anyhow::bail!("POST /events answered {status}: {}", text.chars().take(200).collect::<String>());
    }
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("answer {text:?}"))?;
    Ok((v["accepted"].as_u64().unwrap_or(0), v["duplicates"].as_u64().unwrap_or(0)))
}
