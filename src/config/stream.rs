//! `[stream]`: the Redis Streams source.

use serde::Deserialize;

use super::ConfigError;

/// `[stream]`: the Redis Streams source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    pub enabled: bool,
    pub key: String,
    pub group: String,
    pub consumer: String,
    pub read_count: usize,
    pub block_ms: u64,
    pub claim_idle_ms: u64,
    pub claim_interval_ms: u64,
    pub max_in_flight_batches: usize,
    pub delete_acked: bool,
    pub max_deliveries: u64,
}

impl StreamConfig {
    /// Checks names and counts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, why: &str| Err(ConfigError(format!("{key} {why}")));
        if self.key.is_empty() || self.group.is_empty() {
            return err("stream.key / stream.group", "must not be empty");
        }
        if self.read_count == 0 || self.max_in_flight_batches == 0 {
            return err(
                "stream.read_count / stream.max_in_flight_batches",
                "must be at least 1",
            );
        }
        if self.block_ms == 0 {
            return err(
                "stream.block_ms",
                "must be at least 1 (0 would block forever)",
            );
        }
        if self.max_deliveries == 0 {
            return err("stream.max_deliveries", "must be at least 1");
        }
        Ok(())
    }
}
