//! kvquilt's KV object store: content-addressed, checksummed, tiered.
//!
//! This crate stores typed KV objects and knows nothing of models: a key is derived from
//! opaque fingerprints, a layout and token ids ([`key`]); an object is a header plus one
//! record per layer ([`object`]); tiers ([`tier`]) hold objects in host memory or on SSD
//! (RocksDB), and [`TieredStore`] looks them up fastest-first.
//!
//! # What the store assumes of the disk
//!
//! RocksDB gives atomic, durable write batches when the WAL is synced; the filesystem may
//! fill up (a write then fails with [`StoreError::DiskFull`] and earlier objects stay
//! readable), and bytes may rot or be cut short. No byte read from disk is trusted: every
//! header and every layer record carries a BLAKE3 checksum, verified on every read. A
//! mismatch is a miss (counted in `checksum_failures`, logged, the object dropped), never data.
//!
//! # Object format, version 1
//!
//! All integers little-endian; checksums are BLAKE3-256. `T` = token count, `L` = layers,
//! `S` = bytes of the optional statistics block.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `KVQUILT\0` |
//! | 8 | 2 | format version (`1`) |
//! | 10 | 2 | flags (0) |
//! | 12 | 4 | header length `H` in bytes, checksum included |
//! | 16 | 32 | chunk key the object was stored under |
//! | 48 | 1 | codec id (0 raw, 1 LZ4 block; 2.. reserved for lossy codecs) |
//! | 49 | 1 | codec parameter (0) |
//! | 50 | 2 | reserved (0) |
//! | 52 | 4 | `L`, decoder layers |
//! | 56 | 4 | KV heads |
//! | 60 | 4 | head dim |
//! | 64 | 1 | dtype (1 f32, 2 f16, 3 bf16) |
//! | 65 | 1 | 1 if K is stored before RoPE (kvquilt always writes 1) |
//! | 66 | 1 | RoPE scaling kind (0 none, 1 linear, 2 llama3) |
//! | 67 | 1 | reserved (0) |
//! | 68 | 4 | RoPE theta, f32 |
//! | 72 | 16 | RoPE scaling parameters, 4 × f32 (llama3: factor, low, high, original context) |
//! | 88 | 4 | `T` |
//! | 92 | 4 | `S` (0 when absent) |
//! | 96 | 4·T | token ids, u32 |
//! | 96+4T | S | statistics: kind u8, 3 zero bytes, f32 values (a multiple of `T`) |
//! | 96+4T+S | 56·L | layer table, per layer: record offset from payload start u64, stored length u64, decoded length u64, BLAKE3 of the stored record (32) |
//! | H−32 | 32 | BLAKE3 of bytes `0..H−32` |
//! | H | … | payload: the `L` records in layer order |
//!
//! A record is the codec's encoding of the layer's K then V, each `[T, kv_heads, head_dim]`
//! row-major in the dtype: decoded length `2·T·kv_heads·head_dim·dtype size`. Layer-major
//! records let one layer be read, verified and used alone. The SSD tier stores the header
//! and each record as separate RocksDB values (see [`tier::SsdTier`]); the byte string above
//! is the form objects take on the wire and in files.
//!
//! # Why the tiers do their own eviction
//!
//! Eviction here must skip pinned and leased objects, follow a configurable policy (LRU,
//! LFU, S3-FIFO, cost-aware), and count capacity exactly under concurrent writers. A cache
//! crate that picks its own victims cannot honour pins or leases, so every tier keeps a
//! [`index::TierIndex`] that reserves bytes before writing and asks the policy for victims.

#![warn(missing_docs, unreachable_pub)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod codec;
mod error;
pub mod index;
pub mod key;
pub mod layout;
pub mod object;
pub mod policy;
pub mod stats;
pub mod tier;
mod tiered;

pub use codec::Codec;
pub use error::{Result, StoreError};
pub use index::{Lease, Pin, Pins};
pub use key::{ChunkKey, Fingerprint, KEY_FORMAT_VERSION, KeyContext, prefix_key};
pub use layout::{KvDType, KvLayout, RopeScalingSpec};
pub use object::{EncodedObject, KvObject, ObjectHeader, ObjectInfo, TokenStats};
pub use policy::PolicyKind;
pub use stats::{HistogramSnapshot, TierStatsSnapshot};
pub use tier::{HostMemory, HostTier, SsdConfig, SsdTier, Tier, TierKind};
pub use tiered::{Found, LayerStream, StoreConfig, TieredStore, WritePolicy};
