//! Gateway settings: listen address, auth, rate limit and the limits on what a client controls.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use secrecy::SecretString;

/// Everything the gateway itself needs (Kafka, Redis and telemetry come from `colloquy-core`).
#[derive(Clone, Debug, Args)]
pub struct GatewayConfig {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "127.0.0.1:8001")]
    pub listen: SocketAddr,
    /// Name of this instance in logs and metrics.
    #[arg(long, env = "GATEWAY_INSTANCE_ID", default_value = "gateway")]
    pub instance_id: String,
    /// HS256 secret shared by all gateways. The default is for local development only.
    #[arg(
        long,
        env = "AUTH_SECRET",
        default_value = "colloquy-dev-secret-change-me",
        hide_env_values = true
    )]
    pub auth_secret: SecretString,
    /// Bearer token required by `POST /token`; issuing is open (dev mode) when unset.
    #[arg(long, env = "AUTH_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<SecretString>,
    /// Lifetime of issued tokens, seconds.
    #[arg(long, env = "AUTH_TOKEN_TTL_SECS", default_value_t = 86_400)]
    pub token_ttl_secs: u64,
    /// Messages a user may send per period (also the burst), like the original: 10 per 60 s.
    #[arg(long, env = "RATE_LIMIT_MESSAGES", default_value_t = 10)]
    pub rate_limit_messages: u32,
    /// Rate-limit period, seconds.
    #[arg(long, env = "RATE_LIMIT_PERIOD_SECS", default_value_t = 60)]
    pub rate_limit_period_secs: u64,
    /// Largest WebSocket frame or message accepted, bytes; larger closes with 1009.
    #[arg(long, env = "MAX_FRAME_BYTES", default_value_t = 65_536)]
    pub max_frame_bytes: usize,
    /// Largest message content, bytes; larger gets `too_large`.
    #[arg(long, env = "MAX_CONTENT_BYTES", default_value_t = 16_384)]
    pub max_content_bytes: usize,
    /// Sockets one user may hold open on this gateway.
    #[arg(long, env = "MAX_CONNECTIONS_PER_USER", default_value_t = 8)]
    pub max_connections_per_user: usize,
    /// Messages one socket may have waiting for their Kafka ack.
    #[arg(long, env = "MAX_IN_FLIGHT_PER_CONNECTION", default_value_t = 64)]
    pub max_in_flight_per_connection: usize,
    /// How long shutdown waits for in-flight produces, seconds.
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,
    /// Most deliveries sent in one replay from the inbox.
    #[arg(long, env = "REPLAY_LIMIT", default_value_t = 1_000)]
    pub replay_limit: u64,
}

impl GatewayConfig {
    /// Defaults for a test or local run on `listen`.
    #[must_use]
    pub fn local(listen: SocketAddr) -> Self {
        Self {
            listen,
            instance_id: "gateway".into(),
            auth_secret: SecretString::from("colloquy-dev-secret-change-me"),
            admin_token: None,
            token_ttl_secs: 86_400,
            rate_limit_messages: 10,
            rate_limit_period_secs: 60,
            max_frame_bytes: 65_536,
            max_content_bytes: 16_384,
            max_connections_per_user: 8,
            max_in_flight_per_connection: 64,
            shutdown_grace_secs: 10,
            replay_limit: 1_000,
        }
    }

    #[must_use]
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}
