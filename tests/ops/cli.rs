//! The command-line contract of the real binary: help, exit codes, one-line errors, environment
//! variables.

use crate::common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// Every flag of each command, with its environment variable.
const FLAGS: &[(&str, &[(&str, &str)])] = &[
    ("", &[("--log-format", "EPS_LOG_FORMAT"), ("--log-level", "EPS_LOG_LEVEL")]),
    (
        "server",
        &[
            ("--listen", "EPS_LISTEN"),
            ("--data-dir", "EPS_DATA_DIR"),
            ("--database-url", "DATABASE_URL"),
            ("--token", "EPS_TOKEN"),
            ("--body-limit", "EPS_BODY_LIMIT"),
            ("--batch-body-limit", "EPS_BATCH_BODY_LIMIT"),
            ("--request-timeout-secs", "EPS_REQUEST_TIMEOUT_SECS"),
            ("--send-timeout-secs", "EPS_SEND_TIMEOUT_SECS"),
            ("--max-connections", "EPS_MAX_CONNECTIONS"),
            ("--segment-bytes", "EPS_SEGMENT_BYTES"),
            ("--dedup-window-secs", "EPS_DEDUP_WINDOW_SECS"),
            ("--dedup-max-ids", "EPS_DEDUP_MAX_IDS"),
            ("--dedup-horizon-secs", "EPS_DEDUP_HORIZON_SECS"),
            ("--log", "EPS_LOG"),
            ("--nats-stream", "EPS_NATS_STREAM"),
            ("--nats-subject-prefix", "EPS_NATS_SUBJECT_PREFIX"),
            ("--nats-partitions", "EPS_NATS_PARTITIONS"),
            ("--nats-replicas", "EPS_NATS_REPLICAS"),
            ("--nats-duplicate-window-secs", "EPS_NATS_DUPLICATE_WINDOW_SECS"),
            ("--nats-max-age-secs", "EPS_NATS_MAX_AGE_SECS"),
            ("--nats-max-bytes", "EPS_NATS_MAX_BYTES"),
            ("--nats-max-msgs", "EPS_NATS_MAX_MSGS"),
            ("--log-format", "EPS_LOG_FORMAT"),
            ("--log-level", "EPS_LOG_LEVEL"),
        ],
    ),
    (
        "process",
        &[
            ("--data-dir", "EPS_DATA_DIR"),
            ("--database-url", "DATABASE_URL"),
            ("--follow", "EPS_FOLLOW"),
            ("--batch-bytes", "EPS_BATCH_BYTES"),
            ("--poll-ms", "EPS_POLL_MS"),
            ("--retry-secs", "EPS_RETRY_SECS"),
            ("--adopt-new-log", "EPS_ADOPT_NEW_LOG"),
            ("--allow-other-store", "EPS_ALLOW_OTHER_STORE"),
        ],
    ),
    (
        "client",
        &[
            ("[FILE]", "EPS_FILE"),
            ("--url", "EPS_URL"),
            ("--token", "EPS_TOKEN"),
            ("--batch", "EPS_BATCH"),
            ("--concurrency", "EPS_CONCURRENCY"),
            ("--max-attempts", "EPS_MAX_ATTEMPTS"),
            ("--timeout-secs", "EPS_TIMEOUT_SECS"),
            ("--progress", "EPS_PROGRESS"),
        ],
    ),
    ("demo", &[]),
];

async fn help(command: &str) -> Output {
    let mut a = Vec::new();
    if !command.is_empty() {
        a.push(command.to_string());
    }
    a.push("--help".into());
    let out = run_eps(&a, &[]).await;
    assert_eq!(out.code(), Some(0), "eps {command} --help: {out}");
    out
}

#[tokio::test]
async fn help_of_every_command_exits_0_and_names_each_flag_and_its_env_var() {
    let top = help("").await;
    for command in ["server", "process", "client", "demo"] {
        assert!(top.stdout.contains(command), "eps --help does not mention {command}:\n{}", top.stdout);
    }
    for (command, flags) in FLAGS {
        let out = help(command).await;
        for (flag, env) in *flags {
            assert!(out.stdout.contains(flag), "eps {command} --help does not mention {flag}:\n{}", out.stdout);
            assert!(
                out.stdout.contains(&format!("[env: {env}")),
                "eps {command} --help does not mention {env}:\n{}",
                out.stdout
            );
        }
    }
    assert!(help("demo").await.stdout.contains("--events"));
}

/// Splits clap's long help into (argument, its text) blocks: "--listen" → its description lines.
fn help_blocks(help: &str) -> Vec<(String, String)> {
    let mut blocks: Vec<(String, String)> = Vec::new();
    let mut in_args = false;
    for line in help.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if !line.starts_with(' ') {
            // "Options:", "Arguments:" and the topic headings ("Core:", "Storage:", …) hold flags;
            // "Usage:", "Commands:" and "Examples:" do not.
            in_args = line.ends_with(':') && !["Usage:", "Commands:", "Examples:"].contains(&line);
            continue;
        }
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if in_args && indent <= 6 && (trimmed.starts_with('-') || trimmed.starts_with('[') || trimmed.starts_with('<'))
        {
            let name =
                trimmed.split([' ', ',']).find(|w| w.starts_with("--") || w.starts_with('[') || w.starts_with('<'));
            // Short help puts the description on the flag's own line.
            blocks.push((name.unwrap_or(trimmed).to_string(), format!("{trimmed}\n")));
        } else if let Some((_, text)) = blocks.last_mut() {
            text.push_str(trimmed);
            text.push('\n');
        }
    }
    blocks
}

/// The headings of `eps COMMAND --help`, in order, each with the flags listed under it.
fn help_sections(help: &str) -> Vec<(String, Vec<String>)> {
    let mut sections: Vec<(String, Vec<String>)> = Vec::new();
    for line in help.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            sections.push((line.trim_end_matches(':').to_string(), Vec::new()));
        } else if let Some((_, flags)) = sections.last_mut() {
            let trimmed = line.trim_start();
            if line.len() - trimmed.len() <= 6 && (trimmed.starts_with('-') || trimmed.starts_with('[')) {
                let name = trimmed.split([' ', ',']).find(|w| w.starts_with("--") || w.starts_with('['));
                flags.extend(name.map(str::to_string));
            }
        }
    }
    sections
}

/// Issue 20, item 2: `--help` groups flags under headings (core, storage, JetStream, TLS and tokens,
/// logging) and ends with examples; each command shows only the flags it uses (`eps status` no
/// stream-creation settings, only the server TLS, only the client a CA).
#[tokio::test]
async fn help_groups_flags_under_headings_ends_with_examples_and_shows_each_command_only_its_flags() {
    const CORE: &str = "Core";
    const STORAGE: &str = "Storage";
    const JETSTREAM: &str = "JetStream (with --log nats://…)";
    const TLS: &str = "TLS and tokens";
    const LOGGING: &str = "Logging";
    let order = [CORE, STORAGE, JETSTREAM, TLS, LOGGING];
    // (command, headings it has, [(flag, its heading)]).
    type Expected<'a> = (&'a str, &'a [&'a str], &'a [(&'a str, &'a str)]);
    let expected: &[Expected] = &[
        (
            "server",
            &[CORE, STORAGE, JETSTREAM, TLS, LOGGING],
            &[
                ("--listen", CORE),
                ("--data-dir", STORAGE),
                ("--dedup-window-secs", STORAGE),
                ("--log", JETSTREAM),
                ("--nats-replicas", JETSTREAM),
                ("--tls-cert", TLS),
                ("--tokens-file", TLS),
                ("--log-level", LOGGING),
            ],
        ),
        (
            "process",
            &[CORE, STORAGE, JETSTREAM, LOGGING],
            &[("--follow", CORE), ("--allow-other-store", STORAGE), ("--nats-max-msgs", JETSTREAM)],
        ),
        (
            "client",
            &[CORE, STORAGE, TLS, LOGGING],
            &[("--url", CORE), ("--state-dir", STORAGE), ("--ca-cert", TLS), ("--token", TLS)],
        ),
        (
            "status",
            &[CORE, STORAGE, JETSTREAM, LOGGING],
            &[("--json", CORE), ("--database-url", STORAGE), ("--nats-partitions", JETSTREAM)],
        ),
        ("compact", &[CORE, STORAGE, LOGGING], &[("--dry-run", CORE), ("--data-dir", STORAGE)]),
    ];
    for (command, headings, flags) in expected {
        let out = help(command).await;
        let sections = help_sections(&out.stdout);
        let names: Vec<&str> = sections.iter().map(|(name, _)| name.as_str()).collect();
        let topics: Vec<&str> = names.iter().copied().filter(|n| order.contains(n)).collect();
        assert_eq!(topics, *headings, "eps {command} --help: its headings, in order:\n{}", out.stdout);
        assert_eq!(names.last(), Some(&"Examples"), "eps {command} --help does not end with examples:\n{}", out.stdout);
        let examples = out.stdout.rsplit("Examples:").next().unwrap();
        assert!(
            examples.lines().filter(|l| l.trim_start().starts_with(&format!("eps {command}"))).count() >= 2,
            "eps {command} --help: fewer than two examples of the command:\n{examples}"
        );
        for (flag, heading) in *flags {
            let under = sections.iter().find(|(_, f)| f.iter().any(|f| f == flag)).map(|(h, _)| h.as_str());
            assert_eq!(under, Some(*heading), "eps {command} --help: {flag} is not under {heading}:\n{}", out.stdout);
        }
        // Only the top-level "Options:" holds no topic: -h (and -V) alone.
        let options = sections.iter().find(|(name, _)| name == "Options").map(|(_, f)| f.clone()).unwrap_or_default();
        assert_eq!(options, ["--help"], "eps {command} --help: flags without a heading:\n{}", out.stdout);
    }
    let top = help("").await;
    assert!(top.stdout.contains("Examples:\n  eps demo"), "eps --help ends without examples:\n{}", top.stdout);

    // Each flag only where it is used.
    let used_by: &[(&str, &[&str])] = &[
        // Stream creation and its checked settings: the server and the processors, never `eps status`.
        ("--nats-replicas", &["server", "process"]),
        ("--nats-duplicate-window-secs", &["server", "process"]),
        ("--nats-max-age-secs", &["server", "process"]),
        ("--nats-max-bytes", &["server", "process"]),
        ("--nats-max-msgs", &["server", "process"]),
        ("--nats-partitions", &["server", "process", "status"]),
        ("--nats-rebalance-ms", &["process"]),
        ("--tls-cert", &["server"]),
        ("--tokens-file", &["server"]),
        ("--ca-cert", &["client"]),
        ("--follow", &["process"]),
        ("--allow-other-store", &["process", "status", "compact"]),
        ("--segment-bytes", &["server"]),
        ("--dry-run", &["compact"]),
    ];
    let commands = ["server", "process", "client", "status", "compact", "demo"];
    let mut helps = Vec::new();
    for command in commands {
        helps.push((command, help_sections(&help(command).await.stdout)));
    }
    for (flag, users) in used_by {
        for (command, sections) in &helps {
            let offered = sections.iter().any(|(_, flags)| flags.iter().any(|f| f == flag));
            assert_eq!(offered, users.contains(command), "eps {command} --help offers {flag}: {offered}");
        }
    }
    // And a flag a command does not take is refused, not silently ignored.
    let out = run_eps(&args(&["status", "--nats-replicas", "3"]), &[]).await;
    assert_eq!(out.code(), Some(2), "{out}");
}

/// README: "every flag also reads an environment variable"; `eps --help`: "Every flag can also be set
/// by the environment variable shown in its help."
#[tokio::test]
async fn every_flag_of_every_command_shows_an_environment_variable_in_its_help() {
    let mut missing = Vec::new();
    for (command, _) in FLAGS {
        let out = help(command).await;
        let blocks = help_blocks(&out.stdout);
        assert!(blocks.len() >= 3, "could not read the options of eps {command} --help:\n{}", out.stdout);
        for (flag, text) in blocks {
            // clap wraps help text, so "[env: X]" may be split across lines.
            let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
            if flag != "--help" && flag != "--version" && !text.contains("[env: ") {
                missing.push(format!("eps {command} {flag}"));
            }
        }
    }
    assert!(missing.is_empty(), "flags without an environment variable: {missing:?}");
}

#[tokio::test]
async fn help_never_prints_the_token_or_the_database_url_from_the_environment() {
    let envs = [
        ("EPS_TOKEN", "tok-must-not-show".to_string()),
        ("DATABASE_URL", "postgres://u:pw-must-not-show@h/db".to_string()),
    ];
    for command in ["server", "process", "client"] {
        let out = run_eps(&args(&[command, "--help"]), &envs).await;
        assert_eq!(out.code(), Some(0), "{out}");
        assert!(!out.stdout.contains("must-not-show"), "eps {command} --help shows a secret:\n{}", out.stdout);
    }
}

#[tokio::test]
async fn an_unknown_flag_exits_2() {
    for a in [&["--bogus"][..], &["server", "--bogus"], &["process", "--bogus"], &["client", "--bogus"], &["nonsense"]]
    {
        let out = run_eps(&args(a), &[]).await;
        assert_eq!(out.code(), Some(2), "eps {a:?}: {out}");
        assert!(out.stderr.contains("error"), "eps {a:?}: {out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_listen_with_the_default_token_exits_2_with_one_line_and_starts_with_another_token() {
    let env = Env::new(StoreKind::Sqlite).await;
    let data_dir = env.data_dir.display().to_string();
    for extra in [&[][..], &["--token", "secret"]] {
        let mut a = args(&["server", "--listen", "0.0.0.0:0", "--data-dir", &data_dir]);
        a.extend(args(extra));
        let out = run_eps(&a, &[]).await;
        assert_eq!(out.code(), Some(2), "{out}");
        let stderr = out.stderr.trim();
        assert_eq!(stderr.lines().count(), 1, "not a one-line error: {out}");
        assert!(stderr.contains("token"), "the error does not mention the token: {out}");
    }
    let out = run_eps(&args(&["server", "--listen", "127.0.0.1:0", "--data-dir", &data_dir, "--token", ""]), &[]).await;
    assert_eq!(out.code(), Some(2), "an empty token: {out}");
    assert_eq!(out.stderr.trim().lines().count(), 1, "not a one-line error: {out}");

    let server = ServerProc::start(
        &args(&["server", "--listen", "0.0.0.0:0", "--data-dir", &data_dir, "--token", "something"]),
        &[],
        env.tmp.path(),
    )
    .await;
    let answer = http()
        .post(format!("{}/liveEvent", server.url))
        .header("Authorization", "something")
        .body(r#"{"userId":"u","name":"add_revenue","value":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 200);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn the_client_exits_1_and_reports_failed_when_nobody_listens() {
    let env = Env::new(StoreKind::Sqlite).await;
    let lines = vec![
        event_line("a", "add_revenue", "1"),
        event_line("b", "add_revenue", "2"),
        event_line("c", "add_revenue", "3"),
    ];
    let file = env.write_file("events.jsonl", &lines);
    let url = format!("http://127.0.0.1:{}", free_port());
    let out =
        within(Duration::from_secs(30), "the client to give up", client(&file, &url, &["--max-attempts", "2"])).await;
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stdout.contains("failed 3"), "summary does not say failed: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_exits_1_and_names_the_line_of_an_invalid_event() {
    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server().await;
    let lines = vec![
        event_line("a", "add_revenue", "1"),
        event_line("b", "add_revenue", "2"),
        r#"{"userId":"c","name":"add_revenue","value":-3}"#.to_string(),
        event_line("d", "add_revenue", "4"),
    ];
    let file = env.write_file("events.jsonl", &lines);
    let out = client(&file, &server.url, &[]).await;
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("line 3:"), "the invalid line is not named: {out}");
    assert!(out.stdout.contains("accepted 3 ") && out.stdout.contains("invalid 1"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eps_environment_variables_configure_server_client_and_processor() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path().join("cwd");
    std::fs::create_dir(&cwd).unwrap();
    let data_dir = tmp.path().join("env-data");
    let other_db = tmp.path().join("other.sqlite3");

    let server = ServerProc::start(
        &args(&["server"]),
        &[
            ("EPS_LISTEN", "127.0.0.1:0".into()),
            ("EPS_DATA_DIR", data_dir.display().to_string()),
            ("EPS_TOKEN", "env-token".into()),
            ("EPS_LOG_FORMAT", "json".into()),
        ],
        &cwd,
    )
    .await;
    assert!(server.url.starts_with("http://127.0.0.1:"));

    let lines = [event_line("env-user", "add_revenue", "1.25"), event_line("env-user", "add_revenue", "2")];
    let file = tmp.path().join("input.jsonl");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let out = run_eps_in(
        &cwd,
        &args(&["client"]),
        &[
            ("EPS_FILE", file.display().to_string()),
            ("EPS_URL", server.url.clone()),
            ("EPS_TOKEN", "env-token".into()),
            ("EPS_PROGRESS", "quiet".into()),
        ],
    )
    .await;
    assert_eq!(out.code(), Some(0), "client configured by EPS_*: {out}");
    assert!(out.stdout.contains("accepted 2 "), "{out}");

    assert_eq!(segments(&data_dir.join("log")).len(), 1, "EPS_DATA_DIR was not used");
    assert_eq!(log_lines(&data_dir.join("log")).len(), 2);
    assert!(!cwd.join("data").exists(), "the server used ./data instead of EPS_DATA_DIR");
    let first_log_line = server.stderr().lines().next().unwrap_or_default().to_string();
    assert!(
        serde_json::from_str::<serde_json::Value>(&first_log_line).is_ok(),
        "EPS_LOG_FORMAT=json ignored: {first_log_line:?}"
    );

    let out = run_eps_in(
        &cwd,
        &args(&["process"]),
        &[
            ("EPS_DATA_DIR", data_dir.display().to_string()),
            ("DATABASE_URL", format!("sqlite://{}", other_db.display())),
            ("EPS_BATCH_BYTES", "100".into()),
            // Not the server's store (it used the SQLite file in the data directory): on purpose.
            ("EPS_ALLOW_OTHER_STORE", "true".into()),
        ],
    )
    .await;
    assert_eq!(out.code(), Some(0), "process configured by EPS_* and DATABASE_URL: {out}");
    assert_eq!(applied_count(&out.stdout), 2, "{out}");
    let conn = rusqlite::Connection::open(&other_db).unwrap();
    let revenue: String =
        conn.query_row("SELECT revenue FROM users_revenue WHERE user_id = 'env-user'", [], |r| r.get(0)).unwrap();
    assert_eq!(revenue, "3.25");
    assert!(!cwd.join("data").exists());

    let answer = http()
        .get(format!("{}/userEvents/env-user", server.url))
        .header("Authorization", "secret")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 401, "EPS_TOKEN did not replace the default token");
    let answer: serde_json::Value = http()
        .post(format!("{}/liveEvent", server.url))
        .header("Authorization", "Bearer env-token")
        .body(r#"{"userId":"env-user","name":"add_revenue","value":1}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer, json!({"message": "Event received"}));
}

/// README: exit code 2 for "usage or configuration error"; src/server/mod.rs: "a misconfigured server
/// exits at once with one readable line". A database URL eps cannot use is such an error: it can never
/// start working, so neither command should wait for it.
#[tokio::test]
async fn a_database_url_eps_cannot_use_is_a_configuration_error_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data").display().to_string();
    let url = "mysql://user@127.0.0.1/db";
    let commands = [
        args(&["process", "--data-dir", &data_dir, "--database-url", url]),
        args(&["server", "--listen", "127.0.0.1:0", "--data-dir", &data_dir, "--database-url", url]),
    ];
    let runs = commands.iter().map(|c| run_eps_limited(tmp.path(), c, &[], Duration::from_secs(10)));
    let mut failures = Vec::new();
    for (command, out) in commands.iter().zip(futures::future::join_all(runs).await) {
        match out {
            None => failures.push(format!("eps {}: still running after 10 s", command[0])),
            Some(out) if out.code() != Some(2) || !out.stderr.contains("mysql") => {
                failures.push(format!("eps {}: want exit 2 and an error naming the URL, got {out}", command[0]))
            }
            Some(_) => {}
        }
    }
    assert!(failures.is_empty(), "with --database-url {url}:\n{}", failures.join("\n"));
}

#[tokio::test]
async fn a_log_that_is_not_a_jetstream_url_is_refused_by_every_command_and_creates_nothing() {
    // eps status used to show the file log for any other --log (a typo of the stream's URL went unseen).
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let dir = data_dir.display().to_string();
    for command in ["server", "process", "status"] {
        let out = run_eps(&args(&[command, "--data-dir", &dir, "--log", "nats-typo://n:4222"]), &[]).await;
        assert_eq!(out.code(), Some(2), "eps {command}: {out}");
        assert!(
            out.stderr.contains("\"nats-typo://n:4222\" is not a JetStream URL: use nats://host:port"),
            "eps {command}: {out}"
        );
        assert!(!data_dir.exists(), "eps {command} created {}", data_dir.display());
    }
}

#[tokio::test]
async fn listen_takes_a_host_name_and_a_server_url_without_scheme_gets_a_hint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data").display().to_string();
    let server =
        ServerProc::start(&args(&["server", "--listen", "localhost:0", "--data-dir", &data]), &[], tmp.path()).await;
    let response = http().get(format!("http://localhost:{}/healthz", server.port)).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let health = response.json::<serde_json::Value>().await.unwrap();
    assert_eq!(health["status"], json!("ok"), "{health}");
    assert!(health["log"].as_str().is_some_and(|log| log.starts_with("file log ")), "{health}");
    // A name that does not resolve, or no port: a usage error naming the value.
    for bad in ["no-such-host.invalid:8000", "localhost"] {
        let out = run_eps(&args(&["server", "--listen", bad, "--data-dir", &data]), &[]).await;
        assert_eq!(out.code(), Some(2), "{out}");
        assert!(out.stderr.contains(bad), "{out}");
    }

    // A host:port given to the client as a URL: exit 2 and the fix, not "relative URL without a base".
    let file = tmp.path().join("events.jsonl");
    std::fs::write(&file, event_line("hint-u", "add_revenue", "1") + "\n").unwrap();
    let address = format!("127.0.0.1:{}", server.port);
    let out =
        run_eps(&args(&["client", &file.display().to_string(), "--url", &address, "--progress", "quiet"]), &[]).await;
    assert_eq!(out.code(), Some(2), "{out}");
    let line = out.stderr.lines().find(|l| l.starts_with("eps: error: ")).unwrap_or_default();
    assert!(
        line.contains(&format!("{address:?}")) && line.contains(&format!("add http:// (--url http://{address})")),
        "{out}"
    );
    assert!(!out.stderr.contains("relative URL"), "{out}");
}
