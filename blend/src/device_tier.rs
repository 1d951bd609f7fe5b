//! The device tier: chunk KV resident in the model's device memory (GPU memory under CUDA)
//! as the tensors attention reads, so a hit costs a device-side copy instead of a store read
//! plus a host→device transfer (on the H200, 655 MB of chunk KV per 8B-shape request took
//! ~110 ms over PCIe from pageable host memory).
//!
//! It lives in `blend`, not `kvstore`, because what it holds are model tensors on the model's
//! device, and kvstore knows nothing of models. It is the store's in-memory tier type
//! ([`kvquilt_kvstore::MemoryTier`], which the host tier is built on too: capacity, eviction
//! policies, pins shared with the [`kvquilt_kvstore::TieredStore`]) holding tensors, so it
//! behaves as the store's tiers do.
//!
//! Invariants:
//! - An entry holds the KV of exactly one stored chunk object, decoded — or, under its last
//!   page's key, a whole paged prefix (`engine/chain.rs`: every page read or computed over
//!   the ones before, exact) — per layer, K before RoPE and V, `[T, kv_heads, head_dim]`,
//!   at positions `0..T`, in the model's dtype. It enters only after the blender has used
//!   the same KV for a request (read from a tier and checked against the requested tokens,
//!   or computed by [`crate::ChunkCodec`] or a chain), never from lossy values.
//! - Capacity counts K and V bytes (the object's raw size), not allocator rounding.
//! - An entry evicted while a request still uses it stays alive for that request (the
//!   request holds an `Arc`); device memory may exceed the capacity by those entries.

use std::sync::Arc;

use kvquilt_kvstore::stats::TierStats;
use kvquilt_kvstore::{ChunkKey, MemoryTier, Pins, PolicyKind, TierStatsSnapshot};
use kvquilt_model::LayerKv;

/// One chunk's KV on the device, every layer.
pub type DeviceChunk = Arc<Vec<LayerKv>>;

/// Chunk KV in device memory, bounded in bytes: the store's in-memory tier type
/// ([`MemoryTier`], as the host tier) holding device tensors.
pub struct DeviceTier {
    chunks: MemoryTier<DeviceChunk>,
    /// The store's pins (also honoured by `chunks`), for [`DeviceTier::shed`].
    pins: Pins,
}

impl DeviceTier {
    /// A tier of `capacity` bytes of K/V, evicting by `policy`, honouring `pins` (pass the
    /// store's, so a pinned chunk stays resident here too).
    pub fn new(capacity: u64, policy: PolicyKind, pins: Pins) -> Self {
        Self {
            chunks: MemoryTier::new("gpu", capacity, policy, pins.clone()),
            pins,
        }
    }

    /// Whether `key` is resident (no statistics).
    pub fn contains(&self, key: &ChunkKey) -> bool {
        self.chunks.contains(key)
    }

    /// The resident KV of `key`, counted as a hit or a miss.
    pub fn get(&self, key: &ChunkKey) -> Option<DeviceChunk> {
        let found = self.chunks.get(key);
        if let Some(c) = &found {
            TierStats::add(&self.chunks.counters().bytes_out, chunk_bytes(c));
        }
        found
    }

    /// Makes `layers` resident under `key` (recompute cost `cost_s` seconds, for cost-aware
    /// eviction). Returns false, evicting nothing, when it cannot fit (larger than the tier,
    /// or the rest is pinned); an entry already resident is kept as it is. The layers must
    /// own exactly their rows (a stream's uploads do): the tier charges their rows' bytes.
    /// Views of larger buffers go through [`DeviceTier::put_packed`].
    pub fn put(&self, key: ChunkKey, layers: Vec<LayerKv>, cost_s: f64) -> bool {
        if self.contains(&key) {
            return true;
        }
        let chunk = Arc::new(layers);
        let size = chunk_bytes(&chunk);
        // evicted chunks are dropped here (requests still using one hold their `Arc`)
        // (a concurrent put of the key that got there first leaves that chunk resident)
        self.chunks.insert(key, chunk, size, cost_s).is_ok()
    }

    /// [`DeviceTier::put`] of a packed copy of `layers` ([`LayerKv::packed`]): a computed
    /// chunk's layers are views of buffers with growth room (256 rows for a 20-token chunk)
    /// and its sink row, which the bytes charged would not count. No copy is made for a
    /// chunk already resident or larger than the tier; false as well when copying fails.
    pub fn put_packed(&self, key: ChunkKey, layers: &[LayerKv], cost_s: f64) -> bool {
        if self.contains(&key) {
            return true;
        }
        if chunk_bytes(layers) > self.chunks.capacity() {
            return false;
        }
        match layers.iter().map(LayerKv::packed).collect() {
            Ok(packed) => self.put(key, packed, cost_s),
            Err(e) => {
                tracing::debug!(%key, error = %e, "device tier: a chunk could not be copied; not resident");
                false
            }
        }
    }

    /// Drops `key`; false if it was not resident.
    pub fn remove(&self, key: &ChunkKey) -> bool {
        self.chunks.remove(key)
    }

    /// Drops every resident chunk that carries no pin (after the device ran out of memory, so
    /// the next request finds room); returns how many were dropped. Requests still using one
    /// keep it alive until they finish.
    pub fn shed(&self) -> usize {
        self.chunks
            .keys()
            .iter()
            .filter(|k| self.pins.get(k).is_none() && self.remove(k))
            .count()
    }

    /// The tier's statistics (named `gpu`), with its used and total capacity in bytes.
    pub fn stats(&self) -> TierStatsSnapshot {
        self.chunks.snapshot()
    }
}

/// K and V bytes of a chunk's layers.
fn chunk_bytes(layers: &[LayerKv]) -> u64 {
    layers
        .iter()
        .map(|l| ((l.k.elem_count() + l.v.elem_count()) * l.k.dtype().size_in_bytes()) as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    use kvquilt_model::{DType, Device, Tensor};

    use super::*;

    fn chunk(tokens: usize, layers: usize) -> Vec<LayerKv> {
        let t = Tensor::zeros((tokens, 2, 4), DType::F32, &Device::Cpu).unwrap();
        vec![LayerKv::new(t.clone(), t); layers]
    }

    fn key(i: u8) -> ChunkKey {
        ChunkKey([i; 32])
    }

    #[test]
    fn holds_evicts_and_counts_bytes() {
        // one chunk of 10 tokens × 2 layers: 2 layers · (K + V) · 10·2·4 f32 = 1,280 bytes
        let tier = DeviceTier::new(1_500, PolicyKind::Lru, Pins::default());
        assert!(tier.get(&key(1)).is_none());
        assert!(tier.put(key(1), chunk(10, 2), 1.0));
        assert_eq!(tier.stats().used_bytes, 1_280);
        assert!(tier.get(&key(1)).is_some());
        // a second one does not fit beside the first: the first is evicted
        assert!(tier.put(key(2), chunk(10, 2), 1.0));
        assert!(!tier.contains(&key(1)) && tier.contains(&key(2)));
        let s = tier.stats();
        assert_eq!((s.hits, s.misses, s.evictions, s.objects), (1, 1, 1, 1));
        // larger than the tier: refused, nothing evicted
        assert!(!tier.put(key(3), chunk(20, 2), 1.0));
        assert!(tier.contains(&key(2)));
        assert!(tier.remove(&key(2)));
        assert!(!tier.remove(&key(2)));
        assert_eq!(tier.stats().used_bytes, 0);
    }

    #[test]
    fn pinned_chunks_stay() {
        let pins = Pins::default();
        pins.set(key(1), kvquilt_kvstore::Pin::Hard);
        let tier = DeviceTier::new(1_500, PolicyKind::Lru, pins);
        assert!(tier.put(key(1), chunk(10, 2), 1.0));
        assert!(!tier.put(key(2), chunk(10, 2), 1.0));
        assert!(tier.contains(&key(1)));
    }

    #[test]
    fn shedding_keeps_only_pinned_chunks() {
        let pins = Pins::default();
        pins.set(key(1), kvquilt_kvstore::Pin::Hard);
        let tier = DeviceTier::new(1 << 20, PolicyKind::Lru, pins);
        for k in 1..=3 {
            assert!(tier.put(key(k), chunk(10, 2), 1.0));
        }
        assert_eq!(tier.shed(), 2);
        assert!(tier.contains(&key(1)));
        assert!(!tier.contains(&key(2)) && !tier.contains(&key(3)));
        assert_eq!(
            tier.stats().used_bytes,
            chunk_bytes(&Arc::new(chunk(10, 2)))
        );
    }
}
