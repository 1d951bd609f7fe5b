//! What `reuse` and `blend` share: planning the request (or falling back to full prefill),
//! materialising its sources, the placeholder cache their forward pass fills, and the steps
//! after the first token.

use std::time::Instant;

use kvquilt_model::{KvCache, LayerKv, Model, Tensor, positions};

use super::{Ran, full};
use crate::chunk::ChunkCodec;
use crate::config::BlendConfig;
use crate::cost::PlannedMode;
use crate::engine::chain::PrefixPages;
use crate::engine::plan::{Held, Origin, Plan, Why, recompute_share};
use crate::engine::sources::Sources;
use crate::engine::{Blender, fraction, ms};
use crate::error::Result;
use crate::priority::PromptTurn;
use crate::request::{BlendOutput, BlendRequest, BlendStats, SegmentSource};

/// A `reuse` or `blend` request ready for its forward pass.
pub(super) struct Assembly<'r> {
    /// The codec of the request's namespace.
    pub(super) codec: ChunkCodec,
    /// The cached segments in prompt order (prefix first when not empty).
    pub(super) segments: Vec<&'r [u32]>,
    /// Every prompt token in order.
    pub(super) tokens: Vec<u32>,
    /// Every unique segment's KV, layer by layer.
    pub(super) sources: Sources<'r>,
    /// The request's statistics so far (mode recorded; segment sources are counted when
    /// it finishes, a failed stream having become a recompute).
    stats: BlendStats,
    /// The request's mode, as the cost model knows it.
    mode: PlannedMode,
    /// What the plan estimated the request to take to its first token (`None` before any
    /// prefill was measured, or when it rests on a guessed load time); its measured time
    /// corrects such estimates.
    estimate_s: Option<f64>,
}

/// What [`prepare`] came to.
pub(super) enum Prepared<'r> {
    /// The request ran as full prefill: its output.
    FellBack(Box<Ran>),
    /// The request runs its own mode (boxed: the codec makes it large).
    Ready(Box<Assembly<'r>>),
}

/// Plans `req` (a `reuse` or `blend` request, validated) in `namespace`; runs it as full
/// prefill when the blender allows fallback and the plan says full prefill is no slower
/// (`blend`: a blend's selection settings, whose share of a full prefill the plan weighs —
/// `plan::recompute_share`, over the tokens it can change: the opening segment is exact
/// unless computed in the pass; `None` for `reuse`); else opens every source and counts how
/// each segment's KV is obtained. In `blend` (`mode`), segments to compute are computed by
/// the request's own pass (`plan::Origin::InPass`) instead of prefilled alone first; the
/// request's time to its first token then corrects the cost model's estimates for `mode`.
pub(super) fn prepare<'r>(
    b: &Blender,
    namespace: &[u8],
    req: &'r BlendRequest,
    mode: PlannedMode,
    blend: Option<&BlendConfig>,
    start: Instant,
    turn: &PromptTurn<'_>,
) -> Result<Prepared<'r>> {
    let in_pass = mode == PlannedMode::Blend;
    let codec = b.codec(namespace);
    let segments = req.segments();
    let tokens = req.tokens();
    // a long prefix is read and stored as pages (`engine/chain.rs`)
    let pages = PrefixPages::of(b, &codec, &req.prefix);
    // segments no local tier holds are asked of remote tiers (one round trip for all), so
    // that the plan can weigh loading them from there against recomputing
    let mut keys: Vec<_> = segments.iter().map(|s| codec.key(s)).collect();
    if let Some(p) = &pages {
        // (the pages stand for the prefix's own key, which is never read)
        keys.splice(0..1, p.keys.iter().copied());
    }
    b.rt.block_on(turn.paused_while_pending(b.store.probe(&keys)));
    let mut plan = Plan::build(
        &segments,
        |seg| codec.key(seg),
        |key| held(b, key),
        codec.layout(),
        &b.costs,
        b.fallback_to_full,
        in_pass,
    );
    // `reuse` of a prefix and its question alone (no documents between): the prefix's pages
    // not stored are computed in the question's pass, not in a pass of their own
    let defer_tail = mode == PlannedMode::Reuse && plan.placement.len() == 1;
    if let Some(p) = &pages {
        let device = held(b, &p.key) == Some(Held::Device);
        plan.page_prefix(
            p.key,
            device,
            &p.held_run(b),
            codec.layout(),
            &b.costs,
            b.fallback_to_full,
            defer_tail,
        );
    }
    // (a segment read decoded from a lossy codec is not exact either: not known before it
    // is opened, so the estimate takes the opening segment as exact)
    let held = tokens.len() - req.suffix.len() - plan.in_pass_tokens();
    let exact = match (segments.first(), plan.placement.first()) {
        (Some(first), Some(&e))
            if !matches!(plan.entries[e].origin, Origin::InPass(_))
                && codec.encoding().exact_at_start(first) =>
        {
            first.len()
        }
        _ => 0,
    };
    let share = recompute_share(
        blend,
        b.model.config().num_layers,
        exact as f64 / held.max(1) as f64,
    );
    let estimate_s = plan.mode_estimate_s(&b.costs, tokens.len(), req.suffix.len(), share);
    let fallback = if b.fallback_to_full {
        plan.fallback(&b.costs, mode, tokens.len(), estimate_s)
    } else {
        None
    };
    let fall_back = fallback.is_some();
    // held chunks this request uses without reading them (recomputed because that is
    // faster, or the whole request run as full prefill) still count as used for eviction
    let unread: Vec<_> = plan
        .entries
        .iter()
        .filter(|e| match e.origin {
            Origin::Compute(Why::Faster) | Origin::InPass(Why::Faster) => true,
            Origin::Compute(_) | Origin::InPass(_) => false,
            Origin::Load(_) | Origin::Device => fall_back,
        })
        .map(|e| e.key)
        .collect();
    b.store.touch(&unread);
    // (a paged prefix is read page by page: a fallback, or the prefix recomputed because
    // that is faster, touches every page it holds)
    let prefix_unread = plan
        .entries
        .first()
        .is_some_and(|e| e.paged && (fall_back || e.origin == Origin::Compute(Why::Faster)));
    if let Some(p) = pages.as_ref().filter(|_| prefix_unread) {
        b.store.touch(&p.keys);
    }
    if let Some(why) = fallback {
        return Ok(Prepared::FellBack(Box::new(full::fall_back(
            b,
            &codec,
            req,
            &plan,
            pages.as_ref(),
            why,
            start,
        )?)));
    }
    let stats = BlendStats::new(&req.mode, tokens.len(), req.suffix.len());
    let sources = Sources::open(b, &codec, &plan, pages, turn, defer_tail)?;
    Ok(Prepared::Ready(Box::new(Assembly {
        codec,
        segments,
        tokens,
        sources,
        stats,
        mode,
        // a guessed load time makes no sample of the mode's correction
        estimate_s: estimate_s.filter(|_| !plan.estimate_is_guess()),
    })))
}

/// Where `key` is held now: the device tier (when on) first, then the store.
fn held(b: &Blender, key: &kvquilt_kvstore::ChunkKey) -> Option<Held> {
    if b.device_tier.as_ref().is_some_and(|d| d.contains(key)) {
        return Some(Held::Device);
    }
    b.store.locate(key).map(Held::Store)
}

impl Assembly<'_> {
    /// The blender's pool of graphed caches when a short pass of `rows` rows over this
    /// assembly can replay a CUDA graph (`crate::graphs`): graphs on and still usable, every
    /// source in memory (a stream's layers arrive one by one), a question short enough for
    /// the kernel's per-tile rotation (`GraphedCache::most_rows_of`), the fused attention.
    /// `reuse`'s question and query-aware `blend`'s query pass ask.
    #[cfg(feature = "gpu")]
    pub(super) fn graph_pool<'b>(
        &self,
        b: &'b Blender,
        rows: usize,
    ) -> Option<&'b crate::graphs::GraphPool> {
        let pool = b.graphs.as_ref().filter(|p| p.usable())?;
        (!self.sources.streams()
            && rows <= kvquilt_model::GraphedCache::most_rows_of(b.model.config())
            && b.model.attention_kernel() != kvquilt_model::AttentionKernel::Reference)
            .then_some(pool)
    }

    /// After the first token: records how each segment's KV was obtained, the time to the
    /// token and `recomputed` (non-suffix tokens recomputed in context) in the stats, makes
    /// the sources resident in the device tier, stores back what was computed, and returns
    /// the output.
    pub(super) fn finish(
        self,
        b: &Blender,
        req: &BlendRequest,
        start: Instant,
        logits: Tensor,
        cache: KvCache,
        recomputed: usize,
    ) -> Result<Ran> {
        self.finish_then(b, req, start, logits, || Ok(cache), recomputed)
    }

    /// [`Assembly::finish`] with the cache made by `cache` once the time to the first token
    /// is taken (work the second token needs, not the first).
    pub(super) fn finish_then(
        self,
        b: &Blender,
        req: &BlendRequest,
        start: Instant,
        logits: Tensor,
        cache: impl FnOnce() -> Result<KvCache>,
        recomputed: usize,
    ) -> Result<Ran> {
        let mut stats = self.stats;
        // (the prefix, when there is one, is the first segment placed)
        let exact_prefix =
            !req.prefix.is_empty() && self.codec.encoding().sink_for(&req.prefix).is_empty();
        for (i, (how, lossy)) in self.sources.placed().enumerate() {
            stats.count(how);
            // (a paged prefix read lossy and then computed on is no hit)
            stats.lossy_hits += usize::from(lossy && matches!(how, SegmentSource::Hit(_)));
            if i == 0 && exact_prefix && matches!(how, SegmentSource::Hit(_)) && !lossy {
                stats.cached_tokens = req.prefix.len();
            }
        }
        // (a paged prefix: the pages read exactly, however many)
        if let Some(cached) = self.sources.paged_cached_tokens() {
            stats.cached_tokens = cached;
        }
        stats.ttft_ms = ms(&b.model, start)?;
        // (a scored request's reuse runs eagerly where a graph was estimated: not a sample)
        if let Some(estimate) = self.estimate_s
            && req.prompt_logprobs.is_none()
        {
            b.costs
                .record_mode(self.mode, estimate, stats.ttft_ms / 1e3);
        }
        stats.recomputed_tokens = recomputed;
        stats.recompute_fraction = fraction(recomputed, self.tokens.len() - req.suffix.len());
        let cache = cache()?;
        let work = self.sources.finish(b, req);
        Ok((BlendOutput::new(logits, cache, stats), work))
    }
}

/// Zero K and V rows `[rows, kv_heads, head_dim]` in the model's dtype, on its device.
pub(crate) fn zero_rows(model: &Model, rows: usize) -> Result<LayerKv> {
    let c = model.config();
    let zeros = Tensor::zeros(
        (rows, c.num_kv_heads, c.head_dim),
        model.dtype(),
        model.device(),
    )?;
    Ok(LayerKv::new(zeros.clone(), zeros))
}

/// A cache of `rows` tokens at positions `0..rows` whose every layer is zero placeholder
/// rows, for the forward pass to fill layer by layer ([`Sources::fill`]).
pub(super) fn placeholder_cache(model: &Model, rows: usize) -> Result<KvCache> {
    Ok(KvCache::new(
        vec![zero_rows(model, rows)?; model.config().num_layers],
        positions(0, rows),
    ))
}
