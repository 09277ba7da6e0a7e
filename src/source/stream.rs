//! The Redis Streams source (DESIGN.md section 2).
//!
//! Reads `audit:events` through the consumer group `audit-workers`:
//! first its own pending entries (left by a previous run of this consumer),
//! then new entries with a blocking XREADGROUP on a dedicated connection,
//! and every `claim_interval` the entries that have waited longer than
//! `claim_idle` on any consumer (XAUTOCLAIM: a dead replica's entries, or
//! ones whose write failed). Each read batch is processed in its own task,
//! up to `max_in_flight_batches` at once, so reading overlaps writing.
//!
//! An entry is acknowledged only when the sink reports its row committed
//! (new or duplicate), or its dead letter is written: the XADD to the DLQ,
//! the XACK and the optional XDEL go in one MULTI/EXEC, so a crash cannot
//! leave a dead letter for an unacknowledged entry or the reverse. Entries
//! whose write failed stay pending and come back through XAUTOCLAIM.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::{Client, Value};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, RedisConfig, StreamConfig};
use crate::dlq::DeadLetter;
use crate::event::{RejectReason, Rejection, ValidationPolicy};
use crate::jobs::{JobError, JobHandlers};
use crate::processor::{process_message, JobKind, AUDIT_EVENT};
use crate::sink::{SinkHandle, StoreOutcome};
use crate::telemetry::Metrics;

use super::SourceContext;

/// One stream entry as read: its id and fields, or `None` fields when the
/// entry was deleted while pending.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEntry {
    pub id: String,
    pub fields: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

impl StreamEntry {
    /// The value of a field, as raw bytes.
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .as_ref()?
            .iter()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }
}

fn bytes_of(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

/// Parses one `[id, [field, value, ...] | nil]` entry.
fn parse_entry(v: &Value) -> Option<StreamEntry> {
    let Value::Array(parts) = v else { return None };
    let id = String::from_utf8(bytes_of(parts.first()?)?).ok()?;
    let fields = match parts.get(1) {
        Some(Value::Array(kv)) => Some(
            kv.chunks(2)
                .filter_map(|c| Some((bytes_of(c.first()?)?, bytes_of(c.get(1)?)?)))
                .collect(),
        ),
        _ => None,
    };
    Some(StreamEntry { id, fields })
}

/// Parses a list of entries.
pub fn parse_entries(v: &Value) -> Vec<StreamEntry> {
    match v {
        Value::Array(items) => items.iter().filter_map(parse_entry).collect(),
        _ => Vec::new(),
    }
}

/// Parses an XREADGROUP reply for one stream (nil when the block timed out).
pub fn parse_read_reply(v: &Value) -> Vec<StreamEntry> {
    match v {
        Value::Array(streams) => streams
            .iter()
            .flat_map(|s| match s {
                Value::Array(pair) if pair.len() == 2 => parse_entries(&pair[1]),
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(pairs) => pairs.iter().flat_map(|(_, v)| parse_entries(v)).collect(),
        _ => Vec::new(),
    }
}

/// Parses an XAUTOCLAIM reply: the cursor for the next call and the entries.
pub fn parse_autoclaim_reply(v: &Value) -> (String, Vec<StreamEntry>) {
    let Value::Array(parts) = v else {
        return ("0-0".into(), Vec::new());
    };
    let next = parts
        .first()
        .and_then(bytes_of)
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_else(|| "0-0".into());
    let entries = parts.get(1).map(parse_entries).unwrap_or_default();
    (next, entries)
}

/// Everything a batch task needs, shared between tasks.
struct Shared {
    stream: StreamConfig,
    dlq_key: String,
    consumer: String,
    policy: Arc<ValidationPolicy>,
    sink: SinkHandle,
    jobs: JobHandlers,
    commands: ConnectionManager,
    metrics: Metrics,
    alerts: crate::alerts::AlertTap,
    /// Fired at shutdown: stops waits for the database.
    shutdown: CancellationToken,
}

/// How a batch reached us: fresh entries count as a first delivery; own
/// pending and claimed entries have been delivered before, so their
/// delivery counts are checked against `max_deliveries`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    Fresh,
    Redelivered,
}

/// The stream source; `run` consumes until the shutdown token fires.
pub struct StreamSource {
    shared: Arc<Shared>,
    client: Client,
    redis: RedisConfig,
}

impl StreamSource {
    /// Prepares the source (no I/O until `run`).
    pub fn new(
        config: &Config,
        client: Client,
        commands: ConnectionManager,
        ctx: SourceContext,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                stream: config.stream.clone(),
                dlq_key: config.dlq.key.clone(),
                consumer: config.consumer_name(),
                policy: ctx.policy,
                sink: ctx.sink,
                jobs: ctx.jobs,
                commands,
                metrics: ctx.metrics,
                alerts: ctx.alerts,
                shutdown: ctx.shutdown,
            }),
            client,
            redis: config.redis.clone(),
        }
    }

    /// Consumes until `shutdown` fires, then waits for the batches in flight
    /// to be written and acknowledged. Redis errors are logged and retried
    /// with backoff; they never end the loop.
    pub async fn run(self) {
        let s = &self.shared;
        let shutdown = s.shutdown.clone();
        tracing::info!(stream = %s.stream.key, group = %s.stream.group, consumer = %s.consumer, "stream source starting");
        let slots = Arc::new(Semaphore::new(s.stream.max_in_flight_batches));
        let mut tasks = JoinSet::new();
        let block = Duration::from_millis(s.stream.block_ms);
        let mut reader: Option<MultiplexedConnection> = None;
        let mut failures: u32 = 0;
        let mut group_ready = false;
        // Our own pending entries (a previous run of this consumer died
        // before acknowledging them) come first, from cursor "0".
        let mut own_pending_cursor = Some("0".to_string());
        let mut next_claim = tokio::time::Instant::now();

        while !shutdown.is_cancelled() {
            while tasks.try_join_next().is_some() {}
            if failures > 0 {
                let delay = Duration::from_millis((100u64 << failures.min(6)).min(5_000));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
            if !group_ready {
                match self.ensure_group().await {
                    Ok(()) => group_ready = true,
                    Err(e) => {
                        failures += 1;
                        s.metrics
                            .redis_errors
                            .with_label_values(&["xgroup_create"])
                            .inc();
                        tracing::warn!(error = %e, "cannot create consumer group; retrying");
                        continue;
                    }
                }
            }
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
                _ = shutdown.cancelled() => break,
            };
            // Nothing is read while the circuit breaker is open: entries
            // stay in Redis until the database takes writes again.
            if !s.sink.wait_writable(&shutdown).await {
                break;
            }

            // 1. Own pending entries, page by page, without blocking.
            if let Some(cursor) = own_pending_cursor.clone() {
                match self.read_own_pending(&cursor).await {
                    Ok(entries) if entries.is_empty() => own_pending_cursor = None,
                    Ok(entries) => {
                        own_pending_cursor = entries.last().map(|e| e.id.clone());
                        failures = 0;
                        tasks.spawn(handle_batch(
                            s.clone(),
                            entries,
                            Delivery::Redelivered,
                            permit,
                        ));
                    }
                    Err(e) => {
                        failures += 1;
                        group_ready = !is_nogroup(&e);
                        s.metrics
                            .redis_errors
                            .with_label_values(&["xreadgroup"])
                            .inc();
                        tracing::warn!(error = %e, "reading own pending entries failed; retrying");
                    }
                }
                continue;
            }

            // 2. Entries idle too long on any consumer.
            if tokio::time::Instant::now() >= next_claim {
                next_claim =
                    tokio::time::Instant::now() + Duration::from_millis(s.stream.claim_interval_ms);
                match self.claim_idle().await {
                    Ok(entries) if !entries.is_empty() => {
                        tracing::info!(count = entries.len(), "claimed idle pending entries");
                        tasks.spawn(handle_batch(
                            s.clone(),
                            entries,
                            Delivery::Redelivered,
                            permit,
                        ));
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        group_ready = !is_nogroup(&e);
                        s.metrics
                            .redis_errors
                            .with_label_values(&["xautoclaim"])
                            .inc();
                        tracing::warn!(error = %e, "XAUTOCLAIM failed; will retry");
                    }
                }
            }

            // 3. New entries, blocking on the dedicated connection.
            let conn = match reader.as_mut() {
                Some(c) => c,
                None => match super::blocking_connection(&self.client, &self.redis, block).await {
                    Ok(c) => reader.insert(c),
                    Err(e) => {
                        failures += 1;
                        s.metrics.redis_errors.with_label_values(&["connect"]).inc();
                        tracing::warn!(error = %e, "cannot connect to Redis for reading; retrying");
                        continue;
                    }
                },
            };
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(&s.stream.group)
                .arg(&s.consumer)
                .arg("COUNT")
                .arg(s.stream.read_count)
                .arg("BLOCK")
                .arg(s.stream.block_ms)
                .arg("STREAMS")
                .arg(&s.stream.key)
                .arg(">");
            let reply: redis::RedisResult<Value> = tokio::select! {
                r = cmd.query_async(conn) => r,
                // Entries delivered to a read we abandon here stay pending
                // on this consumer and are read again at the next start.
                _ = shutdown.cancelled() => break,
            };
            match reply {
                Ok(v) => {
                    failures = 0;
                    let entries = parse_read_reply(&v);
                    if !entries.is_empty() {
                        tasks.spawn(handle_batch(s.clone(), entries, Delivery::Fresh, permit));
                    }
                }
                Err(e) => {
                    failures += 1;
                    group_ready = !is_nogroup(&e);
                    reader = None;
                    s.metrics
                        .redis_errors
                        .with_label_values(&["xreadgroup"])
                        .inc();
                    tracing::warn!(error = %e, "XREADGROUP failed; reconnecting");
                }
            }
        }
        tracing::info!(
            in_flight = tasks.len(),
            "stream source stopping; finishing batches in flight"
        );
        while tasks.join_next().await.is_some() {}
    }

    async fn ensure_group(&self) -> redis::RedisResult<()> {
        let s = &self.shared;
        let mut conn = s.commands.clone();
        let r: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&s.stream.key)
            .arg(&s.stream.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match r {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    async fn read_own_pending(&self, cursor: &str) -> redis::RedisResult<Vec<StreamEntry>> {
        let s = &self.shared;
        let mut conn = s.commands.clone();
        let v: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&s.stream.group)
            .arg(&s.consumer)
            .arg("COUNT")
            .arg(s.stream.read_count)
            .arg("STREAMS")
            .arg(&s.stream.key)
            .arg(cursor)
            .query_async(&mut conn)
            .await?;
        Ok(parse_read_reply(&v))
    }

    async fn claim_idle(&self) -> redis::RedisResult<Vec<StreamEntry>> {
        let s = &self.shared;
        let mut conn = s.commands.clone();
        let v: Value = redis::cmd("XAUTOCLAIM")
            .arg(&s.stream.key)
            .arg(&s.stream.group)
            .arg(&s.consumer)
            .arg(s.stream.claim_idle_ms)
            .arg("0-0")
            .arg("COUNT")
            .arg(s.stream.read_count)
            .query_async(&mut conn)
            .await?;
        Ok(parse_autoclaim_reply(&v).1)
    }
}

/// Delivery counts of redelivered entries, from XPENDING (now that they
/// are ours). A failed lookup counts every entry as a first delivery: the
/// poison check is skipped rather than anything dead-lettered by mistake.
async fn delivery_counts(s: &Shared, entries: &[StreamEntry]) -> HashMap<String, u64> {
    let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
        return HashMap::new();
    };
    let mut conn = s.commands.clone();
    let reply: redis::RedisResult<Value> = redis::cmd("XPENDING")
        .arg(&s.stream.key)
        .arg(&s.stream.group)
        .arg(&first.id)
        .arg(&last.id)
        .arg(entries.len())
        .arg(&s.consumer)
        .query_async(&mut conn)
        .await;
    match reply {
        Ok(v) => parse_pending_counts(&v),
        Err(e) => {
            s.metrics
                .redis_errors
                .with_label_values(&["xpending"])
                .inc();
            tracing::warn!(error = %e, "XPENDING failed; delivery counts not checked for this batch");
            HashMap::new()
        }
    }
}

/// Parses the extended XPENDING reply: `[[id, consumer, idle, count], ...]`.
pub fn parse_pending_counts(v: &Value) -> HashMap<String, u64> {
    let Value::Array(rows) = v else {
        return HashMap::new();
    };
    rows.iter()
        .filter_map(|row| {
            let Value::Array(cols) = row else { return None };
            let id = String::from_utf8(bytes_of(cols.first()?)?).ok()?;
            let count = match cols.get(3)? {
                Value::Int(n) => u64::try_from(*n).ok()?,
                _ => return None,
            };
            Some((id, count))
        })
        .collect()
}

fn is_nogroup(e: &redis::RedisError) -> bool {
    e.code() == Some("NOGROUP") || e.to_string().contains("NOGROUP")
}

/// Processes one read batch: validate, hand valid events to the sink, wait
/// for their outcomes, then dead-letter and acknowledge in one transaction.
///
/// Events the database could not take (`Unavailable`) are not acknowledged
/// and not given up: once the breaker lets writes through again they are
/// handed to the sink again, without a new Redis delivery, so an outage
/// never counts towards `max_deliveries`. Only shutdown leaves them pending
/// (for the next start, or another replica).
async fn handle_batch(
    s: Arc<Shared>,
    entries: Vec<StreamEntry>,
    delivery: Delivery,
    slot: tokio::sync::OwnedSemaphorePermit,
) {
    use tracing::Instrument;
    let span = crate::tracing_ctx::batch_span("stream", &s.stream.key, entries.len());
    handle_batch_in_span(s, entries, delivery, slot)
        .instrument(span)
        .await
}

/// Per-event extras that travel with an event until its outcome: its
/// trace span, the fields the alert rules need, and its enqueue time.
struct Tracked {
    span: Option<tracing::Span>,
    alert: Option<crate::alerts::AlertInput>,
    enqueued_ms: Option<i64>,
}

impl Tracked {
    fn new(s: &Shared, entry: &StreamEntry, record: &crate::sink::AuditRecord) -> Self {
        let parent = crate::tracing_ctx::from_stream_fields(
            entry.field("traceparent"),
            entry.field("tracestate"),
        );
        Self {
            span: crate::tracing_ctx::event_span("stream", parent.as_ref()),
            alert: s
                .alerts
                .wants(&record.event)
                .then(|| crate::alerts::AlertInput::from_event(&record.event, &record.source)),
            enqueued_ms: crate::telemetry::stream_id_millis(&entry.id),
        }
    }

    /// Records a committed outcome: latency, alert hand-off, span field.
    fn stored(self, s: &Shared, inserted: bool) {
        if let Some(span) = &self.span {
            span.record("outcome", if inserted { "inserted" } else { "duplicate" });
        }
        if inserted {
            if let Some(ms) = self.enqueued_ms {
                s.metrics.observe_end_to_end("stream", ms);
            }
            if let Some(input) = self.alert {
                s.alerts.offer(input);
            }
        }
    }
}

async fn handle_batch_in_span(
    s: Arc<Shared>,
    entries: Vec<StreamEntry>,
    delivery: Delivery,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    let (mut inserted, mut duplicates, mut deferred) = (0u64, 0u64, 0u64);
    let mut acks: Vec<String> = Vec::with_capacity(entries.len());
    let mut dead: Vec<(String, DeadLetter)> = Vec::new();
    let mut waiting = Vec::with_capacity(entries.len());
    let deliveries = match delivery {
        Delivery::Fresh => HashMap::new(),
        Delivery::Redelivered => delivery_counts(&s, &entries).await,
    };
    for entry in entries {
        let source = format!("stream:{}:{}", s.stream.key, entry.id);
        if entry.fields.is_none() {
            // Deleted while pending: nothing left to store.
            acks.push(entry.id);
            continue;
        }
        let name = entry
            .field("name")
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| AUDIT_EVENT.to_owned());
        let data = entry.field("data").map(<[u8]>::to_vec);
        let delivered = deliveries.get(&entry.id).copied().unwrap_or(1);
        if delivered > s.stream.max_deliveries {
            let rejection = Rejection::new(
                RejectReason::MaxDeliveries,
                format!(
                    "delivered {delivered} times without being stored (stream.max_deliveries = {})",
                    s.stream.max_deliveries
                ),
            );
            let mut letter = dead_letter(data.unwrap_or_default(), name, rejection, source);
            letter.attempts = delivered;
            dead.push((entry.id, letter));
            continue;
        }
        let Some(data) = data else {
            let rejection =
                Rejection::new(RejectReason::InvalidEvent, "stream entry has no data field");
            dead.push((entry.id, dead_letter(Vec::new(), name, rejection, source)));
            continue;
        };
        let kind = JobKind::from_name(&name);
        if kind != JobKind::AuditEvent {
            let job_kind = match kind {
                JobKind::Snapshot => "snapshot",
                _ => "export",
            };
            match s.jobs.accept(kind, &name, &data, &source).await {
                Ok(_) => {
                    s.metrics.job_request(job_kind, true);
                    acks.push(entry.id)
                }
                Err(JobError::Rejected(rejection)) => {
                    s.metrics.job_request(job_kind, false);
                    dead.push((entry.id, dead_letter(data, name, rejection, source)))
                }
                Err(JobError::Transient(cause)) => {
                    deferred += 1;
                    tracing::warn!(%source, %cause, "job request not recorded; it stays pending");
                }
            }
            continue;
        }
        match process_message(&name, &data, &source, &s.policy) {
            Ok(record) => {
                let tracked = Tracked::new(&s, &entry, &record);
                let pending = s.sink.submit(record).await;
                waiting.push((entry.id, pending, data, name, source, tracked));
            }
            Err(rejection) => dead.push((entry.id, dead_letter(data, name, rejection, source))),
        }
    }
    while !waiting.is_empty() {
        let mut retry = Vec::new();
        for (id, pending, data, name, source, tracked) in waiting.drain(..) {
            match pending.wait().await {
                StoreOutcome::Inserted => {
                    inserted += 1;
                    tracked.stored(&s, true);
                    acks.push(id);
                }
                StoreOutcome::Duplicate => {
                    duplicates += 1;
                    tracked.stored(&s, false);
                    acks.push(id);
                }
                StoreOutcome::Rejected(rejection) => {
                    dead.push((id, dead_letter(data, name, rejection, source)))
                }
                StoreOutcome::Unavailable(_) => retry.push((id, data, name, source, tracked)),
            }
        }
        if retry.is_empty() {
            break;
        }
        if !s.sink.wait_writable(&s.shutdown).await {
            deferred += retry.len() as u64;
            break;
        }
        for (id, data, name, source, tracked) in retry {
            // Validation already passed once; it is pure, so this repeats it
            // only to rebuild the record the sink consumed.
            match process_message(&name, &data, &source, &s.policy) {
                Ok(record) => {
                    let pending = s.sink.submit(record).await;
                    waiting.push((id, pending, data, name, source, tracked));
                }
                Err(rejection) => dead.push((id, dead_letter(data, name, rejection, source))),
            }
        }
    }
    if acks.is_empty() && dead.is_empty() {
        s.metrics
            .events
            .with_label_values(&["stream", "deferred"])
            .inc_by(deferred);
        return;
    }
    let mut pipe = redis::pipe();
    pipe.atomic();
    for (id, letter) in &dead {
        letter.add_to(&mut pipe, &s.dlq_key);
        acks.push(id.clone());
    }
    pipe.cmd("XACK")
        .arg(&s.stream.key)
        .arg(&s.stream.group)
        .arg(&acks)
        .ignore();
    if s.stream.delete_acked {
        pipe.cmd("XDEL").arg(&s.stream.key).arg(&acks).ignore();
    }
    let mut conn = s.commands.clone();
    let mut attempt: u64 = 0;
    loop {
        attempt += 1;
        match pipe.query_async::<()>(&mut conn).await {
            Ok(()) => break,
            Err(e) if attempt < 5 => {
                s.metrics.redis_errors.with_label_values(&["xack"]).inc();
                tracing::warn!(error = %e, attempt, "acknowledging failed; retrying");
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
            Err(e) => {
                s.metrics.redis_errors.with_label_values(&["xack"]).inc();
                tracing::error!(error = %e, count = acks.len(), "could not acknowledge; the entries will be delivered again and absorbed as duplicates");
                return;
            }
        }
    }
    let m = &s.metrics;
    m.events
        .with_label_values(&["stream", "inserted"])
        .inc_by(inserted);
    m.events
        .with_label_values(&["stream", "duplicate"])
        .inc_by(duplicates);
    m.events
        .with_label_values(&["stream", "deferred"])
        .inc_by(deferred);
    m.events
        .with_label_values(&["stream", "dead_lettered"])
        .inc_by(dead.len() as u64);
    for (_, letter) in &dead {
        m.dead_letters
            .with_label_values(&[letter.reason.code()])
            .inc();
        tracing::info!(reason = letter.reason.code(), source = %letter.source, error = %letter.error, "dead-lettered");
    }
}

fn dead_letter(data: Vec<u8>, name: String, rejection: Rejection, source: String) -> DeadLetter {
    DeadLetter {
        data,
        name,
        reason: rejection.reason,
        error: rejection.message,
        source,
        attempts: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn read_replies_parse_entries_fields_and_deleted_entries() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("audit:events"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("1-0"),
                    Value::Array(vec![bulk("data"), Value::BulkString(vec![0xff, b'{'])]),
                ]),
                Value::Array(vec![bulk("2-0"), Value::Nil]),
            ]),
        ])]);
        let entries = parse_read_reply(&reply);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].field("data"), Some(&[0xff, b'{'][..]));
        assert_eq!(entries[0].field("name"), None);
        assert_eq!(entries[1].fields, None);
        assert!(parse_read_reply(&Value::Nil).is_empty());
    }

    #[test]
    fn autoclaim_replies_parse_cursor_and_entries() {
        let reply = Value::Array(vec![
            bulk("5-0"),
            Value::Array(vec![Value::Array(vec![
                bulk("3-0"),
                Value::Array(vec![bulk("data"), bulk("{}")]),
            ])]),
            Value::Array(vec![]),
        ]);
        let (next, entries) = parse_autoclaim_reply(&reply);
        assert_eq!(next, "5-0");
        assert_eq!(entries[0].id, "3-0");
    }
}
