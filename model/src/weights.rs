//! The parameter tensors of a decoder, fused for the forward pass.
//!
//! Loaders hand tensors over by their HF names (`model.layers.3.self_attn.q_proj.weight`, ...)
//! in HF layout (`[out_features, in_features]`, rotate_half RoPE convention); this module
//! checks every shape against the config and fuses Q/K/V and gate/up into single matrices so
//! that a layer needs three matrix products before attention and two after.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, TensorId};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::quant::BlockRows;

/// One decoder layer's parameters.
#[derive(Debug, Clone)]
pub(crate) struct LayerWeights {
    /// RMSNorm scale before attention, `[hidden]`.
    pub attn_norm: Tensor,
    /// Q, K and V projections stacked: `[(num_heads + 2 * num_kv_heads) * head_dim, hidden]`.
    pub wqkv: Tensor,
    /// Their biases (Qwen2), `[(num_heads + 2 * num_kv_heads) * head_dim]`.
    pub bqkv: Option<Tensor>,
    /// Output projection, `[hidden, num_heads * head_dim]`.
    pub wo: Tensor,
    /// RMSNorm scale before the MLP, `[hidden]`.
    pub mlp_norm: Tensor,
    /// Gate and up projections stacked: `[2 * intermediate, hidden]`.
    pub wgate_up: Tensor,
    /// Down projection, `[hidden, intermediate]`.
    pub wdown: Tensor,
}

/// All parameters of a model.
#[derive(Debug, Clone)]
pub(crate) struct Weights {
    /// Token embeddings, `[vocab, hidden]`.
    pub embed: Tensor,
    pub layers: Vec<LayerWeights>,
    /// Final RMSNorm scale, `[hidden]`.
    pub norm: Tensor,
    /// Output projection, `[vocab, hidden]` (the embedding matrix when tied).
    pub lm_head: Tensor,
    /// The projections whose GGUF blocks are kept beside their f32 copies (a CPU model in
    /// f32 loaded from Q4_1/Q8_0 tensors), by the f32 tensor's id: a decode step's few rows
    /// read the blocks ([`BlockRows::linear`]).
    pub blocks: HashMap<TensorId, BlockRows>,
}

/// Looks a tensor up by HF name and the shape [`Weights::load`] expects of it (with its GGUF
/// blocks where it has kept ones); `Ok(None)` when the source does not have it. A source
/// refuses a tensor whose declared shape differs *before* reading or dequantising its data
/// ([`wrong_shape`]): a wrong-shaped quantised tensor would otherwise grow ~8–12× first.
pub(crate) type TensorSource<'a> =
    dyn FnMut(&str, &[usize]) -> Result<Option<(Tensor, Option<BlockRows>)>> + 'a;

/// The error for tensor `name` of shape `got` where `want` was expected, in the file or
/// directory `origin`.
pub(crate) fn wrong_shape(
    origin: &std::path::Path,
    name: &str,
    got: &[usize],
    want: &[usize],
) -> ModelError {
    ModelError::InvalidModel {
        path: origin.to_path_buf(),
        reason: format!("tensor `{name}` has shape {got:?}, expected {want:?}"),
    }
}

impl Weights {
    /// Builds the weights from a source of HF-named tensors, converting to `dtype` on `device`.
    /// `origin` names the file or directory in error messages.
    pub(crate) fn load(
        cfg: &ModelConfig,
        dtype: DType,
        device: &Device,
        origin: &std::path::Path,
        source: &mut TensorSource<'_>,
    ) -> Result<Self> {
        // blocks serve f32 projections on the CPU only
        let keep_blocks = dtype == DType::F32 && device.is_cpu();
        let mut got_blocks: HashMap<String, BlockRows> = HashMap::new();
        let mut get = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let (t, blocks) = source(name, shape)?.ok_or_else(|| ModelError::InvalidModel {
                path: origin.to_path_buf(),
                reason: format!("missing tensor `{name}`"),
            })?;
            // (sources check declared shapes first; this holds whatever a source did)
            if t.dims() != shape {
                return Err(wrong_shape(origin, name, t.dims(), shape));
            }
            if let (true, Some(b)) = (keep_blocks, blocks) {
                got_blocks.insert(name.to_string(), b);
            }
            Ok(t.to_dtype(dtype)?.to_device(device)?)
        };
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (qd, kvd) = (cfg.num_heads * d, cfg.num_kv_heads * d);
        let embed = get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let q = get(&format!("{p}.self_attn.q_proj.weight"), &[qd, h])?;
            let k = get(&format!("{p}.self_attn.k_proj.weight"), &[kvd, h])?;
            let v = get(&format!("{p}.self_attn.v_proj.weight"), &[kvd, h])?;
            let bqkv = if cfg.qkv_bias {
                let qb = get(&format!("{p}.self_attn.q_proj.bias"), &[qd])?;
                let kb = get(&format!("{p}.self_attn.k_proj.bias"), &[kvd])?;
                let vb = get(&format!("{p}.self_attn.v_proj.bias"), &[kvd])?;
                Some(Tensor::cat(&[qb, kb, vb], 0)?)
            } else {
                None
            };
            let gate = get(
                &format!("{p}.mlp.gate_proj.weight"),
                &[cfg.intermediate_size, h],
            )?;
            let up = get(
                &format!("{p}.mlp.up_proj.weight"),
                &[cfg.intermediate_size, h],
            )?;
            layers.push(LayerWeights {
                attn_norm: get(&format!("{p}.input_layernorm.weight"), &[h])?,
                wqkv: Tensor::cat(&[q, k, v], 0)?,
                bqkv,
                wo: get(&format!("{p}.self_attn.o_proj.weight"), &[h, qd])?,
                mlp_norm: get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                wgate_up: Tensor::cat(&[gate, up], 0)?,
                wdown: get(
                    &format!("{p}.mlp.down_proj.weight"),
                    &[h, cfg.intermediate_size],
                )?,
            });
        }
        let norm = get("model.norm.weight", &[h])?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            get("lm_head.weight", &[cfg.vocab_size, h])?
        };
        // each projection's blocks, stacked as its f32 copy was
        let mut blocks = HashMap::new();
        let mut keep = |t: &Tensor, parts: &[String]| {
            let found: Option<Vec<&BlockRows>> = parts.iter().map(|p| got_blocks.get(p)).collect();
            if let Some(b) = found.and_then(|f| BlockRows::cat(&f))
                && b.rows() == t.dims()[0]
            {
                blocks.insert(t.id(), b);
            }
        };
        for (i, l) in layers.iter().enumerate() {
            let p = |m: &str| format!("model.layers.{i}.{m}.weight");
            keep(
                &l.wqkv,
                &[
                    p("self_attn.q_proj"),
                    p("self_attn.k_proj"),
                    p("self_attn.v_proj"),
                ],
            );
            keep(&l.wo, &[p("self_attn.o_proj")]);
            keep(&l.wgate_up, &[p("mlp.gate_proj"), p("mlp.up_proj")]);
            keep(&l.wdown, &[p("mlp.down_proj")]);
        }
        let head = match cfg.tie_word_embeddings {
            true => "model.embed_tokens.weight",
            false => "lm_head.weight",
        };
        keep(&lm_head, &[head.to_string()]);
        Ok(Self {
            embed,
            layers,
            norm,
            lm_head,
            blocks,
        })
    }

    /// Random weights of the config's shape: linear layers and embeddings N(0, 0.02²), norms 1,
    /// biases 0.02·N(0,1). For benchmarks and tests, where values do not matter.
    pub(crate) fn random(cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<Self> {
        let normal = |shape: &[usize]| -> Result<Tensor> {
            Ok(Tensor::randn(0f32, 0.02, shape, device)?.to_dtype(dtype)?)
        };
        let ones = |n: usize| -> Result<Tensor> { Ok(Tensor::ones(n, dtype, device)?) };
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * d;
        let embed = normal(&[cfg.vocab_size, h])?;
        let layers = (0..cfg.num_layers)
            .map(|_| {
                Ok(LayerWeights {
                    attn_norm: ones(h)?,
                    wqkv: normal(&[qkv, h])?,
                    bqkv: if cfg.qkv_bias {
                        Some(normal(&[qkv])?)
                    } else {
                        None
                    },
                    wo: normal(&[h, cfg.num_heads * d])?,
                    mlp_norm: ones(h)?,
                    wgate_up: normal(&[2 * cfg.intermediate_size, h])?,
                    wdown: normal(&[h, cfg.intermediate_size])?,
                })
            })
            .collect::<Result<_>>()?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            normal(&[cfg.vocab_size, h])?
        };
        Ok(Self {
            embed,
            layers,
            norm: ones(h)?,
            lm_head,
            blocks: HashMap::new(),
        })
    }
}
