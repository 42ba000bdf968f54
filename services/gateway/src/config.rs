//! Gateway settings: listen address, auth, rate limit and the limits on what a client controls.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use secrecy::{ExposeSecret, SecretString};

/// Everything the gateway itself needs (Kafka, Redis and telemetry come from `colloquy-core`).
#[derive(Clone, Debug, Args)]
pub struct GatewayConfig {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "127.0.0.1:8001")]
    pub listen: SocketAddr,
    /// Name of this instance in logs and metrics.
    #[arg(long, env = "GATEWAY_INSTANCE_ID", default_value = "gateway")]
    pub instance_id: String,
    /// Development mode: allows the built-in secret, an open `POST /token` and localhost origins.
    /// Never set it in production; `scripts/stack.sh` sets it and says so.
    #[arg(
        long = "dev",
        env = "COLLOQUY_DEV",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub dev: bool,
    /// HS256 secret shared by all gateways, at least 32 bytes. The default only works in dev mode.
    #[arg(
        long,
        env = "AUTH_SECRET",
        default_value = BUILT_IN_SECRET,
        hide_env_values = true
    )]
    pub auth_secret: SecretString,
    /// Bearer token required by `POST /token`; required outside dev mode (where issuing is
    /// open when it is unset).
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
    /// Most deliveries read in one page of a replay from the inbox.
    #[arg(long, env = "REPLAY_LIMIT", default_value_t = 1_000)]
    pub replay_limit: u64,
    /// Inbox reads (replays) running at once on this gateway; more wait for a slot.
    #[arg(long, env = "MAX_CONCURRENT_REPLAYS", default_value_t = 32)]
    pub max_concurrent_replays: usize,
    /// `resume` frames one socket may send in a burst.
    #[arg(long, env = "RESUME_BURST", default_value_t = 5)]
    pub resume_burst: u32,
    /// One more `resume` is allowed per socket every this many milliseconds.
    #[arg(long, env = "RESUME_REFILL_MS", default_value_t = 1_000)]
    pub resume_refill_ms: u64,
    /// A WebSocket ping goes to each socket this often, seconds.
    #[arg(long, env = "WS_PING_INTERVAL_SECS", default_value_t = 20)]
    pub ping_interval_secs: u64,
    /// A socket that sent nothing (pongs included) for this long is closed, seconds.
    #[arg(long, env = "WS_IDLE_TIMEOUT_SECS", default_value_t = 50)]
    pub idle_timeout_secs: u64,
    /// Browser origins allowed on `/ws` (comma separated, e.g. `https://chat.example.com`).
    /// Requests without an `Origin` header (non-browser clients) and same-origin requests are
    /// always allowed; localhost origins too in dev mode.
    #[arg(long, env = "ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
}

/// The secret every gateway starts with unless told otherwise: refused outside dev mode.
pub const BUILT_IN_SECRET: &str = "colloquy-dev-secret-change-me";
/// Shortest `AUTH_SECRET` accepted outside dev mode, bytes.
pub const MIN_SECRET_BYTES: usize = 32;

/// A configuration the gateway refuses to start with.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "AUTH_SECRET is the built-in development secret: set AUTH_SECRET to a random string of at \
         least {MIN_SECRET_BYTES} bytes (or run in dev mode with COLLOQUY_DEV=1 / --dev)"
    )]
    BuiltInSecret,
    #[error(
        "AUTH_SECRET is {0} bytes: it must be at least {MIN_SECRET_BYTES} bytes (or run in dev \
         mode with COLLOQUY_DEV=1 / --dev)"
    )]
    ShortSecret(usize),
    #[error(
        "AUTH_ADMIN_TOKEN is not set, so anyone could mint tokens with POST /token: set it \
         (or run in dev mode with COLLOQUY_DEV=1 / --dev)"
    )]
    OpenTokenEndpoint,
}

impl GatewayConfig {
    /// Defaults for a test or local run on `listen`.
    #[must_use]
    pub fn local(listen: SocketAddr) -> Self {
        Self {
            listen,
            instance_id: "gateway".into(),
            dev: true,
            auth_secret: SecretString::from(BUILT_IN_SECRET),
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
            max_concurrent_replays: 32,
            resume_burst: 5,
            resume_refill_ms: 1_000,
            ping_interval_secs: 20,
            idle_timeout_secs: 50,
            allowed_origins: Vec::new(),
        }
    }

    /// Refuses insecure settings outside dev mode: the built-in or a short `AUTH_SECRET`, and
    /// an open `POST /token`.
    ///
    /// # Errors
    /// The first [`ConfigError`] found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.dev {
            return Ok(());
        }
        let secret = self.auth_secret.expose_secret();
        if secret == BUILT_IN_SECRET {
            return Err(ConfigError::BuiltInSecret);
        }
        if secret.len() < MIN_SECRET_BYTES {
            return Err(ConfigError::ShortSecret(secret.len()));
        }
        if self
            .admin_token
            .as_ref()
            .is_none_or(|t| t.expose_secret().is_empty())
        {
            return Err(ConfigError::OpenTokenEndpoint);
        }
        Ok(())
    }

    #[must_use]
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        gateway: GatewayConfig,
    }

    fn parse(args: &[&str]) -> GatewayConfig {
        let mut argv = vec!["gateway"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).expect("valid arguments").gateway
    }

    const GOOD_SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn defaults_are_refused_outside_dev_mode() {
        let cfg = parse(&[]);
        assert!(!cfg.dev, "dev mode must be explicit");
        let err = cfg.validate().unwrap_err();
        assert_eq!(err, ConfigError::BuiltInSecret);
        assert!(err.to_string().contains("AUTH_SECRET"), "{err}");
    }

    #[test]
    fn a_short_secret_or_an_open_token_endpoint_is_refused() {
        let short = parse(&["--auth-secret", "too-short"]);
        assert_eq!(short.validate(), Err(ConfigError::ShortSecret(9)));
        let open = parse(&["--auth-secret", GOOD_SECRET]);
        assert_eq!(open.validate(), Err(ConfigError::OpenTokenEndpoint));
        let ok = parse(&["--auth-secret", GOOD_SECRET, "--admin-token", "adm"]);
        assert_eq!(ok.validate(), Ok(()));
    }

    #[test]
    fn dev_mode_allows_the_defaults() {
        assert_eq!(parse(&["--dev"]).validate(), Ok(()));
        assert_eq!(
            GatewayConfig::local("127.0.0.1:0".parse().unwrap()).validate(),
            Ok(())
        );
    }

    #[test]
    fn origins_are_a_comma_separated_list() {
        let cfg = parse(&["--allowed-origins", "https://a.example,https://b.example"]);
        assert_eq!(
            cfg.allowed_origins,
            ["https://a.example", "https://b.example"]
        );
    }
}
