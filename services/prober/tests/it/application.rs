//! The prober as the binary runs it: probes on an interval and exports them on `/metrics`.
//! (The only test of this binary that emits probe metrics, so the global recorder's counts are
//! this test's alone.)

use std::time::Duration;

use colloquy_prober::{Application, ProberConfig, Settings};
use colloquy_testkit::TestApp;
use tokio_util::sync::CancellationToken;

/// The value of the first sample whose line starts with `series` (name and labels, exactly).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

async fn scrape(http: &reqwest::Client, port: u16) -> String {
    http.get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body")
}

/// Scrapes until `ok` holds (at most `secs` seconds) and returns the last scrape.
async fn scrape_until(
    http: &reqwest::Client,
    port: u16,
    secs: u64,
    ok: impl Fn(&str) -> bool,
) -> String {
    let mut text = String::new();
    for _ in 0..secs * 4 {
        text = scrape(http, port).await;
        if ok(&text) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_success_then_failure_when_the_relay_stops() {
    let mut app = TestApp::spawn().await.expect("stack");
    let mut cfg = ProberConfig::local(app.http_base(0));
    cfg.interval_secs = 1;
    cfg.answer_timeout_ms = 2_000;
    let prober = Application::build(Settings { prober: cfg }).await.unwrap();
    let port = prober.metrics_port();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(prober.run_until_stopped(shutdown.clone()));

    let text = scrape(&app.http, port).await;
    for outcome in ["success", "connect_failed", "no_ack", "no_answer", "error"] {
        assert!(
            text.contains(&format!("colloquy_probes_total{{outcome=\"{outcome}\"}}")),
            "no zero series for {outcome}:\n{text}"
        );
    }

    let text = scrape_until(&app.http, port, 30, |t| {
        sample(t, "colloquy_probes_total{outcome=\"success\"}").unwrap_or(0.0) >= 1.0
    })
    .await;
    assert_eq!(sample(&text, "colloquy_probe_success"), Some(1.0), "{text}");
    for stage in ["ack", "first_delta", "answer"] {
        let count = format!("colloquy_probe_latency_seconds_count{{stage=\"{stage}\"}}");
        assert!(
            sample(&text, &count).unwrap_or(0.0) >= 1.0,
            "no {stage} latency:\n{text}"
        );
    }
    assert_eq!(
        sample(
            &text,
            "colloquy_build_info{service=\"prober\",version=\"0.1.0\"}"
        ),
        Some(1.0),
        "{text}"
    );

    // Without the relay no answer reaches Redis: probes are acked and then time out.
    app.relay.take().expect("relay").stop().await;
    let text = scrape_until(&app.http, port, 30, |t| {
        sample(t, "colloquy_probes_total{outcome=\"no_answer\"}").unwrap_or(0.0) >= 1.0
            && sample(t, "colloquy_probe_success") == Some(0.0)
    })
    .await;
    assert!(
        sample(&text, "colloquy_probes_total{outcome=\"no_answer\"}").unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    assert_eq!(sample(&text, "colloquy_probe_success"), Some(0.0), "{text}");

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("prober stops")
        .unwrap()
        .unwrap();
    app.shutdown().await;
}
