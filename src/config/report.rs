//! `[report]`: compliance reports.

use serde::Deserialize;

/// `[report]`: compliance reports (`report.compliance` jobs), their
/// executor and what the HIPAA report counts as after hours or break-glass.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportConfig {
    pub enabled: bool,
    pub working_hours: String,
    pub working_days: Vec<String>,
    pub timezone: String,
    pub break_glass_actions: Vec<String>,
    pub top_n: usize,
    pub counter_capacity: usize,
    pub page_rows: u32,
    pub poll_interval_ms: u64,
    pub lease_secs: u64,
    pub max_attempts: i32,
    pub retry_delay_secs: u64,
    pub download_expiry_secs: u64,
    pub prefix: String,
    /// Organisations that queue-submitted report requests may cover;
    /// `["*"]`: all.
    pub queue_organizations: Vec<String>,
}

impl ReportConfig {
    /// Checks `[report]` values that parse but make no sense (the working
    /// hours are parsed by the report module, which reports its own errors
    /// when the worker or the CLI starts).
    pub fn validate(&self) -> Result<(), String> {
        let bad = |key: &str, why: &str| Err(format!("report.{key} {why}"));
        if self.top_n == 0 || self.counter_capacity < self.top_n {
            return bad(
                "top_n / counter_capacity",
                "must be at least 1, and counter_capacity at least top_n",
            );
        }
        if self.page_rows == 0 {
            return bad("page_rows", "must be at least 1");
        }
        if self.lease_secs < 2 {
            return bad("lease_secs", "must be at least 2");
        }
        if self.max_attempts < 1 {
            return bad("max_attempts", "must be at least 1");
        }
        if self.download_expiry_secs == 0 {
            return bad("download_expiry_secs", "must be at least 1");
        }
        if self.prefix.is_empty() || self.prefix.starts_with('/') || self.prefix.contains("..") {
            return bad(
                "prefix",
                "must be a relative object key prefix such as \"reports\"",
            );
        }
        if let Err(why) = super::queue_scope::check(&self.queue_organizations) {
            return bad("queue_organizations", why);
        }
        Ok(())
    }

    /// The organisations queue requests may cover: `None` for all.
    pub fn queue_scope(&self) -> Option<Vec<String>> {
        super::queue_scope::scope(&self.queue_organizations)
    }
}
