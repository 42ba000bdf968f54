//! Telemetry of the in-process stack: after one message, the Prometheus endpoints expose every
//! metric of the contract, and logs/acks carry a real trace id. (The per-process checks, one
//! trace across three real processes and each service's own `/metrics`, are in `chaos/tests`.)

use std::time::Duration;

use colloquy_core::metrics::missing_from;
use colloquy_core::wire::ServerFrame;
use colloquy_testkit::TestApp;

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
