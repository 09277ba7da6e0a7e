//! Test harness: every test gets its own stream keys, consumer group and
//! PostgreSQL schema (in the `audit_worker_test` database), so tests run in
//! parallel and can be run again. Real Redis and PostgreSQL only.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use audit_worker::config::Config;
use chrono::{SecondsFormat, Utc};
use redis::aio::MultiplexedConnection;
use serde_json::{json, Value};
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

/// Base URL of the test database (created by scripts/services.sh, or here).
pub fn test_database_url() -> String {
    std::env::var("AUDIT_WORKER_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/audit_worker_test".into())
}

/// Redis for tests.
pub fn test_redis_url() -> String {
    std::env::var("AUDIT_WORKER_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A free TCP port on loopback (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One test's isolated world.
pub struct TestEnv {
    pub name: String,
    pub schema: String,
    pub stream: String,
    pub dlq: String,
    pub group: String,
    /// This test's BullMQ queue (under the default prefix `bull`), so
    /// workers of parallel tests never consume each other's jobs.
    pub queue: String,
    pub redis: redis::Client,
    pub pg: tokio_postgres::Client,
    pub http_port: u16,
    /// This test's object store directory (under the system's temporary
    /// directory), so no test writes to the default `artifacts` folder
    /// that `scripts/run.sh` uses.
    pub storage: std::path::PathBuf,
}

impl TestEnv {
    /// Creates unique names, the database if missing, and a clean schema.
    pub async fn new(test: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let nanos = Utc::now().timestamp_nanos_opt().unwrap_or_default() % 1_000_000_000;
        let name = format!("{test}_{}_{n}_{nanos}", std::process::id());
        ensure_test_database().await;
        let (pg, conn) = tokio_postgres::connect(&test_database_url(), NoTls)
            .await
            .expect("test database reachable: run scripts/services.sh");
        tokio::spawn(conn);
        let schema = format!("t_{name}");
        pg.batch_execute(&format!(
            "CREATE SCHEMA \"{schema}\"; SET search_path = \"{schema}\""
        ))
        .await
        .unwrap();
        Self {
            stream: format!("test:{name}:events"),
            dlq: format!("test:{name}:dlq"),
            group: format!("group-{name}"),
            queue: format!("q-{name}"),
            schema,
            redis: redis::Client::open(test_redis_url()).unwrap(),
            pg,
            http_port: free_port(),
            storage: std::env::temp_dir().join("audit-worker-it").join(&name),
            name,
        }
    }

    /// The worker configuration for this test (defaults plus its names).
    pub fn config(&self) -> Config {
        let mut c = Config::load_from(
            None,
            figment::providers::Env::prefixed("AUDIT_WORKER_IT_UNSET__"),
        )
        .expect("defaults load");
        c.redis.url = test_redis_url().into();
        c.database.url = test_database_url().into();
        c.database.schema = self.schema.clone();
        c.stream.key = self.stream.clone();
        c.stream.group = self.group.clone();
        c.stream.consumer = format!("consumer-{}", self.name);
        c.stream.block_ms = 200;
        c.stream.claim_interval_ms = 200;
        c.dlq.key = self.dlq.clone();
        c.bullmq.queues = vec![self.queue.clone()];
        c.bullmq.drain_delay_secs = 1;
        c.storage.url = self.storage.display().to_string();
        c.http.listen = format!("127.0.0.1:{}", self.http_port);
        c
    }

    /// The same configuration as environment variables, for the binary.
    pub fn env_vars(&self) -> Vec<(String, String)> {
        let c = self.config();
        vec![
            ("AUDIT_WORKER__REDIS__URL".into(), test_redis_url()),
            ("AUDIT_WORKER__DATABASE__URL".into(), test_database_url()),
            ("AUDIT_WORKER__DATABASE__SCHEMA".into(), c.database.schema),
            ("AUDIT_WORKER__STREAM__KEY".into(), c.stream.key),
            ("AUDIT_WORKER__STREAM__GROUP".into(), c.stream.group),
            ("AUDIT_WORKER__STREAM__CONSUMER".into(), c.stream.consumer),
            ("AUDIT_WORKER__STREAM__BLOCK_MS".into(), "200".into()),
            (
                "AUDIT_WORKER__STREAM__CLAIM_INTERVAL_MS".into(),
                "200".into(),
            ),
            ("AUDIT_WORKER__DLQ__KEY".into(), c.dlq.key),
            (
                "AUDIT_WORKER__BULLMQ__QUEUES".into(),
                format!("[\"{}\"]", self.queue),
            ),
            ("AUDIT_WORKER__BULLMQ__DRAIN_DELAY_SECS".into(), "1".into()),
            ("AUDIT_WORKER__HTTP__LISTEN".into(), c.http.listen),
            ("AUDIT_WORKER__STORAGE__URL".into(), c.storage.url),
            ("AUDIT_WORKER__LOG__FORMAT".into(), "text".into()),
        ]
    }

    pub async fn redis_conn(&self) -> MultiplexedConnection {
        patient_redis(&self.redis).await.unwrap()
    }

    /// XADDs `data` payloads (with an optional name) in pipelined chunks.
    pub async fn add_entries(&self, payloads: &[(Option<&str>, Vec<u8>)]) -> Vec<String> {
        let mut conn = self.redis_conn().await;
        let mut ids = Vec::new();
        for chunk in payloads.chunks(1000) {
            let mut pipe = redis::pipe();
            for (name, data) in chunk {
                let cmd = pipe
                    .cmd("XADD")
                    .arg(&self.stream)
                    .arg("*")
                    .arg("data")
                    .arg(&data[..]);
                if let Some(n) = name {
                    cmd.arg("name").arg(*n);
                }
            }
            let chunk_ids: Vec<String> = pipe.query_async(&mut conn).await.unwrap();
            ids.extend(chunk_ids);
        }
        ids
    }

    /// Adds audit events given as JSON values.
    pub async fn add_events(&self, events: &[Value]) -> Vec<String> {
        let payloads: Vec<_> = events
            .iter()
            .map(|e| (None, e.to_string().into_bytes()))
            .collect();
        self.add_entries(&payloads).await
    }

    /// The first column of every row `sql` returns, in order.
    pub async fn column<T: for<'a> tokio_postgres::types::FromSql<'a>, C: FromIterator<T>>(
        &self,
        sql: &str,
    ) -> C {
        self.pg
            .query(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    pub async fn row_count(&self) -> i64 {
        self.pg
            .query_one("SELECT count(*) FROM audit_log", &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(0)
    }

    /// Rows and distinct idempotency keys: equal when nothing was stored
    /// twice.
    pub async fn count_and_distinct(&self) -> (i64, i64) {
        self.pg
            .query_one(
                "SELECT count(*), count(DISTINCT idempotency_key) FROM audit_log",
                &[],
            )
            .await
            .map(|r| (r.get(0), r.get(1)))
            .expect("audit_log readable")
    }

    pub async fn dlq_len(&self) -> usize {
        let mut conn = self.redis_conn().await;
        redis::cmd("XLEN")
            .arg(&self.dlq)
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    /// Entries in this test's stream (XLEN).
    pub async fn stream_len(&self) -> usize {
        let mut conn = self.redis_conn().await;
        redis::cmd("XLEN")
            .arg(&self.stream)
            .query_async(&mut conn)
            .await
            .unwrap_or(0)
    }

    /// Entries pending in the group (delivered, not acknowledged).
    pub async fn pending_count(&self) -> usize {
        let mut conn = self.redis_conn().await;
        let v: redis::Value = redis::cmd("XPENDING")
            .arg(&self.stream)
            .arg(&self.group)
            .query_async(&mut conn)
            .await
            .unwrap_or(redis::Value::Nil);
        match v {
            redis::Value::Array(items) => match items.first() {
                Some(redis::Value::Int(n)) => *n as usize,
                _ => 0,
            },
            _ => 0,
        }
    }

    /// Reads the whole DLQ: (reason, data, source, fields).
    pub async fn dlq_entries(&self) -> Vec<std::collections::HashMap<String, Vec<u8>>> {
        self.stream_fields(&self.dlq).await
    }

    /// Reads a whole stream: each entry's fields by name.
    pub async fn stream_fields(
        &self,
        key: &str,
    ) -> Vec<std::collections::HashMap<String, Vec<u8>>> {
        let mut conn = self.redis_conn().await;
        let v: redis::Value = redis::cmd("XRANGE")
            .arg(key)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        audit_worker::source::stream::parse_entries(&v)
            .into_iter()
            .map(|e| {
                e.fields
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (String::from_utf8(k).unwrap(), v))
                    .collect()
            })
            .collect()
    }

    /// Creates the consumer group and reads `count` new entries as
    /// `consumer` without acknowledging them: a consumer that crashed (or
    /// vanished) with entries in flight.
    pub async fn read_without_ack(&self, consumer: &str, count: usize) {
        let mut conn = self.redis_conn().await;
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(&self.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await
            .unwrap();
        let _: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.group)
            .arg(consumer)
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(">")
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    /// Makes this test's PostgreSQL refuse (or accept again) every insert
    /// into audit_log, as a database in read-only or recovery mode does
    /// (SQLSTATE 25006), without disturbing other tests. The table must exist
    /// (the worker migrates at start).
    pub async fn refuse_writes(&self, refuse: bool) {
        let sql = if refuse {
            format!(
                "CREATE OR REPLACE FUNCTION \"{s}\".refuse_insert() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN RAISE EXCEPTION 'test: database refuses writes' USING ERRCODE = '25006'; END $$;
                 DROP TRIGGER IF EXISTS refuse_insert ON \"{s}\".audit_log;
                 CREATE TRIGGER refuse_insert BEFORE INSERT ON \"{s}\".audit_log
                 FOR EACH ROW EXECUTE FUNCTION \"{s}\".refuse_insert();",
                s = self.schema
            )
        } else {
            format!(
                "DROP TRIGGER IF EXISTS refuse_insert ON \"{}\".audit_log",
                self.schema
            )
        };
        self.toggle_ddl(&sql).await;
    }

    /// Makes this test's PostgreSQL refuse (or accept again) every insert,
    /// update and delete on the job tables (`export_jobs`, `snapshot_jobs`)
    /// with SQLSTATE 25006, as a read-only database does. Together with
    /// [`TestEnv::refuse_writes`] the whole database refuses writes: job
    /// requests cannot be recorded either. The tables must exist.
    pub async fn refuse_job_writes(&self, refuse: bool) {
        let mut sql = String::new();
        for table in ["export_jobs", "snapshot_jobs"] {
            if refuse {
                sql.push_str(&format!(
                    "CREATE OR REPLACE FUNCTION \"{s}\".refuse_job_write() RETURNS trigger LANGUAGE plpgsql AS $$
                     BEGIN RAISE EXCEPTION 'test: database refuses writes' USING ERRCODE = '25006'; END $$;
                     DROP TRIGGER IF EXISTS refuse_job_write ON \"{s}\".{table};
                     CREATE TRIGGER refuse_job_write BEFORE INSERT OR UPDATE OR DELETE ON \"{s}\".{table}
                     FOR EACH ROW EXECUTE FUNCTION \"{s}\".refuse_job_write();",
                    s = self.schema
                ));
            } else {
                sql.push_str(&format!(
                    "DROP TRIGGER IF EXISTS refuse_job_write ON \"{}\".{table};",
                    self.schema
                ));
            }
        }
        self.toggle_ddl(&sql).await;
    }

    /// Runs fault-toggling DDL. DDL on audit_log can meet the worker's own
    /// catalog updates (a partition being attached by the background upkeep
    /// right after start): PostgreSQL then reports "tuple concurrently
    /// updated", or a deadlock (dropping a trigger locks it before the
    /// table; attaching a partition reads it after locking the table) and
    /// cancels one side. Trying again is the remedy (the worker retries its
    /// side).
    async fn toggle_ddl(&self, sql: &str) {
        for attempt in 1.. {
            match self.pg.batch_execute(sql).await {
                Ok(()) => break,
                Err(e)
                    if attempt < 30
                        && e.as_db_error().is_some_and(|d| {
                            d.message().contains("concurrently updated")
                                || d.code()
                                    == &tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED
                        }) =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!(
                    "toggle refused writes: {}",
                    e.as_db_error()
                        .map_or(e.to_string(), |d| d.message().to_owned())
                ),
            }
        }
    }

    /// Waits until the worker has created audit_log in this test's schema
    /// and finished starting: `/readyz` answers 200 only after every
    /// migration is done, so tests' own DDL does not race the migrations.
    /// (Partitions are made in the background; their DDL takes no lock that
    /// blocks reads or inserts.)
    pub async fn wait_for_schema(&self) {
        wait_until(Duration::from_secs(30), "audit_log migrated", || async {
            self.pg
                .query_one("SELECT to_regclass('audit_log') IS NOT NULL", &[])
                .await
                .map(|r| r.get::<_, bool>(0))
                .unwrap_or(false)
        })
        .await;
        let readyz = format!("http://127.0.0.1:{}/readyz", self.http_port);
        wait_until(Duration::from_secs(30), "the worker started", || async {
            reqwest::get(&readyz)
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
    }

    /// Drops the schema and the Redis keys.
    pub async fn cleanup(self) {
        let _ = self
            .pg
            .batch_execute(&format!("DROP SCHEMA \"{}\" CASCADE", self.schema))
            .await;
        let mut conn = self.redis_conn().await;
        let _: redis::RedisResult<()> = redis::cmd("DEL")
            .arg(&self.stream)
            .arg(&self.dlq)
            .query_async(&mut conn)
            .await;
        let _ = std::fs::remove_dir_all(&self.storage);
    }
}

async fn ensure_test_database() {
    let url = test_database_url();
    if tokio_postgres::connect(&url, NoTls).await.is_ok() {
        return;
    }
    let (db, admin_url) = match url.rsplit_once('/') {
        Some((base, db)) => (db.to_string(), format!("{base}/postgres")),
        None => return,
    };
    if let Ok((c, conn)) = tokio_postgres::connect(&admin_url, NoTls).await {
        tokio::spawn(conn);
        let _ = c.batch_execute(&format!("CREATE DATABASE \"{db}\"")).await;
    }
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A worker running in this process.
pub struct InProcessWorker {
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcessWorker {
    pub fn start(config: Config) -> Self {
        if std::env::var_os("TEST_LOG").is_some() {
            audit_worker::telemetry::init_logging(&config.log);
        }
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(audit_worker::app::run(config, shutdown.clone()));
        Self { shutdown, task }
    }

    /// Graceful stop; returns the worker's result.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task
            .await
            .expect("worker task")
            .expect("worker ran cleanly");
    }
}

/// An ISO timestamp a little in the past, as producers send.
pub fn ts(offset_secs: i64) -> String {
    (Utc::now() - chrono::Duration::seconds(offset_secs))
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A valid event with distinctive fields.
pub fn event(i: usize) -> Value {
    let status = ["attempt", "success", "failure"][i % 3];
    json!({
        "eventId": format!("evt-{i}"),
        "timestamp": ts((i % 3600) as i64),
        "action": format!("record.read.{}", i % 7),
        "status": status,
        "principalId": format!("user-{}", i % 100),
        "organizationId": format!("org-{}", i % 5),
        "targetResourceType": "Patient",
        "targetResourceId": format!("p-{i}"),
        "outcomeDescription": format!("Zoë read \"chart\" {i}\n\t— 日本語 \u{1}"),
        "dataClassification": "PHI",
        "sessionContext": {"sessionId": format!("s-{i}"), "ipAddress": "10.0.0.1", "userAgent": "test"},
        "customField": {"nested": {"value": i}},
    })
}

/// Runs the worker binary for `env` with extra settings.
pub fn spawn_worker_with(env: &TestEnv, extra: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_audit-worker"));
    cmd.arg("run");
    for (k, v) in env.env_vars() {
        cmd.env(k, v);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::null())
        .stderr(if std::env::var_os("TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        });
    cmd.spawn().expect("worker binary starts")
}

/// SIGTERM, then wait: a graceful stop.
pub fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
}

/// Status and JSON body of a GET on the worker's HTTP port (None while it
/// does not answer).
pub async fn http_status(port: u16, path: &str) -> Option<(u16, serde_json::Value)> {
    let resp = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
        .await
        .ok()?;
    let code = resp.status().as_u16();
    Some((code, resp.json().await.ok()?))
}

/// A connection for the tests' own Redis commands (adding events, reading
/// streams). It waits up to 30 s for a reply: the client's default of
/// 500 ms fails a pipeline of large entries on a loaded machine, which is
/// not what a test checks (the worker's own connections wait
/// `redis.response_timeout_secs`).
pub async fn patient_redis(client: &redis::Client) -> redis::RedisResult<MultiplexedConnection> {
    client
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new()
                .set_response_timeout(Some(Duration::from_secs(30))),
        )
        .await
}

/// A new connection to `config`'s database (its schema on the search path).
pub async fn pg_client(config: &Config) -> tokio_postgres::Client {
    let (client, conn) = audit_worker::db::pg_config(config)
        .unwrap()
        .connect(NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// Verifies `scope` of `config`'s log twice, on one connection in pages of
/// 5000 and on three connections in chunks of 7 leaves (every other chunk
/// on the second, the unsealed-rows check on the third, beside the leaves),
/// checks that both find exactly the same, and returns it.
pub async fn verify_both_ways(
    config: &Config,
    origin: &str,
    scope: audit_worker::jobs::verify::Scope,
) -> audit_worker::jobs::verify::VerifyReport {
    use audit_worker::jobs::verify::verify_scope;
    let verifier = audit_worker::jobs::snapshot::load_verifier(&config.snapshot).unwrap();
    let mut client = pg_client(config).await;
    let one = verify_scope(&mut client, &verifier, origin, scope, 5000, &mut [])
        .await
        .unwrap();
    let mut helpers = [pg_client(config).await, pg_client(config).await];
    let two = verify_scope(&mut client, &verifier, origin, scope, 7, &mut helpers)
        .await
        .unwrap();
    assert_eq!(
        serde_json::to_value(&one).unwrap(),
        serde_json::to_value(&two).unwrap(),
        "verify on three connections found something else than on one"
    );
    one
}
