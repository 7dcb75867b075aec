//! Operator commands that read or tidy a data directory: `eps status` and `eps compact`.
//!
//! Retention rule (`compact`): a segment may go only when all four hold — it is not the newest one
//! (the server may still be appending to it), every one of its lines is behind the store's checkpoint
//! (the processor has applied it), it ends at or before the position the newest whole producer
//! snapshot covers (`log::producers`: the snapshot keeps what the segment held for de-duplication
//! over the horizon), and it was last written longer ago than `min_age` (by default the server's id
//! window: the server rebuilds that window from recent segments, so removing a younger one could let
//! a late retry through twice). Segments go oldest first, so the log never has a hole.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::money::Total;
use anyhow::Context;
use serde::Serialize;

use crate::log::measure::measure_past;
use crate::log::{list_segments, LOG_DIR};
use crate::store;
use crate::store::FILE_STREAM;

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub data_dir: PathBuf,
    pub backend: &'static str,
    pub segments: usize,
    /// Bytes held by the segments on disk.
    pub log_bytes: u64,
    /// Position of the oldest byte still on disk (above 0 once segments were compacted).
    pub log_start: u64,
    pub log_end: u64,
    pub checkpoint: u64,
    pub events_applied: u64,
    pub invalid_lines: u64,
    /// `None` when the checkpoint counts another log (see `identity_mismatch`): unknown, not 0.
    pub lag_bytes: Option<u64>,
    /// Lines between the checkpoint and the end of the log (counted, not estimated); `None` as above.
    pub lag_events: Option<u64>,
    /// The log's identity (`None` before a server made the log).
    pub log_identity: Option<String>,
    /// Set when the store's checkpoint is bound to another log than this one: what it counts.
    pub identity_mismatch: Option<String>,
    pub users: u64,
    /// The exact sum of all revenues.
    pub total_revenue: Total,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "data directory   {}", self.data_dir.display())?;
        writeln!(f, "database         {}", self.backend)?;
        writeln!(
            f,
            "log              {} segments, {} bytes on disk (positions {}..{})",
            self.segments, self.log_bytes, self.log_start, self.log_end
        )?;
        writeln!(
            f,
            "checkpoint       byte {} ({} events applied, {} invalid lines)",
            self.checkpoint, self.events_applied, self.invalid_lines
        )?;
        match (&self.identity_mismatch, self.lag_events, self.lag_bytes) {
            (None, Some(events), Some(bytes)) => writeln!(f, "lag              {events} events, {bytes} bytes")?,
            _ => writeln!(
                f,
                "lag              unknown: the store's checkpoint counts {}, but the log is {} (eps process refuses it; \
                 see eps process --adopt-new-log)",
                self.identity_mismatch.as_deref().unwrap_or("another log"),
                self.log_identity.as_deref().unwrap_or("a log without an identity")
            )?,
        }
        writeln!(f, "users            {}", self.users)?;
        write!(f, "total revenue    {}", self.total_revenue)
    }
}

/// `eps status` of a data directory's file log; `allow_other_store` as `--allow-other-store` (see
/// [`store::check_store_record`]).
pub async fn status(data_dir: &Path, database_url: Option<&str>, allow_other_store: bool) -> anyhow::Result<Status> {
    store::check_store_record(data_dir, database_url, allow_other_store)?;
    let store = store::open_existing(database_url, data_dir).await?;
    store::require_data_dir(data_dir)?;
    let progress = store.progress(FILE_STREAM).await?;
    let totals = store.totals().await?;
    let log_dir = data_dir.join(LOG_DIR);
    let log_identity = crate::log::identity::read(&log_dir)?;
    let bound = store.log_identity(FILE_STREAM).await?;
    let identity_mismatch = match (&bound, &log_identity) {
        (Some(bound), Some(found)) if bound != found => Some(bound.clone()),
        _ => None,
    };
    let past = measure_past(&log_dir, progress.position, u64::MAX)?;
    Ok(Status {
        data_dir: data_dir.to_path_buf(),
        backend: store.backend(),
        segments: past.segments,
        log_bytes: past.log_bytes,
        log_start: past.log_start,
        log_end: past.log_end,
        checkpoint: progress.position,
        events_applied: progress.events_applied,
        invalid_lines: progress.invalid_lines,
        lag_bytes: identity_mismatch.is_none().then(|| past.log_end.saturating_sub(progress.position)),
        lag_events: identity_mismatch.is_none().then_some(past.lines_counted),
        log_identity,
        identity_mismatch,
        users: totals.users,
        total_revenue: totals.revenue,
    })
}

#[derive(Debug, Clone)]
pub struct CompactOptions {
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    /// Move removed segments here instead of deleting them.
    pub archive_dir: Option<PathBuf>,
    /// Only segments last written longer ago than this go.
    pub min_age: Duration,
    /// Say what would go, change nothing.
    pub dry_run: bool,
    /// Read the checkpoint from this store even though the data directory's server uses another.
    pub allow_other_store: bool,
}

#[derive(Debug, Clone, Default)]
pub struct CompactReport {
    pub checkpoint: u64,
    /// Segment file names removed (or archived), with their sizes.
    pub removed: Vec<(String, u64)>,
    pub kept: usize,
}

impl std::fmt::Display for CompactReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bytes: u64 = self.removed.iter().map(|(_, b)| b).sum();
        write!(
            f,
            "checkpoint at byte {}: {} segments ({} bytes) processed and old enough to go, {} kept",
            self.checkpoint,
            self.removed.len(),
            bytes,
            self.kept
        )
    }
}

pub async fn compact(opts: &CompactOptions) -> anyhow::Result<CompactReport> {
    // Another store's checkpoint says nothing about what was applied from this log.
    store::check_store_record(&opts.data_dir, opts.database_url.as_deref(), opts.allow_other_store)?;
    let store = store::open_existing(opts.database_url.as_deref(), &opts.data_dir).await?;
    store::require_data_dir(&opts.data_dir)?;
    let checkpoint = store.progress(FILE_STREAM).await?.position;
    let log_dir = opts.data_dir.join(LOG_DIR);
    // The checkpoint is a position in the log it is bound to; in another log it says nothing about
    // what was applied, and nothing may be removed on its word.
    if let (Some(bound), Some(found)) = (store.log_identity(FILE_STREAM).await?, crate::log::identity::read(&log_dir)?)
    {
        if bound != found {
            anyhow::bail!(
                "nothing removed: the store's checkpoint counts {bound}, but the log in {} is {found}",
                log_dir.display()
            );
        }
    }
    let segments = list_segments(&log_dir)?;
    let now = SystemTime::now();
    let snapshot = crate::log::producers::covered_position(&log_dir)?;
    let mut report = CompactReport { checkpoint, ..CompactReport::default() };
    for pair in segments.windows(2) {
        let ((_, path), (next_base, _)) = (&pair[0], &pair[1]);
        let meta = std::fs::metadata(path)?;
        let age = now.duration_since(meta.modified()?).unwrap_or_default();
        if *next_base > checkpoint || *next_base > snapshot || age < opts.min_age {
            if *next_base > snapshot && *next_base <= checkpoint && age >= opts.min_age {
                tracing::info!(
                    segment = %path.display(), snapshot,
                    "segment kept: no producer snapshot covers it yet (the server writes one at each new segment)"
                );
            }
            break;
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        if !opts.dry_run {
            remove_segment(path, opts.archive_dir.as_deref())?;
        }
        tracing::info!(segment = %name, bytes = meta.len(), archived = opts.archive_dir.is_some(), "segment removed by retention");
        report.removed.push((name, meta.len()));
    }
    report.kept = segments.len() - report.removed.len();
    if !opts.dry_run && !report.removed.is_empty() {
        std::fs::File::open(&log_dir)?.sync_all()?;
    }
    Ok(report)
}

fn remove_segment(path: &Path, archive_dir: Option<&Path>) -> anyhow::Result<()> {
    let Some(archive) = archive_dir else {
        return std::fs::remove_file(path).with_context(|| format!("cannot remove {}", path.display()));
    };
    crate::fsutil::create_dir_durable(archive)?;
    let target = archive.join(path.file_name().context("segment without a file name")?);
    if std::fs::rename(path, &target).is_err() {
        // Another filesystem: copy, make the copy durable, then remove the original.
        std::fs::copy(path, &target)
            .with_context(|| format!("cannot archive {} to {}", path.display(), target.display()))?;
        std::fs::File::open(&target)?.sync_all()?;
        std::fs::remove_file(path)?;
    }
    std::fs::File::open(archive)?.sync_all()?;
    Ok(())
}
