//! Decode steps of concurrent requests computed together: continuous batching at the step
//! level ([`DecodeBatcher`], on by [`crate::Blender::with_decode_batching`]).
//!
//! Each request keeps its own decode loop (sampling, stop strings, streaming) on its own
//! thread; only the model step is shared. A request's [`BatchedSteps::step`] hands its token
//! and cache to the batcher's thread and waits; that thread gathers the steps of every live
//! session (waiting at most [`DEFAULT_GATHER`] after the first for the others' next step),
//! runs them as one [`Model::decode_batch`] — each weight read once per step for all of
//! them, attention per sequence — and hands each cache back with its logits. A session that
//! is the batcher's only one steps on its own thread (nothing to batch with; no hand-off).
//!
//! **Streams.** candle runs each host thread's CUDA work on that thread's own default stream,
//! and a cache crosses threads here, so each side synchronizes its stream at the hand-off:
//! a session before handing its cache over (its last writes to the cache are done), the
//! batcher after a batch and before answering (the new rows and the logits are written, and
//! nothing it queued still reads a buffer a session may free). A session waits for its
//! logits anyway, so the batcher's wait costs a decode loop nothing.
//!
//! Invariants:
//! - A step's result is its sequence's own: batching changes the order of sums inside the
//!   matmuls, nothing else (`kvquilt_model`'s `tests/batch.rs`; end to end
//!   `tests::concurrent_sessions_decode_what_each_decodes_alone`).
//! - One sequence's failure is its own: a batch that fails is run again one sequence at a
//!   time (a failed step leaves its cache as it was), so only the sequences that fail alone
//!   get an error (`tests::a_sequence_that_fails_fails_alone`).
//! - A session that stops stepping (its client left) delays the others by at most the
//!   gather time, once: its registration ends when it is dropped
//!   (`tests::a_session_that_stops_does_not_stall_the_others`).
//! - Every cache handed to the batcher comes back, also when a step fails or panics.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvquilt_model::{BatchStep, KvCache, Model, Tensor};
use parking_lot::{Condvar, Mutex};

use crate::error::{BlendError, Result, invalid};

/// How long a batch waits, after its first step arrives, for the other live sessions' next
/// steps. A session's work between two steps (reading its logits, sampling, sending text)
/// takes tens of microseconds; a step of the model, milliseconds.
pub const DEFAULT_GATHER: Duration = Duration::from_millis(2);

/// What a batcher did ([`crate::Blender::decode_batch_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Model steps run (each one or more sequences; a lone session's steps, run on its own
    /// thread, count as batches of one).
    pub batches: u64,
    /// Sequence steps run (the sum of the batches' sizes).
    pub steps: u64,
    /// Batches that failed and were run again one sequence at a time.
    pub split: u64,
    /// Sessions decoding through the batcher now.
    pub sessions: usize,
}

/// One step waiting for its batch.
struct Pending {
    token: u32,
    cache: KvCache,
    reply: mpsc::Sender<(KvCache, Result<Tensor>)>,
}

#[derive(Default)]
struct State {
    queue: Vec<Pending>,
    /// Live [`BatchedSteps`]: the steps a gathering batch waits for.
    sessions: usize,
    shutdown: bool,
}

struct Shared {
    model: Arc<Model>,
    max_batch: usize,
    gather: Duration,
    state: Mutex<State>,
    /// Signalled when a step arrives, a session ends, or the batcher shuts down.
    changed: Condvar,
    batches: AtomicU64,
    steps: AtomicU64,
    split: AtomicU64,
}

/// The thread that runs concurrent sessions' decode steps together, at most `max_batch` in
/// one model step. Stopped (and joined) on drop; sessions still open then get an error on
/// their next step.
pub struct DecodeBatcher {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for DecodeBatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodeBatcher")
            .field("max_batch", &self.shared.max_batch)
            .field("gather", &self.shared.gather)
            .finish()
    }
}

impl DecodeBatcher {
    /// Starts the batching thread for `model`: batches of at most `max_batch` (≥ 2)
    /// sequences, gathered for at most `gather` after their first step.
    pub fn start(model: Arc<Model>, max_batch: usize, gather: Duration) -> Result<Self> {
        if max_batch < 2 {
            return Err(invalid(format!(
                "a decode batch of at most {max_batch} sequence(s) batches nothing (at least 2)"
            )));
        }
        let shared = Arc::new(Shared {
            model,
            max_batch,
            gather,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            batches: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            split: AtomicU64::new(0),
        });
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("kvquilt-decode-batch".into())
            .spawn(move || worker.run())
            .map_err(|e| {
                BlendError::Batcher(format!("starting the decode batcher's thread: {e}"))
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// The most sequences one step runs.
    pub fn max_batch(&self) -> usize {
        self.shared.max_batch
    }

    /// Decode steps over `cache`, run in this batcher's batches.
    pub fn session(&self, cache: KvCache) -> BatchedSteps {
        self.shared.state.lock().sessions += 1;
        BatchedSteps {
            shared: Arc::clone(&self.shared),
            cache: Some(cache),
        }
    }

    /// What the batcher did so far.
    pub fn stats(&self) -> BatchStats {
        BatchStats {
            batches: self.shared.batches.load(Ordering::Relaxed),
            steps: self.shared.steps.load(Ordering::Relaxed),
            split: self.shared.split.load(Ordering::Relaxed),
            sessions: self.shared.state.lock().sessions,
        }
    }
}

impl Drop for DecodeBatcher {
    fn drop(&mut self) {
        self.shared.state.lock().shutdown = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            // a panic inside was already reported to its sessions
            let _ = t.join();
        }
    }
}

impl Shared {
    fn run(&self) {
        let mut st = self.state.lock();
        loop {
            while st.queue.is_empty() && !st.shutdown {
                self.changed.wait(&mut st);
            }
            if st.queue.is_empty() {
                // shut down with nothing left to answer
                return;
            }
            // wait for the other live sessions' steps, at most `gather` from now
            let deadline = Instant::now() + self.gather;
            while !st.shutdown && st.queue.len() < st.sessions.min(self.max_batch) {
                if self.changed.wait_until(&mut st, deadline).timed_out() {
                    break;
                }
            }
            let n = st.queue.len().min(self.max_batch);
            let batch: Vec<Pending> = st.queue.drain(..n).collect();
            parking_lot::MutexGuard::unlocked(&mut st, || self.answer(batch));
        }
    }

    /// Runs `batch` and answers each of its sessions with its cache and logits.
    fn answer(&self, batch: Vec<Pending>) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.steps.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let (mut caches, rest): (Vec<KvCache>, Vec<(u32, mpsc::Sender<_>)>) = batch
            .into_iter()
            .map(|p| (p.cache, (p.token, p.reply)))
            .unzip();
        let tokens: Vec<u32> = rest.iter().map(|(t, _)| *t).collect();
        let together = if caches.len() > 1 {
            Some(self.guarded(|| {
                let mut steps: Vec<BatchStep<'_>> = caches
                    .iter_mut()
                    .zip(&tokens)
                    .map(|(c, &t)| BatchStep::new(t, c))
                    .collect();
                Ok(self.model.decode_batch(&mut steps)?)
            }))
        } else {
            None
        };
        let rows: Vec<Result<Tensor>> = match together {
            Some(Ok(logits)) => (0..caches.len()).map(|b| Ok(logits.get(b)?)).collect(),
            failed => {
                if let Some(Err(e)) = &failed {
                    self.split.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, sequences = caches.len(), "a decode batch failed; stepping its sequences one at a time");
                }
                caches
                    .iter_mut()
                    .zip(&tokens)
                    .map(|(c, &t)| self.guarded(|| Ok(self.model.decode_step(t, c, &mut ())?)))
                    .collect()
            }
        };
        // everything the batch queued is done before any session reads or frees it
        let rows: Vec<Result<Tensor>> = match self.model.device().synchronize() {
            Ok(()) => rows,
            Err(e) => {
                let e = e.to_string();
                rows.into_iter()
                    .map(|_| Err(BlendError::Batcher(format!("after a decode batch: {e}"))))
                    .collect()
            }
        };
        for ((cache, row), (_, reply)) in caches.into_iter().zip(rows).zip(rest) {
            // a session that went away no longer wants its cache
            let _ = reply.send((cache, row));
        }
    }

    /// `f`, with a panic turned into an error (the thread keeps serving; every failed step
    /// leaves its caches as they were).
    fn guarded(&self, f: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
        std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            Err(BlendError::Batcher(format!(
                "a decode step panicked: {what}"
            )))
        })
    }
}

/// One request's decode steps through a [`DecodeBatcher`] (registered until dropped).
pub struct BatchedSteps {
    shared: Arc<Shared>,
    /// `None` only while a step is out with the batcher.
    cache: Option<KvCache>,
}

impl BatchedSteps {
    /// Appends `token` at the position after the cache's last and returns the next token's
    /// f32 logits `[vocab]`, computed in a batch with whatever other sessions step now (on
    /// this thread, as a batch of one, when this is the batcher's only session). On error
    /// (a panic included) the cache is as it was.
    pub fn step(&mut self, token: u32) -> Result<Tensor> {
        if self.alone() {
            // nobody to batch with: no hand-off (a one-sequence batch is this step anyway)
            let cache = self
                .cache
                .as_mut()
                .ok_or_else(|| BlendError::Batcher("a batched session lost its cache".into()))?;
            self.shared.batches.fetch_add(1, Ordering::Relaxed);
            self.shared.steps.fetch_add(1, Ordering::Relaxed);
            let model = &self.shared.model;
            return self
                .shared
                .guarded(|| Ok(model.decode_step(token, cache, &mut ())?));
        }
        let cache = self
            .cache
            .take()
            .ok_or_else(|| BlendError::Batcher("a batched session lost its cache".into()))?;
        // the cache's last writes, queued on this thread's stream, are done before the
        // batcher's stream reads it
        if let Err(e) = self.shared.model.device().synchronize() {
            self.cache = Some(cache);
            return Err(BlendError::Batcher(format!(
                "before handing a step to the batcher: {e}"
            )));
        }
        let (reply, answer) = mpsc::channel();
        {
            let mut st = self.shared.state.lock();
            if st.shutdown {
                self.cache = Some(cache);
                return Err(BlendError::Batcher("the decode batcher has stopped".into()));
            }
            st.queue.push(Pending {
                token,
                cache,
                reply,
            });
        }
        self.shared.changed.notify_all();
        let (cache, logits) = answer
            .recv()
            .map_err(|_| BlendError::Batcher("the decode batcher stopped during a step".into()))?;
        self.cache = Some(cache);
        // this thread now holds device tensors made on the batcher's: it may be the one to
        // free them
        kvquilt_model::bind_to_thread(self.shared.model.device())?;
        logits
    }

    /// Whether this is the batcher's only session and nothing waits in its queue: a step
    /// then runs on the session's own thread. A session that registers meanwhile waits at
    /// most the gather time for this one's next step, once.
    fn alone(&self) -> bool {
        let st = self.shared.state.lock();
        st.sessions == 1 && st.queue.is_empty() && !st.shutdown
    }

    /// The session's cache (every step so far appended).
    pub fn cache(&self) -> Option<&KvCache> {
        self.cache.as_ref()
    }
}

impl Drop for BatchedSteps {
    fn drop(&mut self) {
        // the cache's buffers are freed here (`bind_to_thread`'s docs)
        if let Err(e) = kvquilt_model::bind_to_thread(self.shared.model.device()) {
            tracing::warn!(error = %e, "binding the device before freeing a decode session's cache");
        }
        self.shared.state.lock().sessions -= 1;
        self.shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::thread;

    use kvquilt_model::{argmax, positions};

    use super::*;

    fn model(context: usize) -> Arc<Model> {
        Arc::new(crate::test_model::tiny_random(context))
    }

    fn prompt_cache(m: &Model, n: usize, salt: u32) -> KvCache {
        let tokens: Vec<u32> = (0..n as u32).map(|i| (i * 7 + salt) % 64).collect();
        let mut cache = m.empty_cache().unwrap();
        m.prefill(&tokens, &positions(0, n), &mut cache).unwrap();
        cache
    }

    /// Greedy tokens from `first`, `steps` of them, by `step`.
    fn greedy(
        first: u32,
        steps: usize,
        mut step: impl FnMut(u32) -> Result<Tensor>,
    ) -> Result<Vec<(u32, Vec<f32>)>> {
        let mut out = Vec::new();
        let mut t = first;
        for _ in 0..steps {
            let row = step(t)?.to_vec1::<f32>()?;
            t = argmax(&row);
            out.push((t, row));
        }
        Ok(out)
    }

    /// `got` is `want`: the same tokens, logits within 1e-4.
    fn same_steps(got: &[(u32, Vec<f32>)], want: &[(u32, Vec<f32>)], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: steps");
        for (j, ((tg, rg), (tw, rw))) in got.iter().zip(want).enumerate() {
            assert_eq!(tg, tw, "{what}, step {j}");
            let d = rg
                .iter()
                .zip(rw)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-4, "{what}, step {j}: logits differ by {d}");
        }
    }

    /// Six sessions on six threads, through a batcher of at most four per step: each
    /// decodes the tokens and logits it decodes alone, and the steps did run in batches.
    #[test]
    fn concurrent_sessions_decode_what_each_decodes_alone() {
        let m = model(256);
        let batcher = DecodeBatcher::start(Arc::clone(&m), 4, Duration::from_millis(500)).unwrap();
        let caches: Vec<KvCache> = (0..6)
            .map(|i| prompt_cache(&m, 5 + 3 * i, i as u32))
            .collect();
        let alone: Vec<_> = caches
            .iter()
            .map(|c| {
                let mut c = c.clone();
                greedy(1, 12, |t| Ok(m.decode_step(t, &mut c, &mut ())?)).unwrap()
            })
            .collect();
        let together: Vec<_> = thread::scope(|s| {
            let handles: Vec<_> = caches
                .iter()
                .map(|c| {
                    let mut steps = batcher.session(c.clone());
                    s.spawn(move || greedy(1, 12, |t| steps.step(t)).unwrap())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
            same_steps(b, a, &format!("sequence {i}"));
        }
        let st = batcher.stats();
        assert_eq!(st.steps, 6 * 12);
        assert!(
            st.batches < st.steps,
            "no step ran batched: {st:?} (the gather time is generous)"
        );
        assert_eq!(st.sessions, 0, "every session ended");
    }

    /// A session with no company steps on its own thread: the logits `decode_step` gives,
    /// counted as batches of one.
    #[test]
    fn a_lone_session_steps_as_decode_step_does() {
        let m = model(64);
        // (a gather of 2 s: a step that waited for one would take that long; the bound
        // leaves 1 s of compute and scheduling for a busy host)
        let batcher = DecodeBatcher::start(Arc::clone(&m), 4, Duration::from_secs(2)).unwrap();
        let cache = prompt_cache(&m, 9, 3);
        let mut alone = cache.clone();
        let want = greedy(1, 6, |t| Ok(m.decode_step(t, &mut alone, &mut ())?)).unwrap();
        let mut steps = batcher.session(cache);
        let t = Instant::now();
        let got = greedy(1, 6, |t| steps.step(t)).unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "no step waited for a gather: {:?}",
            t.elapsed()
        );
        assert_eq!(got, want);
        assert_eq!(steps.cache().unwrap().len(), alone.len());
        let st = batcher.stats();
        assert_eq!((st.batches, st.steps, st.sessions), (6, 6, 1));
    }

    /// A session that decodes alone, then beside another, then alone again decodes what it
    /// decodes by itself throughout; the steps with company ran batched.
    #[test]
    fn a_session_alone_then_in_company_then_alone_decodes_as_alone() {
        let m = model(128);
        let batcher = DecodeBatcher::start(Arc::clone(&m), 4, Duration::from_millis(500)).unwrap();
        let (a, b) = (prompt_cache(&m, 11, 1), prompt_cache(&m, 6, 2));
        let mut own = a.clone();
        let want = greedy(1, 9, |t| Ok(m.decode_step(t, &mut own, &mut ())?)).unwrap();
        let mut first = batcher.session(a);
        let mut got = greedy(1, 3, |t| first.step(t)).unwrap();
        let lone = batcher.stats();
        assert_eq!((lone.batches, lone.steps), (3, 3));
        let mut other = batcher.session(b);
        let next = got.last().unwrap().0;
        thread::scope(|s| {
            let h = s.spawn(|| greedy(7, 3, |t| other.step(t)).unwrap());
            got.extend(greedy(next, 3, |t| first.step(t)).unwrap());
            h.join().unwrap();
        });
        let together = batcher.stats();
        assert!(
            together.batches - lone.batches < together.steps - lone.steps,
            "the steps in company ran batched: {together:?}"
        );
        drop(other);
        let next = got.last().unwrap().0;
        got.extend(greedy(next, 3, |t| first.step(t)).unwrap());
        let after = batcher.stats();
        assert_eq!(after.steps - together.steps, 3);
        assert_eq!(
            after.batches - together.batches,
            3,
            "alone again: batches of one"
        );
        same_steps(&got, &want, "the session");
    }

    /// A sequence at the end of the model's context fails its step; the others in its batch
    /// step on, and the failed one's cache is as it was.
    #[test]
    fn a_sequence_that_fails_fails_alone() {
        let m = model(16);
        let batcher = DecodeBatcher::start(Arc::clone(&m), 4, Duration::from_secs(5)).unwrap();
        let full = prompt_cache(&m, 16, 3);
        let short = prompt_cache(&m, 4, 5);
        let (bad, good) = thread::scope(|s| {
            let mut a = batcher.session(full.clone());
            let mut b = batcher.session(short.clone());
            let bad = s.spawn(move || (a.step(1).map(|_| ()), a.cache().map(|c| c.len())));
            let good = s.spawn(move || (b.step(2).map(|_| ()), b.cache().map(|c| c.len())));
            (bad.join().unwrap(), good.join().unwrap())
        });
        let err = bad.0.unwrap_err().to_string();
        assert!(err.contains("context"), "{err}");
        assert_eq!(bad.1, Some(16), "the failed step left its cache as it was");
        good.0.unwrap();
        assert_eq!(good.1, Some(5));
        let st = batcher.stats();
        assert_eq!(st.split, 1, "the two ran as one batch, then apart: {st:?}");
    }

    /// A session that stops stepping without ending keeps the others waiting at most the
    /// gather time per step; once dropped, not at all.
    #[test]
    fn a_session_that_stops_does_not_stall_the_others() {
        let m = model(256);
        // (long enough that five steps waiting for the stopped session, 1 s, stand apart from
        // five that do not, with 400 ms left for a busy host)
        let gather = Duration::from_millis(200);
        let batcher = DecodeBatcher::start(Arc::clone(&m), 4, gather).unwrap();
        let idle = batcher.session(prompt_cache(&m, 4, 1));
        let mut busy = batcher.session(prompt_cache(&m, 6, 2));
        let t = Instant::now();
        busy.step(3).unwrap();
        let waited = t.elapsed();
        assert!(
            waited >= gather,
            "the batch waited for the idle session: {waited:?}"
        );
        assert!(
            waited < gather * 20,
            "but not much past the gather time: {waited:?}"
        );
        drop(idle);
        let t = Instant::now();
        for i in 0..5 {
            busy.step(i).unwrap();
        }
        assert!(
            t.elapsed() < gather * 2,
            "five steps alone waited for no one: {:?}",
            t.elapsed()
        );
    }

    /// A batch of at most one batches nothing; a stopped batcher answers with an error and
    /// leaves the session its cache.
    #[test]
    fn bad_settings_and_a_stopped_batcher_are_errors() {
        let m = model(64);
        assert!(DecodeBatcher::start(Arc::clone(&m), 1, DEFAULT_GATHER).is_err());
        let batcher = DecodeBatcher::start(Arc::clone(&m), 2, DEFAULT_GATHER).unwrap();
        let mut s = batcher.session(prompt_cache(&m, 4, 1));
        s.step(1).unwrap();
        drop(batcher);
        let err = s.step(2).unwrap_err().to_string();
        assert!(err.contains("stopped"), "{err}");
        assert_eq!(s.cache().map(|c| c.len()), Some(5));
    }
}
