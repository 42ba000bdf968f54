//! `Prober::probe_once` against a real stack, healthy and broken.

use std::time::Duration;

use colloquy_prober::{Outcome, Prober, ProberConfig};
use colloquy_testkit::TestApp;

fn config(edge: String) -> ProberConfig {
    let mut cfg = ProberConfig::local(edge);
    cfg.answer_timeout_ms = 20_000;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_needs_the_admin_token_succeeds_with_it_and_reports_a_stopped_consumer() {
    let mut app = TestApp::builder()
        .gateway_config(|g| g.admin_token = Some("probe-admin-token".to_owned().into()))
        .spawn()
        .await
        .expect("stack");

    let without = Prober::new(config(app.http_base(0)))
        .unwrap()
        .probe_once()
        .await;
    assert_eq!(without.outcome, Outcome::Error, "{without:?}");
    assert!(without.detail.contains("401"), "{}", without.detail);

    let mut cfg = config(app.http_base(0));
    cfg.admin_token = Some("probe-admin-token".to_owned().into());
    let prober = Prober::new(cfg).unwrap();
    let ok = prober.probe_once().await;
    assert_eq!(ok.outcome, Outcome::Success, "{ok:?}");
    let (ack, first, answer) = (ok.ack.unwrap(), ok.first_delta.unwrap(), ok.answer.unwrap());
    assert!(ack <= first && first <= answer, "{ok:?}");

    // A second probe on the same user (the inbox now holds the first answer) succeeds too.
    assert_eq!(prober.probe_once().await.outcome, Outcome::Success);

    // Without the ai-consumer the message is acked (it is in Kafka) but never answered.
    app.consumer.take().expect("consumer").stop().await;
    let mut cfg = prober.config().clone();
    cfg.answer_timeout_ms = 3_000;
    let stalled = Prober::new(cfg).unwrap().probe_once().await;
    assert_eq!(stalled.outcome, Outcome::NoAnswer, "{stalled:?}");
    assert!(
        stalled.ack.is_some() && stalled.answer.is_none(),
        "{stalled:?}"
    );

    // The restarted consumer answers the stalled message and the next probe's.
    app.start_consumer().await.unwrap();
    let mut recovered = prober.probe_once().await;
    for _ in 0..3 {
        if recovered.outcome == Outcome::Success {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        recovered = prober.probe_once().await;
    }
    assert_eq!(recovered.outcome, Outcome::Success, "{recovered:?}");
    app.shutdown().await;
}

#[tokio::test]
async fn unreachable_edge_is_connect_failed() {
    // A port that was free a moment ago and that nothing listens on now.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut cfg = ProberConfig::local(format!("http://127.0.0.1:{port}"));
    cfg.ack_timeout_ms = 2_000;
    let report = Prober::new(cfg).unwrap().probe_once().await;
    assert_eq!(report.outcome, Outcome::ConnectFailed, "{report:?}");
    assert!(report.latencies().is_empty());
}
