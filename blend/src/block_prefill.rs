//! Block-wise prefill under a KV budget (EpiCache's build, and the block-prefill SnapKV it is
//! compared with): a long context is prefilled `block` tokens at a time over a cache that
//! is evicted back to `budget` entries per KV head after every block, so the cache never
//! holds more than `budget + block` entries (plus a scoring prompt's rows while it is
//! observed). The first `sinks` tokens (the system prompt) are always kept.
//!
//! Scoring after a block: [`BlockScorer::Prompt`] appends a scoring prompt (an episode's
//! medoid segments) to a copy of the cache, observes the attention its rows pay every
//! cached entry, and drops it ([`Episodic`]); [`BlockScorer::Window`] observes the block's own
//! last rows while it prefills ([`SnapKv`]).
//!
//! Layer budgets: [`key_sensitivity`] measures how much each layer's keys depend on context
//! beyond a block (EpiCache's profile), and [`layer_weights`] turns it into the
//! [`BudgetSplit::PerLayer`] weights its build uses.

use kvquilt_compression::policy::{
    Budget, BudgetSplit, Episodic, Observation, SnapKv, TokenPolicy, WindowMean,
};
use kvquilt_model::{KvCache, Model, positions};

use crate::compress::{Observer, compress};
use crate::error::{BlendError, Result};

/// How the cache is scored after each block.
#[derive(Debug, Clone)]
pub enum BlockScorer<'a> {
    /// The attention of this prompt's rows, appended after the cache and dropped (EpiCache:
    /// an episode's scoring prompt), reduced over the rows by their mean, or by their
    /// maximum with `row_max` (the reference code's).
    Prompt {
        /// The scoring prompt.
        tokens: &'a [u32],
        /// Reduce its rows by their maximum.
        row_max: bool,
    },
    /// SnapKV over the block's last rows (block-prefill SnapKV).
    Window(SnapKv),
}

/// A context prefilled under a budget.
#[derive(Debug, Clone)]
pub struct BlockPrefilled {
    /// The cache: at most `budget` entries per KV head when the context was longer.
    pub cache: KvCache,
    /// The context's length: the position the next token takes.
    pub next_position: usize,
    /// The most rows the cache held at any time (a scoring prompt's included).
    pub peak_rows: usize,
    /// Evictions run.
    pub evictions: usize,
}

/// Prefills `tokens` in blocks of `block` over an empty cache, evicting to `budget` entries
/// per KV head (uniform over heads, `split` over layers) after every block that leaves more,
/// scoring by `scorer`; the first `sinks` tokens are always kept.
pub fn block_prefill(
    model: &Model,
    tokens: &[u32],
    block: usize,
    budget: usize,
    sinks: usize,
    split: &BudgetSplit,
    scorer: &BlockScorer<'_>,
) -> Result<BlockPrefilled> {
    if block == 0 || budget <= sinks || tokens.is_empty() {
        return Err(BlendError::Invalid(format!(
            "block prefill of {} tokens needs a block (got {block}) and a budget above the {sinks} always-kept tokens (got {budget})",
            tokens.len()
        )));
    }
    let mut cache = model.empty_cache()?;
    let (mut at, mut peak, mut evictions) = (0usize, 0usize, 0usize);
    while at < tokens.len() {
        let blk = &tokens[at..(at + block).min(tokens.len())];
        let pos = positions(at, blk.len());
        // a short last block observes (and keeps) only the rows it has
        let snap = match scorer {
            BlockScorer::Window(s) => Some(SnapKv {
                window: s.window.min(blk.len()),
                ..s.clone()
            }),
            BlockScorer::Prompt { .. } => None,
        };
        let observed: Option<Vec<Observation>> = match &snap {
            Some(snap) => {
                let mut observer = Observer::new(blk.len(), &[snap.needs()]);
                model.prefill_with(blk, &pos, &mut cache, &mut observer)?;
                Some(observer.into_observations())
            }
            None => {
                model.prefill(blk, &pos, &mut cache)?;
                None
            }
        };
        at += blk.len();
        peak = peak.max(cache.len());
        if cache.len() <= budget {
            continue;
        }
        let compressed = match (scorer, &snap) {
            (_, Some(snap)) => {
                let obs = observed.unwrap_or_default();
                compress(model, &cache, &obs, snap, Budget::Entries(budget), split)?
            }
            (BlockScorer::Window(_), None) => {
                return Err(BlendError::Invalid(
                    "a window scorer without its window".into(),
                ));
            }
            (
                BlockScorer::Prompt {
                    tokens: prompt,
                    row_max,
                },
                None,
            ) => {
                let policy = Episodic {
                    rows: prompt.len(),
                    sinks,
                    row_max: *row_max,
                };
                let obs = observe_prompt(model, &cache, prompt, at, &policy)?;
                peak = peak.max(cache.len() + prompt.len());
                compress(model, &cache, &obs, &policy, Budget::Entries(budget), split)?
            }
        };
        cache = compressed.cache;
        evictions += 1;
    }
    Ok(BlockPrefilled {
        cache,
        next_position: at,
        peak_rows: peak,
        evictions,
    })
}

/// The attention `prompt`'s rows (at positions `at..`) pay each entry of `cache`, observed
/// on a copy that is then dropped: per layer, the mean (and the maximum, when the policy
/// reduces by it) over the prompt's rows per query head, over exactly the cache's entries
/// (the prompt's own keys cut off).
fn observe_prompt(
    model: &Model,
    cache: &KvCache,
    prompt: &[u32],
    at: usize,
    policy: &Episodic,
) -> Result<Vec<Observation>> {
    if prompt.is_empty() {
        return Err(BlendError::Invalid("an empty scoring prompt".into()));
    }
    let mut scratch = cache.clone();
    let mut observer = Observer::new(prompt.len(), &[policy.needs()]);
    model.prefill_with(
        prompt,
        &positions(at, prompt.len()),
        &mut scratch,
        &mut observer,
    )?;
    let (t, keys) = (cache.len(), cache.len() + prompt.len());
    observer
        .into_observations()
        .into_iter()
        .map(|o| {
            let windows = o
                .windows
                .into_iter()
                .map(|w| {
                    if w.probs.len() % keys != 0 {
                        return Err(BlendError::Invalid(format!(
                            "a scoring observation of {} values over {keys} keys",
                            w.probs.len()
                        )));
                    }
                    let cut = |v: &[f32]| -> Vec<f32> {
                        v.chunks(keys).flat_map(|r| r[..t].to_vec()).collect()
                    };
                    Ok(WindowMean {
                        rows: w.rows,
                        probs: cut(&w.probs),
                        max: w.max.as_deref().map(cut),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Observation {
                windows,
                column_sums: None,
            })
        })
        .collect()
}

/// Tokens per window of EpiCache's sensitivity average (reference: 100).
pub const SENSITIVITY_WINDOW: usize = 100;

/// EpiCache's per-layer key sensitivity `s_l = 1 − σ_l` of `tokens` (one long sample): `σ_l`
/// is the cosine similarity of each token's key (pre-RoPE, per KV head) computed with full
/// attention and computed with only the `sinks` first tokens and the last half block in view
/// (the sample prefilled in blocks of `block`, the cache cut back to those after each block),
/// averaged over heads within windows of [`SENSITIVITY_WINDOW`] tokens and then over windows.
/// Layers whose keys change most without distant context get the largest `s_l`. The first
/// block sees the same context both ways (its keys agree up to arithmetic).
pub fn key_sensitivity(
    model: &Model,
    tokens: &[u32],
    block: usize,
    sinks: usize,
) -> Result<Vec<f32>> {
    if block < 2 || tokens.len() <= block {
        return Err(BlendError::Invalid(format!(
            "a sensitivity profile needs a sample longer than one block of at least 2 (got {} tokens, block {block})",
            tokens.len()
        )));
    }
    let n = tokens.len();
    let mut full = model.empty_cache()?;
    model.prefill(tokens, &positions(0, n), &mut full)?;
    let layers = model.config().num_layers;
    let mut windowed: Vec<Vec<kvquilt_model::Tensor>> = vec![Vec::new(); layers];
    let mut cache = model.empty_cache()?;
    let keep_recent = block / 2;
    let mut at = 0usize;
    while at < n {
        let len = block.min(n - at);
        model.prefill(&tokens[at..at + len], &positions(at, len), &mut cache)?;
        for (l, w) in windowed.iter_mut().enumerate() {
            w.push(cache.layers[l].k.narrow(0, cache.len() - len, len)?);
        }
        at += len;
        // what the next block may see: the sinks and the last half block
        let head = sinks.min(cache.len());
        let tail = keep_recent.min(cache.len() - head);
        cache = KvCache::cat(&[
            &cache.narrow(0, head)?,
            &cache.narrow(cache.len() - tail, tail)?,
        ])?;
    }
    let mut out = Vec::with_capacity(layers);
    for (l, parts) in windowed.iter().enumerate() {
        let block_k = kvquilt_model::Tensor::cat(parts, 0)?.to_dtype(kvquilt_model::DType::F32)?;
        let full_k = full.layers[l].k.to_dtype(kvquilt_model::DType::F32)?;
        // cosine per (token, head): [n, kv_heads]
        let dot = (&full_k * &block_k)?.sum(2)?;
        let norms = (full_k.sqr()?.sum(2)?.sqrt()? * block_k.sqr()?.sum(2)?.sqrt()?)?;
        let cos = (dot / norms.clamp(1e-12, f64::INFINITY)?)?
            .mean(1)?
            .to_vec1::<f32>()?;
        let windows: Vec<f32> = cos
            .chunks(SENSITIVITY_WINDOW)
            .map(|w| w.iter().sum::<f32>() / w.len() as f32)
            .collect();
        let sigma = windows.iter().sum::<f32>() / windows.len().max(1) as f32;
        out.push(1.0 - sigma);
    }
    Ok(out)
}

/// Exponent of the sensitivity in the layer budgets (the reference's scripts: 1.1).
pub const SENSITIVITY_ALPHA: f32 = 1.1;

/// [`BudgetSplit::PerLayer`] weights from a sensitivity profile as the reference code builds
/// them: the profile min-max normalised, raised to `alpha`, as shares of the total budget,
/// with every layer keeping at least a quarter of the uniform share. The weights sum to
/// the layer count (weight 1 = the uniform share). A flat profile gives uniform weights.
pub fn layer_weights(sensitivity: &[f32], alpha: f32) -> Vec<f32> {
    let l = sensitivity.len();
    if l == 0 {
        return Vec::new();
    }
    let (lo, hi) = sensitivity
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &s| {
            (a.min(s), b.max(s))
        });
    if !(hi - lo).is_finite() || hi - lo <= f32::EPSILON {
        return vec![1.0; l];
    }
    let raw: Vec<f32> = sensitivity
        .iter()
        .map(|&s| ((s - lo) / (hi - lo)).powf(alpha))
        .collect();
    let total: f32 = raw.iter().sum();
    let floor = 1.0 / (4.0 * l as f32);
    // shares with the floor, then rescaled so they sum to one again
    let shares: Vec<f32> = raw.iter().map(|r| (r / total).max(floor)).collect();
    let sum: f32 = shares.iter().sum();
    shares.iter().map(|s| s / sum * l as f32).collect()
}
