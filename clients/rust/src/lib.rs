//! A typed client for the kvquilt HTTP API.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kvquilt_client::Error> {
//! use kvquilt_client::{BlendRequest, ChunkRef, Client};
//! let c = Client::new("http://127.0.0.1:8077").with_token("secret-token");
//! let stored = c.put_chunks(&[ChunkRef::text("Paris is the capital of France.")]).await?;
//! let answer = c
//!     .blend(&BlendRequest::question("What is the capital of France?", vec![ChunkRef::id(&stored.chunks[0].id)]))
//!     .await?;
//! println!("{} ({} ms)", answer.token.text, answer.stats.ttft_ms);
//! # Ok(()) }
//! ```
//!
//! Every API error arrives as [`Error::Api`] with the server's status, code and message.

#![warn(missing_docs)]

mod error;

pub use error::Error;
/// The wire format the server shares (every body, the error shape, the route list).
pub use kvquilt_api as api;
pub use kvquilt_api::openai::{
    AssistantMessage, ChatChoice, ChatMessage, ChatRequest, ChatResponse, CommonFields,
    CompletionChoice, CompletionRequest, CompletionResponse, Content, ModelCalibration, ModelList,
    Stop, Usage,
};
pub use kvquilt_api::{
    BlendRequest, BlendResponse, BlendStats, ChunkInfo, ChunkOutcome, ChunkRef, ChunkStatus,
    Health, Layout, ModeSpec, OBJECT_MEDIA_TYPE, PutChunksRequest, PutChunksResponse,
    SegmentSource, Stats, Tier, TokenLogprob,
};

use bytes::Bytes;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// A kvquilt server.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    /// `base_url` like `http://127.0.0.1:8077` (no trailing `/v1`).
    pub fn new(base_url: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: base_url.trim_end_matches('/').to_string(),
            token: None,
        }
    }

    /// Sends `Authorization: Bearer <token>` with every request.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Uses a configured `reqwest::Client` (timeouts, pools).
    pub fn with_http(mut self, http: reqwest::Client) -> Self {
        self.http = http;
        self
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn json<T: DeserializeOwned>(&self, r: RequestBuilder) -> Result<T, Error> {
        let resp = check(r.send().await?).await?;
        Ok(resp.json().await?)
    }

    async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, Error> {
        self.json(self.request(Method::POST, path).json(body)).await
    }

    /// `GET /health`.
    pub async fn health(&self) -> Result<Health, Error> {
        self.json(self.request(Method::GET, "/health")).await
    }

    /// `GET /v1/models`: the served model's id.
    pub async fn model(&self) -> Result<String, Error> {
        let list: ModelList = self.json(self.request(Method::GET, "/v1/models")).await?;
        list.data
            .into_iter()
            .next()
            .map(|m| m.id)
            .ok_or_else(|| Error::Decode("no model in /v1/models".into()))
    }

    /// `GET /v1/models`: what `blend` means for the served model (its calibration).
    pub async fn calibration(&self) -> Result<Option<ModelCalibration>, Error> {
        let list: ModelList = self.json(self.request(Method::GET, "/v1/models")).await?;
        list.data
            .into_iter()
            .next()
            .map(|m| m.kvquilt)
            .ok_or_else(|| Error::Decode("no model in /v1/models".into()))
    }

    /// `GET /v1/stats`.
    pub async fn stats(&self) -> Result<Stats, Error> {
        self.json(self.request(Method::GET, "/v1/stats")).await
    }

    /// `GET /metrics` (Prometheus text).
    pub async fn metrics(&self) -> Result<String, Error> {
        Ok(check(self.request(Method::GET, "/metrics").send().await?)
            .await?
            .text()
            .await?)
    }

    /// `GET /openapi.json`.
    pub async fn openapi(&self) -> Result<Value, Error> {
        self.json(self.request(Method::GET, "/openapi.json")).await
    }

    /// `POST /v1/chunks`: precompute and store chunks (hits cost a lookup).
    pub async fn put_chunks(&self, chunks: &[ChunkRef]) -> Result<PutChunksResponse, Error> {
        let body = PutChunksRequest {
            chunks: chunks.to_vec(),
        };
        self.post("/v1/chunks", &body).await
    }

    /// `GET /v1/chunks/{id}`; `None` when the id is unknown (to this tenant).
    pub async fn chunk(&self, id: &str, include_tokens: bool) -> Result<Option<ChunkInfo>, Error> {
        let r = self
            .request(Method::GET, &format!("/v1/chunks/{id}"))
            .query(&[("include_tokens", include_tokens)]);
        not_found_as_none(self.json(r).await)
    }

    /// `HEAD /v1/chunks/{id}`.
    pub async fn chunk_exists(&self, id: &str) -> Result<bool, Error> {
        let resp = self
            .request(Method::HEAD, &format!("/v1/chunks/{id}"))
            .send()
            .await?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(false),
            s if s.is_success() => Ok(true),
            s => Err(Error::Api {
                status: s.as_u16(),
                code: String::new(),
                message: format!("HEAD answered {s}"),
            }),
        }
    }

    /// `DELETE /v1/chunks/{id}`; false when it was not stored.
    pub async fn delete_chunk(&self, id: &str) -> Result<bool, Error> {
        let r = self.request(Method::DELETE, &format!("/v1/chunks/{id}"));
        match check(r.send().await?).await {
            Ok(_) => Ok(true),
            Err(Error::Api { status: 404, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `GET /v1/chunks/{id}/kv`: the KV object's bytes.
    pub async fn chunk_kv(&self, id: &str) -> Result<Option<Bytes>, Error> {
        let r = self.request(Method::GET, &format!("/v1/chunks/{id}/kv"));
        match check(r.send().await?).await {
            Ok(resp) => Ok(Some(resp.bytes().await?)),
            Err(Error::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `PUT /v1/chunks/{id}/kv`: stores an object (verified by the server).
    pub async fn put_chunk_kv(&self, id: &str, object: Bytes) -> Result<ChunkStatus, Error> {
        let r = self
            .request(Method::PUT, &format!("/v1/chunks/{id}/kv"))
            .header(reqwest::header::CONTENT_TYPE, OBJECT_MEDIA_TYPE)
            .body(object);
        self.json(r).await
    }

    /// `POST /v1/blend`: the first token of a RAG prompt assembled from chunks.
    pub async fn blend(&self, req: &BlendRequest) -> Result<BlendResponse, Error> {
        self.post("/v1/blend", req).await
    }

    /// `POST /v1/chat/completions` (not streaming).
    pub async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, Error> {
        self.post("/v1/chat/completions", req).await
    }

    /// `POST /v1/completions` (not streaming).
    pub async fn completion(&self, req: &CompletionRequest) -> Result<CompletionResponse, Error> {
        self.post("/v1/completions", req).await
    }

    /// `POST /v1/chat/completions` with `stream: true`: the content pieces in order, and the
    /// final chunk (finish reason, usage, stats).
    pub async fn chat_stream(&self, req: &ChatRequest) -> Result<(Vec<String>, Value), Error> {
        let mut body = req.clone();
        body.common.stream = true;
        let resp = check(
            self.request(Method::POST, "/v1/chat/completions")
                .json(&body)
                .send()
                .await?,
        )
        .await?;
        let text = resp.text().await?;
        let mut pieces = Vec::new();
        let mut last = Value::Null;
        for line in text.lines() {
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                return Ok((pieces, last));
            }
            let v: Value = serde_json::from_str(data).map_err(|e| Error::Decode(e.to_string()))?;
            if let Some(e) = v.get("error") {
                return Err(Error::Api {
                    status: 200,
                    code: e["code"].as_str().unwrap_or_default().to_string(),
                    message: e["message"].as_str().unwrap_or_default().to_string(),
                });
            }
            if let Some(c) = v["choices"][0]["delta"]["content"].as_str()
                && !c.is_empty()
            {
                pieces.push(c.to_string());
            }
            last = v;
        }
        Err(Error::Decode("the stream ended without [DONE]".into()))
    }

    /// Any request, for endpoints and fields this client does not model.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, Error> {
        let mut r = self.request(method, path);
        if let Some(b) = body {
            r = r.json(b);
        }
        self.json(r).await
    }
}

/// Turns a non-success response into [`Error::Api`] with the server's code and message.
async fn check(resp: Response) -> Result<Response, Error> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let text = resp.text().await.unwrap_or_default();
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    Err(Error::Api {
        status: status.as_u16(),
        code: v["error"]["code"].as_str().unwrap_or_default().to_string(),
        message: v["error"]["message"].as_str().map_or(text, str::to_string),
    })
}

fn not_found_as_none<T>(r: Result<T, Error>) -> Result<Option<T>, Error> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(Error::Api { status: 404, .. }) => Ok(None),
        Err(e) => Err(e),
    }
}
