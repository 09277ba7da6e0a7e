//! `[database]`: PostgreSQL.

use serde::Deserialize;

use super::{ConfigError, Secret};

/// The accepted `database.sslmode` values, with libpq's meanings.
pub const SSL_MODES: [&str; 4] = ["disable", "require", "verify-ca", "verify-full"];

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
    /// `disable`, `require`, `verify-ca` or `verify-full` (see [`SSL_MODES`]).
    pub sslmode: String,
    /// PEM file of CA certificates for verify-ca / verify-full; empty:
    /// the system's trusted roots.
    pub tls_ca_file: String,
    pub partition_upkeep_interval_secs: u64,
    /// `lock_timeout` of partition DDL, in ms: a month that cannot get its
    /// lock in time is retried later instead of queueing every insert.
    pub ddl_lock_timeout_ms: u64,
    /// `statement_timeout` of the sink's connections, in ms (0: none).
    pub statement_timeout_ms: u64,
}

impl DatabaseConfig {
    /// Checks the URL scheme, TLS mode, schema name and intervals.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, why: &str| Err(ConfigError(format!("{key} {why}")));
        if !self.url.expose().starts_with("postgres://")
            && !self.url.expose().starts_with("postgresql://")
        {
            return err(
                "database.url",
                "must start with postgres:// or postgresql://",
            );
        }
        if !SSL_MODES.contains(&self.sslmode.as_str()) {
            return err(
                "database.sslmode",
                "must be disable, require, verify-ca or verify-full",
            );
        }
        if self.schema.is_empty()
            || !self
                .schema
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return err(
                "database.schema",
                "must be a plain identifier (letters, digits, _)",
            );
        }
        if self.partition_upkeep_interval_secs == 0 {
            return err(
                "database.partition_upkeep_interval_secs",
                "must be at least 1",
            );
        }
        if self.ddl_lock_timeout_ms == 0 {
            return err(
                "database.ddl_lock_timeout_ms",
                "must be at least 1 (0 would let partition DDL wait for its lock forever)",
            );
        }
        Ok(())
    }
}
