//! Secrets in the configuration: a string type whose `Debug` never shows
//! it, and reading secret files (warning when others may read them).

use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;

/// A secret string: `Debug` and `Display` never show it.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Whether no secret was given.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "[redacted]"
        })
    }
}

/// Reads a secret file, warning when others may read it.
pub fn read_secret_file(path: &str, setting: &str) -> Result<String, ConfigError> {
    let path = PathBuf::from(path);
    #[cfg(unix)]
    if let Ok(meta) = std::fs::metadata(&path) {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                file = %path.display(),
                "{setting}: secret file is readable by group or others; chmod 600 it"
            );
        }
    }
    std::fs::read_to_string(&path).map_err(|e| {
        ConfigError(format!(
            "{setting}: cannot read {} ({e}): fix the path or its permissions",
            path.display()
        ))
    })
}
