//! The blender: resolves each segment of a prompt to stored KV (or computes and stores it),
//! then assembles the context by the requested mode.
//!
//! Its methods block (model compute, and store reads through `rt`): call them from a
//! blocking thread (`spawn_blocking`, a model pool), never from inside an async task.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvquilt_kvstore::{
    ChunkKey, KvObject, LayerStream, PolicyKind, TierKind, TierStatsSnapshot, TieredStore,
};
use kvquilt_model::{KvCache, LayerKv, Model, Rows, Tensor};
use tokio::runtime::Handle;

use crate::chunk::{ChunkCodec, ChunkEncoding};
use crate::config::{BlendConfig, Mode};
use crate::cost::CostModel;
use crate::device_tier::{DeviceChunk, DeviceTier};
use crate::error::{Result, invalid};
use crate::identity::ModelIdentity;
use crate::recompute::{blend, with_fill};
use crate::request::{BlendOutput, BlendRequest, BlendStats, SegmentSource};
use crate::select::TokenRoles;
use crate::tensor_bytes::layer_from_bytes;

/// Layers a stream reads ahead of the layer being computed.
const READ_AHEAD: usize = 4;

/// What [`Blender::precompute`] did for one chunk.
#[derive(Debug, Clone)]
pub struct Precomputed {
    pub key: ChunkKey,
    pub tokens: usize,
    /// The tier that already held it, or `None` when it was computed and stored now.
    pub found_in: Option<TierKind>,
}

/// A model, its identity and a store: everything a request needs.
pub struct Blender {
    model: Arc<Model>,
    identity: ModelIdentity,
    store: Arc<TieredStore>,
    rt: Handle,
    costs: CostModel,
    fallback_to_full: bool,
    /// Chunk KV resident on the model's device, above the store's tiers; `None`: off.
    device_tier: Option<Arc<DeviceTier>>,
}

/// What a request will do for one unique segment.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// Resident in the device tier.
    Device,
    /// Read from the store.
    Load,
    Compute(SegmentSource),
}

/// Where one unique segment's KV comes from during assembly.
enum Source {
    /// Streaming from a tier, layer by layer.
    Stream {
        stream: LayerStream,
        /// Time this request spent waiting for and converting the stream's layers (what
        /// loading adds to the critical path when reads run ahead of compute).
        busy: Duration,
        bytes: usize,
        /// The layers read so far, kept when the device tier is on (to make them resident
        /// after the request).
        kept: Option<Vec<LayerKv>>,
    },
    /// Resident in the device tier.
    Device(DeviceChunk),
    /// Already in memory (computed for this request).
    Memory(KvCache),
}

impl Blender {
    pub fn new(
        model: Arc<Model>,
        identity: ModelIdentity,
        store: Arc<TieredStore>,
        rt: Handle,
    ) -> Self {
        Self {
            model,
            identity,
            store,
            rt,
            costs: CostModel::default(),
            fallback_to_full: true,
            device_tier: None,
        }
    }

    /// Keeps up to `capacity` bytes of chunk KV resident on the model's device (GPU memory
    /// under CUDA), evicting by `policy` and honouring the store's pins. Chunks enter after a
    /// `reuse` or `blend` request has read or computed them; later requests take them from
    /// there without a store read or a host→device copy. 0 bytes: off.
    pub fn with_device_tier(mut self, capacity: u64, policy: PolicyKind) -> Self {
        self.device_tier = (capacity > 0)
            .then(|| Arc::new(DeviceTier::new(capacity, policy, self.store.pins().clone())));
        self
    }

    /// The device tier, when on.
    pub fn device_tier(&self) -> Option<&DeviceTier> {
        self.device_tier.as_deref()
    }

    /// Statistics of every tier a request reads, top first: the device tier (when on), then
    /// the store's.
    pub fn tier_stats(&self) -> Vec<TierStatsSnapshot> {
        let mut all: Vec<_> = self.device_tier.iter().map(|d| d.stats()).collect();
        all.extend(self.store.stats());
        all
    }

    /// Deletes a chunk from the device tier and every store tier; false if none held it.
    pub async fn remove(&self, key: &ChunkKey) -> Result<bool> {
        let on_device = self.device_tier.as_ref().is_some_and(|d| d.remove(key));
        Ok(self.store.remove(key).await? || on_device)
    }

    /// Whether `reuse` and `blend` requests run as full prefill when that is estimated to
    /// reach the first token sooner (default true). Off, a request always runs its mode:
    /// for tests and measurements of the modes themselves.
    pub fn with_fallback_to_full(mut self, on: bool) -> Self {
        self.fallback_to_full = on;
        self
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn store(&self) -> &Arc<TieredStore> {
        &self.store
    }

    pub fn identity(&self) -> &ModelIdentity {
        &self.identity
    }

    pub fn costs(&self) -> &CostModel {
        &self.costs
    }

    /// The chunk codec of a namespace (tenant salt; empty for the default namespace).
    pub fn codec(&self, namespace: &[u8]) -> ChunkCodec {
        ChunkCodec::new(self.identity.clone(), namespace)
    }

    /// Makes sure a chunk's KV is stored: the precompute job's unit of work, and what the
    /// API's chunk upload runs. Content-addressed, so a chunk already held costs a lookup.
    pub fn precompute(&self, namespace: &[u8], tokens: &[u32]) -> Result<Precomputed> {
        let codec = self.codec(namespace);
        let key = codec.key(tokens);
        if let Some(tier) = self.store.locate(&key) {
            return Ok(Precomputed {
                key,
                tokens: tokens.len(),
                found_in: Some(tier),
            });
        }
        let (obj, took) = codec.encode(&self.model, tokens)?;
        self.costs.record_prefill(tokens.len(), took.as_secs_f64());
        self.rt.block_on(self.store.put(obj, took.as_secs_f64()))?;
        Ok(Precomputed {
            key,
            tokens: tokens.len(),
            found_in: None,
        })
    }

    /// Runs one prompt. See [`Mode`] for what each mode computes.
    pub fn run(&self, namespace: &[u8], req: &BlendRequest) -> Result<BlendOutput> {
        let start = Instant::now();
        self.validate(req)?;
        match &req.mode {
            Mode::Full => self.full(req, start, false),
            Mode::Prefix => self.prefix(namespace, req, start),
            Mode::Reuse => self.assemble(namespace, req, None, start),
            Mode::Blend(cfg) => {
                cfg.validate(self.model.config().num_layers)?;
                self.assemble(namespace, req, Some(cfg), start)
            }
        }
    }

    fn validate(&self, req: &BlendRequest) -> Result<()> {
        if req.suffix.is_empty() {
            return Err(invalid(
                "the suffix (question) is empty; the first token needs at least one computed token",
            ));
        }
        if req.chunks.iter().any(|c| c.is_empty()) {
            return Err(invalid("a chunk has zero tokens"));
        }
        let n =
            req.prefix.len() + req.chunks.iter().map(Vec::len).sum::<usize>() + req.suffix.len();
        let ctx = self.model.config().context_length;
        if n > ctx {
            return Err(invalid(format!(
                "the prompt has {n} tokens, the model's context is {ctx}"
            )));
        }
        Ok(())
    }

    /// Plain prefill of the whole prompt.
    fn full(&self, req: &BlendRequest, start: Instant, fell_back: bool) -> Result<BlendOutput> {
        let tokens = req.tokens();
        let mut cache = self.model.empty_cache()?;
        let t0 = Instant::now();
        let logits = self
            .model
            .prefill(&tokens, &positions(0, tokens.len()), &mut cache)?;
        self.costs
            .record_prefill(tokens.len(), t0.elapsed().as_secs_f64());
        let mut stats = BlendStats::new("full", tokens.len(), req.suffix.len());
        stats.fell_back_to_full = fell_back;
        stats.recomputed_tokens = tokens.len() - req.suffix.len();
        stats.recompute_fraction = 1.0;
        stats.ttft_ms = ms(start);
        Ok(BlendOutput {
            logits,
            cache,
            stats,
        })
    }

    /// Exact prefix reuse over prefix-chained keys.
    fn prefix(&self, namespace: &[u8], req: &BlendRequest, start: Instant) -> Result<BlendOutput> {
        let codec = self.codec(namespace);
        let segments = req.segments();
        let keys = codec.prefix_keys(&segments);
        let tokens = req.tokens();
        let mut stats = BlendStats::new("prefix", tokens.len(), req.suffix.len());
        let mut cache = self.model.empty_cache()?;
        let mut at = 0usize;
        let mut reusing = true;
        let mut new_objects = Vec::new();
        for (seg, key) in segments.iter().zip(&keys) {
            let range = positions(at, seg.len());
            if reusing {
                match self.rt.block_on(self.store.get(key)) {
                    Ok(Some((obj, tier))) => match codec.to_cache(&self.model, &obj) {
                        Ok(c) => {
                            cache = KvCache::cat(&[&cache, &c.with_positions(range)?])?;
                            stats.count(SegmentSource::Hit(tier));
                            at += seg.len();
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(%key, error = %e, "stored prefix object unusable");
                            stats.count(SegmentSource::Unusable);
                        }
                    },
                    Ok(None) => stats.count(SegmentSource::Miss),
                    Err(e) => {
                        tracing::warn!(%key, error = %e, "prefix lookup failed");
                        stats.count(SegmentSource::Unusable);
                    }
                }
                reusing = false;
            } else {
                stats.count(SegmentSource::Miss);
            }
            let t0 = Instant::now();
            self.model.prefill(seg, &range, &mut cache)?;
            self.costs
                .record_prefill(seg.len(), t0.elapsed().as_secs_f64());
            stats.recomputed_tokens += seg.len();
            let part = cache
                .narrow(at, seg.len())?
                .with_positions(positions(0, seg.len()))?;
            new_objects.push((
                codec.to_object(*key, seg, &part)?,
                t0.elapsed().as_secs_f64(),
            ));
            at += seg.len();
        }
        let logits =
            self.model
                .prefill(&req.suffix, &positions(at, req.suffix.len()), &mut cache)?;
        stats.ttft_ms = ms(start);
        stats.recompute_fraction = fraction(stats.recomputed_tokens, at);
        stats.stored_back = self.store_back(req, new_objects);
        Ok(BlendOutput {
            logits,
            cache,
            stats,
        })
    }

    /// `reuse` (no recompute; `cfg` = None) and `blend`.
    fn assemble(
        &self,
        namespace: &[u8],
        req: &BlendRequest,
        cfg: Option<&BlendConfig>,
        start: Instant,
    ) -> Result<BlendOutput> {
        let codec = self.codec(namespace);
        let segments = req.segments();
        let tokens = req.tokens();
        let non_suffix = tokens.len() - req.suffix.len();
        let name = if cfg.is_some() { "blend" } else { "reuse" };
        let mut stats = BlendStats::new(name, tokens.len(), req.suffix.len());

        // Plan every unique segment: load it, or compute it (a miss, or cheaper than loading).
        let mut unique: HashMap<ChunkKey, usize> = HashMap::new();
        let mut plans: Vec<(ChunkKey, &[u32], Plan)> = Vec::new();
        let mut seg_source: Vec<usize> = Vec::with_capacity(segments.len());
        let mut est_s = 0.0;
        for seg in &segments {
            let key = codec.key(seg);
            if let Some(&i) = unique.get(&key) {
                seg_source.push(i); // a duplicate: loaded once, placed twice
                continue;
            }
            let (plan, s) = self.plan(&codec, &key, seg);
            est_s += s;
            unique.insert(key, plans.len());
            seg_source.push(plans.len());
            plans.push((key, seg, plan));
        }

        // Never slower than full prefill: fall back when the estimate says so.
        if self.fallback_to_full
            && let Some(full_s) = self.costs.prefill_s(tokens.len())
        {
            let compute = match cfg {
                Some(c) => {
                    let l = self.model.config().num_layers as f64;
                    let first = c.check_layers[0] as f64;
                    (first + c.ratio as f64 * (l - first)) / l
                }
                None => 0.0,
            };
            let suffix_s = self.costs.prefill_s(req.suffix.len()).unwrap_or(0.0);
            // with nothing to load, computing chunks alone cannot beat computing them together
            let loads = plans.iter().any(|(_, _, p)| matches!(p, Plan::Load));
            if !loads || est_s + compute * full_s + suffix_s >= full_s {
                let mut out = self.full(req, start, true)?;
                let mut new_objects = Vec::new();
                for &i in &seg_source {
                    let (key, seg, plan) = &plans[i];
                    let how = match plan {
                        Plan::Compute(SegmentSource::Miss) => SegmentSource::Miss,
                        _ => SegmentSource::RecomputedForSpeed,
                    };
                    if how == SegmentSource::Miss
                        && !new_objects
                            .iter()
                            .any(|(o, _): &(KvObject, f64)| o.key() == key)
                    {
                        let (cache, took) = codec.prefill(&self.model, seg)?;
                        new_objects.push((codec.to_object(*key, seg, &cache)?, took.as_secs_f64()));
                    }
                    out.stats.count(how);
                }
                out.stats.stored_back = self.store_back(req, new_objects);
                return Ok(out);
            }
        }

        // Open the streams and compute what is not loaded.
        let mut new_objects = Vec::new();
        let mut sources: Vec<Source> = Vec::with_capacity(plans.len());
        let mut how: Vec<SegmentSource> = Vec::with_capacity(plans.len());
        let mut source_len: Vec<usize> = Vec::with_capacity(plans.len());
        for (key, seg, plan) in &plans {
            let (source, h) = self.materialize(&codec, *key, seg, *plan, &mut new_objects)?;
            sources.push(source);
            how.push(h);
            source_len.push(seg.len());
        }
        for &i in &seg_source {
            stats.count(how[i]);
        }

        // Segment layout in the prompt.
        let mut starts = Vec::with_capacity(segments.len());
        let mut at = 0usize;
        for seg in &segments {
            starts.push(at);
            at += seg.len();
        }
        let c = self.model.config();
        let rows = if cfg.is_some() {
            tokens.len()
        } else {
            non_suffix
        };
        let placeholder = Tensor::zeros(
            (rows, c.num_kv_heads, c.head_dim),
            self.model.dtype(),
            self.model.device(),
        )?;
        let suffix_rows = Tensor::zeros(
            (req.suffix.len(), c.num_kv_heads, c.head_dim),
            self.model.dtype(),
            self.model.device(),
        )?;
        let mut cache = KvCache {
            layers: vec![
                LayerKv {
                    k: placeholder.clone(),
                    v: placeholder,
                };
                c.num_layers
            ],
            positions: positions(0, rows),
        };

        let layout = *codec.layout();
        let device = self.model.device().clone();
        let costs = &self.costs;
        let include_suffix = cfg.is_some();
        let mut fill = |l: usize, kv: &mut LayerKv| -> Result<()> {
            let mut layer_of: Vec<LayerKv> = Vec::with_capacity(sources.len());
            for (i, src) in sources.iter_mut().enumerate() {
                let seg_len = source_len[i];
                layer_of.push(match src {
                    Source::Memory(c) => c.layers[l].clone(),
                    Source::Device(c) => c[l].clone(),
                    Source::Stream {
                        stream,
                        busy,
                        bytes,
                        kept,
                    } => {
                        let t0 = Instant::now();
                        let b = stream.next_blocking().ok_or_else(|| {
                            invalid(format!(
                                "the store ended {} before layer {l}",
                                stream.info.key
                            ))
                        })??;
                        let kv = layer_from_bytes(&b, &layout, seg_len, &device)?;
                        *busy += t0.elapsed();
                        *bytes += b.len();
                        if l + 1 == layout.num_layers as usize {
                            costs.record_load(stream.tier, *bytes, busy.as_secs_f64());
                        }
                        if let Some(kept) = kept {
                            kept.push(kv.clone());
                        }
                        kv
                    }
                });
            }
            let mut parts: Vec<&LayerKv> = seg_source.iter().map(|&i| &layer_of[i]).collect();
            let suffix = LayerKv {
                k: suffix_rows.clone(),
                v: suffix_rows.clone(),
            };
            if include_suffix {
                parts.push(&suffix);
            }
            *kv = LayerKv::cat(&parts)?;
            Ok(())
        };

        let (logits, recomputed) = match cfg {
            Some(cfg) => {
                let roles = roles(
                    &segments,
                    &starts,
                    req.suffix.len(),
                    cfg.chunk_start,
                    codec.encoding(),
                );
                let r = blend(&self.model, &tokens, &roles, cfg, &mut cache, &mut fill)?;
                (r.logits, r.recomputed)
            }
            None => {
                let hidden = self.model.embed(&req.suffix)?;
                let pos = positions(non_suffix, req.suffix.len());
                let out = with_fill(c.num_layers, &mut fill, |f| {
                    Ok(self.model.run_layers_with(
                        0..c.num_layers,
                        hidden,
                        Rows::Append(&pos),
                        &mut cache,
                        None,
                        f,
                    )?)
                })?;
                let last = out.hidden.narrow(0, req.suffix.len() - 1, 1)?;
                (self.model.logits(&last)?.squeeze(0)?, 0)
            }
        };
        stats.ttft_ms = ms(start);
        stats.recomputed_tokens = recomputed;
        stats.recompute_fraction = fraction(recomputed, non_suffix);
        self.make_resident(&plans, sources);
        stats.stored_back = self.store_back(req, new_objects);
        Ok(BlendOutput {
            logits,
            cache,
            stats,
        })
    }

    /// Whether to load or compute one segment, and the estimated seconds it takes.
    fn plan(&self, codec: &ChunkCodec, key: &ChunkKey, seg: &[u32]) -> (Plan, f64) {
        let layout = codec.layout();
        let bytes = layout.layer_bytes(seg.len()) * layout.num_layers as usize;
        let recompute_s = self.costs.prefill_s(seg.len());
        if self.device_tier.as_ref().is_some_and(|d| d.contains(key)) {
            return (Plan::Device, self.costs.load_s(TierKind::Gpu, bytes));
        }
        match self.store.locate(key) {
            Some(tier) => {
                let load_s = self.costs.load_s(tier, bytes);
                match recompute_s {
                    Some(r) if r < load_s => (Plan::Compute(SegmentSource::RecomputedForSpeed), r),
                    _ => (Plan::Load, load_s),
                }
            }
            None => (
                Plan::Compute(SegmentSource::Miss),
                recompute_s.unwrap_or(0.0),
            ),
        }
    }

    /// Opens a planned load (falling back to computing when the object turns out missing or
    /// unusable) or computes the segment alone; computed misses are queued for store-back.
    fn materialize(
        &self,
        codec: &ChunkCodec,
        key: ChunkKey,
        seg: &[u32],
        plan: Plan,
        new_objects: &mut Vec<(KvObject, f64)>,
    ) -> Result<(Source, SegmentSource)> {
        let device = match plan {
            Plan::Device => self.device_tier.as_ref().and_then(|d| d.get(&key)),
            _ => None,
        };
        if let Some(chunk) = device {
            if chunk.first().is_some_and(|l| l.len() == seg.len()) {
                return Ok((Source::Device(chunk), SegmentSource::Hit(TierKind::Gpu)));
            }
            tracing::warn!(%key, "device-tier entry of another length; dropping it");
            if let Some(d) = &self.device_tier {
                d.remove(&key);
            }
        }
        let how = match plan {
            Plan::Compute(how) => how,
            Plan::Device | Plan::Load => {
                match self.rt.block_on(self.store.read_layers(&key, READ_AHEAD)) {
                    Ok(Some(stream)) => match codec.check(&stream.info, seg) {
                        Ok(()) => {
                            let tier = stream.tier;
                            let source = Source::Stream {
                                stream,
                                busy: Duration::ZERO,
                                bytes: 0,
                                kept: self.device_tier.as_ref().map(|_| Vec::new()),
                            };
                            return Ok((source, SegmentSource::Hit(tier)));
                        }
                        Err(e) => {
                            tracing::warn!(%key, error = %e, "stored chunk unusable; recomputing");
                            SegmentSource::Unusable
                        }
                    },
                    // evicted since it was located
                    Ok(None) => SegmentSource::Miss,
                    Err(e) => {
                        tracing::warn!(%key, error = %e, "chunk read failed; recomputing");
                        SegmentSource::Unusable
                    }
                }
            }
        };
        let (cache, took) = codec.prefill(&self.model, seg)?;
        self.costs.record_prefill(seg.len(), took.as_secs_f64());
        // a miss, or a bad object the store has dropped: store the good one
        let store = how == SegmentSource::Miss
            || (how == SegmentSource::Unusable && self.store.locate(&key).is_none());
        if store {
            new_objects.push((codec.to_object(key, seg, &cache)?, took.as_secs_f64()));
        }
        Ok((Source::Memory(cache), how))
    }

    /// After a request's first token: makes the chunks it read from the store or computed
    /// resident in the device tier (when on), every layer of each.
    fn make_resident(&self, plans: &[(ChunkKey, &[u32], Plan)], sources: Vec<Source>) {
        let Some(tier) = &self.device_tier else {
            return;
        };
        let num_layers = self.model.config().num_layers;
        for ((key, seg, _), source) in plans.iter().zip(sources) {
            let layers = match source {
                Source::Stream {
                    kept: Some(kept), ..
                } => kept,
                Source::Memory(cache) => cache.layers,
                Source::Stream { kept: None, .. } | Source::Device(_) => continue,
            };
            if layers.len() == num_layers {
                let cost_s = self.costs.prefill_s(seg.len()).unwrap_or(0.0);
                tier.put(*key, layers, cost_s);
            }
        }
    }

    /// Stores objects computed by a request (after its first token). A failed store is
    /// logged, not fatal: the request's answer does not depend on it. Returns how many were
    /// stored.
    fn store_back(&self, req: &BlendRequest, objects: Vec<(KvObject, f64)>) -> usize {
        if !req.store_back {
            return 0;
        }
        let mut stored = 0;
        for (obj, cost) in objects {
            let key = *obj.key();
            match self.rt.block_on(self.store.put(obj, cost)) {
                Ok(()) => stored += 1,
                Err(e) => tracing::warn!(%key, error = %e, "storing a computed chunk failed"),
            }
        }
        stored
    }
}

/// Roles of every prompt token for selection.
fn roles(
    segments: &[&[u32]],
    starts: &[usize],
    suffix: usize,
    chunk_start: usize,
    encoding: &ChunkEncoding,
) -> TokenRoles {
    let n: usize = segments.iter().map(|s| s.len()).sum::<usize>() + suffix;
    let mut segment = Vec::with_capacity(n);
    let mut forced = Vec::with_capacity(n);
    let mut exact = Vec::with_capacity(n);
    for (i, (seg, &start)) in segments.iter().zip(starts).enumerate() {
        let is_exact = start == 0 && encoding.exact_at_start(seg);
        for j in 0..seg.len() {
            segment.push(i);
            forced.push(!is_exact && j < chunk_start);
            exact.push(is_exact);
        }
    }
    for _ in 0..suffix {
        segment.push(segments.len());
        forced.push(true);
        exact.push(false);
    }
    TokenRoles {
        segment,
        segments: segments.len(),
        forced,
        exact,
    }
}

fn positions(start: usize, len: usize) -> Vec<u32> {
    (start as u32..(start + len) as u32).collect()
}

fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

fn fraction(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}
