//! Runs export jobs: lease, stream rows into parts, compose, notify.
//!
//! A job moves `exporting → uploading → completed`:
//! - **exporting**: rows are read in keyset pages, formatted and compressed
//!   as they stream, and cut into parts of exactly `part_rows` rows. Each
//!   part is one independent compressed member written as its own object
//!   (`<parts_prefix>/000001`, ...); only once it is durably written does
//!   one UPDATE (guarded by the lease) checkpoint the part number, the last
//!   (event_time, id) and the row count. A resumed job continues after the
//!   checkpoint and overwrites any part beyond it, so the output cannot
//!   depend on where a crash happened.
//! - **uploading**: the header member, the parts in order and the trailer
//!   member are streamed into the artifact (a multipart upload), hashing
//!   and counting as they pass; a manifest is written beside it. Re-running
//!   this step after a crash rewrites the same bytes. (Parquet: each part
//!   is a whole Parquet file, and the artifact is composed from their row
//!   groups under one footer; see [`super::parquet`].)
//! - **completed**: parts are deleted, the export is audited and the
//!   requester notified; only then is the job marked notified.
//!
//! Memory is one page of rows plus one upload chunk, whatever the size.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use super::format::{self, ExportRow, Levels, PartEncoder};
use super::link::{self, LinkSigner};
use super::notify::{CompletedExport, Notice, NoticeFields, Notifier};
use super::ocsf::Mapping;
use super::parquet as pq;
use super::query::{Key, PageQuery};
use super::record::{self, Job};
use crate::config::ExportConfig;
use crate::storage::Storage;

/// Upload chunk size: S3's minimum part size, and the bound on buffered
/// output per upload.
const UPLOAD_CHUNK: usize = 5 * 1024 * 1024;
/// Upload chunks in flight at once per object.
const UPLOAD_CONCURRENCY: usize = 2;

/// Why an attempt at a job stopped.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("the job's lease was lost (it expired, or another worker or the sweep took the job)")]
    LeaseLost,
    #[error("stopped by shutdown")]
    Shutdown,
    #[error("database error: {0}")]
    Db(String),
    #[error("object storage error: {0}")]
    Storage(String),
    #[error("formatting or compression error: {0}")]
    Io(String),
    /// A subject access export's inclusion proofs could not be made.
    #[error("cannot prove an exported event: {0}")]
    Proof(String),
}

impl From<tokio_postgres::Error> for ExportError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Db(crate::db::root_cause(&e))
    }
}
impl From<deadpool_postgres::PoolError> for ExportError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Self::Db(crate::db::pool_error_cause(&e))
    }
}
impl From<object_store::Error> for ExportError {
    fn from(e: object_store::Error) -> Self {
        Self::Storage(e.to_string())
    }
}
impl From<std::io::Error> for ExportError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e.to_string())
    }
}

/// How an export is cut: `[export]` limits that apply live (read from
/// the configuration in force for each part).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartLimits {
    /// Rows per part (each part is one compressed member or Parquet file).
    pub part_rows: u64,
    /// Rows per database page.
    pub page_rows: u32,
    /// Rows per Parquet row group.
    pub parquet_row_group_rows: u64,
}

impl PartLimits {
    /// The limits `[export]` sets.
    pub fn from_config(c: &ExportConfig) -> Self {
        Self {
            part_rows: c.part_rows,
            page_rows: c.page_rows,
            parquet_row_group_rows: c.parquet_row_group_rows,
        }
    }
}

/// Executor settings, from `[export]`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The limits at start (see [`Exporter::part_limits`] for those in force).
    pub limits: PartLimits,
    pub concurrency: usize,
    pub poll_interval: Duration,
    pub lease_secs: u64,
    pub max_attempts: i32,
    pub retry_delay_secs: u64,
    pub levels: Levels,
    pub download_expiry_secs: u64,
    pub public_base_url: String,
    /// How rows become OCSF events (`ocsf`, `parquet-ocsf`).
    pub ocsf: Arc<Mapping>,
}

impl Settings {
    /// Reads the settings from the configuration; the error says which
    /// `[export.ocsf]` rule is wrong.
    pub fn from_config(c: &ExportConfig) -> Result<Self, String> {
        Ok(Self {
            limits: PartLimits::from_config(c),
            concurrency: c.concurrency,
            poll_interval: Duration::from_millis(c.poll_interval_ms),
            lease_secs: c.lease_secs,
            max_attempts: c.max_attempts,
            retry_delay_secs: c.retry_delay_secs,
            levels: Levels {
                gzip: c.gzip_level,
                zstd: c.zstd_level,
            },
            download_expiry_secs: c.download_expiry_secs,
            public_base_url: c.public_base_url.clone(),
            ocsf: Arc::new(Mapping::from_config(&c.ocsf)?),
        })
    }
}

/// Everything a job needs to run: database, storage, Redis, settings.
pub struct Exporter {
    pub pool: deadpool_postgres::Pool,
    pub storage: Storage,
    pub settings: Settings,
    /// `None` only for a CLI export that could not reach Redis.
    pub notifier: Option<Notifier>,
    pub links: Option<LinkSigner>,
    /// Identifies this process in lease tokens (`<consumer>/<uuid>`).
    pub worker_name: String,
    /// Woken when a request is recorded, so idle executors start at once.
    pub wake: Arc<Notify>,
    /// Where finished jobs are counted (the worker's registry; `None` for
    /// a CLI export).
    pub metrics: Option<crate::telemetry::Metrics>,
    /// The worker's configuration in force, whose part limits apply to
    /// each new part (`None`: the limits in `settings`, e.g. a CLI export).
    pub live: Option<crate::live::LiveConfig>,
}

/// The key of a page's last row, where the next page starts.
fn page_key(rows: &[tokio_postgres::Row]) -> Result<Key, ExportError> {
    let last = rows
        .last()
        .ok_or_else(|| ExportError::Io("empty page".into()))?;
    Ok(Key {
        event_time: last.try_get(1)?,
        id: last.try_get(0)?,
    })
}

/// The object key of part `n` of a job.
pub fn part_path(prefix: &str, n: i32) -> Path {
    Path::from(format!("{prefix}/{n:06}"))
}

/// The object key of an artifact's manifest.
pub fn manifest_path(artifact_key: &str) -> Path {
    Path::from(format!("{artifact_key}.manifest.json"))
}

impl Exporter {
    /// The part limits in force now.
    pub fn part_limits(&self) -> PartLimits {
        match &self.live {
            Some(live) => PartLimits::from_config(&live.current().config.export),
            None => self.settings.limits,
        }
    }

    fn lease_token(&self) -> String {
        format!("{}/{}", self.worker_name, uuid::Uuid::new_v4())
    }

    /// Claims and runs queue jobs until `shutdown`, at most
    /// `settings.concurrency` at a time.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let permits = Arc::new(Semaphore::new(self.settings.concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        let mut claim_outage = crate::outage::OutageLog::new("cannot claim export jobs");
        loop {
            while tasks.try_join_next().is_some() {}
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = shutdown.cancelled() => break,
            };
            let claimed = self.claim_next().await;
            if claimed.is_ok() {
                claim_outage.recovered();
            }
            match claimed {
                Ok(Some(job)) => {
                    let me = self.clone();
                    let stop = shutdown.clone();
                    tasks.spawn(async move {
                        me.run_claimed(job, None, stop).await;
                        drop(permit);
                    });
                    continue;
                }
                Ok(None) => {}
                Err(e) => claim_outage.failed(&e),
            }
            drop(permit);
            tokio::select! {
                _ = tokio::time::sleep(self.settings.poll_interval) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.cancelled() => break,
            }
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn claim_next(&self) -> Result<Option<Job>, ExportError> {
        let client = self.pool.get().await?;
        match record::claim_next(&**client, &self.lease_token(), self.settings.lease_secs).await {
            Ok(job) => Ok(job),
            Err(record::ClaimError::Db(e)) => Err(e.into()),
            Err(record::ClaimError::Corrupt { id, why }) => {
                // Cannot happen with rows this code wrote; fail the job so it
                // does not block the queue, and say why.
                tracing::error!(job = %id, %why, "export job unreadable; failing it");
                let lease: Option<String> = client
                    .query_one("SELECT leased_by FROM export_jobs WHERE id = $1", &[&id])
                    .await?
                    .get(0);
                record::fail(&**client, &id, &lease.unwrap_or_default(), &why).await?;
                Ok(None)
            }
        }
    }

    /// Runs one leased job to the end (or until its lease is lost, the
    /// process shuts down, or an attempt fails), renewing the lease while
    /// it works. Returns the error that stopped it, if any.
    pub async fn run_claimed(
        &self,
        job: Job,
        progress: Option<Arc<AtomicU64>>,
        shutdown: CancellationToken,
    ) -> Option<ExportError> {
        let lost = CancellationToken::new();
        let keeper = tokio::spawn(keep_lease(
            self.pool.clone(),
            job.clone(),
            self.settings.lease_secs,
            lost.clone(),
        ));
        let started = std::time::Instant::now();
        // Subject access jobs are exports with a subject: counted and
        // traced as their own kind.
        let kind = if job.filters.subject.is_some() {
            "gdpr_access"
        } else {
            "export"
        };
        let span = crate::tracing_ctx::job_span(kind, &job.id, &job.source);
        let result = if job.status != "completed" && job.attempts > self.settings.max_attempts {
            Err(ExportError::Io(format!(
                "gave up after {} attempts",
                self.settings.max_attempts
            )))
        } else {
            let drive = tracing::Instrument::instrument(self.drive(job.clone(), progress), span);
            tokio::select! {
                r = drive => r,
                _ = lost.cancelled() => Err(ExportError::LeaseLost),
                _ = shutdown.cancelled() => Err(ExportError::Shutdown),
            }
        };
        keeper.abort();
        match result {
            Ok(done) => {
                if let Some(m) = &self.metrics {
                    let rows = done.row_count.unwrap_or(done.rows_done).max(0) as u64;
                    let bytes = done.size_bytes.unwrap_or_default().max(0) as u64;
                    m.job_finished(kind, true, rows, bytes, started.elapsed());
                }
                None
            }
            Err(e) => {
                if self.after_error(&job, &e).await {
                    if let Some(m) = &self.metrics {
                        m.job_finished(kind, false, 0, 0, started.elapsed());
                    }
                }
                Some(e)
            }
        }
    }

    /// Records what an error means for the job (lease lost, paused, retry
    /// later, or failed for good); true when the job failed for good.
    async fn after_error(&self, job: &Job, e: &ExportError) -> bool {
        let mut failed = false;
        let outcome: Result<(), ExportError> = async {
            let client = self.pool.get().await?;
            match e {
                ExportError::LeaseLost => {
                    tracing::warn!(job = %job.id, "export lease lost: the job was cancelled, or another worker continues it")
                }
                ExportError::Shutdown => {
                    record::release(&**client, job).await?;
                    tracing::info!(job = %job.id, "export paused for shutdown; it resumes from its checkpoint");
                }
                _ if job.status == "completed" || job.attempts < self.settings.max_attempts => {
                    record::release_for_retry(&**client, job, &e.to_string(), self.settings.retry_delay_secs)
                        .await?;
                    tracing::warn!(job = %job.id, error = %e, attempt = job.attempts,
                        "export attempt failed; it resumes from its checkpoint after retry_delay_secs");
                }
                _ => {
                    if record::fail(&**client, &job.id, &job.lease, &e.to_string()).await? {
                        failed = true;
                        tracing::error!(job = %job.id, error = %e, "export failed for good");
                        self.notify(
                            Notice::Failed,
                            NoticeFields {
                                job_id: job.id.clone(),
                                requester_id: job.requester_id.clone(),
                                reason: Some(e.to_string()),
                                ..Default::default()
                            },
                        )
                        .await;
                    }
                }
            }
            Ok(())
        }
        .await;
        if let Err(e2) = outcome {
            tracing::warn!(job = %job.id, error = %e2, "could not record the export's failure; its lease will expire");
        }
        failed
    }

    /// Advances a leased job through its remaining states; returns the job
    /// as it finished.
    async fn drive(
        &self,
        mut job: Job,
        progress: Option<Arc<AtomicU64>>,
    ) -> Result<Job, ExportError> {
        if let Some(p) = &progress {
            p.store(job.rows_done as u64, Ordering::Relaxed);
        }
        if job.status == "exporting" {
            self.export_parts(&mut job, progress.as_deref()).await?;
        }
        if job.status == "uploading" {
            self.compose(&mut job).await?;
        }
        if job.status == "completed" {
            self.finish(&job).await?;
        }
        Ok(job)
    }

    async fn export_parts(
        &self,
        job: &mut Job,
        progress: Option<&AtomicU64>,
    ) -> Result<(), ExportError> {
        let client = self.pool.get().await?;
        let query = PageQuery::new(
            &job.filters,
            job.cutoff,
            job.cutoff_snapshot.as_deref(),
            job.allowed_organizations.as_deref(),
            job.include_restricted,
        );
        let statement = client.prepare(&query.sql).await?;
        let mut key = job
            .last_key
            .unwrap_or_else(|| PageQuery::start_key(&job.filters));
        loop {
            let part = job.parts_done + 1;
            let limits = self.part_limits();
            let (rows, last) = self
                .write_part(
                    &client,
                    &statement,
                    &query,
                    job,
                    (part, limits),
                    key,
                    progress,
                )
                .await?;
            if rows == 0 {
                break;
            }
            if !record::checkpoint(&**client, job, part, job.rows_done + rows as i64, last).await? {
                return Err(ExportError::LeaseLost);
            }
            job.parts_done = part;
            job.rows_done += rows as i64;
            key = last;
            if rows < limits.part_rows {
                break;
            }
        }
        if !record::mark_uploading(&**client, job).await? {
            return Err(ExportError::LeaseLost);
        }
        job.status = "uploading".into();
        Ok(())
    }

    /// Writes part `part`: up to `part_rows` rows after `after`, as one
    /// compressed member. Returns the rows written and the last key.
    #[allow(clippy::too_many_arguments)]
    async fn write_part(
        &self,
        client: &tokio_postgres::Client,
        statement: &tokio_postgres::Statement,
        query: &PageQuery,
        job: &Job,
        (part, limits): (i32, PartLimits),
        after: Key,
        progress: Option<&AtomicU64>,
    ) -> Result<(u64, Key), ExportError> {
        let path = part_path(&job.parts_prefix, part);
        let mut encoder = Some(PartEncoder::new(
            job.format,
            job.compression,
            self.settings.levels,
            self.settings.ocsf.clone(),
            limits.parquet_row_group_rows,
        )?);
        let mut upload: Option<WriteMultipart> = None;
        let mut in_part = 0u64;
        let mut last = after;
        // Two sides at once, joined by a one-page channel: the fetching
        // side reads the part's pages one after the other, keeping up to
        // two ahead of the encoding side, which formats and compresses
        // each page on a blocking thread and writes it to the upload. The
        // database and the encoder each go at their own pace instead of
        // waiting for each other at every page (at most three pages are
        // held at once).
        let (pages_tx, mut pages_rx) =
            tokio::sync::mpsc::channel::<(Vec<tokio_postgres::Row>, Key)>(1);
        let fetch = async move {
            let mut after = after;
            let mut fetched = 0u64;
            loop {
                let limit = (limits.page_rows as u64).min(limits.part_rows - fetched);
                if limit == 0 {
                    break;
                }
                let rows = query.page(client, statement, after, limit as i64).await?;
                let got = rows.len() as u64;
                if got == 0 {
                    break;
                }
                after = page_key(&rows)?;
                fetched += got;
                if pages_tx.send((rows, after)).await.is_err() {
                    // The encoding side stopped; its error is the one reported.
                    break;
                }
                if got < limit {
                    break;
                }
            }
            Ok::<_, ExportError>(())
        };
        let encode = async {
            while let Some((rows, page_last)) = pages_rx.recv().await {
                let got = rows.len() as u64;
                let first_index = job.rows_done as u64 + in_part;
                let mut enc = encoder
                    .take()
                    .ok_or_else(|| ExportError::Io("encoder lost".into()))?;
                // Formatting and compressing a page is CPU work: keep it off
                // the async threads that serve Redis and HTTP.
                let (enc, out) = tokio::task::spawn_blocking(move || {
                    let mut exported = Vec::with_capacity(rows.len());
                    for r in &rows {
                        exported.push(ExportRow::from_pg(r).map_err(std::io::Error::other)?);
                    }
                    enc.write_rows(&exported, first_index)?;
                    let out = enc.take_output()?;
                    Ok::<_, std::io::Error>((enc, out))
                })
                .await
                .map_err(|e| ExportError::Io(e.to_string()))??;
                encoder = Some(enc);
                if !out.is_empty() {
                    let w = match upload.as_mut() {
                        Some(w) => w,
                        None => upload.insert(self.start_upload(&path).await?),
                    };
                    w.write(&out);
                    w.wait_for_capacity(UPLOAD_CONCURRENCY).await?;
                }
                in_part += got;
                last = page_last;
                if let Some(p) = progress {
                    p.fetch_add(got, Ordering::Relaxed);
                }
            }
            Ok::<_, ExportError>(())
        };
        let (fetched, encoded) = tokio::join!(fetch, encode);
        // A failed encoding side stops the fetching side without an error
        // of its own; a failed fetching side ends the pages early.
        let result = encoded.and(fetched);
        if let Err(e) = result {
            if let Some(w) = upload {
                let _ = w.abort().await;
            }
            return Err(e);
        }
        if in_part == 0 {
            if let Some(w) = upload {
                let _ = w.abort().await;
            }
            return Ok((0, after));
        }
        let tail = encoder
            .take()
            .ok_or_else(|| ExportError::Io("encoder lost".into()))?
            .finish()?;
        let mut w = match upload {
            Some(w) => w,
            None => self.start_upload(&path).await?,
        };
        w.write(&tail);
        w.finish().await?;
        Ok((in_part, last))
    }

    async fn start_upload(&self, path: &Path) -> Result<WriteMultipart, ExportError> {
        let upload = self.storage.store.put_multipart(path).await?;
        Ok(WriteMultipart::new_with_chunk_size(upload, UPLOAD_CHUNK))
    }

    /// Streams header, parts and trailer into the artifact (parquet: the
    /// parts' row groups under one footer), computing its SHA-256 and size;
    /// writes the manifest; records completion.
    async fn compose(&self, job: &mut Job) -> Result<(), ExportError> {
        let (size, sha256) = if job.format.is_parquet() {
            self.compose_parquet(job).await?
        } else {
            self.compose_text(job).await?
        };
        self.completed(job, size, sha256).await
    }

    /// Concatenates header, parts and trailer (each an independent member).
    async fn compose_text(&self, job: &Job) -> Result<(u64, String), ExportError> {
        let levels = self.settings.levels;
        let header = format::compress_whole(&format::header(job.format), job.compression, levels)?;
        let trailer = format::compress_whole(format::trailer(job.format), job.compression, levels)?;
        let path = Path::from(job.artifact_key.as_str());
        let mut w = self.start_upload(&path).await?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let result: Result<(), ExportError> = async {
            hasher.update(&header);
            size += header.len() as u64;
            w.write(&header);
            for n in 1..=job.parts_done {
                let mut body = self
                    .storage
                    .store
                    .get(&part_path(&job.parts_prefix, n))
                    .await?
                    .into_stream();
                while let Some(chunk) = body.next().await {
                    let chunk = chunk?;
                    hasher.update(&chunk);
                    size += chunk.len() as u64;
                    w.write(&chunk);
                    w.wait_for_capacity(UPLOAD_CONCURRENCY).await?;
                }
            }
            hasher.update(trailer.as_slice());
            size += trailer.len() as u64;
            w.write(&trailer);
            Ok(())
        }
        .await;
        if let Err(e) = result {
            let _ = w.abort().await;
            return Err(e);
        }
        w.finish().await?;
        Ok((size, hex::encode(hasher.finalize())))
    }

    /// Copies the row groups of every part, in order, into one Parquet
    /// file: one row group's bytes in memory at a time (fetched by range),
    /// no decoding. An export without parts gets a file with no rows.
    async fn compose_parquet(&self, job: &Job) -> Result<(u64, String), ExportError> {
        let path = Path::from(job.artifact_key.as_str());
        let mut w = self.start_upload(&path).await?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut emit = |w: &mut WriteMultipart, bytes: Vec<u8>| {
            hasher.update(&bytes);
            size += bytes.len() as u64;
            w.write(&bytes);
        };
        let result: Result<(), ExportError> = async {
            if job.parts_done == 0 {
                let schema = if job.format == super::request::Format::Parquet {
                    pq::ParquetSchema::Columns
                } else {
                    pq::ParquetSchema::Ocsf
                };
                emit(&mut w, pq::empty_file(schema)?);
                return Ok(());
            }
            let mut merger: Option<pq::Merger> = None;
            for n in 1..=job.parts_done {
                let part = part_path(&job.parts_prefix, n);
                let meta = self.part_metadata(&part).await?;
                let m = match merger.as_mut() {
                    Some(m) => m,
                    None => merger.insert(pq::Merger::new(&meta)?),
                };
                for rg in meta.row_groups() {
                    let (start, len) = pq::row_group_range(rg);
                    let bytes = self
                        .storage
                        .store
                        .get_range(&part, start..start + len)
                        .await?;
                    m.append_row_group(rg, start, bytes)?;
                    emit(&mut w, m.take_output()?);
                    w.wait_for_capacity(UPLOAD_CONCURRENCY).await?;
                }
            }
            if let Some(m) = merger {
                emit(&mut w, m.finish()?);
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            let _ = w.abort().await;
            return Err(e);
        }
        w.finish().await?;
        Ok((size, hex::encode(hasher.finalize())))
    }

    /// Reads a Parquet part's footer metadata (two range reads).
    async fn part_metadata(
        &self,
        part: &Path,
    ) -> Result<parquet::file::metadata::ParquetMetaData, ExportError> {
        let len = self.storage.store.head(part).await?.size;
        let tail_len = pq::FOOTER_TAIL as u64;
        if len < tail_len + 4 {
            return Err(ExportError::Io(format!(
                "export part {part} is too short to be a Parquet file"
            )));
        }
        let tail = self
            .storage
            .store
            .get_range(part, len - tail_len..len)
            .await?;
        let meta_len = pq::metadata_len(&tail)? as u64;
        if meta_len + tail_len > len {
            return Err(ExportError::Io(format!(
                "export part {part} has a corrupt Parquet footer"
            )));
        }
        let footer = self
            .storage
            .store
            .get_range(part, len - tail_len - meta_len..len - tail_len)
            .await?;
        Ok(pq::decode_metadata(&footer)?)
    }

    /// Records the composed artifact: completion in the database, then
    /// the manifest beside it.
    async fn completed(&self, job: &mut Job, size: u64, sha256: String) -> Result<(), ExportError> {
        // A subject access export: every event's inclusion proof beside it,
        // written before the job is marked completed (a failure retries).
        let proofs = match &job.filters.subject {
            Some(_) => Some(
                crate::jobs::gdpr::access::write_proofs(
                    &self.pool,
                    &self.storage,
                    job,
                    self.part_limits().page_rows,
                )
                .await?,
            ),
            None => None,
        };
        let client = self.pool.get().await?;
        let Some((completed_at, expires_at)) = record::complete(
            &**client,
            job,
            size as i64,
            &sha256,
            self.settings.download_expiry_secs,
        )
        .await?
        else {
            return Err(ExportError::LeaseLost);
        };
        let file_name = job
            .artifact_key
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let columns: Vec<&str> = match job.format {
            super::request::Format::Ocsf => Vec::new(),
            super::request::Format::ParquetOcsf => {
                pq::OCSF_COLUMNS.iter().map(|(n, _)| *n).collect()
            }
            _ => format::COLUMNS.to_vec(),
        };
        let mut manifest = json!({
            "jobId": job.id,
            "file": file_name,
            "format": job.format.as_str(),
            "compression": job.compression.as_str(),
            "columns": columns,
            "rows": job.rows_done,
            "sizeBytes": size,
            "sha256": sha256,
            "filters": job.filters_json,
            "requesterId": job.requester_id,
            "rowsIngestedUpTo": job.cutoff.to_rfc3339_opts(SecondsFormat::Micros, true),
            "exportedAt": completed_at.to_rfc3339_opts(SecondsFormat::Millis, true),
        });
        if matches!(
            job.format,
            super::request::Format::Ocsf | super::request::Format::ParquetOcsf
        ) {
            manifest["ocsfVersion"] = json!(super::ocsf::OCSF_VERSION);
        }
        if let Some(proofs) = proofs {
            manifest["inclusionProofs"] = json!(proofs);
        }
        let bytes = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
        self.storage
            .store
            .put(&manifest_path(&job.artifact_key), PutPayload::from(bytes))
            .await?;
        job.status = "completed".into();
        job.row_count = Some(job.rows_done);
        job.size_bytes = Some(size as i64);
        job.sha256 = Some(sha256);
        job.completed_at = Some(completed_at);
        job.expires_at = Some(expires_at);
        Ok(())
    }

    /// Deletes the parts, audits the export, notifies the requester, and
    /// marks the job notified (in that order, so each happens at least once).
    async fn finish(&self, job: &Job) -> Result<(), ExportError> {
        for n in 1..=job.parts_done {
            match self
                .storage
                .store
                .delete(&part_path(&job.parts_prefix, n))
                .await
            {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let rows = job.row_count.unwrap_or(job.rows_done);
        if let (Some(n), Some(completed_at)) = (&self.notifier, job.completed_at) {
            n.audit_completed(&CompletedExport {
                job_id: &job.id,
                requester_id: &job.requester_id,
                completed_at,
                rows,
                size_bytes: job.size_bytes.unwrap_or_default(),
                sha256: job.sha256.as_deref().unwrap_or_default(),
                format: job.format.as_str(),
                compression: job.compression.as_str(),
                filters: &job.filters_json,
            })
            .await
            .map_err(|e| ExportError::Storage(format!("redis: {e}")))?;
        }
        let expires_at = job.expires_at.unwrap_or_else(Utc::now);
        let link = link::download_link(
            &self.storage,
            self.links.as_ref(),
            &self.settings.public_base_url,
            &job.id,
            &job.artifact_key,
            expires_at,
        )
        .await?;
        if let Some(n) = &self.notifier {
            let notice = if rows == 0 {
                Notice::NoResults
            } else {
                Notice::Ready
            };
            n.notify(
                notice,
                &NoticeFields {
                    job_id: job.id.clone(),
                    requester_id: job.requester_id.clone(),
                    download_link: link,
                    rows: Some(rows),
                    size_bytes: job.size_bytes,
                    sha256: job.sha256.clone(),
                    expires_at: job.expires_at,
                    reason: None,
                },
            )
            .await
            .map_err(|e| ExportError::Storage(format!("redis: {e}")))?;
        }
        let client = self.pool.get().await?;
        if !record::mark_notified(&**client, job).await? {
            return Err(ExportError::LeaseLost);
        }
        tracing::info!(job = %job.id, rows, sha256 = job.sha256.as_deref().unwrap_or(""), "export completed");
        Ok(())
    }

    /// Sends a notification, logging (not failing) when Redis is away.
    pub async fn notify(&self, notice: Notice, fields: NoticeFields) {
        if let Some(n) = &self.notifier {
            if let Err(e) = n.notify(notice, &fields).await {
                tracing::warn!(job = %fields.job_id, error = %e, kind = notice.as_str(), "notification not sent");
            }
        }
    }
}

/// Renews the lease every third of its length; cancels `lost` when it was
/// taken away or could not be renewed before it ran out.
async fn keep_lease(
    pool: deadpool_postgres::Pool,
    job: Job,
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
            record::renew(&**client, &job, lease_secs)
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
                tracing::warn!(job = %job.id, error = %e, "cannot renew the export lease");
                if last_ok.elapsed() >= Duration::from_secs(lease_secs) {
                    lost.cancel();
                    return;
                }
            }
        }
    }
}
