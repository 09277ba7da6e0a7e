//! Wiring: builds the pool, sink, sources and HTTP server from the
//! configuration, runs them until shutdown, and shuts down in order
//! (stop reading, flush the open batch, acknowledge, exit).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db::{self, Partitions};
use crate::http::{self, HttpState, QueueInfo};
use crate::jobs::snapshot::{self, Snapshotter};
use crate::jobs::JobHandlers;
use crate::processor::Processor;
use crate::sink::{PostgresSink, SinkSettings};
use crate::source::{self, bullmq::BullmqSource, stream::StreamSource};
use crate::telemetry::Metrics;

/// Runs the worker until `shutdown` fires (or a fatal start-up error).
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let policy = Arc::new(config.validation_policy()?);
    if policy.hmac_keys.is_empty() {
        tracing::warn!("no HMAC keys configured: event signatures are stored but not verified (set integrity.hmac_keys)");
    } else {
        tracing::info!(keys = ?policy.hmac_keys.ids(), "HMAC keys loaded");
    }

    let pool = db::connect_pool(&config).await?;
    if config.database.migrate_on_start {
        let applied = db::migrate(&config).await?;
        if !applied.is_empty() {
            tracing::info!(?applied, "migrations applied");
        }
    }
    let partitions = Arc::new(Partitions::default());
    {
        let client = pool
            .get()
            .await
            .context("getting a connection for partition upkeep")?;
        partitions
            .ensure_ahead(&client, config.database.partitions_ahead_months)
            .await
            .context("creating monthly partitions (did `audit-worker migrate` run?)")?;
    }
    let upkeep = tokio::spawn(partition_upkeep(
        pool.clone(),
        partitions.clone(),
        config.database.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));

    let client = source::redis_client(&config.redis)?;
    let commands = source::command_connection(&client, &config.redis).await?;

    let sink = PostgresSink::spawn(
        pool.clone(),
        partitions,
        SinkSettings::from_config(&config.sink).with_personal_fields(
            crate::integrity::record::PersonalFields::with_extra(&config.snapshot.personal_fields)
                .map_err(|e| anyhow::anyhow!("snapshot.personal_fields: {e}"))?,
        ),
        metrics.clone(),
        shutdown.clone(),
    );
    let queue = QueueInfo {
        stream_key: config.stream.key.clone(),
        group: config.stream.group.clone(),
        dlq_key: config.dlq.key.clone(),
        alert_threshold: config.dlq.alert_threshold,
        alert_window: Duration::from_secs(config.dlq.alert_window_secs),
    };
    let exports = crate::jobs::export::ExportService::new(
        &config,
        pool.clone(),
        commands.clone(),
        metrics.clone(),
    )?;

    let http_stop = CancellationToken::new();
    let http_task = http::serve(
        &config.http.listen,
        HttpState {
            metrics: metrics.clone(),
            redis: commands.clone(),
            pool: pool.clone(),
            breaker: sink.handle().breaker().clone(),
            queue: queue.clone(),
            exports: Some(exports.downloads.clone()),
        },
        http_stop.clone(),
    )
    .await?;
    let dlq_watch = tokio::spawn(watch_dead_letters(
        commands.clone(),
        queue,
        QueueGauges {
            metrics: metrics.clone(),
            interval: Duration::from_secs(config.telemetry.queue_stats_interval_secs),
            delete_acked: config.stream.delete_acked,
        },
        shutdown.clone(),
    ));
    // Security alert rules, evaluated off the ingestion path.
    let (alerts, alert_task) =
        crate::alerts::spawn(&config.alerts, commands.clone(), metrics.clone());

    // Truncation and rollback of the verifiable log, checked periodically.
    let log_monitor = crate::jobs::log_monitor::spawn(
        &config,
        pool.clone(),
        commands.clone(),
        metrics.clone(),
        shutdown.clone(),
    );

    // Job kinds register their handlers here (export, snapshot).
    let mut job_handlers = JobHandlers {
        export: Some(exports.handler.clone()),
        ..JobHandlers::default()
    };
    let export_tasks = exports.spawn(&config.export, shutdown.clone());
    let snapshot_task = match snapshot_executor(&config, &pool, &commands, &metrics)? {
        Some(snapshotter) => {
            job_handlers.snapshot = Some(snapshotter.clone());
            Some(tokio::spawn(snapshotter.run_executor(shutdown.clone())))
        }
        None => None,
    };
    let processor = Processor::new(
        policy.clone(),
        sink.handle(),
        job_handlers.clone(),
        metrics.clone(),
        alerts,
        shutdown.clone(),
    );

    let mut sources = tokio::task::JoinSet::new();
    if config.stream.enabled {
        let stream =
            StreamSource::new(&config, client.clone(), commands.clone(), processor.clone());
        sources.spawn(stream.run());
    }
    if config.bullmq.enabled {
        let bullmq = BullmqSource::new(&config, commands.clone(), processor.clone());
        sources.spawn(bullmq.run());
    }
    // Only the sources may keep sink handles now: once they stop, the sink
    // sees its queue close, flushes and ends.
    drop(processor);
    tracing::info!("audit-worker running");

    while let Some(r) = sources.join_next().await {
        if let Err(e) = r {
            tracing::error!(error = %e, "a source task failed");
        }
    }
    tracing::info!("sources stopped; flushing the sink");
    sink.finish().await;
    for task in export_tasks {
        let _ = task.await;
    }
    if let Some(task) = alert_task {
        // Every tap went with the sources: the evaluator drains and ends.
        let _ = task.await;
    }
    let _ = upkeep.await;
    let _ = dlq_watch.await;
    if let Some(task) = snapshot_task {
        let _ = task.await;
    }
    if let Some(task) = log_monitor {
        let _ = task.await;
    }
    http_stop.cancel();
    let _ = http_task.await;
    tracing::info!("audit-worker stopped cleanly");
    Ok(())
}

/// Where the periodic queue statistics go.
struct QueueGauges {
    metrics: Metrics,
    interval: Duration,
    /// With `stream.delete_acked` the stream holds only undelivered and
    /// pending entries, so lag = length - pending when Redis cannot report
    /// it (XINFO `lag` is nil once entries were deleted).
    delete_acked: bool,
}

/// Every `telemetry.queue_stats_interval_secs`: updates the queue lag and
/// pending gauges, and logs a warning when dead letters reach the alert
/// threshold within the window (once per crossing, not on every check), so
/// a flood of rejected events is noticed even without dashboards.
async fn watch_dead_letters(
    redis: redis::aio::ConnectionManager,
    queue: QueueInfo,
    gauges: QueueGauges,
    shutdown: CancellationToken,
) {
    let mut alerting = false;
    loop {
        let mut conn = redis.clone();
        if let Ok(stats) = http::queue_stats(&mut conn, &queue).await {
            let labels = ["stream", queue.stream_key.as_str()];
            let lag = stats.lag.or(gauges
                .delete_acked
                .then(|| stats.stream_length.saturating_sub(stats.pending)));
            gauges
                .metrics
                .queue_pending
                .with_label_values(&labels)
                .set(stats.pending as i64);
            if let Some(lag) = lag {
                gauges
                    .metrics
                    .queue_lag
                    .with_label_values(&labels)
                    .set(lag as i64);
            }
            let over = stats.recent_dead_letters >= queue.alert_threshold;
            if over && !alerting {
                tracing::warn!(
                    recent = stats.recent_dead_letters,
                    window_secs = queue.alert_window.as_secs(),
                    dlq = %queue.dlq_key,
                    "dead letters reached the alert threshold: inspect them with `audit-worker dlq list`"
                );
            } else if !over && alerting {
                tracing::info!("dead letters back under the alert threshold");
            }
            alerting = over;
        }
        tokio::select! {
            _ = tokio::time::sleep(gauges.interval) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// The snapshot executor, when `snapshot.enabled` and a signing key is
/// configured (without a key the worker runs but does not snapshot).
fn snapshot_executor(
    config: &Config,
    pool: &deadpool_postgres::Pool,
    redis: &redis::aio::ConnectionManager,
    metrics: &Metrics,
) -> anyhow::Result<Option<Arc<Snapshotter>>> {
    if !config.snapshot.enabled {
        return Ok(None);
    }
    let Some(signer) = snapshot::load_signer(&config.snapshot)? else {
        tracing::warn!("snapshot.enabled but no signing key: snapshots are off (set AUDIT_WORKER__SNAPSHOT__SIGNING_KEY or snapshot.signing_key_file; `audit-worker keygen` makes one)");
        return Ok(None);
    };
    let storage = crate::storage::open(&config.storage)?;
    Ok(Some(Arc::new(
        Snapshotter::new(config, pool.clone(), signer, storage, Some(redis.clone()))
            .with_metrics(metrics.clone()),
    )))
}

/// Creates next months' partitions every `partition_upkeep_interval_secs`,
/// on one replica at a time (see [`crate::lease`]).
async fn partition_upkeep(
    pool: deadpool_postgres::Pool,
    partitions: Arc<Partitions>,
    database: crate::config::DatabaseConfig,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    const TASK: &str = "partition_upkeep";
    let ahead = database.partitions_ahead_months;
    for result in ["ran", "skipped", "failed"] {
        metrics.periodic_runs.with_label_values(&[TASK, result]);
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(database.partition_upkeep_interval_secs)) => {}
            _ = shutdown.cancelled() => return,
        }
        let partitions = partitions.clone();
        let result = crate::lease::run_exclusive(&pool, &database.schema, TASK, |client| {
            Box::pin(async move {
                partitions
                    .ensure_ahead(client, ahead)
                    .await
                    .map_err(|e| db::root_cause(&e))
            })
        })
        .await;
        let outcome = match result {
            Ok(crate::lease::Exclusive::Ran(())) => "ran",
            Ok(crate::lease::Exclusive::Skipped) => "skipped",
            Err(e) => {
                tracing::warn!(error = %e, "partition upkeep failed; will retry at the next interval");
                "failed"
            }
        };
        metrics
            .periodic_runs
            .with_label_values(&[TASK, outcome])
            .inc();
    }
}

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; shutting down"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
