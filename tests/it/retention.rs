//! Retention: monthly partitions go only when every row is past its
//! retention, sealed and under no legal hold; the log stays provable and
//! `verify` reports the dropped leaves as pruned.

use std::collections::{BTreeMap, BTreeSet};

use audit_worker::jobs::retention::{self, RetentionPolicy, Verdict};
use audit_worker::jobs::verify;
use audit_worker::telemetry::Metrics;
use chrono::{Duration, Utc};
use serde_json::{json, Value};

use crate::common::*;
use crate::log_v2::LogEnv;
use crate::roles::{assert_denied, connect_as, create_login};

/// An event at `timestamp`, about `subject`, with an optional retention
/// policy.
fn dated_event(id: &str, timestamp: &str, subject: &str, policy: Option<&str>) -> Value {
    let mut e = json!({
        "eventId": id,
        "timestamp": timestamp,
        "action": "record.read",
        "status": "success",
        "principalId": subject,
        "organizationId": "org-r",
        "targetResourceId": format!("res-{id}"),
        "sessionContext": {"ipAddress": "10.1.2.3", "userAgent": "test"},
    });
    if let Some(p) = policy {
        e["retentionPolicy"] = json!(p);
    }
    e
}

fn refused(m: &Metrics, reason: &str) -> u64 {
    m.retention_refused.with_label_values(&[reason]).get()
}

/// Runs scripts/verify_log.py on `proofs`; returns its JSON summary.
fn python_verifies_proofs(s: &LogEnv, proofs: &[verify::InclusionProof]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proofs.json");
    std::fs::write(&file, serde_json::to_vec(proofs).unwrap()).unwrap();
    s.verify_log_py(&["--proofs".as_ref(), file.as_os_str()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_only_expired_sealed_unheld_partitions_and_the_log_stays_provable() {
    let s = LogEnv::new("retention").await;
    // 2555 days (the default) before now is about 7 years ago: 2018 is past
    // it. A "short" policy keeps 40 days (longer than any month, so this
    // month is never due); "mystery" is unknown.
    let recent = (Utc::now() - Duration::days(120)).format("%Y-%m-15T10:00:00.000Z");
    let recent_partition = (Utc::now() - Duration::days(120))
        .format("audit_log_y%Ym%m")
        .to_string();
    let mut events = Vec::new();
    for i in 0..5 {
        events.push(dated_event(
            &format!("jan-{i}"),
            &format!("2018-01-1{i}T08:00:00.000Z"),
            &format!("u-{i}"),
            None,
        ));
        events.push(dated_event(
            &format!("feb-{i}"),
            &format!("2018-02-1{i}T08:00:00.000Z"),
            &format!("u-{i}"),
            None,
        ));
        events.push(dated_event(
            &format!("mar-{i}"),
            &format!("2018-03-1{i}T08:00:00.000Z"),
            &format!("u-{i}"),
            None,
        ));
    }
    events.push(dated_event(
        "mar-held",
        "2018-03-20T08:00:00.000Z",
        "held-subject",
        None,
    ));
    events.push(dated_event(
        "apr-0",
        "2018-04-10T08:00:00.000Z",
        "u-0",
        None,
    ));
    events.push(dated_event(
        "apr-mystery",
        "2018-04-11T08:00:00.000Z",
        "u-1",
        Some("mystery"),
    ));
    events.push(dated_event(
        "recent-short",
        &recent.to_string(),
        "u-2",
        Some("short"),
    ));
    // A recent event under the default period: its partition is not due.
    events.push(dated_event("now-0", &ts(0), "u-3", None));
    s.ingest(&events, |_| {}).await;
    let sealed = s.seal("first").await;
    assert_eq!(sealed.tree_size, events.len() as i64);

    // A late event for February, stored after sealing: unsealed.
    s.ingest(
        &[dated_event(
            "feb-late",
            "2018-02-25T08:00:00.000Z",
            "u-9",
            None,
        )],
        |_| {},
    )
    .await;
    // A hold over one subject's events, placed with plain SQL.
    s.env
        .pg
        .execute(
            "INSERT INTO legal_holds (id, subject_id, reason, owner, created_by)
             VALUES ('hold-lit-7', 'held-subject', 'litigation 7', 'legal@example', 'test')",
            &[],
        )
        .await
        .unwrap();

    let mut c = s.config();
    c.retention.policies = BTreeMap::from([("short".to_string(), 40)]);
    let policy = RetentionPolicy::from_config(&c.retention);
    let (client, conn) = audit_worker::db::pg_config(&c)
        .unwrap()
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);

    // The dry run says what would go and why the rest stays.
    let plan = retention::plan(&client, &policy, Utc::now()).await.unwrap();
    let verdict = |name: &str| {
        plan.iter()
            .find(|v| v.partition == name)
            .unwrap_or_else(|| panic!("{name} listed"))
            .verdict
            .clone()
    };
    let codes = |v: Verdict| match v {
        Verdict::Keep { reasons } => reasons
            .into_iter()
            .map(|r| (r.code, r.hold_id))
            .collect::<Vec<_>>(),
        other => panic!("kept, not {other:?}"),
    };
    assert_eq!(verdict("audit_log_y2018m01"), Verdict::Drop);
    assert_eq!(verdict(&recent_partition), Verdict::Drop);
    assert_eq!(
        codes(verdict("audit_log_y2018m02")),
        vec![("unsealed".into(), None)]
    );
    assert_eq!(
        codes(verdict("audit_log_y2018m03")),
        vec![("legal_hold".into(), Some("hold-lit-7".into()))]
    );
    assert_eq!(
        codes(verdict("audit_log_y2018m04")),
        vec![("unknown_policy".into(), None)]
    );
    let this_month = Utc::now().format("audit_log_y%Ym%m").to_string();
    assert_eq!(verdict(&this_month), Verdict::NotDue);
    // The CLI's dry run prints the same, and drops nothing.
    let dir = tempfile::tempdir().unwrap();
    let config_file = dir.path().join("retention.toml");
    std::fs::write(&config_file, "[retention]\npolicies = { short = 40 }\n").unwrap();
    let out = s.worker_cli(&[
        "--config".as_ref(),
        config_file.as_os_str(),
        "retention".as_ref(),
        "--dry-run".as_ref(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("DROP audit_log_y2018m01"), "{stdout}");
    assert!(
        stdout.contains("KEEP audit_log_y2018m03: legal hold hold-lit-7"),
        "{stdout}"
    );
    assert!(stdout.contains("dry run: 2 of"), "{stdout}");
    let rows_before = s.env.row_count().await;
    assert_eq!(rows_before, events.len() as i64 + 1);

    // The append-only guard still refuses DELETE and TRUNCATE, whatever
    // retention may do.
    for sql in [
        "DELETE FROM audit_log WHERE event_time < '2018-02-01'",
        "TRUNCATE audit_log_y2018m01",
        "TRUNCATE audit_log",
    ] {
        let e = s.env.pg.batch_execute(sql).await.unwrap_err();
        assert!(
            e.as_db_error().unwrap().message().contains("append-only"),
            "{sql}: {e}"
        );
    }

    let january_ids: Vec<i64> = s
        .env
        .column("SELECT id FROM audit_log WHERE event_time < '2018-02-01'")
        .await;
    assert_eq!(january_ids.len(), 5);

    // Only the retention role may take the drop path, and it cannot
    // delete rows either.
    let retainer = create_login(&s.env, "retention", "audit_worker_retention").await;
    let writer = create_login(&s.env, "writer", "audit_worker_writer").await;
    let as_retainer = connect_as(&retainer, &s.env.schema).await;
    let as_writer = connect_as(&writer, &s.env.schema).await;
    assert_denied(
        as_writer
            .execute(
                "SELECT audit_log_drop_expired_partition('audit_log_y2018m01', '{}', 1, 1000)",
                &[],
            )
            .await,
        "the drop function as the writer",
    );
    assert_denied(
        as_retainer
            .execute("DELETE FROM audit_log WHERE event_time < '2018-02-01'", &[])
            .await,
        "DELETE as the retention role",
    );

    // One pass, as the retention role: January and the recent "short"
    // month go, the rest stays.
    // Each drop is recorded as an audit event; here on a stream of its own,
    // stored at the end of the test (the seals below count the rows).
    let mut events_config = c.clone();
    events_config.stream.key = format!("{}:retention-events", s.env.stream);
    let redis = audit_worker::source::command_connection(
        &audit_worker::source::redis_client(&c.redis).unwrap(),
        &c.redis,
    )
    .await
    .unwrap();
    let recorder = audit_worker::jobs::internal_event::EventRecorder::new(&events_config, redis);
    let metrics = Metrics::new();
    let report = retention::run_pass(&as_retainer, &policy, Some(&metrics), Some(&recorder))
        .await
        .unwrap();
    assert_eq!(
        report
            .events_recorded
            .iter()
            .map(String::as_str)
            .collect::<BTreeSet<_>>(),
        BTreeSet::from(["audit_log_y2018m01", recent_partition.as_str()])
    );
    let dropped: BTreeSet<&str> = report.dropped.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        dropped,
        BTreeSet::from(["audit_log_y2018m01", recent_partition.as_str()])
    );
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(metrics.retention_dropped.get(), 2);
    assert_eq!(refused(&metrics, "unsealed"), 1);
    assert_eq!(refused(&metrics, "legal_hold"), 1);
    assert_eq!(refused(&metrics, "unknown_policy"), 1);
    assert_eq!(refused(&metrics, "retention"), 0);
    assert_eq!(s.env.row_count().await, rows_before - 6);
    // The dropped rows' salts are destroyed with them.
    let salts: i64 = s
        .env
        .pg
        .query_one(
            "SELECT count(*) FROM audit_salts WHERE audit_id = ANY($1)",
            &[&january_ids],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(salts, 0);

    // verify names what was pruned, not missing; its one finding is the
    // late February event, unsealed inside a sealed range until the next
    // snapshot.
    let report = s.verify().await;
    let findings: Vec<_> = report
        .findings
        .iter()
        .map(|f| (f.kind, f.event.clone()))
        .collect();
    assert_eq!(
        findings,
        vec![(verify::FindingKind::Inserted, Some("feb-late".to_string()))],
        "{:#?}",
        report.findings
    );
    let pruned: BTreeMap<String, (i64, u64)> = report
        .pruned
        .iter()
        .map(|p| (p.partition.clone(), (p.leaves, p.leaves_checked)))
        .collect();
    assert_eq!(
        pruned,
        BTreeMap::from([
            ("audit_log_y2018m01".to_string(), (5, 5)),
            (recent_partition.clone(), (1, 1)),
        ])
    );

    // Later events: seal the late one and a new one, and prove events of
    // the remaining partitions; the independent verifier accepts them.
    s.ingest(&[dated_event("after-drop", &ts(0), "u-4", None)], |_| {})
        .await;
    let second = s.seal("second").await;
    assert_eq!(second.tree_size, sealed.tree_size + 2);
    let (mut prover, conn) = audit_worker::db::pg_config(&c)
        .unwrap()
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut proofs = Vec::new();
    for event in [
        "feb-0",
        "feb-late",
        "mar-held",
        "apr-mystery",
        "now-0",
        "after-drop",
    ] {
        proofs.push(verify::prove(&mut prover, event, 1000).await.unwrap());
    }
    // A dropped event can no longer be proven, and `prove` says why.
    let e = verify::prove(&mut prover, "jan-0", 1000).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("was removed by retention with partition audit_log_y2018m01"),
        "{e}"
    );
    let summary = python_verifies_proofs(&s, &proofs);
    assert_eq!(summary["proofsChecked"], 6, "{summary}");

    // Releasing the hold (plain SQL) lets March go at the next pass;
    // February is sealed now and goes too.
    s.env
        .pg
        .execute(
            "UPDATE legal_holds SET released_at = now(), released_by = 'test' WHERE id = 'hold-lit-7'",
            &[],
        )
        .await
        .unwrap();
    // This pass has no recorder (as if Redis were down): the drops are
    // recorded by the next pass that has one.
    let report = retention::run_pass(&client, &policy, Some(&metrics), None)
        .await
        .unwrap();
    assert!(report.events_recorded.is_empty());
    let dropped: BTreeSet<&str> = report.dropped.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        dropped,
        BTreeSet::from(["audit_log_y2018m02", "audit_log_y2018m03"])
    );
    assert_eq!(metrics.retention_dropped.get(), 4);
    assert_eq!(
        refused(&metrics, "legal_hold"),
        1,
        "no hold refuses any more"
    );
    assert_eq!(refused(&metrics, "unknown_policy"), 2);
    let report = s.verify().await;
    assert!(report.ok(), "{:#?}", report.findings);
    assert_eq!(report.pruned.len(), 4);
    assert_eq!(
        report.pruned.iter().map(|p| p.leaves_checked).sum::<u64>(),
        5 + 1 + 6 + 6
    );
    // `audit-worker verify` says the same, against the published
    // checkpoints.
    let out = s.worker_cli(&["verify".as_ref()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("PRUNED partition audit_log_y2018m01 ")
            && stdout.contains("dropped by retention at")
            && stdout.contains(": 5 leaves (5 in this check)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("18 pruned by retention, 0 erased), 0 problems"),
        "{stdout}"
    );
    // The remaining proofs still verify against the latest checkpoint.
    let mut proofs = Vec::new();
    for event in ["apr-mystery", "now-0", "after-drop"] {
        proofs.push(verify::prove(&mut prover, event, 1000).await.unwrap());
    }
    assert_eq!(python_verifies_proofs(&s, &proofs)["proofsChecked"], 3);

    // The next pass records the two drops the last one could not; a pass
    // after it records nothing again.
    let report = retention::run_pass(&client, &policy, None, Some(&recorder))
        .await
        .unwrap();
    assert!(report.dropped.is_empty());
    assert_eq!(
        report.events_recorded,
        vec![
            "audit_log_y2018m02".to_string(),
            "audit_log_y2018m03".to_string()
        ]
    );
    let report = retention::run_pass(&client, &policy, None, Some(&recorder))
        .await
        .unwrap();
    assert!(report.events_recorded.is_empty());
    // An event added twice (a retry after a lost reply) is stored once.
    let jan = client
        .query_one(
            "SELECT partition, range_from, range_to, dropped_at, dropped_by, row_count, leaf_count, tree_size
               FROM retention_prunes WHERE partition = 'audit_log_y2018m01'",
            &[],
        )
        .await
        .unwrap();
    let jan = retention::Prune {
        partition: jan.get(0),
        range_from: jan.get(1),
        range_to: jan.get(2),
        dropped_at: jan.get(3),
        dropped_by: jan.get(4),
        row_count: jan.get(5),
        leaf_count: jan.get(6),
        tree_size: jan.get(7),
    };
    assert_eq!(jan.dropped_by, retainer, "the role that ran the drop");
    recorder.record(&retention::drop_event(&jan)).await.unwrap();
    // A worker reading that stream stores the events: one per drop.
    let worker = InProcessWorker::start({
        let mut w = s.worker_config();
        w.stream.key = events_config.stream.key.clone();
        w
    });
    let stored = "SELECT target_resource_id, idempotency_key, principal_id, details->>'rowsDropped', outcome_description
                    FROM audit_log WHERE action = 'audit.retention.partition_dropped' ORDER BY target_resource_id";
    wait_until(
        std::time::Duration::from_secs(60),
        "the drops' events stored",
        || async { s.env.pg.query(stored, &[]).await.unwrap().len() == 4 },
    )
    .await;
    wait_until(
        std::time::Duration::from_secs(30),
        "the stream read to its end",
        || async {
            let len: usize = redis::cmd("XLEN")
                .arg(&events_config.stream.key)
                .query_async(&mut s.env.redis_conn().await)
                .await
                .unwrap();
            len == 0
        },
    )
    .await;
    worker.stop().await;
    let rows = s.env.pg.query(stored, &[]).await.unwrap();
    let events: Vec<(String, String, String, Option<String>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let mut want = vec![
        (
            "audit_log_y2018m01".to_string(),
            "5".to_string(),
            retainer.clone(),
        ),
        (
            "audit_log_y2018m02".to_string(),
            "6".to_string(),
            String::new(),
        ),
        (
            "audit_log_y2018m03".to_string(),
            "6".to_string(),
            String::new(),
        ),
        (recent_partition.clone(), "1".to_string(), retainer.clone()),
    ];
    want.sort();
    assert_eq!(events.len(), 4, "{events:?}");
    for ((partition, key, principal, rows), (want_partition, want_rows, by)) in
        events.iter().zip(&want)
    {
        assert_eq!(partition, want_partition);
        assert_eq!(
            key,
            &format!("audit.retention.partition_dropped-{partition}")
        );
        assert_eq!(rows.as_deref(), Some(want_rows.as_str()), "{partition}");
        if !by.is_empty() {
            assert_eq!(principal, &format!("retention:{by}"));
        }
    }
    let outcome: String = rows[0].get(4);
    assert!(
        outcome.contains("partition audit_log_y2018m01 dropped by retention: 5 rows"),
        "{outcome}"
    );
    let _: () = redis::cmd("DEL")
        .arg(&events_config.stream.key)
        .query_async(&mut s.env.redis_conn().await)
        .await
        .unwrap();
    drop(as_retainer);
    drop(as_writer);
    s.env.cleanup().await;
    for role in [&retainer, &writer] {
        client
            .batch_execute(&format!("DROP ROLE \"{role}\""))
            .await
            .expect("test role dropped");
    }
}
