//! Throughput SLO: a fixed workload completes with nothing lost at a rate well above a floor
//! set ten times below what the system does on this kind of machine (so noise cannot fail it).
//! The measured figure is printed; real capacity figures come from load runs, not from here.

use std::sync::Arc;

use colloquy_testkit::TestApp;
use colloquy_testkit::checker::Checker;
use colloquy_testkit::load::{self, LoadConfig, Protocol};

/// Messages per second the fixed workload must at least reach. The in-process debug build on
/// 2 cores does several hundred; this floor is more than ten times lower.
const FLOOR_MSGS_PER_SEC: f64 = 20.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_workload_is_delivered_completely_above_the_floor() {
    let app = TestApp::spawn().await.expect("stack");
    let cfg = LoadConfig {
        http: app.http_base(0),
        ws: app.ws_base(0),
        users: 20,
        messages: 20,
        window: 4,
        rate: 0.0,
        protocol: Protocol::Full,
        timeout_secs: 120,
        user_prefix: "slo".into(),
    };
    let report = load::run(cfg, Arc::new(Checker::default())).await;
    println!("SLO workload: {report}");
    assert!(report.check.is_clean(), "{report}");
    assert_eq!(report.check.delivered, 400, "{report}");
    assert_eq!(report.check.acked, 400, "{report}");
    assert!(report.throughput >= FLOOR_MSGS_PER_SEC, "{report}");
    app.shutdown().await;
}
