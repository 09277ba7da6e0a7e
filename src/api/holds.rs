//! `/v1/holds`: legal holds (permission `admin`). A hold keeps the rows it
//! covers from erasure until it is released; placing and releasing one are
//! recorded as audit events. A key sees and manages only holds of its
//! organisations (a hold for every organisation needs an all-organisations
//! key).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Caller;
use super::keys::{OrgScope, Permission};
use super::problem::Problem;
use super::{ApiJson, ApiPath, ApiState};
use crate::jobs::gdpr::hold::{self, Hold, HoldError, NewHold};

/// The hold routes.
pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(place_hold, list_holds))
        .routes(routes!(get_hold))
        .routes(routes!(release_hold))
}

/// The holds visible to a key.
#[derive(Debug, Serialize, ToSchema)]
pub struct HoldList {
    pub holds: Vec<Hold>,
}

fn hold_error(e: HoldError) -> Problem {
    match e {
        HoldError::BadRequest(m) => Problem::invalid(m),
        HoldError::Db(e) => Problem::unavailable(&crate::db::root_cause(&e)),
    }
}

/// Records the hold's audit event; a failure is logged (the change itself
/// is stored, and the hold table keeps who did it and when).
async fn record(state: &ApiState, h: &Hold, by: &str) {
    if let Some(r) = &state.gdpr.recorder {
        if let Err(e) = r.record(&hold::hold_event(h, by)).await {
            tracing::warn!(hold = %h.id, error = %e, "legal hold audit event not recorded");
        }
    }
}

/// Place a legal hold.
///
/// The hold covers every stored event matching all of its set conditions
/// (organisation, subject as principal or target, time range). While it
/// stands, erasure of those events answers 409 legal-hold naming it.
#[utoipa::path(
    post,
    path = "/v1/holds",
    tag = "holds",
    request_body = NewHold,
    responses(
        (status = 201, description = "Hold placed", body = Hold),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Permission missing or organisation outside the key's scope", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid values", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn place_hold(
    caller: Caller,
    axum::extract::State(state): axum::extract::State<ApiState>,
    ApiJson(body): ApiJson<NewHold>,
) -> Result<Response, Problem> {
    caller.require(Permission::Admin)?;
    body.check().map_err(Problem::invalid)?;
    match (&body.organization_id, caller.scope()) {
        (_, OrgScope::All) => {}
        (Some(o), scope) if scope.covers(Some(o)) => {}
        _ => {
            return Err(Problem::forbidden(
                "this API key may place holds only on its own organisations: give organizationId",
            ))
        }
    }
    let client = super::db_client(&state).await?;
    let h = hold::place(&**client, &body, &caller.0.id)
        .await
        .map_err(hold_error)?;
    record(&state, &h, &caller.0.id).await;
    Ok((StatusCode::CREATED, axum::Json(h)).into_response())
}

/// List the holds (active ones; `?all=true` adds released ones).
#[utoipa::path(
    get,
    path = "/v1/holds",
    tag = "holds",
    params(HoldQuery),
    responses(
        (status = 200, description = "The holds visible to this key, newest first", body = HoldList),
        (status = 400, description = "Malformed query", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Permission missing", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn list_holds(
    caller: Caller,
    axum::extract::State(state): axum::extract::State<ApiState>,
    super::ApiQuery(q): super::ApiQuery<HoldQuery>,
) -> Result<axum::Json<HoldList>, Problem> {
    caller.require(Permission::Admin)?;
    let client = super::db_client(&state).await?;
    let orgs = caller.scope().to_db();
    let holds = hold::list(&**client, orgs.as_deref(), q.all.unwrap_or(false))
        .await
        .map_err(hold_error)?;
    Ok(axum::Json(HoldList { holds }))
}

/// Query of `GET /v1/holds`.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HoldQuery {
    /// Include released holds.
    pub all: Option<bool>,
}

/// One hold.
#[utoipa::path(
    get,
    path = "/v1/holds/{id}",
    tag = "holds",
    params(("id" = String, Path, description = "The hold id")),
    responses(
        (status = 200, description = "The hold", body = Hold),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Permission missing", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such hold visible to this key", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn get_hold(
    caller: Caller,
    axum::extract::State(state): axum::extract::State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<Hold>, Problem> {
    caller.require(Permission::Admin)?;
    let (_, h) = visible_hold(&state, &caller, &id).await?;
    Ok(axum::Json(h))
}

/// The hold `id` as the caller's key may see it (404 alike for a hold
/// outside its organisations and one that does not exist), with the
/// connection it was read on.
async fn visible_hold(
    state: &ApiState,
    caller: &Caller,
    id: &str,
) -> Result<(deadpool_postgres::Object, Hold), Problem> {
    if crate::jobs::gdpr::check_text("id", id).is_err() {
        // No stored hold can have such an id.
        return Err(Problem::not_found("hold"));
    }
    let client = super::db_client(state).await?;
    let orgs = caller.scope().to_db();
    let h = hold::get(&**client, id, orgs.as_deref())
        .await
        .map_err(hold_error)?
        .ok_or_else(|| Problem::not_found("hold"))?;
    Ok((client, h))
}

/// Release a hold.
///
/// The hold stays listed (`?all=true`) as the record that it stood;
/// releasing a released hold changes nothing.
#[utoipa::path(
    post,
    path = "/v1/holds/{id}/release",
    tag = "holds",
    params(("id" = String, Path, description = "The hold id")),
    responses(
        (status = 200, description = "The released hold", body = Hold),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Permission missing", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such hold visible to this key", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn release_hold(
    caller: Caller,
    axum::extract::State(state): axum::extract::State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<Hold>, Problem> {
    caller.require(Permission::Admin)?;
    let (client, visible) = visible_hold(&state, &caller, &id).await?;
    if !visible.active() {
        return Ok(axum::Json(visible));
    }
    let pseudonyms = state.gdpr.eraser.as_ref().map(|e| &e.pseudonyms);
    let h = hold::release(&**client, &id, &caller.0.id, pseudonyms)
        .await
        .map_err(hold_error)?
        .ok_or_else(|| Problem::not_found("hold"))?;
    record(&state, &h, &caller.0.id).await;
    Ok(axum::Json(h))
}
