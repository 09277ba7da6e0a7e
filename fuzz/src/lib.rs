//! The worker's pure decoding and integrity code, compiled from the main
//! crate's own source files for the fuzz targets.
//!
//! Why `#[path]` instead of a dependency on the `audit-worker` crate: the
//! fuzz build instruments every crate it compiles, and the worker's full
//! dependency tree (Redis, PostgreSQL, HTTP, S3 clients) would take many
//! minutes to build that way on a small CI machine, for code the targets
//! never reach. `src/event.rs`, `src/dlq/reason.rs` and `src/integrity/`
//! only use each other (`crate::integrity`, `crate::dlq`, which resolve here
//! exactly as in the worker), so
//! the same text compiles unchanged. If either module ever starts using
//! another part of the worker, this crate stops building and the CI fuzz
//! step says so.
#![allow(dead_code, clippy::all)]

#[path = "../../src/integrity/mod.rs"]
pub mod integrity;

#[path = "../../src/event.rs"]
pub mod event;

/// The reason codes `event` returns, from the worker's dead-letter module
/// (`event` re-exports them from `crate::dlq`).
#[path = "../../src/dlq/reason.rs"]
pub mod dlq_reason;
pub mod dlq {
    pub use super::dlq_reason::{RejectReason, Rejection};
}
