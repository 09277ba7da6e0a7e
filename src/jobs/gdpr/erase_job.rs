//! `gdpr.erase` arriving by the queue (a stream entry or BullMQ job of that
//! name): the request is validated as the API's and the CLI's are
//! ([`EraseRequest::check`]), bounded by the organisations queue producers
//! are trusted with (`export.queue_organizations`, as `gdpr.access`), and
//! the erasure runs within the delivery with the message identity as its
//! `source`, so a redelivered message finds the same erasure: nothing is
//! erased twice and its `gdpr.erasure.completed` event is recorded once.
//!
//! Every delivery ends in a stored result or a dead letter:
//!
//! - done (or found done): the [`Erasure`](super::erase::Erasure) is the
//!   job's result;
//! - malformed: `invalid_erase_request`;
//! - an active legal hold covers events of the subject: `legal_hold`, the
//!   error naming the hold, its reason and owner (the refusal is also
//!   recorded in `gdpr_erasures`); send it again once the hold is released;
//! - stored data the erasure cannot read, or a data error the database
//!   raises about the rows: `erasure_failed`;
//! - the database, Redis or the object store unavailable: retried, never
//!   dead-lettered (the erasure resumes where it stopped).

use std::sync::Arc;

use futures::future::BoxFuture;
use serde::Deserialize;

use super::erase::{EraseError, EraseRequest, Eraser};
use crate::dlq::{RejectReason, Rejection};
use crate::jobs::{JobError, JobHandler};
use crate::telemetry::Metrics;

/// The wire form of a `gdpr.erase` request.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WireEraseRequest {
    subject_id: String,
    requester_id: String,
    #[serde(default)]
    organization_id: Option<String>,
}

fn reject(message: impl Into<String>) -> Rejection {
    Rejection::new(RejectReason::InvalidEraseRequest, message)
}

/// Parses a queue request `{"subjectId", "requesterId", "organizationId"?}`
/// into the erasure and its requester. `scope` is
/// `export.queue_organizations` (`None`: every organisation): when it is a
/// list, the request must name one of its organisations (an erasure
/// without `organizationId` covers every organisation, which such a
/// producer is not trusted with).
pub fn parse_request(
    data: &[u8],
    scope: Option<&[String]>,
) -> Result<(EraseRequest, String), Rejection> {
    let wire: WireEraseRequest = serde_json::from_slice(data).map_err(|e| {
        reject(format!(
            "erasure request is not valid: {e} (expected {{\"subjectId\", \"requesterId\", \"organizationId\"?}})"
        ))
    })?;
    super::check_text("requesterId", &wire.requester_id).map_err(reject)?;
    let request = EraseRequest {
        subject_id: wire.subject_id,
        organization_id: wire.organization_id,
    };
    request.check().map_err(reject)?;
    if let Some(scope) = scope {
        match request.organization_id.as_deref() {
            None => {
                return Err(reject(format!(
                    "give organizationId: queue requests may cover only {} \
                     (export.queue_organizations)",
                    scope.join(", ")
                )))
            }
            Some(org) if !scope.iter().any(|s| s == org) => {
                return Err(reject(format!(
                    "organizationId {org:?} is outside the organisations queue requests may \
                     cover ({}): see export.queue_organizations",
                    scope.join(", ")
                )))
            }
            Some(_) => {}
        }
    }
    Ok((request, wire.requester_id))
}

/// Runs `gdpr.erase` requests from the queue.
pub struct EraseHandler {
    eraser: Arc<Eraser>,
    pool: deadpool_postgres::Pool,
    queue_scope: Option<Vec<String>>,
    metrics: Option<Metrics>,
}

impl EraseHandler {
    /// A handler erasing with `eraser` through `pool`, for queue producers
    /// trusted with `queue_scope` (`export.queue_organizations`; `None`:
    /// all); finished erasures are counted in `metrics`.
    pub fn new(
        eraser: Arc<Eraser>,
        pool: deadpool_postgres::Pool,
        queue_scope: Option<Vec<String>>,
        metrics: Option<Metrics>,
    ) -> Self {
        Self {
            eraser,
            pool,
            queue_scope,
            metrics,
        }
    }

    async fn run(&self, data: &[u8], source: &str) -> Result<serde_json::Value, JobError> {
        let (request, requester) =
            parse_request(data, self.queue_scope.as_deref()).map_err(JobError::Rejected)?;
        let started = std::time::Instant::now();
        let pooled = self
            .pool
            .get()
            .await
            .map_err(|e| JobError::Transient(crate::db::pool_error_cause(&e)))?;
        // A connection of its own, closed when this ends, however it ends:
        // the session lock below cannot outlive the erasure. The lock keeps
        // two deliveries of one message (a claim while this one still
        // runs) from erasing side by side under two request ids.
        let mut client = deadpool_postgres::Object::take(pooled);
        let transient = |e: tokio_postgres::Error| JobError::Transient(crate::db::root_cause(&e));
        let locked: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtext('audit_worker_gdpr_erase:' || current_schema() || ':' || $1))",
                &[&source],
            )
            .await
            .map_err(transient)?
            .get(0);
        if !locked {
            return Err(JobError::Transient(format!(
                "{source} is being erased by another delivery; offered again once it is done"
            )));
        }
        let outcome = self
            .eraser
            .erase(&mut client, &request, &requester, source)
            .await;
        drop(client);
        match outcome {
            Ok(done) => {
                if let Some(m) = &self.metrics {
                    m.job_finished("gdpr_erase", true, done.rows_erased, 0, started.elapsed());
                }
                tracing::info!(erasure = %done.id, %source, rows = done.rows_erased, "erasure requested by the queue done");
                serde_json::to_value(&done).map_err(|e| JobError::Transient(e.to_string()))
            }
            Err(EraseError::Held(hold)) => Err(JobError::Rejected(Rejection::new(
                RejectReason::LegalHold,
                hold.refusal(),
            ))),
            Err(EraseError::BadRequest(m)) => Err(JobError::Rejected(reject(m))),
            Err(EraseError::Integrity(m)) => Err(JobError::Rejected(Rejection::new(
                RejectReason::ErasureFailed,
                m,
            ))),
            // A data error about the rows themselves (as the sink sorts
            // them) cannot be fixed by waiting; anything else can.
            Err(EraseError::Db(e))
                if crate::sink::postgres::classify(&e)
                    == crate::sink::postgres::ErrorClass::Permanent =>
            {
                Err(JobError::Rejected(Rejection::new(
                    RejectReason::ErasureFailed,
                    format!(
                        "the database refused the erasure: {}",
                        crate::db::root_cause(&e)
                    ),
                )))
            }
            Err(EraseError::Db(e)) => Err(transient(e)),
            Err(EraseError::Incomplete(m)) => Err(JobError::Transient(m)),
        }
    }
}

impl JobHandler for EraseHandler {
    fn accept<'a>(
        &'a self,
        data: &'a [u8],
        source: &'a str,
    ) -> BoxFuture<'a, Result<serde_json::Value, JobError>> {
        Box::pin(self.run(data, source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_names_subject_and_requester_and_nothing_else() {
        let (r, by) = parse_request(
            br#"{"subjectId": "u-7", "requesterId": "dpo", "organizationId": "org-a"}"#,
            None,
        )
        .unwrap();
        assert_eq!(
            (
                r.subject_id.as_str(),
                r.organization_id.as_deref(),
                by.as_str()
            ),
            ("u-7", Some("org-a"), "dpo")
        );
        let (r, _) = parse_request(br#"{"subjectId": "u-7", "requesterId": "dpo"}"#, None).unwrap();
        assert_eq!(r.organization_id, None, "every organisation");
        for (body, says) in [
            (r#"{"requesterId": "dpo"}"#, "subjectId"),
            (r#"{"subjectId": "u"}"#, "requesterId"),
            (
                r#"{"subjectId": " ", "requesterId": "dpo"}"#,
                "subjectId must not be empty",
            ),
            (
                r#"{"subjectId": "u", "requesterId": ""}"#,
                "requesterId must not be empty",
            ),
            (
                r#"{"subjectId": "u", "requesterId": "d", "extra": 1}"#,
                "extra",
            ),
            (
                r#"{"subjectId": "u", "requesterId": "d", "organizationId": ""}"#,
                "organizationId",
            ),
            (
                r#"{"subjectId": "pseud:0000000000000000000000000000000000000000000000000000000000000000", "requesterId": "d"}"#,
                "pseudonym",
            ),
            ("not json", "not valid"),
        ] {
            let e = parse_request(body.as_bytes(), None).unwrap_err();
            assert_eq!(e.reason, RejectReason::InvalidEraseRequest, "{body}");
            assert!(e.message.contains(says), "{body}: {}", e.message);
        }
    }

    #[test]
    fn a_limited_queue_scope_needs_an_organisation_inside_it() {
        let scope = vec!["org-a".to_string()];
        let ok = parse_request(
            br#"{"subjectId": "u", "requesterId": "d", "organizationId": "org-a"}"#,
            Some(&scope),
        );
        assert!(ok.is_ok());
        let none =
            parse_request(br#"{"subjectId": "u", "requesterId": "d"}"#, Some(&scope)).unwrap_err();
        assert!(
            none.message.contains("give organizationId"),
            "{}",
            none.message
        );
        let outside = parse_request(
            br#"{"subjectId": "u", "requesterId": "d", "organizationId": "org-b"}"#,
            Some(&scope),
        )
        .unwrap_err();
        assert_eq!(outside.reason, RejectReason::InvalidEraseRequest);
        assert!(
            outside.message.contains("export.queue_organizations"),
            "{}",
            outside.message
        );
    }
}
