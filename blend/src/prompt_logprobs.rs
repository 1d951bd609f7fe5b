//! A prompt's own tokens scored by the model (OpenAI's `echo` with `logprobs`, what lm-eval's
//! log-likelihood tasks read): the suffix's last hidden rows, as the request's mode built
//! the context under them, through the output head.
//!
//! Only the suffix is scored. A cached segment's tokens have no hidden state here (their KV
//! was loaded, not computed), so the suffix's first token — predicted by the segment before
//! it — has no score either; OpenAI lists the first prompt token's as `null` too.

use kvquilt_model::{Model, Tensor, log_sum_exp, top_logprobs};

use crate::error::Result;
use crate::request::BlendRequest;

/// Rows put through the output head at once: `[ROWS, vocab]` f32 logits at a time
/// (25 MiB for SmolLM2's 49,152 tokens, 63 MiB for Llama 3's 128,256), never the whole
/// suffix's.
const ROWS: usize = 128;

/// One prompt token's score: its log-probability after the tokens before it, and the `k`
/// most likely tokens at its place.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLogprob {
    /// The prompt token scored.
    pub id: u32,
    /// Its natural-log probability.
    pub logprob: f32,
    /// The `k` most likely tokens at its place `(id, logprob)`, best first.
    pub top: Vec<(u32, f32)>,
}

/// Scores `suffix[1..]` from `hidden`, the suffix's last hidden rows `[suffix.len(),
/// hidden]` (row `i` predicts token `i + 1`), with `k` alternatives each. Empty for a
/// one-token suffix.
pub(crate) fn score(
    model: &Model,
    hidden: &Tensor,
    suffix: &[u32],
    k: usize,
) -> Result<Vec<PromptLogprob>> {
    let scored = suffix.len().saturating_sub(1);
    let mut out = Vec::with_capacity(scored);
    let mut at = 0;
    while at < scored {
        let rows = ROWS.min(scored - at);
        let logits = model
            .logits(&hidden.narrow(0, at, rows)?)?
            .to_vec2::<f32>()?;
        for (row, &id) in logits.iter().zip(&suffix[at + 1..]) {
            let logprob = row
                .get(id as usize)
                .map_or(f32::NEG_INFINITY, |&x| x - log_sum_exp(row));
            out.push(PromptLogprob {
                id,
                logprob,
                top: top_logprobs(row, k),
            });
        }
        at += rows;
    }
    Ok(out)
}

/// The output head over a request's suffix: the last token's f32 logits `[vocab]` from
/// `hidden`, the suffix's last hidden rows `[suffix.len(), hidden]` (before the final
/// norm), and those rows again when the request asked to score them
/// ([`BlendRequest::prompt_logprobs`]): [`crate::Blender::run_deferring`] scores them after
/// the pass, outside the first token's time, the cost model's samples and the pass's turn
/// before other requests' decode steps. Every mode ends here, so a request's first token
/// does not depend on whether its prompt is scored.
pub(crate) fn suffix_head(
    model: &Model,
    hidden: &Tensor,
    req: &BlendRequest,
) -> Result<(Tensor, Option<Tensor>)> {
    let last = hidden.narrow(0, req.suffix.len().saturating_sub(1), 1)?;
    let logits = model.logits(&last)?.squeeze(0)?;
    Ok((logits, req.prompt_logprobs.map(|_| hidden.clone())))
}
