//! Integrity primitives: the canonical event hash (v1), HMAC signatures,
//! and (for snapshots) the record digest (leaf v2), RFC 6962 Merkle trees,
//! tlog tiles and signed checkpoints.
//!
//! Everything here is pure: bytes in, bytes out, no I/O, so it can be
//! unit-tested against the known-answer vectors in
//! `tests/fixtures/integrity-vectors.json` and fuzzed.

pub mod canonical;
pub mod checkpoint;
pub mod merkle;
pub mod record;
pub mod signature;
pub mod tiles;

pub use canonical::{canonical_hash_v1, canonical_string_v1, HashedFields};
pub use signature::{HmacKey, HmacKeyRing};
