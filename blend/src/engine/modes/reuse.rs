//! `reuse`: every segment's cached KV placed at its prompt positions (keys rotated there by
//! attention's RoPE); only the suffix is computed, appended over the assembled cache.

use std::borrow::Cow;
use std::cell::RefCell;
use std::time::Instant;

use kvquilt_model::{FillLayers, LayerKv, Rows, positions};

use super::Ran;
use super::assembly::{Prepared, placeholder_cache, prepare};
use crate::cost::PlannedMode;
use crate::engine::Blender;
use crate::error::Result;
use crate::phases::PhaseClock;
use crate::priority::PromptTurn;
use crate::prompt_logprobs::suffix_head;
use crate::recompute::with_fill;
use crate::request::BlendRequest;

/// Runs `req` (validated) by full reuse in `namespace`.
pub(crate) fn run(
    b: &Blender,
    namespace: &[u8],
    req: &BlendRequest,
    start: Instant,
    turn: &PromptTurn<'_>,
) -> Result<Ran> {
    let clock = RefCell::new(PhaseClock::new(
        req.time_phases,
        b.model.device(),
        "assemble",
    ));
    let a = match prepare(b, namespace, req, PlannedMode::Reuse, None, start, turn)? {
        Prepared::FellBack(out) => return Ok(*out),
        Prepared::Ready(a) => *a,
    };
    #[cfg(feature = "gpu")]
    let mut a = a;
    // (a graph replays the question to its last logits only: a scored suffix runs eagerly,
    // and so does a question computed with the prefix's tail)
    #[cfg(feature = "gpu")]
    if let Some(pool) = a
        .graph_pool(b, req.suffix.len())
        .filter(|_| req.prompt_logprobs.is_none() && a.sources.tail().is_none())
    {
        match graphed_question(b, pool, &mut a, req, &clock, turn) {
            Ok((g, logits)) => {
                pool.count_question();
                return finish_graphed(b, pool, a, g, logits, req, start, clock);
            }
            // counted; the request runs eagerly below (its sources are all in memory)
            Err(e) => pool.failed(&e),
        }
    }
    let num_layers = b.model.config().num_layers;
    // the rows the pass computes: the prefix's pages not stored (when the assembly left
    // them to it: `Sources::tail`), then the suffix
    let question: Cow<'_, [u32]> = match a.sources.tail() {
        Some(t) => Cow::Owned([t.tokens(), &req.suffix[..]].concat()),
        None => Cow::Borrowed(&req.suffix[..]),
    };
    let tail = question.len() - req.suffix.len();
    let filled = a.tokens.len() - question.len();
    // the cached segments only: the question's rows are appended by the forward pass
    let mut cache = placeholder_cache(&b.model, filled)?;
    let hidden = b.model.embed(&question)?;
    let pos = positions(filled, question.len());
    // the forward pass appends the question's rows in place after each filled layer
    let mut a = a;
    a.sources.leave_room(question.len());
    clock.borrow_mut().enter("suffix layers")?;
    let mut fill = |l: usize, kv: &mut LayerKv| {
        let was = clock.borrow_mut().enter("load")?;
        a.sources.fill(b, l, kv, turn)?;
        clock.borrow_mut().enter(was)?;
        Ok(())
    };
    let out = with_fill(num_layers, &mut fill, |f| {
        Ok(b.model.run_layers_with(
            0..num_layers,
            hidden,
            Rows::Append(&pos),
            &mut cache,
            &mut FillLayers(f),
        )?)
    })?;
    clock.borrow_mut().enter("head")?;
    let hidden = out.hidden.narrow(0, tail, req.suffix.len())?;
    let (logits, rows) = suffix_head(&b.model, &hidden, req)?;
    a.sources.finish_tail(b, &cache)?;
    let phases = clock.into_inner().finish()?;
    let (mut out, work) = a.finish(b, req, start, logits, cache, 0)?;
    out.stats.phases = phases;
    out.suffix_rows = rows;
    Ok((out, work))
}

/// [`run`]'s question replayed as a CUDA graph (`crate::graphs`): every layer of the context
/// loaded into a pooled graphed cache (all layers' parts in a few launches), then the
/// question appended by the cache's graph for its length (captured on first use). Returns
/// the cache (taken from `pool`) and the last token's logits; on error the cache is given
/// back.
#[cfg(feature = "gpu")]
fn graphed_question(
    b: &Blender,
    pool: &crate::graphs::GraphPool,
    a: &mut super::assembly::Assembly<'_>,
    req: &BlendRequest,
    clock: &RefCell<PhaseClock>,
    turn: &PromptTurn<'_>,
) -> Result<(kvquilt_model::GraphedCache, kvquilt_model::Tensor)> {
    let num_layers = b.model.config().num_layers;
    let non_suffix = a.tokens.len() - req.suffix.len();
    let mut g = pool.take(&b.model, a.tokens.len())?;
    let mut run = || -> Result<kvquilt_model::Tensor> {
        clock.borrow_mut().enter("load")?;
        let layers = (0..num_layers)
            .map(|l| a.sources.layer_parts(b, l, turn))
            .collect::<Result<Vec<_>>>()?;
        g.load_parts(&layers, &positions(0, non_suffix))?;
        clock.borrow_mut().enter("suffix layers")?;
        Ok(g.append(&req.suffix, &positions(non_suffix, req.suffix.len()))?)
    };
    match run() {
        Ok(logits) => Ok((g, logits)),
        Err(e) => {
            pool.give_back(g);
            Err(e)
        }
    }
}

/// After a graphed question: the request's output, its cache views of the pooled one's rows
/// (no copy: the pooled cache goes back lent, and is not reloaded while they live; the
/// request's decode steps take it back and append in place, `graphs::DecodeSteps`).
#[cfg(feature = "gpu")]
#[allow(clippy::too_many_arguments)]
fn finish_graphed(
    b: &Blender,
    pool: &crate::graphs::GraphPool,
    a: super::assembly::Assembly<'_>,
    g: kvquilt_model::GraphedCache,
    logits: kvquilt_model::Tensor,
    req: &BlendRequest,
    start: Instant,
    clock: RefCell<PhaseClock>,
) -> Result<Ran> {
    let phases = clock.into_inner().finish();
    let finished = phases.and_then(|phases| {
        let (mut out, work) = a.finish_then(b, req, start, logits, || Ok(g.cache()?), 0)?;
        out.stats.phases = phases;
        Ok((out, work))
    });
    pool.give_back(g);
    finished
}
