//! The OpenAPI 3.1 description served at `/openapi.json`. Written out by hand beside the
//! handlers; a test checks that every routed path and method is described.

use serde_json::{Value, json};

/// Every route the server answers: (method, OpenAPI path). Kept beside the router by the
/// tests here and in `serve::tests`.
#[cfg(test)]
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/health"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("get", "/v1/stats"),
    ("get", "/v1/models"),
    ("post", "/v1/chunks"),
    ("get", "/v1/chunks/{id}"),
    ("head", "/v1/chunks/{id}"),
    ("delete", "/v1/chunks/{id}"),
    ("get", "/v1/chunks/{id}/kv"),
    ("put", "/v1/chunks/{id}/kv"),
    ("post", "/v1/blend"),
    ("post", "/v1/completions"),
    ("post", "/v1/chat/completions"),
];

fn op(summary: &str, body: Option<Value>, ok: Value) -> Value {
    let mut o = json!({
        "summary": summary,
        "responses": {
            "200": ok,
            "4XX": {"description": "Rejected; the body names the problem", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
        },
    });
    if let Some(b) = body {
        o["requestBody"] =
            json!({"required": true, "content": {"application/json": {"schema": b}}});
    }
    o
}

fn json_ok(schema: Value) -> Value {
    json!({"description": "OK", "content": {"application/json": {"schema": schema}}})
}

fn id_param() -> Value {
    json!([{"name": "id", "in": "path", "required": true, "description": "Chunk id: 64 hex digits", "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}])
}

/// The document.
pub fn document() -> Value {
    let chunk_ref = json!({"$ref": "#/components/schemas/ChunkRef"});
    let mut chunk_get = op(
        "A stored chunk's metadata",
        None,
        json_ok(json!({"$ref": "#/components/schemas/ChunkInfo"})),
    );
    chunk_get["parameters"] = json!([
        id_param()[0],
        {"name": "include_tokens", "in": "query", "schema": {"type": "boolean"}}
    ]);
    let mut chunk_head = op(
        "Whether a chunk is stored",
        None,
        json!({"description": "Stored"}),
    );
    chunk_head["parameters"] = id_param();
    let mut chunk_delete = op(
        "Delete a chunk from every tier",
        None,
        json!({"description": "Deleted"}),
    );
    chunk_delete["responses"]["204"] = json!({"description": "Deleted"});
    chunk_delete["parameters"] = id_param();
    let mut kv_get = op(
        "A chunk's KV object (kvstore object format, version 1)",
        None,
        json!({"description": "The object", "content": {"application/vnd.kvquilt.kv-object": {"schema": {"type": "string", "format": "binary"}}}}),
    );
    kv_get["parameters"] = id_param();
    let mut kv_put = op(
        "Store a KV object made elsewhere (layout, checksums and id are verified)",
        None,
        json_ok(json!({"$ref": "#/components/schemas/ChunkStatus"})),
    );
    kv_put["requestBody"] = json!({"required": true, "content": {"application/vnd.kvquilt.kv-object": {"schema": {"type": "string", "format": "binary"}}}});
    kv_put["responses"]["201"] = json_ok(json!({"$ref": "#/components/schemas/ChunkStatus"}));
    kv_put["parameters"] = id_param();
    let openai_ext = json!({
        "documents": {"type": "array", "items": chunk_ref, "description": "kvquilt: documents assembled through blend, each its own cached chunk"},
        "kvquilt": {"$ref": "#/components/schemas/ModeSpec"},
        "model": {"type": "string"},
        "max_tokens": {"type": "integer"},
        "temperature": {"type": "number"},
        "top_p": {"type": "number"},
        "seed": {"type": "integer"},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "stream": {"type": "boolean"},
    });
    let mut chat_props = openai_ext.clone();
    chat_props["messages"] = json!({"type": "array", "items": {"type": "object", "required": ["role", "content"], "properties": {"role": {"type": "string"}, "content": {"type": "string"}}}});
    let mut text_props = openai_ext;
    text_props["prompt"] = json!({"type": "string"});
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "kvquilt",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "KV-cache reuse for RAG: precompute, store and blend chunk KV caches. Authenticate with `Authorization: Bearer <token>` when the server has tokens.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                    "message": {"type": "string"}, "type": {"type": "string"}, "code": {"type": "string"}}}}},
                "ChunkRef": {"oneOf": [
                    {"type": "string", "description": "A document's text"},
                    {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
                    {"type": "object", "properties": {"tokens": {"type": "array", "items": {"type": "integer"}}}, "required": ["tokens"]},
                    {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]},
                ]},
                "ChunkStatus": {"type": "object", "properties": {
                    "id": {"type": "string"}, "tokens": {"type": "integer"},
                    "status": {"enum": ["hit", "stored"]}, "tier": {"enum": ["gpu", "host", "ssd", null]}}},
                "ChunkInfo": {"type": "object", "properties": {
                    "id": {"type": "string"}, "tokens": {"type": "integer"}, "tier": {"type": "string"},
                    "bytes": {"type": "integer"}, "layout": {"type": "object"},
                    "token_ids": {"type": "array", "items": {"type": "integer"}}}},
                "ModeSpec": {"type": "object", "properties": {
                    "mode": {"enum": ["full", "prefix", "reuse", "blend"]},
                    "ratio": {"type": "number", "minimum": 0, "maximum": 1}}},
                "BlendStats": {"type": "object", "description": "mode, fell_back_to_full, tokens, suffix_tokens, segments, hits_gpu, hits_host, hits_ssd, misses, stored_back, recomputed_tokens, recompute_fraction, ttft_ms"},
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/health": {"get": {"summary": "Liveness (no auth, never waits on the model)", "security": [], "responses": {"200": {"description": "OK"}}}},
            "/metrics": {"get": {"summary": "Prometheus/OpenMetrics text", "responses": {"200": {"description": "Metrics", "content": {"application/openmetrics-text": {}}}}}},
            "/openapi.json": {"get": {"summary": "This document", "security": [], "responses": {"200": {"description": "OK"}}}},
            "/v1/stats": {"get": op("Store tiers, model pool and the caller's usage", None, json_ok(json!({"type": "object"})))},
            "/v1/models": {"get": op("The served model", None, json_ok(json!({"type": "object"})))},
            "/v1/chunks": {"post": op(
                "Precompute and store chunks",
                Some(json!({"type": "object", "required": ["chunks"], "properties": {"chunks": {"type": "array", "items": chunk_ref}}})),
                json_ok(json!({"type": "object", "properties": {"model": {"type": "string"}, "chunks": {"type": "array", "items": {"$ref": "#/components/schemas/ChunkStatus"}}}})),
            )},
            "/v1/chunks/{id}": {"get": chunk_get, "head": chunk_head, "delete": chunk_delete},
            "/v1/chunks/{id}/kv": {"get": kv_get, "put": kv_put},
            "/v1/blend": {"post": op(
                "First token of a RAG prompt assembled from chunks",
                Some(json!({"type": "object", "properties": {
                    "system": {"type": "string"}, "instruction": {"type": "string"}, "question": {"type": "string"},
                    "prefix_tokens": {"type": "array", "items": {"type": "integer"}},
                    "suffix_tokens": {"type": "array", "items": {"type": "integer"}},
                    "chunks": {"type": "array", "items": chunk_ref},
                    "mode": {"enum": ["full", "prefix", "reuse", "blend"]}, "ratio": {"type": "number"},
                    "top_logprobs": {"type": "integer"}}})),
                json_ok(json!({"type": "object", "properties": {
                    "token": {"type": "object"}, "top_logprobs": {"type": "array"},
                    "chunk_ids": {"type": "array", "items": {"type": "string"}},
                    "stats": {"$ref": "#/components/schemas/BlendStats"}}})),
            )},
            "/v1/completions": {"post": op(
                "OpenAI-compatible text completion, with `documents`",
                Some(json!({"type": "object", "required": ["prompt"], "properties": text_props})),
                json_ok(json!({"type": "object"})),
            )},
            "/v1/chat/completions": {"post": op(
                "OpenAI-compatible chat completion, with `documents`",
                Some(json!({"type": "object", "required": ["messages"], "properties": chat_props})),
                json_ok(json!({"type": "object"})),
            )},
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_described() {
        let doc = document();
        for (method, path) in ROUTES {
            assert!(
                doc["paths"][path][method].is_object(),
                "{method} {path} missing from the OpenAPI document"
            );
        }
        let described: usize = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|p| p.as_object().unwrap().len())
            .sum();
        assert_eq!(
            described,
            ROUTES.len(),
            "the document describes routes that do not exist"
        );
    }
}
