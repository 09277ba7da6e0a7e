//! Ingest benchmarks, run with `benches/ingest.sh` (builds the release
//! binary first). They use the `audit_worker` database and throw-away
//! schemas; Redis and PostgreSQL must be up (scripts/services.sh).
//! `BENCH_EVENTS` sets the count (default 200,000).
//!
//! - `BENCH_MODE=ingest` (default): events per second from a
//!   pre-filled Redis stream to committed rows, against a plain binary COPY
//!   of the same rows into the same table definition; the worker's peak RSS.
//! - `BENCH_MODE=drain`: the database refuses writes (a trigger
//!   raising SQLSTATE 25006) while the stream fills and the breaker opens;
//!   then it accepts them again: time from that moment to the backlog
//!   drained, and the throughput of the drain.
//!
//! - `BENCH_MODE=latency`: end-to-end latency (XADD to commit, the
//!   worker's own `audit_worker_end_to_end_latency_seconds` histogram) at
//!   10% and 50% of the maximum rate, with a paced producer. The maximum is
//!   measured first, in the same run (a pre-filled stream of
//!   `BENCH_EVENTS`, default 100,000 here, drained by one worker), or given
//!   as `BENCH_MAX_RATE`; each paced phase lasts `BENCH_SECONDS` (15).
//!
//! - `BENCH_MODE=sharded`: events per second from a pre-filled sharded
//!   stream on a three-master Redis Cluster (brought up on loopback by
//!   `scripts/redis-topology.sh`) to committed rows, with `BENCH_SHARDS`
//!   shards (1) and `BENCH_WORKERS` worker processes; events go to the
//!   shard of their organisation (`shards::shard_for`).
//!
//! `BENCH_WORKERS` sets the number of worker processes sharing the stream
//! in the ingest and sharded modes (1).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::SinkExt;
use tokio_postgres::NoTls;

#[path = "support/sample_event.rs"]
mod sample_event;
use sample_event::event;

const DB: &str = "postgres://postgres@127.0.0.1:5432/audit_worker";
const REDIS: &str = "redis://127.0.0.1:6379";

/// CPU time (user + system) a process has used so far, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some(ticks / 100.0)
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[tokio::main]
async fn main() {
    match std::env::var("BENCH_MODE").as_deref() {
        Ok("drain") => return drain().await,
        Ok("latency") => return latency().await,
        Ok("sharded") => return sharded().await,
        _ => {}
    }
    let n: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let tag = format!("bench_{}", std::process::id());
    let pg = connect_db().await;
    let stream = format!("bench:{tag}:events");
    let schema_worker = format!("{tag}_worker");
    let schema_copy = format!("{tag}_copy");

    // A worker has run against this database before: the schema and the
    // accepted window's partitions exist, as on any restart in production.
    let bin = worker_bin();
    warm_up(&bin, &tag, &pg, &schema_worker).await;

    // Pre-fill the stream.
    let client = redis::Client::open(REDIS).unwrap();
    let mut rc = client.get_multiplexed_async_connection().await.unwrap();
    let started = Instant::now();
    prefill(&mut rc, &stream, n).await;
    eprintln!("pre-filled {n} entries in {:.1?}", started.elapsed());

    // The worker, as a separate release process.
    // BENCH_WORKERS worker processes share the stream in one consumer group.
    let workers: usize = std::env::var("BENCH_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let started = Instant::now();
    let mut children: Vec<std::process::Child> = (0..workers)
        .map(|w| {
            spawn_worker(
                &bin,
                &tag,
                &schema_worker,
                &stream,
                Some(format!("{tag}-{w}")),
                &[],
            )
            .0
        })
        .collect();
    let mut first_row: Option<Instant> = None;
    let mut peak_kib = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        for child in &children {
            peak_kib = peak_kib.max(vm_hwm_kib(child.id()).unwrap_or(0));
        }
        let count: i64 = match pg
            .query_one(
                &format!("SELECT count(*) FROM \"{schema_worker}\".audit_log"),
                &[],
            )
            .await
        {
            Ok(r) => r.get(0),
            Err(_) => 0,
        };
        if count > 0 && first_row.is_none() {
            first_row = Some(Instant::now());
        }
        if count as usize >= n {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1200),
            "worker too slow or stuck at {count}"
        );
    }
    let total = started.elapsed();
    let steady = first_row.map(|t| t.elapsed()).unwrap_or(total);
    let mut cpu_secs = 0.0;
    for child in &mut children {
        peak_kib = peak_kib.max(vm_hwm_kib(child.id()).unwrap_or(0));
        cpu_secs += cpu_seconds(child.id()).unwrap_or(0.0);
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let _ = child.wait();
    }

    // The same rows by plain binary COPY into an identical, empty table.
    let cols = "event_time, timestamp_raw, idempotency_key, event_id, action, status, principal_id, organization_id, target_resource_type, target_resource_id, outcome_description, hash, hash_provided, signature, signature_algorithm, signature_key_id, event_version, correlation_id, data_classification, retention_policy, session_context, details, source";
    let mut config = audit_worker::config::Config::load_from(
        None,
        figment::providers::Env::prefixed("AUDIT_WORKER_BENCH_UNSET__"),
    )
    .unwrap();
    config.database.url = DB.to_string().into();
    config.database.schema = schema_copy.clone();
    audit_worker::db::migrate(&config).await.unwrap();
    pg.batch_execute(&format!(
        "SET search_path = \"{schema_copy}\"; SELECT audit_log_ensure_partition(m::date) FROM generate_series(date_trunc('month', now() - interval '2 days'), now(), interval '1 month') m"
    ))
    .await
    .unwrap();
    let out = pg
        .copy_out(&format!(
            "COPY (SELECT {cols} FROM \"{schema_worker}\".audit_log) TO STDOUT (FORMAT binary)"
        ))
        .await
        .unwrap();
    use futures::TryStreamExt;
    let chunks: Vec<Bytes> = out.try_collect().await.unwrap();
    let copy_started = Instant::now();
    let sink = pg
        .copy_in(&format!(
            "COPY \"{schema_copy}\".audit_log ({cols}) FROM STDIN (FORMAT binary)"
        ))
        .await
        .unwrap();
    futures::pin_mut!(sink);
    for c in chunks {
        sink.send(c).await.unwrap();
    }
    let copied = sink.finish().await.unwrap();
    let copy_time = copy_started.elapsed();

    let worker_rate = n as f64 / total.as_secs_f64();
    let steady_rate = n as f64 / steady.as_secs_f64();
    let copy_rate = copied as f64 / copy_time.as_secs_f64();
    println!("events: {n}, worker processes: {workers}");
    println!("worker: {:.2} s from start to last row = {:.0} events/s (first row to last: {:.2} s = {:.0} events/s)", total.as_secs_f64(), worker_rate, steady.as_secs_f64(), steady_rate);
    println!(
        "binary COPY of the same rows: {:.2} s = {:.0} rows/s",
        copy_time.as_secs_f64(),
        copy_rate
    );
    println!(
        "ratio worker/COPY: {:.2} (steady: {:.2})",
        worker_rate / copy_rate,
        steady_rate / copy_rate
    );
    println!(
        "worker peak RSS (largest process): {:.1} MiB",
        peak_kib as f64 / 1024.0
    );
    println!(
        "worker CPU (all processes, user + system): {cpu_secs:.2} s = {:.1} µs per event",
        cpu_secs * 1e6 / n as f64
    );

    let _ = pg
        .batch_execute(&format!(
            "DROP SCHEMA \"{schema_worker}\" CASCADE; DROP SCHEMA \"{schema_copy}\" CASCADE"
        ))
        .await;
    let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&stream).query_async(&mut rc).await;
}

/// The benchmark database's client (its connection runs in a task).
async fn connect_db() -> tokio_postgres::Client {
    let (pg, conn) = tokio_postgres::connect(DB, NoTls)
        .await
        .expect("PostgreSQL up: run scripts/services.sh");
    tokio::spawn(conn);
    pg
}

/// Fills `stream` with `n` events.
async fn prefill(rc: &mut redis::aio::MultiplexedConnection, stream: &str, n: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(2_000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("data")
                .arg(event(i))
                .ignore();
        }
        let _: () = pipe.query_async(rc).await.unwrap();
    }
}

/// Figures for the recovery after a database outage.
async fn drain() {
    let n: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let tag = format!("drain_{}", std::process::id());
    let pg = connect_db().await;
    let stream = format!("bench:{tag}:events");
    let schema = format!("{tag}_worker");
    let mut config = audit_worker::config::Config::load_from(
        None,
        figment::providers::Env::prefixed("AUDIT_WORKER_BENCH_UNSET__"),
    )
    .unwrap();
    config.database.url = DB.to_string().into();
    config.database.schema = schema.clone();
    audit_worker::db::migrate(&config).await.unwrap();
    pg.batch_execute(&format!(
        "CREATE FUNCTION \"{schema}\".refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'bench: refusing writes' USING ERRCODE = '25006'; END $$;
         CREATE TRIGGER refuse BEFORE INSERT ON \"{schema}\".audit_log FOR EACH ROW EXECUTE FUNCTION \"{schema}\".refuse();"
    ))
    .await
    .unwrap();
    let client = redis::Client::open(REDIS).unwrap();
    let mut rc = client.get_multiplexed_async_connection().await.unwrap();
    prefill(&mut rc, &stream, n).await;

    let bin = worker_bin();
    let (mut child, port) = spawn_worker(&bin, &tag, &schema, &stream, None, &[]);
    // Wait for the breaker to open (default settings: 5 failed attempts).
    let breaker_url = format!("http://127.0.0.1:{port}/health/circuit-breaker");
    let opened = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let body = match reqwest_lite(&breaker_url).await {
            Some(b) => b,
            None => continue,
        };
        if body.contains("\"open\"") {
            break;
        }
        assert!(
            opened.elapsed() < Duration::from_secs(300),
            "breaker never opened"
        );
    }
    eprintln!(
        "breaker open after {:.1?}; database accepts writes again now",
        opened.elapsed()
    );
    pg.batch_execute(&format!("DROP TRIGGER refuse ON \"{schema}\".audit_log"))
        .await
        .unwrap();
    let back = Instant::now();
    let mut first_row: Option<Instant> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let count: i64 = pg
            .query_one(&format!("SELECT count(*) FROM \"{schema}\".audit_log"), &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        if count > 0 && first_row.is_none() {
            first_row = Some(Instant::now());
        }
        if count as usize >= n {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(1200),
            "drain stuck at {count}"
        );
    }
    let drained = back.elapsed();
    let drain_rate = first_row
        .map(|t| n as f64 / t.elapsed().as_secs_f64())
        .unwrap_or(0.0);
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    let dlq: u64 = redis::cmd("XLEN")
        .arg(format!("bench:{tag}:dlq"))
        .query_async(&mut rc)
        .await
        .unwrap();
    println!("events: {n}");
    println!("database back -> backlog drained: {:.2} s (includes waiting for the breaker's half-open probe)", drained.as_secs_f64());
    println!(
        "first row after recovery: {:.2} s",
        first_row.map(|t| (t - back).as_secs_f64()).unwrap_or(0.0)
    );
    println!("drain throughput: {drain_rate:.0} events/s; dead letters: {dlq}");
    let _ = pg
        .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await;
    let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&stream).query_async(&mut rc).await;
}

/// Latency at 10% and 50% of the maximum rate (see the module docs).
async fn latency() {
    let env_num = |k: &str, d: f64| -> f64 {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let n = env_num("BENCH_EVENTS", 100_000.0) as usize;
    let seconds = env_num("BENCH_SECONDS", 15.0);
    let bin = worker_bin();
    let pg = connect_db().await;
    let client = redis::Client::open(REDIS).unwrap();
    let mut rc = client.get_multiplexed_async_connection().await.unwrap();

    // 1. The maximum rate: a pre-filled stream drained by one worker.
    let max_rate = match std::env::var("BENCH_MAX_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(r) => r,
        None => {
            let tag = format!("latmax_{}", std::process::id());
            let (stream, schema) = (format!("bench:{tag}:events"), format!("{tag}_worker"));
            warm_up(&bin, &tag, &pg, &schema).await;
            prefill(&mut rc, &stream, n).await;
            let started = Instant::now();
            let (mut child, _) = spawn_worker(&bin, &tag, &schema, &stream, None, &[]);
            wait_for_rows(&pg, &schema, n, started).await;
            let rate = n as f64 / started.elapsed().as_secs_f64();
            stop(&mut child);
            cleanup(&pg, &mut rc, &schema, &stream).await;
            rate
        }
    };
    println!("maximum rate (one worker, pre-filled stream of {n}): {max_rate:.0} events/s");

    // 2. Paced phases, each with a fresh worker (a fresh histogram).
    for share in [0.10, 0.50] {
        let rate = max_rate * share;
        let tag = format!("lat{}_{}", (share * 100.0) as u32, std::process::id());
        let (stream, schema) = (format!("bench:{tag}:events"), format!("{tag}_worker"));
        warm_up(&bin, &tag, &pg, &schema).await;
        let (mut child, port) = spawn_worker(&bin, &tag, &schema, &stream, None, &[]);
        let metrics_url = format!("http://127.0.0.1:{port}/metrics");
        wait_ready(port).await;
        // One event every 1/rate s, sent in 1 ms ticks.
        let total = (rate * seconds) as usize;
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut sent = 0usize;
        while sent < total {
            tick.tick().await;
            let due = ((started.elapsed().as_secs_f64() * rate) as usize).min(total);
            if due > sent {
                let mut pipe = redis::pipe();
                for i in sent..due {
                    pipe.cmd("XADD")
                        .arg(&stream)
                        .arg("*")
                        .arg("data")
                        .arg(event(i))
                        .ignore();
                }
                let _: () = pipe.query_async(&mut rc).await.unwrap();
                sent = due;
            }
        }
        wait_for_rows(&pg, &schema, total, started).await;
        let body = reqwest_lite(&metrics_url).await.unwrap_or_default();
        let buckets = stream_latency_buckets(&body);
        println!(
            "latency at {:.0}% load ({rate:.0} events/s, {total} events): p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms (enqueue -> commit)",
            share * 100.0,
            quantile(&buckets, 0.50) * 1000.0,
            quantile(&buckets, 0.99) * 1000.0,
            quantile(&buckets, 0.999) * 1000.0,
        );
        stop(&mut child);
        cleanup(&pg, &mut rc, &schema, &stream).await;
    }
}

/// Runs a worker once against `schema` on an empty stream and stops it
/// when it is ready and its partitions stop changing, so the measured run
/// starts on a database that a worker already set up (migrations, the
/// accepted window's monthly partitions), as any restart in production.
async fn warm_up(bin: &str, tag: &str, pg: &tokio_postgres::Client, schema: &str) {
    let (mut child, port) =
        spawn_worker(bin, tag, schema, &format!("bench:{tag}:warm-up"), None, &[]);
    wait_ready(port).await;
    let partitions = || async {
        pg.query_one(
            &format!("SELECT count(*) FROM pg_inherits WHERE inhparent = '\"{schema}\".audit_log'::regclass"),
            &[],
        )
        .await
        .map(|r| r.get::<_, i64>(0))
        .unwrap_or(0)
    };
    let mut last = -1;
    loop {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = partitions().await;
        if now == last {
            break;
        }
        last = now;
    }
    stop(&mut child);
}

/// Waits until the worker on `port` answers `/readyz` 200 (2 minutes at most).
async fn wait_ready(port: u16) {
    let started = Instant::now();
    while reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "worker not ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `schema` holds `n` rows (20 minutes at most).
async fn wait_for_rows(pg: &tokio_postgres::Client, schema: &str, n: usize, started: Instant) {
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let count: i64 = pg
            .query_one(&format!("SELECT count(*) FROM \"{schema}\".audit_log"), &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        if count as usize >= n {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1200),
            "worker too slow or stuck at {count}"
        );
    }
}

fn stop(child: &mut std::process::Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
}

async fn cleanup(
    pg: &tokio_postgres::Client,
    rc: &mut redis::aio::MultiplexedConnection,
    schema: &str,
    stream: &str,
) {
    let _ = pg
        .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await;
    let _: redis::RedisResult<()> = redis::cmd("DEL").arg(stream).query_async(rc).await;
}

/// The cumulative buckets (upper bound, count) of the stream source's
/// end-to-end latency histogram in a Prometheus text exposition.
fn stream_latency_buckets(body: &str) -> Vec<(f64, f64)> {
    let prefix = "audit_worker_end_to_end_latency_seconds_bucket{";
    body.lines()
        .filter(|l| l.starts_with(prefix) && l.contains("source=\"stream\""))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, count))
        })
        .collect()
}

/// The q-quantile of cumulative buckets, interpolated linearly within the
/// bucket as Prometheus' histogram_quantile does.
fn quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let Some(&(_, total)) = buckets.last() else {
        return f64::NAN;
    };
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return prev.0;
            }
            let within = if count > prev.1 {
                (rank - prev.1) / (count - prev.1)
            } else {
                0.0
            };
            return prev.0 + (le - prev.0) * within;
        }
        prev = (le, count);
    }
    prev.0
}

/// The body of a GET, if any.
async fn reqwest_lite(url: &str) -> Option<String> {
    reqwest::get(url).await.ok()?.text().await.ok()
}

/// The worker binary the benchmark runs: `AUDIT_WORKER_BIN`, or the
/// release build in `CARGO_TARGET_DIR` (default `target`).
fn worker_bin() -> String {
    std::env::var("AUDIT_WORKER_BIN").unwrap_or_else(|_| {
        let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
        format!("{target}/release/audit-worker")
    })
}

/// Starts one release worker process on `stream`, writing to `schema`, with
/// its own HTTP port (returned); `consumer` names it when several share the
/// stream.
fn spawn_worker(
    bin: &str,
    tag: &str,
    schema: &str,
    stream: &str,
    consumer: Option<String>,
    extra: &[(&str, String)],
) -> (std::process::Child, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new(bin);
    cmd.arg("run")
        .env("AUDIT_WORKER__DATABASE__URL", DB)
        .env("AUDIT_WORKER__DATABASE__SCHEMA", schema)
        .env("AUDIT_WORKER__STREAM__KEY", stream)
        .env("AUDIT_WORKER__STREAM__GROUP", format!("{tag}-group"))
        .env("AUDIT_WORKER__DLQ__KEY", format!("bench:{tag}:dlq"))
        .env("AUDIT_WORKER__HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .env("AUDIT_WORKER__LOG__LEVEL", "warn")
        .stdout(Stdio::null());
    if let Some(consumer) = consumer {
        cmd.env("AUDIT_WORKER__STREAM__CONSUMER", consumer);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap_or_else(|e| {
        panic!("cannot start {bin} ({e}): build it with cargo build --release")
    });
    (child, port)
}

/// Ingest from a sharded stream on a Redis Cluster: `BENCH_SHARDS` shards,
/// `BENCH_WORKERS` processes, from their start to the last committed row.
async fn sharded() {
    let env_num = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let n = env_num("BENCH_EVENTS", 100_000);
    let shards = env_num("BENCH_SHARDS", 1).max(1) as u32;
    let workers = env_num("BENCH_WORKERS", 1).max(1);
    let tag = format!("bench_{}", std::process::id());
    let pg = connect_db().await;
    let schema = format!("{tag}_sharded");
    let bin = worker_bin();
    warm_up(&bin, &tag, &pg, &schema).await;

    // A three-master cluster on loopback, in a directory of its own.
    // Below the kernel's ephemeral ports, bus ports (+1000) included (see
    // scripts/redis-topology.sh).
    let base = 20_000 + (std::process::id() % 10_000) as u16;
    let dir = std::env::temp_dir().join(format!("audit-worker-bench-cluster-{tag}"));
    let topology = |args: &[&str]| {
        let ok = Command::new("scripts/redis-topology.sh")
            .args(args)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "scripts/redis-topology.sh {args:?} failed");
    };
    let dir_s = dir.to_string_lossy().to_string();
    topology(&["cluster", &dir_s, &base.to_string()]);
    let nodes: Vec<String> = (0..3).map(|i| format!("127.0.0.1:{}", base + i)).collect();
    let client = redis::cluster::ClusterClient::new(
        nodes
            .iter()
            .map(|n| format!("redis://{n}"))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let mut rc = client.get_async_connection().await.unwrap();
    let stream = format!("bench:{tag}:events");
    let started = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(2_000) {
        let mut pipes: Vec<redis::Pipeline> = (0..shards).map(|_| redis::pipe()).collect();
        for &i in chunk {
            let shard = audit_worker::shards::shard_for(&format!("org-{}", i % 50), shards);
            pipes[shard as usize]
                .cmd("XADD")
                .arg(audit_worker::shards::tagged_key(&stream, shard))
                .arg("*")
                .arg("data")
                .arg(event(i))
                .ignore();
        }
        for pipe in &pipes {
            let _: () = pipe.query_async(&mut rc).await.unwrap();
        }
    }
    eprintln!(
        "pre-filled {n} entries in {shards} shard(s) in {:.1?}",
        started.elapsed()
    );

    let extra = [
        (
            "AUDIT_WORKER__REDIS__CLUSTER_NODES",
            format!("[\"{}\"]", nodes.join("\",\"")),
        ),
        ("AUDIT_WORKER__STREAM__SHARDS", shards.to_string()),
        ("AUDIT_WORKER__BULLMQ__ENABLED", "false".to_string()),
    ];
    let started = Instant::now();
    let mut children: Vec<std::process::Child> = (0..workers)
        .map(|w| {
            spawn_worker(
                &bin,
                &tag,
                &schema,
                &stream,
                Some(format!("{tag}-{w}")),
                &extra,
            )
            .0
        })
        .collect();
    wait_for_rows(&pg, &schema, n, started).await;
    let total = started.elapsed();
    for child in &mut children {
        stop(child);
    }
    println!(
        "sharded: {n} events, {shards} shard(s), {workers} worker process(es): {:.2} s from start to last row = {:.0} events/s",
        total.as_secs_f64(),
        n as f64 / total.as_secs_f64()
    );
    topology(&["down", &dir_s]);
    let _ = pg
        .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await;
}
