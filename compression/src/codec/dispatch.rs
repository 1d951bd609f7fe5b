//! The quantising codecs built for the CPU's widest vectors: the portable loops of `int8.rs`,
//! `fp8.rs` and `kivi.rs` (written so that the compiler vectorises them) compiled once per
//! instruction set and chosen at run time, as the model's vector maths is. Neither records
//! nor decoded values depend on the choice: Rust never fuses a multiply and an add on its
//! own; `definition_tests.rs` pins every record to its element-by-element definition, and
//! `record_plan::tests` every decoded layer to the device kernel's formula.

use super::{Code8, CodecError, CodecSpec, LayerShape, Result, fp8, int8, kivi};

/// Defines `$name`, which runs `$portable` built for the widest vectors the CPU has: an
/// AVX-512 and an AVX2 build of it (`$portable` is `#[inline(always)]`, so each build
/// compiles its loops for those instructions), chosen at run time.
macro_rules! widest {
    ($(#[$doc:meta])* fn $name:ident = $portable:ident ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        $(#[$doc])*
        pub(super) fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw")]
                fn avx512($($arg: $ty),*) -> $ret {
                    $portable($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) -> $ret {
                    $portable($($arg),*)
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
            $portable($($arg),*)
        }
    };
}

widest! {
    /// Encodes one layer with a quantising `spec` (before any lz4); raw and lz4 are copied.
    fn quantise = quantise_portable(spec: CodecSpec, shape: &LayerShape, raw: &[u8]) -> Result<Vec<u8>>
}

widest! {
    /// Decodes one quantised layer (after any lz4) into `out`; raw and lz4 are copied.
    fn dequantise = dequantise_portable(
        spec: CodecSpec,
        shape: &LayerShape,
        stored: &[u8],
        out: &mut [u8]
    ) -> Result<()>
}

/// The decoders, inlined (with their loops) into each build of [`dequantise`].
#[inline(always)]
fn dequantise_portable(
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
        } => int8::decode(shape, Code8::E4m3, 0, true, stored, out),
        CodecSpec::Fp8 { .. } => fp8::decode(shape, stored, out),
        CodecSpec::Int8 {
            group, zero_point, ..
        } => int8::decode(shape, Code8::Int8, group, zero_point, stored, out),
        CodecSpec::Kivi {
            bits,
            group,
            residual,
            ..
        } => kivi::Params::new(shape, bits, group, residual).decode(stored, out),
    }
}

/// The encoders, inlined (with their loops) into each build of [`quantise`].
#[inline(always)]
fn quantise_portable(spec: CodecSpec, shape: &LayerShape, raw: &[u8]) -> Result<Vec<u8>> {
    match spec {
        CodecSpec::Raw | CodecSpec::Lz4 => Ok(raw.to_vec()),
        CodecSpec::Fp8 {
            zero_point: true, ..
        } => int8::encode(shape, Code8::E4m3, 0, true, raw),
        CodecSpec::Fp8 { .. } => fp8::encode(shape, raw),
        CodecSpec::Int8 {
            group, zero_point, ..
        } => int8::encode(shape, Code8::Int8, group, zero_point, raw),
        CodecSpec::Kivi {
            bits,
            group,
            residual,
            ..
        } => kivi::Params::new(shape, bits, group, residual).encode(raw),
    }
}
