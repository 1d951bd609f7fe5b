//! The HTTP API end to end: the real `kvquilt serve` binary on loopback with the real
//! default model, driven by the Rust client (`clients/rust`).

mod common;

use bytes::Bytes;
use common::{Server, rt};
use kvquilt_client::{
    BlendRequest, ChatRequest, ChunkRef, Client, CompletionRequest, Message, ModeSpec,
};
use kvquilt_kvstore::{EncodedObject, KvObject};
use serde_json::json;

const DOCS: [&str; 3] = [
    "The Zorblat Tower stands in the town of Quenmoor. It was finished in 1911.",
    "The secret number is 4817.",
    "Quenmoor is a fishing town on the northern coast.",
];

fn objects(v: &serde_json::Value) -> u64 {
    v["tiers"]
        .as_array()
        .expect("tiers")
        .iter()
        .map(|t| t["objects"].as_u64().unwrap_or(0))
        .max()
        .unwrap_or(0)
}

#[test]
fn rust_client_round_trips_every_endpoint_and_a_restart_keeps_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let rt = rt();
    let server = Server::start(&data, &[]);
    let c = Client::new(&server.url);
    let (ids, blend_again) = rt.block_on(async {
        assert_eq!(c.health().await.unwrap()["status"], "ok");
        let model = c.model().await.unwrap();
        assert_eq!(model, "smollm2-135m-instruct");
        let doc = c.openapi().await.unwrap();
        assert!(doc["paths"]["/v1/chat/completions"]["post"].is_object());

        // chunks: store, look up, move the object out and back in
        let put = c.put_chunks(&DOCS.map(ChunkRef::text)).await.unwrap();
        assert_eq!(put.chunks.len(), 3);
        assert!(put.chunks.iter().all(|s| s.status == "stored"));
        let again = c.put_chunks(&[ChunkRef::text(DOCS[0])]).await.unwrap();
        assert_eq!(again.chunks[0].status, "hit");
        assert_eq!(again.chunks[0].id, put.chunks[0].id);
        let ids: Vec<String> = put.chunks.iter().map(|s| s.id.clone()).collect();
        let info = c.chunk(&ids[1], true).await.unwrap().expect("stored");
        assert_eq!(info.tokens, put.chunks[1].tokens);
        assert_eq!(info.token_ids.as_ref().map(Vec::len), Some(info.tokens));
        assert!(c.chunk_exists(&ids[1]).await.unwrap());
        let kv = c.chunk_kv(&ids[1]).await.unwrap().expect("object");
        let parsed = EncodedObject::parse(&kv, None).expect("the object format");
        assert_eq!(parsed.header.info.tokens, info.token_ids.clone().unwrap());
        assert!(c.delete_chunk(&ids[1]).await.unwrap());
        assert!(!c.chunk_exists(&ids[1]).await.unwrap());
        assert!(!c.delete_chunk(&ids[1]).await.unwrap());
        assert_eq!(
            c.put_chunk_kv(&ids[1], kv.clone()).await.unwrap().status,
            "stored"
        );
        assert_eq!(c.put_chunk_kv(&ids[1], kv).await.unwrap().status, "hit");

        // blend over stored ids; r = 1 equals full
        let refs: Vec<ChunkRef> = ids.iter().map(ChunkRef::id).collect();
        let q = "What is the secret number?";
        let b = c
            .blend(&BlendRequest::question(q, refs.clone()))
            .await
            .unwrap();
        assert_eq!(b.chunk_ids, ids);
        assert!(b.stats.hits_host + b.stats.hits_ssd >= 3 || b.stats.fell_back_to_full);
        let full = c
            .blend(&BlendRequest::question(q, refs.clone()).mode("full", None))
            .await
            .unwrap();
        let one = c
            .blend(&BlendRequest::question(q, refs.clone()).mode("blend", Some(1.0)))
            .await
            .unwrap();
        assert_eq!(full.token.id, one.token.id);
        for (a, b) in full.top_logprobs.iter().zip(&one.top_logprobs) {
            assert_eq!(a.id, b.id);
            assert!(
                (a.logprob - b.logprob).abs() < 1e-3,
                "{} vs {}",
                a.logprob,
                b.logprob
            );
        }

        // OpenAI-compatible endpoints; streaming gives the same greedy text
        let chat = ChatRequest {
            model: Some(model.clone()),
            messages: vec![Message::user(
                "What is the secret number? Answer with the number only.",
            )],
            documents: vec![
                ChunkRef::id(&ids[0]),
                ChunkRef::id(&ids[1]),
                ChunkRef::text("A new passage about boats."),
            ],
            max_tokens: Some(6),
            kvquilt: Some(ModeSpec {
                mode: Some("blend".into()),
                ratio: Some(0.3),
            }),
            ..ChatRequest::default()
        };
        let r = c.chat(&chat).await.unwrap();
        assert!(!r.choices[0].message.content.is_empty());
        assert_eq!(r.usage.prompt_tokens, r.kvquilt.tokens);
        assert!(r.usage.completion_tokens >= 1 && r.usage.completion_tokens <= 6);
        let (pieces, last) = c.chat_stream(&chat).await.unwrap();
        assert_eq!(pieces.concat(), r.choices[0].message.content);
        assert_eq!(
            last["kvquilt"]["misses"], 0,
            "the new passage was stored back"
        );
        let comp = c
            .completion(&CompletionRequest {
                prompt: "The capital of France is".into(),
                max_tokens: Some(4),
                ..CompletionRequest::default()
            })
            .await
            .unwrap();
        assert!(!comp.choices[0].text.is_empty());
        assert_eq!(comp.usage.completion_tokens, 4);

        let stats = c.stats().await.unwrap();
        assert_eq!(stats["tiers"].as_array().unwrap().len(), 2);
        let metrics = c.metrics().await.unwrap();
        assert!(metrics.contains("kvquilt_http_requests_total{"));
        assert!(metrics.contains("kvquilt_store_objects{tier=\"ssd\"}"));
        assert!(metrics.contains("kvquilt_ttft_seconds_bucket"));
        (ids, BlendRequest::question(q, refs))
    });
    assert_eq!(server.stop(), Some(0), "graceful shutdown exits 0");

    // a restart keeps every chunk (the SSD tier), and blends hit it
    let server = Server::start(&data, &[]);
    let c = Client::new(&server.url);
    rt.block_on(async {
        for id in &ids {
            let info = c
                .chunk(id, false)
                .await
                .unwrap()
                .expect("kept across restart");
            assert_eq!(info.tier, "ssd");
        }
        let b = c.blend(&blend_again.mode("reuse", None)).await.unwrap();
        assert_eq!(b.stats.misses, 0);
        assert_eq!(b.stats.hits_ssd + b.stats.hits_host, 4, "{:?}", b.stats);
    });
}

const DEFAULT_TOKEN: &str = "default-token-1";
const ACME_TOKEN: &str = "acme-token-123";

fn limited_server(dir: &std::path::Path) -> Server {
    let cfg = dir.join("kvquilt.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"api_tokens = ["{DEFAULT_TOKEN}"]

[limits]
max_body_bytes = 1048576
max_request_tokens = 200
max_chunks = 4

[[tenants]]
name = "acme"
tokens = ["{ACME_TOKEN}"]
quota_bytes = 700000
"#
        ),
    )
    .unwrap();
    Server::start(&dir.join("data"), &["--config", cfg.to_str().unwrap()])
}

/// One raw request: (status, JSON body).
async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<reqwest::Body>,
    content_type: &str,
) -> (u16, serde_json::Value) {
    let mut r = http.request(method, url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if let Some(b) = body {
        r = r.header("content-type", content_type).body(b);
    }
    let resp = r.send().await.expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

/// Asserts an error response's status and code, and that its message names the problem.
fn assert_err(got: &(u16, serde_json::Value), status: u16, code: &str, says: &str) {
    assert_eq!(got.0, status, "{}", got.1);
    assert_eq!(got.1["error"]["code"], code, "{}", got.1);
    let msg = got.1["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(says),
        "message `{msg}` does not mention `{says}`"
    );
}

#[test]
fn bad_input_is_rejected_with_a_named_problem_and_changes_nothing() {
    use reqwest::Method;
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let server = limited_server(dir.path());
    let url = server.url.clone();
    let c = Client::new(&url).with_token(DEFAULT_TOKEN);
    let acme = Client::new(&url).with_token(ACME_TOKEN);
    let http = reqwest::Client::new();
    let json_body = |v: serde_json::Value| Some(reqwest::Body::from(v.to_string()));
    const JSON: &str = "application/json";
    rt.block_on(async {
        let chunks_url = format!("{url}/v1/chunks");
        let blend_url = format!("{url}/v1/blend");
        // authentication: none, wrong; /health stays open
        let r = call(
            &http,
            Method::GET,
            &format!("{url}/v1/stats"),
            None,
            None,
            JSON,
        )
        .await;
        assert_err(&r, 401, "missing_token", "Bearer");
        let r = call(
            &http,
            Method::GET,
            &format!("{url}/v1/stats"),
            Some("wrong-token-x"),
            None,
            JSON,
        )
        .await;
        assert_err(&r, 401, "invalid_token", "not valid");
        assert_eq!(Client::new(&url).health().await.unwrap()["status"], "ok");

        let stored = c.put_chunks(&[ChunkRef::text(DOCS[1])]).await.unwrap();
        let id = stored.chunks[0].id.clone();
        let before = c.stats().await.unwrap();
        let unchanged = || async {
            let now = c.stats().await.unwrap();
            assert_eq!(objects(&now), objects(&before), "the store changed");
            assert_eq!(now["tenant"]["used_bytes"], before["tenant"]["used_bytes"]);
        };

        // malformed JSON, wrong shapes
        let r = call(
            &http,
            Method::POST,
            &chunks_url,
            Some(DEFAULT_TOKEN),
            Some("{\"chunks\": [\"a\",".into()),
            JSON,
        )
        .await;
        assert_err(&r, 400, "malformed_json", "EOF");
        let r = call(
            &http,
            Method::POST,
            &chunks_url,
            Some(DEFAULT_TOKEN),
            json_body(json!({"chunks": [{"text": "a", "tokens": [1]}]})),
            JSON,
        )
        .await;
        assert_err(&r, 400, "invalid_chunk", "exactly one");
        let r = call(
            &http,
            Method::POST,
            &blend_url,
            Some(DEFAULT_TOKEN),
            json_body(json!({"question": "q?", "mode": "fast"})),
            JSON,
        )
        .await;
        assert_err(&r, 400, "invalid_mode", "fast");
        unchanged().await;

        // unknown and malformed chunk ids
        let unknown = "ab".repeat(32);
        let r = call(
            &http,
            Method::GET,
            &format!("{chunks_url}/{unknown}"),
            Some(DEFAULT_TOKEN),
            None,
            JSON,
        )
        .await;
        assert_err(&r, 404, "unknown_chunk", &unknown);
        let r = call(
            &http,
            Method::POST,
            &blend_url,
            Some(DEFAULT_TOKEN),
            json_body(json!({"question": "q?", "chunks": [{"id": unknown}]})),
            JSON,
        )
        .await;
        assert_err(&r, 404, "unknown_chunk", &unknown);
        let r = call(
            &http,
            Method::GET,
            &format!("{chunks_url}/xyz"),
            Some(DEFAULT_TOKEN),
            None,
            JSON,
        )
        .await;
        assert_err(&r, 400, "invalid_chunk_id", "xyz");

        // limits: body size, tokens, chunks
        let big = "word ".repeat(300_000);
        let r = call(
            &http,
            Method::POST,
            &chunks_url,
            Some(DEFAULT_TOKEN),
            json_body(json!({"chunks": [big]})),
            JSON,
        )
        .await;
        assert_err(&r, 413, "body_too_large", "max_body_bytes");
        let long = "The tower is old. ".repeat(60);
        let r = call(
            &http,
            Method::POST,
            &chunks_url,
            Some(DEFAULT_TOKEN),
            json_body(json!({"chunks": [long]})),
            JSON,
        )
        .await;
        assert_err(&r, 400, "too_many_tokens", "max_request_tokens");
        let r = call(
            &http,
            Method::POST,
            &blend_url,
            Some(DEFAULT_TOKEN),
            json_body(json!({"question": "q?", "chunks": ["a", "b", "c", "d", "e"]})),
            JSON,
        )
        .await;
        assert_err(&r, 400, "too_many_chunks", "max_chunks");
        let r = call(
            &http,
            Method::POST,
            &format!("{url}/v1/chat/completions"),
            Some(DEFAULT_TOKEN),
            json_body(
                json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}),
            ),
            JSON,
        )
        .await;
        assert_err(&r, 400, "invalid_max_tokens", "max_new_tokens");
        unchanged().await;

        // another tenant's chunk id is unknown to acme, and acme cannot delete it
        let other = format!("{chunks_url}/{id}");
        let r = call(&http, Method::GET, &other, Some(ACME_TOKEN), None, JSON).await;
        assert_err(&r, 404, "unknown_chunk", &id);
        let r = call(&http, Method::DELETE, &other, Some(ACME_TOKEN), None, JSON).await;
        assert_err(&r, 404, "unknown_chunk", &id);
        let r = call(
            &http,
            Method::POST,
            &blend_url,
            Some(ACME_TOKEN),
            json_body(json!({"question": "q?", "chunks": [{"id": id}]})),
            JSON,
        )
        .await;
        assert_err(&r, 404, "unknown_chunk", &id);
        assert!(
            c.chunk_exists(&id).await.unwrap(),
            "still there for its owner"
        );
        // the same text is a different chunk for acme (no cross-tenant hits)
        let mine = acme.put_chunks(&[ChunkRef::text(DOCS[1])]).await.unwrap();
        assert_ne!(mine.chunks[0].id, id);
        assert_eq!(mine.chunks[0].status, "stored");
        // acme's quota (700 kB) holds one more such chunk at most
        let r = call(
            &http,
            Method::POST,
            &chunks_url,
            Some(ACME_TOKEN),
            json_body(json!({"chunks": [DOCS[0], DOCS[2]]})),
            JSON,
        )
        .await;
        assert_err(&r, 403, "quota_exceeded", "acme");

        // uploaded objects: wrong layout, bad checksum, another chunk's id
        let kv = c.chunk_kv(&id).await.unwrap().expect("object");
        assert!(c.delete_chunk(&id).await.unwrap());
        let before = c.stats().await.unwrap();
        let kv_url = format!("{chunks_url}/{id}/kv");
        let obj = EncodedObject::parse(&kv, None).unwrap().decode().unwrap();
        let mut layout = *obj.layout();
        layout.rope_theta *= 2.0;
        let layers: Vec<Bytes> = (0..obj.num_layers())
            .map(|l| obj.layer(l).clone())
            .collect();
        let wrong = KvObject::new(*obj.key(), layout, obj.tokens().to_vec(), layers, None).unwrap();
        let wrong = wrong.encode(kvquilt_kvstore::Codec::Raw).to_bytes();
        let r = call(
            &http,
            Method::PUT,
            &kv_url,
            Some(DEFAULT_TOKEN),
            Some(wrong.into()),
            "application/octet-stream",
        )
        .await;
        assert_err(&r, 400, "layout_mismatch", "layout");
        let mut flipped = kv.to_vec();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        let r = call(
            &http,
            Method::PUT,
            &kv_url,
            Some(DEFAULT_TOKEN),
            Some(flipped.into()),
            "application/octet-stream",
        )
        .await;
        assert_err(&r, 400, "corrupt_object", "checksum");
        let r = call(
            &http,
            Method::PUT,
            &kv_url,
            Some(DEFAULT_TOKEN),
            Some(kv[..kv.len() / 2].to_vec().into()),
            "application/octet-stream",
        )
        .await;
        assert_err(&r, 400, "corrupt_object", "truncated");
        let r = call(
            &http,
            Method::PUT,
            &format!("{chunks_url}/{unknown}/kv"),
            Some(DEFAULT_TOKEN),
            Some(kv.to_vec().into()),
            "application/octet-stream",
        )
        .await;
        assert_eq!(r.0, 400, "{}", r.1);
        // nor under acme's id: its tokens derive the default tenant's id
        let r = call(
            &http,
            Method::PUT,
            &format!("{chunks_url}/{}/kv", mine.chunks[0].id),
            Some(ACME_TOKEN),
            Some(kv.to_vec().into()),
            "application/octet-stream",
        )
        .await;
        assert_eq!(r.0, 400, "{}", r.1);
        assert!(!c.chunk_exists(&id).await.unwrap());
        let now = c.stats().await.unwrap();
        assert_eq!(objects(&now), objects(&before), "nothing was stored");
        // the intact object goes back in
        assert_eq!(c.put_chunk_kv(&id, kv).await.unwrap().status, "stored");
    });
    drop(server);
}
