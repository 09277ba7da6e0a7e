//! End-to-end behaviour of the stream source and sink, in process.

use std::collections::HashMap;
use std::time::Duration;

use audit_worker::integrity::HmacKey;
use serde_json::{json, Value};

use crate::common::*;

/// Recomputes canonical hash v1 in SQL, independently of our Rust code:
/// PostgreSQL's `to_json(text)` escapes strings exactly as JSON.stringify.
pub(crate) const SQL_CANONICAL_HASH: &str = "encode(sha256(convert_to(concat_ws('|',
    'action:' || coalesce(to_json(nullif(action, ''))::text, 'null'),
    'organizationId:' || coalesce(to_json(nullif(organization_id, ''))::text, 'null'),
    'outcomeDescription:' || coalesce(to_json(nullif(outcome_description, ''))::text, 'null'),
    'principalId:' || coalesce(to_json(nullif(principal_id, ''))::text, 'null'),
    'status:' || coalesce(to_json(nullif(status, ''))::text, 'null'),
    'targetResourceId:' || coalesce(to_json(nullif(target_resource_id, ''))::text, 'null'),
    'targetResourceType:' || coalesce(to_json(nullif(target_resource_type, ''))::text, 'null'),
    'timestamp:' || coalesce(to_json(nullif(timestamp_raw, ''))::text, 'null')), 'UTF8')), 'hex')";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_become_ten_thousand_rows_stored_as_sent_and_reverifiable() {
    let env = TestEnv::new("ingest10k").await;
    let key = HmacKey::new("k1", "test-secret-key");
    let mut config = env.config();
    config.integrity.hmac_keys = "k1=test-secret-key".to_string().into();
    let events: Vec<Value> = (0..10_000)
        .map(|i| {
            let mut e = event(i);
            if i % 10 == 0 {
                e["principalId"] = json!("");
            }
            if i % 2 == 0 {
                // Half arrive hashed and signed as the smart-logs SDK sends them.
                let fields = audit_worker::event::decode_event(
                    e.to_string().as_bytes(),
                    &Default::default(),
                    chrono::Utc::now(),
                )
                .unwrap();
                e["hash"] = json!(fields.hash);
                e["hashAlgorithm"] = json!("SHA-256");
                e["signature"] = json!(key.sign(&fields.hash));
                e["algorithm"] = json!("HMAC-SHA256");
            }
            e
        })
        .collect();
    env.add_events(&events).await;
    let worker = InProcessWorker::start(config);
    wait_until(Duration::from_secs(120), "10,000 rows", || async {
        env.row_count().await == 10_000
    })
    .await;
    wait_until(
        Duration::from_secs(30),
        "all entries acknowledged",
        || async { env.pending_count().await == 0 },
    )
    .await;
    worker.stop().await;

    assert_eq!(env.row_count().await, 10_000);
    assert_eq!(env.dlq_len().await, 0);
    let mismatched: i64 = env
        .pg
        .query_one(
            &format!("SELECT count(*) FROM audit_log WHERE hash <> {SQL_CANONICAL_HASH}"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        mismatched, 0,
        "every stored row re-hashes to its stored hash"
    );

    let rows = env
        .pg
        .query(
            "SELECT event_id, timestamp_raw, action, status, principal_id, organization_id,
                    target_resource_type, target_resource_id, outcome_description,
                    data_classification, session_context, details, hash_provided,
                    signature, signature_key_id, idempotency_key
             FROM audit_log",
            &[],
        )
        .await
        .unwrap();
    let by_id: HashMap<String, &Value> = events
        .iter()
        .map(|e| (e["eventId"].as_str().unwrap().to_string(), e))
        .collect();
    for row in &rows {
        let id: String = row.get(0);
        let sent = by_id[&id];
        let s = |k: &str| sent.get(k).and_then(Value::as_str).map(str::to_string);
        assert_eq!(row.get::<_, String>(15), id);
        assert_eq!(Some(row.get::<_, String>(1)), s("timestamp"));
        assert_eq!(Some(row.get::<_, String>(2)), s("action"));
        assert_eq!(Some(row.get::<_, String>(3)), s("status"));
        assert_eq!(row.get::<_, Option<String>>(4), s("principalId"));
        assert_eq!(row.get::<_, Option<String>>(5), s("organizationId"));
        assert_eq!(row.get::<_, Option<String>>(6), s("targetResourceType"));
        assert_eq!(row.get::<_, Option<String>>(7), s("targetResourceId"));
        assert_eq!(row.get::<_, Option<String>>(8), s("outcomeDescription"));
        assert_eq!(row.get::<_, Option<String>>(9), s("dataClassification"));
        assert_eq!(
            row.get::<_, Option<Value>>(10).as_ref(),
            sent.get("sessionContext")
        );
        assert_eq!(
            row.get::<_, Option<Value>>(11),
            Some(json!({"customField": sent["customField"]}))
        );
        assert_eq!(row.get::<_, bool>(12), sent.get("hash").is_some());
        assert_eq!(row.get::<_, Option<String>>(13), s("signature"));
        let key_id: Option<String> = row.get(14);
        assert_eq!(key_id.is_some(), sent.get("signature").is_some());
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_and_resent_entries_leave_exactly_one_row_each() {
    let env = TestEnv::new("dupes").await;
    let mut config = env.config();
    config.stream.delete_acked = false;
    config.stream.claim_idle_ms = 300;
    let events: Vec<Value> = (0..500).map(event).collect();
    env.add_events(&events).await;
    // The producer retries: the same eventIds are added a second time.
    env.add_events(&events[..100]).await;
    // A consumer that "crashed before XACK": it read 50 entries and vanished.
    env.read_without_ack("ghost", 50).await;
    let mut conn = env.redis_conn().await;

    let worker = InProcessWorker::start(config.clone());
    wait_until(
        Duration::from_secs(60),
        "500 rows and nothing pending",
        || async { env.row_count().await == 500 && env.pending_count().await == 0 },
    )
    .await;
    worker.stop().await;

    // Every entry is delivered again, as after a crash between commit and XACK.
    let _: () = redis::cmd("XGROUP")
        .arg("SETID")
        .arg(&env.stream)
        .arg(&env.group)
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    let worker = InProcessWorker::start(config);
    wait_until(
        Duration::from_secs(60),
        "redelivered entries acknowledged",
        || async {
            let v: redis::Value = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&env.stream)
                .query_async(&mut env.redis_conn().await)
                .await
                .unwrap();
            format!("{v:?}").contains("lag")
                && env.pending_count().await == 0
                && group_lag(&v) == Some(0)
        },
    )
    .await;
    worker.stop().await;

    assert_eq!(env.row_count().await, 500);
    let distinct: i64 = env
        .pg
        .query_one("SELECT count(DISTINCT idempotency_key) FROM audit_log", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(distinct, 500);
    assert_eq!(env.dlq_len().await, 0);
    env.cleanup().await;
}

/// The `lag` of the first group in an XINFO GROUPS reply.
fn group_lag(v: &redis::Value) -> Option<i64> {
    let redis::Value::Array(groups) = v else {
        return None;
    };
    let redis::Value::Array(fields) = groups.first()? else {
        return None;
    };
    let mut it = fields.iter();
    while let Some(k) = it.next() {
        let val = it.next()?;
        if matches!(k, redis::Value::BulkString(b) if b == b"lag") {
            return match val {
                redis::Value::Int(n) => Some(*n),
                _ => None,
            };
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_invalid_class_is_dead_lettered_with_its_reason_and_original_bytes() {
    let env = TestEnv::new("invalid").await;
    let mut config = env.config();
    config.integrity.hmac_keys = "k1=test-secret-key".to_string().into();
    let base = || event(1);
    let with = |k: &str, v: Value| {
        let mut e = base();
        e[k] = v;
        e.to_string().into_bytes()
    };
    let mut missing = base();
    missing.as_object_mut().unwrap().remove("action");
    let huge = {
        let mut e = base();
        let pad: Vec<String> = (0..8_000).map(|i| format!("pad-{i}")).collect();
        e["padding"] = json!(pad);
        e.to_string().into_bytes()
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("invalid_json", b"{not json".to_vec()),
        ("invalid_json", vec![b'{', 0xff, 0xfe, b'}']),
        ("invalid_event", missing.to_string().into_bytes()),
        ("invalid_event", with("status", json!("done"))),
        ("invalid_event", with("timestamp", json!("last tuesday"))),
        (
            "string_too_long",
            with("outcomeDescription", json!("x".repeat(10_001))),
        ),
        (
            "nesting_too_deep",
            with("customField", json!({"a": {"b": {"c": {"d": 1}}}})),
        ),
        ("too_large", huge),
        ("hash_mismatch", with("hash", json!("0".repeat(64)))),
        (
            "signature_mismatch",
            with("signature", json!("ab".repeat(32))),
        ),
    ];
    let mut payloads: Vec<(Option<&str>, Vec<u8>)> = Vec::new();
    let mut valid = Vec::new();
    for (i, (_, bytes)) in cases.iter().enumerate() {
        let good = event(1000 + i);
        payloads.push((None, good.to_string().into_bytes()));
        valid.push(good);
        payloads.push((None, bytes.clone()));
    }
    payloads.push((Some("audit.event"), event(2000).to_string().into_bytes()));
    let ids = env.add_entries(&payloads).await;

    let worker = InProcessWorker::start(config);
    wait_until(
        Duration::from_secs(60),
        "valid rows and dead letters",
        || async {
            env.row_count().await == (cases.len() + 1) as i64 && env.dlq_len().await == cases.len()
        },
    )
    .await;
    worker.stop().await;

    let letters = env.dlq_entries().await;
    assert_eq!(letters.len(), cases.len());
    for (i, (reason, bytes)) in cases.iter().enumerate() {
        let source = format!("stream:{}:{}", env.stream, ids[2 * i + 1]);
        let letter = letters
            .iter()
            .find(|l| l["source"] == source.as_bytes())
            .unwrap_or_else(|| panic!("dead letter for case {i} ({reason})"));
        assert_eq!(
            std::str::from_utf8(&letter["reason"]).unwrap(),
            *reason,
            "case {i}"
        );
        assert_eq!(&letter["data"], bytes, "original bytes kept for case {i}");
        assert_eq!(letter["name"], b"audit.event");
        assert!(!letter["error"].is_empty());
        assert!(letter.contains_key("failed_at") && letter.contains_key("attempts"));
    }
    // No row for any invalid event: the stored rows are exactly the valid ones.
    let stored: Vec<String> = env
        .pg
        .query("SELECT event_id FROM audit_log ORDER BY event_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut expected: Vec<String> = valid
        .iter()
        .map(|e| e["eventId"].as_str().unwrap().to_string())
        .collect();
    expected.push("evt-2000".into());
    expected.sort();
    assert_eq!(stored, expected);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_postgres_rejects_is_isolated_and_dead_lettered_while_the_rest_commit() {
    let env = TestEnv::new("dbreject").await;
    let mut config = env.config();
    config.sink.batch_size = 1000;
    config.sink.max_wait_ms = 500;
    // An organization id too large for a btree index entry: valid for the
    // validator (under 10,000 characters), refused by PostgreSQL.
    // Pseudo-random letters, so that PostgreSQL cannot compress the entry.
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let poison_org: String = (0..9_000)
        .map(|_| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            char::from(b'a' + ((seed >> 33) % 26) as u8)
        })
        .collect();
    let mut events: Vec<Value> = (0..1000).map(event).collect();
    events[500]["organizationId"] = json!(poison_org);
    env.add_events(&events).await;
    let worker = InProcessWorker::start(config);
    wait_until(
        Duration::from_secs(60),
        "999 rows and 1 dead letter",
        || async { env.row_count().await == 999 && env.dlq_len().await == 1 },
    )
    .await;
    worker.stop().await;
    let letters = env.dlq_entries().await;
    assert_eq!(
        std::str::from_utf8(&letters[0]["reason"]).unwrap(),
        "database_rejected"
    );
    let error = String::from_utf8_lossy(&letters[0]["error"]).to_string();
    assert!(
        error.contains("index row"),
        "the database's reason is kept: {error}"
    );
    assert_eq!(letters[0]["data"], events[500].to_string().into_bytes());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_endpoints_report_the_worker_state() {
    let env = TestEnv::new("http").await;
    let config = env.config();
    env.add_events(&[event(1), event(2)]).await;
    env.add_entries(&[(None, b"nope".to_vec())]).await;
    let worker = InProcessWorker::start(config);
    wait_until(Duration::from_secs(30), "rows", || async {
        env.row_count().await == 2 && env.dlq_len().await == 1
    })
    .await;
    let base = format!("http://127.0.0.1:{}", env.http_port);
    let http = reqwest::Client::new();
    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["checks"]["database"]["ok"], json!(true));
    assert_eq!(body["checks"]["redis"]["ok"], json!(true));
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "audit_worker_events_total{outcome=\"inserted\",source=\"stream\"} 2",
        "audit_worker_events_total{outcome=\"dead_lettered\",source=\"stream\"} 1",
        "audit_worker_dead_letters_total{reason=\"invalid_json\"} 1",
        "audit_worker_batch_size_count",
        "audit_worker_insert_duration_seconds_bucket",
    ] {
        assert!(metrics.contains(line), "metrics lack {line}:\n{metrics}");
    }
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_refusing_writes_defers_events_instead_of_dead_lettering_them() {
    let env = TestEnv::new("refuse").await;
    let mut config = env.config();
    config.sink.retry_max_attempts = 2;
    config.sink.retry_base_ms = 50;
    // The events wait in the worker for the breaker (retry in place): a
    // short recovery lets the half-open probe come well within the wait.
    config.sink.breaker_recovery_secs = 2;
    config.stream.claim_idle_ms = 500;
    let worker = InProcessWorker::start(config);
    env.wait_for_schema().await;
    env.refuse_writes(true).await;
    env.add_events(&(0..50).map(event).collect::<Vec<_>>())
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.row_count().await, 0);
    assert_eq!(env.dlq_len().await, 0, "an outage is not the events' fault");
    assert_eq!(env.pending_count().await, 50, "the entries wait in Redis");
    env.refuse_writes(false).await;
    wait_until(
        Duration::from_secs(30),
        "backlog stored after recovery",
        || async { env.row_count().await == 50 && env.pending_count().await == 0 },
    )
    .await;
    worker.stop().await;
    assert_eq!(env.dlq_len().await, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_kinds_without_a_handler_are_dead_lettered_as_unknown_kind() {
    let env = TestEnv::new("unknownkind").await;
    let worker = InProcessWorker::start(env.config());
    env.add_entries(&[
        (
            Some("audit.snapshot"),
            br#"{"from":"2025-01-01T00:00:00Z"}"#.to_vec(),
        ),
        (Some("user.login"), event(1).to_string().into_bytes()),
        // Erasure without gdpr.pseudonym_key: not handled, and says why.
        (
            Some("gdpr.erase"),
            br#"{"subjectId":"u-1","requesterId":"dpo"}"#.to_vec(),
        ),
    ])
    .await;
    wait_until(
        Duration::from_secs(30),
        "one row, two dead letters",
        || async { env.row_count().await == 1 && env.dlq_len().await == 2 },
    )
    .await;
    worker.stop().await;
    let letters = env.dlq_entries().await;
    assert_eq!(letters[0]["reason"], b"unknown_kind");
    assert_eq!(letters[0]["name"], b"audit.snapshot");
    assert_eq!(letters[1]["reason"], b"unknown_kind");
    assert_eq!(letters[1]["name"], b"gdpr.erase");
    let error = String::from_utf8_lossy(&letters[1]["error"]);
    assert!(error.contains("gdpr.pseudonym_key"), "{error}");
    env.cleanup().await;
}
