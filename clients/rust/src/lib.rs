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
//! Every API error arrives as [`Error::Api`] with the server's status, code and message
//! (and `Retry-After`, when the server gave one). A chunk id that is not 64 hexadecimal
//! digits is refused before anything is sent.

#![warn(missing_docs)]

mod error;

pub use error::Error;
/// The wire format the server shares (every body, the error shape, the route list).
pub use kvquilt_api as api;
pub use kvquilt_api::openai::{
    AssistantMessage, ChatChoice, ChatMessage, ChatRequest, ChatResponse, CommonFields,
    CompletionChoice, CompletionRequest, CompletionResponse, Content, ModelCalibration, ModelList,
    PromptTokensDetails, Stop, Usage,
};
pub use kvquilt_api::{
    BlendRequest, BlendResponse, BlendStats, ChunkInfo, ChunkLookup, ChunkOutcome, ChunkRef,
    ChunkStatus, DeleteChunkResponse, Health, Layout, LookupChunksRequest, LookupChunksResponse,
    ModeSpec, OBJECT_MEDIA_TYPE, PinRequest, Pinned, PutChunksRequest, PutChunksResponse,
    SegmentSource, Stats, Tier, TokenLogprob,
};
/// The HTTP method of a [`Client::raw`] request.
pub use reqwest::Method;

use bytes::Bytes;
use reqwest::{RequestBuilder, Response, StatusCode};
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

/// Most time to open a connection ([`Client::new`]'s HTTP client).
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Most time [`Client::new`]'s HTTP client waits for the next bytes of an answer (not a
/// bound on the whole answer, which a long completion may take).
pub const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

impl Client {
    /// `base_url` like `http://127.0.0.1:8077` (no trailing `/v1`). Connecting may take
    /// [`CONNECT_TIMEOUT`], and an answer may pause [`READ_TIMEOUT`] between bytes: a server
    /// that stops answering is an error, not a hang.
    pub fn new(base_url: &str) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self {
            http,
            base: base_url.trim_end_matches('/').to_string(),
            token: None,
        }
    }

    /// Sends `Authorization: Bearer <token>` with every request.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Uses a configured `reqwest::Client` (pools, proxies, TLS — this crate builds reqwest
    /// without it — and its own timeouts: prefer `read_timeout` to `timeout`, which bounds a
    /// whole answer, streamed or not).
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

    /// `GET /v1/chunks/{id}`; `None` when the id is unknown (to this tenant: the server's
    /// `unknown_chunk`; any other 404, such as a base URL with a path the server does not
    /// serve, is an error).
    pub async fn chunk(&self, id: &str, include_tokens: bool) -> Result<Option<ChunkInfo>, Error> {
        let r = self
            .request(Method::GET, &format!("/v1/chunks/{}", chunk_id(id)?))
            .query(&[("include_tokens", include_tokens)]);
        unknown_chunk_as_none(self.json(r).await)
    }

    /// `HEAD /v1/chunks/{id}`. (A `HEAD` answer has no body to tell an unknown chunk from
    /// an unknown route: a base URL with a wrong path reads as `false` here; `chunk` tells.)
    pub async fn chunk_exists(&self, id: &str) -> Result<bool, Error> {
        let resp = self
            .request(Method::HEAD, &format!("/v1/chunks/{}", chunk_id(id)?))
            .send()
            .await?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(false),
            s if s.is_success() => Ok(true),
            s => Err(Error::Api {
                status: s.as_u16(),
                code: String::new(),
                message: format!("HEAD answered {s}"),
                retry_after: retry_after(&resp),
            }),
        }
    }

    /// `DELETE /v1/chunks/{id}`; false when it was not stored (`unknown_chunk`).
    pub async fn delete_chunk(&self, id: &str) -> Result<bool, Error> {
        let r = self.request(Method::DELETE, &format!("/v1/chunks/{}", chunk_id(id)?));
        Ok(unknown_chunk_as_none(check(r.send().await?).await)?.is_some())
    }

    /// `DELETE /v1/chunks/{id}?descendants=true`: a page of a conversation (an id of the
    /// stats' `link_ids`) and every page after it, in every conversation of this tenant's
    /// through it; the ids deleted, the furthest first. `None` when the id is unknown.
    pub async fn delete_chain(&self, id: &str) -> Result<Option<Vec<String>>, Error> {
        let r = self
            .request(Method::DELETE, &format!("/v1/chunks/{}", chunk_id(id)?))
            .query(&[("descendants", true)]);
        let answer: Option<DeleteChunkResponse> = unknown_chunk_as_none(self.json(r).await)?;
        Ok(answer.map(|a| a.deleted))
    }

    /// `POST /v1/chunks/lookup`: where each chunk is held (`tier` `None`: nowhere), computing
    /// and storing nothing; with `prefetch`, those held below the host tier are read up into
    /// it after the answer.
    pub async fn lookup(
        &self,
        chunks: &[ChunkRef],
        prefetch: bool,
    ) -> Result<Vec<ChunkLookup>, Error> {
        let body = LookupChunksRequest {
            chunks: chunks.to_vec(),
            prefetch,
        };
        let r: LookupChunksResponse = self.post("/v1/chunks/lookup", &body).await?;
        Ok(r.chunks)
    }

    /// `POST /v1/chunks/{id}/pin`: keeps the chunk from eviction in the local tiers, until
    /// [`Client::unpin`] or for `ttl_s` seconds; its metadata, `None` when the id is unknown.
    /// The operator's tokens pin freely, a tenant's up to its `pin_bytes` (past it, an API
    /// error with code `pin_budget_exceeded`).
    pub async fn pin(&self, id: &str, ttl_s: Option<u64>) -> Result<Option<ChunkInfo>, Error> {
        let r = self
            .request(Method::POST, &format!("/v1/chunks/{}/pin", chunk_id(id)?))
            .json(&PinRequest { ttl_s });
        unknown_chunk_as_none(self.json(r).await)
    }

    /// `DELETE /v1/chunks/{id}/pin`: lets the chunk be evicted again; its metadata, `None`
    /// when the id is unknown.
    pub async fn unpin(&self, id: &str) -> Result<Option<ChunkInfo>, Error> {
        let r = self.request(Method::DELETE, &format!("/v1/chunks/{}/pin", chunk_id(id)?));
        unknown_chunk_as_none(self.json(r).await)
    }

    /// `GET /v1/chunks/{id}/kv`: the KV object's bytes; `None` when the id is unknown.
    pub async fn chunk_kv(&self, id: &str) -> Result<Option<Bytes>, Error> {
        let r = self.request(Method::GET, &format!("/v1/chunks/{}/kv", chunk_id(id)?));
        match unknown_chunk_as_none(check(r.send().await?).await)? {
            Some(resp) => Ok(Some(resp.bytes().await?)),
            None => Ok(None),
        }
    }

    /// `PUT /v1/chunks/{id}/kv`: stores an object (verified by the server).
    pub async fn put_chunk_kv(&self, id: &str, object: Bytes) -> Result<ChunkStatus, Error> {
        let r = self
            .request(Method::PUT, &format!("/v1/chunks/{}/kv", chunk_id(id)?))
            .header(reqwest::header::CONTENT_TYPE, OBJECT_MEDIA_TYPE)
            .body(object);
        self.json(r).await
    }

    /// `POST /v1/blend`: the first token of a RAG prompt assembled from chunks.
    pub async fn blend(&self, req: &BlendRequest) -> Result<BlendResponse, Error> {
        self.post("/v1/blend", req).await
    }

    /// `POST /v1/chat/completions` (not streaming, whatever `req.common.stream` says).
    pub async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, Error> {
        if req.common.stream {
            // a streamed answer is no JSON body: this call reads the whole one
            let mut whole = req.clone();
            whole.common.stream = false;
            return self.post("/v1/chat/completions", &whole).await;
        }
        self.post("/v1/chat/completions", req).await
    }

    /// `POST /v1/completions` (not streaming, whatever `req.common.stream` says).
    pub async fn completion(&self, req: &CompletionRequest) -> Result<CompletionResponse, Error> {
        if req.common.stream {
            let mut whole = req.clone();
            whole.common.stream = false;
            return self.post("/v1/completions", &whole).await;
        }
        self.post("/v1/completions", req).await
    }

    /// `POST /v1/chat/completions` with `stream: true` (and the usage event asked for),
    /// read as it comes: [`ChatStream::next`] yields each piece of the answer when the
    /// server sends it, then one [`ChatEvent::End`] with the finish reason, the usage and
    /// the blend's stats. A stream that ends before `[DONE]` yields an error instead of
    /// the end.
    pub async fn chat_events(&self, req: &ChatRequest) -> Result<ChatStream, Error> {
        let mut body = serde_json::to_value(req).map_err(|e| Error::Decode(e.to_string()))?;
        body["stream"] = Value::Bool(true);
        body["stream_options"] = serde_json::json!({ "include_usage": true });
        let resp = check(
            self.request(Method::POST, "/v1/chat/completions")
                .json(&body)
                .send()
                .await?,
        )
        .await?;
        Ok(ChatStream {
            resp,
            buf: Vec::new(),
            end: StreamedChat::default(),
            done: false,
            eof: false,
        })
    }

    /// [`Client::chat_events`] read to its end: the whole streamed answer — its pieces in
    /// order, the finish reason, the usage and the blend's stats. A stream that ends before
    /// `[DONE]` is an error.
    pub async fn chat_stream(&self, req: &ChatRequest) -> Result<StreamedChat, Error> {
        let mut stream = self.chat_events(req).await?;
        let mut pieces = Vec::new();
        while let Some(event) = stream.next().await {
            match event? {
                ChatEvent::Piece(p) => pieces.push(p),
                ChatEvent::End {
                    finish_reason,
                    usage,
                    stats,
                } => {
                    return Ok(StreamedChat {
                        pieces,
                        finish_reason,
                        usage,
                        stats,
                    });
                }
            }
        }
        Err(Error::Decode("the stream yielded no end".into()))
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
        // (an answer without a body, as `DELETE`'s 204, is `null`)
        let bytes = check(r.send().await?).await?.bytes().await?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| Error::Decode(e.to_string()))
    }
}

/// One event of a streamed chat completion ([`ChatStream::next`]).
#[derive(Debug, Clone, PartialEq)]
pub enum ChatEvent {
    /// A piece of the answer's text, as the server sent it (never empty).
    Piece(String),
    /// The end of a whole answer (after `[DONE]`), last and once.
    End {
        /// Why generation ended (`stop`, `length`).
        finish_reason: Option<String>,
        /// The usage event's counts.
        usage: Option<Usage>,
        /// The blend's stats (`kvquilt`), as sent (`Value::Null` if none came).
        stats: Value,
    },
}

/// A streamed chat completion being read ([`Client::chat_events`]).
#[derive(Debug)]
pub struct ChatStream {
    resp: Response,
    /// Bytes received and not yet read as whole lines.
    buf: Vec<u8>,
    /// What the events so far said of the end (its `pieces` unused).
    end: StreamedChat,
    /// Whether the end or an error was yielded: nothing more comes.
    done: bool,
    /// Whether the body ended (what is left in `buf` is all there is).
    eof: bool,
}

impl ChatStream {
    /// The next event: a piece as soon as its line arrives, then the end; `None` after the
    /// end or an error. An error event of the server (`{"error": …}` in the stream), a line
    /// that is not JSON, a read that fails or a stream cut before `[DONE]` is an error, and
    /// the last event.
    pub async fn next(&mut self) -> Option<Result<ChatEvent, Error>> {
        if self.done {
            return None;
        }
        let event = self.read_event().await;
        if !matches!(event, Ok(ChatEvent::Piece(_))) {
            self.done = true;
        }
        Some(event)
    }

    async fn read_event(&mut self) -> Result<ChatEvent, Error> {
        loop {
            while let Some(at) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=at).collect();
                let line = String::from_utf8_lossy(&line);
                let Some(data) = line.trim_end().strip_prefix("data:") else {
                    continue;
                };
                let data = data.strip_prefix(' ').unwrap_or(data);
                if data == "[DONE]" {
                    let end = std::mem::take(&mut self.end);
                    return Ok(ChatEvent::End {
                        finish_reason: end.finish_reason,
                        usage: end.usage,
                        stats: end.stats,
                    });
                }
                if let Some(piece) = self.read_data(data)? {
                    return Ok(ChatEvent::Piece(piece));
                }
            }
            if self.eof {
                return Err(Error::Decode(
                    "the stream ended before [DONE]: the answer is not whole".into(),
                ));
            }
            match self.resp.chunk().await? {
                Some(bytes) => self.buf.extend_from_slice(&bytes),
                None => {
                    // a last line without its line break is still read
                    self.eof = true;
                    if !self.buf.is_empty() {
                        self.buf.push(b'\n');
                    }
                }
            }
        }
    }

    /// One event's JSON: its piece of text, if any; the finish reason, usage and stats are
    /// kept for the end.
    fn read_data(&mut self, data: &str) -> Result<Option<String>, Error> {
        let v: Value = serde_json::from_str(data).map_err(|e| Error::Decode(e.to_string()))?;
        if let Some(e) = v.get("error") {
            return Err(Error::Api {
                status: 200,
                code: e["code"].as_str().unwrap_or_default().to_string(),
                message: e["message"].as_str().unwrap_or_default().to_string(),
                retry_after: None,
            });
        }
        let choice = &v["choices"][0];
        if let Some(f) = choice["finish_reason"].as_str() {
            self.end.finish_reason = Some(f.to_string());
        }
        if v.get("usage").is_some_and(|u| !u.is_null()) {
            self.end.usage = Some(
                serde_json::from_value(v["usage"].clone())
                    .map_err(|e| Error::Decode(format!("the usage event: {e}")))?,
            );
        }
        if let Some(stats) = v.get("kvquilt").filter(|s| !s.is_null()) {
            self.end.stats = stats.clone();
        }
        Ok(choice["delta"]["content"]
            .as_str()
            .filter(|c| !c.is_empty())
            .map(str::to_string))
    }
}

/// A streamed chat completion, whole ([`Client::chat_stream`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamedChat {
    /// The content pieces, in the order they arrived.
    pub pieces: Vec<String>,
    /// Why generation ended (`stop`, `length`).
    pub finish_reason: Option<String>,
    /// The usage event's counts.
    pub usage: Option<Usage>,
    /// The blend's stats (`kvquilt`), as sent (`Value::Null` if none came).
    pub stats: Value,
}

/// `id` when it is a chunk id (64 hexadecimal digits), else [`Error::InvalidInput`] before
/// anything is sent (an empty or odd id would address another route).
fn chunk_id(id: &str) -> Result<&str, Error> {
    if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(id)
    } else {
        Err(Error::InvalidInput(format!(
            "a chunk id is 64 hexadecimal digits, not {id:?}"
        )))
    }
}

/// The `Retry-After` of `resp`, in its delta-seconds form (what the server sends).
fn retry_after(resp: &Response) -> Option<std::time::Duration> {
    let v = resp.headers().get(reqwest::header::RETRY_AFTER)?;
    v.to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(std::time::Duration::from_secs)
}

/// Turns a non-success response into [`Error::Api`] with the server's code and message.
async fn check(resp: Response) -> Result<Response, Error> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let retry_after = retry_after(&resp);
    let text = resp.text().await.unwrap_or_default();
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    Err(Error::Api {
        status: status.as_u16(),
        code: v["error"]["code"].as_str().unwrap_or_default().to_string(),
        message: v["error"]["message"].as_str().map_or(text, str::to_string),
        retry_after,
    })
}

/// `None` for the server's `unknown_chunk`; any other error stays one (a 404 for an unknown
/// route is not an absent chunk).
fn unknown_chunk_as_none<T>(r: Result<T, Error>) -> Result<Option<T>, Error> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.code() == Some("unknown_chunk") => Ok(None),
        Err(e) => Err(e),
    }
}
