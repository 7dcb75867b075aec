//! The deployment pack in `deploy/`, checked with the tools that will consume it: the systemd units
//! with `systemd-analyze verify` (and their hardening), the alert rules with `promtool check rules`
//! and `promtool test rules`, the dashboard's queries parsed by promtool too, every metric the
//! dashboard and the alerts name served by the real binaries, the default configuration accepted by
//! `eps --config`, and the Debian package's contents with `dpkg-deb`.
//!
//! promtool comes with Debian's prometheus package, cargo-deb with `cargo install`: scripts/test-deps
//! installs both.

use crate::common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy(path: &str) -> PathBuf {
    repo().join("deploy").join(path)
}

/// Runs a tool to completion: (success, stdout, stderr). A missing tool fails with what installs it.
fn tool(program: &str, args: &[&str], cwd: &Path, envs: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .envs(envs.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}): run scripts/test-deps"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const UNITS: &[&str] = &["eps-server.service", "eps-process.service", "eps-compact.service", "eps-compact.timer"];

// ---------------------------------------------------------------------------------------------------
// systemd

#[test]
fn the_systemd_units_pass_systemd_analyze_verify_and_are_hardened() {
    let tmp = tempfile::tempdir().unwrap();
    let units = tmp.path().join("units");
    let man = tmp.path().join("man");
    std::fs::create_dir_all(&units).unwrap();
    // The units run /usr/bin/eps: point them at the binary under test (verify checks it is executable).
    for unit in UNITS {
        let text = std::fs::read_to_string(deploy(&format!("systemd/{unit}"))).unwrap();
        std::fs::write(units.join(unit), text.replace("/usr/bin/eps ", &format!("{} ", eps_bin()))).unwrap();
    }
    // Their Documentation= names the man pages eps writes, which verify looks up with man(1).
    let (ok, _, err) = tool(eps_bin(), &["man", "--dir", &man.join("man1").display().to_string()], tmp.path(), &[]);
    assert!(ok, "eps man --dir: {err}");
    let paths: Vec<String> = UNITS.iter().map(|u| units.join(u).display().to_string()).collect();
    let mut a = vec!["verify"];
    a.extend(paths.iter().map(String::as_str));
    let (ok, out, err) = tool("systemd-analyze", &a, tmp.path(), &[("MANPATH", &man.display().to_string())]);
    // verify exits 0 on unknown keys and only warns: any word from it is a defect.
    assert!(ok && out.trim().is_empty() && err.trim().is_empty(), "systemd-analyze verify:\n{out}\n{err}");

    for service in ["eps-server.service", "eps-process.service", "eps-compact.service"] {
        let text = std::fs::read_to_string(deploy(&format!("systemd/{service}"))).unwrap();
        let directives: BTreeSet<&str> =
            text.lines().map(str::trim).filter(|l| !l.starts_with('#') && l.contains('=')).collect();
        for want in [
            "User=eps",
            "Group=eps",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "StateDirectory=eps",
            "WorkingDirectory=/var/lib/eps",
            "CapabilityBoundingSet=",
        ] {
            assert!(directives.contains(want), "{service} lacks {want}");
        }
        // Only the data directory is writable: no other write grant.
        for line in &directives {
            assert!(
                !line.starts_with("ReadWritePaths=") && !line.starts_with("ProtectSystem=full"),
                "{service}: {line}"
            );
        }
        let exec = directives.iter().find(|l| l.starts_with("ExecStart=")).expect("ExecStart");
        assert!(exec.starts_with("ExecStart=/usr/bin/eps --config /etc/eps/eps.toml "), "{service}: {exec}");
    }
    let process = std::fs::read_to_string(deploy("systemd/eps-process.service")).unwrap();
    assert!(process.contains("ExecStart=/usr/bin/eps --config /etc/eps/eps.toml process --follow\n"), "{process}");
    let timer = std::fs::read_to_string(deploy("systemd/eps-compact.timer")).unwrap();
    assert!(timer.contains("OnCalendar=") && timer.contains("Persistent=true"), "{timer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_config_is_accepted_by_every_command_the_units_run() {
    let config = deploy("eps.toml").display().to_string();
    let out = run_eps(&args(&["--config", &config, "config"]), &[]).await;
    assert!(out.status.success(), "eps --config deploy/eps.toml config: {out}");
    let mut section = "";
    let mut seen = BTreeSet::new();
    for line in out.stdout.lines() {
        if line.starts_with('[') {
            section = line;
        }
        if line.starts_with("data-dir = ") {
            assert_eq!(line, r#"data-dir = "/var/lib/eps"  # file"#, "{section}");
            seen.insert(section.to_string());
        }
    }
    for command in ["[server]", "[process]", "[status]", "[compact]"] {
        assert!(seen.contains(command), "{command} does not take data-dir from the file:\n{}", out.stdout);
    }
    assert!(out.stdout.contains(r#"metrics-listen = "127.0.0.1:9101"  # file"#), "{}", out.stdout);
    // The server really starts from it (data directory and address overridden by flags, which win).
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data").display().to_string();
    let server = ServerProc::start(
        &args(&["--config", &config, "server", "--listen", "127.0.0.1:0", "--data-dir", &data_dir]),
        &[],
        tmp.path(),
    )
    .await;
    assert_eq!(post_event(&http(), &server.url, &event_line("cfg-user", "add_revenue", "1")).await.0, 200);
}

// ---------------------------------------------------------------------------------------------------
// Prometheus and Grafana

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = deploy("prometheus");
    let (ok, out, err) = tool("promtool", &["check", "rules", "eps-alerts.yml"], &dir, &[]);
    assert!(ok && out.contains("SUCCESS"), "promtool check rules:\n{out}\n{err}");
    let (ok, out, err) = tool("promtool", &["test", "rules", "eps-alerts.test.yml"], &dir, &[]);
    assert!(ok && out.contains("SUCCESS"), "promtool test rules:\n{out}\n{err}");
    // Every alert of the file has a test case.
    let rules = std::fs::read_to_string(dir.join("eps-alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("eps-alerts.test.yml")).unwrap();
    let alerts: Vec<&str> = rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).collect();
    assert!(alerts.len() >= 6, "{alerts:?}");
    for alert in alerts {
        assert!(tests.contains(&format!("alertname: {alert}\n")), "no promtool test for {alert}");
    }
}

/// The PromQL expressions of the alert rules and of the dashboard (targets and template queries),
/// with Grafana's variables replaced by values (so promtool can parse them).
fn queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let rules = std::fs::read_to_string(deploy("prometheus/eps-alerts.yml")).unwrap();
    let mut lines = rules.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim().strip_prefix("expr:") else { continue };
        let indent = line.len() - line.trim_start().len();
        let mut expr = rest.trim().to_string();
        if expr == "|" {
            expr.clear();
            while let Some(next) =
                lines.peek().filter(|l| l.len() - l.trim_start().len() > indent || l.trim().is_empty())
            {
                expr.push_str(next.trim());
                expr.push(' ');
                lines.next();
            }
        }
        out.push(("eps-alerts.yml".to_string(), expr.trim().to_string()));
    }
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/eps-dashboard.json")).unwrap())
            .expect("the dashboard is JSON");
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().map(Vec::as_slice).unwrap_or_default() {
            out.push((format!("panel {:?}", panel["title"]), target["expr"].as_str().expect("expr").to_string()));
        }
    }
    for var in dashboard["templating"]["list"].as_array().expect("templating") {
        if let Some(query) = var["query"].as_str().and_then(|q| q.strip_prefix("label_values(")) {
            let metric = query.rsplit_once(',').expect("label_values(metric, label)").0;
            out.push((format!("variable {}", var["name"]), metric.to_string()));
        }
    }
    let vars = [
        ("$__rate_interval", "5m"),
        ("$server_job", "eps-server"),
        ("$process_job", "eps-process"),
        ("$instance", ".*"),
    ];
    for (_, q) in &mut out {
        for (var, value) in vars {
            *q = q.replace(var, value);
        }
        assert!(!q.contains('$'), "an unknown variable in {q}");
    }
    out
}

/// Metric names in a PromQL expression: identifiers outside label matchers, strings, durations and
/// `by (…)`-style label lists, that are not functions or keywords.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        // Aggregations, which may be followed by `by (…)` before their parenthesis.
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '{' => i += chars[i..].iter().position(|&c| c == '}').expect("closing }") + 1,
            '[' => i += chars[i..].iter().position(|&c| c == ']').expect("closing ]") + 1,
            '"' | '\'' => i += 1 + chars[i + 1..].iter().position(|&q| q == c).expect("closing quote") + 1,
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut j = i;
                while j < chars.len() && chars[j] == ' ' {
                    j += 1;
                }
                let call = j < chars.len() && chars[j] == '(';
                if LABEL_LISTS.contains(&word.as_str()) && call {
                    i = j + chars[j..].iter().position(|&c| c == ')').expect("closing )") + 1;
                } else if !call && !KEYWORDS.contains(&word.as_str()) {
                    names.insert(word);
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                // A number (or the digits of 1e9); letters right after are its exponent.
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    names
}

#[test]
fn metric_names_are_found_in_promql() {
    let names = metric_names(
        r#"sum by (le, route) (rate(eps_a_bucket{job=~"x|y",route!="z"}[5m])) / on (instance) eps_b > 0.1e3 and up{job="p"} == 0"#,
    );
    assert_eq!(names, ["eps_a_bucket", "eps_b", "up"].into_iter().map(String::from).collect());
}

#[test]
fn every_dashboard_query_is_valid_promql() {
    // promtool parses a recording rule's expression: one rule per query.
    let tmp = tempfile::tempdir().unwrap();
    let mut yaml = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, q)) in queries().iter().enumerate() {
        yaml.push_str(&format!(
            "      - record: eps:dashboard_query_{i}\n        expr: {}\n",
            serde_json::to_string(q).unwrap()
        ));
    }
    std::fs::write(tmp.path().join("queries.yml"), &yaml).unwrap();
    let (ok, out, err) = tool("promtool", &["check", "rules", "queries.yml"], tmp.path(), &[]);
    assert!(ok, "a dashboard or alert query does not parse:\n{out}\n{err}\n{yaml}");
}

/// Series names in a Prometheus text scrape.
fn served_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alerts_use_is_served_by_the_server_or_the_processor() {
    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server().await;
    let http = http();
    // Some traffic: accepted, duplicate, rejected, unknown user.
    let line = event_line("deploy-user", "add_revenue", "2");
    for _ in 0..2 {
        assert_eq!(post_event(&http, &server.url, &line).await.0, 200);
    }
    assert_eq!(post_event(&http, &server.url, &event_line("deploy-user", "add_revenue", "-1")).await.0, 400);
    let follower = env.spawn_process(&["--follow", "--metrics-listen", "127.0.0.1:0"]);
    let prefix = "eps process metrics on http://";
    let processor_url = within(START_TIMEOUT, "the processor's metrics address", async {
        loop {
            if let Some(addr) = follower.stdout().lines().find_map(|l| l.strip_prefix(prefix)?.strip_suffix("/metrics"))
            {
                return format!("http://{addr}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let scrape = |url: String| {
        let http = http.clone();
        async move { http.get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap() }
    };
    let (server_text, processor_text) = within(Duration::from_secs(30), "the event applied, seen by both", async {
        loop {
            let p = scrape(processor_url.clone()).await;
            let s = scrape(server.url.clone()).await;
            let applied = p.lines().any(|l| l.starts_with("eps_processor_events_applied_total ") && !l.ends_with(" 0"));
            if applied && s.contains("\neps_store_last_commit_age_seconds ") {
                return (s, p);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let mut served = served_names(&server_text);
    served.extend(served_names(&processor_text));
    // `up` is Prometheus's own series for each scrape target.
    served.insert("up".to_string());

    let mut missing = Vec::new();
    let mut used = BTreeSet::new();
    for (place, q) in queries() {
        for name in metric_names(&q) {
            if !served.contains(&name) {
                missing.push(format!("{name} (in {place}: {q})"));
            }
            used.insert(name);
        }
    }
    assert!(missing.is_empty(), "metrics used but not served:\n{}\n\nserved: {served:?}", missing.join("\n"));
    // The pack covers what the issue asks for.
    for name in [
        "eps_events_appended_total",
        "eps_http_requests_total",
        "eps_http_request_duration_seconds_bucket",
        "eps_log_fsync_duration_seconds_bucket",
        "eps_log_commit_batch_events_sum",
        "eps_log_append_errors_total",
        "eps_store_lag_events",
        "eps_store_last_commit_age_seconds",
        "eps_processor_events_applied_total",
        "eps_data_dir_available_bytes",
        "process_resident_memory_bytes",
    ] {
        assert!(used.contains(name), "the dashboard and alerts never use {name}");
    }
}

// ---------------------------------------------------------------------------------------------------
// The Debian package

/// Builds the package with scripts/package-deb (cargo-deb, the metadata in Cargo.toml) around the
/// binary under test instead of a release build (which takes minutes: `scripts/package-deb` alone
/// does that), then reads it back with dpkg-deb.
#[test]
fn the_debian_package_holds_the_binary_units_config_man_pages_and_completions() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("target");
    std::fs::create_dir_all(target.join("release")).unwrap();
    std::os::unix::fs::symlink(eps_bin(), target.join("release/eps")).unwrap();
    let out_dir = tmp.path().join("out");
    let (ok, out, err) = tool(
        &repo().join("scripts/package-deb").display().to_string(),
        &["--no-build", "--fast", "--output", &format!("{}/", out_dir.display())],
        &repo(),
        &[("CARGO_TARGET_DIR", &target.display().to_string())],
    );
    assert!(ok, "scripts/package-deb:\n{out}\n{err}");
    let deb = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"));
    let deb = deb.expect("a .deb").display().to_string();

    let (ok, listing, err) = tool("dpkg-deb", &["-c", &deb], tmp.path(), &[]);
    assert!(ok, "dpkg-deb -c: {err}");
    let entries: Vec<(&str, &str)> =
        listing.lines().map(|l| (l.split_whitespace().next().unwrap(), l.split_whitespace().last().unwrap())).collect();
    let mode_of = |path: &str| entries.iter().find(|(_, p)| *p == path).map(|(m, _)| *m);
    for (path, mode) in [
        ("./usr/bin/eps", "-rwxr-xr-x"),
        ("./etc/eps/eps.toml", "-rw-r-----"),
        ("./usr/lib/systemd/system/eps-server.service", "-rw-r--r--"),
        ("./usr/lib/systemd/system/eps-process.service", "-rw-r--r--"),
        ("./usr/lib/systemd/system/eps-compact.service", "-rw-r--r--"),
        ("./usr/lib/systemd/system/eps-compact.timer", "-rw-r--r--"),
        ("./usr/lib/sysusers.d/eps.conf", "-rw-r--r--"),
        ("./usr/share/man/man1/eps.1.gz", "-rw-r--r--"),
        ("./usr/share/man/man1/eps-server.1.gz", "-rw-r--r--"),
        ("./usr/share/man/man1/eps-process.1.gz", "-rw-r--r--"),
        ("./usr/share/man/man1/eps-compact.1.gz", "-rw-r--r--"),
        ("./usr/share/bash-completion/completions/eps", "-rw-r--r--"),
        ("./usr/share/zsh/vendor-completions/_eps", "-rw-r--r--"),
        ("./usr/share/fish/vendor_completions.d/eps.fish", "-rw-r--r--"),
        ("./usr/share/eps/grafana/eps-dashboard.json", "-rw-r--r--"),
        ("./usr/share/eps/prometheus/eps-alerts.yml", "-rw-r--r--"),
        ("./usr/share/doc/eps/copyright", "-rw-r--r--"),
    ] {
        assert_eq!(mode_of(path), Some(mode), "{path} in the package:\n{listing}");
    }

    let (ok, info, err) = tool("dpkg-deb", &["-I", &deb], tmp.path(), &[]);
    assert!(ok, "dpkg-deb -I: {err}");
    for want in [" Package: eps\n", &format!(" Version: {}-1\n", env!("CARGO_PKG_VERSION")), " postinst ", " prerm "] {
        assert!(info.contains(want), "dpkg-deb -I lacks {want:?}:\n{info}");
    }
    assert!(info.lines().any(|l| l.starts_with(" Depends: ") && l.contains("systemd")), "{info}");
    let (ok, conffiles, _) = tool("dpkg-deb", &["-I", &deb, "conffiles"], tmp.path(), &[]);
    assert!(ok && conffiles.lines().any(|l| l == "/etc/eps/eps.toml"), "conffiles: {conffiles}");

    // What is inside is what the repository holds, and the binary runs.
    let root = tmp.path().join("root");
    let (ok, _, err) = tool("dpkg-deb", &["-x", &deb, &root.display().to_string()], tmp.path(), &[]);
    assert!(ok, "dpkg-deb -x: {err}");
    for (inside, source) in [
        ("usr/lib/systemd/system/eps-server.service", "systemd/eps-server.service"),
        ("usr/lib/systemd/system/eps-process.service", "systemd/eps-process.service"),
        ("etc/eps/eps.toml", "eps.toml"),
        ("usr/share/eps/prometheus/eps-alerts.yml", "prometheus/eps-alerts.yml"),
    ] {
        assert_eq!(std::fs::read(root.join(inside)).unwrap(), std::fs::read(deploy(source)).unwrap(), "{inside}");
    }
    let (ok, man, err) =
        tool("gzip", &["-dc", &root.join("usr/share/man/man1/eps-server.1.gz").display().to_string()], tmp.path(), &[]);
    assert!(ok && man.contains(".TH eps-server 1") && man.contains("listen"), "eps-server.1: {err}\n{man}");
    let (ok, version, err) = tool(&root.join("usr/bin/eps").display().to_string(), &["--version"], tmp.path(), &[]);
    assert!(ok && version.trim() == format!("eps {}", env!("CARGO_PKG_VERSION")), "{version}{err}");
    let (_, bash, _) = tool(&root.join("usr/bin/eps").display().to_string(), &["completions", "bash"], tmp.path(), &[]);
    assert_eq!(std::fs::read_to_string(root.join("usr/share/bash-completion/completions/eps")).unwrap(), bash);
}

#[test]
fn the_release_profile_strips_and_the_manifest_names_license_and_toolchain() {
    let manifest: toml::Table = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap().parse().unwrap();
    assert_eq!(manifest["profile"]["release"]["strip"], toml::Value::Boolean(true));
    let package = &manifest["package"];
    assert_eq!(package["license"].as_str(), Some("MIT"));
    assert!(package["rust-version"].as_str().is_some_and(|v| v.starts_with("1.")), "{package:?}");
    let license = std::fs::read_to_string(repo().join("LICENSE")).expect("a LICENSE file");
    assert!(license.starts_with("MIT License") && license.contains("Copyright (c) the eps authors"), "{license}");
}

// ---------------------------------------------------------------------------------------------------
// Completions and man pages

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_man_pages_follow_the_command_line() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run_eps(&args(&["completions", shell]), &[]).await;
        assert!(out.status.success(), "eps completions {shell}: {out}");
        for word in ["server", "process", "compact", "data-dir", "metrics-listen", "log-format"] {
            assert!(out.stdout.contains(word), "eps completions {shell} does not complete {word}");
        }
    }
    let bad = run_eps(&args(&["completions", "tcsh"]), &[]).await;
    assert_eq!(bad.code(), Some(2), "{bad}");

    let out = run_eps(&args(&["man"]), &[]).await;
    assert!(out.status.success(), "eps man: {out}");
    assert!(out.stdout.contains(".TH eps 1") && out.stdout.contains("eps\\-server(1)"), "{}", out.stdout);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("man1");
    let out = run_eps(&args(&["man", "--dir", &dir.display().to_string()]), &[]).await;
    assert!(out.status.success(), "eps man --dir: {out}");
    let server = std::fs::read_to_string(dir.join("eps-server.1")).expect("eps-server.1");
    for word in [".TH eps-server 1", "\\-\\-listen", "EPS_LISTEN", "\\-\\-data\\-dir"] {
        assert!(server.contains(word), "eps-server.1 lacks {word}:\n{server}");
    }
    // man(1) renders it.
    let (ok, text, err) =
        tool("man", &["-l", &dir.join("eps-process.1").display().to_string()], tmp.path(), &[("MANWIDTH", "100")]);
    assert!(ok && text.contains("--follow"), "man -l eps-process.1: {err}\n{text}");
}
