//! Shared rules of the fault-injection suite (the `fault_*` and `hostile_*` tests).
//!
//! Every scenario has a short version (what `cargo test` runs, a few seconds each) and a long version
//! (`EPS_FAULT_LONG=1`, run by `scripts/fault-suite`). Randomness comes from one seed per scenario,
//! `EPS_FAULT_SEED` or a fixed default, printed by every test so a failure can be replayed. When
//! `EPS_FAULT_REPORT_DIR` is set each scenario writes its figures there as `<scenario>.json`;
//! `scripts/fault-suite` turns those files into docs/RELIABILITY.md.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::json;

/// The seed used when `EPS_FAULT_SEED` is not set.
pub const DEFAULT_SEED: u64 = 20261125;

/// True for the long versions (`EPS_FAULT_LONG=1`).
pub fn long() -> bool {
    std::env::var("EPS_FAULT_LONG").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// `short` in `cargo test`, `long` in the long run.
pub fn scaled<T>(short: T, long_value: T) -> T {
    if long() {
        long_value
    } else {
        short
    }
}

/// The scenario's seed; printed so that a failing run can be replayed with `EPS_FAULT_SEED=<seed>`.
pub fn seed(scenario: &str) -> u64 {
    let seed = std::env::var("EPS_FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_SEED);
    eprintln!("fault scenario {scenario}: seed {seed} (replay with EPS_FAULT_SEED={seed}), long={}", long());
    seed
}

/// How far the totals in the database are from the totals computed from the input, in events of
/// value `unit` (use one value for every event of a scenario so the counts are exact per user).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub users_expected: u64,
    pub users_wrong: u64,
    pub events_lost: u64,
    pub events_doubled: u64,
}

impl Tally {
    pub fn exact(&self) -> bool {
        self.users_wrong == 0
    }
}

pub fn tally(expected: &BTreeMap<String, Decimal>, actual: &BTreeMap<String, Decimal>, unit: Decimal) -> Tally {
    let mut t = Tally { users_expected: expected.len() as u64, ..Tally::default() };
    let users: std::collections::BTreeSet<&String> = expected.keys().chain(actual.keys()).collect();
    for user in users {
        let want = expected.get(user).copied().unwrap_or_default();
        let got = actual.get(user).copied().unwrap_or_default();
        if want == got {
            continue;
        }
        t.users_wrong += 1;
        let events = ((got - want) / unit).abs().round();
        let events = u64::try_from(events.mantissa()).unwrap_or(u64::MAX);
        if got > want {
            t.events_doubled += events;
        } else {
            t.events_lost += events;
        }
    }
    t
}

/// Figures of one scenario run, as docs/RELIABILITY.md reports them.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub scenario: &'static str,
    pub store: &'static str,
    pub seed: u64,
    pub events_sent: u64,
    pub kills: u64,
    pub events_lost: u64,
    pub events_doubled: u64,
    pub bad_inputs: u64,
    pub fuzz_executions: u64,
    pub duration: Duration,
    /// One sentence on what was done, e.g. "server SIGKILLed at random moments while the client sent".
    pub notes: String,
}

impl Report {
    /// Writes `<EPS_FAULT_REPORT_DIR>/<scenario>[-<store>].json` when the variable is set.
    pub fn write(&self) {
        let Ok(dir) = std::env::var("EPS_FAULT_REPORT_DIR") else { return };
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).expect("create EPS_FAULT_REPORT_DIR");
        let name = if self.store.is_empty() {
            format!("{}.json", self.scenario)
        } else {
            format!("{}-{}.json", self.scenario, self.store)
        };
        let record = json!({
            "scenario": self.scenario,
            "store": self.store,
            "long": long(),
            "seed": self.seed,
            "events_sent": self.events_sent,
            "kills": self.kills,
            "events_lost": self.events_lost,
            "events_doubled": self.events_doubled,
            "bad_inputs": self.bad_inputs,
            "fuzz_executions": self.fuzz_executions,
            "duration_secs": self.duration.as_secs_f64(),
            "notes": self.notes,
        });
        std::fs::write(dir.join(name), serde_json::to_vec_pretty(&record).unwrap()).expect("write fault report");
    }
}
