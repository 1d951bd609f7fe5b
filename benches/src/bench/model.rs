//! `kvquilt bench model`: prefill throughput at several prompt lengths, and decode.

use std::path::PathBuf;

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
    /// Timed repetitions per measurement (after one warm-up).
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
    runs_s: Vec<f64>,
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
    let mut prefill = Vec::new();
    for &n in &a.tokens {
        let toks = pseudo_tokens(n, vocab);
        let pos = kvquilt_model::positions(0, n);
        let runs = timed(a.repeats, || {
            let mut cache = model.empty_cache()?;
            model.prefill(&toks, &pos, &mut cache)?;
            sync()
        })?;
        let median = median(&runs);
        eprintln!(
            "prefill {n:>6} tokens: median {median:.3} s, {:.0} tokens/s",
            n as f64 / median
        );
        prefill.push(PrefillRow {
            tokens: n,
            median_s: median,
            tokens_per_s: n as f64 / median,
            runs_s: runs,
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
