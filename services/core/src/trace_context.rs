//! W3C trace context across process boundaries (Kafka headers, Redis stream entries).
//!
//! One user message is one trace: the gateway starts it, and each later hop continues it from
//! the `traceparent` it finds next to the record, so parent links are exact.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `traceparent` of `span`, or `None` when it has no valid trace context.
#[must_use]
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::with_capacity(2);
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` a child of the remote span described by `traceparent` (ignored when absent or malformed).
pub fn continue_from(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(tp) = traceparent else { return };
    let mut carrier = HashMap::with_capacity(1);
    carrier.insert("traceparent".to_owned(), tp.to_owned());
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The hex trace id of `span` (32 zeros when it has none).
#[must_use]
pub fn trace_id_of(span: &tracing::Span) -> String {
    span.context().span().span_context().trace_id().to_string()
}

/// The trace id inside a `traceparent` value, if it is well formed.
#[must_use]
pub fn trace_id_in(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let _version = parts.next()?;
    let trace = parts.next()?;
    (trace.len() == 32 && trace.bytes().all(|b| b.is_ascii_hexdigit())).then_some(trace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_id_is_read_from_traceparent() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id_in(tp), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(trace_id_in("garbage"), None);
    }
}
