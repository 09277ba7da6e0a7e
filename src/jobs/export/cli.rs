//! The export commands: `export` (run one now, into a directory),
//! `enqueue export` (record one for the workers) and `export-link` (make a
//! download link for a completed one).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use chrono::Utc;
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::executor::manifest_path;
use super::query::PageQuery;
use super::record::{self, Origin};
use super::request::ExportRequest;
use crate::config::{Config, StorageConfig};
use crate::db;

/// The request, as command-line options (the same rules as the queue
/// payload apply: see the README's "Exports" section).
#[derive(clap::Args, Debug, Clone)]
pub struct RequestArgs {
    /// csv, ndjson, json, ocsf or parquet.
    #[arg(long, default_value = "csv")]
    pub format: String,
    /// gzip, zstd or none (default: gzip; parquet: none, the only choice).
    #[arg(long)]
    pub compression: Option<String>,
    /// parquet only: columns (the export columns, default) or ocsf.
    #[arg(long)]
    pub parquet_schema: Option<String>,
    /// Start of the time range (inclusive), RFC 3339 or YYYY-MM-DD.
    #[arg(long)]
    pub from: String,
    /// End of the time range (exclusive), RFC 3339 or YYYY-MM-DD.
    #[arg(long)]
    pub to: String,
    /// Only these actions (repeatable).
    #[arg(long = "action", value_name = "ACTION")]
    pub actions: Vec<String>,
    /// Only these principal ids (repeatable).
    #[arg(long = "principal", value_name = "ID")]
    pub principals: Vec<String>,
    /// Only this organization id.
    #[arg(long)]
    pub organization: Option<String>,
    /// Only these statuses: attempt, success, failure (repeatable).
    #[arg(long = "status", value_name = "STATUS")]
    pub statuses: Vec<String>,
    /// Only this target resource type.
    #[arg(long)]
    pub target_type: Option<String>,
    /// Only this target resource id.
    #[arg(long)]
    pub target_id: Option<String>,
    /// Only these data classifications (repeatable).
    #[arg(long = "classification", value_name = "CLASS")]
    pub classifications: Vec<String>,
    /// Who asks for the export (default: cli:<login name>).
    #[arg(long)]
    pub requester: Option<String>,
    /// Include events of subjects under a GDPR restriction (left out by
    /// default).
    #[arg(long)]
    pub include_restricted: bool,
}

impl RequestArgs {
    /// Builds and validates the request exactly as a queue payload would be.
    pub fn to_request(&self) -> anyhow::Result<ExportRequest> {
        let mut filters = serde_json::Map::new();
        filters.insert("from".into(), json!(self.from));
        filters.insert("to".into(), json!(self.to));
        let mut put_list = |k: &str, v: &Vec<String>| {
            if !v.is_empty() {
                filters.insert(k.into(), json!(v));
            }
        };
        put_list("actions", &self.actions);
        put_list("principalIds", &self.principals);
        put_list("status", &self.statuses);
        put_list("dataClassification", &self.classifications);
        for (k, v) in [
            ("organizationId", &self.organization),
            ("targetResourceType", &self.target_type),
            ("targetResourceId", &self.target_id),
        ] {
            if let Some(v) = v {
                filters.insert(k.into(), json!(v));
            }
        }
        let requester = self.requester.clone().unwrap_or_else(|| {
            format!(
                "cli:{}",
                std::env::var("USER").unwrap_or_else(|_| "unknown".into())
            )
        });
        let mut payload = json!({
            "exportFilters": filters,
            "format": self.format,
            "requesterId": requester,
        });
        if let Some(c) = &self.compression {
            payload["compression"] = json!(c);
        }
        if let Some(s) = &self.parquet_schema {
            payload["parquetSchema"] = json!(s);
        }
        let mut request = ExportRequest::parse(payload.to_string().as_bytes())
            .map_err(|r| anyhow::anyhow!("{}: fix the options and run again", r.message))?;
        request.include_restricted = self.include_restricted;
        Ok(request)
    }
}

async fn prepare_db(config: &Config) -> anyhow::Result<deadpool_postgres::Pool> {
    if config.database.migrate_on_start {
        db::migrate(config).await?;
    }
    Ok(db::connect_pool(config).await?)
}

/// `audit-worker export ... --out DIR`: runs an export in this process and
/// writes `DIR/audit-export-<from>-<to>-<id>.<ext>` and its manifest.
pub async fn run_export(config: &Config, args: &RequestArgs, out: &PathBuf) -> anyhow::Result<()> {
    run_request(config, &args.to_request()?, out).await
}

/// Runs a validated export request in this process into `out` (the body
/// of `export` and of `gdpr access`).
pub async fn run_request(
    config: &Config,
    request: &ExportRequest,
    out: &PathBuf,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create --out directory {}", out.display()))?;
    let out = out
        .canonicalize()
        .with_context(|| format!("cannot resolve --out directory {}", out.display()))?;
    let pool = prepare_db(config).await?;
    let storage = crate::storage::open(&StorageConfig {
        url: out.display().to_string(),
    })?;
    let redis = match connect_redis(config).await {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(error = %e, "Redis unreachable: the export is not recorded as an audit event");
            None
        }
    };
    let exporter = super::exporter(
        config,
        pool.clone(),
        storage,
        redis,
        Arc::new(Notify::new()),
    )?;
    let source = format!("cli:{}", uuid::Uuid::new_v4());
    let client = pool.get().await?;
    let recorded = record::record_request(&**client, request, &source, Origin::Cli, None, |id| {
        (format!(".audit-export-{id}.parts"), request.file_name(id))
    })
    .await?;
    if !recorded.created {
        bail!(
            "an identical export by {} is already in progress as job {}: wait for it, or change the request",
            request.requester_id,
            recorded.id
        );
    }
    let token = format!("{}/{}", config.consumer_name(), uuid::Uuid::new_v4());
    let job =
        match record::claim_job(&**client, &recorded.id, &token, config.export.lease_secs).await {
            Ok(Some(job)) => job,
            Ok(None) => bail!("job {} could not be leased", recorded.id),
            Err(record::ClaimError::Db(e)) => return Err(e.into()),
            Err(record::ClaimError::Corrupt { why, .. }) => {
                bail!("job {} unreadable: {why}", recorded.id)
            }
        };
    let progress = Arc::new(AtomicU64::new(0));
    // Counting costs a scan of the range: only when someone watches.
    let bar = if std::io::stderr().is_terminal() {
        let total = PageQuery::new(
            &job.filters,
            job.cutoff,
            job.cutoff_snapshot.as_deref(),
            job.allowed_organizations.as_deref(),
            job.include_restricted,
        )
        .count(&client)
        .await?;
        let bar = indicatif::ProgressBar::new(total.max(0) as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} rows ({per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(bar)
    } else {
        None
    };
    drop(client);
    let stop = CancellationToken::new();
    let ctrl_c = {
        let stop = stop.clone();
        tokio::spawn(async move {
            crate::shutdown::signal().await;
            stop.cancel();
        })
    };
    let ticker = bar.clone().map(|bar| {
        let progress = progress.clone();
        tokio::spawn(async move {
            loop {
                bar.set_position(progress.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    });
    let outcome = exporter
        .run_claimed(job.clone(), Some(progress.clone()), stop)
        .await;
    ctrl_c.abort();
    if let Some(t) = ticker {
        t.abort();
    }
    if let Some(bar) = &bar {
        bar.set_position(progress.load(Ordering::Relaxed));
        bar.finish_and_clear();
    }
    let _ = std::fs::remove_dir(out.join(&job.parts_prefix));
    if let Some(e) = outcome {
        let client = pool.get().await?;
        client
            .execute(
                "UPDATE export_jobs SET status = 'failed', last_error = $2, completed_at = now(), \
                 leased_by = NULL, lease_expires_at = NULL \
                 WHERE id = $1 AND status IN ('queued', 'exporting', 'uploading')",
                &[&job.id, &e.to_string()],
            )
            .await?;
        bail!("export {} failed: {e}; run the command again", job.id);
    }
    let client = pool.get().await?;
    let row = client
        .query_one(
            "SELECT row_count, size_bytes, sha256 FROM export_jobs WHERE id = $1",
            &[&job.id],
        )
        .await?;
    let (rows, size, sha): (Option<i64>, Option<i64>, Option<String>) =
        (row.get(0), row.get(1), row.get(2));
    let path = out.join(&job.artifact_key);
    println!("export {} completed", job.id);
    println!("  rows:     {}", rows.unwrap_or_default());
    println!("  bytes:    {}", size.unwrap_or_default());
    println!("  sha256:   {}", sha.unwrap_or_default());
    println!("  path:     {}", path.display());
    println!(
        "  manifest: {}",
        out.join(manifest_path(&job.artifact_key).as_ref())
            .display()
    );
    if job.filters.subject.is_some() {
        println!(
            "  proofs:   {}",
            out.join(crate::jobs::gdpr::access::proofs_path(&job.artifact_key).as_ref())
                .display()
        );
    }
    Ok(())
}

async fn connect_redis(config: &Config) -> anyhow::Result<crate::source::RedisConn> {
    Ok(crate::source::RedisTarget::connect(&config.redis).await?.1)
}

/// `audit-worker enqueue export ...`: records a job for the workers'
/// executors (in export_jobs, the queue they lease from) and prints its id.
pub async fn enqueue_export(config: &Config, args: &RequestArgs) -> anyhow::Result<()> {
    let request = args.to_request()?;
    let pool = prepare_db(config).await?;
    let client = pool.get().await?;
    super::check_scope(&request, config.export.queue_scope().as_deref())
        .map_err(|m| anyhow::anyhow!("{m}: see export.queue_organizations"))?;
    let source = format!("cli-enqueue:{}", uuid::Uuid::new_v4());
    let recorded = record::record_request(
        &**client,
        &request,
        &source,
        Origin::Queue,
        config.export.queue_scope().as_deref(),
        super::queue_layout(&request),
    )
    .await?;
    if recorded.created {
        println!("{}", recorded.id);
    } else {
        eprintln!("an identical export is already in progress; its id:");
        println!("{}", recorded.id);
    }
    Ok(())
}

/// `audit-worker export-link ID --ttl 1h`: prints a download link for a
/// completed export (a presigned URL for S3 storage).
pub async fn export_link(config: &Config, id: &str, ttl: Option<&str>) -> anyhow::Result<()> {
    let ttl = match ttl {
        Some(t) => humantime::parse_duration(t)
            .with_context(|| format!("--ttl {t:?} is not a duration: use e.g. 15m, 1h, 2d"))?,
        None => Duration::from_secs(config.export.link_ttl_secs),
    };
    if ttl.is_zero() {
        bail!("--ttl must be positive");
    }
    let pool = db::connect_pool(config).await?;
    let client = pool.get().await?;
    let Some(artifact) = record::artifact(&**client, id).await? else {
        bail!("no export job {id:?}: check the id (`enqueue export` printed it)");
    };
    if artifact.status != "completed" {
        bail!(
            "export {id} is {}, not completed: try again when it is",
            artifact.status
        );
    }
    if artifact.removed {
        bail!("export {id} has expired and its file was removed: request it again");
    }
    let mut expires = Utc::now() + chrono::Duration::from_std(ttl).unwrap_or_default();
    if let Some(limit) = artifact.expires_at {
        if expires > limit {
            eprintln!("note: the file is removed at {limit}; the link expires then");
            expires = limit;
        }
    }
    let storage = crate::storage::open(&config.storage)?;
    let signer = super::link_signer(config)?;
    if storage.s3.is_none() && signer.is_none() {
        bail!("export.link_secret is not set: set it (or link_secret_file, or AUDIT_WORKER__EXPORT__LINK_SECRET) to sign links");
    }
    match super::link::download_link(
        &storage,
        signer.as_ref(),
        &config.export.public_base_url,
        id,
        &artifact.artifact_key,
        expires,
    )
    .await?
    {
        Some(link) => println!("{link}"),
        None => bail!("no link could be made for export {id}"),
    }
    Ok(())
}
