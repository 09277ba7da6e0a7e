//! W3C trace context carried by messages, and the spans that continue it.
//!
//! A producer may send its trace context with a message (the stream entry
//! field `traceparent`, or a `traceparent` key in BullMQ job data). The
//! worker then opens one span per such event, `audit.event.store`, whose
//! parent is the producer's span: it lasts from the hand-off to the sink
//! until the row's commit, so the producer's trace reaches the database
//! write. It also links to the batch span that read it.
//!
//! Per-event spans exist only while OpenTelemetry export is on
//! ([`export_enabled`]): without an endpoint nothing here allocates beyond
//! the batch span, which the logs use anyway. Parsing uses the
//! OpenTelemetry SDK's own W3C propagator rather than a hand-written parser.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

static EXPORT_ENABLED: AtomicBool = AtomicBool::new(false);

/// Longest `traceparent`/`tracestate` value looked at; anything longer is
/// not a valid W3C header and is ignored (never an error for the event).
const MAX_HEADER_LEN: usize = 512;

/// Marks OpenTelemetry export as installed (by `telemetry::init_tracing`),
/// so that per-event spans are created.
pub fn set_export_enabled(on: bool) {
    EXPORT_ENABLED.store(on, Ordering::Relaxed);
}

/// Whether spans are exported over OTLP (per-event spans are made only then).
pub fn export_enabled() -> bool {
    EXPORT_ENABLED.load(Ordering::Relaxed)
}

/// A producer's trace context, parsed from a valid W3C `traceparent`.
#[derive(Clone, Debug)]
pub struct RemoteParent {
    context: opentelemetry::Context,
    trace_id: String,
}

impl RemoteParent {
    /// Parses a `traceparent` (and optional `tracestate`); `None` when the
    /// value is missing, not UTF-8, too long or not a valid trace context.
    /// Never fails the event: a bad header only means no parent.
    pub fn parse(traceparent: &[u8], tracestate: Option<&[u8]>) -> Option<Self> {
        if traceparent.is_empty() || traceparent.len() > MAX_HEADER_LEN {
            return None;
        }
        let mut carrier = HashMap::with_capacity(2);
        carrier.insert(
            "traceparent".to_owned(),
            std::str::from_utf8(traceparent).ok()?.trim().to_owned(),
        );
        if let Some(state) = tracestate
            .filter(|s| s.len() <= MAX_HEADER_LEN)
            .and_then(|s| std::str::from_utf8(s).ok())
        {
            carrier.insert("tracestate".to_owned(), state.to_owned());
        }
        // `extract` would fall back to the *current* context (the batch
        // span) for an invalid header; start from an empty one instead.
        let context = TraceContextPropagator::new()
            .extract_with_context(&opentelemetry::Context::new(), &carrier);
        let span_context = context.span().span_context().clone();
        if !span_context.is_valid() {
            return None;
        }
        Some(Self {
            trace_id: span_context.trace_id().to_string(),
            context,
        })
    }

    /// The producer's trace id (32 lowercase hex digits), for log lines.
    pub fn trace_id(&self) -> &str {
        &self.trace_id
    }
}

/// The trace context of a stream entry, from its `traceparent` field (and
/// `tracestate` when present).
pub fn from_stream_fields(
    traceparent: Option<&[u8]>,
    tracestate: Option<&[u8]>,
) -> Option<RemoteParent> {
    RemoteParent::parse(traceparent?, tracestate)
}

/// The trace context of a BullMQ job, from the `traceparent` (and
/// `tracestate`) string keys of its data object. For the BullMQ source.
pub fn from_job_data(data: &serde_json::Value) -> Option<RemoteParent> {
    let tp = data.get("traceparent")?.as_str()?;
    let ts = data.get("tracestate").and_then(|v| v.as_str());
    RemoteParent::parse(tp.as_bytes(), ts.map(str::as_bytes))
}

/// The span of one read batch (`source` is `stream` or `bullmq`). When
/// export is on, its trace id is recorded as the `trace_id` field so log
/// lines inside it carry it.
pub fn batch_span(source: &'static str, queue: &str, messages: usize) -> tracing::Span {
    let span = tracing::info_span!(
        "batch",
        otel.name = "audit.batch",
        source,
        queue,
        messages,
        trace_id = tracing::field::Empty,
    );
    record_trace_id(&span);
    span
}

/// The span of one job run (`kind` is `export` or `snapshot`), for job
/// executors; `job_id` is the job's own identifier and `source` the
/// identity of the request that created it (`stream:...`, `bullmq:...`).
pub fn job_span(kind: &'static str, job_id: &str, source: &str) -> tracing::Span {
    let span = tracing::info_span!(
        "job",
        otel.name = "audit.job",
        kind,
        job_id,
        source,
        trace_id = tracing::field::Empty,
    );
    record_trace_id(&span);
    span
}

/// The span covering one event from its hand-off to the sink until its
/// commit, child of the producer's span and linked to the current batch
/// span. `None` when export is off or the message carried no trace context.
pub fn event_span(source: &'static str, parent: Option<&RemoteParent>) -> Option<tracing::Span> {
    if !export_enabled() {
        return None;
    }
    let parent = parent?;
    let batch = tracing::Span::current();
    let span = tracing::info_span!(
        parent: None,
        "event",
        otel.name = "audit.event.store",
        otel.kind = "consumer",
        source,
        trace_id = %parent.trace_id,
        outcome = tracing::field::Empty,
    );
    let _ = span.set_parent(parent.context.clone());
    let batch_cx = batch.context().span().span_context().clone();
    if batch_cx.is_valid() {
        span.add_link(batch_cx);
    }
    Some(span)
}

fn record_trace_id(span: &tracing::Span) {
    if export_enabled() {
        let id = span.context().span().span_context().trace_id();
        if id != opentelemetry::trace::TraceId::INVALID {
            span.record("trace_id", tracing::field::display(id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_gives_its_trace_id() {
        let p = RemoteParent::parse(TP.as_bytes(), None).unwrap();
        assert_eq!(p.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let sc = p.context.span().span_context().clone();
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_remote() && sc.is_sampled());
    }

    #[test]
    fn bad_traceparents_are_ignored_without_panicking() {
        for bad in [
            &b""[..],
            b"garbage",
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            &[0xff, 0xfe, 0x00],
            &[b'0'; 4096],
        ] {
            assert!(RemoteParent::parse(bad, None).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn an_invalid_header_never_falls_back_to_the_current_context() {
        let valid = RemoteParent::parse(TP.as_bytes(), None).unwrap();
        let _active = valid.context.clone().attach();
        assert!(RemoteParent::parse(b"00-not-a-trace-01", None).is_none());
    }

    #[test]
    fn job_data_carries_the_traceparent_key() {
        let data = serde_json::json!({"action": "a", "traceparent": TP});
        assert!(from_job_data(&data).is_some());
        assert!(from_job_data(&serde_json::json!({"traceparent": 5})).is_none());
        assert!(from_job_data(&serde_json::json!([1])).is_none());
    }

    #[test]
    fn no_event_span_while_export_is_off() {
        let p = RemoteParent::parse(TP.as_bytes(), None).unwrap();
        assert!(event_span("stream", Some(&p)).is_none());
    }
}
