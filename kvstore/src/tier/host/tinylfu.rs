//! The host tier's TinyLFU engine, on moka: a new object is admitted only when moka's
//! frequency sketch says it is used more often than what it would evict, so a stream of
//! one-off chunks (novel documents a RAG query retrieves once) cannot push out the popular
//! ones; weighed in bytes.
//!
//! moka decides what leaves; kvquilt's pins and leases are held outside its eviction: an
//! object moka evicts while it is pinned or leased moves to an exempt map and stays
//! readable until its pin ends and its last lease is dropped, then leaves (handed back for
//! demotion like any evicted object). Bytes held are moka's (within capacity) plus the
//! exempt ones; a put that would make the exempt bytes alone pass the capacity is refused.
//! Evicted objects are handed back to the store at the next admission (the listener runs
//! inside moka's housekeeping).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use moka::notification::RemovalCause;
use parking_lot::Mutex;

use super::Held;
use super::slots::{Admitted, Slots};
use crate::error::{Result, StoreError};
use crate::index::{Lease, Pins, now_unix_s};
use crate::key::ChunkKey;
use crate::object::KvObject;

type Leaving = Vec<(ChunkKey, Option<Arc<KvObject>>)>;

/// A byte-weighed moka cache with TinyLFU admission, plus the objects it evicted while
/// they were pinned or leased.
pub(super) struct MokaSlots {
    cache: moka::sync::Cache<ChunkKey, Held>,
    capacity: u64,
    pins: Pins,
    /// Objects moka evicted while pinned or leased, and their sizes.
    exempt: Mutex<HashMap<ChunkKey, Held>>,
    /// What moka's eviction listener reported and [`MokaSlots::settle`] has not sorted yet.
    reported: Arc<Mutex<Vec<(ChunkKey, Held)>>>,
    /// Evicted objects not yet handed back by an admission.
    leaving: Mutex<Leaving>,
    /// Live leases per key.
    leases: Arc<Mutex<HashMap<ChunkKey, u32>>>,
    /// New objects the admission filter turned away.
    rejected: AtomicU64,
    /// Held across an admission and the housekeeping after it: moka applies writes in its
    /// housekeeping, so concurrent admissions could pass the capacity for a moment; one at
    /// a time they cannot.
    admitting: Mutex<()>,
}

impl MokaSlots {
    pub(super) fn new(capacity: u64, pins: Pins) -> Self {
        let reported: Arc<Mutex<Vec<(ChunkKey, Held)>>> = Arc::default();
        let listener = Arc::clone(&reported);
        let cache = moka::sync::Cache::builder()
            .max_capacity(capacity)
            .weigher(|_: &ChunkKey, h: &Held| u32::try_from(h.size()).unwrap_or(u32::MAX))
            .eviction_policy(moka::policy::EvictionPolicy::tiny_lfu())
            .eviction_listener(move |k: Arc<ChunkKey>, v: Held, cause: RemovalCause| {
                if cause.was_evicted() {
                    listener.lock().push((*k, v));
                }
            })
            .build();
        Self {
            cache,
            capacity,
            pins,
            exempt: Mutex::default(),
            reported,
            leaving: Mutex::default(),
            leases: Arc::default(),
            rejected: AtomicU64::new(0),
            admitting: Mutex::new(()),
        }
    }

    fn protected(&self, key: &ChunkKey, now: u64) -> bool {
        self.pins.is_pinned(key, now) || self.leases.lock().get(key).is_some_and(|&n| n > 0)
    }

    fn exempt_bytes(&self) -> u64 {
        self.exempt.lock().values().map(Held::size).sum()
    }

    /// Runs moka's housekeeping, then sorts what it evicted: protected objects to the
    /// exempt map, the rest (and exempt objects no longer protected) out.
    fn settle(&self) {
        self.cache.run_pending_tasks();
        let reported = std::mem::take(&mut *self.reported.lock());
        let now = now_unix_s();
        let mut exempt = self.exempt.lock();
        let mut leaving = self.leaving.lock();
        for (k, h) in reported {
            if self.protected(&k, now) {
                exempt.insert(k, h);
            } else {
                leaving.push((k, h.into_copy()));
            }
        }
        let free: Vec<ChunkKey> = exempt
            .keys()
            .filter(|k| !self.protected(k, now))
            .copied()
            .collect();
        for k in free {
            if let Some(h) = exempt.remove(&k) {
                leaving.push((k, h.into_copy()));
            }
        }
    }
}

impl Slots for MokaSlots {
    fn contains(&self, key: &ChunkKey) -> bool {
        self.cache.contains_key(key) || self.exempt.lock().contains_key(key)
    }

    fn keys(&self) -> Vec<ChunkKey> {
        let mut keys: Vec<ChunkKey> = self.cache.iter().map(|(k, _)| *k).collect();
        keys.extend(self.exempt.lock().keys().copied());
        keys
    }

    fn get(&self, key: &ChunkKey) -> Option<Held> {
        self.cache
            .get(key)
            .or_else(|| self.exempt.lock().get(key).cloned())
    }

    fn insert(&self, key: ChunkKey, held: Held, size: u64, _cost_s: f64) -> Result<Admitted> {
        let _one_at_a_time = self.admitting.lock();
        let exempt = self.exempt_bytes();
        let room = self.capacity.saturating_sub(exempt);
        if size > room || size > u64::from(u32::MAX) {
            return Err(StoreError::NoRoom {
                tier: "host".into(),
                needed: size,
                available: room.min(u64::from(u32::MAX)),
                capacity: self.capacity,
            });
        }
        self.cache.insert(key, held);
        self.settle();
        let evicted = std::mem::take(&mut *self.leaving.lock());
        let held = self.cache.contains_key(&key);
        if !held {
            self.rejected.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Admitted { held, evicted })
    }

    fn remove(&self, key: &ChunkKey) -> bool {
        // an explicit removal is not reported by the listener (only evictions are)
        let in_cache = self.cache.remove(key).is_some();
        let in_exempt = self.exempt.lock().remove(key).is_some();
        self.leaving.lock().retain(|(k, _)| k != key);
        in_cache || in_exempt
    }

    fn lease(&self, key: &ChunkKey) -> Option<Lease> {
        if !self.contains(key) {
            return None;
        }
        *self.leases.lock().entry(*key).or_insert(0) += 1;
        let (leases, key) = (Arc::clone(&self.leases), *key);
        Some(Lease::new(move || {
            let mut g = leases.lock();
            if let Some(n) = g.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    g.remove(&key);
                }
            }
        }))
    }

    fn used(&self) -> u64 {
        self.cache.weighted_size() + self.exempt_bytes()
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn len(&self) -> usize {
        usize::try_from(self.cache.entry_count()).unwrap_or(usize::MAX) + self.exempt.lock().len()
    }

    fn extra(&self) -> Vec<(&'static str, u64)> {
        vec![
            (
                "admission_rejections",
                self.rejected.load(Ordering::Relaxed),
            ),
            ("exempt_objects", self.exempt.lock().len() as u64),
        ]
    }
}
