//! Verifiable log v2: salts stored apart from the row at ingest, record
//! digests (leaf v2) sealed into an append-only log, `verify` naming any
//! altered column, and the independent Python verifier agreeing.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_stores_a_fresh_salt_per_personal_field_in_the_same_write_as_the_row() {
    let env = TestEnv::new("salts").await;
    let mut c = env.config();
    c.snapshot.personal_fields = vec!["details.customField".into(), "details.email".into()];
    let worker = InProcessWorker::start(c);
    let mut events: Vec<Value> = (0..50).map(event).collect();
    // No personal value at all: no salts row. A null ipAddress: no salt.
    events.push(json!({"eventId": "bare", "timestamp": ts(0), "action": "a", "status": "success"}));
    events.push(
        json!({"eventId": "nullip", "timestamp": ts(0), "action": "a", "status": "success",
                       "principalId": "u", "sessionContext": {"ipAddress": null}}),
    );
    // The same event twice (a producer retry): one row, one salts row.
    events.push(event(7));
    env.add_events(&events).await;
    wait_until(Duration::from_secs(60), "events stored", || async {
        env.row_count().await == 52
    })
    .await;
    worker.stop().await;

    let rows = env
        .pg
        .query(
            "SELECT a.idempotency_key, s.salts FROM audit_log a
               LEFT JOIN audit_salts s USING (idempotency_key, event_time)
              ORDER BY a.idempotency_key",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 52);
    let salts_rows: i64 = env
        .pg
        .query_one("SELECT count(*) FROM audit_salts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(salts_rows, 51, "every event but `bare` has salts, once");
    let mut seen = BTreeSet::new();
    for r in &rows {
        let key: String = r.get(0);
        let salts: Option<Value> = r.get(1);
        match key.as_str() {
            "bare" => assert!(salts.is_none()),
            "nullip" => {
                let s = salts.unwrap();
                let paths: Vec<&String> = s.as_object().unwrap().keys().collect();
                assert_eq!(paths, vec!["principalId"]);
            }
            _ => {
                let s = salts.unwrap();
                let obj = s.as_object().unwrap();
                let paths: BTreeSet<&str> = obj.keys().map(String::as_str).collect();
                assert_eq!(
                    paths,
                    BTreeSet::from([
                        "details.customField",
                        "principalId",
                        "sessionContext.ipAddress",
                        "sessionContext.userAgent",
                        "targetResourceId"
                    ]),
                    "{key}"
                );
                for v in obj.values() {
                    let hex = v.as_str().unwrap();
                    assert_eq!(hex.len(), 64);
                    assert!(seen.insert(hex.to_owned()), "salt reused: {hex}");
                }
            }
        }
    }
    // Salts never reach the row itself.
    let leaked: i64 = env
        .pg
        .query_one(
            "SELECT count(*) FROM audit_log a JOIN audit_salts s USING (idempotency_key, event_time)
              WHERE a::text LIKE '%' || (s.salts->>'principalId') || '%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leaked, 0);
    env.cleanup().await;
}
