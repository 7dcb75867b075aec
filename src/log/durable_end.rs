//! The durable end: where the writer's last successful sync ended, published for readers.
//!
//! A reader in another process (`eps process --follow`) sees the newest segment through the page
//! cache, including lines whose write or sync is failing at that instant. The writer answers those
//! 503 and cuts them off again, so a reader that applied them would count refused events, and its
//! checkpoint would later point into bytes written by someone else. Hence the rule: **readers never
//! read past the durable end**, a position the writer publishes in `log/.durable-end` after each
//! successful sync (and at start-up, after it has synced what the previous run left).
//!
//! The file is written in place (24 bytes: position, flags, check word) with `pwrite`, never synced on
//! the hot path: readers see it through the page cache, and after a crash the writer publishes it
//! again before it answers anything. A reader that catches a write half-done sees a wrong check word
//! and reads again. Only the rare [`CUT_PENDING`] state is synced: the writer could not cut a failed
//! group off the segment, and the next writer must do it before trusting the segment.
//!
//! Invariant: the published position is always the end of a whole line and never beyond what is
//! durable in the log, so every position a reader hands out (a checkpoint) denotes bytes that were
//! synced and will never be cut or rewritten.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// File name inside the log directory.
pub const DURABLE_END_FILE: &str = ".durable-end";
/// Flag: bytes after the position are a failed group still to be cut off the newest segment.
pub const CUT_PENDING: u64 = 1;
const CHECK_KEY: u64 = 0x6570_735f_656e_6421;
/// A torn read is retried this many times before the file is taken as unreadable (no writer is
/// writing it then: a live writer's file is always whole between two of its writes).
const READ_ATTEMPTS: usize = 1000;

/// What the file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurableEnd {
    pub position: u64,
    pub flags: u64,
}

impl DurableEnd {
    fn encode(self) -> [u8; 24] {
        let mut out = [0u8; 24];
        out[..8].copy_from_slice(&self.position.to_le_bytes());
        out[8..16].copy_from_slice(&self.flags.to_le_bytes());
        out[16..].copy_from_slice(&check(self.position, self.flags).to_le_bytes());
        out
    }

    fn decode(bytes: &[u8; 24]) -> Option<DurableEnd> {
        let word = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        let (position, flags) = (word(0), word(8));
        (word(16) == check(position, flags)).then_some(DurableEnd { position, flags })
    }

    pub fn cut_pending(self) -> bool {
        self.flags & CUT_PENDING != 0
    }
}

fn check(position: u64, flags: u64) -> u64 {
    (position ^ CHECK_KEY).rotate_left(17) ^ flags.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// The writer's side: one open file, rewritten in place.
pub struct DurableEndWriter {
    file: File,
}

impl DurableEndWriter {
    pub fn open(log_dir: &Path) -> io::Result<DurableEndWriter> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(log_dir.join(DURABLE_END_FILE))?;
        Ok(DurableEndWriter { file })
    }

    /// What the previous writer left, if the file is whole.
    pub fn previous(&self) -> Option<DurableEnd> {
        read_once(&self.file)
    }

    /// Publishes `position` (page cache only: cheap, visible to readers at once).
    pub fn publish(&self, position: u64) -> io::Result<()> {
        self.file.write_all_at(&DurableEnd { position, flags: 0 }.encode(), 0)
    }

    /// Publishes `position` with [`CUT_PENDING`] and syncs it, so a restart cuts the failed bytes even if
    /// this process dies before it can.
    pub fn publish_cut_pending(&self, position: u64) -> io::Result<()> {
        self.file.write_all_at(&DurableEnd { position, flags: CUT_PENDING }.encode(), 0)?;
        self.file.sync_data()
    }
}

/// The reader's side: the file kept open once it exists.
pub struct DurableEndReader {
    path: PathBuf,
    file: Option<File>,
}

impl DurableEndReader {
    pub fn new(log_dir: &Path) -> DurableEndReader {
        DurableEndReader { path: log_dir.join(DURABLE_END_FILE), file: None }
    }

    /// The published durable end; `None` when no writer ever published one (a log written by hand, or
    /// by a version before the file existed): then every whole line is readable.
    pub fn read(&mut self) -> io::Result<Option<u64>> {
        if self.file.is_none() {
            match File::open(&self.path) {
                Ok(file) => self.file = Some(file),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        let file = self.file.as_ref().expect("opened above");
        for _ in 0..READ_ATTEMPTS {
            if file.metadata()?.len() < 24 {
                return Ok(None);
            }
            if let Some(end) = read_once(file) {
                return Ok(Some(end.position));
            }
        }
        Ok(None)
    }
}

fn read_once(file: &File) -> Option<DurableEnd> {
    let mut bytes = [0u8; 24];
    file.read_exact_at(&mut bytes, 0).ok()?;
    DurableEnd::decode(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_a_torn_value() {
        let dir = tempfile::tempdir().unwrap();
        let mut reader = DurableEndReader::new(dir.path());
        assert_eq!(reader.read().unwrap(), None);
        let writer = DurableEndWriter::open(dir.path()).unwrap();
        assert_eq!(reader.read().unwrap(), None, "an empty file bounds nothing");
        writer.publish(4242).unwrap();
        assert_eq!(reader.read().unwrap(), Some(4242));
        writer.publish_cut_pending(17).unwrap();
        assert_eq!(writer.previous(), Some(DurableEnd { position: 17, flags: CUT_PENDING }));
        // Half of a new value over the old one: the check word no longer matches.
        let mut torn = DurableEnd { position: 99, flags: 0 }.encode();
        torn[16..].copy_from_slice(&DurableEnd { position: 17, flags: CUT_PENDING }.encode()[16..]);
        assert_eq!(DurableEnd::decode(&torn), None);
    }
}
