//! An in-process server around a tiny model, for router tests that run in milliseconds.
//!
//! The model is `model/tests/fixtures/tiny-llama` (2 layers, random weights, vocabulary 512)
//! with a byte-level BPE tokenizer written here: ids 0..256 are the bytes (GPT-2's byte to
//! character map, no merges), 256 `<|endoftext|>` (BOS), 257 `<|im_start|>`, 258
//! `<|im_end|>` (EOS). Text is one token per byte, so token counts in tests are predictable.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
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
use serde_json::{Value, json};
use tower::ServiceExt;

/// GPT-2's byte → printable character map: the byte-level BPE alphabet.
fn byte_chars() -> Vec<(u8, char)> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = printable.clone();
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    printable
        .into_iter()
        .zip(chars)
        .map(|(b, c)| (b as u8, char::from_u32(c).expect("a valid char")))
        .collect()
}

/// Writes the tiny chat model (weights linked from the fixture, config and tokenizer made
/// here) into `dir`.
pub(crate) fn write_tiny_chat_model(dir: &Path) -> PathBuf {
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/tiny-llama");
    std::fs::create_dir_all(dir).expect("model dir");
    let mut config: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture.join("config.json")).expect("fixture config"),
    )
    .expect("fixture config json");
    config["bos_token_id"] = json!(256);
    config["eos_token_id"] = json!(258);
    std::fs::write(dir.join("config.json"), config.to_string()).expect("config");
    std::fs::copy(
        fixture.join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .expect("weights");
    let vocab: serde_json::Map<String, Value> = byte_chars()
        .into_iter()
        .map(|(b, c)| (c.to_string(), json!(b)))
        .collect();
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(256, "<|endoftext|>"), special(257, "<|im_start|>"), special(258, "<|im_end|>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []},
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).expect("tokenizer");
    dir.to_path_buf()
}

/// A router over the tiny model and a host-only store, with `config` (its model and data
/// directory are ignored). Keep the temporary directory alive while using it.
pub(crate) struct TestApp {
    pub state: AppState,
    pub router: Router,
    _dir: tempfile::TempDir,
}

impl TestApp {
    /// Call inside a multi-threaded tokio runtime (the blender blocks on store reads).
    pub(crate) fn new(config: Config) -> TestApp {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = write_tiny_chat_model(&dir.path().join("tiny-chat"));
        let loaded = kvquilt_model::load(&path, &Device::Cpu, DType::F32).expect("tiny model");
        let store = TieredStore::open(StoreConfig::host_only(1 << 30)).expect("store");
        let state = app_state(&config, loaded, Arc::new(store)).expect("app state");
        TestApp {
            router: router(Arc::clone(&state)),
            state,
            _dir: dir,
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
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = match body {
            Some(b) => req.header(header::CONTENT_TYPE, content_type).body(b),
            None => req.body(Body::empty()),
        }
        .expect("request");
        let resp = self.router.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
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

    /// A request's raw response bytes and status (for binary bodies).
    pub(crate) async fn bytes(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> (StatusCode, Vec<u8>) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = match body {
            Some(b) => req
                .header(header::CONTENT_TYPE, kvquilt_api::OBJECT_MEDIA_TYPE)
                .body(Body::from(b)),
            None => req.body(Body::empty()),
        }
        .expect("request");
        let resp = self.router.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (status, bytes.to_vec())
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
