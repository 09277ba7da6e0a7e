//! Runs report jobs: lease, stream the period, write the files, announce.
//!
//! A job moves `queued → running → completed`, then is announced:
//! - **running**: one pass over the period's rows in (event_time, id) order
//!   through a server-side portal (pages of `page_rows`) inside one
//!   REPEATABLE READ read-only transaction, so the report sees one
//!   consistent state. Rows feed the kind's aggregator; the HIPAA detail
//!   rows go straight on to the CSV upload. Then the JSON and HTML files
//!   and a manifest (names, sizes, SHA-256 of every file) are written.
//! - **completed**: the `audit.report.created` event (carrying the
//!   manifest's and each file's SHA-256) is added to the worker's event
//!   stream and the requester notified; only then is the job marked
//!   notified, so both happen at least once. The event's id and time come
//!   from the job, so a repeat is absorbed by its idempotency key.
//!
//! A failed attempt starts over (one pass is the unit of work).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::compute::{
    gdpr_csv_records, hipaa_csv_record, GdprAggregator, HipaaAggregator, HipaaSettings, Recipient,
    ReportRow, GDPR_CSV_COLUMNS, HIPAA_CSV_COLUMNS,
};
use super::hours::WorkingHours;
use super::integrity;
use super::render::{self, ReportBody, ReportDocument};
use super::request::{OutputFormat, ReportKind, ReportRequest};
use super::store::{self, Completion, ReportJob};
use crate::config::{Config, ReportConfig};
use crate::integrity::checkpoint::NoteVerifier;
use crate::jobs::export::link::{self, LinkSigner};
use crate::jobs::internal_event::{EventRecorder, InternalEvent};
use crate::storage::Storage;

/// Upload chunk size of the CSV (S3's minimum part size).
const UPLOAD_CHUNK: usize = 5 * 1024 * 1024;
/// Most recipients listed in a GDPR report.
const MAX_RECIPIENTS: i64 = 1000;

/// How much a report holds and reads at a time: `[report]` limits that
/// apply live (read from the configuration in force for each job).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportLimits {
    /// Principals, resources, ... listed per "top" table.
    pub top_n: usize,
    /// Distinct values counted exactly per table (space-saving beyond).
    pub counter_capacity: usize,
    /// Rows per database page.
    pub page_rows: u32,
}

impl ReportLimits {
    /// The limits `[report]` sets.
    pub fn from_config(c: &ReportConfig) -> Self {
        Self {
            top_n: c.top_n,
            counter_capacity: c.counter_capacity,
            page_rows: c.page_rows,
        }
    }
}

/// Executor settings, from `[report]` (and the export link settings).
#[derive(Debug, Clone)]
pub struct Settings {
    pub hipaa: HipaaSettings,
    pub page_rows: u32,
    pub poll_interval: Duration,
    pub lease_secs: u64,
    pub max_attempts: i32,
    pub retry_delay_secs: u64,
    pub download_expiry_secs: u64,
    pub prefix: String,
    pub public_base_url: String,
    /// Snapshot origin and page size, for the integrity report.
    pub origin: String,
    pub verify_page: i32,
}

impl Settings {
    /// Reads the settings; fails on working hours that do not parse.
    pub fn from_config(config: &Config) -> Result<Self, String> {
        let c: &ReportConfig = &config.report;
        Ok(Self {
            hipaa: HipaaSettings {
                hours: WorkingHours::from_config(c)?,
                break_glass_actions: c.break_glass_actions.clone(),
                top_n: c.top_n,
                capacity: c.counter_capacity,
            },
            page_rows: c.page_rows,
            poll_interval: Duration::from_millis(c.poll_interval_ms),
            lease_secs: c.lease_secs,
            max_attempts: c.max_attempts,
            retry_delay_secs: c.retry_delay_secs,
            download_expiry_secs: c.download_expiry_secs,
            prefix: c.prefix.clone(),
            public_base_url: config.export.public_base_url.clone(),
            origin: config.snapshot.origin.clone(),
            verify_page: config.snapshot.page_size,
        })
    }
}

/// Everything a report needs to run.
pub struct Reporter {
    pub pool: deadpool_postgres::Pool,
    pub storage: Storage,
    pub settings: Settings,
    /// `None`: a CLI run that could not reach Redis (no audit event).
    pub announcer: Option<EventRecorder>,
    pub links: Option<LinkSigner>,
    /// `None`: no verifier key configured (integrity reports fail, saying so).
    pub verifier: Option<NoteVerifier>,
    pub worker_name: String,
    pub wake: Arc<Notify>,
    pub metrics: Option<crate::telemetry::Metrics>,
    /// The worker's configuration in force, whose limits apply to each new
    /// job (`None`: the limits in `settings`, e.g. a CLI report).
    pub live: Option<crate::live::LiveConfig>,
}

/// A file written for a report.
#[derive(Debug, Clone)]
struct Written {
    format: OutputFormat,
    key: String,
    size: u64,
    sha256: String,
}

impl Reporter {
    /// The limits in force now.
    pub fn limits(&self) -> ReportLimits {
        match &self.live {
            Some(live) => ReportLimits::from_config(&live.current().config.report),
            None => ReportLimits {
                top_n: self.settings.hipaa.top_n,
                counter_capacity: self.settings.hipaa.capacity,
                page_rows: self.settings.page_rows,
            },
        }
    }

    fn lease_token(&self) -> String {
        format!("{}/{}", self.worker_name, uuid::Uuid::new_v4())
    }

    /// Claims and runs queue jobs one at a time until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut outage = crate::outage::OutageLog::new("cannot claim report jobs");
        loop {
            let claimed = self.claim_next().await;
            if claimed.is_ok() {
                outage.recovered();
            }
            match claimed {
                Ok(Some(job)) => {
                    let _ = self.run_claimed(job, None, shutdown.clone()).await;
                    continue;
                }
                Ok(None) => {}
                Err(e) => outage.failed(&e),
            }
            tokio::select! {
                _ = tokio::time::sleep(self.settings.poll_interval) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.cancelled() => break,
            }
        }
    }

    async fn claim_next(&self) -> Result<Option<ReportJob>, String> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| crate::db::pool_error_cause(&e))?;
        let token = self.lease_token();
        match store::claim_next(&**client, &token, self.settings.lease_secs).await {
            Ok(None) => Ok(None),
            Ok(Some(Ok(job))) => Ok(Some(job)),
            Ok(Some(Err((id, why)))) => {
                tracing::error!(job = %id, %why, "report job unreadable; failing it");
                client
                    .execute(
                        "UPDATE report_jobs SET status = 'failed', last_error = $2, leased_by = NULL, \
                         lease_expires_at = NULL WHERE id = $1",
                        &[&id, &why],
                    )
                    .await
                    .map_err(|e| crate::db::root_cause(&e))?;
                Ok(None)
            }
            Err(e) => Err(crate::db::root_cause(&e)),
        }
    }

    /// Runs one leased job to its end (or its lease's loss, shutdown, or a
    /// failed attempt); returns the error that stopped it, if any.
    pub async fn run_claimed(
        &self,
        job: ReportJob,
        progress: Option<Arc<AtomicU64>>,
        shutdown: CancellationToken,
    ) -> Option<String> {
        let lost = CancellationToken::new();
        let keeper = tokio::spawn(keep_lease(
            self.pool.clone(),
            job.clone(),
            self.settings.lease_secs,
            lost.clone(),
        ));
        let started = std::time::Instant::now();
        let span = crate::tracing_ctx::job_span("report", &job.id, &job.source);
        let drive = tracing::Instrument::instrument(self.drive(job.clone(), progress), span);
        let result = tokio::select! {
            r = drive => r,
            _ = lost.cancelled() => Err("the job's lease was lost (another worker took it)".to_owned()),
            _ = shutdown.cancelled() => Err("stopped by shutdown".to_owned()),
        };
        keeper.abort();
        match result {
            Ok((rows, bytes)) => {
                if let Some(m) = &self.metrics {
                    m.job_finished("report", true, rows, bytes, started.elapsed());
                }
                None
            }
            Err(e) => {
                let failed = async {
                    let client = self.pool.get().await.map_err(|e| e.to_string())?;
                    if shutdown.is_cancelled() {
                        store::release(&**client, &job)
                            .await
                            .map_err(|e| e.to_string())?;
                        return Ok(false);
                    }
                    store::after_failure(
                        &**client,
                        &job,
                        &e,
                        self.settings.retry_delay_secs,
                        self.settings.max_attempts,
                    )
                    .await
                    .map_err(|e| e.to_string())
                }
                .await;
                match failed {
                    Ok(true) => {
                        tracing::error!(job = %job.id, error = %e, "report failed for good");
                        if let Some(m) = &self.metrics {
                            m.job_finished("report", false, 0, 0, started.elapsed());
                        }
                        self.notify_failed(&job, &e).await;
                    }
                    Ok(false) => {
                        tracing::warn!(job = %job.id, error = %e, attempt = job.attempts, "report attempt stopped; it is tried again")
                    }
                    Err(e2) => {
                        tracing::warn!(job = %job.id, error = %e, cause = %e2, "could not record the report's failure; its lease will expire")
                    }
                }
                Some(e)
            }
        }
    }

    /// Computes (unless already completed) and announces a job; returns
    /// rows scanned and bytes written.
    async fn drive(
        &self,
        mut job: ReportJob,
        progress: Option<Arc<AtomicU64>>,
    ) -> Result<(u64, u64), String> {
        let mut bytes = 0;
        if job.status != "completed" {
            let completion = self.compute(&job, progress.as_deref()).await?;
            let client = self.pool.get().await.map_err(|e| e.to_string())?;
            if !store::complete(&**client, &job, &completion)
                .await
                .map_err(|e| crate::db::root_cause(&e))?
            {
                return Err("the job's lease was lost before it completed".into());
            }
            bytes = completion
                .artifacts
                .as_object()
                .map(|m| m.values().filter_map(|a| a["sizeBytes"].as_u64()).sum())
                .unwrap_or(0);
            job = store::get_job(&**client, &job.id)
                .await
                .map_err(|e| crate::db::root_cause(&e))?
                .map(|mut j| {
                    j.lease = job.lease.clone();
                    j
                })
                .ok_or("the job vanished")?;
        }
        self.announce(&job).await?;
        Ok((job.rows_scanned.unwrap_or_default().max(0) as u64, bytes))
    }

    /// Streams the period and writes every file and the manifest.
    async fn compute(
        &self,
        job: &ReportJob,
        progress: Option<&AtomicU64>,
    ) -> Result<Completion, String> {
        let request = &job.request;
        let base = request.base_name(&job.id);
        let key_of = |f: OutputFormat| format!("{}/{base}.{}", job.artifact_prefix, f.as_str());
        let mut written: Vec<Written> = Vec::new();
        let mut obj = self.pool.get().await.map_err(|e| e.to_string())?;
        let client: &mut tokio_postgres::Client = &mut obj;
        let want_csv = request.formats.contains(&OutputFormat::Csv);
        let limits = self.limits();
        let (body, rows) = match request.kind {
            ReportKind::HipaaAuditTrail => {
                let mut agg = HipaaAggregator::new(HipaaSettings {
                    top_n: limits.top_n,
                    capacity: limits.counter_capacity,
                    ..self.settings.hipaa.clone()
                });
                let mut csv = if want_csv {
                    Some(
                        CsvUpload::start(
                            &self.storage,
                            &key_of(OutputFormat::Csv),
                            &HIPAA_CSV_COLUMNS,
                        )
                        .await?,
                    )
                } else {
                    None
                };
                let breaks = self.settings.hipaa.break_glass_actions.clone();
                let rows = stream_rows(
                    client,
                    request,
                    Some(&breaks),
                    limits.page_rows,
                    progress,
                    |page| {
                        let mut out = Vec::new();
                        for row in page {
                            if let Some(flags) = agg.add(row) {
                                if want_csv {
                                    out.push(hipaa_csv_record(row, flags));
                                }
                            }
                        }
                        out
                    },
                    &mut csv,
                )
                .await;
                let rows = match rows {
                    Ok(r) => r,
                    Err(e) => {
                        if let Some(c) = csv {
                            c.abort().await;
                        }
                        return Err(e);
                    }
                };
                if let Some(c) = csv {
                    written.push(c.finish(OutputFormat::Csv).await?);
                }
                (ReportBody::Hipaa(Box::new(agg.finish())), rows)
            }
            ReportKind::GdprProcessing => {
                let mut agg = GdprAggregator::new(limits.counter_capacity, 50);
                let mut none: Option<CsvUpload> = None;
                let rows = stream_rows(
                    client,
                    request,
                    None,
                    limits.page_rows,
                    progress,
                    |page| {
                        for row in page {
                            agg.add(row);
                        }
                        Vec::<[String; 15]>::new()
                    },
                    &mut none,
                )
                .await?;
                let (recipients, truncated) = recipients(client, request).await?;
                let report = agg.finish(recipients, truncated);
                if want_csv {
                    let mut c = CsvUpload::start(
                        &self.storage,
                        &key_of(OutputFormat::Csv),
                        &GDPR_CSV_COLUMNS,
                    )
                    .await?;
                    c.write_records(&gdpr_csv_records(&report))?;
                    written.push(c.finish(OutputFormat::Csv).await?);
                }
                (ReportBody::Gdpr(Box::new(report)), rows)
            }
            ReportKind::Integrity => {
                let verifier = self.verifier.as_ref().ok_or(
                    "no verifier key: set snapshot.verifier_key (or a signing key) to run integrity reports",
                )?;
                let report = integrity::run(
                    client,
                    verifier,
                    &self.settings.origin,
                    self.settings.verify_page,
                    request,
                )
                .await?;
                if want_csv {
                    let mut c = CsvUpload::start(
                        &self.storage,
                        &key_of(OutputFormat::Csv),
                        &[
                            "kind",
                            "event",
                            "row_id",
                            "event_time",
                            "leaf_index",
                            "snapshot_id",
                            "detail",
                        ],
                    )
                    .await?;
                    let records: Vec<[String; 7]> = report
                        .problems
                        .iter()
                        .map(|f| {
                            [
                                format!("{:?}", f.kind).to_lowercase(),
                                f.event.clone().unwrap_or_default(),
                                f.row_id.map(|v| v.to_string()).unwrap_or_default(),
                                f.event_time
                                    .map(|t| t.to_rfc3339_opts(SecondsFormat::Micros, true))
                                    .unwrap_or_default(),
                                f.leaf_index.map(|v| v.to_string()).unwrap_or_default(),
                                f.snapshot_id.map(|v| v.to_string()).unwrap_or_default(),
                                f.detail.clone(),
                            ]
                        })
                        .collect();
                    c.write_records(&records)?;
                    written.push(c.finish(OutputFormat::Csv).await?);
                }
                let rows = report.events_checked;
                (ReportBody::Integrity(report), rows)
            }
        };
        drop(obj);
        let completed_at =
            DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap_or_else(Utc::now);
        let doc = ReportDocument::new(&job.id, request, completed_at, rows, body);
        if request.formats.contains(&OutputFormat::Json) {
            let bytes = serde_json::to_vec_pretty(&doc).map_err(|e| e.to_string())?;
            written.push(
                self.put(OutputFormat::Json, &key_of(OutputFormat::Json), bytes)
                    .await?,
            );
        }
        if request.formats.contains(&OutputFormat::Html) {
            let bytes = render::html(&doc).into_bytes();
            written.push(
                self.put(OutputFormat::Html, &key_of(OutputFormat::Html), bytes)
                    .await?,
            );
        }
        let mut artifacts = serde_json::Map::new();
        for w in &written {
            artifacts.insert(
                w.format.as_str().into(),
                json!({
                    "key": w.key,
                    "file": w.key.rsplit('/').next().unwrap_or_default(),
                    "contentType": w.format.content_type(),
                    "sizeBytes": w.size,
                    "sha256": w.sha256,
                }),
            );
        }
        let manifest = json!({
            "jobId": job.id,
            "kind": request.kind.as_str(),
            "request": request.canonical_json(),
            "generatedAt": completed_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            "rowsScanned": rows,
            "files": artifacts,
        });
        let manifest_bytes = serde_json::to_vec_pretty(&manifest).map_err(|e| e.to_string())?;
        let manifest_sha256 = hex::encode(Sha256::digest(&manifest_bytes));
        let manifest_key = format!("{}/{base}.manifest.json", job.artifact_prefix);
        self.storage
            .store
            .put(
                &Path::from(manifest_key.as_str()),
                PutPayload::from(manifest_bytes),
            )
            .await
            .map_err(|e| format!("object storage: {e}"))?;
        Ok(Completion {
            artifacts: serde_json::Value::Object(artifacts),
            manifest_key,
            manifest_sha256,
            rows_scanned: rows as i64,
            completed_at,
            expiry_secs: self.settings.download_expiry_secs,
        })
    }

    async fn put(
        &self,
        format: OutputFormat,
        key: &str,
        bytes: Vec<u8>,
    ) -> Result<Written, String> {
        let size = bytes.len() as u64;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        self.storage
            .store
            .put(&Path::from(key), PutPayload::from(bytes))
            .await
            .map_err(|e| format!("object storage: {e}"))?;
        Ok(Written {
            format,
            key: key.to_owned(),
            size,
            sha256,
        })
    }

    /// Signed download links of a completed job's files, by format.
    pub async fn links(&self, job: &ReportJob) -> serde_json::Map<String, serde_json::Value> {
        let mut out = serde_json::Map::new();
        let (Some(artifacts), Some(expires)) = (
            job.artifacts.as_ref().and_then(|a| a.as_object()),
            job.expires_at,
        ) else {
            return out;
        };
        for (format, a) in artifacts {
            let key = a["key"].as_str().unwrap_or_default();
            let path = format!("/reports/{}/{format}", job.id);
            let signed = signed_id(&job.id, format);
            if let Ok(Some(l)) = link::download_link_at(
                &self.storage,
                self.links.as_ref(),
                &self.settings.public_base_url,
                &path,
                &signed,
                key,
                expires,
            )
            .await
            {
                out.insert(format.clone(), json!(l));
            }
        }
        out
    }

    /// Sends the audit event and the notification, then marks the job.
    async fn announce(&self, job: &ReportJob) -> Result<(), String> {
        if let Some(a) = &self.announcer {
            a.add_event(&created_event(job).to_json(&a.keys.ring()))
                .await
                .map_err(|e| format!("redis: {e}"))?;
            let links = self.links(job).await;
            a.notify(
                "report.ready",
                &job.id,
                &job.request.requester_id,
                &[
                    ("kind", job.request.kind.as_str().to_owned()),
                    (
                        "manifestSha256",
                        job.manifest_sha256.clone().unwrap_or_default(),
                    ),
                    (
                        "downloadLinks",
                        serde_json::Value::Object(links).to_string(),
                    ),
                ],
            )
            .await
            .map_err(|e| format!("redis: {e}"))?;
        } else {
            tracing::warn!(job = %job.id, "Redis unreachable: the report is not recorded as an audit event");
        }
        let client = self.pool.get().await.map_err(|e| e.to_string())?;
        if !store::mark_notified(&**client, job)
            .await
            .map_err(|e| crate::db::root_cause(&e))?
        {
            return Err("the job's lease was lost before it was announced".into());
        }
        tracing::info!(job = %job.id, kind = job.request.kind.as_str(), manifest_sha256 = job.manifest_sha256.as_deref().unwrap_or(""), "report completed");
        Ok(())
    }

    async fn notify_failed(&self, job: &ReportJob, reason: &str) {
        if let Some(a) = &self.announcer {
            let sent = a
                .notify(
                    "report.failed",
                    &job.id,
                    &job.request.requester_id,
                    &[("reason", reason.to_owned())],
                )
                .await;
            if let Err(e) = sent {
                tracing::warn!(job = %job.id, error = %e, "report failure notification not sent");
            }
        }
    }
}

/// What the download link of a report file signs: `report/<id>/<format>`.
pub fn signed_id(job_id: &str, format: &str) -> String {
    format!("report/{job_id}/{format}")
}

/// The `audit.report.created` event of a completed job: the manifest's and
/// every file's SHA-256 (hashed and signed as every event the worker
/// records about itself).
pub fn created_event(job: &ReportJob) -> InternalEvent {
    let manifest = job.manifest_sha256.as_deref().unwrap_or_default();
    let mut files = Vec::new();
    if let Some(a) = job.artifacts.as_ref().and_then(|a| a.as_object()) {
        for (format, v) in a {
            files.push(format!(
                "{format} sha256 {}",
                v["sha256"].as_str().unwrap_or_default()
            ));
        }
    }
    let outcome = format!(
        "{} report for {} from {} to {}: manifest sha256 {manifest}; {}",
        job.request.kind.as_str(),
        job.request
            .organization_id
            .as_deref()
            .unwrap_or("all organisations"),
        job.request.from.to_rfc3339_opts(SecondsFormat::Secs, true),
        job.request.to.to_rfc3339_opts(SecondsFormat::Secs, true),
        files.join(", ")
    );
    InternalEvent {
        event_id: format!("report-created-{}", job.id),
        time: job.completed_at.unwrap_or(job.created_at),
        action: "audit.report.created".into(),
        principal_id: job.request.requester_id.clone(),
        organization_id: job.request.organization_id.clone(),
        target_type: "ComplianceReport".into(),
        target_id: job.id.clone(),
        outcome,
        details: [
            ("reportKind".to_owned(), json!(job.request.kind.as_str())),
            ("manifestSha256".to_owned(), json!(manifest)),
            ("artifacts".to_owned(), json!(job.artifacts)),
        ]
        .into_iter()
        .collect(),
    }
}

/// The CSV file of a report, streamed into object storage while hashing.
struct CsvUpload {
    upload: WriteMultipart,
    hasher: Sha256,
    size: u64,
    key: String,
}

impl CsvUpload {
    async fn start(storage: &Storage, key: &str, header: &[&str]) -> Result<Self, String> {
        let upload = storage
            .store
            .put_multipart(&Path::from(key))
            .await
            .map_err(|e| format!("object storage: {e}"))?;
        let mut me = Self {
            upload: WriteMultipart::new_with_chunk_size(upload, UPLOAD_CHUNK),
            hasher: Sha256::new(),
            size: 0,
            key: key.to_owned(),
        };
        me.write_records(&[header])?;
        Ok(me)
    }

    fn write_records<R: AsRef<[S]>, S: AsRef<str>>(&mut self, records: &[R]) -> Result<(), String> {
        let mut w = csv::WriterBuilder::new()
            .terminator(csv::Terminator::CRLF)
            .from_writer(Vec::with_capacity(records.len() * 200));
        for r in records {
            w.write_record(r.as_ref().iter().map(|s| s.as_ref()))
                .map_err(|e| e.to_string())?;
        }
        let bytes = w.into_inner().map_err(|e| e.to_string())?;
        self.hasher.update(&bytes);
        self.size += bytes.len() as u64;
        self.upload.write(&bytes);
        Ok(())
    }

    async fn finish(self, format: OutputFormat) -> Result<Written, String> {
        self.upload
            .finish()
            .await
            .map_err(|e| format!("object storage: {e}"))?;
        Ok(Written {
            format,
            key: self.key,
            size: self.size,
            sha256: hex::encode(self.hasher.finalize()),
        })
    }

    async fn abort(self) {
        let _ = self.upload.abort().await;
    }
}

/// The columns [`ReportRow`] is read from.
const ROW_COLUMNS: &str =
    "id, event_time, event_id, action, status, principal_id, organization_id, \
     target_resource_type, target_resource_id, data_classification, retention_policy";

fn report_row(r: &tokio_postgres::Row) -> ReportRow {
    ReportRow {
        id: r.get(0),
        event_time: r.get(1),
        event_id: r.get(2),
        action: r.get(3),
        status: r.get(4),
        principal_id: r.get(5),
        organization_id: r.get(6),
        target_resource_type: r.get(7),
        target_resource_id: r.get(8),
        data_classification: r.get(9),
        retention_policy: r.get(10),
    }
}

/// Streams the period's rows (within the request's organisations) in
/// (event_time, id) order through a portal, `page_rows` at a time, in one
/// REPEATABLE READ read-only transaction. With `hipaa_actions`, only PHI
/// rows and rows with one of those actions are read. `per_page` turns each
/// page into CSV records, which go to `csv` before the next page is read.
/// Returns the rows read.
async fn stream_rows<F, R>(
    client: &mut tokio_postgres::Client,
    request: &ReportRequest,
    hipaa_actions: Option<&Vec<String>>,
    page_rows: u32,
    progress: Option<&AtomicU64>,
    mut per_page: F,
    csv: &mut Option<CsvUpload>,
) -> Result<u64, String>
where
    F: FnMut(&[ReportRow]) -> Vec<R>,
    R: AsRef<[String]>,
{
    let db = |e: tokio_postgres::Error| crate::db::root_cause(&e);
    let tx = crate::db::read_only_snapshot(client).await.map_err(db)?;
    let orgs = request.org_filter();
    let hipaa = if hipaa_actions.is_some() {
        " AND (data_classification = 'PHI' OR action = ANY($4))"
    } else {
        " AND $4::text[] IS NOT NULL"
    };
    let sql = format!(
        "SELECT {ROW_COLUMNS} FROM audit_log WHERE event_time >= $1 AND event_time < $2 \
         AND ($3::text[] IS NULL OR organization_id = ANY($3)){hipaa} ORDER BY event_time, id"
    );
    let statement = tx.prepare(&sql).await.map_err(db)?;
    let empty = Vec::new();
    let actions = hipaa_actions.unwrap_or(&empty);
    let portal = tx
        .bind(&statement, &[&request.from, &request.to, &orgs, actions])
        .await
        .map_err(db)?;
    let mut total = 0u64;
    loop {
        let raw = tx
            .query_portal(&portal, page_rows as i32)
            .await
            .map_err(db)?;
        let got = raw.len();
        let page: Vec<ReportRow> = raw.iter().map(report_row).collect();
        drop(raw);
        let records = per_page(&page);
        if let Some(c) = csv.as_mut() {
            if !records.is_empty() {
                c.write_records(&records)?;
                c.upload
                    .wait_for_capacity(2)
                    .await
                    .map_err(|e| format!("object storage: {e}"))?;
            }
        }
        total += got as u64;
        if let Some(p) = progress {
            p.fetch_add(got as u64, Ordering::Relaxed);
        }
        if got < page_rows as usize {
            break;
        }
    }
    tx.commit().await.map_err(db)?;
    Ok(total)
}

/// The exports and reports completed in the period (the GDPR report's
/// recipients), limited to the request's organisations: an export or
/// report of another organisation is not listed; one of all
/// organisations is (it disclosed these organisations' data too).
async fn recipients(
    client: &tokio_postgres::Client,
    request: &ReportRequest,
) -> Result<(Vec<Recipient>, bool), String> {
    let orgs = request.org_filter();
    let rows = client
        .query(
            "SELECT channel, id, requester_id, what, row_count, completed_at FROM ( \
               SELECT 'export' AS channel, id, requester_id, \
                 format || ' export of ' || coalesce(filters->>'organizationId', 'all organisations') \
                   || ' from ' || (filters->>'from') || ' to ' || (filters->>'to') AS what, \
                 row_count, completed_at, filters->>'organizationId' AS org \
               FROM export_jobs WHERE status IN ('completed', 'expired') AND completed_at IS NOT NULL \
               UNION ALL \
               SELECT 'report', id, requester_id, \
                 kind || ' report of ' || coalesce(organization_id, 'all organisations') \
                   || ' from ' || period_from::text || ' to ' || period_to::text, \
                 rows_scanned, completed_at, organization_id \
               FROM report_jobs WHERE status = 'completed' \
             ) r WHERE completed_at >= $1 AND completed_at < $2 \
               AND ($3::text[] IS NULL OR org IS NULL OR org = ANY($3)) \
             ORDER BY completed_at, id LIMIT $4",
            &[&request.from, &request.to, &orgs, &(MAX_RECIPIENTS + 1)],
        )
        .await
        .map_err(|e| crate::db::root_cause(&e))?;
    let truncated = rows.len() as i64 > MAX_RECIPIENTS;
    let list = rows
        .iter()
        .take(MAX_RECIPIENTS as usize)
        .map(|r| Recipient {
            channel: r.get(0),
            job_id: r.get(1),
            requester_id: r.get(2),
            what: r.get(3),
            rows: r.get(4),
            at: r
                .get::<_, DateTime<Utc>>(5)
                .to_rfc3339_opts(SecondsFormat::Millis, true),
        })
        .collect();
    Ok((list, truncated))
}

/// Renews the lease every third of its length; cancels `lost` when it was
/// taken away or could not be renewed in time.
async fn keep_lease(
    pool: deadpool_postgres::Pool,
    job: ReportJob,
    lease_secs: u64,
    lost: CancellationToken,
) {
    let every = Duration::from_millis((lease_secs * 1000 / 3).max(100));
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(every).await;
        let renewed = async {
            let client = pool
                .get()
                .await
                .map_err(|e| crate::db::pool_error_cause(&e))?;
            store::renew(&**client, &job, lease_secs)
                .await
                .map_err(|e| crate::db::root_cause(&e))
        }
        .await;
        match renewed {
            Ok(true) => last_ok = tokio::time::Instant::now(),
            Ok(false) => {
                lost.cancel();
                return;
            }
            Err(e) => {
                tracing::warn!(job = %job.id, error = %e, "cannot renew the report lease");
                if last_ok.elapsed() >= Duration::from_secs(lease_secs) {
                    lost.cancel();
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_created_event_passes_the_workers_own_validation_and_names_every_digest() {
        let request = ReportRequest::parse(
            br#"{"kind":"hipaa-audit-trail","organizationId":"org-1","from":"2024-03-01","to":"2024-04-01","requesterId":"officer"}"#,
        )
        .unwrap();
        let now = DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap();
        let job = ReportJob {
            id: "job-1".into(),
            request,
            status: "completed".into(),
            artifact_prefix: "reports/job-1".into(),
            attempts: 1,
            last_error: None,
            artifacts: Some(json!({"csv": {"sha256": "aa"}, "html": {"sha256": "bb"}})),
            manifest_key: Some("reports/job-1/m.json".into()),
            manifest_sha256: Some("cc".into()),
            rows_scanned: Some(3),
            created_at: now,
            completed_at: Some(now),
            expires_at: None,
            notified: false,
            lease: "l".into(),
            source: "stream:s:1-0".into(),
        };
        let event = created_event(&job).to_json(&Default::default());
        let decoded = crate::event::decode_event(
            event.to_string().as_bytes(),
            &crate::event::ValidationPolicy::default(),
            Utc::now(),
        )
        .expect("a valid event");
        assert_eq!(decoded.action, "audit.report.created");
        assert_eq!(event["eventId"], "report-created-job-1");
        assert_eq!(event["organizationId"], "org-1");
        let outcome = event["outcomeDescription"].as_str().unwrap();
        for needle in ["manifest sha256 cc", "csv sha256 aa", "html sha256 bb"] {
            assert!(outcome.contains(needle), "{outcome}");
        }
        // The same job gives the same event: a repeat is a duplicate.
        assert_eq!(event, created_event(&job).to_json(&Default::default()));
    }
}
