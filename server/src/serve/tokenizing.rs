//! Tokenizing off the async workers, a bounded number of texts at once.
//!
//! A tokenization holds a few hundred bytes per token of its text while it runs (the
//! tokenizer's encoding keeps each token's string, offsets and masks), so the text limits
//! (`limits.max_text_bytes`, `max_document_bytes`) bound a request's memory only with a bound
//! on how many run at once beside them: tokio's blocking pool has none that fits (512
//! threads), and model requests' queue (`limits.max_queue`) is entered after tokenizing.

use std::sync::Arc;

use tokio::sync::Semaphore;

use super::error::{ApiError, ApiResult};

/// Runs tokenizations on blocking threads, at most `at_once` at a time; more wait.
#[derive(Debug, Clone)]
pub struct Tokenizing {
    permits: Arc<Semaphore>,
}

impl Tokenizing {
    /// A bound of `at_once` tokenizations (at least 1).
    pub fn new(at_once: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(at_once.max(1))),
        }
    }

    /// One per core, at least two: tokenizing is CPU work, more at once gains nothing.
    pub fn per_core() -> Self {
        Self::new(std::thread::available_parallelism().map_or(2, |n| n.get().max(2)))
    }

    /// Turns free now (tokenizations that would start at once).
    pub fn free_turns(&self) -> usize {
        self.permits.available_permits()
    }

    /// Runs `f` (tokenizing) on a blocking thread once a turn is free: a long text must not
    /// hold an async worker, which would stall every request on it (`/health` included).
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> ApiResult<T> + Send + 'static,
    ) -> ApiResult<T> {
        let turn = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| ApiError::internal("the tokenizing turns were closed"))?;
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            f()
        })
        .await
        .map_err(|e| ApiError::internal(format!("a tokenizer task failed: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// No more than the bound run at once, and every one runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_most_the_bound_run_at_once() {
        let pool = Tokenizing::new(2);
        let (now, most, done) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let runs: Vec<_> = (0..8)
            .map(|_| {
                let (pool, now, most, done) = (
                    pool.clone(),
                    Arc::clone(&now),
                    Arc::clone(&most),
                    Arc::clone(&done),
                );
                tokio::spawn(async move {
                    pool.run(move || {
                        let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(n, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(20));
                        now.fetch_sub(1, Ordering::SeqCst);
                        done.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    })
                    .await
                })
            })
            .collect();
        for r in runs {
            r.await.expect("joined").expect("ran");
        }
        assert_eq!(done.load(Ordering::SeqCst), 8);
        assert_eq!(
            most.load(Ordering::SeqCst),
            2,
            "the bound was not reached or passed"
        );
    }
}
