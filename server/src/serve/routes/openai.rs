//! OpenAI-compatible completions: `POST /v1/chat/completions`, `POST /v1/completions`,
//! `GET /v1/models`. Extensions: `documents` (texts, or `{"id": ...}` of stored chunks),
//! assembled through blend, and `kvquilt` (`{"mode": ..., "ratio": ...}`); responses carry
//! the blend's stats under `kvquilt`. Streaming sends server-sent events in OpenAI's chunk
//! format, ending with `data: [DONE]`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, StreamExt};
use kvquilt_api::ChunkRef;
use kvquilt_api::openai::{
    self as api, AssistantMessage, ChatChoice, ChatRequest, ChatResponse, CommonFields,
    CompletionChoice, CompletionRequest, CompletionResponse, Content, ModelCard, ModelList, Prompt,
    Stop, Usage,
};
use kvquilt_blend::rag::{DEFAULT_INSTRUCTION, chat_request};
use kvquilt_blend::{BlendRequest, BlendStats, PromptLogprob};
use kvquilt_compression::policy::DecodePoolSpec;
use kvquilt_model::ChatMessage;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::blend::prepare;
use super::chunk_ref::{check_text_bytes, check_token_ids, resolve_all};
use crate::serve::bodies::HeldBody;
use crate::serve::error::{ApiError, ApiResult};
use crate::serve::extract::ApiJson;
use crate::serve::generation::{Finish, Sampling, Step, Stopping, decode};
use crate::serve::state::{AppState, Shared};
use crate::serve::tenants::{Caller, Tenant};
use crate::serve::text_stream::CharOffsets;
use crate::serve::wire;
use crate::serve::wire::Compression;

/// Which response shape to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

/// What a generation job reports, in order.
enum GenEvent {
    /// The prompt is computed; its suffix's tokens scored when the job asked (`echo`).
    Started(Vec<PromptLogprob>),
    Step(Step),
    Done {
        finish: Finish,
        produced: usize,
        stats: Box<BlendStats>,
    },
    Failed(ApiError),
}

/// Settings of one generation after validation.
struct Job {
    prepared: super::blend::Prepared,
    /// Holds the generated tokens' KV to a budget (`kvquilt.compress.decode`).
    decode_pool: Option<DecodePoolSpec>,
    sampling: Sampling,
    stopping: Stopping,
    top_k: usize,
    /// Legacy completions' `echo`: the prompt's text, returned before the answer.
    echo: Option<String>,
    /// Whether the answer's pages are stored for a next turn (`Prepared::store_answer`): a
    /// chat's, whose next turn renders this prompt and answer; never a legacy completion's
    /// (one-off prompts, lm-eval's above all, would fill the store).
    keep_answer: bool,
}

/// How long an answer may be: `default_max` tokens when `max_tokens` is left out, and
/// whether 0 is allowed (an echoed prompt alone, as lm-eval scores one).
#[derive(Clone, Copy)]
struct Length {
    default_max: usize,
    zero_ok: bool,
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat(
    State(s): State<AppState>,
    Caller(tenant): Caller,
    held: HeldBody,
    ApiJson(mut body): ApiJson<ChatRequest>,
) -> ApiResult<Response> {
    check_model(&s, body.common.model.as_deref())?;
    check_misplaced(&body.common)?;
    check_unserved_chat(&body)?;
    // their no-op values checked, they are let go: the request lives until its answer is
    // sent, past the body budget it was read under, and a padded one could be large
    (
        body.tools,
        body.functions,
        body.tool_choice,
        body.function_call,
    ) = (None, None, None, None);
    body.response_format = None;
    let messages = body
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| to_message(i, m))
        .collect::<ApiResult<Vec<_>>>()?;
    body.messages = Vec::new();
    if messages.is_empty() {
        return Err(ApiError::bad_request("no_messages", "`messages` is empty"));
    }
    check_text_bytes(
        &s,
        body.common
            .documents
            .iter()
            .map(ChunkRef::text_len)
            .chain(
                messages
                    .iter()
                    .map(|m| m.content.len() + MESSAGE_MARKUP_BYTES),
            )
            .chain([stop_bytes(body.common.stop.as_ref())]),
    )?;
    let ((mode, calibration), compress) =
        wire::mode_spec(&s.blend_default, body.common.kvquilt.as_ref())?;
    let chunks = resolve_all(&s, &tenant, &body.common.documents).await?;
    // their texts are chunks now; the body lives until the answer is sent
    body.common.documents = Vec::new();
    let (template, tokenizer) = (Arc::clone(&s.template), Arc::clone(&s.tokenizer));
    let req = s
        .tokenizing
        .run(move || {
            Ok(chat_request(
                &template,
                &tokenizer,
                &messages,
                chunks,
                DEFAULT_INSTRUCTION,
                mode,
            )?)
        })
        .await?;
    drop(held);
    let top_k = match (body.logprobs, body.top_logprobs) {
        (true, n) => wire::alternatives("top_logprobs", n)?,
        // as OpenAI and vLLM read it: alternatives are of the listed tokens
        (false, Some(n)) if n > 0 => {
            return Err(ApiError::bad_request(
                "invalid_logprobs",
                "`top_logprobs` needs `logprobs: true`",
            ));
        }
        (false, _) => 0,
    };
    let length = Length {
        default_max: 512,
        zero_ok: false,
    };
    let mut job = job(&s, &tenant, req, &body.common, length, top_k, compress)?;
    job.prepared.calibration = calibration;
    job.keep_answer = true;
    respond(s, tenant, job, Kind::Chat, body.logprobs, &body.common).await
}

/// `POST /v1/completions`: documents first (one chunk each), then the prompt, computed.
pub(crate) async fn completions(
    State(s): State<AppState>,
    Caller(tenant): Caller,
    held: HeldBody,
    ApiJson(mut body): ApiJson<CompletionRequest>,
) -> ApiResult<Response> {
    check_model(&s, body.common.model.as_deref())?;
    check_misplaced(&body.common)?;
    let suffix = body.suffix.as_ref().is_some_and(|x| !x.is_empty());
    if body.best_of.unwrap_or(1) != 1 || suffix {
        return Err(ApiError::bad_request(
            "unsupported_parameter",
            "`best_of` other than 1 and `suffix` are not served",
        ));
    }
    // taken out of the body, which lives until the answer is sent (past its body budget);
    // token ids are used as given
    let prompt = match std::mem::replace(&mut body.prompt, Prompt::One(String::new())) {
        Prompt::One(p) => PromptIn::Text(p),
        Prompt::Many(mut v) if v.len() == 1 => PromptIn::Text(v.swap_remove(0)),
        Prompt::Tokens(ids) if !ids.is_empty() => {
            check_token_ids(&s, "`prompt`", &ids)?;
            PromptIn::Tokens(ids)
        }
        // (a list of more than one is refused as the body is read: batches are not served)
        Prompt::Many(_) | Prompt::Tokens(_) => {
            return Err(ApiError::bad_request(
                "invalid_prompt",
                "`prompt` is an empty list (give one string or its token ids)",
            ));
        }
    };
    let prompt_bytes = match &prompt {
        PromptIn::Text(t) => t.len(),
        PromptIn::Tokens(_) => 0,
    };
    // for `echo`: the prompt's text as given (`None`: token ids, echoed as they decode)
    let given = body.echo.then(|| match &prompt {
        PromptIn::Text(t) => Some(t.clone()),
        PromptIn::Tokens(_) => None,
    });
    check_text_bytes(
        &s,
        body.common
            .documents
            .iter()
            .map(ChunkRef::text_len)
            .chain([prompt_bytes, stop_bytes(body.common.stop.as_ref())]),
    )?;
    let ((mode, calibration), compress) =
        wire::mode_spec(&s.blend_default, body.common.kvquilt.as_ref())?;
    let chunks = resolve_all(&s, &tenant, &body.common.documents).await?;
    // their texts are chunks now; the body lives until the answer is sent
    body.common.documents = Vec::new();
    let suffix = match prompt {
        PromptIn::Text(text) => {
            let tokenizer = Arc::clone(&s.tokenizer);
            s.tokenizing
                .run(move || Ok(tokenizer.encode_piece(&text)?))
                .await?
        }
        PromptIn::Tokens(ids) => ids,
    };
    drop(held);
    let echo = match given {
        None => None,
        Some(Some(text)) => Some(text),
        Some(None) => {
            let (tokenizer, ids) = (Arc::clone(&s.tokenizer), suffix.clone());
            Some(
                s.tokenizing
                    .run(move || Ok(tokenizer.decode(&ids, false)?))
                    .await?,
            )
        }
    };
    let mut req = BlendRequest::new(Vec::new(), chunks, suffix, mode);
    let top_k = wire::alternatives("logprobs", body.logprobs)?;
    if echo.is_some() && body.logprobs.is_some() {
        req.prompt_logprobs = Some(top_k);
    }
    // OpenAI's default for legacy completions is 16 tokens; an echoed prompt may be all
    // the answer (`max_tokens: 0`)
    let length = Length {
        default_max: 16,
        zero_ok: echo.is_some(),
    };
    let mut job = job(&s, &tenant, req, &body.common, length, top_k, compress)?;
    job.prepared.calibration = calibration;
    job.echo = echo;
    let logprobs = body.logprobs.is_some();
    respond(s, tenant, job, Kind::Text, logprobs, &body.common).await
}

/// A completion's prompt as given: text to tokenize, or token ids.
enum PromptIn {
    Text(String),
    Tokens(Vec<u32>),
}

/// What one chat message adds to the rendered prompt beside its content (the template's
/// turn markers and role: 28–33 bytes in ChatML), counted in `limits.max_text_bytes` so that
/// a request of many empty messages is refused before it is tokenized, as much text is.
const MESSAGE_MARKUP_BYTES: usize = 32;

/// Refuses the chat fields that would change the answer and are not served (tools,
/// functions, structured output); their no-op values pass: an empty list, `"none"` or
/// `"auto"`, a `text` response format.
fn check_unserved_chat(body: &ChatRequest) -> ApiResult<()> {
    let no_list = |v: &Option<Value>| {
        v.as_ref()
            .is_none_or(|v| v.as_array().is_some_and(Vec::is_empty))
    };
    let no_call = |v: &Option<Value>| {
        v.as_ref()
            .is_none_or(|v| matches!(v.as_str(), Some("none" | "auto")))
    };
    let text = body
        .response_format
        .as_ref()
        .is_none_or(|v| v.get("type").and_then(Value::as_str) == Some("text"));
    let checks = [
        ("tools", no_list(&body.tools)),
        ("functions", no_list(&body.functions)),
        ("tool_choice", no_call(&body.tool_choice)),
        ("function_call", no_call(&body.function_call)),
        ("response_format", text),
    ];
    match checks.iter().find(|(_, ok)| !ok) {
        Some((field, _)) => Err(ApiError::bad_request(
            "unsupported_parameter",
            format!("`{field}` is not served (tools, functions and structured output are not)"),
        )),
        None => Ok(()),
    }
}

/// `GET /v1/models`.
pub(crate) async fn models(State(s): State<AppState>, Caller(_): Caller) -> axum::Json<ModelList> {
    axum::Json(ModelList {
        object: "list".into(),
        data: vec![model_card(&s)],
    })
}

/// `GET /v1/models/{model}` (OpenAI SDKs' `models.retrieve`): the served model's card, or a
/// 404 `model_not_found` naming what is served.
pub(crate) async fn model(
    State(s): State<AppState>,
    Caller(_): Caller,
    model: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
) -> ApiResult<axum::Json<ModelCard>> {
    let name = model
        .map_err(|e| ApiError::bad_request("invalid_model", e.body_text()))?
        .0;
    check_model(&s, Some(&name))?;
    Ok(axum::Json(model_card(&s)))
}

fn model_card(s: &Shared) -> ModelCard {
    ModelCard {
        id: s.model_name.clone(),
        object: "model".into(),
        created: 0,
        owned_by: "kvquilt".into(),
        kvquilt: Some(wire::calibration(&s.blend_default)),
    }
}

/// Bytes of a request's stop strings (text it carries, counted in `limits.max_text_bytes`).
fn stop_bytes(stop: Option<&Stop>) -> usize {
    match stop {
        None => 0,
        Some(Stop::One(s)) => s.len(),
        Some(Stop::Many(v)) => v.iter().map(String::len).sum(),
    }
}

/// Refuses kvquilt's fields written at the top level (`mode`, `ratio`, `compress`), which
/// would otherwise be ignored as unknown fields and run another mode than the caller meant.
/// Also refuses vLLM's and SGLang's extensions given with a value that would change the
/// answer (`kvquilt_api::openai::VLLM_EXTENSIONS`).
fn check_misplaced(c: &CommonFields) -> ApiResult<()> {
    if let Some(field) = c.unserved_extension {
        return Err(ApiError::bad_request(
            "unsupported_parameter",
            format!(
                "`{field}` (a vLLM/SGLang extension) is not served: only its default value is accepted"
            ),
        ));
    }
    match c.misplaced.first() {
        None => Ok(()),
        Some(field) => Err(ApiError::bad_request(
            "misplaced_parameter",
            format!("`{field}` goes inside `kvquilt`: {{\"kvquilt\": {{\"{field}\": ...}}}}"),
        )),
    }
}

/// Refuses a request for a model this server does not serve (`None`: any, the served one).
fn check_model(s: &Shared, model: Option<&str>) -> ApiResult<()> {
    match model {
        None => Ok(()),
        Some(m) if m == s.model_name => Ok(()),
        Some(m) => Err(ApiError::not_found(
            "model_not_found",
            format!(
                "model `{m}` is not served here; this server serves `{}`",
                s.model_name
            ),
        )),
    }
}

fn to_message(i: usize, m: &api::ChatMessage) -> ApiResult<ChatMessage> {
    if !matches!(
        m.role.as_str(),
        "system" | "user" | "assistant" | "developer"
    ) {
        return Err(ApiError::bad_request(
            "invalid_role",
            format!(
                "message {i} has role `{}` (expected system, user or assistant)",
                m.role
            ),
        ));
    }
    let role = if m.role == "developer" {
        "system"
    } else {
        &m.role
    };
    let content = match &m.content {
        None => String::new(),
        Some(Content::Text(t)) => t.clone(),
        Some(Content::Parts(parts)) => {
            // text parts joined by a line break, as vLLM joins them
            let mut out = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => {
                        if j > 0 {
                            out.push('\n');
                        }
                        out.push_str(t);
                    }
                    ("text", None) => {
                        return Err(ApiError::bad_request(
                            "unsupported_content",
                            format!("message {i} has a `text` part without its `text` field"),
                        ));
                    }
                    (kind, _) => {
                        return Err(ApiError::bad_request(
                            "unsupported_content",
                            format!("message {i} has a `{kind}` part; only text is supported"),
                        ));
                    }
                }
            }
            out
        }
    };
    Ok(ChatMessage::new(role, content))
}

fn job(
    s: &Shared,
    tenant: &Arc<Tenant>,
    req: BlendRequest,
    c: &CommonFields,
    length: Length,
    top_k: usize,
    compress: Compression,
) -> ApiResult<Job> {
    if c.n.unwrap_or(1) != 1 {
        return Err(ApiError::bad_request(
            "unsupported_parameter",
            "`n` must be 1",
        ));
    }
    let penalties = [
        ("frequency_penalty", c.frequency_penalty),
        ("presence_penalty", c.presence_penalty),
    ];
    if let Some((field, _)) = penalties.iter().find(|(_, v)| v.is_some_and(|v| v != 0.0)) {
        return Err(ApiError::bad_request(
            "unsupported_parameter",
            format!("`{field}` is not served (only 0)"),
        ));
    }
    if c.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(ApiError::bad_request(
            "unsupported_parameter",
            "`logit_bias` is not served",
        ));
    }
    let prompt_tokens = req.tokens().len();
    let ctx = s.blender.model().config().context_length;
    let asked = c.max_completion_tokens.or(c.max_tokens);
    // left out: as much as fits beside the prompt, up to the endpoint's default (OpenAI and
    // vLLM serve a prompt near the context's end; a fixed default refused it)
    let max_tokens = asked.unwrap_or(
        length
            .default_max
            .min(s.limits.max_new_tokens)
            .min(ctx.saturating_sub(prompt_tokens)),
    );
    let least = usize::from(!length.zero_ok);
    if asked.is_some() && (max_tokens < least || max_tokens > s.limits.max_new_tokens) {
        return Err(ApiError::bad_request(
            "invalid_max_tokens",
            format!(
                "max_tokens must be within {least}..={} (limits.max_new_tokens)",
                s.limits.max_new_tokens
            ),
        ));
    }
    let temperature = c.temperature.unwrap_or(0.0);
    let top_p = c.top_p.unwrap_or(1.0);
    if !((0.0..=2.0).contains(&temperature) && top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_request(
            "invalid_sampling",
            "temperature must be within 0..=2 and top_p within (0, 1]",
        ));
    }
    // at most 4: a longer list is refused as the body is read (`kvquilt_api::bounded`)
    let stop_strings = match &c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    let no_room = max_tokens == 0 && !(length.zero_ok && asked == Some(0));
    if no_room || prompt_tokens.saturating_add(max_tokens) > ctx {
        let why = match asked {
            Some(_) => format!(
                "{prompt_tokens} prompt tokens + max_tokens {max_tokens} exceed the model's context of {ctx}"
            ),
            None => format!(
                "{prompt_tokens} prompt tokens leave no room to answer in the model's context of {ctx}"
            ),
        };
        return Err(ApiError::bad_request("too_many_tokens", why));
    }
    Ok(Job {
        // (checked as for one token; an echoed prompt alone decodes nothing)
        decode_pool: compress
            .decode_pool(max_tokens.max(1))?
            .filter(|_| max_tokens > 0),
        prepared: prepare(s, tenant, req, compress.prompt)?,
        sampling: Sampling {
            temperature,
            top_p,
            seed: c.seed,
        },
        stopping: Stopping {
            max_tokens,
            stop_ids: s.stop_ids(),
            stop_strings,
        },
        top_k,
        echo: None,
        keep_answer: false,
    })
}

/// Starts the job on the model pool; events arrive on the returned channel. If the
/// receiver is dropped (the client left) before a worker takes the job, the job leaves the
/// queue and never runs (counted in `abandoned_requests`); once it runs, it runs to its end
/// and stores its misses (test `server/tests/router.rs::a_client_that_leaves_the_queue_costs_no_model_work`).
///
/// The channel holds the whole answer (`max_tokens` steps, the start and the end): a worker
/// never waits on its client, so a client reading its stream slowly holds a few hundred
/// bytes per token, not a worker and its KV cache (test
/// `server/tests/router.rs::a_slow_reader_of_a_stream_holds_no_worker`).
fn spawn(s: AppState, tenant: Arc<Tenant>, job: Job) -> mpsc::Receiver<GenEvent> {
    let (tx, rx) = mpsc::channel(job.stopping.max_tokens + 2);
    tokio::spawn(async move {
        let st = Arc::clone(&s);
        let tx2 = tx.clone();
        // WAITING until a worker takes the job (STARTED) or the client leaves first (LEFT)
        const WAITING: u8 = 0;
        const STARTED: u8 = 1;
        const LEFT: u8 = 2;
        let state = Arc::new(AtomicU8::new(WAITING));
        let leave = |state: &AtomicU8, st: &AppState| {
            if state
                .compare_exchange(WAITING, LEFT, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                st.metrics.abandoned_requests.inc();
            }
        };
        let job_state = Arc::clone(&state);
        let work = s.pool.run(move || -> ApiResult<()> {
            if tx2.is_closed() {
                leave(&job_state, &st);
            }
            if job_state
                .compare_exchange(WAITING, STARTED, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                return Ok(());
            }
            let (mut out, work) = job.prepared.run(&st, &tenant)?;
            // the store-back (prefilling and storing the prompt's misses) waits for the
            // answer, and runs whatever became of it: the next request still hits
            let mut stats = out.stats;
            let store = |stats: &mut BlendStats| {
                stats.stored_back = job.prepared.store_back(&st, &tenant, work).len();
            };
            let scored = std::mem::take(&mut out.prompt_logprobs);
            if tx2.blocking_send(GenEvent::Started(scored)).is_err() {
                store(&mut stats);
                return Ok(());
            }
            // (the decode keeps its cache only for a chat whose answer's pages may be stored)
            let keep = job.keep_answer && job.decode_pool.is_none() && job.prepared.keeps_answer();
            let decoded = decode(
                &st.blender,
                &st.tokenizer,
                out.cache,
                out.logits,
                job.decode_pool,
                &job.sampling,
                &job.stopping,
                job.top_k,
                keep,
                |step| tx2.blocking_send(GenEvent::Step(step)).is_ok(),
            );
            store(&mut stats);
            let decoded = decoded?;
            // a conversation's next turn reads this prompt and its answer as pages
            if let Some(cache) = &decoded.cache {
                let (stored, pages) =
                    job.prepared
                        .store_answer(&st, &tenant, &stats, cache, &decoded.fed);
                stats.stored_back += stored.len();
                for key in pages {
                    if !stats.link_keys.contains(&key) {
                        stats.link_keys.push(key);
                    }
                }
            }
            st.metrics.generated_tokens.inc_by(decoded.produced as u64);
            st.metrics
                .decode_pool_reselections
                .inc_by(decoded.evictions as u64);
            let _ = tx2.blocking_send(GenEvent::Done {
                finish: decoded.finish,
                produced: decoded.produced,
                stats: Box::new(stats),
            });
            Ok(())
        });
        let r = tokio::select! {
            r = work => r,
            () = tx.closed() => {
                // a job already running goes on (its worker is a blocking thread)
                leave(&state, &s);
                return;
            }
        };
        if let Err(e) | Ok(Err(e)) = r {
            let _ = tx.send(GenEvent::Failed(e)).await;
        }
    });
    rx
}

/// Waits for the blend to succeed (so its errors get a proper status), then streams or
/// collects the answer.
async fn respond(
    s: AppState,
    tenant: Arc<Tenant>,
    mut job: Job,
    kind: Kind,
    logprobs: bool,
    c: &CommonFields,
) -> ApiResult<Response> {
    let prompt_tokens = job.prepared.req.tokens().len();
    let echo = job
        .echo
        .take()
        .map(|text| (text, job.prepared.req.suffix.first().copied()));
    let mut rx = spawn(Arc::clone(&s), tenant, job);
    let scored = match rx.recv().await {
        Some(GenEvent::Started(scored)) => scored,
        Some(GenEvent::Failed(e)) => return Err(e),
        _ => return Err(ApiError::internal("the generation ended before it started")),
    };
    let echo = echo.map(|(text, first)| Echoed {
        text,
        first,
        scored,
    });
    let id = format!(
        "{}-{}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        &blake3::hash(&rand_bytes()).to_hex()[..24]
    );
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let shape = Shape {
        kind,
        id,
        created,
        model: s.model_name.clone(),
        logprobs,
        list_eos: echo.is_some(),
        prompt_tokens,
    };
    if c.stream {
        let include_usage = c.stream_options.as_ref().is_some_and(|o| o.include_usage);
        Ok(stream_response(s, rx, shape, echo, include_usage))
    } else {
        collect_response(&s, rx, shape, echo).await
    }
}

/// An echoed prompt (legacy completions' `echo`): its text as given, its first token, and
/// the others scored when `logprobs` was asked (`kvquilt_blend::BlendRequest::prompt_logprobs`).
struct Echoed {
    text: String,
    first: Option<u32>,
    scored: Vec<PromptLogprob>,
}

impl Echoed {
    /// The prompt's tokens in legacy `logprobs`: the first one's log-probability and
    /// alternatives are `null` (nothing before it is scored), as OpenAI lists them.
    fn entries(&self) -> impl Iterator<Item = Entry<'_>> {
        let first = self.first.map(|id| Entry {
            id,
            logprob: None,
            top: None,
        });
        first.into_iter().chain(self.scored.iter().map(|p| Entry {
            id: p.id,
            logprob: Some(p.logprob),
            top: Some(&p.top),
        }))
    }
}

/// One token of legacy completions' `logprobs`.
struct Entry<'a> {
    id: u32,
    logprob: Option<f32>,
    top: Option<&'a [(u32, f32)]>,
}

/// Response fields fixed for one completion.
#[derive(Clone)]
struct Shape {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    logprobs: bool,
    /// Legacy logprobs list the answer's end-of-sequence token too (with `echo`: lm-eval
    /// reads a prompt's scores as every entry but the last, the one generated token, which
    /// may be the end of sequence); otherwise it is listed in no logprobs, so the listed
    /// tokens' texts join to the answer.
    list_eos: bool,
    prompt_tokens: usize,
}

impl Shape {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    fn usage(&self, produced: usize, stats: &BlendStats) -> Usage {
        Usage::new(self.prompt_tokens, produced, stats.cached_tokens)
    }

    /// The whole (not streamed) answer.
    fn response(
        &self,
        text: String,
        finish: &str,
        logprobs: Value,
        usage: Usage,
        stats: &BlendStats,
    ) -> Response {
        let logprobs = (!logprobs.is_null()).then_some(logprobs);
        let (id, created, model) = (self.id.clone(), self.created, self.model.clone());
        let kvquilt = wire::stats(stats);
        match self.kind {
            Kind::Chat => axum::Json(ChatResponse {
                id,
                object: self.object(false).into(),
                created,
                model,
                choices: vec![ChatChoice {
                    index: 0,
                    message: AssistantMessage {
                        role: "assistant".into(),
                        content: text,
                    },
                    logprobs,
                    finish_reason: finish.into(),
                }],
                usage,
                kvquilt,
            })
            .into_response(),
            Kind::Text => axum::Json(CompletionResponse {
                id,
                object: self.object(false).into(),
                created,
                model,
                choices: vec![CompletionChoice {
                    index: 0,
                    text,
                    logprobs,
                    finish_reason: finish.into(),
                }],
                usage,
                kvquilt,
            })
            .into_response(),
        }
    }

    /// Logprob entries of some steps, in the endpoint's format.
    /// `offsets`: where the answer stands before `steps` (legacy completions'
    /// `text_offset`), advanced past them.
    fn logprobs(&self, s: &Shared, steps: &[Step], offsets: &mut CharOffsets) -> Value {
        self.logprobs_after(s, None, steps, offsets)
    }

    /// [`Shape::logprobs`] with an echoed prompt's tokens first (legacy completions).
    fn logprobs_after(
        &self,
        s: &Shared,
        echo: Option<&Echoed>,
        steps: &[Step],
        offsets: &mut CharOffsets,
    ) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        let text = |id: u32| s.tokenizer.decode(&[id], false).unwrap_or_default();
        // a token's own bytes: a piece of a character keeps them (its text is U+FFFD)
        let bytes = |id: u32| s.tokenizer.token_bytes(id);
        // the answer's tokens: joined, their texts are its text (with `list_eos`, and the
        // end of sequence's)
        let steps: Vec<&Step> = steps.iter().filter(|st| !st.eos || self.list_eos).collect();
        match self.kind {
            Kind::Chat => json!({"content": steps.iter().map(|st| json!({
                "token": text(st.id),
                "logprob": st.logprob,
                "bytes": bytes(st.id),
                "top_logprobs": st.top.iter().map(|&(id, lp)| json!({
                    "token": text(id), "logprob": lp, "bytes": bytes(id),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>()}),
            Kind::Text => {
                let answer = steps.iter().map(|st| Entry {
                    id: st.id,
                    logprob: Some(st.logprob),
                    top: Some(&st.top),
                });
                let entries: Vec<Entry<'_>> = echo
                    .into_iter()
                    .flat_map(Echoed::entries)
                    .chain(answer)
                    .collect();
                json!({
                    "text_offset": entries.iter().map(|e| offsets.next(&bytes(e.id))).collect::<Vec<_>>(),
                    "tokens": entries.iter().map(|e| text(e.id)).collect::<Vec<_>>(),
                    "token_logprobs": entries.iter().map(|e| e.logprob).collect::<Vec<_>>(),
                    "top_logprobs": entries.iter().map(|e| e.top.map(|top| top.iter()
                        .map(|&(id, lp)| (text(id), json!(lp)))
                        .collect::<serde_json::Map<String, Value>>()))
                        .collect::<Vec<_>>(),
                })
            }
        }
    }

    fn choice(&self, text: &str, finish: Option<&str>, logprobs: Value, chunk: bool) -> Value {
        match (self.kind, chunk) {
            (Kind::Chat, false) => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
            (Kind::Chat, true) => json!({
                "index": 0,
                "delta": {"content": text},
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
            (Kind::Text, _) => json!({
                "index": 0,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
        }
    }

    fn envelope(&self, choices: Vec<Value>, chunk: bool) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("id".into(), json!(self.id));
        m.insert("object".into(), json!(self.object(chunk)));
        m.insert("created".into(), json!(self.created));
        m.insert("model".into(), json!(self.model));
        m.insert("choices".into(), Value::Array(choices));
        m
    }
}

async fn collect_response(
    s: &Shared,
    mut rx: mpsc::Receiver<GenEvent>,
    shape: Shape,
    echo: Option<Echoed>,
) -> ApiResult<Response> {
    let mut steps = Vec::new();
    let mut text = echo.as_ref().map(|e| e.text.clone()).unwrap_or_default();
    while let Some(ev) = rx.recv().await {
        match ev {
            GenEvent::Started(_) => {}
            GenEvent::Step(st) => {
                text.push_str(&st.text);
                steps.push(st);
            }
            GenEvent::Failed(e) => return Err(e),
            GenEvent::Done {
                finish,
                produced,
                stats,
            } => {
                let lp =
                    shape.logprobs_after(s, echo.as_ref(), &steps, &mut CharOffsets::default());
                let usage = shape.usage(produced, &stats);
                return Ok(shape.response(text, finish.openai(), lp, usage, &stats));
            }
        }
    }
    Err(ApiError::internal("the generation ended without a result"))
}

fn stream_response(
    s: AppState,
    rx: mpsc::Receiver<GenEvent>,
    shape: Shape,
    echo: Option<Echoed>,
    include_usage: bool,
) -> Response {
    // (the answer's characters sent so far: legacy logprobs' `text_offset`)
    let mut offsets = CharOffsets::default();
    let first = match (shape.kind, echo) {
        // OpenAI's first chunk names the role
        (Kind::Chat, _) => Some(shape.envelope(
            vec![json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})],
            true,
        )),
        // an echoed prompt is the first chunk's text
        (Kind::Text, Some(echo)) => {
            let lp = shape.logprobs_after(&s, Some(&echo), &[], &mut offsets);
            Some(shape.envelope(vec![shape.choice(&echo.text, None, lp, true)], true))
        }
        (Kind::Text, None) => None,
    };
    let first = first.map(|body| Event::default().data(Value::Object(body).to_string()));
    let events = stream::unfold((rx, false, offsets), move |(mut rx, done, mut offset)| {
        let shape = shape.clone();
        let s = Arc::clone(&s);
        async move {
            if done {
                return None;
            }
            let ev = match rx.recv().await {
                // consumed by `respond` before streaming began; nothing to send
                Some(GenEvent::Started(_)) => {
                    return Some((Vec::new(), (rx, false, offset)));
                }
                // the end-of-turn token that released no held-back text: nothing to send,
                // unless its logprobs are listed
                Some(GenEvent::Step(st))
                    if st.eos && st.text.is_empty() && !(shape.list_eos && shape.logprobs) =>
                {
                    return Some((Vec::new(), (rx, false, offset)));
                }
                Some(GenEvent::Step(st)) => {
                    let lp = match st.eos && !shape.list_eos {
                        true => Value::Null,
                        false => shape.logprobs(&s, std::slice::from_ref(&st), &mut offset),
                    };
                    let body = shape.envelope(vec![shape.choice(&st.text, None, lp, true)], true);
                    Event::default().data(Value::Object(body).to_string())
                }
                Some(GenEvent::Done {
                    finish,
                    produced,
                    stats,
                }) => {
                    // the finish chunk; with `include_usage`, OpenAI's last chunk after it:
                    // no choices, the usage. The last chunk carries the blend's stats.
                    let mut body = shape.envelope(
                        vec![shape.choice("", Some(finish.openai()), Value::Null, true)],
                        true,
                    );
                    let mut events = Vec::new();
                    if include_usage {
                        events.push(Event::default().data(Value::Object(body).to_string()));
                        body = shape.envelope(Vec::new(), true);
                        body.insert("usage".into(), json!(shape.usage(produced, &stats)));
                    }
                    body.insert("kvquilt".into(), json!(wire::stats(&stats)));
                    events.push(Event::default().data(Value::Object(body).to_string()));
                    events.push(Event::default().data("[DONE]"));
                    return Some((events, (rx, true, offset)));
                }
                Some(GenEvent::Failed(e)) => {
                    let body = json!(kvquilt_api::ErrorBody {
                        error: kvquilt_api::ErrorDetail {
                            kind: e.kind().into(),
                            message: e.message,
                            code: e.code.into(),
                            param: None,
                        },
                    });
                    return Some((
                        vec![Event::default().data(body.to_string())],
                        (rx, true, offset),
                    ));
                }
                None => return None,
            };
            Some((vec![ev], (rx, false, offset)))
        }
    })
    .flat_map(stream::iter);
    let all = stream::iter(first).chain(events).map(Ok::<_, Infallible>);
    Sse::new(all)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn rand_bytes() -> [u8; 16] {
    let mut b = [0u8; 16];
    rand::fill(&mut b);
    b
}
