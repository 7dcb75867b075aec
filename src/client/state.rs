//! The client's memory of a file: its fingerprint, the producer id its events' ids derive from, and
//! the checkpoint — how far the file is acknowledged — kept per file in the state directory.
//!
//! # The fingerprint
//!
//! A file is known by its content, not by its name or inode: the fingerprint is SipHash-1-3 (128
//! bits, fixed keys, cut to 64) of its first [`FINGERPRINT_BYTES`] bytes, or of the whole file when it
//! is shorter. Appending to a file at least that long leaves its fingerprint unchanged; two files
//! whose first 64 KiB differ anywhere have different fingerprints. Limits: a file shorter than 64 KiB
//! gets a new fingerprint when it grows (the checkpoint still recognises it, see below; without its
//! checkpoint it is a new file), and two files with the same first 64 KiB share one (the same events
//! at the same line numbers are then the same ids — which is what a file and a longer copy of it are).
//!
//! # Ids
//!
//! An event without an `id` of its own is sent with `<producer>-<line number>`, the producer being 16
//! hex digits: the fingerprint, or after `--new-run` a random number recorded in the checkpoint (and
//! used by later runs of that file, so a resumed new run keeps its ids).
//!
//! # The checkpoint
//!
//! `<state dir>/<fingerprint>-<bytes fingerprinted>.json` holds the producer, the last line `line`
//! such that it and every line before it are done (accepted, or refused for their content, or
//! invalid), the byte `offset` just after it, and `prefix_hash`, the 128-bit SipHash of the file's
//! bytes up to `offset`. A run finds the checkpoint whose fingerprint matches the file's first bytes
//! (for a small file that grew, the fingerprint of its first `bytes` bytes, as recorded in the name),
//! checks that the file still begins with what was sent (its first `offset` bytes hash to
//! `prefix_hash`) and continues after `line`. It is written whole to a temporary file, synced,
//! renamed over the old one and the directory synced, so a crash leaves the old checkpoint or the
//! new, never a torn one.
//!
//! A checkpoint also names the logs that acknowledged its lines (`logs`: each server's `GET /healthz`
//! reports the identity of the log it appends to). A run asks the servers first, and continues after
//! `line` if any log they name now is one of those (a pool of servers with logs of their own may have
//! had one down, or gained one: resending would store in that log lines another already has). When
//! none is (another server, or one whose log was deleted and started again), the file goes again from
//! its first line, with the same ids.

use std::collections::VecDeque;
use std::hash::Hasher as _;
use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use siphasher::sip128::{Hasher128 as _, SipHasher13};

/// How many bytes from the start of a file its fingerprint covers.
pub const FINGERPRINT_BYTES: usize = 64 * 1024;
/// The checkpoint file format.
const VERSION: u32 = 1;

const FINGERPRINT_KEYS: (u64, u64) = (0x6570_732d_6669_6c65, 0x2d66_696e_6765_7231);
const PREFIX_KEYS: (u64, u64) = (0x6570_732d_7072_6566, 0x6978_2d68_6173_6831);

/// The fingerprint of a file's first bytes (`head`: at most [`FINGERPRINT_BYTES`] of them).
pub fn fingerprint(head: &[u8]) -> u64 {
    let (k0, k1) = FINGERPRINT_KEYS;
    let mut h = SipHasher13::new_with_keys(k0, k1);
    h.write(head);
    h.finish128().h1
}

/// 16 lower-case hex digits.
pub fn hex64(n: u64) -> String {
    format!("{n:016x}")
}

/// A streaming hash of a file's bytes from its start: the same value however the bytes are split.
#[derive(Clone, Debug)]
pub struct PrefixHash(SipHasher13);

impl Default for PrefixHash {
    fn default() -> Self {
        let (k0, k1) = PREFIX_KEYS;
        PrefixHash(SipHasher13::new_with_keys(k0, k1))
    }
}

impl PrefixHash {
    pub fn write(&mut self, bytes: &[u8]) {
        self.0.write(bytes);
    }

    pub fn hex(&self) -> String {
        format!("{:032x}", self.0.clone().finish128().as_u128())
    }
}

/// One checkpoint file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub version: u32,
    /// The path the file had when this was written (for people reading the state directory).
    pub file: String,
    pub fingerprint: String,
    /// How many bytes the fingerprint covers.
    pub fingerprint_bytes: u64,
    /// The first part of the ids of the file's events.
    pub producer: String,
    /// Every line up to this one (1-based, blank lines counted) is done; 0 for none.
    pub line: u64,
    /// The byte just after `line`.
    pub offset: u64,
    /// Hash of the file's first `offset` bytes.
    pub prefix_hash: String,
    /// When this was written, Unix milliseconds.
    pub updated_ms: u64,
    /// The identities of the logs that acknowledged these lines (the servers' `GET /healthz`): the
    /// checkpoint holds for them only. Empty when not known (a checkpoint of an older client).
    #[serde(default)]
    pub logs: Vec<String>,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub dir: PathBuf,
}

/// A checkpoint found for a file, and where it lives.
#[derive(Debug, Clone)]
pub struct Found {
    pub path: PathBuf,
    pub checkpoint: Checkpoint,
}

impl StateDir {
    /// `$XDG_STATE_HOME/eps/client`, else `$HOME/.local/state/eps/client`, else `.eps-client-state` in
    /// the working directory.
    pub fn default_dir() -> PathBuf {
        let non_empty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        if let Some(state) = non_empty("XDG_STATE_HOME").filter(|p| p.is_absolute()) {
            return state.join("eps").join("client");
        }
        if let Some(home) = non_empty("HOME") {
            return home.join(".local").join("state").join("eps").join("client");
        }
        PathBuf::from(".eps-client-state")
    }

    /// Where the checkpoint of a file with fingerprint `fp` over `bytes` bytes lives.
    pub fn path_for(&self, fp: u64, bytes: u64) -> PathBuf {
        self.dir.join(format!("{}-{bytes}.json", hex64(fp)))
    }

    /// The checkpoint of the file whose first bytes are `head` (all of them if it has fewer than
    /// [`FINGERPRINT_BYTES`]): the one fingerprinted over the most bytes, if several match.
    pub fn find(&self, head: &[u8]) -> io::Result<Option<Found>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(crate::fsutil::with_path(e, "cannot read the state directory", &self.dir)),
        };
        let mut candidates: Vec<(u64, PathBuf)> = Vec::new();
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let Some((fp, bytes)) = parse_name(&name.to_string_lossy()) else { continue };
            let Ok(len) = usize::try_from(bytes) else { continue };
            if len == 0 || len > head.len() || len > FINGERPRINT_BYTES {
                continue;
            }
            if fingerprint(&head[..len]) == fp {
                candidates.push((bytes, entry.path()));
            }
        }
        candidates.sort();
        let Some((_, path)) = candidates.pop() else { return Ok(None) };
        let text =
            std::fs::read(&path).map_err(|e| crate::fsutil::with_path(e, "cannot read the checkpoint", &path))?;
        let checkpoint: Checkpoint = serde_json::from_slice(&text).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("the checkpoint {} is unreadable: {e}", path.display()))
        })?;
        if checkpoint.version != VERSION {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the checkpoint {} has version {}, not {VERSION}", path.display(), checkpoint.version),
            ));
        }
        Ok(Some(Found { path, checkpoint }))
    }
}

/// `<16 hex>-<decimal>.json`.
fn parse_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".json")?;
    let (fp, bytes) = stem.split_once('-')?;
    if fp.len() != 16 {
        return None;
    }
    Some((u64::from_str_radix(fp, 16).ok()?, bytes.parse().ok()?))
}

/// Writes `checkpoint` to `path` atomically and durably: a temporary file in the same directory,
/// synced, renamed over `path`, the directory synced. Creates the directory if needed.
pub fn save(path: &Path, checkpoint: &Checkpoint) -> io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    crate::fsutil::create_dir_durable(dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".checkpoint-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| crate::fsutil::with_path(e, "cannot create a temporary file in", dir))?;
    let mut bytes = serde_json::to_vec_pretty(checkpoint).map_err(io::Error::other)?;
    bytes.push(b'\n');
    tmp.write_all(&bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| crate::fsutil::with_path(e.error, "cannot write the checkpoint", path))?;
    crate::fsutil::sync_dir(dir).map_err(|e| crate::fsutil::with_path(e, "cannot sync the directory", dir))
}

/// The hash of the first `len` bytes of `file` (from its start), or `None` when it has fewer.
pub fn hash_prefix(file: &Path, len: u64) -> io::Result<Option<PrefixHash>> {
    let mut f = std::fs::File::open(file)?;
    let mut hash = PrefixHash::default();
    let mut buf = vec![0u8; 1024 * 1024];
    let mut left = len;
    while left > 0 {
        let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        let n = f.read(&mut buf[..want])?;
        if n == 0 {
            return Ok(None);
        }
        hash.write(&buf[..n]);
        left -= n as u64;
    }
    Ok(Some(hash))
}

/// A position in the file: after line `line`, at byte `offset`, with the hash of the bytes before it.
#[derive(Debug, Clone, Default)]
pub struct Mark {
    pub line: u64,
    pub offset: u64,
    pub hash: PrefixHash,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TicketState {
    Pending,
    Done,
}

/// The contiguous done prefix of the file. Each request (and the end of the file) takes a ticket,
/// in file order, carrying the [`Mark`] just after its last line; the lines between two requests
/// (blank or invalid) belong to the next ticket. Requests end in any order; the frontier is the mark
/// of the last ticket such that it and every ticket before it are done. A ticket that ends not done
/// (undelivered, abandoned) stops the frontier for the rest of the run: everything after it is sent
/// again by the next run.
#[derive(Debug, Default)]
pub struct Frontier {
    /// Sequence number of the first ticket in `tickets`.
    first: u64,
    tickets: VecDeque<(Mark, TicketState)>,
    /// The frontier so far.
    done: Mark,
    blocked: bool,
    /// The frontier moved since [`Frontier::take_changed`] was last called.
    changed: bool,
}

impl Frontier {
    /// A frontier starting at `start` (where the run begins).
    pub fn new(start: Mark) -> Frontier {
        Frontier { done: start, ..Default::default() }
    }

    /// A ticket for a request whose last line ends at `mark`.
    pub fn issue(&mut self, mark: Mark) -> u64 {
        let seq = self.first + self.tickets.len() as u64;
        if !self.blocked {
            self.tickets.push_back((mark, TicketState::Pending));
        }
        seq
    }

    /// The ticket `seq` ended: `done` when every line of it is done.
    pub fn complete(&mut self, seq: u64, done: bool) {
        if self.blocked {
            return;
        }
        if !done {
            // The frontier can never pass this ticket in this run: stop tracking.
            if seq >= self.first {
                self.block();
            }
            return;
        }
        let Some(i) = seq.checked_sub(self.first).and_then(|i| usize::try_from(i).ok()) else { return };
        if let Some(ticket) = self.tickets.get_mut(i) {
            ticket.1 = TicketState::Done;
        }
        while self.tickets.front().is_some_and(|t| t.1 == TicketState::Done) {
            let (mark, _) = self.tickets.pop_front().expect("checked");
            self.first += 1;
            self.done = mark;
            self.changed = true;
        }
    }

    /// The frontier cannot move any more in this run (a request was lost without its line numbers).
    pub fn block(&mut self) {
        self.blocked = true;
        self.tickets.clear();
    }

    pub fn done(&self) -> &Mark {
        &self.done
    }

    /// True once after each move of the frontier.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(line: u64) -> Mark {
        Mark { line, offset: line * 10, hash: PrefixHash::default() }
    }

    #[test]
    fn the_frontier_is_the_contiguous_done_prefix() {
        let mut f = Frontier::new(mark(0));
        let (a, b, c) = (f.issue(mark(3)), f.issue(mark(5)), f.issue(mark(9)));
        f.complete(b, true);
        assert_eq!(f.done().line, 0, "ticket a is still out");
        assert!(!f.take_changed());
        f.complete(a, true);
        assert_eq!(f.done().line, 5);
        assert!(f.take_changed() && !f.take_changed());
        let d = f.issue(mark(12));
        f.complete(d, true);
        assert_eq!(f.done().line, 5);
        f.complete(c, true);
        assert_eq!(f.done().line, 12);
    }

    #[test]
    fn a_ticket_not_done_stops_the_frontier_for_the_run() {
        let mut f = Frontier::new(mark(2));
        let (a, b, c) = (f.issue(mark(3)), f.issue(mark(5)), f.issue(mark(9)));
        f.complete(a, true);
        f.complete(b, false);
        f.complete(c, true);
        let d = f.issue(mark(10));
        f.complete(d, true);
        assert_eq!(f.done().line, 3);
    }

    #[test]
    fn the_prefix_hash_does_not_depend_on_how_the_bytes_are_split() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut whole = PrefixHash::default();
        whole.write(&data);
        let mut parts = PrefixHash::default();
        for chunk in data.chunks(13) {
            parts.write(chunk);
        }
        assert_eq!(whole.hex(), parts.hex());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, &data).unwrap();
        assert_eq!(hash_prefix(&path, data.len() as u64).unwrap().unwrap().hex(), whole.hex());
        assert!(hash_prefix(&path, data.len() as u64 + 1).unwrap().is_none());
    }

    #[test]
    fn a_checkpoint_is_found_by_the_files_first_bytes_even_after_it_grew() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir { dir: dir.path().join("state") };
        assert!(state.find(b"abc\n").unwrap().is_none(), "no directory yet: nothing");
        let small = b"line one\nline two\n".to_vec();
        let path = state.path_for(fingerprint(&small), small.len() as u64);
        let checkpoint = Checkpoint {
            version: VERSION,
            file: "f".into(),
            fingerprint: hex64(fingerprint(&small)),
            fingerprint_bytes: small.len() as u64,
            producer: hex64(fingerprint(&small)),
            line: 2,
            offset: small.len() as u64,
            prefix_hash: PrefixHash::default().hex(),
            updated_ms: 1,
            logs: vec!["file log 0123".into()],
        };
        save(&path, &checkpoint).unwrap();
        let mut grown = small.clone();
        grown.extend_from_slice(b"line three\n");
        let found = state.find(&grown).unwrap().unwrap();
        assert_eq!((found.path, found.checkpoint), (path, checkpoint));
        assert!(state.find(b"line one\nline 2wo\nline three\n").unwrap().is_none(), "another file");
        assert!(state.find(b"line one\n").unwrap().is_none(), "a shorter file is another file");
        assert_eq!(std::fs::read_dir(&state.dir).unwrap().count(), 1, "no temporary file left");
    }
}
