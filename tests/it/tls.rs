//! Transport security: the worker talks to a private `redis-server` over
//! TLS (`rediss://`, certificates made here by a throwaway CA) with a Redis
//! ACL user and password, and refuses a server whose certificate it cannot
//! verify.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;

/// A throwaway CA and a server certificate for 127.0.0.1/localhost signed by
/// it, made with the openssl CLI.
struct Certs {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl CLI available (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn make_certs(dir: &Path) -> Certs {
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
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
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
    Certs {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    }
}

/// A private redis-server accepting only TLS, with the default user off and
/// one ACL user; killed on drop.
struct TlsRedis {
    child: Child,
    port: u16,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_tls_redis(dir: &Path, certs: &Certs, user: &str, password: &str) -> TlsRedis {
    let port = free_port();
    let conf = dir.join("redis.conf");
    std::fs::write(
        &conf,
        format!(
            "port 0\ntls-port {port}\nbind 127.0.0.1\ntls-cert-file {}\ntls-key-file {}\n\
             tls-ca-cert-file {}\ntls-auth-clients no\nsave \"\"\nappendonly no\ndir {}\n\
             user default off\nuser {user} on >{password} ~* &* +@all\n",
            certs.cert.display(),
            certs.key.display(),
            certs.ca.display(),
            dir.display()
        ),
    )
    .unwrap();
    let child = Command::new("redis-server")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server available (scripts/services.sh installs it)");
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "private TLS redis-server did not start (is it built with TLS? redis-server --tls-port needs Redis 6+)"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    TlsRedis { child, port }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_consumes_over_rediss_with_an_acl_user_and_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let password = "acl-pass-31337";
    let server = start_tls_redis(dir.path(), &certs, "auditw", password);
    let url = format!("rediss://auditw:{password}@127.0.0.1:{}", server.port);

    let mut env = TestEnv::new("tls").await;
    // The test's own Redis helpers talk to the private server too.
    env.redis = redis::Client::build_with_tls(
        url.as_str(),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(&certs.ca).unwrap()),
        },
    )
    .unwrap();
    let mut config = env.config();
    config.redis.url = url.clone().into();
    config.redis.tls_ca_file = certs.ca.display().to_string();
    env.add_events(&(0..100).map(event).collect::<Vec<_>>())
        .await;
    env.add_entries(&[(None, b"not json".to_vec())]).await;
    let worker = InProcessWorker::start(config.clone());
    wait_until(
        Duration::from_secs(60),
        "100 rows and a dead letter over TLS",
        || async {
            env.row_count().await == 100
                && env.dlq_len().await == 1
                && env.pending_count().await == 0
        },
    )
    .await;
    let ready = reqwest::get(format!("http://127.0.0.1:{}/readyz", env.http_port))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    worker.stop().await;

    // Without the private CA the server's certificate cannot be verified:
    // start-up fails with the reason, it does not fall back to plain text.
    let mut untrusting = config.clone();
    untrusting.redis.tls_ca_file = String::new();
    untrusting.redis.connect_timeout_secs = 2;
    let err = audit_worker::app::run(untrusting, Default::default())
        .await
        .expect_err("an unverifiable certificate is refused");
    let text = format!("{err:#}");
    assert!(text.contains("redis unreachable"), "{text}");
    assert!(!text.contains(password), "{text}");

    // A wrong ACL password is refused too.
    let mut wrong = config.clone();
    wrong.redis.url = url.replace(password, "wrong-password").into();
    wrong.redis.connect_timeout_secs = 2;
    let err = audit_worker::app::run(wrong, Default::default())
        .await
        .expect_err("a wrong password is refused");
    assert!(!format!("{err:#}").contains("wrong-password"), "{err:#}");

    // A CA file with plain redis:// is a configuration error.
    let dir2 = tempfile::tempdir().unwrap();
    let file = dir2.path().join("c.toml");
    std::fs::write(
        &file,
        format!("[redis]\ntls_ca_file = \"{}\"\n", certs.ca.display()),
    )
    .unwrap();
    let e = audit_worker::config::Config::load_from(
        Some(&file),
        figment::providers::Env::prefixed("AUDIT_WORKER_IT_UNSET__"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("redis.tls_ca_file"), "{e}");

    env.cleanup().await;
    drop(server);
}
