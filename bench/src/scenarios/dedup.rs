//! dedup_state: the server's de-duplication state at scale (issue 17). A fresh eps server (file log,
//! default `--dedup-horizon-secs`, id window and segments) takes 10,000,000 events from 1,000 producers
//! whose ids follow the producer scheme (`<16 hex producer>-<sequence>`, what `eps client` sends), in
//! 1,000-event batches of one producer each, 8 in flight, the producers taking turns. Then:
//!
//! - `dedup_memory`: the server's VmHWM (and VmRSS) once every event is acknowledged; goal < 64 MiB.
//! - `dedup_startup`: the server SIGKILLed and started again on that data directory: time from spawn to
//!   the first `200` of `GET /readyz` (its producer table comes from the newest snapshot plus the log
//!   after it, its id window from the newest segments); the restarted server's VmHWM in the notes.
//! - the first producer's events re-sent to the restarted server: every one a duplicate, nothing stored
//!   (checked; a figure that fails this is FAILED).
//!
//! With --quick: 100,000 events from the same 1,000 producers (100 each).

use std::time::{Duration, Instant};

use futures::StreamExt as _;

use crate::report::{Figure, Status};
use crate::scenarios::{post_batch, start_eps_server, wait_ready};
use crate::util::{count_log_lines, free_port, mib, proc_status_bytes, Proc};
use crate::Ctx;

const PRODUCERS: u64 = 1_000;
/// Most events in one request (all of one producer).
const BATCH: u64 = 1_000;
const IN_FLIGHT: usize = 8;

/// The producer part of producer `p`'s ids: 16 lower-case hex digits.
fn producer_hex(p: u64) -> String {
    format!("{:016x}", 0x5eed_0000_0000_0000u64 ^ p.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// The body of one request: sequences `first..first + len` of producer `p`.
fn batch_body(p: u64, first: u64, len: u64) -> String {
    let hex = producer_hex(p);
    let mut body = String::with_capacity(len as usize * 96);
    for seq in first..first + len {
        body.push_str(&format!(
            r#"{{"userId":"user{}","name":"add_revenue","value":{},"id":"{hex}-{seq}"}}"#,
            seq % 997,
            seq % 100 + 1
        ));
        body.push('\n');
    }
    body
}

/// Sends every batch of `batches` (producer, first sequence, length), IN_FLIGHT at a time; sums of
/// `(accepted, duplicates)`.
fn send_all(ctx: &Ctx, http: &reqwest::Client, url: &str, batches: Vec<(u64, u64, u64)>) -> anyhow::Result<(u64, u64)> {
    ctx.rt.block_on(async {
        let mut answers = futures::stream::iter(batches)
            .map(|(p, first, len)| {
                let http = http.clone();
                let url = url.to_string();
                async move {
                    // Built on a worker thread, not on the one driving the stream.
                    let body = tokio::task::spawn_blocking(move || batch_body(p, first, len)).await?;
                    post_batch(&http, &url, body).await
                }
            })
            .buffer_unordered(IN_FLIGHT);
        let (mut accepted, mut duplicates) = (0, 0);
        while let Some(answer) = answers.next().await {
            let (a, d) = answer?;
            accepted += a;
            duplicates += d;
        }
        anyhow::Ok((accepted, duplicates))
    })
}

/// Starts eps server on `data` and measures the time from spawn to the first 200 of GET /readyz.
fn start_timed(
    ctx: &Ctx,
    http: &reqwest::Client,
    data: &std::path::Path,
    log: &std::path::Path,
) -> anyhow::Result<(Proc, String, Duration)> {
    let addr = format!("127.0.0.1:{}", free_port()?);
    let started = Instant::now();
    let mut server = Proc::spawn(
        "eps server",
        ctx.eps_cmd().arg("server").arg("--listen").arg(&addr).arg("--data-dir").arg(data),
        log,
    )?;
    let base = format!("http://{addr}");
    let took = wait_ready(ctx, http, &mut server, &base, started, Duration::from_millis(5), Duration::from_secs(300))?;
    Ok((server, base, took))
}

/// The bytes of the newest producer snapshot in `log_dir` (0 when there is none).
fn snapshot_bytes(log_dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(log_dir) else { return 0 };
    let mut newest: Option<(String, u64)> = None;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pos) = name.strip_prefix(".producers-").and_then(|r| r.strip_suffix(".snap")) {
            let len = entry.metadata().map_or(0, |m| m.len());
            let key = format!("{pos:0>20}");
            if newest.as_ref().is_none_or(|(k, _)| *k < key) {
                newest = Some((key, len));
            }
        }
    }
    newest.map_or(0, |(_, len)| len)
}

pub fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let dir = ctx.scratch("dedup_state")?;
    let n = ctx.size(10_000_000);
    let per_producer = n / PRODUCERS;
    let n = per_producer * PRODUCERS;
    let data = dir.path().join("eps-data");
    // A client of its own, dropped before a server is stopped gracefully (idle pooled connections would
    // hold the graceful shutdown).
    let http = {
        let _enter = ctx.rt.enter();
        reqwest::Client::builder().tcp_nodelay(true).timeout(Duration::from_secs(60)).build()?
    };

    // The load: the producers take turns, each sending its next batch.
    let mut batches = Vec::new();
    let mut first = 1;
    while first <= per_producer {
        let len = BATCH.min(per_producer - first + 1);
        batches.extend((0..PRODUCERS).map(|p| (p, first, len)));
        first += len;
    }
    let (server, addr) = start_eps_server(ctx, &data, &dir.path().join("eps-server.log"))?;
    let base_rss = proc_status_bytes(server.pid(), "VmRSS")?;
    let t = Instant::now();
    let (accepted, duplicates) = send_all(ctx, &http, &format!("http://{addr}/events"), batches)?;
    let load_secs = t.elapsed().as_secs_f64();
    let hwm = proc_status_bytes(server.pid(), "VmHWM")?;
    let rss = proc_status_bytes(server.pid(), "VmRSS")?;
    // SIGKILL (dropping a Proc kills it): the start-up that follows has only the snapshots the server
    // wrote as it went.
    drop(server);
    let lines = count_log_lines(&data.join("log"))?;
    let log_bytes: u64 =
        crate::util::log_segments(&data.join("log"))?.iter().map(|p| std::fs::metadata(p).map_or(0, |m| m.len())).sum();
    let snap = snapshot_bytes(&data.join("log"));

    let mut problems = Vec::new();
    if accepted != n || duplicates != 0 || lines != n {
        problems.push(format!(
            "LOAD MISMATCH: {accepted} accepted, {duplicates} duplicates, {lines} log lines; expected {n}, 0, {n}"
        ));
    }

    let (server, url, startup) = start_timed(ctx, &http, &data, &dir.path().join("eps-server-2.log"))?;
    let hwm_after = proc_status_bytes(server.pid(), "VmHWM")?;
    // The first producer's events again: every one a duplicate, nothing stored.
    let resend: Vec<_> =
        (1..=per_producer).step_by(BATCH as usize).map(|f| (0, f, BATCH.min(per_producer - f + 1))).collect();
    let (again, again_dups) = send_all(ctx, &http, &format!("{url}/events"), resend)?;
    drop(http);
    server.stop();
    let lines_after = count_log_lines(&data.join("log"))?;
    if again != per_producer || again_dups != per_producer || lines_after != n {
        problems.push(format!(
            "RE-SEND MISMATCH: {again} accepted, {again_dups} duplicates of {per_producer}; log {lines_after} lines, expected {n}"
        ));
    }

    let hwm_mib = mib(hwm);
    let mut fig = Figure::new(
        "dedup_memory",
        format!("{hwm_mib:.1} MiB"),
        "< 64 MiB".into(),
        if problems.is_empty() { Status::from_goal(hwm_mib < 64.0) } else { Status::Failed },
    );
    fig.notes = vec![
        format!(
            "VmHWM of eps server after {n} events from {PRODUCERS} producers (scheme ids, {BATCH}-event batches, \
             {IN_FLIGHT} in flight, {:.0} events/s); VmRSS {:.1} MiB, {:.1} MiB at start",
            n as f64 / load_secs,
            mib(rss),
            mib(base_rss)
        ),
        format!("log {:.0} MiB; producer snapshot {snap} bytes", log_bytes as f64 / 1048576.0),
    ];
    fig.notes.extend(problems.iter().cloned());
    ctx.report.figure(fig);

    let secs = startup.as_secs_f64();
    let mut fig = Figure::new(
        "dedup_startup",
        format!("{secs:.2} s"),
        "< 5 s".into(),
        if problems.is_empty() { Status::from_goal(secs < 5.0) } else { Status::Failed },
    );
    fig.notes = vec![
        "eps server SIGKILLed after the load and started again: spawn to the first 200 of GET /readyz".into(),
        format!("its VmHWM {:.1} MiB once ready", mib(hwm_after)),
        format!("the first producer's {per_producer} events re-sent: {again_dups} duplicates, log {lines_after} lines"),
    ];
    ctx.report.figure(fig);
    Ok(())
}
