//! Request and response bodies of the API (see the server's `/openapi.json`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A chunk in a request: a document's text, token ids, or a stored chunk's id.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ChunkRef {
    Text { text: String },
    Tokens { tokens: Vec<u32> },
    Id { id: String },
}

impl ChunkRef {
    pub fn text(t: impl Into<String>) -> Self {
        ChunkRef::Text { text: t.into() }
    }
    pub fn tokens(t: Vec<u32>) -> Self {
        ChunkRef::Tokens { tokens: t }
    }
    pub fn id(id: impl Into<String>) -> Self {
        ChunkRef::Id { id: id.into() }
    }
}

/// One chunk after `POST /v1/chunks` or a KV upload.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ChunkStatus {
    pub id: String,
    pub tokens: usize,
    /// `hit` or `stored`.
    pub status: String,
    pub tier: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PutChunksResponse {
    pub model: String,
    pub chunks: Vec<ChunkStatus>,
}

/// `GET /v1/chunks/{id}`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChunkInfo {
    pub id: String,
    pub tokens: usize,
    pub tier: String,
    pub bytes: u64,
    pub layout: Value,
    #[serde(default)]
    pub token_ids: Option<Vec<u32>>,
}

/// `POST /v1/blend`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct BlendRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instruction: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub question: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix_tokens: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suffix_tokens: Option<Vec<u32>>,
    pub chunks: Vec<ChunkRef>,
    /// `full`, `prefix`, `reuse` or `blend` (the server's default: blend).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<usize>,
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

    pub fn mode(mut self, mode: &str, ratio: Option<f32>) -> Self {
        self.mode = Some(mode.to_string());
        self.ratio = ratio;
        self
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct TokenLogprob {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
}

/// What a blend did.
#[derive(Debug, Clone, Deserialize)]
pub struct BlendStats {
    pub mode: String,
    pub fell_back_to_full: bool,
    pub tokens: usize,
    pub suffix_tokens: usize,
    pub hits_gpu: usize,
    pub hits_host: usize,
    pub hits_ssd: usize,
    pub misses: usize,
    pub stored_back: usize,
    pub recomputed_tokens: usize,
    pub recompute_fraction: f64,
    pub ttft_ms: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BlendResponse {
    pub model: String,
    pub token: TokenLogprob,
    pub top_logprobs: Vec<TokenLogprob>,
    pub chunk_ids: Vec<String>,
    pub stats: BlendStats,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn user(c: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: c.into(),
        }
    }
    pub fn system(c: impl Into<String>) -> Self {
        Self {
            role: "system".into(),
            content: c.into(),
        }
    }
}

/// `kvquilt`'s extension of the OpenAI requests: how documents are assembled.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ModeSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f32>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ChatRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub messages: Vec<Message>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub documents: Vec<ChunkRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kvquilt: Option<ModeSpec>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: Message,
    pub finish_reason: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatResponse {
    pub id: String,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    pub kvquilt: BlendStats,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct CompletionRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub prompt: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub documents: Vec<ChunkRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kvquilt: Option<ModeSpec>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub finish_reason: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionResponse {
    pub id: String,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: Usage,
    pub kvquilt: BlendStats,
}
