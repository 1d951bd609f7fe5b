//! `kvquilt bench trace`: a stream of RAG queries over a corpus made from the vendored data,
//! replayed against the real store once per host-tier eviction policy.
//!
//! The corpus is the vendored MuSiQue passages (each as the document text the RAG prompt
//! uses), tokenized by the model's tokenizer and cut into chunks of `--chunk-tokens`. Each
//! query retrieves `--k` distinct chunks: with probability `--novel` a chunk never seen
//! before (a new document), otherwise a corpus chunk drawn by Zipf(s) popularity over a
//! seeded random ranking. The store is a real [`TieredStore`]: a host tier of
//! `--host-capacity` × the corpus's bytes under the policy tried, and with
//! `--ssd-capacity` > 0 an SSD tier (RocksDB, LRU) below it. A query reads its chunks (hits
//! are real reads, promoted from the SSD), then stores its misses, as the sidecar's
//! store-back does.
//!
//! Objects are held at 1/`SCALE` of their real size (a layout of the same bytes per token
//! over 60), so a trace of thousands of queries runs in seconds; capacities scale with
//! them, and bytes reported are real-size. Model time comes from the measured cost model,
//! not from running the model per query: at start the real model (and blender) is timed on
//! real prompts of this corpus — full prefill at three lengths (an affine fit), a chunk's
//! prefill alone (fit), the default blend with every chunk in the host tier (its fraction
//! of full prefill), and real-size SSD reads — and a query's TTFT is the warm blend plus a
//! chunk prefill per miss plus the SSD reads, capped at full prefill (the engine falls back
//! to full when that is faster: `Plan::full_is_faster`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use kvquilt_blend::rag::document_text;
use kvquilt_blend::{BlendConfig, BlendRequest, Blender, Mode, ModelIdentity};
use kvquilt_kvstore::{
    ChunkKey, KeyContext, KvDType, KvLayout, KvObject, PolicyKind, RopeScalingSpec, SsdConfig,
    SsdTier, StoreConfig, Tier, TieredStore,
};
use kvquilt_model::DType;
use serde::Serialize;

use super::{machine, median, write_report};
use crate::eval::data;
use kvquilt::model_source::ModelArgs;

/// Stored objects are this many times smaller than the real model's.
const SCALE: u64 = 60;

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
    /// Host tier capacity as a fraction of the corpus's KV bytes.
    #[arg(long, default_value_t = 0.2)]
    host_capacity: f64,
    /// SSD tier capacity as a fraction of the corpus's KV bytes (0: no SSD tier).
    #[arg(long, default_value_t = 0.0)]
    ssd_capacity: f64,
    /// Host-tier eviction policies compared.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "lru,lfu,s3fifo,cost-aware"
    )]
    policies: Vec<String>,
    /// Seed of the ranking, the query stream and the novel chunks.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run the real blender per query (real chunk KV in the store, the model computing
    /// misses and the default blend; fallback to full prefill and store-back as served)
    /// instead of the cost model; TTFT is measured, full prefill's from the measured fit.
    /// For short traces: a query costs a real blend.
    #[arg(long)]
    real: bool,
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

/// What the real model and store cost, measured at start (seconds).
#[derive(Serialize, Clone)]
struct Costs {
    /// Full prefill of an n-token prompt: `full_fixed_s + full_per_token_s · n`.
    full_fixed_s: f64,
    full_per_token_s: f64,
    /// A chunk prefilled alone (a miss): `chunk_fixed_s + chunk_per_token_s · n`.
    chunk_fixed_s: f64,
    chunk_per_token_s: f64,
    /// The default blend's TTFT with every chunk in the host tier, over full prefill's.
    warm_blend_fraction: f64,
    /// Real-size SSD reads (RocksDB, warm page cache), bytes per second.
    ssd_bytes_per_s: f64,
    /// Real KV bytes per token of the model.
    bytes_per_token: u64,
    /// The blend configuration timed.
    blend: String,
}

impl Costs {
    fn full_s(&self, n: usize) -> f64 {
        self.full_fixed_s + self.full_per_token_s * n as f64
    }

    fn chunk_s(&self, n: usize) -> f64 {
        (self.chunk_fixed_s + self.chunk_per_token_s * n as f64).max(0.0)
    }
}

#[derive(Serialize)]
struct Window {
    /// First query of the window (0-based).
    from: usize,
    warmup: bool,
    host_hit_rate: f64,
    ssd_hit_rate: f64,
    miss_rate: f64,
    /// Tokens recomputed (misses) over tokens retrieved.
    recompute_fraction: f64,
    /// Full prefill's TTFT over the query's, median and mean over the window's queries.
    speedup_median: f64,
    speedup_mean: f64,
    /// Real-size bytes the window's store-backs wrote.
    bytes_written: u64,
    /// New objects the host tier's admission filter turned away (a policy with one).
    admission_rejections: u64,
    /// Fraction of the window's queries the engine ran as full prefill (`--real`).
    fell_back_to_full: f64,
}

#[derive(Serialize)]
struct Run {
    zipf: f64,
    policy: String,
    windows: Vec<Window>,
    /// Over the queries after warm-up.
    host_hit_rate: f64,
    hit_rate: f64,
    speedup_median: f64,
    /// The first window after warm-up (the warm cache's speedup), the lowest later window,
    /// and their ratio (the target: ≥ 0.8).
    warm_speedup: f64,
    lowest_later_speedup: f64,
    kept_fraction: f64,
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
    host_capacity: f64,
    ssd_capacity: f64,
    scale: u64,
    costs: Costs,
    /// Full prefill's TTFT over a query's with every chunk a host hit.
    ideal_speedup: f64,
    /// Whether each query ran the real blender (`--real`) or the cost model.
    real_blends: bool,
    runs: Vec<Run>,
}

/// SplitMix64: the trace's only randomness, seeded.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One retrieved chunk: a corpus chunk (its index) or a new document (a serial number and
/// the token count of the corpus chunk it borrows its length from).
#[derive(Clone, Copy, PartialEq)]
enum Pick {
    Corpus(usize),
    Novel(u64, usize),
}

/// How a query stream is drawn.
#[derive(Clone, Copy)]
struct StreamSpec {
    queries: usize,
    k: usize,
    /// Probability that a pick is a new document.
    novel: f64,
    /// Zipf exponent of corpus popularity.
    s: f64,
    seed: u64,
}

/// A query stream over a corpus of `corpus` chunks: `spec.queries` lists of `spec.k`
/// distinct picks.
fn stream(spec: StreamSpec, corpus: usize) -> Vec<Vec<Pick>> {
    let StreamSpec {
        queries,
        k,
        novel: p_novel,
        s,
        seed,
    } = spec;
    let mut rng = Rng(seed);
    // popularity rank → corpus index: a seeded shuffle
    let mut order: Vec<usize> = (0..corpus).collect();
    for i in (1..corpus).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let mut cdf: Vec<f64> = (1..=corpus).map(|r| (r as f64).powf(-s)).collect();
    let total: f64 = cdf.iter().sum();
    let mut acc = 0.0;
    for c in &mut cdf {
        acc += *c / total;
        *c = acc;
    }
    let mut novel = 0u64;
    (0..queries)
        .map(|_| {
            let mut q: Vec<Pick> = Vec::with_capacity(k);
            while q.len() < k {
                let p = if rng.unit() < p_novel {
                    novel += 1;
                    Pick::Novel(novel, rng.below(corpus))
                } else {
                    let u = rng.unit();
                    let rank = cdf.partition_point(|&c| c < u).min(corpus - 1);
                    Pick::Corpus(order[rank])
                };
                if !q.contains(&p) {
                    q.push(p);
                }
            }
            q
        })
        .collect()
}

/// The vendored passages as document texts, tokenized and cut into chunks.
fn corpus(a: &TraceBenchArgs, tokenizer: &kvquilt_model::Tokenizer) -> Result<Vec<Vec<u32>>> {
    let examples = data::load(&a.input)?;
    let mut seen = std::collections::HashSet::new();
    let mut chunks = Vec::new();
    for p in examples.iter().flat_map(|e| &e.ctxs) {
        let text = document_text(&p.title, &p.text);
        if !seen.insert(text.clone()) {
            continue;
        }
        let ids = tokenizer.encode(&text)?;
        for piece in ids.chunks(a.chunk_tokens) {
            if piece.len() * 4 >= a.chunk_tokens {
                chunks.push(piece.to_vec());
            }
        }
    }
    if a.corpus_limit > 0 {
        chunks.truncate(a.corpus_limit);
    }
    if chunks.len() < 2 * a.k {
        bail!("{} makes only {} chunks", a.input.display(), chunks.len());
    }
    Ok(chunks)
}

/// The layout of the trace's stored objects: the model's bytes per token over [`SCALE`].
fn scaled_layout(bytes_per_token: u64) -> KvLayout {
    let heads = (bytes_per_token / SCALE / (2 * 16 * 4)).max(1) as u32;
    KvLayout {
        num_layers: 1,
        num_kv_heads: heads,
        head_dim: 16,
        dtype: KvDType::F32,
        k_pre_rope: true,
        rope_theta: 10_000.0,
        rope_scaling: RopeScalingSpec::None,
    }
}

/// Fits `y = a + b·x` by least squares.
fn affine(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), &(x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (mut sxx, mut sxy) = (0.0, 0.0);
    for &(x, y) in points {
        sxx += (x - mx) * (x - mx);
        sxy += (x - mx) * (y - my);
    }
    let b = if sxx > 0.0 { sxy / sxx } else { my / mx };
    (my - b * mx, b)
}

/// Times the real model and store on this corpus (see the module doc).
fn measure(
    a: &TraceBenchArgs,
    blender: &Blender,
    rt: &tokio::runtime::Runtime,
    chunks: &[Vec<u32>],
    question: &[u32],
) -> Result<Costs> {
    let repeats = a.repeats.max(1);
    let codec = blender.codec(b"");
    // a chunk prefilled alone, at the corpus's lengths
    let mut chunk_points = Vec::new();
    for c in chunks.iter().step_by((chunks.len() / 12).max(1)).take(12) {
        let mut runs = Vec::new();
        for _ in 0..=repeats {
            runs.push(codec.prefill(blender.model(), c)?.1.as_secs_f64());
        }
        chunk_points.push((c.len() as f64, median(&runs[1..])));
    }
    let (chunk_fixed_s, chunk_per_token_s) = affine(&chunk_points);
    // full prefill at k/2, k and 3k/2 chunks; the default blend over stored chunks at k
    let time = |req: &BlendRequest| -> Result<f64> {
        let mut runs = Vec::new();
        for _ in 0..=repeats {
            let t = Instant::now();
            let out = blender.run(b"", req)?;
            let _first = out.logits.argmax(0)?.to_scalar::<u32>()?;
            blender.model().device().synchronize()?;
            runs.push(t.elapsed().as_secs_f64());
        }
        Ok(median(&runs[1..]))
    };
    let mut full_points = Vec::new();
    let mut fractions = Vec::new();
    for (i, n) in [a.k / 2, a.k, a.k + a.k / 2].into_iter().enumerate() {
        let picked: Vec<Vec<u32>> = chunks.iter().skip(i * 37).take(n.max(1)).cloned().collect();
        let req = BlendRequest::new(vec![], picked.clone(), question.to_vec(), Mode::Full);
        let full = time(&req)?;
        full_points.push((req.tokens().len() as f64, full));
        if n == a.k {
            for c in &picked {
                blender.precompute(b"", c)?;
            }
            let blend = BlendRequest {
                mode: Mode::Blend(BlendConfig::default()),
                ..req
            };
            fractions.push(time(&blend)? / full);
        }
    }
    let (full_fixed_s, full_per_token_s) = affine(&full_points);
    // real-size objects read back from an SSD tier
    let dir = tempfile::tempdir()?;
    let ssd = SsdTier::open(SsdConfig::new(dir.path(), u64::MAX), Default::default())?;
    let mut keys = Vec::new();
    for c in chunks.iter().take(8) {
        let (obj, _) = codec.encode(blender.model(), c)?;
        keys.push((*obj.key(), obj.raw_len()));
        rt.block_on(ssd.put(Arc::new(obj), 0.0))?;
    }
    rt.block_on(ssd.flush())?;
    let mut rates = Vec::new();
    for _ in 0..=repeats {
        let t = Instant::now();
        let mut bytes = 0;
        for (k, len) in &keys {
            rt.block_on(ssd.get(k))?.context("an SSD object vanished")?;
            bytes += len;
        }
        rates.push(bytes as f64 / t.elapsed().as_secs_f64());
    }
    let bytes_per_token = codec.layout().object_bytes(1);
    Ok(Costs {
        full_fixed_s,
        full_per_token_s,
        chunk_fixed_s,
        chunk_per_token_s,
        warm_blend_fraction: median(&fractions),
        ssd_bytes_per_s: median(&rates[1..]),
        bytes_per_token,
        blend: "default (query-aware, ratio 0.3)".into(),
    })
}

/// A pick's tokens: a corpus chunk's, or for a new document a corpus chunk's with its
/// first two tokens replaced by ids made from its serial number (ids below `vocab`, so the
/// model can run them; no two new documents share them).
fn pick_tokens(p: &Pick, chunks: &[Vec<u32>], vocab: u32) -> Vec<u32> {
    match *p {
        Pick::Corpus(i) => chunks[i].clone(),
        Pick::Novel(serial, like) => {
            let mut t = chunks[like].clone();
            let base = u64::from(vocab.max(2) - 1);
            t[0] = 1 + (serial % base) as u32;
            if t.len() > 1 {
                t[1] = 1 + ((serial / base) % base) as u32;
            }
            t
        }
    }
}

/// The store a trace runs on: a host tier of `host` bytes evicting by `policy`, and an SSD
/// tier of `ssd` bytes (LRU) in `dir` when `ssd` > 0.
fn trace_store(
    dir: &std::path::Path,
    policy: PolicyKind,
    host: u64,
    ssd: u64,
) -> Result<TieredStore> {
    let mut config = StoreConfig {
        host_policy: policy,
        ..StoreConfig::host_only(host)
    };
    if ssd > 0 {
        let mut c = SsdConfig::new(dir, ssd);
        c.sync_writes = false;
        config.ssd = Some(c);
    }
    Ok(TieredStore::open(config)?)
}

/// Counters of one window while it runs.
#[derive(Default)]
struct Tally {
    host_hits: usize,
    ssd_hits: usize,
    misses: usize,
    tokens: usize,
    recomputed: usize,
    written: u64,
    speedups: Vec<f64>,
    /// Queries the engine ran as full prefill (`--real` only).
    fell_back: usize,
}

impl Tally {
    fn window(self, from: usize, warmup: usize, admission_rejections: u64) -> Window {
        let lookups = (self.host_hits + self.ssd_hits + self.misses).max(1) as f64;
        let n = self.speedups.len().max(1) as f64;
        Window {
            from,
            warmup: from < warmup,
            host_hit_rate: self.host_hits as f64 / lookups,
            ssd_hit_rate: self.ssd_hits as f64 / lookups,
            miss_rate: self.misses as f64 / lookups,
            recompute_fraction: self.recomputed as f64 / self.tokens.max(1) as f64,
            speedup_median: median(&self.speedups),
            speedup_mean: self.speedups.iter().sum::<f64>() / n,
            bytes_written: self.written,
            admission_rejections,
            fell_back_to_full: self.fell_back as f64 / n,
        }
    }
}

fn rejections(s: &TieredStore) -> u64 {
    s.stats()
        .iter()
        .filter_map(|t| t.extra.get("admission_rejections"))
        .sum()
}

/// What a replay gives: its windows, its wall time in seconds, and lookups per second on
/// the warm store by thread count.
type Replayed = (Vec<Window>, f64, Vec<(usize, f64)>);

/// Replays `queries` with the real blender over a fresh store of real chunk KV whose host
/// tier evicts by `policy` (see `--real`).
#[allow(clippy::too_many_arguments)]
fn replay_real(
    a: &TraceBenchArgs,
    model: &Arc<kvquilt_model::Model>,
    identity: &ModelIdentity,
    rt: &tokio::runtime::Runtime,
    policy: PolicyKind,
    queries: &[Vec<Pick>],
    chunks: &[Vec<u32>],
    question: &[u32],
    costs: &Costs,
) -> Result<Replayed> {
    let real_corpus: u64 = chunks
        .iter()
        .map(|c| costs.bytes_per_token * c.len() as u64)
        .sum();
    let dir = tempfile::tempdir()?;
    let store = Arc::new(trace_store(
        dir.path(),
        policy,
        (a.host_capacity * real_corpus as f64) as u64,
        (a.ssd_capacity * real_corpus as f64) as u64,
    )?);
    let blender = Blender::new(
        Arc::clone(model),
        identity.clone(),
        Arc::clone(&store),
        rt.handle().clone(),
    );
    let vocab = model.config().vocab_size as u32;
    let codec = blender.codec(b"");
    let started = Instant::now();
    let mut windows = Vec::new();
    for (w, batch) in queries.chunks(a.window.max(1)).enumerate() {
        let mut t = Tally::default();
        let rejected_before = rejections(&store);
        for q in batch {
            let picked: Vec<Vec<u32>> = q.iter().map(|p| pick_tokens(p, chunks, vocab)).collect();
            let req = BlendRequest::new(
                vec![],
                picked.clone(),
                question.to_vec(),
                Mode::Blend(BlendConfig::default()),
            );
            // what the store holds when the query arrives (the engine may still recompute a
            // held chunk, or run full prefill, when its cost model says that is faster)
            for c in &picked {
                t.tokens += c.len();
                match store.locate(&codec.key(c)) {
                    Some(tier) if tier.name() == "host" => t.host_hits += 1,
                    Some(_) => t.ssd_hits += 1,
                    None => {
                        t.misses += 1;
                        t.recomputed += c.len();
                    }
                }
            }
            let out = blender.run(b"", &req)?;
            let _first = out.logits.argmax(0)?.to_scalar::<u32>()?;
            let full = costs.full_s(req.tokens().len());
            t.speedups.push(full / (out.stats.ttft_ms / 1e3));
            t.fell_back += usize::from(out.stats.fell_back_to_full);
            t.written += out.stored.iter().map(|o| o.bytes).sum::<u64>();
        }
        windows.push(t.window(w * a.window, a.warmup, rejections(&store) - rejected_before));
    }
    Ok((windows, started.elapsed().as_secs_f64(), Vec::new()))
}

/// Replays `queries` against a fresh store whose host tier evicts by `policy`.
#[allow(clippy::too_many_arguments)]
fn replay(
    a: &TraceBenchArgs,
    rt: &tokio::runtime::Runtime,
    policy: PolicyKind,
    queries: &[Vec<Pick>],
    chunks: &[Vec<u32>],
    question_tokens: usize,
    costs: &Costs,
    corpus_bytes: u64,
) -> Result<Replayed> {
    let vocab = u32::MAX;
    let layout = scaled_layout(costs.bytes_per_token);
    let context = KeyContext::new(b"trace", &[1; 32], &[2; 32], &layout);
    let dir = tempfile::tempdir()?;
    let store = trace_store(
        dir.path(),
        policy,
        (a.host_capacity * corpus_bytes as f64) as u64,
        (a.ssd_capacity * corpus_bytes as f64) as u64,
    )?;
    let pick_tokens = |p: &Pick| pick_tokens(p, chunks, vocab);
    let rejections = |s: &TieredStore| -> u64 {
        s.stats()
            .iter()
            .filter_map(|t| t.extra.get("admission_rejections"))
            .sum()
    };
    let started = Instant::now();
    let mut windows = Vec::new();
    for (w, batch) in queries.chunks(a.window.max(1)).enumerate() {
        let mut tally = Tally::default();
        let rejected_before = rejections(&store);
        for q in batch {
            let picked: Vec<(ChunkKey, Vec<u32>)> = q
                .iter()
                .map(|p| {
                    let t = pick_tokens(p);
                    (context.chunk_key(&t), t)
                })
                .collect();
            let total: usize = picked.iter().map(|(_, t)| t.len()).sum::<usize>() + question_tokens;
            let full = costs.full_s(total);
            let mut ttft = costs.warm_blend_fraction * full;
            let mut missing = Vec::new();
            for (key, t) in &picked {
                tally.tokens += t.len();
                match rt.block_on(store.get(key))? {
                    Some((_, tier)) if tier.name() == "host" => tally.host_hits += 1,
                    Some(_) => {
                        tally.ssd_hits += 1;
                        ttft +=
                            (costs.bytes_per_token * t.len() as u64) as f64 / costs.ssd_bytes_per_s;
                    }
                    None => {
                        tally.misses += 1;
                        tally.recomputed += t.len();
                        ttft += costs.chunk_s(t.len());
                        missing.push((*key, t));
                    }
                }
            }
            tally.speedups.push(full / ttft.min(full));
            for (key, t) in missing {
                let per = layout.layer_bytes(t.len());
                let obj = KvObject::new(
                    key,
                    layout,
                    t.clone(),
                    vec![Bytes::from(vec![(t.len() % 251) as u8; per])],
                    None,
                )?;
                tally.written += costs.bytes_per_token * t.len() as u64;
                rt.block_on(store.put(obj, costs.chunk_s(t.len())))?;
            }
        }
        let rejected = rejections(&store) - rejected_before;
        windows.push(tally.window(w * a.window, a.warmup, rejected));
    }
    let seconds = started.elapsed().as_secs_f64();
    // the keys the last window read, looked up again by several threads at once
    let keys: Vec<ChunkKey> = queries
        .iter()
        .rev()
        .take(a.window)
        .flatten()
        .map(|p| context.chunk_key(&pick_tokens(p)))
        .collect();
    let throughput = a
        .hit_threads
        .iter()
        .map(|&n| Ok((n, lookups_per_s(rt, &store, &keys, n)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok((windows, seconds, throughput))
}

/// Lookups per second of `keys` (hits and misses as the store holds them) by `threads`
/// threads at once, each going through the list from its own offset for at least 0.3 s.
fn lookups_per_s(
    rt: &tokio::runtime::Runtime,
    store: &TieredStore,
    keys: &[ChunkKey],
    threads: usize,
) -> Result<f64> {
    if keys.is_empty() || threads == 0 {
        return Ok(0.0);
    }
    let started = Instant::now();
    let done: usize = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut n = 0usize;
                    let t0 = Instant::now();
                    while t0.elapsed().as_secs_f64() < 0.3 {
                        for k in keys.iter().cycle().skip(t * 97).take(1000) {
                            let _ = rt.block_on(store.get(k));
                            n += 1;
                        }
                    }
                    n
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or(0)).sum()
    });
    Ok(done as f64 / started.elapsed().as_secs_f64())
}

pub(crate) fn run(a: TraceBenchArgs) -> Result<()> {
    if a.k == 0 || a.queries <= a.warmup || a.window == 0 || !a.warmup.is_multiple_of(a.window) {
        bail!("need k ≥ 1, queries > warmup, and warmup a multiple of window");
    }
    if !(0.0..1.0).contains(&a.novel) || a.host_capacity <= 0.0 || a.ssd_capacity < 0.0 {
        bail!("novel must be in [0, 1), host capacity > 0, SSD capacity ≥ 0");
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
            m.set_attention_kernel(a.model.attention_kernel()?);
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
    let costs = measure(&a, &blender, &rt, &chunks, &question)?;
    let corpus_tokens: usize = chunks.iter().map(Vec::len).sum();
    let layout = scaled_layout(costs.bytes_per_token);
    let corpus_bytes: u64 = chunks.iter().map(|c| layout.object_bytes(c.len())).sum();
    let ideal_speedup = 1.0 / costs.warm_blend_fraction;
    eprintln!(
        "full prefill {:.2} ms + {:.3} ms/token; chunk prefill {:.2} + {:.3} ms/token; warm blend {:.2} of full (ideal speedup {ideal_speedup:.2}×); SSD {:.2} GB/s",
        costs.full_fixed_s * 1e3,
        costs.full_per_token_s * 1e3,
        costs.chunk_fixed_s * 1e3,
        costs.chunk_per_token_s * 1e3,
        costs.warm_blend_fraction,
        costs.ssd_bytes_per_s / 1e9
    );
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
        for (pname, policy) in &policies {
            let (windows, seconds, hit_throughput) = if a.real {
                replay_real(
                    &a, &model, &identity, &rt, *policy, &queries, &chunks, &question, &costs,
                )?
            } else {
                replay(
                    &a,
                    &rt,
                    *policy,
                    &queries,
                    &chunks,
                    question.len(),
                    &costs,
                    corpus_bytes,
                )?
            };
            let after: Vec<&Window> = windows.iter().filter(|w| !w.warmup).collect();
            let mean = |f: &dyn Fn(&Window) -> f64| {
                after.iter().map(|w| f(w)).sum::<f64>() / after.len().max(1) as f64
            };
            let warm_speedup = after.first().map_or(f64::NAN, |w| w.speedup_median);
            let lowest_later_speedup = after
                .iter()
                .skip(1)
                .map(|w| w.speedup_median)
                .fold(f64::INFINITY, f64::min);
            let run = Run {
                zipf: s,
                policy: pname.clone(),
                host_hit_rate: mean(&|w| w.host_hit_rate),
                hit_rate: mean(&|w| w.host_hit_rate + w.ssd_hit_rate),
                speedup_median: median(&after.iter().map(|w| w.speedup_median).collect::<Vec<_>>()),
                warm_speedup,
                lowest_later_speedup,
                kept_fraction: lowest_later_speedup / warm_speedup,
                windows,
                seconds,
                hit_throughput,
            };
            eprintln!(
                "zipf {s:<4} {pname:<10} host hits {:.3} all hits {:.3}  speedup median {:.2}× (warm {:.2}×, lowest later {:.2}×, kept {:.2})  {:.1} s",
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
    }
    let report = Report {
        model: name,
        machine: machine(),
        corpus_chunks: chunks.len(),
        corpus_tokens,
        corpus_bytes: corpus_bytes * SCALE,
        chunk_tokens: a.chunk_tokens,
        queries: a.queries,
        warmup: a.warmup,
        k: a.k,
        novel: a.novel,
        host_capacity: a.host_capacity,
        ssd_capacity: a.ssd_capacity,
        scale: SCALE,
        costs,
        ideal_speedup,
        real_blends: a.real,
        runs,
    };
    write_report(&report, a.json.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affine_fit_recovers_a_line() {
        let (a, b) = affine(&[(1.0, 3.0), (2.0, 5.0), (4.0, 9.0)]);
        assert!((a - 1.0).abs() < 1e-9 && (b - 2.0).abs() < 1e-9, "{a} {b}");
    }

    #[test]
    fn zipf_streams_are_seeded_distinct_and_skewed() {
        let spec = StreamSpec {
            queries: 300,
            k: 10,
            novel: 0.2,
            s: 1.1,
            seed: 7,
        };
        let q = stream(spec, 1000);
        assert_eq!(q.len(), 300);
        assert!(q.iter().all(|p| p.len() == 10));
        for p in &q {
            for (i, x) in p.iter().enumerate() {
                assert!(!p[i + 1..].contains(x), "a query repeats a chunk");
            }
        }
        let picks: Vec<&Pick> = q.iter().flatten().collect();
        let novel = picks
            .iter()
            .filter(|p| matches!(p, Pick::Novel(..)))
            .count();
        let share = novel as f64 / picks.len() as f64;
        assert!((0.15..0.25).contains(&share), "novel share {share}");
        // the most popular chunk is drawn far more often than a uniform draw would
        let mut counts = std::collections::HashMap::new();
        for p in &picks {
            if let Pick::Corpus(i) = p {
                *counts.entry(*i).or_insert(0usize) += 1;
            }
        }
        let top = counts.values().copied().max().unwrap_or(0);
        assert!(top > 20 * picks.len() / 1000, "top chunk drawn {top} times");
        assert!(stream(spec, 1000) == q, "seeded: the same stream again");
        let other = StreamSpec { seed: 8, ..spec };
        assert!(stream(other, 1000) != q, "another seed, another stream");
    }
}
