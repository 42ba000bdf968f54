//! Per-user rate limit: GCRA (the generic cell rate algorithm), shared by every gateway
//! through one atomic Lua script in Redis, with an in-process limiter of the same algorithm
//! taking over while Redis is unreachable.
//!
//! GCRA keeps one number per user, the theoretical arrival time (TAT). A message is allowed
//! when `now >= tat - tolerance`, and then moves the TAT one emission interval forward.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use fred::prelude::*;
use fred::types::scripts::Script;

use colloquy_core::names::Names;
use colloquy_core::{UserId, now_ms};

use crate::events::RateLimitFallback;

/// The outcome of a rate-limit check; being limited is an expected value, not an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    Limited { retry_after_ms: u64 },
}

/// GCRA parameters: `burst` messages at once, then one per `interval_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gcra {
    pub interval_ms: i64,
    pub burst: u32,
}

impl Gcra {
    /// `messages` per `period` (the burst is `messages`), as the original system configured it.
    #[must_use]
    pub fn per_period(messages: u32, period: Duration) -> Self {
        let messages = messages.max(1);
        Self {
            interval_ms: (period.as_millis() as i64 / i64::from(messages)).max(1),
            burst: messages,
        }
    }

    fn tolerance_ms(self) -> i64 {
        self.interval_ms * i64::from(self.burst.saturating_sub(1))
    }

    /// Applies one message at `now` to a user's stored TAT; returns the decision and the new TAT.
    #[must_use]
    pub fn check(self, tat: Option<i64>, now: i64) -> (Decision, i64) {
        let tat = tat.unwrap_or(now).max(now);
        let allow_at = tat - self.tolerance_ms();
        if now < allow_at {
            let wait = (allow_at - now) as u64;
            (
                Decision::Limited {
                    retry_after_ms: wait,
                },
                tat,
            )
        } else {
            (Decision::Allowed, tat + self.interval_ms)
        }
    }
}

/// The same algorithm as [`Gcra::check`], atomically in Redis, on Redis' clock.
///
/// Its state is not written to the append-only file (`REPL_NONE`): with `appendfsync always`
/// every write costs an fsync before Redis answers anyone (0.1 ms on a quiet disk, several ms
/// on a busy one), and this one sits in front of every ack. A Redis restart forgets the users'
/// arrival times, which gives each a fresh burst, as the local fallback does.
const GCRA_LUA: &str = r"
redis.set_repl(redis.REPL_NONE)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allow_at = tat - interval * (burst - 1)
if now < allow_at then
  return allow_at - now
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], new_tat, 'PX', new_tat - now + 1000)
return -1
";

/// The shared limiter with its local fallback.
pub struct RateLimiter {
    gcra: Gcra,
    redis: Pool,
    names: Names,
    script: Script,
    local: Mutex<HashMap<UserId, i64>>,
    /// Until when (ms) Redis is skipped after a failure, so a dead Redis does not add a
    /// command timeout to every message.
    redis_down_until: AtomicI64,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("gcra", &self.gcra)
            .finish_non_exhaustive()
    }
}

const REDIS_RETRY_AFTER_FAILURE_MS: i64 = 1_000;

/// Longest a message waits for the shared limiter before the local one decides. The script
/// answers in well under a millisecond; a vanished Redis would otherwise hold every message in
/// flight for the pool's command timeout and its retry (seconds: acks 3.3 s late at p99 when
/// Redis was killed for 3 s at 1,000 msg/s), and again each time the retry window reopens.
const REDIS_BUDGET: Duration = Duration::from_millis(250);

impl RateLimiter {
    #[must_use]
    pub fn new(gcra: Gcra, redis: Pool, names: Names) -> Self {
        Self {
            gcra,
            redis,
            names,
            script: Script::from_lua(GCRA_LUA),
            local: Mutex::new(HashMap::new()),
            redis_down_until: AtomicI64::new(0),
        }
    }

    /// Checks one message of `user`.
    pub async fn check(&self, user: &UserId) -> Decision {
        let now = now_ms();
        if now >= self.redis_down_until.load(Ordering::Relaxed) {
            let key = self.names.rate_key(user);
            let args = vec![self.gcra.interval_ms, i64::from(self.gcra.burst)];
            let shared = self
                .script
                .evalsha_with_reload::<i64, _, _>(self.redis.next(), key, args);
            let answer = tokio::time::timeout(REDIS_BUDGET, shared)
                .await
                .unwrap_or_else(|_| {
                    Err(Error::new(
                        ErrorKind::Timeout,
                        format!("no answer within {REDIS_BUDGET:?}"),
                    ))
                });
            match answer {
                Ok(wait) if wait < 0 => return Decision::Allowed,
                Ok(wait) => {
                    return Decision::Limited {
                        retry_after_ms: wait as u64,
                    };
                }
                Err(e) => {
                    RateLimitFallback {
                        userid: user.as_str(),
                        error: &e,
                    }
                    .emit();
                    self.redis_down_until
                        .store(now + REDIS_RETRY_AFTER_FAILURE_MS, Ordering::Relaxed);
                }
            }
        }
        self.check_local(user, now)
    }

    fn check_local(&self, user: &UserId, now: i64) -> Decision {
        let mut map = self
            .local
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() > 100_000 {
            map.retain(|_, tat| *tat > now);
        }
        let (decision, tat) = self.gcra.check(map.get(user).copied(), now);
        map.insert(user.clone(), tat);
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ten_per_minute_allows_a_burst_of_ten_then_waits_six_seconds() {
        let g = Gcra::per_period(10, Duration::from_secs(60));
        let mut tat = None;
        for _ in 0..10 {
            let (d, t) = g.check(tat, 1_000);
            assert_eq!(d, Decision::Allowed);
            tat = Some(t);
        }
        let (d, _) = g.check(tat, 1_000);
        assert_eq!(
            d,
            Decision::Limited {
                retry_after_ms: 6_000
            }
        );
        let (d, _) = g.check(tat, 7_000);
        assert_eq!(d, Decision::Allowed);
    }

    proptest! {
        /// Over any window, GCRA never allows more than burst + window / interval messages.
        #[test]
        fn never_exceeds_the_configured_rate(
            messages in 1u32..50, period_s in 1u64..120,
            gaps in proptest::collection::vec(0i64..5_000, 1..300)
        ) {
            let g = Gcra::per_period(messages, Duration::from_secs(period_s));
            let mut tat = None;
            let mut now = 0i64;
            let mut allowed = 0i64;
            for gap in gaps {
                now += gap;
                let (d, t) = g.check(tat, now);
                tat = Some(t);
                if let Decision::Allowed = d { allowed += 1; }
                else if let Decision::Limited { retry_after_ms } = d {
                    // Waiting exactly retry_after_ms is enough.
                    prop_assert_eq!(g.check(tat, now + retry_after_ms as i64).0, Decision::Allowed);
                }
            }
            prop_assert!(allowed <= i64::from(g.burst) + now / g.interval_ms);
        }
    }
}
