//! `kvquilt bench ...`: benchmarks that print a summary and write JSON.
//!
//! Each benchmark repeats a measurement and reports the median, with the baseline it is
//! compared to measured in the same run, on the same data.

mod attention;
mod blend;
mod chat;
mod codec;
mod codec_cold;
mod codec_device;
mod decode;
mod graph;
mod load;
mod model;
mod ops;
mod remote;
mod store;
mod trace;
mod upload;

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Subcommand;
use serde::Serialize;

/// The benchmarks.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// The fused attention kernel beside the reference: `--check` on random cases, and timings.
    Attention(attention::AttentionBenchArgs),
    /// KV codecs on real chunk KV: ratio, encode/decode throughput on one core, error.
    Codec(codec::CodecBenchArgs),
    /// Decode over a cache compressed by a token policy, beside the full cache.
    Decode(decode::DecodeBenchArgs),
    /// Prefill throughput at several prompt lengths and decode throughput.
    Model(model::ModelBenchArgs),
    /// Short passes (a reuse question, decode steps) replayed as CUDA graphs beside the same
    /// passes issued op by op.
    Graph(graph::GraphBenchArgs),
    /// Host issuing time of one decoder layer's operations beside their end-to-end time.
    Ops(ops::OpsBenchArgs),
    /// Time to first token of full, reuse and blend on a RAG-shaped prompt.
    Blend(blend::BlendBenchArgs),
    /// A multi-turn RAG conversation replayed turn by turn: the history kept as pages
    /// beside kept whole and beside full prefill (time to first token per turn).
    Chat(chat::ChatBenchArgs),
    /// Store tiers against memcpy and raw file reads; put throughput; key hashing.
    Store(store::StoreBenchArgs),
    /// The remote tier on a real Redis Cluster: throughput beside the raw client, TTFT by
    /// tier, the cost model's choice, a paused primary.
    Remote(remote::RemoteBenchArgs),
    /// A RAG query stream (Zipf popularity, novel documents) replayed against the real store
    /// once per host-tier eviction policy: hit rates by tier and TTFT vs full per window.
    Trace(trace::TraceBenchArgs),
    /// Host→device copies of store hits: pinned staging vs pageable, beside the pinned peak.
    Upload(upload::UploadBenchArgs),
    /// HTTP load on a real server: chunk lookups and blend requests at several concurrencies.
    Load(load::LoadBenchArgs),
}

/// Runs one benchmark: prints a summary table and writes its JSON report.
pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Attention(a) => attention::run(a),
        BenchCommand::Codec(a) => codec::run(a),
        BenchCommand::Decode(a) => decode::run(a),
        BenchCommand::Model(a) => model::run(a),
        BenchCommand::Graph(a) => graph::run(a),
        BenchCommand::Ops(a) => ops::run(a),
        BenchCommand::Blend(a) => blend::run(a),
        BenchCommand::Chat(a) => chat::run(a),
        BenchCommand::Store(a) => store::run(a),
        BenchCommand::Load(a) => load::run(a),
        BenchCommand::Upload(a) => upload::run(a),
        BenchCommand::Remote(a) => remote::run(a),
        BenchCommand::Trace(a) => trace::run(a),
    }
}

/// The model config and report name of a `--random` shape.
pub(crate) fn random_shape(name: &str) -> Result<(kvquilt_model::ModelConfig, String)> {
    use kvquilt_model::ModelConfig;
    match name {
        "llama3.1-8b" => Ok((
            ModelConfig::llama31_8b(),
            "random weights, Llama-3.1-8B shape".into(),
        )),
        "smollm2-135m" => Ok((
            ModelConfig::smollm2_135m(),
            "random weights, SmolLM2-135M shape".into(),
        )),
        other => anyhow::bail!("unknown random shape `{other}` (known: llama3.1-8b, smollm2-135m)"),
    }
}

/// The model a benchmark runs: random weights of the `random` shape (`random_shape`), or the
/// model `args` name; with its identity and a name for reports.
pub(crate) fn bench_model(
    args: &kvquilt::model_source::ModelArgs,
    random: Option<&str>,
) -> Result<(kvquilt_model::Model, kvquilt_blend::ModelIdentity, String)> {
    match random {
        Some(shape) => {
            let device = args.device()?;
            let dtype = args.dtype(&device)?;
            let (config, name) = random_shape(shape)?;
            let mut m = kvquilt_model::Model::random(config, &device, dtype)?;
            args.configure(&mut m)?;
            let id = kvquilt_blend::ModelIdentity::for_weights(&m, &format!("random:{shape}"))?;
            Ok((m, id, name))
        }
        None => {
            let m = args.load()?;
            let id = kvquilt_blend::ModelIdentity::of(&m)?;
            let name = m.path.display().to_string();
            Ok((m.model, id, name))
        }
    }
}

/// One warm-up, then `repeats` timed runs, in seconds.
pub(crate) fn timed(repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    f()?;
    (0..repeats.max(1))
        .map(|_| {
            let t = Instant::now();
            f()?;
            Ok(t.elapsed().as_secs_f64())
        })
        .collect()
}

pub(crate) fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The CPU model and core count (Linux), for reports.
pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpu}, {} threads", threads())
}

pub(crate) fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Prints the report as JSON, or writes it to `path`.
pub(crate) fn write_report(report: &impl Serialize, path: Option<&Path>) -> Result<()> {
    let json = serde_json::to_string_pretty(report)?;
    match path {
        Some(p) => std::fs::write(p, json).with_context(|| format!("writing {}", p.display())),
        None => {
            println!("{json}");
            Ok(())
        }
    }
}
