//! The state every request and session of one gateway shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use fred::prelude::Pool;
use rdkafka::producer::FutureProducer;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use colloquy_core::names::Names;

use crate::audit::Audit;
use crate::auth::TokenService;
use crate::config::GatewayConfig;
use crate::fanout::Fanout;
use crate::rate_limit::RateLimiter;

/// Shared state of one gateway instance.
pub struct AppState {
    pub config: GatewayConfig,
    pub names: Names,
    pub incoming_topic: String,
    pub producer: FutureProducer,
    pub redis: Pool,
    pub tokens: TokenService,
    pub limiter: RateLimiter,
    pub fanout: Arc<Fanout>,
    pub audit: Audit,
    /// Fired when the gateway begins to shut down; sessions close with 1012.
    pub shutdown: CancellationToken,
    /// Produce tasks that shutdown waits for.
    pub tasks: TaskTracker,
    /// WebSocket sessions, which shutdown waits for (each writes its owed acks, then closes).
    pub sessions: TaskTracker,
    /// Slots for inbox reads: a burst of replays (after a Redis reconnect, every socket
    /// replays) queues here instead of hitting Redis at once.
    pub replays: Semaphore,
    conn_ids: AtomicU64,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("instance", &self.config.instance_id)
            .finish_non_exhaustive()
    }
}

impl AppState {
    #[allow(clippy::too_many_arguments)]
    #[must_use]
    pub fn new(
        config: GatewayConfig,
        names: Names,
        producer: FutureProducer,
        redis: Pool,
        tokens: TokenService,
        limiter: RateLimiter,
        fanout: Arc<Fanout>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            audit: Audit::start(redis.clone(), names.clone(), shutdown.clone()),
            incoming_topic: names.incoming_topic(),
            replays: Semaphore::new(config.max_concurrent_replays.max(1)),
            config,
            names,
            producer,
            redis,
            tokens,
            limiter,
            fanout,
            shutdown,
            tasks: TaskTracker::new(),
            sessions: TaskTracker::new(),
            conn_ids: AtomicU64::new(1),
        }
    }

    pub fn next_conn_id(&self) -> u64 {
        self.conn_ids.fetch_add(1, Ordering::Relaxed)
    }
}
