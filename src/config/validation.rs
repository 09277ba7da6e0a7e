//! `[validation]`: limits and integrity requirements for events.

use serde::Deserialize;

use super::ConfigError;

/// `[validation]`: limits and integrity requirements for events.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    pub max_event_bytes: usize,
    pub max_string_chars: usize,
    pub max_custom_depth: usize,
    pub max_event_age_days: i64,
    pub max_future_skew_secs: i64,
    pub require_hash: bool,
    pub require_signature: bool,
}

impl ValidationConfig {
    /// Checks the limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, why: &str| Err(ConfigError(format!("{key} {why}")));
        if self.max_event_bytes == 0 || self.max_string_chars == 0 {
            return err(
                "validation.max_event_bytes / max_string_chars",
                "must be at least 1",
            );
        }
        if self.max_event_age_days <= 0 || self.max_future_skew_secs < 0 {
            return err(
                "validation.max_event_age_days",
                "must be positive (and max_future_skew_secs >= 0)",
            );
        }
        Ok(())
    }
}
