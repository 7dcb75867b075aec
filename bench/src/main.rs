//! eps-bench: measures eps against its references and goals, one line per figure.
//!
//! Scenarios (`eps-bench --help` lists them): ingest_single, ingest_batch, client,
//! process_sqlite, process_postgres, freshness, process_memory, and on NATS JetStream nats_ingest_single,
//! nats_ingest_single_synced (a current nats-server syncing before it acknowledges), nats_ingest_batch, nats_process (each with a nats-server of its own), console_overhead, auth_overhead,
//! dedup_state, process_sqlite_1m_users and process_postgres_1m_users (which also measure read_user_p99,
//! console_1m_users and status_1m_users on the stores they make). Every scenario starts what it needs in
//! a fresh temporary directory on free ports, generates its data from one fixed seed, and stops what it
//! started whatever happens. `--quick` divides the sizes by 100 and runs loads for 2 s: it checks that
//! everything works, its figures mean little.
//!
//! `--scale` runs instead a table of ingest and processing over 1M/10M/100M events x 10k/1M/10M users
//! within a time budget (`--scale-budget-mins`), written also to scale.md beside `--out`; it needs
//! `--pg-url`, and with `--quick` every size is divided by 1,000 (see src/scenarios/scale.rs).
//!
//! Exit status: 0 when every scenario ran and every check passed (goals may be NOT MET), 1 when a
//! scenario errored or a figure is FAILED (lost events, wrong totals, HTTP errors), 2 on bad arguments.

mod data;
mod report;
mod scenarios;
mod util;
mod wrk;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Parser, ValueEnum};

use crate::report::Report;
use crate::util::TempDir;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
enum Scenario {
    IngestSingle,
    IngestBatch,
    Client,
    ProcessSqlite,
    ProcessPostgres,
    Freshness,
    ProcessMemory,
    NatsIngestSingle,
    NatsIngestSingleSynced,
    NatsIngestBatch,
    NatsProcess,
    ConsoleOverhead,
    AuthOverhead,
    DedupState,
    #[value(name = "process_sqlite_1m_users")]
    ProcessSqlite1mUsers,
    #[value(name = "process_postgres_1m_users")]
    ProcessPostgres1mUsers,
}

/// How the freshness scenario generates its background load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FreshnessLoad {
    /// Single events to POST /liveEvent from 100 paced tasks.
    LiveEvent,
    /// 100-event batches to POST /events every 10 ms.
    Events,
}

#[derive(Parser, Debug)]
#[command(
    name = "eps-bench",
    about = "Benchmark driver for eps: one line per figure, compared with its reference and goal"
)]
struct Args {
    /// The eps binary to measure.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/eps"))]
    eps: PathBuf,

    /// Sizes divided by 100 and loads of 2 s: checks that every scenario works.
    #[arg(long)]
    quick: bool,

    /// Run only this scenario (repeatable). Default: all, in the order listed.
    #[arg(long, value_enum)]
    only: Vec<Scenario>,

    /// PostgreSQL server for process_postgres and nats_process (databases eps_bench_<random> are created in
    /// it and dropped afterwards). Without it those two are skipped. Port 5432 (the machine's shared server) is refused.
    #[arg(long)]
    pg_url: Option<String>,

    /// Where all printed lines are written at the end.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/target/last-run.txt"))]
    out: PathBuf,

    /// A nats-server of 2.10 or later for nats_ingest_single_synced (default: $EPS_NATS_SERVER_CURRENT;
    /// scripts/bench installs the pinned one of scripts/nats-server-current). Without it that scenario errors.
    #[arg(long)]
    nats_server_current: Option<PathBuf>,

    /// Instead of the scenarios: the scaling table, events {1M, 10M, 100M} x users {10k, 1M, 10M}, each cell
    /// ingested by POST /events then processed into SQLite and PostgreSQL (needs --pg-url). Printed, and
    /// written as Markdown to scale.md beside --out. With --quick every size is divided by 1,000.
    #[arg(long, requires = "pg_url", conflicts_with = "only")]
    scale: bool,

    /// Time budget of --scale in minutes: a cell (or phase) whose estimate does not fit in what is left is
    /// not run.
    #[arg(long, default_value_t = 60, requires = "scale")]
    scale_budget_mins: u64,

    /// Background load of the freshness scenario (`events` needs POST /events).
    #[arg(long, value_enum, default_value_t = FreshnessLoad::LiveEvent)]
    freshness_load: FreshnessLoad,
}

/// What every scenario gets.
pub struct Ctx {
    pub eps: PathBuf,
    pub noop_server: PathBuf,
    pub reference_sum: PathBuf,
    pub quick: bool,
    /// `--scale`: the scaling table instead of the scenarios.
    pub scale: bool,
    pub pg_url: Option<String>,
    pub freshness_load: FreshnessLoad,
    /// The current nats-server (`--nats-server-current`), for nats_ingest_single_synced.
    pub nats_server_current: Option<PathBuf>,
    /// The run's temporary directory; scenarios make their own subdirectories in it.
    pub work: TempDir,
    /// For the scenarios that speak HTTP themselves (probes, freshness).
    pub rt: tokio::runtime::Runtime,
    pub http: reqwest::Client,
    pub report: Report,
    /// The log shared by process_sqlite and process_postgres, generated on first use.
    pub process_data: Option<scenarios::process::ProcessData>,
}

impl Ctx {
    /// `n` in a full run, `n / 100` with --quick.
    pub fn size(&self, n: u64) -> u64 {
        if self.quick {
            n / 100
        } else {
            n
        }
    }

    /// Load duration: `secs` in a full run, 2 s with --quick.
    pub fn secs(&self, secs: u64) -> u64 {
        if self.quick {
            2
        } else {
            secs
        }
    }

    /// A fresh subdirectory of the work directory, removed when dropped.
    pub fn scratch(&self, name: &str) -> anyhow::Result<TempDir> {
        TempDir::new_in(self.work.path(), name)
    }

    /// `eps <args>` as a Command.
    pub fn eps_cmd(&self) -> Command {
        Command::new(&self.eps)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(failed) => {
            if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("eps-bench: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args) -> anyhow::Result<bool> {
    let started = Instant::now();
    let eps = args.eps.canonicalize().with_context(|| {
        format!("no eps binary at {} (build it: cargo build --release --bin eps)", args.eps.display())
    })?;
    let here = std::env::current_exe()?.parent().context("no directory for the current executable")?.to_path_buf();
    let noop_server = sibling(&here, "noop-server")?;
    let reference_sum = sibling(&here, "reference-sum")?;
    if let Some(url) = &args.pg_url {
        scenarios::process::check_pg_url(url)?;
    }

    let rt = tokio::runtime::Runtime::new()?;
    let http = {
        let _enter = rt.enter();
        reqwest::Client::builder()
            .pool_max_idle_per_host(512)
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(10))
            .build()?
    };
    let mut ctx = Ctx {
        eps,
        noop_server,
        reference_sum,
        quick: args.quick,
        scale: args.scale,
        pg_url: args.pg_url.clone(),
        freshness_load: args.freshness_load,
        nats_server_current: args
            .nats_server_current
            .clone()
            .or_else(|| std::env::var_os("EPS_NATS_SERVER_CURRENT").map(PathBuf::from)),
        work: TempDir::new_in(&std::env::temp_dir(), "eps-bench")?,
        rt,
        http,
        report: Report::default(),
        process_data: None,
    };

    let header = machine_header(&ctx);
    for line in header {
        ctx.report.line(line);
    }
    // On stderr only: the printed lines go into docs, which name no path of this machine.
    eprintln!("eps-bench: work directory {}", ctx.work.path().display());

    let all: &[Scenario] = if args.scale { &[] } else { Scenario::value_variants() };
    if args.scale {
        let t = Instant::now();
        if let Err(e) = scenarios::scale::run(&mut ctx, args.scale_budget_mins, &args.out.with_file_name("scale.md")) {
            ctx.report.failed = true;
            ctx.report.line(format!("{:<16} ERROR {e:#}", "scale"));
        }
        eprintln!("eps-bench: scale took {:.1} s", t.elapsed().as_secs_f64());
    }
    for &scenario in all {
        if !args.only.is_empty() && !args.only.contains(&scenario) {
            continue;
        }
        let name = scenario.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default();
        let t = Instant::now();
        let result = match scenario {
            Scenario::IngestSingle => scenarios::ingest::single(&mut ctx),
            Scenario::IngestBatch => scenarios::ingest::batch(&mut ctx),
            Scenario::Client => scenarios::client::run(&mut ctx),
            Scenario::ProcessSqlite => scenarios::process::sqlite(&mut ctx),
            Scenario::ProcessPostgres => scenarios::process::postgres(&mut ctx),
            Scenario::Freshness => scenarios::freshness::run(&mut ctx),
            Scenario::ProcessMemory => scenarios::process::memory(&mut ctx),
            Scenario::NatsIngestSingle => scenarios::nats::ingest_single(&mut ctx),
            Scenario::NatsIngestSingleSynced => scenarios::nats::ingest_single_synced(&mut ctx),
            Scenario::NatsIngestBatch => scenarios::nats::ingest_batch(&mut ctx),
            Scenario::ConsoleOverhead => scenarios::console::run(&mut ctx),
            Scenario::AuthOverhead => scenarios::auth::run(&mut ctx),
            Scenario::NatsProcess => scenarios::nats::process(&mut ctx),
            Scenario::DedupState => scenarios::dedup::run(&mut ctx),
            Scenario::ProcessSqlite1mUsers => scenarios::users::sqlite(&mut ctx),
            Scenario::ProcessPostgres1mUsers => scenarios::users::postgres(&mut ctx),
        };
        if let Err(e) = result {
            ctx.report.failed = true;
            ctx.report.line(format!("{name:<16} ERROR {e:#}"));
        }
        eprintln!("eps-bench: {name} took {:.1} s", t.elapsed().as_secs_f64());
    }
    // Remove the generated data before writing the summary (it can be gigabytes).
    ctx.process_data = None;

    let failed = ctx.report.failed;
    ctx.report.line(format!(
        "total {:.0} s; {}",
        started.elapsed().as_secs_f64(),
        if failed { "SOME CHECKS FAILED" } else { "all checks passed" }
    ));
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut text = ctx.report.lines.join("\n");
    text.push('\n');
    std::fs::write(&args.out, text).with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!("eps-bench: lines written to {}", args.out.display());
    Ok(failed)
}

/// The path of a binary built beside eps-bench.
fn sibling(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build the bench package (cargo build --release --manifest-path bench/Cargo.toml)",
            path.display()
        );
    }
    Ok(path)
}

/// `machine: …` and `eps: …` lines.
fn machine_header(ctx: &Ctx) -> Vec<String> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".to_string());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    vec![
        format!("machine: {cores} cores (nproc), {cpu}"),
        format!(
            "eps: commit {commit}{}{}",
            if dirty { " + uncommitted changes" } else { "" },
            match (ctx.quick, ctx.scale) {
                (true, false) => "; QUICK mode: sizes / 100, loads of 2 s",
                (true, true) => "; QUICK mode: sizes / 1000",
                _ => "",
            }
        ),
    ]
}
