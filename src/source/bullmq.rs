//! The BullMQ source (DESIGN.md section 3): audit events that Node services
//! add with BullMQ's `Queue.add` / `addBulk`.
//!
//! The protocol (fetching, locks and their renewal, stalled-job recovery,
//! completion, failure, retries and backoff) is bullmq-official's, BullMQ's
//! own Rust port, which runs BullMQ's Lua scripts; this module holds no
//! BullMQ Lua and builds no BullMQ key by hand. One [`bullmq::Worker`] runs
//! per configured queue, with a high concurrency: every job hands its event
//! to the shared batching sink and waits for its row to commit, so the many
//! jobs in flight at once share one database round trip.
//!
//! What each job becomes:
//!
//! | what happened to the event                     | the job                                   |
//! |------------------------------------------------|-------------------------------------------|
//! | stored (a new row, or one already there)       | completed, JSON return value              |
//! | a job request (export, snapshot) accepted      | completed with its handler's JSON value   |
//! | rejected for good (invalid, hash or signature  | dead letter written to `audit:dlq`, then  |
//! | mismatch, unknown kind, refused by PostgreSQL) | failed as unrecoverable (no retries)      |
//! | database unavailable, or the DLQ write failed  | attempt failed: BullMQ retries it with    |
//! |                                                | the job's own `attempts` and `backoff`    |
//! | ... and that was the job's last attempt        | moved back to delayed, attempt not spent  |
//!
//! The last row is ours, not BullMQ's: an outage is not the event's fault,
//! and a job failed for good because PostgreSQL was down would be an event
//! lost (neither stored nor dead-lettered). So a job never fails for an
//! infrastructure reason; it waits in `delayed` and comes back.
//!
//! Gaps in bullmq-official 1.4.4 worked around here (see the README too):
//! - A job's `data` is handed over parsed; when it is not JSON the crate
//!   silently turns it into `null`. For such jobs the original bytes are
//!   read back with one HGET (key from the crate's [`QueueKeys`]) so the
//!   dead letter keeps them.
//! - The worker's event channel is unbounded and fills with two events per
//!   job unless someone reads it: [`drain_events`] reads it.
//! - Retried attempts do not record their `failedReason` on the job (Node's
//!   worker does): the reason is logged here instead.
//! - Exponential backoff ignores Node's `jitter` option (not worked around).
//!
//! Circuit breaker: [`gate_fetching`] pauses fetching while it is open (and
//! while the jobs in flight hold more than `bullmq.max_in_flight_data_bytes`
//! of data); [`QueueHandler::hold_while_unwritable`] holds jobs already
//! fetched.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bullmq::worker::WorkerEvent;
use bullmq::{Job, QueueKeys, Worker, WorkerOptions};
use redis::aio::ConnectionManager;
use redis::Value as RedisValue;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::SourceContext;
use crate::config::{BullmqConfig, Config, Secret};
use crate::dlq::DeadLetter;
use crate::event::{RejectReason, Rejection, ValidationPolicy};
use crate::jobs::{JobError, JobHandlers};
use crate::processor::{process_message, JobKind, AUDIT_EVENT};
use crate::sink::{SinkHandle, StoreOutcome};
use crate::telemetry::Metrics;

/// The `source` label of this source's metrics.
const SOURCE: &str = "bullmq";

/// Reads a job's raw data, or dead-letters it inside Redis when it is too
/// large (see [`QueueHandler::job_bytes`]). Hand-written because the crate
/// offers no raw read; it reads one field of the job's hash and writes only
/// our DLQ, never BullMQ's state.
pub const JOB_DATA_LUA: &str = include_str!("job_data.lua");

/// A job's data as [`JOB_DATA_LUA`] found it.
#[derive(Debug, PartialEq, Eq)]
pub enum JobData {
    /// The bytes the producer stored (`null` for a job whose hash has no
    /// data, as BullMQ itself reads it).
    Bytes(Vec<u8>),
    /// Over `validation.max_event_bytes`: already dead-lettered.
    DeadLettered { bytes: u64 },
}

/// Parses the script's reply: `{-1}`, `{size}` or `{size, data}`.
pub fn parse_job_data(v: RedisValue) -> Option<JobData> {
    let RedisValue::Array(parts) = v else {
        return None;
    };
    let mut parts = parts.into_iter();
    let size = match parts.next()? {
        RedisValue::Int(n) => n,
        _ => return None,
    };
    match (size, parts.next()) {
        (-1, None) => Some(JobData::Bytes(b"null".to_vec())),
        (n, None) if n >= 0 => Some(JobData::DeadLettered {
            bytes: u64::try_from(n).ok()?,
        }),
        (_, Some(RedisValue::BulkString(data))) => Some(JobData::Bytes(data)),
        _ => None,
    }
}

/// What the jobs of every queue share.
struct Shared {
    prefix: String,
    dlq_key: String,
    policy: Arc<ValidationPolicy>,
    sink: SinkHandle,
    /// Where requests of the other job kinds (export, snapshot) go.
    jobs: JobHandlers,
    /// Our own Redis connection, for dead letters (never BullMQ's keys,
    /// except the one read in [`QueueHandler::job_bytes`]).
    commands: ConnectionManager,
    metrics: Metrics,
    /// Stored events offered to the security alert rules.
    alerts: crate::alerts::AlertTap,
    outage_retry_delay: Duration,
    /// [`JOB_DATA_LUA`], loaded once per connection (EVALSHA).
    job_data: redis::Script,
    /// Approximate bytes of the data of every job in flight (all queues).
    in_flight_bytes: AtomicU64,
    /// `bullmq.max_in_flight_data_bytes`: fetching pauses above it.
    max_in_flight_bytes: u64,
    /// Fires on shutdown; releases jobs held at the breaker gate.
    shutdown: CancellationToken,
}

/// The BullMQ source; `run` consumes every configured queue until shutdown.
pub struct BullmqSource {
    settings: BullmqConfig,
    redis_url: Secret,
    consumer: String,
    commands: ConnectionManager,
    ctx: SourceContext,
    dlq_key: String,
}

impl BullmqSource {
    /// Prepares the source (no I/O until `run`).
    pub fn new(config: &Config, commands: ConnectionManager, ctx: SourceContext) -> Self {
        Self {
            settings: config.bullmq.clone(),
            redis_url: config.redis.url.clone(),
            consumer: config.consumer_name(),
            commands,
            ctx,
            dlq_key: config.dlq.key.clone(),
        }
    }

    /// Runs one BullMQ worker per queue until the context's shutdown token
    /// fires, then closes them: jobs in flight get `close_timeout_ms` to
    /// finish; any still running after that keep their lock until it
    /// expires and BullMQ's stalled-job check puts them back in the queue.
    pub async fn run(self) {
        let shutdown = self.ctx.shutdown.clone();
        let shared = Arc::new(Shared {
            prefix: self.settings.prefix.clone(),
            dlq_key: self.dlq_key,
            policy: self.ctx.policy,
            sink: self.ctx.sink,
            jobs: self.ctx.jobs,
            commands: self.commands,
            metrics: self.ctx.metrics,
            alerts: self.ctx.alerts,
            outage_retry_delay: Duration::from_millis(self.settings.outage_retry_delay_ms),
            job_data: redis::Script::new(JOB_DATA_LUA),
            in_flight_bytes: AtomicU64::new(0),
            max_in_flight_bytes: self.settings.max_in_flight_data_bytes,
            shutdown: shutdown.clone(),
        });
        let mut queues = tokio::task::JoinSet::new();
        for queue in &self.settings.queues {
            let handler = Arc::new(QueueHandler {
                keys: QueueKeys::new(queue, Some(&shared.prefix)),
                queue: queue.clone(),
                shared: shared.clone(),
            });
            // bullmq-official fetches with one driver per Worker (one
            // moveToActive round trip at a time), which measured far below
            // Node's worker; several Workers per queue fetch in parallel.
            let n = self.settings.workers_per_queue.max(1);
            for i in 0..n {
                let mut opts = worker_options(&self.settings, &self.redis_url, &self.consumer);
                opts.concurrency = self.settings.concurrency.div_ceil(n);
                if n > 1 {
                    opts.name = Some(format!("{}-{i}", self.consumer));
                }
                queues.spawn(run_queue(
                    handler.clone(),
                    opts,
                    self.settings.close_timeout_ms,
                    shutdown.clone(),
                ));
            }
        }
        drop(shared);
        while let Some(r) = queues.join_next().await {
            if let Err(e) = r {
                tracing::error!(error = %e, "a BullMQ queue task failed");
            }
        }
    }
}

/// The crate's worker options from `[bullmq]` and `[redis] url`.
fn worker_options(settings: &BullmqConfig, url: &Secret, consumer: &str) -> WorkerOptions {
    let mut opts = WorkerOptions {
        prefix: settings.prefix.clone(),
        // Stored on each job as `processedBy`, and in the connection name
        // that Node's `Queue.getWorkers()` lists.
        name: Some(consumer.to_owned()),
        concurrency: settings.concurrency,
        lock_duration: settings.lock_duration_ms,
        stalled_interval: settings.stalled_interval_ms,
        max_stalled_count: settings.max_stalled_count,
        drain_delay: settings.drain_delay_secs,
        ..WorkerOptions::default()
    };
    // The options' Debug redacts credentials in the URL.
    opts.connection.url = url.expose().to_owned();
    opts
}

/// Starts the worker of one queue (retrying while Redis is unreachable),
/// reads its events, and closes it on shutdown.
async fn run_queue(
    handler: Arc<QueueHandler>,
    opts: WorkerOptions,
    close_timeout_ms: u64,
    shutdown: CancellationToken,
) {
    let queue = handler.queue.clone();
    let metrics = handler.shared.metrics.clone();
    let shared = handler.shared.clone();
    let mut failures: u32 = 0;
    let worker = loop {
        if shutdown.is_cancelled() {
            return;
        }
        let h = handler.clone();
        let processor = move |job: Job, _cancel| {
            let h = h.clone();
            async move { h.handle(job).await }
        };
        match Worker::with_options(&queue, processor, opts.clone()).await {
            Ok(worker) => break Arc::new(worker),
            Err(e) => {
                failures += 1;
                metrics
                    .redis_errors
                    .with_label_values(&["bullmq_worker"])
                    .inc();
                tracing::warn!(queue = %queue, error = %e, "cannot start the BullMQ worker (is Redis up? see redis.url); retrying");
                let delay = Duration::from_millis((200u64 << failures.min(5)).min(5_000));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    };
    drop(handler);
    tracing::info!(
        queue = %queue,
        prefix = %opts.prefix,
        concurrency = opts.concurrency,
        "BullMQ source consuming"
    );
    let events = tokio::spawn(drain_events(worker.clone(), queue.clone(), metrics));
    gate_fetching(&worker, &shared, &queue).await;
    drop(shared);
    let in_flight = worker.active_count().await;
    tracing::info!(
        queue = %queue,
        in_flight,
        "closing the BullMQ worker; letting jobs in flight finish"
    );
    if let Err(e) = worker.close(close_timeout_ms).await {
        tracing::warn!(queue = %queue, error = %e, "closing the BullMQ worker failed; jobs in flight will be recovered as stalled");
    }
    let left = worker.active_count().await;
    if left > 0 {
        tracing::warn!(queue = %queue, in_flight = left, "close timeout passed with jobs in flight; BullMQ's stalled-job check will put them back in the queue");
    }
    // The event channel never closes while the worker exists: stop reading.
    events.abort();
    tracing::info!(queue = %queue, "BullMQ worker closed");
}

/// How often [`gate_fetching`] looks at the breaker and the bytes in flight.
const GATE_POLL: Duration = Duration::from_millis(20);

/// Runs until shutdown, pausing the worker's fetching while the circuit
/// breaker is open, as the stream source stops reading: jobs stay `waiting`
/// in BullMQ (for any healthy worker) instead of being taken and held. The
/// crate's pause also stops the fetch chained to each job's completion.
/// Jobs already in flight when it opens wait at [`QueueHandler::hold_while_unwritable`].
///
/// Fetching also pauses while the data of the jobs in flight exceeds
/// `bullmq.max_in_flight_data_bytes`: bullmq-official fetches a job whole
/// (and holds it parsed) before our processor sees it, so without this a
/// flood of huge jobs would fill memory up to concurrency x job size.
async fn gate_fetching(worker: &Worker, shared: &Shared, queue: &str) {
    let mut paused_for_breaker = false;
    let mut paused_for_memory = false;
    loop {
        // Neither the breaker nor the byte count notify: poll (cheap loads).
        tokio::select! {
            _ = tokio::time::sleep(GATE_POLL) => {}
            _ = shared.shutdown.cancelled() => return,
        }
        let unwritable = !shared.sink.breaker().is_writable();
        let full = shared.in_flight_bytes.load(Ordering::Relaxed) > shared.max_in_flight_bytes;
        if unwritable != paused_for_breaker {
            paused_for_breaker = unwritable;
            if unwritable {
                tracing::warn!(queue = %queue, "database unwritable (circuit breaker open): BullMQ worker stops fetching");
            } else {
                tracing::info!(queue = %queue, "database writable again: BullMQ worker fetches again");
            }
        }
        if full != paused_for_memory {
            paused_for_memory = full;
            tracing::debug!(queue = %queue, paused = full, "jobs in flight over bullmq.max_in_flight_data_bytes: fetching paused until they finish");
        }
        let pause = paused_for_breaker || paused_for_memory;
        if pause != worker.is_paused() {
            if pause {
                worker.pause();
            } else {
                worker.resume();
            }
        }
    }
}

/// Approximate bytes a job's data takes, as the crate holds it: the length
/// of every string and key, plus a little per value. Cheap next to the
/// parse that produced it; only has to be right in size, not exact.
pub fn approx_data_bytes(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.len() as u64 + 8,
        Value::Array(items) => 8 + items.iter().map(approx_data_bytes).sum::<u64>(),
        Value::Object(map) => {
            8 + map
                .iter()
                .map(|(k, v)| k.len() as u64 + approx_data_bytes(v))
                .sum::<u64>()
        }
        _ => 8,
    }
}

/// Counts a job's data in [`Shared::in_flight_bytes`] while it is alive.
struct InFlight<'a> {
    counter: &'a AtomicU64,
    bytes: u64,
}

impl<'a> InFlight<'a> {
    fn new(counter: &'a AtomicU64, bytes: u64) -> Self {
        counter.fetch_add(bytes, Ordering::Relaxed);
        Self { counter, bytes }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Reads the worker's event channel, which is unbounded in bullmq-official
/// 1.4.4 and would otherwise keep two events per processed job forever.
/// Errors (Redis trouble inside the crate) become a metric and a log line.
async fn drain_events(worker: Arc<Worker>, queue: String, metrics: Metrics) {
    while let Some(event) = worker.next_event().await {
        match event {
            WorkerEvent::Error(e) => {
                metrics
                    .redis_errors
                    .with_label_values(&["bullmq_worker"])
                    .inc();
                tracing::warn!(queue = %queue, error = %e, "BullMQ worker error; it retries by itself");
            }
            WorkerEvent::Stalled { job_id } => {
                tracing::info!(queue = %queue, job_id = %job_id, "stalled job put back in the queue");
            }
            _ => {}
        }
    }
}

/// Whether a job may go on, or must be given back because we shut down.
enum Gate {
    Proceed,
    ShuttingDown,
}

/// Turns the jobs of one queue into stored rows or dead letters.
struct QueueHandler {
    queue: String,
    keys: QueueKeys,
    shared: Arc<Shared>,
}

impl QueueHandler {
    /// The processor: decides the job's outcome (module docs, table).
    async fn handle(&self, job: Job) -> Result<Value, bullmq::Error> {
        let _in_flight = InFlight::new(&self.shared.in_flight_bytes, approx_data_bytes(job.data()));
        if let Gate::ShuttingDown = self.hold_while_unwritable().await {
            return self.give_back(&job).await;
        }
        let source = format!("bullmq:{}:{}", self.queue, job.id());
        let name = match job.name() {
            "" => AUDIT_EVENT.to_owned(),
            n => n.to_owned(),
        };
        let data = match self.job_bytes(&job, &name, &source).await {
            Ok(JobData::Bytes(data)) => data,
            Ok(JobData::DeadLettered { bytes }) => {
                return Err(self.dead_lettered_in_redis(bytes, &source))
            }
            Err(cause) => return self.transient(&job, cause).await,
        };
        let kind = JobKind::from_name(&name);
        if kind != JobKind::AuditEvent {
            // A job request (export, snapshot): its handler records it and
            // answers for the requester; no handler means `unknown_kind`.
            return match self.shared.jobs.accept(kind, &name, &data, &source).await {
                Ok(value) => Ok(value),
                Err(JobError::Rejected(rejection)) => {
                    self.dead_letter(&job, data, name, rejection, source).await
                }
                Err(JobError::Transient(cause)) => self.transient(&job, cause).await,
            };
        }
        let record = match process_message(&name, &data, &source, &self.shared.policy) {
            Ok(record) => record,
            Err(rejection) => return self.dead_letter(&job, data, name, rejection, source).await,
        };
        let key = record.idempotency_key.clone();
        let hash = record.event.hash.clone();
        let record_key = record.key();
        // Same extras as the stream source: the producer's trace continued
        // into the store span, the rule input for alerts, and the enqueue
        // time (the job's timestamp) for end-to-end latency.
        let parent = crate::tracing_ctx::from_job_data(job.data());
        let span = crate::tracing_ctx::event_span("bullmq", parent.as_ref());
        let alert = self
            .shared
            .alerts
            .wants(&record.event)
            .then(|| crate::alerts::AlertInput::from_event(&record.event, &record.source));
        let outcome = self.shared.sink.submit(record).await.wait().await;
        if let Some(span) = &span {
            match &outcome {
                StoreOutcome::Inserted => span.record("outcome", "inserted"),
                StoreOutcome::Duplicate => span.record("outcome", "duplicate"),
                _ => span,
            };
        }
        if outcome == StoreOutcome::Inserted {
            self.shared
                .metrics
                .observe_end_to_end("bullmq", i64::try_from(job.timestamp()).unwrap_or(i64::MAX));
            if let Some(input) = alert {
                self.shared.alerts.offer(input);
            }
        }
        match outcome {
            StoreOutcome::Inserted => Ok(self.stored(key, hash, "inserted")),
            StoreOutcome::Duplicate => Ok(self.stored(key, hash, "duplicate")),
            StoreOutcome::Rejected(rejection) => {
                self.dead_letter(&job, data, name, rejection, source).await
            }
            StoreOutcome::Conflict { stored_hash } => {
                let rejection = record_key.conflict(&stored_hash);
                self.dead_letter(&job, data, name, rejection, source).await
            }
            StoreOutcome::Unavailable(cause) => {
                self.transient(&job, format!("database unavailable: {cause}"))
                    .await
            }
        }
    }

    /// The circuit breaker's hold on jobs already fetched when it opened
    /// (fetching itself is paused by [`gate_fetching`]): such a job
    /// waits here, keeping its BullMQ lock (the crate renews it), instead of
    /// spending an attempt on a write that cannot succeed. On shutdown held
    /// jobs are given back to the queue.
    async fn hold_while_unwritable(&self) -> Gate {
        // Resolves at once while the breaker is closed.
        if self.shared.sink.wait_writable(&self.shared.shutdown).await {
            Gate::Proceed
        } else {
            Gate::ShuttingDown
        }
    }

    /// Puts a job back in the queue without spending an attempt (shutdown
    /// while it was held at the gate or its write was pending). If even
    /// that fails, the job keeps its lock until it expires and the stalled
    /// check puts it back.
    async fn give_back(&self, job: &Job) -> Result<Value, bullmq::Error> {
        if let Err(e) = job.move_to_wait(None).await {
            tracing::warn!(queue = %self.queue, job_id = %job.id(), error = %e, "could not give the job back; the stalled-job check will");
        }
        // `Delayed` tells the crate the job was already moved: nothing more to do.
        Err(bullmq::Error::Delayed)
    }

    /// The job's data exactly as the producer stored it, for validation,
    /// the row and the dead letter, read with [`JOB_DATA_LUA`].
    ///
    /// bullmq-official hands the data over parsed: its bytes went through
    /// a lossy UTF-8 conversion (invalid bytes become U+FFFD) and a JSON
    /// parse that keeps the last of duplicate keys and turns data that is
    /// not JSON into `null`. Validating that would store what the producer
    /// never sent, where the stream source refuses it, so every job's raw
    /// bytes are read back (one pipelined round trip beside the crate's
    /// own). Data over `validation.max_event_bytes` is dead-lettered inside
    /// Redis by the same script instead of being read again.
    async fn job_bytes(&self, job: &Job, name: &str, source: &str) -> Result<JobData, String> {
        let mut conn = self.shared.commands.clone();
        let key = self.keys.job_key(job.id());
        let failed_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let attempts = u64::from(job.attempts_made()) + 1;
        let mut last = String::new();
        for attempt in 1..=3u64 {
            let r: redis::RedisResult<RedisValue> = self
                .shared
                .job_data
                .key(&key)
                .key(&self.shared.dlq_key)
                .arg(self.shared.policy.max_event_bytes)
                .arg(name)
                .arg(source)
                .arg(&failed_at)
                .arg(attempts)
                .invoke_async(&mut conn)
                .await;
            match r.map(parse_job_data) {
                Ok(Some(data)) => return Ok(data),
                Ok(None) => {
                    last = "unexpected reply from the job data script".into();
                }
                Err(e) => {
                    self.shared
                        .metrics
                        .redis_errors
                        .with_label_values(&["bullmq_hget"])
                        .inc();
                    last = e.to_string();
                }
            }
            tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
        }
        Err(format!("cannot read the job's raw data from Redis: {last}"))
    }

    /// Counts and logs a job whose data [`JOB_DATA_LUA`] dead-lettered,
    /// and the error that fails it for good.
    fn dead_lettered_in_redis(&self, bytes: u64, source: &str) -> bullmq::Error {
        let m = &self.shared.metrics;
        let reason = RejectReason::TooLarge.code();
        m.events.with_label_values(&[SOURCE, "dead_lettered"]).inc();
        m.dead_letters.with_label_values(&[reason]).inc();
        let error = format!(
            "event is {bytes} bytes, the limit is {} (validation.max_event_bytes)",
            self.shared.policy.max_event_bytes
        );
        tracing::info!(reason, %source, %error, "dead-lettered inside Redis without reading it again");
        bullmq::Error::Unrecoverable(format!("{reason}: {error}"))
    }

    /// The return value of a stored event, for the producer.
    fn stored(&self, key: String, hash: String, outcome: &'static str) -> Value {
        self.shared
            .metrics
            .events
            .with_label_values(&[SOURCE, outcome])
            .inc();
        json!({ "idempotencyKey": key, "stored": outcome, "hash": hash })
    }

    /// Writes the dead letter, then fails the job for good. If the dead
    /// letter cannot be written the job must not fail for good (the letter
    /// has to exist first): that becomes a transient failure.
    async fn dead_letter(
        &self,
        job: &Job,
        data: Vec<u8>,
        name: String,
        rejection: Rejection,
        source: String,
    ) -> Result<Value, bullmq::Error> {
        let reason = format!("{}: {}", rejection.reason.code(), rejection.message);
        let letter = DeadLetter {
            data,
            name,
            reason: rejection.reason,
            error: rejection.message,
            source,
            attempts: u64::from(job.attempts_made()) + 1,
        };
        let mut pipe = redis::pipe();
        letter.add_to(&mut pipe, &self.shared.dlq_key);
        let mut conn = self.shared.commands.clone();
        let mut written = Err(String::new());
        // The first command after a dropped connection fails (the manager
        // reconnects behind it), so retry. An XADD whose reply was lost may
        // leave a second copy of the letter: the DLQ is at-least-once.
        for attempt in 1..=3u64 {
            match pipe.query_async::<()>(&mut conn).await {
                Ok(()) => {
                    written = Ok(());
                    break;
                }
                Err(e) => {
                    self.shared
                        .metrics
                        .redis_errors
                        .with_label_values(&["dlq_xadd"])
                        .inc();
                    written = Err(e.to_string());
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
            }
        }
        if let Err(e) = written {
            return self
                .transient(job, format!("could not write the dead letter ({e})"))
                .await;
        }
        let m = &self.shared.metrics;
        m.events.with_label_values(&[SOURCE, "dead_lettered"]).inc();
        m.dead_letters
            .with_label_values(&[letter.reason.code()])
            .inc();
        tracing::info!(reason = letter.reason.code(), source = %letter.source, error = %letter.error, "dead-lettered");
        Err(bullmq::Error::Unrecoverable(reason))
    }

    /// A failure that is not the event's fault. While the job has attempts
    /// left, fail this one and let BullMQ retry with the job's own
    /// `attempts` and `backoff`; on its last attempt, move it back to
    /// delayed without spending the attempt, so it is never failed for good.
    async fn transient(&self, job: &Job, cause: String) -> Result<Value, bullmq::Error> {
        if self.shared.shutdown.is_cancelled() {
            // The sink gave up because we are stopping, not because of the
            // event: hand the job back without spending an attempt.
            tracing::info!(queue = %self.queue, job_id = %job.id(), %cause, "shutting down; job given back to the queue");
            return self.give_back(job).await;
        }
        self.shared
            .metrics
            .events
            .with_label_values(&[SOURCE, "deferred"])
            .inc();
        // The crate treats a job without `attempts` as one attempt, as Node does.
        let attempts = job.opts().attempts.unwrap_or(0).max(1);
        let attempt = job.attempts_made() + 1;
        if attempt < attempts {
            tracing::warn!(queue = %self.queue, job_id = %job.id(), attempt, attempts, %cause, "attempt failed; BullMQ retries it");
            return Err(bullmq::Error::ProcessingError(format!(
                "{cause} (attempt {attempt} of {attempts}; retried with the job's backoff)"
            )));
        }
        let delay = self.shared.outage_retry_delay;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let until = u64::try_from((now + delay).as_millis()).unwrap_or(u64::MAX);
        match job.move_to_delayed(until).await {
            Ok(()) => {
                tracing::warn!(queue = %self.queue, job_id = %job.id(), ?delay, %cause, "last attempt could not store the event; delayed without spending it");
            }
            Err(e) => {
                tracing::warn!(queue = %self.queue, job_id = %job.id(), error = %e, %cause, "could not delay the job; the stalled-job check will put it back");
            }
        }
        // The job was moved (or is left locked for the stalled check):
        // `Delayed` tells the crate not to finish it.
        Err(bullmq::Error::Delayed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approximate_data_size_follows_the_strings_a_job_holds() {
        let small =
            json!({"timestamp": "2026-01-01T00:00:00Z", "action": "a", "status": "success"});
        assert!(approx_data_bytes(&small) < 200);
        let big = json!({"blob": "A".repeat(10 << 20), "n": [1, 2, {"k": "v"}]});
        let size = approx_data_bytes(&big);
        assert!((10 << 20..(10 << 20) + 200).contains(&size), "{size}");
        assert_eq!(approx_data_bytes(&Value::Null), 8);
    }

    #[test]
    fn job_data_replies_parse_to_bytes_a_dead_letter_or_a_missing_job() {
        use redis::Value as R;
        assert_eq!(
            parse_job_data(R::Array(vec![R::Int(3), R::BulkString(b"{\xff}".to_vec())])),
            Some(JobData::Bytes(b"{\xff}".to_vec()))
        );
        assert_eq!(
            parse_job_data(R::Array(vec![R::Int(10_485_760)])),
            Some(JobData::DeadLettered { bytes: 10_485_760 })
        );
        assert_eq!(
            parse_job_data(R::Array(vec![R::Int(-1)])),
            Some(JobData::Bytes(b"null".to_vec()))
        );
        assert_eq!(parse_job_data(R::Nil), None);
    }

    #[test]
    fn worker_options_carry_the_bullmq_settings_and_hide_the_redis_password() {
        let mut config = Config::load_from(
            None,
            figment::providers::Env::prefixed("AUDIT_WORKER_UNIT_TEST_UNSET__"),
        )
        .unwrap();
        config.bullmq.concurrency = 321;
        config.bullmq.prefix = "audit".into();
        config.bullmq.lock_duration_ms = 12_000;
        config.bullmq.max_stalled_count = 4;
        let url = Secret::from("redis://:hunter2@127.0.0.1:6379".to_string());
        let opts = worker_options(&config.bullmq, &url, "host-1");
        assert_eq!(opts.concurrency, 321);
        assert_eq!(opts.prefix, "audit");
        assert_eq!(opts.lock_duration, 12_000);
        assert_eq!(opts.max_stalled_count, 4);
        assert_eq!(opts.stalled_interval, config.bullmq.stalled_interval_ms);
        assert_eq!(opts.drain_delay, config.bullmq.drain_delay_secs);
        assert_eq!(opts.name.as_deref(), Some("host-1"));
        assert_eq!(opts.connection.url, url.expose());
        let debug = format!("{opts:?} {:?}", opts.connection);
        assert!(!debug.contains("hunter2"), "{debug}");
    }
}
