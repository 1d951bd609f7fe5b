//! `prefix`: exact prefix reuse over prefix-chained keys. The longest stored chain of
//! segments is loaded at its positions; every segment after it is prefilled over the chain
//! at its absolute positions and queued for storing as a new prefix object. Equals `full`.

use std::time::Instant;

use kvquilt_kvstore::{ChunkKey, TierKind};
use kvquilt_model::{KvCache, positions};

use super::Ran;
use crate::chunk::ChunkCodec;
use crate::config::Mode;
use crate::engine::sources::stall_deadline;
use crate::engine::store_back::{Pending, StoreBack};
use crate::engine::{Blender, device_elapsed, fraction, ms};
use crate::error::Result;
use crate::priority::PromptTurn;
use crate::prompt_logprobs::suffix_head;
use crate::request::{BlendOutput, BlendRequest, BlendStats, SegmentSource};

/// Runs `req` by exact prefix reuse in `namespace`.
pub(crate) fn run(
    b: &Blender,
    namespace: &[u8],
    req: &BlendRequest,
    start: Instant,
    turn: &PromptTurn<'_>,
) -> Result<Ran> {
    let codec = b.codec(namespace);
    let segments = req.segments();
    let keys = codec.prefix_keys(&segments);
    let mut stats = BlendStats::new(&Mode::Prefix, req.tokens().len(), req.suffix.len());
    let mut cache = b.model.empty_cache()?;
    let mut at = 0usize;
    let mut reusing = true;
    let mut pending = Pending::default();
    // once a link was decoded from a lossy codec, the links computed over it are not the
    // prefix's exact KV: they are used, never stored (nothing is re-encoded from lossy values)
    let mut exact = true;
    for (seg, key) in segments.iter().zip(&keys) {
        if reusing {
            match load_link(b, &codec, key, seg, turn) {
                Ok((link, tier, lossy)) => {
                    let link = link.with_positions(positions(at, seg.len()))?;
                    cache = KvCache::cat(&[&cache, &link])?;
                    stats.count(SegmentSource::Hit(tier));
                    stats.lossy_hits += usize::from(lossy);
                    exact &= !lossy;
                    if exact {
                        stats.cached_tokens += seg.len();
                    }
                    at += seg.len();
                    continue;
                }
                Err(how) => stats.count(how),
            }
            reusing = false;
        } else {
            stats.count(SegmentSource::Miss);
        }
        let queue = exact.then_some(&mut pending);
        compute_link(b, &codec, *key, seg, at, &mut cache, queue)?;
        stats.recomputed_tokens += seg.len();
        at += seg.len();
    }
    let hidden =
        b.model
            .prefill_hidden(&req.suffix, &positions(at, req.suffix.len()), &mut cache)?;
    let (logits, rows) = suffix_head(&b.model, &hidden, req)?;
    stats.ttft_ms = ms(&b.model, start)?;
    stats.recompute_fraction = fraction(stats.recomputed_tokens, at);
    let mut out = BlendOutput::new(logits, cache, stats);
    out.suffix_rows = rows;
    Ok((out, StoreBack::new(req, pending)))
}

/// The stored prefix object under `key` (the link of segment `seg`), as KV at positions
/// `0..T`, the tier that held it, and whether it was decoded from a lossy codec (served
/// only where the store's config allows lossy objects). `Err` says why the chain ends
/// here: `Miss` (not stored) or `Unusable` (the read failed, stalled past the deadline a
/// stream's layers get — `stall_deadline`, for the whole object — or the object is not
/// this model's KV of `seg`; logged).
fn load_link(
    b: &Blender,
    codec: &ChunkCodec,
    key: &ChunkKey,
    seg: &[u32],
    turn: &PromptTurn<'_>,
) -> Result<(KvCache, TierKind, bool), SegmentSource> {
    // (no local tier holds it: a remote tier, asked whatever its hints say, is the one read)
    let tier = b.store.locate(key).unwrap_or(TierKind::REMOTE);
    let bytes = usize::try_from(codec.layout().object_bytes(seg.len())).unwrap_or(usize::MAX);
    let deadline = stall_deadline(b, tier, bytes);
    let t0 = Instant::now();
    // (the timer is made inside `block_on`: it needs the runtime's context)
    // (a hit from a slower tier is promoted after the read: the deadline covers the read)
    let read = async { tokio::time::timeout(deadline, b.store.get_promoting_later(key)).await };
    let Ok(got) = b.rt.block_on(turn.paused_while_pending(read)) else {
        tracing::warn!(%key, %tier, ?deadline, "reading a stored prefix link stalled; recomputing from here");
        b.costs.record_load(tier, bytes, t0.elapsed().as_secs_f64());
        return Err(SegmentSource::Unusable);
    };
    match got {
        Ok(Some((obj, tier))) => match codec.to_cache(&b.model, &obj, seg) {
            Ok(c) => Ok((c, tier, obj.lossy().is_some())),
            Err(e) => {
                tracing::warn!(%key, error = %e, "stored prefix object unusable");
                Err(SegmentSource::Unusable)
            }
        },
        Ok(None) => Err(SegmentSource::Miss),
        Err(e) => {
            tracing::warn!(%key, error = %e, "prefix lookup failed");
            Err(SegmentSource::Unusable)
        }
    }
}

/// Prefills segment `seg` over `cache` (the KV of the prompt's first `at` tokens) at
/// positions `at..at+T`, recording the prefill rate, and queues its rows (at `0..T`) as the
/// prefix object `key` in `pending` (when given: the cache below is exact).
fn compute_link(
    b: &Blender,
    codec: &ChunkCodec,
    key: ChunkKey,
    seg: &[u32],
    at: usize,
    cache: &mut KvCache,
    pending: Option<&mut Pending>,
) -> Result<()> {
    let t0 = Instant::now();
    b.model.prefill(seg, &positions(at, seg.len()), cache)?;
    let took = device_elapsed(&b.model, t0)?.as_secs_f64();
    b.costs.record_prefill_after(at, seg.len(), took);
    let Some(pending) = pending else {
        return Ok(());
    };
    let part = cache
        .narrow(at, seg.len())?
        .with_positions(positions(0, seg.len()))?;
    pending.push(codec, key, seg, part, took);
    Ok(())
}
