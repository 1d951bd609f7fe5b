//! The model crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong loading a model, tokenizing, or running the forward pass.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A model file or directory could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file or directory that could not be read.
        path: PathBuf,
        /// What the operating system reported.
        #[source]
        source: std::io::Error,
    },
    /// The file exists but is not a usable GGUF file (bad magic, truncated, inconsistent).
    #[error("{path} is not a usable GGUF file: {reason}")]
    InvalidGguf {
        /// The GGUF file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The file or directory is missing something the architecture needs, or holds
    /// values that contradict each other.
    #[error("invalid model {path}: {reason}")]
    InvalidModel {
        /// The model file or directory.
        path: PathBuf,
        /// What is missing or inconsistent.
        reason: String,
    },
    /// The architecture named by the model is not one kvquilt implements.
    #[error("unsupported model architecture `{0}` (supported: llama, qwen2)")]
    UnsupportedArchitecture(String),
    /// A prompt (or a prompt plus cached context) does not fit the model's context window.
    #[error(
        "the input needs positions up to {needed} but the model's context window is {context} tokens"
    )]
    ContextOverflow {
        /// Context the input needs: its largest position plus one (tokens).
        needed: usize,
        /// The model's context window (tokens).
        context: usize,
    },
    /// The tokenizer could not be built or failed on input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be rendered.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// A caller passed arguments that break an API precondition (shapes, positions, indices).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// Fetching the default model failed.
    #[error("model fetch: {0}")]
    Fetch(String),
    /// A [`crate::LayerHook`] stopped the forward pass.
    #[error(transparent)]
    Hook(#[from] crate::hook::HookError),
    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    /// Whether the device ran out of memory (a CUDA allocation or cuBLAS workspace failed):
    /// transient, worth a retry once memory is freed, unlike every other error here.
    pub fn is_out_of_device_memory(&self) -> bool {
        match self {
            Self::Candle(e) => {
                let msg = e.to_string();
                msg.contains("OUT_OF_MEMORY") || msg.contains("ALLOC_FAILED")
            }
            _ => false,
        }
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, ModelError>;

pub(crate) fn invalid_input(msg: impl Into<String>) -> ModelError {
    ModelError::InvalidInput(msg.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_out_of_memory_is_told_apart() {
        // how cudarc reports a failed allocation through candle
        let oom = candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        );
        assert!(ModelError::from(oom).is_out_of_device_memory());
        let other = candle_core::Error::Msg("shape mismatch".into());
        assert!(!ModelError::from(other).is_out_of_device_memory());
        assert!(!invalid_input("out of memory").is_out_of_device_memory());
    }
}
