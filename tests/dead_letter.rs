//! Log lines that are not events: skipped, counted, and written to the dead-letter file with the
//! segment and byte offset where they start — once, however often the processor runs.

#[macro_use]
mod common;

use std::collections::BTreeSet;

use common::*;
use rust_decimal::Decimal;
use serde_json::Value;

store_tests!(invalid_log_lines_are_skipped_counted_and_dead_lettered_with_their_segment_and_offset);

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
