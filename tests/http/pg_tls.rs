//! PostgreSQL over TLS (issue 18, item 1): clusters of the test's own, one with `ssl = on` and a
//! certificate for `localhost` signed by a CA the test makes, one without TLS, reached by the real
//! binary with each `sslmode`.
//!
//! The TLS cluster refuses the role `tls_only` any connection without TLS (`hostnossl ... reject`), so a
//! successful `eps status` as that role proves the connection was encrypted.

use crate::common;

use std::path::Path;

use common::pg::PgCluster;
use common::tls::TestCa;
use common::{args, run_eps, Output};

impl PgCluster {
    /// Runs SQL as `postgres` over the cluster's Unix socket (no TLS involved).
    async fn sql(&self, sql: &str) {
        let url = format!("host={} port={} user=postgres dbname=postgres", self.dir, self.port);
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        client.batch_execute(sql).await.unwrap();
    }

    fn url(&self, user: &str, host: &str, query: &str) -> String {
        format!("postgres://{user}@{host}:{}/postgres?{query}", self.port)
    }
}

async fn status(url: &str) -> Output {
    let data = tempfile::tempdir().unwrap();
    run_eps(&args(&["status", "--database-url", url, "--data-dir", data.path().to_str().unwrap()]), &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sslmode_against_a_tls_server() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new(tmp.path(), "pg", &["localhost"]);
    let other = TestCa::new(tmp.path(), "other", &["localhost"]);
    let pg = PgCluster::start(&["--ssl", ca.cert.to_str().unwrap(), ca.key.to_str().unwrap()]).await;
    // First matching line wins: tls_only never gets in without TLS.
    let hba = Path::new(&pg.dir).join("data").join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(&hba, format!("hostnossl all tls_only all reject\n{rules}")).unwrap();
    pg.sql("CREATE ROLE tls_only LOGIN SUPERUSER; SELECT pg_reload_conf();").await;
    let root = format!("sslrootcert={}", ca.ca_cert.display());
    let wrong_root = format!("sslrootcert={}", other.ca_cert.display());

    // Proof that the role's rule holds: without TLS it is refused (by the server, a login error).
    let out = status(&pg.url("tls_only", "127.0.0.1", "sslmode=disable")).await;
    assert_ne!(out.code(), Some(0), "sslmode=disable must not use TLS:\n{out}");
    assert!(out.stderr.contains("pg_hba.conf"), "{out}");

    let accepted = [
        // libpq's default and `require`: TLS, the certificate not verified (the CA is not trusted).
        ("127.0.0.1", "sslmode=prefer".to_string()),
        ("127.0.0.1", String::new()),
        ("127.0.0.1", "sslmode=require".to_string()),
        // `require` with a root verifies the chain only; so does `verify-ca` (host name not checked).
        ("127.0.0.1", format!("sslmode=require&{root}")),
        ("127.0.0.1", format!("sslmode=verify-ca&{root}")),
        ("localhost", format!("sslmode=verify-full&{root}")),
    ];
    for (host, query) in &accepted {
        let out = status(&pg.url("tls_only", host, query)).await;
        assert_eq!(out.code(), Some(0), "{host} {query}:\n{out}");
    }

    let refused = [
        ("127.0.0.1", format!("sslmode=require&{wrong_root}"), "not signed by a trusted root"),
        ("localhost", format!("sslmode=verify-ca&{wrong_root}"), "not signed by a trusted root"),
        ("localhost", format!("sslmode=verify-full&{wrong_root}"), "not signed by a trusted root"),
        // The certificate names localhost only.
        ("127.0.0.1", format!("sslmode=verify-full&{root}"), "does not name the host"),
    ];
    for (host, query, why) in &refused {
        let out = status(&pg.url("postgres", host, query)).await;
        assert_eq!(out.code(), Some(2), "{host} {query}: a configuration error (exit 2):\n{out}");
        assert!(out.stderr.contains("TLS refused") && out.stderr.contains(why), "{host} {query}: {why}:\n{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_against_a_server_without_tls_is_refused_at_once() {
    let pg = PgCluster::start(&[]).await;
    // prefer (the default) connects in clear to a server without TLS.
    let out = status(&pg.url("postgres", "127.0.0.1", "sslmode=prefer")).await;
    assert_eq!(out.code(), Some(0), "{out}");

    // The processor retries an unreachable database for --retry-secs; a refusal is not retried.
    let data = tempfile::tempdir().unwrap();
    let url = pg.url("postgres", "127.0.0.1", "sslmode=require");
    let out = run_eps(
        &args(&["process", "--database-url", &url, "--data-dir", data.path().to_str().unwrap(), "--retry-secs", "600"]),
        &[],
    )
    .await;
    assert_eq!(out.code(), Some(2), "a configuration error (exit 2), not an outage:\n{out}");
    assert!(out.stderr.contains("server does not support TLS"), "{out}");
    assert!(!out.stderr.contains("retrying"), "not retried:\n{out}");
}
