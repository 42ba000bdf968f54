//! Gateway settings: listen address, auth, rate limit and the limits on what a client controls.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use colloquy_core::config::{Secrets, ToEnv, list_value};
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
    /// The defaults (one place: the clap attributes above) in dev mode on `listen`, for a
    /// test or local run.
    #[must_use]
    pub fn local(listen: SocketAddr) -> Self {
        Self {
            listen,
            dev: true,
            ..colloquy_core::config::defaults()
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

impl ToEnv for GatewayConfig {
    fn flag_values(&self, secrets: Secrets) -> Vec<(&'static str, Option<String>)> {
        let Self {
            listen,
            instance_id,
            dev,
            auth_secret,
            admin_token,
            token_ttl_secs,
            rate_limit_messages,
            rate_limit_period_secs,
            max_frame_bytes,
            max_content_bytes,
            max_connections_per_user,
            max_in_flight_per_connection,
            shutdown_grace_secs,
            replay_limit,
            max_concurrent_replays,
            resume_burst,
            resume_refill_ms,
            ping_interval_secs,
            idle_timeout_secs,
            allowed_origins,
        } = self;
        vec![
            ("listen", Some(listen.to_string())),
            ("instance_id", Some(instance_id.clone())),
            ("dev", Some(dev.to_string())),
            ("auth_secret", secrets.reveal(auth_secret)),
            (
                "admin_token",
                admin_token.as_ref().and_then(|t| secrets.reveal(t)),
            ),
            ("token_ttl_secs", Some(token_ttl_secs.to_string())),
            ("rate_limit_messages", Some(rate_limit_messages.to_string())),
            (
                "rate_limit_period_secs",
                Some(rate_limit_period_secs.to_string()),
            ),
            ("max_frame_bytes", Some(max_frame_bytes.to_string())),
            ("max_content_bytes", Some(max_content_bytes.to_string())),
            (
                "max_connections_per_user",
                Some(max_connections_per_user.to_string()),
            ),
            (
                "max_in_flight_per_connection",
                Some(max_in_flight_per_connection.to_string()),
            ),
            ("shutdown_grace_secs", Some(shutdown_grace_secs.to_string())),
            ("replay_limit", Some(replay_limit.to_string())),
            (
                "max_concurrent_replays",
                Some(max_concurrent_replays.to_string()),
            ),
            ("resume_burst", Some(resume_burst.to_string())),
            ("resume_refill_ms", Some(resume_refill_ms.to_string())),
            ("ping_interval_secs", Some(ping_interval_secs.to_string())),
            ("idle_timeout_secs", Some(idle_timeout_secs.to_string())),
            (
                "allowed_origins",
                (!allowed_origins.is_empty()).then(|| list_value(allowed_origins)),
            ),
        ]
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

    #[test]
    fn local_defaults_come_from_the_flags() {
        let c = GatewayConfig::local("127.0.0.1:0".parse().unwrap());
        assert!(c.dev);
        assert_eq!(c.instance_id, "gateway");
        assert_eq!(c.rate_limit_messages, 10);
        assert_eq!(c.max_frame_bytes, 65_536);
        assert_eq!(c.auth_secret.expose_secret(), BUILT_IN_SECRET);
        assert!(c.admin_token.is_none());
    }

    #[test]
    fn a_gateway_config_round_trips_through_its_environment() {
        colloquy_core::config::assert_round_trip(&GatewayConfig {
            listen: "127.0.0.1:4321".parse().unwrap(),
            instance_id: "gw9".into(),
            dev: true,
            auth_secret: SecretString::from(GOOD_SECRET),
            admin_token: Some(SecretString::from("adm")),
            token_ttl_secs: 1,
            rate_limit_messages: 2,
            rate_limit_period_secs: 3,
            max_frame_bytes: 4,
            max_content_bytes: 5,
            max_connections_per_user: 6,
            max_in_flight_per_connection: 7,
            shutdown_grace_secs: 8,
            replay_limit: 9,
            max_concurrent_replays: 10,
            resume_burst: 11,
            resume_refill_ms: 12,
            ping_interval_secs: 13,
            idle_timeout_secs: 14,
            allowed_origins: vec!["https://a.example".into(), "https://b.example".into()],
        });
    }

    #[test]
    fn secrets_are_rendered_only_when_asked() {
        let mut cfg = parse(&["--auth-secret", GOOD_SECRET, "--admin-token", "adm"]);
        cfg.dev = false;
        let omitted = colloquy_core::config::render_env(&cfg, Secrets::Omit);
        assert!(
            !omitted.iter().any(|(k, v)| k.starts_with("AUTH_SECRET")
                || k == "AUTH_ADMIN_TOKEN"
                || v == GOOD_SECRET),
            "{omitted:?}"
        );
        assert!(omitted.contains(&("COLLOQUY_DEV".into(), "false".into())));
        let included = colloquy_core::config::render_env(&cfg, Secrets::Include);
        assert!(included.contains(&("AUTH_SECRET".into(), GOOD_SECRET.into())));
        assert!(included.contains(&("AUTH_ADMIN_TOKEN".into(), "adm".into())));
    }
}
