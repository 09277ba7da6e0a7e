//! `/v1/reports`: compliance reports through the API.
//!
//! A created job is an ordinary `report.compliance` job (the workers'
//! report executor runs it), recorded with the key's identity as requester
//! (`api-key:<id>:<name>`) and the key's organisation scope as the
//! report's allowed organisations, which its queries enforce. A job is
//! visible to a key when every organisation it may contain (the one asked
//! for, else the requester's allowed ones) lies in the key's scope; any
//! other job answers 404, as a missing one does.

use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Caller;
use super::exports::{job_id_form, page_of, PageParams};
use super::keys::{OrgScope, Permission};
use super::problem::{Kind, Problem};
use super::{ApiJson, ApiPath, ApiQuery, ApiState};
use crate::jobs::report::request::OutputFormat;
use crate::jobs::report::{store, CreateError, ReportJob, ReportRequest};

/// The report routes.
pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(create_report, list_reports))
        .routes(routes!(get_report))
        .routes(routes!(download_report))
}

/// Which report to produce (the queue's `kind`).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema)]
pub enum ReportType {
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

/// A report file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReportFormat {
    Json,
    Csv,
    Html,
}

impl ReportFormat {
    fn output(self) -> OutputFormat {
        match self {
            Self::Json => OutputFormat::Json,
            Self::Csv => OutputFormat::Csv,
            Self::Html => OutputFormat::Html,
        }
    }
}

/// `POST /v1/reports` body: the queue's `report.compliance` request
/// without `requesterId` and `allowedOrganizations` (both come from the
/// API key).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateReport {
    pub kind: ReportType,
    /// Only this organisation; must lie in the key's scope (403
    /// otherwise). Omitted or `*`: every organisation of the key's scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 1000)]
    pub organization_id: Option<String>,
    /// Inclusive start of the period (RFC 3339, or a date for midnight UTC).
    #[schema(example = "2024-03-01T00:00:00Z")]
    pub from: String,
    /// Exclusive end of the period; must be after `from`.
    #[schema(example = "2024-04-01T00:00:00Z")]
    pub to: String,
    /// The files to produce (default: all three).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_items = 1)]
    pub formats: Option<Vec<ReportFormat>>,
}

impl CreateReport {
    /// Validates it exactly as a queue request, with `requester` as
    /// requesterId and `scope` (`None`: all) as allowedOrganizations.
    pub fn to_request(
        &self,
        requester: &str,
        scope: Option<&[String]>,
    ) -> Result<ReportRequest, String> {
        let mut wire = serde_json::to_value(self).map_err(|e| e.to_string())?;
        wire["requesterId"] = json!(requester);
        if let Some(orgs) = scope {
            wire["allowedOrganizations"] = json!(orgs);
        }
        ReportRequest::parse(wire.to_string().as_bytes()).map_err(|r| r.message)
    }

    /// The organisation asked for, when it lies outside `scope` (the
    /// caller answers 403 rather than an empty report).
    pub fn outside_scope(&self, scope: &OrgScope) -> Option<&str> {
        let org = self.organization_id.as_deref().filter(|o| *o != "*")?;
        match scope {
            OrgScope::All => None,
            OrgScope::Only(set) => (!set.contains(org)).then_some(org),
        }
    }
}

/// One file of a completed report.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReportArtifact {
    /// json, csv or html.
    pub format: String,
    pub size_bytes: Option<i64>,
    /// SHA-256 (hex) of the file.
    pub sha256: Option<String>,
    /// Where to download it with the same key.
    pub download: String,
}

/// A report job as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReportJobView {
    pub id: String,
    /// queued, running, completed or failed.
    pub status: String,
    /// hipaa-audit-trail, gdpr-processing or integrity.
    pub kind: String,
    pub requester_id: String,
    /// The organisation asked for (null: every one of `organizations`).
    pub organization_id: Option<String>,
    /// The organisations the report may contain (`["*"]`: all).
    pub organizations: Vec<String>,
    /// Inclusive start of the period.
    pub from: DateTime<Utc>,
    /// Exclusive end of the period.
    pub to: DateTime<Utc>,
    /// The files asked for.
    pub formats: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub attempts: i32,
    /// Audit events the report read (completed jobs).
    pub rows_scanned: Option<i64>,
    /// SHA-256 (hex) of the manifest listing every file's digest, as
    /// recorded in the `audit.report.created` event.
    pub manifest_sha256: Option<String>,
    /// The files (completed jobs; empty otherwise).
    pub artifacts: Vec<ReportArtifact>,
    /// Why the job failed.
    pub error: Option<String>,
}

/// A page of report jobs, newest first.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReportList {
    pub items: Vec<ReportJobView>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// The API view of a stored job.
pub fn view(job: &ReportJob) -> ReportJobView {
    let r = &job.request;
    let completed = job.status == "completed";
    let artifacts = job
        .artifacts
        .as_ref()
        .filter(|_| completed)
        .map(|a| {
            r.formats
                .iter()
                .filter(|f| a.get(f.as_str()).is_some())
                .map(|f| {
                    let entry = &a[f.as_str()];
                    ReportArtifact {
                        format: f.as_str().to_owned(),
                        size_bytes: entry["sizeBytes"].as_i64(),
                        sha256: entry["sha256"].as_str().map(str::to_owned),
                        download: format!("/v1/reports/{}/download/{}", job.id, f.as_str()),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    ReportJobView {
        id: job.id.clone(),
        status: job.status.clone(),
        kind: r.kind.as_str().to_owned(),
        requester_id: r.requester_id.clone(),
        organization_id: r.organization_id.clone(),
        organizations: match (&r.organization_id, &r.allowed_orgs) {
            (Some(org), _) => vec![org.clone()],
            (None, Some(allowed)) => allowed.iter().cloned().collect(),
            (None, None) => vec!["*".to_owned()],
        },
        from: r.from,
        to: r.to,
        formats: r.formats.iter().map(|f| f.as_str().to_owned()).collect(),
        created_at: job.created_at,
        completed_at: job.completed_at,
        attempts: job.attempts,
        rows_scanned: job.rows_scanned,
        manifest_sha256: job.manifest_sha256.clone(),
        artifacts,
        error: (job.status == "failed")
            .then(|| job.last_error.clone())
            .flatten(),
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
async fn visible_job(state: &ApiState, caller: &Caller, id: &str) -> Result<ReportJob, Problem> {
    if !job_id_form(id) {
        return Err(Problem::not_found("report"));
    }
    let client = client(state).await?;
    store::get_visible(&**client, id, &caller.scope().to_db())
        .await
        .map_err(db_error)?
        .ok_or_else(|| Problem::not_found("report"))
}

/// Create a compliance report job.
///
/// The requester is the API key; the report reads only the key's
/// organisations, whatever the body says. An identical report of the same
/// key still in progress answers 409 with its id.
#[utoipa::path(
    post,
    path = "/v1/reports",
    tag = "reports",
    request_body = CreateReport,
    responses(
        (status = 201, description = "Job created", body = ReportJobView),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Permission missing or organisation outside the key's scope", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "An identical report is in progress (jobId)", body = Problem, content_type = "application/problem+json"),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid values", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn create_report(
    caller: Caller,
    axum::extract::State(state): axum::extract::State<ApiState>,
    ApiJson(body): ApiJson<CreateReport>,
) -> Result<Response, Problem> {
    caller.require(Permission::Report)?;
    if let Some(org) = body.outside_scope(caller.scope()) {
        return Err(Problem::forbidden(format!(
            "organizationId {org:?} is outside this key's organisations: ask for a key covering it, or leave organizationId out for all of the key's"
        )));
    }
    let scope = caller.scope().to_db();
    let request = body
        .to_request(&caller.0.requester_id(), scope.as_deref())
        .map_err(Problem::invalid)?;
    let source = format!("api:{}:{}", caller.0.id, uuid::Uuid::new_v4());
    let created = match state.reports.create(&request, &source).await {
        Ok(c) => c,
        Err(CreateError::Db(e)) => return Err(Problem::unavailable(&e)),
        Err(CreateError::Invalid(r)) => return Err(Problem::invalid(r.message)),
    };
    if !created.created {
        let mut p = Problem::new(
            Kind::DuplicateReport,
            StatusCode::CONFLICT,
            format!(
                "an identical report of this key is already {} as job {}: follow that job instead",
                created.status, created.id
            ),
        );
        p.job_id = Some(created.id);
        return Err(p);
    }
    tracing::info!(job = %created.id, key = %caller.0.id, kind = request.kind.as_str(), "report job created through the API");
    let job = visible_job(&state, &caller, &created.id).await?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/v1/reports/{}", job.id))],
        axum::Json(view(&job)),
    )
        .into_response())
}

/// List the report jobs visible to the key, newest first.
#[utoipa::path(
    get,
    path = "/v1/reports",
    tag = "reports",
    params(PageParams),
    responses(
        (status = 200, description = "A page of jobs", body = ReportList),
        (status = 400, description = "Malformed query", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Permission missing", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid limit", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn list_reports(
    caller: Caller,
    axum::extract::State(state): axum::extract::State<ApiState>,
    ApiQuery(page): ApiQuery<PageParams>,
) -> Result<axum::Json<ReportList>, Problem> {
    caller.require(Permission::Report)?;
    let limit = state.pages.limit(page.limit)?;
    page.check_cursor()?;
    let client = client(&state).await?;
    let jobs = store::list_visible(&**client, &caller.scope().to_db(), &page.cursor, limit + 1)
        .await
        .map_err(db_error)?;
    let (items, next_cursor) = page_of(
        jobs.iter().map(view).collect(),
        limit,
        |j: &ReportJobView| j.id.clone(),
    );
    Ok(axum::Json(ReportList { items, next_cursor }))
}

/// One report job: status, period, files with their digests, error.
#[utoipa::path(
    get,
    path = "/v1/reports/{id}",
    tag = "reports",
    params(("id" = String, Path, description = "Report job id")),
    responses(
        (status = 200, description = "The job", body = ReportJobView),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Permission missing", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job visible to this key", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn get_report(
    caller: Caller,
    axum::extract::State(state): axum::extract::State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<ReportJobView>, Problem> {
    caller.require(Permission::Report)?;
    Ok(axum::Json(view(&visible_job(&state, &caller, &id).await?)))
}

/// Download one file of a completed report.
#[utoipa::path(
    get,
    path = "/v1/reports/{id}/download/{format}",
    tag = "reports",
    params(
        ("id" = String, Path, description = "Report job id"),
        ("format" = ReportFormat, Path, description = "Which file"),
    ),
    responses(
        (status = 200, description = "The report file, streamed", content(
            (serde_json::Value = "application/json"),
            (String = "text/csv; charset=utf-8"),
            (String = "text/html; charset=utf-8"),
        )),
        (status = 400, description = "Malformed path", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Permission missing", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job visible to this key, or the format was not asked for", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The report is not completed", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "The report's file was removed from the object store", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database or object store unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn download_report(
    caller: Caller,
    axum::extract::State(state): axum::extract::State<ApiState>,
    ApiPath((id, format)): ApiPath<(String, ReportFormat)>,
) -> Result<Response, Problem> {
    caller.require(Permission::Report)?;
    let job = visible_job(&state, &caller, &id).await?;
    let format = format.output();
    if job.status != "completed" {
        return Err(Problem::new(
            Kind::Conflict,
            StatusCode::CONFLICT,
            format!(
                "the report is {}: download it once its status is completed",
                job.status
            ),
        ));
    }
    // The object key comes from the job row, never from the request.
    let Some(key) = job
        .artifacts
        .as_ref()
        .and_then(|a| a[format.as_str()]["key"].as_str())
        .map(str::to_owned)
    else {
        return Err(Problem::new(
            Kind::NotFound,
            StatusCode::NOT_FOUND,
            format!(
                "the report has no {} file: it was asked for {}; request a new report with this format",
                format.as_str(),
                job.request
                    .formats
                    .iter()
                    .map(|f| f.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    };
    let object = match state
        .downloads
        .storage
        .store
        .get(&object_store::path::Path::from(key.as_str()))
        .await
    {
        Ok(o) => o,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(Problem::new(
                Kind::Gone,
                StatusCode::GONE,
                "the report's file was removed from the object store: request the report again",
            ))
        }
        Err(e) => return Err(Problem::unavailable(&e.to_string())),
    };
    let size = object.meta.size;
    let file_name = key
        .rsplit('/')
        .next()
        .map(crate::jobs::export::request::sanitize_file_name)
        .unwrap_or_default();
    let body = Body::from_stream(object.into_stream().map_err(std::io::Error::other));
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, format.content_type().to_owned()),
            (header::CONTENT_LENGTH, size.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{file_name}\""),
            ),
            (header::CACHE_CONTROL, "private, no-store".to_owned()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
        ],
        body,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn body(v: serde_json::Value) -> CreateReport {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn api_bodies_validate_as_queue_requests_with_the_key_as_requester_and_scope() {
        let b = body(
            json!({"kind": "gdpr-processing", "from": "2024-03-01", "to": "2024-04-01",
            "formats": ["csv", "json"]}),
        );
        let scope = vec!["org-1".to_owned(), "org-4".to_owned()];
        let r = b.to_request("api-key:k:n", Some(&scope)).unwrap();
        assert_eq!(r.requester_id, "api-key:k:n");
        assert_eq!(r.kind.as_str(), "gdpr-processing");
        assert_eq!(r.organization_id, None);
        assert_eq!(
            r.allowed_orgs,
            Some(BTreeSet::from(["org-1".to_owned(), "org-4".to_owned()]))
        );
        assert_eq!(
            r.formats,
            BTreeSet::from([OutputFormat::Csv, OutputFormat::Json])
        );
        let all = body(json!({"kind": "integrity", "from": "2024-03-01", "to": "2024-04-01"}))
            .to_request("x", None)
            .unwrap();
        assert_eq!(all.allowed_orgs, None);
        assert_eq!(all.formats.len(), 3);
        let bad = body(json!({"kind": "integrity", "from": "2024-05-01", "to": "2024-04-01"}));
        assert!(bad
            .to_request("x", None)
            .unwrap_err()
            .contains("must be before"));
        for extra in [
            json!({"requesterId": "someone-else"}),
            json!({"allowedOrganizations": ["x"]}),
        ] {
            let mut v = json!({"kind": "integrity", "from": "2024-03-01", "to": "2024-04-01"});
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            assert!(serde_json::from_value::<CreateReport>(v).is_err());
        }
        assert!(serde_json::from_value::<CreateReport>(
            json!({"kind": "sox", "from": "2024-03-01", "to": "2024-04-01"})
        )
        .is_err());
    }

    #[test]
    fn an_organisation_outside_the_keys_scope_is_named() {
        let scoped = OrgScope::Only(BTreeSet::from(["org-1".to_owned()]));
        let ask = |org: Option<&str>| {
            let mut v = json!({"kind": "integrity", "from": "2024-03-01", "to": "2024-04-01"});
            if let Some(o) = org {
                v["organizationId"] = json!(o);
            }
            body(v)
        };
        assert_eq!(ask(Some("org-2")).outside_scope(&scoped), Some("org-2"));
        assert_eq!(ask(Some("org-1")).outside_scope(&scoped), None);
        assert_eq!(ask(Some("*")).outside_scope(&scoped), None);
        assert_eq!(ask(None).outside_scope(&scoped), None);
        assert_eq!(ask(Some("org-2")).outside_scope(&OrgScope::All), None);
    }
}
