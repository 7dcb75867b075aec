//! `eps demo`: the whole system on sample data, in a temporary directory, checked against the input.
//!
//! Starts a server on a free loopback port with the embedded store, sends the seed's three events and a
//! generated file with the real client, runs the processor, reads revenues back over HTTP, and compares
//! every user's total with the sum computed directly from the input files.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context};
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;

use crate::client::{self, ClientOptions, Progress};
use crate::event::Event;
use crate::processor::{self, ProcessOptions};
use crate::server::{Server, ServerOptions, DEFAULT_TOKEN};

/// The seed's example events.
pub const SEED_EVENTS: &str = include_str!("../samples/events.jsonl");

pub async fn run(generated_events: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let data_dir = dir.path().join("data");
    let mut server_opts = ServerOptions::new(&data_dir);
    server_opts.listen = "127.0.0.1:0".parse()?;
    let server = Server::bind(server_opts).await?;
    let url = format!("http://{}", server.local_addr());
    println!("eps demo: server at {url}, data in {}", data_dir.display());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));

    let seed_file = dir.path().join("events.jsonl");
    std::fs::write(&seed_file, SEED_EVENTS)?;
    let generated_file = dir.path().join("generated.jsonl");
    write_generated(&generated_file, generated_events)?;

    for (label, file) in [("seed events.jsonl", &seed_file), ("generated file", &generated_file)] {
        let summary = client::run(ClientOptions {
            file: file.clone(),
            urls: vec![url.clone()],
            token: DEFAULT_TOKEN.into(),
            batch: client::DEFAULT_BATCH,
            concurrency: client::default_concurrency(client::DEFAULT_BATCH),
            max_attempts: client::DEFAULT_MAX_ATTEMPTS,
            timeout: client::DEFAULT_TIMEOUT,
            progress: Progress::Quiet,
            // The demo's files live in its temporary directory: no checkpoint to keep.
            ..Default::default()
        })
        .await?;
        println!("client ({label}): {summary}");
        if !summary.ok() {
            bail!("the client could not deliver every event");
        }
    }

    let summary = processor::run(ProcessOptions::new(&data_dir), std::future::pending()).await?;
    println!("process: {summary}");
    let again = processor::run(ProcessOptions::new(&data_dir), std::future::pending()).await?;
    println!("process again: {again} (nothing twice)");

    let expected = expected_totals(&[&seed_file, &generated_file])?;
    let http = reqwest::Client::new();
    let mut mismatches = 0;
    let mut rows = Vec::new();
    for (user, want) in &expected {
        let response =
            http.get(format!("{url}/userEvents/{user}")).header("Authorization", DEFAULT_TOKEN).send().await?;
        let text = response.text().await?;
        let body: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("bad answer {text:?}"))?;
        let got = body["revenue"].as_str().and_then(|s| s.parse::<Decimal>().ok());
        if got != Some(*want) {
            mismatches += 1;
            println!("MISMATCH {user}: expected {want}, server answered {text}");
        }
        if user == "user1" || user == "user2" {
            println!("GET /userEvents/{user} -> {text}");
        }
        rows.push(format!("{user:<14} {:>12}", body["revenue"].as_str().unwrap_or("?")));
    }
    println!("revenue per user, from GET /userEvents:");
    for line in rows.chunks(3) {
        println!("  {}", line.join("    "));
    }
    let _ = stop.send(());
    serving.await??;
    if mismatches > 0 {
        bail!("{mismatches} of {} users have a wrong total", expected.len());
    }
    println!(
        "check: all {} users' revenues equal the sums computed from the input files; server stopped cleanly",
        expected.len()
    );
    Ok(())
}

/// A deterministic sample: 100 users, decimal values with cents, a fifth of them subtractions.
fn write_generated(path: &Path, events: usize) -> anyhow::Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2026);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for _ in 0..events {
        let user = rng.random_range(0..100);
        let name = if rng.random_ratio(1, 5) { "subtract_revenue" } else { "add_revenue" };
        let cents: u64 = rng.random_range(1..100_000);
        writeln!(
            out,
            r#"{{"userId":"demo-user-{user:03}","name":"{name}","value":{}.{:02}}}"#,
            cents / 100,
            cents % 100
        )?;
    }
    out.flush()?;
    Ok(())
}

/// Totals computed straight from the input files, the reference the database must equal.
pub fn expected_totals(files: &[&Path]) -> anyhow::Result<BTreeMap<String, Decimal>> {
    let mut totals = BTreeMap::new();
    for file in files {
        for line in std::fs::read_to_string(file)?.lines().filter(|l| !l.trim().is_empty()) {
            let event = Event::parse_request(line.as_bytes())?;
            *totals.entry(event.user_id().to_owned()).or_insert(Decimal::ZERO) += event.delta();
        }
    }
    Ok(totals)
}
