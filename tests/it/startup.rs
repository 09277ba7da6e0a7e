//! Starting while PostgreSQL or Redis is unreachable: the worker stays up,
//! answers `/healthz` 200 and `/readyz` 503, and starts consuming once the
//! dependency answers, logging the outage once with its count of failed
//! attempts.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;

/// A TCP forwarder to `upstream`, listening on `port` from the moment it
/// is started (before that the port is closed: connections are refused).
async fn start_forwarder(port: u16, upstream: &'static str) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("the forwarder's port is still free");
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    })
}

/// Runs `audit-worker run` for `env` with `extra` settings, its log in `log`.
fn spawn_logged(env: &TestEnv, extra: &[(&str, String)], log: &std::path::Path) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_audit-worker"));
    cmd.arg("run");
    for (k, v) in env.env_vars() {
        cmd.env(k, v);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    cmd.spawn().expect("worker binary starts")
}

/// While `dependency` ("database" or "redis") is unreachable: alive,
/// /healthz 200, /readyz 503 naming it. Then it becomes reachable: ready,
/// and an XADDed event is stored. The log names the outage once and its
/// end with the count of failed attempts.
async fn starts_and_waits_for(
    dependency: &str,
    setting: &str,
    url: String,
    upstream: &'static str,
) {
    let env = TestEnv::new(&format!("start_{dependency}")).await;
    let port: u16 = url
        .rsplit(':')
        .next()
        .and_then(|p| p.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("worker.log");
    let mut child = spawn_logged(
        &env,
        &[
            (setting, url),
            ("AUDIT_WORKER__REDIS__CONNECT_TIMEOUT_SECS", "1".into()),
        ],
        &log,
    );

    wait_until(Duration::from_secs(20), "/healthz answers", || async {
        http_status(env.http_port, "/healthz").await.map(|r| r.0) == Some(200)
    })
    .await;
    // Long enough for several failed attempts (0.5 s, 1 s, 2 s apart).
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert!(child.try_wait().unwrap().is_none(), "the worker stays up");
    let (code, body) = http_status(env.http_port, "/readyz").await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["checks"][dependency]["ok"], false, "{body}");
    assert_eq!(http_status(env.http_port, "/healthz").await.unwrap().0, 200);

    let forwarder = start_forwarder(port, upstream).await;
    wait_until(Duration::from_secs(40), "/readyz 200", || async {
        http_status(env.http_port, "/readyz").await.map(|r| r.0) == Some(200)
    })
    .await;
    env.add_events(&[event(1)]).await;
    wait_until(Duration::from_secs(20), "the event stored", || async {
        env.row_count().await == 1
    })
    .await;
    terminate(&mut child);
    forwarder.abort();

    let text = std::fs::read_to_string(&log).unwrap();
    let what = if dependency == "database" {
        "PostgreSQL not available at start"
    } else {
        "Redis not available at start"
    };
    let warnings = text
        .lines()
        .filter(|l| l.contains(what) && l.contains("WARN"))
        .count();
    assert_eq!(warnings, 1, "one warning for the outage:\n{text}");
    let recovered: Vec<u64> = text
        .lines()
        .filter(|l| l.contains(what))
        .filter_map(|l| {
            let rest = l.split("recovered after ").nth(1)?;
            rest.split(' ').next()?.parse().ok()
        })
        .collect();
    assert_eq!(recovered.len(), 1, "one recovery line:\n{text}");
    assert!(
        recovered[0] >= 3,
        "the recovery line counts the failed attempts:\n{text}"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_while_postgresql_is_unreachable_waits_then_stores_events() {
    let port = free_port();
    starts_and_waits_for(
        "database",
        "AUDIT_WORKER__DATABASE__URL",
        format!("postgres://postgres@127.0.0.1:{port}/audit_worker_test"),
        "127.0.0.1:5432",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_while_redis_is_unreachable_waits_then_stores_events() {
    let port = free_port();
    starts_and_waits_for(
        "redis",
        "AUDIT_WORKER__REDIS__URL",
        format!("redis://127.0.0.1:{port}"),
        "127.0.0.1:6379",
    )
    .await;
}
