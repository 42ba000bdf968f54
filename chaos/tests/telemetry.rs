//! Telemetry of real processes: one message yields one trace with spans from all three
//! services and the right parent links, and each service's own `/metrics` exposes every metric
//! of the contract it emits.

use std::collections::HashMap;
use std::time::Duration;

use colloquy_chaos::stack::{Stack, StackOptions};
use colloquy_core::metrics::missing_from;
use colloquy_core::wire::ServerFrame;
use colloquy_testkit::client::{WsClient, fetch_token};
use colloquy_testkit::otlp::{AttrValue, OtlpReceiver, ReceivedSpan, SpanKind};
use colloquy_testkit::process::Storage;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_message_is_one_trace_across_three_processes_and_each_exposes_its_metrics() {
    one_trace_on(Storage::Sqlite).await;
}

/// The trace context travels in Kafka record headers, which tansu's postgres engine stores in
/// a table of its own (and Colloquy's patch reads for a whole fetch at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_message_is_one_trace_on_the_durable_default_storage() {
    one_trace_on(Storage::Postgres).await;
}

#[allow(clippy::unwrap_used, reason = "the body of the two tests above")]
async fn one_trace_on(storage: Storage) {
    let receiver = OtlpReceiver::start().await.expect("OTLP receiver");
    let mut opts = StackOptions {
        name: "telemetry".into(),
        nginx: false,
        storage,
        ..StackOptions::default()
    };
    opts.telemetry.otlp_endpoint = Some(receiver.endpoint());
    let stack = Stack::launch(opts).await.expect("stack of real processes");
    let http = reqwest::Client::new();
    let base = stack.http_base();
    let token = fetch_token(&http, &base, "traced_user").await.unwrap();
    let ws_base = base.replacen("http://", "ws://", 1);
    let mut ws = WsClient::connect(&ws_base, "traced_user", &token, None)
        .await
        .unwrap();
    ws.send_message("trace-1", "follow me").await.unwrap();
    let ServerFrame::Ack { trace_id, .. } = ws
        .recv_until(T, |f| matches!(f, ServerFrame::Ack { .. }))
        .await
        .unwrap()
    else {
        unreachable!()
    };
    ws.response_to("trace-1", T).await.unwrap();

    // Spans arrive with each process's batch export (every few seconds).
    let expected = [
        "gateway.message",
        "send incoming_messages",
        "process incoming_messages",
        "chat gpt-4o-mini",
        "send responses",
        "process responses",
        "gateway.deliver",
    ];
    let mut spans: Vec<ReceivedSpan> = Vec::new();
    for _ in 0..60 {
        spans = receiver
            .spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect();
        if expected.iter().all(|n| spans.iter().any(|s| s.name == *n)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let by_name: HashMap<&str, &ReceivedSpan> =
        spans.iter().map(|s| (s.name.as_str(), s)).collect();
    for name in expected {
        assert!(
            by_name.contains_key(name),
            "span {name} missing from trace {trace_id}: {spans:#?}"
        );
    }
    let span = |n: &str| by_name[n];
    assert_eq!(
        span("gateway.message").parent_span_id,
        "",
        "the gateway starts the trace"
    );
    assert_eq!(span("gateway.message").service, "gateway");
    assert_eq!(span("process incoming_messages").service, "ai-consumer");
    assert_eq!(span("process responses").service, "relay");
    assert_eq!(span("gateway.deliver").service, "gateway");
    let parent_of = |child: &str, parent: &str| {
        assert_eq!(
            span(child).parent_span_id,
            span(parent).span_id,
            "{child} must be a child of {parent}"
        );
    };
    parent_of("send incoming_messages", "gateway.message");
    parent_of("process incoming_messages", "send incoming_messages");
    parent_of("chat gpt-4o-mini", "process incoming_messages");
    parent_of("send responses", "process incoming_messages");
    parent_of("process responses", "send responses");
    parent_of("gateway.deliver", "process responses");

    // Span kinds and attributes survive the export (the receiver keeps them).
    for (name, kind) in [
        ("gateway.message", SpanKind::Server),
        ("send incoming_messages", SpanKind::Producer),
        ("process incoming_messages", SpanKind::Consumer),
        ("chat gpt-4o-mini", SpanKind::Client),
        ("send responses", SpanKind::Producer),
        ("process responses", SpanKind::Consumer),
        ("gateway.deliver", SpanKind::Consumer),
    ] {
        assert_eq!(span(name).kind, kind, "kind of {name}: {:#?}", span(name));
    }
    for name in ["gateway.message", "process responses", "gateway.deliver"] {
        assert_eq!(
            span(name).attr("msg_id").and_then(AttrValue::as_str),
            Some("trace-1"),
            "msg_id of {name}: {:#?}",
            span(name)
        );
        assert_eq!(
            span(name).attr("userid").and_then(AttrValue::as_str),
            Some("traced_user"),
            "userid of {name}"
        );
    }
    assert_eq!(
        span("send responses")
            .attr("messaging.system")
            .and_then(AttrValue::as_str),
        Some("kafka")
    );

    // One message through every gateway, so each has a latency to report.
    for (n, (_, url)) in stack
        .metrics_urls()
        .iter()
        .filter(|(s, _)| *s == "gateway")
        .enumerate()
    {
        let base = url.trim_end_matches("/metrics");
        let token = fetch_token(&http, base, "metered_user").await.unwrap();
        let mut ws = WsClient::connect(
            &base.replacen("http://", "ws://", 1),
            "metered_user",
            &token,
            None,
        )
        .await
        .unwrap();
        ws.send_message(&format!("metered-{n}"), "count me")
            .await
            .unwrap();
        ws.response_to(&format!("metered-{n}"), T).await.unwrap();
    }
    // Each process exposes the contract metrics it emits (lag appears with the first statistics).
    for (service, url) in stack.metrics_urls() {
        let mut missing: Vec<&str> = Vec::new();
        for _ in 0..40 {
            let text = http.get(url).send().await.unwrap().text().await.unwrap();
            missing = missing_from(&text, Some(service));
            if missing.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(
            missing.is_empty(),
            "{service} at {url} does not expose {missing:?}"
        );
    }
}
