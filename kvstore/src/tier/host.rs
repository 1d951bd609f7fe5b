//! The host-memory tier: decoded objects behind `Arc`s, weighed in bytes of K/V.
//!
//! Reads hand out clones of the `Arc`ed layer bytes (no copy), so an object evicted while a
//! reader holds it stays alive for that reader; leases still keep it in the tier.
//!
//! Where the bytes live is the tier's [`HostMemory`]: by default wherever the object was
//! built (the heap); a GPU deployment sets page-locked memory
//! ([`crate::TieredStore::set_host_memory`]) so that a host-tier hit crosses to the device
//! by DMA with no staging copy. The tier knows nothing of devices: it only asks the memory to
//! place an object's layers as it admits it.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::RwLock;

use super::{LayerReader, PutOutcome, Tier, TierKind};
use crate::error::Result;
use crate::index::{Lease, Pins, TierIndex};
use crate::key::ChunkKey;
use crate::object::{KvObject, ObjectInfo};
use crate::policy::PolicyKind;
use crate::stats::TierStats;

/// Where a host tier keeps its objects' bytes.
pub trait HostMemory: Send + Sync + fmt::Debug {
    /// `layers` copied into this memory, in order and of the same lengths; an error leaves
    /// the object where it was built (the tier still admits it).
    fn place(&self, layers: &[Bytes]) -> std::result::Result<Vec<Bytes>, String>;

    /// Whether `bytes` already lie in this memory (then [`HostMemory::place`] is skipped).
    fn holds(&self, bytes: &Bytes) -> bool;
}

/// Decoded objects in host memory, bounded in bytes of K/V; nothing survives the process.
pub struct HostTier {
    index: Arc<TierIndex>,
    objects: RwLock<HashMap<ChunkKey, Arc<KvObject>>>,
    stats: TierStats,
    /// Where admitted objects are placed; unset: left where they were built.
    memory: OnceLock<Arc<dyn HostMemory>>,
}

impl HostTier {
    /// A tier of `capacity` bytes of K/V.
    pub fn new(capacity: u64, policy: PolicyKind, pins: Pins) -> Self {
        Self {
            index: Arc::new(TierIndex::new("host", capacity, policy, pins)),
            objects: RwLock::new(HashMap::new()),
            stats: TierStats::default(),
            memory: OnceLock::new(),
        }
    }

    /// Places objects admitted from now on in `memory` (objects already held stay where they
    /// are). Once per tier: false if a memory was already set.
    pub fn set_memory(&self, memory: Arc<dyn HostMemory>) -> bool {
        self.memory.set(memory).is_ok()
    }

    /// `obj` in the tier's memory (itself when no memory is set, it is there already, or
    /// placing fails: a warning, and the object is admitted as built).
    fn placed(&self, obj: Arc<KvObject>) -> Arc<KvObject> {
        let Some(memory) = self.memory.get() else {
            return obj;
        };
        if obj.layers().iter().all(|l| memory.holds(l)) {
            return obj;
        }
        match memory
            .place(obj.layers())
            .map_err(crate::StoreError::Invalid)
            .and_then(|layers| obj.with_layers(layers))
        {
            Ok(placed) => Arc::new(placed),
            Err(e) => {
                tracing::warn!("host tier: keeping {} in ordinary memory ({e})", obj.key());
                obj
            }
        }
    }

    fn lookup(&self, key: &ChunkKey) -> Option<Arc<KvObject>> {
        let o = self.objects.read().get(key).cloned();
        match &o {
            Some(o) => {
                TierStats::add(&self.stats.hits, 1);
                self.stats.hit_codec(o.lossy().unwrap_or(crate::Codec::Raw));
                self.index.touch(key);
            }
            None => TierStats::add(&self.stats.misses, 1),
        }
        o
    }
}

#[async_trait]
impl Tier for HostTier {
    fn kind(&self) -> TierKind {
        TierKind::Host
    }

    fn contains(&self, key: &ChunkKey) -> bool {
        self.objects.read().contains_key(key)
    }

    fn keys(&self) -> Vec<ChunkKey> {
        self.objects.read().keys().copied().collect()
    }

    async fn info(&self, key: &ChunkKey) -> Result<Option<Arc<ObjectInfo>>> {
        Ok(self.lookup(key).map(|o| Arc::clone(o.info())))
    }

    async fn reader(&self, key: &ChunkKey) -> Result<Option<Box<dyn LayerReader>>> {
        let t = Instant::now();
        let Some(obj) = self.lookup(key) else {
            return Ok(None);
        };
        TierStats::add(&self.stats.bytes_out, obj.raw_len());
        self.stats.get_latency.record(t.elapsed());
        Ok(Some(Box::new(HostReader(obj))))
    }

    async fn get(&self, key: &ChunkKey) -> Result<Option<Arc<KvObject>>> {
        let t = Instant::now();
        let o = self.lookup(key);
        if let Some(o) = &o {
            TierStats::add(&self.stats.bytes_out, o.raw_len());
            self.stats.get_latency.record(t.elapsed());
        }
        Ok(o)
    }

    async fn put(&self, obj: Arc<KvObject>, cost_s: f64) -> Result<PutOutcome> {
        let t = Instant::now();
        let key = *obj.key();
        if self.contains(&key) {
            return Ok(PutOutcome::default());
        }
        let size = obj.raw_len();
        let (reservation, victims) = self.index.admit(key, size, cost_s)?;
        let obj = self.placed(obj);
        let mut evicted = Vec::with_capacity(victims.len());
        {
            let mut map = self.objects.write();
            for (v, _) in &victims {
                evicted.push((*v, map.remove(v)));
            }
            map.insert(key, obj);
        }
        reservation.commit();
        TierStats::add(&self.stats.evictions, victims.len() as u64);
        TierStats::add(&self.stats.puts, 1);
        TierStats::add(&self.stats.bytes_in, size);
        self.stats.put_latency.record(t.elapsed());
        Ok(PutOutcome {
            written: true,
            evicted,
        })
    }

    async fn remove(&self, key: &ChunkKey) -> Result<bool> {
        let removed = self.objects.write().remove(key).is_some();
        self.index.remove(key);
        if removed {
            TierStats::add(&self.stats.removes, 1);
        }
        Ok(removed)
    }

    fn lease(&self, key: &ChunkKey) -> Option<Lease> {
        self.index.lease(key)
    }

    fn stats(&self) -> crate::TierStatsSnapshot {
        self.stats.snapshot(
            "host",
            self.index.used(),
            self.index.capacity(),
            self.index.len() as u64,
        )
    }
}

/// A host-tier object open for reading: the object itself, kept alive by the reader.
struct HostReader(Arc<KvObject>);

#[async_trait]
impl LayerReader for HostReader {
    fn info(&self) -> &Arc<ObjectInfo> {
        self.0.info()
    }

    fn lossy(&self) -> Option<crate::Codec> {
        self.0.lossy()
    }

    async fn layer(&mut self, layer: usize) -> Result<Bytes> {
        if layer >= self.0.num_layers() {
            return Err(crate::StoreError::Invalid(format!(
                "layer {layer} of {}",
                self.0.num_layers()
            )));
        }
        Ok(self.0.layer(layer).clone())
    }
}
