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
    /// How often the unanswered-message audit is read into its gauges, seconds.
    #[arg(long, env = "AUDIT_INTERVAL_SECS", default_value_t = 5)]
    pub audit_interval_secs: u64,
    /// How long shutdown waits for the batch in hand, seconds.
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,
}

impl RelayConfig {
    /// The defaults (one place: the clap attributes above) with the metrics endpoint on a
    /// free port, for a test or local run.
    #[must_use]
    pub fn local() -> Self {
        Self {
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..colloquy_core::config::defaults()
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn local_defaults_come_from_the_flags() {
        let c = super::RelayConfig::local();
        assert_eq!(c.group, "relay");
        assert_eq!(c.batch_max, 512);
        assert_eq!(c.metrics_listen.port(), 0);
    }
}
