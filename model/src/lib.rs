//! The model runtime of kvquilt: tokenizer, weights, and a decoder forward pass whose KV
//! cache belongs to the caller.
//!
//! kvquilt stores, moves and blends KV caches, so the forward pass takes and returns them
//! explicitly ([`KvCache`]): prefill at any absolute positions, decode steps, and a partial
//! forward that recomputes a chosen subset of tokens from a given layer on while attending
//! over a full-length cache ([`Model::run_layers`] with [`Rows::Replace`]). **K is stored
//! before RoPE** and rotated inside attention, so cached chunks can be placed at new
//! positions for free.
//!
//! Architectures: `llama` and `qwen2` (QKV bias), from GGUF files or HF directories.
//! Devices: CPU (f32 by default) and, with the `gpu` feature, CUDA (bf16 by default).
//!
//! ```no_run
//! # fn main() -> kvquilt_model::Result<()> {
//! use kvquilt_model::{load, default_dtype, Device};
//! let m = load(std::path::Path::new("model.gguf"), &Device::Cpu, default_dtype(&Device::Cpu))?;
//! let ids = m.tokenizer()?.encode("The capital of France is")?;
//! let mut cache = m.model.empty_cache()?;
//! let logits = m.model.prefill(&ids, &kvquilt_model::positions(0, ids.len()), &mut cache)?; // [vocab], f32
//! # let _ = logits; Ok(()) }
//! ```

#![warn(missing_docs, unreachable_pub)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod attention;
mod bf16dot;
mod bf16linear;
mod chat;
mod config;
pub mod dequant;
mod device;
pub mod embed;
mod error;
pub mod fetch;
#[cfg(target_arch = "x86_64")]
mod few_rows_avx512;
mod generate;
mod gguf;
mod hook;
mod intdot;
mod kernels;
mod kv;
mod load;
mod parallel;
mod quant;
mod readback;
mod rope;
mod rows;
pub mod staging;
mod tiled;
mod tokenizer;
mod transformer;
mod vmath;
mod weights;

pub use attention::{AttentionKernel, CpuAttentionPrecision, ProbeRequest};
pub use bf16linear::CpuMatmulPrecision;
pub use candle_core::{DType, Device, Error as CandleError, Tensor};
pub use chat::{ChatMessage, ChatTemplate};
pub use config::{Architecture, MAX_CONTEXT, MAX_LAYERS, ModelConfig, RopeScaling};
pub use device::{DeviceName, bind_to_thread, parse_device, settle_cpu_threads};
pub use error::{ModelError, Result};
pub use generate::{
    FinishReason, GenerateOptions, Generation, argmax, continue_greedy, generate_greedy,
    log_sum_exp, top_logprobs,
};
pub use hook::{CollectProbes, FillLayers, HookError, LayerHook, LayerProbe};
pub use intdot::CpuDecodePrecision;
#[cfg(feature = "gpu")]
pub use kernels::{NormErrors, norm_kernel_errors};
pub use kv::{KvCache, LayerKv, positions};
pub use load::{LoadedModel, default_dtype, load};
pub use parallel::ParallelContext;
pub use readback::ReadBack;
pub use rope::{Rope, RopeTables};
pub use rows::{RowReplacement, concat};
pub use tokenizer::Tokenizer;
#[cfg(feature = "gpu")]
pub use transformer::GraphedCache;
pub use transformer::{BatchStep, LayersOutput, Model, Rows};
