//! Runs: ids per line, the bound on requests in flight, exact values, input errors and odd lines, the
//! resume command, a stop.

use super::*;

#[tokio::test]
async fn sends_each_valid_line_once_with_run_and_line_ids() {
    let rec = Recorder::new(|_| accepted());
    let url = serve(&rec).await;
    let file = input(&[
        r#"{"userId":"u1","name":"add_revenue","value":100}"#,
        "",
        r#"{"userId":"u2","name":"refund","value":1}"#,
        "   \t",
        r#"{"userId":"u3","name":"subtract_revenue","value":50,"id":"mine-7"}"#,
        r#"{"userId":"u4","name":"add_revenue","value":2}"#,
    ]);
    let (summary, reports) = run_fast(options(&file, &format!("{url}/"))).await;

    let expected =
        ClientSummary { lines: 4, sent: 3, accepted: 3, invalid: 1, elapsed: summary.elapsed, ..Default::default() };
    assert_eq!(summary, expected);
    assert!(!summary.ok(), "an invalid line makes the run not ok");
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert!(reports[0].starts_with("line 3: invalid event: "), "{reports:?}");

    let received = rec.received();
    assert_eq!(received.len(), 3);
    let run = run_id_of(&received.iter().find(|r| r.id != "mine-7").unwrap().id).to_owned();
    let ids: HashSet<String> = received.iter().map(|r| r.id.clone()).collect();
    let want: HashSet<String> = [format!("{run}-1"), "mine-7".to_owned(), format!("{run}-6")].into();
    assert_eq!(ids, want);
    for r in &received {
        assert_eq!(r.auth.as_deref(), Some("secret-token"));
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
    }
    let first = received.iter().find(|r| r.id == format!("{run}-1")).unwrap();
    assert_eq!(first.body, format!(r#"{{"userId":"u1","name":"add_revenue","value":100,"id":"{run}-1"}}"#));

    // A second run (no checkpoint kept here) sends the same ids: the producer is the file's
    // fingerprint, so a server recognises the events it has.
    let (again, _) = run_fast(options(&file, &url)).await;
    assert_eq!(again.accepted, 3);
    let received = rec.received();
    let second_run = run_id_of(&received[3..].iter().find(|r| r.id != "mine-7").unwrap().id).to_owned();
    assert_eq!(second_run, run);
    assert_eq!(run, state::hex64(state::fingerprint(&std::fs::read(file.path()).unwrap())));
    // --new-run draws another.
    let (third, _) = run_fast(ClientOptions { new_run: true, ..options(&file, &url) }).await;
    assert_eq!(third.accepted, 3);
    let received = rec.received();
    let third_run = run_id_of(&received[6..].iter().find(|r| r.id != "mine-7").unwrap().id).to_owned();
    assert_ne!(third_run, run);
}

#[tokio::test]
async fn never_more_requests_in_flight_than_the_concurrency() {
    let rec = Recorder::new(|_| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Json(serde_json::json!({"message": "Event received"})).into_response()
        })
    });
    let url = serve(&rec).await;
    let file = events(60);
    let (summary, _) = run_fast(ClientOptions { concurrency: 4, ..options(&file, &url) }).await;
    assert!(summary.ok());
    assert_eq!(summary.accepted, 60);
    let max = rec.max_in_flight.load(Ordering::SeqCst);
    assert!(max <= 4, "{max} requests in flight");
    assert!(max >= 2, "requests should overlap, saw at most {max}");
}

#[tokio::test]
async fn values_are_sent_exactly() {
    let rec = Recorder::new(|_| accepted());
    let url = serve(&rec).await;
    let file = input(&[
        r#"{"userId":"a","name":"add_revenue","value":0.1}"#,
        r#"{"userId":"b","name":"add_revenue","value":1e3}"#,
        r#"{"userId":"c","name":"subtract_revenue","value":1.50}"#,
        r#"{"userId":"d\"e","name":"add_revenue","value":0.000,"id":"x"}"#,
        r#"{"userId":"f","name":"add_revenue","value":12345678901234567890.12345678}"#,
    ]);
    let (summary, _) = run_fast(options(&file, &url)).await;
    assert!(summary.ok());
    let received = rec.received();
    let run = run_id_of(&received.iter().find(|r| r.id != "x").unwrap().id).to_owned();
    let bodies: HashSet<String> = received.into_iter().map(|r| r.body).collect();
    let want: HashSet<String> = [
        format!(r#"{{"userId":"a","name":"add_revenue","value":0.1,"id":"{run}-1"}}"#),
        format!(r#"{{"userId":"b","name":"add_revenue","value":1000,"id":"{run}-2"}}"#),
        format!(r#"{{"userId":"c","name":"subtract_revenue","value":1.5,"id":"{run}-3"}}"#),
        r#"{"userId":"d\"e","name":"add_revenue","value":0,"id":"x"}"#.to_owned(),
        format!(r#"{{"userId":"f","name":"add_revenue","value":12345678901234567890.12345678,"id":"{run}-5"}}"#),
    ]
    .into();
    assert_eq!(bodies, want);
}

#[tokio::test]
async fn a_missing_file_is_an_error_naming_it() {
    let opts = ClientOptions {
        file: PathBuf::from("/nonexistent/eps-events.jsonl"),
        progress: Progress::Quiet,
        ..Default::default()
    };
    let err = run(opts).await.unwrap_err();
    assert!(format!("{err:#}").contains("/nonexistent/eps-events.jsonl"), "{err:#}");
}

#[tokio::test]
async fn a_bad_url_is_an_error() {
    let file = events(1);
    let err = run(ClientOptions { urls: vec!["ftp://x".into()], ..options(&file, "") }).await.unwrap_err();
    assert!(format!("{err:#}").contains("ftp://x"), "{err:#}");
}

#[tokio::test]
async fn an_overlong_line_and_a_bom_are_handled() {
    let rec = Recorder::new(|_| accepted());
    let url = serve(&rec).await;
    let long = format!(r#"{{"userId":"{}","name":"add_revenue","value":1}}"#, "a".repeat(MAX_LINE_BYTES));
    let first = "\u{feff}{\"userId\":\"u\",\"name\":\"add_revenue\",\"value\":1}";
    let file = input(&[first, &long]);
    let (summary, reports) = run_fast(options(&file, &url)).await;
    assert_eq!((summary.lines, summary.accepted, summary.invalid), (2, 1, 1));
    assert_eq!(reports, vec![format!("line 2: line is longer than {MAX_LINE_BYTES} bytes")]);
}

// -----------------------------------------------------------------------------------------------
// Several servers

#[test]
fn the_resume_command_is_the_command_line_less_the_one_time_flags() {
    let args: Vec<std::ffi::OsString> = [
        "eps",
        "client",
        "my events.jsonl",
        "--new-run",
        "--url",
        "http://a:1,http://b:2",
        "--from-start=true",
        "--token",
        "it's",
    ]
    .iter()
    .map(Into::into)
    .collect();
    assert_eq!(resume_command(&args), r#"eps client 'my events.jsonl' --url http://a:1,http://b:2 --token 'it'\''s'"#);
}

#[tokio::test]
async fn a_stop_ends_the_run_without_sending_the_rest_and_without_retrying() {
    // Every request fails (503): without the stop the run would retry each for a long time.
    let rec = Recorder::new(|_| {
        Box::pin(async {
            (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"error": "busy"}))).into_response()
        })
    });
    let url = serve(&rec).await;
    let file = events(1000);
    let opts = ClientOptions { max_attempts: 1000, concurrency: 2, ..options(&file, &url) };
    let capture = Arc::new(Mutex::new(Vec::new()));
    let tuning = Tuning { capture: Some(Arc::clone(&capture)), ..Tuning::default() };
    let stop = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Stopped::Signal(2)
    };
    let summary = within_secs(60, run_with(opts, tuning, stop)).await.unwrap();
    assert_eq!(summary.stopped, Some(Stopped::Signal(2)));
    assert_eq!(summary.accepted + summary.failed, 0);
    assert_eq!(summary.interrupted, summary.sent);
    assert!(summary.sent <= 2, "no request after the stop: {summary}");
    assert!(!summary.ok());
    assert_eq!(Stopped::Signal(2).exit_code(), 130);
    assert_eq!(Stopped::Signal(15).exit_code(), 143);
}

#[tokio::test]
async fn urls_are_checked_and_blank_ones_ignored() {
    let file = events(1);
    let err = run(ClientOptions { urls: vec![" ".into(), String::new()], ..options(&file, "") }).await.unwrap_err();
    assert!(format!("{err:#}").contains("no server URL"), "{err:#}");
    let err = run(ClientOptions { urls: vec!["http://127.0.0.1:1".into(), "ftp://y".into()], ..options(&file, "") })
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("ftp://y"), "{err:#}");
}
