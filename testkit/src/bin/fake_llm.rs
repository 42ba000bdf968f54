//! `fake-llm`: the OpenAI-compatible fake chat completions server as a process.
//!
//! The local stack points `OPENAI_BASE_URL` at it when no API key is set, and chaos and load
//! runs start it with injected latency, token pacing, 429s and 5xx (see
//! [`colloquy_testkit::fake_llm::FakeLlmProcessConfig`] for the flags and their environment
//! variables).

use anyhow::Context as _;
use clap::Parser;
use colloquy_testkit::fake_llm::{FakeLlm, FakeLlmProcessConfig};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "fake-llm",
    version,
    about = "OpenAI-compatible fake chat completions server"
)]
struct Cli {
    #[command(flatten)]
    process: FakeLlmProcessConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let FakeLlmProcessConfig { listen, llm } = Cli::parse().process;
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let server = FakeLlm::start(llm.clone(), listen)
        .await
        .context("cannot start the fake LLM")?;
    tracing::info!(url = %server.base_url(), config = ?llm, "fake LLM listening");

    colloquy_core::shutdown::on_signal().cancelled().await;
    server.stop().await;
    Ok(())
}
