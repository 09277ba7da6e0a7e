//! Live configuration with the worker binary: HMAC key rotation by SIGHUP
//! and by poll, refused edits that change nothing, restart-only settings,
//! and a document in the object store with its last good local copy.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use audit_worker::integrity::HmacKey;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::common::*;

/// An event `i` signed with `key` (its hash computed as the worker does).
fn signed_event(i: usize, key: &HmacKey) -> Value {
    let mut e = event(i);
    let hash = audit_worker::event::decode_event(
        e.to_string().as_bytes(),
        &Default::default(),
        chrono::Utc::now(),
    )
    .unwrap()
    .hash;
    e["signature"] = json!(key.sign(&hash));
    e
}

/// A document that requires signatures and names the keys `keys`
/// ("id=secret,..."), plus `extra` TOML.
fn document(keys: &str, extra: &str) -> String {
    format!(
        "[validation]\nrequire_signature = true\n\n[integrity]\nhmac_keys = \"{keys}\"\n\n{extra}"
    )
}

fn version_of(document: &str) -> String {
    hex::encode(Sha256::digest(document.as_bytes()))
}

/// Starts `audit-worker run --config <config>` for `env`, logging to `log`.
fn start_worker(env: &TestEnv, config: &str, cache: &Path, log: &Path) -> Child {
    worker(env, config, cache, log)
        .spawn()
        .expect("worker binary starts")
}

fn worker(env: &TestEnv, config: &str, cache: &Path, log: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_audit-worker"));
    cmd.args(["run", "--config", config])
        .envs(env.env_vars())
        .env("AUDIT_WORKER__CONFIG__CACHE_PATH", cache)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    cmd
}

/// Sends SIGHUP and waits until `audit_worker_config_reload_total{result}`
/// reaches `count`.
async fn reload_by_signal(env: &TestEnv, child: &Child, result: &str, count: u64) {
    let status = Command::new("kill")
        .arg("-HUP")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    wait_until(
        Duration::from_secs(20),
        &format!("reload counted as {result} {count} time(s)"),
        || async { reloads(env, result).await == count },
    )
    .await;
}

async fn wait_ready(env: &TestEnv) {
    env.wait_for_schema().await;
}

/// The value of the sample `series` (name and labels as rendered) on
/// the worker's `/metrics`, `None` when it is not exported.
async fn metric(env: &TestEnv, series: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", env.http_port))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let prefix = format!("{series} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().unwrap())
}

/// `audit_worker_config_reload_total{result}` as the worker reports it.
async fn reloads(env: &TestEnv, result: &str) -> u64 {
    let series = format!("audit_worker_config_reload_total{{result=\"{result}\"}}");
    metric(env, &series)
        .await
        .unwrap_or_else(|| panic!("{series} is not exported")) as u64
}

/// The `config` object of `GET /health`.
async fn health_config(env: &TestEnv) -> Value {
    let (code, body) = http_status(env.http_port, "/health").await.unwrap();
    assert_eq!(code, 200, "{body}");
    body["config"].clone()
}

/// The key id stored with event `i` (waits for its row).
async fn stored_key_id(env: &TestEnv, i: usize) -> Option<String> {
    let id = format!("evt-{i}");
    wait_until(Duration::from_secs(30), &format!("{id} stored"), || async {
        env.pg
            .query_opt("SELECT 1 FROM audit_log WHERE event_id = $1", &[&id])
            .await
            .unwrap()
            .is_some()
    })
    .await;
    env.pg
        .query_one(
            "SELECT signature_key_id FROM audit_log WHERE event_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0)
}

/// Waits until the test's DLQ holds `count` dead letters.
async fn wait_for_dead_letters(env: &TestEnv, count: usize) {
    wait_until(
        Duration::from_secs(30),
        &format!("{count} dead letter(s)"),
        || async { env.dlq_len().await == count },
    )
    .await;
}

fn log_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

struct Files {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Files {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        Self { _dir: dir, root }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The worker's configuration document (edited to reload).
    fn config(&self) -> PathBuf {
        self.path("worker.toml")
    }

    /// The worker's log.
    fn log(&self) -> PathBuf {
        self.path("worker.log")
    }

    /// Writes `document` as the configuration and starts the worker on it.
    fn start_worker(&self, env: &TestEnv, document: &str) -> Child {
        std::fs::write(self.config(), document).unwrap();
        start_worker(
            env,
            self.config().to_str().unwrap(),
            &self.path("cache.toml"),
            &self.log(),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_the_hmac_key_old_key_ids_still_verify_and_invalid_edits_change_nothing() {
    let env = TestEnv::new("live_sighup").await;
    let files = Files::new();
    let config = files.config();
    let log = files.log();
    let (k1, k2, k3) = (
        HmacKey::new("k1", "first-secret"),
        HmacKey::new("k2", "second-secret"),
        HmacKey::new("k3", "third-secret"),
    );
    let first = document("k1=first-secret", "");
    let mut child = files.start_worker(&env, &first);
    wait_ready(&env).await;
    assert_eq!(health_config(&env).await["version"], version_of(&first));

    // Before the rotation a k2 signature is unknown: dead-lettered.
    env.add_events(&[signed_event(1, &k1), signed_event(2, &k2)])
        .await;
    assert_eq!(stored_key_id(&env, 1).await.as_deref(), Some("k1"));
    wait_for_dead_letters(&env, 1).await;

    // Rotation: k2 signs from now on, k1 stays to verify older events.
    let rotated = document("k2=second-secret,k1=first-secret", "");
    std::fs::write(&config, &rotated).unwrap();
    reload_by_signal(&env, &child, "applied", 1).await;
    let health = health_config(&env).await;
    assert_eq!(health["version"], version_of(&rotated));
    assert!(
        health["loaded_at"].as_str().unwrap().ends_with('Z'),
        "{health}"
    );
    env.add_events(&[signed_event(3, &k2), signed_event(4, &k1)])
        .await;
    assert_eq!(stored_key_id(&env, 3).await.as_deref(), Some("k2"));
    assert_eq!(
        stored_key_id(&env, 4).await.as_deref(),
        Some("k1"),
        "the old key id still verifies"
    );

    // An invalid edit (with a new key in it) is refused as a whole: the
    // key it adds does not verify, events keep flowing under the last
    // good configuration.
    std::fs::write(
        &config,
        document(
            "k3=third-secret,k2=second-secret",
            "[sink]\nbatch_size = 0\n",
        ),
    )
    .unwrap();
    reload_by_signal(&env, &child, "rejected", 1).await;
    assert_eq!(reloads(&env, "applied").await, 1, "nothing more applied");
    assert_eq!(health_config(&env).await["version"], version_of(&rotated));
    env.add_events(&[signed_event(5, &k1), signed_event(6, &k3)])
        .await;
    assert_eq!(stored_key_id(&env, 5).await.as_deref(), Some("k1"));
    wait_for_dead_letters(&env, 2).await;
    let logged = log_text(&log);
    assert!(logged.contains("configuration rejected"), "{logged}");
    assert!(
        logged.contains("sink.batch_size"),
        "the reason names the setting: {logged}"
    );

    // A restart-only change is logged as such and left for the next
    // start; the live part of the same document applies.
    let restart_only = document(
        "k3=third-secret,k2=second-secret,k1=first-secret",
        "[sink]\nwriters = 3\n",
    );
    std::fs::write(&config, &restart_only).unwrap();
    reload_by_signal(&env, &child, "applied", 2).await;
    let health = health_config(&env).await;
    assert_eq!(
        health["pending_restart"],
        json!(["sink.writers"]),
        "{health}"
    );
    env.add_events(&[signed_event(7, &k3)]).await;
    assert_eq!(stored_key_id(&env, 7).await.as_deref(), Some("k3"));
    let logged = log_text(&log);
    assert!(
        logged.contains("apply only at the next start") && logged.contains("sink.writers"),
        "{logged}"
    );
    // The same document again: nothing to apply.
    reload_by_signal(&env, &child, "unchanged", 1).await;
    let logged = log_text(&log);
    for secret in ["first-secret", "second-secret", "third-secret"] {
        assert!(!logged.contains(secret), "{secret} in the log:\n{logged}");
    }

    terminate(&mut child);
    assert_eq!(env.row_count().await, 5);
    env.cleanup().await;
}

/// The events the worker records about itself (here: an export completed)
/// are signed with the key in force when they are made: after a rotation
/// that drops the old key, they are stored under the new key id, not
/// dead-lettered for a key the ring no longer has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workers_own_events_are_signed_with_the_key_in_force_after_a_rotation() {
    let env = TestEnv::new("live_own_key").await;
    let files = Files::new();
    let config = files.config();
    let notifications = format!("{}:notifications", env.stream);
    let extra = format!(
        "[storage]\nurl = \"{}\"\n\n[export]\nnotifications_key = \"{notifications}\"\n",
        files.path("store").display()
    );
    let mut child = files.start_worker(&env, &document("k1=first-secret", &extra));
    wait_ready(&env).await;
    env.add_events(&[signed_event(1, &HmacKey::new("k1", "first-secret"))])
        .await;
    assert_eq!(stored_key_id(&env, 1).await.as_deref(), Some("k1"));

    // k2 replaces k1 outright.
    std::fs::write(&config, document("k2=second-secret", &extra)).unwrap();
    reload_by_signal(&env, &child, "applied", 1).await;
    let day = chrono::Duration::days(1);
    let filters = json!({
        "from": (chrono::Utc::now() - day).to_rfc3339(),
        "to": (chrono::Utc::now() + day).to_rfc3339(),
    });
    env.add_entries(&[(
        Some("export.audit"),
        crate::export::request(filters, "ndjson", "none", "officer-1"),
    )])
    .await;
    let signed_by = || async {
        env.pg
            .query_opt(
                "SELECT signature_key_id FROM audit_log WHERE action = 'audit.export.completed'",
                &[],
            )
            .await
            .unwrap()
            .map(|r| r.get::<_, Option<String>>(0))
    };
    wait_until(
        Duration::from_secs(60),
        "the audit.export.completed event stored",
        || async { signed_by().await.is_some() },
    )
    .await;
    assert_eq!(signed_by().await, Some(Some("k2".to_string())));
    assert_eq!(env.dlq_len().await, 0, "nothing dead-lettered");
    let mut conn = env.redis_conn().await;
    let notices: Vec<redis::Value> = redis::cmd("XRANGE")
        .arg(&notifications)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(notices.len(), 1, "one export.ready notification");
    let _: () = redis::cmd("DEL")
        .arg(&notifications)
        .query_async(&mut conn)
        .await
        .unwrap();
    terminate(&mut child);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_document_is_applied_by_the_poll_without_a_signal() {
    let env = TestEnv::new("live_poll").await;
    let files = Files::new();
    let config = files.config();
    let poll = "[config]\nwatch_interval_secs = 1\n";
    let (k1, k2) = (
        HmacKey::new("k1", "poll-one"),
        HmacKey::new("k2", "poll-two"),
    );
    let mut child = files.start_worker(&env, &document("k1=poll-one", poll));
    wait_ready(&env).await;
    env.add_events(&[signed_event(1, &k1)]).await;
    assert_eq!(stored_key_id(&env, 1).await.as_deref(), Some("k1"));

    let rotated = document("k2=poll-two,k1=poll-one", poll);
    std::fs::write(&config, &rotated).unwrap();
    wait_until(
        Duration::from_secs(20),
        "poll applied the rotation",
        || async { health_config(&env).await["version"] == version_of(&rotated) },
    )
    .await;
    env.add_events(&[signed_event(2, &k2), signed_event(3, &k1)])
        .await;
    assert_eq!(stored_key_id(&env, 2).await.as_deref(), Some("k2"));
    assert_eq!(stored_key_id(&env, 3).await.as_deref(), Some("k1"));
    assert_eq!(reloads(&env, "applied").await, 1);

    // A broken document is refused once, not on every poll.
    std::fs::write(&config, "[validation\n").unwrap();
    wait_until(
        Duration::from_secs(20),
        "poll refused the broken document",
        || async { reloads(&env, "rejected").await == 1 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        reloads(&env, "rejected").await,
        1,
        "the same document is not refused again"
    );
    assert!(reloads(&env, "unchanged").await >= 2);
    assert_eq!(health_config(&env).await["version"], version_of(&rotated));
    env.add_events(&[signed_event(4, &k2)]).await;
    assert_eq!(stored_key_id(&env, 4).await.as_deref(), Some("k2"));

    terminate(&mut child);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_in_the_object_store_loads_reloads_and_falls_back_to_the_last_good_copy() {
    let env = TestEnv::new("live_store").await;
    let files = Files::new();
    let store = files.path("store");
    std::fs::create_dir_all(&store).unwrap();
    let keys = files.path("hmac-keys");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&keys)
            .unwrap();
        std::io::Write::write_all(&mut f, b"k1=store-one\n").unwrap();
    }
    let doc = format!(
        "[validation]\nrequire_signature = true\n\n[integrity]\nhmac_keys_file = \"{}\"\n",
        keys.display()
    );
    std::fs::write(store.join("worker.toml"), &doc).unwrap();
    let url = format!("file://{}/worker.toml", store.display());
    let cache = files.path("cache/last-good.toml");
    let log = files.path("worker.log");
    let (k1, k2) = (
        HmacKey::new("k1", "store-one"),
        HmacKey::new("k2", "store-two"),
    );

    let mut child = start_worker(&env, &url, &cache, &log);
    wait_ready(&env).await;
    assert_eq!(health_config(&env).await["version"], version_of(&doc));
    assert_eq!(
        std::fs::read_to_string(&cache).unwrap(),
        doc,
        "last good copy written"
    );
    env.add_events(&[signed_event(1, &k1)]).await;
    assert_eq!(stored_key_id(&env, 1).await.as_deref(), Some("k1"));

    // Rotation in the key file the document names: same document, new
    // key ring, applied on SIGHUP.
    std::fs::write(&keys, "k2=store-two\nk1=store-one\n").unwrap();
    reload_by_signal(&env, &child, "applied", 1).await;
    env.add_events(&[signed_event(2, &k2), signed_event(3, &k1)])
        .await;
    assert_eq!(stored_key_id(&env, 2).await.as_deref(), Some("k2"));
    assert_eq!(stored_key_id(&env, 3).await.as_deref(), Some("k1"));
    terminate(&mut child);
    assert!(child.wait().is_ok());

    // The store cannot be read at start: the last good copy is used.
    std::fs::remove_dir_all(&store).unwrap();
    let log2 = files.path("worker2.log");
    let mut child = start_worker(&env, &url, &cache, &log2);
    wait_ready(&env).await;
    assert_eq!(health_config(&env).await["version"], version_of(&doc));
    env.add_events(&[signed_event(4, &k2)]).await;
    assert_eq!(stored_key_id(&env, 4).await.as_deref(), Some("k2"));
    let logged = log_text(&log2);
    assert!(logged.contains("last good local copy"), "{logged}");
    terminate(&mut child);

    // Neither the store nor a copy: a clear error, exit 2.
    std::fs::remove_file(&cache).unwrap();
    let log3 = files.path("worker3.log");
    let status = worker(&env, &url, &cache, &log3).status().unwrap();
    assert_eq!(status.code(), Some(2));
    let said = log_text(&log3);
    assert!(said.contains(&url), "{said}");
    assert!(said.contains("no last good local copy"), "{said}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_and_sink_batching_apply_on_sighup() {
    let env = TestEnv::new("live_rules").await;
    let files = Files::new();
    let config = files.config();
    let key = HmacKey::new("k1", "rules-secret");
    // Batches of one row; no alert rule. The alert stream is this test's.
    let alerts = format!("[alerts]\nstream = \"test:{}:alerts\"\n", env.name);
    let first = document(
        "k1=rules-secret",
        &format!("{alerts}\n[sink]\nbatch_size = 1\n"),
    );
    let mut child = files.start_worker(&env, &first);
    wait_ready(&env).await;
    env.add_events(&(0..20).map(|i| signed_event(i, &key)).collect::<Vec<_>>())
        .await;
    wait_until(Duration::from_secs(30), "20 rows", || async {
        env.row_count().await == 20
    })
    .await;
    let rule = "audit_worker_security_alerts_total{rule=\"phi_live\"}";
    assert_eq!(metric(&env, rule).await, None, "no such rule yet");
    assert_eq!(
        metric(&env, "audit_worker_batch_size_bucket{le=\"1\"}").await,
        metric(&env, "audit_worker_batch_size_count").await,
        "batch_size = 1: every batch holds one row"
    );

    // A PHI rule, and big batches with a linger: both apply on SIGHUP.
    let second = document(
        "k1=rules-secret",
        &format!(
            "{alerts}\n[[alerts.rules]]\nkind = \"classified_access\"\nname = \"phi_live\"\nclassification = \"PHI\"\n\n[sink]\nbatch_size = 1000\nmax_wait_ms = 1500\n"
        ),
    );
    std::fs::write(&config, &second).unwrap();
    reload_by_signal(&env, &child, "applied", 1).await;
    let batches_before = metric(&env, "audit_worker_batch_size_count").await.unwrap();
    env.add_events(&(20..70).map(|i| signed_event(i, &key)).collect::<Vec<_>>())
        .await;
    wait_until(Duration::from_secs(30), "70 rows", || async {
        env.row_count().await == 70
    })
    .await;
    let batches = metric(&env, "audit_worker_batch_size_count").await.unwrap() - batches_before;
    assert!(
        (1.0..=5.0).contains(&batches),
        "50 events lingered into a few big batches, not 50: {batches}"
    );
    wait_until(Duration::from_secs(20), "the new rule fired", || async {
        metric(&env, rule).await.unwrap_or(0.0) >= 1.0
    })
    .await;
    let mut conn = env.redis_conn().await;
    let raised: usize = redis::cmd("XLEN")
        .arg(format!("test:{}:alerts", env.name))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(raised >= 1, "alerts written to the test's stream");

    terminate(&mut child);
    let _: () = redis::cmd("DEL")
        .arg(format!("test:{}:alerts", env.name))
        .query_async(&mut conn)
        .await
        .unwrap();
    env.cleanup().await;
}
