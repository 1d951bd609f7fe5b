//! `kvquilt bench codec`: every KV codec on real chunk KV — the default model's K and V for
//! real passages (the vendored MuSiQue set), as f32 (the CPU's storage type), as f16 and as
//! bf16 (the GPU's). Per codec: bytes against f16 raw, encode and decode throughput on one
//! core (raw bytes per second, median of `--repeats` passes; decode is on the read path of
//! every stored hit, encode on every store-back and precompute), and the error of the decoded
//! values against the values encoded (max and mean absolute, and max relative to the layer's
//! largest magnitude).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use half::{bf16, f16};
use kvquilt_compression::{CodecSpec, ElemType, LayerShape};
use serde::Serialize;

use super::{median, write_report};
use crate::eval::data;
use kvquilt::model_source::ModelArgs;

#[derive(clap::Args)]
pub struct CodecBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Examples whose passages become chunks (MuSiQue format).
    #[arg(long, default_value = "data/musique_dev.json")]
    input: PathBuf,
    /// Chunks: the passages of this many examples, one chunk each.
    #[arg(long, default_value_t = 4)]
    chunks: usize,
    /// Tokens per chunk (a chunk's text is cut to this).
    #[arg(long, default_value_t = 512)]
    chunk_tokens: usize,
    /// Codecs to measure (raw, lz4, fp8, fp8sym, int8, int8sym, kivi2, kivi4, kivi8, each lossy
    /// one with an optional +lz4).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "raw,lz4,fp8,fp8+lz4,fp8sym,int8,int8+lz4,int8sym,kivi8,kivi4,kivi4+lz4,kivi2"
    )]
    codecs: Vec<String>,
    /// Timed encode and decode passes over all layers (median).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Codecs whose SSD hit is also measured from a cold page cache: load time and a
    /// `reuse` request's TTFT over the same chunks (raw always runs first, as the baseline;
    /// empty: skip).
    #[arg(long, value_delimiter = ',', default_value = "raw,int8,kivi4")]
    cold_codecs: Vec<String>,
    /// Timed cold runs per codec (median).
    #[arg(long, default_value_t = 5)]
    cold_repeats: usize,
    /// Skip the device section (8-bit records dequantised where the model runs:
    /// `codec_device.rs`).
    #[arg(long)]
    no_device: bool,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Row {
    codec: String,
    /// Element type of the raw layers.
    elem: ElemType,
    lossy: bool,
    /// f16 raw bytes of the same KV over stored bytes.
    ratio_vs_f16: f64,
    /// Raw bytes (of `elem`) encoded per second, one thread (median pass).
    encode_gb_s: f64,
    /// Raw bytes (of `elem`) decoded per second, one thread (median pass).
    decode_gb_s: f64,
    max_abs_err: f32,
    mean_abs_err: f64,
    /// Max over layers of (max abs error / the layer's max |x|).
    max_rel_to_layer_amax: f32,
}

#[derive(Serialize)]
struct CodecReport {
    model: String,
    chunks: usize,
    tokens: usize,
    layers_per_chunk: usize,
    rows: Vec<Row>,
    /// The SSD hit per codec from a cold page cache (`codec_cold.rs`).
    cold_ssd: Vec<super::codec_cold::ColdRow>,
    /// The device the device section ran on.
    device: String,
    /// 8-bit records dequantised on the model's device (`codec_device.rs`).
    on_device: Vec<super::codec_device::DeviceRow>,
}

pub(crate) fn run(a: CodecBenchArgs) -> Result<()> {
    let specs: Vec<CodecSpec> = a
        .codecs
        .iter()
        .map(|n| CodecSpec::parse(n).with_context(|| format!("--codecs {n}")))
        .collect::<Result<_>>()?;
    let cold_specs: Vec<CodecSpec> = a
        .cold_codecs
        .iter()
        .filter(|n| !n.is_empty())
        .map(|n| CodecSpec::parse(n).with_context(|| format!("--cold-codecs {n}")))
        .collect::<Result<_>>()?;
    let loaded = a.model.load()?;
    let identity = kvquilt_blend::ModelIdentity::of(&loaded)?;
    let model = &loaded.model;
    let tokenizer = loaded.tokenizer()?;
    let examples = data::load(&a.input)?;
    if examples.len() < a.chunks {
        bail!(
            "{} has {} examples, fewer than --chunks {}",
            a.input.display(),
            examples.len(),
            a.chunks
        );
    }
    let c = model.config();
    // the f32 values of every layer of every chunk, and each chunk's token count
    let mut layers: Vec<(usize, Vec<f32>)> = Vec::new();
    let mut tokens = 0;
    let mut chunk_ids = Vec::new();
    for ex in &examples[..a.chunks] {
        let text: Vec<&str> = ex.ctxs.iter().map(|p| p.text.as_str()).collect();
        let mut ids = tokenizer.encode(&text.join("\n"))?;
        ids.truncate(a.chunk_tokens);
        let t = ids.len();
        tokens += t;
        chunk_ids.push(ids.clone());
        let mut cache = model.empty_cache()?;
        model.prefill(&ids, &kvquilt_model::positions(0, t), &mut cache)?;
        for l in &cache.layers {
            let k =
                l.k.flatten_all()?
                    .to_dtype(kvquilt_model::DType::F32)?
                    .to_vec1::<f32>()?;
            let v =
                l.v.flatten_all()?
                    .to_dtype(kvquilt_model::DType::F32)?
                    .to_vec1::<f32>()?;
            layers.push((t, [k, v].concat()));
        }
    }
    let f16_bytes: usize = layers.iter().map(|(_, x)| 2 * x.len()).sum();
    let mut rows = Vec::new();
    for elem in [ElemType::F32, ElemType::F16, ElemType::Bf16] {
        // the raw layers in this element type, and the values they hold
        let raws: Vec<(LayerShape, Vec<u8>, Vec<f32>)> = layers
            .iter()
            .map(|(t, x)| {
                let shape = LayerShape {
                    tokens: *t,
                    kv_heads: c.num_kv_heads,
                    head_dim: c.head_dim,
                    elem,
                };
                let (raw, held) = match elem {
                    ElemType::F32 => (x.iter().flat_map(|v| v.to_le_bytes()).collect(), x.clone()),
                    ElemType::F16 => {
                        let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
                        (
                            h.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
                            h.iter().map(|v| v.to_f32()).collect(),
                        )
                    }
                    ElemType::Bf16 => {
                        let h: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
                        (
                            h.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
                            h.iter().map(|v| v.to_f32()).collect(),
                        )
                    }
                };
                (shape, raw, held)
            })
            .collect();
        let raw_bytes: usize = raws.iter().map(|(_, r, _)| r.len()).sum();
        for &spec in &specs {
            let mut encodes = Vec::new();
            let mut stored: Vec<Vec<u8>> = Vec::new();
            for _ in 0..a.repeats.max(1) {
                let t0 = Instant::now();
                stored = raws
                    .iter()
                    .map(|(s, r, _)| spec.encode(s, r))
                    .collect::<std::result::Result<_, _>>()?;
                encodes.push(t0.elapsed().as_secs_f64());
            }
            let mut outs: Vec<Vec<u8>> = raws
                .iter()
                .map(|(s, _, _)| vec![0u8; s.raw_bytes()])
                .collect();
            let mut runs = Vec::new();
            for _ in 0..a.repeats.max(1) {
                let t0 = Instant::now();
                for ((s, _, _), (st, out)) in raws.iter().zip(stored.iter().zip(outs.iter_mut())) {
                    spec.decode_into(s, st, out)?;
                }
                runs.push(t0.elapsed().as_secs_f64());
            }
            let (mut max_abs, mut sum_abs, mut n, mut max_rel) = (0f32, 0f64, 0usize, 0f32);
            for ((_, _, held), out) in raws.iter().zip(&outs) {
                let amax = held.iter().fold(0f32, |m, v| m.max(v.abs()));
                let mut layer_max = 0f32;
                for (i, &x) in held.iter().enumerate() {
                    let y = match elem {
                        ElemType::F32 => f32::from_le_bytes(out[4 * i..4 * i + 4].try_into()?),
                        ElemType::F16 => {
                            f16::from_bits(u16::from_le_bytes([out[2 * i], out[2 * i + 1]]))
                                .to_f32()
                        }
                        ElemType::Bf16 => {
                            bf16::from_bits(u16::from_le_bytes([out[2 * i], out[2 * i + 1]]))
                                .to_f32()
                        }
                    };
                    let e = (x - y).abs();
                    layer_max = layer_max.max(e);
                    sum_abs += e as f64;
                }
                n += held.len();
                max_abs = max_abs.max(layer_max);
                if amax > 0.0 {
                    max_rel = max_rel.max(layer_max / amax);
                }
            }
            let stored_bytes: usize = stored.iter().map(|s| s.len()).sum();
            let row = Row {
                codec: spec.to_string(),
                elem,
                lossy: spec.is_lossy(),
                ratio_vs_f16: f16_bytes as f64 / stored_bytes as f64,
                encode_gb_s: raw_bytes as f64 / median(&encodes) / 1e9,
                decode_gb_s: raw_bytes as f64 / median(&runs) / 1e9,
                max_abs_err: max_abs,
                mean_abs_err: sum_abs / n as f64,
                max_rel_to_layer_amax: max_rel,
            };
            eprintln!(
                "{:<10} {:?}: {:.2}x vs f16, encode {:.2} GB/s, decode {:.2} GB/s, max err {:.3e} (mean {:.3e}, {:.2e} of the layer's max)",
                row.codec,
                elem,
                row.ratio_vs_f16,
                row.encode_gb_s,
                row.decode_gb_s,
                row.max_abs_err,
                row.mean_abs_err,
                row.max_rel_to_layer_amax
            );
            rows.push(row);
        }
    }
    let device = model.device().clone();
    let on_device = if a.no_device {
        Vec::new()
    } else {
        super::codec_device::run(&device, &layers, c.num_kv_heads, c.head_dim, a.repeats)?
    };
    let question = tokenizer.encode(&format!("\nQuestion: {}\nAnswer:", examples[0].question))?;
    let num_layers = c.num_layers;
    let path = loaded.path.display().to_string();
    let cold_ssd = if cold_specs.is_empty() {
        Vec::new()
    } else {
        let model = std::sync::Arc::new(loaded.model);
        super::codec_cold::run(
            model,
            &identity,
            &chunk_ids,
            &question,
            &cold_specs,
            a.cold_repeats,
        )?
    };
    let report = CodecReport {
        model: path,
        chunks: a.chunks,
        tokens,
        layers_per_chunk: num_layers,
        rows,
        cold_ssd,
        device: format!("{device:?}"),
        on_device,
    };
    write_report(&report, a.json.as_deref())
}
