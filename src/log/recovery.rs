//! How far the file log's start-up has got, shared between the thread that recovers the log and whoever
//! reports on it (the server logs it every few seconds and answers 503 with it until the log is open).
//!
//! Recovery ([`super::FileLog::open`]) syncs the newest segment, then reads segments to rebuild the
//! de-duplication state: the producer table from the newest snapshot onwards, and the id window from the
//! newest segments backwards. The reads are planned before they start, so progress is "bytes read of at
//! most the bytes planned" (the id window's pass may stop early, once it holds `--dedup-max-ids` ids).
//!
//! A shutdown requested meanwhile ([`RecoveryProgress::cancel`]) stops the reading between two
//! segments: recovery then fails with [`std::io::ErrorKind::Interrupted`] and nothing was changed that a
//! later start would not do again.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::Instant;

/// What recovery is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Stage {
    /// Taking the directory's lock, repairing the newest segment's tail, syncing it.
    Opening = 0,
    /// Reading segments to rebuild the de-duplication state.
    Reading = 1,
    /// Done: the writer is running.
    Done = 2,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Opening => "opening (lock, torn tail, sync of the newest segment)",
            Stage::Reading => "reading the segments to rebuild de-duplication",
            Stage::Done => "done",
        }
    }
}

#[derive(Debug)]
pub struct RecoveryProgress {
    started: Instant,
    stage: AtomicU8,
    bytes_read: AtomicU64,
    bytes_planned: AtomicU64,
    segments_read: AtomicU64,
    segments_planned: AtomicU64,
    cancelled: AtomicBool,
}

impl Default for RecoveryProgress {
    fn default() -> Self {
        RecoveryProgress {
            started: Instant::now(),
            stage: AtomicU8::new(Stage::Opening as u8),
            bytes_read: AtomicU64::new(0),
            bytes_planned: AtomicU64::new(0),
            segments_read: AtomicU64::new(0),
            segments_planned: AtomicU64::new(0),
            cancelled: AtomicBool::new(false),
        }
    }
}

/// One look at the progress, with numbers as numbers (for structured log lines).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    pub stage: Stage,
    pub bytes_read: u64,
    pub bytes_planned: u64,
    pub segments_read: u64,
    pub segments_planned: u64,
    pub elapsed_secs: f64,
}

impl std::fmt::Display for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const MIB: f64 = 1024.0 * 1024.0;
        match self.stage {
            Stage::Reading => write!(
                f,
                "{}: {:.1} of {:.1} MiB ({} of {} segment reads), {:.1} s so far",
                self.stage.name(),
                self.bytes_read as f64 / MIB,
                self.bytes_planned as f64 / MIB,
                self.segments_read,
                self.segments_planned,
                self.elapsed_secs
            ),
            stage => write!(f, "{}, {:.1} s so far", stage.name(), self.elapsed_secs),
        }
    }
}

impl RecoveryProgress {
    pub fn snapshot(&self) -> Snapshot {
        let stage = match self.stage.load(Ordering::Relaxed) {
            0 => Stage::Opening,
            1 => Stage::Reading,
            _ => Stage::Done,
        };
        Snapshot {
            stage,
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_planned: self.bytes_planned.load(Ordering::Relaxed),
            segments_read: self.segments_read.load(Ordering::Relaxed),
            segments_planned: self.segments_planned.load(Ordering::Relaxed),
            elapsed_secs: self.started.elapsed().as_secs_f64(),
        }
    }

    /// Seconds since recovery began (since this was made).
    pub fn elapsed_secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Asks recovery to stop at its next check (between two segment reads).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    pub(crate) fn set_stage(&self, stage: Stage) {
        self.stage.store(stage as u8, Ordering::Relaxed);
    }

    /// Adds reads to the plan: `segments` more segment reads of `bytes` in all.
    pub(crate) fn plan(&self, segments: u64, bytes: u64) {
        self.segments_planned.fetch_add(segments, Ordering::Relaxed);
        self.bytes_planned.fetch_add(bytes, Ordering::Relaxed);
    }

    /// `bytes` more read, within a segment read under way.
    pub(crate) fn add_bytes(&self, bytes: u64) {
        self.bytes_read.fetch_add(bytes, Ordering::Relaxed);
    }

    /// One planned segment read done (and `bytes` more read).
    pub(crate) fn read(&self, bytes: u64) {
        self.segments_read.fetch_add(1, Ordering::Relaxed);
        self.bytes_read.fetch_add(bytes, Ordering::Relaxed);
    }

    /// `Err(Interrupted)` once [`RecoveryProgress::cancel`] was called.
    pub(crate) fn check(&self) -> std::io::Result<()> {
        if self.cancelled.load(Ordering::Relaxed) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "the log's recovery was stopped: shutdown requested",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_reads_as_bytes_and_segments_of_the_plan() {
        let progress = RecoveryProgress::default();
        assert!(progress.snapshot().to_string().starts_with("opening"));
        progress.set_stage(Stage::Reading);
        progress.plan(4, 4 * 1024 * 1024);
        progress.read(1024 * 1024);
        let snapshot = progress.snapshot();
        assert_eq!((snapshot.bytes_read, snapshot.segments_read, snapshot.segments_planned), (1024 * 1024, 1, 4));
        assert!(snapshot.to_string().contains("1.0 of 4.0 MiB (1 of 4 segment reads)"), "{snapshot}");
        assert!(progress.check().is_ok());
        progress.cancel();
        assert_eq!(progress.check().unwrap_err().kind(), std::io::ErrorKind::Interrupted);
    }
}
