//! The chaos scenarios as tests: one per scenario, each on its own stack of real processes.
//!
//! They need the service binaries (`cargo build --bins` first), tansu and redis-server; nginx
//! is used when installed. The scenarios run one at a time (a lock, not `--test-threads`), so
//! that two stacks never compete for the machine. `TEST_LOG=1` shows the progress.

use std::sync::{LazyLock, Once};

use colloquy_chaos::{Scenario, ScenarioConfig, scenarios};

static ONE_AT_A_TIME: LazyLock<tokio::sync::Mutex<()>> =
    LazyLock::new(|| tokio::sync::Mutex::new(()));

fn init_log() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter("info")
                .with_test_writer()
                .try_init();
        }
    });
}

/// Runs `scenario` and checks the delivery promise: nothing acked lost, nothing delivered
/// twice to a connection, nothing invented, and every message answered (a response or
/// `llm_failed`) before the load's timeout.
async fn check(scenario: Scenario) -> anyhow::Result<()> {
    check_with(scenario, &ScenarioConfig::default()).await
}

/// [`check`] with a load and downtime of its own.
async fn check_with(scenario: Scenario, cfg: &ScenarioConfig) -> anyhow::Result<()> {
    init_log();
    let _turn = ONE_AT_A_TIME.lock().await;
    let report = scenarios::run(scenario, cfg).await?;
    eprintln!("{report}");
    assert!(report.acked > 0, "nothing was acked: {report}");
    assert_eq!(report.lost, 0, "acked messages were lost: {report}");
    assert_eq!(
        report.duplicated, 0,
        "a connection saw a message twice: {report}"
    );
    assert_eq!(report.unexpected, 0, "deliveries nobody sent: {report}");
    // Every message sent was answered; acked ones are a subset (a message whose ack was cut
    // off by the fault is resent under its id and answered once).
    assert_eq!(
        report.delivered, report.sent,
        "not every message was answered: {report}"
    );
    assert!(report.acked <= report.delivered, "{report}");
    assert!(report.not_running.is_empty(), "processes died: {report}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_a_gateway() -> anyhow::Result<()> {
    check(Scenario::Gateway).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_the_relay() -> anyhow::Result<()> {
    check(Scenario::Relay).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_the_ai_consumer() -> anyhow::Result<()> {
    check(Scenario::Consumer).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_redis() -> anyhow::Result<()> {
    check(Scenario::Redis).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_the_broker() -> anyhow::Result<()> {
    check(Scenario::Broker).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_the_broker_on_postgres_storage() -> anyhow::Result<()> {
    check(Scenario::BrokerPostgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_postgres_under_the_broker() -> anyhow::Result<()> {
    check(Scenario::Postgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_429_storm() -> anyhow::Result<()> {
    check(Scenario::Llm429Storm).await
}

/// Issue 11's restart, as an operator does it: kill -9, down 3 s, started again with the same
/// command and environment (so the same `KAFKA_GROUP_INSTANCE_ID`), under 30 msg/s, on the
/// durable broker. Every message is answered.
fn restart_under_30_per_second() -> ScenarioConfig {
    ScenarioConfig {
        users: 10,
        messages: 30,
        rate: 30.0,
        downtime: std::time::Duration::from_secs(3),
        ..ScenarioConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_the_ai_consumer_after_3_s_under_30_per_second() -> anyhow::Result<()> {
    check_with(Scenario::Consumer, &restart_under_30_per_second()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_the_relay_after_3_s_under_30_per_second() -> anyhow::Result<()> {
    check_with(Scenario::Relay, &restart_under_30_per_second()).await
}
