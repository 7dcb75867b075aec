//! Valid but extreme values: every edge of the value rules (28 significant digits, 28 decimal places,
//! magnitudes up to 7.9e28, exponents, zero), added and subtracted, mixed per user so that totals leave
//! any fixed-width decimal far behind, sent through the server while a processor follows the log.
//!
//! The oracle is Python's `decimal` with a precision far beyond any total here, fed the events' own text:
//! nothing of eps (its parser, its sums, its decimal types) computes an expected value.

use crate::common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::fault::{scaled, seed, Report};
use common::*;
use rand::{Rng, SeedableRng};

/// A valid value at or near an edge of the rules, as the JSON number text a producer would send.
fn edge_value(rng: &mut impl Rng) -> String {
    let digits = |rng: &mut dyn rand::RngCore, n: usize| -> String {
        let mut s: String = (0..n).map(|_| char::from(b'0' + rng.random_range(0..10u8))).collect();
        if s.starts_with('0') {
            s.replace_range(0..1, "9");
        }
        s
    };
    match rng.random_range(0..10) {
        0 => "9999999999999999999999999999".into(),   // 28 nines
        1 => "7922816251426433759354395033".into(),   // 28 digits near the top of the range
        2 => "0.0000000000000000000000000001".into(), // 1e-28
        3 => "0.9999999999999999999999999999".into(), // 28 decimal places
        4 => "1e-28".into(),
        5 => "9.999999999999999999999999999e27".into(),
        6 => ["0", "0.0", "0e5", "100000000000"][rng.random_range(0..4)].into(),
        _ => {
            // 28 random significant digits with the point anywhere from 0 to 28 places.
            let d = digits(rng, 28);
            let places = rng.random_range(0..=28);
            let (int, frac) = d.split_at(28 - places);
            match (int.is_empty(), frac.is_empty()) {
                (true, _) => format!("0.{frac}"),
                (_, true) => int.to_string(),
                _ => format!("{int}.{frac}"),
            }
        }
    }
}

/// Checks the stored totals against Python's exact decimal sums of the events' text; the mismatches.
fn python_check(events: &[(String, bool, String)], stored: &BTreeMap<String, Option<String>>) -> String {
    let input = serde_json::json!({
        "events": events.iter().map(|(u, add, v)| serde_json::json!([u, add, v])).collect::<Vec<_>>(),
        "stored": stored,
    });
    let script = r#"
import json, sys
from decimal import Decimal, getcontext
getcontext().prec = 400
data = json.load(sys.stdin)
want = {}
for user, add, value in data["events"]:
    want[user] = want.get(user, Decimal(0)) + (Decimal(value) if add else -Decimal(value))
bad = []
for user, total in want.items():
    got = data["stored"].get(user)
    if got is None or Decimal(got) != total:
        bad.append(f"{user}: want {total}, stored {got}")
for user in data["stored"]:
    if user not in want:
        bad.append(f"{user}: stored {data['stored'][user]} but never sent")
print("\n".join(bad))
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(input.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the oracle failed");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

async fn extreme_values_mixed_per_user_are_applied_exactly(kind: StoreKind) {
    let scenario = "extreme_values";
    let seed = seed(scenario);
    let started = Instant::now();
    let env = Env::new(kind).await;
    let server = env.server().await;
    let follower = env.spawn_process(&["--follow", "--poll-ms", "2"]);
    let http = http();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let batches = scaled(30, 2_000);
    let users: Vec<String> = (0..12).map(|i| format!("edge{i}")).collect();
    let mut sent: Vec<(String, bool, String)> = Vec::new();
    for b in 0..batches {
        let mut body = String::new();
        let mut lines = Vec::new();
        for i in 0..100 {
            let user = users[rng.random_range(0..users.len())].clone();
            let add = rng.random_bool(0.7);
            let value = edge_value(&mut rng);
            let name = if add { "add_revenue" } else { "subtract_revenue" };
            body.push_str(&format!(r#"{{"userId":"{user}","name":"{name}","value":{value},"id":"v{b}-{i}"}}"#));
            body.push('\n');
            lines.push((user, add, value));
        }
        let (status, answer) = post_ndjson(&http, &server.url, body).await;
        assert_eq!(
            (status, &answer["accepted"]),
            (200, &serde_json::json!(100)),
            "valid edge values refused: {answer}"
        );
        sent.extend(lines);
    }
    // Caught up: every user's total stored, then compared.
    let deadline = Instant::now() + Duration::from_secs(60);
    let stored = loop {
        let mut stored = BTreeMap::new();
        for user in &users {
            stored.insert(user.clone(), env.db.raw_revenue(&env.data_dir, user).await);
        }
        let mismatches = python_check(&sent, &stored);
        if mismatches.is_empty() || Instant::now() > deadline {
            break (stored, mismatches);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (stored, mismatches) = stored;
    drop(follower);
    Report {
        scenario,
        store: kind.name(),
        seed,
        events_sent: sent.len() as u64,
        events_lost: if mismatches.is_empty() { 0 } else { mismatches.lines().count() as u64 },
        duration: started.elapsed(),
        notes: "values at every edge of the rules (28 digits, 1e-28, exponents, zero), added and subtracted, mixed per user, a --follow processor; totals checked against Python's decimal; events lost = users whose total is wrong".into(),
        ..Report::default()
    }
    .write();
    assert!(mismatches.is_empty(), "totals differ from the exact sums:\n{mismatches}");
    // Far beyond a 96-bit decimal, as intended: at least one total has more than 28 significant digits.
    let widest = stored.values().flatten().map(|t| t.chars().filter(char::is_ascii_digit).count()).max().unwrap_or(0);
    assert!(widest > 29, "no total left the 28-digit range ({stored:?}): the scenario tested less than it says");
    // A one-shot run on top applies nothing more.
    let again = env.process(&[]).await;
    assert!(again.stdout.contains("applied 0 events"), "{again}");
}

store_tests!(extreme_values_mixed_per_user_are_applied_exactly);
