//! The shape and encoding of the KV held in an object. kvstore knows nothing of models: a
//! layout is just the numbers that decide how KV bytes are laid out and what they mean.

use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};

/// Element type of stored K and V values (little-endian in every byte layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDType {
    /// IEEE 754 binary32, 4 bytes (header code 1).
    F32,
    /// IEEE 754 binary16, 2 bytes (header code 2).
    F16,
    /// bfloat16 (the top half of an f32), 2 bytes (header code 3).
    BF16,
}

impl KvDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            Self::F32 => 1,
            Self::F16 => 2,
            Self::BF16 => 3,
        }
    }

    pub(crate) fn from_code(c: u8) -> Result<Self> {
        match c {
            1 => Ok(Self::F32),
            2 => Ok(Self::F16),
            3 => Ok(Self::BF16),
            _ => Err(StoreError::Corrupt(format!("unknown dtype code {c}"))),
        }
    }
}

/// How rotary frequencies were scaled (part of the key: keys rotated differently differ).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RopeScalingSpec {
    /// Frequencies as `rope_theta` gives them (kind 0).
    None,
    /// Every frequency divided by `factor` (kind 1, HF "linear").
    Linear {
        /// The divisor.
        factor: f32,
    },
    /// Llama 3.1's piecewise scaling (kind 2, HF "llama3").
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f32,
        /// Wavelengths above `original_max_position_embeddings / low_freq_factor` positions
        /// are divided by `factor`.
        low_freq_factor: f32,
        /// Wavelengths below `original_max_position_embeddings / high_freq_factor` positions
        /// are kept; those in between are interpolated.
        high_freq_factor: f32,
        /// Pre-training context length, tokens (stored as an f32 in the object header).
        original_max_position_embeddings: u32,
    },
}

impl RopeScalingSpec {
    /// Kind code and four parameters, as stored.
    pub(crate) fn encode(&self) -> (u8, [f32; 4]) {
        match *self {
            Self::None => (0, [0.0; 4]),
            Self::Linear { factor } => (1, [factor, 0.0, 0.0, 0.0]),
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => (
                2,
                [
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings as f32,
                ],
            ),
        }
    }

    pub(crate) fn decode(kind: u8, p: [f32; 4]) -> Result<Self> {
        match kind {
            0 => Ok(Self::None),
            1 => Ok(Self::Linear { factor: p[0] }),
            2 => Ok(Self::Llama3 {
                factor: p[0],
                low_freq_factor: p[1],
                high_freq_factor: p[2],
                original_max_position_embeddings: p[3] as u32,
            }),
            _ => Err(StoreError::Corrupt(format!(
                "unknown RoPE scaling kind {kind}"
            ))),
        }
    }
}

/// Everything needed to interpret an object's K/V bytes.
///
/// Per layer, K then V, each `[tokens, num_kv_heads, head_dim]` row-major in `dtype`.
/// With `k_pre_rope`, K was captured before the rotary embedding (kvquilt always stores it
/// so); `rope_theta` and `rope_scaling` say how it is to be rotated.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KvLayout {
    /// Decoder layers: an object holds one K‖V record per layer ([`KvLayout::validate`]
    /// accepts 1..=4096).
    pub num_layers: u32,
    /// KV heads per layer (1..=4096).
    pub num_kv_heads: u32,
    /// Elements per head (1..=65536).
    pub head_dim: u32,
    /// Element type of K and V.
    pub dtype: KvDType,
    /// K was captured before RoPE (kvquilt always stores it so).
    pub k_pre_rope: bool,
    /// RoPE base the keys are rotated with (if pre-RoPE: are to be rotated with); finite.
    pub rope_theta: f32,
    /// Scaling of the rotary frequencies.
    pub rope_scaling: RopeScalingSpec,
}

impl KvLayout {
    /// Bytes of one layer's K (or V) for `tokens` tokens.
    pub fn tensor_bytes(&self, tokens: usize) -> usize {
        tokens * self.num_kv_heads as usize * self.head_dim as usize * self.dtype.size()
    }

    /// Bytes of one layer's K and V together, uncompressed.
    pub fn layer_bytes(&self, tokens: usize) -> usize {
        2 * self.tensor_bytes(tokens)
    }

    /// Bytes of every layer's K and V for `tokens` tokens, uncompressed: what an object of
    /// that many tokens decodes to (quotas and cost estimates count this).
    pub fn object_bytes(&self, tokens: usize) -> u64 {
        self.layer_bytes(tokens) as u64 * self.num_layers as u64
    }

    /// Checks that the numbers can describe real KV.
    pub fn validate(&self) -> Result<()> {
        if self.num_layers == 0 || self.num_kv_heads == 0 || self.head_dim == 0 {
            return Err(StoreError::Invalid(format!("empty layout {self:?}")));
        }
        if self.num_layers > 4096 || self.num_kv_heads > 4096 || self.head_dim > 65_536 {
            return Err(StoreError::Invalid(format!("implausible layout {self:?}")));
        }
        if !self.rope_theta.is_finite() {
            return Err(StoreError::Invalid("RoPE theta is not finite".into()));
        }
        Ok(())
    }
}
