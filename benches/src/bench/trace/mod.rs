//! `kvquilt bench trace`: a stream of RAG queries over a corpus made from the vendored data,
//! replayed against the real store once per host-tier eviction policy and host codec.
//!
//! The corpus is the vendored MuSiQue passages (each as the document text the RAG prompt
//! uses), tokenized by the model's tokenizer and cut into chunks of `--chunk-tokens`. Each
//! query retrieves `--k` distinct chunks: with probability `--novel` a chunk never seen
//! before (a new document), otherwise a corpus chunk drawn by Zipf(s) popularity over a
//! seeded random ranking. The store is a real [`TieredStore`]: a host tier of
//! `--host-capacity` × the corpus's raw KV bytes (the model's dtype; the tier weighs what it
//! holds in its codec's bytes) under the policy tried, and with
//! `--ssd-capacity` > 0 an SSD tier (RocksDB, LRU) below it. A query reads its chunks (hits
//! are real reads, promoted from the SSD), then stores its misses, as the sidecar's
//! store-back does.
//!
//! Objects are held at 1/(the model's layer count) of their real size (one layer of the
//! model's layout, synthetic values), so a trace of thousands of queries runs in seconds;
//! capacities scale with them, and bytes reported are real-size. With `--host-codecs`
//! the host tier holds the chunks in each codec in turn (one set of runs each): a codec
//! without an entropy coder stores one such layer in the bytes it stores a real one in (an
//! encoded object's header, weighed with it, is amortised over one layer instead of all:
//! about 1% of an int8 chunk, so the tier holds about 1% fewer chunks than of real KV; a
//! raw tier weighs no header). Model time comes from the measured cost model, not from
//! running the model per query: at start the real model (and blender) is timed on
//! real prompts of this corpus — full prefill at three lengths and a chunk's prefill alone
//! (what a miss's store-back costs), each fit affine in the prefill's work (tokens plus κ
//! per query–key pair, as the blender's cost model weighs them), the default blend with every chunk
//! in the host tier and with a third and two thirds of them missing (its fraction of full
//! prefill, fit against the fraction of tokens missed: a blend computes its misses in its
//! own pass; measured over a host tier of each `--host-codecs` codec, so a hit's decode is
//! in it, the codecs' runs interleaved, one slope for all), and real-size SSD reads — and a
//! query's TTFT is that blend at the query's miss fraction plus the SSD reads, capped at full prefill (the engine falls back to full when
//! that is faster: `Plan::fallback`).
//!
//! Beside every run stands the stream's warm-store reference: the same queries over a store
//! holding the whole corpus precomputed (the precompute job run over it), only their new
//! documents computed — modelled per query (their share of tokens as the miss fraction), or
//! with `--real --reference` replayed with real blends. The bounded store's speedup over it
//! says how much of what this stream can get from a warm store the store keeps; the
//! warm-cache ratio (every retrieved chunk a hit) is reported too, and no store reaches it on
//! a stream with new documents.
//!
//! The modelled trace closes each stream's runs with three reference host tiers of the
//! same bytes ([`oracle`]): `perfect-lfu` counts every pick ever made (unbounded memory,
//! admission by count: what frequency learnt online can do), `popularity` keeps the chunks
//! the stream's Zipf draw ranks most popular (the best online policy for independent
//! draws), `clairvoyant` is Belady's cache, which knows every future query (the most hits
//! any policy could have; the last two exactly so for chunks of one size). Between them and
//! the precomputed corpus lies what only more bytes (a smaller codec, a larger tier) can
//! close (not run with `--ssd-capacity`: they have no SSD tier below them).
//! `--host-capacity` takes a list, so one measurement of the costs serves a sweep of
//! capacities.
//!
//! "The default blend" is what `serve` runs for this model without a ratio: its calibration
//! record's settings (`qzero` at 0.3 for the default model on the CPU), or, for a model
//! without a certified record (the random shapes), the uncalibrated default; the report's
//! `costs.blend` names which.

mod costs;
mod oracle;
mod replay;
mod stream;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use kvquilt::model_source::ModelArgs;
use kvquilt_blend::calibration::{self, BlendDefault};
use kvquilt_blend::{BlendConfig, Blender, ModelIdentity};
use kvquilt_kvstore::{Codec, PolicyKind, StoreConfig, TieredStore};
use kvquilt_model::DType;
use serde::Serialize;

use super::{machine, median, write_report};
use costs::{BlendCost, Costs, measure};
use oracle::Oracle;
use replay::{HostSpec, RealQueries, Window, check_codec, replay, replay_oracle, scaled_layout};
use stream::{StreamSpec, corpus, popularity_ranks, stream};

#[derive(clap::Args)]
pub struct TraceBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Use random weights of a known shape (`llama3.1-8b`, `smollm2-135m`) for the model's
    /// time; the corpus is still tokenized by the model file's tokenizer.
    #[arg(long)]
    random: Option<String>,
    /// Examples whose passages make the corpus (MuSiQue format).
    #[arg(long, default_value = "data/musique_dev.json")]
    input: PathBuf,
    /// Tokens per corpus chunk (passages are cut into pieces of this many; a last piece
    /// under a quarter of it is dropped).
    #[arg(long, default_value_t = 128)]
    chunk_tokens: usize,
    /// Keep only the first this-many corpus chunks (0: all), so that a short trace (`--real`)
    /// reaches a steady state.
    #[arg(long, default_value_t = 0)]
    corpus_limit: usize,
    /// Queries in the trace.
    #[arg(long, default_value_t = 2400)]
    queries: usize,
    /// Queries before measurement starts (the cache fills).
    #[arg(long, default_value_t = 400)]
    warmup: usize,
    /// Queries per reported window.
    #[arg(long, default_value_t = 200)]
    window: usize,
    /// Chunks retrieved per query.
    #[arg(long, default_value_t = 10)]
    k: usize,
    /// Zipf exponents of document popularity, one trace each.
    #[arg(long, value_delimiter = ',', default_value = "0.8,1.1")]
    zipf: Vec<f64>,
    /// Probability that a retrieved chunk is a new document, never seen before.
    #[arg(long, default_value_t = 0.2)]
    novel: f64,
    /// Host tier capacities as fractions of the corpus's raw KV bytes (whatever the host
    /// codec: the tier weighs what it holds in that codec's bytes), one set of runs each.
    #[arg(long, value_delimiter = ',', default_value = "0.2")]
    host_capacity: Vec<f64>,
    /// SSD tier capacity as a fraction of the corpus's KV bytes (0: no SSD tier).
    #[arg(long, default_value_t = 0.0)]
    ssd_capacity: f64,
    /// Host-tier eviction policies compared (the modelled trace adds its reference tiers
    /// `perfect-lfu`, `popularity` and `clairvoyant` after them, unless `--ssd-capacity`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "lru,lfu,s3fifo,cost-aware"
    )]
    policies: Vec<String>,
    /// Codecs the host tier holds exact chunks in, one set of runs each (a lossy one's
    /// hits read lossy KV: its accuracy cost is in BENCHMARKS.md §6, for the served blend
    /// under int8 in §12 "Under a lossy codec"). The modelled trace
    /// takes codecs without lz4 (its values are synthetic); `--real` takes any.
    #[arg(long, value_delimiter = ',', default_value = "raw")]
    host_codecs: Vec<String>,
    /// Seed of the ranking, the query stream and the novel chunks.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run the real blender per query (real chunk KV in the store, the model computing
    /// misses and the default blend; fallback to full prefill and store-back as served)
    /// instead of the cost model; TTFT is measured, and so is full prefill's, of the same
    /// prompt right after (on a blender of its own). For short traces: a query costs a real
    /// blend and a full prefill.
    #[arg(long)]
    real: bool,
    /// With `--real`: also replay each host codec's stream over a store holding the whole
    /// corpus precomputed (room for all of it; new documents computed, not stored), the
    /// stream's warm-store reference. The modelled trace always models it, per query.
    #[arg(long)]
    reference: bool,
    /// With `--real`: replay only the precomputed corpus (`--reference` without the
    /// policies' streams), reported as policy `precomputed-corpus` — the reference of a
    /// stream too long for one call, run apart from it.
    #[arg(long)]
    reference_only: bool,
    /// After each replay: host-tier hit throughput with this many threads reading the warm
    /// store at once (each a list; empty: skipped).
    #[arg(long, value_delimiter = ',', default_value = "1,2,8")]
    hit_threads: Vec<usize>,
    /// Timed repetitions of each cost measurement (after one warm-up).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Run {
    zipf: f64,
    /// A store policy's name, or a reference tier's (`perfect-lfu`, `popularity`,
    /// `clairvoyant`: modelled only).
    policy: String,
    host_codec: String,
    /// The host tier's capacity as a fraction of the corpus's raw KV bytes (`None`: the
    /// precomputed corpus, room for all of it).
    host_capacity: Option<f64>,
    windows: Vec<Window>,
    /// Over the queries after warm-up.
    host_hit_rate: f64,
    hit_rate: f64,
    speedup_median: f64,
    /// The first window after warm-up, the lowest later window, and their ratio (whether
    /// the steady state decays).
    warm_speedup: f64,
    lowest_later_speedup: f64,
    kept_fraction: f64,
    /// `speedup_median` over the warm-cache ratio (every retrieved chunk a host hit:
    /// `1 / costs.blends[i].warm_fraction`), which a stream with new documents cannot reach.
    of_warm_cache: f64,
    /// The same queries' median speedup (after warm-up) over a store holding the whole
    /// corpus precomputed, and `speedup_median` over it: how much of what this stream can
    /// get from a warm store the bounded store keeps. Modelled per query in the modelled
    /// trace; with `--real`, measured by `--reference` (else `None`).
    precomputed_speedup: Option<f64>,
    of_precomputed: Option<f64>,
    /// The `--reference` replay's windows (`--real` only).
    precomputed_windows: Vec<Window>,
    seconds: f64,
    /// Lookups per second on the warm store by thread count (`--hit-threads`).
    hit_throughput: Vec<(usize, f64)>,
}

#[derive(Serialize)]
struct Report {
    model: String,
    machine: String,
    corpus_chunks: usize,
    corpus_tokens: usize,
    corpus_bytes: u64,
    chunk_tokens: usize,
    queries: usize,
    warmup: usize,
    k: usize,
    novel: f64,
    host_capacity: Vec<f64>,
    ssd_capacity: f64,
    scale: u64,
    /// (The ideal speed-up, every chunk a host hit, is `1 / costs.blends[i].warm_fraction`.)
    costs: Costs,
    /// Whether each query ran the real blender (`--real`) or the cost model.
    real_blends: bool,
    runs: Vec<Run>,
}

/// What a run's host tier evicts by: a store policy, or an oracle (modelled only).
#[derive(Clone, Copy)]
enum HostPolicy {
    Store(PolicyKind),
    Oracle(Oracle),
}

/// The blend every query runs: what `serve` runs for this model without a ratio.
struct Blend {
    config: BlendConfig,
    /// Where it came from (the calibration record, or why there is none).
    label: String,
}

/// The median over the windows after warm-up of `f` (`None` when a window has none).
fn after_warmup_median(windows: &[Window], f: impl Fn(&Window) -> Option<f64>) -> Option<f64> {
    let xs: Option<Vec<f64>> = windows.iter().filter(|w| !w.warmup).map(f).collect();
    xs.filter(|v| !v.is_empty()).map(|v| median(&v))
}

/// A run's summary from its windows: `(zipf, policy, host codec, host capacity)` names it,
/// `cost` is the blend's over that codec's host tier (for the warm-cache ratio).
fn summarize(
    (zipf, policy, codec, host_capacity): (f64, &str, Codec, Option<f64>),
    cost: &BlendCost,
    windows: Vec<Window>,
    seconds: f64,
    hit_throughput: Vec<(usize, f64)>,
) -> Run {
    let after: Vec<&Window> = windows.iter().filter(|w| !w.warmup).collect();
    let mean = |f: &dyn Fn(&Window) -> f64| {
        after.iter().map(|w| f(w)).sum::<f64>() / after.len().max(1) as f64
    };
    let warm_speedup = after.first().map_or(f64::NAN, |w| w.speedup_median);
    // (no later window: the warm one)
    let lowest_later_speedup = after
        .iter()
        .skip(1)
        .map(|w| w.speedup_median)
        .reduce(f64::min)
        .unwrap_or(warm_speedup);
    let speedup_median = median(&after.iter().map(|w| w.speedup_median).collect::<Vec<_>>());
    let precomputed_speedup = after_warmup_median(&windows, |w| w.precomputed_speedup_median);
    Run {
        zipf,
        policy: policy.to_string(),
        host_codec: codec.to_string(),
        host_capacity,
        host_hit_rate: mean(&|w| w.host_hit_rate),
        hit_rate: mean(&|w| w.host_hit_rate + w.ssd_hit_rate),
        speedup_median,
        warm_speedup,
        lowest_later_speedup,
        kept_fraction: lowest_later_speedup / warm_speedup,
        of_warm_cache: speedup_median * cost.warm_fraction,
        precomputed_speedup,
        of_precomputed: precomputed_speedup.map(|p| speedup_median / p),
        precomputed_windows: Vec::new(),
        windows,
        seconds,
        hit_throughput,
    }
}

/// A host capacity as the log prints it (`all`: the precomputed corpus).
fn capacity_label(c: Option<f64>) -> String {
    c.map_or_else(|| "all ".to_string(), |c| format!("{c:.2}"))
}

pub(crate) fn run(a: TraceBenchArgs) -> Result<()> {
    if a.k == 0 || a.queries <= a.warmup || a.window == 0 || !a.warmup.is_multiple_of(a.window) {
        bail!(
            "need --k ≥ 1, --queries > --warmup, and --warmup a multiple of --window (got k {}, queries {}, warmup {}, window {})",
            a.k,
            a.queries,
            a.warmup,
            a.window
        );
    }
    if !(0.0..1.0).contains(&a.novel)
        || a.host_capacity.is_empty()
        || a.host_capacity.iter().any(|&c| c.is_nan() || c <= 0.0)
        || a.ssd_capacity < 0.0
    {
        bail!("novel must be in [0, 1), host capacity > 0, SSD capacity ≥ 0");
    }
    if (a.reference || a.reference_only) && !a.real {
        bail!(
            "--reference and --reference-only are for --real (the modelled trace models the reference per query)"
        );
    }
    let policies: Vec<(String, PolicyKind)> = a
        .policies
        .iter()
        .map(|p| {
            PolicyKind::from_name(p)
                .map(|k| (p.clone(), k))
                .with_context(|| format!("unknown policy `{p}`"))
        })
        .collect::<Result<_>>()?;
    let host_codecs: Vec<Codec> = a
        .host_codecs
        .iter()
        .map(|c| Codec::parse(c).with_context(|| format!("--host-codecs {c}")))
        .collect::<Result<_>>()?;
    if host_codecs.is_empty() {
        bail!("--host-codecs names no codec");
    }
    if !a.real
        && let Some(c) = host_codecs.iter().find(|c| c.uses_lz4())
    {
        bail!(
            "--host-codecs {c}: the modelled trace stores synthetic values, on which an entropy coder's ratio means nothing; use --real"
        );
    }
    let (model, identity, name, tokenizer) = match a.random.as_deref() {
        // random weights of a shape; the corpus is tokenized by the model file's tokenizer
        // (loaded on the CPU, its weights dropped): its ids are valid in the shape's vocab
        Some(shape) => {
            let text_model =
                kvquilt_model::load(&a.model.path()?, &kvquilt_model::Device::Cpu, DType::F32)?;
            let tokenizer = text_model.tokenizer()?.clone();
            let (config, name) = super::random_shape(shape)?;
            if tokenizer.vocab_size() > config.vocab_size {
                bail!("the tokenizer's vocabulary does not fit the {shape} shape");
            }
            let device = a.model.device()?;
            let mut m = kvquilt_model::Model::random(config, &device, a.model.dtype(&device)?)?;
            a.model.configure(&mut m)?;
            let id = ModelIdentity::for_weights(&m, &format!("random:{shape}"))?;
            (m, id, name, tokenizer)
        }
        None => {
            let loaded = a.model.load()?;
            let identity = ModelIdentity::of(&loaded)?;
            let name = loaded.path.display().to_string();
            let tokenizer = loaded.tokenizer()?.clone();
            (loaded.model, identity, name, tokenizer)
        }
    };
    let chunks = corpus(&a, &tokenizer)?;
    let question = tokenizer.encode("Question: Which of these documents answers the question asked here? Answer within 5 words.")?;
    let rt = tokio::runtime::Runtime::new()?;
    let model = Arc::new(model);
    let blender = Blender::new(
        Arc::clone(&model),
        identity.clone(),
        Arc::new(TieredStore::open(StoreConfig::host_only(64 << 30))?),
        rt.handle().clone(),
    )
    .with_fallback_to_full(false);
    eprintln!(
        "measuring the model and the SSD on this corpus ({} chunks)…",
        chunks.len()
    );
    // the blend `serve` would run for this model: its calibration record's, else the
    // uncalibrated default (the random shapes have no record)
    let served = BlendDefault::from_record(
        calibration::find(None, &identity)?.as_ref(),
        true,
        &a.model.device,
    );
    let blend = Blend {
        label: match &served {
            BlendDefault::Calibrated {
                config,
                source,
                variant,
            } => format!("calibrated: {variant} at ratio {} ({source})", config.ratio),
            BlendDefault::Uncalibrated { reason, .. } => format!(
                "uncalibrated ({reason}): the default, query-aware at ratio {}",
                served.config().ratio
            ),
        },
        config: served.config(),
    };
    eprintln!("blend: {}", blend.label);
    // the default blend timed over a host tier of each codec
    let hosts: Vec<(String, Blender)> = host_codecs
        .iter()
        .map(|&codec| {
            let config = StoreConfig {
                host_codec: codec,
                ..StoreConfig::host_only(64 << 30)
            };
            let b = Blender::new(
                Arc::clone(&model),
                identity.clone(),
                Arc::new(TieredStore::open(config)?),
                rt.handle().clone(),
            )
            .with_fallback_to_full(false);
            Ok((codec.to_string(), b))
        })
        .collect::<Result<_>>()?;
    if !a.real {
        let layout = scaled_layout(blender.codec(b"").layout());
        for &codec in &host_codecs {
            check_codec(&layout, codec, a.chunk_tokens)?;
        }
    }
    let costs = measure(&a, &blender, &hosts, &rt, &chunks, &question, &blend)?;
    drop(hosts);
    let corpus_tokens: usize = chunks.iter().map(Vec::len).sum();
    let layout = scaled_layout(&costs.layout);
    let scale = u64::from(costs.layout.num_layers);
    let corpus_bytes: u64 = chunks.iter().map(|c| layout.object_bytes(c.len())).sum();
    eprintln!(
        "prefill of t tokens as work w = t + κ·t(t+1)/2 (κ = {:.2e}): full {:.2} ms + {:.3} ms/w; \
         chunk {:.2} + {:.3} ms/w; SSD {:.2} GB/s",
        costs.pair_work,
        costs.full_fixed_s * 1e3,
        costs.full_per_work_s * 1e3,
        costs.chunk_fixed_s * 1e3,
        costs.chunk_per_work_s * 1e3,
        costs.ssd_bytes_per_s / 1e9
    );
    for b in &costs.blends {
        eprintln!(
            "host tier {}: warm blend {:.2} of full (ideal speedup {:.2}×); with a fraction m of tokens missed {:.2} + {:.2}·m of full",
            b.host_codec,
            b.warm_fraction,
            1.0 / b.warm_fraction,
            b.fixed,
            b.per_missed
        );
    }
    let real = RealQueries {
        a: &a,
        model: &model,
        identity: &identity,
        rt: &rt,
        costs: &costs,
        chunks: &chunks,
        question: &question,
        blend: &blend.config,
    };
    let mut runs = Vec::new();
    for &s in &a.zipf {
        let spec = StreamSpec {
            queries: a.queries,
            k: a.k,
            novel: a.novel,
            s,
            seed: a.seed,
        };
        let queries = stream(spec, chunks.len());
        let ranks = popularity_ranks(a.seed, chunks.len());
        // the modelled trace closes each codec's runs with the reference host tiers (which
        // have no SSD tier below them: not run beside one)
        let oracles = if a.real || a.ssd_capacity > 0.0 {
            vec![]
        } else {
            vec![Oracle::PerfectLfu, Oracle::Popularity, Oracle::Clairvoyant]
        };
        let tried = policies
            .iter()
            .filter(|_| !a.reference_only)
            .map(|(n, p)| (n.clone(), HostPolicy::Store(*p)))
            .chain(
                oracles
                    .into_iter()
                    .map(|o| (o.name().to_string(), HostPolicy::Oracle(o))),
            );
        let hosts: Vec<_> = a
            .host_capacity
            .iter()
            .flat_map(|&capacity| {
                host_codecs
                    .iter()
                    .zip(&costs.blends)
                    .map(move |(&codec, cost)| (codec, capacity, cost))
            })
            .collect();
        for ((pname, policy), &(codec, capacity, cost)) in
            tried.flat_map(|p| hosts.iter().map(move |h| (p.clone(), h)))
        {
            let host = |policy| HostSpec {
                policy,
                codec,
                capacity,
            };
            let (windows, seconds, hit_throughput) = match policy {
                HostPolicy::Store(policy) if a.real => real.replay(host(policy), &queries)?,
                HostPolicy::Store(policy) => replay(
                    &a,
                    &rt,
                    host(policy),
                    &queries,
                    &chunks,
                    question.len(),
                    (&costs, cost),
                    corpus_bytes,
                )?,
                HostPolicy::Oracle(oracle) => replay_oracle(
                    &a,
                    oracle,
                    (codec, capacity),
                    (&queries, &ranks),
                    &chunks,
                    question.len(),
                    (&costs, cost),
                    corpus_bytes,
                )?,
            };
            let run = summarize(
                (s, &pname, codec, Some(capacity)),
                cost,
                windows,
                seconds,
                hit_throughput,
            );
            eprintln!(
                "zipf {s:<4} {pname:<11} {:<6} host {}  host hits {:.3} all hits {:.3}  speedup median {:.2}× (warm {:.2}×, lowest later {:.2}×, kept {:.2})  {:.1} s",
                run.host_codec,
                capacity_label(run.host_capacity),
                run.host_hit_rate,
                run.hit_rate,
                run.speedup_median,
                run.warm_speedup,
                run.lowest_later_speedup,
                run.kept_fraction,
                run.seconds
            );
            for (n, rate) in &run.hit_throughput {
                eprintln!("    {n} thread(s): {:.0} lookups/s", rate);
            }
            runs.push(run);
        }
        // the stream's warm-store reference, measured once per codec (any policy: nothing
        // is evicted) and set beside each of this stream's runs in that codec
        if a.real && (a.reference || a.reference_only) {
            for (&codec, cost) in host_codecs.iter().zip(&costs.blends) {
                let (windows, seconds, _) = real.replay_precomputed(codec, &queries)?;
                if a.reference_only {
                    let mut run = summarize(
                        (s, "precomputed-corpus", codec, None),
                        cost,
                        windows,
                        seconds,
                        Vec::new(),
                    );
                    run.precomputed_speedup = Some(run.speedup_median);
                    run.of_precomputed = Some(1.0);
                    runs.push(run);
                    continue;
                }
                let reference = after_warmup_median(&windows, |w| Some(w.speedup_median));
                for run in runs
                    .iter_mut()
                    .filter(|r| r.zipf == s && r.host_codec == codec.to_string())
                {
                    run.precomputed_speedup = reference;
                    run.of_precomputed = reference.map(|p| run.speedup_median / p);
                    run.precomputed_windows = windows.clone();
                }
            }
        }
        for run in runs.iter().filter(|r| r.zipf == s) {
            eprintln!(
                "zipf {s:<4} {:<11} {:<6} host {}  speedup {:.2}× = {:.2} of the warm-cache ratio; {}",
                run.policy,
                run.host_codec,
                capacity_label(run.host_capacity),
                run.speedup_median,
                run.of_warm_cache,
                match (run.precomputed_speedup, run.of_precomputed) {
                    (Some(p), Some(of)) =>
                        format!("{of:.2} of the precomputed corpus's {p:.2}× on this stream"),
                    _ => "no precomputed reference (--real without --reference)".to_string(),
                }
            );
        }
    }
    let report = Report {
        model: name,
        machine: machine(),
        corpus_chunks: chunks.len(),
        corpus_tokens,
        corpus_bytes: corpus_bytes * scale,
        chunk_tokens: a.chunk_tokens,
        queries: a.queries,
        warmup: a.warmup,
        k: a.k,
        novel: a.novel,
        host_capacity: a.host_capacity.clone(),
        ssd_capacity: a.ssd_capacity,
        scale,
        costs,
        real_blends: a.real,
        runs,
    };
    write_report(&report, a.json.as_deref())
}
