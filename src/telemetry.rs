//! Logging set-up and the Prometheus metrics registry.
//!
//! Metric names follow Prometheus conventions (`_total` counters,
//! `_seconds` histograms) and are documented in the README; label values
//! are drawn from small fixed sets (sources, outcomes, reason codes), never
//! from event contents.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::config::LogConfig;
use crate::event::RejectReason;

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
    /// Redis commands that failed (the worker reconnects and goes on).
    pub redis_errors: IntCounterVec,
    /// Build information (value 1, labels carry the version).
    pub build_info: IntGaugeVec,
    /// Circuit breaker state: 0 closed, 1 open, 2 half-open.
    pub breaker_state: IntGauge,
    /// Circuit breaker transitions, by the state entered.
    pub breaker_transitions: IntCounterVec,
}

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
        for c in [
            Box::new(events.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(dead_letters.clone()),
            Box::new(batch_size.clone()),
            Box::new(insert_duration.clone()),
            Box::new(sink_retries.clone()),
            Box::new(redis_errors.clone()),
            Box::new(build_info.clone()),
            Box::new(breaker_state.clone()),
            Box::new(breaker_transitions.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for reason in RejectReason::ALL {
            dead_letters.with_label_values(&[reason.code()]);
        }
        Self {
            registry,
            events,
            dead_letters,
            batch_size,
            insert_duration,
            sink_retries,
            redis_errors,
            build_info,
            breaker_state,
            breaker_transitions,
        }
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

/// Installs the global tracing subscriber: JSON lines, or human-readable
/// text on a terminal (`log.format = "auto"`). `RUST_LOG` overrides the
/// configured level.
pub fn init_logging(config: &LogConfig) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match config.format.as_str() {
        "json" => true,
        "text" => false,
        _ => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init()
    } else {
        builder.try_init()
    };
}
