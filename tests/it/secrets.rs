//! Secrets and the HTTP surface: HMAC keys and passwords never reach logs
//! (even at debug level), errors, `check-config` output, `/metrics` or
//! `/health/*`; those endpoints show no event contents; requests with bodies
//! and oversized headers are refused.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use audit_worker::integrity::HmacKey;
use serde_json::json;

use crate::common::*;

const HMAC_SECRET: &str = "hmac-SECRET-8f1d2c";
const FILE_SECRET: &str = "file-SECRET-77aa01";
const DB_PASSWORD: &str = "dbpass-SECRET-c0ffee";
const URL_PASSWORD: &str = "urlpass-SECRET-5e5e";
const CONTENT: &str = "EVENT-CONTENT-MARKER-4242";

fn assert_no_secret(text: &str, what: &str) {
    for secret in [HMAC_SECRET, FILE_SECRET, DB_PASSWORD, URL_PASSWORD] {
        assert!(!text.contains(secret), "{what} reveals {secret}:\n{text}");
    }
}

fn binary(env: &TestEnv, args: &[&str], extra: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_audit-worker"));
    cmd.args(args).envs(env.env_vars());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_stay_out_of_logs_errors_metrics_and_health_output() {
    let env = TestEnv::new("secrets").await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("hmac-keys");
    std::fs::write(&key_file, format!("old={FILE_SECRET}\n")).unwrap();
    // Deliberately readable by others: the worker must warn, not leak.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let secrets = vec![
        (
            "AUDIT_WORKER__INTEGRITY__HMAC_KEYS",
            format!("k1={HMAC_SECRET}"),
        ),
        (
            "AUDIT_WORKER__INTEGRITY__HMAC_KEYS_FILE",
            key_file.display().to_string(),
        ),
        ("AUDIT_WORKER__DATABASE__PASSWORD", DB_PASSWORD.to_string()),
        ("AUDIT_WORKER__LOG__LEVEL", "debug".to_string()),
        ("AUDIT_WORKER__LOG__FORMAT", "json".to_string()),
    ];

    // check-config prints the whole configuration, secrets redacted.
    let out = binary(&env, &["check-config"], &secrets).output().unwrap();
    assert!(out.status.success());
    let shown =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(shown.contains("[redacted]"), "{shown}");
    assert_no_secret(&shown, "check-config");

    // A running worker at debug level, fed signed, mis-signed and invalid
    // events (the rejections' error texts are logged).
    let log_path = dir.path().join("worker.log");
    let mut cmd = binary(&env, &["run"], &secrets);
    cmd.stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap());
    let mut child = cmd.spawn().unwrap();
    env.wait_for_schema().await;
    let old_key = HmacKey::new("old", FILE_SECRET);
    let mut signed = event(1);
    signed["outcomeDescription"] = json!(CONTENT);
    let hash = audit_worker::event::decode_event(
        signed.to_string().as_bytes(),
        &Default::default(),
        chrono::Utc::now(),
    )
    .unwrap()
    .hash;
    signed["signature"] = json!(old_key.sign(&hash));
    let mut forged = event(2);
    forged["action"] = json!(CONTENT);
    forged["signature"] = json!(HmacKey::new("k1", "guess").sign(&hash));
    let mut invalid = event(3);
    invalid["status"] = json!(CONTENT);
    env.add_events(&[signed, forged, invalid]).await;
    wait_until(
        Duration::from_secs(30),
        "one row, two dead letters",
        || async { env.row_count().await == 1 && env.dlq_len().await == 2 },
    )
    .await;
    let key_id: Option<String> = env
        .pg
        .query_one("SELECT signature_key_id FROM audit_log", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        key_id.as_deref(),
        Some("old"),
        "rotated-out key still verifies"
    );

    let base = format!("http://127.0.0.1:{}", env.http_port);
    let http = reqwest::Client::new();
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/health/database",
        "/health/redis",
        "/health/queue",
        "/health/circuit-breaker",
    ] {
        let body = http
            .get(format!("{base}{path}"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_no_secret(&body, path);
        assert!(
            !body.contains(CONTENT),
            "{path} shows event contents:\n{body}"
        );
    }

    // HTTP limits: no request bodies, bounded headers, and the server stays up.
    // A body small enough to be written whole before the answer: a large
    // one races the server's early 413 with a broken pipe on the client.
    let with_body = http
        .get(format!("{base}/metrics"))
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(with_body.status(), 413);
    let post = http
        .post(format!("{base}/healthz"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert!(
        post.status() == 405 || post.status() == 413,
        "{}",
        post.status()
    );
    let huge_header = http
        .get(format!("{base}/healthz"))
        .header("x-filler", "a".repeat(1 << 20))
        .send()
        .await;
    let huge_header = huge_header.expect("hyper answers an oversized header");
    assert_eq!(huge_header.status(), 431, "an oversized header is refused");
    let still = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(still.status(), 200);

    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    let mut logs = String::new();
    std::fs::File::open(&log_path)
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert!(
        logs.contains("chmod 600"),
        "a group/world-readable key file is warned about:\n{logs}"
    );
    assert!(
        logs.contains("signature_mismatch") || logs.contains("dead"),
        "{logs}"
    );
    assert_no_secret(&logs, "worker logs at debug level");

    // Unreachable targets with credentials in their URLs: the worker waits
    // for them (not ready), and its log names the target only.
    let closed = free_port().to_string();
    for (var, url) in [
        (
            "AUDIT_WORKER__DATABASE__URL",
            format!("postgres://someone:{URL_PASSWORD}@127.0.0.1:{closed}/db"),
        ),
        (
            "AUDIT_WORKER__REDIS__URL",
            format!("redis://someone:{URL_PASSWORD}@127.0.0.1:{closed}"),
        ),
    ] {
        let mut cmd = binary(&env, &["run"], &[(var, url)]);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = cmd.spawn().unwrap();
        wait_until(Duration::from_secs(20), "/readyz 503", || async {
            http_status(env.http_port, "/readyz").await.map(|r| r.0) == Some(503)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{var}: a clean stop while waiting");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            text.contains(&closed),
            "{var}: the error names the target: {text}"
        );
        assert_no_secret(&text, var);
    }
    env.cleanup().await;
}
