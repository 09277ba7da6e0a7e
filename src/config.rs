//! Typed configuration: `config/default.toml` (built in) < `--config FILE`
//! < `AUDIT_WORKER__SECTION__KEY` environment variables.
//!
//! The built-in default file is the single source of defaults, so the
//! documented values and the real ones cannot drift apart. Unknown keys are
//! rejected so that a misspelt setting fails loudly.

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;

use crate::event::ValidationPolicy;
use crate::integrity::{HmacKey, HmacKeyRing};

/// The documented defaults, compiled in.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Prefix of the environment variables that override settings.
pub const ENV_PREFIX: &str = "AUDIT_WORKER__";

/// A configuration problem, phrased as what to fix.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

/// A secret string: `Debug` and `Display` never show it.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Whether no secret was given.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "[redacted]"
        })
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
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
    pub snapshot: SnapshotConfig,
    pub telemetry: crate::telemetry::TelemetryConfig,
    pub alerts: crate::alerts::AlertsConfig,
}

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

/// `[stream]`: the Redis Streams source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    pub enabled: bool,
    pub key: String,
    pub group: String,
    pub consumer: String,
    pub read_count: usize,
    pub block_ms: u64,
    pub claim_idle_ms: u64,
    pub claim_interval_ms: u64,
    pub max_in_flight_batches: usize,
    pub delete_acked: bool,
    pub max_deliveries: u64,
}

/// `[bullmq]`: the BullMQ source (DESIGN.md section 3). Times are in the
/// units BullMQ itself uses, and the defaults are BullMQ's own unless the
/// default file says why not.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BullmqConfig {
    pub enabled: bool,
    pub queues: Vec<String>,
    pub prefix: String,
    pub concurrency: usize,
    pub workers_per_queue: usize,
    pub lock_duration_ms: u64,
    pub stalled_interval_ms: u64,
    pub max_stalled_count: u32,
    pub drain_delay_secs: u64,
    pub outage_retry_delay_ms: u64,
    pub close_timeout_ms: u64,
    pub max_in_flight_data_bytes: u64,
}

/// `[dlq]`: the dead-letter stream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DlqConfig {
    pub key: String,
    pub alert_threshold: u64,
    pub alert_window_secs: u64,
}

/// `[database]`: PostgreSQL.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    pub url: Secret,
    pub password: Secret,
    pub password_file: String,
    pub schema: String,
    pub pool_size: usize,
    pub connect_timeout_secs: u64,
    pub migrate_on_start: bool,
    pub partitions_ahead_months: u32,
    /// `disable`, `require`, `verify-ca` or `verify-full` (see crate::pgtls).
    pub sslmode: String,
    /// PEM file of CA certificates for verify-ca / verify-full; empty:
    /// the system's trusted roots.
    pub tls_ca_file: String,
    pub partition_upkeep_interval_secs: u64,
}

/// `[sink]`: batching and retries of database writes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    pub batch_size: usize,
    pub max_wait_ms: u64,
    pub writers: usize,
    pub retry_max_attempts: u32,
    pub retry_base_ms: u64,
    pub retry_factor: f64,
    pub retry_cap_ms: u64,
    pub retry_jitter: f64,
    pub breaker_failure_threshold: u32,
    pub breaker_recovery_secs: u64,
}

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

/// `[integrity]`: HMAC keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntegrityConfig {
    pub hmac_keys: Secret,
    pub hmac_keys_file: String,
}

/// `[http]`: the health and metrics listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: String,
}

/// `[storage]`: where artifacts (exports, snapshot manifests) are kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    pub url: String,
}

/// `[export]`: compliance exports (`export.audit` jobs), their executor,
/// sweep, notifications and signed download links.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    pub enabled: bool,
    pub part_rows: u64,
    pub page_rows: u32,
    pub concurrency: usize,
    pub poll_interval_ms: u64,
    pub lease_secs: u64,
    pub max_attempts: i32,
    pub retry_delay_secs: u64,
    pub gzip_level: u32,
    pub zstd_level: i32,
    pub job_expiry_secs: u64,
    pub download_expiry_secs: u64,
    pub sweep_interval_secs: u64,
    pub notifications_key: String,
    pub link_secret: Secret,
    pub link_secret_file: String,
    pub link_ttl_secs: u64,
    pub public_base_url: String,
}

/// `[snapshot]`: signed Merkle checkpoints over sealed events (issue 6).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    pub enabled: bool,
    pub origin: String,
    pub signing_key: Secret,
    pub signing_key_file: String,
    pub verifier_key: String,
    pub interval_secs: u64,
    pub cron: String,
    pub settling_delay_secs: u64,
    pub lease_secs: u64,
    pub poll_interval_ms: u64,
    pub page_size: i32,
    pub manifest_prefix: String,
    /// `details.<key>` / `sessionContext.<key>` paths that enter the record
    /// digest as salted commitments, besides the fixed personal fields.
    pub personal_fields: Vec<String>,
    /// Seconds between checks that the database's log extends the last
    /// published checkpoint; 0: no monitor.
    pub monitor_interval_secs: u64,
}

/// `[log]`: log format and filter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: String,
    pub level: String,
}

impl Config {
    /// Loads defaults, then `file` if given, then the environment, and
    /// validates the result.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, Env::prefixed(ENV_PREFIX).split("__"))
    }

    /// Like [`Config::load`] with an explicit environment provider (tests).
    pub fn load_from(file: Option<&Path>, env: Env) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError(format!(
                    "config file {} does not exist: check the --config path",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file(path));
        }
        let config: Config = figment.merge(env).extract().map_err(|e| {
            let text: Vec<String> = e
                .into_iter()
                .map(|err| {
                    let setting = err.path.join(".").to_lowercase();
                    let origin = err
                        .metadata
                        .as_ref()
                        .map(|m| m.interpolate(&err.profile.clone().unwrap_or_default(), &err.path))
                        .unwrap_or_default();
                    match (setting.is_empty(), origin.is_empty()) {
                        (true, _) => err.kind.to_string(),
                        (false, true) => format!("{setting}: {}", err.kind),
                        (false, false) => format!("{setting} (from {origin}): {}", err.kind),
                    }
                })
                .collect();
            ConfigError(format!(
                "{}: fix the value in the config file or the AUDIT_WORKER__* variable",
                text.join("; ")
            ))
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but make no sense, naming the setting.
    fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, why: &str| Err(ConfigError(format!("{key} {why}")));
        if !(self.redis.url.expose().starts_with("redis://")
            || self.redis.url.expose().starts_with("rediss://")
            || self.redis.url.expose().starts_with("unix://"))
        {
            return err(
                "redis.url",
                "must start with redis://, rediss:// or unix://",
            );
        }
        if !self.redis.tls_ca_file.is_empty() && !self.redis.url.expose().starts_with("rediss://") {
            return err(
                "redis.tls_ca_file",
                "is set but redis.url does not start with rediss:// (TLS)",
            );
        }
        if self.stream.key.is_empty() || self.stream.group.is_empty() {
            return err("stream.key / stream.group", "must not be empty");
        }
        if self.dlq.key.is_empty() || self.dlq.key == self.stream.key {
            return err("dlq.key", "must be set and differ from stream.key");
        }
        if self.stream.read_count == 0 || self.stream.max_in_flight_batches == 0 {
            return err(
                "stream.read_count / stream.max_in_flight_batches",
                "must be at least 1",
            );
        }
        if self.stream.block_ms == 0 {
            return err(
                "stream.block_ms",
                "must be at least 1 (0 would block forever)",
            );
        }
        self.validate_bullmq()?;
        if !self.database.url.expose().starts_with("postgres://")
            && !self.database.url.expose().starts_with("postgresql://")
        {
            return err(
                "database.url",
                "must start with postgres:// or postgresql://",
            );
        }
        if crate::pgtls::SslMode::parse(&self.database.sslmode).is_none() {
            return err(
                "database.sslmode",
                "must be disable, require, verify-ca or verify-full",
            );
        }
        if self.database.schema.is_empty()
            || !self
                .database
                .schema
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return err(
                "database.schema",
                "must be a plain identifier (letters, digits, _)",
            );
        }
        if self.database.pool_size < self.sink.writers + 1 {
            return err(
                "database.pool_size",
                "must exceed sink.writers (one connection is kept for health checks and partitions)",
            );
        }
        if self.sink.batch_size == 0 || self.sink.batch_size > 10_000 {
            return err("sink.batch_size", "must be between 1 and 10000");
        }
        if self.sink.breaker_failure_threshold == 0 || self.sink.breaker_recovery_secs == 0 {
            return err(
                "sink.breaker_failure_threshold / sink.breaker_recovery_secs",
                "must be at least 1",
            );
        }
        if self.stream.max_deliveries == 0 {
            return err("stream.max_deliveries", "must be at least 1");
        }
        if self.sink.writers == 0 {
            return err("sink.writers", "must be at least 1");
        }
        if self.sink.retry_max_attempts == 0 {
            return err("sink.retry_max_attempts", "must be at least 1");
        }
        if self.sink.retry_factor < 1.0 || !(0.0..=1.0).contains(&self.sink.retry_jitter) {
            return err(
                "sink.retry_factor / sink.retry_jitter",
                "need factor >= 1 and 0 <= jitter <= 1",
            );
        }
        if self.validation.max_event_bytes == 0 || self.validation.max_string_chars == 0 {
            return err(
                "validation.max_event_bytes / max_string_chars",
                "must be at least 1",
            );
        }
        if self.validation.max_event_age_days <= 0 || self.validation.max_future_skew_secs < 0 {
            return err(
                "validation.max_event_age_days",
                "must be positive (and max_future_skew_secs >= 0)",
            );
        }
        if self.http.listen.parse::<std::net::SocketAddr>().is_err() {
            return err("http.listen", "must be an address like 0.0.0.0:3001");
        }
        if !["auto", "json", "text"].contains(&self.log.format.as_str()) {
            return err("log.format", "must be auto, json or text");
        }
        crate::jobs::export::validate_config(&self.export).map_err(ConfigError)?;
        if self.snapshot.origin.is_empty() || self.snapshot.origin.chars().any(char::is_control) {
            return err(
                "snapshot.origin",
                "must be one non-empty line (it names the log in every checkpoint)",
            );
        }
        if self.snapshot.interval_secs == 0 || self.snapshot.lease_secs == 0 {
            return err(
                "snapshot.interval_secs / snapshot.lease_secs",
                "must be at least 1",
            );
        }
        if self.snapshot.poll_interval_ms == 0
            || !(1..=1_000_000).contains(&self.snapshot.page_size)
        {
            return err(
                "snapshot.poll_interval_ms / snapshot.page_size",
                "need poll_interval_ms >= 1 and 1 <= page_size <= 1000000",
            );
        }
        if let Err(e) =
            crate::integrity::record::PersonalFields::with_extra(&self.snapshot.personal_fields)
        {
            return Err(ConfigError(format!("snapshot.personal_fields: {e}")));
        }
        if !self.snapshot.cron.is_empty() {
            if let Err(e) = self.snapshot.cron.parse::<croner::Cron>() {
                return Err(ConfigError(format!(
                    "snapshot.cron {:?} is not a cron expression ({e}): use e.g. \"0 * * * *\" or leave it empty for interval_secs",
                    self.snapshot.cron
                )));
            }
        }
        if self.database.partition_upkeep_interval_secs == 0 {
            return err(
                "database.partition_upkeep_interval_secs",
                "must be at least 1",
            );
        }
        self.telemetry.validate().map_err(ConfigError)?;
        self.alerts.validate().map_err(ConfigError)?;
        let keys = self.hmac_keys()?;
        if self.validation.require_signature && keys.is_empty() {
            return err(
                "validation.require_signature",
                "is on but no HMAC key is configured: set integrity.hmac_keys or integrity.hmac_keys_file",
            );
        }
        Ok(())
    }

    /// Checks `[bullmq]` (only when the source is enabled).
    fn validate_bullmq(&self) -> Result<(), ConfigError> {
        let b = &self.bullmq;
        let err = |key: &str, why: &str| Err(ConfigError(format!("{key} {why}")));
        if !b.enabled {
            return Ok(());
        }
        if b.queues.is_empty() {
            return err(
                "bullmq.queues",
                "must name at least one queue (or set bullmq.enabled = false)",
            );
        }
        for (i, q) in b.queues.iter().enumerate() {
            if q.is_empty() || q.contains(':') {
                return err(
                    "bullmq.queues",
                    "must hold non-empty queue names without ':' (BullMQ uses ':' in its keys)",
                );
            }
            if b.queues[..i].contains(q) {
                return err("bullmq.queues", "must not name the same queue twice");
            }
        }
        if b.prefix.is_empty() || b.prefix.contains(':') {
            return err(
                "bullmq.prefix",
                "must be non-empty and without ':' (BullMQ's default is \"bull\")",
            );
        }
        if b.concurrency == 0 || b.concurrency > 10_000 {
            return err("bullmq.concurrency", "must be between 1 and 10000");
        }
        if !(1..=64).contains(&self.bullmq.workers_per_queue)
            || self.bullmq.workers_per_queue > self.bullmq.concurrency
        {
            return err(
                "bullmq.workers_per_queue",
                "must be between 1 and 64, and at most bullmq.concurrency",
            );
        }
        if b.lock_duration_ms < 1_000 || b.stalled_interval_ms == 0 {
            return err(
                "bullmq.lock_duration_ms / stalled_interval_ms",
                "need lock_duration_ms >= 1000 and stalled_interval_ms >= 1",
            );
        }
        if b.drain_delay_secs == 0 {
            return err(
                "bullmq.drain_delay_secs",
                "must be at least 1 (0 would block forever)",
            );
        }
        if b.outage_retry_delay_ms == 0 {
            return err("bullmq.outage_retry_delay_ms", "must be at least 1");
        }
        if (b.max_in_flight_data_bytes as usize) < self.validation.max_event_bytes {
            return err(
                "bullmq.max_in_flight_data_bytes",
                "must be at least validation.max_event_bytes (one valid job must fit)",
            );
        }
        Ok(())
    }

    /// The configured HMAC keys, from `integrity.hmac_keys` and the key file.
    pub fn hmac_keys(&self) -> Result<HmacKeyRing, ConfigError> {
        let mut keys = Vec::new();
        let mut parse = |entry: &str, origin: &str| -> Result<(), ConfigError> {
            let entry = entry.trim();
            if entry.is_empty() || entry.starts_with('#') {
                return Ok(());
            }
            match entry.split_once('=') {
                Some((id, secret)) if !id.trim().is_empty() && !secret.is_empty() => {
                    keys.push(HmacKey::new(id.trim(), secret.as_bytes()));
                    Ok(())
                }
                _ => Err(ConfigError(format!(
                    "{origin} has an entry that is not \"id=secret\" (the secret is not shown)"
                ))),
            }
        };
        for entry in self.integrity.hmac_keys.expose().split(',') {
            parse(entry, "integrity.hmac_keys")?;
        }
        if !self.integrity.hmac_keys_file.is_empty() {
            let path = &self.integrity.hmac_keys_file;
            let text = read_secret_file(path, "integrity.hmac_keys_file")?;
            for line in text.lines() {
                parse(line, "integrity.hmac_keys_file")?;
            }
        }
        Ok(HmacKeyRing::new(keys))
    }

    /// The secret that signs export download links, from
    /// `export.link_secret_file` or `export.link_secret`; `None` when
    /// neither is set (downloads by link are then refused).
    pub fn export_link_secret(&self) -> Result<Option<Secret>, ConfigError> {
        if !self.export.link_secret_file.is_empty() {
            let text = read_secret_file(&self.export.link_secret_file, "export.link_secret_file")?;
            let first = text.lines().next().unwrap_or("").to_owned();
            return Ok((!first.is_empty()).then_some(Secret(first)));
        }
        Ok((!self.export.link_secret.is_empty()).then(|| self.export.link_secret.clone()))
    }

    /// The database password from `password_file`, `password`, or none.
    pub fn database_password(&self) -> Result<Option<Secret>, ConfigError> {
        if !self.database.password_file.is_empty() {
            let text = read_secret_file(&self.database.password_file, "database.password_file")?;
            return Ok(Some(Secret(text.lines().next().unwrap_or("").to_owned())));
        }
        Ok((!self.database.password.is_empty()).then(|| self.database.password.clone()))
    }

    /// The validation policy the processor applies.
    pub fn validation_policy(&self) -> Result<ValidationPolicy, ConfigError> {
        let v = &self.validation;
        Ok(ValidationPolicy {
            max_event_bytes: v.max_event_bytes,
            max_string_chars: v.max_string_chars,
            max_custom_depth: v.max_custom_depth,
            max_event_age: chrono::Duration::days(v.max_event_age_days),
            max_future_skew: chrono::Duration::seconds(v.max_future_skew_secs),
            require_hash: v.require_hash,
            require_signature: v.require_signature,
            hmac_keys: self.hmac_keys()?,
        })
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

impl SinkConfig {
    /// How long a row waits for its batch to fill.
    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms)
    }
}

/// Reads a secret file, warning when others may read it.
pub(crate) fn read_secret_file(path: &str, setting: &str) -> Result<String, ConfigError> {
    let path = PathBuf::from(path);
    #[cfg(unix)]
    if let Ok(meta) = std::fs::metadata(&path) {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                file = %path.display(),
                "{setting}: secret file is readable by group or others; chmod 600 it"
            );
        }
    }
    std::fs::read_to_string(&path).map_err(|e| {
        ConfigError(format!(
            "{setting}: cannot read {} ({e}): fix the path or its permissions",
            path.display()
        ))
    })
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
        assert_eq!(c.hmac_keys().unwrap().ids(), vec!["new", "old"]);
        let debug = format!("{c:?}");
        assert!(!debug.contains("new-secret-value"), "{debug}");
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
