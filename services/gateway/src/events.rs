//! The gateway's events, each logged and counted together.
//!
//! One type per event: its `emit()` writes the log line (with the user, message and error an
//! operator needs) and updates the metrics of the contract. Label values come from the enums
//! of `colloquy_core::labels`; the `service` label is [`SERVICE`].

use std::error::Error;
use std::time::Duration;

use colloquy_core::events::ErrorChain;
use colloquy_core::labels::{
    E2eOutcome, LabelValue, MessageOutcome, RedisOp, RefusedReason, ReplayReason, Stage, service,
};
use colloquy_core::metrics as m;
use colloquy_core::records::{Delivery, ResponseBody};
use colloquy_core::wire::EventId;

use crate::connection::Refusal;

/// The `service` label of everything the gateway emits.
pub const SERVICE: &str = service::GATEWAY;

fn messages(outcome: MessageOutcome, n: u64) {
    metrics::counter!(m::MESSAGES, "service" => SERVICE, "outcome" => outcome.as_str())
        .increment(n);
}

fn redis_errors(op: RedisOp, n: u64) {
    metrics::counter!(m::REDIS_ERRORS, "service" => SERVICE, "op" => op.as_str()).increment(n);
}

fn seconds(ms: i64) -> f64 {
    ms.max(0) as f64 / 1000.0
}

impl From<Refusal> for MessageOutcome {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Invalid => Self::Invalid,
            Refusal::TooLarge => Self::TooLarge,
            Refusal::RateLimited => Self::RateLimited,
            Refusal::TooManyInFlight => Self::TooManyInFlight,
            Refusal::TooManyResumes => Self::TooManyResumes,
        }
    }
}

/// A WebSocket upgrade or session was refused or closed by policy.
#[derive(Debug)]
pub struct ConnectionRefused<'a> {
    /// Unknown when the token or userid was refused.
    pub userid: Option<&'a str>,
    pub reason: RefusedReason,
    /// What the client is told (the close reason).
    pub detail: &'a str,
}

impl ConnectionRefused<'_> {
    pub fn emit(&self) {
        let (userid, reason, detail) = (self.userid, self.reason.as_str(), self.detail);
        match self.reason {
            // Bad tokens and origins are the client's business, and may come by the thousand.
            RefusedReason::Auth | RefusedReason::Origin => {
                tracing::debug!(userid, reason, detail, "connection refused");
            }
            RefusedReason::TooManyConnections
            | RefusedReason::DeliveriesUnavailable
            | RefusedReason::FrameTooLarge => {
                tracing::info!(userid, reason, detail, "connection refused");
            }
        }
        metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => reason).increment(1);
    }
}

/// A session is open: subscribed, its stream position read.
#[derive(Debug)]
pub struct SessionOpened<'a> {
    pub userid: &'a str,
    pub conn_id: u64,
    pub position: &'a EventId,
}

impl SessionOpened<'_> {
    pub fn emit(&self) {
        tracing::debug!(userid = self.userid, conn_id = self.conn_id, position = %self.position, "session open");
        metrics::gauge!(m::CONNECTIONS).increment(1.0);
    }
}

/// An open session ended.
#[derive(Debug)]
pub struct SessionClosed<'a> {
    pub userid: &'a str,
    pub conn_id: u64,
}

impl SessionClosed<'_> {
    pub fn emit(&self) {
        tracing::debug!(
            userid = self.userid,
            conn_id = self.conn_id,
            "session closed"
        );
        metrics::gauge!(m::CONNECTIONS).decrement(1.0);
    }
}

/// A client frame was refused with an error frame, before anything reached the broker.
#[derive(Debug)]
pub struct MessageRefused<'a> {
    pub userid: &'a str,
    pub msg_id: Option<&'a str>,
    pub refusal: Refusal,
}

impl MessageRefused<'_> {
    pub fn emit(&self) {
        let outcome = MessageOutcome::from(self.refusal);
        tracing::debug!(
            userid = self.userid,
            msg_id = self.msg_id,
            outcome = outcome.as_str(),
            "message refused"
        );
        messages(outcome, 1);
    }
}

/// The broker acknowledged a message.
#[derive(Debug)]
pub struct MessageProduced<'a> {
    pub msg_id: &'a str,
    pub latency: Duration,
}

impl MessageProduced<'_> {
    pub fn emit(&self) {
        tracing::trace!(
            msg_id = self.msg_id,
            latency_ms = self.latency.as_millis() as u64,
            "message produced"
        );
        metrics::histogram!(m::STAGE_LATENCY, "stage" => Stage::Produce.as_str())
            .record(self.latency.as_secs_f64());
    }
}

/// The broker did not take a message; the client is told `unavailable`.
#[derive(Debug)]
pub struct MessageNotProduced<'a> {
    pub userid: &'a str,
    pub msg_id: &'a str,
    pub error: &'a (dyn Error + 'a),
}

impl MessageNotProduced<'_> {
    pub fn emit(&self) {
        tracing::warn!(
            userid = self.userid,
            msg_id = self.msg_id,
            error = %ErrorChain(self.error),
            "message not accepted by Kafka"
        );
        colloquy_core::events::KafkaFailed {
            service: SERVICE,
            op: colloquy_core::labels::KafkaOp::Produce,
        }
        .count();
    }
}

/// The client was told how producing its message ended: `ack` or `unavailable`.
#[derive(Debug)]
pub struct MessageAnswered<'a> {
    pub userid: &'a str,
    pub msg_id: Option<&'a str>,
    pub acked: bool,
}

impl MessageAnswered<'_> {
    pub fn emit(&self) {
        let outcome = if self.acked {
            MessageOutcome::Acked
        } else {
            MessageOutcome::Unavailable
        };
        tracing::trace!(
            userid = self.userid,
            msg_id = self.msg_id,
            outcome = outcome.as_str(),
            "client told"
        );
        messages(outcome, 1);
    }
}

/// A delivery's frame was handed to a socket: the first delta, or the answer (or failure)
/// that ends the message's trip. The time to first text counts the first delta, or the answer
/// itself when it came whole (no delta preceded it).
#[derive(Debug)]
pub struct DeliveryWritten<'a> {
    pub delivery: &'a Delivery,
    pub now_ms: i64,
}

impl DeliveryWritten<'_> {
    pub fn emit(&self) {
        let d = self.delivery;
        let since_receive = seconds(self.now_ms - d.received_at_ms);
        let outcome = match &d.body {
            ResponseBody::Delta { seq: 0, .. } => {
                metrics::histogram!(m::FIRST_DELTA_LATENCY).record(since_receive);
                return;
            }
            ResponseBody::Delta { .. } => return,
            ResponseBody::Final { whole, .. } => {
                if *whole {
                    metrics::histogram!(m::FIRST_DELTA_LATENCY).record(since_receive);
                }
                E2eOutcome::Response
            }
            ResponseBody::Failed { .. } => E2eOutcome::LlmFailed,
        };
        tracing::debug!(
            userid = %d.userid,
            msg_id = %d.msg_id,
            event_id = d.event_id.as_deref(),
            outcome = outcome.as_str(),
            e2e_ms = (self.now_ms - d.received_at_ms).max(0),
            "delivered"
        );
        metrics::histogram!(m::E2E_LATENCY, "outcome" => outcome.as_str()).record(since_receive);
        metrics::histogram!(m::STAGE_LATENCY, "stage" => Stage::Fanout.as_str())
            .record(seconds(self.now_ms - d.relayed_at_ms));
        messages(MessageOutcome::Delivered, 1);
    }
}

/// Deliveries a connection had already seen were dropped.
#[derive(Debug)]
pub struct DuplicatesSkipped<'a> {
    pub userid: &'a str,
    pub count: u64,
}

impl DuplicatesSkipped<'_> {
    pub fn emit(&self) {
        tracing::debug!(
            userid = self.userid,
            count = self.count,
            "duplicate deliveries skipped"
        );
        metrics::counter!(m::DUPLICATES, "service" => SERVICE).increment(self.count);
    }
}

/// An inbox replay waits for a free slot.
#[derive(Debug)]
pub struct ReplayQueued<'a> {
    pub userid: &'a str,
}

impl ReplayQueued<'_> {
    pub fn emit(&self) {
        tracing::debug!(userid = self.userid, "inbox replay waits for a slot");
        metrics::counter!(m::REPLAYS_QUEUED).increment(1);
    }
}

/// An inbox page was read for a replay.
#[derive(Debug)]
pub struct InboxReplayed<'a> {
    pub userid: &'a str,
    pub reason: ReplayReason,
    pub entries: usize,
}

impl InboxReplayed<'_> {
    pub fn emit(&self) {
        tracing::debug!(
            userid = self.userid,
            reason = self.reason.as_str(),
            entries = self.entries,
            "inbox replayed"
        );
        metrics::counter!(m::REPLAYED, "reason" => self.reason.as_str())
            .increment(self.entries as u64);
    }
}

/// Reading an inbox page failed; the connection retries after a backoff.
#[derive(Debug)]
pub struct ReplayFailed<'a> {
    pub userid: &'a str,
    pub attempt: u32,
    pub error: &'a (dyn Error + 'a),
}

impl ReplayFailed<'_> {
    pub fn emit(&self) {
        tracing::warn!(
            userid = self.userid,
            attempt = self.attempt,
            error = %ErrorChain(self.error),
            "inbox replay failed; retrying"
        );
        redis_errors(RedisOp::Replay, 1);
    }
}

/// Subscribing a user's channel failed; the socket is refused.
#[derive(Debug)]
pub struct SubscribeFailed<'a> {
    pub userid: &'a str,
    pub error: &'a str,
}

impl SubscribeFailed<'_> {
    pub fn emit(&self) {
        tracing::warn!(userid = self.userid, error = self.error, "subscribe failed");
        redis_errors(RedisOp::Subscribe, 1);
    }
}

/// Subscribing every channel again after a Redis reconnect failed; it is retried.
#[derive(Debug)]
pub struct ResubscribeFailed<'a> {
    pub attempts: u32,
    pub error: &'a str,
}

impl ResubscribeFailed<'_> {
    pub fn emit(&self) {
        tracing::warn!(
            attempts = self.attempts,
            error = self.error,
            "re-subscribe after reconnect failed; retrying"
        );
        redis_errors(RedisOp::Subscribe, 1);
    }
}

/// Unsubscribing a user's channel failed (its deliveries keep arriving, and are dropped).
#[derive(Debug)]
pub struct UnsubscribeFailed<'a> {
    pub userid: &'a str,
    pub error: &'a str,
}

impl UnsubscribeFailed<'_> {
    pub fn emit(&self) {
        tracing::warn!(
            userid = self.userid,
            error = self.error,
            "unsubscribe failed"
        );
        redis_errors(RedisOp::Unsubscribe, 1);
    }
}

/// The shared rate-limit script failed; the local limiter decides for a while.
#[derive(Debug)]
pub struct RateLimitFallback<'a> {
    pub userid: &'a str,
    pub error: &'a (dyn Error + 'a),
}

impl RateLimitFallback<'_> {
    pub fn emit(&self) {
        tracing::warn!(
            userid = self.userid,
            error = %ErrorChain(self.error),
            "rate limit script failed; using the local limiter"
        );
        redis_errors(RedisOp::RateLimit, 1);
    }
}

/// Acked messages were lost to the unanswered-message audit (its queue was full, or Redis
/// failed): the audit watches delivery, it is not part of it.
#[derive(Debug)]
pub struct AuditEntriesLost<'a> {
    pub entries: usize,
    /// `None` when the queue was full.
    pub error: Option<&'a (dyn Error + 'a)>,
}

impl AuditEntriesLost<'_> {
    pub fn emit(&self) {
        match self.error {
            Some(e) => {
                tracing::debug!(entries = self.entries, error = %ErrorChain(e), "audit entries not written")
            }
            None => tracing::debug!(entries = self.entries, "audit queue full; entry dropped"),
        }
        redis_errors(RedisOp::Audit, self.entries as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use colloquy_core::labels::zero_values;

    #[test]
    fn every_refusal_is_an_outcome_the_gateway_registers() {
        let registered = zero_values::<MessageOutcome>(SERVICE);
        for r in [
            Refusal::Invalid,
            Refusal::TooLarge,
            Refusal::RateLimited,
            Refusal::TooManyInFlight,
            Refusal::TooManyResumes,
        ] {
            let v = MessageOutcome::from(r).as_str();
            assert!(registered.contains(&v), "{v}");
        }
    }

    /// How many first texts writing `body`'s frame records, through a recorder of this test's
    /// own (the process-wide one is shared by every test).
    fn first_texts_written(body: ResponseBody) -> u64 {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let delivery = Delivery {
            event_id: Some("1-0".into()),
            msg_id: "m1".into(),
            userid: colloquy_core::UserId::parse("alice").unwrap(),
            received_at_ms: 1_000,
            timestamp: String::new(),
            relayed_at_ms: 1_010,
            traceparent: None,
            body,
        };
        metrics::with_local_recorder(&recorder, || {
            DeliveryWritten {
                delivery: &delivery,
                now_ms: 1_020,
            }
            .emit();
        });
        let needle = format!("{}_count ", m::FIRST_DELTA_LATENCY);
        handle
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(&needle)?.trim().parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn the_first_text_is_the_first_delta_or_an_answer_that_came_whole() {
        let answer = |whole| ResponseBody::Final {
            content: "hi".into(),
            prompt_tokens: 1,
            completion_tokens: 1,
            whole,
        };
        let delta = |seq| ResponseBody::Delta {
            seq,
            content: "h".into(),
        };
        assert_eq!(first_texts_written(delta(0)), 1);
        assert_eq!(first_texts_written(delta(1)), 0);
        assert_eq!(first_texts_written(answer(true)), 1);
        // Deltas came before it: its first delta was the first text.
        assert_eq!(first_texts_written(answer(false)), 0);
        let failed = ResponseBody::Failed {
            reason: "quota".into(),
        };
        assert_eq!(first_texts_written(failed), 0);
    }
}
