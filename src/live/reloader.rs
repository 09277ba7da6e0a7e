//! Re-reads the configuration document on SIGHUP and, when
//! `config.watch_interval_secs` is above 0, on a timer; validates it in
//! full; applies its live settings or refuses it, keeping the last good
//! configuration in force.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::source::{document_text, write_local_copy, ConfigSource};
use super::{document_version, Applied};
use crate::config::{Config, Settings, SettingsDiff};
use crate::telemetry::{LogFilter, Metrics};

/// What a reload came to: the `result` label of
/// `audit_worker_config_reload_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadResult {
    /// A changed document passed every check; its live settings apply.
    Applied,
    /// Nothing changed (same document, same key ring).
    Unchanged,
    /// The document failed a check; the last good configuration stays.
    Rejected,
    /// The document could not be read; the last good configuration stays.
    Unreadable,
}

impl ReloadResult {
    /// Every result, so each label is exported from the start.
    pub const ALL: [ReloadResult; 4] = [
        Self::Applied,
        Self::Unchanged,
        Self::Rejected,
        Self::Unreadable,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Unchanged => "unchanged",
            Self::Rejected => "rejected",
            Self::Unreadable => "unreadable",
        }
    }
}

/// What made the worker look at the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP: the document and the files it names are read again.
    Signal,
    /// The poll timer: only a document whose hash changed is loaded.
    Poll,
}

/// The configuration metrics.
#[derive(Clone)]
pub struct ConfigMetrics {
    /// `audit_worker_config_reload_total{result}`.
    reloads: IntCounterVec,
    /// `audit_worker_config_info{version}`: 1 for the version in force.
    info: IntGaugeVec,
    /// `audit_worker_config_loaded_timestamp_seconds`.
    loaded: IntGauge,
}

impl ConfigMetrics {
    /// Creates the metrics, registers them and shows `applied`.
    pub fn register(metrics: &Metrics, applied: &Applied) -> Self {
        let reloads = IntCounterVec::new(
            Opts::new(
                "audit_worker_config_reload_total",
                "Configuration reloads (SIGHUP or poll), by result (applied, unchanged, rejected, unreadable).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let info = IntGaugeVec::new(
            Opts::new(
                "audit_worker_config_info",
                "1 for the configuration in force, labelled with its version (first 12 hex digits of the document's SHA-256).",
            ),
            &["version"],
        )
        .expect("valid metric");
        let loaded = IntGauge::new(
            "audit_worker_config_loaded_timestamp_seconds",
            "Unix time the configuration in force was loaded.",
        )
        .expect("valid metric");
        for result in ReloadResult::ALL {
            reloads.with_label_values(&[result.label()]);
        }
        for c in [
            Box::new(reloads.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(info.clone()),
            Box::new(loaded.clone()),
        ] {
            let registered = metrics.register(c);
            debug_assert!(registered.is_ok(), "configuration metrics registered twice");
        }
        let this = Self {
            reloads,
            info,
            loaded,
        };
        this.show(applied);
        this
    }

    fn show(&self, applied: &Applied) {
        self.info.reset();
        self.info
            .with_label_values(&[applied.short_version()])
            .set(1);
        self.loaded.set(applied.loaded_at.timestamp());
    }

    fn count(&self, result: ReloadResult) {
        self.reloads.with_label_values(&[result.label()]).inc();
    }
}

/// Loads reloaded documents and swaps in the ones that pass.
pub struct Reloader {
    /// `None`: started without --config, so SIGHUP has nothing to read.
    source: Option<ConfigSource>,
    tx: watch::Sender<Arc<Applied>>,
    /// The settings at start: restart-only changes are measured from them.
    start_settings: Settings,
    /// Set by the worker once its metrics registry exists.
    metrics: Option<ConfigMetrics>,
    log_filter: Option<LogFilter>,
    /// The version of the last refused document: a poll does not refuse
    /// (and log) the same document again.
    last_rejected: Option<String>,
}

impl Reloader {
    /// A reloader for `source`, replacing the configuration `tx` holds.
    pub fn new(
        source: Option<ConfigSource>,
        tx: watch::Sender<Arc<Applied>>,
        log_filter: Option<LogFilter>,
    ) -> Self {
        let start_settings = tx.borrow().settings.clone();
        Self {
            source,
            tx,
            start_settings,
            metrics: None,
            log_filter,
            last_rejected: None,
        }
    }

    /// Counts reloads in `metrics` and shows the version in force there.
    pub fn with_metrics(mut self, metrics: ConfigMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Reloads on each SIGHUP and poll until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        #[cfg(unix)]
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP: configuration reloads only by poll");
                None
            }
        };
        loop {
            let interval = self.tx.borrow().config.reload.watch_interval_secs;
            let poll = async {
                if interval == 0 {
                    std::future::pending::<()>().await
                } else {
                    tokio::time::sleep(Duration::from_secs(interval)).await
                }
            };
            #[cfg(unix)]
            let signal = async {
                match hangup.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let signal = std::future::pending::<()>();
            let trigger = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = signal => Trigger::Signal,
                _ = poll => Trigger::Poll,
            };
            self.reload(trigger).await;
        }
    }

    /// One reload: read, check, then apply or refuse. Returns the result
    /// (also counted and logged).
    pub async fn reload(&mut self, trigger: Trigger) -> ReloadResult {
        let Some(source) = &self.source else {
            tracing::info!(
                "SIGHUP received, but the worker was started without --config: nothing to reload"
            );
            if let Some(m) = &self.metrics {
                m.count(ReloadResult::Unchanged);
            }
            return ReloadResult::Unchanged;
        };
        let origin = source.describe();
        if trigger == Trigger::Signal {
            tracing::info!(source = %origin, "SIGHUP received: reloading the configuration");
        }
        let result = match source.fetch().await {
            Err(e) => {
                tracing::warn!(source = %origin, error = %e, "configuration not reloaded: the last good configuration stays in force");
                ReloadResult::Unreadable
            }
            Ok(document) => self.consider(trigger, &document, &origin),
        };
        if let Some(m) = &self.metrics {
            m.count(result);
        }
        result
    }

    /// Checks a fetched document against the running configuration.
    fn consider(&mut self, trigger: Trigger, document: &[u8], origin: &str) -> ReloadResult {
        let version = document_version(document);
        let running = self.tx.borrow().clone();
        if trigger == Trigger::Poll
            && (version == running.version || self.last_rejected.as_ref() == Some(&version))
        {
            return ReloadResult::Unchanged;
        }
        let next = match prepare_next(&running, document, origin, version.clone()) {
            Ok(next) => next,
            Err(e) => {
                tracing::error!(
                    source = %origin,
                    version = &version[..12],
                    error = %e,
                    "configuration rejected: the last good configuration stays in force (version {})",
                    running.short_version()
                );
                self.last_rejected = Some(version);
                return ReloadResult::Rejected;
            }
        };
        self.last_rejected = None;
        let diff = SettingsDiff::between(&running.settings, &next.settings);
        if diff.is_empty() && version == running.version && next.same_key_ring(&running) {
            return ReloadResult::Unchanged;
        }
        if !diff.restart_only.is_empty() {
            tracing::warn!(
                keys = ?diff.restart_only,
                "changed settings that apply only at the next start: ignored until a restart"
            );
        }
        let mut next = next;
        next.pending_restart =
            SettingsDiff::between(&self.start_settings, &next.settings).restart_only;
        if let (Some(filter), true) = (
            &self.log_filter,
            next.config.log.level != running.config.log.level,
        ) {
            filter.set(&next.config.log.level);
        }
        if let Some(ConfigSource::Stored { .. }) = self.source {
            if let Err(e) = write_local_copy(&next.config.reload, document) {
                tracing::warn!(error = %e, "the last good configuration copy was not updated");
            }
        }
        tracing::info!(
            source = %origin,
            version = next.short_version(),
            previous = running.short_version(),
            live = ?diff.live,
            key_ring_changed = !next.same_key_ring(&running),
            hmac_key_ids = ?next.policy.hmac_keys.ids(),
            "configuration applied"
        );
        let next = Arc::new(next);
        if let Some(m) = &self.metrics {
            m.show(&next);
        }
        self.tx.send_replace(next);
        ReloadResult::Applied
    }
}

/// The configuration a document makes: loaded and validated like at start,
/// its live settings taken over by the running configuration, and the
/// whole checked again.
fn prepare_next(
    running: &Applied,
    document: &[u8],
    origin: &str,
    version: String,
) -> Result<Applied, crate::config::ConfigError> {
    let text = document_text(document, origin)?;
    let (loaded, settings) = Config::load_document(Some(text), origin, Config::environment())?;
    // Restart-only settings are checked too, so a document that could not
    // start the worker is refused now rather than at the next start.
    crate::startup::check_settings(&loaded).map_err(|e| crate::config::ConfigError(e.0))?;
    let next = running.config.with_live_settings_of(&loaded)?;
    Applied::prepare(next, settings, version)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::source::StartConfig;

    /// A reloader over the file `path`, started from its current content.
    fn reloader_for(path: &std::path::Path) -> (Reloader, crate::live::LiveConfig) {
        let start = StartConfig::load(Some(path.to_str().unwrap())).unwrap();
        let applied = Applied::prepare(start.config, start.settings, start.version).unwrap();
        let (tx, live) = crate::live::LiveConfig::new(applied);
        (Reloader::new(start.source, tx, None), live)
    }

    #[test]
    fn only_a_valid_changed_document_replaces_the_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.toml");
        std::fs::write(&path, "[integrity]\nhmac_keys = \"k1=one\"\n").unwrap();
        // The start configuration loads before the runtime, as in main.
        let (reloader, live) = reloader_for(&path);
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(reload_cases(&path, reloader, live));
    }

    async fn reload_cases(
        path: &std::path::Path,
        mut reloader: Reloader,
        live: crate::live::LiveConfig,
    ) {
        let started = live.current();
        assert_eq!(started.policy.hmac_keys.ids(), vec!["k1"]);

        assert_eq!(
            reloader.reload(Trigger::Signal).await,
            ReloadResult::Unchanged
        );
        assert_eq!(
            reloader.reload(Trigger::Poll).await,
            ReloadResult::Unchanged
        );

        std::fs::write(
            path,
            "[integrity]\nhmac_keys = \"k2=two,k1=one\"\n[sink]\nwriters = 3\n",
        )
        .unwrap();
        assert_eq!(reloader.reload(Trigger::Poll).await, ReloadResult::Applied);
        let applied = live.current();
        assert_eq!(applied.policy.hmac_keys.ids(), vec!["k2", "k1"]);
        assert_ne!(applied.version, started.version);
        assert_eq!(
            applied.config.sink.writers, started.config.sink.writers,
            "restart-only"
        );
        assert_eq!(applied.pending_restart, vec!["sink.writers"]);

        std::fs::write(
            path,
            "[integrity]\nhmac_keys = \"k3=three\"\n[sink]\nbatch_size = 0\n",
        )
        .unwrap();
        assert_eq!(
            reloader.reload(Trigger::Signal).await,
            ReloadResult::Rejected
        );
        assert_eq!(
            live.current().version,
            applied.version,
            "the last good one stays"
        );
        assert_eq!(
            reloader.reload(Trigger::Poll).await,
            ReloadResult::Unchanged,
            "refused once"
        );
        assert_eq!(
            reloader.reload(Trigger::Signal).await,
            ReloadResult::Rejected,
            "SIGHUP checks again"
        );

        std::fs::remove_file(path).unwrap();
        assert_eq!(
            reloader.reload(Trigger::Signal).await,
            ReloadResult::Unreadable
        );
        assert_eq!(live.current().policy.hmac_keys.ids(), vec!["k2", "k1"]);
    }
}
