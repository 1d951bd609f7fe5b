//! A sentence embedder: a BERT encoder with mean pooling and L2 normalisation, as
//! sentence-transformers runs all-MiniLM-L6-v2 (the embedder EpiCache segments
//! conversations with; fetched by [`crate::fetch::ALL_MINILM_L6_V2`]).
//!
//! The forward pass is BERT's (post-LayerNorm): word + position + token-type embeddings,
//! LayerNorm; per layer, bidirectional multi-head attention, a dense projection added to
//! the input and normalised, then a GELU (erf) feed-forward added and normalised. The
//! sentence vector is the mean of the last hidden states over the text's tokens (each text
//! runs alone, so there is no padding to mask), scaled to unit length. Texts longer than
//! [`Embedder::MAX_TOKENS`] are truncated, as sentence-transformers does for this model.
//!
//! Pinned against an independent re-derivation (`scripts/minilm_reference.py`, numpy) by
//! `model/tests/embed.rs`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear};
use serde::Deserialize;

use crate::error::{ModelError, Result, invalid_input};

/// The subset of a BERT `config.json` the encoder needs.
#[derive(Debug, Clone, Deserialize)]
struct BertConfig {
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    layer_norm_eps: f64,
    #[serde(default)]
    hidden_act: Option<String>,
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    up: Linear,
    down: Linear,
    out_norm: LayerNorm,
}

/// A loaded sentence embedder. Vectors are f32 of [`Embedder::dim`] elements, unit length.
pub struct Embedder {
    words: Embedding,
    positions: Embedding,
    token_types: Embedding,
    embed_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    hidden: usize,
    max_tokens: usize,
    tokenizer: tokenizers::Tokenizer,
    device: Device,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("hidden", &self.hidden)
            .field("layers", &self.layers.len())
            .field("heads", &self.heads)
            .finish()
    }
}

impl Embedder {
    /// Tokens per text, `[CLS]` and `[SEP]` included (sentence-transformers' `max_seq_length`
    /// for all-MiniLM-L6-v2).
    pub const MAX_TOKENS: usize = 256;

    /// Loads `dir` (`config.json`, `model.safetensors`, `tokenizer.json`) onto `device`, in
    /// f32.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let invalid = |reason: String| ModelError::InvalidModel {
            path: dir.to_path_buf(),
            reason,
        };
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ModelError::Io { path, source }
        };
        let cfg_path = dir.join("config.json");
        let raw = std::fs::read_to_string(&cfg_path).map_err(io(&cfg_path))?;
        let cfg: BertConfig =
            serde_json::from_str(&raw).map_err(|e| invalid(format!("config.json: {e}")))?;
        if cfg.hidden_act.as_deref().is_some_and(|a| a != "gelu") {
            return Err(invalid(format!(
                "hidden_act {:?} (the encoder runs gelu)",
                cfg.hidden_act
            )));
        }
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(invalid(format!(
                "hidden size {} over {} heads",
                cfg.hidden_size, cfg.num_attention_heads
            )));
        }
        let st_path = dir.join("model.safetensors");
        let tensors = candle_core::safetensors::load(&st_path, device)
            .map_err(|e| invalid(format!("model.safetensors: {e}")))?;
        let mut w = Named {
            tensors,
            eps: cfg.layer_norm_eps,
            dir,
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                Ok(Layer {
                    query: w.linear(&format!("{p}.attention.self.query"))?,
                    key: w.linear(&format!("{p}.attention.self.key"))?,
                    value: w.linear(&format!("{p}.attention.self.value"))?,
                    attn_out: w.linear(&format!("{p}.attention.output.dense"))?,
                    attn_norm: w.norm(&format!("{p}.attention.output.LayerNorm"))?,
                    up: w.linear(&format!("{p}.intermediate.dense"))?,
                    down: w.linear(&format!("{p}.output.dense"))?,
                    out_norm: w.norm(&format!("{p}.output.LayerNorm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let h = cfg.hidden_size;
        let words = Embedding::new(w.take("embeddings.word_embeddings.weight")?, h);
        let positions = Embedding::new(w.take("embeddings.position_embeddings.weight")?, h);
        let token_types = Embedding::new(w.take("embeddings.token_type_embeddings.weight")?, h);
        let embed_norm = w.norm("embeddings.LayerNorm")?;
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        let max_tokens = Self::MAX_TOKENS.min(cfg.max_position_embeddings);
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(Self {
            words,
            positions,
            token_types,
            embed_norm,
            layers,
            heads: cfg.num_attention_heads,
            hidden: cfg.hidden_size,
            max_tokens,
            tokenizer,
            device: device.clone(),
        })
    }

    /// Elements per vector.
    pub fn dim(&self) -> usize {
        self.hidden
    }

    /// Token ids of `text` as the encoder sees it (`[CLS]` … `[SEP]`, truncated).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The unit-length embedding of each text, in order.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        texts.iter().map(|t| self.embed_one(t)).collect()
    }

    fn embed_one(&self, text: &str) -> Result<Vec<f32>> {
        let ids = self.tokenize(text)?;
        if ids.is_empty() || ids.len() > self.max_tokens {
            return Err(invalid_input(format!(
                "{} tokens for the embedder (1..={})",
                ids.len(),
                self.max_tokens
            )));
        }
        let n = ids.len();
        let ids_t = Tensor::new(ids.as_slice(), &self.device)?;
        let pos = Tensor::arange(0u32, n as u32, &self.device)?;
        let types = Tensor::zeros(n, DType::U32, &self.device)?;
        let x = self.words.forward(&ids_t)?
            + self.positions.forward(&pos)?
            + self.token_types.forward(&types)?;
        let mut x = self.embed_norm.forward(&x?)?;
        let (h, d) = (self.heads, self.hidden / self.heads);
        let scale = 1.0 / (d as f64).sqrt();
        for l in &self.layers {
            let split = |t: Tensor| -> Result<Tensor> {
                Ok(t.reshape((n, h, d))?.transpose(0, 1)?.contiguous()?)
            };
            let q = split(l.query.forward(&x)?)?;
            let k = split(l.key.forward(&x)?)?;
            let v = split(l.value.forward(&x)?)?;
            let scores = (q.matmul(&k.t()?)? * scale)?;
            let p = candle_nn::ops::softmax_last_dim(&scores)?;
            let ctx = p.matmul(&v)?.transpose(0, 1)?.reshape((n, self.hidden))?;
            let a = l.attn_norm.forward(&(l.attn_out.forward(&ctx)? + &x)?)?;
            let f = l.down.forward(&l.up.forward(&a)?.gelu_erf()?)?;
            x = l.out_norm.forward(&(f + &a)?)?;
        }
        let mean = x.mean(0)?;
        let norm = mean.sqr()?.sum_all()?.sqrt()?;
        let unit = mean.broadcast_div(&norm)?;
        Ok(unit.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    }
}

/// Cosine similarity of two unit vectors (their dot product).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// A model's tensors by name, taken out one by one as f32.
struct Named<'a> {
    tensors: HashMap<String, Tensor>,
    eps: f64,
    dir: &'a Path,
}

impl Named<'_> {
    fn take(&mut self, name: &str) -> Result<Tensor> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| ModelError::InvalidModel {
                path: self.dir.to_path_buf(),
                reason: format!("tensor `{name}` missing"),
            })?;
        Ok(t.to_dtype(DType::F32)?)
    }

    fn linear(&mut self, prefix: &str) -> Result<Linear> {
        Ok(Linear::new(
            self.take(&format!("{prefix}.weight"))?,
            Some(self.take(&format!("{prefix}.bias"))?),
        ))
    }

    fn norm(&mut self, prefix: &str) -> Result<LayerNorm> {
        Ok(LayerNorm::new(
            self.take(&format!("{prefix}.weight"))?,
            self.take(&format!("{prefix}.bias"))?,
            self.eps,
        ))
    }
}
