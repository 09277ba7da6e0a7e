//! The HTTP surface for operators: liveness, readiness and metrics.
//!
//! Nothing here reveals secrets or event contents: checks report only
//! reachability, latency and error kinds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::HashMap;

use crate::source::RedisConn;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use deadpool_postgres::Pool;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::health_probe::DatabaseProbe;
use crate::sink::{BreakerState, CircuitBreaker};
use crate::telemetry::Metrics;

/// What the handlers need.
#[derive(Clone)]
pub struct HttpState {
    pub metrics: Metrics,
    pub redis: RedisConn,
    /// The sink's pool: `/health/database` shows its state (how busy the
    /// ingest connections are); no health check takes one of them.
    pub pool: Pool,
    /// The database check, on its own connection.
    pub db_probe: Arc<DatabaseProbe>,
    pub breaker: CircuitBreaker,
    pub queue: QueueInfo,
    /// Export downloads (`None`: the endpoint answers 403).
    pub exports: Option<crate::jobs::export::download::Downloads>,
    /// The configuration in force (`/health` shows its version).
    pub config: crate::live::LiveConfig,
}

/// The stream and dead-letter keys `/health/queue` reports on.
#[derive(Debug, Clone)]
pub struct QueueInfo {
    /// Every shard's stream and dead-letter keys (one when not sharded).
    pub shards: Vec<crate::shards::ShardKeys>,
    pub group: String,
    pub alert_threshold: u64,
    pub alert_window: Duration,
}

/// The router: liveness, readiness, health detail, metrics, signed
/// download links (`/exports/{id}/download`, `/reports/{id}/{format}`) and
/// the verifiable log, read-only, in the C2SP tlog-tiles layout under
/// `/log/`.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/health", get(health))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/health/database", get(health_database))
        .route("/health/redis", get(health_redis))
        .route("/health/queue", get(health_queue))
        .route("/health/circuit-breaker", get(health_breaker))
        .route("/exports/{id}/download", get(export_download))
        .route("/reports/{id}/{format}", get(report_download))
        .route("/log/checkpoint", get(log_checkpoint))
        .route("/log/tile/{*path}", get(log_tile))
        .layer(axum::middleware::from_fn(refuse_request_bodies))
        .with_state(state)
}

/// Every endpoint is a GET without a body, so any request that announces a
/// body is refused before a handler runs: nobody can make the worker buffer
/// or drain uploads through its operator port. Header sizes are bounded by
/// hyper itself (about 400 KiB, then 431).
async fn refuse_request_bodies(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let headers = request.headers();
    let announces_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if announces_body {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            "these endpoints take no request body\n",
        )
            .into_response();
    }
    next.run(request).await
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

/// The worker's own state: the configuration in force (version = SHA-256
/// of the document, when it was loaded, and the restart-only settings the
/// document changed since start, which wait for a restart).
async fn health(State(state): State<HttpState>) -> impl IntoResponse {
    let applied = state.config.current();
    Json(json!({
        "status": "healthy",
        "config": {
            "version": applied.version,
            "loaded_at": applied.loaded_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "pending_restart": applied.pending_restart,
        },
    }))
}

/// Readiness: Redis and PostgreSQL both answer within two seconds and the
/// circuit breaker is not open.
async fn readyz(State(state): State<HttpState>) -> Response {
    let (redis, db) = tokio::join!(check_redis(&state.redis), state.db_probe.check());
    let db = (db.ok, db.detail);
    let breaker = state.breaker.state();
    let ready = redis.0 && db.0 && breaker != BreakerState::Open;
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": {
            "redis": redis.1,
            "database": db.1,
            "circuit_breaker": {"ok": breaker != BreakerState::Open, "state": breaker.as_str()},
        },
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
pub async fn check_redis(conn: &RedisConn) -> (bool, serde_json::Value) {
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

/// Overall status of one health check, as operators' tooling expects it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    Healthy,
    Degraded,
    Critical,
}

impl Health {
    fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Degraded => "degraded",
            Self::Critical => "critical",
        }
    }
}

/// A health answer: 200 unless critical (503), JSON with status, latency of
/// the check and details.
fn health_response(status: Health, started: Instant, details: serde_json::Value) -> Response {
    let code = if status == Health::Critical {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let body = json!({
        "status": status.as_str(),
        "latency_ms": started.elapsed().as_secs_f64() * 1000.0,
        "details": details,
    });
    (code, Json(body)).into_response()
}

/// `/health/database`: a query round trip (on the probe's own connection,
/// at most one per [`crate::health_probe::PROBE_MAX_AGE`]) and the state of
/// the sink's pool.
async fn health_database(State(state): State<HttpState>) -> Response {
    let started = Instant::now();
    let probe = state.db_probe.check().await;
    let (ok, detail) = (probe.ok, probe.detail);
    let pool = state.pool.status();
    let details = json!({
        "check": detail,
        "pool": {"size": pool.size, "available": pool.available, "max_size": pool.max_size, "waiting": pool.waiting},
    });
    let status = if !ok {
        Health::Critical
    } else if pool.waiting > 0 {
        Health::Degraded
    } else {
        Health::Healthy
    };
    health_response(status, started, details)
}

/// `/health/redis`: a PING round trip (critical while Redis is down).
async fn health_redis(State(state): State<HttpState>) -> Response {
    let started = Instant::now();
    let (ok, detail) = check_redis(&state.redis).await;
    let status = if ok {
        Health::Healthy
    } else {
        Health::Critical
    };
    health_response(status, started, detail)
}

/// `/health/circuit-breaker`: closed is healthy, half-open degraded, open critical.
async fn health_breaker(State(state): State<HttpState>) -> Response {
    let started = Instant::now();
    let b = &state.breaker;
    let status = match b.state() {
        BreakerState::Closed => Health::Healthy,
        BreakerState::HalfOpen => Health::Degraded,
        BreakerState::Open => Health::Critical,
    };
    let details = json!({
        "state": b.state().as_str(),
        "transitions": b.transitions(),
        "recovery_timeout_secs": b.recovery_timeout().as_secs(),
    });
    health_response(status, started, details)
}

/// `/health/queue`: pending entries, consumer lag, stream and dead-letter
/// lengths, and dead letters written recently (degraded at the alert
/// threshold).
async fn health_queue(State(state): State<HttpState>) -> Response {
    let started = Instant::now();
    let mut conn = state.redis.clone();
    match tokio::time::timeout(CHECK_TIMEOUT, queue_stats(&mut conn, &state.queue)).await {
        Ok(Ok(stats)) => {
            let status = if stats.recent_dead_letters >= state.queue.alert_threshold {
                Health::Degraded
            } else {
                Health::Healthy
            };
            health_response(
                status,
                started,
                serde_json::to_value(&stats).unwrap_or_default(),
            )
        }
        Ok(Err(e)) => health_response(
            Health::Critical,
            started,
            json!({"error": format!("{:?}", e.kind())}),
        ),
        Err(_) => health_response(Health::Critical, started, json!({"error": "timeout"})),
    }
}

/// What `/health/queue` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueueStats {
    pub stream: String,
    pub stream_length: u64,
    pub pending: u64,
    /// Entries not yet delivered to the group (Redis 7 `lag`), if known.
    pub lag: Option<u64>,
    pub dead_letters: u64,
    pub recent_dead_letters: u64,
    pub alert_threshold: u64,
    pub alert_window_secs: u64,
    /// Each shard's figures when the stream is sharded (the fields above
    /// are then their sums, `lag` only when every shard reports it).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<QueueStats>,
}

/// Reads the queue statistics from Redis: the one stream's, or with
/// shards every shard's and their sums.
pub async fn queue_stats(conn: &mut RedisConn, q: &QueueInfo) -> redis::RedisResult<QueueStats> {
    let mut per_shard = Vec::with_capacity(q.shards.len());
    for shard in &q.shards {
        per_shard.push(shard_stats(conn, q, shard).await?);
    }
    if per_shard.len() == 1 {
        return Ok(per_shard.remove(0));
    }
    let sum = |f: fn(&QueueStats) -> u64| per_shard.iter().map(f).sum::<u64>();
    Ok(QueueStats {
        stream: q
            .shards
            .iter()
            .map(|s| s.stream.as_str())
            .collect::<Vec<_>>()
            .join(","),
        stream_length: sum(|s| s.stream_length),
        pending: sum(|s| s.pending),
        lag: per_shard.iter().map(|s| s.lag).sum(),
        dead_letters: sum(|s| s.dead_letters),
        recent_dead_letters: sum(|s| s.recent_dead_letters),
        alert_threshold: q.alert_threshold,
        alert_window_secs: q.alert_window.as_secs(),
        shards: per_shard,
    })
}

/// One shard's statistics. Its stream and dead letters share a hash tag,
/// so on a cluster the pipeline goes to one node.
async fn shard_stats(
    conn: &mut RedisConn,
    q: &QueueInfo,
    shard: &crate::shards::ShardKeys,
) -> redis::RedisResult<QueueStats> {
    let window_start = chrono::Utc::now().timestamp_millis() - q.alert_window.as_millis() as i64;
    let (stream_length, dead_letters, pending, groups, recent): (
        u64,
        u64,
        redis::Value,
        redis::Value,
        redis::Value,
    ) = redis::pipe()
        .cmd("XLEN")
        .arg(&shard.stream)
        .cmd("XLEN")
        .arg(&shard.dlq)
        .cmd("XPENDING")
        .arg(&shard.stream)
        .arg(&q.group)
        .cmd("XINFO")
        .arg("GROUPS")
        .arg(&shard.stream)
        .cmd("XRANGE")
        .arg(&shard.dlq)
        .arg(format!("{}-0", window_start.max(0)))
        .arg("+")
        .arg("COUNT")
        .arg(q.alert_threshold.max(1))
        .query_async(conn)
        .await
        .or_else(|e| {
            // No stream yet (XPENDING/XINFO fail on a missing key): all zero.
            if e.to_string().contains("no such key") || e.code() == Some("NOGROUP") {
                Ok((
                    0,
                    0,
                    redis::Value::Nil,
                    redis::Value::Nil,
                    redis::Value::Nil,
                ))
            } else {
                Err(e)
            }
        })?;
    let pending = match pending {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(n)) => *n as u64,
            _ => 0,
        },
        _ => 0,
    };
    let recent = match recent {
        redis::Value::Array(items) => items.len() as u64,
        _ => 0,
    };
    Ok(QueueStats {
        stream: shard.stream.clone(),
        stream_length,
        pending,
        lag: group_field(&groups, &q.group, "lag"),
        dead_letters,
        recent_dead_letters: recent,
        alert_threshold: q.alert_threshold,
        alert_window_secs: q.alert_window.as_secs(),
        shards: Vec::new(),
    })
}

/// An integer field of one group in an XINFO GROUPS reply.
fn group_field(v: &redis::Value, group: &str, field: &str) -> Option<u64> {
    let redis::Value::Array(groups) = v else {
        return None;
    };
    groups.iter().find_map(|g| {
        let pairs: Vec<&redis::Value> = match g {
            redis::Value::Array(items) => items.iter().collect(),
            _ => return None,
        };
        let get = |name: &str| {
            pairs.chunks(2).find_map(|kv| match kv {
                [redis::Value::BulkString(k), v] if k == name.as_bytes() => Some(*v),
                [redis::Value::SimpleString(k), v] if k == name => Some(*v),
                _ => None,
            })
        };
        match get("name") {
            Some(redis::Value::BulkString(n)) if n == group.as_bytes() => {}
            _ => return None,
        }
        match get(field) {
            Some(redis::Value::Int(n)) => u64::try_from(*n).ok(),
            _ => None,
        }
    })
}

/// Streams an export's artifact for a valid signed link (403 otherwise).
async fn export_download(
    State(state): State<HttpState>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    crate::jobs::export::download::serve(state.exports.as_ref(), &id, &query).await
}

/// Streams a report's file for a valid signed link (403 otherwise).
async fn report_download(
    State(state): State<HttpState>,
    Path((id, format)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    crate::jobs::report::download::serve(state.exports.as_ref(), &id, &format, &query).await
}

/// The latest signed checkpoint (C2SP signed note), 404 before the first.
async fn log_checkpoint(State(state): State<HttpState>) -> Response {
    let result = async {
        let client = state.pool.get().await.map_err(|e| e.to_string())?;
        crate::jobs::tile_store::latest_checkpoint(&**client)
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    match result {
        Ok(Some(note)) => (
            [
                (
                    axum::http::header::CONTENT_TYPE,
                    "text/plain; charset=utf-8",
                ),
                (axum::http::header::CACHE_CONTROL, "no-cache"),
            ],
            note,
        )
            .into_response(),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            "no checkpoint yet: no snapshot was sealed\n",
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the checkpoint");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n").into_response()
        }
    }
}

/// A tile (`/log/tile/<L>/<N>[.p/<W>]`) or entry bundle
/// (`/log/tile/entries/<N>[.p/<W>]`). Tiles never change once served
/// (a partial tile of width W stays a prefix), so they are cacheable.
async fn log_tile(State(state): State<HttpState>, Path(path): Path<String>) -> Response {
    let Some(request) = crate::integrity::tiles::parse_tile_path(&path) else {
        return (StatusCode::NOT_FOUND, "not a tlog-tiles path\n").into_response();
    };
    let result = async {
        let client = state.pool.get().await.map_err(|e| e.to_string())?;
        crate::jobs::tile_store::tile_bytes(&**client, &request)
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    match result {
        Ok(Some(bytes)) => (
            [
                (axum::http::header::CONTENT_TYPE, "application/octet-stream"),
                (
                    axum::http::header::CACHE_CONTROL,
                    "public, max-age=31536000, immutable",
                ),
            ],
            bytes,
        )
            .into_response(),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            "the log does not hold this tile yet\n",
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read a tile");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n").into_response()
        }
    }
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
