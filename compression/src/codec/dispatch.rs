//! The quantising codecs built for the CPU's widest vectors: the portable loops of `int8.rs`,
//! `fp8.rs` and `kivi.rs` (written so that the compiler vectorises them) compiled once per
//! instruction set and chosen at run time, as the model's vector maths is. Neither records
//! nor decoded values depend on the choice: Rust never fuses a multiply and an add on its
//! own; `definition_tests.rs` pins every record to its element-by-element definition, and
//! `record_plan::tests` every decoded layer to the device kernel's formula.

use super::{Code8, CodecError, CodecSpec, LayerShape, Result, fp8, int8, kivi};

/// Runs `$portable(args…)` in the build for the widest vectors the CPU has.
macro_rules! widest {
    ($avx512:ident, $avx2:ident, $portable:ident ($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
            {
                // SAFETY: the CPU has AVX-512F and BW, the features the function is built for.
                return unsafe { $avx512($($arg),*) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2, the feature the function is built for.
                return unsafe { $avx2($($arg),*) };
            }
        }
        $portable($($arg),*)
    }};
}

/// Encodes one layer with a quantising `spec` (before any lz4); raw and lz4 are copied.
pub(super) fn quantise(spec: CodecSpec, shape: &LayerShape, raw: &[u8]) -> Result<Vec<u8>> {
    widest!(
        quantise_avx512,
        quantise_avx2,
        quantise_portable(spec, shape, raw)
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
fn quantise_avx512(spec: CodecSpec, shape: &LayerShape, raw: &[u8]) -> Result<Vec<u8>> {
    quantise_portable(spec, shape, raw)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn quantise_avx2(spec: CodecSpec, shape: &LayerShape, raw: &[u8]) -> Result<Vec<u8>> {
    quantise_portable(spec, shape, raw)
}

/// Decodes one quantised layer (after any lz4) into `out`; raw and lz4 are copied.
pub(super) fn dequantise(
    spec: CodecSpec,
    shape: &LayerShape,
    stored: &[u8],
    out: &mut [u8],
) -> Result<()> {
    widest!(
        dequantise_avx512,
        dequantise_avx2,
        dequantise_portable(spec, shape, stored, out)
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
fn dequantise_avx512(
    spec: CodecSpec,
    shape: &LayerShape,
    stored: &[u8],
    out: &mut [u8],
) -> Result<()> {
    dequantise_portable(spec, shape, stored, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn dequantise_avx2(
    spec: CodecSpec,
    shape: &LayerShape,
    stored: &[u8],
    out: &mut [u8],
) -> Result<()> {
    dequantise_portable(spec, shape, stored, out)
}

/// The decoders, inlined (with their loops) into each build above.
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

/// The encoders, inlined (with their loops) into each build above.
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
