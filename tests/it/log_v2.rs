//! Verifiable log v2: salts stored apart from the row at ingest, record
//! digests (leaf v2) sealed into an append-only log, `verify` naming any
//! altered column, and the independent Python verifier agreeing.

use std::collections::BTreeSet;
use std::time::Duration;

use audit_worker::config::Config;
use audit_worker::integrity::checkpoint::Ed25519NoteSigner;
use audit_worker::integrity::record::salts_from_text;
use audit_worker::jobs::snapshot::{SnapshotSummary, Snapshotter};
use audit_worker::jobs::verify::{self, FindingKind, VerifyReport};
use chrono::Utc;
use serde_json::{json, Value};

use crate::common::*;

pub const ORIGIN: &str = "test.example/log-v2";

/// A test's log: its TestEnv and a signing key (also used by the
/// retention and subject access tests).
pub struct LogEnv {
    pub env: TestEnv,
    pub key: String,
    pub verifier: String,
    pub storage: tempfile::TempDir,
}

impl LogEnv {
    pub async fn new(name: &str) -> Self {
        let env = TestEnv::new(name).await;
        let signer = Ed25519NoteSigner::generate(ORIGIN).unwrap();
        let s = Self {
            env,
            key: signer.to_private_key_string(),
            verifier: signer.verifier().to_string(),
            storage: tempfile::tempdir().unwrap(),
        };
        audit_worker::db::migrate(&s.config()).await.unwrap();
        s
    }

    /// The worker's configuration: no signing key, so it ingests only and
    /// the test decides when to seal.
    pub fn worker_config(&self) -> Config {
        let mut c = self.env.config();
        c.snapshot.origin = ORIGIN.into();
        c.storage.url = self.storage.path().display().to_string();
        c
    }

    pub fn config(&self) -> Config {
        let mut c = self.worker_config();
        c.snapshot.signing_key = self.key.clone().into();
        c.snapshot.page_size = 5000;
        c
    }

    /// Stores `events` through a running worker.
    pub async fn ingest(&self, events: &[Value], extra_config: impl FnOnce(&mut Config)) {
        let mut c = self.worker_config();
        extra_config(&mut c);
        let before = self.env.row_count().await;
        let worker = InProcessWorker::start(c);
        self.env.add_events(events).await;
        let want = before + events.len() as i64;
        wait_until(Duration::from_secs(120), "events stored", || async {
            self.env.row_count().await >= want
        })
        .await;
        worker.stop().await;
    }

    pub async fn seal(&self, tag: &str) -> SnapshotSummary {
        let c = self.config();
        let pool = audit_worker::db::connect_pool(&c).await.unwrap();
        let signer = audit_worker::jobs::snapshot::load_signer(&c.snapshot)
            .unwrap()
            .unwrap();
        let storage = audit_worker::storage::open(&c.storage).unwrap();
        Snapshotter::new(&c, pool, signer, storage, None)
            .snapshot_now(&format!("test:{tag}"), None, Utc::now())
            .await
            .unwrap()
    }

    /// A new connection to this log's database.
    pub async fn client(&self) -> tokio_postgres::Client {
        pg_client(&self.config()).await
    }

    /// Verifies the whole log on one connection and on three, and checks
    /// both find exactly the same.
    pub async fn verify(&self) -> VerifyReport {
        verify_both_ways(&self.config(), ORIGIN, verify::Scope::All).await
    }

    /// Verifies the whole log, asserts it is sound, and returns the late
    /// events it lists, with the snapshot that sealed each.
    pub async fn verify_ok_late(&self) -> Vec<(String, i64)> {
        let report = self.verify().await;
        assert!(report.ok(), "{:?}", report.findings);
        report
            .late
            .iter()
            .map(|l| (l.event.clone(), l.snapshot_id))
            .collect()
    }

    /// Verifies what was appended since the checkpoint of `size`, in
    /// chunks of `page` leaves, with `helpers` more connections.
    pub async fn verify_since(
        &self,
        size: u64,
        page: i32,
        helpers: usize,
    ) -> Result<VerifyReport, audit_worker::jobs::snapshot::SnapshotError> {
        let mut client = self.client().await;
        let mut more = Vec::new();
        for _ in 0..helpers {
            more.push(self.client().await);
        }
        let key = audit_worker::integrity::checkpoint::NoteVerifier::parse(&self.verifier).unwrap();
        verify::verify_scope(
            &mut client,
            &key,
            ORIGIN,
            verify::Scope::Since(size),
            page,
            &mut more,
        )
        .await
    }

    /// Runs the worker binary with `args` against this log (its schema,
    /// origin, signing key and object store).
    pub fn worker_cli(&self, args: &[&std::ffi::OsStr]) -> std::process::Output {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_audit-worker"));
        cmd.args(args);
        for (k, v) in self.env.env_vars() {
            cmd.env(k, v);
        }
        cmd.env("AUDIT_WORKER__SNAPSHOT__ORIGIN", ORIGIN)
            .env("AUDIT_WORKER__SNAPSHOT__SIGNING_KEY", &self.key)
            .env(
                "AUDIT_WORKER__STORAGE__URL",
                self.storage.path().display().to_string(),
            )
            .output()
            .unwrap()
    }

    /// Runs scripts/verify_log.py (the independent verifier) with this
    /// log's key and origin and `args`; asserts it succeeds and returns its
    /// JSON summary.
    pub fn verify_log_py(&self, args: &[&std::ffi::OsStr]) -> Value {
        let out = std::process::Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/scripts/verify_log.py"
            ))
            .args(["--key", &self.verifier, "--origin", ORIGIN, "--json"])
            .args(args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&stdout).unwrap()
    }

    /// Runs `sql` as a superuser could: with the append-only triggers off.
    pub(crate) async fn tamper(&self, sql: &str) {
        self.env
            .pg
            .batch_execute(&format!(
                "ALTER TABLE audit_log DISABLE TRIGGER audit_log_immutable;
                 {sql};
                 ALTER TABLE audit_log ENABLE TRIGGER audit_log_immutable;"
            ))
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

fn events_of(report: &VerifyReport, kind: FindingKind) -> BTreeSet<String> {
    report
        .findings
        .iter()
        .filter(|f| f.kind == kind)
        .filter_map(|f| f.event.clone())
        .collect()
}

/// An event with every optional field set, so every column holds a value.
fn full_event(i: usize) -> Value {
    let mut e = event(i);
    let o = e.as_object_mut().unwrap();
    o.insert("signature".into(), json!("ab".repeat(32)));
    o.insert("algorithm".into(), json!("HMAC-SHA256"));
    o.insert("eventVersion".into(), json!("1.0"));
    o.insert("correlationId".into(), json!(format!("corr-{i}")));
    o.insert("retentionPolicy".into(), json!("7y"));
    // Keys outside the schema are stored in `details`, as details.email...
    o.insert("email".into(), json!(format!("u{i}@example.com")));
    o.insert("n".into(), json!(i));
    e
}

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
    // The same event twice (a producer retry): one row, one salts row. (A
    // copy, not event(7) again: its timestamp comes from the clock.)
    events.push(events[7].clone());
    env.add_events(&events).await;
    wait_until(Duration::from_secs(60), "events stored", || async {
        env.row_count().await == 52
    })
    .await;
    worker.stop().await;

    let rows = env
        .pg
        .query(
            "SELECT a.idempotency_key, s.salts::jsonb FROM audit_log a
               LEFT JOIN audit_salts s ON s.audit_id = a.id
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
            "SELECT count(*) FROM audit_log a JOIN audit_salts s ON s.audit_id = a.id
              WHERE a::text LIKE '%' || (s.salts->>'principalId') || '%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leaked, 0);
    env.cleanup().await;
}

/// Salts stored while the column was `jsonb` read back the same once the
/// upgrade made it `json` (the text the worker writes, not parsed again by
/// PostgreSQL at each insert), and the column still refuses text that is
/// not a JSON object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn salts_stored_before_the_upgrade_to_a_json_column_read_back_unchanged() {
    let env = TestEnv::new("salts_json_upgrade").await;
    let config = env.config();
    let before = audit_worker::db::migrate_to(&config, Some(28))
        .await
        .unwrap();
    assert!(
        before.iter().all(|m| !m.contains("salts_as_json")),
        "{before:?}"
    );
    let salt = "ab".repeat(32);
    env.pg
        .execute(
            "INSERT INTO audit_salts (audit_id, salts)
             VALUES (7, jsonb_build_object('principalId', $1::text, 'sessionContext.ipAddress', $1::text))",
            &[&salt],
        )
        .await
        .unwrap();
    let applied = audit_worker::db::migrate(&config).await.unwrap();
    assert!(
        applied.iter().any(|m| m.contains("salts_as_json")),
        "{applied:?}"
    );

    let row = env
        .pg
        .query_one(
            "SELECT pg_typeof(salts)::text, salts::text FROM audit_salts WHERE audit_id = 7",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "json");
    let salts = salts_from_text(Some(row.get::<_, &str>(1))).unwrap();
    assert_eq!(
        salts.into_iter().collect::<Vec<_>>(),
        vec![
            ("principalId".to_string(), [0xab; 32]),
            ("sessionContext.ipAddress".to_string(), [0xab; 32]),
        ]
    );
    for (bad, what) in [
        ("[1]", "audit_salts_salts_check"),
        ("{", "invalid input syntax for type json"),
    ] {
        let err = env
            .pg
            .execute(
                "INSERT INTO audit_salts (audit_id, salts) VALUES (8, $1::text::json)",
                &[&bad],
            )
            .await
            .unwrap_err();
        let msg = err.as_db_error().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains(what), "{bad}: {msg}");
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_the_event_for_a_change_to_any_stored_column_or_salt_of_a_sealed_row() {
    let s = LogEnv::new("tamper2").await;
    let events: Vec<Value> = (0..40).map(full_event).collect();
    s.ingest(&events, |c| {
        c.snapshot.personal_fields = vec!["details.email".into()]
    })
    .await;
    let sealed = s.seal("one").await;
    assert_eq!(sealed.record_count, 40);
    let clean = s.verify().await;
    assert!(clean.ok(), "{:?}", clean.findings);
    assert_eq!(clean.leaves_checked, 40);

    // One sealed event per stored column (and its salts), each changed in
    // a way that keeps the row valid for PostgreSQL.
    let matrix: &[(&str, &str)] = &[
        ("timestamp_raw", "timestamp_raw = timestamp_raw || ' '"),
        ("event_id", "event_id = 'forged-id'"),
        ("action", "action = 'record.deleted'"),
        (
            "status",
            "status = CASE status WHEN 'success' THEN 'failure' ELSE 'success' END",
        ),
        ("principal_id", "principal_id = 'someone-else'"),
        ("organization_id", "organization_id = 'org-x'"),
        ("target_resource_type", "target_resource_type = 'Other'"),
        ("target_resource_id", "target_resource_id = 'p-x'"),
        (
            "outcome_description",
            "outcome_description = 'nothing happened'",
        ),
        ("hash", "hash = repeat('0', 64)"),
        ("hash_algorithm", "hash_algorithm = 'SHA-1'"),
        ("hash_provided", "hash_provided = NOT hash_provided"),
        ("signature", "signature = repeat('cd', 32)"),
        ("signature_algorithm", "signature_algorithm = NULL"),
        ("signature_key_id", "signature_key_id = 'k-forged'"),
        ("event_version", "event_version = '2.0'"),
        ("correlation_id", "correlation_id = 'corr-x'"),
        ("data_classification", "data_classification = 'PUBLIC'"),
        ("retention_policy", "retention_policy = '1d'"),
        (
            "session_context",
            "session_context = session_context || '{\"ipAddress\":\"10.9.9.9\"}'",
        ),
        (
            "session_context (not personal)",
            "session_context = session_context || '{\"sessionId\":\"s-x\"}'",
        ),
        ("details", "details = details || '{\"n\":-1}'"),
        (
            "details (personal)",
            "details = details || '{\"email\":\"x@example.com\"}'",
        ),
        ("source", "source = 'bullmq:forged:1'"),
        (
            "ingested_at",
            "ingested_at = ingested_at + interval '1 second'",
        ),
    ];
    let mut expected = BTreeSet::new();
    for (n, (column, set)) in matrix.iter().enumerate() {
        let key = format!("evt-{n}");
        s.tamper(&format!(
            "UPDATE audit_log SET {set} WHERE idempotency_key = '{key}'"
        ))
        .await;
        let one = s.verify().await;
        assert_eq!(
            events_of(&one, FindingKind::Altered),
            expected
                .iter()
                .cloned()
                .chain([key.clone()])
                .collect::<BTreeSet<_>>(),
            "changing {column} of {key} must be named"
        );
        expected.insert(key);
    }
    // The idempotency key (the event's identity), the salts (added,
    // changed, removed) and the leaf number claimed by a row.
    let n = matrix.len();
    s.tamper(&format!(
        "UPDATE audit_log SET idempotency_key = 'forged-key' WHERE idempotency_key = 'evt-{n}'"
    ))
    .await;
    s.tamper(&format!(
        "UPDATE audit_salts SET salts = jsonb_set(salts::jsonb, '{{principalId}}', to_jsonb(repeat('0', 64)))::json
          WHERE audit_id = (SELECT id FROM audit_log WHERE idempotency_key = 'evt-{}')",
        n + 1
    ))
    .await;
    s.tamper(&format!(
        "DELETE FROM audit_salts WHERE audit_id = (SELECT id FROM audit_log WHERE idempotency_key = 'evt-{}')",
        n + 2
    ))
    .await;
    s.tamper(&format!(
        "UPDATE audit_salts SET salts = (salts::jsonb - 'details.email')::json
          WHERE audit_id = (SELECT id FROM audit_log WHERE idempotency_key = 'evt-{}')",
        n + 3
    ))
    .await;
    for k in n..n + 4 {
        expected.insert(format!("evt-{k}"));
    }
    let report = s.verify().await;
    assert_eq!(events_of(&report, FindingKind::Altered), expected);
    assert!(events_of(&report, FindingKind::Deleted).is_empty());
    assert!(report.findings.iter().any(
        |f| f.kind == FindingKind::Checkpoint && f.detail.contains("recomputed from the rows")
    ));

    // The row's identity in the table (id, event_time) is the ledger's
    // reference: changing it makes the sealed event missing and the row
    // an unsealed one inside the sealed range.
    s.tamper(&format!(
        "UPDATE audit_log SET id = id + 1000000 WHERE idempotency_key = 'evt-{}'",
        n + 4
    ))
    .await;
    s.tamper(&format!(
        "UPDATE audit_log SET event_time = event_time + interval '1 millisecond'
          WHERE idempotency_key = 'evt-{}'",
        n + 5
    ))
    .await;
    let report = s.verify().await;
    let moved: BTreeSet<String> = [format!("evt-{}", n + 4), format!("evt-{}", n + 5)].into();
    assert_eq!(events_of(&report, FindingKind::Deleted), moved);
    assert_eq!(events_of(&report, FindingKind::Inserted), moved);
    s.env.cleanup().await;
}

/// Seals the oldest `n` rows the way the first log version did (leaf v1):
/// rows UPDATEd with snapshot_id / leaf_index, the ledger holding each
/// event's hash v1, a signed checkpoint over those leaves.
async fn seal_as_v1(s: &LogEnv, n: i64) {
    use audit_worker::integrity::checkpoint::{Checkpoint, CheckpointSigner};
    use audit_worker::integrity::merkle::{leaf_hash, TreeBuilder};
    let signer = Ed25519NoteSigner::from_key_string(&s.key).unwrap();
    let rows = s
        .env
        .pg
        .query(
            "SELECT id, event_time, idempotency_key, hash FROM audit_log ORDER BY event_time, id LIMIT $1",
            &[&n],
        )
        .await
        .unwrap();
    let mut tree = TreeBuilder::new();
    for r in &rows {
        tree.push(leaf_hash(&hex::decode(r.get::<_, &str>(3)).unwrap()));
    }
    let note = Checkpoint::new(ORIGIN, n as u64, tree.root())
        .unwrap()
        .sign(&signer)
        .unwrap();
    let frontier: Vec<Vec<u8>> = tree.frontier().iter().map(|h| h.to_vec()).collect();
    let pg = &s.env.pg;
    pg.batch_execute("BEGIN; ALTER TABLE audit_log DISABLE TRIGGER audit_log_immutable")
        .await
        .unwrap();
    let id: i64 = pg
        .query_one(
            "INSERT INTO snapshots (range_to, record_count, previous_tree_size, tree_size, root,
                                    checkpoint_note, key_name, consistency_proof, frontier, manifest_path)
             VALUES ($6, $1, 0, $1, $2, $3, $4, '{}', $5, 'v1.json') RETURNING id",
            &[
                &n,
                &tree.root().as_slice(),
                &note,
                &signer.key_name(),
                &frontier,
                &(rows.last().unwrap().get::<_, chrono::DateTime<Utc>>(1)
                    + chrono::Duration::microseconds(1)),
            ],
        )
        .await
        .unwrap()
        .get(0);
    for (i, r) in rows.iter().enumerate() {
        let (row, time, key): (i64, chrono::DateTime<Utc>, String) = (r.get(0), r.get(1), r.get(2));
        pg.execute(
            "UPDATE audit_log SET snapshot_id = $1, leaf_index = $2 WHERE id = $3 AND event_time = $4",
            &[&id, &(i as i64), &row, &time],
        )
        .await
        .unwrap();
        pg.execute(
            "INSERT INTO seal_ledger (leaf_index, snapshot_id, event_time, row_id, idempotency_key, leaf)
             VALUES ($1, $2, $3, $4, $5, decode($6, 'hex'))",
            &[&(i as i64), &id, &time, &row, &key, &r.get::<_, &str>(3)],
        )
        .await
        .unwrap();
    }
    pg.execute(
        "UPDATE snapshot_log_head SET tree_size = $1, snapshot_id = $2",
        &[&n, &id],
    )
    .await
    .unwrap();
    pg.batch_execute("ALTER TABLE audit_log ENABLE TRIGGER audit_log_immutable; COMMIT")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_sealed_with_v1_leaves_keeps_verifying_and_continues_with_v2_leaves() {
    let s = LogEnv::new("v1tov2").await;
    let events: Vec<Value> = (0..30).map(full_event).collect();
    s.ingest(&events, |_| {}).await;
    seal_as_v1(&s, 12).await;
    let first = s.verify().await;
    assert!(first.ok(), "{:?}", first.findings);
    assert_eq!(first.leaves_checked, 12);

    let v2 = s.seal("v2").await;
    assert_eq!((v2.previous_tree_size, v2.tree_size), (12, 30));
    let versions = s
        .env
        .pg
        .query(
            "SELECT leaf_version, count(*) FROM seal_ledger GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let versions: Vec<(i16, i64)> = versions.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(versions, vec![(1, 12), (2, 18)]);
    let report = s.verify().await;
    assert!(report.ok(), "{:?}", report.findings);
    assert_eq!(report.leaves_checked, 30);

    // Proofs of both kinds verify with the public key only.
    let c = s.config();
    let (mut client, conn) = audit_worker::db::pg_config(&c)
        .unwrap()
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let key = audit_worker::integrity::checkpoint::NoteVerifier::parse(&s.verifier).unwrap();
    let v1_key: String = s
        .env
        .pg
        .query_one(
            "SELECT idempotency_key FROM seal_ledger WHERE leaf_index = 3",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let v2_key: String = s
        .env
        .pg
        .query_one(
            "SELECT idempotency_key FROM seal_ledger WHERE leaf_index = 20",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let p1 = verify::prove(&mut client, &v1_key, 100).await.unwrap();
    assert_eq!((p1.leaf_version, p1.record_digest.is_none()), (1, true));
    verify::verify_proof(&p1, &key, ORIGIN).unwrap();
    let p2 = verify::prove(&mut client, &v2_key, 100).await.unwrap();
    assert_eq!(p2.leaf_version, 2);
    assert_eq!(p2.leaf_index, 20);
    verify::verify_proof(&p2, &key, ORIGIN).unwrap();
    // verify-proof requires the expected origin and refuses anything
    // printed that the leaf does not prove.
    let e = verify::verify_proof(&p2, &key, "another/log").unwrap_err();
    assert!(e.contains("not the expected"), "{e}");
    let record = p2.record.clone().unwrap();
    assert_eq!(record["idempotencyKey"], json!(v2_key));
    assert_eq!(record["commitments"].as_array().unwrap().len(), 4);
    assert!(
        !record.to_string().contains("10.0.0.1"),
        "personal values stay committed"
    );
    type Forgery = fn(&mut verify::InclusionProof);
    let forgeries: [(Forgery, &str); 6] = [
        (
            |p| p.record_digest = Some("00".repeat(32)),
            "does not give its recordDigest",
        ),
        (
            |p| p.record.as_mut().unwrap()["retentionPolicy"] = json!("1d"),
            "does not give its recordDigest",
        ),
        (|p| p.event = "evt-other".into(), "names event"),
        (
            |p| p.event_time += chrono::Duration::seconds(1),
            "eventTime",
        ),
        (|p| p.event_hash = "00".repeat(32), "eventHash"),
        (|p| p.row_id = Some(1), "row id"),
    ];
    for (forge, why) in forgeries {
        let mut forged = p2.clone();
        forge(&mut forged);
        let e = verify::verify_proof(&forged, &key, ORIGIN).unwrap_err();
        assert!(e.contains(why), "{why}: {e}");
    }

    // The consistency proof between the v1 and the v2 checkpoint comes
    // from tiles (the v1 part was tiled by the v2 snapshot) and verifies.
    let cons = audit_worker::jobs::tile_store::consistency(&client, 12, None)
        .await
        .unwrap();
    assert_eq!((cons.old_size, cons.new_size), (12, 30));
    let old = audit_worker::integrity::checkpoint::open_note(&cons.old_checkpoint, &key).unwrap();
    let new = audit_worker::integrity::checkpoint::open_note(&cons.new_checkpoint, &key).unwrap();
    let nodes: Vec<[u8; 32]> = cons
        .proof
        .iter()
        .map(|h| hex::decode(h).unwrap().try_into().unwrap())
        .collect();
    audit_worker::integrity::merkle::verify_consistency(12, 30, old.root(), new.root(), &nodes)
        .unwrap();
    assert_eq!(new.root().to_vec(), hex::decode(&v2.root_hex).unwrap());
    assert!(
        audit_worker::jobs::tile_store::consistency(&client, 13, None)
            .await
            .is_err()
    );

    // A change to the hashed fields of a v1 event and to any column of a v2
    // event are both named.
    s.tamper(&format!(
        "UPDATE audit_log SET outcome_description = 'x' WHERE idempotency_key = '{v1_key}';
         UPDATE audit_log SET retention_policy = '1d' WHERE idempotency_key = '{v2_key}'"
    ))
    .await;
    let report = s.verify().await;
    assert_eq!(
        events_of(&report, FindingKind::Altered),
        BTreeSet::from([v1_key, v2_key])
    );
    s.env.cleanup().await;
}

/// An event whose custom fields exercise the canonical encoding: floats,
/// large numbers, non-ASCII and non-BMP keys, nesting.
fn varied_event(i: usize) -> Value {
    let mut e = full_event(i);
    let o = e.as_object_mut().unwrap();
    o.insert("ratio".into(), json!(i as f64 / 7.0));
    o.insert("big".into(), json!(1e21 * (i % 5) as f64));
    o.insert("tiny".into(), json!(1.5e-7 * i as f64));
    o.insert("\u{e9}clair".into(), json!(i % 2 == 0));
    o.insert("emoji\u{1F600}".into(), json!([i, "x\u{1}y", null]));
    o.insert("\u{ff61}half".into(), json!({"b": 1, "a": [2.50, -0.0]}));
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_independent_python_verifier_agrees_with_the_worker_on_a_10k_event_log_and_100_proofs()
{
    use rand::seq::index::sample;
    use rand::SeedableRng;
    let s = LogEnv::new("pyverify").await;
    let events: Vec<Value> = (0..10_000).map(varied_event).collect();
    s.ingest(&events, |c| {
        c.snapshot.personal_fields = vec!["details.email".into()]
    })
    .await;
    let summary = s.seal("all").await;
    assert_eq!(summary.tree_size, 10_000);
    let dir = tempfile::tempdir().unwrap();

    // The export, as an auditor would receive it.
    let out = dir.path().join("export");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_audit-worker"));
    cmd.args(["export", "--format", "ndjson", "--compression", "none"])
        .args(["--from", "2000-01-01", "--to", "2100-01-01", "--out"])
        .arg(&out)
        .env(
            "AUDIT_WORKER__STORAGE__URL",
            s.storage.path().display().to_string(),
        );
    for (k, v) in s.env.env_vars() {
        cmd.env(k, v);
    }
    let result = cmd.output().unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let export = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".ndjson"))
        .expect("an ndjson artifact");

    // 100 random proofs, as `prove` prints them.
    let c = s.config();
    let (mut client, conn) = audit_worker::db::pg_config(&c)
        .unwrap()
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut rng = rand::rngs::StdRng::seed_from_u64(14);
    let mut proofs = Vec::new();
    for i in sample(&mut rng, 10_000, 100) {
        let p = verify::prove(&mut client, &format!("evt-{i}"), 5000)
            .await
            .unwrap();
        assert_eq!(p.leaf_version, 2);
        proofs.push(p);
    }
    let proofs_file = dir.path().join("proofs.json");
    std::fs::write(&proofs_file, serde_json::to_vec(&proofs).unwrap()).unwrap();
    let checkpoint = dir.path().join("checkpoint");
    std::fs::write(&checkpoint, &summary.checkpoint).unwrap();

    let run = |export: &std::path::Path| {
        std::process::Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/scripts/verify_log.py"
            ))
            .args(["--key", &s.verifier, "--origin", ORIGIN, "--json"])
            .arg("--checkpoint")
            .arg(&checkpoint)
            .arg("--export")
            .arg(export)
            .arg("--proofs")
            .arg(&proofs_file)
            .output()
            .unwrap()
    };
    let result = run(&export);
    let stdout = String::from_utf8_lossy(&result.stdout).to_string();
    assert!(
        result.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["leavesRecomputed"], 10_000);
    assert_eq!(report["exportRows"], 10_000);
    assert_eq!(report["rootRecomputed"], json!(summary.root_hex));
    assert_eq!(report["signedRoot"], json!(summary.root_hex));
    assert_eq!(report["proofsChecked"], 100);

    // One changed column of a proven event in the export: the script names
    // the event and the root no longer matches.
    let victim = proofs[0].event.clone();
    let text = std::fs::read_to_string(&export).unwrap();
    let tampered: Vec<String> = text
        .lines()
        .map(|l| {
            let mut row: Value = serde_json::from_str(l).unwrap();
            if row["idempotency_key"] == json!(victim) {
                row["retention_policy"] = json!("1d");
            }
            row.to_string()
        })
        .collect();
    let bad = dir.path().join("tampered.ndjson");
    std::fs::write(&bad, tampered.join("\n")).unwrap();
    let result = run(&bad);
    assert!(!result.status.success());
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        stdout.contains(&format!("FAILED: proof of event {victim}")),
        "{stdout}"
    );
    assert!(stdout.contains("differs from the signed root"), "{stdout}");

    // A proof whose printed record or event was changed is refused.
    let mut forged = proofs.clone();
    forged[1].record.as_mut().unwrap()["retentionPolicy"] = json!("1d");
    forged[2].event = "evt-someone-else".into();
    std::fs::write(&proofs_file, serde_json::to_vec(&forged).unwrap()).unwrap();
    let result = run(&export);
    assert!(!result.status.success());
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        stdout.contains(&format!(
            "FAILED: proof of event {}: the record in the proof does not give its recordDigest",
            proofs[1].event
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("FAILED: proof of event evt-someone-else: the proof's event is not its record's idempotencyKey"),
        "{stdout}"
    );
    s.env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_independent_tlog_tiles_reader_follows_the_log_over_http() {
    let s = LogEnv::new("tiles").await;
    let first: Vec<Value> = (0..300).map(event).collect();
    s.ingest(&first, |_| {}).await;
    let old = s.seal("old").await;
    assert_eq!(old.tree_size, 300);
    let second: Vec<Value> = (300..700).map(event).collect();
    s.ingest(&second, |_| {}).await;
    let new = s.seal("new").await;
    assert_eq!((new.previous_tree_size, new.tree_size), (300, 700));
    // Tiles at size 700: level 0 tiles 0 and 1 full, tile 2 with 188
    // hashes; level 1 tile 0 with 2 (the two complete 256-leaf subtrees).
    let tiles = s
        .env
        .pg
        .query(
            "SELECT level, idx, length(hashes) / 32 FROM log_tiles ORDER BY level, idx",
            &[],
        )
        .await
        .unwrap();
    let tiles: Vec<(i16, i64, i32)> = tiles
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        tiles,
        vec![(0, 0, 256), (0, 1, 256), (0, 2, 188), (1, 0, 2)]
    );

    // The worker serves the log read-only; a reader written from the
    // specifications follows it with only the verifier key.
    let worker = InProcessWorker::start(s.worker_config());
    let port = s.env.http_port;
    wait_until(Duration::from_secs(30), "the HTTP listener", || async {
        http_status(port, "/healthz").await.is_some()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let old_cp = dir.path().join("old-checkpoint");
    std::fs::write(&old_cp, &old.checkpoint).unwrap();
    let out = std::process::Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tlog_reader.py"))
        .arg(format!("http://127.0.0.1:{port}"))
        .args([s.verifier.as_str(), ORIGIN])
        .arg(&old_cp)
        .args(["0", "255", "256", "299", "511", "699"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["size"], 700);
    assert_eq!(report["root"], json!(new.root_hex));
    assert_eq!(report["oldSize"], 300);
    assert_eq!(report["consistency"], true);
    // Each entry is the event's record digest, as in the ledger.
    let digest: Vec<u8> = s
        .env
        .pg
        .query_one("SELECT leaf FROM seal_ledger WHERE leaf_index = 511", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(report["leaves"]["511"], json!(hex::encode(digest)));

    // Non-canonical or not-yet-existing tiles are 404; the checkpoint is
    // the latest note.
    let client = reqwest::Client::new();
    let get = |path: String| {
        let client = client.clone();
        async move {
            let r = client
                .get(format!("http://127.0.0.1:{port}{path}"))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
        }
    };
    assert_eq!(
        get("/log/checkpoint".into()).await,
        (200, new.checkpoint.clone().into_bytes())
    );
    let (status, body) = get("/log/tile/0/002.p/188".into()).await;
    assert_eq!((status, body.len()), (200, 188 * 32));
    let (status, body) = get("/log/tile/entries/001".into()).await;
    assert_eq!((status, body.len()), (200, 256 * 34));
    for missing in [
        "/log/tile/0/002",
        "/log/tile/0/002.p/189",
        "/log/tile/0/2",
        "/log/tile/1/000",
        "/log/tile/entries/003",
    ] {
        assert_eq!(get(missing.into()).await.0, 404, "{missing}");
    }
    worker.stop().await;

    // Incremental verification: only what was appended since the older
    // checkpoint is re-checked.
    let since = s.verify_since(300, 1000, 0).await.unwrap();
    assert!(since.ok(), "{:?}", since.findings);
    assert_eq!(since.leaves_checked, 400);
    assert!(s.verify_since(299, 1000, 0).await.is_err());
    s.tamper("UPDATE audit_log SET details = '{}' WHERE idempotency_key IN ('evt-5', 'evt-500')")
        .await;
    // The same through three connections, 7 leaves per chunk.
    let since = s.verify_since(300, 7, 2).await.unwrap();
    assert_eq!(
        events_of(&since, FindingKind::Altered),
        BTreeSet::from(["evt-500".to_string()])
    );
    assert_eq!(
        events_of(&s.verify().await, FindingKind::Altered),
        BTreeSet::from(["evt-5".to_string(), "evt-500".to_string()])
    );
    // Rows forged into the first snapshot's range after both seals. A
    // check since 300 looks below the end that snapshot's seal vouched for
    // only at rows stored after it read: it finds the forgery stored as a
    // writer would store it, not the one given an old transaction id,
    // which the full check finds.
    s.tamper(&copy_event_sql("evt-5", "evt-forged", false))
        .await;
    s.tamper(&copy_event_sql("evt-5", "evt-forged-old-xid", true))
        .await;
    for (page, helpers) in [(1000, 0), (7, 2)] {
        let since = s.verify_since(300, page, helpers).await.unwrap();
        assert_eq!(
            events_of(&since, FindingKind::Inserted),
            BTreeSet::from(["evt-forged".to_string()])
        );
    }
    assert_eq!(
        events_of(&s.verify().await, FindingKind::Inserted),
        BTreeSet::from(["evt-forged".to_string(), "evt-forged-old-xid".to_string()])
    );
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_audit-worker"));
    cmd.args(["verify", "--since", "300"]);
    for (k, v) in s.env.env_vars() {
        cmd.env(k, v);
    }
    let out = cmd
        .env("AUDIT_WORKER__SNAPSHOT__ORIGIN", ORIGIN)
        .env("AUDIT_WORKER__SNAPSHOT__VERIFIER_KEY", &s.verifier)
        .env(
            "AUDIT_WORKER__STORAGE__URL",
            s.storage.path().display().to_string(),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(stdout.contains("ALTERED event evt-500"), "{stdout}");
    assert!(!stdout.contains("evt-5 "), "{stdout}");
    assert!(stdout.contains("400 leaves checked"), "{stdout}");
    s.env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncating_the_log_and_resetting_its_head_fails_verify_against_the_published_checkpoint() {
    let s = LogEnv::new("truncate").await;
    s.ingest(&(0..100).map(event).collect::<Vec<_>>(), |_| {})
        .await;
    let a = s.seal("a").await;
    s.ingest(&(100..200).map(event).collect::<Vec<_>>(), |_| {})
        .await;
    let b = s.seal("b").await;
    assert_eq!((a.tree_size, b.tree_size), (100, 200));
    // Both checkpoints are published outside the database, append-only.
    let folder = s
        .storage
        .path()
        .join("snapshots/test.example_log-v2/checkpoints");
    for size in [100, 200] {
        let note = std::fs::read_to_string(folder.join(format!("{size:020}.note"))).unwrap();
        assert_eq!(
            note,
            if size == 100 {
                &a.checkpoint
            } else {
                &b.checkpoint
            }
            .as_str()
        );
    }

    // The monitor of a running worker sees the log extend its last
    // published checkpoint.
    let mut c = s.worker_config();
    c.snapshot.enabled = false;
    c.snapshot.verifier_key = s.verifier.clone();
    c.snapshot.monitor_interval_secs = 1;
    c.alerts.stream = format!("test:{}:alerts", s.env.name);
    let alerts_stream = c.alerts.stream.clone();
    let worker = InProcessWorker::start(c);
    let port = s.env.http_port;
    wait_until(
        Duration::from_secs(30),
        "the monitor to report 1",
        || async {
            metric(port, "audit_worker_log_extends_published_checkpoint").await == Some(1.0)
        },
    )
    .await;

    // A superuser removes the newest snapshot with its ledger entries,
    // rows, salts and tiles, and resets the head: the database is
    // consistent again, and a check of the database alone passes.
    s.env
        .pg
        .batch_execute(
            "ALTER TABLE seal_ledger DISABLE TRIGGER seal_ledger_append_only;
             ALTER TABLE snapshots DISABLE TRIGGER snapshots_guard;
             ALTER TABLE log_tiles DISABLE TRIGGER log_tiles_grow_only;
             ALTER TABLE audit_log DISABLE TRIGGER audit_log_immutable;",
        )
        .await
        .unwrap();
    s.env
        .pg
        .batch_execute(&format!(
            "DELETE FROM audit_salts s USING seal_ledger l
              WHERE l.snapshot_id = {id} AND s.audit_id = l.row_id;
             DELETE FROM audit_log a USING seal_ledger l
              WHERE l.snapshot_id = {id} AND a.id = l.row_id AND a.event_time = l.event_time;
             DELETE FROM seal_ledger WHERE snapshot_id = {id};
             DELETE FROM snapshot_jobs WHERE snapshot_id = {id};
             DELETE FROM snapshots WHERE id = {id};
             DELETE FROM log_tiles;
             UPDATE snapshot_log_head SET tree_size = 100, snapshot_id = {a_id};",
            id = b.snapshot_id,
            a_id = a.snapshot_id
        ))
        .await
        .unwrap();
    s.env
        .pg
        .batch_execute(
            "ALTER TABLE seal_ledger ENABLE TRIGGER seal_ledger_append_only;
             ALTER TABLE snapshots ENABLE TRIGGER snapshots_guard;
             ALTER TABLE log_tiles ENABLE TRIGGER log_tiles_grow_only;
             ALTER TABLE audit_log ENABLE TRIGGER audit_log_immutable;",
        )
        .await
        .unwrap();
    let db_only = s.verify().await;
    assert!(db_only.ok(), "{:?}", db_only.findings);

    // The monitor notices: the gauge drops to 0 and one security alert is
    // raised, naming what is missing.
    wait_until(
        Duration::from_secs(30),
        "the monitor to report 0",
        || async {
            metric(port, "audit_worker_log_extends_published_checkpoint").await == Some(0.0)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        metric(
            port,
            "audit_worker_security_alerts_total{rule=\"log_truncated\"}"
        )
        .await,
        Some(1.0),
        "one alert, not one per round"
    );
    let mut conn = s.env.redis_conn().await;
    let entries: redis::Value = redis::cmd("XRANGE")
        .arg(&alerts_stream)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let entries = audit_worker::source::stream::parse_entries(&entries);
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].field("rule").unwrap(), b"log_truncated");
    let message = String::from_utf8_lossy(entries[0].field("message").unwrap()).to_string();
    assert!(message.contains("truncated or rolled back"), "{message}");
    worker.stop().await;

    // Against the last published checkpoint it fails, naming what is gone.
    let c = s.config();
    let (mut client, conn) = audit_worker::db::pg_config(&c)
        .unwrap()
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let storage = audit_worker::storage::open(&c.storage).unwrap();
    let published = audit_worker::jobs::published::latest(
        &storage,
        &audit_worker::jobs::published::folder(&c.snapshot.manifest_prefix, ORIGIN),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(published, b.checkpoint);
    let verifier = audit_worker::jobs::snapshot::load_verifier(&c.snapshot).unwrap();
    let findings = audit_worker::jobs::published::check_extends(
        &mut client,
        &verifier,
        ORIGIN,
        &published,
        1000,
    )
    .await
    .unwrap();
    let details: Vec<&str> = findings.iter().map(|f| f.detail.as_str()).collect();
    assert_eq!(findings.len(), 3, "{details:?}");
    assert!(
        details[0].contains("head says 100 leaves but the trusted checkpoint has 200"),
        "{details:?}"
    );
    assert!(
        details[1].contains("100 ledger entries are missing"),
        "{details:?}"
    );
    assert!(
        details[2].contains("no snapshot has the trusted checkpoint's size 200"),
        "{details:?}"
    );

    // The command does the same by default, and accepts an older trusted
    // checkpoint that the log still extends.
    let cli = |extra: &[&str]| {
        let mut args: Vec<&std::ffi::OsStr> = vec!["verify".as_ref()];
        args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
        s.worker_cli(&args)
    };
    let out = cli(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("truncated or rolled back"), "{stdout}");
    let old = s.storage.path().join("a.note");
    std::fs::write(&old, &a.checkpoint).unwrap();
    let out = cli(&["--trusted-checkpoint", old.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    s.env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_arriving_after_its_period_was_sealed_is_sealed_next_and_listed_as_late() {
    let s = LogEnv::new("late").await;
    s.ingest(&(0..20).map(event).collect::<Vec<_>>(), |_| {})
        .await;
    let first = s.seal("first").await;
    assert_eq!(first.record_count, 20);
    // Its timestamp lies an hour back, inside the range just sealed.
    let mut late = event(20);
    late["eventId"] = json!("evt-late");
    late["timestamp"] = json!(ts(3_000));
    // A timely one, stamped after the first snapshot's range.
    let mut timely = event(21);
    timely["timestamp"] = json!(ts(0));
    s.ingest(&[late, timely], |_| {}).await;
    let before = s.verify().await;
    assert_eq!(
        events_of(&before, FindingKind::Inserted),
        BTreeSet::from(["evt-late".to_string()]),
        "until sealed, a late arrival is an unsealed row inside a sealed range"
    );
    let second = s.seal("second").await;
    assert_eq!((second.previous_tree_size, second.tree_size), (20, 22));
    let marked = s
        .env
        .pg
        .query(
            "SELECT l.idempotency_key, l.late_arrival = a.ingested_at FROM seal_ledger l
               JOIN audit_log a ON a.event_time = l.event_time AND a.id = l.row_id
              WHERE l.late_arrival IS NOT NULL",
            &[],
        )
        .await
        .unwrap();
    let marked: Vec<(String, bool)> = marked.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(marked, vec![("evt-late".to_string(), true)]);
    assert_eq!(
        s.verify_ok_late().await,
        vec![("evt-late".to_string(), second.snapshot_id)]
    );
    s.env.cleanup().await;
}

/// A log restored from a logical dump into another cluster keeps its
/// snapshots' marks, but the new cluster's transaction ids may be lower:
/// every row stored there would look older than the mark. A seal whose own
/// snapshot's xmin is below the latest mark does not use it, and reads
/// everything before its end, as the first seal did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mark_above_the_clusters_transaction_ids_is_not_trusted() {
    let s = LogEnv::new("late_restored").await;
    s.ingest(&(0..10).map(event).collect::<Vec<_>>(), |_| {})
        .await;
    s.seal("first").await;
    s.env
        .pg
        .batch_execute(
            "ALTER TABLE snapshots DISABLE TRIGGER snapshots_guard;
             UPDATE snapshots SET arrivals_xmin = 4000000000000000;
             ALTER TABLE snapshots ENABLE TRIGGER snapshots_guard;",
        )
        .await
        .unwrap();
    let mut late = event(10);
    late["eventId"] = json!("evt-late");
    late["timestamp"] = json!(ts(3_000));
    s.ingest(&[late], |_| {}).await;
    let second = s.seal("second").await;
    assert_eq!((second.previous_tree_size, second.tree_size), (10, 11));
    let mark: i64 = s
        .env
        .pg
        .query_one(
            "SELECT arrivals_xmin FROM snapshots WHERE id = $1",
            &[&second.snapshot_id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(mark < 4_000_000_000_000_000, "{mark}");
    assert_eq!(
        s.verify_ok_late().await,
        vec![("evt-late".to_string(), second.snapshot_id)]
    );
    s.env.cleanup().await;
}

/// SQL that stores a copy of the stored event `of` (its columns and salts)
/// under the key and eventId `key`, as a writer (or a forger) could.
/// `old_xid`: the copy claims to have been inserted by transaction 3, the
/// first normal one, older than any seal's mark (even when other tests'
/// open transactions hold the cluster's xmin back), instead of its own.
fn copy_event_sql(of: &str, key: &str, old_xid: bool) -> String {
    let columns = "event_time, timestamp_raw, action, status, principal_id, organization_id, \
                   target_resource_type, target_resource_id, outcome_description, hash, \
                   hash_algorithm, hash_provided, signature, signature_algorithm, \
                   signature_key_id, event_version, correlation_id, data_classification, \
                   retention_policy, session_context, details, source";
    let (xid_column, xid) = match old_xid {
        true => ("ingest_xid, ", "'3'::xid8, "),
        false => ("", ""),
    };
    format!(
        "WITH copy AS (
           INSERT INTO audit_log (idempotency_key, event_id, {xid_column}{columns})
           SELECT '{key}', '{key}', {xid}{columns} FROM audit_log WHERE event_id = '{of}'
           RETURNING id)
         INSERT INTO audit_salts (audit_id, salts)
         SELECT copy.id, s.salts FROM copy, audit_salts s JOIN audit_log a ON a.id = s.audit_id
          WHERE a.event_id = '{of}'"
    )
}

/// A scheduled seal reads, of everything before its range, only the rows
/// of transactions that had not ended when the previous scheduled seal
/// read (its snapshot's xmin). A writer whose transaction is still open
/// across a seal must not slip under that mark: its late row is sealed by
/// the seal after it commits. (A mark taken as "the newest transaction so
/// far" would skip it for ever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_event_committed_after_a_seal_read_is_sealed_by_the_next_scheduled_seal() {
    let s = LogEnv::new("late_inflight").await;
    s.ingest(&(0..10).map(event).collect::<Vec<_>>(), |_| {})
        .await;
    let first = s.seal("first").await;
    assert_eq!(first.record_count, 10);
    // A writer stores a copy of a sealed event under a new key, so that it
    // is late, and keeps its transaction open.
    let mut writer = s.client().await;
    let open = writer.transaction().await.unwrap();
    open.batch_execute(&copy_event_sql("evt-5", "evt-inflight", false))
        .await
        .unwrap();
    // A timely event, and a scheduled seal while the writer is still open.
    let mut timely = event(10);
    timely["timestamp"] = json!(ts(0));
    s.ingest(&[timely], |_| {}).await;
    let second = s.seal("second").await;
    assert_eq!(
        (second.previous_tree_size, second.tree_size),
        (10, 11),
        "the open transaction's row is not visible to the second seal"
    );
    open.commit().await.unwrap();
    let third = s.seal("third").await;
    assert_eq!((third.previous_tree_size, third.tree_size), (11, 12));
    let sealed: Vec<(String, bool)> = s
        .env
        .pg
        .query(
            "SELECT idempotency_key, late_arrival IS NOT NULL FROM seal_ledger WHERE leaf_index = 11",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(sealed, vec![("evt-inflight".to_string(), true)]);
    // Every scheduled seal recorded its mark, ending where its range ends.
    let recorded: Vec<bool> = s
        .env
        .column(
            "SELECT arrivals_xmin IS NOT NULL AND arrivals_before = range_to
               FROM snapshots ORDER BY id",
        )
        .await;
    assert_eq!(recorded, vec![true, true, true]);
    assert_eq!(
        s.verify_ok_late().await,
        vec![("evt-inflight".to_string(), third.snapshot_id)]
    );
    s.env.cleanup().await;
}

/// A metric's value from the worker's /metrics (`name` with its labels).
/// The value of the sample `name` (with its labels, as printed) on the
/// worker's /metrics.
pub(crate) async fn metric(port: u16, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
