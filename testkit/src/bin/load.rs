//! `colloquy-load`: drive a running stack with simulated users on an open-loop schedule and
//! print latency percentiles (from each message's intended send time), a per-second timeline and
//! the delivery checker's verdict; or ramp the rate up to find the knee.
//!
//! ```sh
//! colloquy-load run --users 1000 --rate 1000 --duration-secs 20 --json run.json
//! colloquy-load ramp --users 1000 --rates 500,1000,1500,2000 --step-secs 15 --p99-ms 250
//! ```
//!
//! Exits 1 when anything acked was lost, duplicated or invented, or (`run`) left unanswered.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use colloquy_testkit::checker::Checker;
use colloquy_testkit::load::{self, LoadConfig, RampConfig};

#[derive(Debug, Parser)]
#[command(
    name = "colloquy-load",
    about = "Open-loop load generator and delivery checker for Colloquy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One run at a fixed offered rate.
    Run {
        #[command(flatten)]
        load: LoadConfig,
        /// Length of the schedule in seconds (sets messages per user from the rate).
        #[arg(long)]
        duration_secs: Option<f64>,
        /// Also write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The same load at rising rates until the answer p99 exceeds a bound.
    Ramp {
        #[command(flatten)]
        load: LoadConfig,
        /// Offered rates to try, comma separated, in order.
        #[arg(long, value_delimiter = ',', required = true)]
        rates: Vec<f64>,
        /// Length of each step's schedule, seconds.
        #[arg(long, default_value_t = 15.0)]
        step_secs: f64,
        /// The p99 answer latency (ms, from intended send) a step must stay under.
        #[arg(long, default_value_t = 250.0)]
        p99_ms: f64,
        /// Also write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn write_json(path: &Path, value: &serde_json::Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LOAD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run {
            mut load,
            duration_secs,
            json,
        } => {
            if let Some(secs) = duration_secs {
                load.messages = load.messages_for(secs);
            }
            eprintln!(
                "load: {} users × {} messages at {} msg/s (window {}, {:?} protocol) -> {}",
                load.users, load.messages, load.rate, load.window, load.protocol, load.ws
            );
            let report = load::run(load, Arc::new(Checker::default())).await;
            println!("{}", report.table());
            println!("{report}");
            if let Some(path) = json {
                write_json(&path, &report.to_json())?;
            }
            let c = &report.check;
            Ok(if c.is_clean() && c.unacked_undelivered == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Ramp {
            load,
            rates,
            step_secs,
            p99_ms,
            json,
        } => {
            let ramp = RampConfig {
                rates,
                step: Duration::from_secs_f64(step_secs),
                p99_bound_ms: p99_ms,
            };
            let report = load::ramp(&load, &ramp).await;
            println!("{}", report.table());
            if let Some(path) = json {
                write_json(&path, &report.to_json())?;
            }
            Ok(if report.steps.iter().all(|s| s.check.is_clean()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
