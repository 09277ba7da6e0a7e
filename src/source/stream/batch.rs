//! One read batch, from entries to acknowledgement: each entry becomes a
//! [`Delivery`] for the processor, all of a batch's deliveries are decided
//! concurrently (so their rows share database batches), and the
//! dispositions are carried out in one MULTI/EXEC: every dead letter's
//! XADD, the XACK (and optional XDEL) of everything final. A crash cannot
//! leave a dead letter for an unacknowledged entry or the reverse.
//!
//! Entries left undecided (the worker stopped while the database was
//! unavailable) stay pending for the next start or another replica. Their
//! delivery is *excused*: counted in the hash `<stream>:excused`, and
//! subtracted from the delivery count when they come back, so that only
//! deliveries that failed for a reason of the entry's own (a crash while
//! holding it) count towards `max_deliveries`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::Value;

use super::reply::{parse_pending_counts, StreamEntry};
use super::Shared;
use crate::message::{Delivery, Disposition, SourceKind};
use crate::processor::AUDIT_EVENT;

/// How a batch reached us: fresh entries are a first delivery; own pending
/// and claimed entries have been delivered before, so their delivery
/// counts are looked up and checked against `max_deliveries`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    Fresh,
    Redelivered,
}

/// The hash that counts excused deliveries of a stream's entries.
pub fn excused_key(stream: &str) -> String {
    format!("{stream}:excused")
}

/// Handles one read batch in its own span; its ids are held in the
/// in-flight set (kept fresh against XAUTOCLAIM) until it is done.
pub(super) async fn handle_batch(
    s: Arc<Shared>,
    entries: Vec<StreamEntry>,
    arrival: Arrival,
    slot: tokio::sync::OwnedSemaphorePermit,
) {
    use tracing::Instrument;
    let span = crate::tracing_ctx::batch_span("stream", &s.stream.key, entries.len());
    let held = s
        .in_flight
        .hold(entries.iter().map(|e| e.id.clone()).collect());
    decide_and_acknowledge(&s, entries, arrival)
        .instrument(span)
        .await;
    s.in_flight.release(held);
    drop(slot);
}

async fn decide_and_acknowledge(s: &Shared, entries: Vec<StreamEntry>, arrival: Arrival) {
    let counts = match arrival {
        Arrival::Fresh => HashMap::new(),
        Arrival::Redelivered => delivery_counts(s, &entries).await,
    };
    let mut trimmed = Vec::new();
    let mut ids = Vec::with_capacity(entries.len());
    let mut deliveries = Vec::with_capacity(entries.len());
    for entry in entries {
        if entry.fields.is_none() {
            trimmed.push(entry.id);
            continue;
        }
        let attempts = counts.get(&entry.id).copied().unwrap_or(1);
        ids.push(entry.id.clone());
        deliveries.push(delivery(s, entry, attempts));
    }
    // Every event goes to the sink before any outcome is awaited, so the
    // batch's rows share database batches.
    let processor = &s.processor;
    let mut started = Vec::with_capacity(deliveries.len());
    for d in deliveries {
        started.push(processor.begin(d).await);
    }
    let mut dispositions = Vec::with_capacity(started.len());
    for step in started {
        dispositions.push(processor.finish(step).await);
    }

    let mut pipe = redis::pipe();
    pipe.atomic();
    // Trimmed entries get an XACK of their own, whose reply says how many
    // were still pending here (XAUTOCLAIM may have dropped them already,
    // and counted them): each is counted once.
    if !trimmed.is_empty() {
        pipe.cmd("XACK")
            .arg(&s.stream.key)
            .arg(&s.stream.group)
            .arg(&trimmed);
    }
    let mut acks: Vec<&str> = Vec::with_capacity(ids.len());
    let mut excused: Vec<&str> = Vec::new();
    for (id, disposition) in ids.iter().zip(&dispositions) {
        match disposition {
            Disposition::DeadLetter(letter) => {
                letter.add_to(&mut pipe, &s.dlq_key);
                acks.push(id);
            }
            Disposition::Retry { .. } => excused.push(id),
            Disposition::Stored { .. } | Disposition::Job { .. } => acks.push(id),
        }
    }
    if !acks.is_empty() {
        pipe.cmd("XACK")
            .arg(&s.stream.key)
            .arg(&s.stream.group)
            .arg(&acks)
            .ignore();
        if s.stream.delete_acked {
            pipe.cmd("XDEL").arg(&s.stream.key).arg(&acks).ignore();
        }
    }
    if arrival == Arrival::Redelivered && !(acks.is_empty() && trimmed.is_empty()) {
        // Whatever leaves the pending list leaves the excused counts too.
        pipe.cmd("HDEL")
            .arg(excused_key(&s.stream.key))
            .arg(&acks)
            .arg(&trimmed)
            .ignore();
    }
    for id in &excused {
        pipe.cmd("HINCRBY")
            .arg(excused_key(&s.stream.key))
            .arg(id)
            .arg(1)
            .ignore();
    }
    if trimmed.is_empty() && acks.is_empty() && excused.is_empty() {
        return;
    }
    let Some(replies) = execute(s, &pipe, acks.len() + trimmed.len()).await else {
        return;
    };
    let newly_trimmed = match replies.first() {
        Some(Value::Int(n)) if !trimmed.is_empty() => u64::try_from(*n).unwrap_or(0),
        _ => 0,
    };
    if newly_trimmed > 0 {
        s.processor.metrics().stream_trimmed.inc_by(newly_trimmed);
        tracing::warn!(
            count = newly_trimmed,
            ids = ?trimmed,
            stream = %s.stream.key,
            "pending entries were deleted or trimmed from the stream before they were stored (MAXLEN/XTRIM/XDEL by a producer?); acknowledged with nothing to store"
        );
    }
    s.processor.settled(SourceKind::Stream, &dispositions);
}

/// Builds the processor's view of one entry, moving its `data` out.
fn delivery(s: &Shared, mut entry: StreamEntry, attempts: u64) -> Delivery {
    let text = |v: Option<&[u8]>| v.map(|b| String::from_utf8_lossy(b).into_owned());
    let name = text(entry.field("name"))
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| AUDIT_EVENT.to_owned());
    // A dead letter put back by `dlq replay` keeps the identity it first
    // arrived with, and so its idempotency key.
    let identity = text(entry.field(crate::dlq::REPLAY_SOURCE_FIELD))
        .filter(|src| src.starts_with("stream:") || src.starts_with("bullmq:"))
        .unwrap_or_else(|| format!("stream:{}:{}", s.stream.key, entry.id));
    let trace = crate::tracing_ctx::from_stream_fields(
        entry.field("traceparent"),
        entry.field("tracestate"),
    );
    let side_bytes = entry.side_bytes();
    let enqueued_ms = crate::telemetry::stream_id_millis(&entry.id);
    Delivery {
        source: SourceKind::Stream,
        identity,
        name,
        data: entry.take_field("data"),
        side_bytes,
        attempts,
        wait_out_outages: true,
        max_deliveries: Some(s.stream.max_deliveries),
        trace,
        enqueued_ms,
    }
}

/// Runs the batch's MULTI/EXEC, retrying a few times (the first command
/// after a dropped connection fails while the manager reconnects), and
/// returns the replies of its commands not marked `ignore`; `None` if it
/// never went through, in which case the entries are delivered again and
/// absorbed as duplicates.
async fn execute(s: &Shared, pipe: &redis::Pipeline, count: usize) -> Option<Vec<Value>> {
    let mut conn = s.commands.clone();
    for attempt in 1..=5u64 {
        match pipe.query_async::<Vec<Value>>(&mut conn).await {
            Ok(replies) => return Some(replies),
            Err(e) => {
                s.processor
                    .metrics()
                    .redis_errors
                    .with_label_values(&["xack"])
                    .inc();
                if attempt == 5 {
                    tracing::error!(error = %e, count, "could not acknowledge; the entries will be delivered again and absorbed as duplicates");
                    return None;
                }
                tracing::warn!(error = %e, attempt, "acknowledging failed; retrying");
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
        }
    }
    None
}

/// Delivery counts of redelivered entries, now that they are ours: the
/// XPENDING count less the deliveries excused by a shutdown during an
/// outage. A failed lookup counts every entry as a first delivery: the
/// poison check is skipped rather than anything dead-lettered by mistake.
async fn delivery_counts(s: &Shared, entries: &[StreamEntry]) -> HashMap<String, u64> {
    let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
        return HashMap::new();
    };
    let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
    let mut conn = s.commands.clone();
    let mut pipe = redis::pipe();
    pipe.cmd("XPENDING")
        .arg(&s.stream.key)
        .arg(&s.stream.group)
        .arg(&first.id)
        .arg(&last.id)
        .arg(entries.len())
        .arg(&s.consumer)
        .cmd("HMGET")
        .arg(excused_key(&s.stream.key))
        .arg(&ids);
    let reply: redis::RedisResult<(Value, Vec<Option<u64>>)> = pipe.query_async(&mut conn).await;
    match reply {
        Ok((pending, excused)) => {
            let mut counts = parse_pending_counts(&pending);
            for (id, excused) in ids.iter().zip(excused) {
                if let (Some(count), Some(excused)) = (counts.get_mut(*id), excused) {
                    *count = count.saturating_sub(excused).max(1);
                }
            }
            counts
        }
        Err(e) => {
            s.processor
                .metrics()
                .redis_errors
                .with_label_values(&["xpending"])
                .inc();
            tracing::warn!(error = %e, "XPENDING failed; delivery counts not checked for this batch");
            HashMap::new()
        }
    }
}
