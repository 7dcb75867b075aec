//! freshness: how soon an acknowledged event shows in GET /userEvents while the system is under load.
//!
//! A fresh eps server and `eps process --follow` (SQLite). For 10 s a background load of 10,000
//! events/s goes to users `load-N`; every 20 ms a probe event goes to a fresh user `probe-K` with a single
//! POST /liveEvent, and once it is acknowledged (200) GET /userEvents/probe-K is polled every 1 ms until
//! it answers 200. Latency = from the probe's 200 to the GET's first 200.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::time::MissedTickBehavior;

use crate::report::{Figure, Status};
use crate::scenarios::start_eps_server;
use crate::util::Proc;
use crate::{Ctx, FreshnessLoad};

/// Background load rate.
const LOAD_PER_SEC: u64 = 10_000;
/// Tasks sending single events, each paced to LOAD_PER_SEC / LOAD_TASKS per second.
const LOAD_TASKS: u64 = 100;
/// Events per /events batch, one batch every 10 ms.
const BATCH: u64 = 100;
/// Distinct load users.
const LOAD_USERS: u64 = 1000;
/// A probe not visible after this long counts as this long (and is reported as a timeout).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

pub fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let dir = ctx.scratch("freshness")?;
    let data = dir.path().join("eps-data");
    let (server, addr) = start_eps_server(ctx, &data, &dir.path().join("eps-server.log"))?;
    let mut follower = Proc::spawn(
        "eps process --follow",
        ctx.eps_cmd().arg("process").arg("--follow").arg("--data-dir").arg(&data),
        &dir.path().join("eps-process.log"),
    )?;
    let base = format!("http://{addr}");
    let secs = ctx.secs(10);
    let mode = ctx.freshness_load;

    // A client of its own, dropped (closing its connections) before the server is stopped: eps's graceful
    // shutdown waits for connections that were opened but never used (hyper's client opens such spares).
    let http = {
        let _enter = ctx.rt.enter();
        reqwest::Client::builder()
            .pool_max_idle_per_host(512)
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(10))
            .build()?
    };

    // Warm-up: one probe must come through before measuring (the follower has opened the store).
    // While the follower starts, GET may answer 503 (store not ready): tolerated here only.
    let warm = ctx.rt.block_on(probe(http.clone(), base.clone(), "warmup".to_string(), Duration::from_secs(30), true));
    follower.check_alive()?;
    let warm = warm?;
    if warm >= Duration::from_secs(30) {
        anyhow::bail!("the warm-up probe never became visible in GET /userEvents within 30 s");
    }

    let result = ctx.rt.block_on(measure(http.clone(), base, mode, Duration::from_secs(secs)));
    drop(http);
    // Let the runtime's connection tasks see the client is gone and close their sockets.
    ctx.rt.block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
    follower.check_alive()?;
    follower.stop();
    server.stop();
    let r = result?;

    let mut notes = vec![
        format!("p50 {:.1} ms", ms(r.percentile(0.50))),
        format!("max {:.1} ms", ms(r.latencies.last().copied().unwrap_or_default())),
        format!("{} probes", r.latencies.len()),
        format!(
            "load {:.0} events/s via {}",
            r.load_events as f64 / secs as f64,
            if mode == FreshnessLoad::Events { "POST /events" } else { "POST /liveEvent" }
        ),
    ];
    let mut valid = true;
    if r.timeouts > 0 {
        notes.push(format!("{} probes not visible within {PROBE_TIMEOUT:?}", r.timeouts));
    }
    if r.probe_errors > 0 || r.load_errors > 0 || r.latencies.is_empty() {
        valid = false;
        notes.push(format!("ERRORS: {} probe requests, {} load requests failed", r.probe_errors, r.load_errors));
        if let Some(e) = &r.first_error {
            notes.push(format!("first: {e}"));
        }
    }
    let p99 = ms(r.percentile(0.99));
    let mut fig = Figure::new(
        "freshness_p99",
        format!("{p99:.1} ms"),
        "<= 50 ms".into(),
        if valid { Status::from_goal(p99 <= 50.0) } else { Status::Failed },
    );
    fig.notes = notes;
    ctx.report.figure(fig);
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Measured {
    /// Sorted ascending; timeouts count as PROBE_TIMEOUT.
    latencies: Vec<Duration>,
    timeouts: u64,
    probe_errors: u64,
    load_events: u64,
    load_errors: u64,
    first_error: Option<String>,
}

impl Measured {
    /// Nearest-rank percentile.
    fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let rank = (p * self.latencies.len() as f64).ceil() as usize;
        self.latencies[rank.clamp(1, self.latencies.len()) - 1]
    }
}

/// Load and probes for `duration`, then waits for the probes still polling.
async fn measure(
    http: reqwest::Client,
    base: String,
    mode: FreshnessLoad,
    duration: Duration,
) -> anyhow::Result<Measured> {
    let end = Instant::now() + duration;
    let load_events = Arc::new(AtomicU64::new(0));
    let load_errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));

    let mut load = Vec::new();
    let (tasks, period, per_request) = match mode {
        FreshnessLoad::LiveEvent => (LOAD_TASKS, Duration::from_secs_f64(LOAD_TASKS as f64 / LOAD_PER_SEC as f64), 1),
        FreshnessLoad::Events => (1, Duration::from_millis(10), BATCH),
    };
    for task in 0..tasks {
        let (http, base) = (http.clone(), base.clone());
        let (events, errors, first_error) = (load_events.clone(), load_errors.clone(), first_error.clone());
        load.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            // Behind schedule (server slower than the target), skip ticks: the report shows the rate reached.
            tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
            let mut n = task;
            while Instant::now() < end {
                tick.tick().await;
                let request = match mode {
                    FreshnessLoad::LiveEvent => {
                        let body = format!(r#"{{"userId":"load-{}","name":"add_revenue","value":1}}"#, n % LOAD_USERS);
                        http.post(format!("{base}/liveEvent")).header("Content-Type", "application/json").body(body)
                    }
                    FreshnessLoad::Events => {
                        let mut body = String::with_capacity(64 * BATCH as usize);
                        for i in 0..BATCH {
                            body.push_str(&format!(
                                "{{\"userId\":\"load-{}\",\"name\":\"add_revenue\",\"value\":1}}\n",
                                (n * BATCH + i) % LOAD_USERS
                            ));
                        }
                        http.post(format!("{base}/events")).header("Content-Type", "application/x-ndjson").body(body)
                    }
                };
                n += tasks;
                match request.header("Authorization", "secret").send().await {
                    Ok(resp) if resp.status().is_success() => {
                        events.fetch_add(per_request, Ordering::Relaxed);
                    }
                    other => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        let msg = match other {
                            Ok(resp) => format!("load: HTTP {}", resp.status()),
                            Err(e) => format!("load: {e}"),
                        };
                        first_error.lock().unwrap().get_or_insert(msg);
                    }
                }
            }
        }));
    }

    // One probe every 20 ms, each in its own task so a slow one does not delay the next.
    let mut probes = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut k = 0u64;
    loop {
        tick.tick().await;
        if Instant::now() >= end {
            break;
        }
        probes.push(tokio::spawn(probe(http.clone(), base.clone(), format!("probe-{k}"), PROBE_TIMEOUT, false)));
        k += 1;
    }
    for task in load {
        task.await?;
    }

    let mut m = Measured {
        latencies: Vec::new(),
        timeouts: 0,
        probe_errors: 0,
        load_events: load_events.load(Ordering::Relaxed),
        load_errors: load_errors.load(Ordering::Relaxed),
        first_error: first_error.lock().unwrap().take(),
    };
    for task in probes {
        match task.await? {
            Ok(latency) => {
                if latency >= PROBE_TIMEOUT {
                    m.timeouts += 1;
                }
                m.latencies.push(latency);
            }
            Err(e) => {
                m.probe_errors += 1;
                m.first_error.get_or_insert(format!("probe: {e:#}"));
            }
        }
    }
    m.latencies.sort();
    Ok(m)
}

/// Posts one event for `user`, then polls GET /userEvents/`user` every 1 ms until it answers 200.
/// Returns the time from the POST's 200 to the GET's first 200 (`timeout` if it never came). A GET
/// answering anything but 200 or 404 is an error, except 503 when `allow_503`.
async fn probe(
    http: reqwest::Client,
    base: String,
    user: String,
    timeout: Duration,
    allow_503: bool,
) -> anyhow::Result<Duration> {
    let body = format!(r#"{{"userId":"{user}","name":"add_revenue","value":1}}"#);
    let resp = http
        .post(format!("{base}/liveEvent"))
        .header("Authorization", "secret")
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await?;
    if !resp.status().is_success() {
        anyhow::bail!("POST /liveEvent for {user}: HTTP {}", resp.status());
    }
    let acked = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let resp = http.get(format!("{base}/userEvents/{user}")).header("Authorization", "secret").send().await?;
        let status = resp.status();
        // Read the body so the connection goes back to the pool.
        let _ = resp.bytes().await;
        if status.is_success() {
            return Ok(acked.elapsed());
        }
        let tolerated = status == reqwest::StatusCode::NOT_FOUND
            || (allow_503 && status == reqwest::StatusCode::SERVICE_UNAVAILABLE);
        if !tolerated {
            anyhow::bail!("GET /userEvents/{user}: HTTP {status}");
        }
        if acked.elapsed() >= timeout {
            return Ok(timeout);
        }
    }
}
