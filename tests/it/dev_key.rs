//! The newcomer path: a development run (no --config, `scripts/run.sh`
//! turns `snapshot.dev_signing_key` on) makes its own signing key outside
//! the repository and takes `audit.snapshot` jobs; with a configuration
//! file it refuses to.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_development_run_makes_a_signing_key_and_takes_a_snapshot_job() {
    let env = TestEnv::new("devkey").await;
    let home = tempfile::tempdir().unwrap();
    let log = home.path().join("worker.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_audit-worker"));
    cmd.arg("run");
    for (k, v) in env.env_vars() {
        cmd.env(k, v);
    }
    cmd.env("AUDIT_WORKER__SNAPSHOT__DEV_SIGNING_KEY", "true")
        .env("HOME", home.path())
        .env_remove("XDG_DATA_HOME")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut child = cmd.spawn().unwrap();
    env.wait_for_schema().await;

    env.add_entries(&[(Some("audit.snapshot"), b"{}".to_vec())])
        .await;
    wait_until(
        Duration::from_secs(30),
        "the audit.snapshot job done",
        || async {
            env.pg
                .query_one(
                    "SELECT count(*) FROM snapshot_jobs WHERE source LIKE 'stream:%' AND status = 'done'",
                    &[],
                )
                .await
                .map(|r| r.get::<_, i64>(0) == 1)
                .unwrap_or(false)
        },
    )
    .await;
    terminate(&mut child);
    assert_eq!(env.dlq_len().await, 0, "the job was not refused");

    let key = home
        .path()
        .join(".local/share/audit-worker/dev-signing-key");
    let text = std::fs::read_to_string(&key).expect("the development key file");
    assert!(
        text.starts_with("PRIVATE+KEY+audit-worker/log+"),
        "a signed-note key"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("created a development snapshot signing key")
            && logged.contains(&key.display().to_string()),
        "{logged}"
    );
    assert!(
        !logged.contains(text.trim()),
        "the private key is never logged"
    );

    // With a configuration file: refused at once, no key made.
    let other_home = tempfile::tempdir().unwrap();
    let file = other_home.path().join("audit.toml");
    std::fs::write(&file, "").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_audit-worker"))
        .args(["run", "--config", &file.display().to_string()])
        .envs(env.env_vars())
        .env("AUDIT_WORKER__SNAPSHOT__DEV_SIGNING_KEY", "true")
        .env("HOME", other_home.path())
        .env_remove("XDG_DATA_HOME")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("only for development runs without --config"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!other_home.path().join(".local").exists());
    env.cleanup().await;
}
