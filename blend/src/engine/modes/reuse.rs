//! `reuse`: every segment's cached KV placed at its prompt positions (keys rotated there by
//! attention's RoPE); only the suffix is computed, appended over the assembled cache.

use std::time::Instant;

use kvquilt_model::{FillLayers, LayerKv, Rows, positions};

use super::assembly::{Prepared, placeholder_cache, prepare};
use crate::engine::Blender;
use crate::error::Result;
use crate::recompute::with_fill;
use crate::request::{BlendOutput, BlendRequest};

/// Runs `req` (validated) by full reuse in `namespace`.
pub(crate) fn run(
    b: &Blender,
    namespace: &[u8],
    req: &BlendRequest,
    start: Instant,
) -> Result<BlendOutput> {
    let mut a = match prepare(b, namespace, req, 0.0, start)? {
        Prepared::FellBack(out) => return Ok(*out),
        Prepared::Ready(a) => *a,
    };
    let num_layers = b.model.config().num_layers;
    let non_suffix = a.tokens.len() - req.suffix.len();
    // the cached segments only: the suffix's rows are appended by the forward pass
    let mut cache = placeholder_cache(&b.model, non_suffix)?;
    let hidden = b.model.embed(&req.suffix)?;
    let pos = positions(non_suffix, req.suffix.len());
    let mut fill = |l: usize, kv: &mut LayerKv| a.sources.fill(b, l, kv);
    let out = with_fill(num_layers, &mut fill, |f| {
        Ok(b.model.run_layers_with(
            0..num_layers,
            hidden,
            Rows::Append(&pos),
            &mut cache,
            &mut FillLayers(f),
        )?)
    })?;
    let last = out.hidden.narrow(0, req.suffix.len() - 1, 1)?;
    let logits = b.model.logits(&last)?.squeeze(0)?;
    a.finish(b, req, start, logits, cache, 0)
}
