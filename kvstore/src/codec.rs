//! The store's side of the KV codecs: which codec a tier writes is a
//! [`kvquilt_compression::CodecSpec`] (re-exported here as [`Codec`]); this module turns an
//! object's layout and token count into the codec's [`LayerShape`] and the codec's errors into
//! store errors. The object header records the codec id and its parameter block (format v2,
//! `lib.rs`), so a reader always knows how a layer was encoded; ids are never reused.
//!
//! Lossy codecs are set per tier (`SsdConfig::codec`, `StoreConfig::host_codec`, the remote's
//! config; the sidecar's `[store.codecs]`), and read only where lossy objects are allowed.

pub use kvquilt_compression::CodecSpec as Codec;
use kvquilt_compression::{CodecError, ElemType, LayerShape};

use crate::error::{Result, StoreError};
use crate::key::ChunkKey;
use crate::layout::{KvDType, KvLayout};

/// The codec's view of one layer of `tokens` tokens of `layout`.
pub(crate) fn shape_of(layout: &KvLayout, tokens: usize) -> LayerShape {
    LayerShape {
        tokens,
        kv_heads: layout.num_kv_heads as usize,
        head_dim: layout.head_dim as usize,
        elem: match layout.dtype {
            KvDType::F32 => ElemType::F32,
            KvDType::F16 => ElemType::F16,
            KvDType::BF16 => ElemType::Bf16,
        },
    }
}

/// Parses the codec id and parameter block of `key`'s header; a bad one means the header is
/// corrupt (the error names the key and the field).
pub(crate) fn from_header(key: &ChunkKey, id: u8, params: &[u8]) -> Result<Codec> {
    Codec::from_header(id, params).map_err(|e| StoreError::Corrupt(format!("{key}: {e}")))
}

/// Decodes a stored record of a layer of `tokens` tokens; any mismatch is corruption.
pub(crate) fn decode(
    codec: Codec,
    layout: &KvLayout,
    tokens: usize,
    stored: &[u8],
) -> Result<Vec<u8>> {
    codec
        .decode(&shape_of(layout, tokens), stored)
        .map_err(|e: CodecError| StoreError::Corrupt(e.to_string()))
}
