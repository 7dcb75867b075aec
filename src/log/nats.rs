//! The log on NATS JetStream: the scale-out backend of [`EventLog`].
//!
//! One stream (default `EPS_EVENTS`) holds subjects `<prefix>.<partition>` (default `eps.events.0` to
//! `eps.events.15`). An event goes to partition `user_key(userId) % partitions`, so all of a user's events
//! are in one partition, in order. A request's events are grouped by partition and each group is published
//! as one message whose payload is the group's log lines (the file log's line format, JSON Lines), so a
//! batch of 1,000 events costs about as many publishes as there are partitions, not 1,000. A group larger
//! than a message may be (the server's `max_payload`, at most [`MAX_MESSAGE_BYTES`], headers included) is
//! cut into several, in order, by a rule of the request's content alone ([`plan_messages`]). A small
//! message without an id (single events of the seed's kind) is grouped with other requests' of its
//! partition while earlier ones wait for their acknowledgement ([`super::nats_lanes`]): the group commit
//! of this backend.
//!
//! Durability: [`EventLog::append`] returns `Ok` only once JetStream has acknowledged every message of the
//! request, that is once the stream has stored it as its replicas and sync settings define.
//!
//! Idempotency: when every event of a message has an id, the message carries `Nats-Msg-Id`, a digest of
//! its ids in order. A request sent again (the client resends a batch as the same bytes) makes the
//! same messages with the same ids, and JetStream drops each copy within the stream's duplicate window and
//! answers `duplicate`, which becomes [`Appended::Duplicate`] for each event of that message; after a
//! failure that left only some messages acknowledged, the retry stores exactly the others.
//!
//! Availability: the connection is made in the background and re-made by the client library; until
//! JetStream answers (and after it stops answering), appends fail with [`LogError::Unavailable`], which
//! the server answers 503 with `Retry-After`. The stream is created (or its configuration checked) on the
//! first append that reaches JetStream, and checked again every [`STREAM_RECHECK`].
//!
//! Settings: the stream's own configuration records its limits, storage, retention and duplicate
//! window; its description records the partition count (`eps partitions=16`). Every server and
//! processor checks all of them ([`ensure_stream`]): a server with other settings answers 503 and logs
//! both values, a processor refuses to start. A stream found deleted (a publish answered "no stream")
//! is forgotten, logged, and made again by the next append; it is a new stream (another creation
//! time, see [`stream_identity`]), which the processors refuse until an operator adopts it.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use async_trait::async_trait;

use super::nats_lanes::{Lanes, PublishFailed, Publisher, GROUP_BELOW_BYTES};
use super::nats_promise::{Promise, SyncSetting};
use super::{Appended, EventLog, IdKey, LogBatch, LogError};

/// The default stream (`--nats-stream`).
pub const DEFAULT_STREAM: &str = "EPS_EVENTS";
/// The default subject prefix (`--nats-subject-prefix`): subjects are `<prefix>.<partition>`.
pub const DEFAULT_SUBJECT_PREFIX: &str = "eps.events";
/// The default number of partitions (`--nats-partitions`).
pub const DEFAULT_PARTITIONS: u32 = 16;
/// The default number of copies of each message (`--nats-replicas`): one, for a single node.
pub const DEFAULT_REPLICAS: usize = 1;
/// The default JetStream duplicate window (`--nats-duplicate-window-secs`): 15 minutes.
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(15 * 60);

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
    /// The stream's retention limits (0: none): messages older, or beyond that many bytes or messages,
    /// are removed by JetStream whether applied or not. Recorded in the stream; every process checks them.
    pub max_age: Duration,
    pub max_bytes: i64,
    pub max_messages: i64,
    /// Declared by the operator: every server runs with `jetstream { sync_interval: always }`, so an
    /// acknowledgement means fsynced ([`Promise`]). Not a stream setting, and not checked against the
    /// server beyond its version (nothing over the NATS protocol says it).
    pub sync_always: bool,
}

impl NatsLogOptions {
    pub fn new(url: impl Into<String>) -> Self {
        NatsLogOptions {
            url: url.into(),
            stream: DEFAULT_STREAM.into(),
            subject_prefix: DEFAULT_SUBJECT_PREFIX.into(),
            partitions: DEFAULT_PARTITIONS,
            replicas: DEFAULT_REPLICAS,
            duplicate_window: DEFAULT_DUPLICATE_WINDOW,
            timeout: Duration::from_secs(2),
            max_age: Duration::ZERO,
            max_bytes: 0,
            max_messages: 0,
            sync_always: false,
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
    /// The context's client, kept so each append reads its state without cloning it.
    client: async_nats::Client,
    opts: NatsLogOptions,
    /// Set while the stream is known to exist with the expected configuration, with when it was last
    /// checked: the stream's own largest message (`max_msg_size`), if it sets one. Forgotten when a
    /// publish finds no stream and every [`STREAM_RECHECK`], so a deleted, recreated or reconfigured
    /// stream is noticed.
    stream_ready: std::sync::Mutex<Option<(Instant, Option<usize>)>>,
    /// The last settings mismatch logged (logged again only when it changes).
    last_mismatch: std::sync::Mutex<Option<String>>,
    /// Held while the stream is being checked.
    checking: tokio::sync::Mutex<()>,
    /// The identity of the stream last found ([`stream_identity`]): another one means it was recreated.
    known_identity: std::sync::Mutex<Option<String>>,
    /// Set while appends fail, cleared by the next that succeeds (readiness).
    failing: AtomicBool,
    /// What the connected server and the stream promise, once the stream was found.
    promise: std::sync::Mutex<Option<Promise>>,
    /// Concurrent requests' small id-less messages of a partition, published as one ([`super::nats_lanes`]).
    lanes: Lanes<JetStreamPublisher>,
}

/// Publishes one message without headers and waits for JetStream's acknowledgement.
#[derive(Clone)]
struct JetStreamPublisher {
    js: jetstream::Context,
    client: async_nats::Client,
}

impl Publisher for JetStreamPublisher {
    async fn publish(&self, subject: String, payload: Vec<u8>) -> Result<(), PublishFailed> {
        let failed = |what: &str, e: jetstream::context::PublishError| PublishFailed {
            stream_not_found: e.kind() == jetstream::context::PublishErrorKind::StreamNotFound,
            error: format!("{what}: {e}"),
        };
        // As for a message of its own: never hand the client a message to send after a reconnection,
        // long after its requests were answered 503 (a group may wait for its predecessor's answer).
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(PublishFailed { stream_not_found: false, error: "not connected to NATS".into() });
        }
        let ack = self.js.publish(subject, payload.into()).await.map_err(|e| failed("publishing to JetStream", e))?;
        ack.await.map_err(|e| failed("JetStream's acknowledgement", e))?;
        Ok(())
    }
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
        let subjects = (0..opts.partitions).map(|p| opts.subject(p)).collect();
        // A group's publish gets the acknowledgement's own timeout and a second more, so the library's
        // error (more telling) normally comes first.
        let client = js.client();
        let publisher = JetStreamPublisher { js: js.clone(), client: client.clone() };
        let lanes = Lanes::new(publisher, subjects, opts.timeout + Duration::from_secs(1));
        Ok(NatsLog {
            js,
            client,
            lanes,
            opts,
            stream_ready: std::sync::Mutex::new(None),
            last_mismatch: std::sync::Mutex::new(None),
            checking: tokio::sync::Mutex::new(()),
            known_identity: std::sync::Mutex::new(None),
            failing: AtomicBool::new(true),
            promise: std::sync::Mutex::new(None),
        })
    }

    /// Checks (or makes) the stream now and then every [`STREAM_RECHECK`], for as long as the server
    /// runs, so its identity (`GET /healthz`) is known before the first append, comes back after an
    /// outage without waiting for an append, and follows a stream deleted and made again within about
    /// two rechecks even on an idle server. An error is left for the appends to report.
    pub async fn keep_checked(&self) {
        loop {
            let _ = self.ensure_stream().await;
            tokio::time::sleep(STREAM_RECHECK).await;
        }
    }

    pub fn options(&self) -> &NatsLogOptions {
        &self.opts
    }

    /// Creates or checks the stream (at most every [`STREAM_RECHECK`]); answers its `max_msg_size`
    /// when it has one.
    async fn ensure_stream(&self) -> Result<Option<usize>, LogError> {
        let cached = *self.stream_ready.lock().expect("stream state");
        if let Some((checked, max)) = cached {
            if checked.elapsed() < STREAM_RECHECK {
                return Ok(max);
            }
        }
        // One check at a time: while one runs, appends go on with the last answer if there is one,
        // or wait for it (and then use it) if there is none.
        let _checking = match (self.checking.try_lock(), cached) {
            (Ok(guard), _) => guard,
            (Err(_), Some((_, max))) => return Ok(max),
            (Err(_), None) => {
                let guard = self.checking.lock().await;
                if let Some((_, max)) = *self.stream_ready.lock().expect("stream state") {
                    return Ok(max);
                }
                guard
            }
        };
        let checked = ensure_stream(&self.js, &self.opts).await.and_then(|stream| {
            let promise = self.note_promise(stream.cached_info().config.num_replicas);
            if promise.sync == SyncSetting::Contradicted {
                return Err(StreamError::Mismatch(promise.summary));
            }
            Ok(stream)
        });
        match checked {
            Ok(stream) => {
                let identity = stream_identity(stream.cached_info(), self.opts.partitions);
                let before = self.known_identity.lock().expect("stream state").replace(identity.clone());
                if let Some(before) = before.filter(|before| *before != identity) {
                    tracing::error!(
                        stream = %self.opts.stream, was = %before, now = %identity,
                        "the JetStream stream is gone (deleted?) and was made again: appends go to the new stream; \
                         processors refuse it until an operator adopts it (eps process --adopt-new-log, see docs/SCALING.md)"
                    );
                }
                let max = usize::try_from(stream.cached_info().config.max_message_size).ok().filter(|&max| max > 0);
                if cached.is_none() {
                    // Said when it becomes ready (at start, or after an outage or a mismatch), not on
                    // every re-check.
                    let config = &stream.cached_info().config;
                    tracing::info!(stream = %config.name, subjects = ?config.subjects, replicas = config.num_replicas, partitions = self.opts.partitions, "JetStream stream ready");
                }
                *self.stream_ready.lock().expect("stream state") = Some((Instant::now(), max));
                *self.last_mismatch.lock().expect("stream state") = None;
                Ok(max)
            }
            Err(e) => {
                *self.stream_ready.lock().expect("stream state") = None;
                if let StreamError::Mismatch(why) = &e {
                    let mut last = self.last_mismatch.lock().expect("stream state");
                    if last.as_deref() != Some(why) {
                        tracing::error!("{why}; appends answer 503 until it is fixed");
                        *last = Some(why.clone());
                    }
                }
                Err(e.into())
            }
        }
    }

    /// The promise of the connected server and a stream of `replicas`, logged in one line when it is
    /// first known and whenever it changes (a reconnection to another version, the stream's replicas).
    fn note_promise(&self, replicas: usize) -> Promise {
        let version = self.js.client().server_info().version;
        let promise = Promise::new(&version, &self.opts.stream, replicas, self.opts.sync_always);
        let mut known = self.promise.lock().expect("promise");
        if known.as_ref() != Some(&promise) {
            if promise.sync == SyncSetting::Contradicted {
                tracing::error!("{}", promise.line());
            } else {
                tracing::info!("{}", promise.line());
            }
            *known = Some(promise.clone());
        }
        promise
    }

    /// A publish found no stream: it was deleted (or its server lost its store). Forget it, say so;
    /// the next append makes it again.
    fn stream_lost(&self, e: &impl std::fmt::Display) {
        if self.stream_ready.lock().expect("stream state").take().is_some() {
            tracing::error!(
                stream = %self.opts.stream, error = %e,
                "the JetStream stream is gone (deleted?): the next append creates it again; processors refuse the \
                 new stream until an operator adopts it (eps process --adopt-new-log, see docs/SCALING.md)"
            );
        }
    }

    /// The most bytes (headers and payload) one message of this log may have now: the connected
    /// server's `max_payload` (from its INFO, which a reconnection renews), the stream's `max_msg_size`
    /// if it sets one, and never more than [`MAX_MESSAGE_BYTES`].
    fn message_limit(&self, stream_max: Option<usize>) -> usize {
        let server = self.client.server_info().max_payload;
        // 0: no INFO seen (cannot happen once connected); assume nats-server's default.
        let server = if server == 0 { MAX_MESSAGE_BYTES } else { server };
        server.min(stream_max.unwrap_or(usize::MAX)).min(MAX_MESSAGE_BYTES)
    }

    async fn publish_all(&self, batch: &LogBatch) -> Result<Vec<Appended>, LogError> {
        // While disconnected the NATS client would queue a publish and send it after reconnecting,
        // possibly long after this request was answered 503: never publish while disconnected. (A connection lost
        // between this check and the acknowledgement can still deliver the message late; the events'
        // ids make the client's retry of it a duplicate JetStream drops.)
        // Waiting for the connection (as long as an acknowledgement may take) covers the start-up and a
        // quick reconnect.
        let client = &self.client;
        let deadline = tokio::time::Instant::now() + self.opts.timeout;
        while client.connection_state() != async_nats::connection::State::Connected {
            if tokio::time::Instant::now() >= deadline {
                return Err(LogError::Unavailable("not connected to NATS".into()));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let stream_max = self.ensure_stream().await?;

        // Group the events by partition, cut each group into messages JetStream takes, publish every
        // message, then wait for every acknowledgement.
        let limit = self.message_limit(stream_max);
        let plan = plan_messages(batch, &self.opts, limit)?;
        let mut pending = Vec::with_capacity(plan.messages.len());
        for message in plan.messages {
            // A small message without an id (its events have none) joins other requests' in its
            // partition's lane; one with an id stays a message of its own, so JetStream recognises it.
            if message.msg_id.is_none() && message.payload.len() <= GROUP_BELOW_BYTES {
                let budget = limit.saturating_sub(MSG_ID_HEADER_BYTES);
                pending.push(Pending::Grouped(Box::pin(self.lanes.submit(
                    message.partition as usize,
                    &message.payload,
                    budget,
                ))));
                continue;
            }
            let mut headers = async_nats::HeaderMap::new();
            if let Some(id) = &message.msg_id {
                headers.insert("Nats-Msg-Id", id.as_str());
            }
            let ack =
                self.js.publish_with_headers(message.subject, headers, message.payload.into()).await.map_err(|e| {
                    if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound {
                        self.stream_lost(&e);
                    }
                    unavailable("publishing to JetStream", e)
                })?;
            pending.push(Pending::Direct(ack));
        }
        let mut duplicate = Vec::with_capacity(pending.len());
        for ack in pending {
            match ack {
                Pending::Direct(ack) => {
                    let ack = ack.await.map_err(|e| {
                        if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound {
                            self.stream_lost(&e);
                        }
                        unavailable("JetStream's acknowledgement", e)
                    })?;
                    duplicate.push(ack.duplicate);
                }
                Pending::Grouped(answer) => {
                    answer.await.map_err(|failed| {
                        if failed.stream_not_found {
                            self.stream_lost(&failed.error);
                        }
                        LogError::Unavailable(failed.error)
                    })?;
                    // No id, so nothing JetStream could have dropped as a repeat.
                    duplicate.push(false);
                }
            }
        }
        Ok(plan
            .message_of_event
            .into_iter()
            .map(|g| if duplicate[g] { Appended::Duplicate } else { Appended::Stored })
            .collect())
    }
}

/// A message of a request on its way: published alone, or grouped with others in its partition's lane.
enum Pending {
    Direct(jetstream::context::PublishAckFuture),
    Grouped(futures::future::BoxFuture<'static, Result<(), PublishFailed>>),
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

/// Why [`ensure_stream`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// JetStream did not answer (or not yet): retry.
    #[error("{0}")]
    Unavailable(String),
    /// The stream exists with settings other than this process's: retrying cannot help. Servers
    /// answer 503 and log it; processors refuse to start.
    #[error("{0}")]
    Mismatch(String),
}

impl From<StreamError> for LogError {
    fn from(e: StreamError) -> LogError {
        LogError::Unavailable(e.to_string())
    }
}

/// The stream's `description`, eps's record of the settings the stream's own configuration cannot
/// hold: `eps partitions=<n>`.
pub fn settings_description(partitions: u32) -> String {
    format!("eps partitions={partitions}")
}

/// The partition count a stream's description records, if it records one.
pub fn recorded_partitions(description: Option<&str>) -> Option<u32> {
    description?.split_whitespace().find_map(|word| word.strip_prefix("partitions=")?.parse().ok())
}

/// The identity of a stream, which the processors' checkpoints are bound to: its name, its creation
/// time (a deleted and recreated stream has another one, and starts its sequences again) and the
/// partition count.
pub fn stream_identity(info: &stream::Info, partitions: u32) -> String {
    let c = info.created;
    format!(
        "stream {} created {:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z with {partitions} partitions",
        info.config.name,
        c.year(),
        c.month() as u8,
        c.day(),
        c.hour(),
        c.minute(),
        c.second(),
        c.nanosecond()
    )
}

/// Whether a JetStream API error says the stream does not exist.
pub fn is_stream_not_found(e: &(impl std::fmt::Display + std::fmt::Debug)) -> bool {
    let text = format!("{e} {e:?}");
    text.contains("10059") || text.contains("stream not found") || text.contains("no stream found")
}

/// The stream eps makes: its subjects, replicas, duplicate window and partition count, and the limits
/// it was told (none by default: nothing is removed before a processor applied it).
fn wanted_config(opts: &NatsLogOptions) -> stream::Config {
    stream::Config {
        name: opts.stream.clone(),
        description: Some(settings_description(opts.partitions)),
        subjects: vec![format!("{}.*", opts.subject_prefix)],
        num_replicas: opts.replicas,
        duplicate_window: opts.duplicate_window,
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        max_messages: if opts.max_messages > 0 { opts.max_messages } else { -1 },
        max_bytes: if opts.max_bytes > 0 { opts.max_bytes } else { -1 },
        max_age: opts.max_age,
        max_messages_per_subject: -1,
        ..Default::default()
    }
}

/// Every setting of `found` that differs from what eps expects, as "setting: the stream has X, this
/// process expects Y".
pub fn settings_mismatches(found: &stream::Config, opts: &NatsLogOptions) -> Vec<String> {
    let wanted = wanted_config(opts);
    let mut out = Vec::new();
    let limit = |v: i64| if v <= 0 { "unlimited".to_string() } else { v.to_string() };
    let mut check = |what: &str, has: String, expects: String| {
        if has != expects {
            out.push(format!("{what}: the stream has {has}, this process expects {expects}"));
        }
    };
    check(
        "partitions (--nats-partitions)",
        recorded_partitions(found.description.as_deref()).map_or("none recorded".into(), |p| p.to_string()),
        opts.partitions.to_string(),
    );
    check("subjects", format!("{:?}", found.subjects), format!("{:?}", wanted.subjects));
    check("replicas (--nats-replicas)", found.num_replicas.to_string(), wanted.num_replicas.to_string());
    check(
        "duplicate window (--nats-duplicate-window-secs)",
        format!("{:?}", found.duplicate_window),
        format!("{:?}", wanted.duplicate_window),
    );
    check("storage", format!("{:?}", found.storage), format!("{:?}", wanted.storage));
    check("retention", format!("{:?}", found.retention), format!("{:?}", wanted.retention));
    check("discard", format!("{:?}", found.discard), format!("{:?}", wanted.discard));
    let age = |d: Duration| if d.is_zero() { "unlimited".to_string() } else { format!("{d:?}") };
    check("max_msgs (--nats-max-msgs)", limit(found.max_messages), limit(wanted.max_messages));
    check("max_bytes (--nats-max-bytes)", limit(found.max_bytes), limit(wanted.max_bytes));
    check("max_age (--nats-max-age-secs)", age(found.max_age), age(wanted.max_age));
    check("max_msgs_per_subject", limit(found.max_messages_per_subject), limit(wanted.max_messages_per_subject));
    out
}

/// Creates the stream if it does not exist (with its settings recorded: the stream's configuration,
/// and the partition count in its description); if it does, checks every setting against this
/// process's (partitions, subjects, replicas, duplicate window, storage, retention, discard, limits).
/// A stream made by an older eps, without a partition count, gets this process's recorded. Servers and
/// processors both call it, so either may start first.
pub async fn ensure_stream(js: &jetstream::Context, opts: &NatsLogOptions) -> Result<stream::Stream, StreamError> {
    let unavailable =
        |e: &dyn std::fmt::Display| StreamError::Unavailable(format!("JetStream stream {}: {e}", opts.stream));
    let wanted = wanted_config(opts);
    let mut found = match js.get_stream(&opts.stream).await {
        Ok(found) => found,
        Err(e) if is_stream_not_found(&e) => match js.create_stream(wanted.clone()).await {
            Ok(created) => {
                tracing::warn!(
                    stream = %opts.stream, partitions = opts.partitions,
                    "the JetStream stream did not exist: created it (a new stream; processors whose checkpoints \
                     count an older one refuse to start until told to adopt it, see docs/SCALING.md)"
                );
                created
            }
            // Another process created it meanwhile: check that one.
            Err(_) => js.get_stream(&opts.stream).await.map_err(|e| unavailable(&e))?,
        },
        Err(e) => return Err(unavailable(&e)),
    };
    let mut config = found.info().await.map_err(|e| unavailable(&e))?.config.clone();
    if recorded_partitions(config.description.as_deref()).is_none() {
        // Made by an eps that did not record it: the first process to use it records its own.
        let mut update = config.clone();
        update.description = Some(settings_description(opts.partitions));
        config = js.update_stream(update).await.map_err(|e| unavailable(&e))?.config;
        tracing::warn!(stream = %opts.stream, partitions = opts.partitions, "recorded the partition count in the stream's description");
        found = js.get_stream(&opts.stream).await.map_err(|e| unavailable(&e))?;
    }
    let mismatches = settings_mismatches(&config, opts);
    if !mismatches.is_empty() {
        // A configuration mistake, not an outage: say why, loudly.
        return Err(StreamError::Mismatch(format!(
            "the JetStream stream {} does not have this process's settings: {}. Start every server and processor with \
             the stream's settings (to change them, make a new stream: see docs/SCALING.md)",
            config.name,
            mismatches.join("; ")
        )));
    }
    tracing::debug!(stream = %config.name, subjects = ?config.subjects, replicas = config.num_replicas, partitions = opts.partitions, "JetStream stream checked");
    Ok(found)
}

/// How long a server trusts its last check of the stream before it checks again: the longest a
/// stream reconfigured (or recreated with other settings) behind its back goes unnoticed.
pub const STREAM_RECHECK: Duration = Duration::from_secs(5);

/// The largest message eps publishes, headers included, whatever the server allows: nats-server's
/// default `max_payload` (1 MiB). A server allowing more changes nothing, so on every such server a
/// request is cut into the same messages (same `Nats-Msg-Id`s) and a retry sent through another eps
/// server or after a reconnection to another node is still dropped by JetStream.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Header bytes of a message with `Nats-Msg-Id` as the client library writes them
/// (`NATS/1.0\r\nNats-Msg-Id: eps-<32 hex>\r\n\r\n`). nats-server checks `max_payload` against
/// headers + payload; every message is cut as if it carried this header, so the cut does not depend on
/// whether the events have ids.
pub const MSG_ID_HEADER_BYTES: usize = "NATS/1.0\r\n".len() + "Nats-Msg-Id: ".len() + MSG_ID_LEN + "\r\n\r\n".len();

/// The longest log line a valid event makes, newline included: a userId of 255 bytes that all need
/// escaping (`"` or `\\`: 510 bytes + quotes), an id of 128 control characters (`\\u0001`: 768 + quotes),
/// a 30-character value, `subtract_revenue` and a 20-digit `ts` (a test checks it).
pub const MAX_LOG_LINE_BYTES: usize = 1391;

/// Length of a `Nats-Msg-Id` made by [`message_id`]: `eps-` and 32 hex digits.
const MSG_ID_LEN: usize = 36;

/// The messages one request becomes.
#[derive(Debug)]
pub struct Plan {
    pub messages: Vec<PlannedMessage>,
    /// For each event of the batch, in order, the index of its message.
    pub message_of_event: Vec<usize>,
}

/// One JetStream message: a partition's events of a request, or a piece of them.
#[derive(Debug)]
pub struct PlannedMessage {
    pub partition: u32,
    pub subject: String,
    /// `Nats-Msg-Id`: a digest of the message's event ids in order, when every event has one.
    pub msg_id: Option<String>,
    pub payload: Vec<u8>,
}

/// Cuts a request into messages of at most `limit` bytes (headers included), a function of the
/// request's events and `limit` alone:
///
/// - events are grouped by partition, groups in the order of their first event, each group keeping
///   its events' order;
/// - each group is cut greedily, in order: a message takes the next line while its payload stays
///   within `limit - MSG_ID_HEADER_BYTES`; a group that fits is one message, exactly as before groups
///   were ever cut;
/// - a message's `Nats-Msg-Id` is the digest of its own events' ids, so the same request makes the
///   same messages with the same ids, and a retry after only some were acknowledged has JetStream
///   drop exactly those.
///
/// A single line that cannot fit is refused ([`LogError::TooLarge`]) before anything is published.
/// With validated events that needs a `limit` under [`MAX_LOG_LINE_BYTES`] + [`MSG_ID_HEADER_BYTES`]
/// (about 1.4 KiB), far below any sane `max_payload` (nats-server's default is 1 MiB).
pub fn plan_messages(batch: &LogBatch, opts: &NatsLogOptions, limit: usize) -> Result<Plan, LogError> {
    let budget = limit.saturating_sub(MSG_ID_HEADER_BYTES);
    let lines: Vec<(&[u8], Option<IdKey>, u64)> = batch.lines_by_user().collect();
    let mut groups: Vec<(u32, Vec<usize>)> = Vec::new();
    let mut slot_of = vec![usize::MAX; opts.partitions.max(1) as usize];
    for (index, &(line, _, user)) in lines.iter().enumerate() {
        if line.len() > budget {
            return Err(LogError::TooLarge(format!(
                "event {} is {} bytes as a log line; the JetStream server takes messages of at most {limit} bytes \
                 ({MSG_ID_HEADER_BYTES} of them headers): raise its max_payload",
                index + 1,
                line.len()
            )));
        }
        let partition = opts.partition_of(user);
        let slot = &mut slot_of[partition as usize];
        if *slot == usize::MAX {
            *slot = groups.len();
            groups.push((partition, Vec::new()));
        }
        groups[*slot].1.push(index);
    }
    let mut messages: Vec<PlannedMessage> = Vec::new();
    let mut message_of_event = vec![0; lines.len()];
    for (partition, events) in groups {
        let subject = opts.subject(partition);
        let mut rest = events.as_slice();
        while !rest.is_empty() {
            let mut size = 0;
            let take = rest
                .iter()
                .take_while(|&&e| {
                    size += lines[e].0.len();
                    size <= budget
                })
                .count();
            let (piece, after) = rest.split_at(take);
            rest = after;
            let ids: Option<Vec<IdKey>> = piece.iter().map(|&e| lines[e].1).collect();
            let mut payload = Vec::with_capacity(size.min(budget));
            for &e in piece {
                payload.extend_from_slice(lines[e].0);
                message_of_event[e] = messages.len();
            }
            messages.push(PlannedMessage {
                partition,
                subject: subject.clone(),
                msg_id: ids.map(|ids| message_id(&ids)),
                payload,
            });
        }
    }
    Ok(Plan { messages, message_of_event })
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

    fn identity(&self) -> Option<String> {
        // None while the stream is not known to be there (not checked yet, a publish found none, or
        // its last check is older than two rechecks): a stream deleted and made again is reported
        // under its old identity for at most that long.
        let (checked, _) = (*self.stream_ready.lock().expect("stream state"))?;
        if checked.elapsed() > 2 * STREAM_RECHECK {
            return None;
        }
        self.known_identity.lock().expect("stream state").clone()
    }

    fn promise(&self) -> Option<Promise> {
        self.promise.lock().expect("promise").clone()
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

    fn batch_of(lines: &[String]) -> LogBatch {
        let events: Vec<_> =
            lines.iter().map(|l| crate::event::EventRef::parse_request(l.as_bytes()).expect("valid event")).collect();
        LogBatch::of(events, 1_764_000_000_000)
    }

    fn events(user: &str, run: &str, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!(r#"{{"userId":"{user}","name":"add_revenue","value":{i}.25,"id":"{run}-{i}"}}"#))
            .collect()
    }

    #[test]
    fn a_group_larger_than_the_limit_is_cut_the_same_way_every_time() {
        let opts = NatsLogOptions::new("nats://127.0.0.1:4222");
        let mut lines = events("big", "r", 3_000);
        lines.extend(events("small", "s", 10));
        let batch = batch_of(&lines);
        let limit = 64 * 1024;
        let plan = plan_messages(&batch, &opts, limit).unwrap();
        let again = plan_messages(&batch_of(&lines), &opts, limit).unwrap();
        let summary = |p: &Plan| {
            p.messages.iter().map(|m| (m.subject.clone(), m.msg_id.clone(), m.payload.clone())).collect::<Vec<_>>()
        };
        assert_eq!(summary(&plan), summary(&again), "the same request makes the same messages");
        assert!(plan.messages.len() > 3, "{} messages: the big group was not cut", plan.messages.len());
        let mut ids = std::collections::HashSet::new();
        for m in &plan.messages {
            assert!(m.payload.len() + MSG_ID_HEADER_BYTES <= limit, "{} bytes", m.payload.len());
            assert!(m.payload.ends_with(b"\n"));
            assert!(ids.insert(m.msg_id.clone().expect("every event has an id")), "message ids are distinct");
        }
        // Each group's messages hold its lines, in order, each once; the events map to them.
        for (user, subject) in [
            ("big", opts.subject(opts.partition_of(super::super::user_key("big")))),
            ("small", opts.subject(opts.partition_of(super::super::user_key("small")))),
        ] {
            let text: Vec<u8> =
                plan.messages.iter().filter(|m| m.subject == subject).flat_map(|m| m.payload.clone()).collect();
            let expected: Vec<u8> = batch
                .lines()
                .map(|(l, _)| l)
                .filter(|l| l.starts_with(format!(r#"{{"userId":"{user}""#).as_bytes()))
                .flatten()
                .copied()
                .collect();
            assert_eq!(text, expected, "{user}");
        }
        // Each message is exactly the lines of the events mapped to it, in order, and its id is the
        // digest of their ids: a piece is recognised whichever request made it.
        for (index, m) in plan.messages.iter().enumerate() {
            let mine: Vec<(&[u8], Option<IdKey>)> =
                batch.lines().zip(&plan.message_of_event).filter(|(_, &k)| k == index).map(|(l, _)| l).collect();
            assert_eq!(m.payload, mine.iter().flat_map(|(l, _)| l.iter().copied()).collect::<Vec<u8>>());
            let ids: Vec<IdKey> = mine.iter().map(|(_, id)| id.unwrap()).collect();
            assert_eq!(m.msg_id, Some(message_id(&ids)));
        }
    }

    #[test]
    fn a_group_that_fits_is_one_message_with_the_id_it_always_had() {
        let opts = NatsLogOptions::new("nats://127.0.0.1:4222");
        let batch = batch_of(&events("one", "r", 100));
        let plan = plan_messages(&batch, &opts, MAX_MESSAGE_BYTES).unwrap();
        assert_eq!(plan.messages.len(), 1);
        let ids: Vec<IdKey> = batch.lines().map(|(_, id)| id.unwrap()).collect();
        assert_eq!(plan.messages[0].msg_id, Some(message_id(&ids)));
        assert_eq!(plan.messages[0].payload, batch.data());
        // Without ids: the same cut, no message id.
        let plain: Vec<String> =
            (0..100).map(|i| format!(r#"{{"userId":"one","name":"add_revenue","value":{i}}}"#)).collect();
        let plan = plan_messages(&batch_of(&plain), &opts, MAX_MESSAGE_BYTES).unwrap();
        assert_eq!((plan.messages.len(), plan.messages[0].msg_id.clone()), (1, None));
    }

    #[test]
    fn an_event_larger_than_a_message_is_refused_before_anything_is_published() {
        let opts = NatsLogOptions::new("nats://127.0.0.1:4222");
        let batch = batch_of(&events("u", "r", 3));
        let line = batch.lines().next().unwrap().0.len();
        assert!(plan_messages(&batch, &opts, line + MSG_ID_HEADER_BYTES).is_ok());
        match plan_messages(&batch, &opts, line + MSG_ID_HEADER_BYTES - 1) {
            Err(LogError::TooLarge(why)) => assert!(why.contains("event 1") && why.contains("max_payload"), "{why}"),
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn the_longest_valid_event_fits_max_log_line_bytes() {
        let user = "\\\"".repeat(255); // 255 quotes, each escaped in the log line
        let id = "\\u0001".repeat(128);
        let body = format!(
            r#"{{"userId":"{user}","name":"subtract_revenue","value":0.1234567890123456789012345678,"id":"{id}"}}"#
        );
        let event = crate::event::EventRef::parse_request(body.as_bytes()).expect("valid at the limits");
        assert_eq!((event.user_id().len(), event.id().map(str::len)), (255, Some(128)));
        let mut line = Vec::new();
        event.write_log_line(u64::MAX, &mut line);
        line.push(b'\n');
        assert_eq!(line.len(), MAX_LOG_LINE_BYTES);
        assert_eq!(MSG_ID_HEADER_BYTES, 63);
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
