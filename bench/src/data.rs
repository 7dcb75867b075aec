//! Generated data. Everything comes from [`SEED`], so every run measures the same bytes.
//!
//! Events: user `user<N>` with N uniform over the user count, ~10% `subtract_revenue`, values with 0 to 2
//! decimals below 1000. While writing, the exact total of every user is summed with rust_decimal, so the
//! processors' results can be compared exactly afterwards.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rust_decimal::Decimal;

use crate::util::Rng;

/// The one seed of the benchmark.
pub const SEED: u64 = 0x5EED_0E95_BE4C_2025;

/// First `ts` of the canonical log (2025-11-24, like the README's example).
const TS_BASE: u64 = 1_764_000_000_000;

/// One generated event.
pub struct Event {
    pub user: u64,
    pub subtract: bool,
    pub value: Decimal,
}

impl Event {
    pub fn name(&self) -> &'static str {
        if self.subtract {
            "subtract_revenue"
        } else {
            "add_revenue"
        }
    }
}

/// The event stream: deterministic for a given (seed, user count).
pub struct Generator {
    rng: Rng,
    users: u64,
}

impl Generator {
    pub fn new(seed: u64, users: u64) -> Generator {
        Generator { rng: Rng::new(seed), users }
    }

    pub fn next_event(&mut self) -> Event {
        let user = self.rng.below(self.users);
        let subtract = self.rng.below(10) == 0;
        // 0, 1 or 2 decimals; the mantissa keeps the value below 1000.
        let scale = self.rng.below(3) as u32;
        let mantissa = self.rng.below(1000 * 10u64.pow(scale)) as i64;
        Event { user, subtract, value: Decimal::new(mantissa, scale) }
    }
}

/// The exact expected state after applying generated events.
pub struct Expected {
    /// Total per user index; None for a user that got no event (it has no row).
    pub totals: Vec<Option<Decimal>>,
    pub events: u64,
    pub bytes: u64,
}

impl Expected {
    fn new(users: u64) -> Expected {
        Expected { totals: vec![None; users as usize], events: 0, bytes: 0 }
    }

    fn apply(&mut self, e: &Event) {
        let delta = if e.subtract { -e.value } else { e.value };
        let slot = &mut self.totals[e.user as usize];
        *slot = Some(slot.unwrap_or(Decimal::ZERO) + delta);
    }

    pub fn user_count(&self) -> usize {
        self.totals.iter().filter(|t| t.is_some()).count()
    }

    /// Compares with what a store holds (user id -> revenue). Returns one message per difference.
    pub fn compare(&self, actual: &HashMap<String, Decimal>) -> Vec<String> {
        let mut problems = Vec::new();
        for (user, expected) in self.totals.iter().enumerate() {
            let id = format!("user{user}");
            match (expected, actual.get(&id)) {
                (Some(e), Some(a)) if e == a => {}
                (Some(e), Some(a)) => problems.push(format!("MISMATCH {id}: expected {e}, store has {a}")),
                (Some(e), None) => problems.push(format!("MISMATCH {id}: expected {e}, store has no row")),
                (None, Some(a)) => problems.push(format!("MISMATCH {id}: expected no row, store has {a}")),
                (None, None) => {}
            }
        }
        let known = actual.keys().filter(|k| parse_user(k).is_some_and(|u| u < self.totals.len())).count();
        if known < actual.len() {
            problems.push(format!("MISMATCH the store has {} unexpected users", actual.len() - known));
        }
        problems
    }
}

fn parse_user(id: &str) -> Option<usize> {
    id.strip_prefix("user")?.parse().ok()
}

/// Writes `n` events in the seed's client format (`{"userId":…,"name":…,"value":…}`), one per line.
pub fn write_client_file(path: &Path, n: u64, users: u64) -> anyhow::Result<Expected> {
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut gen = Generator::new(SEED, users);
    let mut expected = Expected::new(users);
    for _ in 0..n {
        let e = gen.next_event();
        let line = format!("{{\"userId\":\"user{}\",\"name\":\"{}\",\"value\":{}}}\n", e.user, e.name(), e.value);
        out.write_all(line.as_bytes())?;
        expected.bytes += line.len() as u64;
        expected.events += 1;
        expected.apply(&e);
    }
    out.flush()?;
    Ok(expected)
}

/// Writes `n` events straight into `log_dir` in the server's canonical line format
/// (`{"userId":…,"name":…,"value":…,"id":"bench-<i>","ts":…}`), streaming to disk. Segments are
/// named like the server names them (`server-events-<20-digit global byte position>.jsonl`); a new one
/// starts when the next line would take the current one past `segment_bytes` (`u64::MAX`: one file).
pub fn write_canonical_log(
    log_dir: &Path,
    n: u64,
    users: u64,
    segment_bytes: u64,
) -> anyhow::Result<(Expected, Vec<PathBuf>)> {
    std::fs::create_dir_all(log_dir)?;
    let mut gen = Generator::new(SEED, users);
    let mut expected = Expected::new(users);
    let mut segments = Vec::new();
    let mut out: Option<BufWriter<File>> = None;
    let mut segment_len = 0u64;
    let mut line = String::with_capacity(128);
    for i in 0..n {
        let e = gen.next_event();
        line.clear();
        use std::fmt::Write as _;
        writeln!(
            line,
            "{{\"userId\":\"user{}\",\"name\":\"{}\",\"value\":{},\"id\":\"bench-{}\",\"ts\":{}}}",
            e.user,
            e.name(),
            e.value,
            i + 1,
            TS_BASE + i / 1000
        )?;
        let len = line.len() as u64;
        if out.is_none() || (segment_len > 0 && segment_len + len > segment_bytes) {
            if let Some(mut w) = out.take() {
                w.flush()?;
            }
            let path = log_dir.join(format!("server-events-{:020}.jsonl", expected.bytes));
            out = Some(BufWriter::with_capacity(
                1 << 20,
                File::create(&path).with_context(|| path.display().to_string())?,
            ));
            segments.push(path);
            segment_len = 0;
        }
        out.as_mut().expect("opened above").write_all(line.as_bytes())?;
        segment_len += len;
        expected.bytes += len;
        expected.events += 1;
        expected.apply(&e);
    }
    if let Some(mut w) = out.take() {
        w.flush()?;
    }
    Ok((expected, segments))
}

/// A `/events` body: `lines` JSON Lines events for distinct users (`user0`…), values from the seed.
pub fn batch_body(lines: u64) -> String {
    let mut gen = Generator::new(SEED, 1);
    let mut body = String::new();
    for user in 0..lines {
        let e = gen.next_event();
        body.push_str(&format!("{{\"userId\":\"user{user}\",\"name\":\"{}\",\"value\":{}}}\n", e.name(), e.value));
    }
    body
}
