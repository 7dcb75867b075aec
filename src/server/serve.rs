//! Connections: the accept loop, its limits, and graceful shutdown.
//!
//! `axum::serve` has no timeouts, so a client that sends its headers one byte a minute would hold a
//! connection forever. This loop serves each connection with hyper directly, with:
//! - a bound on open connections (a semaphore; at the bound, new connections wait in the kernel's
//!   backlog instead of costing memory here);
//! - a first-byte timeout and a header read timeout (a connection that sends nothing, or its headers
//!   one byte at a time, is closed; hyper restarts the header timeout when a keep-alive connection
//!   waits for its next request, so an idle connection is closed too);
//! - a send timeout ([`Limits::send_timeout`]): a connection whose answers are not read, so that a
//!   write makes no progress for that long, fails and frees its slot. hyper 1 and hyper-util have no
//!   write deadline (hyper's timers cover reading the head only), so it is [`SendDeadline`], a wrapper
//!   of the socket. (A request body is bounded by the handlers' body timeout, 408.)
//! - HTTP/1.1 only: what the seed's clients speak. hyper-util's HTTP/1-or-2 detection runs before any
//!   timer applies, and an idle HTTP/2 connection would hold a slot with no request in flight;
//! - TLS when given [`Certificates`]: the handshake is done in the connection's own task, bounded by
//!   the header read timeout, so a slow or silent handshake holds one slot, never the accept loop;
//!   the socket under TLS is the [`SendDeadline`] one, so the send timeout holds over TLS too. Each
//!   connection keeps the configuration it was accepted with (see `tls`);
//! - graceful shutdown: on the signal the listener closes, idle keep-alive connections are closed, and
//!   requests in flight run to completion (bounded by [`Limits::drain_timeout`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};

use super::tls::Certificates;

/// The default of `--max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// The default of `--request-timeout-secs`: the header read timeout, and the handlers' body timeout.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The default of `--send-timeout-secs`.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    /// Longest a connection's answer may wait for the client to take any byte of it. A client that
    /// does not read (its receive window full) makes the server's write stall; after this long without
    /// progress the connection is closed and its slot freed.
    pub send_timeout: Duration,
    /// How long shutdown waits for requests in flight before giving up on them.
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_REQUEST_TIMEOUT,
            send_timeout: DEFAULT_SEND_TIMEOUT,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    tls: Option<Arc<Certificates>>,
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
        let send_timeout = limits.send_timeout;
        let mut stopping = stopping.clone();
        let tls = tls.as_ref().map(|certificates| certificates.current());
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
            let socket = SendDeadline::new(stream, send_timeout);
            let served = match tls {
                None => watcher.watch(builder.serve_connection(TokioIo::new(socket), service)).await,
                Some(config) => {
                    let handshake = tokio_rustls::TlsAcceptor::from(config).accept(socket);
                    let stream = tokio::select! {
                        done = tokio::time::timeout(first_byte_timeout, handshake) => match done {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "connection closed: TLS handshake not done within the timeout");
                                return;
                            }
                        },
                        _ = stopping.wait_for(|stop| *stop) => return,
                    };
                    watcher.watch(builder.serve_connection(TokioIo::new(stream), service)).await
                }
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    let _ = stopping_tx.send(true);
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown()).await.is_err() {
        tracing::warn!(
            timeout_secs = limits.drain_timeout.as_secs_f64(),
            "requests still in flight at the end of the drain timeout"
        );
    }
    Ok(())
}

/// A connection's socket whose writes fail with `TimedOut` once one has made no progress for the send
/// timeout: the deadline starts when a write (or flush) first returns `Pending` and is cleared by any
/// byte written. A client that reads, however slowly, never meets it; one that has stopped reading
/// does, whatever hyper is doing (answering, or holding pipelined answers). The clock is tokio's, so
/// monotonic.
pub(crate) struct SendDeadline<T> {
    inner: T,
    timeout: Duration,
    /// Armed while a write is stalled; `None` while writes make progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> SendDeadline<T> {
    pub(crate) fn new(inner: T, timeout: Duration) -> Self {
        SendDeadline { inner, timeout, stalled: None }
    }

    /// After the inner write said `Pending`: arms the deadline if it is not running, and fails once it
    /// has passed. Polling the timer registers this task's waker, so hyper is woken to see the error
    /// even if the socket never becomes writable again.
    fn on_pending<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let timeout = self.timeout;
        let timer = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now() + timeout)));
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client took no byte of the answer for {timeout:?}"),
        )))
    }

    fn on_progress<R>(&mut self, result: Poll<io::Result<R>>, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        match result {
            Poll::Pending => self.on_pending(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SendDeadline<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SendDeadline<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.on_progress(result, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.on_progress(result, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.on_progress(result, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.on_progress(result, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// The deadline is about progress, not total time: a reader that keeps taking bytes is never cut
    /// off, one that stops is, and its writer gets `TimedOut` instead of waiting for ever.
    #[tokio::test(start_paused = true)]
    async fn a_write_that_makes_no_progress_fails_after_the_send_timeout() {
        let (server, mut client) = tokio::io::duplex(64);
        let mut server = SendDeadline::new(server, Duration::from_secs(5));
        // A slow reader: 64 bytes every 4 s, always within the 5 s deadline.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            for _ in 0..8 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                tokio::io::AsyncReadExt::read_exact(&mut client, &mut buf).await.unwrap();
            }
            client // then it stops reading, and keeps the connection open
        });
        server.write_all(&[7u8; 64 * 9]).await.expect("a reader that keeps reading is never cut off");
        let started = Instant::now();
        let stalled = server.write_all(&[7u8; 64 * 2]).await.expect_err("nobody reads any more");
        assert_eq!(stalled.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_secs(5), "{:?}", started.elapsed());
        drop(reader.await.unwrap());
    }
}
