//! KV compression for kvquilt. This crate knows no model runtime: it works on plain arrays
//! with a layout, so the store (which knows nothing of models) can depend on it.
//!
//! - [`codec`]: how one stored layer's K‖V bytes are encoded at rest. [`CodecSpec`] names a
//!   codec and its parameters (what an object header records); [`CodecSpec::encode`] and
//!   [`CodecSpec::decode_into`] run it over a [`LayerShape`]. Lossless: `raw`, `lz4`. Lossy:
//!   `fp8` (e4m3 with zero points: K per channel, V per token; `fp8sym`: one scale per head),
//!   `int8` (K per channel, V per token; `int8sym` without zero points) and KIVI-style
//!   `kivi4` / `kivi2` (K per channel and V per token in groups of G, the last R tokens
//!   exact); each lossy codec optionally followed by lz4 (`int8+lz4`).
//!
//! - [`policy`]: which KV entries of a prompt's cache to keep, per layer and KV head
//!   ([`policy::TokenPolicy`]; StreamingLLM, H2O, SnapKV, SAGE-KV), from attention the model
//!   observed, under a budget. The model runtime applies the resulting [`policy::KeepSet`].

#![warn(missing_docs, unreachable_pub)]

pub mod codec;
pub mod policy;

pub use codec::{CodecError, CodecSpec, ElemType, LayerShape};
