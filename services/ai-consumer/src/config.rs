//! AI consumer settings: concurrency, the LLM endpoint, retries, streaming and memory.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use secrecy::SecretString;

use colloquy_core::backoff::Backoff;

/// The hard ceiling on attempts per LLM call (DESIGN: at most 7).
pub const MAX_ATTEMPTS_CEILING: u32 = 7;

/// Everything the ai-consumer itself needs.
#[derive(Clone, Debug, Args)]
pub struct ConsumerConfig {
    /// Address of the metrics and health endpoint.
    #[arg(long, env = "METRICS_LISTEN", default_value = "127.0.0.1:9101")]
    pub metrics_listen: SocketAddr,
    /// Kafka consumer group.
    #[arg(long, env = "CONSUMER_GROUP", default_value = "ai-consumer")]
    pub group: String,
    /// Messages answered at once across all partitions (the original's pool had 50 threads).
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = 50)]
    pub max_in_flight: usize,
    /// Messages read and waiting for their user's lane, across users, before the consumer
    /// pauses its partitions (it keeps polling, so the group does not evict it).
    #[arg(long, env = "MAX_QUEUED", default_value_t = 2_000)]
    pub max_queued: usize,
    /// Messages of one user waiting in their lane before the consumer pauses its partitions.
    #[arg(long, env = "MAX_QUEUED_PER_USER", default_value_t = 100)]
    pub max_queued_per_user: usize,
    /// OpenAI-compatible base URL (the fake LLM of the local stack by default).
    #[arg(
        long,
        env = "OPENAI_BASE_URL",
        default_value = "http://127.0.0.1:8090/v1"
    )]
    pub base_url: String,
    /// API key; when unset no Authorization header is sent (the fake LLM needs none).
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub api_key: Option<SecretString>,
    /// Model name.
    #[arg(long, env = "LLM_MODEL", default_value = "gpt-4o-mini")]
    pub model: String,
    /// System prompt sent first in every request.
    #[arg(
        long,
        env = "SYSTEM_PROMPT",
        default_value = "You are a helpful assistant."
    )]
    pub system_prompt: String,
    /// Stream the answer (deltas reach the user as they are generated).
    #[arg(long, env = "LLM_STREAM", default_value_t = true, action = clap::ArgAction::Set)]
    pub stream: bool,
    /// Per-attempt timeout, seconds.
    #[arg(long, env = "LLM_REQUEST_TIMEOUT_SECS", default_value_t = 60)]
    pub request_timeout_secs: u64,
    /// First backoff ceiling, ms (doubles per retry, full jitter).
    #[arg(long, env = "LLM_BACKOFF_BASE_MS", default_value_t = 500)]
    pub backoff_base_ms: u64,
    /// Largest backoff ceiling, ms.
    #[arg(long, env = "LLM_BACKOFF_CAP_MS", default_value_t = 20_000)]
    pub backoff_cap_ms: u64,
    /// Attempts per message in all (1 to 7).
    #[arg(long, env = "LLM_MAX_ATTEMPTS", default_value_t = 7)]
    pub max_attempts: u32,
    /// Send a delta after this many tokens...
    #[arg(long, env = "DELTA_BATCH_TOKENS", default_value_t = 8)]
    pub delta_batch_tokens: usize,
    /// ...or after this many ms, whichever comes first.
    #[arg(long, env = "DELTA_BATCH_MS", default_value_t = 50)]
    pub delta_batch_ms: u64,
    /// Turns of conversation memory sent with each request (one turn = question + answer).
    #[arg(long, env = "MEMORY_TURNS", default_value_t = 5)]
    pub memory_turns: usize,
    /// Lifetime of a user's memory after their last message, seconds.
    #[arg(long, env = "MEMORY_TTL_SECS", default_value_t = 86_400)]
    pub memory_ttl_secs: u64,
    /// Lease on a message while it is being answered, seconds (renewed every third of it
    /// while the call runs, so it outlives any attempt timeout and honoured `Retry-After`).
    #[arg(long, env = "CLAIM_LEASE_SECS", default_value_t = 90)]
    pub lease_secs: u64,
    /// How long an answered message stays marked done, seconds.
    #[arg(long, env = "DONE_TTL_SECS", default_value_t = 86_400)]
    pub done_ttl_secs: u64,
    /// How long shutdown waits for the producer to flush, seconds.
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,
}

impl ConsumerConfig {
    /// The defaults (one place: the clap attributes above) with the LLM at `base_url` and
    /// the metrics endpoint on a free port, for a test or local run.
    #[must_use]
    pub fn local(base_url: impl Into<String>) -> Self {
        Self {
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            base_url: base_url.into(),
            ..colloquy_core::config::defaults()
        }
    }

    #[must_use]
    pub fn backoff(&self) -> Backoff {
        Backoff {
            base: Duration::from_millis(self.backoff_base_ms.max(1)),
            cap: Duration::from_millis(self.backoff_cap_ms.max(self.backoff_base_ms).max(1)),
            max_attempts: self.max_attempts.clamp(1, MAX_ATTEMPTS_CEILING),
        }
    }

    #[must_use]
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs.max(1))
    }
}
