//! nats_ingest_single, nats_ingest_batch and nats_process: eps with its log on NATS JetStream
//! (`--log nats://…`).
//!
//! Each scenario starts its own `nats-server -js` on a free port of 127.0.0.1 with its store in the
//! scenario's scratch directory (never the machine's shared server on 4222), and stops it at the end.
//!
//! - nats_ingest_single: wrk exactly as ingest_single (the seed's body to POST /liveEvent, `-t2 -c64`,
//!   10 s) against one eps server on JetStream, next to the noop server measured in this scenario.
//! - nats_ingest_single_synced: the same load against eps on the current nats-server
//!   (`--nats-server-current`, 2.10 or later) run with `jetstream { sync_interval: always }`, so each
//!   acknowledgement follows an fsync; reference: the same load on Debian's 2.9 (nats_ingest_single's
//!   eps run), measured right before, and the current server without the setting, to tell the cost
//!   of the sync from that of the version. Its goal is only to print that cost.
//! - nats_ingest_batch: wrk exactly as ingest_batch (1,000-event bodies to POST /events, `-t2 -c16`,
//!   10 s) against one eps server on JetStream, next to the same load against eps on its file log.
//! - nats_process: 5,000,000 events over 100,000 users sent by `eps client` (batches of 1,000 to POST
//!   /events) through an eps server on JetStream, then applied to a fresh PostgreSQL database by one
//!   one-shot `eps process`, then by 2 and by 4 `eps process --follow` sharing the partitions. Reference:
//!   the same events as a file log applied by one `eps process` to PostgreSQL.
//!
//! Checks. Ingest: the stream is read back whole with a consumer and its JSON lines counted (stream
//! info only counts messages, and a message holds the events of one partition of one request, or of
//! several id-less requests grouped). Every event acknowledged with a 2xx must be there, nothing beyond
//! the requests wrk sent plus one in flight per connection when it stopped (the rule of the file-log
//! scenarios), every message must hold whole groups (a multiple of the partition's share of one request,
//! the shares adding up to one request's events), and the stream must hold at least what eps's own counter `eps_events_appended_total` says it
//! stored. Processing: every run's totals equal the exact decimal sums of the generated events, user by
//! user, and `events_applied` over the partitions' checkpoints adds up to the number of events.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use async_nats::jetstream::{self, consumer};
use futures::StreamExt as _;

use crate::data::{write_canonical_log, write_client_file, Expected};
use crate::report::{Figure, Status};
use crate::scenarios::client::client_command;
use crate::scenarios::ingest::{log_check, wrk_against_eps, BATCH_EVENTS, SEED_BODY};
use crate::scenarios::process::{
    create_database, drop_database, pg_connect, read_pg_totals, report_mismatches, PROCESS_TIMEOUT,
};
use crate::scenarios::start_eps_server_with;
use crate::util::{find_program, free_port, machine_busy_secs, process_cpu_secs, run_measured, tail, Proc};
use crate::{wrk, Ctx};

/// eps's default stream; its checkpoints are the rows `jetstream/EPS_EVENTS/<partition>`.
const STREAM: &str = "EPS_EVENTS";
const CHECKPOINT_PREFIX: &str = "jetstream/EPS_EVENTS/";
/// How often the checkpoints are read while several followers apply the stream.
const POLL: Duration = Duration::from_millis(50);
/// `--nats-rebalance-ms` of the followers.
const REBALANCE_MS: u32 = 100;
/// Longest the stream may take to be read back.
const READ_TIMEOUT: Duration = Duration::from_secs(600);

/// A private nats-server with JetStream, killed when dropped.
struct NatsServer {
    proc: Proc,
    url: String,
}

/// Which nats-server a scenario runs.
#[derive(Clone, Debug)]
enum NatsKind {
    /// The one on `PATH` or Debian's (2.9: no sync before acknowledging).
    Installed,
    /// This binary (2.10 or later), with `jetstream { sync_interval: always }` when `synced`.
    Current { binary: PathBuf, synced: bool },
}

impl NatsServer {
    /// `nats-server -js -a 127.0.0.1 -p <free port> -sd <dir>/nats-store` (with a configuration file
    /// syncing always for a synced current server), ready for connections.
    fn start(dir: &Path, kind: &NatsKind) -> anyhow::Result<NatsServer> {
        let store = dir.join("nats-store");
        std::fs::create_dir_all(&store)?;
        let port = free_port()?;
        if port == 4222 {
            bail!("got port 4222, the machine's shared NATS port; run again");
        }
        let mut command = match kind {
            NatsKind::Installed => Command::new(
                find_program("nats-server", &["/usr/sbin/nats-server", "/usr/local/bin/nats-server"])
                    .context("nats-server is not installed (scripts/bench installs it: apt-get install nats-server)")?,
            ),
            NatsKind::Current { binary, .. } => Command::new(binary),
        };
        command.args(["-js", "-a", "127.0.0.1", "-p", &port.to_string()]).arg("-sd").arg(&store);
        if let NatsKind::Current { synced: true, .. } = kind {
            let config = dir.join("nats-server.conf");
            // The store stays on the command line (`-sd`): nats-server refuses it in both places.
            std::fs::write(&config, "jetstream { sync_interval: always }\n")?;
            command.arg("-c").arg(&config);
        }
        let mut proc = Proc::spawn("nats-server", &mut command, &dir.join("nats-server.log"))?;
        proc.wait_listening(format!("127.0.0.1:{port}").parse()?, Duration::from_secs(10))?;
        Ok(NatsServer { proc, url: format!("nats://127.0.0.1:{port}") })
    }

    fn cpu_secs(&self) -> f64 {
        process_cpu_secs(self.proc.pid())
    }
}

/// CPU used during a measured interval, in seconds.
#[derive(Default, Clone, Copy)]
struct CpuUse {
    eps: f64,
    nats: f64,
    /// Every process of the machine (PostgreSQL, wrk, the driver...), all cores.
    machine: f64,
    /// Wall time times cores: what the machine could have given.
    capacity: f64,
}

impl CpuUse {
    fn note(&self) -> String {
        format!(
            "CPU s: eps {:.1}, nats-server {:.1}, machine {:.1} of {:.1}",
            self.eps, self.nats, self.machine, self.capacity
        )
    }
}

fn cores() -> f64 {
    std::thread::available_parallelism().map(|n| n.get() as f64).unwrap_or(1.0)
}

/// What reading the stream back found.
#[derive(Default)]
struct StreamCount {
    messages: u64,
    /// JSON lines (events) in all messages.
    events: u64,
    /// Per subject (partition).
    subjects: BTreeMap<String, SubjectCount>,
}

#[derive(Default)]
struct SubjectCount {
    messages: u64,
    /// Lines of the first message: the warm-up request's share of this partition (it is sent alone).
    lines_per_message: u64,
    /// Lines in all of this subject's messages.
    lines: u64,
    /// Some message holds a number of lines that is not a whole number of requests' shares (requests
    /// without ids are grouped, several in one message, but never cut).
    uneven: bool,
}

/// Reads every message of the stream with an ordered consumer and counts its lines.
async fn read_stream(url: &str) -> anyhow::Result<StreamCount> {
    let client = async_nats::connect(url).await.with_context(|| format!("cannot connect to {url}"))?;
    let js = jetstream::new(client);
    let mut stream = js.get_stream(STREAM).await.with_context(|| format!("no stream {STREAM}"))?;
    let total = stream.info().await?.state.messages;
    let mut count = StreamCount::default();
    if total == 0 {
        return Ok(count);
    }
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    while count.messages < total {
        let msg = messages.next().await.context("the stream's messages ended early")??;
        let lines = msg.payload.iter().filter(|&&b| b == b'\n').count() as u64;
        let subject = count.subjects.entry(msg.subject.to_string()).or_default();
        if subject.messages == 0 {
            subject.lines_per_message = lines;
        } else if subject.lines_per_message == 0 || !lines.is_multiple_of(subject.lines_per_message) {
            subject.uneven = true;
        }
        subject.lines += lines;
        subject.messages += 1;
        count.messages += 1;
        count.events += lines;
    }
    Ok(count)
}

/// Messages in the stream, from its info.
async fn stream_messages(url: &str) -> anyhow::Result<u64> {
    let client = async_nats::connect(url).await.with_context(|| format!("cannot connect to {url}"))?;
    let mut stream = jetstream::new(client).get_stream(STREAM).await.with_context(|| format!("no stream {STREAM}"))?;
    Ok(stream.info().await?.state.messages)
}

/// A client of its own for one eps server, which keeps no idle connection: eps's graceful shutdown
/// waits for connections that were opened but never used.
fn own_http_client(ctx: &Ctx) -> anyhow::Result<reqwest::Client> {
    let _enter = ctx.rt.enter();
    Ok(reqwest::Client::builder().pool_max_idle_per_host(0).timeout(Duration::from_secs(10)).build()?)
}

/// One POST of `body`, retried while eps answers 503 (it connects to NATS in the background); fails
/// unless it ends with a 2xx. Returns the answer's text.
async fn post_until_accepted(
    http: &reqwest::Client,
    url: &str,
    content_type: &str,
    body: &str,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let resp = http
            .post(url)
            .header("Authorization", "secret")
            .header("Content-Type", content_type)
            .body(body.to_string())
            .send()
            .await?;
        let status = resp.status();
        let text = resp.text().await?;
        if status.is_success() {
            return Ok(text);
        }
        if status != reqwest::StatusCode::SERVICE_UNAVAILABLE || Instant::now() > deadline {
            bail!("eps answered {status} to POST {url}: {}", text.chars().take(200).collect::<String>());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// eps's `eps_events_appended_total` (summed over label sets), once it stopped moving: requests
/// still in flight when wrk stopped finish first.
async fn settled_appended_total(http: &reqwest::Client, base: &str) -> anyhow::Result<u64> {
    let mut last = None;
    for _ in 0..100 {
        let text = http.get(format!("{base}/metrics")).send().await?.error_for_status()?.text().await?;
        let total = text
            .lines()
            .filter(|l| {
                l.strip_prefix("eps_events_appended_total")
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64;
        if last == Some(total) {
            return Ok(total);
        }
        last = Some(total);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last.context("no metrics read")
}

/// The figures of one wrk run against eps on JetStream.
struct NatsIngestRun {
    wrk: wrk::WrkResult,
    stream: StreamCount,
    /// eps's `eps_events_appended_total` after the load (warm-up included).
    appended: u64,
    /// Events of the one warm-up request, in the stream and the counter too.
    warmup_events: u64,
    cpu: CpuUse,
}

/// Starts nats-server and an eps server on it, sends one warm-up request (the NATS connection and the
/// stream are made before measuring), runs wrk, reads eps's counter, stops both and reads the stream.
fn wrk_against_nats_eps(
    ctx: &Ctx,
    dir: &Path,
    path: &str,
    script: &Path,
    (conns, secs): (u32, u64),
    warmup: (&str, &str, u64),
    kind: &NatsKind,
) -> anyhow::Result<NatsIngestRun> {
    let (warmup_body, content_type, warmup_events) = warmup;
    let nats = NatsServer::start(dir, kind)?;
    let (server, addr) =
        start_eps_server_with(ctx, &dir.join("eps-data"), &dir.join("eps-server.log"), &["--log", nats.url.as_str()])?;
    let base = format!("http://{addr}");
    let http = own_http_client(ctx)?;
    let answer = ctx.rt.block_on(post_until_accepted(&http, &format!("{base}{path}"), content_type, warmup_body))?;
    if path == "/events" {
        let accepted = serde_json::from_str::<serde_json::Value>(&answer).ok().and_then(|v| v["accepted"].as_u64());
        if accepted != Some(warmup_events) {
            bail!("POST /events did not accept all {warmup_events} lines of the warm-up: {answer}");
        }
    }

    let (eps0, nats0, machine0, t0) =
        (process_cpu_secs(server.pid()), nats.cpu_secs(), machine_busy_secs(), Instant::now());
    let wrk = wrk::run(&format!("{base}{path}"), script, 2, conns, secs, &dir.join("wrk-eps-nats.txt"))?;
    let cpu = CpuUse {
        eps: process_cpu_secs(server.pid()) - eps0,
        nats: nats.cpu_secs() - nats0,
        machine: machine_busy_secs() - machine0,
        capacity: t0.elapsed().as_secs_f64() * cores(),
    };
    let appended = ctx.rt.block_on(settled_appended_total(&http, &base))?;
    drop(http);
    server.stop();
    let stream = ctx
        .rt
        .block_on(async { tokio::time::timeout(READ_TIMEOUT, read_stream(&nats.url)).await })
        .context("reading the stream back timed out")??;
    nats.proc.stop();
    Ok(NatsIngestRun { wrk, stream, appended, warmup_events, cpu })
}

/// Checks the stream against wrk's counts and eps's counter (see the module's doc); false on a violation.
fn stream_check(run: &NatsIngestRun, events_per_request: u64, conns: u32, notes: &mut Vec<String>) -> bool {
    let ok = run.wrk.requests.saturating_sub(run.wrk.non_2xx);
    let events = run.stream.events.saturating_sub(run.warmup_events);
    let appended = run.appended.saturating_sub(run.warmup_events);
    let mut valid = true;
    notes.push(format!(
        "stream {events} events in {} messages for {ok} ok responses ({:.1} events per message)",
        run.stream.messages,
        run.stream.events as f64 / run.stream.messages.max(1) as f64
    ));
    let (low, high) = (ok * events_per_request, (run.wrk.requests + conns as u64) * events_per_request);
    if events < low || events > high {
        notes.push(format!("STREAM MISMATCH: expected {low}..={high} events"));
        valid = false;
    }
    if events < appended {
        notes.push(format!("STREAM MISMATCH: eps counted {appended} events stored"));
        valid = false;
    } else if events > appended {
        notes.push(format!("eps counted {appended}: {} from requests cut when wrk stopped", events - appended));
    } else {
        notes.push("eps_events_appended_total agrees".into());
    }
    // Whole groups: each partition's messages all hold that partition's share of whole requests.
    let per_request: u64 = run.stream.subjects.values().map(|s| s.lines_per_message).sum();
    let uneven = run.stream.subjects.values().any(|s| s.uneven);
    if uneven || per_request != events_per_request {
        notes.push(format!(
            "STREAM MISMATCH: messages are not whole per-partition groups of one request ({per_request} lines per request{})",
            if uneven { ", uneven messages" } else { "" }
        ));
        valid = false;
    }
    // Each request once in every partition it touches (the warm-up is one more request).
    let shares = |s: &SubjectCount| s.lines / s.lines_per_message.max(1);
    let min = run.stream.subjects.values().map(shares).min().unwrap_or(0);
    let max = run.stream.subjects.values().map(shares).max().unwrap_or(0);
    if min < ok + 1 || max > run.wrk.requests + conns as u64 + 1 {
        notes.push(format!("STREAM MISMATCH: {min}..={max} requests' shares per partition for {ok} ok responses"));
        valid = false;
    }
    valid
}

/// nats_ingest_single: the seed's body to POST /liveEvent, `wrk -t2 -c64 -d10s`, eps on JetStream
/// against the noop server.
pub fn ingest_single(ctx: &mut Ctx) -> anyhow::Result<()> {
    let dir = ctx.scratch("nats_ingest_single")?;
    let (conns, secs) = (64, ctx.secs(10));
    // The noop reference is measured again here rather than taken from ingest_single: on this shared
    // VM figures drift 10-30 % within minutes, so the reference is taken right before the eps run.
    let (script, reference) = super::ingest::single_event_reference(ctx, dir.path(), conns, secs)?;

    let warmup = (SEED_BODY, "application/json", 1);
    let run =
        wrk_against_nats_eps(ctx, dir.path(), "/liveEvent", &script, (conns, secs), warmup, &NatsKind::Installed)?;
    let ratio = run.wrk.rps / reference.rps;
    let mut notes = run.wrk.problems();
    let reference_problems = reference.problems();
    let valid = notes.is_empty() & reference_problems.is_empty() & stream_check(&run, 1, conns, &mut notes);
    notes.extend(reference_problems.into_iter().map(|p| format!("noop: {p}")));
    notes.push(run.cpu.note());
    let mut fig = Figure::new(
        "nats_ingest_single",
        format!("{:.0} req/s", run.wrk.rps),
        ">= 0.50".into(),
        if valid { Status::from_goal(ratio >= 0.5) } else { Status::Failed },
    );
    fig.reference = Some(format!("{:.0} req/s (noop axum)", reference.rps));
    fig.ratio = Some(ratio);
    fig.notes = notes;
    ctx.report.figure(fig);
    Ok(())
}

/// nats_ingest_single_synced: nats_ingest_single's eps run on Debian's nats-server, on the current one,
/// and on the current one syncing before every acknowledgement, one after the other; the figure is the
/// synced rate, its ratio the synced rate over Debian's (the cost of a 200 that means fsynced).
pub fn ingest_single_synced(ctx: &mut Ctx) -> anyhow::Result<()> {
    let binary = ctx.nats_server_current.clone().context(
        "no current nats-server: give --nats-server-current or EPS_NATS_SERVER_CURRENT (scripts/bench installs one)",
    )?;
    let dir = ctx.scratch("nats_ingest_single_synced")?;
    let (conns, secs) = (64, ctx.secs(10));
    let script = wrk::write_post_files(dir.path(), SEED_BODY.as_bytes(), "application/json")?;
    let warmup = (SEED_BODY, "application/json", 1);
    let mut runs = Vec::new();
    for (name, kind) in [
        ("debian", NatsKind::Installed),
        ("current", NatsKind::Current { binary: binary.clone(), synced: false }),
        ("synced", NatsKind::Current { binary: binary.clone(), synced: true }),
    ] {
        let run_dir = dir.path().join(name);
        std::fs::create_dir_all(&run_dir)?;
        runs.push(wrk_against_nats_eps(ctx, &run_dir, "/liveEvent", &script, (conns, secs), warmup, &kind)?);
    }
    let [debian, current, synced] = <[NatsIngestRun; 3]>::try_from(runs).ok().context("three runs")?;
    let mut notes = synced.wrk.problems();
    let mut valid = notes.is_empty() & stream_check(&synced, 1, conns, &mut notes);
    for (name, run) in [("2.9", &debian), ("current unsynced", &current)] {
        let mut theirs = run.wrk.problems();
        if !(theirs.is_empty() & stream_check(run, 1, conns, &mut theirs)) {
            valid = false;
            notes.extend(theirs.into_iter().map(|p| format!("{name}: {p}")));
        }
    }
    notes.push(format!(
        "current nats-server without sync: {:.0} req/s ({:.2} of 2.9); with sync_interval always: {:.2} of that",
        current.wrk.rps,
        current.wrk.rps / debian.wrk.rps,
        synced.wrk.rps / current.wrk.rps
    ));
    notes.push(synced.cpu.note());
    let ratio = synced.wrk.rps / debian.wrk.rps;
    // No goal beyond saying the cost: MET whenever the figure is valid.
    let mut fig = Figure::new(
        "nats_ingest_single_synced",
        format!("{:.0} req/s", synced.wrk.rps),
        "cost shown".into(),
        if valid { Status::Met } else { Status::Failed },
    );
    fig.reference = Some(format!("{:.0} req/s (nats_ingest_single's eps on nats-server 2.9)", debian.wrk.rps));
    fig.ratio = Some(ratio);
    fig.notes = notes;
    ctx.report.figure(fig);
    Ok(())
}

/// nats_ingest_batch: 1,000-event bodies to POST /events, `wrk -t2 -c16 -d10s`, eps on JetStream
/// against eps on its file log.
pub fn ingest_batch(ctx: &mut Ctx) -> anyhow::Result<()> {
    let dir = ctx.scratch("nats_ingest_batch")?;
    let (conns, secs) = (16, ctx.secs(10));
    let body_text = crate::data::batch_body(BATCH_EVENTS);
    let script = wrk::write_post_files(dir.path(), body_text.as_bytes(), "application/x-ndjson")?;

    // Reference: the same load against eps on its file log (what ingest_batch measures), right before.
    let file_dir = dir.path().join("file-log");
    std::fs::create_dir_all(&file_dir)?;
    let file_log = wrk_against_eps(ctx, &file_dir, "/events", &script, conns, secs)?;
    let run = wrk_against_nats_eps(
        ctx,
        dir.path(),
        "/events",
        &script,
        (conns, secs),
        (&body_text, "application/x-ndjson", BATCH_EVENTS),
        &NatsKind::Installed,
    )?;

    let rate = run.wrk.rps * BATCH_EVENTS as f64;
    let reference_rate = file_log.wrk.rps * BATCH_EVENTS as f64;
    let mut notes = run.wrk.problems();
    let mut reference_notes = file_log.wrk.problems();
    let reference_valid = reference_notes.is_empty() & log_check(&file_log, BATCH_EVENTS, conns, &mut reference_notes);
    let valid = notes.is_empty() & reference_valid & stream_check(&run, BATCH_EVENTS, conns, &mut notes);
    notes.push(run.cpu.note());
    if !reference_valid {
        notes.extend(reference_notes.into_iter().map(|p| format!("file log: {p}")));
    }
    let mut fig = Figure::new(
        "nats_ingest_batch",
        format!("{rate:.0} events/s"),
        ">= 1000000 events/s".into(),
        if valid { Status::from_goal(rate >= 1_000_000.0) } else { Status::Failed },
    );
    fig.reference = Some(format!("{reference_rate:.0} events/s (file log)"));
    fig.ratio = Some(rate / reference_rate);
    fig.notes = notes;
    ctx.report.figure(fig);
    Ok(())
}

/// One application of the whole stream to a fresh database.
struct ApplyRun {
    processors: usize,
    secs: f64,
    /// `events_applied` of each processor, from the summary it prints (when it printed one).
    per_processor: Vec<Option<u64>>,
    problems: Vec<String>,
    cpu: CpuUse,
}

impl ApplyRun {
    fn rate(&self, events: u64) -> f64 {
        events as f64 / self.secs
    }

    fn note(&self, events: u64) -> String {
        let split: Vec<String> =
            self.per_processor.iter().map(|a| a.map_or("?".to_string(), |a| a.to_string())).collect();
        format!(
            "{} processor{}: {:.0} events/s in {:.2} s, applied {}, {}",
            self.processors,
            if self.processors == 1 { "" } else { "s" },
            self.rate(events),
            self.secs,
            split.join("+"),
            self.cpu.note()
        )
    }
}

/// The `N` of the `applied N events for …` summary line in a processor's output.
fn applied_in_summary(log: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().rev().find(|l| l.starts_with("applied "))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Sum of `events_applied` over the stream's checkpoints; 0 while eps has not made its tables yet.
async fn applied_so_far(client: &tokio_postgres::Client) -> u64 {
    let sql =
        "SELECT COALESCE(SUM(events_applied), 0)::bigint FROM eps_checkpoints WHERE left(stream, length($1)) = $1";
    match client.query_one(sql, &[&CHECKPOINT_PREFIX]).await {
        Ok(row) => row.get::<_, i64>(0) as u64,
        Err(_) => 0,
    }
}

/// Applies the stream to a fresh database with `processors` processors: one one-shot `eps process`
/// timed from start to exit, or that many `--follow` ones timed from the start until the checkpoints
/// count every event. Then checks the totals and the checkpoints.
fn apply_stream(
    ctx: &Ctx,
    dir: &Path,
    nats: &NatsServer,
    admin_url: &str,
    processors: usize,
    expected: &Expected,
) -> anyhow::Result<ApplyRun> {
    let n = expected.events;
    let (db, db_url) = create_database(ctx, admin_url)?;
    let result = (|| {
        let data = dir.join(format!("apply-{processors}"));
        std::fs::create_dir_all(&data)?;
        let command = || {
            let mut cmd = ctx.eps_cmd();
            cmd.arg("process")
                .arg("--log")
                .arg(&nats.url)
                .arg("--database-url")
                .arg(&db_url)
                .arg("--data-dir")
                .arg(&data);
            cmd
        };
        let logs: Vec<PathBuf> = (0..processors).map(|i| data.join(format!("process-{i}.log"))).collect();
        let (nats0, machine0, t0) = (nats.cpu_secs(), machine_busy_secs(), Instant::now());
        let (secs, eps_cpu) = if processors == 1 {
            let run = run_measured(&mut command(), &logs[0], PROCESS_TIMEOUT)?;
            run.check_success("eps process (JetStream)")?;
            (run.secs(), run.cpu_secs)
        } else {
            let mut procs = Vec::new();
            for (i, log) in logs.iter().enumerate() {
                let mut cmd = command();
                cmd.arg("--follow").arg("--nats-rebalance-ms").arg(REBALANCE_MS.to_string());
                procs.push(Proc::spawn(&format!("eps process --follow ({})", i + 1), &mut cmd, log)?);
            }
            let client = ctx.rt.block_on(pg_connect(&db_url))?;
            loop {
                for p in &mut procs {
                    p.check_alive()?;
                }
                let applied = ctx.rt.block_on(applied_so_far(&client));
                if applied >= n {
                    break;
                }
                if t0.elapsed() > PROCESS_TIMEOUT {
                    bail!(
                        "{processors} processors applied {applied} of {n} events in {PROCESS_TIMEOUT:?}; \
                         the first one's log ends with:\n{}",
                        tail(&logs[0], 20)
                    );
                }
                std::thread::sleep(POLL);
            }
            let secs = t0.elapsed().as_secs_f64();
            let eps_cpu = procs.iter().map(|p| process_cpu_secs(p.pid())).sum::<f64>();
            drop(client);
            // SIGTERM to all at once, then wait for each.
            for p in &procs {
                // SAFETY: plain kill(2) on our own, not yet reaped, children.
                unsafe { libc::kill(p.pid() as libc::pid_t, libc::SIGTERM) };
            }
            for p in procs {
                p.stop();
            }
            (secs, eps_cpu)
        };
        let cpu = CpuUse {
            eps: eps_cpu,
            nats: nats.cpu_secs() - nats0,
            machine: machine_busy_secs() - machine0,
            capacity: t0.elapsed().as_secs_f64() * cores(),
        };
        let applied = ctx.rt.block_on(async { anyhow::Ok(applied_so_far(&pg_connect(&db_url).await?).await) })?;
        let mut problems = expected.compare(&read_pg_totals(ctx, &db_url)?);
        if applied != n {
            problems.push(format!("MISMATCH events_applied over the checkpoints adds up to {applied}, expected {n}"));
        }
        let per_processor = logs.iter().map(|l| applied_in_summary(l)).collect();
        anyhow::Ok(ApplyRun { processors, secs, per_processor, problems, cpu })
    })();
    let dropped = drop_database(ctx, admin_url, &db);
    let run = result?;
    dropped?;
    Ok(run)
}

/// The reference: the same events as a file log (one segment), applied by `eps process --data-dir DIR
/// --database-url URL` to a fresh database. Its rate and its problems.
fn file_log_reference(
    ctx: &Ctx,
    dir: &Path,
    admin_url: &str,
    events: u64,
    users: u64,
) -> anyhow::Result<(f64, Vec<String>)> {
    let data = dir.join("file-log");
    let (expected, _) = write_canonical_log(&data.join("log"), events, users, u64::MAX)?;
    let (db, db_url) = create_database(ctx, admin_url)?;
    let result = (|| {
        let run = run_measured(
            ctx.eps_cmd().arg("process").arg("--data-dir").arg(&data).arg("--database-url").arg(&db_url),
            &dir.join("process-file-log.log"),
            PROCESS_TIMEOUT,
        )?;
        run.check_success("eps process (file log, PostgreSQL)")?;
        let problems = expected.compare(&read_pg_totals(ctx, &db_url)?);
        anyhow::Ok((events as f64 / run.secs(), problems))
    })();
    let dropped = drop_database(ctx, admin_url, &db);
    let out = result?;
    dropped?;
    std::fs::remove_dir_all(&data)?;
    Ok(out)
}

/// nats_process: fill a stream through eps, then apply it to PostgreSQL with 1, 2 and 4 processors.
pub fn process(ctx: &mut Ctx) -> anyhow::Result<()> {
    let Some(admin_url) = ctx.pg_url.clone() else {
        ctx.report
            .line(format!("{:<16} SKIPPED (no --pg-url; scripts/bench starts a throwaway cluster)", "nats_process"));
        return Ok(());
    };
    let dir = ctx.scratch("nats_process")?;
    let (n, users) = (ctx.size(5_000_000), ctx.size(100_000));
    let file = dir.path().join("events.jsonl");
    let expected = write_client_file(&file, n, users)?;

    // Fill: eps client (batches of 1,000 to POST /events) through one eps server on JetStream.
    let nats = NatsServer::start(dir.path(), &NatsKind::Installed)?;
    let (server, addr) = start_eps_server_with(
        ctx,
        &dir.path().join("eps-data"),
        &dir.path().join("eps-server.log"),
        &["--log", nats.url.as_str()],
    )?;
    let mut client = client_command(ctx, &file, &format!("http://{addr}"));
    let fill = run_measured(&mut client, &dir.path().join("client.log"), PROCESS_TIMEOUT);
    server.stop();
    let fill = fill?;
    fill.check_success("eps client (filling the stream)")?;
    std::fs::remove_file(&file)?;
    let messages = ctx.rt.block_on(stream_messages(&nats.url))?;

    let (reference_rate, reference_problems) = file_log_reference(ctx, dir.path(), &admin_url, n, users)?;
    let mut runs = Vec::new();
    for processors in [1, 2, 4] {
        runs.push(apply_stream(ctx, dir.path(), &nats, &admin_url, processors, &expected)?);
    }
    nats.proc.stop();

    let mut mismatches = 0;
    for run in &runs {
        report_mismatches(ctx, &format!("nats_process_{}", run.processors), &run.problems);
        mismatches += run.problems.len();
    }
    report_mismatches(ctx, "nats_process_ref", &reference_problems);
    let rate = runs[0].rate(n);
    let mut notes = vec![format!("{n} events over {users} users in {messages} messages")];
    notes.extend(runs.iter().map(|r| r.note(n)));
    notes.push(format!("fill by eps client {:.0} events/s", n as f64 / fill.secs()));
    notes.push(if mismatches == 0 {
        "totals and checkpoints exact in all 3 runs".to_string()
    } else {
        format!("{mismatches} MISMATCHES")
    });
    if !reference_problems.is_empty() {
        notes.push(format!("file log reference: {} MISMATCHES", reference_problems.len()));
    }
    let valid = mismatches == 0 && reference_problems.is_empty();
    let mut fig = Figure::new(
        "nats_process",
        format!("{rate:.0} events/s"),
        ">= 1000000 events/s".into(),
        if valid { Status::from_goal(rate >= 1_000_000.0) } else { Status::Failed },
    );
    fig.reference = Some(format!("{reference_rate:.0} events/s (file log)"));
    fig.ratio = Some(rate / reference_rate);
    fig.notes = notes;
    ctx.report.figure(fig);
    Ok(())
}
