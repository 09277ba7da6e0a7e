//! Redis high availability: the worker binary against a Sentinel-monitored
//! primary with two replicas (the primary dies by SIGKILL mid-stream), and
//! against a three-master Redis Cluster with a sharded stream read by three
//! worker processes. Each test brings its own servers up on free loopback
//! ports with `scripts/redis-topology.sh` and takes them down when it ends,
//! failed or not.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use audit_worker::shards::{shard_for, tagged_key};
use redis::aio::ConnectionLike;
use redis::cluster::ClusterClient;
use redis::sentinel::{SentinelClient, SentinelServerType};

use crate::common::*;
use crate::ops::{parse_metrics, sample_sum, scrape};

/// Servers started by `scripts/redis-topology.sh` in a directory of their
/// own; dropped (even by a failing test): killed, and the directory gone.
struct Topology {
    dir: PathBuf,
    base: u16,
}

impl Topology {
    /// `kind` is `sentinel` (ports base..base+5) or `cluster` (base..base+2
    /// and their cluster bus ports, base+10000..).
    fn start(kind: &str, name: &str) -> Self {
        let span = if kind == "sentinel" { 6 } else { 3 };
        let base = free_port_range(span, kind == "cluster");
        let dir = std::env::temp_dir().join(format!("audit-worker-{kind}-{name}"));
        let topology = Self { dir, base };
        let status = Command::new(script())
            .arg(kind)
            .arg(&topology.dir)
            .arg(base.to_string())
            .status()
            .expect("scripts/redis-topology.sh runs");
        assert!(status.success(), "{kind} topology did not come up");
        topology
    }

    /// `127.0.0.1:<base+i>`.
    fn node(&self, i: u16) -> String {
        format!("127.0.0.1:{}", self.base + i)
    }

    /// The pid of the server on `base+i`.
    fn pid(&self, i: u16) -> u32 {
        std::fs::read_to_string(self.dir.join(format!("redis-{}.pid", self.base + i)))
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid")
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("down").arg(&self.dir).status();
    }
}

/// Worker processes that die with the test: SIGKILLed when dropped
/// (a failing test), after a graceful stop when it passes.
struct Workers(Vec<(u16, Child)>);

impl Workers {
    /// SIGTERM to each, then wait: the graceful stop of a passing test.
    fn stop(mut self) {
        for (_, child) in &mut self.0 {
            terminate(child);
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/redis-topology.sh")
}

/// A run of `span` consecutive free loopback ports (and, for a cluster,
/// the bus ports 10000 above them), at a random place so parallel tests
/// rarely meet.
fn free_port_range(span: u16, with_bus: bool) -> u16 {
    let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    for _ in 0..200 {
        // Below the kernel's ephemeral ports (from 32768), bus ports
        // (+1000) included: see scripts/redis-topology.sh.
        let base = 20_000 + (rand::random::<u16>() % 11_000);
        if (0..span).all(|i| free(base + i) && (!with_bus || free(base + 1_000 + i))) {
            return base;
        }
    }
    panic!("no free run of {span} loopback ports");
}

/// Rows a worker process reports as inserted, from its /metrics.
async fn inserted_by(port: u16) -> f64 {
    let text = scrape(port).await.expect("worker /metrics");
    sample_sum(
        &parse_metrics(&text),
        "audit_worker_events_total",
        &[("source", "stream"), ("outcome", "inserted")],
    )
}

async fn wait_ready(port: u16) {
    wait_until(Duration::from_secs(60), "worker ready", || async {
        reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
}

/// What a consumer group has left to do on one stream.
struct GroupState {
    /// `XPENDING` count: read and not acknowledged.
    pending: i64,
    /// The group's `last-delivered-id` and the stream's
    /// `last-generated-id`: equal once every entry has been read.
    last_delivered: String,
    last_generated: String,
    /// The group's `lag`, for the failure message only. Redis derives it
    /// from the group's `entries-read` counter, which a Redis 7.0 replica
    /// does not keep in step with its master, so after a failover it is
    /// an estimate; whether every entry was read is told by the ids.
    lag: Option<i64>,
}

impl GroupState {
    /// Every entry read and acknowledged.
    fn drained(&self) -> bool {
        self.pending == 0
            && !self.last_generated.is_empty()
            && self.last_delivered == self.last_generated
    }
}

/// The group's state; a stream or group not there (yet, or again after a
/// failover) reads as not drained.
async fn group_state(conn: &mut impl ConnectionLike, stream: &str, group: &str) -> GroupState {
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(conn)
        .await
        .unwrap_or(redis::Value::Nil);
    let pending = match pending {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => -1,
        },
        _ => -1,
    };
    type Info = std::collections::HashMap<String, redis::Value>;
    let text = |v: Option<&redis::Value>| match v {
        Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
        _ => String::new(),
    };
    let groups: Vec<Info> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
        .unwrap_or_default();
    let none = Info::new();
    let info = groups
        .iter()
        .find(|g| text(g.get("name")) == group)
        .unwrap_or(&none);
    let stream_info: Info = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(stream)
        .query_async(conn)
        .await
        .unwrap_or_default();
    GroupState {
        pending,
        last_delivered: text(info.get("last-delivered-id")),
        last_generated: text(stream_info.get("last-generated-id")),
        lag: match info.get("lag") {
            Some(redis::Value::Int(n)) => Some(*n),
            _ => None,
        },
    }
}

/// The sentinels' client for the test's master ("audit").
fn sentinel_client(t: &Topology) -> SentinelClient {
    SentinelClient::build(
        (3..6).map(|i| format!("redis://{}", t.node(i))).collect(),
        "audit",
        None,
        SentinelServerType::Master,
    )
    .unwrap()
}

/// Writes `events` to the current master in chunks, each confirmed on a
/// replica with WAIT before the next; a chunk that fails (the master died)
/// or is not confirmed is written again, byte for byte, to whichever
/// master the sentinels name next. Its events carry event ids, so a chunk
/// stored twice is one set of rows. Sends the index of the first event of
/// the first chunk that has to be written again (the first one written
/// after the failover) on `rewritten` when that chunk first fails.
async fn produce_through_sentinel(
    mut sentinel: SentinelClient,
    stream: String,
    total: usize,
    rewritten: tokio::sync::oneshot::Sender<usize>,
) {
    let mut rewritten = Some(rewritten);
    let mut conn = patient_redis(&sentinel.async_get_client().await.unwrap())
        .await
        .unwrap();
    let chunk_size = 500;
    for start in (0..total).step_by(chunk_size) {
        let deadline = Instant::now() + Duration::from_secs(60);
        // Made once: a chunk written again carries the same bytes (an
        // event's timestamp is taken from the clock when it is made).
        let events: Vec<String> = (start..(start + chunk_size).min(total))
            .map(|i| event(i).to_string())
            .collect();
        loop {
            let mut pipe = redis::pipe();
            for e in &events {
                pipe.cmd("XADD")
                    .arg(&stream)
                    .arg("*")
                    .arg("data")
                    .arg(e)
                    .ignore();
            }
            pipe.cmd("WAIT").arg(1).arg(2000);
            let confirmed: redis::RedisResult<(i64,)> = pipe.query_async(&mut conn).await;
            if matches!(confirmed, Ok((n,)) if n >= 1) {
                break;
            }
            if let Some(tx) = rewritten.take() {
                let _ = tx.send(start);
            }
            assert!(
                Instant::now() < deadline,
                "no master accepted writes for 60 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Ok(client) = sentinel.async_get_client().await {
                if let Ok(c) = patient_redis(&client).await {
                    conn = c;
                }
            }
        }
        // Paced (about 3,000 events/s) so that events still flow when the
        // primary dies a third of the way.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_after_sigkill_of_the_primary_loses_and_duplicates_nothing() {
    let env = TestEnv::new("sentinel").await;
    let topology = Topology::start("sentinel", &env.name);
    let total = 50_000usize;
    let sentinels = format!(
        "[\"{}\",\"{}\",\"{}\"]",
        topology.node(3),
        topology.node(4),
        topology.node(5)
    );
    let worker = spawn_worker_with(
        &env,
        &[
            ("AUDIT_WORKER__REDIS__SENTINELS", sentinels),
            ("AUDIT_WORKER__REDIS__MASTER_NAME", "audit".into()),
            ("AUDIT_WORKER__REDIS__RESPONSE_TIMEOUT_SECS", "2".into()),
            ("AUDIT_WORKER__REDIS__CONNECT_TIMEOUT_SECS", "1".into()),
            ("AUDIT_WORKER__BULLMQ__ENABLED", "false".into()),
            ("AUDIT_WORKER__STREAM__CLAIM_IDLE_MS", "2000".into()),
        ],
    );
    let worker = Workers(vec![(env.http_port, worker)]);
    wait_ready(env.http_port).await;

    let (rewritten_tx, rewritten_rx) = tokio::sync::oneshot::channel();
    let producer = tokio::spawn(produce_through_sentinel(
        sentinel_client(&topology),
        env.stream.clone(),
        total,
        rewritten_tx,
    ));
    wait_until(
        Duration::from_secs(300),
        "a third of the events stored",
        || async { env.row_count().await >= (total / 3) as i64 },
    )
    .await;
    let primary = topology.pid(0);
    let killed_at = Instant::now();
    let status = Command::new("kill")
        .arg("-KILL")
        .arg(primary.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "SIGKILL of the primary");

    // The sentinels' answer changes once they have promoted a replica.
    let sentinel_node = redis::Client::open(format!("redis://{}", topology.node(3))).unwrap();
    let sentinel_conn = sentinel_node
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let old_port = topology.base.to_string();
    wait_until(Duration::from_secs(60), "a replica promoted", || {
        let mut c = sentinel_conn.clone();
        let old_port = old_port.clone();
        async move {
            let addr: redis::RedisResult<(String, String)> = redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg("audit")
                .query_async(&mut c)
                .await;
            addr.is_ok_and(|(_, port)| port != old_port)
        }
    })
    .await;
    let promoted = killed_at.elapsed();
    // Batches read before the kill were committed long before (they wait
    // only for their acknowledgement); the next row is one read from the
    // new master.
    let rows_at_promotion = env.row_count().await;
    wait_until(
        Duration::from_secs(120),
        "a row committed after the failover",
        || async { env.row_count().await > rows_at_promotion },
    )
    .await;
    let failover_to_commit = killed_at.elapsed();
    let rewritten = rewritten_rx
        .await
        .expect("the producer met the dead primary and wrote to the new one");
    producer.await.unwrap();

    let mut sentinel = sentinel_client(&topology);
    let master = sentinel.async_get_client().await.unwrap();
    let master_addr = master.get_connection_info().addr().to_string();
    assert_ne!(
        master_addr,
        topology.node(0),
        "the sentinels promoted a replica"
    );
    let mut conn = patient_redis(&master).await.unwrap();
    // Polled by hand so that a time-out says what was left.
    let started = Instant::now();
    loop {
        let state = group_state(&mut conn, &env.stream, &env.group).await;
        let rows = env.row_count().await;
        if rows == total as i64 && state.drained() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "timed out after 300 s waiting for every event stored and acknowledged on the new master: {rows} of {total} rows, {} pending, last delivered {:?}, last generated {:?}, lag {:?}",
            state.pending,
            state.last_delivered,
            state.last_generated,
            state.lag
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (rows, distinct) = env.count_and_distinct().await;
    assert_eq!((rows, distinct), (total as i64, total as i64));
    let dead: usize = redis::cmd("XLEN")
        .arg(&env.dlq)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(dead, 0, "a failover dead-letters nothing");
    // A batch committed whose acknowledgement the failover lost is counted
    // when it comes back, as duplicates: nothing is counted twice as
    // inserted, and every event is counted.
    let metrics = parse_metrics(&scrape(env.http_port).await.expect("worker /metrics"));
    let count = |outcome| {
        sample_sum(
            &metrics,
            "audit_worker_events_total",
            &[("source", "stream"), ("outcome", outcome)],
        )
    };
    let (inserted, duplicate) = (count("inserted"), count("duplicate"));
    assert!(inserted <= total as f64, "inserted {inserted}");
    assert!(
        inserted + duplicate >= total as f64,
        "inserted {inserted} + duplicate {duplicate}"
    );
    eprintln!(
        "sentinel: primary killed; {master_addr} promoted {:.1} s after the kill; first commit after the failover {:.1} s after the kill; the producer wrote again from event {rewritten}; inserted {inserted}, redelivered as duplicates {duplicate}",
        promoted.as_secs_f64(),
        failover_to_commit.as_secs_f64()
    );
    worker.stop();
    drop(topology);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_with_four_shards_and_three_workers_stores_every_event_once_and_drains_every_shard()
{
    let env = TestEnv::new("cluster").await;
    let topology = Topology::start("cluster", &env.name);
    let (shards, total) = (4u32, 100_000usize);
    let store = tempfile::tempdir().unwrap();
    let notifications = format!("{}:notifications", env.stream);
    let nodes = format!(
        "[\"{}\",\"{}\",\"{}\"]",
        topology.node(0),
        topology.node(1),
        topology.node(2)
    );
    let workers: Vec<(u16, Child)> = (0..3)
        .map(|i| {
            let port = free_port();
            let child = spawn_worker_with(
                &env,
                &[
                    ("AUDIT_WORKER__REDIS__CLUSTER_NODES", nodes.clone()),
                    ("AUDIT_WORKER__STREAM__SHARDS", shards.to_string()),
                    ("AUDIT_WORKER__BULLMQ__ENABLED", "false".into()),
                    ("AUDIT_WORKER__STREAM__CONSUMER", format!("replica-{i}")),
                    ("AUDIT_WORKER__HTTP__LISTEN", format!("127.0.0.1:{port}")),
                    ("AUDIT_WORKER__DATABASE__POOL_SIZE", "4".into()),
                    (
                        "AUDIT_WORKER__TELEMETRY__QUEUE_STATS_INTERVAL_SECS",
                        "1".into(),
                    ),
                    (
                        "AUDIT_WORKER__STORAGE__URL",
                        store.path().display().to_string(),
                    ),
                    (
                        "AUDIT_WORKER__EXPORT__NOTIFICATIONS_KEY",
                        notifications.clone(),
                    ),
                ],
            );
            (port, child)
        })
        .collect();
    let workers = Workers(workers);
    for (port, _) in &workers.0 {
        wait_ready(*port).await;
    }

    // Producers choose the shard by organisation.
    let client = ClusterClient::new(
        (0..3)
            .map(|i| format!("redis://{}", topology.node(i)))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    let mut per_shard = vec![0usize; shards as usize];
    for chunk in (0..total).collect::<Vec<_>>().chunks(2000) {
        // One pipeline per shard: a pipeline goes to one slot's node.
        let mut pipes: Vec<redis::Pipeline> = (0..shards).map(|_| redis::pipe()).collect();
        for &i in chunk {
            let e = event(i);
            let shard = shard_for(e["organizationId"].as_str().unwrap(), shards);
            per_shard[shard as usize] += 1;
            pipes[shard as usize]
                .cmd("XADD")
                .arg(tagged_key(&env.stream, shard))
                .arg("*")
                .arg("data")
                .arg(e.to_string())
                .ignore();
        }
        for pipe in &pipes {
            let _: () = pipe.query_async(&mut conn).await.unwrap();
        }
    }
    assert!(
        per_shard.iter().all(|&n| n > 0),
        "every shard got events: {per_shard:?}"
    );

    let shard_keys: Vec<String> = (0..shards).map(|k| tagged_key(&env.stream, k)).collect();
    wait_until(
        Duration::from_secs(600),
        "every event stored and every shard drained",
        || async {
            if env.row_count().await != total as i64 {
                return false;
            }
            let mut conn = client.get_async_connection().await.unwrap();
            for key in &shard_keys {
                if !group_state(&mut conn, key, &env.group).await.drained() {
                    return false;
                }
            }
            true
        },
    )
    .await;

    let (rows, distinct) = env.count_and_distinct().await;
    assert_eq!((rows, distinct), (total as i64, total as i64));
    for k in 0..shards {
        let dead: usize = redis::cmd("XLEN")
            .arg(tagged_key(&env.dlq, k))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(dead, 0, "shard {k} dead-lettered nothing");
    }
    // Every worker took part, and each reports every shard's gauges,
    // drained.
    let mut stored = 0.0;
    for (port, _) in &workers.0 {
        let n = inserted_by(*port).await;
        assert!(n > 0.0, "the worker on {port} stored nothing");
        stored += n;
        wait_until(
            Duration::from_secs(10),
            "every shard's lag gauge at 0",
            || {
                let (port, shard_keys) = (*port, shard_keys.clone());
                async move {
                    let Some(text) = scrape(port).await else {
                        return false;
                    };
                    // Read as text: the metrics parser stops a label value at
                    // the first `}`, and shard keys hold braces.
                    shard_keys.iter().all(|k| {
                        let series = format!(
                            "audit_worker_queue_lag_messages{{queue=\"{k}\",source=\"stream\"}} "
                        );
                        text.lines()
                            .any(|l| l.strip_prefix(&series).is_some_and(|v| v.trim() == "0"))
                    })
                }
            },
        )
        .await;
    }
    assert_eq!(stored, total as f64, "each event inserted by one worker");

    // A job requested on a shard runs once; its audit event goes to shard
    // 0 and is stored, and the requester's notification goes to the
    // requester's notifications stream, hash-tagged like the shards.
    let requester = "officer-7";
    let day = chrono::Duration::days(1);
    let filters = serde_json::json!({
        "from": (chrono::Utc::now() - day).to_rfc3339(),
        "to": (chrono::Utc::now() + day).to_rfc3339(),
        "organizationId": "org-1",
    });
    let _: String = redis::cmd("XADD")
        .arg(tagged_key(&env.stream, 2))
        .arg("*")
        .arg("name")
        .arg("export.audit")
        .arg("data")
        .arg(crate::export::request(filters, "ndjson", "gzip", requester))
        .query_async(&mut conn)
        .await
        .unwrap();
    let mine = tagged_key(&notifications, shard_for(requester, shards));
    wait_until(
        Duration::from_secs(120),
        "the export's notification and audit event",
        || async {
            let mut conn = client.get_async_connection().await.unwrap();
            let notified: usize = redis::cmd("XLEN")
                .arg(&mine)
                .query_async(&mut conn)
                .await
                .unwrap();
            notified == 1 && env.row_count().await == total as i64 + 1
        },
    )
    .await;
    for k in (0..shards).filter(|&k| k != shard_for(requester, shards)) {
        let other: usize = redis::cmd("XLEN")
            .arg(tagged_key(&notifications, k))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(other, 0, "notification shard {k} holds nothing");
    }
    let completed: i64 = env
        .pg
        .query_one(
            "SELECT count(*) FROM audit_log WHERE action = 'audit.export.completed' \
             AND principal_id = $1",
            &[&requester],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(completed, 1, "the export is audited once");
    workers.stop();
    drop(topology);
    env.cleanup().await;
}

/// A promoted replica may lack the consumer group (created on the old
/// master just before it died): the worker creates it again and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_group_missing_after_a_failover_is_created_again() {
    let env = TestEnv::new("lostgroup").await;
    let mut config = env.config();
    config.bullmq.enabled = false;
    let worker = InProcessWorker::start(config);
    env.add_events(&(0..100).map(event).collect::<Vec<_>>())
        .await;
    wait_until(Duration::from_secs(60), "the first 100 rows", || async {
        env.row_count().await == 100
    })
    .await;
    let mut conn = env.redis_conn().await;
    let destroyed: i64 = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(&env.stream)
        .arg(&env.group)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(destroyed, 1, "the group existed");
    env.add_events(&(100..200).map(event).collect::<Vec<_>>())
        .await;
    wait_until(
        Duration::from_secs(60),
        "the group created again and the next 100 rows stored",
        || async { env.row_count().await == 200 && env.pending_count().await == 0 },
    )
    .await;
    assert_eq!(env.count_and_distinct().await, (200, 200));
    assert_eq!(env.dlq_len().await, 0);
    worker.stop().await;
    env.cleanup().await;
}
