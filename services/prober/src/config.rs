//! Prober settings: where the edge is, who probes, how often and how long it waits.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use secrecy::SecretString;

/// Everything the prober needs.
#[derive(Clone, Debug, Args)]
pub struct ProberConfig {
    /// Base URL of the public edge (nginx in front of the gateways); `/token` and `/ws` are
    /// reached under it, the WebSocket with `ws://` (or `wss://` for `https://`).
    #[arg(long, env = "PROBE_EDGE_URL", default_value = "http://127.0.0.1:8080")]
    pub edge_url: String,
    /// The probe user; its inbox holds only probe answers.
    #[arg(long, env = "PROBE_USERID", default_value = "colloquy-prober")]
    pub userid: String,
    /// Bearer token for `POST /token`, needed when the gateways are not in dev mode.
    #[arg(long, env = "AUTH_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<SecretString>,
    /// Seconds between the starts of two probes.
    #[arg(long, env = "PROBE_INTERVAL_SECS", default_value_t = 15)]
    pub interval_secs: u64,
    /// How long the token request, the upgrade and the wait for the `ack` may each take, ms.
    #[arg(long, env = "PROBE_ACK_TIMEOUT_MS", default_value_t = 5_000)]
    pub ack_timeout_ms: u64,
    /// Deadline for the answer, from the send, ms (the availability SLO's deadline).
    #[arg(long, env = "PROBE_ANSWER_TIMEOUT_MS", default_value_t = 30_000)]
    pub answer_timeout_ms: u64,
    /// What the probe user says.
    #[arg(
        long,
        env = "PROBE_MESSAGE",
        default_value = "synthetic probe: please answer briefly"
    )]
    pub message: String,
    /// Address of the metrics and health endpoint.
    #[arg(long, env = "METRICS_LISTEN", default_value = "127.0.0.1:9103")]
    pub metrics_listen: SocketAddr,
}

impl ProberConfig {
    /// The defaults (one place: the clap attributes above) against `edge_url`, metrics on any
    /// port, for a test or local run.
    #[must_use]
    pub fn local(edge_url: impl Into<String>) -> Self {
        Self {
            edge_url: edge_url.into(),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..colloquy_core::config::defaults()
        }
    }

    #[must_use]
    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.interval_secs.max(1))
    }

    #[must_use]
    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.ack_timeout_ms)
    }

    #[must_use]
    pub fn answer_timeout(&self) -> Duration {
        Duration::from_millis(self.answer_timeout_ms)
    }

    /// The edge's HTTP base, without a trailing slash.
    #[must_use]
    pub fn http_base(&self) -> &str {
        self.edge_url.trim_end_matches('/')
    }

    /// The edge's WebSocket base: `http` becomes `ws`, `https` becomes `wss`.
    #[must_use]
    pub fn ws_base(&self) -> String {
        let base = self.http_base();
        if let Some(rest) = base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if let Some(rest) = base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else {
            base.to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_base_follows_the_http_scheme() {
        assert_eq!(
            ProberConfig::local("http://127.0.0.1:8080/").ws_base(),
            "ws://127.0.0.1:8080"
        );
        assert_eq!(
            ProberConfig::local("https://chat.example").ws_base(),
            "wss://chat.example"
        );
    }

    #[test]
    fn local_defaults_come_from_the_flags() {
        let c = ProberConfig::local("http://edge");
        assert_eq!(c.userid, "colloquy-prober");
        assert_eq!(c.interval_secs, 15);
        assert_eq!(c.answer_timeout_ms, 30_000);
        assert_eq!(c.metrics_listen.port(), 0);
        assert!(c.admin_token.is_none());
    }
}
