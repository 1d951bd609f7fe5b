//! Store-back: the chunks a request computed (misses, new prefix objects) are queued while
//! it runs and stored after its first token, so the next request that needs them hits.
//! Turning computed KV into a stored object (a device-to-host copy on a GPU) happens then
//! too: it is not on the path to the first token.

use kvquilt_kvstore::{ChunkKey, KvObject};
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

/// One computed chunk: its KV as computed (made an object after the first token).
struct Computed {
    codec: ChunkCodec,
    key: ChunkKey,
    tokens: Vec<u32>,
    cache: KvCache,
}

impl Pending {
    /// Queues chunk `key` of `tokens`, whose KV `cache` (positions `0..T`, the chunk
    /// contract's) took `cost_s` seconds to compute; `codec` makes it an object later.
    /// Holding the tensors until then is safe: a KV view's rows never change under it
    /// (`model/src/kv.rs::appends_in_place_without_disturbing_clones`).
    pub(crate) fn push(
        &mut self,
        codec: &ChunkCodec,
        key: ChunkKey,
        tokens: &[u32],
        cache: KvCache,
        cost_s: f64,
    ) {
        let c = Computed {
            codec: codec.clone(),
            key,
            tokens: tokens.to_vec(),
            cache,
        };
        self.chunks.push((c, cost_s));
    }
}

/// Stores `pending` when the request allows it (`req.store_back`; otherwise nothing is
/// stored). A failed conversion or store is logged, not fatal: the request's answer does
/// not depend on it. Returns what was stored, in the order computed; each object's `bytes`
/// is its uncompressed KV size ([`kvquilt_kvstore::KvLayout::object_bytes`]).
pub(crate) fn store_back(b: &Blender, req: &BlendRequest, pending: Pending) -> Vec<StoredObject> {
    if !req.store_back {
        return Vec::new();
    }
    let mut stored = Vec::with_capacity(pending.chunks.len());
    for (c, cost_s) in pending.chunks {
        let obj: KvObject = match c.codec.to_object(c.key, &c.tokens, &c.cache) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(key = %c.key, error = %e, "a computed chunk could not be stored");
                continue;
            }
        };
        let key = *obj.key();
        let tokens = obj.tokens().len();
        let bytes = obj.layout().object_bytes(tokens);
        match b.rt.block_on(b.store.put(obj, cost_s)) {
            Ok(()) => stored.push(StoredObject { key, tokens, bytes }),
            Err(e) => tracing::warn!(%key, error = %e, "storing a computed chunk failed"),
        }
    }
    stored
}
