//! The request tally the console samples: 4xx and 5xx answers (every route) and the latency of the
//! ingest routes (`POST /events`, `POST /liveEvent`) in a fixed histogram, all cumulative atomic
//! counters. A request costs one relaxed atomic add (ingest: its latency bucket; any route: its error
//! counter when it failed); the console's once-a-second sampler reads the counters and keeps the
//! differences, so no lock is ever taken on the request path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Sub-buckets per power of two of microseconds: a bucket's bounds are within 19% of each other.
const SUB_BUCKETS: usize = 4;
/// Powers of two covered: 1 µs up to 2^27 µs (134 s); slower requests count in the last bucket.
const OCTAVES: usize = 28;
/// Buckets of the latency histogram.
pub const LATENCY_BUCKETS: usize = OCTAVES * SUB_BUCKETS;

/// Cumulative counters since the process started.
pub struct RequestTally {
    client_errors: AtomicU64,
    server_errors: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
}

/// The counters read at one moment (or differences of two readings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TallySnapshot {
    pub client_errors: u64,
    pub server_errors: u64,
    pub latency: [u64; LATENCY_BUCKETS],
}

impl Default for TallySnapshot {
    fn default() -> Self {
        TallySnapshot { client_errors: 0, server_errors: 0, latency: [0; LATENCY_BUCKETS] }
    }
}

/// The one tally of this process, fed by [`super::track_requests`].
pub static TALLY: RequestTally = RequestTally::new();

impl RequestTally {
    pub const fn new() -> RequestTally {
        RequestTally {
            client_errors: AtomicU64::new(0),
            server_errors: AtomicU64::new(0),
            latency: [const { AtomicU64::new(0) }; LATENCY_BUCKETS],
        }
    }

    /// Counts one answer: its status class, and with `ingest` its latency.
    pub fn record(&self, status: u16, ingest: bool, elapsed: Duration) {
        match status {
            400..=499 => {
                self.client_errors.fetch_add(1, Ordering::Relaxed);
            }
            500..=599 => {
                self.server_errors.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        if ingest {
            self.latency[bucket_of(elapsed.as_micros() as u64)].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> TallySnapshot {
        let mut snapshot = TallySnapshot {
            client_errors: self.client_errors.load(Ordering::Relaxed),
            server_errors: self.server_errors.load(Ordering::Relaxed),
            ..TallySnapshot::default()
        };
        for (out, bucket) in snapshot.latency.iter_mut().zip(&self.latency) {
            *out = bucket.load(Ordering::Relaxed);
        }
        snapshot
    }
}

impl Default for RequestTally {
    fn default() -> Self {
        RequestTally::new()
    }
}

impl TallySnapshot {
    /// What was counted between `earlier` and this reading.
    pub fn since(&self, earlier: &TallySnapshot) -> TallySnapshot {
        let mut diff = TallySnapshot {
            client_errors: self.client_errors.saturating_sub(earlier.client_errors),
            server_errors: self.server_errors.saturating_sub(earlier.server_errors),
            ..TallySnapshot::default()
        };
        for ((out, now), before) in diff.latency.iter_mut().zip(&self.latency).zip(&earlier.latency) {
            *out = now.saturating_sub(*before);
        }
        diff
    }

    /// Adds another interval's counts (to make a longer interval).
    pub fn add(&mut self, other: &TallySnapshot) {
        self.client_errors += other.client_errors;
        self.server_errors += other.server_errors;
        for (sum, more) in self.latency.iter_mut().zip(&other.latency) {
            *sum += more;
        }
    }

    /// The latency below which `quantile` of the requests counted fall, in milliseconds: the upper
    /// bound of the bucket it falls in (`None` when no request was counted).
    pub fn latency_quantile_ms(&self, quantile: f64) -> Option<f64> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((quantile * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (index, count) in self.latency.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(bucket_upper_micros(index) as f64 / 1000.0);
            }
        }
        None
    }
}

/// The bucket of a latency in microseconds: its power of two, then which quarter of it.
fn bucket_of(micros: u64) -> usize {
    let micros = micros.max(1);
    let octave = 63 - micros.leading_zeros() as usize;
    if octave >= OCTAVES {
        return LATENCY_BUCKETS - 1;
    }
    // The two bits after the leading one: which quarter of [2^octave, 2^(octave+1)).
    let sub = if octave >= 2 { ((micros >> (octave - 2)) & 3) as usize } else { (micros << (2 - octave)) as usize & 3 };
    octave * SUB_BUCKETS + sub
}

/// The first latency (µs) above a bucket: `2^octave * (1 + (sub + 1) / 4)`.
fn bucket_upper_micros(index: usize) -> u64 {
    let (octave, sub) = (index / SUB_BUCKETS, index % SUB_BUCKETS);
    ((1u64 << octave) * (SUB_BUCKETS + sub + 1) as u64) / SUB_BUCKETS as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_their_latencies_within_a_quarter_octave() {
        for micros in [4u64, 5, 7, 100, 999, 1000, 1500, 4096, 123_456, 10_000_000] {
            let index = bucket_of(micros);
            let upper = bucket_upper_micros(index);
            assert!(micros < upper, "{micros} µs in bucket {index} below {upper}");
            assert!(upper as f64 <= micros as f64 * 1.25 + 1.0, "{micros} µs: bound {upper}");
        }
        assert_eq!(bucket_of(u64::MAX), LATENCY_BUCKETS - 1);
        let ordered: Vec<usize> = (1..5000u64).map(bucket_of).collect();
        assert!(ordered.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn the_p99_of_an_interval_and_its_error_counts() {
        let tally = RequestTally::new();
        let before = tally.snapshot();
        for _ in 0..99 {
            tally.record(200, true, Duration::from_micros(1000));
        }
        tally.record(200, true, Duration::from_millis(80));
        tally.record(400, false, Duration::from_millis(500));
        tally.record(503, true, Duration::from_micros(1000));
        let interval = tally.snapshot().since(&before);
        assert_eq!((interval.client_errors, interval.server_errors), (1, 1));
        let p99 = interval.latency_quantile_ms(0.99).unwrap();
        assert!((1.0..=1.25).contains(&p99), "{p99}");
        let p100 = interval.latency_quantile_ms(1.0).unwrap();
        assert!((80.0..=100.0).contains(&p100), "{p100}");
        assert_eq!(TallySnapshot::default().latency_quantile_ms(0.99), None);
    }
}
