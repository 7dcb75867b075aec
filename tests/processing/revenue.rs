//! The seed flow end to end with the real binaries (client → server → log → process → GET), and exact
//! decimal arithmetic, on both stores.

use crate::common;

use std::path::Path;

use common::*;
use serde_json::json;

store_tests!(
    seed_events_give_user1_50_and_user2_200_and_a_second_process_applies_nothing,
    decimal_values_are_summed_exactly,
    a_sum_no_decimal_holds_is_exact_within_one_batch,
    a_sum_no_decimal_holds_is_exact_across_batches,
    two_valid_events_whose_sum_no_decimal_holds_stop_nobody,
    totals_far_beyond_10_28_are_exact_and_come_back,
    a_total_that_comes_back_to_a_short_number_is_stored_on_every_store,
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
/// digits, more than a `Decimal` holds. Totals are exact at any size: the sum is committed exactly,
/// never refused and never rounded.
const TINY: &str = "0.0000000000000000000000000001";
const EXACT_SUM: &str = "10.0000000000000000000000000001";

async fn check_exact(env: &Env, url: &str) {
    let out = env.process_unchecked(&[]).await;
    assert!(out.status.success(), "10 + {TINY} stopped processing: {out}");
    let http = http();
    let stored = env.db.raw_revenue(&env.data_dir, "precise").await;
    assert_eq!(revenue_of(&http, url, "precise").await, EXACT_SUM, "the database holds {stored:?}; process: {out}");
}

async fn a_sum_no_decimal_holds_is_exact_within_one_batch(store: StoreKind) {
    let env = Env::new(store).await;
    let server = env.server().await;
    let http = http();
    for value in ["10", TINY] {
        let (status, _) = post_event(&http, &server.url, &event_line("precise", "add_revenue", value)).await;
        assert_eq!(status, 200);
    }
    check_exact(&env, &server.url).await;
}

async fn a_sum_no_decimal_holds_is_exact_across_batches(store: StoreKind) {
    let env = Env::new(store).await;
    let server = env.server().await;
    let http = http();
    assert_eq!(post_event(&http, &server.url, &event_line("precise", "add_revenue", "10")).await.0, 200);
    env.process(&[]).await;
    assert_eq!(revenue_of(&http, &server.url, "precise").await, "10");
    assert_eq!(post_event(&http, &server.url, &event_line("precise", "add_revenue", TINY)).await.0, 200);
    check_exact(&env, &server.url).await;
}

/// Issue 14, item 3: `100000000000` and `1e-28` for one user are each accepted, and their sum (40
/// digits) used to fail every `eps process` run, so nobody's events were applied any more. Every
/// expected value here is text written from the inputs, not computed by eps.
async fn two_valid_events_whose_sum_no_decimal_holds_stop_nobody(store: StoreKind) {
    let env = Env::new(store).await;
    let server = env.server().await;
    let http = http();
    let lines = [
        event_line("early", "add_revenue", "7"),
        event_line("precise", "add_revenue", "100000000000"),
        event_line("precise", "add_revenue", "0.0000000000000000000000000001"),
        event_line("late", "add_revenue", "2.5"),
        event_line("late", "subtract_revenue", "1"),
    ];
    for line in &lines {
        assert_eq!(post_event(&http, &server.url, line).await.0, 200, "{line}");
    }
    let out = env.process_unchecked(&[]).await;
    assert!(out.status.success(), "eps process: {out}");
    assert_eq!(applied_count(&out.stdout), 5, "{out}");
    let precise = "100000000000.0000000000000000000000000001";
    assert_eq!(revenue_of(&http, &server.url, "precise").await, precise);
    assert_eq!(env.db.raw_revenue(&env.data_dir, "precise").await.as_deref(), Some(precise), "in the database");
    assert_eq!(revenue_of(&http, &server.url, "early").await, "7");
    assert_eq!(revenue_of(&http, &server.url, "late").await, "1.5");

    // Processing goes on: later events, for that user and others, are applied.
    assert_eq!(post_event(&http, &server.url, &event_line("late", "add_revenue", "1")).await.0, 200);
    assert_eq!(post_event(&http, &server.url, &event_line("precise", "add_revenue", "0.5")).await.0, 200);
    let out = env.process_unchecked(&[]).await;
    assert!(out.status.success(), "second eps process: {out}");
    assert_eq!(applied_count(&out.stdout), 2, "{out}");
    assert_eq!(revenue_of(&http, &server.url, "late").await, "2.5");
    assert_eq!(revenue_of(&http, &server.url, "precise").await, "100000000000.5000000000000000000000000001");
}

/// Totals far beyond 10^28 (and back): 2,000 events of the largest 28-digit integer for one user, with
/// 28th decimal places mixed in, and 1,000 up then 1,000 down for another, over two runs. The expected
/// totals are integer arithmetic on the input's text (u128), the fraction written out.
async fn totals_far_beyond_10_28_are_exact_and_come_back(store: StoreKind) {
    const NINES: &str = "9999999999999999999999999999";
    let nines: u128 = NINES.parse().unwrap();
    let env = Env::new(store).await;
    let server = env.server().await;
    let http = http();

    let mut first = Vec::new();
    for i in 0..2000 {
        if i % 1000 == 0 {
            first.push(event_line("whale", "add_revenue", "0.0000000000000000000000000001"));
        }
        first.push(event_line("whale", "add_revenue", NINES));
        if i < 1000 {
            first.push(event_line("crosser", "add_revenue", NINES));
        }
    }
    first.extend((0..3).map(|_| event_line("small", "add_revenue", "0.1")));
    let sent = client(&env.write_file("first.jsonl", &first), &server.url, &[]).await;
    assert!(sent.status.success(), "eps client: {sent}");
    let out = env.process_unchecked(&[]).await;
    assert!(out.status.success(), "eps process: {out}");
    assert_eq!(applied_count(&out.stdout), first.len() as u64, "{out}");
    let whale = format!("{}.0000000000000000000000000002", nines * 2000);
    assert_eq!(whale, "19999999999999999999999999998000.0000000000000000000000000002");
    assert_eq!(revenue_of(&http, &server.url, "whale").await, whale);
    assert_eq!(revenue_of(&http, &server.url, "crosser").await, (nines * 1000).to_string());
    assert_eq!(revenue_of(&http, &server.url, "small").await, "0.3");

    // Back down across zero, and one more up: store-side sums of totals no Decimal holds.
    let mut second: Vec<String> = (0..1000).map(|_| event_line("crosser", "subtract_revenue", NINES)).collect();
    second.push(event_line("crosser", "subtract_revenue", "0.5"));
    second.push(event_line("crosser", "add_revenue", "0.25"));
    second.push(event_line("whale", "add_revenue", NINES));
    let sent = client(&env.write_file("second.jsonl", &second), &server.url, &[]).await;
    assert!(sent.status.success(), "eps client: {sent}");
    let out = env.process_unchecked(&[]).await;
    assert!(out.status.success(), "second eps process: {out}");
    assert_eq!(revenue_of(&http, &server.url, "crosser").await, "-0.25");
    assert_eq!(revenue_of(&http, &server.url, "whale").await, format!("{}.0000000000000000000000000002", nines * 2001));

    // eps status sums everyone exactly: whale + (-0.25) + 0.3.
    let mut a = args(&["status", "--json", "--data-dir", &env.data_dir.display().to_string()]);
    a.extend(env.db.args());
    let status = run_eps(&a, &[]).await;
    assert!(status.status.success(), "eps status: {status}");
    let status: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(status["users"], 3, "{status}");
    assert_eq!(status["total_revenue"], format!("{}.0500000000000000000000000002", nines * 2001), "{status}");
}

/// Issue 15, item 6: 7 + 0.5000000000000000000000000001 is stored with 28 decimal places; adding
/// 0.4999999999999999999999999999 in a later batch gives exactly 8. PostgreSQL's old range CHECK measured
/// NUMERIC's unnormalised scale and refused that commit on every run, halting processing for everyone;
/// both stores must give the same answers on the same log.
async fn a_total_that_comes_back_to_a_short_number_is_stored_on_every_store(store: StoreKind) {
    let env = Env::new(store).await;
    let server = env.server().await;
    let http = http();
    for value in ["7", "0.5000000000000000000000000001"] {
        assert_eq!(post_event(&http, &server.url, &event_line("x", "add_revenue", value)).await.0, 200);
    }
    env.process(&[]).await;
    assert_eq!(revenue_of(&http, &server.url, "x").await, "7.5000000000000000000000000001");
    assert_eq!(
        post_event(&http, &server.url, &event_line("x", "add_revenue", "0.4999999999999999999999999999")).await.0,
        200
    );
    assert_eq!(post_event(&http, &server.url, &event_line("other", "add_revenue", "1")).await.0, 200);
    let out = env.process_unchecked(&[]).await;
    assert!(out.status.success(), "eps process: {out}");
    assert_eq!(revenue_of(&http, &server.url, "x").await, "8");
    assert_eq!(revenue_of(&http, &server.url, "other").await, "1");
}
