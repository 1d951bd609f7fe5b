//! `prefix`: exact prefix reuse over prefix-chained keys (`engine/chain.rs`). The prompt but
//! its suffix is one chain — the prefix's pages ([`Blender::prefix_pages`]: one link when it
//! is short), then one link per chunk. The longest stored run is loaded at its positions;
//! every link after it is prefilled over the run at its absolute positions and queued for
//! storing as a new prefix object. Equals `full`.

use std::time::Instant;

use kvquilt_model::positions;

use super::Ran;
use crate::config::Mode;
use crate::engine::store_back::StoreBack;
use crate::engine::{Blender, chain, fraction, ms};
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
    let (links, pages) = chain_links(b, req);
    let keys = codec.prefix_keys(&links);
    let mut stats = BlendStats::new(&Mode::Prefix, req.tokens().len(), req.suffix.len());
    let chain = chain::run(b, &codec, &links, &keys, turn, false)?;
    // the stats name segments (the prefix, then each chunk): a paged prefix's pages are one
    let (prefix, chunks) = chain.links.split_at(pages);
    let segments = (pages > 0).then(|| chain::summary(prefix));
    for (how, lossy) in segments.into_iter().chain(chunks.iter().copied()) {
        stats.count(how);
        stats.lossy_hits += usize::from(lossy && matches!(how, SegmentSource::Hit(_)));
    }
    stats.cached_tokens = chain.cached_tokens;
    stats.recomputed_tokens = chain.computed_tokens;
    let at = req.tokens().len() - req.suffix.len();
    let mut cache = chain.cache;
    let hidden =
        b.model
            .prefill_hidden(&req.suffix, &positions(at, req.suffix.len()), &mut cache)?;
    let (logits, rows) = suffix_head(&b.model, &hidden, req)?;
    stats.ttft_ms = ms(&b.model, start)?;
    stats.recompute_fraction = fraction(stats.recomputed_tokens, at);
    let mut out = BlendOutput::new(logits, cache, stats);
    out.suffix_rows = rows;
    Ok((out, StoreBack::new(req, chain.pending)))
}

/// The links of `req`'s chain — the prefix's pages (or the prefix whole, when short), then
/// each chunk — and how many of them are the prefix's.
pub(crate) fn chain_links<'r>(b: &Blender, req: &'r BlendRequest) -> (Vec<&'r [u32]>, usize) {
    let mut links = match b.prefix_pages(&req.prefix) {
        Some(pages) => pages,
        None if req.prefix.is_empty() => Vec::new(),
        None => vec![req.prefix.as_slice()],
    };
    let prefix = links.len();
    links.extend(req.chunks.iter().map(Vec::as_slice));
    (links, prefix)
}
