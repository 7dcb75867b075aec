//! auth_overhead: ingest with a tokens file and rate limits configured but never reached, against the
//! same ingest without them (issue 18's "within the noise").
//!
//! Two eps servers run side by side, one plain (`--token`), one with `--tokens-file` holding the seed's
//! token with a per-token limit far above the load and a server-wide default limit. wrk runs four times
//! per load (single events to `/liveEvent`, 1,000-event batches to `/events`), alternating plain and
//! limited, so drift falls on both sides. The noise is the spread between the two runs of one condition;
//! the goal: the limited server within that noise of the plain one (or 5 %, whichever is larger).

use crate::report::{Figure, Status};
use crate::scenarios::ingest::{BATCH_EVENTS, SEED_BODY};
use crate::scenarios::start_eps_server_with;
use crate::{wrk, Ctx};

/// The seed's token with every scope and a limit no load here reaches (2^31 events/s, burst 2^31).
const TOKENS: &str = "[[token]]\nname = \"bench\"\nscopes = [\"admin\"]\nvalue = \"secret\"\n\
                      events_per_second = 2147483648\nburst = 2147483648\n";

pub fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let dir = ctx.scratch("auth_overhead")?;
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(&tokens, TOKENS)?;
    let (plain, plain_addr) = start_eps_server_with(
        ctx,
        &dir.path().join("plain-data"),
        &dir.path().join("plain.log"),
        &["--token", "secret"],
    )?;
    let limited_args = [
        "--tokens-file".as_ref(),
        tokens.as_os_str(),
        "--rate-limit-events-per-second".as_ref(),
        "2147483648".as_ref(),
    ];
    let (limited, limited_addr) =
        start_eps_server_with(ctx, &dir.path().join("limited-data"), &dir.path().join("limited.log"), &limited_args)?;

    // Each script reads its body from a file named `body` beside it: one directory each.
    let (single_dir, batch_dir) = (dir.path().join("single"), dir.path().join("batch"));
    std::fs::create_dir_all(&single_dir)?;
    std::fs::create_dir_all(&batch_dir)?;
    let single = wrk::write_post_files(&single_dir, SEED_BODY.as_bytes(), "application/json")?;
    let batch_body = crate::data::batch_body(BATCH_EVENTS);
    let batch = wrk::write_post_files(&batch_dir, batch_body.as_bytes(), "application/x-ndjson")?;
    let loads = [
        ("auth_overhead_single", "/liveEvent", &single, 64, 1u64, "req/s"),
        ("auth_overhead_batch", "/events", &batch, 16, BATCH_EVENTS, "events/s"),
    ];
    for (name, path, script, conns, events, unit) in loads {
        let secs = ctx.secs(10);
        let (mut without, mut with) = (Vec::new(), Vec::new());
        let mut notes = Vec::new();
        let mut valid = true;
        for round in 0..2 {
            for (addr, runs, label) in [(plain_addr, &mut without, "plain"), (limited_addr, &mut with, "limited")] {
                let out = dir.path().join(format!("wrk-{name}-{label}-{round}.txt"));
                let run = wrk::run(&format!("http://{addr}{path}"), script, 2, conns, secs, &out)?;
                if !run.problems().is_empty() {
                    notes.push(format!("{label}: {}", run.problems().join("; ")));
                    valid = false;
                }
                runs.push(run.rps * events as f64);
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let spread = |v: &[f64]| (v[0] - v[1]).abs() / mean(v);
        let (base, limited_rate) = (mean(&without), mean(&with));
        let ratio = limited_rate / base;
        let allowed = spread(&without).max(spread(&with)).max(0.05);
        notes.insert(
            0,
            format!(
                "plain --token: {:.0} and {:.0} {unit}; tokens file + limits not reached: {:.0} and {:.0}; noise {:.1} %",
                without[0],
                without[1],
                with[0],
                with[1],
                spread(&without).max(spread(&with)) * 100.0
            ),
        );
        let mut fig = Figure::new(
            name,
            format!("{limited_rate:.0} {unit}"),
            format!(">= {:.2} (1 - max(noise, 5 %))", 1.0 - allowed),
            if valid { Status::from_goal(ratio >= 1.0 - allowed) } else { Status::Failed },
        );
        fig.reference = Some(format!("{base:.0} {unit} (--token only)"));
        fig.ratio = Some(ratio);
        fig.notes = notes;
        ctx.report.figure(fig);
    }
    plain.stop();
    limited.stop();
    Ok(())
}
