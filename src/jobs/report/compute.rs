//! What the reports compute, row by row. Pure: rows in, sections out; the
//! executor streams rows from PostgreSQL into these aggregators (detail
//! rows go straight on to the CSV writer), so memory is bounded by the
//! counters' capacity, never by the period's size.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use super::counter::{Breakdown, TopCounter};
use super::hours::WorkingHours;

/// One audit_log row as the reports read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportRow {
    pub id: i64,
    pub event_time: DateTime<Utc>,
    pub event_id: Option<String>,
    pub action: String,
    pub status: String,
    pub principal_id: Option<String>,
    pub organization_id: Option<String>,
    pub target_resource_type: Option<String>,
    pub target_resource_id: Option<String>,
    pub data_classification: Option<String>,
    pub retention_policy: Option<String>,
}

/// The status value of a failed (or denied) attempt in the event schema.
pub const FAILED_STATUS: &str = "failure";

/// Shown for a missing principal or value.
const NONE: &str = "(none)";

/// What the HIPAA report needs to know besides the rows.
#[derive(Debug, Clone)]
pub struct HipaaSettings {
    pub hours: WorkingHours,
    pub break_glass_actions: Vec<String>,
    pub top_n: usize,
    pub capacity: usize,
}

/// The HIPAA report's flags for one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flags {
    pub phi: bool,
    pub failed: bool,
    pub after_hours: bool,
    pub break_glass: bool,
}

/// Streams rows into the HIPAA audit-trail sections.
#[derive(Debug)]
pub struct HipaaAggregator {
    settings: HipaaSettings,
    totals: HipaaTotals,
    by_principal: TopCounter,
    by_resource: TopCounter,
    failed_by_principal: TopCounter,
    after_hours_by_principal: TopCounter,
    break_glass_by_principal: TopCounter,
    by_day: DayHistogram,
}

/// The HIPAA report's counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HipaaTotals {
    /// Rows the report covers: PHI accesses plus break-glass actions.
    pub events: u64,
    pub phi_accesses: u64,
    pub failed_attempts: u64,
    pub after_hours: u64,
    pub break_glass: u64,
    pub distinct_principals: Option<u64>,
    pub distinct_resources: Option<u64>,
}

/// The HIPAA audit-trail report (without its detail rows, which are in
/// the CSV).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HipaaReport {
    pub working_hours: String,
    pub break_glass_actions: Vec<String>,
    pub totals: HipaaTotals,
    pub top_principals: Breakdown,
    pub by_principal: Breakdown,
    pub by_resource: Breakdown,
    pub failed_by_principal: Breakdown,
    pub after_hours_by_principal: Breakdown,
    pub break_glass_by_principal: Breakdown,
    pub by_day: Vec<DayCount>,
}

/// Events per UTC day (the chart of activity over the period).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DayCount {
    pub day: String,
    pub count: u64,
}

/// Per-day counts, bounded: days beyond `MAX_DAYS` fold into the last one
/// shown (a period of years still renders as one chart).
#[derive(Debug, Default)]
struct DayHistogram {
    days: std::collections::BTreeMap<String, u64>,
}

/// Most days kept in the activity chart.
const MAX_DAYS: usize = 400;

impl DayHistogram {
    fn add(&mut self, t: DateTime<Utc>) {
        let day = t.format("%Y-%m-%d").to_string();
        if self.days.len() >= MAX_DAYS && !self.days.contains_key(&day) {
            if let Some(mut last) = self.days.last_entry() {
                *last.get_mut() += 1;
            }
            return;
        }
        *self.days.entry(day).or_default() += 1;
    }

    fn finish(self) -> Vec<DayCount> {
        self.days
            .into_iter()
            .map(|(day, count)| DayCount { day, count })
            .collect()
    }
}

fn principal(row: &ReportRow) -> &str {
    row.principal_id.as_deref().unwrap_or(NONE)
}

/// A resource's key: `type/id`.
pub fn resource_key(row: &ReportRow) -> String {
    format!(
        "{}/{}",
        row.target_resource_type.as_deref().unwrap_or(NONE),
        row.target_resource_id.as_deref().unwrap_or(NONE)
    )
}

impl HipaaAggregator {
    /// An empty aggregator.
    pub fn new(settings: HipaaSettings) -> Self {
        let c = settings.capacity;
        Self {
            settings,
            totals: HipaaTotals::default(),
            by_principal: TopCounter::new(c),
            by_resource: TopCounter::new(c),
            failed_by_principal: TopCounter::new(c),
            after_hours_by_principal: TopCounter::new(c),
            break_glass_by_principal: TopCounter::new(c),
            by_day: DayHistogram::default(),
        }
    }

    /// The flags of a row (whether the report covers it at all: `phi` or
    /// `break_glass`).
    pub fn flags(&self, row: &ReportRow) -> Flags {
        Flags {
            phi: row.data_classification.as_deref() == Some("PHI"),
            failed: row.status == FAILED_STATUS,
            after_hours: self.settings.hours.is_after_hours(row.event_time),
            break_glass: self.settings.break_glass_actions.contains(&row.action),
        }
    }

    /// Counts one row; returns its flags, or `None` when the report does
    /// not cover it (neither PHI nor break-glass).
    pub fn add(&mut self, row: &ReportRow) -> Option<Flags> {
        let f = self.flags(row);
        if !f.phi && !f.break_glass {
            return None;
        }
        let who = principal(row);
        let t = &mut self.totals;
        t.events += 1;
        self.by_principal.add(who);
        self.by_day.add(row.event_time);
        if f.phi {
            t.phi_accesses += 1;
            self.by_resource.add(&resource_key(row));
        }
        if f.failed {
            t.failed_attempts += 1;
            self.failed_by_principal.add(who);
        }
        if f.after_hours {
            t.after_hours += 1;
            self.after_hours_by_principal.add(who);
        }
        if f.break_glass {
            t.break_glass += 1;
            self.break_glass_by_principal.add(who);
        }
        Some(f)
    }

    /// The report's sections.
    pub fn finish(self) -> HipaaReport {
        let list = self.settings.top_n.max(50);
        let by_principal = self.by_principal.top(list);
        let by_resource = self.by_resource.top(list);
        let mut totals = self.totals;
        totals.distinct_principals = by_principal.distinct;
        totals.distinct_resources = by_resource.distinct;
        HipaaReport {
            working_hours: self.settings.hours.describe(),
            break_glass_actions: self.settings.break_glass_actions.clone(),
            totals,
            top_principals: self.by_principal.top(self.settings.top_n),
            by_principal,
            by_resource,
            failed_by_principal: self.failed_by_principal.top(list),
            after_hours_by_principal: self.after_hours_by_principal.top(list),
            break_glass_by_principal: self.break_glass_by_principal.top(list),
            by_day: self.by_day.finish(),
        }
    }
}

/// The columns of the HIPAA report's CSV.
pub const HIPAA_CSV_COLUMNS: [&str; 15] = [
    "event_time",
    "id",
    "event_id",
    "organization_id",
    "principal_id",
    "action",
    "status",
    "target_resource_type",
    "target_resource_id",
    "data_classification",
    "retention_policy",
    "phi",
    "failed",
    "after_hours",
    "break_glass",
];

/// A CSV field with spreadsheet formula triggers defused (a leading `=`,
/// `+`, `-`, `@`, tab or CR gets a `'` in front), as exports do.
fn cell(v: &str) -> String {
    match v.chars().next() {
        Some('=' | '+' | '-' | '@' | '\t' | '\r') => format!("'{v}"),
        _ => v.to_owned(),
    }
}

/// The CSV record of one covered row.
pub fn hipaa_csv_record(row: &ReportRow, f: Flags) -> [String; 15] {
    let opt = |v: &Option<String>| cell(v.as_deref().unwrap_or(""));
    let b = |v: bool| if v { "true" } else { "false" }.to_owned();
    [
        row.event_time.to_rfc3339_opts(SecondsFormat::Micros, true),
        row.id.to_string(),
        opt(&row.event_id),
        opt(&row.organization_id),
        opt(&row.principal_id),
        cell(&row.action),
        row.status.clone(),
        opt(&row.target_resource_type),
        opt(&row.target_resource_id),
        opt(&row.data_classification),
        opt(&row.retention_policy),
        b(f.phi),
        b(f.failed),
        b(f.after_hours),
        b(f.break_glass),
    ]
}

/// Streams rows into the GDPR record of processing activities.
#[derive(Debug)]
pub struct GdprAggregator {
    events: u64,
    by_action: TopCounter,
    by_classification: TopCounter,
    by_retention: TopCounter,
    top: usize,
}

/// Who received data: an export or report made in the period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Recipient {
    /// `export` or `report`.
    pub channel: String,
    pub job_id: String,
    pub requester_id: String,
    /// What was handed over (filters, report kind, organisation).
    pub what: String,
    pub rows: Option<i64>,
    pub at: String,
}

/// Erasures: none are recorded by this system yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Erasures {
    pub count: u64,
    pub note: String,
}

/// The GDPR Art. 30-style record.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GdprReport {
    pub events: u64,
    pub processing_activities: Breakdown,
    pub data_categories: Breakdown,
    pub retention_policies: Breakdown,
    pub recipients: Vec<Recipient>,
    /// Whether more recipients exist than are listed.
    pub recipients_truncated: bool,
    pub erasures: Erasures,
}

impl GdprAggregator {
    /// An empty aggregator listing up to `top` entries per section.
    pub fn new(capacity: usize, top: usize) -> Self {
        Self {
            events: 0,
            by_action: TopCounter::new(capacity),
            by_classification: TopCounter::new(capacity),
            by_retention: TopCounter::new(capacity),
            top,
        }
    }

    /// Counts one row.
    pub fn add(&mut self, row: &ReportRow) {
        self.events += 1;
        self.by_action.add(&row.action);
        self.by_classification
            .add(row.data_classification.as_deref().unwrap_or("UNCLASSIFIED"));
        self.by_retention
            .add(row.retention_policy.as_deref().unwrap_or(NONE));
    }

    /// The report's sections, with the recipients read separately.
    pub fn finish(self, recipients: Vec<Recipient>, truncated: bool) -> GdprReport {
        GdprReport {
            events: self.events,
            processing_activities: self.by_action.top(self.top),
            data_categories: self.by_classification.top(self.top),
            retention_policies: self.by_retention.top(self.top),
            recipients,
            recipients_truncated: truncated,
            erasures: Erasures {
                count: 0,
                note: "no erasure mechanism recorded: audit events are append-only and none were erased".into(),
            },
        }
    }
}

/// The columns of the GDPR report's CSV: one line per section entry.
pub const GDPR_CSV_COLUMNS: [&str; 4] = ["section", "name", "count", "detail"];

/// The GDPR report as CSV records (bounded: the listed entries only).
pub fn gdpr_csv_records(r: &GdprReport) -> Vec<[String; 4]> {
    let mut out = Vec::new();
    for (section, b) in [
        ("processing_activity", &r.processing_activities),
        ("data_category", &r.data_categories),
        ("retention_policy", &r.retention_policies),
    ] {
        for e in &b.entries {
            out.push([
                section.to_owned(),
                cell(&e.key),
                e.count.to_string(),
                if e.overcount > 0 {
                    format!("may be up to {} too high", e.overcount)
                } else {
                    String::new()
                },
            ]);
        }
    }
    for rcp in &r.recipients {
        out.push([
            format!("recipient_{}", rcp.channel),
            cell(&rcp.requester_id),
            rcp.rows.map(|r| r.to_string()).unwrap_or_default(),
            cell(&format!("job {} at {}: {}", rcp.job_id, rcp.at, rcp.what)),
        ]);
    }
    out.push([
        "erasures".into(),
        "erasures".into(),
        r.erasures.count.to_string(),
        r.erasures.note.clone(),
    ]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(
        i: i64,
        t: &str,
        action: &str,
        status: &str,
        who: &str,
        class: Option<&str>,
    ) -> ReportRow {
        ReportRow {
            id: i,
            event_time: DateTime::parse_from_rfc3339(t).unwrap().with_timezone(&Utc),
            event_id: Some(format!("e{i}")),
            action: action.into(),
            status: status.into(),
            principal_id: Some(who.into()),
            organization_id: Some("org".into()),
            target_resource_type: Some("Patient".into()),
            target_resource_id: Some(format!("p{}", i % 2)),
            data_classification: class.map(String::from),
            retention_policy: None,
        }
    }

    fn settings() -> HipaaSettings {
        HipaaSettings {
            hours: WorkingHours::parse(
                "08:00-18:00",
                &["Mon", "Tue", "Wed", "Thu", "Fri"].map(String::from),
                "Z",
            )
            .unwrap(),
            break_glass_actions: vec!["emergency.access".into()],
            top_n: 2,
            capacity: 100,
        }
    }

    #[test]
    fn hipaa_counts_phi_failures_after_hours_and_break_glass() {
        let mut a = HipaaAggregator::new(settings());
        let rows = [
            row(
                1,
                "2024-03-04T09:00:00Z",
                "record.read",
                "success",
                "alice",
                Some("PHI"),
            ),
            row(
                2,
                "2024-03-04T20:00:00Z",
                "record.read",
                "failure",
                "bob",
                Some("PHI"),
            ),
            row(
                3,
                "2024-03-04T10:00:00Z",
                "record.read",
                "success",
                "alice",
                Some("INTERNAL"),
            ),
            row(
                4,
                "2024-03-09T10:00:00Z",
                "emergency.access",
                "success",
                "carol",
                None,
            ),
            row(
                5,
                "2024-03-05T10:00:00Z",
                "record.read",
                "success",
                "alice",
                Some("PHI"),
            ),
        ];
        let covered: Vec<_> = rows.iter().map(|r| a.add(r).is_some()).collect();
        assert_eq!(covered, [true, true, false, true, true]);
        let r = a.finish();
        assert_eq!(
            r.totals,
            HipaaTotals {
                events: 4,
                phi_accesses: 3,
                failed_attempts: 1,
                after_hours: 2,
                break_glass: 1,
                distinct_principals: Some(3),
                distinct_resources: Some(2),
            }
        );
        let top: Vec<_> = r
            .top_principals
            .entries
            .iter()
            .map(|e| (e.key.as_str(), e.count))
            .collect();
        assert_eq!(top, [("alice", 2), ("bob", 1)]);
        assert_eq!(r.by_day.len(), 3);
    }

    #[test]
    fn csv_cells_defuse_formulas_and_flags_are_spelled_out() {
        let mut r = row(
            7,
            "2024-03-04T09:00:00Z",
            "=cmd()",
            "success",
            "@x",
            Some("PHI"),
        );
        r.target_resource_id = None;
        let a = HipaaAggregator::new(settings());
        let rec = hipaa_csv_record(&r, a.flags(&r));
        assert_eq!(rec[0], "2024-03-04T09:00:00.000000Z");
        assert_eq!(rec[4], "'@x");
        assert_eq!(rec[5], "'=cmd()");
        assert_eq!(rec[8], "");
        assert_eq!(&rec[11..], ["true", "false", "false", "false"]);
    }

    #[test]
    fn gdpr_groups_by_action_class_and_retention_and_records_no_erasures() {
        let mut g = GdprAggregator::new(100, 10);
        let mut r = row(1, "2024-03-04T09:00:00Z", "a", "success", "x", Some("PHI"));
        g.add(&r);
        r.retention_policy = Some("7y".into());
        r.data_classification = None;
        g.add(&r);
        r.action = "b".into();
        g.add(&r);
        let rep = g.finish(vec![], false);
        assert_eq!(rep.events, 3);
        assert_eq!(rep.processing_activities.entries[0].key, "a");
        assert_eq!(rep.processing_activities.entries[0].count, 2);
        let classes: Vec<_> = rep
            .data_categories
            .entries
            .iter()
            .map(|e| (e.key.as_str(), e.count))
            .collect();
        assert_eq!(classes, [("UNCLASSIFIED", 2), ("PHI", 1)]);
        let ret: Vec<_> = rep
            .retention_policies
            .entries
            .iter()
            .map(|e| (e.key.as_str(), e.count))
            .collect();
        assert_eq!(ret, [("7y", 2), ("(none)", 1)]);
        assert_eq!(rep.erasures.count, 0);
        let csv = gdpr_csv_records(&rep);
        assert_eq!(csv.last().unwrap()[0], "erasures");
    }
}
