//! A PostgreSQL cluster of one test alone, made by `scripts/pg-throwaway start EXTRA` (never the machine's
//! 5432), for tests that stop, reconfigure or cut it; stopped and removed when dropped.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::within;

pub fn pg_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join("pg-throwaway")
}

pub struct PgCluster {
    /// The cluster's directory (also its Unix socket's).
    pub dir: String,
    /// On 127.0.0.1, as `postgres`.
    pub url: String,
    pub port: u16,
}

impl PgCluster {
    pub async fn start(extra: &[&str]) -> PgCluster {
        let mut cmd = tokio::process::Command::new(pg_script());
        cmd.arg("start").args(extra).kill_on_drop(true);
        // May install PostgreSQL with apt-get the first time on a bare machine.
        let out = within(Duration::from_secs(600), "scripts/pg-throwaway start", cmd.output())
            .await
            .expect("cannot run scripts/pg-throwaway");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let var = |name: &str| -> Option<String> {
            stdout
                .lines()
                .find_map(|l| Some(l.strip_prefix(&format!("export {name}="))?.trim().trim_matches('\'').to_string()))
        };
        let (Some(url), Some(dir)) = (var("EPS_TEST_PG_URL"), var("EPS_TEST_PG_DIR")) else {
            panic!("scripts/pg-throwaway start {extra:?} failed ({}):\n{stdout}\n{stderr}", out.status);
        };
        let port = url.rsplit_once(':').and_then(|(_, rest)| rest.split('/').next()?.parse().ok()).unwrap();
        let cluster = PgCluster { dir, url, port };
        assert!(out.status.success(), "scripts/pg-throwaway start: {}\n{stderr}", out.status);
        assert_ne!(cluster.port, 5432, "the test's cluster must not be on 5432");
        eprintln!("own PostgreSQL cluster at {} in {}", cluster.url, cluster.dir);
        cluster
    }

    /// `scripts/pg-throwaway VERB DIR EXTRA` (pause, resume); how long it took.
    pub async fn script(&self, verb: &str, extra: &[&str]) -> Duration {
        let started = Instant::now();
        let mut cmd = tokio::process::Command::new(pg_script());
        cmd.args([verb, &self.dir]).args(extra).kill_on_drop(true);
        let out = within(Duration::from_secs(60), &format!("scripts/pg-throwaway {verb}"), cmd.output())
            .await
            .expect("cannot run scripts/pg-throwaway");
        assert!(
            out.status.success(),
            "scripts/pg-throwaway {verb} {}: {}\n{}",
            self.dir,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        started.elapsed()
    }

    pub async fn connect(&self) -> tokio_postgres::Client {
        let (client, connection) = within(
            Duration::from_secs(20),
            "connecting to the test's PostgreSQL",
            tokio_postgres::connect(&self.url, tokio_postgres::NoTls),
        )
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.url));
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let status = std::process::Command::new(pg_script()).args(["stop", &self.dir]).status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("could not stop the test's PostgreSQL cluster in {}: {status:?}", self.dir);
        }
    }
}
