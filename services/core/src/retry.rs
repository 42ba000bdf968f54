//! The one way Colloquy retries a Redis or Kafka operation (STYLE 14).
//!
//! An error is classified first: a **transient** one (a broker or Redis that is down,
//! restarting or slow) is retried with capped, fully jittered exponential backoff until it
//! succeeds or shutdown interrupts, because nothing is lost by waiting (offsets are stored
//! only after success); a **permanent** one (a topic that does not exist, no authorisation, a
//! record too large) is returned at once, because waiting cannot fix it and a retry loop
//! would hold the message, its lane and its permit forever.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use tokio_util::sync::CancellationToken;

/// Whether waiting can fix an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Transient,
    Permanent,
}

/// How a retried operation ended without success.
#[derive(Debug, thiserror::Error)]
pub enum RetryError<E> {
    /// An error that waiting cannot fix.
    #[error("{0}")]
    Permanent(E),
    /// `max_attempts` transient failures in a row.
    #[error("gave up after {attempts} attempts: {last}")]
    Exhausted { attempts: u32, last: E },
    /// Shutdown began while retrying.
    #[error("shutting down")]
    Cancelled,
}

/// Backoff between attempts.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    pub base: Duration,
    pub cap: Duration,
    /// `None`: transient errors are retried until success or shutdown.
    pub max_attempts: Option<u32>,
}

impl RetryPolicy {
    /// Transient errors retried until success or shutdown, 50 ms doubling to 2 s.
    pub const UNTIL_SHUTDOWN: Self = Self {
        base: Duration::from_millis(50),
        cap: Duration::from_secs(2),
        max_attempts: None,
    };

    /// The delay before retry number `retry` (0-based): uniform in `[0, min(cap, base·2^retry)]`
    /// but never under a tenth of that ceiling, so a storm of retries cannot spin.
    pub fn delay<R: Rng + ?Sized>(&self, retry: u32, rng: &mut R) -> Duration {
        let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
        let ceiling = self.base.saturating_mul(factor).min(self.cap);
        let micros = ceiling.as_micros() as u64;
        Duration::from_micros(rng.random_range(micros / 10..=micros))
    }

    /// [`RetryPolicy::delay`] with the thread's random generator.
    #[must_use]
    pub fn jittered(&self, retry: u32) -> Duration {
        self.delay(retry, &mut rand::rng())
    }
}

/// Runs `op` until it succeeds, a permanent error occurs, attempts run out or `shutdown` fires.
/// `on_error` sees every failure (count and log it there) with its attempt number and class.
///
/// # Errors
/// [`RetryError`] saying why it stopped.
pub async fn retry<T, E, F, Fut>(
    policy: RetryPolicy,
    shutdown: &CancellationToken,
    classify: impl Fn(&E) -> Class,
    mut on_error: impl FnMut(&E, u32, Class),
    mut op: F,
) -> Result<T, RetryError<E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let result = tokio::select! {
            r = op() => r,
            () = shutdown.cancelled() => return Err(RetryError::Cancelled),
        };
        let e = match result {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let class = classify(&e);
        on_error(&e, attempt, class);
        if class == Class::Permanent {
            return Err(RetryError::Permanent(e));
        }
        if policy.max_attempts.is_some_and(|max| attempt >= max) {
            return Err(RetryError::Exhausted {
                attempts: attempt,
                last: e,
            });
        }
        let delay = policy.jittered(attempt - 1);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return Err(RetryError::Cancelled),
        }
    }
}

/// Kafka errors that waiting cannot fix: the topic is missing or forbidden, the record is
/// too large or invalid, authentication failed, the configuration is wrong.
#[must_use]
pub fn kafka_class(e: &KafkaError) -> Class {
    let code = match e {
        KafkaError::MessageProduction(code) | KafkaError::AdminOp(code) => *code,
        KafkaError::ClientCreation(_) | KafkaError::ClientConfig(..) => return Class::Permanent,
        _ => return Class::Transient,
    };
    use RDKafkaErrorCode as C;
    match code {
        C::MessageSizeTooLarge
        | C::InvalidMessageSize
        | C::InvalidMessage
        | C::InvalidTopic
        | C::MessageBatchTooLarge
        | C::InvalidRecord
        | C::UnknownTopic
        | C::UnknownTopicOrPartition
        | C::UnknownPartition
        | C::TopicAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::GroupAuthorizationFailed
        | C::TransactionalIdAuthorizationFailed
        | C::SaslAuthenticationFailed
        | C::Authentication
        | C::UnsupportedVersion
        | C::UnsupportedForMessageFormat
        | C::InvalidConfig
        | C::PolicyViolation => Class::Permanent,
        _ => Class::Transient,
    }
}

/// Redis errors that waiting cannot fix: a wrong type, a script error, no permission.
/// Connection, timeout, `LOADING`, `BUSY`, `NOSCRIPT` (reloaded by the caller) and I/O
/// errors are transient.
#[must_use]
pub fn redis_class(e: &fred::error::Error) -> Class {
    use fred::error::ErrorKind as K;
    match e.kind() {
        K::Auth | K::InvalidCommand | K::InvalidArgument | K::Url | K::Config => Class::Permanent,
        K::Unknown | K::Parse | K::Protocol => {
            let details = e.details();
            if details.starts_with("WRONGTYPE") || details.starts_with("NOPERM") {
                Class::Permanent
            } else {
                Class::Transient
            }
        }
        _ => Class::Transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use std::sync::atomic::{AtomicU32, Ordering};

    const FAST: RetryPolicy = RetryPolicy {
        base: Duration::from_millis(1),
        cap: Duration::from_millis(4),
        max_attempts: None,
    };

    #[tokio::test]
    async fn transient_errors_are_retried_until_success() {
        let calls = AtomicU32::new(0);
        let stop = CancellationToken::new();
        let mut seen = Vec::new();
        let out: Result<u32, RetryError<&str>> = retry(
            FAST,
            &stop,
            |_| Class::Transient,
            |_, n, _| seen.push(n),
            || async {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                if n < 4 { Err("down") } else { Ok(n) }
            },
        )
        .await;
        assert_eq!(out.unwrap(), 4);
        assert_eq!(seen, vec![1, 2, 3]);
    }

    #[tokio::test]
    async fn permanent_errors_stop_at_once() {
        let calls = AtomicU32::new(0);
        let stop = CancellationToken::new();
        let out: Result<(), RetryError<&str>> = retry(
            FAST,
            &stop,
            |_| Class::Permanent,
            |_, _, _| {},
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err("no such topic")
            },
        )
        .await;
        assert!(matches!(out, Err(RetryError::Permanent("no such topic"))));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn attempts_are_bounded_when_asked() {
        let calls = AtomicU32::new(0);
        let stop = CancellationToken::new();
        let policy = RetryPolicy {
            max_attempts: Some(3),
            ..FAST
        };
        let out: Result<(), RetryError<&str>> = retry(
            policy,
            &stop,
            |_| Class::Transient,
            |_, _, _| {},
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err("down")
            },
        )
        .await;
        assert!(matches!(
            out,
            Err(RetryError::Exhausted { attempts: 3, .. })
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn shutdown_interrupts_a_retry_loop() {
        let stop = CancellationToken::new();
        stop.cancel();
        let out: Result<(), RetryError<&str>> = retry(
            RetryPolicy::UNTIL_SHUTDOWN,
            &stop,
            |_| Class::Transient,
            |_, _, _| {},
            std::future::pending,
        )
        .await;
        assert!(matches!(out, Err(RetryError::Cancelled)));
    }

    #[test]
    fn kafka_errors_are_classified() {
        let permanent = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        let missing = KafkaError::MessageProduction(RDKafkaErrorCode::UnknownTopicOrPartition);
        let forbidden = KafkaError::MessageProduction(RDKafkaErrorCode::TopicAuthorizationFailed);
        let down = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert_eq!(kafka_class(&permanent), Class::Permanent);
        assert_eq!(kafka_class(&missing), Class::Permanent);
        assert_eq!(kafka_class(&forbidden), Class::Permanent);
        assert_eq!(kafka_class(&down), Class::Transient);
        assert_eq!(
            kafka_class(&KafkaError::MessageProduction(
                RDKafkaErrorCode::AllBrokersDown
            )),
            Class::Transient
        );
    }

    #[test]
    fn redis_errors_are_classified() {
        use fred::error::{Error, ErrorKind};
        assert_eq!(
            redis_class(&Error::new(ErrorKind::Timeout, "timed out")),
            Class::Transient
        );
        assert_eq!(
            redis_class(&Error::new(ErrorKind::IO, "connection reset")),
            Class::Transient
        );
        assert_eq!(
            redis_class(&Error::new(
                ErrorKind::Unknown,
                "LOADING Redis is loading the dataset in memory"
            )),
            Class::Transient
        );
        assert_eq!(
            redis_class(&Error::new(ErrorKind::Auth, "WRONGPASS")),
            Class::Permanent
        );
        assert_eq!(
            redis_class(&Error::new(
                ErrorKind::Unknown,
                "WRONGTYPE Operation against a key holding the wrong kind of value"
            )),
            Class::Permanent
        );
    }

    proptest! {
        #[test]
        fn delays_stay_within_the_jitter_window(retry in 0u32..40, seed in any::<u64>()) {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let d = RetryPolicy::UNTIL_SHUTDOWN.delay(retry, &mut rng);
            prop_assert!(d <= Duration::from_secs(2));
            let ceiling = Duration::from_millis(50).saturating_mul(1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX)).min(Duration::from_secs(2));
            prop_assert!(d >= ceiling / 10 - Duration::from_micros(1));
        }
    }
}
