//! `fake-llm`: the OpenAI-compatible fake chat completions server as a process.
//!
//! The local stack points `OPENAI_BASE_URL` at it when no API key is set, and chaos and load
//! runs start it with injected latency, token pacing, 429s and 5xx (see
//! [`colloquy_testkit::fake_llm::FakeLlmConfig`] for the flags and their environment variables).

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Parser;
use colloquy_testkit::fake_llm::{FakeLlm, FakeLlmConfig};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "fake-llm",
    version,
    about = "OpenAI-compatible fake chat completions server"
)]
struct Cli {
    /// Address to listen on.
    #[arg(long, env = "FAKE_LLM_LISTEN", default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    #[command(flatten)]
    llm: FakeLlmConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let llm = FakeLlm::start(cli.llm.clone(), cli.listen)
        .await
        .context("cannot start the fake LLM")?;
    tracing::info!(url = %llm.base_url(), config = ?cli.llm, "fake LLM listening");

    colloquy_core::shutdown::on_signal().cancelled().await;
    llm.stop().await;
    Ok(())
}
