//! A headless Chromium driven over WebDriver, for the console's browser tests.
//!
//! [`Browser::start`] starts the Debian packages' `chromedriver` on a free port (in a process group of
//! its own, so the Chromium it launches goes with it), opens a session on `/usr/bin/chromium` with a
//! fresh profile directory, and hands back a fantoccini client. Dropping the [`Browser`] kills the whole
//! group; [`Browser::close`] ends the session politely first. Never a downloaded browser: without the
//! packages the tests fail and say what to install (`scripts/test` installs them).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use tokio::process::{Child, Command};

use super::within;

/// The browser and its driver, as the Debian packages `chromium` and `chromium-driver` install them.
pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Longest chromedriver may take to answer `/status`, and a session to open.
pub const DRIVER_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Default limit of the `wait_*` helpers.
pub const WAIT: Duration = Duration::from_secs(20);
/// Between two polls of the page.
const POLL: Duration = Duration::from_millis(50);

/// Chromium's flags: headless, no sandbox (CI runs as root), and nothing that reaches the network or
/// changes behind the test's back. A fresh `--user-data-dir` is added per browser.
pub const CHROMIUM_ARGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];

/// A running chromedriver with one session open on a headless Chromium.
pub struct Browser {
    pub client: Client,
    driver: Child,
    /// The process group of chromedriver and every Chromium process it started.
    pgid: u32,
    /// Whether chromedriver has exited and been waited for (its group id may then be reused).
    reaped: bool,
    /// The fresh profile (`--user-data-dir`) and chromedriver's log.
    dir: tempfile::TempDir,
}

/// A free TCP port on 127.0.0.1 (bound, then released for the child to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn require(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: the browser tests need the Debian package {package} \
         (apt-get install -y chromium chromium-driver; scripts/test installs them when missing)"
    );
}

impl Browser {
    /// Starts chromedriver and a headless Chromium whose viewport is `width` x `height` CSS pixels.
    pub async fn start(width: u32, height: u32) -> Browser {
        require(CHROMIUM, "chromium");
        require(CHROMEDRIVER, "chromium-driver");
        let dir = tempfile::Builder::new().prefix("eps-browser-").tempdir().unwrap();
        let profile = dir.path().join("profile");
        std::fs::create_dir_all(&profile).unwrap();

        // The port is free when chosen but may be taken before chromedriver binds it: try a few.
        let mut last_error = String::new();
        for attempt in 0..3 {
            let port = free_port();
            let log = dir.path().join(format!("chromedriver-{attempt}.log"));
            let mut cmd = Command::new(CHROMEDRIVER);
            cmd.arg(format!("--port={port}")).arg(format!("--log-path={}", log.display()));
            // Everything is on 127.0.0.1: no proxy from the environment of whoever runs the tests.
            for (key, _) in std::env::vars_os() {
                if key.to_string_lossy().to_ascii_lowercase().ends_with("_proxy") {
                    cmd.env_remove(&key);
                }
            }
            cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).kill_on_drop(true).process_group(0);
            let driver = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER}: {e}"));
            let pgid = driver.id().expect("chromedriver is running");
            let mut guard = DriverGuard { driver: Some(driver), pgid };
            let url = format!("http://127.0.0.1:{port}");
            match wait_ready(&url, guard.driver.as_mut().unwrap()).await {
                Ok(()) => {}
                Err(e) => {
                    last_error = format!("{e}; log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
                    continue; // the guard kills this chromedriver
                }
            }
            let client = within(DRIVER_START_TIMEOUT, "a WebDriver session on headless Chromium", async {
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(capabilities(&profile, width, height))
                    .connect(&url)
                    .await
            })
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "cannot open a session on {CHROMIUM} through chromedriver: {e}; chromedriver log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
            let driver = guard.driver.take().unwrap();
            let browser = Browser { client, driver, pgid, reaped: false, dir };
            browser.set_viewport(width, height).await;
            return browser;
        }
        panic!("chromedriver did not start: {last_error}");
    }

    /// The directory holding the profile and chromedriver's log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Resizes the window so that the viewport (what a screenshot shows) is exactly `width` x `height`
    /// CSS pixels, which at the device pixel ratio of 1 asserted here are as many image pixels. The
    /// window's outer size includes whatever frame the platform adds, so the size is set, the inner
    /// size measured and the difference added until they agree.
    pub async fn set_viewport(&self, width: u32, height: u32) {
        let (mut outer_w, mut outer_h) = (width, height);
        for _ in 0..5 {
            self.client.set_window_size(outer_w, outer_h).await.expect("set the window size");
            let v = self.eval("return [window.innerWidth, window.innerHeight, window.devicePixelRatio];").await;
            let (w, h) = (v[0].as_i64().unwrap(), v[1].as_i64().unwrap());
            assert_eq!(v[2].as_f64(), Some(1.0), "device pixel ratio: {v}");
            if (w, h) == (width as i64, height as i64) {
                return;
            }
            outer_w = (outer_w as i64 + width as i64 - w).max(1) as u32;
            outer_h = (outer_h as i64 + height as i64 - h).max(1) as u32;
        }
        let v = self.eval("return [window.innerWidth, window.innerHeight];").await;
        panic!("cannot make the viewport {width}x{height}: it stays {v} with the window at {outer_w}x{outer_h}");
    }

    /// Loads `url` in the window.
    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap_or_else(|e| panic!("opening {url}: {e}"));
    }

    /// Runs `script` (a function body: `return ...`) in the page and returns its value.
    pub async fn eval(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.unwrap_or_else(|e| panic!("running {script:?} in the page: {e}"))
    }

    /// Runs `script` with `args` (as `arguments[i]`) in the page.
    pub async fn eval_with(&self, script: &str, args: Vec<Value>) -> Value {
        self.client.execute(script, args).await.unwrap_or_else(|e| panic!("running {script:?} in the page: {e}"))
    }

    /// The element matching the CSS selector, waiting up to [`WAIT`] for it to exist.
    pub async fn find(&self, css: &str) -> Element {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.client.find(Locator::Css(css)).await {
                Ok(e) => return e,
                Err(e) if Instant::now() >= deadline => panic!("no element {css} after {WAIT:?}: {e}"),
                Err(_) => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// Clears the input matched by `css` and types `text` into it, then Enter (which submits its form
    /// as a user's Enter does, running the page's submit handler).
    pub async fn type_and_enter(&self, css: &str, text: &str) {
        let input = self.find(css).await;
        input.clear().await.unwrap_or_else(|e| panic!("clearing {css}: {e}"));
        input.send_keys(text).await.unwrap_or_else(|e| panic!("typing into {css}: {e}"));
        let enter: char = fantoccini::key::Key::Enter.into();
        input.send_keys(&enter.to_string()).await.unwrap_or_else(|e| panic!("pressing Enter in {css}: {e}"));
    }

    /// The rendered text (`innerText`, trimmed) of the first element matching `css`; `None` if none.
    pub async fn text(&self, css: &str) -> Option<String> {
        let v = self
            .eval_with(
                "const e = document.querySelector(arguments[0]); return e ? e.innerText.trim() : null;",
                vec![json!(css)],
            )
            .await;
        v.as_str().map(str::to_string)
    }

    /// The rendered texts of every element matching `css`, in document order.
    pub async fn texts(&self, css: &str) -> Vec<String> {
        let v = self
            .eval_with(
                "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.innerText.trim());",
                vec![json!(css)],
            )
            .await;
        serde_json::from_value(v).expect("a list of strings")
    }

    /// Whether the first element matching `css` exists and is rendered (not `display: none`,
    /// `hidden`, `visibility: hidden`, nor of zero size).
    pub async fn visible(&self, css: &str) -> bool {
        let v = self
            .eval_with(
                "const e = document.querySelector(arguments[0]);
                 if (!e || e.hidden) return false;
                 const s = getComputedStyle(e);
                 if (s.display === 'none' || s.visibility === 'hidden') return false;
                 const r = e.getBoundingClientRect();
                 return r.width > 0 && r.height > 0;",
                vec![json!(css)],
            )
            .await;
        v.as_bool().unwrap_or(false)
    }

    /// Polls `probe` until it gives `Some`, failing after `limit` with `what` and the last value probed
    /// (`describe` of it).
    pub async fn wait_until<T, F, Fut>(&self, limit: Duration, what: &str, mut probe: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, String>>,
    {
        let deadline = Instant::now() + limit;
        loop {
            match probe().await {
                Ok(v) => return v,
                Err(last) if Instant::now() >= deadline => {
                    panic!("timed out after {limit:?} waiting for {what}; last seen: {last}")
                }
                Err(_) => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// Waits until the text of `css` is exactly `want`.
    pub async fn wait_text(&self, css: &str, want: &str) {
        self.wait_text_within(WAIT, css, want).await
    }

    pub async fn wait_text_within(&self, limit: Duration, css: &str, want: &str) {
        self.wait_until(limit, &format!("{css} to show {want:?}"), || async {
            match self.text(css).await {
                Some(t) if t == want => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await
    }

    /// Waits until `css` is visible, then returns its text.
    pub async fn wait_visible(&self, css: &str) -> String {
        self.wait_until(WAIT, &format!("{css} to be visible"), || async {
            if self.visible(css).await {
                Ok(self.text(css).await.unwrap_or_default())
            } else {
                Err(format!("hidden or missing; text {:?}", self.text(css).await))
            }
        })
        .await
    }

    /// A PNG of the viewport, checked to be exactly `width` x `height` pixels.
    pub async fn screenshot(&self, width: u32, height: u32) -> Vec<u8> {
        let png = self.client.screenshot().await.expect("taking a screenshot");
        assert_eq!(png_size(&png), (width, height), "the screenshot's size in pixels");
        png
    }

    /// Ends the session (Chromium quits) and stops chromedriver.
    pub async fn close(mut self) {
        let client = self.client.clone();
        let _ = tokio::time::timeout(Duration::from_secs(15), client.close()).await;
        kill_group(self.pgid);
        let _ = self.driver.start_kill();
        if tokio::time::timeout(Duration::from_secs(10), self.driver.wait()).await.is_ok() {
            self.reaped = true;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.reaped {
            kill_group(self.pgid);
            let _ = self.driver.start_kill();
        }
    }
}

/// Kills chromedriver's process group if chromedriver did not become a [`Browser`].
struct DriverGuard {
    driver: Option<Child>,
    pgid: u32,
}

impl Drop for DriverGuard {
    fn drop(&mut self) {
        if let Some(mut driver) = self.driver.take() {
            kill_group(self.pgid);
            let _ = driver.start_kill();
        }
    }
}

/// SIGKILL to every process of the group `pgid` (chromedriver's, which its Chromium processes share).
fn kill_group(pgid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Waits until chromedriver at `url` answers `/status` with `ready: true`.
async fn wait_ready(url: &str, driver: &mut Child) -> Result<(), String> {
    let http = super::http();
    let deadline = Instant::now() + DRIVER_START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = driver.try_wait() {
            return Err(format!("chromedriver exited with {status}"));
        }
        if let Ok(response) = http.get(format!("{url}/status")).timeout(Duration::from_secs(2)).send().await {
            if let Ok(v) = response.json::<Value>().await {
                if v["value"]["ready"] == json!(true) {
                    return Ok(());
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("chromedriver at {url} not ready after {DRIVER_START_TIMEOUT:?}"));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The session's capabilities: Chromium from the Debian package, headless, with a fresh profile.
fn capabilities(profile: &Path, width: u32, height: u32) -> serde_json::Map<String, Value> {
    let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|s| s.to_string()).collect();
    args.push(format!("--user-data-dir={}", profile.display()));
    args.push(format!("--window-size={width},{height}"));
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
    });
    caps.as_object().unwrap().clone()
}

/// Width and height of a PNG image, from its IHDR chunk.
pub fn png_size(png: &[u8]) -> (u32, u32) {
    assert!(png.len() >= 24 && png.starts_with(b"\x89PNG\r\n\x1a\n") && &png[12..16] == b"IHDR", "not a PNG image");
    let w = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(png[20..24].try_into().unwrap());
    (w, h)
}

/// `target/console-screenshots` of this package (or of `CARGO_TARGET_DIR`), created.
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}
