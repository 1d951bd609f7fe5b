//! One runner per [`crate::Mode`]. Each takes a validated request and returns its output:
//! the first token's logits, the whole prompt's KV at positions `0..N`, its statistics and
//! what it stored back.

mod assembly;
pub(crate) mod blend;
pub(crate) mod full;
pub(crate) mod prefix;
pub(crate) mod reuse;
