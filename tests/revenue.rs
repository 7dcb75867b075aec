//! The seed flow end to end with the real binaries (client → server → log → process → GET), and exact
//! decimal arithmetic, on both stores.

#[macro_use]
mod common;

use std::path::Path;

use common::*;
use serde_json::json;

store_tests!(
    seed_events_give_user1_50_and_user2_200_and_a_second_process_applies_nothing,
    decimal_values_are_summed_exactly,
    a_total_decimal_cannot_hold_is_never_silently_rounded_within_one_batch,
    a_total_decimal_cannot_hold_is_never_silently_rounded_across_batches,
);

async fn seed_events_give_user1_50_and_user2_200_and_a_second_process_applies_nothing(store: StoreKind) {
    let env = Env::new(store).await;
    let server = env.server().await;
    let http = http();

    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("samples/events.jsonl");
    let sent = client(&seed, &server.url, &[]).await;
    assert!(sent.status.success(), "eps client: {sent}");
    assert!(sent.stdout.contains("accepted 3 "), "client summary: {sent}");

    let first = env.process(&[]).await;
    assert_eq!(applied_count(&first.stdout), 3, "{first}");

    let (status, body) = get_user(&http, &server.url, "user1").await;
    assert_eq!((status, &body), (200, &json!({"userId": "user1", "revenue": "50"})));
    let (status, body) = get_user(&http, &server.url, "user2").await;
    assert_eq!((status, &body), (200, &json!({"userId": "user2", "revenue": "200"})));

    let (status, body) = get_user(&http, &server.url, "nobody").await;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "404 without a JSON error: {body}");

    let before = env.revenues().await;
    let second = env.process(&[]).await;
    assert!(second.stdout.contains("applied 0 events"), "second run: {second}");
    assert_eq!(env.revenues().await, before, "a second run changed the totals");
    assert_eq!(revenue_of(&http, &server.url, "user1").await, "50");
    assert_eq!(revenue_of(&http, &server.url, "user2").await, "200");
}

async fn decimal_values_are_summed_exactly(store: StoreKind) {
    let env = Env::new(store).await;
    let server = env.server().await;
    let http = http();

    let mut events: Vec<(&str, &str, &str)> = vec![("tenths", "add_revenue", "0.1"); 10];
    let mixed: &[(&str, &str)] = &[
        ("add_revenue", "0.01"),
        ("add_revenue", "12.345"),
        ("add_revenue", "1e2"),
        ("subtract_revenue", "0.000001"),
        ("add_revenue", "99999999.99"),
        ("subtract_revenue", "1.5E-3"),
        ("add_revenue", "7"),
        ("add_revenue", "2.50"),
        ("add_revenue", "12345678901234567.891"),
        ("subtract_revenue", "0.3"),
        ("add_revenue", "0.1"),
        ("add_revenue", "0.2"),
    ];
    events.extend(mixed.iter().map(|(name, value)| ("mixed", *name, *value)));
    // Goes below zero: 0.1 + 0.2 - 0.35 = -0.05.
    events.extend([("negative", "add_revenue", "0.1"), ("negative", "add_revenue", "0.2")]);
    events.push(("negative", "subtract_revenue", "0.35"));

    let lines: Vec<String> = events.iter().map(|(u, n, v)| event_line(u, n, v)).collect();
    let file = env.write_file("decimals.jsonl", &lines);
    let sent = client(&file, &server.url, &[]).await;
    assert!(sent.status.success(), "eps client: {sent}");
    env.process(&[]).await;

    let want = expected_totals(events.iter().copied());
    assert_eq!(want["tenths"].to_string(), "1.0");
    for (user, total) in &want {
        let got = revenue_of(&http, &server.url, user).await;
        assert_eq!(got, total.normalize().to_string(), "revenue of {user}");
    }
    assert_eq!(revenue_of(&http, &server.url, "tenths").await, "1");
    assert_eq!(revenue_of(&http, &server.url, "negative").await, "-0.05");
    assert_totals(&env.revenues().await, &want);
}

/// 10 and 1e-28 are each valid (28 decimal places at most), but their sum needs 30 significant
/// digits, more than a `Decimal` holds. ARCHITECTURE.md: "Overflow is an error that commits nothing,
/// never a wrap or a rounding." So either the total is exact, or the processor refuses the batch
/// (non-zero exit) and the total stays what it was.
const TINY: &str = "0.0000000000000000000000000001";
const EXACT_SUM: &str = "10.0000000000000000000000000001";

async fn check_exact_or_refused(env: &Env, url: &str, before: Option<&str>) {
    let out = env.process_unchecked(&[]).await;
    let http = http();
    let (status, body) = get_user_once(&http, url, "precise").await;
    if out.status.success() {
        let body: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("GET answered {status} {body}; process: {out}"));
        let stored = env.db.raw_revenue(&env.data_dir, "precise").await;
        assert_eq!(
            (status, body["revenue"].as_str()),
            (200, Some(EXACT_SUM)),
            "10 + {TINY} was committed but is not exact; the database holds {stored:?}; process: {out}"
        );
    } else {
        match before {
            Some(before) => assert_eq!((status, body.contains(&format!("\"{before}\""))), (200, true), "{body}"),
            None => assert_eq!(status, 404, "a refused batch left {body}"),
        }
    }
}

async fn a_total_decimal_cannot_hold_is_never_silently_rounded_within_one_batch(store: StoreKind) {
    let env = Env::new(store).await;
    let server = env.server().await;
    let http = http();
    for value in ["10", TINY] {
        let (status, _) = post_event(&http, &server.url, &event_line("precise", "add_revenue", value)).await;
        assert_eq!(status, 200);
    }
    // Wait until the server's store answers (404 for a user with no events yet).
    assert_eq!(get_user(&http, &server.url, "nobody").await.0, 404);
    check_exact_or_refused(&env, &server.url, None).await;
}

async fn a_total_decimal_cannot_hold_is_never_silently_rounded_across_batches(store: StoreKind) {
    let env = Env::new(store).await;
    let server = env.server().await;
    let http = http();
    assert_eq!(post_event(&http, &server.url, &event_line("precise", "add_revenue", "10")).await.0, 200);
    env.process(&[]).await;
    assert_eq!(revenue_of(&http, &server.url, "precise").await, "10");
    assert_eq!(post_event(&http, &server.url, &event_line("precise", "add_revenue", TINY)).await.0, 200);
    check_exact_or_refused(&env, &server.url, Some("10")).await;
}
