//! A turn's answer kept as pages: the KV a decode leaves is exactly what the next turn of a
//! conversation without documents opens with.
//!
//! A conversation's next prompt renders this one's history, this turn's question, this
//! turn's answer and then the new question: when the prompt holds no documents, its prefix
//! opens with this prompt's tokens followed by the answer — when the answer's text, rendered
//! again, tokenizes to the ids the decode produced (it usually does; where it does not, the
//! pages from there on are not read). The decode cache holds the KV of those tokens (every
//! answer token but the last, which is sampled, never fed): what full prefill computes, up
//! to the rounding of one-token steps against a prefill's. Its full pages (`Blender::with_prefix_page` tokens each, from
//! the prompt's start, chained as every paged prefix is: `engine/chain.rs`) are the pages
//! the next turn looks up, so storing them leaves that turn only its new question to
//! compute — where without them it recomputes this turn's question, answer and the short
//! last page of its history. A peer's prefix cache does the same when its blocks outlive
//! the request. A prompt with documents cannot: its answer attended to documents the next
//! prompt does not hold there (pinned by
//! `blend/tests/pages.rs::a_turn_without_documents_leaves_its_answer_as_pages`).

use kvquilt_kvstore::ChunkKey;
use kvquilt_model::KvCache;

use super::Blender;
use super::chain;
use super::store_back::{Pending, StoreBack};
use crate::config::Mode;
use crate::request::{BlendRequest, BlendStats};

impl Blender {
    /// The store-back of the pages a conversation's next turn reads that `req`'s answer
    /// completes: every full page of `req`'s prompt followed by `fed` (the answer tokens
    /// the decode fed, in order), cut from `cache` (the decode's cache after its last step:
    /// their KV at positions `0..N`), that the store's fastest tier does not hold, each
    /// recording its chain. Run it with [`Blender::store_back`] (charged as any store-back).
    /// Also returns the keys of every full page, held or not (what the caller lists as the
    /// conversation's pages).
    ///
    /// Empty — nothing is stored — unless the KV is the prompt's and the answer's as the
    /// model computes them (nothing approximated: a prefill's up to rounding) and the next
    /// turn can read it: the request has no chunks, runs a mode that stores (`prefix`,
    /// `reuse`, `blend`) and may store ([`BlendRequest::store_back`]), read nothing decoded
    /// from a lossy codec (`stats.lossy_hits`), and `cache` is contiguous at positions
    /// `0..N` with `N` = prompt + `fed` tokens (no token policy pruned it, no attention
    /// correction, no padding: the caller passes the cache only when no token policy or
    /// decode pool touched it).
    pub fn answer_pages(
        &self,
        namespace: &[u8],
        req: &BlendRequest,
        stats: &BlendStats,
        cache: &KvCache,
        fed: &[u32],
    ) -> (StoreBack, Vec<ChunkKey>) {
        let mut pending = Pending::default();
        let keys = self
            .queue_answer_pages(namespace, req, stats, cache, fed, &mut pending)
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "the answer's pages could not be queued; the next turn computes them");
                pending = Pending::default();
                Vec::new()
            });
        (StoreBack::new(req, pending), keys)
    }

    /// Queues [`Blender::answer_pages`]' pages in `pending`; returns every full page's key
    /// (none when the KV does not qualify).
    fn queue_answer_pages(
        &self,
        namespace: &[u8],
        req: &BlendRequest,
        stats: &BlendStats,
        cache: &KvCache,
        fed: &[u32],
        pending: &mut Pending,
    ) -> crate::Result<Vec<ChunkKey>> {
        let page = self.prefix_page;
        let mut tokens = req.tokens();
        tokens.extend_from_slice(fed);
        let unfit = !req.chunks.is_empty()
            || req.mode == Mode::Full
            || !req.store_back
            || stats.lossy_hits > 0
            || page == 0;
        let contiguous = cache.len() == tokens.len()
            && !cache.is_padded()
            && cache.parallel_context().is_none()
            && cache
                .positions
                .iter()
                .enumerate()
                .all(|(i, &p)| p as usize == i);
        if unfit || !contiguous {
            return Ok(Vec::new());
        }
        let codec = self.codec(namespace);
        if !codec.encoding().exact_at_start(&tokens) {
            return Ok(Vec::new());
        }
        let whole = tokens.len() / page * page;
        let pages: Vec<&[u32]> = tokens[..whole].chunks(page).collect();
        let keys = codec.prefix_keys(&pages);
        chain::queue_from(self, &codec, &pages, &keys, cache, pending)?;
        Ok(keys)
    }
}
