//! `[telemetry]`: OpenTelemetry export and queue statistics.

/// `[telemetry]`: OpenTelemetry export and periodic queue statistics.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/HTTP endpoint of a collector; empty disables OpenTelemetry.
    pub otlp_endpoint: String,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Share of root traces (batches without a producer trace) sampled.
    pub sample_ratio: f64,
    /// Seconds between refreshes of the queue lag and pending gauges.
    pub queue_stats_interval_secs: u64,
}

impl TelemetryConfig {
    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err("telemetry.sample_ratio must be between 0 and 1".into());
        }
        if self.queue_stats_interval_secs == 0 {
            return Err("telemetry.queue_stats_interval_secs must be at least 1".into());
        }
        // The exporter is built without TLS (a collector or agent next to
        // the worker is the usual set-up): only plain http:// works.
        if !(self.otlp_endpoint.is_empty() || self.otlp_endpoint.starts_with("http://")) {
            return Err(
                "telemetry.otlp_endpoint must be an http:// URL of an OTLP/HTTP collector (e.g. http://otel-collector:4318; TLS is not built in, use a local collector), or empty".into(),
            );
        }
        Ok(())
    }

    /// The traces URL: the endpoint as given when it already ends in
    /// `/v1/traces`, else with that path appended (as the OTLP spec does
    /// for `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub fn traces_url(&self) -> String {
        let base = self.otlp_endpoint.trim_end_matches('/');
        if base.ends_with("/v1/traces") {
            base.to_owned()
        } else {
            format!("{base}/v1/traces")
        }
    }
}
