//! `[api]`: the compliance HTTP API (`/v1`) on its own listener.

use serde::Deserialize;

use super::ConfigError;

/// `[api]`: the compliance HTTP API. It has a listener of its own, apart
/// from the operators' health and metrics port, so the two can be exposed
/// to different networks; it is off until `listen` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address to serve `/v1` on; empty: the API is off.
    pub listen: String,
    /// TOML file of bootstrap keys (hashed tokens); empty: none.
    pub keys_file: String,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Items per page of a list when the request does not say.
    pub default_page_size: u32,
    /// Most items per page a request may ask for.
    pub max_page_size: u32,
}

impl ApiConfig {
    /// Whether the API listener is on.
    pub fn enabled(&self) -> bool {
        !self.listen.is_empty()
    }

    /// Checks `[api]` values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.enabled() && self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError(
                "api.listen must be an address like 127.0.0.1:3002, or empty to turn the API off"
                    .into(),
            ));
        }
        if self.max_body_bytes < 1024 {
            return Err(ConfigError(
                "api.max_body_bytes must be at least 1024".into(),
            ));
        }
        if self.max_page_size > 10_000 {
            return Err(ConfigError(
                "api.max_page_size must be at most 10000 (the limit the OpenAPI document allows)"
                    .into(),
            ));
        }
        if self.default_page_size == 0 || self.default_page_size > self.max_page_size {
            return Err(ConfigError(
                "api.default_page_size must be between 1 and api.max_page_size".into(),
            ));
        }
        Ok(())
    }
}
