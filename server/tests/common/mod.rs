//! An in-process server around a tiny model, for router tests that run in milliseconds.
//!
//! The model is `model/tests/fixtures/tiny-chat`: tiny-llama's weights (2 layers, random,
//! vocabulary 512) with a byte-level BPE tokenizer without merges: ids 0..256 are the bytes,
//! 256 `<|endoftext|>` (BOS), 257 `<|im_start|>`, 258 `<|im_end|>` (EOS). Text is one token
//! per byte, so token counts in tests are predictable.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use kvquilt::serve::config::Config;
use kvquilt::serve::state::AppState;
use kvquilt::serve::{app_state, router};
use kvquilt_kvstore::{StoreConfig, TieredStore};
use kvquilt_model::{DType, Device};
use serde_json::Value;
use tower::ServiceExt;

/// The tiny chat model: `model/tests/fixtures/tiny-chat` (written by
/// `scripts/tiny_chat_fixture.py`).
pub(crate) fn tiny_chat_model() -> PathBuf {
    PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../model/tests/fixtures/tiny-chat")
}

/// A router over the tiny model and a store (host-only unless given), with `config` (its
/// model and data directory are ignored).
pub(crate) struct TestApp {
    pub state: AppState,
    pub router: Router,
}

impl TestApp {
    /// Call inside a multi-threaded tokio runtime (the blender blocks on store reads).
    pub(crate) fn new(config: Config) -> TestApp {
        let store = TieredStore::open(StoreConfig::host_only(1 << 30)).expect("store");
        Self::with_store(config, store)
    }

    /// The same over `store`.
    pub(crate) fn with_store(config: Config, store: TieredStore) -> TestApp {
        let loaded =
            kvquilt_model::load(&tiny_chat_model(), &Device::Cpu, DType::F32).expect("tiny model");
        let state = app_state(&config, loaded, Arc::new(store), &[42; 32]).expect("app state");
        TestApp {
            router: router(Arc::clone(&state)),
            state,
        }
    }

    /// One request: (status, JSON body or `null`).
    pub(crate) async fn call(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Option<Body>,
        content_type: &str,
    ) -> (StatusCode, Value) {
        let (body, headers) = match body {
            Some(b) => (b, vec![(header::CONTENT_TYPE.as_str(), content_type)]),
            None => (Body::empty(), Vec::new()),
        };
        let (status, bytes) = self.send(method, uri, token, body, &headers).await;
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// A request with a body and headers of the caller's choosing: (status, JSON or `null`).
    pub(crate) async fn call_with(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Vec<u8>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let (status, bytes) = self
            .send(method, uri, token, Body::from(body), headers)
            .await;
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// One request through the router: its status and body bytes.
    async fn send(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Body,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Vec<u8>) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req.body(body).expect("request");
        let resp = self.router.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (status, bytes.to_vec())
    }

    /// `POST /v1/blend` with `body`, which must succeed: its answer.
    pub(crate) async fn blend(&self, body: Value) -> kvquilt_api::BlendResponse {
        let (s, v) = self.json("POST", "/v1/blend", None, body).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        serde_json::from_value(v).expect("a blend answer")
    }

    /// A JSON request.
    pub(crate) async fn json(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Value,
    ) -> (StatusCode, Value) {
        self.call(
            method,
            uri,
            token,
            Some(Body::from(body.to_string())),
            "application/json",
        )
        .await
    }

    /// A streamed completion (`body` asks for `stream`): its server-sent events' JSON, in
    /// order, up to `data: [DONE]`, which must end it.
    pub(crate) async fn sse(&self, uri: &str, body: Value) -> Vec<Value> {
        let json = [(header::CONTENT_TYPE.as_str(), "application/json")];
        let body = Body::from(body.to_string());
        let (status, bytes) = self.send("POST", uri, None, body, &json).await;
        assert_eq!(status, StatusCode::OK);
        let text = String::from_utf8(bytes).expect("UTF-8 events");
        let data: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
        data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).expect("a JSON event"))
            .collect()
    }

    /// A request's raw response bytes and status (for binary bodies).
    pub(crate) async fn bytes(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> (StatusCode, Vec<u8>) {
        let object = [(
            header::CONTENT_TYPE.as_str(),
            kvquilt_api::OBJECT_MEDIA_TYPE,
        )];
        match body {
            Some(b) => self.send(method, uri, token, Body::from(b), &object).await,
            None => self.send(method, uri, token, Body::empty(), &[]).await,
        }
    }
}

/// Asserts an error response's status and code, and that its message names the problem.
#[track_caller]
pub(crate) fn assert_err(got: &(StatusCode, Value), status: u16, code: &str, says: &str) {
    assert_eq!(got.0.as_u16(), status, "{}", got.1);
    assert_eq!(got.1["error"]["code"], code, "{}", got.1);
    let msg = got.1["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(says),
        "message `{msg}` does not mention `{says}`"
    );
}

#[path = "../../../kvstore/tests/support/tmpfs.rs"]
mod tmpfs;
#[allow(unused_imports)] // not every test binary mounts one
pub(crate) use tmpfs::Tmpfs;
