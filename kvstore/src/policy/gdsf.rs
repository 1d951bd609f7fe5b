//! Cost-aware eviction: GreedyDual-Size-Frequency.
//!
//! Each object has priority `H = L + freq × cost / size`, where `cost` is the recompute time
//! it saves (seconds) and `size` its bytes; the lowest `H` goes first and `L` rises to the
//! evicted priority, so objects not used for a while age out without a clock.

use std::collections::{BTreeSet, HashMap};

use super::EvictionPolicy;
use crate::key::ChunkKey;

/// Priority as an ordered integer (nanoseconds of recompute per kilobyte, scaled).
type Prio = u64;

fn prio(l: Prio, freq: u64, cost_s: f64, size: u64) -> Prio {
    let per_byte = cost_s.max(0.0) / size.max(1) as f64;
    l.saturating_add((freq as f64 * per_byte * 1e15) as u64)
}

/// Orders objects by GreedyDual-Size-Frequency priority; the lowest goes first.
#[derive(Default)]
pub struct CostAware {
    inflation: Prio,
    order: BTreeSet<(Prio, ChunkKey)>,
    /// priority, frequency, cost (s), size (bytes)
    state: HashMap<ChunkKey, (Prio, u64, f64, u64)>,
}

impl EvictionPolicy for CostAware {
    fn insert(&mut self, key: ChunkKey, size: u64, cost_s: f64) {
        self.remove(&key);
        let p = prio(self.inflation, 1, cost_s, size);
        self.order.insert((p, key));
        self.state.insert(key, (p, 1, cost_s, size));
    }

    fn touch(&mut self, key: &ChunkKey) {
        if let Some((p, f, c, s)) = self.state.get(key).copied() {
            self.order.remove(&(p, *key));
            let np = prio(self.inflation, f + 1, c, s);
            self.order.insert((np, *key));
            self.state.insert(*key, (np, f + 1, c, s));
        }
    }

    fn remove(&mut self, key: &ChunkKey) {
        if let Some((p, ..)) = self.state.remove(key) {
            self.order.remove(&(p, *key));
        }
    }

    fn victim(&mut self, evictable: &mut dyn FnMut(&ChunkKey) -> bool) -> Option<ChunkKey> {
        let (p, k) = self.order.iter().find(|(_, k)| evictable(k)).copied()?;
        self.inflation = self.inflation.max(p);
        Some(k)
    }
}
