//! The file log's writer: one thread owns the open segment and makes every append durable.
//!
//! Group commit: request handlers put their events on a bounded queue and wait. The writer thread takes
//! everything queued (up to [`MAX_REQUESTS_PER_COMMIT`]), writes it with one `write`, makes it durable
//! with one `fdatasync`, and only then answers every request the sync covered. While it syncs, new
//! requests queue up and form the next group, so under load one sync serves many requests; the bounded
//! queue is the back-pressure (a full queue makes handlers wait, it never grows memory).
//!
//! Invariants:
//! - An `Ok` answer is given only after the bytes of all its events are synced.
//! - Readers never see past the durable end ([`super::durable_end`]), published after each successful
//!   sync: the bytes of a group that failed are never read, so cutting them off again reuses no
//!   position anyone holds.
//! - A failed write or sync is cut off the segment before anything else is written; while the cut
//!   itself fails, appends are refused (503) and the cut is retried on each new group, so the log
//!   recovers by itself once the disk does.
//! - A roll is a decision taken once: after it fails half-way, nothing more goes into the old segment;
//!   the next group retries the roll first, so two segments never claim the same positions.
//! - At start-up the newest segment and its directory are synced before anything in them is trusted
//!   (for de-duplication, or published to readers), and a torn last line is cut off.
//! - De-duplication, two mechanisms. The id window: every id within `--dedup-window-secs` and the last
//!   `--dedup-max-ids`, each with its content digest, so a repeat is answered [`Appended::Duplicate`]
//!   and the same id with other content [`Appended::Conflict`]; rebuilt from the newest segments at
//!   start-up. The producer ranges ([`super::producers`]): ids of the `<16 hex>-<sequence>` scheme,
//!   per producer, for `--dedup-horizon` after the producer's last event, persisted in snapshots so
//!   start-up reads only the log after the newest one. Both survive restarts and crashes; both expire
//!   on the monotonic clock, so a wall clock that steps forward forgets nothing. Neither ever holds
//!   an id of a group that failed: ids are recorded only after the group's sync succeeded, and a
//!   snapshot is taken between groups.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use async_trait::async_trait;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use super::durable_end::DurableEndWriter;
use super::producers::{self, ProducerTable, Ranges, Verdict};
use super::recovery::{RecoveryProgress, Stage};
use super::{
    content_digest, id_key, list_segments, segment_name, Appended, EventLog, IdKey, IdKeyHasher, LogBatch, LogError,
};
use crate::clock::wall_millis as now_millis;
use crate::event::EventRef;
use crate::fsutil::{create_dir_durable, sync_dir, with_path};

/// Most requests one group commit takes from the queue; bounds the size of one write.
pub const MAX_REQUESTS_PER_COMMIT: usize = 8192;

/// The default de-duplication window, in seconds: the server's `--dedup-window-secs` and, unless told
/// otherwise, `eps compact`'s minimum age (compaction must not remove what a restart rebuilds the
/// window from), so the two can never drift apart.
///
/// 24 hours: the window costs no memory for its length (it is capped in ids), and a client sending a
/// few events a second keeps a day of its ids.
pub const DEFAULT_DEDUP_WINDOW_SECS: u64 = 24 * 3600;
/// The default of `--dedup-max-ids`: the most ids the id window holds. 458,752 is 7/16 of 2^20: the
/// most a hash table of 2^20 buckets holds while ids come and go without growing to 2^21 (its
/// deleted slots are then reclaimed in place). At 25 bytes a bucket and 24 a ring slot that is
/// 35.5 MiB (81 bytes per id), which leaves the rest of a 64 MiB budget to the producer table.
pub const DEFAULT_DEDUP_MAX_IDS: usize = 458_752;
/// The default size at which a new segment is started, in bytes (`--segment-bytes`): 64 MiB.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct FileLogOptions {
    /// Directory holding the segments (created if missing).
    pub dir: PathBuf,
    /// A new segment is started once the current one would grow past this.
    pub segment_bytes: u64,
    /// How long an event id is remembered for de-duplication.
    pub dedup_window: Duration,
    /// Most ids remembered; the oldest are forgotten first.
    pub dedup_max_ids: usize,
    /// How long a producer of scheme ids is remembered after its last stored event.
    pub dedup_horizon: Duration,
    /// Requests that may wait for the writer before handlers are made to wait.
    pub queue_depth: usize,
    /// Where [`FileLog::open`] reports how far its recovery has got (and learns that it must stop).
    pub progress: Arc<RecoveryProgress>,
}

impl FileLogOptions {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileLogOptions {
            dir: dir.into(),
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            dedup_window: Duration::from_secs(DEFAULT_DEDUP_WINDOW_SECS),
            dedup_max_ids: DEFAULT_DEDUP_MAX_IDS,
            dedup_horizon: Duration::from_secs(producers::DEFAULT_HORIZON_SECS),
            queue_depth: 16 * 1024,
            progress: Arc::default(),
        }
    }
}

/// Counters the writer publishes (read by metrics and status without locking).
#[derive(Debug, Default)]
pub struct LogStats {
    /// Position just past the last synced line.
    pub end_position: AtomicU64,
    pub segments: AtomicU64,
    pub syncs: AtomicU64,
    pub events_stored: AtomicU64,
    pub duplicates: AtomicU64,
    /// Events refused because their id was held with other content, or their producer's ranges were full.
    pub conflicts: AtomicU64,
    /// Set while the writer refuses appends (a failed write could not be undone), or after the last
    /// append failed (disk full, I/O error) until one succeeds again.
    pub failing: std::sync::atomic::AtomicBool,
}

type Reply = oneshot::Sender<Result<Vec<Appended>, LogError>>;

enum Msg {
    Append { batch: LogBatch, reply: Reply },
    Shutdown { done: oneshot::Sender<()> },
}

/// The default [`EventLog`]: a directory of segments with one group-commit writer thread.
pub struct FileLog {
    tx: mpsc::Sender<Msg>,
    stats: Arc<LogStats>,
    /// The log's identity ([`super::identity`]).
    id: String,
}

impl FileLog {
    /// Opens (or creates) the log: takes the directory's writer lock, repairs a torn tail, rebuilds the
    /// de-duplication window, and starts the writer thread.
    pub fn open(opts: FileLogOptions) -> io::Result<FileLog> {
        create_dir_durable(&opts.dir)?;
        let lock_path = opts.dir.join(".writer.lock");
        let lock = File::create(&lock_path).map_err(|e| with_path(e, "cannot create", &lock_path))?;
        lock.try_lock().map_err(|_| {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("another eps server is writing to {}", opts.dir.display()),
            )
        })?;
        // The log's identity, which the store binds its checkpoint to (made now for a new log, or an
        // existing one made by an older eps).
        let id = super::identity::ensure(&opts.dir)?;
        tracing::debug!(log = %opts.dir.display(), %id, "log identity");
        let stats = Arc::new(LogStats::default());
        let writer = Writer::recover(opts.clone(), lock, stats.clone())?;
        let (tx, rx) = mpsc::channel(opts.queue_depth);
        std::thread::Builder::new().name("eps-log-writer".into()).spawn(move || writer.run(rx))?;
        Ok(FileLog { tx, stats, id })
    }

    pub fn stats(&self) -> &Arc<LogStats> {
        &self.stats
    }
}

#[async_trait]
impl EventLog for FileLog {
    async fn append(&self, batch: LogBatch) -> Result<Vec<Appended>, LogError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Msg::Append { batch, reply })
            .await
            .map_err(|_| LogError::Unavailable("the log writer has stopped".into()))?;
        answer.await.map_err(|_| LogError::Unavailable("the log writer has stopped".into()))?
    }

    fn ready(&self) -> bool {
        !self.stats.failing.load(Ordering::Relaxed)
    }

    fn identity(&self) -> Option<String> {
        Some(self.id.clone())
    }

    /// Waits until every append queued before this call is synced and answered, then stops the writer.
    async fn shutdown(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Shutdown { done }).await.is_ok() {
            let _ = wait.await;
        }
    }
}

/// The snapshot writer's queue (position, encoded table) and its thread.
type SnapshotThread = (std::sync::mpsc::Sender<(u64, Vec<u8>)>, std::thread::JoinHandle<()>);

struct Writer {
    opts: FileLogOptions,
    /// Held for the writer's lifetime: the directory has one writer.
    _lock: File,
    file: File,
    base: u64,
    /// Durable length of the open segment: everything before it is synced, nothing after it is valid.
    len: u64,
    /// Where readers may read up to; published after every successful sync.
    durable_end: DurableEndWriter,
    /// Set while bytes of a failed group may remain after `len` (their cut failed): nothing is written
    /// until a retried cut succeeds.
    cut_pending: Option<String>,
    /// Set once a roll was decided: the open segment is closed to writes until the roll succeeds.
    roll_pending: bool,
    dedup: Dedup,
    /// Position the newest snapshot of the producer table covers (or was queued to cover).
    snapshot_at: u64,
    /// The thread that writes snapshots, so a roll does not wait for one.
    snapshots: Option<SnapshotThread>,
    stats: Arc<LogStats>,
}

impl Writer {
    fn recover(opts: FileLogOptions, lock: File, stats: Arc<LogStats>) -> io::Result<Writer> {
        let started = Instant::now();
        // Every error of the start-up names its path: an operator must know which file failed.
        let durable_end =
            DurableEndWriter::open(&opts.dir).map_err(|e| with_path(e, "cannot open the durable end in", &opts.dir))?;
        let segments = list_segments(&opts.dir).map_err(|e| with_path(e, "cannot list the segments of", &opts.dir))?;
        let (base, path) = match segments.last() {
            Some((base, path)) => (*base, path.clone()),
            None => {
                let path = opts.dir.join(segment_name(0));
                File::create(&path).and_then(|f| f.sync_all()).map_err(|e| with_path(e, "cannot create", &path))?;
                (0, path)
            }
        };
        // The newest segment cannot vanish here: `eps compact` never removes the newest one.
        let file =
            OpenOptions::new().read(true).write(true).open(&path).map_err(|e| with_path(e, "cannot open", &path))?;
        if let Some(previous) = durable_end.previous().filter(|p| p.cut_pending()) {
            cut_failed_group(&file, &path, base, previous.position).map_err(|e| with_path(e, "cannot cut", &path))?;
        }
        let len = repair_torn_tail(&file, &path).map_err(|e| with_path(e, "cannot repair", &path))?;
        // What a crashed writer wrote but never synced is still only in the page cache: make it durable
        // before it is trusted (for de-duplication, or shown to readers). Its events were never
        // acknowledged, but a retry of them will now be answered `duplicate`, which must mean durable.
        // The directory too: the crash may have come between creating a segment and syncing its entry.
        file.sync_all().map_err(|e| with_path(e, "cannot sync", &path))?;
        sync_dir(&opts.dir).map_err(|e| with_path(e, "cannot sync", &opts.dir))?;
        durable_end.publish(base + len).map_err(|e| with_path(e, "cannot publish the durable end in", &opts.dir))?;
        producers::remove_leftovers(&opts.dir);
        opts.progress.set_stage(Stage::Reading);
        let dedup = Dedup::rebuild(&opts, &segments, base + len)?;
        opts.progress.set_stage(Stage::Done);
        stats.end_position.store(base + len, Ordering::Relaxed);
        stats.segments.store(segments.len().max(1) as u64, Ordering::Relaxed);
        metrics::gauge!("eps_log_segments").set(segments.len().max(1) as f64);
        metrics::gauge!("eps_log_end_position_bytes").set((base + len) as f64);
        let read = opts.progress.snapshot();
        tracing::info!(
            segment = %path.display(), position = base + len, remembered_ids = dedup.len(),
            producers = dedup.producers.len(), producer_ranges = dedup.producers.ranges(),
            snapshot = dedup.covered, bytes_read = read.bytes_read, segment_reads = read.segments_read,
            took_secs = started.elapsed().as_secs_f64(),
            "log opened: recovered in {:.2} s", started.elapsed().as_secs_f64()
        );
        let (tx, rx) = std::sync::mpsc::channel::<(u64, Vec<u8>)>();
        let dir = opts.dir.clone();
        let thread = std::thread::Builder::new().name("eps-log-snapshot".into()).spawn(move || {
            while let Ok((position, bytes)) = rx.recv() {
                if let Err(e) = producers::write_snapshot(&dir, position, &bytes) {
                    tracing::warn!(error = %e, position, "cannot write the producer snapshot; the next start reads more of the log");
                }
            }
        })?;
        let snapshot_at = dedup.covered;
        let mut writer = Writer {
            opts,
            _lock: lock,
            file,
            base,
            len,
            durable_end,
            cut_pending: None,
            roll_pending: false,
            dedup,
            snapshot_at,
            snapshots: Some((tx, thread)),
            stats,
        };
        // What start-up read is saved at once: the next start (and `eps compact`) need not redo it.
        writer.snapshot(base + len, false);
        Ok(writer)
    }

    /// Writes the producer table as the snapshot covering the log up to `position` (the durable end,
    /// between two groups): in the background, or, when `wait` (at shutdown), before returning, after
    /// every one queued before it.
    fn snapshot(&mut self, position: u64, wait: bool) {
        if position != self.snapshot_at {
            let bytes = self.dedup.producers.encode(position, self.dedup.clock.now(), now_millis());
            self.snapshot_at = position;
            if let Some((tx, _)) = &self.snapshots {
                let _ = tx.send((position, bytes));
            }
        }
        if wait {
            if let Some((tx, thread)) = self.snapshots.take() {
                drop(tx);
                let _ = thread.join();
            }
        }
    }

    fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut group = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut shutdown = None;
            let mut push = |msg, group: &mut Vec<_>| match msg {
                Msg::Append { batch, reply } => group.push((batch, reply)),
                Msg::Shutdown { done } => shutdown = Some(done),
            };
            push(first, &mut group);
            while group.len() < MAX_REQUESTS_PER_COMMIT {
                match rx.try_recv() {
                    Ok(msg) => push(msg, &mut group),
                    Err(_) => break,
                }
            }
            self.commit(&mut group);
            if let Some(done) = shutdown {
                // Anything still queued was sent after shutdown began; answer it rather than drop it.
                rx.close();
                while let Ok(msg) = rx.try_recv() {
                    if let Msg::Append { batch, reply } = msg {
                        group.push((batch, reply));
                    }
                }
                self.commit(&mut group);
                if self.cut_pending.is_none() {
                    self.snapshot(self.base + self.len, true);
                }
                // Close the segment and release the directory lock before saying we are done, so a
                // new writer can open the log as soon as shutdown returns.
                drop(self);
                let _ = done.send(());
                return;
            }
        }
    }

    /// Writes and syncs one group, then answers every request in it.
    fn commit(&mut self, group: &mut Vec<(LogBatch, Reply)>) {
        if group.is_empty() {
            return;
        }
        let now = self.dedup.clock.now();
        self.dedup.expire(now);
        let mut buf = Vec::with_capacity(group.iter().map(|(batch, _)| batch.bytes()).sum());
        // What this group adds, recorded only once its sync succeeded.
        let mut new_ids: HashMap<IdKey, u64, IdKeyHasher> = HashMap::with_hasher(IdKeyHasher::default());
        let mut new_seqs: HashMap<u64, Ranges> = HashMap::new();
        let mut stored = 0u64;
        let answers: Vec<Vec<Appended>> = group
            .iter()
            .map(|(batch, _)| {
                let mut answer = Vec::with_capacity(batch.len());
                for (line, id) in batch.lines_for_dedup() {
                    if let Some((key, content, scheme)) = id {
                        let held = self.dedup.ids.get(key).or_else(|| new_ids.get(&key).copied());
                        match held {
                            Some(c) if c == content => {
                                answer.push(Appended::Duplicate);
                                continue;
                            }
                            Some(_) => {
                                answer.push(Appended::Conflict);
                                continue;
                            }
                            None => {}
                        }
                        if let Some((producer, seq)) = scheme {
                            match self.dedup.producers.check(producer, seq, now, new_seqs.get(&producer)) {
                                Verdict::Seen => {
                                    answer.push(Appended::Duplicate);
                                    continue;
                                }
                                Verdict::RangesFull => {
                                    answer.push(Appended::RangesFull);
                                    continue;
                                }
                                Verdict::New => new_seqs.entry(producer).or_default().insert(seq),
                            }
                        }
                        new_ids.insert(key, content);
                    }
                    buf.extend_from_slice(line);
                    stored += 1;
                    answer.push(Appended::Stored);
                }
                answer
            })
            .collect();
        let result = if buf.is_empty() { Ok(()) } else { self.write_durably(&buf) };
        metrics::histogram!("eps_log_commit_batch_requests").record(group.len() as f64);
        metrics::histogram!("eps_log_commit_batch_events").record(stored as f64);
        match result {
            Ok(()) => {
                metrics::counter!("eps_events_appended_total").increment(stored);
                for (key, content) in new_ids {
                    self.dedup.ids.insert_seen(key, content, now);
                }
                let expires = now.saturating_add(self.dedup.producers.horizon_ms());
                for (producer, seqs) in new_seqs {
                    self.dedup.producers.insert_ranges(producer, &seqs, expires);
                }
                self.stats.events_stored.fetch_add(stored, Ordering::Relaxed);
                for ((_, reply), answer) in group.drain(..).zip(answers) {
                    let dups = answer.iter().filter(|a| **a == Appended::Duplicate).count() as u64;
                    self.stats.duplicates.fetch_add(dups, Ordering::Relaxed);
                    metrics::counter!("eps_events_duplicate_total").increment(dups);
                    let conflicts =
                        answer.iter().filter(|a| matches!(a, Appended::Conflict | Appended::RangesFull)).count() as u64;
                    if conflicts > 0 {
                        self.stats.conflicts.fetch_add(conflicts, Ordering::Relaxed);
                        metrics::counter!("eps_events_conflict_total").increment(conflicts);
                    }
                    let _ = reply.send(Ok(answer));
                }
            }
            Err(message) => {
                for (_, reply) in group.drain(..) {
                    let _ = reply.send(Err(LogError::Unavailable(message.clone())));
                }
            }
        }
    }

    fn write_durably(&mut self, buf: &[u8]) -> Result<(), String> {
        if self.cut_pending.is_some() && !self.cut_tail() {
            return Err(self.cut_pending.clone().unwrap_or_default());
        }
        if self.roll_pending || (self.len > 0 && self.len + buf.len() as u64 > self.opts.segment_bytes) {
            // Decided once: until the new segment exists, nothing more goes into this one.
            self.roll_pending = true;
            if let Err(e) = self.roll() {
                self.stats.failing.store(true, Ordering::Relaxed);
                metrics::counter!("eps_log_append_errors_total").increment(1);
                tracing::error!(error = %e, "cannot start a new log segment; retried with the next group");
                return Err(format!("cannot start a new log segment: {e}"));
            }
            self.roll_pending = false;
            // The table now covers exactly the old segments: every group before this one synced
            // (a failed one was cut, and its ids never recorded), this one not yet written.
            self.snapshot(self.base, false);
        }
        let started = std::time::Instant::now();
        let written = self.file.write_all_at(buf, self.len).and_then(|()| self.file.sync_data());
        metrics::histogram!("eps_log_fsync_duration_seconds").record(started.elapsed().as_secs_f64());
        match written {
            Ok(()) => {
                self.len += buf.len() as u64;
                self.published();
                self.stats.syncs.fetch_add(1, Ordering::Relaxed);
                self.stats.failing.store(false, Ordering::Relaxed);
                metrics::counter!("eps_log_fsync_total").increment(1);
                metrics::counter!("eps_log_bytes_written_total").increment(buf.len() as u64);
                Ok(())
            }
            Err(e) => {
                self.stats.failing.store(true, Ordering::Relaxed);
                metrics::counter!("eps_log_append_errors_total").increment(1);
                tracing::error!(error = %e, bytes = buf.len(), "log append failed; nothing in this group was acknowledged");
                // Readers stop at the durable end, so they never saw these bytes; cut them off before
                // anything else is written. If the cut fails too, say so durably for the next start.
                let why = format!(
                    "log append failed ({e}) and its bytes could not be cut off yet; retrying with each new append"
                );
                if let Err(mark) = self.durable_end.publish_cut_pending(self.base + self.len) {
                    tracing::error!(error = %mark, "cannot record the pending cut");
                }
                self.cut_pending = Some(why);
                self.cut_tail();
                Err(format!("cannot write the log: {e}"))
            }
        }
    }

    /// Cuts whatever follows the durable length of the open segment; true once done.
    fn cut_tail(&mut self) -> bool {
        match self.file.set_len(self.len).and_then(|()| self.file.sync_all()) {
            Ok(()) => {
                self.cut_pending = None;
                self.published();
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot cut a failed group off the log; appends are refused until it can");
                false
            }
        }
    }

    /// Publishes the durable end (to readers, stats and metrics).
    fn published(&mut self) {
        let end = self.base + self.len;
        if let Err(e) = self.durable_end.publish(end) {
            // Readers keep the older end: they lag, they never read too far.
            tracing::warn!(error = %e, "cannot publish the durable end to readers");
        }
        self.stats.end_position.store(end, Ordering::Relaxed);
        metrics::gauge!("eps_log_end_position_bytes").set(end as f64);
    }

    fn roll(&mut self) -> io::Result<()> {
        let base = self.base + self.len;
        let path = self.opts.dir.join(segment_name(base));
        // `create` rather than `create_new`: an earlier roll may have created this file and then failed
        // to sync it; an empty leftover is reused, a non-empty one is never overwritten.
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
        if file.metadata()?.len() != 0 {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not empty", path.display()),
            ));
        }
        file.sync_all()?;
        sync_dir(&self.opts.dir)?;
        self.file = file;
        self.base = base;
        self.len = 0;
        let segments = self.stats.segments.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!("eps_log_segments").set(segments as f64);
        tracing::info!(segment = %path.display(), "started a new log segment");
        Ok(())
    }
}

/// At start-up, when the previous writer could not cut a failed group off: cuts the newest segment at
/// the durable end it recorded (if that end lies in this segment and before its end).
fn cut_failed_group(file: &File, path: &Path, base: u64, durable_end: u64) -> io::Result<()> {
    let len = file.metadata()?.len();
    if durable_end >= base && durable_end - base < len {
        tracing::warn!(
            segment = %path.display(), bytes = len - (durable_end - base),
            "cut a group whose append failed (it was answered 503) and that the last run could not cut"
        );
        file.set_len(durable_end - base)?;
        file.sync_all()?;
    }
    Ok(())
}

/// Cuts the file after its last newline; returns the new length. Bytes after the last newline are a
/// line whose write was interrupted, which therefore was never acknowledged.
fn repair_torn_tail(file: &File, path: &Path) -> io::Result<u64> {
    let len = file.metadata()?.len();
    let mut end = len;
    let mut chunk = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let n = (end - start) as usize;
        file.read_exact_at(&mut chunk[..n], start)?;
        if let Some(i) = chunk[..n].iter().rposition(|&b| b == b'\n') {
            end = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    if end < len {
        tracing::warn!(
            segment = %path.display(), bytes = len - end,
            "cut a torn last line left by an interrupted write (it was never acknowledged)"
        );
        file.set_len(end)?;
        file.sync_all()?;
    }
    Ok(end)
}

/// Milliseconds on the monotonic clock since the window was made: expiry never follows the wall
/// clock, which an operator or NTP may step by minutes in either direction.
#[derive(Debug, Clone, Copy)]
struct MonoClock(Instant);

impl MonoClock {
    fn now(&self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }
}

/// An [`IdKey`] as two halves: 8-byte alignment, so a table entry with its content digest is 24 bytes
/// (a `u128` would pad it to 32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct WinKey(u64, u64);

impl From<IdKey> for WinKey {
    fn from(key: IdKey) -> WinKey {
        WinKey(key as u64, (key >> 64) as u64)
    }
}

/// The id window: the ids seen within the window, each with its content digest, in the order they
/// were remembered, each with the monotonic time at which it may be forgotten.
struct IdWindow {
    keys: HashMap<WinKey, u64, IdKeyHasher>,
    order: VecDeque<(u64, WinKey)>,
    window_ms: u64,
    max: usize,
}

impl IdWindow {
    fn get(&self, key: IdKey) -> Option<u64> {
        self.keys.get(&WinKey::from(key)).copied()
    }

    /// Remembers `key` with its `content` until the monotonic time `expires_at`.
    fn insert(&mut self, key: IdKey, content: u64, expires_at: u64) {
        if self.max == 0 {
            return;
        }
        let key = WinKey::from(key);
        if self.keys.contains_key(&key) {
            return;
        }
        // Forget first, so the table never holds more than `max` (it would grow to the next size).
        while self.order.len() >= self.max {
            self.pop_oldest();
        }
        if self.keys.capacity() == 0 {
            // The size the churn of forgetting leads to (deleted slots make a table at 7/8 load double
            // once; at half load it rehashes in place), taken at once: growing there by doublings would
            // hold the old table and the new together at the last one (12.5 MiB more at the default
            // cap, the server's peak). Only the control bytes are written now (1 MiB at the default
            // cap); the rest becomes resident as ids land in it.
            self.keys.reserve(2 * self.max);
        }
        if self.order.len() == self.order.capacity() {
            // Grown by hand, never past `max`: a doubling would overshoot the cap by up to half.
            let more = self.order.capacity().max(1024).min(self.max - self.order.len()).max(1);
            self.order.reserve_exact(more);
        }
        self.keys.insert(key, content);
        self.order.push_back((expires_at, key));
    }

    /// Remembers `key`, seen at the monotonic time `now`, for one window.
    fn insert_seen(&mut self, key: IdKey, content: u64, now: u64) {
        self.insert(key, content, now.saturating_add(self.window_ms));
    }

    fn expire(&mut self, now: u64) {
        while self.order.front().is_some_and(|(expires_at, _)| *expires_at < now) {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((_, key)) = self.order.pop_front() {
            self.keys.remove(&key);
        }
    }
}

/// Both de-duplication mechanisms (see the module header).
struct Dedup {
    ids: IdWindow,
    producers: ProducerTable,
    /// The log position up to which the producer table came from a snapshot at start-up (0: none).
    covered: u64,
    clock: MonoClock,
    /// When producers idle past the horizon were last swept out.
    last_sweep: u64,
}

/// How often idle producers are swept out (a lookup ignores an expired one meanwhile).
const SWEEP_EVERY_MS: u64 = 10_000;

impl Dedup {
    fn new(opts: &FileLogOptions) -> Dedup {
        Dedup {
            ids: IdWindow {
                keys: HashMap::with_hasher(IdKeyHasher::default()),
                order: VecDeque::new(),
                window_ms: opts.dedup_window.as_millis() as u64,
                max: opts.dedup_max_ids,
            },
            producers: ProducerTable::new(opts.dedup_horizon.as_millis() as u64),
            covered: 0,
            clock: MonoClock(Instant::now()),
            last_sweep: 0,
        }
    }

    /// Rebuilds both from the log (and the newest producer snapshot) at start-up; `log_end` is the
    /// durable end just published.
    ///
    /// Only here does the wall clock count (the log's `ts` is all a new process knows of an id's age):
    /// an id is remembered for the rest of its window, a producer for the rest of its horizon, measured
    /// from the `ts` of its last event; a `ts` in the future (the clock was stepped back) counts as now.
    /// A wall clock stepped forward at the very moment of a restart shortens both by the step.
    ///
    /// The id window is read from the newest segments backwards, stopping at the first segment last
    /// written before the window or once `--dedup-max-ids` ids are read, so start-up reads no more
    /// than the window holds (those segments are read twice: counted newest first, then inserted oldest
    /// first), in 1 MiB chunks. The producer table is the newest whole snapshot plus every line after
    /// the position it covers; without one, every segment that exists.
    ///
    /// `eps compact` may remove segments between the listing and the reading here. A segment that
    /// vanished is skipped: compaction removes only segments every line of which is applied, that end
    /// at or before the newest snapshot's position (so the producer table has them), and whose last
    /// write is older than its minimum age, by default the id window ([`DEFAULT_DEDUP_WINDOW_SECS`],
    /// the same setting). An operator who gives a shorter `--min-age-secs` shortens the id window by
    /// that much. Any other error names its path.
    fn rebuild(opts: &FileLogOptions, segments: &[(u64, PathBuf)], log_end: u64) -> io::Result<Dedup> {
        let mut dedup = Dedup::new(opts);
        let now_wall = now_millis();
        let window_ms = dedup.ids.window_ms;
        let horizon_ms = dedup.producers.horizon_ms();
        let since = now_wall.saturating_sub(window_ms);

        // The producer table: the newest whole snapshot, then the log after it.
        if let Some((covered, table)) = producers::load_newest(&opts.dir, log_end, horizon_ms, 0, now_wall)
            .map_err(|e| with_path(e, "cannot list the producer snapshots in", &opts.dir))?
        {
            dedup.producers = table;
            dedup.covered = covered;
        }
        let covered = dedup.covered;
        // Where each segment ends (the newest at the durable end): what reading it costs.
        let end_of = |i: usize| segments.get(i + 1).map_or(log_end, |(next, _)| *next);
        let recent_from = segments
            .iter()
            .rposition(|(_, path)| {
                let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
                let millis = modified.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_millis() as u64);
                millis.is_some_and(|m| m < since)
            })
            .map_or(0, |older| older + 1);
        let progress = &opts.progress;
        for (i, (base, _)) in segments.iter().enumerate() {
            let planned = [end_of(i) > covered, i >= recent_from].iter().filter(|&&read| read).count() as u64;
            progress.plan(planned, planned * end_of(i).saturating_sub(*base));
        }
        for (i, (base, path)) in segments.iter().enumerate() {
            let end = end_of(i);
            if end <= covered {
                continue;
            }
            let skip = covered.saturating_sub(*base);
            for_each_line(path, skip, progress, |line| {
                if let Some((id, ts)) = id_and_time(line) {
                    if let Some((producer, seq)) = producers::parse_scheme_id(&id) {
                        if let Some(expires) = producers::expiry_of(ts, horizon_ms, 0, now_wall) {
                            dedup.producers.insert(producer, seq, expires);
                        }
                    }
                }
            })?;
        }

        // The id window: newest segments first, until the window's start or its size.
        // Newest first, each segment's ids within the window counted until the cap is reached; then
        // those segments read again oldest first, straight into the window (which forgets the oldest
        // past the cap, as it did while the server ran). Read in chunks, never a whole segment or its
        // ids at once: start-up holds the window and a chunk, not a 64 MiB segment and a copy of its ids.
        let mut needed: Vec<usize> = Vec::new();
        let mut count = 0usize;
        for (i, (_, path)) in segments.iter().enumerate().skip(recent_from).rev() {
            if count >= dedup.ids.max {
                break;
            }
            let found = for_each_line(path, 0, progress, |line| {
                if id_and_time(line).is_some_and(|(_, ts)| ts >= since) {
                    count += 1;
                }
            })?;
            if found {
                needed.push(i);
            }
        }
        // The second reading of those segments, now that it is known which.
        progress.plan(needed.len() as u64, needed.iter().map(|&i| end_of(i).saturating_sub(segments[i].0)).sum());
        let mut scratch = Vec::new();
        for &i in needed.iter().rev() {
            for_each_line(&segments[i].1, 0, progress, |line| {
                if let Some((id, ts)) = id_and_time(line) {
                    if ts >= since {
                        let age = now_wall.saturating_sub(ts);
                        dedup.ids.insert(id_key(&id), content_of(line, &mut scratch), window_ms - age.min(window_ms));
                    }
                }
            })?;
        }
        Ok(dedup)
    }

    fn len(&self) -> usize {
        self.ids.keys.len()
    }

    fn expire(&mut self, now: u64) {
        self.ids.expire(now);
        if now >= self.last_sweep + SWEEP_EVERY_MS {
            self.last_sweep = now;
            let gone = self.producers.expire(now);
            if gone > 0 {
                tracing::info!(producers = gone, "producers idle past the de-duplication horizon forgotten");
            }
        }
    }
}

/// Calls `f` on every whole line of a segment from the byte offset `from` (a line boundary), read in
/// 1 MiB chunks; an unterminated last line is not a line. `false` if the segment was removed (by
/// compaction) since it was listed.
fn for_each_line(path: &Path, from: u64, progress: &RecoveryProgress, mut f: impl FnMut(&[u8])) -> io::Result<bool> {
    // Once open, the file stays readable even if it is removed meanwhile.
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            tracing::info!(segment = %path.display(), "segment removed by compaction during start-up; skipped");
            progress.read(0);
            return Ok(false);
        }
        Err(e) => return Err(with_path(e, "cannot open", path)),
    };
    const CHUNK: usize = 1 << 20;
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK);
    let mut offset = from;
    loop {
        // `buf` holds the start of a line the previous chunk cut; read the next chunk after it.
        let kept = buf.len();
        buf.resize(kept + CHUNK, 0);
        progress.check()?;
        let n = file.read_at(&mut buf[kept..], offset).map_err(|e| with_path(e, "cannot read", path))?;
        progress.add_bytes(n as u64);
        buf.truncate(kept + n);
        offset += n as u64;
        let Some(last_newline) = buf.iter().rposition(|&b| b == b'\n') else {
            if n == 0 {
                // The end: what is left is no whole line.
                progress.read(0);
                return Ok(true);
            }
            continue;
        };
        for line in buf[..last_newline].split(|&b| b == b'\n') {
            f(line);
        }
        buf.drain(..=last_newline);
        if n == 0 {
            progress.read(0);
            return Ok(true);
        }
    }
}

/// A log line's `id` and `ts`, if it has both.
fn id_and_time(line: &[u8]) -> Option<(String, u64)> {
    #[derive(Deserialize)]
    struct IdAndTime<'a> {
        #[serde(borrow)]
        id: Option<std::borrow::Cow<'a, str>>,
        ts: Option<u64>,
    }
    match serde_json::from_slice(line) {
        Ok(IdAndTime { id: Some(id), ts: Some(ts) }) => Some((id.into_owned(), ts)),
        _ => None,
    }
}

/// The [`content_digest`] of a log line as the server would have written it (a line written otherwise,
/// e.g. by hand, is parsed and written again first).
fn content_of(line: &[u8], scratch: &mut Vec<u8>) -> u64 {
    if EventRef::parse_canonical_log_line(line).is_some() {
        return content_digest(line);
    }
    match EventRef::parse_log_line(line) {
        Ok(event) => {
            scratch.clear();
            event.write_log_line(0, scratch);
            content_digest(scratch)
        }
        Err(_) => content_digest(line),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;
    use crate::log::reader::LogReader;

    fn event(user: &str, id: Option<&str>) -> Event {
        let body = match id {
            Some(id) => format!(r#"{{"userId":"{user}","name":"add_revenue","value":1,"id":"{id}"}}"#),
            None => format!(r#"{{"userId":"{user}","name":"add_revenue","value":1}}"#),
        };
        Event::parse_request(body.as_bytes()).unwrap()
    }

    fn batch(events: Vec<Event>) -> LogBatch {
        LogBatch::of(events.iter().map(Event::as_ref), now_millis())
    }

    fn log_text(dir: &Path) -> String {
        list_segments(dir).unwrap().iter().map(|(_, p)| std::fs::read_to_string(p).unwrap()).collect()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_appends_share_syncs_and_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(FileLog::open(FileLogOptions::new(dir.path())).unwrap());
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.append(batch(vec![event(&format!("u{i}"), None)])).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), vec![Appended::Stored]);
        }
        log.shutdown().await;
        assert_eq!(log_text(dir.path()).lines().count(), 200);
        let syncs = log.stats().syncs.load(Ordering::Relaxed);
        assert!((1..=200).contains(&syncs), "syncs = {syncs}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn duplicate_ids_are_stored_once_even_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let log = FileLog::open(FileLogOptions::new(dir.path())).unwrap();
        let first = log.append(batch(vec![event("a", Some("run-1")), event("a", Some("run-1"))])).await.unwrap();
        assert_eq!(first, vec![Appended::Stored, Appended::Duplicate]);
        log.shutdown().await;
        drop(log);
        let log = FileLog::open(FileLogOptions::new(dir.path())).unwrap();
        let again = log.append(batch(vec![event("a", Some("run-1")), event("a", Some("run-2"))])).await.unwrap();
        assert_eq!(again, vec![Appended::Duplicate, Appended::Stored]);
        log.shutdown().await;
        assert_eq!(log_text(dir.path()).lines().count(), 2);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_torn_last_line_is_cut_at_start_up_and_never_blocks_later_events() {
        let dir = tempfile::tempdir().unwrap();
        let log = FileLog::open(FileLogOptions::new(dir.path())).unwrap();
        log.append(batch(vec![event("a", None)])).await.unwrap();
        log.shutdown().await;
        drop(log);
        let (_, path) = list_segments(dir.path()).unwrap().pop().unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        std::io::Write::write_all(&mut f, br#"{"userId":"torn","name":"add_rev"#).unwrap();
        let log = FileLog::open(FileLogOptions::new(dir.path())).unwrap();
        log.append(batch(vec![event("b", None)])).await.unwrap();
        log.shutdown().await;
        let text = log_text(dir.path());
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(!text.contains("torn"));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn segments_rotate_and_the_reader_crosses_them_at_line_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = FileLogOptions::new(dir.path());
        opts.segment_bytes = 200;
        let log = FileLog::open(opts).unwrap();
        for i in 0..20 {
            log.append(batch(vec![event(&format!("user{i}"), None)])).await.unwrap();
        }
        log.shutdown().await;
        let segments = list_segments(dir.path()).unwrap();
        assert!(segments.len() > 3, "{segments:?}");
        let mut reader = LogReader::new(dir.path(), 100);
        let mut position = 0;
        let mut users = Vec::new();
        while let Some(chunk) = reader.read(position).unwrap() {
            assert_eq!(chunk.start, position);
            for (_, line) in chunk.lines() {
                let e = crate::event::EventRef::parse_log_line(line.unwrap()).unwrap();
                users.push(e.into_user_id().into_owned());
            }
            position = chunk.end;
        }
        assert_eq!(users, (0..20).map(|i| format!("user{i}")).collect::<Vec<_>>());
        assert_eq!(position, reader.end_position().unwrap());
    }

    #[test]
    fn the_reader_never_returns_a_partial_last_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(segment_name(0)), "{\"a\":1}\n{\"b\":").unwrap();
        let mut reader = LogReader::new(dir.path(), 1 << 20);
        let chunk = reader.read(0).unwrap().unwrap();
        assert_eq!(chunk.data, b"{\"a\":1}\n");
        assert!(reader.read(chunk.end).unwrap().is_none());
    }

    #[test]
    fn an_unterminated_line_in_an_older_segment_is_returned_to_be_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(segment_name(0)), "{\"a\":1}\n{\"b\":").unwrap();
        std::fs::write(dir.path().join(segment_name(13)), "{\"c\":1}\n").unwrap();
        let mut reader = LogReader::new(dir.path(), 1 << 20);
        let first = reader.read(0).unwrap().unwrap();
        let lines: Vec<_> = first.lines().map(|(_, l)| l.map(<[u8]>::to_vec).map_err(<[u8]>::to_vec)).collect();
        assert_eq!(lines, vec![Ok(b"{\"a\":1}".to_vec()), Err(b"{\"b\":".to_vec())]);
        let second = reader.read(first.end).unwrap().unwrap();
        assert_eq!(second.start, 13);
        assert_eq!(second.data, b"{\"c\":1}\n");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_second_writer_on_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = FileLog::open(FileLogOptions::new(dir.path())).unwrap();
        let err = FileLog::open(FileLogOptions::new(dir.path())).err().expect("second open must fail");
        assert!(err.to_string().contains("another eps server"), "{err}");
    }
}

#[cfg(test)]
mod memory {
    use super::*;

    /// `for_each_line` (start-up's chunked reading) gives exactly the whole lines after `from`, whatever
    /// falls on a 1 MiB chunk boundary: lines cut by it, a line longer than a chunk, an unterminated tail.
    #[test]
    fn for_each_line_gives_every_whole_line_across_chunk_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("segment");
        let mut lines: Vec<Vec<u8>> =
            (0..40_000).map(|i| format!("line {i} {}", "x".repeat(i % 97)).into_bytes()).collect();
        lines.insert(20_000, vec![b'y'; 3 << 20]);
        lines.push(Vec::new());
        let mut data = lines.join(&b'\n');
        data.extend_from_slice(b"\nunterminated tail");
        std::fs::write(&path, &data).unwrap();
        let collect = |from: u64| {
            let mut got = Vec::new();
            assert!(for_each_line(&path, from, &RecoveryProgress::default(), |l| got.push(l.to_vec())).unwrap());
            got
        };
        assert_eq!(collect(0), lines);
        let from = lines[..3].iter().map(|l| l.len() as u64 + 1).sum();
        assert_eq!(collect(from), lines[3..]);
        assert!(collect(data.len() as u64).is_empty());
        assert!(!for_each_line(&dir.path().join("gone"), 0, &RecoveryProgress::default(), |_| ()).unwrap());
    }

    /// The id window's memory per id, from the capacities of its two tables after a churn of three times its
    /// size (hash table: 24-byte entry and 1 control byte per bucket, capacity = 7/8 of the buckets;
    /// ring: 24 bytes a slot). Prints the figures docs/PERFORMANCE.md states (`--nocapture`).
    #[test]
    fn the_default_id_window_stays_within_its_memory_budget_after_churn() {
        let max = DEFAULT_DEDUP_MAX_IDS;
        let mut w = IdWindow {
            keys: HashMap::with_hasher(IdKeyHasher::default()),
            order: VecDeque::new(),
            window_ms: u64::MAX / 4,
            max,
        };
        for i in 0..(3 * max as u128) {
            w.insert(super::super::digest(&i.to_le_bytes()), 0, 1);
        }
        let buckets = (w.keys.capacity() * 8 / 7).next_power_of_two();
        let bytes = buckets * 25 + w.order.capacity() * 24;
        println!(
            "max {max}: {buckets} buckets, ring {} slots: {:.1} MiB, {:.1} bytes per id",
            w.order.capacity(),
            bytes as f64 / (1 << 20) as f64,
            bytes as f64 / max as f64
        );
        // The ring is grown by hand, never past the cap; the table stays at 2^20 buckets: 35.5 MiB in all.
        assert_eq!(w.order.len(), max);
        assert!(w.order.capacity() <= max, "ring of {} slots for a cap of {max}", w.order.capacity());
        assert!(buckets <= 1 << 20, "{buckets} buckets");
        assert!(bytes < 36 << 20, "{bytes} bytes");
    }
}
