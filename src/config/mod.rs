//! Typed configuration: `config/default.toml` (built in) < the `--config`
//! document < `AUDIT_WORKER__SECTION__KEY` environment variables.
//!
//! The built-in default file is the single source of defaults, so the
//! documented values and the real ones cannot drift apart. Unknown keys are
//! rejected so that a misspelt setting fails loudly.
//!
//! Each section lives in a file of its own and checks its own values; this
//! module adds the rules that span sections. Configuration is a leaf: it
//! imports no domain module, and the domain builds its own types from it
//! (e.g. `ValidationPolicy::from_config` in the policy module).

use std::path::Path;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;

mod alerts;
mod api;
mod bullmq;
mod database;
mod dlq;
mod export;
mod gdpr;
mod http;
mod integrity;
pub mod live;
mod log;
pub mod queue_scope;
pub mod redis;
mod reload;
mod report;
mod retention;
mod secret;
mod sink;
mod snapshot;
mod storage;
mod stream;
mod telemetry;
mod validation;

pub use alerts::{AlertsConfig, RuleConfig};
pub use api::ApiConfig;
pub use bullmq::BullmqConfig;
pub use database::{DatabaseConfig, SSL_MODES};
pub use dlq::DlqConfig;
pub use export::{ExportConfig, OcsfClassRule, OcsfConfig};
pub use gdpr::{subject_path_parts, GdprConfig};
pub use http::HttpConfig;
pub use integrity::IntegrityConfig;
pub use live::{Settings, SettingsDiff};
pub use log::LogConfig;
pub use redis::{RedisConfig, RedisTopology};
pub use reload::ReloadConfig;
pub use report::ReportConfig;
pub use retention::RetentionConfig;
pub use secret::{read_secret_file, Secret};
pub use sink::SinkConfig;
pub use snapshot::SnapshotConfig;
pub use storage::StorageConfig;
pub use stream::StreamConfig;
pub use telemetry::TelemetryConfig;
pub use validation::ValidationConfig;

/// The documented defaults, compiled in.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// Prefix of the environment variables that override settings.
pub const ENV_PREFIX: &str = "AUDIT_WORKER__";

/// A configuration problem, phrased as what to fix.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[config]`: live reloading of this configuration.
    #[serde(rename = "config")]
    pub reload: ReloadConfig,
    pub redis: RedisConfig,
    pub stream: StreamConfig,
    pub bullmq: BullmqConfig,
    pub dlq: DlqConfig,
    pub database: DatabaseConfig,
    pub sink: SinkConfig,
    pub validation: ValidationConfig,
    pub integrity: IntegrityConfig,
    pub http: HttpConfig,
    pub storage: StorageConfig,
    pub log: LogConfig,
    pub export: ExportConfig,
    pub report: ReportConfig,
    pub snapshot: SnapshotConfig,
    pub telemetry: TelemetryConfig,
    pub alerts: AlertsConfig,
    pub api: ApiConfig,
    pub retention: RetentionConfig,
    pub gdpr: GdprConfig,
}

impl Config {
    /// The `AUDIT_WORKER__SECTION__KEY` overrides of the process
    /// environment, merged over the document.
    pub fn environment() -> Env {
        Env::prefixed(ENV_PREFIX).split("__")
    }

    /// Loads defaults, then `file` if given, then `env`, and validates the
    /// result (tests; the worker loads through [`crate::live::source`]).
    pub fn load_from(file: Option<&Path>, env: Env) -> Result<Self, ConfigError> {
        let text = match file {
            None => None,
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    ConfigError(format!(
                        "config file {} does not exist: check the --config path",
                        path.display()
                    ))
                } else {
                    ConfigError(format!(
                        "cannot read config file {} ({e}): check its permissions",
                        path.display()
                    ))
                }
            })?),
        };
        let origin = file.map(|p| p.display().to_string()).unwrap_or_default();
        Ok(Self::load_document(text.as_deref(), &origin, env)?.0)
    }

    /// Loads defaults, then the TOML document `text` (read from `origin`,
    /// named in errors), then `env`, and validates the result. Also returns
    /// every merged setting, for comparing a reloaded document with the
    /// running one (see [`live`]).
    pub fn load_document(
        text: Option<&str>,
        origin: &str,
        env: Env,
    ) -> Result<(Self, Settings), ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(text) = text {
            figment = figment.merge(Toml::string(text));
        }
        let figment = figment.merge(env);
        let describe = |e: figment::Error| {
            let text: Vec<String> = e
                .into_iter()
                .map(|err| {
                    let setting = err.path.join(".").to_lowercase();
                    let source = err
                        .metadata
                        .as_ref()
                        .map(|m| {
                            if m.name.starts_with("TOML") && !origin.is_empty() {
                                origin.to_owned()
                            } else {
                                m.interpolate(&err.profile.clone().unwrap_or_default(), &err.path)
                            }
                        })
                        .unwrap_or_default();
                    match (setting.is_empty(), source.is_empty()) {
                        (true, _) => err.kind.to_string(),
                        (false, true) => format!("{setting}: {}", err.kind),
                        (false, false) => format!("{setting} (from {source}): {}", err.kind),
                    }
                })
                .collect();
            ConfigError(format!(
                "{}: fix the value in the config document or the AUDIT_WORKER__* variable",
                text.join("; ")
            ))
        };
        let config: Config = figment.extract().map_err(describe)?;
        let settings = Settings::flatten(
            &figment
                .extract::<figment::value::Value>()
                .map_err(describe)?,
        );
        config.validate()?;
        Ok((config, settings))
    }

    /// Checks values that parse but make no sense, naming the setting:
    /// each section checks itself, then the rules that span sections.
    fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, why: &str| Err(ConfigError(format!("{key} {why}")));
        self.reload.validate()?;
        self.redis.validate()?;
        self.stream.validate()?;
        if self.dlq.key.is_empty() || self.dlq.key == self.stream.key {
            return err("dlq.key", "must be set and differ from stream.key");
        }
        if self.bullmq.enabled && self.redis.topology() != RedisTopology::Single {
            return err(
                "bullmq.enabled",
                "is true but redis.sentinels or redis.cluster_nodes is set: the BullMQ library connects to one Redis URL and cannot follow a Sentinel failover or a cluster; set bullmq.enabled = false (AUDIT_WORKER__BULLMQ__ENABLED=false) and have producers use the stream",
            );
        }
        if self.bullmq.enabled {
            self.bullmq.validate()?;
            if (self.bullmq.max_in_flight_data_bytes as usize) < self.validation.max_event_bytes {
                return err(
                    "bullmq.max_in_flight_data_bytes",
                    "must be at least validation.max_event_bytes (one valid job must fit)",
                );
            }
        }
        self.database.validate()?;
        self.sink.validate()?;
        if self.database.pool_size < self.sink.writers + 1 {
            return err(
                "database.pool_size",
                "must exceed sink.writers (one connection is kept for health checks and partitions)",
            );
        }
        self.validation.validate()?;
        self.http.validate()?;
        self.log.validate()?;
        self.export.validate().map_err(ConfigError)?;
        self.report.validate().map_err(ConfigError)?;
        self.snapshot.validate()?;
        self.telemetry.validate().map_err(ConfigError)?;
        self.alerts.validate().map_err(ConfigError)?;
        self.api.validate()?;
        self.retention.validate()?;
        self.gdpr.validate()?;
        if self.api.enabled() && self.api.listen == self.http.listen {
            return err(
                "api.listen",
                "must differ from http.listen (the API has a listener of its own)",
            );
        }
        let keys = self.integrity.hmac_key_entries()?;
        if self.validation.require_signature && keys.is_empty() {
            return err(
                "validation.require_signature",
                "is on but no HMAC key is configured: set integrity.hmac_keys or integrity.hmac_keys_file",
            );
        }
        Ok(())
    }

    /// The secret that signs export download links, from
    /// `export.link_secret_file` or `export.link_secret`; `None` when
    /// neither is set (downloads by link are then refused).
    pub fn export_link_secret(&self) -> Result<Option<Secret>, ConfigError> {
        if !self.export.link_secret_file.is_empty() {
            let text = read_secret_file(&self.export.link_secret_file, "export.link_secret_file")?;
            let first = text.lines().next().unwrap_or("").to_owned();
            return Ok((!first.is_empty()).then_some(Secret::from(first)));
        }
        Ok((!self.export.link_secret.is_empty()).then(|| self.export.link_secret.clone()))
    }

    /// The database password from `password_file`, `password`, or none.
    pub fn database_password(&self) -> Result<Option<Secret>, ConfigError> {
        if !self.database.password_file.is_empty() {
            let text = read_secret_file(&self.database.password_file, "database.password_file")?;
            return Ok(Some(Secret::from(
                text.lines().next().unwrap_or("").to_owned(),
            )));
        }
        Ok((!self.database.password.is_empty()).then(|| self.database.password.clone()))
    }

    /// This replica's consumer name: configured, or `<hostname>-<pid>`.
    pub fn consumer_name(&self) -> String {
        if self.stream.consumer.is_empty() {
            format!(
                "{}-{}",
                gethostname::gethostname().to_string_lossy(),
                std::process::id()
            )
        } else {
            self.stream.consumer.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An environment provider that matches no variable, so unit tests do
    /// not depend on (or race over) the process environment.
    fn env(_: &[(&str, &str)]) -> Env {
        Env::prefixed("AUDIT_WORKER_UNIT_TEST_UNSET__").split("__")
    }

    #[test]
    fn built_in_defaults_load_and_validate() {
        let c = Config::load_from(None, env(&[])).unwrap();
        assert_eq!(c.stream.key, "audit:events");
        assert_eq!(c.stream.group, "audit-workers");
        assert_eq!(c.dlq.key, "audit:dlq");
        assert_eq!(c.http.listen, "0.0.0.0:3001");
        assert_eq!(c.sink.batch_size, 1000);
        assert_eq!(c.validation.max_event_bytes, 65536);
        assert!(c.bullmq.enabled);
        assert_eq!(c.bullmq.queues, vec!["audit-events".to_string()]);
        assert_eq!(c.bullmq.prefix, "bull");
        assert!(c.bullmq.concurrency >= 100);
    }

    #[test]
    fn bullmq_settings_that_cannot_work_are_refused_with_the_setting_named() {
        let dir = tempfile::tempdir().unwrap();
        for (toml, expected) in [
            ("[bullmq]\nqueues = []\n", "bullmq.queues"),
            ("[bullmq]\nqueues = [\"a:b\"]\n", "bullmq.queues"),
            ("[bullmq]\nqueues = [\"a\", \"a\"]\n", "bullmq.queues"),
            ("[bullmq]\nconcurrency = 0\n", "bullmq.concurrency"),
            (
                "[bullmq]\ndrain_delay_secs = 0\n",
                "bullmq.drain_delay_secs",
            ),
        ] {
            let cfg = dir.path().join("c.toml");
            std::fs::write(&cfg, toml).unwrap();
            let e = Config::load_from(Some(&cfg), env(&[]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(expected), "{toml}: {e}");
        }
        let cfg = dir.path().join("off.toml");
        std::fs::write(&cfg, "[bullmq]\nenabled = false\nqueues = []\n").unwrap();
        assert!(Config::load_from(Some(&cfg), env(&[])).is_ok());
    }

    #[test]
    fn file_overrides_defaults_and_unknown_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.toml");
        std::fs::write(&good, "[sink]\nbatch_size = 250\n").unwrap();
        let c = Config::load_from(Some(&good), env(&[])).unwrap();
        assert_eq!(c.sink.batch_size, 250);

        let typo = dir.path().join("typo.toml");
        std::fs::write(&typo, "[sink]\nbatchsize = 250\n").unwrap();
        let e = Config::load_from(Some(&typo), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("batchsize"), "{e}");

        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "[sink]\nbatch_size = 0\n").unwrap();
        let e = Config::load_from(Some(&bad), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sink.batch_size"), "{e}");
    }

    #[test]
    fn the_ocsf_class_table_is_read_from_a_file_and_bad_rules_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("ocsf.toml");
        std::fs::write(
            &good,
            "[export]\nparquet_row_group_rows = 1000\n[export.ocsf]\nclass_map = [{ pattern = \"sso.*\", class_uid = 3002 }]\n",
        )
        .unwrap();
        let c = Config::load_from(Some(&good), env(&[])).unwrap();
        assert_eq!(c.export.parquet_row_group_rows, 1000);
        assert_eq!(c.export.ocsf.class_map.len(), 1);
        assert_eq!(c.export.ocsf.class_map[0].pattern, "sso.*");
        assert_eq!(c.export.ocsf.default_class_uid, 6003);

        for (toml, needle) in [
            (
                "[export.ocsf]\nclass_map = [{ pattern = \"x\", class_uid = 4001 }]\n",
                "export.ocsf.class_map[0] (pattern \"x\", class_uid 4001) is invalid",
            ),
            (
                "[export.ocsf]\nclass_map = [{ pattern = \"\", class_uid = 3001 }]\n",
                "the pattern must not be empty",
            ),
            (
                "[export.ocsf]\ndefault_class_uid = 1\n",
                "export.ocsf.default_class_uid",
            ),
            (
                "[export]\nparquet_row_group_rows = 0\n",
                "export.parquet_row_group_rows",
            ),
        ] {
            let bad = dir.path().join("bad.toml");
            std::fs::write(&bad, toml).unwrap();
            let e = Config::load_from(Some(&bad), env(&[]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{toml}: {e}");
        }
    }

    #[test]
    fn hmac_keys_parse_from_setting_and_file_and_secrets_stay_hidden() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        std::fs::write(&keys, "# rotation\nold=old-secret-value\n").unwrap();
        let cfg = dir.path().join("c.toml");
        std::fs::write(
            &cfg,
            format!(
                "[integrity]\nhmac_keys = \"new=new-secret-value\"\nhmac_keys_file = \"{}\"\n",
                keys.display()
            ),
        )
        .unwrap();
        let c = Config::load_from(Some(&cfg), env(&[])).unwrap();
        let ids: Vec<String> = c
            .integrity
            .hmac_key_entries()
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, vec!["new", "old"]);
        let debug = format!("{c:?}");
        assert!(!debug.contains("new-secret-value"), "{debug}");
    }

    #[test]
    fn live_reload_settings_default_off_and_bad_log_filters_are_refused() {
        let c = Config::load_from(None, env(&[])).unwrap();
        assert_eq!(c.reload.watch_interval_secs, 0);
        assert!(!c.reload.cache_path.is_empty());
        let dir = tempfile::tempdir().unwrap();
        for (toml, needle) in [
            ("[log]\nlevel = \"info,[[\"\n", "log.level"),
            ("[config]\ncache_path = \"\"\n", "config.cache_path"),
        ] {
            let cfg = dir.path().join("c.toml");
            std::fs::write(&cfg, toml).unwrap();
            let e = Config::load_from(Some(&cfg), env(&[]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{toml}: {e}");
        }
    }

    #[test]
    fn require_signature_without_keys_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.toml");
        std::fs::write(&cfg, "[validation]\nrequire_signature = true\n").unwrap();
        let e = Config::load_from(Some(&cfg), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("integrity.hmac_keys"), "{e}");
    }
}
