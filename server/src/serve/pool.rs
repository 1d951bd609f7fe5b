//! The model pool: model work (prefill, blend, decode) runs on blocking threads, at most
//! `workers` at once, off the async runtime, so `/health` and lookups never wait on it.
//! Waiters queue first come, first served (tokio's semaphore is fair); past `max_queue`
//! waiting requests a new one is refused with 503 instead of piling up. A waiter that stops
//! waiting (its client left, its future dropped) gives its place back at once (test
//! `tests::a_waiter_that_leaves_gives_its_place_back`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::http::StatusCode;
use tokio::sync::{Semaphore, TryAcquireError};

use super::error::ApiError;

#[derive(Debug)]
pub struct ModelPool {
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
    running: Arc<AtomicUsize>,
    max_queue: usize,
}

impl ModelPool {
    pub fn new(workers: usize, max_queue: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(workers)),
            waiting: AtomicUsize::new(0),
            running: Arc::new(AtomicUsize::new(0)),
            max_queue,
        }
    }

    /// Requests waiting for a worker.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Requests being computed.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// Runs `work` on a blocking thread once a worker is free. The worker stays taken until
    /// `work` returns, even if the caller stops waiting (a client that disconnects cannot
    /// make the pool over-commit).
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let closed = || ApiError::internal("the model pool is closed");
        // a free worker is taken at once: only a request that has to wait counts against
        // `max_queue` (0 means none waits; it once refused every request). The semaphore is
        // fair, so this never passes a waiter.
        let permit = match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => return Err(closed()),
            Err(TryAcquireError::NoPermits) => {
                if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.max_queue {
                    self.waiting.fetch_sub(1, Ordering::SeqCst);
                    return Err(ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "server_busy",
                        format!(
                            "{} model requests are already waiting; retry later",
                            self.max_queue
                        ),
                    ));
                }
                let waiter = Waiter(&self.waiting);
                let permit = Arc::clone(&self.permits).acquire_owned().await;
                drop(waiter);
                permit.map_err(|_| closed())?
            }
        };
        let running = Running::start(Arc::clone(&self.running));
        tokio::task::spawn_blocking(move || {
            let out = work();
            drop(running);
            drop(permit);
            out
        })
        .await
        .map_err(|e| ApiError::internal(format!("a model worker failed: {e}")))
    }
}

/// One request being computed, counted while it lives (a panicking worker is uncounted as
/// it unwinds).
struct Running(Arc<AtomicUsize>);

impl Running {
    fn start(count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One place in the queue, counted while it lives: given back when the waiter gets a worker
/// or is dropped while waiting.
struct Waiter<'a>(&'a AtomicUsize);

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::task::JoinHandle;

    type Job<T> = JoinHandle<Result<T, ApiError>>;

    /// A pool of one worker and a queue of one, its worker busy until the sender sends.
    async fn busy_pool() -> (Arc<ModelPool>, std::sync::mpsc::Sender<()>, Job<Option<()>>) {
        let pool = Arc::new(ModelPool::new(1, 1));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let p = Arc::clone(&pool);
        let busy = tokio::spawn(async move { p.run(move || rx.recv().ok()).await });
        while pool.running() == 0 {
            tokio::task::yield_now().await;
        }
        (pool, tx, busy)
    }

    /// A request that returns `v`, once it waits in `pool`'s queue.
    async fn queued(pool: &Arc<ModelPool>, v: i32) -> Job<i32> {
        let p = Arc::clone(pool);
        let job = tokio::spawn(async move { p.run(move || v).await });
        while pool.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        job
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refuses_past_the_queue_limit() {
        let (pool, tx, busy) = busy_pool().await;
        let queued = queued(&pool, 1).await;
        let refused = pool.run(|| 2).await.unwrap_err();
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
        tx.send(()).unwrap();
        assert!(busy.await.unwrap().is_ok());
        assert_eq!(queued.await.unwrap().unwrap(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_queue_of_none_serves_free_workers_and_refuses_waiting() {
        // `limits.max_queue = 0`: no request waits, but a free worker still serves
        let pool = Arc::new(ModelPool::new(1, 0));
        assert_eq!(pool.run(|| 7).await.unwrap(), 7);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let p = Arc::clone(&pool);
        let busy = tokio::spawn(async move { p.run(move || rx.recv().ok()).await });
        while pool.running() == 0 {
            tokio::task::yield_now().await;
        }
        let refused = pool.run(|| 8).await.unwrap_err();
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
        tx.send(()).unwrap();
        assert!(busy.await.unwrap().is_ok());
        assert_eq!(pool.run(|| 9).await.unwrap(), 9);
        assert_eq!((pool.waiting(), pool.running()), (0, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_worker_is_no_longer_counted() {
        let pool = ModelPool::new(1, 1);
        let e = pool.run::<()>(|| panic!("a bug")).await.unwrap_err();
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(pool.running(), 0);
        assert_eq!(pool.run(|| 1).await.unwrap(), 1, "its worker is free again");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiter_that_leaves_gives_its_place_back() {
        let (pool, tx, busy) = busy_pool().await;
        // a request that waits, then is dropped (its client left)
        let left = queued(&pool, 1).await;
        left.abort();
        assert!(left.await.unwrap_err().is_cancelled());
        assert_eq!(pool.waiting(), 0, "the place is given back");
        // the next request queues instead of being refused as if the queue were full
        let next = queued(&pool, 2).await;
        tx.send(()).unwrap();
        assert!(busy.await.unwrap().is_ok());
        assert_eq!(next.await.unwrap().unwrap(), 2);
        assert_eq!((pool.waiting(), pool.running()), (0, 0));
    }
}
