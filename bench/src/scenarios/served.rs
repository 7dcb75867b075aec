//! What an `eps server` on a processed store costs at a given number of users: reads of
//! `GET /userEvents/{userId}` under load (read_user_p99), the console's summary (console_1m_users) and
//! one `eps status` (status_1m_users).
//!
//! - Reads: before the load, 100 users drawn from the store are read once and their answers compared
//!   exactly with the generated totals; then `wrk -t2 -c64` (as ingest_single) GETs users drawn uniformly
//!   from those the store holds (a list written for wrk's script), so every answer is a 200 from the
//!   store; wrk's latency distribution gives p50 and p99.
//! - Console: the machine's busy CPU without a console and then with one streaming
//!   `GET /console/stream`, counted as the machine's so that the database's work counts too.
//! - Status: `eps status --json` run three times beside the server; the median wall time and the
//!   machine's busy CPU per call, and the users it shows.

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rust_decimal::Decimal;

use crate::data::{Expected, SEED};
use crate::util::{machine_busy_secs, process_cpu_secs, Proc, Rng};
use crate::{wrk, Ctx};

/// What to measure on the server.
#[derive(Clone, Copy)]
pub(crate) struct Measure {
    pub(crate) console: bool,
    pub(crate) status: bool,
}

/// The figures of one server on one store.
pub(crate) struct Served {
    pub(crate) reads: Reads,
    pub(crate) console: Option<ConsoleCost>,
    pub(crate) status: Option<StatusCost>,
}

/// `GET /userEvents/{userId}` of random stored users under `wrk -t2 -c64`.
pub(crate) struct Reads {
    pub(crate) rps: f64,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) secs: u64,
    /// Wrong answers of the exact check and wrk's non-2xx or socket errors.
    pub(crate) problems: Vec<String>,
}

/// The server's CPU on a store, without a console and with one streaming.
pub(crate) struct ConsoleCost {
    /// The machine's busy CPU seconds per second (eps server and the database).
    pub(crate) without: f64,
    pub(crate) with: f64,
    /// eps server's own.
    pub(crate) server_without: f64,
    pub(crate) server_with: f64,
    pub(crate) secs: u64,
    pub(crate) frames: u64,
    /// `users` of the last summary.
    pub(crate) users_shown: Option<u64>,
    /// The last summary's `now - store_figures_at`, in seconds: how old the whole-table figures were.
    pub(crate) figures_age: Option<f64>,
}

/// One `eps status` beside the server.
pub(crate) struct StatusCost {
    /// Median wall time of three calls.
    pub(crate) wall: f64,
    /// The machine's busy CPU seconds per call (eps status and the database), median of three.
    pub(crate) cpu: f64,
    pub(crate) users_shown: Option<u64>,
}

/// Starts `eps server` on the store in `data_dir`, waits for its `/readyz`, and measures what `what`
/// asks for.
pub(crate) fn measure(
    ctx: &Ctx,
    data_dir: &Path,
    database_url: Option<&str>,
    expected: &Expected,
    what: Measure,
) -> anyhow::Result<Served> {
    let mut extra: Vec<&str> = Vec::new();
    if let Some(url) = database_url {
        extra.extend(["--database-url", url]);
    }
    let (mut server, addr) =
        crate::scenarios::start_eps_server_with(ctx, data_dir, &data_dir.join("served-server.log"), &extra)?;
    let base = format!("http://{addr}");
    crate::scenarios::wait_ready(
        ctx,
        &ctx.http,
        &mut server,
        &base,
        Instant::now(),
        Duration::from_millis(20),
        Duration::from_secs(300),
    )?;
    let result = (|| {
        let reads = reads(ctx, data_dir, &base, expected)?;
        let console = if what.console { Some(console_cost(ctx, &server, &base)?) } else { None };
        let status = if what.status { Some(status_cost(ctx, data_dir, database_url)?) } else { None };
        Ok(Served { reads, console, status })
    })();
    server.check_alive()?;
    server.stop();
    result
}

fn reads(ctx: &Ctx, dir: &Path, base: &str, expected: &Expected) -> anyhow::Result<Reads> {
    let stored: Vec<usize> = expected.totals.iter().enumerate().filter(|(_, t)| t.is_some()).map(|(u, _)| u).collect();
    if stored.is_empty() {
        bail!("the store holds no user to read");
    }
    // The exact check: 100 users drawn from the store, each answer's revenue against the generated total.
    let mut problems = Vec::new();
    let mut rng = Rng::new(SEED);
    for _ in 0..100 {
        let user = stored[rng.below(stored.len() as u64) as usize];
        let want = expected.totals[user].context("a stored user without a total")?;
        let got = ctx.rt.block_on(async {
            let response = ctx
                .http
                .get(format!("{base}/userEvents/user{user}"))
                .header("Authorization", "secret")
                .send()
                .await?
                .error_for_status()?;
            anyhow::Ok(response.json::<serde_json::Value>().await?)
        })?;
        let revenue = got["revenue"].as_str().and_then(|t| Decimal::from_str(t).ok());
        if revenue != Some(want) {
            problems.push(format!("WRONG ANSWER for user{user}: expected {want}, got {got}"));
        }
    }

    // The load: users drawn uniformly from the stored ones. wrk's script reads their numbers from one
    // string of 4-byte big-endian integers: a Lua table of a million strings made wrk's own garbage
    // collector pause for up to 100 ms, which wrk counted as the server's latency.
    let ids = dir.join("read-ids.bin");
    let mut bytes = Vec::with_capacity(stored.len() * 4);
    for &user in &stored {
        bytes.extend_from_slice(&u32::try_from(user).context("a user number above 2^32")?.to_be_bytes());
    }
    std::fs::write(&ids, bytes)?;
    let script = dir.join("read.lua");
    std::fs::write(
        &script,
        format!(
            "-- generated by eps-bench: GET /userEvents of users drawn uniformly from a list\n\
             local f = assert(io.open([==[{}]==], \"rb\"))\n\
             local ids = f:read(\"*a\")\n\
             f:close()\n\
             local n = #ids / 4\n\
             math.randomseed(2025)\n\
             wrk.headers[\"Authorization\"] = \"secret\"\n\
             request = function()\n\
             \x20 local p = (math.random(n) - 1) * 4 + 1\n\
             \x20 local a, b, c, d = string.byte(ids, p, p + 3)\n\
             \x20 return wrk.format(\"GET\", \"/userEvents/user\" .. (((a * 256 + b) * 256 + c) * 256 + d))\n\
             end\n",
            ids.display()
        ),
    )?;
    let secs = ctx.secs(10);
    let run = wrk::run(&format!("{base}/userEvents"), &script, 2, 64, secs, &dir.join("wrk-reads.txt"))?;
    problems.extend(run.problems());
    Ok(Reads {
        rps: run.rps,
        p50: run.p50.context("wrk printed no 50% latency")?,
        p99: run.p99.context("wrk printed no 99% latency")?,
        secs,
        problems,
    })
}

/// The machine's CPU without a console and then with one streaming the summary.
fn console_cost(ctx: &Ctx, server: &Proc, base: &str) -> anyhow::Result<ConsoleCost> {
    let secs = ctx.secs(20);
    // The whole machine's busy time, so that PostgreSQL's work for the queries counts too (eps
    // server's own is in the notes); on a quiet machine nothing else runs.
    let cpu_over = || {
        let (server_before, machine_before) = (process_cpu_secs(server.pid()), machine_busy_secs());
        std::thread::sleep(Duration::from_secs(secs));
        let per_second = |d: f64| d / secs as f64;
        (per_second(machine_busy_secs() - machine_before), per_second(process_cpu_secs(server.pid()) - server_before))
    };
    let (without, server_without) = cpu_over();
    let console = crate::scenarios::console::open_console(ctx, format!("{base}/console/stream"))?;
    let (with, server_with) = cpu_over();
    console.task.abort();
    let frames = console.frames.load(std::sync::atomic::Ordering::Relaxed);
    let last: serde_json::Value = serde_json::from_str(&console.last.lock().unwrap()).unwrap_or_default();
    let figures_age = match (last["now"].as_u64(), last["store_figures_at"].as_u64()) {
        (Some(now), Some(at)) => Some(now.saturating_sub(at) as f64 / 1000.0),
        _ => None,
    };
    Ok(ConsoleCost {
        without,
        with,
        server_without,
        server_with,
        secs,
        frames,
        users_shown: last["users"].as_u64(),
        figures_age,
    })
}

/// `eps status --json` three times beside the running server.
fn status_cost(ctx: &Ctx, data_dir: &Path, database_url: Option<&str>) -> anyhow::Result<StatusCost> {
    let (mut walls, mut cpus, mut users) = (Vec::new(), Vec::new(), None);
    for _ in 0..3 {
        let mut cmd = ctx.eps_cmd();
        cmd.arg("status").arg("--json").arg("--data-dir").arg(data_dir);
        if let Some(url) = database_url {
            cmd.arg("--database-url").arg(url);
        }
        let (t, busy) = (Instant::now(), machine_busy_secs());
        let output = cmd.output().context("cannot run eps status")?;
        walls.push(t.elapsed().as_secs_f64());
        cpus.push(machine_busy_secs() - busy);
        if !output.status.success() {
            bail!("eps status failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr));
        }
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).context("eps status --json")?;
        users = json["users"].as_u64();
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(StatusCost { wall: median(&mut walls), cpu: median(&mut cpus), users_shown: users })
}
