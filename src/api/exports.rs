//! `/v1/exports`: compliance exports through the API.
//!
//! A created job is an ordinary export job (the queue's executor runs it),
//! recorded with the key's identity as requester (`api-key:<id>:<name>`)
//! and the key's organisation scope, which the export's query enforces.
//! A job is visible to a key when every organisation it may contain lies in
//! the key's scope; any other job answers 404, as a missing one does.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Caller;
use super::keys::{OrgScope, Permission};
use super::problem::{Kind, Problem};
use super::{ApiJson, ApiPath, ApiQuery, ApiState};
use crate::jobs::export::download::{self, DownloadError};
use crate::jobs::export::request::ExportRequest;
use crate::jobs::JobError;

/// The export routes.
pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(create_export, list_exports))
        .routes(routes!(get_export))
        .routes(routes!(cancel_export))
        .routes(routes!(download_export))
}

/// Export file formats.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    Csv,
    Ndjson,
    Json,
    /// OCSF events, one JSON object per line.
    Ocsf,
    /// Apache Parquet (compression must be left out or `none`).
    Parquet,
}

/// What a parquet export holds: the export columns (default) or OCSF
/// events flattened into dotted columns.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ParquetSchema {
    Columns,
    Ocsf,
}

/// Compression of the export file (default gzip).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExportCompression {
    Gzip,
    Zstd,
    None,
}

/// Event outcome filter values.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EventStatus {
    Attempt,
    Success,
    Failure,
}

/// Data classification filter values.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum DataClassification {
    Public,
    Internal,
    Confidential,
    Phi,
}

/// Which events an export holds: the queue's `exportFilters`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExportFilters {
    /// Inclusive start of the event time range (RFC 3339, or a date for midnight UTC).
    #[schema(example = "2024-03-01T00:00:00Z")]
    pub from: String,
    /// Exclusive end of the range; must be after `from`.
    #[schema(example = "2024-04-01T00:00:00Z")]
    pub to: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actions: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal_ids: Option<Vec<String>>,
    /// Only this organisation; must lie in the key's scope (403 otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 1000)]
    pub organization_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Vec<EventStatus>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 1000)]
    pub target_resource_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 1000)]
    pub target_resource_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_classification: Option<Vec<DataClassification>>,
}

/// `POST /v1/exports` body: the queue's `export.audit` request without
/// `requesterId` (the requester is the API key).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateExport {
    pub export_filters: ExportFilters,
    pub format: ExportFormat,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<ExportCompression>,
    /// Format `parquet` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parquet_schema: Option<ParquetSchema>,
}

impl CreateExport {
    /// Validates it exactly as a queue request, with `requester` as
    /// requesterId.
    pub fn to_request(&self, requester: &str) -> Result<ExportRequest, String> {
        let mut wire = serde_json::to_value(self).map_err(|e| e.to_string())?;
        wire["requesterId"] = json!(requester);
        ExportRequest::parse(wire.to_string().as_bytes()).map_err(|r| r.message)
    }
}

/// An export job as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExportJob {
    pub id: String,
    /// queued, exporting, uploading, completed, failed, expired or cancelled.
    pub status: String,
    pub requester_id: String,
    /// The normalised filters.
    #[schema(value_type = Object)]
    pub filters: serde_json::Value,
    pub format: String,
    pub compression: String,
    /// The organisations the export may contain (`["*"]`: all).
    pub organizations: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    /// End of the download window (completed jobs).
    pub expires_at: Option<DateTime<Utc>>,
    pub rows_done: i64,
    pub row_count: Option<i64>,
    pub size_bytes: Option<i64>,
    /// SHA-256 (hex) of the artifact.
    pub sha256: Option<String>,
    /// Why the job failed or was cancelled.
    pub error: Option<String>,
    /// Where to download the artifact (completed jobs).
    pub download: Option<String>,
    /// Where to download the inclusion proofs (completed subject access
    /// requests only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proofs: Option<String>,
}

/// A page of export jobs, newest first.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExportList {
    pub items: Vec<ExportJob>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// List paging.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Items per page (default api.default_page_size; more than
    /// api.max_page_size is reduced to it).
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<u32>,
    /// `nextCursor` of the previous page (a job id).
    #[param(pattern = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")]
    pub cursor: Option<String>,
}

/// Whether `s` has the form of a job id (a UUID as the jobs are given):
/// anything else names no job, and never reaches the database.
pub(super) fn job_id_form(s: &str) -> bool {
    s.len() == 36 && uuid::Uuid::try_parse(s).is_ok() && !s.bytes().any(|b| b.is_ascii_uppercase())
}

impl PageParams {
    /// Refuses a cursor this API cannot have returned (not a job id).
    pub(super) fn check_cursor(&self) -> Result<(), Problem> {
        if self.cursor.as_deref().is_some_and(|c| !job_id_form(c)) {
            return Err(Problem::invalid(
                "cursor is not one this API returned: pass nextCursor unchanged",
            ));
        }
        Ok(())
    }
}

/// Cuts jobs fetched with `limit + 1` rows to one page; the next cursor is
/// the last job's id when more remain.
pub(super) fn page_of<T>(
    mut items: Vec<T>,
    limit: i64,
    id: impl Fn(&T) -> String,
) -> (Vec<T>, Option<String>) {
    if items.len() as i64 > limit {
        items.truncate(limit as usize);
        let next = items.last().map(id);
        (items, next)
    } else {
        (items, None)
    }
}

const VIEW_COLUMNS: &str = "id, status, requester_id, filters, format, compression, \
    allowed_organizations, created_at, started_at, completed_at, expires_at, rows_done, \
    row_count, size_bytes, sha256, last_error";

/// SQL condition: the job (its stored scope, else its organisation filter)
/// lies within the key scope in parameter `$n` (NULL: every job).
fn visible(n: usize) -> String {
    format!(
        "(${n}::text[] IS NULL OR coalesce(allowed_organizations, \
           CASE WHEN filters->>'organizationId' IS NOT NULL \
                THEN ARRAY[filters->>'organizationId'] END) <@ ${n}::text[])"
    )
}

/// Which export jobs an endpoint family serves: compliance exports
/// (`/v1/exports`, `export` permission) or subject access requests
/// (`/v1/gdpr/access-requests`, `gdpr` permission). Both are export jobs;
/// a subject access job is one whose filters name a subject, and neither
/// family sees the other's jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum JobFamily {
    Export,
    SubjectAccess,
}

impl JobFamily {
    /// SQL condition on export_jobs selecting the family's jobs.
    fn condition(self) -> &'static str {
        match self {
            Self::Export => "NOT (filters ? 'subject')",
            Self::SubjectAccess => "filters ? 'subject'",
        }
    }

    /// The family's collection path.
    fn path(self) -> &'static str {
        match self {
            Self::Export => "/v1/exports",
            Self::SubjectAccess => "/v1/gdpr/access-requests",
        }
    }

    /// What one job is called in answers.
    fn noun(self) -> &'static str {
        match self {
            Self::Export => "export",
            Self::SubjectAccess => "access request",
        }
    }
}

fn view(row: &tokio_postgres::Row, family: JobFamily) -> ExportJob {
    let id: String = row.get(0);
    let status: String = row.get(1);
    let allowed: Option<Vec<String>> = row.get(6);
    let error: Option<String> = row.get(15);
    let completed = status == "completed";
    ExportJob {
        download: completed.then(|| format!("{}/{id}/download", family.path())),
        proofs: (completed && family == JobFamily::SubjectAccess)
            .then(|| format!("{}/{id}/proofs", family.path())),
        error: matches!(status.as_str(), "failed" | "cancelled" | "expired")
            .then_some(error)
            .flatten(),
        requester_id: row.get(2),
        filters: row.get(3),
        format: row.get(4),
        compression: row.get(5),
        organizations: OrgScope::from_db(allowed).to_list(),
        created_at: row.get(7),
        started_at: row.get(8),
        completed_at: row.get(9),
        expires_at: row.get(10),
        rows_done: row.get(11),
        row_count: row.get(12),
        size_bytes: row.get(13),
        sha256: row.get(14),
        id,
        status,
    }
}

async fn client(state: &ApiState) -> Result<deadpool_postgres::Object, Problem> {
    state
        .pool
        .get()
        .await
        .map_err(|e| Problem::unavailable(&crate::db::pool_error_cause(&e)))
}

fn db_error(e: tokio_postgres::Error) -> Problem {
    Problem::unavailable(&crate::db::root_cause(&e))
}

/// The job if the caller may see it (404 otherwise, the same answer as for
/// an unknown id).
async fn visible_job(
    state: &ApiState,
    caller: &Caller,
    id: &str,
    family: JobFamily,
) -> Result<ExportJob, Problem> {
    if !job_id_form(id) {
        return Err(Problem::not_found(family.noun()));
    }
    let client = client(state).await?;
    let row = client
        .query_opt(
            &format!(
                "SELECT {VIEW_COLUMNS} FROM export_jobs WHERE id = $1 AND {} AND {}",
                visible(2),
                family.condition()
            ),
            &[&id, &caller.scope().to_db()],
        )
        .await
        .map_err(db_error)?;
    row.as_ref()
        .map(|r| view(r, family))
        .ok_or_else(|| Problem::not_found(family.noun()))
}

/// Records `request` for `caller` (its scope stored with the job) and
/// answers 201 with the job, or 409 with an identical job in progress.
pub(super) async fn create_job(
    state: &ApiState,
    caller: &Caller,
    request: &ExportRequest,
    family: JobFamily,
) -> Result<Response, Problem> {
    let scope = caller.scope().to_db();
    crate::jobs::export::check_scope(request, scope.as_deref()).map_err(|m| {
        Problem::forbidden(format!(
            "{}: ask for a key covering it, or drop the filter",
            m.replace("exportFilters.", "")
        ))
    })?;
    let source = format!("api:{}:{}", caller.0.id, uuid::Uuid::new_v4());
    let recorded = match state
        .exports
        .record_scoped(request, &source, scope.as_deref())
        .await
    {
        Ok(r) => r,
        Err(JobError::Transient(e)) => return Err(Problem::unavailable(&e)),
        Err(JobError::Rejected(r)) => return Err(Problem::invalid(r.message)),
    };
    if !recorded.created {
        let mut p = Problem::new(
            Kind::DuplicateExport,
            StatusCode::CONFLICT,
            format!(
                "an identical {} of this key is already {} as job {}: follow that job instead",
                family.noun(),
                recorded.status,
                recorded.id
            ),
        );
        p.job_id = Some(recorded.id);
        return Err(p);
    }
    tracing::info!(job = %recorded.id, key = %caller.0.id, kind = family.noun(), "export job created through the API");
    let job = visible_job(state, caller, &recorded.id, family).await?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("{}/{}", family.path(), job.id))],
        axum::Json(job),
    )
        .into_response())
}

/// A page of the family's jobs visible to `caller`, newest first.
pub(super) async fn list_jobs(
    state: &ApiState,
    caller: &Caller,
    page: &PageParams,
    family: JobFamily,
) -> Result<ExportList, Problem> {
    let limit = state.pages.limit(page.limit)?;
    page.check_cursor()?;
    let client = client(state).await?;
    let rows = client
        .query(
            &format!(
                "SELECT {VIEW_COLUMNS} FROM export_jobs WHERE {} AND {} \
                   AND ($2::text IS NULL OR (created_at, id) < \
                        (SELECT created_at, id FROM export_jobs WHERE id = $2)) \
                 ORDER BY created_at DESC, id DESC LIMIT $3",
                visible(1),
                family.condition()
            ),
            &[&caller.scope().to_db(), &page.cursor, &(limit + 1)],
        )
        .await
        .map_err(db_error)?;
    let (items, next_cursor) = page_of(
        rows.iter().map(|r| view(r, family)).collect(),
        limit,
        |j: &ExportJob| j.id.clone(),
    );
    Ok(ExportList { items, next_cursor })
}

/// One of the family's jobs, if `caller` may see it.
pub(super) async fn get_job(
    state: &ApiState,
    caller: &Caller,
    id: &str,
    family: JobFamily,
) -> Result<ExportJob, Problem> {
    visible_job(state, caller, id, family).await
}

/// Streams a file of a completed job of the family that `caller` may see.
pub(super) async fn download_job(
    state: &ApiState,
    caller: &Caller,
    id: &str,
    family: JobFamily,
    file: download::JobFile,
) -> Result<Response, Problem> {
    let job = visible_job(state, caller, id, family).await?;
    download::stream_file(&state.downloads, &job.id, file)
        .await
        .map_err(|e| match e {
            DownloadError::NotFound => Problem::not_found(family.noun()),
            DownloadError::NotCompleted => Problem::new(
                Kind::Conflict,
                StatusCode::CONFLICT,
                format!(
                    "the {} is {}: download it once its status is completed",
                    family.noun(),
                    job.status
                ),
            ),
            DownloadError::Expired | DownloadError::FileGone => Problem::new(
                Kind::Gone,
                StatusCode::GONE,
                format!(
                    "the {}'s download window is over and its file was removed: create it again",
                    family.noun()
                ),
            ),
            DownloadError::Unavailable(e) => Problem::unavailable(&e),
        })
}

/// Create an export job.
///
/// The requester is the API key; the job may contain only the key's
/// organisations, whatever the filters say. An identical export of the
/// same key still in progress answers 409 with its id.
#[utoipa::path(
    post,
    path = "/v1/exports",
    tag = "exports",
    request_body = CreateExport,
    responses(
        (status = 201, description = "Job created", body = ExportJob),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Permission missing or organisation outside the key's scope", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "An identical export is in progress (jobId)", body = Problem, content_type = "application/problem+json"),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid values", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn create_export(
    caller: Caller,
    axum::extract::State(state): axum::extract::State<ApiState>,
    ApiJson(body): ApiJson<CreateExport>,
) -> Result<Response, Problem> {
    caller.require(Permission::Export)?;
    let mut request = body
        .to_request(&caller.0.requester_id())
        .map_err(Problem::invalid)?;
    // Events of restricted subjects only for keys that may see them.
    request.include_restricted = caller.0.allows(Permission::Gdpr);
    create_job(&state, &caller, &request, JobFamily::Export).await
}

/// List the export jobs visible to the key, newest first.
#[utoipa::path(
    get,
    path = "/v1/exports",
    tag = "exports",
    params(PageParams),
    responses(
        (status = 200, description = "A page of jobs", body = ExportList),
        (status = 400, description = "Malformed query", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Permission missing", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid limit", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn list_exports(
    caller: Caller,
    axum::extract::State(state): axum::extract::State<ApiState>,
    ApiQuery(page): ApiQuery<PageParams>,
) -> Result<axum::Json<ExportList>, Problem> {
    caller.require(Permission::Export)?;
    Ok(axum::Json(
        list_jobs(&state, &caller, &page, JobFamily::Export).await?,
    ))
}

/// One export job.
#[utoipa::path(
    get,
    path = "/v1/exports/{id}",
    tag = "exports",
    params(("id" = String, Path, description = "Export job id")),
    responses(
        (status = 200, description = "The job", body = ExportJob),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Permission missing", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job visible to this key", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn get_export(
    caller: Caller,
    axum::extract::State(state): axum::extract::State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<ExportJob>, Problem> {
    caller.require(Permission::Export)?;
    Ok(axum::Json(
        get_job(&state, &caller, &id, JobFamily::Export).await?,
    ))
}

/// Cancel an export job that is still in progress.
#[utoipa::path(
    post,
    path = "/v1/exports/{id}/cancel",
    tag = "exports",
    params(("id" = String, Path, description = "Export job id")),
    responses(
        (status = 200, description = "The cancelled job", body = ExportJob),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Permission missing", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job visible to this key", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The job is no longer in progress", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn cancel_export(
    caller: Caller,
    axum::extract::State(state): axum::extract::State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<ExportJob>, Problem> {
    caller.require(Permission::Export)?;
    let job = visible_job(&state, &caller, &id, JobFamily::Export).await?;
    let client = client(&state).await?;
    let reason = format!("cancelled by {}", caller.0.requester_id());
    let n = client
        .execute(
            "UPDATE export_jobs SET status = 'cancelled', last_error = $2, \
               completed_at = now(), leased_by = NULL, lease_expires_at = NULL \
             WHERE id = $1 AND status IN ('queued', 'exporting', 'uploading')",
            &[&job.id, &reason],
        )
        .await
        .map_err(db_error)?;
    if n == 0 {
        return Err(Problem::new(
            Kind::Conflict,
            StatusCode::CONFLICT,
            format!(
                "the export is {} and can no longer be cancelled",
                job.status
            ),
        ));
    }
    tracing::info!(job = %job.id, key = %caller.0.id, "export job cancelled through the API");
    Ok(axum::Json(
        visible_job(&state, &caller, &id, JobFamily::Export).await?,
    ))
}

/// Download the artifact of a completed export.
#[utoipa::path(
    get,
    path = "/v1/exports/{id}/download",
    tag = "exports",
    params(("id" = String, Path, description = "Export job id")),
    responses(
        (status = 200, description = "The export file, streamed", content(
            (Vec<u8> = "application/gzip"),
            (Vec<u8> = "application/zstd"),
            (Vec<u8> = "text/csv; charset=utf-8"),
            (Vec<u8> = "application/x-ndjson"),
            (Vec<u8> = "application/json"),
            (Vec<u8> = "application/vnd.apache.parquet"),
        )),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Permission missing", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job visible to this key", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The export is not completed", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "The export expired and was removed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database or object store unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn download_export(
    caller: Caller,
    axum::extract::State(state): axum::extract::State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, Problem> {
    caller.require(Permission::Export)?;
    download_job(
        &state,
        &caller,
        &id,
        JobFamily::Export,
        download::JobFile::Artifact,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_bodies_validate_as_queue_requests_with_the_key_as_requester() {
        let body: CreateExport = serde_json::from_value(json!({
            "exportFilters": {"from": "2024-03-01", "to": "2024-04-01", "status": ["success"]},
            "format": "ndjson"
        }))
        .unwrap();
        let r = body.to_request("api-key:k:n").unwrap();
        assert_eq!(r.requester_id, "api-key:k:n");
        assert_eq!(r.format.as_str(), "ndjson");
        assert_eq!(r.compression.as_str(), "gzip");
        let bad: CreateExport = serde_json::from_value(json!({
            "exportFilters": {"from": "2024-05-01", "to": "2024-04-01"}, "format": "csv"
        }))
        .unwrap();
        assert!(bad.to_request("x").unwrap_err().contains("must be before"));
        assert!(serde_json::from_value::<CreateExport>(json!({
            "exportFilters": {"from": "2024-03-01", "to": "2024-04-01"}, "format": "csv",
            "requesterId": "someone-else"
        }))
        .is_err());
    }
}
