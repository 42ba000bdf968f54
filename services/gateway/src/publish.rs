//! Produce a user message to `incoming_messages`, carrying the trace context in headers: the
//! context of the `send incoming_messages` producer span, a child of the message's span.
//!
//! The record is enqueued synchronously, in the order frames arrived on the socket, so the
//! idempotent producer keeps a user's messages in order; the ack waits for the delivery report.

use std::future::Future;

use rdkafka::producer::FutureRecord;

use colloquy_core::records::{IncomingRecord, SCHEMA_VERSION};
use colloquy_core::trace_context::{trace_id_of, traceparent_of};
use colloquy_core::{UserId, kafka, now_ms, semconv};

use crate::state::AppState;

/// Why a message was not stored.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("Kafka refused the message: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("the producer was dropped before the delivery report")]
    Cancelled,
    #[error("cannot encode the record: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Enqueues the message and returns a future that resolves to its trace id once the broker
/// acknowledged it.
///
/// # Errors
/// When the producer queue refuses the record at once (full, or the record is malformed).
pub fn enqueue(
    state: &AppState,
    user: &UserId,
    msg_id: &str,
    content: String,
    received_at_ms: i64,
    span: &tracing::Span,
) -> Result<impl Future<Output = Result<String, PublishError>> + Send + 'static, PublishError> {
    let record = IncomingRecord {
        v: SCHEMA_VERSION,
        msg_id: msg_id.to_owned(),
        userid: user.clone(),
        content,
        received_at_ms,
    };
    let payload = serde_json::to_vec(&record)?;
    let send = span.in_scope(|| semconv::send_span(&state.incoming_topic, user, msg_id));
    let traceparent = traceparent_of(&send);
    let trace_id = trace_id_of(&send);
    let headers = kafka::record_headers(traceparent.as_deref(), msg_id, now_ms());
    let fr = FutureRecord::to(&state.incoming_topic)
        .key(user.as_str())
        .payload(&payload)
        .headers(headers);
    let delivery = state.producer.send_result(fr).map_err(|(e, _)| {
        semconv::record_send_failed(&send);
        PublishError::Kafka(e)
    })?;
    let span = span.clone();
    let audit = state.audit.clone();
    let (user, msg_id) = (user.clone(), msg_id.to_owned());
    Ok(async move {
        let result = match delivery.await {
            Ok(Ok(delivered)) => {
                semconv::record_delivery(&send, delivered.partition, delivered.offset);
                // From the ack on, the message is watched until its answer is stored.
                audit.acked(&user, &msg_id, received_at_ms, now_ms());
                Ok(trace_id)
            }
            Ok(Err((e, _))) => Err(PublishError::Kafka(e)),
            Err(_) => Err(PublishError::Cancelled),
        };
        if let Err(e) = &result {
            semconv::record_send_failed(&send);
            span.in_scope(|| tracing::warn!(error = %e, "produce failed"));
        }
        drop(send);
        drop(span);
        result
    })
}
