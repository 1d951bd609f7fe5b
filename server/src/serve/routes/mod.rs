//! HTTP handlers, one module per resource.

pub mod blend;
pub mod chunk_ref;
pub mod chunks;
pub mod openai;
pub mod ops;
