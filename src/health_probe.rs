//! The database check behind `/readyz` and `/health/database`.
//!
//! Health requests must never compete with ingestion for connections: when
//! they shared the sink's pool, a flood of them (a load balancer, a
//! misconfigured prober) made the sink's `pool.get()` time out, which the
//! circuit breaker counted as failed writes, and ingestion stopped. So the
//! probe has its own pool of one connection, runs one query at a time, and
//! answers requests that arrive within [`PROBE_MAX_AGE`] of the last query
//! from that query's result: any number of health requests cost at most one
//! `SELECT 1` per interval.

use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use serde_json::json;
use tokio::sync::Mutex;

/// How long one probe result answers health requests.
pub const PROBE_MAX_AGE: Duration = Duration::from_millis(500);

/// How long a probe may take before it counts as failed.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The outcome of one probe: whether PostgreSQL answered, and the detail
/// shown to operators (latency, error kind; never the URL).
#[derive(Debug, Clone)]
pub struct ProbeResult {
    pub ok: bool,
    pub detail: serde_json::Value,
}

/// A rate-limited, single-flight `SELECT 1` on a dedicated connection.
pub struct DatabaseProbe {
    pool: Pool,
    /// The last result and when its query finished; the lock also makes
    /// concurrent requests wait for the query under way instead of
    /// starting their own.
    last: Mutex<Option<(Instant, ProbeResult)>>,
}

impl DatabaseProbe {
    /// A probe over `pool`, which should be its own (see
    /// [`crate::db::PoolRole::Health`]).
    pub fn new(pool: Pool) -> Self {
        Self {
            pool,
            last: Mutex::new(None),
        }
    }

    /// The database's health: the last result if it is recent enough,
    /// otherwise a new query (one at a time).
    pub async fn check(&self) -> ProbeResult {
        let mut last = self.last.lock().await;
        if let Some((at, result)) = last.as_ref() {
            if at.elapsed() < PROBE_MAX_AGE {
                return result.clone();
            }
        }
        let result = probe(&self.pool).await;
        *last = Some((Instant::now(), result.clone()));
        result
    }
}

/// Runs `SELECT 1` on a connection of `pool`, within [`PROBE_TIMEOUT`].
async fn probe(pool: &Pool) -> ProbeResult {
    let started = Instant::now();
    let result = tokio::time::timeout(PROBE_TIMEOUT, async {
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
    let (ok, detail) = match result {
        Ok(Ok(())) => (true, json!({"ok": true, "latency_ms": ms})),
        Ok(Err(e)) => (false, json!({"ok": false, "latency_ms": ms, "error": e})),
        Err(_) => (
            false,
            json!({"ok": false, "latency_ms": ms, "error": "timeout"}),
        ),
    };
    ProbeResult { ok, detail }
}
