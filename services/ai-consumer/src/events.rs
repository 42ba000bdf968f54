//! The ai-consumer's events, each logged and counted together.
//!
//! One type per event: its `emit()` writes the log line (with the user, message, partition
//! and offset, and error an operator needs) and updates the metrics of the contract. Label
//! values come from the enums of `colloquy_core::labels`; the `service` label is [`SERVICE`].
//! Events of one message are emitted inside its `process` span, which carries its trace.

use std::error::Error;
use std::time::Duration;

use colloquy_core::events::{ErrorChain, KafkaFailed};
use colloquy_core::labels::{
    KafkaOp, LabelValue, LlmErrorClass, LlmStatus, MessageOutcome, RedisOp, RetryReason, Stage,
    TokenKind, service,
};
use colloquy_core::metrics as m;
use colloquy_core::retry::Class;

use crate::llm::LlmError;
use crate::worker::Handled;

/// The `service` label of everything the ai-consumer emits.
pub const SERVICE: &str = service::AI_CONSUMER;

fn messages(outcome: MessageOutcome) {
    metrics::counter!(m::MESSAGES, "service" => SERVICE, "outcome" => outcome.as_str())
        .increment(1);
}

fn redis_errors(op: RedisOp) {
    metrics::counter!(m::REDIS_ERRORS, "service" => SERVICE, "op" => op.as_str()).increment(1);
}

impl From<Handled> for MessageOutcome {
    fn from(h: Handled) -> Self {
        match h {
            Handled::Answered => Self::Answered,
            Handled::Failed => Self::LlmFailed,
            Handled::Duplicate => Self::Duplicate,
            Handled::Repeated => Self::Repeated,
            Handled::Undeliverable => Self::Undeliverable,
            Handled::Abandoned => Self::Abandoned,
        }
    }
}

/// A message left its queue to be answered.
#[derive(Debug)]
pub struct MessageDequeued {
    /// From its enqueue (the gateway's produce) to now.
    pub waited: Duration,
}

impl MessageDequeued {
    pub fn emit(&self) {
        tracing::trace!(
            waited_ms = self.waited.as_millis() as u64,
            "message dequeued"
        );
        metrics::histogram!(m::STAGE_LATENCY, "stage" => Stage::QueueWait.as_str())
            .record(self.waited.as_secs_f64());
    }
}

/// A message was handled, however it ended.
#[derive(Debug)]
pub struct MessageHandled<'a> {
    pub userid: &'a str,
    pub msg_id: &'a str,
    pub handled: Handled,
}

impl MessageHandled<'_> {
    pub fn emit(&self) {
        let outcome = MessageOutcome::from(self.handled);
        tracing::debug!(
            userid = self.userid,
            msg_id = self.msg_id,
            outcome = outcome.as_str(),
            "message handled"
        );
        messages(outcome);
    }
}

/// A consumed record could not be read; it goes to the dead-letter topic.
#[derive(Debug)]
pub struct RecordUnreadable<'a> {
    pub partition: i32,
    pub offset: i64,
    pub reason: &'a str,
}

impl RecordUnreadable<'_> {
    pub fn emit(&self) {
        tracing::warn!(
            partition = self.partition,
            offset = self.offset,
            reason = self.reason,
            "unreadable record; dead-lettering it"
        );
        messages(MessageOutcome::DeadLettered);
    }
}

/// An LLM call in flight (its retries included): counted in the gauge while it lives, so a
/// call that ends by a panic or cancellation leaves the gauge too.
#[derive(Debug)]
pub struct InFlight(());

impl InFlight {
    #[must_use]
    pub fn enter() -> Self {
        metrics::gauge!(m::LLM_IN_FLIGHT).increment(1.0);
        Self(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(m::LLM_IN_FLIGHT).decrement(1.0);
    }
}

/// Answering a message panicked; the user is told it failed.
#[derive(Debug)]
pub struct AnswerPanicked<'a> {
    pub userid: &'a str,
    pub msg_id: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub panic: &'a str,
}

impl AnswerPanicked<'_> {
    pub fn emit(&self) {
        tracing::error!(
            userid = self.userid,
            msg_id = self.msg_id,
            partition = self.partition,
            offset = self.offset,
            panic = self.panic,
            "answering a message panicked; the user is told it failed"
        );
        messages(MessageOutcome::Panicked);
    }
}

/// A redelivered message was already handled: skipped.
#[derive(Debug)]
pub struct DuplicateSkipped<'a> {
    pub userid: &'a str,
    pub msg_id: &'a str,
}

impl DuplicateSkipped<'_> {
    pub fn emit(&self) {
        tracing::debug!(
            userid = self.userid,
            msg_id = self.msg_id,
            "message already handled; redelivery skipped"
        );
        metrics::counter!(m::DUPLICATES, "service" => SERVICE).increment(1);
    }
}

/// A Redis operation failed once; the shared retry policy decides what follows. Logged on
/// the first attempt, every 20th and when permanent, so an outage does not flood the log.
#[derive(Debug)]
pub struct RedisFailed<'a> {
    pub op: RedisOp,
    pub attempt: u32,
    pub class: Class,
    pub error: &'a (dyn Error + 'a),
}

impl RedisFailed<'_> {
    pub fn emit(&self) {
        if self.class == Class::Permanent || self.attempt == 1 || self.attempt.is_multiple_of(20) {
            tracing::warn!(
                op = self.op.as_str(),
                attempt = self.attempt,
                class = ?self.class,
                error = %ErrorChain(self.error),
                "Redis failed"
            );
        }
        redis_errors(self.op);
    }
}

/// Renewing a message's lease failed (it is tried again a third of a lease later).
#[derive(Debug)]
pub struct LeaseRenewFailed<'a> {
    pub userid: &'a str,
    pub msg_id: &'a str,
    pub error: &'a (dyn Error + 'a),
}

impl LeaseRenewFailed<'_> {
    pub fn emit(&self) {
        tracing::warn!(
            userid = self.userid,
            msg_id = self.msg_id,
            error = %ErrorChain(self.error),
            "lease renewal failed"
        );
        redis_errors(RedisOp::Renew);
    }
}

/// The LLM call failed for good: the user gets `llm_failed`, the record goes to the DLQ.
#[derive(Debug)]
pub struct AnswerFailed<'a> {
    pub userid: &'a str,
    pub msg_id: &'a str,
    pub error: &'a LlmError,
}

impl AnswerFailed<'_> {
    pub fn emit(&self) {
        let class = self.error.class();
        tracing::warn!(
            userid = self.userid,
            msg_id = self.msg_id,
            class = class.as_str(),
            error = %ErrorChain(self.error),
            "answer failed; user gets llm_failed, record goes to the DLQ"
        );
        metrics::counter!(m::LLM_ERRORS, "class" => class.as_str()).increment(1);
    }
}

/// A streamed delta could not be queued: dropped (the final record carries the whole answer).
#[derive(Debug)]
pub struct DeltaDropped<'a> {
    pub msg_id: &'a str,
    pub seq: u32,
    pub error: &'a (dyn Error + 'a),
}

impl DeltaDropped<'_> {
    pub fn emit(&self) {
        tracing::debug!(msg_id = self.msg_id, seq = self.seq, error = %ErrorChain(self.error), "delta not queued");
        KafkaFailed {
            service: SERVICE,
            op: KafkaOp::ProduceDelta,
        }
        .count();
    }
}

/// One LLM HTTP attempt got an answer (or none: a timeout, a transport error).
#[derive(Clone, Copy, Debug)]
pub struct LlmAttempted {
    pub status: LlmStatus,
}

impl LlmAttempted {
    pub fn emit(self) {
        tracing::trace!(status = self.status.as_str(), "LLM attempt");
        metrics::counter!(m::LLM_REQUESTS, "status" => self.status.as_str()).increment(1);
    }
}

/// The LLM answered; `latency` is of the attempt that did.
#[derive(Clone, Copy, Debug)]
pub struct LlmAnswered {
    pub attempts: u32,
    pub latency: Duration,
}

impl LlmAnswered {
    pub fn emit(self) {
        tracing::debug!(
            attempts = self.attempts,
            latency_ms = self.latency.as_millis() as u64,
            "LLM answered"
        );
        metrics::histogram!(m::STAGE_LATENCY, "stage" => Stage::Llm.as_str())
            .record(self.latency.as_secs_f64());
    }
}

/// An LLM attempt failed in a way worth retrying after `delay`.
#[derive(Debug)]
pub struct LlmRetrying<'a> {
    pub attempt: u32,
    pub reason: RetryReason,
    pub detail: &'a str,
    pub delay: Duration,
}

impl LlmRetrying<'_> {
    pub fn emit(&self) {
        tracing::info!(
            attempt = self.attempt,
            reason = self.reason.as_str(),
            detail = self.detail,
            delay_ms = self.delay.as_millis() as u64,
            "LLM call will be retried"
        );
        metrics::counter!(m::LLM_RETRIES, "reason" => self.reason.as_str()).increment(1);
    }
}

/// The LLM refused the request in a way no retry fixes (counted once the call's failure is
/// handled: [`AnswerFailed`]).
#[derive(Debug)]
pub struct LlmRefused<'a> {
    pub attempt: u32,
    pub class: LlmErrorClass,
    pub message: &'a str,
}

impl LlmRefused<'_> {
    pub fn emit(&self) {
        tracing::warn!(
            attempt = self.attempt,
            class = self.class.as_str(),
            message = self.message,
            "LLM call failed for good"
        );
    }
}

/// Tokens the LLM reported for an answer (0 and 0 when it reported none).
#[derive(Clone, Copy, Debug)]
pub struct TokensUsed {
    pub prompt: u32,
    pub completion: u32,
}

impl TokensUsed {
    pub fn emit(self) {
        for (kind, n) in [
            (TokenKind::Prompt, self.prompt),
            (TokenKind::Completion, self.completion),
        ] {
            metrics::counter!(m::LLM_TOKENS, "kind" => kind.as_str()).increment(u64::from(n));
        }
    }
}
