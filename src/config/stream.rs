//! `[stream]`: the Redis Streams source.

use serde::Deserialize;

use super::ConfigError;

/// The most shards `stream.shards` accepts: each shard is one reader task
/// with its own blocking connection in every worker.
pub const MAX_SHARDS: u32 = 256;

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
    /// Number of stream shards (`<key>:{0}` .. `<key>:{N-1}`); 1 keeps the
    /// single stream `key` (outside a cluster).
    pub shards: u32,
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
        if !(1..=MAX_SHARDS).contains(&self.shards) {
            return err(
                "stream.shards",
                &format!("must be between 1 and {MAX_SHARDS}"),
            );
        }
        if self.max_deliveries == 0 {
            return err("stream.max_deliveries", "must be at least 1");
        }
        Ok(())
    }
}
