//! A tier's bookkeeping: which objects it holds, their sizes, who is reading them, and the
//! eviction order. Admission reserves bytes *before* an object is written, under one lock,
//! so concurrent writers can never push a tier past its capacity.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};
use crate::key::ChunkKey;
use crate::policy::{EvictionPolicy, PolicyKind};

/// How an object is protected from eviction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pin {
    /// Never evicted until unpinned.
    Hard,
    /// Not evicted before this time (seconds since the Unix epoch).
    Soft {
        /// The pin protects the object while the clock reads less than this (seconds since
        /// the Unix epoch).
        until_unix_s: u64,
    },
}

impl Pin {
    /// A soft pin that lasts `ttl` from now.
    pub fn soft(ttl: Duration) -> Self {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Self::Soft {
            until_unix_s: (now + ttl).as_secs(),
        }
    }

    /// Whether the pin still protects its object at `now_unix_s` (seconds since the Unix
    /// epoch).
    pub(crate) fn active(&self, now_unix_s: u64) -> bool {
        match *self {
            Self::Hard => true,
            Self::Soft { until_unix_s } => now_unix_s < until_unix_s,
        }
    }
}

pub(crate) fn now_unix_s() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Pins of a store, shared by all its tiers (a pinned object stays in every tier it is in).
#[derive(Debug, Default, Clone)]
pub struct Pins(Arc<RwLock<HashMap<ChunkKey, Pin>>>);

impl Pins {
    /// Pins `key`, replacing any pin it had. Memory only: [`crate::TieredStore::pin`] also
    /// persists it.
    pub fn set(&self, key: ChunkKey, pin: Pin) {
        self.0.write().insert(key, pin);
    }
    /// Unpins `key`; returns the pin it had.
    pub(crate) fn clear(&self, key: &ChunkKey) -> Option<Pin> {
        self.0.write().remove(key)
    }
    /// `key`'s pin, expired or not.
    pub fn get(&self, key: &ChunkKey) -> Option<Pin> {
        self.0.read().get(key).copied()
    }
    /// `key`'s pin while it protects the object (a lapsed soft pin is `None`).
    pub fn active(&self, key: &ChunkKey) -> Option<Pin> {
        self.get(key).filter(|p| p.active(now_unix_s()))
    }
    /// The pins as they stand, read-locked while the result lives: for a caller that asks
    /// about many keys at once (an admission's scan), one lock instead of one per key.
    pub(crate) fn read(&self) -> PinsRead<'_> {
        PinsRead(self.0.read())
    }
}

/// Read access to [`Pins`] ([`Pins::read`]); pins cannot change while it lives.
pub(crate) struct PinsRead<'a>(parking_lot::RwLockReadGuard<'a, HashMap<ChunkKey, Pin>>);

impl PinsRead<'_> {
    /// Whether `key` has a pin that is active at `now_unix_s` (seconds since the Unix epoch).
    pub(crate) fn is_pinned(&self, key: &ChunkKey, now_unix_s: u64) -> bool {
        self.0.get(key).is_some_and(|p| p.active(now_unix_s))
    }
}

struct Entry {
    size: u64,
    /// Seconds recomputing the object would take (what cost-aware policies weigh).
    cost_s: f64,
    leases: u32,
    /// Which admission of the key this entry is (unique per index): a lease names it, so a
    /// lease taken before a remove and a re-put never releases the new entry's.
    generation: u64,
    /// Admitted but not yet committed: the object is still being written, so it cannot be
    /// chosen as a victim (its eviction would find nothing to delete or demote).
    writing: bool,
}

impl Entry {
    fn evictable(&self) -> bool {
        self.leases == 0 && !self.writing
    }
}

struct Inner {
    entries: HashMap<ChunkKey, Entry>,
    used: u64,
    /// The last [`Entry::generation`] handed out.
    generation: u64,
    policy: Box<dyn EvictionPolicy>,
}

/// The index of one tier.
pub struct TierIndex {
    name: String,
    capacity: u64,
    pins: Pins,
    inner: Mutex<Inner>,
}

/// Bytes reserved for an object being written; released unless committed.
#[must_use = "a reservation is released when dropped unless committed"]
pub struct Reservation<'a> {
    index: &'a TierIndex,
    key: ChunkKey,
    committed: bool,
}

impl Reservation<'_> {
    /// The object is written: it now counts as held, and may be evicted.
    pub fn commit(mut self) {
        self.committed = true;
        if let Some(e) = self.index.inner.lock().entries.get_mut(&self.key) {
            e.writing = false;
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.committed {
            self.index.remove(&self.key);
        }
    }
}

/// An object [`TierIndex::admit`] evicted to make room: forgotten by the index, to be
/// deleted by the tier.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Victim {
    /// The evicted object.
    pub key: ChunkKey,
    /// Bytes it held.
    pub size: u64,
    /// Seconds recomputing it would take (what it was admitted with).
    pub cost_s: f64,
}

/// A read lease: while it lives, the object cannot be evicted from this tier.
///
/// It holds the object it was taken on, not its key: once that object is removed, dropping
/// the lease changes nothing, whatever was stored under the key since (pinned by
/// `tests::a_lease_outliving_its_object_leaves_the_next_one_alone`).
pub struct Lease {
    index: Arc<TierIndex>,
    key: ChunkKey,
    generation: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut g = self.index.inner.lock();
        if let Some(e) = g.entries.get_mut(&self.key)
            && e.generation == self.generation
        {
            e.leases = e.leases.saturating_sub(1);
        }
    }
}

impl TierIndex {
    /// An empty index of a tier named `name` (in errors and statistics) that holds at most
    /// `capacity` bytes, evicts by `policy` and honours `pins`.
    pub fn new(name: &str, capacity: u64, policy: PolicyKind, pins: Pins) -> Self {
        Self {
            name: name.to_string(),
            capacity,
            pins,
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                used: 0,
                generation: 0,
                policy: policy.build(),
            }),
        }
    }

    /// Most bytes the tier may hold.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes held, reservations of objects still being written included. Admission keeps
    /// this within [`TierIndex::capacity`]; objects restored on reopen are counted as found.
    pub fn used(&self) -> u64 {
        self.inner.lock().used
    }

    /// Objects held or being written.
    pub fn len(&self) -> usize {
        self.inner.lock().entries.len()
    }

    /// Whether no object is held or being written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `key` is held or being written.
    pub(crate) fn contains(&self, key: &ChunkKey) -> bool {
        self.inner.lock().entries.contains_key(key)
    }

    /// Keys held or being written, in no particular order.
    pub(crate) fn keys(&self) -> Vec<ChunkKey> {
        self.inner.lock().entries.keys().copied().collect()
    }

    /// Records an object already present (when a tier is reopened), in eviction order.
    pub fn restore(&self, key: ChunkKey, size: u64, cost_s: f64) {
        let mut g = self.inner.lock();
        g.generation += 1;
        let entry = Entry {
            size,
            cost_s,
            leases: 0,
            generation: g.generation,
            writing: false,
        };
        if g.entries.insert(key, entry).is_none() {
            g.used += size;
        }
        g.policy.insert(key, size, cost_s);
    }

    /// Makes room for `size` bytes under `key` and reserves them. Returns the reservation and
    /// the victims, which the caller must delete (or [`TierIndex::restore`] when it cannot). Fails, evicting
    /// nothing, when the object cannot fit: larger than the tier, or too much is pinned or
    /// leased. An object already held is replaced.
    pub fn admit(
        &self,
        key: ChunkKey,
        size: u64,
        cost_s: f64,
    ) -> Result<(Reservation<'_>, Vec<Victim>)> {
        let now = now_unix_s();
        let mut g = self.inner.lock();
        let g = &mut *g;
        let old = g.entries.get(&key).map_or(0, |e| e.size);
        let needed = size.saturating_sub(old);
        let free = self.capacity.saturating_sub(g.used);
        // (one read of the pins for the scan and the victims, taken after the index's lock
        // as everywhere)
        let pins = self.pins.read();
        if needed > free {
            // evictable bytes, not counting the object being replaced: counted only until
            // there are enough (the whole index is scanned only when the object cannot fit,
            // not on every admission that evicts)
            let mut evictable = 0u64;
            for (k, e) in &g.entries {
                if free.saturating_add(evictable) >= needed {
                    break;
                }
                if *k != key && e.evictable() && !pins.is_pinned(k, now) {
                    evictable = evictable.saturating_add(e.size);
                }
            }
            if needed > free.saturating_add(evictable) {
                return Err(StoreError::NoRoom {
                    tier: self.name.clone(),
                    needed: size,
                    available: free + evictable,
                    capacity: self.capacity,
                });
            }
        }
        let mut victims = Vec::new();
        while self.capacity.saturating_sub(g.used) < needed {
            let entries = &g.entries;
            let pins = &pins;
            let v = g
                .policy
                .victim(&mut |k| {
                    *k != key
                        && entries.get(k).is_some_and(Entry::evictable)
                        && !pins.is_pinned(k, now)
                })
                .expect("evictable bytes were counted above");
            g.policy.remove(&v);
            let e = g.entries.remove(&v).expect("victims are tracked");
            g.used -= e.size;
            victims.push(Victim {
                key: v,
                size: e.size,
                cost_s: e.cost_s,
            });
        }
        match g.entries.get_mut(&key) {
            Some(e) => {
                g.used = g.used - e.size + size;
                e.size = size;
                e.cost_s = cost_s;
                e.writing = true;
            }
            None => {
                g.generation += 1;
                let entry = Entry {
                    size,
                    cost_s,
                    leases: 0,
                    generation: g.generation,
                    writing: true,
                };
                g.entries.insert(key, entry);
                g.used += size;
            }
        }
        g.policy.insert(key, size, cost_s);
        Ok((
            Reservation {
                index: self,
                key,
                committed: false,
            },
            victims,
        ))
    }

    /// The object was read.
    pub fn touch(&self, key: &ChunkKey) {
        self.inner.lock().policy.touch(key);
    }

    /// Forgets an object; returns its size if it was held.
    pub fn remove(&self, key: &ChunkKey) -> Option<u64> {
        let mut g = self.inner.lock();
        let e = g.entries.remove(key)?;
        g.used -= e.size;
        g.policy.remove(key);
        Some(e.size)
    }

    /// Takes a read lease on a held object.
    pub fn lease(self: &Arc<Self>, key: &ChunkKey) -> Option<Lease> {
        let mut g = self.inner.lock();
        let e = g.entries.get_mut(key)?;
        e.leases += 1;
        Some(Lease {
            index: Arc::clone(self),
            key: *key,
            generation: e.generation,
        })
    }

    /// Current leases on an object.
    pub fn leases(&self, key: &ChunkKey) -> u32 {
        self.inner.lock().entries.get(key).map_or(0, |e| e.leases)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: u8) -> ChunkKey {
        ChunkKey([i; 32])
    }

    /// Victims as (key, size).
    fn ks(v: &[Victim]) -> Vec<(ChunkKey, u64)> {
        v.iter().map(|v| (v.key, v.size)).collect()
    }

    #[test]
    fn admission_evicts_but_respects_pins_and_leases() {
        let pins = Pins::default();
        let idx = Arc::new(TierIndex::new("t", 100, PolicyKind::Lru, pins.clone()));
        for i in 1..=4 {
            let (r, v) = idx.admit(k(i), 25, 1.0).unwrap();
            r.commit();
            assert!(v.is_empty());
        }
        pins.set(k(1), Pin::Hard);
        let lease = idx.lease(&k(2)).unwrap();
        let (r, v) = idx.admit(k(5), 25, 1.0).unwrap();
        r.commit();
        assert_eq!(ks(&v), vec![(k(3), 25)]);
        // 1 pinned, 2 leased, 4 and 5 free: 50 bytes can go, 60 cannot (the refusal counts
        // every evictable byte: the scan that stops once enough are found runs to the end)
        assert!(matches!(
            idx.admit(k(6), 60, 1.0),
            Err(StoreError::NoRoom {
                available: 50,
                needed: 60,
                ..
            })
        ));
        assert_eq!(idx.used(), 100, "a failed admission evicts nothing");
        drop(lease);
        let (r, v) = idx.admit(k(6), 60, 1.0).unwrap();
        r.commit();
        assert_eq!(v.len(), 3);
        assert!(idx.contains(&k(1)));
        assert!(idx.used() <= 100);
    }

    #[test]
    fn expired_soft_pin_no_longer_protects() {
        let pins = Pins::default();
        let idx = TierIndex::new("t", 10, PolicyKind::Lru, pins.clone());
        idx.admit(k(1), 10, 1.0).unwrap().0.commit();
        pins.set(k(1), Pin::Soft { until_unix_s: 1 });
        let (_r, v) = idx.admit(k(2), 10, 1.0).unwrap();
        assert_eq!(ks(&v), vec![(k(1), 10)]);
    }

    #[test]
    fn uncommitted_reservation_is_released() {
        let idx = TierIndex::new("t", 10, PolicyKind::Lru, Pins::default());
        {
            let (_r, _) = idx.admit(k(1), 10, 1.0).unwrap();
            assert_eq!(idx.used(), 10);
        }
        assert_eq!(idx.used(), 0);
        assert!(!idx.contains(&k(1)));
    }

    #[test]
    fn an_object_still_being_written_is_never_a_victim() {
        let idx = TierIndex::new("t", 20, PolicyKind::Lru, Pins::default());
        idx.admit(k(1), 10, 1.0).unwrap().0.commit();
        let (writing, _) = idx.admit(k(2), 10, 1.0).unwrap();
        // k(2) is the only other entry once k(1) goes, but it is not written yet
        let (r, v) = idx.admit(k(3), 10, 1.0).unwrap();
        assert_eq!(ks(&v), vec![(k(1), 10)]);
        r.commit();
        assert!(matches!(
            idx.admit(k(4), 20, 1.0),
            Err(StoreError::NoRoom { .. })
        ));
        writing.commit();
        let (_r, v) = idx.admit(k(4), 20, 1.0).unwrap();
        assert_eq!(v.len(), 2, "committed, it can go");
    }

    #[test]
    fn a_lease_outliving_its_object_leaves_the_next_one_alone() {
        let idx = Arc::new(TierIndex::new("t", 20, PolicyKind::Lru, Pins::default()));
        idx.admit(k(1), 10, 1.0).unwrap().0.commit();
        let old = idx.lease(&k(1)).unwrap();
        idx.remove(&k(1));
        idx.admit(k(1), 10, 1.0).unwrap().0.commit();
        let new = idx.lease(&k(1)).unwrap();
        drop(old);
        assert_eq!(
            idx.leases(&k(1)),
            1,
            "the old object's lease is not the new one's"
        );
        assert!(
            matches!(idx.admit(k(2), 20, 1.0), Err(StoreError::NoRoom { .. })),
            "the leased object is still protected"
        );
        drop(new);
        assert_eq!(idx.leases(&k(1)), 0);
    }

    #[test]
    fn larger_than_the_tier() {
        let idx = TierIndex::new("t", 10, PolicyKind::Lru, Pins::default());
        assert!(matches!(
            idx.admit(k(1), 11, 1.0),
            Err(StoreError::NoRoom { .. })
        ));
    }
}
