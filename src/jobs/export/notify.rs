//! Telling the requester, and auditing the export itself.
//!
//! Notifications go to the `export.notifications_key` stream with a `type`
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

use crate::source::RedisConn;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::json;

use crate::integrity::{canonical_hash_v1, HashedFields, HmacKeyRing};

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
    pub redis: RedisConn,
    pub notifications_key: String,
    pub events_key: String,
    pub hmac: HmacKeyRing,
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
    /// XADDs one notification.
    pub async fn notify(&self, notice: Notice, f: &NoticeFields) -> redis::RedisResult<()> {
        let mut fields: Vec<(&str, String)> = vec![
            ("type", notice.as_str().to_owned()),
            ("jobId", f.job_id.clone()),
            ("requesterId", f.requester_id.clone()),
            (
                "at",
                Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            ),
        ];
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
        let mut conn = self.redis.clone();
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&self.notifications_key).arg("*");
        for (k, v) in fields {
            cmd.arg(k).arg(v);
        }
        cmd.query_async::<String>(&mut conn).await.map(|_| ())
    }

    /// XADDs the `audit.export.completed` event for a finished job.
    pub async fn audit_completed(&self, a: &CompletedExport<'_>) -> redis::RedisResult<()> {
        let event = completed_event(a, &self.hmac);
        let mut conn = self.redis.clone();
        redis::cmd("XADD")
            .arg(&self.events_key)
            .arg("*")
            .arg("data")
            .arg(event.to_string())
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
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

/// The audit event for a finished export: hashed with canonical hash v1
/// and signed with the first configured HMAC key (if any), so it passes
/// the worker's own validation whatever `require_signature` says.
pub fn completed_event(a: &CompletedExport<'_>, hmac: &HmacKeyRing) -> serde_json::Value {
    let timestamp = a.completed_at.to_rfc3339_opts(SecondsFormat::Millis, true);
    let outcome = format!(
        "exported {} rows ({} {}, {} bytes, sha256 {})",
        a.rows, a.format, a.compression, a.size_bytes, a.sha256
    );
    let target_type = "AuditExport";
    let action = "audit.export.completed";
    let hash = canonical_hash_v1(&HashedFields {
        timestamp: Some(&timestamp),
        action: Some(action),
        status: Some("success"),
        principal_id: Some(a.requester_id),
        organization_id: None,
        target_resource_type: Some(target_type),
        target_resource_id: Some(a.job_id),
        outcome_description: Some(&outcome),
    });
    let mut event = json!({
        "eventId": format!("export-completed-{}", a.job_id),
        "timestamp": timestamp,
        "action": action,
        "status": "success",
        "principalId": a.requester_id,
        "targetResourceType": target_type,
        "targetResourceId": a.job_id,
        "outcomeDescription": outcome,
        "dataClassification": "INTERNAL",
        "hash": hash,
        "hashAlgorithm": "SHA-256",
        "exportFilters": a.filters,
    });
    if let Some(key) = hmac.signing_key() {
        event["signature"] = json!(key.sign(&hash));
        event["algorithm"] = json!("HMAC-SHA256");
    }
    event
}
