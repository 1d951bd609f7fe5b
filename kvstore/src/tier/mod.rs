//! Storage tiers behind one trait.
//!
//! Reads are layer-granular: [`Tier::reader`] opens an object and its [`LayerReader`] returns
//! one layer's K‖V at a time, so a caller can start computing on layer 0 while later layers
//! are still being read (see [`crate::TieredStore::read_layers`]). A reader is a consistent
//! view: removing the object while it is open (a `DELETE`, an eviction) does not change what
//! it returns. Every
//! read verifies checksums; a mismatch is counted, logged, the bad object dropped, and the
//! read answered as a miss: wrong bytes are never handed out.

mod host;
mod key_locks;
mod memory;
pub mod remote;
mod ssd;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

pub use host::{HostMemory, HostTier};
pub use memory::{Insertion, MemoryTier};
pub use remote::{RecordLayout, RemoteConfig, RemoteStore, RemoteTier};
pub use ssd::{DAMAGE_MARKER, DEFAULT_MAX_OPEN_FILES, DEFAULT_MIN_FREE_BYTES, SsdConfig, SsdTier};

use crate::error::Result;
use crate::index::Lease;
use crate::key::ChunkKey;
use crate::object::{KeepEncoded, KvObject, ObjectInfo, StreamLayer};
use crate::stats::TierStatsSnapshot;

/// Which tier answered: a tier's name. Kinds are open: a new tier names itself
/// (`TierKind::new("s3")`) without changing this crate; the constants are the tiers kvquilt
/// ships. The cost model, statistics and the wire key their entries by this name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TierKind(&'static str);

impl TierKind {
    /// Device memory: blend's device tier, which holds model tensors rather than store
    /// objects (no [`Tier`] of this crate reports it).
    pub const GPU: Self = Self("gpu");
    /// Host memory ([`HostTier`]).
    pub const HOST: Self = Self("host");
    /// RocksDB on local disk ([`SsdTier`]).
    pub const SSD: Self = Self("ssd");
    /// A store shared by several processes over the network ([`RemoteTier`]).
    pub const REMOTE: Self = Self("remote");

    /// A tier kind named `name` (lowercase, as it appears in statistics and metrics).
    pub const fn new(name: &'static str) -> Self {
        Self(name)
    }

    /// The kind's name.
    pub const fn name(self) -> &'static str {
        self.0
    }
}

impl std::fmt::Display for TierKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl serde::Serialize for TierKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.0)
    }
}

/// What a put did.
#[derive(Debug, Default)]
pub struct PutOutcome {
    /// False when the object was already held (content-addressed: nothing to write).
    pub written: bool,
    /// Objects evicted to make room, with their in-memory copies where the tier had them
    /// (so a write-back store can demote them).
    pub evicted: Vec<(ChunkKey, Option<Arc<KvObject>>)>,
}

/// An object opened for reading layer by layer ([`Tier::reader`]).
#[async_trait]
pub trait LayerReader: Send {
    /// What the object holds.
    fn info(&self) -> &Arc<ObjectInfo>;

    /// The lossy codec the layers are decoded from (`None`: exact values).
    fn lossy(&self) -> Option<crate::Codec> {
        None
    }

    /// Layer `layer`'s verified, decoded K‖V bytes. A record that fails verification is an
    /// error (the tier drops the object, as for any failed read).
    async fn layer(&mut self, layer: usize) -> Result<Bytes>;

    /// Layer `layer` verified, handed over as stored when `keep` says so for its codec (the
    /// caller decodes it: the GPU path dequantises on the device), decoded otherwise. The
    /// default decodes always; tiers that hold records encoded override it.
    async fn layer_as(&mut self, layer: usize, keep: KeepEncoded) -> Result<StreamLayer> {
        let _ = keep;
        self.layer(layer).await.map(StreamLayer::Decoded)
    }
}

/// One level of the store.
#[async_trait]
pub trait Tier: Send + Sync {
    /// Which level this is.
    fn kind(&self) -> TierKind;

    /// Whether the tier holds `key` (no I/O, no statistics). For a remote tier, a hint:
    /// keys this process wrote or saw present recently.
    fn contains(&self, key: &ChunkKey) -> bool;

    /// Whether the tier is shared over the network: it is written off the request path (its
    /// put never decides whether a store's put succeeded), and [`Tier::probe`] asks it.
    fn is_remote(&self) -> bool {
        false
    }

    /// Counts a use of `key` that did not read it (a request recomputed the held chunk
    /// because that was estimated faster): its eviction policy sees it as used, as a hit
    /// would. No I/O, no hit statistics; nothing for a key the tier does not hold.
    fn touch(&self, _key: &ChunkKey) {}

    /// Whether the tier stores nothing new now (its directory is read-only): a store's puts
    /// pass it by, and what it holds is still served.
    fn read_only(&self) -> bool {
        false
    }

    /// Whether the tier holds `key`, asking it if need be (a remote: one round trip within
    /// its deadline; false when it fails). Local tiers answer [`Tier::contains`].
    async fn probe(&self, key: &ChunkKey) -> bool {
        self.contains(key)
    }

    /// Keys held.
    fn keys(&self) -> Vec<ChunkKey>;

    /// What `key` holds (layout, tokens), verified, or `None` on a miss (a corrupt object is
    /// a miss).
    async fn info(&self, key: &ChunkKey) -> Result<Option<Arc<ObjectInfo>>>;

    /// Opens `key` for reading layer by layer (a hit, verified header), or `None` on a miss.
    /// The reader keeps answering for the object as it was when opened, whatever happens to
    /// the tier's copy meanwhile (pinned by `tiered::tests::a_removed_object_stays_readable_by_an_open_stream`).
    async fn reader(&self, key: &ChunkKey) -> Result<Option<Box<dyn LayerReader>>>;

    /// The whole object, verified and decoded, or `None` on a miss.
    async fn get(&self, key: &ChunkKey) -> Result<Option<Arc<KvObject>>>;

    /// Stores `obj` (whose recompute cost is `cost_s` seconds), evicting as needed.
    async fn put(&self, obj: Arc<KvObject>, cost_s: f64) -> Result<PutOutcome>;

    /// Deletes `key`; false if it was not held.
    async fn remove(&self, key: &ChunkKey) -> Result<bool>;

    /// A lease that keeps `key` from being evicted while it lives.
    fn lease(&self, key: &ChunkKey) -> Option<Lease>;

    /// Makes written objects durable (no-op for memory tiers).
    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// The tier's counters and occupancy.
    fn stats(&self) -> TierStatsSnapshot;
}
