//! Colloquy's synthetic prober (blackbox monitoring).
//!
//! Every interval it does what a user does, through the public edge: get a token, open a
//! WebSocket, send a message, and wait for the `ack`, the first `delta` and the `response`.
//! It exports whether the last probe succeeded (`colloquy_probe_success`), its latencies by
//! stage and a counter of probes by outcome on its own `/metrics`, so an alert sees the whole
//! path fail even when every service's own metrics look healthy.

pub mod config;
pub mod events;
pub mod probe;
pub mod tracker;

use std::net::SocketAddr;

use anyhow::Context;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

pub use crate::config::ProberConfig;
pub use crate::probe::Prober;
pub use crate::tracker::{Outcome, ProbeReport, Stage};

use crate::events::ProbeFinished;

/// Everything the prober needs to start.
#[derive(Clone, Debug)]
pub struct Settings {
    pub prober: ProberConfig,
}

/// A built prober: its metrics endpoint is listening, no probe has run yet.
#[derive(Debug)]
pub struct Application {
    prober: Prober,
    metrics_addr: SocketAddr,
    stop: CancellationToken,
}

impl Application {
    /// Binds the metrics endpoint and registers the prober's series.
    ///
    /// # Errors
    /// When the metrics address cannot be bound or the HTTP client cannot be built.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        colloquy_core::metrics::record_build_info(events::SERVICE);
        let stop = CancellationToken::new();
        let metrics_addr = colloquy_core::admin::serve(
            settings.prober.metrics_listen,
            // The prober is ready once it serves: its verdicts are on /metrics.
            std::sync::Arc::new(|| Ok(())),
            stop.clone(),
        )
        .await
        .with_context(|| format!("bind metrics on {}", settings.prober.metrics_listen))?;
        let prober = Prober::new(settings.prober).context("HTTP client")?;
        Ok(Self {
            prober,
            metrics_addr,
            stop,
        })
    }

    /// The port of `/metrics` and `/health`.
    #[must_use]
    pub fn metrics_port(&self) -> u16 {
        self.metrics_addr.port()
    }

    /// Probes every interval until `shutdown`; a probe in progress is abandoned at shutdown.
    ///
    /// # Errors
    /// None today; the signature matches the other services'.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let cfg = self.prober.config();
        tracing::info!(
            edge = cfg.http_base(),
            userid = %cfg.userid,
            interval_secs = cfg.interval().as_secs(),
            metrics = %self.metrics_addr,
            "prober started"
        );
        let mut ticks = tokio::time::interval(cfg.interval());
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = ticks.tick() => {}
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                report = self.prober.probe_once() => {
                    ProbeFinished { userid: &cfg.userid, report: &report }.emit();
                }
            }
        }
        self.stop.cancel();
        tracing::info!("prober stopped");
        Ok(())
    }
}
