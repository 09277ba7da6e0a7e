//! The HTTP surface for operators: liveness, readiness and metrics.
//!
//! Nothing here reveals secrets or event contents: checks report only
//! reachability, latency and error kinds.

use std::time::{Duration, Instant};

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use deadpool_postgres::Pool;
use redis::aio::ConnectionManager;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Metrics;

/// What the handlers need.
#[derive(Clone)]
pub struct HttpState {
    pub metrics: Metrics,
    pub redis: ConnectionManager,
    pub pool: Pool,
    /// Export downloads (`None`: the endpoint answers 403).
    pub exports: Option<crate::jobs::export::download::Downloads>,
}

/// The router: `/healthz`, `/readyz`, `/metrics`, and
/// `/exports/{id}/download` (signed export links).
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/exports/{id}/download", get(export_download))
        .with_state(state)
}

/// Serves the router on `listen` until `shutdown` fires.
pub async fn serve(
    listen: &str,
    state: HttpState,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot listen on {listen} ({e}): free the port or set AUDIT_WORKER__HTTP__LISTEN"
            ),
        )
    })?;
    tracing::info!(%listen, "HTTP endpoints listening");
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, router(state))
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    }))
}

/// Liveness: the process is up and serving.
async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// Readiness: Redis and PostgreSQL both answer within two seconds.
async fn readyz(State(state): State<HttpState>) -> Response {
    let (redis, db) = tokio::join!(check_redis(&state.redis), check_database(&state.pool));
    let ready = redis.0 && db.0;
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": { "redis": redis.1, "database": db.1 },
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Pings Redis; returns (ok, detail).
pub async fn check_redis(conn: &ConnectionManager) -> (bool, serde_json::Value) {
    let started = Instant::now();
    let mut conn = conn.clone();
    let result = tokio::time::timeout(
        CHECK_TIMEOUT,
        redis::cmd("PING").query_async::<String>(&mut conn),
    )
    .await;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    match result {
        Ok(Ok(_)) => (true, json!({"ok": true, "latency_ms": ms})),
        Ok(Err(e)) => (
            false,
            json!({"ok": false, "latency_ms": ms, "error": format!("{:?}", e.kind())}),
        ),
        Err(_) => (
            false,
            json!({"ok": false, "latency_ms": ms, "error": "timeout"}),
        ),
    }
}

/// Runs `SELECT 1` on a pooled connection; returns (ok, detail).
pub async fn check_database(pool: &Pool) -> (bool, serde_json::Value) {
    let started = Instant::now();
    let result = tokio::time::timeout(CHECK_TIMEOUT, async {
        let client = pool
            .get()
            .await
            .map_err(|e| crate::db::pool_error_cause(&e))?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| crate::db::root_cause(&e))?;
        Ok::<_, String>(())
    })
    .await;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    match result {
        Ok(Ok(())) => (true, json!({"ok": true, "latency_ms": ms})),
        Ok(Err(e)) => (false, json!({"ok": false, "latency_ms": ms, "error": e})),
        Err(_) => (
            false,
            json!({"ok": false, "latency_ms": ms, "error": "timeout"}),
        ),
    }
}

/// Streams an export's artifact for a valid signed link (403 otherwise).
async fn export_download(
    State(state): State<HttpState>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    crate::jobs::export::download::serve(state.exports.as_ref(), &id, &query).await
}

/// Prometheus text exposition.
async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
