//! The sink's answers as sources and operators see them: which rows are new,
//! which are redeliveries, which reuse an eventId; precision of event times.

use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use serde_json::{json, Value};

use crate::common::*;
use crate::ops::{parse_metrics, sample_sum, scrape};

/// `audit_worker_events_total{source="stream",outcome=...}` now.
async fn stream_events(env: &TestEnv, outcome: &str) -> f64 {
    let text = scrape(env.http_port).await.unwrap_or_default();
    sample_sum(
        &parse_metrics(&text),
        "audit_worker_events_total",
        &[("source", "stream"), ("outcome", outcome)],
    )
}

/// Waits until the stream source has counted `n` events with `outcome`.
async fn wait_for_stream_events(env: &TestEnv, outcome: &str, n: f64) {
    wait_until(
        Duration::from_secs(30),
        &format!("{n} {outcome} stream events"),
        || async { stream_events(env, outcome).await >= n },
    )
    .await;
}

/// Canonical hash v1 of an event, as the worker computes it.
fn hash_of(event: &Value) -> String {
    audit_worker::event::decode_event(
        event.to_string().as_bytes(),
        &Default::default(),
        Utc::now(),
    )
    .unwrap()
    .hash
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_event_id_is_dead_lettered_as_a_conflict_and_a_true_redelivery_stays_a_duplicate()
{
    let env = TestEnv::new("idem_conflict").await;
    let worker = InProcessWorker::start(env.config());
    env.wait_for_schema().await;

    let timestamp = ts(30);
    let first = json!({"eventId": "evt-reused", "timestamp": timestamp,
                       "action": "record.read", "status": "success", "principalId": "u-1"});
    let other = json!({"eventId": "evt-reused", "timestamp": timestamp,
                       "action": "record.delete", "status": "success", "principalId": "u-1"});
    let first_bytes = first.to_string().into_bytes();
    let other_bytes = other.to_string().into_bytes();
    env.add_entries(&[(None, first_bytes.clone())]).await;
    wait_for_stream_events(&env, "inserted", 1.0).await;

    // A different event under the same eventId and time, then the first
    // event again, byte for byte (a producer's retry).
    env.add_entries(&[(None, other_bytes.clone()), (None, first_bytes.clone())])
        .await;
    wait_for_stream_events(&env, "dead_lettered", 1.0).await;
    wait_for_stream_events(&env, "duplicate", 1.0).await;
    wait_until(Duration::from_secs(10), "nothing pending", || async {
        env.pending_count().await == 0
    })
    .await;

    // The first event is stored once, untouched.
    let rows = env
        .pg
        .query("SELECT action, hash FROM audit_log", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, String>(0), "record.read");
    let stored_hash: String = rows[0].get(1);
    assert_eq!(stored_hash, hash_of(&first));

    // The other one is a dead letter with its own bytes and both hashes.
    let letters = env.dlq_entries().await;
    assert_eq!(letters.len(), 1, "exactly one dead letter");
    let letter = &letters[0];
    assert_eq!(letter["reason"], b"idempotency_conflict");
    assert_eq!(letter["data"], other_bytes, "the original bytes");
    let error = String::from_utf8(letter["error"].clone()).unwrap();
    let other_hash = hash_of(&other);
    assert_ne!(other_hash, stored_hash);
    assert!(
        error.contains(&format!("stored hash {stored_hash}"))
            && error.contains(&format!("this event's hash {other_hash}"))
            && error.contains("evt-reused"),
        "error names the event and both hashes: {error}"
    );

    let scrape = parse_metrics(&scrape(env.http_port).await.unwrap());
    let events = |outcome| {
        sample_sum(
            &scrape,
            "audit_worker_events_total",
            &[("source", "stream"), ("outcome", outcome)],
        )
    };
    assert_eq!(events("inserted"), 1.0);
    assert_eq!(
        events("duplicate"),
        1.0,
        "the redelivery is a silent duplicate"
    );
    assert_eq!(events("dead_lettered"), 1.0);
    assert_eq!(
        sample_sum(
            &scrape,
            "audit_worker_dead_letters_total",
            &[("reason", "idempotency_conflict")]
        ),
        1.0
    );
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nanosecond_timestamp_is_stored_as_sent_and_counted_inserted_not_duplicate() {
    let env = TestEnv::new("nanos").await;
    let worker = InProcessWorker::start(env.config());
    env.wait_for_schema().await;

    // As Java's Instant.toString() and Go's RFC3339Nano write it.
    let seconds =
        (Utc::now() - chrono::Duration::seconds(60)).to_rfc3339_opts(SecondsFormat::Secs, true);
    let timestamp = seconds.replace('Z', ".123456789Z");
    let event = json!({"eventId": "evt-nanos", "timestamp": timestamp,
                       "action": "record.read", "status": "success"});
    env.add_events(std::slice::from_ref(&event)).await;
    wait_until(Duration::from_secs(30), "the entry handled", || async {
        stream_events(&env, "inserted").await + stream_events(&env, "duplicate").await >= 1.0
    })
    .await;

    let row = env
        .pg
        .query_one(
            "SELECT timestamp_raw, hash, \
                    to_char(event_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') \
             FROM audit_log WHERE event_id = 'evt-nanos'",
            &[],
        )
        .await
        .expect("the row exists");
    assert_eq!(
        row.get::<_, String>(0).as_bytes(),
        timestamp.as_bytes(),
        "timestamp_raw is the producer's string, byte for byte"
    );
    assert_eq!(row.get::<_, String>(1), hash_of(&event));
    assert_eq!(
        row.get::<_, String>(2),
        format!("{}.123456", seconds.trim_end_matches('Z'))
    );
    assert_eq!(stream_events(&env, "inserted").await, 1.0);
    assert_eq!(stream_events(&env, "duplicate").await, 0.0);
    assert_eq!(env.dlq_len().await, 0);
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_health_checks_never_opens_the_breaker_and_every_event_is_stored() {
    let env = TestEnv::new("health_flood").await;
    let mut config = env.config();
    // A database 40 ms away (each health query holds a connection for a
    // round trip), a small general pool and quick timeouts: health checks
    // that took connections from ingestion would show at once.
    let proxy = delay_proxy(Duration::from_millis(20)).await;
    config.database.url = test_database_url()
        .replace("127.0.0.1:5432", &format!("127.0.0.1:{proxy}"))
        .into();
    config.database.pool_size = 2;
    config.database.connect_timeout_secs = 1;
    config.sink.retry_base_ms = 20;
    config.sink.retry_cap_ms = 100;
    let worker = InProcessWorker::start(config);
    env.wait_for_schema().await;

    const EVENTS: usize = 2000;
    let producing = {
        let env_events: Vec<Value> = (0..EVENTS).map(event).collect();
        let redis = env.redis.clone();
        let stream = env.stream.clone();
        tokio::spawn(async move {
            let mut conn = crate::common::patient_redis(&redis).await.unwrap();
            for chunk in env_events.chunks(20) {
                let mut pipe = redis::pipe();
                for e in chunk {
                    pipe.cmd("XADD")
                        .arg(&stream)
                        .arg("*")
                        .arg("data")
                        .arg(e.to_string());
                }
                let _: Vec<String> = pipe.query_async(&mut conn).await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    // 500 concurrent clients, each asking /readyz and /health/database in
    // turn for as long as events are being added.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..500 {
        let client = client.clone();
        let stop = stop.clone();
        let base = format!("http://127.0.0.1:{}", env.http_port);
        flood.spawn(async move {
            let mut answered = 0u64;
            let mut n = i;
            while !stop.is_cancelled() {
                let path = if n % 2 == 0 {
                    "/readyz"
                } else {
                    "/health/database"
                };
                n += 1;
                if client.get(format!("{base}{path}")).send().await.is_ok() {
                    answered += 1;
                }
            }
            answered
        });
    }
    producing.await.unwrap();
    stop.cancel();
    let mut answered = 0;
    while let Some(n) = flood.join_next().await {
        answered += n.unwrap();
    }
    assert!(answered >= 500, "the flood was served ({answered} answers)");

    wait_until(Duration::from_secs(60), "every event stored", || async {
        env.row_count().await == EVENTS as i64
    })
    .await;
    let scrape = parse_metrics(&scrape(env.http_port).await.unwrap());
    assert_eq!(
        sample_sum(
            &scrape,
            "audit_worker_circuit_breaker_transitions_total",
            &[("to", "open")]
        ),
        0.0,
        "health checks never opened the breaker"
    );
    assert_eq!(env.dlq_len().await, 0);
    println!(
        "health flood: {answered} health answers while {EVENTS} events were stored; {} sink retries",
        sample_sum(&scrape, "audit_worker_sink_retries_total", &[])
    );
    worker.stop().await;
    env.cleanup().await;
}

/// A TCP proxy to the test PostgreSQL (127.0.0.1:5432) that delays every
/// chunk by `delay` in each direction: a database one round trip of
/// 2 x `delay` away. Returns its port; it runs until the test ends.
async fn delay_proxy(delay: Duration) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect("127.0.0.1:5432").await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pipe_delayed(cr, sw, delay));
            tokio::spawn(pipe_delayed(sr, cw, delay));
        }
    });
    port
}

async fn pipe_delayed(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        tokio::time::sleep(delay).await;
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// A second session on the test's schema (the test's own `env.pg` keeps
/// reading while this one holds locks).
async fn session(env: &TestEnv) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&test_database_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!("SET search_path = \"{}\"", env.schema))
        .await
        .unwrap();
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_at_both_edges_of_the_accepted_window_are_stored_while_a_long_reader_locks_audit_log(
) {
    let env = TestEnv::new("window_lock").await;
    let config = env.config();
    let max_age = chrono::Duration::days(config.validation.max_event_age_days);
    let skew = chrono::Duration::seconds(config.validation.max_future_skew_secs);
    let window = audit_worker::partitions::PartitionWindow::from_config(&config);
    let worker = InProcessWorker::start(config);
    env.wait_for_schema().await;

    // What a long `verify` or export holds for its whole transaction.
    let reader = session(&env).await;
    reader
        .batch_execute("BEGIN; LOCK TABLE audit_log IN ACCESS SHARE MODE")
        .await
        .unwrap();

    let now = Utc::now();
    let at = |t: chrono::DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Millis, true);
    let times = [
        now - max_age + chrono::Duration::hours(1), // the oldest accepted month
        now - max_age / 2,
        now,
        now + skew - chrono::Duration::minutes(1), // the newest accepted instant
    ];
    let events: Vec<Value> = times
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"eventId": format!("edge-{i}"), "timestamp": at(*t),
                             "action": "record.read", "status": "success"})
        })
        .collect();
    let started = std::time::Instant::now();
    env.add_events(&events).await;
    wait_until(
        Duration::from_secs(10),
        "every edge event stored while the reader holds its lock",
        || async { env.row_count().await == events.len() as i64 },
    )
    .await;
    let took = started.elapsed();
    // The reader's transaction is still open: nothing waited for it to end.
    let in_tx: String = reader
        .query_one("SELECT current_setting('transaction_isolation')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!in_tx.is_empty());
    let locks: i64 = env
        .pg
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
             WHERE c.relname = 'audit_log' AND l.mode = 'AccessShareLock' AND l.granted \
               AND c.relnamespace = current_schema()::regnamespace",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(locks >= 1, "the reader still holds its lock");
    assert_eq!(env.dlq_len().await, 0);
    println!(
        "window edges: {} events stored in {took:?} under the reader's lock",
        events.len()
    );

    // Meanwhile the background upkeep made every month of the window, still
    // under the reader's lock.
    let months = window.months(Utc::now()).len() as i64;
    wait_until(
        Duration::from_secs(60),
        "every month of the window",
        || async {
            env.pg
                .query_one(
                    "SELECT count(*) FROM pg_inherits WHERE inhparent = 'audit_log'::regclass",
                    &[],
                )
                .await
                .map(|r| r.get::<_, i64>(0) >= months)
                .unwrap_or(false)
        },
    )
    .await;
    wait_until(
        Duration::from_secs(30),
        "the upkeep round counted",
        || async {
            let text = scrape(env.http_port).await.unwrap_or_default();
            sample_sum(
                &parse_metrics(&text),
                "audit_worker_periodic_runs_total",
                &[("task", "partition_upkeep"), ("result", "ran")],
            ) == 1.0
        },
    )
    .await;
    println!(
        "window edges: {months} monthly partitions made in the background within {:?} of the events",
        started.elapsed()
    );
    reader.batch_execute("COMMIT").await.unwrap();
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_month_whose_partition_cannot_be_created_defers_only_its_own_rows() {
    let env = TestEnv::new("ddl_defer").await;
    let mut config = env.config();
    config.database.ddl_lock_timeout_ms = 200;
    config.sink.retry_base_ms = 100;
    config.sink.retry_cap_ms = 200;
    audit_worker::db::migrate(&config).await.unwrap();

    // This month's partition exists; every other month's DDL is held up by
    // a session holding the partition-creation lock.
    let recent =
        (Utc::now() - chrono::Duration::seconds(60)).to_rfc3339_opts(SecondsFormat::Millis, true);
    env.pg
        .execute(
            "SELECT audit_log_ensure_partition($1::text::timestamptz::date)",
            &[&recent],
        )
        .await
        .unwrap();
    let blocker = session(&env).await;
    blocker
        .execute(
            "SELECT pg_advisory_lock(hashtext('audit_log_partitions:' || current_schema()))",
            &[],
        )
        .await
        .unwrap();

    let old = json!({"eventId": "old-month", "timestamp": "2019-05-04T12:00:00.000Z",
                     "action": "record.read", "status": "success"});
    let new = json!({"eventId": "this-month", "timestamp": recent,
                     "action": "record.read", "status": "success"});
    // One read, one batch.
    env.add_events(&[old, new]).await;
    let worker = InProcessWorker::start(config);
    wait_until(
        Duration::from_secs(15),
        "this month's row stored",
        || async {
            env.pg
                .query_one(
                    "SELECT count(*) FROM audit_log WHERE event_id = 'this-month'",
                    &[],
                )
                .await
                .map(|r| r.get::<_, i64>(0) == 1)
                .unwrap_or(false)
        },
    )
    .await;
    // Let the old month's row fail its DDL a few more times.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.row_count().await, 1, "the old month's row waits");
    assert_eq!(env.dlq_len().await, 0, "and is not dead-lettered");
    // (The stream source acknowledges a read batch's entries together, so
    // the stored row's entry is acknowledged with the deferred one.)
    assert!(env.pending_count().await >= 1, "it stays pending in Redis");
    let scrape = parse_metrics(&scrape(env.http_port).await.unwrap());
    assert_eq!(
        sample_sum(
            &scrape,
            "audit_worker_circuit_breaker_transitions_total",
            &[("to", "open")]
        ),
        0.0,
        "a month's DDL failing is not a database outage"
    );
    assert!(
        sample_sum(&scrape, "audit_worker_sink_retries_total", &[]) >= 1.0,
        "the deferred row was retried"
    );

    // Once the lock is gone the month is made and its row stored.
    blocker
        .execute(
            "SELECT pg_advisory_unlock(hashtext('audit_log_partitions:' || current_schema()))",
            &[],
        )
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(30),
        "the old month's row stored",
        || async { env.row_count().await == 2 && env.pending_count().await == 0 },
    )
    .await;
    assert_eq!(env.dlq_len().await, 0);
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_and_health_connections_carry_a_statement_timeout_and_general_ones_do_not() {
    use audit_worker::db::{build_pool, PoolRole};
    let env = TestEnv::new("pool_roles").await;
    let mut config = env.config();
    config.database.statement_timeout_ms = 12_345;
    let show = |role| {
        let config = config.clone();
        async move {
            let pool = build_pool(&config, role).unwrap();
            let client = pool.get().await.unwrap();
            let timeout: String = client
                .query_one("SHOW statement_timeout", &[])
                .await
                .unwrap()
                .get(0);
            let search_path: String = client
                .query_one("SHOW search_path", &[])
                .await
                .unwrap()
                .get(0);
            (timeout, search_path, pool.status().max_size)
        }
    };
    let (timeout, path, size) = show(PoolRole::Sink).await;
    assert_eq!(timeout, "12345ms");
    assert!(path.contains(&env.schema), "{path}");
    assert_eq!(size, config.sink.writers);
    let (timeout, _, size) = show(PoolRole::Health).await;
    assert_eq!(timeout, "2s");
    assert_eq!(size, 1);
    let (timeout, _, size) = show(PoolRole::General).await;
    assert_eq!(timeout, "0", "verify and exports may run long");
    assert_eq!(size, config.database.pool_size);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_new_events_sharing_an_event_id_in_one_batch_store_the_first_and_dead_letter_the_second(
) {
    let env = TestEnv::new("idem_batch").await;
    let timestamp = ts(30);
    let first = json!({"eventId": "evt-twice", "timestamp": timestamp,
                       "action": "record.read", "status": "success"});
    let second = json!({"eventId": "evt-twice", "timestamp": timestamp,
                        "action": "record.update", "status": "success"});
    // Both queued before the worker starts: one read, one batch.
    env.add_events(&[first.clone(), second.clone()]).await;
    let worker = InProcessWorker::start(env.config());
    env.wait_for_schema().await;
    wait_for_stream_events(&env, "dead_lettered", 1.0).await;
    wait_for_stream_events(&env, "inserted", 1.0).await;

    let rows = env
        .pg
        .query(
            "SELECT hash FROM audit_log WHERE event_id = 'evt-twice'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].get::<_, String>(0),
        hash_of(&first),
        "the first one"
    );
    let letters = env.dlq_entries().await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["reason"], b"idempotency_conflict");
    assert_eq!(letters[0]["data"], second.to_string().into_bytes());
    assert_eq!(stream_events(&env, "duplicate").await, 0.0);
    worker.stop().await;
    env.cleanup().await;
}
