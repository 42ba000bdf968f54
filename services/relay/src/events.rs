//! The relay's events, each logged and counted together.
//!
//! One type per event: its `emit()` writes the log line (with the partition, offset and error
//! an operator needs) and updates the metrics of the contract. Label values come from the
//! enums of `colloquy_core::labels`; the `service` label is [`SERVICE`].

use std::error::Error;
use std::time::Duration;

use colloquy_core::events::ErrorChain;
use colloquy_core::labels::{LabelValue, MessageOutcome, RedisOp, Stage, service};
use colloquy_core::metrics as m;
use colloquy_core::retry::Class;

/// The `service` label of everything the relay emits.
pub const SERVICE: &str = service::RELAY;

fn messages(outcome: MessageOutcome, n: u64) {
    metrics::counter!(m::MESSAGES, "service" => SERVICE, "outcome" => outcome.as_str())
        .increment(n);
}

fn redis_errors(op: RedisOp) {
    metrics::counter!(m::REDIS_ERRORS, "service" => SERVICE, "op" => op.as_str()).increment(1);
}

/// Writing a batch to Redis failed; the batch is retried with the partitions paused. Logged
/// on the first failure and every 20th, so an outage does not flood the log.
#[derive(Debug)]
pub struct DeliverFailed<'a> {
    /// Failures of this batch before this one.
    pub retry: u32,
    pub records: usize,
    pub class: Class,
    pub error: &'a (dyn Error + 'a),
}

impl DeliverFailed<'_> {
    pub fn emit(&self) {
        if self.retry.is_multiple_of(20) {
            tracing::warn!(
                retry = self.retry,
                records = self.records,
                class = ?self.class,
                error = %ErrorChain(self.error),
                "Redis write failed; retrying the batch"
            );
        }
        redis_errors(RedisOp::Deliver);
    }
}

/// An answer or failure is durable in its user's inbox; `latency` is from its enqueue.
/// Emitted inside the record's `process` span.
#[derive(Clone, Copy, Debug)]
pub struct Relayed {
    pub latency: Duration,
}

impl Relayed {
    pub fn emit(self) {
        tracing::trace!(latency_ms = self.latency.as_millis() as u64, "relayed");
        metrics::histogram!(m::STAGE_LATENCY, "stage" => Stage::Relay.as_str())
            .record(self.latency.as_secs_f64());
    }
}

/// A batch was written: new durable deliveries, published deltas, and repeated deliveries
/// the marker key turned into no-ops.
#[derive(Clone, Copy, Debug)]
pub struct BatchRelayed {
    pub delivered: u64,
    pub deltas: u64,
    pub duplicates: u64,
}

impl BatchRelayed {
    pub fn emit(self) {
        tracing::trace!(
            delivered = self.delivered,
            deltas = self.deltas,
            duplicates = self.duplicates,
            "batch relayed"
        );
        messages(MessageOutcome::Delivered, self.delivered);
        messages(MessageOutcome::Delta, self.deltas);
        if self.duplicates > 0 {
            metrics::counter!(m::DUPLICATES, "service" => SERVICE).increment(self.duplicates);
        }
    }
}

/// A record cannot be delivered (unreadable, or refused by Redis for good): it goes to the
/// dead-letter topic.
#[derive(Debug)]
pub struct RecordDeadLettered<'a> {
    pub partition: i32,
    pub offset: i64,
    pub reason: &'a str,
}

impl RecordDeadLettered<'_> {
    pub fn emit(&self) {
        tracing::warn!(
            partition = self.partition,
            offset = self.offset,
            reason = self.reason,
            "record cannot be delivered; dead-lettering it"
        );
        messages(MessageOutcome::DeadLettered, 1);
    }
}

/// The unanswered-message audit was read.
#[derive(Clone, Copy, Debug)]
pub struct AuditRead {
    pub unanswered: u64,
    pub oldest_age: Duration,
}

impl AuditRead {
    pub fn emit(self) {
        tracing::trace!(
            unanswered = self.unanswered,
            oldest_age_secs = self.oldest_age.as_secs(),
            "audit read"
        );
        metrics::gauge!(m::UNANSWERED).set(self.unanswered as f64);
        metrics::gauge!(m::UNANSWERED_OLDEST_AGE).set(self.oldest_age.as_secs_f64());
    }
}

/// Reading the audit failed; its gauges keep their last values until the next read.
#[derive(Debug)]
pub struct AuditReadFailed<'a> {
    pub error: &'a (dyn Error + 'a),
}

impl AuditReadFailed<'_> {
    pub fn emit(&self) {
        tracing::debug!(error = %ErrorChain(self.error), "audit not read");
        redis_errors(RedisOp::Audit);
    }
}
