//! Job kinds other than audit events (`export.audit`, `audit.snapshot`,
//! `report.compliance`, `gdpr.access`, `gdpr.erase`).
//!
//! A queue message for a job is only a request: the source hands its bytes
//! to the kind's [`JobHandler`], which validates it and records the job
//! durably in PostgreSQL (deduplicated by the message identity), then the
//! message is acknowledged. The work itself runs in the kind's own executor,
//! which leases jobs from PostgreSQL and checkpoints their progress there,
//! so a long job neither holds a Redis delivery open nor restarts from zero
//! after a crash. `gdpr.erase` is the exception: its handler performs the
//! erasure within the delivery (as the API and the CLI do), idempotent by
//! the message identity, so a redelivery finds the erasure already done.

pub mod dev_key;
pub mod export;
pub mod gdpr;
pub mod internal_event;
pub mod key_windows;
pub mod log_monitor;
pub mod merkle_stream;
pub mod published;
pub mod report;
pub mod retention;
pub mod snapshot;
pub mod snapshot_cli;
pub mod stored_record;
pub mod tile_store;
pub mod unsealed;
pub mod verify;

use std::sync::Arc;

use futures::future::BoxFuture;

use crate::dlq::{RejectReason, Rejection};
use crate::processor::JobKind;

/// Why a job request was not accepted.
#[derive(Debug, Clone, PartialEq)]
pub enum JobError {
    /// The request can never be accepted (bad payload): dead-letter it.
    Rejected(Rejection),
    /// The request could not be recorded now (database down): retry later.
    Transient(String),
}

/// Accepts job requests of one kind.
pub trait JobHandler: Send + Sync {
    /// Validates the request and records it durably; returns a JSON value
    /// for the requester (e.g. the job id). Must be idempotent for the same
    /// `source` (a redelivered message returns the same job).
    fn accept<'a>(
        &'a self,
        data: &'a [u8],
        source: &'a str,
    ) -> BoxFuture<'a, Result<serde_json::Value, JobError>>;
}

/// The handlers known to this worker, by kind.
#[derive(Clone, Default)]
pub struct JobHandlers {
    pub export: Option<Arc<dyn JobHandler>>,
    pub snapshot: Option<Arc<dyn JobHandler>>,
    pub report: Option<Arc<dyn JobHandler>>,
    pub gdpr_access: Option<Arc<dyn JobHandler>>,
    pub gdpr_erase: Option<Arc<dyn JobHandler>>,
}

impl JobHandlers {
    /// Routes a job request to its kind's handler; a kind without a handler
    /// is rejected with `unknown_kind`.
    pub async fn accept(
        &self,
        kind: JobKind,
        name: &str,
        data: &[u8],
        source: &str,
    ) -> Result<serde_json::Value, JobError> {
        let handler = match kind {
            JobKind::Export => self.export.as_ref(),
            JobKind::Snapshot => self.snapshot.as_ref(),
            JobKind::Report => self.report.as_ref(),
            JobKind::GdprAccess => self.gdpr_access.as_ref(),
            JobKind::GdprErase => self.gdpr_erase.as_ref(),
            JobKind::AuditEvent => None,
        };
        // Erasure needs its key: say so rather than only "not handled".
        let hint = if kind == JobKind::GdprErase {
            " (erasure needs gdpr.pseudonym_key)"
        } else {
            ""
        };
        match handler {
            Some(h) => h.accept(data, source).await,
            None => Err(JobError::Rejected(Rejection::new(
                RejectReason::UnknownKind,
                format!("job kind {name} is not handled by this worker{hint}"),
            ))),
        }
    }
}
