//! The OpenAPI 3.1 document served at `/openapi.json`, generated from the wire types
//! (`kvquilt_api`, JSON Schemas by `schemars`) and the route list (`kvquilt_api::ROUTES`), so
//! neither the bodies nor the routes can drift from what the server parses and serves.

use kvquilt_api::openai::{
    ChatRequest, ChatResponse, CompletionRequest, CompletionResponse, ModelCard, ModelList,
};
use kvquilt_api::{
    BlendRequest, BlendResponse, ChunkInfo, ChunkStatus, DeleteChunkResponse, ErrorBody, Health,
    LookupChunksRequest, LookupChunksResponse, Method, OBJECT_MEDIA_TYPE, PinRequest,
    PutChunksRequest, PutChunksResponse, ROUTES, Route, Stats,
};
use schemars::JsonSchema;
use schemars::generate::{SchemaGenerator, SchemaSettings};
use serde_json::{Map, Value, json};

/// What a route takes and returns, beyond its method, path and summary.
struct Operation {
    /// Request body: (media type, schema).
    request: Option<(&'static str, Value)>,
    /// Success status and its response (an OpenAPI response object).
    ok: (&'static str, Value),
    /// Another success status the operation answers (by its query), and its response.
    also: Option<(&'static str, Value)>,
    /// Path and query parameters.
    parameters: Vec<Value>,
    /// Answered without a bearer token.
    public: bool,
}

fn json_body<T: JsonSchema>(g: &mut SchemaGenerator) -> Value {
    g.subschema_for::<T>().to_value()
}

fn json_response(schema: Value) -> Value {
    json!({"description": "OK", "content": {"application/json": {"schema": schema}}})
}

fn object_bytes() -> Value {
    json!({"type": "string", "format": "binary", "description": "kvstore's object format (checksummed header and per-layer records)"})
}

fn id_param() -> Value {
    json!({"name": "id", "in": "path", "required": true, "description": "Chunk id: 64 hex digits", "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"}})
}

fn op(request: Option<(&'static str, Value)>, ok: Value) -> Operation {
    Operation {
        request,
        ok: ("200", ok),
        also: None,
        parameters: Vec::new(),
        public: false,
    }
}

/// The operation of one listed route; `None` for a route this function does not know (a
/// test requires every listed route to be known).
fn operation(route: &Route, g: &mut SchemaGenerator) -> Option<Operation> {
    use Method::*;
    const JSON: &str = "application/json";
    let o = match (route.method, route.path) {
        (Get, "/health") => Operation {
            public: true,
            ..op(None, json_response(json_body::<Health>(g)))
        },
        (Get, "/metrics") => op(
            None,
            json!({"description": "Metrics", "content": {"application/openmetrics-text": {"schema": {"type": "string"}}}}),
        ),
        (Get, "/openapi.json") => Operation {
            public: true,
            ..op(None, json_response(json!({"type": "object"})))
        },
        (Get, "/v1/stats") => op(None, json_response(json_body::<Stats>(g))),
        (Get, "/v1/models") => op(None, json_response(json_body::<ModelList>(g))),
        (Get, "/v1/models/{model}") => Operation {
            parameters: vec![
                json!({"name": "model", "in": "path", "required": true, "description": "The served model's name (`GET /v1/models`)", "schema": {"type": "string"}}),
            ],
            ..op(None, json_response(json_body::<ModelCard>(g)))
        },
        (Post, "/v1/chunks") => op(
            Some((JSON, json_body::<PutChunksRequest>(g))),
            json_response(json_body::<PutChunksResponse>(g)),
        ),
        (Post, "/v1/chunks/lookup") => op(
            Some((JSON, json_body::<LookupChunksRequest>(g))),
            json_response(json_body::<LookupChunksResponse>(g)),
        ),
        (Get, "/v1/chunks/{id}") => Operation {
            parameters: vec![
                id_param(),
                json!({"name": "include_tokens", "in": "query", "schema": {"type": "boolean"}}),
            ],
            ..op(None, json_response(json_body::<ChunkInfo>(g)))
        },
        (Head, "/v1/chunks/{id}") => Operation {
            parameters: vec![id_param()],
            ..op(None, json!({"description": "Stored"}))
        },
        (Delete, "/v1/chunks/{id}") => Operation {
            ok: ("204", json!({"description": "Deleted"})),
            also: Some(("200", {
                let mut r = json_response(json_body::<DeleteChunkResponse>(g));
                r["description"] = json!("Deleted with `descendants`: the ids deleted");
                r
            })),
            parameters: vec![
                id_param(),
                json!({"name": "descendants", "in": "query", "schema": {"type": "boolean"}, "description": "Also delete every page after this one (a conversation from this page on)"}),
            ],
            ..op(None, Value::Null)
        },
        (Post, "/v1/chunks/{id}/pin") => Operation {
            parameters: vec![id_param()],
            ..op(
                Some((JSON, json_body::<PinRequest>(g))),
                json_response(json_body::<ChunkInfo>(g)),
            )
        },
        (Delete, "/v1/chunks/{id}/pin") => Operation {
            parameters: vec![id_param()],
            ..op(None, json_response(json_body::<ChunkInfo>(g)))
        },
        (Get, "/v1/chunks/{id}/kv") => Operation {
            parameters: vec![id_param()],
            ..op(
                None,
                json!({"description": "The object", "content": {OBJECT_MEDIA_TYPE: {"schema": object_bytes()}}}),
            )
        },
        (Put, "/v1/chunks/{id}/kv") => Operation {
            ok: ("201", json_response(json_body::<ChunkStatus>(g))),
            parameters: vec![id_param()],
            ..op(Some((OBJECT_MEDIA_TYPE, object_bytes())), Value::Null)
        },
        (Post, "/v1/blend") => op(
            Some((JSON, json_body::<BlendRequest>(g))),
            json_response(json_body::<BlendResponse>(g)),
        ),
        (Post, "/v1/completions") => op(
            Some((JSON, json_body::<CompletionRequest>(g))),
            json_response(json_body::<CompletionResponse>(g)),
        ),
        (Post, "/v1/chat/completions") => op(
            Some((JSON, json_body::<ChatRequest>(g))),
            json_response(json_body::<ChatResponse>(g)),
        ),
        _ => return None,
    };
    Some(o)
}

fn render(route: &Route, o: Operation, error: &Value) -> Value {
    let mut responses = Map::new();
    responses.insert(o.ok.0.into(), o.ok.1);
    if let Some((status, response)) = o.also {
        responses.insert(status.into(), response);
    }
    if o.ok.0 == "201" {
        // an upload of an object already held answers 200 with the same body
        responses.insert("200".into(), responses["201"].clone());
    }
    responses.insert(
        "4XX".into(),
        json!({"description": "Rejected; the body names the problem", "content": {"application/json": {"schema": error}}}),
    );
    responses.insert(
        "5XX".into(),
        json!({"description": "Failed (500), store full (507) or overloaded (503: retry later)", "content": {"application/json": {"schema": error}}}),
    );
    let mut v = json!({"summary": route.summary, "responses": responses});
    if let Some((media, schema)) = o.request {
        v["requestBody"] = json!({"required": true, "content": {media: {"schema": schema}}});
    }
    if !o.parameters.is_empty() {
        v["parameters"] = Value::Array(o.parameters);
    }
    if o.public {
        v["security"] = json!([]);
    }
    v
}

/// The document.
pub fn document() -> Value {
    let mut settings = SchemaSettings::draft2020_12();
    settings.definitions_path = "/components/schemas".into();
    let mut g = settings.into_generator();
    let error = json_body::<ErrorBody>(&mut g);
    let mut paths = Map::new();
    for route in ROUTES {
        let o = operation(route, &mut g).unwrap_or_else(|| op(None, Value::Null));
        let item = paths
            .entry(route.path)
            .or_insert_with(|| Value::Object(Map::new()));
        item[route.method.openapi_name()] = render(route, o, &error);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "kvquilt",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "KV-cache reuse for RAG: precompute, store and blend chunk KV caches. Authenticate with `Authorization: Bearer <token>` when the server has tokens.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": g.take_definitions(true),
        },
        "security": [{"bearer": []}],
        "paths": paths,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_route_is_described_and_nothing_else() {
        let doc = document();
        let mut g = SchemaGenerator::default();
        for r in ROUTES {
            assert!(
                operation(r, &mut g).is_some(),
                "{:?} {} has no operation in openapi.rs",
                r.method,
                r.path
            );
            let o = &doc["paths"][r.path][r.method.openapi_name()];
            assert!(o.is_object(), "{:?} {} missing", r.method, r.path);
        }
        let described: usize = doc["paths"]
            .as_object()
            .map(|p| p.values().filter_map(Value::as_object).map(Map::len).sum())
            .unwrap_or(0);
        assert_eq!(described, ROUTES.len());
    }

    #[test]
    fn every_reference_resolves_to_a_component() {
        let doc = document();
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().expect("schemas");
        for part in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = part.split('"').next().unwrap_or_default();
            assert!(schemas.contains_key(name), "dangling $ref {name}");
        }
        assert!(schemas.contains_key("BlendStats"));
        assert!(schemas.contains_key("ChunkRef"));
    }
}
