//! `[alerts]`: security alert rules.

use std::collections::HashSet;

use serde::Deserialize;

/// `[alerts]`: the alert evaluator and its rules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// Evaluate rules at all (with no rules the evaluator is not started).
    pub enabled: bool,
    /// Stream that alerts are XADDed to.
    pub stream: String,
    /// Approximate cap on the alert stream's length (XADD MAXLEN ~).
    pub stream_max_len: u64,
    /// Stored events waiting for evaluation; beyond it events are dropped
    /// for alerting (and counted), never delaying ingestion.
    pub queue_capacity: usize,
    /// Principals tracked per rule at once (bounds memory).
    pub max_tracked_principals: usize,
    /// The rules.
    pub rules: Vec<RuleConfig>,
}

/// One `[[alerts.rules]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RuleConfig {
    /// More than `threshold` failures by one principal within `window_secs`.
    FailureBurst {
        name: String,
        threshold: u32,
        window_secs: u64,
    },
    /// Classified data touched by a principal outside an allowed list.
    ClassifiedAccess {
        name: String,
        #[serde(default = "default_classification")]
        classification: String,
        #[serde(default)]
        actions_containing: Vec<String>,
        #[serde(default)]
        allowed_principals: Vec<String>,
        #[serde(default = "default_cooldown")]
        cooldown_secs: u64,
    },
}

fn default_classification() -> String {
    "PHI".into()
}

fn default_cooldown() -> u64 {
    300
}

impl RuleConfig {
    /// The rule's name (the metric label and the alert's `rule` field).
    pub fn name(&self) -> &str {
        match self {
            Self::FailureBurst { name, .. } | Self::ClassifiedAccess { name, .. } => name,
        }
    }

    /// The rule type, as written in `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::FailureBurst { .. } => "failure_burst",
            Self::ClassifiedAccess { .. } => "classified_access",
        }
    }
}

impl AlertsConfig {
    /// Checks the section; the message names the offending rule.
    pub fn validate(&self) -> Result<(), String> {
        if self.stream.is_empty() {
            return Err("alerts.stream must not be empty".into());
        }
        if self.queue_capacity == 0 || self.max_tracked_principals == 0 {
            return Err(
                "alerts.queue_capacity and alerts.max_tracked_principals must be at least 1".into(),
            );
        }
        let mut names = HashSet::new();
        for rule in &self.rules {
            let name = rule.name();
            if name.is_empty()
                || name.len() > 64
                || !name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                return Err(format!(
                    "alerts.rules: name {name:?} must be 1-64 characters of a-z, 0-9 and _ (it becomes a metric label)"
                ));
            }
            if !names.insert(name) {
                return Err(format!(
                    "alerts.rules: two rules are named {name:?}; names must be unique"
                ));
            }
            match rule {
                RuleConfig::FailureBurst {
                    window_secs,
                    threshold,
                    ..
                } if *window_secs == 0 || *threshold == 0 => {
                    return Err(format!(
                        "alerts.rules {name}: threshold and window_secs must be at least 1"
                    ))
                }
                RuleConfig::ClassifiedAccess { classification, .. }
                    if classification.is_empty() =>
                {
                    return Err(format!(
                        "alerts.rules {name}: classification must not be empty"
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }
}
