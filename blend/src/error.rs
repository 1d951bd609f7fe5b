//! Errors of the blend crate.

use kvquilt_kvstore::StoreError;
use kvquilt_model::ModelError;

/// What can go wrong while turning chunks into objects or assembling a context.
#[derive(Debug, thiserror::Error)]
pub enum BlendError {
    /// The model failed (compute, shapes, tokenizer).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The store failed (I/O, verification, capacity).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored object does not fit the running model (layout, dtype, token count).
    #[error("stored object {key} does not match the model: {reason}")]
    Mismatch {
        /// The object's key, hex.
        key: String,
        /// What does not match.
        reason: String,
    },
    /// The request itself is unusable (empty, too long, bad ratio, ...).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A token policy could not compress (bad budget or parameter, missing observation).
    #[error(transparent)]
    Policy(#[from] kvquilt_compression::policy::PolicyError),
    /// The decode batcher could not run a step (stopped, or a step panicked).
    #[error("decode batcher: {0}")]
    Batcher(String),
    /// Reading the model's weights failed.
    #[error("reading the model's weights for its fingerprint: {0}")]
    Io(#[from] std::io::Error),
}

/// The blend crate's result (its error by default).
pub type Result<T, E = BlendError> = std::result::Result<T, E>;

/// An [`BlendError::Invalid`] with `msg`.
pub(crate) fn invalid(msg: impl Into<String>) -> BlendError {
    BlendError::Invalid(msg.into())
}

impl BlendError {
    /// Whether the model's device ran out of memory ([`ModelError::is_out_of_device_memory`]).
    pub fn is_out_of_device_memory(&self) -> bool {
        matches!(self, Self::Model(m) if m.is_out_of_device_memory())
    }
}

impl From<kvquilt_model::CandleError> for BlendError {
    fn from(e: kvquilt_model::CandleError) -> Self {
        BlendError::Model(ModelError::from(e))
    }
}
