//! Which settings apply while the worker runs, and which wait for a
//! restart: the pure part of live reloading (no I/O).
//!
//! A reloaded document is loaded and validated like the one at start. Its
//! settings are then compared key by key with the running ones
//! ([`SettingsDiff::between`]); the running configuration takes over the
//! changed live settings ([`Config::with_live_settings_of`]) and keeps its
//! restart-only ones, which are only named in the log.

use std::collections::BTreeMap;

use super::{Config, ConfigError};

/// The settings that apply without a restart, as dotted keys. A key
/// covers the keys below it (`validation` covers `validation.max_event_bytes`).
/// Everything else needs a restart.
pub const LIVE_SETTINGS: &[&str] = &[
    "config.watch_interval_secs",
    "integrity.hmac_keys",
    "integrity.hmac_keys_file",
    "validation",
    "alerts.rules",
    "log.level",
    "sink.batch_size",
    "sink.max_wait_ms",
    "sink.breaker_failure_threshold",
    "sink.breaker_recovery_secs",
    "export.part_rows",
    "export.page_rows",
    "export.parquet_row_group_rows",
    "report.top_n",
    "report.counter_capacity",
    "report.page_rows",
];

/// Whether the dotted setting `key` applies without a restart.
pub fn is_live(key: &str) -> bool {
    LIVE_SETTINGS.iter().any(|live| {
        key == *live
            || key
                .strip_prefix(live)
                .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
    })
}

/// Every setting of a loaded configuration (defaults, document and
/// environment merged) as dotted key -> value text. Values are kept only
/// for comparison: they may be secrets, so only keys are ever shown.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Settings(BTreeMap<String, String>);

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

impl Settings {
    /// Flattens a merged document: tables become dotted keys, anything
    /// else (numbers, strings, arrays such as `alerts.rules`) is one value.
    pub fn flatten(value: &figment::value::Value) -> Self {
        fn walk(prefix: &str, value: &figment::value::Value, out: &mut BTreeMap<String, String>) {
            match value {
                figment::value::Value::Dict(_, dict) => {
                    for (k, v) in dict {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        walk(&key, v, out);
                    }
                }
                other => {
                    let text = serde_json::to_string(other).unwrap_or_default();
                    out.insert(prefix.to_owned(), text);
                }
            }
        }
        let mut out = BTreeMap::new();
        walk("", value, &mut out);
        Self(out)
    }

    /// Builds settings from (key, value) pairs (tests).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        )
    }
}

/// What changed between the running settings and a new document's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SettingsDiff {
    /// Changed keys that apply now.
    pub live: Vec<String>,
    /// Changed keys that are ignored until the next start.
    pub restart_only: Vec<String>,
}

impl SettingsDiff {
    /// Compares two settings maps key by key (a key present in only one
    /// counts as changed), sorting each changed key into live or
    /// restart-only.
    pub fn between(running: &Settings, new: &Settings) -> Self {
        let mut diff = Self::default();
        let keys: std::collections::BTreeSet<&String> =
            running.0.keys().chain(new.0.keys()).collect();
        for key in keys {
            if running.0.get(key) != new.0.get(key) {
                if is_live(key) {
                    diff.live.push(key.clone());
                } else {
                    diff.restart_only.push(key.clone());
                }
            }
        }
        diff
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty() && self.restart_only.is_empty()
    }
}

impl Config {
    /// The configuration to run with after a reload: this (running)
    /// configuration with the live settings of `new` taken over, every
    /// restart-only setting kept. Both were validated on their own; the
    /// combination is validated again, since rules span sections (e.g.
    /// `bullmq.max_in_flight_data_bytes` against `validation.max_event_bytes`).
    pub fn with_live_settings_of(&self, new: &Config) -> Result<Config, ConfigError> {
        let mut next = self.clone();
        next.reload.watch_interval_secs = new.reload.watch_interval_secs;
        next.integrity = new.integrity.clone();
        next.validation = new.validation.clone();
        next.alerts.rules = new.alerts.rules.clone();
        next.log.level = new.log.level.clone();
        next.sink.batch_size = new.sink.batch_size;
        next.sink.max_wait_ms = new.sink.max_wait_ms;
        next.sink.breaker_failure_threshold = new.sink.breaker_failure_threshold;
        next.sink.breaker_recovery_secs = new.sink.breaker_recovery_secs;
        next.export.part_rows = new.export.part_rows;
        next.export.page_rows = new.export.page_rows;
        next.export.parquet_row_group_rows = new.export.parquet_row_group_rows;
        next.report.top_n = new.report.top_n;
        next.report.counter_capacity = new.report.counter_capacity;
        next.report.page_rows = new.report.page_rows;
        next.validate().map_err(|e| {
            ConfigError(format!(
                "{}; together with the restart-only settings still in force, the new live settings do not fit: restart to apply both, or keep them compatible",
                e.0
            ))
        })?;
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_keys_cover_their_sub_keys_and_nothing_else() {
        assert!(is_live("validation.max_event_bytes"));
        assert!(is_live("alerts.rules"));
        assert!(is_live("log.level"));
        assert!(is_live("sink.batch_size"));
        assert!(!is_live("log.format"));
        assert!(!is_live("sink.writers"));
        assert!(!is_live("sink.batch_size_extra"));
        assert!(!is_live("validationx"));
        assert!(!is_live("redis.url"));
        assert!(!is_live("alerts.enabled"));
        assert!(!is_live("config.cache_path"));
    }

    #[test]
    fn a_diff_sorts_changed_keys_into_live_and_restart_only() {
        let running = Settings::from_pairs([
            ("sink.batch_size", "1000"),
            ("sink.writers", "2"),
            ("redis.url", "\"redis://a\""),
            ("log.level", "\"info\""),
        ]);
        let new = Settings::from_pairs([
            ("sink.batch_size", "500"),
            ("sink.writers", "2"),
            ("redis.url", "\"redis://b\""),
            ("log.level", "\"info\""),
            ("integrity.hmac_keys", "\"k2=x\""),
        ]);
        let diff = SettingsDiff::between(&running, &new);
        assert_eq!(diff.live, vec!["integrity.hmac_keys", "sink.batch_size"]);
        assert_eq!(diff.restart_only, vec!["redis.url"]);
        assert!(SettingsDiff::between(&new, &new).is_empty());
    }

    #[test]
    fn settings_never_show_their_values() {
        let s = Settings::from_pairs([("integrity.hmac_keys", "\"k=very-secret\"")]);
        let shown = format!("{s:?}");
        assert!(shown.contains("integrity.hmac_keys"), "{shown}");
        assert!(!shown.contains("very-secret"), "{shown}");
    }

    fn load(toml: &str) -> (Config, Settings) {
        let env = figment::providers::Env::prefixed("AUDIT_WORKER_UNIT_TEST_UNSET__").split("__");
        Config::load_document(Some(toml), "test document", env).unwrap()
    }

    #[test]
    fn taking_over_live_settings_keeps_every_restart_only_one() {
        let (running, running_settings) = load("[sink]\nbatch_size = 100\n");
        let (new, new_settings) = load(
            "[sink]\nbatch_size = 200\nwriters = 3\n[validation]\nmax_event_bytes = 1000\n[log]\nlevel = \"debug\"\nformat = \"json\"\n[integrity]\nhmac_keys = \"k2=s2\"\n",
        );
        let next = running.with_live_settings_of(&new).unwrap();
        assert_eq!(next.sink.batch_size, 200);
        assert_eq!(next.validation.max_event_bytes, 1000);
        assert_eq!(next.log.level, "debug");
        assert_eq!(next.integrity.hmac_keys.expose(), "k2=s2");
        assert_eq!(next.sink.writers, running.sink.writers);
        assert_eq!(next.log.format, running.log.format);

        // Every key the merge did not take over is one the diff reports
        // as restart-only, and the other way round: the two lists agree.
        let diff = SettingsDiff::between(&running_settings, &new_settings);
        assert_eq!(diff.restart_only, vec!["log.format", "sink.writers"]);
        assert_eq!(
            diff.live,
            vec![
                "integrity.hmac_keys",
                "log.level",
                "sink.batch_size",
                "validation.max_event_bytes"
            ]
        );
    }

    #[test]
    fn live_settings_that_clash_with_the_running_restart_only_ones_are_refused() {
        let (running, _) = load("[bullmq]\nmax_in_flight_data_bytes = 100000\n");
        let (new, _) = load(
            "[bullmq]\nmax_in_flight_data_bytes = 400000\n[validation]\nmax_event_bytes = 200000\n",
        );
        let e = running.with_live_settings_of(&new).unwrap_err().to_string();
        assert!(e.contains("bullmq.max_in_flight_data_bytes"), "{e}");
        assert!(e.contains("restart"), "{e}");
    }
}
