//! The ai-consumer binary: parse configuration, start telemetry, consume until SIGINT/SIGTERM.

use anyhow::Context;
use clap::Parser;

use colloquy_ai_consumer::config::ConsumerConfig;
use colloquy_ai_consumer::{Application, Settings};
use colloquy_core::config::{KafkaConfig, RedisConfig, TelemetryConfig};
use colloquy_core::names::Names;

#[derive(Debug, Parser)]
#[command(name = "colloquy-ai-consumer", version, about = "Colloquy AI consumer")]
struct Cli {
    #[command(flatten)]
    consumer: ConsumerConfig,
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
        colloquy_core::telemetry::init(colloquy_ai_consumer::events::SERVICE, &cli.telemetry)
            .context("telemetry")?;
    let shutdown = colloquy_core::shutdown::on_signal();
    let app = Application::build(Settings {
        consumer: cli.consumer,
        kafka: cli.kafka,
        redis: cli.redis,
        names: cli.names,
    })
    .await?;
    app.run_until_stopped(shutdown).await
}
