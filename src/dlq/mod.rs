//! The dead-letter stream `audit:dlq`: messages that can never be stored,
//! kept with their original bytes and a stable reason code.
//!
//! [`reason`] holds the codes (a contract with operators), [`letter`] the
//! dead letter the worker writes, [`admin`] the operator's commands.

pub mod admin;
pub mod letter;
pub mod reason;

pub use admin::{
    list, purge_older_than, replay, DeadLetterFilter, StoredDeadLetter, REPLAY_SOURCE_FIELD,
};
pub use letter::DeadLetter;
pub use reason::{RejectReason, Rejection};
