//! The chaos scenarios: each starts its own [`Stack`], runs a steady load of simulated users
//! (the testkit's load generator, full protocol: acks, resume from the last event id,
//! resending un-acked ids after a reconnect), and once a share of the answers has arrived kills
//! one component with SIGKILL, leaves it down for a moment and starts it again. The load then
//! runs to its end and the checker counts lost, duplicated and unexpected messages.
//!
//! The fault is triggered by progress (answers delivered), not by the clock, so it lands
//! mid-load however slow the machine is; nothing here asserts on time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::task::JoinHandle;

use colloquy_testkit::checker::Checker;
use colloquy_testkit::load::{self, LoadConfig, LoadReport, Protocol};

use crate::report::ScenarioReport;
use crate::stack::{Component, Stack, StackOptions, Storage};

/// One chaos scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Scenario {
    /// kill -9 one of the two gateways; its users reconnect to the other and resume.
    Gateway,
    /// kill -9 the relay (responses → Redis).
    Relay,
    /// kill -9 the ai-consumer mid-call.
    Consumer,
    /// kill -9 Redis (inbox streams, pub/sub, claims, rate limits).
    Redis,
    /// kill -9 the Kafka broker (tansu, sqlite storage).
    Broker,
    /// kill -9 the Kafka broker on its postgres storage (`scripts/stack.sh`'s default).
    #[value(name = "broker-postgres")]
    BrokerPostgres,
    /// kill -9 PostgreSQL under the broker: every acked record must have been committed.
    Postgres,
    /// No kill: the LLM answers half the calls with 429.
    #[value(name = "llm-429-storm")]
    Llm429Storm,
}

impl Scenario {
    /// Every scenario, in the order `all` runs them.
    pub const ALL: [Self; 8] = [
        Self::Gateway,
        Self::Relay,
        Self::Consumer,
        Self::Redis,
        Self::Broker,
        Self::BrokerPostgres,
        Self::Postgres,
        Self::Llm429Storm,
    ];

    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Gateway => "gateway",
            Self::Relay => "relay",
            Self::Consumer => "consumer",
            Self::Redis => "redis",
            Self::Broker => "broker",
            Self::BrokerPostgres => "broker-postgres",
            Self::Postgres => "postgres",
            Self::Llm429Storm => "llm-429-storm",
        }
    }

    /// The component killed, if any.
    #[must_use]
    pub fn target(self) -> Option<Component> {
        match self {
            Self::Gateway => Some(Component::Gateway(0)),
            Self::Relay => Some(Component::Relay),
            Self::Consumer => Some(Component::Consumer),
            Self::Redis => Some(Component::Redis),
            Self::Broker | Self::BrokerPostgres => Some(Component::Broker),
            Self::Postgres => Some(Component::Database),
            Self::Llm429Storm => None,
        }
    }

    fn stack_options(self) -> StackOptions {
        let mut opts = StackOptions {
            name: self.name().to_owned(),
            ..StackOptions::default()
        };
        if self == Self::Llm429Storm {
            // Retry-After 0: the consumer's own backoff (20..200 ms, full jitter) paces the
            // retries; honouring a longer Retry-After is the backoff's unit tests' business.
            opts.fake_llm.rate_limit_ratio = 0.5;
            opts.fake_llm.retry_after_secs = 0;
        }
        if matches!(self, Self::BrokerPostgres | Self::Postgres) {
            opts.storage = Storage::Postgres;
        }
        opts
    }
}

/// The load and the fault's shape.
#[derive(Clone, Debug)]
pub struct ScenarioConfig {
    pub users: usize,
    /// Messages per user.
    pub messages: usize,
    /// Messages each user keeps outstanding.
    pub window: usize,
    /// Offered rate, messages per second over all users.
    pub rate: f64,
    /// The load gives up waiting for answers after this long.
    pub timeout: Duration,
    /// Share of all messages answered before the fault is injected.
    pub fault_after: f64,
    /// How long the killed component stays down.
    pub downtime: Duration,
    /// The run is declared stalled (and stopped) when no answer arrives for this long while
    /// some are outstanding. Generous: recoveries take seconds (a consumer group rejoins, a
    /// lease of 5 s expires), a stall is a stall.
    pub stall: Duration,
    /// Put nginx in front of the gateways (when installed).
    pub nginx: bool,
    /// Keep the stack's directory (logs, data) even when the scenario passed.
    pub keep_logs: bool,
}

impl Default for ScenarioConfig {
    /// 20 users × 30 messages at 100 msg/s: about 6 s of sending, so the fault lands mid-load.
    fn default() -> Self {
        Self {
            users: 20,
            messages: 30,
            window: 2,
            rate: 100.0,
            timeout: Duration::from_secs(120),
            fault_after: 0.2,
            downtime: Duration::from_millis(1500),
            stall: Duration::from_secs(30),
            nginx: true,
            keep_logs: false,
        }
    }
}

/// Runs `scenario` on a fresh stack and reports what the checker found.
///
/// # Errors
/// When the stack cannot start or the killed component does not come back; the stack's
/// directory is then kept and named in the error.
pub async fn run(scenario: Scenario, cfg: &ScenarioConfig) -> anyhow::Result<ScenarioReport> {
    let mut opts = scenario.stack_options();
    opts.nginx = cfg.nginx;
    let mut stack = Stack::launch(opts)
        .await
        .with_context(|| format!("scenario {}", scenario.name()))?;
    let result = drive(scenario, cfg, &mut stack).await;
    match result {
        Ok(mut report) => {
            report.not_running = stack
                .not_running()
                .into_iter()
                .map(|(c, s)| format!("{c} not running ({s})"))
                .collect();
            if cfg.keep_logs || !report.is_clean() {
                report.logs = Some(stack.keep_dir());
            }
            Ok(report)
        }
        Err(e) => {
            let dir = stack.keep_dir();
            Err(e.context(format!(
                "scenario {} failed; logs in {}",
                scenario.name(),
                dir.display()
            )))
        }
    }
}

async fn drive(
    scenario: Scenario,
    cfg: &ScenarioConfig,
    stack: &mut Stack,
) -> anyhow::Result<ScenarioReport> {
    let checker = Arc::new(Checker::default());
    let load_cfg = LoadConfig {
        http: stack.http_base(),
        ws: stack.ws_bases(),
        users: cfg.users,
        messages: cfg.messages,
        window: cfg.window,
        rate: cfg.rate,
        protocol: Protocol::Full,
        timeout_secs: cfg.timeout.as_secs().max(1),
        user_prefix: format!("chaos-{}", scenario.name()),
        admin_token: None,
    };
    let via = if stack.has_nginx() {
        "clients via nginx"
    } else {
        "clients straight to both gateways"
    };
    tracing::info!(
        scenario = scenario.name(),
        users = cfg.users,
        messages = cfg.messages,
        rate = cfg.rate,
        via,
        "load starting"
    );
    let started = Instant::now();
    let mut load = tokio::spawn(load::run(load_cfg, Arc::clone(&checker)));

    let fault = match scenario.target() {
        Some(target) => {
            let total = (cfg.users * cfg.messages) as u64;
            let wanted = ((total as f64 * cfg.fault_after) as u64).max(1);
            let seen = progress(&checker, wanted, &load).await;
            let injected = inject(stack, target, cfg.downtime).await;
            if let Err(e) = injected {
                load.abort();
                return Err(e);
            }
            format!(
                "kill -9 {target} after {seen} answers, down {:.1} s; {via}",
                cfg.downtime.as_secs_f64()
            )
        }
        None => format!("fake LLM answers 50% of calls 429; {via}"),
    };

    // The load stops itself at its timeout; a stall (no answer for a long while although some
    // are outstanding) ends it sooner, since waiting longer cannot change the verdict.
    let watched = watch(&checker, &mut load, cfg).await;
    let report = match watched {
        Some(joined) => {
            let load_report: LoadReport = joined.context("the load task panicked")?;
            tracing::info!(scenario = scenario.name(), %load_report, "load finished");
            ScenarioReport::new(scenario.name(), fault, &load_report)
        }
        None => {
            load.abort();
            let check = checker.report();
            tracing::warn!(scenario = scenario.name(), %check, "load stalled; stopped");
            let mut r =
                ScenarioReport::from_check(scenario.name(), fault, &check, started.elapsed(), None);
            r.stalled = Some(cfg.stall);
            r
        }
    };
    Ok(report)
}

/// Waits for the load to end; `None` when it stalled: no new answer for `cfg.stall` while
/// some were still outstanding, or nothing at all past its timeout.
async fn watch(
    checker: &Checker,
    load: &mut JoinHandle<LoadReport>,
    cfg: &ScenarioConfig,
) -> Option<Result<LoadReport, tokio::task::JoinError>> {
    let hard_deadline = Instant::now() + cfg.timeout + Duration::from_secs(60);
    let mut last = checker.report().delivered;
    let mut last_change = Instant::now();
    loop {
        tokio::select! {
            joined = &mut *load => return Some(joined),
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let r = checker.report();
        if r.delivered != last {
            last = r.delivered;
            last_change = Instant::now();
        }
        let outstanding = r.sent > r.delivered;
        if (outstanding && last_change.elapsed() >= cfg.stall) || Instant::now() > hard_deadline {
            return None;
        }
    }
}

/// Waits until `wanted` answers were delivered (or the load ended, or a minute passed: the
/// fault is then injected anyway, and the report shows what happened). Returns the count seen.
async fn progress(checker: &Checker, wanted: u64, load: &JoinHandle<LoadReport>) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let delivered = checker.report().delivered;
        if delivered >= wanted || load.is_finished() || Instant::now() > deadline {
            return delivered;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// kill -9 `target`, leave it down for `downtime`, start it again and wait until it is ready.
///
/// # Errors
/// When it is not running, or does not come back.
pub async fn inject(
    stack: &mut Stack,
    target: Component,
    downtime: Duration,
) -> anyhow::Result<()> {
    stack.kill9(target).await?;
    tokio::time::sleep(downtime).await;
    stack.start(target)?;
    stack.wait_ready(target).await
}
