//! `[gdpr]`: subject access (where a subject's id may appear) and erasure
//! (pseudonym key) settings.

use serde::Deserialize;

use super::{read_secret_file, ConfigError, Secret};

/// `[gdpr]`: where, besides principalId and targetResourceId, a subject's
/// id may appear in an event, and the key of the pseudonyms that replace
/// erased values.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GdprConfig {
    /// `details.<key>[.<key>...]` or `sessionContext.<key>[...]` paths whose
    /// string value, when it equals the subject's id, makes the event the
    /// subject's.
    pub subject_paths: Vec<String>,
    /// HMAC-SHA256 key of the pseudonyms (a secret: prefer the variable or
    /// the file).
    pub pseudonym_key: Secret,
    /// File holding the pseudonym key (first line; overrides
    /// `pseudonym_key`).
    pub pseudonym_key_file: String,
}

impl GdprConfig {
    /// Checks the form of every subject path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for path in &self.subject_paths {
            subject_path_parts(path)
                .map_err(|why| ConfigError(format!("gdpr.subject_paths entry {path:?} {why}")))?;
        }
        Ok(())
    }

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

/// Splits a subject path into its column (`details` or `session_context`)
/// and the keys below it.
pub fn subject_path_parts(path: &str) -> Result<(&'static str, Vec<String>), String> {
    let (column, rest) = if let Some(rest) = path.strip_prefix("details.") {
        ("details", rest)
    } else if let Some(rest) = path.strip_prefix("sessionContext.") {
        ("session_context", rest)
    } else {
        return Err("must start with \"details.\" or \"sessionContext.\"".into());
    };
    let keys: Vec<String> = rest.split('.').map(str::to_owned).collect();
    if keys.iter().any(String::is_empty) {
        return Err("has an empty key: write keys separated by single dots".into());
    }
    Ok((column, keys))
}
