//! Several `eps process` at once on the same log and database: each event still counts exactly once.

use crate::common;

use common::*;
use rand::{Rng, SeedableRng};

store_tests!(
    four_processors_at_once_apply_100k_events_exactly_once,
    a_processor_that_loses_a_race_goes_on_from_a_checkpoint_several_segments_ahead,
);

const EVENTS: usize = 100_000;
const USERS: u32 = 1_000;

/// 100,000 seed-format lines over ~1,000 users with decimal values, from a fixed seed.
fn generate() -> Vec<(String, &'static str, String)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_e9e5);
    (0..EVENTS)
        .map(|_| {
            let user = format!("user-{:04}", rng.random_range(0..USERS));
            let name = if rng.random_bool(0.3) { "subtract_revenue" } else { "add_revenue" };
            let cents: u64 = rng.random_range(0..10_000_000);
            let value = match rng.random_range(0..4) {
                // 12345.67, 0.5, 3e2 and 1.25E-3 styles: every form the log accepts.
                0 => format!("{}.{:02}", cents / 100, cents % 100),
                1 => format!("0.{}", rng.random_range(1..1000u32)),
                2 => format!("{}e{}", rng.random_range(1..100u32), rng.random_range(0..3u32)),
                _ => format!("{}.{:03}", cents / 1000, cents % 1000),
            };
            (user, name, value)
        })
        .collect()
}

async fn four_processors_at_once_apply_100k_events_exactly_once(store: StoreKind) {
    let env = Env::new(store).await;
    let events = generate();
    let lines: Vec<String> = events.iter().map(|(u, n, v)| event_line(u, n, v)).collect();
    // Four segments of ~1.5 MB: the processors also have to cross segment boundaries.
    let written = write_log(&env.log_dir(), &lines, 1_500_000);
    assert!(written.len() >= 3, "expected several segments, got {written:?}");
    let want = expected_totals(events.iter().map(|(u, n, v)| (u.as_str(), *n, v.as_str())));
    assert!(want.len() > 990, "{} users", want.len());

    // Small batches (16 KiB of a ~6 MB log: hundreds of commits each) and four processors started
    // together, so they run at the same time. Then contention is certain, not lucky: a processor moves
    // on from its own commit's end without reading the checkpoint again, so two that run at once keep
    // trying to commit batches from the same positions, and all but one of each such attempt conflict.
    // Only processors that never overlapped (each starting after the last finished) would see none.
    let runs: Vec<_> = (0..4).map(|_| env.process(&["--batch-bytes", "16384"])).collect();
    let outputs = futures::future::join_all(runs).await;
    let applied: Vec<u64> = outputs.iter().map(|o| applied_count(&o.stdout)).collect();
    let conflicts: Vec<u64> = outputs.iter().map(|o| conflict_count(&o.stdout)).collect();
    eprintln!("applied per processor: {applied:?}; conflicts per processor: {conflicts:?}");
    assert_eq!(applied.iter().sum::<u64>(), EVENTS as u64, "the four runs together applied {applied:?} events");
    assert!(
        conflicts.iter().sum::<u64>() > 0,
        "the four processors never contended (conflicts {conflicts:?}): this test showed nothing about concurrency"
    );
    let busy = applied.iter().filter(|&&n| n > 0).count();
    assert!(busy >= 2, "only {busy} of 4 processors applied events: {applied:?}");

    assert_totals(&env.revenues().await, &want);

    let fifth = env.process(&["--batch-bytes", "65536"]).await;
    assert!(fifth.stdout.contains("applied 0 events"), "fifth run: {fifth}");
    assert_totals(&env.revenues().await, &want);
}

/// Many segments smaller than one batch: a processor that loses a race is told a checkpoint that may lie
/// several segments past the one it was reading, and must go on from there (not fail with "position is
/// not in the log").
async fn a_processor_that_loses_a_race_goes_on_from_a_checkpoint_several_segments_ahead(store: StoreKind) {
    // Four processors started together on ~2 MB in 64 KiB batches always contend (see the test above);
    // each round asserts it, so the "checkpoint several segments ahead" path is taken every round.
    for round in 0..3 {
        let env = Env::new(store).await;
        let events: Vec<(String, &str, &str)> =
            (0..40_000).map(|i| (format!("u{}", i % 500), "add_revenue", "1.5")).collect();
        let lines: Vec<String> = events.iter().map(|(u, n, v)| event_line(u, n, v)).collect();
        let written = write_log(&env.log_dir(), &lines, 8_000);
        let runs: Vec<_> = (0..4).map(|_| env.process_unchecked(&["--batch-bytes", "65536"])).collect();
        let outputs = futures::future::join_all(runs).await;
        for out in &outputs {
            assert!(out.status.success(), "round {round}, {} segments of ~8 KB: {out}", written.len());
        }
        let applied: u64 = outputs.iter().map(|o| applied_count(&o.stdout)).sum();
        assert_eq!(applied, 40_000);
        let conflicts: Vec<u64> = outputs.iter().map(|o| conflict_count(&o.stdout)).collect();
        eprintln!("round {round}: conflicts per processor {conflicts:?}");
        assert!(conflicts.iter().sum::<u64>() > 0, "round {round}: no processor lost a race: {conflicts:?}");
        let want = expected_totals(events.iter().map(|(u, n, v)| (u.as_str(), *n, *v)));
        assert_totals(&env.revenues().await, &want);
    }
}
