//! `kvquilt bench model`: prefill throughput at several prompt lengths (timed in rounds, with
//! each length's rate over the first length's per round), and decode.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use kvquilt_model::Model;
use serde::Serialize;

use super::{median, timed, write_report};
use kvquilt::model_source::ModelArgs;

#[derive(clap::Args)]
pub struct ModelBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Use random weights of a known shape instead of a model file (`llama3.1-8b`,
    /// `smollm2-135m`).
    #[arg(long)]
    random: Option<String>,
    /// Prompt lengths to prefill, in tokens.
    #[arg(long, value_delimiter = ',', default_value = "512,2048,8192")]
    tokens: Vec<usize>,
    /// Decode steps measured after a prefill of `--decode-context` tokens.
    #[arg(long, default_value_t = 32)]
    decode: usize,
    #[arg(long, default_value_t = 512)]
    decode_context: usize,
    /// Timed repetitions per measurement (after one warm-up). Prefill runs them as rounds:
    /// each round times every length once, in the order given.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct PrefillRow {
    tokens: usize,
    median_s: f64,
    tokens_per_s: f64,
    /// One time per round, in round order.
    runs_s: Vec<f64>,
    /// Per round: this length's tokens/s over the first length's in the same round.
    rate_vs_first_per_round: Vec<f64>,
    /// The median of `rate_vs_first_per_round`.
    rate_vs_first_median: f64,
}

#[derive(Serialize)]
struct ModelBenchReport {
    model: String,
    device: String,
    dtype: String,
    /// The attention implementation asked for, and how many calls fell back to the reference.
    attention: String,
    attention_fallbacks: u64,
    /// The CPU's tiled attention precision asked for, and whether this CPU runs its bf16
    /// products at this head dimension.
    cpu_attention: String,
    cpu_bf16_available: bool,
    /// The CPU's weight-product precision in effect.
    cpu_matmul: String,
    /// The precision of the CPU's products over the GGUF's blocks in effect.
    cpu_decode: String,
    threads: usize,
    repeats: usize,
    prefill: Vec<PrefillRow>,
    decode_context: usize,
    decode_steps: usize,
    decode_tokens_per_s_median: f64,
}

pub(crate) fn run(a: ModelBenchArgs) -> Result<()> {
    let device = a.model.device()?;
    let dtype = a.model.dtype(&device)?;
    let (model, name) = match a.random.as_deref() {
        Some(shape) => {
            let (config, name) = super::random_shape(shape)?;
            let mut m = Model::random(config, &device, dtype)?;
            a.model.configure(&mut m)?;
            (m, name)
        }
        None => {
            let m = a.model.load()?;
            (m.model, m.path.display().to_string())
        }
    };
    let sync = || -> Result<()> { Ok(model.device().synchronize()?) };
    let vocab = model.config().vocab_size as u64;
    // Rounds, not blocks: every round times each length once (after one warm-up of each),
    // so a slow minute of a shared VM slows every length alike and the rate ratios between
    // lengths, taken within a round, do not depend on which length ran in it.
    let prompts: Vec<(Vec<u32>, Vec<u32>)> = a
        .tokens
        .iter()
        .map(|&n| (pseudo_tokens(n, vocab), kvquilt_model::positions(0, n)))
        .collect();
    let prefill_once = |toks: &[u32], pos: &[u32]| -> Result<f64> {
        let t = Instant::now();
        let mut cache = model.empty_cache()?;
        model.prefill(toks, pos, &mut cache)?;
        sync()?;
        Ok(t.elapsed().as_secs_f64())
    };
    for (toks, pos) in &prompts {
        prefill_once(toks, pos)?;
    }
    let mut runs = vec![Vec::new(); prompts.len()];
    for _ in 0..a.repeats.max(1) {
        for ((toks, pos), runs) in prompts.iter().zip(&mut runs) {
            runs.push(prefill_once(toks, pos)?);
        }
    }
    let mut prefill = Vec::new();
    for (i, (&n, runs_s)) in a.tokens.iter().zip(runs.iter()).enumerate() {
        let median_s = median(runs_s);
        // this length's rate over the first length's, round by round
        let ratios: Vec<f64> = runs_s
            .iter()
            .zip(&runs[0])
            .map(|(t, t0)| (n as f64 / t) / (a.tokens[0] as f64 / t0))
            .collect();
        let rate_vs_first = median(&ratios);
        eprint!(
            "prefill {n:>6} tokens: median {median_s:.3} s, {:.0} tokens/s",
            n as f64 / median_s
        );
        if i > 0 {
            eprint!(
                "; rate / {}-token rate per round {}, median {rate_vs_first:.2}",
                a.tokens[0],
                ratios
                    .iter()
                    .map(|r| format!("{r:.2}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        eprintln!();
        prefill.push(PrefillRow {
            tokens: n,
            median_s,
            tokens_per_s: n as f64 / median_s,
            runs_s: runs_s.clone(),
            rate_vs_first_per_round: ratios,
            rate_vs_first_median: rate_vs_first,
        });
    }
    let ctx = pseudo_tokens(a.decode_context, vocab);
    let pos = kvquilt_model::positions(0, ctx.len());
    let mut base = model.empty_cache()?;
    model.prefill(&ctx, &pos, &mut base)?;
    let steps = a.decode.max(1);
    let runs = timed(a.repeats, || {
        let mut cache = base.clone();
        for i in 0..steps {
            let p = (ctx.len() + i) as u32;
            model.prefill(&[(i as u32 * 31 + 7) % vocab as u32], &[p], &mut cache)?;
        }
        sync()
    })?;
    let decode_tps = steps as f64 / median(&runs);
    eprintln!(
        "decode after {} tokens: {decode_tps:.1} tokens/s",
        ctx.len()
    );
    let report = ModelBenchReport {
        model: name,
        device: format!("{:?}", model.device()),
        dtype: format!("{:?}", model.dtype()),
        attention: format!("{:?}", model.attention_kernel()),
        attention_fallbacks: model.attention_fallbacks(),
        cpu_attention: format!("{:?}", model.cpu_attention_precision()),
        cpu_matmul: format!("{:?}", model.cpu_matmul_precision()),
        cpu_decode: format!("{:?}", model.cpu_decode_precision()),
        cpu_bf16_available: kvquilt_model::CpuAttentionPrecision::bf16_available(
            model.config().head_dim,
        ),
        threads: super::threads(),
        repeats: a.repeats,
        prefill,
        decode_context: ctx.len(),
        decode_steps: steps,
        decode_tokens_per_s_median: decode_tps,
    };
    write_report(&report, a.json.as_deref())
}

/// Deterministic token ids spread over the vocabulary.
pub(crate) fn pseudo_tokens(n: usize, vocab: u64) -> Vec<u32> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab) as u32
        })
        .collect()
}
