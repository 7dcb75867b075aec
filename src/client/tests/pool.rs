//! The server pool: round-robin over the servers and failover from a failing one.

use super::*;

/// Two recorders, the first answering `first`, the second accepting everything.
async fn two_servers(
    first: impl Fn(usize) -> BoxFuture<'static, Response> + Send + Sync + 'static,
) -> (Recorder, String, Recorder, String) {
    let a = Recorder::new(first);
    let b = Recorder::new(|_| accepted());
    let (url_a, url_b) = (serve(&a).await, serve(&b).await);
    (a, url_a, b, url_b)
}

#[tokio::test]
async fn requests_are_spread_round_robin_and_counted_per_server() {
    let (a, url_a, b, url_b) = two_servers(|_| accepted()).await;
    let file = events(40);
    let opts = ClientOptions { urls: vec![url_a.clone(), url_b.clone()], concurrency: 1, ..options(&file, "") };
    let (summary, reports) = run_fast(opts).await;
    assert!(summary.ok(), "{summary} {reports:?}");
    assert_eq!((a.received().len(), b.received().len()), (20, 20));
    assert_eq!(summary.per_server, vec![(url_a.clone(), 20), (url_b.clone(), 20)]);
    assert_eq!(summary.per_server_line().unwrap(), format!("per server: {url_a} → 20, {url_b} → 20"));
    let ids: HashSet<String> = a.counts().into_keys().chain(b.counts().into_keys()).collect();
    assert_eq!(ids.len(), 40, "each event went to one server");
}

#[tokio::test]
async fn a_failing_server_is_left_out_and_its_requests_go_to_the_next_at_once() {
    // The first server always answers 503 with a long Retry-After: obeying it instead of failing
    // over would take 30 s a request.
    let (a, url_a, b, url_b) = two_servers(|_| {
        Box::pin(async {
            (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "30")], Json(serde_json::json!({"error": "down"})))
                .into_response()
        })
    })
    .await;
    let file = events(300);
    let opts = ClientOptions { urls: vec![url_a.clone(), url_b.clone()], concurrency: 4, ..options(&file, "") };
    let capture = Arc::new(Mutex::new(Vec::new()));
    // The default backoffs: 500 ms before a probe of the failing server.
    let tuning = Tuning { capture: Some(Arc::clone(&capture)), ..Tuning::default() };
    let started = Instant::now();
    let summary = run_with(opts, tuning, std::future::pending()).await.unwrap();
    let elapsed = started.elapsed();
    assert!(summary.ok(), "{summary} {:?}", capture.lock().unwrap());
    assert_eq!(summary.accepted, 300);
    // The failing server asks for 30 s (Retry-After): a client that obeyed it instead of failing
    // over would take at least that long. 25 s separates the two with room for a loaded machine.
    assert!(elapsed < Duration::from_secs(25), "took {elapsed:?}: a Retry-After was obeyed instead of failing over");
    assert_eq!(summary.per_server, vec![(url_a, 0), (url_b, 300)]);

    // The failing server saw the requests sent before it was found down (at most one per
    // request in flight), then one probe per backoff (500 ms, doubling).
    let to_a = a.received();
    let probes = elapsed.as_millis() as usize / 500 + 1;
    assert!(!to_a.is_empty());
    assert!(to_a.len() <= 4 + probes, "{} requests to the down server in {elapsed:?}", to_a.len());
    // Each of them went again to the other server, as the same bytes.
    let to_b = b.received();
    assert_eq!(b.counts().len(), 300);
    for r in &to_a {
        let again = to_b.iter().find(|o| o.id == r.id).expect("failed over");
        assert_eq!(again.body, r.body);
    }
}

#[tokio::test]
async fn with_every_server_down_the_backoff_applies_and_events_fail_after_max_attempts() {
    let dead = || {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let file = events(6);
    let opts = ClientOptions { urls: vec![dead(), dead()], max_attempts: 3, ..options(&file, "") };
    // A guard against a hang only (generous, for a loaded machine).
    let (summary, reports) = within_secs(60, run_fast(opts)).await;
    assert_eq!((summary.sent, summary.failed, summary.accepted), (6, 6, 0));
    assert!(reports[0].contains("failed after 3 attempts: "), "{reports:?}");
    assert_eq!(summary.per_server.iter().map(|(_, n)| n).sum::<u64>(), 0);
}
