//! Reads the raw data of the jobs in flight in groups: every job whose read
//! is waiting when the Redis call goes out shares that call.
//!
//! Each job needs its data's bytes exactly as the producer stored them
//! (see [`super::job_data`]). With one script call per job, Redis paid a
//! command, a script invocation and a reply per job, beside the crate's own
//! calls. A single task sends the calls instead, one at a time: it takes
//! every request queued at that moment (up to [`MAX_GROUP`]) into one call,
//! and while that call is out the next group gathers. At low load a group
//! is one job and waits for nothing; under load the groups grow with it,
//! as a database's group commit does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use redis::Value as RedisValue;
use tokio::sync::{mpsc, oneshot};

use super::job_data::{parse_job_data_group, JobData, JOB_DATA_LUA};
use crate::source::RedisConn;

/// The most jobs one script call reads. Keeps one call's time inside Redis
/// (which serves nothing else meanwhile) short; the bytes a call can return
/// are bounded by `bullmq.max_in_flight_data_bytes` already.
const MAX_GROUP: usize = 256;

/// One job's read, waiting for the next call.
struct Request {
    /// The job's hash.
    key: String,
    /// The job's name, for a dead letter written inside Redis.
    name: String,
    /// `bullmq:<queue>:<id>`, for that dead letter.
    source: String,
    /// The attempt this is, for that dead letter.
    attempts: u64,
    reply: oneshot::Sender<Result<JobData, String>>,
}

/// The handle jobs read their raw data through; the task behind it stops
/// when the last handle is dropped.
pub struct JobDataReader {
    requests: mpsc::UnboundedSender<Request>,
    calls: Arc<AtomicU64>,
}

/// What the task behind a [`JobDataReader`] works with.
struct Calls {
    conn: RedisConn,
    dlq_key: String,
    /// `validation.max_event_bytes` in force (it can change live).
    max_event_bytes: Box<dyn Fn() -> usize + Send + Sync>,
    /// Counts failed calls (`audit_worker_redis_errors_total`).
    redis_errors: IntCounter,
    sent: Arc<AtomicU64>,
}

impl JobDataReader {
    /// Starts the task that sends the reads on `conn` and writes dead
    /// letters to `dlq_key`, with the byte limit `max_event_bytes` returns
    /// at each call.
    pub fn start(
        conn: RedisConn,
        dlq_key: String,
        max_event_bytes: impl Fn() -> usize + Send + Sync + 'static,
        redis_errors: IntCounter,
    ) -> Self {
        let (requests, rx) = mpsc::unbounded_channel();
        let calls = Arc::new(AtomicU64::new(0));
        tokio::spawn(run(
            rx,
            Calls {
                conn,
                dlq_key,
                max_event_bytes: Box::new(max_event_bytes),
                redis_errors,
                sent: calls.clone(),
            },
        ));
        Self { requests, calls }
    }

    /// How many script calls have been sent so far, for every read made:
    /// fewer than the reads when jobs share calls.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// The raw data of the job at `key`, or its dead-lettering inside Redis
    /// when it is over `validation.max_event_bytes`. Tries three times
    /// (the first command after a dropped connection fails while the
    /// connection manager reconnects); an `Err` says what went wrong.
    pub async fn read(
        &self,
        key: String,
        name: &str,
        source: &str,
        attempts: u64,
    ) -> Result<JobData, String> {
        let mut last = String::new();
        for attempt in 1..=3u64 {
            let (reply, answer) = oneshot::channel();
            let request = Request {
                key: key.clone(),
                name: name.to_owned(),
                source: source.to_owned(),
                attempts,
                reply,
            };
            if self.requests.send(request).is_err() {
                return Err("the job data reader has stopped".into());
            }
            match answer.await {
                Ok(Ok(data)) => return Ok(data),
                Ok(Err(e)) => last = e,
                Err(_) => return Err("the job data reader has stopped".into()),
            }
            tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
        }
        Err(format!("cannot read the job's raw data from Redis: {last}"))
    }
}

/// Sends one script call per group of waiting requests until every handle
/// is gone.
async fn run(mut rx: mpsc::UnboundedReceiver<Request>, mut calls: Calls) {
    let script = redis::Script::new(JOB_DATA_LUA);
    let mut group = Vec::with_capacity(MAX_GROUP);
    while rx.recv_many(&mut group, MAX_GROUP).await > 0 {
        let failed_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut call = script.prepare_invoke();
        call.key(&calls.dlq_key);
        call.arg((calls.max_event_bytes)()).arg(&failed_at);
        for r in &group {
            call.key(&r.key).arg(&r.name).arg(&r.source).arg(r.attempts);
        }
        calls.sent.fetch_add(1, Ordering::Relaxed);
        let reply: redis::RedisResult<RedisValue> = call.invoke_async(&mut calls.conn).await;
        let parsed = match reply {
            Ok(v) => parse_job_data_group(v, group.len())
                .ok_or_else(|| "unexpected reply from the job data script".to_owned()),
            Err(e) => {
                calls.redis_errors.inc();
                Err(e.to_string())
            }
        };
        match parsed {
            Ok(data) => {
                for (r, d) in group.drain(..).zip(data) {
                    // A job that gave up waiting (its task was dropped) needs no answer.
                    let _ = r.reply.send(Ok(d));
                }
            }
            Err(e) => {
                for r in group.drain(..) {
                    let _ = r.reply.send(Err(e.clone()));
                }
            }
        }
    }
}
