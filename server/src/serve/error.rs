//! API errors: every rejection is a JSON body naming the problem, in OpenAI's shape so
//! OpenAI clients surface the message:
//! `{"error": {"message": "...", "type": "invalid_request_error", "code": "body_too_large"}}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kvquilt_blend::BlendError;
use serde_json::json;

/// A failed request: status, a stable machine-readable code, and a message for people.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    fn kind(&self) -> &'static str {
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
        if self.status.is_server_error() {
            tracing::error!(code = self.code, message = %self.message, "request failed");
        }
        let body =
            json!({"error": {"message": self.message, "type": self.kind(), "code": self.code}});
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

impl From<BlendError> for ApiError {
    fn from(e: BlendError) -> Self {
        match e {
            BlendError::Invalid(m) => Self::bad_request("invalid_request", m),
            BlendError::Mismatch { .. } => Self::bad_request("object_mismatch", e.to_string()),
            other => Self::internal(other.to_string()),
        }
    }
}

impl From<kvquilt_kvstore::StoreError> for ApiError {
    fn from(e: kvquilt_kvstore::StoreError) -> Self {
        use kvquilt_kvstore::StoreError as S;
        match e {
            S::Corrupt(_) | S::Checksum { .. } => {
                Self::bad_request("corrupt_object", e.to_string())
            }
            S::Mismatch(_) => Self::bad_request("object_mismatch", e.to_string()),
            S::Invalid(_) => Self::bad_request("invalid_request", e.to_string()),
            S::NoRoom { .. } | S::DiskFull { .. } => Self::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "store_full",
                e.to_string(),
            ),
            other => Self::internal(other.to_string()),
        }
    }
}

impl From<kvquilt_model::ModelError> for ApiError {
    fn from(e: kvquilt_model::ModelError) -> Self {
        Self::internal(e.to_string())
    }
}

impl From<kvquilt_model::CandleError> for ApiError {
    fn from(e: kvquilt_model::CandleError) -> Self {
        Self::internal(e.to_string())
    }
}
