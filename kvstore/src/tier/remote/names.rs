//! Where an object lives in a remote key-value engine: key names and the header envelope.
//!
//! An object's header is one key; its records are striped over values whose hash tag depends
//! on the [`RecordLayout`] the writer chose (and recorded in the envelope, so a reader
//! follows the writer, whatever its own setting):
//!
//! | key | value |
//! |---|---|
//! | `kvq:2:{N:K}:h` | the envelope below (the commit marker: written last) |
//! | `kvq:2:{N:K:l<layer>}:V:l<layer>:<stripe>` | per layer (the default): bytes `stripe·S .. (stripe+1)·S` of layer `layer`'s stored record |
//! | `kvq:2:{N:K}:V:l<layer>:<stripe>` | one shard: the same bytes, under the header's hash tag |
//!
//! `2` is this naming's version; `N` the first 16 hex digits of BLAKE3 of the deployment
//! namespace ([`super::RemoteConfig::namespace`]; tenant names never reach the wire, and a
//! tenant's chunk keys are already salted by its namespace); `K` the chunk key in hex; `V`
//! the first 16 hex digits of the object header's checksum, so two writers that encode the
//! same chunk differently (another codec) never mix records: each header names its own.
//! A record is striped in values of at most `S` bytes (`stripe_bytes`); an empty record
//! still has one (empty) stripe. Every stripe key ends in `:l<layer>:<stripe>` in both
//! layouts.
//!
//! A cluster places keys by hash tag: per layer, an object's layers land on every shard
//! (a read or write of one object draws on all of them at once, and many objects load the
//! shards evenly); in one shard, an object lives or dies with its shard (a shard down
//! costs only its objects). `BENCHMARKS.md` §8 measures both.
//!
//! # Envelope (the header value)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `KVQR` |
//! | 4 | 1 | envelope version (2) |
//! | 5 | 1 | record layout: 0 one shard, 1 per layer |
//! | 6 | 2 | reserved (0) |
//! | 8 | 4 | `S`, stripe bytes, u32 LE (1 ..= 1 GiB) |
//! | 12 | … | the object header exactly as in the object format (its own checksum included) |
//!
//! The layout byte and `S` are outside the header's checksum: a damaged one names records
//! wrongly, which are then missing or fail their checksums (a counted miss, never data).
//!
//! # Versions
//!
//! Naming 1 (envelope 1, bytes 5–7 reserved) kept every record under the header's tag, as
//! one shard does now. Naming 2 added the layout. The version is in every key, so processes
//! of different versions sharing a cluster never read (or unlink) each other's objects:
//! each misses the other's, writes its own, and the engine's TTL and LRU retire the old
//! ones. Nothing is migrated; the remote is a cache.

use bytes::Bytes;

use crate::error::{Result, StoreError};
use crate::key::ChunkKey;
use crate::object::{ObjectHeader, decode_header};

/// Version of the key naming (the `2` in `kvq:2:`).
pub const NAMING_VERSION: u32 = 2;
const MAGIC: &[u8; 4] = b"KVQR";
const ENVELOPE_VERSION: u8 = 2;
pub(super) const ENVELOPE_LEN: usize = 12;
/// Largest stripe an envelope may name.
pub(super) const MAX_STRIPE_BYTES: usize = 1 << 30;

/// How an object's records are placed over a cluster's shards (the writer's choice, kept in
/// the envelope).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecordLayout {
    /// Each layer under its own hash tag: an object's layers spread over every shard.
    #[default]
    PerLayer,
    /// Every record under the header's hash tag: an object on one shard.
    OneShard,
}

impl RecordLayout {
    fn code(self) -> u8 {
        match self {
            Self::OneShard => 0,
            Self::PerLayer => 1,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(Self::OneShard),
            1 => Some(Self::PerLayer),
            _ => None,
        }
    }
}

impl std::str::FromStr for RecordLayout {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "per-layer" => Ok(Self::PerLayer),
            "one-shard" => Ok(Self::OneShard),
            _ => Err(format!(
                "unknown record layout `{s}` (per-layer or one-shard)"
            )),
        }
    }
}

impl std::fmt::Display for RecordLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::PerLayer => "per-layer",
            Self::OneShard => "one-shard",
        })
    }
}

/// The key names of one object.
#[derive(Debug, Clone)]
pub struct ObjectNames {
    /// `kvq:2:{N:K` (the header's hash tag, unclosed).
    base: String,
}

impl ObjectNames {
    /// The names of `key` in the deployment namespace hashed to `ns` (16 hex digits).
    pub fn new(ns: &str, key: &ChunkKey) -> Self {
        Self {
            base: format!("kvq:{NAMING_VERSION}:{{{ns}:{key}"),
        }
    }

    /// The header (envelope) key.
    pub fn header(&self) -> String {
        format!("{}}}:h", self.base)
    }

    /// Where the records of the object whose encoded header is `header_bytes` (checksum
    /// included) lie, striped by `stripe_bytes` and placed by `layout`.
    pub fn records(
        &self,
        header_bytes: &[u8],
        stripe_bytes: usize,
        layout: RecordLayout,
    ) -> Records {
        let sum = &header_bytes[header_bytes.len().saturating_sub(32)..];
        let version: String = sum.iter().take(8).map(|b| format!("{b:02x}")).collect();
        Records {
            base: self.base.clone(),
            version,
            layout,
            stripe_bytes,
        }
    }
}

/// The record keys of one encoded object.
#[derive(Debug, Clone)]
pub struct Records {
    base: String,
    version: String,
    /// How the records are placed.
    pub layout: RecordLayout,
    /// Most bytes of one stripe.
    pub stripe_bytes: usize,
}

impl Records {
    /// The keys of the stripes of layer `layer`, whose record is `len` bytes (one hash tag).
    pub fn stripes(&self, layer: usize, len: usize) -> Vec<String> {
        let (base, v) = (&self.base, &self.version);
        (0..stripe_count(len, self.stripe_bytes))
            .map(|s| match self.layout {
                RecordLayout::PerLayer => format!("{base}:l{layer}}}:{v}:l{layer}:{s}"),
                RecordLayout::OneShard => format!("{base}}}:{v}:l{layer}:{s}"),
            })
            .collect()
    }

    /// The keys of every stripe of every layer of `header`'s object.
    pub fn all(&self, header: &ObjectHeader) -> Vec<String> {
        header
            .layers
            .iter()
            .enumerate()
            .flat_map(|(l, e)| self.stripes(l, e.stored_len as usize))
            .collect()
    }
}

/// The hash of a deployment namespace as it appears in keys.
pub fn namespace_hash(namespace: &str) -> String {
    blake3::hash(namespace.as_bytes()).to_hex()[..16].to_string()
}

/// Stripes of a record of `len` bytes (at least one).
pub(super) fn stripe_count(len: usize, stripe_bytes: usize) -> usize {
    len.div_ceil(stripe_bytes.max(1)).max(1)
}

/// The envelope of `header_bytes` (an encoded object header) striped by `stripe_bytes` and
/// placed by `layout`.
pub fn envelope(header_bytes: &[u8], stripe_bytes: usize, layout: RecordLayout) -> Vec<u8> {
    let mut out = Vec::with_capacity(ENVELOPE_LEN + header_bytes.len());
    out.extend_from_slice(MAGIC);
    out.push(ENVELOPE_VERSION);
    out.push(layout.code());
    out.extend_from_slice(&[0; 2]);
    out.extend_from_slice(&(stripe_bytes as u32).to_le_bytes());
    out.extend_from_slice(header_bytes);
    out
}

/// What an envelope says besides the object header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Most bytes of one stripe.
    pub stripe_bytes: usize,
    /// How the records are placed.
    pub layout: RecordLayout,
}

/// Parses and verifies an envelope read under `expected`'s header key: the object header
/// (checksum, key), the stripe size and the record layout.
pub fn parse_envelope(bytes: &Bytes, expected: &ChunkKey) -> Result<(ObjectHeader, Placement)> {
    let corrupt = |m: &str| StoreError::Corrupt(format!("remote header of {expected}: {m}"));
    if bytes.len() < ENVELOPE_LEN {
        return Err(corrupt("shorter than the envelope"));
    }
    if &bytes[..4] != MAGIC {
        return Err(corrupt("bad magic"));
    }
    if bytes[4] != ENVELOPE_VERSION {
        return Err(corrupt(&format!("unknown envelope version {}", bytes[4])));
    }
    let layout = RecordLayout::from_code(bytes[5])
        .ok_or_else(|| corrupt(&format!("unknown record layout {}", bytes[5])))?;
    let stripe = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    if stripe == 0 || stripe > MAX_STRIPE_BYTES {
        return Err(corrupt(&format!("stripe size {stripe} out of range")));
    }
    let (header, len) = decode_header(&bytes[ENVELOPE_LEN..])?;
    if ENVELOPE_LEN + len != bytes.len() {
        return Err(corrupt("trailing bytes after the object header"));
    }
    if &header.info.key != expected {
        return Err(StoreError::Mismatch(format!(
            "remote header carries key {} but was read as {expected}",
            header.info.key
        )));
    }
    Ok((
        header,
        Placement {
            stripe_bytes: stripe,
            layout,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::tier::remote::redis_cluster::hash_tag as tag;

    #[test]
    fn stripes_cover_a_record() {
        assert_eq!(stripe_count(0, 4), 1);
        assert_eq!(stripe_count(4, 4), 1);
        assert_eq!(stripe_count(5, 4), 2);
        assert_eq!(namespace_hash("default").len(), 16);
        let n = ObjectNames::new("00", &ChunkKey([7; 32]));
        assert!(n.header().starts_with("kvq:2:{00:0707"));
        assert!(n.header().ends_with("}:h"));
    }

    /// Per layer, each layer's stripes share a tag of their own; in one shard, every stripe
    /// shares the header's. Both end in `:l<layer>:<stripe>`.
    #[test]
    fn layouts_place_records_by_hash_tag() {
        let n = ObjectNames::new("00", &ChunkKey([7; 32]));
        let h = n.header();
        let header_bytes = [9u8; 40];
        let per = n.records(&header_bytes, 4, RecordLayout::PerLayer);
        let one = n.records(&header_bytes, 4, RecordLayout::OneShard);
        let (p1, p2) = (per.stripes(1, 9), per.stripes(2, 4));
        assert_eq!(p1.len(), 3);
        assert!(p1.iter().all(|k| tag(k) == tag(&p1[0])));
        assert_ne!(tag(&p1[0]), tag(&p2[0]));
        assert_ne!(tag(&p1[0]), tag(&h));
        assert!(p1[2].ends_with(":l1:2"), "{}", p1[2]);
        assert!(tag(&p1[0]).starts_with(tag(&h)));
        let o = one.stripes(1, 9);
        assert!(o.iter().all(|k| tag(k) == tag(&h)), "{o:?}");
        assert!(o[2].ends_with(":l1:2"));
        assert!(o[0].contains("0909090909090909"), "the header's version");
    }

    #[test]
    fn the_envelope_keeps_the_layout() {
        use crate::layout::{KvDType, KvLayout, RopeScalingSpec};
        let layout = KvLayout {
            num_layers: 2,
            num_kv_heads: 1,
            head_dim: 4,
            dtype: KvDType::F32,
            k_pre_rope: true,
            rope_theta: 10_000.0,
            rope_scaling: RopeScalingSpec::None,
        };
        let key = ChunkKey([3; 32]);
        let layer = Bytes::from(vec![0u8; layout.layer_bytes(3)]);
        let obj =
            crate::object::KvObject::new(key, layout, vec![1, 2, 3], vec![layer; 2], None).unwrap();
        let hdr = obj
            .encode_or_raw(crate::codec::Codec::Raw)
            .unwrap()
            .header_bytes;
        for layout in [RecordLayout::PerLayer, RecordLayout::OneShard] {
            let e = Bytes::from(envelope(&hdr, 4096, layout));
            let (_, p) = parse_envelope(&e, &key).unwrap();
            assert_eq!(
                p,
                Placement {
                    stripe_bytes: 4096,
                    layout
                }
            );
        }
        let mut bad = envelope(&hdr, 4096, RecordLayout::PerLayer);
        bad[5] = 7;
        let e = parse_envelope(&Bytes::from(bad), &key).unwrap_err();
        assert!(e.to_string().contains("record layout 7"), "{e}");
    }

    #[test]
    fn a_bad_envelope_is_corrupt() {
        let k = ChunkKey([1; 32]);
        for bad in [
            &b"KVQ"[..],
            b"XXXX\x02\0\0\0\x04\0\0\0",
            b"KVQR\x09\0\0\0\x04\0\0\0",
            b"KVQR\x01\0\0\0\x04\0\0\0",
        ] {
            let e = parse_envelope(&Bytes::copy_from_slice(bad), &k).unwrap_err();
            assert!(matches!(e, StoreError::Corrupt(_)), "{e}");
        }
        let zero_stripe = envelope(b"", 0, RecordLayout::PerLayer);
        assert!(parse_envelope(&Bytes::from(zero_stripe), &k).is_err());
    }
}
