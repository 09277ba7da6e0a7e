//! Where validated events go: PostgreSQL, in batches.
//!
//! Sources hand each event to the [`SinkHandle`] and get a receiver for its
//! [`StoreOutcome`]; they acknowledge the message only once that outcome
//! says the row is durable (or the event must be dead-lettered). Batching
//! is invisible to them: many sources and many in-flight jobs share one
//! batch, so one database round trip serves them all.

pub mod breaker;
pub mod postgres;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::event::{Rejection, ValidEvent};

pub use breaker::{BreakerState, CircuitBreaker};
pub use postgres::{PostgresSink, SinkSettings};

/// A validated event together with where it came from.
#[derive(Debug, Clone)]
pub struct AuditRecord {
    pub event: ValidEvent,
    /// `eventId`, or the source message identity when the producer gave none.
    pub idempotency_key: String,
    /// The source message identity (`stream:<key>:<id>`, `bullmq:<queue>:<job id>`).
    pub source: String,
}

impl AuditRecord {
    /// Pairs an event with its source identity and derives its idempotency key.
    pub fn new(event: ValidEvent, source: String) -> Self {
        let idempotency_key = event.event_id.clone().unwrap_or_else(|| source.clone());
        Self {
            event,
            idempotency_key,
            source,
        }
    }

    /// What a source keeps of the record once the record went to the sink.
    pub fn key(&self) -> RecordKey {
        RecordKey {
            idempotency_key: self.idempotency_key.clone(),
            event_time: self.event.event_time,
            hash: self.event.hash.clone(),
        }
    }
}

/// A record's identity and hash: small enough for a source to keep beside
/// the pending outcome, and all it needs to explain a [`StoreOutcome::Conflict`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordKey {
    pub idempotency_key: String,
    pub event_time: DateTime<Utc>,
    pub hash: String,
}

impl RecordKey {
    /// The dead-letter rejection for this record, given the stored row's hash.
    pub fn conflict(&self, stored_hash: &str) -> Rejection {
        Rejection::idempotency_conflict(
            &self.idempotency_key,
            self.event_time,
            stored_hash,
            &self.hash,
        )
    }
}

/// What became of one record.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreOutcome {
    /// A new row was committed.
    Inserted,
    /// The same event (same idempotency key, time and canonical hash) was
    /// already stored; nothing written.
    Duplicate,
    /// Another event with the same idempotency key and time, but another
    /// canonical hash, is stored: a reused `eventId`. Nothing written; the
    /// event must be dead-lettered (`idempotency_conflict`), never
    /// acknowledged as a duplicate.
    Conflict { stored_hash: String },
    /// PostgreSQL refused this row for a reason no retry fixes; dead-letter it.
    Rejected(Rejection),
    /// The database could not be written (after retries, or the breaker is
    /// open); leave the message unacknowledged so it is delivered again.
    Unavailable(String),
}

impl StoreOutcome {
    /// Whether the message may be acknowledged (its row is durable, or it
    /// must be dead-lettered).
    pub fn is_final(&self) -> bool {
        !matches!(self, StoreOutcome::Unavailable(_))
    }
}

/// One record waiting in the batcher, with the channel its outcome goes to.
pub(crate) struct StoreRequest {
    pub record: AuditRecord,
    pub reply: oneshot::Sender<StoreOutcome>,
}

/// The sources' handle to the sink; cheap to clone.
#[derive(Clone)]
pub struct SinkHandle {
    pub(crate) tx: mpsc::Sender<StoreRequest>,
    pub(crate) breaker: CircuitBreaker,
}

impl SinkHandle {
    /// Waits while the circuit breaker is open, so that sources stop
    /// reading during a database outage; false if `cancel` fired first.
    pub async fn wait_writable(&self, cancel: &CancellationToken) -> bool {
        self.breaker.wait_writable(cancel).await
    }

    /// The breaker guarding the writes (for health and readiness).
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// Queues a record for the next batch and returns where its outcome
    /// will arrive. Waits while the batcher's queue is full (backpressure).
    pub async fn submit(&self, record: AuditRecord) -> PendingOutcome {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(StoreRequest { record, reply }).await.is_err() {
            // The sink is shutting down: the rx's sender was dropped with the
            // request, so `wait` reports the record as unavailable.
        }
        PendingOutcome(rx)
    }
}

/// The eventual outcome of one submitted record.
pub struct PendingOutcome(oneshot::Receiver<StoreOutcome>);

impl PendingOutcome {
    /// Waits for the outcome; a sink that went away counts as unavailable.
    pub async fn wait(self) -> StoreOutcome {
        self.0
            .await
            .unwrap_or_else(|_| StoreOutcome::Unavailable("the sink stopped before writing".into()))
    }
}
