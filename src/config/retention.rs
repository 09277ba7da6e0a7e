//! `[retention]`: which monthly partitions of audit_log may be dropped.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::ConfigError;

/// `[retention]`: per-policy retention periods and the periodic pass that
/// drops partitions whose every row is past its period (README, "Retention").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Run the periodic pass in `run` (the `retention` command works either way).
    pub enabled: bool,
    /// Seconds between passes.
    pub interval_secs: u64,
    /// Days kept for rows without a `retentionPolicy` (or with an empty one).
    pub default_days: u32,
    /// Days kept per `retentionPolicy` value; a value not listed is kept.
    pub policies: BTreeMap<String, u32>,
    /// How long a drop waits for its locks before giving up until the next pass.
    pub lock_timeout_ms: u64,
}

impl RetentionConfig {
    /// Checks that every period is at least a day and the timings are usable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, why: &str| Err(ConfigError(format!("{key} {why}")));
        if self.default_days == 0 || self.default_days > i32::MAX as u32 {
            return err("retention.default_days", "must be between 1 and 2147483647");
        }
        if let Some((name, _)) = self
            .policies
            .iter()
            .find(|(n, d)| n.is_empty() || **d == 0 || **d > i32::MAX as u32)
        {
            return err(
                &format!("retention.policies.{name}"),
                "must name a policy and keep it between 1 and 2147483647 days",
            );
        }
        if self.interval_secs == 0 {
            return err("retention.interval_secs", "must be at least 1");
        }
        if self.lock_timeout_ms == 0 || self.lock_timeout_ms > i32::MAX as u64 {
            return err(
                "retention.lock_timeout_ms",
                "must be between 1 and 2147483647",
            );
        }
        Ok(())
    }
}
