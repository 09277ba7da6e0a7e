//! The processor: turns one delivered message into what should happen to
//! it, independent of the source it came from.

use chrono::Utc;

use crate::event::{decode_event, RejectReason, Rejection, ValidationPolicy};
use crate::sink::AuditRecord;

/// The job kind a message's name selects (DESIGN.md sections 2 and 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// `audit.event`, no name, or any name that is not another kind.
    AuditEvent,
    /// `export.audit`.
    Export,
    /// `audit.snapshot`.
    Snapshot,
}

/// The default job name.
pub const AUDIT_EVENT: &str = "audit.event";

impl JobKind {
    /// Picks the kind from a job name.
    pub fn from_name(name: &str) -> Self {
        match name {
            "export.audit" => Self::Export,
            "audit.snapshot" => Self::Snapshot,
            _ => Self::AuditEvent,
        }
    }
}

/// Decides what to do with one audit-event message: store it (a record for
/// the sink) or reject it (a reason for the dead-letter stream). Messages of
/// other kinds go to [`crate::jobs::JobHandlers`] instead; sources check
/// [`JobKind::from_name`] first.
pub fn process_message(
    name: &str,
    data: &[u8],
    source: &str,
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
    Ok(AuditRecord::new(event, source.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_key_is_the_event_id_or_else_the_source_identity() {
        let p = ValidationPolicy::default();
        let now = Utc::now().to_rfc3339();
        let with_id =
            format!(r#"{{"timestamp":"{now}","action":"a","status":"success","eventId":"e-1"}}"#);
        let without = format!(r#"{{"timestamp":"{now}","action":"a","status":"success"}}"#);
        let r = process_message("audit.event", with_id.as_bytes(), "stream:s:1-0", &p).unwrap();
        assert_eq!(r.idempotency_key, "e-1");
        let r = process_message("anything", without.as_bytes(), "stream:s:1-0", &p).unwrap();
        assert_eq!(r.idempotency_key, "stream:s:1-0");
        assert_eq!(r.source, "stream:s:1-0");
    }

    #[test]
    fn export_and_snapshot_kinds_are_not_stored_as_events() {
        let p = ValidationPolicy::default();
        for name in ["export.audit", "audit.snapshot"] {
            let err = process_message(name, b"{}", "stream:s:1-0", &p).unwrap_err();
            assert_eq!(err.reason, RejectReason::UnknownKind);
        }
    }
}
