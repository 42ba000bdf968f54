//! The benchmark: a matrix of open-loop runs against a real stack (fake-LLM latency ×
//! `MAX_IN_FLIGHT` × offered rate), each with its latency percentiles (from the intended send
//! time), the rate sustained while sending, and each process's CPU while sending; written as
//! Markdown (a table and a text plot of p99 against offered load) for `docs/performance.md`.
//!
//! One stack per (LLM latency, `MAX_IN_FLIGHT`) pair, since both are process settings; the rates
//! of a pair run one after the other on the same stack, with fresh users each time. A pair stops
//! at the first rate it cannot sustain (answered < 90 % of offered while sending): higher rates
//! would only queue longer.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use colloquy_testkit::checker::Checker;
use colloquy_testkit::load::{self, LoadConfig, LoadReport, Protocol, fmt_ms};

use crate::cpu;
use crate::stack::{Component, Stack, StackOptions, Storage};

/// One stack configuration and the rates it is offered.
#[derive(Clone, Debug)]
pub struct BenchCase {
    /// The fake LLM's time to the first token (its 8 tokens follow at once).
    pub llm_latency_ms: u64,
    /// The ai-consumer's `MAX_IN_FLIGHT`.
    pub max_in_flight: usize,
    /// Offered rates, rising.
    pub rates: Vec<f64>,
    /// After the rates, one burst: every message of this many users at once.
    pub burst: Option<Burst>,
}

/// `users` users sending `messages` each at the same instant (a class starting at once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Burst {
    pub users: usize,
    pub messages: usize,
}

/// The burst of issue 13: 200 users × 10 messages at once.
pub const CLASS_BURST: Burst = Burst {
    users: 200,
    messages: 10,
};

impl BenchCase {
    /// The LLM-bound ceiling, `MAX_IN_FLIGHT / latency` (none at 0 ms).
    #[must_use]
    pub fn llm_bound(&self) -> Option<f64> {
        (self.llm_latency_ms > 0)
            .then(|| self.max_in_flight as f64 * 1_000.0 / self.llm_latency_ms as f64)
    }

    /// The ceiling of a burst: a user's messages are answered one after another (DESIGN:
    /// per-user order), so at most `min(MAX_IN_FLIGHT, users)` calls run at once.
    #[must_use]
    pub fn burst_bound(&self, burst: Burst) -> Option<f64> {
        (self.llm_latency_ms > 0).then(|| {
            self.max_in_flight.min(burst.users) as f64 * 1_000.0 / self.llm_latency_ms as f64
        })
    }
}

/// The matrix.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub storage: Storage,
    /// The consumers' fetch wait (`StackOptions::fetch_wait_ms`).
    pub fetch_wait_ms: Option<u64>,
    /// Simulated users of every run.
    pub users: usize,
    /// Length of each run's schedule.
    pub step: Duration,
    pub cases: Vec<BenchCase>,
}

impl BenchConfig {
    /// A couple of minutes: three rates at 0 ms, one LLM-bound run.
    #[must_use]
    pub fn short(storage: Storage) -> Self {
        Self {
            storage,
            fetch_wait_ms: None,
            users: 500,
            step: Duration::from_secs(8),
            cases: vec![
                BenchCase {
                    llm_latency_ms: 0,
                    max_in_flight: 50,
                    rates: vec![250.0, 500.0, 1_000.0],
                    burst: None,
                },
                BenchCase {
                    llm_latency_ms: 500,
                    max_in_flight: 50,
                    rates: vec![120.0],
                    burst: Some(CLASS_BURST),
                },
            ],
        }
    }

    /// The full matrix (about ten minutes on two cores).
    #[must_use]
    pub fn full(storage: Storage) -> Self {
        Self {
            storage,
            fetch_wait_ms: None,
            users: 1_000,
            step: Duration::from_secs(15),
            cases: vec![
                BenchCase {
                    llm_latency_ms: 0,
                    max_in_flight: 50,
                    rates: vec![250.0, 500.0, 1_000.0, 1_500.0, 2_000.0, 3_000.0, 4_000.0],
                    burst: None,
                },
                BenchCase {
                    llm_latency_ms: 500,
                    max_in_flight: 50,
                    rates: vec![50.0, 90.0, 150.0],
                    burst: Some(CLASS_BURST),
                },
                BenchCase {
                    llm_latency_ms: 500,
                    max_in_flight: 500,
                    rates: vec![500.0, 900.0, 1_500.0],
                    burst: Some(CLASS_BURST),
                },
                BenchCase {
                    llm_latency_ms: 500,
                    max_in_flight: 2_000,
                    rates: vec![1_000.0, 2_000.0, 3_600.0],
                    burst: Some(CLASS_BURST),
                },
            ],
        }
    }
}

/// The processes whose CPU is reported, in table order.
const MEASURED: [Component; 9] = [
    Component::Database,
    Component::Broker,
    Component::Redis,
    Component::Gateway(0),
    Component::Gateway(1),
    Component::Consumer,
    Component::Relay,
    Component::Nginx,
    Component::FakeLlm,
];

/// One run of the matrix.
#[derive(Clone, Debug)]
pub struct BenchRow {
    pub storage: Storage,
    pub llm_latency_ms: u64,
    pub max_in_flight: usize,
    pub llm_bound: Option<f64>,
    /// This run was a burst, not a schedule at a rate: its figure is the answers over the time
    /// to the last one, against [`BenchCase::burst_bound`] (in `llm_bound`).
    pub burst: Option<Burst>,
    pub load: LoadReport,
    /// Cores used while sending, per process of `MEASURED` (absent: not running) and, last,
    /// this process (the load generator).
    pub cpu: Vec<(String, Option<f64>)>,
}

impl BenchRow {
    fn stack_cores(&self) -> f64 {
        self.cpu
            .iter()
            .filter(|(name, _)| name != "load generator")
            .filter_map(|(_, c)| *c)
            .sum()
    }

    /// CPU-µs the stack spent per message answered while sending.
    fn cpu_us_per_message(&self) -> Option<f64> {
        let rate = self.answered_rate();
        (rate > 0.0).then(|| self.stack_cores() * 1e6 / rate)
    }

    fn saturated(&self) -> bool {
        self.load.sustained < 0.9 * self.load.offered_rate
    }

    /// Answers per second: while sending for a schedule; to the last answer for a burst.
    fn answered_rate(&self) -> f64 {
        if self.burst.is_some() {
            self.load.throughput
        } else {
            self.load.sustained
        }
    }

    #[must_use]
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "storage": self.storage.to_string(),
            "llm_latency_ms": self.llm_latency_ms,
            "max_in_flight": self.max_in_flight,
            "llm_bound": self.llm_bound,
            "burst": self.burst.map(|b| serde_json::json!({"users": b.users, "messages": b.messages})),
            "cpu_cores": self.cpu.iter().map(|(n, c)| (n.clone(), *c)).collect::<HashMap<_, _>>(),
            "cpu_us_per_message": self.cpu_us_per_message(),
            "load": self.load.to_json(),
        })
    }
}

/// Runs the matrix; prints each row on stderr as it ends.
///
/// # Errors
/// When a stack cannot start.
pub async fn run(cfg: &BenchConfig) -> anyhow::Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    for case in &cfg.cases {
        let mut opts = StackOptions {
            name: format!("bench-{}ms-{}", case.llm_latency_ms, case.max_in_flight),
            storage: cfg.storage,
            fetch_wait_ms: cfg.fetch_wait_ms,
            // Every simulated user comes from 127.0.0.1.
            edge: crate::nginx::EdgeLimits::load_test(),
            ..StackOptions::default()
        };
        opts.fake_llm.latency_ms = case.llm_latency_ms;
        opts.fake_llm.token_rate = 0.0;
        opts.consumer.max_in_flight = case.max_in_flight;
        let stack = Stack::launch(opts).await.context("bench stack")?;
        for &rate in &case.rates {
            let row = step(cfg, case, &stack, Step::Rate(rate)).await;
            eprintln!("{}", markdown_row(&row));
            let saturated = row.saturated();
            rows.push(row);
            if saturated {
                break;
            }
        }
        if let Some(burst) = case.burst {
            let row = step(cfg, case, &stack, Step::Burst(burst)).await;
            eprintln!("{}", markdown_row(&row));
            rows.push(row);
        }
    }
    Ok(rows)
}

/// What one run offers.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// The matrix's users at this rate for the configured step.
    Rate(f64),
    Burst(Burst),
}

/// The schedule of a burst: every message due within this rate's first instants (100 µs
/// apart at most: the generator's sockets write them as fast as they can).
const BURST_RATE: f64 = 10_000.0;

async fn step(cfg: &BenchConfig, case: &BenchCase, stack: &Stack, what: Step) -> BenchRow {
    let (users, rate, prefix) = match what {
        Step::Rate(rate) => (cfg.users, rate, format!("bench-{rate:.0}")),
        Step::Burst(b) => (
            b.users,
            BURST_RATE,
            format!("burst-{}x{}", b.users, b.messages),
        ),
    };
    let mut load_cfg = LoadConfig {
        http: stack.http_base(),
        ws: stack.ws_bases(),
        users,
        messages: 1,
        window: 0,
        rate,
        protocol: Protocol::Full,
        timeout_secs: 120,
        user_prefix: prefix,
        admin_token: None,
    };
    load_cfg.messages = match what {
        Step::Rate(_) => load_cfg.messages_for(cfg.step.as_secs_f64()),
        Step::Burst(b) => b.messages,
    };
    // A burst's CPU is read until its last answer could be due, not over its instant schedule.
    let schedule = match what {
        Step::Rate(_) => load_cfg.schedule(),
        Step::Burst(b) => Duration::from_secs_f64(
            (case.llm_latency_ms.max(1) as f64 / 1_000.0) * b.messages as f64
                + load_cfg.schedule().as_secs_f64(),
        ),
    };
    let mut pids: Vec<(String, Option<u32>)> = MEASURED
        .iter()
        .map(|c| (c.to_string(), stack.pid(*c)))
        .collect();
    pids.push(("load generator".into(), Some(std::process::id())));
    let all: Vec<u32> = pids.iter().filter_map(|(_, p)| *p).collect();

    // CPU over the schedule: read at its start and at its end.
    let (start_tx, start_rx) = tokio::sync::oneshot::channel::<Instant>();
    let sampler = {
        let all = all.clone();
        tokio::spawn(async move {
            let t0 = start_rx.await.ok()?;
            tokio::time::sleep_until(t0.into()).await;
            let before = cpu::ticks(&all);
            let began = Instant::now();
            tokio::time::sleep(schedule).await;
            let after = cpu::ticks(&all);
            Some((before, after, began.elapsed().as_secs_f64()))
        })
    };
    let load = load::run_observed(load_cfg, Arc::new(Checker::default()), move |t0| {
        let _ = start_tx.send(t0);
    })
    .await;
    let sampled = sampler.await.ok().flatten();
    let cpu = pids
        .into_iter()
        .map(|(name, pid)| {
            let figure = pid.zip(sampled.as_ref()).and_then(|(pid, (b, a, secs))| {
                Some(cpu::cores(*b.get(&pid)?, *a.get(&pid)?, *secs))
            });
            (name, figure)
        })
        .collect();
    let (burst, llm_bound) = match what {
        Step::Rate(_) => (None, case.llm_bound()),
        Step::Burst(b) => (Some(b), case.burst_bound(b)),
    };
    BenchRow {
        storage: cfg.storage,
        llm_latency_ms: case.llm_latency_ms,
        max_in_flight: case.max_in_flight,
        llm_bound,
        burst,
        load,
        cpu,
    }
}

/// The table's header.
#[must_use]
pub fn markdown_header() -> String {
    let cpu: String = MEASURED.iter().map(|c| format!(" {c} |")).collect();
    let cpu_align: String = MEASURED.iter().map(|_| "---:|").collect();
    format!(
        "| storage | LLM | MAX_IN_FLIGHT | offered | answered/s while sending | lost | ack p99 | answer p50 | p90 | p99 | p99.9 | max |{cpu} load generator | stack cores | CPU-µs/msg |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|{cpu_align}---:|---:|---:|"
    )
}

/// One run's line of the table (CPU as % of one core).
#[must_use]
pub fn markdown_row(r: &BenchRow) -> String {
    let c = &r.load.check;
    let pct = |x: &Option<f64>| x.map_or_else(|| "–".to_owned(), |v| format!("{:.0} %", v * 100.0));
    let cpu: String = r
        .cpu
        .iter()
        .map(|(_, v)| format!(" {} |", pct(v)))
        .collect();
    let answered = r.answered_rate();
    let sustained = match r.llm_bound {
        Some(b) => format!(
            "{answered:.0} ({:.0} % of bound {b:.0})",
            100.0 * answered / b
        ),
        None => format!("{answered:.0}"),
    };
    let offered = match r.burst {
        Some(b) => format!("burst {}×{}", b.users, b.messages),
        None => format!("{:.0}/s", r.load.offered_rate),
    };
    format!(
        "| {} | {} ms | {} | {offered} | {} | {} | {} | {} | {} | {} | {} | {} |{cpu} {:.2} | {} |",
        r.storage,
        r.llm_latency_ms,
        r.max_in_flight,
        sustained,
        c.lost,
        fmt_ms(c.ack.p99_ms),
        fmt_ms(c.answer.p50_ms),
        fmt_ms(c.answer.p90_ms),
        fmt_ms(c.answer.p99_ms),
        fmt_ms(c.answer.p999_ms),
        fmt_ms(c.answer.max_ms),
        r.stack_cores(),
        r.cpu_us_per_message()
            .map_or_else(|| "–".to_owned(), |v| format!("{v:.0}"))
    )
}

/// p99 against offered load, one bar per run on a log scale from 1 ms to 100 s.
#[must_use]
pub fn text_plot(rows: &[BenchRow]) -> String {
    const WIDTH: f64 = 50.0;
    let mut out = String::from("answer p99 (log scale: 1 ms … 100 s)\n");
    for r in rows {
        let p99 = r.load.check.answer.p99_ms.max(1.0);
        let bar = ((p99.log10() / 5.0) * WIDTH).round().clamp(0.0, WIDTH) as usize;
        let offered = match r.burst {
            Some(b) => format!("{}×{}", b.users, b.messages),
            None => format!("{:.0}/s", r.load.offered_rate),
        };
        let _ = writeln!(
            out,
            "{:>3} ms LLM, MIF {:>4}, {offered:>7} |{:<50}| {}",
            r.llm_latency_ms,
            r.max_in_flight,
            "#".repeat(bar),
            fmt_ms(r.load.check.answer.p99_ms)
        );
    }
    out
}

/// The whole report: table and plot.
#[must_use]
pub fn markdown(rows: &[BenchRow]) -> String {
    let mut out = markdown_header();
    out.push('\n');
    for r in rows {
        out.push_str(&markdown_row(r));
        out.push('\n');
    }
    let _ = write!(out, "\n```text\n{}```\n", text_plot(rows));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_llm_bound_is_max_in_flight_over_latency() {
        let case = BenchCase {
            llm_latency_ms: 500,
            max_in_flight: 50,
            rates: vec![],
            burst: None,
        };
        assert_eq!(case.llm_bound(), Some(100.0));
        let instant = BenchCase {
            llm_latency_ms: 0,
            ..case
        };
        assert_eq!(instant.llm_bound(), None);
    }

    #[test]
    fn a_burst_is_bound_by_its_users_when_they_are_fewer_than_the_calls_allowed() {
        let case = BenchCase {
            llm_latency_ms: 500,
            max_in_flight: 2_000,
            rates: vec![],
            burst: Some(CLASS_BURST),
        };
        // 200 users, each answered in order: 200 calls at once, 400 answers/s.
        assert_eq!(case.burst_bound(CLASS_BURST), Some(400.0));
        let narrow = BenchCase {
            max_in_flight: 50,
            ..case
        };
        assert_eq!(narrow.burst_bound(CLASS_BURST), Some(100.0));
    }

    #[test]
    fn a_burst_row_reports_answers_to_the_last_one_and_names_its_shape() {
        let mut r = row(95.0);
        r.burst = Some(CLASS_BURST);
        r.load.throughput = 90.0;
        let line = markdown_row(&r);
        assert!(line.contains("burst 200×10"), "{line}");
        assert!(line.contains("90 (90 % of bound 100)"), "{line}");
    }

    fn row(sustained: f64) -> BenchRow {
        let mut cpu: Vec<(String, Option<f64>)> = MEASURED
            .iter()
            .map(|c| (c.to_string(), Some(0.25)))
            .collect();
        cpu[0].1 = None; // no postgres
        cpu[7].1 = None; // no nginx
        cpu.push(("load generator".into(), Some(0.5)));
        BenchRow {
            storage: Storage::Memory,
            llm_latency_ms: 500,
            max_in_flight: 50,
            llm_bound: Some(100.0),
            burst: None,
            load: LoadReport {
                offered_rate: 100.0,
                users: 10,
                protocol: Protocol::Full,
                elapsed: Duration::from_secs(11),
                schedule: Duration::from_secs(10),
                throughput: sustained,
                sustained,
                reconnects: 0,
                check: colloquy_testkit::checker::Report::default(),
                timeline: Vec::new(),
            },
            cpu,
        }
    }

    #[test]
    fn the_header_has_a_column_for_every_cell_of_a_row() {
        let header = markdown_header();
        let columns = header.lines().next().unwrap().matches('|').count();
        let aligns = header.lines().nth(1).unwrap().matches('|').count();
        assert_eq!(columns, aligns);
        assert_eq!(markdown_row(&row(95.0)).matches('|').count(), columns);
    }

    #[test]
    fn cpu_per_message_counts_the_stack_not_the_load_generator() {
        let r = row(95.0);
        // 7 processes at a quarter of a core each; postgres and nginx absent; the generator
        // excluded.
        assert!((r.stack_cores() - 1.75).abs() < 1e-9);
        assert!((r.cpu_us_per_message().unwrap() - 1.75e6 / 95.0).abs() < 1e-6);
        assert!(!r.saturated());
        assert!(row(80.0).saturated());
        assert!(markdown_row(&r).contains("95 (95 % of bound 100)"));
    }
}
