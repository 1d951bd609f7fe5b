//! Model hyper-parameters, read from GGUF metadata or an HF `config.json`.

use serde::{Deserialize, Serialize};

/// The decoder architectures kvquilt runs. Both are pre-norm decoders with RMSNorm, rotary
/// position embeddings (HF "rotate_half" convention throughout, see [`crate::Rope`]),
/// grouped-query attention and a SwiGLU MLP; Qwen2 adds a bias to the Q, K and V projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama (Mistral checkpoints load as this too); by default no Q/K/V biases.
    Llama,
    /// Qwen2: Llama's layout plus biases on the Q, K and V projections.
    Qwen2,
}

impl Architecture {
    /// Parses the name used by GGUF's `general.architecture` and HF's `model_type`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "llama" | "mistral" => Some(Self::Llama),
            "qwen2" => Some(Self::Qwen2),
            _ => None,
        }
    }

    /// The canonical name (`llama`, `qwen2`), as GGUF and HF spell it; part of a model's
    /// fingerprint, so it must not change.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
        }
    }
}

/// How rotary frequencies are adjusted for long context.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Positions divided by `factor` (HF "linear").
    Linear {
        /// Divisor of every rotary frequency (> 1 stretches the context).
        factor: f32,
    },
    /// Llama 3.1's piecewise frequency scaling (HF "llama3").
    Llama3 {
        /// Divisor of the low frequencies (wavelengths longer than
        /// `original_max_position_embeddings / low_freq_factor` positions).
        factor: f32,
        /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are fully
        /// scaled by `factor`.
        low_freq_factor: f32,
        /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are left
        /// as they are; those in between are interpolated.
        high_freq_factor: f32,
        /// The context length, in tokens, the model was pre-trained with before scaling.
        original_max_position_embeddings: usize,
    },
}

/// The longest context a model may declare, in tokens: a model's RoPE tables are built for
/// its whole context when it loads (4 Mi positions: 2 GiB of f32 tables at head dim 128).
pub const MAX_CONTEXT: usize = 1 << 22;

/// The most decoder layers a model may declare.
pub const MAX_LAYERS: usize = 1024;

/// The most elements of one weight matrix a model's sizes may imply (2^40).
const MAX_MATRIX: usize = 1 << 40;

/// The most elements one RoPE table (cos or sin: `context_length` rows of `head_dim / 2`)
/// may hold, 2²⁸ (1 GiB in f32): the tables are built at load for the whole context, before
/// any tensor is read, so a small file must not size them (Llama-3.1-8B's 131,072 × 64 is
/// 2²³).
const MAX_ROPE_TABLE: usize = 1 << 28;

impl RopeScaling {
    /// Finite factors above 0; for Llama 3's, `high_freq_factor > low_freq_factor` (the
    /// interpolation divides by their difference) and an original context above 0.
    pub fn validate(&self) -> Result<(), String> {
        let factor_ok = |f: f32| f.is_finite() && f > 0.0;
        let ok = match *self {
            Self::Linear { factor } => factor_ok(factor),
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                [factor, low_freq_factor, high_freq_factor]
                    .into_iter()
                    .all(factor_ok)
                    && high_freq_factor > low_freq_factor
                    && original_max_position_embeddings > 0
            }
        };
        if ok {
            return Ok(());
        }
        Err(match *self {
            Self::Linear { factor } => {
                format!("linear rope_scaling needs a finite factor > 0, not factor {factor}")
            }
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => format!(
                "llama3 rope_scaling needs finite factors > 0, high_freq_factor > \
                 low_freq_factor and original_max_position_embeddings > 0: factor {factor}, \
                 low {low_freq_factor}, high {high_freq_factor}, original \
                 {original_max_position_embeddings}"
            ),
        })
    }
}

/// Everything the forward pass needs to know about a model's shape.
///
/// Units: all sizes are element counts; `rope_theta` is the RoPE base; `context_length` is in
/// tokens (the largest absolute position + 1 the model was trained for).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Which decoder layout the weights follow.
    pub architecture: Architecture,
    /// Token ids are `0..vocab_size`; also the width of the logits.
    pub vocab_size: usize,
    /// Width of the residual stream (embeddings, hidden states).
    pub hidden_size: usize,
    /// Width of the MLP's gate and up projections.
    pub intermediate_size: usize,
    /// Decoder layers; a [`crate::KvCache`] of this model holds one entry per layer.
    pub num_layers: usize,
    /// Query heads per layer; a multiple of `num_kv_heads`.
    pub num_heads: usize,
    /// Key/value heads per layer (grouped-query attention).
    pub num_kv_heads: usize,
    /// Elements per attention head, for queries, keys and values alike; even (RoPE pairs).
    pub head_dim: usize,
    /// RoPE base: pair `i` rotates by `position × rope_theta^(-2i/head_dim)` radians (before
    /// `rope_scaling`); finite and > 1.
    pub rope_theta: f32,
    /// Long-context adjustment of the rotary frequencies, if any.
    pub rope_scaling: Option<RopeScaling>,
    /// Epsilon added to the mean square in every RMSNorm.
    pub rms_norm_eps: f64,
    /// Context window in tokens: absolute positions run `0..context_length`.
    pub context_length: usize,
    /// The output projection reuses the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// Q, K and V projections carry a bias (Qwen2).
    pub qkv_bias: bool,
}

impl ModelConfig {
    /// Query heads per KV head (the GQA group size).
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Checks the relations the forward pass relies on.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("context_length", self.context_length),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_heads {} is not a multiple of num_kv_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(format!(
                "rope_theta {} must be finite and > 1",
                self.rope_theta
            ));
        }
        // bounds on what sizes allocations before any tensor is read: the position tables
        // (`context_length` rows) and the layer list
        if self.context_length > MAX_CONTEXT {
            return Err(format!(
                "context_length {} is past the {MAX_CONTEXT} tokens kvquilt supports",
                self.context_length
            ));
        }
        if self.num_layers > MAX_LAYERS {
            return Err(format!(
                "num_layers {} is past the {MAX_LAYERS} kvquilt supports",
                self.num_layers
            ));
        }
        let half = self.head_dim / 2;
        if self
            .context_length
            .checked_mul(half)
            .is_none_or(|n| n > MAX_ROPE_TABLE)
        {
            return Err(format!(
                "context_length × head_dim / 2 = {} × {half} is past the {MAX_ROPE_TABLE} elements a RoPE table may hold",
                self.context_length
            ));
        }
        for (name, a, b) in [
            (
                "vocab_size × hidden_size",
                self.vocab_size,
                self.hidden_size,
            ),
            (
                "intermediate_size × hidden_size",
                self.intermediate_size,
                self.hidden_size,
            ),
            ("num_heads × head_dim", self.num_heads, self.head_dim),
        ] {
            if a.checked_mul(b).is_none_or(|n| n > MAX_MATRIX) {
                return Err(format!("{name} = {a} × {b} is past what a tensor can hold"));
            }
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(format!(
                "rms_norm_eps {} must be finite and ≥ 0",
                self.rms_norm_eps
            ));
        }
        if let Some(scaling) = &self.rope_scaling {
            scaling.validate()?;
        }
        Ok(())
    }

    /// The shape of Llama-3.1-8B (random weights of this shape are used for GPU benchmarks;
    /// performance does not depend on weight values).
    pub fn llama31_8b() -> Self {
        Self {
            architecture: Architecture::Llama,
            vocab_size: 128_256,
            hidden_size: 4096,
            intermediate_size: 14_336,
            num_layers: 32,
            num_heads: 32,
            num_kv_heads: 8,
            head_dim: 128,
            rope_theta: 500_000.0,
            rope_scaling: Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            }),
            rms_norm_eps: 1e-5,
            context_length: 131_072,
            tie_word_embeddings: false,
            qkv_bias: false,
        }
    }
}

impl ModelConfig {
    /// The shape of SmolLM2-135M-Instruct, the default model (for GPU benchmarks of the small
    /// model with random weights of its shape).
    pub fn smollm2_135m() -> Self {
        Self {
            architecture: Architecture::Llama,
            vocab_size: 49_152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            rope_theta: 100_000.0,
            rope_scaling: None,
            rms_norm_eps: 1e-5,
            context_length: 8192,
            tie_word_embeddings: true,
            qkv_bias: false,
        }
    }
}

/// The subset of an HF `config.json` that kvquilt reads.
#[derive(Debug, Deserialize)]
pub(crate) struct HfConfig {
    pub model_type: Option<String>,
    pub architectures: Option<Vec<String>>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rope_theta: Option<f32>,
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5 folds `rope_theta` and `rope_scaling` into this object.
    pub rope_parameters: Option<serde_json::Value>,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub attention_bias: Option<bool>,
}

impl HfConfig {
    pub(crate) fn to_config(&self) -> Result<ModelConfig, String> {
        let arch_name = self
            .model_type
            .clone()
            .or_else(|| {
                self.architectures.as_ref().and_then(|a| {
                    a.first().map(|s| {
                        s.trim_end_matches("ForCausalLM")
                            .to_ascii_lowercase()
                            .to_string()
                    })
                })
            })
            .ok_or("config.json names no model_type")?;
        let architecture = Architecture::from_name(&arch_name)
            .ok_or_else(|| format!("unsupported architecture `{arch_name}`"))?;
        let rope_obj = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let rope_theta = self
            .rope_theta
            .or_else(|| {
                self.rope_parameters
                    .as_ref()
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(|v| v.as_f64())
                    .map(|v| v as f32)
            })
            .unwrap_or(10_000.0);
        let rope_scaling = match rope_obj {
            Some(v) => parse_rope_scaling(v)?,
            None => None,
        };
        let num_kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        // (0 heads is refused by `validate` below, not divided by)
        let head_dim = self
            .head_dim
            .unwrap_or_else(|| self.hidden_size / self.num_attention_heads.max(1));
        let cfg = ModelConfig {
            architecture,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads,
            head_dim,
            rope_theta,
            rope_scaling,
            rms_norm_eps: self.rms_norm_eps,
            context_length: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: self
                .attention_bias
                .unwrap_or(architecture == Architecture::Qwen2),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

fn parse_rope_scaling(v: &serde_json::Value) -> Result<Option<RopeScaling>, String> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let num = |key: &str| v.get(key).and_then(|x| x.as_f64());
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: num("factor").ok_or("linear rope scaling without factor")? as f32,
        })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: num("factor").ok_or("llama3 rope scaling without factor")? as f32,
            low_freq_factor: num("low_freq_factor").unwrap_or(1.0) as f32,
            high_freq_factor: num("high_freq_factor").unwrap_or(4.0) as f32,
            original_max_position_embeddings: num("original_max_position_embeddings")
                .unwrap_or(8192.0) as usize,
        })),
        other => Err(format!("unsupported rope scaling `{other}`")),
    }
}
