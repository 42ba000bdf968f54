//! The gateway binary: parse configuration, start telemetry, serve until SIGINT/SIGTERM.

use anyhow::Context;
use clap::Parser;

use colloquy_core::config::{KafkaConfig, RedisConfig, TelemetryConfig};
use colloquy_core::names::Names;
use colloquy_gateway::config::GatewayConfig;
use colloquy_gateway::{Application, Settings};

#[derive(Debug, Parser)]
#[command(
    name = "colloquy-gateway",
    version,
    about = "Colloquy WebSocket gateway"
)]
struct Cli {
    #[command(flatten)]
    gateway: GatewayConfig,
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
        colloquy_core::telemetry::init(colloquy_gateway::events::SERVICE, &cli.telemetry)
            .context("telemetry")?;
    let shutdown = colloquy_core::shutdown::on_signal();
    let app = Application::build(Settings {
        gateway: cli.gateway,
        kafka: cli.kafka,
        redis: cli.redis,
        names: cli.names,
    })
    .await?;
    app.run_until_stopped(shutdown).await
}
