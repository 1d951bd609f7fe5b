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
    /// an episode's scoring prompt).
    Prompt(&'a [u32]),
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
            BlockScorer::Prompt(_) => None,
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
            (BlockScorer::Prompt(prompt), None) => {
                let policy = Episodic {
                    rows: prompt.len(),
                    sinks,
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
/// on a copy that is then dropped: per layer, the mean over the prompt's rows per query head,
/// over exactly the cache's entries (the prompt's own keys cut off).
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
                    let probs = w.probs.chunks(keys).flat_map(|r| r[..t].to_vec()).collect();
                    Ok(WindowMean {
                        rows: w.rows,
                        probs,
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
