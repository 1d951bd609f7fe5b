//! Who computed a KV object: the fingerprints and layout that go into every chunk key.
//!
//! Two processes running the same weights file, tokenizer, compute dtype and chunk encoding
//! derive the same [`ModelIdentity`], hence the same keys; change any of them and every key
//! changes, so a cache can never be served to a model that did not compute it.

use std::fs::File;
use std::path::Path;

use kvquilt_kvstore::{Fingerprint, KeyContext, KvDType, KvLayout, RopeScalingSpec};
use kvquilt_model::{
    ChatMessage, ChatTemplate, DType, LoadedModel, Model, ModelConfig, RopeScaling,
};

use crate::chunk::ChunkEncoding;
use crate::error::{Result, invalid};

/// The model-side inputs of a chunk key, computed once per loaded model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelIdentity {
    /// Architecture, every config value, the weights' BLAKE3, the compute dtype and the chunk
    /// encoding ([`ChunkEncoding::descriptor`]).
    pub model: [u8; 32],
    /// The tokenizer's serialized form (vocabulary, merges, pre-tokenizer, special tokens).
    pub tokenizer: [u8; 32],
    /// Shape and encoding of the KV the model produces.
    pub layout: KvLayout,
    /// How chunks are prefilled for storage; private so that it cannot drift from `model`
    /// (change it with [`ModelIdentity::with_encoding`]).
    encoding: ChunkEncoding,
    /// The weights' digest, kept to re-derive `model` under another encoding.
    weights: [u8; 32],
}

impl ModelIdentity {
    /// The identity of a loaded model; hashes its weights file(s) once (BLAKE3, ~1 GB/s).
    /// Chunks are encoded behind the token its prompts open with ([`prompt_opening`]), when
    /// it has one ([`ChunkEncoding::default_for`]).
    pub fn of(loaded: &LoadedModel) -> Result<Self> {
        let weights = weights_digest(&loaded.path)?;
        let tokenizer = match &loaded.tokenizer {
            Some(t) => {
                let json = t
                    .inner()
                    .to_string(false)
                    .map_err(|e| invalid(format!("serializing the tokenizer: {e}")))?;
                let mut eos = Vec::new();
                for id in t.eos_ids() {
                    eos.extend_from_slice(&id.to_le_bytes());
                }
                Fingerprint::new()
                    .field("tokenizer.json", json.as_bytes())
                    .field("eos", &eos)
                    .finish()
            }
            None => Fingerprint::new().field("tokenizer", b"none").finish(),
        };
        Self::from_parts(
            &loaded.model,
            &weights,
            tokenizer,
            ChunkEncoding::default_for(prompt_opening(loaded)),
        )
    }

    /// The identity of a model whose weights are named by `weights_id` rather than a file
    /// (random-weight models in tests and benchmarks: give the seed or shape name). Chunks
    /// are encoded alone (no tokenizer, no BOS).
    pub fn for_weights(model: &Model, weights_id: &str) -> Result<Self> {
        let weights = *blake3::hash(weights_id.as_bytes()).as_bytes();
        let tokenizer = Fingerprint::new().field("tokenizer", b"none").finish();
        Self::from_parts(model, &weights, tokenizer, ChunkEncoding::Alone)
    }

    /// How chunks are prefilled for storage (folded into `model`).
    pub fn encoding(&self) -> &ChunkEncoding {
        &self.encoding
    }

    /// The same model under another chunk encoding (its keys all differ).
    pub fn with_encoding(self, model: &Model, encoding: ChunkEncoding) -> Result<Self> {
        if let ChunkEncoding::Sink(s) = &encoding {
            let vocab = model.config().vocab_size;
            if s.is_empty() || s.iter().any(|&t| t as usize >= vocab) {
                return Err(invalid(format!(
                    "sink tokens {s:?}: need one or more ids below {vocab}"
                )));
            }
        }
        Self::from_parts(model, &self.weights, self.tokenizer, encoding)
    }

    fn from_parts(
        model: &Model,
        weights: &[u8; 32],
        tokenizer: [u8; 32],
        encoding: ChunkEncoding,
    ) -> Result<Self> {
        let layout = layout_of(model.config(), model.dtype())?;
        let fp = config_fields(Fingerprint::new(), model.config())
            .field("weights.blake3", weights)
            .field("compute_dtype", format!("{:?}", model.dtype()).as_bytes())
            .field("chunk_encoding", encoding.descriptor().as_bytes())
            .finish();
        Ok(Self {
            model: fp,
            tokenizer,
            layout,
            encoding,
            weights: *weights,
        })
    }

    /// The key context of one namespace (tenant salt; empty for the default namespace).
    pub fn key_context(&self, namespace: &[u8]) -> KeyContext {
        KeyContext::new(namespace, &self.model, &self.tokenizer, &self.layout)
    }
}

/// The special token every prompt of this model opens with, which chunks are prefilled
/// behind so that their KV forms around the attention sink they will have in the prompt: the
/// first token of the model's chat template (ChatML when it ships none, as the sidecar does)
/// rendered over one user message, when that token is a special one; else the tokenizer's
/// BOS. SmolLM2: `<|im_start|>`, which is also its BOS. Qwen2: `<|im_start|>`, not its BOS
/// `<|endoftext|>`, which its prompts never contain (BENCHMARKS.md §11).
pub fn prompt_opening(loaded: &LoadedModel) -> Option<u32> {
    let t = loaded.tokenizer.as_ref()?;
    let chatml;
    let template = match &loaded.chat_template {
        Some(c) => c,
        None => {
            chatml = ChatTemplate::chatml();
            &chatml
        }
    };
    let opening = template
        .render(&[ChatMessage::new("user", "x")], true)
        .ok()
        .and_then(|text| t.encode_piece(&text).ok())
        .and_then(|ids| ids.first().copied())
        .filter(|&id| t.decode(&[id], true).is_ok_and(|s| s.is_empty()));
    opening.or_else(|| t.bos_id())
}

/// The KV layout a model of `config` computing in `dtype` produces (K always pre-RoPE).
pub fn layout_of(config: &ModelConfig, dtype: DType) -> Result<KvLayout> {
    let dtype = match dtype {
        DType::F32 => KvDType::F32,
        DType::F16 => KvDType::F16,
        DType::BF16 => KvDType::BF16,
        other => return Err(invalid(format!("no KV object dtype for {other:?}"))),
    };
    let rope_scaling = match config.rope_scaling {
        None => RopeScalingSpec::None,
        Some(RopeScaling::Linear { factor }) => RopeScalingSpec::Linear { factor },
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => RopeScalingSpec::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: original_max_position_embeddings as u32,
        },
    };
    Ok(KvLayout {
        num_layers: config.num_layers as u32,
        num_kv_heads: config.num_kv_heads as u32,
        head_dim: config.head_dim as u32,
        dtype,
        k_pre_rope: true,
        rope_theta: config.rope_theta,
        rope_scaling,
    })
}

/// Every config value, each as a named little-endian field.
fn config_fields(fp: Fingerprint, c: &ModelConfig) -> Fingerprint {
    let u = |v: usize| (v as u64).to_le_bytes();
    fp.field("architecture", c.architecture.name().as_bytes())
        .field("vocab_size", &u(c.vocab_size))
        .field("hidden_size", &u(c.hidden_size))
        .field("intermediate_size", &u(c.intermediate_size))
        .field("num_layers", &u(c.num_layers))
        .field("num_heads", &u(c.num_heads))
        .field("num_kv_heads", &u(c.num_kv_heads))
        .field("head_dim", &u(c.head_dim))
        .field("rope_theta", &c.rope_theta.to_le_bytes())
        .field("rope_scaling", format!("{:?}", c.rope_scaling).as_bytes())
        .field("rms_norm_eps", &c.rms_norm_eps.to_le_bytes())
        .field("context_length", &u(c.context_length))
        .field("tie_word_embeddings", &[c.tie_word_embeddings as u8])
        .field("qkv_bias", &[c.qkv_bias as u8])
}

/// BLAKE3 of a GGUF file, or of an HF directory's `config.json` and `*.safetensors` files
/// (names and contents, in name order).
fn weights_digest(path: &Path) -> Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    if path.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(path)?
            .collect::<std::io::Result<Vec<_>>>()?
            .into_iter()
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|e| e == "safetensors")
                    || p.file_name().is_some_and(|n| n == "config.json")
            })
            .collect();
        files.sort();
        for f in files {
            let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
            h.update(name.unwrap_or_default().as_bytes());
            h.update_reader(File::open(&f)?)?;
        }
    } else {
        h.update_reader(File::open(path)?)?;
    }
    Ok(*h.finalize().as_bytes())
}
