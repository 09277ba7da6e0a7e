//! Compliance reports against real PostgreSQL, Redis, a local-disk object
//! store, Node's BullMQ and headless Chromium. Expected values are computed
//! here with SQL straight from audit_log, independently of the report code.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use audit_worker::config::Config;
use audit_worker::integrity::checkpoint::Ed25519NoteSigner;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::common::*;

const LINK_SECRET: &str = "report-link-secret";
const ORIGIN: &str = "test.example/report-log";
const BREAK_GLASS: [&str; 3] = [
    "emergency.access",
    "break_glass.access",
    "record.break_glass",
];
const FROM: &str = "2024-03-01T00:00:00Z";
const TO: &str = "2024-04-01T00:00:00Z";

/// A test's report world: its TestEnv, a store directory, a signing key.
struct ReportEnv {
    env: TestEnv,
    dir: tempfile::TempDir,
    notifications: String,
    key: String,
}

impl ReportEnv {
    async fn new(test: &str) -> Self {
        let env = TestEnv::new(test).await;
        let notifications = format!("test:{}:notifications", env.name);
        let me = Self {
            env,
            dir: tempfile::tempdir().unwrap(),
            notifications,
            key: Ed25519NoteSigner::generate(ORIGIN)
                .unwrap()
                .to_private_key_string(),
        };
        audit_worker::db::migrate(&me.config()).await.unwrap();
        me
    }

    fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    fn config(&self) -> Config {
        let mut c = self.env.config();
        c.storage.url = self.store_dir().display().to_string();
        c.export.link_secret = LINK_SECRET.to_owned().into();
        c.export.notifications_key = self.notifications.clone();
        c.report.poll_interval_ms = 100;
        c.report.page_rows = 64;
        c.snapshot.origin = ORIGIN.into();
        c.snapshot.signing_key = self.key.clone().into();
        // Only the snapshot the test makes: the schedule would add more.
        c.snapshot.enabled = false;
        c
    }

    fn env_vars(&self) -> Vec<(String, String)> {
        let mut v = self.env.env_vars();
        v.extend([
            (
                "AUDIT_WORKER__STORAGE__URL".into(),
                self.store_dir().display().to_string(),
            ),
            ("AUDIT_WORKER__SNAPSHOT__ORIGIN".into(), ORIGIN.into()),
            (
                "AUDIT_WORKER__SNAPSHOT__SIGNING_KEY".into(),
                self.key.clone(),
            ),
            (
                "AUDIT_WORKER__EXPORT__NOTIFICATIONS_KEY".into(),
                self.notifications.clone(),
            ),
        ]);
        v
    }

    /// 400 events in March 2024 (two organisations; PHI and not; failures,
    /// nights, weekends, break-glass; a principal id that is HTML) and 20 in
    /// February, outside the period. Hashes are canonical hash v1, so the
    /// log verifies once sealed.
    async fn seed(&self) {
        self.env
            .pg
            .batch_execute(
                "SELECT audit_log_ensure_partition('2024-02-01'); \
                 SELECT audit_log_ensure_partition('2024-03-01'); \
                 SELECT audit_log_ensure_partition('2024-04-01');",
            )
            .await
            .unwrap();
        self.env
            .pg
            .batch_execute(
                r#"INSERT INTO audit_log (event_time, timestamp_raw, idempotency_key, event_id, action, status,
                     principal_id, organization_id, target_resource_type, target_resource_id,
                     outcome_description, hash, hash_provided, data_classification, retention_policy, source)
                   SELECT t, raw, key, key, act, st, pr, org, 'Patient', res, 'read ' || g,
                     encode(sha256(convert_to('action:"' || act || '"|organizationId:"' || org
                       || '"|outcomeDescription:"read ' || g || '"|principalId:"' || pr || '"|status:"' || st
                       || '"|targetResourceId:"' || res || '"|targetResourceType:"Patient"|timestamp:"' || raw
                       || '"', 'UTF8')), 'hex'),
                     true, cls, ret, 'test'
                   FROM generate_series(1, 420) g,
                   LATERAL (SELECT CASE WHEN g <= 400
                       THEN timestamptz '2024-03-04 00:00:00+00' + g * interval '97 minutes'
                       ELSE timestamptz '2024-02-10 00:00:00+00' + g * interval '13 minutes' END AS t) a,
                   LATERAL (SELECT to_char(a.t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS raw,
                       'rep-' || g AS key,
                       CASE WHEN g % 23 = 0 THEN 'emergency.access' ELSE 'record.read.' || (g % 4) END AS act,
                       CASE WHEN g % 7 = 0 THEN 'failure' WHEN g % 7 = 1 THEN 'attempt' ELSE 'success' END AS st,
                       CASE WHEN g % 50 = 0 THEN '<img src=x onerror=alert(1)>'
                            ELSE 'user-' || ((g * g) % 13) END AS pr,
                       CASE WHEN g % 2 = 0 THEN 'org-a' ELSE 'org-b' END AS org,
                       'p-' || (g % 17) AS res,
                       CASE WHEN g % 5 < 3 THEN 'PHI' WHEN g % 5 = 3 THEN 'INTERNAL' ELSE 'CONFIDENTIAL' END AS cls,
                       CASE g % 3 WHEN 0 THEN '7y' WHEN 1 THEN '10y' END AS ret) b"#,
            )
            .await
            .unwrap();
    }

    /// Waits until the job is completed and announced; returns its row.
    async fn wait_done(&self, id: &str) -> tokio_postgres::Row {
        let sql = "SELECT status, last_error, notified_at IS NOT NULL, artifacts, manifest_key, \
                   manifest_sha256, completed_at FROM report_jobs WHERE id = $1";
        wait_until(
            Duration::from_secs(60),
            "report completed and announced",
            || async {
                let r = self.env.pg.query_one(sql, &[&id]).await.unwrap();
                let status: String = r.get(0);
                assert_ne!(
                    status,
                    "failed",
                    "report {id} failed: {:?}",
                    r.get::<_, Option<String>>(1)
                );
                r.get::<_, bool>(2)
            },
        )
        .await;
        self.env.pg.query_one(sql, &[&id]).await.unwrap()
    }

    /// The id of the (one) job of `requester`, once recorded.
    async fn job_of(&self, requester: &str) -> String {
        let sql = "SELECT id FROM report_jobs WHERE requester_id = $1";
        wait_until(Duration::from_secs(30), "report job recorded", || async {
            self.env
                .pg
                .query_opt(sql, &[&requester])
                .await
                .unwrap()
                .is_some()
        })
        .await;
        self.env
            .pg
            .query_one(sql, &[&requester])
            .await
            .unwrap()
            .get(0)
    }

    fn file(&self, key: &str) -> Vec<u8> {
        std::fs::read(self.store_dir().join(key)).unwrap()
    }

    /// The stored `audit.report.created` event of a job, once ingested:
    /// (details, outcome description).
    async fn created_event(&self, id: &str) -> (Value, String) {
        let sql = "SELECT details, outcome_description FROM audit_log \
                   WHERE action = 'audit.report.created' AND target_resource_id = $1";
        wait_until(
            Duration::from_secs(30),
            "audit.report.created stored",
            || async { self.env.pg.query_opt(sql, &[&id]).await.unwrap().is_some() },
        )
        .await;
        let rows = self.env.pg.query(sql, &[&id]).await.unwrap();
        assert_eq!(rows.len(), 1, "one audit.report.created event per report");
        (rows[0].get(0), rows[0].get(1))
    }

    async fn notifications(&self) -> Vec<HashMap<String, String>> {
        self.env
            .stream_fields(&self.notifications)
            .await
            .into_iter()
            .map(|f| {
                f.into_iter()
                    .map(|(k, v)| (k, String::from_utf8(v).unwrap()))
                    .collect()
            })
            .collect()
    }

    async fn cleanup(self) {
        let mut conn = self.env.redis_conn().await;
        let _: redis::RedisResult<()> = redis::cmd("DEL")
            .arg(&self.notifications)
            .query_async(&mut conn)
            .await;
        self.env.cleanup().await;
    }
}

fn sha_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Checks the files of a completed job against their recorded digests and
/// the stored `audit.report.created` event; returns the files by format.
async fn check_artifacts(
    x: &ReportEnv,
    id: &str,
    row: &tokio_postgres::Row,
) -> HashMap<String, Vec<u8>> {
    let artifacts: Value = row.get(3);
    let manifest_key: String = row.get(4);
    let manifest_sha: String = row.get(5);
    let manifest_bytes = x.file(&manifest_key);
    assert_eq!(sha_hex(&manifest_bytes), manifest_sha, "manifest digest");
    let manifest: Value = serde_json::from_slice(&manifest_bytes).unwrap();
    assert_eq!(manifest["jobId"], id);
    let (details, outcome) = x.created_event(id).await;
    assert_eq!(details["manifestSha256"], manifest_sha.as_str());
    assert!(outcome.contains(&manifest_sha), "{outcome}");
    let mut files = HashMap::new();
    for (format, a) in artifacts.as_object().unwrap() {
        let bytes = x.file(a["key"].as_str().unwrap());
        let digest = sha_hex(&bytes);
        assert_eq!(a["sha256"], digest.as_str(), "{format} digest");
        assert_eq!(a["sizeBytes"], bytes.len() as u64);
        assert_eq!(manifest["files"][format]["sha256"], digest.as_str());
        assert_eq!(details["artifacts"][format]["sha256"], digest.as_str());
        assert!(
            outcome.contains(&format!("{format} sha256 {digest}")),
            "{outcome}"
        );
        files.insert(format.clone(), bytes);
    }
    files
}

fn request(kind: &str, requester: &str, extra: Value) -> Vec<u8> {
    let mut r = json!({"kind": kind, "from": FROM, "to": TO, "requesterId": requester});
    for (k, v) in extra.as_object().unwrap() {
        r[k] = v.clone();
    }
    r.to_string().into_bytes()
}

/// The HIPAA answers computed with SQL: totals, top 10 principals and
/// after-hours accesses by principal, for `orgs` (None: all).
async fn hipaa_answers(
    pg: &tokio_postgres::Client,
    orgs: Option<Vec<String>>,
) -> (Vec<i64>, Vec<(String, i64)>, Vec<(String, i64)>) {
    let actions: Vec<String> = BREAK_GLASS.iter().map(|s| s.to_string()).collect();
    let covered = "FROM audit_log WHERE event_time >= '2024-03-01' AND event_time < '2024-04-01' \
        AND ($1::text[] IS NULL OR organization_id = ANY($1)) \
        AND (data_classification = 'PHI' OR action = ANY($2))";
    let after = "(extract(isodow FROM event_time AT TIME ZONE 'UTC') > 5 \
        OR (event_time AT TIME ZONE 'UTC')::time < '08:00' OR (event_time AT TIME ZONE 'UTC')::time >= '18:00')";
    let t = pg
        .query_one(
            &format!(
                "SELECT count(*), count(*) FILTER (WHERE data_classification = 'PHI'), \
                 count(*) FILTER (WHERE status = 'failure'), count(*) FILTER (WHERE {after}), \
                 count(*) FILTER (WHERE action = ANY($2)) {covered}"
            ),
            &[&orgs, &actions],
        )
        .await
        .unwrap();
    let totals = (0..5).map(|i| t.get::<_, i64>(i)).collect();
    let pairs = |rows: Vec<tokio_postgres::Row>| -> Vec<(String, i64)> {
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    };
    let top = pairs(
        pg.query(
            &format!("SELECT principal_id, count(*) {covered} GROUP BY 1 ORDER BY 2 DESC, principal_id COLLATE \"C\" LIMIT 10"),
            &[&orgs, &actions],
        )
        .await
        .unwrap(),
    );
    let after_hours = pairs(
        pg.query(
            &format!("SELECT principal_id, count(*) {covered} AND {after} GROUP BY 1 ORDER BY 2 DESC, principal_id COLLATE \"C\""),
            &[&orgs, &actions],
        )
        .await
        .unwrap(),
    );
    (totals, top, after_hours)
}

fn entries(v: &Value) -> Vec<(String, i64)> {
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(e["overcount"], 0, "exact counts: {e}");
            (
                e["key"].as_str().unwrap().to_owned(),
                e["count"].as_i64().unwrap(),
            )
        })
        .collect()
}

fn sorted(mut v: Vec<(String, i64)>) -> Vec<(String, i64)> {
    v.sort();
    v
}

/// Checks a HIPAA report's JSON and CSV against the SQL answers.
async fn check_hipaa(x: &ReportEnv, files: &HashMap<String, Vec<u8>>, orgs: Option<Vec<String>>) {
    let (totals, top, after_hours) = hipaa_answers(&x.env.pg, orgs.clone()).await;
    assert!(
        totals[0] > 50 && totals[2] > 0 && totals[3] > 0 && totals[4] > 0,
        "a dataset that exercises every section: {totals:?}"
    );
    let doc: Value = serde_json::from_slice(&files["json"]).unwrap();
    let r = &doc["report"];
    let t = &r["totals"];
    let got: Vec<i64> = [
        "events",
        "phiAccesses",
        "failedAttempts",
        "afterHours",
        "breakGlass",
    ]
    .iter()
    .map(|k| t[k].as_i64().unwrap())
    .collect();
    assert_eq!(got, totals, "totals");
    assert_eq!(entries(&r["topPrincipals"]), top, "top principals");
    assert_eq!(
        sorted(entries(&r["afterHoursByPrincipal"])),
        sorted(after_hours),
        "after hours"
    );
    // CSV: a header, then exactly the covered rows, in time order.
    let mut csv = csv::Reader::from_reader(&files["csv"][..]);
    let headers = csv.headers().unwrap().clone();
    assert_eq!(headers.get(0), Some("event_time"));
    let org_col = headers.iter().position(|h| h == "organization_id").unwrap();
    let after_col = headers.iter().position(|h| h == "after_hours").unwrap();
    let records: Vec<csv::StringRecord> = csv.records().map(|r| r.unwrap()).collect();
    assert_eq!(records.len() as i64, totals[0], "CSV detail rows");
    let after_rows = records.iter().filter(|r| &r[after_col] == "true").count() as i64;
    assert_eq!(after_rows, totals[3]);
    if let Some(orgs) = &orgs {
        assert!(records
            .iter()
            .all(|r| orgs.iter().any(|o| o == &r[org_col])));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_requests_from_the_stream_match_sql_answers_stay_in_scope_and_are_audited() {
    let x = ReportEnv::new("report_stream").await;
    x.seed().await;
    // Seal everything before April, so the integrity report has a checkpoint.
    let c = x.config();
    let pool = audit_worker::db::connect_pool(&c).await.unwrap();
    let signer = audit_worker::jobs::snapshot::load_signer(&c.snapshot)
        .unwrap()
        .unwrap();
    let storage = audit_worker::storage::open(&c.storage).unwrap();
    let snapshotter =
        audit_worker::jobs::snapshot::Snapshotter::new(&c, pool, signer, storage, None);
    let april: DateTime<Utc> = TO.parse().unwrap();
    snapshotter
        .snapshot_now("test:seal", None, april)
        .await
        .unwrap();

    let worker = InProcessWorker::start(x.config());
    x.env.wait_for_schema().await;
    x.env
        .add_entries(&[
            (
                Some("report.compliance"),
                request("hipaa-audit-trail", "officer-all", json!({})),
            ),
            (
                Some("report.compliance"),
                request(
                    "hipaa-audit-trail",
                    "officer-a",
                    json!({"organizationId": "*", "allowedOrganizations": ["org-a"]}),
                ),
            ),
            (
                Some("report.compliance"),
                request("integrity", "auditor", json!({"formats": ["json", "html"]})),
            ),
            // Outside the requester's scope: dead-lettered with a reason.
            (
                Some("report.compliance"),
                request(
                    "hipaa-audit-trail",
                    "officer-x",
                    json!({"organizationId": "org-b", "allowedOrganizations": ["org-a"]}),
                ),
            ),
        ])
        .await;

    // HIPAA, all organisations.
    let all = x.job_of("officer-all").await;
    let row = x.wait_done(&all).await;
    let files = check_artifacts(&x, &all, &row).await;
    check_hipaa(&x, &files, None).await;
    let html = String::from_utf8(files["html"].clone()).unwrap();
    assert!(
        html.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "principal ids are escaped"
    );
    assert!(!html.contains("<img") && !html.contains("<script"));

    // HIPAA scoped to org-a: nothing of org-b anywhere.
    let scoped = x.job_of("officer-a").await;
    let row = x.wait_done(&scoped).await;
    let files = check_artifacts(&x, &scoped, &row).await;
    check_hipaa(&x, &files, Some(vec!["org-a".into()])).await;
    for (format, bytes) in &files {
        assert!(
            !String::from_utf8_lossy(bytes).contains("org-b"),
            "{format} mentions org-b"
        );
    }

    // Integrity: the checkpoint covering March, every sealed event checked.
    let integrity = x.job_of("auditor").await;
    let row = x.wait_done(&integrity).await;
    let files = check_artifacts(&x, &integrity, &row).await;
    assert!(!files.contains_key("csv"), "only the formats asked for");
    let doc: Value = serde_json::from_slice(&files["json"]).unwrap();
    let r = &doc["report"];
    let (snapshot_id, note, leaves): (i64, String, i64) = {
        let s = x
            .env
            .pg
            .query_one(
                "SELECT s.id, s.checkpoint_note, (SELECT count(*) FROM seal_ledger l WHERE l.snapshot_id = s.id) \
                 FROM snapshots s",
                &[],
            )
            .await
            .unwrap();
        (s.get(0), s.get(1), s.get(2))
    };
    assert_eq!(leaves, 420);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["checkpoints"].as_array().unwrap().len(), 1);
    assert_eq!(r["checkpoints"][0]["snapshotId"], snapshot_id);
    assert_eq!(r["eventsChecked"], leaves);
    assert_eq!(r["eventsInPeriod"], 400);
    assert_eq!(r["unsealedInPeriod"], 0);
    assert_eq!(r["problems"].as_array().unwrap().len(), 0);
    assert_eq!(r["checkedAgainst"], note.as_str());
    assert!(note.starts_with(ORIGIN));

    // The out-of-scope request never became a job.
    wait_until(
        Duration::from_secs(30),
        "scope violation dead-lettered",
        || async {
            x.env.dlq_entries().await.iter().any(|e| {
                e.get("reason").map(|r| r.as_slice()) == Some(b"invalid_report_request".as_slice())
            })
        },
    )
    .await;
    let n: i64 = x
        .env
        .pg
        .query_one(
            "SELECT count(*) FROM report_jobs WHERE requester_id = 'officer-x'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);

    // GDPR over a period that includes the reports just made (recipients).
    let later = (Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    x.env
        .add_entries(&[(
            Some("report.compliance"),
            json!({"kind": "gdpr-processing", "from": FROM, "to": later, "requesterId": "dpo"})
                .to_string()
                .into_bytes(),
        )])
        .await;
    let gdpr = x.job_of("dpo").await;
    let row = x.wait_done(&gdpr).await;
    let completed_at: DateTime<Utc> = row.get(6);
    let files = check_artifacts(&x, &gdpr, &row).await;
    let doc: Value = serde_json::from_slice(&files["json"]).unwrap();
    let r = &doc["report"];
    let group = |expr: &str| {
        let sql = format!(
            "SELECT {expr}, count(*) FROM audit_log WHERE event_time >= '2024-03-01' AND event_time < $1 GROUP BY 1"
        );
        let pg = &x.env.pg;
        async move {
            pg.query(&sql, &[&completed_at])
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
                .collect::<Vec<_>>()
        }
    };
    let actions = group("action").await;
    assert_eq!(
        r["events"].as_i64().unwrap(),
        actions.iter().map(|a| a.1).sum::<i64>()
    );
    assert_eq!(sorted(entries(&r["processingActivities"])), sorted(actions));
    assert_eq!(
        sorted(entries(&r["dataCategories"])),
        sorted(group("coalesce(data_classification, 'UNCLASSIFIED')").await)
    );
    assert_eq!(
        sorted(entries(&r["retentionPolicies"])),
        sorted(group("coalesce(retention_policy, '(none)')").await)
    );
    let recipients: Vec<(String, String)> = r["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["jobId"].as_str().unwrap().to_owned(),
                v["requesterId"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for (id, who) in [
        (&all, "officer-all"),
        (&scoped, "officer-a"),
        (&integrity, "auditor"),
    ] {
        assert!(
            recipients.contains(&(id.clone(), who.to_owned())),
            "{recipients:?}"
        );
    }
    assert_eq!(r["erasures"]["count"], 0);

    // The notification's signed link downloads the HTML; a tampered one is refused.
    let note = x
        .notifications()
        .await
        .into_iter()
        .find(|n| n["jobId"] == gdpr && n["type"] == "report.ready")
        .expect("report.ready notification");
    assert_eq!(note["manifestSha256"], row.get::<_, String>(5));
    let links: Value = serde_json::from_str(&note["downloadLinks"]).unwrap();
    let base = format!("http://127.0.0.1:{}", x.env.http_port);
    let link = links["html"].as_str().unwrap();
    let resp = reqwest::get(format!("{base}{link}")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().to_vec(), files["html"]);
    let tampered = link.replace("/html?", "/json?");
    assert_eq!(
        reqwest::get(format!("{base}{tampered}"))
            .await
            .unwrap()
            .status(),
        403
    );

    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (status, n) in [
        ("accepted", 4),
        ("rejected", 1),
        ("completed", 4),
        ("failed", 0),
    ] {
        let line = format!("audit_worker_jobs_total{{kind=\"report\",status=\"{status}\"}} {n}");
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in:\n{}",
            metrics
                .lines()
                .filter(|l| l.contains("kind=\"report\""))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    worker.stop().await;
    x.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_requested_through_bullmq_completes_with_artifacts_and_its_audit_event() {
    let x = ReportEnv::new("report_bullmq").await;
    x.seed().await;
    let worker = InProcessWorker::start(x.config());
    x.env.wait_for_schema().await;
    let body = String::from_utf8(request(
        "hipaa-audit-trail",
        "officer-bull",
        json!({"organizationId": "org-b"}),
    ))
    .unwrap();
    let out = crate::bullmq::node_json(&x.env, "report.mjs", &[("REPORT", body)]).await;
    assert_eq!(out["state"], "completed", "{out}");
    let id = out["returnvalue"]["jobId"]
        .as_str()
        .unwrap_or_else(|| panic!("the job's return value names the report job: {out}"))
        .to_owned();
    assert_eq!(out["returnvalue"]["deduplicated"], false);
    let source: String = x
        .env
        .pg
        .query_one("SELECT source FROM report_jobs WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        source,
        format!("bullmq:{}:{}", x.env.queue, out["id"].as_str().unwrap())
    );
    let row = x.wait_done(&id).await;
    let files = check_artifacts(&x, &id, &row).await;
    check_hipaa(&x, &files, Some(vec!["org-b".into()])).await;
    worker.stop().await;
    x.cleanup().await;
}

/// Runs headless Chromium on `file` with extra flags; returns (stdout, stderr).
fn chromium(profile: &Path, file: &Path, flags: &[String]) -> (String, String) {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
            &format!("--user-data-dir={}", profile.display()),
        ])
        .args(flags)
        .arg(format!("file://{}", file.display()))
        .stdin(Stdio::null())
        .output()
        .expect("chromium runs (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_cli_writes_html_that_headless_chromium_renders_without_console_errors() {
    let x = ReportEnv::new("report_cli").await;
    x.seed().await;
    let out_dir = x.dir.path().join("out");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_audit-worker"));
    cmd.args([
        "report",
        "--kind",
        "hipaa-audit-trail",
        "--org",
        "org-a",
        "--from",
        FROM,
        "--to",
        TO,
        "--requester",
        "cli-officer",
        "--out",
    ])
    .arg(&out_dir);
    for (k, v) in x.env_vars() {
        cmd.env(k, v);
    }
    let out = cmd.stderr(Stdio::piped()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("completed"), "{stdout}");
    let html_path = stdout
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("html")
                .map(|r| r.trim().split(" (sha256").next().unwrap().to_owned())
        })
        .map(PathBuf::from)
        .expect("the html path is printed");
    assert!(html_path.starts_with(&out_dir), "{}", html_path.display());
    let html = std::fs::read_to_string(&html_path).unwrap();
    assert!(!html.contains("<script"), "no scripts");
    assert!(
        !html.contains("src=\"http") && !html.contains("href=\"http"),
        "no external assets"
    );
    // The CLI's report is announced on the event stream like any other.
    let job: String = x
        .env
        .pg
        .query_one("SELECT id FROM report_jobs WHERE requester_id = 'cli-officer' AND status = 'completed'", &[])
        .await
        .unwrap()
        .get(0);
    let events = x.env.stream_fields(&x.env.stream).await;
    assert!(events
        .iter()
        .any(|e| String::from_utf8_lossy(&e["data"]).contains(&format!("report-created-{job}"))));

    let profile = tempfile::tempdir().unwrap();
    let shot = x.dir.path().join("report.png");
    let (_, log) = chromium(
        profile.path(),
        &html_path,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,3000".into(),
        ],
    );
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(png.len() > 10_000, "a real picture, {} bytes", png.len());
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let (dom, log2) = chromium(profile.path(), &html_path, &["--dump-dom".into()]);
    for l in log.lines().chain(log2.lines()) {
        assert!(!l.contains("CONSOLE"), "console message: {l}");
        assert!(!l.contains("Refused to"), "CSP violation: {l}");
    }
    for heading in [
        "<h1>HIPAA audit trail</h1>",
        "<h2>Top principals</h2>",
        "<h2>Failed access attempts</h2>",
        "<h2>Accesses outside working hours</h2>",
        "<h2>Break-glass actions</h2>",
        "<caption>Top principals</caption>",
        "<caption>PHI accesses by resource</caption>",
    ] {
        assert!(dom.contains(heading), "{heading} missing from the DOM");
    }
    assert!(dom.matches("<svg").count() >= 3, "charts rendered");
    assert!(dom.matches("<table").count() >= 7, "tables rendered");
    assert!(
        dom.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "hostile principal shown as text"
    );
    assert!(!dom.contains("<img"), "no element injected");
    x.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integrity_report_names_tampered_events_and_hides_other_organisations_problems() {
    let x = ReportEnv::new("report_tamper").await;
    x.seed().await;
    let c = x.config();
    let pool = audit_worker::db::connect_pool(&c).await.unwrap();
    let signer = audit_worker::jobs::snapshot::load_signer(&c.snapshot)
        .unwrap()
        .unwrap();
    let storage = audit_worker::storage::open(&c.storage).unwrap();
    let snapshotter = audit_worker::jobs::snapshot::Snapshotter::new(
        &c,
        pool.clone(),
        signer,
        storage.clone(),
        None,
    );
    snapshotter
        .snapshot_now("test:seal", None, TO.parse().unwrap())
        .await
        .unwrap();
    // A superuser rewrites one sealed event of each organisation.
    x.env
        .pg
        .batch_execute(
            "ALTER TABLE audit_log DISABLE TRIGGER audit_log_immutable; \
             UPDATE audit_log SET outcome_description = 'edited' WHERE idempotency_key IN ('rep-2', 'rep-3'); \
             ALTER TABLE audit_log ENABLE TRIGGER audit_log_immutable;",
        )
        .await
        .unwrap();
    // The entry point an HTTP handler uses: create_job, then an executor.
    let reporter = audit_worker::jobs::report::reporter(
        &c,
        pool.clone(),
        storage,
        None,
        std::sync::Arc::new(tokio::sync::Notify::new()),
    )
    .unwrap();
    let mut results = Vec::new();
    for (requester, scope) in [("auditor-all", None), ("auditor-a", Some(vec!["org-a"]))] {
        let mut body = json!({"kind": "integrity", "from": FROM, "to": TO, "requesterId": requester, "formats": ["json", "csv"]});
        if let Some(s) = &scope {
            body["allowedOrganizations"] = json!(s);
        }
        let request =
            audit_worker::jobs::report::ReportRequest::parse(body.to_string().as_bytes()).unwrap();
        let client = pool.get().await.unwrap();
        let created = audit_worker::jobs::report::create_job(
            &**client,
            &request,
            &format!("api:{requester}"),
            "reports",
        )
        .await
        .unwrap();
        assert!(created.created);
        let again = audit_worker::jobs::report::create_job(
            &**client,
            &request,
            &format!("api:{requester}"),
            "reports",
        )
        .await
        .unwrap();
        assert_eq!(
            (again.id.as_str(), again.created),
            (created.id.as_str(), false)
        );
        let job =
            audit_worker::jobs::report::store::claim_job(&**client, &created.id, "test-lease", 60)
                .await
                .unwrap()
                .unwrap();
        drop(client);
        let outcome = reporter
            .run_claimed(job, None, tokio_util::sync::CancellationToken::new())
            .await;
        assert_eq!(outcome, None);
        let row = x.wait_done(&created.id).await;
        let artifacts: Value = row.get(3);
        let doc: Value =
            serde_json::from_slice(&x.file(artifacts["json"]["key"].as_str().unwrap())).unwrap();
        let csv = String::from_utf8(x.file(artifacts["csv"]["key"].as_str().unwrap())).unwrap();
        results.push((doc["report"].clone(), csv));
    }
    let named = |r: &Value| -> Vec<String> {
        let mut v: Vec<String> = r["problems"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                format!(
                    "{}:{}",
                    p["kind"].as_str().unwrap(),
                    p["event"].as_str().unwrap_or("")
                )
            })
            .collect();
        v.sort();
        v
    };
    let (all, all_csv) = &results[0];
    assert_eq!(all["ok"], false);
    // The two rows, and the root they no longer reproduce.
    assert_eq!(
        named(all),
        ["altered:rep-2", "altered:rep-3", "checkpoint:"],
        "{all}"
    );
    assert_eq!(all["problemsOutsideScope"], 0);
    assert!(all_csv.contains("rep-2") && all_csv.contains("rep-3"));
    let (scoped, scoped_csv) = &results[1];
    assert_eq!(scoped["ok"], false);
    assert_eq!(named(scoped), ["altered:rep-2", "checkpoint:"], "{scoped}");
    assert_eq!(scoped["problemsOutsideScope"], 1);
    assert_eq!(scoped["eventsInPeriod"], 200);
    assert!(scoped_csv.contains("rep-2") && !scoped_csv.contains("rep-3"));
    x.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_report_requests_are_limited_to_report_queue_organizations() {
    let x = ReportEnv::new("report_queue_scope").await;
    x.seed().await;
    let mut c = x.config();
    c.report.queue_organizations = vec!["org-a".into()];
    let worker = InProcessWorker::start(c);
    x.env.wait_for_schema().await;
    x.env
        .add_entries(&[
            // No scope of its own: limited to org-a by the setting.
            (
                Some("report.compliance"),
                request("hipaa-audit-trail", "queue-officer", json!({})),
            ),
            // Names an organisation outside the setting: dead-lettered.
            (
                Some("report.compliance"),
                request(
                    "hipaa-audit-trail",
                    "queue-officer-b",
                    json!({"organizationId": "org-b"}),
                ),
            ),
        ])
        .await;

    let job = x.job_of("queue-officer").await;
    let row = x.wait_done(&job).await;
    let files = check_artifacts(&x, &job, &row).await;
    check_hipaa(&x, &files, Some(vec!["org-a".into()])).await;
    for (format, bytes) in &files {
        assert!(
            !String::from_utf8_lossy(bytes).contains("org-b"),
            "{format} mentions org-b"
        );
    }

    wait_until(
        Duration::from_secs(30),
        "the out-of-scope queue request dead-lettered naming the setting",
        || async {
            x.env.dlq_entries().await.iter().any(|e| {
                e.get("reason").map(|r| r.as_slice()) == Some(b"invalid_report_request".as_slice())
                    && e.values()
                        .any(|v| String::from_utf8_lossy(v).contains("report.queue_organizations"))
            })
        },
    )
    .await;
    let n: i64 = x
        .env
        .pg
        .query_one(
            "SELECT count(*) FROM report_jobs WHERE requester_id = 'queue-officer-b'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "no job for the out-of-scope request");
    worker.stop().await;
    x.cleanup().await;
}
