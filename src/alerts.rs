//! Security alerts from the events themselves ("pattern detection").
//!
//! Sources offer each *stored* event (committed as new, so a redelivery is
//! not counted twice) to an [`AlertTap`]: a bounded channel fed with
//! `try_send`. A full channel drops the event for alerting and counts it
//! (`audit_worker_alert_events_dropped_total{reason="queue_full"}`), so
//! alert evaluation can never slow or block ingestion. One task drains the
//! channel, runs the pure [`Detector`] and publishes alerts to the stream
//! `alerts.stream` (default `audit:alerts`) and the metric
//! `audit_worker_security_alerts_total{rule}`.
//!
//! Rules (`[[alerts.rules]]`, `kind` selects the rule type):
//! - `failure_burst`: more than `threshold` events with status `failure`
//!   from one principal within `window_secs` (sliding window). After an
//!   alert the principal's count starts again from zero.
//! - `classified_access`: an event with `dataClassification =
//!   classification` (default `PHI`) whose action contains one of
//!   `actions_containing` (empty: any action) by a principal not in
//!   `allowed_principals` (a missing principal is never allowed). At most
//!   one alert per principal and rule every `cooldown_secs`.
//!
//! Windows run on the worker's clock at evaluation, not on event
//! timestamps, so replayed old events cannot hide in or fake a window.
//!
//! The rules' state never holds a principal id: windows and cooldowns are
//! keyed by a keyed digest of it ([`Detector`]: HMAC-SHA256 with a random
//! key drawn when the detector is built and never written anywhere,
//! truncated to 128 bits). So a GDPR erasure leaves nothing of the subject
//! in the memory of running workers to purge: what a window remembers is
//! a digest that no one can tie to an id without that in-memory key, and
//! it is gone with the window (or the detector) anyway.
//!
//! The rules apply live: the tap and the evaluator read them from the
//! configuration in force. A changed rule set replaces the detector, so
//! every window starts again from zero. `alerts.enabled` and the queue
//! settings need a restart.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use crate::source::RedisConn;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::event::ValidEvent;
use crate::live::LiveConfig;
use crate::telemetry::Metrics;

pub use crate::config::{AlertsConfig, RuleConfig};

/// What the rules look at: the few fields of a stored event they need
/// (copied only for events some rule could match, see [`AlertTap::wants`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AlertInput {
    pub principal_id: Option<String>,
    pub organization_id: Option<String>,
    pub action: String,
    pub status: String,
    pub data_classification: Option<String>,
    pub event_id: Option<String>,
    /// The message identity (`stream:<key>:<id>`, `bullmq:<queue>:<job id>`).
    pub source: String,
}

impl AlertInput {
    /// Copies the fields the rules need from a validated event.
    pub fn from_event(event: &ValidEvent, source: &str) -> Self {
        Self {
            principal_id: event.principal_id.clone(),
            organization_id: event.organization_id.clone(),
            action: event.action.clone(),
            status: event.status.clone(),
            data_classification: event.data_classification.clone(),
            event_id: event.event_id.clone(),
            source: source.to_owned(),
        }
    }
}

/// An alert raised by a rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub rule: String,
    pub kind: &'static str,
    pub principal_id: Option<String>,
    pub organization_id: Option<String>,
    /// Matching events counted (failures in the window; 1 for access rules).
    pub count: u64,
    pub window_secs: u64,
    /// The event that triggered the alert.
    pub event_id: Option<String>,
    pub source: String,
    pub message: String,
}

/// A principal as the rules' state keeps it: see [`Detector::principal_key`].
type PrincipalKey = [u8; 16];

/// A compiled rule with its state.
enum Rule {
    FailureBurst {
        name: String,
        threshold: usize,
        window_ms: i64,
        /// Failure times (ms) per principal, oldest first; never longer
        /// than `threshold + 1`.
        seen: HashMap<PrincipalKey, VecDeque<i64>>,
    },
    ClassifiedAccess {
        name: String,
        classification: String,
        actions_containing: Vec<String>,
        allowed: HashSet<String>,
        cooldown_ms: i64,
        /// When each principal last raised this alert (ms).
        last_alert: HashMap<PrincipalKey, i64>,
    },
}

/// The rules and their state: pure, no I/O, driven by the caller's clock.
pub struct Detector {
    rules: Vec<Rule>,
    max_tracked: usize,
    /// Events a rule could not track because `max_tracked_principals` was
    /// reached (exported as `tracking_full` drops).
    pub untracked: u64,
    /// The key of [`Detector::principal_key`]: random, in memory only.
    state_key: [u8; 32],
}

/// Principal key for events without one.
const NO_PRINCIPAL: &str = "";

impl Detector {
    /// Compiles the configured rules.
    pub fn new(rules: &[RuleConfig], max_tracked: usize) -> Self {
        let rules = rules
            .iter()
            .map(|r| match r.clone() {
                RuleConfig::FailureBurst {
                    name,
                    threshold,
                    window_secs,
                } => Rule::FailureBurst {
                    name,
                    threshold: threshold as usize,
                    window_ms: window_secs.saturating_mul(1000) as i64,
                    seen: HashMap::new(),
                },
                RuleConfig::ClassifiedAccess {
                    name,
                    classification,
                    actions_containing,
                    allowed_principals,
                    cooldown_secs,
                } => Rule::ClassifiedAccess {
                    name,
                    classification,
                    actions_containing,
                    allowed: allowed_principals.into_iter().collect(),
                    cooldown_ms: cooldown_secs.saturating_mul(1000) as i64,
                    last_alert: HashMap::new(),
                },
            })
            .collect();
        let mut state_key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut state_key);
        Self {
            rules,
            max_tracked,
            untracked: 0,
            state_key,
        }
    }

    /// What the rules' windows and cooldowns are keyed by instead of the
    /// principal id: HMAC-SHA256(random in-memory key, id), first 128 bits
    /// (two principals sharing one by chance would need about 2^64 of
    /// them).
    fn principal_key(&self, principal: &str) -> PrincipalKey {
        use hmac::{Hmac, Mac};
        let mut mac = <Hmac<sha2::Sha256>>::new_from_slice(&self.state_key)
            .expect("HMAC takes keys of any length");
        mac.update(principal.as_bytes());
        let mut key = [0u8; 16];
        key.copy_from_slice(&mac.finalize().into_bytes()[..16]);
        key
    }

    /// Whether any rule could match this event (cheap; lets sources skip
    /// copying fields for the many events no rule looks at).
    pub fn wants(rules: &[RuleConfig], event: &ValidEvent) -> bool {
        rules.iter().any(|r| match r {
            RuleConfig::FailureBurst { .. } => event.status == "failure",
            RuleConfig::ClassifiedAccess { classification, .. } => {
                event.data_classification.as_deref() == Some(classification.as_str())
            }
        })
    }

    /// Evaluates one stored event at time `now_ms` and returns the alerts
    /// it raises.
    pub fn observe(&mut self, input: &AlertInput, now_ms: i64) -> Vec<Alert> {
        let mut alerts = Vec::new();
        let principal = input.principal_id.as_deref().unwrap_or(NO_PRINCIPAL);
        let key = self.principal_key(principal);
        for rule in &mut self.rules {
            match rule {
                Rule::FailureBurst {
                    name,
                    threshold,
                    window_ms,
                    seen,
                } => {
                    if input.status != "failure" || input.principal_id.is_none() {
                        continue;
                    }
                    if !seen.contains_key(&key) && seen.len() >= self.max_tracked {
                        // Forget principals whose failures all left the window.
                        seen.retain(|_, q| q.back().is_some_and(|t| now_ms - t < *window_ms));
                        if seen.len() >= self.max_tracked {
                            self.untracked += 1;
                            continue;
                        }
                    }
                    let times = seen.entry(key).or_default();
                    while times.front().is_some_and(|t| now_ms - t >= *window_ms) {
                        times.pop_front();
                    }
                    times.push_back(now_ms);
                    if times.len() > *threshold {
                        let count = times.len() as u64;
                        times.clear();
                        let window_secs = (*window_ms / 1000) as u64;
                        alerts.push(Alert {
                            rule: name.clone(),
                            kind: "failure_burst",
                            principal_id: input.principal_id.clone(),
                            organization_id: input.organization_id.clone(),
                            count,
                            window_secs,
                            event_id: input.event_id.clone(),
                            source: input.source.clone(),
                            message: format!(
                                "{count} failure events from one principal within {window_secs} s (rule allows {threshold})"
                            ),
                        });
                    }
                }
                Rule::ClassifiedAccess {
                    name,
                    classification,
                    actions_containing,
                    allowed,
                    cooldown_ms,
                    last_alert,
                } => {
                    if input.data_classification.as_deref() != Some(classification.as_str()) {
                        continue;
                    }
                    if !actions_containing.is_empty()
                        && !actions_containing
                            .iter()
                            .any(|a| input.action.contains(a.as_str()))
                    {
                        continue;
                    }
                    if input.principal_id.is_some() && allowed.contains(principal) {
                        continue;
                    }
                    if last_alert
                        .get(&key)
                        .is_some_and(|t| now_ms - t < *cooldown_ms)
                    {
                        continue;
                    }
                    if !last_alert.contains_key(&key) && last_alert.len() >= self.max_tracked {
                        last_alert.retain(|_, t| now_ms - *t < *cooldown_ms);
                        if last_alert.len() >= self.max_tracked {
                            self.untracked += 1;
                            continue;
                        }
                    }
                    last_alert.insert(key, now_ms);
                    alerts.push(Alert {
                        rule: name.clone(),
                        kind: "classified_access",
                        principal_id: input.principal_id.clone(),
                        organization_id: input.organization_id.clone(),
                        count: 1,
                        window_secs: (*cooldown_ms / 1000) as u64,
                        event_id: input.event_id.clone(),
                        source: input.source.clone(),
                        message: format!(
                            "{classification} data accessed ({}) by a principal outside the allowed list",
                            input.action
                        ),
                    });
                }
            }
        }
        alerts
    }
}

/// The sources' side of the evaluator: offers stored events without ever
/// waiting. `AlertTap::default()` is off (no rules, or alerts disabled).
#[derive(Clone, Default)]
pub struct AlertTap {
    inner: Option<TapInner>,
}

#[derive(Clone)]
struct TapInner {
    tx: mpsc::Sender<AlertInput>,
    /// The rules in force are `alerts.rules` of the live configuration.
    live: LiveConfig,
    metrics: Metrics,
}

impl AlertTap {
    /// Whether a rule could match `event`: call before copying fields.
    pub fn wants(&self, event: &ValidEvent) -> bool {
        self.inner
            .as_ref()
            .is_some_and(|i| Detector::wants(&i.live.current().config.alerts.rules, event))
    }

    /// Hands a stored event to the evaluator, or drops it (counted) when
    /// the evaluator is behind. Never waits.
    pub fn offer(&self, input: AlertInput) {
        if let Some(i) = &self.inner {
            if i.tx.try_send(input).is_err() {
                i.metrics
                    .alert_events_dropped
                    .with_label_values(&["queue_full"])
                    .inc();
            }
        }
    }
}

/// Starts the evaluator task when alerts are enabled (even without rules,
/// so rules added by a reload take effect). The task ends once every tap
/// clone is dropped and the queue is drained.
pub fn spawn(
    live: &LiveConfig,
    redis: RedisConn,
    metrics: Metrics,
) -> (AlertTap, Option<JoinHandle<()>>) {
    let config = live.current().config.alerts.clone();
    if !config.enabled {
        return (AlertTap::default(), None);
    }
    let (tx, rx) = mpsc::channel(config.queue_capacity);
    let tap = AlertTap {
        inner: Some(TapInner {
            tx,
            live: live.clone(),
            metrics: metrics.clone(),
        }),
    };
    tracing::info!(rules = config.rules.len(), stream = %config.stream, "security alert rules loaded");
    let task = tokio::spawn(evaluate(rx, live.clone(), redis, metrics));
    (tap, Some(task))
}

/// The detector for the rules in force, rebuilt when they change.
struct LiveDetector {
    rules: Vec<RuleConfig>,
    detector: Detector,
}

impl LiveDetector {
    fn new(config: &AlertsConfig, metrics: &Metrics) -> Self {
        for rule in &config.rules {
            metrics.security_alerts.with_label_values(&[rule.name()]);
        }
        Self {
            rules: config.rules.clone(),
            detector: Detector::new(&config.rules, config.max_tracked_principals),
        }
    }

    /// The detector for `config.rules`: this one while they are unchanged.
    fn follow(&mut self, config: &AlertsConfig, metrics: &Metrics) -> &mut Detector {
        if self.rules != config.rules {
            *self = Self::new(config, metrics);
            tracing::info!(
                rules = config.rules.len(),
                "security alert rules changed; windows start again"
            );
        }
        &mut self.detector
    }
}

async fn evaluate(
    mut rx: mpsc::Receiver<AlertInput>,
    live: LiveConfig,
    redis: RedisConn,
    metrics: Metrics,
) {
    let mut inputs = Vec::with_capacity(256);
    let mut detector = LiveDetector::new(&live.current().config.alerts, &metrics);
    while rx.recv_many(&mut inputs, 256).await > 0 {
        let current = live.current();
        let config = &current.config.alerts;
        let detector = detector.follow(config, &metrics);
        let now = chrono::Utc::now();
        let evaluated = inputs.len() as u64;
        let mut alerts = Vec::new();
        for input in inputs.drain(..) {
            alerts.extend(detector.observe(&input, now.timestamp_millis()));
        }
        let untracked = std::mem::take(&mut detector.untracked);
        if untracked > 0 {
            metrics
                .alert_events_dropped
                .with_label_values(&["tracking_full"])
                .inc_by(untracked);
        }
        if !alerts.is_empty() {
            publish(
                &redis,
                &config.stream,
                config.stream_max_len,
                &alerts,
                now,
                &metrics,
            )
            .await;
        }
        // Counted after publishing, so "evaluated" implies "alerts written".
        metrics.alert_events_evaluated.inc_by(evaluated);
    }
}

/// XADDs alerts (one pipeline, retried a few times), then counts them.
async fn publish(
    redis: &RedisConn,
    stream: &str,
    max_len: u64,
    alerts: &[Alert],
    now: chrono::DateTime<chrono::Utc>,
    metrics: &Metrics,
) {
    let detected_at = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut pipe = redis::pipe();
    for a in alerts {
        pipe.cmd("XADD")
            .arg(stream)
            .arg("MAXLEN")
            .arg("~")
            .arg(max_len)
            .arg("*")
            .arg("rule")
            .arg(&a.rule)
            .arg("kind")
            .arg(a.kind)
            .arg("principal_id")
            .arg(a.principal_id.as_deref().unwrap_or(""))
            .arg("organization_id")
            .arg(a.organization_id.as_deref().unwrap_or(""))
            .arg("count")
            .arg(a.count)
            .arg("window_secs")
            .arg(a.window_secs)
            .arg("event_id")
            .arg(a.event_id.as_deref().unwrap_or(""))
            .arg("event_source")
            .arg(&a.source)
            .arg("detected_at")
            .arg(&detected_at)
            .arg("message")
            .arg(&a.message)
            .ignore();
    }
    let mut conn = redis.clone();
    for attempt in 1..=3u64 {
        match pipe.query_async::<()>(&mut conn).await {
            Ok(()) => {
                for a in alerts {
                    metrics.security_alerts.with_label_values(&[&a.rule]).inc();
                    tracing::warn!(rule = %a.rule, kind = a.kind, count = a.count, source = %a.source, "security alert raised");
                }
                return;
            }
            Err(e) => {
                metrics
                    .redis_errors
                    .with_label_values(&["xadd_alert"])
                    .inc();
                tracing::warn!(error = %e, attempt, "publishing security alerts failed");
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
        }
    }
    metrics
        .alert_events_dropped
        .with_label_values(&["publish_failed"])
        .inc_by(alerts.len() as u64);
    tracing::error!(
        count = alerts.len(),
        "security alerts could not be written to Redis and are lost; see the worker log above"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(principal: &str, status: &str, class: Option<&str>, action: &str) -> AlertInput {
        AlertInput {
            principal_id: Some(principal.into()),
            organization_id: Some("org".into()),
            action: action.into(),
            status: status.into(),
            data_classification: class.map(Into::into),
            event_id: None,
            source: "stream:s:1-0".into(),
        }
    }

    #[test]
    fn the_rules_state_holds_a_keyed_digest_of_each_principal_never_the_id() {
        let who = "ana.kowalski@clinic.test";
        let mut d = Detector::new(&[burst(5, 60), phi(&[])], 100);
        d.observe(&input(who, "failure", Some("PHI"), "chart.read"), 1_000);
        let mut keys: Vec<PrincipalKey> = Vec::new();
        for rule in &d.rules {
            match rule {
                Rule::FailureBurst { seen, .. } => keys.extend(seen.keys()),
                Rule::ClassifiedAccess { last_alert, .. } => keys.extend(last_alert.keys()),
            }
        }
        assert_eq!(keys.len(), 2, "one entry per rule");
        let key = d.principal_key(who);
        assert!(keys.iter().all(|k| *k == key));
        assert!(!keys
            .iter()
            .any(|k| who.as_bytes().windows(16).any(|w| w == k)));
        // Another detector (another worker, or after a reload) has its own
        // key: the digests cannot be compared across them either.
        assert_ne!(Detector::new(&[], 1).principal_key(who), key);
    }

    fn burst(threshold: u32, window_secs: u64) -> RuleConfig {
        RuleConfig::FailureBurst {
            name: "failure_burst".into(),
            threshold,
            window_secs,
        }
    }

    fn phi(allowed: &[&str]) -> RuleConfig {
        RuleConfig::ClassifiedAccess {
            name: "phi_outside_allowlist".into(),
            classification: "PHI".into(),
            actions_containing: vec!["read".into()],
            allowed_principals: allowed.iter().map(|s| s.to_string()).collect(),
            cooldown_secs: 60,
        }
    }

    #[test]
    fn more_than_threshold_failures_in_the_window_fire_once() {
        let mut d = Detector::new(&[burst(3, 10)], 100);
        let f = input("mallory", "failure", None, "login");
        for t in 0..3 {
            assert!(d.observe(&f, t * 1000).is_empty(), "3 failures are allowed");
        }
        let a = d.observe(&f, 3000);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].rule, "failure_burst");
        assert_eq!(a[0].count, 4);
        assert_eq!(a[0].principal_id.as_deref(), Some("mallory"));
        // The count restarts after an alert.
        assert!(d.observe(&f, 3500).is_empty());
    }

    #[test]
    fn failures_spread_beyond_the_window_or_over_principals_do_not_fire() {
        let mut d = Detector::new(&[burst(3, 10)], 100);
        let f = input("alice", "failure", None, "login");
        for t in 0..20 {
            // One failure every 4 s: never more than 3 within 10 s.
            assert!(d.observe(&f, t * 4000).is_empty());
        }
        for i in 0..50 {
            let other = input(&format!("user-{i}"), "failure", None, "login");
            assert!(d.observe(&other, 100_000).is_empty());
        }
        let ok = input("bob", "success", None, "login");
        for t in 0..50 {
            assert!(d.observe(&ok, 200_000 + t).is_empty());
        }
    }

    #[test]
    fn classified_access_outside_the_allowed_list_fires_with_cooldown() {
        let mut d = Detector::new(&[phi(&["dr-house"])], 100);
        assert!(d
            .observe(
                &input("dr-house", "success", Some("PHI"), "patient.read"),
                0
            )
            .is_empty());
        assert!(d
            .observe(
                &input("eve", "success", Some("INTERNAL"), "patient.read"),
                0
            )
            .is_empty());
        assert!(d
            .observe(&input("eve", "success", Some("PHI"), "patient.update"), 0)
            .is_empty());
        let a = d.observe(&input("eve", "success", Some("PHI"), "patient.read"), 0);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].kind, "classified_access");
        assert!(d
            .observe(
                &input("eve", "success", Some("PHI"), "patient.read"),
                59_000
            )
            .is_empty());
        assert_eq!(
            d.observe(
                &input("eve", "success", Some("PHI"), "patient.read"),
                61_000
            )
            .len(),
            1
        );
        let mut anon = input("x", "success", Some("PHI"), "patient.read");
        anon.principal_id = None;
        assert_eq!(
            d.observe(&anon, 0).len(),
            1,
            "no principal is never allowed"
        );
    }

    #[test]
    fn tracked_principals_are_bounded() {
        let mut d = Detector::new(&[burst(5, 60)], 10);
        for i in 0..100 {
            d.observe(&input(&format!("u{i}"), "failure", None, "a"), 0);
        }
        assert_eq!(d.untracked, 90);
        // Once their failures leave the window, room is made again.
        assert!(d
            .observe(&input("late", "failure", None, "a"), 61_000)
            .is_empty());
        assert_eq!(d.untracked, 90);
    }

    #[test]
    fn rule_names_are_checked() {
        let mut c = AlertsConfig {
            enabled: true,
            stream: "audit:alerts".into(),
            stream_max_len: 1000,
            queue_capacity: 10,
            max_tracked_principals: 10,
            rules: vec![burst(1, 1), burst(2, 2)],
        };
        assert!(c.validate().unwrap_err().contains("unique"));
        c.rules = vec![RuleConfig::FailureBurst {
            name: "Bad Name".into(),
            threshold: 1,
            window_secs: 1,
        }];
        assert!(c.validate().unwrap_err().contains("a-z"));
        c.rules = vec![burst(1, 1), phi(&[])];
        c.validate().unwrap();
    }
}
