//! `[snapshot]`: the signed log.

use serde::Deserialize;

use super::{ConfigError, Secret};

/// `[snapshot]`: signed Merkle checkpoints over sealed events.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    pub enabled: bool,
    pub origin: String,
    pub signing_key: Secret,
    pub signing_key_file: String,
    /// Development runs only: create (once) and use a signing key under the
    /// user's data directory when none is configured (see
    /// `jobs::dev_key`).
    pub dev_signing_key: bool,
    pub verifier_key: String,
    pub interval_secs: u64,
    pub cron: String,
    pub settling_delay_secs: u64,
    pub lease_secs: u64,
    pub poll_interval_ms: u64,
    pub page_size: i32,
    pub manifest_prefix: String,
    /// `details.<key>` / `sessionContext.<key>` paths that enter the record
    /// digest as salted commitments, besides the fixed personal fields
    /// (their form is checked at start-up, where the record digest is built).
    pub personal_fields: Vec<String>,
    /// Seconds between checks that the database's log extends the last
    /// published checkpoint; 0: no monitor.
    pub monitor_interval_secs: u64,
}

impl SnapshotConfig {
    /// Checks the origin, intervals, page size and cron expression.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, why: &str| Err(ConfigError(format!("{key} {why}")));
        if self.origin.is_empty() || self.origin.chars().any(char::is_control) {
            return err(
                "snapshot.origin",
                "must be one non-empty line (it names the log in every checkpoint)",
            );
        }
        if self.interval_secs == 0 || self.lease_secs == 0 {
            return err(
                "snapshot.interval_secs / snapshot.lease_secs",
                "must be at least 1",
            );
        }
        if self.poll_interval_ms == 0 || !(1..=1_000_000).contains(&self.page_size) {
            return err(
                "snapshot.poll_interval_ms / snapshot.page_size",
                "need poll_interval_ms >= 1 and 1 <= page_size <= 1000000",
            );
        }
        if !self.cron.is_empty() {
            if let Err(e) = self.cron.parse::<croner::Cron>() {
                return Err(ConfigError(format!(
                    "snapshot.cron {:?} is not a cron expression ({e}): use e.g. \"0 * * * *\" or leave it empty for interval_secs",
                    self.cron
                )));
            }
        }
        Ok(())
    }
}
