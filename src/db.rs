//! PostgreSQL connection pools and migrations (monthly partitions: see
//! [`crate::partitions`]).

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use crate::config::Config;

refinery::embed_migrations!("migrations");

/// A database problem phrased for the operator.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database unreachable at {target} ({cause}): start PostgreSQL or set AUDIT_WORKER__DATABASE__URL")]
    Unreachable { target: String, cause: String },
    #[error(
        "database.url is not a valid PostgreSQL URL ({0}): use postgres://user@host:port/dbname"
    )]
    BadUrl(String),
    #[error("migration failed: {0}")]
    Migration(String),
    #[error("database error: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("no database connection available: {0}")]
    Pool(String),
    #[error("{0}")]
    Tls(String),
}

/// Builds the tokio-postgres config from the settings: URL, password
/// override, schema (as the connection's search_path), timeouts, and JIT
/// off for the session.
pub fn pg_config(config: &Config) -> Result<tokio_postgres::Config, DbError> {
    let mut pg: tokio_postgres::Config = config
        .database
        .url
        .expose()
        .parse()
        .map_err(|e: tokio_postgres::Error| DbError::BadUrl(e.to_string()))?;
    if let Some(password) = config
        .database_password()
        .map_err(|e| DbError::BadUrl(e.to_string()))?
    {
        pg.password(password.expose());
    }
    if crate::pgtls::SslMode::parse(&config.database.sslmode)
        .is_some_and(|m| m != crate::pgtls::SslMode::Disable)
    {
        pg.ssl_mode(tokio_postgres::config::SslMode::Require);
    } else {
        pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
    }
    // JIT off: the worker's big reads (sealing, verify, exports) are long
    // streams of cheap rows, for which PostgreSQL's JIT spends seconds
    // compiling (about 4 s of a 1,000,000-row sealing read, measured)
    // and gains nothing back.
    pg.options(format!(
        "-c search_path={} -c jit=off",
        config.database.schema
    ));
    pg.connect_timeout(Duration::from_secs(config.database.connect_timeout_secs));
    pg.application_name("audit-worker");
    Ok(pg)
}

/// Opens a read-only `REPEATABLE READ` transaction on `client`: one
/// consistent view of the database for every query in it, which checks,
/// proofs, reports and the sealing read need when they read several
/// tables (or one table several times).
pub async fn read_only_snapshot(
    client: &mut tokio_postgres::Client,
) -> Result<tokio_postgres::Transaction<'_>, tokio_postgres::Error> {
    client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
}

/// The xmin of `tx`'s snapshot as a bigint: every transaction below it had
/// ended when the snapshot was taken (`tx` a `REPEATABLE READ` transaction
/// that has run a statement, so that its snapshot is fixed).
pub async fn snapshot_xmin(
    tx: &tokio_postgres::Transaction<'_>,
) -> Result<i64, tokio_postgres::Error> {
    Ok(tx
        .query_one(
            "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
            &[],
        )
        .await?
        .get(0))
}

/// Opens a read-only transaction on `helper` in the snapshot of `tx`
/// (`pg_export_snapshot`), so that both see the same database: for a read
/// split over connections (`verify`'s chunks and its search for unsealed
/// rows).
pub async fn join_snapshot<'h>(
    tx: &tokio_postgres::Transaction<'_>,
    helper: &'h mut tokio_postgres::Client,
) -> Result<tokio_postgres::Transaction<'h>, tokio_postgres::Error> {
    let id: String = tx
        .query_one("SELECT pg_export_snapshot()", &[])
        .await?
        .get(0);
    let joined = read_only_snapshot(helper).await?;
    // SET TRANSACTION SNAPSHOT takes no parameters: the server's own id
    // (hex digits and dashes) is quoted as a literal.
    joined
        .batch_execute(&format!(
            "SET TRANSACTION SNAPSHOT '{}'",
            id.replace('\'', "''")
        ))
        .await?;
    Ok(joined)
}

/// The TLS connector `database.sslmode` asks for (`None`: plain TCP).
pub fn tls_connector(
    config: &Config,
) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>, DbError> {
    let mode = crate::pgtls::SslMode::parse(&config.database.sslmode)
        .ok_or_else(|| DbError::Tls("database.sslmode is not a known mode".into()))?;
    crate::pgtls::connector(mode, &config.database.tls_ca_file).map_err(DbError::Tls)
}

/// `host:port` of the database, for messages (never the password).
pub fn describe_target(pg: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let host = match pg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}")
}

/// What a connection pool serves. Each role has its own connections, so one
/// kind of work can never take the connections another needs (a flood of
/// health checks cannot starve the sink and open its circuit breaker), and
/// its own session settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolRole {
    /// Jobs (exports, snapshots), partition upkeep and the CLI:
    /// `database.pool_size` connections, no statement timeout (long reads
    /// such as `verify` and exports are legitimate).
    General,
    /// The sink's batch writes: one connection per `sink.writers`, each
    /// with `database.statement_timeout_ms`, so a write stuck behind a lock
    /// fails (and is retried) instead of hanging its writer.
    Sink,
    /// `/readyz` and `/health/database`: one connection, statements cut
    /// after [`HEALTH_STATEMENT_TIMEOUT_MS`].
    Health,
}

/// Server-side limit of a health check's query.
pub const HEALTH_STATEMENT_TIMEOUT_MS: u64 = 2000;

impl PoolRole {
    fn max_size(self, config: &Config) -> usize {
        match self {
            Self::General => config.database.pool_size,
            Self::Sink => config.sink.writers.max(1),
            Self::Health => 1,
        }
    }

    /// `statement_timeout` of the role's sessions (0: none).
    fn statement_timeout_ms(self, config: &Config) -> u64 {
        match self {
            Self::General => 0,
            Self::Sink => config.database.statement_timeout_ms,
            Self::Health => HEALTH_STATEMENT_TIMEOUT_MS,
        }
    }
}

/// Builds the pool for `role` without opening a connection (connections
/// are made on first use, so this works while PostgreSQL is down).
pub fn build_pool(config: &Config, role: PoolRole) -> Result<Pool, DbError> {
    let mut pg = pg_config(config)?;
    let timeout = role.statement_timeout_ms(config);
    if timeout > 0 {
        let options = pg.get_options().unwrap_or_default().to_owned();
        pg.options(format!("{options} -c statement_timeout={timeout}"));
    }
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match tls_connector(config)? {
        Some(tls) => Manager::from_config(pg, tls, manager_config),
        None => Manager::from_config(pg, NoTls, manager_config),
    };
    Pool::builder(manager)
        .max_size(role.max_size(config))
        .wait_timeout(Some(Duration::from_secs(
            config.database.connect_timeout_secs,
        )))
        .create_timeout(Some(Duration::from_secs(
            config.database.connect_timeout_secs,
        )))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| DbError::Pool(e.to_string()))
}

/// Creates the general connection pool ([`PoolRole::General`]) and checks
/// that one connection works, so a wrong URL fails at start-up with a
/// clear message instead of later.
pub async fn connect_pool(config: &Config) -> Result<Pool, DbError> {
    let target = describe_target(&pg_config(config)?);
    let pool = build_pool(config, PoolRole::General)?;
    let client = pool.get().await.map_err(|e| DbError::Unreachable {
        target: target.clone(),
        cause: pool_error_cause(&e),
    })?;
    client.simple_query("SELECT 1").await?;
    Ok(pool)
}

/// The root cause of a pool error, without the URL.
pub fn pool_error_cause(e: &deadpool_postgres::PoolError) -> String {
    use deadpool_postgres::PoolError;
    match e {
        PoolError::Backend(err) => {
            let mut cause = err.to_string();
            let mut source = std::error::Error::source(err);
            while let Some(s) = source {
                cause = s.to_string();
                source = s.source();
            }
            cause
        }
        PoolError::Timeout(_) => "timed out".into(),
        other => other.to_string(),
    }
}

/// Opens one PostgreSQL connection (outside the pool) with the configured
/// TLS settings (`database.sslmode`, `database.tls_ca_file`): the single
/// way the CLI commands and migrations connect, so none of them falls back
/// to plain TCP. The connection task runs until the client is dropped.
pub async fn connect(
    config: &Config,
) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), DbError> {
    let pg = pg_config(config)?;
    let target = describe_target(&pg);
    let unreachable = |e: tokio_postgres::Error| DbError::Unreachable {
        target: target.clone(),
        cause: root_cause(&e),
    };
    let connected = match tls_connector(config)? {
        Some(tls) => {
            let (client, connection) = pg.connect(tls).await.map_err(unreachable)?;
            (
                client,
                tokio::spawn(async move {
                    let _ = connection.await;
                }),
            )
        }
        None => {
            let (client, connection) = pg.connect(NoTls).await.map_err(unreachable)?;
            (
                client,
                tokio::spawn(async move {
                    let _ = connection.await;
                }),
            )
        }
    };
    Ok(connected)
}

/// Creates the schema if missing and applies pending migrations.
pub async fn migrate(config: &Config) -> Result<Vec<String>, DbError> {
    migrate_to(config, None).await
}

/// [`migrate`], stopping after migration `version` when one is given: the
/// upgrade tests start from the schema an earlier release left.
pub async fn migrate_to(config: &Config, version: Option<u32>) -> Result<Vec<String>, DbError> {
    let (mut client, conn_task) = connect(config).await?;
    // Replicas starting together must not migrate concurrently (the
    // history table and CREATE SCHEMA race): one waits for the other on a
    // session advisory lock, released when this connection closes.
    let key = crate::lease::lock_key(&config.database.schema, "migrate");
    client
        .execute("SELECT pg_advisory_lock($1)", &[&key])
        .await?;
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS \"{}\"",
            config.database.schema
        ))
        .await?;
    let mut runner = migrations::runner();
    if let Some(v) = version {
        runner = runner.set_target(refinery::Target::Version(v as _));
    }
    let report = runner
        .run_async(&mut client)
        .await
        .map_err(|e| DbError::Migration(e.to_string()))?;
    let applied = report
        .applied_migrations()
        .iter()
        .map(|m| m.to_string())
        .collect();
    drop(client);
    let _ = conn_task.await;
    Ok(applied)
}

/// The innermost error message (e.g. "Connection refused (os error 111)").
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    cause
}
