//! OpenAI-compatible completions (`/v1/chat/completions`, `/v1/completions`, `/v1/models`)
//! with kvquilt's extensions: `documents` (chunks assembled through blend) in requests and
//! `kvquilt` (the blend's [`BlendStats`]) in responses. Unknown OpenAI request fields are
//! ignored, so OpenAI SDKs can send theirs; known ones that would change the answer and are
//! not served (`n` > 1, penalties, `logit_bias`, chat's `echo`, `best_of` > 1, `suffix`, tools
//! and functions, a `response_format` other than text) are refused. `null` stands for an absent
//! field everywhere, as OpenAI reads it.
//!
//! The request types are read by hand (`read.rs`), in one pass that skips what the server
//! ignores and reads lists within a count.

mod read;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::blend::{BlendStats, ModeSpec};
use crate::chunks::ChunkRef;

/// Sampling, stopping and kvquilt fields both completion endpoints take.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CommonFields {
    /// The served model's name (optional; another name is a 404).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Most tokens to generate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
    /// OpenAI's newer name for `max_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<usize>,
    /// Sampling temperature, `0..=2` (0: greedy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass, `(0, 1]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Seed of the sampler (same seed, same request: same tokens); read from any JSON
    /// integer, a negative one as its two's complement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Stop strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    /// Stream server-sent events.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    #[cfg_attr(feature = "schema", schemars(with = "Option<bool>"))]
    pub stream: bool,
    /// Streaming options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(with = "Option<StreamOptions>"))]
    pub stream_options: Option<StreamOptions>,
    /// Completions per request (only 1 is served).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<usize>,
    /// Not served: only 0 (or absent) is accepted, anything else is refused rather than
    /// ignored (it would change the answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
    /// Not served: only 0 (or absent) is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    /// Not served: only an empty map (or absent) is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    /// kvquilt: retrieved documents, each a cached chunk of the prompt (at most
    /// [`crate::chunks::MAX_CHUNKS`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(with = "Option<Vec<ChunkRef>>"))]
    pub documents: Vec<ChunkRef>,
    /// kvquilt: how the documents are assembled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(with = "Option<ModeSpec>"))]
    pub kvquilt: Option<ModeSpec>,
    /// kvquilt's own fields written beside `kvquilt` instead of inside it (read, never
    /// written).
    #[serde(skip)]
    pub misplaced: Misplaced,
    /// The first of vLLM's and SGLang's request extensions (`top_k`, `min_p`,
    /// `repetition_penalty`, `ignore_eos`, `guided_json`, ...; [`VLLM_EXTENSIONS`]) given
    /// with another value than its default: not served, so refused rather than ignored (it
    /// would change the answer). Read, never written.
    #[serde(skip)]
    pub unserved_extension: Option<&'static str>,
}

/// vLLM's and SGLang's sampling and decoding fields that kvquilt reads only to refuse any
/// value but the one that changes nothing (absent and `null` always pass); what each
/// accepts is in `read.rs`. `chat_template_kwargs`, `priority` and `request_id` are not
/// among them: they are ignored, as other unknown fields are.
pub const VLLM_EXTENSIONS: &[&str] = &[
    "top_k",
    "min_p",
    "repetition_penalty",
    "length_penalty",
    "min_tokens",
    "ignore_eos",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "stop_token_ids",
    "bad_words",
    "use_beam_search",
    "prompt_logprobs",
    "return_tokens_as_token_ids",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structural_tag",
    "structured_outputs",
    "regex",
    "ebnf",
    "json_schema",
    "continue_final_message",
    "add_generation_prompt",
    "chat_template",
    "logits_processors",
    "truncate_prompt_tokens",
    "allowed_token_ids",
    "echo",
    "no_stop_trim",
];

/// `mode`, `ratio` and `compress` at the top level of an OpenAI request: they belong inside
/// `kvquilt`. Noted (not kept) only so that the server can refuse them with a 400 that says
/// so; any other unknown field is ignored, and these would be too, silently running another
/// mode. `null` counts as absent, as elsewhere.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Misplaced {
    /// `mode` was given (it belongs in `kvquilt.mode`).
    pub mode: bool,
    /// `ratio` was given (it belongs in `kvquilt.ratio`).
    pub ratio: bool,
    /// `compress` was given (it belongs in `kvquilt.compress`).
    pub compress: bool,
}

impl Misplaced {
    /// The first misplaced field given.
    pub fn first(&self) -> Option<&'static str> {
        [
            ("mode", self.mode),
            ("ratio", self.ratio),
            ("compress", self.compress),
        ]
        .into_iter()
        .find_map(|(name, here)| here.then_some(name))
    }
}

/// `stop`: one string or several.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several stop strings.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct StreamOptions {
    /// Send a last chunk with the token usage (`null`: no).
    #[serde(default, deserialize_with = "read::null_as_false")]
    #[cfg_attr(feature = "schema", schemars(with = "Option<bool>"))]
    pub include_usage: bool,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ChatRequest {
    /// The conversation; documents go into the last user message (any messages may follow it).
    pub messages: Vec<ChatMessage>,
    /// Return each generated token's log-probability.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    #[cfg_attr(feature = "schema", schemars(with = "Option<bool>"))]
    pub logprobs: bool,
    /// Alternatives per generated token (with `logprobs`), at most 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<usize>,
    /// Not served (tool calling): only absent or an empty list is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Value>,
    /// Not served: only absent, `"none"` or `"auto"` is accepted (no tool is ever called).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Value>,
    /// Not served (the older form of `tools`): only absent or an empty list is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub functions: Option<Value>,
    /// Not served: only absent, `"none"` or `"auto"` is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function_call: Option<Value>,
    /// Not served (structured output): only absent or `{"type": "text"}` is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Value>,
    /// Sampling, stopping, documents.
    #[serde(flatten)]
    pub common: CommonFields,
}

impl ChatRequest {
    /// A conversation with no documents and the server's defaults.
    pub fn new(messages: Vec<ChatMessage>) -> Self {
        Self {
            messages,
            ..Self::default()
        }
    }
}

/// A message of a chat request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Its text (absent content is empty).
    #[serde(default)]
    pub content: Option<Content>,
}

impl ChatMessage {
    /// A message of `role` with text `content`.
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_string(),
            content: Some(Content::Text(content.into())),
        }
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
}

/// A message's content: a string, or OpenAI's list of parts (text parts only).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Parts; only `{"type": "text", "text": ...}` is served.
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ContentPart {
    /// The part's type (`text`).
    #[serde(rename = "type")]
    pub kind: String,
    /// Its text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CompletionRequest {
    /// The prompt (one string; a list of one string is accepted).
    pub prompt: Prompt,
    /// Legacy completions' `logprobs`: how many alternatives per token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<usize>,
    /// The prompt is returned before the answer (in `text`, and with `logprobs` its tokens
    /// first: the first one's `null`, each other's log-probability after those before it,
    /// computed over the context the mode built); `max_tokens` may then be 0. Documents are
    /// not echoed, and the prompt's first token is not scored even after them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    #[cfg_attr(feature = "schema", schemars(with = "Option<bool>"))]
    pub echo: bool,
    /// Not served: only 1 (or absent) is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_of: Option<usize>,
    /// Not served (text after the completion): only absent or empty is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    /// Sampling, stopping, documents.
    #[serde(flatten)]
    pub common: CommonFields,
}

impl CompletionRequest {
    /// A prompt with no documents and the server's defaults.
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: Prompt::One(prompt.into()),
            logprobs: None,
            echo: false,
            best_of: None,
            suffix: None,
            common: CommonFields::default(),
        }
    }
}

/// `prompt`: one string (a list of one is accepted), or token ids (`[1, 2, 3]`, or a list of one such
/// list: vLLM's form, which lm-eval's `local-completions` sends).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(untagged)]
pub enum Prompt {
    /// One prompt.
    One(String),
    /// Several prompts (only one is served).
    Many(Vec<String>),
    /// One prompt's token ids, used as given (the model's vocabulary).
    Tokens(Vec<u32>),
}

/// Token counts of a completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
    /// OpenAI's breakdown of the prompt tokens (always sent by kvquilt; absent in older
    /// answers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the cache exactly as a prefix cache serves them
    /// ([`BlendStats::cached_tokens`]); chunks blended from the store count under `kvquilt`.
    pub cached_tokens: usize,
}

impl Usage {
    /// Usage of `completion` tokens generated after `prompt` tokens, `cached` of them
    /// served from the cache exactly.
    pub fn new(prompt: usize, completion: usize, cached: usize) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            prompt_tokens_details: Some(PromptTokensDetails {
                cached_tokens: cached,
            }),
        }
    }
}

/// The assistant's answer in a chat response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: String,
    /// The generated text.
    pub content: String,
}

/// One choice of a chat response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ChatChoice {
    /// Always 0 (one choice is served).
    pub index: usize,
    /// The answer.
    pub message: AssistantMessage,
    /// OpenAI's chat log-probability object (`{"content": [...]}`) when asked for.
    #[serde(default)]
    pub logprobs: Option<Value>,
    /// `stop` or `length`.
    pub finish_reason: String,
}

/// `POST /v1/chat/completions`'s answer (not streamed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ChatResponse {
    /// `chatcmpl-...`.
    pub id: String,
    /// `chat.completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The served model's name.
    pub model: String,
    /// One choice.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
    /// What assembling the prompt did.
    pub kvquilt: BlendStats,
}

/// One choice of a completion response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CompletionChoice {
    /// Always 0 (one choice is served).
    pub index: usize,
    /// The generated text.
    pub text: String,
    /// Legacy completions' log-probability object when asked for.
    #[serde(default)]
    pub logprobs: Option<Value>,
    /// `stop` or `length`.
    pub finish_reason: String,
}

/// `POST /v1/completions`'s answer (not streamed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CompletionResponse {
    /// `cmpl-...`.
    pub id: String,
    /// `text_completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The served model's name.
    pub model: String,
    /// One choice.
    pub choices: Vec<CompletionChoice>,
    /// Token counts.
    pub usage: Usage,
    /// What assembling the prompt did.
    pub kvquilt: BlendStats,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ModelList {
    /// `list`.
    pub object: String,
    /// The served model.
    pub data: Vec<ModelCard>,
}

/// One served model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ModelCard {
    /// Its name.
    pub id: String,
    /// `model`.
    pub object: String,
    /// Unix seconds (0: unknown).
    pub created: u64,
    /// `kvquilt`.
    pub owned_by: String,
    /// kvquilt's calibration of the model: what `blend` means for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kvquilt: Option<ModelCalibration>,
}

/// What `blend` means for a served model (`kvquilt calibrate` writes the record).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ModelCalibration {
    /// A calibration record certifies a blend ratio for this model.
    pub calibrated: bool,
    /// The ratio `blend` runs when a request names none; absent when such requests are
    /// served as `prefix` (uncalibrated, not opted in).
    pub blend_ratio: Option<f32>,
    /// How that blend selects the tokens it recomputes: the record's selection variant
    /// (`qzero`: ranked by the question before layer 0; `kvquilt`: after layer 0 for every
    /// token; names as `kvquilt eval --variants`), `kvquilt` for the uncalibrated default;
    /// absent when such requests are served as `prefix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selection: Option<String>,
    /// The record's file (or `built-in …`), when calibrated.
    pub record: Option<String>,
    /// One line for people.
    pub note: String,
}
