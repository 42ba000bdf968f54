//! The closed label values of the metrics contract: outcomes, operations, reasons, stages.
//!
//! Every label with a fixed set of values is an enum here, so an event names a variant and
//! never types a string, and the contract ([`crate::metrics::CONTRACT`]) registers at start
//! the zero series of exactly the values a service emits. Where a value is emitted by only
//! some of a metric's services, [`LabelValue::emitted_by`] says which, in an exhaustive
//! `match`: a new variant does not compile until it says who emits it.

use std::fmt;

/// The `service` label: each service names itself once, with one of these.
pub mod service {
    pub const GATEWAY: &str = "gateway";
    pub const AI_CONSUMER: &str = "ai-consumer";
    pub const RELAY: &str = "relay";
    pub const PROBER: &str = "prober";
}

use service::{AI_CONSUMER, GATEWAY, RELAY};

/// A label's closed set of values.
pub trait LabelValue: Copy + 'static {
    /// Every value, in the order the docs list them.
    const ALL: &'static [Self];

    /// The label value as exposed.
    fn as_str(self) -> &'static str;

    /// The services that emit this value; `None` when every service of the metric does.
    fn emitted_by(self) -> Option<&'static [&'static str]> {
        None
    }
}

/// The values of `L` that `service` emits, for its zero series.
#[must_use]
pub fn zero_values<L: LabelValue>(service: &str) -> Vec<&'static str> {
    L::ALL
        .iter()
        .filter(|v| v.emitted_by().is_none_or(|s| s.contains(&service)))
        .map(|v| v.as_str())
        .collect()
}

/// Every value of `L` (any service), for the docs and the contract's checks.
#[must_use]
pub fn all<L: LabelValue>() -> Vec<&'static str> {
    L::ALL.iter().map(|v| v.as_str()).collect()
}

/// Implements `Display` as the label value, for labels that also appear in messages.
macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}

display_as_str!(
    Stage,
    MessageOutcome,
    RefusedReason,
    LlmStatus,
    RetryReason,
    LlmErrorClass,
    RedisOp,
    KafkaOp,
    ReplayReason,
    ProbeOutcome,
    ProbeStage
);

/// One hop of a message: the `stage` label of `colloquy_stage_latency_seconds`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Gateway: enqueue to the broker's acknowledgement.
    Produce,
    /// ai-consumer: enqueue to the start of handling.
    QueueWait,
    /// ai-consumer: the LLM call that answered, last attempt.
    Llm,
    /// relay: the response's enqueue to its delivery stored in Redis.
    Relay,
    /// Gateway: the delivery stored to its frame handed to the socket.
    Fanout,
}

impl LabelValue for Stage {
    const ALL: &'static [Self] = &[
        Self::Produce,
        Self::QueueWait,
        Self::Llm,
        Self::Relay,
        Self::Fanout,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Produce => "produce",
            Self::QueueWait => "queue_wait",
            Self::Llm => "llm",
            Self::Relay => "relay",
            Self::Fanout => "fanout",
        }
    }
}

/// How a message reached its user: the `outcome` label of `colloquy_e2e_latency_seconds`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum E2eOutcome {
    Response,
    LlmFailed,
}

impl LabelValue for E2eOutcome {
    const ALL: &'static [Self] = &[Self::Response, Self::LlmFailed];

    fn as_str(self) -> &'static str {
        match self {
            Self::Response => "response",
            Self::LlmFailed => "llm_failed",
        }
    }
}

/// What became of a message at one service: the `outcome` label of `colloquy_messages_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageOutcome {
    /// Gateway: the broker acknowledged it and the client was acked.
    Acked,
    /// Gateway: the broker did not take it; the client got `unavailable`.
    Unavailable,
    /// Gateway: an answer or failure written to a socket. Relay: stored in an inbox.
    Delivered,
    /// Gateway refusals, before the broker (the client got an error frame).
    Invalid,
    TooLarge,
    RateLimited,
    TooManyInFlight,
    TooManyResumes,
    /// ai-consumer: answered.
    Answered,
    /// ai-consumer: the user got `llm_failed`.
    LlmFailed,
    /// ai-consumer: a redelivery of a message already handled, skipped.
    Duplicate,
    /// ai-consumer: a resend of an answered message id; the stored answer went again.
    Repeated,
    /// ai-consumer: nothing could be written to `responses` for good.
    Undeliverable,
    /// ai-consumer: shutdown interrupted it; it is redelivered.
    Abandoned,
    /// ai-consumer: handling it panicked; the user is told it failed.
    Panicked,
    /// ai-consumer, relay: an unreadable or refused record, sent to the dead-letter topic.
    DeadLettered,
    /// Relay: a streamed delta published.
    Delta,
}

impl LabelValue for MessageOutcome {
    const ALL: &'static [Self] = &[
        Self::Acked,
        Self::Unavailable,
        Self::Delivered,
        Self::Invalid,
        Self::TooLarge,
        Self::RateLimited,
        Self::TooManyInFlight,
        Self::TooManyResumes,
        Self::Answered,
        Self::LlmFailed,
        Self::Duplicate,
        Self::Repeated,
        Self::Undeliverable,
        Self::Abandoned,
        Self::Panicked,
        Self::DeadLettered,
        Self::Delta,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Acked => "acked",
            Self::Unavailable => "unavailable",
            Self::Delivered => "delivered",
            Self::Invalid => "invalid",
            Self::TooLarge => "too_large",
            Self::RateLimited => "rate_limited",
            Self::TooManyInFlight => "too_many_in_flight",
            Self::TooManyResumes => "too_many_resumes",
            Self::Answered => "answered",
            Self::LlmFailed => "llm_failed",
            Self::Duplicate => "duplicate",
            Self::Repeated => "repeated",
            Self::Undeliverable => "undeliverable",
            Self::Abandoned => "abandoned",
            Self::Panicked => "panicked",
            Self::DeadLettered => "dead_lettered",
            Self::Delta => "delta",
        }
    }

    fn emitted_by(self) -> Option<&'static [&'static str]> {
        Some(match self {
            Self::Acked
            | Self::Unavailable
            | Self::Invalid
            | Self::TooLarge
            | Self::RateLimited
            | Self::TooManyInFlight
            | Self::TooManyResumes => &[GATEWAY],
            Self::Delivered => &[GATEWAY, RELAY],
            Self::Answered
            | Self::LlmFailed
            | Self::Duplicate
            | Self::Repeated
            | Self::Undeliverable
            | Self::Abandoned
            | Self::Panicked => &[AI_CONSUMER],
            Self::DeadLettered => &[AI_CONSUMER, RELAY],
            Self::Delta => &[RELAY],
        })
    }
}

/// Why a socket was refused or closed by policy: the `reason` label of
/// `colloquy_connections_refused_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefusedReason {
    /// A missing, bad or expired token, or a bad userid.
    Auth,
    /// The `Origin` is not allowed.
    Origin,
    /// The user holds the most sockets allowed.
    TooManyConnections,
    /// The user's deliveries cannot be subscribed or positioned (Redis down).
    DeliveriesUnavailable,
    /// A frame above the size limit.
    FrameTooLarge,
}

impl LabelValue for RefusedReason {
    const ALL: &'static [Self] = &[
        Self::Auth,
        Self::Origin,
        Self::TooManyConnections,
        Self::DeliveriesUnavailable,
        Self::FrameTooLarge,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Auth => "auth",
            Self::Origin => "origin",
            Self::TooManyConnections => "too_many_connections",
            Self::DeliveriesUnavailable => "deliveries_unavailable",
            Self::FrameTooLarge => "frame_too_large",
        }
    }
}

/// The status class of one LLM HTTP attempt: the `status` label of `colloquy_llm_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LlmStatus {
    Success,
    TooManyRequests,
    ClientError,
    ServerError,
    /// 1xx or 3xx.
    Other,
    Timeout,
    Transport,
}

impl LlmStatus {
    /// The class of an HTTP status code.
    #[must_use]
    pub fn of(code: u16) -> Self {
        match code {
            200..=299 => Self::Success,
            429 => Self::TooManyRequests,
            400..=499 => Self::ClientError,
            500..=599 => Self::ServerError,
            _ => Self::Other,
        }
    }
}

impl LabelValue for LlmStatus {
    const ALL: &'static [Self] = &[
        Self::Success,
        Self::TooManyRequests,
        Self::ClientError,
        Self::ServerError,
        Self::Other,
        Self::Timeout,
        Self::Transport,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Success => "2xx",
            Self::TooManyRequests => "429",
            Self::ClientError => "4xx",
            Self::ServerError => "5xx",
            Self::Other => "other",
            Self::Timeout => "timeout",
            Self::Transport => "transport",
        }
    }
}

/// Why an LLM attempt is retried: the `reason` label of `colloquy_llm_retries_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetryReason {
    TooManyRequests,
    /// 408 or 409.
    RetryableClientError,
    ServerError,
    Timeout,
    Transport,
    /// An unreadable answer body.
    BadBody,
    /// An error object inside the event stream.
    StreamError,
    /// The stream broke or ended before `[DONE]`.
    Stream,
}

impl LabelValue for RetryReason {
    const ALL: &'static [Self] = &[
        Self::TooManyRequests,
        Self::RetryableClientError,
        Self::ServerError,
        Self::Timeout,
        Self::Transport,
        Self::BadBody,
        Self::StreamError,
        Self::Stream,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::TooManyRequests => "429",
            Self::RetryableClientError => "4xx_retryable",
            Self::ServerError => "5xx",
            Self::Timeout => "timeout",
            Self::Transport => "transport",
            Self::BadBody => "bad_body",
            Self::StreamError => "stream_error",
            Self::Stream => "stream",
        }
    }
}

/// Why an LLM call failed for good: the `class` label of `colloquy_llm_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LlmErrorClass {
    /// Every attempt failed with a retryable error.
    Exhausted,
    /// A 429 saying the account has no quota left.
    InsufficientQuota,
    /// 400.
    BadRequest,
    /// 401 or 403.
    Auth,
    /// Any other 4xx.
    ClientError,
}

impl LabelValue for LlmErrorClass {
    const ALL: &'static [Self] = &[
        Self::Exhausted,
        Self::InsufficientQuota,
        Self::BadRequest,
        Self::Auth,
        Self::ClientError,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Exhausted => "exhausted",
            Self::InsufficientQuota => "insufficient_quota",
            Self::BadRequest => "bad_request",
            Self::Auth => "auth",
            Self::ClientError => "client_error",
        }
    }
}

/// The `kind` label of `colloquy_llm_tokens_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenKind {
    Prompt,
    Completion,
}

impl LabelValue for TokenKind {
    const ALL: &'static [Self] = &[Self::Prompt, Self::Completion];

    fn as_str(self) -> &'static str {
        match self {
            Self::Prompt => "prompt",
            Self::Completion => "completion",
        }
    }
}

/// A Redis operation that can fail: the `op` label of `colloquy_redis_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RedisOp {
    /// Gateway: recording an acked message; relay: reading the audit.
    Audit,
    /// Gateway: subscribing a user's channel (also again after a reconnect).
    Subscribe,
    Unsubscribe,
    /// Gateway: the shared rate-limit script (the local limiter takes over).
    RateLimit,
    /// Gateway: reading an inbox page for a replay.
    Replay,
    /// ai-consumer: claiming a message (its lease).
    Claim,
    /// ai-consumer: recording a message's outcome on its claim.
    Complete,
    /// ai-consumer: renewing a lease while the LLM answers.
    Renew,
    /// ai-consumer: reading a stored answer for a resend.
    StoredAnswer,
    /// Relay: the delivery script.
    Deliver,
}

impl LabelValue for RedisOp {
    const ALL: &'static [Self] = &[
        Self::Audit,
        Self::Subscribe,
        Self::Unsubscribe,
        Self::RateLimit,
        Self::Replay,
        Self::Claim,
        Self::Complete,
        Self::Renew,
        Self::StoredAnswer,
        Self::Deliver,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Audit => "audit",
            Self::Subscribe => "subscribe",
            Self::Unsubscribe => "unsubscribe",
            Self::RateLimit => "rate_limit",
            Self::Replay => "replay",
            Self::Claim => "claim",
            Self::Complete => "complete",
            Self::Renew => "renew",
            Self::StoredAnswer => "stored_answer",
            Self::Deliver => "deliver",
        }
    }

    fn emitted_by(self) -> Option<&'static [&'static str]> {
        Some(match self {
            Self::Audit => &[GATEWAY, RELAY],
            Self::Subscribe | Self::Unsubscribe | Self::RateLimit | Self::Replay => &[GATEWAY],
            Self::Claim | Self::Complete | Self::Renew | Self::StoredAnswer => &[AI_CONSUMER],
            Self::Deliver => &[RELAY],
        })
    }
}

/// A Kafka operation that can fail: the `op` label of `colloquy_kafka_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KafkaOp {
    /// A message (gateway) or a final answer (ai-consumer).
    Produce,
    /// A streamed delta that could not be queued (dropped: the final record has it all).
    ProduceDelta,
    /// A dead letter.
    Dlq,
    Consume,
    /// An offset commit.
    Commit,
}

impl LabelValue for KafkaOp {
    const ALL: &'static [Self] = &[
        Self::Produce,
        Self::ProduceDelta,
        Self::Dlq,
        Self::Consume,
        Self::Commit,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Produce => "produce",
            Self::ProduceDelta => "produce_delta",
            Self::Dlq => "dlq",
            Self::Consume => "consume",
            Self::Commit => "commit",
        }
    }

    fn emitted_by(self) -> Option<&'static [&'static str]> {
        Some(match self {
            Self::Produce => &[GATEWAY, AI_CONSUMER],
            Self::ProduceDelta => &[AI_CONSUMER],
            Self::Dlq | Self::Consume | Self::Commit => &[AI_CONSUMER, RELAY],
        })
    }
}

/// What started an inbox replay: the `reason` label of `colloquy_replayed_deliveries_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReplayReason {
    /// The client asked (`resume` or `?after=`).
    Resume,
    /// The gateway may have missed live deliveries (Redis reconnect, a slow socket).
    Resync,
}

impl LabelValue for ReplayReason {
    const ALL: &'static [Self] = &[Self::Resume, Self::Resync];

    fn as_str(self) -> &'static str {
        match self {
            Self::Resume => "resume",
            Self::Resync => "resync",
        }
    }
}

/// How a synthetic probe ended: the `outcome` label of `colloquy_probes_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProbeOutcome {
    /// The answer came before the deadline.
    Success,
    /// The edge could not be reached: token request or upgrade failed at the transport or with a 5xx.
    ConnectFailed,
    /// The message was not acked in time, or was refused (`unavailable`, `rate_limited`, ...).
    NoAck,
    /// Acked, but no answer before the deadline, or an `llm_failed` instead of an answer.
    NoAnswer,
    /// Anything else: the token refused (4xx), the socket closed mid-probe, a malformed frame.
    Error,
}

impl LabelValue for ProbeOutcome {
    const ALL: &'static [Self] = &[
        Self::Success,
        Self::ConnectFailed,
        Self::NoAck,
        Self::NoAnswer,
        Self::Error,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::ConnectFailed => "connect_failed",
            Self::NoAck => "no_ack",
            Self::NoAnswer => "no_answer",
            Self::Error => "error",
        }
    }
}

/// A timed point of a probe: the `stage` label of `colloquy_probe_latency_seconds`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProbeStage {
    Ack,
    FirstDelta,
    Answer,
}

impl LabelValue for ProbeStage {
    const ALL: &'static [Self] = &[Self::Ack, Self::FirstDelta, Self::Answer];

    fn as_str(self) -> &'static str {
        match self {
            Self::Ack => "ack",
            Self::FirstDelta => "first_delta",
            Self::Answer => "answer",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unique<L: LabelValue>() {
        let values = all::<L>();
        let set: std::collections::HashSet<_> = values.iter().collect();
        assert_eq!(set.len(), values.len(), "{values:?}");
    }

    #[test]
    fn values_are_unique_per_label() {
        unique::<Stage>();
        unique::<E2eOutcome>();
        unique::<MessageOutcome>();
        unique::<RefusedReason>();
        unique::<LlmStatus>();
        unique::<RetryReason>();
        unique::<LlmErrorClass>();
        unique::<TokenKind>();
        unique::<RedisOp>();
        unique::<KafkaOp>();
        unique::<ReplayReason>();
        unique::<ProbeOutcome>();
        unique::<ProbeStage>();
    }

    #[test]
    fn status_classes() {
        assert_eq!(LlmStatus::of(200), LlmStatus::Success);
        assert_eq!(LlmStatus::of(429), LlmStatus::TooManyRequests);
        assert_eq!(LlmStatus::of(404), LlmStatus::ClientError);
        assert_eq!(LlmStatus::of(503), LlmStatus::ServerError);
        assert_eq!(LlmStatus::of(302), LlmStatus::Other);
    }

    #[test]
    fn per_service_values() {
        assert_eq!(zero_values::<KafkaOp>(GATEWAY), ["produce"]);
        assert_eq!(
            zero_values::<MessageOutcome>(RELAY),
            ["delivered", "dead_lettered", "delta"]
        );
        assert_eq!(zero_values::<Stage>(RELAY).len(), Stage::ALL.len());
    }
}
