//! `/v1/chunks`: chunks named in requests, and what storing and looking them up returns.

use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// A chunk in a request: `"text"`, `{"text": ...}`, `{"tokens": [...]}` or `{"id": ...}`.
///
/// Text is a document: the server tokenises it by the same rule the precompute job and chat
/// `documents` use, so warming a chunk by any path hits in the others. Token ids are used as
/// given. An id must name a chunk stored by the caller's tenant.
///
/// Read by hand rather than as an untagged enum, so that a bad chunk's error names what is
/// wrong inside it (an unknown field, a token id that is no `u32`) instead of "did not match
/// any variant".
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(untagged)]
pub enum ChunkRef {
    /// A document's text.
    Text(String),
    /// Exactly one of `id`, `text` or `tokens`.
    Spec(ChunkSpec),
}

impl ChunkRef {
    /// A document's text.
    pub fn text(t: impl Into<String>) -> Self {
        ChunkRef::Text(t.into())
    }

    /// Token ids, used as given.
    pub fn tokens(t: Vec<u32>) -> Self {
        ChunkRef::Spec(ChunkSpec {
            tokens: Some(t),
            ..ChunkSpec::default()
        })
    }

    /// Bytes of text this reference carries (0 for ids and token ids).
    pub fn text_len(&self) -> usize {
        match self {
            ChunkRef::Text(t) => t.len(),
            ChunkRef::Spec(s) => s.text.as_ref().map_or(0, String::len),
        }
    }

    /// A stored chunk's id (64 hex digits).
    pub fn id(id: impl Into<String>) -> Self {
        ChunkRef::Spec(ChunkSpec {
            id: Some(id.into()),
            ..ChunkSpec::default()
        })
    }
}

impl<'de> Deserialize<'de> for ChunkRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Chunk;
        impl<'de> Visitor<'de> for Chunk {
            type Value = ChunkRef;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a document's text, or an object with one of `id`, `text`, `tokens`")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<ChunkRef, E> {
                Ok(ChunkRef::Text(v.to_owned()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<ChunkRef, E> {
                Ok(ChunkRef::Text(v))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ChunkRef, A::Error> {
                ChunkSpec::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(ChunkRef::Spec)
            }
        }
        d.deserialize_any(Chunk)
    }
}

/// The object form of [`ChunkRef`]; exactly one field is set (the server says which chunk
/// breaks the rule).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ChunkSpec {
    /// A stored chunk's id (64 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// A document's text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Token ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Vec<u32>>,
}

/// `POST /v1/chunks`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct PutChunksRequest {
    /// The chunks to precompute and store (at least one, at most [`MAX_CHUNKS`]).
    #[serde(deserialize_with = "crate::bounded::chunk_list")]
    pub chunks: Vec<ChunkRef>,
}

/// `POST /v1/chunks/lookup`: where chunks are held, computing and storing nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct LookupChunksRequest {
    /// The chunks to look up: texts or token ids (at least one, at most [`MAX_CHUNKS`]; an
    /// id is looked up with `HEAD /v1/chunks/{id}`).
    #[serde(deserialize_with = "crate::bounded::chunk_list")]
    pub chunks: Vec<ChunkRef>,
    /// Also bring the ones held below the host tier (SSD, remote) up into it, after the
    /// answer, so a request that follows reads them from memory (one lookup's prefetch at a
    /// time: asked while another runs, it is skipped).
    #[serde(default)]
    pub prefetch: bool,
}

/// One chunk of a lookup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ChunkLookup {
    /// The chunk's id in the caller's tenant (64 hex digits), held or not.
    pub id: String,
    /// Its token count.
    pub tokens: usize,
    /// The fastest store tier holding it (a remote tier asked for keys no local tier
    /// holds); `null` when none does.
    pub tier: Option<Tier>,
}

/// `POST /v1/chunks/lookup`'s answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct LookupChunksResponse {
    /// One entry per requested chunk, in request order.
    pub chunks: Vec<ChunkLookup>,
}

/// Most chunks one request may name (`chunks`, `documents`): a longer list is refused as it
/// is read (`crate::bounded`). The server's `limits.max_chunks` may only lower it.
pub const MAX_CHUNKS: usize = 4096;

/// A store tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// GPU memory (the device tier).
    Gpu,
    /// Host memory.
    Host,
    /// SSD (RocksDB).
    Ssd,
    /// The remote tier shared by several sidecars (Redis Cluster); any tier other than
    /// the three local ones is reported as this.
    Remote,
    /// A tier a newer server names that this version does not know (never sent by this
    /// version: an older client still reads a newer server's answers).
    #[serde(other)]
    #[cfg_attr(feature = "schema", schemars(skip))]
    Unknown,
}

/// What storing one chunk did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum ChunkOutcome {
    /// Already stored (content-addressed: it cost a lookup).
    Hit,
    /// Computed (or uploaded) and stored now.
    Stored,
    /// An outcome a newer server names that this version does not know (never sent by
    /// this version).
    #[serde(other)]
    #[cfg_attr(feature = "schema", schemars(skip))]
    Unknown,
}

/// One chunk after `POST /v1/chunks` or a KV upload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ChunkStatus {
    /// The chunk's id in the caller's tenant (64 hex digits).
    pub id: String,
    /// Its token count.
    pub tokens: usize,
    /// Whether it was already stored.
    pub status: ChunkOutcome,
    /// The tier that held it (hits only).
    pub tier: Option<Tier>,
    /// Whether the chunk is held where it survives a restart (the SSD or remote tier).
    /// False: not yet, or not here — in memory only (no SSD tier, or a read-only data
    /// directory), or, on a sidecar without local room, only queued for the remote tier
    /// (written there after the answer). Absent in answers of older sidecars, which always
    /// wrote through: true.
    #[serde(default = "durable_by_default")]
    pub durable: bool,
}

fn durable_by_default() -> bool {
    true
}

/// `POST /v1/chunks`'s answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PutChunksResponse {
    /// The served model's name.
    pub model: String,
    /// One entry per requested chunk, in request order.
    pub chunks: Vec<ChunkStatus>,
}

/// `GET /v1/chunks/{id}`'s query.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ChunkInfoQuery {
    /// Include the token ids in the answer.
    #[serde(default)]
    pub include_tokens: bool,
}

/// `DELETE /v1/chunks/{id}`'s query.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct DeleteChunkQuery {
    /// Also delete every object that extends this one: for a page of a conversation's
    /// history (an id of the stats' `link_ids`), every later page of every conversation of
    /// the caller's that went through it, as far as this server knows them. The answer is
    /// then a [`DeleteChunkResponse`] (200) instead of an empty 204.
    #[serde(default)]
    pub descendants: bool,
}

/// `DELETE /v1/chunks/{id}?descendants=true`'s answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DeleteChunkResponse {
    /// The ids deleted, the furthest from the given id first and the given id last (ids
    /// already gone are not listed).
    pub deleted: Vec<String>,
}

/// How a stored object's K and V bytes are laid out (see `kvstore`'s object format).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Layout {
    /// Transformer layers.
    pub num_layers: u32,
    /// KV heads per layer.
    pub num_kv_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
    /// Element type: `f32`, `f16` or `bf16`.
    pub dtype: String,
    /// K captured before the rotary embedding (always true for kvquilt's objects).
    pub k_pre_rope: bool,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// RoPE frequency scaling: `{"type": "none"}`, `{"type": "linear", "factor"}` or
    /// `{"type": "llama3", ...}`.
    pub rope_scaling: serde_json::Value,
}

/// `GET /v1/chunks/{id}`: a stored chunk's metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ChunkInfo {
    /// The chunk's id (64 hex digits).
    pub id: String,
    /// Token count.
    pub tokens: usize,
    /// The fastest tier holding it.
    pub tier: Tier,
    /// Decoded KV bytes, all layers.
    pub bytes: u64,
    /// The object's layout.
    pub layout: Layout,
    /// The token ids, when asked for with `include_tokens=true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
    /// Its pin, while one holds (`POST /v1/chunks/{id}/pin`); absent when it may be evicted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<Pinned>,
}

/// A chunk's pin: it is kept from eviction in every local tier holding it (a remote tier
/// keeps objects by its own time to live).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Pinned {
    /// When the pin lapses (seconds since the Unix epoch); absent: held until unpinned or
    /// the chunk is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_unix_s: Option<u64>,
}

/// The longest pin with a time to live: ten years, in seconds.
pub const MAX_PIN_TTL_S: u64 = 315_360_000;

/// `POST /v1/chunks/{id}/pin`'s body: `{}` pins until unpinned; `ttl_s` pins for that many
/// seconds (1..=[`MAX_PIN_TTL_S`]). A new pin replaces the chunk's old one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct PinRequest {
    /// Seconds the pin holds; absent or `null`: until unpinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_s: Option<u64>,
}
