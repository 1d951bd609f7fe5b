//! Greedy decoding with timing: the reference generation loop every reuse mode is compared to.

use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::error::Result;
use crate::kv::KvCache;
use crate::transformer::Model;

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token was produced (it is included in the output).
    Eos,
    /// `max_tokens` were produced.
    Length,
}

/// A generated continuation and how long it took.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The generated token ids, in order (an end-of-sequence token that stopped generation
    /// included).
    pub tokens: Vec<u32>,
    /// For each generated token, the `top_k` most likely `(id, log-probability)` pairs, best first.
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    /// Why generation stopped.
    pub finish: FinishReason,
    /// From the start of the call to the first token's logits (prefill of the prompt).
    pub ttft: Duration,
    /// Time spent in decode steps after the first token.
    pub decode_time: Duration,
}

impl Generation {
    /// Decode throughput: tokens produced by decode steps per second of decode time.
    pub fn decode_tokens_per_s(&self) -> f64 {
        let steps = self.tokens.len().saturating_sub(1);
        if steps == 0 || self.decode_time.is_zero() {
            return 0.0;
        }
        steps as f64 / self.decode_time.as_secs_f64()
    }
}

/// Options of [`generate_greedy`].
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to generate (the stop token included); 0 generates nothing. Generation
    /// also ends (`Length`) when the model's context is full.
    pub max_tokens: usize,
    /// How many alternatives to report per token.
    pub top_k: usize,
    /// Token ids that stop generation.
    pub stop_ids: Vec<u32>,
}

/// Prefills `prompt` at positions `0..n` and decodes greedily (ties go to the lowest id, as
/// `torch.argmax` does). `on_token` sees each token as soon as it exists.
pub fn generate_greedy(
    model: &Model,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32),
) -> Result<Generation> {
    let start = Instant::now();
    let mut cache = model.empty_cache()?;
    let positions = crate::kv::positions(0, prompt.len());
    let logits = model.prefill(prompt, &positions, &mut cache)?;
    let ttft = start.elapsed();
    continue_greedy(model, cache, logits, opts, ttft, &mut on_token)
}

/// Decodes greedily from `logits` (of the token at `cache`'s last position) onwards.
/// `ttft` is reported as given: the caller measured how the first logits were obtained.
pub fn continue_greedy(
    model: &Model,
    mut cache: KvCache,
    mut logits: Tensor,
    opts: &GenerateOptions,
    ttft: Duration,
    on_token: &mut dyn FnMut(u32),
) -> Result<Generation> {
    let mut tokens = Vec::new();
    let mut top = Vec::new();
    let mut finish = FinishReason::Length;
    let decode_start = Instant::now();
    while tokens.len() < opts.max_tokens {
        let row = logits.to_vec1::<f32>()?;
        let next = argmax(&row);
        top.push(top_logprobs(&row, opts.top_k));
        tokens.push(next);
        on_token(next);
        if opts.stop_ids.contains(&next) {
            finish = FinishReason::Eos;
            break;
        }
        if tokens.len() == opts.max_tokens {
            break;
        }
        // the model's context is full: a `length` finish, like `max_tokens`
        let next_position = cache.positions.last().map_or(0, |&p| p as usize + 1);
        if next_position >= model.config().context_length {
            break;
        }
        logits = model.decode_step(next, &mut cache, &mut ())?;
    }
    Ok(Generation {
        tokens,
        top_logprobs: top,
        finish,
        ttft,
        decode_time: decode_start.elapsed(),
    })
}

/// Index of the largest value; the first one on ties.
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

/// `ln Σ exp(logits)`, summed in f64 from the maximum: a token's log-probability is its
/// logit minus this (one value for a row, so a token's log-probability and its entry among
/// [`top_logprobs`] agree to the bit).
pub fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    max + logits
        .iter()
        .map(|&x| ((x - max) as f64).exp())
        .sum::<f64>()
        .ln() as f32
}

/// The `k` largest log-probabilities of `logits`, best first.
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let log_z = log_sum_exp(logits);
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    idx.select_nth_unstable_by(k - 1, |&a, &b| {
        logits[b as usize].total_cmp(&logits[a as usize])
    });
    idx.truncate(k);
    idx.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    idx.into_iter()
        .map(|i| (i, logits[i as usize] - log_z))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_first_of_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
    }

    #[test]
    fn a_tokens_log_probability_is_its_top_entry_to_the_bit() {
        let l: Vec<f32> = (0..49_152)
            .map(|i| ((i * 7919) % 1000) as f32 / 97.0)
            .collect();
        let z = log_sum_exp(&l);
        for (id, lp) in top_logprobs(&l, 20) {
            assert_eq!((l[id as usize] - z).to_bits(), lp.to_bits());
        }
    }

    #[test]
    fn top_logprobs_are_normalised_and_sorted() {
        let l = [0.0f32, 2.0, 1.0, -1.0];
        let t = top_logprobs(&l, 3);
        assert_eq!(t.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2, 0]);
        let z: f32 = l.iter().map(|x| x.exp()).sum();
        assert!((t[0].1 - (2f32.exp() / z).ln()).abs() < 1e-6);
    }
}
