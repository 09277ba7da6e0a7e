//! The API's metrics, rendered with the worker's on the health port:
//! requests by operation and status, and refused credentials by reason.
//! Labels hold route templates and fixed words only, never tokens, ids or
//! anything a client chose.

use axum::extract::MatchedPath;
use axum::response::Response;
use prometheus::{IntCounterVec, Opts};

use crate::telemetry::Metrics;

/// Why a request's credentials were refused.
pub const AUTH_FAILURE_REASONS: [&str; 3] = ["missing", "invalid", "revoked"];

/// Methods counted by name; any other is counted as `OTHER`.
const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// Counters of the API.
#[derive(Clone)]
pub struct ApiMetrics {
    /// `audit_worker_api_requests_total{operation, status}`.
    pub requests: IntCounterVec,
    /// `audit_worker_api_auth_failures_total{reason}`.
    pub auth_failures: IntCounterVec,
}

impl ApiMetrics {
    /// Creates the counters and registers them with the worker's metrics.
    pub fn register(metrics: &Metrics) -> Self {
        let requests = IntCounterVec::new(
            Opts::new(
                "audit_worker_api_requests_total",
                "HTTP API requests, by operation (method and route template, or unmatched) and status code.",
            ),
            &["operation", "status"],
        )
        .expect("valid metric");
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "audit_worker_api_auth_failures_total",
                "HTTP API requests refused with 401, by reason (missing, invalid, revoked).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        // Known label values start at 0, so rate() and alerts on refused
        // requests work from the first scrape: every reason, and every
        // operation's 401 (any request can get one).
        for reason in AUTH_FAILURE_REASONS {
            auth_failures.with_label_values(&[reason]);
        }
        for (path, item) in super::openapi().paths.paths {
            for method in item_methods(&item) {
                requests.with_label_values(&[format!("{method} {path}").as_str(), "401"]);
            }
        }
        // Registered once per worker (app::run); a failure here means a
        // second registration with the same registry, which would count
        // into counters nobody renders: refuse it loudly in debug builds.
        let registered = metrics
            .register(Box::new(requests.clone()))
            .and_then(|()| metrics.register(Box::new(auth_failures.clone())));
        debug_assert!(registered.is_ok(), "API metrics registered twice");
        Self {
            requests,
            auth_failures,
        }
    }

    /// Counts a refused credential.
    pub fn auth_failed(&self, reason: &'static str) {
        self.auth_failures.with_label_values(&[reason]).inc();
    }
}

/// The HTTP methods an OpenAPI path item defines.
fn item_methods(item: &utoipa::openapi::PathItem) -> Vec<&'static str> {
    [
        ("GET", item.get.is_some()),
        ("POST", item.post.is_some()),
        ("PUT", item.put.is_some()),
        ("PATCH", item.patch.is_some()),
        ("DELETE", item.delete.is_some()),
    ]
    .into_iter()
    .filter_map(|(m, present)| present.then_some(m))
    .collect()
}

/// The operation label of a request: `METHOD /route/{template}`, or
/// `unmatched` when no route matched.
pub fn operation(method: &axum::http::Method, path: Option<&MatchedPath>) -> String {
    match path {
        None => "unmatched".into(),
        Some(p) => {
            let m = METHODS
                .iter()
                .find(|m| **m == method.as_str())
                .copied()
                .unwrap_or("OTHER");
            format!("{m} {}", p.as_str())
        }
    }
}

/// Middleware: counts every request by operation and final status.
pub async fn count(
    axum::extract::State(metrics): axum::extract::State<ApiMetrics>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let op = operation(request.method(), request.extensions().get::<MatchedPath>());
    let response = next.run(request).await;
    metrics
        .requests
        .with_label_values(&[op.as_str(), response.status().as_str()])
        .inc();
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_are_route_templates_and_odd_methods_are_other() {
        let m = axum::http::Method::from_bytes(b"BREW").unwrap();
        assert_eq!(operation(&axum::http::Method::GET, None), "unmatched");
        assert_eq!(operation(&m, None), "unmatched");
        let metrics = Metrics::new();
        let api = ApiMetrics::register(&metrics);
        api.auth_failed("revoked");
        let text = metrics.render();
        assert!(
            text.contains("audit_worker_api_auth_failures_total{reason=\"revoked\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("audit_worker_api_auth_failures_total{reason=\"missing\"} 0"),
            "{text}"
        );
    }
}
