//! `[redis]`: where Redis is.

use serde::Deserialize;

use super::{ConfigError, Secret};

/// `[redis]`: where Redis is.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    pub url: Secret,
    pub connect_timeout_secs: u64,
    pub response_timeout_secs: u64,
    /// PEM file with the CA certificate(s) that sign the server's
    /// certificate, for `rediss://` with a private CA; empty: system roots.
    pub tls_ca_file: String,
}

impl RedisConfig {
    /// Checks the URL scheme and that a CA file goes with TLS.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, why: &str| Err(ConfigError(format!("{key} {why}")));
        let url = self.url.expose();
        if !(url.starts_with("redis://")
            || url.starts_with("rediss://")
            || url.starts_with("unix://"))
        {
            return err(
                "redis.url",
                "must start with redis://, rediss:// or unix://",
            );
        }
        if !self.tls_ca_file.is_empty() && !url.starts_with("rediss://") {
            return err(
                "redis.tls_ca_file",
                "is set but redis.url does not start with rediss:// (TLS)",
            );
        }
        Ok(())
    }
}
