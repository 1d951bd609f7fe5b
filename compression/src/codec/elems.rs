//! Element types of raw layers and their conversion to and from f32.

use half::f16;
use half::slice::HalfFloatSliceExt;
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

    /// Element `i` of `raw` as f32 (the tests' one-at-a-time reading; the codecs convert in
    /// bulk with [`ElemType::to_f32_vec`]).
    #[cfg(test)]
    pub(crate) fn get(self, raw: &[u8], i: usize) -> f32 {
        match self {
            Self::F32 => super::f32_at(raw, i),
            Self::F16 => f16::from_bits(u16::from_le_bytes([raw[2 * i], raw[2 * i + 1]])).to_f32(),
            Self::Bf16 => {
                half::bf16::from_bits(u16::from_le_bytes([raw[2 * i], raw[2 * i + 1]])).to_f32()
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
            // `half` converts bf16 one value at a time; the same rounding in a loop the
            // compiler vectorises
            Self::Bf16 => {
                for (o, &v) in out.chunks_exact_mut(2).zip(values) {
                    o.copy_from_slice(&bf16_bits(v).to_le_bytes());
                }
            }
        }
    }

    /// All of `raw` as f32 (the same values [`ElemType::get`] reads one at a time), converted
    /// in bulk: f32 and bf16 in loops the compiler vectorises, f16 through `half`'s slice
    /// conversion (the CPU's F16C instructions where it has them).
    #[inline(always)]
    pub(crate) fn to_f32_vec(self, raw: &[u8]) -> Vec<f32> {
        let n = raw.len() / self.size();
        match self {
            Self::F32 => raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Self::Bf16 => raw
                .chunks_exact(2)
                .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))
                .collect(),
            Self::F16 => {
                let mut out = vec![0f32; n];
                let mut buf = [f16::ZERO; 64];
                for (src, dst) in raw.chunks(128).zip(out.chunks_mut(64)) {
                    let b = &mut buf[..dst.len()];
                    for (h, x) in b.iter_mut().zip(src.chunks_exact(2)) {
                        *h = f16::from_bits(u16::from_le_bytes([x[0], x[1]]));
                    }
                    b.convert_to_f32_slice(dst);
                }
                out
            }
        }
    }
}

/// The bf16 nearest to `x` (ties to even; a NaN stays a quiet NaN), as `half`'s
/// `bf16::from_f32` gives it (pinned by `bf16_rounding_is_half_s`): branch-free integer
/// operations.
#[inline(always)]
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        (b >> 16) as u16 | 0x40
    } else {
        rounded
    }
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;

    #[test]
    fn bf16_rounding_is_half_s() {
        // every 251st f32 bit pattern: both signs, every exponent, NaNs, infinities, and
        // the ties and their neighbours of a sample of mantissas
        let ties = (0..1u32 << 16).map(|hi| (hi << 16) | 0x8000);
        let sweep = (0..=u32::MAX).step_by(251);
        for bits in sweep.chain(ties.clone()).chain(ties.map(|t| t + 1)) {
            let x = f32::from_bits(bits);
            assert_eq!(
                bf16_bits(x),
                bf16::from_f32(x).to_bits(),
                "{x:e} ({bits:#010x})"
            );
        }
    }
}
