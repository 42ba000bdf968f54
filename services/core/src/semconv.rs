//! The spans that follow OpenTelemetry's semantic conventions: Kafka sends and processing
//! (messaging) and the LLM call (GenAI), built in one place so every service names and
//! attributes them alike. Attribute keys come from `opentelemetry-semantic-conventions`.
//!
//! Values follow the current messaging conventions: a producer span's operation type is
//! `send` (the older `publish` is deprecated, replaced by `send`), a consumer's `process`,
//! and a span is named `{operation} {destination}`, e.g. `send incoming_messages`.
//!
//! The trace of one message: `gateway.message` (server) → `send incoming_messages`
//! (producer) → `process incoming_messages` (consumer, ai-consumer) → `chat {model}` (client)
//! and `send responses` (producer) → `process responses` (consumer, relay) → `gateway.deliver`.

use opentelemetry_semantic_conventions::attribute as semconv;
use tracing::Span;
use tracing::field::Empty;

use crate::UserId;

pub use semconv::{
    MESSAGING_CONSUMER_GROUP_NAME, MESSAGING_DESTINATION_NAME, MESSAGING_DESTINATION_PARTITION_ID,
    MESSAGING_KAFKA_OFFSET, MESSAGING_OPERATION_NAME, MESSAGING_OPERATION_TYPE, MESSAGING_SYSTEM,
};

// The GenAI keys are deprecated in the crate only because their definition moved to the GenAI
// conventions' own repository; the keys themselves are current. Re-declared here so that the
// one `allow` is in one place.
/// `gen_ai.provider.name`
#[allow(deprecated)]
pub const GEN_AI_PROVIDER_NAME: &str = semconv::GEN_AI_PROVIDER_NAME;
/// `gen_ai.operation.name`
#[allow(deprecated)]
pub const GEN_AI_OPERATION_NAME: &str = semconv::GEN_AI_OPERATION_NAME;
/// `gen_ai.request.model`
#[allow(deprecated)]
pub const GEN_AI_REQUEST_MODEL: &str = semconv::GEN_AI_REQUEST_MODEL;
/// `gen_ai.usage.input_tokens`
#[allow(deprecated)]
pub const GEN_AI_USAGE_INPUT_TOKENS: &str = semconv::GEN_AI_USAGE_INPUT_TOKENS;
/// `gen_ai.usage.output_tokens`
#[allow(deprecated)]
pub const GEN_AI_USAGE_OUTPUT_TOKENS: &str = semconv::GEN_AI_USAGE_OUTPUT_TOKENS;

/// `messaging.system` of every Colloquy messaging span.
pub const KAFKA: &str = "kafka";
/// `messaging.operation.type` (and `.name`) of a producer span.
pub const SEND: &str = "send";
/// `messaging.operation.type` (and `.name`) of a consumer span.
pub const PROCESS: &str = "process";
/// `gen_ai.provider.name`: the services speak OpenAI's chat completions API.
pub const OPENAI: &str = "openai";
/// `gen_ai.operation.name` of the LLM call.
pub const CHAT: &str = "chat";

/// Where a consumed record came from.
#[derive(Clone, Copy, Debug)]
pub struct Consumed<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub group: &'a str,
}

/// A producer span for sending `msg_id`'s record to `topic`, a child of the current span.
/// Its partition and offset are known from the delivery report: [`record_delivery`].
#[must_use]
pub fn send_span(topic: &str, userid: &UserId, msg_id: &str) -> Span {
    let name = format!("{SEND} {topic}");
    tracing::info_span!(
        "kafka.send",
        otel.name = name.as_str(),
        otel.kind = "producer",
        otel.status_code = Empty,
        { MESSAGING_SYSTEM } = KAFKA,
        { MESSAGING_DESTINATION_NAME } = topic,
        { MESSAGING_OPERATION_TYPE } = SEND,
        { MESSAGING_OPERATION_NAME } = SEND,
        { MESSAGING_DESTINATION_PARTITION_ID } = Empty,
        { MESSAGING_KAFKA_OFFSET } = Empty,
        userid = %userid,
        msg_id = %msg_id,
    )
}

/// Records where the broker stored the record of a [`send_span`].
pub fn record_delivery(span: &Span, partition: i32, offset: i64) {
    span.record(MESSAGING_DESTINATION_PARTITION_ID, partition.to_string());
    span.record(MESSAGING_KAFKA_OFFSET, offset);
}

/// Marks a [`send_span`] as failed: the record was not stored.
pub fn record_send_failed(span: &Span) {
    span.record("otel.status_code", "error");
}

/// A consumer span for processing `msg_id`'s record; the caller makes it a child of the
/// producer's span (`trace_context::continue_from`), so a message keeps one trace.
#[must_use]
pub fn process_span(from: &Consumed<'_>, userid: &UserId, msg_id: &str) -> Span {
    let name = format!("{PROCESS} {}", from.topic);
    tracing::info_span!(
        "kafka.process",
        otel.name = name.as_str(),
        otel.kind = "consumer",
        { MESSAGING_SYSTEM } = KAFKA,
        { MESSAGING_DESTINATION_NAME } = from.topic,
        { MESSAGING_OPERATION_TYPE } = PROCESS,
        { MESSAGING_OPERATION_NAME } = PROCESS,
        { MESSAGING_DESTINATION_PARTITION_ID } = from.partition.to_string(),
        { MESSAGING_KAFKA_OFFSET } = from.offset,
        { MESSAGING_CONSUMER_GROUP_NAME } = from.group,
        userid = %userid,
        msg_id = %msg_id,
    )
}

/// A client span for one chat completion with `model` (all its attempts), a child of the
/// current span. Token usage is recorded when the API reports it: [`record_usage`].
#[must_use]
pub fn chat_span(model: &str) -> Span {
    let name = format!("{CHAT} {model}");
    tracing::info_span!(
        "llm.chat",
        otel.name = name.as_str(),
        otel.kind = "client",
        { GEN_AI_PROVIDER_NAME } = OPENAI,
        { GEN_AI_OPERATION_NAME } = CHAT,
        { GEN_AI_REQUEST_MODEL } = model,
        { GEN_AI_USAGE_INPUT_TOKENS } = Empty,
        { GEN_AI_USAGE_OUTPUT_TOKENS } = Empty,
        colloquy.llm.attempts = Empty,
    )
}

/// Records the token usage the API returned (only call it when the API reported usage).
pub fn record_usage(span: &Span, input_tokens: u32, output_tokens: u32) {
    span.record(GEN_AI_USAGE_INPUT_TOKENS, i64::from(input_tokens));
    span.record(GEN_AI_USAGE_OUTPUT_TOKENS, i64::from(output_tokens));
}

/// Records how many attempts the LLM call of a [`chat_span`] took.
pub fn record_attempts(span: &Span, attempts: u32) {
    span.record("colloquy.llm.attempts", i64::from(attempts));
}
