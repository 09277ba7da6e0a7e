//! `/v1/gdpr`: erasure requests and restriction of processing (permission
//! `gdpr`). An erasure runs within the request and answers with its
//! outcome; under a legal hold it answers 409 legal-hold naming the hold
//! (`holdId`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Caller;
use super::keys::{OrgScope, Permission};
use super::problem::{Kind, Problem};
use super::{ApiJson, ApiState};
use crate::jobs::gdpr::erase::{EraseError, EraseRequest, Erasure};
use crate::jobs::gdpr::restriction::{self, Restriction};

/// The GDPR routes.
pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(create_erasure))
        .routes(routes!(restrict_subject, list_restrictions))
        .routes(routes!(lift_restriction))
}

/// The organisation an erasure or restriction may act on for this key:
/// the one asked for (if in scope), or all when the key covers all.
fn scoped_org(caller: &Caller, org: Option<&str>) -> Result<Option<String>, Problem> {
    match (org, caller.scope()) {
        (org, OrgScope::All) => Ok(org.map(str::to_owned)),
        (Some(o), scope) if scope.covers(Some(o)) => Ok(Some(o.to_owned())),
        (Some(_), _) => Err(Problem::forbidden(
            "organizationId is outside this API key's organisations",
        )),
        (None, _) => Err(Problem::invalid(
            "this API key covers only some organisations: give organizationId",
        )),
    }
}

/// Erase a subject's personal values.
///
/// Every stored event of the subject (as principal, as target, or named by
/// a configured personal field) gets its personal values replaced by
/// stable pseudonyms and their salts destroyed; the log's leaves, proofs
/// and checkpoints stay valid. Dead letters and alerts about the subject
/// are purged, artifacts that may hold its values are withdrawn (their
/// requesters notified), and the erasure is recorded as a
/// `gdpr.erasure.completed` audit event.
#[utoipa::path(
    post,
    path = "/v1/gdpr/erasures",
    tag = "gdpr",
    request_body = EraseRequest,
    responses(
        (status = 201, description = "Erased", body = Erasure),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Permission missing or organisation outside the key's scope", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A legal hold covers events of the subject (legal-hold, holdId)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid values", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database, Redis or object store unavailable, or erasure not configured", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn create_erasure(
    caller: Caller,
    axum::extract::State(state): axum::extract::State<ApiState>,
    ApiJson(body): ApiJson<EraseRequest>,
) -> Result<Response, Problem> {
    caller.require(Permission::Gdpr)?;
    body.check().map_err(Problem::invalid)?;
    let req = EraseRequest {
        organization_id: scoped_org(&caller, body.organization_id.as_deref())?,
        subject_id: body.subject_id,
    };
    let Some(eraser) = state.gdpr.eraser.clone() else {
        tracing::warn!("erasure requested but gdpr.pseudonym_key is not set");
        return Err(Problem::new(
            Kind::Unavailable,
            StatusCode::SERVICE_UNAVAILABLE,
            "erasure is not configured on this service: its operator must set gdpr.pseudonym_key",
        ));
    };
    let mut client = super::db_client(&state).await?;
    let source = format!("api:{}", uuid::Uuid::new_v4());
    match eraser.erase(&mut client, &req, &caller.0.id, &source).await {
        Ok(done) => Ok((StatusCode::CREATED, axum::Json(done)).into_response()),
        Err(EraseError::Held(h)) => {
            let mut p = Problem::new(Kind::LegalHold, StatusCode::CONFLICT, h.refusal());
            p.hold_id = Some(h.id.clone().into_boxed_str());
            Err(p)
        }
        Err(EraseError::BadRequest(m)) => Err(Problem::invalid(m)),
        Err(EraseError::Db(e)) => Err(Problem::unavailable(&crate::db::root_cause(&e))),
        Err(e @ (EraseError::Integrity(_) | EraseError::Incomplete(_))) => {
            Err(Problem::unavailable(&e.to_string()))
        }
    }
}

/// A restriction to place.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RestrictRequest {
    /// The subject: a principal or target resource id.
    pub subject_id: String,
    /// The organisation (omit: every organisation; all-organisation keys only).
    #[serde(default)]
    pub organization_id: Option<String>,
    /// Why processing is restricted.
    pub reason: String,
}

/// The restrictions visible to a key.
#[derive(Debug, Serialize, ToSchema)]
pub struct RestrictionList {
    pub restrictions: Vec<Restriction>,
}

/// Restrict processing of a subject's events.
///
/// Exports leave the subject's events out unless requested with the `gdpr`
/// permission; the events stay stored, sealed and verifiable.
#[utoipa::path(
    post,
    path = "/v1/gdpr/restrictions",
    tag = "gdpr",
    request_body = RestrictRequest,
    responses(
        (status = 201, description = "Restricted", body = Restriction),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Permission missing or organisation outside the key's scope", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid values", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn restrict_subject(
    caller: Caller,
    axum::extract::State(state): axum::extract::State<ApiState>,
    ApiJson(body): ApiJson<RestrictRequest>,
) -> Result<Response, Problem> {
    caller.require(Permission::Gdpr)?;
    crate::jobs::gdpr::check_text("subjectId", &body.subject_id).map_err(Problem::invalid)?;
    crate::jobs::gdpr::check_text("reason", &body.reason).map_err(Problem::invalid)?;
    if let Some(org) = &body.organization_id {
        crate::jobs::gdpr::check_text("organizationId", org).map_err(Problem::invalid)?;
    }
    let org = scoped_org(&caller, body.organization_id.as_deref())?;
    let client = super::db_client(&state).await?;
    let r = restriction::restrict(
        &**client,
        org.as_deref(),
        &body.subject_id,
        &body.reason,
        &caller.0.id,
    )
    .await
    .map_err(|e| Problem::unavailable(&e))?;
    Ok((StatusCode::CREATED, axum::Json(r)).into_response())
}

/// List the restricted subjects visible to this key.
#[utoipa::path(
    get,
    path = "/v1/gdpr/restrictions",
    tag = "gdpr",
    responses(
        (status = 200, description = "The restrictions", body = RestrictionList),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Permission missing", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn list_restrictions(
    caller: Caller,
    axum::extract::State(state): axum::extract::State<ApiState>,
) -> Result<axum::Json<RestrictionList>, Problem> {
    caller.require(Permission::Gdpr)?;
    let client = super::db_client(&state).await?;
    let orgs = caller.scope().to_db();
    let restrictions = restriction::list(&**client, orgs.as_deref())
        .await
        .map_err(|e| Problem::unavailable(&e))?;
    Ok(axum::Json(RestrictionList { restrictions }))
}

/// A restriction to lift.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LiftRequest {
    pub subject_id: String,
    #[serde(default)]
    pub organization_id: Option<String>,
}

/// Lift a subject's restriction.
#[utoipa::path(
    post,
    path = "/v1/gdpr/restrictions/lift",
    tag = "gdpr",
    request_body = LiftRequest,
    responses(
        (status = 204, description = "Lifted"),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Permission missing or organisation outside the key's scope", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "The subject is not restricted in that scope", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid values", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn lift_restriction(
    caller: Caller,
    axum::extract::State(state): axum::extract::State<ApiState>,
    ApiJson(body): ApiJson<LiftRequest>,
) -> Result<Response, Problem> {
    caller.require(Permission::Gdpr)?;
    crate::jobs::gdpr::check_text("subjectId", &body.subject_id).map_err(Problem::invalid)?;
    if let Some(org) = &body.organization_id {
        crate::jobs::gdpr::check_text("organizationId", org).map_err(Problem::invalid)?;
    }
    let org = scoped_org(&caller, body.organization_id.as_deref())?;
    let client = super::db_client(&state).await?;
    if restriction::lift(&**client, org.as_deref(), &body.subject_id)
        .await
        .map_err(|e| Problem::unavailable(&e))?
    {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(Problem::not_found("restriction"))
    }
}
