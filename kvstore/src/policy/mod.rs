//! Eviction policies: which object leaves a tier when room is needed.
//!
//! A policy only orders keys; the tier's index ([`crate::index::TierIndex`]) decides what
//! may leave (pinned and leased objects may not) and does the accounting in bytes. Policies
//! are deterministic (no clocks), so their choices can be tested exactly.

mod gdsf;
mod lfu;
mod lru;
mod s3fifo;

pub use gdsf::CostAware;
pub use lfu::Lfu;
pub use lru::Lru;
pub use s3fifo::S3Fifo;

use serde::{Deserialize, Serialize};

use crate::key::ChunkKey;

/// Orders a tier's objects for eviction.
pub trait EvictionPolicy: Send {
    /// A new object of `size` bytes whose recomputation would cost `cost_s` seconds.
    fn insert(&mut self, key: ChunkKey, size: u64, cost_s: f64);
    /// The object was read.
    fn touch(&mut self, key: &ChunkKey);
    /// The object left the tier (evicted or removed).
    fn remove(&mut self, key: &ChunkKey);
    /// The next object to evict among those `evictable` accepts, or `None` if none may go.
    /// The returned key stays tracked until [`EvictionPolicy::remove`] is called for it.
    fn victim(&mut self, evictable: &mut dyn FnMut(&ChunkKey) -> bool) -> Option<ChunkKey>;
}

/// The policies a tier can be configured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// Least recently used (default).
    #[default]
    Lru,
    /// Least frequently used, ties by recency.
    Lfu,
    /// S3-FIFO: a small probationary FIFO, a main FIFO with reinsertion, and a ghost queue.
    S3Fifo,
    /// GreedyDual-Size-Frequency: keeps what saves the most recompute time per byte.
    CostAware,
}

impl PolicyKind {
    /// A new, empty policy of this kind.
    pub(crate) fn build(self) -> Box<dyn EvictionPolicy> {
        match self {
            Self::Lru => Box::new(Lru::default()),
            Self::Lfu => Box::new(Lfu::default()),
            Self::S3Fifo => Box::new(S3Fifo::default()),
            Self::CostAware => Box::new(CostAware::default()),
        }
    }

    /// Parses `lru`, `lfu`, `s3fifo` (or `s3-fifo`), `cost-aware` (or `cost`, `gdsf`).
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "lru" => Some(Self::Lru),
            "lfu" => Some(Self::Lfu),
            "s3fifo" | "s3-fifo" => Some(Self::S3Fifo),
            "cost" | "cost-aware" | "gdsf" => Some(Self::CostAware),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: u8) -> ChunkKey {
        ChunkKey([i; 32])
    }

    fn evict_all(p: &mut dyn EvictionPolicy, skip: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(v) = p.victim(&mut |key| !skip.contains(&key.0[0])) {
            p.remove(&v);
            out.push(v.0[0]);
        }
        out
    }

    #[test]
    fn lru_order_and_skips() {
        let mut p = Lru::default();
        for i in 1..=4 {
            p.insert(k(i), 10, 1.0);
        }
        p.touch(&k(1));
        assert_eq!(evict_all(&mut p, &[3]), vec![2, 4, 1]);
    }

    #[test]
    fn lfu_prefers_rarely_used() {
        let mut p = Lfu::default();
        for i in 1..=3 {
            p.insert(k(i), 10, 1.0);
        }
        p.touch(&k(1));
        p.touch(&k(1));
        p.touch(&k(3));
        assert_eq!(evict_all(&mut p, &[]), vec![2, 3, 1]);
    }

    #[test]
    fn s3fifo_one_hit_wonders_leave_first() {
        let mut p = S3Fifo::default();
        // a hot object, then a scan of cold ones
        p.insert(k(1), 10, 1.0);
        p.touch(&k(1));
        for i in 2..=20 {
            p.insert(k(i), 10, 1.0);
        }
        let order = evict_all(&mut p, &[]);
        assert_eq!(order.len(), 20);
        assert_eq!(
            *order.last().unwrap(),
            1,
            "the re-used object outlives the scan: {order:?}"
        );
    }

    #[test]
    fn cost_aware_keeps_expensive_per_byte() {
        let mut p = CostAware::default();
        p.insert(k(1), 1000, 1.0); // cheap per byte
        p.insert(k(2), 10, 1.0); // expensive per byte
        p.insert(k(3), 100, 1.0);
        assert_eq!(evict_all(&mut p, &[]), vec![1, 3, 2]);
    }

    #[test]
    fn all_pinned_means_no_victim() {
        for kind in [
            PolicyKind::Lru,
            PolicyKind::Lfu,
            PolicyKind::S3Fifo,
            PolicyKind::CostAware,
        ] {
            let mut p = kind.build();
            p.insert(k(1), 10, 1.0);
            p.insert(k(2), 10, 1.0);
            assert!(p.victim(&mut |_| false).is_none(), "{kind:?}");
            assert_eq!(evict_all(p.as_mut(), &[]).len(), 2, "{kind:?}");
        }
    }
}
