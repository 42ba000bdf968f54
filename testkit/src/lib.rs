//! Colloquy's testkit.
//!
//! - [`infra`]: Kafka (tansu) and Redis for a test, as containers or local processes;
//! - [`process`]: child processes (tansu, Redis, the services) with their logs, kill and
//!   restart, and ports that stay free while one is down;
//! - [`harness`]: the whole stack in-process on port 0 (`TestApp::spawn()`);
//! - [`openai_mock`]: a wiremock OpenAI for exact call counting and injected failures;
//! - [`fake_llm`]: the OpenAI-compatible fake LLM server (also the `fake-llm` binary);
//! - [`client`]: a typed WebSocket client;
//! - [`checker`]: the delivery checker (lost, duplicated, unexpected);
//! - [`load`]: the load generator (also the `colloquy-load` binary);
//! - [`otlp`]: an in-process OTLP/HTTP trace receiver.

pub mod browser;
pub mod checker;
pub mod client;
pub mod fake_llm;
pub mod harness;
pub mod infra;
pub mod load;
pub mod openai_mock;
pub mod otlp;
pub mod postgres;
pub mod process;

pub use harness::{LlmChoice, TestApp};
