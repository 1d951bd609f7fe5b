//! Least recently used.

use std::collections::{BTreeMap, HashMap};

use super::EvictionPolicy;
use crate::key::ChunkKey;

/// Orders objects by their last use; the oldest goes first.
#[derive(Default)]
pub struct Lru {
    tick: u64,
    by_age: BTreeMap<u64, ChunkKey>,
    age: HashMap<ChunkKey, u64>,
}

impl Lru {
    fn stamp(&mut self, key: ChunkKey) {
        if let Some(old) = self.age.remove(&key) {
            self.by_age.remove(&old);
        }
        self.tick += 1;
        self.by_age.insert(self.tick, key);
        self.age.insert(key, self.tick);
    }
}

impl EvictionPolicy for Lru {
    fn insert(&mut self, key: ChunkKey, _size: u64, _cost_s: f64) {
        self.stamp(key);
    }

    fn touch(&mut self, key: &ChunkKey) {
        if self.age.contains_key(key) {
            self.stamp(*key);
        }
    }

    fn remove(&mut self, key: &ChunkKey) {
        if let Some(t) = self.age.remove(key) {
            self.by_age.remove(&t);
        }
    }

    fn victim(&mut self, evictable: &mut dyn FnMut(&ChunkKey) -> bool) -> Option<ChunkKey> {
        self.by_age.values().find(|k| evictable(k)).copied()
    }
}
