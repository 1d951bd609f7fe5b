#![warn(missing_docs, unreachable_pub)]
//! kvquilt's context assembly: how chunks become stored KV, and how stored KV becomes a
//! prompt's context.
//!
//! - [`ChunkCodec`] is the single contract between text and stored objects (tokenisation,
//!   prefill positions, key inputs); the batch job, the API and store-back all call it.
//! - [`Blender`] runs a prompt (prefix + chunks + suffix) in one of four [`Mode`]s: `full`
//!   prefill (the baseline), exact `prefix` reuse, `reuse` of every chunk's KV at its new
//!   positions (keys are stored before RoPE, so re-positioning is the rotation attention
//!   applies anyway), and `blend`: CacheBlend's selective recompute with the exact causal
//!   mask ([`BlendConfig`]).
//! - Layers stream from the store while earlier layers compute ([`kvquilt_model::Model::run_layers_with`]),
//!   and a [`CostModel`] chooses between loading and recomputing each chunk so that no
//!   request is estimated slower than its full prefill.
//! - [`compress`] applies a token policy (`kvquilt_compression::policy`) to a prompt's
//!   cache: attention observed layer by layer while it prefills, a keep set per layer and KV
//!   head, a pruned cache (`KvCache::retain`).
//! - [`calibration`] files what `kvquilt calibrate` measured per model identity and turns it
//!   into what `blend` means when a request names no ratio ([`calibration::BlendDefault`]).
//! - A [`DeviceTier`] keeps recently used chunk KV resident on the model's device (GPU
//!   memory), above the store's host and SSD tiers; on a GPU the host tier holds its objects
//!   in page-locked memory (`pinned_host.rs`), so its hits upload by DMA.

mod batcher;
pub mod block_prefill;
pub mod calibration;
mod chunk;
pub mod compress;
mod config;
mod cost;
mod device_tier;
mod engine;
mod error;
mod graphs;
mod identity;
mod phases;
mod pinned_host;
mod priority;
mod prompt_logprobs;
pub mod rag;
mod recompute;
mod request;
pub mod select;
mod tensor_bytes;
#[cfg(test)]
mod test_model;

pub use batcher::{BatchStats, BatchedSteps, DEFAULT_GATHER, DecodeBatcher};
pub use chunk::{CHUNK_ENCODING, ChunkCodec, ChunkEncoding};
pub use config::{BlendConfig, CorrectionScope, Mode, ParallelCorrection};
pub use cost::{CostModel, PlannedMode, prefill_work};
pub use device_tier::{DeviceChunk, DeviceTier};
pub use engine::{
    Blender, DEFAULT_PREFIX_PAGE, DEFAULT_STALL_FLOOR, Precomputed, STALL_FACTOR, StoreBack,
    device_decoded,
};
pub use error::{BlendError, Result};
#[cfg(feature = "gpu")]
pub use graphs::Graphed;
pub use graphs::{DecodeSteps, GraphStats};
pub use identity::{ModelIdentity, layout_of, prompt_opening};
pub use phases::PhaseTime;
pub use priority::{DEFAULT_PROMPT_PRIORITY, PausedTurn, PromptPriority, PromptTurn, YieldStats};
pub use prompt_logprobs::PromptLogprob;
pub use request::{BlendOutput, BlendRequest, BlendStats, Fallback, SegmentSource, StoredObject};
pub use select::{Deviation, Spread};
pub use tensor_bytes::{layer_from_bytes, layer_from_record, layer_to_bytes};
