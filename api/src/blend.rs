//! `POST /v1/blend` and the stats every assembled request reports.

use serde::{Deserialize, Serialize};

use crate::chunks::{ChunkRef, Tier};

/// `POST /v1/blend`: a RAG prompt assembled from chunks. Give either `question` (with
/// optional `system` and `instruction`; the server's defaults otherwise) or the raw layout
/// `suffix_tokens` (with optional `prefix_tokens`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct BlendRequest {
    /// System message opening the prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Instruction after the system message, before the documents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instruction: Option<String>,
    /// The question closing the prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub question: Option<String>,
    /// Raw layout: token ids before the chunks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_tokens: Option<Vec<u32>>,
    /// Raw layout: token ids after the chunks (never empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix_tokens: Option<Vec<u32>>,
    /// The chunks, in prompt order (at most [`crate::chunks::MAX_CHUNKS`]).
    #[serde(default, deserialize_with = "crate::bounded::chunk_list")]
    pub chunks: Vec<ChunkRef>,
    /// `full`, `prefix`, `reuse` or `blend` (default `blend`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Blend only: the fraction of chunk tokens recomputed, `0..=1` (default kvquilt's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f32>,
    /// Alternatives reported for the first token (default 5, at most 20: more is a 400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<usize>,
    /// A token policy applied to the prompt's KV (reported in `stats.compression`; the first
    /// token is the uncompressed prompt's).
    #[serde(
        default,
        deserialize_with = "crate::object::optional",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "schema", schemars(with = "Option<CompressSpec>"))]
    pub compress: Option<CompressSpec>,
}

impl BlendRequest {
    /// A RAG prompt with the server's default system message and instruction.
    pub fn question(q: impl Into<String>, chunks: Vec<ChunkRef>) -> Self {
        Self {
            question: Some(q.into()),
            chunks,
            ..Self::default()
        }
    }

    /// The same request in another mode (`ratio` for `blend` only).
    pub fn mode(mut self, mode: &str, ratio: Option<f32>) -> Self {
        self.mode = Some(mode.to_string());
        self.ratio = ratio;
        self
    }

    /// The same request with a token policy (reported in `stats.compression`).
    pub fn compress(mut self, spec: CompressSpec) -> Self {
        self.compress = Some(spec);
        self
    }
}

/// kvquilt's extension of the OpenAI requests (`"kvquilt": {...}`): how `documents` are
/// assembled.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ModeSpec {
    /// `full`, `prefix`, `reuse` or `blend` (default `blend`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Blend only: the fraction of chunk tokens recomputed, `0..=1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f32>,
    /// Compress the prompt's KV with a token policy before decoding.
    #[serde(
        default,
        deserialize_with = "crate::object::optional",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "schema", schemars(with = "Option<CompressSpec>"))]
    pub compress: Option<CompressSpec>,
}

/// A token policy for a request's decode: after the first token, the prompt's KV is pruned
/// per layer and KV head to the budget, and decoding attends over what is kept.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct CompressSpec {
    /// `streaming`, `snapkv` or `sage`, optionally with parameters
    /// (`snapkv:window=8:kernel=7:pool=max`): prunes the prompt's KV. Optional when `decode`
    /// is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// N× less KV per KV head (a number > 1). Give this or `budget`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<f32>,
    /// Entries kept per KV head (≥ 1). Give this or `compression`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<usize>,
    /// Attention sinks always kept (`streaming`, `sage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sinks: Option<usize>,
    /// Recent tokens always kept (`sage`), or the observation window (`snapkv`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<usize>,
    /// Hold the KV of generated tokens to a budget while decoding (SCOPE); the prompt's KV
    /// is never evicted by it (`sage`: but for its last `budget` rows). Chat and text
    /// completions only.
    #[serde(
        default,
        deserialize_with = "crate::object::optional",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "schema", schemars(with = "Option<DecodeSpec>"))]
    pub decode: Option<DecodeSpec>,
}

/// A decode pool: generated tokens' KV kept to `budget` rows per KV head.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct DecodeSpec {
    /// `scope-slide`, `scope-adaptive`, `scope-discontinuous`, `h2o`, `streaming`, or `sage`
    /// (SAGE-KV's decode rule: the window the `sage` prompt policy kept rolls, so the cache
    /// keeps its size; it needs that policy, and its budget is the policy's `window`; if the
    /// policy fails inside the request, the uncompressed prompt's last rows roll).
    pub policy: String,
    /// Pool rows per KV head (`D`).
    pub budget: usize,
    /// Newest rows always kept (`R`, default `budget / 2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recent: Option<usize>,
    /// Rows the pool may hold over its budget before it is reselected, that many evicted at
    /// once (default 0: every token over the budget, the rules as published; at most
    /// `budget`): a slack of `k` reselects once per `k + 1` tokens, for up to `k` more rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slack: Option<usize>,
}

/// What a request's token policy did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CompressionStats {
    /// The policy with every parameter.
    pub policy: String,
    /// False when the policy failed and decoding ran over the uncompressed KV.
    pub applied: bool,
    /// Why the policy failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// KV entries (tokens × layers × KV heads) before.
    pub entries_before: usize,
    /// KV entries kept.
    pub entries_kept: usize,
    /// K and V bytes before.
    pub kv_bytes_before: usize,
    /// K and V bytes held after (padding of uneven heads included).
    pub kv_bytes_after: usize,
    /// Time observing the prompt's last rows took, milliseconds: the policy's window
    /// re-run over the prompt's KV with the attention probe it reads (about 0 for a policy
    /// that reads no attention window).
    #[serde(default)]
    pub observe_ms: f64,
    /// Time the policy took to choose, milliseconds.
    pub policy_ms: f64,
    /// Time gathering the kept entries into the pruned KV took, milliseconds.
    #[serde(default)]
    pub prune_ms: f64,
}

/// A token with its log-probability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct TokenLogprob {
    /// Token id.
    pub id: u32,
    /// Its text.
    pub text: String,
    /// Natural-log probability.
    pub logprob: f32,
}

/// `POST /v1/blend`'s answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct BlendResponse {
    /// The served model's name.
    pub model: String,
    /// The most likely first token.
    pub token: TokenLogprob,
    /// The most likely first tokens, most likely first.
    pub top_logprobs: Vec<TokenLogprob>,
    /// Ids of the chunks in prompt order.
    pub chunk_ids: Vec<String>,
    /// What the blend did.
    pub stats: BlendStats,
}

/// Why a `reuse` or `blend` request ran as full prefill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// No chunk of the prompt would be loaded (none held, or recomputing each was estimated
    /// faster than loading it).
    NothingLoaded,
    /// The plan's estimate of the mode was no less than full prefill's.
    Estimated,
    /// The estimate, corrected by what the mode measured on this machine, was no less than
    /// full prefill's.
    Measured,
    /// A reason a newer server names that this version does not know (never sent by this
    /// version).
    #[serde(other)]
    #[cfg_attr(feature = "schema", schemars(skip))]
    Unknown,
}

/// How one cached segment's KV was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum SegmentSource {
    /// Loaded from this tier.
    Hit(Tier),
    /// Not stored: prefilled alone (and stored when the tenant's quota allows).
    Miss,
    /// Stored, but recomputing was estimated faster than loading.
    RecomputedForSpeed,
    /// Stored, but the object failed verification or did not match: prefilled instead.
    Unusable,
    /// A source a newer server names that this version does not know (never sent by this
    /// version; a newer tier inside `hit` reads as `{"hit": "unknown"}`).
    #[serde(other)]
    #[cfg_attr(feature = "schema", schemars(skip))]
    Unknown,
}

/// What an assembled request did (`/v1/blend`'s `stats`, the completions' `kvquilt`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct BlendStats {
    /// The mode that ran: the requested one, or `full` after a fallback.
    pub mode: String,
    /// True when the request asked for reuse or blend but ran as full prefill, estimated
    /// faster (`fallback` says why).
    pub fell_back_to_full: bool,
    /// Why the request ran as full prefill (absent unless `fell_back_to_full`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
    /// Prompt tokens.
    pub tokens: usize,
    /// Tokens after the chunks (the question), always computed.
    pub suffix_tokens: usize,
    /// One entry per cached segment (prefix first), in prompt order.
    #[serde(default)]
    pub segments: Vec<SegmentSource>,
    /// Segments loaded from GPU memory.
    pub hits_gpu: usize,
    /// Segments loaded from host memory.
    pub hits_host: usize,
    /// Segments loaded from SSD.
    pub hits_ssd: usize,
    /// Segments loaded from the remote tier shared by several sidecars.
    #[serde(default)]
    pub hits_remote: usize,
    /// Loaded segments whose KV was decoded from a lossy codec (also counted in `hits_*`).
    #[serde(default)]
    pub lossy_hits: usize,
    /// Segments not stored before the request.
    pub misses: usize,
    /// Objects this request stored.
    pub stored_back: usize,
    /// Chunk tokens whose KV was computed in this prompt's context.
    pub recomputed_tokens: usize,
    /// `recomputed_tokens` over the chunk tokens, `0..=1`. (A blend's ratio counts only the
    /// tokens it can change, so behind a long exact history this comes out below it.)
    pub recompute_fraction: f64,
    /// Prompt tokens whose stored KV was used exactly as full prefill computes it (prefix
    /// links; the prefix segment computed alone at position 0), as OpenAI's
    /// `usage.prompt_tokens_details.cached_tokens` counts them; blended chunks are not.
    #[serde(default)]
    pub cached_tokens: usize,
    /// Time from the request to the first token's logits, milliseconds.
    pub ttft_ms: f64,
    /// What the request's token policy did, when it asked for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<CompressionStats>,
    /// How the model's calibration decided the mode of a `blend` that named no ratio: the
    /// certified ratio and its record, or (no record) that it was served as `prefix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<String>,
    /// Ids of the objects this prompt's prefix chain is stored as, in order: a prefix longer
    /// than a page (a conversation's history) as its pages, and in `prefix` mode every
    /// link of the chain (the chunks too: there each is named by everything before it);
    /// after a chat completion without documents, also the pages of the prompt and its answer
    /// stored for the conversation's next turn. Each id is the caller's like a chunk id —
    /// `GET`, `DELETE` and `…/pin` on `/v1/chunks/{id}` take it — so a client can pin a
    /// long system prompt's pages, or forget a conversation's KV by deleting its pages.
    /// Listed whether stored or not (`GET` says); absent when there are none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub link_ids: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(fallback: Option<Fallback>) -> BlendStats {
        BlendStats {
            mode: "full".into(),
            fell_back_to_full: fallback.is_some(),
            fallback,
            tokens: 10,
            suffix_tokens: 2,
            segments: vec![SegmentSource::Miss],
            hits_gpu: 0,
            hits_host: 0,
            hits_ssd: 0,
            hits_remote: 0,
            lossy_hits: 0,
            misses: 1,
            stored_back: 1,
            recomputed_tokens: 8,
            recompute_fraction: 1.0,
            cached_tokens: 0,
            ttft_ms: 1.5,
            compression: None,
            calibration: None,
            link_ids: Vec::new(),
        }
    }

    /// A newer server's stats read here: values this version does not know (a new tier, a
    /// new fallback reason, a new segment source) read as `unknown` (they failed the whole
    /// answer).
    #[test]
    fn values_a_newer_server_adds_still_read() {
        let mut json = serde_json::to_value(stats(Some(Fallback::Measured))).unwrap();
        json["fallback"] = "over_budget".into();
        json["segments"] = serde_json::json!([{"hit": "cxl"}, "prefetched", {"hit": "ssd"}]);
        let read: BlendStats = serde_json::from_value(json).unwrap();
        assert_eq!(read.fallback, Some(Fallback::Unknown));
        assert_eq!(
            read.segments,
            vec![
                SegmentSource::Hit(Tier::Unknown),
                SegmentSource::Unknown,
                SegmentSource::Hit(Tier::Ssd)
            ]
        );
    }

    /// A fallback's reason is written in snake case, only when there is one, and stats
    /// without it (an older server's) still read.
    #[test]
    fn a_fallback_names_its_reason_and_older_stats_still_read() {
        for (why, name) in [
            (Fallback::NothingLoaded, "nothing_loaded"),
            (Fallback::Estimated, "estimated"),
            (Fallback::Measured, "measured"),
        ] {
            let json = serde_json::to_value(stats(Some(why))).unwrap();
            assert_eq!(json["fallback"], name);
            assert_eq!(
                serde_json::from_value::<BlendStats>(json).unwrap().fallback,
                Some(why)
            );
        }
        let json = serde_json::to_value(stats(None)).unwrap();
        assert!(json.get("fallback").is_none(), "{json}");
        assert_eq!(
            serde_json::from_value::<BlendStats>(json).unwrap(),
            stats(None)
        );
    }
}
