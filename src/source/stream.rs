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

    /// Moves a field's value out (leaving it empty), so the largest field,
    /// `data`, is never copied on its way to validation and the sink.
    pub fn take_field(&mut self, name: &str) -> Option<Vec<u8>> {
        self.fields
            .as_mut()?
            .iter_mut()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| std::mem::take(v))
    }
}

/// Moves the bytes out of a reply value (replies are consumed, not copied:
/// a read batch is the worker's largest allocation).
fn take_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
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

/// Turns one `[id, [field, value, ...] | nil]` entry into a [`StreamEntry`].
fn entry_from(v: Value) -> Option<StreamEntry> {
    let Value::Array(parts) = v else { return None };
    let mut parts = parts.into_iter();
    let id = String::from_utf8(take_bytes(parts.next()?)?).ok()?;
    let fields = match parts.next() {
        Some(Value::Array(kv)) => {
            let mut pairs = Vec::with_capacity(kv.len() / 2);
            let mut kv = kv.into_iter();
            while let (Some(k), Some(v)) = (kv.next(), kv.next()) {
                if let (Some(k), Some(v)) = (take_bytes(k), take_bytes(v)) {
                    pairs.push((k, v));
                }
            }
            Some(pairs)
        }
        _ => None,
    };
    Some(StreamEntry { id, fields })
}

/// Turns a list of entries into [`StreamEntry`]s, consuming the reply.
pub fn entries_from(v: Value) -> Vec<StreamEntry> {
    match v {
        Value::Array(items) => items.into_iter().filter_map(entry_from).collect(),
        _ => Vec::new(),
    }
}

/// Parses a list of entries from a borrowed reply (the CLI and tests; the
/// read path uses [`entries_from`], which does not copy).
pub fn parse_entries(v: &Value) -> Vec<StreamEntry> {
    entries_from(v.clone())
}

/// Parses an XREADGROUP reply for one stream (nil when the block timed out).
pub fn parse_read_reply(v: Value) -> Vec<StreamEntry> {
    match v {
        Value::Array(streams) => streams
            .into_iter()
            .flat_map(|s| match s {
                Value::Array(pair) if pair.len() == 2 => {
                    entries_from(pair.into_iter().nth(1).unwrap_or(Value::Nil))
                }
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(pairs) => pairs
            .into_iter()
            .flat_map(|(_, v)| entries_from(v))
            .collect(),
        _ => Vec::new(),
    }
}

/// Parses an XAUTOCLAIM reply: the cursor for the next call and the entries.
pub fn parse_autoclaim_reply(v: Value) -> (String, Vec<StreamEntry>) {
    let Value::Array(parts) = v else {
        return ("0-0".into(), Vec::new());
    };
    let mut parts = parts.into_iter();
    let next = parts
        .next()
        .and_then(take_bytes)
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_else(|| "0-0".into());
    let entries = parts.next().map(entries_from).unwrap_or_default();
    (next, entries)
}

/// One entry that the bounded read dead-lettered inside Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedEntry {
    pub id: String,
    /// Size of its `data` field, in bytes.
    pub data_bytes: u64,
    /// Size of its other fields (names and values), in bytes.
    pub other_bytes: u64,
}

/// What one bounded read returned (see [`BOUNDED_READ_LUA`]).
#[derive(Debug, Default, PartialEq)]
pub struct BoundedRead {
    /// Entries small enough to be read, as XREADGROUP returns them.
    pub entries: Vec<StreamEntry>,
    /// Entries too large to be read: already dead-lettered and acknowledged.
    pub dropped: Vec<DroppedEntry>,
}

impl BoundedRead {
    /// The id of the last entry the read went past, kept or dropped (the
    /// cursor for paging through own pending entries).
    pub fn last_id(&self) -> Option<&str> {
        let kept = self.entries.last().map(|e| e.id.as_str());
        let dropped = self.dropped.last().map(|d| d.id.as_str());
        match (kept, dropped) {
            (Some(a), Some(b)) => Some(if stream_id_less(a, b) { b } else { a }),
            (a, b) => a.or(b),
        }
    }

    /// Whether the read found nothing at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.dropped.is_empty()
    }
}

/// Orders two stream ids (`ms-seq`) numerically.
fn stream_id_less(a: &str, b: &str) -> bool {
    let key = |id: &str| {
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        (
            ms.parse::<u64>().unwrap_or(0),
            seq.parse::<u64>().unwrap_or(0),
        )
    };
    key(a) < key(b)
}

/// Why an entry is too large to be read as an event, if it is: its `data`
/// is over `validation.max_event_bytes`, or its other fields (names and
/// values) over [`MAX_OTHER_FIELD_BYTES`]. The bounded read script applies
/// the same two limits inside Redis; this catches the entries that reach
/// the worker another way (the wake-up read, XAUTOCLAIM).
pub fn oversize(entry: &StreamEntry, max_event_bytes: usize) -> Option<Rejection> {
    let fields = entry.fields.as_ref()?;
    let mut data = None;
    let mut other = 0usize;
    for (k, v) in fields {
        if k == b"data" && data.is_none() {
            data = Some(v.len());
        } else {
            other += k.len() + v.len();
        }
    }
    let data = data.unwrap_or(0);
    if data > max_event_bytes {
        return Some(Rejection::new(
            RejectReason::TooLarge,
            format!("event is {data} bytes, the limit is {max_event_bytes} (validation.max_event_bytes)"),
        ));
    }
    (other > MAX_OTHER_FIELD_BYTES).then(|| {
        Rejection::new(
            RejectReason::TooLarge,
            format!(
                "entry fields other than data take {other} bytes, the limit is {MAX_OTHER_FIELD_BYTES}"
            ),
        )
    })
}

/// Parses the bounded read script's reply: `{kept entries, {id, data
/// bytes, other bytes, ...}}`.
pub fn parse_bounded_read(v: Value) -> BoundedRead {
    let Value::Array(parts) = v else {
        return BoundedRead::default();
    };
    let mut parts = parts.into_iter();
    let entries = parts.next().map(entries_from).unwrap_or_default();
    let dropped = match parts.next() {
        Some(Value::Array(flat)) => flat
            .chunks(3)
            .filter_map(|c| {
                let id = String::from_utf8(bytes_of(c.first()?)?).ok()?;
                let num = |v: &Value| match v {
                    Value::Int(n) => u64::try_from(*n).ok(),
                    other => String::from_utf8(bytes_of(other)?).ok()?.parse().ok(),
                };
                Some(DroppedEntry {
                    id,
                    data_bytes: num(c.get(1)?)?,
                    other_bytes: num(c.get(2)?)?,
                })
            })
            .collect(),
        _ => Vec::new(),
    };
    BoundedRead { entries, dropped }
}

/// The bounded read: XREADGROUP without BLOCK in a Lua script that
/// dead-letters, acknowledges and deletes oversized entries inside Redis,
/// so they never reach the worker's memory. Hand-written because no crate
/// does this; it touches only our own stream and DLQ (DESIGN.md section 2),
/// never BullMQ's keys.
pub const BOUNDED_READ_LUA: &str = include_str!("read_bounded.lua");

/// Bytes that the fields other than `data` (`name`, `traceparent`,
/// `tracestate`, and every field name) may take together before the entry
/// is too large: generous for real trace context, small beside an event.
pub const MAX_OTHER_FIELD_BYTES: usize = 16 * 1024;

/// Bytes of oversized entries after which one bounded read call returns
/// (the rest wait for the next call): copying a 10 MB entry into the DLQ
/// takes Redis tens of milliseconds, and a script holds Redis while it runs.
pub const DROP_BUDGET_BYTES: usize = 16 * 1024 * 1024;

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
    /// [`BOUNDED_READ_LUA`], loaded once per connection (EVALSHA).
    bounded_read: redis::Script,
    /// Largest `data` field read into the worker (`validation.max_event_bytes`).
    max_event_bytes: usize,
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
                bounded_read: redis::Script::new(BOUNDED_READ_LUA),
                max_event_bytes: config.validation.max_event_bytes,
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
                match self.read_bounded(&cursor).await {
                    Ok(read) if read.is_empty() => own_pending_cursor = None,
                    Ok(read) => {
                        own_pending_cursor = read.last_id().map(str::to_owned);
                        failures = 0;
                        if !read.entries.is_empty() {
                            tasks.spawn(handle_batch(
                                s.clone(),
                                read.entries,
                                Delivery::Redelivered,
                                permit,
                            ));
                        }
                    }
                    Err(e) => {
                        failures += 1;
                        group_ready = read_failed(
                            s,
                            &e,
                            "xreadgroup",
                            "reading own pending entries failed; retrying",
                        );
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
                        group_ready =
                            read_failed(s, &e, "xautoclaim", "XAUTOCLAIM failed; will retry");
                    }
                }
            }

            // 3. New entries: first without blocking, through the bounded
            // read; only when there are none, block on the dedicated
            // connection for the next one (COUNT 1: the one entry the
            // worker may hold before seeing its size), then take what
            // followed it through the bounded read again.
            match self.read_bounded(">").await {
                Ok(read) if !read.is_empty() => {
                    failures = 0;
                    if !read.entries.is_empty() {
                        tasks.spawn(handle_batch(
                            s.clone(),
                            read.entries,
                            Delivery::Fresh,
                            permit,
                        ));
                    }
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    failures += 1;
                    group_ready =
                        read_failed(s, &e, "xreadgroup", "reading new entries failed; retrying");
                    continue;
                }
            }
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
                .arg(1)
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
                    let mut entries = parse_read_reply(v);
                    if entries
                        .first()
                        .is_some_and(|e| oversize(e, s.max_event_bytes).is_some())
                    {
                        // Dead-lettered before anything more is read, so at
                        // most one oversized entry is ever in the worker.
                        handle_batch(s.clone(), entries, Delivery::Fresh, permit).await;
                        continue;
                    }
                    if !entries.is_empty() {
                        // The wake-up entry and whatever arrived behind it
                        // make one batch; a failed follow-up read only
                        // leaves those for the next turn.
                        if let Ok(more) = self.read_bounded(">").await {
                            entries.extend(more.entries);
                        }
                        tasks.spawn(handle_batch(s.clone(), entries, Delivery::Fresh, permit));
                    }
                }
                Err(e) => {
                    failures += 1;
                    reader = None;
                    group_ready =
                        read_failed(s, &e, "xreadgroup", "XREADGROUP failed; reconnecting");
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

    /// Reads up to `read_count` entries from `start` (`>` for new ones, or a
    /// cursor into our own pending entries) without blocking, through the
    /// bounded read script: entries too large to be events are dead-lettered
    /// inside Redis and come back only as [`DroppedEntry`]s.
    async fn read_bounded(&self, start: &str) -> redis::RedisResult<BoundedRead> {
        let s = &self.shared;
        let mut conn = s.commands.clone();
        let failed_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let v: Value = s
            .bounded_read
            .key(&s.stream.key)
            .key(&s.dlq_key)
            .arg(&s.stream.group)
            .arg(&s.consumer)
            .arg(s.stream.read_count)
            .arg(start)
            .arg(s.max_event_bytes)
            .arg(MAX_OTHER_FIELD_BYTES)
            .arg(failed_at)
            .arg(if s.stream.delete_acked { "1" } else { "0" })
            .arg(DROP_BUDGET_BYTES)
            .invoke_async(&mut conn)
            .await?;
        let read = parse_bounded_read(v);
        if !read.dropped.is_empty() {
            let m = &s.metrics;
            let n = read.dropped.len() as u64;
            m.events
                .with_label_values(&["stream", "dead_lettered"])
                .inc_by(n);
            m.dead_letters
                .with_label_values(&[RejectReason::TooLarge.code()])
                .inc_by(n);
            for d in &read.dropped {
                tracing::info!(
                    reason = RejectReason::TooLarge.code(),
                    source = %format!("stream:{}:{}", s.stream.key, d.id),
                    data_bytes = d.data_bytes,
                    other_bytes = d.other_bytes,
                    "dead-lettered inside Redis without reading it (entry too large)"
                );
            }
        }
        Ok(read)
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
        Ok(parse_autoclaim_reply(v).1)
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

/// Counts and logs a failed read (`op` labels the metric) and says whether
/// the consumer group is still there (false: recreate it before reading).
fn read_failed(s: &Shared, e: &redis::RedisError, op: &str, what: &str) -> bool {
    s.metrics.redis_errors.with_label_values(&[op]).inc();
    tracing::warn!(error = %e, "{what}");
    !is_nogroup(e)
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
    /// Explains an idempotency conflict after the record went to the sink.
    key: crate::sink::RecordKey,
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
            key: record.key(),
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
    for mut entry in entries {
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
        let data = entry.take_field("data");
        let delivered = deliveries.get(&entry.id).copied().unwrap_or(1);
        if let Some(rejection) = oversize(&entry, s.max_event_bytes) {
            let data = entry.take_field("data").unwrap_or_default();
            let mut letter = dead_letter(data, name, rejection, source);
            letter.attempts = delivered;
            dead.push((entry.id, letter));
            continue;
        }
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
                StoreOutcome::Conflict { stored_hash } => {
                    let rejection = tracked.key.conflict(&stored_hash);
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
        let mut entries = parse_read_reply(reply);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].field("data"), Some(&[0xff, b'{'][..]));
        assert_eq!(entries[0].field("name"), None);
        assert_eq!(entries[1].fields, None);
        assert!(parse_read_reply(Value::Nil).is_empty());
        // Taking a field moves its bytes out and leaves the others.
        assert_eq!(entries[0].take_field("data"), Some(vec![0xff, b'{']));
        assert_eq!(entries[0].field("data"), Some(&[][..]));
        assert_eq!(entries[1].take_field("data"), None);
    }

    #[test]
    fn bounded_read_replies_parse_kept_and_dropped_entries_and_the_cursor() {
        let reply = Value::Array(vec![
            Value::Array(vec![Value::Array(vec![
                bulk("7-0"),
                Value::Array(vec![bulk("data"), bulk("{}")]),
            ])]),
            Value::Array(vec![
                bulk("8-0"),
                Value::Int(10_485_760),
                Value::Int(12),
                bulk("10-1"),
                Value::Int(5),
                Value::Int(20_000),
            ]),
        ]);
        let read = parse_bounded_read(reply);
        assert_eq!(read.entries.len(), 1);
        assert_eq!(read.entries[0].field("data"), Some(&b"{}"[..]));
        assert_eq!(
            read.dropped,
            vec![
                DroppedEntry {
                    id: "8-0".into(),
                    data_bytes: 10_485_760,
                    other_bytes: 12
                },
                DroppedEntry {
                    id: "10-1".into(),
                    data_bytes: 5,
                    other_bytes: 20_000
                },
            ]
        );
        // The cursor is the highest id seen, compared as numbers
        // ("7-0" > "10-1" as text).
        assert_eq!(read.last_id(), Some("10-1"));
        assert!(stream_id_less("9-1", "10-0"));
        assert!(stream_id_less("10-2", "10-10"));
        // An empty script reply (nothing new) is an empty read.
        let empty = parse_bounded_read(Value::Array(vec![
            Value::Array(vec![]),
            Value::Array(vec![]),
        ]));
        assert!(empty.is_empty());
        assert_eq!(empty.last_id(), None);
    }

    #[test]
    fn entries_over_the_data_or_other_field_limits_are_too_large() {
        let entry = |fields: Vec<(&str, Vec<u8>)>| StreamEntry {
            id: "1-0".into(),
            fields: Some(
                fields
                    .into_iter()
                    .map(|(k, v)| (k.as_bytes().to_vec(), v))
                    .collect(),
            ),
        };
        let at_limit = entry(vec![
            ("data", vec![b' '; 100]),
            ("name", b"audit.event".to_vec()),
        ]);
        assert!(oversize(&at_limit, 100).is_none());
        let over = oversize(&entry(vec![("data", vec![b' '; 101])]), 100).unwrap();
        assert_eq!(over.reason, RejectReason::TooLarge);
        assert!(over.message.contains("101 bytes"), "{}", over.message);
        let long_name = entry(vec![
            ("data", b"{}".to_vec()),
            ("name", vec![b'n'; MAX_OTHER_FIELD_BYTES]),
        ]);
        let over = oversize(&long_name, 100).unwrap();
        assert!(over.message.contains("other than data"), "{}", over.message);
        // A deleted entry (no fields) is not oversized: it is just acknowledged.
        let deleted = StreamEntry {
            id: "2-0".into(),
            fields: None,
        };
        assert!(oversize(&deleted, 0).is_none());
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
        let (next, entries) = parse_autoclaim_reply(reply);
        assert_eq!(next, "5-0");
        assert_eq!(entries[0].id, "3-0");
    }
}
