//! The in-memory tier both memory levels are built on: the host tier (store objects in host
//! memory, [`super::HostTier`]) and blend's device tier (model tensors in GPU memory). What
//! they hold differs; how they hold it does not: values under keys, bounded in bytes by a
//! [`TierIndex`] (capacity reserved before an entry lands, victims chosen by the tier's
//! policy, pins and leases honoured), counted in [`TierStats`].
//!
//! Invariants (pinned by `tests::admission_evicts_and_counts`): an entry is in the map iff
//! the index holds it (both change under the map's write lock, so an insert and a remove
//! of one key cannot interleave; the window that once split them was nanoseconds wide, too
//! narrow for a test to hit);
//! bytes held stay within the capacity (the index's admission under one lock); an evicted
//! value is handed back to the caller (to demote it or drop it), never silently kept.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::error::Result;
use crate::index::{Lease, Pins, TierIndex};
use crate::key::ChunkKey;
use crate::policy::PolicyKind;
use crate::stats::{TierStats, TierStatsSnapshot};

/// What [`MemoryTier::insert`] did.
#[derive(Debug, PartialEq)]
pub struct Insertion<V> {
    /// Whether the value was admitted (false: the key was held already, and keeps its value).
    pub inserted: bool,
    /// Entries evicted to make room, with their values (`None`: gone from the map already),
    /// for the caller to demote or drop.
    pub evicted: Vec<(ChunkKey, Option<V>)>,
}

/// Values of type `V` in memory, bounded in bytes, evicting by a policy.
pub struct MemoryTier<V> {
    name: &'static str,
    index: Arc<TierIndex>,
    entries: RwLock<HashMap<ChunkKey, V>>,
    stats: TierStats,
}

impl<V: Clone> MemoryTier<V> {
    /// An empty tier named `name` (in statistics and errors) of `capacity` bytes, evicting
    /// by `policy`, honouring `pins`.
    pub fn new(name: &'static str, capacity: u64, policy: PolicyKind, pins: Pins) -> Self {
        Self {
            name,
            index: Arc::new(TierIndex::new(name, capacity, policy, pins)),
            entries: RwLock::new(HashMap::new()),
            stats: TierStats::default(),
        }
    }

    /// Most bytes the tier holds.
    pub fn capacity(&self) -> u64 {
        self.index.capacity()
    }

    /// Whether `key` is held (no statistics).
    pub fn contains(&self, key: &ChunkKey) -> bool {
        self.entries.read().contains_key(key)
    }

    /// Keys held.
    pub fn keys(&self) -> Vec<ChunkKey> {
        self.entries.read().keys().copied().collect()
    }

    /// `key`'s value, counted as a hit (a use for the eviction policy) or a miss.
    pub fn get(&self, key: &ChunkKey) -> Option<V> {
        let found = self.entries.read().get(key).cloned();
        match &found {
            Some(_) => {
                TierStats::add(&self.stats.hits, 1);
                self.index.touch(key);
            }
            None => TierStats::add(&self.stats.misses, 1),
        }
        found
    }

    /// Counts a use of `key` that did not read it (no statistics).
    pub fn touch(&self, key: &ChunkKey) {
        if self.contains(key) {
            self.index.touch(key);
        }
    }

    /// Admits `value` (`size` bytes; recomputing it would cost `cost_s` seconds) under
    /// `key`, evicting by the policy. A key already held keeps its value (`inserted`
    /// false, nothing evicted). Refused ([`crate::StoreError::NoRoom`]), evicting nothing,
    /// when it cannot fit (larger than the tier, or the rest pinned, leased or being
    /// written).
    pub fn insert(&self, key: ChunkKey, value: V, size: u64, cost_s: f64) -> Result<Insertion<V>> {
        let evicted: Vec<(ChunkKey, Option<V>)> = {
            let mut map = self.entries.write();
            if map.contains_key(&key) {
                return Ok(Insertion {
                    inserted: false,
                    evicted: Vec::new(),
                });
            }
            // (under the map's write lock, so map and index change together; readers wait
            // for the admission: when the tier must evict, a scan of the index that stops
            // once enough bytes are evictable — the whole index only for an object that
            // cannot fit — then the victims)
            let (reservation, victims) = self.index.admit(key, size, cost_s)?;
            let out = victims
                .iter()
                .map(|v| (v.key, map.remove(&v.key)))
                .collect();
            map.insert(key, value);
            reservation.commit();
            out
        };
        TierStats::add(&self.stats.evictions, evicted.len() as u64);
        TierStats::add(&self.stats.puts, 1);
        TierStats::add(&self.stats.bytes_in, size);
        Ok(Insertion {
            inserted: true,
            evicted,
        })
    }

    /// Drops `key`; false if it was not held.
    pub fn remove(&self, key: &ChunkKey) -> bool {
        let removed = {
            let mut map = self.entries.write();
            self.index.remove(key);
            map.remove(key).is_some()
        };
        if removed {
            TierStats::add(&self.stats.removes, 1);
        }
        removed
    }

    /// A lease that keeps `key` from eviction while it lives.
    pub fn lease(&self, key: &ChunkKey) -> Option<Lease> {
        self.index.lease(key)
    }

    /// The tier's live counters (for what only the owner knows: bytes out, latencies,
    /// hits by codec).
    pub fn counters(&self) -> &TierStats {
        &self.stats
    }

    /// The tier's statistics, with its used and total capacity in bytes.
    pub fn snapshot(&self) -> TierStatsSnapshot {
        let i = &self.index;
        self.stats
            .snapshot(self.name, i.used(), i.capacity(), i.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: u8) -> ChunkKey {
        ChunkKey([i; 32])
    }

    #[test]
    fn admission_evicts_and_counts() {
        let t: MemoryTier<&'static str> =
            MemoryTier::new("m", 30, PolicyKind::Lru, Pins::default());
        for (i, v) in [(1, "a"), (2, "b"), (3, "c")] {
            assert!(t.insert(k(i), v, 10, 1.0).unwrap().evicted.is_empty());
        }
        assert_eq!(
            t.insert(k(1), "z", 10, 1.0).unwrap(),
            Insertion {
                inserted: false,
                evicted: vec![]
            },
            "a held key keeps its value"
        );
        assert_eq!(t.get(&k(1)), Some("a")); // 1 is now the most recent
        let out = t.insert(k(4), "d", 10, 1.0).unwrap().evicted;
        assert_eq!(
            out,
            vec![(k(2), Some("b"))],
            "the least recent leaves, handed back"
        );
        assert!(!t.contains(&k(2)) && t.contains(&k(4)));
        let lease = t.lease(&k(3)).unwrap();
        let out = t.insert(k(5), "e", 20, 1.0).unwrap().evicted;
        assert!(
            out.iter().all(|(key, _)| *key != k(3)),
            "a leased entry stays"
        );
        drop(lease);
        assert!(
            t.insert(k(6), "f", 40, 1.0).is_err(),
            "larger than the tier"
        );
        assert!(t.remove(&k(5)) && !t.remove(&k(5)));
        let s = t.snapshot();
        assert_eq!((s.tier.as_str(), s.hits, s.puts, s.removes), ("m", 1, 5, 1));
        assert!(s.used_bytes <= s.capacity_bytes);
        assert_eq!(t.get(&k(9)), None);
        assert_eq!(t.snapshot().misses, 1);
    }
}
