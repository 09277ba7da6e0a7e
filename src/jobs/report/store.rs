//! The report_jobs table: recording requests (deduplicated), leasing jobs
//! to executors, and recording results.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;

use super::request::{OutputFormat, ReportKind, ReportRequest};

/// Who runs a job: the workers' executors, or the CLI that created it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Queue,
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

/// The outcome of recording a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub id: String,
    pub status: String,
    /// False when the request was already recorded (same message, or an
    /// identical request of the same requester still in progress).
    pub created: bool,
}

/// Records a request as a job, or finds the job it already is: the same
/// `source` (a redelivered message), or an identical request by the same
/// requester still in progress. The database decides races (unique
/// indexes), not a check-then-insert.
pub async fn record_request(
    client: &impl GenericClient,
    request: &ReportRequest,
    source: &str,
    origin: Origin,
    prefix: &str,
) -> Result<Created, tokio_postgres::Error> {
    let hash = request.request_hash();
    let formats: Vec<&str> = request.formats.iter().map(|f| f.as_str()).collect();
    let allowed: Option<Vec<String>> = request
        .allowed_orgs
        .as_ref()
        .map(|s| s.iter().cloned().collect());
    for round in 1.. {
        let id = uuid::Uuid::new_v4().to_string();
        let on_conflict = if round <= 5 {
            "ON CONFLICT DO NOTHING"
        } else {
            ""
        };
        let inserted = client
            .query_opt(
                &format!(
                    "INSERT INTO report_jobs (id, source, origin, kind, requester_id, organization_id, \
                     allowed_orgs, period_from, period_to, formats, request, request_hash, artifact_prefix) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) {on_conflict} RETURNING status"
                ),
                &[
                    &id,
                    &source,
                    &origin.as_str(),
                    &request.kind.as_str(),
                    &request.requester_id,
                    &request.organization_id,
                    &allowed,
                    &request.from,
                    &request.to,
                    &formats,
                    &request.canonical_json(),
                    &hash,
                    &match prefix.trim_end_matches('/') {
                        "" => id.clone(),
                        p => format!("{p}/{id}"),
                    },
                ],
            )
            .await?;
        if let Some(row) = inserted {
            return Ok(Created {
                id,
                status: row.get(0),
                created: true,
            });
        }
        if let Some(row) = client
            .query_opt(
                "SELECT id, status FROM report_jobs WHERE source = $1",
                &[&source],
            )
            .await?
        {
            return Ok(Created {
                id: row.get(0),
                status: row.get(1),
                created: false,
            });
        }
        if let Some(row) = client
            .query_opt(
                "SELECT id, status FROM report_jobs WHERE requester_id = $1 AND request_hash = $2 \
                 AND status IN ('queued', 'running')",
                &[&request.requester_id, &hash],
            )
            .await?
        {
            return Ok(Created {
                id: row.get(0),
                status: row.get(1),
                created: false,
            });
        }
    }
    unreachable!("the loop only ends by returning")
}

/// A job as executors and callers see it.
#[derive(Debug, Clone)]
pub struct ReportJob {
    pub id: String,
    pub request: ReportRequest,
    pub status: String,
    pub artifact_prefix: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    /// `{"<format>": {"key", "file", "sizeBytes", "sha256"}}` once completed.
    pub artifacts: Option<serde_json::Value>,
    pub manifest_key: Option<String>,
    pub manifest_sha256: Option<String>,
    pub rows_scanned: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub notified: bool,
    /// This attempt's lease token.
    pub lease: String,
    pub source: String,
}

const COLUMNS: &str = "id, kind, requester_id, organization_id, allowed_orgs, period_from, \
    period_to, formats, status, artifact_prefix, attempts, last_error, artifacts, manifest_key, \
    manifest_sha256, rows_scanned, created_at, completed_at, expires_at, notified_at IS NOT NULL, \
    leased_by, source";

impl ReportJob {
    fn from_row(row: &tokio_postgres::Row) -> Result<Self, String> {
        let formats: Vec<String> = row.get(7);
        let formats = formats
            .iter()
            .map(|f| OutputFormat::parse(f))
            .collect::<Result<BTreeSet<_>, _>>()?;
        let allowed: Option<Vec<String>> = row.get(4);
        Ok(Self {
            id: row.get(0),
            request: ReportRequest {
                kind: ReportKind::parse(row.get(1))?,
                requester_id: row.get(2),
                organization_id: row.get(3),
                allowed_orgs: allowed.map(|v| v.into_iter().collect()),
                from: row.get(5),
                to: row.get(6),
                formats,
            },
            status: row.get(8),
            artifact_prefix: row.get(9),
            attempts: row.get(10),
            last_error: row.get(11),
            artifacts: row.get(12),
            manifest_key: row.get(13),
            manifest_sha256: row.get(14),
            rows_scanned: row.get(15),
            created_at: row.get(16),
            completed_at: row.get(17),
            expires_at: row.get(18),
            notified: row.get(19),
            lease: row.get::<_, Option<String>>(20).unwrap_or_default(),
            source: row.get(21),
        })
    }
}

/// Looks a job up by id (`None`: no such job). For callers such as an
/// HTTP handler: the row, never a path, says where its files are.
pub async fn get_job(
    client: &impl GenericClient,
    id: &str,
) -> Result<Option<ReportJob>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            &format!("SELECT {COLUMNS} FROM report_jobs WHERE id = $1"),
            &[&id],
        )
        .await?;
    Ok(row.and_then(|r| ReportJob::from_row(&r).ok()))
}

fn prefixed_columns() -> String {
    COLUMNS
        .split(", ")
        .map(|c| format!("j.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Leases the oldest claimable queue job (queued, running with an expired
/// lease, or completed but not yet announced).
pub async fn claim_next(
    client: &impl GenericClient,
    token: &str,
    lease_secs: u64,
) -> Result<Option<Result<ReportJob, (String, String)>>, tokio_postgres::Error> {
    let sql = format!(
        "UPDATE report_jobs j SET leased_by = $1, \
           lease_expires_at = now() + make_interval(secs => $2), \
           attempts = attempts + CASE WHEN status = 'completed' THEN 0 ELSE 1 END, \
           status = CASE WHEN status = 'queued' THEN 'running' ELSE status END, \
           started_at = coalesce(started_at, now()) \
         WHERE id = (SELECT id FROM report_jobs \
             WHERE origin = 'queue' \
               AND (status IN ('queued', 'running') OR (status = 'completed' AND notified_at IS NULL)) \
               AND (lease_expires_at IS NULL OR lease_expires_at < now()) \
             ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED) \
         RETURNING {}",
        prefixed_columns()
    );
    let row = client
        .query_opt(&sql, &[&token, &(lease_secs as f64)])
        .await?;
    Ok(row.map(|r| ReportJob::from_row(&r).map_err(|why| (r.get(0), why))))
}

/// Leases one given job (the CLI runs the job it just created).
pub async fn claim_job(
    client: &impl GenericClient,
    id: &str,
    token: &str,
    lease_secs: u64,
) -> Result<Option<ReportJob>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            &format!(
                "UPDATE report_jobs SET leased_by = $2, lease_expires_at = now() + make_interval(secs => $3), \
                   attempts = attempts + 1, status = 'running', started_at = coalesce(started_at, now()) \
                 WHERE id = $1 AND status IN ('queued', 'running') \
                   AND (lease_expires_at IS NULL OR lease_expires_at < now()) \
                 RETURNING {COLUMNS}"
            ),
            &[&id, &token, &(lease_secs as f64)],
        )
        .await?;
    Ok(row.and_then(|r| ReportJob::from_row(&r).ok()))
}

const GUARD: &str = "id = $1 AND leased_by = $2";

/// Extends the lease; `false` when it was lost.
pub async fn renew(
    client: &impl GenericClient,
    job: &ReportJob,
    lease_secs: u64,
) -> Result<bool, tokio_postgres::Error> {
    let n = client
        .execute(
            &format!(
                "UPDATE report_jobs SET lease_expires_at = now() + make_interval(secs => $3) WHERE {GUARD}"
            ),
            &[&job.id, &job.lease, &(lease_secs as f64)],
        )
        .await?;
    Ok(n == 1)
}

/// What a completed report recorded.
#[derive(Debug, Clone)]
pub struct Completion {
    pub artifacts: serde_json::Value,
    pub manifest_key: String,
    pub manifest_sha256: String,
    pub rows_scanned: i64,
    pub completed_at: DateTime<Utc>,
    pub expiry_secs: u64,
}

/// Records the result; `false` when the lease was lost.
pub async fn complete(
    client: &impl GenericClient,
    job: &ReportJob,
    c: &Completion,
) -> Result<bool, tokio_postgres::Error> {
    let n = client
        .execute(
            &format!(
                "UPDATE report_jobs SET status = 'completed', artifacts = $3, manifest_key = $4, \
                 manifest_sha256 = $5, rows_scanned = $6, completed_at = $7::timestamptz, \
                 expires_at = $7::timestamptz + make_interval(secs => $8), last_error = NULL \
                 WHERE {GUARD} AND status = 'running'"
            ),
            &[
                &job.id,
                &job.lease,
                &c.artifacts,
                &c.manifest_key,
                &c.manifest_sha256,
                &c.rows_scanned,
                &c.completed_at,
                &(c.expiry_secs as f64),
            ],
        )
        .await?;
    Ok(n == 1)
}

/// The audit event and notification went out: the job is done.
pub async fn mark_notified(
    client: &impl GenericClient,
    job: &ReportJob,
) -> Result<bool, tokio_postgres::Error> {
    let n = client
        .execute(
            &format!(
                "UPDATE report_jobs SET notified_at = now(), leased_by = NULL, lease_expires_at = NULL \
                 WHERE {GUARD} AND status = 'completed'"
            ),
            &[&job.id, &job.lease],
        )
        .await?;
    Ok(n == 1)
}

/// An attempt failed: try again after `delay_secs`, or fail for good once
/// `max_attempts` are used. Returns true when the job failed for good.
pub async fn after_failure(
    client: &impl GenericClient,
    job: &ReportJob,
    error: &str,
    delay_secs: u64,
    max_attempts: i32,
) -> Result<bool, tokio_postgres::Error> {
    if job.status != "completed" && job.attempts >= max_attempts {
        let n = client
            .execute(
                &format!(
                    "UPDATE report_jobs SET status = 'failed', last_error = $3, completed_at = now(), \
                     leased_by = NULL, lease_expires_at = NULL WHERE {GUARD} AND status IN ('queued', 'running')"
                ),
                &[&job.id, &job.lease, &error],
            )
            .await?;
        return Ok(n == 1);
    }
    client
        .execute(
            &format!(
                "UPDATE report_jobs SET last_error = $3, \
                 lease_expires_at = now() + make_interval(secs => $4) WHERE {GUARD}"
            ),
            &[&job.id, &job.lease, &error, &(delay_secs as f64)],
        )
        .await?;
    Ok(false)
}

/// Gives the lease back at once (shutdown).
pub async fn release(
    client: &impl GenericClient,
    job: &ReportJob,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            &format!(
                "UPDATE report_jobs SET lease_expires_at = NULL, leased_by = NULL WHERE {GUARD}"
            ),
            &[&job.id, &job.lease],
        )
        .await?;
    Ok(())
}

/// SQL condition: the organisations a job may contain (the one asked for,
/// else the requester's allowed ones; NULL: all) lie within the scope in
/// parameter `$n` (NULL: every job). What an API key may see.
fn visible(n: usize) -> String {
    format!(
        "(${n}::text[] IS NULL OR coalesce(CASE WHEN organization_id IS NOT NULL \
           THEN ARRAY[organization_id] END, allowed_orgs) <@ ${n}::text[])"
    )
}

/// Looks a job up by id if its organisations lie within `scope` (`None`:
/// all); `None` otherwise, exactly as for an unknown id.
pub async fn get_visible(
    client: &impl GenericClient,
    id: &str,
    scope: &Option<Vec<String>>,
) -> Result<Option<ReportJob>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            &format!(
                "SELECT {COLUMNS} FROM report_jobs WHERE id = $1 AND {}",
                visible(2)
            ),
            &[&id, scope],
        )
        .await?;
    Ok(row.and_then(|r| ReportJob::from_row(&r).ok()))
}

/// Up to `limit` jobs within `scope`, newest first, after the job
/// `cursor` (the last id of the previous page).
pub async fn list_visible(
    client: &impl GenericClient,
    scope: &Option<Vec<String>>,
    cursor: &Option<String>,
    limit: i64,
) -> Result<Vec<ReportJob>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "SELECT {COLUMNS} FROM report_jobs WHERE {} \
                   AND ($2::text IS NULL OR (created_at, id) < \
                        (SELECT created_at, id FROM report_jobs WHERE id = $2)) \
                 ORDER BY created_at DESC, id DESC LIMIT $3",
                visible(1)
            ),
            &[scope, cursor, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| ReportJob::from_row(r).ok())
        .collect())
}
