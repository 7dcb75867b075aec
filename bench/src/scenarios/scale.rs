//! --scale: how ingest and processing scale with the log's length and the number of users.
//!
//! A table over events {1,000,000; 10,000,000; 100,000,000} x users {10,000; 1,000,000; 10,000,000} (user
//! ids uniform, from the one seed, as [`crate::data::Generator`] draws them). Each cell, in one fresh
//! directory removed afterwards:
//! 1. ingest: the cell's events written once in the client format ([`write_client_file`]), then sent to a
//!    fresh `eps server` by POST /events in 1,000-event bodies over 8 connections; events/s by the wall
//!    time of the sending alone. The log must then hold exactly the events sent, every answer a 2xx
//!    accepting all its lines.
//! 2. SQLite and PostgreSQL: `eps process` of that server's log into its SQLite file, then (the log
//!    hard-linked into a data directory of its own) into a fresh PostgreSQL database; events/s, the
//!    processor's peak RSS (VmHWM), totals checked exactly against the generator's (a difference makes
//!    the cell FAILED).
//!
//! The driver's CPU competes with the server's on a small machine: the bodies are generated (and cut at
//! every 1,000th line) before the clock starts, so while timed the driver only reads a slice of a file
//! from the page cache and writes it to a socket (no JSON made or parsed but the short answers). Its CPU
//! and the server's over the sending are printed with the figure, to show what share the sender took.
//!
//! Cells run by increasing events, then users, within `--scale-budget-mins`: before a cell and before
//! each of its phases, its time is estimated from the seconds per event of that phase (preparation and
//! checks included) in the nearest smaller cell with the same users, else with the same events; what
//! would not fit in what is left is not run (`not run: estimated N min`), nor any phase once the budget
//! is spent, so it is exceeded by at most one phase. A cell needs free disk of 3x its estimated log in
//! the work directory, else the run stops with an error. `--quick` divides every size by 1,000. The
//! table (Markdown, under the machine header) is printed and written beside the `--out` file as scale.md.

use std::fs::File;
use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::data::{write_client_file, Expected};
use crate::report::{Figure, Status};
use crate::scenarios::ingest::BATCH_EVENTS;
use crate::scenarios::process::{
    create_database, drop_database, eps_process, read_pg_totals, read_sqlite_totals, report_mismatches,
    PROCESS_TIMEOUT, SQLITE_FILE,
};
use crate::scenarios::start_eps_server;
use crate::util::{count_log_lines, free_disk_bytes, mib, process_cpu_secs};
use crate::Ctx;

const EVENTS: [u64; 3] = [1_000_000, 10_000_000, 100_000_000];
const USERS: [u64; 3] = [10_000, 1_000_000, 10_000_000];
/// Requests in flight during the ingest phase.
const CONNECTIONS: usize = 8;
/// Bytes per event of the server's log until a cell has measured it (the canonical line is ~100).
const LOG_BYTES_PER_EVENT: f64 = 120.0;

/// What one phase of a cell gave, as its table column shows it.
enum Col {
    /// Not reached: the cell errored.
    Pending,
    NotRun(String),
    Done {
        rate: f64,
        rss: Option<u64>,
        exact: bool,
    },
}

struct Cell {
    events: u64,
    users: u64,
    cols: [Col; 3],
    /// Wall seconds per event of each phase (checks included); the estimate when it was not run.
    per_event: [Option<f64>; 3],
    log_bytes_per_event: Option<f64>,
}

pub fn run(ctx: &mut Ctx, budget_mins: u64, table_path: &Path) -> anyhow::Result<()> {
    let admin_url = ctx.pg_url.clone().context("--scale needs --pg-url")?;
    let div = if ctx.quick { 1000 } else { 1 };
    let budget = Duration::from_secs(budget_mins * 60);
    let deadline = Instant::now() + budget;
    let mut cells: Vec<Cell> = EVENTS
        .iter()
        .flat_map(|&e| USERS.iter().map(move |&u| (e / div, u / div)))
        .map(|(events, users)| Cell {
            events,
            users,
            cols: [0, 1, 2].map(|_| Col::Pending),
            per_event: [None; 3],
            log_bytes_per_event: None,
        })
        .collect();
    let mut stopped: Option<String> = None;
    for k in 0..cells.len() {
        let (done, rest) = cells.split_at_mut(k);
        let cell = &mut rest[0];
        if let Some(why) = &stopped {
            cell.cols = [0, 1, 2].map(|_| Col::NotRun(why.clone()));
            continue;
        }
        let est: [Option<f64>; 3] = [0, 1, 2].map(|p| nearest_per_event(done, cell, p).map(|s| s * cell.events as f64));
        if est.iter().all(Option::is_some) {
            let total: f64 = est.iter().flatten().sum();
            if total > secs_left(deadline) {
                cell.cols = [0, 1, 2].map(|_| Col::NotRun(not_run(total)));
                cell.per_event = est.map(|e| e.map(|s| s / cell.events as f64));
                continue;
            }
        }
        let per_event = done.iter().rev().find_map(|c| c.log_bytes_per_event).unwrap_or(LOG_BYTES_PER_EVENT);
        let need = 3.0 * per_event * cell.events as f64;
        let free = free_disk_bytes(ctx.work.path())?;
        if (free as f64) < need {
            ctx.report.failed = true;
            ctx.report.line(format!(
                "{:<16} ERROR {}: free disk in the work directory {:.1} GiB, below 3x the estimated log ({:.1} GiB)",
                "scale",
                label(cell),
                mib(free) / 1024.0,
                need / 3.0 / (1u64 << 30) as f64
            ));
            stopped = Some("not run: low disk".into());
            cell.cols = [0, 1, 2].map(|_| Col::NotRun("not run: low disk".into()));
            continue;
        }
        if let Err(e) = run_cell(ctx, &admin_url, cell, est, deadline, budget) {
            ctx.report.failed = true;
            ctx.report.line(format!("{:<16} ERROR {}: {e:#}", "scale", label(cell)));
        }
    }

    let mut text = crate::machine_header(ctx).join("\n");
    text.push_str("\n\n");
    text.push_str(&table(&cells));
    for line in text.lines() {
        ctx.report.line(line);
    }
    if let Some(dir) = table_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(table_path, text).with_context(|| format!("cannot write {}", table_path.display()))?;
    eprintln!("eps-bench: table written to {}", table_path.display());
    Ok(())
}

/// The three phases of one cell, each unless its estimate exceeds what is left of the budget.
fn run_cell(
    ctx: &mut Ctx,
    admin_url: &str,
    cell: &mut Cell,
    est: [Option<f64>; 3],
    deadline: Instant,
    budget: Duration,
) -> anyhow::Result<()> {
    let dir = ctx.scratch("scale")?;
    let data = dir.path().join("eps-data");
    let mut expected = None;
    for (p, est) in est.into_iter().enumerate() {
        if let Some(e) = est.filter(|&e| e > secs_left(deadline)) {
            cell.cols[p] = Col::NotRun(not_run(e));
            cell.per_event[p] = Some(e / cell.events as f64);
            continue;
        }
        if secs_left(deadline) <= 0.0 {
            cell.cols[p] = Col::NotRun("not run: budget spent".into());
            continue;
        }
        let t = Instant::now();
        if p == 0 {
            let (exp, col) = ingest(ctx, dir.path(), &data, cell)?;
            cell.cols[0] = col;
            // The server's log, not the client file, is what the disk check needs room for.
            let segments = crate::util::log_segments(&data.join("log"))?;
            let log_bytes: u64 = segments.iter().map(|s| s.metadata().map_or(0, |m| m.len())).sum();
            cell.log_bytes_per_event = Some(log_bytes.max(exp.bytes) as f64 / cell.events as f64);
            expected = Some(exp);
        } else if let Some(exp) = &expected {
            cell.cols[p] = process(ctx, admin_url, &data, cell, exp, p == 2, budget.max(PROCESS_TIMEOUT))?;
        } else {
            cell.cols[p] = Col::NotRun("not run: no log".into());
            cell.per_event[p] = est.map(|e| e / cell.events as f64);
            continue;
        }
        cell.per_event[p] = Some(t.elapsed().as_secs_f64() / cell.events as f64);
    }
    Ok(())
}

/// Phase 1: generates the cell's events, sends them to a fresh server, checks its log.
fn ingest(ctx: &mut Ctx, dir: &Path, data: &Path, cell: &Cell) -> anyhow::Result<(Expected, Col)> {
    let file = dir.join("events.jsonl");
    let expected = write_client_file(&file, cell.events, cell.users)?;
    let bounds = batch_bounds(&file, BATCH_EVENTS)?;
    let (mut server, addr) = start_eps_server(ctx, data, &dir.join("eps-server.log"))?;
    let (driver_cpu, server_cpu) = (process_cpu_secs(std::process::id()), process_cpu_secs(server.pid()));
    let t = Instant::now();
    let sent = ctx.rt.block_on(send_batches(ctx.http.clone(), format!("http://{addr}/events"), file.clone(), bounds));
    let secs = t.elapsed().as_secs_f64();
    let driver_cpu = process_cpu_secs(std::process::id()) - driver_cpu;
    let server_cpu = process_cpu_secs(server.pid()) - server_cpu;
    server.check_alive()?;
    server.stop();
    std::fs::remove_file(&file)?;
    let (problems, failures) = sent?;
    let lines = count_log_lines(&data.join("log"))?;

    let exact = failures == 0 && lines == cell.events;
    let notes = vec![
        format!("{}: {secs:.2} s, {CONNECTIONS} connections, {BATCH_EVENTS}-event bodies", label(cell)),
        format!("CPU s: eps server {server_cpu:.1}, driver {driver_cpu:.1}"),
        if exact { format!("log {lines} lines") } else { format!("LOG {lines} LINES, {failures} failed requests") },
    ];
    report_mismatches(ctx, "scale_ingest", &problems);
    let col = figure(ctx, "scale_ingest", cell.events as f64 / secs, None, "log = events sent", exact, notes);
    Ok((expected, col))
}

/// Phases 2 and 3: `eps process` of the server's log into SQLite (its data directory) or a fresh
/// PostgreSQL database, totals checked.
fn process(
    ctx: &mut Ctx,
    admin_url: &str,
    data: &Path,
    cell: &Cell,
    expected: &Expected,
    postgres: bool,
    timeout: Duration,
) -> anyhow::Result<Col> {
    let (name, run, actual) = if postgres {
        // A data directory of its own, the log hard-linked: the server's records the SQLite store.
        let pg_data = data.with_file_name("eps-data-postgres");
        std::fs::create_dir_all(pg_data.join("log"))?;
        for entry in std::fs::read_dir(data.join("log"))? {
            let entry = entry?;
            std::fs::hard_link(entry.path(), pg_data.join("log").join(entry.file_name()))?;
        }
        let (db, db_url) = create_database(ctx, admin_url)?;
        let result = eps_process(ctx, &pg_data, Some(&db_url), "process-postgres.log", timeout)
            .and_then(|run| Ok((run, read_pg_totals(ctx, &db_url)?)));
        let dropped = drop_database(ctx, admin_url, &db);
        let (run, actual) = result?;
        dropped?;
        ("scale_postgres", run, actual)
    } else {
        let run = eps_process(ctx, data, None, "process-sqlite.log", timeout)?;
        let actual = read_sqlite_totals(&data.join(SQLITE_FILE))?;
        ("scale_sqlite", run, actual)
    };
    let problems = expected.compare(&actual);
    let notes = vec![
        format!("{} ({} with events): {:.2} s", label(cell), expected.user_count(), run.secs()),
        format!("eps process peak RSS {:.1} MiB", mib(run.max_rss)),
        if problems.is_empty() { "totals exact".into() } else { format!("{} MISMATCHES", problems.len()) },
    ];
    report_mismatches(ctx, name, &problems);
    let rate = cell.events as f64 / run.secs();
    Ok(figure(ctx, name, rate, Some(run.max_rss), "totals exact", problems.is_empty(), notes))
}

/// Reports a phase's figure (FAILED unless its check passed) and answers its column.
fn figure(
    ctx: &mut Ctx,
    name: &'static str,
    rate: f64,
    rss: Option<u64>,
    check: &str,
    exact: bool,
    notes: Vec<String>,
) -> Col {
    let status = if exact { Status::Met } else { Status::Failed };
    let mut fig = Figure::new(name, format!("{rate:.0} events/s"), check.into(), status);
    fig.notes = notes;
    ctx.report.figure(fig);
    Col::Done { rate, rss, exact }
}

/// Byte offsets in `file` of every `per`-th line start, and its length: the bounds of the bodies.
fn batch_bounds(file: &Path, per: u64) -> anyhow::Result<Vec<u64>> {
    let (mut bounds, mut pos) = (vec![0u64], 0u64);
    for (i, line) in BufReader::with_capacity(1 << 20, File::open(file)?).split(b'\n').enumerate() {
        pos += line?.len() as u64 + 1;
        if (i as u64 + 1).is_multiple_of(per) {
            bounds.push(pos);
        }
    }
    if bounds.last() != Some(&pos) {
        bounds.push(pos);
    }
    Ok(bounds)
}

/// Sends `file[bounds[i]..bounds[i + 1]]` for every i to `url`, [`CONNECTIONS`] at a time. Answers the
/// first problems and the number of requests not answered 2xx with every line accepted.
async fn send_batches(
    http: reqwest::Client,
    url: String,
    file: PathBuf,
    bounds: Vec<u64>,
) -> anyhow::Result<(Vec<String>, u64)> {
    let file = Arc::new(File::open(&file)?);
    let (bounds, next) = (Arc::new(bounds), Arc::new(AtomicUsize::new(0)));
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let (http, url, file, bounds, next) = (http.clone(), url.clone(), file.clone(), bounds.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let (mut problems, mut failures) = (Vec::new(), 0u64);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i + 1 >= bounds.len() {
                    return anyhow::Ok((problems, failures));
                }
                let mut body = vec![0u8; (bounds[i + 1] - bounds[i]) as usize];
                file.read_exact_at(&mut body, bounds[i])?;
                let lines = body.iter().filter(|&&b| b == b'\n').count() as u64;
                let problem = match crate::scenarios::post_batch(&http, &url, body).await {
                    Ok((accepted, _)) if accepted == lines => continue,
                    Ok((accepted, _)) => format!("batch {i}: {accepted} of {lines} lines accepted"),
                    Err(e) => format!("batch {i}: {e:#}"),
                };
                failures += 1;
                if problems.len() < 10 {
                    problems.push(problem);
                }
            }
        }));
    }
    let (mut problems, mut failures) = (Vec::new(), 0);
    for task in tasks {
        let (p, f) = task.await??;
        problems.extend(p);
        failures += f;
    }
    Ok((problems, failures))
}

/// Seconds per event of `phase` in the nearest smaller cell with the same users, else the same events.
fn nearest_per_event(done: &[Cell], cell: &Cell, phase: usize) -> Option<f64> {
    let same_users = done.iter().filter(|c| c.users == cell.users && c.events < cell.events).max_by_key(|c| c.events);
    let same_events = done.iter().filter(|c| c.events == cell.events && c.users < cell.users).max_by_key(|c| c.users);
    same_users.and_then(|c| c.per_event[phase]).or_else(|| same_events.and_then(|c| c.per_event[phase]))
}

fn secs_left(deadline: Instant) -> f64 {
    deadline.saturating_duration_since(Instant::now()).as_secs_f64()
}

fn not_run(secs: f64) -> String {
    format!("not run: estimated {} min", (secs / 60.0).ceil().max(1.0))
}

fn label(cell: &Cell) -> String {
    format!("{} events over {} users", cell.events, cell.users)
}

/// 1000 -> 1k, 10000000 -> 10M.
fn short(n: u64) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

/// The Markdown table of every cell.
fn table(cells: &[Cell]) -> String {
    let mut out = String::from(
        "| events | users | ingest events/s | SQLite events/s | PostgreSQL events/s | peak RSS SQLite | \
         peak RSS PostgreSQL | totals exact |\n|---:|---:|---:|---:|---:|---:|---:|:---|\n",
    );
    for c in cells {
        let text = |col: &Col, rss: bool| match col {
            Col::Pending => "error".to_string(),
            Col::NotRun(_) if rss => "-".to_string(),
            Col::NotRun(why) => why.clone(),
            Col::Done { rss: Some(bytes), .. } if rss => format!("{:.1} MiB", mib(*bytes)),
            Col::Done { rate, .. } => format!("{rate:.0}"),
        };
        let done = |col: &Col| matches!(col, Col::Done { .. });
        let exact = if c.cols.iter().any(|col| matches!(col, Col::Done { exact: false, .. })) {
            "no"
        } else if c.cols.iter().any(|col| matches!(col, Col::Pending)) {
            "error"
        } else if done(&c.cols[1]) || done(&c.cols[2]) {
            "yes"
        } else {
            "-"
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {exact} |\n",
            short(c.events),
            short(c.users),
            text(&c.cols[0], false),
            text(&c.cols[1], false),
            text(&c.cols[2], false),
            text(&c.cols[1], true),
            text(&c.cols[2], true),
        ));
    }
    out
}
