//! Exponential backoff with full jitter (AWS Architecture Blog, "Exponential Backoff and Jitter").
//!
//! The delay before retry `n` (0-based) is uniform in `[0, min(cap, base * 2^n)]`; a server's
//! `Retry-After` raises it to at least that long. Used for LLM calls and for Redis/Kafka retries.

use std::time::Duration;

use rand::Rng;

/// A backoff schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    /// Attempts in all, the first one included.
    pub max_attempts: u32,
}

impl Backoff {
    /// The upper bound of the jitter window before retry number `retry` (0 = first retry).
    #[must_use]
    pub fn ceiling(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The delay before retry number `retry`, or `None` when attempts are used up.
    ///
    /// `attempts_made` counts attempts already done (so the first retry has `attempts_made == 1`).
    /// `retry_after` is the server's hint; it is honoured even above the cap, since retrying
    /// earlier is pointless, but never above `max_hint`.
    #[must_use]
    pub fn delay<R: Rng + ?Sized>(
        &self,
        attempts_made: u32,
        retry_after: Option<Duration>,
        rng: &mut R,
    ) -> Option<Duration> {
        if attempts_made == 0 || attempts_made >= self.max_attempts {
            return None;
        }
        let ceiling = self.ceiling(attempts_made - 1);
        let jittered = Duration::from_micros(rng.random_range(0..=ceiling.as_micros() as u64));
        Some(match retry_after {
            Some(hint) => jittered.max(hint.min(MAX_HINT)),
            None => jittered,
        })
    }
}

/// Longest `Retry-After` honoured; a longer hint is treated as this long.
pub const MAX_HINT: Duration = Duration::from_secs(120);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    fn schedule(base_ms: u64, cap_ms: u64) -> Backoff {
        Backoff {
            base: Duration::from_millis(base_ms),
            cap: Duration::from_millis(cap_ms),
            max_attempts: 7,
        }
    }

    #[test]
    fn ceilings_double_until_the_cap() {
        let b = schedule(100, 1_000);
        let c: Vec<u64> = (0..6).map(|n| b.ceiling(n).as_millis() as u64).collect();
        assert_eq!(c, vec![100, 200, 400, 800, 1_000, 1_000]);
    }

    #[test]
    fn retry_after_is_honoured() {
        let b = schedule(1, 10);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let d = b.delay(1, Some(Duration::from_secs(2)), &mut rng).unwrap();
        assert_eq!(d, Duration::from_secs(2));
    }

    proptest! {
        #[test]
        fn never_above_cap_never_more_than_seven_attempts(
            base in 1u64..5_000, cap in 1u64..60_000, seed in any::<u64>(), hint in proptest::option::of(0u64..300_000)
        ) {
            let b = schedule(base, cap);
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let hint = hint.map(Duration::from_millis);
            let mut attempts = 1;
            while let Some(d) = b.delay(attempts, hint, &mut rng) {
                let bound = Duration::from_millis(cap).max(hint.unwrap_or_default().min(MAX_HINT));
                prop_assert!(d <= bound, "delay {d:?} above {bound:?}");
                if let Some(h) = hint { prop_assert!(d >= h.min(MAX_HINT)); }
                attempts += 1;
                prop_assert!(attempts <= 7);
            }
            prop_assert_eq!(attempts, 7);
        }
    }
}
