//! The quantising codecs built for the CPU's widest vectors: the portable loops of `int8.rs`,
//! `fp8.rs` and `kivi.rs` (written so that the compiler vectorises them) compiled once per
//! instruction set and chosen at run time, as the model's vector maths is. Neither records
//! nor decoded values depend on the choice: Rust never fuses a multiply and an add on its
//! own; `definition_tests.rs` pins every record to its element-by-element definition, and
//! `record_plan::tests` every decoded layer to the device kernel's formula.

use super::{Code8, CodecError, CodecSpec, LayerShape, Result, fp8, int8, kivi};

/// Defines `$name`, which runs `$body` built for the widest vectors the CPU has: an AVX-512
/// and an AVX2 build of it (the body's callees are `#[inline(always)]`, so each build
/// compiles their loops for those instructions), chosen at run time.
macro_rules! widest {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $body:expr) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn portable($($arg: $ty),*) -> $ret {
                $body
            }
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw")]
                fn avx512($($arg: $ty),*) -> $ret {
                    portable($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) -> $ret {
                    portable($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                {
                    // SAFETY: the CPU has AVX-512F and BW, the features `avx512` is built for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2, the feature `avx2` is built for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            portable($($arg),*)
        }
    };
}

// One encoder and one decoder per codec, each built per instruction set on its own: a
// change to one codec's loops cannot move another's code (BENCHMARKS.md §6, "f16 and e4m3
// converted in the vectors": one inlined dispatcher of every codec moved f32 encoding by
// 12–17% when only f16 code changed).

/// Encodes one layer with a quantising `spec` (before any lz4); raw and lz4 are copied.
pub(super) fn quantise(spec: CodecSpec, shape: &LayerShape, raw: &[u8]) -> Result<Vec<u8>> {
    match spec {
        CodecSpec::Raw | CodecSpec::Lz4 => Ok(raw.to_vec()),
        CodecSpec::Fp8 {
            zero_point: true, ..
        } => encode_fp8(shape, raw),
        CodecSpec::Fp8 { .. } => encode_fp8sym(shape, raw),
        CodecSpec::Int8 {
            group, zero_point, ..
        } => encode_int8(shape, group, zero_point, raw),
        CodecSpec::Kivi {
            bits,
            group,
            residual,
            ..
        } => encode_kivi(shape, bits, group, residual, raw),
    }
}

/// Decodes one quantised layer (after any lz4) into `out`; raw and lz4 are copied.
pub(super) fn dequantise(
    spec: CodecSpec,
    shape: &LayerShape,
    stored: &[u8],
    out: &mut [u8],
) -> Result<()> {
    match spec {
        // `CodecSpec::decode_into` copies these itself; checked here all the same
        CodecSpec::Raw | CodecSpec::Lz4 if stored.len() == out.len() => {
            out.copy_from_slice(stored);
            Ok(())
        }
        CodecSpec::Raw | CodecSpec::Lz4 => Err(CodecError::Corrupt {
            codec: spec.family(),
            why: format!("{} bytes, expected {}", stored.len(), out.len()),
        }),
        CodecSpec::Fp8 {
            zero_point: true, ..
        } => decode_fp8(shape, stored, out),
        CodecSpec::Fp8 { .. } => decode_fp8sym(shape, stored, out),
        CodecSpec::Int8 {
            group, zero_point, ..
        } => decode_int8(shape, group, zero_point, stored, out),
        CodecSpec::Kivi {
            bits,
            group,
            residual,
            ..
        } => decode_kivi(shape, bits, group, residual, stored, out),
    }
}

widest! {
    /// fp8 with zero points: int8's layout with e4m3 codes.
    fn encode_fp8(shape: &LayerShape, raw: &[u8]) -> Result<Vec<u8>> =
        int8::encode(shape, Code8::E4m3, 0, true, raw)
}

widest! {
    /// fp8 with one scale per head (`fp8sym`).
    fn encode_fp8sym(shape: &LayerShape, raw: &[u8]) -> Result<Vec<u8>> = fp8::encode(shape, raw)
}

widest! {
    /// int8, symmetric or with zero points, per channel or in groups of tokens.
    fn encode_int8(shape: &LayerShape, group: u16, zero_point: bool, raw: &[u8]) -> Result<Vec<u8>> =
        int8::encode(shape, Code8::Int8, group, zero_point, raw)
}

widest! {
    /// KIVI at 2, 4 or 8 bits.
    fn encode_kivi(shape: &LayerShape, bits: u8, group: u16, residual: u16, raw: &[u8]) -> Result<Vec<u8>> =
        kivi::Params::new(shape, bits, group, residual).encode(raw)
}

widest! {
    /// fp8 with zero points.
    fn decode_fp8(shape: &LayerShape, stored: &[u8], out: &mut [u8]) -> Result<()> =
        int8::decode(shape, Code8::E4m3, 0, true, stored, out)
}

widest! {
    /// fp8 with one scale per head (`fp8sym`).
    fn decode_fp8sym(shape: &LayerShape, stored: &[u8], out: &mut [u8]) -> Result<()> =
        fp8::decode(shape, stored, out)
}

widest! {
    /// int8, symmetric or with zero points, per channel or in groups of tokens.
    fn decode_int8(
        shape: &LayerShape,
        group: u16,
        zero_point: bool,
        stored: &[u8],
        out: &mut [u8]
    ) -> Result<()> = int8::decode(shape, Code8::Int8, group, zero_point, stored, out)
}

widest! {
    /// KIVI at 2, 4 or 8 bits.
    fn decode_kivi(
        shape: &LayerShape,
        bits: u8,
        group: u16,
        residual: u16,
        stored: &[u8],
        out: &mut [u8]
    ) -> Result<()> = kivi::Params::new(shape, bits, group, residual).decode(stored, out)
}
