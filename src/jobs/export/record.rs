//! The export_jobs table: recording requests, leasing jobs, checkpoints.
//!
//! Every state change after the claim is one UPDATE guarded by the lease
//! (`leased_by` = this attempt's token, status still in progress): a worker
//! that lost its lease (paused too long, another replica took over) finds
//! zero rows updated and stops, so two workers can never both advance a job.

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;

use super::query::Key;
use super::request::{Compression, ExportRequest, Filters, Format};

/// Statuses in which a job still has work to do.
pub const IN_PROGRESS: [&str; 3] = ["queued", "exporting", "uploading"];

/// Where a job was created, which decides who runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// From a queue message or `enqueue export`: run by worker executors.
    Queue,
    /// From `audit-worker export`: run by that process only.
    Cli,
}

impl Origin {
    fn as_str(self) -> &'static str {
        match self {
            Self::Queue => "queue",
            Self::Cli => "cli",
        }
    }
}

/// The answer to a request: the job and whether this request created it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub id: String,
    pub status: String,
    pub created: bool,
}

/// The deduplication hash of a request recorded with an organisation
/// scope: the request's filter hash when it may cover every organisation
/// (as before scopes existed), else that hash bound to the sorted scope, so
/// the same filters under a different scope are a different export.
pub fn scoped_filter_hash(request: &ExportRequest, allowed: Option<&[String]>) -> String {
    use sha2::{Digest, Sha256};
    let hash = request.filter_hash();
    match allowed {
        None => hash,
        Some(orgs) => {
            let mut orgs = orgs.to_vec();
            orgs.sort();
            orgs.dedup();
            let scope = serde_json::to_string(&orgs).unwrap_or_default();
            hex::encode(Sha256::digest(
                format!("{hash}|organizations:{scope}").as_bytes(),
            ))
        }
    }
}

/// Records a request, idempotently: the same `source` returns its job, and
/// an identical in-progress request (same requester and filter hash)
/// returns the existing job instead of creating another. The decision is
/// made by the database's unique indexes, so concurrent requests race safely.
///
/// `allowed` is the organisation scope stored with the job (`None`: all):
/// the executor never exports a row of an organisation outside it.
pub async fn record_request(
    client: &impl GenericClient,
    request: &ExportRequest,
    source: &str,
    origin: Origin,
    allowed: Option<&[String]>,
    layout: impl Fn(&str) -> (String, String),
) -> Result<Recorded, tokio_postgres::Error> {
    let filters = serde_json::to_value(&request.filters).unwrap_or_default();
    let hash = scoped_filter_hash(request, allowed);
    let allowed: Option<Vec<String>> = allowed.map(|a| {
        let mut a = a.to_vec();
        a.sort();
        a.dedup();
        a
    });
    // A completed job may vacate the in-progress slot between the INSERT
    // and the SELECTs below; then inserting again succeeds. After a few
    // rounds the last INSERT goes without ON CONFLICT, so whatever keeps
    // conflicting surfaces as the database's own error instead of a loop.
    let mut round = 0;
    loop {
        round += 1;
        let id = uuid::Uuid::new_v4().to_string();
        let (parts_prefix, artifact_key) = layout(&id);
        let on_conflict = if round <= 5 {
            "ON CONFLICT DO NOTHING"
        } else {
            ""
        };
        let inserted = client
            .query_opt(
                &format!(
                    "INSERT INTO export_jobs (id, source, origin, requester_id, filters, filter_hash, \
                     format, compression, parts_prefix, artifact_key, allowed_organizations, \
                     include_restricted) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) {on_conflict} RETURNING status"
                ),
                &[
                    &id,
                    &source,
                    &origin.as_str(),
                    &request.requester_id,
                    &filters,
                    &hash,
                    &request.format.as_str(),
                    &request.compression.as_str(),
                    &parts_prefix,
                    &artifact_key,
                    &allowed,
                    &request.include_restricted,
                ],
            )
            .await?;
        if let Some(row) = inserted {
            return Ok(Recorded {
                id,
                status: row.get(0),
                created: true,
            });
        }
        if let Some(row) = client
            .query_opt(
                "SELECT id, status FROM export_jobs WHERE source = $1",
                &[&source],
            )
            .await?
        {
            return Ok(Recorded {
                id: row.get(0),
                status: row.get(1),
                created: false,
            });
        }
        if let Some(row) = client
            .query_opt(
                "SELECT id, status FROM export_jobs WHERE requester_id = $1 AND filter_hash = $2 \
                 AND status = ANY($3)",
                &[&request.requester_id, &hash, &&IN_PROGRESS[..]],
            )
            .await?
        {
            return Ok(Recorded {
                id: row.get(0),
                status: row.get(1),
                created: false,
            });
        }
    }
}

/// A job as the executor sees it.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub requester_id: String,
    pub filters: Filters,
    pub filters_json: serde_json::Value,
    pub format: Format,
    pub compression: Compression,
    pub status: String,
    pub cutoff: DateTime<Utc>,
    /// The database snapshot taken when the job was recorded (text form of
    /// a `pg_snapshot`): the export holds exactly the rows it sees as
    /// committed. `None` for jobs recorded before snapshots were kept.
    pub cutoff_snapshot: Option<String>,
    pub parts_prefix: String,
    pub artifact_key: String,
    pub attempts: i32,
    pub parts_done: i32,
    pub rows_done: i64,
    pub last_key: Option<Key>,
    pub row_count: Option<i64>,
    pub size_bytes: Option<i64>,
    pub sha256: Option<String>,
    pub completed_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    /// This attempt's lease token (`leased_by`).
    pub lease: String,
    /// The identity of the request that created the job (`stream:...`,
    /// `bullmq:...`, `cli:...`, `api:...`).
    pub source: String,
    /// The organisations the export may contain (`None`: all): added to
    /// the query whatever the filters say.
    pub allowed_organizations: Option<Vec<String>>,
    /// Whether events of restricted subjects are included (see
    /// [`crate::jobs::gdpr::restriction`]).
    pub include_restricted: bool,
}

/// The columns [`Job::from_row`] reads.
const JOB_COLUMNS: &str = "id, requester_id, filters, format, compression, status, cutoff, \
    parts_prefix, artifact_key, attempts, parts_done, rows_done, last_event_time, last_id, \
    row_count, size_bytes, sha256, completed_at, expires_at, leased_by, source, cutoff_snapshot::text, \
    allowed_organizations, include_restricted";

impl Job {
    fn from_row(row: &tokio_postgres::Row) -> Result<Self, String> {
        let filters_json: serde_json::Value = row.get(2);
        let filters: Filters = serde_json::from_value(filters_json.clone())
            .map_err(|e| format!("stored filters unreadable: {e}"))?;
        let last_key = match (row.get(12), row.get(13)) {
            (Some(event_time), Some(id)) => Some(Key { event_time, id }),
            _ => None,
        };
        Ok(Self {
            id: row.get(0),
            requester_id: row.get(1),
            filters,
            filters_json,
            format: Format::parse(row.get(3))?,
            compression: Compression::parse(row.get(4))?,
            status: row.get(5),
            cutoff: row.get(6),
            parts_prefix: row.get(7),
            artifact_key: row.get(8),
            attempts: row.get(9),
            parts_done: row.get(10),
            rows_done: row.get(11),
            last_key,
            row_count: row.get(14),
            size_bytes: row.get(15),
            sha256: row.get(16),
            completed_at: row.get(17),
            expires_at: row.get(18),
            lease: row.get::<_, Option<String>>(19).unwrap_or_default(),
            source: row.get(20),
            cutoff_snapshot: row.get(21),
            allowed_organizations: row.get(22),
            include_restricted: row.get(23),
        })
    }
}

/// Why a claim returned a row that cannot be run.
#[derive(Debug)]
pub enum ClaimError {
    Db(tokio_postgres::Error),
    /// The row is unreadable (filters or format the code no longer knows).
    Corrupt {
        id: String,
        why: String,
    },
}

impl From<tokio_postgres::Error> for ClaimError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Db(e)
    }
}

/// Leases the oldest claimable queue job: in progress (or completed but not
/// yet notified) with no live lease. `FOR UPDATE SKIP LOCKED` lets replicas
/// claim concurrently without waiting on each other.
pub async fn claim_next(
    client: &impl GenericClient,
    token: &str,
    lease_secs: u64,
) -> Result<Option<Job>, ClaimError> {
    let sql = format!(
        "UPDATE export_jobs j SET leased_by = $1, \
           lease_expires_at = now() + make_interval(secs => $2), \
           attempts = attempts + CASE WHEN status = 'completed' THEN 0 ELSE 1 END, \
           status = CASE WHEN status = 'queued' THEN 'exporting' ELSE status END, \
           started_at = coalesce(started_at, now()) \
         WHERE id = (SELECT id FROM export_jobs \
             WHERE origin = 'queue' \
               AND (status IN ('queued', 'exporting', 'uploading') \
                    OR (status = 'completed' AND notified_at IS NULL)) \
               AND (lease_expires_at IS NULL OR lease_expires_at < now()) \
             ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED) \
         RETURNING {}",
        JOB_COLUMNS
            .split(", ")
            .map(|c| format!("j.{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let row = client
        .query_opt(&sql, &[&token, &(lease_secs as f64)])
        .await?;
    match row {
        None => Ok(None),
        Some(row) => Job::from_row(&row)
            .map(Some)
            .map_err(|why| ClaimError::Corrupt {
                id: row.get(0),
                why,
            }),
    }
}

/// Leases one given job (the CLI runs the job it just created).
pub async fn claim_job(
    client: &impl GenericClient,
    id: &str,
    token: &str,
    lease_secs: u64,
) -> Result<Option<Job>, ClaimError> {
    let sql = format!(
        "UPDATE export_jobs SET leased_by = $2, lease_expires_at = now() + make_interval(secs => $3), \
           attempts = attempts + 1, \
           status = CASE WHEN status = 'queued' THEN 'exporting' ELSE status END, \
           started_at = coalesce(started_at, now()) \
         WHERE id = $1 AND status IN ('queued', 'exporting', 'uploading') \
           AND (lease_expires_at IS NULL OR lease_expires_at < now()) \
         RETURNING {JOB_COLUMNS}"
    );
    let row = client
        .query_opt(&sql, &[&id, &token, &(lease_secs as f64)])
        .await?;
    match row {
        None => Ok(None),
        Some(row) => Job::from_row(&row)
            .map(Some)
            .map_err(|why| ClaimError::Corrupt {
                id: id.to_owned(),
                why,
            }),
    }
}

/// The lease guard shared by every UPDATE below.
const GUARD: &str = "id = $1 AND leased_by = $2";

/// Extends the lease; `false` when it was lost.
pub async fn renew(
    client: &impl GenericClient,
    job: &Job,
    lease_secs: u64,
) -> Result<bool, tokio_postgres::Error> {
    let n = client
        .execute(
            &format!(
                "UPDATE export_jobs SET lease_expires_at = now() + make_interval(secs => $3) \
                 WHERE {GUARD} AND (status IN ('queued', 'exporting', 'uploading') \
                   OR (status = 'completed' AND notified_at IS NULL))"
            ),
            &[&job.id, &job.lease, &(lease_secs as f64)],
        )
        .await?;
    Ok(n == 1)
}

/// Records that parts 1..=`parts_done` are durable and hold `rows_done`
/// rows ending at `last`; `false` when the lease was lost.
pub async fn checkpoint(
    client: &impl GenericClient,
    job: &Job,
    parts_done: i32,
    rows_done: i64,
    last: Key,
) -> Result<bool, tokio_postgres::Error> {
    let n = client
        .execute(
            &format!(
                "UPDATE export_jobs SET parts_done = $3, rows_done = $4, last_event_time = $5, \
                 last_id = $6 WHERE {GUARD} AND status = 'exporting'"
            ),
            &[
                &job.id,
                &job.lease,
                &parts_done,
                &rows_done,
                &last.event_time,
                &last.id,
            ],
        )
        .await?;
    Ok(n == 1)
}

/// Every row is in a part: move on to composing the artifact.
pub async fn mark_uploading(
    client: &impl GenericClient,
    job: &Job,
) -> Result<bool, tokio_postgres::Error> {
    let n = client
        .execute(
            &format!(
                "UPDATE export_jobs SET status = 'uploading' WHERE {GUARD} AND status = 'exporting'"
            ),
            &[&job.id, &job.lease],
        )
        .await?;
    Ok(n == 1)
}

/// The artifact is written: record its size, digest and row count; the
/// download window starts now. Returns the completion time, or `None` when
/// the lease was lost.
pub async fn complete(
    client: &impl GenericClient,
    job: &Job,
    size: i64,
    sha256: &str,
    download_expiry_secs: u64,
) -> Result<Option<(DateTime<Utc>, DateTime<Utc>)>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            &format!(
                "UPDATE export_jobs SET status = 'completed', row_count = rows_done, size_bytes = $3, \
                 sha256 = $4, completed_at = date_trunc('milliseconds', now()), \
                 expires_at = date_trunc('milliseconds', now()) + make_interval(secs => $5) \
                 WHERE {GUARD} AND status = 'uploading' RETURNING completed_at, expires_at"
            ),
            &[
                &job.id,
                &job.lease,
                &size,
                &sha256,
                &(download_expiry_secs as f64),
            ],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// The requester was told (and the export audited): the job is done.
pub async fn mark_notified(
    client: &impl GenericClient,
    job: &Job,
) -> Result<bool, tokio_postgres::Error> {
    let n = client
        .execute(
            &format!(
                "UPDATE export_jobs SET notified_at = now(), parts_removed_at = now(), \
                 leased_by = NULL, lease_expires_at = NULL WHERE {GUARD} AND status = 'completed'"
            ),
            &[&job.id, &job.lease],
        )
        .await?;
    Ok(n == 1)
}

/// An attempt failed for a reason that may pass (storage or database
/// trouble): keep the checkpoint, let the job be claimed again after
/// `retry_delay_secs`.
pub async fn release_for_retry(
    client: &impl GenericClient,
    job: &Job,
    error: &str,
    retry_delay_secs: u64,
) -> Result<bool, tokio_postgres::Error> {
    let n = client
        .execute(
            &format!(
                "UPDATE export_jobs SET last_error = $3, \
                 lease_expires_at = now() + make_interval(secs => $4) WHERE {GUARD}"
            ),
            &[&job.id, &job.lease, &error, &(retry_delay_secs as f64)],
        )
        .await?;
    Ok(n == 1)
}

/// Gives the lease back at once (graceful shutdown): the next start, or
/// another replica, resumes the job without waiting for the lease to expire.
pub async fn release(client: &impl GenericClient, job: &Job) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            &format!(
                "UPDATE export_jobs SET lease_expires_at = NULL, leased_by = NULL WHERE {GUARD}"
            ),
            &[&job.id, &job.lease],
        )
        .await?;
    Ok(())
}

/// Gives up on a job: status `failed` with the reason. `false` when the
/// lease was lost (someone else decides the job's fate).
pub async fn fail(
    client: &impl GenericClient,
    id: &str,
    lease: &str,
    error: &str,
) -> Result<bool, tokio_postgres::Error> {
    let n = client
        .execute(
            &format!(
                "UPDATE export_jobs SET status = 'failed', last_error = $3, completed_at = now(), \
                 leased_by = NULL, lease_expires_at = NULL \
                 WHERE {GUARD} AND status IN ('queued', 'exporting', 'uploading')"
            ),
            &[&id, &lease, &error],
        )
        .await?;
    Ok(n == 1)
}

/// What the download endpoint and `export-link` need to know about a job.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub status: String,
    pub artifact_key: String,
    pub format: Format,
    pub compression: Compression,
    pub size_bytes: Option<i64>,
    pub expires_at: Option<DateTime<Utc>>,
    pub removed: bool,
}

/// Looks up a queue job's artifact by job id (`None`: no such job).
pub async fn artifact(
    client: &impl GenericClient,
    id: &str,
) -> Result<Option<Artifact>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT status, artifact_key, format, compression, size_bytes, expires_at, \
             artifact_removed_at IS NOT NULL FROM export_jobs WHERE id = $1 AND origin = 'queue'",
            &[&id],
        )
        .await?;
    Ok(row.and_then(|r| {
        Some(Artifact {
            status: r.get(0),
            artifact_key: r.get(1),
            format: Format::parse(r.get(2)).ok()?,
            compression: Compression::parse(r.get(3)).ok()?,
            size_bytes: r.get(4),
            expires_at: r.get(5),
            removed: r.get(6),
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_changes_the_dedup_hash_and_no_scope_keeps_the_old_one() {
        let r = ExportRequest::parse(
            br#"{"exportFilters": {"from": "2024-03-01", "to": "2024-04-01"}, "format": "csv", "requesterId": "u"}"#,
        )
        .unwrap();
        assert_eq!(scoped_filter_hash(&r, None), r.filter_hash());
        let ab = scoped_filter_hash(&r, Some(&["b".into(), "a".into(), "a".into()]));
        assert_eq!(ab, scoped_filter_hash(&r, Some(&["a".into(), "b".into()])));
        assert_ne!(ab, r.filter_hash());
        assert_ne!(ab, scoped_filter_hash(&r, Some(&["a".into()])));
    }
}
