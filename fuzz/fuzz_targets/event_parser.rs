//! Bytes → `Event::parse_request` and `EventRef::parse_log_line` (as they are, and embedded in a valid
//! event as its value, userId and id): never a panic, and every accepted event keeps the invariants of
//! `eps_fuzz::check_event` (userId 1..=255 bytes, value >= 0, its log line parses back to it).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    eps_fuzz::check_event_bytes(data);
});
