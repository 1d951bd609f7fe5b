//! `kvquilt bench blend`: time to first token of `full`, `reuse` and `blend` on a RAG-shaped
//! prompt (a prefix, N chunks, a question) whose chunks are already stored in the host tier,
//! and, with `--device-tier`, resident in the device tier (GPU memory) instead. With
//! `--host-codecs` the host-tier rows repeat for each codec the host tier holds objects in
//! (8-bit codecs cross to the device encoded and are dequantised there on CUDA).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use kvquilt_blend::{BlendRequest, Blender, Mode};
use kvquilt_kvstore::{Codec, PolicyKind, StoreConfig, TieredStore};
use kvquilt_model::{KvCache, Model, Rows};
use serde::Serialize;

use super::model::pseudo_tokens;
use super::{median, write_report};
use kvquilt::model_source::ModelArgs;

#[derive(clap::Args)]
pub struct BlendBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Use random weights of a known shape instead of a model file (`llama3.1-8b`,
    /// `smollm2-135m`).
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
    /// With `--device-tier`, the device-tier rows once more with CUDA graphs off (tier
    /// `gpu-eager`): the question issued op by op, the baseline of the graphed rows.
    #[arg(long)]
    eager_too: bool,
    /// After each row's timed runs, this many greedy decode steps over its last run's cache
    /// through `Blender::decode_steps` (what the sidecar's decode loop runs: a CUDA graph per
    /// step on the `gpu` rows of a launch-bound model, eager on `gpu-eager`), as tokens/s.
    #[arg(long, default_value_t = 0)]
    decode_steps: usize,
    /// After each blend row's timed runs, one more run with per-phase timing (device
    /// synchronised at each phase change) for a breakdown of where the time goes; and the
    /// compute floor of each CacheBlend ratio (its rows recomputed over a resident cache,
    /// no loading, no selection).
    #[arg(long)]
    phases: bool,
    /// Timed repetitions per mode (after one warm-up).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Time the modes in rounds (each round runs every mode once, full prefill first)
    /// instead of each mode's repeats one after another, and report each row's speed-up
    /// over full prefill per round: on a machine whose speed drifts over minutes (a shared
    /// VM) the ratios then compare runs minutes apart no longer.
    #[arg(long)]
    rounds: bool,
    /// Codecs the host tier holds the chunks in, one set of host rows each (`raw` first is
    /// the baseline; a lossy codec's rows read lossy KV).
    #[arg(long, value_delimiter = ',', default_value = "raw")]
    host_codecs: Vec<String>,
    /// With a lossy host codec, decode its records on the CPU (in the store) instead of on
    /// the model's device.
    #[arg(long)]
    decode_in_store: bool,
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
    /// The codec the host tier held the chunks in (host rows).
    #[serde(skip_serializing_if = "Option::is_none")]
    codec: Option<String>,
    /// Bytes the host tier held for the chunks (host rows): what a hit moves to the device.
    #[serde(skip_serializing_if = "Option::is_none")]
    held_bytes: Option<u64>,
    ttft_ms_median: f64,
    speedup_vs_full: f64,
    runs_ms: Vec<f64>,
    /// With `--rounds`: full prefill's time over this row's, round by round.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    speedup_vs_full_per_round: Vec<f64>,
    /// Their median (with `--rounds`).
    #[serde(skip_serializing_if = "Option::is_none")]
    speedup_vs_full_per_round_median: Option<f64>,
    /// `--decode-steps` greedy steps after the last run, tokens/s (setup included).
    #[serde(skip_serializing_if = "Option::is_none")]
    decode_tokens_per_s: Option<f64>,
    /// With `--phases`: one extra run's per-phase times (blend rows).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    phases: Vec<kvquilt_blend::PhaseTime>,
}

/// The compute a blend cannot avoid: layers before the check for every token, the check
/// layer's K/V projection for every token, and the recomputed rows (as many as the blend
/// recomputed, spread evenly, plus the suffix) on the layers after, over a resident cache.
#[derive(Serialize)]
struct FloorRow {
    ratio: f32,
    recomputed_tokens: usize,
    floor_ms_median: f64,
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
    #[serde(skip_serializing_if = "Vec::is_empty")]
    floors: Vec<FloorRow>,
}

pub(crate) fn run(a: BlendBenchArgs) -> Result<()> {
    let (model, identity, name) = super::bench_model(&a.model, a.random.as_deref())?;
    let codecs: Vec<Codec> = a
        .host_codecs
        .iter()
        .map(|c| Codec::parse(c).map_err(|e| anyhow::anyhow!("--host-codecs {c}: {e}")))
        .collect::<Result<_>>()?;
    if codecs.is_empty() {
        anyhow::bail!("--host-codecs names no codec");
    }
    let rt = tokio::runtime::Runtime::new()?;
    let model = Arc::new(model);
    let vocab = model.config().vocab_size as u64;
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
    // one store and blender per host codec, the chunks stored in each
    let mut hosts: Vec<(Codec, Blender, u64)> = Vec::new();
    for &codec in &codecs {
        let config = StoreConfig {
            host_codec: codec,
            ..StoreConfig::host_only(64 << 30)
        };
        let store = Arc::new(TieredStore::open(config)?);
        let b = Blender::new(
            Arc::clone(&model),
            identity.clone(),
            Arc::clone(&store),
            rt.handle().clone(),
        )
        .with_fallback_to_full(false)
        .with_device_decode(!a.decode_in_store && model.device().is_cuda());
        for seg in base.segments() {
            b.precompute(b"", seg)?;
        }
        let held = store.stats()[0].used_bytes;
        eprintln!("host tier in {codec}: {:.1} MB held", held as f64 / 1e6);
        hosts.push((codec, b, held));
    }
    let blender = &hosts[0].1;
    // device-tier blenders over the same store (the warm-up run makes the chunks resident)
    let on_device = || {
        Blender::new(
            Arc::clone(&model),
            identity.clone(),
            Arc::clone(blender.store()),
            rt.handle().clone(),
        )
        .with_fallback_to_full(false)
        .with_device_tier(u64::MAX, PolicyKind::Lru)
    };
    let resident = a.device_tier.then(on_device);
    let resident_eager = (a.device_tier && a.eager_too).then(|| on_device().with_graphs(false));
    let mut reusing = vec![(Mode::Reuse, None, None)];
    for v in &a.variants {
        for &r in &a.ratios {
            let cfg = crate::eval::presets::preset(v, r)?;
            reusing.push((Mode::Blend(cfg), Some(r), Some(v.clone())));
        }
    }
    let mut modes = vec![(blender, "-", Mode::Full, None, None, None)];
    for (codec, b, held) in &hosts {
        modes.extend(
            reusing
                .iter()
                .map(|(m, r, v)| (b, "host", m.clone(), *r, v.clone(), Some((*codec, *held)))),
        );
    }
    if let Some(b) = &resident_eager {
        modes.extend(
            reusing
                .iter()
                .map(|(m, r, v)| (b, "gpu-eager", m.clone(), *r, v.clone(), None)),
        );
    }
    if let Some(b) = &resident {
        modes.extend(
            reusing
                .into_iter()
                .map(|(m, r, v)| (b, "gpu", m, r, v, None)),
        );
    }
    let sync = || -> Result<()> { Ok(blender.model().device().synchronize()?) };
    // one request through `b`, timed to its first token (ms), with that token
    let run_once = |b: &Blender, req: &BlendRequest, tier: &str| -> Result<(f64, KvCache, u32)> {
        let t = std::time::Instant::now();
        let out = b.run(b"", req)?;
        let first = out.logits.argmax(0)?.to_scalar::<u32>()?;
        sync()?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        // a row measures reads: a chunk that failed to load (and was recomputed) voids it
        if let Some(bad) = out
            .stats
            .segments
            .iter()
            .find(|s| matches!(s, kvquilt_blend::SegmentSource::Unusable))
        {
            anyhow::bail!(
                "{} over the {tier} tier: a stored chunk could not be used ({bad:?}); see the log",
                req.mode.name()
            );
        }
        Ok((ms, out.cache, first))
    };
    let request = |mode: &Mode| BlendRequest {
        mode: mode.clone(),
        ..base.clone()
    };
    // with --rounds, every mode's timed runs first, round by round (each run's cache
    // dropped before the next, as a served request's is once answered)
    let mut round_runs: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    if a.rounds {
        for (b, tier, mode, ..) in &modes {
            run_once(b, &request(mode), tier)?;
        }
        for _ in 0..a.repeats.max(1) {
            for ((b, tier, mode, ..), runs) in modes.iter().zip(&mut round_runs) {
                runs.push(run_once(b, &request(mode), tier)?.0);
            }
        }
    }
    let full_rounds = round_runs[0].clone();
    let mut rows: Vec<Row> = Vec::new();
    let mut recomputed: Vec<(f32, usize)> = Vec::new();
    for ((blender, tier, mode, ratio, variant, held), runs) in modes.into_iter().zip(round_runs) {
        let req = request(&mode);
        let (runs, last) = if a.rounds {
            // the cache decoding continues from
            let last = if a.decode_steps > 0 {
                let (_, cache, first) = run_once(blender, &req, tier)?;
                Some((cache, first))
            } else {
                None
            };
            (runs, last)
        } else {
            let mut runs = Vec::new();
            let mut last = None;
            for i in 0..=a.repeats.max(1) {
                // the previous run's cache goes first, as a served request's does once
                // answered (a graphed reuse's cache is a view of the pooled one, which stays
                // lent while it lives)
                drop(last.take());
                let (ms, cache, first) = run_once(blender, &req, tier)?;
                if i > 0 {
                    runs.push(ms);
                }
                last = Some((cache, first));
            }
            (runs, last)
        };
        let per_round: Vec<f64> = full_rounds.iter().zip(&runs).map(|(f, r)| f / r).collect();
        let m = median(&runs);
        let decode_tokens_per_s = match last {
            Some((cache, mut token)) if a.decode_steps > 0 => {
                let t = std::time::Instant::now();
                let mut steps = blender.decode_steps(cache, a.decode_steps);
                for _ in 0..a.decode_steps {
                    token = steps
                        .step(blender.model(), token)?
                        .argmax(0)?
                        .to_scalar::<u32>()?;
                }
                let rate = a.decode_steps as f64 / t.elapsed().as_secs_f64();
                eprintln!(
                    "         decode: {rate:.1} tokens/s over {} steps ({})",
                    a.decode_steps,
                    if steps.is_graphed() {
                        "graphed"
                    } else {
                        "eager"
                    }
                );
                Some(rate)
            }
            _ => None,
        };
        let per_round_median = (!per_round.is_empty()).then(|| median(&per_round));
        eprintln!(
            "{:<6} {:<4} {:<6} {:<10} {:>5}: TTFT median {m:.1} ms{}",
            mode.name(),
            tier,
            held.map_or(String::new(), |(c, _)| c.to_string()),
            variant.as_deref().unwrap_or(""),
            ratio.map_or(String::new(), |r| r.to_string()),
            per_round_median.map_or(String::new(), |s| format!(
                "; full / this per round {}, median {s:.2}",
                per_round
                    .iter()
                    .map(|r| format!("{r:.2}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ))
        );
        let mut phases = Vec::new();
        if a.phases && matches!(mode, Mode::Blend(_) | Mode::Reuse) {
            let timed = BlendRequest {
                time_phases: true,
                ..req.clone()
            };
            let out = blender.run(b"", &timed)?;
            let _first = out.logits.argmax(0)?.to_scalar::<u32>()?;
            let line: Vec<String> = out
                .stats
                .phases
                .iter()
                .map(|p| format!("{} {:.1} (host {:.1})", p.phase, p.ms, p.host_ms))
                .collect();
            eprintln!(
                "         phases, ms (host: issuing it): {}",
                line.join(", ")
            );
            if tier == "gpu" && variant.as_deref() == Some("cacheblend") {
                recomputed.push((ratio.unwrap_or(0.0), out.stats.recomputed_tokens));
            }
            phases = out.stats.phases;
        }
        rows.push(Row {
            mode: mode.name(),
            tier,
            variant,
            ratio,
            codec: held.map(|(c, _)| c.to_string()),
            held_bytes: held.map(|(_, b)| b),
            ttft_ms_median: m,
            speedup_vs_full: 0.0,
            runs_ms: runs,
            speedup_vs_full_per_round: per_round,
            speedup_vs_full_per_round_median: per_round_median,
            decode_tokens_per_s,
            phases,
        });
    }
    let mut floors = Vec::new();
    for (ratio, count) in recomputed {
        let runs = floor_runs(blender.model(), &all, a.suffix_tokens, count, a.repeats)?;
        let m = median(&runs);
        eprintln!("floor  gpu  cacheblend {ratio:>5}: {m:.1} ms ({count} tokens recomputed)");
        floors.push(FloorRow {
            ratio,
            recomputed_tokens: count,
            floor_ms_median: m,
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
        floors,
    };
    write_report(&report, a.json.as_deref())
}

/// Timed runs (ms) of a blend's unavoidable compute over a resident full-prefill cache of
/// `tokens`: every token through layer 0 and the check layer's K/V projection (CacheBlend's
/// check layer is 1), then `count` non-suffix rows spread evenly plus the suffix through
/// layers 1.., then the head. Nothing is loaded or selected.
fn floor_runs(
    model: &Model,
    tokens: &[u32],
    suffix: usize,
    count: usize,
    repeats: usize,
) -> Result<Vec<f64>> {
    let n = tokens.len();
    let layers = model.config().num_layers;
    let mut cache = model.empty_cache()?;
    model.prefill(tokens, &kvquilt_model::positions(0, n), &mut cache)?;
    let non_suffix = n - suffix;
    let step = non_suffix as f64 / count.max(1) as f64;
    let mut rows: Vec<usize> = (0..count.min(non_suffix))
        .map(|i| (i as f64 * step) as usize)
        .collect();
    rows.dedup();
    rows.extend(non_suffix..n);
    let all: Vec<usize> = (0..n).collect();
    let pick = kvquilt_model::Tensor::new(
        rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
        model.device(),
    )?;
    let mut runs = Vec::new();
    for i in 0..=repeats.max(1) {
        let mut c = cache.clone();
        model.device().synchronize()?;
        let t = std::time::Instant::now();
        let hidden = model.embed(tokens)?;
        let h = model
            .run_layers(0..1, hidden, Rows::Replace(&all), &mut c, None)?
            .hidden;
        let _check_kv = model.kv_projection(1, &h)?;
        let h = h.index_select(&pick, 0)?;
        let h = model
            .run_layers(1..layers, h, Rows::Replace(&rows), &mut c, None)?
            .hidden;
        let logits = model.logits(&h.narrow(0, rows.len() - 1, 1)?)?;
        let _first = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
        if i > 0 {
            runs.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(runs)
}
