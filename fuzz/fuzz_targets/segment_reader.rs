//! Bytes → one or two segment files → `LogReader::read` from 0 until caught up: never a panic nor an
//! endless loop, chunks contiguous and made of whole lines, together the log's complete bytes
//! (see `eps_fuzz::check_segment_reader`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let case = eps_fuzz::SegmentCase::from_bytes(data);
    eps_fuzz::check_segment_reader(eps_fuzz::scratch_dir(), &case);
});
