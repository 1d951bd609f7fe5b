//! A TCP proxy that adds latency and limits bandwidth, to put a slow network between the
//! remote tier and a Redis node (tests and `kvquilt bench remote`). Each direction forwards
//! what it reads `delay` after reading it, and no faster than `bytes_per_s`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// What the proxy does to traffic; change it at any time (new chunks follow it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Throttle {
    /// One-way delay added to every chunk.
    pub(crate) delay: Duration,
    /// Bandwidth limit per direction and connection, bytes per second (0: none).
    pub(crate) bytes_per_s: f64,
}

/// A running proxy in front of one upstream address.
pub(crate) struct Proxy {
    /// Where to connect instead of the upstream.
    pub(crate) addr: SocketAddr,
    throttle: Arc<parking_lot::Mutex<Throttle>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy to `upstream` on an ephemeral loopback port.
    pub(crate) async fn start(upstream: SocketAddr, throttle: Throttle) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let throttle = Arc::new(parking_lot::Mutex::new(throttle));
        let t = Arc::clone(&throttle);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let t = Arc::clone(&t);
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::spawn(pump(cr, sw, Arc::clone(&t)));
                    tokio::spawn(pump(sr, cw, t));
                });
            }
        });
        Self {
            addr,
            throttle,
            task,
        }
    }

    /// Changes the throttle.
    pub(crate) fn set(&self, throttle: Throttle) {
        *self.throttle.lock() = throttle;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Forwards `from` to `to`: a reader stamps each chunk, a writer sends it once its delay has
/// passed and paces the bytes to the bandwidth.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    t: Arc<parking_lot::Mutex<Throttle>>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    // pacing keeps a schedule (when the bytes sent so far may have left at the limit), so
    // the timer's millisecond granularity does not cap the rate
    let mut free_at = Instant::now();
    while let Some((at, bytes)) = rx.recv().await {
        let th = *t.lock();
        let due = (at + th.delay).max(free_at);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        if to.write_all(&bytes).await.is_err() {
            break;
        }
        if th.bytes_per_s > 0.0 {
            let pace = Duration::from_secs_f64(bytes.len() as f64 / th.bytes_per_s);
            free_at = due.max(free_at) + pace;
        }
    }
    reader.abort();
}
