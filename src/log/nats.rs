//! The log on NATS JetStream: the scale-out backend of [`EventLog`].
//!
//! One stream (default `EPS_EVENTS`) holds subjects `<prefix>.<partition>` (default `eps.events.0` to
//! `eps.events.15`). An event goes to partition `user_key(userId) % partitions`, so all of a user's events
//! are in one partition, in order. A request's events are grouped by partition and each group is published
//! as one message whose payload is the group's log lines (the file log's line format, JSON Lines), so a
//! batch of 1,000 events costs about as many publishes as there are partitions, not 1,000.
//!
//! Durability: [`EventLog::append`] returns `Ok` only once JetStream has acknowledged every message of the
//! request, that is once the stream has stored it as its replicas and sync settings define.
//!
//! Idempotency: when every event of a group has an id, the message carries `Nats-Msg-Id`, a digest of
//! the group's ids in order. A request sent again (the client resends a batch as the same bytes) makes the
//! same groups with the same ids, and JetStream drops the copy within the stream's duplicate window and
//! answers `duplicate`, which becomes [`Appended::Duplicate`] for each event of the group.
//!
//! Availability: the connection is made in the background and re-made by the client library; until
//! JetStream answers (and after it stops answering), appends fail with [`LogError::Unavailable`], which
//! the server answers 503 with `Retry-After`. The stream is created (or its configuration checked) on the
//! first append that reaches JetStream.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use tokio::sync::OnceCell;

use super::{Appended, EventLog, IdKey, LogBatch, LogError};

#[derive(Debug, Clone)]
pub struct NatsLogOptions {
    /// `nats://host:port` (several servers of a cluster separated by commas).
    pub url: String,
    pub stream: String,
    /// Subjects are `<prefix>.<partition>`.
    pub subject_prefix: String,
    pub partitions: u32,
    /// Copies JetStream keeps of each message (1, 3 or 5 in a cluster).
    pub replicas: usize,
    /// How long JetStream remembers message ids to drop a repeated publish.
    pub duplicate_window: Duration,
    /// How long an append waits for JetStream before it fails (503).
    pub timeout: Duration,
}

impl NatsLogOptions {
    pub fn new(url: impl Into<String>) -> Self {
        NatsLogOptions {
            url: url.into(),
            stream: "EPS_EVENTS".into(),
            subject_prefix: "eps.events".into(),
            partitions: 16,
            replicas: 1,
            duplicate_window: Duration::from_secs(15 * 60),
            timeout: Duration::from_secs(2),
        }
    }

    /// The subject of `partition`.
    pub fn subject(&self, partition: u32) -> String {
        format!("{}.{partition}", self.subject_prefix)
    }

    /// The partition of a user, from its [`super::user_key`].
    pub fn partition_of(&self, user_key: u64) -> u32 {
        (user_key % u64::from(self.partitions.max(1))) as u32
    }
}

/// Whether a URL names a JetStream log.
pub fn is_nats_url(url: &str) -> bool {
    url.starts_with("nats://") || url.starts_with("tls://")
}

pub struct NatsLog {
    js: jetstream::Context,
    opts: NatsLogOptions,
    /// Set once the stream is known to exist with the expected configuration.
    stream_ready: OnceCell<()>,
    /// Set while appends fail, cleared by the next that succeeds (readiness).
    failing: AtomicBool,
}

impl NatsLog {
    /// Starts connecting in the background and returns at once: the server starts whether JetStream is
    /// up or not, and answers 503 until it is. Fails only on a malformed URL or options.
    pub async fn connect(opts: NatsLogOptions) -> anyhow::Result<NatsLog> {
        if opts.partitions == 0 {
            anyhow::bail!("the JetStream log needs at least one partition");
        }
        if opts.stream.is_empty() || opts.stream.contains(['.', ' ', '*', '>']) {
            anyhow::bail!("invalid JetStream stream name {:?}", opts.stream);
        }
        let js = jetstream_context(&opts, "eps server").await?;
        Ok(NatsLog { js, opts, stream_ready: OnceCell::new(), failing: AtomicBool::new(true) })
    }

    pub fn options(&self) -> &NatsLogOptions {
        &self.opts
    }

    async fn ensure_stream(&self) -> Result<(), LogError> {
        ensure_stream(&self.js, &self.opts).await.map(drop)
    }

    async fn publish_all(&self, batch: &LogBatch) -> Result<Vec<Appended>, LogError> {
        // While disconnected the NATS client would queue a publish and send it after reconnecting,
        // possibly long after this request was answered 503: never publish while disconnected. (A connection lost
        // between this check and the acknowledgement can still deliver the message late; the events'
        // ids make the client's retry of it a duplicate JetStream drops.)
        // Waiting for the connection (as long as an acknowledgement may take) covers the start-up and a
        // quick reconnect.
        let client = self.js.client();
        let deadline = tokio::time::Instant::now() + self.opts.timeout;
        while client.connection_state() != async_nats::connection::State::Connected {
            if tokio::time::Instant::now() >= deadline {
                return Err(LogError::Unavailable("not connected to NATS".into()));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.stream_ready.get_or_try_init(|| self.ensure_stream()).await?;

        // Group the events by partition, keeping their order within each.
        let mut groups: Vec<Group> = Vec::new();
        let mut slot_of = vec![usize::MAX; self.opts.partitions as usize];
        let mut group_of_event = Vec::with_capacity(batch.len());
        for (line, id, user) in batch.lines_by_user() {
            let partition = self.opts.partition_of(user);
            let slot = &mut slot_of[partition as usize];
            if *slot == usize::MAX {
                *slot = groups.len();
                groups.push(Group { partition, payload: Vec::new(), ids: Vec::new(), all_have_ids: true });
            }
            let group = &mut groups[*slot];
            group.payload.extend_from_slice(line);
            match id {
                Some(id) => group.ids.push(id),
                None => group.all_have_ids = false,
            }
            group_of_event.push(*slot);
        }

        // Publish every group, then wait for every acknowledgement.
        let mut pending = Vec::with_capacity(groups.len());
        for group in &mut groups {
            let mut headers = async_nats::HeaderMap::new();
            if group.all_have_ids {
                headers.insert("Nats-Msg-Id", message_id(&group.ids).as_str());
            }
            let payload = std::mem::take(&mut group.payload);
            let ack = self
                .js
                .publish_with_headers(self.opts.subject(group.partition), headers, payload.into())
                .await
                .map_err(|e| unavailable("publishing to JetStream", e))?;
            pending.push(ack);
        }
        let mut duplicate = Vec::with_capacity(pending.len());
        for ack in pending {
            let ack = ack.await.map_err(|e| unavailable("JetStream's acknowledgement", e))?;
            duplicate.push(ack.duplicate);
        }
        Ok(group_of_event
            .into_iter()
            .map(|g| if duplicate[g] { Appended::Duplicate } else { Appended::Stored })
            .collect())
    }
}

/// A JetStream context for `opts.url`, connecting in the background (and reconnecting by itself).
pub async fn jetstream_context(opts: &NatsLogOptions, name: &str) -> anyhow::Result<jetstream::Context> {
    let client = async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .connection_timeout(opts.timeout)
        // Several servers of a cluster come as one comma-separated string; the library wants a list.
        .connect(opts.url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect::<Vec<_>>())
        .await
        .map_err(|e| anyhow::anyhow!("cannot use the JetStream URL {}: {e}", opts.url))?;
    let mut js = jetstream::new(client);
    js.set_timeout(opts.timeout);
    Ok(js)
}

/// Creates the stream if it does not exist; if it does, checks that it takes this log's subjects and
/// keeps as many replicas as asked. Servers and processors both call it, so either may start first.
pub async fn ensure_stream(js: &jetstream::Context, opts: &NatsLogOptions) -> Result<stream::Stream, LogError> {
    let wanted = stream::Config {
        name: opts.stream.clone(),
        subjects: vec![format!("{}.*", opts.subject_prefix)],
        num_replicas: opts.replicas,
        duplicate_window: opts.duplicate_window,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    let mut found = js.get_or_create_stream(wanted.clone()).await.map_err(|e| unavailable("JetStream stream", e))?;
    let config = found.info().await.map_err(|e| unavailable("JetStream stream", e))?.config.clone();
    if !config.subjects.contains(&wanted.subjects[0]) || config.num_replicas != wanted.num_replicas {
        // A configuration mistake, not an outage, but appends can only fail: say why, loudly.
        let why = format!(
            "the JetStream stream {} exists with subjects {:?} and {} replicas; eps needs subjects {:?} and {} \
             replicas (fix the stream or the options)",
            config.name, config.subjects, config.num_replicas, wanted.subjects, wanted.num_replicas
        );
        tracing::error!("{why}");
        return Err(LogError::Unavailable(why));
    }
    tracing::info!(stream = %config.name, subjects = ?config.subjects, replicas = config.num_replicas, "JetStream stream ready");
    Ok(found)
}

struct Group {
    partition: u32,
    payload: Vec<u8>,
    ids: Vec<IdKey>,
    all_have_ids: bool,
}

/// The `Nats-Msg-Id` of a group: a digest of its events' ids in order, so the same events sent again
/// make the same message id (in any build: the digests are stable, see [`super::id_key`]).
fn message_id(ids: &[IdKey]) -> String {
    let bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
    let mut out = String::with_capacity(36);
    let _ = write!(out, "eps-{:032x}", super::digest(&bytes));
    out
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(format!("{what}: {e}"))
}

#[async_trait]
impl EventLog for NatsLog {
    async fn append(&self, batch: LogBatch) -> Result<Vec<Appended>, LogError> {
        let result = self.publish_all(&batch).await;
        match &result {
            Ok(_) => self.failing.store(false, Ordering::Relaxed),
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "JetStream unavailable: appends answer 503 until it is back");
                }
                metrics::counter!("eps_log_append_errors_total").increment(1);
            }
        }
        if let Ok(answers) = &result {
            let stored = answers.iter().filter(|a| **a == Appended::Stored).count() as u64;
            metrics::counter!("eps_events_appended_total").increment(stored);
            metrics::counter!("eps_events_duplicate_total").increment(answers.len() as u64 - stored);
        }
        result
    }

    fn ready(&self) -> bool {
        !self.failing.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_follow_the_ids_and_their_order() {
        let a = super::super::id_key("run-1");
        let b = super::super::id_key("run-2");
        assert_eq!(message_id(&[a, b]), message_id(&[a, b]));
        assert_ne!(message_id(&[a, b]), message_id(&[b, a]));
        assert_ne!(message_id(&[a]), message_id(&[a, b]));
        assert!(message_id(&[a]).starts_with("eps-") && message_id(&[a]).len() == 36);
    }

    #[test]
    fn partitions_spread_users_and_keep_each_user_in_one() {
        let opts = NatsLogOptions::new("nats://127.0.0.1:4222");
        let mut used = std::collections::HashSet::new();
        for i in 0..1000 {
            let key = super::super::user_key(&format!("user{i}"));
            let p = opts.partition_of(key);
            assert!(p < 16);
            assert_eq!(p, opts.partition_of(key));
            used.insert(p);
        }
        assert_eq!(used.len(), 16, "1,000 users should reach every partition");
        assert_eq!(opts.subject(7), "eps.events.7");
    }
}
