//! noop-server: the ceiling reference for HTTP ingest.
//!
//! A minimal axum 0.8 server on tokio's default multi-threaded runtime that accepts `POST /liveEvent`
//! and `POST /events`, reads the whole body, and answers `200 {"message":"Event received"}` without
//! validating, storing or syncing anything. Whatever eps does on top of this costs throughput; the
//! benchmark reports eps's rate as a fraction of this one.
//!
//! Usage: noop-server [LISTEN_ADDR]      (default 127.0.0.1:8001)

use axum::body::Bytes;
use axum::http::header::CONTENT_TYPE;
use axum::routing::post;
use axum::Router;

/// Reads the body (so the request costs what an ingest request costs on the wire) and answers the
/// seed's acknowledgement.
async fn receive(body: Bytes) -> ([(axum::http::HeaderName, &'static str); 1], &'static str) {
    // The length is used so the body cannot be optimised away; it is always >= 0.
    let _ = body.len();
    ([(CONTENT_TYPE, "application/json")], r#"{"message":"Event received"}"#)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:8001".to_string());
    let app = Router::new().route("/liveEvent", post(receive)).route("/events", post(receive));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("noop-server listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
