//! Element types of raw layers and their conversion to and from f32.

use half::f16;
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

    /// Absolute rounding of a value stored in this type below its smallest normal (half the
    /// subnormal step), where [`ElemType::rounding`]'s relative one undercounts: 0 for f32
    /// (kept as computed), 2⁻²⁵ for f16, 2⁻¹³⁴ for bf16.
    pub fn underflow(self) -> f32 {
        match self {
            Self::F32 => 0.0,
            Self::F16 => 2f32.powi(-25),
            Self::Bf16 => 2f32.powi(-134),
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
            Self::F16 => f16_put_all(values, out),
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
    /// in bulk: f32 and bf16 in loops the compiler vectorises, f16 with the CPU's F16C
    /// instructions where it has them.
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
                f16_get_all(raw, &mut out);
                out
            }
        }
    }
}

/// Writes `values` as little-endian f16 into `out` (`2 × values.len()` bytes), each the f16
/// nearest (ties to even) as `half`'s `f16::from_f32` gives it: eight at a time with F16C
/// where the CPU has it. (`half`'s own slice conversion calls the instruction through a
/// function pointer per eight values, which cost f16 decoders half their speed.)
#[inline(always)]
fn f16_put_all(values: &[f32], out: &mut [u8]) {
    let done = f16c::put(values, out);
    for (o, &v) in out[2 * done..].chunks_exact_mut(2).zip(&values[done..]) {
        o.copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
    }
}

/// Reads little-endian f16 `raw` into `out` (`raw.len() / 2` values), exactly: eight at a
/// time with F16C where the CPU has it.
#[inline(always)]
fn f16_get_all(raw: &[u8], out: &mut [f32]) {
    let done = f16c::get(raw, out);
    for (x, b) in out[done..].iter_mut().zip(raw[2 * done..].chunks_exact(2)) {
        *x = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
    }
}

/// The f16 conversions of F16C, eight values per instruction. Each function converts the
/// longest prefix it can (a multiple of eight, nothing without F16C) and returns its length;
/// the callers finish the rest one value at a time.
mod f16c {
    /// Converts a prefix of `values` into `out` as f16 (round to nearest even); returns its
    /// length.
    #[inline(always)]
    pub(super) fn put(values: &[f32], out: &mut [u8]) -> usize {
        #[cfg(target_arch = "x86_64")]
        if x86::available() {
            // SAFETY: the CPU has AVX and F16C, the features `x86::put` is built for.
            return unsafe { x86::put(values, out) };
        }
        let _ = (values, out);
        0
    }

    /// Converts a prefix of the f16 `raw` into `out` (exact); returns its length.
    #[inline(always)]
    pub(super) fn get(raw: &[u8], out: &mut [f32]) -> usize {
        #[cfg(target_arch = "x86_64")]
        if x86::available() {
            // SAFETY: the CPU has AVX and F16C, the features `x86::get` is built for.
            return unsafe { x86::get(raw, out) };
        }
        let _ = (raw, out);
        0
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use std::arch::x86_64::{
            __m128i, _MM_FROUND_TO_NEAREST_INT, _mm_loadu_si128, _mm_storeu_si128, _mm256_cvtph_ps,
            _mm256_cvtps_ph, _mm256_loadu_ps, _mm256_storeu_ps,
        };

        /// Whether the CPU has what `put` and `get` are built for.
        #[inline(always)]
        pub(super) fn available() -> bool {
            std::arch::is_x86_feature_detected!("avx")
                && std::arch::is_x86_feature_detected!("f16c")
        }

        #[target_feature(enable = "avx,f16c")]
        pub(super) fn put(values: &[f32], out: &mut [u8]) -> usize {
            let n = values.len().min(out.len() / 2) / 8 * 8;
            for i in (0..n).step_by(8) {
                // SAFETY: i + 8 ≤ n ≤ values.len() and 2(i + 8) ≤ 2n ≤ out.len(): the load
                // reads values[i..i + 8], the store writes out[2i..2i + 16]; both unaligned.
                unsafe {
                    let v = _mm256_loadu_ps(values.as_ptr().add(i));
                    let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                    _mm_storeu_si128(out.as_mut_ptr().add(2 * i).cast::<__m128i>(), h);
                }
            }
            n
        }

        #[target_feature(enable = "avx,f16c")]
        pub(super) fn get(raw: &[u8], out: &mut [f32]) -> usize {
            let n = out.len().min(raw.len() / 2) / 8 * 8;
            for i in (0..n).step_by(8) {
                // SAFETY: i + 8 ≤ n: the load reads raw[2i..2i + 16] (2n ≤ raw.len()), the
                // store writes out[i..i + 8] (n ≤ out.len()); both unaligned.
                unsafe {
                    let h = _mm_loadu_si128(raw.as_ptr().add(2 * i).cast::<__m128i>());
                    _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
                }
            }
            n
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
    use half::{bf16, f16};

    use super::*;

    /// The f16 conversions against `half`'s software definitions (`from_f32_const`,
    /// `to_f32_const`, which never use the CPU's instructions): every 251st f32 bit pattern
    /// and every f16 rounding tie and its neighbours, in slices of every length mod 8 so the
    /// tails run too; every f16 bit pattern back to f32.
    #[test]
    fn f16_conversions_are_half_s_definitions() {
        let ties = (0..1u32 << 19).map(|hi| (hi << 13) | 0x1000);
        let sweep = (0..=u32::MAX).step_by(251);
        let xs: Vec<f32> = sweep
            .chain(ties.clone())
            .chain(ties.clone().map(|t| t + 1))
            .chain(ties.map(|t| t - 1))
            .map(f32::from_bits)
            .collect();
        for len in [xs.len(), xs.len() - 3, 7, 1, 0] {
            let mut out = vec![0u8; 2 * len];
            f16_put_all(&xs[..len], &mut out);
            for (x, b) in xs.iter().zip(out.chunks_exact(2)) {
                let want = f16::from_f32_const(*x).to_bits();
                let got = u16::from_le_bytes([b[0], b[1]]);
                assert_eq!(got, want, "{x:e} ({:#010x})", x.to_bits());
            }
        }
        let raw: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_le_bytes).collect();
        for len in [1usize << 16, (1 << 16) - 5, 3] {
            let mut out = vec![0f32; len];
            f16_get_all(&raw[..2 * len], &mut out);
            for (h, x) in (0..=u16::MAX).zip(&out) {
                let want = f16::from_bits(h).to_f32_const();
                assert_eq!(x.to_bits(), want.to_bits(), "{h:#06x}");
            }
        }
    }

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
