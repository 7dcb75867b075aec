//! HTTPS on the server (issue 18, item 2): a CA made by the test, `eps client --ca-cert`, a client
//! without the CA refused, certificate rotation by SIGHUP with a keep-alive connection surviving, and
//! the warning for plain HTTP on a non-loopback address.

use crate::common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::tls::TestCa;
use common::{client, event_line, within, Env, StoreKind};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn tls_args(ca: &TestCa) -> [&str; 4] {
    ["--tls-cert", ca.cert.to_str().unwrap(), "--tls-key", ca.key.to_str().unwrap()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_private_ca() {
    let env = Env::new(StoreKind::Sqlite).await;
    let ca = TestCa::new(env.tmp.path(), "eps", &["127.0.0.1", "localhost"]);
    let server = env.server_with(&tls_args(&ca)).await;
    assert!(server.url.starts_with("https://"), "{}", server.url);
    let lines: Vec<String> = (0..50).map(|i| event_line(&format!("u{}", i % 5), "add_revenue", "2")).collect();
    let file = env.write_file("events.jsonl", &lines);

    // Without the CA: the platform's roots do not know it, and the client says so.
    let state = env.tmp.path().join("client-state");
    let state = state.to_str().unwrap();
    let refused = client(&file, &server.url, &["--give-up-after", "2", "--state-dir", state]).await;
    assert!(!refused.status.success(), "{refused}");
    assert!(refused.stderr.contains("certificate") && refused.stderr.contains("UnknownIssuer"), "{refused}");

    let out = client(&file, &server.url, &["--ca-cert", ca.ca_cert.to_str().unwrap(), "--state-dir", state]).await;
    assert!(out.status.success(), "{out}");
    env.process(&[]).await;
    let revenues = env.revenues().await;
    assert_eq!(revenues.len(), 5, "{revenues:?}");
    assert!(revenues.values().all(|r| *r == rust_decimal::Decimal::from(20)), "{revenues:?}");
}

/// A TLS connection trusting only `ca`, and the certificate the server showed.
async fn connect(port: u16, ca: &Path) -> std::io::Result<(tokio_rustls::client::TlsStream<TcpStream>, Vec<u8>)> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
    let shown = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    Ok((stream, shown))
}

/// `GET /healthz` on an open keep-alive connection; the status line.
async fn healthz(stream: &mut tokio_rustls::client::TlsStream<TcpStream>) -> String {
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: eps\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // The answer is small: read until its head and the body it announces are in.
    loop {
        let n = within(Duration::from_secs(10), "the answer", stream.read(&mut buf)).await.unwrap();
        assert!(n > 0, "connection closed; got {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= length {
                return head.lines().next().unwrap().to_owned();
            }
        }
    }
}

fn pem_der(path: &Path) -> Vec<u8> {
    CertificateDer::pem_file_iter(path).unwrap().next().unwrap().unwrap().to_vec()
}

async fn wait_for_log(server: &common::ServerProc, text: &str, times: usize) {
    within(Duration::from_secs(20), text, async {
        while server.stderr().matches(text).count() < times {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

async fn sighup(pid: u32) {
    let status = tokio::process::Command::new("kill").args(["-HUP", &pid.to_string()]).status().await.unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_the_certificate_and_keeps_open_connections() {
    let env = Env::new(StoreKind::Sqlite).await;
    let old = TestCa::new(env.tmp.path(), "old", &["127.0.0.1"]);
    let new = TestCa::new(env.tmp.path(), "new", &["127.0.0.1"]);
    let (cert, key) = (env.tmp.path().join("live.crt"), env.tmp.path().join("live.key"));
    std::fs::copy(&old.cert, &cert).unwrap();
    std::fs::copy(&old.key, &key).unwrap();
    let server = env.server_with(&["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]).await;

    let (mut kept, shown) = connect(server.port, &old.ca_cert).await.expect("the old certificate before the rotation");
    assert_eq!(shown, pem_der(&old.cert));
    assert!(healthz(&mut kept).await.contains("200"));

    std::fs::copy(&new.key, &key).unwrap();
    std::fs::copy(&new.cert, &cert).unwrap();
    sighup(server.pid()).await;
    wait_for_log(&server, "TLS certificate re-read", 1).await;

    // The connection opened before the rotation goes on with its session.
    assert!(healthz(&mut kept).await.contains("200"), "the keep-alive connection survived the rotation");
    // New connections see the new certificate, and no longer the old CA's.
    let (mut fresh, shown) = connect(server.port, &new.ca_cert).await.expect("the new certificate after SIGHUP");
    assert_eq!(shown, pem_der(&new.cert));
    assert!(healthz(&mut fresh).await.contains("200"));
    let refused = connect(server.port, &old.ca_cert).await.expect_err("the old CA does not sign the new certificate");
    assert!(refused.to_string().contains("UnknownIssuer"), "{refused}");

    // A broken file keeps the certificate in force, and the log says why.
    std::fs::write(&cert, "not a certificate").unwrap();
    sighup(server.pid()).await;
    wait_for_log(&server, "TLS certificate not reloaded", 1).await;
    let (mut after, shown) = connect(server.port, &new.ca_cert).await.expect("the previous certificate kept");
    assert_eq!(shown, pem_der(&new.cert));
    assert!(healthz(&mut after).await.contains("200"));
    assert!(healthz(&mut kept).await.contains("200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_on_a_non_loopback_address_is_warned_about() {
    const WARNING: &str = "serving plain HTTP on a non-loopback address";
    let env = Env::new(StoreKind::Sqlite).await;
    let data_dir = env.data_dir.to_str().unwrap();
    let dir = env.tmp.path();
    let start = |extra: &[&str]| {
        let mut a = common::args(&["server", "--data-dir", data_dir, "--token", "a-real-token"]);
        a.extend(extra.iter().map(|s| s.to_string()));
        async move { common::ServerProc::start(&a, &[], dir).await }
    };
    let mut server = start(&["--listen", "0.0.0.0:0"]).await;
    wait_for_log(&server, "eps server listening", 1).await;
    assert!(server.stderr().contains(WARNING), "{}", server.stderr());
    server.kill().await;

    let ca = TestCa::new(env.tmp.path(), "eps", &["127.0.0.1"]);
    let mut args = vec!["--listen", "0.0.0.0:0"];
    args.extend(tls_args(&ca));
    let mut server = start(&args).await;
    wait_for_log(&server, "eps server listening", 1).await;
    assert!(!server.stderr().contains(WARNING), "{}", server.stderr());
    server.kill().await;
    // The loopback default is not warned about either.
    let server = start(&["--listen", "127.0.0.1:0"]).await;
    wait_for_log(&server, "eps server listening", 1).await;
    assert!(!server.stderr().contains(WARNING), "{}", server.stderr());
}
