//! The one place that decides how a chunk becomes a stored object.
//!
//! The batch job, the HTTP API and blend's store-back all go through [`ChunkCodec`]; a second
//! copy of any rule here is how caches silently stop matching. The contract
//! ([`ChunkEncoding::descriptor`], folded into every key through [`crate::ModelIdentity`]):
//!
//! - **Tokenisation**: a chunk's text is tokenised alone, with no BOS and with special tokens
//!   written in the text matched ([`ChunkCodec::tokenize`]). Callers that already hold token
//!   ids pass them as they are.
//! - **Positions and context** ([`ChunkEncoding`]): under `Sink(s)` (the default: `s` =
//!   [the special token the model's prompts open with, else its BOS],
//!   [`crate::prompt_opening`]), a chunk is prefilled behind the sink tokens, `s ‖ chunk` at
//!   positions `0..S+T`, and only its own `T` rows are kept; a chunk that already begins
//!   with `s` is prefilled alone. Under `Alone` (CacheBlend's encoding, and the default for a
//!   model with neither, e.g. one without a tokenizer) it is prefilled alone at `0..T`.
//!   Either way a chunk attends only to itself (and the sink), never to other chunks.
//! - **Stored KV**: per layer, K before RoPE and V, `[T, kv_heads, head_dim]`, in the model's
//!   compute dtype; blending places the keys at new positions by rotation.
//! - **Key**: [`kvquilt_kvstore::KeyContext::chunk_key`] of the token ids, in the context of
//!   the model identity (which includes the encoding) and the caller's namespace.
//!
//! Prefix objects (exact prefix reuse) follow a second rule: segment `i` of a prompt is
//! prefilled over the KV of segments `0..i` at its absolute positions, and stored under the
//! prefix-chained key of segments `0..=i` ([`ChunkCodec::prefix_keys`]).

use std::time::{Duration, Instant};

use kvquilt_kvstore::{
    ChainLink, ChunkKey, KeyContext, KvLayout, KvObject, ObjectInfo, prefix_key,
};
use kvquilt_model::{KvCache, Model, Tokenizer, positions};

use crate::error::{BlendError, Result, invalid};
use crate::identity::ModelIdentity;
use crate::tensor_bytes::{layer_from_bytes, layer_to_bytes};

/// Names the encoding rules above; with the [`ChunkEncoding`] it is part of the model
/// fingerprint, so changing the rules changes every key.
pub const CHUNK_ENCODING: &str = "kvquilt.chunk.v2: K pre-RoPE";

/// What a chunk is prefilled behind.
///
/// A chunk prefilled alone turns its own first tokens into attention sinks: every token of
/// it dumps attention there, which a chunk in the middle of a real prompt never does (the
/// prompt's first token is the sink). Prefilling behind the token the model's prompts open
/// with gives the chunk the sink it will have in the prompt, so its KV is closer to what full
/// prefill computes (measured: BENCHMARKS.md §3 for SmolLM2, §11 for Qwen2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkEncoding {
    /// Alone at positions `0..T` (CacheBlend, TurboRAG).
    Alone,
    /// Behind these tokens (non-empty), which are not stored.
    Sink(Vec<u32>),
}

impl ChunkEncoding {
    /// `Sink([t])` for the token `t` the model's prompts open with
    /// ([`crate::prompt_opening`]: its chat template's first special token, else its BOS),
    /// else `Alone`.
    pub fn default_for(opening: Option<u32>) -> Self {
        match opening {
            Some(b) => Self::Sink(vec![b]),
            None => Self::Alone,
        }
    }

    /// The canonical description folded into the model fingerprint.
    pub fn descriptor(&self) -> String {
        match self {
            Self::Alone => format!("{CHUNK_ENCODING}; alone at 0..T"),
            Self::Sink(s) => {
                let ids: Vec<String> = s.iter().map(u32::to_string).collect();
                format!("{CHUNK_ENCODING}; behind sink [{}]", ids.join(","))
            }
        }
    }

    /// The tokens `chunk` is prefilled behind (empty: alone).
    pub fn sink_for(&self, chunk: &[u32]) -> &[u32] {
        match self {
            Self::Sink(s) if !chunk.starts_with(s) => s,
            _ => &[],
        }
    }

    /// Whether a chunk's stored KV is exactly what full prefill computes when the chunk opens
    /// a prompt (position 0): true when it was prefilled alone.
    pub fn exact_at_start(&self, chunk: &[u32]) -> bool {
        self.sink_for(chunk).is_empty()
    }
}

/// Turns chunks into keys and stored objects, and stored objects back into KV, for one model
/// and one namespace.
#[derive(Debug, Clone)]
pub struct ChunkCodec {
    identity: ModelIdentity,
    keys: KeyContext,
}

impl ChunkCodec {
    /// `namespace` salts every key (a tenant's keys never match another tenant's).
    pub fn new(identity: ModelIdentity, namespace: &[u8]) -> Self {
        let keys = identity.key_context(namespace);
        Self { identity, keys }
    }

    /// The model identity every key and object of this codec is made under.
    pub fn identity(&self) -> &ModelIdentity {
        &self.identity
    }

    /// The layout of the objects this codec makes and accepts.
    pub fn layout(&self) -> &KvLayout {
        &self.identity.layout
    }

    /// Token ids of a chunk's text: alone, no BOS, special tokens in the text matched.
    pub fn tokenize(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
        Ok(tokenizer.encode_piece(text)?)
    }

    /// The content-addressed key of a chunk.
    pub fn key(&self, tokens: &[u32]) -> ChunkKey {
        self.keys.chunk_key(tokens)
    }

    /// The links of the chain named by `keys` ([`ChunkCodec::prefix_keys`]), parallel to
    /// them: each link's parent is the key before it, the first's this codec's prefix root.
    /// What a stored link records of its name ([`ChunkCodec::to_object`]).
    pub fn chain(&self, keys: &[ChunkKey]) -> Vec<ChainLink> {
        let root = self.keys.prefix_root();
        std::iter::once(root)
            .chain(keys.iter().copied())
            .take(keys.len())
            .map(|parent| ChainLink { root, parent })
            .collect()
    }

    /// Whether `info`'s key is this codec's name for what it holds: the chunk key of its
    /// tokens, or, for a link of a prefix chain, a link rooted in this codec's context (its
    /// model and namespace) whose parent and tokens derive its key. A link written before
    /// format v6 records no chain and is named by no codec.
    pub fn names(&self, info: &ObjectInfo) -> bool {
        match &info.chain {
            Some(link) => {
                link.root == self.keys.prefix_root() && link.key(&info.tokens) == info.key
            }
            None => self.key(&info.tokens) == info.key,
        }
    }

    /// Prefix-chained keys of consecutive segments: entry `i` names segments `0..=i`.
    pub fn prefix_keys(&self, segments: &[&[u32]]) -> Vec<ChunkKey> {
        let mut parent = self.keys.prefix_root();
        segments
            .iter()
            .map(|s| {
                parent = prefix_key(&parent, s);
                parent
            })
            .collect()
    }

    /// How this codec prefills chunks (the identity's encoding).
    pub fn encoding(&self) -> &ChunkEncoding {
        self.identity.encoding()
    }

    /// Prefills a chunk by the [`ChunkEncoding`]; returns its KV at positions `0..T` and the
    /// time taken.
    pub fn prefill(&self, model: &Model, tokens: &[u32]) -> Result<(KvCache, Duration)> {
        if tokens.is_empty() {
            return Err(invalid("a chunk of zero tokens"));
        }
        let start = Instant::now();
        let mut cache = model.empty_cache()?;
        let sink = self.encoding().sink_for(tokens);
        if sink.is_empty() {
            model.prefill(tokens, &positions(0, tokens.len()), &mut cache)?;
            model.device().synchronize()?; // launches return before kernels run
            return Ok((cache, start.elapsed()));
        }
        let all = [sink, tokens].concat();
        model.prefill(&all, &positions(0, all.len()), &mut cache)?;
        let cache = cache
            .narrow(sink.len(), tokens.len())?
            .with_positions(positions(0, tokens.len()))?;
        model.device().synchronize()?;
        Ok((cache, start.elapsed()))
    }

    /// The object that stores `cache` (the KV of `tokens`) under `key`: a chunk, or with
    /// `link` a link of a prefix chain, which records it (`key` must then be its key of
    /// `tokens`, and its root this codec's). Every path that stores computed KV makes its
    /// object here.
    pub fn to_object(
        &self,
        key: ChunkKey,
        tokens: &[u32],
        cache: &KvCache,
        link: Option<ChainLink>,
    ) -> Result<KvObject> {
        if cache.len() != tokens.len() {
            return Err(invalid(format!(
                "{} cached tokens for a chunk of {}",
                cache.len(),
                tokens.len()
            )));
        }
        let layers = cache
            .layers
            .iter()
            .map(layer_to_bytes)
            .collect::<Result<Vec<_>>>()?;
        let obj = KvObject::new(key, self.identity.layout, tokens.to_vec(), layers, None)?;
        match link {
            None => Ok(obj),
            Some(l) if l.root != self.keys.prefix_root() => Err(invalid(format!(
                "link {key} of a chain rooted in another context ({})",
                l.root
            ))),
            Some(l) => Ok(obj.with_chain(l)?),
        }
    }

    /// Prefills a chunk and packs it: what the batch job, the API and store-back store.
    /// Returns the object and the prefill time (the chunk's recompute cost).
    pub fn encode(&self, model: &Model, tokens: &[u32]) -> Result<(KvObject, Duration)> {
        let (cache, took) = self.prefill(model, tokens)?;
        Ok((
            self.to_object(self.key(tokens), tokens, &cache, None)?,
            took,
        ))
    }

    /// Checks that a stored object was made by this model for these tokens.
    pub fn check(&self, info: &ObjectInfo, tokens: &[u32]) -> Result<()> {
        let mismatch = |reason: String| BlendError::Mismatch {
            key: info.key.to_hex(),
            reason,
        };
        if info.layout != self.identity.layout {
            return Err(mismatch(format!(
                "layout {:?}, the model's {:?}",
                info.layout, self.identity.layout
            )));
        }
        if info.tokens != tokens {
            return Err(mismatch(format!(
                "it holds {} other tokens than the {} requested",
                info.tokens.len(),
                tokens.len()
            )));
        }
        Ok(())
    }

    /// A stored object's KV at positions `0..T` on the model's device, checked to be this
    /// model's KV of `tokens` (the segment it was looked up for).
    pub fn to_cache(&self, model: &Model, obj: &KvObject, tokens: &[u32]) -> Result<KvCache> {
        self.check(obj.info(), tokens)?;
        let t = obj.tokens().len();
        let layers = (0..obj.num_layers())
            .map(|l| layer_from_bytes(obj.layer(l), self.layout(), t, model.device(), None))
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache::new(layers, positions(0, t)))
    }
}
