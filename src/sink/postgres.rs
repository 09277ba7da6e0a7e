//! The batched, idempotent PostgreSQL writer.
//!
//! One batcher task collects requests and hands a batch to one of
//! `writers` concurrent write tasks as soon as one is free (group commit,
//! see `run_batcher`): batches grow only while the writers are busy. A batch is one statement: a multi-row
//! `INSERT ... SELECT FROM UNNEST($1, $2, ...) ON CONFLICT DO NOTHING
//! RETURNING`, so a redelivered event never becomes a second row and the
//! RETURNING list tells new rows from existing ones. The stored hash of each
//! existing one (one more query) tells a redelivery (`Duplicate`) from a
//! different event reusing the key (`Conflict`). (Binary COPY has no ON
//! CONFLICT and would need a staging table: three statements instead of
//! one; see benches/README.md for the measured difference.)
//!
//! Most batches hold only new events, and `ON CONFLICT` costs PostgreSQL a
//! speculative insertion per row (about 15% of the statement's time,
//! `benches/write_paths.sh`). So a batch is first written without it
//! ([`InsertMode::AllNew`]); a unique violation (a redelivery, or one key
//! twice in the batch) aborts that statement, which wrote nothing, and the
//! batch is written again with `ON CONFLICT DO NOTHING`, as are the
//! batches of the next [`CONFLICT_PAUSE`] (after a crash or a failover,
//! redeliveries come in runs). The database logs each aborted statement as
//! a unique violation.
//!
//! Failures are sorted in two: transient (connection lost, timeouts,
//! serialization failures, too many connections, privileges, anything
//! unknown) are retried with backoff and finally reported `Unavailable`, so
//! the message stays in Redis; permanent (data errors that no retry fixes)
//! split the batch in halves until the offending row is alone, and only
//! that row is `Rejected`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, Utc};
use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio_postgres::types::Json;

use super::{AuditRecord, CircuitBreaker, SinkHandle, StoreOutcome, StoreRequest};
use crate::event::{RejectReason, Rejection};
use crate::integrity::record::{new_salts, salts_json_text, PersonalFields};
use crate::live::LiveConfig;
use crate::partitions::{month_start, Partitions};
use crate::retry::Backoff;
use crate::telemetry::Metrics;
use tokio_util::sync::CancellationToken;

/// Settings of the sink fixed at start, derived from `[sink]`. The batch
/// size, linger and breaker thresholds apply live: the batcher reads them
/// from the configuration in force for every batch.
#[derive(Debug, Clone)]
pub struct SinkSettings {
    pub writers: usize,
    pub max_attempts: u32,
    pub backoff: Backoff,
    /// Fields whose values get a fresh salt per event (leaf v2 commitments).
    pub personal_fields: Arc<PersonalFields>,
}

impl SinkSettings {
    /// Reads the `[sink]` section.
    pub fn from_config(c: &crate::config::SinkConfig) -> Self {
        Self {
            writers: c.writers,
            max_attempts: c.retry_max_attempts,
            backoff: Backoff {
                base: Duration::from_millis(c.retry_base_ms),
                factor: c.retry_factor,
                cap: Duration::from_millis(c.retry_cap_ms),
                jitter: c.retry_jitter,
            },
            personal_fields: Arc::new(PersonalFields::default()),
        }
    }

    /// Salts `fields` (the fixed personal fields plus
    /// `snapshot.personal_fields`) instead of the fixed ones only.
    pub fn with_personal_fields(mut self, fields: PersonalFields) -> Self {
        self.personal_fields = Arc::new(fields);
        self
    }
}

/// Whether an error is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    Transient,
    Permanent,
}

/// Sorts a database error: data errors that concern the rows themselves are
/// permanent; everything else (infrastructure, privileges, unknown) is
/// transient, so a database outage never turns into dead letters.
pub fn classify(e: &tokio_postgres::Error) -> ErrorClass {
    let Some(db) = e.as_db_error() else {
        return ErrorClass::Transient;
    };
    match &db.code().code()[..2] {
        // 22: data exception (bad encoding, value out of range, ...);
        // 23: integrity constraint violation (check, not-null, ...);
        // 54: program limit exceeded (e.g. index row too large).
        "22" | "23" | "54" => ErrorClass::Permanent,
        _ => ErrorClass::Transient,
    }
}

/// The running sink: the batcher task and its handle.
pub struct PostgresSink {
    handle: SinkHandle,
    task: JoinHandle<()>,
}

impl PostgresSink {
    /// Starts the batcher. Requests queue up to a few batches deep; beyond
    /// that `submit` waits, which slows the sources instead of growing memory.
    /// `shutdown` ends waits for the breaker or a backoff: what could not be
    /// written then is reported `Unavailable` and stays in Redis.
    ///
    /// The queue's depth follows `sink.batch_size` at start; a live change
    /// of the batch size changes the batches, not the queue.
    pub fn spawn(
        pool: Pool,
        partitions: Arc<Partitions>,
        settings: SinkSettings,
        live: LiveConfig,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Self {
        let sink = live.current().config.sink.clone();
        let (tx, rx) = mpsc::channel(sink.batch_size * (settings.writers + 2));
        let breaker = CircuitBreaker::new(
            sink.breaker_failure_threshold,
            Duration::from_secs(sink.breaker_recovery_secs),
            metrics.clone(),
        );
        let writer = Arc::new(BatchWriter {
            pool,
            partitions,
            settings,
            live,
            metrics,
            breaker: breaker.clone(),
            shutdown,
            conflicts_seen: std::sync::Mutex::new(None),
        });
        let task = tokio::spawn(writer.run_batcher(rx));
        Self {
            handle: SinkHandle { tx, breaker },
            task,
        }
    }

    /// A handle for a source.
    pub fn handle(&self) -> SinkHandle {
        self.handle.clone()
    }

    /// Waits until every submitted record has been written and answered.
    /// Call after all handles (including sources') have been dropped.
    pub async fn finish(self) {
        drop(self.handle);
        let _ = self.task.await;
    }
}

struct BatchWriter {
    pool: Pool,
    partitions: Arc<Partitions>,
    settings: SinkSettings,
    /// Batch size, linger and breaker thresholds in force.
    live: LiveConfig,
    metrics: Metrics,
    breaker: CircuitBreaker,
    shutdown: CancellationToken,
    /// Until when batches are written with `ON CONFLICT` straight away.
    conflicts_seen: std::sync::Mutex<Option<Instant>>,
}

/// How long after a unique violation batches skip the all-new attempt.
pub const CONFLICT_PAUSE: Duration = Duration::from_secs(10);

/// Whether a batch's INSERT may meet keys that exist already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertMode {
    /// No `ON CONFLICT`: a stored key fails the whole statement.
    AllNew,
    /// `ON CONFLICT DO NOTHING`: stored keys are skipped (not returned).
    SkipExisting,
}

impl BatchWriter {
    /// Group commit: a batch goes to the database as soon as a writer is
    /// free, holding whatever has queued up by then. While every writer is
    /// busy, requests keep joining the next batch (up to `batch_size`), so
    /// batches grow with the load and a lone event at low load waits for
    /// nothing but its own write. `max_wait` (default 0) adds an optional
    /// linger once a writer is free, for deployments that prefer fewer,
    /// fuller batches over latency.
    async fn run_batcher(self: Arc<Self>, mut rx: mpsc::Receiver<StoreRequest>) {
        let slots = Arc::new(Semaphore::new(self.settings.writers));
        loop {
            let (max, max_wait) = self.batch_limits();
            let mut batch = Vec::with_capacity(max);
            if rx.recv_many(&mut batch, max).await == 0 {
                break; // every handle dropped and the queue is empty
            }
            // Wait for a free writer, collecting what arrives meanwhile.
            let mut open = true;
            let permit = loop {
                if batch.len() >= max || !open {
                    break slots.clone().acquire_owned().await;
                }
                let room = max - batch.len();
                tokio::select! {
                    biased;
                    p = slots.clone().acquire_owned() => break p,
                    n = rx.recv_many(&mut batch, room) => open = n > 0,
                }
            }
            .expect("semaphore never closed");
            // A writer is free: take what is queued right now, and linger
            // only if configured to.
            while batch.len() < max {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            if !max_wait.is_zero() {
                // The linger ends early at shutdown: the open batch is flushed.
                let deadline = tokio::time::Instant::now() + max_wait;
                while batch.len() < max && !self.shutdown.is_cancelled() {
                    let room = max - batch.len();
                    tokio::select! {
                        n = tokio::time::timeout_at(deadline, rx.recv_many(&mut batch, room)) => {
                            if !matches!(n, Ok(n) if n > 0) {
                                break;
                            }
                        }
                        _ = self.shutdown.cancelled() => break,
                    }
                }
            }
            let writer = self.clone();
            let span = tracing::info_span!(
                "write_batch",
                otel.name = "audit.sink.write_batch",
                rows = batch.len()
            );
            tokio::spawn(tracing::Instrument::instrument(
                async move {
                    writer.write(batch).await;
                    drop(permit);
                },
                span,
            ));
        }
        // Wait for the writes still under way.
        let _ = slots.acquire_many(self.settings.writers as u32).await;
    }

    /// The batch size and linger in force for the next batch; also hands
    /// the breaker the thresholds in force (it takes them once closed).
    fn batch_limits(&self) -> (usize, Duration) {
        let current = self.live.current();
        let sink = &current.config.sink;
        self.breaker.reconfigure(
            sink.breaker_failure_threshold,
            Duration::from_secs(sink.breaker_recovery_secs),
        );
        (sink.batch_size, sink.max_wait())
    }

    /// Writes one batch, retrying transient failures, and answers every
    /// request as soon as its outcome is known: rows that committed are
    /// answered even while others of the batch still wait (for a month's
    /// partition, say), so their messages are acknowledged at once.
    async fn write(&self, batch: Vec<StoreRequest>) {
        self.metrics.batch_size.observe(batch.len() as f64);
        let (records, replies): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|r| (r.record, r.reply)).unzip();
        let mut replies: Vec<_> = replies.into_iter().map(Some).collect();
        self.resolve(&records, &mut replies).await;
    }

    /// Finds the outcome of every record and answers it: each attempt needs
    /// the breaker's permission (waiting while it is open does not count as
    /// an attempt); transient failures of the still-unresolved rows are
    /// retried with backoff; after `max_attempts`, or on shutdown, they are
    /// `Unavailable`. Rows only deferred (their month's partition could not
    /// be made yet) are retried the same way, but do not count against the
    /// breaker: the database answered, and the rest of the batch was stored.
    async fn resolve(
        &self,
        records: &[AuditRecord],
        replies: &mut [Option<oneshot::Sender<StoreOutcome>>],
    ) {
        let mut outcomes: Vec<Option<StoreOutcome>> = vec![None; records.len()];
        let mut attempt = 0;
        let give_up = |outcomes: &mut Vec<Option<StoreOutcome>>, cause: &str| {
            for o in outcomes.iter_mut().filter(|o| o.is_none()) {
                *o = Some(StoreOutcome::Unavailable(cause.to_owned()));
            }
        };
        loop {
            answer(&outcomes, replies);
            let pending: Vec<usize> = (0..records.len())
                .filter(|&i| outcomes[i].is_none())
                .collect();
            if pending.is_empty() {
                break;
            }
            let Some(permit) = self.breaker.acquire(&self.shutdown).await else {
                give_up(
                    &mut outcomes,
                    "shutting down while the database is unavailable",
                );
                break;
            };
            attempt += 1;
            let cause = match self.try_write(records, pending, &mut outcomes).await {
                Ok(None) => {
                    permit.success();
                    continue;
                }
                Ok(Some(deferred)) => {
                    permit.success();
                    deferred
                }
                Err(cause) => {
                    permit.failure();
                    cause
                }
            };
            if attempt >= self.settings.max_attempts {
                tracing::warn!(attempts = attempt, %cause, "database write failed; the events wait in their queue");
                give_up(&mut outcomes, &cause);
                break;
            }
            self.metrics.sink_retries.inc();
            let delay = self.settings.backoff.delay(attempt);
            tracing::info!(attempt, ?delay, %cause, "transient database error; retrying");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.shutdown.cancelled() => {
                    give_up(&mut outcomes, &cause);
                    break;
                }
            }
        }
        answer(&outcomes, replies);
    }

    /// One attempt: makes the partitions the pending rows need, inserts the
    /// rows whose partition exists, isolating rows that fail permanently by
    /// bisection. Returns the transient error, if any, that stopped it
    /// (rows resolved before it keep their outcome), or, when it completed,
    /// why some rows were deferred: their month's partition could not be
    /// made (a lock timeout, say); only those rows stay unresolved.
    async fn try_write(
        &self,
        records: &[AuditRecord],
        pending: Vec<usize>,
        outcomes: &mut [Option<StoreOutcome>],
    ) -> Result<Option<String>, String> {
        let client = self.pool.get().await.map_err(|e| {
            format!(
                "no database connection: {}",
                crate::db::pool_error_cause(&e)
            )
        })?;
        let month_of = |i: usize| month_start(records[i].event.event_time.date_naive());
        let months: BTreeSet<NaiveDate> = pending.iter().map(|&i| month_of(i)).collect();
        let failed = self
            .partitions
            .ensure(&client, months)
            .await
            .map_err(|e| format!("creating partitions: {}", crate::db::root_cause(&e)))?;
        let (pending, deferred): (Vec<usize>, Vec<usize>) = pending
            .into_iter()
            .partition(|&i| !failed.contains_key(&month_of(i)));
        let deferred = (!deferred.is_empty()).then(|| {
            let (month, cause) = failed.iter().next().expect("a failed month");
            tracing::warn!(rows = deferred.len(), %month, %cause, "partition not created; these rows wait and are retried, the rest of the batch is written");
            format!(
                "{} row(s) wait for the partition of {month}: {cause}",
                deferred.len()
            )
        });
        if pending.is_empty() {
            return Ok(deferred);
        }
        let mut stack = vec![pending];
        while let Some(part) = stack.pop() {
            let started = Instant::now();
            let result = self.insert(&client, records, &part).await;
            let label = if result.is_ok() { "ok" } else { "error" };
            self.metrics
                .insert_duration
                .with_label_values(&[label])
                .observe(started.elapsed().as_secs_f64());
            match result {
                Ok(inserted) => {
                    let mut unreturned = Vec::new();
                    for (&i, inserted) in part.iter().zip(inserted) {
                        if inserted {
                            outcomes[i] = Some(StoreOutcome::Inserted);
                        } else {
                            unreturned.push(i);
                        }
                    }
                    if !unreturned.is_empty() {
                        self.resolve_unreturned(&client, records, &unreturned, outcomes)
                            .await?;
                    }
                }
                Err(e) if classify(&e) == ErrorClass::Permanent && !is_missing_partition(&e) => {
                    if part.len() == 1 {
                        let message = e
                            .as_db_error()
                            .map(|d| format!("{} ({})", d.message(), d.code().code()))
                            .unwrap_or_else(|| e.to_string());
                        outcomes[part[0]] = Some(StoreOutcome::Rejected(Rejection::new(
                            RejectReason::DatabaseRejected,
                            format!("PostgreSQL rejected the row: {message}"),
                        )));
                    } else {
                        let (a, b) = part.split_at(part.len() / 2);
                        stack.push(b.to_vec());
                        stack.push(a.to_vec());
                    }
                }
                Err(e) if is_missing_partition(&e) => {
                    // Dropped by an operator after this process made or saw
                    // it: make it again on the next attempt.
                    self.partitions.forget(part.iter().map(|&i| month_of(i)));
                    return Err(crate::db::root_cause(&e));
                }
                Err(e) => return Err(crate::db::root_cause(&e)),
            }
        }
        Ok(deferred)
    }

    /// Inserts the rows `part`: first as all new unless a unique violation
    /// was seen in the last [`CONFLICT_PAUSE`], then (after one) skipping
    /// the keys that exist.
    async fn insert(
        &self,
        client: &deadpool_postgres::Client,
        records: &[AuditRecord],
        part: &[usize],
    ) -> Result<Vec<bool>, tokio_postgres::Error> {
        let personal = &self.settings.personal_fields;
        let all_new = self
            .conflicts_seen
            .lock()
            .expect("not poisoned")
            .is_none_or(|until| Instant::now() >= until);
        if all_new {
            match insert_rows(client, records, part, personal, InsertMode::AllNew).await {
                Err(e) if is_unique_violation(&e) => {
                    tracing::debug!(rows = part.len(), "a key of the batch is stored already; writing it again skipping stored keys");
                    *self.conflicts_seen.lock().expect("not poisoned") =
                        Some(Instant::now() + CONFLICT_PAUSE);
                }
                other => return other,
            }
        }
        insert_rows(client, records, part, personal, InsertMode::SkipExisting).await
    }

    /// Rows the INSERT did not return already existed: one query fetches
    /// their stored hashes. The same hash is a redelivery (`Duplicate`);
    /// another hash is a different event reusing the key (`Conflict`), which
    /// must be dead-lettered, never acknowledged as a duplicate.
    async fn resolve_unreturned(
        &self,
        client: &deadpool_postgres::Client,
        records: &[AuditRecord],
        idx: &[usize],
        outcomes: &mut [Option<StoreOutcome>],
    ) -> Result<(), String> {
        let stored = stored_hashes(client, records, idx)
            .await
            .map_err(|e| format!("looking up stored events: {}", crate::db::root_cause(&e)))?;
        let mut vanished = 0;
        for &i in idx {
            let r = &records[i];
            let key = (r.idempotency_key.clone(), r.event.event_time);
            outcomes[i] = match stored.get(&key) {
                Some(hash) if hash.eq_ignore_ascii_case(&r.event.hash) => {
                    Some(StoreOutcome::Duplicate)
                }
                Some(hash) => Some(StoreOutcome::Conflict {
                    stored_hash: hash.clone(),
                }),
                // Deleted between the two statements (only unsealed rows can
                // be): leave it unresolved so the next attempt inserts it.
                None => {
                    vanished += 1;
                    None
                }
            };
        }
        if vanished > 0 {
            return Err(format!(
                "{vanished} conflicting row(s) disappeared before they could be compared; retrying"
            ));
        }
        Ok(())
    }
}

/// The stored hash of each (idempotency key, event time) of the rows `idx`
/// that exists, in one statement (through the idempotency index).
async fn stored_hashes(
    client: &deadpool_postgres::Client,
    records: &[AuditRecord],
    idx: &[usize],
) -> Result<HashMap<(String, DateTime<Utc>), String>, tokio_postgres::Error> {
    let keys: Vec<&str> = idx
        .iter()
        .map(|&i| records[i].idempotency_key.as_str())
        .collect();
    let times: Vec<DateTime<Utc>> = idx.iter().map(|&i| records[i].event.event_time).collect();
    let rows = client
        .query(
            "SELECT a.idempotency_key, a.event_time, a.hash \
             FROM UNNEST($1::text[], $2::timestamptz[]) AS k(key, t) \
             JOIN audit_log a ON a.idempotency_key = k.key AND a.event_time = k.t",
            &[&keys, &times],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|row| ((row.get(0), row.get(1)), row.get(2)))
        .collect())
}

/// Sends the outcome of every resolved record not answered yet.
fn answer(
    outcomes: &[Option<StoreOutcome>],
    replies: &mut [Option<oneshot::Sender<StoreOutcome>>],
) {
    for (outcome, reply) in outcomes.iter().zip(replies.iter_mut()) {
        if let Some(outcome) = outcome {
            if let Some(reply) = reply.take() {
                let _ = reply.send(outcome.clone());
            }
        }
    }
}

/// "no partition of relation ... found for row": the row's month has no
/// partition (dropped after it was made). A check violation by its code,
/// but not the row's fault: transient, never a dead letter.
fn is_missing_partition(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        db.code() == &tokio_postgres::error::SqlState::CHECK_VIOLATION
            && db.message().starts_with("no partition of relation")
    })
}

/// A key stored already (or twice in the statement): the all-new INSERT
/// meets a redelivery.
fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.as_db_error()
        .is_some_and(|db| db.code() == &tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
}

/// One statement per batch: the rows, and (for the rows that were new) the
/// salts of their personal fields, so a row never exists without its salts.
/// Each input row takes its `id` from the sequence before the INSERT, so the
/// rows the INSERT returns are matched to their input (and their salts) by
/// that number: the statement returns the ordinal (1-based) of every input
/// row it inserted. When a batch holds one key twice, the first occurrence
/// is inserted and the later one returns nothing. `$salts_of` names the
/// rows whose salts are stored: those the INSERT returned, or, where every
/// row is inserted or the statement fails ([`InsertMode::AllNew`]), the
/// input itself, which spares PostgreSQL a join per batch.
macro_rules! insert_sql {
    ($on_conflict:literal, $salts_of:literal) => {
        concat!(
            "\
WITH input AS (
    SELECT i.*, nextval('audit_log_id_seq') AS id FROM UNNEST(
        $1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[], $6::text[],
        $7::text[], $8::text[], $9::text[], $10::text[],
        $11::text[], $12::text[], $13::bool[], $14::text[], $15::text[],
        $16::text[], $17::text[], $18::text[], $19::text[],
        $20::text[], $21::jsonb[], $22::jsonb[], $23::text[], $24::text[])
        WITH ORDINALITY AS i(idempotency_key, event_id, event_time, timestamp_raw, action, status,
            principal_id, organization_id, target_resource_type, target_resource_id,
            outcome_description, hash, hash_provided, signature, signature_algorithm,
            signature_key_id, event_version, correlation_id, data_classification,
            retention_policy, session_context, details, source, salts, n)
), inserted AS (
    INSERT INTO audit_log (
        id, idempotency_key, event_id, event_time, timestamp_raw, action, status,
        principal_id, organization_id, target_resource_type, target_resource_id,
        outcome_description, hash, hash_provided, signature, signature_algorithm,
        signature_key_id, event_version, correlation_id, data_classification,
        retention_policy, session_context, details, source)
    SELECT id, idempotency_key, event_id, event_time, timestamp_raw, action, status,
        principal_id, organization_id, target_resource_type, target_resource_id,
        outcome_description, hash, hash_provided, signature, signature_algorithm,
        signature_key_id, event_version, correlation_id, data_classification,
        retention_policy, session_context, details, source
      FROM input ORDER BY n
",
            $on_conflict,
            "    RETURNING id
), salted AS (
    INSERT INTO audit_salts (audit_id, salts)
    SELECT i.id, i.salts::json
      FROM ",
            $salts_of,
            "
     WHERE i.salts IS NOT NULL
)
SELECT i.n FROM inserted r JOIN input i USING (id)"
        )
    };
}

/// [`InsertMode::SkipExisting`].
const INSERT_SQL: &str = insert_sql!(
    "    ON CONFLICT (idempotency_key, event_time) DO NOTHING\n",
    "inserted r JOIN input i USING (id)"
);
/// [`InsertMode::AllNew`].
const INSERT_NEW_SQL: &str = insert_sql!("", "input i");

/// Inserts the rows `idx` of `records` in one statement and returns, for
/// each of `idx` in order, whether it was inserted (false: its key existed
/// already, or an earlier row of the same statement had it).
async fn insert_rows(
    client: &deadpool_postgres::Client,
    records: &[AuditRecord],
    idx: &[usize],
    personal: &PersonalFields,
    mode: InsertMode,
) -> Result<Vec<bool>, tokio_postgres::Error> {
    let rows: Vec<&AuditRecord> = idx.iter().map(|&i| &records[i]).collect();
    fn col<'a, T>(rows: &[&'a AuditRecord], f: impl Fn(&'a AuditRecord) -> T) -> Vec<T> {
        rows.iter().map(|r| f(r)).collect()
    }
    let key = col(&rows, |r| r.idempotency_key.as_str());
    let event_id = col(&rows, |r| r.event.event_id.as_deref());
    let time = col(&rows, |r| r.event.event_time);
    let raw_ts = col(&rows, |r| r.event.timestamp_raw.as_str());
    let action = col(&rows, |r| r.event.action.as_str());
    let status = col(&rows, |r| r.event.status.as_str());
    let principal = col(&rows, |r| r.event.principal_id.as_deref());
    let org = col(&rows, |r| r.event.organization_id.as_deref());
    let ttype = col(&rows, |r| r.event.target_resource_type.as_deref());
    let tid = col(&rows, |r| r.event.target_resource_id.as_deref());
    let outcome = col(&rows, |r| r.event.outcome_description.as_deref());
    let hash = col(&rows, |r| r.event.hash.as_str());
    let hash_provided = col(&rows, |r| r.event.hash_provided);
    let signature = col(&rows, |r| r.event.signature.as_deref());
    let sig_alg = col(&rows, |r| r.event.signature_algorithm.as_deref());
    let sig_key = col(&rows, |r| r.event.signature_key_id.as_deref());
    let version = col(&rows, |r| r.event.event_version.as_deref());
    let correlation = col(&rows, |r| r.event.correlation_id.as_deref());
    let class = col(&rows, |r| r.event.data_classification.as_deref());
    let retention = col(&rows, |r| r.event.retention_policy.as_deref());
    let session = col(&rows, |r| r.event.session_context.as_ref().map(Json));
    let details = col(&rows, |r| r.event.details.as_ref().map(Json));
    let source = col(&rows, |r| r.source.as_str());
    let salts = col(&rows, |r| {
        let e = &r.event;
        let paths = personal.present_in(
            e.principal_id.as_deref(),
            e.target_resource_id.as_deref(),
            e.session_context.as_ref(),
            e.details.as_ref(),
        );
        (!paths.is_empty()).then(|| salts_json_text(&new_salts(&paths)))
    });
    let returned = client
        .query(
            match mode {
                InsertMode::AllNew => INSERT_NEW_SQL,
                InsertMode::SkipExisting => INSERT_SQL,
            },
            &[
                &key,
                &event_id,
                &time,
                &raw_ts,
                &action,
                &status,
                &principal,
                &org,
                &ttype,
                &tid,
                &outcome,
                &hash,
                &hash_provided,
                &signature,
                &sig_alg,
                &sig_key,
                &version,
                &correlation,
                &class,
                &retention,
                &session,
                &details,
                &source,
                &salts,
            ],
        )
        .await?;
    let mut inserted = vec![false; idx.len()];
    for row in returned {
        let n: i64 = row.get(0);
        inserted[(n - 1) as usize] = true;
    }
    Ok(inserted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_follow_the_sink_section() {
        let c = crate::config::Config::load_from(
            None,
            figment::providers::Env::prefixed("AUDIT_WORKER_UNIT_TEST_UNSET__"),
        )
        .unwrap();
        let s = SinkSettings::from_config(&c.sink);
        assert_eq!(s.writers, 2);
        assert_eq!(s.backoff.nominal(1), Duration::from_secs(1));
        assert_eq!(s.max_attempts, 5);
    }
}
