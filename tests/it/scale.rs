//! Horizontal scale: several worker processes in one consumer group share
//! one stream; one dies by SIGKILL; every event is stored exactly once.

use std::process::Child;
use std::time::Duration;

use crate::common::*;
use crate::ops::{parse_metrics, sample_sum, scrape};

/// Rows this worker process reports as inserted, from its own /metrics.
async fn inserted_by(port: u16) -> Option<f64> {
    let text = scrape(port).await?;
    Some(sample_sum(
        &parse_metrics(&text),
        "audit_worker_events_total",
        &[("source", "stream"), ("outcome", "inserted")],
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_share_one_stream_and_a_sigkill_loses_and_duplicates_nothing() {
    let env = TestEnv::new("three").await;
    let total = 100_000usize;
    let mut workers: Vec<(String, u16, Child)> = (0..3)
        .map(|i| {
            let port = free_port();
            let consumer = format!("replica-{i}");
            let extra = [
                ("AUDIT_WORKER__STREAM__CONSUMER", consumer.clone()),
                ("AUDIT_WORKER__HTTP__LISTEN", format!("127.0.0.1:{port}")),
                ("AUDIT_WORKER__STREAM__CLAIM_IDLE_MS", "2000".to_string()),
                ("AUDIT_WORKER__STREAM__READ_COUNT", "200".to_string()),
                ("AUDIT_WORKER__SINK__BATCH_SIZE", "500".to_string()),
                ("AUDIT_WORKER__DATABASE__POOL_SIZE", "4".to_string()),
            ];
            (consumer, port, spawn_worker_with(&env, &extra))
        })
        .collect();
    for (_, port, _) in &workers {
        let port = *port;
        wait_until(Duration::from_secs(60), "replica ready", || async {
            reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false)
        })
        .await;
    }

    let producer = {
        let stream = env.stream.clone();
        let client = env.redis.clone();
        tokio::spawn(async move {
            let mut conn = crate::common::patient_redis(&client).await.unwrap();
            for chunk in 0..(total / 1000) {
                let mut pipe = redis::pipe();
                for i in chunk * 1000..(chunk + 1) * 1000 {
                    let mut e = event(i);
                    if i % 2 == 1 {
                        e.as_object_mut().unwrap().remove("eventId");
                    }
                    pipe.cmd("XADD")
                        .arg(&stream)
                        .arg("*")
                        .arg("data")
                        .arg(e.to_string())
                        .ignore();
                }
                let _: () = pipe.query_async(&mut conn).await.unwrap();
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        })
    };

    // Mid-way, kill one replica without warning, after checking it did work.
    wait_until(
        Duration::from_secs(300),
        "a third of the events stored",
        || async { env.row_count().await >= (total / 3) as i64 },
    )
    .await;
    let (victim, victim_port, mut child) = workers.remove(1);
    let victim_inserted = inserted_by(victim_port).await.expect("victim's /metrics");
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    assert!(
        victim_inserted > 0.0,
        "{victim} stored nothing before it died"
    );

    producer.await.unwrap();
    wait_until(
        Duration::from_secs(600),
        "all events stored and acknowledged by the survivors",
        || async { env.row_count().await == total as i64 && env.pending_count().await == 0 },
    )
    .await;

    let mut survivors_inserted = 0.0;
    for (name, port, _) in &workers {
        let n = inserted_by(*port).await.expect("survivor's /metrics");
        assert!(n > 0.0, "{name} stored nothing: the load was not shared");
        survivors_inserted += n;
    }
    // Redis saw three consumers in the group.
    let mut conn = env.redis_conn().await;
    let consumers: redis::Value = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(&env.stream)
        .arg(&env.group)
        .query_async(&mut conn)
        .await
        .unwrap();
    let redis::Value::Array(consumers) = consumers else {
        panic!("XINFO CONSUMERS: {consumers:?}")
    };
    assert_eq!(consumers.len(), 3);
    for (_, _, child) in &mut workers {
        terminate(child);
    }

    let (rows, distinct): (i64, i64) = env.count_and_distinct().await;
    assert_eq!((rows, distinct), (total as i64, total as i64));
    let event_ids: i64 = env
        .pg
        .query_one(
            "SELECT count(DISTINCT event_id) FROM audit_log WHERE event_id IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(event_ids, (total / 2) as i64);
    assert_eq!(env.dlq_len().await, 0, "a crash produces no dead letters");
    eprintln!(
        "three replicas: killed {victim} after {victim_inserted} rows; survivors stored {survivors_inserted}"
    );
    env.cleanup().await;
}
