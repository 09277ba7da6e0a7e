//! One BullMQ job, from fetch to result: the job becomes a [`Delivery`],
//! the [`crate::processor::Processor`] decides, and the disposition
//! becomes what BullMQ records (see the table in the module above):
//! completed with a JSON return value, failed for good after its dead
//! letter is written, or handed back without spending an attempt.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bullmq::{Job, QueueKeys};
use serde_json::Value;

use super::job_data::JobData;
use super::{approx_data_bytes, InFlight, Shared};
use crate::dlq::DeadLetter;
use crate::dlq::RejectReason;
use crate::message::{Delivery, Disposition, SourceKind};
use crate::processor::AUDIT_EVENT;

/// Whether a job may go on, or must be given back because we shut down.
enum Gate {
    Proceed,
    ShuttingDown,
}

/// Turns the jobs of one queue into stored rows or dead letters.
pub(crate) struct QueueHandler {
    queue: String,
    keys: QueueKeys,
    shared: Arc<Shared>,
}

impl QueueHandler {
    /// The handler of one queue.
    pub(crate) fn new(queue: &str, keys: QueueKeys, shared: Arc<Shared>) -> Self {
        Self {
            queue: queue.to_owned(),
            keys,
            shared,
        }
    }

    /// The queue's name.
    pub(crate) fn queue(&self) -> &str {
        &self.queue
    }

    /// What every queue shares.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Handles one job: its delivery, the processor's decision, the result.
    pub(crate) async fn handle(&self, job: Job) -> Result<Value, bullmq::Error> {
        let _in_flight = InFlight::new(&self.shared.in_flight_bytes, approx_data_bytes(job.data()));
        if let Gate::ShuttingDown = self.hold_while_unwritable().await {
            return self.give_back(&job).await;
        }
        let identity = format!("bullmq:{}:{}", self.queue, job.id());
        let name = match job.name() {
            "" => AUDIT_EVENT.to_owned(),
            n => n.to_owned(),
        };
        let data = match self.job_bytes(&job, &name, &identity).await {
            Ok(JobData::Bytes(data)) => data,
            Ok(JobData::DeadLettered { bytes }) => {
                return Err(self.dead_lettered_in_redis(bytes, &identity))
            }
            Err(cause) => return self.transient(&job, cause).await,
        };
        let delivery = Delivery {
            source: SourceKind::Bullmq,
            identity,
            name,
            data: Some(data),
            side_bytes: 0,
            attempts: u64::from(job.attempts_made()) + 1,
            // BullMQ retries with the job's own attempts and backoff.
            wait_out_outages: false,
            // BullMQ bounds redeliveries itself (attempts, stalled limit).
            max_deliveries: None,
            trace: crate::tracing_ctx::from_job_data(job.data()),
            enqueued_ms: i64::try_from(job.timestamp()).ok(),
        };
        let processor = &self.shared.processor;
        match processor.process(delivery).await {
            Disposition::DeadLetter(letter) => self.dead_letter(&job, letter).await,
            Disposition::Retry { cause } => self.transient(&job, cause).await,
            done => {
                let reply = done.reply();
                processor.settled(SourceKind::Bullmq, [&done]);
                Ok(reply)
            }
        }
    }

    /// The circuit breaker's hold on jobs already fetched when it opened
    /// (fetching itself is paused by `gate_fetching`): such a job waits
    /// here, keeping its BullMQ lock (the crate renews it), instead of
    /// spending an attempt on a write that cannot succeed. On shutdown held
    /// jobs are given back to the queue.
    async fn hold_while_unwritable(&self) -> Gate {
        let processor = &self.shared.processor;
        // Resolves at once while the breaker is closed.
        if processor.sink().wait_writable(processor.shutdown()).await {
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
    /// the row and the dead letter, read with the job data script.
    ///
    /// bullmq-official hands the data over parsed: its bytes went through
    /// a lossy UTF-8 conversion (invalid bytes become U+FFFD) and a JSON
    /// parse that keeps the last of duplicate keys and turns data that is
    /// not JSON into `null`. Validating that would store what the producer
    /// never sent, where the stream source refuses it, so every job's raw
    /// bytes are read back, in groups shared by the jobs in flight
    /// ([`super::data_reader`]). Data over `validation.max_event_bytes` is
    /// dead-lettered inside Redis by the same script instead of being read
    /// again.
    async fn job_bytes(&self, job: &Job, name: &str, source: &str) -> Result<JobData, String> {
        let attempts = u64::from(job.attempts_made()) + 1;
        self.shared
            .job_data
            .read(self.keys.job_key(job.id()), name, source, attempts)
            .await
    }

    /// Counts and logs a job whose data the script dead-lettered, and the
    /// error that fails it for good.
    fn dead_lettered_in_redis(&self, bytes: u64, source: &str) -> bullmq::Error {
        let reason = RejectReason::TooLarge;
        self.shared
            .processor
            .dead_lettered_in_redis(SourceKind::Bullmq, reason, 1);
        let error = format!(
            "event is {bytes} bytes, the limit is {} (validation.max_event_bytes)",
            self.shared.processor.policy().max_event_bytes
        );
        tracing::info!(reason = reason.code(), %source, %error, "dead-lettered inside Redis without reading it again");
        bullmq::Error::Unrecoverable(format!("{}: {error}", reason.code()))
    }

    /// Writes the dead letter, then fails the job for good. If the dead
    /// letter cannot be written the job must not fail for good (the letter
    /// has to exist first): that becomes a transient failure.
    async fn dead_letter(&self, job: &Job, letter: DeadLetter) -> Result<Value, bullmq::Error> {
        let reason = format!("{}: {}", letter.reason.code(), letter.error);
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
                        .processor
                        .metrics()
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
        self.shared
            .processor
            .settled(SourceKind::Bullmq, [&Disposition::DeadLetter(letter)]);
        Err(bullmq::Error::Unrecoverable(reason))
    }

    /// A failure that is not the event's fault. While the job has attempts
    /// left, fail this one and let BullMQ retry with the job's own
    /// `attempts` and `backoff`; on its last attempt, move it back to
    /// delayed without spending the attempt, so it is never failed for good.
    async fn transient(&self, job: &Job, cause: String) -> Result<Value, bullmq::Error> {
        let processor = &self.shared.processor;
        if processor.shutdown().is_cancelled() {
            // The sink gave up because we are stopping, not because of the
            // event: hand the job back without spending an attempt.
            tracing::info!(queue = %self.queue, job_id = %job.id(), %cause, "shutting down; job given back to the queue");
            return self.give_back(job).await;
        }
        processor.settled(
            SourceKind::Bullmq,
            [&Disposition::Retry {
                cause: cause.clone(),
            }],
        );
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
