//! kvquilt's HTTP wire format: every JSON body the sidecar reads or writes, its error shape
//! and its route list.
//!
//! This crate is an API boundary. It depends on no engine crate: the server converts its
//! engine's structs (`kvquilt_blend::BlendStats`, `kvquilt_kvstore::KvLayout`, ...) into
//! these types at the edge, so an engine refactor cannot silently change the wire format.
//! The server deserialises requests into these types and serialises responses from them, the
//! Rust client (`kvquilt-client`) does the opposite, and with the `schema` feature the
//! server's OpenAPI document is generated from them ([`ROUTES`] lists every route it must
//! describe; a server test checks the router serves exactly these).
//!
//! Compatibility: fields are only added (as `Option` or with a serde default), never renamed
//! or removed, within `/v1`.

#![warn(missing_docs)]

pub mod blend;
mod bounded;
pub mod chunks;
pub mod error;
pub mod object;
pub mod openai;
pub mod ops;
mod routes;

pub use blend::{
    BlendRequest, BlendResponse, BlendStats, CompressSpec, CompressionStats, DecodeSpec, Fallback,
    ModeSpec, SegmentSource, TokenLogprob,
};
pub use bounded::{MAX_CHECKED_VALUES, MAX_MESSAGE_ITEMS};
pub use chunks::{
    ChunkInfo, ChunkInfoQuery, ChunkLookup, ChunkOutcome, ChunkRef, ChunkSpec, ChunkStatus,
    DeleteChunkQuery, DeleteChunkResponse, Layout, LookupChunksRequest, LookupChunksResponse,
    MAX_CHUNKS, MAX_PIN_TTL_S, PinRequest, Pinned, PutChunksRequest, PutChunksResponse, Tier,
};
pub use error::{ErrorBody, ErrorDetail};
pub use object::Object;
pub use ops::{Health, KeyIdentity, Stats};
pub use routes::{Method, ROUTES, Route};

/// Media type of a KV object's bytes (`GET`/`PUT /v1/chunks/{id}/kv`): the binary object
/// format documented in `kvstore`.
pub const OBJECT_MEDIA_TYPE: &str = "application/vnd.kvquilt.kv-object";
