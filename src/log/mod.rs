//! The log: the durable, append-only record of every accepted event.
//!
//! [`EventLog`] is the interface the server appends through; [`FileLog`] is the default backend, a
//! directory of JSON Lines segments (`server-events-<base>.jsonl`, the seed's `server-events.jsonl`
//! line format) written by one group-commit writer thread. [`reader::LogReader`] reads it back for the
//! processor.
//!
//! Positions: a position is a global byte offset into the concatenation of all segments; a segment is
//! named by the position of its first byte. Every position the log hands out (checkpoints, batch ends)
//! is the end of a whole line, so a reader never starts in the middle of an event.

use std::hash::{BuildHasher, Hasher};

use async_trait::async_trait;

use crate::event::EventRef;

pub mod backend;
pub mod durable_end;
pub mod identity;
pub mod measure;
pub mod nats;
pub mod nats_lanes;
pub mod nats_promise;
pub mod producers;
pub mod reader;
pub mod recovery;
pub mod writer;

pub use backend::LogBackend;
pub use writer::{FileLog, FileLogOptions};

/// Directory inside the data directory that holds the segments.
pub const LOG_DIR: &str = "log";
const SEGMENT_PREFIX: &str = "server-events-";
const SEGMENT_SUFFIX: &str = ".jsonl";

/// What happened to one appended event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Written and synced to stable storage by this append.
    Stored,
    /// Its `id` was already in the log within the de-duplication window: not written again. The earlier
    /// copy is durable (or is being synced by the same group commit this answer waited for).
    Duplicate,
    /// Its `id` is held with different content (another userId, name or value): not written; the
    /// server answers 409. Only the file log tells this, and only within its id window.
    Conflict,
    /// Its `id` follows the producer scheme and would open one more sequence range for a producer that
    /// holds the most allowed ([`producers::MAX_RANGES_PER_PRODUCER`]): not written; answered 409.
    RangesFull,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log cannot be written right now (disk full, I/O error, shutting down): retry later.
    #[error("log unavailable: {0}")]
    Unavailable(String),
    /// The log can never take this batch as it is (an event larger than the log's largest record):
    /// retrying cannot help.
    #[error("{0}")]
    TooLarge(String),
}

/// Where accepted events go. An `Ok` answer means every event of the batch is on stable storage; the
/// answer has one [`Appended`] per event, in order.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    async fn append(&self, batch: LogBatch) -> Result<Vec<Appended>, LogError>;

    /// Whether appends are expected to work (readiness): false after the last one failed.
    fn ready(&self) -> bool {
        true
    }

    /// The identity of the log appended to (the file log's id, or the JetStream stream's name and
    /// creation time), once known: what a producer's checkpoint is bound to (`GET /healthz`).
    fn identity(&self) -> Option<String> {
        None
    }

    /// What an acknowledgement of the log's backend promises, when it is a JetStream stream and the
    /// stream was found: server version, replicas, sync (`GET /readyz`).
    fn promise(&self) -> Option<nats_promise::Promise> {
        None
    }

    /// Waits until every append begun before the call is answered, then releases the log.
    async fn shutdown(&self) {}
}

/// Events already encoded as log lines, appended as one unit.
///
/// Encoding happens in the request handler, on whichever core runs it, so the single writer thread
/// only checks ids and copies bytes. Each event keeps its id's digest for de-duplication.
#[derive(Debug, Default)]
pub struct LogBatch {
    data: Vec<u8>,
    events: Vec<BatchEntry>,
}

#[derive(Debug, Clone, Copy)]
struct BatchEntry {
    /// Offset in `data` just past this event's newline.
    end: usize,
    id: Option<IdKey>,
    /// [`content_digest`] of the event, for telling a repeat from a conflict (0 without an id).
    content: u64,
    /// The id's producer and sequence, if it follows the scheme ([`producers::parse_scheme_id`]).
    scheme: Option<(u64, u64)>,
    /// [`user_key`] of the event's userId: which partition it goes to, where the log has partitions.
    user: u64,
}

/// What the file log's de-duplication needs of an event with an id: its id digest, its content digest,
/// and the producer and sequence when the id follows the producer scheme.
pub type DedupKeys = (IdKey, u64, Option<(u64, u64)>);

impl LogBatch {
    pub fn with_capacity(events: usize) -> LogBatch {
        LogBatch { data: Vec::with_capacity(events * 96), events: Vec::with_capacity(events) }
    }

    /// A batch of `events`, all received at `ts_millis`.
    pub fn of<'a>(events: impl IntoIterator<Item = EventRef<'a>>, ts_millis: u64) -> LogBatch {
        let mut batch = LogBatch::default();
        for event in events {
            batch.push(&event, ts_millis);
        }
        batch
    }

    /// Adds one event received at `ts_millis` (Unix milliseconds).
    pub fn push(&mut self, event: &EventRef<'_>, ts_millis: u64) {
        let start = self.data.len();
        event.write_log_line(ts_millis, &mut self.data);
        let content = if event.id().is_some() { content_digest(&self.data[start..]) } else { 0 };
        self.data.push(b'\n');
        self.events.push(BatchEntry {
            end: self.data.len(),
            id: event.id().map(id_key),
            content,
            scheme: event.id().and_then(producers::parse_scheme_id),
            user: user_key(event.user_id()),
        });
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Bytes of encoded lines.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Each event's line (with its newline) and id digest, in order.
    pub fn lines(&self) -> impl Iterator<Item = (&[u8], Option<IdKey>)> {
        self.entries().map(|(line, entry)| (line, entry.id))
    }

    /// Each event's line and what the file log's de-duplication needs of it: the id digest, the
    /// [`content_digest`] and the scheme's producer and sequence.
    pub fn lines_for_dedup(&self) -> impl Iterator<Item = (&[u8], Option<DedupKeys>)> {
        self.entries().map(|(line, entry)| (line, entry.id.map(|id| (id, entry.content, entry.scheme))))
    }

    /// Each event's line with its [`user_key`], in order.
    pub fn lines_by_user(&self) -> impl Iterator<Item = (&[u8], Option<IdKey>, u64)> {
        self.entries().map(|(line, entry)| (line, entry.id, entry.user))
    }

    fn entries(&self) -> impl Iterator<Item = (&[u8], &BatchEntry)> {
        let mut start = 0;
        self.events.iter().map(move |entry| {
            let line = &self.data[start..entry.end];
            start = entry.end;
            (line, entry)
        })
    }

    /// All encoded lines, one after the other.
    pub fn data(&self) -> &[u8] {
        &self.data
    }
}

/// A stable 64-bit hash of a userId (FNV-1a): the same on every machine and in every version, because
/// it decides which partition of a partitioned log a user's events go to.
pub fn user_key(user_id: &str) -> u64 {
    user_id
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// A 128-bit digest of an event id: collisions (which would drop an event) are beyond practical reach,
/// and the de-duplication window stores 16 bytes per id whatever the id's length.
pub type IdKey = u128;

///
/// SipHash-1-3 with 128-bit output and fixed keys (the `siphasher` crate): a specified algorithm, so the
/// digest is the same in every build and version, which matters where it leaves the process (the
/// JetStream message ids are made of it).
pub fn id_key(id: &str) -> IdKey {
    digest(id.as_bytes())
}

/// The stable 128-bit digest [`id_key`] uses, of any bytes.
pub fn digest(bytes: &[u8]) -> u128 {
    siphasher::sip128::SipHasher13::new_with_keys(0x6570_7364_6564_7570, 0x6964_2d6b_6579_2d31).hash(bytes).as_u128()
}

/// Hashes an [`IdKey`] by taking its low bits: it is already a digest, hashing it again is wasted work.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdKeyHasher(u64);

impl Hasher for IdKeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only reached for types other than u128; fold the bytes in so it stays a correct hasher.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, key: u128) {
        self.0 = key as u64;
    }
    fn write_u64(&mut self, half: u64) {
        // The low half of a digest split in two (the id window's keys): already uniform.
        self.0 ^= half;
    }
}

impl BuildHasher for IdKeyHasher {
    type Hasher = IdKeyHasher;
    fn build_hasher(&self) -> IdKeyHasher {
        IdKeyHasher(0)
    }
}

/// A 64-bit digest of what an event says (userId, name, value), from its log line as
/// [`EventRef::write_log_line`] writes it: the bytes before `,"id":` (a JSON string escapes every `"`
/// inside it, so the first `,"id":"` is the field). Two events with the same id and the same digest
/// are a repeat; with different digests, a conflict.
pub fn content_digest(log_line: &[u8]) -> u64 {
    const FIELD: &[u8] = b",\"id\":\"";
    let end = log_line.windows(FIELD.len()).position(|w| w == FIELD).unwrap_or(log_line.len());
    digest(&log_line[..end]) as u64
}

/// File name of the segment starting at `base`.
pub fn segment_name(base: u64) -> String {
    format!("{SEGMENT_PREFIX}{base:020}{SEGMENT_SUFFIX}")
}

/// The base position of a segment file name, or `None` for any other file.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(SEGMENT_PREFIX)?.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 {
        return None;
    }
    digits.parse().ok()
}

/// The segments in `dir`, sorted by base position. A missing directory is an empty log.
pub fn list_segments(dir: &std::path::Path) -> std::io::Result<Vec<(u64, std::path::PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if let Some(base) = entry.file_name().to_str().and_then(parse_segment_name) {
            out.push((base, entry.path()));
        }
    }
    out.sort_unstable_by_key(|(base, _)| *base);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_keys_are_stable() {
        // FNV-1a's published test vectors: partitions must not move between versions.
        assert_eq!(user_key(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(user_key("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(user_key("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn segment_names_round_trip_and_sort() {
        assert_eq!(segment_name(42), "server-events-00000000000000000042.jsonl");
        assert_eq!(parse_segment_name(&segment_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_segment_name("server-events.jsonl"), None);
        assert_eq!(parse_segment_name("server-events-42.jsonl"), None);
    }
}
