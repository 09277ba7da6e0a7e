//! Audit events the worker records about its own actions (an export
//! completed, a report created, a snapshot sealed, an erasure, a legal hold
//! placed or released, a retention drop), and its notifications to
//! requesters. Each event is built to pass the worker's own validation
//! (canonical hash v1, signed with the first HMAC key in force, if any) and
//! added to the event stream, so it is stored and sealed like any other
//! event.

use crate::source::RedisConn;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Map, Value};

use crate::config::Config;
use crate::integrity::{canonical_hash_v1, HashedFields, HmacKeyRing};
use crate::live::LiveConfig;
use crate::shards::NotificationKeys;

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

/// The HMAC keys the worker signs its own events with: the first key of
/// the ring in force when the event is built. A worker running with live
/// configuration follows key rotation at once (a rotated ring lists the new
/// key first); a CLI command signs with the ring it read at start.
#[derive(Clone)]
pub enum SigningKeys {
    /// The ring read once (CLI commands, tests).
    Fixed(HmacKeyRing),
    /// The ring of the configuration in force.
    Live(LiveConfig),
}

impl SigningKeys {
    /// The ring `[integrity]` configures now (empty when its key file
    /// cannot be read: the events then go unsigned and the worker's own
    /// validation says why if it requires signatures).
    pub fn from_config(config: &Config) -> Self {
        Self::Fixed(crate::policy::hmac_key_ring(&config.integrity).unwrap_or_default())
    }

    /// The ring to sign with now.
    pub fn ring(&self) -> HmacKeyRing {
        match self {
            Self::Fixed(ring) => ring.clone(),
            Self::Live(live) => live.current().policy.hmac_keys.clone(),
        }
    }
}

/// Where the worker's own records go: its audit events (to the stream
/// shard 0 of which every worker reads) and notifications to requesters
/// (to the requester's notifications stream, see
/// [`crate::shards::NotificationKeys`]).
#[derive(Clone)]
pub struct EventRecorder {
    pub redis: RedisConn,
    /// The stream the worker's own events go to.
    pub events_key: String,
    /// The notification streams.
    pub notifications: NotificationKeys,
    /// The keys events are signed with.
    pub keys: SigningKeys,
}

impl EventRecorder {
    /// A recorder writing to `config`'s streams and signing with the ring
    /// `config` names (see [`Self::following`] for a running worker).
    pub fn new(config: &Config, redis: RedisConn) -> Self {
        Self {
            redis,
            events_key: crate::shards::own_events_key(config),
            notifications: NotificationKeys::new(config),
            keys: SigningKeys::from_config(config),
        }
    }

    /// Signs with the key ring of the configuration in force, whatever it
    /// becomes after a reload.
    pub fn following(mut self, live: LiveConfig) -> Self {
        self.keys = SigningKeys::Live(live);
        self
    }

    /// XADDs the event; the worker then validates, stores and seals it.
    pub async fn record(&self, event: &InternalEvent) -> Result<(), String> {
        self.add_event(&event.to_json(&self.keys.ring()))
            .await
            .map_err(|e| {
                format!(
                    "redis: cannot record the {} audit event ({e}); the action itself is done",
                    event.action
                )
            })
    }

    /// XADDs an event already built (hashed and signed) to the worker's
    /// own events stream.
    pub async fn add_event(&self, event: &Value) -> redis::RedisResult<()> {
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

    /// XADDs a notification for `requester` to its notifications stream:
    /// `fields` after `type`, `jobId` and `requesterId`.
    pub async fn notify(
        &self,
        kind: &str,
        job_id: &str,
        requester: &str,
        fields: &[(&str, String)],
    ) -> redis::RedisResult<()> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(self.notifications.for_requester(requester))
            .arg("*")
            .arg("type")
            .arg(kind)
            .arg("jobId")
            .arg(job_id)
            .arg("requesterId")
            .arg(requester);
        for (k, v) in fields {
            cmd.arg(*k).arg(v);
        }
        let mut conn = self.redis.clone();
        cmd.query_async::<String>(&mut conn).await.map(|_| ())
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
