//! ingest_single and ingest_batch: wrk against the noop reference server, then against eps server.

use std::path::{Path, PathBuf};

use crate::report::{Figure, Status};
use crate::scenarios::{start_eps_server, start_noop_server};
use crate::util::{count_log_lines, mib};
use crate::{wrk, Ctx};

/// The seed's example request body.
pub(crate) const SEED_BODY: &str = r#"{"userId": "user1", "name": "add_revenue", "value": 100}"#;
/// Events per /events request in ingest_batch.
pub(crate) const BATCH_EVENTS: u64 = 1000;

/// The figures of one wrk run against eps.
pub(crate) struct EpsRun {
    pub(crate) wrk: wrk::WrkResult,
    /// Lines in the log once the server stopped.
    pub(crate) log_lines: u64,
    /// VmHWM of the server just before stopping it.
    peak_rss: u64,
}

/// Runs wrk against a fresh eps server and checks the log afterwards.
pub(crate) fn wrk_against_eps(
    ctx: &Ctx,
    dir: &Path,
    path: &str,
    script: &Path,
    conns: u32,
    secs: u64,
) -> anyhow::Result<EpsRun> {
    let data = dir.join("eps-data");
    let (server, addr) = start_eps_server(ctx, &data, &dir.join("eps-server.log"))?;
    let wrk = wrk::run(&format!("http://{addr}{path}"), script, 2, conns, secs, &dir.join("wrk-eps.txt"))?;
    let peak_rss = server.peak_rss_bytes()?;
    server.stop();
    let log_lines = count_log_lines(&data.join("log"))?;
    Ok(EpsRun { wrk, log_lines, peak_rss })
}

/// Checks that the log holds what eps acknowledged: every completed 2xx response stored its events,
/// plus at most one request per connection that was in flight when wrk stopped.
pub(crate) fn log_check(run: &EpsRun, events_per_request: u64, conns: u32, notes: &mut Vec<String>) -> bool {
    let ok = run.wrk.requests.saturating_sub(run.wrk.non_2xx);
    let low = ok * events_per_request;
    let high = (run.wrk.requests + conns as u64) * events_per_request;
    notes.push(format!("log {} lines for {ok} ok responses", run.log_lines));
    if run.log_lines < low || run.log_lines > high {
        notes.push(format!("LOG MISMATCH: expected {low}..={high} lines"));
        return false;
    }
    true
}

/// The wrk script posting the seed's body to /liveEvent (written in `dir`), and the noop server's rate
/// under that load: the reference of every single-event ingest figure.
pub(crate) fn single_event_reference(
    ctx: &Ctx,
    dir: &Path,
    conns: u32,
    secs: u64,
) -> anyhow::Result<(PathBuf, wrk::WrkResult)> {
    let script = wrk::write_post_files(dir, SEED_BODY.as_bytes(), "application/json")?;
    let (noop, addr) = start_noop_server(ctx, &dir.join("noop.log"))?;
    let reference = wrk::run(&format!("http://{addr}/liveEvent"), &script, 2, conns, secs, &dir.join("wrk-noop.txt"))?;
    noop.stop();
    Ok((script, reference))
}

/// ingest_single: the seed's body to POST /liveEvent, `wrk -t2 -c64 -d10s`. Also `server_rss`.
pub fn single(ctx: &mut Ctx) -> anyhow::Result<()> {
    let dir = ctx.scratch("ingest_single")?;
    let (conns, secs) = (64, ctx.secs(10));
    let (script, reference) = single_event_reference(ctx, dir.path(), conns, secs)?;

    let eps = wrk_against_eps(ctx, dir.path(), "/liveEvent", &script, conns, secs)?;
    let ratio = eps.wrk.rps / reference.rps;
    let mut notes = eps.wrk.problems();
    let reference_problems = reference.problems();
    let valid = notes.is_empty() & reference_problems.is_empty() & log_check(&eps, 1, conns, &mut notes);
    notes.extend(reference_problems.into_iter().map(|p| format!("noop: {p}")));
    let mut fig = Figure::new(
        "ingest_single",
        format!("{:.0} req/s", eps.wrk.rps),
        ">= 0.75".into(),
        if valid { Status::from_goal(ratio >= 0.75) } else { Status::Failed },
    );
    fig.reference = Some(format!("{:.0} req/s (noop axum)", reference.rps));
    fig.ratio = Some(ratio);
    fig.notes = notes;
    ctx.report.figure(fig);

    let rss = mib(eps.peak_rss);
    let mut fig = Figure::new("server_rss", format!("{rss:.1} MiB"), "< 64 MiB".into(), Status::from_goal(rss < 64.0));
    fig.notes.push("VmHWM of eps server after ingest_single".into());
    ctx.report.figure(fig);
    Ok(())
}

/// ingest_batch: 1,000-event JSON Lines bodies to POST /events, `wrk -t2 -c16 -d10s`; events/s.
pub fn batch(ctx: &mut Ctx) -> anyhow::Result<()> {
    let dir = ctx.scratch("ingest_batch")?;
    let (conns, secs) = (16, ctx.secs(10));
    let body_text = crate::data::batch_body(BATCH_EVENTS);
    let script = wrk::write_post_files(dir.path(), body_text.as_bytes(), "application/x-ndjson")?;

    let (noop, addr) = start_noop_server(ctx, &dir.path().join("noop.log"))?;
    let reference =
        wrk::run(&format!("http://{addr}/events"), &script, 2, conns, secs, &dir.path().join("wrk-noop.txt"))?;
    noop.stop();

    // One request first, to say clearly what eps answers (POST /events is new).
    let probe = probe_events_endpoint(ctx, dir.path(), &body_text)?;

    let eps = wrk_against_eps(ctx, dir.path(), "/events", &script, conns, secs)?;
    let rate = eps.wrk.rps * BATCH_EVENTS as f64;
    let reference_rate = reference.rps * BATCH_EVENTS as f64;
    let mut notes = Vec::new();
    if let Some(p) = probe {
        notes.push(p);
    }
    notes.extend(eps.wrk.problems());
    let reference_problems = reference.problems();
    let valid = notes.is_empty() & reference_problems.is_empty() & log_check(&eps, BATCH_EVENTS, conns, &mut notes);
    notes.extend(reference_problems.into_iter().map(|p| format!("noop: {p}")));
    let mut fig = Figure::new(
        "ingest_batch",
        format!("{rate:.0} events/s"),
        ">= 2000000 events/s".into(),
        if valid { Status::from_goal(rate >= 2_000_000.0) } else { Status::Failed },
    );
    fig.reference = Some(format!("{reference_rate:.0} events/s (noop axum)"));
    fig.ratio = Some(rate / reference_rate);
    fig.notes = notes;
    ctx.report.figure(fig);
    Ok(())
}

/// Sends one batch to a throwaway eps server; None when it answered 200 with every line accepted,
/// else a note saying what it answered.
fn probe_events_endpoint(ctx: &Ctx, dir: &Path, body: &str) -> anyhow::Result<Option<String>> {
    let data = dir.join("probe-data");
    let (server, addr) = start_eps_server(ctx, &data, &dir.join("eps-probe.log"))?;
    let answer = ctx.rt.block_on(async {
        let resp = ctx
            .http
            .post(format!("http://{addr}/events"))
            .header("Authorization", "secret")
            .header("Content-Type", "application/x-ndjson")
            .body(body.to_string())
            .send()
            .await?;
        let status = resp.status();
        let text = resp.text().await?;
        anyhow::Ok((status, text))
    });
    server.stop();
    let (status, text) = answer?;
    let excerpt: String = text.chars().take(120).collect();
    if !status.is_success() {
        return Ok(Some(format!("eps answered {status} to POST /events: {excerpt}")));
    }
    let accepted = serde_json::from_str::<serde_json::Value>(&text).ok().and_then(|v| v["accepted"].as_u64());
    if accepted != Some(BATCH_EVENTS) {
        return Ok(Some(format!("POST /events did not accept all {BATCH_EVENTS} lines: {excerpt}")));
    }
    Ok(None)
}
