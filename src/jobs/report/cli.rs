//! `audit-worker report`: runs one compliance report in this process, with
//! a progress bar on a terminal, into `--out DIR` (or the configured object
//! storage without it).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::request::ReportRequest;
use super::store::{self, Origin};
use crate::config::{Config, StorageConfig};
use crate::db;

/// The request, as command-line options (the same rules as the queue
/// payload: README, "Compliance reports").
#[derive(clap::Args, Debug, Clone)]
pub struct ReportArgs {
    /// hipaa-audit-trail, gdpr-processing or integrity.
    #[arg(long)]
    pub kind: String,
    /// The organisation (default: all).
    #[arg(long)]
    pub org: Option<String>,
    /// Start of the period (inclusive), RFC 3339 or YYYY-MM-DD.
    #[arg(long)]
    pub from: String,
    /// End of the period (exclusive), RFC 3339 or YYYY-MM-DD.
    #[arg(long)]
    pub to: String,
    /// Files to write: json, csv, html (repeatable; default all three).
    #[arg(long = "format", value_name = "FORMAT")]
    pub formats: Vec<String>,
    /// Limit the report to these organisations (repeatable; default all).
    #[arg(long = "allowed-org", value_name = "ORG")]
    pub allowed_orgs: Vec<String>,
    /// Who asks for the report (default: cli:<login name>).
    #[arg(long)]
    pub requester: Option<String>,
}

impl ReportArgs {
    /// Builds and validates the request exactly as a queue payload would be.
    pub fn to_request(&self) -> anyhow::Result<ReportRequest> {
        let requester = self.requester.clone().unwrap_or_else(|| {
            format!(
                "cli:{}",
                std::env::var("USER").unwrap_or_else(|_| "unknown".into())
            )
        });
        let mut payload = json!({
            "kind": self.kind,
            "from": self.from,
            "to": self.to,
            "requesterId": requester,
        });
        if let Some(org) = &self.org {
            payload["organizationId"] = json!(org);
        }
        if !self.formats.is_empty() {
            payload["formats"] = json!(self.formats);
        }
        if !self.allowed_orgs.is_empty() {
            payload["allowedOrganizations"] = json!(self.allowed_orgs);
        }
        ReportRequest::parse(payload.to_string().as_bytes())
            .map_err(|r| anyhow::anyhow!("{}: fix the options and run again", r.message))
    }
}

/// Runs the report and prints where its files are.
pub async fn run_report(
    config: &Config,
    args: &ReportArgs,
    out: Option<&PathBuf>,
) -> anyhow::Result<()> {
    let request = args.to_request()?;
    let storage_config = match out {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create --out directory {}", dir.display()))?;
            let dir = dir
                .canonicalize()
                .with_context(|| format!("cannot resolve --out directory {}", dir.display()))?;
            StorageConfig {
                url: dir.display().to_string(),
            }
        }
        None => config.storage.clone(),
    };
    if config.database.migrate_on_start {
        db::migrate(config).await?;
    }
    let pool = db::connect_pool(config).await?;
    let storage = crate::storage::open(&storage_config)?;
    let redis = match connect_redis(config).await {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(error = %e, "Redis unreachable: the report is not recorded as an audit event");
            None
        }
    };
    let reporter = super::reporter(
        config,
        pool.clone(),
        storage,
        redis,
        Arc::new(Notify::new()),
    )?;
    let source = format!("cli:{}", uuid::Uuid::new_v4());
    let prefix = if out.is_some() {
        ""
    } else {
        config.report.prefix.as_str()
    };
    let client = pool.get().await?;
    let created = store::record_request(&**client, &request, &source, Origin::Cli, prefix).await?;
    if !created.created {
        bail!(
            "an identical report by {} is already in progress as job {}: wait for it, or change the request",
            request.requester_id,
            created.id
        );
    }
    let token = format!("{}/{}", config.consumer_name(), uuid::Uuid::new_v4());
    let Some(job) =
        store::claim_job(&**client, &created.id, &token, config.report.lease_secs).await?
    else {
        bail!("report job {} could not be leased", created.id);
    };
    drop(client);
    let progress = Arc::new(AtomicU64::new(0));
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {pos} rows read ({per_sec}) {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.set_message(request.kind.as_str().to_owned());
        bar
    });
    let ticker = bar.clone().map(|bar| {
        let progress = progress.clone();
        tokio::spawn(async move {
            loop {
                bar.set_position(progress.load(Ordering::Relaxed));
                bar.tick();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    });
    let stop = CancellationToken::new();
    let ctrl_c = {
        let stop = stop.clone();
        tokio::spawn(async move {
            crate::shutdown::signal().await;
            stop.cancel();
        })
    };
    let outcome = reporter
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
    let client = pool.get().await?;
    if let Some(e) = outcome {
        client
            .execute(
                "UPDATE report_jobs SET status = 'failed', last_error = $2, completed_at = now(), \
                 leased_by = NULL, lease_expires_at = NULL WHERE id = $1 AND status IN ('queued', 'running')",
                &[&job.id, &e],
            )
            .await?;
        bail!("report {} failed: {e}; run the command again", job.id);
    }
    let Some(done) = store::get_job(&**client, &job.id).await? else {
        bail!("report {} vanished", job.id);
    };
    println!("report {} completed", done.id);
    println!("  kind:     {}", done.request.kind.as_str());
    println!("  rows:     {}", done.rows_scanned.unwrap_or_default());
    if let Some(files) = done.artifacts.as_ref().and_then(|a| a.as_object()) {
        for (format, a) in files {
            let key = a["key"].as_str().unwrap_or_default();
            let shown = match out {
                Some(dir) => dir.join(key).display().to_string(),
                None => key.to_owned(),
            };
            println!(
                "  {format:<8}  {shown} (sha256 {})",
                a["sha256"].as_str().unwrap_or_default()
            );
        }
    }
    println!(
        "  manifest: {} (sha256 {})",
        done.manifest_key.unwrap_or_default(),
        done.manifest_sha256.unwrap_or_default()
    );
    Ok(())
}

async fn connect_redis(config: &Config) -> anyhow::Result<crate::source::RedisConn> {
    Ok(crate::source::RedisTarget::connect(&config.redis).await?.1)
}
