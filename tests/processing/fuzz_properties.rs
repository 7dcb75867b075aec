//! Issue 3, scenario 9 inside `cargo test`: the invariants the cargo-fuzz targets (fuzz/) check, as
//! proptest properties, plus every input kept under fuzz/seeds and fuzz/regressions (a crash found by
//! fuzzing is saved there and replayed here for good).
//!
//! - Event parser: whatever the bytes, `Event::parse_request` and `EventRef::parse_log_line` do not
//!   panic, and an accepted event has a userId of 1 to 255 bytes, a value >= 0, and a log line that
//!   parses back to the same event. A model of the README's value rule says which values must be
//!   accepted and which refused.
//! - Segment reader: whatever the bytes of one or two segments, reading from 0 returns contiguous chunks
//!   of whole lines that together are the log's complete bytes, and stops.
//!
//! The checks themselves are in fuzz/src/lib.rs, shared with the fuzz targets. Randomness comes from
//! the fault suite's seed (`EPS_FAULT_SEED`), so a failure replays; `EPS_FAULT_LONG=1` runs more cases.

#[allow(dead_code)] // scratch_dir is for the fuzz targets
#[path = "../../fuzz/src/lib.rs"]
mod checks;
use crate::common;

use std::path::{Path, PathBuf};
use std::str::FromStr;

use checks::SegmentCase;
use common::fault;
use eps::event::{Event, EventKind};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use rust_decimal::Decimal;

/// A runner seeded from the fault suite's seed, which never writes regression files into the tree.
fn runner(scenario: &str, short: u32, long: u32) -> TestRunner {
    let seed = fault::seed(scenario);
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..8 + scenario.len().min(24)].copy_from_slice(&scenario.as_bytes()[..scenario.len().min(24)]);
    let config = Config { cases: fault::scaled(short, long), failure_persistence: None, ..Config::default() };
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &key))
}

/// Runs `check` (which panics on a broken invariant) as a proptest case, so failures are shrunk.
fn caught(check: impl FnOnce()) -> Result<(), TestCaseError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(check)).map_err(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into());
        TestCaseError::fail(message)
    })
}

// ---------------------------------------------------------------------------------------------------
// The event parser

#[test]
fn parsing_arbitrary_bytes_never_panics_and_accepted_events_keep_their_invariants() {
    let bytes = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..160),
        // Bytes that look more like JSON, so the fields' own checks are reached.
        proptest::collection::vec(
            prop_oneof![
                Just(b'{'),
                Just(b'}'),
                Just(b'"'),
                Just(b':'),
                Just(b','),
                Just(b'\\'),
                Just(b'-'),
                Just(b'.'),
                Just(b'e'),
                b'0'..=b'9',
                any::<u8>(),
            ],
            0..80
        ),
    ];
    runner("fuzz_properties_event_bytes", 1000, 50_000)
        .run(&bytes, |data| caught(|| checks::check_event_bytes(&data)))
        .unwrap();
}

/// A JSON body assembled from parts, each either right or wrong in one of the ways a client gets wrong.
#[derive(Debug, Clone)]
struct Body {
    user_id: String,
    name: String,
    value: String,
    id: Option<String>,
    extra: Option<String>,
}

impl Body {
    fn json(&self) -> String {
        let q = |s: &str| serde_json::to_string(s).unwrap();
        let mut out = format!(r#"{{"userId":{},"name":{},"value":{}"#, q(&self.user_id), q(&self.name), self.value);
        if let Some(id) = &self.id {
            out.push_str(&format!(r#","id":{}"#, q(id)));
        }
        if let Some(extra) = &self.extra {
            out.push_str(extra);
        }
        out.push('}');
        out
    }
}

fn body_strategy() -> impl Strategy<Value = Body> {
    let user_id = prop_oneof![
        "[a-z0-9_-]{1,20}",
        any::<String>(),
        "[aé€😀]{60,70}",
        "u{250,260}",
        Just(String::new()),
        "[a-z]{1,5}[\\x00-\\x1f\\x7f\\u{80}-\\u{9f}][a-z]{0,5}",
        Just("'; DROP TABLE users_revenue; --".to_string()),
    ];
    let name = prop_oneof![
        4 => Just("add_revenue".to_string()),
        4 => Just("subtract_revenue".to_string()),
        1 => "[a-zA-Z_]{0,20}",
    ];
    let value = prop_oneof![
        6 => "-?(0|[1-9][0-9]{0,32})(\\.[0-9]{1,32})?([eE][+-]?[0-9]{1,3})?",
        1 => "0\\.0{20,40}[1-9]",
        1 => "[1-9][0-9]{26,30}",
        1 => prop_oneof![Just("null"), Just("true"), Just("\"10\""), Just("[1]"), Just("{}")].prop_map(String::from),
    ];
    let id = proptest::option::of(prop_oneof![".{0,10}", "[a-f0-9-]{120,136}"]);
    let extra = proptest::option::weighted(
        0.1,
        prop_oneof![
            Just(r#","ts":1"#.to_string()),
            Just(r#","userID":"x""#.to_string()),
            Just(r#","value":1"#.to_string())
        ],
    );
    (user_id, name, value, id, extra).prop_map(|(user_id, name, value, id, extra)| Body {
        user_id,
        name,
        value,
        id,
        extra,
    })
}

/// The README's rule for `value`, written independently of src/event.rs: a JSON number without sign,
/// at most 28 significant digits and 28 decimal places (trailing zeros carry none), below 2^96.
fn model_accepts_value(text: &str) -> Option<Decimal> {
    if text.starts_with('-') || !text.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let (mantissa, exponent) = match text.split_once(['e', 'E']) {
        Some((m, e)) => (m, i128::from(e.parse::<i64>().ok()?)),
        None => (text, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{int}{frac}");
    let significant = digits.trim_start_matches('0');
    if significant.is_empty() {
        return Some(Decimal::ZERO);
    }
    let trimmed = significant.trim_end_matches('0');
    // Position of the decimal point relative to the end of `trimmed`.
    let scale = frac.len() as i128 - exponent - (significant.len() - trimmed.len()) as i128;
    if trimmed.len() > 28 || scale > 28 {
        return None;
    }
    let integer_digits = trimmed.len() as i128 - scale.min(0); // scale < 0: zeros appended
    if integer_digits > 29 {
        return None;
    }
    let text = if scale >= 0 {
        let mut padded = format!("{:0>width$}", trimmed, width = scale as usize + 1);
        padded.insert(padded.len() - scale as usize, '.');
        padded
    } else {
        format!("{trimmed}{}", "0".repeat((-scale) as usize))
    };
    Decimal::from_str_exact(text.trim_end_matches('.')).ok()
}

#[test]
fn assembled_bodies_are_accepted_exactly_when_every_field_follows_the_readme() {
    runner("fuzz_properties_event_bodies", 1000, 50_000)
        .run(&body_strategy(), |body| {
            let json = body.json();
            caught(|| checks::check_event_bytes(json.as_bytes()))?;
            let user_ok = (1..=255).contains(&body.user_id.len()) && !body.user_id.chars().any(char::is_control);
            let kind = match body.name.as_str() {
                "add_revenue" => Some(EventKind::AddRevenue),
                "subtract_revenue" => Some(EventKind::SubtractRevenue),
                _ => None,
            };
            let id_ok = body.id.as_ref().is_none_or(|id| (1..=128).contains(&id.len()));
            let value = model_accepts_value(&body.value);
            let parsed = Event::parse_request(json.as_bytes());
            match (user_ok && kind.is_some() && id_ok && body.extra.is_none(), value, parsed) {
                (true, Some(value), Ok(event)) => {
                    prop_assert_eq!(event.user_id(), body.user_id.as_str());
                    prop_assert_eq!(Some(event.kind()), kind);
                    prop_assert_eq!(event.value(), value, "value {}", body.value);
                    prop_assert_eq!(event.id(), body.id.as_deref());
                }
                (true, Some(value), Err(e)) => {
                    prop_assert!(false, "{json} refused ({e}) though its value {value} and fields are valid")
                }
                (_, _, Ok(event)) => prop_assert!(false, "{json} accepted as {event:?} though the README refuses it"),
                (_, _, Err(_)) => {}
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn the_value_model_agrees_with_the_unit_tests_examples() {
    // The model above is itself checked against the cases src/event.rs documents.
    assert_eq!(model_accepts_value("0.1"), Some(Decimal::from_str("0.1").unwrap()));
    assert_eq!(model_accepts_value("1e3"), Some(Decimal::from(1000)));
    assert_eq!(model_accepts_value("1.5E-2"), Some(Decimal::from_str("0.015").unwrap()));
    assert_eq!(model_accepts_value("1.500000000000000000000000000000"), Some(Decimal::from_str("1.5").unwrap()));
    assert_eq!(
        model_accepts_value("1234567890123456789012345678").map(|d| d.to_string()).as_deref(),
        Some("1234567890123456789012345678")
    );
    assert_eq!(model_accepts_value("79228162514264337593543950335"), None, "29 significant digits");
    assert_eq!(model_accepts_value("1e28"), Some(Decimal::from_str("10000000000000000000000000000").unwrap()));
    for bad in
        ["-1", "-0", "1e400", "1e-400", "1e29", "9e28", "0.00000000000000000000000000001", "1e99999999999999999999"]
    {
        assert_eq!(model_accepts_value(bad), None, "{bad}");
    }
}

// ---------------------------------------------------------------------------------------------------
// The segment reader

/// A scratch directory of this test only (tests run in parallel): in /dev/shm when there is one.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::tempdir_in(shm) {
            return dir;
        }
    }
    tempfile::tempdir().unwrap()
}

fn segment_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // Lines of event-like text, the last one possibly without its newline.
        (proptest::collection::vec("[a-z{}\":, ]{0,30}", 0..12), proptest::option::of("[a-z{}\":, ]{1,30}"),).prop_map(
            |(lines, tail)| {
                let mut out = Vec::new();
                for line in lines {
                    out.extend_from_slice(line.as_bytes());
                    out.push(b'\n');
                }
                if let Some(tail) = tail {
                    out.extend_from_slice(tail.as_bytes());
                }
                out
            }
        ),
        // Raw bytes with many newlines (empty lines, CR, NUL, invalid UTF-8).
        proptest::collection::vec(prop_oneof![3 => Just(b'\n'), 1 => Just(b'\r'), 6 => any::<u8>()], 0..200),
    ]
}

fn segment_case() -> impl Strategy<Value = SegmentCase> {
    let max_chunk = prop_oneof![1usize..16, 16usize..128, Just(1 << 20)];
    (segment_bytes(), proptest::option::of(segment_bytes()), max_chunk).prop_map(|(first, second, max_chunk)| {
        let segments = match second {
            Some(second) if !first.is_empty() => vec![first, second],
            _ => vec![first],
        };
        SegmentCase { segments, max_chunk }
    })
}

#[test]
fn reading_any_one_or_two_segments_returns_exactly_their_whole_lines_once() {
    let dir = scratch();
    runner("fuzz_properties_segment_reader", 300, 10_000)
        .run(&segment_case(), |case| caught(|| checks::check_segment_reader(dir.path(), &case)))
        .unwrap();
}

#[test]
fn the_fuzz_decoder_of_segment_cases_never_makes_an_impossible_log() {
    let dir = scratch();
    runner("fuzz_properties_segment_decoder", 300, 5_000)
        .run(&proptest::collection::vec(any::<u8>(), 0..120), |data| {
            let case = SegmentCase::from_bytes(&data);
            caught(|| checks::check_segment_reader(dir.path(), &case))
        })
        .unwrap();
}

// ---------------------------------------------------------------------------------------------------
// Kept inputs: the fuzz seeds, and every crash fuzzing found (fuzz/regressions/<target>/)

/// Every kept input of `target`. Both folders must exist (they are in the repository): a missing one
/// fails the test instead of silently replaying nothing. `README.md` files are documentation, not inputs.
fn kept_inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut out = Vec::new();
    for kind in ["seeds", "regressions"] {
        let dir = root.join(kind).join(target);
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (scripts/fuzz saves crashes there; it must exist)", dir.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_file() && path.file_name().is_some_and(|n| n != "README.md") {
                let bytes = std::fs::read(&path).unwrap();
                out.push((path, bytes));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn every_kept_event_parser_input_passes() {
    let inputs = kept_inputs("event_parser");
    assert!(!inputs.is_empty(), "no seeds found under fuzz/seeds/event_parser");
    for (path, bytes) in inputs {
        if let Err(e) = caught(|| checks::check_event_bytes(&bytes)) {
            panic!("{}: {e}", path.display());
        }
    }
}

#[test]
fn every_kept_segment_reader_input_passes() {
    let inputs = kept_inputs("segment_reader");
    assert!(!inputs.is_empty(), "no seeds found under fuzz/seeds/segment_reader");
    let dir = scratch();
    for (path, bytes) in inputs {
        let case = SegmentCase::from_bytes(&bytes);
        if let Err(e) = caught(|| checks::check_segment_reader(dir.path(), &case)) {
            panic!("{}: {e}", path.display());
        }
    }
}
