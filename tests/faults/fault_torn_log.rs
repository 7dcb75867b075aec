//! Issue 3, scenario 4: a log torn at EVERY byte of its last line is read correctly.
//!
//! A crash in the middle of a write leaves the log ending inside a line. For every cut `i` in
//! `0..=len(last line)` (0: nothing of the line written, len: all of it but its newline):
//!
//! (a) the torn line at the end of the newest segment:
//!     - the processor applies exactly the K complete events before it, once (a second run adds
//!       nothing), and never the torn bytes;
//!     - crash path: server-style recovery (`FileLog::open`) cuts the tail; the client's re-send of the
//!       torn event (it never got a 200) and a new event are appended; the processor applies those two,
//!       once, and the log holds no byte of the torn fragment;
//!     - slow-writer path: the rest of the line arrives (the write was in flight, not torn for good);
//!       the processor applies that event once.
//! (b) the torn line at the end of an OLDER segment (it can never grow): it is reported once as an
//!     invalid line in the dead-letter file with its segment and offset, skipped (even when its bytes
//!     are a whole event lacking only the newline), and never blocks the events of the later segments,
//!     nor the ones appended after a restart; its id is not in the de-duplication window, so the
//!     client's re-send is stored and applied once.
//!
//! The oracle is independent of eps: inputs are literal JSON text written here, and expected totals
//! are summed from that text in fixed-point integers (`units`), compared with the text the store holds.
//! eps's `Event` is used only where the server would use it, to hand the re-sent events to `FileLog`.
//!
//! Every cut runs through the library (`eps::processor::run_with_store` on a `SqliteStore` in a fresh
//! data directory) with a batch size drawn from the scenario's seed, so chunk ends fall everywhere; a
//! few sampled cuts run through the real binaries (`eps process`, `eps server`).

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fault::{self, Report};
use common::*;
use eps::event::Event;
use eps::log::{Appended, EventLog, FileLog, FileLogOptions, LogBatch};
use eps::processor::{run_with_store, ProcessOptions, ProcessSummary};
use eps::store::sqlite::SqliteStore;
use eps::store::Store;
use rand::{Rng as _, SeedableRng as _};
use serde_json::Value;

/// The `ts` of the prepared lines: now, so their ids are inside the server's de-duplication window
/// when it restarts (a torn line's id must not be there: it was never stored).
fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}
/// The torn event's idempotency key: the client re-sends it with the same id.
const TORN_ID: &str = "torn-run-7";

/// An event as this test writes it: plain text, not eps's `Event`.
#[derive(Debug, Clone)]
struct Ev {
    user: &'static str,
    name: &'static str,
    /// The value's JSON number text, plain and normalised (as the writer writes it).
    value: &'static str,
    id: Option<&'static str>,
}

fn event(user: &'static str, name: &'static str, value: &'static str, id: Option<&'static str>) -> Ev {
    Ev { user, name, value, id }
}

/// `,"id":"…"` or nothing.
fn id_field(e: &Ev) -> String {
    e.id.map(|id| format!(r#","id":{}"#, serde_json::to_string(id).unwrap())).unwrap_or_default()
}

/// The request body a client sends for `e`.
fn request_of(e: &Ev) -> String {
    format!(
        r#"{{"userId":{},"name":"{}","value":{}{}}}"#,
        serde_json::to_string(e.user).unwrap(),
        e.name,
        e.value,
        id_field(e)
    )
}

/// One log line in the writer's format (ARCHITECTURE.md, `write_log_line`'s documentation), written out
/// here as literal text, with its newline.
fn line_of(e: &Ev) -> Vec<u8> {
    let user = serde_json::to_string(e.user).unwrap();
    format!(r#"{{"userId":{user},"name":"{}","value":{}{},"ts":{}}}"#, e.name, e.value, id_field(e), now_ms())
        .into_bytes()
        .into_iter()
        .chain([b'\n'])
        .collect()
}

/// Decimal places of the fixed-point oracle: every value and total of this test has at most this many.
const PLACES: usize = 10;

/// Plain decimal text (`-12.5`, `0.0000000001`; no exponent) as a whole number of 10^-PLACES units.
fn units(text: &str) -> i128 {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    assert!(
        !int.is_empty() && int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) && frac.len() <= PLACES,
        "{text:?} is not plain decimal text with at most {PLACES} places"
    );
    let magnitude: i128 = format!("{int}{frac:0<PLACES$}").parse().unwrap();
    if negative {
        -magnitude
    } else {
        magnitude
    }
}

/// The K complete events before the torn line.
fn complete_events() -> Vec<Ev> {
    vec![
        event("torn-a", "add_revenue", "100", Some("run-1")),
        event("torn-b", "add_revenue", "2.5", None),
        event("torn-a", "subtract_revenue", "0.25", Some("run-3")),
        event("torn-ü€", "add_revenue", "7", Some("run-4")),
        event("torn-b", "add_revenue", "0.0000000001", None),
    ]
}

/// The event whose line is torn: a distinctive user and amount (any trace of it would show), a
/// multi-byte userId so some cuts fall inside a UTF-8 character.
fn torn_event() -> Ev {
    event("torn-victim-é€😀", "add_revenue", "1000000", Some(TORN_ID))
}

/// Events of the segment after an older torn segment.
fn later_events() -> Vec<Ev> {
    vec![
        event("later-a", "add_revenue", "3", None),
        event("torn-a", "add_revenue", "1", Some("run-later-2")),
        event("later-b", "subtract_revenue", "4", None),
    ]
}

/// Expected totals per user, in 10^-PLACES units, summed from the events' text.
fn totals_of<'a>(events: impl IntoIterator<Item = &'a Ev>) -> BTreeMap<String, i128> {
    let mut totals = BTreeMap::new();
    for e in events {
        let v = units(e.value);
        let delta = match e.name {
            "add_revenue" => v,
            "subtract_revenue" => -v,
            other => panic!("unknown name {other}"),
        };
        *totals.entry(e.user.to_string()).or_insert(0) += delta;
    }
    totals
}

/// Every user's total as the SQLite file holds it (its TEXT, read with rusqlite, not through eps), in
/// 10^-PLACES units.
fn stored_totals(data_dir: &Path) -> BTreeMap<String, i128> {
    let path = data_dir.join("eps.sqlite3");
    let conn = rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut stmt = conn.prepare("SELECT user_id, revenue FROM users_revenue").unwrap();
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))).unwrap();
    rows.map(|r| r.unwrap()).map(|(user, text)| (user, units(&text))).collect()
}

fn concat_lines<'a>(events: impl IntoIterator<Item = &'a Ev>) -> Vec<u8> {
    events.into_iter().flat_map(line_of).collect()
}

/// A data directory and its SQLite store, in /dev/shm when there is one (hundreds of them are made).
struct World {
    _tmp: tempfile::TempDir,
    data_dir: PathBuf,
    store: Arc<dyn Store>,
}

impl World {
    async fn new() -> World {
        let shm = Path::new("/dev/shm");
        let tmp = if shm.is_dir() { tempfile::tempdir_in(shm).unwrap() } else { tempfile::tempdir().unwrap() };
        let data_dir = tmp.path().join("data");
        std::fs::create_dir_all(data_dir.join("log")).unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&data_dir.join("eps.sqlite3")).await.unwrap());
        World { _tmp: tmp, data_dir, store }
    }

    fn log_dir(&self) -> PathBuf {
        self.data_dir.join("log")
    }

    fn write_segment(&self, base: u64, bytes: &[u8]) {
        std::fs::write(self.log_dir().join(segment_name(base)), bytes).unwrap();
    }

    fn append_raw(&self, base: u64, bytes: &[u8]) {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new().append(true).open(self.log_dir().join(segment_name(base))).unwrap();
        f.write_all(bytes).unwrap();
    }

    /// One `eps process` run, through the library.
    async fn process(&self, batch_bytes: usize) -> ProcessSummary {
        let mut opts = ProcessOptions::new(&self.data_dir);
        opts.batch_bytes = batch_bytes;
        opts.retry_for = Duration::from_secs(5);
        run_with_store(opts, self.store.clone(), std::future::pending()).await.expect("the processor failed")
    }

    fn totals(&self) -> BTreeMap<String, i128> {
        stored_totals(&self.data_dir)
    }

    /// What the server does at start-up (torn-tail repair, de-duplication window), then `events`
    /// appended as the server would, then a clean stop.
    async fn restart_and_append(&self, events: Vec<Ev>) -> Vec<Appended> {
        let log = FileLog::open(FileLogOptions::new(self.log_dir())).expect("FileLog::open");
        // Parsed as the server's handler does, since the writer takes parsed events.
        let events: Vec<Event> = events
            .iter()
            .map(|e| Event::parse_request(request_of(e).as_bytes()).unwrap_or_else(|err| panic!("{e:?}: {err}")))
            .collect();
        let answers =
            log.append(LogBatch::of(events.iter().map(Event::as_ref), now_ms())).await.expect("append after recovery");
        log.shutdown().await;
        answers
    }

    fn dead_letters(&self) -> Vec<Value> {
        match std::fs::read_to_string(self.data_dir.join("dead-letter.jsonl")) {
            Ok(text) => text.lines().map(|l| serde_json::from_str(l).unwrap()).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
            Err(e) => panic!("dead-letter file: {e}"),
        }
    }
}

/// Batch sizes: from one byte (a chunk per line, or less) to everything at once.
fn batch_sizes(scenario: &str) -> impl FnMut() -> usize {
    let mut rng = rand::rngs::StdRng::seed_from_u64(fault::seed(scenario));
    move || match rng.random_range(0..4) {
        0 => 1,
        1 => rng.random_range(2..200),
        2 => rng.random_range(200..2000),
        _ => 16 << 20,
    }
}

/// The cuts to try: every offset of the line, `0..=len` (without its newline).
fn cuts(line: &[u8]) -> std::ops::RangeInclusive<usize> {
    let len = line.len() - 1; // without the newline
    0..=len
}

fn report(scenario: &'static str, started: Instant, cuts: u64, events: u64, notes: &str) {
    Report {
        scenario,
        store: "sqlite",
        seed: fault::seed(scenario),
        events_sent: events,
        // A cut is not a kill: the "kills" column counts processes killed or stopped.
        kills: 0,
        duration: started.elapsed(),
        notes: format!("{notes} ({cuts} cut positions tried)"),
        ..Report::default()
    }
    .write();
}

// ---------------------------------------------------------------------------------------------------
// (a) the newest segment

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newest_segment_torn_at_every_byte_applies_the_complete_events_once_and_never_the_torn_bytes() {
    let started = Instant::now();
    let mut batch = batch_sizes("torn_log_newest_segment");
    let complete = complete_events();
    let head = concat_lines(&complete);
    let torn = line_of(&torn_event());
    let after = event("after-restart", "add_revenue", "5", Some("after-1"));
    let mut tried = 0u64;
    let mut events = 0u64;
    for cut in cuts(&torn) {
        let batch_bytes = batch();
        let what = format!("cut at byte {cut} of {} (batch {batch_bytes})", torn.len() - 1);
        let world = World::new().await;
        let mut bytes = head.clone();
        bytes.extend_from_slice(&torn[..cut]);
        world.write_segment(0, &bytes);

        // The torn state, processed twice: the K events once, nothing of the torn line.
        let first = world.process(batch_bytes).await;
        assert_eq!(first.events_applied, complete.len() as u64, "{what}: {first:?}");
        assert_eq!(first.invalid_lines, 0, "{what}: a torn last line of the newest segment was reported: {first:?}");
        assert_eq!(first.position, head.len() as u64, "{what}: checkpoint not at the last whole line");
        assert_eq!(world.totals(), totals_of(&complete));
        let again = world.process(batch_bytes).await;
        assert_eq!((again.events_applied, again.position), (0, head.len() as u64), "{what}: second run: {again:?}");
        assert_eq!(world.totals(), totals_of(&complete));

        // Crash path: the server's recovery cuts the tail; the client re-sends the torn event (same
        // id: it was never stored, so it is not a duplicate) and a new one comes.
        let answers = world.restart_and_append(vec![torn_event(), after.clone()]).await;
        assert_eq!(answers, vec![Appended::Stored, Appended::Stored], "{what}: the re-send was not stored");
        let log = log_bytes(&world.log_dir());
        assert_eq!(&log[..head.len()], &head[..], "{what}: the complete lines changed");
        let rest = &log[head.len()..];
        let rest_lines: Vec<&[u8]> = rest.split_inclusive(|&b| b == b'\n').collect();
        assert_eq!(rest_lines.len(), 2, "{what}: after recovery: {:?}", String::from_utf8_lossy(rest));
        for line in &rest_lines {
            assert!(line.ends_with(b"\n"), "{what}: unterminated line after recovery");
            let parsed = eps::event::EventRef::parse_log_line(&line[..line.len() - 1]);
            assert!(parsed.is_ok(), "{what}: the torn fragment survived: {:?}", String::from_utf8_lossy(rest));
        }
        let applied = world.process(batch_bytes).await;
        assert_eq!(applied.events_applied, 2, "{what}: after recovery: {applied:?}");
        assert_eq!(applied.invalid_lines, 0, "{what}: after recovery: {applied:?}");
        let mut all = complete.clone();
        all.extend([torn_event(), after.clone()]);
        assert_eq!(world.totals(), totals_of(&all));
        let again = world.process(batch_bytes).await;
        assert_eq!(again.events_applied, 0, "{what}: third run: {again:?}");
        assert_eq!(world.totals(), totals_of(&all));
        assert!(world.dead_letters().is_empty(), "{what}: dead letters {:?}", world.dead_letters());
        tried += 1;
        events += all.len() as u64;
    }
    report(
        "fault_torn_log_newest",
        started,
        tried,
        events,
        "newest segment cut at every byte of its last line; processed, recovered by FileLog::open, torn event re-sent",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_line_still_being_written_is_applied_once_when_its_rest_arrives() {
    let mut batch = batch_sizes("torn_log_in_flight");
    let complete = complete_events();
    let head = concat_lines(&complete);
    let torn = line_of(&torn_event());
    for cut in cuts(&torn) {
        let batch_bytes = batch();
        let what = format!("cut at byte {cut} (batch {batch_bytes})");
        let world = World::new().await;
        let mut bytes = head.clone();
        bytes.extend_from_slice(&torn[..cut]);
        world.write_segment(0, &bytes);
        let first = world.process(batch_bytes).await;
        assert_eq!((first.events_applied, first.position), (complete.len() as u64, head.len() as u64), "{what}");

        // The rest of the write lands (with its newline): the line is read once, from its start.
        world.append_raw(0, &torn[cut..]);
        let second = world.process(batch_bytes).await;
        assert_eq!(second.events_applied, 1, "{what}: {second:?}");
        assert_eq!(second.invalid_lines, 0, "{what}: the completed line was read from its middle: {second:?}");
        let mut all = complete.clone();
        all.push(torn_event());
        assert_eq!(world.totals(), totals_of(&all));
        let third = world.process(batch_bytes).await;
        assert_eq!(third.events_applied, 0, "{what}: {third:?}");
        assert_eq!(world.totals(), totals_of(&all));
    }
}

// ---------------------------------------------------------------------------------------------------
// (b) an older segment

/// Processes a log whose first (older) segment ends with the torn line cut at `cut`, then a restart
/// and one more event; returns the dead-letter records.
async fn older_segment_torn_at(cut: usize, batch_bytes: usize) -> Vec<Value> {
    let complete = complete_events();
    let later = later_events();
    let torn = line_of(&torn_event());
    let what = format!("older segment cut at byte {cut} of {} (batch {batch_bytes})", torn.len() - 1);
    let world = World::new().await;
    let mut first = concat_lines(&complete);
    let torn_at = first.len() as u64;
    first.extend_from_slice(&torn[..cut]);
    let second = concat_lines(&later);
    world.write_segment(0, &first);
    world.write_segment(first.len() as u64, &second);
    let end = (first.len() + second.len()) as u64;

    let mut applied = complete.clone();
    applied.extend(later.iter().cloned());
    let run = world.process(batch_bytes).await;
    assert_eq!(run.events_applied, applied.len() as u64, "{what}: {run:?}");
    assert_eq!(run.invalid_lines, u64::from(cut > 0), "{what}: {run:?}");
    assert_eq!(run.position, end, "{what}: the torn older segment blocked the later one: {run:?}");
    assert_eq!(world.totals(), totals_of(&applied));
    let records = world.dead_letters();
    if cut == 0 {
        assert!(records.is_empty(), "{what}: {records:?}");
    } else {
        assert_eq!(records.len(), 1, "{what}: {records:?}");
        let r = &records[0];
        assert_eq!(r["segment"], segment_name(0), "{what}: {r}");
        assert_eq!(r["offset"], torn_at, "{what}: {r}");
        assert_eq!(r["position"], torn_at, "{what}: {r}");
        assert_eq!(r["line"], String::from_utf8_lossy(&torn[..cut]).as_ref(), "{what}: {r}");
        assert!(r["error"].as_str().is_some_and(|e| !e.is_empty()), "{what}: {r}");
    }

    // Reported once: a second run adds nothing, neither revenue nor dead letters.
    let again = world.process(batch_bytes).await;
    assert_eq!((again.events_applied, again.invalid_lines, again.position), (0, 0, end), "{what}: {again:?}");
    assert_eq!(world.dead_letters().len(), records.len(), "{what}: reported twice");

    // A restart leaves the older segment as it is (only the newest is repaired). The client's re-send of
    // the torn event (same id: it was never acknowledged) is stored, not taken for a duplicate of the
    // torn bytes, and it and the next event are applied once.
    let next = event("after-restart", "add_revenue", "9", None);
    let answers = world.restart_and_append(vec![torn_event(), next.clone()]).await;
    assert_eq!(
        answers,
        vec![Appended::Stored, Appended::Stored],
        "{what}: the re-send of the torn event was not stored"
    );
    assert_eq!(std::fs::read(world.log_dir().join(segment_name(0))).unwrap(), first, "{what}: older segment changed");
    let run = world.process(batch_bytes).await;
    assert_eq!((run.events_applied, run.invalid_lines), (2, 0), "{what}: {run:?}");
    applied.push(torn_event());
    applied.push(next);
    assert_eq!(world.totals(), totals_of(&applied));
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_segment_torn_at_every_byte_is_dead_lettered_once_and_never_blocks_later_events() {
    let started = Instant::now();
    let mut batch = batch_sizes("torn_log_older_segment");
    let torn = line_of(&torn_event());
    let len = torn.len() - 1;
    // Every proper prefix of the line (the whole line without its newline: the next test).
    for cut in 0..len {
        older_segment_torn_at(cut, batch()).await;
    }
    report(
        "fault_torn_log_older",
        started,
        len as u64,
        (len * (complete_events().len() + later_events().len() + 2)) as u64,
        "older segment ending in a torn line cut at every byte: dead-lettered once, later segments applied",
    );
}

/// The last cut: all of the line but its newline. It is valid JSON, but it is still a torn write that
/// was never acknowledged; ARCHITECTURE.md and src/log/reader.rs say such a line at the end of an older
/// segment "is returned and reported as invalid".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_segment_ending_in_a_whole_event_without_its_newline_reports_it_and_does_not_apply_it() {
    let torn = line_of(&torn_event());
    let mut batch = batch_sizes("torn_log_older_segment_full_line");
    for _ in 0..3 {
        let records = older_segment_torn_at(torn.len() - 1, batch()).await;
        assert_eq!(records.len(), 1);
    }
}

// ---------------------------------------------------------------------------------------------------
// Sampled cuts through the real binaries

/// The cuts the binaries are run on: the ends, the middle, and inside a multi-byte character.
fn sampled_cuts(torn: &[u8]) -> Vec<usize> {
    let len = torn.len() - 1;
    let inside_char = torn.iter().position(|&b| b >= 0x80).map_or(len / 3, |i| i + 1);
    let mut cuts = vec![0, 1, inside_char, len / 2, len - 1, len];
    cuts.dedup();
    cuts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binaries_on_sampled_cuts_of_the_newest_segment() {
    let complete = complete_events();
    let head = concat_lines(&complete);
    let torn = line_of(&torn_event());
    let victim = torn_event();
    for cut in sampled_cuts(&torn) {
        let what = format!("cut at byte {cut}");
        let env = Env::new(StoreKind::Sqlite).await;
        std::fs::create_dir_all(env.log_dir()).unwrap();
        let mut bytes = head.clone();
        bytes.extend_from_slice(&torn[..cut]);
        std::fs::write(env.log_dir().join(segment_name(0)), &bytes).unwrap();

        let out = env.process(&[]).await;
        assert_eq!(applied_count(&out.stdout), complete.len() as u64, "{what}: {out}");
        assert_eq!(stored_totals(&env.data_dir), totals_of(&complete));
        let out = env.process(&[]).await;
        assert_eq!(applied_count(&out.stdout), 0, "{what}: {out}");

        // The server cuts the tail at start-up; the client re-sends the torn event with its id.
        let mut server = env.server().await;
        let http = http();
        let resend = format!(
            r#"{{"userId":{},"name":"add_revenue","value":1000000,"id":"{TORN_ID}"}}"#,
            serde_json::to_string(victim.user).unwrap()
        );
        let (status, body) = post_event(&http, &server.url, &resend).await;
        assert_eq!(status, 200, "{what}: {body}");
        assert!(body.get("duplicate").is_none(), "{what}: the torn event was taken as stored: {body}");
        let (status, body) =
            post_event(&http, &server.url, r#"{"userId":"after-restart","name":"add_revenue","value":5}"#).await;
        assert_eq!(status, 200, "{what}: {body}");
        server.sigterm().await;
        assert!(server.wait(Duration::from_secs(30)).await.success(), "{what}: {}", server.stderr());
        assert!(server.stderr().contains("torn") || cut == 0, "{what}: the repair was not logged: {}", server.stderr());

        let out = env.process(&[]).await;
        assert_eq!(applied_count(&out.stdout), 2, "{what}: {out}");
        let mut all = complete.clone();
        all.push(victim.clone());
        all.push(event("after-restart", "add_revenue", "5", None));
        assert_eq!(stored_totals(&env.data_dir), totals_of(&all));
        let lines = log_lines(&env.log_dir());
        assert_eq!(lines.len(), all.len(), "{what}: {lines:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_on_sampled_cuts_of_an_older_segment() {
    let complete = complete_events();
    let later = later_events();
    let torn = line_of(&torn_event());
    // Proper prefixes only (the whole line without newline has its own test above).
    for cut in sampled_cuts(&torn).into_iter().filter(|&c| c > 0 && c < torn.len() - 1) {
        let what = format!("older segment cut at byte {cut}");
        let env = Env::new(StoreKind::Sqlite).await;
        std::fs::create_dir_all(env.log_dir()).unwrap();
        let mut first = concat_lines(&complete);
        let torn_at = first.len();
        first.extend_from_slice(&torn[..cut]);
        std::fs::write(env.log_dir().join(segment_name(0)), &first).unwrap();
        std::fs::write(env.log_dir().join(segment_name(first.len() as u64)), concat_lines(&later)).unwrap();

        let out = env.process(&[]).await;
        assert_eq!(applied_count(&out.stdout), (complete.len() + later.len()) as u64, "{what}: {out}");
        assert!(out.stdout.contains(" 1 invalid lines"), "{what}: {out}");
        let mut applied = complete.clone();
        applied.extend(later.iter().cloned());
        assert_eq!(stored_totals(&env.data_dir), totals_of(&applied));
        let dead = std::fs::read_to_string(env.data_dir.join("dead-letter.jsonl")).unwrap();
        let records: Vec<Value> = dead.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(records.len(), 1, "{what}: {dead}");
        assert_eq!(records[0]["segment"], segment_name(0), "{what}: {dead}");
        assert_eq!(records[0]["offset"], torn_at, "{what}: {dead}");
        let out = env.process(&[]).await;
        assert_eq!(applied_count(&out.stdout), 0, "{what}: {out}");
        assert!(out.stdout.contains(" 0 invalid lines"), "{what}: {out}");
    }
}
