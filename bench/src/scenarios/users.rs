//! process_sqlite_1m_users and process_postgres_1m_users: does the cost of an event depend on how many
//! users there are?
//!
//! Each scenario, in one run, on one backend:
//! - `eps process` on 2,000,000 events over 10,000 users (the twin: nearly every event adds to a user
//!   already summed) and on 2,000,000 events over 1,000,000 users (most events touch a user no other
//!   event of the log touches), totals checked exactly; goal: the second costs at most 2x per event.
//! - the store phase of the 1,000,000-user run (the time eps spent in `Store::commit`, which it prints in
//!   its summary) against a plain reference that writes the same per-user sums into a fresh store of
//!   the same schema (made by eps itself) the way someone who knows the database would:
//!   PostgreSQL: COPY of the sums into a temporary table, then one `INSERT … SELECT … ON CONFLICT DO
//!   UPDATE`; SQLite: one prepared upsert per user in key order inside one transaction, with a page cache
//!   large enough for the table. Goal: eps at least as fast. Both commit with the same durability
//!   (SQLite `synchronous=FULL` in WAL mode; PostgreSQL's own commit).
//!
//! - console_1m_users: an `eps server` on the 1,000,000-user store, its CPU over a while without a console
//!   and then with one open (`GET /console/stream`, what the page reads): what the console's summary
//!   (users, total revenue, top users: whole-table queries) costs at that size, counted as the machine's
//!   busy CPU so that PostgreSQL's work counts too. Goal: at most 0.10 of a core. The last summary's users
//!   must be the store's.
//! - read_user_p99: on each store (10,000 and 1,000,000 users), `GET /userEvents/{userId}` of random
//!   stored users under `wrk -t2 -c64` (see `served.rs`); goal: the p99 over 1,000,000 users at most 2x the
//!   10k-user twin's and at most 10 ms.
//! - status_1m_users: one `eps status` on the 1,000,000-user store beside its server; goal: at most 1 s.
//!
//! `--quick` divides the sizes by 100 (20,000 events over 100 and 10,000 users).

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context as _};
use rust_decimal::Decimal;

use crate::data::{write_canonical_log, Expected};
use crate::report::{Figure, Status};
use crate::scenarios::process::{
    create_database, drop_database, eps_process, pg_connect, read_pg_totals, read_sqlite_totals, report_mismatches,
    PROCESS_TIMEOUT,
};
use crate::scenarios::served::{self, Served};
use crate::util::{mib, Run, TempDir};
use crate::Ctx;

/// read_user_p99's goal: the p99 over 1,000,000 users at most this many times the 10k-user twin's…
const READ_P99_GOAL_RATIO: f64 = 2.0;
/// …and at most this, in seconds.
const READ_P99_GOAL_SECS: f64 = 0.010;
/// status_1m_users's goal: one `eps status` at 1,000,000 users within this, in seconds.
const STATUS_GOAL_SECS: f64 = 1.0;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// One measured `eps process` run.
struct Measured {
    users: u64,
    expected: Expected,
    run: Run,
    /// Seconds eps spent committing (its summary's `store … s`).
    store_secs: f64,
    commits: u64,
    problems: Vec<String>,
    /// A server on the store this run made: its reads, and (the many-user run only) its console and
    /// `eps status`.
    served: Served,
}

pub fn sqlite(ctx: &mut Ctx) -> anyhow::Result<()> {
    scenario(ctx, Backend::Sqlite, "process_sqlite_1m_users")
}

pub fn postgres(ctx: &mut Ctx) -> anyhow::Result<()> {
    let name = "process_postgres_1m_users";
    if ctx.pg_url.is_none() {
        ctx.report.line(format!("{name:<16} SKIPPED (no --pg-url; scripts/bench starts a throwaway cluster)"));
        return Ok(());
    }
    scenario(ctx, Backend::Postgres, name)
}

fn scenario(ctx: &mut Ctx, backend: Backend, name: &'static str) -> anyhow::Result<()> {
    let events = ctx.size(2_000_000);
    let few = measure(ctx, backend, name, events, ctx.size(10_000), false)?;
    let many = measure(ctx, backend, name, events, ctx.size(1_000_000), true)?;
    let reference = reference_store(ctx, backend, &many.expected)?;

    let valid = few.problems.is_empty() && many.problems.is_empty();
    report_mismatches(ctx, name, &few.problems);
    report_mismatches(ctx, name, &many.problems);
    let per_event = |m: &Measured| m.run.secs() / events as f64;
    let cost_ratio = per_event(&many) / per_event(&few);
    let rate = |m: &Measured| events as f64 / m.run.secs();
    let users_written = many.expected.user_count();
    let mut fig = Figure::new(
        name,
        format!("{:.0} events/s", rate(&many)),
        "cost/event <= 2.00x".into(),
        if valid { Status::from_goal(cost_ratio <= 2.0) } else { Status::Failed },
    );
    fig.reference = Some(format!("{:.0} events/s ({} users)", rate(&few), few.users));
    fig.ratio = Some(cost_ratio);
    fig.notes = vec![
        format!(
            "{events} events over {} users ({users_written} with events): {:.2} s, over {} users: {:.2} s",
            many.users,
            many.run.secs(),
            few.users,
            few.run.secs()
        ),
        format!("peak RSS {:.1} MiB vs {:.1} MiB", mib(many.run.max_rss), mib(few.run.max_rss)),
        if valid { "totals exact".to_string() } else { "MISMATCHES".to_string() },
    ];
    ctx.report.figure(fig);

    // The store phase against the reference: same rows, same schema, same durability.
    let store_ratio = reference / many.store_secs;
    let mut fig = Figure::new(
        name,
        format!("store {:.3} s", many.store_secs),
        "reference/eps >= 1.00".into(),
        if valid { Status::from_goal(store_ratio >= 1.0) } else { Status::Failed },
    );
    fig.reference = Some(format!("{reference:.3} s ({})", reference_name(backend)));
    fig.ratio = Some(store_ratio);
    fig.notes = vec![
        format!(
            "{users_written} users in {} commit(s): eps {:.2} us/user, reference {:.2} us/user",
            many.commits,
            many.store_secs * 1e6 / users_written as f64,
            reference * 1e6 / users_written as f64
        ),
        format!("10k-user twin: store {:.3} s in {} commit(s)", few.store_secs, few.commits),
    ];
    ctx.report.figure(fig);

    if let Some(c) = &many.served.console {
        let cost = c.with - c.without;
        let shown_right = c.users_shown == Some(users_written as u64);
        let mut fig = Figure::new(
            "console_1m_users",
            format!("{cost:.3} core"),
            "<= 0.10 core".into(),
            if shown_right && c.frames > 0 { Status::from_goal(cost <= 0.10) } else { Status::Failed },
        );
        fig.reference = Some(format!("{:.3} core (no console)", c.without));
        fig.notes = vec![
            format!(
                "{} store, {users_written} users: the machine's CPU over {} s without a console, then {} s with \
                 one streaming ({} summaries)",
                backend_name(backend),
                c.secs,
                c.secs,
                c.frames
            ),
            format!("eps server's own CPU: {:.3} core without, {:.3} with", c.server_without, c.server_with),
            format!(
                "last summary: users {}, whole-table figures {} s old",
                c.users_shown.map_or("none".into(), |u| u.to_string()),
                c.figures_age.map_or("?".into(), |a| format!("{a:.1}"))
            ),
        ];
        if !shown_right {
            fig.notes.push(format!("USERS SHOWN {:?}, STORE HAS {users_written}", c.users_shown));
        }
        ctx.report.figure(fig);
    }
    report_reads(ctx, backend, &few, &many);
    if let Some(st) = &many.served.status {
        let shown_right = st.users_shown == Some(users_written as u64);
        let mut fig = Figure::new(
            "status_1m_users",
            format!("{:.3} s", st.wall),
            format!("<= {STATUS_GOAL_SECS:.2} s"),
            if shown_right { Status::from_goal(st.wall <= STATUS_GOAL_SECS) } else { Status::Failed },
        );
        fig.notes = vec![
            format!(
                "`eps status --json` beside the server, {} store of {users_written} users: median of 3 calls; the \
                 machine's busy CPU {:.3} s per call (eps status and the database)",
                backend_name(backend),
                st.cpu
            ),
            format!("users shown {}", st.users_shown.map_or("none".into(), |u| u.to_string())),
        ];
        if !shown_right {
            fig.notes.push(format!("USERS SHOWN {:?}, STORE HAS {users_written}", st.users_shown));
        }
        ctx.report.figure(fig);
    }
    Ok(())
}

/// read_user_p99: the many-user store's read latency under load against the 10k-user twin's.
fn report_reads(ctx: &mut Ctx, backend: Backend, few: &Measured, many: &Measured) {
    let (r, twin) = (&many.served.reads, &few.served.reads);
    let valid = r.problems.is_empty() && twin.problems.is_empty();
    let ratio = r.p99 / twin.p99;
    let mut fig = Figure::new(
        "read_user_p99",
        format!("p99 {:.2} ms", r.p99 * 1e3),
        format!("<= {READ_P99_GOAL_RATIO:.2}x and <= {:.0} ms", READ_P99_GOAL_SECS * 1e3),
        if valid {
            Status::from_goal(ratio <= READ_P99_GOAL_RATIO && r.p99 <= READ_P99_GOAL_SECS)
        } else {
            Status::Failed
        },
    );
    fig.reference = Some(format!("p99 {:.2} ms ({} users)", twin.p99 * 1e3, few.users));
    fig.ratio = Some(ratio);
    fig.notes = vec![
        format!(
            "{} store, GET /userEvents of random stored users, wrk -t2 -c64 -d{}s: {:.0} req/s, p50 {:.2} ms over {} \
             users; {:.0} req/s, p50 {:.2} ms over {}",
            backend_name(backend),
            r.secs,
            r.rps,
            r.p50 * 1e3,
            many.expected.user_count(),
            twin.rps,
            twin.p50 * 1e3,
            few.expected.user_count()
        ),
        if valid { "100 answers per store checked exactly".into() } else { "WRONG ANSWERS OR ERRORS".into() },
    ];
    fig.notes.extend(twin.problems.iter().chain(&r.problems).take(5).cloned());
    ctx.report.figure(fig);
}

fn backend_name(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "SQLite",
        Backend::Postgres => "PostgreSQL",
    }
}

fn reference_name(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "prepared upsert, key order, one tx",
        Backend::Postgres => "COPY + INSERT ON CONFLICT",
    }
}

/// Generates `events` events over `users` users, runs `eps process` on them into a fresh store, checks
/// the totals.
fn measure(
    ctx: &mut Ctx,
    backend: Backend,
    name: &str,
    events: u64,
    users: u64,
    many: bool,
) -> anyhow::Result<Measured> {
    let what = served::Measure { console: many, status: many };
    let dir = ctx.scratch(&format!("{name}-{users}"))?;
    let (expected, _) = write_canonical_log(&dir.path().join("log"), events, users, u64::MAX)?;
    let (run, actual, served) = match backend {
        Backend::Sqlite => {
            let run = process(ctx, dir.path(), None)?;
            let actual = read_sqlite_totals(&dir.path().join("eps.sqlite3"))?;
            let served = served::measure(ctx, dir.path(), None, &expected, what)?;
            (run, actual, served)
        }
        Backend::Postgres => {
            let admin_url = ctx.pg_url.clone().context("no --pg-url")?;
            let (db, db_url) = create_database(ctx, &admin_url)?;
            let result = process(ctx, dir.path(), Some(&db_url)).and_then(|run| {
                let actual = read_pg_totals(ctx, &db_url)?;
                let served = served::measure(ctx, dir.path(), Some(&db_url), &expected, what)?;
                Ok((run, actual, served))
            });
            let dropped = drop_database(ctx, &admin_url, &db);
            let measured = result?;
            dropped?;
            measured
        }
    };
    let problems = expected.compare(&actual);
    let (store_secs, commits) = store_phase(&run.log)?;
    Ok(Measured { users, expected, run, store_secs, commits, problems, served })
}

fn process(ctx: &Ctx, data_dir: &Path, database_url: Option<&str>) -> anyhow::Result<Run> {
    eps_process(ctx, data_dir, database_url, "process.log", PROCESS_TIMEOUT)
}

/// `store 1.234s in 5 commits` from eps process's summary line.
fn store_phase(log: &Path) -> anyhow::Result<(f64, u64)> {
    let text = std::fs::read_to_string(log)?;
    for line in text.lines().rev() {
        let Some((_, rest)) = line.split_once("; store ") else { continue };
        let mut words = rest.split_whitespace();
        let secs = words.next().and_then(|w| w.strip_suffix('s')).and_then(|w| w.parse::<f64>().ok());
        let commits = words.nth(1).and_then(|w| w.parse::<u64>().ok());
        if let (Some(secs), Some(commits)) = (secs, commits) {
            return Ok((secs, commits));
        }
    }
    bail!("eps process printed no `store … s in … commits` in its summary")
}

/// The per-user sums of `expected` as a processor holds them: a hash map (in no particular order).
fn sums(expected: &Expected) -> HashMap<String, Decimal> {
    expected.totals.iter().enumerate().filter_map(|(user, total)| total.map(|t| (format!("user{user}"), t))).collect()
}

/// The sums in key (byte) order, as exact decimal text: part of each reference's timed work, as
/// sorting and formatting are part of eps's store phase.
fn sorted_text(sums: &HashMap<String, Decimal>) -> Vec<(&str, String)> {
    let mut rows: Vec<(&str, String)> = sums.iter().map(|(u, t)| (u.as_str(), t.normalize().to_string())).collect();
    rows.sort_unstable_by(|a, b| a.0.cmp(b.0));
    rows
}

/// Seconds the reference takes to write `expected`'s sums into a fresh store of eps's schema.
fn reference_store(ctx: &Ctx, backend: Backend, expected: &Expected) -> anyhow::Result<f64> {
    let rows = sums(expected);
    // The schema is eps's own: an `eps process` on an empty log makes it.
    let dir = ctx.scratch("reference-store")?;
    std::fs::create_dir_all(dir.path().join("log"))?;
    match backend {
        Backend::Sqlite => {
            process(ctx, dir.path(), None)?;
            sqlite_reference(&dir, &rows)
        }
        Backend::Postgres => {
            let admin_url = ctx.pg_url.clone().context("no --pg-url")?;
            let (db, db_url) = create_database(ctx, &admin_url)?;
            let result = process(ctx, dir.path(), Some(&db_url))
                .and_then(|_| ctx.rt.block_on(postgres_reference(&db_url, &rows)));
            let dropped = drop_database(ctx, &admin_url, &db);
            let secs = result?;
            dropped?;
            Ok(secs)
        }
    }
}

/// One prepared upsert per user, in key order, in one transaction, with a page cache that holds the
/// table and its indexes (256 MiB); WAL and `synchronous=FULL` as eps runs it.
fn sqlite_reference(dir: &TempDir, sums: &HashMap<String, Decimal>) -> anyhow::Result<f64> {
    let mut conn = rusqlite::Connection::open(dir.path().join("eps.sqlite3"))?;
    conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0))?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "cache_size", -256 * 1024)?;
    let started = Instant::now();
    let rows = sorted_text(sums);
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut upsert = tx.prepare(
            "INSERT INTO users_revenue (user_id, revenue, revenue_key) VALUES (?1, ?2, ?3)
             ON CONFLICT (user_id) DO UPDATE SET revenue = excluded.revenue, revenue_key = excluded.revenue_key",
        )?;
        for (user, revenue) in &rows {
            upsert.execute((user, revenue, order_key(revenue)))?;
        }
    }
    tx.commit()?;
    Ok(started.elapsed().as_secs_f64())
}

/// COPY (text format) into a temporary table, then one INSERT … SELECT … ON CONFLICT, one transaction.
async fn postgres_reference(db_url: &str, sums: &HashMap<String, Decimal>) -> anyhow::Result<f64> {
    use futures::SinkExt as _;
    let mut client = pg_connect(db_url).await?;
    let started = Instant::now();
    let rows = sorted_text(sums);
    let tx = client.transaction().await?;
    tx.batch_execute("CREATE TEMP TABLE reference_sums (user_id TEXT, revenue NUMERIC) ON COMMIT DROP").await?;
    let sink = tx.copy_in("COPY reference_sums FROM STDIN").await?;
    futures::pin_mut!(sink);
    let mut buf = Vec::with_capacity(1 << 20);
    for (user, revenue) in &rows {
        // userIds of the generator need no escaping in COPY's text format.
        buf.extend_from_slice(user.as_bytes());
        buf.push(b'\t');
        buf.extend_from_slice(revenue.as_bytes());
        buf.push(b'\n');
        if buf.len() >= 1 << 20 {
            sink.send(bytes_of(&mut buf)).await?;
        }
    }
    if !buf.is_empty() {
        sink.send(bytes_of(&mut buf)).await?;
    }
    sink.finish().await?;
    tx.execute(
        "INSERT INTO users_revenue (user_id, revenue) SELECT user_id, revenue FROM reference_sums
         ON CONFLICT (user_id) DO UPDATE SET revenue = users_revenue.revenue + EXCLUDED.revenue",
        &[],
    )
    .await?;
    tx.commit().await?;
    Ok(started.elapsed().as_secs_f64())
}

fn bytes_of(buf: &mut Vec<u8>) -> std::io::Cursor<Vec<u8>> {
    std::io::Cursor::new(std::mem::replace(buf, Vec::with_capacity(1 << 20)))
}

/// eps's `order_key` (src/money.rs) of a plain normalised decimal: byte order = numeric order. The
/// reference writes the same column eps keeps for its top users.
fn order_key(plain: &str) -> String {
    let (negative, magnitude) = match plain.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, plain),
    };
    let (int, frac) = magnitude.split_once('.').unwrap_or((magnitude, ""));
    let (int, frac) = (int.trim_start_matches('0'), frac.trim_end_matches('0'));
    if int.is_empty() && frac.is_empty() {
        return "1".to_string();
    }
    let digits = format!("{:010}{int}{frac}", int.len());
    if negative {
        let complement: String = digits.bytes().map(|d| char::from(b'9' - (d - b'0'))).collect();
        format!("0{complement}~")
    } else {
        format!("2{digits}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_keys_sort_numerically() {
        let values = ["-12.5", "-1.5", "-1.51", "0", "0.25", "1", "1.5", "10"];
        let mut sorted: Vec<&str> = values.to_vec();
        sorted.sort_by_key(|v| order_key(v));
        assert_eq!(sorted, ["-12.5", "-1.51", "-1.5", "0", "0.25", "1", "1.5", "10"]);
    }

    #[test]
    fn the_store_phase_is_read_from_the_summary() {
        let dir = std::env::temp_dir().join(format!("eps-bench-users-{}", std::process::id()));
        std::fs::write(&dir, "x\napplied 5 events for 2 users, 0 invalid lines, 0 conflicts, in 0.10s (50 events/s); checkpoint at byte 9; store 0.042s in 3 commits\n").unwrap();
        assert_eq!(store_phase(&dir).unwrap(), (0.042, 3));
        std::fs::remove_file(&dir).unwrap();
    }
}
