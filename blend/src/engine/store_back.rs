//! Store-back: what a request leaves for after its first token, so the next request that
//! needs the same chunks hits. Two kinds of work: misses the request never prefilled alone
//! (a `blend` computed them inside its own pass, or the request ran as full prefill) are
//! prefilled alone by the chunk contract now; then every computed chunk becomes a stored
//! object (a device-to-host copy on a GPU). None of it is on the path to the first token:
//! [`crate::Blender::run_deferring`] hands it back as a [`StoreBack`] for the caller to run
//! when the answer is out ([`crate::Blender::store_back`]).

use std::collections::HashSet;

use kvquilt_kvstore::{ChainLink, ChunkKey, KvObject};
use kvquilt_model::KvCache;

use super::Blender;
use crate::chunk::ChunkCodec;
use crate::request::{BlendRequest, StoredObject};

/// Chunks a request computed, in the order computed, each with its recompute cost in
/// seconds (the store's cost-aware eviction weighs it).
#[derive(Default)]
pub(crate) struct Pending {
    chunks: Vec<(Computed, f64)>,
}

/// One computed chunk or chain link: its KV as computed (made an object after the first
/// token).
struct Computed {
    codec: ChunkCodec,
    key: ChunkKey,
    tokens: Vec<u32>,
    cache: KvCache,
    /// Its place in a prefix chain, for a link; `None` for a chunk.
    link: Option<ChainLink>,
}

impl Pending {
    /// Queues chunk `key` of `tokens` — with `link`, that link of a prefix chain (`key` its
    /// key of `tokens`), which its object records — whose KV `cache` (positions `0..T`, the
    /// chunk contract's) took `cost_s` seconds to compute; `codec` makes it an object later.
    /// Holding the tensors until then is safe: a KV view's rows never change under it
    /// (`model/src/kv.rs::appends_in_place_without_disturbing_clones`).
    pub(crate) fn push(
        &mut self,
        codec: &ChunkCodec,
        (key, link): (ChunkKey, Option<ChainLink>),
        tokens: &[u32],
        cache: KvCache,
        cost_s: f64,
    ) {
        let c = Computed {
            codec: codec.clone(),
            key,
            tokens: tokens.to_vec(),
            cache,
            link,
        };
        self.chunks.push((c, cost_s));
    }

    /// Queues everything in `other` after what is queued here.
    pub(crate) fn append(&mut self, other: Pending) {
        self.chunks.extend(other.chunks);
    }
}

/// A miss to prefill alone after the first token.
struct Deferred {
    codec: ChunkCodec,
    key: ChunkKey,
    tokens: Vec<u32>,
}

/// The work a request left for after its first token ([`crate::Blender::run_deferring`]).
/// Run it with [`crate::Blender::store_back`]; dropped, nothing is prefilled or stored.
#[must_use = "a request's misses are stored only when its store-back is run"]
pub struct StoreBack {
    /// Misses to prefill alone by the chunk contract (when something will keep them).
    prefill: Vec<Deferred>,
    /// Chunks already computed, to store.
    pending: Pending,
    /// Whether the request may store (`BlendRequest::store_back`).
    store: bool,
}

impl StoreBack {
    /// The store-back of `req` for the chunks in `pending`.
    pub(crate) fn new(req: &BlendRequest, pending: Pending) -> Self {
        Self {
            prefill: Vec::new(),
            pending,
            store: req.store_back,
        }
    }

    /// Queues miss `key` of `tokens` to be prefilled alone after the first token.
    pub(crate) fn defer(&mut self, codec: &ChunkCodec, key: ChunkKey, tokens: &[u32]) {
        self.prefill.push(Deferred {
            codec: codec.clone(),
            key,
            tokens: tokens.to_vec(),
        });
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.prefill.is_empty() && self.pending.chunks.is_empty()
    }

    /// Tokens of every object it may store (what a quota check sizes it by: an object's
    /// bytes are its layout's per-token bytes times its tokens).
    pub fn tokens(&self) -> usize {
        let pending: usize = self
            .pending
            .chunks
            .iter()
            .map(|(c, _)| c.tokens.len())
            .sum();
        pending + self.prefill.iter().map(|d| d.tokens.len()).sum::<usize>()
    }
}

/// Runs `work`: prefills its deferred misses (only when something keeps them: the request
/// may store, or the device tier is on, where they become resident), then stores every
/// computed chunk when the request allows it. A failed prefill, conversion or store is
/// logged, not fatal: the request's answer does not depend on it. Returns what was stored,
/// in the order computed; each object's `bytes` is its uncompressed KV size
/// ([`kvquilt_kvstore::KvLayout::object_bytes`]).
pub(crate) fn run(b: &Blender, work: StoreBack) -> Vec<StoredObject> {
    let StoreBack {
        prefill,
        mut pending,
        store,
    } = work;
    if store || b.device_tier.is_some() {
        for d in prefill {
            let (cache, cost_s) = match b.prefill_chunk(&d.codec, &d.tokens) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(key = %d.key, error = %e, "prefilling a miss to store it failed");
                    continue;
                }
            };
            if let Some(tier) = &b.device_tier {
                tier.put_packed(d.key, &cache.layers, cost_s);
            }
            pending.push(&d.codec, (d.key, None), &d.tokens, cache, cost_s);
        }
    }
    if !store {
        return Vec::new();
    }
    let mut stored = Vec::with_capacity(pending.chunks.len());
    // chain links not stored: a link after one is not stored either (queued in chain
    // order), since no read would reach it past the gap
    let mut broken: HashSet<ChunkKey> = HashSet::new();
    for (c, cost_s) in pending.chunks {
        if c.link.is_some_and(|l| broken.contains(&l.parent)) {
            broken.insert(c.key);
            continue;
        }
        let obj: KvObject = match c.codec.to_object(c.key, &c.tokens, &c.cache, c.link) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(key = %c.key, error = %e, "a computed chunk could not be stored");
                broken.insert(c.key);
                continue;
            }
        };
        let key = *obj.key();
        let tokens = obj.tokens().len();
        let bytes = obj.layout().object_bytes(tokens);
        let parent = c.link.map(|l| l.parent);
        match b.rt.block_on(b.store.put(obj, cost_s)) {
            Ok(()) => stored.push(StoredObject {
                key,
                tokens,
                bytes,
                parent,
            }),
            Err(e) => {
                if e.never_fits() {
                    tracing::debug!(%key, error = %e, "a computed chunk is larger than the store's tier");
                } else {
                    tracing::warn!(%key, error = %e, "storing a computed chunk failed");
                }
                broken.insert(key);
            }
        }
    }
    stored
}
