//! The one dead-letter writer: a record that cannot be handled goes to a `.dlq` topic with
//! the reason in a `dlq_reason` header, its key and its original headers kept.

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureProducer;
use tokio_util::sync::CancellationToken;

use crate::events::{DeadLetterFailed, DeadLettered};
use crate::kafka;
use crate::labels::KafkaOp;
use crate::metrics as m;
use crate::retry::RetryError;

/// Header carrying why a record was dead-lettered.
pub const REASON_HEADER: &str = "dlq_reason";

/// Writes dead letters of one service to one topic.
#[derive(Clone)]
pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
    service: &'static str,
    timeout: Duration,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters")
            .field("topic", &self.topic)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl DeadLetters {
    /// A writer for `service` to `topic`; registers the topic's zero series of
    /// `colloquy_dlq_writes_total`.
    #[must_use]
    pub fn new(
        producer: FutureProducer,
        topic: String,
        service: &'static str,
        timeout: Duration,
    ) -> Self {
        m::register_topic_series(m::DLQ_WRITES, service, &topic);
        Self {
            producer,
            topic,
            service,
            timeout,
        }
    }

    /// The dead-letter topic.
    #[must_use]
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Writes `payload` with `reason`; retries while the broker is unavailable.
    ///
    /// # Errors
    /// When the dead letter cannot be written for good (the DLQ topic is missing, the record
    /// is too large) or shutdown interrupted: the caller decides what the record becomes.
    pub async fn write(
        &self,
        payload: &[u8],
        key: Option<&[u8]>,
        headers: OwnedHeaders,
        reason: &str,
        shutdown: &CancellationToken,
    ) -> Result<(), RetryError<KafkaError>> {
        let headers = headers.insert(Header {
            key: REASON_HEADER,
            value: Some(reason),
        });
        let written = kafka::produce(
            &self.producer,
            &self.topic,
            key.unwrap_or_default(),
            payload,
            &headers,
            self.timeout,
            shutdown,
            (self.service, KafkaOp::Dlq),
        )
        .await
        .map(drop);
        match &written {
            Ok(()) => DeadLettered {
                service: self.service,
                topic: &self.topic,
                reason,
            }
            .emit(),
            Err(RetryError::Cancelled) => {}
            Err(e) => DeadLetterFailed {
                service: self.service,
                topic: &self.topic,
                reason,
                error: e,
            }
            .emit(),
        }
        written
    }
}
