//! `blend`: CacheBlend's selective recompute over the assembled cache (`crate::recompute`):
//! the cache holds every prompt token, the suffix's rows as placeholders, and the tokens
//! whose cached KV deviates most are recomputed in context.

use std::cell::RefCell;
use std::time::Instant;

use kvquilt_model::{LayerKv, ParallelContext};

use super::Ran;
use super::assembly::{Prepared, placeholder_cache, prepare, zero_rows};
use crate::chunk::ChunkEncoding;
use crate::config::{BlendConfig, ParallelCorrection};
use crate::cost::PlannedMode;
use crate::engine::Blender;
use crate::error::Result;
use crate::phases::PhaseClock;
use crate::priority::PromptTurn;
use crate::prompt_logprobs::suffix_head;
use crate::recompute::blend;
use crate::request::BlendRequest;
use crate::select::TokenRoles;

/// Runs `req` (validated, `cfg` validated against the model) by selective recompute in
/// `namespace`.
pub(crate) fn run(
    b: &Blender,
    namespace: &[u8],
    req: &BlendRequest,
    cfg: &BlendConfig,
    start: Instant,
    turn: &PromptTurn<'_>,
) -> Result<Ran> {
    let clock = RefCell::new(PhaseClock::new(
        req.time_phases,
        b.model.device(),
        "assemble",
    ));
    let mut a = match prepare(
        b,
        namespace,
        req,
        PlannedMode::Blend,
        Some(cfg),
        start,
        turn,
    )? {
        Prepared::FellBack(out) => return Ok(*out),
        Prepared::Ready(a) => *a,
    };
    let mut cache = placeholder_cache(&b.model, a.tokens.len())?;
    cache.set_parallel_context(parallel_context(req, cfg.parallel)?);
    let lossy: Vec<bool> = a.sources.placed().map(|(_, lossy)| lossy).collect();
    let roles = roles(
        &a.segments,
        &a.sources.computed_in_pass(),
        &lossy,
        req.suffix.len(),
        cfg.chunk_start,
        a.codec.encoding(),
    );
    #[cfg(feature = "gpu")]
    let query = graphed_query(b, &mut a, req, cfg, &roles, &clock, turn);
    #[cfg(not(feature = "gpu"))]
    let query = None;
    a.sources
        .append_suffix(zero_rows(&b.model, req.suffix.len())?);
    let mut fill = |l: usize, kv: &mut LayerKv| {
        let was = clock.borrow_mut().enter("load")?;
        a.sources.fill(b, l, kv, turn)?;
        clock.borrow_mut().enter(was)?;
        Ok(())
    };
    let r = blend(
        &b.model, &a.tokens, &roles, cfg, &mut cache, &mut fill, &clock, query,
    )?;
    let (logits, rows) = suffix_head(&b.model, &r.suffix_hidden, req)?;
    let phases = clock.into_inner().finish()?;
    let (mut out, work) = a.finish(b, req, start, logits, cache, r.recomputed)?;
    out.stats.phases = phases;
    out.suffix_rows = rows;
    Ok((out, work))
}

/// Query-aware blend's query pass — the question over every layer of the cached chunks,
/// summing the attention each token receives — replayed as a CUDA graph (`crate::graphs`),
/// like `reuse`'s question: the context loaded into a pooled graphed cache, the question
/// appended by the cache's graph that also sums column attention (captured on first use).
/// Only where that pass sums what `recompute`'s would (every layer, no token computed in
/// the pass; `Assembly::graph_pool`'s conditions) and nothing else of the eager pass
/// matters: the eager pass also leaves its K/V in the suffix's rows, which the check
/// layer's deviation then compares against, and `Deviation::Kv` normalises by means over
/// every active row, suffix included — so not under `Kv`. `None` otherwise, and on a
/// failed graphed pass (counted; `recompute` then runs the pass eagerly). A correction of
/// the ranking (`BlendConfig::parallel` in the selection scope) runs here only when it keeps
/// the chunks' mass: a temperature, which the graphed cache's attention applies to the
/// chunks' logits (`GraphedCache::set_parallel_context`). Call before the suffix's
/// placeholder rows join the sources.
#[cfg(feature = "gpu")]
fn graphed_query(
    b: &Blender,
    a: &mut super::assembly::Assembly<'_>,
    req: &BlendRequest,
    cfg: &BlendConfig,
    roles: &TokenRoles,
    clock: &RefCell<PhaseClock>,
    turn: &PromptTurn<'_>,
) -> Option<Vec<f32>> {
    let c = b.model.config();
    let pool = a.graph_pool(b, req.suffix.len())?;
    // a correction of the ranking runs in the graph only as a temperature
    let correction = parallel_context(req, cfg.parallel.filter(|p| p.scope.in_selection()));
    let correction = match correction {
        Ok(None) => None,
        Ok(Some(p)) if p.keeps_mass() => Some(p),
        _ => return None,
    };
    let eligible = cfg.query_weight > 0.0
        && (cfg.query_layers == 0 || cfg.query_layers >= c.num_layers)
        && cfg.deviation != crate::select::Deviation::Kv
        && !roles.computed.iter().any(|&x| x);
    if !eligible {
        return None;
    }
    let non_suffix = a.tokens.len() - req.suffix.len();
    let mut run = || -> Result<Vec<f32>> {
        clock.borrow_mut().enter("query pass")?;
        let mut g = pool.take(&b.model, a.tokens.len())?;
        let mut pass = || -> Result<Vec<f32>> {
            let layers = (0..c.num_layers)
                .map(|l| a.sources.layer_parts(b, l, turn))
                .collect::<Result<Vec<_>>>()?;
            g.load_parts(&layers, &kvquilt_model::positions(0, non_suffix))?;
            g.set_parallel_context(correction.clone())?;
            let (_, sums) = g.append_with_column_sums(
                &req.suffix,
                &kvquilt_model::positions(non_suffix, req.suffix.len()),
            )?;
            Ok(sums.to_vec1::<f32>()?)
        };
        let sums = pass();
        pool.give_back(g);
        sums
    };
    match run() {
        Ok(sums) => {
            pool.count_query_pass();
            Some(sums)
        }
        Err(e) => {
            pool.failed(&e);
            None
        }
    }
}

/// The chunks of `req` (every prompt position after the prefix, before the suffix) as the
/// context `correction` applies to; `None` without a correction or without chunks.
fn parallel_context(
    req: &BlendRequest,
    correction: Option<ParallelCorrection>,
) -> Result<Option<ParallelContext>> {
    let Some(c) = correction else {
        return Ok(None);
    };
    let start = req.prefix.len() as u32;
    let end = start + req.chunks.iter().map(Vec::len).sum::<usize>() as u32;
    if start == end {
        return Ok(None);
    }
    let context = ParallelContext::new(start..end, c.temperature, c.scale)?;
    Ok(Some(match c.layers {
        Some((first, end)) => context.with_layers(first..end)?,
        None => context,
    }))
}

/// Roles of every prompt token for selection: `segments` in prompt order, then `suffix`
/// suffix tokens (always recomputed). A segment the pass computes (`computed`, parallel to
/// `segments`) has every token computed; otherwise a segment at position 0 whose stored KV
/// is exact there (`encoding`, and not decoded from a lossy codec: `lossy`, parallel too)
/// is marked exact, and in every other segment the first `chunk_start` tokens are forced.
fn roles(
    segments: &[&[u32]],
    computed: &[bool],
    lossy: &[bool],
    suffix: usize,
    chunk_start: usize,
    encoding: &ChunkEncoding,
) -> TokenRoles {
    let n: usize = segments.iter().map(|s| s.len()).sum::<usize>() + suffix;
    let mut segment = Vec::with_capacity(n);
    let mut forced = Vec::with_capacity(n);
    let mut exact = Vec::with_capacity(n);
    let mut in_pass = Vec::with_capacity(n);
    let mut start = 0usize;
    for (i, (seg, &computed)) in segments.iter().zip(computed).enumerate() {
        let lossy = lossy.get(i).copied().unwrap_or(false);
        let is_exact = !computed && !lossy && start == 0 && encoding.exact_at_start(seg);
        for j in 0..seg.len() {
            segment.push(i);
            forced.push(!computed && !is_exact && j < chunk_start);
            exact.push(is_exact);
            in_pass.push(computed);
        }
        start += seg.len();
    }
    for _ in 0..suffix {
        segment.push(segments.len());
        forced.push(true);
        exact.push(false);
        in_pass.push(false);
    }
    TokenRoles {
        segment,
        segments: segments.len(),
        forced,
        exact,
        computed: in_pass,
    }
}
