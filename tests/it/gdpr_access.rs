//! Subject access (`gdpr.access`): the export holds exactly the subject's
//! events, checked against an independent SQL query, and each sealed
//! event's inclusion proof verifies with the independent verifier.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::bullmq::node_json;
use crate::common::*;
use crate::log_v2::{metric, LogEnv, ORIGIN};

const SUBJECT: &str = "subj-42";

/// Events about the subject in every place it can appear (actor, target,
/// the configured details and sessionContext paths), and events that only
/// look like it (another key, a longer id, the id as a non-string).
fn subject_events(tag: &str) -> Vec<Value> {
    let base = |id: String, extra: Value| {
        let mut e = json!({
            "eventId": format!("{tag}-{id}"),
            "timestamp": ts(0),
            "action": "record.read",
            "status": "success",
            "principalId": "someone-else",
            "organizationId": "org-g",
            "targetResourceType": "Patient",
            "targetResourceId": "p-1",
        });
        for (k, v) in extra.as_object().unwrap() {
            e[k] = v.clone();
        }
        e
    };
    let mut events = Vec::new();
    for i in 0..4 {
        events.push(base(format!("actor-{i}"), json!({"principalId": SUBJECT})));
        events.push(base(
            format!("target-{i}"),
            json!({"targetResourceId": SUBJECT}),
        ));
        events.push(base(format!("details-{i}"), json!({"patientRef": SUBJECT})));
        events.push(base(
            format!("session-{i}"),
            json!({"sessionContext": {"userId": SUBJECT, "ipAddress": "10.9.9.9"}}),
        ));
        events.push(base(format!("other-key-{i}"), json!({"note": SUBJECT})));
        events.push(base(
            format!("longer-{i}"),
            json!({"principalId": "subj-420"}),
        ));
        events.push(base(format!("number-{i}"), json!({"patientRef": 42})));
        events.push(base(format!("nobody-{i}"), json!({})));
    }
    events
}

/// The subject's events by an independent query: the definition in the
/// README, written out in SQL.
async fn subject_keys_by_sql(env: &TestEnv) -> BTreeSet<String> {
    env.pg
        .query(
            "SELECT idempotency_key FROM audit_log
              WHERE principal_id = $1 OR target_resource_id = $1
                 OR details->>'patientRef' = $1 OR session_context->>'userId' = $1",
            &[&SUBJECT],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn ndjson_keys(path: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let row: Value = serde_json::from_str(l).unwrap();
            row["idempotency_key"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// Runs scripts/verify_log.py over an export and its proofs, requiring a
/// proof for every sealed exported event.
fn independent_verifier(s: &LogEnv, export: &Path, proofs: &Path) -> Value {
    s.verify_log_py(&[
        "--export".as_ref(),
        export.as_os_str(),
        "--proofs".as_ref(),
        proofs.as_os_str(),
        "--require-proofs".as_ref(),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_access_exports_exactly_the_subjects_events_with_valid_proofs() {
    let s = LogEnv::new("gdpr_access").await;
    let paths = vec![
        "details.patientRef".to_string(),
        "sessionContext.userId".to_string(),
    ];
    s.ingest(&subject_events("a"), |_| {}).await;
    let sealed = s.seal("first").await;
    // Two more of the subject's events after sealing: exported, not proven.
    let late: Vec<Value> = subject_events("b")
        .into_iter()
        .filter(|e| {
            let id = e["eventId"].as_str().unwrap();
            id == "b-actor-0" || id == "b-details-1"
        })
        .collect();
    s.ingest(&late, |_| {}).await;
    let expected = subject_keys_by_sql(&s.env).await;
    assert_eq!(expected.len(), 16 + 2);

    // Through the queue: a `gdpr.access` message to a running worker.
    let mut c = s.worker_config();
    c.gdpr.subject_paths = paths.clone();
    let worker = InProcessWorker::start(c);
    let request = json!({"subjectId": SUBJECT, "requesterId": "dpo-1", "compression": "none"});
    s.env
        .add_entries(&[(Some("gdpr.access"), request.to_string().into_bytes())])
        .await;
    let completed = "SELECT artifact_key, filters FROM export_jobs
                      WHERE filters ? 'subject' AND status = 'completed' AND requester_id = 'dpo-1'";
    wait_until(
        Duration::from_secs(120),
        "the access request completed",
        || async { s.env.pg.query_opt(completed, &[]).await.unwrap().is_some() },
    )
    .await;
    // The same kind through BullMQ (Node's own Queue.add), by another
    // requester so it is a job of its own.
    let dir = tempfile::tempdir().unwrap();
    let jobs_file = dir.path().join("jobs.json");
    let bullmq_request = json!({"subjectId": SUBJECT, "requesterId": "dpo-2", "format": "csv"});
    std::fs::write(
        &jobs_file,
        json!([{"label": "access", "name": "gdpr.access", "json": bullmq_request.to_string()}])
            .to_string(),
    )
    .unwrap();
    let r = node_json(
        &s.env,
        "outcomes.mjs",
        &[
            ("SCENARIO", "hostile".into()),
            ("HOSTILE_FILE", jobs_file.display().to_string()),
        ],
    )
    .await;
    assert_eq!(r["jobs"][0]["state"], "completed", "{r}");
    let done = "SELECT count(*), min(row_count), max(row_count) FROM export_jobs
                 WHERE filters ? 'subject' AND status = 'completed'";
    wait_until(
        Duration::from_secs(120),
        "both access requests completed",
        || async {
            s.env
                .pg
                .query_one(done, &[])
                .await
                .unwrap()
                .get::<_, i64>(0)
                == 2
        },
    )
    .await;
    let counts = s.env.pg.query_one(done, &[]).await.unwrap();
    assert_eq!(
        (
            counts.get::<_, Option<i64>>(1),
            counts.get::<_, Option<i64>>(2)
        ),
        (Some(18), Some(18)),
        "both requests exported the subject's 18 events"
    );
    // Counted as its own job kind, accepted then completed.
    let port = s.env.http_port;
    for status in ["accepted", "completed"] {
        // One request from each source.
        let name = format!("audit_worker_jobs_total{{kind=\"gdpr_access\",status=\"{status}\"}}");
        wait_until(Duration::from_secs(10), &name, || async {
            metric(port, &name).await == Some(2.0)
        })
        .await;
    }
    worker.stop().await;
    let row = s.env.pg.query_one(completed, &[]).await.unwrap();
    let (key, filters): (String, Value) = (row.get(0), row.get(1));
    assert_eq!(
        filters["subject"],
        json!({"id": SUBJECT, "paths": paths}),
        "the paths are fixed in the job"
    );
    let dir = s.storage.path();
    let artifact = dir.join(&key);
    let proofs = dir.join(format!("{key}.proofs.ndjson"));
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{key}.manifest.json"))).unwrap())
            .unwrap();

    // Exactly the subject's events, by the independent query.
    assert_eq!(ndjson_keys(&artifact), expected);
    // Every sealed one proven, the two late ones listed as not yet sealed.
    let summary = independent_verifier(&s, &artifact, &proofs);
    assert_eq!(summary["proofsChecked"], 16, "{summary}");
    assert_eq!(summary["leavesRecomputed"], 16, "{summary}");
    assert_eq!(summary["exportRows"], 18, "{summary}");
    assert_eq!(summary["size"], json!(sealed.tree_size));
    let inclusion = &manifest["inclusionProofs"];
    assert_eq!(inclusion["proofs"], 16, "{manifest}");
    assert_eq!(inclusion["checkpointTreeSize"], json!(sealed.tree_size));
    let unsealed: BTreeSet<&str> = inclusion["notYetSealed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["event"].as_str().unwrap())
        .collect();
    assert_eq!(unsealed, BTreeSet::from(["b-actor-0", "b-details-1"]));
    let proofs_sha = sha256_hex(&std::fs::read(&proofs).unwrap());
    assert_eq!(inclusion["sha256"], json!(proofs_sha));

    // A proof whose leaf does not match the exported record is refused.
    let text = std::fs::read_to_string(&proofs).unwrap();
    let mut lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first_index = lines[0]["leafIndex"].clone();
    lines[0]["leafIndex"] = lines[1]["leafIndex"].clone();
    lines[1]["leafIndex"] = first_index;
    let swapped = dir.join("swapped.proofs.ndjson");
    std::fs::write(
        &swapped,
        lines
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    let out = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/verify_log.py"
        ))
        .args(["--key", &s.verifier, "--origin", ORIGIN])
        .arg("--export")
        .arg(&artifact)
        .arg("--proofs")
        .arg(&swapped)
        .output()
        .unwrap();
    assert!(!out.status.success(), "swapped proofs must fail");

    // The CLI runs the same request in-process into a directory.
    let out_dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_audit-worker"));
    cmd.args([
        "gdpr",
        "access",
        "--subject",
        SUBJECT,
        "--compression",
        "none",
    ])
    .arg("--out")
    .arg(out_dir.path())
    .env(
        "AUDIT_WORKER__GDPR__SUBJECT_PATHS",
        "[\"details.patientRef\", \"sessionContext.userId\"]",
    );
    for (k, v) in s.env.env_vars() {
        cmd.env(k, v);
    }
    let result = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&result.stdout).to_string();
    assert!(
        result.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let line = |label: &str| -> PathBuf {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .map(|p| PathBuf::from(p.trim()))
            .unwrap_or_else(|| panic!("{label} in {stdout}"))
    };
    let cli_artifact = line("path:");
    let cli_proofs = line("proofs:");
    assert_eq!(ndjson_keys(&cli_artifact), expected);
    assert_eq!(
        independent_verifier(&s, &cli_artifact, &cli_proofs)["proofsChecked"],
        16
    );
    s.env.cleanup().await;
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}
