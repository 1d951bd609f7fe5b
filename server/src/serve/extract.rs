//! Request extractors whose rejections are API errors (JSON, naming the problem) instead of
//! axum's plain-text ones.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use kvquilt_api::Object;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// A JSON body.
pub(crate) struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        check_json_encoding(req.headers())?;
        // an object only: serde would read a struct's fields from an array in order
        match axum::Json::<Object<T>>::from_request(req, state).await {
            Ok(axum::Json(Object(v))) => Ok(ApiJson(v)),
            Err(JsonRejection::BytesRejection(b)) => Err(bytes_error(b)),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON with `Content-Type: application/json`",
            )),
            Err(e) => Err(ApiError::bad_request("malformed_json", e.body_text())),
        }
    }
}

/// Refuses a JSON body the server would misread: one compressed (`Content-Encoding` other
/// than `identity`: no decoder is installed) or declared in a charset other than UTF-8 (the
/// only one JSON has, RFC 8259) — a 415 rather than a parse error or a silent misreading.
fn check_json_encoding(headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    let unsupported = |what: String| {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            what,
        ))
    };
    if let Some(enc) = headers.get(axum::http::header::CONTENT_ENCODING) {
        let enc = String::from_utf8_lossy(enc.as_bytes())
            .trim()
            .to_ascii_lowercase();
        if enc != "identity" {
            return unsupported(format!(
                "`Content-Encoding: {enc}` is not accepted; send the JSON uncompressed"
            ));
        }
    }
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).to_ascii_lowercase());
    if let Some(ct) = content_type {
        let charset = ct
            .split(';')
            .skip(1)
            .filter_map(|p| p.trim().strip_prefix("charset="))
            .map(|c| c.trim_matches('"'))
            .find(|c| !matches!(*c, "utf-8" | "utf8"));
        if let Some(c) = charset {
            return unsupported(format!(
                "the body's charset `{c}` is not accepted; JSON is UTF-8"
            ));
        }
    }
    Ok(())
}

/// A raw body (uploaded KV objects).
pub(crate) struct ApiBytes(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for ApiBytes {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(req, state)
            .await
            .map(ApiBytes)
            .map_err(bytes_error)
    }
}

/// A chunk id from the path (`/v1/chunks/{id}`), as text: one that is not even UTF-8 is
/// an `invalid_chunk_id`, like any other malformed id.
pub(crate) struct ChunkIdPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ChunkIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| ChunkIdPath(id))
            .map_err(|e| {
                ApiError::bad_request(
                    "invalid_chunk_id",
                    format!(
                        "a chunk id is 64 hexadecimal digits; this one could not be read ({})",
                        e.body_text()
                    ),
                )
            })
    }
}

fn bytes_error(e: BytesRejection) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the request body is larger than this server's limit (limits.max_body_bytes)",
        )
    } else {
        ApiError::bad_request("unreadable_body", e.body_text())
    }
}
