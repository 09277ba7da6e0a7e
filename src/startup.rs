//! Starting while PostgreSQL or Redis is down.
//!
//! During an outage every pod of a rolling deploy must stay up rather than
//! crash-loop, so `run` binds its HTTP port first and answers `/healthz`
//! 200 and `/readyz` 503 (naming what cannot be reached) while it retries
//! connecting, and migrating when `database.migrate_on_start`, with capped
//! exponential backoff. Only once both answer does it build the pipeline
//! and start consuming. Settings that are simply wrong (a malformed URL, an
//! unreadable CA file) are not outages: [`check_settings`] refuses them at
//! once, before any connection is tried.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::source::{RedisConn, RedisTarget};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use deadpool_postgres::Pool;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db;
use crate::outage::OutageLog;
use crate::partitions::Partitions;
use crate::retry::Backoff;
use crate::telemetry::Metrics;

/// A setting that can never work, found before connecting: the worker
/// exits at once (code 2) instead of retrying.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigurationError(pub String);

/// Whether a connection failure is one that waiting cannot fix: a server
/// certificate that does not verify, or refused credentials. Start-up stops
/// with it (never falling back to plain text or guessing) instead of
/// retrying; anything else (refused or reset connections, timeouts, a
/// database not created yet, a server starting up) is an outage.
pub fn is_permanent(message: &str) -> bool {
    let m = message.to_lowercase();
    [
        "certificate",
        "password authentication failed",
        "pg_hba.conf",
        "wrongpass",
        "authentication failed",
        "authenticationfailed",
    ]
    .iter()
    .any(|p| m.contains(p))
}

/// Delays between connection attempts at start: 0.5 s doubling to 30 s.
pub const CONNECT_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(500),
    factor: 2.0,
    cap: Duration::from_secs(30),
    jitter: 0.1,
};

/// Checks, without any network I/O, that the database and Redis settings
/// can be used at all: URL syntax, TLS mode and CA files.
pub fn check_settings(config: &Config) -> Result<(), ConfigurationError> {
    let bad = |e: &dyn std::fmt::Display| ConfigurationError(e.to_string());
    db::pg_config(config).map_err(|e| bad(&e))?;
    db::tls_connector(config).map_err(|e| bad(&e))?;
    crate::source::redis_client(&config.redis).map_err(|e| bad(&e))?;
    crate::integrity::record::PersonalFields::with_extra(&config.snapshot.personal_fields)
        .map_err(|e| bad(&format!("snapshot.personal_fields: {e}")))?;
    Ok(())
}

/// What `/readyz` reports while starting: the last error of each
/// dependency not reached yet (`None`: reached).
#[derive(Debug, Clone, Default)]
pub struct StartupStatus {
    inner: Arc<Mutex<Waiting>>,
}

#[derive(Debug, Clone)]
struct Waiting {
    database: Option<String>,
    redis: Option<String>,
}

impl Default for Waiting {
    fn default() -> Self {
        Self {
            database: Some("not connected yet".into()),
            redis: Some("not connected yet".into()),
        }
    }
}

impl StartupStatus {
    fn set_database(&self, error: Option<String>) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .database = error;
    }

    fn set_redis(&self, error: Option<String>) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).redis = error;
    }

    fn snapshot(&self) -> Waiting {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// State of the start-up endpoints.
#[derive(Clone)]
struct StartingState {
    status: StartupStatus,
    metrics: Metrics,
}

/// The endpoints served until the worker is connected: `/healthz` 200,
/// `/readyz` 503 naming what is unreachable, `/metrics`; anything else 503.
pub fn starting_router(status: StartupStatus, metrics: Metrics) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(starting_readyz))
        .route("/metrics", get(starting_metrics))
        .fallback(|| async {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "starting: waiting for PostgreSQL and Redis (see /readyz)\n",
            )
        })
        .with_state(StartingState { status, metrics })
}

async fn starting_readyz(State(state): State<StartingState>) -> Response {
    let waiting = state.status.snapshot();
    let check = |error: Option<String>| match error {
        None => json!({"ok": true}),
        Some(e) => json!({"ok": false, "error": e}),
    };
    let body = json!({
        "status": "starting",
        "checks": {
            "database": check(waiting.database),
            "redis": check(waiting.redis),
        },
    });
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

async fn starting_metrics(State(state): State<StartingState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// The HTTP port, bound once for the whole life of the process: the
/// start-up endpoints and then the full ones serve the same socket, so
/// probes never meet a closed port in between.
pub struct HttpPort {
    listener: std::net::TcpListener,
    listen: String,
}

impl HttpPort {
    /// Binds `listen`.
    pub fn bind(listen: &str) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind(listen)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot listen on {listen} ({e}): free the port or set AUDIT_WORKER__HTTP__LISTEN"
                    ),
                )
            })?;
        tracing::info!(%listen, "HTTP endpoints listening");
        Ok(Self {
            listener,
            listen: listen.to_owned(),
        })
    }

    /// Serves `router` on the port until `stop` fires; the port stays
    /// bound afterwards for the next router.
    pub fn serve(
        &self,
        router: Router,
        stop: CancellationToken,
    ) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let listener = tokio::net::TcpListener::from_std(self.listener.try_clone()?)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", self.listen)))?;
        Ok(tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        }))
    }
}

/// What the worker needs from its dependencies, once they answer.
pub struct Connected {
    pub pool: Pool,
    pub partitions: Arc<Partitions>,
    pub redis_target: RedisTarget,
    pub commands: RedisConn,
}

/// Connects to PostgreSQL (migrating when `database.migrate_on_start`,
/// then creating the months' partitions) and to Redis, retrying each with
/// [`CONNECT_BACKOFF`] until both answer. Each dependency's outage is
/// logged when it begins and when it ends, with the count of failed
/// attempts. `Ok(None)` when `shutdown` fires first; `Err` for a failure
/// waiting cannot fix (see [`is_permanent`]).
pub async fn connect_when_available(
    config: &Config,
    status: &StartupStatus,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Connected>> {
    let mut db_log = OutageLog::new("PostgreSQL not available at start");
    let mut redis_log = OutageLog::new("Redis not available at start");
    let mut database: Option<(Pool, Arc<Partitions>)> = None;
    let mut redis: Option<(RedisTarget, RedisConn)> = None;
    let mut attempt = 0u32;
    loop {
        if database.is_none() {
            let connecting = tokio::select! {
                r = connect_database(config) => r,
                _ = shutdown.cancelled() => return Ok(None),
            };
            match connecting {
                Ok(connected) => {
                    db_log.recovered();
                    status.set_database(None);
                    database = Some(connected);
                }
                Err(e) if is_permanent(&e) => anyhow::bail!(e),
                Err(e) => {
                    db_log.failed(&e);
                    status.set_database(Some(e));
                }
            }
        }
        if redis.is_none() {
            let connecting = tokio::select! {
                r = connect_redis(config) => r,
                _ = shutdown.cancelled() => return Ok(None),
            };
            match connecting {
                Ok(connected) => {
                    redis_log.recovered();
                    status.set_redis(None);
                    redis = Some(connected);
                }
                Err(e) if is_permanent(&e) => anyhow::bail!(e),
                Err(e) => {
                    redis_log.failed(&e);
                    status.set_redis(Some(e));
                }
            }
        }
        if database.is_some() && redis.is_some() {
            break;
        }
        attempt += 1;
        tokio::select! {
            _ = tokio::time::sleep(CONNECT_BACKOFF.delay(attempt)) => {}
            _ = shutdown.cancelled() => return Ok(None),
        }
    }
    let (Some((pool, partitions)), Some((redis_target, commands))) = (database, redis) else {
        return Ok(None);
    };
    Ok(Some(Connected {
        pool,
        partitions,
        redis_target,
        commands,
    }))
}

/// One attempt at the database: pool and migrations.
async fn connect_database(config: &Config) -> Result<(Pool, Arc<Partitions>), String> {
    let pool = db::connect_pool(config).await.map_err(|e| e.to_string())?;
    if config.database.migrate_on_start {
        let applied = db::migrate(config).await.map_err(|e| e.to_string())?;
        if !applied.is_empty() {
            tracing::info!(?applied, "migrations applied");
        }
    }
    // Partitions for the whole accepted window are made in the background
    // (the upkeep task's first round starts at once), never in the
    // start-up path.
    let partitions = Arc::new(Partitions::new(std::time::Duration::from_millis(
        config.database.ddl_lock_timeout_ms,
    )));
    Ok((pool, partitions))
}

/// One attempt at Redis: finds it (through the sentinels or the cluster's
/// seed nodes when so configured) and PINGs it on a fresh connection
/// before opening the shared command connection.
async fn connect_redis(config: &Config) -> Result<(RedisTarget, RedisConn), String> {
    RedisTarget::connect(&config.redis)
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_certificates_and_credentials_stop_start_up_and_outages_do_not() {
        for permanent in [
            "database unreachable at localhost:5 (invalid peer certificate: UnknownIssuer): start PostgreSQL or set AUDIT_WORKER__DATABASE__URL",
            "database unreachable at h:5 (password authentication failed for user \"x\"): ...",
            "redis unreachable at h:6 (WRONGPASS invalid username-password pair): ...",
        ] {
            assert!(is_permanent(permanent), "{permanent}");
        }
        for outage in [
            "database unreachable at 127.0.0.1:1 (Connection refused (os error 111)): ...",
            "database unreachable at h:5 (database \"x\" does not exist): ...",
            "database unreachable at h:5 (the database system is starting up): ...",
            "redis unreachable at 127.0.0.1:1 (Connection refused (os error 111)): ...",
            "redis unreachable at h:6 (timed out): ...",
        ] {
            assert!(!is_permanent(outage), "{outage}");
        }
    }

    #[test]
    fn start_up_retries_back_off_from_half_a_second_to_thirty() {
        let secs: Vec<f64> = (1..=8)
            .map(|a| CONNECT_BACKOFF.nominal(a).as_secs_f64())
            .collect();
        assert_eq!(secs, vec![0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]);
    }
}
