//! `[http]`: the health and metrics listener.

use serde::Deserialize;

use super::ConfigError;

/// `[http]`: the health and metrics listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: String,
}

impl HttpConfig {
    /// Checks that `listen` is a socket address.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError(
                "http.listen must be an address like 0.0.0.0:3001".into(),
            ));
        }
        Ok(())
    }
}
