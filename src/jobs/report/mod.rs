//! Compliance reports (`report.compliance` jobs; README, "Compliance
//! reports"): a HIPAA audit trail, a GDPR record of processing activities
//! and an integrity report of the verifiable log, as JSON, CSV and one
//! self-contained HTML page each.
//!
//! Like exports: a request arrives as a queue message (or from the CLI, or
//! an HTTP handler through [`create_job`]); [`ReportHandler`] validates it
//! ([`request`], pure) and records it in report_jobs, deduplicated
//! ([`store`]); the [`executor`] leases jobs from PostgreSQL, streams the
//! period in constant memory ([`compute`], [`counter`], [`hours`]), renders
//! ([`render`]) and stores the files with a manifest in object storage,
//! records the manifest's SHA-256 as an `audit.report.created` event and
//! notifies the requester with signed download links.

pub mod cli;
pub mod compute;
pub mod counter;
pub mod download;
pub mod executor;
pub mod hours;
pub mod integrity;
pub mod render;
pub mod request;
pub mod store;

use std::sync::Arc;

use crate::source::RedisConn;
use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::dlq::{RejectReason, Rejection};
use crate::jobs::internal_event::EventRecorder;
use crate::jobs::{JobError, JobHandler};
use crate::storage::Storage;
use executor::{Reporter, Settings};
pub use request::ReportRequest;
pub use store::{get_job, Created, Origin, ReportJob};

/// Why [`create_job`] did not record a job.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The request breaks a rule (e.g. an organisation outside the allowed
    /// ones): tell the caller what to fix (HTTP 400/403).
    #[error("{}", .0.message)]
    Invalid(Rejection),
    /// The database could not record it now: try again (HTTP 503).
    #[error("database error: {0}")]
    Db(String),
}

/// Records a report job for `request` (whose `requester_id` and
/// `allowed_orgs` the caller sets from the authenticated key), created by
/// the message or call identified by `source` (e.g. `api:<request id>`).
/// Idempotent for the same `source`, and an identical request of the same
/// requester still in progress returns that job (`created: false`). The
/// entry point for an HTTP handler; [`get_job`] reads a job back.
pub async fn create_job(
    client: &impl tokio_postgres::GenericClient,
    request: &ReportRequest,
    source: &str,
    prefix: &str,
) -> Result<Created, CreateError> {
    request.check_scope().map_err(CreateError::Invalid)?;
    store::record_request(client, request, source, Origin::Queue, prefix)
        .await
        .map_err(|e| CreateError::Db(crate::db::root_cause(&e)))
}

/// Accepts `report.compliance` requests from the stream and BullMQ.
pub struct ReportHandler {
    pool: deadpool_postgres::Pool,
    wake: Arc<Notify>,
    prefix: String,
    /// Organisations queue requests may cover (`report.queue_organizations`;
    /// `None`: all).
    queue_scope: Option<Vec<String>>,
}

impl ReportHandler {
    /// A handler recording into `pool`, waking `wake` (the executor).
    pub fn new(pool: deadpool_postgres::Pool, wake: Arc<Notify>, prefix: String) -> Self {
        Self {
            pool,
            wake,
            prefix,
            queue_scope: None,
        }
    }

    /// Limits queue requests to these organisations (`None`: all).
    pub fn with_queue_scope(mut self, scope: Option<Vec<String>>) -> Self {
        self.queue_scope = scope;
        self
    }

    /// Records an already validated request (the HTTP API's, whose
    /// requester and scope come from the key) and wakes the executor when
    /// it is new.
    pub async fn create(
        &self,
        request: &ReportRequest,
        source: &str,
    ) -> Result<Created, CreateError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| CreateError::Db(crate::db::pool_error_cause(&e)))?;
        let created = create_job(&**client, request, source, &self.prefix).await?;
        if created.created {
            self.wake.notify_one();
        }
        Ok(created)
    }

    /// Records a request; answers `{"jobId", "status", "deduplicated"}`.
    pub async fn record(&self, data: &[u8], source: &str) -> Result<serde_json::Value, JobError> {
        let mut request = ReportRequest::parse(data).map_err(JobError::Rejected)?;
        if let Some(scope) = &self.queue_scope {
            limit_to_queue_scope(&mut request, scope).map_err(|message| {
                JobError::Rejected(Rejection::new(RejectReason::InvalidReportRequest, message))
            })?;
        }
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| JobError::Transient(crate::db::pool_error_cause(&e)))?;
        let created = match create_job(&**client, &request, source, &self.prefix).await {
            Ok(c) => c,
            Err(CreateError::Invalid(r)) => return Err(JobError::Rejected(r)),
            Err(CreateError::Db(e)) => return Err(JobError::Transient(e)),
        };
        if created.created {
            tracing::info!(job = %created.id, %source, requester = %request.requester_id, kind = request.kind.as_str(), "report job recorded");
            self.wake.notify_one();
        }
        Ok(serde_json::json!({
            "jobId": created.id,
            "status": created.status,
            "deduplicated": !created.created,
        }))
    }
}

/// Narrows a queue request to `report.queue_organizations`: its allowed
/// organisations become the scope (or the part of its own
/// `allowedOrganizations` inside it); an organisation outside the scope is
/// an error naming the setting.
fn limit_to_queue_scope(request: &mut ReportRequest, scope: &[String]) -> Result<(), String> {
    let allowed: std::collections::BTreeSet<String> = match request.allowed_orgs.take() {
        None => scope.iter().cloned().collect(),
        Some(own) => own.into_iter().filter(|o| scope.contains(o)).collect(),
    };
    if allowed.is_empty() {
        return Err(
            "allowedOrganizations lies wholly outside report.queue_organizations: queue requests may cover only those"
                .into(),
        );
    }
    request.allowed_orgs = Some(allowed);
    request
        .check_scope()
        .map_err(|r| format!("{}: see report.queue_organizations", r.message))
}

impl JobHandler for ReportHandler {
    fn accept<'a>(
        &'a self,
        data: &'a [u8],
        source: &'a str,
    ) -> BoxFuture<'a, Result<serde_json::Value, JobError>> {
        Box::pin(self.record(data, source))
    }
}

/// Builds the executor for `run` or the CLI: storage given, announcements
/// through `redis` when given.
pub fn reporter(
    config: &Config,
    pool: deadpool_postgres::Pool,
    storage: Storage,
    redis: Option<RedisConn>,
    wake: Arc<Notify>,
) -> anyhow::Result<Reporter> {
    let settings =
        Settings::from_config(config).map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    Ok(Reporter {
        pool,
        storage,
        settings,
        announcer: redis.map(|redis| EventRecorder::new(config, redis)),
        links: crate::jobs::export::link_signer(config)?,
        verifier: crate::jobs::snapshot::load_verifier(&config.snapshot).ok(),
        worker_name: config.consumer_name(),
        wake,
        metrics: None,
        live: None,
    })
}

/// The parts of reports that `app::run` wires in.
pub struct ReportService {
    pub handler: Arc<ReportHandler>,
    pub reporter: Arc<Reporter>,
}

impl ReportService {
    /// Opens storage and builds the handler and executor.
    /// With `live`, each new job runs under the limits in force then.
    pub fn new(
        config: &Config,
        pool: deadpool_postgres::Pool,
        redis: RedisConn,
        metrics: crate::telemetry::Metrics,
        live: Option<crate::live::LiveConfig>,
    ) -> anyhow::Result<Self> {
        let storage = crate::storage::open(&config.storage)?;
        let wake = Arc::new(Notify::new());
        let mut reporter = reporter(config, pool.clone(), storage, Some(redis), wake.clone())?;
        reporter.metrics = Some(metrics);
        if let Some(live) = &live {
            reporter.announcer = reporter.announcer.map(|a| a.following(live.clone()));
        }
        reporter.live = live;
        Ok(Self {
            handler: Arc::new(
                ReportHandler::new(pool, wake, config.report.prefix.clone())
                    .with_queue_scope(config.report.queue_scope()),
            ),
            reporter: Arc::new(reporter),
        })
    }

    /// Starts the executor (when `report.enabled`).
    pub fn spawn(
        &self,
        config: &Config,
        shutdown: CancellationToken,
    ) -> Option<tokio::task::JoinHandle<()>> {
        config
            .report
            .enabled
            .then(|| tokio::spawn(self.reporter.clone().run(shutdown)))
    }
}
