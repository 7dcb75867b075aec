//! reference-sum: the ceiling reference for processing.
//!
//! What the issue defines as the ceiling: "plain serde_json parsing plus a per-user HashMap sum on one
//! core". Single-threaded, no tricks: read the whole JSON Lines file, parse each line with
//! `serde_json::from_slice` into a struct that borrows its strings from the buffer, and add +value
//! (add_revenue) or -value (subtract_revenue) to the user's f64 total in a std HashMap.
//!
//! Usage: reference-sum FILE
//! Prints: `events N users M invalid K`.

use std::collections::HashMap;

use serde::Deserialize;

/// One log line; other fields (`id`, `ts`) are ignored by serde.
#[derive(Deserialize)]
struct Event<'a> {
    #[serde(rename = "userId")]
    user_id: &'a str,
    name: &'a str,
    value: f64,
}

fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).ok_or_else(|| anyhow::anyhow!("usage: reference-sum FILE"))?;
    let data = std::fs::read(&path)?;

    let mut totals: HashMap<String, f64> = HashMap::new();
    let mut events: u64 = 0;
    let mut invalid: u64 = 0;
    for line in data.split(|&b| b == b'\n') {
        if line.is_empty() {
            continue;
        }
        let event: Event = match serde_json::from_slice(line) {
            Ok(event) => event,
            Err(_) => {
                invalid += 1;
                continue;
            }
        };
        let delta = match event.name {
            "add_revenue" => event.value,
            "subtract_revenue" => -event.value,
            _ => {
                invalid += 1;
                continue;
            }
        };
        // The usual idiom: look up by &str, allocate the owned key only for a new user.
        match totals.get_mut(event.user_id) {
            Some(total) => *total += delta,
            None => {
                totals.insert(event.user_id.to_owned(), delta);
            }
        }
        events += 1;
    }
    println!("events {events} users {} invalid {invalid}", totals.len());
    Ok(())
}
