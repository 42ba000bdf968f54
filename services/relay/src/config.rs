//! Relay settings.

use std::net::SocketAddr;

use clap::Args;

/// Everything the relay itself needs.
#[derive(Clone, Debug, Args)]
pub struct RelayConfig {
    /// Address of the metrics and health endpoint.
    #[arg(long, env = "METRICS_LISTEN", default_value = "127.0.0.1:9102")]
    pub metrics_listen: SocketAddr,
    /// Kafka consumer group.
    #[arg(long, env = "CONSUMER_GROUP", default_value = "relay")]
    pub group: String,
    /// Most records written to Redis in one pipelined round trip.
    #[arg(long, env = "RELAY_BATCH_MAX", default_value_t = 512)]
    pub batch_max: usize,
    /// Approximate length cap of each user's inbox stream.
    #[arg(long, env = "INBOX_MAXLEN", default_value_t = 1_000)]
    pub inbox_maxlen: u64,
    /// Inbox lifetime after its last delivery, seconds.
    #[arg(long, env = "INBOX_TTL_SECS", default_value_t = 604_800)]
    pub inbox_ttl_secs: u64,
    /// How long a message's delivered marker (the relay's de-duplication) lives, seconds.
    #[arg(long, env = "DELIVERED_TTL_SECS", default_value_t = 86_400)]
    pub delivered_ttl_secs: u64,
    /// How long shutdown waits for the last batch, seconds.
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,
}

impl RelayConfig {
    /// Defaults for a test or local run.
    #[must_use]
    pub fn local() -> Self {
        Self {
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            group: "relay".into(),
            batch_max: 512,
            inbox_maxlen: 1_000,
            inbox_ttl_secs: 604_800,
            delivered_ttl_secs: 86_400,
            shutdown_grace_secs: 10,
        }
    }
}
