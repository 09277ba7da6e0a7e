//! The compliance HTTP API (/v1) against real PostgreSQL, Redis and a
//! local-disk object store: the API served in-process on a real socket,
//! the export executor running as in the worker, keys made through the
//! library or the real binary, the proof checked by scripts/verify_log.py
//! and the OpenAPI document by schemathesis.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use audit_worker::api::keys::{self, OrgScope, Permission};
use audit_worker::config::Config;
use audit_worker::integrity::checkpoint::Ed25519NoteSigner;
use audit_worker::jobs::export::ExportService;
use audit_worker::jobs::report::ReportService;
use audit_worker::jobs::snapshot::Snapshotter;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::common::*;
use crate::export::ExportEnv;

const ORIGIN: &str = "test.example/api-log";

/// The in-process API over one test's schema and store.
struct ApiEnv {
    x: ExportEnv,
    config: Config,
    base: String,
    http: reqwest::Client,
    pool: deadpool_postgres::Pool,
    shutdown: CancellationToken,
    verifier: String,
    metrics: audit_worker::telemetry::Metrics,
}

/// A response: status, content type, WWW-Authenticate, body.
struct Reply {
    status: u16,
    content_type: String,
    challenge: Option<String>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// Asserts a problem document of `status` and `slug`; returns it.
    fn problem(&self, status: u16, slug: &str) -> Value {
        assert_eq!(
            self.status,
            status,
            "expected {status} {slug}, got {}: {}",
            self.status,
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(self.content_type, "application/problem+json");
        let p = self.json();
        assert_eq!(p["type"], format!("urn:audit-worker:problem:{slug}"), "{p}");
        assert_eq!(p["status"], status);
        assert!(!p["detail"].as_str().unwrap().is_empty());
        p
    }
}

impl ApiEnv {
    /// Starts the API (and, with `executor`, the export executor).
    async fn start(test: &str, executor: bool, tweak: impl FnOnce(&mut Config)) -> Self {
        let x = ExportEnv::new(test).await;
        let signer = Ed25519NoteSigner::generate(ORIGIN).unwrap();
        let mut config = x.config();
        config.api.listen = format!("127.0.0.1:{}", free_port());
        config.snapshot.origin = ORIGIN.into();
        config.snapshot.signing_key = signer.to_private_key_string().into();
        config.report.poll_interval_ms = 100;
        config.gdpr.pseudonym_key = "api-test-pseudonym-key-0123456789".to_string().into();
        config.alerts.stream = format!("{}:alerts", config.stream.key);
        tweak(&mut config);
        let pool = audit_worker::db::connect_pool(&config).await.unwrap();
        let client = audit_worker::source::redis_client(&config.redis).unwrap();
        let redis = audit_worker::source::command_connection(&client, &config.redis)
            .await
            .unwrap();
        let shutdown = CancellationToken::new();
        let metrics = audit_worker::telemetry::Metrics::new();
        let exports =
            ExportService::new(&config, pool.clone(), redis.clone(), metrics.clone(), None)
                .unwrap();
        let reports =
            ReportService::new(&config, pool.clone(), redis, metrics.clone(), None).unwrap();
        if executor {
            let _ = exports.spawn(&config.export, shutdown.clone());
            let _ = reports.spawn(&config, shutdown.clone());
        }
        audit_worker::api::serve(
            &audit_worker::live::LiveConfig::fixed(config.clone()).unwrap(),
            pool.clone(),
            exports.handler.clone(),
            reports.handler.clone(),
            exports.downloads.clone(),
            audit_worker::api::metrics::ApiMetrics::register(&metrics),
            shutdown.clone(),
        )
        .await
        .unwrap();
        Self {
            base: format!("http://{}", config.api.listen),
            x,
            config,
            http: reqwest::Client::new(),
            pool,
            shutdown,
            verifier: signer.verifier().to_string(),
            metrics,
        }
    }

    /// Stores a key; returns its id and token.
    async fn key(&self, name: &str, orgs: &[&str], perms: &[Permission]) -> (String, String) {
        let scope = if orgs == ["*"] {
            OrgScope::All
        } else {
            OrgScope::Only(orgs.iter().map(|s| s.to_string()).collect())
        };
        let client = self.pool.get().await.unwrap();
        let (key, token) = keys::create(
            &**client,
            name,
            scope,
            perms.iter().copied().collect::<BTreeSet<_>>(),
        )
        .await
        .unwrap();
        (key.id, token)
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Reply {
        let mut req = self.http.request(
            reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
            format!("{}{path}", self.base),
        );
        if let Some(t) = token {
            req = req.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let r = req.send().await.unwrap();
        let header = |name| {
            r.headers()
                .get(name)
                .map(|v: &reqwest::header::HeaderValue| v.to_str().unwrap().to_owned())
        };
        let content_type = header(CONTENT_TYPE).unwrap_or_default();
        let challenge = header(WWW_AUTHENTICATE);
        let status = r.status().as_u16();
        Reply {
            status,
            content_type,
            challenge,
            body: r.bytes().await.unwrap().to_vec(),
        }
    }

    async fn wait_status(&self, id: &str, token: &str, want: &str) -> Value {
        let mut last = Value::Null;
        for _ in 0..300 {
            let r = self
                .send("GET", &format!("/v1/exports/{id}"), Some(token), None)
                .await;
            last = r.json();
            if last["status"] == want {
                return last;
            }
            assert!(
                !matches!(last["status"].as_str(), Some("failed" | "expired")),
                "{last}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("export {id} never became {want}: {last}");
    }

    /// Seals everything stored so far into the log.
    async fn seal(&self, source: &str) -> audit_worker::jobs::snapshot::SnapshotSummary {
        let c = &self.config;
        let signer = audit_worker::jobs::snapshot::load_signer(&c.snapshot)
            .unwrap()
            .unwrap();
        let redis_client = audit_worker::source::redis_client(&c.redis).unwrap();
        let redis = audit_worker::source::command_connection(&redis_client, &c.redis)
            .await
            .unwrap();
        let storage = audit_worker::storage::open(&c.storage).unwrap();
        Snapshotter::new(c, self.pool.clone(), signer, storage, Some(redis))
            .snapshot_now(source, None, chrono::Utc::now())
            .await
            .unwrap()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.x.cleanup().await;
    }
}

fn export_body(org: Option<&str>) -> Value {
    let mut filters = json!({"from": "2024-03-01T00:00:00Z", "to": "2024-04-01T00:00:00Z"});
    if let Some(o) = org {
        filters["organizationId"] = json!(o);
    }
    json!({"exportFilters": filters, "format": "ndjson", "compression": "none"})
}

/// A HIPAA report of March 2024, of one organisation or all in scope.
fn report_body(org: Option<&str>) -> Value {
    let mut body = json!({"kind": "hipaa-audit-trail", "from": "2024-03-01T00:00:00Z",
        "to": "2024-04-01T00:00:00Z", "formats": ["json", "csv"]});
    if let Some(o) = org {
        body["organizationId"] = json!(o);
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_authorisation_matrix_covers_every_endpoint() {
    let api = ApiEnv::start("api_matrix", false, |_| {}).await;
    api.x.fill(60).await;
    let all = [Permission::Export, Permission::Proof, Permission::Report];
    let (_, org1) = api.key("org-1 officer", &["org-1"], &all).await;
    let (_, org2) = api.key("org-2 officer", &["org-2"], &all).await;
    let (_, no_perm) = api
        .key("reports only", &["org-1"], &[Permission::Gdpr])
        .await;
    let (revoked_id, revoked) = api.key("leaver", &["*"], &[Permission::Admin]).await;
    {
        let client = api.pool.get().await.unwrap();
        assert!(keys::revoke(&**client, &revoked_id).await.unwrap());
        assert!(!keys::revoke(&**client, &revoked_id).await.unwrap());
    }
    let r = api
        .send("POST", "/v1/exports", Some(&org1), Some(&export_body(None)))
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let job = r.json();
    let id = job["id"].as_str().unwrap().to_owned();
    assert_eq!(job["organizations"], json!(["org-1"]));
    assert!(job["requesterId"]
        .as_str()
        .unwrap()
        .ends_with(":org-1 officer"));
    let r = api
        .send("POST", "/v1/reports", Some(&org1), Some(&report_body(None)))
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let report = r.json();
    let rid = report["id"].as_str().unwrap().to_owned();
    assert_eq!(report["status"], "queued");
    assert_eq!(report["organizations"], json!(["org-1"]));
    // k-6 belongs to org-1 (fill: organisation g % 5).
    let endpoints: Vec<(&str, String, Option<Value>)> = vec![
        (
            "POST",
            "/v1/exports".into(),
            Some(export_body(Some("org-1"))),
        ),
        ("GET", "/v1/exports".into(), None),
        ("GET", format!("/v1/exports/{id}"), None),
        ("POST", format!("/v1/exports/{id}/cancel"), None),
        ("GET", format!("/v1/exports/{id}/download"), None),
        ("GET", "/v1/proofs/k-6".into(), None),
        ("GET", "/v1/checkpoints".into(), None),
        (
            "POST",
            "/v1/reports".into(),
            Some(report_body(Some("org-1"))),
        ),
        ("GET", "/v1/reports".into(), None),
        ("GET", format!("/v1/reports/{rid}"), None),
        ("GET", format!("/v1/reports/{rid}/download/json"), None),
    ];
    let unknown = keys::new_token();
    for (method, path, body) in &endpoints {
        let what = format!("{method} {path}");
        for token in [
            None,
            Some("not-a-key"),
            Some(unknown.as_str()),
            Some(revoked.as_str()),
        ] {
            let r = api.send(method, path, token, body.as_ref()).await;
            r.problem(401, "unauthorized");
            assert!(
                r.challenge.as_deref().unwrap_or("").starts_with("Bearer"),
                "{what}: no Bearer challenge"
            );
        }
        let r = api.send(method, path, Some(&no_perm), body.as_ref()).await;
        let p = r.problem(403, "forbidden");
        assert!(
            p["detail"].as_str().unwrap().contains("permission"),
            "{what}: {p}"
        );
    }
    // Another organisation's key: the job and the event do not exist for it.
    for path in [
        format!("/v1/exports/{id}"),
        format!("/v1/exports/{id}/download"),
        "/v1/proofs/k-6".to_string(),
        format!("/v1/reports/{rid}"),
        format!("/v1/reports/{rid}/download/json"),
        format!("/v1/reports/{rid}/download/csv"),
    ] {
        let theirs = api.send("GET", &path, Some(&org2), None).await;
        let p = theirs.problem(404, "not-found");
        let missing_path = path
            .replace(&id, "00000000-0000-0000-0000-000000000000")
            .replace(&rid, "00000000-0000-0000-0000-000000000000")
            .replace("k-6", "k-none");
        let missing = api.send("GET", &missing_path, Some(&org2), None).await;
        assert_eq!(p, missing.problem(404, "not-found"), "{path}: 404s differ");
    }
    api.send(
        "POST",
        &format!("/v1/exports/{id}/cancel"),
        Some(&org2),
        None,
    )
    .await
    .problem(404, "not-found");
    assert_eq!(
        api.x.job(&id).await.get::<_, String>(0),
        "queued",
        "not cancelled by org-2"
    );
    let p = api
        .send(
            "POST",
            "/v1/exports",
            Some(&org2),
            Some(&export_body(Some("org-1"))),
        )
        .await
        .problem(403, "forbidden");
    assert!(p["detail"].as_str().unwrap().contains("org-1"), "{p}");
    let p = api
        .send(
            "POST",
            "/v1/reports",
            Some(&org2),
            Some(&report_body(Some("org-1"))),
        )
        .await
        .problem(403, "forbidden");
    assert!(p["detail"].as_str().unwrap().contains("org-1"), "{p}");
    let list = api
        .send("GET", "/v1/exports", Some(&org2), None)
        .await
        .json();
    assert_eq!(list["items"], json!([]), "org-2 sees nothing of org-1");
    let list = api
        .send("GET", "/v1/reports", Some(&org2), None)
        .await
        .json();
    assert_eq!(
        list,
        json!({"items": [], "nextCursor": null}),
        "org-2 sees no report of org-1"
    );
    let list = api
        .send("GET", "/v1/reports", Some(&org1), None)
        .await
        .json();
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert_eq!(list["items"][0]["id"], rid);
    let stored: i64 = api
        .x
        .env
        .pg
        .query_one("SELECT count(*) FROM report_jobs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 1, "refused requests recorded no report job");
    // The owner sees it, and the event of its organisation (unsealed yet).
    let list = api
        .send("GET", "/v1/exports", Some(&org1), None)
        .await
        .json();
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert_eq!(list["items"][0]["id"], id);
    api.send("GET", "/v1/proofs/k-6", Some(&org1), None)
        .await
        .problem(409, "not-sealed");
    let checkpoints = api.send("GET", "/v1/checkpoints", Some(&org2), None).await;
    assert_eq!(checkpoints.status, 200);
    assert_eq!(
        checkpoints.json(),
        json!({"latest": null, "snapshots": [], "nextCursor": null})
    );
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_by_an_org_scoped_key_holds_only_its_organisations_rows() {
    let api = ApiEnv::start("api_scope", true, |c| {
        c.export.queue_organizations = vec!["org-3".into()];
    })
    .await;
    api.x.fill(500).await;
    let (_, org1) = api
        .key("org-1", &["org-1", "org-4"], &[Permission::Export])
        .await;
    let (_, admin) = api.key("admin", &["*"], &[Permission::Admin]).await;
    // No organisation filter: the key's scope still bounds the artifact.
    let r = api
        .send("POST", "/v1/exports", Some(&org1), Some(&export_body(None)))
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let job = api.wait_status(&id, &org1, "completed").await;
    let expected: i64 = api
        .x
        .env
        .pg
        .query_one(
            "SELECT count(*) FROM audit_log WHERE organization_id IN ('org-1', 'org-4')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(expected, 200);
    assert_eq!(job["rowCount"], expected);
    assert_eq!(job["download"], format!("/v1/exports/{id}/download"));
    let file = api
        .send(
            "GET",
            &format!("/v1/exports/{id}/download"),
            Some(&org1),
            None,
        )
        .await;
    assert_eq!(file.status, 200);
    assert_eq!(file.content_type, "application/x-ndjson");
    let text = String::from_utf8(file.body).unwrap();
    let orgs: BTreeSet<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["organization_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(text.lines().count() as i64, expected);
    assert_eq!(
        orgs,
        BTreeSet::from(["org-1".to_string(), "org-4".to_string()])
    );
    // The admin (all organisations) sees the job; the artifact is the same.
    let list = api
        .send("GET", "/v1/exports", Some(&admin), None)
        .await
        .json();
    assert!(list["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|j| j["id"] == id));

    // Queue requests are bound by export.queue_organizations the same way.
    let handler = audit_worker::jobs::export::ExportHandler::new(
        api.pool.clone(),
        Arc::new(tokio::sync::Notify::new()),
    )
    .with_queue_scope(api.config.export.queue_scope());
    let queued = handler
        .record(
            &crate::export::request(
                json!({"from": "2024-03-01", "to": "2024-04-01"}),
                "ndjson",
                "none",
                "queue-user",
            ),
            "test:queue-1",
        )
        .await
        .unwrap();
    let qid = queued["jobId"].as_str().unwrap().to_owned();
    let qjob = api.wait_status(&qid, &admin, "completed").await;
    assert_eq!(qjob["organizations"], json!(["org-3"]));
    assert_eq!(qjob["rowCount"], 100);
    let qfile = api
        .send(
            "GET",
            &format!("/v1/exports/{qid}/download"),
            Some(&admin),
            None,
        )
        .await;
    let text = String::from_utf8(qfile.body).unwrap();
    assert_eq!(text.lines().count(), 100);
    assert!(text
        .lines()
        .all(|l| l.contains("\"organization_id\":\"org-3\"")));
    // The org-1 key does not see the org-3 job.
    api.send("GET", &format!("/v1/exports/{qid}"), Some(&org1), None)
        .await
        .problem(404, "not-found");
    let refused = handler
        .record(
            &crate::export::request(
                json!({"from": "2024-03-01", "to": "2024-04-01", "organizationId": "org-1"}),
                "csv",
                "gzip",
                "queue-user",
            ),
            "test:queue-2",
        )
        .await
        .unwrap_err();
    assert!(
        format!("{refused:?}").contains("export.queue_organizations"),
        "{refused:?}"
    );
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_in_progress_export_answers_409_with_the_existing_id_until_cancelled() {
    // No executor: the first job stays queued.
    let api = ApiEnv::start("api_dup", false, |_| {}).await;
    let (_, key) = api.key("officer", &["org-1"], &[Permission::Export]).await;
    let body = export_body(Some("org-1"));
    let first = api
        .send("POST", "/v1/exports", Some(&key), Some(&body))
        .await;
    assert_eq!(first.status, 201);
    let id = first.json()["id"].as_str().unwrap().to_owned();
    // The same request, keys in another order and the date spelled otherwise.
    let same = json!({"compression": "none", "format": "ndjson",
        "exportFilters": {"organizationId": "org-1", "to": "2024-04-01", "from": "2024-03-01"}});
    let dup = api
        .send("POST", "/v1/exports", Some(&key), Some(&same))
        .await;
    let p = dup.problem(409, "duplicate-export");
    assert_eq!(p["jobId"], id);
    api.send(
        "GET",
        &format!("/v1/exports/{id}/download"),
        Some(&key),
        None,
    )
    .await
    .problem(409, "conflict");
    let cancelled = api
        .send(
            "POST",
            &format!("/v1/exports/{id}/cancel"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(cancelled.status, 200);
    assert_eq!(cancelled.json()["status"], "cancelled");
    assert!(cancelled.json()["error"]
        .as_str()
        .unwrap()
        .contains("cancelled by api-key:"));
    api.send(
        "POST",
        &format!("/v1/exports/{id}/cancel"),
        Some(&key),
        None,
    )
    .await
    .problem(409, "conflict");
    let again = api
        .send("POST", "/v1/exports", Some(&key), Some(&body))
        .await;
    assert_eq!(again.status, 201);
    assert_ne!(again.json()["id"], id);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_by_an_org_scoped_key_holds_only_its_organisation_and_duplicates_answer_409() {
    // No executor at first: the job stays queued for the duplicate.
    let api = ApiEnv::start("api_report", false, |_| {}).await;
    api.x.fill(500).await;
    let (_, key) = api
        .key("privacy officer", &["org-1"], &[Permission::Report])
        .await;
    let (_, admin) = api.key("admin", &["*"], &[Permission::Admin]).await;
    // No organisation asked for: the key's scope bounds the report.
    let first = api
        .send("POST", "/v1/reports", Some(&key), Some(&report_body(None)))
        .await;
    assert_eq!(
        first.status,
        201,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    let job = first.json();
    let id = job["id"].as_str().unwrap().to_owned();
    assert_eq!(job["status"], "queued");
    assert_eq!(job["kind"], "hipaa-audit-trail");
    assert_eq!(job["organizationId"], Value::Null);
    assert_eq!(job["organizations"], json!(["org-1"]));
    assert_eq!(job["formats"], json!(["json", "csv"]));
    assert_eq!(job["from"], "2024-03-01T00:00:00Z");
    assert_eq!(job["to"], "2024-04-01T00:00:00Z");
    assert_eq!(job["artifacts"], json!([]));
    assert!(job["requesterId"]
        .as_str()
        .unwrap()
        .ends_with(":privacy officer"));
    // The same request, keys and formats in another order, dates spelled
    // otherwise: 409 with the job in progress.
    let same = json!({"formats": ["csv", "json"], "to": "2024-04-01", "from": "2024-03-01",
        "kind": "hipaa-audit-trail"});
    let p = api
        .send("POST", "/v1/reports", Some(&key), Some(&same))
        .await
        .problem(409, "duplicate-report");
    assert_eq!(p["jobId"], id);
    assert!(p["detail"].as_str().unwrap().contains(&id), "{p}");
    api.send(
        "GET",
        &format!("/v1/reports/{id}/download/json"),
        Some(&key),
        None,
    )
    .await
    .problem(409, "conflict");
    // The worker's report executor runs it.
    let client = audit_worker::source::redis_client(&api.config.redis).unwrap();
    let redis = audit_worker::source::command_connection(&client, &api.config.redis)
        .await
        .unwrap();
    let reports = ReportService::new(
        &api.config,
        api.pool.clone(),
        redis,
        api.metrics.clone(),
        None,
    )
    .unwrap();
    let _ = reports.spawn(&api.config, api.shutdown.clone());
    let mut job = Value::Null;
    for _ in 0..300 {
        job = api
            .send("GET", &format!("/v1/reports/{id}"), Some(&key), None)
            .await
            .json();
        if job["status"] == "completed" {
            break;
        }
        assert_ne!(job["status"], "failed", "{job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(job["status"], "completed", "{job}");
    // The HIPAA trail covers PHI and break-glass events (fill has no
    // break-glass actions): org-1's PHI events of March, counted here.
    let expected: i64 = api
        .x
        .env
        .pg
        .query_one(
            "SELECT count(*) FROM audit_log WHERE organization_id = 'org-1' \
             AND data_classification = 'PHI' \
             AND event_time >= '2024-03-01' AND event_time < '2024-04-01'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(expected, 25);
    assert_eq!(job["rowsScanned"], expected);
    assert_eq!(job["error"], Value::Null);
    assert_eq!(job["manifestSha256"].as_str().unwrap().len(), 64);
    let artifacts = job["artifacts"].as_array().unwrap();
    assert_eq!(
        artifacts
            .iter()
            .map(|a| a["format"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["json", "csv"]
    );
    let mut files = std::collections::HashMap::new();
    for (a, content_type) in artifacts
        .iter()
        .zip(["application/json", "text/csv; charset=utf-8"])
    {
        let format = a["format"].as_str().unwrap();
        assert_eq!(a["download"], format!("/v1/reports/{id}/download/{format}"));
        let file = api
            .send("GET", a["download"].as_str().unwrap(), Some(&key), None)
            .await;
        assert_eq!(file.status, 200, "{format}");
        assert_eq!(file.content_type, content_type);
        assert_eq!(a["sizeBytes"], file.body.len());
        assert_eq!(
            a["sha256"],
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&file.body)),
            "{format}: digest"
        );
        let text = String::from_utf8(file.body).unwrap();
        for other in ["org-0", "org-2", "org-3", "org-4"] {
            assert!(!text.contains(other), "{format} names {other}");
        }
        files.insert(format, text);
    }
    // Not asked for: no such file.
    let p = api
        .send(
            "GET",
            &format!("/v1/reports/{id}/download/html"),
            Some(&key),
            None,
        )
        .await
        .problem(404, "not-found");
    assert!(p["detail"].as_str().unwrap().contains("json, csv"), "{p}");
    let doc: Value = serde_json::from_str(&files["json"]).unwrap();
    assert_eq!(doc["jobId"], id);
    assert_eq!(doc["allowedOrganizations"], json!(["org-1"]));
    assert_eq!(doc["rowsScanned"], expected);
    // Every CSV row is one of org-1's PHI events, as many as SQL counts.
    let csv = files["csv"].trim_start_matches('\u{feff}');
    let mut lines = csv.lines().map(|l| l.trim_end_matches('\r'));
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let org_col = header.iter().position(|c| *c == "organization_id").unwrap();
    let rows: Vec<Vec<&str>> = lines
        .filter(|l| !l.is_empty())
        .map(|l| l.split(',').collect())
        .collect();
    assert!(!rows.is_empty());
    assert!(rows.iter().all(|r| r[org_col] == "org-1"), "{csv}");
    assert_eq!(rows.len() as i64, expected);
    assert!(
        rows.iter().all(|r| r[header.len() - 4] == "true"),
        "all PHI"
    );
    // Finished: the same request makes a new job.
    let again = api
        .send("POST", "/v1/reports", Some(&key), Some(&same))
        .await;
    assert_eq!(again.status, 201);
    assert_ne!(again.json()["id"], id);
    // Paging: newest first, a cursor to the next page.
    let page = api
        .send("GET", "/v1/reports?limit=1", Some(&admin), None)
        .await
        .json();
    assert_eq!(page["items"][0]["id"], again.json()["id"]);
    let next = page["nextCursor"].as_str().unwrap();
    let page = api
        .send(
            "GET",
            &format!("/v1/reports?limit=1&cursor={next}"),
            Some(&admin),
            None,
        )
        .await
        .json();
    assert_eq!(page["items"][0]["id"], id);
    assert_eq!(page["nextCursor"], Value::Null);
    // Counted by route template: two created, one duplicate.
    let metrics = api.metrics.render();
    for line in [
        "audit_worker_api_requests_total{operation=\"POST /v1/reports\",status=\"201\"} 2",
        "audit_worker_api_requests_total{operation=\"POST /v1/reports\",status=\"409\"} 1",
        "audit_worker_api_requests_total{operation=\"GET /v1/reports/{id}/download/{format}\",status=\"200\"} 2",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} missing");
    }
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_problem_documents_including_the_routers_and_extractors() {
    let api = ApiEnv::start("api_problems", false, |c| c.api.max_body_bytes = 4096).await;
    let (_, key) = api.key("officer", &["*"], &[Permission::Admin]).await;
    api.send("GET", "/v1/nothing-here", Some(&key), None)
        .await
        .problem(404, "not-found");
    assert!(api
        .metrics
        .render()
        .lines()
        .any(|l| l == "audit_worker_api_requests_total{operation=\"unmatched\",status=\"404\"} 1"));
    api.send("DELETE", "/v1/exports", Some(&key), None)
        .await
        .problem(405, "method-not-allowed");
    let huge = json!({"exportFilters": {"from": "2024-03-01", "to": "2024-04-01",
        "actions": vec!["x".repeat(100); 100]}, "format": "csv"});
    api.send("POST", "/v1/exports", Some(&key), Some(&huge))
        .await
        .problem(413, "payload-too-large");
    let p = api
        .send("POST", "/v1/exports", Some(&key), Some(&json!({"exportFilters": {"from": "2024-05-01", "to": "2024-04-01"}, "format": "csv"})))
        .await
        .problem(422, "invalid-request");
    assert!(
        p["detail"].as_str().unwrap().contains("must be before"),
        "{p}"
    );
    let p = api
        .send("POST", "/v1/exports", Some(&key), Some(&json!({"exportFilters": {"from": "2024-03-01", "to": "2024-04-01"}, "format": "xml"})))
        .await
        .problem(422, "invalid-request");
    assert!(p["detail"].as_str().unwrap().contains("format"), "{p}");
    let raw = api
        .http
        .post(format!("{}/v1/exports", api.base))
        .header(AUTHORIZATION, format!("Bearer {key}"))
        .header(CONTENT_TYPE, "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status().as_u16(), 415);
    assert_eq!(raw.headers()[CONTENT_TYPE], "application/problem+json");
    api.send("GET", "/v1/exports?limit=0", Some(&key), None)
        .await
        .problem(422, "invalid-request");
    api.send("GET", "/v1/exports?limit=abc", Some(&key), None)
        .await
        .problem(400, "invalid-request");
    api.send("GET", "/v1/checkpoints?cursor=abc", Some(&key), None)
        .await
        .problem(422, "invalid-request");
    let doc = api.send("GET", "/v1/openapi.json", None, None).await;
    assert_eq!(doc.status, 200);
    assert!(doc.json()["openapi"].as_str().unwrap().starts_with("3.1"));
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_access_through_the_api_needs_gdpr_stays_in_the_keys_organisations_and_is_proven() {
    let api = ApiEnv::start("api_gdpr", true, |_| {}).await;
    api.x.fill(300).await;
    api.seal("test:api-gdpr").await;
    let (_, dpo) = api.key("dpo org-2", &["org-2"], &[Permission::Gdpr]).await;
    let (_, other_dpo) = api.key("dpo org-1", &["org-1"], &[Permission::Gdpr]).await;
    let (_, exporter) = api.key("exports", &["*"], &[Permission::Export]).await;
    // user-7 acts in rows 7, 107, 207 (org-2); p-7 is a target elsewhere.
    let body = json!({"subjectId": "user-7", "compression": "none"});
    // Without the gdpr permission, outside the key's organisations, or
    // without a subject: refused.
    for (token, refused, status, slug) in [
        (&exporter, body.clone(), 403, "forbidden"),
        (
            &dpo,
            json!({"subjectId": "user-7", "organizationId": "org-1"}),
            403,
            "forbidden",
        ),
        (
            &dpo,
            json!({"subjectId": "", "format": "ndjson"}),
            422,
            "invalid-request",
        ),
    ] {
        api.send(
            "POST",
            "/v1/gdpr/access-requests",
            Some(token),
            Some(&refused),
        )
        .await
        .problem(status, slug);
    }
    let r = api
        .send("POST", "/v1/gdpr/access-requests", Some(&dpo), Some(&body))
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let job = r.json();
    let id = job["id"].as_str().unwrap().to_owned();
    assert_eq!(job["organizations"], json!(["org-2"]));
    assert_eq!(job["filters"]["subject"]["id"], "user-7");
    // Neither another organisation's DPO nor the export API sees it.
    for (path, token) in [
        (format!("/v1/gdpr/access-requests/{id}"), &other_dpo),
        (format!("/v1/gdpr/access-requests/{id}/proofs"), &other_dpo),
        (format!("/v1/exports/{id}"), &exporter),
        (format!("/v1/exports/{id}/download"), &exporter),
    ] {
        api.send("GET", &path, Some(token), None)
            .await
            .problem(404, "not-found");
    }
    let listed = api
        .send("GET", "/v1/exports", Some(&exporter), None)
        .await
        .json();
    assert!(!listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|j| j["id"] == id.as_str()));
    let listed = api
        .send("GET", "/v1/gdpr/access-requests", Some(&dpo), None)
        .await
        .json();
    assert_eq!(listed["items"][0]["id"], id.as_str());
    let mut done = Value::Null;
    for _ in 0..300 {
        done = api
            .send(
                "GET",
                &format!("/v1/gdpr/access-requests/{id}"),
                Some(&dpo),
                None,
            )
            .await
            .json();
        if done["status"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["proofs"],
        format!("/v1/gdpr/access-requests/{id}/proofs")
    );
    let export = api
        .send(
            "GET",
            &format!("/v1/gdpr/access-requests/{id}/download"),
            Some(&dpo),
            None,
        )
        .await;
    assert_eq!(export.status, 200);
    let proofs = api
        .send(
            "GET",
            &format!("/v1/gdpr/access-requests/{id}/proofs"),
            Some(&dpo),
            None,
        )
        .await;
    assert_eq!(proofs.status, 200);
    assert_eq!(proofs.content_type, "application/x-ndjson");
    // Exactly the subject's events of org-2, by an independent query.
    let exported: BTreeSet<String> = String::from_utf8_lossy(&export.body)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["idempotency_key"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let expected: BTreeSet<String> = api
        .x
        .env
        .column(
            "SELECT idempotency_key FROM audit_log
              WHERE (principal_id = 'user-7' OR target_resource_id = 'user-7')
                AND organization_id = 'org-2'",
        )
        .await;
    assert_eq!(exported, expected);
    assert_eq!(expected.len(), 3);
    let dir = tempfile::tempdir().unwrap();
    let (export_file, proofs_file) = (dir.path().join("x.ndjson"), dir.path().join("p.ndjson"));
    std::fs::write(&export_file, &export.body).unwrap();
    std::fs::write(&proofs_file, &proofs.body).unwrap();
    let out = Command::new("python3")
        .arg("scripts/verify_log.py")
        .args([
            "--key",
            &api.verifier,
            "--origin",
            ORIGIN,
            "--require-proofs",
            "--export",
        ])
        .arg(&export_file)
        .arg("--proofs")
        .arg(&proofs_file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("3 proofs verified"), "{stdout}");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proof_from_the_api_verifies_with_the_independent_python_verifier() {
    let api = ApiEnv::start("api_proof", false, |_| {}).await;
    api.x.fill(40).await;
    let (_, key) = api.key("auditor", &["org-1"], &[Permission::Proof]).await;
    api.send("GET", "/v1/proofs/k-6", Some(&key), None)
        .await
        .problem(409, "not-sealed");
    // Seal everything stored so far.
    let summary = api.seal("test:api-proof").await;
    let r = api.send("GET", "/v1/proofs/k-6", Some(&key), None).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let body = r.json();
    assert_eq!(body["sealed"], true);
    assert_eq!(body["event"]["idempotency_key"], "k-6");
    assert_eq!(body["event"]["organization_id"], "org-1");
    let proof = &body["proof"];
    assert_eq!(proof["treeSize"], 40);
    assert_eq!(proof["event"], "k-6");
    assert_eq!(body["event"]["leaf_index"], proof["leafIndex"]);
    let dir = tempfile::tempdir().unwrap();
    let proof_file = dir.path().join("proof.json");
    let export_file = dir.path().join("event.ndjson");
    std::fs::write(&proof_file, proof.to_string()).unwrap();
    std::fs::write(&export_file, format!("{}\n", body["event"])).unwrap();
    let verify = |proofs: &std::path::Path| {
        Command::new("python3")
            .arg("scripts/verify_log.py")
            .args(["--key", &api.verifier, "--origin", ORIGIN, "--proofs"])
            .arg(proofs)
            .arg("--export")
            .arg(&export_file)
            .output()
            .unwrap()
    };
    let out = verify(&proof_file);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("OK"));
    // One changed node of the audit path fails the same check.
    let mut bad = proof.clone();
    let node = bad["inclusionProof"][0].as_str().unwrap().to_owned();
    let flipped = format!(
        "{}{}",
        if node.starts_with('0') { "1" } else { "0" },
        &node[1..]
    );
    bad["inclusionProof"][0] = json!(flipped);
    let bad_file = dir.path().join("bad.json");
    std::fs::write(&bad_file, bad.to_string()).unwrap();
    let out = verify(&bad_file);
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The checkpoint list shows the same signed head.
    let cps = api
        .send("GET", "/v1/checkpoints", Some(&key), None)
        .await
        .json();
    assert_eq!(cps["latest"], proof["checkpoint"]);
    assert_eq!(cps["snapshots"][0]["snapshotId"], summary.snapshot_id);
    assert_eq!(cps["snapshots"][0]["treeSize"], 40);
    assert_eq!(cps["snapshots"][0]["checkpoint"], proof["checkpoint"]);
    // An org-1 key cannot prove an org-2 event (k-7), sealed or not.
    api.send("GET", "/v1/proofs/k-7", Some(&key), None)
        .await
        .problem(404, "not-found");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_wrong_with_the_live_api() {
    let api = ApiEnv::start("api_schemathesis", true, |_| {}).await;
    api.x.fill(20).await;
    let (_, key) = api.key("fuzzer", &["*"], &[Permission::Admin]).await;
    let st = std::env::var("SCHEMATHESIS").unwrap_or_else(|_| "st".into());
    // tests/schemathesis.toml: the one rule the schema cannot state
    // (exportFilters.from before .to) lets POST /v1/exports answer 422 to
    // schema-valid bodies.
    let out = tokio::process::Command::new(&st)
        .args(["--no-color", "--config-file", "tests/schemathesis.toml"])
        .args(["run", &format!("{}/v1/openapi.json", api.base)])
        .args(["--checks", "all"])
        .args(["--header", &format!("Authorization: Bearer {key}")])
        // One worker: hypothesis parses lambda sources with ast.parse, which
        // CPython 3.11 does not make safe across threads ("AST constructor
        // recursion depth mismatch" at random under --workers 2).
        .args(["--max-examples", "15", "--workers", "1", "--max-time", "60"])
        .args(["--request-timeout", "10"])
        .env("SCHEMATHESIS_HOOKS", "")
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {st} ({e}): scripts/test.sh installs schemathesis"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis failed:\n{text}");
    // Every operation was exercised (a run that tested nothing passes too).
    assert!(
        text.contains("Selected: 24/24") && text.contains("Tested: 24"),
        "{text}"
    );
    assert!(!text.contains(&key), "the key leaked into the report");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_cli_creates_lists_and_revokes_and_bootstrap_file_keys_work() {
    let run = |env: &[(String, String)], args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_audit-worker"));
        cmd.args(args).envs(env.iter().cloned());
        cmd.output().unwrap()
    };
    // A bootstrap key: --file-entry stores nothing, it prints the token and
    // the entry for api.keys_file (with the hash only).
    let entry = run(
        &[],
        &[
            "api-key",
            "create",
            "--name",
            "boot",
            "--all-orgs",
            "--permission",
            "admin",
            "--file-entry",
        ],
    );
    assert!(
        entry.status.success(),
        "{}",
        String::from_utf8_lossy(&entry.stderr)
    );
    let entry = String::from_utf8(entry.stdout).unwrap();
    let boot_token = entry.lines().next().unwrap().to_owned();
    assert!(keys::well_formed(&boot_token), "{boot_token}");
    let keys_file = tempfile::NamedTempFile::new().unwrap();
    let toml = &entry[entry.find("[[keys]]").unwrap()..];
    assert!(!toml.contains(&boot_token));
    assert!(toml.contains(&hex::encode(keys::token_hash(&boot_token))));
    std::fs::write(keys_file.path(), toml).unwrap();
    let path = keys_file.path().display().to_string();
    let api = ApiEnv::start("api_cli", false, |c| c.api.keys_file = path.clone()).await;
    let mut env = api.x.env_vars(100, 50);
    env.push(("AUDIT_WORKER__API__KEYS_FILE".into(), path.clone()));
    let cli = |args: &[&str]| run(&env, args);

    let out = cli(&[
        "api-key",
        "create",
        "--name",
        "Ada (audit)",
        "--org",
        "org-1",
        "--org",
        "org-2",
        "--permission",
        "export",
        "--permission",
        "proof",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(keys::well_formed(&token), "{token}");
    let out = cli(&[
        "api-key",
        "create",
        "--name",
        "Bob",
        "--org",
        "org-1",
        "--permission",
        "export",
    ]);
    let bob = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let listed = cli(&["api-key", "list"]);
    assert!(listed.status.success());
    let listed = String::from_utf8(listed.stdout).unwrap();
    let ada_line = listed
        .lines()
        .find(|l| l.contains("Ada (audit)"))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(
        ada_line.contains("org-1,org-2") && ada_line.contains("export,proof"),
        "{ada_line}"
    );
    assert!(
        ada_line.trim_end().ends_with(" -"),
        "not revoked yet: {ada_line}"
    );
    assert!(
        !listed.contains(&token[4..]) && !listed.contains(&bob[4..]),
        "list printed a token"
    );
    assert!(
        listed.contains("plus 1 bootstrap key(s) from api.keys_file"),
        "{listed}"
    );
    let ada = ada_line.split_whitespace().next().unwrap().to_owned();
    // Bad invocations say what to do.
    let bad = cli(&[
        "api-key",
        "create",
        "--name",
        "x",
        "--org",
        "a",
        "--all-orgs",
        "--permission",
        "export",
    ]);
    assert!(!bad.status.success());
    let bad = cli(&[
        "api-key",
        "create",
        "--name",
        "x",
        "--all-orgs",
        "--permission",
        "root",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown permission \"root\""));

    // The keys work against the API with their permissions.
    assert_eq!(
        api.send("GET", "/v1/exports", Some(&token), None)
            .await
            .status,
        200
    );
    assert_eq!(
        api.send("GET", "/v1/checkpoints", Some(&token), None)
            .await
            .status,
        200
    );
    api.send("GET", "/v1/checkpoints", Some(&bob), None)
        .await
        .problem(403, "forbidden");
    assert_eq!(
        api.send("GET", "/v1/checkpoints", Some(&boot_token), None)
            .await
            .status,
        200
    );

    let revoked = cli(&["api-key", "revoke", &ada]);
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    api.send("GET", "/v1/exports", Some(&token), None)
        .await
        .problem(401, "unauthorized");
    assert_eq!(
        api.send("GET", "/v1/exports", Some(&bob), None)
            .await
            .status,
        200
    );
    let again = cli(&["api-key", "revoke", &ada]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("api-key list"));
    // The worker's database role reads keys but cannot mint or revoke them.
    let privileges = api
        .x
        .env
        .pg
        .query_one(
            "SELECT has_table_privilege('audit_worker_writer', 'api_keys', 'SELECT'), \
                    has_table_privilege('audit_worker_writer', 'api_keys', 'INSERT'), \
                    has_table_privilege('audit_worker_writer', 'api_keys', 'UPDATE'), \
                    has_table_privilege('audit_worker_reader', 'api_keys', 'SELECT')",
            &[],
        )
        .await
        .unwrap();
    let privileges: (bool, bool, bool, bool) = (
        privileges.get(0),
        privileges.get(1),
        privileges.get(2),
        privileges.get(3),
    );
    assert_eq!(privileges, (true, false, false, false));
    let listed = String::from_utf8(cli(&["api-key", "list"]).stdout).unwrap();
    let line = listed.lines().find(|l| l.starts_with(&ada)).unwrap();
    assert!(
        !line.trim_end().ends_with(" -"),
        "revocation time listed: {line}"
    );
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_process_serves_the_api_on_its_own_port_and_scopes_queue_exports() {
    let x = ExportEnv::new("api_process").await;
    x.fill(100).await;
    let api_port = free_port();
    let config = x.config();
    let pool = audit_worker::db::connect_pool(&config).await.unwrap();
    let (_, admin) = {
        let client = pool.get().await.unwrap();
        let (k, t) = keys::create(
            &**client,
            "admin",
            OrgScope::All,
            BTreeSet::from([Permission::Admin]),
        )
        .await
        .unwrap();
        (k.id, t)
    };
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_audit-worker"));
    cmd.arg("run")
        .envs(x.env_vars(1000, 500))
        .env("AUDIT_WORKER__API__LISTEN", format!("127.0.0.1:{api_port}"))
        .env("AUDIT_WORKER__EXPORT__QUEUE_ORGANIZATIONS", "[\"org-2\"]")
        .env("AUDIT_WORKER__LOG__LEVEL", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(log.reopen().unwrap());
    let mut worker = cmd.spawn().unwrap();
    let base = format!("http://127.0.0.1:{api_port}");
    let http = reqwest::Client::new();
    wait_until(Duration::from_secs(30), "the API answers", || async {
        http.get(format!("{base}/v1/openapi.json"))
            .send()
            .await
            .is_ok()
    })
    .await;
    let unauth = http.get(format!("{base}/v1/exports")).send().await.unwrap();
    assert_eq!(unauth.status().as_u16(), 401);
    // The API is not on the health port, and the health port not on the API's.
    let (code, _) = http_status(x.env.http_port, "/healthz").await.unwrap();
    assert_eq!(code, 200);
    let on_health = reqwest::get(format!("http://127.0.0.1:{}/v1/exports", x.env.http_port))
        .await
        .unwrap();
    assert_eq!(on_health.status().as_u16(), 404);
    // A queue request without an organisation filter: the worker's
    // export.queue_organizations bounds what it exports.
    x.env
        .add_entries(&[(
            Some("export.audit"),
            crate::export::request(
                json!({"from": "2024-03-01", "to": "2024-04-01"}),
                "ndjson",
                "none",
                "queue-user",
            ),
        )])
        .await;
    let mut job = Value::Null;
    for _ in 0..300 {
        let list: Value = http
            .get(format!("{base}/v1/exports"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        job = list["items"].get(0).cloned().unwrap_or(Value::Null);
        if job["status"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["organizations"], json!(["org-2"]));
    assert_eq!(job["requesterId"], "queue-user");
    assert_eq!(job["rowCount"], 20);
    let text = http
        .get(format!("{base}{}", job["download"].as_str().unwrap()))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(text.lines().count(), 20);
    assert!(
        text.lines()
            .all(|l| l.contains("\"organization_id\":\"org-2\"")),
        "{text}"
    );
    terminate(&mut worker);
    x.cleanup().await;
}
