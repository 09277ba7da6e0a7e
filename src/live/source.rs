//! Where the configuration document comes from: a local file, or an object
//! in the object store (`s3://bucket/key`, or `file:///dir/key` for the
//! local store), with a last good local copy for starts while the store
//! cannot be reached.

use std::path::{Path, PathBuf};

use figment::providers::Env;
use object_store::ObjectStoreExt;

use crate::config::{Config, ConfigError, ReloadConfig, Settings, StorageConfig};

/// The `--config` argument, opened.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// A TOML file on local disk, read directly.
    File(PathBuf),
    /// An object in the object store.
    Stored {
        /// The `--config` URL, for messages.
        url: String,
        store: crate::storage::Storage,
        key: object_store::path::Path,
    },
}

impl ConfigSource {
    /// Opens `arg`: `s3://bucket/key` (credentials and endpoint from the
    /// `AWS_*` variables, as for `storage.url`), `file:///dir/key` (the
    /// local store), or else a path to a file.
    pub fn open(arg: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| {
            ConfigError(format!(
                "--config {arg}: {why}: give a file path, s3://bucket/key or file:///dir/key"
            ))
        };
        let (store_url, key) = if let Some(rest) = arg.strip_prefix("s3://") {
            match rest.split_once('/') {
                Some((bucket, key)) if !bucket.is_empty() && !key.is_empty() => {
                    (format!("s3://{bucket}"), key.to_owned())
                }
                _ => return Err(bad("the URL names no object key")),
            }
        } else if let Some(path) = arg.strip_prefix("file://") {
            let path = Path::new(path);
            match (path.parent(), path.file_name()) {
                (Some(dir), Some(name)) if path.is_absolute() => (
                    format!("file://{}", dir.display()),
                    name.to_string_lossy().into_owned(),
                ),
                _ => return Err(bad("a file:// URL needs an absolute path to a file")),
            }
        } else {
            return Ok(Self::File(PathBuf::from(arg)));
        };
        let store = crate::storage::open(&StorageConfig { url: store_url })
            .map_err(|e| bad(&e.to_string()))?;
        Ok(Self::Stored {
            url: arg.to_owned(),
            store,
            key: object_store::path::Path::from(key),
        })
    }

    /// The source as given, for logs and `/health`.
    pub fn describe(&self) -> String {
        match self {
            Self::File(path) => path.display().to_string(),
            Self::Stored { url, .. } => url.clone(),
        }
    }

    /// Reads the document.
    pub async fn fetch(&self) -> Result<Vec<u8>, String> {
        match self {
            Self::File(path) => tokio::fs::read(path).await.map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => format!(
                    "config file {} does not exist: check the --config path",
                    path.display()
                ),
                _ => format!(
                    "cannot read config file {} ({e}): check its permissions",
                    path.display()
                ),
            }),
            Self::Stored { url, store, key } => {
                let got = async { store.store.get(key).await?.bytes().await }.await;
                got.map(|b| b.to_vec()).map_err(|e| {
                    format!("cannot read the configuration from {url} ({e}): check the object exists and the store is reachable (AWS_* credentials and endpoint for s3://)")
                })
            }
        }
    }

    /// Whether a last good local copy is kept (documents from the store).
    fn keeps_local_copy(&self) -> bool {
        matches!(self, Self::Stored { .. })
    }
}

/// The configuration the worker starts with.
#[derive(Debug)]
pub struct StartConfig {
    /// Where reloads read from (`None`: no `--config`).
    pub source: Option<ConfigSource>,
    pub config: Config,
    pub settings: Settings,
    /// SHA-256 of the document, hex.
    pub version: String,
    /// Set when the store could not be read and the last good local copy
    /// was used: the reason, to log once logging is set up.
    pub fell_back: Option<String>,
}

impl StartConfig {
    /// Loads the start configuration from `arg` (the `--config` value):
    /// read, loaded over the defaults with the environment on top, and
    /// validated. A document from the store is copied to
    /// `config.cache_path` once valid; when the store cannot be read, that
    /// copy is used; with neither, the error says what to do. Blocks (call
    /// before the async runtime starts).
    pub fn load(arg: Option<&str>) -> Result<Self, ConfigError> {
        let env = Config::environment;
        let Some(arg) = arg else {
            let (config, settings) = Config::load_document(None, "", env())?;
            return Ok(Self {
                source: None,
                config,
                settings,
                version: super::document_version(b""),
                fell_back: None,
            });
        };
        let source = ConfigSource::open(arg)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ConfigError(format!("cannot start a runtime to read --config: {e}")))?;
        let fetched = runtime.block_on(source.fetch());
        let (document, fell_back) = match fetched {
            Ok(document) => (document, None),
            Err(e) if source.keeps_local_copy() => {
                let cache = cache_path(env())?;
                match std::fs::read(&cache) {
                    Ok(copy) => (
                        copy,
                        Some(format!(
                            "{e}; started from the last good local copy {}",
                            cache.display()
                        )),
                    ),
                    Err(c) => {
                        return Err(ConfigError(format!(
                            "{e}; and there is no last good local copy at {} ({c}): make the store reachable, or start once with it reachable (the copy is written then), or give a local file with --config",
                            cache.display()
                        )))
                    }
                }
            }
            Err(e) => return Err(ConfigError(e)),
        };
        let text = document_text(&document, &source.describe())?;
        let (config, settings) = Config::load_document(Some(text), &source.describe(), env())?;
        if source.keeps_local_copy() && fell_back.is_none() {
            // Not fatal: the worker runs; the next successful load retries.
            if let Err(e) = write_local_copy(&config.reload, &document) {
                eprintln!("audit-worker: {e}");
            }
        }
        Ok(Self {
            source: Some(source),
            config,
            settings,
            version: super::document_version(&document),
            fell_back,
        })
    }
}

/// The document as UTF-8 text.
pub fn document_text<'a>(document: &'a [u8], origin: &str) -> Result<&'a str, ConfigError> {
    std::str::from_utf8(document).map_err(|_| {
        ConfigError(format!(
            "{origin} is not UTF-8 text: save the configuration as UTF-8 TOML"
        ))
    })
}

/// `config.cache_path` as the defaults and the environment set it (the
/// document itself may be what cannot be read).
fn cache_path(env: Env) -> Result<PathBuf, ConfigError> {
    use figment::providers::{Format, Toml};
    let reload: ReloadConfig = figment::Figment::from(Toml::string(crate::config::DEFAULT_TOML))
        .merge(env)
        .extract_inner("config")
        .map_err(|e| ConfigError(format!("config.cache_path: {e}")))?;
    Ok(PathBuf::from(reload.cache_path))
}

/// Writes the last good local copy of a stored document: to a temporary
/// file next to it, then renamed over it, so a crash never leaves half a
/// copy. Readable by the owner only (the document may hold secrets).
pub fn write_local_copy(reload: &ReloadConfig, document: &[u8]) -> Result<(), String> {
    let path = PathBuf::from(&reload.cache_path);
    let fail = |e: std::io::Error| {
        format!(
            "cannot write the last good configuration copy {} ({e}): fix config.cache_path or its directory's permissions",
            path.display()
        )
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp).map_err(fail)?;
        file.write_all(document).map_err(fail)?;
        file.sync_all().map_err(fail)?;
    }
    std::fs::rename(&tmp, &path).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_arguments_name_a_file_or_a_stored_object() {
        assert!(
            matches!(ConfigSource::open("cfg/worker.toml").unwrap(), ConfigSource::File(p) if p == Path::new("cfg/worker.toml"))
        );
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/worker.toml", dir.path().display());
        match ConfigSource::open(&url).unwrap() {
            ConfigSource::Stored { key, .. } => assert_eq!(key.as_ref(), "worker.toml"),
            other => panic!("{other:?}"),
        }
        for bad in ["s3://bucket", "s3://bucket/", "file://relative/x.toml"] {
            let e = ConfigSource::open(bad).unwrap_err().to_string();
            assert!(e.contains("s3://bucket/key"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_local_copy_is_replaced_whole_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let reload = ReloadConfig {
            watch_interval_secs: 0,
            cache_path: dir.path().join("sub/copy.toml").display().to_string(),
        };
        write_local_copy(&reload, b"a = 1\n").unwrap();
        write_local_copy(&reload, b"a = 2\n").unwrap();
        let path = dir.path().join("sub/copy.toml");
        assert_eq!(std::fs::read(&path).unwrap(), b"a = 2\n");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{mode:o}");
        }
        assert!(!dir.path().join("sub/copy.tmp").exists());
    }
}
