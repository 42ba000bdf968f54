//! `colloquy-chaos`: runs chaos scenarios against real processes and prints one results-table
//! line per scenario. Exits 1 when any scenario lost, duplicated or invented a message (or could
//! not run to the end).
//!
//! ```sh
//! cargo build --release --bins && cargo run --release -p colloquy-chaos -- all
//! ```

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use colloquy_chaos::{ScenarioConfig, ScenarioReport, scenarios};

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
    about = "Kill -9 and restart each Colloquy component under load; prove nothing acked is lost"
)]
struct Cli {
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

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("CHAOS_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
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
