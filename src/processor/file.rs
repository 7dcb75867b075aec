//! `eps process` on the file log: applies it to the store, exactly once (the rule is in
//! [`crate::processor`]).
//!
//! Each round reads the log after the checkpoint 8 MiB at a time and gathers chunks into one
//! transaction ([`Pending`], up to `--batch-bytes` of log or the commit bounds), summing each chunk in
//! parallel parts cut at newlines, and commits sums plus new checkpoint with [`Store::commit`]. Memory
//! is bounded by one commit's distinct users (and the summary's count of users, capped), whatever the
//! size of the log and however long a `--follow` run lasts. A read error while following, and a
//! segment `eps compact` removed under this processor, are handled as the loop says.
//!
//! A line that is not a valid event is not applied; it is recorded in the same transaction (so it is
//! reported exactly once), and the dead-letter file is brought up to date from those records afterwards
//! (with its segment and byte offset; see [`DeadLetters`]: a write that fails is retried, never lost).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::backoff::{Backoff, Delays};
use crate::error::ConfigError;
use crate::log::reader::{lines_of, Chunk, LogReader, ReadError};
use crate::log::LOG_DIR;
use crate::processor::stop::{self, Stop};
use crate::processor::{
    bind_log_identity, count_users, excerpt, open_store, parse_line, user_digest, with_retry, ExactSum, ProcessOptions,
    ProcessSummary, MAX_INVALID_PER_COMMIT, MAX_USERS_COUNTED, MAX_USERS_PER_COMMIT,
};
use crate::store::{self, Batch, CommitOutcome, InvalidLine, Store, FILE_STREAM};

/// Dead-letter file, in the data directory.
pub const DEAD_LETTER_FILE: &str = "dead-letter.jsonl";
/// Runs until caught up (or, with `follow`, until `shutdown` resolves). A shutdown is honoured in every
/// wait and retry loop within [`crate::processor::STOP_GRACE`], and the run returns what was committed.
pub async fn run(opts: ProcessOptions, shutdown: impl Future<Output = ()>) -> anyhow::Result<ProcessSummary> {
    store::check_database_url(opts.database_url.as_deref())?;
    stop::until(shutdown, |stop| async move {
        // A store that exists is opened first (so a refused table is reported whatever the log);
        // the SQLite file is only created once there is a log to apply into it.
        let check_store =
            || store::check_store_record(&opts.data_dir, opts.database_url.as_deref(), opts.allow_other_store);
        check_store()?;
        let creates_store = opts.database_url.is_none() && !opts.data_dir.join(store::SQLITE_FILE).is_file();
        if creates_store && !wait_for_log(&opts, &stop).await? {
            return Ok(ProcessSummary::default());
        }
        let Some(store) = open_store(&opts, &stop).await? else { return Ok(ProcessSummary::default()) };
        if !wait_for_log(&opts, &stop).await? {
            return Ok(ProcessSummary::default());
        }
        // A server that made the log meanwhile recorded its store.
        check_store()?;
        apply(opts, store, stop).await
    })
    .await
}

/// The file log must exist before anything is applied, or created: a processor pointed at a data
/// directory without one (a mistyped `--data-dir`) creates neither the directory nor a database in it. A one-shot run says
/// there is no log there (a configuration error, exit code 2); a `--follow` run waits for a server to
/// make it, saying so once. `false` when the shutdown was requested first.
async fn wait_for_log(opts: &ProcessOptions, stop: &Stop) -> anyhow::Result<bool> {
    let log_dir = opts.data_dir.join(LOG_DIR);
    let missing = || {
        format!(
            "no log in {}: eps server has not written to this data directory ({})",
            log_dir.display(),
            store::DATA_DIR_SOURCE
        )
    };
    if log_dir.is_dir() {
        return Ok(true);
    }
    if !opts.follow {
        return Err(ConfigError(missing()).into());
    }
    tracing::info!("{}; waiting for it", missing());
    loop {
        tokio::select! {
            () = tokio::time::sleep(opts.poll_interval.max(Duration::from_millis(100))) => {}
            () = stop.requested() => return Ok(false),
        }
        if log_dir.is_dir() {
            return Ok(true);
        }
    }
}

pub async fn run_with_store(
    opts: ProcessOptions,
    store: Arc<dyn Store>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<ProcessSummary> {
    stop::until(shutdown, |stop| apply(opts, store, stop)).await
}

/// The apply loop; returns (with what was committed) once `stop` is requested.
async fn apply(opts: ProcessOptions, store: Arc<dyn Store>, stop: Stop) -> anyhow::Result<ProcessSummary> {
    let shutdown = stop.requested();
    tokio::pin!(shutdown);
    let started = Instant::now();
    let mut summary = ProcessSummary::default();
    let mut users = HashSet::new();
    let mut reader = LogReader::new(opts.data_dir.join(LOG_DIR), opts.batch_bytes.min(READ_CHUNK_BYTES));
    let mut dead_letters = DeadLetters::new(opts.data_dir.join(DEAD_LETTER_FILE));
    // The checkpoint counts one log: refuse another (a log directory deleted and made again, another
    // data directory) rather than read it from positions that mean nothing in it. A log not made yet
    // has nothing to read.
    let log_dir = opts.data_dir.join(LOG_DIR);
    match crate::log::identity::read(&log_dir).context("the log's identity")? {
        Some(identity) => {
            let first = crate::log::list_segments(&log_dir)?.first().map_or(0, |(base, _)| *base);
            if bind_log_identity(&opts, &stop, &*store, FILE_STREAM, &identity, first).await?.is_none() {
                return Ok(summary);
            }
        }
        // Made by the server when it opens the log; a log an older server is still writing has none
        // until that server restarts.
        None if !crate::log::list_segments(&log_dir)?.is_empty() => {
            tracing::warn!(log = %log_dir.display(), "the log has no identity yet (the server makes it when it opens \
                the log): the checkpoint is not checked against it in this run");
        }
        None => {}
    }
    let Some(progress) = with_retry(&opts, &stop, || store.progress(FILE_STREAM)).await? else {
        return Ok(summary);
    };
    let mut position = progress.position;
    // Whatever an earlier run committed but could not write to the dead-letter file is written now.
    dead_letters.catch_up(&*store).await;
    // For the events-lag estimate; refined by every committed batch.
    let mut bytes_per_event = 100.0;
    record_lag(&mut reader, position, bytes_per_event);
    loop {
        dead_letters.retry_if_due(&*store).await;
        // One transaction's worth: chunks until the batch is full or the log has nothing more.
        let mut pending = Pending::new(position);
        let mut stopping = false;
        while !pending.is_full(opts.batch_bytes) {
            match tokio::task::block_in_place(|| reader.read(pending.end)) {
                Ok(Some(chunk)) => tokio::task::block_in_place(|| pending.absorb(&chunk)),
                Ok(None) => break,
                // A disk error while following: nothing was applied from it; the log is read again
                // from the checkpoint once the disk answers (a one-shot run reports it and stops).
                Err(ReadError::Io(e)) if opts.follow => {
                    metrics::counter!("eps_processor_read_errors_total").increment(1);
                    tracing::warn!(error = %e, "cannot read the log; retrying from the checkpoint");
                    pending = Pending::new(position);
                    tokio::select! {
                        _ = &mut shutdown => {
                            stopping = true;
                            break;
                        }
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
                // Not in the log: `eps compact` removed the segment after another processor applied
                // it (compaction only removes what is behind the store's checkpoint). Like a
                // conflict: nothing of this round is committed, go on from the store's checkpoint.
                // Only a checkpoint that is itself not in the log is an error.
                Err(ReadError::OutOfRange { position: at, first, end }) => {
                    let Some(progress) = with_retry(&opts, &stop, || store.progress(FILE_STREAM)).await? else {
                        stopping = true;
                        break;
                    };
                    let current = progress.position;
                    if current == position {
                        anyhow::bail!(
                            "the store's checkpoint (byte {current}) is not in the log, which holds bytes {first}..{end}: \
                             were segments holding unapplied events removed, or the log replaced? (reading byte {at})"
                        );
                    }
                    tracing::info!(
                        from = at,
                        to = current,
                        "the log was compacted past this processor's position; continuing from the store's checkpoint"
                    );
                    metrics::counter!("eps_processor_conflicts_total").increment(1);
                    summary.conflicts += 1;
                    position = current;
                    pending = Pending::new(position);
                }
                Err(e) => return Err(e.into()),
            }
        }
        if stopping {
            break;
        }
        if pending.end == position {
            // Caught up: the lag was recorded after the last commit; a --follow poll every few
            // milliseconds need not list the log directory again.
            if !opts.follow {
                break;
            }
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(opts.poll_interval) => continue,
            }
        }
        let (batch, batch_users) = pending.into_batch();
        let commit_started = Instant::now();
        let Some(outcome) = with_retry(&opts, &stop, || store.commit(FILE_STREAM, &batch)).await? else {
            // Stopped while the database was away: nothing of this batch was committed.
            break;
        };
        let commit_time = commit_started.elapsed();
        metrics::histogram!("eps_processor_commit_duration_seconds").record(commit_time.as_secs_f64());
        summary.store_time += commit_time;
        match outcome {
            CommitOutcome::Committed => {
                metrics::counter!("eps_processor_commits_total").increment(1);
                metrics::counter!("eps_processor_events_applied_total").increment(batch.events);
                metrics::counter!("eps_processor_invalid_lines_total").increment(batch.invalid.len() as u64);
                let lines = batch.events + batch.invalid.len() as u64;
                if lines > 0 {
                    bytes_per_event = (batch.to - batch.from) as f64 / lines as f64;
                }
                if !batch.invalid.is_empty() {
                    for line in &batch.invalid {
                        tracing::warn!(
                            segment = %line.segment, offset = line.segment_offset, error = %line.error,
                            "invalid line in the log: not applied, recorded, copied to the dead-letter file"
                        );
                    }
                    dead_letters.catch_up(&*store).await;
                }
                summary.events_applied += batch.events;
                summary.invalid_lines += batch.invalid.len() as u64;
                summary.batches += 1;
                count_users(&mut users, batch_users, MAX_USERS_COUNTED, &mut summary.users_over);
                position = batch.to;
            }
            CommitOutcome::Conflict { current } => {
                metrics::counter!("eps_processor_conflicts_total").increment(1);
                summary.conflicts += 1;
                position = current;
            }
        }
        record_lag(&mut reader, position, bytes_per_event);
        // Between transactions, in both modes: SIGTERM stops a one-shot run cleanly too.
        if futures::poll!(&mut shutdown).is_ready() {
            break;
        }
    }
    if dead_letters.behind {
        dead_letters.catch_up(&*store).await;
        // A one-shot run that could not write them says so (exit 1); the next run writes them.
        if dead_letters.behind && !opts.follow && !stop.is_requested() {
            anyhow::bail!(
                "cannot write the dead-letter file {}: the invalid lines are recorded in the store \
                 (eps_invalid_lines) and the next run writes them",
                dead_letters.path.display()
            );
        }
    }
    summary.users_touched = users.len() as u64;
    summary.position = position;
    summary.elapsed = started.elapsed();
    Ok(summary)
}

fn record_lag(reader: &mut LogReader, position: u64, bytes_per_event: f64) {
    let end = reader.end_position().unwrap_or(position);
    let lag = end.saturating_sub(position);
    metrics::gauge!("eps_processor_checkpoint_bytes").set(position as f64);
    metrics::gauge!("eps_processor_lag_bytes").set(lag as f64);
    metrics::gauge!("eps_processor_lag_events").set((lag as f64 / bytes_per_event).round());
}

/// Log bytes read at a time; a transaction gathers several reads (see [`Pending`]).
const READ_CHUNK_BYTES: usize = 8 * 1024 * 1024;
/// The sums of one transaction, gathered from consecutive chunks starting at the checkpoint `from`.
///
/// The cost of a commit grows with the users it touches, not with the events: gathering many chunks
/// into one transaction (up to `--batch-bytes` of log) makes the database work per event small. The
/// memory held is one chunk plus one sum per user.
struct Pending {
    from: u64,
    end: u64,
    sums: HashMap<String, ExactSum, foldhash::fast::RandomState>,
    events: u64,
    invalid: Vec<InvalidLine>,
}

impl Pending {
    fn new(from: u64) -> Pending {
        Pending { from, end: from, sums: HashMap::default(), events: 0, invalid: Vec::new() }
    }

    fn is_full(&self, max_bytes: usize) -> bool {
        self.end - self.from >= max_bytes as u64
            || self.sums.len() >= MAX_USERS_PER_COMMIT
            || self.invalid.len() >= MAX_INVALID_PER_COMMIT
    }

    /// Adds the chunk that starts at `self.end`.
    fn absorb(&mut self, chunk: &Chunk) {
        debug_assert_eq!(chunk.start, self.end);
        let part = summarize(chunk);
        for (user, sum) in part.sums {
            match self.sums.get_mut(user.as_ref()) {
                Some(slot) => slot.add(sum),
                None => {
                    self.sums.insert(user.into_owned(), sum);
                }
            }
        }
        self.events += part.events;
        self.invalid.extend(part.invalid.into_iter().map(|(position, error, line)| InvalidLine {
            position,
            segment: chunk.segment.clone(),
            segment_offset: position - chunk.segment_base,
            error,
            line: excerpt(line),
        }));
        self.end = chunk.end;
    }

    /// The batch to commit, and a digest of each user touched (for the summary).
    fn into_batch(self) -> (Batch, Vec<u64>) {
        let mut digests = Vec::with_capacity(self.sums.len());
        let mut deltas = Vec::with_capacity(self.sums.len());
        for (user, sum) in self.sums {
            digests.push(user_digest(&user));
            deltas.push((user, sum.total()));
        }
        let batch = Batch { from: self.from, to: self.end, deltas, events: self.events, invalid: self.invalid };
        (batch, digests)
    }
}

/// Sums one chunk per user.
///
/// Large chunks are cut at line boundaries into one part per core, summed in parallel and merged:
/// the sums are exact whatever the order, so the result is the same as one pass.
fn summarize(chunk: &Chunk) -> PartSums<'_> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_SUM_THREADS);
    let parts = split_at_lines(&chunk.data, if chunk.data.len() < PARALLEL_MIN_BYTES { 1 } else { threads });
    let partials: Vec<PartSums<'_>> = if parts.len() == 1 {
        vec![sum_part(&chunk.data, chunk.start)]
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = parts
                .iter()
                .map(|&(from, to)| scope.spawn(move || sum_part(&chunk.data[from..to], chunk.start + from as u64)))
                .collect();
            handles.into_iter().map(|h| h.join().expect("a summing thread panicked")).collect()
        })
    };
    let mut partials = partials.into_iter();
    let mut total = partials.next().unwrap_or_default();
    for part in partials {
        total.events += part.events;
        total.invalid.extend(part.invalid);
        for (user, sum) in part.sums {
            total.add(user, sum);
        }
    }
    total
}

/// Summing threads at most, and the chunk size below which one thread does it all.
const MAX_SUM_THREADS: usize = 4;
const PARALLEL_MIN_BYTES: usize = 1024 * 1024;

/// `n` byte ranges covering `data`, each ending just after a newline (the last at the end of `data`).
fn split_at_lines(data: &[u8], n: usize) -> Vec<(usize, usize)> {
    let mut ranges = Vec::with_capacity(n);
    let mut from = 0;
    for k in 1..n {
        let target = (data.len() * k / n).max(from);
        let Some(newline) = data[target..].iter().position(|&b| b == b'\n') else { break };
        let to = target + newline + 1;
        if to < data.len() {
            ranges.push((from, to));
            from = to;
        }
    }
    ranges.push((from, data.len()));
    ranges
}

/// The sums of one part of a chunk; users borrow from the chunk's bytes.
#[derive(Default)]
struct PartSums<'a> {
    sums: HashMap<Cow<'a, str>, ExactSum, foldhash::fast::RandomState>,
    events: u64,
    /// (position, error, line) of each line that is not a valid event.
    invalid: Vec<(u64, String, &'a [u8])>,
}

impl<'a> PartSums<'a> {
    fn add(&mut self, user: Cow<'a, str>, sum: ExactSum) {
        match self.sums.get_mut(user.as_ref()) {
            Some(slot) => slot.add(sum),
            None => {
                self.sums.insert(user, sum);
            }
        }
    }

    /// The hot path: one event's value.
    #[inline]
    fn add_event(&mut self, user: Cow<'a, str>, value: rust_decimal::Decimal) {
        match self.sums.get_mut(user.as_ref()) {
            Some(slot) => slot.add_decimal(value),
            None => {
                self.sums.insert(user, ExactSum::of(value));
            }
        }
    }
}

fn sum_part(data: &[u8], start: u64) -> PartSums<'_> {
    let mut part = PartSums::default();
    for (position, line) in lines_of(data, start) {
        let Some(parsed) = parse_line(line, "line without its newline at the end of an older segment (a torn write)")
        else {
            continue;
        };
        match parsed {
            Ok(event) => {
                let delta = event.delta();
                part.add_event(event.into_user_id(), delta);
                part.events += 1;
            }
            Err((error, line)) => part.invalid.push((position, error, line)),
        }
    }
    part
}
/// The dead-letter file: one JSON line per invalid log line, derived from the store.
///
/// The store records every invalid line in the transaction that skips it (`eps_invalid_lines`); the file
/// is a copy of those records, in position order, written after the commit. What the file holds is read
/// from the file itself (the `position` of its last record), and every recorded line past it is
/// appended, so a write that failed after its commit (a full disk) is made good by the next attempt, and
/// no line is written twice: idempotent, whichever run or processor does it (an exclusive lock on the
/// file serialises processors). A failed attempt is logged and counted
/// (`eps_processor_dead_letter_errors_total`) and retried (after each commit and, while following, on a
/// timer); it never holds back the application of events.
struct DeadLetters {
    path: PathBuf,
    /// The store holds invalid lines the file may not have (the last attempt failed).
    behind: bool,
    retry: Delays,
    next_retry: Instant,
}

/// Invalid lines read from the store at a time.
const DEAD_LETTER_PAGE: usize = 1_000;

impl DeadLetters {
    fn new(path: PathBuf) -> Self {
        DeadLetters {
            path,
            behind: false,
            retry: Backoff::new(Duration::from_secs(1), Duration::from_secs(30)).delays(),
            next_retry: Instant::now(),
        }
    }

    /// Retries a failed catch-up once its pause is over.
    async fn retry_if_due(&mut self, store: &dyn Store) {
        if self.behind && Instant::now() >= self.next_retry {
            self.catch_up(store).await;
        }
    }

    /// Appends every invalid line the store recorded past the file's last record; failures are logged,
    /// counted and left for a retry.
    async fn catch_up(&mut self, store: &dyn Store) {
        match self.try_catch_up(store).await {
            Ok(written) => {
                if self.behind {
                    tracing::info!(written, path = %self.path.display(), "the dead-letter file has caught up with the store");
                }
                self.behind = false;
                self.retry.reset();
            }
            Err(e) => {
                metrics::counter!("eps_processor_dead_letter_errors_total").increment(1);
                let delay = self.retry.next_delay();
                tracing::warn!(
                    error = format!("{e:#}"), retry_in_secs = delay.as_secs_f64(),
                    "cannot write the dead-letter file; the invalid lines are recorded in the store and will be written on retry"
                );
                self.behind = true;
                self.next_retry = Instant::now() + delay;
            }
        }
    }

    /// The records written.
    async fn try_catch_up(&mut self, store: &dyn Store) -> anyhow::Result<u64> {
        if !self.path.exists() {
            // Nothing to write yet: no file is created for nothing.
            let first = store.invalid_lines_after(FILE_STREAM, None, 1).await?;
            if first.is_empty() {
                return Ok(0);
            }
        }
        let file = tokio::task::block_in_place(|| self.open_locked())?;
        let mut end = file.metadata()?.len();
        let mut held = tokio::task::block_in_place(|| last_record(&file, &mut end))
            .with_context(|| format!("cannot read {}", self.path.display()))?;
        let mut written = 0;
        loop {
            let lines = store.invalid_lines_after(FILE_STREAM, held, DEAD_LETTER_PAGE).await?;
            let Some(last) = lines.last() else { break };
            held = Some(last.position);
            let mut out = Vec::new();
            for line in &lines {
                let record = serde_json::json!({
                    "segment": line.segment,
                    "offset": line.segment_offset,
                    "position": line.position,
                    "error": line.error,
                    "line": line.line,
                });
                serde_json::to_writer(&mut out, &record)?;
                out.push(b'\n');
            }
            tokio::task::block_in_place(|| {
                use std::os::unix::fs::FileExt;
                file.write_all_at(&out, end)?;
                file.sync_data()
            })
            .with_context(|| format!("cannot write {}", self.path.display()))?;
            end += out.len() as u64;
            written += lines.len() as u64;
        }
        Ok(written)
    }

    /// The file, created durably if new, under an exclusive lock (released when it is closed).
    fn open_locked(&self) -> anyhow::Result<std::fs::File> {
        let created = !self.path.exists();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(&self.path)
            .with_context(|| format!("cannot open the dead-letter file {}", self.path.display()))?;
        if created {
            if let Some(dir) = self.path.parent() {
                crate::fsutil::sync_dir(dir).with_context(|| format!("cannot sync {}", dir.display()))?;
            }
        }
        file.lock().with_context(|| format!("cannot lock {}", self.path.display()))?;
        Ok(file)
    }
}

/// The position of the file's last record (`None`: no record). Bytes after the last newline (a write
/// cut short by a full disk) are cut off first; `end` becomes the file's length after that.
fn last_record(file: &std::fs::File, end: &mut u64) -> anyhow::Result<Option<u64>> {
    use std::os::unix::fs::FileExt;
    let mut window = 64 * 1024u64;
    loop {
        let len = *end;
        let from = len.saturating_sub(window);
        let mut tail = vec![0u8; (len - from) as usize];
        file.read_exact_at(&mut tail, from)?;
        let whole = tail.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if whole == 0 && from > 0 {
            window *= 4;
            continue;
        }
        if from + (whole as u64) < len {
            let cut = from + whole as u64;
            tracing::warn!(at = cut, dropped = len - cut, "cutting an incomplete last record off the dead-letter file");
            file.set_len(cut)?;
            file.sync_data()?;
            *end = cut;
        }
        // The last whole line that is a record with a position (lines cut at the window's start are
        // never taken: each candidate starts after a newline or at the file's start).
        let lines: Vec<&[u8]> = tail[..whole].split(|&b| b == b'\n').collect();
        let usable = if from == 0 { &lines[..] } else { &lines[1.min(lines.len())..] };
        for line in usable.iter().rev() {
            if line.is_empty() {
                continue;
            }
            if let Ok(record) = serde_json::from_slice::<serde_json::Value>(line) {
                if let Some(position) = record.get("position").and_then(|p| p.as_u64()) {
                    return Ok(Some(position));
                }
            }
        }
        if from == 0 {
            return Ok(None);
        }
        window *= 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Total;
    use std::collections::BTreeMap;

    #[test]
    fn split_at_lines_covers_the_data_and_cuts_after_newlines() {
        let data = b"aaa\nbb\n\ncccccc\nd\n".repeat(7);
        for n in 1..=8 {
            let ranges = split_at_lines(&data, n);
            assert!(ranges.len() <= n);
            assert_eq!(ranges.first().unwrap().0, 0);
            assert_eq!(ranges.last().unwrap().1, data.len());
            for pair in ranges.windows(2) {
                assert_eq!(pair[0].1, pair[1].0, "{ranges:?}");
                assert_eq!(data[pair[0].1 - 1], b'\n', "{ranges:?}");
            }
        }
        // No newline at all: one range.
        assert_eq!(split_at_lines(b"abc", 4), vec![(0, 3)]);
    }

    /// A chunk of more than a MiB, mixing canonical lines, lines only the general parser takes (escaped
    /// userId, whitespace, exponent), blank and invalid lines.
    fn mixed_chunk() -> Chunk {
        mixed_chunk_and_totals().0
    }

    /// [`mixed_chunk`] and the totals its lines must give, in hundredths, kept here from the numbers each
    /// line is written with (integer arithmetic: no eps code, no decimal type).
    fn mixed_chunk_and_totals() -> (Chunk, BTreeMap<String, i128>) {
        let mut data = Vec::new();
        let mut want = BTreeMap::<String, i128>::new();
        for i in 0..40_000u64 {
            let (line, change) = match i % 10 {
                0 => (
                    format!(r#"{{"userId":"we\"ird{}","name":"add_revenue","value":1.5}}"#, i % 3),
                    Some((format!("we\"ird{}", i % 3), 150)),
                ),
                1 => (
                    format!(r#"{{ "userId": "user{}", "name": "subtract_revenue", "value": 2e-1 }}"#, i % 101),
                    Some((format!("user{}", i % 101), -20)),
                ),
                2 if i % 1000 == 2 => ("not json".to_string(), None),
                3 if i % 1000 == 3 => ("   ".to_string(), None),
                _ => (
                    format!(
                        r#"{{"userId":"user{}","name":"add_revenue","value":{}.{:02},"id":"r-{i}","ts":1}}"#,
                        i % 101,
                        i % 7,
                        i % 100
                    ),
                    Some((format!("user{}", i % 101), i128::from(i % 7) * 100 + i128::from(i % 100))),
                ),
            };
            data.extend_from_slice(line.as_bytes());
            data.push(b'\n');
            if let Some((user, hundredths)) = change {
                *want.entry(user).or_default() += hundredths;
            }
        }
        assert!(data.len() > PARALLEL_MIN_BYTES);
        let start = 1_000;
        let chunk =
            Chunk { start, end: start + data.len() as u64, segment: segment_name_for_test(), segment_base: 0, data };
        (chunk, want)
    }

    /// A total's text (plain, at most two decimal places in these tests) in hundredths, parsed here.
    fn hundredths(text: &str) -> i128 {
        let (sign, digits) = text.strip_prefix('-').map_or((1, text), |rest| (-1, rest));
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        assert!(frac.len() <= 2 && !int.is_empty(), "{text:?}");
        sign * format!("{int}{frac:0<2}").parse::<i128>().unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    fn in_hundredths(totals: Vec<(String, Total)>) -> BTreeMap<String, i128> {
        totals.into_iter().map(|(u, t)| (u, hundredths(&t.to_string()))).collect()
    }

    fn segment_name_for_test() -> String {
        crate::log::segment_name(0)
    }

    fn sorted(part: &PartSums<'_>) -> Vec<(String, Total)> {
        let mut v: Vec<_> = part.sums.iter().map(|(u, s)| (u.to_string(), s.clone().total())).collect();
        v.sort();
        v
    }

    #[test]
    fn parallel_sums_equal_one_pass() {
        let (chunk, want) = mixed_chunk_and_totals();
        let parallel = summarize(&chunk);
        let single = sum_part(&chunk.data, chunk.start);
        // Against totals kept from the input's numbers (not against sum_part alone, which summarize calls:
        // a fault in it would be on both sides).
        assert_eq!(in_hundredths(sorted(&parallel)), want);
        assert_eq!(in_hundredths(sorted(&single)), want);
        assert_eq!(sorted(&parallel), sorted(&single));
        assert_eq!(parallel.events, single.events);
        assert_eq!(parallel.events, 40_000 - 40 - 40, "every line but the invalid and the blank ones");
        let positions = |p: &PartSums<'_>| p.invalid.iter().map(|(pos, _, _)| *pos).collect::<Vec<_>>();
        assert_eq!(positions(&parallel), positions(&single));
        assert_eq!(parallel.invalid.len(), 40);
        // The escaped userId is summed under its unescaped text.
        let weird = sorted(&single).into_iter().find(|(u, _)| u == "we\"ird0").unwrap();
        assert_eq!(weird.1.to_string(), "2001", "1334 times 1.5");
    }

    #[test]
    fn a_transaction_gathers_chunks_until_full() {
        let (chunk, want) = mixed_chunk_and_totals();
        let mut pending = Pending::new(chunk.start);
        assert!(!pending.is_full(usize::MAX));
        pending.absorb(&chunk);
        let next = Chunk { start: chunk.end, end: chunk.end + chunk.data.len() as u64, ..mixed_chunk() };
        pending.absorb(&next);
        assert!(pending.is_full(chunk.data.len() * 2));
        assert!(!pending.is_full(chunk.data.len() * 2 + 1));
        let (batch, users) = pending.into_batch();
        assert_eq!((batch.from, batch.to), (chunk.start, next.end));
        assert_eq!(batch.events, 2 * (40_000 - 80));
        assert_eq!(batch.invalid.len(), 80);
        assert_eq!(users.len(), batch.deltas.len());
        // The same chunk twice: every total doubled, against totals kept from the input's numbers.
        let doubled: BTreeMap<String, i128> = want.into_iter().map(|(u, h)| (u, 2 * h)).collect();
        assert_eq!(in_hundredths(batch.deltas.clone()), doubled);
    }
}
