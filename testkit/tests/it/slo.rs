//! Throughput SLO: a fixed workload completes with nothing lost at a rate well above a floor
//! set ten times below what the system does on this kind of machine (so noise cannot fail it).
//! The measured figure is printed; real capacity figures come from load runs, not from here.

use std::sync::Arc;

use colloquy_testkit::TestApp;
use colloquy_testkit::checker::Checker;
use colloquy_testkit::load::{self, LoadConfig, Protocol};
use secrecy::SecretString;

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
        admin_token: None,
    };
    let report = load::run(cfg, Arc::new(Checker::default())).await;
    println!("SLO workload: {report}");
    assert!(report.check.is_clean(), "{report}");
    assert_eq!(report.check.delivered, 400, "{report}");
    assert_eq!(report.check.acked, 400, "{report}");
    assert!(report.throughput >= FLOOR_MSGS_PER_SEC, "{report}");
    app.shutdown().await;
}

/// Gateways outside dev mode issue tokens only to the holder of `AUTH_ADMIN_TOKEN`: the load
/// client presents it (`--admin-token` / `AUTH_ADMIN_TOKEN`), which is how the container
/// deployment's tests drive a deployment with production settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_client_presents_the_admin_token() {
    let app = TestApp::builder()
        .gateway_config(|g| {
            g.dev = false;
            g.auth_secret = SecretString::from("a-load-test-secret-of-at-least-32-bytes");
            g.admin_token = Some(SecretString::from("load-admin"));
        })
        .spawn()
        .await
        .expect("stack");
    let cfg = LoadConfig {
        http: app.http_base(0),
        ws: app.ws_base(0),
        users: 3,
        messages: 2,
        window: 1,
        rate: 0.0,
        protocol: Protocol::Full,
        timeout_secs: 60,
        user_prefix: "admin".into(),
        admin_token: Some("load-admin".into()),
    };
    let report = load::run(cfg, Arc::new(Checker::default())).await;
    assert!(report.check.is_clean(), "{report}");
    assert_eq!(report.check.delivered, 6, "{report}");
    app.shutdown().await;
}
