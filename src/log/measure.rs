//! Measuring the file log past a position (a checkpoint): the log's size, the bytes after the position
//! and the lines among them, counted up to a bound (`eps status` counts them all; the console and the
//! server's `/metrics` count the first MiB and estimate the rest), and the first line after it.
//!
//! It reads the segment files as they are (not up to the durable end, as [`super::reader`] does): the
//! figures are what the files hold, for a report, never a position to commit.

use std::io::{self, Read, Seek};
use std::path::Path;

use super::list_segments;

/// Every segment after the position is read at least this far while no first line has been found.
const MIN_READ_BYTES: u64 = 4096;

/// What [`measure_past`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PastPosition {
    /// The log's segments, and their bytes in all.
    pub segments: usize,
    pub log_bytes: u64,
    /// The oldest segment's first position and the newest one's end (0 without segments).
    pub log_start: u64,
    pub log_end: u64,
    /// Bytes after the position, segment by segment (a segment that ends at or before it adds none).
    pub bytes_after: u64,
    /// Bytes read after the position, and the newlines among them.
    pub bytes_counted: u64,
    pub lines_counted: u64,
    /// The first line read after the position that has its newline (without it); empty if none.
    pub first_line: Vec<u8>,
}

impl PastPosition {
    /// True when [`Self::lines_after`] is an estimate: not every byte after the position was read.
    pub fn lines_estimated(&self) -> bool {
        self.bytes_after > self.bytes_counted && self.bytes_counted > 0
    }

    /// The lines after the position: counted, or estimated from those counted when not all were read.
    pub fn lines_after(&self) -> u64 {
        if !self.lines_estimated() {
            self.lines_counted
        } else {
            (self.bytes_after as f64 * self.lines_counted as f64 / self.bytes_counted as f64).round() as u64
        }
    }
}

/// Measures the file log in `dir` past `position`, counting the lines of at most about `count_up_to`
/// bytes after it (`u64::MAX`: all of them). Once that many are counted, a segment is read only while
/// no first line was found, [`MIN_READ_BYTES`] at least.
pub fn measure_past(dir: &Path, position: u64, count_up_to: u64) -> io::Result<PastPosition> {
    let segments = list_segments(dir)?;
    let mut past = PastPosition {
        segments: segments.len(),
        log_start: segments.first().map_or(0, |(base, _)| *base),
        ..PastPosition::default()
    };
    let mut buf = Vec::new();
    for (base, path) in &segments {
        let len = std::fs::metadata(path)?.len();
        past.log_bytes += len;
        let end = base + len;
        past.log_end = end;
        if end <= position {
            continue;
        }
        let from = position.saturating_sub(*base);
        past.bytes_after += len - from;
        if past.bytes_counted >= count_up_to && !past.first_line.is_empty() {
            continue;
        }
        let mut file = std::fs::File::open(path)?;
        file.seek(io::SeekFrom::Start(from))?;
        let mut rest = file.take(count_up_to.saturating_sub(past.bytes_counted).max(MIN_READ_BYTES));
        if buf.is_empty() {
            buf = vec![0u8; 1 << 20];
        }
        // This segment's bytes from `from` until its first newline, while no first line is known.
        let mut head = past.first_line.is_empty().then(Vec::new);
        loop {
            let n = match rest.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let data = &buf[..n];
            if let Some(line) = &mut head {
                match data.iter().position(|&b| b == b'\n') {
                    Some(nl) => {
                        line.extend_from_slice(&data[..nl]);
                        past.first_line = head.take().unwrap_or_default();
                    }
                    None => line.extend_from_slice(data),
                }
            }
            past.bytes_counted += n as u64;
            past.lines_counted += data.iter().filter(|&&b| b == b'\n').count() as u64;
        }
    }
    Ok(past)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_with(segments: &[(u64, &[u8])]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (base, bytes) in segments {
            std::fs::write(dir.path().join(crate::log::segment_name(*base)), bytes).unwrap();
        }
        dir
    }

    #[test]
    fn counts_every_line_after_the_position_across_segments() {
        let dir = log_with(&[(0, b"a\nbb\n"), (5, b"ccc\ndd\ne\n")]);
        let all = measure_past(dir.path(), 0, u64::MAX).unwrap();
        assert_eq!((all.segments, all.log_bytes, all.log_start, all.log_end), (2, 14, 0, 14));
        assert_eq!((all.bytes_after, all.lines_counted, all.lines_after()), (14, 5, 5));
        assert_eq!(all.first_line, b"a");
        let past = measure_past(dir.path(), 7, u64::MAX).unwrap();
        assert_eq!((past.bytes_after, past.bytes_counted, past.lines_counted), (7, 7, 3));
        assert_eq!(past.first_line, b"c", "from the middle of a line: the rest of it");
        let at_end = measure_past(dir.path(), 14, u64::MAX).unwrap();
        assert_eq!((at_end.bytes_after, at_end.lines_counted, at_end.first_line.len()), (0, 0, 0));
        assert_eq!(measure_past(&dir.path().join("none"), 0, u64::MAX).unwrap(), PastPosition::default());
    }

    #[test]
    fn past_the_bound_the_lines_are_estimated() {
        let line = b"0123456789\n";
        let big: Vec<u8> = line.repeat(1000);
        let dir = log_with(&[(0, &big), (big.len() as u64, &big)]);
        let past = measure_past(dir.path(), 0, 5000).unwrap();
        assert_eq!(past.bytes_after, 22_000);
        assert_eq!(past.bytes_counted, 5000, "the second segment is skipped: the first line is known");
        assert_eq!(past.lines_counted, 454);
        assert_eq!(past.lines_after(), 1998);
        assert_eq!(past.first_line, b"0123456789");
        // Without a newline in the bytes read, the next segment is read for the first line.
        let dir = log_with(&[(0, b"no newline here"), (15, b"x\n")]);
        let past = measure_past(dir.path(), 0, 1).unwrap();
        assert_eq!((past.first_line.as_slice(), past.lines_counted), (&b"x"[..], 1));
    }
}
