//! `[integrity]`: HMAC keys.

use serde::Deserialize;

use super::{read_secret_file, ConfigError, Secret};

/// `[integrity]`: HMAC keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntegrityConfig {
    pub hmac_keys: Secret,
    pub hmac_keys_file: String,
}

impl IntegrityConfig {
    /// The configured HMAC keys as (id, secret) pairs, from `hmac_keys`
    /// and the key file, in that order; the domain builds its key ring
    /// from them.
    pub fn hmac_key_entries(&self) -> Result<Vec<(String, Secret)>, ConfigError> {
        let mut keys = Vec::new();
        let mut parse = |entry: &str, origin: &str| -> Result<(), ConfigError> {
            let entry = entry.trim();
            if entry.is_empty() || entry.starts_with('#') {
                return Ok(());
            }
            match entry.split_once('=') {
                Some((id, secret)) if !id.trim().is_empty() && !secret.is_empty() => {
                    keys.push((id.trim().to_owned(), Secret::from(secret.to_owned())));
                    Ok(())
                }
                _ => Err(ConfigError(format!(
                    "{origin} has an entry that is not \"id=secret\" (the secret is not shown)"
                ))),
            }
        };
        for entry in self.hmac_keys.expose().split(',') {
            parse(entry, "integrity.hmac_keys")?;
        }
        if !self.hmac_keys_file.is_empty() {
            let path = &self.hmac_keys_file;
            let text = read_secret_file(path, "integrity.hmac_keys_file")?;
            for line in text.lines() {
                parse(line, "integrity.hmac_keys_file")?;
            }
        }
        Ok(keys)
    }
}
