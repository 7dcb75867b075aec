//! `eps process --log nats://…`: several processors share a JetStream stream's partitions and apply it to
//! PostgreSQL exactly once, through SIGKILLs of servers and processors and an outage of JetStream itself.
//!
//! Each test starts its own `nats-server -js` on a free port with a fresh store directory and uses a
//! fresh PostgreSQL database (run through scripts/test, which provides `EPS_TEST_PG_URL`).

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use common::fault::{self, Report};
use common::nats::{expected_sync, follower, nats_server_version, wait_for_totals, Nats};
use common::*;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;

/// Writes `n` events over `users` users with two-decimal values of both signs, and returns the file
/// and each user's exact expected revenue.
fn generate(dir: &Path, n: usize, users: usize, seed: u64) -> (PathBuf, BTreeMap<String, Decimal>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut expected: BTreeMap<String, Decimal> = BTreeMap::new();
    let mut text = String::with_capacity(n * 70);
    for _ in 0..n {
        let user = format!("user{}", rng.random_range(0..users));
        let cents: i64 = rng.random_range(1..100_000);
        let value = Decimal::new(cents, 2);
        let add = rng.random_bool(0.7);
        let name = if add { "add_revenue" } else { "subtract_revenue" };
        *expected.entry(user.clone()).or_default() += if add { value } else { -value };
        text.push_str(&format!("{{\"userId\":\"{user}\",\"name\":\"{name}\",\"value\":{value}}}\n"));
    }
    let path = dir.join("events.jsonl");
    std::fs::write(&path, text).unwrap();
    (path, expected)
}

/// `eps server` on the JetStream log, on `port` (0 for any).
async fn nats_server(dir: &Path, nats: &str, port: u16, name: &str) -> ServerProc {
    let data = dir.join(name);
    std::fs::create_dir_all(&data).unwrap();
    let listen = format!("127.0.0.1:{port}");
    let a = args(&["server", "--listen", &listen, "--data-dir", &data.display().to_string(), "--log", nats]);
    ServerProc::start(&a, &[], dir).await
}

/// `eps status --log URL --json` as JSON.
async fn jetstream_status(nats: &str, db: &TestDb) -> serde_json::Value {
    let mut a = args(&["status", "--json", "--log", nats]);
    a.extend(db.args());
    let out = run_eps(&a, &[]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

fn client_args(file: &Path, urls: &[&str], extra: &[&str]) -> Vec<String> {
    let mut a = args(&["client", &file.display().to_string(), "--progress", "quiet", "--max-attempts", "1000"]);
    for url in urls {
        a.extend(["--url".to_string(), url.to_string()]);
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Waits for a spawned client and checks that it sent every event.
async fn client_succeeded(client: &mut ChildGuard, events: usize) {
    // Hang guard only (the long JetStream run sends 1,000,000 events).
    let limit = fault::scaled(Duration::from_secs(300), Duration::from_secs(3600));
    let status = within(limit, "the client to finish (hang guard)", client.child.wait()).await.unwrap();
    let out = client.stdout();
    assert!(status.success(), "client failed: {status}\nstdout: {out}\nstderr: {}", client.stderr());
    assert!(
        out.contains(&format!("accepted {events}")) || out.contains(&format!("sent {events}, accepted")),
        "client output: {out}"
    );
    assert!(out.contains("failed 0"), "client output: {out}");
}

/// Events the processors have applied so far (0 until they created their tables).
async fn applied_so_far(db: &TestDb) -> u64 {
    let Ok((client, connection)) = tokio_postgres::connect(db.url.as_deref().unwrap(), tokio_postgres::NoTls).await
    else {
        return 0;
    };
    tokio::spawn(connection);
    let sql = "SELECT COALESCE(SUM(events_applied), 0)::bigint FROM eps_checkpoints WHERE stream LIKE 'jetstream/%'";
    client.query_one(sql, &[]).await.map_or(0, |row| row.get::<_, i64>(0) as u64)
}

#[tokio::test(flavor = "multi_thread")]
async fn two_servers_and_three_processors_count_every_event_once_through_sigkills() {
    // The JetStream row of docs/RELIABILITY.md: short here, long (more events, more kills) with
    // EPS_FAULT_LONG=1 in scripts/fault-suite.
    const SCENARIO: &str = "jetstream_servers_and_processors_killed_while_the_client_retries";
    let started = Instant::now();
    let seed = fault::seed(SCENARIO);
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start(dir.path()).await;
    let db = TestDb::new(StoreKind::Postgres).await;
    let events = fault::scaled(200_000, 1_000_000);
    let rounds: u64 = fault::scaled(2, 20);
    let (file, expected) = generate(dir.path(), events, 2_000, seed);

    let mut servers = [
        nats_server(dir.path(), &nats.url(), 0, "server-a").await,
        nats_server(dir.path(), &nats.url(), 0, "server-b").await,
    ];
    let mut processors: Vec<ChildGuard> = (0..3).map(|_| follower(dir.path(), &nats.url(), &db, &[])).collect();
    let (url_a, url_b) = (servers[0].url.clone(), servers[1].url.clone());

    let mut client = ChildGuard::spawn(
        &client_args(&file, &[&url_a, &url_b], &["--batch", "50", "--concurrency", "4"]),
        &[],
        dir.path(),
    );
    // Each round SIGKILLs one server and one processor once the events applied pass the round's point (a
    // random point in each of equal stretches of the first half of the events: the processors follow
    // the client closely, so it is still sending), and restarts both once the next requests went to the
    // other server. Progress decides, not time: no assumption about the machine's speed.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let points: Vec<u64> = (0..rounds)
        .map(|r| ((r as f64 + rng.random_range(0.0..1.0)) * events as f64 / 2.0 / rounds as f64) as u64)
        .collect();
    let (mut kills, mut kills_while_sending) = (0u64, 0u64);
    for (round, point) in points.iter().enumerate() {
        within(Duration::from_secs(600), "the events applied to pass the next kill point (hang guard)", async {
            while applied_so_far(&db).await < *point {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let (s, p) = (round % 2, round % 3);
        let port = servers[s].port;
        kills_while_sending += u64::from(client.child.try_wait().unwrap().is_none());
        servers[s].kill().await;
        processors[p].child.start_kill().unwrap();
        processors[p].child.wait().await.unwrap();
        kills += 2;
        // The other server and processors carry on meanwhile; a little progress before the restart.
        let applied = applied_so_far(&db).await;
        within(Duration::from_secs(600), "progress while a server and a processor are down (hang guard)", async {
            while applied_so_far(&db).await < applied + 500 && client.child.try_wait().unwrap().is_none() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let name = if s == 0 { "server-a" } else { "server-b" };
        servers[s] = nats_server(dir.path(), &nats.url(), port, name).await;
        processors[p] = follower(dir.path(), &nats.url(), &db, &[]);
    }
    // The points lie in the first half of the events: the kills landed while the client was sending.
    assert!(kills_while_sending > 0, "every kill came after the client had finished");

    client_succeeded(&mut client, events).await;
    // Returns only once every user's total is exact and the checkpoints count each event once (it
    // panics otherwise, and no report is written: the fault suite stops there).
    wait_for_totals(&db, dir.path(), &expected, events as u64, None).await;
    Report {
        scenario: SCENARIO,
        store: "postgres",
        seed,
        events_sent: events as u64,
        kills,
        events_lost: 0,
        events_doubled: 0,
        duration: started.elapsed(),
        notes: format!(
            "JetStream log: two eps server and three eps process --follow; {rounds} rounds each SIGKILLed one \
             server and one processor at a point of progress ({kills_while_sending} of them while eps client \
             still sent, --batch 50 --concurrency 4 across both servers, retries) and restarted them; totals in \
             PostgreSQL exact"
        ),
        ..Report::default()
    }
    .write();

    // The three processors share the 16 partitions: each holds some, and together all of them.
    let (pg, connection) = tokio_postgres::connect(db.url.as_deref().unwrap(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let started = Instant::now();
    loop {
        let rows = pg
            .query(
                "SELECT pid, count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2
                 AND classid < 1073741824 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                 GROUP BY pid",
                &[],
            )
            .await
            .unwrap();
        let counts: Vec<i64> = rows.iter().map(|r| r.get(1)).collect();
        if counts.len() == 3 && counts.iter().sum::<i64>() == 16 && counts.iter().all(|&c| c >= 4) {
            break;
        }
        // A guard against never spreading (rebalancing runs every 500 ms), generous for a loaded machine.
        assert!(started.elapsed() < Duration::from_secs(60), "partitions not spread over the 3 processors: {counts:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(processors);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_jetstream_outage_gives_503s_and_loses_or_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = Nats::start(dir.path()).await;
    let db = TestDb::new(StoreKind::Postgres).await;
    let events = 60_000;
    let (file, expected) = generate(dir.path(), events, 500, 9);
    let server = nats_server(dir.path(), &nats.url(), 0, "server").await;
    let _processor = follower(dir.path(), &nats.url(), &db, &[]);

    let mut client = ChildGuard::spawn(
        &client_args(&file, &[&server.url], &["--batch", "20", "--concurrency", "4"]),
        &[],
        dir.path(),
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(client.child.try_wait().unwrap().is_none(), "the client finished before the outage: make the run longer");
    nats.stop();
    // While JetStream is away, the server refuses with 503 and Retry-After: never a 200.
    let http = http();
    let started = Instant::now();
    let mut refused = 0;
    while started.elapsed() < Duration::from_secs(2) {
        let response = http
            .post(format!("{}/liveEvent", server.url))
            .header("Authorization", TOKEN)
            .header("Content-Type", "application/json")
            .body(format!(r#"{{"userId":"probe","name":"add_revenue","value":1,"id":"probe-{refused}"}}"#))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 503, "an event was answered during the outage");
        assert!(response.headers().contains_key("retry-after"));
        refused += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(refused > 0);
    assert!(client.child.try_wait().unwrap().is_none(), "the client finished during the outage");
    nats.resume().await;

    client_succeeded(&mut client, events).await;
    // A request answered 503 is not known to be stored: one whose publish left just before the
    // connection fell can still land when it comes back. That is why events carry ids (a retry is then
    // dropped as a duplicate). The probes were never retried, so each counts once at most.
    let probes = wait_for_totals(&db, dir.path(), &expected, events as u64, Some("probe")).await;
    assert!(probes <= refused, "{probes} probes stored of {refused} refused");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_processor_drops_an_event_sent_again_in_another_message() {
    // JetStream's duplicate window only drops a message published again whole; the same event in a
    // differently made batch is a new message, and the processor's own window drops it.
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start(dir.path()).await;
    let db = TestDb::new(StoreKind::Postgres).await;
    let server = nats_server(dir.path(), &nats.url(), 0, "server").await;
    let http = http();
    let line =
        |id: &str, value: &str| format!(r#"{{"userId":"dup","name":"add_revenue","value":{value},"id":"{id}"}}"#);
    let post = |body: String| {
        let http = http.clone();
        let url = format!("{}/events", server.url);
        async move {
            let response = http
                .post(url)
                .header("Authorization", TOKEN)
                .header("Content-Type", "application/x-ndjson")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status().as_u16(), 200);
        }
    };
    post(format!("{}\n{}\n", line("a", "1"), line("b", "10"))).await;
    // "b" again, now with "c": a different message, so JetStream stores it.
    post(format!("{}\n{}\n", line("b", "10"), line("c", "100"))).await;
    // And "a" once more, alone.
    post(format!("{}\n", line("a", "1"))).await;

    // eps status sees the three messages waiting (no processor has run).
    let status = jetstream_status(&nats.url(), &db).await;
    let lag: u64 = status["partitions"].as_array().unwrap().iter().map(|p| p["lag_messages"].as_u64().unwrap()).sum();
    assert_eq!((lag, status["messages"].as_u64(), status["processors"].as_u64()), (3, Some(3), Some(0)), "{status}");
    // What a 200 promises: this command is not told --nats-sync-always.
    let promise = &status["promise"];
    assert_eq!(promise["server_version"].as_str(), Some(nats_server_version().as_str()), "{status}");
    assert_eq!(
        (promise["replicas"].as_u64(), promise["sync"].as_str()),
        (Some(1), Some(expected_sync(false))),
        "{status}"
    );

    let mut a = args(&["process", "--log", &nats.url()]);
    a.extend(db.args());
    let out = run_eps(&a, &[]).await;
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("applied 3 events") && out.stdout.contains("2 duplicates dropped"), "{}", out.stdout);

    // Now nothing is waiting, and the checkpoints count what was applied.
    let status = jetstream_status(&nats.url(), &db).await;
    let partitions = status["partitions"].as_array().unwrap();
    let lag: u64 = partitions.iter().map(|p| p["lag_messages"].as_u64().unwrap()).sum();
    let applied: u64 = partitions.iter().map(|p| p["events_applied"].as_u64().unwrap()).sum();
    assert_eq!((lag, applied, status["users"].as_u64()), (0, 3, Some(1)), "{status}");
    assert_eq!(status["total_revenue"], "111", "{status}");
    // A running processor is counted.
    let _follower = follower(dir.path(), &nats.url(), &db, &[]);
    within(Duration::from_secs(20), "eps status to count the running processor", async {
        while jetstream_status(&nats.url(), &db).await["processors"] != 1 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(db.revenues(dir.path()).await.get("dup"), Some(&Decimal::from_str("111").unwrap()));

    // Nothing twice on a second run.
    let out = run_eps(&a, &[]).await;
    assert!(out.stdout.contains("applied 0 events"), "{}", out.stdout);
    assert_eq!(db.revenues(dir.path()).await.get("dup"), Some(&Decimal::from_str("111").unwrap()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_line_that_is_not_an_event_is_recorded_once_and_the_rest_applied() {
    // The server never publishes an invalid line; another publisher on the stream's subjects can.
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start(dir.path()).await;
    let db = TestDb::new(StoreKind::Postgres).await;
    let mut a = args(&["process", "--log", &nats.url()]);
    a.extend(db.args());
    // A first run creates the stream (processors and servers both create it when missing).
    let out = run_eps(&a, &[]).await;
    assert_eq!(out.code(), Some(0), "{out}");

    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let payload = concat!(
        r#"{"userId":"ok","name":"add_revenue","value":2.5}"#,
        "\n",
        r#"{"userId":"ok","name":"steal_revenue","value":1}"#,
        "\n",
        "not json at all\n",
        r#"{"userId":"ok","name":"subtract_revenue","value":0.5}"#,
        "\n"
    );
    js.publish("eps.events.3", payload.into()).await.unwrap().await.unwrap();

    let out = run_eps(&a, &[]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains("applied 2 events") && out.stdout.contains("2 invalid lines"), "{}", out.stdout);
    assert_eq!(db.revenues(dir.path()).await.get("ok"), Some(&Decimal::from_str("2").unwrap()));

    let (pg, connection) = tokio_postgres::connect(db.url.as_deref().unwrap(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let rows = pg
        .query("SELECT stream, segment, segment_offset, error FROM eps_invalid_lines ORDER BY segment_offset", &[])
        .await
        .unwrap();
    let found: Vec<(String, String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(
        found,
        vec![
            ("jetstream/EPS_EVENTS/3".to_string(), "eps.events.3".to_string(), 1),
            ("jetstream/EPS_EVENTS/3".to_string(), "eps.events.3".to_string(), 2),
        ],
        "each invalid line with its subject and its index in the message"
    );
    let error: String = rows[0].get(3);
    assert!(error.contains("steal_revenue") || error.contains("name"), "{error}");

    // Nothing applied or recorded twice on a second run.
    let out = run_eps(&a, &[]).await;
    assert!(out.stdout.contains("applied 0 events") && out.stdout.contains("0 invalid lines"), "{}", out.stdout);
    let count: i64 = pg.query_one("SELECT count(*) FROM eps_invalid_lines", &[]).await.unwrap().get(0);
    assert_eq!(count, 2);
}

/// `POST /events` with an ndjson body; the status and the JSON answer.
async fn post_events(url: &str, body: &str) -> (u16, serde_json::Value) {
    let response = http()
        .post(format!("{url}/events"))
        .header("Authorization", TOKEN)
        .header("Content-Type", "application/x-ndjson")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_group_larger_than_max_payload_is_cut_into_messages_applied_once_and_resent_as_duplicates() {
    // nats-server refuses any message (headers + payload) above its max_payload, here 64 KiB. One
    // user's 3,000 events are about 260 KB of log lines in one partition: more than one message holds.
    const MAX_PAYLOAD: usize = 64 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start_with_config(dir.path(), Some(&format!("max_payload: {MAX_PAYLOAD}\n"))).await;
    let db = TestDb::new(StoreKind::Postgres).await;
    let server = nats_server(dir.path(), &nats.url(), 0, "server").await;

    // The expected totals, from the values as written (integers, summed as i64).
    let mut body = String::new();
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    let mut whale = Vec::new();
    // Other users, none in the whale's partition (so its group is its lines alone, in order).
    let partition = |user: &str| eps::log::user_key(user) % 16;
    let mut minnows = (0..).map(|k| format!("minnow{k}")).filter(|u| partition(u) != partition("whale"));
    for i in 0..3_000i64 {
        body.push_str(&format!(
            "{{\"userId\":\"whale\",\"name\":\"add_revenue\",\"value\":{},\"id\":\"w-{i}\"}}\n",
            i + 1
        ));
        *expected.entry("whale".into()).or_default() += i + 1;
        whale.push((format!("w-{i}"), i + 1));
        if i % 60 == 0 {
            let user = minnows.next().unwrap();
            body.push_str(&format!(
                "{{\"userId\":\"{user}\",\"name\":\"add_revenue\",\"value\":7,\"id\":\"m-{i}\"}}\n"
            ));
            *expected.entry(user).or_default() += 7;
        }
    }
    let events = 3_000 + 50;
    let expected: BTreeMap<String, Decimal> = expected.into_iter().map(|(u, v)| (u, Decimal::from(v))).collect();

    // The rule, written out independently: the whale's first message is the longest run of its lines
    // (each as the server writes it, with a 13-digit ts) within max_payload minus the 63 header bytes
    // of `Nats-Msg-Id`, and its id is the digest of those events' ids. Publishing it first stands for
    // an earlier attempt of this request of which only that message was acknowledged.
    let budget = MAX_PAYLOAD - 63;
    let (mut size, mut first_payload, mut first_ids) = (0, String::new(), Vec::new());
    for (id, value) in &whale {
        let line = format!("{{\"userId\":\"whale\",\"name\":\"add_revenue\",\"value\":{value},\"id\":\"{id}\",\"ts\":1764000000000}}\n");
        if size + line.len() > budget {
            break;
        }
        size += line.len();
        first_payload.push_str(&line);
        first_ids.push(id.clone());
    }
    let digest_input: Vec<u8> = first_ids.iter().flat_map(|id| eps::log::id_key(id).to_le_bytes()).collect();
    let first_msg_id = format!("eps-{:032x}", eps::log::digest(&digest_input));
    let mut opts = eps::log::nats::NatsLogOptions::new(nats.url());
    opts.timeout = Duration::from_secs(5);
    let js = eps::log::nats::jetstream_context(&opts, "test").await.unwrap();
    eps::log::nats::ensure_stream(&js, &opts).await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", first_msg_id.as_str());
    let subject = opts.subject(opts.partition_of(eps::log::user_key("whale")));
    js.publish_with_headers(subject, headers, first_payload.into()).await.unwrap().await.unwrap();

    // The request is answered 200: the acknowledged message is recognised (its events are duplicates),
    // the rest is stored.
    let (status, answer) = post_events(&server.url, &body).await;
    assert_eq!(status, 200, "{answer}\nnats-server: {}", nats.log());
    assert_eq!(
        (answer["accepted"].as_u64(), answer["duplicates"].as_u64()),
        (Some(events), Some(first_ids.len() as u64)),
        "{answer}"
    );
    assert!(!nats.log().contains("Maximum Payload"), "{}", nats.log());
    let messages = common::nats::stream_messages(&nats.url(), "EPS_EVENTS").await;
    let whale_messages = messages.iter().filter(|(_, lines)| lines.iter().any(|l| l["userId"] == "whale")).count();
    assert!(whale_messages >= 4, "{whale_messages} messages hold the whale's 260 KB");
    let stored = messages.len();

    // Applied exactly once.
    let mut a = args(&["process", "--log", &nats.url()]);
    a.extend(db.args());
    let out = run_eps(&a, &[]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(
        out.stdout.contains(&format!("applied {events} events")) && out.stdout.contains(" 0 duplicates dropped"),
        "{}",
        out.stdout
    );
    assert_eq!(db.revenues(dir.path()).await, expected);

    // The same request again: the same messages with the same ids, all dropped by JetStream.
    let (status, answer) = post_events(&server.url, &body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!((answer["accepted"].as_u64(), answer["duplicates"].as_u64()), (Some(events), Some(events)), "{answer}");
    assert_eq!(
        common::nats::stream_messages(&nats.url(), "EPS_EVENTS").await.len(),
        stored,
        "the resent request stored a message"
    );
    let out = run_eps(&a, &[]).await;
    assert!(out.stdout.contains("applied 0 events"), "{}", out.stdout);
    assert_eq!(db.revenues(dir.path()).await, expected);
}

/// Issue 14, item 3 on JetStream: `100000000000` and `1e-28` for one user (each a valid event) sum to a
/// total no `Decimal` holds; every processor used to exit on it, one after another, and no partition
/// was applied any more. Expected values are the inputs' text.
#[tokio::test(flavor = "multi_thread")]
async fn a_sum_no_decimal_holds_is_applied_exactly_and_stops_no_partition() {
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start(dir.path()).await;
    let db = TestDb::new(StoreKind::Postgres).await;
    let mut a = args(&["process", "--log", &nats.url()]);
    a.extend(db.args());
    // A first run creates the stream.
    let out = run_eps(&a, &[]).await;
    assert_eq!(out.code(), Some(0), "{out}");

    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let precise = concat!(
        r#"{"userId":"precise","name":"add_revenue","value":100000000000,"id":"p-1"}"#,
        "\n",
        r#"{"userId":"precise","name":"add_revenue","value":0.0000000000000000000000000001,"id":"p-2"}"#,
        "\n",
    );
    js.publish("eps.events.3", precise.into()).await.unwrap().await.unwrap();
    let others = concat!(r#"{"userId":"other","name":"add_revenue","value":2.5,"id":"o-1"}"#, "\n");
    js.publish("eps.events.3", others.into()).await.unwrap().await.unwrap();
    let elsewhere = concat!(r#"{"userId":"elsewhere","name":"add_revenue","value":4,"id":"e-1"}"#, "\n");
    js.publish("eps.events.5", elsewhere.into()).await.unwrap().await.unwrap();

    let out = run_eps(&a, &[]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains("applied 4 events"), "{}", out.stdout);
    let raw = |user: &'static str| {
        let db = &db;
        let dir = dir.path().to_path_buf();
        async move { db.raw_revenue(&dir, user).await }
    };
    assert_eq!(raw("precise").await.as_deref(), Some("100000000000.0000000000000000000000000001"));
    assert_eq!(raw("other").await.as_deref(), Some("2.5"));
    assert_eq!(raw("elsewhere").await.as_deref(), Some("4"));

    // The partition goes on: a later message for the same user is applied on top, exactly.
    let more = concat!(r#"{"userId":"precise","name":"subtract_revenue","value":100000000000,"id":"p-3"}"#, "\n");
    js.publish("eps.events.3", more.into()).await.unwrap().await.unwrap();
    let out = run_eps(&a, &[]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(raw("precise").await.as_deref(), Some("0.0000000000000000000000000001"));
    let status = jetstream_status(&nats.url(), &db).await;
    assert_eq!(status["total_revenue"], "6.5000000000000000000000000001", "{status}");
}
