//! API errors: every rejection is a JSON body naming the problem, in OpenAI's shape so
//! OpenAI clients surface the message:
//! `{"error": {"message": "...", "type": "invalid_request_error", "code": "body_too_large"}}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kvquilt_api::{ErrorBody, ErrorDetail};
use kvquilt_blend::BlendError;
use kvquilt_kvstore::StoreError;
use kvquilt_model::ModelError;

/// A failed request: status, a stable machine-readable code, and a message for people.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code (`unknown_chunk`, ...).
    pub code: &'static str,
    /// A sentence naming the problem.
    pub message: String,
}

/// The longest error message sent: messages quote the input they refuse (a model name, a
/// policy spec), and a long input is not echoed back whole.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// A handler's result.
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    /// An error with any status. A message longer than [`MAX_MESSAGE_BYTES`] (one that
    /// quotes a long input back) is cut there, saying so.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_MESSAGE_BYTES {
            let total = message.len();
            let mut cut = MAX_MESSAGE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str(&format!("… (cut at {cut} of {total} bytes)"));
        }
        Self {
            status,
            code,
            message,
        }
    }

    /// A 400: the request itself is wrong.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// A 404: what the request names does not exist (for the caller).
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    /// A 500: the server failed; the message is logged.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    /// OpenAI's error class of this error's status.
    pub(crate) fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
            s if s.is_client_error() => "invalid_request_error",
            _ => "server_error",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            // shedding load (or a device out of memory, retried): the service working as
            // configured, not a fault
            tracing::warn!(code = self.code, message = %self.message, "request refused, retry later");
        } else if self.status.is_server_error() {
            tracing::error!(code = self.code, message = %self.message, "request failed");
        }
        let kind = self.kind().to_string();
        let body = ErrorBody {
            error: ErrorDetail {
                message: self.message,
                kind,
                code: self.code.to_string(),
                param: None,
            },
        };
        let mut resp = (self.status, Json(body)).into_response();
        // OpenAI's SDKs retry every 5xx unless told not to: a shed request is worth retrying,
        // a full store or a server fault is not (the next attempt meets the same)
        if self.status.is_server_error() {
            let retry = self.status == StatusCode::SERVICE_UNAVAILABLE;
            resp.headers_mut().insert(
                "x-should-retry",
                axum::http::HeaderValue::from_static(if retry { "true" } else { "false" }),
            );
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

// Errors map by their innermost cause: a store or model error gets the same status whether
// the store, the model or the blend engine reports it (`error::tests` pins this).

impl From<BlendError> for ApiError {
    fn from(e: BlendError) -> Self {
        match e {
            BlendError::Store(s) => s.into(),
            BlendError::Model(m) => m.into(),
            BlendError::Invalid(m) => Self::bad_request("invalid_request", m),
            BlendError::Mismatch { .. } => Self::bad_request("object_mismatch", e.to_string()),
            BlendError::Policy(_) => Self::bad_request("invalid_compression", e.to_string()),
            BlendError::Io(_) | BlendError::Batcher(_) => Self::internal(e.to_string()),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        use StoreError as S;
        match e {
            S::Corrupt(_) | S::Checksum { .. } => {
                Self::bad_request("corrupt_object", e.to_string())
            }
            S::Mismatch(_) => Self::bad_request("object_mismatch", e.to_string()),
            S::NewerFormat { .. } => Self::bad_request("unsupported_object_version", e.to_string()),
            S::Invalid(_) => Self::bad_request("invalid_request", e.to_string()),
            S::NoRoom { .. } | S::DiskFull { .. } => Self::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "store_full",
                e.to_string(),
            ),
            S::Remote(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "remote_unavailable",
                format!("{e}; retry (the chunk is recomputed when the remote stays down)"),
            ),
            S::Damaged { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_damaged",
                format!("{e}; the damaged objects are dropped as they are met, retry"),
            ),
            S::Stalled(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_stalled",
                format!("{e}; retry"),
            ),
            S::ReadOnly { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_read_only",
                format!("{e}; chunks it holds are served, new ones are kept in memory only"),
            ),
            S::Io { .. } | S::Db { .. } | S::Locked { .. } => Self::internal(e.to_string()),
        }
    }
}

impl From<ModelError> for ApiError {
    fn from(e: ModelError) -> Self {
        use ModelError as M;
        if e.is_out_of_device_memory() {
            return Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "device_out_of_memory",
                format!("the GPU ran out of memory ({e}); resident chunks were released, retry"),
            );
        }
        match e {
            M::InvalidInput(_) | M::ContextOverflow { .. } => {
                Self::bad_request("invalid_request", e.to_string())
            }
            M::Tokenizer(_) | M::ChatTemplate(_) => {
                Self::bad_request("invalid_input_text", e.to_string())
            }
            // a hook's failure maps by what caused it
            M::Hook(h) => {
                let msg = h.to_string();
                match h.into_source().map(|s| s.downcast::<ModelError>()) {
                    Some(Ok(inner)) => Self::from(*inner),
                    _ => Self::internal(msg),
                }
            }
            M::Io { .. }
            | M::InvalidGguf { .. }
            | M::InvalidModel { .. }
            | M::UnsupportedArchitecture(_)
            | M::Fetch(_)
            | M::Candle(_) => Self::internal(e.to_string()),
        }
    }
}

impl From<kvquilt_model::CandleError> for ApiError {
    fn from(e: kvquilt_model::CandleError) -> Self {
        Self::internal(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_room() -> StoreError {
        StoreError::NoRoom {
            tier: "host".into(),
            needed: 10,
            available: 0,
            capacity: 5,
        }
    }

    #[test]
    fn a_cause_gets_one_status_whichever_layer_reports_it() {
        let cases: Vec<(ApiError, ApiError)> = vec![
            (no_room().into(), BlendError::Store(no_room()).into()),
            (
                ModelError::InvalidInput("bad positions".into()).into(),
                BlendError::Model(ModelError::InvalidInput("bad positions".into())).into(),
            ),
            (
                StoreError::Corrupt("truncated".into()).into(),
                BlendError::Store(StoreError::Corrupt("truncated".into())).into(),
            ),
            (
                ModelError::ContextOverflow {
                    needed: 9,
                    context: 8,
                }
                .into(),
                BlendError::Model(ModelError::ContextOverflow {
                    needed: 9,
                    context: 8,
                })
                .into(),
            ),
        ];
        for (bare, wrapped) in cases {
            assert_eq!(bare.status, wrapped.status, "{}", bare.message);
            assert_eq!(bare.code, wrapped.code);
            assert_eq!(bare.message, wrapped.message);
        }
        let full: ApiError = BlendError::Store(no_room()).into();
        assert_eq!(full.status, StatusCode::INSUFFICIENT_STORAGE);
        let input: ApiError = BlendError::Model(ModelError::InvalidInput("x".into())).into();
        assert_eq!(input.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn device_out_of_memory_is_a_retryable_503() {
        let oom = kvquilt_model::CandleError::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        );
        let api = ApiError::from(BlendError::Model(ModelError::Candle(oom)));
        assert_eq!(api.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(api.code, "device_out_of_memory");
        let resp = api.into_response();
        assert_eq!(resp.headers()[axum::http::header::RETRY_AFTER], "1");
        assert_eq!(resp.headers()["x-should-retry"], "true");
    }

    /// OpenAI's SDKs retry every 5xx unless `x-should-retry: false`: a full store or a fault
    /// is not worth two more attempts; a client error gets no header (they do not retry it).
    /// The body has OpenAI's `param` (null).
    #[tokio::test]
    async fn a_failure_says_whether_a_retry_can_help() {
        use http_body_util::BodyExt as _;
        for (err, retry) in [
            (ApiError::from(no_room()), Some("false")),
            (ApiError::internal("x"), Some("false")),
            (ApiError::bad_request("invalid_request", "x"), None),
        ] {
            let resp = err.into_response();
            let got = resp
                .headers()
                .get("x-should-retry")
                .map(|v| v.to_str().unwrap().to_owned());
            assert_eq!(got.as_deref(), retry);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["error"]["param"], serde_json::Value::Null);
            assert!(v["error"].as_object().unwrap().contains_key("param"));
        }
    }
}
