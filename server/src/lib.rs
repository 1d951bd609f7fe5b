//! kvquilt's outermost crate: the HTTP sidecar ([`serve`]), the precompute job and the other
//! subcommands ([`cmd`]), and the command line ([`cli`]) the `kvquilt` binary runs.
//!
//! This crate is the only one that knows the HTTP API; its wire types live in `kvquilt-api`
//! (shared with the Rust client and the OpenAPI document), and handlers convert the engine's
//! structs into them at the edge. The router is built by [`serve::router`] from one route
//! table, so it can be driven in-process (tower's `oneshot`) by tests.
//!
//! The benchmark and evaluation harnesses are not part of this crate: `kvquilt bench …` and
//! `kvquilt eval …` run the `kvquilt-bench` binary installed beside `kvquilt` (crate
//! `benches/`), so the production binary carries none of their dependencies.

#![warn(missing_docs)]

pub mod cli;
pub mod cmd;
pub mod model_source;
pub mod process;
pub mod serve;
pub mod store_setup;
