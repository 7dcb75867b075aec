//! The invariants the fuzz targets check, shared with the proptest properties of the cargo test suite
//! (`tests/processing/fuzz_properties.rs` includes this file as a module), so both say the same thing:
//!
//! - [`check_event_bytes`]: any bytes given to `Event::parse_request` or `EventRef::parse_log_line` never
//!   panic; an accepted event has a userId of 1 to 255 bytes without control characters, a value `>= 0`
//!   (no negative zero), an id of 1 to 128 bytes if any, and its log line (`write_log_line`) is one line
//!   that parses back to the same event and is written back byte for byte the same.
//! - [`check_segment_reader`]: any bytes as one or two segment files, read with `LogReader::read` from 0,
//!   never panic nor loop; each chunk starts where the previous one ended, holds exactly the file's
//!   bytes, stays inside one segment, ends just past a newline or at the end of an older segment, and the
//!   chunks together are the files' bytes up to the last newline of the last segment.
//!
//! Only `eps`, `rust_decimal` and `tempfile` are used: the crates both builds have.

use std::path::Path;

use eps::event::{Event, EventRef, MAX_EVENT_ID_BYTES, MAX_USER_ID_BYTES};
use eps::log::reader::LogReader;
use eps::log::segment_name;
use rust_decimal::Decimal;

/// The `ts` written into log lines by the checks (any value works: it is not read back).
const TS: u64 = 1_764_032_400_000;

// ---------------------------------------------------------------------------------------------------
// The event parser

/// Feeds `data` to both parsers as it is, and embedded in a valid event as the `value` text, the
/// `userId` string content and the `id` string content (so mutations reach the inner checks, not only
/// the JSON grammar). Panics when an accepted event breaks an invariant.
pub fn check_event_bytes(data: &[u8]) {
    check_both_parsers(data);
    for (before, after) in TEMPLATES {
        let mut body = Vec::with_capacity(before.len() + data.len() + after.len());
        body.extend_from_slice(before.as_bytes());
        body.extend_from_slice(data);
        body.extend_from_slice(after.as_bytes());
        check_both_parsers(&body);
    }
}

/// (text before, text after) the fuzzed bytes.
const TEMPLATES: [(&str, &str); 4] = [
    (r#"{"userId":"u","name":"add_revenue","value":"#, "}"),
    (r#"{"userId":"u","name":"add_revenue","value":1.5"#, r#","ts":1}"#),
    (r#"{"userId":""#, r#"","name":"subtract_revenue","value":1.5}"#),
    (r#"{"userId":"u","name":"add_revenue","value":2,"id":""#, r#""}"#),
];

fn check_both_parsers(input: &[u8]) {
    if let Ok(event) = Event::parse_request(input) {
        check_event(&event, input);
    }
    if let Ok(event) = EventRef::parse_log_line(input) {
        check_event(&event.into_owned(), input);
    }
    // The processor's fast path: where it takes a line, the general parser takes it the same way.
    if let Some(fast) = EventRef::parse_canonical_log_line(input) {
        let general = EventRef::parse_log_line(input);
        assert!(
            general.as_ref() == Ok(&fast),
            "the canonical parser read {:?} as {fast:?}, the general one as {general:?}",
            String::from_utf8_lossy(input)
        );
    }
}

/// The invariants of an accepted event; `input` is only used in the panic messages.
pub fn check_event(event: &Event, input: &[u8]) {
    let input = || String::from_utf8_lossy(input).into_owned();
    let user_bytes = event.user_id().len();
    assert!((1..=MAX_USER_ID_BYTES).contains(&user_bytes), "userId of {user_bytes} bytes accepted from {:?}", input());
    assert!(!event.user_id().chars().any(char::is_control), "control character in userId accepted from {:?}", input());
    assert!(event.value() >= Decimal::ZERO, "negative value {} accepted from {:?}", event.value(), input());
    assert!(!event.value().is_sign_negative(), "negative zero {} accepted from {:?}", event.value(), input());
    if let Some(id) = event.id() {
        assert!((1..=MAX_EVENT_ID_BYTES).contains(&id.len()), "id of {} bytes accepted from {:?}", id.len(), input());
    }
    let mut line = Vec::new();
    event.write_log_line(TS, &mut line);
    assert!(!line.contains(&b'\n'), "log line {:?} of {:?} holds a newline", String::from_utf8_lossy(&line), input());
    let back = match EventRef::parse_log_line(&line) {
        Ok(back) => back.into_owned(),
        Err(e) => panic!("log line {:?} (from {:?}) does not parse back: {e}", String::from_utf8_lossy(&line), input()),
    };
    assert_eq!(
        &back,
        event,
        "log line {:?} parses back to another event (input {:?})",
        String::from_utf8_lossy(&line),
        input()
    );
    // The same digits, not only the same number: what the processor reads is what the client sent.
    assert_eq!(back.value().normalize().to_string(), event.value().normalize().to_string());
    let mut again = Vec::new();
    back.write_log_line(TS, &mut again);
    assert_eq!(again, line, "the log line is not a fixpoint (input {:?})", input());
    // The processor reads the writer's lines on its fast path whenever the texts need no escaping and
    // the value is written with at most 28 digits (1e28 is written with 29).
    let plain = |s: &str| s.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
    let digits = event.value().normalize().to_string().bytes().filter(u8::is_ascii_digit).count();
    if plain(event.user_id()) && event.id().is_none_or(plain) && digits <= 28 {
        let fast = EventRef::parse_canonical_log_line(&line)
            .unwrap_or_else(|| panic!("the fast path declines the log line {:?}", String::from_utf8_lossy(&line)));
        assert_eq!(&fast.into_owned(), event, "the fast path misreads {:?}", String::from_utf8_lossy(&line));
    }
}

// ---------------------------------------------------------------------------------------------------
// The segment reader

/// One input of the segment reader check: the segment files' contents (one or two; with two, the first
/// is never empty, since an empty older segment would share its name with the next), and the reader's
/// chunk size.
#[derive(Debug, Clone)]
pub struct SegmentCase {
    pub segments: Vec<Vec<u8>>,
    pub max_chunk: usize,
}

impl SegmentCase {
    /// Decodes fuzz bytes: byte 0 picks the chunk size, byte 1 one or two segments, bytes 2-3 where the
    /// rest is split between them.
    pub fn from_bytes(data: &[u8]) -> SegmentCase {
        let byte = |i: usize| data.get(i).copied().unwrap_or(0);
        let max_chunk = match byte(0) {
            b @ 0..=199 => 1 + usize::from(b) % 48,
            b => 64 << (b % 8),
        };
        let rest = data.get(4..).unwrap_or_default();
        let segments = if byte(1) & 1 == 1 && !rest.is_empty() {
            let at = 1 + usize::from(u16::from_le_bytes([byte(2), byte(3)])) % rest.len();
            vec![rest[..at].to_vec(), rest[at..].to_vec()]
        } else {
            vec![rest.to_vec()]
        };
        SegmentCase { segments, max_chunk }
    }

    /// The bytes a reader must return, in order: every older segment whole, the last one up to (and
    /// including) its last newline.
    pub fn expected(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, segment) in self.segments.iter().enumerate() {
            if i + 1 < self.segments.len() {
                out.extend_from_slice(segment);
            } else if let Some(nl) = segment.iter().rposition(|&b| b == b'\n') {
                out.extend_from_slice(&segment[..=nl]);
            }
        }
        out
    }
}

/// A directory for the segment files, reused by every check of this process: in /dev/shm when there is
/// one (the reader fsyncs each chunk; on tmpfs that costs nothing).
pub fn scratch_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let made = if shm.is_dir() {
            tempfile::Builder::new().prefix("eps-fuzz-").tempdir_in(shm)
        } else {
            Err(std::io::ErrorKind::NotFound.into())
        };
        made.or_else(|_| tempfile::Builder::new().prefix("eps-fuzz-").tempdir()).expect("a scratch directory")
    })
    .path()
}

/// Writes the case's segments into `dir` (removing whatever was there) and checks the reader on them.
pub fn check_segment_reader(dir: &Path, case: &SegmentCase) {
    assert!(!case.segments.is_empty() && case.segments.len() <= 2, "one or two segments");
    assert!(case.segments.len() == 1 || !case.segments[0].is_empty(), "an older segment is never empty");
    for entry in std::fs::read_dir(dir).expect("read the scratch directory") {
        let path = entry.expect("a directory entry").path();
        std::fs::remove_file(&path).unwrap_or_else(|e| panic!("remove {}: {e}", path.display()));
    }
    let mut bases = Vec::new();
    let mut base = 0u64;
    for segment in &case.segments {
        std::fs::write(dir.join(segment_name(base)), segment).expect("write a segment");
        bases.push(base);
        base += segment.len() as u64;
    }
    let expected = case.expected();
    let all: Vec<u8> = case.segments.concat();
    // Index of the segment holding position `p` (the last whose base is <= p).
    let segment_of = |p: u64| bases.iter().rposition(|&b| b <= p).expect("position in some segment");
    let segment_end = |i: usize| bases[i] + case.segments[i].len() as u64;
    let last = case.segments.len() - 1;

    let mut reader = LogReader::new(dir, case.max_chunk);
    let mut position = 0u64;
    let mut got = Vec::new();
    // Every chunk holds at least one byte, so more reads than bytes means a loop.
    let mut reads_left = all.len() + 2;
    loop {
        assert!(reads_left > 0, "the reader keeps returning chunks ({case:?})");
        reads_left -= 1;
        let chunk = match reader.read(position) {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => panic!("read({position}) failed on a well-formed log: {e} ({case:?})"),
        };
        let what = || format!("chunk {}..{} of {case:?}", chunk.start, chunk.end);
        assert_eq!(chunk.start, position, "{}: does not start where the previous one ended", what());
        assert!(!chunk.data.is_empty(), "{}: empty chunk", what());
        assert_eq!(chunk.end, chunk.start + chunk.data.len() as u64, "{}: end is not start + length", what());
        let s = segment_of(chunk.start);
        assert_eq!(chunk.segment_base, bases[s], "{}: wrong segment base", what());
        assert_eq!(chunk.segment, segment_name(bases[s]), "{}: wrong segment name", what());
        assert!(chunk.end <= segment_end(s), "{}: crosses the end of its segment", what());
        assert_eq!(&chunk.data[..], &all[chunk.start as usize..chunk.end as usize], "{}: not the file's bytes", what());
        let ends_line = chunk.data.last() == Some(&b'\n');
        let ends_older_segment = s < last && chunk.end == segment_end(s);
        assert!(ends_line || ends_older_segment, "{}: ends inside a line of the newest segment", what());
        // Bounded: at most max_chunk bytes, more only for a long first line (the reader doubles its read
        // until it finds a newline, so never past twice that line).
        let first_line = chunk.data.iter().position(|&b| b == b'\n').map_or(chunk.data.len(), |i| i + 1);
        assert!(
            chunk.data.len() <= case.max_chunk || chunk.data.len() < 2 * first_line,
            "{}: {} bytes for a chunk size of {} and a first line of {first_line}",
            what(),
            chunk.data.len(),
            case.max_chunk
        );
        // Lines: consecutive positions, no newline inside, and together (with their newlines) the chunk.
        #[allow(clippy::type_complexity)] // a table of cases reads best as one
        let lines: Vec<(u64, Result<&[u8], &[u8]>)> = chunk.lines().collect();
        let mut at = chunk.start;
        let mut rebuilt = Vec::new();
        for (i, (line_at, line)) in lines.iter().enumerate() {
            // Only the last line may lack its newline, and then only when the chunk does not end one.
            assert_eq!(line.is_err(), i + 1 == lines.len() && !ends_line, "{}: wrong torn-line flag", what());
            let line = match line {
                Ok(l) | Err(l) => *l,
            };
            assert_eq!(*line_at, at, "{}: line positions are not consecutive", what());
            assert!(!line.contains(&b'\n'), "{}: a line holds a newline", what());
            rebuilt.extend_from_slice(line);
            at += line.len() as u64;
            if i + 1 < lines.len() || ends_line {
                rebuilt.push(b'\n');
                at += 1;
            }
        }
        assert_eq!(rebuilt, chunk.data, "{}: lines() does not cover the chunk", what());
        // A reader that starts here, with nothing open, returns the same chunk.
        let cold = LogReader::new(dir, case.max_chunk).read(position);
        match cold {
            Ok(Some(c)) => {
                assert_eq!((c.start, c.end), (chunk.start, chunk.end), "{}: a fresh reader disagrees", what())
            }
            other => panic!("{}: a fresh reader at {position} got {other:?}", what()),
        }
        got.extend_from_slice(&chunk.data);
        position = chunk.end;
    }
    assert_eq!(position, expected.len() as u64, "the reader stopped at {position} ({case:?})");
    assert_eq!(got, expected, "the chunks are not the log's complete bytes ({case:?})");
    // Caught up: nothing more, however often asked, from the same or a fresh reader.
    assert!(matches!(reader.read(position), Ok(None)), "a second read at the end returned something ({case:?})");
    assert!(
        matches!(LogReader::new(dir, case.max_chunk).read(position), Ok(None)),
        "fresh reader at the end ({case:?})"
    );
    // A position past the end of the log is an error, not a panic nor a chunk.
    let past = all.len() as u64 + 1;
    assert!(LogReader::new(dir, case.max_chunk).read(past).is_err(), "read({past}) past the end succeeded ({case:?})");
}
