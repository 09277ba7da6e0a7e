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
    /// Checks the format name and the filter.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !["auto", "json", "text"].contains(&self.format.as_str()) {
            return Err(ConfigError("log.format must be auto, json or text".into()));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.level) {
            return Err(ConfigError(format!(
                "log.level is not a valid filter ({e}): use RUST_LOG syntax, e.g. \"info\" or \"info,audit_worker=debug\""
            )));
        }
        Ok(())
    }
}
