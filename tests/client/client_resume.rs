//! `eps client` across interruptions (issue 17, items 1 and 2), against a real `eps server`: a run
//! stopped by SIGINT, SIGTERM or SIGKILL and run again stores every event once; a grown file sends only
//! its new lines; without its state a re-send is recognised by the server; `--from-start` stores
//! nothing twice, `--new-run` stores again; with every server down the client gives up with one line;
//! `--failed-out` holds exactly the lines that need another send, unchanged.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::fault::{self, Report};
use common::shim::Shim;
use common::*;
use rand::{Rng as _, SeedableRng as _};
use rust_decimal::Decimal;

/// Lines `from..=to` of a generated file: user `u{i % 50}`, value `i` (so totals tell every line apart).
fn lines(from: usize, to: usize) -> Vec<String> {
    (from..=to).map(|i| event_line(&format!("u{}", i % 50), "add_revenue", &i.to_string())).collect()
}

fn totals(from: usize, to: usize) -> BTreeMap<String, Decimal> {
    let values: Vec<(String, String)> = (from..=to).map(|i| (format!("u{}", i % 50), i.to_string())).collect();
    expected_totals(values.iter().map(|(u, v)| (u.as_str(), "add_revenue", v.as_str())))
}

/// How many times each id is in the log.
fn id_counts(log_dir: &Path) -> BTreeMap<String, u32> {
    let mut counts = BTreeMap::new();
    for line in log_lines(log_dir) {
        let id = line["id"].as_str().unwrap_or_else(|| panic!("log line without id: {line}")).to_string();
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

/// Bytes in a log's segments so far.
fn log_size(log_dir: &Path) -> u64 {
    segments(log_dir).iter().map(|(_, p)| std::fs::metadata(p).map_or(0, |m| m.len())).sum()
}

/// The `line` of the checkpoint in `state` (0 when there is none).
fn checkpoint_line(state: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(state) else { return 0 };
    let mut line = 0;
    for entry in entries {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            line = line.max(json["line"].as_u64().unwrap());
        }
    }
    line
}

/// Newlines in a log (complete lines so far; safe to read while the server writes).
fn lines_so_far(log_dir: &Path) -> usize {
    log_bytes(log_dir).iter().filter(|&&b| b == b'\n').count()
}

/// `(sent, accepted, duplicates)` of the summary line.
fn summary_counts(stdout: &str) -> (u64, u64, u64) {
    let line = stdout.lines().find(|l| l.starts_with("sent ")).unwrap_or_else(|| panic!("no summary in {stdout:?}"));
    let number_after = |word: &str| -> u64 {
        let rest = line.split(word).nth(1).unwrap_or_else(|| panic!("no {word:?} in {line:?}"));
        rest.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
    };
    (number_after("sent "), number_after("accepted "), number_after("("))
}

/// Asserts the log holds `n` events with distinct ids, each of the form `<producer>-<line>` with lines
/// 1 to `n` and one producer; returns the producer.
fn assert_each_line_once(log_dir: &Path, n: usize) -> String {
    let counts = id_counts(log_dir);
    let twice: Vec<_> = counts.iter().filter(|(_, &c)| c > 1).map(|(id, _)| id.clone()).take(10).collect();
    assert!(twice.is_empty(), "ids stored more than once: {twice:?}");
    assert_eq!(counts.len(), n, "events in the log");
    let mut producer = None;
    let mut numbers: Vec<usize> = counts
        .keys()
        .map(|id| {
            let (p, line) = id.rsplit_once('-').unwrap_or_else(|| panic!("id {id:?}"));
            assert_eq!(producer.get_or_insert_with(|| p.to_string()), p, "ids of two producers");
            line.parse().unwrap()
        })
        .collect();
    numbers.sort();
    assert_eq!(numbers, (1..=n).collect::<Vec<_>>());
    producer.unwrap()
}

fn client_args(file: &Path, url: &str, state: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = args(&[
        "client",
        &file.display().to_string(),
        "--url",
        url,
        "--progress",
        "quiet",
        "--state-dir",
        &state.display().to_string(),
    ]);
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

async fn run_client(env: &Env, file: &Path, url: &str, state: &Path, extra: &[&str]) -> Output {
    run_eps_in(env.tmp.path(), &client_args(file, url, state, extra), &[]).await
}

async fn signal(name: &str, pid: u32) {
    let status = tokio::process::Command::new("kill").args([name, &pid.to_string()]).status().await.unwrap();
    assert!(status.success(), "kill {name} {pid}");
}

/// The client, stopped again and again (SIGINT, SIGTERM, SIGKILL in a seeded random order) while it
/// sends to a server whose syncs are slowed (so that it is mid-file when stopped), and each time run
/// again with the same command: at the end the log holds every line of the file exactly once and the
/// totals are exact. A stopped run exits 130 (SIGINT) or 143 (SIGTERM) and prints the command that
/// resumes; the next run says it resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stopped_again_and_again_and_run_again_stores_every_event_once() {
    stopped_again_and_again("client_interrupted_and_resumed", true).await;
}

/// The same with the client's state directory removed before every run (another machine, a lost
/// disk), SIGINT and SIGKILL: each run sends the file from its first line, the server answers what it
/// has as duplicates (the ids come from the file's content), and the log still holds every line once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stopped_again_and_again_and_run_again_without_its_state_stores_every_event_once() {
    stopped_again_and_again("client_interrupted_and_rerun_without_state", false).await;
}

/// The two tests above: with `keep_state` the runs share one state directory (and stops are SIGINT,
/// SIGKILL or SIGTERM); without, it is removed before each run (and stops are SIGINT or SIGKILL).
async fn stopped_again_and_again(scenario: &'static str, keep_state: bool) {
    let seed = fault::seed(scenario);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let env = Env::new(StoreKind::Sqlite).await;
    let shim = Shim::new(env.tmp.path(), "server-events-");
    let server = env.server_with_env(&[], &shim.env()).await;
    let n: usize = fault::scaled(20_000, 1_000_000);
    let rounds: usize = fault::scaled(4, 20);
    let batch = fault::scaled("10", "100");
    let file = env.write_file("events.jsonl", &lines(1, n));
    let state = env.tmp.path().join("state");
    let a = client_args(&file, &server.url, &state, &["--batch", batch, "--concurrency", "2"]);
    // Each group sync takes 2 ms or more: the run lasts seconds, so each stop lands mid-file.
    shim.stall_syncs_ms(2);

    let mut kills = 0;
    let mut resent = 0;
    for round in 0..rounds {
        let target = (round + 1) * n / (rounds + 2);
        // Each kind at least once, then at random.
        let kinds: &[&str] = if keep_state { &["-INT", "-KILL", "-TERM"] } else { &["-INT", "-KILL"] };
        let kind = if round < kinds.len() { kinds[round] } else { kinds[rng.random_range(0..kinds.len())] };
        if !keep_state && state.exists() {
            std::fs::remove_dir_all(&state).unwrap();
        }
        let resumes = checkpoint_line(&state) > 0;
        let mut cmd = eps_command(&a, &[]);
        cmd.current_dir(env.tmp.path()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = cmd.spawn().expect("cannot start eps client");
        let pid = child.id().unwrap();
        // Log lines are of nearly one length: the target in bytes, from the first one.
        let line_bytes =
            if round == 0 { 0 } else { log_size(&env.log_dir()) / lines_so_far(&env.log_dir()).max(1) as u64 };
        within(Duration::from_secs(120), "the log to grow", async {
            loop {
                let reached = if line_bytes == 0 {
                    lines_so_far(&env.log_dir()) >= target
                } else {
                    log_size(&env.log_dir()) >= target as u64 * line_bytes
                };
                if reached {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await;
        // A little further on, at random, so stops fall at every phase of a request.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..20))).await;
        signal(kind, pid).await;
        let out =
            within(Duration::from_secs(60), "the stopped client to exit", child.wait_with_output()).await.unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        kills += 1;
        let stored = lines_so_far(&env.log_dir());
        assert!(stored < n, "round {round}: the client finished before {kind}: the test proves nothing");
        if resumes && kind != "-KILL" {
            assert!(stderr.contains("resuming "), "round {round}: no resume message\n{stderr}");
        }
        match kind {
            "-KILL" => assert_eq!(out.status.code(), None, "{}", out.status),
            _ => {
                let code = if kind == "-INT" { 130 } else { 143 };
                assert_eq!(out.status.code(), Some(code), "round {round} {kind}: {}\n{stdout}\n{stderr}", out.status);
                let resume = stderr
                    .lines()
                    .find_map(|l| l.strip_prefix("eps client: to resume, run: "))
                    .unwrap_or_else(|| panic!("no resume command in\n{stderr}"));
                let expected: Vec<String> = std::iter::once(eps_bin().to_string()).chain(a.iter().cloned()).collect();
                assert_eq!(resume, expected.join(" "), "the resume command is the same command line");
                assert!(stderr.contains("checkpoint saved in "), "{stderr}");
            }
        }
        eprintln!("round {round}: {kind} with {stored} of {n} events stored");
    }
    shim.disarm();
    if !keep_state && state.exists() {
        std::fs::remove_dir_all(&state).unwrap();
    }
    let before = lines_so_far(&env.log_dir());
    let out = run_eps_in(env.tmp.path(), &a, &[]).await;
    assert_eq!(out.code(), Some(0), "the last run: {out}");
    let (sent, accepted, duplicates) = summary_counts(&out.stdout);
    if keep_state {
        assert!(out.stderr.contains("resuming "), "{out}");
        assert!((sent as usize) < n * 3 / 4, "the last run sent {sent}: it did not resume");
    } else {
        assert!(!out.stderr.contains("resuming "), "{out}");
        // From the first line: what the stopped runs stored comes back as duplicates.
        assert_eq!((sent, accepted, duplicates), (n as u64, n as u64, before as u64), "the last run: {out}");
        resent = duplicates;
    }

    assert_each_line_once(&env.log_dir(), n);
    drop(server);
    env.process(&[]).await;
    let (want, got) = (totals(1, n), env.revenues().await);
    assert_totals(&got, &want);
    let t = fault::tally(&want, &got, Decimal::ONE);
    Report {
        scenario,
        store: "sqlite",
        seed,
        events_sent: n as u64,
        kills,
        events_lost: t.events_lost,
        events_doubled: t.events_doubled,
        duration: started.elapsed(),
        notes: if keep_state {
            format!(
                "eps client sending a {n}-event file (--batch {batch} --concurrency 2, syncs slowed 2 ms) stopped \
                 {rounds} times at random points by SIGINT, SIGTERM or SIGKILL and run again with the same command \
                 each time; the log held each line once; lost/doubled are those of the totals"
            )
        } else {
            format!(
                "as client_interrupted_and_resumed (SIGINT or SIGKILL, {rounds} times) with the state directory \
                 removed before every run: each run sent the file from line 1, the last one {resent} duplicates; \
                 the log held each line once; lost/doubled are those of the totals"
            )
        },
        ..Default::default()
    }
    .write();
}

/// A file sent, then grown by appends: the next run sends only the new lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grown_file_sends_only_its_new_lines() {
    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server().await;
    let state = env.tmp.path().join("state");
    // 2,000 lines are more than the 64 KiB the fingerprint covers; 20 are fewer (it changes as the
    // file grows: the checkpoint still finds the file).
    for (name, first, more) in [("big.jsonl", 2000, 500), ("small.jsonl", 20, 30)] {
        let before = lines_so_far(&env.log_dir());
        let file = env.write_file(name, &lines(1, first));
        let out = run_client(&env, &file, &server.url, &state, &["--batch", "100"]).await;
        assert_eq!(out.code(), Some(0), "{out}");
        let mut text = std::fs::read_to_string(&file).unwrap();
        text.push_str(&(lines(first + 1, first + more).join("\n") + "\n"));
        std::fs::write(&file, text).unwrap();
        let out = run_client(&env, &file, &server.url, &state, &["--batch", "100"]).await;
        assert_eq!(out.code(), Some(0), "{out}");
        assert_eq!(summary_counts(&out.stdout), (more as u64, more as u64, 0), "{name}: {out}");
        assert!(out.stderr.contains(&format!("after line {first}")), "{out}");
        assert_eq!(lines_so_far(&env.log_dir()) - before, first + more, "{name}");
    }
}

/// The same file sent again: with its state lost the server recognises every event (the ids derive
/// from the content); `--from-start` sends it all and stores nothing; `--new-run` stores it again, and
/// a plain run after it resumes that new send (nothing left to send).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_without_state_or_from_start_stores_nothing_and_new_run_stores_again() {
    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server().await;
    let n = 2000;
    let file = env.write_file("events.jsonl", &lines(1, n));
    let state = env.tmp.path().join("state");
    let out = run_client(&env, &file, &server.url, &state, &[]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    let first = assert_each_line_once(&env.log_dir(), n);

    // The state directory deleted (or another machine): every event comes back as a duplicate.
    std::fs::remove_dir_all(&state).unwrap();
    let out = run_client(&env, &file, &server.url, &state, &[]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(summary_counts(&out.stdout), (n as u64, n as u64, n as u64), "{out}");
    assert_eq!(assert_each_line_once(&env.log_dir(), n), first);

    // The state kept: nothing is sent; --from-start sends everything, all duplicates.
    let out = run_client(&env, &file, &server.url, &state, &[]).await;
    assert_eq!(summary_counts(&out.stdout), (0, 0, 0), "{out}");
    let out = run_client(&env, &file, &server.url, &state, &["--from-start"]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(summary_counts(&out.stdout), (n as u64, n as u64, n as u64), "{out}");
    assert_eq!(lines_so_far(&env.log_dir()), n);

    // --new-run: stored again, under new ids; then a plain run has nothing left to send.
    let out = run_client(&env, &file, &server.url, &state, &["--new-run"]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(summary_counts(&out.stdout), (n as u64, n as u64, 0), "{out}");
    assert_eq!(id_counts(&env.log_dir()).len(), 2 * n);
    let out = run_client(&env, &file, &server.url, &state, &[]).await;
    assert_eq!(summary_counts(&out.stdout), (0, 0, 0), "{out}");
    assert_eq!(lines_so_far(&env.log_dir()), 2 * n);
}

/// Every server unreachable: the client stops after --give-up-after with one line naming the URLs and
/// the command that resumes, instead of failing the file batch by batch; nothing is lost, as the run
/// that follows (a server up) sends every line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_server_down_the_client_gives_up_with_one_line_and_resumes_later() {
    let env = Env::new(StoreKind::Sqlite).await;
    let dead = || {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let (a, b) = (dead(), dead());
    let n = 3000;
    let file = env.write_file("events.jsonl", &lines(1, n));
    let state = env.tmp.path().join("state");
    let urls = format!("{a},{b}");
    let extra = ["--give-up-after", "2", "--max-attempts", "1000", "--batch", "100"];
    let out =
        within(Duration::from_secs(60), "the client to give up", run_client(&env, &file, &urls, &state, &extra)).await;
    assert_eq!(out.code(), Some(1), "{out}");
    let giving_up: Vec<&str> = out.stderr.lines().filter(|l| l.contains("giving up")).collect();
    assert_eq!(giving_up.len(), 1, "{out}");
    assert!(giving_up[0].contains(&a) && giving_up[0].contains(&b), "{out}");
    assert!(out.stderr.contains("to resume, run: "), "{out}");
    assert!(!out.stderr.contains("failed after"), "no batch should have been failed one by one: {out}");

    let server = env.server().await;
    let out = run_client(&env, &file, &server.url, &state, &["--batch", "100"]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_each_line_once(&env.log_dir(), n);
}

/// `--failed-out` holds exactly the lines that need another send, byte for byte: the invalid ones, and
/// (a wrong token) the refused ones. Invalid-line messages are capped, with a count. A refusal that is
/// not about the line (401) does not move the checkpoint: the next run sends those lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_out_holds_exactly_the_lines_to_send_again_unchanged() {
    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server().await;
    let bad = [
        r#"{"userId":"x","name":"refund","value":1}"#,
        r#"{"userId":"x","name":"add_revenue","value":"abc"}"#,
        r#"  {"userId":"x","name":"add_revenue","value":1,"extra":true}  "#,
        r#"{"userId":"x","#,
        r#"[1,2,3]"#,
        "\t{\"userId\":\"\",\"name\":\"add_revenue\",\"value\":1}",
    ];
    let mut all = Vec::new();
    let mut invalid = Vec::new();
    for i in 1..=300 {
        all.push(event_line(&format!("u{}", i % 7), "add_revenue", &i.to_string()));
        if i % 10 == 0 {
            let line = bad[(i / 10) % bad.len()].to_string();
            invalid.push(line.clone());
            all.push(line);
        }
    }
    let file = env.write_file("events.jsonl", &all);
    let state = env.tmp.path().join("state");
    let failed = env.tmp.path().join("failed.jsonl");
    let failed_arg = failed.display().to_string();

    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let read_failed = || sorted(std::fs::read_to_string(&failed).unwrap().lines().map(str::to_string).collect());

    // A wrong token: every valid line refused, every invalid one invalid; all of them in the file.
    let out = run_client(
        &env,
        &file,
        &server.url,
        &state,
        &["--failed-out", &failed_arg, "--token", "wrong", "--batch", "50"],
    )
    .await;
    assert_eq!(out.code(), Some(1), "{out}");
    assert_eq!(read_failed(), sorted(all.clone()));

    // The right token: the refused lines are sent (the 401 did not move the checkpoint); the file
    // then holds the invalid lines, unchanged.
    let out = run_client(&env, &file, &server.url, &state, &["--failed-out", &failed_arg, "--batch", "50"]).await;
    assert_eq!(out.code(), Some(1), "{out}");
    assert_eq!(summary_counts(&out.stdout), (300, 300, 0), "{out}");
    assert_eq!(read_failed(), sorted(invalid.clone()));
    assert_eq!(lines_so_far(&env.log_dir()), 300);
    let shown = out.stderr.lines().filter(|l| l.starts_with("line ")).count();
    assert_eq!(shown, 10, "invalid-line messages are capped: {out}");
    assert!(out.stderr.contains(&format!("({} more invalid lines were not shown)", invalid.len() - 10)), "{out}");
}

/// A checkpoint holds only for the log that acknowledged its lines (each server names its log in
/// `GET /healthz`): after the server's data directory is deleted and a new server starts on the same
/// address, or when the same file goes to another server, the file is sent whole again with the same
/// ids; against the log that acknowledged it, a re-run sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_holds_only_for_the_log_that_acknowledged_it() {
    let env = Env::new(StoreKind::Sqlite).await;
    let n = 500;
    let file = env.write_file("events.jsonl", &lines(1, n));
    let state = env.tmp.path().join("state");
    let mut server = env.server().await;
    let out = run_client(&env, &file, &server.url, &state, &[]).await;
    assert_eq!(summary_counts(&out.stdout), (n as u64, n as u64, 0), "{out}");
    let producer = assert_each_line_once(&env.log_dir(), n);
    let out = run_client(&env, &file, &server.url, &state, &[]).await;
    assert_eq!(summary_counts(&out.stdout), (0, 0, 0), "the same log: nothing left to send; {out}");
    // No server to say which log it is: nothing sent, the checkpoint kept, and what to do.
    let dead = format!(
        "http://127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    );
    let out = run_client(&env, &file, &dead, &state, &["--max-attempts", "2"]).await;
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("cannot be checked") && out.stderr.contains("the checkpoint is kept"), "{out}");
    assert_eq!(checkpoint_line(&state), n as u64);

    // The data directory deleted, a new server on the same address: a new log, which has none of it.
    let url = server.url.clone();
    server.sigterm().await;
    server.wait(Duration::from_secs(20)).await;
    std::fs::remove_dir_all(&env.data_dir).unwrap();
    let listen = url.trim_start_matches("http://").to_string();
    let mut args = args(&["server", "--listen", &listen, "--data-dir"]);
    args.push(env.data_dir.display().to_string());
    args.extend(env.db.args());
    let again = ServerProc::start(&args, &[], env.tmp.path()).await;
    assert_eq!(again.url, url);
    let out = run_client(&env, &file, &url, &state, &[]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(summary_counts(&out.stdout), (n as u64, n as u64, 0), "{out}");
    assert!(out.stderr.contains("sending the file from its first line with the same ids"), "{out}");
    assert_eq!(assert_each_line_once(&env.log_dir(), n), producer);

    // Another server (its own data directory): sent whole to it too; back to the first, all duplicates.
    let other = Env::new(StoreKind::Sqlite).await;
    let other_server = other.server().await;
    let out = run_client(&env, &file, &other_server.url, &state, &[]).await;
    assert_eq!(summary_counts(&out.stdout), (n as u64, n as u64, 0), "{out}");
    assert_eq!(assert_each_line_once(&other.log_dir(), n), producer);
    let out = run_client(&env, &file, &url, &state, &[]).await;
    assert_eq!(summary_counts(&out.stdout), (n as u64, n as u64, n as u64), "{out}");
    assert_eq!(assert_each_line_once(&env.log_dir(), n), producer);
    // That quick re-send (under the checkpoint's save interval, ending where the old one ended) still
    // rewrote the checkpoint with the log it reached: nothing left to send to it.
    let out = run_client(&env, &file, &url, &state, &[]).await;
    assert_eq!(summary_counts(&out.stdout), (0, 0, 0), "{out}");
}

/// A pool of servers with logs of their own, one of them down during the first run: the next run, with
/// both up, continues after the checkpoint (a log the checkpoint names is still there) instead of
/// sending the file again, which would store in the second log the lines the first already has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_server_that_was_down_does_not_make_the_file_go_again() {
    let a = Env::new(StoreKind::Sqlite).await;
    let b = Env::new(StoreKind::Sqlite).await;
    let n = 400;
    let file = a.write_file("events.jsonl", &lines(1, n));
    let state = a.tmp.path().join("state");
    let server_a = a.server().await;
    let port_b = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url_b = format!("http://127.0.0.1:{port_b}");
    let urls = format!("{},{url_b}", server_a.url);
    let out = run_client(&a, &file, &urls, &state, &["--batch", "50"]).await;
    assert_eq!(summary_counts(&out.stdout), (n as u64, n as u64, 0), "{out}");
    assert_each_line_once(&a.log_dir(), n);

    let mut args = args(&["server", "--listen", &format!("127.0.0.1:{port_b}"), "--data-dir"]);
    args.push(b.data_dir.display().to_string());
    args.extend(b.db.args());
    let _server_b = ServerProc::start(&args, &[], b.tmp.path()).await;
    let out = run_client(&a, &file, &urls, &state, &["--batch", "50"]).await;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(summary_counts(&out.stdout), (0, 0, 0), "{out}");
    assert_eq!(lines_so_far(&b.log_dir()), 0, "nothing stored a second time in the other log");
}
