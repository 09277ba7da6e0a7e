//! Subject access (`gdpr.access`, GDPR Art. 15): every stored event about
//! a principal or resource, in the export formats, with each event's
//! inclusion proof.
//!
//! A request becomes an export job (`export_jobs`) whose filters carry a
//! [`Subject`]: rows whose principalId or targetResourceId is the subject's
//! id, or whose `details` / `sessionContext` holds it at a path of
//! `gdpr.subject_paths`. The export executor runs it like any export
//! (resumable, byte-identical, scoped to the requester's organisations,
//! signed links, manifest, notifications); when the artifact is composed,
//! [`write_proofs`] writes `<artifact>.proofs.ndjson` beside it: one
//! inclusion proof per sealed event (the form of `audit-worker prove`,
//! answered from the tiles in O(log n) each) against the latest signed
//! checkpoint, and the manifest lists the events not sealed yet.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use object_store::path::Path;
use object_store::{ObjectStoreExt, WriteMultipart};
use serde::Deserialize;

use crate::dlq::{RejectReason, Rejection};
use crate::jobs::export::executor::ExportError;
use crate::jobs::export::query::{Key, PageQuery};
use crate::jobs::export::record::Job;
use crate::jobs::export::request::{check_value, ExportRequest, Subject};
use crate::jobs::export::ExportHandler;
use crate::jobs::snapshot::SnapshotError;
use crate::jobs::verify::{self, LatestCheckpoint};
use crate::jobs::{JobError, JobHandler};
use crate::storage::Storage;

/// The earliest and latest event times a request without `from` / `to`
/// covers: every stored event.
const ALL_FROM: &str = "1970-01-01T00:00:00Z";
const ALL_TO: &str = "9999-12-31T00:00:00Z";

/// The wire form of a `gdpr.access` request.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WireAccessRequest {
    subject_id: String,
    requester_id: String,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    compression: Option<String>,
    #[serde(default)]
    parquet_schema: Option<String>,
    #[serde(default)]
    organization_id: Option<String>,
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    to: Option<String>,
}

fn reject(message: impl Into<String>) -> Rejection {
    Rejection::new(RejectReason::InvalidAccessRequest, message)
}

/// Parses a `gdpr.access` request into the export it runs: `{"subjectId",
/// "requesterId", "format"? (default "ndjson"), "compression"?,
/// "parquetSchema"?, "organizationId"?, "from"?, "to"?}` (without `from` /
/// `to`: every stored event). `paths` are the configured subject paths,
/// fixed in the job.
pub fn parse_request(data: &[u8], paths: &[String]) -> Result<ExportRequest, Rejection> {
    let wire: WireAccessRequest = serde_json::from_slice(data).map_err(|e| {
        reject(format!(
            "subject access request is not valid: {e} (expected {{\"subjectId\", \"requesterId\", \"format\"?, \"compression\"?, \"organizationId\"?, \"from\"?, \"to\"?}})"
        ))
    })?;
    let subject_id = wire.subject_id.trim().to_owned();
    check_value("subjectId", &subject_id).map_err(|r| reject(r.message))?;
    let mut filters = serde_json::json!({
        "from": wire.from.as_deref().unwrap_or(ALL_FROM),
        "to": wire.to.as_deref().unwrap_or(ALL_TO),
    });
    if let Some(org) = wire.organization_id {
        filters["organizationId"] = org.into();
    }
    let mut export = serde_json::json!({
        "exportFilters": filters,
        "format": wire.format.as_deref().unwrap_or("ndjson"),
        "requesterId": wire.requester_id,
    });
    if let Some(c) = wire.compression {
        export["compression"] = c.into();
    }
    if let Some(p) = wire.parquet_schema {
        export["parquetSchema"] = p.into();
    }
    let mut request = ExportRequest::parse(export.to_string().as_bytes())
        // The export's messages name its own keys: say the request's.
        .map_err(|r| reject(r.message.replace("exportFilters.", "")))?;
    request.filters.subject = Some(Subject {
        id: subject_id,
        paths: paths.to_vec(),
    });
    Ok(request)
}

/// Accepts `gdpr.access` requests from the queue: validates them and
/// records the export job through the export handler (deduplicated like
/// exports, within `export.queue_organizations`).
pub struct AccessHandler {
    exports: Arc<ExportHandler>,
    subject_paths: Vec<String>,
}

impl AccessHandler {
    /// A handler recording through `exports`, fixing `subject_paths`
    /// (`gdpr.subject_paths`) into each job.
    pub fn new(exports: Arc<ExportHandler>, subject_paths: Vec<String>) -> Self {
        Self {
            exports,
            subject_paths,
        }
    }

    async fn record(&self, data: &[u8], source: &str) -> Result<serde_json::Value, JobError> {
        let request = parse_request(data, &self.subject_paths).map_err(JobError::Rejected)?;
        self.exports
            .record_queue_request(&request, source, |m| {
                reject(m.replace("exportFilters.", ""))
            })
            .await
    }
}

impl JobHandler for AccessHandler {
    fn accept<'a>(
        &'a self,
        data: &'a [u8],
        source: &'a str,
    ) -> BoxFuture<'a, Result<serde_json::Value, JobError>> {
        Box::pin(self.record(data, source))
    }
}

/// The object key of a subject access artifact's proofs.
pub fn proofs_path(artifact_key: &str) -> Path {
    Path::from(format!("{artifact_key}.proofs.ndjson"))
}

/// What [`write_proofs`] wrote, for the manifest.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProofsSummary {
    /// File name of the proofs (beside the artifact).
    pub file: String,
    /// Proofs written: one per sealed event of the artifact.
    pub proofs: u64,
    pub sha256: String,
    /// The tree size and note of the checkpoint every proof is against
    /// (`None` before the first snapshot: no event is sealed yet).
    pub checkpoint_tree_size: Option<u64>,
    pub checkpoint: Option<String>,
    /// Events of the artifact not sealed into the log yet (no proof yet:
    /// ask again after the next snapshot).
    pub not_yet_sealed: Vec<UnsealedEvent>,
}

/// An exported event without a proof yet.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UnsealedEvent {
    pub event: String,
    pub event_time: DateTime<Utc>,
}

/// Writes the inclusion proof of every sealed event of `job` (the rows its
/// own query selects, so exactly the artifact's) to
/// [`proofs_path`], one JSON proof per line, against the latest
/// checkpoint. Rows are read in the export's keyset pages; each proof reads
/// O(log n) tiles; the file is streamed to the object store.
pub async fn write_proofs(
    pool: &deadpool_postgres::Pool,
    storage: &Storage,
    job: &Job,
    page_rows: u32,
) -> Result<ProofsSummary, ExportError> {
    use sha2::{Digest, Sha256};
    let proof_error = |e: SnapshotError| match e {
        SnapshotError::Db(e) => ExportError::from(e),
        other => ExportError::Proof(other.to_string()),
    };
    let mut client = pool.get().await?;
    let query = PageQuery::new(
        &job.filters,
        job.cutoff,
        job.cutoff_snapshot.as_deref(),
        job.allowed_organizations.as_deref(),
        // The subject's own events, restricted or not (access is not
        // processing).
        true,
    );
    let statement = client.prepare(&query.sql).await?;
    // (event_time, id, idempotency key) of every row, in artifact order;
    // only keys are kept, so memory is small even for many events.
    let mut rows: Vec<(DateTime<Utc>, i64, String)> = Vec::new();
    let mut after = PageQuery::start_key(&job.filters);
    loop {
        let page = query
            .page(&client, &statement, after, i64::from(page_rows.max(1)))
            .await?;
        let Some(last) = page.last() else { break };
        after = Key {
            event_time: last.get(1),
            id: last.get(0),
        };
        let n = page.len();
        rows.extend(page.iter().map(|r| {
            (
                r.get::<_, DateTime<Utc>>(1),
                r.get::<_, i64>(0),
                r.get::<_, String>(23),
            )
        }));
        if n < page_rows.max(1) as usize {
            break;
        }
    }
    let transaction = crate::db::read_only_snapshot(&mut client).await?;
    let tx = &transaction;
    let latest: Option<LatestCheckpoint> = verify::latest_checkpoint(tx).await?;
    let path = proofs_path(&job.artifact_key);
    let upload = storage.store.put_multipart(&path).await?;
    let mut out = WriteMultipart::new(upload);
    let mut sha = Sha256::new();
    let mut proofs = 0u64;
    let mut not_yet_sealed = Vec::new();
    for (event_time, id, key) in rows {
        let proof = match &latest {
            Some(latest) => verify::prove_row(tx, event_time, id, latest, 10_000)
                .await
                .map_err(proof_error)?,
            None => None,
        };
        match proof {
            Some(p) => {
                let mut line =
                    serde_json::to_vec(&p).map_err(|e| ExportError::Proof(e.to_string()))?;
                line.push(b'\n');
                sha.update(&line);
                out.write(&line);
                proofs += 1;
            }
            None => not_yet_sealed.push(UnsealedEvent {
                event: key,
                event_time,
            }),
        }
    }
    transaction.commit().await?;
    out.finish().await?;
    Ok(ProofsSummary {
        file: path.filename().unwrap_or_default().to_owned(),
        proofs,
        sha256: hex::encode(sha.finalize()),
        checkpoint_tree_size: latest.as_ref().map(|l| l.size),
        checkpoint: latest.map(|l| l.note),
        not_yet_sealed,
    })
}

/// `audit-worker gdpr access` options: the queue request's fields.
#[derive(clap::Args, Debug, Clone)]
pub struct AccessArgs {
    /// The data subject: a principal or resource id.
    #[arg(long)]
    pub subject: String,
    /// csv, ndjson (default), json, ocsf or parquet.
    #[arg(long, default_value = "ndjson")]
    pub format: String,
    /// gzip, zstd or none (default: gzip; parquet: none).
    #[arg(long)]
    pub compression: Option<String>,
    /// Only this organisation's events.
    #[arg(long)]
    pub organization: Option<String>,
    /// Start of the time range (inclusive; default: every stored event).
    #[arg(long)]
    pub from: Option<String>,
    /// End of the time range (exclusive).
    #[arg(long)]
    pub to: Option<String>,
    /// Who asks (default: cli:<login name>).
    #[arg(long)]
    pub requester: Option<String>,
}

impl AccessArgs {
    /// The request, validated exactly as a queue payload would be.
    pub fn to_request(&self, paths: &[String]) -> anyhow::Result<ExportRequest> {
        let requester = self.requester.clone().unwrap_or_else(|| {
            format!(
                "cli:{}",
                std::env::var("USER").unwrap_or_else(|_| "unknown".into())
            )
        });
        let mut payload = serde_json::json!({
            "subjectId": self.subject,
            "requesterId": requester,
            "format": self.format,
        });
        for (k, v) in [
            ("compression", &self.compression),
            ("organizationId", &self.organization),
            ("from", &self.from),
            ("to", &self.to),
        ] {
            if let Some(v) = v {
                payload[k] = v.clone().into();
            }
        }
        parse_request(payload.to_string().as_bytes(), paths)
            .map_err(|r| anyhow::anyhow!("{}: fix the options and run again", r.message))
    }
}

/// `audit-worker gdpr access --subject ID --out DIR`: runs a subject access
/// export in this process and writes the artifact, its manifest and its
/// proofs into `DIR`.
pub async fn run_cli(
    config: &crate::config::Config,
    args: &AccessArgs,
    out: &std::path::PathBuf,
) -> anyhow::Result<()> {
    let request = args.to_request(&config.gdpr.subject_paths)?;
    crate::jobs::export::cli::run_request(config, &request, out).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::export::request::Format;

    #[test]
    fn a_minimal_request_covers_every_event_of_the_subject_as_ndjson() {
        let r = parse_request(
            br#"{"subjectId": " u-7 ", "requesterId": "dpo"}"#,
            &["details.patientId".into()],
        )
        .unwrap();
        assert_eq!(r.format, Format::Ndjson);
        assert_eq!(r.requester_id, "dpo");
        assert_eq!(
            r.filters.subject,
            Some(Subject {
                id: "u-7".into(),
                paths: vec!["details.patientId".into()]
            })
        );
        assert_eq!(r.filters.from.to_rfc3339(), "1970-01-01T00:00:00+00:00");
        assert!(r.canonical_json().contains("\"subject\":{\"id\":\"u-7\""));
    }

    #[test]
    fn bad_requests_are_refused_with_the_access_reason_and_the_key_named() {
        for (body, says) in [
            (r#"{"requesterId": "dpo"}"#, "subjectId"),
            (
                r#"{"subjectId": "", "requesterId": "dpo"}"#,
                "subjectId must not be empty",
            ),
            (
                r#"{"subjectId": "u", "requesterId": "dpo", "format": "xml"}"#,
                "xml",
            ),
            (
                r#"{"subjectId": "u", "requesterId": "dpo", "from": "2024-02-01", "to": "2024-01-01"}"#,
                "from (",
            ),
            (
                r#"{"subjectId": "u", "requesterId": "dpo", "exportFilters": {}}"#,
                "exportFilters",
            ),
        ] {
            let e = parse_request(body.as_bytes(), &[]).unwrap_err();
            assert_eq!(e.reason, RejectReason::InvalidAccessRequest, "{body}");
            assert!(e.message.contains(says), "{body}: {}", e.message);
        }
    }
}
