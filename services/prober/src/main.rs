//! The prober binary: parse configuration, start telemetry, probe until SIGINT/SIGTERM.

use anyhow::Context;
use clap::Parser;

use colloquy_core::config::TelemetryConfig;
use colloquy_prober::{Application, ProberConfig, Settings};

#[derive(Debug, Parser)]
#[command(
    name = "colloquy-prober",
    version,
    about = "Colloquy synthetic prober: one message through the edge, timed"
)]
struct Cli {
    #[command(flatten)]
    prober: ProberConfig,
    #[command(flatten)]
    telemetry: TelemetryConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry =
        colloquy_core::telemetry::init(colloquy_prober::events::SERVICE, &cli.telemetry)
            .context("telemetry")?;
    let shutdown = colloquy_core::shutdown::on_signal();
    let app = Application::build(Settings { prober: cli.prober }).await?;
    app.run_until_stopped(shutdown).await
}
