//! The BullMQ source: audit events that Node services
//! add with BullMQ's `Queue.add` / `addBulk`.
//!
//! The protocol (fetching, locks and their renewal, stalled-job recovery,
//! completion, failure, retries and backoff) is bullmq-official's, BullMQ's
//! own Rust port, which runs BullMQ's Lua scripts; this module holds no
//! BullMQ Lua and builds no BullMQ key by hand. Each job becomes a
//! [`crate::message::Delivery`] for the [`Processor`] ([`handler`]), whose
//! disposition becomes the job's result. One [`bullmq::Worker`] runs
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
//! - A job's `data` is handed over parsed: lossily converted to UTF-8, its
//!   duplicate keys collapsed, and turned into `null` when it is not JSON.
//!   Every job's original bytes are read back (key from the crate's
//!   `QueueKeys`, see [`job_data`]), one script call serving all the jobs
//!   waiting for theirs ([`data_reader`]), so validation, the row and the
//!   dead letter see what the producer sent.
//! - The worker's event channel is unbounded and fills with two events per
//!   job unless someone reads it: [`drain_events`] reads it.
//! - Retried attempts do not record their `failedReason` on the job (Node's
//!   worker does): the reason is logged here instead.
//! - Exponential backoff ignores Node's `jitter` option (not worked around).
//!
//! Circuit breaker: [`gate_fetching`] pauses fetching while it is open (and
//! while the jobs in flight hold more than `bullmq.max_in_flight_data_bytes`
//! of data); `QueueHandler::hold_while_unwritable` holds jobs already
//! fetched.

pub mod data_reader;
pub mod handler;
pub mod job_data;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::source::RedisConn;
use bullmq::worker::WorkerEvent;
use bullmq::{Job, QueueKeys, Worker, WorkerOptions};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::config::{BullmqConfig, Config, Secret};
use crate::processor::Processor;
use crate::telemetry::Metrics;

use data_reader::JobDataReader;
use handler::QueueHandler;

/// What the jobs of every queue share.
pub(crate) struct Shared {
    prefix: String,
    dlq_key: String,
    /// Decides every job's outcome.
    processor: Processor,
    /// Our own Redis connection, for dead letters (never BullMQ's keys).
    commands: RedisConn,
    outage_retry_delay: Duration,
    /// Reads each job's raw data: our only access to BullMQ's keys.
    job_data: JobDataReader,
    /// Approximate bytes of the data of every job in flight (all queues).
    in_flight_bytes: AtomicU64,
    /// `bullmq.max_in_flight_data_bytes`: fetching pauses above it.
    max_in_flight_bytes: u64,
}

/// The BullMQ source; `run` consumes every configured queue until shutdown.
pub struct BullmqSource {
    settings: BullmqConfig,
    redis_url: Secret,
    consumer: String,
    commands: RedisConn,
    processor: Processor,
    dlq_key: String,
}

impl BullmqSource {
    /// Prepares the source (no I/O until `run`).
    pub fn new(config: &Config, commands: RedisConn, processor: Processor) -> Self {
        Self {
            settings: config.bullmq.clone(),
            redis_url: config.redis.url.clone(),
            consumer: config.consumer_name(),
            commands,
            processor,
            dlq_key: config.dlq.key.clone(),
        }
    }

    /// Runs one BullMQ worker per queue until the context's shutdown token
    /// fires, then closes them: jobs in flight get `close_timeout_ms` to
    /// finish; any still running after that keep their lock until it
    /// expires and BullMQ's stalled-job check puts them back in the queue.
    pub async fn run(self) {
        let shutdown = self.processor.shutdown().clone();
        let policy_of = self.processor.clone();
        let shared = Arc::new(Shared {
            prefix: self.settings.prefix.clone(),
            job_data: JobDataReader::start(
                self.commands.clone(),
                self.dlq_key.clone(),
                move || policy_of.policy().max_event_bytes,
                self.processor
                    .metrics()
                    .redis_errors
                    .with_label_values(&["bullmq_hget"]),
            ),
            dlq_key: self.dlq_key,
            processor: self.processor,
            commands: self.commands,
            outage_retry_delay: Duration::from_millis(self.settings.outage_retry_delay_ms),
            in_flight_bytes: AtomicU64::new(0),
            max_in_flight_bytes: self.settings.max_in_flight_data_bytes,
        });
        let mut queues = tokio::task::JoinSet::new();
        for queue in &self.settings.queues {
            let handler = Arc::new(QueueHandler::new(
                queue,
                QueueKeys::new(queue, Some(&shared.prefix)),
                shared.clone(),
            ));
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
    let queue = handler.queue().to_owned();
    let shared = handler.shared().clone();
    let metrics = shared.processor.metrics().clone();
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
/// Jobs already in flight when it opens wait in `QueueHandler::hold_while_unwritable`.
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
            _ = shared.processor.shutdown().cancelled() => return,
        }
        let unwritable = !shared.processor.sink().breaker().is_writable();
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
pub(crate) struct InFlight<'a> {
    counter: &'a AtomicU64,
    bytes: u64,
}

impl<'a> InFlight<'a> {
    pub(crate) fn new(counter: &'a AtomicU64, bytes: u64) -> Self {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
