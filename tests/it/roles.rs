//! Least privilege (migration V4): the worker runs under a LOGIN role in
//! `audit_worker_writer` and ingests, yet that role cannot rewrite or erase
//! audit rows; a role in `audit_worker_reader` can only read.

use std::time::Duration;

use serde_json::json;
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use crate::common::*;

/// A LOGIN role created for one test in a group role, dropped by `drop_role`.
pub(crate) async fn create_login(env: &TestEnv, suffix: &str, group: &str) -> String {
    let role = format!("aw_{suffix}_{}", env.name).to_lowercase();
    env.pg
        .batch_execute(&format!("CREATE ROLE \"{role}\" LOGIN IN ROLE {group}"))
        .await
        .expect("create test login role");
    role
}

/// The test database URL with another user name (trust authentication).
fn url_as(role: &str) -> String {
    let base = test_database_url();
    let (scheme, rest) = base.split_once("://").expect("URL has a scheme");
    let host = rest.split_once('@').map_or(rest, |(_, h)| h);
    format!("{scheme}://{role}@{host}")
}

/// A connection as `role`, in `schema`.
pub(crate) async fn connect_as(role: &str, schema: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(&url_as(role), NoTls)
        .await
        .expect("login role connects");
    tokio::spawn(conn);
    c.batch_execute(&format!("SET search_path = \"{schema}\""))
        .await
        .unwrap();
    c
}

/// `r` failed for want of a privilege.
pub(crate) fn assert_denied(r: Result<u64, tokio_postgres::Error>, what: &str) {
    let err = r.expect_err(what);
    assert_eq!(
        err.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{what}: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_ingests_under_the_writer_role_which_cannot_update_or_delete() {
    let env = TestEnv::new("roles").await;
    // Migrations run as the owner (here the superuser), as in production.
    let owner = env.config();
    audit_worker::db::migrate(&owner)
        .await
        .expect("migrate as owner");
    let writer = create_login(&env, "w", "audit_worker_writer").await;
    let reader = create_login(&env, "r", "audit_worker_reader").await;

    let mut config = env.config();
    config.database.url = url_as(&writer).into();
    config.database.migrate_on_start = false;
    let mut events: Vec<_> = (0..200).map(event).collect();
    // A month long past: its partition must be created on demand, which the
    // writer may only do through the SECURITY DEFINER function.
    events[7]["timestamp"] = json!("2018-07-04T12:00:00.000Z");
    env.add_events(&events).await;
    let worker = InProcessWorker::start(config);
    wait_until(
        Duration::from_secs(60),
        "200 rows as the writer",
        || async { env.row_count().await == 200 && env.pending_count().await == 0 },
    )
    .await;
    worker.stop().await;
    assert_eq!(env.dlq_len().await, 0);

    let w = connect_as(&writer, &env.schema).await;
    let n: i64 = w
        .query_one("SELECT count(*) FROM audit_log", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 200, "the writer may read what it needs");
    assert_denied(
        w.execute("UPDATE audit_log SET action = 'rewritten'", &[])
            .await,
        "UPDATE as writer",
    );
    assert_denied(
        w.execute("DELETE FROM audit_log", &[]).await,
        "DELETE as writer",
    );
    assert_denied(
        w.execute("DELETE FROM audit_log_y2018m07", &[]).await,
        "DELETE on a partition as writer",
    );
    assert_denied(
        w.execute("TRUNCATE audit_log", &[]).await,
        "TRUNCATE as writer",
    );
    assert_denied(
        w.execute("CREATE TABLE sneaky (x int)", &[]).await,
        "CREATE in the schema as writer",
    );
    assert_denied(
        w.execute("DROP TABLE audit_log", &[]).await.map(|_| 0),
        "DROP as writer",
    );

    let r = connect_as(&reader, &env.schema).await;
    let n: i64 = r
        .query_one("SELECT count(*) FROM audit_log", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 200);
    assert_denied(
        r.execute(
            "INSERT INTO audit_log (event_time, timestamp_raw, idempotency_key, action, status, hash, hash_provided, source)
             VALUES (now(), 'x', 'forged', 'a', 'success', 'h', false, 'manual')",
            &[],
        )
        .await,
        "INSERT as reader",
    );
    assert_denied(
        r.execute("SELECT audit_log_ensure_partition('2019-01-01')", &[])
            .await,
        "partition function as reader",
    );
    assert_eq!(env.row_count().await, 200, "nothing was changed");

    drop(w);
    drop(r);
    env.cleanup().await;
    // The test's login roles leave nothing behind.
    let pg = {
        let (c, conn) = tokio_postgres::connect(&test_database_url(), NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c
    };
    for role in [&writer, &reader] {
        pg.batch_execute(&format!("DROP ROLE \"{role}\""))
            .await
            .expect("test role dropped");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealer_seals_without_any_right_to_change_audit_rows_and_a_reader_verifies() {
    use audit_worker::integrity::checkpoint::Ed25519NoteSigner;
    let env = TestEnv::new("rolesseal").await;
    let owner = env.config();
    audit_worker::db::migrate(&owner)
        .await
        .expect("migrate as owner");
    let events: Vec<_> = (0..50).map(event).collect();
    env.add_events(&events).await;
    let worker = InProcessWorker::start(owner);
    wait_until(Duration::from_secs(60), "50 rows", || async {
        env.row_count().await == 50
    })
    .await;
    worker.stop().await;

    let sealer = create_login(&env, "s", "audit_worker_writer, audit_worker_sealer").await;
    let reader = create_login(&env, "r", "audit_worker_reader").await;
    let signer = Ed25519NoteSigner::generate("roles.example/log").unwrap();
    let storage = tempfile::tempdir().unwrap();
    let mut c = env.config();
    c.database.url = url_as(&sealer).into();
    c.database.migrate_on_start = false;
    c.snapshot.origin = "roles.example/log".into();
    c.snapshot.signing_key = signer.to_private_key_string().into();
    c.storage.url = storage.path().display().to_string();
    let pool = audit_worker::db::connect_pool(&c).await.unwrap();
    let key = audit_worker::jobs::snapshot::load_signer(&c.snapshot)
        .unwrap()
        .unwrap();
    let store = audit_worker::storage::open(&c.storage).unwrap();
    let summary = audit_worker::jobs::snapshot::Snapshotter::new(&c, pool, key, store, None)
        .snapshot_now("test:roles", None, chrono::Utc::now())
        .await
        .expect("the sealer seals");
    assert_eq!(summary.record_count, 50);

    let s = connect_as(&sealer, &env.schema).await;
    for sql in [
        "UPDATE audit_log SET snapshot_id = 1, leaf_index = 0",
        "UPDATE audit_log SET action = 'rewritten'",
        "DELETE FROM audit_log",
        "UPDATE audit_salts SET salts = '{}'",
        "DELETE FROM audit_salts",
    ] {
        assert_denied(s.execute(sql, &[]).await, sql);
    }

    let mut r = connect_as(&reader, &env.schema).await;
    let report = audit_worker::jobs::verify::verify(
        &mut r,
        &signer.verifier(),
        "roles.example/log",
        None,
        1000,
    )
    .await
    .expect("the reader verifies");
    assert!(report.ok(), "{:?}", report.findings);
    assert_eq!(report.leaves_checked, 50);

    drop(s);
    drop(r);
    env.cleanup().await;
    let pg = {
        let (c, conn) = tokio_postgres::connect(&test_database_url(), NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c
    };
    for role in [&sealer, &reader] {
        pg.batch_execute(&format!("DROP ROLE \"{role}\""))
            .await
            .expect("test role dropped");
    }
}
