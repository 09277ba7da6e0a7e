//! Snapshot jobs (`audit.snapshot`): seal stored events into the signed,
//! append-only Merkle log (README, "Snapshots").
//!
//! A request (queue message, schedule slot or CLI) becomes a row in
//! `snapshot_jobs`, deduplicated by its source. The executor leases a job
//! and runs ONE transaction that locks the log head, reads the unsealed
//! rows of the range (no ledger entry yet; for a scheduled snapshot, of
//! everything before its range only what arrived since the previous one:
//! see [`crate::jobs::unsealed`]) in (event_time, id) order,
//! appends their record digests (leaf v2) to the append-only `seal_ledger`
//! (audit rows are never written), extends the tree from
//! the previous snapshot's stored frontier, signs the checkpoint, records
//! the snapshot and marks the job done. A crash before COMMIT leaves
//! nothing; a second job for an overlapping range waits on the head lock and
//! then finds those rows already sealed.
//!
//! Sealing never blocks ingestion: it only reads `audit_log` (ACCESS
//! SHARE, which inserts do not conflict with) and writes the ledger and
//! the tiles. Partition DDL takes a lock that conflicts with neither (see
//! [`crate::partitions`]).
//!
//! After COMMIT the snapshot is *published*: its manifest is written to the
//! object store and an `audit.snapshot.created` event is XADDed to the
//! event stream with a deterministic eventId. Both are idempotent and are
//! retried by the executor until they succeed (status `sealed` ->
//! `published`), so a crash between the steps only delays them.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use futures::future::BoxFuture;
use object_store::path::Path as StorePath;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, SnapshotConfig};
use crate::event::{RejectReason, Rejection};
use crate::integrity::checkpoint::{Checkpoint, CheckpointSigner, Ed25519NoteSigner, NoteVerifier};
use crate::integrity::merkle::{self, Hash, TreeBuilder};
use crate::integrity::record::LEAF_VERSION_V2;
use crate::jobs::internal_event::{EventRecorder, InternalEvent};
use crate::jobs::merkle_stream::{consistency_plan, hash_from_bytes};
use crate::jobs::stored_record::{record_from_row, salts_join_for, stored_digest, RECORD_COLUMNS};
use crate::jobs::unsealed::{seal_reads, ArrivalsMark, SealedRanges};
use crate::jobs::{JobError, JobHandler};
use crate::outage::OutageLog;
use crate::storage::Storage;

/// Name of the audit event each snapshot appends about itself.
pub const SNAPSHOT_CREATED_ACTION: &str = "audit.snapshot.created";

/// A snapshot problem phrased for the operator.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("database error during snapshot: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("no database connection available: {0}")]
    Pool(String),
    #[error("cannot sign the checkpoint: {0}")]
    Signing(String),
    #[error(
        "the stored log is inconsistent ({0}): run `audit-worker verify` to find out what changed"
    )]
    Integrity(String),
    #[error("cannot write the snapshot manifest: {0} (check storage.url)")]
    Storage(String),
    #[error("cannot append the audit.snapshot.created event to Redis: {0} (it is retried)")]
    Redis(String),
    #[error("{0}")]
    BadRequest(String),
}

impl From<deadpool_postgres::PoolError> for SnapshotError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Self::Pool(crate::db::pool_error_cause(&e))
    }
}

/// A checkpoint signer shared across tasks.
pub type SharedSigner = Arc<dyn CheckpointSigner + Send + Sync>;

/// Loads the signing key from `snapshot.signing_key` (usually the env
/// variable AUDIT_WORKER__SNAPSHOT__SIGNING_KEY) or `signing_key_file`;
/// `None` when neither is set. Errors never contain key material.
pub fn load_signer(cfg: &SnapshotConfig) -> Result<Option<Arc<Ed25519NoteSigner>>, ConfigError> {
    let text = if !cfg.signing_key.is_empty() {
        cfg.signing_key.expose().trim().to_owned()
    } else if !cfg.signing_key_file.is_empty() {
        let text =
            crate::config::read_secret_file(&cfg.signing_key_file, "snapshot.signing_key_file")?;
        text.lines().next().unwrap_or("").trim().to_owned()
    } else {
        return Ok(None);
    };
    Ed25519NoteSigner::from_key_string(&text)
        .map(|s| Some(Arc::new(s)))
        .map_err(|e| {
            ConfigError(format!(
                "snapshot signing key is not a valid signed-note private key ({e}); \
                 make one with `audit-worker keygen`"
            ))
        })
}

/// The verifier key `verify` trusts: `snapshot.verifier_key`, or the one
/// derived from the signing key.
pub fn load_verifier(cfg: &SnapshotConfig) -> Result<NoteVerifier, ConfigError> {
    if !cfg.verifier_key.is_empty() {
        return NoteVerifier::parse(cfg.verifier_key.trim()).map_err(|e| {
            ConfigError(format!(
                "snapshot.verifier_key is not a verifier key ({e}): use the line keygen printed"
            ))
        });
    }
    match load_signer(cfg)? {
        Some(s) => Ok(s.verifier()),
        None => Err(ConfigError(
            "no verifier key: set snapshot.verifier_key (or a signing key)".into(),
        )),
    }
}

/// Keeps only characters safe in an object-store path segment, so an
/// origin like `audit.example.com/prod` cannot escape the manifest folder.
pub fn sanitize_segment(s: &str) -> String {
    let out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let trimmed = out.trim_matches('.');
    if trimmed.is_empty() {
        "_".into()
    } else {
        trimmed.to_owned()
    }
}

/// Everything a snapshot records; also the manifest written to storage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotSummary {
    /// Manifest format identifier.
    pub format: String,
    pub snapshot_id: i64,
    pub origin: String,
    pub range_from: Option<DateTime<Utc>>,
    pub range_to: DateTime<Utc>,
    pub record_count: i64,
    pub first_event: Option<String>,
    pub first_event_time: Option<DateTime<Utc>>,
    pub last_event: Option<String>,
    pub last_event_time: Option<DateTime<Utc>>,
    pub previous_tree_size: i64,
    pub tree_size: i64,
    pub root_hex: String,
    /// The C2SP signed note over (origin, tree size, root).
    pub checkpoint: String,
    pub key_name: String,
    /// Consistency proof from the previous tree size, hex nodes in order.
    pub consistency_proof: Vec<String>,
    pub manifest_path: String,
    pub created_at: DateTime<Utc>,
    pub job_id: Option<i64>,
}

/// The body of an `audit.snapshot` request. Both bounds optional: `from`
/// defaults to the beginning (so late arrivals are sealed too), `to` to
/// now minus the settling delay.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SnapshotRequest {
    from: Option<String>,
    to: Option<String>,
}

/// Parses and checks a request, naming the field at fault.
pub fn parse_request(
    data: &[u8],
    now: DateTime<Utc>,
    settling: Duration,
) -> Result<(Option<DateTime<Utc>>, DateTime<Utc>), String> {
    if data.len() > 4096 {
        return Err("audit.snapshot request is larger than 4096 bytes".into());
    }
    let req: SnapshotRequest = serde_json::from_slice(data).map_err(|e| {
        format!(
            "audit.snapshot request must be JSON {{\"from\"?: ISO-8601, \"to\"?: ISO-8601}}: {e}"
        )
    })?;
    let parse = |name: &str, v: &str| {
        DateTime::parse_from_rfc3339(v)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| format!("{name} {v:?} is not an ISO-8601 timestamp: {e}"))
    };
    let from = req.from.as_deref().map(|v| parse("from", v)).transpose()?;
    let to = match req.to.as_deref() {
        Some(v) => parse("to", v)?,
        None => now - chrono::Duration::from_std(settling).unwrap_or_default(),
    };
    if to > now {
        return Err(format!(
            "to {} lies in the future: only the past can be sealed",
            to.to_rfc3339()
        ));
    }
    if let Some(f) = from {
        if f >= to {
            return Err("from must be earlier than to".into());
        }
    }
    Ok((from, to))
}

/// Runs snapshots: records requests, seals, publishes, schedules.
pub struct Snapshotter {
    pool: deadpool_postgres::Pool,
    signer: SharedSigner,
    origin: String,
    settings: SnapshotConfig,
    storage: Storage,
    /// Where the creation event goes (`None`: no Redis in this process).
    events: Option<EventRecorder>,
    owner: String,
    /// Where finished jobs are counted (the worker's registry; the CLI
    /// has none).
    metrics: Option<crate::telemetry::Metrics>,
}

impl Snapshotter {
    /// Builds the snapshotter; `redis` is where the creation event goes
    /// (`None`: it stays unpublished until a worker with Redis publishes it).
    pub fn new(
        config: &Config,
        pool: deadpool_postgres::Pool,
        signer: SharedSigner,
        storage: Storage,
        redis: Option<crate::source::RedisConn>,
    ) -> Self {
        Self {
            pool,
            signer,
            origin: config.snapshot.origin.clone(),
            settings: config.snapshot.clone(),
            storage,
            events: redis.map(|r| EventRecorder::new(config, r)),
            owner: config.consumer_name(),
            metrics: None,
        }
    }

    /// Signs the creation events with the key ring of the configuration in
    /// force (a running worker; the CLI signs with the ring it read).
    pub fn following(mut self, live: crate::live::LiveConfig) -> Self {
        self.events = self.events.map(|e| e.following(live));
        self
    }

    /// Counts finished jobs (`audit_worker_jobs_total{kind="snapshot"}`,
    /// rows, duration) in the worker's metrics.
    pub fn with_metrics(mut self, metrics: crate::telemetry::Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Records a snapshot request durably; the same `source` always maps to
    /// the same job. Returns (job id, status).
    pub async fn enqueue(
        &self,
        source: &str,
        from: Option<DateTime<Utc>>,
        to: DateTime<Utc>,
    ) -> Result<(i64, String), SnapshotError> {
        let client = self.pool.get().await?;
        for _ in 0..3 {
            if let Some(row) = client
                .query_opt(
                    "INSERT INTO snapshot_jobs (source, range_from, range_to) VALUES ($1, $2, $3)
                     ON CONFLICT (source) DO NOTHING RETURNING id, status",
                    &[&source, &from, &to],
                )
                .await?
            {
                return Ok((row.get(0), row.get(1)));
            }
            if let Some(row) = client
                .query_opt(
                    "SELECT id, status FROM snapshot_jobs WHERE source = $1",
                    &[&source],
                )
                .await?
            {
                return Ok((row.get(0), row.get(1)));
            }
        }
        Err(SnapshotError::BadRequest(format!(
            "snapshot job for {source} could not be recorded"
        )))
    }

    /// Leases the next runnable job (queued, or running with an expired
    /// lease), if any: its id and the identity of the request that made it.
    pub async fn lease(&self) -> Result<Option<(i64, String)>, SnapshotError> {
        let client = self.pool.get().await?;
        let secs = self.settings.lease_secs as f64;
        let row = client
            .query_opt(
                "UPDATE snapshot_jobs
                    SET status = 'running', attempts = attempts + 1, lease_owner = $1,
                        lease_until = now() + make_interval(secs => $2)
                  WHERE id = (SELECT id FROM snapshot_jobs
                               WHERE status = 'queued' OR (status = 'running' AND lease_until < now())
                               ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
                  RETURNING id, source",
                &[&self.owner, &secs],
            )
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    /// Leases and runs jobs until none is runnable; returns how many ran.
    pub async fn drain(&self) -> Result<usize, SnapshotError> {
        let mut ran = 0;
        while let Some((job, source)) = self.lease().await? {
            let started = std::time::Instant::now();
            let span = crate::tracing_ctx::job_span("snapshot", &job.to_string(), &source);
            let result = tracing::Instrument::instrument(self.run_job(job), span).await;
            if let Some(m) = &self.metrics {
                let rows = result.as_ref().map_or(0, |s| s.record_count.max(0) as u64);
                if result.is_ok() {
                    m.job_finished("snapshot", true, rows, 0, started.elapsed());
                }
            }
            match result {
                Ok(summary) => {
                    ran += 1;
                    if let Err(e) = self.publish(summary.snapshot_id).await {
                        tracing::warn!(snapshot = summary.snapshot_id, error = %e, "snapshot sealed but not yet published; will retry");
                    }
                }
                Err(e) => {
                    tracing::error!(job, error = %e, "snapshot job failed; it is retried after a backoff");
                    if self.release_failed(job, &e.to_string()).await {
                        if let Some(m) = &self.metrics {
                            m.job_finished("snapshot", false, 0, 0, started.elapsed());
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(ran)
    }

    /// Puts a failed job back with exponential backoff (its lease runs until
    /// the retry time); after 10 attempts it is marked failed, and this
    /// returns true.
    async fn release_failed(&self, job: i64, error: &str) -> bool {
        let result = async {
            let client = self.pool.get().await?;
            let row = client
                .query_opt(
                    "UPDATE snapshot_jobs
                        SET status = CASE WHEN attempts >= 10 THEN 'failed' ELSE 'running' END,
                            lease_until = now() + make_interval(secs => least(300, power(2, attempts))::double precision),
                            last_error = $2
                      WHERE id = $1 AND status = 'running'
                  RETURNING status",
                    &[&job, &error],
                )
                .await?;
            Ok::<_, SnapshotError>(row.is_some_and(|r| r.get::<_, String>(0) == "failed"))
        }
        .await;
        result.unwrap_or_else(|e| {
            tracing::warn!(job, error = %e, "could not record the job failure");
            false
        })
    }

    /// Runs one snapshot now, outside any queue (CLI): records a job with
    /// source `source` and runs it, then publishes.
    pub async fn snapshot_now(
        &self,
        source: &str,
        from: Option<DateTime<Utc>>,
        to: DateTime<Utc>,
    ) -> Result<SnapshotSummary, SnapshotError> {
        let (job, _) = self.enqueue(source, from, to).await?;
        // Lease it ourselves so an executor does not start it meanwhile; if
        // this process dies, the lease expires and an executor finishes it.
        {
            let client = self.pool.get().await?;
            let secs = self.settings.lease_secs as f64;
            client
                .execute(
                    "UPDATE snapshot_jobs SET status = 'running', attempts = attempts + 1,
                            lease_owner = $2, lease_until = now() + make_interval(secs => $3)
                      WHERE id = $1 AND status <> 'done'",
                    &[&job, &self.owner, &secs],
                )
                .await?;
        }
        let summary = self.run_job(job).await?;
        if let Err(e) = self.publish(summary.snapshot_id).await {
            tracing::warn!(snapshot = summary.snapshot_id, error = %e, "snapshot sealed but not yet published; a running worker retries");
        }
        Ok(summary)
    }

    /// The sealing transaction for job `job` (see the module docs). If the
    /// job is already done (another executor finished it), returns its
    /// snapshot without sealing again.
    pub async fn run_job(&self, job: i64) -> Result<SnapshotSummary, SnapshotError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        // Serializes sealing across replicas and jobs: every sealing
        // transaction takes this row lock first and holds it to COMMIT.
        tx.query_one("SELECT tree_size FROM snapshot_log_head FOR UPDATE", &[])
            .await?;
        let job_row = tx
            .query_opt(
                "SELECT status, range_from, range_to, snapshot_id FROM snapshot_jobs WHERE id = $1 FOR UPDATE",
                &[&job],
            )
            .await?
            .ok_or_else(|| SnapshotError::BadRequest(format!("snapshot job {job} does not exist")))?;
        let status: String = job_row.get(0);
        if status == "done" {
            let id: Option<i64> = job_row.get(3);
            drop(tx);
            return match id {
                Some(id) => self.summary(id).await,
                None => Err(SnapshotError::Integrity(format!(
                    "snapshot job {job} is done but names no snapshot"
                ))),
            };
        }
        let from: Option<DateTime<Utc>> = job_row.get(1);
        let to: DateTime<Utc> = job_row.get(2);

        // The previous checkpoint and the frontier to extend it from.
        let prev = tx
            .query_opt(
                "SELECT s.tree_size, s.root, s.frontier FROM snapshot_log_head h
                   JOIN snapshots s ON s.id = h.snapshot_id",
                &[],
            )
            .await?;
        let (prev_size, prev_root, prev_frontier) = match prev {
            Some(r) => {
                let size: i64 = r.get(0);
                let root = hash_from_bytes(r.get::<_, &[u8]>(1)).ok_or_else(|| {
                    SnapshotError::Integrity("previous root is not 32 bytes".into())
                })?;
                let frontier: Vec<Vec<u8>> = r.get(2);
                let frontier = frontier
                    .iter()
                    .map(|h| hash_from_bytes(h))
                    .collect::<Option<Vec<Hash>>>()
                    .ok_or_else(|| {
                        SnapshotError::Integrity("stored frontier hash is not 32 bytes".into())
                    })?;
                (size as u64, root, frontier)
            }
            None => (0, merkle::empty_root(), Vec::new()),
        };
        let mut tree = TreeBuilder::from_frontier(prev_size, prev_frontier.clone())
            .map_err(|e| SnapshotError::Integrity(e.to_string()))?;
        if tree.root() != prev_root {
            return Err(SnapshotError::Integrity(
                "the stored frontier does not reproduce the previous checkpoint's root".into(),
            ));
        }

        let snapshot_id: i64 = tx
            .query_one(
                "SELECT nextval(pg_get_serial_sequence('snapshots', 'id'))",
                &[],
            )
            .await?
            .get(0);
        // What the latest scheduled snapshot vouches for: a scheduled seal
        // reads only the rows that arrived since, of all before its range.
        let arrivals = tx
            .query_opt(
                "SELECT arrivals_xmin, arrivals_before FROM snapshots
                  WHERE arrivals_xmin IS NOT NULL ORDER BY id DESC LIMIT 1",
                &[],
            )
            .await?
            .map(|r| ArrivalsMark {
                xmin: r.get(0),
                before: r.get(1),
            });
        let base = prev_size as i64;
        // The tiles follow the ledger in the same transaction: brought up
        // to the previous size first (a log sealed before tiles existed),
        // then extended with each new leaf as it is appended.
        crate::jobs::tile_store::extend_tiles(&tx, prev_size, self.settings.page_size).await?;
        let mut tiles =
            crate::jobs::tile_store::TileAppender::open(&tx, prev_size, self.settings.page_size)
                .await?;
        let (appended, new_arrivals) = self
            .append_to_ledger(
                &tx,
                SealRequest { from, to, arrivals },
                base,
                snapshot_id,
                &mut LogTail {
                    tree: &mut tree,
                    tiles: &mut tiles,
                },
            )
            .await?;
        let new_size = prev_size + appended;
        let tiled = tiles.finish(&tx).await?;
        if tiled != new_size || tree.size() != new_size {
            return Err(SnapshotError::Integrity(format!(
                "appended {appended} leaves to a log of {prev_size}, but the tiles cover {tiled} and the tree {}",
                tree.size()
            )));
        }

        // The consistency proof's new-side nodes, from the tiles just written.
        let plan = consistency_plan(prev_size, new_size, &prev_frontier)
            .map_err(SnapshotError::Integrity)?;
        let wanted: Vec<_> = plan
            .iter()
            .filter(|(_, h)| h.is_none())
            .map(|(r, _)| r.clone())
            .collect();
        let mut computed = crate::jobs::tile_store::range_hashes(&*tx, &wanted)
            .await?
            .ok_or_else(|| {
                SnapshotError::Integrity("the tiles do not hold a consistency node".into())
            })?
            .into_iter();
        let proof: Vec<Vec<u8>> = plan
            .iter()
            .map(|(_, h)| h.or_else(|| computed.next()).map(|h| h.to_vec()))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                SnapshotError::Integrity("a consistency node was not computed".into())
            })?;
        let root = tree.root();

        let checkpoint = Checkpoint::new(self.origin.clone(), new_size, root)
            .map_err(|e| SnapshotError::Signing(e.to_string()))?;
        let note = checkpoint
            .sign(&*self.signer)
            .map_err(|e| SnapshotError::Signing(e.to_string()))?;

        let bounds = tx
            .query(
                "SELECT idempotency_key, event_time FROM seal_ledger
                  WHERE leaf_index IN ($1, $2) AND snapshot_id = $3 ORDER BY leaf_index",
                &[&base, &(new_size as i64 - 1), &snapshot_id],
            )
            .await?;
        let first = bounds
            .first()
            .map(|r| (r.get::<_, String>(0), r.get::<_, DateTime<Utc>>(1)));
        let last = bounds
            .last()
            .map(|r| (r.get::<_, String>(0), r.get::<_, DateTime<Utc>>(1)));
        let manifest_path = format!(
            "{}/{}/{:012}.json",
            self.settings
                .manifest_prefix
                .split('/')
                .filter(|s| !s.is_empty())
                .map(sanitize_segment)
                .collect::<Vec<_>>()
                .join("/"),
            sanitize_segment(&self.origin),
            snapshot_id
        );
        let frontier: Vec<Vec<u8>> = tree.frontier().iter().map(|h| h.to_vec()).collect();
        tx.execute(
            "INSERT INTO snapshots (id, range_from, range_to, record_count, first_event, last_event,
                                    first_event_time, last_event_time, previous_tree_size, tree_size,
                                    root, checkpoint_note, key_name, consistency_proof, frontier,
                                    manifest_path, job_id, leaf_version, arrivals_xmin, arrivals_before)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18,
                     $19, $20)",
            &[
                &snapshot_id,
                &from,
                &to,
                &(appended as i64),
                &first.as_ref().map(|f| f.0.as_str()),
                &last.as_ref().map(|l| l.0.as_str()),
                &first.as_ref().map(|f| f.1),
                &last.as_ref().map(|l| l.1),
                &base,
                &(new_size as i64),
                &root.as_slice(),
                &note,
                &self.signer.key_name(),
                &proof,
                &frontier,
                &manifest_path,
                &job,
                &LEAF_VERSION_V2,
                &new_arrivals.map(|m| m.xmin),
                &new_arrivals.map(|m| m.before),
            ],
        )
        .await?;
        tx.execute(
            "UPDATE snapshot_log_head SET tree_size = $1, snapshot_id = $2",
            &[&(new_size as i64), &snapshot_id],
        )
        .await?;
        tx.execute(
            "UPDATE snapshot_jobs SET status = 'done', snapshot_id = $2, finished_at = now(),
                    lease_owner = NULL, lease_until = NULL, last_error = NULL
              WHERE id = $1",
            &[&job, &snapshot_id],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(
            snapshot = snapshot_id,
            records = appended,
            tree_size = new_size,
            "snapshot sealed"
        );
        drop(client);
        self.summary(snapshot_id).await
    }

    /// Appends the unsealed events the request names (rows without a
    /// ledger entry; see [`seal_reads`]) to the ledger in (event_time, id) order, numbered from `base`, each
    /// with its record digest (leaf v2) computed from the row and its
    /// salts, and extends the tree and the tiles with each leaf as it goes
    /// (nothing is read back). Reads audit_log, never writes it. Returns
    /// how many, and what a scheduled seal's reads vouch for (see
    /// [`ArrivalsMark`]).
    ///
    /// Three stages overlap: a second connection streams the rows and a
    /// task of its own computes their digests ([`read_unsealed`]), while
    /// this one extends the tree and the tiles and writes the ledger in
    /// `tx`. The reader needs no part in the transaction: rows are
    /// immutable (trigger), the head lock taken in `tx` before the read
    /// starts means every earlier seal has committed, and a row committed
    /// after the read's snapshot is a late event for the next snapshot.
    async fn append_to_ledger(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        request: SealRequest,
        base: i64,
        snapshot_id: i64,
        tail: &mut LogTail<'_>,
    ) -> Result<(u64, Option<ArrivalsMark>), SnapshotError> {
        let page = self.settings.page_size.max(1) as usize;
        // Ranges earlier snapshots sealed: an event inside one is late.
        let sealed: Vec<(Option<DateTime<Utc>>, DateTime<Utc>)> = tx
            .query("SELECT range_from, range_to FROM snapshots", &[])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let sealed = SealedRanges::new(sealed);
        let reader = self.pool.get().await?;
        let (chunks, mut arriving) = tokio::sync::mpsc::channel(4);
        let reading = tokio::spawn(read_unsealed(reader, request, chunks));
        let mut next = base;
        let mut batch = LedgerBatch::default();
        while let Some(chunk) = arriving.recv().await {
            for row in chunk? {
                let leaf_hash = merkle::leaf_hash(&row.digest);
                tail.tree.push(leaf_hash);
                tail.tiles.push(tx, leaf_hash).await?;
                let late = sealed.contains(row.event_time).then_some(row.ingested_at);
                batch.push(next, row.event_time, row.row_id, row.key, row.digest, late);
                next += 1;
                if batch.len() >= page {
                    batch.flush(tx, snapshot_id).await?;
                }
            }
        }
        let vouched = reading
            .await
            .map_err(|e| SnapshotError::Integrity(format!("the sealing reader stopped: {e}")))?;
        batch.flush(tx, snapshot_id).await?;
        Ok(((next - base) as u64, vouched))
    }

    /// Reads a recorded snapshot as its manifest.
    pub async fn summary(&self, id: i64) -> Result<SnapshotSummary, SnapshotError> {
        let client = self.pool.get().await?;
        load_summary(&client, &self.origin, id).await
    }

    /// Writes the manifest and appends the `audit.snapshot.created` event,
    /// then marks the snapshot published. Idempotent.
    pub async fn publish(&self, id: i64) -> Result<(), SnapshotError> {
        let summary = self.summary(id).await?;
        let body = serde_json::to_vec_pretty(&summary)
            .map_err(|e| SnapshotError::Storage(e.to_string()))?;
        let path = StorePath::parse(&summary.manifest_path)
            .map_err(|e| SnapshotError::Storage(e.to_string()))?;
        self.storage
            .store
            .put(&path, PutPayload::from(body))
            .await
            .map_err(|e| SnapshotError::Storage(e.to_string()))?;
        // The checkpoint, append-only outside the database: what `verify`
        // requires the log to extend.
        crate::jobs::published::publish(
            &self.storage,
            &crate::jobs::published::folder(&self.settings.manifest_prefix, &self.origin),
            summary.tree_size as u64,
            &summary.checkpoint,
        )
        .await?;
        let Some(events) = &self.events else {
            return Err(SnapshotError::Redis(
                "no Redis connection in this process".into(),
            ));
        };
        let event = creation_event(&summary).to_json(&events.keys.ring());
        let mut last = None;
        for _ in 0..3 {
            match events.add_event(&event).await {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => last = Some(e.to_string()),
            }
        }
        if let Some(e) = last {
            return Err(SnapshotError::Redis(e));
        }
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE snapshots SET status = 'published' WHERE id = $1 AND status = 'sealed'",
                &[&id],
            )
            .await?;
        Ok(())
    }

    /// Publishes every snapshot still in status `sealed`.
    pub async fn publish_pending(&self) -> Result<(), SnapshotError> {
        let ids: Vec<i64> = {
            let client = self.pool.get().await?;
            client
                .query(
                    "SELECT id FROM snapshots WHERE status = 'sealed' ORDER BY id",
                    &[],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect()
        };
        for id in ids {
            self.publish(id).await?;
        }
        Ok(())
    }

    /// The schedule slot `now` falls in; see [`schedule_slot`].
    pub fn schedule_slot(&self, now: DateTime<Utc>) -> (String, DateTime<Utc>) {
        schedule_slot(&self.settings, now)
    }

    /// The executor: enqueues schedule slots, runs queued jobs and retries
    /// publishing, until `shutdown`. A sealing transaction interrupted by
    /// shutdown rolls back and its job is retried after its lease.
    pub async fn run_executor(self: Arc<Self>, shutdown: CancellationToken) {
        let poll = Duration::from_millis(self.settings.poll_interval_ms);
        let mut last_slot: Option<String> = None;
        let mut enqueue_outage = OutageLog::new("could not enqueue the scheduled snapshot");
        let mut publish_outage = OutageLog::new("publishing snapshots failed");
        let mut round_outage = OutageLog::new("snapshot executor round failed");
        loop {
            let round = async {
                let (source, to) = self.schedule_slot(Utc::now());
                if last_slot.as_deref() != Some(source.as_str()) {
                    match self.enqueue(&source, None, to).await {
                        Ok(_) => {
                            enqueue_outage.recovered();
                            last_slot = Some(source);
                        }
                        Err(e) => enqueue_outage.failed(&e),
                    }
                }
                match self.publish_pending().await {
                    Ok(()) => publish_outage.recovered(),
                    Err(e) => publish_outage.failed(&e),
                }
                match self.drain().await {
                    Ok(_) => round_outage.recovered(),
                    Err(e) => round_outage.failed(&e),
                }
            };
            tokio::select! {
                _ = round => {}
                _ = shutdown.cancelled() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

impl JobHandler for Snapshotter {
    fn accept<'a>(
        &'a self,
        data: &'a [u8],
        source: &'a str,
    ) -> BoxFuture<'a, Result<serde_json::Value, JobError>> {
        Box::pin(async move {
            let settling = Duration::from_secs(self.settings.settling_delay_secs);
            let (from, to) = parse_request(data, Utc::now(), settling)
                .map_err(|m| JobError::Rejected(Rejection::new(RejectReason::InvalidEvent, m)))?;
            match self.enqueue(source, from, to).await {
                Ok((id, status)) => Ok(serde_json::json!({"jobId": id, "status": status})),
                Err(e) => Err(JobError::Transient(e.to_string())),
            }
        })
    }
}

/// The schedule slot `now` falls in and the job it enqueues: one slot per
/// `interval_secs` (or the latest `cron` occurrence at or before `now`),
/// sealing up to the slot start minus the settling delay. Every replica
/// computes the same slot, and the slot's source key makes it one job.
pub fn schedule_slot(settings: &SnapshotConfig, now: DateTime<Utc>) -> (String, DateTime<Utc>) {
    let cron = (!settings.cron.is_empty())
        .then(|| settings.cron.parse::<croner::Cron>().ok())
        .flatten();
    let slot = match cron.and_then(|c| c.find_previous_occurrence(&now, true).ok()) {
        Some(t) => t,
        None => {
            let interval = settings.interval_secs.max(1) as i64;
            let slot = now.timestamp().div_euclid(interval) * interval;
            DateTime::<Utc>::from_timestamp(slot, 0).unwrap_or(now)
        }
    };
    let to = slot - chrono::Duration::seconds(settings.settling_delay_secs as i64);
    (
        format!(
            "schedule:{}",
            slot.to_rfc3339_opts(SecondsFormat::Secs, true)
        ),
        to,
    )
}

/// Reads snapshot `id` from the database as its manifest.
pub async fn load_summary(
    client: &tokio_postgres::Client,
    origin: &str,
    id: i64,
) -> Result<SnapshotSummary, SnapshotError> {
    let r = client
        .query_opt(
            "SELECT id, range_from, range_to, record_count, first_event, first_event_time,
                    last_event, last_event_time, previous_tree_size, tree_size, root,
                    checkpoint_note, key_name, consistency_proof, manifest_path, created_at, job_id
               FROM snapshots WHERE id = $1",
            &[&id],
        )
        .await?
        .ok_or_else(|| SnapshotError::BadRequest(format!("snapshot {id} does not exist")))?;
    let proof: Vec<Vec<u8>> = r.get(13);
    Ok(SnapshotSummary {
        format: "audit-worker.snapshot-manifest.v1".into(),
        snapshot_id: r.get(0),
        origin: origin.to_owned(),
        range_from: r.get(1),
        range_to: r.get(2),
        record_count: r.get(3),
        first_event: r.get(4),
        first_event_time: r.get(5),
        last_event: r.get(6),
        last_event_time: r.get(7),
        previous_tree_size: r.get(8),
        tree_size: r.get(9),
        root_hex: hex::encode(r.get::<_, &[u8]>(10)),
        checkpoint: r.get(11),
        key_name: r.get(12),
        consistency_proof: proof.iter().map(hex::encode).collect(),
        manifest_path: r.get(14),
        created_at: r.get(15),
        job_id: r.get(16),
    })
}

/// The `audit.snapshot.created` audit event for a snapshot. Its eventId
/// and timestamp derive from the snapshot, so publishing twice stores one row.
pub fn creation_event(s: &SnapshotSummary) -> InternalEvent {
    InternalEvent {
        event_id: format!(
            "audit-worker:snapshot:{}:{}",
            sanitize_segment(&s.origin),
            s.snapshot_id
        ),
        time: s.created_at,
        action: SNAPSHOT_CREATED_ACTION.into(),
        principal_id: "audit-worker".into(),
        organization_id: None,
        target_type: "AuditSnapshot".into(),
        target_id: s.snapshot_id.to_string(),
        outcome: format!(
            "sealed {} events; log size {} -> {}",
            s.record_count, s.previous_tree_size, s.tree_size
        ),
        details: [
            ("snapshotTreeSize".to_owned(), json!(s.tree_size)),
            ("snapshotRootHex".to_owned(), json!(s.root_hex)),
            ("snapshotManifest".to_owned(), json!(s.manifest_path)),
            ("snapshotCheckpoint".to_owned(), json!(s.checkpoint)),
        ]
        .into_iter()
        .collect(),
    }
}

/// What grows with each leaf a sealing transaction appends: the tree (for
/// the new root) and the stored tiles (for proofs).
struct LogTail<'a> {
    tree: &'a mut TreeBuilder,
    tiles: &'a mut crate::jobs::tile_store::TileAppender,
}

/// One unsealed row as sealing needs it: where it is, its key, its record
/// digest, and when it arrived (for the late mark).
struct UnsealedRow {
    event_time: DateTime<Utc>,
    row_id: i64,
    key: String,
    digest: Hash,
    ingested_at: DateTime<Utc>,
}

/// Rows per message from the reader to the sealing transaction.
const READ_CHUNK: usize = 1024;

/// What a seal reads: the unsealed rows of `[from, to)`, knowing the
/// latest mark.
struct SealRequest {
    from: Option<DateTime<Utc>>,
    to: DateTime<Utc>,
    arrivals: Option<ArrivalsMark>,
}

/// Streams the unsealed rows of the request (planned by [`seal_reads`]
/// once this read's snapshot is known) in order, on its own connection and
/// in one snapshot, computes each record digest, and sends them in chunks.
/// A failure is sent as the last message; a closed channel (the sealing
/// transaction failed) ends the read. Returns the mark the reads vouch
/// for, if any (`None` as well when the read failed or stopped).
async fn read_unsealed(
    reader: deadpool_postgres::Object,
    request: SealRequest,
    chunks: tokio::sync::mpsc::Sender<Result<Vec<UnsealedRow>, SnapshotError>>,
) -> Option<ArrivalsMark> {
    use futures::TryStreamExt;
    let mut reader = reader;
    let run = async {
        // One snapshot for the erasure check and the reads. No parallel
        // workers: the primary key read in order brings the rows sorted for
        // 3.8 CPU-s of the database's time per 1,000,000 instead of 6.5
        // (parallel scans, a hash of every salt ever stored, a sort), on
        // cores that sealing already keeps busy.
        let tx = crate::db::read_only_snapshot(&mut reader).await?;
        tx.batch_execute("SET LOCAL max_parallel_workers_per_gather = 0")
            .await?;
        let salts_join = salts_join_for(&tx).await?;
        // The snapshot is taken by the statement above; its xmin is what
        // the reads vouch for.
        let xmin = crate::db::snapshot_xmin(&tx).await?;
        let reads = seal_reads(
            request.from,
            request.to,
            request.arrivals.and_then(|m| m.usable(xmin)),
        );
        let mut chunk = Vec::with_capacity(READ_CHUNK);
        for read in &reads.reads {
            let sql = format!(
                "SELECT a.id, {RECORD_COLUMNS} FROM audit_log a {salts_join}
                  WHERE {} AND a.snapshot_id IS NULL
                    AND NOT EXISTS (SELECT 1 FROM seal_ledger l
                                     WHERE l.event_time = a.event_time AND l.row_id = a.id)
                  ORDER BY a.event_time, a.id",
                read.condition()
            );
            let rows = tx.query_raw(&sql, read.params()).await?;
            futures::pin_mut!(rows);
            while let Some(r) = rows.try_next().await? {
                let (rec, salts) = record_from_row(&r, 1)
                    .ok_or_else(|| SnapshotError::Integrity("a row without a key".into()))?;
                let digest = stored_digest(&rec, &salts).map_err(|e| {
                    SnapshotError::Integrity(format!(
                        "event {} (event_time {}): {e}",
                        rec.idempotency_key,
                        rec.event_time.to_rfc3339()
                    ))
                })?;
                chunk.push(UnsealedRow {
                    event_time: rec.event_time,
                    row_id: r.get(0),
                    key: rec.idempotency_key.into_owned(),
                    digest,
                    ingested_at: rec.ingested_at,
                });
                if chunk.len() == READ_CHUNK
                    && chunks.send(Ok(std::mem::take(&mut chunk))).await.is_err()
                {
                    return Ok(None);
                }
            }
        }
        if !chunk.is_empty() && chunks.send(Ok(chunk)).await.is_err() {
            return Ok(None);
        }
        Ok::<_, SnapshotError>(
            reads
                .vouches_before
                .map(|before| ArrivalsMark { xmin, before }),
        )
    };
    match run.await {
        Ok(mark) => mark,
        Err(e) => {
            let _ = chunks.send(Err(e)).await;
            None
        }
    }
}

/// Ledger entries waiting to be written, as columns (one binary COPY per
/// page).
#[derive(Default)]
struct LedgerBatch {
    leaf_index: Vec<i64>,
    event_time: Vec<DateTime<Utc>>,
    row_id: Vec<i64>,
    key: Vec<String>,
    leaf: Vec<Hash>,
    late: Vec<Option<DateTime<Utc>>>,
}

impl LedgerBatch {
    fn len(&self) -> usize {
        self.leaf_index.len()
    }

    fn push(
        &mut self,
        index: i64,
        time: DateTime<Utc>,
        row: i64,
        key: String,
        leaf: Hash,
        late: Option<DateTime<Utc>>,
    ) {
        self.late.push(late);
        self.leaf_index.push(index);
        self.event_time.push(time);
        self.row_id.push(row);
        self.key.push(key);
        self.leaf.push(leaf);
    }

    async fn flush(
        &mut self,
        tx: &tokio_postgres::Transaction<'_>,
        snapshot_id: i64,
    ) -> Result<(), SnapshotError> {
        if self.leaf_index.is_empty() {
            return Ok(());
        }
        // Binary COPY: the cheapest way in for a page of new rows (no
        // statement to plan, no arrays to unpack). A page is one COPY, so
        // the cursor reading the next page and the tile writes run between
        // COPYs on the same connection.
        use tokio_postgres::binary_copy::BinaryCopyInWriter;
        use tokio_postgres::types::Type;
        let sink = tx
            .copy_in(
                "COPY seal_ledger (leaf_index, snapshot_id, event_time, row_id, idempotency_key, leaf,
                                   leaf_version, late_arrival) FROM STDIN (FORMAT binary)",
            )
            .await?;
        let writer = BinaryCopyInWriter::new(
            sink,
            &[
                Type::INT8,
                Type::INT8,
                Type::TIMESTAMPTZ,
                Type::INT8,
                Type::TEXT,
                Type::BYTEA,
                Type::INT2,
                Type::TIMESTAMPTZ,
            ],
        );
        futures::pin_mut!(writer);
        for n in 0..self.leaf_index.len() {
            writer
                .as_mut()
                .write(&[
                    &self.leaf_index[n],
                    &snapshot_id,
                    &self.event_time[n],
                    &self.row_id[n],
                    &self.key[n],
                    &self.leaf[n].as_slice(),
                    &LEAF_VERSION_V2,
                    &self.late[n],
                ])
                .await?;
        }
        writer.finish().await?;
        *self = Self::default();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_with_defaults_and_bad_ones_say_why() {
        let now = Utc::now();
        let settle = Duration::from_secs(300);
        let (f, t) = parse_request(b"{}", now, settle).unwrap();
        assert!(f.is_none());
        assert_eq!(t, now - chrono::Duration::seconds(300));
        let (f, t) = parse_request(
            br#"{"from":"2024-01-01T00:00:00Z","to":"2024-02-01T00:00:00Z"}"#,
            now,
            settle,
        )
        .unwrap();
        assert_eq!(f.unwrap().to_rfc3339(), "2024-01-01T00:00:00+00:00");
        assert_eq!(t.to_rfc3339(), "2024-02-01T00:00:00+00:00");
        for (bad, why) in [
            (&b"nope"[..], "must be JSON"),
            (br#"{"to":"yesterday"}"#, "not an ISO-8601"),
            (
                br#"{"from":"2024-02-01T00:00:00Z","to":"2024-01-01T00:00:00Z"}"#,
                "earlier",
            ),
            (br#"{"to":"2999-01-01T00:00:00Z"}"#, "future"),
            (br#"{"until":"2024-01-01T00:00:00Z"}"#, "unknown field"),
        ] {
            let e = parse_request(bad, now, settle).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        assert!(parse_request(&vec![b' '; 5000], now, settle).is_err());
    }

    #[test]
    fn schedule_slots_follow_the_interval_or_the_cron_expression() {
        let mut config = Config::load_from(
            None,
            figment::providers::Env::prefixed("AUDIT_WORKER_UNIT_TEST_UNSET__"),
        )
        .unwrap()
        .snapshot;
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        let now = at("2024-05-06T10:42:17Z");
        let (source, to) = schedule_slot(&config, now);
        assert_eq!(source, "schedule:2024-05-06T10:00:00Z");
        assert_eq!(to, at("2024-05-06T09:55:00Z"));
        assert_eq!(schedule_slot(&config, at("2024-05-06T10:59:59Z")).0, source);
        config.cron = "30 */6 * * *".into();
        assert_eq!(
            schedule_slot(&config, now).0,
            "schedule:2024-05-06T06:30:00Z"
        );
    }

    #[test]
    fn path_segments_are_sanitised() {
        assert_eq!(
            sanitize_segment("audit.example.com/prod"),
            "audit.example.com_prod"
        );
        assert_eq!(sanitize_segment(".."), "_");
        assert_eq!(sanitize_segment("../../etc"), "_.._etc");
        assert_eq!(sanitize_segment("a b\nc"), "a_b_c");
    }

    #[test]
    fn creation_event_is_a_valid_event_with_a_deterministic_id() {
        let s = SnapshotSummary {
            format: "x".into(),
            snapshot_id: 7,
            origin: "o/x".into(),
            range_from: None,
            range_to: Utc::now(),
            record_count: 3,
            first_event: None,
            first_event_time: None,
            last_event: None,
            last_event_time: None,
            previous_tree_size: 0,
            tree_size: 3,
            root_hex: "00".repeat(32),
            checkpoint: "o/x\n3\nAAAA\n\n— k sig\n".into(),
            key_name: "k".into(),
            consistency_proof: vec![],
            manifest_path: "snapshots/o_x/000000000007.json".into(),
            created_at: Utc::now(),
            job_id: None,
        };
        let ring = crate::integrity::HmacKeyRing::default();
        let e = creation_event(&s).to_json(&ring);
        assert_eq!(e, creation_event(&s).to_json(&ring));
        let raw = e.to_string();
        let policy = crate::event::ValidationPolicy::default();
        let ev = crate::event::decode_event(raw.as_bytes(), &policy, Utc::now()).unwrap();
        assert_eq!(ev.action, SNAPSHOT_CREATED_ACTION);
        assert_eq!(ev.event_id.as_deref(), Some("audit-worker:snapshot:o_x:7"));
    }
}
