//! GDPR erasure end to end and legal holds: real PostgreSQL, Redis and the
//! object store (a local directory), the real ingest path, sealing,
//! `verify`, proofs and the independent Python verifier.

use std::collections::BTreeSet;
use std::time::Duration;

use audit_worker::config::{Config, RuleConfig};
use audit_worker::jobs::gdpr::erase::{EraseError, EraseRequest, Eraser};
use audit_worker::jobs::verify::{self, FindingKind, InclusionProof};
use serde_json::{json, Value};

use crate::common::*;
use crate::log_v2::{LogEnv, ORIGIN};

/// The subjects of the seeded events; the erased one is `SUBJECTS[ERASED]`.
const SUBJECTS: [&str; 8] = [
    "ana.kowalski@clinic.test",
    "bruno.meyer@clinic.test",
    "chen.li@clinic.test",
    "dara.okafor@clinic.test",
    "erin.vasquez@clinic.test",
    "femi.adeyemi@clinic.test",
    "gus.larsen@clinic.test",
    "hana.sato@clinic.test",
];
const ERASED: usize = 4;
const PSEUDONYM_KEY: &str = "test-pseudonym-key-0123456789";

/// Every value of subject `s` that erasure must remove.
fn personal_values(s: usize) -> Vec<String> {
    vec![
        SUBJECTS[s].to_string(),
        format!("198.51.100.{}", 200 + s),
        format!("AgentOf{}/1.0", SUBJECTS[s].split('.').next().unwrap()),
    ]
}

/// Event `i`: principal `SUBJECTS[i % 8]`; every 40th event targets the
/// erased subject (as a record about them) with another principal.
fn subject_event(i: usize) -> Value {
    let s = i % SUBJECTS.len();
    let v = personal_values(s);
    let target = if i % 40 == 1 {
        SUBJECTS[ERASED].to_string()
    } else {
        format!("patient-{i}")
    };
    json!({
        "eventId": format!("gdpr-evt-{i}"),
        "timestamp": ts((i % 3000) as i64 + 60),
        "action": "chart.read",
        "status": "success",
        "principalId": v[0],
        "organizationId": format!("org-{}", i % 2),
        "targetResourceType": "Patient",
        "targetResourceId": target,
        "outcomeDescription": format!("chart {i} opened"),
        "dataClassification": "PHI",
        "sessionContext": {"sessionId": format!("s-{i}"), "ipAddress": v[1], "userAgent": v[2]},
        "email": v[0],
        "ward": format!("ward-{}", i % 5),
    })
}

fn with_gdpr(s: &LogEnv) -> Config {
    let mut c = s.config();
    c.gdpr.pseudonym_key = PSEUDONYM_KEY.to_string().into();
    c.snapshot.personal_fields = vec!["details.email".into()];
    c.alerts.stream = format!("test:{}:alerts", s.env.name);
    c.export.notifications_key = format!("test:{}:notifications", s.env.name);
    c
}

async fn eraser(c: &Config) -> Eraser {
    let client = audit_worker::source::redis_client(&c.redis).unwrap();
    let redis = audit_worker::source::command_connection(&client, &c.redis)
        .await
        .unwrap();
    Eraser::from_config(c, redis, audit_worker::storage::open(&c.storage).unwrap()).unwrap()
}

async fn client(c: &Config) -> tokio_postgres::Client {
    let (client, conn) = audit_worker::db::pg_config(c)
        .unwrap()
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// Every entry of every Redis key of this test, as text.
async fn redis_dump(env: &TestEnv) -> String {
    let mut conn = env.redis_conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*{}*", env.name))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    let mut out = String::new();
    for k in keys {
        let t: String = redis::cmd("TYPE")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .unwrap();
        let v: redis::Value = match t.as_str() {
            "stream" => redis::cmd("XRANGE")
                .arg(&k)
                .arg("-")
                .arg("+")
                .query_async(&mut conn)
                .await
                .unwrap(),
            "hash" => redis::cmd("HGETALL")
                .arg(&k)
                .query_async(&mut conn)
                .await
                .unwrap(),
            "string" => redis::cmd("GET")
                .arg(&k)
                .query_async(&mut conn)
                .await
                .unwrap(),
            "list" => redis::cmd("LRANGE")
                .arg(&k)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .unwrap(),
            "set" => redis::cmd("SMEMBERS")
                .arg(&k)
                .query_async(&mut conn)
                .await
                .unwrap(),
            "zset" => redis::cmd("ZRANGE")
                .arg(&k)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .unwrap(),
            _ => redis::Value::Nil,
        };
        out.push_str(&format!("{k} {v:?}\n"));
    }
    out
}

/// Deletes the alert and notification streams the test configured (the
/// harness removes the event stream and the DLQ).
async fn drop_test_keys(s: &LogEnv, c: &Config) {
    let mut conn = s.env.redis_conn().await;
    let _: redis::RedisResult<()> = redis::cmd("DEL")
        .arg(&c.alerts.stream)
        .arg(&c.export.notifications_key)
        .query_async(&mut conn)
        .await;
}

/// Every file under the test's object store, as (lossy) text.
fn store_dump(dir: &std::path::Path) -> String {
    let mut out = String::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                out.push_str(&String::from_utf8_lossy(&bytes));
                // Compressed artifacts are searched decompressed too.
                if p.extension().is_some_and(|x| x == "gz") {
                    use std::io::Read;
                    let mut s = String::new();
                    let _ = flate2::read::GzDecoder::new(&bytes[..]).read_to_string(&mut s);
                    out.push_str(&s);
                }
            }
        }
    }
    out
}

fn pg_dump(schema: &str) -> String {
    let out = std::process::Command::new("pg_dump")
        .arg("--dbname")
        .arg(test_database_url())
        .args(["--schema", schema, "--no-owner"])
        .output()
        .expect("pg_dump runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn python_verifier(
    s: &LogEnv,
    checkpoint: &std::path::Path,
    proofs: &std::path::Path,
) -> std::process::Output {
    std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/verify_log.py"
        ))
        .args(["--key", &s.verifier, "--origin", ORIGIN])
        .arg("--checkpoint")
        .arg(checkpoint)
        .arg("--proofs")
        .arg(proofs)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_replaces_one_subjects_values_everywhere_while_the_log_and_its_proofs_still_verify()
{
    let s = LogEnv::new("gdpr_erase").await;
    let c = with_gdpr(&s);
    let events: Vec<Value> = (0..10_000).map(subject_event).collect();
    let erased_events: BTreeSet<String> = (0..10_000)
        .filter(|i| i % SUBJECTS.len() == ERASED || i % 40 == 1)
        .map(|i| format!("gdpr-evt-{i}"))
        .collect();
    // Alerts: every principal touching PHI raises one (no one is allowed).
    let ingest_config = |w: &mut Config| {
        w.snapshot.personal_fields = c.snapshot.personal_fields.clone();
        w.alerts.stream = c.alerts.stream.clone();
        w.alerts.rules = vec![RuleConfig::ClassifiedAccess {
            name: "phi_outside_allowlist".into(),
            classification: "PHI".into(),
            actions_containing: vec![],
            allowed_principals: vec!["nobody".into()],
            cooldown_secs: 3600,
        }];
    };
    s.ingest(&events, ingest_config).await;
    // Dead letters about the erased subject and about another one.
    let mut broken = subject_event(ERASED);
    broken["status"] = json!("not-a-status");
    let mut other = subject_event(0);
    other["status"] = json!("not-a-status");
    let worker = InProcessWorker::start({
        let mut w = s.worker_config();
        ingest_config(&mut w);
        w
    });
    s.env.add_events(&[broken, other]).await;
    wait_until(Duration::from_secs(60), "two dead letters", || async {
        s.env.dlq_len().await == 2
    })
    .await;
    worker.stop().await;
    let alerts_before = redis_dump(&s.env).await;
    for v in personal_values(ERASED) {
        assert!(
            alerts_before.contains(&v),
            "{v} is in Redis before the erasure"
        );
    }
    let summary = s.seal("all").await;
    assert_eq!(summary.tree_size, 10_000);

    // Proofs taken before the erasure: the erased subject's and others'.
    let mut pg = client(&c).await;
    let mut before = Vec::new();
    for i in (0..10_000).step_by(97).take(60) {
        before.push(
            verify::prove(&mut pg, &format!("gdpr-evt-{i}"), 5000)
                .await
                .unwrap(),
        );
    }
    assert!(before.iter().any(|p| erased_events.contains(&p.event)));

    // Erase. The rows are rewritten by two connections at once, as an
    // erasure of `SPLIT_ROWS` rows or more is.
    let mut eraser = eraser(&c).await;
    eraser.split_rows = 500;
    let req = EraseRequest {
        subject_id: SUBJECTS[ERASED].into(),
        organization_id: None,
    };
    let started = std::time::Instant::now();
    let done = eraser
        .erase(&mut pg, &req, "dpo@clinic.test", "test:erase-1")
        .await
        .unwrap();
    eprintln!(
        "erased {} events in {:?}",
        done.rows_erased,
        started.elapsed()
    );
    assert_eq!(done.rows_erased as usize, erased_events.len());
    assert_eq!(done.values_not_erasable, 0);
    assert_eq!(done.dead_letters_purged, 1);
    assert!(done.alerts_purged >= 1, "{done:?}");
    // The same request again finds the same erasure and nothing left.
    let again = eraser
        .erase(&mut pg, &req, "dpo@clinic.test", "test:erase-1")
        .await
        .unwrap();
    assert_eq!(again.id, done.id);
    assert_eq!(again.rows_erased, 0);
    let recorded: i64 = pg
        .query_one(
            "SELECT rows_erased FROM gdpr_erasures WHERE id = $1",
            &[&done.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        recorded as usize,
        erased_events.len(),
        "both halves are counted in the request's record"
    );
    let writers: i64 = pg
        .query_one("SELECT count(DISTINCT xmin::text) FROM audit_erasures", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(writers, 2, "the erasure records come from two transactions");

    // The erasure is itself an audit event, stored like any other.
    let worker = InProcessWorker::start(s.worker_config());
    wait_until(Duration::from_secs(60), "the erasure event", || async {
        s.env
            .pg
            .query_one(
                "SELECT count(*) FROM audit_log WHERE action = 'gdpr.erasure.completed' AND target_resource_id = $1",
                &[&done.subject_pseudonym],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
    })
    .await;
    worker.stop().await;

    // verify passes and lists exactly the subject's events as erased, with
    // the request and its time.
    let report = s.verify().await;
    assert!(report.ok(), "{:?}", report.findings);
    let listed: BTreeSet<String> = report.erased.iter().map(|e| e.event.clone()).collect();
    assert_eq!(listed, erased_events);
    assert!(report
        .erased
        .iter()
        .all(|e| e.requests.len() == 1 && e.requests[0].request == done.id));
    let principal_row = report
        .erased
        .iter()
        .find(|e| e.event == format!("gdpr-evt-{ERASED}"))
        .unwrap();
    assert_eq!(
        principal_row.paths,
        [
            "details.email",
            "principalId",
            "sessionContext.ipAddress",
            "sessionContext.userAgent"
        ]
    );
    let target_row = report
        .erased
        .iter()
        .find(|e| e.event == "gdpr-evt-1")
        .unwrap();
    assert_eq!(target_row.paths, ["targetResourceId"]);

    // Every earlier proof still verifies with the independent verifier, and
    // a proof made now gives the same leaf and record as before.
    let mut after: Vec<InclusionProof> = Vec::new();
    for p in &before {
        let now = verify::prove(&mut pg, &p.event, 5000).await.unwrap();
        assert_eq!(now.record_digest, p.record_digest, "{}", p.event);
        assert_eq!(now.record, p.record, "{}", p.event);
        after.push(now);
    }
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("checkpoint");
    std::fs::write(&checkpoint, &summary.checkpoint).unwrap();
    let proofs = dir.path().join("proofs.json");
    let all: Vec<&InclusionProof> = before.iter().chain(after.iter()).collect();
    std::fs::write(&proofs, serde_json::to_vec(&all).unwrap()).unwrap();
    let out = python_verifier(&s, &checkpoint, &proofs);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("{} proofs verified", all.len())),
        "{stdout}"
    );

    // An export made now recomputes every leaf (erased rows through their
    // kept commitments) and the signed root, with the independent verifier.
    // A restricted subject's events are left out unless asked for.
    audit_worker::jobs::gdpr::restriction::restrict(
        &pg,
        None,
        SUBJECTS[1],
        "art. 18 request",
        "test",
    )
    .await
    .unwrap();
    let limited = export_ndjson(&s, &dir.path().join("limited"), false);
    let text = std::fs::read_to_string(&limited).unwrap();
    assert_eq!(
        text.lines().count(),
        10_001 - 1250,
        "restricted events left out"
    );
    assert!(!text.contains(SUBJECTS[1]));
    let full = export_ndjson(&s, &dir.path().join("full"), true);
    let out = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/verify_log.py"
        ))
        .args(["--key", &s.verifier, "--origin", ORIGIN, "--json"])
        .arg("--checkpoint")
        .arg(&checkpoint)
        .arg("--export")
        .arg(&full)
        .arg("--proofs")
        .arg(&proofs)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}");
    let summary_py: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary_py["exportRows"], 10_001);
    assert_eq!(summary_py["leavesRecomputed"], 10_000);
    assert_eq!(summary_py["rootRecomputed"], json!(summary.root_hex));
    let exported = std::fs::read_to_string(&full).unwrap();
    for v in personal_values(ERASED) {
        assert!(
            !exported.contains(&v),
            "{v} is in an export made after the erasure"
        );
    }
    std::fs::remove_dir_all(dir.path().join("limited")).unwrap();
    std::fs::remove_dir_all(dir.path().join("full")).unwrap();

    // None of the erased values is left in the database, Redis or the
    // object store; the other subjects' values are.
    let dump = pg_dump(&s.env.schema);
    let redis = redis_dump(&s.env).await;
    let store = store_dump(s.storage.path());
    for v in personal_values(ERASED) {
        assert!(!dump.contains(&v), "{v} is still in the database");
        assert!(!redis.contains(&v), "{v} is still in Redis");
        assert!(!store.contains(&v), "{v} is still in the object store");
    }
    for v in personal_values(0) {
        assert!(dump.contains(&v), "{v} (not erased) is in the database");
    }
    assert!(dump.contains(&done.subject_pseudonym));
    let letters: Vec<String> = s
        .env
        .dlq_entries()
        .await
        .iter()
        .map(|e| String::from_utf8_lossy(&e["data"]).into_owned())
        .collect();
    assert_eq!(
        letters.len(),
        1,
        "the other subject's dead letter stays: {letters:?}"
    );
    assert!(letters[0].contains(SUBJECTS[0]), "{letters:?}");

    // Tampering with a field that was not erased, in an erased row, is
    // still found.
    s.tamper(&format!(
        "UPDATE audit_log SET outcome_description = 'changed' WHERE event_id = 'gdpr-evt-{ERASED}'"
    ))
    .await;
    let report = s.verify().await;
    let altered: BTreeSet<String> = report
        .findings
        .iter()
        .filter(|f| f.kind == FindingKind::Altered)
        .filter_map(|f| f.event.clone())
        .collect();
    assert_eq!(altered, BTreeSet::from([format!("gdpr-evt-{ERASED}")]));
    drop_test_keys(&s, &c).await;
    s.env.cleanup().await;
}

/// `audit-worker export --format ndjson` of everything into `out`; the
/// artifact's path.
fn export_ndjson(
    s: &LogEnv,
    out: &std::path::Path,
    include_restricted: bool,
) -> std::path::PathBuf {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_audit-worker"));
    cmd.args(["export", "--format", "ndjson", "--compression", "none"])
        .args(["--from", "2000-01-01", "--to", "2100-01-01", "--out"])
        .arg(out)
        .env(
            "AUDIT_WORKER__STORAGE__URL",
            s.storage.path().display().to_string(),
        );
    if include_restricted {
        cmd.arg("--include-restricted");
    }
    for (k, v) in s.env.env_vars() {
        cmd.env(k, v);
    }
    let result = cmd.output().unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    std::fs::read_dir(out)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".ndjson"))
        .expect("an ndjson artifact")
}

/// Runs the binary with the test's settings; (success, stdout, stderr).
fn cli(s: &LogEnv, c: &Config, args: &[&str]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_audit-worker"));
    cmd.args(args)
        .env(
            "AUDIT_WORKER__STORAGE__URL",
            s.storage.path().display().to_string(),
        )
        .env("AUDIT_WORKER__GDPR__PSEUDONYM_KEY", PSEUDONYM_KEY)
        .env("AUDIT_WORKER__ALERTS__STREAM", &c.alerts.stream)
        .env(
            "AUDIT_WORKER__EXPORT__NOTIFICATIONS_KEY",
            &c.export.notifications_key,
        )
        .env(
            "AUDIT_WORKER__SNAPSHOT__PERSONAL_FIELDS",
            "[\"details.email\"]",
        );
    for (k, v) in s.env.env_vars() {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// How many stored events have `subject` as principal.
async fn principal_rows(pg: &tokio_postgres::Client, subject: &str) -> i64 {
    pg.query_one(
        "SELECT count(*) FROM audit_log WHERE principal_id = $1",
        &[&subject],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_under_a_legal_hold_is_refused_naming_the_hold_and_proceeds_once_it_is_released() {
    let s = LogEnv::new("gdpr_hold").await;
    let c = with_gdpr(&s);
    let events: Vec<Value> = (0..80).map(subject_event).collect();
    s.ingest(&events, |w| {
        w.snapshot.personal_fields = vec!["details.email".into()]
    })
    .await;
    s.seal("all").await;
    let subject = SUBJECTS[ERASED];
    assert_eq!(principal_rows(&s.env.pg, subject).await, 10);

    // A hold on the subject's organisation (org-0) and one on another
    // subject: the first covers, the second does not.
    let (ok, hold_id, err) = cli(
        &s,
        &c,
        &[
            "hold",
            "place",
            "--org",
            "org-0",
            "--reason",
            "case 2026-17 discovery",
            "--owner",
            "legal@clinic.test",
        ],
    );
    assert!(ok, "{err}");
    let hold_id = hold_id.trim().to_string();
    assert!(hold_id.starts_with("hold_"), "{hold_id}");
    let (ok, _, err) = cli(
        &s,
        &c,
        &[
            "hold",
            "place",
            "--subject",
            SUBJECTS[0],
            "--reason",
            "other case",
            "--owner",
            "legal",
        ],
    );
    assert!(ok, "{err}");
    let (ok, list, _) = cli(&s, &c, &["hold", "list"]);
    assert!(
        ok && list.contains(&hold_id) && list.contains("case 2026-17 discovery"),
        "{list}"
    );

    // Refused, naming the hold and its reason; nothing changed.
    let (ok, _, err) = cli(&s, &c, &["gdpr", "erase", subject]);
    assert!(!ok);
    assert!(
        err.contains(&hold_id) && err.contains("case 2026-17 discovery"),
        "{err}"
    );
    assert_eq!(principal_rows(&s.env.pg, subject).await, 10);
    // The library says the same, typed.
    let mut pg = client(&c).await;
    let refused = eraser(&c)
        .await
        .erase(
            &mut pg,
            &EraseRequest {
                subject_id: subject.into(),
                organization_id: None,
            },
            "t",
            "test:held",
        )
        .await;
    match refused {
        Err(EraseError::Held(h)) => assert_eq!(h.id, hold_id),
        other => panic!("expected a hold refusal, got {other:?}"),
    }
    // The database function refuses too, whoever calls it.
    let e = pg
        .query_one(
            "SELECT gdpr_erase_rows('x', now(), ARRAY[id], ARRAY[event_time], ARRAY[NULL::text], ARRAY[NULL::text],
                                    ARRAY[NULL::text], ARRAY[NULL::text], ARRAY['{}'], ARRAY['[]'], ARRAY[false])
               FROM audit_log WHERE principal_id = $1 AND organization_id = 'org-0' LIMIT 1",
            &[&subject],
        )
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains(&hold_id) || format!("{e:?}").contains(&hold_id),
        "{e:?}"
    );
    // And an UPDATE outside the function is refused by the trigger.
    let e = pg
        .execute(
            "UPDATE audit_log SET principal_id = 'x' WHERE principal_id = $1",
            &[&subject],
        )
        .await
        .unwrap_err();
    assert!(format!("{e:?}").contains("append-only"), "{e:?}");

    // Released: the erasure proceeds.
    let (ok, released, err) = cli(&s, &c, &["hold", "release", &hold_id]);
    assert!(ok && released.contains("released"), "{released}{err}");
    let (ok, out, err) = cli(&s, &c, &["gdpr", "erase", subject]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("events erased"), "{out}");
    assert_eq!(principal_rows(&s.env.pg, subject).await, 0);
    let report = s.verify().await;
    assert!(report.ok(), "{:?}", report.findings);
    assert_eq!(report.erased.len(), 12, "10 as principal, 2 as target");

    // Each hold change and the erasure were recorded as audit events.
    let mut conn = s.env.redis_conn().await;
    let stream: redis::Value = redis::cmd("XRANGE")
        .arg(&s.env.stream)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let text = format!("{stream:?}");
    for action in [
        "audit.legal_hold.placed",
        "audit.legal_hold.released",
        "gdpr.erasure.completed",
    ] {
        assert!(text.contains(action), "{action} not recorded");
    }

    // A released hold keeps no subject id in clear: with the pseudonym key
    // (the CLI here) the subject's pseudonym, the one an erasure gives.
    let other_hold: String = pg
        .query_one(
            "SELECT id FROM legal_holds WHERE subject_id = $1",
            &[&SUBJECTS[0]],
        )
        .await
        .unwrap()
        .get(0);
    let (ok, released, err) = cli(&s, &c, &["hold", "release", &other_hold]);
    assert!(ok, "{released}{err}");
    let pseudonym_of_0 =
        audit_worker::jobs::gdpr::pseudonym::Pseudonymizer::new(PSEUDONYM_KEY.to_string().into())
            .of_text(SUBJECTS[0]);
    let kept = |id: String| {
        let pg = &pg;
        async move {
            pg.query_one("SELECT subject_id FROM legal_holds WHERE id = $1", &[&id])
                .await
                .unwrap()
                .get::<_, Option<String>>(0)
        }
    };
    assert_eq!(kept(other_hold.clone()).await, Some(pseudonym_of_0.clone()));
    let (ok, list, _) = cli(&s, &c, &["hold", "list", "--all", "--json"]);
    assert!(ok && list.contains(&pseudonym_of_0), "{list}");
    assert!(!list.contains(SUBJECTS[0]), "{list}");
    // Releasing it again changes nothing.
    audit_worker::jobs::gdpr::hold::release(&pg, &other_hold, "again", None)
        .await
        .unwrap();
    assert_eq!(kept(other_hold).await, Some(pseudonym_of_0));
    // Without a key: the commitment SHA-256(hold id ":" subject), the same
    // one migration V26 gives holds released before it.
    let third = audit_worker::jobs::gdpr::hold::place(
        &pg,
        &audit_worker::jobs::gdpr::hold::NewHold {
            organization_id: None,
            subject_id: Some(SUBJECTS[1].into()),
            from: None,
            to: None,
            reason: "third case".into(),
            owner: "legal".into(),
        },
        "test",
    )
    .await
    .unwrap();
    let h = audit_worker::jobs::gdpr::hold::release(&pg, &third.id, "test", None)
        .await
        .unwrap()
        .unwrap();
    let by_sql: String = pg
        .query_one(
            "SELECT 'sha256:' || encode(sha256(convert_to($1 || ':' || $2, 'UTF8')), 'hex')",
            &[&third.id, &SUBJECTS[1]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(h.subject_id, Some(by_sql.clone()));
    assert_eq!(kept(third.id).await, Some(by_sql));
    let dump = pg_dump(&s.env.schema);
    let holds_dump: String = dump
        .lines()
        .skip_while(|l| !l.starts_with("COPY") || !l.contains("legal_holds"))
        .take_while(|l| *l != "\\.")
        .collect();
    assert!(holds_dump.contains("third case"), "{holds_dump}");
    assert!(
        !holds_dump.contains(SUBJECTS[0]) && !holds_dump.contains(SUBJECTS[1]),
        "{holds_dump}"
    );
    drop_test_keys(&s, &c).await;
    s.env.cleanup().await;
}

// --- gdpr.erase by the queue ------------------------------------------

/// `n` events by `subject` (as principal, its email in `details`) in
/// `org-q`.
fn queue_events(tag: &str, subject: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            json!({
                "eventId": format!("{tag}-{i}"),
                "timestamp": ts(i as i64 + 5),
                "action": "chart.read",
                "status": "success",
                "principalId": subject,
                "organizationId": "org-q",
                "targetResourceType": "Patient",
                "targetResourceId": format!("patient-{tag}-{i}"),
                "sessionContext": {"ipAddress": "198.51.100.9", "userAgent": "qa/1"},
                "email": subject,
            })
        })
        .collect()
}

/// A worker that erases: the pseudonym key, `details.email` personal, its
/// own alert and notification streams, acknowledged entries kept (so the
/// test can deliver them again).
fn erasing_worker(s: &LogEnv) -> Config {
    let mut c = s.worker_config();
    c.gdpr.pseudonym_key = PSEUDONYM_KEY.to_string().into();
    c.snapshot.personal_fields = vec!["details.email".into()];
    c.alerts.stream = format!("test:{}:alerts", s.env.name);
    c.export.notifications_key = format!("test:{}:notifications", s.env.name);
    c.stream.delete_acked = false;
    c
}

fn pseudonym(value: &str) -> String {
    audit_worker::jobs::gdpr::pseudonym::Pseudonymizer::new(PSEUDONYM_KEY.to_string().into())
        .of_text(value)
}

async fn completion_events(pg: &tokio_postgres::Client, pseudonym: &str) -> i64 {
    pg.query_one(
        "SELECT count(*) FROM audit_log WHERE action = 'gdpr.erasure.completed' AND target_resource_id = $1",
        &[&pseudonym],
    )
    .await
    .unwrap()
    .get(0)
}

/// The erasures recorded for requests of `requester`: (source, status,
/// rows erased).
async fn erasures_of(pg: &tokio_postgres::Client, requester: &str) -> Vec<(String, String, i64)> {
    pg.query(
        "SELECT source, status, rows_erased FROM gdpr_erasures WHERE requester_id = $1 ORDER BY source",
        &[&requester],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

async fn jobs_metric(port: u16, status: &str) -> Option<f64> {
    crate::log_v2::metric(
        port,
        &format!("audit_worker_jobs_total{{kind=\"gdpr_erase\",status=\"{status}\"}}"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_by_the_stream_and_by_bullmq_runs_once_per_message_even_when_delivered_twice() {
    let s = LogEnv::new("gdpr_erase_queue").await;
    let c = erasing_worker(&s);
    let (by_stream, by_bullmq) = ("stream.subject@clinic.test", "bullmq.subject@clinic.test");
    let mut events = queue_events("qs", by_stream, 6);
    events.extend(queue_events("qb", by_bullmq, 4));
    events.extend(queue_events("qo", "bystander@clinic.test", 3));
    s.ingest(&events, |w| {
        w.snapshot.personal_fields = c.snapshot.personal_fields.clone()
    })
    .await;

    // By the stream: XADD name=gdpr.erase.
    let worker = InProcessWorker::start(c.clone());
    let request = json!({"subjectId": by_stream, "requesterId": "dpo-stream"});
    let ids = s
        .env
        .add_entries(&[(Some("gdpr.erase"), request.to_string().into_bytes())])
        .await;
    let source = format!("stream:{}:{}", s.env.stream, ids[0]);
    wait_until(
        Duration::from_secs(60),
        "the stream's erasure and its event",
        || async { completion_events(&s.env.pg, &pseudonym(by_stream)).await == 1 },
    )
    .await;
    assert_eq!(
        erasures_of(&s.env.pg, "dpo-stream").await,
        vec![(source.clone(), "completed".to_string(), 6)]
    );
    let port = s.env.http_port;
    assert_eq!(jobs_metric(port, "accepted").await, Some(1.0));
    assert_eq!(jobs_metric(port, "completed").await, Some(1.0));
    worker.stop().await;
    assert_eq!(principal_rows(&s.env.pg, by_stream).await, 0);
    assert_eq!(principal_rows(&s.env.pg, &pseudonym(by_stream)).await, 6);
    assert_eq!(principal_rows(&s.env.pg, by_bullmq).await, 4);

    // Every entry delivered again, as after a crash before XACK: the
    // erasure is found done, nothing is erased or announced twice.
    let mut conn = s.env.redis_conn().await;
    let _: () = redis::cmd("XGROUP")
        .arg("SETID")
        .arg(&s.env.stream)
        .arg(&s.env.group)
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    let worker = InProcessWorker::start(c.clone());
    wait_until(
        Duration::from_secs(60),
        "the redelivered request handled",
        || async { jobs_metric(port, "completed").await == Some(1.0) },
    )
    .await;
    wait_until(Duration::from_secs(30), "nothing pending", || async {
        s.env.pending_count().await == 0
    })
    .await;
    assert_eq!(
        erasures_of(&s.env.pg, "dpo-stream").await,
        vec![(source, "completed".to_string(), 6)],
        "the same erasure, nothing erased again"
    );
    assert_eq!(completion_events(&s.env.pg, &pseudonym(by_stream)).await, 1);

    // By BullMQ (Node's Queue.add), then the same job delivered again.
    let r = crate::bullmq::node_json(
        &s.env,
        "erase.mjs",
        &[(
            "DATA",
            json!({"subjectId": by_bullmq, "requesterId": "dpo-bullmq", "organizationId": "org-q"})
                .to_string(),
        )],
    )
    .await;
    let (first, second) = (&r["first"], &r["second"]);
    assert_eq!(first["state"], "completed", "{r}");
    assert_eq!(second["state"], "completed", "{r}");
    assert_eq!(first["returnvalue"]["rowsErased"], 4, "{r}");
    assert_eq!(
        first["returnvalue"]["subjectPseudonym"],
        json!(pseudonym(by_bullmq))
    );
    assert_eq!(
        second["returnvalue"]["id"], first["returnvalue"]["id"],
        "{r}"
    );
    assert_eq!(second["returnvalue"]["rowsErased"], 0, "{r}");
    wait_until(
        Duration::from_secs(60),
        "the BullMQ erasure's event",
        || async { completion_events(&s.env.pg, &pseudonym(by_bullmq)).await == 1 },
    )
    .await;
    // Both deliveries of the BullMQ job, and the redelivered entry.
    assert_eq!(jobs_metric(port, "accepted").await, Some(3.0));
    assert_eq!(jobs_metric(port, "completed").await, Some(3.0));
    assert_eq!(jobs_metric(port, "rejected").await, Some(0.0));
    worker.stop().await;
    let bullmq_source = format!("bullmq:{}:{}", s.env.queue, r["id"].as_str().unwrap());
    assert_eq!(
        erasures_of(&s.env.pg, "dpo-bullmq").await,
        vec![(bullmq_source, "completed".to_string(), 4)]
    );
    assert_eq!(completion_events(&s.env.pg, &pseudonym(by_bullmq)).await, 1);
    assert_eq!(principal_rows(&s.env.pg, by_bullmq).await, 0);
    assert_eq!(principal_rows(&s.env.pg, &pseudonym(by_bullmq)).await, 4);
    assert_eq!(principal_rows(&s.env.pg, "bystander@clinic.test").await, 3);
    let left: i64 = s
        .env
        .pg
        .query_one(
            "SELECT count(*) FROM audit_log WHERE details->>'email' IN ($1, $2)",
            &[&by_stream, &by_bullmq],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the emails are erased too");
    assert_eq!(s.env.dlq_len().await, 0);
    drop_test_keys(&s, &c).await;
    s.env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_or_malformed_erasure_request_from_the_queue_is_dead_lettered_with_its_reason() {
    let s = LogEnv::new("gdpr_erase_queue_dlq").await;
    let mut c = erasing_worker(&s);
    // Queue producers are trusted with org-q only.
    c.export.queue_organizations = vec!["org-q".into()];
    let held = "held.subject@clinic.test";
    s.ingest(&queue_events("qh", held, 3), |w| {
        w.snapshot.personal_fields = c.snapshot.personal_fields.clone()
    })
    .await;
    let hold_id = audit_worker::jobs::gdpr::hold::place(
        &s.env.pg,
        &audit_worker::jobs::gdpr::hold::NewHold {
            organization_id: None,
            subject_id: Some(held.into()),
            from: None,
            to: None,
            reason: "litigation 12".into(),
            owner: "legal@clinic.test".into(),
        },
        "test",
    )
    .await
    .unwrap()
    .id;

    let worker = InProcessWorker::start(c.clone());
    let held_request =
        json!({"subjectId": held, "requesterId": "dpo", "organizationId": "org-q"}).to_string();
    let malformed = br#"{"subjectId": "someone", "requester": "dpo"}"#.to_vec();
    let outside =
        json!({"subjectId": held, "requesterId": "dpo", "organizationId": "org-z"}).to_string();
    s.env
        .add_entries(&[
            (Some("gdpr.erase"), held_request.clone().into_bytes()),
            (Some("gdpr.erase"), malformed.clone()),
            (Some("gdpr.erase"), outside.clone().into_bytes()),
        ])
        .await;
    // The malformed one through BullMQ too.
    let dir = tempfile::tempdir().unwrap();
    let jobs_file = dir.path().join("jobs.json");
    std::fs::write(
        &jobs_file,
        json!([{"label": "malformed", "name": "gdpr.erase", "json": String::from_utf8(malformed.clone()).unwrap()}])
            .to_string(),
    )
    .unwrap();
    let r = crate::bullmq::node_json(
        &s.env,
        "outcomes.mjs",
        &[
            ("SCENARIO", "hostile".into()),
            ("HOSTILE_FILE", jobs_file.display().to_string()),
        ],
    )
    .await;
    let job = &r["jobs"][0];
    assert_eq!(job["state"], "failed", "{r}");
    assert!(
        job["failedReason"]
            .as_str()
            .unwrap()
            .starts_with("invalid_erase_request: "),
        "{r}"
    );
    wait_until(Duration::from_secs(60), "four dead letters", || async {
        s.env.dlq_len().await == 4
    })
    .await;
    let port = s.env.http_port;
    for (reason, n) in [("legal_hold", 1.0), ("invalid_erase_request", 3.0)] {
        let name = format!("audit_worker_dead_letters_total{{reason=\"{reason}\"}}");
        assert_eq!(crate::log_v2::metric(port, &name).await, Some(n), "{name}");
    }
    assert_eq!(jobs_metric(port, "rejected").await, Some(4.0));
    assert_eq!(jobs_metric(port, "accepted").await, Some(0.0));
    worker.stop().await;

    let letters = s.env.dlq_entries().await;
    let text = |l: &std::collections::HashMap<String, Vec<u8>>, k: &str| {
        String::from_utf8_lossy(&l[k]).into_owned()
    };
    // By the request they hold: a stream entry's bytes exactly, a BullMQ
    // job's as Node stored them (JSON.stringify of what it was given).
    let by_data = |data: &[u8]| {
        let want: Value = serde_json::from_slice(data).unwrap();
        letters
            .iter()
            .filter(|l| serde_json::from_slice::<Value>(&l["data"]).ok() == Some(want.clone()))
            .inspect(|l| {
                if text(l, "source").starts_with("stream:") {
                    assert_eq!(l["data"], data, "the original bytes");
                }
            })
            .map(|l| (text(l, "reason"), text(l, "error"), text(l, "name")))
            .collect::<Vec<_>>()
    };
    // The hold's refusal: its id, reason and owner; the original bytes.
    let held_letters = by_data(held_request.as_bytes());
    assert_eq!(held_letters.len(), 1, "{letters:?}");
    let (reason, error, name) = &held_letters[0];
    assert_eq!(
        (reason.as_str(), name.as_str()),
        ("legal_hold", "gdpr.erase")
    );
    assert!(
        error.contains(&hold_id)
            && error.contains("litigation 12")
            && error.contains("legal@clinic.test"),
        "{error}"
    );
    // Malformed (by both sources) and outside the queue's organisations.
    let malformed_letters = by_data(&malformed);
    assert_eq!(malformed_letters.len(), 2, "{letters:?}");
    for (reason, error, _) in &malformed_letters {
        assert_eq!(reason, "invalid_erase_request");
        assert!(error.contains("requesterId"), "{error}");
    }
    let outside_letters = by_data(outside.as_bytes());
    assert_eq!(outside_letters.len(), 1);
    assert_eq!(outside_letters[0].0, "invalid_erase_request");
    assert!(
        outside_letters[0].1.contains("export.queue_organizations"),
        "{}",
        outside_letters[0].1
    );
    // Nothing was erased; the refusal is on record.
    assert_eq!(principal_rows(&s.env.pg, held).await, 3);
    assert_eq!(
        erasures_of(&s.env.pg, "dpo")
            .await
            .into_iter()
            .map(|(_, status, rows)| (status, rows))
            .collect::<Vec<_>>(),
        vec![("refused".to_string(), 0)]
    );

    // Once the hold is released, the dead letter replayed (it keeps the
    // message's identity) continues the same erasure request. The erasure
    // purges the dead letters naming the subject (the out-of-scope request).
    audit_worker::jobs::gdpr::hold::release(&s.env.pg, &hold_id, "test", None)
        .await
        .unwrap();
    let out = s.worker_cli(&[
        "dlq".as_ref(),
        "replay".as_ref(),
        "--reason".as_ref(),
        "legal_hold".as_ref(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let worker = InProcessWorker::start(c.clone());
    wait_until(
        Duration::from_secs(60),
        "the replayed erasure and its event",
        || async { completion_events(&s.env.pg, &pseudonym(held)).await == 1 },
    )
    .await;
    worker.stop().await;
    let refused_source = erasures_of(&s.env.pg, "dpo").await;
    assert_eq!(
        refused_source
            .iter()
            .map(|(source, status, rows)| (source.starts_with("stream:"), status.as_str(), *rows))
            .collect::<Vec<_>>(),
        vec![(true, "completed", 3)],
        "the same request, now done"
    );
    assert_eq!(principal_rows(&s.env.pg, held).await, 0);
    let left: Vec<String> = s
        .env
        .dlq_entries()
        .await
        .iter()
        .map(|l| text(l, "reason"))
        .collect();
    assert_eq!(
        left,
        ["invalid_erase_request", "invalid_erase_request"],
        "the malformed two stay"
    );
    drop_test_keys(&s, &c).await;
    s.env.cleanup().await;
}

/// The export and report jobs of `requester`: (id, artifact withdrawn or
/// expired).
async fn jobs_of(pg: &tokio_postgres::Client, requester: &str) -> Vec<(String, bool)> {
    pg.query(
        "SELECT id, artifact_removed_at IS NOT NULL FROM export_jobs WHERE requester_id = $1
         UNION ALL
         SELECT id, expires_at <= now() FROM report_jobs WHERE requester_id = $1",
        &[&requester],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_withdraws_the_artifacts_that_may_hold_the_subject_and_finishes_a_withdrawal_redis_interrupted(
) {
    let s = LogEnv::new("gdpr_withdraw").await;
    let mut c = with_gdpr(&s);
    c.export.link_secret = "test-link-secret".to_owned().into();
    c.export.poll_interval_ms = 100;
    c.report.poll_interval_ms = 100;
    let events: Vec<Value> = (0..400).map(subject_event).collect();
    let worker_config = || {
        let mut w = s.worker_config();
        w.snapshot.personal_fields = c.snapshot.personal_fields.clone();
        w.export = c.export.clone();
        w.report = c.report.clone();
        w
    };
    s.ingest(&events, |w| *w = worker_config()).await;

    // Three artifacts made by the running worker: an export and a report
    // over the last hours (they hold the subject's values), and an export
    // of March 2024 (none of the subject's events).
    let from = ts(7200);
    let to = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let export = |from: &str, to: &str, requester: &str| {
        json!({"exportFilters": {"from": from, "to": to}, "format": "ndjson",
               "compression": "gzip", "requesterId": requester})
        .to_string()
        .into_bytes()
    };
    let worker = InProcessWorker::start(worker_config());
    s.env
        .add_entries(&[
            (Some("export.audit"), export(&from, &to, "officer-recent")),
            (
                Some("export.audit"),
                export(
                    "2024-03-01T00:00:00Z",
                    "2024-04-01T00:00:00Z",
                    "officer-2024",
                ),
            ),
            (
                Some("report.compliance"),
                json!({"kind": "hipaa-audit-trail", "from": from, "to": to,
                       "requesterId": "auditor-recent"})
                .to_string()
                .into_bytes(),
            ),
        ])
        .await;
    wait_until(Duration::from_secs(120), "three artifacts made", || async {
        s.env
            .pg
            .query_one(
                "SELECT (SELECT count(*) FROM export_jobs WHERE status = 'completed' AND notified_at IS NOT NULL)
                      + (SELECT count(*) FROM report_jobs WHERE status = 'completed' AND notified_at IS NOT NULL)",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 3
    })
    .await;
    worker.stop().await;
    let store_before = store_dump(s.storage.path());
    assert!(
        store_before.contains(SUBJECTS[ERASED]),
        "the recent artifacts hold the subject before the erasure"
    );
    let recent_export = jobs_of(&s.env.pg, "officer-recent").await[0].0.clone();
    let recent_report = jobs_of(&s.env.pg, "auditor-recent").await[0].0.clone();

    // Redis refuses the notifications: the notification key is moved
    // aside and a plain string put in its place, so XADD fails WRONGTYPE.
    let notifications = c.export.notifications_key.clone();
    let notices_before = s.env.stream_fields(&notifications).await.len();
    assert!(notices_before >= 3, "each artifact was announced");
    let aside = format!("{notifications}:aside");
    let mut conn = s.env.redis_conn().await;
    let _: () = redis::cmd("RENAME")
        .arg(&notifications)
        .arg(&aside)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&notifications)
        .arg("not a stream")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut pg = client(&c).await;
    let eraser = eraser(&c).await;
    let req = EraseRequest {
        subject_id: SUBJECTS[ERASED].into(),
        organization_id: None,
    };
    let err = eraser
        .erase(&mut pg, &req, "dpo@clinic.test", "test:withdraw-1")
        .await
        .unwrap_err();
    let EraseError::Incomplete(msg) = &err else {
        panic!("expected an incomplete erasure, got {err:?}");
    };
    assert!(msg.contains("cannot notify"), "{msg}");
    assert!(msg.contains("send the same request again"), "{msg}");
    // The rows are erased and the two jobs withdrawn; their objects are
    // gone even though nobody could be told yet.
    assert_eq!(principal_rows(&s.env.pg, SUBJECTS[ERASED]).await, 0);
    assert!(jobs_of(&s.env.pg, "officer-recent").await[0].1);
    assert!(jobs_of(&s.env.pg, "auditor-recent").await[0].1);
    assert!(!jobs_of(&s.env.pg, "officer-2024").await[0].1);
    let open: i64 = s
        .env
        .pg
        .query_one(
            "SELECT count(*) FROM gdpr_withdrawals WHERE done_at IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(open, 2, "both withdrawals wait for their notification");

    // Redis takes notifications again; the same request finishes them.
    let _: () = redis::cmd("DEL")
        .arg(&notifications)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("RENAME")
        .arg(&aside)
        .arg(&notifications)
        .query_async(&mut conn)
        .await
        .unwrap();
    let done = eraser
        .erase(&mut pg, &req, "dpo@clinic.test", "test:withdraw-1")
        .await
        .unwrap();
    assert_eq!(done.rows_erased, 0, "the rows were erased by the first run");
    assert_eq!(
        done.artifacts_withdrawn,
        vec![recent_export.clone(), recent_report.clone()]
    );
    let withdrawn: Vec<(String, String, String)> = s
        .env
        .stream_fields(&notifications)
        .await
        .into_iter()
        .filter(|n| n["type"].ends_with(b".withdrawn"))
        .map(|n| {
            let text = |k: &str| String::from_utf8(n[k].clone()).unwrap();
            (text("type"), text("jobId"), text("requesterId"))
        })
        .collect();
    assert_eq!(
        withdrawn,
        vec![
            (
                "export.withdrawn".to_owned(),
                recent_export.clone(),
                "officer-recent".to_owned()
            ),
            (
                "report.withdrawn".to_owned(),
                recent_report.clone(),
                "auditor-recent".to_owned()
            ),
        ],
        "each requester is told once"
    );
    // A third run has nothing left to withdraw or announce.
    let again = eraser
        .erase(&mut pg, &req, "dpo@clinic.test", "test:withdraw-1")
        .await
        .unwrap();
    assert_eq!(again.artifacts_withdrawn, done.artifacts_withdrawn);
    assert_eq!(
        s.env.stream_fields(&notifications).await.len(),
        notices_before + withdrawn.len(),
        "the two withdrawals were added, nothing more"
    );

    // The object store holds none of the erased values; the 2024 export
    // is still there.
    let store = store_dump(s.storage.path());
    for v in personal_values(ERASED) {
        assert!(!store.contains(&v), "{v} is still in the object store");
    }
    let kept_key: String = s
        .env
        .pg
        .query_one(
            "SELECT artifact_key FROM export_jobs WHERE requester_id = 'officer-2024'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(s.storage.path().join(kept_key).exists());
    drop_test_keys(&s, &c).await;
    s.env.cleanup().await;
}
