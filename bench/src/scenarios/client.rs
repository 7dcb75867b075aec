//! client: `eps client` sends a generated 1,000,000-event file to a fresh eps server; events/s by wall
//! time, and the log must hold exactly every event once ("nothing lost", nothing doubled).

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::data::write_client_file;
use crate::report::{Figure, Status};
use crate::scenarios::start_eps_server;
use crate::util::{log_segments, run_measured};
use crate::Ctx;

pub fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let dir = ctx.scratch("client")?;
    let (n, users) = (ctx.size(1_000_000), ctx.size(10_000));
    let file = dir.path().join("events.jsonl");
    write_client_file(&file, n, users)?;

    let data = dir.path().join("eps-data");
    let (server, addr) = start_eps_server(ctx, &data, &dir.path().join("eps-server.log"))?;
    let mut cmd = client_command(ctx, &file, &format!("http://{addr}"));
    let run = run_measured(&mut cmd, &dir.path().join("client.log"), Duration::from_secs(600))?;
    server.stop();

    let (lines, distinct_ids) = log_lines_and_ids(&data.join("log"))?;
    let rate = n as f64 / run.secs();
    let mut notes = vec![
        format!("{n} events in {:.2} s", run.secs()),
        format!("client peak RSS {:.1} MiB", crate::util::mib(run.max_rss)),
    ];
    let mut valid = true;
    if run.code != Some(0) {
        valid = false;
        notes.push(format!("CLIENT EXIT {:?}: {}", run.code, crate::util::tail(&run.log, 3).replace('\n', " | ")));
    }
    if lines != n || distinct_ids != n {
        valid = false;
        notes.push(format!("LOG MISMATCH: {lines} lines, {distinct_ids} distinct ids, expected {n}"));
    } else {
        notes.push(format!("log holds all {n} events once"));
    }
    let mut fig = Figure::new(
        "client",
        format!("{rate:.0} events/s"),
        ">= 500000 events/s".into(),
        if valid { Status::from_goal(rate >= 500_000.0) } else { Status::Failed },
    );
    fig.notes = notes;
    ctx.report.figure(fig);
    Ok(())
}

/// `eps client FILE --url URL` without a progress display, with its defaults otherwise (batches of
/// 1,000 to POST /events).
pub(crate) fn client_command(ctx: &Ctx, file: &Path, url: &str) -> Command {
    let mut cmd = ctx.eps_cmd();
    cmd.arg("client");
    // Adapt to this eps's flags: the file is positional today (--file if it has one), and "no progress
    // display" is spelled `quiet` today (`none` if it offers that).
    let help = client_help(ctx);
    if help.lines().any(|l| l.trim_start().starts_with("--file ")) {
        cmd.arg("--file");
    }
    let progress_none = progress_values(&help).iter().any(|v| v == "none");
    cmd.arg(file).arg("--url").arg(url);
    // The client's checkpoints in the scenario's own directory, not the user's state directory.
    if help.contains("--state-dir") {
        cmd.arg("--state-dir").arg(file.with_extension("client-state"));
    }
    cmd.arg("--progress").arg(if progress_none { "none" } else { "quiet" });
    cmd
}

/// The text of `eps client --help`.
fn client_help(ctx: &Ctx) -> String {
    ctx.eps_cmd()
        .args(["client", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The `[possible values: …]` of `--progress` in the client's help.
fn progress_values(help: &str) -> Vec<String> {
    let Some(start) = help.find("--progress") else { return Vec::new() };
    let rest = &help[start..];
    let Some(open) = rest.find("[possible values:") else { return Vec::new() };
    let list = &rest[open + "[possible values:".len()..];
    let list = &list[..list.find(']').unwrap_or(list.len())];
    list.split(',').map(|v| v.trim().to_string()).collect()
}

/// Lines in the log and distinct `id` values among them.
fn log_lines_and_ids(log_dir: &std::path::Path) -> anyhow::Result<(u64, u64)> {
    let mut lines = 0;
    let mut ids = HashSet::new();
    for path in log_segments(log_dir)? {
        for line in BufReader::with_capacity(1 << 20, std::fs::File::open(path)?).lines() {
            let line = line?;
            lines += 1;
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if let Some(id) = v["id"].as_str() {
                    ids.insert(id.to_string());
                }
            }
        }
    }
    Ok((lines, ids.len() as u64))
}
