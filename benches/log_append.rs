//! Micro-benchmarks of the durable append path: `EventLog::append` on a real `FileLog` (group-commit
//! writer thread, one `write` + one `fdatasync` per commit) in a temporary directory, from a tokio
//! runtime, the way the server's handlers call it.
//!
//! - `append/1_event`: one single-event append, awaited. Each one is a commit of its own and so
//!   includes one fdatasync: this mostly measures the sync latency of the disk it runs on.
//! - `append/1000_events`: one append of a 1,000-event batch (one `POST /events`): one sync, more bytes.
//! - `append/64_concurrent_single`: 64 single-event appends issued together and awaited together:
//!   shows group commit (the 64 share a few syncs, so per-event cost is far below `1_event`'s).
//!
//! Run: `cargo bench --bench log_append`. The log lives in `tempfile::tempdir()`, i.e. under `$TMPDIR`
//! (default /tmp): point TMPDIR at the disk you want to measure (a tmpfs makes fdatasync free).
//! `cargo test --bench log_append` runs each benchmark once, as a smoke test.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use eps::event::EventRef;
use eps::log::{Appended, EventLog, FileLog, FileLogOptions, LogBatch};

const TS_MILLIS: u64 = 1_764_000_000_000;

/// A batch of `n` events without ids (ids would be de-duplicated across iterations and never written).
fn batch(n: usize) -> LogBatch {
    let mut batch = LogBatch::with_capacity(n);
    for i in 0..n {
        let body = format!(r#"{{"userId":"user{}","name":"add_revenue","value":{}.25}}"#, i % 97, i % 1000);
        batch.push(&EventRef::parse_request(body.as_bytes()).unwrap(), TS_MILLIS);
    }
    batch
}

fn all_stored(answers: &[Appended], n: usize) {
    assert_eq!(answers.len(), n);
    assert!(answers.iter().all(|a| *a == Appended::Stored));
}

fn bench_log_append(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = FileLog::open(FileLogOptions::new(dir.path().join("log"))).unwrap();

    let mut group = c.benchmark_group("log_append");
    // Every iteration syncs: keep sample counts and times modest so the whole file runs in ~30 s.
    group.sample_size(20).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));

    group.throughput(Throughput::Elements(1));
    group.bench_function("append/1_event", |b| {
        // One append = one commit = one fdatasync: this is the disk's sync latency plus the hand-off.
        b.to_async(&rt).iter_batched(
            || batch(1),
            |batch| async { all_stored(&black_box(log.append(batch).await.unwrap()), 1) },
            BatchSize::SmallInput,
        )
    });

    group.throughput(Throughput::Elements(1000));
    group.bench_function("append/1000_events", |b| {
        b.to_async(&rt).iter_batched(
            || batch(1000),
            |batch| async { all_stored(&black_box(log.append(batch).await.unwrap()), 1000) },
            BatchSize::SmallInput,
        )
    });

    group.throughput(Throughput::Elements(64));
    group.bench_function("append/64_concurrent_single", |b| {
        b.to_async(&rt).iter_batched(
            || (0..64).map(|_| batch(1)).collect::<Vec<_>>(),
            |batches| async {
                let answers = futures::future::join_all(batches.into_iter().map(|batch| log.append(batch))).await;
                for answer in answers {
                    all_stored(&black_box(answer.unwrap()), 1);
                }
            },
            BatchSize::SmallInput,
        )
    });

    group.finish();
    rt.block_on(log.shutdown());
}

criterion_group!(benches, bench_log_append);
criterion_main!(benches);
