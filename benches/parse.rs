//! Micro-benchmarks of the event encoding hot paths, no I/O: parsing a request body
//! (`EventRef::parse_request`, what every `POST /liveEvent` does), writing the log line
//! (`EventRef::write_log_line`), reading a log line back (`parse_log_line`, the serde path, and
//! `parse_canonical_log_line`, the processor's fast path), and encoding a 1,000-event `POST /events`
//! body into a `LogBatch`. Figures are per event (`Throughput::Elements`), so they read as events/s.
//!
//! Run: `cargo bench --bench parse` (add `-- --quick` for a short run, or a filter such as
//! `-- parse_log_line`). `cargo test --bench parse` runs each benchmark once, as a smoke test.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use eps::event::EventRef;
use eps::log::LogBatch;

/// The seed's first event, as the seed's client sends it.
const SEED_BODY: &[u8] = br#"{"userId": "user1", "name": "add_revenue", "value": 100}"#;
/// An event as eps's client sends it: with an idempotency id and a decimal value.
const ID_DECIMAL_BODY: &[u8] =
    br#"{"userId":"user42","name":"subtract_revenue","value":1234.56,"id":"9f2c41d7e0b3-000017"}"#;
/// A fixed receive time, so every written line is the same.
const TS_MILLIS: u64 = 1_764_000_000_000;

/// A `POST /events` body of `n` JSON Lines events in the form eps's client sends (id inserted first).
fn batch_body(n: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(n * 96);
    for i in 0..n {
        let name = if i % 4 == 3 { "subtract_revenue" } else { "add_revenue" };
        let line = format!(
            r#"{{"id":"9f2c41d7e0b3-{i}","userId": "user{}", "name": "{name}", "value": {}.{:02}}}"#,
            i % 97,
            i % 1000,
            i % 100
        );
        body.extend_from_slice(line.as_bytes());
        body.push(b'\n');
    }
    body
}

fn bench_parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    group.measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));

    group.throughput(Throughput::Elements(1));
    group.bench_function("parse_request/seed_event", |b| {
        b.iter(|| EventRef::parse_request(black_box(SEED_BODY)).unwrap())
    });
    group.bench_function("parse_request/with_id_and_decimal", |b| {
        b.iter(|| EventRef::parse_request(black_box(ID_DECIMAL_BODY)).unwrap())
    });

    let event = EventRef::parse_request(ID_DECIMAL_BODY).unwrap();
    let mut out = Vec::with_capacity(256);
    group.bench_function("write_log_line", |b| {
        b.iter(|| {
            out.clear();
            black_box(&event).write_log_line(black_box(TS_MILLIS), &mut out);
            black_box(out.len())
        })
    });

    // A canonical line, exactly as the server writes it:
    // {"userId":"user42","name":"subtract_revenue","value":1234.56,"id":"9f2c41d7e0b3-000017","ts":...}
    let mut line = Vec::new();
    event.write_log_line(TS_MILLIS, &mut line);
    assert_eq!(EventRef::parse_canonical_log_line(&line).as_ref(), Some(&event), "the fast path takes it");
    group.bench_function("parse_log_line/general", |b| b.iter(|| EventRef::parse_log_line(black_box(&line)).unwrap()));
    group.bench_function("parse_log_line/canonical", |b| {
        b.iter(|| EventRef::parse_canonical_log_line(black_box(&line)).unwrap())
    });

    // What `POST /events` does per request: split the body into lines, parse each, encode it into
    // one LogBatch (log line + id digest).
    let body = batch_body(1000);
    group.throughput(Throughput::Elements(1000));
    group.bench_function("batch_encode/1000", |b| {
        b.iter(|| {
            let body = black_box(&body[..]);
            let mut batch = LogBatch::with_capacity(body.len() / 64 + 1);
            for line in body.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                batch.push(&EventRef::parse_request(line).unwrap(), TS_MILLIS);
            }
            assert_eq!(batch.len(), 1000);
            batch
        })
    });

    group.finish();
}

criterion_group!(benches, bench_parse);
criterion_main!(benches);
