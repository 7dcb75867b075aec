//! The run's books: counters, the capped reports of invalid lines, rejections and failures, the
//! progress display on stderr, and `--failed-out`.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::StatusCode;
use tokio::task::JoinError;

use super::input::with_id;
use super::send::{Outcome, Request};
use super::state::Frontier;
use super::summary::Counters;
use super::Progress;

/// How many invalid lines are shown before they are only counted.
pub(super) const INVALID_SHOWN: u64 = 10;

/// How many times each distinct rejection or failure message is printed before it is only counted.
pub(super) const REPORTS_PER_MESSAGE: u64 = 5;
/// How many distinct messages are tracked for that purpose (beyond, everything is printed).
pub(super) const MAX_TRACKED_MESSAGES: usize = 1000;
/// How often Plain progress prints a line.
pub(super) const PLAIN_EVERY: Duration = Duration::from_secs(2);
/// How often the progress bar's counts are refreshed.
pub(super) const BAR_EVERY: Duration = Duration::from_millis(200);

/// What the reading loop keeps about the requests' fates: counts, reports, the frontier of done
/// lines, the file of failed lines.
pub(super) struct Books {
    pub(super) counters: Arc<Counters>,
    pub(super) reports: Reports,
    pub(super) console: Console,
    pub(super) frontier: Frontier,
    pub(super) failed_out: Option<FailedOut>,
    pub(super) producer: String,
}

/// `--failed-out`: every invalid, refused or undelivered line, one per line.
pub(super) struct FailedOut {
    pub(super) path: PathBuf,
    pub(super) out: std::io::BufWriter<std::fs::File>,
    pub(super) lines: u64,
    pub(super) error: Option<std::io::Error>,
}

impl FailedOut {
    /// Created (emptied) for a new send; appended to when the run resumes one.
    pub(super) fn open(path: &std::path::Path, append: bool) -> anyhow::Result<FailedOut> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(path)
            .with_context(|| format!("cannot open --failed-out {}", path.display()))?;
        Ok(FailedOut { path: path.to_owned(), out: std::io::BufWriter::new(file), lines: 0, error: None })
    }

    pub(super) fn write(&mut self, line: &[u8]) {
        use std::io::Write as _;
        if self.error.is_some() {
            return;
        }
        match self.out.write_all(line).and_then(|()| self.out.write_all(b"\n")) {
            Ok(()) => self.lines += 1,
            Err(e) => self.error = Some(e),
        }
    }

    pub(super) fn finish(&mut self) -> std::io::Result<()> {
        use std::io::Write as _;
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        self.out.flush()?;
        self.out.get_ref().sync_all()
    }
}

impl Books {
    /// Counts what became of one request, reports its errors, moves the frontier past it if every
    /// line of it is done, and writes its failed lines to `--failed-out`.
    pub(super) fn tally(&mut self, done: Result<(Request, Outcome), JoinError>) {
        let counters = &self.counters;
        // The file line of the request's `n`-th event (1-based); a position the request does not have
        // (a confused server) is reported against the request's first line.
        let file_line = |lines: &[u64], n: usize| lines.get(n.wrapping_sub(1)).or(lines.first()).copied().unwrap_or(0);
        let (request, outcome) = match done {
            Ok(done) => done,
            Err(e) => {
                // A sending task panicked or was abandoned: its events are not known to be delivered. (The
                // line numbers and ticket went down with the task; the whole count is kept by `sent`.)
                self.frontier.block();
                if !e.is_cancelled() {
                    self.console.report(&format!("a request was lost by a failed sending task: {e}"));
                }
                return;
            }
        };
        let Request { seq, lines, originals } = request;
        let mut failed_lines: Vec<usize> = Vec::new();
        let mut undelivered = false;
        let done = match outcome {
            Outcome::Accepted { server, duplicates, rejected } => {
                let refused = (rejected.len() as u64).min(lines.len() as u64);
                counters.accepted.fetch_add(lines.len() as u64 - refused, Ordering::Relaxed);
                if let Some(n) = counters.per_server.get(server) {
                    n.fetch_add(lines.len() as u64 - refused, Ordering::Relaxed);
                }
                counters.duplicates.fetch_add(duplicates, Ordering::Relaxed);
                counters.rejected.fetch_add(refused, Ordering::Relaxed);
                for (n, error) in rejected {
                    self.reports.report(
                        &self.console,
                        file_line(&lines, n),
                        format!("HTTP 200, line refused: {error}"),
                    );
                    failed_lines.push(n);
                }
                true
            }
            Outcome::Rejected { status, error, lines: per_line } => {
                counters.rejected.fetch_add(lines.len() as u64, Ordering::Relaxed);
                if per_line.is_empty() {
                    for &line in &lines {
                        self.reports.report(&self.console, line, format!("HTTP {status}: {error}"));
                    }
                    failed_lines.extend(1..=lines.len());
                } else {
                    for (n, error) in per_line {
                        self.reports.report(&self.console, file_line(&lines, n), format!("HTTP {status}: {error}"));
                        failed_lines.push(n);
                    }
                }
                // A verdict on the lines themselves (400, 409 conflict, 422) is final: sending them again
                // changes nothing. Any other refusal (a wrong token or URL, 413) leaves them to be sent again.
                status == StatusCode::BAD_REQUEST
                    || status == StatusCode::CONFLICT
                    || status == StatusCode::UNPROCESSABLE_ENTITY
            }
            Outcome::Failed { attempts, error } => {
                counters.failed.fetch_add(lines.len() as u64, Ordering::Relaxed);
                for &line in &lines {
                    self.reports.report(&self.console, line, format!("failed after {attempts} attempts: {error}"));
                }
                failed_lines.extend(1..=lines.len());
                undelivered = true;
                false
            }
            Outcome::Interrupted => {
                counters.interrupted.fetch_add(lines.len() as u64, Ordering::Relaxed);
                false
            }
        };
        self.frontier.complete(seq, done);
        if let Some(out) = self.failed_out.as_mut() {
            for n in failed_lines {
                let (Some((original, own_id)), Some(&line_no)) =
                    (originals.get(n.wrapping_sub(1)), lines.get(n.wrapping_sub(1)))
                else {
                    continue;
                };
                if undelivered {
                    // As it was sent, with its id: sending it again, and a resumed run, store it once.
                    out.write(&with_id(original, *own_id, &self.producer, line_no));
                } else {
                    out.write(original);
                }
            }
        }
    }
}

/// Rate-limits repeated rejection and failure messages, and invalid-line messages.
#[derive(Default)]
pub(super) struct Reports {
    pub(super) seen: HashMap<String, u64>,
    pub(super) suppressed: u64,
    pub(super) invalid_shown: u64,
    pub(super) invalid_suppressed: u64,
}

impl Reports {
    pub(super) fn report(&mut self, console: &Console, line: u64, message: String) {
        let count = if let Some(count) = self.seen.get_mut(&message) {
            *count += 1;
            *count
        } else {
            if self.seen.len() < MAX_TRACKED_MESSAGES {
                self.seen.insert(message.clone(), 1);
            }
            1
        };
        if count <= REPORTS_PER_MESSAGE {
            console.report(&format!("line {line}: {message}"));
            if count == REPORTS_PER_MESSAGE {
                console.report("(further errors with that message are counted, not shown)");
            }
        } else {
            self.suppressed += 1;
        }
    }

    /// An invalid line: the first [`INVALID_SHOWN`] are shown (their messages differ in details such
    /// as a column), the rest counted.
    pub(super) fn invalid(&mut self, console: &Console, line: u64, message: &str) {
        if self.invalid_shown < INVALID_SHOWN {
            self.invalid_shown += 1;
            console.report(&format!("line {line}: {message}"));
            if self.invalid_shown == INVALID_SHOWN {
                console.report("(further invalid lines are counted, not shown)");
            }
        } else {
            self.invalid_suppressed += 1;
        }
    }

    pub(super) fn finish(&self, console: &Console) {
        if self.suppressed > 0 {
            console
                .report(&format!("({} more errors repeating a message shown above were not shown)", self.suppressed));
        }
        if self.invalid_suppressed > 0 {
            console.report(&format!("({} more invalid lines were not shown)", self.invalid_suppressed));
        }
    }
}

/// Progress on stderr, and the one way errors are printed (so they do not tear the bar).
pub(super) struct Console {
    pub(super) bar: Option<ProgressBar>,
    pub(super) ticker: Option<tokio::task::JoinHandle<()>>,
    pub(super) capture: Option<Arc<Mutex<Vec<String>>>>,
}

impl Console {
    pub(super) fn start(
        mode: Progress,
        size: u64,
        counters: Arc<Counters>,
        started: Instant,
        capture: Option<Arc<Mutex<Vec<String>>>>,
    ) -> Console {
        let mode = match mode {
            Progress::Auto if std::io::stderr().is_terminal() => Progress::Bar,
            Progress::Auto => Progress::Plain,
            other => other,
        };
        match mode {
            Progress::Bar => {
                let bar = if size > 0 {
                    let bar = ProgressBar::new(size);
                    let style = ProgressStyle::with_template(
                        "{spinner:.green} [{elapsed_precise}] [{wide_bar:.cyan/blue}] {percent:>3}% ETA {eta}\n  {msg}",
                    )
                    .map(|s| s.progress_chars("=> "))
                    .unwrap_or_else(|_| ProgressStyle::default_bar());
                    bar.set_style(style);
                    bar
                } else {
                    let bar = ProgressBar::new_spinner();
                    let style = ProgressStyle::with_template("{spinner:.green} [{elapsed_precise}] {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner());
                    bar.set_style(style);
                    bar
                };
                bar.enable_steady_tick(Duration::from_millis(100));
                let ticking = bar.clone();
                let ticker = tokio::spawn(async move {
                    let mut every = tokio::time::interval(BAR_EVERY);
                    loop {
                        every.tick().await;
                        ticking.set_position(counters.bytes.load(Ordering::Relaxed));
                        ticking.set_message(progress_line(
                            &counters,
                            counters.done() as f64 / started.elapsed().as_secs_f64().max(1e-3),
                        ));
                    }
                });
                Console { bar: Some(bar), ticker: Some(ticker), capture }
            }
            Progress::Plain => {
                let ticker = tokio::spawn(async move {
                    let mut every = tokio::time::interval_at(tokio::time::Instant::now() + PLAIN_EVERY, PLAIN_EVERY);
                    let (mut last_done, mut last_at) = (0u64, Instant::now());
                    loop {
                        every.tick().await;
                        let (done, now) = (counters.done(), Instant::now());
                        let rate = done.saturating_sub(last_done) as f64 / (now - last_at).as_secs_f64().max(1e-3);
                        (last_done, last_at) = (done, now);
                        eprintln!("eps client: {}", progress_line(&counters, rate));
                    }
                });
                Console { bar: None, ticker: Some(ticker), capture }
            }
            Progress::Quiet | Progress::Auto => Console { bar: None, ticker: None, capture },
        }
    }

    pub(super) fn report(&self, message: &str) {
        if let Some(capture) = &self.capture {
            capture.lock().unwrap_or_else(|p| p.into_inner()).push(message.to_owned());
            return;
        }
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{message}")),
            None => eprintln!("{message}"),
        }
    }

    pub(super) fn finish(&self) {
        if let Some(ticker) = &self.ticker {
            ticker.abort();
        }
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.finish();
    }
}

pub(super) fn progress_line(c: &Counters, rate: f64) -> String {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    format!(
        "sent {}, accepted {} ({} duplicates), rejected {}, invalid {}, failed {}, {:.0} events/s",
        get(&c.sent),
        get(&c.accepted),
        get(&c.duplicates),
        get(&c.rejected),
        get(&c.invalid),
        get(&c.failed),
        rate
    )
}
