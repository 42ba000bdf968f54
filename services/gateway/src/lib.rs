//! Colloquy's gateway: the WebSocket and HTTP edge.
//!
//! It authenticates clients, applies per-user limits, produces their messages to Kafka (acking
//! only from the delivery report) and writes the answers the relay publishes to every socket
//! of the user, replaying from the durable inbox after any gap.

pub mod audit;
pub mod auth;
pub mod close;
pub mod config;
pub mod connection;
pub mod events;
pub mod fanout;
pub mod inbox;
pub mod publish;
pub mod rate_limit;
pub mod routes;
pub mod session;
pub mod state;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::Listener as _;
use rdkafka::producer::Producer;
use tokio_util::sync::CancellationToken;

use colloquy_core::config::{KafkaConfig, RedisConfig};
use colloquy_core::names::Names;
use colloquy_core::net::{Listener, listen};

use crate::auth::TokenService;
use crate::config::GatewayConfig;
use crate::fanout::Fanout;
use crate::rate_limit::{Gcra, RateLimiter};
use crate::state::AppState;

/// Everything a gateway needs to start.
#[derive(Clone, Debug)]
pub struct Settings {
    pub gateway: GatewayConfig,
    pub kafka: KafkaConfig,
    pub redis: RedisConfig,
    pub names: Names,
}

/// A built gateway, bound to its port, not yet serving.
#[derive(Debug)]
pub struct Application {
    listener: Listener,
    state: Arc<AppState>,
}

impl Application {
    /// Checks the configuration, sets up the Kafka producer and the Redis clients (which keep
    /// reconnecting in the background when Redis is not up yet) and binds the listener.
    /// Topics are created when the broker answers; when it does not, that is only logged.
    ///
    /// # Errors
    /// When the configuration is insecure outside dev mode ([`config::ConfigError`]), a client
    /// cannot be built, or the port cannot be bound.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let Settings {
            gateway,
            kafka,
            redis,
            names,
        } = settings;
        gateway.validate()?;
        if gateway.dev {
            tracing::warn!(
                "dev mode (COLLOQUY_DEV=1 / --dev): built-in secret, open POST /token and localhost origins are allowed"
            );
        }
        colloquy_core::metrics::record_build_info(events::SERVICE);
        if let Err(e) = colloquy_core::kafka::ensure_topics(&kafka, &names.all_topics()).await {
            // The broker may come up later; produce will report unavailability per message.
            tracing::warn!(error = %e, "could not ensure topics at start");
        }
        let producer =
            colloquy_core::kafka::producer(&kafka, events::SERVICE).context("Kafka producer")?;
        let pool = colloquy_core::redis::pool(&redis)
            .await
            .context("Redis pool")?;
        let subscriber = colloquy_core::redis::subscriber(&redis)
            .await
            .context("Redis subscriber")?;
        let shutdown = CancellationToken::new();
        let fanout = Fanout::start(
            subscriber,
            names.clone(),
            gateway.max_connections_per_user,
            shutdown.clone(),
        );
        let limiter = RateLimiter::new(
            Gcra::per_period(
                gateway.rate_limit_messages,
                Duration::from_secs(gateway.rate_limit_period_secs),
            ),
            pool.clone(),
            names.clone(),
        );
        let tokens = TokenService::new(&gateway.auth_secret, gateway.token_ttl_secs)
            .context("AUTH_SECRET cannot be empty")?;
        let listener = listen(gateway.listen)
            .await
            .with_context(|| format!("cannot listen on {}", gateway.listen))?;
        let state = Arc::new(AppState::new(
            gateway, names, producer, pool, tokens, limiter, fanout, shutdown,
        ));
        Ok(Self { listener, state })
    }

    /// The bound port (useful with port 0).
    #[must_use]
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map_or(0, |a| a.port())
    }

    /// The shared state, for tests that inspect the fan-out.
    #[must_use]
    pub fn state(&self) -> Arc<AppState> {
        Arc::clone(&self.state)
    }

    /// Serves until `shutdown` fires, then drains: in-flight produces finish, every socket
    /// writes the acks it owes and is closed with 1012 so clients reconnect elsewhere, and the
    /// producer is flushed, all within the grace period.
    ///
    /// # Errors
    /// When the listener's address cannot be read.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self { listener, state } = self;
        let grace = state.config.shutdown_grace();
        let app = routes::router(Arc::clone(&state));
        let stopping = state.shutdown.clone();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            trigger.cancelled().await;
            stopping.cancel();
        });
        tracing::info!(addr = %listener.local_addr()?, instance = %state.config.instance_id, "gateway listening");
        let serve = axum::serve(listener, app).with_graceful_shutdown({
            let s = state.shutdown.clone();
            async move { s.cancelled().await }
        });
        let server = tokio::spawn(async move { serve.await });
        state.shutdown.cancelled().await;
        let drained = tokio::time::timeout(grace, async {
            state.tasks.close();
            state.tasks.wait().await;
            state.sessions.close();
            state.sessions.wait().await;
            let _ = server.await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!(?grace, "shutdown grace elapsed with work still in flight");
        }
        let producer = state.producer.clone();
        let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(5))).await;
        tracing::info!("gateway stopped");
        Ok(())
    }
}
