//! The compliance HTTP API, `/v1` (README, "HTTP API"), on its own listener
//! (`api.listen`), apart from the operators' health and metrics port.
//!
//! One module per resource ([`exports`], [`reports`], [`proofs`],
//! [`checkpoints`], [`gdpr_access`]), each
//! with a `routes()` that returns its handlers with their OpenAPI
//! descriptions; [`router`] merges them, so adding a resource is a new
//! module and one `.merge(...)` line. The OpenAPI document
//! (`/v1/openapi.json`) is generated from the handlers' annotations.
//!
//! Every request is authenticated ([`auth::Caller`]); every error is an
//! RFC 9457 problem document ([`problem`]).

pub mod auth;
pub mod checkpoints;
pub mod cli;
pub mod exports;
pub mod gdpr;
pub mod gdpr_access;
pub mod holds;
pub mod keys;
pub mod metrics;
pub mod problem;
pub mod proofs;
pub mod reports;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;
use utoipa::openapi::security::{HttpAuthScheme, SecurityScheme};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::config::Config;
use crate::jobs::export::download::Downloads;
use crate::jobs::export::ExportHandler;
use crate::jobs::report::ReportHandler;
use problem::Problem;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The general pool (keys, jobs, the log).
    pub pool: deadpool_postgres::Pool,
    /// Bootstrap keys from `api.keys_file`.
    pub file_keys: Arc<Vec<keys::FileKey>>,
    /// Records export jobs (and wakes the executor).
    pub exports: Arc<ExportHandler>,
    /// Records report jobs (and wakes the report executor).
    pub reports: Arc<ReportHandler>,
    /// Streams artifacts (exports' and reports').
    pub downloads: Downloads,
    /// Page sizes of lists.
    pub pages: Pages,
    /// `gdpr.subject_paths`, fixed into each subject access job.
    pub subject_paths: Arc<Vec<String>>,
    /// Request and refused-credential counters.
    pub metrics: metrics::ApiMetrics,
    /// Erasure and the audit events of hold changes.
    pub gdpr: GdprParts,
}

/// What the GDPR and hold endpoints need besides the pool.
#[derive(Clone, Default)]
pub struct GdprParts {
    /// `None` when `gdpr.pseudonym_key` is not set: erasure answers 503.
    pub eraser: Option<Arc<crate::jobs::gdpr::erase::Eraser>>,
    /// Records hold changes as audit events.
    pub recorder: Option<crate::jobs::internal_event::EventRecorder>,
}

impl GdprParts {
    /// Connects to Redis and opens the object store; erasure is left off
    /// (and logged) when no pseudonym key is configured. The audit events
    /// are signed with the key ring `live` holds when they are made.
    pub async fn from_config(
        config: &Config,
        live: &crate::live::LiveConfig,
    ) -> anyhow::Result<Self> {
        let client = crate::source::redis_client(&config.redis)?;
        let redis = crate::source::command_connection(&client, &config.redis).await?;
        let storage = crate::storage::open(&config.storage)?;
        let eraser =
            match crate::jobs::gdpr::erase::Eraser::from_config(config, redis.clone(), storage) {
                Ok(mut e) => {
                    e.recorder = e.recorder.following(live.clone());
                    Some(Arc::new(e))
                }
                Err(e) => {
                    tracing::info!(reason = %e, "GDPR erasure endpoint disabled");
                    None
                }
            };
        Ok(Self {
            eraser,
            recorder: Some(
                crate::jobs::internal_event::EventRecorder::new(config, redis)
                    .following(live.clone()),
            ),
        })
    }
}

/// The largest `?limit=` a request may send (the OpenAPI maximum): up to
/// it, values above `api.max_page_size` are reduced to that; above it, 422.
pub const LIMIT_CAP: u32 = 10_000;

/// Page sizes of list endpoints (`api.default_page_size`, `max_page_size`).
#[derive(Debug, Clone, Copy)]
pub struct Pages {
    pub default: u32,
    pub max: u32,
}

impl Pages {
    /// The page size for a request's `?limit=`: the default when absent,
    /// reduced to the maximum when above it, 422 when 0 or above
    /// [`LIMIT_CAP`].
    pub fn limit(&self, asked: Option<u32>) -> Result<i64, Problem> {
        match asked {
            None => Ok(self.default as i64),
            Some(n) if n == 0 || n > LIMIT_CAP => Err(Problem::invalid(format!(
                "limit must be between 1 and {LIMIT_CAP} (at most {} are returned)",
                self.max
            ))),
            Some(n) => Ok(n.min(self.max) as i64),
        }
    }
}

/// Loads the bootstrap keys named by `api.keys_file` (none when unset).
pub fn load_file_keys(config: &Config) -> anyhow::Result<Vec<keys::FileKey>> {
    if config.api.keys_file.is_empty() {
        return Ok(Vec::new());
    }
    let text = crate::config::read_secret_file(&config.api.keys_file, "api.keys_file")?;
    keys::parse_keys_file(&text).map_err(|e| {
        anyhow::Error::new(crate::startup::ConfigurationError(format!(
            "api.keys_file {}: {e}",
            config.api.keys_file
        )))
    })
}

/// The OpenAPI document's fixed parts; paths come from the handlers.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "audit-worker compliance API",
        description = "Exports of the audit log, compliance reports, inclusion proofs and checkpoints of its verifiable log. Every request needs an API key (Authorization: Bearer awk_...). Errors are RFC 9457 problem documents (application/problem+json) with type URIs urn:audit-worker:problem:<slug>. A resource of an organisation outside the key's scope answers 404, exactly as one that does not exist."
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(Problem))
)]
struct ApiDoc;

/// Adds the bearer security scheme.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                utoipa::openapi::security::HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("awk_<43 base64url characters>")
                    .description(Some("An API key made by `audit-worker api-key create`."))
                    .build(),
            ),
        );
    }
}

/// Every resource's routes, with their OpenAPI descriptions.
fn resources() -> OpenApiRouter<ApiState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(exports::routes())
        .merge(reports::routes())
        .merge(proofs::routes())
        .merge(checkpoints::routes())
        .merge(gdpr_access::routes())
        .merge(gdpr::routes())
        .merge(holds::routes())
}

/// The generated OpenAPI document (3.1).
pub fn openapi() -> utoipa::openapi::OpenApi {
    resources().split_for_parts().1
}

/// The `/v1` router: the resources, `/v1/openapi.json`, the body limit
/// and problem documents for every error.
pub fn router(state: ApiState, max_body_bytes: usize) -> Router {
    let counters = state.metrics.clone();
    let (routes, doc) = resources().split_for_parts();
    let doc = Arc::new(doc);
    routes
        .route(
            "/v1/openapi.json",
            get(move || {
                let doc = doc.clone();
                async move { Json(doc.as_ref().clone()).into_response() }
            }),
        )
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::from_fn(problem::ensure_problem))
        .layer(axum::middleware::from_fn_with_state(
            counters,
            metrics::count,
        ))
        .with_state(state)
}

/// Builds the state from the configuration in force and serves the API on
/// `api.listen` until `shutdown`.
pub async fn serve(
    live: &crate::live::LiveConfig,
    pool: deadpool_postgres::Pool,
    exports: Arc<ExportHandler>,
    reports: Arc<ReportHandler>,
    downloads: Downloads,
    metrics: metrics::ApiMetrics,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let applied = live.current();
    let config = &applied.config;
    let file_keys = load_file_keys(config)?;
    let state = ApiState {
        pool,
        file_keys: Arc::new(file_keys),
        exports,
        reports,
        downloads,
        pages: Pages {
            default: config.api.default_page_size,
            max: config.api.max_page_size,
        },
        subject_paths: Arc::new(config.gdpr.subject_paths.clone()),
        metrics,
        gdpr: GdprParts::from_config(config, live).await?,
    };
    let listen = config.api.listen.clone();
    let listener = tokio::net::TcpListener::bind(&listen).await.map_err(|e| {
        anyhow::Error::new(crate::startup::ConfigurationError(format!(
            "cannot listen on {listen} for the API ({e}): free the port or set AUDIT_WORKER__API__LISTEN"
        )))
    })?;
    tracing::info!(%listen, bootstrap_keys = state.file_keys.len(), "HTTP API listening");
    let app = router(state, config.api.max_body_bytes);
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    }))
}

/// A connection from the general pool, or 503.
pub async fn db_client(state: &ApiState) -> Result<deadpool_postgres::Object, Problem> {
    state
        .pool
        .get()
        .await
        .map_err(|e| Problem::unavailable(&crate::db::pool_error_cause(&e)))
}

/// A JSON body whose rejections are problem documents (400/413/415/422).
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(Problem))]
pub struct ApiJson<T>(pub T);

/// A path parameter whose rejections are problem documents.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(Problem))]
pub struct ApiPath<T>(pub T);

/// A query string whose rejections are problem documents.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(Problem))]
pub struct ApiQuery<T>(pub T);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_is_3_1_with_every_path_and_bearer_security() {
        let doc = serde_json::to_value(openapi()).unwrap();
        assert!(
            doc["openapi"].as_str().unwrap().starts_with("3.1"),
            "{}",
            doc["openapi"]
        );
        for (path, method) in [
            ("/v1/exports", "post"),
            ("/v1/exports", "get"),
            ("/v1/exports/{id}", "get"),
            ("/v1/exports/{id}/cancel", "post"),
            ("/v1/exports/{id}/download", "get"),
            ("/v1/reports", "post"),
            ("/v1/reports", "get"),
            ("/v1/reports/{id}", "get"),
            ("/v1/reports/{id}/download/{format}", "get"),
            ("/v1/proofs/{event}", "get"),
            ("/v1/checkpoints", "get"),
            ("/v1/gdpr/erasures", "post"),
            ("/v1/gdpr/restrictions", "post"),
            ("/v1/gdpr/restrictions", "get"),
            ("/v1/gdpr/restrictions/lift", "post"),
            ("/v1/holds", "post"),
            ("/v1/holds", "get"),
            ("/v1/holds/{id}", "get"),
            ("/v1/holds/{id}/release", "post"),
        ] {
            assert!(
                doc["paths"][path][method].is_object(),
                "{method} {path} missing"
            );
        }
        // A report's JSON file is a JSON document, its CSV and HTML text.
        let files = &doc["paths"]["/v1/reports/{id}/download/{format}"]["get"]["responses"]["200"]
            ["content"];
        assert!(
            files["application/json"]["schema"]["type"].is_null(),
            "{files}"
        );
        assert_eq!(files["text/csv; charset=utf-8"]["schema"]["type"], "string");
        assert_eq!(
            files["text/html; charset=utf-8"]["schema"]["type"],
            "string"
        );
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        assert_eq!(doc["security"][0]["bearer"], serde_json::json!([]));
        assert!(doc["components"]["schemas"]["Problem"].is_object());
    }

    #[test]
    fn page_limits_default_and_refuse_out_of_range() {
        let p = Pages {
            default: 50,
            max: 500,
        };
        assert_eq!(p.limit(None).unwrap(), 50);
        assert_eq!(p.limit(Some(500)).unwrap(), 500);
        assert_eq!(p.limit(Some(0)).unwrap_err().status, 422);
        assert_eq!(p.limit(Some(5000)).unwrap(), 500);
        assert_eq!(p.limit(Some(LIMIT_CAP + 1)).unwrap_err().status, 422);
    }
}
