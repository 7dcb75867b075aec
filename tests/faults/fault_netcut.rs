//! A JetStream processor whose machine vanishes loses its partitions within a stated time (issue 15,
//! item 2; ARCHITECTURE.md, "JetStream mode: who owns a partition").
//!
//! A killed process is the easy case: its kernel closes the socket and PostgreSQL ends the session at
//! once. A vanished machine (power, kernel panic, cable, partition) sends nothing more: no FIN, no RST.
//! This test makes that happen for real. Processor A runs in a network namespace of the test's own,
//! joined to this machine by a veth pair on a private /30; PostgreSQL (a cluster of this test, from
//! `scripts/pg-throwaway start --listen … --trust …`) and nats-server listen on the machine's end.
//! Processor B runs on the machine. Once A and B share the partitions, the namespace's end of the pair
//! goes down (everything A's machine would send is gone, and what is sent to it vanishes silently),
//! A is SIGKILLed (its FIN goes nowhere), events are sent, and B must apply every one of them
//! within [`TAKEOVER_BOUND`]. The takeover time is printed (docs/SCALING.md states it).
//!
//! Needs root and iproute2's `ip` (scripts/test runs as root); it fails, not skips, without them.

use crate::common;

use std::collections::BTreeMap;
use std::process::Command as StdCommand;
use std::str::FromStr;
use std::time::{Duration, Instant};

use common::fault::{self, Report};
use common::nats::Nats;
use common::pg::PgCluster;
use common::*;
use rand::{Rng as _, SeedableRng as _};
use rust_decimal::Decimal;

/// Partitions of the stream (eps's default).
const PARTITIONS: u32 = 16;
/// A guard, not a speed requirement: PostgreSQL must give up on A's session and B take its partitions
/// well before the kernel's two-hour keepalive that applied before; about 11 s are expected
/// (`SERVER_GIVES_UP_AFTER` in src/processor/ownership.rs), this leaves room for a loaded machine.
const TAKEOVER_BOUND: Duration = Duration::from_secs(45);

// ---------------------------------------------------------------------------------------------------
// The network namespace

/// `ip` (iproute2; often in /usr/sbin, not on a test's `PATH`).
fn ip_binary() -> &'static str {
    ["ip", "/usr/sbin/ip", "/sbin/ip"]
        .into_iter()
        .find(|b| StdCommand::new(b).arg("-V").output().is_ok())
        .expect("iproute2's ip is not installed: this test builds a network namespace with it")
}

fn ip(args: &[&str]) {
    let out = StdCommand::new(ip_binary()).args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {} failed ({}): {} (this test needs root: scripts/test runs as root)",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace (processor A's "machine") joined to this one by a veth pair on a private /30;
/// the namespace, and with it the pair, is deleted when dropped, also when the test fails.
struct NetNs {
    name: String,
    host_if: String,
    ns_if: String,
    /// The machine's end of the pair: where PostgreSQL and nats-server listen for A.
    host_addr: String,
    /// The namespace's end (A's address).
    ns_addr: String,
    /// The /30 of the pair.
    net: String,
}

impl NetNs {
    fn create() -> NetNs {
        let id = std::process::id();
        // One /30 per test process in 10.213.0.0/16 (not a network of this machine's, checked below).
        let block = (id % 16_384) * 4;
        let (hi, lo) = (block / 256, block % 256);
        let ns = NetNs {
            name: format!("eps-netcut-{id}"),
            host_if: format!("epsnc{id}h"),
            ns_if: format!("epsnc{id}n"),
            host_addr: format!("10.213.{hi}.{}", lo + 1),
            ns_addr: format!("10.213.{hi}.{}", lo + 2),
            net: format!("10.213.{hi}.{lo}/30"),
        };
        let routes = StdCommand::new(ip_binary()).args(["-4", "route", "show", "table", "all"]).output().unwrap();
        let routes = String::from_utf8_lossy(&routes.stdout);
        assert!(!routes.contains("10.213."), "10.213.0.0/16 is already used on this machine: {routes}");
        // The guard exists before anything is made, so a failure half-way removes what was.
        ip(&["netns", "add", &ns.name]);
        ip(&["link", "add", &ns.host_if, "type", "veth", "peer", "name", &ns.ns_if]);
        ip(&["link", "set", &ns.ns_if, "netns", &ns.name]);
        ip(&["addr", "add", &format!("{}/30", ns.host_addr), "dev", &ns.host_if]);
        ip(&["link", "set", &ns.host_if, "up"]);
        ip(&["-n", &ns.name, "addr", "add", &format!("{}/30", ns.ns_addr), "dev", &ns.ns_if]);
        ip(&["-n", &ns.name, "link", "set", &ns.ns_if, "up"]);
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        eprintln!(
            "network namespace {} ({} on {}), this machine at {} on {}",
            ns.name, ns.ns_addr, ns.ns_if, ns.host_addr, ns.host_if
        );
        ns
    }

    /// `ip netns exec NAME`: runs a command inside the namespace.
    fn exec_prefix(&self) -> [&str; 4] {
        [ip_binary(), "netns", "exec", &self.name]
    }

    /// The namespace's network card goes down: nothing A's machine sends leaves it, and what this
    /// machine sends to A is dropped silently (the pair has no carrier): no RST, no ICMP, no FIN.
    fn cut(&self) {
        ip(&["-n", &self.name, "link", "set", &self.ns_if, "down"]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and the pair with it; the explicit
        // deletion of this machine's end covers a half-made pair.
        for args in [vec!["netns", "del", &self.name], vec!["link", "del", &self.host_if]] {
            let _ = StdCommand::new(ip_binary()).args(&args).stderr(std::process::Stdio::null()).status();
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// The test's own PostgreSQL cluster (the shared throwaway one listens on loopback only)

impl PgCluster {
    fn url_on(&self, host: &str) -> String {
        format!("postgres://postgres@{host}:{}/postgres", self.port)
    }
}

/// Partition locks held now, per client address of the session holding them (`host(client_addr)`).
async fn partition_holders(pg: &tokio_postgres::Client) -> BTreeMap<String, i64> {
    let rows = pg
        .query(
            "SELECT COALESCE(host(a.client_addr), 'local'), count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.classid < 1073741824
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
             GROUP BY 1",
            &[],
        )
        .await
        .unwrap();
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// Events the checkpoints count, and every user's revenue (nothing before the tables exist).
async fn applied(pg: &tokio_postgres::Client) -> (u64, BTreeMap<String, Decimal>) {
    let events = pg
        .query_one(
            "SELECT COALESCE(SUM(events_applied), 0)::bigint FROM eps_checkpoints WHERE stream LIKE 'jetstream/%'",
            &[],
        )
        .await
        .map_or(0, |r| r.get::<_, i64>(0) as u64);
    let revenues = match pg.query("SELECT user_id, revenue::text FROM users_revenue", &[]).await {
        Ok(rows) => rows.iter().map(|r| (r.get(0), Decimal::from_str(r.get(1)).unwrap())).collect(),
        Err(_) => BTreeMap::new(),
    };
    (events, revenues)
}

/// `n` events over `users` users (`prefix<k>`), two-decimal values, and their totals added to `expected`.
fn events(
    rng: &mut rand::rngs::StdRng,
    prefix: &str,
    n: usize,
    users: usize,
    expected: &mut BTreeMap<String, Decimal>,
) -> Vec<String> {
    (0..n)
        .map(|i| {
            let user = format!("{prefix}{}", i % users);
            let value = Decimal::new(rng.random_range(1..100_000), 2);
            *expected.entry(user.clone()).or_default() += value;
            event_line(&user, "add_revenue", &value.to_string())
        })
        .collect()
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

async fn post_all(http: &reqwest::Client, url: &str, lines: &[String]) {
    for chunk in lines.chunks(500) {
        let body: String = chunk.iter().map(|l| format!("{l}\n")).collect();
        let (status, answer) = post_ndjson(http, url, body).await;
        assert_eq!(status, 200, "POST /events: {answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_whose_network_is_cut_loses_its_partitions_within_the_stated_time() {
    const SCENARIO: &str = "jetstream_processor_network_cut";
    let started = Instant::now();
    let seed = fault::seed(SCENARIO);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let net = NetNs::create();
    let dir = tempfile::tempdir().unwrap();
    let pg = PgCluster::start(&["--listen", &net.host_addr, "--trust", &net.net]).await;
    let nats = Nats::start_on(dir.path(), &net.host_addr).await;
    let watch = pg.connect().await;

    let data = dir.path().join("server");
    std::fs::create_dir_all(&data).unwrap();
    let server = ServerProc::start(
        &args(&["server", "--listen", "127.0.0.1:0", "--data-dir", &data.display().to_string(), "--log", &nats.url()]),
        &[],
        dir.path(),
    )
    .await;
    let http = http();
    let processor = |url: String| {
        args(&["process", "--follow", "--log", &nats.url(), "--nats-rebalance-ms", "200", "--database-url", &url])
    };

    // A, on the far side of the pair, takes every partition and applies what arrives.
    let mut a = ChildGuard::spawn_via(&net.exec_prefix(), &processor(pg.url_on(&net.host_addr)), &[], dir.path());
    let mut expected = BTreeMap::new();
    let before = events(&mut rng, "warm", 64, 64, &mut expected);
    post_all(&http, &server.url, &before).await;
    within(Duration::from_secs(60), "A to apply the first events", async {
        while applied(&watch).await.0 < before.len() as u64 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let holders = partition_holders(&watch).await;
    assert_eq!(
        holders.get(&net.ns_addr),
        Some(&(PARTITIONS as i64)),
        "A holds every partition: {holders:?}\n{}",
        a.stderr()
    );

    // B, on this machine, joins; A gives it half.
    let b = ChildGuard::spawn(&processor(pg.url.clone()), &[], dir.path());
    let holders = within(Duration::from_secs(30), "A and B to share the partitions", async {
        loop {
            let holders = partition_holders(&watch).await;
            let (on_a, on_b) =
                (holders.get(&net.ns_addr).copied().unwrap_or(0), holders.get("127.0.0.1").copied().unwrap_or(0));
            if on_a > 0 && on_b > 0 && on_a + on_b == PARTITIONS as i64 {
                return holders;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let on_a = holders[&net.ns_addr];
    eprintln!("before the cut: {holders:?}");

    // A's machine vanishes: its network first (so not even the FIN of its death gets out), then A.
    net.cut();
    let cut = Instant::now();
    a.child.start_kill().unwrap();
    a.child.wait().await.unwrap();
    let after = events(&mut rng, "user", fault::scaled(256, 20_000), 256, &mut expected);
    post_all(&http, &server.url, &after).await;
    let total = (before.len() + after.len()) as u64;

    let (mut locks_gone, mut last) = (None, (0, BTreeMap::new()));
    let deadline = cut + TAKEOVER_BOUND;
    while Instant::now() < deadline {
        let holders = partition_holders(&watch).await;
        if locks_gone.is_none() && !holders.contains_key(&net.ns_addr) {
            locks_gone = Some(cut.elapsed());
        }
        last = applied(&watch).await;
        if last.0 == total && last.1 == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let takeover = cut.elapsed();
    let holders = partition_holders(&watch).await;
    assert!(
        last.0 == total && last.1 == expected,
        "{TAKEOVER_BOUND:?} after A's network was cut and A killed, {} of {total} events are applied ({} users of {} \
         exact); partition locks now {holders:?} (A at {} held {on_a}); A's locks released after {locks_gone:?}\nB's log (end):\n{}",
        last.0,
        expected.iter().filter(|(u, v)| last.1.get(*u) == Some(v)).count(),
        expected.len(),
        net.ns_addr,
        tail(&b.stderr(), 30)
    );
    let locks_gone = locks_gone.expect("A's locks are gone once B applied A's partitions");
    eprintln!(
        "takeover after a network cut: A's {on_a} partition locks released {:.1} s after the cut, every event applied by B \
         {:.1} s after it",
        locks_gone.as_secs_f64(),
        takeover.as_secs_f64()
    );
    assert_eq!(holders.get("127.0.0.1"), Some(&(PARTITIONS as i64)), "B holds every partition: {holders:?}");

    // What made it so, as A's session read it back from PostgreSQL (SHOW, through pg_settings).
    let a_log = a.stderr();
    if let Some(line) = a_log.lines().find(|l| l.contains("tcp_keepalives_idle=")) {
        eprintln!("A's session: {line}");
    }
    for setting in
        ["tcp_keepalives_idle=5s", "tcp_keepalives_interval=2s", "tcp_keepalives_count=3", "tcp_user_timeout=10000ms"]
    {
        assert!(a_log.contains(setting), "A's log does not show {setting} in force on its session:\n{a_log}");
    }
    assert!(a_log.contains("idle_session_timeout="), "A's log does not show idle_session_timeout:\n{a_log}");

    Report {
        scenario: SCENARIO,
        store: "postgres",
        seed,
        events_sent: total,
        kills: 1,
        duration: started.elapsed(),
        notes: format!(
            "JetStream log: processor A in a network namespace of its own, B on the machine; A's network cut (veth \
             down: no FIN, no RST) and A SIGKILLed while it held {on_a} of {PARTITIONS} partitions, then {} events \
             sent; PostgreSQL ended A's session {:.1} s after the cut, B had applied every event {:.1} s after it",
            after.len(),
            locks_gone.as_secs_f64(),
            takeover.as_secs_f64()
        ),
        ..Report::default()
    }
    .write();
    drop(b);
}
