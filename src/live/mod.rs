//! Live configuration: the validated configuration in force, swapped as a
//! whole when a reloaded document passes every check.
//!
//! The configuration comes from a file or the object store
//! ([`source::ConfigSource`]). [`reloader`] re-reads it on SIGHUP and every
//! `config.watch_interval_secs`; each new document goes through the same
//! loading and checks as at start ([`Applied::prepare`]) before a single
//! setting of it is used. The parts with live settings hold a
//! [`LiveConfig`] and read [`LiveConfig::current`] per use (per event, per
//! batch, per job), never a copy taken at start. Which settings are live is
//! decided in [`crate::config::live`].

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::config::{Config, ConfigError, Settings};
use crate::event::ValidationPolicy;

pub mod reloader;
pub mod source;

/// One validated configuration, as applied: the settings every part reads,
/// and what `/health` reports about it.
#[derive(Debug)]
pub struct Applied {
    /// The configuration in force (restart-only settings as at start).
    pub config: Config,
    /// The settings of the document last loaded (compared with the next).
    pub settings: Settings,
    /// The validation policy and HMAC key ring built from `config`.
    pub policy: Arc<ValidationPolicy>,
    /// SHA-256 (hex) of the document (of the empty document without --config).
    pub version: String,
    /// When this configuration was loaded.
    pub loaded_at: DateTime<Utc>,
    /// SHA-256 over the HMAC key ids and secrets, to notice a rotated key
    /// file whose document did not change (never shown).
    key_ring_digest: [u8; 32],
    /// Restart-only settings the document changes since start, ignored
    /// until the next start.
    pub pending_restart: Vec<String>,
}

impl Applied {
    /// Runs every check the start path runs on top of loading (the HMAC key
    /// file is read, connection settings are parsed) and builds the parts
    /// that follow from the configuration.
    pub fn prepare(
        config: Config,
        settings: Settings,
        version: String,
    ) -> Result<Self, ConfigError> {
        let keys = config.integrity.hmac_key_entries()?;
        crate::startup::check_settings(&config).map_err(|e| ConfigError(e.0))?;
        // The checks the export and report executors make when they start
        // (OCSF class rules, working hours).
        crate::jobs::export::executor::Settings::from_config(&config.export)
            .map_err(ConfigError)?;
        crate::jobs::report::executor::Settings::from_config(&config).map_err(ConfigError)?;
        let mut digest = Sha256::new();
        for (id, secret) in &keys {
            digest.update((id.len() as u64).to_be_bytes());
            digest.update(id.as_bytes());
            digest.update((secret.expose().len() as u64).to_be_bytes());
            digest.update(secret.expose().as_bytes());
        }
        Ok(Self {
            policy: Arc::new(ValidationPolicy::with_keys(&config.validation, &keys)),
            config,
            settings,
            version,
            loaded_at: Utc::now(),
            key_ring_digest: digest.finalize().into(),
            pending_restart: Vec::new(),
        })
    }

    /// Whether `other` verifies signatures with exactly the same keys.
    pub fn same_key_ring(&self, other: &Applied) -> bool {
        self.key_ring_digest == other.key_ring_digest
    }

    /// The version shortened for labels and logs (12 hex digits).
    pub fn short_version(&self) -> &str {
        &self.version[..12.min(self.version.len())]
    }
}

/// SHA-256 of a configuration document, hex: its version.
pub fn document_version(document: &[u8]) -> String {
    hex::encode(Sha256::digest(document))
}

/// A handle on the configuration in force; cheap to clone. Readers call
/// [`LiveConfig::current`] each time they need a setting.
#[derive(Debug, Clone)]
pub struct LiveConfig {
    rx: watch::Receiver<Arc<Applied>>,
}

impl LiveConfig {
    /// A configuration and the sender that replaces it (held by the
    /// reloader).
    pub fn new(applied: Applied) -> (watch::Sender<Arc<Applied>>, Self) {
        let (tx, rx) = watch::channel(Arc::new(applied));
        (tx, Self { rx })
    }

    /// A configuration that never changes (no `--config` to reload, tests).
    pub fn fixed(config: Config) -> Result<Self, ConfigError> {
        let (tx, live) = Self::new(Applied::prepare(
            config,
            Settings::default(),
            document_version(b""),
        )?);
        // Dropping the sender keeps the last value readable.
        drop(tx);
        Ok(live)
    }

    /// The configuration in force now.
    pub fn current(&self) -> Arc<Applied> {
        self.rx.borrow().clone()
    }
}
