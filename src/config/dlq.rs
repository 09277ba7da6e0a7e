//! `[dlq]`: the dead-letter stream.

use serde::Deserialize;

/// `[dlq]`: the dead-letter stream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DlqConfig {
    pub key: String,
    pub alert_threshold: u64,
    pub alert_window_secs: u64,
}
