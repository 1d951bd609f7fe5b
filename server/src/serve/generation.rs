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
    /// The end-of-sequence token: counted among the generated tokens, listed in no
    /// logprobs (its text is not part of the answer, as OpenAI lists it).
    pub eos: bool,
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

/// What a decode did.
pub(crate) struct Decoded {
    /// Why it stopped.
    pub finish: Finish,
    /// Tokens produced (an end-of-sequence token counts, its text is empty).
    pub produced: usize,
    /// Times the decode pool was reselected.
    pub evictions: usize,
    /// The tokens fed to the model after the prompt, in order: every token produced but the
    /// last (sampled from the last step's logits, never fed).
    pub fed: Vec<u32>,
    /// The cache after the last step — the prompt's KV and `fed`'s — when the caller asked
    /// to keep it and it is what a next turn renders: `None` under a decode pool (not the
    /// whole context's KV), after a stop string (the answer is cut before tokens `fed`
    /// holds) or a client that left (no answer to render).
    pub cache: Option<KvCache>,
}

/// Decodes from `logits` (of the prompt's last token at `cache`'s last position), over a
/// decode pool when given. `on_step` sees every token with the text it made final (the last
/// step also carries any held-back text); returning false stops generation. Returns what it
/// did ([`Decoded`]); its cache only when `keep_cache` (holding it keeps the whole
/// context's KV alive until the caller drops it).
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
    keep_cache: bool,
    mut on_step: impl FnMut(Step) -> bool,
) -> ApiResult<Decoded> {
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
    let mut fed = Vec::new();
    let done = |finish, produced, steps: Steps, fed, whole: bool| Decoded {
        finish,
        produced,
        evictions: steps.evictions(),
        fed,
        cache: steps.cache().filter(|_| keep_cache && whole),
    };
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
            eos,
        };
        if !on_step(step) {
            return Ok(done(Finish::Cancelled, produced, steps, fed, false));
        }
        if eos || stop_string {
            return Ok(done(Finish::Stop, produced, steps, fed, !stop_string));
        }
        if length {
            break;
        }
        // other requests' first tokens come first (`limits.decode_yield_ms`)
        blender.yield_to_prompts();
        logits = steps.step(model, id)?;
        fed.push(id);
    }
    Ok(done(Finish::Length, produced, steps, fed, true))
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

    /// The cache as the steps left it, unless a decode pool holds it (then it is not the
    /// context's whole KV).
    fn cache(&self) -> Option<KvCache> {
        match self {
            Self::Plain(steps) => steps.cache(),
            Self::Pooled(_) => None,
        }
    }
}

/// The next token: greedy at temperature 0, else sampled from the softmax of `row / T`
/// restricted to its nucleus (the fewest most likely tokens holding `top_p` of the mass).
/// One pass over the vocabulary at `top_p = 1`; below it, the nucleus is found among the k
/// most likely tokens (a selection, k doubled until they hold the mass), so a peaked row —
/// the usual one — costs O(vocabulary), and only a flat one whose nucleus is most of the
/// vocabulary costs the full sort every token paid before. Pinned by
/// `generation::tests::sampling_follows_the_softmax_within_the_nucleus`.
fn pick(row: &[f32], s: &Sampling, rng: &mut StdRng) -> u32 {
    if s.temperature <= 0.0 || row.is_empty() {
        return argmax(row);
    }
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = row
        .iter()
        .map(|&x| (((x - max) / s.temperature) as f64).exp())
        .collect();
    let z: f64 = weights.iter().sum();
    if !z.is_finite() {
        // a +∞ or NaN logit (an overflow): the weights say nothing; greedy says what a
        // temperature of 0 would
        return argmax(row);
    }
    if s.top_p >= 1.0 {
        return draw(
            (0..row.len() as u32).map(|i| (i, weights[i as usize])),
            z,
            rng,
        );
    }
    let n = row.len();
    let mut order: Vec<u32> = (0..n as u32).collect();
    let likelier = |a: &u32, b: &u32| weights[*b as usize].total_cmp(&weights[*a as usize]);
    let mut k = n.min(64);
    let cut = loop {
        if k < n {
            order.select_nth_unstable_by(k - 1, likelier);
        }
        order[..k].sort_unstable_by(likelier);
        let mut kept = 0.0;
        let found = order[..k].iter().position(|&id| {
            kept += weights[id as usize] / z;
            kept >= s.top_p as f64
        });
        match found {
            Some(i) => break i + 1,
            None if k == n => break n,
            None => k = (2 * k).min(n),
        }
    };
    let nucleus = &order[..cut];
    let total: f64 = nucleus.iter().map(|&id| weights[id as usize]).sum();
    draw(
        nucleus.iter().map(|&id| (id, weights[id as usize])),
        total,
        rng,
    )
}

/// One token of `(id, weight)`, with probability weight / `total`.
fn draw(tokens: impl Iterator<Item = (u32, f64)>, total: f64, rng: &mut StdRng) -> u32 {
    let mut u = rng.random::<f64>() * total;
    let mut last = 0;
    for (id, w) in tokens {
        if w > 0.0 {
            last = id;
        }
        u -= w;
        if u <= 0.0 && w > 0.0 {
            return id;
        }
    }
    // (rounding left a hair of `u`: the last token with any weight)
    last
}

fn log_prob(row: &[f32], id: u32) -> f32 {
    row[id as usize] - log_sum_exp(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(temperature: f32, top_p: f32) -> Sampling {
        Sampling {
            temperature,
            top_p,
            seed: None,
        }
    }

    /// Frequencies of 40,000 draws against the softmax, within the nucleus; seeded, so the
    /// test draws the same numbers every run.
    #[test]
    fn sampling_follows_the_softmax_within_the_nucleus() {
        let mut rng = StdRng::seed_from_u64(7);
        // probabilities 1/2, 1/4, 1/8, 1/8 at temperature 1
        let row = [4f32.ln(), 2f32.ln(), 0.0, 0.0];
        let counts = |s: &Sampling, rng: &mut StdRng| {
            let mut c = [0usize; 4];
            for _ in 0..40_000 {
                c[pick(&row, s, rng) as usize] += 1;
            }
            c.map(|n| n as f64 / 40_000.0)
        };
        let f = counts(&sampling(1.0, 1.0), &mut rng);
        for (got, want) in f.iter().zip([0.5, 0.25, 0.125, 0.125]) {
            assert!((got - want).abs() < 0.01, "{f:?}");
        }
        // a nucleus of 0.7: the two likeliest, 2 : 1
        let f = counts(&sampling(1.0, 0.7), &mut rng);
        assert_eq!((f[2], f[3]), (0.0, 0.0), "{f:?}");
        assert!((f[0] - 2.0 / 3.0).abs() < 0.01, "{f:?}");
        // a nucleus of 0.5: the likeliest alone
        assert_eq!(counts(&sampling(1.0, 0.5), &mut rng), [1.0, 0.0, 0.0, 0.0]);
        // greedy
        assert_eq!(counts(&sampling(0.0, 1.0), &mut rng), [1.0, 0.0, 0.0, 0.0]);
        // an overflowed (+∞) logit is the one token, as greedy picks it
        let inf = [0.0, 1.0, f32::INFINITY, 2.0];
        for top_p in [1.0, 0.9] {
            assert_eq!(pick(&inf, &sampling(1.0, top_p), &mut rng), 2);
        }
        // a vocabulary-sized row: every draw lies in the nucleus a full sort finds
        let row: Vec<f32> = (0..50_000u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) >> 7) % 1000) as f32 / 100.0)
            .collect();
        let s = sampling(0.7, 0.9);
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let w: Vec<f64> = row
            .iter()
            .map(|&x| (((x - max) / 0.7) as f64).exp())
            .collect();
        let z: f64 = w.iter().sum();
        let mut sorted: Vec<usize> = (0..row.len()).collect();
        sorted.sort_by(|&a, &b| w[b].total_cmp(&w[a]));
        let mut kept = 0.0;
        let cut = sorted
            .iter()
            .position(|&i| {
                kept += w[i] / z;
                kept >= 0.9
            })
            .unwrap()
            + 1;
        // (ties at the cut's weight may fall on either side of it)
        let floor = w[sorted[cut - 1]];
        for _ in 0..300 {
            let id = pick(&row, &s, &mut rng) as usize;
            assert!(
                w[id] >= floor,
                "token {id} of weight {} below the nucleus",
                w[id]
            );
        }
        assert!(
            cut > 64,
            "the nucleus needs more than the first selection ({cut})"
        );
    }
}
