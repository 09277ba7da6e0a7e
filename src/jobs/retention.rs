//! Retention: dropping monthly partitions of `audit_log` whose every row
//! may go, while the verifiable log stays provable (README, "Retention").
//!
//! The decision and the drop live in SQL (migration V20): the function
//! `audit_log_retention_refusals` says why a partition must stay (none: it
//! may go), and `audit_log_drop_expired_partition`, the one path through
//! the append-only guard and executable only by the
//! `audit_worker_retention` role, checks the same again under locks that
//! keep the answer true until it commits, records the drop in
//! `retention_prunes`, destroys the rows' salts and drops the partition.
//! The seal ledger and the tiles stay, so every signed root and every proof
//! of a remaining event stays valid (tlog pruning), and `verify` reports the
//! dropped leaves as pruned.
//!
//! This module lists the partitions, asks for each verdict, drops what may
//! go, records each drop as an audit event (`audit.retention.partition_dropped`,
//! [`drop_event`]), and logs and counts the rest; the periodic pass runs on
//! one replica at a time ([`crate::lease`]).

use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::RetentionConfig;
use crate::jobs::internal_event::{EventRecorder, InternalEvent};
use crate::telemetry::Metrics;

/// The retention settings as the SQL functions take them.
#[derive(Debug, Clone)]
pub struct RetentionPolicy {
    /// Days kept for rows without a policy.
    pub default_days: i32,
    /// `{"<policy>": days, ...}`.
    pub policies: serde_json::Value,
    /// The shortest period of all: a partition whose month began within it
    /// holds no row that may go.
    pub shortest_days: i32,
    /// `lock_timeout` of a drop, in milliseconds.
    pub lock_timeout_ms: i32,
}

impl RetentionPolicy {
    /// The policy of `[retention]` (validated: every period fits an i32).
    pub fn from_config(config: &RetentionConfig) -> Self {
        let days = |d: u32| i32::try_from(d).unwrap_or(i32::MAX);
        let policies: serde_json::Map<String, serde_json::Value> = config
            .policies
            .iter()
            .map(|(name, d)| (name.clone(), serde_json::Value::from(days(*d))))
            .collect();
        let shortest = config
            .policies
            .values()
            .copied()
            .chain([config.default_days])
            .min()
            .unwrap_or(config.default_days);
        Self {
            default_days: days(config.default_days),
            policies: serde_json::Value::Object(policies),
            shortest_days: days(shortest),
            lock_timeout_ms: i32::try_from(config.lock_timeout_ms).unwrap_or(i32::MAX),
        }
    }
}

/// Why a partition stays: a stable code (the metric's `reason` label:
/// `month_open`, `retention`, `unknown_policy`, `unsealed`, `legal_hold`)
/// and what to know about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Refusal {
    pub code: String,
    pub detail: String,
    /// The legal hold that keeps the partition (code `legal_hold`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_id: Option<String>,
}

/// What a pass does with one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "verdict")]
pub enum Verdict {
    /// Every condition holds: the partition goes.
    Drop,
    /// It stays, for these reasons (all of them, not only the first).
    Keep { reasons: Vec<Refusal> },
    /// Its month began less than the shortest retention period ago, so no
    /// row in it can be past its period: not examined further.
    NotDue,
    /// It holds no rows: nothing to drop (partition upkeep would only
    /// create it again).
    Empty,
}

/// One partition and its verdict.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionVerdict {
    pub partition: String,
    /// First day of its month.
    pub month: NaiveDate,
    #[serde(flatten)]
    pub verdict: Verdict,
}

impl std::fmt::Display for PartitionVerdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.verdict {
            Verdict::Drop => write!(
                f,
                "DROP {}: every row is past its retention, sealed, and under no hold",
                self.partition
            ),
            Verdict::Keep { reasons } => write!(
                f,
                "KEEP {}: {}",
                self.partition,
                reasons
                    .iter()
                    .map(|r| r.detail.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            Verdict::NotDue => write!(
                f,
                "KEEP {}: its month began within the shortest retention period",
                self.partition
            ),
            Verdict::Empty => write!(f, "SKIP {}: empty", self.partition),
        }
    }
}

/// The month of a partition named `audit_log_yYYYYmMM`.
pub fn partition_month(name: &str) -> Option<NaiveDate> {
    let rest = name.strip_prefix("audit_log_y")?;
    let (year, month) = rest.split_once('m')?;
    if year.len() != 4 || month.len() != 2 {
        return None;
    }
    NaiveDate::from_ymd_opt(year.parse().ok()?, month.parse().ok()?, 1)
}

/// Whether no row of the month starting `month` can be past a period of
/// `shortest_days` at `at`: every row is at least as young as its month.
pub fn not_due(month: NaiveDate, shortest_days: i32, at: DateTime<Utc>) -> bool {
    let start = month.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc();
    start + chrono::Duration::days(i64::from(shortest_days)) > at
}

/// The partitions of `audit_log` in this schema, oldest first.
async fn partitions(
    client: &tokio_postgres::Client,
) -> Result<Vec<(String, NaiveDate)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
              WHERE i.inhparent = 'audit_log'::regclass ORDER BY c.relname",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let name: String = r.get(0);
            partition_month(&name).map(|m| (name, m))
        })
        .collect())
}

/// The verdict on every partition at `at`, oldest first.
pub async fn plan(
    client: &tokio_postgres::Client,
    policy: &RetentionPolicy,
    at: DateTime<Utc>,
) -> Result<Vec<PartitionVerdict>, tokio_postgres::Error> {
    let mut verdicts = Vec::new();
    for (partition, month) in partitions(client).await? {
        let verdict = if not_due(month, policy.shortest_days, at) {
            Verdict::NotDue
        } else {
            let rows = client
                .query(
                    "SELECT code, detail, hold_id FROM audit_log_retention_refusals($1, $2, $3, $4)",
                    &[&partition, &policy.policies, &policy.default_days, &at],
                )
                .await?;
            let reasons: Vec<Refusal> = rows
                .iter()
                .map(|r| Refusal {
                    code: r.get(0),
                    detail: r.get(1),
                    hold_id: r.get(2),
                })
                .collect();
            if reasons.iter().any(|r| r.code == "empty") {
                Verdict::Empty
            } else if reasons.is_empty() {
                Verdict::Drop
            } else {
                Verdict::Keep { reasons }
            }
        };
        verdicts.push(PartitionVerdict {
            partition,
            month,
            verdict,
        });
    }
    Ok(verdicts)
}

/// What one pass did.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PassReport {
    /// Partitions dropped, with their row counts.
    pub dropped: Vec<(String, i64)>,
    /// Partitions kept, with the reasons.
    pub kept: Vec<PartitionVerdict>,
    /// Partitions whose drop failed (a lock not granted in time, ...):
    /// tried again at the next pass.
    pub failed: Vec<(String, String)>,
    /// Drops (of this pass or an earlier one whose event was not added)
    /// recorded as `audit.retention.partition_dropped` events.
    pub events_recorded: Vec<String>,
}

/// A drop as `retention_prunes` records it.
#[derive(Debug, Clone)]
pub struct Prune {
    pub partition: String,
    pub range_from: DateTime<Utc>,
    pub range_to: DateTime<Utc>,
    pub dropped_at: DateTime<Utc>,
    pub dropped_by: String,
    pub row_count: i64,
    pub leaf_count: i64,
    pub tree_size: i64,
}

/// The audit event of a dropped partition: its id derived from the
/// partition and its time the drop's, so recording it again (a retry)
/// gives the same event, stored once.
pub fn drop_event(p: &Prune) -> InternalEvent {
    let mut details = serde_json::Map::new();
    details.insert("partition".into(), p.partition.clone().into());
    details.insert("rangeFrom".into(), p.range_from.to_rfc3339().into());
    details.insert("rangeTo".into(), p.range_to.to_rfc3339().into());
    details.insert("rowsDropped".into(), p.row_count.into());
    details.insert("leavesPruned".into(), p.leaf_count.into());
    details.insert("treeSize".into(), p.tree_size.into());
    InternalEvent {
        event_id: format!("audit.retention.partition_dropped-{}", p.partition),
        time: p.dropped_at,
        action: "audit.retention.partition_dropped".into(),
        principal_id: format!("retention:{}", p.dropped_by),
        organization_id: None,
        target_type: "AuditLogPartition".into(),
        target_id: p.partition.clone(),
        outcome: format!(
            "partition {} dropped by retention: {} rows of [{}, {}), every one past its \
             retention, sealed and under no legal hold; their {} leaves stay provable in the log",
            p.partition,
            p.row_count,
            p.range_from.to_rfc3339(),
            p.range_to.to_rfc3339(),
            p.leaf_count
        ),
        details,
    }
}

/// Adds the event of every drop not recorded yet (this pass's, and those
/// an earlier pass could not record), oldest first; stops at the first
/// failure to add one (Redis down), left for the next pass.
async fn record_drop_events(
    client: &tokio_postgres::Client,
    recorder: &EventRecorder,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT p.partition, p.range_from, p.range_to, p.dropped_at, p.dropped_by,
                    p.row_count, p.leaf_count, p.tree_size
               FROM retention_prunes p
              WHERE NOT EXISTS (SELECT 1 FROM retention_prune_events e
                                 WHERE e.partition = p.partition AND e.dropped_at = p.dropped_at)
              ORDER BY p.dropped_at, p.partition",
            &[],
        )
        .await?;
    let mut recorded = Vec::new();
    for r in &rows {
        let prune = Prune {
            partition: r.get(0),
            range_from: r.get(1),
            range_to: r.get(2),
            dropped_at: r.get(3),
            dropped_by: r.get(4),
            row_count: r.get(5),
            leaf_count: r.get(6),
            tree_size: r.get(7),
        };
        if let Err(e) = recorder.record(&drop_event(&prune)).await {
            tracing::warn!(partition = %prune.partition, error = %e, "retention's audit event of a drop not added; tried again at the next pass");
            break;
        }
        client
            .execute(
                "INSERT INTO retention_prune_events (partition, dropped_at) VALUES ($1, $2)
                 ON CONFLICT DO NOTHING",
                &[&prune.partition, &prune.dropped_at],
            )
            .await?;
        recorded.push(prune.partition);
    }
    Ok(recorded)
}

/// Runs one pass: drops every partition that may go, logs each kept one
/// with its reasons (naming the hold), counts both in `metrics`, and
/// records each drop as an audit event with `recorder` (`None`: left for a
/// pass that has one).
pub async fn run_pass(
    client: &tokio_postgres::Client,
    policy: &RetentionPolicy,
    metrics: Option<&Metrics>,
    recorder: Option<&EventRecorder>,
) -> Result<PassReport, tokio_postgres::Error> {
    let mut report = PassReport::default();
    for v in plan(client, policy, Utc::now()).await? {
        match &v.verdict {
            Verdict::Drop => {
                let dropped = client
                    .query_one(
                        "SELECT audit_log_drop_expired_partition($1, $2, $3, $4)",
                        &[
                            &v.partition,
                            &policy.policies,
                            &policy.default_days,
                            &policy.lock_timeout_ms,
                        ],
                    )
                    .await;
                match dropped {
                    Ok(row) => {
                        let rows: i64 = row.get(0);
                        tracing::info!(partition = %v.partition, rows, "retention dropped a partition: every row past its retention, sealed, under no hold; its leaves stay provable in the log");
                        if let Some(m) = metrics {
                            m.retention_dropped.inc();
                        }
                        report.dropped.push((v.partition.clone(), rows));
                    }
                    Err(e) if e.as_db_error().is_some() => {
                        // Changed since the plan (a hold placed, a late
                        // event), or a lock not granted in time.
                        let cause = crate::db::root_cause(&e);
                        tracing::warn!(partition = %v.partition, error = %cause, "retention did not drop the partition; it is tried again at the next pass");
                        report.failed.push((v.partition.clone(), cause));
                    }
                    Err(e) => return Err(e),
                }
            }
            Verdict::Keep { reasons } => {
                for r in reasons {
                    tracing::info!(
                        partition = %v.partition,
                        reason = %r.code,
                        hold = r.hold_id.as_deref().unwrap_or(""),
                        detail = %r.detail,
                        "retention keeps the partition"
                    );
                    if let Some(m) = metrics {
                        m.retention_refused.with_label_values(&[&r.code]).inc();
                    }
                }
                report.kept.push(v);
            }
            Verdict::NotDue | Verdict::Empty => {}
        }
    }
    if let Some(recorder) = recorder {
        report.events_recorded = record_drop_events(client, recorder).await?;
    }
    Ok(report)
}

/// Starts the periodic pass when `retention.enabled`: every
/// `interval_secs`, on one replica at a time.
pub fn spawn(
    config: &RetentionConfig,
    schema: &str,
    pool: deadpool_postgres::Pool,
    recorder: EventRecorder,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    if !config.enabled {
        return None;
    }
    const TASK: &str = "retention";
    let policy = RetentionPolicy::from_config(config);
    let interval = Duration::from_secs(config.interval_secs);
    let schema = schema.to_owned();
    for result in ["ran", "skipped", "failed"] {
        metrics.periodic_runs.with_label_values(&[TASK, result]);
    }
    Some(tokio::spawn(async move {
        let mut outage = crate::outage::OutageLog::new("retention pass failed");
        loop {
            let policy = policy.clone();
            let m = metrics.clone();
            let recorder = recorder.clone();
            let result = crate::lease::run_exclusive(&pool, &schema, TASK, |client| {
                Box::pin(async move {
                    run_pass(client, &policy, Some(&m), Some(&recorder))
                        .await
                        .map_err(|e| crate::db::root_cause(&e))
                })
            })
            .await;
            let outcome = match result {
                Ok(crate::lease::Exclusive::Ran(_)) => "ran",
                Ok(crate::lease::Exclusive::Skipped) => "skipped",
                Err(e) => {
                    outage.failed(&e);
                    "failed"
                }
            };
            if outcome != "failed" {
                outage.recovered();
            }
            metrics
                .periodic_runs
                .with_label_values(&[TASK, outcome])
                .inc();
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }))
}

/// `audit-worker retention [--dry-run] [--json]`: lists every partition's
/// verdict (dry run), or runs one pass now, and prints what happened.
pub async fn cli(config: &crate::config::Config, dry_run: bool, json: bool) -> anyhow::Result<()> {
    let (client, _connection) = crate::db::connect(config).await?;
    let policy = RetentionPolicy::from_config(&config.retention);
    if dry_run {
        let verdicts = plan(&client, &policy, Utc::now()).await?;
        if json {
            println!("{}", serde_json::to_string_pretty(&verdicts)?);
        } else {
            for v in &verdicts {
                println!("{v}");
            }
            let drops = verdicts
                .iter()
                .filter(|v| v.verdict == Verdict::Drop)
                .count();
            println!(
                "dry run: {drops} of {} partition(s) would be dropped",
                verdicts.len()
            );
        }
        return Ok(());
    }
    // The drops' audit events go to the event stream; without Redis the
    // drops still happen and the next pass with Redis records them.
    let recorder = match connect_redis(config).await {
        Ok(redis) => Some(EventRecorder::new(config, redis)),
        Err(e) => {
            eprintln!("warning: Redis unavailable ({e:#}): the drops' audit events are left for the next pass");
            None
        }
    };
    let report = run_pass(&client, &policy, None, recorder.as_ref()).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for (partition, rows) in &report.dropped {
            println!("DROPPED {partition}: {rows} rows");
        }
        for v in &report.kept {
            println!("{v}");
        }
        for (partition, cause) in &report.failed {
            println!("FAILED {partition}: {cause}");
        }
        println!(
            "{} partition(s) dropped, {} kept, {} failed",
            report.dropped.len(),
            report.kept.len(),
            report.failed.len()
        );
    }
    if report.failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("some partitions could not be dropped (see above); run the pass again later")
    }
}

async fn connect_redis(config: &crate::config::Config) -> anyhow::Result<crate::source::RedisConn> {
    let client = crate::source::redis_client(&config.redis)?;
    Ok(crate::source::command_connection(&client, &config.redis).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drop_event_is_the_same_event_whenever_it_is_recorded() {
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        let p = Prune {
            partition: "audit_log_y2018m01".into(),
            range_from: at("2018-01-01T00:00:00Z"),
            range_to: at("2018-02-01T00:00:00Z"),
            dropped_at: at("2026-11-30T05:00:00.123456Z"),
            dropped_by: "audit_worker".into(),
            row_count: 5,
            leaf_count: 5,
            tree_size: 20,
        };
        let e = drop_event(&p);
        assert_eq!(
            e.event_id,
            "audit.retention.partition_dropped-audit_log_y2018m01"
        );
        assert_eq!(e.time, p.dropped_at);
        assert_eq!(e.target_id, "audit_log_y2018m01");
        assert!(e.outcome.contains("5 rows"), "{}", e.outcome);
        let ring = crate::integrity::HmacKeyRing::default();
        assert_eq!(e.to_json(&ring), drop_event(&p).to_json(&ring));
    }

    #[test]
    fn partition_names_give_their_month_and_other_names_none() {
        assert_eq!(
            partition_month("audit_log_y2019m03"),
            NaiveDate::from_ymd_opt(2019, 3, 1)
        );
        assert_eq!(partition_month("audit_log_y2019m13"), None);
        assert_eq!(partition_month("audit_log_default"), None);
        assert_eq!(partition_month("audit_log_y19m03"), None);
    }

    #[test]
    fn a_month_younger_than_the_shortest_period_is_not_due() {
        let at: DateTime<Utc> = "2026-11-30T00:00:00Z".parse().unwrap();
        let nov = NaiveDate::from_ymd_opt(2026, 11, 1).unwrap();
        assert!(not_due(nov, 30, at), "began 29 days ago");
        assert!(!not_due(nov, 29, at), "began exactly 29 days ago");
        let old = NaiveDate::from_ymd_opt(2018, 1, 1).unwrap();
        assert!(!not_due(old, 2555, at));
    }

    #[test]
    fn the_shortest_period_covers_the_default_and_every_policy() {
        let mut config = RetentionConfig {
            enabled: false,
            interval_secs: 1,
            default_days: 2555,
            policies: Default::default(),
            lock_timeout_ms: 1000,
        };
        assert_eq!(RetentionPolicy::from_config(&config).shortest_days, 2555);
        config.policies.insert("short".into(), 30);
        let p = RetentionPolicy::from_config(&config);
        assert_eq!(p.shortest_days, 30);
        assert_eq!(p.policies, serde_json::json!({"short": 30}));
    }
}
