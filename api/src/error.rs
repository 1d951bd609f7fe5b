//! The error body every rejection carries, in OpenAI's shape so OpenAI clients surface the
//! message: `{"error": {"message": "...", "type": "invalid_request_error", "code": "...",
//! "param": null}}`.

use serde::{Deserialize, Serialize};

/// A failed request's body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// What went wrong, for people (`message`) and programs (`code`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ErrorDetail {
    /// A sentence naming the problem (the limit, the field, the id).
    pub message: String,
    /// OpenAI's error class: `invalid_request_error`, `authentication_error`,
    /// `not_found_error`, `overloaded_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A stable machine-readable code (`body_too_large`, `unknown_chunk`, ...).
    pub code: String,
    /// OpenAI's `param`, for clients that read it: always written, and `null` (kvquilt
    /// names the field at fault in `message`).
    #[serde(default)]
    pub param: Option<String>,
}
