//! Producer ranges: the file log's de-duplication for days, in memory that grows with producers.
//!
//! The id scheme (a public contract, README "Exactly once: the rules"): an id of the form
//! `<producer>-<sequence>`, where `<producer>` is exactly 16 lower-case hex digits and `<sequence>` a
//! decimal number without leading zeros (`0` itself allowed) that fits in 64 bits. `eps client` makes
//! such ids (the file's fingerprint and the line number); any client may. Other spellings (upper-case
//! hex, `007`) are ordinary ids: only the id window knows them.
//!
//! For each producer the table holds the set of sequences stored, as sorted, disjoint, non-adjacent
//! inclusive ranges (a sending client makes contiguous ranges, so one or a few per producer), and the
//! monotonic time at which it is forgotten: a producer that stored nothing for `horizon` is dropped,
//! whole. Memory: about 120-160 bytes per producer with up to 4 ranges (a 40-byte hash-table entry and
//! its control byte, at 8/7 to 16/7 buckets per producer, plus the first allocation of its ranges, 4
//! of 16 bytes, and the allocator's overhead), and 16 bytes per further range. A producer holds at most [`MAX_RANGES_PER_PRODUCER`] ranges: an event that would open one
//! more is refused ([`Verdict::RangesFull`], answered 409), never stored untracked, so nothing inside
//! the horizon is forgotten silently. Ranges hold no content digests: a repeat known only here is a
//! duplicate whatever its content (conflicts are told only within the id window).
//!
//! Snapshots: the table covering the log up to a position `P` (a line boundary, durable) is written to
//! `log/.producers-<P>.snap` atomically (temporary file, fsync, rename, directory fsync) at every
//! segment roll, after start-up, and at shutdown; the two newest are kept. Start-up loads the newest
//! whole one (magic, length and a 128-bit digest checked; `P` not beyond the log) and reads only the
//! log after `P`; a torn or garbage one is skipped for the one before, and without any the whole log
//! that exists is read. `eps compact` removes only segments that end at or before the newest whole
//! snapshot's `P` ([`covered_position`]): what they held lives on in it. A snapshot is taken from the
//! table as it is after a successful sync and before the next group, so it never holds a group that
//! failed (and was cut).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::fsutil::sync_dir;

/// Most ranges one producer may hold (16 bytes each: at most 1 MiB per producer).
pub const MAX_RANGES_PER_PRODUCER: usize = 65_536;
/// Default horizon: a producer is remembered for this long after it last stored an event.
pub const DEFAULT_HORIZON_SECS: u64 = 7 * 24 * 3600;

const SNAP_PREFIX: &str = ".producers-";
const SNAP_SUFFIX: &str = ".snap";
const MAGIC: &[u8; 8] = b"EPSPRDS1";
const KEEP_SNAPSHOTS: usize = 2;

/// The producer and sequence of an id that follows the scheme; `None` for any other id.
pub fn parse_scheme_id(id: &str) -> Option<(u64, u64)> {
    let b = id.as_bytes();
    if b.len() < 18 || b[16] != b'-' {
        return None;
    }
    let (hex, dec) = (&b[..16], &b[17..]);
    if !hex.iter().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c)) {
        return None;
    }
    if dec.len() > 20 || !dec.iter().all(u8::is_ascii_digit) || (dec.len() > 1 && dec[0] == b'0') {
        return None;
    }
    let producer = u64::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
    let seq = std::str::from_utf8(dec).ok()?.parse().ok()?;
    Some((producer, seq))
}

/// Sorted, disjoint, non-adjacent inclusive ranges of sequences.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ranges(Vec<(u64, u64)>);

impl Ranges {
    pub fn contains(&self, seq: u64) -> bool {
        let i = self.0.partition_point(|&(_, end)| end < seq);
        self.0.get(i).is_some_and(|&(start, _)| start <= seq)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether adding `seq` would make one more range (it touches none).
    pub fn opens_range(&self, seq: u64) -> bool {
        let i = self.0.partition_point(|&(_, end)| end.saturating_add(1) < seq);
        match self.0.get(i) {
            Some(&(start, _)) => start > seq.saturating_add(1),
            None => true,
        }
    }

    /// Adds `seq`, merging with its neighbours.
    pub fn insert(&mut self, seq: u64) {
        self.insert_range(seq, seq);
    }

    /// Adds `start..=end`, merging every range it touches or overlaps.
    pub fn insert_range(&mut self, start: u64, end: u64) {
        let i = self.0.partition_point(|&(_, e)| e.saturating_add(1) < start);
        let j = self.0.partition_point(|&(s, _)| s <= end.saturating_add(1));
        if i == j {
            self.0.insert(i, (start, end));
        } else {
            let merged = (start.min(self.0[i].0), end.max(self.0[j - 1].1));
            self.0.splice(i..j, [merged]);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.0.iter().copied()
    }
}

#[derive(Debug, Clone, Default)]
struct Producer {
    ranges: Ranges,
    /// Monotonic milliseconds after which the producer is forgotten.
    expires: u64,
}

/// What the table says of a scheme id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Stored before (within the horizon).
    Seen,
    /// Not seen: may be stored.
    New,
    /// Not seen, and the producer already holds [`MAX_RANGES_PER_PRODUCER`] ranges: refused.
    RangesFull,
}

/// Every producer within the horizon.
#[derive(Debug, Default)]
pub struct ProducerTable {
    producers: HashMap<u64, Producer>,
    horizon_ms: u64,
    max_ranges: usize,
}

impl ProducerTable {
    pub fn new(horizon_ms: u64) -> ProducerTable {
        ProducerTable { producers: HashMap::new(), horizon_ms, max_ranges: MAX_RANGES_PER_PRODUCER }
    }

    pub fn horizon_ms(&self) -> u64 {
        self.horizon_ms
    }

    pub fn len(&self) -> usize {
        self.producers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    pub fn ranges(&self) -> usize {
        self.producers.values().map(|p| p.ranges.len()).sum()
    }

    /// Whether `seq` of `producer` was stored, as of the monotonic time `now`; `pending` is what the
    /// current group adds (not yet durable), counted against the cap.
    pub fn check(&self, producer: u64, seq: u64, now: u64, pending: Option<&Ranges>) -> Verdict {
        let known = self.producers.get(&producer).filter(|p| p.expires >= now);
        if known.is_some_and(|p| p.ranges.contains(seq)) || pending.is_some_and(|r| r.contains(seq)) {
            return Verdict::Seen;
        }
        let held = known.map_or(0, |p| p.ranges.len()) + pending.map_or(0, Ranges::len);
        let opens = known.is_none_or(|p| p.ranges.opens_range(seq)) && pending.is_none_or(|r| r.opens_range(seq));
        if opens && held >= self.max_ranges {
            Verdict::RangesFull
        } else {
            Verdict::New
        }
    }

    /// Records `seq` of `producer` as stored (durably) with its activity at `expires - horizon`.
    pub fn insert(&mut self, producer: u64, seq: u64, expires: u64) {
        let p = self.producers.entry(producer).or_default();
        if p.expires < expires.saturating_sub(self.horizon_ms) {
            p.ranges = Ranges::default();
        }
        p.ranges.insert(seq);
        p.expires = p.expires.max(expires);
    }

    /// Records every sequence of `ranges` of `producer` as stored, active at `expires - horizon`.
    pub fn insert_ranges(&mut self, producer: u64, ranges: &Ranges, expires: u64) {
        let p = self.producers.entry(producer).or_default();
        if p.expires < expires.saturating_sub(self.horizon_ms) {
            // Past its horizon already: forgotten, starts afresh.
            p.ranges = Ranges::default();
        }
        for (start, end) in ranges.iter() {
            p.ranges.insert_range(start, end);
        }
        p.expires = p.expires.max(expires);
    }

    /// Drops every producer idle past the horizon.
    pub fn expire(&mut self, now: u64) -> usize {
        let before = self.producers.len();
        self.producers.retain(|_, p| p.expires >= now);
        before - self.producers.len()
    }

    /// The table as a snapshot covering the log up to `position`: each producer's last activity is
    /// written as wall-clock milliseconds (`expires - horizon`, translated from `mono_now` to `wall_now`).
    pub fn encode(&self, position: u64, mono_now: u64, wall_now: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(40 + self.producers.len() * 36 + self.ranges() * 16);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&position.to_le_bytes());
        out.extend_from_slice(&(self.producers.len() as u64).to_le_bytes());
        for (&id, p) in &self.producers {
            let last_mono = p.expires.saturating_sub(self.horizon_ms);
            let last_wall = wall_now.saturating_sub(mono_now.saturating_sub(last_mono));
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&last_wall.to_le_bytes());
            out.extend_from_slice(&(p.ranges.len() as u32).to_le_bytes());
            for (start, end) in p.ranges.iter() {
                out.extend_from_slice(&start.to_le_bytes());
                out.extend_from_slice(&end.to_le_bytes());
            }
        }
        let check = super::digest(&out);
        out.extend_from_slice(&check.to_le_bytes());
        out
    }

    /// Reads a snapshot: the position it covers and its table, keeping only producers active within
    /// the horizon as of `wall_now`. `None` if it is not whole (torn, garbage, another format).
    pub fn decode(bytes: &[u8], horizon_ms: u64, mono_now: u64, wall_now: u64) -> Option<(u64, ProducerTable)> {
        if bytes.len() < 8 + 8 + 8 + 16 || &bytes[..8] != MAGIC {
            return None;
        }
        let (body, check) = bytes.split_at(bytes.len() - 16);
        if super::digest(body).to_le_bytes() != check {
            return None;
        }
        let mut at = 8;
        let mut take = |n: usize| -> Option<&[u8]> {
            let s = body.get(at..at + n)?;
            at += n;
            Some(s)
        };
        let u64_of = |s: &[u8]| u64::from_le_bytes(s.try_into().expect("8 bytes"));
        let position = u64_of(take(8)?);
        let count = u64_of(take(8)?);
        let mut table = ProducerTable::new(horizon_ms);
        for _ in 0..count {
            let id = u64_of(take(8)?);
            let last_wall = u64_of(take(8)?);
            let n = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
            let mut ranges = Vec::with_capacity(n.min(MAX_RANGES_PER_PRODUCER));
            for _ in 0..n {
                ranges.push((u64_of(take(8)?), u64_of(take(8)?)));
            }
            if let Some(expires) = expiry_of(last_wall, horizon_ms, mono_now, wall_now) {
                table.producers.insert(id, Producer { ranges: Ranges(ranges), expires });
            }
        }
        (at == body.len()).then_some((position, table))
    }
}

/// The monotonic expiry of an activity dated `ts` (wall milliseconds), or `None` if it is past the
/// horizon. A `ts` in the future (the clock was stepped back) counts as now.
pub fn expiry_of(ts: u64, horizon_ms: u64, mono_now: u64, wall_now: u64) -> Option<u64> {
    let age = wall_now.saturating_sub(ts);
    (age <= horizon_ms).then(|| mono_now + (horizon_ms - age))
}

/// The snapshot file covering the log up to `position`.
pub fn snapshot_path(log_dir: &Path, position: u64) -> PathBuf {
    log_dir.join(format!("{SNAP_PREFIX}{position:020}{SNAP_SUFFIX}"))
}

/// The snapshots in `log_dir`, newest (highest position) first.
pub fn list_snapshots(log_dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(log_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(digits) = name.strip_prefix(SNAP_PREFIX).and_then(|n| n.strip_suffix(SNAP_SUFFIX)) {
            if let Ok(position) = digits.parse::<u64>() {
                out.push((position, entry.path()));
            }
        }
    }
    out.sort_unstable_by_key(|entry| std::cmp::Reverse(entry.0));
    Ok(out)
}

/// The newest whole snapshot not beyond `log_end`, decoded; `None` if there is none. Each one skipped
/// is logged with why.
pub fn load_newest(
    log_dir: &Path,
    log_end: u64,
    horizon_ms: u64,
    mono_now: u64,
    wall_now: u64,
) -> io::Result<Option<(u64, ProducerTable)>> {
    for (position, path) in list_snapshots(log_dir)? {
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                tracing::warn!(snapshot = %path.display(), error = %e, "cannot read a producer snapshot; trying an older one");
                continue;
            }
        };
        match ProducerTable::decode(&bytes, horizon_ms, mono_now, wall_now) {
            Some((covered, table)) if covered == position && covered <= log_end => return Ok(Some((covered, table))),
            Some(_) => tracing::warn!(
                snapshot = %path.display(), log_end,
                "producer snapshot covers more than the log holds (or is misnamed); ignored"
            ),
            None => {
                tracing::warn!(snapshot = %path.display(), "producer snapshot is torn or not a snapshot; trying an older one")
            }
        }
    }
    Ok(None)
}

/// The position the newest whole snapshot covers (0 without one): `eps compact` removes no segment
/// that ends after it.
pub fn covered_position(log_dir: &Path) -> io::Result<u64> {
    for (position, path) in list_snapshots(log_dir)? {
        let Ok(bytes) = std::fs::read(&path) else { continue };
        // Checked whole (the horizon does not matter here: only the position is used).
        if ProducerTable::decode(&bytes, u64::MAX, 0, 0).is_some_and(|(covered, _)| covered == position) {
            return Ok(position);
        }
    }
    Ok(0)
}

/// Writes `bytes` as the snapshot covering `position` (temporary file, fsync, rename, directory fsync),
/// then removes all but the [`KEEP_SNAPSHOTS`] newest and any leftover temporary file.
pub fn write_snapshot(log_dir: &Path, position: u64, bytes: &[u8]) -> io::Result<()> {
    let path = snapshot_path(log_dir, position);
    let tmp = path.with_extension("snap.tmp");
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, &path)?;
    sync_dir(log_dir)?;
    let snapshots = list_snapshots(log_dir)?;
    let mut removed = false;
    for (_, old) in snapshots.iter().skip(KEEP_SNAPSHOTS) {
        removed |= std::fs::remove_file(old).is_ok();
    }
    if removed {
        sync_dir(log_dir)?;
    }
    Ok(())
}

/// Removes temporary snapshot files an interrupted write left behind.
pub fn remove_leftovers(log_dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(log_dir) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_str().is_some_and(|n| n.starts_with(SNAP_PREFIX) && n.ends_with(".snap.tmp")) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_scheme_is_exact() {
        assert_eq!(parse_scheme_id("0123456789abcdef-1"), Some((0x0123_4567_89ab_cdef, 1)));
        assert_eq!(parse_scheme_id("0123456789abcdef-0"), Some((0x0123_4567_89ab_cdef, 0)));
        for other in [
            "0123456789ABCDEF-1",
            "0123456789abcdef-01",
            "0123456789abcde-1",
            "0123456789abcdef-",
            "0123456789abcdef-1a",
            "0123456789abcdef-99999999999999999999",
            "run-1",
            "0123456789abcdef+1",
        ] {
            assert_eq!(parse_scheme_id(other), None, "{other}");
        }
    }

    #[test]
    fn ranges_merge_and_answer_membership() {
        let mut r = Ranges::default();
        for s in [5, 7, 6, 1, 3, 2] {
            r.insert(s);
        }
        assert_eq!(r.0, vec![(1, 3), (5, 7)]);
        assert!(r.contains(2) && r.contains(7) && !r.contains(4) && !r.contains(8) && !r.contains(0));
        assert!(!r.opens_range(4) && !r.opens_range(8) && r.opens_range(10));
        r.insert(4);
        assert_eq!(r.0, vec![(1, 7)]);
        r.insert(u64::MAX);
        assert!(r.contains(u64::MAX) && !r.contains(u64::MAX - 1));
    }

    #[test]
    fn the_cap_refuses_a_new_range_but_never_a_known_or_adjacent_sequence() {
        let mut t = ProducerTable::new(1000);
        t.max_ranges = 2;
        t.insert(9, 1, 500);
        t.insert(9, 10, 500);
        assert_eq!(t.check(9, 20, 0, None), Verdict::RangesFull);
        assert_eq!(t.check(9, 11, 0, None), Verdict::New);
        assert_eq!(t.check(9, 10, 0, None), Verdict::Seen);
        // Past its horizon the producer is forgotten.
        assert_eq!(t.check(9, 10, 501, None), Verdict::New);
        assert_eq!(t.expire(501), 1);
    }

    #[test]
    fn snapshots_round_trip_and_refuse_any_damage() {
        let mut t = ProducerTable::new(10_000);
        // At monotonic 20 s: producer 1 last active 2 s ago, producer 2 8 s ago.
        t.insert(1, 5, 28_000);
        t.insert(1, 6, 28_000);
        t.insert(2, 9, 22_000);
        let bytes = t.encode(4242, 20_000, 1_000_000);
        let (pos, back) = ProducerTable::decode(&bytes, 10_000, 0, 1_000_000).unwrap();
        assert_eq!(pos, 4242);
        assert_eq!(back.producers[&1].ranges.0, vec![(5, 6)]);
        assert_eq!(back.producers[&1].expires, 8_000);
        assert_eq!(back.producers[&2].expires, 2_000);
        // A start 1 s later: producer 2 has 1 s left; 3 s later it is forgotten.
        let (_, later) = ProducerTable::decode(&bytes, 10_000, 0, 1_001_000).unwrap();
        assert_eq!(later.producers[&2].expires, 1_000);
        let (_, much_later) = ProducerTable::decode(&bytes, 10_000, 0, 1_003_000).unwrap();
        assert!(!much_later.producers.contains_key(&2));
        for cut in [0, 10, bytes.len() - 1] {
            assert!(ProducerTable::decode(&bytes[..cut], 10_000, 0, 1_000_000).is_none());
        }
        let mut flipped = bytes.clone();
        flipped[30] ^= 1;
        assert!(ProducerTable::decode(&flipped, 10_000, 0, 1_000_000).is_none());
    }

    #[test]
    fn the_newest_whole_snapshot_wins_and_a_torn_one_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = ProducerTable::new(u64::MAX / 4);
        t.insert(1, 1, u64::MAX / 4);
        write_snapshot(dir.path(), 100, &t.encode(100, 0, 1_000)).unwrap();
        t.insert(1, 2, u64::MAX / 4);
        write_snapshot(dir.path(), 200, &t.encode(200, 0, 1_000)).unwrap();
        write_snapshot(dir.path(), 300, &t.encode(300, 0, 1_000)).unwrap();
        assert_eq!(list_snapshots(dir.path()).unwrap().len(), 2);
        std::fs::write(snapshot_path(dir.path(), 300), b"garbage").unwrap();
        let (pos, _) = load_newest(dir.path(), 1_000, u64::MAX / 4, 0, 1_000).unwrap().unwrap();
        assert_eq!(pos, 200);
        assert_eq!(covered_position(dir.path()).unwrap(), 200);
        // A snapshot beyond the log's end (the log was replaced) is never trusted.
        assert!(load_newest(dir.path(), 150, u64::MAX / 4, 0, 1_000).unwrap().is_none());
    }
}
