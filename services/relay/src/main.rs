//! The relay binary: parse configuration, start telemetry, relay until SIGINT/SIGTERM.

use anyhow::Context;
use clap::Parser;

use colloquy_core::config::{KafkaConfig, RedisConfig, TelemetryConfig};
use colloquy_core::names::Names;
use colloquy_relay::config::RelayConfig;
use colloquy_relay::{Application, Settings};

#[derive(Debug, Parser)]
#[command(
    name = "colloquy-relay",
    version,
    about = "Colloquy relay: responses -> Redis"
)]
struct Cli {
    #[command(flatten)]
    relay: RelayConfig,
    #[command(flatten)]
    kafka: KafkaConfig,
    #[command(flatten)]
    redis: RedisConfig,
    #[command(flatten)]
    names: Names,
    #[command(flatten)]
    telemetry: TelemetryConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry =
        colloquy_core::telemetry::init(colloquy_relay::events::SERVICE, &cli.telemetry)
            .context("telemetry")?;
    let shutdown = colloquy_core::shutdown::on_signal();
    let app = Application::build(Settings {
        relay: cli.relay,
        kafka: cli.kafka,
        redis: cli.redis,
        names: cli.names,
    })
    .await?;
    app.run_until_stopped(shutdown).await
}
