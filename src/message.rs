//! The contract between a source and the processor: a source turns each
//! Redis delivery into a [`Delivery`], the [`crate::processor::Processor`]
//! turns it into a [`Disposition`], and the source carries that out
//! (acknowledge, dead-letter and acknowledge, or leave it for later).
//!
//! Nothing here does I/O; the types only carry what a decision needs.

use serde_json::{json, Value};

use crate::dlq::DeadLetter;
use crate::tracing_ctx::RemoteParent;

/// Which source a delivery came from (the `source` label of the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// A Redis stream entry (`XADD`).
    Stream,
    /// A BullMQ job (`Queue.add`).
    Bullmq,
}

impl SourceKind {
    /// The metric label and span field of this source.
    pub fn label(self) -> &'static str {
        match self {
            Self::Stream => "stream",
            Self::Bullmq => "bullmq",
        }
    }
}

/// Bytes that a stream entry's fields other than `data` (`name`,
/// `traceparent`, `tracestate`, `source`, and every field name) may take
/// together before the entry is too large: generous for real trace
/// context, small beside an event.
pub const MAX_SIDE_FIELD_BYTES: usize = 16 * 1024;

/// One message as a source delivered it, whatever the source.
#[derive(Debug)]
pub struct Delivery {
    pub source: SourceKind,
    /// The message identity (`stream:<key>:<entry id>`,
    /// `bullmq:<queue>:<job id>`); for a replayed dead letter, the identity
    /// the message first arrived with, so that it keeps its idempotency key.
    pub identity: String,
    /// The job name (`audit.event` when the message named none).
    pub name: String,
    /// The raw `data` bytes, untouched; `None` when the message had none.
    pub data: Option<Vec<u8>>,
    /// Bytes of the message's other fields (names and values), checked
    /// against [`MAX_SIDE_FIELD_BYTES`]; 0 for sources without such fields.
    pub side_bytes: usize,
    /// How many times this message has been delivered, this time included.
    pub attempts: u64,
    /// Whether the processor waits out a database outage itself, holding
    /// the message (stream entries: their redelivery would raise the
    /// delivery count), or answers [`Disposition::Retry`] at once so that
    /// the protocol retries it (BullMQ jobs honour their own `attempts` and
    /// `backoff`, as producers configured them).
    pub wait_out_outages: bool,
    /// The delivery count above which the message is dead-lettered as
    /// poison (`stream.max_deliveries`); `None` where the protocol bounds
    /// redeliveries itself (BullMQ's attempts and stalled-job limit).
    pub max_deliveries: Option<u64>,
    /// The producer's trace context, when it sent one.
    pub trace: Option<RemoteParent>,
    /// When the producer enqueued it (Unix ms), for end-to-end latency.
    pub enqueued_ms: Option<i64>,
}

/// What became of a stored event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// A new row was committed.
    Inserted,
    /// The same event was already stored (a redelivery): nothing written.
    Duplicate,
}

impl Stored {
    /// The metric label and the producer-facing word.
    pub fn label(self) -> &'static str {
        match self {
            Self::Inserted => "inserted",
            Self::Duplicate => "duplicate",
        }
    }
}

/// What the source must do with one delivery.
#[derive(Debug)]
pub enum Disposition {
    /// The event's row is committed: acknowledge.
    Stored {
        stored: Stored,
        idempotency_key: String,
        hash: String,
    },
    /// A job request was recorded by its handler: acknowledge; `reply`
    /// answers the requester (BullMQ return value).
    Job { kind: &'static str, reply: Value },
    /// Never storable: write this dead letter, then acknowledge, both at
    /// once where the source can (stream: one MULTI/EXEC).
    DeadLetter(DeadLetter),
    /// Not durable and not the message's fault (the database is
    /// unavailable and the delivery does not wait it out, or the worker is
    /// shutting down): leave it unacknowledged so it is delivered again.
    Retry { cause: String },
}

impl Disposition {
    /// The JSON a BullMQ producer receives as the job's return value.
    pub fn reply(&self) -> Value {
        match self {
            Self::Stored {
                stored,
                idempotency_key,
                hash,
            } => {
                json!({ "idempotencyKey": idempotency_key, "stored": stored.label(), "hash": hash })
            }
            Self::Job { reply, .. } => reply.clone(),
            Self::DeadLetter(letter) => {
                json!({ "reason": letter.reason.code(), "error": letter.error })
            }
            Self::Retry { cause } => json!({ "retry": cause }),
        }
    }

    /// Whether the message may be acknowledged once this is carried out.
    pub fn is_final(&self) -> bool {
        !matches!(self, Self::Retry { .. })
    }
}
