//! Locks per key: the SSD tier's writes of one object (a put, a delete, a rewrite of its
//! `meta` record) run one at a time, while writes of different objects run side by side.
//!
//! Blocking: taken on the blocking threads the tier's RocksDB work runs on, never on an
//! async worker.

use std::collections::HashSet;

use parking_lot::{Condvar, Mutex};

use crate::key::ChunkKey;

/// The keys whose lock is held; waiters sleep on one condition variable (writes of one key
/// at once are rare, so a wake-up of the wrong waiter is cheap).
#[derive(Default)]
pub(super) struct KeyLocks {
    held: Mutex<HashSet<ChunkKey>>,
    freed: Condvar,
}

/// `key`'s lock, released when dropped.
#[must_use = "the key is unlocked when the guard drops"]
pub(super) struct KeyGuard<'a> {
    locks: &'a KeyLocks,
    key: ChunkKey,
}

impl KeyLocks {
    /// Waits until no one holds `key`'s lock, then takes it.
    ///
    /// Not reentrant: a thread holding `key` that asks for it again waits forever. A thread
    /// waits for a key while holding at most one other, its own (the SSD tier's put, for a
    /// victim; see `Inner::delete_victims` there for why that cannot deadlock).
    pub(super) fn lock(&self, key: ChunkKey) -> KeyGuard<'_> {
        let mut held = self.held.lock();
        while held.contains(&key) {
            self.freed.wait(&mut held);
        }
        held.insert(key);
        KeyGuard { locks: self, key }
    }

    /// `key`'s lock if no one holds it, without waiting.
    pub(super) fn try_lock(&self, key: ChunkKey) -> Option<KeyGuard<'_>> {
        // (the guard is made only when the key was free: a guard made and dropped would
        // free the holder's key)
        let taken = self.held.lock().insert(key);
        taken.then(|| KeyGuard { locks: self, key })
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        self.locks.held.lock().remove(&self.key);
        self.locks.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[test]
    fn one_holder_per_key_and_other_keys_go_by() {
        let locks = Arc::new(KeyLocks::default());
        let inside = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (locks, inside) = (Arc::clone(&locks), Arc::clone(&inside));
                std::thread::spawn(move || {
                    for _ in 0..2_000 {
                        let _g = locks.lock(ChunkKey([1; 32]));
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "alone");
                        // another key is free meanwhile
                        drop(locks.lock(ChunkKey([2; 32])));
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(locks.held.lock().is_empty(), "every guard released its key");
    }

    #[test]
    fn try_lock_takes_a_free_key_only_and_frees_nothing() {
        let locks = KeyLocks::default();
        let held = locks.lock(ChunkKey([1; 32]));
        assert!(locks.try_lock(ChunkKey([1; 32])).is_none());
        assert!(
            locks.held.lock().contains(&ChunkKey([1; 32])),
            "a failed try keeps the holder's key"
        );
        let other = locks.try_lock(ChunkKey([2; 32])).expect("free");
        drop((held, other));
        assert!(locks.held.lock().is_empty());
    }
}
