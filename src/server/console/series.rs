//! The console's chart points over three ranges, bounded in memory: one point a second for 5 minutes,
//! one per 10 s for an hour, one a minute for 24 hours (2,100 points of 64 bytes in all, about
//! 140 KiB). The sampler adds one second at a time; the coarser points are sums of their seconds (the
//! p99 from the sum of their latency histograms, not an average of p99s).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::telemetry::tally::TallySnapshot;

/// A range of the chart, as `GET /console/summary?range=` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub(crate) enum Range {
    #[default]
    #[serde(rename = "5m")]
    FiveMinutes,
    #[serde(rename = "1h")]
    Hour,
    #[serde(rename = "24h")]
    Day,
}

impl Range {
    pub(crate) fn parse(text: &str) -> Option<Range> {
        match text {
            "5m" => Some(Range::FiveMinutes),
            "1h" => Some(Range::Hour),
            "24h" => Some(Range::Day),
            _ => None,
        }
    }

    /// Seconds per point, and points kept.
    pub(crate) fn step_seconds(self) -> u32 {
        match self {
            Range::FiveMinutes => 1,
            Range::Hour => 10,
            Range::Day => 60,
        }
    }

    fn points(self) -> usize {
        match self {
            Range::FiveMinutes => 300,
            Range::Hour => 360,
            Range::Day => 1440,
        }
    }
}

/// One point of the chart: what happened during its interval (one second, 10 s or a minute).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct Point {
    /// End of the interval (Unix ms).
    pub(crate) t: u64,
    /// Events the server accepted (stored) during the interval.
    pub(crate) accepted: u64,
    /// Events the processor applied during the interval (`null` while the database was unreachable
    /// during any of it).
    pub(crate) applied: Option<u64>,
    /// Answers with a 4xx status during the interval, every route.
    pub(crate) http_4xx: u64,
    /// Answers with a 5xx status during the interval, every route.
    pub(crate) http_5xx: u64,
    /// The 99th percentile latency of the ingest routes (`POST /events`, `POST /liveEvent`) over the
    /// interval, in milliseconds (the upper bound of its histogram bucket, within 25%); `null` without
    /// ingest requests.
    pub(crate) ingest_p99_ms: Option<f64>,
}

/// One second as the sampler measured it.
pub(crate) struct Second {
    pub(crate) t: u64,
    pub(crate) accepted: u64,
    pub(crate) applied: Option<u64>,
    pub(crate) requests: TallySnapshot,
}

/// Seconds summed into a coarser point.
#[derive(Default)]
struct Pending {
    seconds: u32,
    accepted: u64,
    applied: Option<u64>,
    applied_missing: bool,
    requests: TallySnapshot,
}

impl Pending {
    fn add(&mut self, second: &Second) {
        self.seconds += 1;
        self.accepted += second.accepted;
        match second.applied {
            Some(n) => self.applied = Some(self.applied.unwrap_or(0) + n),
            None => self.applied_missing = true,
        }
        self.requests.add(&second.requests);
    }

    fn take(&mut self, t: u64) -> Point {
        let pending = std::mem::take(self);
        point(t, pending.accepted, pending.applied.filter(|_| !pending.applied_missing), &pending.requests)
    }
}

fn point(t: u64, accepted: u64, applied: Option<u64>, requests: &TallySnapshot) -> Point {
    Point {
        t,
        accepted,
        applied,
        http_4xx: requests.client_errors,
        http_5xx: requests.server_errors,
        ingest_p99_ms: requests.latency_quantile_ms(0.99),
    }
}

/// The three rings of points.
pub(crate) struct Series {
    rings: [(Range, VecDeque<Point>, Pending); 3],
}

impl Default for Series {
    fn default() -> Self {
        Series {
            rings: [Range::FiveMinutes, Range::Hour, Range::Day]
                .map(|range| (range, VecDeque::with_capacity(range.points()), Pending::default())),
        }
    }
}

impl Series {
    /// Adds one second to every range (a coarse point is made when its last second arrives).
    pub(crate) fn push(&mut self, second: Second) {
        for (range, points, pending) in &mut self.rings {
            pending.add(&second);
            if pending.seconds < range.step_seconds() {
                continue;
            }
            if points.len() == range.points() {
                points.pop_front();
            }
            points.push_back(pending.take(second.t));
        }
    }

    /// The points of a range, oldest first.
    pub(crate) fn points(&self, range: Range) -> Vec<Point> {
        self.rings.iter().find(|(r, _, _)| *r == range).map(|(_, points, _)| points.iter().cloned().collect()).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn second(t: u64, accepted: u64, applied: Option<u64>) -> Second {
        let mut requests = TallySnapshot { client_errors: 1, ..TallySnapshot::default() };
        requests.latency[40] = 1;
        Second { t, accepted, applied, requests }
    }

    #[test]
    fn each_range_keeps_its_points_and_sums_its_seconds() {
        let mut series = Series::default();
        for s in 1..=86_460u64 {
            series.push(second(s * 1000, 2, if s == 5 { None } else { Some(1) }));
        }
        let (fine, hour, day) =
            (series.points(Range::FiveMinutes), series.points(Range::Hour), series.points(Range::Day));
        assert_eq!((fine.len(), hour.len(), day.len()), (300, 360, 1440));
        assert_eq!(fine.last().unwrap().t, 86_460_000);
        assert_eq!((fine[0].accepted, fine[0].applied, fine[0].http_4xx), (2, Some(1), 1));
        assert_eq!((hour[0].accepted, hour[0].applied, hour[0].http_4xx), (20, Some(10), 10));
        assert_eq!((day[0].accepted, day[0].applied, day[0].http_4xx), (120, Some(60), 60));
        assert!(day[0].ingest_p99_ms.is_some() && fine[0].ingest_p99_ms == day[0].ingest_p99_ms);
        assert_eq!(day.last().unwrap().t - day[0].t, 1439 * 60_000);

        // A second without the database makes its coarser points' applied unknown too.
        let mut series = Series::default();
        for s in 1..=60u64 {
            series.push(second(s * 1000, 1, if s == 5 { None } else { Some(1) }));
        }
        assert_eq!(series.points(Range::Hour)[0].applied, None);
        assert_eq!(series.points(Range::Hour)[1].applied, Some(10));
        assert_eq!(series.points(Range::Day)[0].applied, None);
        assert_eq!(Range::parse("1h"), Some(Range::Hour));
        assert_eq!(Range::parse("2h"), None);
    }
}
