//! Where a run starts and what it saves: the checkpoint found for the file (by its first bytes),
//! held only for the logs that acknowledged it (the servers are asked which logs they append to) and
//! only while the file still begins with the bytes it covers; then the saver that writes it as the
//! frontier of acknowledged lines moves.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::progress::Console;
use super::send::{Logs, Sender};
use super::state::{self, Checkpoint, Found, Frontier, Mark};
use super::stop::Stop;
use super::ClientOptions;

/// Where a run starts, decided before anything is sent.
pub(super) struct Start {
    /// The first line to send (after the checkpoint), with the hash of the bytes before it.
    pub(super) mark: Mark,
    /// The checkpoint's line when the run continues one.
    pub(super) resumed_after: Option<u64>,
    /// The producer id the events' ids are made with.
    pub(super) producer: String,
    /// Writes the checkpoint (none without a state directory, or for input that is not a file).
    pub(super) saver: Option<Saver>,
    /// The logs the checkpoint names and those the servers append to now, when none is the same:
    /// the file goes again from its first line.
    pub(super) other_log: Option<(Vec<String>, Vec<String>)>,
    /// The checkpoint found for the file.
    pub(super) found: Option<Found>,
}

/// Finds the file's checkpoint and decides where the run starts: refuses when no server names its log
/// and there is a checkpoint to check, or when the file no longer begins with what it covers.
pub(super) async fn start(
    opts: &ClientOptions,
    sender: &Sender,
    stop: &Stop,
    head: &[u8],
    regular: bool,
) -> anyhow::Result<Start> {
    let fp = state::fingerprint(head);
    let state_dir = opts.state_dir.clone().filter(|_| regular).map(|dir| state::StateDir { dir });
    let found = match &state_dir {
        Some(dir) => {
            let dir = dir.clone();
            let head = head.to_vec();
            tokio::task::spawn_blocking(move || dir.find(&head)).await?.context("reading the client's state")?
        }
        None => None,
    };
    let producer = if opts.new_run {
        state::hex64(rand::random::<u64>())
    } else {
        found.as_ref().map_or_else(|| state::hex64(fp), |f| f.checkpoint.producer.clone())
    };
    // Which logs the servers append to: a checkpoint holds for the logs that acknowledged its lines.
    let logs = match &state_dir {
        Some(_) => sender.logs().await,
        None => Logs::NotReported,
    };
    if let Some(found) = found.as_ref().filter(|f| !opts.from_start && !opts.new_run && f.checkpoint.line > 0) {
        if let (Logs::Unanswered { answered }, false) = (&logs, stop.is_set()) {
            let urls = sender.servers.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ");
            let how = if *answered {
                "answered GET /healthz without naming its log yet (a JetStream server that has not reached its stream)"
            } else {
                "answered GET /healthz"
            };
            anyhow::bail!(
                "no server ({urls}) {how} in {} attempts, so the checkpoint of {} (line {}, {}) cannot be checked \
                 against the log it would send to; nothing was sent and the checkpoint is kept: run again once a \
                 server answers (or with --from-start to send the file from its first line with the same ids)",
                sender.max_attempts,
                opts.file.display(),
                found.checkpoint.line,
                found.path.display()
            );
        }
    }
    let mut start = Mark::default();
    let mut resumed_after = None;
    // The same destination if any log named now acknowledged lines before: a pool whose servers each
    // have a log of their own may have had one down (or gained one) since; resending to it would store
    // again in the new log what another already has. None of them: another server, or a log deleted
    // and made again, which has none of those lines.
    let other_log =
        found.as_ref().filter(|f| !opts.from_start && !opts.new_run && f.checkpoint.line > 0).and_then(|found| {
            let Logs::Known(now) = &logs else { return None };
            let recorded = &found.checkpoint.logs;
            (!now.iter().any(|log| recorded.contains(log))).then(|| (recorded.clone(), now.clone()))
        });
    if let Some(found) = found.as_ref().filter(|_| !opts.from_start && !opts.new_run && other_log.is_none()) {
        let cp = &found.checkpoint;
        let (path, offset) = (opts.file.clone(), cp.offset);
        let prefix = tokio::task::spawn_blocking(move || state::hash_prefix(&path, offset))
            .await?
            .with_context(|| format!("reading {}", opts.file.display()))?;
        match prefix {
            Some(hash) if hash.hex() == cp.prefix_hash => {
                start = Mark { line: cp.line, offset: cp.offset, hash };
                resumed_after = (cp.line > 0).then_some(cp.line);
            }
            _ => anyhow::bail!(
                "{} has changed since it was last sent: it no longer begins with the {} bytes (lines 1 to {}) \
                 acknowledged then (checkpoint {}). Run again with --from-start to send it from its first line \
                 with the same ids (what the server already has is recognised as duplicates), or with --new-run \
                 to send every line as a new event",
                opts.file.display(),
                cp.offset,
                cp.line,
                found.path.display()
            ),
        }
    }
    let checkpoint_path = match (&found, &state_dir) {
        (Some(found), _) => Some(found.path.clone()),
        (None, Some(dir)) => Some(dir.path_for(fp, head.len() as u64)),
        (None, None) => None,
    };
    let saver = checkpoint_path.map(|path| Saver {
        template: Checkpoint {
            version: 1,
            file: std::path::absolute(&opts.file).unwrap_or_else(|_| opts.file.clone()).display().to_string(),
            fingerprint: found.as_ref().map_or_else(|| state::hex64(fp), |f| f.checkpoint.fingerprint.clone()),
            fingerprint_bytes: found.as_ref().map_or(head.len() as u64, |f| f.checkpoint.fingerprint_bytes),
            producer: producer.clone(),
            line: 0,
            offset: 0,
            prefix_hash: String::new(),
            updated_ms: 0,
            logs: match &logs {
                Logs::Known(now) => {
                    // A resumed run adds to the logs its earlier runs reached (one server of a pool
                    // may be down now); a run from the start counts only what it reaches.
                    let mut all = now.clone();
                    if resumed_after.is_some() {
                        all.extend(found.iter().flat_map(|f| f.checkpoint.logs.iter().cloned()));
                    }
                    all.sort();
                    all.dedup();
                    all
                }
                // Kept (the same checkpoint, resumed), or none known: a later run cannot check this
                // one and sends the file from its first line.
                Logs::NotReported | Logs::Unanswered { .. } => match (&found, resumed_after) {
                    (Some(found), Some(_)) => found.checkpoint.logs.clone(),
                    _ => Vec::new(),
                },
            },
        },
        // What the file on disk says, when this run continues it (otherwise even the same line and
        // offset must be written again, with this run's logs).
        saved: found
            .as_ref()
            .filter(|f| f.checkpoint.producer == producer && resumed_after.is_some())
            .map(|f| (f.checkpoint.line, f.checkpoint.offset)),
        last: Instant::now(),
        path,
        error_shown: false,
    });
    Ok(Start { mark: start, resumed_after, producer, saver, other_log, found })
}

/// How often the checkpoint is written while the run goes on (and once at its end).
pub(super) const SAVE_EVERY: Duration = Duration::from_secs(1);
/// Writes the checkpoint: every `SAVE_EVERY` while the frontier moves, and at the end.
pub(super) struct Saver {
    pub(super) path: PathBuf,
    pub(super) template: Checkpoint,
    /// (line, offset) last written (or found, for the same producer).
    pub(super) saved: Option<(u64, u64)>,
    pub(super) last: Instant,
    pub(super) error_shown: bool,
}

impl Saver {
    pub(super) async fn maybe_save(&mut self, frontier: &Frontier, console: &Console, force: bool) {
        if !force && self.last.elapsed() < SAVE_EVERY {
            return;
        }
        let done = frontier.done();
        if self.saved == Some((done.line, done.offset)) {
            return;
        }
        self.last = Instant::now();
        let checkpoint = Checkpoint {
            line: done.line,
            offset: done.offset,
            prefix_hash: done.hash.hex(),
            updated_ms: crate::clock::wall_millis(),
            ..self.template.clone()
        };
        let path = self.path.clone();
        let saved = tokio::task::spawn_blocking(move || state::save(&path, &checkpoint)).await;
        match saved {
            Ok(Ok(())) => self.saved = Some((done.line, done.offset)),
            Ok(Err(e)) if !self.error_shown => {
                self.error_shown = true;
                console.report(&format!(
                    "eps client: cannot save the checkpoint (a re-run will send again what it does not cover): {e}"
                ));
            }
            Ok(Err(_)) => {}
            Err(e) => console.report(&format!("eps client: saving the checkpoint failed: {e}")),
        }
    }
}
