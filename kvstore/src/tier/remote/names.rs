//! Where an object lives in a remote key-value engine: key names and the header envelope.
//!
//! One object is one hash tag, so a cluster keeps all of it on one shard and one call
//! pipelines it:
//!
//! | key | value |
//! |---|---|
//! | `kvq:1:{N:K}:h` | the envelope below (the commit marker: written last) |
//! | `kvq:1:{N:K}:V:l<layer>:<stripe>` | bytes `stripe·S .. (stripe+1)·S` of layer `layer`'s stored record |
//!
//! `1` is this naming's version; `N` the first 16 hex digits of BLAKE3 of the deployment
//! namespace ([`super::RemoteConfig::namespace`]; tenant names never reach the wire, and a
//! tenant's chunk keys are already salted by its namespace); `K` the chunk key in hex; `V`
//! the first 16 hex digits of the object header's checksum, so two writers that encode the
//! same chunk differently (another codec) never mix records: each header names its own.
//! A record is striped in values of at most `S` bytes (`stripe_bytes`); an empty record
//! still has one (empty) stripe.
//!
//! # Envelope (the header value)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `KVQR` |
//! | 4 | 1 | envelope version (1) |
//! | 5 | 3 | reserved (0) |
//! | 8 | 4 | `S`, stripe bytes, u32 LE (1 ..= 1 GiB) |
//! | 12 | … | the object header exactly as in the object format (its own checksum included) |
//!
//! `S` is outside the header's checksum: a damaged `S` splits records wrongly, which their
//! checksums then catch (a counted miss, never data).

use bytes::Bytes;

use crate::error::{Result, StoreError};
use crate::key::ChunkKey;
use crate::object::{ObjectHeader, decode_header};

/// Version of the key naming (the `1` in `kvq:1:`).
pub const NAMING_VERSION: u32 = 1;
const MAGIC: &[u8; 4] = b"KVQR";
const ENVELOPE_VERSION: u8 = 1;
pub(super) const ENVELOPE_LEN: usize = 12;
/// Largest stripe an envelope may name.
pub(super) const MAX_STRIPE_BYTES: usize = 1 << 30;

/// The key names of one object.
#[derive(Debug, Clone)]
pub struct ObjectNames {
    tag: String,
}

impl ObjectNames {
    /// The names of `key` in the deployment namespace hashed to `ns` (16 hex digits).
    pub fn new(ns: &str, key: &ChunkKey) -> Self {
        Self {
            tag: format!("kvq:{NAMING_VERSION}:{{{ns}:{key}}}"),
        }
    }

    /// The header (envelope) key.
    pub fn header(&self) -> String {
        format!("{}:h", self.tag)
    }

    /// Where the records of the object whose encoded header is `header_bytes` (checksum
    /// included) lie, striped by `stripe_bytes`.
    pub fn records(&self, header_bytes: &[u8], stripe_bytes: usize) -> Records {
        let sum = &header_bytes[header_bytes.len().saturating_sub(32)..];
        let version: String = sum.iter().take(8).map(|b| format!("{b:02x}")).collect();
        Records {
            prefix: format!("{}:{version}", self.tag),
            stripe_bytes,
        }
    }
}

/// The record keys of one encoded object.
#[derive(Debug, Clone)]
pub struct Records {
    prefix: String,
    /// Most bytes of one stripe.
    pub stripe_bytes: usize,
}

impl Records {
    /// The keys of the stripes of layer `layer`, whose record is `len` bytes.
    pub fn stripes(&self, layer: usize, len: usize) -> Vec<String> {
        (0..stripe_count(len, self.stripe_bytes))
            .map(|s| format!("{}:l{layer}:{s}", self.prefix))
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

/// The envelope of `header_bytes` (an encoded object header) striped by `stripe_bytes`.
pub fn envelope(header_bytes: &[u8], stripe_bytes: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(ENVELOPE_LEN + header_bytes.len());
    out.extend_from_slice(MAGIC);
    out.push(ENVELOPE_VERSION);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&(stripe_bytes as u32).to_le_bytes());
    out.extend_from_slice(header_bytes);
    out
}

/// Parses and verifies an envelope read under `expected`'s header key: the object header
/// (checksum, key) and the stripe size.
pub fn parse_envelope(bytes: &Bytes, expected: &ChunkKey) -> Result<(ObjectHeader, usize)> {
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
    Ok((header, stripe))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripes_cover_a_record() {
        assert_eq!(stripe_count(0, 4), 1);
        assert_eq!(stripe_count(4, 4), 1);
        assert_eq!(stripe_count(5, 4), 2);
        assert_eq!(namespace_hash("default").len(), 16);
        let n = ObjectNames::new("00", &ChunkKey([7; 32]));
        assert!(n.header().starts_with("kvq:1:{00:0707"));
        assert!(n.header().ends_with("}:h"));
    }

    #[test]
    fn a_bad_envelope_is_corrupt() {
        let k = ChunkKey([1; 32]);
        for bad in [
            &b"KVQ"[..],
            b"XXXX\x01\0\0\0\x04\0\0\0",
            b"KVQR\x09\0\0\0\x04\0\0\0",
        ] {
            let e = parse_envelope(&Bytes::copy_from_slice(bad), &k).unwrap_err();
            assert!(matches!(e, StoreError::Corrupt(_)), "{e}");
        }
        let zero_stripe = envelope(b"", 0);
        assert!(parse_envelope(&Bytes::from(zero_stripe), &k).is_err());
    }
}
