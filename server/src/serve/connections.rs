//! Accepting and serving HTTP/1 connections with the limits `axum::serve` does not set.
//!
//! `axum::serve` gives hyper no timer, so a client that sends half a request head (or
//! nothing) holds its connection, a file descriptor and a task forever, and a stop waits
//! for it: a thousand such clients made the sidecar unreachable before any token was
//! checked (found by a resource probe). Here:
//! - a request head must arrive within [`ConnectionLimits::header_timeout`], and an idle
//!   keep-alive connection is closed after the same time (hyper starts the head timer again
//!   after each response);
//! - at most [`ConnectionLimits::max_connections`] connections are served at once; past
//!   that, new ones wait in the listen backlog (never accepted and dropped);
//! - a connection whose client stops reading (a response that cannot be written for
//!   [`ConnectionLimits::send_timeout`]) is closed, freeing what its response held;
//! - on the shutdown signal the listener closes at once, each connection finishes the
//!   request it is serving, and after [`ConnectionLimits::shutdown_grace`] the rest are
//!   dropped, so a stop always ends.
//!
//! A body that arrives too slowly is the router's business (`bodies`), since only a
//! handler knows it wants one. Pinned by `server/tests/connections.rs`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Sleep;

/// Connection-level limits ([`serve_connections`]).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Time a request head may take to arrive, and an idle keep-alive connection may wait.
    pub header_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Time a response may wait for the client to read before its connection is closed.
    pub send_timeout: Duration,
    /// Time a stop waits for requests in flight before dropping their connections.
    pub shutdown_grace: Duration,
}

/// Serves `app` on `listener` until `shutdown` completes, then drains as the module says.
/// Returns once every connection has ended or the grace period is over.
pub async fn serve_connections(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break, // never closed
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // out of file descriptors, or a connection reset before it was
                    // accepted: the listener stays usable; wait a moment, not a busy loop
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let io = StallTimeout::new(stream, limits.send_timeout);
        let conn = http.serve_connection(TokioIo::new(io), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // a connection's end (closed, timed out, reset) is the client's business
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    let open = graceful.count();
    if open > 0 {
        tracing::info!(open, "stopping: waiting for requests in flight");
    }
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_s = limits.shutdown_grace.as_secs_f64(),
            "stopping: connections still open after the grace period are dropped"
        );
    }
}

/// `wanted`, lowered so the connections leave room under the process's file-descriptor
/// limit for the store's files (RocksDB keeps its table files open) and the model's:
/// `reserve` descriptors stay free, or half the limit when it is small. Logs when it lowers.
pub fn fit_to_descriptor_limit(wanted: usize, reserve: usize) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return wanted;
    }
    let limit = usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX);
    let room = room_under(limit, reserve);
    if room < wanted {
        tracing::warn!(
            wanted,
            serving = room,
            descriptor_limit = lim.rlim_cur,
            "limits.max_connections lowered to fit the open-file limit (raise it with `ulimit -n`)"
        );
        room
    } else {
        wanted
    }
}

/// An I/O stream whose writes fail once one has made no progress for `stall` (the client
/// stopped reading): hyper then closes the connection. Reads pass through.
struct StallTimeout<S> {
    io: S,
    stall: Duration,
    /// Running while a write is pending; reset by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> StallTimeout<S> {
    fn new(io: S, stall: Duration) -> Self {
        Self {
            io,
            stall,
            stalled: None,
        }
    }

    /// Folds a write's outcome into the stall clock.
    fn progress<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let stall = self.stall;
        let clock = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        match clock.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading its response",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.progress(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.progress(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.progress(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Connections that fit under a descriptor `limit` keeping `reserve` free (or half of it).
fn room_under(limit: usize, reserve: usize) -> usize {
    limit.saturating_sub(reserve.min(limit / 2)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small open-file limit (256, as a probe ran it) still serves half of it, not one.
    #[test]
    fn connections_fit_under_the_descriptor_limit() {
        assert_eq!(room_under(256, 512), 128);
        assert_eq!(room_under(1024, 512), 512);
        assert_eq!(room_under(20_000, 512), 19_488);
        assert_eq!(room_under(1, 512), 1);
        assert!(fit_to_descriptor_limit(4, 0) <= 4);
    }

    /// A writer whose reader never reads fails after the stall time instead of waiting
    /// forever; one that reads keeps going.
    #[tokio::test]
    async fn a_write_that_makes_no_progress_times_out() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (ours, _theirs) = tokio::io::duplex(1024);
        let mut io = StallTimeout::new(ours, Duration::from_millis(100));
        let started = std::time::Instant::now();
        let err = io.write_all(&[7u8; 1 << 16]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(100));
        // a reader that keeps up: the same bytes go through
        let (ours, mut theirs2) = tokio::io::duplex(1024);
        let mut io = StallTimeout::new(ours, Duration::from_millis(100));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            theirs2.read_to_end(&mut got).await.map(|_| got.len())
        });
        io.write_all(&[7u8; 1 << 16]).await.unwrap();
        io.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap().unwrap(), 1 << 16);
    }
}
