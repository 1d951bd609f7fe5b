//! `kvquilt bench blend`: time to first token of `full`, `reuse` and `blend` on a RAG-shaped
//! prompt (a prefix, N chunks, a question) whose chunks are already stored in the host tier,
//! and, with `--device-tier`, resident in the device tier (GPU memory) instead.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use kvquilt_blend::{BlendRequest, Blender, Mode, ModelIdentity};
use kvquilt_kvstore::{PolicyKind, StoreConfig, TieredStore};
use kvquilt_model::{Model, ModelConfig};
use serde::Serialize;

use super::model::pseudo_tokens;
use super::{median, write_report};
use kvquilt::model_source::ModelArgs;

#[derive(clap::Args)]
pub struct BlendBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Use random weights of a known shape instead of a model file (`llama3.1-8b`).
    #[arg(long)]
    random: Option<String>,
    /// Retrieved chunks per prompt.
    #[arg(long, default_value_t = 10)]
    chunks: usize,
    /// Tokens per chunk.
    #[arg(long, default_value_t = 512)]
    chunk_tokens: usize,
    /// Prefix and question (suffix) lengths, tokens.
    #[arg(long, default_value_t = 64)]
    prefix_tokens: usize,
    #[arg(long, default_value_t = 32)]
    suffix_tokens: usize,
    /// Blend recompute ratios.
    #[arg(long, value_delimiter = ',', default_value = "0.15")]
    ratios: Vec<f32>,
    /// Token-selection variants of blend (as `kvquilt eval --variants`).
    #[arg(long, value_delimiter = ',', default_value = "cacheblend")]
    variants: Vec<String>,
    /// Also time `reuse` and `blend` with the chunks resident in the device tier (the
    /// warm-up run makes them resident), beside the host-tier rows.
    #[arg(long)]
    device_tier: bool,
    /// Timed repetitions per mode (after one warm-up).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Row {
    mode: &'static str,
    /// Where the chunks came from: `host` (host tier, copied to the device layer by layer)
    /// or `gpu` (resident in the device tier); `-` for full prefill.
    tier: &'static str,
    /// Blend's token-selection variant.
    variant: Option<String>,
    ratio: Option<f32>,
    ttft_ms_median: f64,
    speedup_vs_full: f64,
    runs_ms: Vec<f64>,
}

#[derive(Serialize)]
struct Report {
    model: String,
    device: String,
    dtype: String,
    prompt_tokens: usize,
    chunks: usize,
    chunk_tokens: usize,
    rows: Vec<Row>,
}

pub(crate) fn run(a: BlendBenchArgs) -> Result<()> {
    let device = a.model.device()?;
    let dtype = a.model.dtype(&device)?;
    let (model, identity, name) = match a.random.as_deref() {
        Some("llama3.1-8b") => {
            let mut m = Model::random(ModelConfig::llama31_8b(), &device, dtype)?;
            m.set_attention_kernel(a.model.attention_kernel()?);
            let id = ModelIdentity::for_weights(&m, "random:llama3.1-8b")?;
            (m, id, "random weights, Llama-3.1-8B shape".to_string())
        }
        Some(other) => anyhow::bail!("unknown random shape `{other}` (known: llama3.1-8b)"),
        None => {
            let m = a.model.load()?;
            let id = ModelIdentity::of(&m)?;
            let name = m.path.display().to_string();
            (m.model, id, name)
        }
    };
    let rt = tokio::runtime::Runtime::new()?;
    let store = TieredStore::open(StoreConfig::host_only(64 << 30))?;
    let (model, store) = (Arc::new(model), Arc::new(store));
    let blender = Blender::new(
        Arc::clone(&model),
        identity.clone(),
        Arc::clone(&store),
        rt.handle().clone(),
    )
    .with_fallback_to_full(false);
    let resident = a.device_tier.then(|| {
        Blender::new(model, identity, store, rt.handle().clone())
            .with_fallback_to_full(false)
            .with_device_tier(u64::MAX, PolicyKind::Lru)
    });
    let vocab = blender.model().config().vocab_size as u64;
    let all = pseudo_tokens(
        a.prefix_tokens + a.chunks * a.chunk_tokens + a.suffix_tokens,
        vocab,
    );
    let (prefix, rest) = all.split_at(a.prefix_tokens);
    let (body, suffix) = rest.split_at(a.chunks * a.chunk_tokens);
    let base = BlendRequest::new(
        prefix.to_vec(),
        body.chunks(a.chunk_tokens).map(<[u32]>::to_vec).collect(),
        suffix.to_vec(),
        Mode::Full,
    );
    for seg in base.segments() {
        blender.precompute(b"", seg)?;
    }
    let mut reusing = vec![(Mode::Reuse, None, None)];
    for v in &a.variants {
        for &r in &a.ratios {
            let cfg = crate::eval::presets::preset(v, r)?;
            reusing.push((Mode::Blend(cfg), Some(r), Some(v.clone())));
        }
    }
    let mut modes = vec![(&blender, "-", Mode::Full, None, None)];
    modes.extend(
        reusing
            .iter()
            .map(|(m, r, v)| (&blender, "host", m.clone(), *r, v.clone())),
    );
    if let Some(b) = &resident {
        modes.extend(reusing.into_iter().map(|(m, r, v)| (b, "gpu", m, r, v)));
    }
    let sync = || -> Result<()> { Ok(blender.model().device().synchronize()?) };
    let mut rows: Vec<Row> = Vec::new();
    for (blender, tier, mode, ratio, variant) in modes {
        let req = BlendRequest {
            mode: mode.clone(),
            ..base.clone()
        };
        let mut runs = Vec::new();
        for i in 0..=a.repeats.max(1) {
            let t = std::time::Instant::now();
            let out = blender.run(b"", &req)?;
            let _first = out.logits.argmax(0)?.to_scalar::<u32>()?;
            sync()?;
            if i > 0 {
                runs.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let m = median(&runs);
        eprintln!(
            "{:<6} {:<4} {:<10} {:>5}: TTFT median {m:.1} ms",
            mode.name(),
            tier,
            variant.as_deref().unwrap_or(""),
            ratio.map_or(String::new(), |r| r.to_string())
        );
        rows.push(Row {
            mode: mode.name(),
            tier,
            variant,
            ratio,
            ttft_ms_median: m,
            speedup_vs_full: 0.0,
            runs_ms: runs,
        });
    }
    let full = rows[0].ttft_ms_median;
    for r in &mut rows {
        r.speedup_vs_full = full / r.ttft_ms_median;
    }
    let report = Report {
        model: name,
        device: format!("{:?}", blender.model().device()),
        dtype: format!("{:?}", blender.model().dtype()),
        prompt_tokens: all.len(),
        chunks: a.chunks,
        chunk_tokens: a.chunk_tokens,
        rows,
    };
    write_report(&report, a.json.as_deref())
}
