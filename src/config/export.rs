//! `[export]`: compliance exports.

use serde::Deserialize;

use super::Secret;

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
    /// Organisations that queue-submitted requests may cover; `["*"]`: all.
    pub queue_organizations: Vec<String>,
}

impl ExportConfig {
    /// Checks `[export]` values that parse but make no sense.
    pub fn validate(&self) -> Result<(), String> {
        let c = self;
        let bad = |key: &str, why: &str| Err(format!("export.{key} {why}"));
        if c.part_rows == 0 || c.page_rows == 0 {
            return bad("part_rows / page_rows", "must be at least 1");
        }
        if c.concurrency == 0 {
            return bad("concurrency", "must be at least 1");
        }
        if c.lease_secs < 2 {
            return bad("lease_secs", "must be at least 2");
        }
        if c.max_attempts < 1 {
            return bad("max_attempts", "must be at least 1");
        }
        if c.gzip_level > 9 {
            return bad("gzip_level", "must be between 0 and 9");
        }
        if !(1..=22).contains(&c.zstd_level) {
            return bad("zstd_level", "must be between 1 and 22");
        }
        if c.job_expiry_secs == 0 || c.download_expiry_secs == 0 || c.sweep_interval_secs == 0 {
            return bad(
                "job_expiry_secs / download_expiry_secs / sweep_interval_secs",
                "must be at least 1",
            );
        }
        if c.queue_organizations.is_empty()
            || c.queue_organizations.iter().any(|o| o.trim().is_empty())
            || (c.queue_organizations.len() > 1 && c.queue_organizations.iter().any(|o| o == "*"))
        {
            return bad(
                "queue_organizations",
                "must be [\"*\"] (every organisation) or a list of organisation ids",
            );
        }
        if c.notifications_key.is_empty() {
            return bad("notifications_key", "must not be empty");
        }
        Ok(())
    }

    /// The organisations queue requests may cover: `None` for all.
    pub fn queue_scope(&self) -> Option<Vec<String>> {
        (self.queue_organizations != ["*"]).then(|| self.queue_organizations.clone())
    }
}
