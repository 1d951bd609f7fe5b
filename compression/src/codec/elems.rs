//! Element types of raw layers and their conversion to and from f32.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use serde::{Deserialize, Serialize};

/// The element type of a raw layer (little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ElemType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
}

impl ElemType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }

    /// Relative rounding of a value stored in this type (half an ulp): 0 for f32 (kept as
    /// computed), 2⁻¹¹ for f16, 2⁻⁸ for bf16.
    pub fn rounding(self) -> f32 {
        match self {
            Self::F32 => 0.0,
            Self::F16 => 1.0 / 2048.0,
            Self::Bf16 => 1.0 / 256.0,
        }
    }

    /// Element `i` of `raw` as f32.
    #[inline(always)]
    pub(crate) fn get(self, raw: &[u8], i: usize) -> f32 {
        match self {
            Self::F32 => super::f32_at(raw, i),
            Self::F16 => f16::from_bits(u16::from_le_bytes([raw[2 * i], raw[2 * i + 1]])).to_f32(),
            Self::Bf16 => {
                bf16::from_bits(u16::from_le_bytes([raw[2 * i], raw[2 * i + 1]])).to_f32()
            }
        }
    }

    /// Writes `values` as this type into `out` (`values.len() × size` bytes).
    #[inline(always)]
    pub(crate) fn put_all(self, values: &[f32], out: &mut [u8]) {
        match self {
            Self::F32 => {
                for (o, v) in out.chunks_exact_mut(4).zip(values) {
                    o.copy_from_slice(&v.to_le_bytes());
                }
            }
            // through a stack buffer, so that `half` converts slices with the CPU's
            // conversion instructions where it has them (F16C), not one value at a time
            Self::F16 => {
                let mut buf = [f16::ZERO; 64];
                for (vals, outs) in values.chunks(64).zip(out.chunks_mut(128)) {
                    let b = &mut buf[..vals.len()];
                    b.convert_from_f32_slice(vals);
                    for (o, h) in outs.chunks_exact_mut(2).zip(b.iter()) {
                        o.copy_from_slice(&h.to_bits().to_le_bytes());
                    }
                }
            }
            Self::Bf16 => {
                let mut buf = [bf16::ZERO; 64];
                for (vals, outs) in values.chunks(64).zip(out.chunks_mut(128)) {
                    let b = &mut buf[..vals.len()];
                    b.convert_from_f32_slice(vals);
                    for (o, h) in outs.chunks_exact_mut(2).zip(b.iter()) {
                        o.copy_from_slice(&h.to_bits().to_le_bytes());
                    }
                }
            }
        }
    }

    /// All of `raw` as f32.
    pub(crate) fn to_f32_vec(self, raw: &[u8]) -> Vec<f32> {
        (0..raw.len() / self.size())
            .map(|i| self.get(raw, i))
            .collect()
    }
}
