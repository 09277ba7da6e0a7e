//! `[gdpr]`: erasure (pseudonym key) settings.

use serde::Deserialize;

use super::{read_secret_file, ConfigError, Secret};

/// `[gdpr]`: the key of the pseudonyms that replace erased values.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GdprConfig {
    /// HMAC-SHA256 key of the pseudonyms (a secret: prefer the variable or
    /// the file).
    pub pseudonym_key: Secret,
    /// File holding the pseudonym key (first line; overrides
    /// `pseudonym_key`).
    pub pseudonym_key_file: String,
}

impl GdprConfig {
    /// The pseudonym key from the file or the setting; erasure cannot run
    /// without one, and the error says how to give it.
    pub fn pseudonym_key(&self) -> Result<Secret, ConfigError> {
        let key = if self.pseudonym_key_file.is_empty() {
            self.pseudonym_key.clone()
        } else {
            let text = read_secret_file(&self.pseudonym_key_file, "gdpr.pseudonym_key_file")?;
            Secret::from(text.lines().next().unwrap_or_default().trim().to_owned())
        };
        if key.expose().len() < 16 {
            return Err(ConfigError(
                "gdpr.pseudonym_key must be at least 16 characters (set \
                 AUDIT_WORKER__GDPR__PSEUDONYM_KEY or gdpr.pseudonym_key_file; e.g. \
                 `openssl rand -hex 32`); it must differ from the HMAC event keys"
                    .into(),
            ));
        }
        Ok(key)
    }
}
