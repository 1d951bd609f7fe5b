//! `prefix`: exact prefix reuse over prefix-chained keys. The longest stored chain of
//! segments is loaded at its positions; every segment after it is prefilled over the chain
//! at its absolute positions and queued for storing as a new prefix object. Equals `full`.

use std::time::Instant;

use kvquilt_kvstore::{ChunkKey, TierKind};
use kvquilt_model::{KvCache, positions};

use super::Ran;
use crate::chunk::ChunkCodec;
use crate::config::Mode;
use crate::engine::store_back::{Pending, StoreBack};
use crate::engine::{Blender, device_elapsed, fraction, ms};
use crate::error::Result;
use crate::priority::PromptTurn;
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
    for (seg, key) in segments.iter().zip(&keys) {
        if reusing {
            match load_link(b, &codec, key, turn) {
                Ok((link, tier)) => {
                    let link = link.with_positions(positions(at, seg.len()))?;
                    cache = KvCache::cat(&[&cache, &link])?;
                    stats.count(SegmentSource::Hit(tier));
                    at += seg.len();
                    continue;
                }
                Err(how) => stats.count(how),
            }
            reusing = false;
        } else {
            stats.count(SegmentSource::Miss);
        }
        compute_link(b, &codec, *key, seg, at, &mut cache, &mut pending)?;
        stats.recomputed_tokens += seg.len();
        at += seg.len();
    }
    let logits = b
        .model
        .prefill(&req.suffix, &positions(at, req.suffix.len()), &mut cache)?;
    stats.ttft_ms = ms(&b.model, start)?;
    stats.recompute_fraction = fraction(stats.recomputed_tokens, at);
    Ok((
        BlendOutput::new(logits, cache, stats),
        StoreBack::new(req, pending),
    ))
}

/// The stored prefix object under `key`, as KV at positions `0..T`, and the tier that held
/// it. `Err` says why the chain ends here: `Miss` (not stored) or `Unusable` (the read
/// failed or the object does not fit the model; logged).
fn load_link(
    b: &Blender,
    codec: &ChunkCodec,
    key: &ChunkKey,
    turn: &PromptTurn<'_>,
) -> Result<(KvCache, TierKind), SegmentSource> {
    match b.rt.block_on(turn.paused_while_pending(b.store.get(key))) {
        Ok(Some((obj, tier))) => match codec.to_cache(&b.model, &obj) {
            Ok(c) => Ok((c, tier)),
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
/// prefix object `key`.
fn compute_link(
    b: &Blender,
    codec: &ChunkCodec,
    key: ChunkKey,
    seg: &[u32],
    at: usize,
    cache: &mut KvCache,
    pending: &mut Pending,
) -> Result<()> {
    let t0 = Instant::now();
    b.model.prefill(seg, &positions(at, seg.len()), cache)?;
    let took = device_elapsed(&b.model, t0)?.as_secs_f64();
    b.costs.record_prefill_after(at, seg.len(), took);
    let part = cache
        .narrow(at, seg.len())?
        .with_positions(positions(0, seg.len()))?;
    pending.push(codec, key, seg, part, took);
    Ok(())
}
