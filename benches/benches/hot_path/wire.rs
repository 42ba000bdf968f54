//! The WebSocket edge: one client frame parsed (and checked against the limits), one server
//! frame serialised. Parsing is the whole of the routing cost: the session then matches on the
//! enum.

use std::hint::black_box;

use criterion::{Criterion, Throughput};

use colloquy_core::wire::{ClientFrame, ServerFrame};

/// The gateway's default `MAX_CONTENT_BYTES`.
const MAX_CONTENT_BYTES: usize = 16_384;

/// A typical chat message with a client idempotency key and the original protocol's userid.
pub(crate) const MESSAGE: &str = r#"{"type":"message","content":"Can you explain how Kafka consumer groups rebalance when a new consumer joins, and what happens to in-flight messages?","id":"web-7f3a9c2e-0042","userid":"alice_01"}"#;
const RESUME: &str = r#"{"type":"resume","after":"1767225600123-0"}"#;
const INVALID: &str = r#"{"type":"message","content":"unterminated"#;

/// A complete answer of about 800 bytes, as a client receives it.
pub(crate) fn response_frame() -> ServerFrame {
    ServerFrame::Response {
        id: "web-7f3a9c2e-0042".into(),
        event_id: "1767225600123-0".into(),
        content: answer(),
        userid: "alice_01".into(),
        timestamp: "2026-01-01T00:00:00.123Z".into(),
    }
}

/// About 800 bytes of model output with a quote and a newline, so escaping is exercised.
pub(crate) fn answer() -> String {
    "When a consumer joins, the group coordinator starts a rebalance: every member rejoins, \
     the leader assigns partitions and each member resumes from the committed offset.\n\
     Messages that were \"in flight\" on a revoked partition are delivered again to the new owner, \
     which is why the consumer stores an offset only after the side effect succeeded. "
        .repeat(2)
}

pub(crate) fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire");
    g.throughput(Throughput::Elements(1));
    g.bench_function("ClientFrame::parse/message", |b| {
        b.iter(|| ClientFrame::parse(black_box(MESSAGE), MAX_CONTENT_BYTES));
    });
    g.bench_function("ClientFrame::parse/resume", |b| {
        b.iter(|| ClientFrame::parse(black_box(RESUME), MAX_CONTENT_BYTES));
    });
    g.bench_function("ClientFrame::parse/invalid_json", |b| {
        b.iter(|| ClientFrame::parse(black_box(INVALID), MAX_CONTENT_BYTES));
    });
    let response = response_frame();
    g.bench_function("ServerFrame::to_json/response", |b| {
        b.iter(|| black_box(&response).to_json());
    });
    let ack = ServerFrame::Ack {
        id: "web-7f3a9c2e-0042".into(),
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
    };
    g.bench_function("ServerFrame::to_json/ack", |b| {
        b.iter(|| black_box(&ack).to_json());
    });
    g.finish();
}
