//! `colloquy-chaos`: runs chaos scenarios against real processes and prints one results-table
//! line per scenario. Exits 1 when any scenario lost, duplicated or invented a message (or could
//! not run to the end). Two more modes: `soak` (open-loop load for a long while with faults on a
//! schedule) and `bench` (the benchmark matrix; `scripts/bench.sh` drives it).
//!
//! ```sh
//! cargo build --release --bins && cargo run --release -p colloquy-chaos -- all
//! target/release/colloquy-chaos soak --rate 1500 --duration-secs 140
//! target/release/colloquy-chaos bench --short
//! ```

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use colloquy_chaos::bench::{self, BenchConfig};
use colloquy_chaos::{ScenarioConfig, ScenarioReport, SoakConfig, Storage, scenarios, soak};

/// What to run: one scenario, or all of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Selection {
    All,
    Gateway,
    Relay,
    Consumer,
    Redis,
    Broker,
    #[value(name = "llm-429-storm")]
    Llm429Storm,
}

impl Selection {
    fn scenarios(self) -> Vec<scenarios::Scenario> {
        use scenarios::Scenario as S;
        match self {
            Self::All => S::ALL.to_vec(),
            Self::Gateway => vec![S::Gateway],
            Self::Relay => vec![S::Relay],
            Self::Consumer => vec![S::Consumer],
            Self::Redis => vec![S::Redis],
            Self::Broker => vec![S::Broker],
            Self::Llm429Storm => vec![S::Llm429Storm],
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "colloquy-chaos",
    version,
    about = "Kill -9 and restart each Colloquy component under load; prove nothing acked is lost",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    mode: Option<Mode>,
    /// Scenarios to run, in order.
    #[arg(value_enum, default_value = "all")]
    scenarios: Vec<Selection>,
    /// Simulated users.
    #[arg(long, default_value_t = 20)]
    users: usize,
    /// Messages per user.
    #[arg(long, default_value_t = 30)]
    messages: usize,
    /// Messages each user keeps outstanding.
    #[arg(long, default_value_t = 2)]
    window: usize,
    /// Offered rate over all users, messages per second.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// How long the killed component stays down, milliseconds.
    #[arg(long, default_value_t = 1500)]
    downtime_ms: u64,
    /// The load gives up waiting for answers after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Connect clients straight to both gateways instead of through nginx.
    #[arg(long)]
    no_nginx: bool,
    /// Keep every stack's directory (logs, data), not only those of failed scenarios.
    #[arg(long)]
    keep_logs: bool,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Open-loop load at a fixed rate for a long while through nginx, with kill -9 and restart
    /// of the relay, the ai-consumer, a gateway, Redis (and with sqlite storage the broker) on
    /// a schedule; a table per 10 s and the verdict.
    Soak {
        /// Offered rate over all users, messages per second.
        #[arg(long, default_value_t = 1_000.0)]
        rate: f64,
        /// Length of the schedule, seconds.
        #[arg(long, default_value_t = 25)]
        duration_secs: u64,
        #[arg(long, default_value_t = 1_000)]
        users: usize,
        #[arg(long, value_enum, default_value_t = Storage::Memory)]
        storage: Storage,
        /// How long each killed component stays down, milliseconds.
        #[arg(long, default_value_t = 1500)]
        downtime_ms: u64,
        /// After the schedule, wait this long for the last answers, seconds.
        #[arg(long, default_value_t = 90)]
        drain_secs: u64,
        /// Keep the stack's directory (logs, data) even when the soak passed.
        #[arg(long)]
        keep_logs: bool,
    },
    /// The benchmark matrix: offered rate × fake-LLM latency × MAX_IN_FLIGHT, with latency
    /// percentiles and CPU per process; Markdown on stdout.
    Bench {
        /// The CI form (about two minutes) instead of the full matrix.
        #[arg(long)]
        short: bool,
        #[arg(long, value_enum, default_value_t = Storage::Memory)]
        storage: Storage,
        /// The consumers' fetch wait, milliseconds (default: the services' 500 ms).
        #[arg(long)]
        fetch_wait_ms: Option<u64>,
        /// Also write every run as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("CHAOS_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.mode {
        Some(mode) => match run_mode(mode).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        None => run_scenarios(&cli).await,
    }
}

async fn run_mode(mode: Mode) -> anyhow::Result<ExitCode> {
    match mode {
        Mode::Soak {
            rate,
            duration_secs,
            users,
            storage,
            downtime_ms,
            drain_secs,
            keep_logs,
        } => {
            let cfg = SoakConfig {
                rate,
                duration: Duration::from_secs(duration_secs),
                users,
                storage,
                downtime: Duration::from_millis(downtime_ms),
                drain: Duration::from_secs(drain_secs),
                keep_logs,
                ..SoakConfig::default()
            };
            let report = soak::run(&cfg).await?;
            println!("{}", report.table());
            eprintln!("{}", report.load);
            Ok(if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Mode::Bench {
            short,
            storage,
            fetch_wait_ms,
            json,
        } => {
            let mut cfg = if short {
                BenchConfig::short(storage)
            } else {
                BenchConfig::full(storage)
            };
            cfg.fetch_wait_ms = fetch_wait_ms;
            let rows = bench::run(&cfg).await?;
            println!("{}", bench::markdown(&rows));
            if let Some(path) = json {
                let value: Vec<serde_json::Value> =
                    rows.iter().map(bench::BenchRow::to_json).collect();
                std::fs::write(&path, serde_json::to_string_pretty(&value)?)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            Ok(if rows.iter().all(|r| r.load.check.is_clean()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

async fn run_scenarios(cli: &Cli) -> ExitCode {
    let cfg = ScenarioConfig {
        users: cli.users,
        messages: cli.messages,
        window: cli.window,
        rate: cli.rate,
        timeout: Duration::from_secs(cli.timeout_secs),
        downtime: Duration::from_millis(cli.downtime_ms),
        nginx: !cli.no_nginx,
        keep_logs: cli.keep_logs,
        ..ScenarioConfig::default()
    };
    let mut selected: Vec<scenarios::Scenario> =
        cli.scenarios.iter().flat_map(|s| s.scenarios()).collect();
    selected.dedup();

    println!("{}", ScenarioReport::table_header());
    let mut failed = false;
    for scenario in selected {
        let row = match scenarios::run(scenario, &cfg).await {
            Ok(report) => {
                eprintln!("{report}");
                failed |= !report.is_clean();
                report.table_row()
            }
            Err(e) => {
                eprintln!("{}: could not run: {e:#}", scenario.name());
                failed = true;
                format!(
                    "| {} | | | | | | | | | | | | | ERROR: {e} |",
                    scenario.name()
                )
            }
        };
        // One line per scenario, as soon as it is known.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{row}");
        let _ = out.flush();
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
