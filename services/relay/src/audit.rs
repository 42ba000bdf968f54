//! The unanswered-message audit, read side.
//!
//! Gateways add every acked message to one sorted set (score: ack time in ms) unless its
//! answer is already stored; the relay's delivery script removes it when its answer or
//! failure is stored. What stays in the set is acked and unanswered: its size and the age of
//! its oldest member become gauges, and an alert turns a silent loss into a page.

use std::time::Duration;

use fred::prelude::*;
use tokio_util::sync::CancellationToken;

use crate::events::{AuditRead, AuditReadFailed};

/// Size of the audit set and age of its oldest member at `now_ms`.
///
/// # Errors
/// When Redis fails.
pub async fn read(redis: &Pool, key: &str, now_ms: i64) -> Result<(u64, Duration), Error> {
    let client = redis.next();
    let pipe = client.pipeline();
    let _: () = pipe.zcard(key).await?;
    let _: () = pipe.zrange(key, 0, 0, None, false, None, true).await?;
    let (count, oldest): (u64, Vec<(String, f64)>) = pipe.all().await?;
    let age = oldest
        .first()
        .map(|(_, score)| (now_ms - *score as i64).max(0))
        .unwrap_or(0);
    Ok((count, Duration::from_millis(age as u64)))
}

/// Publishes the audit gauges every `every` until `shutdown`.
pub async fn report(redis: Pool, key: String, every: Duration, shutdown: CancellationToken) {
    loop {
        match read(&redis, &key, colloquy_core::now_ms()).await {
            Ok((count, age)) => AuditRead {
                unanswered: count,
                oldest_age: age,
            }
            .emit(),
            Err(e) => AuditReadFailed { error: &e }.emit(),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
