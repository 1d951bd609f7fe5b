//! `reuse`: every segment's cached KV placed at its prompt positions (keys rotated there by
//! attention's RoPE); only the suffix is computed, appended over the assembled cache.

use std::cell::RefCell;
use std::time::Instant;

use kvquilt_model::{FillLayers, LayerKv, Rows, positions};

use super::Ran;
use super::assembly::{Prepared, placeholder_cache, prepare};
use crate::cost::PlannedMode;
use crate::engine::Blender;
use crate::error::Result;
use crate::phases::PhaseClock;
use crate::recompute::with_fill;
use crate::request::BlendRequest;

/// Runs `req` (validated) by full reuse in `namespace`.
pub(crate) fn run(
    b: &Blender,
    namespace: &[u8],
    req: &BlendRequest,
    start: Instant,
) -> Result<Ran> {
    let clock = RefCell::new(PhaseClock::new(
        req.time_phases,
        b.model.device(),
        "assemble",
    ));
    let mut a = match prepare(b, namespace, req, PlannedMode::Reuse, 0.0, start)? {
        Prepared::FellBack(out) => return Ok(*out),
        Prepared::Ready(a) => *a,
    };
    let num_layers = b.model.config().num_layers;
    let non_suffix = a.tokens.len() - req.suffix.len();
    // the cached segments only: the suffix's rows are appended by the forward pass
    let mut cache = placeholder_cache(&b.model, non_suffix)?;
    let hidden = b.model.embed(&req.suffix)?;
    let pos = positions(non_suffix, req.suffix.len());
    // the forward pass appends the suffix's rows in place after each filled layer
    a.sources.leave_room(req.suffix.len());
    clock.borrow_mut().enter("suffix layers")?;
    let mut fill = |l: usize, kv: &mut LayerKv| {
        let was = clock.borrow_mut().enter("load")?;
        a.sources.fill(b, l, kv)?;
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
    let last = out.hidden.narrow(0, req.suffix.len() - 1, 1)?;
    let logits = b.model.logits(&last)?.squeeze(0)?;
    let phases = clock.into_inner().finish()?;
    let (mut out, work) = a.finish(b, req, start, logits, cache, 0)?;
    out.stats.phases = phases;
    Ok((out, work))
}
