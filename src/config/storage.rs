//! `[storage]`: where artifacts (exports, snapshot manifests) are kept.

use serde::Deserialize;

/// `[storage]`: where artifacts (exports, snapshot manifests) are kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    pub url: String,
}
