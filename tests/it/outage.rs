//! A long database outage under load with several replicas: while workers
//! hold entries they cannot store, other replicas claim them (XAUTOCLAIM)
//! and their delivery counts grow; none of that may turn an event into a
//! `max_deliveries` dead letter, lose it or store it twice.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::bullmq::{stop, WorkerProcess};
use crate::common::*;

/// Settings every replica of this test shares: claims after 3 s idle, and
/// only three deliveries before an entry counts as poison.
fn replica_settings() -> [(&'static str, String); 2] {
    [
        ("AUDIT_WORKER__STREAM__CLAIM_IDLE_MS", "3000".to_string()),
        ("AUDIT_WORKER__STREAM__MAX_DELIVERIES", "3".to_string()),
    ]
}

/// One replica: its own consumer name and HTTP port.
struct Replica {
    process: WorkerProcess,
    port: u16,
}

impl Replica {
    /// Starts the worker binary as `consumer`, with [`replica_settings`]
    /// and `more` settings.
    fn start(env: &TestEnv, consumer: &str, more: &[(&str, String)]) -> Self {
        let port = free_port();
        let mut extra: Vec<(&str, String)> = replica_settings().to_vec();
        extra.extend(more.iter().cloned());
        extra.push(("AUDIT_WORKER__STREAM__CONSUMER", consumer.to_string()));
        extra.push(("AUDIT_WORKER__HTTP__LISTEN", format!("127.0.0.1:{port}")));
        Self {
            process: WorkerProcess(Some(spawn_worker_with(env, &extra))),
            port,
        }
    }

    async fn wait_ready(&self) {
        let port = self.port;
        wait_until(Duration::from_secs(60), "replica ready", || async {
            matches!(http_status(port, "/readyz").await, Some((200, _)))
        })
        .await;
    }
}

/// Produces 50 valid events per second (5 every 100 ms) until `stop`
/// fires; returns how many it added.
fn produce(env: &TestEnv, stop: CancellationToken) -> tokio::task::JoinHandle<usize> {
    let stream = env.stream.clone();
    let client = env.redis.clone();
    tokio::spawn(async move {
        let mut conn = crate::common::patient_redis(&client).await.unwrap();
        let mut next = 0usize;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while !stop.is_cancelled() {
            tick.tick().await;
            let mut pipe = redis::pipe();
            for i in next..next + 5 {
                pipe.cmd("XADD")
                    .arg(&stream)
                    .arg("*")
                    .arg("data")
                    .arg(event(i).to_string())
                    .ignore();
            }
            let _: () = pipe.query_async(&mut conn).await.unwrap();
            next += 5;
        }
        next
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_through_a_two_minute_outage_and_a_sigkill_store_every_event_once() {
    let env = TestEnv::new("outage3").await;
    let mut replicas = start_replicas(&env, &["replica-a", "replica-b", "replica-c"], &[]).await;

    let stop_producing = CancellationToken::new();
    let producer = produce(&env, stop_producing.clone());
    tokio::time::sleep(Duration::from_secs(5)).await;

    env.refuse_writes(true).await;
    let outage = Instant::now();
    // A third of the way in, one replica dies with entries in hand; a new
    // pod (another consumer name) replaces it, so the dead one's entries
    // are only ever claimed.
    tokio::time::sleep(Duration::from_secs(40)).await;
    let mut killed = replicas.remove(0);
    let child = killed.process.child();
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    drop(killed);
    tokio::time::sleep(Duration::from_secs(5)).await;
    replicas.push(Replica::start(&env, "replica-a2", &[]));
    tokio::time::sleep(Duration::from_secs(120).saturating_sub(outage.elapsed())).await;
    let letters_during_outage = env.dlq_len().await;
    env.refuse_writes(false).await;

    tokio::time::sleep(Duration::from_secs(10)).await;
    stop_producing.cancel();
    let produced = producer.await.unwrap();
    assert!(produced >= 6_000, "the producer kept up: {produced}");

    assert_every_event_stored_once_and_nothing_dead_lettered(&env, produced, letters_during_outage)
        .await;
    for r in replicas {
        stop(r.process);
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_probing_a_refusing_database_every_two_seconds_claim_held_entries_and_dead_letter_nothing(
) {
    let env = TestEnv::new("outage_probe").await;
    // Each replica's breaker lets a probe through every 2 s, and many small
    // batches may be in flight: between probes the replicas read and claim
    // (XAUTOCLAIM) again, so entries that one live replica holds, waiting
    // for the database, are claimed by the others over and over.
    let more = [
        ("AUDIT_WORKER__SINK__BREAKER_RECOVERY_SECS", "2".to_string()),
        ("AUDIT_WORKER__SINK__RETRY_BASE_MS", "100".to_string()),
        ("AUDIT_WORKER__SINK__RETRY_CAP_MS", "400".to_string()),
        ("AUDIT_WORKER__STREAM__READ_COUNT", "20".to_string()),
        (
            "AUDIT_WORKER__STREAM__MAX_IN_FLIGHT_BATCHES",
            "256".to_string(),
        ),
    ];
    let replicas = start_replicas(&env, &["replica-a", "replica-b", "replica-c"], &more).await;
    let stop_producing = CancellationToken::new();
    let producer = produce(&env, stop_producing.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.refuse_writes(true).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let letters_during_outage = env.dlq_len().await;
    env.refuse_writes(false).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_producing.cancel();
    let produced = producer.await.unwrap();
    assert!(produced >= 1_500, "the producer kept up: {produced}");
    assert_every_event_stored_once_and_nothing_dead_lettered(&env, produced, letters_during_outage)
        .await;
    for r in replicas {
        stop(r.process);
    }
    env.cleanup().await;
}

/// Starts one replica per consumer name with `more` settings and waits
/// until the schema is migrated and every replica is ready.
async fn start_replicas(
    env: &TestEnv,
    consumers: &[&str],
    more: &[(&str, String)],
) -> Vec<Replica> {
    let replicas: Vec<_> = consumers
        .iter()
        .map(|c| Replica::start(env, c, more))
        .collect();
    wait_until(Duration::from_secs(30), "audit_log migrated", || async {
        env.pg
            .query_one("SELECT to_regclass('audit_log') IS NOT NULL", &[])
            .await
            .is_ok_and(|r| r.get::<_, bool>(0))
    })
    .await;
    for r in &replicas {
        r.wait_ready().await;
    }
    replicas
}

/// Waits (at most five minutes) until all `produced` events are stored and
/// nothing is pending, then asserts each is stored exactly once and that
/// the DLQ was empty during the outage (`letters_during_outage`) and is
/// empty now.
async fn assert_every_event_stored_once_and_nothing_dead_lettered(
    env: &TestEnv,
    produced: usize,
    letters_during_outage: usize,
) {
    let deadline = Duration::from_secs(300);
    let recovery = Instant::now();
    loop {
        let (rows, pending) = (env.row_count().await, env.pending_count().await);
        if rows == produced as i64 && pending == 0 {
            break;
        }
        assert!(
            recovery.elapsed() < deadline,
            "{deadline:?} after the outage ended, {rows} of {produced} events are stored and \
             {pending} entries pending; the DLQ holds {} entries ({:?})",
            env.dlq_len().await,
            reasons(env).await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (count, distinct): (i64, i64) = env.count_and_distinct().await;
    assert_eq!(
        (count, distinct),
        (produced as i64, produced as i64),
        "every event stored exactly once"
    );
    assert_eq!(
        (letters_during_outage, env.dlq_len().await),
        (0, 0),
        "an outage dead-letters nothing (during, after): {:?}",
        reasons(env).await
    );
}

/// How many dead letters of each reason the DLQ holds.
async fn reasons(env: &TestEnv) -> std::collections::BTreeMap<String, usize> {
    let mut by = std::collections::BTreeMap::new();
    for letter in env.dlq_entries().await {
        let reason =
            String::from_utf8_lossy(letter.get("reason").map(Vec::as_slice).unwrap_or_default())
                .into_owned();
        *by.entry(reason).or_insert(0) += 1;
    }
    by
}
