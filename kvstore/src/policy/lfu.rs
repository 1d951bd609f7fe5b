//! Least frequently used, ties broken by recency.

use std::collections::{BTreeSet, HashMap};

use super::EvictionPolicy;
use crate::key::ChunkKey;

/// Orders objects by use count, then by last use.
#[derive(Default)]
pub struct Lfu {
    tick: u64,
    order: BTreeSet<(u64, u64, ChunkKey)>,
    state: HashMap<ChunkKey, (u64, u64)>,
}

impl EvictionPolicy for Lfu {
    fn insert(&mut self, key: ChunkKey, _size: u64, _cost_s: f64) {
        self.remove(&key);
        self.tick += 1;
        self.order.insert((1, self.tick, key));
        self.state.insert(key, (1, self.tick));
    }

    fn touch(&mut self, key: &ChunkKey) {
        if let Some((f, t)) = self.state.get(key).copied() {
            self.order.remove(&(f, t, *key));
            self.tick += 1;
            self.order.insert((f + 1, self.tick, *key));
            self.state.insert(*key, (f + 1, self.tick));
        }
    }

    fn remove(&mut self, key: &ChunkKey) {
        if let Some((f, t)) = self.state.remove(key) {
            self.order.remove(&(f, t, *key));
        }
    }

    fn victim(&mut self, evictable: &mut dyn FnMut(&ChunkKey) -> bool) -> Option<ChunkKey> {
        self.order
            .iter()
            .map(|(_, _, k)| k)
            .find(|k| evictable(k))
            .copied()
    }
}
