//! Telling the requester, and auditing the export itself.
//!
//! Notifications go to the requester's notifications stream
//! ([`crate::shards::NotificationKeys`]) with a `type`
//! (`export.ready`, `export.no_results`, `export.failed`,
//! `export.expired`). They are sent at least once: the job is only marked
//! notified after the XADD, so a crash in between sends again (consumers
//! dedupe by `jobId` + `type`).
//!
//! A completed export is also recorded as an audit event
//! (`audit.export.completed`) by adding it to the worker's own event
//! stream, where it is validated and stored like any other. Its `eventId`
//! and `timestamp` come from the job (id, completion time), so a repeat
//! after a crash is absorbed by the idempotency key instead of stored twice.

use chrono::{DateTime, SecondsFormat, Utc};

use crate::jobs::internal_event::{EventRecorder, InternalEvent};

/// The notification types, as written to the `type` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    Ready,
    NoResults,
    Failed,
    Expired,
}

impl Notice {
    /// The stable `type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "export.ready",
            Self::NoResults => "export.no_results",
            Self::Failed => "export.failed",
            Self::Expired => "export.expired",
        }
    }
}

/// Writes notifications and the export's audit event to Redis.
#[derive(Clone)]
pub struct Notifier {
    pub own: EventRecorder,
}

/// What a notification says about a job.
#[derive(Debug, Clone, Default)]
pub struct NoticeFields {
    pub job_id: String,
    pub requester_id: String,
    pub download_link: Option<String>,
    pub rows: Option<i64>,
    pub size_bytes: Option<i64>,
    pub sha256: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub reason: Option<String>,
}

impl Notifier {
    /// XADDs one notification to the requester's notifications stream.
    pub async fn notify(&self, notice: Notice, f: &NoticeFields) -> redis::RedisResult<()> {
        let mut fields: Vec<(&str, String)> = vec![(
            "at",
            Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
        )];
        if let Some(l) = &f.download_link {
            fields.push(("downloadLink", l.clone()));
        }
        if let Some(r) = f.rows {
            fields.push(("rows", r.to_string()));
        }
        if let Some(s) = f.size_bytes {
            fields.push(("sizeBytes", s.to_string()));
        }
        if let Some(h) = &f.sha256 {
            fields.push(("sha256", h.clone()));
        }
        if let Some(e) = f.expires_at {
            fields.push(("expiresAt", e.to_rfc3339_opts(SecondsFormat::Secs, true)));
        }
        if let Some(r) = &f.reason {
            fields.push(("reason", r.clone()));
        }
        self.own
            .notify(notice.as_str(), &f.job_id, &f.requester_id, &fields)
            .await
    }

    /// XADDs the `audit.export.completed` event for a finished job.
    pub async fn audit_completed(&self, a: &CompletedExport<'_>) -> redis::RedisResult<()> {
        self.own
            .add_event(&completed_event(a).to_json(&self.own.keys.ring()))
            .await
    }
}

/// The facts of a finished export that its audit event records.
#[derive(Debug, Clone)]
pub struct CompletedExport<'a> {
    pub job_id: &'a str,
    pub requester_id: &'a str,
    pub completed_at: DateTime<Utc>,
    pub rows: i64,
    pub size_bytes: i64,
    pub sha256: &'a str,
    pub format: &'a str,
    pub compression: &'a str,
    pub filters: &'a serde_json::Value,
}

/// The audit event for a finished export (hashed and signed as every
/// event the worker records about itself).
pub fn completed_event(a: &CompletedExport<'_>) -> InternalEvent {
    InternalEvent {
        event_id: format!("export-completed-{}", a.job_id),
        time: a.completed_at,
        action: "audit.export.completed".into(),
        principal_id: a.requester_id.to_owned(),
        organization_id: None,
        target_type: "AuditExport".into(),
        target_id: a.job_id.to_owned(),
        outcome: format!(
            "exported {} rows ({} {}, {} bytes, sha256 {})",
            a.rows, a.format, a.compression, a.size_bytes, a.sha256
        ),
        details: [("exportFilters".to_owned(), a.filters.clone())]
            .into_iter()
            .collect(),
    }
}
