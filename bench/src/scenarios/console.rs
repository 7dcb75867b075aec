//! console_overhead: single-event ingest (as ingest_single) with and without a console open.
//!
//! One eps server; wrk runs four times, alternating without and with a console reading
//! `GET /console/stream` (what the page does), so that drift over the minute falls on both sides. The
//! noise is the spread between the two runs of the same condition; the goal is that the console costs
//! no more than that noise (or 5 %, whichever is larger).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::report::{Figure, Status};
use crate::scenarios::ingest::SEED_BODY;
use crate::scenarios::start_eps_server;
use crate::{wrk, Ctx};

/// A console streaming the summary in the background: frames counted, the last one kept.
pub(crate) struct OpenConsole {
    pub(crate) task: tokio::task::JoinHandle<()>,
    pub(crate) frames: Arc<AtomicU64>,
    pub(crate) last: Arc<Mutex<String>>,
}

pub(crate) fn open_console(ctx: &Ctx, url: String) -> anyhow::Result<OpenConsole> {
    let frames = Arc::new(AtomicU64::new(0));
    let last = Arc::new(Mutex::new(String::new()));
    // No overall timeout: the stream lasts as long as the run.
    let http = reqwest::Client::builder().no_proxy().build()?;
    let (f, l) = (frames.clone(), last.clone());
    let task = ctx.rt.spawn(async move {
        let Ok(mut response) = http.get(url).header("Authorization", "secret").send().await else { return };
        let mut text = String::new();
        while let Ok(Some(chunk)) = response.chunk().await {
            text.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = text.find("\n\n") {
                let frame: String = text.drain(..end + 2).collect();
                if let Some(data) = frame.lines().find_map(|line| line.strip_prefix("data:")) {
                    f.fetch_add(1, Ordering::Relaxed);
                    *l.lock().unwrap() = data.trim().to_string();
                }
            }
        }
    });
    Ok(OpenConsole { task, frames, last })
}

pub fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let dir = ctx.scratch("console_overhead")?;
    let (conns, secs) = (64, ctx.secs(10));
    let script = wrk::write_post_files(dir.path(), SEED_BODY.as_bytes(), "application/json")?;
    let (server, addr) = start_eps_server(ctx, &dir.path().join("eps-data"), &dir.path().join("eps-server.log"))?;
    let url = format!("http://{addr}/liveEvent");

    let (mut without, mut with) = (Vec::new(), Vec::new());
    let mut notes = Vec::new();
    let mut valid = true;
    for round in 0..2 {
        let run = wrk::run(&url, &script, 2, conns, secs, &dir.path().join(format!("wrk-without-{round}.txt")))?;
        valid &= run.problems().is_empty();
        without.push(run.rps);

        let console = open_console(ctx, format!("http://{addr}/console/stream"))?;
        let run = wrk::run(&url, &script, 2, conns, secs, &dir.path().join(format!("wrk-with-{round}.txt")))?;
        valid &= run.problems().is_empty();
        with.push(run.rps);
        console.task.abort();
        // The console was really live: a summary about every second, counting the load's events.
        let frames = console.frames.load(Ordering::Relaxed);
        let last: serde_json::Value = serde_json::from_str(&console.last.lock().unwrap()).unwrap_or_default();
        let accepted = last["accepted_total"].as_u64().unwrap_or(0);
        let tail = last["tail"].as_array().map_or(0, Vec::len);
        if frames + 2 < secs || accepted == 0 || tail == 0 {
            notes
                .push(format!("CONSOLE NOT LIVE: {frames} frames in {secs} s, accepted_total {accepted}, tail {tail}"));
            valid = false;
        }
    }
    server.stop();

    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let spread = |v: &[f64]| (v[0] - v[1]).abs() / mean(v);
    let (base, open) = (mean(&without), mean(&with));
    let ratio = open / base;
    let noise = spread(&without).max(spread(&with));
    let allowed = noise.max(0.05);
    notes.insert(
        0,
        format!(
            "without: {:.0} and {:.0} req/s; with a console streaming: {:.0} and {:.0}; noise (same-condition spread) {:.1} %",
            without[0],
            without[1],
            with[0],
            with[1],
            noise * 100.0
        ),
    );
    let mut fig = Figure::new(
        "console_overhead",
        format!("{open:.0} req/s"),
        format!(">= {:.2} (1 - max(noise, 5 %))", 1.0 - allowed),
        if valid { Status::from_goal(ratio >= 1.0 - allowed) } else { Status::Failed },
    );
    fig.reference = Some(format!("{base:.0} req/s (no console)"));
    fig.ratio = Some(ratio);
    fig.notes = notes;
    ctx.report.figure(fig);
    Ok(())
}
