//! Where a host tier keeps its objects and what decides which of them leave: the seam
//! between [`super::HostTier`] (stats, placement, codecs, readers) and an eviction engine.
//! Two engines: [`IndexedSlots`] (kvquilt's own [`TierIndex`] with an ordering policy: LRU,
//! LFU, S3-FIFO, GDSF) and [`super::tinylfu::MokaSlots`] (moka's TinyLFU).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

use super::Held;
use crate::error::Result;
use crate::index::{Lease, Pins, TierIndex};
use crate::key::ChunkKey;
use crate::object::KvObject;
use crate::policy::PolicyKind;

/// What admitting an object did.
pub(super) struct Admitted {
    /// Whether the object is held now (an admission filter may turn a new object away:
    /// it is then also listed in `evicted`, so a write-back store demotes it).
    pub(super) held: bool,
    /// Objects that left to make room (and turned-away new ones), with their decoded copy
    /// where there is one (an encoded entry gives none).
    pub(super) evicted: Vec<(ChunkKey, Option<Arc<KvObject>>)>,
}

/// An eviction engine over [`Held`] objects, weighed in bytes.
///
/// Invariants every engine keeps: bytes held stay within [`Slots::capacity`] except for
/// objects protected while the engine wanted them gone (pinned or leased: see each
/// engine); a pinned or leased object is never dropped; an object is held at most once.
pub(super) trait Slots: Send + Sync {
    /// Whether `key` is held.
    fn contains(&self, key: &ChunkKey) -> bool;
    /// Keys held.
    fn keys(&self) -> Vec<ChunkKey>;
    /// `key`'s entry, counted as a use by the engine.
    fn get(&self, key: &ChunkKey) -> Option<Held>;
    /// Admits `held` (`size` bytes, recomputing it would cost `cost_s` s) under `key`, not
    /// held yet, evicting as the engine decides.
    fn insert(&self, key: ChunkKey, held: Held, size: u64, cost_s: f64) -> Result<Admitted>;
    /// Drops `key`; false if it was not held.
    fn remove(&self, key: &ChunkKey) -> bool;
    /// A lease keeping `key` held while it lives.
    fn lease(&self, key: &ChunkKey) -> Option<Lease>;
    /// Bytes held.
    fn used(&self) -> u64;
    /// The engine's capacity in bytes.
    fn capacity(&self) -> u64;
    /// Objects held.
    fn len(&self) -> usize;
    /// Engine-specific counters for the tier's statistics (`extra`).
    fn extra(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// kvquilt's own engine: a [`TierIndex`] (byte accounting under one lock, pins and leases,
/// reservations before writing) ordering victims by a [`PolicyKind`].
pub(super) struct IndexedSlots {
    index: Arc<TierIndex>,
    objects: RwLock<HashMap<ChunkKey, Held>>,
}

impl IndexedSlots {
    pub(super) fn new(capacity: u64, policy: PolicyKind, pins: Pins) -> Self {
        Self {
            index: Arc::new(TierIndex::new("host", capacity, policy, pins)),
            objects: RwLock::new(HashMap::new()),
        }
    }
}

impl Slots for IndexedSlots {
    fn contains(&self, key: &ChunkKey) -> bool {
        self.objects.read().contains_key(key)
    }

    fn keys(&self) -> Vec<ChunkKey> {
        self.objects.read().keys().copied().collect()
    }

    fn get(&self, key: &ChunkKey) -> Option<Held> {
        let o = self.objects.read().get(key).cloned();
        if o.is_some() {
            self.index.touch(key);
        }
        o
    }

    fn insert(&self, key: ChunkKey, held: Held, size: u64, cost_s: f64) -> Result<Admitted> {
        let (reservation, victims) = self.index.admit(key, size, cost_s)?;
        let mut evicted = Vec::with_capacity(victims.len());
        {
            let mut map = self.objects.write();
            for (v, _) in &victims {
                // an encoded entry gives no copy: a host codec requires write-through, where
                // nothing is demoted (`TieredStore::open`), and decoding it here would be
                // wasted work under the lock
                let copy = match map.remove(v) {
                    Some(Held::Decoded(o)) => Some(o),
                    _ => None,
                };
                evicted.push((*v, copy));
            }
            map.insert(key, held);
        }
        reservation.commit();
        Ok(Admitted {
            held: true,
            evicted,
        })
    }

    fn remove(&self, key: &ChunkKey) -> bool {
        let removed = self.objects.write().remove(key).is_some();
        self.index.remove(key);
        removed
    }

    fn lease(&self, key: &ChunkKey) -> Option<Lease> {
        self.index.lease(key)
    }

    fn used(&self) -> u64 {
        self.index.used()
    }

    fn capacity(&self) -> u64 {
        self.index.capacity()
    }

    fn len(&self) -> usize {
        self.index.len()
    }
}
