//! process_sqlite, process_postgres and process_memory: `eps process` on a generated log, against
//! reference-sum (plain serde_json + HashMap on one core), with the totals checked exactly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context as _};
use rust_decimal::Decimal;

use crate::data::{write_canonical_log, Expected};
use crate::report::{Figure, Status};
use crate::util::{mib, run_measured, Run, TempDir};
use crate::Ctx;

/// The SQLite file eps keeps in its data directory (`SQLITE_FILE` in src/store/mod.rs).
pub(crate) const SQLITE_FILE: &str = "eps.sqlite3";
/// Name of the generated single-segment log (position 0).
const SEGMENT_0: &str = "server-events-00000000000000000000.jsonl";
/// The server's default segment size, used for the 10,000,000-event log.
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Longest a single `eps process` may take before it is killed.
pub(crate) const PROCESS_TIMEOUT: Duration = Duration::from_secs(600);

/// The 1,000,000-event log shared by process_sqlite and process_postgres, and reference-sum's time on it.
pub struct ProcessData {
    _dir: TempDir,
    log_file: PathBuf,
    expected: Expected,
    /// reference-sum's wall time, in seconds.
    reference_secs: f64,
}

/// Generates the shared log (once) and times reference-sum on it.
fn process_data(ctx: &mut Ctx) -> anyhow::Result<&ProcessData> {
    if ctx.process_data.is_none() {
        let dir = ctx.scratch("process-data")?;
        let (n, users) = (ctx.size(1_000_000), ctx.size(10_000));
        let (expected, segments) = write_canonical_log(dir.path(), n, users, u64::MAX)?;
        let log_file = segments.into_iter().next().context("no segment written")?;
        let run = run_measured(
            Command::new(&ctx.reference_sum).arg(&log_file),
            &dir.path().join("reference-sum.out"),
            PROCESS_TIMEOUT,
        )?;
        run.check_success("reference-sum")?;
        let out = std::fs::read_to_string(&run.log)?;
        let want = format!("events {} users {} invalid 0", expected.events, expected.user_count());
        if out.trim() != want {
            bail!("reference-sum printed {:?}, expected {want:?}", out.trim());
        }
        ctx.process_data = Some(ProcessData { _dir: dir, log_file, expected, reference_secs: run.secs() });
    }
    Ok(ctx.process_data.as_ref().expect("set above"))
}

/// A fresh data directory holding a copy of the shared log as its only segment.
fn data_dir_with_log(ctx: &Ctx, name: &str, log_file: &Path) -> anyhow::Result<TempDir> {
    let dir = ctx.scratch(name)?;
    std::fs::create_dir_all(dir.path().join("log"))?;
    std::fs::copy(log_file, dir.path().join("log").join(SEGMENT_0))?;
    Ok(dir)
}

/// The figure of a processing run compared with reference-sum, after the totals check.
fn processing_figure(
    ctx: &mut Ctx,
    name: &'static str,
    run: &Run,
    data_events: u64,
    reference_secs: f64,
    problems: Vec<String>,
) -> Figure {
    let rate = data_events as f64 / run.secs();
    let reference_rate = data_events as f64 / reference_secs;
    let ratio = reference_secs / run.secs();
    let valid = problems.is_empty();
    report_mismatches(ctx, name, &problems);
    let mut fig = Figure::new(
        name,
        format!("{rate:.0} events/s"),
        ">= 1.00".into(),
        if valid { Status::from_goal(ratio >= 1.0) } else { Status::Failed },
    );
    fig.reference = Some(format!("{reference_rate:.0} events/s (reference-sum)"));
    fig.ratio = Some(ratio);
    fig.notes = vec![
        format!("{data_events} events: eps {:.2} s, reference {reference_secs:.2} s", run.secs()),
        format!("eps peak RSS {:.1} MiB", mib(run.max_rss)),
        if valid { "totals exact".to_string() } else { format!("{} MISMATCHES", problems.len()) },
    ];
    fig
}

/// Prints the first differences (all are counted in the figure).
pub(crate) fn report_mismatches(ctx: &mut Ctx, name: &str, problems: &[String]) {
    for p in problems.iter().take(10) {
        ctx.report.line(format!("{name:<16} {p}"));
    }
    if problems.len() > 10 {
        ctx.report.line(format!("{name:<16} ... {} more", problems.len() - 10));
    }
}

/// process_sqlite: `eps process --data-dir DIR` with the default embedded store.
pub fn sqlite(ctx: &mut Ctx) -> anyhow::Result<()> {
    let (log_file, events, reference_secs) = {
        let d = process_data(ctx)?;
        (d.log_file.clone(), d.expected.events, d.reference_secs)
    };
    let dir = data_dir_with_log(ctx, "process_sqlite", &log_file)?;
    let (run, actual) = process_into_sqlite(ctx, dir.path())?;
    let problems = ctx.process_data.as_ref().expect("made above").expected.compare(&actual);
    let fig = processing_figure(ctx, "process_sqlite", &run, events, reference_secs, problems);
    ctx.report.figure(fig);
    Ok(())
}

/// `eps process --data-dir DIR [--database-url URL]` to the end of the log, measured, its output in
/// `DIR/<log_name>`; fails unless it exits 0.
pub(crate) fn eps_process(
    ctx: &Ctx,
    dir: &Path,
    database_url: Option<&str>,
    log_name: &str,
    timeout: Duration,
) -> anyhow::Result<Run> {
    let mut cmd = ctx.eps_cmd();
    cmd.arg("process").arg("--data-dir").arg(dir);
    if let Some(url) = database_url {
        cmd.arg("--database-url").arg(url);
    }
    let run = run_measured(&mut cmd, &dir.join(log_name), timeout)?;
    run.check_success(if database_url.is_some() { "eps process (PostgreSQL)" } else { "eps process" })?;
    Ok(run)
}

/// Runs `eps process --data-dir DIR` (the embedded store), measured, and reads back its totals.
fn process_into_sqlite(ctx: &Ctx, dir: &Path) -> anyhow::Result<(Run, HashMap<String, Decimal>)> {
    let run = eps_process(ctx, dir, None, "process.log", PROCESS_TIMEOUT)?;
    let actual = read_sqlite_totals(&dir.join(SQLITE_FILE))?;
    Ok((run, actual))
}

/// Every row of `users_revenue` in an eps SQLite file (revenue is exact decimal TEXT there).
pub(crate) fn read_sqlite_totals(path: &Path) -> anyhow::Result<HashMap<String, Decimal>> {
    let conn = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut stmt = conn.prepare("SELECT user_id, CAST(revenue AS TEXT) FROM users_revenue")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    let mut out = HashMap::new();
    for row in rows {
        let (user, revenue) = row?;
        let value =
            Decimal::from_str(&revenue).with_context(|| format!("revenue {revenue:?} of {user} is not a decimal"))?;
        out.insert(user, value);
    }
    Ok(out)
}

/// Refuses the machine's shared PostgreSQL (port 5432, also the default when no port is given).
pub fn check_pg_url(url: &str) -> anyhow::Result<()> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .context("--pg-url must start with postgres:// or postgresql://")?;
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host_port = authority.rsplit('@').next().unwrap_or("");
    let port = host_port.rsplit_once(':').map(|(_, p)| p).unwrap_or("5432");
    if port == "5432" {
        bail!("--pg-url {url:?} points at port 5432, the machine's shared PostgreSQL: use a throwaway cluster (scripts/pg-throwaway)");
    }
    Ok(())
}

/// `url` with its database name replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let scheme_end = url.find("://").map(|i| i + 3).unwrap_or(0);
    let (base, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let authority_end = base[scheme_end..].find('/').map(|i| scheme_end + i).unwrap_or(base.len());
    format!("{}/{db}{query}", &base[..authority_end])
}

pub(crate) async fn pg_connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A fresh database in the server of `admin_url`, named at random (not from the seed: it must not
/// collide with a leftover): its name and URL.
pub(crate) fn create_database(ctx: &Ctx, admin_url: &str) -> anyhow::Result<(String, String)> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64;
    let db = format!("eps_bench_{:016x}", crate::util::Rng::new(nanos ^ std::process::id() as u64).next_u64());
    let db_url = with_database(admin_url, &db);
    ctx.rt.block_on(async {
        pg_connect(admin_url).await?.batch_execute(&format!("CREATE DATABASE {db}")).await?;
        anyhow::Ok(())
    })?;
    Ok((db, db_url))
}

/// Drops a database made by [`create_database`], disconnecting whoever still uses it.
pub(crate) fn drop_database(ctx: &Ctx, admin_url: &str, db: &str) -> anyhow::Result<()> {
    ctx.rt
        .block_on(async {
            pg_connect(admin_url).await?.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await?;
            anyhow::Ok(())
        })
        .with_context(|| format!("cannot drop the database {db}"))
}

/// Every row of `users_revenue` in an eps PostgreSQL database, as exact decimals.
pub(crate) fn read_pg_totals(ctx: &Ctx, db_url: &str) -> anyhow::Result<HashMap<String, Decimal>> {
    ctx.rt.block_on(async {
        let client = pg_connect(db_url).await?;
        let rows = client.query("SELECT user_id::text, revenue::text FROM users_revenue", &[]).await?;
        let mut out = HashMap::new();
        for row in rows {
            let (user, revenue): (String, String) = (row.get(0), row.get(1));
            out.insert(user, Decimal::from_str(&revenue)?);
        }
        anyhow::Ok(out)
    })
}

/// process_postgres: `eps process --data-dir DIR2 --database-url URL` on a fresh database.
pub fn postgres(ctx: &mut Ctx) -> anyhow::Result<()> {
    let Some(admin_url) = ctx.pg_url.clone() else {
        ctx.report.line(format!(
            "{:<16} SKIPPED (no --pg-url; scripts/bench starts a throwaway cluster)",
            "process_postgres"
        ));
        return Ok(());
    };
    let (log_file, events, reference_secs) = {
        let d = process_data(ctx)?;
        (d.log_file.clone(), d.expected.events, d.reference_secs)
    };
    let dir = data_dir_with_log(ctx, "process_postgres", &log_file)?;

    let (db, db_url) = create_database(ctx, &admin_url)?;

    let result = (|| {
        let run = eps_process(ctx, dir.path(), Some(&db_url), "process.log", PROCESS_TIMEOUT)?;
        let actual = read_pg_totals(ctx, &db_url)?;
        anyhow::Ok((run, actual))
    })();

    // Always drop the database, whatever happened.
    let dropped = drop_database(ctx, &admin_url, &db);
    let (run, actual) = result?;
    dropped?;

    let problems = ctx.process_data.as_ref().expect("made above").expected.compare(&actual);
    let fig = processing_figure(ctx, "process_postgres", &run, events, reference_secs, problems);
    ctx.report.figure(fig);
    Ok(())
}

/// process_memory: `eps process` on a 10,000,000-event log (64 MiB segments, like the server writes);
/// its peak RSS must stay flat.
pub fn memory(ctx: &mut Ctx) -> anyhow::Result<()> {
    let dir = ctx.scratch("process_memory")?;
    let (n, users) = (ctx.size(10_000_000), ctx.size(10_000));
    let (expected, segments) = write_canonical_log(&dir.path().join("log"), n, users, SEGMENT_BYTES)?;
    let (run, actual) = process_into_sqlite(ctx, dir.path())?;
    let problems = expected.compare(&actual);
    report_mismatches(ctx, "process_memory", &problems);

    let rss = mib(run.max_rss);
    let mut fig = Figure::new(
        "process_memory",
        format!("{rss:.1} MiB"),
        "< 64 MiB".into(),
        if problems.is_empty() { Status::from_goal(rss < 64.0) } else { Status::Failed },
    );
    fig.notes = vec![
        format!(
            "peak RSS of eps process (its VmHWM) on {n} events, {:.0} MiB in {} segments",
            mib(expected.bytes),
            segments.len()
        ),
        format!("{:.0} events/s ({:.2} s)", n as f64 / run.secs(), run.secs()),
        if problems.is_empty() { "totals exact".to_string() } else { format!("{} MISMATCHES", problems.len()) },
    ];
    ctx.report.figure(fig);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pg_urls() {
        assert!(check_pg_url("postgres://postgres@127.0.0.1:5432/postgres").is_err());
        assert!(check_pg_url("postgres://postgres@127.0.0.1/postgres").is_err());
        assert!(check_pg_url("postgres://postgres@127.0.0.1:34567/postgres").is_ok());
        assert_eq!(with_database("postgres://u@h:1/postgres", "x"), "postgres://u@h:1/x");
        assert_eq!(with_database("postgres://u@h:1", "x"), "postgres://u@h:1/x");
        assert_eq!(with_database("postgres://u@h:1/p?sslmode=disable", "x"), "postgres://u@h:1/x?sslmode=disable");
    }
}
