//! The processor: the one place that decides what happens to a delivered
//! message, whichever source read it.
//!
//! A source hands over a [`Delivery`] and gets back a [`Disposition`]:
//! store (the row is committed), a job request recorded by its handler, a
//! dead letter with a stable reason, or — only when the worker stops while
//! the database is unavailable — retry later. Routing by kind, validation,
//! dead-letter decisions, metrics, spans and the security-alert hand-off
//! all happen here; sources only read and carry dispositions out.
//!
//! Failures that are not the message's fault are retried *in place* for
//! stream entries: an event whose write found the database unavailable
//! waits for the circuit breaker and is written again, and a job request
//! whose handler could not record it is offered again with backoff, without
//! a new Redis delivery. So an outage never raises an entry's delivery
//! count, and never turns into a `max_deliveries` dead letter. BullMQ jobs
//! instead go back to BullMQ, which retries them with the job's own
//! `attempts` and `backoff` (see [`Delivery::wait_out_outages`]).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use prometheus::IntCounter;
use tokio_util::sync::CancellationToken;

use crate::alerts::{AlertInput, AlertTap};
use crate::dlq::DeadLetter;
use crate::dlq::{RejectReason, Rejection};
use crate::event::{decode_event, ValidationPolicy};
use crate::jobs::{JobError, JobHandlers};
use crate::live::LiveConfig;
use crate::message::{Delivery, Disposition, SourceKind, Stored, MAX_SIDE_FIELD_BYTES};
use crate::retry::Backoff;
use crate::sink::{AuditRecord, SinkHandle, StoreOutcome};
use crate::telemetry::Metrics;

/// The job kind a message's name selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// `audit.event`, no name, or any name that is not another kind.
    AuditEvent,
    /// `export.audit`.
    Export,
    /// `audit.snapshot`.
    Snapshot,
    /// `report.compliance`.
    Report,
    /// `gdpr.access`: a data subject's access request.
    GdprAccess,
    /// `gdpr.erase`: a data subject's erasure request.
    GdprErase,
}

/// The default job name.
pub const AUDIT_EVENT: &str = "audit.event";

impl JobKind {
    /// Picks the kind from a job name.
    pub fn from_name(name: &str) -> Self {
        match name {
            "export.audit" => Self::Export,
            "audit.snapshot" => Self::Snapshot,
            "report.compliance" => Self::Report,
            "gdpr.access" => Self::GdprAccess,
            "gdpr.erase" => Self::GdprErase,
            _ => Self::AuditEvent,
        }
    }

    /// The `kind` label of the job metrics and spans.
    pub fn label(self) -> &'static str {
        match self {
            Self::AuditEvent => "event",
            Self::Export => "export",
            Self::Snapshot => "snapshot",
            Self::Report => "report",
            Self::GdprAccess => "gdpr_access",
            Self::GdprErase => "gdpr_erase",
        }
    }
}

/// Validates one audit-event message into a record for the sink, or the
/// reason it can never be stored. Pure: no I/O, so it is unit-tested and
/// fuzzed on its own. Job kinds other than events are `unknown_kind` here;
/// [`Processor::process`] routes them to their handlers first.
pub fn decode_record(
    name: &str,
    data: &[u8],
    identity: &str,
    policy: &ValidationPolicy,
) -> Result<AuditRecord, Rejection> {
    let kind = JobKind::from_name(name);
    if kind != JobKind::AuditEvent {
        return Err(Rejection::new(
            RejectReason::UnknownKind,
            format!("{name} is a {kind:?} job, not an audit event"),
        ));
    }
    let event = decode_event(data, policy, Utc::now())?;
    Ok(AuditRecord::new(event, identity.to_owned()))
}

/// Why a delivery is dead-lettered before its data is even looked at, if
/// it is: too large, or redelivered too often. Pure.
pub fn precheck(d: &Delivery, max_event_bytes: usize) -> Option<Rejection> {
    let data_len = d.data.as_ref().map_or(0, Vec::len);
    if data_len > max_event_bytes {
        return Some(Rejection::new(
            RejectReason::TooLarge,
            format!("event is {data_len} bytes, the limit is {max_event_bytes} (validation.max_event_bytes)"),
        ));
    }
    if d.side_bytes > MAX_SIDE_FIELD_BYTES {
        return Some(Rejection::new(
            RejectReason::TooLarge,
            format!(
                "entry fields other than data take {} bytes, the limit is {MAX_SIDE_FIELD_BYTES}",
                d.side_bytes
            ),
        ));
    }
    if let Some(max) = d.max_deliveries {
        if d.attempts > max {
            return Some(Rejection::new(
                RejectReason::MaxDeliveries,
                format!(
                    "delivered {} times without being stored (stream.max_deliveries = {max})",
                    d.attempts
                ),
            ));
        }
    }
    None
}

/// Turns deliveries into dispositions; one per worker, shared by every
/// source (cheap to clone).
#[derive(Clone)]
pub struct Processor {
    inner: Arc<Inner>,
}

struct Inner {
    /// The configuration in force: validation limits and HMAC key ring
    /// are read from it per delivery, so a reload applies at once.
    live: LiveConfig,
    sink: SinkHandle,
    jobs: JobHandlers,
    metrics: Metrics,
    alerts: AlertTap,
    shutdown: CancellationToken,
    /// `audit_worker_events_total` by source and outcome, resolved once
    /// (the hot path counts every event).
    counters: [SourceCounters; 2],
}

/// One source's event counters.
struct SourceCounters {
    inserted: IntCounter,
    duplicate: IntCounter,
    dead_lettered: IntCounter,
    deferred: IntCounter,
}

impl SourceCounters {
    fn new(metrics: &Metrics, source: SourceKind) -> Self {
        let c = |outcome| metrics.events.with_label_values(&[source.label(), outcome]);
        Self {
            inserted: c("inserted"),
            duplicate: c("duplicate"),
            dead_lettered: c("dead_lettered"),
            deferred: c("deferred"),
        }
    }
}

/// Pause between offers of a job request whose handler could not record
/// it (database down): doubles from 1 s up to 30 s.
const JOB_RETRY: Backoff = Backoff {
    base: Duration::from_secs(1),
    factor: 2.0,
    cap: Duration::from_secs(30),
    jitter: 0.2,
};

impl Processor {
    /// The processor for one worker: what it validates against, where
    /// events and job requests go, and what it counts.
    pub fn new(
        live: LiveConfig,
        sink: SinkHandle,
        jobs: JobHandlers,
        metrics: Metrics,
        alerts: AlertTap,
        shutdown: CancellationToken,
    ) -> Self {
        let counters = [
            SourceCounters::new(&metrics, SourceKind::Stream),
            SourceCounters::new(&metrics, SourceKind::Bullmq),
        ];
        Self {
            inner: Arc::new(Inner {
                live,
                sink,
                jobs,
                metrics,
                alerts,
                shutdown,
                counters,
            }),
        }
    }

    /// The sink's handle (sources wait on its breaker before reading).
    pub fn sink(&self) -> &SinkHandle {
        &self.inner.sink
    }

    /// The validation policy in force (sources need its byte limit for
    /// reads that bound memory inside Redis).
    pub fn policy(&self) -> Arc<ValidationPolicy> {
        self.inner.live.current().policy.clone()
    }

    /// The metrics registry (sources count their own Redis errors).
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Fired at shutdown.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// Decides what happens to one delivery, waiting as long as it takes
    /// for a decision that is durable (or for shutdown).
    pub async fn process(&self, d: Delivery) -> Disposition {
        let started = self.begin(d).await;
        self.finish(started).await
    }

    /// The first half of [`Processor::process`]: checks and validates the
    /// delivery and hands an event to the sink, without waiting for its
    /// write. A source with many deliveries begins them all, then finishes
    /// them in order, so their rows share database batches without a task
    /// or future per event.
    pub async fn begin(&self, d: Delivery) -> Started {
        let this = &*self.inner;
        let policy = self.policy();
        if let Some(rejection) = precheck(&d, policy.max_event_bytes) {
            return Started(Step::Decided(dead_letter(d, rejection)));
        }
        if d.data.is_none() {
            let rejection = Rejection::new(RejectReason::InvalidEvent, "message has no data field");
            return Started(Step::Decided(dead_letter(d, rejection)));
        }
        let kind = JobKind::from_name(&d.name);
        if kind != JobKind::AuditEvent {
            return Started(Step::Job(kind, d));
        }
        let data = d.data.as_deref().unwrap_or_default();
        let record = match decode_record(&d.name, data, &d.identity, &policy) {
            Ok(record) => record,
            Err(rejection) => return Started(Step::Decided(dead_letter(d, rejection))),
        };
        let key = record.key();
        let span = crate::tracing_ctx::event_span(d.source.label(), d.trace.as_ref());
        let alert = this
            .alerts
            .wants(&record.event)
            .then(|| AlertInput::from_event(&record.event, &record.source));
        let pending = this.sink.submit(record).await;
        Started(Step::Storing(Box::new(Storing {
            d,
            pending,
            key,
            span,
            alert,
        })))
    }

    /// The second half of [`Processor::process`]: waits for what
    /// [`Processor::begin`] started to become a durable decision.
    pub async fn finish(&self, started: Started) -> Disposition {
        match started.0 {
            Step::Decided(disposition) => disposition,
            Step::Job(kind, d) => self.accept_job(kind, d).await,
            Step::Storing(storing) => self.stored(*storing).await,
        }
    }

    /// Hands a job request to its kind's handler, offering it again while
    /// the handler cannot record it (database down).
    async fn accept_job(&self, kind: JobKind, d: Delivery) -> Disposition {
        let this = &*self.inner;
        let data = d.data.as_deref().unwrap_or_default();
        let mut attempt = 0;
        loop {
            match this.jobs.accept(kind, &d.name, data, &d.identity).await {
                Ok(reply) => {
                    this.metrics.job_request(kind.label(), true);
                    return Disposition::Job {
                        kind: kind.label(),
                        reply,
                    };
                }
                Err(JobError::Rejected(rejection)) => {
                    this.metrics.job_request(kind.label(), false);
                    return dead_letter(d, rejection);
                }
                Err(JobError::Transient(cause)) if !d.wait_out_outages => {
                    return Disposition::Retry { cause };
                }
                Err(JobError::Transient(cause)) => {
                    attempt += 1;
                    if attempt == 1 {
                        tracing::warn!(source = %d.identity, %cause, "job request not recorded; offering it again until the database takes it");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(JOB_RETRY.delay(attempt)) => {}
                        _ = this.shutdown.cancelled() => return Disposition::Retry { cause },
                    }
                }
            }
        }
    }

    /// Waits for an event's write, writing it again in place while the
    /// database is unavailable (when the delivery waits out outages).
    async fn stored(&self, mut s: Storing) -> Disposition {
        let this = &*self.inner;
        loop {
            let stored = match s.pending.wait().await {
                StoreOutcome::Inserted => Stored::Inserted,
                StoreOutcome::Duplicate => Stored::Duplicate,
                StoreOutcome::Conflict { stored_hash } => {
                    return dead_letter(s.d, s.key.conflict(&stored_hash));
                }
                StoreOutcome::Rejected(rejection) => return dead_letter(s.d, rejection),
                StoreOutcome::Unavailable(cause) => {
                    // Not the event's fault: wait until the database takes
                    // writes again and write it again, in place (or let the
                    // protocol retry it).
                    if !s.d.wait_out_outages || !self.wait_for_database().await {
                        return Disposition::Retry { cause };
                    }
                    // Validation is pure and passed once; it is repeated
                    // only to rebuild the record the sink consumed.
                    let data = s.d.data.as_deref().unwrap_or_default();
                    match decode_record(&s.d.name, data, &s.d.identity, &self.policy()) {
                        Ok(record) => s.pending = this.sink.submit(record).await,
                        Err(rejection) => return dead_letter(s.d, rejection),
                    }
                    continue;
                }
            };
            if let Some(span) = &s.span {
                span.record("outcome", stored.label());
            }
            if stored == Stored::Inserted {
                if let Some(ms) = s.d.enqueued_ms {
                    this.metrics.observe_end_to_end(s.d.source.label(), ms);
                }
                if let Some(input) = s.alert {
                    this.alerts.offer(input);
                }
            }
            return Disposition::Stored {
                stored,
                idempotency_key: s.key.idempotency_key,
                hash: s.key.hash,
            };
        }
    }

    /// Waits until the breaker lets writes through (at least a moment, so
    /// a sink that gave up with the breaker still closed is not hammered);
    /// false on shutdown.
    async fn wait_for_database(&self) -> bool {
        let this = &*self.inner;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = this.shutdown.cancelled() => return false,
        }
        this.sink.wait_writable(&this.shutdown).await
    }

    /// Counts and logs dispositions once the source has carried them out
    /// (the row committed and the message acknowledged, or the dead letter
    /// written), so the metrics describe what is durable.
    pub fn settled<'a>(&self, source: SourceKind, done: impl IntoIterator<Item = &'a Disposition>) {
        let this = &*self.inner;
        let c = &this.counters[source as usize];
        for d in done {
            match d {
                Disposition::Stored {
                    stored: Stored::Inserted,
                    ..
                } => c.inserted.inc(),
                Disposition::Stored {
                    stored: Stored::Duplicate,
                    ..
                } => c.duplicate.inc(),
                Disposition::Job { .. } => {}
                Disposition::DeadLetter(letter) => {
                    c.dead_lettered.inc();
                    this.metrics
                        .dead_letters
                        .with_label_values(&[letter.reason.code()])
                        .inc();
                    tracing::info!(reason = letter.reason.code(), source = %letter.source, error = %letter.error, "dead-lettered");
                }
                Disposition::Retry { .. } => c.deferred.inc(),
            }
        }
    }

    /// Counts dead letters that a source wrote inside Redis without
    /// reading the message into the worker (entries too large to read).
    pub fn dead_lettered_in_redis(&self, source: SourceKind, reason: RejectReason, n: u64) {
        let this = &*self.inner;
        this.counters[source as usize].dead_lettered.inc_by(n);
        this.metrics
            .dead_letters
            .with_label_values(&[reason.code()])
            .inc_by(n);
    }
}

/// A delivery that [`Processor::begin`] has started; [`Processor::finish`]
/// turns it into its disposition.
pub struct Started(Step);

enum Step {
    /// Decided without waiting (a dead letter found by the checks).
    Decided(Disposition),
    /// A job request, for its handler.
    Job(JobKind, Delivery),
    /// An event handed to the sink (boxed: the largest step by far).
    Storing(Box<Storing>),
}

/// An event whose write is under way, with what its outcome needs.
struct Storing {
    d: Delivery,
    pending: crate::sink::PendingOutcome,
    /// Identity and hash, kept for the answer (the sink took the record).
    key: crate::sink::RecordKey,
    span: Option<tracing::Span>,
    alert: Option<AlertInput>,
}

/// The dead letter of a delivery: its original bytes, name and identity.
fn dead_letter(d: Delivery, rejection: Rejection) -> Disposition {
    Disposition::DeadLetter(DeadLetter {
        data: d.data.unwrap_or_default(),
        name: d.name,
        reason: rejection.reason,
        error: rejection.message,
        source: d.identity,
        attempts: d.attempts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(name: &str, data: &[u8]) -> Delivery {
        Delivery {
            source: SourceKind::Stream,
            identity: "stream:s:1-0".into(),
            name: name.into(),
            data: Some(data.to_vec()),
            side_bytes: 0,
            attempts: 1,
            wait_out_outages: true,
            max_deliveries: Some(3),
            trace: None,
            enqueued_ms: None,
        }
    }

    #[test]
    fn idempotency_key_is_the_event_id_or_else_the_source_identity() {
        let p = ValidationPolicy::default();
        let now = Utc::now().to_rfc3339();
        let with_id =
            format!(r#"{{"timestamp":"{now}","action":"a","status":"success","eventId":"e-1"}}"#);
        let without = format!(r#"{{"timestamp":"{now}","action":"a","status":"success"}}"#);
        let r = decode_record("audit.event", with_id.as_bytes(), "stream:s:1-0", &p).unwrap();
        assert_eq!(r.idempotency_key, "e-1");
        let r = decode_record("anything", without.as_bytes(), "stream:s:1-0", &p).unwrap();
        assert_eq!(r.idempotency_key, "stream:s:1-0");
        assert_eq!(r.source, "stream:s:1-0");
    }

    #[test]
    fn export_and_snapshot_kinds_are_not_stored_as_events() {
        let p = ValidationPolicy::default();
        for name in ["export.audit", "audit.snapshot", "report.compliance"] {
            let err = decode_record(name, b"{}", "stream:s:1-0", &p).unwrap_err();
            assert_eq!(err.reason, RejectReason::UnknownKind);
        }
    }

    #[test]
    fn oversized_data_or_side_fields_and_poison_redeliveries_are_dead_lettered_first() {
        let ok = delivery("audit.event", &[b' '; 100]);
        assert!(precheck(&ok, 100).is_none());
        let big = delivery("audit.event", &[b' '; 101]);
        let r = precheck(&big, 100).unwrap();
        assert_eq!(r.reason, RejectReason::TooLarge);
        assert!(r.message.contains("101 bytes"), "{}", r.message);
        let mut side = delivery("audit.event", b"{}");
        side.side_bytes = MAX_SIDE_FIELD_BYTES + 1;
        let r = precheck(&side, 100).unwrap();
        assert!(r.message.contains("other than data"), "{}", r.message);
        let mut poison = delivery("audit.event", b"{}");
        poison.attempts = 4;
        assert_eq!(
            precheck(&poison, 100).unwrap().reason,
            RejectReason::MaxDeliveries
        );
        poison.max_deliveries = None;
        assert!(precheck(&poison, 100).is_none());
    }

    #[test]
    fn a_dead_letter_keeps_the_original_bytes_name_identity_and_attempts() {
        let mut d = delivery("odd.kind", b"\xff{not json");
        d.attempts = 2;
        let Disposition::DeadLetter(letter) =
            dead_letter(d, Rejection::new(RejectReason::InvalidJson, "not UTF-8"))
        else {
            panic!("a dead letter")
        };
        assert_eq!(letter.data, b"\xff{not json");
        assert_eq!(letter.name, "odd.kind");
        assert_eq!(letter.source, "stream:s:1-0");
        assert_eq!(letter.attempts, 2);
        assert_eq!(letter.reason, RejectReason::InvalidJson);
    }
}
