//! The worker as a separate process: crashes, signals, start-up errors.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

fn worker_command(env: &TestEnv, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_audit-worker"));
    cmd.args(args);
    for (k, v) in env.env_vars() {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    cmd
}

fn spawn_worker(env: &TestEnv, extra_env: &[(&str, &str)]) -> Child {
    let mut cmd = worker_command(env, &["run"]);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd.stderr(Stdio::null());
    cmd.spawn().expect("worker binary starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_load_and_restarted_stores_every_event_exactly_once() {
    let env = TestEnv::new("sigkill").await;
    let total = 30_000;
    let events: Vec<Value> = (0..total).map(event).collect();
    env.add_events(&events).await;
    // Half of the events carry no eventId: their key is the stream entry id,
    // which is exactly what redelivery must not duplicate.
    let anonymous: Vec<Value> = (total..total + 5_000)
        .map(|i| {
            let mut e = event(i);
            e.as_object_mut().unwrap().remove("eventId");
            e
        })
        .collect();
    env.add_events(&anonymous).await;
    let expected = (total + 5_000) as i64;
    let small_batches = [
        ("AUDIT_WORKER__SINK__BATCH_SIZE", "200"),
        ("AUDIT_WORKER__STREAM__CLAIM_IDLE_MS", "1000"),
    ];

    for round in 0..3 {
        let mut child = spawn_worker(&env, &small_batches);
        let before = env.row_count().await;
        wait_until(Duration::from_secs(60), "some progress", || async {
            env.row_count().await > before
        })
        .await;
        tokio::time::sleep(Duration::from_millis(150 * (round + 1))).await;
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
        if env.row_count().await == expected {
            break;
        }
    }
    let mut child = spawn_worker(&env, &small_batches);
    wait_until(
        Duration::from_secs(120),
        "every event stored and acknowledged",
        || async { env.row_count().await == expected && env.pending_count().await == 0 },
    )
    .await;
    terminate(&mut child);
    assert!(child.wait().unwrap().success());

    let row: (i64, i64) = env.count_and_distinct().await;
    assert_eq!(
        row,
        (expected, expected),
        "exactly once: no loss, no duplicate"
    );
    assert_eq!(env.dlq_len().await, 0);
    env.cleanup().await;
}

fn terminate(child: &mut Child) {
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_the_open_batch_acknowledges_and_exits_zero() {
    let env = TestEnv::new("sigterm").await;
    // A long batch window: the events sit in the open batch when SIGTERM comes.
    let mut child = spawn_worker(
        &env,
        &[
            ("AUDIT_WORKER__SINK__MAX_WAIT_MS", "30000"),
            ("AUDIT_WORKER__SINK__BATCH_SIZE", "5000"),
        ],
    );
    let base = format!("http://127.0.0.1:{}", env.http_port);
    wait_until(Duration::from_secs(30), "worker ready", || async {
        reqwest::get(format!("{base}/readyz"))
            .await
            .map(|r| r.status() == 200)
            .unwrap_or(false)
    })
    .await;
    env.add_events(&(0..300).map(event).collect::<Vec<_>>())
        .await;
    wait_until(Duration::from_secs(10), "entries read", || async {
        env.pending_count().await == 300
    })
    .await;
    assert_eq!(env.row_count().await, 0, "still in the open batch");
    terminate(&mut child);
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(env.row_count().await, 300);
    assert_eq!(
        env.pending_count().await,
        0,
        "everything committed was acknowledged"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_errors_name_the_setting_and_exit_non_zero() {
    let env = TestEnv::new("config").await;
    let cases: [(&str, &str, &str); 4] = [
        ("AUDIT_WORKER__SINK__BATCH_SIZE", "lots", "batch_size"),
        ("AUDIT_WORKER__SINK__BATCH_SIZE", "0", "sink.batch_size"),
        ("AUDIT_WORKER__HTTP__LISTEN", "nowhere", "http.listen"),
        ("AUDIT_WORKER__STREAM__NO_SUCH_KEY", "1", "no_such_key"),
    ];
    for (key, value, expected) in cases {
        let out = worker_command(&env, &["run"])
            .env(key, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{key}={value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{key}={value}: {stderr}");
    }
    let out = worker_command(&env, &["run", "--config", "/nonexistent/audit.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/audit.toml"));

    // An unreachable database or Redis is an outage, not a configuration
    // error: the worker stays up, not ready, and says why in its log
    // (without the password).
    let unreachable = |key: &'static str, value: &'static str| {
        let mut cmd = worker_command(&env, &["run"]);
        cmd.env(key, value)
            .env("AUDIT_WORKER__DATABASE__CONNECT_TIMEOUT_SECS", "2")
            .env("AUDIT_WORKER__REDIS__CONNECT_TIMEOUT_SECS", "1")
            .env("NO_COLOR", "1");
        cmd.spawn().unwrap()
    };
    for (key, value, expected, hint) in [
        (
            "AUDIT_WORKER__DATABASE__URL",
            "postgres://postgres:hunter2@127.0.0.1:1/x",
            "database unreachable at 127.0.0.1:1",
            "AUDIT_WORKER__DATABASE__URL",
        ),
        (
            "AUDIT_WORKER__REDIS__URL",
            "redis://127.0.0.1:1",
            "redis unreachable at 127.0.0.1:1",
            "AUDIT_WORKER__REDIS__URL",
        ),
    ] {
        let mut child = unreachable(key, value);
        wait_until(Duration::from_secs(20), "/readyz 503", || async {
            http_status(env.http_port, "/readyz").await.map(|r| r.0) == Some(503)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(child.try_wait().unwrap().is_none(), "{key}: still running");
        terminate(&mut child);
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(child.wait().unwrap().success(), "a clean stop: {stderr}");
        assert!(stderr.contains(expected), "{stderr}");
        assert!(stderr.contains(hint), "{stderr}");
        assert!(
            !stderr.contains("hunter2"),
            "the password never reaches the output: {stderr}"
        );
    }

    // A database URL that can never work is a configuration error: exit 2.
    let out = worker_command(&env, &["run"])
        .env(
            "AUDIT_WORKER__DATABASE__URL",
            "postgres://postgres@127.0.0.1:port/x",
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("database.url is not a valid PostgreSQL URL"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = worker_command(&env, &["check-config"])
        .env("AUDIT_WORKER__INTEGRITY__HMAC_KEYS", "k1=very-secret-hmac")
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("very-secret-hmac"));
    env.cleanup().await;
}

/// The binary starts jemalloc with the options `src/main.rs` gives it (one
/// arena, freed pages returned after a second): jemalloc's own statistics,
/// printed on stderr at exit when asked through its environment variable,
/// show the options in force.
#[test]
#[cfg_attr(not(feature = "jemalloc"), ignore = "built without jemalloc")]
fn the_binary_runs_jemalloc_with_one_arena_and_a_one_second_decay() {
    let out = Command::new(env!("CARGO_BIN_EXE_audit-worker"))
        .arg("--version")
        .env("_RJEM_MALLOC_CONF", "stats_print:true")
        .stdout(Stdio::null())
        .output()
        .expect("worker binary runs");
    assert!(out.status.success());
    let stats = String::from_utf8_lossy(&out.stderr);
    // Each line is `opt.NAME: VALUE`, and the decays add ` (arenas...)`.
    for option in [
        "opt.narenas: 1",
        "opt.dirty_decay_ms: 1000",
        "opt.muzzy_decay_ms: 0",
    ] {
        assert!(
            stats.lines().map(str::trim).any(|l| l == option
                || l.strip_prefix(option)
                    .is_some_and(|rest| rest.starts_with(' '))),
            "{option:?} not among jemalloc's options:\n{}",
            stats
                .lines()
                .filter(|l| l.contains("opt."))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
