//! The route list: every (method, path) the sidecar answers.

/// An HTTP method the API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    /// `GET`.
    Get,
    /// `HEAD` (answered from the `GET` handler, without a body).
    Head,
    /// `POST`.
    Post,
    /// `PUT`.
    Put,
    /// `DELETE`.
    Delete,
}

impl Method {
    /// The lowercase name OpenAPI uses as an operation's key.
    pub fn openapi_name(self) -> &'static str {
        match self {
            Method::Get => "get",
            Method::Head => "head",
            Method::Post => "post",
            Method::Put => "put",
            Method::Delete => "delete",
        }
    }
}

/// One route: a method on a path, in OpenAPI's template syntax (`/v1/chunks/{id}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The method.
    pub method: Method,
    /// The path template.
    pub path: &'static str,
    /// One line saying what it does (the OpenAPI summary).
    pub summary: &'static str,
}

const fn route(method: Method, path: &'static str, summary: &'static str) -> Route {
    Route {
        method,
        path,
        summary,
    }
}

/// Every route of the API, in the order the OpenAPI document lists them. The server's router
/// is checked against this list in both directions (`server/tests/router.rs`).
pub const ROUTES: &[Route] = &[
    route(Method::Get, "/health", "Liveness; never waits on the model"),
    route(
        Method::Get,
        "/metrics",
        "Prometheus metrics (store-wide: the default tenant only)",
    ),
    route(Method::Get, "/openapi.json", "This document"),
    route(
        Method::Get,
        "/v1/stats",
        "Store tiers (the default tenant only), the caller's tenant, and the model pool",
    ),
    route(Method::Get, "/v1/models", "The served model (OpenAI shape)"),
    route(
        Method::Get,
        "/v1/models/{model}",
        "The served model's card; another name is a 404 (OpenAI shape)",
    ),
    route(
        Method::Post,
        "/v1/chunks",
        "Precompute and store chunks; returns their ids",
    ),
    route(
        Method::Post,
        "/v1/chunks/lookup",
        "Where chunks are held (by text or tokens), computing and charging nothing",
    ),
    route(Method::Get, "/v1/chunks/{id}", "A stored chunk's metadata"),
    route(Method::Head, "/v1/chunks/{id}", "Whether a chunk is stored"),
    route(
        Method::Delete,
        "/v1/chunks/{id}",
        "Remove a chunk from every tier (with `descendants`, every page after it too)",
    ),
    route(
        Method::Post,
        "/v1/chunks/{id}/pin",
        "Keep a chunk from eviction in the local tiers, until unpinned or for `ttl_s` seconds (the operator, or a tenant within its `pin_bytes`)",
    ),
    route(
        Method::Delete,
        "/v1/chunks/{id}/pin",
        "Let a pinned chunk be evicted again (its owner)",
    ),
    route(
        Method::Get,
        "/v1/chunks/{id}/kv",
        "The chunk's KV object (binary format)",
    ),
    route(
        Method::Put,
        "/v1/chunks/{id}/kv",
        "Upload a KV object (verified before it is stored)",
    ),
    route(
        Method::Post,
        "/v1/blend",
        "First token of a RAG prompt assembled from chunks",
    ),
    route(
        Method::Post,
        "/v1/completions",
        "OpenAI-compatible completion over `documents`",
    ),
    route(
        Method::Post,
        "/v1/chat/completions",
        "OpenAI-compatible chat completion over `documents`",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_unique_and_templated_paths_start_with_a_slash() {
        let mut seen = std::collections::HashSet::new();
        for r in ROUTES {
            assert!(r.path.starts_with('/'), "{r:?}");
            assert!(seen.insert((r.method, r.path)), "listed twice: {r:?}");
            assert!(!r.summary.is_empty());
        }
    }
}
