//! Compliance exports (`export.audit` jobs; README, "Exports").
//!
//! A request arrives as a queue message; [`ExportHandler`] validates it and
//! records it in export_jobs (deduplicated), then the message is
//! acknowledged. The [`executor`] leases jobs from PostgreSQL and streams
//! matching audit_log rows into object storage, resumably; the [`sweep`]
//! expires and cleans up; [`download`] serves signed links; [`cli`] runs an
//! export directly from the command line.

pub mod cli;
pub mod download;
pub mod executor;
pub mod format;
pub mod link;
pub mod notify;
pub mod ocsf;
pub mod parquet;
pub mod query;
pub mod record;
pub mod request;
pub mod sweep;

use std::sync::Arc;

use crate::source::RedisConn;
use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ExportConfig};
use crate::jobs::internal_event::EventRecorder;
use crate::jobs::{JobError, JobHandler};
use crate::storage::Storage;
use executor::{Exporter, Settings};
use link::LinkSigner;
use notify::Notifier;
use record::Origin;
use request::ExportRequest;

/// Object keys of a queue job: parts under `exports/<id>/parts/`, the
/// artifact at `exports/<id>/<file name>`.
pub fn queue_layout(request: &ExportRequest) -> impl Fn(&str) -> (String, String) + '_ {
    move |id| {
        (
            format!("exports/{id}/parts"),
            format!("exports/{id}/{}", request.file_name(id)),
        )
    }
}

/// Refuses a request whose `organizationId` filter names an organisation
/// outside `allowed` (`None`: all allowed). Requests without that filter
/// pass: the job's stored scope limits them instead.
pub fn check_scope(request: &ExportRequest, allowed: Option<&[String]>) -> Result<(), String> {
    match (allowed, &request.filters.organization_id) {
        (Some(allowed), Some(org)) if !allowed.iter().any(|a| a == org) => Err(format!(
            "exportFilters.organizationId {org:?} is outside the organisations this requester may export ({})",
            allowed.join(", ")
        )),
        _ => Ok(()),
    }
}

/// Accepts `export.audit` requests: validates them and records the job.
pub struct ExportHandler {
    pool: deadpool_postgres::Pool,
    wake: Arc<Notify>,
    /// Organisations queue requests may cover (`export.queue_organizations`;
    /// `None`: all).
    queue_scope: Option<Vec<String>>,
}

impl ExportHandler {
    /// A handler recording into `pool`, waking `wake` (the executor) on
    /// every new job. Queue requests may cover every organisation until
    /// [`ExportHandler::with_queue_scope`] says otherwise.
    pub fn new(pool: deadpool_postgres::Pool, wake: Arc<Notify>) -> Self {
        Self {
            pool,
            wake,
            queue_scope: None,
        }
    }

    /// Limits queue requests to these organisations (`None`: all).
    pub fn with_queue_scope(mut self, scope: Option<Vec<String>>) -> Self {
        self.queue_scope = scope;
        self
    }

    /// Records a queue request; the JSON answer is `{"jobId", "status",
    /// "deduplicated"}`.
    pub async fn record(&self, data: &[u8], source: &str) -> Result<serde_json::Value, JobError> {
        let request = ExportRequest::parse(data).map_err(JobError::Rejected)?;
        self.record_queue_request(&request, source, |m| {
            crate::dlq::Rejection::new(crate::dlq::RejectReason::InvalidExportRequest, m)
        })
        .await
    }

    /// Records a validated queue request (an export, or a job built on
    /// exports such as `gdpr.access`) within `export.queue_organizations`;
    /// a request outside it is refused with `reject`. The JSON answer is
    /// `{"jobId", "status", "deduplicated"}`.
    pub async fn record_queue_request(
        &self,
        request: &ExportRequest,
        source: &str,
        reject: impl Fn(String) -> crate::dlq::Rejection,
    ) -> Result<serde_json::Value, JobError> {
        check_scope(request, self.queue_scope.as_deref()).map_err(|m| {
            JobError::Rejected(reject(format!("{m}: see export.queue_organizations")))
        })?;
        let recorded = self
            .record_scoped(request, source, self.queue_scope.as_deref())
            .await?;
        Ok(serde_json::json!({
            "jobId": recorded.id,
            "status": recorded.status,
            "deduplicated": !recorded.created,
        }))
    }

    /// Records a validated request with its organisation scope (`None`:
    /// all) and wakes the executor when a job was created. The HTTP API
    /// records through here with the key's scope.
    pub async fn record_scoped(
        &self,
        request: &ExportRequest,
        source: &str,
        allowed: Option<&[String]>,
    ) -> Result<record::Recorded, JobError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| JobError::Transient(crate::db::pool_error_cause(&e)))?;
        let recorded = record::record_request(
            &**client,
            request,
            source,
            Origin::Queue,
            allowed,
            queue_layout(request),
        )
        .await
        .map_err(|e| JobError::Transient(crate::db::root_cause(&e)))?;
        if recorded.created {
            tracing::info!(job = %recorded.id, %source, requester = %request.requester_id, "export job recorded");
            self.wake.notify_one();
        }
        Ok(recorded)
    }
}

impl JobHandler for ExportHandler {
    fn accept<'a>(
        &'a self,
        data: &'a [u8],
        source: &'a str,
    ) -> BoxFuture<'a, Result<serde_json::Value, JobError>> {
        Box::pin(self.record(data, source))
    }
}

/// The link signer from the configuration, if a secret is set.
pub fn link_signer(config: &Config) -> anyhow::Result<Option<LinkSigner>> {
    Ok(config.export_link_secret()?.map(LinkSigner::new))
}

/// Builds the exporter for `run` (or the CLI): storage from `[storage]`,
/// notifications through `redis` when given.
pub fn exporter(
    config: &Config,
    pool: deadpool_postgres::Pool,
    storage: Storage,
    redis: Option<RedisConn>,
    wake: Arc<Notify>,
) -> anyhow::Result<Exporter> {
    Ok(Exporter {
        pool,
        storage,
        settings: Settings::from_config(&config.export).map_err(anyhow::Error::msg)?,
        notifier: redis.map(|redis| Notifier {
            own: EventRecorder::new(config, redis),
        }),
        links: link_signer(config)?,
        worker_name: config.consumer_name(),
        wake,
        metrics: None,
        live: None,
    })
}

/// The parts of exports that `app::run` wires in.
pub struct ExportService {
    pub handler: Arc<ExportHandler>,
    pub exporter: Arc<Exporter>,
    pub downloads: download::Downloads,
}

impl ExportService {
    /// Opens storage and builds the handler, executor and download state.
    /// With `live`, each new part is cut by the limits in force then.
    pub fn new(
        config: &Config,
        pool: deadpool_postgres::Pool,
        redis: RedisConn,
        metrics: crate::telemetry::Metrics,
        live: Option<crate::live::LiveConfig>,
    ) -> anyhow::Result<Self> {
        let storage = crate::storage::open(&config.storage)?;
        let wake = Arc::new(Notify::new());
        let mut exporter = exporter(
            config,
            pool.clone(),
            storage.clone(),
            Some(redis),
            wake.clone(),
        )?;
        exporter.metrics = Some(metrics);
        if let (Some(n), Some(live)) = (exporter.notifier.as_mut(), &live) {
            n.own = n.own.clone().following(live.clone());
        }
        exporter.live = live;
        let exporter = Arc::new(exporter);
        if exporter.links.is_none() && storage.s3.is_none() {
            tracing::warn!("export.link_secret is not set: export notifications carry no download link and downloads are refused");
        }
        Ok(Self {
            handler: Arc::new(
                ExportHandler::new(pool.clone(), wake)
                    .with_queue_scope(config.export.queue_scope()),
            ),
            downloads: download::Downloads {
                pool,
                storage,
                signer: exporter.links.clone(),
            },
            exporter,
        })
    }

    /// Starts the executor and the sweep (when `export.enabled`).
    pub fn spawn(
        &self,
        config: &ExportConfig,
        shutdown: CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        if !config.enabled {
            return Vec::new();
        }
        vec![
            tokio::spawn(self.exporter.clone().run(shutdown.clone())),
            tokio::spawn(sweep::run(
                self.exporter.clone(),
                sweep::SweepSettings {
                    job_expiry_secs: config.job_expiry_secs,
                    interval: std::time::Duration::from_secs(config.sweep_interval_secs),
                },
                shutdown,
            )),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_organisation_filter_outside_the_scope_is_refused_and_none_passes() {
        let parse = |org: &str| {
            ExportRequest::parse(
                format!(r#"{{"exportFilters": {{"from": "2024-03-01", "to": "2024-04-01"{org}}}, "format": "csv", "requesterId": "u"}}"#)
                    .as_bytes(),
            )
            .unwrap()
        };
        let scope = ["org-a".to_string(), "org-b".to_string()];
        assert!(check_scope(&parse(""), Some(&scope)).is_ok());
        assert!(check_scope(&parse(r#", "organizationId": "org-b""#), Some(&scope)).is_ok());
        let e = check_scope(&parse(r#", "organizationId": "org-c""#), Some(&scope)).unwrap_err();
        assert!(
            e.contains("\"org-c\" is outside") && e.contains("org-a, org-b"),
            "{e}"
        );
        assert!(check_scope(&parse(r#", "organizationId": "org-c""#), None).is_ok());
    }
}
