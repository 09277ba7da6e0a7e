//! PostgreSQL over TLS (rustls) with libpq's sslmode choices, against a
//! private PostgreSQL cluster (initdb in a temporary directory, on a free
//! port, ssl=on, plain TCP refused) whose certificate is signed by a CA
//! made here.

use std::path::Path;
use std::process::Command;

use audit_worker::config::Config;

use crate::common::*;

/// Runs a command as the `postgres` OS user when we are root (initdb and
/// the server refuse to run as root), else as ourselves.
///
/// Some sandboxes make /dev/null root-only, which initdb and pg_ctl cannot
/// live with; there the command runs in a private mount namespace with a
/// world-writable null device bound over /dev/null (the host's stays as
/// it is).
fn as_postgres(dir: &Path, program: &str, args: &[&str]) -> std::process::Output {
    use std::os::unix::fs::PermissionsExt;
    let bin = glob_pg_bin(program);
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    let devnull_open = std::fs::metadata("/dev/null")
        .map(|m| m.permissions().mode() & 0o002 != 0)
        .unwrap_or(true);
    let out = if !root {
        Command::new(&bin).args(args).output()
    } else if devnull_open {
        Command::new("runuser")
            .args(["-u", "postgres", "--", &bin])
            .args(args)
            .output()
    } else {
        let null = dir.join("null");
        if !null.exists() {
            let ok = Command::new("mknod")
                .arg(&null)
                .args(["c", "1", "3"])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "mknod for a private /dev/null");
            std::fs::set_permissions(&null, std::fs::Permissions::from_mode(0o666)).unwrap();
        }
        Command::new("unshare")
            .args(["-m", "sh", "-c"])
            .arg("mount --bind \"$0\" /dev/null && exec runuser -u postgres -- \"$@\"")
            .arg(&null)
            .arg(&bin)
            .args(args)
            .output()
    };
    out.unwrap_or_else(|e| panic!("{program}: {e}"))
}

/// The PostgreSQL server binaries (Debian keeps them out of PATH).
fn glob_pg_bin(program: &str) -> String {
    let mut versions: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    versions.sort();
    versions
        .iter()
        .rev()
        .map(|v| v.join("bin").join(program))
        .find(|p| p.exists())
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| program.to_string())
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl CLI");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private cluster; stopped on drop.
struct TlsPostgres {
    dir: String,
    data: String,
    port: u16,
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let _ = as_postgres(
            Path::new(&self.dir),
            "pg_ctl",
            &["stop", "-D", &self.data, "-m", "immediate", "-w"],
        );
    }
}

fn start_tls_postgres(dir: &Path) -> TlsPostgres {
    // CA, and a server certificate naming only "localhost".
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=audit-worker test CA",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    let data = dir.join("data").display().to_string();
    let _ = Command::new("chown")
        .args(["-R", "postgres", &dir.display().to_string()])
        .status();
    let _ = Command::new("chmod")
        .args(["600", &dir.join("server.key").display().to_string()])
        .status();
    let _ = Command::new("chmod")
        .args(["755", &dir.display().to_string()])
        .status();
    let out = as_postgres(
        dir,
        "initdb",
        &["-D", &data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
    );
    assert!(
        out.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(
        dir.join("data").join("pg_hba.conf"),
        "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n\
         hostnossl all all 127.0.0.1/32 reject\nhostnossl all all ::1/128 reject\n",
    )
    .unwrap();
    let port = free_port();
    let opts = format!(
        "-p {port} -k {d} -c listen_addresses=127.0.0.1 -c ssl=on -c ssl_cert_file={d}/server.pem \
         -c ssl_key_file={d}/server.key -c fsync=off",
        d = dir.display()
    );
    let log = dir.join("pg.log").display().to_string();
    let out = as_postgres(
        dir,
        "pg_ctl",
        &[
            "start", "-D", &data, "-o", &opts, "-l", &log, "-w", "-t", "60",
        ],
    );
    assert!(
        out.status.success(),
        "pg_ctl start: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    TlsPostgres {
        dir: dir.display().to_string(),
        data,
        port,
    }
}

fn config_for(host: &str, port: u16, sslmode: &str, ca: &str) -> Config {
    let mut c = Config::load_from(
        None,
        figment::providers::Env::prefixed("AUDIT_WORKER_IT_UNSET__"),
    )
    .expect("defaults load");
    c.database.url = format!("postgres://postgres@{host}:{port}/postgres").into();
    c.database.schema = "tls_check".into();
    c.database.sslmode = sslmode.into();
    c.database.tls_ca_file = ca.into();
    c.database.connect_timeout_secs = 5;
    c
}

/// Connects the way the worker does; returns whether the session uses TLS.
async fn connect(config: &Config) -> Result<bool, String> {
    let pool = audit_worker::db::connect_pool(config)
        .await
        .map_err(|e| e.to_string())?;
    audit_worker::db::migrate(config)
        .await
        .map_err(|e| e.to_string())?;
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tls_modes_verify_the_server_as_libpq_does() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_tls_postgres(dir.path());
    let port = server.port;
    let ca = dir.path().join("ca.pem").display().to_string();

    // verify-full: trusted CA and the certificate names "localhost".
    assert_eq!(
        connect(&config_for("localhost", port, "verify-full", &ca)).await,
        Ok(true)
    );
    // ... but not "127.0.0.1": refused by name.
    let e = connect(&config_for("127.0.0.1", port, "verify-full", &ca))
        .await
        .unwrap_err();
    assert!(
        e.contains("database unreachable") && e.to_lowercase().contains("name"),
        "{e}"
    );
    // verify-ca does not check the name, only the chain.
    assert_eq!(
        connect(&config_for("127.0.0.1", port, "verify-ca", &ca)).await,
        Ok(true)
    );
    // Without our CA (system roots only) the chain is untrusted.
    let e = connect(&config_for("localhost", port, "verify-ca", ""))
        .await
        .unwrap_err();
    assert!(
        e.to_lowercase().contains("issuer") || e.contains("certificate"),
        "{e}"
    );
    // require: encrypted, certificate unchecked.
    assert_eq!(
        connect(&config_for("127.0.0.1", port, "require", "")).await,
        Ok(true)
    );
    // disable: this server refuses plain TCP, and the worker does not upgrade by itself.
    let e = connect(&config_for("127.0.0.1", port, "disable", ""))
        .await
        .unwrap_err();
    assert!(
        e.contains("database unreachable") || e.contains("pg_hba"),
        "{e}"
    );
    drop(server);
}

/// Runs the binary with `vars`; returns (success, stdout, stderr).
fn cli(vars: &[(String, String)], args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_audit-worker"));
    cmd.args(args);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("the audit-worker binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_commands_use_database_tls_against_a_tls_only_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_tls_postgres(dir.path());
    let ca = dir.path().join("ca.pem").display().to_string();
    let out_dir = dir.path().join("exports");
    let storage = dir.path().join("storage");
    let origin = "tls.example/audit-log";
    let signer = audit_worker::integrity::checkpoint::Ed25519NoteSigner::generate(origin).unwrap();
    let vars: Vec<(String, String)> = [
        (
            "AUDIT_WORKER__DATABASE__URL",
            format!("postgres://postgres@localhost:{}/postgres", server.port),
        ),
        ("AUDIT_WORKER__DATABASE__SCHEMA", "cli_tls".into()),
        ("AUDIT_WORKER__DATABASE__SSLMODE", "verify-full".into()),
        ("AUDIT_WORKER__DATABASE__TLS_CA_FILE", ca.clone()),
        ("AUDIT_WORKER__REDIS__URL", test_redis_url()),
        (
            "AUDIT_WORKER__STREAM__KEY",
            format!("test:cli_tls:{}:events", std::process::id()),
        ),
        ("AUDIT_WORKER__SNAPSHOT__ORIGIN", origin.into()),
        (
            "AUDIT_WORKER__SNAPSHOT__SIGNING_KEY",
            signer.to_private_key_string(),
        ),
        ("AUDIT_WORKER__STORAGE__URL", storage.display().to_string()),
        ("AUDIT_WORKER__LOG__FORMAT", "text".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();

    let (ok, _, err) = cli(&vars, &["migrate"]);
    assert!(ok, "migrate over TLS: {err}");

    // Three events, hashed as the worker would, written over TLS.
    let mut config = config_for("localhost", server.port, "verify-full", &ca);
    config.database.schema = "cli_tls".into();
    let (client, _conn) = audit_worker::db::connect(&config).await.unwrap();
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "db::connect uses TLS");
    client
        .batch_execute(
            r#"SELECT audit_log_ensure_partition(date_trunc('month', now() - interval '1 hour')::date);
               SELECT audit_log_ensure_partition(date_trunc('month', now())::date);
               INSERT INTO audit_log (event_time, timestamp_raw, idempotency_key, event_id, action, status,
                        principal_id, organization_id, target_resource_type, target_resource_id,
                        outcome_description, hash, hash_provided, source)
               SELECT t, raw, 'evt-tls-' || g, 'evt-tls-' || g, 'record.read', 'success', 'user-1', 'org-1',
                      'Patient', 'p-' || g, 'read ' || g,
                      encode(sha256(convert_to(
                        'action:"record.read"|organizationId:"org-1"|outcomeDescription:"read ' || g
                        || '"|principalId:"user-1"|status:"success"|targetResourceId:"p-'
                        || g || '"|targetResourceType:"Patient"|timestamp:"' || raw || '"', 'UTF8')), 'hex'),
                      true, 'test'
                 FROM generate_series(1, 3) g,
                      LATERAL (SELECT date_trunc('milliseconds', now() - interval '1 hour') + g * interval '1 millisecond' AS t) a,
                      LATERAL (SELECT to_char(a.t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS raw) b"#,
        )
        .await
        .unwrap();

    let (ok, manifest, err) = cli(&vars, &["snapshot"]);
    assert!(ok, "snapshot over TLS: {err}");
    assert!(manifest.contains("\"recordCount\": 3"), "{manifest}");

    let (ok, report, err) = cli(&vars, &["verify"]);
    assert!(ok, "verify over TLS: {err}");
    assert!(
        report.contains("OK: 1 snapshots, 3 leaves checked (0 late, 0 pruned by retention, 0 erased), 0 problems"),
        "{report}"
    );

    let (ok, proof, err) = cli(&vars, &["prove", "evt-tls-2"]);
    assert!(ok, "prove over TLS: {err}");
    let proof: serde_json::Value = serde_json::from_str(&proof).unwrap();
    assert_eq!(proof["treeSize"], 3, "{proof}");

    let from = (chrono::Utc::now() - chrono::Duration::hours(2)).to_rfc3339();
    let to = chrono::Utc::now().to_rfc3339();
    let (ok, done, err) = cli(
        &vars,
        &[
            "export",
            "--format",
            "ndjson",
            "--compression",
            "none",
            "--from",
            &from,
            "--to",
            &to,
            "--requester",
            "tls-test",
            "--out",
            &out_dir.display().to_string(),
        ],
    );
    assert!(ok, "export over TLS: {err}");
    assert!(done.contains("rows:     3"), "{done}");

    // The same verify with TLS turned off is refused by this server: the
    // commands above really went through TLS.
    let mut plain = vars.clone();
    plain.push(("AUDIT_WORKER__DATABASE__SSLMODE".into(), "disable".into()));
    let (ok, _, err) = cli(&plain, &["verify"]);
    assert!(!ok && err.contains("database unreachable"), "{err}");
    drop(client);
    drop(server);
}
