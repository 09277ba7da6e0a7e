//! Logging and tracing set-up, and the Prometheus metrics registry.
//!
//! Metric names follow Prometheus conventions (`_total` counters,
//! `_seconds` histograms) and are documented in the README; label values
//! are drawn from small fixed sets (sources, outcomes, reason codes, job
//! kinds, configured queue and rule names), never from event contents.
//!
//! Tracing: spans go to the log (JSON lines or text) and, only when
//! `[telemetry] otlp_endpoint` is set, to an OpenTelemetry collector over
//! OTLP/HTTP. The OpenTelemetry SDK ignores `OTEL_SDK_DISABLED`, so the
//! layer is simply not built when no endpoint is configured: nothing of
//! OpenTelemetry runs then.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use std::sync::Arc;

use crate::config::LogConfig;
use crate::dlq::RejectReason;

/// Job kinds that export job metrics (label `kind`); pre-registered so the
/// series exist (at 0) before the first job, as dashboards and alert rules
/// expect.
pub const JOB_KINDS: [&str; 5] = ["export", "snapshot", "report", "gdpr_access", "gdpr_erase"];

/// Redis operations counted in `audit_worker_redis_errors_total`
/// (pre-registered at 0; other sources may add their own).
pub const REDIS_OPERATIONS: [&str; 8] = [
    "connect",
    "xgroup_create",
    "xreadgroup",
    "xautoclaim",
    "xpending",
    "xack",
    "xclaim",
    "xadd_alert",
];

/// Job statuses (label `status` of `audit_worker_jobs_total`): `accepted`
/// and `rejected` are counted by the processor when a request is handed to
/// its kind's handler; `completed` and `failed` by the kind's executor.
pub const JOB_STATUSES: [&str; 4] = ["accepted", "rejected", "completed", "failed"];

/// Every metric the worker exports, registered once in its own registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Events by source (`stream`, `bullmq`) and outcome (`inserted`,
    /// `duplicate`, `dead_lettered`, `deferred`).
    pub events: IntCounterVec,
    /// Dead letters written, by reason code.
    pub dead_letters: IntCounterVec,
    /// Rows per database batch.
    pub batch_size: Histogram,
    /// Time of one batch insert statement, by result (`ok`, `error`).
    pub insert_duration: HistogramVec,
    /// Database write attempts that failed transiently and were retried.
    pub sink_retries: IntCounter,
    /// Stream entries that were pending on a consumer but had been deleted
    /// or trimmed (producers' MAXLEN) before they were stored: acknowledged
    /// with nothing to store, counted and logged with their ids.
    pub stream_trimmed: IntCounter,
    /// Redis commands that failed (the worker reconnects and goes on).
    pub redis_errors: IntCounterVec,
    /// Build information (value 1, labels carry the version).
    pub build_info: IntGaugeVec,
    /// Circuit breaker state: 0 closed, 1 open, 2 half-open.
    pub breaker_state: IntGauge,
    /// Circuit breaker transitions, by the state entered.
    pub breaker_transitions: IntCounterVec,
    /// Enqueue time to commit, by source; see [`Metrics::observe_end_to_end`].
    pub end_to_end_latency: HistogramVec,
    /// Messages delivered to a consumer and not yet acknowledged, by source
    /// and queue (stream key or BullMQ queue name); updated periodically.
    pub queue_pending: IntGaugeVec,
    /// Messages not yet delivered to any consumer, by source and queue;
    /// updated periodically.
    pub queue_lag: IntGaugeVec,
    /// Jobs by kind and status; see [`JOB_STATUSES`].
    pub jobs: IntCounterVec,
    /// Rows processed by jobs, by kind (exported rows, snapshotted events).
    pub job_rows: IntCounterVec,
    /// Bytes written by jobs, by kind (artifacts, manifests).
    pub job_bytes: IntCounterVec,
    /// Wall time of finished jobs, by kind.
    pub job_duration: HistogramVec,
    /// Security alerts raised, by rule name (from `[[alerts.rules]]`).
    pub security_alerts: IntCounterVec,
    /// Stored events evaluated by the alert rules.
    pub alert_events_evaluated: IntCounter,
    /// Events or alerts the alert evaluator had to drop, by reason
    /// (`queue_full`, `tracking_full`, `publish_failed`).
    pub alert_events_dropped: IntCounterVec,
    /// Runs of periodic work that must happen once across replicas, by task
    /// and result (`ran`, `skipped`: another replica holds the lock, `failed`).
    pub periodic_runs: IntCounterVec,
    /// 1 while the database's log extends the last published checkpoint,
    /// 0 when it does not (truncated, rolled back or rewritten), -1 until
    /// known.
    pub log_extends_published: IntGauge,
    /// Monthly partitions dropped by retention.
    pub retention_dropped: IntCounter,
    /// Partitions a retention pass kept, once per pass and reason
    /// ([`RETENTION_REFUSALS`]).
    pub retention_refused: IntCounterVec,
}

/// Why retention keeps a partition (the `reason` label of
/// `audit_worker_retention_refused_partitions_total`).
pub const RETENTION_REFUSALS: [&str; 5] = [
    "month_open",
    "retention",
    "unknown_policy",
    "unsealed",
    "legal_hold",
];

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let events = IntCounterVec::new(
            Opts::new(
                "audit_worker_events_total",
                "Audit events handled, by source and outcome.",
            ),
            &["source", "outcome"],
        )
        .expect("valid metric");
        let dead_letters = IntCounterVec::new(
            Opts::new(
                "audit_worker_dead_letters_total",
                "Dead letters written to the DLQ stream, by reason code.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("audit_worker_batch_size", "Rows per database insert batch.")
                .buckets(vec![
                    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
                ]),
        )
        .expect("valid metric");
        let insert_duration = HistogramVec::new(
            HistogramOpts::new(
                "audit_worker_insert_duration_seconds",
                "Duration of one batch insert statement.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["result"],
        )
        .expect("valid metric");
        let sink_retries = IntCounter::new(
            "audit_worker_sink_retries_total",
            "Database batch writes retried after a transient failure.",
        )
        .expect("valid metric");
        let redis_errors = IntCounterVec::new(
            Opts::new(
                "audit_worker_redis_errors_total",
                "Failed Redis operations, by operation.",
            ),
            &["operation"],
        )
        .expect("valid metric");
        let log_extends_published = IntGauge::new(
            "audit_worker_log_extends_published_checkpoint",
            "1 while the database's log extends the last published checkpoint, 0 when it does not \
             (truncated, rolled back or rewritten), -1 until checked.",
        )
        .expect("valid metric");
        log_extends_published.set(-1);
        let build_info = IntGaugeVec::new(
            Opts::new(
                "audit_worker_build_info",
                "Build information; the value is always 1.",
            ),
            &["version"],
        )
        .expect("valid metric");
        let breaker_state = IntGauge::new(
            "audit_worker_circuit_breaker_state",
            "Circuit breaker around database writes: 0 closed, 1 open, 2 half-open.",
        )
        .expect("valid metric");
        let breaker_transitions = IntCounterVec::new(
            Opts::new(
                "audit_worker_circuit_breaker_transitions_total",
                "Circuit breaker state changes, by the state entered.",
            ),
            &["to"],
        )
        .expect("valid metric");
        let end_to_end_latency = HistogramVec::new(
            HistogramOpts::new(
                "audit_worker_end_to_end_latency_seconds",
                "Time from enqueue (stream entry id, BullMQ job timestamp) to the row's commit.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
            ]),
            &["source"],
        )
        .expect("valid metric");
        let queue_pending = IntGaugeVec::new(
            Opts::new(
                "audit_worker_queue_pending_messages",
                "Messages delivered to a consumer but not yet acknowledged, by source and queue.",
            ),
            &["source", "queue"],
        )
        .expect("valid metric");
        let queue_lag = IntGaugeVec::new(
            Opts::new(
                "audit_worker_queue_lag_messages",
                "Messages not yet delivered to any consumer, by source and queue.",
            ),
            &["source", "queue"],
        )
        .expect("valid metric");
        let jobs = IntCounterVec::new(
            Opts::new("audit_worker_jobs_total", "Jobs, by kind and status."),
            &["kind", "status"],
        )
        .expect("valid metric");
        let job_rows = IntCounterVec::new(
            Opts::new(
                "audit_worker_job_rows_total",
                "Rows processed by jobs, by kind.",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let job_bytes = IntCounterVec::new(
            Opts::new(
                "audit_worker_job_bytes_total",
                "Bytes written by jobs (artifacts, manifests), by kind.",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let job_duration = HistogramVec::new(
            HistogramOpts::new(
                "audit_worker_job_duration_seconds",
                "Wall time of finished jobs, by kind.",
            )
            .buckets(vec![0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0]),
            &["kind"],
        )
        .expect("valid metric");
        let security_alerts = IntCounterVec::new(
            Opts::new(
                "audit_worker_security_alerts_total",
                "Security alerts raised by the configured rules, by rule name.",
            ),
            &["rule"],
        )
        .expect("valid metric");
        let alert_events_evaluated = IntCounter::new(
            "audit_worker_alert_events_evaluated_total",
            "Stored events evaluated by the security alert rules.",
        )
        .expect("valid metric");
        let alert_events_dropped = IntCounterVec::new(
            Opts::new(
                "audit_worker_alert_events_dropped_total",
                "Events or alerts the alert evaluator dropped instead of slowing ingestion, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let periodic_runs = IntCounterVec::new(
            Opts::new(
                "audit_worker_periodic_runs_total",
                "Runs of once-across-replicas periodic work, by task and result.",
            ),
            &["task", "result"],
        )
        .expect("valid metric");
        let retention_dropped = IntCounter::new(
            "audit_worker_retention_dropped_partitions_total",
            "Monthly partitions of audit_log dropped by retention.",
        )
        .expect("valid metric");
        let retention_refused = IntCounterVec::new(
            Opts::new(
                "audit_worker_retention_refused_partitions_total",
                "Partitions a retention pass kept, per pass and reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let stream_trimmed = IntCounter::new(
            "audit_worker_stream_trimmed_total",
            "Pending stream entries found deleted or trimmed before they were stored.",
        )
        .expect("valid metric");
        for c in [
            Box::new(events.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(stream_trimmed.clone()),
            Box::new(dead_letters.clone()),
            Box::new(batch_size.clone()),
            Box::new(insert_duration.clone()),
            Box::new(sink_retries.clone()),
            Box::new(redis_errors.clone()),
            Box::new(build_info.clone()),
            Box::new(breaker_state.clone()),
            Box::new(breaker_transitions.clone()),
            Box::new(end_to_end_latency.clone()),
            Box::new(queue_pending.clone()),
            Box::new(queue_lag.clone()),
            Box::new(jobs.clone()),
            Box::new(job_rows.clone()),
            Box::new(job_bytes.clone()),
            Box::new(job_duration.clone()),
            Box::new(security_alerts.clone()),
            Box::new(alert_events_evaluated.clone()),
            Box::new(alert_events_dropped.clone()),
            Box::new(periodic_runs.clone()),
            Box::new(log_extends_published.clone()),
            Box::new(retention_dropped.clone()),
            Box::new(retention_refused.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for reason in RejectReason::ALL {
            dead_letters.with_label_values(&[reason.code()]);
        }
        for kind in JOB_KINDS {
            for status in JOB_STATUSES {
                jobs.with_label_values(&[kind, status]);
            }
            job_rows.with_label_values(&[kind]);
            job_bytes.with_label_values(&[kind]);
            job_duration.with_label_values(&[kind]);
        }
        // Known label values start at 0, so rate() and absent-series alerts
        // work from the first scrape.
        for state in [
            crate::sink::BreakerState::Closed,
            crate::sink::BreakerState::Open,
            crate::sink::BreakerState::HalfOpen,
        ] {
            breaker_transitions.with_label_values(&[state.as_str()]);
        }
        for op in REDIS_OPERATIONS {
            redis_errors.with_label_values(&[op]);
        }
        for reason in RETENTION_REFUSALS {
            retention_refused.with_label_values(&[reason]);
        }
        for reason in ["queue_full", "tracking_full", "publish_failed"] {
            alert_events_dropped.with_label_values(&[reason]);
        }
        Self {
            registry,
            events,
            dead_letters,
            batch_size,
            insert_duration,
            sink_retries,
            stream_trimmed,
            redis_errors,
            build_info,
            breaker_state,
            breaker_transitions,
            end_to_end_latency,
            queue_pending,
            queue_lag,
            jobs,
            job_rows,
            job_bytes,
            job_duration,
            security_alerts,
            alert_events_evaluated,
            alert_events_dropped,
            periodic_runs,
            log_extends_published,
            retention_dropped,
            retention_refused,
        }
    }

    /// Records the end-to-end latency of one committed event: from the
    /// moment its producer enqueued it (`enqueued_at_ms`, Unix milliseconds:
    /// the stream entry id's time part, see [`stream_id_millis`], or a
    /// BullMQ job's `timestamp`) to now. `source` is `stream` or `bullmq`.
    /// A producer clock ahead of ours counts as zero, not as a negative time.
    pub fn observe_end_to_end(&self, source: &str, enqueued_at_ms: i64) {
        let now = chrono::Utc::now().timestamp_millis();
        let secs = (now - enqueued_at_ms).max(0) as f64 / 1000.0;
        self.end_to_end_latency
            .with_label_values(&[source])
            .observe(secs);
    }

    /// Counts a job request handed to its kind's handler (`accepted`) or
    /// refused by it (`rejected`). `kind` is one of [`JOB_KINDS`].
    pub fn job_request(&self, kind: &str, accepted: bool) {
        let status = if accepted { "accepted" } else { "rejected" };
        self.jobs.with_label_values(&[kind, status]).inc();
    }

    /// Records a finished job: its status (`completed` or `failed`), the
    /// rows it processed, the bytes it wrote and how long it ran. For job
    /// executors (export, snapshot, report).
    pub fn job_finished(
        &self,
        kind: &str,
        completed: bool,
        rows: u64,
        bytes: u64,
        duration: std::time::Duration,
    ) {
        let status = if completed { "completed" } else { "failed" };
        self.jobs.with_label_values(&[kind, status]).inc();
        self.job_rows.with_label_values(&[kind]).inc_by(rows);
        self.job_bytes.with_label_values(&[kind]).inc_by(bytes);
        self.job_duration
            .with_label_values(&[kind])
            .observe(duration.as_secs_f64());
    }

    /// Registers a collector of a component that keeps its own metrics
    /// (the HTTP API), so they are rendered with the rest.
    pub fn register(
        &self,
        c: Box<dyn prometheus::core::Collector>,
    ) -> Result<(), prometheus::Error> {
        self.registry.register(c)
    }

    /// Renders the registry in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The time part of a Redis stream entry id (`<ms>-<seq>`): when the entry
/// was added, in Unix milliseconds. `None` for a malformed id.
pub fn stream_id_millis(id: &str) -> Option<i64> {
    id.split_once('-')
        .map_or(id, |(ms, _)| ms)
        .parse::<i64>()
        .ok()
}

pub use crate::config::TelemetryConfig;

/// Keeps the OpenTelemetry pipeline alive; dropping it flushes the spans
/// still buffered (call at the very end of `main`, outside the runtime).
#[must_use = "dropping the guard shuts the span exporter down"]
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    log_filter: Option<LogFilter>,
}

impl TelemetryGuard {
    /// The handle that changes the log filter live (`None` when another
    /// subscriber was installed first, e.g. in tests).
    pub fn log_filter(&self) -> Option<LogFilter> {
        self.log_filter.clone()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("audit-worker: flushing spans to the OTLP collector failed: {e}");
            }
        }
    }
}

/// Installs the global tracing subscriber: JSON lines, or human-readable
/// text on a terminal (`log.format = "auto"`). `RUST_LOG` overrides the
/// configured level. No OpenTelemetry export; see [`init_tracing`].
pub fn init_logging(config: &LogConfig) {
    let off = TelemetryConfig {
        otlp_endpoint: String::new(),
        service_name: String::new(),
        sample_ratio: 1.0,
        queue_stats_interval_secs: 15,
    };
    // Cannot fail without an endpoint.
    let _ = init_tracing(config, &off);
}

/// Installs the global tracing subscriber (as [`init_logging`]) plus, when
/// `telemetry.otlp_endpoint` is set, an OpenTelemetry layer exporting spans
/// over OTLP/HTTP in batches from a background thread. Sampling is
/// parent-based: a producer's sampled flag is honoured, and root spans are
/// kept at `sample_ratio`.
pub fn init_tracing(
    config: &LogConfig,
    telemetry: &TelemetryConfig,
) -> anyhow::Result<TelemetryGuard> {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};
    let from_env = std::env::var_os(EnvFilter::DEFAULT_ENV).is_some();
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, filter_handle) = tracing_subscriber::reload::Layer::new(filter);
    let json = match config.format.as_str() {
        "json" => true,
        "text" => false,
        _ => !std::io::stderr().is_terminal(),
    };
    type Boxed = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;
    let fmt: Boxed = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed()
    };
    let mut layers: Vec<Boxed> = vec![fmt];
    let mut provider = None;
    if !telemetry.otlp_endpoint.is_empty() {
        use opentelemetry::trace::TracerProvider as _;
        use opentelemetry_otlp::WithExportConfig;
        use opentelemetry_sdk::trace::Sampler;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(telemetry.traces_url())
            .build()
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot set up the OTLP exporter for {} ({e}): fix telemetry.otlp_endpoint or leave it empty",
                    telemetry.traces_url()
                )
            })?;
        let p = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                telemetry.sample_ratio,
            ))))
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(telemetry.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = p.tracer("audit-worker");
        layers.push(tracing_opentelemetry::layer().with_tracer(tracer).boxed());
        provider = Some(p);
        crate::tracing_ctx::set_export_enabled(true);
    }
    let installed = tracing_subscriber::registry()
        .with(layers)
        .with(filter)
        .try_init()
        .is_ok();
    if provider.is_some() {
        tracing::info!(endpoint = %telemetry.traces_url(), "exporting spans over OTLP/HTTP");
    }
    let log_filter = installed.then(|| LogFilter {
        set: Arc::new(move |level: &str| {
            if from_env {
                tracing::warn!("log.level changed but RUST_LOG is set and overrides it: the filter stays as RUST_LOG says");
                return;
            }
            match EnvFilter::try_new(level) {
                Ok(filter) => match filter_handle.reload(filter) {
                    Ok(()) => tracing::info!(level, "log level changed"),
                    Err(e) => tracing::warn!(error = %e, "cannot change the log level"),
                },
                Err(e) => tracing::warn!(error = %e, "log.level is not a valid filter; unchanged"),
            }
        }),
    });
    Ok(TelemetryGuard {
        provider,
        log_filter,
    })
}

/// Changes the log filter of the running process (`log.level` applies
/// live); `RUST_LOG`, when set, keeps precedence.
#[derive(Clone)]
pub struct LogFilter {
    set: Arc<dyn Fn(&str) + Send + Sync>,
}

impl LogFilter {
    /// Replaces the filter with `level` (RUST_LOG syntax).
    pub fn set(&self, level: &str) {
        (self.set)(level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_give_their_enqueue_millis() {
        assert_eq!(stream_id_millis("1700000000123-7"), Some(1_700_000_000_123));
        assert_eq!(stream_id_millis("1700000000123"), Some(1_700_000_000_123));
        assert_eq!(stream_id_millis("x-1"), None);
    }

    #[test]
    fn end_to_end_latency_never_goes_negative() {
        let m = Metrics::new();
        let future = chrono::Utc::now().timestamp_millis() + 60_000;
        m.observe_end_to_end("stream", future);
        let h = m.end_to_end_latency.with_label_values(&["stream"]);
        assert_eq!(h.get_sample_count(), 1);
        assert_eq!(h.get_sample_sum(), 0.0);
    }

    #[test]
    fn otlp_endpoints_get_the_traces_path_once() {
        let mut t = TelemetryConfig {
            otlp_endpoint: "http://collector:4318/".into(),
            service_name: "w".into(),
            sample_ratio: 1.0,
            queue_stats_interval_secs: 1,
        };
        assert_eq!(t.traces_url(), "http://collector:4318/v1/traces");
        t.otlp_endpoint = "http://collector:4318/v1/traces".into();
        assert_eq!(t.traces_url(), "http://collector:4318/v1/traces");
        t.validate().unwrap();
        t.otlp_endpoint = "collector:4318".into();
        assert!(t.validate().unwrap_err().contains("http://"));
        t.otlp_endpoint = String::new();
        t.sample_ratio = 2.0;
        assert!(t.validate().is_err());
    }

    #[test]
    fn job_series_exist_before_the_first_job() {
        let m = Metrics::new();
        let text = m.render();
        for kind in JOB_KINDS {
            for status in JOB_STATUSES {
                assert!(text.contains(&format!(
                    "audit_worker_jobs_total{{kind=\"{kind}\",status=\"{status}\"}} 0"
                )));
            }
        }
        m.job_finished("export", true, 10, 2048, std::time::Duration::from_secs(2));
        assert_eq!(m.job_rows.with_label_values(&["export"]).get(), 10);
        assert_eq!(m.job_bytes.with_label_values(&["export"]).get(), 2048);
    }
}
