//! `kvquilt bench codec`, device section: the records of the codecs with a device layout
//! (fp8, int8, KIVI) dequantised where the model runs (`kvquilt_model::dequant`: the CUDA kernel on a GPU, the same formula on the
//! CPU). Per codec and element type, on the real model's layers and (bf16) on layers of the
//! 8B shape (5,120 tokens × 8 KV heads × 128, random values): whether every decoded element
//! has the bits of the codec's own CPU decoder, the decode throughput beside a
//! device-to-device copy of the decoded bytes, and (8B shape) the pinned host→device
//! bandwidth for the encoded and the decoded bytes.

use std::time::Instant;

use anyhow::Result;
use kvquilt_compression::{CodecSpec, ElemType, LayerShape};
use kvquilt_model::{DType, Device, Tensor, dequant};
use serde::Serialize;

use super::median;

/// The codecs measured (each has a device layout: `CodecSpec::has_record_plan`).
const CODECS: [&str; 8] = [
    "fp8", "fp8sym", "int8", "int8/g64", "int8sym", "kivi4", "kivi2", "kivi8",
];

#[derive(Serialize)]
pub(crate) struct DeviceRow {
    codec: String,
    elem: ElemType,
    /// `real` (the model's layers) or `8b` (one layer shape of Llama-3.1-8B).
    layers: &'static str,
    /// Records decoded per pass.
    records: usize,
    /// Whether every element matched the CPU decoder's bits.
    bit_equal: bool,
    /// Elements that did not.
    mismatches: usize,
    record_bytes: usize,
    decoded_bytes: usize,
    /// Decoded bytes per second of the dequantisation (median pass, device synchronised).
    decode_gb_s: f64,
    /// Decoded bytes per second of a device-to-device copy of the same tensors.
    copy_gb_s: f64,
    /// Pinned host→device GB/s for one record's bytes and for one decoded layer's bytes
    /// (`8b` rows on CUDA).
    #[serde(skip_serializing_if = "Option::is_none")]
    pinned_h2d_gb_s_record: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pinned_h2d_gb_s_decoded: Option<f64>,
}

fn dtype_of(elem: ElemType) -> DType {
    match elem {
        ElemType::F32 => DType::F32,
        ElemType::F16 => DType::F16,
        ElemType::Bf16 => DType::BF16,
    }
}

/// Raw bytes of `values` in `elem`.
fn raw_of(values: &[f32], elem: ElemType) -> Result<Vec<u8>> {
    bytes_of(&Tensor::new(values, &Device::Cpu)?.to_dtype(dtype_of(elem))?)
}

/// Runs the section over the real layers (`(tokens, K‖V as f32)` with `kv_heads × head_dim`
/// per token) on `device`.
pub(crate) fn run(
    device: &Device,
    layers: &[(usize, Vec<f32>)],
    kv_heads: usize,
    head_dim: usize,
    repeats: usize,
) -> Result<Vec<DeviceRow>> {
    let mut rows = Vec::new();
    // the 8B shape: a few layers of random values
    let big = LayerShape {
        tokens: 5120,
        kv_heads: 8,
        head_dim: 128,
        elem: ElemType::Bf16,
    };
    let mut seed = 0x9E37_79B9u32;
    let big_values: Vec<Vec<f32>> = (0..4)
        .map(|_| {
            (0..2 * big.half_elems())
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    (seed % 40_001) as f32 / 10_000.0 - 2.0
                })
                .collect()
        })
        .collect();
    for name in CODECS {
        let codec = CodecSpec::parse(name)?;
        for elem in [ElemType::Bf16, ElemType::F16, ElemType::F32] {
            let real: Vec<(LayerShape, Vec<u8>)> = layers
                .iter()
                .map(|(t, x)| {
                    let shape = LayerShape {
                        tokens: *t,
                        kv_heads,
                        head_dim,
                        elem,
                    };
                    Ok((shape, raw_of(x, elem)?))
                })
                .collect::<Result<_>>()?;
            rows.push(measure(device, codec, "real", &real, repeats)?);
            if elem == ElemType::Bf16 {
                let synth: Vec<(LayerShape, Vec<u8>)> = big_values
                    .iter()
                    .map(|x| Ok((big, raw_of(x, elem)?)))
                    .collect::<Result<_>>()?;
                rows.push(measure(device, codec, "8b", &synth, repeats)?);
            }
        }
    }
    Ok(rows)
}

fn measure(
    device: &Device,
    codec: CodecSpec,
    which: &'static str,
    layers: &[(LayerShape, Vec<u8>)],
    repeats: usize,
) -> Result<DeviceRow> {
    let elem = layers[0].0.elem;
    let dtype = dtype_of(elem);
    let mut records = Vec::new();
    let mut plans = Vec::new();
    let mut expected = Vec::new();
    for (shape, raw) in layers {
        let rec = codec.encode(shape, raw)?;
        let Some(plan) = codec.record_plan(shape) else {
            anyhow::bail!("{codec} has no device layout");
        };
        expected.push(codec.decode(shape, &rec)?);
        records.push(Tensor::from_raw_buffer(
            &rec,
            DType::U8,
            &[rec.len()],
            device,
        )?);
        plans.push(plan);
    }
    let record_bytes: usize = records.iter().map(Tensor::elem_count).sum();
    let decoded_bytes: usize = layers.iter().map(|(s, _)| s.raw_bytes()).sum();
    let decode_all = || -> Result<Vec<Tensor>> {
        records
            .iter()
            .zip(&plans)
            .map(|(r, p)| Ok(dequant::dequantize(r, p, dtype)?))
            .collect()
    };
    let mut mismatches = 0usize;
    for (t, want) in decode_all()?.iter().zip(&expected) {
        let bytes = bytes_of(t)?;
        let esize = elem.size();
        mismatches += bytes
            .chunks_exact(esize)
            .zip(want.chunks_exact(esize))
            .filter(|(a, b)| a != b)
            .count();
    }
    drop(expected);
    let mut runs = Vec::new();
    let mut decoded = Vec::new();
    for i in 0..=repeats.max(1) {
        device.synchronize()?;
        let t = Instant::now();
        decoded = decode_all()?;
        device.synchronize()?;
        if i > 0 {
            runs.push(t.elapsed().as_secs_f64());
        }
    }
    let mut copies = Vec::new();
    for i in 0..=repeats.max(1) {
        device.synchronize()?;
        let t = Instant::now();
        let c: Vec<Tensor> = decoded.iter().map(Tensor::copy).collect::<Result<_, _>>()?;
        device.synchronize()?;
        drop(c);
        if i > 0 {
            copies.push(t.elapsed().as_secs_f64());
        }
    }
    let pinned = |bytes: usize| {
        (which == "8b" && device.is_cuda())
            .then(|| kvquilt_model::staging::pinned_peak_gbps(device, bytes, repeats.max(3)))
            .transpose()
    };
    let row = DeviceRow {
        codec: codec.to_string(),
        elem,
        layers: which,
        records: records.len(),
        bit_equal: mismatches == 0,
        mismatches,
        record_bytes,
        decoded_bytes,
        decode_gb_s: decoded_bytes as f64 / median(&runs) / 1e9,
        copy_gb_s: decoded_bytes as f64 / median(&copies) / 1e9,
        pinned_h2d_gb_s_record: pinned(record_bytes / records.len())?,
        pinned_h2d_gb_s_decoded: pinned(decoded_bytes / records.len())?,
    };
    eprintln!(
        "device {:<8} {:?} {:<4}: {} records, bits equal {}, decode {:.1} GB/s, d2d copy {:.1} GB/s, pinned h2d record {:?} / decoded {:?} GB/s",
        row.codec,
        elem,
        which,
        row.records,
        row.bit_equal,
        row.decode_gb_s,
        row.copy_gb_s,
        row.pinned_h2d_gb_s_record,
        row.pinned_h2d_gb_s_decoded
    );
    Ok(row)
}

/// A 1-D tensor's bytes (little-endian) on the host.
pub(crate) fn bytes_of(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.to_device(&Device::Cpu)?;
    Ok(match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        other => anyhow::bail!("no bytes for {other:?}"),
    })
}
