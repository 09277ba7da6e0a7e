//! Wiring: builds the pool, sink, sources and HTTP server from the
//! configuration, runs them until shutdown, and shuts down in order
//! (stop reading, flush the open batch, acknowledge, exit).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db;
use crate::http::{self, HttpState, QueueInfo};
use crate::jobs::snapshot::{self, Snapshotter};
use crate::jobs::JobHandlers;
use crate::live::reloader::{ConfigMetrics, Reloader};
use crate::live::LiveConfig;
use crate::partitions::{PartitionWindow, Partitions};
use crate::processor::Processor;
use crate::sink::{PostgresSink, SinkSettings};
use crate::source::{bullmq::BullmqSource, stream::StreamSource};
pub use crate::startup::ConfigurationError;
use crate::startup::{self, Connected, HttpPort, StartupStatus};
use crate::telemetry::Metrics;

/// Runs the worker with a configuration that is never reloaded (tests and
/// embedders; `audit-worker run` uses [`run_live`]).
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let live = LiveConfig::fixed(config).map_err(|e| ConfigurationError(e.to_string()))?;
    run_live(live, None, shutdown).await
}

/// Runs the worker until `shutdown` fires (or a fatal start-up error),
/// with the configuration `live` holds; `reloader`, when given, replaces
/// it on SIGHUP and by poll (see [`crate::live`]).
///
/// The HTTP port is served from the start; while PostgreSQL or Redis
/// cannot be reached the worker waits for them (see [`crate::startup`])
/// instead of exiting. Settings that can never work fail at once with a
/// [`ConfigurationError`].
pub async fn run_live(
    live: LiveConfig,
    reloader: Option<Reloader>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let applied = live.current();
    let config = applied.config.clone();
    let policy = applied.policy.clone();
    if policy.hmac_keys.is_empty() {
        tracing::warn!("no HMAC keys configured: event signatures are stored but not verified (set integrity.hmac_keys)");
    } else {
        tracing::info!(keys = ?policy.hmac_keys.ids(), "HMAC keys loaded");
    }
    tracing::info!(version = applied.short_version(), "configuration loaded");
    let config_metrics = ConfigMetrics::register(&metrics, &applied);
    let reload_task =
        reloader.map(|r| tokio::spawn(r.with_metrics(config_metrics).run(shutdown.clone())));

    let port = HttpPort::bind(&config.http.listen)?;
    let starting_stop = CancellationToken::new();
    let status = StartupStatus::default();
    let starting_http = port.serve(
        startup::starting_router(status.clone(), metrics.clone()),
        starting_stop.clone(),
    )?;
    let Some(Connected {
        pool,
        partitions,
        redis_target,
        commands,
    }) = (match startup::connect_when_available(&config, &status, &shutdown).await {
        Ok(connected) => connected,
        Err(e) => {
            starting_stop.cancel();
            let _ = starting_http.await;
            return Err(e);
        }
    })
    else {
        starting_stop.cancel();
        let _ = starting_http.await;
        tracing::info!("stopped before PostgreSQL and Redis were reachable");
        return Ok(());
    };
    let upkeep = tokio::spawn(partition_upkeep(
        pool.clone(),
        partitions.clone(),
        PartitionWindow::from_config(&config),
        config.database.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));

    // The sink and the health checks have pools of their own (see
    // db::PoolRole): neither can take the other's connections, nor jobs'.
    let sink_pool = db::build_pool(&config, db::PoolRole::Sink)?;
    let db_probe = Arc::new(crate::health_probe::DatabaseProbe::new(db::build_pool(
        &config,
        db::PoolRole::Health,
    )?));
    let sink = PostgresSink::spawn(
        sink_pool.clone(),
        partitions,
        SinkSettings::from_config(&config.sink).with_personal_fields(
            crate::integrity::record::PersonalFields::with_extra(&config.snapshot.personal_fields)
                .map_err(|e| anyhow::anyhow!("snapshot.personal_fields: {e}"))?,
        ),
        live.clone(),
        metrics.clone(),
        shutdown.clone(),
    );
    let queue = QueueInfo {
        shards: crate::shards::shard_keys(&config),
        group: config.stream.group.clone(),
        alert_threshold: config.dlq.alert_threshold,
        alert_window: Duration::from_secs(config.dlq.alert_window_secs),
    };
    let exports = crate::jobs::export::ExportService::new(
        &config,
        pool.clone(),
        commands.clone(),
        metrics.clone(),
        Some(live.clone()),
    )?;

    let reports = crate::jobs::report::ReportService::new(
        &config,
        pool.clone(),
        commands.clone(),
        metrics.clone(),
        Some(live.clone()),
    )?;

    let http_stop = CancellationToken::new();
    // The start-up endpoints hand the port over to the full ones.
    starting_stop.cancel();
    let _ = starting_http.await;
    let http_task = port.serve(
        http::router(HttpState {
            metrics: metrics.clone(),
            redis: commands.clone(),
            pool: sink_pool,
            db_probe,
            breaker: sink.handle().breaker().clone(),
            queue: queue.clone(),
            exports: Some(exports.downloads.clone()),
            config: live.clone(),
        }),
        http_stop.clone(),
    )?;
    // The compliance API, on its own listener, when api.listen is set. Its
    // counters are registered either way, so /metrics always shows them.
    let api_metrics = crate::api::metrics::ApiMetrics::register(&metrics);
    let api_task = if config.api.enabled() {
        Some(
            crate::api::serve(
                &live,
                pool.clone(),
                exports.handler.clone(),
                reports.handler.clone(),
                exports.downloads.clone(),
                api_metrics,
                http_stop.clone(),
            )
            .await?,
        )
    } else {
        None
    };
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
    let (alerts, alert_task) = crate::alerts::spawn(&live, commands.clone(), metrics.clone());

    // Truncation and rollback of the verifiable log, checked periodically.
    let log_monitor = crate::jobs::log_monitor::spawn(
        &config,
        pool.clone(),
        commands.clone(),
        metrics.clone(),
        shutdown.clone(),
    );

    // Dropping partitions past their retention, when enabled.
    let retention = crate::jobs::retention::spawn(
        &config.retention,
        &config.database.schema,
        pool.clone(),
        crate::jobs::internal_event::EventRecorder::new(&config, commands.clone())
            .following(live.clone()),
        metrics.clone(),
        shutdown.clone(),
    );

    // Job kinds register their handlers here (export, snapshot, report,
    // GDPR access and erasure).
    let access = Arc::new(crate::jobs::gdpr::access::AccessHandler::new(
        exports.handler.clone(),
        config.gdpr.subject_paths.clone(),
    ));
    let mut job_handlers = JobHandlers {
        export: Some(exports.handler.clone()),
        report: Some(reports.handler.clone()),
        gdpr_access: Some(access.clone()),
        gdpr_erase: erase_handler(&config, &pool, &commands, &metrics, &live)?,
        ..JobHandlers::default()
    };
    let export_tasks = exports.spawn(&config.export, shutdown.clone());
    let report_task = reports.spawn(&config, shutdown.clone());
    let snapshot_task = match snapshot_executor(&config, &pool, &commands, &metrics, &live)? {
        Some(snapshotter) => {
            job_handlers.snapshot = Some(snapshotter.clone());
            Some(tokio::spawn(snapshotter.run_executor(shutdown.clone())))
        }
        None => None,
    };
    let processor = Processor::new(
        live.clone(),
        sink.handle(),
        job_handlers.clone(),
        metrics.clone(),
        alerts,
        shutdown.clone(),
    );

    let mut sources = tokio::task::JoinSet::new();
    if config.stream.enabled {
        let stream = StreamSource::new(
            &config,
            redis_target.clone(),
            commands.clone(),
            processor.clone(),
        );
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
    if let Some(task) = report_task {
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
    if let Some(task) = reload_task {
        let _ = task.await;
    }
    if let Some(task) = retention {
        let _ = task.await;
    }
    http_stop.cancel();
    let _ = http_task.await;
    if let Some(task) = api_task {
        let _ = task.await;
    }
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
    redis: crate::source::RedisConn,
    queue: QueueInfo,
    gauges: QueueGauges,
    shutdown: CancellationToken,
) {
    let mut alerting = false;
    loop {
        let mut conn = redis.clone();
        if let Ok(stats) = http::queue_stats(&mut conn, &queue).await {
            // One gauge per shard stream (the stream itself when unsharded).
            for shard in stats
                .shards
                .iter()
                .chain(stats.shards.is_empty().then_some(&stats))
            {
                let labels = ["stream", shard.stream.as_str()];
                let lag = shard.lag.or(gauges
                    .delete_acked
                    .then(|| shard.stream_length.saturating_sub(shard.pending)));
                gauges
                    .metrics
                    .queue_pending
                    .with_label_values(&labels)
                    .set(shard.pending as i64);
                if let Some(lag) = lag {
                    gauges
                        .metrics
                        .queue_lag
                        .with_label_values(&labels)
                        .set(lag as i64);
                }
            }
            let over = stats.recent_dead_letters >= queue.alert_threshold;
            if over && !alerting {
                tracing::warn!(
                    recent = stats.recent_dead_letters,
                    window_secs = queue.alert_window.as_secs(),
                    dlq = %queue.shards.iter().map(|s| s.dlq.as_str()).collect::<Vec<_>>().join(","),
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

/// The `gdpr.erase` handler, when `gdpr.pseudonym_key` is set (without it
/// such requests are dead-lettered as `unknown_kind`, the error naming the
/// setting).
fn erase_handler(
    config: &Config,
    pool: &deadpool_postgres::Pool,
    redis: &crate::source::RedisConn,
    metrics: &Metrics,
    live: &LiveConfig,
) -> anyhow::Result<Option<Arc<dyn crate::jobs::JobHandler>>> {
    use crate::jobs::gdpr::{erase::Eraser, erase_job::EraseHandler};
    if let Err(e) = config.gdpr.pseudonym_key() {
        tracing::info!(reason = %e, "gdpr.erase requests from the queue are dead-lettered as unknown_kind");
        return Ok(None);
    }
    let storage = crate::storage::open(&config.storage)?;
    let mut eraser = Eraser::from_config(config, redis.clone(), storage)?;
    eraser.recorder = eraser.recorder.following(live.clone());
    Ok(Some(Arc::new(EraseHandler::new(
        Arc::new(eraser),
        pool.clone(),
        config.export.queue_scope(),
        Some(metrics.clone()),
    ))))
}

/// The snapshot executor, when `snapshot.enabled` and a signing key is
/// configured (without a key the worker runs but does not snapshot).
fn snapshot_executor(
    config: &Config,
    pool: &deadpool_postgres::Pool,
    redis: &crate::source::RedisConn,
    metrics: &Metrics,
    live: &LiveConfig,
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
            .following(live.clone())
            .with_metrics(metrics.clone()),
    )))
}

/// Creates the partitions of every month an accepted event can fall in: at
/// start, then every `partition_upkeep_interval_secs` (a minute after a
/// round that left months undone), on one replica at a time (see
/// [`crate::lease`]). Each month is its own short DDL transaction under
/// `ddl_lock_timeout_ms`, so upkeep never holds up inserts.
async fn partition_upkeep(
    pool: deadpool_postgres::Pool,
    partitions: Arc<Partitions>,
    window: PartitionWindow,
    database: crate::config::DatabaseConfig,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    const TASK: &str = "partition_upkeep";
    const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(60);
    let interval = Duration::from_secs(database.partition_upkeep_interval_secs);
    for result in ["ran", "skipped", "failed"] {
        metrics.periodic_runs.with_label_values(&[TASK, result]);
    }
    let mut outage = crate::outage::OutageLog::new("partition upkeep failed");
    let mut next = Duration::ZERO;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = shutdown.cancelled() => return,
        }
        let partitions = partitions.clone();
        let result = crate::lease::run_exclusive(&pool, &database.schema, TASK, |client| {
            Box::pin(async move {
                let failures = partitions
                    .ensure_window(client, &window, chrono::Utc::now())
                    .await
                    .map_err(|e| db::root_cause(&e))?;
                match failures.iter().next() {
                    None => Ok(()),
                    Some((month, cause)) => Err(format!(
                        "{} month(s) not created, e.g. {month}: {cause}",
                        failures.len()
                    )),
                }
            })
        })
        .await;
        let outcome = match result {
            Ok(crate::lease::Exclusive::Ran(())) => {
                outage.recovered();
                "ran"
            }
            Ok(crate::lease::Exclusive::Skipped) => {
                outage.recovered();
                "skipped"
            }
            Err(e) => {
                outage.failed(&e);
                "failed"
            }
        };
        next = if outcome == "failed" {
            interval.min(RETRY_AFTER_FAILURE)
        } else {
            interval
        };
        metrics
            .periodic_runs
            .with_label_values(&[TASK, outcome])
            .inc();
    }
}

/// Resolves when SIGTERM or SIGINT arrives (see [`crate::shutdown`]).
pub use crate::shutdown::signal as shutdown_signal;
