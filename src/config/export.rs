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
    /// Rows per Parquet row group (bounds the memory of a parquet export).
    pub parquet_row_group_rows: u64,
    pub ocsf: OcsfConfig,
}

/// `[export.ocsf]`: how audit rows become OCSF events (the `ocsf` format
/// and `parquet` with `parquetSchema: "ocsf"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OcsfConfig {
    /// `metadata.product.name` of every event.
    pub product_name: String,
    /// `metadata.product.vendor_name` of every event.
    pub vendor_name: String,
    /// The class of actions no rule matches.
    pub default_class_uid: u32,
    /// Ordered action-pattern rules; the first match decides the class.
    pub class_map: Vec<OcsfClassRule>,
}

/// One `export.ocsf.class_map` rule: actions matching `pattern` become
/// events of OCSF class `class_uid`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OcsfClassRule {
    pub pattern: String,
    pub class_uid: u32,
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
        if let Err(why) = super::queue_scope::check(&c.queue_organizations) {
            return bad("queue_organizations", why);
        }
        if c.parquet_row_group_rows == 0 {
            return bad("parquet_row_group_rows", "must be at least 1");
        }
        if c.ocsf.product_name.is_empty() || c.ocsf.vendor_name.is_empty() {
            return bad(
                "ocsf.product_name / ocsf.vendor_name",
                "must not be empty (they name the source in every OCSF event)",
            );
        }
        let supported = [3001, 3002, 6003];
        for (i, r) in c.ocsf.class_map.iter().enumerate() {
            if r.pattern.is_empty() || !supported.contains(&r.class_uid) {
                return Err(format!(
                    "export.ocsf.class_map[{i}] (pattern {:?}, class_uid {}) is invalid: the pattern must not be empty and class_uid must be 3001 (Account Change), 3002 (Authentication) or 6003 (API Activity)",
                    r.pattern, r.class_uid
                ));
            }
        }
        if !supported.contains(&c.ocsf.default_class_uid) {
            return bad(
                "ocsf.default_class_uid",
                "must be 3001 (Account Change), 3002 (Authentication) or 6003 (API Activity)",
            );
        }
        if c.notifications_key.is_empty() {
            return bad("notifications_key", "must not be empty");
        }
        Ok(())
    }

    /// The organisations queue requests may cover: `None` for all.
    pub fn queue_scope(&self) -> Option<Vec<String>> {
        super::queue_scope::scope(&self.queue_organizations)
    }
}
