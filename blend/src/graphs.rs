//! CUDA graphs kept between requests (feature `gpu`): a pool of
//! `kvquilt_model::GraphedCache`s, each with the graphs captured for the row counts its
//! requests appended, so that a `reuse` request's question and a served request's decode
//! steps over a small model replay one graph instead of issuing ~11 kernels per layer
//! (BENCHMARKS §5, "Seventh pass"). `launch_bound` decides for which models that pays.
//!
//! A graphed cache is taken for one request and given back after it; capturing costs about
//! two passes, so a graph pays from its second replay on, and the pool keeps the caches (and
//! their graphs) of the last requests: at least two, as many as requests decode at once with
//! `Blender::with_idle_graphs` (the sidecar's workers). Each idle cache holds its capacity of
//! KV on the device, outside the device tier's budget (SmolLM2 in bf16: 23 KiB per row;
//! 7,168 rows ≈ 165 MB).

#[cfg(feature = "gpu")]
use std::sync::{Arc, Mutex};

#[cfg(feature = "gpu")]
use kvquilt_model::GraphedCache;
use kvquilt_model::{DType, KvCache, Model, ModelConfig, Tensor};

#[cfg(feature = "gpu")]
use crate::error::Result;

#[cfg(feature = "gpu")]
/// Capacities are multiples of this many rows (so that requests of nearby lengths share a
/// cache and its graphs).
const CAPACITY_STEP: usize = 1024;

/// What a blender's CUDA graphs did ([`crate::Blender::graph_stats`]; zeros where graphs
/// are off).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// `reuse` questions replayed as a graph.
    pub questions: u64,
    /// Query-aware `blend` requests whose query pass (the question over the cached chunks,
    /// summing the attention each token receives) replayed as a graph.
    pub query_passes: u64,
    /// Requests whose decode steps replayed a graph.
    pub decodes: u64,
    /// Graphed passes that failed (their request ran eagerly).
    pub failures: u64,
}

/// Weight bytes per layer up to which a short pass is bound by launching its kernels rather
/// than by reading its weights: at ~4.8 TB/s, 64 MB is ~13 µs of reads per layer against
/// ~100 µs of host time issuing the layer's ~11 kernels eagerly (BENCHMARKS §5).
const LAUNCH_BOUND_LAYER_BYTES: usize = 64 << 20;

/// Whether a model of this shape in `dtype` is launch-bound in its short passes (its weights
/// per layer under [`LAUNCH_BOUND_LAYER_BYTES`]): SmolLM2-135M 7 MB in bf16 (graphs measured
/// faster), Llama-3.1-8B 436 MB (measured slower).
pub(crate) fn launch_bound(c: &ModelConfig, dtype: DType) -> bool {
    let (h, d) = (c.hidden_size, c.head_dim);
    let attention = h * (c.num_heads * d + 2 * c.num_kv_heads * d) + c.num_heads * d * h;
    let mlp = 3 * h * c.intermediate_size;
    (attention + mlp) * dtype.size_in_bytes() <= LAUNCH_BOUND_LAYER_BYTES
}

/// Idle graphed caches of one model.
#[cfg(feature = "gpu")]
#[derive(Default)]
pub(crate) struct GraphPool {
    idle: Mutex<Vec<GraphedCache>>,
    /// Idle caches kept (at least [`KEEP`]; [`GraphPool::keep`]).
    keep: std::sync::atomic::AtomicUsize,
    /// Graphed passes that failed (each request then ran eagerly).
    failures: std::sync::atomic::AtomicUsize,
    /// `reuse` questions replayed.
    questions: std::sync::atomic::AtomicU64,
    /// `blend` query passes replayed.
    query_passes: std::sync::atomic::AtomicU64,
    /// Requests whose decode steps replayed a graph.
    decodes: std::sync::atomic::AtomicU64,
}

/// Failed graphed passes after which a pool is no longer used (a capture that fails once,
/// e.g. on an op that cannot be captured, fails again; an allocation may not).
#[cfg(feature = "gpu")]
const MOST_FAILURES: usize = 3;

/// Idle caches kept by default; a cache given back beyond the pool's number drops the
/// smallest.
#[cfg(feature = "gpu")]
const KEEP: usize = 2;

#[cfg(feature = "gpu")]
impl GraphPool {
    /// Keeps up to `keep` idle caches (at least [`KEEP`]): as many as requests decode at
    /// once, so that concurrent requests reuse caches and their captured graphs instead of
    /// allocating and capturing anew each time.
    pub(crate) fn keep(&self, keep: usize) {
        self.keep
            .store(keep.max(KEEP), std::sync::atomic::Ordering::Relaxed);
    }

    /// How many idle caches the pool keeps.
    pub(crate) fn kept(&self) -> usize {
        self.keep
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(KEEP)
    }

    /// A graphed cache of `model` for `rows` rows: the smallest idle one that holds them
    /// and lends no rows (a request still holding its views keeps its cache from being
    /// reloaded), else a new one of `rows` rounded up to [`CAPACITY_STEP`] (at most the
    /// model's context).
    pub(crate) fn take(&self, model: &Arc<Model>, rows: usize) -> Result<GraphedCache> {
        {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let fits = idle
                .iter()
                .enumerate()
                .filter(|(_, g)| {
                    g.capacity() >= rows && !g.is_lent() && Arc::ptr_eq(g.model(), model)
                })
                .min_by_key(|(_, g)| g.capacity())
                .map(|(i, _)| i);
            if let Some(i) = fits {
                return Ok(idle.swap_remove(i));
            }
        }
        let capacity = rows
            .next_multiple_of(CAPACITY_STEP)
            .min(model.config().context_length);
        Ok(GraphedCache::new(Arc::clone(model), capacity)?)
    }

    /// The idle cache whose rows `cache` is ([`GraphedCache::holds`]: a request's cache
    /// from its graphed question) when it has room for `rows` more, taken with `cache`
    /// dropped, so that decoding appends in place; `cache` back when no idle cache holds it
    /// with that room.
    pub(crate) fn take_holding(
        &self,
        cache: KvCache,
        rows: usize,
    ) -> std::result::Result<GraphedCache, KvCache> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let holder = idle
            .iter()
            .position(|g| g.len() + rows <= g.capacity() && g.holds(&cache));
        match holder {
            Some(i) => {
                drop(cache);
                Ok(idle.swap_remove(i))
            }
            None => Err(cache),
        }
    }

    /// What the pool's graphs did so far.
    pub(crate) fn stats(&self) -> GraphStats {
        use std::sync::atomic::Ordering::Relaxed;
        GraphStats {
            questions: self.questions.load(Relaxed),
            query_passes: self.query_passes.load(Relaxed),
            decodes: self.decodes.load(Relaxed),
            failures: self.failures.load(Relaxed) as u64,
        }
    }

    /// Counts a `reuse` question replayed as a graph.
    pub(crate) fn count_question(&self) {
        self.questions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts a `blend` query pass replayed as a graph.
    pub(crate) fn count_query_pass(&self) {
        self.query_passes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether graphed passes are still tried ([`MOST_FAILURES`]).
    pub(crate) fn usable(&self) -> bool {
        self.failures.load(std::sync::atomic::Ordering::Relaxed) < MOST_FAILURES
    }

    /// Counts a graphed pass that failed (its request runs eagerly), with a warning; past
    /// [`MOST_FAILURES`] the pool is not used again.
    pub(crate) fn failed(&self, error: &crate::BlendError) {
        let n = self
            .failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        tracing::warn!(%error, failures = n, "a graphed pass failed; running it eagerly");
        if n == MOST_FAILURES {
            tracing::warn!("CUDA graphs off for this model after {n} failures");
            self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }

    /// Keeps `g` for a later request (past the pool's number dropping the smallest idle cache that
    /// lends no rows, else the smallest: a lent one is what its request decodes in), once
    /// the work issued on it has finished: the next request may run on another thread,
    /// whose stream would not wait for this one's (the question's replay may still be in
    /// flight when a request gives it back; work queued later on the views it lent is
    /// waited for by the cache's next load). A cache whose device fails to synchronise is
    /// dropped instead.
    pub(crate) fn give_back(&self, g: GraphedCache) {
        if let Err(error) = g.model().device().synchronize() {
            tracing::warn!(%error, "dropping a graphed cache: its device did not synchronise");
            return;
        }
        if !self.usable() {
            return; // graphs are off: its memory goes back to the device
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.push(g);
        if idle.len() > self.kept()
            && let Some(i) = idle
                .iter()
                .enumerate()
                .min_by_key(|(_, g)| (g.is_lent(), g.capacity()))
                .map(|(i, _)| i)
        {
            idle.swap_remove(i);
        }
    }
}

#[cfg(feature = "gpu")]
impl std::fmt::Debug for GraphPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle = self.idle.lock().map(|i| i.len()).unwrap_or(0);
        f.debug_struct("GraphPool").field("idle", &idle).finish()
    }
}

/// Decode steps over one request's cache ([`crate::Blender::decode_steps`]): replayed from
/// a pooled graphed cache where the blender runs graphs, else [`Model::decode_step`]. Both
/// compute the same pass, bit for bit (ARCHITECTURE "Invariants").
pub enum DecodeSteps {
    /// `Model::decode_step` over the cache.
    Eager(KvCache),
    /// In batches with other requests' steps ([`crate::Blender::with_decode_batching`]).
    Batched(crate::batcher::BatchedSteps),
    /// A graphed cache taken from a pool, given back when the steps end.
    #[cfg(feature = "gpu")]
    Graphed(Graphed),
}

/// A graphed cache taken from a pool for one request's decode steps (given back on drop).
#[cfg(feature = "gpu")]
pub struct Graphed {
    cache: Option<GraphedCache>,
    pool: Arc<GraphPool>,
}

#[cfg(feature = "gpu")]
impl Drop for Graphed {
    fn drop(&mut self) {
        if let Some(g) = self.cache.take() {
            self.pool.give_back(g);
        }
    }
}

/// Decode steps planned below this many are run eagerly: a graphed cache costs a copy of the
/// request's cache in (none when the cache is a graphed question's views) and, on a cache's
/// first decode, a capture (about two steps).
#[cfg(feature = "gpu")]
pub(crate) const LEAST_GRAPHED_STEPS: usize = 4;

impl DecodeSteps {
    /// Steps over `cache` eagerly.
    pub fn eager(cache: KvCache) -> Self {
        Self::Eager(cache)
    }

    /// Steps over `cache` in a graphed cache of `pool`: the one `cache` is a view of when
    /// it came from a graphed question and that cache has room for `steps` more (no copy),
    /// else one `cache`'s rows are loaded into (a pruned cache too, its per-head positions
    /// with it); eager when the cache does not go into one (pruned with padding, too long)
    /// or its attention is corrected other than by a temperature (a parallel context whose
    /// correction moves the context's mass: the graphs' kernel applies a temperature
    /// alone).
    #[cfg(feature = "gpu")]
    pub(crate) fn graphed(
        model: &Arc<Model>,
        pool: &Arc<GraphPool>,
        cache: KvCache,
        steps: usize,
    ) -> Self {
        if steps < LEAST_GRAPHED_STEPS
            || !pool.usable()
            || cache.is_padded()
            || cache.parallel_context().is_some_and(|p| !p.keeps_mass())
            // (a pruned cache's last position may lie far past its length)
            || cache.positions.last().map_or(0, |&p| p as usize + 1) + steps
                > model.config().context_length
        {
            return Self::Eager(cache);
        }
        let cache = match pool.take_holding(cache, steps) {
            Ok(g) => return Self::taken(pool, g),
            Err(cache) => cache,
        };
        let loaded = pool
            .take(model, cache.len() + steps)
            .and_then(|mut g| match g.load(&cache) {
                Ok(()) => Ok(g),
                Err(e) => {
                    pool.give_back(g);
                    Err(e.into())
                }
            });
        match loaded {
            Ok(g) => Self::taken(pool, g),
            Err(e) => {
                tracing::warn!(error = %e, "decoding eagerly: the cache did not go into a graphed one");
                Self::Eager(cache)
            }
        }
    }

    /// Steps in `g`, taken from `pool` (given back when the steps end).
    #[cfg(feature = "gpu")]
    fn taken(pool: &Arc<GraphPool>, g: GraphedCache) -> Self {
        pool.decodes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self::Graphed(Graphed {
            cache: Some(g),
            pool: Arc::clone(pool),
        })
    }

    /// Appends `token` at the position after the cache's last and returns the next token's
    /// f32 logits `[vocab]`. A graphed step that fails is counted by the pool and run
    /// eagerly, over views of the graphed cache's rows (the first eager append copies
    /// them), as are all later steps.
    pub fn step(&mut self, model: &Model, token: u32) -> crate::Result<Tensor> {
        #[cfg(feature = "gpu")]
        if let Self::Graphed(graphed) = self {
            let Some(g) = graphed.cache.as_mut() else {
                return Err(crate::error::invalid(
                    "decode steps after their cache went back",
                ));
            };
            let pos = g.positions().last().map_or(0, |p| p + 1);
            match g.append(&[token], &[pos]) {
                Ok(logits) => return Ok(logits),
                Err(e) => {
                    graphed.pool.failed(&e.into());
                    let cache = g.cache()?;
                    *self = Self::Eager(cache);
                }
            }
        }
        match self {
            Self::Eager(cache) => Ok(model.decode_step(token, cache, &mut ())?),
            Self::Batched(b) => b.step(token),
            #[cfg(feature = "gpu")]
            Self::Graphed(_) => Err(crate::error::invalid("a graphed step fell through")),
        }
    }

    /// The cache as the steps so far left it (every step's token appended): the request's
    /// own tensors, or views of a graphed cache's rows lent to the caller (the graphed cache
    /// keeps them unchanged while any view lives: `GraphedCache::cache`). `None` only when
    /// it cannot be had (a batched session's cache out with a failed step, a graphed cache
    /// already given back or refusing a view).
    pub fn cache(&self) -> Option<KvCache> {
        match self {
            Self::Eager(cache) => Some(cache.clone()),
            Self::Batched(b) => b.cache().cloned(),
            #[cfg(feature = "gpu")]
            Self::Graphed(graphed) => graphed.cache.as_ref().and_then(|g| g.cache().ok()),
        }
    }

    /// Whether the steps replay a CUDA graph.
    pub fn is_graphed(&self) -> bool {
        !matches!(self, Self::Eager(_) | Self::Batched(_))
    }

    /// Whether the steps run in batches with other requests' ([`crate::Blender::with_decode_batching`]).
    pub fn is_batched(&self) -> bool {
        matches!(self, Self::Batched(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default model is launch-bound in bf16 and f32; the 8B shape is not (its measured
    /// graphed reuse was slower than eager).
    #[test]
    fn the_small_model_is_launch_bound_and_the_8b_shape_is_not() {
        assert!(launch_bound(&ModelConfig::smollm2_135m(), DType::BF16));
        assert!(launch_bound(&ModelConfig::smollm2_135m(), DType::F32));
        assert!(!launch_bound(&ModelConfig::llama31_8b(), DType::BF16));
    }
}
