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
