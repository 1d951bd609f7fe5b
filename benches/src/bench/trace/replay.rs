//! Replaying a query stream against a fresh store: modelled (scaled objects, the measured
//! cost model) or with real blends (`--real`), tallied per window.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use bytes::Bytes;
use kvquilt_blend::{BlendConfig, BlendRequest, Blender, Mode, ModelIdentity};
use kvquilt_kvstore::{
    ChunkKey, KeyContext, KvDType, KvLayout, KvObject, PolicyKind, RopeScalingSpec, SsdConfig,
    StoreConfig, TieredStore,
};
use serde::Serialize;

use super::TraceBenchArgs;
use super::costs::Costs;
use super::stream::{Pick, pick_tokens};
use crate::bench::median;

/// Stored objects are this many times smaller than the real model's.
pub(super) const SCALE: u64 = 60;

#[derive(Serialize)]
pub(super) struct Window {
    /// First query of the window (0-based).
    from: usize,
    pub(super) warmup: bool,
    pub(super) host_hit_rate: f64,
    pub(super) ssd_hit_rate: f64,
    miss_rate: f64,
    /// Tokens recomputed (misses) over tokens retrieved.
    recompute_fraction: f64,
    /// Full prefill's TTFT over the query's, median and mean over the window's queries.
    pub(super) speedup_median: f64,
    speedup_mean: f64,
    /// Real-size bytes the window's store-backs wrote.
    bytes_written: u64,
    /// New objects the host tier's admission filter turned away (a policy with one).
    admission_rejections: u64,
    /// Fraction of the window's queries the engine ran as full prefill (`--real`).
    fell_back_to_full: f64,
}

/// The layout of the trace's stored objects: the model's bytes per token over [`SCALE`].
pub(super) fn scaled_layout(bytes_per_token: u64) -> KvLayout {
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
pub(super) type Replayed = (Vec<Window>, f64, Vec<(usize, f64)>);

/// Replays `queries` with the real blender over a fresh store of real chunk KV whose host
/// tier evicts by `policy` (see `--real`).
#[allow(clippy::too_many_arguments)]
pub(super) fn replay_real(
    a: &TraceBenchArgs,
    model: &Arc<kvquilt_model::Model>,
    identity: &ModelIdentity,
    rt: &tokio::runtime::Runtime,
    policy: PolicyKind,
    queries: &[Vec<Pick>],
    chunks: &[Vec<u32>],
    question: &[u32],
    costs: &Costs,
    blend: &BlendConfig,
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
    // full prefill of each prompt runs beside it on its own blender (an empty store), so the
    // measurement teaches the served blender's cost model nothing
    let baseline = Blender::new(
        Arc::clone(model),
        identity.clone(),
        Arc::new(TieredStore::open(StoreConfig::host_only(0))?),
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
                Mode::Blend(blend.clone()),
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
            // full prefill of the same prompt, right after: on a shared machine a fit made
            // at start drifts by more than the gains measured here
            let full = baseline.run(
                b"",
                &BlendRequest {
                    mode: Mode::Full,
                    ..req
                },
            )?;
            t.speedups.push(full.stats.ttft_ms / out.stats.ttft_ms);
            t.fell_back += usize::from(out.stats.fell_back_to_full);
            t.written += out.stored.iter().map(|o| o.bytes).sum::<u64>();
        }
        windows.push(t.window(w * a.window, a.warmup, rejections(&store) - rejected_before));
    }
    Ok((windows, started.elapsed().as_secs_f64(), Vec::new()))
}

/// Replays `queries` against a fresh store whose host tier evicts by `policy`.
#[allow(clippy::too_many_arguments)]
pub(super) fn replay(
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
            let mut ttft = 0.0;
            let mut missing = Vec::new();
            let mut missed_tokens = 0usize;
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
                        missed_tokens += t.len();
                        missing.push((*key, t));
                    }
                }
            }
            // misses are computed in the blend's own pass (their store-back after the first
            // token): the blend's measured fraction of full prefill at this miss fraction
            let retrieved = total - question_tokens;
            ttft += costs.blend_fraction(missed_tokens as f64 / retrieved.max(1) as f64) * full;
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
