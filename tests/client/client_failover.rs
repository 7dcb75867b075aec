//! `eps client` with several server URLs: requests spread over the servers, and failover when one is
//! unreachable or stops partway. Each server here has its own data directory and file log, so where
//! every event landed is read straight from the logs.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// `n` valid events, one per line (line i is user `u{i % 97}`, value i).
fn generated(env: &Env, n: usize) -> std::path::PathBuf {
    let lines: Vec<String> =
        (1..=n).map(|i| event_line(&format!("u{}", i % 97), "add_revenue", &i.to_string())).collect();
    env.write_file("events.jsonl", &lines)
}

/// A URL on which nothing listens.
fn dead_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

/// How many times each file line number appears in a log, read from the ids `<run>-<line>` the client
/// gave the events. All ids must come from one client run, `run` (set from the first id seen).
fn line_counts(log_dir: &Path, run: &mut Option<String>, counts: &mut BTreeMap<u64, u32>) -> usize {
    let lines = log_lines(log_dir);
    for line in &lines {
        let id = line["id"].as_str().unwrap_or_else(|| panic!("log line without id: {line}"));
        let (this_run, number) = id.rsplit_once('-').unwrap_or_else(|| panic!("id {id:?} is not <run>-<line>"));
        let seen = run.get_or_insert_with(|| this_run.to_string());
        assert_eq!(seen, this_run, "ids of two client runs in the logs");
        *counts.entry(number.parse().unwrap_or_else(|e| panic!("id {id:?}: {e}"))).or_insert(0) += 1;
    }
    lines.len()
}

/// Newlines in a log (complete lines so far; safe to read while the server writes).
fn lines_so_far(log_dir: &Path) -> usize {
    log_bytes(log_dir).iter().filter(|&&b| b == b'\n').count()
}

/// `(sent, accepted, failed)` of the summary line `sent S, accepted A (D duplicates), …, failed F in …`.
fn summary_counts(stdout: &str) -> (u64, u64, u64) {
    let line = stdout.lines().find(|l| l.starts_with("sent ")).unwrap_or_else(|| panic!("no summary in {stdout:?}"));
    let number_after = |word: &str| -> u64 {
        let rest = line.split(word).nth(1).unwrap_or_else(|| panic!("no {word:?} in {line:?}"));
        rest.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
    };
    (number_after("sent "), number_after("accepted "), number_after("failed "))
}

/// The `per server: URL → N, URL → N` line of the client's output, as (URL, N) pairs.
fn per_server(stdout: &str) -> Vec<(String, u64)> {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("per server: "))
        .unwrap_or_else(|| panic!("no per-server line in {stdout:?}"));
    line.split(", ")
        .map(|part| {
            let (url, n) = part.split_once(" → ").unwrap_or_else(|| panic!("{part:?} in {line:?}"));
            (url.to_string(), n.parse().unwrap())
        })
        .collect()
}

/// Two servers with their own logs and one URL where nothing listens: every event lands in exactly
/// one of the logs, both servers take a share, and the client succeeds. Connection refused means the
/// dead server never saw a request, so here nothing can be stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_spread_over_two_servers_and_skip_one_that_is_down() {
    let (env_a, env_b) = (Env::new(StoreKind::Sqlite).await, Env::new(StoreKind::Sqlite).await);
    let (server_a, server_b) = (env_a.server().await, env_b.server().await);
    let n = 3000;
    let file = generated(&env_a, n);
    let dead = dead_url();

    // Both spellings: a comma-separated list and a repeated flag.
    let urls = format!("{},{dead}", server_a.url);
    let out = client(&file, &urls, &["--url", &server_b.url, "--batch", "50", "--max-attempts", "5"]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(summary_counts(&out.stdout), (n as u64, n as u64, 0), "{out}");

    let (mut run, mut counts) = (None, BTreeMap::new());
    let in_a = line_counts(&env_a.log_dir(), &mut run, &mut counts);
    let in_b = line_counts(&env_b.log_dir(), &mut run, &mut counts);
    assert!(in_a > 0 && in_b > 0, "both servers should take a share: {in_a} and {in_b} events");
    let twice: Vec<_> = counts.iter().filter(|(_, &c)| c > 1).map(|(line, _)| *line).collect();
    assert!(twice.is_empty(), "lines stored twice: {:?}", &twice[..twice.len().min(10)]);
    let all: BTreeSet<u64> = (1..=n as u64).collect();
    assert_eq!(counts.keys().copied().collect::<BTreeSet<_>>(), all, "the union of the logs is not every line");

    // What each server accepted is exactly what its log holds; the dead one took nothing.
    let want = vec![(server_a.url.clone(), in_a as u64), (dead, 0), (server_b.url.clone(), in_b as u64)];
    assert_eq!(per_server(&out.stdout), want, "{out}");
}

/// Server B is stopped (SIGTERM) while the client is sending: the client fails over to A and every
/// event ends up in a log. Exactly once is not asserted: a request B stored but whose answer never
/// reached the client (cut by the shutdown, or lost with a killed server) is resent to A as the same
/// bytes. Servers sharing a de-duplicating log (JetStream) drop that copy by its id; two file logs on
/// two machines cannot know of each other, so such a request is in both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_fails_over_when_a_server_stops_partway() {
    let (env_a, env_b) = (Env::new(StoreKind::Sqlite).await, Env::new(StoreKind::Sqlite).await);
    let (server_a, mut server_b) = (env_a.server().await, env_b.server().await);
    // Small batches and little concurrency: thousands of requests, so the client is well under way
    // when B stops, and far from done.
    let n = 20_000;
    let file = generated(&env_a, n);
    let urls = format!("{},{}", server_a.url, server_b.url);
    let client_args = args(&[
        "client",
        &file.display().to_string(),
        "--url",
        &urls,
        "--progress",
        "quiet",
        "--batch",
        "10",
        "--concurrency",
        "4",
        // Two attempts suffice with failover (B, then A); without it B's requests fail fast.
        "--max-attempts",
        "4",
    ]);
    let mut cmd = eps_command(&client_args, &[]);
    cmd.current_dir(env_a.tmp.path()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut running = cmd.spawn().expect("cannot start eps client");

    // Stop B once it has stored a few batches.
    let started = Instant::now();
    within(Duration::from_secs(60), "B to store its first batches", async {
        while lines_so_far(&env_b.log_dir()) < 200 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    server_b.sigterm().await;
    let still_running = running.try_wait().expect("polling the client").is_none();
    let status = server_b.wait(Duration::from_secs(30)).await;
    assert!(status.success(), "B did not stop cleanly on SIGTERM: {status}");
    let in_b_at_stop = lines_so_far(&env_b.log_dir());

    let out = within(RUN_TIMEOUT, "the client to finish", running.wait_with_output()).await.unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("client after {:?}:\n{stdout}", started.elapsed());
    assert!(
        still_running,
        "the client had finished before B was stopped: the test proves nothing (make the file larger)\n{stdout}"
    );
    assert_eq!(out.status.code(), Some(0), "client: {}\n{stdout}\n{stderr}", out.status);
    assert_eq!(summary_counts(&stdout), (n as u64, n as u64, 0), "{stdout}\n{stderr}");

    let (mut run, mut counts) = (None, BTreeMap::new());
    let in_a = line_counts(&env_a.log_dir(), &mut run, &mut counts);
    let in_b = line_counts(&env_b.log_dir(), &mut run, &mut counts);
    assert_eq!(in_b, in_b_at_stop, "B stored something after it stopped?");
    assert!(in_b > 0 && in_b < n, "B should hold part of the events: {in_b}");
    assert!(in_a + in_b >= n && in_a > n / 2, "A should have taken over: A {in_a}, B {in_b}");
    let all: BTreeSet<u64> = (1..=n as u64).collect();
    let missing: Vec<_> = all.iter().filter(|line| !counts.contains_key(line)).take(10).collect();
    assert!(missing.is_empty(), "events in neither log, first: {missing:?}");
    assert_eq!(counts.len(), n, "ids that are not lines of the file");
    let twice = counts.values().filter(|&&c| c > 1).count();
    eprintln!("A {in_a} events, B {in_b}, {twice} in both (answers lost to the shutdown)");

    // Each server accepted at most what its log holds, and together every event.
    let per = per_server(&stdout);
    assert_eq!(per.len(), 2, "{stdout}");
    assert_eq!((per[0].0.as_str(), per[1].0.as_str()), (server_a.url.as_str(), server_b.url.as_str()));
    assert!(per[0].1 <= in_a as u64 && per[1].1 <= in_b as u64, "{per:?} vs logs A {in_a}, B {in_b}");
    assert_eq!(per[0].1 + per[1].1, n as u64, "{per:?}");
}
