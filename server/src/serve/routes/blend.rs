//! `POST /v1/blend`: assemble a RAG prompt from chunks and return its first token, top
//! log-probabilities and what the blend did.

use std::sync::Arc;

use axum::extract::State;
use kvquilt_api::{BlendRequest as BlendBody, BlendResponse, ChunkRef, TokenLogprob};
use kvquilt_blend::compress::{CompressPlan, compress_for_decode};
use kvquilt_blend::rag::{DEFAULT_INSTRUCTION, DEFAULT_SYSTEM, RagPrompt};
use kvquilt_blend::{BlendOutput, BlendRequest, StoreBack, StoredObject};
use kvquilt_model::top_logprobs;

use super::chunk_ref::{
    check_chunk_count, check_text_bytes, check_token_ids, check_tokens, resolve_all,
};
use super::chunks::check_quota;
use crate::serve::bodies::HeldBody;
use crate::serve::error::{ApiError, ApiResult};
use crate::serve::extract::ApiJson;
use crate::serve::state::{AppState, Shared};
use crate::serve::tenants::{Caller, QuotaReservation, Tenant};
use crate::serve::wire;

/// `POST /v1/blend`.
pub(crate) async fn blend(
    State(s): State<AppState>,
    Caller(tenant): Caller,
    held: HeldBody,
    ApiJson(body): ApiJson<BlendBody>,
) -> ApiResult<axum::Json<BlendResponse>> {
    let (mode, calibration) = wire::mode(&s.blend_default, body.mode.as_deref(), body.ratio)?;
    let compress = wire::compression(body.compress.as_ref())?.without_decode("/v1/blend")?;
    // (the first token itself is always reported)
    let k = wire::alternatives("top_logprobs", body.top_logprobs.or(Some(5)))?.max(1);
    let texts = [&body.question, &body.system, &body.instruction];
    check_text_bytes(
        &s,
        body.chunks
            .iter()
            .map(ChunkRef::text_len)
            .chain(texts.iter().map(|t| t.as_ref().map_or(0, String::len))),
    )?;
    let chunks = resolve_all(&s, &tenant, &body.chunks).await?;
    let req = match (&body.prefix_tokens, &body.suffix_tokens) {
        (None, None) => {
            let question = body.question.clone().ok_or_else(|| {
                ApiError::bad_request(
                    "missing_question",
                    "give `question` (or `prefix_tokens` and `suffix_tokens`)",
                )
            })?;
            let prompt = RagPrompt {
                system: body.system.clone().unwrap_or_else(|| DEFAULT_SYSTEM.into()),
                instruction: body
                    .instruction
                    .clone()
                    .unwrap_or_else(|| DEFAULT_INSTRUCTION.into()),
                documents: Vec::new(),
                question,
                answer_hint: String::new(),
            };
            let tokenizer = Arc::clone(&s.tokenizer);
            let mut r = s
                .tokenizing
                .run(move || Ok(prompt.request(&tokenizer, mode)?))
                .await?;
            r.chunks = chunks;
            r
        }
        (prefix, Some(suffix))
            if body.question.is_none() && body.system.is_none() && body.instruction.is_none() =>
        {
            BlendRequest::new(
                prefix.clone().unwrap_or_default(),
                chunks,
                suffix.clone(),
                mode,
            )
        }
        _ => {
            return Err(ApiError::bad_request(
                "invalid_layout",
                "give either `question` (with optional `system`, `instruction`) or `suffix_tokens` (with optional `prefix_tokens`)",
            ));
        }
    };
    drop(held);
    let chunk_ids = {
        let codec = s.blender.codec(&tenant.namespace);
        req.chunks.iter().map(|c| codec.key(c).to_hex()).collect()
    };
    let mut prepared = prepare(&s, &tenant, req, compress)?;
    prepared.calibration = calibration;
    let (st, t) = (Arc::clone(&s), Arc::clone(&tenant));
    // the answer is the first token: its store-back runs before it is sent, so that the
    // stats say exactly what was stored (a chat completion stores after its last token)
    let out = s
        .pool
        .run(move || -> ApiResult<BlendOutput> {
            let (mut out, work) = prepared.run(&st, &t)?;
            out.set_stored(prepared.store_back(&st, &t, work));
            Ok(out)
        })
        .await??;
    let row = out
        .logits
        .to_vec1::<f32>()
        .map_err(kvquilt_model::ModelError::from)?;
    let top: Vec<TokenLogprob> = top_logprobs(&row, k)
        .into_iter()
        .map(|(id, logprob)| TokenLogprob {
            id,
            text: s.tokenizer.decode(&[id], false).unwrap_or_default(),
            logprob,
        })
        .collect();
    let first = &top[0];
    Ok(axum::Json(BlendResponse {
        model: s.model_name.clone(),
        token: TokenLogprob {
            id: first.id,
            text: first.text.clone(),
            logprob: first.logprob,
        },
        top_logprobs: top,
        chunk_ids,
        stats: wire::stats(&out.stats),
    }))
}

/// A blend request that passed the size check, with store-back decided by the quota.
pub(crate) struct Prepared {
    /// The engine request.
    pub req: BlendRequest,
    /// The token policy applied to the prompt's KV after the first token, if asked for.
    compress: Option<CompressPlan>,
    /// How the calibration decided the mode ([`kvquilt_blend::BlendStats::calibration`]).
    pub calibration: Option<String>,
    /// The quota its store-back reserved (`None`: it stores nothing); released once
    /// [`Prepared::store_back`] has charged what was stored (or when the request is
    /// dropped), so a later check (the answer's pages) does not count it twice.
    quota: parking_lot::Mutex<Option<QuotaReservation>>,
}

/// Checks a request's size and decides store-back: a tenant over its quota still gets its
/// answer, its misses are just not stored.
pub(crate) fn prepare(
    s: &Shared,
    tenant: &Arc<Tenant>,
    mut req: BlendRequest,
    compress: Option<CompressPlan>,
) -> ApiResult<Prepared> {
    check_chunk_count(s, req.chunks.len())?;
    check_tokens(s, req.tokens().len())?;
    if let Some(plan) = &compress {
        plan.check(s.blender.model(), req.tokens().len())
            .map_err(|e| ApiError::bad_request("invalid_compression", e.to_string()))?;
    }
    check_token_ids(s, "prefix_tokens", &req.prefix)?;
    check_token_ids(s, "suffix_tokens", &req.suffix)?;
    if req.suffix.is_empty() {
        return Err(ApiError::bad_request(
            "empty_question",
            "the question (suffix) has no tokens",
        ));
    }
    // what its store-back may add: the objects it is made of that no tier holds (a
    // conversation's next turn: its new pages, not its whole history)
    let layout = s.blender.identity().layout;
    let extra: u64 = s
        .blender
        .objects_of(&tenant.namespace, &req)
        .iter()
        .filter(|(key, _)| s.blender.store().locate(key).is_none())
        .map(|&(_, tokens)| layout.object_bytes(tokens))
        .sum();
    let quota = check_quota(s, tenant, extra).ok();
    req.store_back = quota.is_some();
    Ok(Prepared {
        req,
        compress,
        calibration: None,
        quota: parking_lot::Mutex::new(quota),
    })
}

impl Prepared {
    /// Runs the blend up to its first token (blocking: call on the model pool) and records
    /// its metrics; returns the output and the store-back it leaves, for
    /// [`Prepared::store_back`] once the answer is on its way.
    /// With a token policy, the returned cache is the compressed one (or, if the policy
    /// failed, the uncompressed one: counted, never an error).
    pub(crate) fn run(&self, s: &Shared, tenant: &Tenant) -> ApiResult<(BlendOutput, StoreBack)> {
        // decode steps of other requests yield until the answer can start: the blender holds a
        // turn over its pass, this one over the compression after it
        let (mut out, work) = s.blender.run_deferring(&tenant.namespace, &self.req)?;
        out.stats.calibration = self.calibration.clone();
        if let Some(plan) = &self.compress {
            let tokens = self.req.tokens();
            let _turn = s.blender.prompt_turn();
            let (cache, report) = compress_for_decode(s.blender.model(), &tokens, out.cache, plan);
            out.cache = cache;
            s.metrics.record_compression(plan.spec.name(), &report);
            out.stats.compression = Some(report);
        }
        let labels = crate::serve::metrics::ModeLabels {
            mode: out.stats.mode.to_string(),
        };
        s.metrics
            .ttft
            .get_or_create(&labels)
            .observe(out.stats.ttft_ms / 1e3);
        s.metrics
            .recompute_fraction
            .get_or_create(&labels)
            .observe(out.stats.recompute_fraction);
        s.metrics.lossy_segments.inc_by(out.stats.lossy_hits as u64);
        Ok((out, work))
    }

    /// Whether its answer's pages may be stored ([`Prepared::store_answer`]): a prompt
    /// without documents whose cache no token policy compresses (a decode pool is the
    /// caller's to rule out).
    pub(crate) fn keeps_answer(&self) -> bool {
        self.req.chunks.is_empty() && self.compress.is_none()
    }

    /// Stores the pages of the prompt and its answer that a conversation's next turn reads
    /// ([`kvquilt_blend::Blender::answer_pages`]: a prompt without documents, its KV
    /// exact), when the tenant's quota holds them (blocking: on the model pool, after the
    /// request's own store-back); charges the tenant and returns what was stored and the
    /// keys of every page of prompt ‖ answer (held before or stored now). Nothing when a
    /// token policy compressed the cache: it is not the context's whole KV.
    pub(crate) fn store_answer(
        &self,
        s: &Shared,
        tenant: &Arc<Tenant>,
        stats: &kvquilt_blend::BlendStats,
        cache: &kvquilt_model::KvCache,
        fed: &[u32],
    ) -> (Vec<StoredObject>, Vec<kvquilt_kvstore::ChunkKey>) {
        if !self.keeps_answer() {
            return (Vec::new(), Vec::new());
        }
        let (work, keys) = s
            .blender
            .answer_pages(&tenant.namespace, &self.req, stats, cache, fed);
        if work.is_empty() {
            return (Vec::new(), keys);
        }
        let bytes = s.blender.identity().layout.object_bytes(work.tokens());
        let Ok(_quota) = check_quota(s, tenant, bytes) else {
            return (Vec::new(), keys);
        };
        (self.store_back(s, tenant, work), keys)
    }

    /// Runs the store-back of this request's blend (blocking: on the model pool) and charges
    /// the tenant for exactly what it stored (the quota reserved for it is released when
    /// `self` is dropped); returns what was stored.
    pub(crate) fn store_back(
        &self,
        s: &Shared,
        tenant: &Tenant,
        work: StoreBack,
    ) -> Vec<StoredObject> {
        let stored = s.blender.store_back(work);
        for obj in &stored {
            tenant.add(obj.key, obj.bytes, obj.parent);
        }
        // what was stored is charged now: the reservation made for it goes
        drop(self.quota.lock().take());
        stored
    }
}
