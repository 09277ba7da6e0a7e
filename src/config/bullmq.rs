//! `[bullmq]`: the BullMQ source.

use serde::Deserialize;

use super::ConfigError;

/// `[bullmq]`: the BullMQ source (README, "Wire contract (BullMQ)"). Times are in the
/// units BullMQ itself uses, and the defaults are BullMQ's own unless the
/// default file says why not.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BullmqConfig {
    pub enabled: bool,
    pub queues: Vec<String>,
    pub prefix: String,
    pub concurrency: usize,
    pub workers_per_queue: usize,
    pub lock_duration_ms: u64,
    pub stalled_interval_ms: u64,
    pub max_stalled_count: u32,
    pub drain_delay_secs: u64,
    pub outage_retry_delay_ms: u64,
    pub close_timeout_ms: u64,
    pub max_in_flight_data_bytes: u64,
}

impl BullmqConfig {
    /// Checks `[bullmq]` (only when the source is enabled).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let b = self;
        let err = |key: &str, why: &str| Err(ConfigError(format!("{key} {why}")));
        if !b.enabled {
            return Ok(());
        }
        if b.queues.is_empty() {
            return err(
                "bullmq.queues",
                "must name at least one queue (or set bullmq.enabled = false)",
            );
        }
        for (i, q) in b.queues.iter().enumerate() {
            if q.is_empty() || q.contains(':') {
                return err(
                    "bullmq.queues",
                    "must hold non-empty queue names without ':' (BullMQ uses ':' in its keys)",
                );
            }
            if b.queues[..i].contains(q) {
                return err("bullmq.queues", "must not name the same queue twice");
            }
        }
        if b.prefix.is_empty() || b.prefix.contains(':') {
            return err(
                "bullmq.prefix",
                "must be non-empty and without ':' (BullMQ's default is \"bull\")",
            );
        }
        if b.concurrency == 0 || b.concurrency > 10_000 {
            return err("bullmq.concurrency", "must be between 1 and 10000");
        }
        if !(1..=64).contains(&b.workers_per_queue) || b.workers_per_queue > b.concurrency {
            return err(
                "bullmq.workers_per_queue",
                "must be between 1 and 64, and at most bullmq.concurrency",
            );
        }
        if b.lock_duration_ms < 1_000 || b.stalled_interval_ms == 0 {
            return err(
                "bullmq.lock_duration_ms / stalled_interval_ms",
                "need lock_duration_ms >= 1000 and stalled_interval_ms >= 1",
            );
        }
        if b.drain_delay_secs == 0 {
            return err(
                "bullmq.drain_delay_secs",
                "must be at least 1 (0 would block forever)",
            );
        }
        if b.outage_retry_delay_ms == 0 {
            return err("bullmq.outage_retry_delay_ms", "must be at least 1");
        }
        Ok(())
    }
}
