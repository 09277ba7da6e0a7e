//! `[gdpr]` settings of subject access requests (`gdpr.access`).

use serde::Deserialize;

use super::ConfigError;

/// `[gdpr]`: where, besides principalId and targetResourceId, a subject's
/// id may appear in an event.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GdprConfig {
    /// `details.<key>[.<key>...]` or `sessionContext.<key>[...]` paths whose
    /// string value, when it equals the subject's id, makes the event the
    /// subject's.
    pub subject_paths: Vec<String>,
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
