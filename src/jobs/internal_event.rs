//! Audit events the worker records about its own actions (an erasure, a
//! legal hold placed or released): built to pass the worker's own
//! validation (canonical hash v1, signed with the first HMAC key if any)
//! and added to the event stream, so they are stored and sealed like any
//! other event.

use crate::source::RedisConn;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Map, Value};

use crate::integrity::{canonical_hash_v1, HashedFields, HmacKeyRing};

/// The fields of an internal event.
#[derive(Debug, Clone)]
pub struct InternalEvent {
    /// Its eventId: derived from what it records, so a retry stores it once.
    pub event_id: String,
    pub time: DateTime<Utc>,
    pub action: String,
    /// Who asked (API key id, CLI user).
    pub principal_id: String,
    pub organization_id: Option<String>,
    pub target_type: String,
    pub target_id: String,
    pub outcome: String,
    /// Further keys (kept in the event's `details`).
    pub details: Map<String, Value>,
}

impl InternalEvent {
    /// The event JSON, hashed (v1) and signed with the first key of `hmac`.
    pub fn to_json(&self, hmac: &HmacKeyRing) -> Value {
        let timestamp = self.time.to_rfc3339_opts(SecondsFormat::Millis, true);
        let hash = canonical_hash_v1(&HashedFields {
            timestamp: Some(&timestamp),
            action: Some(&self.action),
            status: Some("success"),
            principal_id: Some(&self.principal_id),
            organization_id: self.organization_id.as_deref(),
            target_resource_type: Some(&self.target_type),
            target_resource_id: Some(&self.target_id),
            outcome_description: Some(&self.outcome),
        });
        let mut event = json!({
            "eventId": self.event_id,
            "timestamp": timestamp,
            "action": self.action,
            "status": "success",
            "principalId": self.principal_id,
            "targetResourceType": self.target_type,
            "targetResourceId": self.target_id,
            "outcomeDescription": self.outcome,
            "dataClassification": "INTERNAL",
            "hash": hash,
            "hashAlgorithm": "SHA-256",
        });
        if let Some(org) = &self.organization_id {
            event["organizationId"] = json!(org);
        }
        for (k, v) in &self.details {
            event[k] = v.clone();
        }
        if let Some(key) = hmac.signing_key() {
            event["signature"] = json!(key.sign(&hash));
            event["algorithm"] = json!("HMAC-SHA256");
        }
        event
    }
}

/// Adds internal events to the worker's event stream.
#[derive(Clone)]
pub struct EventRecorder {
    pub redis: RedisConn,
    /// The stream the worker reads (`stream.key`).
    pub events_key: String,
    pub hmac: HmacKeyRing,
}

impl EventRecorder {
    /// XADDs the event; the worker then validates, stores and seals it.
    pub async fn record(&self, event: &InternalEvent) -> Result<(), String> {
        let mut conn = self.redis.clone();
        redis::cmd("XADD")
            .arg(&self.events_key)
            .arg("*")
            .arg("data")
            .arg(event.to_json(&self.hmac).to_string())
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| {
                format!(
                    "redis: cannot record the {} audit event ({e}); the action itself is done",
                    event.action
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::integrity::HmacKey;

    #[test]
    fn an_internal_event_carries_its_hash_v1_and_signature() {
        let e = InternalEvent {
            event_id: "hold-placed-h1".into(),
            time: DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z")
                .unwrap()
                .with_timezone(&Utc),
            action: "audit.legal_hold.placed".into(),
            principal_id: "key_1".into(),
            organization_id: Some("org-a".into()),
            target_type: "LegalHold".into(),
            target_id: "h1".into(),
            outcome: "placed".into(),
            details: [("holdReason".to_string(), json!("litigation"))]
                .into_iter()
                .collect(),
        };
        let ring = HmacKeyRing::new(vec![HmacKey::new("k1", b"secret".to_vec())]);
        let v = e.to_json(&ring);
        let hash = v["hash"].as_str().unwrap();
        assert_eq!(
            hash,
            canonical_hash_v1(&HashedFields {
                timestamp: Some("2026-01-02T03:04:05.000Z"),
                action: Some("audit.legal_hold.placed"),
                status: Some("success"),
                principal_id: Some("key_1"),
                organization_id: Some("org-a"),
                target_resource_type: Some("LegalHold"),
                target_resource_id: Some("h1"),
                outcome_description: Some("placed"),
            })
        );
        assert_eq!(
            ring.verify(hash, v["signature"].as_str().unwrap()),
            Some("k1")
        );
        assert_eq!(v["holdReason"], "litigation");
        assert_eq!(v["organizationId"], "org-a");
    }
}
