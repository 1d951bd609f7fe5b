//! Replaying a query stream against a fresh store: modelled (scaled objects, the measured
//! cost model) or with real blends (`--real`), tallied per window.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use bytes::Bytes;
use kvquilt_blend::{BlendConfig, BlendRequest, Blender, Fallback, Mode, ModelIdentity};
use kvquilt_kvstore::{
    ChunkKey, Codec, KeyContext, KvDType, KvLayout, KvObject, PolicyKind, SsdConfig, StoreConfig,
    TieredStore,
};
use serde::Serialize;

use super::TraceBenchArgs;
use super::costs::{BlendCost, Costs};
use super::oracle::{Oracle, OracleCache};
use super::stream::{Pick, pick_tokens};
use crate::bench::median;
use crate::eval::data::SplitMix;

#[derive(Clone, Serialize)]
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
    /// The same by reason: nothing loaded, the plan's estimate, the estimate as corrected by
    /// what blends measured (`kvquilt_blend::Fallback`; they sum to `fell_back_to_full`).
    fell_back_by_reason: [f64; 3],
    /// The same queries' median speedup over a store holding the whole corpus, precomputed
    /// (only their new documents computed): the warm store this stream can have. Modelled
    /// per query in the modelled trace; `None` in a real replay (`--reference` replays it
    /// apart).
    pub(super) precomputed_speedup_median: Option<f64>,
}

/// The host tier a replay runs on.
#[derive(Clone, Copy, Debug)]
pub(super) struct HostSpec {
    pub(super) policy: PolicyKind,
    /// The codec it holds exact objects in.
    pub(super) codec: Codec,
    /// Its capacity as a fraction of the corpus's raw KV bytes (`--host-capacity`).
    pub(super) capacity: f64,
}

/// The layout of the modelled trace's stored objects: one layer of the model's, so an
/// object is the model's over its layer count and a codec's ratio is the model's.
pub(super) fn scaled_layout(model: &KvLayout) -> KvLayout {
    KvLayout {
        num_layers: 1,
        ..*model
    }
}

/// One layer of `tokens` tokens of synthetic K/V in `layout`'s dtype: seeded values spread
/// like activations (a sum of uniforms, a few per mille of large ones). Codecs without an
/// entropy coder store it in the same bytes as real KV (their records are sized by the
/// layout alone); an entropy coder's ratio on it means nothing (the modelled trace refuses lz4).
fn synthetic_layer(layout: &KvLayout, tokens: usize, seed: u64) -> Bytes {
    let elems = layout.layer_bytes(tokens) / layout.dtype.size();
    let mut rng = SplitMix(seed);
    let mut out = Vec::with_capacity(elems * layout.dtype.size());
    for _ in 0..elems {
        let mut v = (rng.unit() + rng.unit() + rng.unit() - 1.5) as f32;
        if rng.below(1000) < 3 {
            v *= 40.0;
        }
        push_value(&mut out, layout.dtype, v);
    }
    Bytes::from(out)
}

/// Appends `v` to `out` as one little-endian element of `dtype`.
fn push_value(out: &mut Vec<u8>, dtype: KvDType, v: f32) {
    match dtype {
        KvDType::F32 => out.extend_from_slice(&v.to_le_bytes()),
        KvDType::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
        KvDType::BF16 => out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
    }
}

/// Fails unless `codec` encodes a synthetic layer of `layout` (a codec that could not would
/// leave the host tier holding the modelled trace's objects decoded: its runs would be
/// raw's under its name).
pub(super) fn check_codec(layout: &KvLayout, codec: Codec, tokens: usize) -> Result<()> {
    let ids: Vec<u32> = (0..tokens as u32).collect();
    let key = KeyContext::new(b"trace", &[1; 32], &[2; 32], layout).chunk_key(&ids);
    let layer = synthetic_layer(layout, tokens, 1);
    KvObject::new(key, *layout, ids, vec![layer], None)?
        .encode(codec)
        .with_context(|| format!("--host-codecs {codec}: the trace's objects do not encode"))?;
    Ok(())
}

/// The store a trace runs on: a host tier of `host` bytes evicting by `policy` and holding
/// exact objects in `codec`, and an SSD tier of `ssd` bytes (LRU) in `dir` when `ssd` > 0.
fn trace_store(
    dir: &std::path::Path,
    policy: PolicyKind,
    codec: Codec,
    host: u64,
    ssd: u64,
) -> Result<TieredStore> {
    let mut config = StoreConfig {
        host_policy: policy,
        host_codec: codec,
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
    /// Queries the engine ran as full prefill (`--real` only), by [`reason_index`].
    fell_back: [usize; 3],
    /// Each query's modelled speedup over a store holding the whole corpus (modelled only).
    precomputed: Vec<f64>,
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
            fell_back_to_full: self.fell_back.iter().sum::<usize>() as f64 / n,
            fell_back_by_reason: self.fell_back.map(|k| k as f64 / n),
            precomputed_speedup_median: (!self.precomputed.is_empty())
                .then(|| median(&self.precomputed)),
        }
    }
}

/// Where a fallback's reason is counted in [`Tally::fell_back`] and
/// [`Window::fell_back_by_reason`].
fn reason_index(why: Fallback) -> usize {
    match why {
        Fallback::NothingLoaded => 0,
        Fallback::Estimated => 1,
        Fallback::Measured => 2,
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

/// What a replay of real blends runs each query with (`--real`).
pub(super) struct RealQueries<'a> {
    pub(super) a: &'a TraceBenchArgs,
    pub(super) model: &'a Arc<kvquilt_model::Model>,
    pub(super) identity: &'a ModelIdentity,
    pub(super) rt: &'a tokio::runtime::Runtime,
    pub(super) costs: &'a Costs,
    pub(super) chunks: &'a [Vec<u32>],
    pub(super) question: &'a [u32],
    pub(super) blend: &'a BlendConfig,
}

impl RealQueries<'_> {
    /// The corpus's real KV bytes (raw).
    fn corpus_bytes(&self) -> u64 {
        self.chunks
            .iter()
            .map(|c| self.costs.bytes_per_token() * c.len() as u64)
            .sum()
    }

    fn blender(&self, store: &Arc<TieredStore>) -> Blender {
        Blender::new(
            Arc::clone(self.model),
            self.identity.clone(),
            Arc::clone(store),
            self.rt.handle().clone(),
        )
    }

    /// Replays `queries` over a fresh store of real chunk KV whose host tier is `host`,
    /// misses stored back as served.
    pub(super) fn replay(&self, host: HostSpec, queries: &[Vec<Pick>]) -> Result<Replayed> {
        let a = self.a;
        let corpus = self.corpus_bytes() as f64;
        let dir = tempfile::tempdir()?;
        let store = Arc::new(trace_store(
            dir.path(),
            host.policy,
            host.codec,
            (host.capacity * corpus) as u64,
            (a.ssd_capacity * corpus) as u64,
        )?);
        let label = host.codec.to_string();
        self.run(&label, &self.blender(&store), &store, queries, true)
    }

    /// Replays `queries` over a store holding every corpus chunk, precomputed into a host
    /// tier of `host_codec` with room for all of them (the precompute job run over the
    /// corpus): only the queries' new documents are computed, and they are not stored
    /// back, so the store stays the corpus. Its speedups are the stream's warm-store
    /// reference (`--reference`).
    pub(super) fn replay_precomputed(
        &self,
        host_codec: Codec,
        queries: &[Vec<Pick>],
    ) -> Result<Replayed> {
        let store = Arc::new(TieredStore::open(StoreConfig {
            host_codec,
            // room for the corpus with every object's header (the tier weighs encoded
            // bytes, never more than raw's plus a header)
            ..StoreConfig::host_only(2 * self.corpus_bytes() + (64 << 20))
        })?);
        let blender = self.blender(&store);
        let started = Instant::now();
        for c in self.chunks {
            blender.precompute(b"", c)?;
        }
        let codec = blender.codec(b"");
        let held = self
            .chunks
            .iter()
            .filter(|c| store.locate(&codec.key(c)).is_some())
            .count();
        if held != self.chunks.len() {
            anyhow::bail!(
                "the precomputed reference store holds {held} of {} corpus chunks",
                self.chunks.len()
            );
        }
        eprintln!(
            "  {host_codec} reference: {} corpus chunks precomputed in {:.1} s",
            self.chunks.len(),
            started.elapsed().as_secs_f64()
        );
        let label = format!("{host_codec} (precomputed corpus)");
        self.run(&label, &blender, &store, queries, false)
    }

    /// Runs `queries` through `blender` (over `store`), each followed by full prefill of
    /// the same prompt on a blender of its own; with `store_back` the misses are stored
    /// after the first token as the sidecar does, without it nothing is stored.
    fn run(
        &self,
        label: &str,
        blender: &Blender,
        store: &TieredStore,
        queries: &[Vec<Pick>],
        store_back: bool,
    ) -> Result<Replayed> {
        let a = self.a;
        // full prefill of each prompt runs beside it on its own blender (an empty store), so
        // the measurement teaches the served blender's cost model nothing
        let baseline = Blender::new(
            Arc::clone(self.model),
            self.identity.clone(),
            Arc::new(TieredStore::open(StoreConfig::host_only(0))?),
            self.rt.handle().clone(),
        );
        let vocab = self.model.config().vocab_size as u32;
        let codec = blender.codec(b"");
        let started = Instant::now();
        let mut windows = Vec::new();
        for (w, batch) in queries.chunks(a.window.max(1)).enumerate() {
            let mut t = Tally::default();
            let rejected_before = rejections(store);
            for q in batch {
                let picked: Vec<Vec<u32>> = q
                    .iter()
                    .map(|p| pick_tokens(p, self.chunks, vocab))
                    .collect();
                let req = BlendRequest::new(
                    vec![],
                    picked.clone(),
                    self.question.to_vec(),
                    Mode::Blend(self.blend.clone()),
                );
                // what the store holds when the query arrives (the engine may still recompute
                // a held chunk, or run full prefill, when its cost model says that is faster)
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
                let (out, work) = blender.run_deferring(b"", &req)?;
                let _first = out.logits.argmax(0)?.to_scalar::<u32>()?;
                if store_back {
                    t.written += blender
                        .store_back(work)
                        .iter()
                        .map(|o| o.bytes)
                        .sum::<u64>();
                } else {
                    drop(work); // nothing stored
                }
                // full prefill of the same prompt, right after: on a shared machine a fit
                // made at start drifts by more than the gains measured here
                let full = baseline.run(
                    b"",
                    &BlendRequest {
                        mode: Mode::Full,
                        ..req
                    },
                )?;
                t.speedups.push(full.stats.ttft_ms / out.stats.ttft_ms);
                if let Some(why) = out.stats.fallback {
                    t.fell_back[reason_index(why)] += 1;
                }
            }
            let window = t.window(w * a.window, a.warmup, rejections(store) - rejected_before);
            // real windows take minutes each: report each as it closes, so a run cut short
            // still says what it measured
            eprintln!(
                "  {} queries {}–{}: host hits {:.3}, recomputed {:.3}, speedup median {:.2}×, \
                 full prefill {:.0}% (nothing loaded {:.0}%, estimated {:.0}%, measured {:.0}%), \
                 {:.1} s",
                label,
                window.from,
                (window.from + a.window).min(queries.len()) - 1,
                window.host_hit_rate,
                window.recompute_fraction,
                window.speedup_median,
                100.0 * window.fell_back_to_full,
                100.0 * window.fell_back_by_reason[0],
                100.0 * window.fell_back_by_reason[1],
                100.0 * window.fell_back_by_reason[2],
                started.elapsed().as_secs_f64()
            );
            windows.push(window);
        }
        Ok((windows, started.elapsed().as_secs_f64(), Vec::new()))
    }
}

/// Replays `queries` against a fresh store whose host tier is `host` (its codec one without
/// lz4: the values are synthetic), the model's
/// time from `costs` and `blend` (the blend's cost over that codec's host tier).
#[allow(clippy::too_many_arguments)]
pub(super) fn replay(
    a: &TraceBenchArgs,
    rt: &tokio::runtime::Runtime,
    host: HostSpec,
    queries: &[Vec<Pick>],
    chunks: &[Vec<u32>],
    question_tokens: usize,
    (costs, blend): (&Costs, &BlendCost),
    corpus_bytes: u64,
) -> Result<Replayed> {
    let vocab = u32::MAX;
    let layout = scaled_layout(&costs.layout);
    let context = KeyContext::new(b"trace", &[1; 32], &[2; 32], &layout);
    let dir = tempfile::tempdir()?;
    let store = trace_store(
        dir.path(),
        host.policy,
        host.codec,
        (host.capacity * corpus_bytes as f64) as u64,
        (a.ssd_capacity * corpus_bytes as f64) as u64,
    )?;
    // one synthetic layer per chunk length, shared by the objects of that length
    let mut values: HashMap<usize, Bytes> = HashMap::new();
    let pick_tokens = |p: &Pick| pick_tokens(p, chunks, vocab);
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
            let mut found = Vec::with_capacity(picked.len());
            for (key, _) in &picked {
                found.push(match rt.block_on(store.get(key))? {
                    Some((_, tier)) if tier.name() == "host" => Found::Host,
                    Some(_) => Found::Ssd,
                    None => Found::Missing,
                });
            }
            let tokens: Vec<usize> = picked.iter().map(|(_, t)| t.len()).collect();
            model_query(
                &mut tally,
                q,
                &tokens,
                &found,
                question_tokens,
                (costs, blend),
            );
            let missing = picked
                .iter()
                .zip(&found)
                .filter(|(_, f)| matches!(f, Found::Missing))
                .map(|((key, t), _)| (key, t));
            for (key, t) in missing {
                let layer = values
                    .entry(t.len())
                    .or_insert_with(|| synthetic_layer(&layout, t.len(), a.seed ^ t.len() as u64))
                    .clone();
                let obj = KvObject::new(*key, layout, t.clone(), vec![layer], None)?;
                tally.written += costs.bytes_per_token() * t.len() as u64;
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

/// Replays `queries` against an [`OracleCache`] evicting by `oracle`'s knowledge, a host
/// tier of `capacity` × `corpus_bytes` (no SSD tier; objects weighed as the host tier weighs
/// them in `host_codec`), the model's time as in [`replay`]. `ranks` are the corpus chunks'
/// popularity ranks in the stream's draw.
#[allow(clippy::too_many_arguments)]
pub(super) fn replay_oracle(
    a: &TraceBenchArgs,
    oracle: Oracle,
    (host_codec, capacity): (Codec, f64),
    (queries, ranks): (&[Vec<Pick>], &[usize]),
    chunks: &[Vec<u32>],
    question_tokens: usize,
    (costs, blend): (&Costs, &BlendCost),
    corpus_bytes: u64,
) -> Result<Replayed> {
    let layout = scaled_layout(&costs.layout);
    let mut cache = OracleCache::new((capacity * corpus_bytes as f64) as u64);
    let keys = oracle.keys(queries, ranks);
    // what the host tier weighs an object of n tokens at (`Held::size`), by n
    let mut sizes: HashMap<usize, u64> = HashMap::new();
    let mut size_of = |n: usize| -> Result<u64> {
        if let Some(&s) = sizes.get(&n) {
            return Ok(s);
        }
        let s = held_size(&layout, host_codec, n, a.seed)?;
        sizes.insert(n, s);
        Ok(s)
    };
    let started = Instant::now();
    let mut windows = Vec::new();
    for (w, batch) in queries.chunks(a.window.max(1)).enumerate() {
        let mut tally = Tally::default();
        let from = w * a.window;
        for (q, keys) in batch.iter().zip(&keys[from..]) {
            let found: Vec<Found> = q
                .iter()
                .zip(keys)
                .map(|(p, &key)| {
                    if cache.lookup(p, key) {
                        Found::Host
                    } else {
                        Found::Missing
                    }
                })
                .collect();
            let tokens: Vec<usize> = q.iter().map(|p| pick_len(p, chunks)).collect();
            model_query(
                &mut tally,
                q,
                &tokens,
                &found,
                question_tokens,
                (costs, blend),
            );
            for (((p, &key), f), &n) in q.iter().zip(keys).zip(&found).zip(&tokens) {
                if *f == Found::Missing {
                    tally.written += costs.bytes_per_token() * n as u64;
                    cache.admit(*p, size_of(n)?, key);
                }
            }
        }
        windows.push(tally.window(from, a.warmup, 0));
    }
    Ok((windows, started.elapsed().as_secs_f64(), Vec::new()))
}

/// Tokens of a pick (a new document has its model chunk's length).
fn pick_len(p: &Pick, chunks: &[Vec<u32>]) -> usize {
    match *p {
        Pick::Corpus(i) | Pick::Novel(_, i) => chunks[i].len(),
    }
}

/// Bytes the host tier weighs an object of `tokens` tokens of `layout` at when it holds it in
/// `codec`: decoded (raw) its values, encoded its header and records.
fn held_size(layout: &KvLayout, codec: Codec, tokens: usize, seed: u64) -> Result<u64> {
    if codec == Codec::Raw {
        return Ok(layout.object_bytes(tokens));
    }
    let ids: Vec<u32> = (0..tokens as u32).collect();
    let key = KeyContext::new(b"trace", &[1; 32], &[2; 32], layout).chunk_key(&ids);
    let layer = synthetic_layer(layout, tokens, seed ^ tokens as u64);
    let e = KvObject::new(key, *layout, ids, vec![layer], None)?.encode(codec)?;
    Ok(e.header.stored_len(e.header_bytes.len()))
}

/// Where a query found one of its chunks when it arrived.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Found {
    Host,
    Ssd,
    Missing,
}

/// Tallies one query of the modelled trace: `q`'s picks of `tokens` tokens each, `found`
/// where they were. Its TTFT is the blend at its missed share of the retrieved tokens
/// (misses computed in the blend's own pass, their store-back after the first token) plus
/// real-size SSD reads, capped at full prefill (the engine falls back to it); beside it, the
/// same query over the corpus precomputed (only its new documents computed).
fn model_query(
    tally: &mut Tally,
    q: &[Pick],
    tokens: &[usize],
    found: &[Found],
    question_tokens: usize,
    (costs, blend): (&Costs, &BlendCost),
) {
    let retrieved: usize = tokens.iter().sum();
    let full = costs.full_s(retrieved + question_tokens);
    let mut ttft = 0.0;
    let mut missed_tokens = 0usize;
    for (&n, f) in tokens.iter().zip(found) {
        tally.tokens += n;
        match f {
            Found::Host => tally.host_hits += 1,
            Found::Ssd => {
                tally.ssd_hits += 1;
                ttft += (costs.bytes_per_token() * n as u64) as f64 / costs.ssd_bytes_per_s;
            }
            Found::Missing => {
                tally.misses += 1;
                tally.recomputed += n;
                missed_tokens += n;
            }
        }
    }
    let share = |n: usize| n as f64 / retrieved.max(1) as f64;
    ttft += blend.fraction(share(missed_tokens)) * full;
    tally.speedups.push(full / ttft.min(full));
    let novel_tokens: usize = q
        .iter()
        .zip(tokens)
        .filter(|(p, _)| matches!(p, Pick::Novel(..)))
        .map(|(_, &n)| n)
        .sum();
    let warm = blend.fraction(share(novel_tokens)) * full;
    tally.precomputed.push(full / warm.min(full));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::trace::costs::BlendCost;
    use crate::bench::trace::stream::{StreamSpec, popularity_ranks, stream};

    /// SmolLM2-135M's KV layout in `dtype`.
    fn smollm2_layout(dtype: KvDType) -> KvLayout {
        KvLayout {
            num_layers: 30,
            num_kv_heads: 3,
            head_dim: 64,
            dtype,
            k_pre_rope: true,
            rope_theta: 100_000.0,
            rope_scaling: kvquilt_kvstore::RopeScalingSpec::None,
        }
    }

    /// Costs of a SmolLM2-shaped model (f32) with a raw host tier's blend, and the scaled
    /// bytes of `chunks`: what the modelled replays of these tests run on.
    fn modelled(chunks: &[Vec<u32>]) -> (Costs, BlendCost, u64) {
        let layout = smollm2_layout(KvDType::F32);
        let blend = BlendCost {
            host_codec: "raw".into(),
            warm_fraction: 0.4,
            fixed: 0.4,
            per_missed: 0.6,
        };
        let costs = Costs {
            pair_work: 0.0,
            full_fixed_s: 0.05,
            full_per_work_s: 1e-3,
            chunk_fixed_s: 0.01,
            chunk_per_work_s: 1e-3,
            blends: vec![blend.clone()],
            ssd_bytes_per_s: 1e9,
            layout,
            blend: String::new(),
        };
        let corpus_bytes = chunks
            .iter()
            .map(|c| scaled_layout(&layout).object_bytes(c.len()))
            .sum();
        (costs, blend, corpus_bytes)
    }

    /// A modelled stream of `spec` over `n` chunks of 64 tokens, and the store's replay of
    /// it: what the stream tests below share.
    struct Fixture {
        chunks: Vec<Vec<u32>>,
        costs: Costs,
        blend: BlendCost,
        corpus_bytes: u64,
        queries: Vec<Vec<Pick>>,
        rt: tokio::runtime::Runtime,
    }

    impl Fixture {
        fn new(n: u32, spec: StreamSpec) -> Self {
            let chunks: Vec<Vec<u32>> = (0..n)
                .map(|i| (0..64).map(|t| i * 1000 + t).collect())
                .collect();
            let (costs, blend, corpus_bytes) = modelled(&chunks);
            let queries = stream(spec, chunks.len());
            let rt = tokio::runtime::Runtime::new().unwrap();
            Self {
                chunks,
                costs,
                blend,
                corpus_bytes,
                queries,
                rt,
            }
        }

        /// The bench's arguments for a host tier of `capacity`, the warm-up and windows
        /// given, hits loaded on the caller's thread.
        fn args(capacity: &str, warmup: &str, window: &str) -> TraceBenchArgs {
            use clap::Parser;
            let args = [
                "trace",
                "--host-capacity",
                capacity,
                "--warmup",
                warmup,
                "--window",
                window,
                "--hit-threads",
                "0",
            ];
            Cli::parse_from(args).a
        }

        /// The store's replay with a raw host tier of `policy` and `capacity`.
        fn store(&self, a: &TraceBenchArgs, policy: PolicyKind, capacity: f64) -> Vec<Window> {
            let host = HostSpec {
                policy,
                codec: Codec::Raw,
                capacity,
            };
            replay(
                a,
                &self.rt,
                host,
                &self.queries,
                &self.chunks,
                16,
                (&self.costs, &self.blend),
                self.corpus_bytes,
            )
            .unwrap()
            .0
        }
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        a: TraceBenchArgs,
    }

    /// The modelled stream's warm-store reference: a store with room for everything it saw
    /// keeps exactly the speedup of the corpus precomputed (once the warm-up has drawn every
    /// chunk), and only its new documents cost it anything; a bounded store keeps less.
    #[test]
    fn a_store_that_keeps_everything_it_saw_matches_the_precomputed_corpus() {
        let spec = StreamSpec {
            queries: 80,
            k: 10,
            novel: 0.2,
            s: 0.8,
            seed: 3,
        };
        let f = Fixture::new(12, spec);
        let run = |capacity: &str| {
            let a = Fixture::args(capacity, "40", "20");
            f.store(&a, PolicyKind::Lru, capacity.parse().unwrap())
        };
        let ideal = 1.0 / f.blend.warm_fraction;
        // room for the corpus and every new document
        for w in run("100").iter().filter(|w| !w.warmup) {
            let p = w.precomputed_speedup_median.unwrap();
            assert!(
                (w.speedup_median - p).abs() < 1e-9,
                "{} {p}",
                w.speedup_median
            );
            assert!(
                p > 1.2 && p < ideal - 0.1,
                "new documents cost: {p} of {ideal}"
            );
        }
        // room for a quarter of the corpus: misses beyond the new documents
        for w in run("0.25").iter().filter(|w| !w.warmup) {
            let p = w.precomputed_speedup_median.unwrap();
            assert!(w.speedup_median < 0.9 * p, "{} {p}", w.speedup_median);
        }
    }

    /// The clairvoyant ceiling: with chunks of one size no policy of the store (nor the
    /// other references) hits more often over a stream, whatever the capacity, and with
    /// room for everything it reads the precomputed corpus's speedup once the warm-up has
    /// drawn every chunk.
    #[test]
    fn no_policy_hits_more_often_than_the_clairvoyant_cache() {
        let spec = StreamSpec {
            queries: 200,
            k: 8,
            novel: 0.2,
            s: 0.8,
            seed: 5,
        };
        let f = Fixture::new(40, spec);
        let ranks = popularity_ranks(spec.seed, f.chunks.len());
        let oracle = |a: &TraceBenchArgs, oracle, capacity| {
            replay_oracle(
                a,
                oracle,
                (Codec::Raw, capacity),
                (&f.queries, &ranks),
                &f.chunks,
                16,
                (&f.costs, &f.blend),
                f.corpus_bytes,
            )
            .unwrap()
            .0
        };
        let args = |capacity: &str| Fixture::args(capacity, "100", "50");
        // hits over the whole stream
        let hits = |w: &[Window]| w.iter().map(|w| w.host_hit_rate).sum::<f64>();
        for capacity in ["0.1", "0.25", "0.5"] {
            let a = args(capacity);
            let c: f64 = capacity.parse().unwrap();
            let ceiling = oracle(&a, Oracle::Clairvoyant, c);
            for o in [Oracle::Popularity, Oracle::PerfectLfu] {
                let run = oracle(&a, o, c);
                assert!(hits(&run) <= hits(&ceiling) + 1e-9, "{o:?} at {capacity}");
            }
            for policy in [
                PolicyKind::Lru,
                PolicyKind::Lfu,
                PolicyKind::S3Fifo,
                PolicyKind::CostAware,
            ] {
                let run = f.store(&a, policy, c);
                assert!(
                    hits(&run) <= hits(&ceiling) + 1e-9,
                    "{policy:?} at {capacity}: {} > {}",
                    hits(&run),
                    hits(&ceiling)
                );
            }
            assert!(hits(&ceiling) > 0.0);
        }
        let everything = oracle(&args("100"), Oracle::Clairvoyant, 100.0);
        for w in everything.iter().filter(|w| !w.warmup) {
            let p = w.precomputed_speedup_median.unwrap();
            assert!(
                (w.speedup_median - p).abs() < 1e-9,
                "{} {p}",
                w.speedup_median
            );
        }
    }

    /// The modelled trace's premise: one synthetic layer is 1/(layer count) of a real
    /// object, and a codec without lz4 stores it in the bytes it stores any other layer of
    /// that shape in, so a host tier of that codec holds as many chunks as of real KV.
    #[test]
    fn a_synthetic_layer_encodes_to_the_size_of_any_other() {
        for dtype in [KvDType::F32, KvDType::F16, KvDType::BF16] {
            let real = smollm2_layout(dtype);
            let one = scaled_layout(&real);
            let tokens: Vec<u32> = (0..100).collect();
            assert_eq!(one.object_bytes(100) * 30, real.object_bytes(100));
            // another layer of the shape: a ramp over a wider range
            let elems = one.layer_bytes(100) / dtype.size();
            let mut ramp = Vec::with_capacity(elems * dtype.size());
            for i in 0..elems {
                push_value(&mut ramp, dtype, (i % 977) as f32 * 0.02 - 9.0);
            }
            let key = KeyContext::new(b"t", &[1; 32], &[2; 32], &one).chunk_key(&tokens);
            let object = |layer: Bytes| KvObject::new(key, one, tokens.clone(), vec![layer], None);
            let synthetic = object(synthetic_layer(&one, 100, 7)).unwrap();
            let other = object(Bytes::from(ramp)).unwrap();
            for name in [
                "raw", "int8", "int8/g32", "int8sym", "fp8", "fp8sym", "kivi8", "kivi4", "kivi2",
            ] {
                check_codec(&one, Codec::parse(name).unwrap(), 100).unwrap();
                let codec = Codec::parse(name).unwrap();
                let size = |o: &KvObject| o.encode(codec).unwrap().header.payload_len();
                assert_eq!(size(&synthetic), size(&other), "{name} {dtype:?}");
                assert!(!codec.uses_lz4());
            }
            assert!(Codec::parse("int8+lz4").unwrap().uses_lz4());
            assert!(Codec::parse("lz4").unwrap().uses_lz4());
        }
    }
}
