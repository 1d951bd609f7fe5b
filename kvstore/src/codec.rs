//! Codecs applied to each layer's K‖V bytes. The codec id and its parameter are recorded in
//! the object header, so a reader always knows how a layer was encoded; ids are never reused.

use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};

/// How a layer's bytes are encoded at rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// The bytes as they are (id 0).
    Raw,
    /// LZ4 block format, lossless (id 1). KV floats compress little, but zero padding,
    /// repeated tokens and low-entropy heads do.
    Lz4,
}

impl Codec {
    /// Stored id; 2.. are open for lossy codecs (quantisation), which will carry parameters.
    pub fn id(self) -> u8 {
        match self {
            Self::Raw => 0,
            Self::Lz4 => 1,
        }
    }

    /// The codec of a stored id; an unknown id means the bytes are corrupt.
    pub(crate) fn from_id(id: u8) -> Result<Self> {
        match id {
            0 => Ok(Self::Raw),
            1 => Ok(Self::Lz4),
            _ => Err(StoreError::Corrupt(format!("unknown codec id {id}"))),
        }
    }

    /// Parses `raw` or `lz4`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "raw" => Some(Self::Raw),
            "lz4" => Some(Self::Lz4),
            _ => None,
        }
    }

    /// Encodes one layer's bytes.
    pub fn encode(self, raw: &[u8]) -> Vec<u8> {
        match self {
            Self::Raw => raw.to_vec(),
            Self::Lz4 => lz4_flex::block::compress(raw),
        }
    }

    /// Decodes one layer back to exactly `raw_len` bytes.
    pub fn decode(self, stored: &[u8], raw_len: usize) -> Result<Vec<u8>> {
        let out = match self {
            Self::Raw => stored.to_vec(),
            Self::Lz4 => lz4_flex::block::decompress(stored, raw_len)
                .map_err(|e| StoreError::Corrupt(format!("lz4: {e}")))?,
        };
        if out.len() != raw_len {
            return Err(StoreError::Corrupt(format!(
                "layer decodes to {} bytes, header says {raw_len}",
                out.len()
            )));
        }
        Ok(out)
    }
}
