//! The event path's edges, end to end: dead letters keep the original bytes
//! whichever read delivered the entry, pending entries trimmed away are
//! acknowledged and counted, job requests wait out a database outage, and
//! jobs from either source are counted, timed and traced.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::bullmq::{delete_queue_keys, node_json, stop, WorkerProcess};
use crate::common::*;
use crate::export::{request, ExportEnv};
use crate::ops::{parse_metrics, sample_sum, scrape, Receiver};
use crate::snapshot::SnapEnv;

/// XADDs one entry with exactly these fields; returns its id.
async fn xadd(env: &TestEnv, fields: &[(&str, &[u8])]) -> String {
    let mut conn = env.redis_conn().await;
    let mut cmd = redis::cmd("XADD");
    cmd.arg(&env.stream).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    cmd.query_async(&mut conn).await.unwrap()
}

/// A `traceparent` of 20 KiB: with it, the entry's fields other than
/// `data` exceed the 16 KiB the worker allows them.
fn oversized_traceparent() -> Vec<u8> {
    let mut v = b"00-".to_vec();
    v.resize(20 * 1024, b'f');
    v
}

/// The current value of a metric (summed over the samples whose labels
/// include `labels`); 0 when it is not exported or /metrics is down.
async fn metric(port: u16, name: &str, labels: &[(&str, &str)]) -> f64 {
    match scrape(port).await {
        Some(text) => sample_sum(&parse_metrics(&text), name, labels),
        None => 0.0,
    }
}

/// Polls a metric until it equals `expected` or `timeout` passes; returns
/// the last value seen, for the caller to assert on (a counter bumped just
/// after the state the test waited for gets its moment).
async fn metric_settled(
    port: u16,
    name: &str,
    labels: &[(&str, &str)],
    expected: f64,
    timeout: Duration,
) -> f64 {
    let started = Instant::now();
    loop {
        let v = metric(port, name, labels).await;
        if v == expected || started.elapsed() > timeout {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reason codes of the DLQ's entries, for failure messages.
async fn dlq_reasons(env: &TestEnv) -> Vec<String> {
    env.dlq_entries()
        .await
        .iter()
        .map(|l| {
            String::from_utf8_lossy(l.get("reason").map(Vec::as_slice).unwrap_or_default())
                .into_owned()
        })
        .collect()
}

/// The one dead letter of `env`'s DLQ: a `too_large` for entry `id`, with
/// the original `data` byte for byte.
async fn assert_too_large_letter_with_its_data(env: &TestEnv, id: &str, data: &[u8]) {
    let letters = env.dlq_entries().await;
    assert_eq!(
        letters.len(),
        1,
        "one dead letter: {:?}",
        dlq_reasons(env).await
    );
    let letter = &letters[0];
    assert_eq!(letter["reason"], b"too_large");
    assert_eq!(
        letter["source"],
        format!("stream:{}:{id}", env.stream).into_bytes()
    );
    assert_eq!(letter["name"], b"audit.event");
    assert!(
        letter["data"] == data,
        "the dead letter's data is the original {} bytes, not {} bytes: {:?}",
        data.len(),
        letter["data"].len(),
        String::from_utf8_lossy(&letter["data"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_side_fields_arriving_while_idle_dead_letter_the_entry_with_its_original_data() {
    let env = TestEnv::new("bigside_wake").await;
    let mut config = env.config();
    // Long blocking reads: an idle worker spends nearly all its time inside
    // the blocking XREADGROUP, so that read (not the bounded read script)
    // is the one that delivers the entry.
    config.stream.block_ms = 5_000;
    let worker = InProcessWorker::start(config);
    env.wait_for_schema().await;
    let port = env.http_port;
    wait_until(Duration::from_secs(30), "ready", || async {
        matches!(http_status(port, "/readyz").await, Some((200, _)))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let data = event(1).to_string().into_bytes();
    let id = xadd(
        &env,
        &[("data", &data), ("traceparent", &oversized_traceparent())],
    )
    .await;
    wait_until(
        Duration::from_secs(30),
        "the entry dead-lettered and acknowledged",
        || async { env.dlq_len().await == 1 && env.pending_count().await == 0 },
    )
    .await;
    assert_too_large_letter_with_its_data(&env, &id, &data).await;
    assert_eq!(env.row_count().await, 0);
    assert_eq!(
        metric(
            port,
            "audit_worker_dead_letters_total",
            &[("reason", "too_large")]
        )
        .await,
        1.0
    );
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_side_fields_reaching_the_worker_through_xautoclaim_keep_their_original_data() {
    let env = TestEnv::new("bigside_claim").await;
    let data = event(2).to_string().into_bytes();
    let id = xadd(
        &env,
        &[("data", &data), ("traceparent", &oversized_traceparent())],
    )
    .await;
    // Another replica read it and vanished: it is pending there, and the
    // worker gets it only by claiming it.
    env.read_without_ack("replica-gone", 1).await;
    assert_eq!(env.pending_count().await, 1);
    let mut config = env.config();
    config.stream.claim_idle_ms = 100;
    let worker = InProcessWorker::start(config);
    wait_until(
        Duration::from_secs(30),
        "the claimed entry dead-lettered and acknowledged",
        || async { env.dlq_len().await == 1 && env.pending_count().await == 0 },
    )
    .await;
    assert_too_large_letter_with_its_data(&env, &id, &data).await;
    assert_eq!(env.row_count().await, 0);
    assert_eq!(
        metric(
            env.http_port,
            "audit_worker_dead_letters_total",
            &[("reason", "too_large")]
        )
        .await,
        1.0
    );
    worker.stop().await;
    env.cleanup().await;
}

/// XDELs these entries of the test's stream.
async fn xdel(env: &TestEnv, ids: &[&str]) {
    let mut conn = env.redis_conn().await;
    let deleted: usize = redis::cmd("XDEL")
        .arg(&env.stream)
        .arg(ids)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(deleted, ids.len());
}

/// Trims the test's stream to nothing (`XTRIM MAXLEN 0`), as an operator
/// capping its length would do to entries still pending.
async fn trim_all(env: &TestEnv) {
    let mut conn = env.redis_conn().await;
    let _: usize = redis::cmd("XTRIM")
        .arg(&env.stream)
        .arg("MAXLEN")
        .arg(0)
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_pending_entries_deleted_or_trimmed_are_acknowledged_and_counted_as_trimmed() {
    let env = TestEnv::new("trimmed_own").await;
    let config = env.config();
    let ids = env.add_events(&(0..5).map(event).collect::<Vec<_>>()).await;
    // A previous run of this very consumer read them and died; then two
    // were deleted and the rest trimmed away before it came back.
    env.read_without_ack(&config.stream.consumer, 5).await;
    xdel(&env, &[&ids[0], &ids[2]]).await;
    trim_all(&env).await;
    env.add_events(&[event(5), event(6)]).await;
    assert_eq!(env.pending_count().await, 5);

    // XAUTOCLAIM drops deleted entries from the pending list whatever their
    // idle time, so its next call may meet the same entries the pending
    // read just returned: each must still be counted once.
    let worker = InProcessWorker::start(config);
    wait_until(
        Duration::from_secs(30),
        "the two live events stored and nothing pending",
        || async { env.row_count().await == 2 && env.pending_count().await == 0 },
    )
    .await;
    let port = env.http_port;
    let trimmed = metric_settled(
        port,
        "audit_worker_stream_trimmed_total",
        &[],
        5.0,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        trimmed, 5.0,
        "each pending entry found deleted is counted once"
    );
    assert_eq!(
        env.dlq_len().await,
        0,
        "a trimmed entry is not a dead letter"
    );
    assert_eq!(
        metric(
            port,
            "audit_worker_events_total",
            &[("source", "stream"), ("outcome", "inserted")]
        )
        .await,
        2.0
    );
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_entries_of_a_vanished_replica_trimmed_away_are_counted_when_claimed() {
    let env = TestEnv::new("trimmed_claim").await;
    env.add_events(&(0..3).map(event).collect::<Vec<_>>()).await;
    env.read_without_ack("replica-gone", 3).await;
    trim_all(&env).await;
    env.add_events(&[event(3)]).await;
    assert_eq!(env.pending_count().await, 3);

    let mut config = env.config();
    config.stream.claim_idle_ms = 100;
    let worker = InProcessWorker::start(config);
    wait_until(
        Duration::from_secs(30),
        "the live event stored and nothing pending",
        || async { env.row_count().await == 1 && env.pending_count().await == 0 },
    )
    .await;
    let trimmed = metric_settled(
        env.http_port,
        "audit_worker_stream_trimmed_total",
        &[],
        3.0,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        trimmed, 3.0,
        "entries XAUTOCLAIM reports deleted are counted"
    );
    assert_eq!(env.dlq_len().await, 0);
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_request_during_a_database_outage_waits_and_is_recorded_afterwards() {
    let x = ExportEnv::new("jobs_outage").await;
    x.fill(50).await;
    let mut config = x.config();
    // Claims come quickly and allow few deliveries: holding the request
    // through the outage must not turn it into a `max_deliveries` letter.
    config.stream.claim_idle_ms = 1000;
    config.stream.max_deliveries = 2;
    let worker = InProcessWorker::start(config);
    x.env.wait_for_schema().await;

    x.env.refuse_writes(true).await;
    x.env.refuse_job_writes(true).await;
    x.env
        .add_entries(&[(
            Some("export.audit"),
            request(
                json!({"from": "2024-03-01", "to": "2024-04-01"}),
                "ndjson",
                "gzip",
                "officer",
            ),
        )])
        .await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(
        dlq_reasons(&x.env).await,
        Vec::<String>::new(),
        "a database outage dead-letters nothing"
    );
    let jobs = || async {
        x.env
            .pg
            .query_one("SELECT count(*) FROM export_jobs", &[])
            .await
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(-1)
    };
    assert_eq!(
        jobs().await,
        0,
        "nothing could be recorded during the outage"
    );
    x.env.refuse_job_writes(false).await;
    x.env.refuse_writes(false).await;

    wait_until(
        Duration::from_secs(60),
        "the export job recorded after the outage",
        || async { jobs().await == 1 },
    )
    .await;
    let id: String = x
        .env
        .pg
        .query_one("SELECT id FROM export_jobs", &[])
        .await
        .unwrap()
        .get(0);
    x.wait_notified(&id, Duration::from_secs(60)).await;
    assert_eq!(x.job(&id).await.get::<_, Option<i64>>(1), Some(50));
    let notes = x.notifications().await;
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert_eq!(notes[0]["type"], "export.ready");
    assert_eq!(notes[0]["jobId"], id);
    wait_until(
        Duration::from_secs(10),
        "the request acknowledged",
        || async { x.env.pending_count().await == 0 },
    )
    .await;
    assert_eq!(dlq_reasons(&x.env).await, Vec::<String>::new());
    worker.stop().await;
    x.cleanup().await;
}

/// A span attribute's string value.
fn span_attr(span: &opentelemetry_proto::tonic::trace::v1::Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            Value::StringValue(s) => s.clone(),
            other => format!("{other:?}"),
        })
}

/// The `audit.job` spans of one kind: (kind, source) of each.
fn job_spans(receiver: &Receiver, kind: &str) -> Vec<(String, String)> {
    receiver
        .spans
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.name == "audit.job")
        .map(|s| {
            (
                span_attr(s, "kind").unwrap_or_default(),
                span_attr(s, "source").unwrap_or_default(),
            )
        })
        .filter(|(k, _)| k == kind)
        .collect()
}

/// Settings that send the worker's spans to `receiver_port` promptly.
fn otlp_vars(receiver_port: u16) -> [(&'static str, String); 2] {
    [
        (
            "AUDIT_WORKER__TELEMETRY__OTLP_ENDPOINT",
            format!("http://127.0.0.1:{receiver_port}"),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY", "200".to_string()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_jobs_requested_on_the_stream_and_through_bullmq_are_counted_timed_and_traced() {
    let x = ExportEnv::new("jobmetrics_export").await;
    x.fill(300).await;
    let receiver = Receiver::default();
    let otlp_port = receiver.start().await;
    let vars = x.env_vars(70, 30);
    let mut extra: Vec<(&str, String)> =
        vars.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    extra.extend(otlp_vars(otlp_port));
    let worker = WorkerProcess(Some(spawn_worker_with(&x.env, &extra)));
    x.env.wait_for_schema().await;

    // Two different requesters, so the requests do not merge into one job.
    let filters = json!({"from": "2024-03-01", "to": "2024-04-01"});
    x.env
        .add_entries(&[(
            Some("export.audit"),
            request(filters.clone(), "csv", "gzip", "officer-stream"),
        )])
        .await;
    let bullmq_request =
        String::from_utf8(request(filters, "ndjson", "gzip", "officer-bullmq")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let jobs_file = dir.path().join("jobs.json");
    std::fs::write(
        &jobs_file,
        json!([{"label": "export", "name": "export.audit", "json": bullmq_request}]).to_string(),
    )
    .unwrap();
    let r = node_json(
        &x.env,
        "outcomes.mjs",
        &[
            ("SCENARIO", "hostile".into()),
            ("HOSTILE_FILE", jobs_file.display().to_string()),
        ],
    )
    .await;
    assert_eq!(r["jobs"][0]["state"], "completed", "{r}");

    let ids: Vec<String> = {
        wait_until(Duration::from_secs(30), "both jobs recorded", || async {
            x.env
                .pg
                .query_one("SELECT count(*) FROM export_jobs", &[])
                .await
                .is_ok_and(|r| r.get::<_, i64>(0) == 2)
        })
        .await;
        x.env
            .pg
            .query("SELECT id FROM export_jobs ORDER BY source", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    for id in &ids {
        x.wait_notified(id, Duration::from_secs(60)).await;
    }
    let totals = x
        .env
        .pg
        .query_one(
            "SELECT sum(row_count)::bigint, sum(size_bytes)::bigint FROM export_jobs",
            &[],
        )
        .await
        .unwrap();
    let (rows, artifact_bytes): (i64, i64) = (totals.get(0), totals.get(1));
    assert_eq!(rows, 600, "each job exported the 300 rows");

    let port = x.env.http_port;
    let export = [("kind", "export")];
    let completed = metric_settled(
        port,
        "audit_worker_jobs_total",
        &[("kind", "export"), ("status", "completed")],
        2.0,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(completed, 2.0, "both export jobs counted completed");
    let s = parse_metrics(&scrape(port).await.expect("/metrics answers"));
    let jobs = |status: &str| {
        sample_sum(
            &s,
            "audit_worker_jobs_total",
            &[("kind", "export"), ("status", status)],
        )
    };
    assert_eq!(
        jobs("accepted"),
        2.0,
        "one request from each source accepted"
    );
    assert_eq!(jobs("rejected"), 0.0);
    assert_eq!(jobs("failed"), 0.0);
    assert_eq!(
        sample_sum(&s, "audit_worker_job_rows_total", &export),
        rows as f64
    );
    let bytes = sample_sum(&s, "audit_worker_job_bytes_total", &export);
    assert!(
        bytes >= artifact_bytes as f64 && artifact_bytes > 0,
        "job bytes {bytes} cover the artifacts' {artifact_bytes} bytes"
    );
    assert_eq!(
        sample_sum(&s, "audit_worker_job_duration_seconds_count", &export),
        2.0
    );

    wait_until(
        Duration::from_secs(30),
        "two export job spans exported",
        || async { job_spans(&receiver, "export").len() >= 2 },
    )
    .await;
    let mut spans = job_spans(&receiver, "export");
    spans.sort();
    assert_eq!(spans.len(), 2, "one audit.job span per job: {spans:?}");
    assert!(
        spans[0].1.starts_with("bullmq") && spans[1].1.starts_with("stream"),
        "each span names its job's source: {spans:?}"
    );

    stop(worker);
    delete_queue_keys(&x.env).await;
    x.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_request_on_the_stream_is_counted_accepted_and_completed_and_traced() {
    let s = SnapEnv::new("jobmetrics_snap").await;
    let receiver = Receiver::default();
    let otlp_port = receiver.start().await;
    let vars = s.env_vars();
    let mut extra: Vec<(&str, String)> =
        vars.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    extra.extend(otlp_vars(otlp_port));
    extra.push(("AUDIT_WORKER__SNAPSHOT__POLL_INTERVAL_MS", "100".into()));
    // The schedule's slot lies far in the past: its one job runs at start.
    extra.push(("AUDIT_WORKER__SNAPSHOT__INTERVAL_SECS", "315360000".into()));
    let worker = WorkerProcess(Some(spawn_worker_with(&s.env, &extra)));
    s.env.wait_for_schema().await;
    s.env
        .add_events(&(0..20).map(event).collect::<Vec<_>>())
        .await;
    let done = || s.count("SELECT count(*) FROM snapshot_jobs WHERE status = 'done'");
    wait_until(
        Duration::from_secs(60),
        "the scheduled snapshot done",
        || async { done().await == 1 },
    )
    .await;
    // The scheduled job is not a request from a source; measure from here.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let port = s.env.http_port;
    let jobs = |status: &'static str| async move {
        metric(
            port,
            "audit_worker_jobs_total",
            &[("kind", "snapshot"), ("status", status)],
        )
        .await
    };
    let snapshot = [("kind", "snapshot")];
    let before = (
        jobs("accepted").await,
        jobs("completed").await,
        metric(port, "audit_worker_job_duration_seconds_count", &snapshot).await,
    );

    let to = chrono::Utc::now().to_rfc3339();
    s.env
        .add_entries(&[(
            Some("audit.snapshot"),
            format!(r#"{{"to":"{to}"}}"#).into_bytes(),
        )])
        .await;
    wait_until(
        Duration::from_secs(60),
        "the requested snapshot done",
        || async { done().await == 2 },
    )
    .await;
    let completed = metric_settled(
        port,
        "audit_worker_jobs_total",
        &[("kind", "snapshot"), ("status", "completed")],
        before.1 + 1.0,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(
        completed - before.1,
        1.0,
        "the requested snapshot counted completed once"
    );
    assert_eq!(jobs("accepted").await - before.0, 1.0);
    assert_eq!(jobs("rejected").await, 0.0);
    assert_eq!(jobs("failed").await, 0.0);
    assert_eq!(
        metric(port, "audit_worker_job_duration_seconds_count", &snapshot).await - before.2,
        1.0
    );
    wait_until(
        Duration::from_secs(30),
        "the requested snapshot's job span exported",
        || async {
            job_spans(&receiver, "snapshot")
                .iter()
                .any(|(_, source)| source.starts_with("stream"))
        },
    )
    .await;
    let from_stream: Vec<_> = job_spans(&receiver, "snapshot")
        .into_iter()
        .filter(|(_, source)| source.starts_with("stream"))
        .collect();
    assert_eq!(from_stream.len(), 1, "{from_stream:?}");
    assert_eq!(s.env.dlq_len().await, 0);
    stop(worker);
    s.env.cleanup().await;
}

/// A dead letter can exist for an event that was in fact stored (a second
/// copy of an at-least-once DLQ write, or a holder racing a claim). Its
/// replay must not store the event again, even without an `eventId`: the
/// replayed entry carries the identity the event first arrived with, which
/// stays its idempotency key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_dead_letter_keeps_its_first_identity_and_is_not_stored_twice() {
    let env = TestEnv::new("replay_identity").await;
    let worker = InProcessWorker::start(env.config());
    env.wait_for_schema().await;
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let data = json!({"timestamp": now, "action": "record.read", "status": "success"}).to_string();
    let id = xadd(&env, &[("data", data.as_bytes())]).await;
    wait_until(Duration::from_secs(30), "the event stored", || async {
        env.row_count().await == 1
    })
    .await;
    let identity = format!("stream:{}:{id}", env.stream);
    let mut conn = env.redis_conn().await;
    let _: String = redis::cmd("XADD")
        .arg(&env.dlq)
        .arg("*")
        .arg("data")
        .arg(data.as_bytes())
        .arg("name")
        .arg("audit.event")
        .arg("reason")
        .arg("max_deliveries")
        .arg("error")
        .arg("delivered 4 times")
        .arg("source")
        .arg(&identity)
        .arg("failed_at")
        .arg(&now)
        .arg("attempts")
        .arg(4)
        .query_async(&mut conn)
        .await
        .unwrap();

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_audit-worker"))
        .args(["dlq", "replay", "--all"])
        .envs(env.env_vars())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(env.dlq_len().await, 0, "the letter left the DLQ");
    // The replayed entry is consumed (acknowledged and, by default, deleted).
    wait_until(
        Duration::from_secs(30),
        "the replayed entry consumed",
        || async { env.pending_count().await == 0 && env.stream_len().await == 0 },
    )
    .await;
    assert_eq!(env.count_and_distinct().await, (1, 1), "stored once");
    let key: String = env
        .pg
        .query_one("SELECT idempotency_key FROM audit_log", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(key, identity);
    assert_eq!(
        env.dlq_len().await,
        0,
        "nothing dead-lettered by the replay"
    );
    worker.stop().await;
    env.cleanup().await;
}
