//! The host-memory tier: objects behind `Arc`s, decoded (the default) or encoded with the
//! tier's codec, weighed in the bytes they occupy.
//!
//! Reads hand out clones of the `Arc`ed layer bytes (no copy; an encoded object's layer is
//! decoded per read), so an object evicted while a reader holds it stays alive for that
//! reader; leases still keep it in the tier.
//!
//! Where the bytes live is the tier's [`HostMemory`]: by default wherever the object was
//! built (the heap); a GPU deployment sets page-locked memory
//! ([`crate::TieredStore::set_host_memory`]) so that a host-tier hit crosses to the device
//! by DMA with no staging copy. The tier knows nothing of devices: it only asks the memory to
//! place an object's layers as it admits it.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;

use super::memory::MemoryTier;
use super::{LayerReader, PutOutcome, Tier, TierKind};
use crate::codec::Codec;
use crate::error::Result;
use crate::index::{Lease, Pins};
use crate::key::ChunkKey;
use crate::object::{EncodedObject, KeepEncoded, KvObject, ObjectInfo, StreamLayer, record_as};
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

/// Objects in host memory, bounded in bytes held; nothing survives the process.
///
/// With the raw codec (the default) an object is held decoded: reads hand out its layers
/// with no copy. With another codec ([`HostTier::with_codec`]) an exact object is held
/// encoded (its records and checksummed header) and each read decodes the layer it asks
/// for, so the same memory holds several times more chunks of a lossy codec; an object that
/// cannot be encoded (lossy values, values the codec cannot hold) is held decoded.
pub struct HostTier {
    /// The held entries, their byte accounting, eviction and counters.
    slots: MemoryTier<Held>,
    /// Where admitted decoded objects are placed; unset: left where they were built.
    memory: OnceLock<Arc<dyn HostMemory>>,
    /// How admitted exact objects are held.
    codec: Codec,
}

/// What the tier holds for one key.
#[derive(Clone)]
enum Held {
    /// Decoded layers (exact, or marked lossy by the codec they came from).
    Decoded(Arc<KvObject>),
    /// Records of the tier's codec, decoded on read, and what the header says they hold.
    Encoded(Arc<EncodedObject>, Arc<ObjectInfo>),
}

impl Held {
    /// Bytes it occupies (what the index weighs).
    fn size(&self) -> u64 {
        match self {
            Held::Decoded(o) => o.raw_len(),
            Held::Encoded(e, _) => e.header.stored_len(e.header_bytes.len()),
        }
    }

    /// The codec a hit on it is counted under.
    fn codec(&self) -> Codec {
        match self {
            Held::Decoded(o) => o.lossy().unwrap_or(Codec::Raw),
            Held::Encoded(e, _) => e.header.codec,
        }
    }

    fn info(&self) -> &Arc<ObjectInfo> {
        match self {
            Held::Decoded(o) => o.info(),
            Held::Encoded(_, info) => info,
        }
    }

    /// The whole object, decoded (marked lossy when its codec is).
    fn decoded(&self) -> Result<Arc<KvObject>> {
        match self {
            Held::Decoded(o) => Ok(Arc::clone(o)),
            Held::Encoded(e, _) => Ok(Arc::new(e.decode()?)),
        }
    }
}

impl HostTier {
    /// A tier of `capacity` bytes, holding objects decoded.
    pub fn new(capacity: u64, policy: PolicyKind, pins: Pins) -> Self {
        Self {
            slots: MemoryTier::new("host", capacity, policy, pins),
            memory: OnceLock::new(),
            codec: Codec::Raw,
        }
    }

    /// The tier holding exact objects encoded with `codec` (raw: decoded). A lossy codec
    /// is the caller's choice to make explicitly (the sidecar's `store.codecs.allow_lossy`).
    /// Evicting an encoded object gives no copy to demote: use it with write-through.
    pub fn with_codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
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

    /// `e` with its records in the tier's memory (as built when no memory is set or placing
    /// fails), so that a record handed over encoded crosses to the device by DMA too.
    fn placed_records(&self, mut e: EncodedObject) -> EncodedObject {
        let Some(memory) = self.memory.get() else {
            return e;
        };
        match memory.place(&e.records) {
            Ok(records) if records.len() == e.records.len() => e.records = records,
            Ok(_) => tracing::warn!("host tier: the memory placed the wrong number of records"),
            Err(why) => tracing::warn!(
                "host tier: keeping {}'s records in ordinary memory ({why})",
                e.header.info.key
            ),
        }
        e
    }

    /// How `obj` is held: encoded with the tier's codec when it is not raw and the object
    /// is exact and encodes; decoded (and placed) otherwise.
    fn to_held(&self, obj: Arc<KvObject>) -> Held {
        if self.codec != Codec::Raw && obj.lossy().is_none() {
            match obj.encode(self.codec) {
                Ok(e) => {
                    let info = Arc::new(e.header.info.clone());
                    return Held::Encoded(Arc::new(self.placed_records(e)), info);
                }
                Err(e) => tracing::debug!(key = %obj.key(), error = %e, "host tier: held decoded"),
            }
        }
        Held::Decoded(self.placed(obj))
    }

    fn lookup(&self, key: &ChunkKey) -> Option<Held> {
        let o = self.slots.get(key);
        if let Some(o) = &o {
            self.slots.counters().hit_codec(o.codec());
        }
        o
    }
}

#[async_trait]
impl Tier for HostTier {
    fn kind(&self) -> TierKind {
        TierKind::HOST
    }

    fn contains(&self, key: &ChunkKey) -> bool {
        self.slots.contains(key)
    }

    fn keys(&self) -> Vec<ChunkKey> {
        self.slots.keys()
    }

    fn touch(&self, key: &ChunkKey) {
        self.slots.touch(key);
    }

    async fn info(&self, key: &ChunkKey) -> Result<Option<Arc<ObjectInfo>>> {
        Ok(self.lookup(key).map(|o| Arc::clone(o.info())))
    }

    async fn reader(&self, key: &ChunkKey) -> Result<Option<Box<dyn LayerReader>>> {
        let t = Instant::now();
        let Some(held) = self.lookup(key) else {
            return Ok(None);
        };
        let stats = self.slots.counters();
        TierStats::add(&stats.bytes_out, held.size());
        stats.get_latency.record(t.elapsed());
        Ok(Some(match held {
            Held::Decoded(o) => Box::new(HostReader(o)),
            Held::Encoded(object, info) => Box::new(EncodedReader { object, info }),
        }))
    }

    async fn get(&self, key: &ChunkKey) -> Result<Option<Arc<KvObject>>> {
        let t = Instant::now();
        let Some(held) = self.lookup(key) else {
            return Ok(None);
        };
        let stats = self.slots.counters();
        TierStats::add(&stats.bytes_out, held.size());
        let o = match held.decoded() {
            Ok(o) => o,
            Err(e) => {
                // an encoded copy that no longer decodes (memory gone bad, a codec bug) is a
                // miss and is dropped, as a damaged object on disk is: the tiers below serve
                tracing::warn!(%key, error = %e, "host tier: a held object failed to decode; dropped");
                TierStats::add(&stats.checksum_failures, 1);
                self.slots.remove(key);
                return Ok(None);
            }
        };
        stats.get_latency.record(t.elapsed());
        Ok(Some(o))
    }

    async fn put(&self, obj: Arc<KvObject>, cost_s: f64) -> Result<PutOutcome> {
        let t = Instant::now();
        let key = *obj.key();
        if self.contains(&key) {
            return Ok(PutOutcome::default());
        }
        let held = self.to_held(obj);
        let size = held.size();
        // an encoded entry gives no copy: a host codec requires write-through, where nothing
        // is demoted (`TieredStore::open`)
        let done = self.slots.insert(key, held, size, cost_s)?;
        if !done.inserted {
            return Ok(PutOutcome::default()); // a concurrent put of the key got there first
        }
        let evicted = done
            .evicted
            .into_iter()
            .map(|(k, v)| match v {
                Some(Held::Decoded(o)) => (k, Some(o)),
                _ => (k, None),
            })
            .collect();
        self.slots.counters().put_latency.record(t.elapsed());
        Ok(PutOutcome {
            written: true,
            evicted,
        })
    }

    async fn remove(&self, key: &ChunkKey) -> Result<bool> {
        Ok(self.slots.remove(key))
    }

    fn lease(&self, key: &ChunkKey) -> Option<Lease> {
        self.slots.lease(key)
    }

    fn stats(&self) -> crate::TierStatsSnapshot {
        self.slots.snapshot()
    }
}

/// A decoded host-tier object open for reading: the object itself, kept alive by the reader.
struct HostReader(Arc<KvObject>);

#[async_trait]
impl LayerReader for HostReader {
    fn info(&self) -> &Arc<ObjectInfo> {
        self.0.info()
    }

    fn lossy(&self) -> Option<Codec> {
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

/// An encoded host-tier object open for reading: each layer decoded (and its checksum
/// verified) as it is asked for.
struct EncodedReader {
    object: Arc<EncodedObject>,
    info: Arc<ObjectInfo>,
}

#[async_trait]
impl LayerReader for EncodedReader {
    fn info(&self) -> &Arc<ObjectInfo> {
        &self.info
    }

    fn lossy(&self) -> Option<Codec> {
        let c = self.object.header.codec;
        c.is_lossy().then_some(c)
    }

    async fn layer(&mut self, layer: usize) -> Result<Bytes> {
        let n = self.object.records.len();
        if layer >= n {
            return Err(crate::StoreError::Invalid(format!("layer {layer} of {n}")));
        }
        crate::object::decode_record(&self.object.header, layer, &self.object.records[layer])
    }

    async fn layer_as(&mut self, layer: usize, keep: KeepEncoded) -> Result<StreamLayer> {
        let n = self.object.records.len();
        if layer >= n {
            return Err(crate::StoreError::Invalid(format!("layer {layer} of {n}")));
        }
        record_as(
            &self.object.header,
            layer,
            &self.object.records[layer],
            keep,
        )
    }
}
