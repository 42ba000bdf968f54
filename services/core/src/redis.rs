//! Redis set-up with fred: a command pool and a subscriber, both reconnecting forever with
//! bounded command timeouts, so a vanished Redis yields errors (handled by the caller), not hangs.

use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::config::{ConnectionConfig, PerformanceConfig};

use crate::config::RedisConfig;

/// Errors setting up Redis clients.
#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    #[error("invalid REDIS_URL {url}: {source}")]
    Url { url: String, source: Error },
    #[error("cannot build Redis client for {url}: {source}")]
    Build { url: String, source: Error },
}

/// `url` with its password replaced by `***`, for logs and error messages.
#[must_use]
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
        None => format!("{scheme}://***@{host}"),
    }
}

fn builder(cfg: &RedisConfig, broadcast_capacity: usize) -> Result<Builder, RedisSetupError> {
    let config = Config::from_url(&cfg.url).map_err(|source| RedisSetupError::Url {
        url: redacted(&cfg.url),
        source,
    })?;
    let timeout = Duration::from_millis(cfg.command_timeout_ms);
    let mut b = Builder::from_config(config);
    b.with_connection_config(|c: &mut ConnectionConfig| {
        c.connection_timeout = Duration::from_secs(2);
        c.internal_command_timeout = timeout;
        c.max_command_attempts = 2;
    })
    .with_performance_config(|p: &mut PerformanceConfig| {
        p.default_command_timeout = timeout;
        p.broadcast_channel_capacity = broadcast_capacity;
    })
    .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2));
    Ok(b)
}

/// A connected pool for commands. Connecting is lazy-tolerant: the pool keeps reconnecting in
/// the background if Redis is down at start, and commands fail with timeouts meanwhile.
///
/// # Errors
/// When the URL is invalid or the client cannot be built.
pub async fn pool(cfg: &RedisConfig) -> Result<Pool, RedisSetupError> {
    // Command clients receive no pub/sub: keep fred's small default broadcast buffer.
    let pool = builder(cfg, 32)?
        .build_pool(cfg.pool_size.max(1))
        .map_err(|source| RedisSetupError::Build {
            url: redacted(&cfg.url),
            source,
        })?;
    if let Err(e) = pool.init().await {
        // Down, or answering LOADING while it reads its append-only file: fred does not retry
        // a failed first connection by itself, so keep trying in the background.
        tracing::warn!(url = %redacted(&cfg.url), error = %e, "Redis not reachable yet; will keep connecting");
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut retry = 0;
            while let Err(e) = pool.init().await {
                tracing::debug!(error = %e, "Redis still not reachable");
                tokio::time::sleep(crate::retry::RetryPolicy::UNTIL_SHUTDOWN.jittered(retry)).await;
                retry += 1;
            }
            tracing::info!("Redis connected");
        });
    }
    Ok(pool)
}

/// A subscriber client that re-subscribes to its channels after every reconnect.
///
/// # Errors
/// When the URL is invalid or the client cannot be built.
pub async fn subscriber(cfg: &RedisConfig) -> Result<SubscriberClient, RedisSetupError> {
    // fred's default (32) makes a busy gateway's subscriber lag and drop deliveries, each drop
    // forcing every connection to replay from its inbox.
    let sub = builder(cfg, 16_384)?
        .build_subscriber_client()
        .map_err(|source| RedisSetupError::Build {
            url: redacted(&cfg.url),
            source,
        })?;
    if let Err(e) = sub.init().await {
        tracing::warn!(url = %redacted(&cfg.url), error = %e, "Redis subscriber not connected yet; will keep connecting");
        let sub = sub.clone();
        tokio::spawn(async move {
            let mut retry = 0;
            while sub.init().await.is_err() {
                tokio::time::sleep(crate::retry::RetryPolicy::UNTIL_SHUTDOWN.jittered(retry)).await;
                retry += 1;
            }
            tracing::info!("Redis subscriber connected");
        });
    }
    // Re-subscribes after reconnects for the client's lifetime; the task needs no handle.
    drop(sub.manage_subscriptions());
    Ok(sub)
}

#[cfg(test)]
mod tests {
    use super::redacted;

    #[test]
    fn passwords_never_reach_a_log_line() {
        assert_eq!(
            redacted("redis://:s3cret@h:6379/0"),
            "redis://:***@h:6379/0"
        );
        assert_eq!(
            redacted("rediss://app:s3cret@h:6380"),
            "rediss://app:***@h:6380"
        );
        assert_eq!(redacted("redis://token@h"), "redis://***@h");
        assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
