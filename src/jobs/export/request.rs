//! The `export.audit` request: parsing, validation and its canonical form.
//!
//! Parsing is pure (bytes in, [`ExportRequest`] or a [`Rejection`] out) and
//! never panics on input. The canonical form (normalised filters plus format
//! and compression, serialised with a fixed key order) is what two requests
//! are compared by: its SHA-256 is the `filter_hash` of the job.

use std::collections::BTreeSet;

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::dlq::{RejectReason, Rejection};

/// Longest accepted filter value or requester id, in characters.
const MAX_VALUE_CHARS: usize = 1000;
/// Most values accepted in one list filter.
const MAX_LIST_VALUES: usize = 1000;

/// The file format of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Header row, then one RFC 4180 record per event.
    Csv,
    /// One JSON object per line.
    Ndjson,
    /// One JSON array of objects.
    Json,
    /// One OCSF event (JSON) per line.
    Ocsf,
    /// Apache Parquet with the export columns (`parquetSchema: "columns"`).
    Parquet,
    /// Apache Parquet with the OCSF events flattened into columns
    /// (`parquetSchema: "ocsf"`).
    ParquetOcsf,
}

impl Format {
    /// The name stored in the database and written in manifests and
    /// notifications (`parquet-ocsf` for parquet with the OCSF schema).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Csv => "csv",
            Self::Ndjson => "ndjson",
            Self::Json => "json",
            Self::Ocsf => "ocsf",
            Self::Parquet => "parquet",
            Self::ParquetOcsf => "parquet-ocsf",
        }
    }

    /// Parses a format name (a stored name: `parquet-ocsf` is accepted
    /// too); the error says which ones exist.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "csv" => Ok(Self::Csv),
            "ndjson" => Ok(Self::Ndjson),
            "json" => Ok(Self::Json),
            "ocsf" => Ok(Self::Ocsf),
            "parquet" => Ok(Self::Parquet),
            "parquet-ocsf" => Ok(Self::ParquetOcsf),
            other => Err(format!(
                "unknown format {other:?}: use \"csv\", \"ndjson\", \"json\", \"ocsf\" or \"parquet\""
            )),
        }
    }

    /// Whether this is a Parquet format: each part is a complete Parquet
    /// file and the artifact is composed by copying their row groups, and
    /// outer compression does not apply (Parquet compresses inside).
    pub fn is_parquet(self) -> bool {
        matches!(self, Self::Parquet | Self::ParquetOcsf)
    }

    /// The file name extension (without the compression suffix).
    pub fn extension(self) -> &'static str {
        match self {
            Self::Csv => "csv",
            Self::Ndjson => "ndjson",
            Self::Json => "json",
            Self::Ocsf => "ocsf.ndjson",
            Self::Parquet | Self::ParquetOcsf => "parquet",
        }
    }

    /// The MIME type served by the download endpoint (before compression).
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Csv => "text/csv; charset=utf-8",
            Self::Ndjson | Self::Ocsf => "application/x-ndjson",
            Self::Json => "application/json",
            Self::Parquet | Self::ParquetOcsf => "application/vnd.apache.parquet",
        }
    }
}

/// The compression applied to an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// gzip (RFC 1952), one member per part; the default.
    Gzip,
    /// zstd, one frame per part.
    Zstd,
    /// Uncompressed.
    None,
}

impl Compression {
    /// The name used in requests and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gzip => "gzip",
            Self::Zstd => "zstd",
            Self::None => "none",
        }
    }

    /// Parses a compression name; the error says which ones exist.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "gzip" => Ok(Self::Gzip),
            "zstd" => Ok(Self::Zstd),
            "none" => Ok(Self::None),
            other => Err(format!(
                "unknown compression {other:?}: use \"gzip\", \"zstd\" or \"none\""
            )),
        }
    }

    /// File name suffix (`.gz`, `.zst`, or nothing).
    pub fn suffix(self) -> &'static str {
        match self {
            Self::Gzip => ".gz",
            Self::Zstd => ".zst",
            Self::None => "",
        }
    }
}

/// The filters of an export, normalised: lists sorted and deduplicated,
/// times in UTC at microsecond precision. Field order is alphabetical, so
/// serialising this struct yields canonical JSON (no reliance on map order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Filters {
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub actions: BTreeSet<String>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub data_classification: BTreeSet<String>,
    /// Inclusive lower bound on the event time.
    #[serde(with = "micros")]
    pub from: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization_id: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub principal_ids: BTreeSet<String>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub status: BTreeSet<String>,
    /// A data subject (GDPR subject access, `gdpr.access`): only the events
    /// about them. Never set by an `export.audit` request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Subject>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_resource_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_resource_type: Option<String>,
    /// Exclusive upper bound on the event time.
    #[serde(with = "micros")]
    pub to: DateTime<Utc>,
}

/// The events about one data subject: those whose principalId or
/// targetResourceId is `id`, or whose `details` / `sessionContext` holds
/// `id` as a string at one of `paths` (`gdpr.subject_paths`, fixed when the
/// request is recorded, so a resumed job selects the same rows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subject {
    pub id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

/// Serialises times as RFC 3339 UTC with microseconds (PostgreSQL's precision).
mod micros {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Micros, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_time(&s).map_err(serde::de::Error::custom)
    }
}

/// A validated export request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    pub requester_id: String,
    pub filters: Filters,
    pub format: Format,
    pub compression: Compression,
    /// Whether events of subjects under a GDPR restriction are exported:
    /// only for requesters allowed to see them (the API's `gdpr`
    /// permission, the CLI's `--include-restricted`); never from the queue.
    pub include_restricted: bool,
}

/// The wire form of the request (camelCase, unknown keys refused).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WireRequest {
    export_filters: WireFilters,
    format: String,
    #[serde(default)]
    compression: Option<String>,
    /// Parquet only: "columns" (default) or "ocsf".
    #[serde(default)]
    parquet_schema: Option<String>,
    requester_id: String,
}

/// The wire form of the filters. `status` and `dataClassification` take one
/// value or a list; `actions` and `principalIds` take a list or one value.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WireFilters {
    from: String,
    to: String,
    #[serde(default)]
    actions: Option<OneOrMany>,
    #[serde(default)]
    principal_ids: Option<OneOrMany>,
    #[serde(default)]
    organization_id: Option<String>,
    #[serde(default)]
    status: Option<OneOrMany>,
    #[serde(default)]
    target_resource_type: Option<String>,
    #[serde(default)]
    target_resource_id: Option<String>,
    #[serde(default)]
    data_classification: Option<OneOrMany>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

fn reject(message: impl Into<String>) -> Rejection {
    Rejection::new(RejectReason::InvalidExportRequest, message)
}

/// Parses an RFC 3339 time, or a plain date (`2024-03-01`, midnight UTC).
pub fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        let t = t.with_timezone(&Utc);
        // PostgreSQL keeps microseconds: truncate so the filter and the
        // canonical form say exactly what the query does.
        return DateTime::from_timestamp_micros(t.timestamp_micros())
            .ok_or_else(|| format!("time {s:?} is out of range"));
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc());
    }
    Err(format!(
        "{s:?} is not a time: use RFC 3339 (2024-03-01T00:00:00Z) or a date (2024-03-01)"
    ))
}

impl ExportRequest {
    /// Parses and validates the JSON payload of an `export.audit` job.
    pub fn parse(data: &[u8]) -> Result<Self, Rejection> {
        let wire: WireRequest = serde_json::from_slice(data).map_err(|e| {
            reject(format!(
                "export request is not valid: {e} (expected {{\"exportFilters\": {{\"from\", \"to\", ...}}, \"format\", \"compression\", \"requesterId\"}})"
            ))
        })?;
        let mut format = match wire.format.as_str() {
            // A stored name, not a request one: parquetSchema says it.
            "parquet-ocsf" => Err(reject(
                "unknown format \"parquet-ocsf\": use \"format\": \"parquet\" with \"parquetSchema\": \"ocsf\"",
            )),
            f => Format::parse(f).map_err(reject),
        }?;
        match (wire.parquet_schema.as_deref(), format) {
            (None | Some("columns"), _) if format.is_parquet() => {}
            (Some("ocsf"), Format::Parquet) => format = Format::ParquetOcsf,
            (Some(other), Format::Parquet) => {
                return Err(reject(format!(
                    "unknown parquetSchema {other:?}: use \"columns\" (the export columns, the default) or \"ocsf\" (OCSF events)"
                )))
            }
            (Some(_), _) => {
                return Err(reject(format!(
                    "parquetSchema applies to format \"parquet\" only: remove it for format {:?}",
                    format.as_str()
                )))
            }
            (None, _) => {}
        }
        let compression = match (wire.compression.as_deref(), format.is_parquet()) {
            (None, false) => Compression::Gzip,
            // Parquet compresses its column pages itself (snappy); gzip or
            // zstd around the file would hide its footer from readers.
            (None | Some("none"), true) => Compression::None,
            (Some(c), true) => {
                Compression::parse(c).map_err(reject)?;
                return Err(reject(format!(
                    "compression {c:?} does not apply to format \"parquet\": Parquet compresses inside the file (snappy); leave compression out or set it to \"none\""
                )));
            }
            (Some(c), false) => Compression::parse(c).map_err(reject)?,
        };
        let requester_id = wire.requester_id.trim().to_owned();
        check_value("requesterId", &requester_id)?;
        let filters = wire.export_filters.normalise()?;
        Ok(Self {
            requester_id,
            filters,
            format,
            compression,
            include_restricted: false,
        })
    }

    /// Canonical JSON of what the export contains: filters, format and
    /// compression, keys in a fixed order. Two requests with the same
    /// canonical form produce the same file.
    pub fn canonical_json(&self) -> String {
        #[derive(Serialize)]
        struct Canonical<'a> {
            compression: &'a str,
            filters: &'a Filters,
            format: &'a str,
        }
        serde_json::to_string(&Canonical {
            compression: self.compression.as_str(),
            filters: &self.filters,
            format: self.format.as_str(),
        })
        .unwrap_or_default()
    }

    /// SHA-256 (hex) of [`ExportRequest::canonical_json`]: with the
    /// requester, the deduplication key of in-progress jobs.
    pub fn filter_hash(&self) -> String {
        hex::encode(Sha256::digest(self.canonical_json().as_bytes()))
    }

    /// The artifact's file name:
    /// `audit-export-<from>-<to>-<job id>.<extension>[.gz|.zst]`, with only
    /// `[A-Za-z0-9._-]` kept (anything else becomes `_`).
    pub fn file_name(&self, job_id: &str) -> String {
        let stamp = |t: &DateTime<Utc>| t.format("%Y%m%dT%H%M%SZ").to_string();
        sanitize_file_name(&format!(
            "audit-export-{}-{}-{}.{}{}",
            stamp(&self.filters.from),
            stamp(&self.filters.to),
            job_id,
            self.format.extension(),
            self.compression.suffix()
        ))
    }
}

/// Keeps `[A-Za-z0-9._-]`, replaces everything else with `_`, and never
/// returns a name that is empty or starts with a dot.
pub fn sanitize_file_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with('.') {
        out.insert(0, '_');
    }
    out
}

/// Refuses an empty, over-long or NUL-holding request value, naming `key`.
pub fn check_value(key: &str, v: &str) -> Result<(), Rejection> {
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

fn list(
    key: &str,
    values: Option<OneOrMany>,
    allowed: Option<&[&str]>,
) -> Result<BTreeSet<String>, Rejection> {
    let values = values.map(OneOrMany::into_vec).unwrap_or_default();
    if values.len() > MAX_LIST_VALUES {
        return Err(reject(format!(
            "{key} has more than {MAX_LIST_VALUES} values"
        )));
    }
    let mut set = BTreeSet::new();
    for v in values {
        check_value(key, &v)?;
        if let Some(allowed) = allowed {
            if !allowed.contains(&v.as_str()) {
                return Err(reject(format!(
                    "{key} value {v:?} is not one of {}",
                    allowed.join(", ")
                )));
            }
        }
        set.insert(v);
    }
    Ok(set)
}

fn single(key: &str, v: Option<String>) -> Result<Option<String>, Rejection> {
    match v {
        Some(v) => {
            check_value(key, &v)?;
            Ok(Some(v))
        }
        None => Ok(None),
    }
}

impl WireFilters {
    fn normalise(self) -> Result<Filters, Rejection> {
        let from =
            parse_time(&self.from).map_err(|e| reject(format!("exportFilters.from: {e}")))?;
        let to = parse_time(&self.to).map_err(|e| reject(format!("exportFilters.to: {e}")))?;
        if from >= to {
            return Err(reject(format!(
                "exportFilters.from ({}) must be before exportFilters.to ({}); the range is [from, to)",
                from.to_rfc3339_opts(SecondsFormat::Micros, true),
                to.to_rfc3339_opts(SecondsFormat::Micros, true)
            )));
        }
        Ok(Filters {
            actions: list("exportFilters.actions", self.actions, None)?,
            data_classification: list(
                "exportFilters.dataClassification",
                self.data_classification,
                Some(&["PUBLIC", "INTERNAL", "CONFIDENTIAL", "PHI"]),
            )?,
            from,
            organization_id: single("exportFilters.organizationId", self.organization_id)?,
            principal_ids: list("exportFilters.principalIds", self.principal_ids, None)?,
            status: list(
                "exportFilters.status",
                self.status,
                Some(&["attempt", "success", "failure"]),
            )?,
            subject: None,
            target_resource_id: single("exportFilters.targetResourceId", self.target_resource_id)?,
            target_resource_type: single(
                "exportFilters.targetResourceType",
                self.target_resource_type,
            )?,
            to,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: serde_json::Value) -> Result<ExportRequest, Rejection> {
        ExportRequest::parse(v.to_string().as_bytes())
    }

    fn base() -> serde_json::Value {
        json!({
            "exportFilters": {"from": "2024-03-01T00:00:00Z", "to": "2024-04-01"},
            "format": "csv",
            "requesterId": "officer-1"
        })
    }

    #[test]
    fn a_minimal_request_parses_with_gzip_by_default() {
        let r = parse(base()).unwrap();
        assert_eq!(r.format, Format::Csv);
        assert_eq!(r.compression, Compression::Gzip);
        assert_eq!(r.requester_id, "officer-1");
        assert_eq!(
            r.file_name("abc"),
            "audit-export-20240301T000000Z-20240401T000000Z-abc.csv.gz"
        );
    }

    #[test]
    fn the_canonical_form_ignores_key_order_list_order_and_duplicates() {
        let a = parse(json!({
            "requesterId": "u", "format": "ndjson", "compression": "zstd",
            "exportFilters": {"to": "2024-04-01T00:00:00Z", "from": "2024-03-01T01:00:00+01:00",
                              "actions": ["b", "a", "b"], "status": "success"}
        }))
        .unwrap();
        let b = parse(json!({
            "exportFilters": {"from": "2024-03-01T00:00:00.000Z", "status": ["success"],
                              "actions": ["a", "b"], "to": "2024-04-01"},
            "compression": "zstd", "format": "ndjson", "requesterId": "u"
        }))
        .unwrap();
        assert_eq!(a.canonical_json(), b.canonical_json());
        assert_eq!(a.filter_hash(), b.filter_hash());
        assert_eq!(
            a.canonical_json(),
            r#"{"compression":"zstd","filters":{"actions":["a","b"],"from":"2024-03-01T00:00:00.000000Z","status":["success"],"to":"2024-04-01T00:00:00.000000Z"},"format":"ndjson"}"#
        );
        let mut c = a.clone();
        c.format = Format::Csv;
        assert_ne!(a.filter_hash(), c.filter_hash());
    }

    #[test]
    fn invalid_requests_get_a_clear_reason_and_never_panic() {
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (
                json!({"exportFilters": {"from": "2024-03-01", "to": "2024-04-01"}, "format": "xml", "requesterId": "u"}),
                "unknown format \"xml\"",
            ),
            (
                json!({"exportFilters": {"from": "2024-03-01", "to": "2024-04-01"}, "format": "csv", "compression": "rar", "requesterId": "u"}),
                "unknown compression",
            ),
            (
                json!({"exportFilters": {"from": "2024-05-01", "to": "2024-04-01"}, "format": "csv", "requesterId": "u"}),
                "must be before",
            ),
            (
                json!({"exportFilters": {"from": "2024-03-01", "to": "2024-04-01", "colour": "red"}, "format": "csv", "requesterId": "u"}),
                "unknown field `colour`",
            ),
            (
                json!({"exportFilters": {"from": "yesterday", "to": "2024-04-01"}, "format": "csv", "requesterId": "u"}),
                "exportFilters.from",
            ),
            (
                json!({"exportFilters": {"from": "2024-03-01", "to": "2024-04-01", "status": "maybe"}, "format": "csv", "requesterId": "u"}),
                "exportFilters.status",
            ),
            (
                json!({"exportFilters": {"from": "2024-03-01", "to": "2024-04-01"}, "format": "csv", "requesterId": ""}),
                "requesterId must not be empty",
            ),
            (
                json!({"exportFilters": {"from": "2024-03-01"}, "format": "csv", "requesterId": "u"}),
                "missing field `to`",
            ),
            (json!([1, 2]), "export request is not valid"),
        ];
        for (payload, expected) in cases {
            let e = parse(payload.clone()).unwrap_err();
            assert_eq!(e.reason, RejectReason::InvalidExportRequest);
            assert!(e.message.contains(expected), "{payload}: {}", e.message);
        }
        assert!(ExportRequest::parse(b"\xff\xfe").is_err());
    }

    #[test]
    fn parquet_takes_a_schema_and_refuses_outer_compression() {
        let with = |extra: serde_json::Value| {
            let mut v = base();
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            parse(v)
        };
        let p = with(json!({"format": "parquet"})).unwrap();
        assert_eq!(
            (p.format, p.compression),
            (Format::Parquet, Compression::None)
        );
        assert_eq!(
            p.file_name("abc"),
            "audit-export-20240301T000000Z-20240401T000000Z-abc.parquet"
        );
        let p =
            with(json!({"format": "parquet", "parquetSchema": "columns", "compression": "none"}))
                .unwrap();
        assert_eq!(p.format, Format::Parquet);
        let o = with(json!({"format": "parquet", "parquetSchema": "ocsf"})).unwrap();
        assert_eq!(o.format, Format::ParquetOcsf);
        assert_eq!(o.format.as_str(), "parquet-ocsf");
        assert_ne!(o.filter_hash(), p.filter_hash());
        assert_eq!(Format::parse("parquet-ocsf"), Ok(Format::ParquetOcsf));
        let n = with(json!({"format": "ocsf"})).unwrap();
        assert_eq!((n.format, n.compression), (Format::Ocsf, Compression::Gzip));
        assert!(n.file_name("abc").ends_with("-abc.ocsf.ndjson.gz"));
        for (extra, needle) in [
            (
                json!({"format": "parquet", "compression": "gzip"}),
                "does not apply to format \"parquet\"",
            ),
            (
                json!({"format": "parquet", "compression": "zstd"}),
                "set it to \"none\"",
            ),
            (
                json!({"format": "parquet", "compression": "rar"}),
                "unknown compression",
            ),
            (
                json!({"format": "parquet", "parquetSchema": "nested"}),
                "unknown parquetSchema",
            ),
            (
                json!({"format": "csv", "parquetSchema": "ocsf"}),
                "applies to format \"parquet\" only",
            ),
            (
                json!({"format": "parquet-ocsf"}),
                "\"parquetSchema\": \"ocsf\"",
            ),
        ] {
            let e = with(extra.clone()).unwrap_err();
            assert!(e.message.contains(needle), "{extra}: {}", e.message);
        }
    }

    #[test]
    fn file_names_keep_only_safe_characters() {
        assert_eq!(sanitize_file_name("../../etc/passwd"), "_.._.._etc_passwd");
        assert_eq!(sanitize_file_name(".hidden"), "_.hidden");
        assert_eq!(sanitize_file_name("a b\u{e9}:c"), "a_b__c");
    }
}
