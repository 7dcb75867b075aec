//! Reading the file log back: whole lines, in bounded chunks, from any position.
//!
//! Invariant: a [`Chunk`] only ever holds whole lines, and its `end` is the position just past its last
//! newline, so a checkpoint taken from it is always at a line boundary. A last line still being written
//! (no newline yet) is never returned from the newest segment: it will be complete on a later read, or
//! cut by the writer's recovery if it was torn by a crash. An older segment can never grow again, so a
//! line without newline at its end is returned as it is, for the processor to report as invalid.
//!
//! Durability: a reader never reads past the durable end the writer publishes
//! ([`super::durable_end`]): bytes after it may belong to a group whose append is failing, which the
//! writer answers 503 and cuts off again. Everything before it was synced by the writer. A log without
//! a published end (written by hand, or by an older version) is read to its last whole line, and each
//! chunk's segment is `fdatasync`ed before the chunk is returned, so the processor never commits an
//! effect of bytes that a power cut could still take back.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::durable_end::DurableEndReader;
use super::{list_segments, segment_name};

/// A run of whole lines read from one segment.
#[derive(Debug)]
pub struct Chunk {
    /// Position of the first byte.
    pub start: u64,
    /// Position just past the last line.
    pub end: u64,
    /// Segment file name and its base position, to report where an invalid line sits.
    pub segment: String,
    pub segment_base: u64,
    pub data: Vec<u8>,
}

impl Chunk {
    /// The lines with their positions, without the newline. A line that has no newline (only possible
    /// last, at the end of an older segment) comes as `Err`: it is a torn write, never an event.
    pub fn lines(&self) -> impl Iterator<Item = (u64, Result<&[u8], &[u8]>)> {
        lines_of(&self.data, self.start)
    }
}

/// [`Chunk::lines`] of any run of bytes starting at log position `start` (e.g. part of a chunk).
pub fn lines_of(data: &[u8], start: u64) -> impl Iterator<Item = (u64, Result<&[u8], &[u8]>)> {
    let mut pos = start;
    data.split_inclusive(|&b| b == b'\n').map(move |line| {
        let at = pos;
        pos += line.len() as u64;
        (at, line.strip_suffix(b"\n").ok_or(line))
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading the log: {0}")]
    Io(#[from] io::Error),
    #[error("position {position} is not in the log (it spans {first}..{end}): was the log replaced or were unprocessed segments deleted?")]
    OutOfRange { position: u64, first: u64, end: u64 },
}

pub struct LogReader {
    dir: PathBuf,
    max_chunk_bytes: usize,
    /// The segment read last, kept open so following the newest segment costs no directory listing.
    open: Option<(u64, File)>,
    durable_end: DurableEndReader,
}

impl LogReader {
    pub fn new(dir: impl Into<PathBuf>, max_chunk_bytes: usize) -> LogReader {
        let dir = dir.into();
        LogReader { durable_end: DurableEndReader::new(&dir), dir, max_chunk_bytes: max_chunk_bytes.max(1), open: None }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Position just past the last byte a reader may read: the durable end the writer published, or
    /// without one the end of the newest segment (complete line or not).
    pub fn end_position(&mut self) -> io::Result<u64> {
        let end = raw_end(&list_segments(&self.dir)?)?;
        Ok(self.durable_end.read()?.map_or(end, |durable| durable.min(end)))
    }

    /// Reads whole lines from `position`, at most about `max_chunk_bytes` (more only when a single line
    /// is longer). `Ok(None)`: nothing complete after `position` yet.
    pub fn read(&mut self, position: u64) -> Result<Option<Chunk>, ReadError> {
        loop {
            // Whether this segment is the newest must be known BEFORE its length is read: the writer
            // only starts a new segment after the last write to the old one is complete, so a segment
            // seen not-newest here has its final length below. Read the other way round, a half-written
            // line seen in the length could be taken for the torn end of an older segment.
            let segments = list_segments(&self.dir)?;
            let newest = segments.last().map(|(b, _)| *b);
            // Read before the segment's length: the writer publishes only after its bytes are written.
            let durable_end = self.durable_end.read()?;
            let (base, len) = match &self.open {
                Some((base, file)) if *base <= position => {
                    let len = file.metadata()?.len();
                    if position - base > len {
                        // Another processor moved the checkpoint past this segment: look it up again.
                        self.open = None;
                        continue;
                    }
                    (*base, len)
                }
                _ => match self.open_segment_for(position)? {
                    Some(found) => found,
                    None => return Ok(None),
                },
            };
            let offset = position - base;
            if offset > len {
                return Err(self.out_of_range(position));
            }
            if offset == len {
                // At the end of this segment: go on in the next one if there is one.
                match segments.iter().find(|(b, _)| *b > base) {
                    Some((next, _)) if *next == position => {
                        self.open = None;
                        continue;
                    }
                    Some(_) => return Err(self.out_of_range(position)),
                    None => return Ok(None),
                }
            }
            // Bytes past the durable end may be a failing append: not readable (yet, or ever).
            let readable = durable_end.map_or(len, |end| len.min(end.saturating_sub(base)));
            if offset >= readable {
                return Ok(None);
            }
            // A segment created after the listing above counts as not existing yet: conservative.
            let is_last = newest.is_none_or(|b| b <= base) || readable < len;
            let (_, file) = self.open.as_ref().expect("segment opened above");
            let sync = durable_end.is_none();
            return Ok(read_lines(file, base, offset, readable, self.max_chunk_bytes, is_last, sync)?);
        }
    }

    /// Opens the segment holding `position`; `None` when the log has no segment yet.
    fn open_segment_for(&mut self, position: u64) -> Result<Option<(u64, u64)>, ReadError> {
        self.open = None;
        let segments = list_segments(&self.dir)?;
        if segments.is_empty() && position == 0 {
            return Ok(None);
        }
        let Some((base, path)) = segments.iter().rev().find(|(b, _)| *b <= position) else {
            return Err(self.out_of_range(position));
        };
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        self.open = Some((*base, file));
        Ok(Some((*base, len)))
    }

    fn out_of_range(&self, position: u64) -> ReadError {
        let segments = list_segments(&self.dir).unwrap_or_default();
        let first = segments.first().map_or(0, |(b, _)| *b);
        let end = raw_end(&segments).unwrap_or(0);
        ReadError::OutOfRange { position, first, end }
    }
}

/// Position just past the last byte of the newest segment, whole line or not.
fn raw_end(segments: &[(u64, PathBuf)]) -> io::Result<u64> {
    match segments.last() {
        Some((base, path)) => Ok(base + std::fs::metadata(path)?.len()),
        None => Ok(0),
    }
}

fn read_lines(
    file: &File,
    base: u64,
    offset: u64,
    len: u64,
    max: usize,
    is_last: bool,
    sync: bool,
) -> io::Result<Option<Chunk>> {
    let available = (len - offset) as usize;
    let mut want = available.min(max);
    loop {
        let mut data = vec![0u8; want];
        file.read_exact_at(&mut data, offset)?;
        let keep = match data.iter().rposition(|&b| b == b'\n') {
            // An older segment read to its end: its unterminated tail (if any) can never grow, keep it.
            _ if !is_last && want == available => want,
            Some(i) => i + 1,
            // One line longer than `max`: read further until its end.
            None if want < available => {
                want = (want * 2).min(available);
                continue;
            }
            // No newline before the end of the segment.
            None if is_last => return Ok(None),
            None => want,
        };
        data.truncate(keep);
        if sync {
            file.sync_data()?;
        }
        let start = base + offset;
        return Ok(Some(Chunk {
            start,
            end: start + keep as u64,
            segment: segment_name(base),
            segment_base: base,
            data,
        }));
    }
}
