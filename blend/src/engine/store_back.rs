//! Store-back: the objects a request computed (misses, new prefix objects) are queued while
//! it runs and stored after its first token, so the next request that needs them hits.

use kvquilt_kvstore::KvObject;

use super::Blender;
use crate::request::{BlendRequest, StoredObject};

/// Objects a request computed, in the order computed, each with its recompute cost in
/// seconds (the store's cost-aware eviction weighs it).
#[derive(Default)]
pub(crate) struct Pending {
    objects: Vec<(KvObject, f64)>,
}

impl Pending {
    /// Queues `obj`, which took `cost_s` seconds to compute.
    pub(crate) fn push(&mut self, obj: KvObject, cost_s: f64) {
        self.objects.push((obj, cost_s));
    }
}

/// Stores `pending` when the request allows it (`req.store_back`; otherwise nothing is
/// stored). A failed store is logged, not fatal: the request's answer does not depend on
/// it. Returns what was stored, in the order computed; each object's `bytes` is its
/// uncompressed KV size ([`kvquilt_kvstore::KvLayout::object_bytes`]).
pub(crate) fn store_back(b: &Blender, req: &BlendRequest, pending: Pending) -> Vec<StoredObject> {
    if !req.store_back {
        return Vec::new();
    }
    let mut stored = Vec::with_capacity(pending.objects.len());
    for (obj, cost_s) in pending.objects {
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
