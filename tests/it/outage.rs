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
    fn start(env: &TestEnv, consumer: &str) -> Self {
        let port = free_port();
        let mut extra: Vec<(&str, String)> = replica_settings().to_vec();
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
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
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
    let mut replicas = vec![
        Replica::start(&env, "replica-a"),
        Replica::start(&env, "replica-b"),
        Replica::start(&env, "replica-c"),
    ];
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
    replicas.push(Replica::start(&env, "replica-a2"));
    tokio::time::sleep(Duration::from_secs(120).saturating_sub(outage.elapsed())).await;
    let letters_during_outage = env.dlq_len().await;
    env.refuse_writes(false).await;

    tokio::time::sleep(Duration::from_secs(10)).await;
    stop_producing.cancel();
    let produced = producer.await.unwrap();
    assert!(produced >= 6_000, "the producer kept up: {produced}");

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
            reasons(&env).await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (count, distinct): (i64, i64) = env
        .pg
        .query_one(
            "SELECT count(*), count(DISTINCT idempotency_key) FROM audit_log",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(
        (count, distinct),
        (produced as i64, produced as i64),
        "every event stored exactly once"
    );
    assert_eq!(
        (letters_during_outage, env.dlq_len().await),
        (0, 0),
        "an outage dead-letters nothing (during, after): {:?}",
        reasons(&env).await
    );
    for r in replicas {
        stop(r.process);
    }
    env.cleanup().await;
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
