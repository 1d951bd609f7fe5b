//! The HTTP API end to end: `kvquilt serve` on loopback with the real default model, driven
//! by the Rust client (`clients/rust`), and a restart on the same data directory. Request
//! validation, errors, auth, tenants and quotas are tested in-process on a tiny model
//! (`server/tests/router.rs`).

mod common;

use common::{Server, rt};
use kvquilt_client::{
    BlendRequest, ChatEvent, ChatMessage, ChatRequest, ChunkOutcome, ChunkRef, Client,
    CommonFields, CompletionRequest, ModeSpec, Stats, Tier,
};
use kvquilt_kvstore::EncodedObject;

const DOCS: [&str; 3] = [
    "The Zorblat Tower stands in the town of Quenmoor. It was finished in 1911.",
    "The secret number is 4817.",
    "Quenmoor is a fishing town on the northern coast.",
];

fn objects(s: &Stats) -> u64 {
    s.tiers.iter().map(|t| t.objects).max().unwrap_or(0)
}

#[test]
fn rust_client_round_trips_every_endpoint_and_a_restart_keeps_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let rt = rt();
    // every request runs the mode it asks for: with the fallback on, the cost model (fitted
    // on this busy host's timings) may run one of two equal requests as full prefill and
    // the other as blend, and their greedy texts may differ by that alone
    let config = dir.path().join("kvquilt.toml");
    std::fs::write(&config, "[blend]\nfall_back_to_full = false\n").unwrap();
    let config = config.to_str().expect("a UTF-8 temporary path");
    let server = Server::start(&data, &["--config", config]);
    let c = Client::new(&server.url);
    let (ids, blend_again) = rt.block_on(async {
        assert_eq!(c.health().await.unwrap().status, "ok");
        let model = c.model().await.unwrap();
        assert_eq!(model, "smollm2-135m-instruct");
        // the default model ships its calibration record: blend without a ratio is r = 0.3
        let cal = c
            .calibration()
            .await
            .unwrap()
            .expect("calibration in /v1/models");
        assert!(cal.calibrated, "{}", cal.note);
        assert_eq!(cal.blend_ratio, Some(0.3));
        // on the CPU (f32) its record ranks by the question before layer 0
        assert_eq!(cal.selection.as_deref(), Some("qzero"), "{}", cal.note);
        let doc = c.openapi().await.unwrap();
        assert!(doc["paths"]["/v1/chat/completions"]["post"].is_object());

        // chunks: store, look up, move the object out and back in
        let put = c.put_chunks(&DOCS.map(ChunkRef::text)).await.unwrap();
        assert_eq!(put.chunks.len(), 3);
        assert!(put.chunks.iter().all(|s| s.status == ChunkOutcome::Stored));
        let again = c.put_chunks(&[ChunkRef::text(DOCS[0])]).await.unwrap();
        assert_eq!(again.chunks[0].status, ChunkOutcome::Hit);
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
            c.chunk(&ids[1], false).await.unwrap(),
            None,
            "unknown_chunk"
        );
        // only `unknown_chunk` is an absent chunk: a base URL the server has no routes
        // under answers 404 `no_such_route`, an error (it read as "not stored")
        let wrong_base = Client::new(&format!("{}/v1", server.url));
        let e = wrong_base.delete_chunk(&ids[0]).await.unwrap_err();
        assert_eq!(e.code(), Some("no_such_route"), "{e}");
        assert!(wrong_base.chunk(&ids[0], false).await.is_err());
        // an id that is not one is refused before anything is sent
        for bad in ["", "12ab", &format!("{}?", &ids[0][..63])] {
            assert!(
                matches!(
                    c.chunk(bad, false).await,
                    Err(kvquilt_client::Error::InvalidInput(_))
                ),
                "{bad:?}"
            );
        }
        assert_eq!(
            c.put_chunk_kv(&ids[1], kv.clone()).await.unwrap().status,
            ChunkOutcome::Stored
        );
        assert_eq!(
            c.put_chunk_kv(&ids[1], kv).await.unwrap().status,
            ChunkOutcome::Hit
        );

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
            messages: vec![ChatMessage::user(
                "What is the secret number? Answer with the number only.",
            )],
            common: CommonFields {
                model: Some(model.clone()),
                documents: vec![
                    ChunkRef::id(&ids[0]),
                    ChunkRef::id(&ids[1]),
                    ChunkRef::text("A new passage about boats."),
                ],
                max_tokens: Some(6),
                // ratio 1: whether a request blends or runs as full prefill (each request's
                // measured time teaches the cost model, so two in a row may differ), the
                // greedy answer is the same
                kvquilt: Some(ModeSpec {
                    mode: Some("blend".into()),
                    ratio: Some(1.0),
                    ..ModeSpec::default()
                }),
                ..CommonFields::default()
            },
            ..ChatRequest::default()
        };
        let r = c.chat(&chat).await.unwrap();
        assert!(!r.choices[0].message.content.is_empty());
        assert_eq!(r.usage.prompt_tokens, r.kvquilt.tokens);
        assert!(r.usage.completion_tokens >= 1 && r.usage.completion_tokens <= 6);
        // the first request computed the new passage; streaming now must give what the
        // same request does without streaming
        let streamed = c.chat_stream(&chat).await.unwrap();
        let again = c.chat(&chat).await.unwrap();
        assert_eq!(streamed.stats["mode"], "blend", "{:?}", streamed.stats);
        assert_eq!(again.kvquilt.mode, "blend");
        assert_eq!(streamed.pieces.concat(), again.choices[0].message.content);
        assert_eq!(
            streamed.stats["misses"], 0,
            "the new passage was stored back"
        );
        // the stream ends with what the plain answer reports (its usage was dropped)
        assert_eq!(
            streamed.usage.as_ref().map(|u| u.completion_tokens),
            Some(again.usage.completion_tokens)
        );
        assert_eq!(
            streamed.finish_reason.as_deref(),
            Some(again.choices[0].finish_reason.as_str())
        );
        // logprobs list the answer's tokens, not the end-of-turn token that ended it: their
        // texts join to the answer (it was listed as `<|im_end|>`)
        let short = ChatRequest {
            messages: vec![ChatMessage::user(
                "What is the capital of France? Answer with one word.",
            )],
            logprobs: true,
            common: CommonFields {
                max_tokens: Some(24),
                ..CommonFields::default()
            },
            ..ChatRequest::default()
        };
        let r = c.chat(&short).await.unwrap();
        assert_eq!(r.choices[0].finish_reason, "stop", "{:?}", r.choices[0]);
        let tokens = r.choices[0].logprobs.as_ref().expect("logprobs")["content"]
            .as_array()
            .expect("content")
            .clone();
        let listed: String = tokens
            .iter()
            .map(|t| t["token"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(listed, r.choices[0].message.content);
        // (the end-of-turn token is still counted as generated)
        assert_eq!(tokens.len() + 1, r.usage.completion_tokens);
        // `chat` reads a whole answer even when the request says `stream` (its SSE reply
        // failed to decode as JSON)
        let mut says_stream = chat.clone();
        says_stream.common.stream = true;
        let whole = c.chat(&says_stream).await.unwrap();
        assert_eq!(
            whole.choices[0].message.content,
            again.choices[0].message.content
        );
        let comp = c
            .completion(&CompletionRequest {
                common: CommonFields {
                    max_tokens: Some(4),
                    stream: true,
                    ..CommonFields::default()
                },
                ..CompletionRequest::new("The capital of France is")
            })
            .await
            .unwrap();
        assert!(!comp.choices[0].text.is_empty());
        assert_eq!(comp.usage.completion_tokens, 4);
        // a conversation without documents leaves its prompt and answer as pages (a system
        // prompt over a page of 256 tokens); deleted from its first page on, none is left
        let talk = ChatRequest {
            messages: vec![
                ChatMessage::system("You answer in one short sentence, kindly. ".repeat(40)),
                ChatMessage::user("Name a colour of the sea."),
            ],
            common: CommonFields {
                max_tokens: Some(4),
                ..CommonFields::default()
            },
            ..ChatRequest::default()
        };
        let pages = c.chat(&talk).await.unwrap().kvquilt.link_ids;
        assert!(!pages.is_empty());
        let deleted = c.delete_chain(&pages[0]).await.unwrap().expect("held");
        assert_eq!(deleted.last(), Some(&pages[0]));
        for id in &pages {
            assert!(deleted.contains(id), "{id}");
            assert!(!c.chunk_exists(id).await.unwrap(), "{id}");
        }
        assert_eq!(c.delete_chain(&pages[0]).await.unwrap(), None);

        let stats = c.stats().await.unwrap();
        assert_eq!(stats.tiers.len(), 2);
        assert!(objects(&stats) >= 3);
        let metrics = c.metrics().await.unwrap();
        assert!(metrics.contains("kvquilt_http_requests_total{"));
        assert!(metrics.contains("kvquilt_store_objects{tier=\"ssd\"}"));
        assert!(metrics.contains("kvquilt_ttft_seconds_bucket"));
        (ids, BlendRequest::question(q, refs))
    });
    assert_eq!(server.stop(), Some(0), "graceful shutdown exits 0");

    // a restart keeps every chunk (the SSD tier), and blends hit it
    let server = Server::start(&data, &["--config", config]);
    let c = Client::new(&server.url);
    rt.block_on(async {
        for id in &ids {
            let info = c
                .chunk(id, false)
                .await
                .unwrap()
                .expect("kept across restart");
            assert_eq!(info.tier, Tier::Ssd);
        }
        let b = c.blend(&blend_again.mode("reuse", None)).await.unwrap();
        assert_eq!(b.stats.misses, 0);
        assert_eq!(b.stats.hits_ssd + b.stats.hits_host, 4, "{:?}", b.stats);
    });
}

/// What the client makes of answers the server gives under load or a proxy gives when it
/// cuts a stream, from a one-answer stub on loopback: a 503's `Retry-After` is kept (it was
/// dropped), and a stream without `[DONE]` is an error, not a whole answer.
#[test]
fn the_client_keeps_retry_after_and_refuses_a_cut_stream() {
    use std::io::{Read, Write};
    // answers one request with `response`, whatever it was
    let stub = |response: &'static str| -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 65536];
            let _ = s.read(&mut buf);
            let _ = s.write_all(response.as_bytes());
        });
        url
    };
    let rt = rt();
    let busy = stub(concat!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n",
        "retry-after: 7\r\nconnection: close\r\ncontent-length: 71\r\n\r\n",
        r#"{"error":{"code":"server_busy","message":"queue full","type":"server"}}"#
    ));
    let e = rt
        .block_on(Client::new(&busy).put_chunks(&[ChunkRef::text("a")]))
        .unwrap_err();
    assert_eq!(e.code(), Some("server_busy"), "{e}");
    assert_eq!(e.retry_after(), Some(std::time::Duration::from_secs(7)));
    let cut = stub(concat!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Par\"}}]}\n\n"
    ));
    let chat = ChatRequest {
        messages: vec![ChatMessage::user("q")],
        ..ChatRequest::default()
    };
    let e = rt
        .block_on(Client::new(&cut).chat_stream(&chat))
        .unwrap_err();
    assert!(matches!(e, kvquilt_client::Error::Decode(_)), "{e}");
}

/// A streamed answer is read as it comes: the first piece reaches the caller while the
/// server still holds the rest (the client once buffered the whole stream), and the end
/// carries the finish reason, the usage and the stats.
#[test]
fn streamed_pieces_arrive_before_the_stream_ends() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (go_on, wait) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 65536];
        let _ = s.read(&mut buf);
        let _ = s.write_all(
            concat!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n",
                "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Par\"}}]}\n\n"
            )
            .as_bytes(),
        );
        let _ = s.flush();
        // the rest only once the caller has the first piece (or after 10 s)
        let _ = wait.recv_timeout(std::time::Duration::from_secs(10));
        let _ = s.write_all(
            concat!(
                "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"is\"},\"finish_reason\":\"stop\"}]}\n\n",
                "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5},\"kvquilt\":{\"mode\":\"full\"}}\n\n",
                "data: [DONE]\n\n"
            )
            .as_bytes(),
        );
    });
    let chat = ChatRequest {
        messages: vec![ChatMessage::user("q")],
        ..ChatRequest::default()
    };
    let rt = rt();
    rt.block_on(async {
        let client = Client::new(&url);
        let mut stream = client.chat_events(&chat).await.unwrap();
        let first = tokio::time::timeout(std::time::Duration::from_secs(5), stream.next())
            .await
            .expect("the first piece before the stream ended");
        assert_eq!(first.unwrap().unwrap(), ChatEvent::Piece("Par".into()));
        go_on.send(()).unwrap();
        assert_eq!(
            stream.next().await.unwrap().unwrap(),
            ChatEvent::Piece("is".into())
        );
        match stream.next().await.unwrap().unwrap() {
            ChatEvent::End {
                finish_reason,
                usage,
                stats,
            } => {
                assert_eq!(finish_reason.as_deref(), Some("stop"));
                assert_eq!(usage.unwrap().total_tokens, 5);
                assert_eq!(stats["mode"], "full");
            }
            other => panic!("{other:?}"),
        }
        assert!(stream.next().await.is_none(), "nothing after the end");
    });
}

/// Server-sent events as a proxy may cut them: one byte at a time, CRLF line ends, a
/// character of several bytes split between reads, `data:` without its space, and a last
/// `[DONE]` without a line break — the same answer.
#[test]
fn a_stream_read_byte_by_byte_with_crlf_reads_whole() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let mut buf = [0u8; 65536];
        let _ = s.read(&mut buf);
        let _ = s.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n",
        );
        let body = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Zürich\"}}]}\r\n\r\n",
            ": a comment line\r\n",
            "data:{\"choices\":[{\"index\":0,\"delta\":{\"content\":\" \u{2713}\"},\"finish_reason\":\"stop\"}]}\r\n\r\n",
            "data: [DONE]"
        );
        for b in body.as_bytes() {
            if s.write_all(&[*b]).is_err() {
                return;
            }
            let _ = s.flush();
        }
    });
    let chat = ChatRequest {
        messages: vec![ChatMessage::user("q")],
        ..ChatRequest::default()
    };
    let got = rt().block_on(Client::new(&url).chat_stream(&chat)).unwrap();
    assert_eq!(
        got.pieces,
        vec!["Zürich".to_string(), " \u{2713}".to_string()]
    );
    assert_eq!(got.finish_reason.as_deref(), Some("stop"));
}
