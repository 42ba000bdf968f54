//! AI consumer settings: concurrency, the LLM endpoint, retries, streaming and memory.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use secrecy::SecretString;

use colloquy_core::backoff::Backoff;
use colloquy_core::config::{Secrets, ToEnv};

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
    /// LLM calls in flight at once across all partitions (the original's pool had 50 threads),
    /// retries and their backoff included.
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = 50)]
    pub max_in_flight: usize,
    /// Messages being answered at once (claimed, waiting for or in an LLM call, or writing
    /// their answer), at least `MAX_IN_FLIGHT`. Writing an answer durably takes a broker round
    /// trip after the LLM call; those messages wait here rather than in an LLM slot.
    #[arg(long, env = "MAX_ACTIVE", default_value_t = 200)]
    pub max_active: usize,
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

impl ToEnv for ConsumerConfig {
    fn flag_values(&self, secrets: Secrets) -> Vec<(&'static str, Option<String>)> {
        let Self {
            metrics_listen,
            group,
            max_in_flight,
            max_active,
            max_queued,
            max_queued_per_user,
            base_url,
            api_key,
            model,
            system_prompt,
            stream,
            request_timeout_secs,
            backoff_base_ms,
            backoff_cap_ms,
            max_attempts,
            delta_batch_tokens,
            delta_batch_ms,
            memory_turns,
            memory_ttl_secs,
            lease_secs,
            done_ttl_secs,
            shutdown_grace_secs,
        } = self;
        vec![
            ("metrics_listen", Some(metrics_listen.to_string())),
            ("group", Some(group.clone())),
            ("max_in_flight", Some(max_in_flight.to_string())),
            ("max_active", Some(max_active.to_string())),
            ("max_queued", Some(max_queued.to_string())),
            ("max_queued_per_user", Some(max_queued_per_user.to_string())),
            ("base_url", Some(base_url.clone())),
            ("api_key", api_key.as_ref().and_then(|k| secrets.reveal(k))),
            ("model", Some(model.clone())),
            ("system_prompt", Some(system_prompt.clone())),
            ("stream", Some(stream.to_string())),
            (
                "request_timeout_secs",
                Some(request_timeout_secs.to_string()),
            ),
            ("backoff_base_ms", Some(backoff_base_ms.to_string())),
            ("backoff_cap_ms", Some(backoff_cap_ms.to_string())),
            ("max_attempts", Some(max_attempts.to_string())),
            ("delta_batch_tokens", Some(delta_batch_tokens.to_string())),
            ("delta_batch_ms", Some(delta_batch_ms.to_string())),
            ("memory_turns", Some(memory_turns.to_string())),
            ("memory_ttl_secs", Some(memory_ttl_secs.to_string())),
            ("lease_secs", Some(lease_secs.to_string())),
            ("done_ttl_secs", Some(done_ttl_secs.to_string())),
            ("shutdown_grace_secs", Some(shutdown_grace_secs.to_string())),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use colloquy_core::config::{assert_round_trip, render_env};

    #[test]
    fn local_defaults_come_from_the_flags() {
        let c = ConsumerConfig::local("http://llm/v1");
        assert_eq!(c.base_url, "http://llm/v1");
        assert_eq!(c.metrics_listen.port(), 0);
        assert_eq!(c.group, "ai-consumer");
        assert_eq!(c.max_in_flight, 50);
        assert_eq!(c.max_active, 200);
        assert!(c.stream);
        assert!(c.api_key.is_none());
    }

    #[test]
    fn a_consumer_config_round_trips_through_its_environment() {
        assert_round_trip(&ConsumerConfig {
            metrics_listen: "127.0.0.1:4321".parse().unwrap(),
            group: "g".into(),
            max_in_flight: 1,
            max_active: 4,
            max_queued: 2,
            max_queued_per_user: 3,
            base_url: "http://llm:1/v1".into(),
            api_key: Some(SecretString::from("sk-test")),
            model: "m".into(),
            system_prompt: "Be brief, and exact.".into(),
            stream: false,
            request_timeout_secs: 4,
            backoff_base_ms: 5,
            backoff_cap_ms: 6,
            max_attempts: 3,
            delta_batch_tokens: 7,
            delta_batch_ms: 8,
            memory_turns: 9,
            memory_ttl_secs: 10,
            lease_secs: 11,
            done_ttl_secs: 12,
            shutdown_grace_secs: 13,
        });
    }

    #[test]
    fn the_api_key_is_rendered_only_when_asked() {
        let mut c = ConsumerConfig::local("http://llm/v1");
        c.api_key = Some(SecretString::from("sk-test"));
        let omitted = render_env(&c, Secrets::Omit);
        assert!(
            !omitted.iter().any(|(k, _)| k == "OPENAI_API_KEY"),
            "{omitted:?}"
        );
        let included = render_env(&c, Secrets::Include);
        assert!(included.contains(&("OPENAI_API_KEY".into(), "sk-test".into())));
    }
}
