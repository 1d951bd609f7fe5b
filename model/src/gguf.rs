//! Loading GGUF files (llama.cpp's format) of the `llama` and `qwen2` architectures.
//!
//! Quantised tensors are dequantised to f32 by candle and then cast to the compute dtype.
//! llama.cpp's converter permutes the rows of `attn_q`/`attn_k` of `llama` models so that
//! GGML's interleaved RoPE works; [`unpermute_rows`] undoes it so that the HF rotate_half
//! convention (see [`crate::rope`]) holds for GGUF and HF-format models alike. `qwen2` GGUFs
//! are not permuted.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::error::{ModelError, Result};
use crate::quant::BlockRows;
use crate::tokenizer::Tokenizer;
use crate::weights::{Weights, wrong_shape};

/// What a GGUF file yields.
pub(crate) struct GgufModel {
    pub config: ModelConfig,
    pub weights: Weights,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
}

pub(crate) fn load(path: &Path, dtype: DType, device: &Device) -> Result<GgufModel> {
    let invalid = |reason: String| ModelError::InvalidGguf {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let file_len = file
        .metadata()
        .map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let mut reader = BufReader::new(file);
    // candle's parser divides by the file's `general.alignment` unchecked (candle-core
    // 0.11.1): a file declaring 0 panics inside it, caught here as the malformed file it is
    let content = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Content::read(&mut reader)
    }))
    .map_err(|_| {
        invalid("its header does not parse (the GGUF reader panicked; a `general.alignment` of 0 does this)".into())
    })?
    .map_err(|e| invalid(header_error(&e.to_string())))?;
    check_extents(&content, file_len).map_err(invalid)?;

    let meta = Metadata(&content.metadata);
    let arch_name = meta.string("general.architecture").map_err(invalid)?;
    let architecture = Architecture::from_name(&arch_name)
        .ok_or_else(|| ModelError::UnsupportedArchitecture(arch_name.clone()))?;
    let config =
        config_from_metadata(&meta, &content, architecture, &arch_name).map_err(invalid)?;
    let tokenizer = Tokenizer::from_gguf(&content.metadata)?;
    let chat_template = meta.string("tokenizer.chat_template").ok();

    let mut source = |hf_name: &str,
                      want: &[usize]|
     -> Result<Option<(Tensor, Option<BlockRows>)>> {
        let Some(gguf_name) = gguf_name(hf_name) else {
            return Ok(None);
        };
        let Some(info) = content.tensor_infos.get(&gguf_name) else {
            return Ok(None);
        };
        if info.shape.dims() != want {
            return Err(wrong_shape(path, hf_name, info.shape.dims(), want));
        }
        let q = content
            .tensor(&mut reader, &gguf_name, &Device::Cpu)
            .map_err(|e| invalid(format!("tensor `{gguf_name}`: {e}")))?;
        let t = q.dequantize(&Device::Cpu)?;
        let blocks = BlockRows::from_qtensor(&q)?;
        let heads = match architecture {
            Architecture::Llama
                if gguf_name.ends_with("attn_q.weight") || gguf_name.ends_with("attn_q.bias") =>
            {
                Some(config.num_heads)
            }
            Architecture::Llama
                if gguf_name.ends_with("attn_k.weight") || gguf_name.ends_with("attn_k.bias") =>
            {
                Some(config.num_kv_heads)
            }
            _ => None,
        };
        // (the shape was checked against the config above; the row permutation below needs
        // whole heads of row pairs, i.e. an even head_dim)
        if let Some(heads) = heads
            && !t
                .dims()
                .first()
                .is_some_and(|&rows| rows > 0 && rows.is_multiple_of(2 * heads))
        {
            return Err(invalid(format!(
                "tensor `{gguf_name}` of shape {:?}: its rows are not {heads} heads of row pairs",
                t.dims()
            )));
        }
        Ok(Some(match heads {
            Some(heads) => (
                unpermute_rows(&t, heads)?,
                blocks
                    .map(|b| b.permute_rows(&unpermuted_order(b.rows(), heads)))
                    .transpose()?,
            ),
            None => (t, blocks),
        }))
    };
    let weights = Weights::load(&config, dtype, device, path, &mut source)?;
    Ok(GgufModel {
        config,
        weights,
        tokenizer,
        chat_template,
    })
}

/// The GGUF reader's error, said plainly where its own words mislead (candle names a
/// tensor type it cannot read "unknown dtype for tensor N", N being the type's id).
fn header_error(e: &str) -> String {
    match e.strip_prefix("unknown dtype for tensor ") {
        Some(id) => format!(
            "a tensor is stored as GGML type {id}, which kvquilt cannot read (IQ and MXFP4 quantisations are not supported: use an F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0 or Qn_K file)"
        ),
        None => e.to_string(),
    }
}

/// Every tensor's bytes must lie inside the file: a truncated download fails here, with the
/// sizes, rather than half-way through loading.
fn check_extents(content: &Content, file_len: u64) -> std::result::Result<(), String> {
    for (name, info) in &content.tensor_infos {
        // (sizes from the header, so every step checked: an overflow is a malformed file)
        let elems = info
            .shape
            .dims()
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d));
        let block = info.ggml_dtype.block_size();
        let end = elems
            .and_then(|e| (e / block).checked_mul(info.ggml_dtype.type_size()))
            .and_then(|bytes| {
                content
                    .tensor_data_offset
                    .checked_add(info.offset)?
                    .checked_add(bytes as u64)
            })
            .ok_or_else(|| format!("tensor `{name}`: its shape and offset overflow"))?;
        if end > file_len {
            return Err(format!(
                "truncated: tensor `{name}` ends at byte {end} but the file has {file_len} bytes"
            ));
        }
    }
    Ok(())
}

/// Inverse of llama.cpp's Q/K row permutation: rows of each head, stored as `(d/2, 2)` pairs,
/// go back to the `(2, d/2)` halves that rotate_half expects.
pub(crate) fn unpermute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    let half = rows / heads / 2;
    let rest: Vec<usize> = dims[1..].to_vec();
    let mut split = vec![heads, half, 2];
    split.extend(&rest);
    Ok(w.reshape(split)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// Row `i` of [`unpermute_rows`]'s result is row `order[i]` of its input (`rows` rows of
/// `heads` heads).
fn unpermuted_order(rows: usize, heads: usize) -> Vec<usize> {
    let half = rows / heads / 2;
    // out (h, j, i) <- in (h, i, j): [heads, half, 2] transposed to [heads, 2, half]
    (0..heads)
        .flat_map(|h| (0..2).flat_map(move |j| (0..half).map(move |i| h * 2 * half + i * 2 + j)))
        .collect()
}

fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let kind = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{kind}.{suffix}"))
}

struct Metadata<'a>(&'a HashMap<String, Value>);

impl Metadata<'_> {
    fn get(&self, key: &str) -> std::result::Result<&Value, String> {
        self.0
            .get(key)
            .ok_or_else(|| format!("missing metadata `{key}`"))
    }
    fn string(&self, key: &str) -> std::result::Result<String, String> {
        let v = self.get(key)?;
        v.to_string()
            .cloned()
            .map_err(|_| format!("`{key}` is not a string: a {:?}", v.value_type()))
    }
    fn usize(&self, key: &str) -> std::result::Result<usize, String> {
        let v = self.get(key)?;
        let n = match v {
            Value::U8(x) => *x as u64,
            Value::U16(x) => *x as u64,
            Value::U32(x) => *x as u64,
            Value::U64(x) => *x,
            Value::I32(x) if *x >= 0 => *x as u64,
            Value::I64(x) if *x >= 0 => *x as u64,
            other => {
                return Err(format!(
                    "`{key}` is not a count: a {:?}",
                    other.value_type()
                ));
            }
        };
        usize::try_from(n).map_err(|_| format!("`{key}` = {n} is too large"))
    }
    fn f64(&self, key: &str) -> std::result::Result<f64, String> {
        match self.get(key)? {
            Value::F32(x) => Ok(*x as f64),
            Value::F64(x) => Ok(*x),
            other => Err(format!(
                "`{key}` is not a float: a {:?}",
                other.value_type()
            )),
        }
    }
    /// An optional key: absent is `None`; present but of the wrong type is an error (a
    /// per-layer array where one number is expected, say), never the default.
    fn optional<T>(
        &self,
        key: &str,
        read: impl Fn(&Self, &str) -> std::result::Result<T, String>,
    ) -> std::result::Result<Option<T>, String> {
        if self.0.contains_key(key) {
            read(self, key).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// The config of a GGUF whose `general.architecture` is `declared` (its metadata keys'
/// prefix: a `mistral` file keeps `mistral.*` keys), run as `architecture`.
fn config_from_metadata(
    meta: &Metadata<'_>,
    content: &Content,
    architecture: Architecture,
    declared: &str,
) -> std::result::Result<ModelConfig, String> {
    let key = |k: &str| format!("{declared}.{k}");
    let hidden = meta.usize(&key("embedding_length"))?;
    let heads = meta.usize(&key("attention.head_count"))?;
    let kv_heads = meta
        .optional(&key("attention.head_count_kv"), Metadata::usize)?
        .unwrap_or(heads);
    let head_dim = match meta.optional(&key("attention.key_length"), Metadata::usize)? {
        Some(d) => d,
        None => meta
            .optional(&key("rope.dimension_count"), Metadata::usize)?
            .unwrap_or(hidden / heads.max(1)),
    };
    let vocab = match meta.get("tokenizer.ggml.tokens") {
        Ok(Value::Array(tokens)) => tokens.len(),
        _ => meta.usize(&key("vocab_size"))?,
    };
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err("per-frequency RoPE factors (rope_freqs.weight) are not supported".into());
    }
    let rope_scaling = match meta
        .optional(&key("rope.scaling.type"), Metadata::string)?
        .as_deref()
    {
        None | Some("none") => None,
        Some("linear") => Some(RopeScaling::Linear {
            factor: meta.f64(&key("rope.scaling.factor"))? as f32,
        }),
        Some(other) => return Err(format!("unsupported RoPE scaling `{other}`")),
    };
    let cfg = ModelConfig {
        architecture,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: meta.usize(&key("feed_forward_length"))?,
        num_layers: meta.usize(&key("block_count"))?,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        rope_theta: meta
            .optional(&key("rope.freq_base"), Metadata::f64)?
            .unwrap_or(10_000.0) as f32,
        rope_scaling,
        rms_norm_eps: meta.f64(&key("attention.layer_norm_rms_epsilon"))?,
        context_length: meta.usize(&key("context_length"))?,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        qkv_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
    };
    cfg.validate()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The row order kept blocks are permuted in is the one `unpermute_rows` applies.
    #[test]
    fn unpermuted_order_is_unpermute_rows_order() -> Result<()> {
        let (heads, rows, cols) = (3, 24, 5);
        let t = Tensor::arange(0f32, (rows * cols) as f32, &Device::Cpu)?.reshape((rows, cols))?;
        let want: Vec<Vec<f32>> = unpermute_rows(&t, heads)?.to_vec2()?;
        let all: Vec<Vec<f32>> = t.to_vec2()?;
        let got: Vec<Vec<f32>> = unpermuted_order(rows, heads)
            .into_iter()
            .map(|r| all[r].clone())
            .collect();
        assert_eq!(got, want);
        Ok(())
    }

    /// unpermute_rows inverts llama.cpp's permute: reshape(h, 2, d/2, in).swap(1, 2).
    #[test]
    fn unpermute_inverts_llama_cpp_permute() -> Result<()> {
        let (heads, d, inp) = (3, 8, 5);
        let w = Tensor::arange(0f32, (heads * d * inp) as f32, &Device::Cpu)?
            .reshape((heads * d, inp))?;
        let permuted = w
            .reshape((heads, 2, d / 2, inp))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((heads * d, inp))?;
        let back = unpermute_rows(&permuted, heads)?;
        assert_eq!(back.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
        Ok(())
    }

    #[test]
    fn names_map() {
        assert_eq!(
            gguf_name("model.layers.12.self_attn.k_proj.bias").as_deref(),
            Some("blk.12.attn_k.bias")
        );
        assert_eq!(
            gguf_name("model.layers.0.post_attention_layernorm.weight").as_deref(),
            Some("blk.0.ffn_norm.weight")
        );
        assert_eq!(gguf_name("model.layers.0.unknown.weight"), None);
    }
}
