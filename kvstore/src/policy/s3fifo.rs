//! S3-FIFO (Yang et al., SOSP 2023): most objects are used once, so new objects wait in a
//! small FIFO (10% of the bytes) and move to the main FIFO only if used again while there;
//! the main FIFO gives each used object another round instead of evicting it; a ghost FIFO
//! of recently evicted keys sends returning objects straight to the main FIFO.

use std::collections::{HashMap, HashSet, VecDeque};

use super::EvictionPolicy;
use crate::key::ChunkKey;

/// Share of tracked bytes the small FIFO may hold before it is evicted from first.
const SMALL_SHARE: f64 = 0.1;
/// Largest use count remembered per object.
const MAX_FREQ: u8 = 3;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Queue {
    Small,
    Main,
}

/// Small, main and ghost FIFOs (see the module docs). Victims come first from the small FIFO
/// while it holds more than 10% of the tracked bytes (or the main FIFO is empty), otherwise
/// first from the main FIFO.
#[derive(Default)]
pub struct S3Fifo {
    small: VecDeque<ChunkKey>,
    main: VecDeque<ChunkKey>,
    ghost: VecDeque<ChunkKey>,
    ghost_set: HashSet<ChunkKey>,
    /// queue, use count, size
    state: HashMap<ChunkKey, (Queue, u8, u64)>,
    small_bytes: u64,
    main_bytes: u64,
}

impl S3Fifo {
    fn remember_ghost(&mut self, key: ChunkKey) {
        if self.ghost_set.insert(key) {
            self.ghost.push_back(key);
        }
        // the ghost queue remembers about as many keys as are tracked
        while self.ghost.len() > self.state.len().max(16) {
            if let Some(old) = self.ghost.pop_front() {
                self.ghost_set.remove(&old);
            }
        }
    }

    /// Looks for a victim in one queue, giving used or unevictable objects another round.
    fn scan(&mut self, q: Queue, evictable: &mut dyn FnMut(&ChunkKey) -> bool) -> Option<ChunkKey> {
        let rounds = match q {
            Queue::Small => self.small.len(),
            Queue::Main => self.main.len() * (MAX_FREQ as usize + 1),
        };
        for _ in 0..rounds {
            let key = match q {
                Queue::Small => self.small.pop_front()?,
                Queue::Main => self.main.pop_front()?,
            };
            let Some(&(_, freq, size)) = self.state.get(&key) else {
                continue; // removed meanwhile
            };
            if !evictable(&key) {
                match q {
                    Queue::Small => self.small.push_back(key),
                    Queue::Main => self.main.push_back(key),
                }
                continue;
            }
            match q {
                Queue::Small if freq > 0 => {
                    // used while on probation: promote
                    self.small_bytes -= size;
                    self.main_bytes += size;
                    self.main.push_back(key);
                    self.state.insert(key, (Queue::Main, 0, size));
                }
                Queue::Main if freq > 0 => {
                    self.main.push_back(key);
                    self.state.insert(key, (Queue::Main, freq - 1, size));
                }
                _ => {
                    // put it back at the front: it stays tracked until remove() is called
                    match q {
                        Queue::Small => self.small.push_front(key),
                        Queue::Main => self.main.push_front(key),
                    }
                    return Some(key);
                }
            }
        }
        None
    }
}

impl EvictionPolicy for S3Fifo {
    fn insert(&mut self, key: ChunkKey, size: u64, _cost_s: f64) {
        self.remove(&key);
        if self.ghost_set.remove(&key) {
            self.main.push_back(key);
            self.main_bytes += size;
            self.state.insert(key, (Queue::Main, 0, size));
        } else {
            self.small.push_back(key);
            self.small_bytes += size;
            self.state.insert(key, (Queue::Small, 0, size));
        }
    }

    fn touch(&mut self, key: &ChunkKey) {
        if let Some(s) = self.state.get_mut(key) {
            s.1 = (s.1 + 1).min(MAX_FREQ);
        }
    }

    fn remove(&mut self, key: &ChunkKey) {
        if let Some((q, _, size)) = self.state.remove(key) {
            match q {
                Queue::Small => {
                    self.small_bytes -= size;
                    self.small.retain(|k| k != key);
                    self.remember_ghost(*key);
                }
                Queue::Main => {
                    self.main_bytes -= size;
                    self.main.retain(|k| k != key);
                }
            }
        }
    }

    fn victim(&mut self, evictable: &mut dyn FnMut(&ChunkKey) -> bool) -> Option<ChunkKey> {
        let total = (self.small_bytes + self.main_bytes) as f64;
        let small_first = self.small_bytes as f64 > SMALL_SHARE * total || self.main.is_empty();
        let order = if small_first {
            [Queue::Small, Queue::Main]
        } else {
            [Queue::Main, Queue::Small]
        };
        order.into_iter().find_map(|q| self.scan(q, evictable))
    }
}
