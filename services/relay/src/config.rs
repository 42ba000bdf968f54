//! Relay settings.

use std::net::SocketAddr;

use clap::Args;
use colloquy_core::config::{Secrets, ToEnv};

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

impl ToEnv for RelayConfig {
    fn flag_values(&self, _: Secrets) -> Vec<(&'static str, Option<String>)> {
        let Self {
            metrics_listen,
            group,
            batch_max,
            inbox_maxlen,
            inbox_ttl_secs,
            delivered_ttl_secs,
            audit_interval_secs,
            shutdown_grace_secs,
        } = self;
        vec![
            ("metrics_listen", Some(metrics_listen.to_string())),
            ("group", Some(group.clone())),
            ("batch_max", Some(batch_max.to_string())),
            ("inbox_maxlen", Some(inbox_maxlen.to_string())),
            ("inbox_ttl_secs", Some(inbox_ttl_secs.to_string())),
            ("delivered_ttl_secs", Some(delivered_ttl_secs.to_string())),
            ("audit_interval_secs", Some(audit_interval_secs.to_string())),
            ("shutdown_grace_secs", Some(shutdown_grace_secs.to_string())),
        ]
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

    #[test]
    fn a_relay_config_round_trips_through_its_environment() {
        colloquy_core::config::assert_round_trip(&super::RelayConfig {
            metrics_listen: "127.0.0.1:4321".parse().unwrap(),
            group: "g".into(),
            batch_max: 1,
            inbox_maxlen: 2,
            inbox_ttl_secs: 3,
            delivered_ttl_secs: 4,
            audit_interval_secs: 6,
            shutdown_grace_secs: 7,
        });
    }
}
