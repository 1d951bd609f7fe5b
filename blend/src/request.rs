//! What a blend is asked to do and what it reports.

use kvquilt_kvstore::{ChunkKey, TierKind};
use kvquilt_model::{KvCache, Model, Tensor};
use serde::Serialize;

use crate::config::Mode;
use crate::error::Result;

/// One prompt: a prefix (cached like a chunk; it sits at position 0, so its cached KV is
/// exact), retrieved chunks in prompt order, and a suffix (the question and the assistant
/// tag) that is always computed. All token ids; the prefix may be empty, the suffix may not.
#[derive(Debug, Clone)]
pub struct BlendRequest {
    /// Token ids of the prefix (may be empty).
    pub prefix: Vec<u32>,
    /// Token ids of each retrieved chunk, in prompt order (none empty).
    pub chunks: Vec<Vec<u32>>,
    /// Token ids of the suffix (not empty).
    pub suffix: Vec<u32>,
    /// How the context is built.
    pub mode: Mode,
    /// Store the KV of chunks this request computes (misses), so the next request hits.
    /// Off when the caller may not store (e.g. a tenant over its quota).
    pub store_back: bool,
    /// Time the request's phases ([`BlendStats::phases`]; blend and reuse modes). Synchronises the
    /// device at each phase change, so leave off except to see where time goes.
    pub time_phases: bool,
    /// Score the suffix's own tokens with this many alternatives each
    /// ([`BlendOutput::prompt_logprobs`]); `None` scores nothing. Runs the suffix eagerly
    /// (no CUDA graph replays it) and costs one output-head pass per suffix token.
    pub prompt_logprobs: Option<usize>,
}

impl BlendRequest {
    /// A request that stores back what it computes.
    pub fn new(prefix: Vec<u32>, chunks: Vec<Vec<u32>>, suffix: Vec<u32>, mode: Mode) -> Self {
        Self {
            prefix,
            chunks,
            suffix,
            mode,
            store_back: true,
            time_phases: false,
            prompt_logprobs: None,
        }
    }

    /// The cached segments in prompt order: the prefix (when not empty), then the chunks.
    pub fn segments(&self) -> Vec<&[u32]> {
        let mut s: Vec<&[u32]> = Vec::with_capacity(self.chunks.len() + 1);
        if !self.prefix.is_empty() {
            s.push(&self.prefix);
        }
        s.extend(self.chunks.iter().map(|c| c.as_slice()));
        s
    }

    /// Every token of the prompt in order.
    pub fn tokens(&self) -> Vec<u32> {
        let mut t: Vec<u32> = self.segments().concat();
        t.extend_from_slice(&self.suffix);
        t
    }
}

/// How one segment's KV was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SegmentSource {
    /// Loaded from this tier.
    Hit(TierKind),
    /// Not stored: prefilled alone, then stored.
    Miss,
    /// Stored, but recomputing was estimated faster than loading.
    RecomputedForSpeed,
    /// Stored, but the object failed verification or did not match: prefilled instead.
    Unusable,
}

/// Why a `reuse` or `blend` request ran as full prefill ([`BlendStats::fallback`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// No chunk of the prompt would be loaded (none held, or recomputing each was estimated
    /// faster than loading it): computing the chunks apart cannot beat computing them
    /// together.
    NothingLoaded,
    /// The plan's own estimate of the mode was no less than full prefill's.
    Estimated,
    /// The estimate, corrected by what requests of the mode measured on this machine
    /// ([`crate::CostModel::mode_s`]), was no less than full prefill's.
    Measured,
}

/// What a blend did, for the API's stats and the evaluation harness.
#[derive(Debug, Clone, Serialize)]
pub struct BlendStats {
    /// The mode that ran: the requested one, or `full` after a fallback.
    pub mode: &'static str,
    /// True when the request asked for reuse or blend but ran as full prefill, estimated
    /// faster (`fallback` says why).
    pub fell_back_to_full: bool,
    /// Why the request ran as full prefill instead of its mode (`Some` exactly when
    /// `fell_back_to_full`).
    pub fallback: Option<Fallback>,
    /// Tokens in the prompt (prefix, chunks and suffix).
    pub tokens: usize,
    /// Tokens in the suffix.
    pub suffix_tokens: usize,
    /// One entry per cached segment (prefix first), in prompt order.
    pub segments: Vec<SegmentSource>,
    /// Segments taken from the device tier.
    pub hits_gpu: usize,
    /// Segments loaded from the store's host tier.
    pub hits_host: usize,
    /// Segments loaded from the store's SSD tier.
    pub hits_ssd: usize,
    /// Segments loaded from a tier shared over the network (every tier other than the
    /// device, host and SSD tiers counts here).
    pub hits_remote: usize,
    /// Loaded segments whose KV was decoded from a lossy codec (counted in `hits_*` too):
    /// their values are close to, not equal to, the chunk's KV.
    pub lossy_hits: usize,
    /// Segments held nowhere (computed, and stored back when allowed).
    pub misses: usize,
    /// Objects written by this request (misses and new prefix objects): the length of
    /// [`BlendOutput::stored`].
    pub stored_back: usize,
    /// Non-suffix tokens whose KV was computed in this prompt's context (blend: after the
    /// last check layer; full: all; reuse: none).
    pub recomputed_tokens: usize,
    /// `recomputed_tokens` over the non-suffix tokens.
    pub recompute_fraction: f64,
    /// Prompt tokens whose stored KV was used exactly as full prefill computes it: the
    /// links of `prefix` mode read from the store, and elsewhere the prefix segment read
    /// as stored when it was computed alone at position 0 (it opens with the chunk
    /// encoding's sink, or there is none) or, for a prefix kept as pages, the pages read
    /// (a conversation's history). Chunks placed at new positions are not counted, nor
    /// anything decoded from a lossy codec: OpenAI's `cached_tokens`.
    pub cached_tokens: usize,
    /// Time from the request to the first token's logits, milliseconds.
    pub ttft_ms: f64,
    /// Keys of the prefix-chain links the prompt is stored as ([`crate::Blender::links_of`]),
    /// in order, whether stored or not: a paged prefix's pages, and in `prefix` mode every
    /// link of its chain. Empty for `full`. (A caller that stores the answer's pages,
    /// [`crate::Blender::answer_pages`], adds theirs.)
    pub link_keys: Vec<kvquilt_kvstore::ChunkKey>,
    /// Per-phase times when the request asked for them ([`BlendRequest::time_phases`]).
    pub phases: Vec<crate::PhaseTime>,
    /// What a token policy did to the cache for decoding, when the request asked for one
    /// ([`crate::compress::compress_for_decode`]; set by the caller, not the engine).
    pub compression: Option<crate::compress::CompressReport>,
    /// How the model's calibration decided the mode, for a `blend` that named no ratio
    /// (served as `prefix` without a record, or the record's ratio); set by the caller.
    pub calibration: Option<String>,
}

impl BlendStats {
    /// Empty statistics of a request running as `mode` over `tokens` prompt tokens, of
    /// which `suffix_tokens` are the suffix's.
    pub(crate) fn new(mode: &Mode, tokens: usize, suffix_tokens: usize) -> Self {
        Self {
            mode: mode.name(),
            fell_back_to_full: false,
            fallback: None,
            tokens,
            suffix_tokens,
            segments: Vec::new(),
            hits_gpu: 0,
            hits_host: 0,
            hits_ssd: 0,
            hits_remote: 0,
            lossy_hits: 0,
            misses: 0,
            stored_back: 0,
            recomputed_tokens: 0,
            recompute_fraction: 0.0,
            cached_tokens: 0,
            ttft_ms: 0.0,
            link_keys: Vec::new(),
            phases: Vec::new(),
            compression: None,
            calibration: None,
        }
    }

    /// Records how the next segment (in prompt order) was obtained.
    pub(crate) fn count(&mut self, s: SegmentSource) {
        match s {
            SegmentSource::Hit(TierKind::GPU) => self.hits_gpu += 1,
            SegmentSource::Hit(TierKind::HOST) => self.hits_host += 1,
            SegmentSource::Hit(TierKind::SSD) => self.hits_ssd += 1,
            SegmentSource::Hit(_) => self.hits_remote += 1,
            SegmentSource::Miss => self.misses += 1,
            SegmentSource::RecomputedForSpeed | SegmentSource::Unusable => {}
        }
        self.segments.push(s);
    }
}

/// A blend's result: the first token's logits and the whole prompt's KV, ready for decoding.
#[derive(Debug)]
pub struct BlendOutput {
    /// f32 logits of the prompt's last token, `[vocab]`.
    pub logits: Tensor,
    /// KV of every prompt token at positions `0..tokens`, for decoding on.
    pub cache: KvCache,
    /// What the request did.
    pub stats: BlendStats,
    /// The objects this request stored (store-back), in the order computed; empty when it
    /// stored nothing, or before its store-back ran ([`crate::Blender::run_deferring`]).
    pub stored: Vec<StoredObject>,
    /// The suffix's tokens after its first, scored over the context as the mode built it
    /// (blend: the recomputed cache, not full prefill's), when the request asked
    /// ([`BlendRequest::prompt_logprobs`]); otherwise empty.
    pub prompt_logprobs: Vec<crate::PromptLogprob>,
    /// The suffix's last hidden rows, kept by a mode for [`BlendOutput::score_suffix`] when
    /// the request asked for its tokens' scores.
    pub(crate) suffix_rows: Option<Tensor>,
}

impl BlendOutput {
    /// The output of a request whose store-back has not run yet (nothing stored).
    pub(crate) fn new(logits: Tensor, cache: KvCache, stats: BlendStats) -> Self {
        Self {
            logits,
            cache,
            stats,
            stored: Vec::new(),
            prompt_logprobs: Vec::new(),
            suffix_rows: None,
        }
    }

    /// Scores the suffix rows a mode kept (`prompt_logprobs`), once: `k` alternatives each.
    pub(crate) fn score_suffix(&mut self, model: &Model, suffix: &[u32], k: usize) -> Result<()> {
        if let Some(rows) = self.suffix_rows.take() {
            self.prompt_logprobs = crate::prompt_logprobs::score(model, &rows, suffix, k)?;
        }
        Ok(())
    }

    /// Records what the request's store-back stored (`stats.stored_back` is its count).
    pub fn set_stored(&mut self, stored: Vec<StoredObject>) {
        self.stats.stored_back = stored.len();
        self.stored = stored;
    }
}

/// An object a request stored back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StoredObject {
    /// The object's key (in the request's namespace).
    pub key: ChunkKey,
    /// The chunk's length in tokens.
    pub tokens: usize,
    /// Its uncompressed KV size in bytes, every layer's K and V
    /// ([`kvquilt_kvstore::KvLayout::object_bytes`]): what quotas count.
    pub bytes: u64,
    /// For a chain link (a page of a conversation's history, a link of `prefix` mode's
    /// chain), the key of the prefix it extends (its [`kvquilt_kvstore::ChainLink`]'s
    /// parent); `None` for a chunk.
    pub parent: Option<ChunkKey>,
}
