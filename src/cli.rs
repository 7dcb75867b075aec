//! The command line: every flag, its `EPS_*` environment variable, its default, and what it is for;
//! and, next to each command's arguments, their conversion (`From`, or `TryFrom` where the flags can
//! name nothing usable) into the option struct of the part that runs it, which `main.rs` hands over.
//! The defaults are the parts' own constants. Nothing here does any work.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::client::{self, ClientOptions, Progress, DEFAULT_GIVE_UP_AFTER};
use crate::log::nats::{self, NatsLogOptions};
use crate::log::producers::DEFAULT_HORIZON_SECS;
use crate::log::writer::{DEFAULT_DEDUP_MAX_IDS, DEFAULT_DEDUP_WINDOW_SECS, DEFAULT_SEGMENT_BYTES};
use crate::log::LogBackend;
use crate::ops::CompactOptions;
use crate::processor::jetstream::{self, JetStreamProcessOptions};
use crate::processor::{self, ProcessOptions};
use crate::server::serve::{self, DEFAULT_MAX_CONNECTIONS, DEFAULT_REQUEST_TIMEOUT, DEFAULT_SEND_TIMEOUT};
use crate::server::{self as srv, ServerOptions, DEFAULT_BATCH_BODY_LIMIT, DEFAULT_BODY_LIMIT, DEFAULT_LISTEN};

// The headings `--help` groups flags under, in this order.
const CORE: &str = "Core";
const STORAGE: &str = "Storage";
const JETSTREAM: &str = "JetStream (with --log nats://…)";
const TLS_AND_TOKENS: &str = "TLS and tokens";
const LOGGING: &str = "Logging";

#[derive(Debug, Parser)]
#[command(
    name = "eps",
    version,
    about = "Event processing system: durable HTTP ingest, exactly-once revenue processing",
    long_about = "Event processing system.\n\n\
        eps server   takes events over HTTP (POST /liveEvent) and makes each durable before answering 200.\n\
        eps client   sends every event of a JSON Lines file to the server, retrying safely.\n\
        eps process  applies the logged events to the database, each exactly once.\n\
        eps demo     runs all three on a sample, in a temporary directory.\n\n\
        Server and processor agree with no configuration: both use ./data and the SQLite file in it.\n\
        Every flag can also be set by the environment variable shown in its help.",
    after_help = "Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.\n\n\
        Examples:\n  \
        eps demo                                # all of it on sample events, in a temp dir\n  \
        eps server --token \"$TOKEN\"             # events on 127.0.0.1:8000 into ./data\n  \
        eps client events.jsonl --token \"$TOKEN\"  # send a file (resumable)\n  \
        eps process --follow                    # apply the log as it grows\n  \
        eps status                              # log, checkpoint, lag, totals\n  \
        eps server --help                       # a command's flags, by topic"
)]
pub struct Cli {
    /// TOML file of settings (keys are flag names, at the top or in [server], [process], [client],
    /// [status], [compact]). Flags win over environment variables, which win over the file.
    #[arg(help_heading = CORE, long, global = true, env = "EPS_CONFIG")]
    pub config: Option<PathBuf>,

    /// Log format on stderr: human-readable text or one JSON object per line.
    #[arg(help_heading = LOGGING, long, global = true, env = "EPS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter, in tracing's EnvFilter syntax (e.g. "info", "eps=debug").
    #[arg(help_heading = LOGGING, long, global = true, env = "EPS_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    #[command(subcommand)]
    pub command: Command,
}

/// A listening address: `IP:PORT`, or `HOST:PORT` with the host name resolved (its first address).
fn socket_addr(text: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    if text.rsplit_once(':').is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err()) {
        return Err(format!("{text:?} is not host:port (e.g. 127.0.0.1:8000 or localhost:8000)"));
    }
    let mut addrs = text.to_socket_addrs().map_err(|e| format!("cannot resolve {text:?}: {e}"))?;
    addrs.next().ok_or_else(|| format!("{text:?} resolves to no address"))
}

/// `--log`: a JetStream URL (what `LogBackend` takes), refused here, by every command alike, otherwise.
fn log_url(text: &str) -> Result<String, String> {
    if nats::is_nats_url(text) {
        Ok(text.to_string())
    } else {
        Err(format!("{text:?} is not a JetStream URL: use nats://host:port (several separated by commas), or leave --log out for the file log"))
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl From<LogFormat> for crate::telemetry::LogFormat {
    fn from(format: LogFormat) -> Self {
        match format {
            LogFormat::Text => crate::telemetry::LogFormat::Text,
            LogFormat::Json => crate::telemetry::LogFormat::Json,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Take events over HTTP and append them durably to the log.
    ///
    /// POST /liveEvent with a JSON event and the token in the Authorization header; the answer 200
    /// comes only once the event is synced to disk. GET /userEvents/{userId} answers the user's revenue
    /// as the processor has applied it.
    #[command(after_help = "Examples:\n  \
        eps server --token \"$TOKEN\"\n  \
        eps server --listen 0.0.0.0:8443 --tls-cert cert.pem --tls-key key.pem --tokens-file tokens.toml\n  \
        eps server --database-url postgres://eps@db/eps --data-dir /var/lib/eps\n  \
        eps server --log nats://nats1:4222,nats2:4222 --database-url postgres://eps@db/eps")]
    Server(ServerArgs),
    /// Apply the logged events to the database, each exactly once.
    ///
    /// Reads the log from the checkpoint stored in the database and commits revenue changes together
    /// with the new checkpoint. Safe to re-run, to kill at any moment, and to run several at once.
    #[command(after_help = "Examples:\n  \
        eps process                             # apply ./data's log, then exit\n  \
        eps process --follow --metrics-listen 127.0.0.1:9101\n  \
        eps process --follow --log nats://nats1:4222 --database-url postgres://eps@db/eps")]
    Process(ProcessArgs),
    /// Send every event of a JSON Lines file to the server.
    ///
    /// Each event carries an id derived from the file's content and its line number, so a retried
    /// request, a resumed run and a re-sent file are stored once. Keeps a checkpoint per file (see
    /// --state-dir): a re-run continues after the last acknowledged line. On SIGINT or SIGTERM it stops
    /// sending, waits for the requests in flight, saves the checkpoint, prints the command that resumes,
    /// and exits 130 or 143. Exits 1 when any line was invalid, rejected by the server, or could not be
    /// delivered.
    #[command(after_help = "Examples:\n  \
        eps client events.jsonl --token \"$TOKEN\"\n  \
        eps client events.jsonl --url https://a.example:8443,https://b.example:8443 --ca-cert ca.pem\n  \
        eps client events.jsonl --batch 1       # one event per POST /liveEvent")]
    Client(ClientArgs),
    /// Run server, client and processor on sample events in a temporary directory, and print the result.
    Demo(DemoArgs),
    /// Show the log, the checkpoint, the lag and the store's totals.
    #[command(after_help = "Examples:\n  \
        eps status --data-dir /var/lib/eps\n  \
        eps status --json --database-url postgres://eps@db/eps\n  \
        eps status --log nats://nats1:4222 --database-url postgres://eps@db/eps")]
    Status(StatusArgs),
    /// Print every setting of every command, its value and where it came from (token redacted).
    Config,
    /// Delete (or archive) log segments the processor has applied, to bound disk use.
    ///
    /// A segment goes only if it is not the newest, every line of it is behind the checkpoint, and it is
    /// older than --min-age-secs (default: --dedup-window-secs, the server's de-duplication window, set
    /// by the same variable and configuration key). Oldest first, no holes.
    #[command(after_help = "Examples:\n  \
        eps compact --dry-run\n  \
        eps compact --archive-dir /srv/eps-archive --min-age-secs 604800")]
    Compact(CompactArgs),
    /// Print a shell completion script: eps completions bash > /etc/bash_completion.d/eps (zsh, fish too).
    Completions(CompletionsArgs),
    /// Print the manual page of eps (roff; read it with `eps man | man -l -`), or with --dir write one
    /// page per command there (eps.1, eps-server.1, ...).
    Man(ManArgs),
}

#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// Write eps.1 and a page per command into this directory instead of printing eps.1.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = STORAGE)]
pub struct StoreArgs {
    /// Directory holding the log (log/) and the embedded SQLite database.
    #[arg(long, env = "EPS_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// PostgreSQL URL (postgres://user@host:port/db); without it the SQLite file in the data directory.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

/// The check that a data directory's file log is read with its server's store.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = STORAGE)]
pub struct StoreCheckArgs {
    /// Use this store even though the data directory's server records another one (its file "store"
    /// names it: "sqlite" or the PostgreSQL URL without its password). Without it such a run is
    /// refused, so that a processor without DATABASE_URL does not apply a PostgreSQL server's log to
    /// SQLite.
    #[arg(long, env = "EPS_ALLOW_OTHER_STORE")]
    pub allow_other_store: bool,
}

#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// Address to listen on (host:port; a host name is resolved, e.g. localhost:8000). A non-loopback
    /// address needs a token other than the default.
    #[arg(help_heading = CORE, long, env = "EPS_LISTEN", default_value_t = DEFAULT_LISTEN, value_parser = socket_addr)]
    pub listen: SocketAddr,

    /// Largest accepted POST /liveEvent body, in bytes (larger ones get 413).
    #[arg(help_heading = CORE, long, env = "EPS_BODY_LIMIT", default_value_t = DEFAULT_BODY_LIMIT)]
    pub body_limit: usize,

    /// Largest accepted POST /events (batch) body, in bytes (larger ones get 413). A batch also holds
    /// at most 10,000 events.
    #[arg(help_heading = CORE, long, env = "EPS_BATCH_BODY_LIMIT", default_value_t = DEFAULT_BATCH_BODY_LIMIT)]
    pub batch_body_limit: usize,

    /// Longest a client may take to send a request's headers, and then its body, in seconds (408 after).
    #[arg(help_heading = CORE, long, env = "EPS_REQUEST_TIMEOUT_SECS", default_value_t = DEFAULT_REQUEST_TIMEOUT.as_secs())]
    pub request_timeout_secs: u64,

    /// Longest the server waits for a client to take any byte of an answer, in seconds. A connection
    /// whose answers are not read is closed after it, so clients that stop reading cannot hold the
    /// --max-connections slots.
    #[arg(help_heading = CORE, long, env = "EPS_SEND_TIMEOUT_SECS", default_value_t = DEFAULT_SEND_TIMEOUT.as_secs())]
    pub send_timeout_secs: u64,

    /// Most client connections open at once; more wait in the listen backlog.
    #[arg(help_heading = CORE, long, env = "EPS_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,

    #[command(flatten)]
    pub store: StoreArgs,

    /// Size at which the log starts a new segment file, in bytes.
    #[arg(help_heading = STORAGE, long, env = "EPS_SEGMENT_BYTES", default_value_t = DEFAULT_SEGMENT_BYTES)]
    pub segment_bytes: u64,

    /// How long an event id is remembered to drop retried duplicates, in seconds.
    #[arg(help_heading = STORAGE, long, env = "EPS_DEDUP_WINDOW_SECS", default_value_t = DEFAULT_DEDUP_WINDOW_SECS)]
    pub dedup_window_secs: u64,

    /// Most event ids the id window remembers, with their content (the oldest are forgotten first).
    /// The window tells a repeat (200 duplicate) from a conflict (409) for any id.
    #[arg(help_heading = STORAGE, long, env = "EPS_DEDUP_MAX_IDS", default_value_t = DEFAULT_DEDUP_MAX_IDS)]
    pub dedup_max_ids: usize,

    /// File log: how long a producer of ids of the form <16 hex digits>-<sequence> (what `eps client`
    /// sends) is remembered after its last stored event, in seconds. Within it a repeat of any of its
    /// events is a duplicate whatever the traffic in between, across restarts, crashes and compaction.
    #[arg(help_heading = STORAGE, long, env = "EPS_DEDUP_HORIZON_SECS", default_value_t = DEFAULT_HORIZON_SECS)]
    pub dedup_horizon_secs: u64,

    /// Where events go: nats://host:port (several servers separated by commas) for a NATS JetStream
    /// stream; without it, the file log in the data directory. With JetStream, 200 means the stream
    /// acknowledged the event, and any number of servers may share the stream.
    #[arg(help_heading = JETSTREAM, long, env = "EPS_LOG", value_parser = log_url)]
    pub log: Option<String>,

    #[command(flatten)]
    pub nats: NatsArgs,

    /// Serve HTTPS on --listen with this PEM certificate chain (with --tls-key); re-read on SIGHUP.
    #[arg(help_heading = TLS_AND_TOKENS, long, env = "EPS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The PEM private key of --tls-cert; re-read with it on SIGHUP.
    #[arg(help_heading = TLS_AND_TOKENS, long, env = "EPS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Token clients must send as `Authorization: <token>` or `Authorization: Bearer <token>`.
    /// Defaults to the seed's "secret", which is only allowed on a loopback address.
    #[arg(help_heading = TLS_AND_TOKENS, long, env = "EPS_TOKEN", default_value = srv::DEFAULT_TOKEN, hide_default_value = true, hide_env_values = true)]
    pub token: String,

    /// TOML file of scoped tokens ([[token]] tables: name, scopes, value or sha256, optionally
    /// events_per_second and burst), re-read on SIGHUP; replaces --token. See docs/SECURITY.md.
    #[arg(help_heading = TLS_AND_TOKENS, long, env = "EPS_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,

    /// Rate limit of each token that sets none in the tokens file (and of --token), in events per
    /// second, with a burst of one second's worth; a batch costs its number of events. 0: no limit.
    #[arg(help_heading = TLS_AND_TOKENS, long, env = "EPS_RATE_LIMIT_EVENTS_PER_SECOND", default_value_t = 0)]
    pub rate_limit_events_per_second: u32,

    /// Origin (https://shop.example) whose web pages may send events from a browser: preflights are
    /// answered and CORS headers added on POST /liveEvent and POST /events only. Repeat the flag for
    /// several (EPS_CORS_ORIGINS: comma-separated); "*" for any. The read routes never allow it.
    #[arg(help_heading = TLS_AND_TOKENS, long, env = "EPS_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origin: Vec<String>,
}

impl From<ServerArgs> for ServerOptions {
    fn from(args: ServerArgs) -> ServerOptions {
        let nats = args.nats;
        ServerOptions {
            listen: args.listen,
            data_dir: args.store.data_dir,
            tokens_file: args.tokens_file,
            cors_origins: args.cors_origin,
            rate_limit: srv::auth::RateLimit::per_second(args.rate_limit_events_per_second),
            token: args.token,
            database_url: args.store.database_url,
            body_limit: args.body_limit,
            batch_body_limit: args.batch_body_limit,
            segment_bytes: args.segment_bytes,
            dedup_window: Duration::from_secs(args.dedup_window_secs),
            dedup_max_ids: args.dedup_max_ids,
            dedup_horizon: Duration::from_secs(args.dedup_horizon_secs),
            limits: serve::Limits {
                max_connections: args.max_connections,
                header_read_timeout: Duration::from_secs(args.request_timeout_secs),
                send_timeout: Duration::from_secs(args.send_timeout_secs),
                ..Default::default()
            },
            body_timeout: Duration::from_secs(args.request_timeout_secs),
            log: LogBackend::from_flag(args.log, |url| nats.options(url)),
            tls: args.tls_cert.zip(args.tls_key).map(|(cert, key)| srv::tls::TlsFiles { cert, key }),
        }
    }
}

/// Which JetStream stream (used with --log nats://…): what every command that reads it needs.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = JETSTREAM)]
pub struct NatsStreamArgs {
    /// JetStream stream holding the events (created if missing, its configuration checked if present).
    #[arg(long, env = "EPS_NATS_STREAM", default_value = nats::DEFAULT_STREAM)]
    pub nats_stream: String,

    /// Subjects are <prefix>.<partition>.
    #[arg(long, env = "EPS_NATS_SUBJECT_PREFIX", default_value = nats::DEFAULT_SUBJECT_PREFIX)]
    pub nats_subject_prefix: String,

    /// Partitions of the stream; a user's events all go to one, chosen by a stable hash of the userId.
    #[arg(long, env = "EPS_NATS_PARTITIONS", default_value_t = nats::DEFAULT_PARTITIONS)]
    pub nats_partitions: u32,

    /// Declare that every nats-server runs with `jetstream { sync_interval: always }` (nats-server 2.10
    /// or later), so a 200 means fsynced on a majority of the replicas. Nothing over the NATS protocol
    /// says the setting: eps logs and shows the declaration (/readyz, eps status), and a server of a
    /// version that cannot sync contradicts it (appends then answer 503).
    #[arg(long, env = "EPS_NATS_SYNC_ALWAYS")]
    pub nats_sync_always: bool,
}

impl NatsStreamArgs {
    /// The options of the stream at `url`, for a command that only reads it (`eps status`): the
    /// stream's other settings are left at their defaults and read from the stream itself.
    pub fn options(self, url: String) -> NatsLogOptions {
        NatsLogOptions {
            stream: self.nats_stream,
            subject_prefix: self.nats_subject_prefix,
            partitions: self.nats_partitions,
            sync_always: self.nats_sync_always,
            ..NatsLogOptions::new(url)
        }
    }
}

/// The JetStream log's settings (used with --log nats://…): the stream, and the settings the server
/// and the processors create it with and check it against (`eps status` reads them from the stream).
#[derive(Debug, clap::Args)]
#[command(next_help_heading = JETSTREAM)]
pub struct NatsArgs {
    #[command(flatten)]
    pub stream: NatsStreamArgs,

    /// Copies JetStream keeps of each message (1 on one node; 3 or 5 in a cluster).
    #[arg(long, env = "EPS_NATS_REPLICAS", default_value_t = nats::DEFAULT_REPLICAS)]
    pub nats_replicas: usize,

    /// How long JetStream remembers message ids to drop a retried publish, in seconds.
    #[arg(long, env = "EPS_NATS_DUPLICATE_WINDOW_SECS", default_value_t = nats::DEFAULT_DUPLICATE_WINDOW.as_secs())]
    pub nats_duplicate_window_secs: u64,

    /// The stream's retention by age, in seconds (0: keep everything). JetStream removes older
    /// messages whether they were applied or not; processors report those they had not applied as lost.
    /// Like every stream setting it is recorded in the stream and must be the same on every server and
    /// processor.
    #[arg(long, env = "EPS_NATS_MAX_AGE_SECS", default_value_t = 0)]
    pub nats_max_age_secs: u64,

    /// The stream's retention by size, in bytes (0: unlimited); as --nats-max-age-secs.
    #[arg(long, env = "EPS_NATS_MAX_BYTES", default_value_t = 0)]
    pub nats_max_bytes: i64,

    /// The stream's retention by message count (0: unlimited); as --nats-max-age-secs.
    #[arg(long, env = "EPS_NATS_MAX_MSGS", default_value_t = 0)]
    pub nats_max_msgs: i64,
}

impl NatsArgs {
    /// The options of the stream at `url` (server and processor share them).
    pub fn options(self, url: String) -> NatsLogOptions {
        NatsLogOptions {
            replicas: self.nats_replicas,
            duplicate_window: Duration::from_secs(self.nats_duplicate_window_secs),
            max_age: Duration::from_secs(self.nats_max_age_secs),
            max_bytes: self.nats_max_bytes,
            max_messages: self.nats_max_msgs,
            ..self.stream.options(url)
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct ProcessArgs {
    /// Keep running and apply new events as they arrive, instead of exiting when caught up.
    #[arg(help_heading = CORE, long, env = "EPS_FOLLOW")]
    pub follow: bool,

    /// Most bytes of log applied per database transaction. The log is read 8 MiB at a time and the
    /// transaction holds one sum per user, so memory stays small whatever this is; larger batches mean
    /// fewer, cheaper-per-event commits.
    #[arg(help_heading = CORE, long, env = "EPS_BATCH_BYTES", default_value_t = processor::DEFAULT_BATCH_BYTES)]
    pub batch_bytes: usize,

    /// With --follow: how often to look for new events, in milliseconds.
    #[arg(help_heading = CORE, long, env = "EPS_POLL_MS", default_value_t = processor::DEFAULT_POLL_INTERVAL.as_millis() as u64)]
    pub poll_ms: u64,

    /// Without --follow: how long to keep retrying an unreachable database, in seconds.
    #[arg(help_heading = CORE, long, env = "EPS_RETRY_SECS", default_value_t = processor::DEFAULT_RETRY_FOR.as_secs())]
    pub retry_secs: u64,

    /// Serve Prometheus metrics (GET /metrics) on this address while running, e.g. 127.0.0.1:9101.
    #[arg(help_heading = CORE, long, env = "EPS_METRICS_LISTEN", value_parser = socket_addr)]
    pub metrics_listen: Option<SocketAddr>,

    #[command(flatten)]
    pub store: StoreArgs,

    #[command(flatten)]
    pub store_check: StoreCheckArgs,

    /// The store's checkpoints are bound to the log they count (the file log's id; the JetStream
    /// stream's creation time and partition count), and a processor refuses a log other than that one.
    /// With this flag it instead re-binds them to the log as it is now, from its first event, and
    /// reports how far the old log had been applied (what the old log held after that is gone). Use it
    /// once, after a stream was deleted and recreated or a log replaced on purpose (docs/SCALING.md);
    /// do not leave the variable set, or the next replaced log is adopted too.
    #[arg(help_heading = STORAGE, long, env = "EPS_ADOPT_NEW_LOG")]
    pub adopt_new_log: bool,

    /// Where events are read from: nats://host:port (several servers separated by commas) for a NATS
    /// JetStream stream, which needs --database-url postgres://…; without it, the file log in the data
    /// directory. With JetStream any number of processors may run: they share the partitions (each owned
    /// by one processor at a time through a PostgreSQL advisory lock) and take over a dead one's.
    #[arg(help_heading = JETSTREAM, long, env = "EPS_LOG", value_parser = log_url)]
    pub log: Option<String>,

    #[command(flatten)]
    pub nats: NatsArgs,

    /// With JetStream: how often a processor checks who owns which partition, in milliseconds. A dead
    /// processor's partitions are taken over within about this long.
    #[arg(help_heading = JETSTREAM, long, env = "EPS_NATS_REBALANCE_MS", default_value_t = jetstream::DEFAULT_REBALANCE_INTERVAL.as_millis() as u64)]
    pub nats_rebalance_ms: u64,

    /// With JetStream: an event whose id appeared in the same partition within this many earlier stream
    /// messages is dropped as a duplicate (on top of JetStream's own duplicate window, which only drops
    /// a message published again whole).
    #[arg(help_heading = JETSTREAM, long, env = "EPS_NATS_DEDUP_WINDOW_MESSAGES", default_value_t = jetstream::DEFAULT_DEDUP_WINDOW_MESSAGES)]
    pub nats_dedup_window_messages: u64,

    /// With JetStream: most event ids that window holds per partition (the oldest messages are
    /// forgotten first); bounds the processor's memory.
    #[arg(help_heading = JETSTREAM, long, env = "EPS_NATS_DEDUP_MAX_IDS", default_value_t = jetstream::DEFAULT_DEDUP_MAX_IDS)]
    pub nats_dedup_max_ids: usize,
}

/// What `eps process` runs: the file log's processor, or one of a JetStream stream's processors.
#[derive(Debug)]
pub enum ProcessRun {
    File(ProcessOptions),
    JetStream(JetStreamProcessOptions),
}

/// `--metrics-listen` is not part of it: the binary serves the metrics before the run is built.
impl From<ProcessArgs> for ProcessRun {
    fn from(args: ProcessArgs) -> ProcessRun {
        let opts = ProcessOptions {
            data_dir: args.store.data_dir,
            database_url: args.store.database_url,
            follow: args.follow,
            batch_bytes: args.batch_bytes,
            poll_interval: Duration::from_millis(args.poll_ms),
            retry_for: Duration::from_secs(args.retry_secs),
            adopt_new_log: args.adopt_new_log,
            allow_other_store: args.store_check.allow_other_store,
        };
        let nats = args.nats;
        match LogBackend::from_flag(args.log, |url| nats.options(url)) {
            LogBackend::File => ProcessRun::File(opts),
            LogBackend::JetStream(nats) => ProcessRun::JetStream(JetStreamProcessOptions {
                rebalance_interval: Duration::from_millis(args.nats_rebalance_ms.max(10)),
                dedup_window_messages: args.nats_dedup_window_messages.max(1),
                dedup_max_ids: args.nats_dedup_max_ids,
                ..JetStreamProcessOptions::new(opts, nats)
            }),
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// JSON Lines file of events to send.
    #[arg(help_heading = CORE, env = "EPS_FILE", default_value = client::DEFAULT_FILE)]
    pub file: PathBuf,

    /// Base URL of a server; for several, repeat the flag or separate the URLs by commas.
    ///
    /// With several servers (also as a comma-separated EPS_URL), requests go round-robin to those
    /// that are up. A request that fails with a connection error, 408, 429 or 5xx is resent at once,
    /// as the same bytes (same ids), to the next server, and the failing one gets no new request for
    /// a backoff (500 ms, doubling up to 5 s while it keeps failing, reset by a success); then a
    /// single probe request tells whether it is back. With every server down, attempts are spaced by
    /// the retry backoff, as with one server. The summary adds a line of the events each server
    /// accepted.
    #[arg(help_heading = CORE, long, env = "EPS_URL", value_delimiter = ',', default_value = client::DEFAULT_URL)]
    pub url: Vec<String>,

    /// Events per request. 1 sends each event alone to POST /liveEvent (what the seed's server
    /// takes); more sends JSON Lines batches to POST /events, much faster. A batch is also cut at 1 MiB.
    #[arg(help_heading = CORE, long, env = "EPS_BATCH", default_value_t = client::DEFAULT_BATCH)]
    pub batch: usize,

    /// Requests in flight at once [default: 64 with --batch 1, else 8].
    #[arg(help_heading = CORE, long, env = "EPS_CONCURRENCY")]
    pub concurrency: Option<usize>,

    /// Attempts per event before it counts as failed (connection errors, 408, 429 and 5xx are retried).
    #[arg(help_heading = CORE, long, env = "EPS_MAX_ATTEMPTS", default_value_t = client::DEFAULT_MAX_ATTEMPTS)]
    pub max_attempts: u32,

    /// Per-request timeout, in seconds.
    #[arg(help_heading = CORE, long, env = "EPS_TIMEOUT_SECS", default_value_t = client::DEFAULT_TIMEOUT.as_secs())]
    pub timeout_secs: u64,

    /// Progress display: a bar on a terminal (auto), always a bar, plain lines, or nothing.
    #[arg(help_heading = CORE, long, env = "EPS_PROGRESS", value_enum, default_value_t = ProgressArg::Auto)]
    pub progress: ProgressArg,

    /// Stop once every server has failed every request for this many seconds (0: never), saving the
    /// checkpoint and printing the command that resumes. Exit code 1.
    #[arg(help_heading = CORE, long, env = "EPS_GIVE_UP_AFTER_SECS", default_value_t = DEFAULT_GIVE_UP_AFTER.as_secs())]
    pub give_up_after: u64,

    /// Write every line that was invalid, refused by the server or not delivered to this file, one per
    /// line, to be fixed and sent again. Invalid and refused lines are written unchanged; undelivered
    /// lines with the id they were sent with added, so that sending them again and resuming the run
    /// store them once. Emptied at the start of a send, appended to by a resumed run.
    #[arg(help_heading = CORE, long, env = "EPS_FAILED_OUT")]
    pub failed_out: Option<PathBuf>,

    /// Compress request bodies: gzip (Content-Encoding: gzip; the server limits the decompressed
    /// size), or none.
    #[arg(help_heading = CORE, long, env = "EPS_COMPRESS", value_enum, default_value_t = CompressArg::None)]
    pub compress: CompressArg,

    /// Directory of the checkpoints, one per input file [default: $XDG_STATE_HOME/eps/client, else
    /// ~/.local/state/eps/client].
    ///
    /// A file is known by a fingerprint of its first 64 KiB (of all of it when shorter), not by its
    /// name. Its checkpoint is the last line such that it and every line before it were acknowledged
    /// (or refused for their content, or invalid); a new run of the same file continues after it,
    /// once it has checked that the file still begins with the bytes sent, so a file that grew by
    /// appends sends only its new lines. Interrupted at any moment, even by SIGKILL, a run loses
    /// nothing and the next one stores nothing twice: the ids are <fingerprint>-<line number>, the
    /// same on every run and on every machine, so the server recognises what it already has.
    #[arg(help_heading = STORAGE, long, env = "EPS_STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    /// Send from the first line, ignoring the checkpoint. The ids are unchanged: events the server
    /// already has are answered as duplicates and not stored again.
    #[arg(help_heading = STORAGE, long, env = "EPS_FROM_START")]
    pub from_start: bool,

    /// Send the file as new events (fresh ids), for a deliberate second send. The new ids are kept in
    /// the checkpoint: a later run without the flag resumes this send. Do not leave EPS_NEW_RUN set.
    #[arg(help_heading = STORAGE, long, env = "EPS_NEW_RUN", conflicts_with = "from_start")]
    pub new_run: bool,

    /// Token sent in the Authorization header (default: the seed's "secret").
    #[arg(help_heading = TLS_AND_TOKENS, long, env = "EPS_TOKEN", default_value = srv::DEFAULT_TOKEN, hide_default_value = true, hide_env_values = true)]
    pub token: String,

    /// Trust only this CA (PEM) for https URLs, e.g. a private CA; without it, the platform's roots.
    #[arg(help_heading = TLS_AND_TOKENS, long, env = "EPS_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
}

impl From<ClientArgs> for ClientOptions {
    fn from(args: ClientArgs) -> ClientOptions {
        ClientOptions {
            file: args.file,
            urls: args.url,
            token: args.token,
            batch: args.batch.max(1),
            concurrency: args.concurrency.unwrap_or_else(|| client::default_concurrency(args.batch)).max(1),
            max_attempts: args.max_attempts.max(1),
            timeout: Duration::from_secs(args.timeout_secs),
            progress: args.progress.into(),
            state_dir: Some(args.state_dir.unwrap_or_else(client::state::StateDir::default_dir)),
            from_start: args.from_start,
            new_run: args.new_run,
            give_up_after: (args.give_up_after > 0).then(|| Duration::from_secs(args.give_up_after)),
            failed_out: args.failed_out,
            ca_cert: args.ca_cert,
            gzip: args.compress == CompressArg::Gzip,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompressArg {
    None,
    Gzip,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ProgressArg {
    Auto,
    Bar,
    Plain,
    Quiet,
}

impl From<ProgressArg> for Progress {
    fn from(progress: ProgressArg) -> Progress {
        match progress {
            ProgressArg::Auto => Progress::Auto,
            ProgressArg::Bar => Progress::Bar,
            ProgressArg::Plain => Progress::Plain,
            ProgressArg::Quiet => Progress::Quiet,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print JSON instead of text.
    #[arg(help_heading = CORE, long, env = "EPS_STATUS_JSON")]
    pub json: bool,

    #[command(flatten)]
    pub store: StoreArgs,

    #[command(flatten)]
    pub store_check: StoreCheckArgs,

    /// nats://host:port: show the JetStream stream's partitions instead of the file log (each one's
    /// checkpoint, last sequence and messages not yet applied), and how many processors share them.
    /// Needs --database-url postgres://…. The stream's settings (replicas, limits) are read from it.
    #[arg(help_heading = JETSTREAM, long, env = "EPS_LOG", value_parser = log_url)]
    pub log: Option<String>,

    #[command(flatten)]
    pub nats: NatsStreamArgs,
}

/// What `eps status` shows: the log's state (the file log's, or the JetStream stream's), and the store's.
#[derive(Debug)]
pub struct StatusOptions {
    /// An unsupported `--log` shows the file log, as it always has.
    pub log: LogBackend,
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    pub allow_other_store: bool,
    /// Print JSON instead of text.
    pub json: bool,
}

impl From<StatusArgs> for StatusOptions {
    fn from(args: StatusArgs) -> StatusOptions {
        let nats = args.nats;
        StatusOptions {
            log: LogBackend::from_flag(args.log, |url| nats.options(url)),
            data_dir: args.store.data_dir,
            database_url: args.store.database_url,
            allow_other_store: args.store_check.allow_other_store,
            json: args.json,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct CompactArgs {
    /// Move removed segments to this directory instead of deleting them.
    #[arg(help_heading = CORE, long, env = "EPS_ARCHIVE_DIR")]
    pub archive_dir: Option<PathBuf>,

    /// Keep segments written less than this many seconds ago. Default: --dedup-window-secs, the
    /// server's de-duplication window (a restart rebuilds that window from the recent segments).
    #[arg(help_heading = CORE, long, env = "EPS_MIN_AGE_SECS")]
    pub min_age_secs: Option<u64>,

    /// The server's de-duplication window, in seconds: the same setting (and variable) as the
    /// server's, so a configuration file or environment shared with the server gives both one value.
    /// Only used as the default of --min-age-secs.
    #[arg(help_heading = CORE, long, env = "EPS_DEDUP_WINDOW_SECS", default_value_t = DEFAULT_DEDUP_WINDOW_SECS)]
    pub dedup_window_secs: u64,

    /// Print what would be removed, remove nothing.
    #[arg(help_heading = CORE, long, env = "EPS_DRY_RUN")]
    pub dry_run: bool,

    #[command(flatten)]
    pub store: StoreArgs,

    #[command(flatten)]
    pub store_check: StoreCheckArgs,
}

impl From<CompactArgs> for CompactOptions {
    fn from(args: CompactArgs) -> CompactOptions {
        CompactOptions {
            data_dir: args.store.data_dir,
            database_url: args.store.database_url,
            archive_dir: args.archive_dir,
            min_age: Duration::from_secs(args.min_age_secs.unwrap_or(args.dedup_window_secs)),
            dry_run: args.dry_run,
            allow_other_store: args.store_check.allow_other_store,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Number of generated events sent after the seed's three.
    #[arg(help_heading = CORE, long, env = "EPS_DEMO_EVENTS", default_value_t = 10_000)]
    pub events: usize,
}

impl Command {
    /// The subcommand's name on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Server(_) => "server",
            Command::Process(_) => "process",
            Command::Client(_) => "client",
            Command::Demo(_) => "demo",
            Command::Status(_) => "status",
            Command::Config => "config",
            Command::Compact(_) => "compact",
            Command::Completions(_) => "completions",
            Command::Man(_) => "man",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn compaction_keeps_the_servers_dedup_window_by_default() {
        let server = Cli::try_parse_from(["eps", "server"]).unwrap();
        let compact = Cli::try_parse_from(["eps", "compact"]).unwrap();
        let (Command::Server(server), Command::Compact(compact)) = (server.command, compact.command) else { panic!() };
        assert_eq!((compact.min_age_secs, compact.dedup_window_secs), (None, server.dedup_window_secs));
    }

    #[test]
    fn the_flags_defaults_are_the_option_structs_defaults() {
        let Command::Server(args) = Cli::try_parse_from(["eps", "server"]).unwrap().command else { panic!() };
        assert_eq!(format!("{:?}", ServerOptions::from(args)), format!("{:?}", ServerOptions::new("./data")));
        let Command::Server(args) = Cli::try_parse_from(["eps", "server", "--log", "nats://n:4222"]).unwrap().command
        else {
            panic!()
        };
        let LogBackend::JetStream(nats) = ServerOptions::from(args).log else { panic!() };
        assert_eq!(format!("{nats:?}"), format!("{:?}", NatsLogOptions::new("nats://n:4222")));
    }

    #[test]
    fn every_command_refuses_a_log_that_is_not_a_jetstream_url_in_the_same_words() {
        for command in ["server", "process", "status"] {
            let err = Cli::try_parse_from(["eps", command, "--log", "http://x"]).unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{command}");
            assert!(
                err.to_string().contains(
                    "\"http://x\" is not a JetStream URL: use nats://host:port (several separated by commas), \
                     or leave --log out for the file log"
                ),
                "{command}: {err}"
            );
        }
        let Command::Process(args) = Cli::try_parse_from(["eps", "process", "--log", "nats://n:4222"]).unwrap().command
        else {
            panic!()
        };
        assert!(matches!(ProcessRun::from(args), ProcessRun::JetStream(_)));
    }
}
