//! Power cuts: the data directory on `tests/lazyfs.py`, a FUSE filesystem that keeps only what was
//! explicitly synced (file bytes by fsync/fdatasync, directory entries by a sync of the directory) and
//! drops everything else at a cut. A SIGKILL leaves the page cache intact, so only a test like this
//! one catches a missing sync: remove the `fdatasync` before the 200, or a directory sync, and it fails.
//!
//! Each round: the server and a `--follow` processor run on the mount while senders post batches with
//! ids; at a random moment both are killed and the power is cut; then they restart and the senders
//! retry what was not answered. The first round starts on a new data directory (its directories must be
//! durable before the first 200), the later ones on the existing one. Every batch answered 200 must be
//! counted exactly once at the end.
//!
//! Needs FUSE (root, /dev/fuse, libfuse2) and Python's `fusepy`: `scripts/test` installs them and sets
//! `EPS_LAZYFS_PYTHON` to the interpreter that has fusepy.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fault::{scaled, seed, tally, Report};
use common::*;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;

/// The lazy filesystem, mounted for one test; unmounted when dropped.
struct LazyFs {
    mount: PathBuf,
    control: PathBuf,
    child: std::process::Child,
    cuts: u32,
}

impl LazyFs {
    fn mount(dir: &Path) -> LazyFs {
        let mount = dir.join("mnt");
        let control = dir.join("lazyfs-control");
        std::fs::create_dir_all(&mount).unwrap();
        std::fs::create_dir_all(&control).unwrap();
        let python = std::env::var("EPS_LAZYFS_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lazyfs.py");
        let log = std::fs::File::create(dir.join("lazyfs.log")).unwrap();
        let child = std::process::Command::new(&python)
            .arg(&script)
            .arg(&mount)
            .arg(&control)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {python} {}: {e}", script.display()));
        let mut fs = LazyFs { mount, control, child, cuts: 0 };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !fs.control.join("ready").exists() {
            if let Ok(Some(status)) = fs.child.try_wait() {
                panic!(
                    "lazyfs exited ({status}) before mounting (needs root, /dev/fuse, libfuse2 and fusepy: run through \
                     scripts/test, or set EPS_LAZYFS_PYTHON); its output:\n{}",
                    std::fs::read_to_string(dir.join("lazyfs.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "lazyfs did not mount within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        fs
    }

    /// Drops everything not explicitly synced. Every process using the mount must be dead already.
    fn cut(&mut self) {
        self.cuts += 1;
        std::fs::write(self.control.join(format!("cut-request-{}", self.cuts)), "").unwrap();
        let done = self.control.join(format!("cut-done-{}", self.cuts));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done.exists() {
            assert!(Instant::now() < deadline, "lazyfs did not acknowledge the cut");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.mount).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn batch(tag: &str, user: &str, n: usize) -> String {
    (0..n)
        .map(|i| format!("{{\"userId\":\"{user}\",\"name\":\"add_revenue\",\"value\":1,\"id\":\"{tag}-{i}\"}}\n"))
        .collect()
}

/// The answer to a batch, if it was 200.
async fn post(http: &reqwest::Client, url: &str, body: &str) -> Option<serde_json::Value> {
    let (status, answer) = post_ndjson(http, url, body).await;
    (status == 200).then_some(answer)
}

async fn power_cuts_under_load_lose_no_acknowledged_event(kind: StoreKind) {
    let scenario = "power_cuts";
    let seed = seed(scenario);
    let started = Instant::now();
    let env = Env::new(kind).await;
    let mut fs = LazyFs::mount(env.tmp.path());
    let data_dir = fs.mount.join("data");
    // The store lives off the lazy filesystem: the subject is the log (SQLite's own durability is its).
    let mut store_args = env.db.args();
    if store_args.is_empty() {
        store_args =
            vec!["--database-url".into(), format!("sqlite://{}", env.tmp.path().join("eps.sqlite3").display())];
    }
    let server_args = {
        let mut a = args(&[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data_dir.display().to_string(),
            "--segment-bytes",
            "262144",
        ]);
        a.extend(store_args.clone());
        a
    };
    let process_args = {
        let mut a = args(&["process", "--data-dir", &data_dir.display().to_string(), "--follow", "--poll-ms", "2"]);
        a.extend(store_args.clone());
        a
    };
    let url = Arc::new(Mutex::new(String::new()));
    let want: Arc<Mutex<BTreeMap<String, Decimal>>> = Arc::default();
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let rounds = scaled(3, 12);

    let mut server = ServerProc::start(&server_args, &[], env.tmp.path()).await;
    let mut follower = ChildGuard::spawn(&process_args, &[], env.tmp.path());
    *url.lock().unwrap() = server.url.clone();
    let senders: Vec<_> = (0..3u64)
        .map(|sender| {
            let (url, want, sent, stop) = (url.clone(), want.clone(), sent.clone(), stop.clone());
            tokio::spawn(async move {
                let http = http();
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (sender + 1));
                let mut b = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let user = format!("user{}", rng.random_range(0..30));
                    let n = rng.random_range(1..30usize);
                    let body = batch(&format!("s{sender}-b{b}"), &user, n);
                    b += 1;
                    // Retried with the same ids until answered 200, across kills and cuts.
                    loop {
                        let target = url.lock().unwrap().clone();
                        if let Some(answer) = post(&http, &target, &body).await {
                            assert_eq!(answer["accepted"], n, "{answer}");
                            *want.lock().unwrap().entry(user.clone()).or_insert(Decimal::ZERO) += Decimal::from(n);
                            sent.fetch_add(n as u64, Ordering::Relaxed);
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        })
        .collect();

    for round in 0..rounds {
        // The first cut comes soon after the first start on a new directory.
        let wait_ms = if round == 0 { rng.random_range(300..800) } else { rng.random_range(500..2500) };
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        server.kill().await;
        let _ = follower.child.start_kill();
        let _ = follower.child.wait().await;
        // Let requests the kernel already handed to the filesystem finish before the lights go out.
        tokio::time::sleep(Duration::from_millis(50)).await;
        fs.cut();
        eprintln!(
            "{scenario}: cut {} after {wait_ms} ms, {} events acknowledged so far",
            round + 1,
            sent.load(Ordering::Relaxed)
        );
        server = ServerProc::start(&server_args, &[], env.tmp.path()).await;
        follower = ChildGuard::spawn(&process_args, &[], env.tmp.path());
        *url.lock().unwrap() = server.url.clone();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        within(Duration::from_secs(60), "the senders to finish", s).await.unwrap();
    }
    let want = want.lock().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    let got = loop {
        // SQLite: the store file sits in the test's directory (see store_args above).
        let got = env.db.revenues(env.tmp.path()).await;
        if got == want || Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let t = tally(&want, &got, Decimal::ONE);
    let exited = follower.child.try_wait().unwrap();
    Report {
        scenario,
        store: kind.name(),
        seed,
        events_sent: sent.load(Ordering::Relaxed),
        kills: u64::from(fs.cuts),
        events_lost: t.events_lost,
        events_doubled: t.events_doubled,
        duration: started.elapsed(),
        notes: "server and a --follow processor on a FUSE filesystem that drops everything not synced; power cut at random moments under load, the first soon after starting on a new data directory; kills = power cuts".into(),
        ..Report::default()
    }
    .write();
    eprintln!("{scenario}: {} events acknowledged, {t:?}", sent.load(Ordering::Relaxed));
    assert_eq!(got, want, "{t:?}; server stderr:\n{}", server.stderr());
    assert!(exited.is_none(), "the follower exited: {}", follower.stderr());
    drop(server);
    drop(follower);
}

store_tests!(power_cuts_under_load_lose_no_acknowledged_event);
