//! `/v1/gdpr/access-requests`: GDPR subject access (Art. 15) through the
//! API, `gdpr` permission.
//!
//! A request is a `gdpr.access` job: an export job with a subject filter
//! (see [`crate::jobs::gdpr::access`]), recorded with the key as requester
//! and the key's organisation scope, run by the export executor. The
//! endpoints are the export endpoints' own code ([`super::exports`]) for
//! the subject access family of jobs, plus the download of the proofs.

use axum::response::Response;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Caller;
use super::exports::{
    create_job, download_job, get_job, list_jobs, ExportCompression, ExportFormat, ExportJob,
    ExportList, JobFamily, PageParams,
};
use super::keys::Permission;
use super::problem::Problem;
use super::{ApiJson, ApiPath, ApiQuery, ApiState};
use crate::jobs::export::download::JobFile;

/// The subject access routes.
pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(create_access_request, list_access_requests))
        .routes(routes!(get_access_request))
        .routes(routes!(download_access_request))
        .routes(routes!(download_access_proofs))
}

/// `POST /v1/gdpr/access-requests` body: the queue's `gdpr.access` request
/// without `requesterId` (the requester is the API key).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateAccessRequest {
    /// The data subject: a principal or resource id.
    #[schema(min_length = 1, max_length = 1000)]
    pub subject_id: String,
    /// Default `ndjson`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ExportFormat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<ExportCompression>,
    /// Only this organisation; must lie in the key's scope (403 otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 1000)]
    pub organization_id: Option<String>,
    /// Inclusive start of the event time range (default: every stored event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Exclusive end of the range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

/// Create a subject access request.
///
/// The export holds every stored event about the subject (as actor, as
/// target, or at a configured `details` / `sessionContext` path) within the
/// key's organisations; the proofs file beside it holds each sealed
/// event's inclusion proof. An identical request of the same key still in
/// progress answers 409 with its id.
#[utoipa::path(
    post,
    path = "/v1/gdpr/access-requests",
    tag = "gdpr",
    request_body = CreateAccessRequest,
    responses(
        (status = 201, description = "Job created", body = ExportJob),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Permission missing or organisation outside the key's scope", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "An identical request is in progress (jobId)", body = Problem, content_type = "application/problem+json"),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid values", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn create_access_request(
    caller: Caller,
    axum::extract::State(state): axum::extract::State<ApiState>,
    ApiJson(body): ApiJson<CreateAccessRequest>,
) -> Result<Response, Problem> {
    caller.require(Permission::Gdpr)?;
    let mut wire = serde_json::to_value(&body).map_err(|e| Problem::internal(&e.to_string()))?;
    wire["requesterId"] = caller.0.requester_id().into();
    let request =
        crate::jobs::gdpr::access::parse_request(wire.to_string().as_bytes(), &state.subject_paths)
            .map_err(|r| Problem::invalid(r.message))?;
    create_job(&state, &caller, &request, JobFamily::SubjectAccess).await
}

/// List the subject access requests visible to the key, newest first.
#[utoipa::path(
    get,
    path = "/v1/gdpr/access-requests",
    tag = "gdpr",
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
async fn list_access_requests(
    caller: Caller,
    axum::extract::State(state): axum::extract::State<ApiState>,
    ApiQuery(page): ApiQuery<PageParams>,
) -> Result<axum::Json<ExportList>, Problem> {
    caller.require(Permission::Gdpr)?;
    Ok(axum::Json(
        list_jobs(&state, &caller, &page, JobFamily::SubjectAccess).await?,
    ))
}

/// One subject access request.
#[utoipa::path(
    get,
    path = "/v1/gdpr/access-requests/{id}",
    tag = "gdpr",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job", body = ExportJob),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Permission missing", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job visible to this key", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn get_access_request(
    caller: Caller,
    axum::extract::State(state): axum::extract::State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<ExportJob>, Problem> {
    caller.require(Permission::Gdpr)?;
    Ok(axum::Json(
        get_job(&state, &caller, &id, JobFamily::SubjectAccess).await?,
    ))
}

/// Download the export of a completed subject access request.
#[utoipa::path(
    get,
    path = "/v1/gdpr/access-requests/{id}/download",
    tag = "gdpr",
    params(("id" = String, Path, description = "Job id")),
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
        (status = 409, description = "Not completed", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "Expired and removed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database or object store unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn download_access_request(
    caller: Caller,
    axum::extract::State(state): axum::extract::State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, Problem> {
    caller.require(Permission::Gdpr)?;
    download_job(
        &state,
        &caller,
        &id,
        JobFamily::SubjectAccess,
        JobFile::Artifact,
    )
    .await
}

/// Download the inclusion proofs of a completed subject access request:
/// one JSON proof per line (the form of `audit-worker prove`), one per
/// sealed event of the export; the job's manifest lists the events not
/// sealed yet.
#[utoipa::path(
    get,
    path = "/v1/gdpr/access-requests/{id}/proofs",
    tag = "gdpr",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The proofs, streamed", content(
            (Vec<u8> = "application/x-ndjson"),
        )),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Permission missing", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job visible to this key", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not completed", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "Expired and removed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database or object store unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn download_access_proofs(
    caller: Caller,
    axum::extract::State(state): axum::extract::State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, Problem> {
    caller.require(Permission::Gdpr)?;
    download_job(
        &state,
        &caller,
        &id,
        JobFamily::SubjectAccess,
        JobFile::Proofs,
    )
    .await
}
