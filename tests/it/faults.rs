//! Fault injection with real processes and real services: the worker
//! binary is killed, its database refuses writes, its Redis restarts.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rand::Rng;
use serde_json::Value;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_kills_at_random_moments_while_events_flow_lose_and_duplicate_nothing() {
    let env = TestEnv::new("tenkills").await;
    let total = 100_000usize;
    let producer = {
        let env_stream = env.stream.clone();
        let client = env.redis.clone();
        tokio::spawn(async move {
            let mut conn = patient_redis(&client).await.unwrap();
            for chunk in 0..(total / 1000) {
                let mut pipe = redis::pipe();
                for i in chunk * 1000..(chunk + 1) * 1000 {
                    let mut e = event(i);
                    if i % 2 == 1 {
                        // Half without eventId: keyed by the entry id alone.
                        e.as_object_mut().unwrap().remove("eventId");
                    }
                    pipe.cmd("XADD")
                        .arg(&env_stream)
                        .arg("*")
                        .arg("data")
                        .arg(e.to_string())
                        .ignore();
                }
                let _: () = pipe.query_async(&mut conn).await.unwrap();
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };
    let extra = [
        ("AUDIT_WORKER__STREAM__CLAIM_IDLE_MS", "2000".to_string()),
        ("AUDIT_WORKER__SINK__BATCH_SIZE", "500".to_string()),
    ];
    for _ in 0..10 {
        let mut child = spawn_worker_with(&env, &extra);
        let pause = rand::thread_rng().gen_range(300..1500);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
    }
    producer.await.unwrap();
    let mut child = spawn_worker_with(&env, &extra);
    wait_until(
        Duration::from_secs(300),
        "all 100,000 events stored and acknowledged",
        || async { env.row_count().await == total as i64 && env.pending_count().await == 0 },
    )
    .await;
    terminate(&mut child);
    assert_eq!(env.count_and_distinct().await, (total as i64, total as i64));
    let by_event_id: i64 = env
        .pg
        .query_one(
            "SELECT count(DISTINCT event_id) FROM audit_log WHERE event_id IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(by_event_id, (total / 2) as i64);
    assert_eq!(env.dlq_len().await, 0, "crashes never produce dead letters");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_refusing_writes_opens_the_breaker_and_nothing_is_dead_lettered() {
    let env = TestEnv::new("breaker").await;
    let extra = [
        ("AUDIT_WORKER__SINK__RETRY_BASE_MS", "100".to_string()),
        ("AUDIT_WORKER__SINK__RETRY_CAP_MS", "400".to_string()),
        ("AUDIT_WORKER__SINK__BREAKER_RECOVERY_SECS", "3".to_string()),
        ("AUDIT_WORKER__SINK__BATCH_SIZE", "200".to_string()),
    ];
    let mut child = spawn_worker_with(&env, &extra);
    env.wait_for_schema().await;
    let port = env.http_port;
    wait_until(Duration::from_secs(30), "ready", || async {
        matches!(http_status(port, "/readyz").await, Some((200, _)))
    })
    .await;
    env.add_events(&(0..5_000).map(event).collect::<Vec<_>>())
        .await;
    wait_until(Duration::from_secs(60), "some rows", || async {
        env.row_count().await > 0
    })
    .await;

    env.refuse_writes(true).await;
    let refused_at = std::time::Instant::now();
    let producer = {
        let stream = env.stream.clone();
        let client = env.redis.clone();
        tokio::spawn(async move {
            let mut conn = patient_redis(&client).await.unwrap();
            for chunk in 0..20 {
                let mut pipe = redis::pipe();
                for i in 5_000 + chunk * 500..5_000 + (chunk + 1) * 500 {
                    pipe.cmd("XADD")
                        .arg(&stream)
                        .arg("*")
                        .arg("data")
                        .arg(event(i).to_string())
                        .ignore();
                }
                let _: () = pipe.query_async(&mut conn).await.unwrap();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    wait_until(
        Duration::from_secs(30),
        "breaker open and readiness 503",
        || async {
            let breaker = http_status(port, "/health/circuit-breaker").await;
            let ready = http_status(port, "/readyz").await;
            matches!(breaker, Some((503, ref b)) if b["details"]["state"] == "open")
                && matches!(ready, Some((503, _)))
        },
    )
    .await;
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("audit_worker_circuit_breaker_transitions_total{to=\"open\"}"),
        "{metrics}"
    );
    // Keep refusing for 20 s in all.
    let left = Duration::from_secs(20).saturating_sub(refused_at.elapsed());
    tokio::time::sleep(left).await;
    assert_eq!(env.dlq_len().await, 0, "an outage produces no dead letters");
    env.refuse_writes(false).await;
    producer.await.unwrap();

    wait_until(
        Duration::from_secs(120),
        "backlog stored after recovery",
        || async { env.row_count().await == 15_000 && env.pending_count().await == 0 },
    )
    .await;
    wait_until(Duration::from_secs(30), "breaker closed, ready again", || async {
        matches!(http_status(port, "/health/circuit-breaker").await, Some((200, ref b)) if b["details"]["state"] == "closed")
            && matches!(http_status(port, "/readyz").await, Some((200, _)))
    })
    .await;
    terminate(&mut child);
    assert_eq!(env.count_and_distinct().await, (15_000, 15_000));
    assert_eq!(env.dlq_len().await, 0);
    env.cleanup().await;
}

/// A private redis-server on its own port, so restarting it disturbs no
/// other test.
struct PrivateRedis {
    port: u16,
    child: Child,
}

impl PrivateRedis {
    fn start(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server installed (scripts/services.sh)");
        Self { port, child }
    }

    async fn wait_ready(&self) {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}", self.port)).unwrap();
        wait_until(Duration::from_secs(10), "private redis up", || async {
            match client.get_multiplexed_async_connection().await {
                Ok(mut c) => redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok(),
                Err(_) => false,
            }
        })
        .await;
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_keeps_consuming_after_redis_restarts() {
    let mut env = TestEnv::new("redisrestart").await;
    let port = free_port();
    let mut redis_server = PrivateRedis::start(port);
    redis_server.wait_ready().await;
    let url = format!("redis://127.0.0.1:{port}");
    env.redis = redis::Client::open(url.clone()).unwrap();
    let extra = [("AUDIT_WORKER__REDIS__URL", url.clone())];
    let mut child = spawn_worker_with(&env, &extra);
    let http = env.http_port;
    wait_until(Duration::from_secs(30), "ready", || async {
        matches!(http_status(http, "/readyz").await, Some((200, _)))
    })
    .await;
    env.add_events(&(0..2_000).map(event).collect::<Vec<_>>())
        .await;
    wait_until(Duration::from_secs(60), "first events stored", || async {
        env.row_count().await == 2_000
    })
    .await;

    redis_server.stop();
    wait_until(Duration::from_secs(30), "/health/redis shows the outage", || async {
        matches!(http_status(http, "/health/redis").await, Some((503, ref b)) if b["status"] == "critical")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis_server = PrivateRedis::start(port);
    redis_server.wait_ready().await;
    // Redis kept nothing: what was added before the restart is gone with it.
    // Everything added after must be stored, by the same worker process.
    env.add_events(&(2_000..5_000).map(event).collect::<Vec<_>>())
        .await;
    wait_until(
        Duration::from_secs(90),
        "events added after the restart stored",
        || async { env.row_count().await == 5_000 },
    )
    .await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the worker did not exit"
    );
    wait_until(Duration::from_secs(30), "/health/redis healthy again", || async {
        matches!(http_status(http, "/health/redis").await, Some((200, ref b)) if b["status"] == "healthy")
    })
    .await;
    terminate(&mut child);
    assert_eq!(env.count_and_distinct().await, (5_000, 5_000));
    env.cleanup().await;
    drop(redis_server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_entry_is_dead_lettered_after_max_deliveries() {
    let env = TestEnv::new("poison").await;
    let poison = event(1);
    let ids = env.add_events(&[poison.clone(), event(2)]).await;
    // A consumer that keeps crashing on the first entry: delivered 10 times.
    env.read_without_ack("crashy", 1).await;
    let mut conn = env.redis_conn().await;
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(&env.stream)
        .arg(&env.group)
        .arg("crashy")
        .arg(0)
        .arg(&ids[0])
        .arg("RETRYCOUNT")
        .arg(10)
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut config = env.config();
    config.stream.claim_idle_ms = 100;
    config.stream.max_deliveries = 10;
    let worker = InProcessWorker::start(config);
    wait_until(
        Duration::from_secs(30),
        "one row, one dead letter",
        || async {
            env.row_count().await == 1 && env.dlq_len().await == 1 && env.pending_count().await == 0
        },
    )
    .await;
    worker.stop().await;
    let letters = env.dlq_entries().await;
    assert_eq!(letters[0]["reason"], b"max_deliveries");
    assert_eq!(letters[0]["attempts"], b"11");
    assert_eq!(letters[0]["data"], poison.to_string().into_bytes());

    let stored: String = env
        .pg
        .query_one("SELECT event_id FROM audit_log", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, "evt-2");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_cli_lists_replays_and_purges_dead_letters() {
    let env = TestEnv::new("dlqcli").await;
    let mut bad_hash = event(7);
    bad_hash["hash"] = Value::String("0".repeat(64));
    env.add_entries(&[
        (None, b"nope".to_vec()),
        (None, bad_hash.to_string().into_bytes()),
    ])
    .await;
    let worker = InProcessWorker::start(env.config());
    wait_until(Duration::from_secs(30), "two dead letters", || async {
        env.dlq_len().await == 2
    })
    .await;
    worker.stop().await;

    let cli = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_audit-worker"));
        cmd.args(args);
        for (k, v) in env.env_vars() {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let listed = cli(&["dlq", "list"]);
    assert!(
        listed.contains("invalid_json") && listed.contains("hash_mismatch"),
        "{listed}"
    );
    assert!(listed.contains("2 dead letter(s)"), "{listed}");
    let only = cli(&["dlq", "list", "--reason", "hash_mismatch"]);
    assert!(
        only.contains("1 dead letter(s)") && !only.contains("invalid_json"),
        "{only}"
    );

    // Replay the invalid one: back on the stream, gone from the DLQ.
    let replayed = cli(&["dlq", "replay", "--reason", "invalid_json"]);
    assert!(replayed.contains("1 dead letter(s) replayed"), "{replayed}");
    assert_eq!(env.dlq_len().await, 1);
    let mut conn = env.redis_conn().await;
    let v: redis::Value = redis::cmd("XRANGE")
        .arg(&env.stream)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let back = audit_worker::source::stream::parse_entries(&v);
    assert!(back.iter().any(|e| e.field("data") == Some(&b"nope"[..])));

    let kept = cli(&["dlq", "purge", "--older-than", "1h"]);
    assert!(kept.starts_with("0 dead letter(s)"), "{kept}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let purged = cli(&["dlq", "purge", "--older-than", "1s"]);
    assert!(purged.starts_with("1 dead letter(s)"), "{purged}");
    assert_eq!(env.dlq_len().await, 0);
    env.cleanup().await;
}
