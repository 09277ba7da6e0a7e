//! RFC 9457 problem documents: every error of the API, including the ones
//! axum's extractors and router produce, is `application/problem+json`
//! with a stable `type` URI.
//!
//! Type URIs are URNs, `urn:audit-worker:problem:<slug>`: stable
//! identifiers that nobody can mistake for a page to fetch. The slugs are
//! listed in [`Kind`] and in the README.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Media type of problem documents.
pub const CONTENT_TYPE: &str = "application/problem+json";

/// The problem types the API answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// 401: no key, an unknown key or a revoked one.
    Unauthorized,
    /// 403: the key lacks the permission, or asks for an organisation
    /// outside its scope.
    Forbidden,
    /// 404: no such resource (or one outside the key's scope).
    NotFound,
    /// 405: the path exists but not with this method.
    MethodNotAllowed,
    /// 409: the request conflicts with the resource's state.
    Conflict,
    /// 409: an identical export is already in progress.
    DuplicateExport,
    /// 409: an identical report is already in progress.
    DuplicateReport,
    /// 409: the event is stored but not sealed into the log yet.
    NotSealed,
    /// 409: a legal hold covers the rows an erasure would change.
    LegalHold,
    /// 410: the export's file has expired and was removed.
    Gone,
    /// 413: the request body is too large.
    PayloadTooLarge,
    /// 415: the body is not JSON.
    UnsupportedMediaType,
    /// 400 / 422: the request is malformed or its values are invalid.
    InvalidRequest,
    /// 503: the database or object store is unavailable.
    Unavailable,
    /// 500: a fault of the service.
    Internal,
}

impl Kind {
    /// The slug of the type URI.
    pub fn slug(self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not-found",
            Self::MethodNotAllowed => "method-not-allowed",
            Self::Conflict => "conflict",
            Self::DuplicateExport => "duplicate-export",
            Self::DuplicateReport => "duplicate-report",
            Self::NotSealed => "not-sealed",
            Self::LegalHold => "legal-hold",
            Self::Gone => "gone",
            Self::PayloadTooLarge => "payload-too-large",
            Self::UnsupportedMediaType => "unsupported-media-type",
            Self::InvalidRequest => "invalid-request",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }

    /// The short human title (the same for every occurrence of the type).
    pub fn title(self) -> &'static str {
        match self {
            Self::Unauthorized => "Missing or invalid API key",
            Self::Forbidden => "Not allowed for this API key",
            Self::NotFound => "Not found",
            Self::MethodNotAllowed => "Method not allowed",
            Self::Conflict => "Conflict with the resource's state",
            Self::DuplicateExport => "An identical export is in progress",
            Self::DuplicateReport => "An identical report is in progress",
            Self::NotSealed => "Event not sealed yet",
            Self::LegalHold => "Refused under a legal hold",
            Self::Gone => "Gone",
            Self::PayloadTooLarge => "Request body too large",
            Self::UnsupportedMediaType => "Unsupported media type",
            Self::InvalidRequest => "Invalid request",
            Self::Unavailable => "Service unavailable",
            Self::Internal => "Internal error",
        }
    }

    /// The kind for a bare status code (the safety net for responses that
    /// did not come with a problem document).
    pub fn for_status(status: StatusCode) -> Self {
        match status.as_u16() {
            401 => Self::Unauthorized,
            403 => Self::Forbidden,
            404 => Self::NotFound,
            405 => Self::MethodNotAllowed,
            409 => Self::Conflict,
            410 => Self::Gone,
            413 => Self::PayloadTooLarge,
            415 => Self::UnsupportedMediaType,
            400..=499 => Self::InvalidRequest,
            503 => Self::Unavailable,
            _ => Self::Internal,
        }
    }
}

/// A problem document (RFC 9457), with an optional `jobId` extension
/// member (the existing job of a duplicate export or report).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = Problem)]
pub struct Problem {
    /// `urn:audit-worker:problem:<slug>`.
    #[serde(rename = "type")]
    pub type_uri: String,
    pub title: String,
    pub status: u16,
    /// What went wrong and what to do about it.
    pub detail: String,
    /// The existing job (duplicate-export and duplicate-report only).
    #[serde(rename = "jobId", skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// The legal hold that refused the request (legal-hold only).
    /// (A boxed str keeps the problem small: it is the error of every
    /// handler.)
    #[serde(rename = "holdId", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub hold_id: Option<Box<str>>,
}

impl Problem {
    /// A problem of `kind` with HTTP status `status`.
    pub fn new(kind: Kind, status: StatusCode, detail: impl Into<String>) -> Self {
        Self {
            type_uri: format!("urn:audit-worker:problem:{}", kind.slug()),
            title: kind.title().to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            job_id: None,
            hold_id: None,
        }
    }

    /// 401 with the reason.
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(Kind::Unauthorized, StatusCode::UNAUTHORIZED, detail)
    }

    /// 403 with the reason.
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(Kind::Forbidden, StatusCode::FORBIDDEN, detail)
    }

    /// 404, worded the same whether the resource does not exist or lies
    /// outside the key's scope.
    pub fn not_found(what: &str) -> Self {
        Self::new(
            Kind::NotFound,
            StatusCode::NOT_FOUND,
            format!("no {what} with this id is visible to this API key"),
        )
    }

    /// 422 with what to fix.
    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::new(
            Kind::InvalidRequest,
            StatusCode::UNPROCESSABLE_ENTITY,
            detail,
        )
    }

    /// 503; the cause is logged, not shown.
    pub fn unavailable(cause: &str) -> Self {
        tracing::warn!(error = %cause, "API request failed: backend unavailable");
        Self::new(
            Kind::Unavailable,
            StatusCode::SERVICE_UNAVAILABLE,
            "the database or object store is unavailable: try again shortly",
        )
    }

    /// 500; the cause is logged, not shown.
    pub fn internal(cause: &str) -> Self {
        tracing::error!(error = %cause, "API request failed");
        Self::new(
            Kind::Internal,
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error: the service logged the cause",
        )
    }

    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"audit-worker\""),
            );
        }
        response
    }
}

/// The problem for a rejection status and its message: 400/422 become
/// invalid-request with the extractor's explanation, others their kind.
fn from_rejection(status: StatusCode, text: String) -> Problem {
    Problem::new(Kind::for_status(status), status, text)
}

impl From<JsonRejection> for Problem {
    fn from(r: JsonRejection) -> Self {
        let status = r.status();
        let text = match status {
            StatusCode::PAYLOAD_TOO_LARGE => {
                "the request body is larger than api.max_body_bytes allows: narrow the request"
                    .to_owned()
            }
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                "send the body as JSON with Content-Type: application/json".to_owned()
            }
            _ => format!(
                "{}: fix the JSON body (see /v1/openapi.json)",
                r.body_text()
            ),
        };
        from_rejection(status, text)
    }
}

impl From<PathRejection> for Problem {
    fn from(r: PathRejection) -> Self {
        from_rejection(r.status(), r.body_text())
    }
}

impl From<QueryRejection> for Problem {
    fn from(r: QueryRejection) -> Self {
        from_rejection(
            r.status(),
            format!(
                "{}: fix the query string (see /v1/openapi.json)",
                r.body_text()
            ),
        )
    }
}

/// Middleware: any error response that is not a problem document yet (the
/// router's 404 and 405, a body-limit 413) becomes one, so clients only
/// ever parse one error format.
pub async fn ensure_problem(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == CONTENT_TYPE.as_bytes());
    if (status.is_client_error() || status.is_server_error()) && !is_problem {
        let detail = match status {
            StatusCode::NOT_FOUND => "no such endpoint: see /v1/openapi.json".to_owned(),
            StatusCode::METHOD_NOT_ALLOWED => {
                "this endpoint does not take this method: see /v1/openapi.json".to_owned()
            }
            StatusCode::PAYLOAD_TOO_LARGE => {
                "the request body is larger than api.max_body_bytes allows".to_owned()
            }
            s => s.canonical_reason().unwrap_or("error").to_owned(),
        };
        let allow = response.headers().get(header::ALLOW).cloned();
        let mut problem = Problem::new(Kind::for_status(status), status, detail).into_response();
        if let Some(allow) = allow {
            problem.headers_mut().insert(header::ALLOW, allow);
        }
        return problem;
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_serialise_with_stable_types_and_the_extension_only_when_set() {
        let p = Problem::not_found("export");
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["type"], "urn:audit-worker:problem:not-found");
        assert_eq!(v["status"], 404);
        assert_eq!(v["title"], "Not found");
        assert!(v.get("jobId").is_none());
        let mut d = Problem::new(Kind::DuplicateExport, StatusCode::CONFLICT, "x");
        d.job_id = Some("j1".into());
        assert_eq!(serde_json::to_value(&d).unwrap()["jobId"], "j1");
        assert_eq!(
            Kind::for_status(StatusCode::IM_A_TEAPOT),
            Kind::InvalidRequest
        );
        assert_eq!(Kind::for_status(StatusCode::BAD_GATEWAY), Kind::Internal);
    }

    #[test]
    fn unauthorized_answers_carry_a_bearer_challenge() {
        let r = Problem::unauthorized("no key").into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
        assert!(r.headers()[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .starts_with("Bearer"));
    }
}
