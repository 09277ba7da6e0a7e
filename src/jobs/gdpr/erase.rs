//! GDPR erasure (`gdpr.erase`): a subject's personal values replaced by
//! stable pseudonyms everywhere the worker keeps them, while the verifiable
//! log stays valid.
//!
//! In the database, one SECURITY DEFINER function (`gdpr_erase_rows`,
//! migrations V18 and V27) rewrites all of the subject's rows in one statement,
//! destroys the erased paths' salts and writes each row's erasure record
//! (request, time, paths, the commitments `SHA-256(salt || value)` the leaf
//! was sealed with), so `verify`, proofs and the independent verifier
//! recompute every leaf. [`plan_row`] decides, purely, what to erase in a
//! row; [`Eraser::erase`] does the rest:
//!
//! 1. refuses when an active legal hold covers any of the rows, naming it;
//! 2. rewrites the rows (the database function) and records the request;
//! 3. re-keys the subject's restriction flag to its pseudonym and rewrites
//!    export and report requests that named the subject;
//! 4. purges the dead letters and alerts about the subject from Redis;
//! 5. withdraws export and report artifacts not yet expired that may hold
//!    the subject's rows: the jobs are expired and listed in
//!    `gdpr_withdrawals` within step 2's transaction, then their objects
//!    are deleted and each requester notified;
//! 6. records the erasure itself as an audit event
//!    (`gdpr.erasure.completed`), which names the subject only by its
//!    pseudonym.
//!
//! A retried request (same source) finds its erasure again; a second run
//! finds nothing left to rewrite, finishes the withdrawals still open and
//! repeats steps 4 and 6 harmlessly.

use std::collections::BTreeSet;

use futures::TryStreamExt;

use crate::source::RedisConn;
use chrono::{DateTime, Utc};
use object_store::path::Path;
use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::hold::{self, HeldRow, Hold};
use super::pseudonym::Pseudonymizer;
use crate::integrity::record::{
    commitment, kept_from_json, salts_from_text, KeptCommitments, PersonalFields, Salts,
};
use crate::jobs::internal_event::{EventRecorder, InternalEvent};
use crate::storage::Storage;

/// An erasure request: whose values, within which organisation.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EraseRequest {
    /// The subject: a principal id or target resource id.
    pub subject_id: String,
    /// Only this organisation's events (omit: every organisation the
    /// requester may see; the CLI: every organisation).
    #[serde(default)]
    pub organization_id: Option<String>,
}

impl EraseRequest {
    /// Refuses a request that cannot name a subject, or names a pseudonym.
    pub fn check(&self) -> Result<(), String> {
        super::check_text("subjectId", &self.subject_id)?;
        if let Some(org) = &self.organization_id {
            super::check_text("organizationId", org)?;
        }
        if Pseudonymizer::is_pseudonym(&self.subject_id) {
            return Err("subjectId is already a pseudonym: its values were erased".into());
        }
        if self
            .organization_id
            .as_deref()
            .is_some_and(|o| o.trim().is_empty())
        {
            return Err("organizationId must not be empty: omit it for every organisation".into());
        }
        Ok(())
    }
}

/// The outcome of an erasure.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Erasure {
    /// The request id (`verify` names it beside each erased event).
    pub id: String,
    /// The pseudonym that now stands for the subject.
    pub subject_pseudonym: String,
    pub organization_id: Option<String>,
    /// Events whose personal values were replaced by this request.
    pub rows_erased: u64,
    /// Personal values left in place because the log committed them in
    /// clear (no salt: stored before leaf v2 or before the path was
    /// configured personal): erasing them would break the log.
    pub values_not_erasable: u64,
    pub dead_letters_purged: u64,
    pub alerts_purged: u64,
    /// Export and report jobs whose artifacts were deleted (requesters
    /// notified).
    pub artifacts_withdrawn: Vec<String>,
    pub completed_at: DateTime<Utc>,
}

/// Why an erasure did not happen.
#[derive(Debug, thiserror::Error)]
pub enum EraseError {
    #[error("{0}")]
    BadRequest(String),
    /// An active legal hold covers rows of the subject.
    #[error("{}", .0.refusal())]
    Held(Box<Hold>),
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// Stored data the erasure cannot process (a salt or erasure record
    /// that does not parse).
    #[error("{0}")]
    Integrity(String),
    /// The rows are erased but a later step (Redis, the object store, the
    /// audit event) failed: sending the same request again finishes it.
    #[error("{0}")]
    Incomplete(String),
}

impl From<hold::HoldError> for EraseError {
    fn from(e: hold::HoldError) -> Self {
        match e {
            hold::HoldError::BadRequest(m) => EraseError::BadRequest(m),
            hold::HoldError::Db(e) => EraseError::Db(e),
        }
    }
}

/// A row of the subject, as the erasure reads it.
#[derive(Debug, Clone)]
pub struct SubjectRow {
    pub id: i64,
    pub event_time: DateTime<Utc>,
    pub organization_id: Option<String>,
    pub principal_id: Option<String>,
    pub target_resource_id: Option<String>,
    pub session_context: Option<Value>,
    pub details: Option<Value>,
    pub salts: Salts,
    /// Paths erased earlier.
    pub kept: KeptCommitments,
}

/// What the hold check and the artifact withdrawal need of a subject's row.
struct RowScope {
    organization_id: Option<String>,
    principal_id: Option<String>,
    target_resource_id: Option<String>,
    event_time: DateTime<Utc>,
}

/// What to write for one row: each erased path's pseudonym and kept
/// commitment (lowercase hex).
#[derive(Debug, Clone, PartialEq)]
pub struct RowPlan {
    pub id: i64,
    pub event_time: DateTime<Utc>,
    pub values: Map<String, Value>,
    pub commitments: Map<String, Value>,
    /// Personal values of the subject left in place (no salt).
    pub not_erasable: u64,
    /// No salt of the row is left once these paths are erased: its salt
    /// row is deleted.
    pub salts_emptied: bool,
}

/// The plans of all rows as the column arrays `gdpr_erase_rows` takes, one
/// element per row (pure). Per row: the pseudonyms replacing the principal
/// and target (`None`: unchanged), the `sessionContext` and `details`
/// patches as JSON text (`None`: unchanged), the kept commitments (JSON
/// object) and erased paths (JSON array, sorted), and whether the row's
/// salts are all erased. Plain text arrays because PostgreSQL receives
/// them as they are, where a `jsonb[]` of 100,000 maps took seconds to
/// receive.
#[derive(Debug, Default, PartialEq)]
pub struct ErasureColumns {
    pub ids: Vec<i64>,
    pub times: Vec<DateTime<Utc>>,
    pub principals: Vec<Option<String>>,
    pub targets: Vec<Option<String>>,
    pub sessions: Vec<Option<String>>,
    pub details: Vec<Option<String>>,
    pub commitments: Vec<String>,
    pub paths: Vec<String>,
    pub salts_emptied: Vec<bool>,
}

impl ErasureColumns {
    /// The columns of `plans`, in (event time, id) order, the order of the
    /// table's primary key, so the database visits its pages in order.
    pub fn from_plans(mut plans: Vec<RowPlan>) -> Self {
        plans.sort_unstable_by_key(|p| (p.event_time, p.id));
        let mut c = Self::default();
        for p in plans {
            let mut sessions = Map::new();
            let mut details = Map::new();
            let mut principal = None;
            let mut target = None;
            for (path, value) in p.values {
                match path.as_str() {
                    "principalId" => principal = value.as_str().map(str::to_owned),
                    "targetResourceId" => target = value.as_str().map(str::to_owned),
                    other => {
                        if let Some(key) = other.strip_prefix("sessionContext.") {
                            sessions.insert(key.to_owned(), value);
                        } else if let Some(key) = other.strip_prefix("details.") {
                            details.insert(key.to_owned(), value);
                        }
                    }
                }
            }
            let patch =
                |m: Map<String, Value>| (!m.is_empty()).then(|| Value::Object(m).to_string());
            let paths: Vec<&String> = p.commitments.keys().collect();
            c.paths.push(json!(paths).to_string());
            c.ids.push(p.id);
            c.times.push(p.event_time);
            c.principals.push(principal);
            c.targets.push(target);
            c.sessions.push(patch(sessions));
            c.details.push(patch(details));
            c.commitments.push(Value::Object(p.commitments).to_string());
            c.salts_emptied.push(p.salts_emptied);
        }
        c
    }

    /// Moves the rows from `at` on into a second set of columns.
    pub fn split_off(&mut self, at: usize) -> Self {
        Self {
            ids: self.ids.split_off(at),
            times: self.times.split_off(at),
            principals: self.principals.split_off(at),
            targets: self.targets.split_off(at),
            sessions: self.sessions.split_off(at),
            details: self.details.split_off(at),
            commitments: self.commitments.split_off(at),
            paths: self.paths.split_off(at),
            salts_emptied: self.salts_emptied.split_off(at),
        }
    }
}

/// One call of the database function `gdpr_erase_rows` for the rows of `c`.
async fn erase_rows(
    tx: &tokio_postgres::Transaction<'_>,
    id: &str,
    at: &DateTime<Utc>,
    c: &ErasureColumns,
) -> Result<(), tokio_postgres::Error> {
    tx.query_one(
        "SELECT gdpr_erase_rows($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        &[
            &id,
            at,
            &c.ids,
            &c.times,
            &c.principals,
            &c.targets,
            &c.sessions,
            &c.details,
            &c.commitments,
            &c.paths,
            &c.salts_emptied,
        ],
    )
    .await
    .map(|_| ())
}

/// The personal value at `path` of a row, if present and not null.
fn value_at<'a>(
    row: &'a SubjectRow,
    path: &str,
    scratch: &'a mut Option<Value>,
) -> Option<&'a Value> {
    match path {
        "principalId" => {
            *scratch = row.principal_id.clone().map(Value::String);
            scratch.as_ref()
        }
        "targetResourceId" => {
            *scratch = row.target_resource_id.clone().map(Value::String);
            scratch.as_ref()
        }
        other => {
            let (container, key) = other.split_once('.')?;
            let obj = match container {
                "details" => row.details.as_ref(),
                "sessionContext" => row.session_context.as_ref(),
                _ => None,
            }?;
            obj.get(key).filter(|v| !v.is_null())
        }
    }
}

/// Decides what to erase in one row of the subject (pure).
///
/// - When the subject is the row's principal, every personal value of the
///   row except `targetResourceId` (which names someone or something
///   else) is the subject's: the principal id, the session's IP address
///   and user agent, and the configured `details.*` / `sessionContext.*`
///   paths.
/// - Otherwise (the subject is the target, or a configured path names
///   it), the personal values equal to the subject id.
///
/// Paths already erased are skipped; a personal value without a salt (the
/// log committed it in clear) is counted in `not_erasable` and kept.
/// Returns `None` when nothing is left to erase.
pub fn plan_row(
    row: &SubjectRow,
    subject: &str,
    fields: &PersonalFields,
    pseudonyms: &Pseudonymizer,
) -> Result<Option<RowPlan>, String> {
    let is_principal = row.principal_id.as_deref() == Some(subject);
    let mut plan = RowPlan {
        id: row.id,
        event_time: row.event_time,
        values: Map::new(),
        commitments: Map::new(),
        not_erasable: 0,
        salts_emptied: false,
    };
    for path in fields.paths() {
        if row.kept.contains_key(path) {
            continue;
        }
        let mut scratch = None;
        let Some(value) = value_at(row, path, &mut scratch) else {
            continue;
        };
        let names_subject = value.as_str() == Some(subject);
        let wanted = names_subject || (is_principal && path != "targetResourceId");
        if !wanted {
            continue;
        }
        match row.salts.get(path) {
            Some(salt) => {
                let c = commitment(salt, value)?;
                plan.values
                    .insert(path.clone(), Value::String(pseudonyms.of_value(value)));
                plan.commitments
                    .insert(path.clone(), Value::String(hex::encode(c)));
            }
            None => plan.not_erasable += 1,
        }
    }
    plan.salts_emptied = row
        .salts
        .keys()
        .all(|path| plan.commitments.contains_key(path));
    Ok((!plan.values.is_empty() || plan.not_erasable > 0).then_some(plan))
}

/// Everything an erasure touches besides the database.
#[derive(Clone)]
pub struct Eraser {
    pub pseudonyms: Pseudonymizer,
    pub fields: PersonalFields,
    /// Redis: dead letters and alerts to purge, notifications, the event.
    pub redis: RedisConn,
    /// Every shard's dead-letter stream.
    pub dlq_keys: Vec<String>,
    pub alerts_key: String,
    /// The erasure's audit event and the requesters' notifications.
    pub recorder: EventRecorder,
    /// Where export and report artifacts live.
    pub storage: Storage,
    /// How to open the second connection of a large erasure.
    pub database: crate::config::Config,
    /// From how many rows the rewrite is split over two connections
    /// ([`SPLIT_ROWS`]; tests lower it).
    pub split_rows: usize,
}

/// From this many rows on, the rows are rewritten by two connections at
/// once, each in its own transaction: the database function's work is all
/// in its one backend, and a second backend took a fifth to a quarter off
/// the erasure on two cores (benches/README.md, "GDPR erasure"). The two
/// commit one after the other, so such an erasure is not one transaction:
/// should the second half fail, the first stays erased under the request
/// id and the same request sent again erases the rest under that id.
/// Smaller erasures stay one transaction.
pub const SPLIT_ROWS: usize = 10_000;

/// The select list of [`SubjectRow`]. Salts and kept commitments are
/// looked up per row by key (sub-plans): a join would read all of
/// `audit_salts` to find a tenth of it.
const SUBJECT_COLUMNS: &str = "a.id, a.event_time, a.organization_id, a.principal_id, \
     a.target_resource_id, a.session_context, a.details, \
     (SELECT s.salts::text FROM audit_salts s WHERE s.audit_id = a.id), \
     (SELECT e.commitments FROM audit_erasures e WHERE e.audit_id = a.id)";

impl Eraser {
    /// Builds the eraser from the configuration; fails without a pseudonym
    /// key.
    pub fn from_config(
        config: &crate::config::Config,
        redis: RedisConn,
        storage: Storage,
    ) -> anyhow::Result<Self> {
        let key = config.gdpr.pseudonym_key()?;
        let fields = PersonalFields::with_extra(&config.snapshot.personal_fields)
            .map_err(anyhow::Error::msg)?;
        Ok(Self {
            pseudonyms: Pseudonymizer::new(key),
            fields,
            dlq_keys: crate::shards::shard_keys(config)
                .into_iter()
                .map(|k| k.dlq)
                .collect(),
            alerts_key: config.alerts.stream.clone(),
            recorder: EventRecorder::new(config, redis.clone()),
            redis,
            storage,
            database: config.clone(),
            split_rows: SPLIT_ROWS,
        })
    }

    /// Erases the subject's personal values (see the module doc). `source`
    /// identifies the request (`api:...`, `cli:...`, `stream:...`): the
    /// same source finds the same erasure id again.
    pub async fn erase(
        &self,
        client: &mut tokio_postgres::Client,
        req: &EraseRequest,
        requester: &str,
        source: &str,
    ) -> Result<Erasure, EraseError> {
        req.check().map_err(EraseError::BadRequest)?;
        let subject = req.subject_id.as_str();
        let pseudonym = self.pseudonyms.of_text(subject);
        let org = req.organization_id.as_deref();
        // A retried request keeps its id and, once completed, its time: its
        // audit event is then the same event (same eventId and timestamp),
        // stored once.
        let earlier = client
            .query_opt(
                "SELECT id, completed_at, announced_at FROM gdpr_erasures WHERE source = $1",
                &[&source],
            )
            .await?;
        let id: String = earlier
            .as_ref()
            .map(|r| r.get(0))
            .unwrap_or_else(|| format!("erasure_{}", uuid::Uuid::new_v4().simple()));
        let completed_before: Option<DateTime<Utc>> = earlier.as_ref().and_then(|r| r.get(1));
        let announced = earlier
            .as_ref()
            .and_then(|r| r.get::<_, Option<DateTime<Utc>>>(2))
            .is_some();
        let extra: Vec<String> = self
            .fields
            .paths()
            .iter()
            .filter_map(|p| p.strip_prefix("details.").map(str::to_owned))
            .collect();
        let started = std::time::Instant::now();
        let tx = client.transaction().await?;
        let holds = hold::active(&tx, org).await?;
        // Each row is planned as it arrives, while the database is still
        // finding the next ones; only what the hold check and the artifact
        // withdrawal need is kept of it.
        let stream = tx
            .query_raw(
                &format!(
                    "SELECT {SUBJECT_COLUMNS} FROM audit_log a
                      WHERE (a.principal_id = $1 OR a.target_resource_id = $1
                             OR (cardinality($3::text[]) > 0
                                 AND EXISTS (SELECT 1 FROM unnest($3::text[]) k WHERE a.details ->> k = $1)))
                        AND ($2::text IS NULL OR a.organization_id = $2)"
                ),
                [
                    &subject as &(dyn tokio_postgres::types::ToSql + Sync),
                    &org,
                    &extra,
                ],
            )
            .await?;
        futures::pin_mut!(stream);
        let mut rows: Vec<RowScope> = Vec::new();
        let mut plans = Vec::new();
        while let Some(r) = stream.try_next().await? {
            let row = SubjectRow {
                id: r.get(0),
                event_time: r.get(1),
                organization_id: r.get(2),
                principal_id: r.get(3),
                target_resource_id: r.get(4),
                session_context: r.get(5),
                details: r.get(6),
                salts: salts_from_text(r.get::<_, Option<&str>>(7))
                    .map_err(EraseError::Integrity)?,
                kept: kept_from_json(r.get::<_, Option<Value>>(8).as_ref())
                    .map_err(EraseError::Integrity)?,
            };
            if let Some(p) = plan_row(&row, subject, &self.fields, &self.pseudonyms)
                .map_err(EraseError::Integrity)?
            {
                plans.push(p);
            }
            rows.push(RowScope {
                organization_id: row.organization_id,
                principal_id: row.principal_id,
                target_resource_id: row.target_resource_id,
                event_time: row.event_time,
            });
        }
        tracing::info!(erasure = %id, rows = rows.len(), elapsed_ms = started.elapsed().as_millis() as u64, "erasure: subject's rows read and planned");
        if let Some(h) = hold::covering(
            &holds,
            rows.iter().map(|r| HeldRow {
                organization_id: r.organization_id.as_deref(),
                principal_id: r.principal_id.as_deref(),
                target_resource_id: r.target_resource_id.as_deref(),
                event_time: r.event_time,
            }),
        ) {
            let h = h.clone();
            drop(tx);
            self.record_request(
                client,
                &id,
                source,
                requester,
                org,
                &pseudonym,
                "refused",
                0,
                Some(&h.refusal()),
                None,
            )
            .await?;
            return Err(EraseError::Held(Box::new(h)));
        }
        let not_erasable: u64 = plans.iter().map(|p| p.not_erasable).sum();
        plans.retain(|p| !p.values.is_empty());
        let now = completed_before.unwrap_or_else(Utc::now);
        let mut c = ErasureColumns::from_plans(plans);
        tracing::info!(erasure = %id, rows = c.ids.len(), elapsed_ms = started.elapsed().as_millis() as u64, "erasure: columns built");
        // The second half of a large erasure, on a connection of its own
        // (None: everything goes through `tx`).
        let mut helper = None;
        if c.ids.len() >= self.split_rows.max(2) {
            match crate::db::connect(&self.database).await {
                Ok(connected) => helper = Some(connected),
                Err(e) => tracing::warn!(erasure = %id, error = %e,
                    "erasure: no second database connection; all rows through one"),
            }
        }
        let mut second_half = None;
        if !c.ids.is_empty() {
            let done = match helper.as_mut() {
                None => erase_rows(&tx, &id, &now, &c).await,
                Some((client, _)) => {
                    let second = c.split_off(c.ids.len() / 2);
                    let htx = client.transaction().await?;
                    // Neither half commits before both are done, so a
                    // lock one half waits for can be held by a transaction
                    // that waits, through its client, for this one: a
                    // cycle PostgreSQL cannot see as a deadlock. Two cases:
                    // a hold being placed between the halves' SHARE locks
                    // on legal_holds (it queues behind the first and ahead
                    // of the second), and a second erasure of the same
                    // rows whose halves each won the other's race. The
                    // lock timeout ends both (these halves roll back, the
                    // erasure fails as a database error and is retried).
                    let bounded = "SET LOCAL lock_timeout = '10s'";
                    tx.batch_execute(bounded).await?;
                    htx.batch_execute(bounded).await?;
                    let (a, b) = tokio::join!(
                        erase_rows(&tx, &id, &now, &c),
                        erase_rows(&htx, &id, &now, &second)
                    );
                    let done = a.and(b);
                    second_half = Some((htx, second.ids.len() as u64));
                    done
                }
            };
            tracing::info!(erasure = %id, elapsed_ms = started.elapsed().as_millis() as u64, "erasure: gdpr_erase_rows returned");
            if let Err(e) = done {
                drop(second_half);
                drop(tx);
                return Err(self.refusal_from_db(client, e).await);
            }
        }
        // The restriction flag follows the subject under its new name.
        tx.execute(
            "INSERT INTO gdpr_restrictions (organization_id, subject_id, reason, created_at, created_by)
             SELECT organization_id, $2, reason, created_at, created_by FROM gdpr_restrictions
              WHERE subject_id = $1 AND ($3::text IS NULL OR organization_id = $3)
             ON CONFLICT DO NOTHING",
            &[&subject, &pseudonym, &org],
        )
        .await?;
        tx.execute(
            "DELETE FROM gdpr_restrictions WHERE subject_id = $1 AND ($2::text IS NULL OR organization_id = $2)",
            &[&subject, &org],
        )
        .await?;
        // Requests that named the subject (filters of exports, reports).
        let quoted = Value::String(subject.to_owned()).to_string();
        let replaced = Value::String(pseudonym.clone()).to_string();
        tx.execute(
            "UPDATE export_jobs SET filters = replace(filters::text, $1, $2)::jsonb
              WHERE strpos(filters::text, $1) > 0",
            &[&quoted, &replaced],
        )
        .await?;
        tx.execute(
            "UPDATE report_jobs SET request = replace(request::text, $1, $2)::jsonb
              WHERE strpos(request::text, $1) > 0",
            &[&quoted, &replaced],
        )
        .await?;
        // Artifacts that may hold the subject's rows: withdrawn below.
        let orgs: Vec<String> = rows
            .iter()
            .filter_map(|r| r.organization_id.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let first = rows.iter().map(|r| r.event_time).min();
        let last = rows.iter().map(|r| r.event_time).max();
        self.record_request(
            &tx,
            &id,
            source,
            requester,
            org,
            &pseudonym,
            "completed",
            c.ids.len() as u64,
            None,
            Some(now),
        )
        .await?;
        if let (Some(first), Some(last)) = (first, last) {
            withdraw_artifacts(&tx, &id, &orgs, first, last).await?;
        }
        tx.commit().await?;
        let mut erased = c.ids.len() as u64;
        if let Some((htx, rows)) = second_half {
            // Counted with its rows, once the request's record exists.
            let counted = htx
                .execute(
                    "UPDATE gdpr_erasures SET rows_erased = rows_erased + $2 WHERE id = $1",
                    &[&id, &(rows as i64)],
                )
                .await;
            let committed = match counted {
                Ok(_) => htx.commit().await,
                Err(e) => Err(e),
            };
            if let Err(e) = committed {
                return Err(EraseError::Incomplete(format!(
                    "erasure {id} rewrote {erased} events but the other {rows} failed to commit \
                     ({}); send the same request again to erase them",
                    crate::db::root_cause(&e)
                )));
            }
            erased += rows;
        }
        tracing::info!(erasure = %id, rows = erased, elapsed_ms = started.elapsed().as_millis() as u64, "erasure: rows rewritten and committed");

        let mut problems = Vec::new();
        let mut dead_letters_purged = 0;
        for key in self.dlq_keys.clone() {
            dead_letters_purged += self
                .purge_stream(&key, subject, &self.fields)
                .await
                .unwrap_or_else(|e| {
                    problems.push(e);
                    0
                });
        }
        let alerts_purged = self
            .purge_stream(&self.alerts_key.clone(), subject, &self.fields)
            .await
            .unwrap_or_else(|e| {
                problems.push(e);
                0
            });
        // Every withdrawal of the erasure is listed in its outcome; those
        // still open (this run's, or those an earlier run of the same
        // request could not finish: object store or Redis down) are done
        // now.
        let mut withdrawn = Vec::new();
        for w in withdrawals(client, &id).await? {
            if !w.done {
                match self.remove_artifacts(&w).await {
                    Ok(()) => {
                        client
                            .execute(
                                "UPDATE gdpr_withdrawals SET done_at = now()
                                  WHERE erasure_id = $1 AND kind = $2 AND job_id = $3",
                                &[&id, &w.kind, &w.job_id],
                            )
                            .await?;
                    }
                    Err(e) => problems.push(e),
                }
            }
            withdrawn.push(w.job_id);
        }
        let erasure = Erasure {
            id: id.clone(),
            subject_pseudonym: pseudonym.clone(),
            organization_id: req.organization_id.clone(),
            rows_erased: erased,
            values_not_erasable: not_erasable,
            dead_letters_purged,
            alerts_purged,
            artifacts_withdrawn: withdrawn,
            completed_at: now,
        };
        if !announced {
            match self
                .recorder
                .record(&erasure_event(&erasure, requester))
                .await
            {
                Ok(()) => {
                    client
                        .execute(
                            "UPDATE gdpr_erasures SET announced_at = now() WHERE id = $1",
                            &[&id],
                        )
                        .await?;
                }
                Err(e) => problems.push(e),
            }
        }
        if !problems.is_empty() {
            // The rows are erased; what is left is retried by sending the
            // same request again (it repeats only these steps).
            return Err(EraseError::Incomplete(format!(
                "erasure {id} rewrote {erased} events but did not finish: {}; send the same \
                 request again to retry the rest",
                problems.join("; ")
            )));
        }
        Ok(erasure)
    }

    #[allow(clippy::too_many_arguments)]
    async fn record_request(
        &self,
        client: &impl tokio_postgres::GenericClient,
        id: &str,
        source: &str,
        requester: &str,
        org: Option<&str>,
        pseudonym: &str,
        status: &str,
        rows: u64,
        error: Option<&str>,
        completed_at: Option<DateTime<Utc>>,
    ) -> Result<(), tokio_postgres::Error> {
        client
            .execute(
                "INSERT INTO gdpr_erasures (id, source, requester_id, organization_id, subject_pseudonym,
                                            status, rows_erased, error, completed_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                 ON CONFLICT (source) DO UPDATE
                    SET status = EXCLUDED.status,
                        rows_erased = gdpr_erasures.rows_erased + EXCLUDED.rows_erased,
                        error = EXCLUDED.error,
                        completed_at = COALESCE(gdpr_erasures.completed_at, EXCLUDED.completed_at)",
                &[
                    &id,
                    &source,
                    &requester,
                    &org,
                    &pseudonym,
                    &status,
                    &(rows as i64),
                    &error,
                    &completed_at,
                ],
            )
            .await
            .map(|_| ())
    }

    /// A failed `gdpr_erase_rows`: a hold placed meanwhile becomes
    /// [`EraseError::Held`].
    async fn refusal_from_db(
        &self,
        client: &tokio_postgres::Client,
        e: tokio_postgres::Error,
    ) -> EraseError {
        let held = e
            .as_db_error()
            .filter(|d| d.code() == &tokio_postgres::error::SqlState::OBJECT_IN_USE)
            .and_then(|d| d.detail().map(str::to_owned));
        if let Some(hold_id) = held {
            if let Ok(Some(h)) = hold::get(client, &hold_id, None).await {
                return EraseError::Held(Box::new(h));
            }
        }
        EraseError::Db(e)
    }

    /// Deletes the entries of a Redis stream that are about the subject:
    /// an entry whose `data` is an event naming the subject in a personal
    /// field (or, when `data` is not JSON, containing the subject's text),
    /// or whose `principalId` field is the subject (alerts).
    async fn purge_stream(
        &self,
        key: &str,
        subject: &str,
        fields: &PersonalFields,
    ) -> Result<u64, String> {
        let mut conn = self.redis.clone();
        let mut start = "-".to_string();
        let mut purged = 0u64;
        loop {
            let reply: redis::Value = redis::cmd("XRANGE")
                .arg(key)
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(500)
                .query_async(&mut conn)
                .await
                .map_err(|e| format!("redis: cannot read {key} ({e})"))?;
            let page = crate::source::stream::parse_entries(&reply);
            let Some(last) = page.last() else {
                break;
            };
            let next = format!("({}", last.id);
            let doomed: Vec<&str> = page
                .iter()
                .filter(|e| {
                    e.fields
                        .as_deref()
                        .is_some_and(|f| entry_names_subject(f, subject, fields))
                })
                .map(|e| e.id.as_str())
                .collect();
            if !doomed.is_empty() {
                let n: u64 = redis::cmd("XDEL")
                    .arg(key)
                    .arg(&doomed)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| format!("redis: cannot delete from {key} ({e})"))?;
                purged += n;
            }
            if page.len() < 500 {
                break;
            }
            start = next;
        }
        Ok(purged)
    }

    /// Deletes a withdrawn job's objects and tells its requester.
    async fn remove_artifacts(&self, w: &Withdrawn) -> Result<(), String> {
        use futures::StreamExt;
        let store = &self.storage.store;
        for prefix in &w.prefixes {
            let prefix = Path::from(prefix.as_str());
            let listed: Vec<_> = store.list(Some(&prefix)).collect().await;
            for meta in listed.into_iter().flatten() {
                store
                    .delete(&meta.location)
                    .await
                    .or_else(|e| match e {
                        object_store::Error::NotFound { .. } => Ok(()),
                        e => Err(e),
                    })
                    .map_err(|e| {
                        format!("object storage: cannot delete {} ({e})", meta.location)
                    })?;
            }
        }
        for key in &w.keys {
            match store.delete(&Path::from(key.as_str())).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(format!("object storage: cannot delete {key} ({e})")),
            }
        }
        self.recorder
            .notify(
                &format!("{}.withdrawn", w.kind),
                &w.job_id,
                &w.requester_id,
                &[(
                    "reason",
                    "a GDPR erasure removed personal values this artifact held; request it again"
                        .to_owned(),
                )],
            )
            .await
            .map_err(|e| format!("redis: cannot notify {} ({e})", w.requester_id))
    }
}

/// Whether a stream entry is about the subject: an event naming it in a
/// personal field, or a request naming it (`subjectId` of a dead-lettered
/// `gdpr.erase` or `gdpr.access` request).
fn entry_names_subject(
    fields: &[(Vec<u8>, Vec<u8>)],
    subject: &str,
    personal: &PersonalFields,
) -> bool {
    fields.iter().any(|(name, value)| match name.as_slice() {
        b"data" => match serde_json::from_slice::<Value>(value) {
            Ok(event) => {
                event.get("subjectId").and_then(Value::as_str) == Some(subject)
                    || personal.paths().iter().any(|p| {
                        let v = match p.split_once('.') {
                            None => event.get(p),
                            Some((c, k)) => event.get(c).and_then(|o| o.get(k)),
                        };
                        v.and_then(Value::as_str) == Some(subject)
                    })
            }
            Err(_) => value
                .windows(subject.len().max(1))
                .any(|w| w == subject.as_bytes()),
        },
        b"principalId" | b"principal_id" => value == subject.as_bytes(),
        _ => false,
    })
}

/// A completed job whose artifacts are withdrawn (a `gdpr_withdrawals`
/// row).
#[derive(Debug, Clone)]
struct Withdrawn {
    kind: String,
    job_id: String,
    requester_id: String,
    /// Objects to delete, and prefixes whose objects all go.
    keys: Vec<String>,
    prefixes: Vec<String>,
    /// Its objects are gone and its requester was told.
    done: bool,
}

/// Marks completed exports and reports whose artifacts are still
/// downloadable and may hold rows of `orgs` within `[first, last]` as
/// expired now, and lists them in `gdpr_withdrawals` under the erasure
/// (their objects are deleted after the transaction commits).
async fn withdraw_artifacts(
    tx: &tokio_postgres::Transaction<'_>,
    erasure: &str,
    orgs: &[String],
    first: DateTime<Utc>,
    last: DateTime<Utc>,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "WITH exports AS (
              UPDATE export_jobs SET expires_at = now(), artifact_removed_at = now()
               WHERE status = 'completed' AND artifact_removed_at IS NULL AND origin = 'queue'
                 AND (filters->>'organizationId' IS NULL OR filters->>'organizationId' = ANY ($2))
                 AND (filters->>'from')::timestamptz <= $4 AND (filters->>'to')::timestamptz > $3
              RETURNING id, requester_id, artifact_key, parts_prefix),
         reports AS (
              UPDATE report_jobs SET expires_at = now()
               WHERE status = 'completed' AND origin = 'queue'
                 AND (expires_at IS NULL OR expires_at > now())
                 AND (organization_id IS NULL OR organization_id = ANY ($2))
                 AND period_from <= $4 AND period_to > $3
              RETURNING id, requester_id, artifact_prefix)
         INSERT INTO gdpr_withdrawals (erasure_id, kind, job_id, requester_id, object_keys, prefixes)
         SELECT $1, 'export', id, requester_id,
                ARRAY[artifact_key, artifact_key || '.manifest.json'], ARRAY[parts_prefix]
           FROM exports
         UNION ALL
         SELECT $1, 'report', id, requester_id, ARRAY[]::text[], ARRAY[artifact_prefix]
           FROM reports",
        &[&erasure, &orgs, &first, &last],
    )
    .await
    .map(|_| ())
}

/// The erasure's withdrawals, in (kind, job id) order.
async fn withdrawals(
    client: &tokio_postgres::Client,
    erasure: &str,
) -> Result<Vec<Withdrawn>, tokio_postgres::Error> {
    Ok(client
        .query(
            "SELECT kind, job_id, requester_id, object_keys, prefixes, done_at IS NOT NULL
               FROM gdpr_withdrawals WHERE erasure_id = $1 ORDER BY kind, job_id",
            &[&erasure],
        )
        .await?
        .iter()
        .map(|r| Withdrawn {
            kind: r.get(0),
            job_id: r.get(1),
            requester_id: r.get(2),
            keys: r.get(3),
            prefixes: r.get(4),
            done: r.get(5),
        })
        .collect())
}

/// The `gdpr.erasure.completed` audit event: the subject appears only as
/// its pseudonym.
pub fn erasure_event(e: &Erasure, requester: &str) -> InternalEvent {
    let mut details = Map::new();
    details.insert("erasureRequest".into(), json!(e.id));
    details.insert("rowsErased".into(), json!(e.rows_erased));
    details.insert("valuesNotErasable".into(), json!(e.values_not_erasable));
    details.insert("deadLettersPurged".into(), json!(e.dead_letters_purged));
    details.insert("alertsPurged".into(), json!(e.alerts_purged));
    details.insert("artifactsWithdrawn".into(), json!(e.artifacts_withdrawn));
    InternalEvent {
        event_id: format!("gdpr-erasure-{}", e.id),
        time: e.completed_at,
        action: "gdpr.erasure.completed".into(),
        principal_id: requester.to_owned(),
        organization_id: e.organization_id.clone(),
        target_type: "DataSubject".into(),
        target_id: e.subject_pseudonym.clone(),
        outcome: format!(
            "erasure {}: personal values of {} events replaced by pseudonyms, {} dead letters \
             and {} alerts purged, {} artifacts withdrawn",
            e.id,
            e.rows_erased,
            e.dead_letters_purged,
            e.alerts_purged,
            e.artifacts_withdrawn.len()
        ),
        details,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use crate::integrity::record::{
        new_salts, record_digest, record_digest_opened, Openings, StoredRecord,
    };

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn pseudonyms() -> Pseudonymizer {
        Pseudonymizer::new(Secret::from("test-pseudonym-key".to_owned()))
    }

    fn record(principal: &str, target: &str) -> StoredRecord<'static> {
        StoredRecord {
            idempotency_key: "e1".into(),
            event_id: Some("e1".into()),
            event_time: at("2026-01-01T00:00:00Z"),
            timestamp_raw: "2026-01-01T00:00:00.000Z".into(),
            action: "read".into(),
            status: "success".into(),
            principal_id: Some(principal.to_owned().into()),
            organization_id: Some("org-a".into()),
            target_resource_type: Some("Patient".into()),
            target_resource_id: Some(target.to_owned().into()),
            outcome_description: None,
            hash: "00".repeat(32).into(),
            hash_algorithm: "SHA-256".into(),
            hash_provided: false,
            signature: None,
            signature_algorithm: None,
            signature_key_id: None,
            event_version: None,
            correlation_id: None,
            data_classification: Some("PHI".into()),
            retention_policy: None,
            session_context: Some(
                json!({"ipAddress": "192.0.2.1", "userAgent": "ua/1", "sessionId": "s"}),
            ),
            details: Some(json!({"email": "u1@example.com", "note": "kept"})),
            source: "stream:x:1-0".into(),
            ingested_at: at("2026-01-01T00:00:01Z"),
        }
    }

    fn subject_row(r: &StoredRecord, salts: &Salts) -> SubjectRow {
        SubjectRow {
            id: 1,
            event_time: r.event_time,
            organization_id: r.organization_id.as_deref().map(str::to_owned),
            principal_id: r.principal_id.as_deref().map(str::to_owned),
            target_resource_id: r.target_resource_id.as_deref().map(str::to_owned),
            session_context: r.session_context.clone(),
            details: r.details.clone(),
            salts: salts.clone(),
            kept: KeptCommitments::new(),
        }
    }

    /// Applies a plan as the database function does: values replaced,
    /// salts of erased paths removed, commitments kept.
    fn apply<'a>(
        r: &StoredRecord<'a>,
        salts: &Salts,
        plan: &RowPlan,
    ) -> (StoredRecord<'a>, Salts, KeptCommitments) {
        let mut r = r.clone();
        let mut salts = salts.clone();
        let mut kept = KeptCommitments::new();
        for (path, v) in &plan.values {
            let v = v.as_str().unwrap().to_owned();
            match path.split_once('.') {
                None if path == "principalId" => r.principal_id = Some(v.into()),
                None => r.target_resource_id = Some(v.into()),
                Some(("details", k)) => r.details.as_mut().unwrap()[k] = json!(v),
                Some((_, k)) => r.session_context.as_mut().unwrap()[k] = json!(v),
            }
            salts.remove(path);
            let c = hex::decode(plan.commitments[path].as_str().unwrap()).unwrap();
            kept.insert(path.clone(), c.try_into().unwrap());
        }
        (r, salts, kept)
    }

    fn fields() -> PersonalFields {
        PersonalFields::with_extra(&["details.email".into()]).unwrap()
    }

    #[test]
    fn erasing_the_principal_takes_its_session_and_details_but_not_the_target() {
        let r = record("u1", "p9");
        let salts = new_salts(&fields().present_in(
            r.principal_id.as_deref(),
            r.target_resource_id.as_deref(),
            r.session_context.as_ref(),
            r.details.as_ref(),
        ));
        let plan = plan_row(&subject_row(&r, &salts), "u1", &fields(), &pseudonyms())
            .unwrap()
            .unwrap();
        let paths: Vec<&str> = plan.values.keys().map(String::as_str).collect();
        assert_eq!(
            paths,
            [
                "details.email",
                "principalId",
                "sessionContext.ipAddress",
                "sessionContext.userAgent"
            ]
        );
        assert_eq!(
            plan.values["principalId"],
            json!(pseudonyms().of_text("u1"))
        );
        // The erased record still gives the sealed digest.
        let sealed = record_digest(&r, &salts).unwrap();
        let (erased, left, kept) = apply(&r, &salts, &plan);
        assert_eq!(left.keys().collect::<Vec<_>>(), ["targetResourceId"]);
        let o = Openings {
            salts: &left,
            kept: &kept,
        };
        assert_eq!(record_digest_opened(&erased, o).unwrap(), sealed);
        let text = serde_json::to_string(
            &crate::integrity::record::record_object_opened(&erased, o).unwrap(),
        )
        .unwrap();
        for gone in ["u1", "192.0.2.1", "ua/1", "u1@example.com"] {
            assert!(
                !text.contains(gone) && !format!("{erased:?}").contains(&format!("\"{gone}\"")),
                "{gone}"
            );
        }
        // Tampering with a field that was not erased still changes it.
        let mut tampered = erased.clone();
        tampered.action = "delete".into();
        assert_ne!(record_digest_opened(&tampered, o).unwrap(), sealed);
        let mut tampered = erased.clone();
        tampered.details.as_mut().unwrap()["note"] = json!("changed");
        assert_ne!(record_digest_opened(&tampered, o).unwrap(), sealed);
        // Nothing is left to erase a second time.
        let mut again = subject_row(&erased, &left);
        again.kept = kept;
        assert!(plan_row(&again, "u1", &fields(), &pseudonyms())
            .unwrap()
            .is_none());
    }

    #[test]
    fn the_columns_carry_each_rows_patches_in_key_order_and_say_when_no_salt_is_left() {
        let keep_target = record("u1", "p9");
        let all_of_it = record("u1", "u1");
        let salts_of = |r: &StoredRecord| {
            new_salts(&fields().present_in(
                r.principal_id.as_deref(),
                r.target_resource_id.as_deref(),
                r.session_context.as_ref(),
                r.details.as_ref(),
            ))
        };
        let mut later = subject_row(&keep_target, &salts_of(&keep_target));
        later.id = 7;
        later.event_time = at("2026-01-02T00:00:00Z");
        let mut earlier = subject_row(&all_of_it, &salts_of(&all_of_it));
        earlier.id = 9;
        let plan = |row: &SubjectRow| {
            plan_row(row, "u1", &fields(), &pseudonyms())
                .unwrap()
                .unwrap()
        };
        let (later_plan, earlier_plan) = (plan(&later), plan(&earlier));
        assert!(!later_plan.salts_emptied, "the target's salt stays");
        assert!(earlier_plan.salts_emptied, "every personal value names u1");

        let c = ErasureColumns::from_plans(vec![later_plan.clone(), earlier_plan]);
        assert_eq!(c.ids, [9, 7], "ordered by (event time, id)");
        assert_eq!(c.salts_emptied, [true, false]);
        let p = pseudonyms();
        assert_eq!(c.principals, [Some(p.of_text("u1")), Some(p.of_text("u1"))]);
        assert_eq!(c.targets, [Some(p.of_text("u1")), None]);
        let session: Value = serde_json::from_str(c.sessions[1].as_deref().unwrap()).unwrap();
        assert_eq!(
            session,
            json!({"ipAddress": p.of_text("192.0.2.1"), "userAgent": p.of_text("ua/1")})
        );
        let details: Value = serde_json::from_str(c.details[1].as_deref().unwrap()).unwrap();
        assert_eq!(details, json!({"email": p.of_text("u1@example.com")}));
        assert_eq!(
            c.paths[1],
            r#"["details.email","principalId","sessionContext.ipAddress","sessionContext.userAgent"]"#
        );
        let commitments: Value = serde_json::from_str(&c.commitments[1]).unwrap();
        assert_eq!(commitments, Value::Object(later_plan.commitments));

        // Split for two connections: every column keeps its rows together.
        let mut first = c;
        let whole = ErasureColumns::from_plans(vec![plan(&later), plan(&earlier)]);
        let second = first.split_off(1);
        assert_eq!((first.ids.clone(), second.ids.clone()), (vec![9], vec![7]));
        for (half, row) in [(&first, 0), (&second, 1)] {
            assert_eq!(half.times, [whole.times[row]]);
            assert_eq!(half.principals, [whole.principals[row].clone()]);
            assert_eq!(half.targets, [whole.targets[row].clone()]);
            assert_eq!(half.sessions, [whole.sessions[row].clone()]);
            assert_eq!(half.details, [whole.details[row].clone()]);
            assert_eq!(half.paths, [whole.paths[row].clone()]);
            assert_eq!(half.commitments, [whole.commitments[row].clone()]);
            assert_eq!(half.salts_emptied, [whole.salts_emptied[row]]);
        }
    }

    #[test]
    fn erasing_a_target_takes_only_the_values_that_name_it() {
        let r = record("doctor", "p9");
        let salts = new_salts(&fields().present_in(
            r.principal_id.as_deref(),
            r.target_resource_id.as_deref(),
            r.session_context.as_ref(),
            r.details.as_ref(),
        ));
        let plan = plan_row(&subject_row(&r, &salts), "p9", &fields(), &pseudonyms())
            .unwrap()
            .unwrap();
        assert_eq!(plan.values.keys().collect::<Vec<_>>(), ["targetResourceId"]);
        let sealed = record_digest(&r, &salts).unwrap();
        let (erased, left, kept) = apply(&r, &salts, &plan);
        assert_eq!(erased.principal_id.as_deref(), Some("doctor"));
        assert_eq!(
            record_digest_opened(
                &erased,
                Openings {
                    salts: &left,
                    kept: &kept
                }
            )
            .unwrap(),
            sealed
        );
    }

    #[test]
    fn a_value_committed_in_clear_is_counted_not_erased() {
        let r = record("u1", "p9");
        let plan = plan_row(
            &subject_row(&r, &Salts::new()),
            "u1",
            &fields(),
            &pseudonyms(),
        )
        .unwrap()
        .unwrap();
        assert!(plan.values.is_empty());
        assert_eq!(plan.not_erasable, 4);
    }

    #[test]
    fn a_stream_entry_is_about_the_subject_only_when_a_personal_field_names_it() {
        let f = fields();
        let data = |v: Value| vec![(b"data".to_vec(), v.to_string().into_bytes())];
        assert!(entry_names_subject(
            &data(json!({"principalId": "u1"})),
            "u1",
            &f
        ));
        assert!(entry_names_subject(
            &data(json!({"sessionContext": {"ipAddress": "u1"}})),
            "u1",
            &f
        ));
        assert!(!entry_names_subject(
            &data(json!({"principalId": "u10"})),
            "u1",
            &f
        ));
        assert!(entry_names_subject(
            &data(json!({"subjectId": "u1", "requesterId": "dpo"})),
            "u1",
            &f
        ));
        let field = |k: &str, v: &str| vec![(k.as_bytes().to_vec(), v.as_bytes().to_vec())];
        assert!(entry_names_subject(
            &field("data", "{not json u1"),
            "u1",
            &f
        ));
        assert!(entry_names_subject(&field("principalId", "u1"), "u1", &f));
        assert!(!entry_names_subject(&field("rule", "u1"), "u1", &f));
    }

    #[test]
    fn a_request_names_a_subject_that_is_not_a_pseudonym() {
        let ok = EraseRequest {
            subject_id: "u1".into(),
            organization_id: None,
        };
        assert!(ok.check().is_ok());
        let p = pseudonyms().of_text("u1");
        assert!(EraseRequest {
            subject_id: p,
            organization_id: None
        }
        .check()
        .is_err());
        assert!(EraseRequest {
            subject_id: " ".into(),
            organization_id: None
        }
        .check()
        .is_err());
    }
}
