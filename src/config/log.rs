//! `[log]`: log format and filter.

use serde::Deserialize;

use super::ConfigError;

/// `[log]`: log format and filter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: String,
    pub level: String,
}

impl LogConfig {
    /// Checks the format name.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !["auto", "json", "text"].contains(&self.format.as_str()) {
            return Err(ConfigError("log.format must be auto, json or text".into()));
        }
        Ok(())
    }
}
