//! `full`: plain prefill of the whole prompt (the baseline), and the fallback of `reuse` and
//! `blend` to it.

use std::time::Instant;

use kvquilt_model::positions;

use super::Ran;
use crate::chunk::ChunkCodec;
use crate::config::Mode;
use crate::engine::chain::{self, PrefixPages};
use crate::engine::plan::Plan;
use crate::engine::store_back::{Pending, StoreBack};
use crate::engine::{Blender, device_elapsed, ms};
use crate::error::Result;
use crate::prompt_logprobs::suffix_head;
use crate::request::{BlendOutput, BlendRequest, BlendStats, Fallback, SegmentSource};

/// Runs `req` as full prefill: every prompt token at positions `0..N`. Stores nothing.
pub(crate) fn run(b: &Blender, req: &BlendRequest, start: Instant) -> Result<Ran> {
    let out = prefill_all(b, req, start, None)?;
    Ok((out, StoreBack::new(req, Pending::default())))
}

/// Runs a planned `reuse` or `blend` request as full prefill (the plan said it is no
/// slower, for the reason `why`: `Plan::fallback`). Its stats say so: mode `full`,
/// `fell_back_to_full` and `fallback`, and
/// per segment `Miss` for a planned miss and `RecomputedForSpeed` for any other. Planned
/// misses are still prefilled alone by the chunk contract (in the store-back, after the
/// first token) and stored back, so the next request can reuse them; a paged prefix's
/// (`pages`) pages not stored are not prefilled again: they are taken from the full
/// prefill's KV, which is theirs exactly.
pub(crate) fn fall_back(
    b: &Blender,
    codec: &ChunkCodec,
    req: &BlendRequest,
    plan: &Plan<'_>,
    pages: Option<&PrefixPages<'_>>,
    why: Fallback,
    start: Instant,
) -> Result<Ran> {
    let mut out = prefill_all(b, req, start, Some(why))?;
    let mut pending = Pending::default();
    // (the pages held are left out)
    if let Some(p) = pages {
        chain::queue_from(b, codec, &p.pages, &p.keys, &out.cache, &mut pending)?;
    }
    let mut work = StoreBack::new(req, pending);
    for e in plan
        .entries
        .iter()
        .filter(|e| !e.paged && e.origin.is_miss())
    {
        work.defer(codec, e.key, e.tokens);
    }
    for &i in &plan.placement {
        out.stats.count(if plan.entries[i].origin.is_miss() {
            SegmentSource::Miss
        } else {
            SegmentSource::RecomputedForSpeed
        });
    }
    Ok((out, work))
}

/// Prefills the whole prompt (recording the prefill rate); returns the last token's logits,
/// the prompt's KV, the suffix scored when asked and the stats of a `full` run
/// (`fallback`: a fallback's reason), the time to the first token included.
fn prefill_all(
    b: &Blender,
    req: &BlendRequest,
    start: Instant,
    fallback: Option<Fallback>,
) -> Result<BlendOutput> {
    let tokens = req.tokens();
    let mut cache = b.model.empty_cache()?;
    let t0 = Instant::now();
    let hidden = b
        .model
        .prefill_hidden(&tokens, &positions(0, tokens.len()), &mut cache)?;
    // (the rate is the forward pass's: scoring the suffix, when asked, is not prefill)
    b.costs
        .record_full_prefill(tokens.len(), device_elapsed(&b.model, t0)?.as_secs_f64());
    let n = req.suffix.len();
    let (logits, rows) = suffix_head(&b.model, &hidden.narrow(0, tokens.len() - n, n)?, req)?;
    let mut stats = BlendStats::new(&Mode::Full, tokens.len(), req.suffix.len());
    stats.fell_back_to_full = fallback.is_some();
    stats.fallback = fallback;
    stats.recomputed_tokens = tokens.len() - req.suffix.len();
    stats.recompute_fraction = 1.0;
    stats.ttft_ms = ms(&b.model, start)?;
    let mut out = BlendOutput::new(logits, cache, stats);
    out.suffix_rows = rows;
    Ok(out)
}
