//! BullMQ compatibility, proven against Node's own `bullmq` (tests/bullmq,
//! installed by scripts/test.sh): the worker binary runs as a separate
//! process, Node adds jobs and reports what BullMQ tells it, and these tests
//! assert on that report, on the rows in PostgreSQL and on the DLQ.
//! Every test uses its own queue (`TestEnv::queue`), schema and DLQ.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{ChildStdout, Command};

use crate::common::*;

fn node_project() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/bullmq")
}

/// `node <script>` in the Node project, with this test's Redis and queue.
fn node(env: &TestEnv, script: &str, vars: &[(&str, String)]) -> Command {
    let project = node_project();
    assert!(
        project.join("node_modules/bullmq/package.json").exists(),
        "{}/node_modules is missing: run `npm ci` there (scripts/test.sh does)",
        project.display()
    );
    let mut cmd = Command::new("node");
    cmd.arg(script)
        .current_dir(project)
        .env("REDIS_URL", test_redis_url())
        .env("QUEUE", &env.queue)
        .env("TIMEOUT_MS", "120000")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd
}

/// Runs a Node script to its end and returns its last JSON line.
pub(crate) async fn node_json(env: &TestEnv, script: &str, vars: &[(&str, String)]) -> Value {
    let out = node(env, script, vars)
        .output()
        .await
        .expect("node runs (install Node.js 20)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{script} failed: {stdout}");
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{script} printed {line:?}: {e}"))
}

/// Reads the next JSON line a running Node script prints.
async fn next_json(lines: &mut Lines<BufReader<ChildStdout>>, what: &str) -> Value {
    let line = tokio::time::timeout(Duration::from_secs(180), lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("no output from node while waiting for {what}"))
        .expect("reading node output")
        .unwrap_or_else(|| panic!("node exited while waiting for {what}"));
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("node printed {line:?}: {e}"))
}

/// The worker binary as a child process; killed if a failed assertion
/// drops it, so no worker outlives its test.
pub(crate) struct WorkerProcess(pub(crate) Option<std::process::Child>);

impl WorkerProcess {
    pub(crate) fn child(&mut self) -> &mut std::process::Child {
        self.0.as_mut().expect("worker still owned")
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The worker binary, configured for this test, as a separate process.
fn spawn_worker(env: &TestEnv, extra: &[(&str, &str)]) -> WorkerProcess {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_audit-worker"));
    cmd.arg("run");
    for (k, v) in env.env_vars() {
        cmd.env(k, v);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    if std::env::var_os("TEST_LOG").is_some() {
        cmd.stderr(Stdio::inherit());
    } else {
        cmd.stderr(Stdio::null());
    }
    WorkerProcess(Some(
        cmd.stdout(Stdio::null())
            .spawn()
            .expect("worker binary starts"),
    ))
}

async fn wait_ready(env: &TestEnv) {
    let url = format!("http://127.0.0.1:{}/readyz", env.http_port);
    wait_until(Duration::from_secs(60), "worker ready", || async {
        reqwest::get(&url)
            .await
            .map(|r| r.status() == 200)
            .unwrap_or(false)
    })
    .await;
    env.wait_for_schema().await;
}

/// SIGTERM, and the exit status must be success.
pub(crate) fn stop(mut worker: WorkerProcess) {
    let mut child = worker.0.take().expect("worker still owned");
    let status = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(exit.success(), "worker exit status {exit:?}");
}

async fn metrics(env: &TestEnv) -> String {
    reqwest::get(format!("http://127.0.0.1:{}/metrics", env.http_port))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn count(env: &TestEnv, sql: &str) -> i64 {
    env.pg.query_one(sql, &[]).await.unwrap().get(0)
}

/// Deletes the test queue's BullMQ keys, then the rest of the test's world.
pub(crate) async fn cleanup(env: TestEnv) {
    delete_queue_keys(&env).await;
    env.cleanup().await;
}

/// Deletes the test queue's BullMQ keys (`bull:<queue>:*`).
pub(crate) async fn delete_queue_keys(env: &TestEnv) {
    let mut conn = env.redis_conn().await;
    let pattern = format!("bull:{}:*", env.queue);
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
}

fn field(letter: &std::collections::HashMap<String, Vec<u8>>, name: &str) -> String {
    String::from_utf8_lossy(letter.get(name).map(Vec::as_slice).unwrap_or_default()).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bullmq_5000_jobs_added_with_add_bulk_complete_with_json_return_values_and_5000_rows() {
    let env = TestEnv::new("bq_bulk").await;
    let worker = spawn_worker(&env, &[]);
    wait_ready(&env).await;

    let r = node_json(&env, "bulk.mjs", &[("COUNT", "5000".into())]).await;
    assert_eq!(r["timedOut"], false, "{r}");
    assert_eq!(r["added"], 5000, "{r}");
    assert_eq!(
        r["completedOfOurs"], 5000,
        "QueueEvents saw every job completed: {r}"
    );
    assert_eq!(r["failed"], 0, "{r}");
    assert_eq!(
        r["parsed"], 5000,
        "every return value is the documented JSON: {r}"
    );
    assert_eq!(r["stored"]["inserted"], 5000, "{r}");
    assert_eq!(r["distinctKeys"], 5000, "{r}");

    assert_eq!(env.row_count().await, 5000);
    // Events without an eventId are keyed by the job identity.
    let by_job = count(
        &env,
        &format!(
            "SELECT count(*) FROM audit_log WHERE idempotency_key = source AND source LIKE 'bullmq:{}:%'",
            env.queue
        ),
    )
    .await;
    assert_eq!(by_job, 1667);
    assert_eq!(env.dlq_len().await, 0);
    let m = metrics(&env).await;
    assert!(
        m.contains("audit_worker_events_total{outcome=\"inserted\",source=\"bullmq\"} 5000"),
        "{m}"
    );
    // End-to-end latency, from each job's timestamp to its commit.
    assert!(
        m.contains("audit_worker_end_to_end_latency_seconds_count{source=\"bullmq\"} 5000"),
        "{m}"
    );
    stop(worker);
    cleanup(env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bullmq_wrong_hash_fails_after_one_attempt_despite_attempts_5_and_is_dead_lettered() {
    let env = TestEnv::new("bq_badhash").await;
    let worker = spawn_worker(&env, &[]);
    wait_ready(&env).await;

    let r = node_json(&env, "outcomes.mjs", &[("SCENARIO", "wrong-hash".into())]).await;
    assert_eq!(r["timedOut"], false, "{r}");
    let jobs = r["jobs"].as_array().unwrap();
    let bad = jobs.iter().find(|j| j["label"] == "wrong-hash").unwrap();
    assert_eq!(bad["event"], "failed", "{bad}");
    assert_eq!(bad["state"], "failed", "{bad}");
    assert_eq!(bad["attemptsMade"], 1, "no retry was spent: {bad}");
    assert_eq!(bad["attemptsStarted"], 1, "{bad}");
    let reason = bad["failedReason"].as_str().unwrap();
    assert!(
        reason.starts_with("hash_mismatch: hash ") && reason.contains("does not match"),
        "readable reason: {reason}"
    );
    let good = jobs.iter().find(|j| j["label"] == "control").unwrap();
    assert_eq!(good["state"], "completed", "{good}");
    assert_eq!(good["returnvalue"]["stored"], "inserted", "{good}");

    for (label, code) in [
        ("unknown-kind", "unknown_kind: "),
        ("not-an-object", "invalid_json: "),
    ] {
        let job = jobs.iter().find(|j| j["label"] == label).unwrap();
        assert_eq!(job["state"], "failed", "{job}");
        assert_eq!(job["attemptsMade"], 1, "{job}");
        let reason = job["failedReason"].as_str().unwrap();
        assert!(reason.starts_with(code), "{label}: {reason}");
    }

    assert_eq!(env.row_count().await, 1);
    let letters = env.dlq_entries().await;
    assert_eq!(letters.len(), 3, "one dead letter per rejected job");
    let letter = letters
        .iter()
        .find(|l| field(l, "reason") == "hash_mismatch")
        .expect("the wrong hash is dead-lettered");
    assert_eq!(field(letter, "reason"), "hash_mismatch");
    assert_eq!(
        field(letter, "source"),
        format!("bullmq:{}:{}", env.queue, bad["id"].as_str().unwrap())
    );
    assert_eq!(field(letter, "name"), "audit.event");
    assert_eq!(field(letter, "attempts"), "1");
    let data: Value = serde_json::from_slice(&letter["data"]).expect("the data is the event JSON");
    assert_eq!(data["action"], "record.read.1");
    assert!(field(letter, "error").contains("does not match"));
    let snapshot = letters
        .iter()
        .find(|l| field(l, "reason") == "unknown_kind")
        .unwrap();
    assert_eq!(field(snapshot, "name"), "audit.snapshot");
    assert_eq!(&snapshot["data"][..], br#"{"upTo":"now"}"#);
    stop(worker);
    cleanup(env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bullmq_database_refusing_writes_retries_with_the_jobs_backoff_and_completes_after_recovery(
) {
    let env = TestEnv::new("bq_refuse").await;
    let worker = spawn_worker(
        &env,
        &[
            // Report the database unavailable at once: BullMQ does the retrying.
            ("AUDIT_WORKER__SINK__RETRY_MAX_ATTEMPTS", "1"),
            ("AUDIT_WORKER__BULLMQ__OUTAGE_RETRY_DELAY_MS", "1000"),
            // This test is about BullMQ's backoff, not the circuit breaker.
            ("AUDIT_WORKER__SINK__BREAKER_FAILURE_THRESHOLD", "1000"),
        ],
    );
    wait_ready(&env).await;
    env.refuse_writes(true).await;

    let mut script = node(
        &env,
        "retry.mjs",
        &[("COUNT", "10".into()), ("PLAIN", "3".into())],
    )
    .spawn()
    .expect("node runs");
    let mut lines = BufReader::new(script.stdout.take().unwrap()).lines();
    let retried = next_json(&mut lines, "two failed attempts per job").await;
    assert_eq!(retried["phase"], "retried");
    assert_eq!(retried["timedOut"], false, "{retried}");
    assert_eq!(env.row_count().await, 0);
    env.refuse_writes(false).await;
    let done = next_json(&mut lines, "every job completed").await;
    assert!(script.wait().await.unwrap().success());
    assert_eq!(done["timedOut"], false, "{done}");

    for job in done["jobs"].as_array().unwrap() {
        assert_eq!(job["state"], "completed", "{job}");
        assert_eq!(job["event"], "completed", "{job}");
        assert_eq!(job["returnvalue"]["stored"], "inserted", "{job}");
        let delays: Vec<i64> = job["delays"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_i64().unwrap())
            .collect();
        if job["kind"] == "retrying" {
            // Two failed attempts, then success: BullMQ counts three.
            assert_eq!(job["attemptsMade"], 3, "{job}");
            // BullMQ's exponential backoff: 200 ms, then 400 ms (read from
            // the due times BullMQ recorded, not measured here).
            assert!(delays.len() >= 2, "{job}");
            assert!((150..=260).contains(&delays[0]), "first backoff: {job}");
            assert!((350..=460).contains(&delays[1]), "second backoff: {job}");
            // A last attempt that still met the outage is delayed, not failed.
            assert!(delays[2..].iter().all(|d| *d >= 900), "{job}");
        } else {
            // No attempts option: its only attempt is never failed for an
            // outage; it was delayed (not spent) until the database was back.
            assert_eq!(job["attemptsMade"], 1, "{job}");
            assert!(!delays.is_empty(), "{job}");
            assert!(delays.iter().all(|d| *d >= 900), "{job}");
        }
    }
    assert_eq!(env.row_count().await, 13);
    assert_eq!(env.dlq_len().await, 0, "an outage is not the events' fault");
    stop(worker);
    cleanup(env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bullmq_events_built_like_smart_logs_are_accepted_and_altered_ones_rejected() {
    let env = TestEnv::new("bq_smartlogs").await;
    let secret = "smart-logs-test-secret";
    let keys = format!("smartlogs={secret}");
    let worker = spawn_worker(
        &env,
        &[
            ("AUDIT_WORKER__INTEGRITY__HMAC_KEYS", &keys),
            ("AUDIT_WORKER__VALIDATION__REQUIRE_SIGNATURE", "true"),
        ],
    );
    wait_ready(&env).await;

    let r = node_json(
        &env,
        "outcomes.mjs",
        &[
            ("SCENARIO", "smart-logs".into()),
            ("HMAC_SECRET", secret.into()),
            ("COUNT", "20".into()),
        ],
    )
    .await;
    assert_eq!(r["timedOut"], false, "{r}");
    assert_eq!(
        r["vectorsChecked"], 3,
        "the Node side reproduces the vectors"
    );
    let mut accepted = 0;
    let mut rejected = 0;
    for job in r["jobs"].as_array().unwrap() {
        let label = job["label"].as_str().unwrap();
        let expected = match label {
            "genuine" | "genuine-other-field" => None,
            "altered-action" | "altered-outcome" | "altered-principal" | "altered-timestamp" => {
                Some("hash_mismatch: ")
            }
            "rehashed-unsigned" | "altered-signature" => Some("signature_mismatch: "),
            other => panic!("unexpected label {other}"),
        };
        match expected {
            None => {
                accepted += 1;
                assert_eq!(job["state"], "completed", "{job}");
                assert_eq!(job["returnvalue"]["stored"], "inserted", "{job}");
            }
            Some(prefix) => {
                rejected += 1;
                assert_eq!(job["state"], "failed", "{job}");
                assert_eq!(job["attemptsMade"], 1, "{job}");
                let reason = job["failedReason"].as_str().unwrap();
                assert!(reason.starts_with(prefix), "{label}: {reason}");
            }
        }
    }
    assert_eq!((accepted, rejected), (21, 6));
    assert_eq!(env.row_count().await, 21);
    let verified = count(
        &env,
        "SELECT count(*) FROM audit_log WHERE hash_provided AND signature_key_id = 'smartlogs'",
    )
    .await;
    assert_eq!(
        verified, 21,
        "every stored event's hash and signature verified"
    );
    let mut reasons: Vec<String> = env
        .dlq_entries()
        .await
        .iter()
        .map(|l| field(l, "reason"))
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            "hash_mismatch",
            "hash_mismatch",
            "hash_mismatch",
            "hash_mismatch",
            "signature_mismatch",
            "signature_mismatch"
        ]
    );
    stop(worker);
    cleanup(env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bullmq_worker_killed_with_jobs_in_flight_completes_every_job_once_after_restart() {
    let env = TestEnv::new("bq_sigkill").await;
    let total = 5000;
    let added = node_json(
        &env,
        "add.mjs",
        &[("COUNT", total.to_string()), ("ANON_EVERY", "2".into())],
    )
    .await;
    assert_eq!(added["added"], total);
    let fast_recovery = [
        ("AUDIT_WORKER__BULLMQ__LOCK_DURATION_MS", "2000"),
        ("AUDIT_WORKER__BULLMQ__STALLED_INTERVAL_MS", "1000"),
        ("AUDIT_WORKER__SINK__BATCH_SIZE", "200"),
        ("AUDIT_WORKER__SINK__MAX_WAIT_MS", "200"),
    ];
    let mut first = spawn_worker(&env, &fast_recovery);
    wait_until(Duration::from_secs(60), "some rows", || async {
        env.row_count().await > 0
    })
    .await;
    first.child().kill().expect("SIGKILL");
    first.child().wait().unwrap();
    let at_kill = env.row_count().await;
    assert!(at_kill < total, "killed before the end ({at_kill} rows)");

    let second = spawn_worker(&env, &fast_recovery);
    let r = node_json(&env, "await.mjs", &[("COUNT", total.to_string())]).await;
    assert_eq!(r["timedOut"], false, "{r}");
    assert_eq!(r["counts"]["completed"], total, "{r}");
    assert_eq!(r["counts"]["failed"], 0, "{r}");
    assert_eq!(r["jobs"], total, "{r}");
    let stored = r["byAuditWorker"]["inserted"].as_i64().unwrap()
        + r["byAuditWorker"]["duplicate"].as_i64().unwrap();
    assert_eq!(
        stored, total,
        "every job completed with our return value: {r}"
    );
    assert!(
        r["startedMoreThanOnce"].as_i64().unwrap() > 0,
        "jobs in flight at the kill were recovered and run again: {r}"
    );
    let row: (i64, i64) = env.count_and_distinct().await;
    assert_eq!(row, (total, total), "each event stored exactly once");
    assert_eq!(env.dlq_len().await, 0);
    stop(second);
    cleanup(env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bullmq_node_worker_and_audit_worker_on_one_queue_neither_repeat_nor_lose_a_job() {
    let env = TestEnv::new("bq_shared").await;
    let mut node_worker = node(
        &env,
        "node_worker.mjs",
        &[("MODE", "record".into()), ("CONCURRENCY", "50".into())],
    )
    .spawn()
    .expect("node runs");
    let mut node_lines = BufReader::new(node_worker.stdout.take().unwrap()).lines();
    assert_eq!(
        next_json(&mut node_lines, "node worker ready").await["phase"],
        "ready"
    );
    let worker = spawn_worker(&env, &[]);
    wait_ready(&env).await;

    let total = 3000;
    node_json(
        &env,
        "add.mjs",
        &[("COUNT", total.to_string()), ("ANON_EVERY", "3".into())],
    )
    .await;
    let r = node_json(&env, "await.mjs", &[("COUNT", total.to_string())]).await;
    let status = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(node_worker.id().unwrap().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let stopped = next_json(&mut node_lines, "node worker stopped").await;
    node_worker.wait().await.unwrap();

    assert_eq!(r["timedOut"], false, "{r}");
    assert_eq!(r["counts"]["completed"], total, "nothing lost: {r}");
    assert_eq!(r["counts"]["failed"], 0, "{r}");
    assert_eq!(r["startedMoreThanOnce"], 0, "no job fetched twice: {r}");
    assert_eq!(r["attemptsMadeNotOne"], 0, "{r}");
    assert_eq!(r["byAuditWorker"]["duplicate"], 0, "{r}");
    let by_node = r["byNode"].as_i64().unwrap();
    let by_us = r["byAuditWorker"]["inserted"].as_i64().unwrap();
    assert_eq!(by_node + by_us, total, "{r}");
    assert!(by_node > 0 && by_us > 0, "both workers took jobs: {r}");
    assert_eq!(stopped["processedTwice"], 0, "{stopped}");
    assert_eq!(
        stopped["processed"].as_array().unwrap().len() as i64,
        by_node
    );
    assert_eq!(
        env.row_count().await,
        by_us,
        "our jobs, and only ours, stored"
    );
    let node_sources: Vec<String> = r["nodeIds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| format!("bullmq:{}:{}", env.queue, id.as_str().unwrap()))
        .collect();
    let overlap = env
        .pg
        .query_one(
            "SELECT count(*) FROM audit_log WHERE source = ANY($1)",
            &[&node_sources],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(overlap, 0, "no job processed by both");
    stop(worker);
    cleanup(env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bullmq_job_data_that_is_not_json_is_dead_lettered_with_its_original_bytes() {
    let env = TestEnv::new("bq_rawdata").await;
    // A producer that bypassed JSON.stringify: Node adds the job, then its
    // stored data is overwritten (the worker is not running yet).
    let added = node_json(&env, "add.mjs", &[("COUNT", "2".into())]).await;
    let first = added["first"].as_str().unwrap().to_owned();
    let raw: &[u8] = b"{not json \xff";
    let mut conn = env.redis_conn().await;
    let _: () = redis::cmd("HSET")
        .arg(format!("bull:{}:{first}", env.queue))
        .arg("data")
        .arg(raw)
        .query_async(&mut conn)
        .await
        .unwrap();
    let worker = spawn_worker(&env, &[]);
    wait_ready(&env).await;
    wait_until(
        Duration::from_secs(60),
        "one row and one dead letter",
        || async { env.row_count().await == 1 && env.dlq_len().await == 1 },
    )
    .await;
    let letters = env.dlq_entries().await;
    assert_eq!(field(&letters[0], "reason"), "invalid_json");
    assert_eq!(
        &letters[0]["data"][..],
        raw,
        "the original bytes, untouched"
    );
    assert_eq!(
        field(&letters[0], "source"),
        format!("bullmq:{}:{first}", env.queue)
    );
    stop(worker);
    cleanup(env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bullmq_raw_data_reads_of_300_jobs_share_script_calls_and_each_job_gets_its_own_answer() {
    use audit_worker::source::bullmq::data_reader::JobDataReader;
    use audit_worker::source::bullmq::job_data::JobData;
    let env = TestEnv::new("bq_datareader").await;
    let limit = 100usize;
    let key = |i: usize| format!("bull:{}:{i}", env.queue);
    // Job i's stored data: none for every 10th (the job was removed), over
    // the limit for every 7th, otherwise bytes only job i has (not UTF-8).
    let stored = |i: usize| -> Option<Vec<u8>> {
        if i % 10 == 0 {
            return None;
        }
        let mut data = format!("{{\"job\":{i}}}").into_bytes();
        data.push(0xff);
        if i % 7 == 0 {
            data.resize(limit + 1 + i, b' ');
        }
        Some(data)
    };
    let jobs = 300;
    let mut conn = env.redis_conn().await;
    let mut pipe = redis::pipe();
    for i in 0..jobs {
        if let Some(data) = stored(i) {
            pipe.hset(key(i), "data", data).ignore();
        }
    }
    let _: () = pipe.query_async(&mut conn).await.unwrap();

    let client = redis::Client::open(test_redis_url()).unwrap();
    let manager = redis::aio::ConnectionManager::new(client).await.unwrap();
    let errors = prometheus::IntCounter::new("errors", "errors").unwrap();
    let reader = JobDataReader::start(
        audit_worker::source::RedisConn::Single(manager),
        env.dlq.clone(),
        move || limit,
        errors.clone(),
    );
    let source = |i: usize| format!("bullmq:{}:{i}", env.queue);
    let reads = (0..jobs).map(|i| {
        let (key, source) = (key(i), source(i));
        let reader = &reader;
        async move {
            reader
                .read(key, "audit.event", &source, 1 + i as u64 % 3)
                .await
        }
    });
    let answers = futures::future::join_all(reads).await;

    let mut too_large = Vec::new();
    for (i, answer) in answers.into_iter().enumerate() {
        let answer = answer.unwrap_or_else(|e| panic!("job {i}: {e}"));
        match stored(i) {
            None => assert_eq!(answer, JobData::Bytes(b"null".to_vec()), "job {i}"),
            Some(data) if data.len() > limit => {
                assert_eq!(
                    answer,
                    JobData::DeadLettered {
                        bytes: data.len() as u64
                    },
                    "job {i}"
                );
                too_large.push(i);
            }
            Some(data) => assert_eq!(answer, JobData::Bytes(data), "job {i}"),
        }
    }
    // 300 reads issued at once went out in a few calls (at most 256 jobs
    // each), not one call per job.
    let calls = reader.calls();
    assert!(
        (2..=10).contains(&calls),
        "{calls} script calls for {jobs} reads"
    );
    assert_eq!(errors.get(), 0);
    // Each oversized job's dead letter holds its own bytes, source and attempt.
    let letters = env.dlq_entries().await;
    assert_eq!(letters.len(), too_large.len());
    for i in too_large {
        let letter = letters
            .iter()
            .find(|l| field(l, "source") == source(i))
            .unwrap_or_else(|| panic!("no dead letter for job {i}"));
        assert_eq!(letter["data"], stored(i).unwrap(), "job {i}");
        assert_eq!(field(letter, "reason"), "too_large");
        assert_eq!(field(letter, "attempts"), (1 + i % 3).to_string());
        assert_eq!(field(letter, "name"), "audit.event");
    }
    let _: () = redis::cmd("DEL")
        .arg((0..jobs).map(key).collect::<Vec<_>>())
        .query_async(&mut conn)
        .await
        .unwrap();
    cleanup(env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bullmq_worker_stops_fetching_while_the_circuit_breaker_is_open() {
    let env = TestEnv::new("bq_breaker").await;
    let worker = spawn_worker(
        &env,
        &[
            ("AUDIT_WORKER__SINK__RETRY_MAX_ATTEMPTS", "1"),
            ("AUDIT_WORKER__SINK__BREAKER_FAILURE_THRESHOLD", "1"),
            // Long enough that the check below happens while it is open.
            ("AUDIT_WORKER__SINK__BREAKER_RECOVERY_SECS", "15"),
            ("AUDIT_WORKER__BULLMQ__OUTAGE_RETRY_DELAY_MS", "500"),
        ],
    );
    wait_ready(&env).await;
    env.refuse_writes(true).await;
    // One job's failed write opens the breaker.
    node_json(
        &env,
        "add.mjs",
        &[("COUNT", "1".into()), ("TAG", "first".into())],
    )
    .await;
    let url = format!("http://127.0.0.1:{}/metrics", env.http_port);
    wait_until(Duration::from_secs(30), "breaker open", || async {
        reqwest::get(&url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .contains("audit_worker_circuit_breaker_state 1")
    })
    .await;
    node_json(
        &env,
        "add.mjs",
        &[("COUNT", "50".into()), ("TAG", "later".into())],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let counts = node_json(&env, "counts.mjs", &[]).await;
    assert!(
        counts["waiting"].as_i64().unwrap() >= 50 && counts["active"] == 0,
        "nothing fetched while the breaker is open: {counts}"
    );
    assert_eq!(counts["failed"], 0, "{counts}");
    env.refuse_writes(false).await;
    let r = node_json(&env, "await.mjs", &[("COUNT", "51".into())]).await;
    assert_eq!(
        r["counts"]["completed"], 51,
        "all stored once it closed: {r}"
    );
    assert_eq!(env.row_count().await, 51);
    assert_eq!(env.dlq_len().await, 0);
    stop(worker);
    cleanup(env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bullmq_hostile_jobs_fail_with_stable_codes_or_complete_with_rows_byte_exact() {
    use crate::hostile::{
        accepted_cases, assert_stored_as_sent, many_keys, raw_event, rejected_cases,
    };
    let env = TestEnv::new("bq_hostile").await;
    // The stream suite's inputs, each one job: bytes that no JSON.stringify
    // makes are written into the job as a producer bypassing it would;
    // the accepted events are added by Node as any producer adds them.
    let rejected = rejected_cases();
    let accepted = accepted_cases();
    let mut cases: Vec<Value> = Vec::new();
    for (what, _, bytes) in &rejected {
        cases.push(serde_json::json!({"label": what, "hex": hex::encode(bytes)}));
    }
    for e in &accepted {
        cases.push(serde_json::json!({"label": e["eventId"], "json": e.to_string()}));
    }
    // Accepted too, as raw bytes: 100,000 keys, an integer beyond 64 bits.
    for (id, extra) in [
        ("ok-many", many_keys(100_000)),
        ("ok-bigint", r#","n":18446744073709551617"#.to_string()),
    ] {
        cases.push(serde_json::json!({"label": id, "hex": hex::encode(raw_event(id, &extra))}));
    }
    // Hostile values as a Node producer makes them: JSON.stringify writes a
    // lone surrogate as an escape, and a NUL as \u0000.
    let node_made = [
        (
            "lone surrogate from JavaScript",
            "invalid_json",
            format!(
                r#"{{"timestamp":"{}","action":"\ud800","status":"success"}}"#,
                ts(1)
            ),
        ),
        (
            "NUL from JavaScript",
            "nul_character",
            format!(
                r#"{{"timestamp":"{}","action":"a\u0000b","status":"success"}}"#,
                ts(1)
            ),
        ),
        (
            "year 9999 from JavaScript",
            "timestamp_out_of_range",
            r#"{"timestamp":"9999-12-31T23:59:59.999Z","action":"a","status":"success"}"#.into(),
        ),
    ];
    for (what, _, json) in &node_made {
        cases.push(serde_json::json!({"label": what, "json": json}));
    }
    // A header-like job name: not a job kind, so an audit event,
    // refused for its data; the name reaches the dead letter unchanged.
    cases.push(serde_json::json!({
        "label": "header-injection name",
        "name": "export.audit\r\nX-Injected: 1",
        "json": r#"{"organizationId":"o"}"#,
    }));
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), serde_json::to_vec(&cases).unwrap()).unwrap();

    let worker = spawn_worker(
        &env,
        &[("AUDIT_WORKER__VALIDATION__MAX_EVENT_BYTES", "4194304")],
    );
    wait_ready(&env).await;
    let r = node_json(
        &env,
        "outcomes.mjs",
        &[
            ("SCENARIO", "hostile".into()),
            ("HOSTILE_FILE", file.path().display().to_string()),
        ],
    )
    .await;
    assert_eq!(r["timedOut"], false, "every job finished");
    let jobs = r["jobs"].as_array().unwrap();
    let job = |label: &str| {
        jobs.iter()
            .find(|j| j["label"] == label)
            .unwrap_or_else(|| panic!("no job {label}"))
    };
    let letters = env.dlq_entries().await;
    let letter_of = |job: &Value| {
        let source = format!("bullmq:{}:{}", env.queue, job["id"].as_str().unwrap());
        letters
            .iter()
            .find(|l| field(l, "source") == source)
            .unwrap_or_else(|| panic!("no dead letter for {}", job["label"]))
    };
    let expected_failures = rejected
        .iter()
        .map(|(what, reason, _)| (*what, *reason))
        .chain(node_made.iter().map(|(what, reason, _)| (*what, *reason)))
        .chain([("header-injection name", "invalid_event")]);
    let mut failed = 0;
    for (what, reason) in expected_failures {
        let j = job(what);
        assert_eq!(j["state"], "failed", "{what}: {j}");
        assert_eq!(j["attemptsMade"], 1, "{what}: no retry spent");
        let failed_reason = j["failedReason"].as_str().unwrap();
        assert!(
            failed_reason.starts_with(&format!("{reason}: ")),
            "{what}: Node reads {failed_reason:?}, expected {reason}"
        );
        assert!(
            failed_reason.len() < 2_000,
            "{what}: the reason stays short"
        );
        let letter = letter_of(j);
        assert_eq!(field(letter, "reason"), reason, "{what}");
        assert_eq!(
            hex::encode(&letter["data"]),
            j["storedHex"].as_str().unwrap(),
            "{what}: the job's stored bytes, untouched"
        );
        failed += 1;
    }
    assert_eq!(
        field(letter_of(job("header-injection name")), "name"),
        "export.audit\r\nX-Injected: 1"
    );
    // The raw cases really were the bytes of the stream suite.
    for (what, _, bytes) in &rejected {
        assert_eq!(job(what)["storedHex"], hex::encode(bytes), "{what}");
    }
    assert_eq!(letters.len(), failed, "one dead letter per failed job");
    for label in accepted
        .iter()
        .map(|e| e["eventId"].as_str().unwrap())
        .chain(["ok-many", "ok-bigint"])
    {
        let j = job(label);
        assert_eq!(j["state"], "completed", "{j}");
        assert_eq!(j["returnvalue"]["stored"], "inserted", "{j}");
    }
    assert_stored_as_sent(&env, &accepted).await;
    assert_eq!(env.row_count().await, accepted.len() as i64 + 2);
    // Still up, still storing.
    let health = reqwest::get(format!("http://127.0.0.1:{}/healthz", env.http_port))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    stop(worker);
    cleanup(env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bullmq_flood_of_10_mb_jobs_is_dead_lettered_as_too_large_and_the_worker_stays_up() {
    use crate::hostile::{memory_kib, DeadLetterWalk};
    let env = TestEnv::new("bq_flood").await;
    let half: usize = std::env::var("BULLMQ_FLOOD_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
        / 2;
    let add = |count: usize, blob: bool, tag: &str| {
        let mut vars = vec![("COUNT", count.to_string()), ("TAG", tag.to_string())];
        if blob {
            vars.push(("BLOB_BYTES", (10usize << 20).to_string()));
        }
        vars
    };
    // Half the flood (and two valid events) waits before the worker starts,
    // half arrives while it runs.
    node_json(&env, "add.mjs", &add(half, true, "big1")).await;
    node_json(&env, "add.mjs", &add(2, false, "ok1")).await;
    let mut worker = spawn_worker(&env, &[]);
    wait_ready(&env).await;
    let pid = worker.child().id();
    let idle = memory_kib(pid);
    node_json(&env, "add.mjs", &add(half, true, "big2")).await;
    node_json(&env, "add.mjs", &add(2, false, "ok2")).await;
    let total = 2 * half + 4;
    let seen = node_json(&env, "await.mjs", &[("COUNT", total.to_string())]).await;
    assert_eq!(seen["timedOut"], false, "{seen}");
    assert_eq!(seen["counts"]["failed"], 2 * half, "{seen}");
    assert_eq!(seen["counts"]["completed"], 4, "{seen}");
    for reason in seen["failedReasons"].as_array().unwrap() {
        assert!(
            reason.as_str().unwrap().starts_with("too_large: "),
            "{reason}"
        );
    }
    assert!(
        worker.child().try_wait().unwrap().is_none(),
        "worker still running"
    );
    let (hwm, rss) = memory_kib(pid);
    eprintln!(
        "BullMQ flood of {} x 10 MB jobs: worker RSS idle {} MiB, peak (VmHWM) {} MiB, after {} MiB",
        2 * half,
        idle.1 / 1024,
        hwm / 1024,
        rss / 1024
    );
    assert_eq!(env.row_count().await, 4);
    // Each dead letter holds the job's stored data.
    let mut conn = env.redis_conn().await;
    let mut letters = DeadLetterWalk::new(&env).await;
    let mut checked = 0;
    while let Some(letter) = letters.next().await {
        assert_eq!(letter.field("reason"), Some(&b"too_large"[..]));
        let source = String::from_utf8(letter.field("source").unwrap().to_vec()).unwrap();
        let job_id = source.rsplit(':').next().unwrap();
        let stored: Vec<u8> = redis::cmd("HGET")
            .arg(format!("bull:{}:{job_id}", env.queue))
            .arg("data")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(stored.len() > 10 << 20);
        assert!(
            letter.field("data") == Some(&stored[..]),
            "original bytes kept"
        );
        checked += 1;
    }
    assert_eq!(checked, 2 * half);
    stop(worker);
    cleanup(env).await;
}
