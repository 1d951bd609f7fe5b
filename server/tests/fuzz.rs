//! Property fuzzing of the API (stable Rust, proptest): JSON bodies built from the API's own
//! field names with values of every JSON kind and size, raw bytes, and mutated KV objects,
//! sent to every route that takes a body; and the TOML config parser. The property: no
//! 5xx, no panic, and every error is a JSON error body.
//!
//! Cases: `PROPTEST_CASES` (256 by default, in CI); `scripts/fuzz.sh` runs a longer budget.

mod common;

use axum::body::Body;
use axum::http::StatusCode;
use common::TestApp;
use kvquilt::serve::config::{Config, Limits};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};
use serde_json::{Map, Value, json};

/// Field names the API knows (and a few it does not).
const FIELDS: &[&str] = &[
    "chunks",
    "question",
    "system",
    "instruction",
    "prefix_tokens",
    "suffix_tokens",
    "mode",
    "ratio",
    "top_logprobs",
    "messages",
    "role",
    "content",
    "documents",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stream",
    "kvquilt",
    "id",
    "text",
    "tokens",
    "n",
    "stop",
    "seed",
    "logprobs",
    "model",
    "type",
    "surprise",
];

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (0u64..600).prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop_oneof![Just(0.0f64), Just(-1.0), Just(1e308), Just(0.3), Just(2.5)]
            .prop_map(Value::from),
        "\\PC{0,24}".prop_map(Value::from),
        prop_oneof![
            Just("blend"),
            Just("reuse"),
            Just("prefix"),
            Just("full"),
            Just("user"),
            Just("system"),
            Just("assistant"),
            Just("text"),
        ]
        .prop_map(Value::from),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((proptest::sample::select(FIELDS), inner), 0..6).prop_map(
                |kv| {
                    let m: Map<String, Value> =
                        kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
                    Value::Object(m)
                }
            ),
        ]
    })
}

/// A request body: a valid request of the route with edits, a JSON object of API fields,
/// or raw bytes.
#[derive(Debug, Clone)]
enum BodyKind {
    Json(Value),
    Raw(Vec<u8>),
}

/// One valid request per route, to mutate (so that the fuzzer reaches past validation).
fn template(uri: &str, which: usize) -> Value {
    match (uri, which % 2) {
        ("/v1/chunks", _) => {
            json!({"chunks": ["The tide turns at noon.", {"text": "Gulls."}, {"tokens": [5, 6, 7]}]})
        }
        ("/v1/blend", 0) => {
            json!({"question": "When?", "chunks": ["The tide turns at noon."], "mode": "blend", "ratio": 0.3, "top_logprobs": 3})
        }
        ("/v1/blend", _) => {
            json!({"prefix_tokens": [1, 2], "suffix_tokens": [3, 4], "chunks": [{"tokens": [5, 6, 7]}], "mode": "reuse"})
        }
        ("/v1/completions", _) => {
            json!({"prompt": "Hi", "documents": ["A doc."], "max_tokens": 2, "logprobs": 2})
        }
        _ => {
            json!({"messages": [{"role": "user", "content": "hi"}], "documents": ["A doc."], "max_tokens": 2, "stream": (which % 2 == 1), "kvquilt": {"mode": "blend", "ratio": 0.5}})
        }
    }
}

/// One edit of a JSON body: at a top-level field (or an element or field one level down),
/// set a value, remove it, or add a field.
#[derive(Debug, Clone)]
enum JsonEdit {
    Set(usize, Option<usize>, Value),
    Remove(usize),
    Add(&'static str, Value),
}

fn json_edit() -> impl Strategy<Value = JsonEdit> {
    prop_oneof![
        3 => (any::<usize>(), proptest::option::of(any::<usize>()), json_value())
            .prop_map(|(i, j, v)| JsonEdit::Set(i, j, v)),
        1 => any::<usize>().prop_map(JsonEdit::Remove),
        1 => (proptest::sample::select(FIELDS), json_value()).prop_map(|(k, v)| JsonEdit::Add(k, v)),
    ]
}

fn edit_json(body: &mut Value, e: &JsonEdit) {
    let Value::Object(m) = body else { return };
    let keys: Vec<String> = m.keys().cloned().collect();
    let key = |i: &usize| keys.get(i % keys.len().max(1)).cloned();
    match e {
        JsonEdit::Set(i, inner, v) => {
            let Some(k) = key(i) else { return };
            let slot = m.get_mut(&k).expect("a listed key");
            match (inner, slot) {
                (Some(j), Value::Array(a)) if !a.is_empty() => {
                    let n = a.len();
                    a[j % n] = v.clone();
                }
                (Some(j), Value::Object(o)) if !o.is_empty() => {
                    let ik: Vec<String> = o.keys().cloned().collect();
                    o.insert(ik[j % ik.len()].clone(), v.clone());
                }
                (_, slot) => *slot = v.clone(),
            }
        }
        JsonEdit::Remove(i) => {
            if let Some(k) = key(i) {
                m.remove(&k);
            }
        }
        JsonEdit::Add(k, v) => {
            m.insert(k.to_string(), v.clone());
        }
    }
}

fn body(uri: &'static str) -> impl Strategy<Value = BodyKind> {
    prop_oneof![
        6 => (any::<usize>(), proptest::collection::vec(json_edit(), 0..4)).prop_map(move |(w, edits)| {
            let mut v = template(uri, w);
            for e in &edits {
                edit_json(&mut v, e);
            }
            BodyKind::Json(v)
        }),
        2 => proptest::collection::vec((proptest::sample::select(FIELDS), json_value()), 0..6)
            .prop_map(|kv| {
                let m: Map<String, Value> = kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
                BodyKind::Json(Value::Object(m))
            }),
        1 => json_value().prop_map(BodyKind::Json),
        1 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(BodyKind::Raw),
    ]
}

const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/chunks"),
    ("POST", "/v1/blend"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
];

/// Small limits, so that every accepted request is quick on the tiny model.
fn config() -> Config {
    let defaults = Config::default();
    Config {
        limits: Limits {
            max_request_tokens: 300,
            max_new_tokens: 4,
            ..defaults.limits.clone()
        },
        ..defaults
    }
}

/// A runtime and the app on the tiny model (built inside it).
fn app() -> (tokio::runtime::Runtime, TestApp) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = rt.block_on(async { TestApp::new(config()) });
    (rt, app)
}

fn runner() -> TestRunner {
    // the failure file is for crates with a lib.rs beside the test; minimised cases are
    // printed instead, to be kept as named regression tests
    TestRunner::new(RunnerConfig {
        failure_persistence: None,
        ..RunnerConfig::default()
    })
}

#[test]
fn api_bodies_never_get_a_5xx() {
    let (rt, app) = app();
    let strategy = proptest::sample::select(ROUTES)
        .prop_flat_map(|(method, uri)| (Just((method, uri)), body(uri)));
    let statuses = std::cell::RefCell::new(std::collections::BTreeMap::<u16, u64>::new());
    runner()
        .run(&strategy, |((method, uri), body)| {
            let (raw, ctype) = match &body {
                BodyKind::Json(v) => (v.to_string().into_bytes(), "application/json"),
                BodyKind::Raw(b) => (b.clone(), "application/json"),
            };
            let (status, v) =
                rt.block_on(app.call(method, uri, None, Some(Body::from(raw)), ctype));
            *statuses.borrow_mut().entry(status.as_u16()).or_default() += 1;
            prop_assert!(
                status.as_u16() < 500,
                "{method} {uri} {body:?} → {status} {v}"
            );
            if status.as_u16() >= 400 {
                prop_assert!(
                    v["error"]["code"].is_string(),
                    "{status}: not a JSON error: {v}"
                );
            }
            Ok(())
        })
        .unwrap();
    eprintln!("statuses: {:?}", statuses.borrow());
}

#[test]
fn uploaded_object_bytes_never_get_a_5xx() {
    let (rt, app) = app();
    // a real object of the served model to mutate
    let (id, object) = rt.block_on(async {
        let (s, v) = app
            .json(
                "POST",
                "/v1/chunks",
                None,
                json!({"chunks": ["The tide turns at noon."]}),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let id = v["chunks"][0]["id"].as_str().unwrap().to_string();
        let (s, bytes) = app
            .bytes("GET", &format!("/v1/chunks/{id}/kv"), None, None)
            .await;
        assert_eq!(s, StatusCode::OK);
        let (s, _) = app
            .call("DELETE", &format!("/v1/chunks/{id}"), None, None, "")
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        (id, bytes)
    });
    let edits = proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 0..4);
    runner()
        .run(&edits, |edits| {
            let mut b = object.clone();
            for (at, byte, op) in &edits {
                let i = at % b.len().max(1);
                match op {
                    0 if !b.is_empty() => b[i] = *byte,
                    1 => b.truncate(i),
                    _ => b.insert(i, *byte),
                }
            }
            let uri = format!("/v1/chunks/{id}/kv");
            let (status, _) = rt.block_on(app.bytes("PUT", &uri, None, Some(b)));
            prop_assert!(status.as_u16() < 500, "{edits:?} → {status}");
            if status.is_success() {
                // only the object as it was may be stored under its id
                let (s, got) = rt.block_on(app.bytes("GET", &uri, None, None));
                prop_assert_eq!(s, StatusCode::OK);
                prop_assert!(got == object, "a mutated upload was stored");
                rt.block_on(app.call("DELETE", &format!("/v1/chunks/{id}"), None, None, ""));
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn config_files_parse_or_fail_cleanly() {
    let valid = r#"
listen = "127.0.0.1:8077"
api_tokens = ["secret-token-1"]
[limits]
max_body_bytes = 1048576
max_request_tokens = 8192
workers = 1
[store]
host_bytes = 2147483648
[[tenants]]
name = "acme"
tokens = ["acme-secret-1"]
quota_bytes = 1000
"#;
    let strategy = proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 0..6);
    runner()
        .run(&strategy, |edits| {
            let mut b = valid.as_bytes().to_vec();
            for (at, byte, op) in &edits {
                let i = at % b.len().max(1);
                match op {
                    0 if !b.is_empty() => b[i] = *byte,
                    1 => {
                        b.remove(i);
                    }
                    _ => b.insert(i, *byte),
                }
            }
            let text = String::from_utf8_lossy(&b);
            if let Ok(c) = toml::from_str::<Config>(&text) {
                let _ = c.validate();
            }
            Ok(())
        })
        .unwrap();
}
