//! Connections: the accept loop, its limits, and graceful shutdown.
//!
//! `axum::serve` has no timeouts, so a client that sends its headers one byte a minute would hold a
//! connection forever. This loop serves each connection with hyper directly, with:
//! - a bound on open connections (a semaphore; at the bound, new connections wait in the kernel's
//!   backlog instead of costing memory here);
//! - a first-byte timeout and a header read timeout (a connection that sends nothing, or its headers
//!   one byte at a time, is closed);
//! - HTTP/1.1 only: what the seed's clients speak. hyper-util's HTTP/1-or-2 detection runs before any
//!   timer applies, and an idle HTTP/2 connection would hold a slot with no request in flight;
//! - graceful shutdown: on the signal the listener closes, idle keep-alive connections are closed, and
//!   requests in flight run to completion (bounded by [`Limits::drain_timeout`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    /// How long shutdown waits for requests in flight before giving up on them.
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    // Tells connections that have not sent a byte yet that shutdown began: they hold no request, so
    // they are closed at once instead of being waited for until their first-byte timeout.
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Usually EMFILE: back off a little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let first_byte_timeout = limits.header_read_timeout;
        let mut stopping = stopping.clone();
        tokio::spawn(async move {
            // hyper's header timeout starts with the first byte of a request; until then, this one.
            let mut byte = [0u8; 1];
            let first_byte = tokio::select! {
                peeked = tokio::time::timeout(first_byte_timeout, stream.peek(&mut byte)) => peeked,
                _ = stopping.wait_for(|stop| *stop) => {
                    tracing::debug!(%peer, "connection closed: shutting down before its first request");
                    return;
                }
            };
            match first_byte {
                Ok(Ok(n)) if n > 0 => {}
                _ => {
                    tracing::debug!(%peer, "connection closed: no request within the timeout");
                    drop(permit);
                    return;
                }
            }
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    let _ = stopping_tx.send(true);
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown()).await.is_err() {
        tracing::warn!(timeout = ?limits.drain_timeout, "requests still in flight at the end of the drain timeout");
    }
    Ok(())
}
