//! The console (`GET /`) in a real browser: headless Chromium from the Debian packages, driven over
//! WebDriver (tests/common/browser.rs), against a real `eps server` with a fresh data directory.
//!
//! The happy path enters the token, sends known events, runs `eps process`, and checks the exact numbers
//! the page shows (counters, total, top users, a searched user), then saves screenshots at 1280x800 and
//! 390x844 to target/console-screenshots/ (and to docs/console.png with `EPS_UPDATE_SCREENSHOTS=1`).
//! On the way it checks the processor tile (no processor, lagging, caught up) and that accepted =
//! applied + waiting in the log. The others: a wrong token (the page says so and shows no data); the
//! error and p99 panels and the range buttons; the greyed figures when the server is gone.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::browser::{screenshot_dir, Browser};
use common::*;
use rust_decimal::Decimal;
use serde_json::json;

/// Longest one whole test may take.
const TEST_LIMIT: Duration = Duration::from_secs(60);

/// The token's input: the input of `#token-form`, whatever its id.
const TOKEN_INPUT: &str = "#token-form input";

/// The page's numeric tiles.
const STATS: &[&str] =
    &["#accepted-total", "#applied-total", "#users", "#total-revenue", "#lag-events", "#log-segments"];

const USERS: [&str; 5] = ["alice", "bob", "carol", "dave", "zoë"];

/// 30 events over 5 users: (user, name, value as JSON number text). Decimal values, some subtractions,
/// and per-user totals that differ (so the top users' order is defined).
fn events() -> Vec<(String, &'static str, String)> {
    (0..30usize)
        .map(|i| {
            let user = USERS[i % 5];
            // Per user: a weight so the totals spread apart, and cents that do not all round off.
            let whole = (i % 5 + 1) * 10 + (i * 7) % 9;
            let cents = (i * 37) % 100;
            let (name, value) = if i % 6 == 5 {
                ("subtract_revenue", format!("{}.{:02}", (i * 3) % 7, cents))
            } else if i % 10 == 3 {
                ("add_revenue", "0.1".to_string())
            } else {
                ("add_revenue", format!("{whole}.{cents:02}"))
            };
            (user.to_string(), name, value)
        })
        .collect()
}

fn totals(events: &[(String, &'static str, String)]) -> BTreeMap<String, Decimal> {
    expected_totals(events.iter().map(|(u, n, v)| (u.as_str(), *n, v.as_str())))
}

/// `POST /events` with these events as one JSON Lines batch; asserts all are accepted.
async fn post_batch(http: &reqwest::Client, url: &str, events: &[(String, &'static str, String)]) {
    let body: String = events.iter().map(|(u, n, v)| event_line(u, n, v) + "\n").collect();
    let response = http
        .post(format!("{url}/events"))
        .header("Authorization", TOKEN)
        .header("Content-Type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .expect("POST /events");
    let status = response.status().as_u16();
    let answer: serde_json::Value = response.json().await.expect("POST /events answers JSON");
    assert_eq!(status, 200, "POST /events: {answer}");
    assert_eq!(answer["accepted"], json!(events.len()), "POST /events: {answer}");
    assert_eq!(answer["rejected"], json!(0), "POST /events: {answer}");
}

/// Saves `png` as `name` in target/console-screenshots/; returns the path.
fn save(name: &str, png: &[u8]) -> std::path::PathBuf {
    let path = screenshot_dir().join(name);
    std::fs::write(&path, png).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_shows_exact_totals_top_users_and_search() {
    within(TEST_LIMIT, "the console's happy path", happy_path()).await
}

async fn happy_path() {
    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server().await;
    let http = http();
    let browser = Browser::start(1280, 800).await;

    browser.goto(&format!("{}/", server.url)).await;
    browser.type_and_enter(TOKEN_INPUT, TOKEN).await;
    // Authenticated on an empty system: the counters are there, at zero; no processor has run.
    browser.wait_text("#accepted-total", "0").await;
    browser.wait_text("#connection", "live").await;
    browser.wait_text("#processor-state", "no processor has run").await;
    assert!(!browser.visible("#auth-error").await, "#auth-error shown after the right token");

    let events = events();
    let want = totals(&events);
    let mut by_revenue: Vec<(String, Decimal)> = want.iter().map(|(u, d)| (u.clone(), *d)).collect();
    by_revenue.sort_by_key(|(_, d)| std::cmp::Reverse(*d));
    assert!(by_revenue.windows(2).all(|w| w[0].1 > w[1].1), "the test's totals tie: {by_revenue:?}");
    let total: Decimal = want.values().sum();

    // Six rounds of five events a little apart (so the chart draws a line over a few seconds rather than
    // one spike), alternately as a batch on POST /events and one by one on the seed's POST /liveEvent;
    // the processor runs once half-way.
    for (round, chunk) in events.chunks(5).enumerate() {
        if round > 0 {
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        // One refused request a round, for the errors panel of the screenshot.
        assert_eq!(post_event(&http, &server.url, "{not json").await.0, 400);
        if round % 2 == 0 {
            post_batch(&http, &server.url, chunk).await;
        } else {
            for (user, name, value) in chunk {
                let (status, answer) = post_event(&http, &server.url, &event_line(user, name, value)).await;
                assert_eq!(status, 200, "POST /liveEvent: {answer}");
            }
        }
        if round == 2 {
            let out = env.process(&[]).await;
            assert_eq!(applied_count(&out.stdout), 15, "{out}");
        }
    }
    // One basis: accepted (all time) = applied + waiting in the log.
    browser.wait_text("#accepted-total", &events.len().to_string()).await;
    browser.wait_text("#applied-total", "15").await;
    browser.wait_text("#lag-events", "15").await;
    assert!(!browser.visible("#accepted-approx").await, "a 15-event lag is counted, not estimated");
    // Events wait and the last commit is older than 5 s: lagging, in the warning colour.
    browser.wait_text("#processor-state", "lagging: 15 events").await;
    let detail = browser.text("#processor-detail").await.unwrap_or_default();
    assert!(detail.starts_with("last commit ") && detail.ends_with(" s ago"), "#processor-detail: {detail:?}");
    let tile = browser.eval("return document.querySelector('#processor-tile').dataset.state;").await;
    assert_eq!(tile, json!("lagging"));

    // The live tail shows the events as they arrive.
    let tail = browser
        .wait_until(common::browser::WAIT, "the live tail to show a sent user", || async {
            let items = browser.texts("ol#tail li").await;
            if items.iter().any(|t| USERS.iter().any(|u| t.contains(u))) {
                Ok(items)
            } else {
                Err(format!("{items:?}"))
            }
        })
        .await;
    assert!(!tail.is_empty());

    let out = env.process(&[]).await;
    assert_eq!(applied_count(&out.stdout), 15, "{out}");

    browser.wait_text("#applied-total", &events.len().to_string()).await;
    browser.wait_text("#lag-events", "0").await;
    browser.wait_text("#accepted-total", &events.len().to_string()).await;
    browser
        .wait_until(common::browser::WAIT, "the processor tile after the run", || async {
            let text = browser.text("#processor-state").await.unwrap_or_default();
            if text == "applying" || text == "idle, caught up" {
                Ok(())
            } else {
                Err(text)
            }
        })
        .await;
    browser.wait_text("#users", &want.len().to_string()).await;
    browser.wait_text("#total-revenue", &total.normalize().to_string()).await;
    let want_rows: Vec<(String, String)> =
        by_revenue.iter().map(|(u, d)| (u.clone(), d.normalize().to_string())).collect();
    browser
        .wait_until(common::browser::WAIT, "the top users table", || async {
            let rows = top_users(&browser).await;
            if rows == want_rows {
                Ok(())
            } else {
                Err(format!("{rows:?}, want {want_rows:?}"))
            }
        })
        .await;
    let segments = browser.text("#log-segments").await.unwrap_or_default();
    assert!(
        !segments.is_empty() && segments.chars().all(|c| c.is_ascii_digit()) && segments != "0",
        "#log-segments shows {segments:?}"
    );

    // Search: a known user (non-ASCII, so the page must encode it), then an unknown one.
    let (user, revenue) = (USERS[4], want[USERS[4]].normalize().to_string());
    search(&browser, user, &revenue).await;
    search(&browser, "nobody-here", "no events").await;
    // And another known one (the result follows each search).
    let (user, revenue) = by_revenue.last().map(|(u, d)| (u, d.normalize().to_string())).unwrap();
    assert_ne!(user, USERS[4]);
    search(&browser, user, &revenue).await;

    // Screenshots: desktop, then phone width without horizontal overflow; no focus ring or caret.
    // From the top of the page (the search box scrolled it).
    browser.eval("document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0); return null;").await;
    settle(&browser).await;
    let desktop = browser.screenshot(1280, 800).await;
    let desktop_path = save("console-1280x800.png", &desktop);
    if std::env::var("EPS_UPDATE_SCREENSHOTS").as_deref() == Ok("1") {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs").join("console.png");
        std::fs::copy(&desktop_path, &docs).unwrap_or_else(|e| panic!("copying to {}: {e}", docs.display()));
        eprintln!("updated {}", docs.display());
    }

    browser.set_viewport(390, 844).await;
    settle(&browser).await;
    let width = browser.eval("return document.documentElement.scrollWidth;").await;
    assert!(width.as_u64().is_some_and(|w| w <= 390), "horizontal overflow at 390 px: scrollWidth {width}");
    // The numbers are still the same at that width.
    browser.wait_text("#total-revenue", &total.normalize().to_string()).await;
    let phone = browser.screenshot(390, 844).await;
    save("console-390x844.png", &phone);

    browser.close().await;
    drop(server);
}

/// Searches `user` and waits for `#search-result` to give `want`: the revenue string, or "no events".
/// The result's value is its `.revenue` (or `.none`) element when it has one (the page shows
/// "USER: VALUE" with the value in its own span), else its whole text; either way, exactly `want`.
async fn search(browser: &Browser, user: &str, want: &str) {
    browser.type_and_enter("#search-input", user).await;
    browser
        .wait_until(common::browser::WAIT, &format!("#search-result to give {want:?} for {user:?}"), || async {
            let v = browser
                .eval(
                    "const r = document.querySelector('#search-result');
                     if (!r) return [null, null];
                     const v = r.querySelector('.revenue, .none');
                     return [r.innerText.trim(), v ? v.innerText.trim() : r.innerText.trim()];",
                )
                .await;
            let whole = v[0].as_str().unwrap_or_default();
            match v[1].as_str() {
                Some(value) if value == want => {
                    assert!(
                        whole == want || whole == format!("{user}: {want}"),
                        "#search-result for {user:?} reads {whole:?}"
                    );
                    Ok(())
                }
                _ => Err(format!("{v}")),
            }
        })
        .await
}

/// The top users table as (user, revenue) rows.
async fn top_users(browser: &Browser) -> Vec<(String, String)> {
    let v = browser
        .eval(
            "return Array.from(document.querySelectorAll('table#top-users tbody tr')).map(tr => {
                 const u = tr.querySelector('td.user'), r = tr.querySelector('td.revenue');
                 return [u ? u.innerText.trim() : null, r ? r.innerText.trim() : null];
             });",
        )
        .await;
    let rows: Vec<(Option<String>, Option<String>)> = serde_json::from_value(v).expect("rows of two cells");
    rows.into_iter().map(|(u, r)| (u.unwrap_or_default(), r.unwrap_or_default())).collect()
}

/// Waits for two animation frames, so a resize's re-layout and redraw are on screen.
async fn settle(browser: &Browser) {
    browser
        .client
        .execute_async(
            "const done = arguments[arguments.length - 1];
             requestAnimationFrame(() => requestAnimationFrame(() => done(true)));",
            vec![],
        )
        .await
        .expect("waiting for animation frames");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_wrong_token_shows_the_error_and_no_data() {
    within(TEST_LIMIT, "the console with a wrong token", wrong_token()).await
}

async fn wrong_token() {
    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server().await;
    let http = http();
    // Data the page must not show without the right token.
    let events = events();
    post_batch(&http, &server.url, &events[..3]).await;
    env.process(&[]).await;

    let browser = Browser::start(1280, 800).await;
    browser.goto(&format!("{}/", server.url)).await;
    browser.type_and_enter(TOKEN_INPUT, "wrong").await;
    let message = browser.wait_visible("#auth-error").await;
    let lower = message.to_lowercase();
    assert!(lower.contains("401") || lower.contains("token"), "#auth-error says {message:?}");

    // No data, now and a moment later (nothing arrives behind the error).
    for round in 0..2 {
        if round == 1 {
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
        for css in STATS {
            let text = browser.text(css).await.unwrap_or_default();
            assert!(!text.chars().any(|c| c.is_ascii_digit()), "{css} shows {text:?} with a wrong token");
        }
        let rows = browser.texts("table#top-users tbody tr").await;
        assert!(rows.is_empty(), "top users shown with a wrong token: {rows:?}");
        let tail = browser.texts("ol#tail li").await;
        assert!(tail.is_empty(), "live tail shown with a wrong token: {tail:?}");
        assert!(browser.visible("#auth-error").await, "#auth-error went away by itself");
        let connection = browser.text("#connection").await.unwrap_or_default();
        assert_ne!(connection, "live", "#connection with a wrong token");
    }

    // The right token then works, and the error goes away.
    browser.type_and_enter(TOKEN_INPUT, TOKEN).await;
    browser.wait_text("#accepted-total", "3").await;
    browser.wait_text("#applied-total", "3").await;
    browser
        .wait_until(common::browser::WAIT, "#auth-error to be hidden", || async {
            if browser.visible("#auth-error").await {
                Err(browser.text("#auth-error").await.unwrap_or_default())
            } else {
                Ok(())
            }
        })
        .await;

    browser.close().await;
    drop(server);
}

/// Text of `css` (empty when missing).
async fn text_of(browser: &Browser, css: &str) -> String {
    browser.text(css).await.unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_shows_the_error_rate_the_p99_and_switches_the_range() {
    within(TEST_LIMIT, "the console's panels and ranges", panels_and_ranges()).await
}

async fn panels_and_ranges() {
    let env = Env::new(StoreKind::Sqlite).await;
    let server = env.server().await;
    let browser = Browser::start(1280, 800).await;
    browser.goto(&format!("{}/", server.url)).await;
    browser.type_and_enter(TOKEN_INPUT, TOKEN).await;
    browser.wait_text("#connection", "live").await;

    // Bad JSON (400) and good events, a few a second, until the page has shown both panels' figures.
    let url = server.url.clone();
    let traffic = tokio::spawn(async move {
        let http = common::http();
        for i in 0.. {
            post_event(&http, &url, "{not json").await;
            post_event(&http, &url, &event_line(&format!("p{}", i % 3), "add_revenue", "1")).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    browser
        .wait_until(common::browser::WAIT, "a non-zero 4xx rate and a p99", || async {
            let (http_4xx, p99) = (text_of(&browser, "#rate-4xx").await, text_of(&browser, "#p99-latency").await);
            let positive = |t: &str| t.parse::<f64>().is_ok_and(|v| v > 0.0);
            if positive(&http_4xx) && positive(&p99) {
                Ok(())
            } else {
                Err(format!("4xx/s {http_4xx:?}, p99 {p99:?}"))
            }
        })
        .await;
    assert_eq!(text_of(&browser, "#rate-5xx").await, "0");

    // The range: what the page asks for comes back in the summary and the chart says it.
    assert_eq!(text_of(&browser, "#range-label").await, "last 5 minutes");
    for (button, label) in [("#range-1h", "last hour, per 10 s"), ("#range-24h", "last 24 hours, per minute")] {
        browser.find(button).await.click().await.expect("clicking a range");
        browser.wait_text("#range-label", label).await;
        let pressed =
            browser.eval(&format!("return document.querySelector('{button}').getAttribute('aria-pressed');")).await;
        assert_eq!(pressed, json!("true"), "{button}");
        let aria = browser.eval("return document.querySelector('#rate-chart').getAttribute('aria-label');").await;
        assert!(aria.as_str().unwrap_or_default().contains(label), "#rate-chart reads {aria}");
        browser.wait_text("#connection", "live").await;
    }
    browser.find("#range-5m").await.click().await.expect("clicking a range");
    browser.wait_text("#range-label", "last 5 minutes").await;
    traffic.abort();
    browser.close().await;
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_greys_its_figures_when_the_server_is_gone_and_recovers() {
    within(TEST_LIMIT, "the console without its server", server_gone()).await
}

/// Whether the page shows its figures greyed (the stale state).
async fn is_stale(browser: &Browser) -> bool {
    browser.eval("return document.body.classList.contains('stale');").await == json!(true)
}

async fn server_gone() {
    let env = Env::new(StoreKind::Sqlite).await;
    let mut server = env.server().await;
    let http = http();
    post_batch(&http, &server.url, &events()[..3]).await;
    let browser = Browser::start(1280, 800).await;
    browser.goto(&format!("{}/", server.url)).await;
    browser.type_and_enter(TOKEN_INPUT, TOKEN).await;
    browser.wait_text("#accepted-total", "3").await;
    browser.wait_text("#connection", "live").await;
    assert!(!is_stale(&browser).await && !browser.visible("#stale").await, "stale while live");

    server.kill().await;
    browser
        .wait_until(common::browser::WAIT, "the figures greyed", || async {
            if is_stale(&browser).await {
                Ok(())
            } else {
                Err(text_of(&browser, "#updated").await)
            }
        })
        .await;
    assert!(browser.visible("#stale").await);
    let updated = text_of(&browser, "#updated").await;
    let time = updated.strip_prefix("last update ").unwrap_or_else(|| panic!("#updated reads {updated:?}"));
    let digits: Vec<&str> = time.split(':').collect();
    assert!(
        digits.len() == 3 && digits.iter().all(|d| d.len() == 2 && d.chars().all(|c| c.is_ascii_digit())),
        "#updated reads {updated:?}"
    );
    // The last figures stay, greyed.
    assert_eq!(text_of(&browser, "#accepted-total").await, "3");

    // The server comes back on the same address: the page reconnects and is normal again.
    let mut args: Vec<String> =
        vec!["server".into(), "--listen".into(), format!("127.0.0.1:{}", server.port), "--data-dir".into()];
    args.push(env.data_dir.display().to_string());
    args.extend(env.db.args());
    let again = ServerProc::start(&args, &[], env.tmp.path()).await;
    browser
        .wait_until(Duration::from_secs(30), "the figures normal again", || async {
            if !is_stale(&browser).await {
                Ok(())
            } else {
                Err(text_of(&browser, "#updated").await)
            }
        })
        .await;
    assert!(text_of(&browser, "#updated").await.starts_with("updated "));
    assert!(!browser.visible("#stale").await);
    browser.close().await;
    drop(again);
}
