//! `kvquilt bench decode`: decode speed over a cache compressed by a token policy, beside
//! decode over the full cache, both after the same prefill in the same run.
//!
//! One prefill of `--context` tokens observes what the policy reads; the full cache and the
//! pruned copy each decode `--steps` tokens (one warm-up, then `--repeats` timed runs). The
//! prompt is pseudo-random tokens: decode speed depends on the cache's size, not its words.

use std::path::PathBuf;

use anyhow::{Context, Result};
use kvquilt_blend::compress::{compress, observe_prefill};
use kvquilt_compression::policy::{Budget, BudgetSplit, PolicySpec};
use kvquilt_model::{AttentionKernel, KvCache, Model, argmax};
use serde::Serialize;

use super::model::pseudo_tokens;
use super::{machine, median, timed, write_report};
use kvquilt::model_source::ModelArgs;

#[derive(clap::Args)]
pub struct DecodeBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Use random weights of a known shape instead of a model file (`llama3.1-8b`,
    /// `smollm2-135m`).
    #[arg(long)]
    random: Option<String>,
    /// The token policy (`snapkv`, `sage`, `h2o`, `streaming`, with `:key=value`…).
    #[arg(long, default_value = "snapkv")]
    policy: String,
    /// Compression factors (N× less KV per KV head).
    #[arg(long, value_delimiter = ',', default_value = "2,4,8")]
    compression: Vec<f32>,
    /// Prompt tokens prefilled before decoding.
    #[arg(long, default_value_t = 6000)]
    context: usize,
    /// Decode steps per timed run.
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Timed repetitions (after one warm-up).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Row {
    /// `full` or the compression factor.
    cache: String,
    kv_bytes: usize,
    /// The first step's logits with the chosen attention against the reference attention
    /// over the same cache: largest absolute difference, and whether the argmax agrees.
    check_max_abs_diff: f32,
    check_same_argmax: bool,
    tokens_per_s: f64,
    speedup_vs_full: f64,
    runs_s: Vec<f64>,
}

#[derive(Serialize)]
struct Report {
    model: String,
    device: String,
    dtype: String,
    machine: String,
    policy: String,
    context: usize,
    steps: usize,
    repeats: usize,
    rows: Vec<Row>,
}

/// One decode step over `base` with `kernel` against the reference attention: the largest
/// absolute logit difference and whether the argmax agrees.
fn check(model: &mut Model, kernel: AttentionKernel, base: &KvCache) -> Result<(f32, bool)> {
    model.set_attention_kernel(AttentionKernel::Reference);
    let want = model
        .decode_step(7, &mut base.clone(), &mut ())?
        .to_vec1::<f32>()?;
    model.set_attention_kernel(kernel);
    let got = model
        .decode_step(7, &mut base.clone(), &mut ())?
        .to_vec1::<f32>()?;
    let diff = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    Ok((diff, argmax(&got) == argmax(&want)))
}

pub(crate) fn run(a: DecodeBenchArgs) -> Result<()> {
    let spec: PolicySpec = a.policy.parse().context("--policy")?;
    let policy = spec
        .policy()
        .context("--policy full compresses nothing; name a policy")?;
    for &n in &a.compression {
        Budget::Compression(n)
            .validate()
            .with_context(|| format!("--compression {n}"))?;
    }
    let device = a.model.device()?;
    let dtype = a.model.dtype(&device)?;
    let kernel = a.model.attention_kernel()?;
    let (mut model, name) = match a.random.as_deref() {
        Some(shape) => {
            let (config, name) = super::random_shape(shape)?;
            let mut m = Model::random(config, &device, dtype)?;
            m.set_attention_kernel(kernel);
            (m, name)
        }
        None => {
            let mut m = a.model.load()?;
            m.model.set_attention_kernel(kernel);
            (m.model, m.path.display().to_string())
        }
    };
    let c = model.config().clone();
    let entry_bytes = 2 * c.head_dim * model.dtype().size_in_bytes();
    let vocab = c.vocab_size as u64;
    let ctx = pseudo_tokens(a.context, vocab);
    let pos = kvquilt_model::positions(0, ctx.len());
    let mut full = model.empty_cache()?;
    let (_, observations) = observe_prefill(&model, &ctx, &pos, &mut full, &[policy.needs()])?;
    let steps = a.steps.max(1);
    let full_check = check(&mut model, kernel, &full)?;
    let mut pruned = Vec::new();
    for &n in &a.compression {
        let c = compress(
            &model,
            &full,
            &observations,
            policy,
            Budget::Compression(n),
            &BudgetSplit::Uniform,
        )?;
        let checked = check(&mut model, kernel, &c.cache)?;
        eprintln!(
            "{n}×: attention {kernel:?} vs reference, max |Δlogit| {:.4}, same argmax {}",
            checked.0, checked.1
        );
        pruned.push((n, c, checked));
    }
    let model = &model;
    let decode = |base: &KvCache| -> Result<Vec<f64>> {
        timed(a.repeats, || {
            let mut cache = base.clone();
            for i in 0..steps {
                let token = (i as u32 * 31 + 7) % vocab as u32;
                model.decode_step(token, &mut cache, &mut ())?;
            }
            Ok(model.device().synchronize()?)
        })
    };
    let full_runs = decode(&full)?;
    let full_tps = steps as f64 / median(&full_runs);
    eprintln!("full cache ({} tokens): {full_tps:.1} tokens/s", full.len());
    let mut rows = vec![Row {
        cache: "full".into(),
        kv_bytes: full.len() * c.num_kv_heads * c.num_layers * entry_bytes,
        check_max_abs_diff: full_check.0,
        check_same_argmax: full_check.1,
        tokens_per_s: full_tps,
        speedup_vs_full: 1.0,
        runs_s: full_runs,
    }];
    for (n, pruned, checked) in pruned {
        let runs = decode(&pruned.cache)?;
        let tps = steps as f64 / median(&runs);
        eprintln!(
            "{spec} {n}×: {tps:.1} tokens/s ({:.2}× full)",
            tps / full_tps
        );
        rows.push(Row {
            cache: format!("{n}x"),
            kv_bytes: pruned.stats.kv_bytes_after,
            check_max_abs_diff: checked.0,
            check_same_argmax: checked.1,
            tokens_per_s: tps,
            speedup_vs_full: tps / full_tps,
            runs_s: runs,
        });
    }
    println!(
        "| cache | KV MB | decode tok/s | vs full | max abs Δlogit vs reference | same argmax |"
    );
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.1} | {:.1} | {:.2}× | {:.4} | {} |",
            r.cache,
            r.kv_bytes as f64 / 1e6,
            r.tokens_per_s,
            r.speedup_vs_full,
            r.check_max_abs_diff,
            r.check_same_argmax
        );
    }
    let report = Report {
        model: name,
        device: format!("{:?}", model.device()),
        dtype: format!("{:?}", model.dtype()),
        machine: machine(),
        policy: spec.to_string(),
        context: a.context,
        steps,
        repeats: a.repeats,
        rows,
    };
    write_report(&report, a.json.as_deref())
}
