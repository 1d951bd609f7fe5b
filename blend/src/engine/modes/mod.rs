//! One runner per [`crate::Mode`]. Each takes a validated request and returns its output
//! (the first token's logits, the whole prompt's KV at positions `0..N`, its statistics)
//! and its store-back, the work left for after the first token.

pub(crate) mod assembly;
pub(crate) mod blend;
pub(crate) mod full;
pub(crate) mod prefix;
pub(crate) mod reuse;

/// A mode's result: the output, and the store-back not yet run.
pub(crate) type Ran = (
    crate::request::BlendOutput,
    crate::engine::store_back::StoreBack,
);
