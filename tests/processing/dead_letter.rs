//! Log lines that are not events: skipped, counted, and written to the dead-letter file with the
//! segment and byte offset where they start — once, however often the processor runs.

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::shim::Shim;
use common::*;
use rust_decimal::Decimal;
use serde_json::Value;

store_tests!(
    invalid_log_lines_are_skipped_counted_and_dead_lettered_with_their_segment_and_offset,
    a_dead_letter_write_refused_after_the_commit_is_written_once_when_the_disk_recovers
);

async fn invalid_log_lines_are_skipped_counted_and_dead_lettered_with_their_segment_and_offset(store: StoreKind) {
    let env = Env::new(store).await;
    let long_user = "x".repeat(300);
    // Two segments, so an offset inside the second differs from the global position.
    let first: Vec<String> = vec![
        event_line("dl-a", "add_revenue", "1"),
        r#"{"userId":"dl-c","name":"add_revenue","value":-4}"#.to_string(),
        event_line("dl-c", "add_revenue", "3"),
    ];
    let second: Vec<String> = vec![
        event_line("dl-a", "add_revenue", "10"),
        "this is not JSON {".to_string(),
        event_line("dl-b", "add_revenue", "2.5"),
        r#"{"userId":"dl-a","name":"refund_revenue","value":1}"#.to_string(),
        event_line(&long_user, "add_revenue", "1"),
        event_line("dl-a", "subtract_revenue", "0.5"),
    ];
    let bad: BTreeSet<&str> = [&first[1], &second[1], &second[3], &second[4]].into_iter().map(String::as_str).collect();

    let log_dir = env.log_dir();
    std::fs::create_dir_all(&log_dir).unwrap();
    let mut expected = BTreeSet::new(); // (segment, offset) of each bad line
    let mut base = 0u64;
    for lines in [&first, &second] {
        let name = segment_name(base);
        let mut text = Vec::new();
        for line in lines.iter() {
            if bad.contains(line.as_str()) {
                expected.insert((name.clone(), text.len() as u64));
            }
            text.extend_from_slice(line.as_bytes());
            text.push(b'\n');
        }
        std::fs::write(log_dir.join(&name), &text).unwrap();
        base += text.len() as u64;
    }
    assert_eq!(expected.len(), 4);

    let out = env.process(&[]).await;
    assert_eq!(applied_count(&out.stdout), 5, "{out}");
    assert!(out.stdout.contains(" 4 invalid lines"), "summary does not count the invalid lines: {out}");

    let dead_letter = env.data_dir.join("dead-letter.jsonl");
    let read_records = || -> Vec<Value> {
        std::fs::read_to_string(&dead_letter)
            .unwrap_or_else(|e| panic!("{}: {e}", dead_letter.display()))
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("dead-letter record {l:?}: {e}")))
            .collect()
    };
    let records = read_records();
    assert_eq!(records.len(), 4, "{records:#?}");
    let mut found = BTreeSet::new();
    for record in &records {
        let segment = record["segment"].as_str().unwrap_or_else(|| panic!("no segment: {record}"));
        let offset = record["offset"].as_u64().unwrap_or_else(|| panic!("no offset: {record}"));
        let error = record["error"].as_str().unwrap_or_else(|| panic!("no error: {record}"));
        assert!(!error.is_empty(), "{record}");
        // The offset is where the bad line starts inside that segment.
        let bytes = std::fs::read(log_dir.join(segment)).unwrap_or_else(|e| panic!("segment {segment}: {e}"));
        let offset_usize = offset as usize;
        assert!(
            offset_usize == 0 || bytes.get(offset_usize - 1) == Some(&b'\n'),
            "offset {offset} is not a line start: {record}"
        );
        let line = bytes[offset_usize..].split(|&b| b == b'\n').next().unwrap();
        assert!(
            bad.contains(std::str::from_utf8(line).unwrap()),
            "offset {offset} of {segment} is a valid line: {record}"
        );
        found.insert((segment.to_string(), offset));
    }
    assert_eq!(found, expected);

    let mut want = std::collections::BTreeMap::new();
    want.insert("dl-a".to_string(), Decimal::new(105, 1));
    want.insert("dl-b".to_string(), Decimal::new(25, 1));
    want.insert("dl-c".to_string(), Decimal::new(3, 0));
    assert_totals(&env.revenues().await, &want);

    // Reported once: a second run finds nothing new and leaves the dead-letter file alone.
    let again = env.process(&[]).await;
    assert!(again.stdout.contains("applied 0 events") && again.stdout.contains(" 0 invalid lines"), "{again}");
    assert_eq!(read_records().len(), 4);
    assert_totals(&env.revenues().await, &want);
}

/// The positions of the dead-letter file's whole records (a torn last line, had one been left, fails).
fn dead_letter_positions(path: &std::path::Path) -> Vec<u64> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("{}: {e}", path.display()),
    };
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| {
            let record: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("dead-letter record {l:?}: {e}"));
            record["position"].as_u64().unwrap_or_else(|| panic!("no position: {record}"))
        })
        .collect()
}

/// Issue 15, item 9: the commit records an invalid line, then the dead-letter file refuses the write
/// (a full disk: the shim lets half the bytes of a write or pwrite land, then ENOSPC). The line is in
/// the store; the file must get it exactly once when the disk recovers: from the next run, and from a
/// `--follow` processor that keeps running through the fault.
async fn a_dead_letter_write_refused_after_the_commit_is_written_once_when_the_disk_recovers(store: StoreKind) {
    let env = Env::new(store).await;
    let log_dir = env.log_dir();
    let first = vec![
        event_line("dlf-a", "add_revenue", "1"),
        "not an event {".to_string(),
        event_line("dlf-a", "add_revenue", "2"),
    ];
    write_log(&log_dir, &first, usize::MAX);
    let bad_at = (first[0].len() + 1) as u64;
    let dead_letter = env.data_dir.join("dead-letter.jsonl");
    let shim = Shim::new(env.tmp.path(), "dead-letter.jsonl");
    let mut args: Vec<String> = vec!["process".into(), "--data-dir".into(), env.data_dir.display().to_string()];
    args.extend(env.db.args());

    // 1. Every write to the dead-letter file fails: the events are committed, the line is recorded in
    //    the store only.
    shim.fail_pwrite(1_000_000);
    shim.fail_write(1_000_000);
    let out = run_eps(&args, &shim.env()).await;
    eprintln!("run with the dead-letter file refusing writes: {out}");
    assert_eq!(env.revenues().await.get("dlf-a").copied(), Some(Decimal::from(3)), "{out}");
    assert_eq!(dead_letter_positions(&dead_letter), Vec::<u64>::new(), "{out}");

    // 2. The disk recovers: the next run writes the record, once; a third run writes nothing more.
    shim.disarm();
    let out = env.process(&[]).await;
    assert_eq!(dead_letter_positions(&dead_letter), vec![bad_at], "the rerun did not write the missing record: {out}");
    let out = env.process(&[]).await;
    assert_eq!(dead_letter_positions(&dead_letter), vec![bad_at], "a rerun wrote a record twice: {out}");

    // 3. A --follow processor meets the same fault and keeps applying; once the fault clears, the
    //    same processor writes the record exactly once.
    shim.fail_pwrite(1_000_000);
    shim.fail_write(1_000_000);
    let mut follow_args = args.clone();
    follow_args.push("--follow".into());
    let mut follower = ChildGuard::spawn(&follow_args, &shim.env(), env.tmp.path());
    let base: u64 = segments(&log_dir).iter().map(|(_, p)| std::fs::metadata(p).unwrap().len()).sum();
    let second = ["another bad line".to_string(), event_line("dlf-b", "add_revenue", "5")];
    let mut text = second.join("\n");
    text.push('\n');
    std::fs::write(log_dir.join(segment_name(base)), text).unwrap();
    within(Duration::from_secs(30), "the follower to apply the new event", async {
        while env.revenues().await.get("dlf-b").copied() != Some(Decimal::from(5)) {
            assert!(follower.child.try_wait().unwrap().is_none(), "the follower exited: {}", follower.stderr());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(dead_letter_positions(&dead_letter), vec![bad_at], "the fault did not hold the write back");
    assert!(follower.child.try_wait().unwrap().is_none(), "the follower exited on the fault: {}", follower.stderr());
    shim.disarm();
    within(Duration::from_secs(60), "the follower to write the missing record", async {
        while dead_letter_positions(&dead_letter) != vec![bad_at, base] {
            assert!(follower.child.try_wait().unwrap().is_none(), "the follower exited: {}", follower.stderr());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    sigterm(follower.child.id().unwrap()).await;
    let status = within(Duration::from_secs(20), "the follower to stop", follower.child.wait()).await.unwrap();
    assert!(status.success(), "{status}: {}", follower.stderr());
    assert_eq!(dead_letter_positions(&dead_letter), vec![bad_at, base], "{}", follower.stderr());
    assert!(follower.stderr().contains("cannot write the dead-letter file"), "the failure was not logged");
}
