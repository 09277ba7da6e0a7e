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

#[cfg(test)]
mod tests {
    use super::*;

    fn api(listen: &str, max_body: usize, default: u32, max: u32) -> ApiConfig {
        ApiConfig {
            listen: listen.into(),
            keys_file: String::new(),
            max_body_bytes: max_body,
            default_page_size: default,
            max_page_size: max,
        }
    }

    #[test]
    fn the_api_is_off_by_default_and_bad_settings_name_the_key() {
        let off = api("", 65536, 50, 500);
        assert!(!off.enabled());
        assert!(off.validate().is_ok());
        assert!(api("127.0.0.1:3002", 65536, 50, 500).enabled());
        for (c, key) in [
            (api("localhost", 65536, 50, 500), "api.listen"),
            (api("", 10, 50, 500), "api.max_body_bytes"),
            (api("", 65536, 0, 500), "api.default_page_size"),
            (api("", 65536, 600, 500), "api.default_page_size"),
            (api("", 65536, 50, 20_000), "api.max_page_size"),
        ] {
            assert!(c.validate().unwrap_err().0.contains(key), "{key}");
        }
    }

    #[test]
    fn queue_organisations_and_the_api_port_are_checked_across_sections() {
        use crate::config::Config;
        let env = || figment::providers::Env::prefixed("AUDIT_WORKER_UNIT_TEST_UNSET__");
        let dir = tempfile::tempdir().unwrap();
        let load = |toml: &str| {
            let f = dir.path().join("c.toml");
            std::fs::write(&f, toml).unwrap();
            Config::load_from(Some(&f), env())
        };
        let c = load("").unwrap();
        assert_eq!(c.export.queue_scope(), None);
        assert!(!c.api.enabled());
        let c = load("[export]\nqueue_organizations = [\"org-a\", \"org-b\"]\n").unwrap();
        assert_eq!(
            c.export.queue_scope(),
            Some(vec!["org-a".into(), "org-b".into()])
        );
        for (toml, key) in [
            (
                "[export]\nqueue_organizations = []\n",
                "export.queue_organizations",
            ),
            (
                "[export]\nqueue_organizations = [\"*\", \"a\"]\n",
                "export.queue_organizations",
            ),
            ("[api]\nlisten = \"0.0.0.0:3001\"\n", "api.listen"),
        ] {
            let e = load(toml).unwrap_err().to_string();
            assert!(e.contains(key), "{toml}: {e}");
        }
    }
}
