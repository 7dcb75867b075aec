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

use std::hash::{BuildHasher, Hash, Hasher};

use async_trait::async_trait;

use crate::event::EventRef;

pub mod reader;
pub mod writer;

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
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log cannot be written right now (disk full, I/O error, shutting down): retry later.
    #[error("log unavailable: {0}")]
    Unavailable(String),
}

/// Where accepted events go. An `Ok` answer means every event of the batch is on stable storage; the
/// answer has one [`Appended`] per event, in order.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    async fn append(&self, batch: LogBatch) -> Result<Vec<Appended>, LogError>;
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
}

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
        event.write_log_line(ts_millis, &mut self.data);
        self.data.push(b'\n');
        self.events.push(BatchEntry { end: self.data.len(), id: event.id.as_deref().map(id_key) });
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
        let mut start = 0;
        self.events.iter().map(move |entry| {
            let line = &self.data[start..entry.end];
            start = entry.end;
            (line, entry.id)
        })
    }

    /// All encoded lines, one after the other.
    pub fn data(&self) -> &[u8] {
        &self.data
    }
}

/// A 128-bit digest of an event id: collisions (which would drop an event) are beyond practical reach,
/// and the de-duplication window stores 16 bytes per id whatever the id's length.
pub type IdKey = u128;

pub fn id_key(id: &str) -> IdKey {
    let half = |salt: u8| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        salt.hash(&mut h);
        id.hash(&mut h);
        h.finish()
    };
    (u128::from(half(1)) << 64) | u128::from(half(2))
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
}

impl BuildHasher for IdKeyHasher {
    type Hasher = IdKeyHasher;
    fn build_hasher(&self) -> IdKeyHasher {
        IdKeyHasher(0)
    }
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
    fn segment_names_round_trip_and_sort() {
        assert_eq!(segment_name(42), "server-events-00000000000000000042.jsonl");
        assert_eq!(parse_segment_name(&segment_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_segment_name("server-events.jsonl"), None);
        assert_eq!(parse_segment_name("server-events-42.jsonl"), None);
    }
}
