//! Token policies through the API (issue 14): `kvquilt.compress` on chat completions and
//! `/v1/blend` prunes the prompt's KV for decoding and says what it kept; bad specs are 400
//! `invalid_compression` naming the problem and run nothing.

mod common;

use axum::http::StatusCode;
use common::TestApp;
use kvquilt::serve::config::Config;
use serde_json::{Value, json};

const DOCS: [&str; 3] = [
    "The Zorblat Tower stands in the town of Quenmoor. It was finished in 1911 by a guild of masons.",
    "Quenmoor is a fishing town on the northern coast, known for its grey stone harbour walls.",
    "The harbour of Quenmoor was rebuilt after the storm of 1953, which broke the old pier.",
];

fn chat(compress: Value) -> Value {
    json!({
        "messages": [{"role": "user", "content": "When was the tower finished?"}],
        "documents": DOCS,
        "max_tokens": 8,
        "temperature": 0,
        "kvquilt": {"mode": "full", "compress": compress},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_completion_decodes_over_the_compressed_kv_and_says_what_it_kept() {
    let app = TestApp::new(Config::default());
    let (s, v) = app
        .json(
            "POST",
            "/v1/chat/completions",
            None,
            chat(json!({"policy": "snapkv", "window": 4, "compression": 4})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let c = &v["kvquilt"]["compression"];
    assert_eq!(c["applied"], true, "{v}");
    assert!(
        c["policy"].as_str().unwrap().starts_with("snapkv:window=4"),
        "{c}"
    );
    let (before, kept) = (
        c["entries_before"].as_u64().unwrap(),
        c["entries_kept"].as_u64().unwrap(),
    );
    let tokens = v["kvquilt"]["tokens"].as_u64().unwrap();
    let config = app.state.blender.model().config().clone();
    let per_token = (config.num_layers * config.num_kv_heads) as u64;
    assert_eq!(before, tokens * per_token);
    assert_eq!(kept, tokens / 4 * per_token);
    assert!(c["kv_bytes_after"].as_u64().unwrap() < c["kv_bytes_before"].as_u64().unwrap());
    // SnapKV's window was re-run over the prompt's KV to observe it: its time is reported
    // beside the policy's choice and the pruning's
    for time in ["observe_ms", "policy_ms", "prune_ms"] {
        assert!(c[time].as_f64().is_some_and(|t| t > 0.0), "{time}: {c}");
    }
    assert!(!v["choices"][0]["message"]["content"].is_null());

    // a budget in entries, and the other policies a request can run
    for spec in [
        json!({"policy": "sage", "sinks": 2, "window": 8, "budget": 24}),
        json!({"policy": "streaming", "sinks": 4, "compression": 2}),
    ] {
        let (s, v) = app
            .json("POST", "/v1/chat/completions", None, chat(spec.clone()))
            .await;
        assert_eq!(s, StatusCode::OK, "{spec}: {v}");
        assert_eq!(v["kvquilt"]["compression"]["applied"], true, "{v}");
    }
    let (s, v) = app
        .json(
            "POST",
            "/v1/chat/completions",
            None,
            chat(json!({"policy": "sage", "budget": 24, "sinks": 2, "window": 8})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        v["kvquilt"]["compression"]["entries_kept"].as_u64(),
        Some(24 * per_token)
    );

    let (_, metrics) = app.bytes("GET", "/metrics", None, None).await;
    let text = String::from_utf8(metrics).unwrap();
    assert!(
        text.contains("kvquilt_compressed_requests_total{policy=\"snapkv\",outcome=\"applied\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("kvquilt_compressed_requests_total{policy=\"sage\",outcome=\"applied\"} 2"),
        "{text}"
    );
    assert!(text.contains("kvquilt_kv_entries_kept_total"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blend_reports_compression_and_keeps_the_uncompressed_first_token() {
    let app = TestApp::new(Config::default());
    let q = "When was the tower finished?";
    let plain = app
        .blend(json!({"question": q, "chunks": DOCS, "mode": "full"}))
        .await;
    assert!(plain.stats.compression.is_none());
    let packed = app
        .blend(json!({"question": q, "chunks": DOCS, "mode": "full",
            "compress": {"policy": "streaming", "compression": 3}}))
        .await;
    let c = packed.stats.compression.expect("compression stats");
    assert!(c.applied, "{c:?}");
    assert_eq!(
        c.entries_kept,
        packed.stats.tokens / 3 * c.entries_before / packed.stats.tokens
    );
    assert_eq!(packed.token.id, plain.token.id);
}

/// A spec that parses but that this prompt cannot hold (its N× budget, known only once the
/// prompt is tokenized, is below what the policy always keeps) is refused like a bad spec:
/// 400 `invalid_compression` naming both numbers, before anything runs or is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_this_prompt_cannot_hold_is_refused_before_anything_runs() {
    let app = TestApp::new(Config::default());
    // 4 sinks + 1,000 recent rows do not fit half of this prompt
    let spec = json!({"policy": "sage", "sinks": 4, "window": 1000, "compression": 2});
    let (s, v) = app
        .json("POST", "/v1/chat/completions", None, chat(spec))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], "invalid_compression", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("below the") && message.contains("4 sinks + 1000 recent"),
        "{message}"
    );

    // the same prompt with a window its half can hold runs
    let spec = json!({"policy": "sage", "sinks": 4, "window": 8, "compression": 2});
    let (s, v) = app
        .json("POST", "/v1/chat/completions", None, chat(spec))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["kvquilt"]["compression"]["applied"], true, "{v}");

    let (_, metrics) = app.bytes("GET", "/metrics", None, None).await;
    let text = String::from_utf8(metrics).unwrap();
    assert!(
        text.contains("kvquilt_compressed_requests_total{policy=\"sage\",outcome=\"applied\"} 1"),
        "{text}"
    );
    assert!(!text.contains("outcome=\"fell_back\""), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_compression_specs_are_refused_before_anything_runs() {
    let app = TestApp::new(Config::default());
    let cases = [
        (json!({"policy": "pyramid", "compression": 2}), "pyramid"),
        (json!({"policy": "snapkv", "compression": 1}), "> 1"),
        (json!({"policy": "snapkv", "compression": 0.5}), "> 1"),
        (json!({"policy": "snapkv"}), "exactly one"),
        (
            json!({"policy": "snapkv", "compression": 2, "budget": 8}),
            "exactly one",
        ),
        (json!({"policy": "snapkv", "budget": 0}), "at least 1"),
        (
            json!({"policy": "h2o", "compression": 2}),
            "every prompt row",
        ),
        (
            json!({"policy": "full", "compression": 2}),
            "compresses nothing",
        ),
        (
            json!({"policy": "snapkv:kernel=4", "compression": 2}),
            "kernel",
        ),
        (
            json!({"policy": "streaming", "window": 8, "compression": 2}),
            "window",
        ),
        // 4 sinks + 64 recent do not fit 10 entries per head
        (
            json!({"policy": "sage", "budget": 10}),
            "4 sinks + 64 recent",
        ),
        // a window as wide as a u64 once wrapped around and was applied
        (
            json!({"policy": "sage", "budget": 6, "window": u64::MAX}),
            "recent",
        ),
        (
            json!({"policy": "snapkv", "compression": 2, "window": u64::MAX}),
            "recent",
        ),
        // a `sage` pool rolls the `sage` policy's window: without it, or at another size
        (
            json!({"policy": "snapkv", "compression": 2, "decode": {"policy": "sage", "budget": 4}}),
            "give `\"policy\": \"sage\"`",
        ),
        (
            json!({"decode": {"policy": "sage", "budget": 4}}),
            "give `\"policy\": \"sage\"`",
        ),
        (
            json!({"policy": "sage", "window": 8, "budget": 16, "decode": {"policy": "sage", "budget": 4}}),
            "that window (8), not 4",
        ),
        // a slack past the budget would hold the pool to nothing
        (
            json!({"policy": "sage", "window": 4, "budget": 16,
                "decode": {"policy": "sage", "budget": 4, "slack": 5}}),
            "at most its budget (4)",
        ),
    ];
    for (spec, says) in cases {
        let r = app
            .json("POST", "/v1/chat/completions", None, chat(spec.clone()))
            .await;
        common::assert_err(&r, 400, "invalid_compression", says);
        let r = app
            .json(
                "POST",
                "/v1/blend",
                None,
                json!({"question": "Why?", "chunks": DOCS, "compress": spec}),
            )
            .await;
        common::assert_err(&r, 400, "invalid_compression", says);
    }
    // a decode pool where nothing is decoded
    let r = app
        .json(
            "POST",
            "/v1/blend",
            None,
            json!({"question": "Why?", "chunks": DOCS,
                "compress": {"decode": {"policy": "scope-slide", "budget": 8}}}),
        )
        .await;
    common::assert_err(&r, 400, "invalid_compression", "first token only");
    // an unknown field is a malformed body
    let (s, _) = app
        .json(
            "POST",
            "/v1/chat/completions",
            None,
            chat(json!({"policy": "snapkv", "compression": 2, "ratio": 4})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // so is a misspelled field of `kvquilt` (it once ran the default mode instead)
    let mut typo = chat(json!({"policy": "snapkv", "compression": 2}));
    typo["kvquilt"]["mdoe"] = json!("prefix");
    let r = app.json("POST", "/v1/chat/completions", None, typo).await;
    common::assert_err(&r, 400, "malformed_json", "mdoe");
    // nothing ran: no request was counted
    let (_, metrics) = app.bytes("GET", "/metrics", None, None).await;
    let text = String::from_utf8(metrics).unwrap();
    assert!(
        !text.contains("kvquilt_compressed_requests_total{"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_pool_holds_generated_kv_to_its_budget() {
    let app = TestApp::new(Config::default());
    let ask = |compress: Value| {
        let mut body = chat(compress);
        body["max_tokens"] = json!(24);
        body["kvquilt"] = json!({"mode": "full", "compress": body["kvquilt"]["compress"].clone()});
        body
    };
    let plain = {
        let mut body = chat(Value::Null);
        body["max_tokens"] = json!(24);
        body["kvquilt"] = json!({"mode": "full"});
        let (s, v) = app.json("POST", "/v1/chat/completions", None, body).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    };
    // a pool larger than the generation never evicts: the same greedy answer
    let (s, roomy) = app
        .json(
            "POST",
            "/v1/chat/completions",
            None,
            ask(json!({"decode": {"policy": "scope-slide", "budget": 64}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{roomy}");
    assert_eq!(
        roomy["choices"][0]["message"]["content"],
        plain["choices"][0]["message"]["content"]
    );
    // a budget far past the generation reserves room for what the generation can add, not
    // for the budget (which sized the decoder's cache: a billion rows aborted the process)
    let (s, vast) = app
        .json(
            "POST",
            "/v1/chat/completions",
            None,
            ask(json!({"decode": {"policy": "scope-slide", "budget": 1_000_000_000u64}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{vast}");
    assert_eq!(
        vast["choices"][0]["message"]["content"],
        plain["choices"][0]["message"]["content"]
    );
    assert!(
        roomy["kvquilt"]["compression"].is_null(),
        "no prompt policy: {roomy}"
    );
    let (_, metrics) = app.bytes("GET", "/metrics", None, None).await;
    let text = String::from_utf8(metrics).unwrap();
    assert!(
        text.contains("kvquilt_decode_pool_reselections_total 0"),
        "{text}"
    );
    // a 4-row pool over 24 generated tokens is reselected as it fills, and decoding goes on
    for policy in ["scope-slide", "scope-discontinuous", "h2o", "streaming"] {
        let (s, v) = app
            .json(
                "POST",
                "/v1/chat/completions",
                None,
                ask(json!({"policy": "snapkv", "window": 4, "compression": 2,
                    "decode": {"policy": policy, "budget": 4}})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{policy}: {v}");
        assert_eq!(v["kvquilt"]["compression"]["applied"], true, "{v}");
    }
    assert!(reselections(&app).await > 0);
    // SAGE-KV whole: its window rolls on every step after the first token (the cache keeps
    // its size), where a pool that started empty would wait until its budget filled; with a
    // slack of k it is rebuilt once per k + 1 steps
    for slack in [0u64, 3] {
        let before = reselections(&app).await;
        let (s, v) = app
            .json(
                "POST",
                "/v1/chat/completions",
                None,
                ask(
                    json!({"policy": "sage", "sinks": 2, "window": 4, "budget": 12,
                    "decode": {"policy": "sage", "budget": 4, "slack": slack}}),
                ),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["kvquilt"]["compression"]["applied"], true, "{v}");
        let generated = v["usage"]["completion_tokens"].as_u64().unwrap();
        assert!(generated > 4, "{v}");
        let steps = generated - 1;
        let after = reselections(&app).await;
        assert_eq!(
            after - before,
            steps / (slack + 1),
            "slack {slack}, {steps} steps"
        );
    }
}

/// `kvquilt_decode_pool_reselections_total` as `/metrics` reports it now.
async fn reselections(app: &TestApp) -> u64 {
    let (_, metrics) = app.bytes("GET", "/metrics", None, None).await;
    let text = String::from_utf8(metrics).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("kvquilt_decode_pool_reselections_total "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no reselection counter in {text}"))
}

/// Concurrent chat completions decode through the decode batcher (`limits.workers = 4`,
/// `limits.decode_batch = 4`), compressed caches beside full ones: each answer is the one the request
/// gets alone, every decode step went through the batcher (in a batch, or as a batch of one
/// on its own thread while it had no company), and no session is left open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_completions_decode_in_batches_and_answer_as_alone() {
    let mut config = Config::default();
    config.limits.workers = 4;
    config.limits.decode_batch = Some(4);
    let app = TestApp::new(config);
    let mut bodies = vec![
        chat(json!({"policy": "snapkv", "window": 4, "compression": 4})),
        chat(json!({"policy": "streaming", "sinks": 4, "compression": 2})),
        chat(Value::Null),
        chat(Value::Null),
    ];
    bodies[3]["messages"][0]["content"] = json!("Which town is on the northern coast?");
    for b in &mut bodies {
        b["max_tokens"] = json!(32);
    }
    let answer = |v: &Value| {
        (
            v["choices"][0]["message"]["content"].clone(),
            v["usage"]["completion_tokens"].as_u64().unwrap(),
        )
    };
    let mut alone = Vec::new();
    for b in &bodies {
        let (s, v) = app
            .json("POST", "/v1/chat/completions", None, b.clone())
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        alone.push(answer(&v));
    }
    let before = app.state.blender.decode_batch_stats().expect("batching on");
    let together = futures_util::future::join_all(
        bodies
            .iter()
            .map(|b| app.json("POST", "/v1/chat/completions", None, b.clone())),
    )
    .await;
    let mut steps = 0;
    for (i, ((s, v), want)) in together.iter().zip(&alone).enumerate() {
        assert_eq!(*s, StatusCode::OK, "{v}");
        assert_eq!(&answer(v), want, "request {i}");
        // the first token comes from the prompt's logits, each later one from a step
        steps += want.1 - 1;
    }
    let after = app.state.blender.decode_batch_stats().unwrap();
    assert_eq!(after.steps - before.steps, steps, "{before:?} → {after:?}");
    assert_eq!(after.sessions, 0);
    assert_eq!(after.split, 0);
}
