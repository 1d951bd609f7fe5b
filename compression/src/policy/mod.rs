//! Token policies: which KV entries of a prompt's cache to keep, per layer and KV head.
//!
//! A policy sees what the model observed while the prompt ran (an [`Observation`] per layer:
//! the mean attention of the prompt's last rows per query head, and/or each key's attention
//! summed over every query) and returns a [`KeepSet`]: for every layer and KV head, the sorted row
//! indices of the cache to keep. The model runtime does the rest (`KvCache::retain` in
//! `kvquilt-model`); nothing here knows tensors.
//!
//! The shape of this module follows one trait with few required methods:
//! [`TokenPolicy::needs`] (what to observe) and [`TokenPolicy::score`] (a score per token and
//! KV head, higher kept first); [`TokenPolicy::regions`] (entries always kept: sinks, a recent
//! window) is defaulted; the rest of each head's `n` rows are its best-scored. [`select`] runs a
//! policy over every layer under a [`Budget`] and a [`BudgetSplit`].
//!
//! Budget convention (kvpress's, `../shared/research/compression.md` §1): "N× less KV" keeps
//! `n = ⌊T / N⌋` entries per KV head of a `T`-token cache; sinks and the recent window count
//! inside `n`. A budget that cannot hold a policy's always-kept regions is an error naming
//! the limit ([`PolicyError::BudgetTooSmall`]), never a silent truncation.
//!
//! Policies: [`StreamingLlm`] (sinks + recent), [`SnapKv`] (observation window, pooled,
//! mean over the GQA group), [`H2o`] (accumulated attention normalised by how many queries see
//! each token, plus a recent half), [`SageKv`] (one-time top-k by the last prompt token's
//! attention, plus sinks and a recent window). [`PolicySpec`] names them and their parameters.

mod decode;
pub mod episodes;
mod episodic;
mod h2o;
mod sage;
mod select;
mod snapkv;
mod spec;
mod streaming;
#[cfg(test)]
mod tests;

use std::fmt;
use std::ops::Range;

use thiserror::Error;

pub use decode::{DecodePool, DecodePoolSpec, PoolKeep, Schedule, Scorer};
pub use episodic::Episodic;
pub use h2o::H2o;
pub use sage::SageKv;
pub use select::{check_budget, select};
pub use snapkv::{GroupReduce, Pooling, SnapKv};
pub use spec::PolicySpec;
pub use streaming::StreamingLlm;

/// Why a policy could not run or a budget or parameter is unusable.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum PolicyError {
    /// A compression factor that is not a finite number above 1.
    #[error("compression must be a finite number > 1 (N× less KV), got {0}")]
    BadCompression(f32),
    /// The per-head budget cannot hold the entries the policy always keeps.
    #[error(
        "policy {policy}: a budget of {budget} entries per KV head is below the {needed} it always keeps ({what}, of a cache of {tokens})"
    )]
    BudgetTooSmall {
        /// The policy.
        policy: String,
        /// Entries per KV head the budget allows.
        budget: usize,
        /// Entries the policy keeps whatever the scores (its regions, at most the cache's
        /// `tokens`).
        needed: usize,
        /// Entries per KV head the cache holds.
        tokens: usize,
        /// Which regions those are (e.g. "4 sinks + 64 recent").
        what: String,
    },
    /// A policy name that does not parse.
    #[error(
        "unknown policy `{0}` (expected full, streaming, h2o, snapkv or sage, optionally with :key=value parameters)"
    )]
    UnknownPolicy(String),
    /// A parameter that does not parse or is out of range; names it.
    #[error("policy {policy}: bad parameter `{field}`: {why}")]
    BadParameter {
        /// The policy.
        policy: String,
        /// The parameter.
        field: String,
        /// What is wrong with it.
        why: String,
    },
    /// The observation handed to a policy lacks what it asked for, or has the wrong shape.
    #[error("policy {policy}, layer {layer}: {why}")]
    BadObservation {
        /// The policy.
        policy: String,
        /// The layer.
        layer: usize,
        /// What is missing or mis-shaped.
        why: String,
    },
}

/// The cache a policy compresses: `tokens` rows, `kv_heads` KV heads, each read by `group`
/// query heads (GQA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Rows of the cache being compressed (the scored prompt's tokens).
    pub tokens: usize,
    /// KV heads per layer.
    pub kv_heads: usize,
    /// Query heads per KV head.
    pub group: usize,
    /// Decoder layers.
    pub layers: usize,
}

/// What a policy wants observed while the prompt runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProbeNeeds {
    /// The mean attention of the prompt's last this-many rows (fewer when the prompt is
    /// shorter), per query head; 0 for none.
    pub last_rows: usize,
    /// Each key's attention summed over every query row and the GQA group, per KV head.
    pub column_sums: bool,
    /// With `last_rows`: also the maximum attention over those rows
    /// ([`WindowMean::max`]).
    pub row_max: bool,
}

/// The mean attention of the prompt's last `rows` rows in one layer, per query head:
/// `[kv_heads, group, tokens]` row-major f32 (query head `kv_head * group + g`). Keys after a
/// row's own position count as 0 for that row (causal inside the window).
#[derive(Debug, Clone, PartialEq)]
pub struct WindowMean {
    /// Rows averaged (the last `rows` of the prompt).
    pub rows: usize,
    /// The means, `kv_heads * group * tokens` values.
    pub probs: Vec<f32>,
    /// The maximum over the same rows, laid out as `probs`, when a policy asked for it
    /// ([`ProbeNeeds::row_max`]).
    pub max: Option<Vec<f32>>,
}

/// What the model observed in one layer while the prompt ran.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observation {
    /// Window means, one per window size asked for by the policies being served.
    pub windows: Vec<WindowMean>,
    /// `[kv_heads, tokens]` f32: key `t`'s probability summed over every query row and the
    /// heads of its KV head's group, when a policy asked for them.
    pub column_sums: Option<Vec<f32>>,
}

impl Observation {
    /// The mean over the last `rows` rows (fewer when the prompt is shorter), checked
    /// against `shape`.
    pub(crate) fn window(
        &self,
        policy: &str,
        layer: usize,
        shape: &Shape,
        rows: usize,
    ) -> Result<&WindowMean, PolicyError> {
        let bad = |why: String| PolicyError::BadObservation {
            policy: policy.into(),
            layer,
            why,
        };
        let rows = rows.min(shape.tokens);
        let w = self
            .windows
            .iter()
            .find(|w| w.rows == rows)
            .ok_or_else(|| {
                bad(format!(
                    "no mean attention of the last {rows} rows observed"
                ))
            })?;
        let want = shape.kv_heads * shape.group * shape.tokens;
        if w.probs.len() != want {
            return Err(bad(format!(
                "{} window values for a {shape:?} cache (expected {want})",
                w.probs.len()
            )));
        }
        Ok(w)
    }

    /// The column sums, checked against `shape`.
    pub(crate) fn column_sums(
        &self,
        policy: &str,
        layer: usize,
        shape: &Shape,
    ) -> Result<&[f32], PolicyError> {
        let bad = |why: String| PolicyError::BadObservation {
            policy: policy.into(),
            layer,
            why,
        };
        let s = self
            .column_sums
            .as_deref()
            .ok_or_else(|| bad("no column sums observed".into()))?;
        if s.len() != shape.kv_heads * shape.tokens {
            return Err(bad(format!(
                "{} column sums for {} KV heads × {} tokens",
                s.len(),
                shape.kv_heads,
                shape.tokens
            )));
        }
        Ok(s)
    }
}

/// How many entries each KV head keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// N× less KV: `⌊T / N⌋` entries per KV head, N finite and > 1.
    Compression(f32),
    /// This many entries per KV head (everything when the cache is shorter).
    Entries(usize),
}

impl Budget {
    /// Checks the budget's own bounds (a compression factor must be finite and > 1).
    pub fn validate(&self) -> Result<(), PolicyError> {
        match *self {
            Self::Compression(n) if !(n.is_finite() && n > 1.0) => {
                Err(PolicyError::BadCompression(n))
            }
            _ => Ok(()),
        }
    }

    /// Entries per KV head for a `tokens`-row cache (at most `tokens`, at least 1).
    pub fn per_head(&self, tokens: usize) -> usize {
        let n = match *self {
            Self::Compression(f) => (tokens as f64 / f as f64).floor() as usize,
            Self::Entries(n) => n,
        };
        n.clamp(1, tokens.max(1))
    }
}

/// How a budget spreads over layers and heads.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum BudgetSplit {
    /// The same `n` per KV head in every layer (kvpress's default; no padding anywhere).
    #[default]
    Uniform,
    /// Layer `l` keeps `n · L · w_l / Σw` per head (clamped to the cache), with one weight per
    /// layer (e.g. from a measured sensitivity profile).
    PerLayer(Vec<f32>),
    /// Each layer keeps `n · kv_heads` entries in all, chosen by score across its heads
    /// (AdaKV-style), every head keeping at least `floor` of `n` (0..=1; AdaKV uses 0.2).
    /// Heads end up holding different counts; the runtime pads and masks them.
    PerHead {
        /// The fraction of `n` every head keeps at least.
        floor: f32,
    },
    /// Both: layer `l` gets `n_l` per head from the weights, as [`BudgetSplit::PerLayer`],
    /// and keeps `n_l · kv_heads` entries chosen across its heads, as
    /// [`BudgetSplit::PerHead`] (EpiCache's default `pair` split over its per-layer budgets:
    /// `floor` 0).
    PerLayerAndHead {
        /// One weight per layer.
        weights: Vec<f32>,
        /// The fraction of `n_l` every head keeps at least.
        floor: f32,
    },
}

impl BudgetSplit {
    /// The per-layer weights, when the split has them.
    pub fn layer_weights(&self) -> Option<&[f32]> {
        match self {
            Self::PerLayer(w) | Self::PerLayerAndHead { weights: w, .. } => Some(w),
            _ => None,
        }
    }

    /// The per-head floor, when heads keep different counts.
    pub fn head_floor(&self) -> Option<f32> {
        match self {
            Self::PerHead { floor } | Self::PerLayerAndHead { floor, .. } => Some(*floor),
            _ => None,
        }
    }

    /// `self` with per-layer `weights` added: per-head splits keep their floor.
    pub fn with_layer_weights(&self, weights: Vec<f32>) -> Self {
        match self.head_floor() {
            Some(floor) => Self::PerLayerAndHead { weights, floor },
            None => Self::PerLayer(weights),
        }
    }
}

/// Entries a policy keeps whatever the scores, in a `tokens`-row cache with budget `n`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Regions {
    /// The first this-many tokens (attention sinks).
    pub sinks: usize,
    /// The last this-many tokens (the recent window).
    pub recent: usize,
    /// Any other spans kept whole (e.g. a protected prompt region).
    pub protected: Vec<Range<usize>>,
}

impl Regions {
    /// Whether row `t` of a `tokens`-row cache is always kept. Any `sinks` and `recent`, up
    /// to `usize::MAX`, are taken as given (a window wider than the cache covers all of it;
    /// test `tests::a_window_wider_than_any_cache_keeps_everything`).
    pub fn contains(&self, t: usize, tokens: usize) -> bool {
        t < self.sinks
            || tokens.saturating_sub(t) <= self.recent
            || self.protected.iter().any(|r| r.contains(&t))
    }

    /// How many of a `tokens`-row cache's rows are always kept.
    pub fn count(&self, tokens: usize) -> usize {
        (0..tokens).filter(|&t| self.contains(t, tokens)).count()
    }

    /// "4 sinks + 64 recent": for error messages.
    pub(crate) fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.sinks > 0 {
            parts.push(format!("{} sinks", self.sinks));
        }
        if self.recent > 0 {
            parts.push(format!("{} recent", self.recent));
        }
        for r in &self.protected {
            parts.push(format!("protected {}..{}", r.start, r.end));
        }
        parts.join(" + ")
    }
}

/// A keep set: for every layer and KV head, the cache rows kept, strictly increasing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeepSet {
    /// `layers[l][h]`: rows kept by KV head `h` of layer `l`.
    pub layers: Vec<Vec<Vec<u32>>>,
}

impl KeepSet {
    /// Entries kept over every layer and head.
    pub fn entries(&self) -> usize {
        self.layers.iter().flatten().map(Vec::len).sum()
    }

    /// The most entries any one head keeps (the rows a padded cache needs per layer).
    pub fn max_per_head(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(Vec::len)
            .max()
            .unwrap_or(0)
    }
}

/// Where a pruned cache's kept entries sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeptPositions {
    /// Each at its position in the prompt (kvpress's choice for every policy).
    #[default]
    Original,
    /// Renumbered 0, 1, 2, … in cache order, each KV head on its own (StreamingLLM's
    /// paper; free with pre-RoPE keys). Decoding goes on after the last one.
    Compact,
}

/// A token policy: what it observes and how it scores tokens; see the module docs.
pub trait TokenPolicy: fmt::Debug + Send + Sync {
    /// The policy's name (`snapkv`, `sage`, …).
    fn name(&self) -> &str;

    /// What the policy reads from the prompt's forward pass.
    fn needs(&self) -> ProbeNeeds;

    /// A score per KV head and token of layer `layer`, `[kv_heads][tokens]`; higher is kept
    /// first (ties to the earlier token). Scores of always-kept rows are ignored.
    fn score(
        &self,
        layer: usize,
        obs: &Observation,
        shape: &Shape,
    ) -> Result<Vec<Vec<f32>>, PolicyError>;

    /// The rows kept whatever the scores when `n` entries per head are allowed.
    fn regions(&self, _shape: &Shape, _n: usize) -> Regions {
        Regions::default()
    }

    /// Where the kept entries sit after pruning (their prompt positions by default).
    fn positions(&self) -> KeptPositions {
        KeptPositions::Original
    }
}

/// The `n` best rows of `scores` (ties to the earlier row), always-kept rows first, sorted
/// ascending. `n` must be at least the always-kept count.
pub(crate) fn top_n(scores: &[f32], regions: &Regions, n: usize) -> Vec<u32> {
    let tokens = scores.len();
    if n >= tokens {
        return (0..tokens as u32).collect();
    }
    let mut kept: Vec<u32> = (0..tokens)
        .filter(|&t| regions.contains(t, tokens))
        .map(|t| t as u32)
        .collect();
    let rest = n.saturating_sub(kept.len());
    let mut others: Vec<u32> = (0..tokens)
        .filter(|&t| !regions.contains(t, tokens))
        .map(|t| t as u32)
        .collect();
    if rest < others.len() {
        let order = |a: &u32, b: &u32| {
            scores[*b as usize]
                .total_cmp(&scores[*a as usize])
                .then(a.cmp(b))
        };
        if rest > 0 {
            others.select_nth_unstable_by(rest - 1, order);
        }
        others.truncate(rest);
    }
    kept.extend(others);
    kept.sort_unstable();
    kept
}
