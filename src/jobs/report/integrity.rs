//! The `integrity` report: the existing verification ([`crate::jobs::verify`])
//! run over the checkpoints whose ranges meet the period, plus how many of
//! the period's events are sealed at all.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use crate::integrity::checkpoint::NoteVerifier;
use crate::jobs::verify::{self, Finding, FindingKind};

use super::request::ReportRequest;

/// One checkpoint the report covered.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CoveredCheckpoint {
    pub snapshot_id: i64,
    pub range_from: Option<String>,
    pub range_to: String,
    pub tree_size: i64,
    /// Events this checkpoint sealed (and the verification checked).
    pub leaves: i64,
}

/// The integrity report.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IntegrityReport {
    /// No problem found.
    pub ok: bool,
    pub checkpoints: Vec<CoveredCheckpoint>,
    /// Sealed events whose rows were re-checked against the signed roots.
    pub events_checked: u64,
    /// Events of the period (within the report's organisations).
    pub events_in_period: i64,
    /// Of those, events no checkpoint seals yet (not a problem: the next
    /// snapshot seals them).
    pub unsealed_in_period: i64,
    /// Problems, each naming its event or checkpoint.
    pub problems: Vec<Finding>,
    /// Problems about events outside the report's organisations (or whose
    /// row is gone, so no organisation can be told): counted, not shown.
    pub problems_outside_scope: u64,
    /// The signed checkpoint (note text) of the last covered snapshot.
    pub checked_against: Option<String>,
}

fn rfc(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Runs the verification for `request`'s period. `org_filter` is the
/// organisations rows may come from (`None`: all).
pub async fn run(
    client: &mut tokio_postgres::Client,
    verifier: &NoteVerifier,
    origin: &str,
    page: i32,
    request: &ReportRequest,
) -> Result<IntegrityReport, String> {
    let orgs = request.org_filter();
    let snapshots = client
        .query(
            "SELECT id, range_from, range_to, tree_size, tree_size - previous_tree_size, checkpoint_note \
             FROM snapshots WHERE (range_from IS NULL OR range_from < $2) AND range_to > $1 ORDER BY id",
            &[&request.from, &request.to],
        )
        .await
        .map_err(|e| crate::db::root_cause(&e))?;
    let mut checkpoints = Vec::new();
    let mut problems: Vec<Finding> = Vec::new();
    let mut events_checked = 0;
    let mut checked_against = None;
    for s in &snapshots {
        let id: i64 = s.get(0);
        let report = verify::verify(client, verifier, origin, Some(id), page)
            .await
            .map_err(|e| e.to_string())?;
        events_checked += report.leaves_checked;
        for f in report.findings {
            // The chain is checked whole on every call: keep each finding once.
            if !problems.iter().any(|p| {
                p.kind == f.kind
                    && p.snapshot_id == f.snapshot_id
                    && p.detail == f.detail
                    && p.event == f.event
            }) {
                problems.push(f);
            }
        }
        checkpoints.push(CoveredCheckpoint {
            snapshot_id: id,
            range_from: s.get::<_, Option<DateTime<Utc>>>(1).map(rfc),
            range_to: rfc(s.get(2)),
            tree_size: s.get(3),
            leaves: s.get(4),
        });
        checked_against = Some(s.get::<_, String>(5));
    }
    let mut problems_outside_scope = 0;
    if let Some(orgs) = &orgs {
        let mut kept = Vec::new();
        for f in problems {
            let inside = match (f.kind, f.row_id, f.event_time) {
                (FindingKind::Checkpoint, _, _) => true,
                (_, Some(row), Some(t)) => client
                    .query_opt(
                        "SELECT 1 FROM audit_log WHERE event_time = $1 AND id = $2 AND organization_id = ANY($3)",
                        &[&t, &row, orgs],
                    )
                    .await
                    .map_err(|e| crate::db::root_cause(&e))?
                    .is_some(),
                _ => false,
            };
            if inside {
                kept.push(f);
            } else {
                problems_outside_scope += 1;
            }
        }
        problems = kept;
    }
    let counts = client
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM seal_ledger l \
               WHERE l.event_time = a.event_time AND l.row_id = a.id)) \
             FROM audit_log a WHERE a.event_time >= $1 AND a.event_time < $2 \
               AND ($3::text[] IS NULL OR a.organization_id = ANY($3))",
            &[&request.from, &request.to, &orgs],
        )
        .await
        .map_err(|e| crate::db::root_cause(&e))?;
    Ok(IntegrityReport {
        ok: problems.is_empty() && problems_outside_scope == 0,
        checkpoints,
        events_checked,
        events_in_period: counts.get(0),
        unsealed_in_period: counts.get(1),
        problems,
        problems_outside_scope,
        checked_against,
    })
}
