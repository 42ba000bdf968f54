//! The soak: open-loop load at a fixed rate for a long while through nginx, with the
//! full-protocol checker, and faults on a schedule: kill -9 and restart of the relay, the
//! ai-consumer, one gateway and Redis, and with durable storage the broker too. A table per
//! 10 s shows what was offered, sent, acked and answered and which fault fell in it; the verdict
//! is the checker's (lost, duplicated per connection, unexpected) plus completeness.
//!
//! The faults are spread evenly over the schedule (fault `i` of `k` at `(i+1)/(k+1)` of it), so
//! every one lands under full load, and each is over (the process restarted and ready) before the
//! next. A broker kill is only scheduled with sqlite storage: tansu's memory engine forgets every
//! topic and offset when it stops, which would lose messages by construction.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use colloquy_core::config::TelemetryConfig;
use colloquy_testkit::checker::{Checker, Interval};
use colloquy_testkit::load::{self, LoadConfig, LoadReport, Protocol, fmt_ms};

use crate::scenarios::inject;
use crate::stack::{Component, Stack, StackOptions, Storage};

/// Width of a row of the soak's table.
pub const ROW: Duration = Duration::from_secs(10);

/// What to run.
#[derive(Clone, Debug)]
pub struct SoakConfig {
    /// Offered rate over all users, messages per second.
    pub rate: f64,
    /// Length of the schedule.
    pub duration: Duration,
    pub users: usize,
    pub storage: Storage,
    /// How long each killed component stays down.
    pub downtime: Duration,
    /// After the schedule, how long to wait for the last answers.
    pub drain: Duration,
    /// Put nginx in front of the gateways (when installed).
    pub nginx: bool,
    /// Keep the stack's directory even when the soak passed.
    pub keep_logs: bool,
    /// Logs and traces of the gateways, the ai-consumer and the relay.
    pub telemetry: TelemetryConfig,
}

impl Default for SoakConfig {
    /// The CI form: 25 s at 1,000 msg/s (25,000 messages) from 1,000 users, memory storage.
    fn default() -> Self {
        Self {
            rate: 1_000.0,
            duration: Duration::from_secs(25),
            users: 1_000,
            storage: Storage::Memory,
            downtime: Duration::from_millis(1_500),
            drain: Duration::from_secs(90),
            nginx: true,
            keep_logs: false,
            telemetry: TelemetryConfig::default(),
        }
    }
}

impl SoakConfig {
    /// The faults, in order: each of relay, ai-consumer, one gateway and Redis; the broker too
    /// when its storage survives the kill (sqlite, postgres), and PostgreSQL under it.
    #[must_use]
    pub fn faults(&self) -> Vec<Component> {
        let mut f = vec![
            Component::Relay,
            Component::Consumer,
            Component::Gateway(0),
            Component::Redis,
        ];
        if self.storage != Storage::Memory {
            f.push(Component::Broker);
        }
        if self.storage == Storage::Postgres {
            f.push(Component::Database);
        }
        f
    }

    /// When fault `i` of `count` is injected, from the schedule's start.
    fn fault_at(&self, i: usize, count: usize) -> Duration {
        self.duration.mul_f64((i + 1) as f64 / (count + 1) as f64)
    }
}

/// One fault as it happened.
#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    pub component: Component,
    /// When the kill was sent, seconds from the schedule's start.
    pub killed_s: f64,
    /// When the restarted process was ready again, seconds from the schedule's start.
    pub ready_s: f64,
}

/// What the soak found.
#[derive(Clone, Debug)]
pub struct SoakReport {
    pub rate: f64,
    pub storage: Storage,
    pub load: LoadReport,
    /// One row per [`ROW`] from the schedule's start.
    pub rows: Vec<Interval>,
    pub faults: Vec<Fault>,
    /// Processes not running at the end, with their status.
    pub not_running: Vec<String>,
    /// The stack's directory when it was kept (always when the soak failed).
    pub logs: Option<PathBuf>,
}

impl SoakReport {
    /// Every way the soak broke the delivery promise or failed to test it. Empty when clean.
    #[must_use]
    pub fn violations(&self) -> Vec<String> {
        let c = &self.load.check;
        let mut v = Vec::new();
        if c.lost > 0 {
            v.push(format!(
                "{} acked messages lost (e.g. {:?})",
                c.lost, c.lost_sample
            ));
        }
        if c.duplicated > 0 {
            v.push(format!(
                "{} messages delivered twice to one connection",
                c.duplicated
            ));
        }
        if c.unexpected > 0 {
            v.push(format!("{} unexpected deliveries", c.unexpected));
        }
        if c.acked == 0 {
            v.push("nothing was acked".into());
        }
        if c.delivered < c.sent {
            v.push(format!(
                "incomplete: {} of {} messages answered before the drain ended",
                c.delivered, c.sent
            ));
        }
        for p in &self.not_running {
            v.push(format!("{p} at the end"));
        }
        v
    }

    #[must_use]
    pub fn is_clean(&self) -> bool {
        self.violations().is_empty()
    }

    /// The table per 10 s, the latency summary and the verdict, as Markdown.
    #[must_use]
    pub fn table(&self) -> String {
        let mut out = String::from(
            "| t (s) | offered | sent | acked | answered | answer p99 | fault |\n|---:|---:|---:|---:|---:|---:|---|\n",
        );
        let width = ROW.as_secs_f64();
        for r in &self.rows {
            let faults: Vec<String> = self
                .faults
                .iter()
                .filter(|f| f.killed_s >= r.start_s && f.killed_s < r.start_s + width)
                .map(|f| {
                    format!(
                        "kill -9 {} at {:.1} s, ready at {:.1} s",
                        f.component, f.killed_s, f.ready_s
                    )
                })
                .collect();
            let _ = writeln!(
                out,
                "| {:.0} | {} | {} | {} | {} | {} | {} |",
                r.start_s,
                r.offered,
                r.sent,
                r.acked,
                r.answered,
                if r.answered > 0 {
                    fmt_ms(r.answer_p99_ms)
                } else {
                    "–".into()
                },
                faults.join("; ")
            );
        }
        let c = &self.load.check;
        let _ = writeln!(
            out,
            "\n| storage | offered | sent | acked | answered | llm_failed | lost | duplicated | unexpected | redelivered | reconnects | ack p99 | answer p50 | p99 | p99.9 | max | verdict |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        );
        let verdict = if self.is_clean() {
            "ok".to_owned()
        } else {
            format!("FAIL: {}", self.violations().join("; "))
        };
        let _ = writeln!(
            out,
            "| {} | {:.0}/s | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            self.storage,
            self.rate,
            c.sent,
            c.acked,
            c.delivered,
            c.llm_failed,
            c.lost,
            c.duplicated,
            c.unexpected,
            c.redelivered,
            self.load.reconnects,
            fmt_ms(c.ack.p99_ms),
            fmt_ms(c.answer.p50_ms),
            fmt_ms(c.answer.p99_ms),
            fmt_ms(c.answer.p999_ms),
            fmt_ms(c.answer.max_ms),
            verdict
        );
        if let Some(dir) = &self.logs {
            let _ = writeln!(out, "\nlogs: {}", dir.display());
        }
        out
    }
}

/// Runs a soak on a fresh stack.
///
/// # Errors
/// When the stack cannot start or a killed component does not come back; the stack's directory
/// is then kept and named in the error.
pub async fn run(cfg: &SoakConfig) -> anyhow::Result<SoakReport> {
    let mut opts = StackOptions {
        name: "soak".into(),
        storage: cfg.storage,
        nginx: cfg.nginx,
        // Every simulated user comes from 127.0.0.1.
        edge: crate::nginx::EdgeLimits::load_test(),
        telemetry: cfg.telemetry.clone(),
        ..StackOptions::default()
    };
    // A soak tests the pipeline at its rate, not the model: answers take 20 ms (about 30
    // calls in flight at 1,500 msg/s, so every kill of the ai-consumer finds some), and
    // 200 calls may run at once (the default 50 at ~100 ms caps the stack near 500 msg/s).
    opts.fake_llm.latency_ms = 20;
    opts.fake_llm.token_rate = 0.0;
    opts.consumer.max_in_flight = 200;
    let mut stack = Stack::launch(opts).await.context("soak stack")?;
    match drive(cfg, &mut stack).await {
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
            Err(e.context(format!("soak failed; logs in {}", dir.display())))
        }
    }
}

async fn drive(cfg: &SoakConfig, stack: &mut Stack) -> anyhow::Result<SoakReport> {
    let checker = Arc::new(Checker::default());
    let mut load_cfg = LoadConfig {
        http: stack.http_base(),
        ws: stack.ws_bases(),
        users: cfg.users,
        messages: 1,
        window: 0,
        rate: cfg.rate,
        protocol: Protocol::Full,
        timeout_secs: cfg.drain.as_secs().max(1),
        user_prefix: "soak".into(),
        admin_token: None,
    };
    load_cfg.messages = load_cfg.messages_for(cfg.duration.as_secs_f64());
    tracing::info!(
        rate = cfg.rate,
        users = cfg.users,
        messages = load_cfg.total(),
        storage = %cfg.storage,
        via = if stack.has_nginx() { "nginx" } else { "both gateways" },
        "soak starting"
    );
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let load = tokio::spawn(load::run_observed(
        load_cfg,
        Arc::clone(&checker),
        move |t0| {
            let _ = started_tx.send(t0);
        },
    ));
    let t0 = started_rx
        .await
        .context("the load ended before its schedule started")?;
    let progress = tokio::spawn(print_rows(Arc::clone(&checker), t0));

    let targets = cfg.faults();
    let mut faults = Vec::with_capacity(targets.len());
    for (i, target) in targets.iter().copied().enumerate() {
        let at = t0 + cfg.fault_at(i, targets.len());
        tokio::time::sleep_until(at.into()).await;
        let killed_s = t0.elapsed().as_secs_f64();
        if let Err(e) = inject(stack, target, cfg.downtime).await {
            progress.abort();
            load.abort();
            return Err(e);
        }
        let ready_s = t0.elapsed().as_secs_f64();
        tracing::info!(component = %target, killed_s, ready_s, "fault over");
        faults.push(Fault {
            component: target,
            killed_s,
            ready_s,
        });
    }
    let report = load.await.context("the load task panicked")?;
    progress.abort();
    Ok(SoakReport {
        rate: cfg.rate,
        storage: cfg.storage,
        rows: checker.timeline(t0, ROW),
        load: report,
        faults,
        not_running: Vec::new(),
        logs: None,
    })
}

/// Prints each row of the table as soon as its 10 s are over (on stderr, as progress).
async fn print_rows(checker: Arc<Checker>, t0: Instant) {
    let mut printed = 0;
    loop {
        tokio::time::sleep_until((t0 + ROW * (printed as u32 + 1)).into()).await;
        let rows = checker.timeline(t0, ROW);
        if let Some(r) = rows.get(printed) {
            eprintln!(
                "soak t={:>4.0}s offered={} sent={} acked={} answered={} answer_p99={}",
                r.start_s,
                r.offered,
                r.sent,
                r.acked,
                r.answered,
                fmt_ms(r.answer_p99_ms)
            );
        }
        printed += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_spread_over_the_schedule_and_the_broker_needs_durable_storage() {
        let memory = SoakConfig::default();
        assert!(!memory.faults().contains(&Component::Broker));
        let sqlite = SoakConfig {
            storage: Storage::Sqlite,
            ..SoakConfig::default()
        };
        let faults = sqlite.faults();
        assert_eq!(faults.len(), 5);
        assert_eq!(faults.last(), Some(&Component::Broker));
        let times: Vec<Duration> = (0..5).map(|i| sqlite.fault_at(i, 5)).collect();
        assert!(times.windows(2).all(|w| w[0] < w[1]));
        assert!(times[0] > Duration::ZERO && times[4] < sqlite.duration);
        let postgres = SoakConfig {
            storage: Storage::Postgres,
            ..SoakConfig::default()
        };
        assert_eq!(
            postgres.faults()[4..],
            [Component::Broker, Component::Database]
        );
    }
}
