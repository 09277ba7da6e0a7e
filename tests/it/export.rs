//! Export jobs against real PostgreSQL, Redis and a local-disk
//! object store in a temporary directory.

use std::collections::HashMap;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use audit_worker::config::Config;
use audit_worker::jobs::export::{self, executor::Exporter, ExportHandler};
use audit_worker::jobs::JobError;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::common::*;

const LINK_SECRET: &str = "test-link-secret";

/// A test's export world: its TestEnv plus a temporary store directory.
pub(crate) struct ExportEnv {
    pub(crate) env: TestEnv,
    dir: tempfile::TempDir,
    notifications: String,
}

impl ExportEnv {
    pub(crate) async fn new(test: &str) -> Self {
        let env = TestEnv::new(test).await;
        let notifications = format!("test:{}:notifications", env.name);
        let me = Self {
            env,
            dir: tempfile::tempdir().unwrap(),
            notifications,
        };
        audit_worker::db::migrate(&me.config()).await.unwrap();
        me
    }

    fn store_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("store")
    }

    pub(crate) fn config(&self) -> Config {
        let mut c = self.env.config();
        c.storage.url = self.store_dir().display().to_string();
        c.export.link_secret = LINK_SECRET.to_owned().into();
        c.export.notifications_key = self.notifications.clone();
        c.export.part_rows = 70;
        c.export.page_rows = 30;
        c.export.poll_interval_ms = 100;
        c
    }

    pub(crate) fn env_vars(&self, part_rows: u64, page_rows: u32) -> Vec<(String, String)> {
        let mut v = self.env.env_vars();
        v.extend([
            (
                "AUDIT_WORKER__STORAGE__URL".into(),
                self.store_dir().display().to_string(),
            ),
            (
                "AUDIT_WORKER__EXPORT__LINK_SECRET".into(),
                LINK_SECRET.into(),
            ),
            (
                "AUDIT_WORKER__EXPORT__NOTIFICATIONS_KEY".into(),
                self.notifications.clone(),
            ),
            (
                "AUDIT_WORKER__EXPORT__PART_ROWS".into(),
                part_rows.to_string(),
            ),
            (
                "AUDIT_WORKER__EXPORT__PAGE_ROWS".into(),
                page_rows.to_string(),
            ),
            ("AUDIT_WORKER__EXPORT__LEASE_SECS".into(), "2".into()),
            (
                "AUDIT_WORKER__EXPORT__POLL_INTERVAL_MS".into(),
                "100".into(),
            ),
        ]);
        v
    }

    /// Starts a worker process (`audit-worker run`) with this test's
    /// [`ExportEnv::env_vars`] and `extra` variables, output discarded.
    pub(crate) fn spawn_worker(
        &self,
        part_rows: u64,
        page_rows: u32,
        extra: &[(&str, &str)],
    ) -> std::process::Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_audit-worker"));
        cmd.arg("run");
        for (k, v) in self.env_vars(part_rows, page_rows) {
            cmd.env(k, v);
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        cmd.spawn().expect("worker binary starts")
    }

    async fn exporter(&self) -> (Arc<Exporter>, ExportHandler) {
        let config = self.config();
        let pool = audit_worker::db::connect_pool(&config).await.unwrap();
        let client = audit_worker::source::redis_client(&config.redis).unwrap();
        let redis = audit_worker::source::command_connection(&client, &config.redis)
            .await
            .unwrap();
        let storage = audit_worker::storage::open(&config.storage).unwrap();
        let wake = Arc::new(Notify::new());
        let exporter =
            export::exporter(&config, pool.clone(), storage, Some(redis), wake.clone()).unwrap();
        (Arc::new(exporter), ExportHandler::new(pool, wake))
    }

    /// Inserts `n` rows in March 2024 straight into audit_log, with pairs
    /// sharing an event_time (the id breaks the tie) and awkward text.
    pub(crate) async fn fill(&self, n: i64) {
        self.env
            .pg
            .batch_execute(
                "SELECT audit_log_ensure_partition('2024-03-01'); \
                 SELECT audit_log_ensure_partition('2024-04-01');",
            )
            .await
            .unwrap();
        self.env
            .pg
            .execute(
                r#"INSERT INTO audit_log (event_time, timestamp_raw, idempotency_key, event_id, action,
                     status, principal_id, organization_id, target_resource_type, target_resource_id,
                     outcome_description, hash, hash_provided, data_classification, details,
                     session_context, source)
                   SELECT t, to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
                     'k-' || g, 'e-' || g, 'record.read.' || (g % 7),
                     (ARRAY['attempt','success','failure'])[g % 3 + 1],
                     CASE WHEN g % 11 = 0 THEN NULL ELSE 'user-' || (g % 100) END,
                     'org-' || (g % 5), CASE WHEN g % 2 = 0 THEN 'Patient' ELSE 'Invoice' END,
                     'p-' || (g % 50),
                     (ARRAY['plain ' || g, 'a,b "quoted", c ' || g, E'line1\nline2\r\n' || g,
                            'Zoë 日本語 ✓ ' || g, '=SUM(A1) ' || g, '-1 ' || g, '+x', '@cmd',
                            '''apostrophe ' || g, E'\ttab'])[g % 10 + 1],
                     md5(g::text) || md5(g::text), true,
                     (ARRAY['PUBLIC','INTERNAL','CONFIDENTIAL','PHI'])[g % 4 + 1],
                     jsonb_build_object('n', g, 'note', 'x,"y"'),
                     CASE WHEN g % 3 = 0 THEN jsonb_build_object('ipAddress', '10.0.0.1') END,
                     'test'
                   FROM generate_series(1, $1::bigint) g,
                        LATERAL (SELECT timestamptz '2024-03-01 00:00:00+00'
                                        + (g / 2) * interval '7 seconds') AS x(t)"#,
                &[&n],
            )
            .await
            .unwrap();
    }

    pub(crate) async fn job(&self, id: &str) -> tokio_postgres::Row {
        self.env
            .pg
            .query_one(
                "SELECT status, row_count, artifact_key, sha256, size_bytes, parts_done, \
                 notified_at IS NOT NULL FROM export_jobs WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap()
    }

    pub(crate) async fn wait_notified(&self, id: &str, timeout: Duration) {
        wait_until(timeout, "export completed and notified", || async {
            let r = self.job(id).await;
            let status: String = r.get(0);
            assert!(
                status != "failed" && status != "expired",
                "job {id} is {status}"
            );
            r.get::<_, bool>(6)
        })
        .await;
    }

    async fn artifact_bytes(&self, id: &str) -> Vec<u8> {
        let key: String = self.job(id).await.get(2);
        std::fs::read(self.store_dir().join(key)).unwrap()
    }

    pub(crate) async fn notifications(&self) -> Vec<HashMap<String, String>> {
        self.env
            .stream_fields(&self.notifications)
            .await
            .into_iter()
            .map(|fields| {
                fields
                    .into_iter()
                    .map(|(k, v)| (k, String::from_utf8(v).unwrap()))
                    .collect()
            })
            .collect()
    }

    pub(crate) async fn cleanup(self) {
        let mut conn = self.env.redis_conn().await;
        let _: redis::RedisResult<()> = redis::cmd("DEL")
            .arg(&self.notifications)
            .query_async(&mut conn)
            .await;
        self.env.cleanup().await;
    }
}

pub(crate) fn request(filters: Value, format: &str, compression: &str, requester: &str) -> Vec<u8> {
    json!({"exportFilters": filters, "format": format, "compression": compression, "requesterId": requester})
        .to_string()
        .into_bytes()
}

fn decompress(bytes: &[u8], compression: &str) -> Vec<u8> {
    let mut out = Vec::new();
    match compression {
        "gzip" => {
            flate2::read::MultiGzDecoder::new(bytes)
                .read_to_end(&mut out)
                .unwrap();
        }
        "zstd" => out = zstd::decode_all(bytes).unwrap(),
        _ => out = bytes.to_vec(),
    }
    out
}

/// The columns compared between the database and the export.
const CHECKED: [&str; 11] = [
    "id",
    "timestamp",
    "action",
    "status",
    "principal_id",
    "organization_id",
    "target_resource_type",
    "target_resource_id",
    "outcome_description",
    "data_classification",
    "details",
];

/// Parses an export back into rows of the CHECKED columns (CSV: empty is
/// null, and the formula guard's leading apostrophe is removed).
fn parse_back(plain: &[u8], format: &str) -> Vec<Vec<Option<String>>> {
    let pick = |get: &dyn Fn(&str) -> Option<String>| -> Vec<Option<String>> {
        CHECKED.iter().map(|c| get(c)).collect()
    };
    match format {
        "csv" => {
            let mut r = csv::Reader::from_reader(plain);
            let headers = r.headers().unwrap().clone();
            assert_eq!(
                headers.iter().collect::<Vec<_>>(),
                export::format::COLUMNS.to_vec()
            );
            r.records()
                .map(|rec| {
                    let rec = rec.unwrap();
                    pick(&|c| {
                        let i = headers.iter().position(|h| h == c).unwrap();
                        let v = &rec[i];
                        if v.is_empty() {
                            return None;
                        }
                        let v = v.strip_prefix('\'').unwrap_or(v);
                        // details is JSON text: compare as values.
                        if c == "details" {
                            return Some(serde_json::from_str::<Value>(v).unwrap().to_string());
                        }
                        Some(v.to_owned())
                    })
                })
                .collect()
        }
        _ => {
            let objects: Vec<Value> = if format == "json" {
                serde_json::from_slice::<Vec<Value>>(plain).unwrap()
            } else {
                std::str::from_utf8(plain)
                    .unwrap()
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect()
            };
            objects
                .iter()
                .map(|o| {
                    pick(&|c| match &o[c] {
                        Value::Null => None,
                        Value::String(s) => Some(s.clone()),
                        Value::Number(n) => Some(n.to_string()),
                        other => Some(other.to_string()),
                    })
                })
                .collect()
        }
    }
}

/// The rows the export should hold, straight from the database.
async fn expected(env: &TestEnv, where_sql: &str) -> Vec<Vec<Option<String>>> {
    let sql = format!(
        "SELECT id::text, timestamp_raw, action, status, principal_id, organization_id, \
         target_resource_type, target_resource_id, outcome_description, data_classification, \
         details::text FROM audit_log WHERE event_time >= '2024-03-01' AND event_time < '2024-04-01' \
         AND {where_sql} ORDER BY event_time, id"
    );
    env.pg
        .query(&sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (0..CHECKED.len())
                .map(|i| {
                    let v: Option<String> = r.get(i);
                    if i == 10 {
                        v.map(|t| serde_json::from_str::<Value>(&t).unwrap().to_string())
                    } else {
                        v
                    }
                })
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_parses_back_to_exactly_the_matching_rows() {
    let x = ExportEnv::new("export_formats").await;
    x.fill(400).await;
    let (exporter, handler) = x.exporter().await;
    let stop = CancellationToken::new();
    let runner = tokio::spawn(exporter.clone().run(stop.clone()));
    let range = json!({"from": "2024-03-01T00:00:00Z", "to": "2024-04-01"});
    let with = |extra: Value| {
        let mut f = range.clone();
        f.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        f
    };
    let combos: Vec<(Value, &str)> = vec![
        (range.clone(), "true"),
        (
            with(json!({"organizationId": "org-2", "status": ["success", "failure"]})),
            "organization_id = 'org-2' AND status IN ('success', 'failure')",
        ),
        (
            with(json!({"actions": ["record.read.1", "record.read.3"], "principalIds": ["user-1", "user-3", "user-21"], "dataClassification": "INTERNAL"})),
            "action IN ('record.read.1', 'record.read.3') AND principal_id IN ('user-1', 'user-3', 'user-21') AND data_classification = 'INTERNAL'",
        ),
        (
            with(json!({"targetResourceType": "Patient", "targetResourceId": "p-4"})),
            "target_resource_type = 'Patient' AND target_resource_id = 'p-4'",
        ),
        (
            json!({"from": "2024-03-01T00:10:00Z", "to": "2024-03-01T00:20:00Z", "status": "attempt"}),
            "event_time >= '2024-03-01T00:10:00Z' AND event_time < '2024-03-01T00:20:00Z' AND status = 'attempt'",
        ),
    ];
    let formats = ["csv", "ndjson", "json"];
    let compressions = ["gzip", "zstd", "none"];
    let mut n = 0;
    for (filters, where_sql) in &combos {
        let want = expected(&x.env, where_sql).await;
        assert!(!want.is_empty(), "combination {filters} matches rows");
        for format in formats {
            let compression = compressions[n % 3];
            n += 1;
            let answer = handler
                .record(
                    &request(filters.clone(), format, compression, "officer"),
                    &format!("src-{n}"),
                )
                .await
                .unwrap();
            let id = answer["jobId"].as_str().unwrap().to_owned();
            x.wait_notified(&id, Duration::from_secs(60)).await;
            let plain = decompress(&x.artifact_bytes(&id).await, compression);
            let got = parse_back(&plain, format);
            assert_eq!(got.len(), want.len(), "{format}/{compression} {filters}");
            assert_eq!(got, want, "{format}/{compression} {filters}");
            let row_count: Option<i64> = x.job(&id).await.get(1);
            assert_eq!(row_count, Some(want.len() as i64));
        }
    }
    // The quoting edge cases really were among the exported rows.
    let all = expected(&x.env, "true").await;
    for needle in [
        "a,b \"quoted\"",
        "line1\nline2\r\n",
        "Zoë 日本語",
        "=SUM",
        "'apostrophe",
        "\ttab",
    ] {
        assert!(
            all.iter()
                .any(|r| r[8].as_deref().unwrap_or("").contains(needle)),
            "{needle}"
        );
    }

    // No matching rows: completed, not failed, and export.no_results.
    let answer = handler
        .record(
            &request(
                json!({"from": "2030-01-01", "to": "2030-02-01"}),
                "json",
                "gzip",
                "officer",
            ),
            "src-empty",
        )
        .await
        .unwrap();
    let empty_id = answer["jobId"].as_str().unwrap().to_owned();
    x.wait_notified(&empty_id, Duration::from_secs(30)).await;
    let r = x.job(&empty_id).await;
    assert_eq!(r.get::<_, String>(0), "completed");
    assert_eq!(r.get::<_, Option<i64>>(1), Some(0));
    let v: Value =
        serde_json::from_slice(&decompress(&x.artifact_bytes(&empty_id).await, "gzip")).unwrap();
    assert_eq!(v, json!([]));

    let notes = x.notifications().await;
    assert_eq!(notes.len(), n + 1, "one notification per job");
    let empty_note = notes.iter().find(|m| m["jobId"] == empty_id).unwrap();
    assert_eq!(empty_note["type"], "export.no_results");
    let ready = notes.iter().filter(|m| m["type"] == "export.ready").count();
    assert_eq!(ready, n);
    assert!(notes
        .iter()
        .all(|m| m["downloadLink"]
            .starts_with(&format!("/exports/{}/download?expires=", m["jobId"]))));
    assert!(notes.iter().all(|m| m["requesterId"] == "officer"));

    // Each export was audited: a well-formed audit.export.completed event
    // on the worker's stream, with a deterministic eventId.
    let mut conn = x.env.redis_conn().await;
    let v: redis::Value = redis::cmd("XRANGE")
        .arg(&x.env.stream)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let events: Vec<Value> = audit_worker::source::stream::parse_entries(&v)
        .into_iter()
        .map(|e| {
            let fields = e.fields.unwrap_or_default();
            let data = fields.iter().find(|(k, _)| k == b"data").unwrap();
            serde_json::from_slice(&data.1).unwrap()
        })
        .collect();
    assert_eq!(events.len(), n + 1);
    let config = x.config();
    let policy =
        audit_worker::event::ValidationPolicy::from_config(&config.validation, &config.integrity)
            .unwrap();
    for e in &events {
        assert_eq!(e["action"], "audit.export.completed");
        assert!(e["eventId"]
            .as_str()
            .unwrap()
            .starts_with("export-completed-"));
        audit_worker::event::decode_event(e.to_string().as_bytes(), &policy, chrono::Utc::now())
            .expect("the export's audit event passes the worker's own validation");
    }
    // Parts were removed once the artifact was complete.
    let leftovers: Vec<_> = walk(&x.store_dir())
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("/parts/"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    stop.cancel();
    runner.await.unwrap();
    x.cleanup().await;
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_requests_in_flight_become_one_job_and_bad_ones_are_rejected() {
    let x = ExportEnv::new("export_dedup").await;
    let (_exporter, handler) = x.exporter().await;
    let handler = Arc::new(handler);
    let payload = request(
        json!({"from": "2024-03-01", "to": "2024-04-01", "actions": ["b", "a"]}),
        "csv",
        "gzip",
        "officer",
    );
    // The same request in another key order and list order is identical.
    let same = request(
        json!({"actions": ["a", "b", "a"], "to": "2024-04-01T00:00:00Z", "from": "2024-03-01"}),
        "csv",
        "gzip",
        "officer",
    );
    let mut tasks = Vec::new();
    for i in 0..8 {
        let h = handler.clone();
        let p = if i % 2 == 0 {
            payload.clone()
        } else {
            same.clone()
        };
        tasks.push(tokio::spawn(async move {
            h.record(&p, &format!("stream:x:{i}")).await.unwrap()
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap()["jobId"].as_str().unwrap().to_owned());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one job for identical requests: {ids:?}");
    let count: i64 = x
        .env
        .pg
        .query_one("SELECT count(*) FROM export_jobs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1);
    // A redelivered message returns its job; another requester or format
    // is another job.
    let again = handler.record(&payload, "stream:x:0").await.unwrap();
    assert_eq!(again["jobId"], ids[0].as_str());
    assert_eq!(again["deduplicated"], true);
    let other = handler
        .record(
            &request(
                json!({"from": "2024-03-01", "to": "2024-04-01", "actions": ["a", "b"]}),
                "csv",
                "gzip",
                "someone-else",
            ),
            "s-other",
        )
        .await
        .unwrap();
    assert_ne!(other["jobId"], ids[0].as_str());
    let other_format = handler
        .record(
            &request(
                json!({"from": "2024-03-01", "to": "2024-04-01", "actions": ["a", "b"]}),
                "json",
                "gzip",
                "officer",
            ),
            "s-json",
        )
        .await
        .unwrap();
    assert_ne!(other_format["jobId"], ids[0].as_str());

    // Invalid payloads: a clear, stable reason; nothing recorded.
    for (bad, needle) in [
        (
            request(
                json!({"from": "2024-03-01", "to": "2024-04-01"}),
                "xml",
                "gzip",
                "u",
            ),
            "unknown format",
        ),
        (
            request(
                json!({"from": "2024-05-01", "to": "2024-04-01"}),
                "csv",
                "gzip",
                "u",
            ),
            "must be before",
        ),
        (
            request(
                json!({"from": "2024-03-01", "to": "2024-04-01", "org": "x"}),
                "csv",
                "gzip",
                "u",
            ),
            "unknown field `org`",
        ),
        (b"not json".to_vec(), "not valid"),
    ] {
        match handler.record(&bad, "s-bad").await {
            Err(JobError::Rejected(r)) => {
                assert_eq!(r.reason.code(), "invalid_export_request");
                assert!(r.message.contains(needle), "{}", r.message);
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
    }
    let count: i64 = x
        .env
        .pg
        .query_one("SELECT count(*) FROM export_jobs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 3);
    x.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_links_download_and_tampered_or_expired_ones_get_403() {
    let x = ExportEnv::new("export_link").await;
    x.fill(300).await;
    // The whole worker, with the request arriving on its stream.
    let worker = InProcessWorker::start(x.config());
    x.env.wait_for_schema().await;
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
    wait_until(Duration::from_secs(30), "job recorded", || async {
        x.env
            .pg
            .query_one("SELECT count(*) FROM export_jobs", &[])
            .await
            .map(|r| r.get::<_, i64>(0) == 1)
            .unwrap_or(false)
    })
    .await;
    let id: String = x
        .env
        .pg
        .query_one("SELECT id FROM export_jobs", &[])
        .await
        .unwrap()
        .get(0);
    x.wait_notified(&id, Duration::from_secs(60)).await;
    let file = x.artifact_bytes(&id).await;

    let base = format!("http://127.0.0.1:{}", x.env.http_port);
    let signer = export::link::LinkSigner::new(LINK_SECRET.to_owned().into());
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let good = format!("{base}{}", signer.link(&id, later));
    let resp = reqwest::get(&good).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp
        .headers()
        .get("content-disposition")
        .unwrap()
        .to_str()
        .unwrap()
        .contains(".ndjson.gz"));
    assert_eq!(resp.bytes().await.unwrap().to_vec(), file);

    // The link from the notification works too.
    let note = x
        .notifications()
        .await
        .into_iter()
        .find(|m| m["jobId"] == id)
        .unwrap();
    assert_eq!(note["type"], "export.ready");
    assert_eq!(
        reqwest::get(format!("{base}{}", note["downloadLink"]))
            .await
            .unwrap()
            .status(),
        200
    );

    // `audit-worker export-link ID --ttl 1h` prints a working link.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_audit-worker"));
    cmd.args(["export-link", &id, "--ttl", "1h"]);
    for (k, v) in x.env_vars(70, 30) {
        cmd.env(k, v);
    }
    let out = cmd.stderr(Stdio::piped()).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let link = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(
        reqwest::get(format!("{base}{link}"))
            .await
            .unwrap()
            .status(),
        200
    );

    let exp = later.timestamp();
    let sig = signer.sign(&id, exp);
    let mut tampered_sig = sig.clone();
    tampered_sig.replace_range(0..1, if sig.starts_with('0') { "1" } else { "0" });
    let past = chrono::Utc::now().timestamp() - 10;
    let forbidden = [
        format!("/exports/{id}/download?expires={exp}&signature={tampered_sig}"),
        format!("/exports/{id}/download?expires={}&signature={sig}", exp + 1),
        format!(
            "/exports/{id}/download?expires={past}&signature={}",
            signer.sign(&id, past)
        ),
        format!("/exports/{id}/download?expires={exp}"),
        format!("/exports/{id}/download"),
        format!("/exports/{id}x/download?expires={exp}&signature={sig}"),
        format!("/exports/..%2F..%2Fetc%2Fpasswd/download?expires={exp}&signature={sig}"),
    ];
    for path in forbidden {
        let resp = reqwest::get(format!("{base}{path}")).await.unwrap();
        assert_eq!(resp.status(), 403, "{path}");
    }
    // Even a validly signed path trick is only a job id to look up: no
    // such job, nothing read from the file system.
    let trick = format!(
        "{base}/exports/..%2F..%2Fetc%2Fpasswd/download?expires={exp}&signature={}",
        signer.sign("../../etc/passwd", exp)
    );
    let resp = reqwest::get(trick).await.unwrap();
    assert_eq!(resp.status(), 404);
    assert!(!resp.text().await.unwrap().contains("root:"));
    // Signed by a different secret: 403.
    let other = export::link::LinkSigner::new("another-secret".to_owned().into());
    assert_eq!(
        reqwest::get(format!("{base}{}", other.link(&id, later)))
            .await
            .unwrap()
            .status(),
        403
    );
    worker.stop().await;
    x.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_removes_what_it_should_and_nothing_else() {
    let x = ExportEnv::new("export_sweep").await;
    let (exporter, _handler) = x.exporter().await;
    let store = x.store_dir();
    let put = |key: &str| {
        let p = store.join(key);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"x").unwrap();
    };
    // (id, status, created hours ago, download expiry hours from now)
    let jobs: [(&str, &str, i32, Option<i32>); 7] = [
        ("old-running", "exporting", 25, None),
        ("old-queued", "queued", 30, None),
        ("young-running", "exporting", 1, None),
        ("done-expired", "completed", 80, Some(-8)),
        ("done-fresh", "completed", 2, Some(70)),
        ("failed", "failed", 2, None),
        ("expired-already", "expired", 2, None),
    ];
    for (id, status, age, expires) in jobs {
        x.env
            .pg
            .execute(
                "INSERT INTO export_jobs (id, source, requester_id, filters, filter_hash, format, \
                 compression, status, parts_prefix, artifact_key, parts_done, created_at, expires_at, notified_at) \
                 VALUES ($1, $1, 'officer', '{}'::jsonb, $1, 'csv', 'gzip', $2, \
                 'exports/' || $1 || '/parts', 'exports/' || $1 || '/f.csv.gz', 2, \
                 now() - make_interval(hours => $3), now() + make_interval(hours => $4), \
                 CASE WHEN $2 = 'completed' THEN now() END)",
                &[&id, &status, &age, &expires.unwrap_or(0)],
            )
            .await
            .unwrap();
        put(&format!("exports/{id}/parts/000001"));
        put(&format!("exports/{id}/parts/000002"));
        if status == "completed" {
            put(&format!("exports/{id}/f.csv.gz"));
            put(&format!("exports/{id}/f.csv.gz.manifest.json"));
        }
    }
    put("exports/unrelated/keep.txt");
    put("snapshots/manifest.json");

    let report = export::sweep::sweep_once(&exporter, 24 * 3600)
        .await
        .unwrap();
    assert!(report.ran);
    let mut expired = report.expired_jobs.clone();
    expired.sort();
    assert_eq!(expired, ["old-queued", "old-running"]);
    let mut parts = report.parts_removed_jobs.clone();
    parts.sort();
    assert_eq!(
        parts,
        ["expired-already", "failed", "old-queued", "old-running"]
    );
    assert_eq!(report.artifacts_removed_jobs, ["done-expired"]);

    let mut left: Vec<String> = walk(&store)
        .iter()
        .map(|p| p.strip_prefix(&store).unwrap().display().to_string())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "exports/done-expired/parts/000001",
            "exports/done-expired/parts/000002",
            "exports/done-fresh/f.csv.gz",
            "exports/done-fresh/f.csv.gz.manifest.json",
            "exports/done-fresh/parts/000001",
            "exports/done-fresh/parts/000002",
            "exports/unrelated/keep.txt",
            "exports/young-running/parts/000001",
            "exports/young-running/parts/000002",
            "snapshots/manifest.json",
        ]
    );
    let statuses: HashMap<String, String> = x
        .env
        .pg
        .query("SELECT id, status FROM export_jobs", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(statuses["old-running"], "expired");
    assert_eq!(statuses["young-running"], "exporting");
    assert_eq!(statuses["done-expired"], "completed");
    let notes = x.notifications().await;
    let mut expired_notes: Vec<&str> = notes
        .iter()
        .filter(|m| m["type"] == "export.expired")
        .map(|m| m["jobId"].as_str())
        .collect();
    expired_notes.sort();
    assert_eq!(expired_notes, ["old-queued", "old-running"]);

    // A second sweep finds nothing more to do.
    let again = export::sweep::sweep_once(&exporter, 24 * 3600)
        .await
        .unwrap();
    assert!(again.expired_jobs.is_empty() && again.parts_removed_jobs.is_empty());
    assert!(again.artifacts_removed_jobs.is_empty());
    x.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_killed_mid_way_resumes_to_a_byte_identical_artifact() {
    let x = ExportEnv::new("export_kill").await;
    let total = 200_000i64;
    x.fill(total).await;
    let (part_rows, page_rows) = (10_000u64, 2_000u32);
    let spawn = || x.spawn_worker(part_rows, page_rows, &[]);
    let filters = json!({"from": "2024-03-01", "to": "2024-04-01"});
    let mut child = spawn();
    x.env.wait_for_schema().await;
    x.env
        .add_entries(&[(
            Some("export.audit"),
            request(filters.clone(), "csv", "gzip", "officer"),
        )])
        .await;
    wait_until(Duration::from_secs(30), "job recorded", || async {
        x.env
            .pg
            .query_one("SELECT id FROM export_jobs", &[])
            .await
            .is_ok()
    })
    .await;
    let id: String = x
        .env
        .pg
        .query_one("SELECT id FROM export_jobs", &[])
        .await
        .unwrap()
        .get(0);
    let parts_total = (total as u64).div_ceil(part_rows) as i32;
    wait_until(
        Duration::from_secs(120),
        "a few parts checkpointed",
        || async { x.job(&id).await.get::<_, i32>(5) >= 3 },
    )
    .await;
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    let at_kill: i32 = x.job(&id).await.get(5);
    assert!(
        at_kill < parts_total,
        "killed mid-export ({at_kill} of {parts_total} parts)"
    );
    assert_eq!(x.job(&id).await.get::<_, String>(0), "exporting");

    // Restart: the lease expires, the job resumes from its checkpoint.
    let mut child = spawn();
    x.wait_notified(&id, Duration::from_secs(300)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let resumed = x.artifact_bytes(&id).await;
    let attempts: i32 = x
        .env
        .pg
        .query_one("SELECT attempts FROM export_jobs WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert!(
        attempts >= 2,
        "the job was resumed, not restarted: attempts {attempts}"
    );

    // The same rows exported in one go by the CLI (a separate process).
    let out_dir = x.dir.path().join("cli-out");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_audit-worker"));
    cmd.args([
        "export",
        "--format",
        "csv",
        "--compression",
        "gzip",
        "--from",
        "2024-03-01",
        "--to",
        "2024-04-01",
        "--out",
    ])
    .arg(&out_dir);
    for (k, v) in x.env_vars(part_rows, page_rows) {
        cmd.env(k, v);
    }
    let out = cmd.stderr(Stdio::piped()).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8(out.stdout).unwrap();
    assert!(summary.contains(&format!("rows:     {total}")), "{summary}");
    let files: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    let artifact = files
        .iter()
        .find(|f| f.ends_with(".csv.gz"))
        .unwrap_or_else(|| panic!("{files:?}"));
    assert!(artifact.starts_with("audit-export-20240301T000000Z-20240401T000000Z-"));
    assert_eq!(files.len(), 2, "artifact and manifest only: {files:?}");
    let uninterrupted = std::fs::read(out_dir.join(artifact)).unwrap();
    assert!(
        resumed == uninterrupted,
        "resumed artifact ({} bytes) differs from the uninterrupted one ({} bytes)",
        resumed.len(),
        uninterrupted.len()
    );
    let rows = csv::Reader::from_reader(&decompress(&resumed, "gzip")[..])
        .records()
        .count();
    assert_eq!(rows as i64, total, "every row exactly once");
    x.cleanup().await;
}

/// The local ports of `pid`'s TCP connections to the test database's
/// port, read from /proc (the process's socket inodes, matched in
/// /proc/net/tcp and tcp6), so a test can find that process's backends in
/// `pg_stat_activity.client_port` among every other test's.
fn pg_client_ports(pid: u32) -> Vec<i32> {
    let server: tokio_postgres::Config = test_database_url().parse().unwrap();
    let server_port = server.get_ports().first().copied().unwrap_or(5432);
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    let port = |addr: &str| i32::from_str_radix(addr.rsplit(':').next().unwrap_or(""), 16).ok();
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|line| {
                    let cols: Vec<&str> = line.split_whitespace().collect();
                    let (local, remote, inode) = (cols.get(1)?, cols.get(2)?, cols.get(9)?);
                    (port(remote) == Some(i32::from(server_port)) && inodes.contains(*inode))
                        .then(|| port(local))
                        .flatten()
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_whose_page_query_fails_mid_part_resumes_with_every_row_once() {
    let x = ExportEnv::new("export_pgcancel").await;
    let total = 200_000i64;
    x.fill(total).await;
    let (part_rows, page_rows) = (10_000u64, 1_000u32);
    let mut child = x.spawn_worker(
        part_rows,
        page_rows,
        &[("AUDIT_WORKER__EXPORT__RETRY_DELAY_SECS", "1")],
    );
    x.env.wait_for_schema().await;
    let filters = json!({"from": "2024-03-01", "to": "2024-04-01"});
    x.env
        .add_entries(&[(
            Some("export.audit"),
            request(filters, "csv", "gzip", "officer"),
        )])
        .await;
    let id = || async {
        x.env
            .pg
            .query_opt("SELECT id FROM export_jobs", &[])
            .await
            .unwrap()
            .map(|r| r.get::<_, String>(0))
    };
    wait_until(Duration::from_secs(30), "job recorded", || async {
        id().await.is_some()
    })
    .await;
    let id = id().await.unwrap();
    wait_until(
        Duration::from_secs(120),
        "two parts checkpointed",
        || async { x.job(&id).await.get::<_, i32>(5) >= 2 },
    )
    .await;
    // Cancel the page query while it runs (this worker's only; the page
    // query's text is longer than `pg_stat_activity` keeps, so it is
    // matched by its start). The connection stays usable, so the part's
    // checkpoint would succeed: only the page read fails, and a part cut
    // short by it must fail the attempt, not be recorded as whole.
    let ports = pg_client_ports(child.id());
    assert!(!ports.is_empty(), "the worker's connections to PostgreSQL");
    let failed_attempt = || async {
        x.env
            .pg
            .query_one(
                "SELECT last_error IS NOT NULL OR status <> 'exporting' FROM export_jobs WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    };
    let mut cancels = 0i64;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !failed_attempt().await && std::time::Instant::now() < deadline {
        cancels += x
            .env
            .pg
            .query_one(
                "SELECT count(pg_cancel_backend(pid)) FROM pg_stat_activity \
                 WHERE client_port = ANY($1) AND state = 'active' \
                 AND query LIKE 'SELECT id, event_time, timestamp_raw, %'",
                &[&ports],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(cancels > 0, "a page query was cancelled");

    x.wait_notified(&id, Duration::from_secs(300)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let job = x
        .env
        .pg
        .query_one(
            "SELECT attempts, last_error FROM export_jobs WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let (attempts, last_error): (i32, Option<String>) = (job.get(0), job.get(1));
    assert!(
        attempts >= 2,
        "the failed attempt was retried: attempts {attempts}, last error {last_error:?}"
    );
    // Every row exactly once: the part cut short by the failed page read
    // was not checkpointed as whole.
    let artifact = x.artifact_bytes(&id).await;
    let plain = decompress(&artifact, "gzip");
    let mut reader = csv::Reader::from_reader(&plain[..]);
    let mut ids = std::collections::HashSet::new();
    let mut rows = 0i64;
    for record in reader.records() {
        ids.insert(record.unwrap()[0].to_owned());
        rows += 1;
    }
    assert_eq!(rows, total, "every row");
    assert_eq!(ids.len() as i64, total, "each row once");
    x.cleanup().await;
}

/// A connection of its own to the test's schema, for a transaction that
/// stays open across other work.
async fn session(env: &TestEnv) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&test_database_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!("SET search_path = \"{}\"", env.schema))
        .await
        .unwrap();
    client
}

/// Inserts one row `key` at `at` on `client` (inside its open transaction,
/// if any).
async fn insert_one(client: &tokio_postgres::Client, key: &str, at: &str) {
    client
        .execute(
            "INSERT INTO audit_log (event_time, timestamp_raw, idempotency_key, event_id, action, \
             status, hash, hash_provided, source) \
             VALUES ($2::text::timestamptz, $2, $1, $1, 'record.read', 'success', md5($1) || md5($1), true, 'test')",
            &[&key, &at],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_holds_exactly_the_rows_committed_before_it_was_requested() {
    let x = ExportEnv::new("export_cutoff").await;
    x.fill(300).await;
    // Two batches in flight when the export is requested: their
    // transactions started before it (so their ingested_at is earlier),
    // but they commit after it. One sorts first, one last.
    let first = session(&x.env).await;
    first.batch_execute("BEGIN").await.unwrap();
    insert_one(&first, "in-flight-first", "2024-03-01T00:00:00.000Z").await;
    let last = session(&x.env).await;
    last.batch_execute("BEGIN").await.unwrap();
    insert_one(&last, "in-flight-last", "2024-03-31T23:00:00.000Z").await;

    // One row per page and per part: the export advances slowly, one
    // checkpoint per row.
    let mut config = x.config();
    config.export.page_rows = 1;
    config.export.part_rows = 1;
    let pool = audit_worker::db::connect_pool(&config).await.unwrap();
    let storage = audit_worker::storage::open(&config.storage).unwrap();
    let wake = Arc::new(Notify::new());
    let exporter =
        Arc::new(export::exporter(&config, pool.clone(), storage, None, wake.clone()).unwrap());
    let handler = ExportHandler::new(pool, wake);
    let range = json!({"from": "2024-03-01T00:00:00Z", "to": "2024-04-01"});
    let answer = handler
        .record(&request(range, "ndjson", "none", "officer"), "src-cutoff")
        .await
        .unwrap();
    let id = answer["jobId"].as_str().unwrap().to_owned();

    // The last one commits before the export reaches it, a new row commits
    // after the request, and the first one commits once the export has
    // read past its place.
    last.batch_execute("COMMIT").await.unwrap();
    insert_one(&x.env.pg, "after-request", "2024-03-15T00:00:00.000Z").await;
    let stop = CancellationToken::new();
    let runner = tokio::spawn(exporter.clone().run(stop.clone()));
    wait_until(Duration::from_secs(30), "the export under way", || async {
        x.env
            .pg
            .query_one("SELECT rows_done FROM export_jobs WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get::<_, i64>(0)
            >= 5
    })
    .await;
    first.batch_execute("COMMIT").await.unwrap();
    wait_until(Duration::from_secs(60), "export completed", || async {
        x.job(&id).await.get::<_, String>(0) == "completed"
    })
    .await;
    stop.cancel();
    let _ = runner.await;

    // Exactly the rows committed before the request: the 300 filled ones.
    let got = parse_back(&x.artifact_bytes(&id).await, "ndjson");
    let want = expected(&x.env, "event_id LIKE 'e-%'").await;
    assert_eq!(want.len(), 300);
    assert_eq!(got.len(), 300, "rows in the artifact");
    assert_eq!(got, want);
    assert_eq!(x.job(&id).await.get::<_, Option<i64>>(1), Some(300));
    // The three late rows are stored, just not part of this export.
    let late: i64 = x
        .env
        .pg
        .query_one(
            "SELECT count(*) FROM audit_log WHERE event_id IN ('in-flight-first', 'in-flight-last', 'after-request')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(late, 3);
    x.cleanup().await;
}
