//! `POST /v1/blend`: assemble a RAG prompt from chunks and return its first token, top
//! log-probabilities and what the blend did.

use std::sync::Arc;

use axum::extract::State;
use kvquilt_blend::rag::{DEFAULT_INSTRUCTION, DEFAULT_SYSTEM, RagPrompt};
use kvquilt_blend::{BlendConfig, BlendOutput, BlendRequest, BlendStats, Mode};
use kvquilt_model::top_logprobs;
use serde::{Deserialize, Serialize};

use super::chunk_ref::{ChunkRef, check_chunk_count, check_tokens, resolve_all};
use super::chunks::{check_quota, object_bytes};
use crate::serve::error::{ApiError, ApiResult};
use crate::serve::extract::ApiJson;
use crate::serve::state::{AppState, Shared};
use crate::serve::tenants::{Caller, Tenant};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlendBody {
    /// RAG layout (see `kvquilt_blend::rag`): system and instruction open the prompt...
    pub system: Option<String>,
    pub instruction: Option<String>,
    /// ...the question closes it.
    pub question: Option<String>,
    /// Or the raw layout: prefix and suffix token ids (instead of system/instruction/question).
    pub prefix_tokens: Option<Vec<u32>>,
    pub suffix_tokens: Option<Vec<u32>>,
    #[serde(default)]
    pub chunks: Vec<ChunkRef>,
    /// See [`ModeSpec`].
    pub mode: Option<String>,
    pub ratio: Option<f32>,
    /// Alternatives reported for the first token (default 5, at most 20).
    pub top_logprobs: Option<usize>,
}

/// `mode` (`full`, `prefix`, `reuse`, `blend`; default `blend`) and, for blend, `ratio`
/// (the recomputed fraction; default kvquilt's).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct ModeSpec {
    pub mode: Option<String>,
    pub ratio: Option<f32>,
}

impl ModeSpec {
    pub fn to_mode(&self) -> ApiResult<Mode> {
        let bad = |m: String| ApiError::bad_request("invalid_mode", m);
        let mode = match self.mode.as_deref().unwrap_or("blend") {
            "full" => Mode::Full,
            "prefix" => Mode::Prefix,
            "reuse" => Mode::Reuse,
            "blend" => {
                let mut c = BlendConfig::default();
                if let Some(r) = self.ratio {
                    if !(0.0..=1.0).contains(&r) || !r.is_finite() {
                        return Err(bad(format!("ratio {r} is not within 0..=1")));
                    }
                    c.ratio = r;
                }
                return Ok(Mode::Blend(c));
            }
            other => {
                return Err(bad(format!(
                    "unknown mode `{other}` (expected full, prefix, reuse or blend)"
                )));
            }
        };
        if self.ratio.is_some() {
            return Err(bad("`ratio` applies to mode `blend` only".into()));
        }
        Ok(mode)
    }
}

#[derive(Debug, Serialize)]
pub struct TokenLogprob {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
}

#[derive(Debug, Serialize)]
pub struct BlendResponse {
    pub model: String,
    /// The most likely first token.
    pub token: TokenLogprob,
    pub top_logprobs: Vec<TokenLogprob>,
    /// Ids of the chunks in prompt order.
    pub chunk_ids: Vec<String>,
    pub stats: BlendStats,
}

/// `POST /v1/blend`.
pub async fn blend(
    State(s): State<AppState>,
    Caller(tenant): Caller,
    ApiJson(body): ApiJson<BlendBody>,
) -> ApiResult<axum::Json<BlendResponse>> {
    let mode = ModeSpec {
        mode: body.mode.clone(),
        ratio: body.ratio,
    }
    .to_mode()?;
    let k = body.top_logprobs.unwrap_or(5).clamp(1, 20);
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
            let mut r = prompt.request(&s.tokenizer, mode)?;
            r.chunks = chunks;
            r
        }
        (prefix, Some(suffix)) if body.question.is_none() && body.system.is_none() => {
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
    let chunk_ids = {
        let codec = s.blender.codec(&tenant.namespace);
        req.chunks.iter().map(|c| codec.key(c).to_hex()).collect()
    };
    let prepared = prepare(&s, &tenant, req)?;
    let (st, t) = (Arc::clone(&s), Arc::clone(&tenant));
    let out = s.pool.run(move || prepared.run(&st, &t)).await??;
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
        stats: out.stats,
    }))
}

/// A blend request that passed the size check, with store-back decided by the quota.
pub struct Prepared {
    pub req: BlendRequest,
    /// Segments not stored before the request: (key, tokens).
    misses: Vec<(kvquilt_kvstore::ChunkKey, usize)>,
}

/// Checks a request's size and decides store-back: a tenant over its quota still gets its
/// answer, its misses are just not stored.
pub fn prepare(s: &Shared, tenant: &Tenant, mut req: BlendRequest) -> ApiResult<Prepared> {
    check_chunk_count(s, req.chunks.len())?;
    check_tokens(s, req.tokens().len())?;
    if req.suffix.is_empty() {
        return Err(ApiError::bad_request(
            "empty_question",
            "the question (suffix) has no tokens",
        ));
    }
    let codec = s.blender.codec(&tenant.namespace);
    let layout = *codec.layout();
    let misses: Vec<_> = req
        .segments()
        .iter()
        .map(|seg| (codec.key(seg), seg.len()))
        .filter(|(k, _)| s.blender.store().locate(k).is_none())
        .collect();
    let extra: u64 = misses.iter().map(|(_, n)| object_bytes(&layout, *n)).sum();
    req.store_back = check_quota(s, tenant, extra).is_ok();
    Ok(Prepared { req, misses })
}

impl Prepared {
    /// Runs the blend (blocking: call on the model pool) and records its metrics and the
    /// tenant's new objects.
    pub fn run(&self, s: &Shared, tenant: &Tenant) -> ApiResult<BlendOutput> {
        let out = s.blender.run(&tenant.namespace, &self.req)?;
        if out.stats.stored_back > 0 {
            let layout = s.blender.identity().layout;
            for (k, n) in &self.misses {
                if s.blender.store().locate(k).is_some() {
                    tenant.add(*k, object_bytes(&layout, *n));
                }
            }
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
        Ok(out)
    }
}
