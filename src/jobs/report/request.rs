//! The `report.compliance` request: parsing, validation and its canonical
//! form. Pure: bytes in, [`ReportRequest`] or a [`Rejection`] out.

use std::collections::BTreeSet;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::dlq::{RejectReason, Rejection};
use crate::jobs::export::request::parse_time;

/// Longest accepted organisation or requester id, in characters.
const MAX_VALUE_CHARS: usize = 1000;
/// Most organisations accepted in an allowed-organisations scope.
const MAX_ALLOWED_ORGS: usize = 10_000;

/// Which report is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReportKind {
    /// Accesses to PHI, failures, after-hours and break-glass actions.
    #[serde(rename = "hipaa-audit-trail")]
    HipaaAuditTrail,
    /// An Art. 30-style record of processing activities.
    #[serde(rename = "gdpr-processing")]
    GdprProcessing,
    /// The verifiable log checked over the period.
    #[serde(rename = "integrity")]
    Integrity,
}

impl ReportKind {
    /// Every kind, in the order the docs list them.
    pub const ALL: [ReportKind; 3] = [Self::HipaaAuditTrail, Self::GdprProcessing, Self::Integrity];

    /// The name used in requests, the database and file names.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HipaaAuditTrail => "hipaa-audit-trail",
            Self::GdprProcessing => "gdpr-processing",
            Self::Integrity => "integrity",
        }
    }

    /// Parses a kind name; the error says which ones exist.
    pub fn parse(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown report kind {s:?}: use \"hipaa-audit-trail\", \"gdpr-processing\" or \"integrity\""
                )
            })
    }

    /// The human title, used as the HTML heading.
    pub fn title(self) -> &'static str {
        match self {
            Self::HipaaAuditTrail => "HIPAA audit trail",
            Self::GdprProcessing => "GDPR record of processing activities",
            Self::Integrity => "Audit log integrity",
        }
    }
}

/// One output file of a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OutputFormat {
    /// The whole report as one JSON document (for machines).
    Json,
    /// The detail rows, RFC 4180.
    Csv,
    /// One self-contained page with tables and SVG charts (for people).
    Html,
}

impl OutputFormat {
    /// Every format; the default selection.
    pub const ALL: [OutputFormat; 3] = [Self::Json, Self::Csv, Self::Html];

    /// The name used in requests, the database and file extensions.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Csv => "csv",
            Self::Html => "html",
        }
    }

    /// Parses a format name; the error says which ones exist.
    pub fn parse(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| {
                format!("unknown report format {s:?}: use \"json\", \"csv\" or \"html\"")
            })
    }

    /// The MIME type of the file.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Csv => "text/csv; charset=utf-8",
            Self::Html => "text/html; charset=utf-8",
        }
    }
}

/// A validated report request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportRequest {
    pub kind: ReportKind,
    /// `None`: every organisation (within `allowed_orgs`).
    pub organization_id: Option<String>,
    /// Inclusive start of the period.
    pub from: DateTime<Utc>,
    /// Exclusive end of the period.
    pub to: DateTime<Utc>,
    pub requester_id: String,
    /// The files to produce (never empty).
    pub formats: BTreeSet<OutputFormat>,
    /// The organisations the requester may see; `None`: all. The report
    /// never reads a row outside them.
    pub allowed_orgs: Option<BTreeSet<String>>,
}

/// The wire form (camelCase, unknown keys refused).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WireRequest {
    kind: String,
    #[serde(default)]
    organization_id: Option<String>,
    from: String,
    to: String,
    requester_id: String,
    #[serde(default)]
    formats: Option<Vec<String>>,
    #[serde(default)]
    allowed_organizations: Option<Vec<String>>,
}

fn reject(message: impl Into<String>) -> Rejection {
    Rejection::new(RejectReason::InvalidReportRequest, message)
}

fn check_value(key: &str, v: &str) -> Result<(), Rejection> {
    if v.is_empty() {
        return Err(reject(format!("{key} must not be empty")));
    }
    if v.chars().count() > MAX_VALUE_CHARS {
        return Err(reject(format!(
            "{key} is longer than {MAX_VALUE_CHARS} characters"
        )));
    }
    if v.contains('\0') {
        return Err(reject(format!("{key} contains a NUL character")));
    }
    Ok(())
}

/// Shape of a valid request, quoted in every parse error.
const EXPECTED: &str = "expected {\"kind\", \"from\", \"to\", \"requesterId\", optional \"organizationId\" (omit or \"*\" for all), \"formats\" and \"allowedOrganizations\"}";

impl ReportRequest {
    /// Parses and validates the JSON payload of a `report.compliance` job.
    pub fn parse(data: &[u8]) -> Result<Self, Rejection> {
        let wire: WireRequest = serde_json::from_slice(data)
            .map_err(|e| reject(format!("report request is not valid: {e} ({EXPECTED})")))?;
        let kind = ReportKind::parse(&wire.kind).map_err(reject)?;
        let from = parse_time(&wire.from).map_err(|e| reject(format!("from: {e}")))?;
        let to = parse_time(&wire.to).map_err(|e| reject(format!("to: {e}")))?;
        if from >= to {
            return Err(reject(format!(
                "from ({}) must be before to ({}); the period is [from, to)",
                from.to_rfc3339_opts(SecondsFormat::Micros, true),
                to.to_rfc3339_opts(SecondsFormat::Micros, true)
            )));
        }
        let requester_id = wire.requester_id.trim().to_owned();
        check_value("requesterId", &requester_id)?;
        let organization_id = match wire.organization_id {
            None => None,
            Some(o) if o == "*" => None,
            Some(o) => {
                check_value("organizationId", &o)?;
                Some(o)
            }
        };
        let formats = match wire.formats {
            None => OutputFormat::ALL.into_iter().collect(),
            Some(list) => {
                let set = list
                    .iter()
                    .map(|f| OutputFormat::parse(f).map_err(reject))
                    .collect::<Result<BTreeSet<_>, _>>()?;
                if set.is_empty() {
                    return Err(reject(
                        "formats must name at least one of \"json\", \"csv\", \"html\" (or be left out for all three)",
                    ));
                }
                set
            }
        };
        let allowed_orgs = match wire.allowed_organizations {
            None => None,
            Some(list) => {
                if list.len() > MAX_ALLOWED_ORGS {
                    return Err(reject(format!(
                        "allowedOrganizations has more than {MAX_ALLOWED_ORGS} values"
                    )));
                }
                for o in &list {
                    check_value("allowedOrganizations", o)?;
                }
                Some(list.into_iter().collect::<BTreeSet<_>>())
            }
        };
        let request = Self {
            kind,
            organization_id,
            from,
            to,
            requester_id,
            formats,
            allowed_orgs,
        };
        request.check_scope()?;
        Ok(request)
    }

    /// Refuses an organisation outside the allowed ones, so a scoped
    /// requester learns at once that the report would be empty by rule,
    /// not by data.
    pub fn check_scope(&self) -> Result<(), Rejection> {
        if let (Some(org), Some(allowed)) = (&self.organization_id, &self.allowed_orgs) {
            if !allowed.contains(org) {
                return Err(reject(format!(
                    "organizationId {org:?} is outside the organisations this requester may see; ask for one of those, or for all (\"*\")"
                )));
            }
        }
        Ok(())
    }

    /// Canonical JSON of the request (fixed key order, sorted lists): what
    /// two requests are compared by.
    pub fn canonical_json(&self) -> serde_json::Value {
        serde_json::json!({
            "allowedOrganizations": self.allowed_orgs,
            "formats": self.formats.iter().map(|f| f.as_str()).collect::<Vec<_>>(),
            "from": self.from.to_rfc3339_opts(SecondsFormat::Micros, true),
            "kind": self.kind.as_str(),
            "organizationId": self.organization_id,
            "requesterId": self.requester_id,
            "to": self.to.to_rfc3339_opts(SecondsFormat::Micros, true),
        })
    }

    /// SHA-256 (hex) of the canonical JSON: with the requester, the
    /// deduplication key of in-progress jobs.
    pub fn request_hash(&self) -> String {
        hex::encode(Sha256::digest(self.canonical_json().to_string().as_bytes()))
    }

    /// The organisations a query may read, as the `ANY($n)` parameter:
    /// the one asked for, else the allowed ones, else `None` (all).
    pub fn org_filter(&self) -> Option<Vec<String>> {
        match (&self.organization_id, &self.allowed_orgs) {
            (Some(org), _) => Some(vec![org.clone()]),
            (None, Some(allowed)) => Some(allowed.iter().cloned().collect()),
            (None, None) => None,
        }
    }

    /// The base name of the report's files:
    /// `report-<kind>-<from>-<to>-<job id>` with only `[A-Za-z0-9._-]` kept.
    pub fn base_name(&self, job_id: &str) -> String {
        let stamp = |t: &DateTime<Utc>| t.format("%Y%m%dT%H%M%SZ").to_string();
        crate::jobs::export::request::sanitize_file_name(&format!(
            "report-{}-{}-{}-{job_id}",
            self.kind.as_str(),
            stamp(&self.from),
            stamp(&self.to)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: serde_json::Value) -> Result<ReportRequest, Rejection> {
        ReportRequest::parse(v.to_string().as_bytes())
    }

    #[test]
    fn a_minimal_request_asks_for_all_formats_of_all_organisations() {
        let r = parse(json!({"kind": "hipaa-audit-trail", "from": "2024-03-01", "to": "2024-04-01", "requesterId": " officer "})).unwrap();
        assert_eq!(r.kind, ReportKind::HipaaAuditTrail);
        assert_eq!(r.requester_id, "officer");
        assert_eq!(r.organization_id, None);
        assert_eq!(r.formats.len(), 3);
        assert_eq!(r.org_filter(), None);
        assert_eq!(
            r.base_name("j1"),
            "report-hipaa-audit-trail-20240301T000000Z-20240401T000000Z-j1"
        );
    }

    #[test]
    fn the_scope_limits_the_query_and_refuses_an_organisation_outside_it() {
        let r = parse(
            json!({"kind": "gdpr-processing", "from": "2024-03-01", "to": "2024-04-01",
            "requesterId": "o", "organizationId": "*", "allowedOrganizations": ["b", "a", "a"]}),
        )
        .unwrap();
        assert_eq!(r.org_filter(), Some(vec!["a".to_owned(), "b".to_owned()]));
        let r = parse(
            json!({"kind": "integrity", "from": "2024-03-01", "to": "2024-04-01",
            "requesterId": "o", "organizationId": "a", "allowedOrganizations": ["a"]}),
        )
        .unwrap();
        assert_eq!(r.org_filter(), Some(vec!["a".to_owned()]));
        let e = parse(
            json!({"kind": "integrity", "from": "2024-03-01", "to": "2024-04-01",
            "requesterId": "o", "organizationId": "b", "allowedOrganizations": ["a"]}),
        )
        .unwrap_err();
        assert_eq!(e.reason, RejectReason::InvalidReportRequest);
        assert!(e.message.contains("outside"), "{}", e.message);
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason_that_says_what_to_fix() {
        let base = json!({"kind": "hipaa-audit-trail", "from": "2024-03-01", "to": "2024-04-01", "requesterId": "o"});
        let with = |k: &str, v: serde_json::Value| {
            let mut b = base.clone();
            b[k] = v;
            parse(b).unwrap_err().message
        };
        assert!(with("kind", json!("sox")).contains("unknown report kind"));
        assert!(with("to", json!("2024-02-01")).contains("must be before"));
        assert!(with("from", json!("yesterday")).contains("RFC 3339"));
        assert!(with("formats", json!(["pdf"])).contains("\"html\""));
        assert!(with("formats", json!([])).contains("at least one"));
        assert!(with("requesterId", json!("  ")).contains("must not be empty"));
        assert!(with("extra", json!(1)).contains("unknown field"));
        assert!(parse(json!([])).is_err());
    }

    #[test]
    fn the_canonical_form_ignores_order_and_duplicates() {
        let a = parse(
            json!({"kind": "integrity", "from": "2024-03-01T01:00:00+01:00", "to": "2024-04-01",
            "requesterId": "o", "formats": ["html", "json", "html"]}),
        )
        .unwrap();
        let b = parse(
            json!({"requesterId": "o", "formats": ["json", "html"], "to": "2024-04-01T00:00:00Z",
            "from": "2024-03-01", "kind": "integrity"}),
        )
        .unwrap();
        assert_eq!(a.request_hash(), b.request_hash());
        let c = parse(json!({"requesterId": "o", "to": "2024-04-01", "from": "2024-03-01", "kind": "integrity"}))
            .unwrap();
        assert_ne!(a.request_hash(), c.request_hash());
    }
}
