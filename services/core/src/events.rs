//! The events the shared Kafka plumbing emits, each logged and counted together.
//!
//! One type per event (vector's `internal_events` shape): its `emit()` writes the log line an
//! operator needs and updates the metric of the contract, so the two never drift apart. The
//! services' own events live in their `events.rs`; the `service` label comes from the
//! service's name, given once when its clients are built.

use std::error::Error;
use std::fmt;
use std::time::Duration;

use crate::labels::{KafkaOp, LabelValue};
use crate::metrics as m;
use crate::retry::Class;

/// Displays an error with its cause chain (`outer: cause: root`), skipping a cause whose text
/// the message above it already includes.
pub struct ErrorChain<'a>(pub &'a (dyn Error + 'a));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.0.to_string();
        f.write_str(&shown)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            if !shown.contains(&text) {
                write!(f, ": {text}")?;
                shown = text;
            }
            source = cause.source();
        }
        Ok(())
    }
}

/// A record was written to a dead-letter topic.
#[derive(Debug)]
pub struct DeadLettered<'a> {
    pub service: &'static str,
    pub topic: &'a str,
    pub reason: &'a str,
}

impl DeadLettered<'_> {
    pub fn emit(&self) {
        tracing::warn!(service = self.service, topic = %self.topic, reason = %self.reason, "record dead-lettered");
        metrics::counter!(m::DLQ_WRITES, "service" => self.service, "topic" => self.topic.to_owned())
            .increment(1);
    }
}

/// A dead letter could not be written for good: the caller decides what the record becomes.
#[derive(Debug)]
pub struct DeadLetterFailed<'a> {
    pub service: &'static str,
    pub topic: &'a str,
    pub reason: &'a str,
    pub error: &'a (dyn Error + 'a),
}

impl DeadLetterFailed<'_> {
    pub fn emit(&self) {
        tracing::error!(
            service = self.service,
            topic = %self.topic,
            reason = %self.reason,
            error = %ErrorChain(self.error),
            "dead letter NOT written"
        );
    }
}

/// Producing a record failed once (it is retried unless the error is permanent).
#[derive(Debug)]
pub struct ProduceFailed<'a> {
    pub service: &'static str,
    pub topic: &'a str,
    pub op: KafkaOp,
    pub attempt: u32,
    pub class: Class,
    pub error: &'a (dyn Error + 'a),
}

impl ProduceFailed<'_> {
    pub fn emit(&self) {
        tracing::warn!(
            service = self.service,
            topic = %self.topic,
            op = self.op.as_str(),
            attempt = self.attempt,
            class = ?self.class,
            error = %ErrorChain(self.error),
            "produce failed"
        );
        KafkaFailed {
            service: self.service,
            op: self.op,
        }
        .count();
    }
}

/// Reading from the broker failed; the consume loop waits a moment and polls again.
#[derive(Debug)]
pub struct ConsumeFailed<'a> {
    pub service: &'static str,
    pub error: &'a (dyn Error + 'a),
}

impl ConsumeFailed<'_> {
    pub fn emit(&self) {
        tracing::warn!(service = self.service, error = %ErrorChain(self.error), "consume error");
        KafkaFailed {
            service: self.service,
            op: KafkaOp::Consume,
        }
        .count();
    }
}

/// An offset commit failed (auto-commit tries again with what is stored).
#[derive(Debug)]
pub struct CommitFailed<'a> {
    pub service: &'static str,
    pub error: &'a (dyn Error + 'a),
}

impl CommitFailed<'_> {
    pub fn emit(&self) {
        tracing::warn!(service = self.service, error = %ErrorChain(self.error), "offset commit failed");
        KafkaFailed {
            service: self.service,
            op: KafkaOp::Commit,
        }
        .count();
    }
}

/// A Kafka error of `op`, counted; the events above and the services' own Kafka failures
/// (a delta not queued) log it their way and count it through this.
#[derive(Clone, Copy, Debug)]
pub struct KafkaFailed {
    pub service: &'static str,
    pub op: KafkaOp,
}

impl KafkaFailed {
    pub fn count(self) {
        metrics::counter!(m::KAFKA_ERRORS, "service" => self.service, "op" => self.op.as_str())
            .increment(1);
    }
}

/// The consumer's assignment changed; it now holds `count` partitions.
#[derive(Debug)]
pub struct PartitionsAssigned {
    pub service: &'static str,
    pub count: usize,
}

impl PartitionsAssigned {
    pub fn emit(&self) {
        tracing::debug!(
            service = self.service,
            partitions = self.count,
            "assignment changed"
        );
        metrics::gauge!(m::ASSIGNED_PARTITIONS, "service" => self.service).set(self.count as f64);
    }
}

/// The client's statistics reported a partition's lag.
#[derive(Debug)]
pub struct ConsumerLag<'a> {
    pub service: &'static str,
    pub topic: &'a str,
    pub partition: i32,
    pub lag: i64,
}

impl ConsumerLag<'_> {
    pub fn emit(&self) {
        metrics::gauge!(
            m::CONSUMER_LAG,
            "service" => self.service,
            "topic" => self.topic.to_owned(),
            "partition" => self.partition.to_string()
        )
        .set(self.lag as f64);
    }
}

/// A consumer held no partitions for too long and rejoins its group.
#[derive(Debug)]
pub struct GroupRejoined {
    pub service: &'static str,
    pub empty_for: Duration,
}

impl GroupRejoined {
    pub fn emit(&self) {
        tracing::warn!(
            service = self.service,
            empty_secs = self.empty_for.as_secs(),
            "no partitions assigned for too long; rejoining the group"
        );
        metrics::counter!(m::REJOINS, "service" => self.service).increment(1);
    }
}

/// How an offset gap showed itself.
#[derive(Clone, Copy, Debug)]
pub enum GapSeen {
    /// A record arrived past the next expected offset.
    Jumped { got: i64 },
    /// Reading stalled below the partition's high watermark.
    Stalled { high_watermark: i64 },
}

/// Records of a partition were skipped by the fetch; the consumer seeks back to `seek_to`.
#[derive(Debug)]
pub struct OffsetGap<'a> {
    pub service: &'static str,
    pub topic: &'a str,
    pub partition: i32,
    pub expected: i64,
    pub seen: GapSeen,
    pub seek_to: i64,
}

impl OffsetGap<'_> {
    pub fn emit(&self) {
        let (service, topic, partition, expected, seek_to) = (
            self.service,
            self.topic,
            self.partition,
            self.expected,
            self.seek_to,
        );
        match self.seen {
            GapSeen::Jumped { got } => tracing::warn!(
                service,
                topic,
                partition,
                expected,
                got,
                seek_to,
                "offset gap: records skipped by the fetch; seeking back"
            ),
            GapSeen::Stalled { high_watermark } => tracing::warn!(
                service,
                topic,
                partition,
                expected,
                high_watermark,
                seek_to,
                "offset gap: reading stalled below the high watermark; seeking back"
            ),
        }
        metrics::counter!(m::OFFSET_GAPS, "service" => service, "topic" => topic.to_owned())
            .increment(1);
    }
}

/// An offset gap that repeated seeks did not heal: the records are gone from the broker and the
/// consumer goes on past them.
#[derive(Debug)]
pub struct RecordsLost<'a> {
    pub service: &'static str,
    pub topic: &'a str,
    pub partition: i32,
    /// The first offset that never came.
    pub expected: i64,
    /// How many offsets are missing.
    pub missing: i64,
}

impl RecordsLost<'_> {
    pub fn emit(&self) {
        tracing::error!(
            service = self.service,
            topic = self.topic,
            partition = self.partition,
            expected = self.expected,
            missing = self.missing,
            "offset gap persists after repeated seeks; records are gone from the broker"
        );
        metrics::counter!(m::RECORDS_LOST, "service" => self.service, "topic" => self.topic.to_owned())
            .increment(u64::try_from(self.missing).unwrap_or(0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("write failed")
        }
    }
    impl Error for Outer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn error_chain_shows_each_cause_once() {
        let e = Outer(std::io::Error::other("disk full"));
        assert_eq!(ErrorChain(&e).to_string(), "write failed: disk full");
        let io = std::io::Error::other("disk full");
        assert_eq!(ErrorChain(&io).to_string(), "disk full");
    }
}
