//! Private NATS servers for the JetStream tests: one `nats-server -js` ([`Nats`]) or a three-node
//! JetStream cluster ([`NatsCluster`]), each on free loopback ports with its store in the test's
//! temporary directory (never the machine's shared server on 4222), killed when dropped; and
//! [`stream_events`], which reads back everything a stream holds.
//!
//! Which nats-server: `EPS_NATS_SERVER` names the binary (default: Debian's package, 2.9, which cannot
//! sync before acknowledging); with `EPS_NATS_SYNC_ALWAYS=1` (a current server, 2.10 or later) every
//! server is given a configuration file with `jetstream { sync_interval: always }` ([`synced`]; the eps
//! processes the tests start inherit no `EPS_*` variable, so they declare it only when a test gives
//! `--nats-sync-always`). `scripts/test` runs the JetStream tests with both servers.
//!
//! The typed account query of async-nats 0.46 does not parse a 2.9 server's answer, so readiness is
//! checked with raw `$JS.API.INFO` requests; stream and consumer calls work as typed.

#![allow(dead_code)]

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt as _;
use serde_json::Value;

use std::collections::BTreeMap;
use std::time::Instant;

use rust_decimal::Decimal;

use super::{args, within, ChildGuard, TestDb};

/// The `nats-server` binary: `EPS_NATS_SERVER` if set, else Debian's (the package installs it in
/// /usr/sbin, often not on `PATH`).
pub fn nats_server_binary() -> &'static str {
    static BINARY: OnceLock<String> = OnceLock::new();
    BINARY.get_or_init(|| {
        if let Some(binary) = std::env::var("EPS_NATS_SERVER").ok().filter(|b| !b.is_empty()) {
            Command::new(&binary).arg("--version").output().unwrap_or_else(|e| panic!("EPS_NATS_SERVER={binary}: {e}"));
            return binary;
        }
        ["nats-server", "/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|b| Command::new(b).arg("--version").output().is_ok())
            .expect("nats-server is not installed (scripts/test installs the Debian package nats-server)")
            .to_string()
    })
}

/// The version the nats-server binary reports (`2.9.10`), without its leading `v`.
pub fn nats_server_version() -> String {
    let out = Command::new(nats_server_binary()).arg("--version").output().expect("nats-server --version");
    let text = String::from_utf8_lossy(&out.stdout);
    // "nats-server: v2.12.8"
    text.trim().rsplit(' ').next().unwrap_or_default().trim_start_matches('v').to_string()
}

/// Whether the servers run with `sync_interval: always` (`EPS_NATS_SYNC_ALWAYS` set and not 0/false).
pub fn synced() -> bool {
    std::env::var("EPS_NATS_SYNC_ALWAYS").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false" | "no" | "off"))
}

/// What eps's promise says of the sync setting of these servers when eps is given
/// `--nats-sync-always` iff `declared`: `always`, `not_before_ack`, `unknown` or `contradicted`.
pub fn expected_sync(declared: bool) -> &'static str {
    let major_minor: Vec<u32> = nats_server_version().split('.').take(2).map(|p| p.parse().unwrap()).collect();
    let capable = major_minor >= vec![2, 10];
    match (capable, declared) {
        (true, true) => "always",
        (true, false) => "unknown",
        (false, true) => "contradicted",
        (false, false) => "not_before_ack",
    }
}

/// `text` (a server's configuration, possibly empty) with, for a synced run, a `jetstream` block that
/// syncs before acknowledging; `None` when there is nothing to write.
fn server_config(text: Option<&str>) -> Option<String> {
    if !synced() {
        return text.map(str::to_owned);
    }
    // The store directory stays on the command line (`-sd`): nats-server refuses it in both places.
    Some(format!("{}\njetstream {{ sync_interval: always }}\n", text.unwrap_or_default()))
}

/// `n` distinct free loopback ports (all bound at once, then released, so they differ).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    listeners.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// A client of one server or of several (`nats://a,nats://b`: async-nats wants them as a list).
pub async fn connect(urls: &str) -> Result<async_nats::Client, String> {
    let list: Vec<&str> = urls.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .request_timeout(Some(Duration::from_secs(2)))
        .connect(list)
        .await
        .map_err(|e| format!("connecting to {urls}: {e}"))
}

/// The answer of `$JS.API.INFO` on `url`, or why there is none. An answer without an `error` means
/// JetStream is up (in a cluster: the node sees a meta leader, which is what answers).
pub async fn jetstream_info(url: &str) -> Result<Value, String> {
    let client = connect(url).await?;
    let reply = client.request("$JS.API.INFO", "".into()).await.map_err(|e| format!("$JS.API.INFO on {url}: {e}"))?;
    let answer: Value =
        serde_json::from_slice(&reply.payload).map_err(|e| format!("$JS.API.INFO on {url} answered non-JSON: {e}"))?;
    match answer.get("error") {
        Some(error) => Err(format!("$JS.API.INFO on {url}: {error}")),
        None => Ok(answer),
    }
}

/// Waits (at most `limit`) until `$JS.API.INFO` on `url` answers without an error.
async fn wait_for_jetstream(url: &str, limit: Duration, what: &str) {
    within(limit, what, async {
        loop {
            match jetstream_info(url).await {
                Ok(_) => return,
                Err(e) => eprintln!("{what}: not yet: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
}

/// The stream's info (state, and in a cluster its leader and replicas).
pub async fn stream_info(urls: &str, name: &str) -> Result<stream::Info, String> {
    let js = jetstream::new(connect(urls).await?);
    let mut stream = js.get_stream(name).await.map_err(|e| format!("stream {name}: {e}"))?;
    stream.info().await.cloned().map_err(|e| format!("info of stream {name}: {e}"))
}

/// Every message of the stream, in order: its subject and the JSON Lines events of its payload.
/// Read with an ordered (ephemeral, unacknowledged) consumer from the first message up to the last
/// sequence the stream reports when the read starts.
pub async fn stream_messages(urls: &str, name: &str) -> Vec<(String, Vec<Value>)> {
    within(Duration::from_secs(30), &format!("reading the JetStream stream {name}"), async {
        let mut js = jetstream::new(connect(urls).await.unwrap());
        js.set_timeout(Duration::from_secs(2));
        let mut stream = js.get_stream(name).await.unwrap_or_else(|e| panic!("the stream {name} exists: {e}"));
        let last = stream.info().await.unwrap().state.last_sequence;
        let mut out = Vec::new();
        if last == 0 {
            return out;
        }
        // While a node of a cluster is down, NATS 2.9 may place the one-replica consumer on it (it
        // does not know the node is gone yet) and the creation then times out: try again, which
        // places it anew.
        let mut messages = loop {
            let created = async {
                let consumer = stream
                    .create_consumer(consumer::pull::OrderedConfig {
                        deliver_policy: consumer::DeliverPolicy::All,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                consumer.messages().await.map_err(|e| e.to_string())
            };
            match created.await {
                Ok(messages) => break messages,
                Err(e) => eprintln!("an ordered consumer on {name}: {e}; trying again"),
            }
        };
        while let Some(message) = messages.next().await {
            let message = message.unwrap_or_else(|e| panic!("reading {name}: {e}"));
            let seq = message.info().unwrap().stream_sequence;
            let text = std::str::from_utf8(&message.payload).unwrap_or_else(|e| panic!("message {seq}: {e}"));
            assert!(text.ends_with('\n'), "message {seq} is not whole lines: {text:?}");
            let lines = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("message {seq}, line {l:?}: {e}")))
                .collect();
            out.push((message.subject.to_string(), lines));
            if seq >= last {
                break;
            }
        }
        out
    })
    .await
}

/// Every event the stream holds, in stream order (each message's payload split into its lines).
pub async fn stream_events(urls: &str, name: &str) -> Vec<Value> {
    stream_messages(urls, name).await.into_iter().flat_map(|(_, lines)| lines).collect()
}

/// Spawns `nats-server ARGS`, its output appended to `log` (kept across restarts).
fn spawn_nats(args: &[String], log: &Path) -> Child {
    let out = OpenOptions::new().create(true).append(true).open(log).unwrap();
    Command::new(nats_server_binary())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .expect("start nats-server")
}

/// SIGKILLs the child, if running, and reaps it.
fn kill_child(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

// ---------------------------------------------------------------------------------------------------
// One server

/// A private `nats-server -js`, killed when dropped.
pub struct Nats {
    child: Option<Child>,
    /// The address it listens on (127.0.0.1 unless started with [`Nats::start_on`]).
    pub host: String,
    pub port: u16,
    store: PathBuf,
    log: PathBuf,
    /// A configuration file given with `-c` (settings the command line has no flag for).
    config: Option<PathBuf>,
}

impl Nats {
    /// Starts a server with its store in `dir/nats-store` and waits until JetStream answers.
    pub async fn start(dir: &Path) -> Nats {
        Nats::start_with_config(dir, None).await
    }

    /// [`Nats::start`] with `config` (nats-server's configuration syntax, e.g. `max_payload: 65536`)
    /// written to `dir/nats-server.conf` and given with `-c`; the command line's flags still apply.
    pub async fn start_with_config(dir: &Path, config: Option<&str>) -> Nats {
        Nats::start_on_with_config(dir, "127.0.0.1", config).await
    }

    /// [`Nats::start`] listening on `host` (an address of this machine) instead of loopback, on a port
    /// free on loopback.
    pub async fn start_on(dir: &Path, host: &str) -> Nats {
        Nats::start_on_with_config(dir, host, None).await
    }

    async fn start_on_with_config(dir: &Path, host: &str, config: Option<&str>) -> Nats {
        let port = free_ports(1)[0];
        let config = server_config(config).map(|text| {
            let path = dir.join("nats-server.conf");
            std::fs::write(&path, text).unwrap();
            path
        });
        let mut nats = Nats {
            child: None,
            host: host.to_string(),
            port,
            store: dir.join("nats-store"),
            log: dir.join("nats-server.log"),
            config,
        };
        nats.resume().await;
        nats
    }

    /// What the server has written to its log so far (to show when something fails).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("nats://{}:{}", self.host, self.port)
    }

    /// Starts the server (again) on the same port and store, and waits until JetStream answers.
    pub async fn resume(&mut self) {
        assert!(self.child.is_none(), "nats-server is already running");
        let mut args = vec![
            "-js".to_string(),
            "-a".into(),
            self.host.clone(),
            "-p".into(),
            self.port.to_string(),
            "-sd".into(),
            self.store.display().to_string(),
        ];
        if let Some(config) = &self.config {
            args.extend(["-c".to_string(), config.display().to_string()]);
        }
        self.child = Some(spawn_nats(&args, &self.log));
        wait_for_jetstream(&self.url(), Duration::from_secs(20), "nats-server to answer JetStream requests").await;
    }

    /// SIGKILLs the server (its store stays).
    pub fn stop(&mut self) {
        kill_child(&mut self.child);
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------------
// A three-node cluster

/// Nodes of a [`NatsCluster`].
pub const CLUSTER_NODES: usize = 3;

/// Three `nats-server -js` on loopback forming the JetStream cluster `eps-test`, killed when dropped.
///
/// Node `i` is named `n<i>`, takes clients on its own port and routes on another, keeps its store in
/// `dir/n<i>/` and appends its output to `dir/n<i>.log`, and solicits routes to the two others.
pub struct NatsCluster {
    nodes: Vec<Node>,
}

struct Node {
    name: String,
    args: Vec<String>,
    client_port: u16,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }
}

impl NatsCluster {
    /// Starts the three nodes and waits until the cluster takes a 3-replica stream (a meta leader is
    /// elected and every node has joined the meta group).
    pub async fn start(dir: &Path) -> NatsCluster {
        std::fs::create_dir_all(dir).unwrap();
        let ports = free_ports(2 * CLUSTER_NODES);
        let (client_ports, cluster_ports) = ports.split_at(CLUSTER_NODES);
        let route = |p: u16| format!("nats://127.0.0.1:{p}");
        let nodes = (0..CLUSTER_NODES)
            .map(|i| {
                let name = format!("n{i}");
                let routes: Vec<String> =
                    (0..CLUSTER_NODES).filter(|&j| j != i).map(|j| route(cluster_ports[j])).collect();
                let mut args = vec![
                    "-js".to_string(),
                    "--server_name".into(),
                    name.clone(),
                    "-a".into(),
                    "127.0.0.1".into(),
                    "-p".into(),
                    client_ports[i].to_string(),
                    "-sd".into(),
                    dir.join(&name).display().to_string(),
                    "--cluster_name".into(),
                    "eps-test".into(),
                    "--cluster".into(),
                    route(cluster_ports[i]),
                    "--routes".into(),
                    routes.join(","),
                ];
                if let Some(text) = server_config(None) {
                    let path = dir.join(format!("{name}.conf"));
                    std::fs::write(&path, text).unwrap();
                    args.extend(["-c".to_string(), path.display().to_string()]);
                }
                Node { log: dir.join(format!("{name}.log")), name, args, client_port: client_ports[i], child: None }
            })
            .collect();
        let mut cluster = NatsCluster { nodes };
        for node in &mut cluster.nodes {
            node.child = Some(spawn_nats(&node.args, &node.log));
        }
        for node in &cluster.nodes {
            let what = format!("node {} to answer $JS.API.INFO", node.name);
            wait_for_jetstream(&node.url(), Duration::from_secs(30), &what).await;
        }
        cluster.wait_for_replicated_streams().await;
        cluster
    }

    /// Creates (and deletes) a 3-replica probe stream until that works: only then does a client's
    /// stream creation succeed at once (before, the meta group may lack peers).
    async fn wait_for_replicated_streams(&self) {
        let urls = self.urls();
        within(Duration::from_secs(30), "the NATS cluster to take a 3-replica stream", async {
            loop {
                let attempt = async {
                    let js = jetstream::new(connect(&urls).await?);
                    let config = stream::Config {
                        name: "EPS_TEST_PROBE".into(),
                        subjects: vec!["eps-test-probe".into()],
                        num_replicas: CLUSTER_NODES,
                        storage: stream::StorageType::Memory,
                        ..Default::default()
                    };
                    js.get_or_create_stream(config).await.map_err(|e| format!("creating the probe stream: {e}"))?;
                    js.delete_stream("EPS_TEST_PROBE").await.map_err(|e| format!("deleting the probe stream: {e}"))?;
                    Ok::<(), String>(())
                };
                match attempt.await {
                    Ok(()) => return,
                    Err(e) => eprintln!("NATS cluster not ready: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
        .await
    }

    /// `nats://127.0.0.1:p0,nats://127.0.0.1:p1,nats://127.0.0.1:p2`, the form `eps --log` takes.
    pub fn urls(&self) -> String {
        self.nodes.iter().map(Node::url).collect::<Vec<_>>().join(",")
    }

    /// The client URL of node `i`.
    pub fn url(&self, i: usize) -> String {
        self.nodes[i].url()
    }

    /// The URLs of the nodes now running, comma-separated.
    pub fn live_urls(&self) -> String {
        self.nodes.iter().filter(|n| n.child.is_some()).map(Node::url).collect::<Vec<_>>().join(",")
    }

    /// The server name of node `i` (`n<i>`), as stream info names leaders and replicas.
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The node of a server name.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// The output node `i` has written so far (to show when something fails).
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    /// SIGKILLs node `i` (its store stays).
    pub fn kill(&mut self, i: usize) {
        kill_child(&mut self.nodes[i].child);
    }

    /// Starts node `i` again on its ports and store, and waits until it answers `$JS.API.INFO` (it is
    /// back in the cluster and sees a meta leader; its streams may still be catching up).
    pub async fn restart(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "node {} is already running", node.name);
        node.child = Some(spawn_nats(&node.args, &node.log));
        let what = format!("restarted node {} to answer $JS.API.INFO", node.name);
        wait_for_jetstream(&node.url(), Duration::from_secs(30), &what).await;
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            kill_child(&mut node.child);
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Processors on the stream

/// `eps process --follow` on the JetStream log, rebalancing often so the test sees takeovers quickly.
pub fn follower(dir: &Path, nats: &str, db: &TestDb, extra: &[&str]) -> ChildGuard {
    let mut a = args(&["process", "--follow", "--log", nats, "--nats-rebalance-ms", "200"]);
    a.extend(db.args());
    a.extend(extra.iter().map(|s| s.to_string()));
    ChildGuard::spawn(&a, &[], dir)
}

/// Waits until the database holds exactly `expected` (the processors are still running) and the
/// partitions' checkpoints count every event exactly once. Events of `extra_user` (value 1 each) are
/// left out of the comparison and counted separately; their count is returned.
pub async fn wait_for_totals(
    db: &TestDb,
    dir: &Path,
    expected: &BTreeMap<String, Decimal>,
    events: u64,
    extra_user: Option<&str>,
) -> u64 {
    let started = Instant::now();
    let (mut last, mut applied, mut extra) = (BTreeMap::new(), 0, 0);
    while started.elapsed() < Duration::from_secs(60) {
        last = db.revenues(dir).await;
        extra = extra_user.and_then(|u| last.remove(u)).map_or(0, |v| v.to_string().parse::<u64>().unwrap());
        applied = checkpoint_events(db).await;
        if &last == expected && applied == events + extra {
            return extra;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let wrong: Vec<_> = expected
        .iter()
        .filter(|(u, v)| last.get(*u) != Some(v))
        .take(5)
        .map(|(u, v)| format!("{u}: expected {v}, got {:?}", last.get(u)))
        .collect();
    panic!(
        "totals differ from the file's: {wrong:?} ({} users in the database, {} expected); checkpoints count {applied} \
         events, expected {events} + {extra}",
        last.len(),
        expected.len()
    );
}

/// Sum of `events_applied` over the partitions' checkpoints.
pub async fn checkpoint_events(db: &TestDb) -> u64 {
    let (client, connection) =
        tokio_postgres::connect(db.url.as_deref().unwrap(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT COALESCE(SUM(events_applied), 0)::bigint FROM eps_checkpoints WHERE stream LIKE 'jetstream/%'",
            &[],
        )
        .await
        .unwrap();
    row.get::<_, i64>(0) as u64
}
