//! The `ocsf` and `parquet` export formats through the real executor,
//! PostgreSQL, Redis and a local-disk object store; Parquet files are read
//! back by an independent implementation (pyarrow, tests/parquet_reader.py).

use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use audit_worker::config::Config;
use audit_worker::jobs::export::format::{Cell, ExportRow, COLUMNS, SELECT_LIST};
use audit_worker::jobs::export::{self, executor::Exporter, ExportHandler};
use audit_worker::jobs::JobError;
use chrono::SecondsFormat;
use serde_json::{json, Value};
use sha2::Digest;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::common::*;
use crate::export::{request, ExportEnv};

/// Actions beyond the filled `record.read.N` ones, with the OCSF class and
/// activity the default `export.ocsf.class_map` gives them.
const ACTIONS: [(&str, i64, i64); 12] = [
    ("auth.login", 3002, 1),
    ("auth.logout", 3002, 2),
    ("portal.login", 3002, 1),
    ("login", 3002, 1),
    ("user.create", 3001, 1),
    ("account.disable", 3001, 5),
    ("admin.permission.grant", 3001, 7),
    ("org.role.revoke", 3001, 8),
    ("patient.update", 6003, 3),
    ("invoice.delete", 6003, 4),
    ("record.create", 6003, 1),
    ("record.frobnicate", 6003, 99),
];

/// The export columns OCSF maps to attributes (all others are `unmapped`).
const OCSF_MAPPED: [&str; 7] = [
    "event_time",
    "timestamp",
    "event_id",
    "status",
    "principal_id",
    "outcome_description",
    "correlation_id",
];

/// The export columns holding JSON text.
const JSON_COLUMNS: [&str; 7] = [
    "session_context",
    "details",
    "hash_provided",
    "salts",
    "leaf_index",
    "leaf_version",
    "erased_commitments",
];

fn config(x: &ExportEnv) -> Config {
    let mut c = x.config();
    // 70-row parts of 25-row row groups: 25, 25, 20 per part.
    c.export.parquet_row_group_rows = 25;
    c
}

fn store_dir(c: &Config) -> std::path::PathBuf {
    std::path::PathBuf::from(&c.storage.url)
}

async fn exporter(c: &Config) -> (Arc<Exporter>, ExportHandler) {
    let pool = audit_worker::db::connect_pool(c).await.unwrap();
    let client = audit_worker::source::redis_client(&c.redis).unwrap();
    let redis = audit_worker::source::command_connection(&client, &c.redis)
        .await
        .unwrap();
    let storage = audit_worker::storage::open(&c.storage).unwrap();
    let wake = Arc::new(Notify::new());
    let exporter = export::exporter(c, pool.clone(), storage, Some(redis), wake.clone()).unwrap();
    (Arc::new(exporter), ExportHandler::new(pool, wake))
}

/// Adds one row per [`ACTIONS`] entry, with a session IP and a
/// correlation id.
async fn add_action_rows(env: &TestEnv) {
    for (i, (action, _, _)) in ACTIONS.iter().enumerate() {
        let at = format!("2024-03-10T00:00:{i:02}.000Z");
        let key = format!("act-{i}");
        env.pg
            .execute(
                "INSERT INTO audit_log (event_time, timestamp_raw, idempotency_key, event_id, action, \
                 status, principal_id, target_resource_type, target_resource_id, hash, hash_provided, \
                 session_context, correlation_id, source) \
                 VALUES ($1::text::timestamptz, $1, $2, $2, $3, 'failure', 'admin-1', 'User', 'u-9', \
                 md5($2) || md5($2), true, '{\"ipAddress\": \"192.0.2.7\"}'::jsonb, 'corr-1', 'test')",
                &[&at, &key, action],
            )
            .await
            .unwrap();
    }
}

/// Every exported column of the rows matching `where_sql` in March 2024,
/// straight from the database, as the export writes them: id a number,
/// times RFC 3339 with microseconds, text and JSON text as strings.
async fn expected(env: &TestEnv, where_sql: &str) -> Vec<BTreeMap<String, Value>> {
    let sql = format!(
        "SELECT {SELECT_LIST} FROM audit_log WHERE event_time >= '2024-03-01' \
         AND event_time < '2024-04-01' AND {where_sql} ORDER BY event_time, id"
    );
    let rows = env.pg.query(&sql, &[]).await.unwrap();
    rows.iter()
        .map(|r| {
            let row = ExportRow::from_pg(r).unwrap();
            COLUMNS
                .iter()
                .zip(row.cells.iter())
                .map(|(name, cell)| {
                    let v = match cell {
                        Cell::Int(i) => json!(i),
                        Cell::Time(t) => json!(t.to_rfc3339_opts(SecondsFormat::Micros, true)),
                        Cell::Text(v) | Cell::Json(v) => json!(v),
                    };
                    ((*name).to_owned(), v)
                })
                .collect()
        })
        .collect()
}

/// Reads a Parquet file with pyarrow.
fn read_parquet(path: &std::path::Path) -> Value {
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/parquet_reader.py"
        ))
        .arg(path)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "tests/parquet_reader.py failed (scripts/test.sh installs pyarrow): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Nests dotted column names back into objects and parses the JSON
/// columns, giving the event the NDJSON format writes (nulls left out).
fn unflatten(row: &Value) -> Value {
    let mut event = json!({});
    for (k, v) in row.as_object().unwrap() {
        if v.is_null() {
            continue;
        }
        let v = if k == "resources" || k == "unmapped" {
            serde_json::from_str(v.as_str().unwrap()).unwrap()
        } else {
            v.clone()
        };
        let mut at = &mut event;
        let path: Vec<&str> = k.split('.').collect();
        for p in &path[..path.len() - 1] {
            at = at
                .as_object_mut()
                .unwrap()
                .entry(p.to_string())
                .or_insert(json!({}));
        }
        at[path[path.len() - 1]] = v;
    }
    event
}

/// Checks one OCSF event against the OCSF 1.x required attributes of its
/// class, the default class map, and the database row it came from.
fn check_ocsf(e: &Value, want: &BTreeMap<String, Value>) {
    let action = want["action"].as_str().unwrap();
    let (class, activity) = ACTIONS
        .iter()
        .find(|(a, _, _)| *a == action)
        .map(|(_, c, a)| (*c, *a))
        .unwrap_or_else(|| {
            assert!(action.starts_with("record.read."), "{action}");
            (6003, 2)
        });
    let ctx = format!("{action}: {e}");
    assert_eq!(e["class_uid"], class, "{ctx}");
    assert_eq!(e["activity_id"], activity, "{ctx}");
    assert_eq!(e["category_uid"], class / 1000, "{ctx}");
    assert_eq!(e["type_uid"], class * 100 + activity, "{ctx}");
    assert!(e["class_name"].is_string() && e["activity_name"].is_string());
    let severity = e["severity_id"].as_i64().unwrap();
    assert!((0..=6).contains(&severity) || severity == 99, "{ctx}");
    assert!(e["metadata"]["version"].as_str().unwrap().starts_with("1."));
    assert_eq!(e["metadata"]["product"]["name"], "audit-worker");
    assert_eq!(e["metadata"]["product"]["vendor_name"], "audit-worker");
    // The row itself.
    let event_time = chrono::DateTime::parse_from_rfc3339(want["event_time"].as_str().unwrap())
        .unwrap()
        .timestamp_millis();
    assert_eq!(e["time"], event_time, "{ctx}");
    assert_eq!(e["metadata"]["uid"], want["event_id"], "{ctx}");
    assert_eq!(e["metadata"]["original_time"], want["timestamp"], "{ctx}");
    if !want["correlation_id"].is_null() {
        assert_eq!(e["metadata"]["correlation_uid"], want["correlation_id"]);
    }
    let (status_id, status) = match want["status"].as_str().unwrap() {
        "success" => (1, "Success"),
        "failure" => (2, "Failure"),
        other => (99, other),
    };
    assert_eq!(
        (
            e["status_id"].as_i64().unwrap(),
            e["status"].as_str().unwrap()
        ),
        (status_id, status)
    );
    assert_eq!(e["message"], want["outcome_description"], "{ctx}");
    match want["principal_id"].as_str() {
        Some(p) => assert_eq!(e["actor"]["user"]["uid"], p, "{ctx}"),
        None => assert_eq!(e["actor"]["user"]["type_id"], 0, "{ctx}"),
    }
    let ip = want["session_context"]
        .as_str()
        .map(|s| serde_json::from_str::<Value>(s).unwrap()["ipAddress"].clone());
    match ip {
        Some(Value::String(ip)) => assert_eq!(e["src_endpoint"]["ip"], ip, "{ctx}"),
        _ => assert!(e["src_endpoint"].is_object(), "{ctx}"),
    }
    match class {
        6003 => {
            assert_eq!(e["api"]["operation"], action, "{ctx}");
            assert_eq!(e["resources"][0]["uid"], want["target_resource_id"]);
        }
        3002 => {
            assert!(e["user"].is_object(), "{ctx}");
            assert!(e["service"]["name"].is_string(), "{ctx}");
        }
        _ => assert_eq!(e["user"]["uid"], want["target_resource_id"], "{ctx}"),
    }
    // Nothing lost: every other column is in `unmapped`, same value.
    let unmapped = e["unmapped"].as_object().unwrap();
    assert_eq!(unmapped.len(), COLUMNS.len() - OCSF_MAPPED.len(), "{ctx}");
    for name in COLUMNS.iter().filter(|c| !OCSF_MAPPED.contains(c)) {
        let w = match &want[*name] {
            // JSON columns are nested values in OCSF.
            Value::String(s) if JSON_COLUMNS.contains(name) => serde_json::from_str(s).unwrap(),
            w => w.clone(),
        };
        assert_eq!(unmapped[*name], w, "{ctx}: unmapped.{name}");
    }
}

fn decompress_gzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn parquet_request(filters: Value, schema: Option<&str>) -> Vec<u8> {
    let mut r = json!({"exportFilters": filters, "format": "parquet", "requesterId": "officer"});
    if let Some(s) = schema {
        r["parquetSchema"] = json!(s);
    }
    r.to_string().into_bytes()
}

/// The job's artifact key, rows, parts and sha256.
async fn job(env: &TestEnv, id: &str) -> (String, i64, i32, String) {
    let r = env
        .pg
        .query_one(
            "SELECT artifact_key, row_count, parts_done, sha256 FROM export_jobs WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ocsf_and_parquet_exports_read_back_to_exactly_the_seeded_rows() {
    let x = ExportEnv::new("export_ocsf_parquet").await;
    x.fill(400).await;
    add_action_rows(&x.env).await;
    let c = config(&x);
    let (exporter, handler) = exporter(&c).await;
    let stop = CancellationToken::new();
    let runner = tokio::spawn(exporter.clone().run(stop.clone()));
    let range = json!({"from": "2024-03-01T00:00:00Z", "to": "2024-04-01"});
    let all = expected(&x.env, "true").await;
    assert_eq!(all.len(), 412);

    // Outer compression does not apply to parquet: refused, with the fix.
    match handler
        .record(
            &request(range.clone(), "parquet", "gzip", "officer"),
            "s-bad",
        )
        .await
    {
        Err(JobError::Rejected(r)) => {
            assert_eq!(r.reason.code(), "invalid_export_request");
            assert!(
                r.message
                    .contains("leave compression out or set it to \"none\""),
                "{}",
                r.message
            );
        }
        other => panic!("expected a rejection, got {other:?}"),
    }

    let submit = |payload: Vec<u8>, source: &'static str| {
        let handler = &handler;
        async move {
            let answer = handler.record(&payload, source).await.unwrap();
            answer["jobId"].as_str().unwrap().to_owned()
        }
    };
    let ocsf_id = submit(request(range.clone(), "ocsf", "gzip", "officer"), "s-ocsf").await;
    let cols_id = submit(parquet_request(range.clone(), None), "s-parquet").await;
    let pocsf_id = submit(
        parquet_request(range.clone(), Some("ocsf")),
        "s-parquet-ocsf",
    )
    .await;
    let filtered = json!({"from": "2024-03-01", "to": "2024-04-01", "organizationId": "org-2", "status": "success"});
    let filtered_id = submit(
        parquet_request(filtered, Some("columns")),
        "s-parquet-filtered",
    )
    .await;
    let empty_id = submit(
        parquet_request(json!({"from": "2030-01-01", "to": "2030-02-01"}), None),
        "s-parquet-empty",
    )
    .await;
    for id in [&ocsf_id, &cols_id, &pocsf_id, &filtered_id, &empty_id] {
        x.wait_notified(id, Duration::from_secs(90)).await;
    }
    let store = store_dir(&c);

    // ocsf: one valid event per row, in order, class per the default map.
    let (key, rows, _, _) = job(&x.env, &ocsf_id).await;
    assert!(key.ends_with(".ocsf.ndjson.gz"), "{key}");
    assert_eq!(rows, 412);
    let plain = decompress_gzip(&std::fs::read(store.join(&key)).unwrap());
    let events: Vec<Value> = std::str::from_utf8(&plain)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), all.len());
    for (e, want) in events.iter().zip(&all) {
        check_ocsf(e, want);
    }
    let classes: std::collections::BTreeSet<i64> = events
        .iter()
        .map(|e| e["class_uid"].as_i64().unwrap())
        .collect();
    assert_eq!(classes.into_iter().collect::<Vec<_>>(), [3001, 3002, 6003]);

    // parquet, columns: every column of every row, as pyarrow reads it.
    let (key, rows, parts, sha) = job(&x.env, &cols_id).await;
    assert!(key.ends_with(".parquet"), "{key}");
    assert_eq!((rows, parts), (412, 6));
    let bytes = std::fs::read(store.join(&key)).unwrap();
    assert_eq!(hex::encode(sha2::Sha256::digest(&bytes)), sha);
    let file = read_parquet(&store.join(&key));
    assert_eq!(file["num_rows"], 412);
    // Parts of 70 rows (the last 62), row groups of at most 25.
    let mut groups = Vec::new();
    for part in [70, 70, 70, 70, 70, 62] {
        let mut left = part;
        while left > 0 {
            groups.push(left.min(25));
            left -= left.min(25);
        }
    }
    assert_eq!(file["row_groups"], json!(groups));
    let names: Vec<&str> = file["schema"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f[0].as_str().unwrap())
        .collect();
    assert_eq!(names, COLUMNS.to_vec());
    assert_eq!(file["schema"][0][1], "int64");
    assert_eq!(file["schema"][1][1], "timestamp[us, tz=UTC]");
    let got: Vec<BTreeMap<String, Value>> = serde_json::from_value(file["rows"].clone()).unwrap();
    assert_eq!(got.len(), all.len());
    assert_eq!(got, all, "every column of every row");
    // The manifest describes it.
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(store.join(format!("{key}.manifest.json"))).unwrap())
            .unwrap();
    assert_eq!(manifest["format"], "parquet");
    assert_eq!(manifest["compression"], "none");
    assert_eq!(manifest["rows"], 412);
    assert_eq!(manifest["sizeBytes"], bytes.len());
    assert_eq!(manifest["sha256"], sha);
    assert_eq!(manifest["columns"], json!(COLUMNS));

    // parquet, filtered: exactly the matching rows.
    let (key, _, _, _) = job(&x.env, &filtered_id).await;
    let want = expected(&x.env, "organization_id = 'org-2' AND status = 'success'").await;
    assert!(!want.is_empty());
    let got: Vec<BTreeMap<String, Value>> =
        serde_json::from_value(read_parquet(&store.join(&key))["rows"].clone()).unwrap();
    assert_eq!(got, want);

    // parquet, ocsf schema: the same events, flattened.
    let (key, rows, _, _) = job(&x.env, &pocsf_id).await;
    assert_eq!(rows, 412);
    let file = read_parquet(&store.join(&key));
    assert_eq!(file["num_rows"], 412);
    let flat = file["rows"].as_array().unwrap();
    for ((row, want), e) in flat.iter().zip(&all).zip(&events) {
        let nested = unflatten(row);
        check_ocsf(&nested, want);
        assert_eq!(&nested, e, "the flattened event is the NDJSON one");
    }
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(store.join(format!("{key}.manifest.json"))).unwrap())
            .unwrap();
    assert_eq!(manifest["format"], "parquet-ocsf");
    assert_eq!(manifest["ocsfVersion"], "1.1.0");

    // No matching rows: a valid Parquet file with the schema and no rows.
    let (key, rows, parts, _) = job(&x.env, &empty_id).await;
    assert_eq!((rows, parts), (0, 0));
    let file = read_parquet(&store.join(&key));
    assert_eq!(file["num_rows"], 0);
    assert_eq!(file["schema"].as_array().unwrap().len(), COLUMNS.len());

    // Notified like any export, with a signed link; parts removed.
    let notes = x.notifications().await;
    for (id, kind) in [
        (&ocsf_id, "export.ready"),
        (&cols_id, "export.ready"),
        (&pocsf_id, "export.ready"),
        (&filtered_id, "export.ready"),
        (&empty_id, "export.no_results"),
    ] {
        let n = notes.iter().find(|m| &m["jobId"] == id).unwrap();
        assert_eq!(n["type"], kind);
        assert!(n["downloadLink"].starts_with(&format!("/exports/{id}/download?expires=")));
    }
    let parts_left = walk(&store)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("/parts/"))
        .count();
    assert_eq!(parts_left, 0);
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
async fn a_parquet_export_killed_mid_way_resumes_to_a_byte_identical_file() {
    let x = ExportEnv::new("export_parquet_kill").await;
    let total = 60_000i64;
    x.fill(total).await;
    let (part_rows, page_rows) = (4_000u64, 1_000u32);
    let row_groups = [("AUDIT_WORKER__EXPORT__PARQUET_ROW_GROUP_ROWS", "1500")];
    let spawn = || x.spawn_worker(part_rows, page_rows, &row_groups);
    let filters = json!({"from": "2024-03-01", "to": "2024-04-01"});
    let mut child = spawn();
    x.env.wait_for_schema().await;
    x.env
        .add_entries(&[(
            Some("export.audit"),
            request(filters.clone(), "parquet", "none", "officer"),
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
    let store = store_dir(&x.config());
    let (key, rows, parts, _) = job(&x.env, &id).await;
    assert_eq!((rows, parts), (total, parts_total));
    let attempts: i32 = x
        .env
        .pg
        .query_one("SELECT attempts FROM export_jobs WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert!(attempts >= 2, "resumed, not restarted: attempts {attempts}");
    let resumed = std::fs::read(store.join(&key)).unwrap();

    // The same rows exported in one go by the CLI (a separate process).
    let out_dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_audit-worker"));
    cmd.args([
        "export",
        "--format",
        "parquet",
        "--from",
        "2024-03-01",
        "--to",
        "2024-04-01",
        "--out",
    ])
    .arg(out_dir.path());
    for (k, v) in x.env_vars(part_rows, page_rows) {
        cmd.env(k, v);
    }
    for (k, v) in row_groups {
        cmd.env(k, v);
    }
    let out = cmd.stderr(Stdio::piped()).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let artifact = std::fs::read_dir(out_dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".parquet"))
        .expect("the CLI wrote a .parquet file");
    let uninterrupted = std::fs::read(&artifact).unwrap();
    assert!(
        resumed == uninterrupted,
        "resumed artifact ({} bytes) differs from the uninterrupted one ({} bytes)",
        resumed.len(),
        uninterrupted.len()
    );
    // Every row exactly once, in order, per pyarrow.
    let file = read_parquet(&store.join(&key));
    assert_eq!(file["num_rows"], total);
    let groups = file["row_groups"].as_array().unwrap();
    assert_eq!(
        groups.len() as i32,
        parts_total * 3,
        "1500 + 1500 + 1000 per part"
    );
    let ids: Vec<i64> = file["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect();
    let want: Vec<i64> = x
        .env
        .column(
            "SELECT id FROM audit_log WHERE event_time >= '2024-03-01' \
             AND event_time < '2024-04-01' ORDER BY event_time, id",
        )
        .await;
    assert_eq!(ids.len(), want.len());
    assert!(ids == want, "every row exactly once, in export order");
    x.cleanup().await;
}
