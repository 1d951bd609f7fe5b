//! CUDA graphs kept between requests (feature `gpu`): a pool of `kvquilt_model::GraphedCache`s, each with
//! the graphs captured for the question lengths its requests appended, so that a `reuse`
//! request's question over a small model replays one graph instead of issuing ~11 kernels
//! per layer (BENCHMARKS §5, "CUDA graphs").
//!
//! A graphed cache is taken for one request and given back after it; capturing costs about
//! two passes, so a graph pays from its second replay on, and the pool keeps the caches (and
//! their graphs) of the last few requests. Each idle cache holds its capacity of KV on the
//! device (SmolLM2 in bf16: 23 KiB per row; 7,168 rows ≈ 165 MB).

#[cfg(feature = "gpu")]
use std::sync::{Arc, Mutex};

use kvquilt_model::{DType, ModelConfig};
#[cfg(feature = "gpu")]
use kvquilt_model::{GraphedCache, Model};

#[cfg(feature = "gpu")]
use crate::error::Result;

#[cfg(feature = "gpu")]
/// Capacities are multiples of this many rows (so that requests of nearby lengths share a
/// cache and its graphs).
const CAPACITY_STEP: usize = 1024;

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
}

/// Idle caches kept; a cache given back beyond it drops the smallest.
#[cfg(feature = "gpu")]
const KEEP: usize = 2;

#[cfg(feature = "gpu")]
impl GraphPool {
    /// A graphed cache of `model` for `rows` rows: the smallest idle one that holds them,
    /// else a new one of `rows` rounded up to [`CAPACITY_STEP`] (at most the model's context).
    pub(crate) fn take(&self, model: &Arc<Model>, rows: usize) -> Result<GraphedCache> {
        {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let fits = idle
                .iter()
                .enumerate()
                .filter(|(_, g)| g.capacity() >= rows && Arc::ptr_eq(g.model(), model))
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

    /// Keeps `g` for a later request (dropping the smallest idle cache past [`KEEP`]).
    pub(crate) fn give_back(&self, g: GraphedCache) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.push(g);
        if idle.len() > KEEP
            && let Some(i) = idle
                .iter()
                .enumerate()
                .min_by_key(|(_, g)| g.capacity())
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
