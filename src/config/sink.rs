//! `[sink]`: batching and retries of database writes.

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// `[sink]`: batching and retries of database writes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    pub batch_size: usize,
    pub max_wait_ms: u64,
    pub writers: usize,
    pub retry_max_attempts: u32,
    pub retry_base_ms: u64,
    pub retry_factor: f64,
    pub retry_cap_ms: u64,
    pub retry_jitter: f64,
    pub breaker_failure_threshold: u32,
    pub breaker_recovery_secs: u64,
}

impl SinkConfig {
    /// How long a row waits for its batch to fill.
    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms)
    }

    /// Checks sizes, retry and breaker settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, why: &str| Err(ConfigError(format!("{key} {why}")));
        if self.batch_size == 0 || self.batch_size > 10_000 {
            return err("sink.batch_size", "must be between 1 and 10000");
        }
        if self.breaker_failure_threshold == 0 || self.breaker_recovery_secs == 0 {
            return err(
                "sink.breaker_failure_threshold / sink.breaker_recovery_secs",
                "must be at least 1",
            );
        }
        if self.writers == 0 {
            return err("sink.writers", "must be at least 1");
        }
        if self.retry_max_attempts == 0 {
            return err("sink.retry_max_attempts", "must be at least 1");
        }
        if self.retry_factor < 1.0 || !(0.0..=1.0).contains(&self.retry_jitter) {
            return err(
                "sink.retry_factor / sink.retry_jitter",
                "need factor >= 1 and 0 <= jitter <= 1",
            );
        }
        Ok(())
    }
}
