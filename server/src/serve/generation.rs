//! Decoding after a blend: sampling, stop conditions and incremental text.
//!
//! The first token comes from the blend's logits; every later one from a decode step over
//! the blended cache. Text is released as soon as it is final: never half a UTF-8 character
//! (the tokenizer decodes byte pieces to U+FFFD until complete) and never the beginning of a
//! stop string that may still complete.

use kvquilt_blend::compress::PooledDecoder;
use kvquilt_blend::{Blender, DecodeSteps};
use kvquilt_compression::policy::DecodePoolSpec;
use kvquilt_model::{KvCache, Model, Tensor, Tokenizer, argmax, log_sum_exp, top_logprobs};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::error::ApiResult;
use super::text_stream::TextStream;

/// How tokens are picked.
#[derive(Debug, Clone)]
pub(crate) struct Sampling {
    /// 0 (or absent in the request) is greedy.
    pub temperature: f32,
    /// Nucleus mass, (0, 1].
    pub top_p: f32,
    pub seed: Option<u64>,
}

/// When generation ends.
#[derive(Debug, Clone)]
pub(crate) struct Stopping {
    pub max_tokens: usize,
    pub stop_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
}

/// One token as it is produced.
#[derive(Debug, Clone)]
pub(crate) struct Step {
    pub id: u32,
    pub logprob: f32,
    /// The `k` best alternatives `(id, logprob)`, when asked for.
    pub top: Vec<(u32, f32)>,
    /// Text that became final with this token (may be empty).
    pub text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finish {
    /// An end-of-sequence token or a stop string.
    Stop,
    Length,
    /// The receiver went away (client disconnected).
    Cancelled,
}

impl Finish {
    pub(crate) fn openai(self) -> &'static str {
        match self {
            Finish::Stop | Finish::Cancelled => "stop",
            Finish::Length => "length",
        }
    }
}

/// Decodes from `logits` (of the prompt's last token at `cache`'s last position), over a
/// decode pool when given. `on_step` sees every token with the text it made final (the last
/// step also carries any held-back text); returning false stops generation. Returns why it
/// stopped, how many tokens were produced (an end-of-sequence token counts, its text is
/// empty) and how many times the decode pool was reselected.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode(
    blender: &Blender,
    tokenizer: &Tokenizer,
    cache: KvCache,
    mut logits: Tensor,
    pool: Option<DecodePoolSpec>,
    sampling: &Sampling,
    stopping: &Stopping,
    top_k: usize,
    mut on_step: impl FnMut(Step) -> bool,
) -> ApiResult<(Finish, usize, usize)> {
    // with a decode pool, generated tokens' KV is held to its budget (SCOPE)
    let model = blender.model();
    let mut steps = match pool {
        None => Steps::Plain(blender.decode_steps(cache, stopping.max_tokens)),
        Some(spec) => Steps::Pooled(Box::new(PooledDecoder::new(model, cache, spec)?)),
    };
    let mut rng = match sampling.seed {
        Some(s) => StdRng::seed_from_u64(s),
        None => StdRng::from_os_rng(),
    };
    let mut text = TextStream::new(stopping.stop_strings.clone());
    let mut produced = 0;
    while produced < stopping.max_tokens {
        let row = logits.to_vec1::<f32>()?;
        let id = pick(&row, sampling, &mut rng);
        produced += 1;
        let eos = stopping.stop_ids.contains(&id);
        let (mut released, stop_string) = if eos {
            (text.finish(tokenizer)?, false)
        } else {
            text.push(tokenizer, id)?
        };
        let length = produced == stopping.max_tokens;
        if length && !eos && !stop_string {
            released.push_str(&text.finish(tokenizer)?);
        }
        let step = Step {
            id,
            logprob: log_prob(&row, id),
            top: if top_k == 0 {
                Vec::new()
            } else {
                top_logprobs(&row, top_k)
            },
            text: released,
        };
        if !on_step(step) {
            return Ok((Finish::Cancelled, produced, steps.evictions()));
        }
        if eos || stop_string {
            return Ok((Finish::Stop, produced, steps.evictions()));
        }
        if length {
            break;
        }
        // other requests' first tokens come first (`limits.decode_yield_ms`)
        blender.yield_to_prompts();
        logits = steps.step(model, id)?;
    }
    Ok((Finish::Length, produced, steps.evictions()))
}

/// One decode step at a time: over the cache as it is (replayed as a CUDA graph where the
/// blender runs graphs: `Blender::decode_steps`), or under a decode pool.
enum Steps {
    Plain(DecodeSteps),
    Pooled(Box<PooledDecoder>),
}

impl Steps {
    fn step(&mut self, model: &Model, token: u32) -> ApiResult<Tensor> {
        Ok(match self {
            Self::Plain(steps) => steps.step(model, token)?,
            Self::Pooled(d) => d.step(model, token)?,
        })
    }

    fn evictions(&self) -> usize {
        match self {
            Self::Plain(_) => 0,
            Self::Pooled(d) => d.evictions(),
        }
    }
}

fn pick(row: &[f32], s: &Sampling, rng: &mut StdRng) -> u32 {
    if s.temperature <= 0.0 {
        return argmax(row);
    }
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f64)> = row
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as u32, (((x - max) / s.temperature) as f64).exp()))
        .collect();
    let z: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (i, p) in probs.iter().enumerate() {
        kept += p.1 / z;
        if kept >= s.top_p as f64 {
            cut = i + 1;
            break;
        }
    }
    probs.truncate(cut);
    let total: f64 = probs.iter().map(|p| p.1).sum();
    let mut u = rng.random::<f64>() * total;
    for (id, p) in &probs {
        u -= p;
        if u <= 0.0 {
            return *id;
        }
    }
    probs.last().map_or(0, |p| p.0)
}

fn log_prob(row: &[f32], id: u32) -> f32 {
    row[id as usize] - log_sum_exp(row)
}
