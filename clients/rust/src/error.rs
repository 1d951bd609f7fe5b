//! The client's error type.

/// What a call can fail with. More kinds may come: match with a wildcard arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server refused the request; `code` is the API's stable error code.
    #[error("kvquilt API error {status} ({code}): {message}")]
    Api {
        /// The HTTP status (200 for an error event inside a stream).
        status: u16,
        /// The stable machine-readable code (`unknown_chunk`, ...).
        code: String,
        /// The sentence naming the problem.
        message: String,
        /// When the server said to try again (its `Retry-After`: a 503 for a full queue,
        /// a busy body budget, a device out of memory). Nothing is retried for the caller.
        retry_after: Option<std::time::Duration>,
    },
    /// The request did not complete (connection, timeout, ...).
    #[error("HTTP error: {0}")]
    Http(#[from] reqwest::Error),
    /// The response was not what the API documents.
    #[error("unexpected response: {0}")]
    Decode(String),
    /// The call was refused before anything was sent (a chunk id that is not one).
    #[error("invalid input: {0}")]
    InvalidInput(String),
}

impl Error {
    /// The API error code, if the server answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// When the server said to try again, if it did.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Error::Api { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The HTTP status, if the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } => Some(*status),
            Error::Http(e) => e.status().map(|s| s.as_u16()),
            Error::Decode(_) | Error::InvalidInput(_) => None,
        }
    }
}
