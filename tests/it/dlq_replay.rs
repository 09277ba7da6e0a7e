//! `dlq replay` keeps each dead letter's original source identity.

use std::process::Command;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_writes_the_original_source_on_the_replayed_entry() {
    let env = TestEnv::new("dlqsrc").await;
    let original = format!("stream:{}:1700000000000-7", env.stream);
    let mut no_event_id = event(3);
    no_event_id.as_object_mut().unwrap().remove("eventId");
    let data = no_event_id.to_string();
    let mut conn = env.redis_conn().await;
    let _: String = redis::cmd("XADD")
        .arg(&env.dlq)
        .arg("*")
        .arg("data")
        .arg(&data)
        .arg("name")
        .arg("audit.event")
        .arg("reason")
        .arg("database_rejected")
        .arg("error")
        .arg("test")
        .arg("source")
        .arg(&original)
        .arg("failed_at")
        .arg(ts(0))
        .arg("attempts")
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_audit-worker"));
    cmd.args(["dlq", "replay", "--all"]);
    for (k, v) in env.env_vars() {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(env.dlq_len().await, 0);
    let entries = env.stream_fields(&env.stream).await;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["data"], data.into_bytes());
    assert_eq!(entries[0]["name"], b"audit.event");
    assert_eq!(
        entries[0]
            .get("source")
            .map(|v| String::from_utf8_lossy(v).into_owned()),
        Some(original)
    );
    env.cleanup().await;
}
