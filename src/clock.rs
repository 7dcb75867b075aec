//! The two clocks, kept apart: the wall clock only dates things for people (`ts` in the log, the
//! console's `now`); every deadline, expiry and freshness check uses the monotonic clock, which an
//! operator or NTP stepping the wall clock cannot move.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Unix time in milliseconds (the wall clock): for dates written down, never for deadlines.
pub fn wall_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Milliseconds on the monotonic clock since the first call in this process: for deadlines.
pub fn mono_millis() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}
