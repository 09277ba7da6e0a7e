//! The event the benchmarks send: about 420 bytes of JSON in the smart-logs
//! SDK's shape, with a session context, varied by its number `i` so that
//! keys, principals and organisations repeat as they do in production.

use chrono::{SecondsFormat, Utc};
use serde_json::json;

/// Event number `i`, as the JSON text a producer would send.
pub fn event(i: usize) -> String {
    let status = ["attempt", "success", "failure"][i % 3];
    json!({
        "eventId": format!("bench-{i}"),
        "timestamp": (Utc::now() - chrono::Duration::seconds((i % 86_400) as i64)).to_rfc3339_opts(SecondsFormat::Millis, true),
        "action": format!("patient.record.read.{}", i % 20),
        "status": status,

        "principalId": format!("user-{}", i % 5_000),
        "organizationId": format!("org-{}", i % 50),
        "targetResourceType": "Patient",
        "targetResourceId": format!("patient-{}", i % 100_000),
        "outcomeDescription": "Record viewed from the chart summary screen",
        "dataClassification": "PHI",
        "sessionContext": {"sessionId": format!("sess-{}", i % 10_000), "ipAddress": "10.1.2.3", "userAgent": "Mozilla/5.0"},
    })
    .to_string()
}
