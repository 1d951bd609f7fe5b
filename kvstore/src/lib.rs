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
//! # Object format, version 6
//!
//! All integers little-endian; checksums are BLAKE3-256. `T` = token count, `L` = layers,
//! `S` = bytes of the optional statistics block, `P` = bytes of the codec's parameter block,
//! `C` = bytes of the chain-link block (64 when flag bit 0 is set, else 0).
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `KVQUILT\0` |
//! | 8 | 2 | format version (`2` to `6`: the oldest that describes the object; `1` is read too, see below) |
//! | 10 | 2 | flags: bit 0 (v6), the object is a prefix-chain link and holds the chain-link block; every other bit 0, and all bits 0 before v6 |
//! | 12 | 4 | header length `H` in bytes, checksum included |
//! | 16 | 32 | key the object was stored under (a chunk key, or a prefix key for a chain link) |
//! | 48 | 1 | codec id (0 raw, 1 LZ4 block, 2 fp8 e4m3, 3 int8, 4 KIVI; ids are never reused) |
//! | 49 | 1 | reserved (0) |
//! | 50 | 2 | `P` |
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
//! | 96+4T+S | P | codec parameters (`kvquilt_compression::CodecSpec::params`): none for raw and lz4; fp8: flags u8 (bit 0: lz4 after; v5: bit 1, zero points); int8: flags u8 (bit 0: lz4 after; v4: bit 1, zero points), then (v3, K scales per group of tokens) group u16 ≥ 1; KIVI: flags u8, bits u8 (2, 4 or 8), group u16, residual u16 |
//! | 96+4T+S+P | C | chain link (v6, flag bit 0): the chain's root key (32; `KeyContext::prefix_root` of the context the chain was made in: model, tokenizer, layout, tenant namespace), then the parent key (32; the root for a chain's first link). The object's key must be `prefix_key(parent, tokens)`: a header where it is not is corrupt |
//! | 96+4T+S+P+C | 56·L | layer table, per layer: record offset from payload start u64, stored length u64, decoded length u64, BLAKE3 of the stored record (32) |
//! | H−32 | 32 | BLAKE3 of bytes `0..H−32` |
//! | H | … | payload: the `L` records in layer order |
//!
//! A record is the codec's encoding of the layer's K then V, each `[T, kv_heads, head_dim]`
//! row-major in the dtype: decoded length `2·T·kv_heads·head_dim·dtype size`. A lossy
//! codec's record layout (scales, codes, the exact residual tokens) is documented with the
//! codec in `kvquilt-compression` (`codec/{fp8,int8,kivi}.rs`); its length is fixed by the
//! shape and parameters, and a record of any other length is corrupt. Layer-major
//! records let one layer be read, verified and used alone. The SSD tier stores the header
//! and each record as separate RocksDB values (see [`tier::SsdTier`]); the byte string above
//! is the form objects take on the wire and in files.
//!
//! ## Version changes
//!
//! - **1 → 2** (2026-11-30): bytes 49..52 were "codec parameter (0)" and "reserved (0)"; they
//!   became "reserved (0)" and `P`, and the parameter block was inserted before the layer
//!   table. A v1 object is therefore a v2 object with `P = 0` and a raw or lz4 codec: this
//!   build reads both (a v1 header with `P ≠ 0` is corrupt). A v1 build refuses v2 objects
//!   by their version field. A version newer than this build's is
//!   [`StoreError::NewerFormat`]: a miss, and the object is **left in place** (the SSD tier
//!   does not delete it), so a newer process sharing the store can still use it.
//!   Test: `tests/format.rs::version_1_objects_still_read`.
//! - **2 → 3** (2026-12-01): int8 gained K scales per group of tokens (`int8/gN`), recorded
//!   as a 3-byte parameter block (flags, group u16). Only objects of grouped int8 are
//!   written as v3; every other object is still written as v2, byte for byte
//!   ([`object::version_for`]), so a v2 build keeps reading them and meets a grouped object
//!   as [`StoreError::NewerFormat`] (a miss, left in place) instead of as a corrupt
//!   parameter block (which it would drop). A v2 header holding a grouped int8 block is
//!   corrupt. Test: `tests/format.rs::grouped_int8_objects_are_version_3_and_nothing_else_is`.
//! - **3 → 4** (2026-12-04): int8 gained a zero point beside every scale (flags bit 1; the
//!   record then holds the zero points after the scales, `kvquilt-compression`
//!   `codec/int8.rs`), and
//!   the name `int8` now means it (the symmetric form is `int8sym`). Only int8 objects with
//!   zero points are written as v4, so a v3 build meets them as
//!   [`StoreError::NewerFormat`] (a miss, left in place) rather than as unknown flag bits
//!   (corrupt, dropped); every other object is written as before, byte for byte. A v3 or
//!   older header holding int8's zero-point bit is corrupt. Test:
//!   `tests/format.rs::zero_points_are_versions_4_and_5_and_older_objects_keep_their_versions`.
//! - **4 → 5** (2026-12-05): fp8 gained zero points the same way (flags bit 1; the record is
//!   then int8's layout with e4m3 codes: K scales and offsets per channel, V's per row,
//!   `kvquilt-compression` `codec/fp8.rs`), and the name `fp8` now means it (the per-head
//!   symmetric form is `fp8sym`). Only fp8 objects with zero points are written as v5: a v4
//!   build meets them as [`StoreError::NewerFormat`] (a miss, left in place); every other
//!   object is written as before, byte for byte. A v4 or older header holding fp8's
//!   zero-point bit is corrupt. Test:
//!   `tests/format.rs::zero_points_are_versions_4_and_5_and_older_objects_keep_their_versions`.
//! - **5 → 6** (2026-12-07): an object stored under a prefix key (a page of a conversation's
//!   history, a link of `prefix` mode's chain) records its place in the chain: flag bit 0
//!   and a 64-byte block of root and parent keys after the codec parameters. Before, a
//!   link's key could not be re-derived from the object (it hashes the parent, which the
//!   object did not hold), so nothing could tell whose it was: a sidecar restarted over its
//!   store charged no tenant for its pages, and no tenant could delete or pin one. Only
//!   links are written as v6; a chunk is written as before, byte for byte, so a v5 build
//!   keeps reading every chunk and meets a link as [`StoreError::NewerFormat`] (a miss,
//!   left in place). A link written before v6 has no block and reads as before (its owner
//!   unknown). Flags were written 0 by every version and are now checked: a header before
//!   v6 with any flag, or a v6 header with an unknown one, is corrupt. Tests:
//!   `tests/format.rs::chain_links_are_version_6_and_name_their_parent`,
//!   `tests/format.rs::a_link_whose_key_is_not_its_parent_s_extension_is_corrupt`.
//!   This build reads versions 1 to 6.
//!
//! ## What a crash leaves
//!
//! The SSD tier writes an object as one RocksDB `WriteBatch` (header, every record, meta)
//! with a synced WAL, so each step below leaves either no object or the whole object:
//! 1. *Encoding* (in memory): nothing written; a lossy codec that cannot hold the values
//!    falls back to raw before anything is written.
//! 2. *Batch built, not committed*: nothing on disk; the reservation is released.
//! 3. *WAL synced*: on restart RocksDB replays the batch; the index is rebuilt from meta.
//! 4. *Torn or rotted bytes later*: the header checksum or a record's checksum fails on read:
//!    a counted miss, the object dropped (never data); the codec's parameter block is inside
//!    the header checksum, and a parameter out of range (bits, group, flags, codec id) is
//!    caught by `CodecSpec::from_header` even if re-checksummed
//!    (`tests/format.rs::bad_codec_parameters_name_the_field`); so is the chain-link block,
//!    and a link whose key its parent and tokens do not derive is caught even if
//!    re-checksummed.
//!
//! A chain's links are separate objects, each written whole or not at all, in chain order
//! but in separate batches: a crash between two leaves a chain whose first links are
//! stored and whose later ones are not, which a reader takes as a shorter held run (it
//! loads the links it finds from the start and computes the rest). A later link may also
//! outlive an earlier one (evicted or deleted first): it is unreachable until the earlier
//! one is stored again, and still charged to its owner, whom its root names.
//!
//! # Why the tiers do their own eviction
//!
//! Eviction here must skip pinned and leased objects, follow a configurable policy (LRU,
//! LFU, S3-FIFO, cost-aware), and count capacity exactly under concurrent writers. A cache
//! crate that picks its own victims cannot honour pins or leases, so every tier keeps a
//! [`index::TierIndex`] that reserves bytes before writing and asks the policy for victims
//! (measured too: moka's TinyLFU as the host tier lost every stream of `kvquilt bench trace`
//! to S3-FIFO, BENCHMARKS.md §10). The memory levels share one tier type, [`MemoryTier`].

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
pub use key::{ChainLink, ChunkKey, Fingerprint, KEY_FORMAT_VERSION, KeyContext, prefix_key};
pub use layout::{KvDType, KvLayout, RopeScalingSpec};
pub use object::{
    EncodedObject, KeepEncoded, KvObject, ObjectHeader, ObjectInfo, StreamLayer, TokenStats,
    decode_all,
};
pub use policy::PolicyKind;
pub use stats::{HistogramSnapshot, TierStatsSnapshot};
pub use tier::{
    DAMAGE_MARKER, DEFAULT_MAX_OPEN_FILES, DEFAULT_MIN_FREE_BYTES, HostMemory, HostTier, Insertion,
    LayerReader, MemoryTier, PutOutcome, RecordLayout, RemoteConfig, RemoteStore, RemoteTier,
    SsdConfig, SsdTier, Tier, TierKind,
};
pub use tiered::{Found, LayerStream, StoreBuilder, StoreConfig, TieredStore, WritePolicy};
