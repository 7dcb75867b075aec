//! One run of the client: reading the file after its checkpoint, handing requests to sending tasks
//! with at most `concurrency` in flight, moving and saving the checkpoint, and stopping cleanly.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _, BufReader};
use tokio::task::JoinSet;

use super::input::{prepare, prepare_line, read_line, trim_line};
use super::progress::{Books, Console, FailedOut, Reports};
use super::resume::{self, Start};
use super::send::{Outcome, Pending, Request, Sender};
use super::state::{Frontier, Mark, FINGERPRINT_BYTES};
use super::stop::{Stop, Stopped};
use super::summary::ClientSummary;
use super::summary::Counters;
use super::{ClientOptions, Tuning, MAX_BATCH_BYTES, MAX_LINE_BYTES};

pub(crate) async fn run_with(
    opts: ClientOptions,
    tuning: Tuning,
    stop_signal: impl Future<Output = Stopped> + Send + 'static,
) -> anyhow::Result<ClientSummary> {
    let started = Instant::now();
    let stop = Arc::new(Stop::default());
    let sender = Arc::new(Sender::new(&opts, &tuning, Arc::clone(&stop))?);
    // From here a signal, or every server failing for `give_up_after`, stops the run.
    let watcher = tokio::spawn(watch_for_stop(stop_signal, Arc::clone(&stop), Arc::clone(&sender), opts.give_up_after));
    let mut file = tokio::fs::File::open(&opts.file)
        .await
        .with_context(|| format!("cannot open the input file {}", opts.file.display()))?;
    let (size, regular) = match file.metadata().await {
        Ok(m) if m.is_file() => (m.len(), true),
        _ => (0, false),
    };

    // The file's first bytes: its fingerprint, and where its checkpoint is found.
    let mut head = Vec::with_capacity(FINGERPRINT_BYTES.min(size as usize).max(4096));
    (&mut file)
        .take(FINGERPRINT_BYTES as u64)
        .read_to_end(&mut head)
        .await
        .with_context(|| format!("reading {}", opts.file.display()))?;
    let Start { mark: start, resumed_after, producer, saver, other_log, found } =
        resume::start(&opts, &sender, &stop, &head, regular).await?;
    let mut saver = saver;

    // Reading starts after the checkpoint (a regular file), or at the start, the head first.
    let source: Box<dyn tokio::io::AsyncRead + Unpin + Send> = if regular {
        file.seek(std::io::SeekFrom::Start(start.offset))
            .await
            .with_context(|| format!("reading {}", opts.file.display()))?;
        Box::new(file)
    } else {
        Box::new(std::io::Cursor::new(head).chain(file))
    };
    let mut reader = BufReader::with_capacity(256 * 1024, source);

    let urls = sender.servers.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ");
    tracing::info!(producer, file = %opts.file.display(), urls, resumed_after, "client run starts");

    let counters = Arc::new(Counters::new(sender.servers.len()));
    counters.bytes.store(start.offset, Ordering::Relaxed);
    let console = Console::start(opts.progress, size, Arc::clone(&counters), started, tuning.capture);
    if let (Some((recorded, now)), Some(found)) = (&other_log, &found) {
        let recorded = if recorded.is_empty() { "no log recorded".to_string() } else { recorded.join(", ") };
        console.report(&format!(
            "eps client: the checkpoint of {} (line {}, {}) was acknowledged by {recorded}, but the servers now append \
             to {}: sending the file from its first line with the same ids (what that log already has is recognised \
             as duplicates)",
            opts.file.display(),
            found.checkpoint.line,
            found.path.display(),
            now.join(", ")
        ));
    }
    if let (Some(line), Some(saver)) = (resumed_after, &saver) {
        console.report(&format!(
            "eps client: resuming {} after line {line}, the last acknowledged (checkpoint {}); --from-start sends it \
             from its first line again",
            opts.file.display(),
            saver.path.display()
        ));
    }
    let failed_out = match &opts.failed_out {
        Some(path) => Some(FailedOut::open(path, resumed_after.is_some())?),
        None => None,
    };
    let mut books = Books {
        counters: Arc::clone(&counters),
        reports: Reports::default(),
        console,
        frontier: Frontier::new(start.clone()),
        failed_out,
        producer: producer.clone(),
    };
    let concurrency = opts.concurrency.max(1);

    let batch_size = opts.batch.max(1);
    let keep_originals = books.failed_out.is_some();
    let mut in_flight: JoinSet<(Request, Outcome)> = JoinSet::new();
    let mut pending = Pending::default();
    let mut buf = Vec::with_capacity(4096);
    let Mark { line: mut line_no, mut offset, mut hash } = start;
    let read_result: anyhow::Result<()> = loop {
        while let Some(done) = in_flight.try_join_next() {
            books.tally(done);
        }
        if let Some(saver) = saver.as_mut() {
            saver.maybe_save(&books.frontier, &books.console, false).await;
        }
        if stop.is_set() {
            break Ok(());
        }
        let read = tokio::select! {
            biased;
            () = stop.wait() => break Ok(()),
            read = read_line(&mut reader, &mut buf, MAX_LINE_BYTES, &mut hash) => read,
        };
        let read = match read {
            Ok(Some(read)) => read,
            Ok(None) => break Ok(()),
            Err(e) => {
                break Err(
                    anyhow::Error::new(e).context(format!("reading {} (after line {line_no})", opts.file.display()))
                )
            }
        };
        line_no += 1;
        offset += read.bytes;
        counters.bytes.fetch_add(read.bytes, Ordering::Relaxed);
        let mut line = trim_line(&buf);
        if line_no == 1 {
            line = line.strip_prefix(b"\xEF\xBB\xBF".as_slice()).unwrap_or(line);
        }
        if !read.too_long && line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        counters.lines.fetch_add(1, Ordering::Relaxed);
        let prepared = if read.too_long {
            Err(format!("line is longer than {MAX_LINE_BYTES} bytes"))
        } else if batch_size == 1 {
            prepare(line, line_no, &producer).map(|(body, own_id)| {
                pending.body.extend_from_slice(&body);
                own_id
            })
        } else {
            prepare_line(line, line_no, &producer, &mut pending.body)
        };
        let own_id = match prepared {
            Ok(own_id) => own_id,
            Err(message) => {
                counters.invalid.fetch_add(1, Ordering::Relaxed);
                books.reports.invalid(&books.console, line_no, &message);
                if let Some(out) = books.failed_out.as_mut() {
                    if read.too_long {
                        books.console.report(&format!("line {line_no} is too long to be written to --failed-out"));
                    } else {
                        out.write(&buf);
                    }
                }
                continue;
            }
        };
        pending.lines.push(line_no);
        if keep_originals {
            pending.originals.push((trim_line(&buf).to_vec(), own_id));
        }
        if pending.lines.len() >= batch_size || pending.body.len() >= MAX_BATCH_BYTES {
            if !wait_for_room(&mut in_flight, concurrency, &mut books, &stop).await {
                break Ok(());
            }
            let seq = books.frontier.issue(Mark { line: line_no, offset, hash: hash.clone() });
            pending.send(seq, &sender, &counters, &mut in_flight);
        }
    };
    if read_result.is_ok() && !stop.is_set() {
        if !pending.lines.is_empty() && wait_for_room(&mut in_flight, concurrency, &mut books, &stop).await {
            let seq = books.frontier.issue(Mark { line: line_no, offset, hash: hash.clone() });
            pending.send(seq, &sender, &counters, &mut in_flight);
        }
        if !stop.is_set() {
            // The end of the file: blank or invalid lines after the last request are done too.
            let seq = books.frontier.issue(Mark { line: line_no, offset, hash: hash.clone() });
            books.frontier.complete(seq, true);
        }
    }
    drain(&mut in_flight, &mut books, &stop, opts.timeout + STOP_GRACE_EXTRA).await;
    watcher.abort();
    let stopped = stop.cause();
    // Events of a sending task that panicked or was abandoned were counted as sent but never
    // answered: failed, or interrupted when the run was stopped.
    let unanswered = counters.sent.load(Ordering::Relaxed).saturating_sub(counters.done());
    let unanswered_to = if stopped.is_some() { &counters.interrupted } else { &counters.failed };
    unanswered_to.fetch_add(unanswered, Ordering::Relaxed);
    books.reports.finish(&books.console);
    let mut failed_out_error = false;
    let mut failed_out_lines = 0;
    if let Some(out) = books.failed_out.as_mut() {
        failed_out_lines = out.lines;
        if let Err(e) = out.finish() {
            failed_out_error = true;
            books.console.report(&format!("eps client: error: writing {}: {e}", out.path.display()));
        }
    }
    let mut checkpoint = None;
    if let Some(saver) = saver.as_mut() {
        saver.maybe_save(&books.frontier, &books.console, true).await;
        checkpoint = Some((books.frontier.done().line, saver.path.clone()));
    }
    books.console.finish();
    read_result?;

    let mut summary = counters.summary(started.elapsed());
    if sender.servers.len() > 1 {
        summary.per_server = sender
            .servers
            .iter()
            .zip(&counters.per_server)
            .map(|(server, n)| (server.name.clone(), n.load(Ordering::Relaxed)))
            .collect();
    }
    summary.stopped = stopped;
    summary.resumed_after = resumed_after;
    summary.checkpoint = checkpoint;
    summary.failed_out = failed_out_lines;
    summary.failed_out_error = failed_out_error;
    tracing::info!(producer, %summary, per_server = summary.per_server_line(), "client run ends");
    Ok(summary)
}

/// How much longer than one request's timeout a stopping run waits for the requests in flight.
pub(super) const STOP_GRACE_EXTRA: Duration = Duration::from_secs(1);
/// Waits until fewer than `concurrency` requests are in flight, counting those that end. False if the
/// run was stopped meanwhile.
pub(super) async fn wait_for_room(
    in_flight: &mut JoinSet<(Request, Outcome)>,
    concurrency: usize,
    books: &mut Books,
    stop: &Stop,
) -> bool {
    while in_flight.len() >= concurrency {
        tokio::select! {
            biased;
            () = stop.wait() => return false,
            done = in_flight.join_next() => match done {
                Some(done) => books.tally(done),
                None => break,
            },
        }
    }
    !stop.is_set()
}

/// Waits for the requests in flight. Once the run is stopped they get `grace` more (their retries
/// stop at once; an attempt under way may take up to the request timeout); those still out then are
/// abandoned.
pub(super) async fn drain(
    in_flight: &mut JoinSet<(Request, Outcome)>,
    books: &mut Books,
    stop: &Stop,
    grace: Duration,
) {
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        if deadline.is_none() && stop.is_set() {
            deadline = Some(tokio::time::Instant::now() + grace);
        }
        let done = match deadline {
            None => tokio::select! {
                () = stop.wait() => continue,
                done = in_flight.join_next() => done,
            },
            Some(deadline) => match tokio::time::timeout_at(deadline, in_flight.join_next()).await {
                Ok(done) => done,
                Err(_) => {
                    in_flight.abort_all();
                    // The abandoned tasks end as cancelled: their lines are not done.
                    while let Some(done) = in_flight.join_next().await {
                        books.tally(done);
                    }
                    return;
                }
            },
        };
        match done {
            Some(done) => books.tally(done),
            None => return,
        }
    }
}

/// How often the client checks whether every server has been failing for `give_up_after`.
pub(super) const GIVE_UP_CHECK: Duration = Duration::from_millis(200);

/// Sets the stop on `signal`, or once every server has been failing for `give_up_after`.
pub(super) async fn watch_for_stop(
    signal: impl Future<Output = Stopped>,
    stop: Arc<Stop>,
    sender: Arc<Sender>,
    give_up_after: Option<Duration>,
) {
    tokio::pin!(signal);
    let mut every = tokio::time::interval(GIVE_UP_CHECK);
    loop {
        tokio::select! {
            cause = &mut signal => {
                stop.trigger(cause);
                return;
            }
            _ = every.tick() => {
                let Some(limit) = give_up_after else { continue };
                if sender.pool.unreachable_for(Instant::now()).is_some_and(|d| d >= limit) {
                    let urls = sender.servers.iter().map(|s| s.name.clone()).collect();
                    stop.trigger(Stopped::GaveUp { after: limit, urls });
                    return;
                }
            }
        }
    }
}
