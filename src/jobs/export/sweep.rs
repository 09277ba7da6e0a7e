//! The periodic clean-up of export jobs and their objects.
//!
//! - In-progress jobs older than `job_expiry_secs` become `expired` (their
//!   executor's guarded updates then fail, so it stops), and the requester
//!   gets `export.expired`.
//! - Parts of failed and expired jobs are deleted.
//! - Artifacts (and manifests) of completed jobs past their download expiry
//!   are deleted; the row stays as the record that the export happened.
//!
//! One replica sweeps at a time: the work runs inside a transaction holding
//! a transaction-level advisory lock (taken with try, so others skip rather
//! than queue). Status changes commit only after the objects are gone, so a
//! crash mid-sweep leaves the rows for the next sweep to finish.

use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::ObjectStoreExt;
use tokio_util::sync::CancellationToken;

use super::executor::{manifest_path, ExportError, Exporter};
use super::notify::{Notice, NoticeFields};

/// What one sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// Whether this replica held the sweep lock (otherwise nothing was done).
    pub ran: bool,
    pub expired_jobs: Vec<String>,
    pub parts_removed_jobs: Vec<String>,
    pub artifacts_removed_jobs: Vec<String>,
}

/// Expiry settings, from `[export]`.
#[derive(Debug, Clone, Copy)]
pub struct SweepSettings {
    pub job_expiry_secs: u64,
    pub interval: std::time::Duration,
}

/// Runs [`sweep_once`] every `interval` until `shutdown`.
pub async fn run(exporter: Arc<Exporter>, settings: SweepSettings, shutdown: CancellationToken) {
    let mut outage =
        crate::outage::OutageLog::new("export sweep failed; it runs again next interval");
    loop {
        let swept = sweep_once(&exporter, settings.job_expiry_secs).await;
        if swept.is_ok() {
            outage.recovered();
        }
        match swept {
            Ok(r) if r.ran => tracing::info!(
                expired = r.expired_jobs.len(),
                parts_removed = r.parts_removed_jobs.len(),
                artifacts_removed = r.artifacts_removed_jobs.len(),
                "export sweep done"
            ),
            Ok(_) => {}
            Err(e) => outage.failed(&e),
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.interval) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Deletes every object under `prefix` (a missing prefix is fine).
async fn delete_prefix(exporter: &Exporter, prefix: &str) -> Result<(), ExportError> {
    let store = exporter.storage.store.clone();
    let prefix = Path::from(prefix);
    let locations = store.list(Some(&prefix)).map_ok(|m| m.location).boxed();
    let mut deleted = store.delete_stream(locations);
    while let Some(r) = deleted.next().await {
        match r {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn delete_object(exporter: &Exporter, path: &Path) -> Result<(), ExportError> {
    match exporter.storage.store.delete(path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// One sweep (see the module documentation).
pub async fn sweep_once(
    exporter: &Exporter,
    job_expiry_secs: u64,
) -> Result<SweepReport, ExportError> {
    let mut client = exporter.pool.get().await?;
    let tx = client.transaction().await?;
    let locked: bool = tx
        .query_one(
            "SELECT pg_try_advisory_xact_lock(hashtext('audit_worker_export_sweep:' || current_schema()))",
            &[],
        )
        .await?
        .get(0);
    let mut report = SweepReport {
        ran: locked,
        ..Default::default()
    };
    if !locked {
        return Ok(report);
    }
    let expired = tx
        .query(
            "UPDATE export_jobs SET status = 'expired', completed_at = now(), \
               leased_by = NULL, lease_expires_at = NULL, \
               last_error = 'not finished within export.job_expiry_secs' \
             WHERE status IN ('queued', 'exporting', 'uploading') \
               AND created_at < now() - make_interval(secs => $1) \
             RETURNING id, requester_id",
            &[&(job_expiry_secs as f64)],
        )
        .await?;
    let mut expired_notices = Vec::new();
    for row in &expired {
        let id: String = row.get(0);
        report.expired_jobs.push(id.clone());
        expired_notices.push(NoticeFields {
            job_id: id,
            requester_id: row.get(1),
            reason: Some("the export did not finish within the job expiry".into()),
            ..Default::default()
        });
    }
    // Parts of jobs that will never complete. CLI jobs keep their parts in
    // their own --out directory, not in this store: only mark them.
    let with_parts = tx
        .query(
            "SELECT id, parts_prefix, origin FROM export_jobs \
             WHERE status IN ('failed', 'expired', 'cancelled') AND parts_removed_at IS NULL",
            &[],
        )
        .await?;
    for row in &with_parts {
        let (id, prefix, origin): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        if origin == "queue" {
            delete_prefix(exporter, &prefix).await?;
        }
        tx.execute(
            "UPDATE export_jobs SET parts_removed_at = now() WHERE id = $1",
            &[&id],
        )
        .await?;
        report.parts_removed_jobs.push(id);
    }
    let past_download = tx
        .query(
            "SELECT id, artifact_key, origin FROM export_jobs \
             WHERE status = 'completed' AND expires_at < now() AND artifact_removed_at IS NULL",
            &[],
        )
        .await?;
    for row in &past_download {
        let (id, key, origin): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        if origin == "queue" {
            delete_object(exporter, &Path::from(key.as_str())).await?;
            delete_object(exporter, &manifest_path(&key)).await?;
            // Subject access exports have their proofs beside them.
            delete_object(exporter, &crate::jobs::gdpr::access::proofs_path(&key)).await?;
        }
        tx.execute(
            "UPDATE export_jobs SET artifact_removed_at = now() WHERE id = $1",
            &[&id],
        )
        .await?;
        report.artifacts_removed_jobs.push(id);
    }
    tx.commit().await?;
    for fields in expired_notices {
        exporter.notify(Notice::Expired, fields).await;
    }
    Ok(report)
}
