//! Materialising a [`Plan`]: every unique segment gets a [`Source`] of its KV (a stream from
//! a store tier, a device-tier hit, KV computed now, or placeholder rows for a segment the
//! pass computes itself); [`Sources::fill`] then feeds the forward pass one layer at a time,
//! and [`Sources::finish`] keeps what was read or computed in the device tier afterwards and
//! hands over the request's store-back (where the misses the pass computed are prefilled
//! alone, to be stored).
//!
//! A stream that fails part-way (a record fails verification, the tier errs) costs a
//! recompute, never the request: the segment is prefilled alone by the chunk contract, its
//! remaining layers come from that KV, and it is reported `Unusable` (pinned by
//! `blend/tests/faults.rs`). The layers already consumed were verified, and the chunk
//! contract's prefill is what they were made by, so both halves are the same chunk's KV.

use std::time::{Duration, Instant};

use kvquilt_kvstore::{KvLayout, LayerStream, StoreError, StreamLayer, TierKind};
use kvquilt_model::{Device, KvCache, LayerKv};

use super::{Blender, STALL_FACTOR};
use kvquilt_kvstore::ChunkKey;

use super::chain::{self, PrefixPages, Tail};
use super::modes::assembly::zero_rows;
use super::plan::{Entry, Origin, Plan, Why};
use super::store_back::{Pending, StoreBack};
use crate::chunk::ChunkCodec;
use crate::device_tier::DeviceChunk;
use crate::error::{BlendError, Result, invalid};
use crate::priority::PromptTurn;
use crate::request::{BlendRequest, SegmentSource};
use crate::tensor_bytes::{layer_from_bytes, layer_from_record};

/// Layers a stream reads ahead of the layer being computed.
const READ_AHEAD: usize = 4;

/// Where one unique segment's KV comes from during assembly. Every variant but `InPass`
/// yields the KV of the segment's tokens at positions `0..T` (K before RoPE), one layer at a
/// time; `InPass` yields placeholder rows the forward pass overwrites.
enum Source {
    /// Streaming from a store tier, layer by layer.
    Stream(Streamed),
    /// Resident in the device tier.
    Device(DeviceChunk),
    /// Already in memory (computed for this request).
    Memory(KvCache),
    /// Computed by the request's own forward pass ([`Origin::InPass`]): every layer is these
    /// zero rows, `[T, kv_heads, head_dim]`, which the pass replaces.
    InPass(LayerKv),
}

/// An object being read from a store tier, with what reading it has cost so far.
struct Streamed {
    /// The checked object's layers, in layer order.
    stream: LayerStream,
    /// Time this request spent waiting for and converting the stream's layers (what
    /// loading adds to the critical path when reads run ahead of compute).
    busy: Duration,
    /// Bytes read so far.
    bytes: usize,
    /// The layers read so far, kept when the device tier is on (to make them resident
    /// after the request); `None` as well for a lossy object (the device tier holds exact
    /// KV only).
    kept: Option<Vec<LayerKv>>,
}

impl Streamed {
    /// Reads layer `l` (the stream's next) of a segment of `tokens` tokens onto `device`.
    /// After the last layer, the stream's bytes over its busy time are recorded as a load
    /// measurement of its tier. A layer that does not arrive within the stall deadline
    /// ([`stall_deadline`]) is an error (the caller recomputes the segment), and the wait
    /// is recorded as a load, so the cost model learns the tier is slow.
    fn next_layer(
        &mut self,
        l: usize,
        tokens: usize,
        b: &Blender,
        device: &Device,
        layout: &KvLayout,
        turn: &PromptTurn<'_>,
    ) -> Result<LayerKv> {
        let t0 = Instant::now();
        let tier = self.stream.tier;
        let expected = layout.layer_bytes(tokens);
        let deadline = stall_deadline(b, tier, expected);
        // (the timer is made inside `block_on`: it needs the runtime's context)
        let next = async { tokio::time::timeout(deadline, self.stream.next_layer()).await };
        // waiting on the store is no compute: decode steps need not yield to it
        let b_layer = match b.rt.block_on(turn.paused_while_pending(next)) {
            Ok(Some(r)) => r?,
            Ok(None) => {
                return Err(invalid(format!(
                    "the store ended {} before layer {l}",
                    self.stream.info.key
                )));
            }
            Err(_) => {
                let waited = self.busy + t0.elapsed();
                b.costs
                    .record_load(tier, self.bytes + expected, waited.as_secs_f64());
                return Err(BlendError::Store(StoreError::Stalled(format!(
                    "layer {l} of {} from the {tier} tier took over {deadline:?}",
                    self.stream.info.key
                ))));
            }
        };
        let kv = match &b_layer {
            StreamLayer::Decoded(bytes) => {
                layer_from_bytes(bytes, layout, tokens, device, Some(&b.uploader))?
            }
            StreamLayer::Encoded { codec, record } => {
                layer_from_record(*codec, record, layout, tokens, device, Some(&b.uploader))?
            }
        };
        self.busy += t0.elapsed();
        // the cost model reasons in decoded bytes (what an object's layout says it holds), so
        // a tier read encoded shows as the faster tier it is
        self.bytes += expected;
        if l + 1 == layout.num_layers as usize {
            b.costs
                .record_load(tier, self.bytes, self.busy.as_secs_f64());
        }
        if let Some(kept) = &mut self.kept {
            kept.push(kv.clone());
        }
        Ok(kv)
    }
}

/// How long a read of `bytes` from `tier` may take before it counts as stalled: the
/// blender's floor, or [`STALL_FACTOR`] times what the tier takes when healthy
/// ([`CostModel::healthy_load_s`](crate::CostModel::healthy_load_s)) when longer.
pub(crate) fn stall_deadline(b: &Blender, tier: TierKind, bytes: usize) -> Duration {
    let estimate = b.costs.healthy_load_s(tier, bytes) * STALL_FACTOR;
    b.stall_floor
        .max(Duration::from_secs_f64(estimate.min(3600.0)))
}

/// The sources of every unique segment of a plan, and how the prompt places them.
///
/// Invariants: `sources`, `segments`, `how` and the plan's entries are parallel;
/// `placement` is the plan's (one entry index per prompt segment, in prompt order).
pub(crate) struct Sources<'r> {
    /// One source per unique segment.
    sources: Vec<Source>,
    /// Each unique segment's key and tokens.
    segments: Vec<(ChunkKey, &'r [u32])>,
    /// How each unique segment's KV was obtained (a stream that failed part-way is
    /// `Unusable`).
    how: Vec<SegmentSource>,
    /// The namespace's codec (recomputes a segment whose stream failed).
    codec: ChunkCodec,
    /// Computed objects to store after the first token.
    pending: Pending,
    /// For each prompt segment, the index of its source.
    placement: Vec<usize>,
    /// Placeholder rows appended after the segments in every layer (the suffix's, for
    /// `blend`); none for `reuse`.
    suffix: Option<LayerKv>,
    /// Rows every filled layer has room for after its own (the suffix the forward pass
    /// appends, for `reuse`); 0 for `blend`, whose suffix rows are placeholders in the layer.
    room: usize,
    /// The stored objects' layout.
    layout: KvLayout,
    /// Where the layers are placed: the model's device.
    device: Device,
    /// What reading a paged prefix (the first entry, when paged and not a device-tier hit)
    /// came to.
    paged: Option<PagedRead>,
    /// The paged prefix's links after its stored run, left for the request's pass
    /// (`open`'s `defer_tail`), and the prefix's entry: its source holds the run only until
    /// [`Sources::finish_tail`].
    tail: Option<(usize, Tail)>,
}

/// What reading a paged prefix's chain came to (`engine/chain.rs`).
#[derive(Debug, Clone, Copy)]
struct PagedRead {
    /// Prefix tokens read exactly (pages read before any lossy one).
    cached_tokens: usize,
    /// Whether some page was decoded from a lossy codec.
    lossy: bool,
}

impl<'r> Sources<'r> {
    /// Materialises every entry of `plan` in order (opening streams, taking device-tier
    /// hits, computing the rest; computed objects that should be stored are kept for
    /// [`Sources::finish`]). A paged entry (the prefix, `pages` its pages) not resident in
    /// the device tier is read page by page, the pages not stored computed over the ones
    /// read (`chain::run`), or computed whole when planned so for speed (`chain::compute`).
    /// With `defer_tail` (the request's pass computes the prefix's last tokens with its
    /// question: nothing lies between them), the pages after the stored run are left as
    /// [`Sources::tail`].
    pub(crate) fn open(
        b: &Blender,
        codec: &ChunkCodec,
        plan: &Plan<'r>,
        pages: Option<PrefixPages<'_>>,
        turn: &PromptTurn<'_>,
        defer_tail: bool,
    ) -> Result<Self> {
        let mut pending = Pending::default();
        let mut sources = Vec::with_capacity(plan.entries.len());
        let mut how = Vec::with_capacity(plan.entries.len());
        let mut paged = None;
        let mut tail = None;
        for (i, entry) in plan.entries.iter().enumerate() {
            let (source, h) = match &pages {
                Some(p) if entry.paged => {
                    let device = (entry.origin == Origin::Device)
                        .then(|| device_hit(b, entry))
                        .flatten();
                    match device {
                        Some(chunk) => (Source::Device(chunk), SegmentSource::Hit(TierKind::GPU)),
                        None => {
                            let got = if entry.origin == Origin::Compute(Why::Faster) {
                                chain::compute(b, codec, &p.pages, &p.keys)?
                            } else {
                                chain::run(b, codec, &p.pages, &p.keys, turn, defer_tail)?
                            };
                            paged = Some(PagedRead {
                                cached_tokens: got.cached_tokens,
                                lossy: got.lossy(),
                            });
                            let how = got.source();
                            tail = got.tail.map(|t| (i, t));
                            pending.append(got.pending);
                            (Source::Memory(got.cache), how)
                        }
                    }
                }
                _ => materialize(b, codec, entry, &mut pending, turn)?,
            };
            sources.push(source);
            how.push(h);
        }
        Ok(Self {
            sources,
            segments: plan.entries.iter().map(|e| (e.key, e.tokens)).collect(),
            how,
            codec: codec.clone(),
            pending,
            placement: plan.placement.clone(),
            suffix: None,
            room: 0,
            layout: *codec.layout(),
            device: b.model.device().clone(),
            paged,
            tail,
        })
    }

    /// The paged prefix's tokens left for the request's pass, at positions `at()..` right
    /// after the tokens this assembly fills ([`Sources::open`]'s `defer_tail`).
    pub(crate) fn tail(&self) -> Option<&Tail> {
        self.tail.as_ref().map(|(_, t)| t)
    }

    /// After the request's pass computed the tail: queues its pages for storing, cut from
    /// `cache` (the prompt's KV from position 0), and makes the prefix's source its whole
    /// KV (what the device tier keeps resident under the prefix's key). No tail: nothing.
    pub(crate) fn finish_tail(&mut self, b: &Blender, cache: &KvCache) -> Result<()> {
        let Some((i, tail)) = self.tail.take() else {
            return Ok(());
        };
        let prefix = tail.at() + tail.tokens().len();
        tail.queue(b, &self.codec, cache, &mut self.pending)?;
        self.sources[i] = Source::Memory(cache.narrow(0, prefix)?);
        Ok(())
    }

    /// Prefix tokens read exactly when the prefix was read as pages; `None` otherwise.
    pub(crate) fn paged_cached_tokens(&self) -> Option<usize> {
        self.paged.map(|p| p.cached_tokens)
    }

    /// Whether each prompt segment, in prompt order, is computed by the pass (its rows are
    /// placeholders: [`crate::select::TokenRoles::computed`]).
    pub(crate) fn computed_in_pass(&self) -> Vec<bool> {
        self.placement
            .iter()
            .map(|&i| matches!(self.sources[i], Source::InPass(_)))
            .collect()
    }

    /// How each prompt segment's KV was obtained, in prompt order (final once every layer
    /// was filled), and whether it was decoded from a lossy codec.
    pub(crate) fn placed(&self) -> impl Iterator<Item = (SegmentSource, bool)> + '_ {
        let paged_lossy = self.paged.is_some_and(|p| p.lossy);
        self.placement.iter().map(move |&i| {
            let lossy = matches!(&self.sources[i], Source::Stream(s) if s.stream.lossy.is_some())
                || (i == 0 && paged_lossy);
            (self.how[i], lossy)
        })
    }

    /// Appends `rows` (placeholder K and V, `[suffix, kv_heads, head_dim]`) after the
    /// segments in every layer [`Sources::fill`] writes.
    pub(crate) fn append_suffix(&mut self, rows: LayerKv) {
        self.suffix = Some(rows);
    }

    /// Leaves room for `rows` more rows in every layer [`Sources::fill`] writes, so the
    /// forward pass appends them in place (`reuse`: the suffix).
    pub(crate) fn leave_room(&mut self, rows: usize) {
        self.room = rows;
    }

    /// Writes layer `l` of the assembled context into `kv`: [`Sources::layer_parts`] joined.
    /// Call once per layer, in increasing layer order (streams yield layers in order).
    pub(crate) fn fill(
        &mut self,
        b: &Blender,
        l: usize,
        kv: &mut LayerKv,
        turn: &PromptTurn<'_>,
    ) -> Result<()> {
        let parts = self.layer_parts(b, l, turn)?;
        let parts: Vec<&LayerKv> = parts.iter().collect();
        *kv = match (self.room, parts.is_empty()) {
            // a prompt of nothing but its question: the pass appends to an empty layer
            (_, true) => {
                let c = b.model.config();
                LayerKv::empty(c.num_kv_heads, c.head_dim, b.model.dtype(), &self.device)?
            }
            (0, false) => LayerKv::cat(&parts)?,
            (room, false) => LayerKv::cat_with_room(&parts, room)?,
        };
        Ok(())
    }

    /// Whether some segment streams from a store tier (its layers arrive one by one, which
    /// the forward pass overlaps with compute by filling layer by layer).
    #[cfg_attr(not(feature = "gpu"), allow(dead_code))]
    pub(crate) fn streams(&self) -> bool {
        self.sources.iter().any(|s| matches!(s, Source::Stream(_)))
    }

    /// Layer `l` of the assembled context as parts in prompt order: every unique source's
    /// layer `l` (each read once; duplicates share it), then the suffix rows when set. Call
    /// once per layer, in increasing layer order (streams yield layers in order).
    pub(crate) fn layer_parts(
        &mut self,
        b: &Blender,
        l: usize,
        turn: &PromptTurn<'_>,
    ) -> Result<Vec<LayerKv>> {
        let mut layer_of: Vec<LayerKv> = Vec::with_capacity(self.sources.len());
        for i in 0..self.sources.len() {
            let (key, tokens) = self.segments[i];
            let layer = match &mut self.sources[i] {
                Source::Memory(c) => c.layers[l].clone(),
                Source::Device(c) => c[l].clone(),
                Source::InPass(zeros) => zeros.clone(),
                Source::Stream(s) => {
                    match s.next_layer(l, tokens.len(), b, &self.device, &self.layout, turn) {
                        Ok(kv) => kv,
                        Err(e) => {
                            tracing::warn!(%key, layer = l, error = %e, "stored chunk failed mid-read; recomputing it");
                            let how = SegmentSource::Unusable;
                            let cache =
                                compute(b, &self.codec, key, tokens, how, &mut self.pending)?;
                            let layer = cache.layers[l].clone();
                            self.sources[i] = Source::Memory(cache);
                            self.how[i] = how;
                            layer
                        }
                    }
                }
            };
            layer_of.push(layer);
        }
        let mut parts: Vec<LayerKv> = self
            .placement
            .iter()
            .map(|&i| layer_of[i].clone())
            .collect();
        if let Some(suffix) = &self.suffix {
            parts.push(suffix.clone());
        }
        Ok(parts)
    }

    /// After a request's first token: makes the chunks it read from the store or computed
    /// resident in the device tier (when on), every layer of each (a stream not read to its
    /// end is left out), and returns its store-back: the objects computed, and the misses
    /// the pass computed, to be prefilled alone later ([`StoreBack`]).
    pub(crate) fn finish(self, b: &Blender, req: &BlendRequest) -> StoreBack {
        let mut work = StoreBack::new(req, self.pending);
        for (i, &(key, tokens)) in self.segments.iter().enumerate() {
            if matches!(self.sources[i], Source::InPass(_)) && self.how[i] == SegmentSource::Miss {
                work.defer(&self.codec, key, tokens);
            }
        }
        let Some(tier) = &b.device_tier else {
            return work;
        };
        let num_layers = b.model.config().num_layers;
        // (a paged prefix read lossy is not exact KV: never resident)
        let paged_lossy = self.paged.is_some_and(|p| p.lossy);
        for (i, (&(key, tokens), source)) in self.segments.iter().zip(self.sources).enumerate() {
            if i == 0 && paged_lossy {
                continue;
            }
            let cost_s = b.costs.prefill_s(tokens.len()).unwrap_or(0.0);
            match source {
                // (a lossy stream keeps nothing: `kept` is `None`)
                Source::Stream(Streamed {
                    kept: Some(kept),
                    stream,
                    ..
                }) if kept.len() == num_layers => {
                    // read from a local tier and deleted meanwhile: not brought back here
                    // (`Blender::remove` empties the store first, then this tier). A remote
                    // tier's presence is a hint that may lapse: not asked.
                    let local = stream.tier == TierKind::HOST || stream.tier == TierKind::SSD;
                    if tier.put(key, kept, cost_s) && local && b.store.locate(&key).is_none() {
                        tier.remove(&key);
                    }
                }
                // computed here: views of the pass's buffers, made resident as copies
                Source::Memory(cache) if cache.layers.len() == num_layers => {
                    tier.put_packed(key, &cache.layers, cost_s);
                }
                _ => {}
            }
        }
        work
    }
}

/// Obtains one entry's source: a device-tier hit, a checked stream, or — for a planned
/// compute, or a planned load whose object turns out missing or unusable — the segment
/// prefilled alone. Returns how its KV was obtained.
fn materialize(
    b: &Blender,
    codec: &ChunkCodec,
    entry: &Entry<'_>,
    pending: &mut Pending,
    turn: &PromptTurn<'_>,
) -> Result<(Source, SegmentSource)> {
    if entry.origin == Origin::Device
        && let Some(chunk) = device_hit(b, entry)
    {
        return Ok((Source::Device(chunk), SegmentSource::Hit(TierKind::GPU)));
    }
    let how = match entry.origin {
        Origin::InPass(why) => {
            let rows = zero_rows(&b.model, entry.tokens.len())?;
            return Ok((Source::InPass(rows), why.source()));
        }
        Origin::Compute(why) => why.source(),
        Origin::Device | Origin::Load(_) => match open_stream(b, codec, entry, turn) {
            Ok(streamed) => {
                let tier = streamed.stream.tier;
                return Ok((Source::Stream(streamed), SegmentSource::Hit(tier)));
            }
            Err(how) => how,
        },
    };
    let cache = compute(b, codec, entry.key, entry.tokens, how, pending)?;
    Ok((Source::Memory(cache), how))
}

/// The entry's device-tier KV, when resident and of the entry's length; an entry of another
/// length is dropped from the tier (and `None` returned).
fn device_hit(b: &Blender, entry: &Entry<'_>) -> Option<DeviceChunk> {
    let tier = b.device_tier.as_ref()?;
    let chunk = tier.get(&entry.key)?;
    if chunk.first().is_some_and(|l| l.len() == entry.tokens.len()) {
        return Some(chunk);
    }
    tracing::warn!(key = %entry.key, "device-tier entry of another length; dropping it");
    tier.remove(&entry.key);
    None
}

/// Opens the entry's object as a layer stream, checked against the entry's tokens. `Err`
/// says why it must be computed instead: `Miss` (evicted since it was located) or
/// `Unusable` (the read failed, or the object does not match; logged).
fn open_stream(
    b: &Blender,
    codec: &ChunkCodec,
    entry: &Entry<'_>,
    turn: &PromptTurn<'_>,
) -> Result<Streamed, SegmentSource> {
    let key = entry.key;
    let opened = Instant::now();
    let tier = match entry.origin {
        Origin::Load(tier) => tier,
        _ => TierKind::HOST,
    };
    let deadline = stall_deadline(b, tier, 0);
    let open = async {
        let read = b
            .store
            .read_layers_keeping(&key, READ_AHEAD, b.device_codecs);
        tokio::time::timeout(deadline, read).await
    };
    let read = b.rt.block_on(turn.paused_while_pending(open));
    let Ok(read) = read else {
        tracing::warn!(%key, %tier, ?deadline, "opening a stored chunk stalled; recomputing it");
        let waited = opened.elapsed().as_secs_f64();
        b.costs.record_latency(tier, waited);
        let bytes = codec.layout().object_bytes(entry.tokens.len());
        b.costs
            .record_load(tier, usize::try_from(bytes).unwrap_or(usize::MAX), waited);
        return Err(SegmentSource::Unusable);
    };
    match read {
        Ok(Some(stream)) => match codec.check(&stream.info, entry.tokens) {
            Ok(()) => {
                // what opening cost (header read and verified): the tier's latency term
                b.costs
                    .record_latency(stream.tier, opened.elapsed().as_secs_f64());
                Ok(Streamed {
                    kept: b
                        .device_tier
                        .as_ref()
                        .filter(|_| stream.lossy.is_none())
                        .map(|_| Vec::new()),
                    stream,
                    busy: Duration::ZERO,
                    bytes: 0,
                })
            }
            Err(e) => {
                tracing::warn!(%key, error = %e, "stored chunk unusable; recomputing");
                Err(SegmentSource::Unusable)
            }
        },
        Ok(None) => Err(SegmentSource::Miss),
        Err(e) => {
            tracing::warn!(%key, error = %e, "chunk read failed; recomputing");
            Err(SegmentSource::Unusable)
        }
    }
}

/// Prefills the segment `tokens` (of key `key`) alone by the chunk contract (recording the
/// prefill rate). A miss, or an unusable object the store has since dropped, is queued in
/// `pending` to be stored.
fn compute(
    b: &Blender,
    codec: &ChunkCodec,
    key: ChunkKey,
    tokens: &[u32],
    how: SegmentSource,
    pending: &mut Pending,
) -> Result<KvCache> {
    let (cache, took_s) = b.prefill_chunk(codec, tokens)?;
    let store = how == SegmentSource::Miss
        || (how == SegmentSource::Unusable && b.store.locate(&key).is_none());
    if store {
        pending.push(codec, (key, None), tokens, cache.clone(), took_s);
    }
    Ok(cache)
}
