//! HTTP handlers, one module per resource.

pub(crate) mod blend;
pub(crate) mod chunk_ref;
pub(crate) mod chunks;
pub(crate) mod openai;
pub(crate) mod ops;
