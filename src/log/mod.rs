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

use async_trait::async_trait;

use crate::event::Event;

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

/// Where accepted events go. An `Ok` answer means every event is on stable storage.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    async fn append(&self, events: Vec<Event>) -> Result<Vec<Appended>, LogError>;
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
