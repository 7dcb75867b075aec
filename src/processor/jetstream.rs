//! `eps process --log nats://…`: applies the JetStream log to PostgreSQL, exactly once, with any number
//! of processors sharing the stream's partitions.
//!
//! Ownership ([`crate::processor::ownership`]): processors share the stream's partitions through
//! advisory locks in one PostgreSQL session each. Every `--rebalance-ms` a processor computes its share,
//! `ceil(partitions / members)`, releases partitions above it and tries to lock free ones below it. A
//! processor that dies loses its session, PostgreSQL releases its locks, and the survivors lock the
//! partitions at their next rebalance: takeover takes one rebalance interval plus the reading of the
//! de-duplication window (below) after PostgreSQL ended the session. A processor whose session ended
//! finds out at its next rebalance, drops all its partitions and joins again.
//!
//! Exactly once: for each owned partition a reader task follows the partition's subject from its
//! checkpoint (an ordered pull consumer: no acknowledgements, nothing stored in JetStream on our
//! behalf). The main loop sums what arrived per partition and commits, per partition, the sums and the
//! partition's new stream sequence in ONE transaction, compare-and-set on the old sequence
//! ([`Store::commit`], the same rule as the file log). The lock only divides the work; correctness never
//! depends on it: a processor that still believes it owns a partition another one took fails its
//! compare-and-set and starts again from the committed sequence.
//!
//! De-duplication (what JetStream's window does not cover): JetStream drops a re-published message
//! whose `Nats-Msg-Id` it saw within the stream's duplicate window. The processor also drops an event
//! whose `id` it finds earlier in the same partition, in the messages of the previous
//! `--dedup-window-messages` stream sequences (at most `--dedup-max-ids` ids per partition, the oldest
//! messages forgotten first). That catches the same event sent again inside a differently made message
//! (another batch size, `/liveEvent` instead of `/events`). The rule depends only on the stream's
//! content, so every processor decides the same: a new owner reads the window's messages before its
//! checkpoint before it applies anything.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;

use crate::backoff::Backoff;
use crate::error::ConfigError;
use crate::log::nats::{ensure_stream, jetstream_context, stream_identity, NatsLogOptions, StreamError};
use crate::log::nats_promise::{Promise, SyncSetting};
use crate::log::{id_key, reader::lines_of, IdKeyHasher};
use crate::processor::ownership::Membership;
pub use crate::processor::ownership::{
    idle_session_timeout, IDLE_SESSION_TIMEOUT_MIN, SERVER_GIVES_UP_AFTER, SERVER_KEEPALIVE_COUNT,
    SERVER_KEEPALIVE_IDLE, SERVER_KEEPALIVE_INTERVAL, SERVER_USER_TIMEOUT,
};
use crate::processor::stop::{self, Stop};
use crate::processor::{
    bind_log_identity, count_users, excerpt, open_store, parse_line, user_digest, with_retry, ExactSum,
    IdentityMismatch, ProcessOptions, ProcessSummary, MAX_INVALID_PER_COMMIT, MAX_USERS_COUNTED,
    MAX_USERS_PER_PARTITION_COMMIT,
};
use crate::store::{Batch, CommitOutcome, InvalidLine, LostRange, Store, StoreError};

#[derive(Debug, Clone)]
pub struct JetStreamProcessOptions {
    /// `database_url` must name PostgreSQL; `batch_bytes` bounds a round (at most 64 MiB of messages);
    /// `poll_interval` is how long a round waits for more messages before it commits.
    pub process: ProcessOptions,
    pub nats: NatsLogOptions,
    /// How often ownership is checked: the longest a dead processor's partitions wait for a new owner.
    pub rebalance_interval: Duration,
    /// The processor's de-duplication window, in stream sequences.
    pub dedup_window_messages: u64,
    /// Most event ids the window holds per partition.
    pub dedup_max_ids: usize,
}

/// Defaults of [`JetStreamProcessOptions`], shared with the command line's flags.
pub const DEFAULT_REBALANCE_INTERVAL: Duration = Duration::from_millis(500);
pub const DEFAULT_DEDUP_WINDOW_MESSAGES: u64 = 16_384;
pub const DEFAULT_DEDUP_MAX_IDS: usize = 100_000;

impl JetStreamProcessOptions {
    pub fn new(process: ProcessOptions, nats: NatsLogOptions) -> Self {
        JetStreamProcessOptions {
            process,
            nats,
            rebalance_interval: DEFAULT_REBALANCE_INTERVAL,
            dedup_window_messages: DEFAULT_DEDUP_WINDOW_MESSAGES,
            dedup_max_ids: DEFAULT_DEDUP_MAX_IDS,
        }
    }
}

/// What a JetStream run did; printed by `eps process`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JetStreamSummary {
    pub base: ProcessSummary,
    /// Events dropped by the processor's own de-duplication rule.
    pub duplicates: u64,
    /// Partitions owned when the run ended.
    pub partitions_owned: Vec<u32>,
}

impl std::fmt::Display for JetStreamSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = &self.base;
        let secs = b.elapsed.as_secs_f64();
        let rate = if secs > 0.0 { b.events_applied as f64 / secs } else { 0.0 };
        write!(
            f,
            "applied {} events for {}{} users, {} invalid lines, {} duplicates dropped, {} conflicts, in {:.2}s \
             ({:.0} events/s); partitions owned at the end: {:?}",
            b.events_applied,
            if b.users_over { "over " } else { "" },
            b.users_touched,
            b.invalid_lines,
            self.duplicates,
            b.conflicts,
            secs,
            rate,
            self.partitions_owned
        )
    }
}

/// The checkpoint name of one partition.
pub fn checkpoint_name(stream: &str, partition: u32) -> String {
    format!("{}/{partition}", identity_scope(stream))
}

/// What the store binds every partition's checkpoint of `stream` to an identity under.
pub fn identity_scope(stream: &str) -> String {
    format!("jetstream/{stream}")
}

pub async fn run(
    opts: JetStreamProcessOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<JetStreamSummary> {
    let url = match opts.process.database_url.as_deref() {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => url.to_string(),
        _ => {
            return Err(ConfigError(
                "the JetStream log needs --database-url postgres://…: processors share its partitions through \
                 PostgreSQL (advisory locks) and commit each partition's position there"
                    .into(),
            )
            .into())
        }
    };
    if opts.nats.partitions == 0 {
        return Err(ConfigError("--nats-partitions must be at least 1".into()).into());
    }
    stop::until(shutdown, |stop| async move {
        let Some(store) = open_store(&opts.process, &stop).await? else { return Ok(JetStreamSummary::default()) };
        let js = tokio::select! {
            js = jetstream_context(&opts.nats, "eps process") => js?,
            () = stop.requested() => return Ok(JetStreamSummary::default()),
        };
        let mut processor = Processor::new(opts, url, store, js, stop);
        processor.run().await
    })
    .await
}

/// A partition this processor owns: its reader task and what the reader has summed so far.
struct Owned {
    /// Committed stream sequence: every message of the partition up to it is applied.
    checkpoint: u64,
    reader: tokio::task::JoinHandle<()>,
    shared: Arc<Shared>,
    /// Without --follow: the partition's last sequence when it was taken; done once committed.
    target: u64,
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// What a partition's reader shares with the main loop. The reader parses and sums each message as
/// it arrives (readers run on every core); the main loop takes the batch when it commits.
struct Shared {
    state: std::sync::Mutex<PartitionState>,
    /// The partition's committed checkpoint, as the main loop last committed it.
    committed: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct PartitionState {
    batch: PartitionBatch,
    /// Messages of the partition after the last one read, as JetStream counted.
    lag: u64,
    /// Events dropped by the de-duplication window since the main loop last looked.
    duplicates: u64,
    /// Stream sequences removed before they were read (retention, a purge), found since the main loop
    /// last looked: (first, last), inclusive.
    lost: Vec<(u64, u64)>,
    /// Set when the reader found the stream is no longer the one the checkpoints count: the processor
    /// stops with it.
    fatal: Option<String>,
}

/// What one partition has gathered since its last commit.
#[derive(Default)]
struct PartitionBatch {
    /// Stream sequence of the last message summed (the checkpoint while nothing is).
    to: u64,
    sums: HashMap<String, ExactSum, foldhash::fast::RandomState>,
    events: u64,
    invalid: Vec<InvalidLine>,
}

impl PartitionBatch {
    /// Whether the reader should wait for a commit before summing more (bounds memory).
    fn is_full(&self) -> bool {
        self.sums.len() >= MAX_USERS_PER_PARTITION_COMMIT || self.invalid.len() >= MAX_INVALID_PER_COMMIT
    }
}

struct Processor {
    opts: JetStreamProcessOptions,
    database_url: String,
    store: Arc<dyn Store>,
    js: jetstream::Context,
    stream: Option<stream::Stream>,
    /// The stream's identity the checkpoints are bound to (set once bound).
    identity: Option<String>,
    /// When idle partitions' checkpoints were last moved past other partitions' messages.
    last_idle_advance: Instant,
    /// Lost ranges this process reported.
    lost_reported: HashSet<(u64, u64)>,
    membership: Option<Membership>,
    owned: BTreeMap<u32, Owned>,
    /// Signalled by a reader when it has summed something.
    work: Arc<tokio::sync::Notify>,
    summary: JetStreamSummary,
    users: HashSet<u64>,
    /// Without --follow: set once this run has taken every partition it could.
    took_partitions: bool,
    /// The shutdown request, watched by every wait and retry loop.
    stop: Stop,
}

impl Processor {
    fn new(
        opts: JetStreamProcessOptions,
        database_url: String,
        store: Arc<dyn Store>,
        js: jetstream::Context,
        stop: Stop,
    ) -> Self {
        Processor {
            opts,
            database_url,
            store,
            js,
            stream: None,
            identity: None,
            last_idle_advance: Instant::now(),
            lost_reported: HashSet::new(),
            membership: None,
            owned: BTreeMap::new(),
            work: Arc::new(tokio::sync::Notify::new()),
            summary: JetStreamSummary::default(),
            users: HashSet::new(),
            took_partitions: false,
            stop,
        }
    }

    async fn run(&mut self) -> anyhow::Result<JetStreamSummary> {
        let stop = self.stop.clone();
        let shutdown = stop.requested();
        tokio::pin!(shutdown);
        let started = Instant::now();
        let mut next_rebalance = Instant::now();
        loop {
            if Instant::now() >= next_rebalance {
                tokio::select! {
                    result = self.rebalance() => result?,
                    () = &mut shutdown => break,
                }
                next_rebalance = Instant::now() + self.opts.rebalance_interval;
            }
            if !self.opts.process.follow {
                if self.took_partitions && self.owned.values().all(|o| o.checkpoint >= o.target) {
                    break;
                }
                if !self.took_partitions && started.elapsed() > self.opts.process.retry_for {
                    anyhow::bail!(
                        "JetStream or PostgreSQL did not answer for {:?}: nothing was applied",
                        self.opts.process.retry_for
                    );
                }
            }
            tokio::select! {
                () = self.work.notified() => {}
                () = tokio::time::sleep_until(next_rebalance.into()) => continue,
                () = &mut shutdown => break,
            }
            // Let the readers sum what else arrives within the poll interval, then commit it all.
            tokio::time::sleep(self.opts.process.poll_interval).await;
            self.commit().await?;
        }
        self.commit().await?;
        if !self.opts.process.follow && !self.stop.is_requested() {
            // Leave the idle partitions' checkpoints at the stream's end, so the next run tells a
            // removed message of theirs from other partitions' (see `advance_idle`).
            self.advance_idle(true).await?;
        }
        self.summary.base.users_touched = self.users.len() as u64;
        self.summary.base.elapsed = started.elapsed();
        self.summary.partitions_owned = self.owned.keys().copied().collect();
        Ok(self.summary.clone())
    }

    /// Commits every partition's batch, each in its own transaction, all at once.
    async fn commit(&mut self) -> anyhow::Result<()> {
        let stream = &self.opts.nats.stream;
        let mut work = Vec::new();
        let mut duplicates = 0;
        let mut lost = Vec::new();
        for (&partition, owned) in self.owned.iter_mut() {
            let taken = {
                let mut state = owned.shared.state.lock().expect("partition state");
                if let Some(why) = state.fatal.take() {
                    return Err(anyhow::anyhow!(why));
                }
                lost.extend(state.lost.drain(..).map(|range| (partition, range)));
                duplicates += std::mem::take(&mut state.duplicates);
                if state.batch.to <= owned.checkpoint {
                    continue;
                }
                let to = state.batch.to;
                std::mem::replace(&mut state.batch, PartitionBatch { to, ..Default::default() })
            };
            let deltas = taken.sums.into_iter().map(|(user, sum)| (user, sum.total())).collect();
            let batch =
                Batch { from: owned.checkpoint, to: taken.to, deltas, events: taken.events, invalid: taken.invalid };
            work.push((partition, checkpoint_name(stream, partition), batch));
        }
        self.summary.duplicates += duplicates;
        metrics::counter!("eps_processor_duplicates_total").increment(duplicates);
        let mut by_range: BTreeMap<(u64, u64), Vec<u32>> = BTreeMap::new();
        for (partition, range) in lost {
            by_range.entry(range).or_default().push(partition);
        }
        for ((first, last), partitions) in by_range {
            self.report_lost(&partitions, first, last).await?;
        }
        if work.is_empty() {
            return Ok(());
        }
        let store = &self.store;
        let process = &self.opts.process;
        let stop = &self.stop;
        let commits = futures::future::join_all(work.iter().map(|(_, name, batch)| async move {
            let started = Instant::now();
            let outcome = with_retry(process, stop, || store.commit(name, batch)).await;
            metrics::histogram!("eps_processor_commit_duration_seconds").record(started.elapsed().as_secs_f64());
            outcome
        }));
        // A long commit (a slow database, retries) must not make the membership session look idle.
        let outcomes = match &self.membership {
            Some(membership) => membership.kept_busy_during(self.opts.rebalance_interval, commits).await,
            None => commits.await,
        };
        let mut restart = Vec::new();
        for ((partition, _, batch), outcome) in work.into_iter().zip(outcomes) {
            let Some(outcome) = outcome? else {
                // Stopping while the database is away: this batch was not committed; the next owner
                // reads it again from the checkpoint.
                tracing::warn!(
                    partition,
                    "shutdown while the database is away: the partition's batch was not committed"
                );
                continue;
            };
            match outcome {
                CommitOutcome::Committed => {
                    metrics::counter!("eps_processor_commits_total").increment(1);
                    metrics::counter!("eps_processor_events_applied_total").increment(batch.events);
                    metrics::counter!("eps_processor_invalid_lines_total").increment(batch.invalid.len() as u64);
                    for line in &batch.invalid {
                        tracing::warn!(subject = %line.segment, line = line.segment_offset, error = %line.error,
                            "invalid line in the stream: not applied, recorded in eps_invalid_lines");
                    }
                    self.summary.base.events_applied += batch.events;
                    self.summary.base.invalid_lines += batch.invalid.len() as u64;
                    self.summary.base.batches += 1;
                    let users = batch.deltas.iter().map(|(u, _)| user_digest(u));
                    count_users(&mut self.users, users, MAX_USERS_COUNTED, &mut self.summary.base.users_over);
                    if let Some(owned) = self.owned.get_mut(&partition) {
                        owned.checkpoint = batch.to;
                        owned.shared.committed.store(batch.to, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                CommitOutcome::Conflict { current } => {
                    // Another processor committed this partition meanwhile (it took it over while this
                    // one still held it): nothing was written; read again from where it stands.
                    tracing::warn!(partition, current, "partition committed by another processor; reading it again");
                    metrics::counter!("eps_processor_conflicts_total").increment(1);
                    self.summary.base.conflicts += 1;
                    restart.push((partition, current));
                }
            }
        }
        for (partition, checkpoint) in restart {
            if let Some(target) = self.owned.get(&partition).map(|o| o.target) {
                self.start_partition(partition, checkpoint, target);
            }
        }
        self.record_gauges();
        Ok(())
    }

    /// Messages of the stream removed before this partition read them: reported loudly (error log,
    /// metrics) and recorded once in the store for `eps status`. Processing goes on: halting would
    /// halt every user, and what was removed cannot come back.
    ///
    /// nats-server does not tell which subjects removed messages were on: every partition whose
    /// checkpoint was before them reports the range (one report per range, naming the partitions).
    /// Partitions that a running processor follows have their checkpoints moved past other partitions'
    /// messages ([`Self::advance_idle`]), so mostly only the partitions that had unapplied messages
    /// there report it.
    async fn report_lost(&mut self, partitions: &[u32], first: u64, last: u64) -> anyhow::Result<()> {
        let mut new = false;
        for &partition in partitions {
            let lost = LostRange {
                scope: identity_scope(&self.opts.nats.stream),
                partition,
                first,
                last,
                identity: self.identity.clone().unwrap_or_default(),
            };
            let Some(recorded) = with_retry(&self.opts.process, &self.stop, || self.store.record_lost(&lost)).await?
            else {
                return Ok(());
            };
            new |= recorded;
        }
        // Readers find a range at slightly different times: one report per range and process.
        if new && self.lost_reported.insert((first, last)) {
            tracing::error!(
                stream = %self.opts.nats.stream, partitions = ?partitions, first_sequence = first, last_sequence = last,
                "LOST: stream sequences {first}..={last} were removed from the stream (retention limits, a purge) before \
                 they were applied; the events of partitions {partitions:?} (and of any other partition that finds the range) among them are lost. Recorded (eps status); \
                 processing goes on"
            );
            metrics::counter!("eps_jetstream_lost_ranges_total").increment(1);
            metrics::counter!("eps_jetstream_lost_sequences_total").increment(last - first + 1);
            metrics::gauge!("eps_jetstream_lost_last_sequence").set(last as f64);
        }
        Ok(())
    }

    /// Moves the checkpoint of each owned partition that has nothing to apply past the stream's later
    /// messages (other partitions'), so a checkpoint trails the stream only by its own partition's
    /// unapplied messages: retention removing other partitions' messages is then never taken for a
    /// loss of this one's. The stream's last sequence is read first, then the partition's last
    /// message: if that is at or before the checkpoint, no message of the partition lies between the
    /// checkpoint and that last sequence.
    async fn advance_idle(&mut self, now: bool) -> anyhow::Result<()> {
        if !now && self.last_idle_advance.elapsed() < IDLE_ADVANCE_EVERY {
            return Ok(());
        }
        self.last_idle_advance = Instant::now();
        let idle: Vec<u32> = self
            .owned
            .iter()
            .filter(|(_, o)| {
                let state = o.shared.state.lock().expect("partition state");
                state.batch.to == o.checkpoint && state.batch.events == 0 && state.batch.invalid.is_empty()
            })
            .map(|(&p, _)| p)
            .collect();
        let Some(mut stream) = self.stream.clone() else { return Ok(()) };
        if idle.is_empty() {
            return Ok(());
        }
        let Ok(info) = stream.info().await else { return Ok(()) };
        let last = info.state.last_sequence;
        for partition in idle {
            let Some(checkpoint) = self.owned.get(&partition).map(|o| o.checkpoint) else { continue };
            if last <= checkpoint {
                continue;
            }
            match stream.get_last_raw_message_by_subject(&self.opts.nats.subject(partition)).await {
                Ok(message) if message.sequence > checkpoint => continue, // the reader has it to apply
                Ok(_) => {}
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {}
                Err(_) => continue,
            }
            let batch = Batch { from: checkpoint, to: last, ..Default::default() };
            let name = checkpoint_name(&self.opts.nats.stream, partition);
            let Some(outcome) = with_retry(&self.opts.process, &self.stop, || self.store.commit(&name, &batch)).await?
            else {
                return Ok(());
            };
            match outcome {
                CommitOutcome::Committed => {
                    if let Some(owned) = self.owned.get_mut(&partition) {
                        owned.checkpoint = last;
                        owned.shared.committed.store(last, std::sync::atomic::Ordering::Relaxed);
                        let mut state = owned.shared.state.lock().expect("partition state");
                        // A message the reader summed meanwhile is after `last`: keep its end.
                        if state.batch.to < last {
                            state.batch.to = last;
                        }
                    }
                }
                CommitOutcome::Conflict { current } => {
                    metrics::counter!("eps_processor_conflicts_total").increment(1);
                    self.summary.base.conflicts += 1;
                    if let Some(target) = self.owned.get(&partition).map(|o| o.target) {
                        self.start_partition(partition, current, target);
                    }
                }
            }
        }
        Ok(())
    }

    fn record_gauges(&self) {
        metrics::gauge!("eps_processor_partitions_owned").set(self.owned.len() as f64);
        let lag: u64 = self.owned.values().map(|o| o.shared.state.lock().map_or(0, |s| s.lag)).sum();
        metrics::gauge!("eps_processor_lag_messages").set(lag as f64);
    }

    /// Joins (or re-joins) the processors, then takes or gives back partitions toward this one's share.
    async fn rebalance(&mut self) -> anyhow::Result<()> {
        if self.stream.is_none() {
            match ensure_stream(&self.js, &self.opts.nats).await {
                Ok(stream) => {
                    tracing::info!(stream = %self.opts.nats.stream, "JetStream stream ready");
                    let promise = promise_of(&self.js, &self.opts.nats, stream.cached_info().config.num_replicas);
                    // A processor acknowledges nothing: a contradicted declaration is said, not refused.
                    if promise.sync == SyncSetting::Contradicted {
                        tracing::error!("{}", promise.line());
                    } else {
                        tracing::info!("{}", promise.line());
                    }
                    self.stream = Some(stream)
                }
                // Another partition count, limits, storage…: this processor would read the stream
                // wrongly. Refuse to start, with both values.
                Err(StreamError::Mismatch(why)) => return Err(ConfigError(why).into()),
                Err(e) => {
                    tracing::warn!(error = %e, "JetStream unavailable; retrying");
                    return Ok(());
                }
            }
        }
        if self.identity.is_none() {
            // The checkpoints count one stream: refuse another (deleted and recreated, or
            // recreated with another partition count) instead of reading it from sequences that mean
            // nothing in it.
            let mut stream = self.stream.clone().expect("stream ready");
            let info = match stream.info().await {
                Ok(info) => info.clone(),
                Err(e) => {
                    tracing::warn!(error = %e, "JetStream unavailable; retrying");
                    self.stream = None;
                    return Ok(());
                }
            };
            let identity = stream_identity(&info, self.opts.nats.partitions);
            let scope = identity_scope(&self.opts.nats.stream);
            let first = info.state.first_sequence.saturating_sub(1);
            let bound =
                bind_log_identity(&self.opts.process, &self.stop, &*self.store, &scope, &identity, first).await?;
            if bound.is_none() {
                return Ok(()); // shutting down
            }
            self.identity = Some(identity);
        }
        if self.membership.is_none() {
            let idle = idle_session_timeout(self.opts.rebalance_interval, self.opts.process.poll_interval);
            match Membership::join(&self.database_url, &self.opts.nats.stream, idle).await {
                Ok(m) => {
                    tracing::info!(slot = m.slot, "joined the processors of the stream");
                    self.membership = Some(m);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot join the processors through PostgreSQL; retrying");
                    return Ok(());
                }
            }
        }
        self.advance_idle(false).await?;
        match self.balance_once().await {
            Ok(()) => {}
            Err(e) => {
                // The membership session is gone, and with it every lock: stop all partitions (their
                // uncommitted sums are dropped; whoever owns them next reads from the checkpoint).
                tracing::warn!(error = %e, "lost the PostgreSQL session that holds the partitions; rejoining");
                self.membership = None;
                self.owned.clear();
            }
        }
        self.record_gauges();
        Ok(())
    }

    async fn balance_once(&mut self) -> Result<(), StoreError> {
        let membership = self.membership.take().expect("joined");
        self.balance_with(&membership).await?;
        self.membership = Some(membership);
        self.took_partitions = true;
        Ok(())
    }

    async fn balance_with(&mut self, membership: &Membership) -> Result<(), StoreError> {
        let partitions = self.opts.nats.partitions;
        // Asked on every rebalance, also by a one-shot run that already owns everything.
        let share = membership.share(partitions, self.opts.process.follow).await?;
        // Give back the highest partitions above the share (their batches were just committed).
        while self.owned.len() > share as usize {
            let (&partition, _) = self.owned.iter().next_back().expect("not empty");
            self.owned.remove(&partition);
            membership.release(partition).await?;
            tracing::info!(partition, share, "gave a partition back to spread the work");
        }
        for partition in membership.candidates(partitions) {
            if self.owned.len() >= share as usize {
                break;
            }
            if self.owned.contains_key(&partition) || !membership.try_own(partition).await? {
                continue;
            }
            let name = checkpoint_name(&self.opts.nats.stream, partition);
            let checkpoint = match with_retry(&self.opts.process, &self.stop, || self.store.progress(&name)).await {
                Ok(Some(progress)) => progress.position,
                Ok(None) => {
                    membership.release(partition).await?;
                    return Err(StoreError::Unavailable("shutdown requested".into()));
                }
                Err(e) => {
                    membership.release(partition).await?;
                    return Err(StoreError::Unavailable(e.to_string()));
                }
            };
            let target = if self.opts.process.follow { u64::MAX } else { self.last_sequence(partition).await? };
            tracing::info!(partition, checkpoint, "took a partition");
            metrics::counter!("eps_processor_partitions_taken_total").increment(1);
            self.start_partition(partition, checkpoint, target);
        }
        Ok(())
    }

    /// The partition's last stream sequence now (0 when it holds nothing).
    async fn last_sequence(&self, partition: u32) -> Result<u64, StoreError> {
        let stream = self.stream.as_ref().expect("stream ready");
        match stream.get_last_raw_message_by_subject(&self.opts.nats.subject(partition)).await {
            Ok(message) => Ok(message.sequence),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(0),
            Err(e) => Err(StoreError::Unavailable(format!("JetStream: {e}"))),
        }
    }

    /// (Re)starts the partition's reader from its checkpoint, first reading the de-duplication window.
    fn start_partition(&mut self, partition: u32, checkpoint: u64, target: u64) {
        let from = checkpoint.saturating_sub(self.opts.dedup_window_messages.saturating_sub(1)).max(1);
        let shared = Arc::new(Shared {
            state: std::sync::Mutex::new(PartitionState {
                batch: PartitionBatch { to: checkpoint, ..Default::default() },
                ..Default::default()
            }),
            committed: std::sync::atomic::AtomicU64::new(checkpoint),
        });
        let reader = PartitionReader {
            stream: self.stream.clone().expect("stream ready"),
            identity: self.identity.clone().expect("identity bound"),
            partitions: self.opts.nats.partitions,
            partition,
            subject: self.opts.nats.subject(partition),
            checkpoint,
            seen: SeenIds::new(self.opts.dedup_window_messages, self.opts.dedup_max_ids),
            shared: shared.clone(),
            work: self.work.clone(),
        };
        let reader = tokio::spawn(reader.run(from));
        self.owned.insert(partition, Owned { checkpoint, reader, shared, target });
    }
}

/// What `eps status --log nats://…` shows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JetStreamStatus {
    pub stream: String,
    pub replicas: usize,
    pub messages: u64,
    pub bytes: u64,
    /// Processors sharing the stream now (their member locks in PostgreSQL).
    pub processors: u32,
    pub partitions: Vec<PartitionStatus>,
    /// The stream's identity now ([`stream_identity`]).
    pub identity: String,
    /// What an acknowledgement promises: the connected server's version, the replicas, the sync.
    pub promise: Promise,
    /// What the store's checkpoints count, when it is not the stream as it is now: the lags are then
    /// unknown, and the processors refuse the stream until an operator adopts it.
    pub identity_mismatch: Option<String>,
    /// The stream's settings that differ from this command's (partitions, limits…).
    pub settings_mismatches: Vec<String>,
    /// The stream's first sequence: messages before it were removed (retention, a purge).
    pub first_sequence: u64,
    /// Ranges of the stream removed before they were applied, as the processors found and recorded them.
    pub lost: Vec<LostRange>,
    pub users: u64,
    /// The exact sum of all revenues.
    pub total_revenue: crate::money::Total,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionStatus {
    pub partition: u32,
    /// Stream sequence of the last message applied (0: none).
    pub checkpoint: u64,
    pub events_applied: u64,
    pub invalid_lines: u64,
    /// Messages of the partition after the checkpoint (not yet applied); `None` (unknown) when the
    /// checkpoints count another stream.
    pub lag_messages: Option<u64>,
}

impl std::fmt::Display for JetStreamStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "stream           {} ({} replicas): {} messages, {} bytes",
            self.stream, self.replicas, self.messages, self.bytes
        )?;
        writeln!(f, "identity         {}", self.identity)?;
        writeln!(f, "promise          {}", self.promise.summary)?;
        if let Some(bound) = &self.identity_mismatch {
            writeln!(
                f,
                "MISMATCH         the store's checkpoints count {bound}: the processors refuse this stream until \
                 `eps process --adopt-new-log` (docs/SCALING.md)"
            )?;
        }
        for why in &self.settings_mismatches {
            writeln!(f, "SETTINGS         {why}")?;
        }
        writeln!(f, "processors       {}", self.processors)?;
        writeln!(f, "partition  checkpoint  events applied  invalid lines  lag (messages)")?;
        let unknown = || "unknown".to_string();
        for p in &self.partitions {
            let lag = p.lag_messages.map_or_else(unknown, |l| l.to_string());
            writeln!(
                f,
                "{:>9}  {:>10}  {:>14}  {:>13}  {:>14}",
                p.partition, p.checkpoint, p.events_applied, p.invalid_lines, lag
            )?;
        }
        match self.partitions.iter().map(|p| p.lag_messages).sum::<Option<u64>>() {
            Some(lag) => writeln!(f, "lag              {lag} messages")?,
            None => writeln!(f, "lag              unknown: the checkpoints count another stream")?,
        }
        let mut by_range: BTreeMap<(u64, u64, &str), Vec<u32>> = BTreeMap::new();
        for l in &self.lost {
            by_range.entry((l.first, l.last, &l.identity)).or_default().push(l.partition);
        }
        for ((first, last, identity), partitions) in by_range {
            writeln!(
                f,
                "LOST             stream sequences {first}..={last} removed before partitions {partitions:?} applied them \
                 (of {identity})"
            )?;
        }
        writeln!(f, "users            {}", self.users)?;
        write!(f, "total revenue    {}", self.total_revenue)
    }
}

/// The promise of the server `js` is connected to, for a stream of `replicas`.
fn promise_of(js: &jetstream::Context, nats: &NatsLogOptions, replicas: usize) -> Promise {
    Promise::new(&js.client().server_info().version, &nats.stream, replicas, nats.sync_always)
}

/// Reads the stream, every partition's checkpoint and lag, and the processors' count.
pub async fn status(nats: &NatsLogOptions, database_url: Option<&str>) -> anyhow::Result<JetStreamStatus> {
    let url = match database_url {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => url,
        _ => return Err(ConfigError("eps status --log nats://… needs --database-url postgres://…".into()).into()),
    };
    let store = crate::store::open(Some(url), std::path::Path::new(".")).await?;
    let js = jetstream_context(nats, "eps status").await?;
    let mut stream =
        js.get_stream(&nats.stream).await.map_err(|e| anyhow::anyhow!("JetStream stream {}: {e}", nats.stream))?;
    let info = stream.info().await.map_err(|e| anyhow::anyhow!("JetStream stream {}: {e}", nats.stream))?.clone();
    let identity = stream_identity(&info, nats.partitions);
    let scope = identity_scope(&nats.stream);
    let identity_mismatch = store.log_identity(&scope).await?.filter(|bound| *bound != identity);
    // `eps status` creates nothing and takes no creation settings: it reads with the stream's own
    // replicas, duplicate window and limits, and checks only what names the stream's layout.
    let as_found = NatsLogOptions {
        replicas: info.config.num_replicas,
        duplicate_window: info.config.duplicate_window,
        max_age: info.config.max_age,
        max_bytes: info.config.max_bytes.max(0),
        max_messages: info.config.max_messages.max(0),
        ..nats.clone()
    };
    let settings_mismatches = crate::log::nats::settings_mismatches(&info.config, &as_found);
    let mut partitions = Vec::with_capacity(nats.partitions as usize);
    for partition in 0..nats.partitions {
        let progress = store.progress(&checkpoint_name(&nats.stream, partition)).await?;
        if identity_mismatch.is_some() {
            // Sequences of another stream: what is left here is unknown, not 0.
            partitions.push(PartitionStatus {
                partition,
                checkpoint: progress.position,
                events_applied: progress.events_applied,
                invalid_lines: progress.invalid_lines,
                lag_messages: None,
            });
            continue;
        }
        // An ephemeral consumer from the message after the checkpoint counts what is left.
        let config = consumer::pull::Config {
            filter_subject: nats.subject(partition),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: progress.position + 1 },
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(5),
            memory_storage: true,
            num_replicas: 1,
            ..Default::default()
        };
        let mut consumer = stream.create_consumer(config).await.map_err(|e| anyhow::anyhow!("JetStream: {e}"))?;
        let lag_messages = consumer.info().await.map_err(|e| anyhow::anyhow!("JetStream: {e}"))?.num_pending;
        let name = consumer.cached_info().name.clone();
        let _ = stream.delete_consumer(&name).await;
        partitions.push(PartitionStatus {
            partition,
            checkpoint: progress.position,
            events_applied: progress.events_applied,
            invalid_lines: progress.invalid_lines,
            lag_messages: Some(lag_messages),
        });
    }
    let membership = Membership::observe(url, &nats.stream).await?;
    let processors = membership.members().await?;
    let totals = store.totals().await?;
    Ok(JetStreamStatus {
        stream: info.config.name,
        replicas: info.config.num_replicas,
        messages: info.state.messages,
        bytes: info.state.bytes,
        processors,
        partitions,
        identity,
        promise: promise_of(&js, nats, info.config.num_replicas),
        identity_mismatch,
        settings_mismatches,
        first_sequence: info.state.first_sequence,
        lost: store.lost_ranges(&scope).await?,
        users: totals.users,
        total_revenue: totals.revenue,
    })
}

/// The event id of a log line, if it has one (for the de-duplication window only).
fn event_id(line: &[u8]) -> Option<String> {
    parse_line(Ok(line), "")?.ok()?.id().map(str::to_owned)
}

/// Follows one partition's subject and sums what it reads into the partition's shared batch.
///
/// The consumer is ephemeral, in memory, one replica, without acknowledgements: nothing in JetStream
/// records this processor's position (the checkpoint in PostgreSQL does). Pull requests carry a 1 s idle
/// heartbeat, so a consumer lost with its JetStream node is noticed within seconds and re-made on a live
/// node, from the message after the last one read; a gap in the consumer's own sequence (a delivery
/// lost on the way) re-makes it too.
struct PartitionReader {
    stream: stream::Stream,
    /// The stream identity the checkpoints are bound to ([`stream_identity`]).
    identity: String,
    partitions: u32,
    partition: u32,
    subject: String,
    /// Messages up to this sequence were applied: they only fill the de-duplication window.
    checkpoint: u64,
    seen: SeenIds,
    shared: Arc<Shared>,
    work: Arc<tokio::sync::Notify>,
}

impl PartitionReader {
    async fn run(mut self, from: u64) {
        let partition = self.partition;
        let mut next = from;
        let mut delays = Backoff::new(Duration::from_millis(100), Duration::from_secs(2)).delays();
        // Whether "the stream is gone" was said since the reader last had a consumer.
        let mut gone = false;
        loop {
            let config = consumer::pull::Config {
                filter_subject: self.subject.clone(),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: next },
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                memory_storage: true,
                num_replicas: 1,
                ..Default::default()
            };
            let messages = match self.stream.create_consumer(config).await {
                Ok(consumer) => match self.check_stream(next).await {
                    Ok(()) => consumer
                        .stream()
                        .max_messages_per_batch(READ_BATCH_MESSAGES)
                        .expires(Duration::from_secs(5))
                        .heartbeat(Duration::from_secs(1))
                        .messages()
                        .await
                        .map_err(|e| e.to_string()),
                    Err(Fatal(why)) => {
                        tracing::error!(partition, "{why}");
                        self.shared.state.lock().expect("partition state").fatal = Some(why);
                        self.work.notify_one();
                        return;
                    }
                },
                Err(e) => {
                    if crate::log::nats::is_stream_not_found(&e) && !std::mem::replace(&mut gone, true) {
                        tracing::error!(partition, stream = %self.stream.cached_info().config.name,
                            "the JetStream stream is gone (deleted?); waiting for it (a new stream is refused until adopted)");
                    }
                    Err(e.to_string())
                }
            };
            match messages {
                Ok(mut messages) => {
                    gone = false;
                    let mut consumer_sequence = 0;
                    while let Some(item) = messages.next().await {
                        let message = match item {
                            Ok(message) => message,
                            Err(e) => {
                                tracing::warn!(partition, error = %e, "reading the partition failed; resuming");
                                break;
                            }
                        };
                        let Ok(info) = message.info() else { continue };
                        if info.consumer_sequence != consumer_sequence + 1 {
                            tracing::warn!(partition, "a delivery was lost on the way; resuming");
                            break;
                        }
                        consumer_sequence = info.consumer_sequence;
                        let (seq, pending) = (info.stream_sequence, info.pending);
                        if seq < next {
                            continue;
                        }
                        self.take(seq, pending, &message.payload).await;
                        next = seq + 1;
                        delays.reset();
                    }
                }
                Err(e) => {
                    tracing::warn!(partition, error = %e, retry_in_secs = delays.current().as_secs_f64(), "cannot read the partition; retrying")
                }
            }
            tokio::time::sleep(delays.next_delay()).await;
        }
    }

    /// Run after each consumer is made (so a stream deleted and recreated since is seen): the stream
    /// must still be the one the checkpoints count, or the processor stops. Messages removed before
    /// they were read, between the checkpoint (or `next`, when messages after the checkpoint were read
    /// already) and the stream's first sequence, are handed to the main loop to report. A stream that
    /// does not answer is not judged here (the consumer fails and is made again).
    async fn check_stream(&mut self, next: u64) -> Result<(), Fatal> {
        let mut stream = self.stream.clone();
        let Ok(info) = stream.info().await else { return Ok(()) };
        let identity = stream_identity(info, self.partitions);
        if identity != self.identity {
            return Err(Fatal(
                IdentityMismatch {
                    scope: identity_scope(&info.config.name),
                    bound: self.identity.clone(),
                    found: identity,
                }
                .to_string(),
            ));
        }
        let committed = self.shared.committed.load(std::sync::atomic::Ordering::Relaxed);
        let from = next.max(committed + 1);
        let first = info.state.first_sequence;
        if from < first {
            self.shared.state.lock().expect("partition state").lost.push((from, first - 1));
            self.work.notify_one();
        }
        Ok(())
    }

    /// Sums one message into the shared batch, waiting first while the batch is full. Every valid
    /// event can be summed (totals are exact at any size), so a message never stops the partition.
    async fn take(&mut self, seq: u64, pending: u64, payload: &[u8]) {
        while self.shared.state.lock().expect("partition state").batch.is_full() {
            self.work.notify_one();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut state = self.shared.state.lock().expect("partition state");
        state.lag = pending;
        state.duplicates += absorb(&mut self.seen, &mut state.batch, self.checkpoint, &self.subject, seq, payload);
        drop(state);
        self.work.notify_one();
    }
}

/// Takes message `seq` of a partition in: at or before `checkpoint` it only fills the de-duplication
/// window (it was applied already); after it, its events are summed into `batch`, minus those the
/// window holds. Returns the duplicates dropped.
fn absorb(
    seen: &mut SeenIds,
    batch: &mut PartitionBatch,
    checkpoint: u64,
    subject: &str,
    seq: u64,
    payload: &[u8],
) -> u64 {
    seen.start_message(seq);
    if seq <= checkpoint {
        for (_, line) in lines_of(payload, 0) {
            if let Some(id) = line.ok().and_then(event_id) {
                seen.insert(id_key(&id), seq);
            }
        }
        return 0;
    }
    let mut duplicates = 0;
    for (index, (_, line)) in lines_of(payload, 0).enumerate() {
        let Some(parsed) = parse_line(line, "line without its newline at the end of a message") else { continue };
        match parsed {
            Ok(event) => {
                if let Some(id) = &event.id() {
                    if seen.insert(id_key(id), seq) {
                        duplicates += 1;
                        continue;
                    }
                }
                let delta = event.delta();
                match batch.sums.get_mut(event.user_id()) {
                    Some(slot) => slot.add_decimal(delta),
                    None => {
                        batch.sums.insert(event.user_id().to_owned(), ExactSum::of(delta));
                    }
                }
                batch.events += 1;
            }
            Err((error, line)) => batch.invalid.push(InvalidLine {
                // Unique per line: the message's sequence, then the line's index in it.
                position: (seq << 20) | (index as u64).min(0xF_FFFF),
                segment: subject.to_string(),
                segment_offset: index as u64,
                error,
                line: excerpt(line),
            }),
        }
    }
    batch.to = seq;
    duplicates
}

/// A reason the processor must stop (the stream is not the one the checkpoints count).
struct Fatal(String);

/// How often idle partitions' checkpoints are moved past other partitions' messages.
const IDLE_ADVANCE_EVERY: Duration = Duration::from_secs(1);

/// Messages asked for per pull request.
const READ_BATCH_MESSAGES: usize = 512;

/// The processor's de-duplication window of one partition: the ids in the messages of the last
/// `window` stream sequences, at most `max_ids` of them (the oldest messages forgotten first).
///
/// Before message `seq` is read, the window is the longest run of the partition's latest messages
/// within `(seq - window, seq)` that holds at most `max_ids` ids: a function of the stream alone, so a
/// processor that rebuilt it from `checkpoint - window + 1` decides exactly as one that read everything.
struct SeenIds {
    window: u64,
    max_ids: usize,
    messages: VecDeque<(u64, Vec<u128>)>,
    /// Each id in the window, with the latest message that holds it.
    latest: HashMap<u128, u64, IdKeyHasher>,
    ids: usize,
}

impl SeenIds {
    fn new(window: u64, max_ids: usize) -> SeenIds {
        SeenIds { window, max_ids, messages: VecDeque::new(), latest: HashMap::default(), ids: 0 }
    }

    /// Opens message `seq`: forgets what left the window.
    fn start_message(&mut self, seq: u64) {
        while let Some(&(old, _)) = self.messages.front() {
            if old + self.window > seq && self.ids <= self.max_ids {
                break;
            }
            let (old, ids) = self.messages.pop_front().expect("front exists");
            self.ids -= ids.len();
            for id in ids {
                if self.latest.get(&id) == Some(&old) {
                    self.latest.remove(&id);
                }
            }
        }
        self.messages.push_back((seq, Vec::new()));
    }

    /// Adds an id of the open message; true if the window already held it (a duplicate).
    fn insert(&mut self, id: u128, seq: u64) -> bool {
        let (open, ids) = self.messages.back_mut().expect("a message is open");
        debug_assert_eq!(*open, seq);
        ids.push(id);
        self.ids += 1;
        self.latest.insert(id, seq).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds messages (seq, ids) and returns the duplicates found, in order.
    fn duplicates(seen: &mut SeenIds, messages: &[(u64, &[u128])]) -> Vec<(u64, u128)> {
        let mut found = Vec::new();
        for &(seq, ids) in messages {
            seen.start_message(seq);
            for &id in ids {
                if seen.insert(id, seq) {
                    found.push((seq, id));
                }
            }
        }
        found
    }

    #[test]
    fn the_window_catches_repeats_within_it_and_forgets_older_ones() {
        let mut seen = SeenIds::new(10, 1000);
        let found = duplicates(&mut seen, &[(1, &[1, 2]), (5, &[3, 1]), (9, &[2, 2]), (11, &[1]), (16, &[1, 3])]);
        // 1 again at 5 (within 10 of 1); 2 at 9 twice (seen at 1, then within the message);
        // 1 at 11: last seen at 5, within; at 16: 1 last at 11 (within), 3 last at 5 (16 - 10 = 6 > 5: forgotten).
        assert_eq!(found, vec![(5, 1), (9, 2), (9, 2), (11, 1), (16, 1)]);
    }

    #[test]
    fn the_id_cap_forgets_whole_oldest_messages() {
        let mut seen = SeenIds::new(1_000, 3);
        let found = duplicates(&mut seen, &[(1, &[1, 2]), (2, &[3, 4]), (3, &[1]), (4, &[3])]);
        // At 3 the window (1,2 → 4 ids > 3) drops message 1: id 1 is new again. At 4: window is
        // messages 2 and 3 (3 ids): 3 is a repeat.
        assert_eq!(found, vec![(4, 3)]);
    }

    #[test]
    fn a_rebuilt_window_decides_as_one_that_read_everything() {
        // Messages of one partition at scattered sequences, ids repeating at various distances.
        let messages: Vec<(u64, Vec<u128>)> = (1..400u64)
            .filter(|s| s % 3 != 0)
            .map(|s| (s, vec![u128::from(s % 37), u128::from(s % 11) + 100]))
            .collect();
        let window = 50;
        let all = |seen: &mut SeenIds, from: u64| {
            let list: Vec<(u64, &[u128])> =
                messages.iter().filter(|(s, _)| *s >= from).map(|(s, ids)| (*s, ids.as_slice())).collect();
            duplicates(seen, &list)
        };
        let full = all(&mut SeenIds::new(window, 40), 1);
        for checkpoint in [60u64, 61, 200, 333] {
            let rebuilt = all(&mut SeenIds::new(window, 40), checkpoint - window + 1);
            let after = |v: &Vec<(u64, u128)>| v.iter().filter(|(s, _)| *s > checkpoint).copied().collect::<Vec<_>>();
            assert_eq!(after(&rebuilt), after(&full), "checkpoint {checkpoint}");
            assert!(!after(&full).is_empty());
        }
    }

    #[test]
    fn checkpoint_names_are_per_stream_and_partition() {
        assert_eq!(checkpoint_name("EPS_EVENTS", 3), "jetstream/EPS_EVENTS/3");
    }
}
