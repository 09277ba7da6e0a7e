//! A development signing key, so that `./scripts/run.sh` on a fresh machine
//! can take an `audit.snapshot` job without any set-up.
//!
//! Only when asked (`snapshot.dev_signing_key`, which `scripts/run.sh`
//! turns on when it is given no `--config`), only without a configuration
//! file, and only when no signing key is configured: a deployment never
//! signs its log with a key it made for itself. The key lives outside the
//! repository, under the user's data directory, and is reused by later runs.

use std::path::{Path, PathBuf};

use crate::config::Config;

/// The file name under `<data dir>/audit-worker/`.
const FILE_NAME: &str = "dev-signing-key";

/// What to do about a development key for this configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DevKey {
    /// Not asked for, or a signing key is configured: nothing to do.
    NotWanted,
    /// Asked for together with a configuration file: refused.
    RefusedWithConfigFile,
    /// Use (creating it first if missing) the key at this path.
    Use(PathBuf),
}

/// Decides, without I/O, whether a development key applies. `data_home` is
/// `$XDG_DATA_HOME`, else `$HOME/.local/share` (None: neither is set).
pub fn decide(config: &Config, config_file_given: bool, data_home: Option<&Path>) -> DevKey {
    let snapshot = &config.snapshot;
    if !snapshot.dev_signing_key
        || !snapshot.signing_key.is_empty()
        || !snapshot.signing_key_file.is_empty()
    {
        return DevKey::NotWanted;
    }
    if config_file_given {
        return DevKey::RefusedWithConfigFile;
    }
    match data_home {
        Some(dir) => DevKey::Use(dir.join("audit-worker").join(FILE_NAME)),
        None => DevKey::NotWanted,
    }
}

/// The user's data directory: `$XDG_DATA_HOME`, else `$HOME/.local/share`.
pub fn data_home() -> Option<PathBuf> {
    let nonempty = |v: std::ffi::OsString| (!v.is_empty()).then(|| PathBuf::from(v));
    std::env::var_os("XDG_DATA_HOME")
        .and_then(nonempty)
        .or_else(|| {
            std::env::var_os("HOME")
                .and_then(nonempty)
                .map(|h| h.join(".local").join("share"))
        })
}

/// Applies [`decide`]: creates the key when missing (directory mode 0700,
/// file 0600), says so in the log, and points `snapshot.signing_key_file`
/// at it. Errors are configuration errors (the caller exits with code 2).
pub fn apply(config: &mut Config, config_file_given: bool) -> anyhow::Result<()> {
    match decide(config, config_file_given, data_home().as_deref()) {
        DevKey::NotWanted => Ok(()),
        DevKey::RefusedWithConfigFile => anyhow::bail!(
            "snapshot.dev_signing_key is only for development runs without --config: \
             configure snapshot.signing_key_file (made with `audit-worker keygen`) instead"
        ),
        DevKey::Use(path) => {
            if path.exists() {
                tracing::info!(path = %path.display(), "using the development snapshot signing key (development only)");
            } else {
                if let Some(dir) = path.parent() {
                    create_private_dir(dir)?;
                }
                let verifier = super::snapshot_cli::keygen(&config.snapshot.origin, &path, false)?;
                tracing::warn!(
                    path = %path.display(),
                    verifier_key = %verifier,
                    "created a development snapshot signing key (snapshot.dev_signing_key): \
                     for development only; a deployment configures its own key with \
                     snapshot.signing_key_file"
                );
            }
            config.snapshot.signing_key_file = path.display().to_string();
            Ok(())
        }
    }
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create {} for the development signing key",
            dir.display()
        )
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot restrict {} to its owner", dir.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dev: bool) -> Config {
        let mut c = Config::load_from(
            None,
            figment::providers::Env::prefixed("AUDIT_WORKER_UNIT_UNSET__"),
        )
        .unwrap();
        c.snapshot.dev_signing_key = dev;
        c
    }

    #[test]
    fn a_development_key_is_used_only_when_asked_without_a_file_or_a_key() {
        let home = Path::new("/data");
        let want = DevKey::Use(PathBuf::from("/data/audit-worker/dev-signing-key"));
        assert_eq!(decide(&config(true), false, Some(home)), want);
        assert_eq!(decide(&config(false), false, Some(home)), DevKey::NotWanted);
        assert_eq!(
            decide(&config(true), true, Some(home)),
            DevKey::RefusedWithConfigFile
        );
        let mut keyed = config(true);
        keyed.snapshot.signing_key_file = "/etc/audit-worker/key".into();
        assert_eq!(decide(&keyed, false, Some(home)), DevKey::NotWanted);
        assert_eq!(decide(&config(true), false, None), DevKey::NotWanted);
    }
}
