//! Token policies applied to a prompt's cache: observe the attention a policy reads while the
//! prompt prefills, let the policy choose a keep set per layer and KV head, and prune.
//!
//! [`observe_prefill`] prefills once with an [`Observer`] hook that reduces what the policies
//! asked for layer by layer on the device (the mean over the prompt's last `w` rows per query
//! head for every window size asked, per-KV-head column sums), so no probability matrix
//! outlives its layer. [`compress`] then turns one cache and its observations into a pruned
//! copy for any number of policies and budgets: the eval harness compresses one prefill many
//! ways, the sidecar once.

use std::time::Instant;

use kvquilt_compression::policy::{
    Budget, BudgetSplit, Observation, ProbeNeeds, Shape, TokenPolicy, WindowMean, select,
};
use kvquilt_model::{HookError, KvCache, LayerHook, LayerProbe, Model, ProbeRequest, Tensor};

use crate::error::{BlendError, Result};

/// A [`LayerHook`] that keeps, per layer, what a set of policies reads: the mean attention of
/// the call's last `w` query rows per query head for each window `w`, and per-KV-head column
/// sums over every row.
#[derive(Debug)]
pub struct Observer {
    probe: Option<ProbeRequest>,
    /// Window sizes, ascending and distinct; the probe asks for the last `max` rows.
    windows: Vec<usize>,
    /// One entry per layer run, in order.
    observations: Vec<Observation>,
}

impl Observer {
    /// Observes a call of `rows` query rows for policies needing `needs`.
    pub fn new(rows: usize, needs: &[ProbeNeeds]) -> Self {
        let mut windows: Vec<usize> = needs
            .iter()
            .filter(|n| n.last_rows > 0)
            .map(|n| n.last_rows.min(rows))
            .collect();
        windows.sort_unstable();
        windows.dedup();
        let column_sums = needs.iter().any(|n| n.column_sums);
        let widest = windows.last().copied().unwrap_or(0);
        let probe = (widest > 0 || column_sums).then(|| ProbeRequest {
            rows: (rows - widest..rows).collect(),
            summed: false,
            column_sums,
        });
        Self {
            probe,
            windows,
            observations: Vec::new(),
        }
    }

    /// What was observed, one entry per layer.
    pub fn into_observations(self) -> Vec<Observation> {
        self.observations
    }

    fn reduce(
        &self,
        p: LayerProbe,
    ) -> std::result::Result<Observation, kvquilt_model::CandleError> {
        let mut windows = Vec::with_capacity(self.windows.len());
        if let Some(rows) = p.rows {
            // [kv_heads, group, widest, keys]
            let widest = rows.dims()[2];
            for &w in &self.windows {
                let mean = rows.narrow(2, widest - w, w)?.mean(2)?;
                windows.push(WindowMean {
                    rows: w,
                    probs: mean.flatten_all()?.to_vec1::<f32>()?,
                });
            }
        }
        let column_sums = match p.column_sums {
            Some(s) => Some(s.flatten_all()?.to_vec1::<f32>()?),
            None => None,
        };
        Ok(Observation {
            windows,
            column_sums,
        })
    }
}

impl LayerHook for Observer {
    fn probe(&self) -> Option<&ProbeRequest> {
        self.probe.as_ref()
    }

    fn after_attention(
        &mut self,
        _layer: usize,
        probe: LayerProbe,
    ) -> std::result::Result<(), HookError> {
        let obs = self.reduce(probe).map_err(HookError::new)?;
        self.observations.push(obs);
        Ok(())
    }
}

/// Prefills `tokens` at `positions` into `cache` (empty: the observed rows are the cache's
/// rows), observing what policies with `needs` read. Returns the last token's logits and one
/// observation per layer.
pub fn observe_prefill(
    model: &Model,
    tokens: &[u32],
    positions: &[u32],
    cache: &mut KvCache,
    needs: &[ProbeNeeds],
) -> Result<(Tensor, Vec<Observation>)> {
    if !cache.is_empty() {
        return Err(BlendError::Invalid(
            "observing a prefill needs an empty cache (observations index its rows)".into(),
        ));
    }
    let mut observer = Observer::new(tokens.len(), needs);
    let logits = model.prefill_with(tokens, positions, cache, &mut observer)?;
    Ok((logits, observer.into_observations()))
}

/// A pruned cache and what pruning did.
#[derive(Debug, Clone)]
pub struct Compressed {
    /// The cache each layer and KV head now attends over.
    pub cache: KvCache,
    /// Stats for the response and metrics.
    pub stats: CompressStats,
}

/// What compressing a cache kept and cost.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct CompressStats {
    /// Entries (token × layer × KV head) before.
    pub entries_before: usize,
    /// Entries kept.
    pub entries_kept: usize,
    /// K and V bytes before (entries × 2 × head_dim × element size).
    pub kv_bytes_before: usize,
    /// K and V bytes the pruned cache holds, padding of ragged heads included.
    pub kv_bytes_after: usize,
    /// Time the policy took to choose (scoring and selection), ms.
    pub policy_ms: f64,
    /// Time gathering the kept entries took, ms.
    pub prune_ms: f64,
}

/// `cache` (of the prompt the observations came from) pruned by `policy` to `budget`.
/// A policy error (a budget below what it always keeps, a missing observation) is
/// [`BlendError::Policy`], and `cache` is untouched either way.
pub fn compress(
    model: &Model,
    cache: &KvCache,
    observations: &[Observation],
    policy: &dyn TokenPolicy,
    budget: Budget,
    split: &BudgetSplit,
) -> Result<Compressed> {
    let c = model.config();
    let shape = Shape {
        tokens: cache.len(),
        kv_heads: c.num_kv_heads,
        group: c.group_size(),
        layers: c.num_layers,
    };
    let t0 = Instant::now();
    let keep = select(policy, observations, &shape, budget, split)?;
    let policy_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t1 = Instant::now();
    let pruned = cache.retain(&keep.layers)?;
    let prune_ms = t1.elapsed().as_secs_f64() * 1e3;
    let entry_bytes = 2 * c.head_dim * model.dtype().size_in_bytes();
    let entries_before = shape.tokens * shape.kv_heads * shape.layers;
    let stats = CompressStats {
        entries_before,
        entries_kept: keep.entries(),
        kv_bytes_before: entries_before * entry_bytes,
        kv_bytes_after: pruned.len() * shape.kv_heads * shape.layers * entry_bytes,
        policy_ms,
        prune_ms,
    };
    Ok(Compressed {
        cache: pruned,
        stats,
    })
}
