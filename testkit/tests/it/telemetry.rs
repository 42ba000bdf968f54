//! Telemetry of the in-process stack: after one message, the Prometheus endpoints expose every
//! metric of the contract, and the message's trace follows OpenTelemetry's semantic
//! conventions. (The per-process checks, one trace across three real processes and each
//! service's own `/metrics`, are in `chaos/tests`.)

use std::collections::BTreeMap;
use std::time::Duration;

use colloquy_core::metrics::missing_from;
use colloquy_core::records::{ResponseBody, ResponseRecord};
use colloquy_core::wire::ServerFrame;
use colloquy_relay::config::RelayConfig;
use colloquy_testkit::TestApp;
use colloquy_testkit::harness::flush_spans;
use colloquy_testkit::otlp::{AttrValue, ReceivedSpan, SpanKind, shared};

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_exposes_the_whole_contract_after_one_message() {
    let app = TestApp::spawn().await.expect("stack");
    let mut ws = app.connect(0, "observed").await.unwrap();
    ws.send_message("t1", "measure me").await.unwrap();
    ws.response_to("t1", Duration::from_secs(30)).await.unwrap();
    // Consumer lag comes from librdkafka statistics, emitted every 5 s.
    let mut missing = Vec::new();
    for _ in 0..40 {
        let text = app
            .http
            .get(format!("{}/metrics", app.http_base(0)))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        // The in-process stack runs the three services (not the prober): one recorder, all
        // three services' metrics.
        missing = ["gateway", "ai-consumer", "relay"]
            .into_iter()
            .flat_map(|service| missing_from(&text, Some(service)))
            .collect();
        if missing.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(missing.is_empty(), "not exposed: {missing:?}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_latencies_cover_every_hop() {
    let app = TestApp::spawn().await.expect("stack");
    let mut ws = app.connect(0, "staged").await.unwrap();
    ws.send_message("s1", "which hops?").await.unwrap();
    let ServerFrame::Response { .. } = ws.response_to("s1", Duration::from_secs(30)).await.unwrap()
    else {
        unreachable!()
    };
    let text = app
        .http
        .get(format!("{}/metrics", app.http_base(0)))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for stage in ["produce", "queue_wait", "llm", "relay", "fanout"] {
        let needle = format!("colloquy_stage_latency_seconds_count{{stage=\"{stage}\"}}");
        assert!(
            text.contains(&needle),
            "no {stage} stage in\n{}",
            text.lines()
                .filter(|l| l.contains("stage_latency_seconds_count"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    app.shutdown().await;
}

/// One message's trace, as the OTLP exporter sends it: span names `{operation} {topic}` and
/// `chat {model}`, their kinds, parent links, and the messaging and GenAI attributes with the
/// values the stack used (the topics, partitions, offsets and groups of the records, the model
/// and the token usage the LLM reported). The keys are spelled out here, not taken from the
/// code's constants, so a renamed or dropped attribute fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_message_trace_follows_the_semantic_conventions() {
    const GROUP: &str = "conventions-group";
    const MODEL: &str = "conventions-model";
    let app = TestApp::builder()
        .consumer_config(|c| {
            c.group = GROUP.into();
            c.model = MODEL.into();
        })
        .spawn()
        .await
        .expect("stack");
    let relay_group = RelayConfig::local().group;
    let incoming = app.names.incoming_topic();
    let responses = app.names.responses_topic();
    let mut ws = app.connect(0, "conventional").await.unwrap();
    ws.send_message("sc1", "name your spans").await.unwrap();
    let ServerFrame::Ack { trace_id, .. } = ws
        .recv_until(T, |f| matches!(f, ServerFrame::Ack { .. }))
        .await
        .unwrap()
    else {
        unreachable!()
    };
    ws.response_to("sc1", T).await.unwrap();

    let send_incoming = format!("send {incoming}");
    let process_incoming = format!("process {incoming}");
    let chat = format!("chat {MODEL}");
    let send_responses = format!("send {responses}");
    let process_responses = format!("process {responses}");
    let expected = [
        ("gateway.message", SpanKind::Server),
        (send_incoming.as_str(), SpanKind::Producer),
        (process_incoming.as_str(), SpanKind::Consumer),
        (chat.as_str(), SpanKind::Client),
        (send_responses.as_str(), SpanKind::Producer),
        (process_responses.as_str(), SpanKind::Consumer),
        ("gateway.deliver", SpanKind::Consumer),
    ];
    // Spans end shortly after the answer (the consumer records the outcome, the relay stores
    // its offset): flush and look again until all are there.
    let mut spans: Vec<ReceivedSpan> = Vec::new();
    for _ in 0..100 {
        tokio::task::spawn_blocking(flush_spans).await.unwrap();
        spans = shared().trace(&trace_id);
        if expected
            .iter()
            .all(|(n, _)| spans.iter().any(|s| s.name == *n))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    let mut by_name: BTreeMap<&str, &ReceivedSpan> = BTreeMap::new();
    for (name, kind) in expected {
        let found: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.name == name).collect();
        assert_eq!(
            found.len(),
            1,
            "one {name} span in trace {trace_id}: {names:?}"
        );
        assert_eq!(found[0].kind, kind, "kind of {name}: {:#?}", found[0]);
        by_name.insert(name, found[0]);
    }
    let span = |n: &str| by_name[n];
    let parent_of = |child: &str, parent: &str| {
        assert_eq!(
            span(child).parent_span_id,
            span(parent).span_id,
            "{child} must be a child of {parent}"
        );
    };
    assert_eq!(
        span("gateway.message").parent_span_id,
        "",
        "the gateway starts the trace"
    );
    parent_of(&send_incoming, "gateway.message");
    parent_of(&process_incoming, &send_incoming);
    parent_of(&chat, &process_incoming);
    parent_of(&send_responses, &process_incoming);
    parent_of(&process_responses, &send_responses);
    // Through the Redis inbox entry to the socket.
    parent_of("gateway.deliver", &process_responses);

    let text = |s: &ReceivedSpan, key: &str| -> String {
        match s.attr(key) {
            Some(AttrValue::Str(v)) => v.clone(),
            other => panic!("{key} of {} must be a string, is {other:?}: {s:#?}", s.name),
        }
    };
    let int = |s: &ReceivedSpan, key: &str| -> i64 {
        s.attr(key)
            .and_then(AttrValue::as_i64)
            .unwrap_or_else(|| panic!("{key} of {} must be an integer: {s:#?}", s.name))
    };
    for (name, topic, operation, group) in [
        (&send_incoming, &incoming, "send", None),
        (&process_incoming, &incoming, "process", Some(GROUP)),
        (&send_responses, &responses, "send", None),
        (
            &process_responses,
            &responses,
            "process",
            Some(relay_group.as_str()),
        ),
    ] {
        let s = span(name);
        assert_eq!(text(s, "messaging.system"), "kafka", "{name}");
        assert_eq!(&text(s, "messaging.destination.name"), topic, "{name}");
        assert_eq!(text(s, "messaging.operation.type"), operation, "{name}");
        assert_eq!(text(s, "messaging.operation.name"), operation, "{name}");
        let partition = text(s, "messaging.destination.partition.id");
        assert!(
            partition.parse::<u32>().is_ok(),
            "{name}: partition {partition:?}"
        );
        assert!(int(s, "messaging.kafka.offset") >= 0, "{name}");
        match group {
            Some(g) => assert_eq!(text(s, "messaging.consumer.group.name"), g, "{name}"),
            None => assert_eq!(s.attr("messaging.consumer.group.name"), None, "{name}"),
        }
    }
    // The consumer processed the record the producer sent: same partition, same offset.
    for (sent, processed) in [
        (&send_incoming, &process_incoming),
        (&send_responses, &process_responses),
    ] {
        for key in [
            "messaging.destination.partition.id",
            "messaging.kafka.offset",
        ] {
            assert_eq!(
                span(sent).attr(key),
                span(processed).attr(key),
                "{key} of {sent} and {processed}"
            );
        }
    }

    // The LLM call, with the usage the fake LLM reported in the answer's record.
    let llm = span(&chat);
    assert_eq!(text(llm, "gen_ai.provider.name"), "openai");
    assert_eq!(text(llm, "gen_ai.operation.name"), "chat");
    assert_eq!(text(llm, "gen_ai.request.model"), MODEL);
    let records = app
        .read_topic(&responses, 1_000, Duration::from_secs(3))
        .await
        .unwrap();
    let (prompt, completion) = records
        .iter()
        .filter_map(|(payload, _)| serde_json::from_slice::<ResponseRecord>(payload).ok())
        .find_map(|r| match r.body {
            ResponseBody::Final {
                prompt_tokens,
                completion_tokens,
                ..
            } if r.msg_id == "sc1" => Some((prompt_tokens, completion_tokens)),
            _ => None,
        })
        .expect("the final record of sc1");
    assert!(prompt > 0 && completion > 0, "usage {prompt}/{completion}");
    assert_eq!(int(llm, "gen_ai.usage.input_tokens"), i64::from(prompt));
    assert_eq!(
        int(llm, "gen_ai.usage.output_tokens"),
        i64::from(completion)
    );
    app.shutdown().await;
}
