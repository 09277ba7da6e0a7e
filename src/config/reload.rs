//! `[config]`: where the configuration document is re-read from and how
//! often, and where the last good copy of a stored document is kept.

use serde::Deserialize;

use super::ConfigError;

/// `[config]`: live reloading of the configuration document.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadConfig {
    /// Seconds between polls of the document (0: only on SIGHUP).
    pub watch_interval_secs: u64,
    /// The last good copy of a document read from the object store, used at
    /// start when the store cannot be reached.
    pub cache_path: String,
}

impl ReloadConfig {
    /// Checks the cache path is set.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cache_path.trim().is_empty() {
            return Err(ConfigError(
                "config.cache_path must be set (a writable file path for the last good copy)"
                    .into(),
            ));
        }
        Ok(())
    }
}
