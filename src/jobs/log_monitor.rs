//! The log monitor: periodically checks that the database's log extends
//! the last checkpoint published to the object store, as `verify` does,
//! and raises a security alert when it no longer does (the newest
//! snapshots, ledger entries or rows were deleted, or the head reset).

use std::time::Duration;

use crate::source::RedisConn;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::jobs::published;
use crate::telemetry::Metrics;

/// Alert rule name written to `alerts.stream`.
pub const RULE: &str = "log_truncated";

/// Starts the monitor unless `snapshot.monitor_interval_secs` is 0 or no
/// verifier key or store is configured (then it logs why and returns None).
pub fn spawn(
    config: &Config,
    pool: deadpool_postgres::Pool,
    redis: RedisConn,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let interval = config.snapshot.monitor_interval_secs;
    if interval == 0 {
        return None;
    }
    let verifier = match crate::jobs::snapshot::load_verifier(&config.snapshot) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "the log monitor is off: it needs the verifier key");
            return None;
        }
    };
    let storage = match crate::storage::open(&config.storage) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "the log monitor is off: the object store cannot be opened");
            return None;
        }
    };
    let origin = config.snapshot.origin.clone();
    let folder = published::folder(&config.snapshot.manifest_prefix, &origin);
    let page = config.snapshot.page_size;
    let (stream, max_len) = (config.alerts.stream.clone(), config.alerts.stream_max_len);
    Some(tokio::spawn(async move {
        let mut last_alert: Option<Vec<String>> = None;
        loop {
            let round = async {
                let Some(note) = published::latest(&storage, &folder)
                    .await
                    .map_err(|e| e.to_string())?
                else {
                    return Ok::<_, String>(Vec::new());
                };
                let mut client = pool.get().await.map_err(|e| e.to_string())?;
                published::check_extends(&mut client, &verifier, &origin, &note, page)
                    .await
                    .map_err(|e| e.to_string())
            };
            match round.await {
                Ok(findings) if findings.is_empty() => {
                    metrics.log_extends_published.set(1);
                    last_alert = None;
                }
                Ok(findings) => {
                    metrics.log_extends_published.set(0);
                    let details: Vec<String> = findings.iter().map(|f| f.detail.clone()).collect();
                    if last_alert.as_ref() != Some(&details) {
                        let message = details.join("; ");
                        tracing::error!(rule = RULE, %message, "SECURITY: the log no longer extends its last published checkpoint");
                        let now =
                            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                        let mut conn = redis.clone();
                        let sent: redis::RedisResult<String> = redis::cmd("XADD")
                            .arg(&stream)
                            .arg("MAXLEN")
                            .arg("~")
                            .arg(max_len)
                            .arg("*")
                            .arg("rule")
                            .arg(RULE)
                            .arg("kind")
                            .arg("log_integrity")
                            .arg("detected_at")
                            .arg(&now)
                            .arg("message")
                            .arg(&message)
                            .query_async(&mut conn)
                            .await;
                        match sent {
                            Ok(_) => {
                                metrics.security_alerts.with_label_values(&[RULE]).inc();
                                last_alert = Some(details);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot write the log alert; retrying next round")
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the log monitor could not check; retrying next round")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(interval)) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }))
}
