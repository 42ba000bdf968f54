//! Records on Kafka topics and deliveries in Redis.
//!
//! Every record carries a schema version `v` so a consumer can refuse (and dead-letter) what
//! it does not understand instead of misreading it. Nesting instead of `#[serde(flatten)]`
//! keeps (de)serialisation on the hot path free of buffering.

use serde::{Deserialize, Serialize};

use crate::UserId;
use crate::wire::{ErrorCode, ServerFrame};

/// Current schema version of every record Colloquy writes.
pub const SCHEMA_VERSION: u16 = 1;

/// Kafka header names (DESIGN: Kafka).
pub mod headers {
    pub const TRACEPARENT: &str = "traceparent";
    pub const MSG_ID: &str = "msg_id";
    pub const ENQUEUED_AT_MS: &str = "enqueued_at_ms";
}

/// A user message on `incoming_messages` (key = userid).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingRecord {
    pub v: u16,
    pub msg_id: String,
    pub userid: UserId,
    pub content: String,
    /// When the gateway received the frame; the start of the end-to-end latency.
    pub received_at_ms: i64,
}

/// A record on `responses` (key = userid).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResponseRecord {
    pub v: u16,
    pub msg_id: String,
    pub userid: UserId,
    pub received_at_ms: i64,
    pub body: ResponseBody,
}

/// What a response record says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ResponseBody {
    /// A batch of streamed tokens.
    Delta { seq: u32, content: String },
    /// The complete answer.
    Final {
        content: String,
        prompt_tokens: u32,
        completion_tokens: u32,
        /// No delta preceded this answer: it reaches the client in one piece, so its frame is
        /// the message's first text (the gateway's time to first text counts it). `false` when
        /// absent: a record from before this field may have followed deltas.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        whole: bool,
    },
    /// The model call failed for good; the user gets `llm_failed`.
    Failed { reason: String },
}

impl ResponseBody {
    /// Whether the relay must store this in the user's inbox (finals and failures) or only publish it.
    #[must_use]
    pub fn is_durable(&self) -> bool {
        !matches!(self, Self::Delta { .. })
    }
}

/// The field of an `inbox:{U}` stream entry that holds the delivery JSON.
pub const INBOX_FIELD: &str = "d";

/// A delivery, as stored in `inbox:{U}` and published on `user:{U}`.
///
/// The stream entry holds it without `event_id`; the relay's script prefixes the entry id when
/// publishing, and the gateway fills it from the entry id when replaying.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    pub msg_id: String,
    pub userid: UserId,
    pub received_at_ms: i64,
    /// RFC 3339 time the relay wrote the delivery (the original protocol's `timestamp`).
    pub timestamp: String,
    /// The same instant in ms since the epoch, for the fan-out latency.
    pub relayed_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    pub body: ResponseBody,
}

impl Delivery {
    /// The frame a client receives for this delivery.
    #[must_use]
    pub fn to_frame(&self) -> ServerFrame {
        match &self.body {
            ResponseBody::Delta { seq, content } => ServerFrame::Delta {
                id: self.msg_id.clone(),
                seq: *seq,
                content: content.clone(),
            },
            ResponseBody::Final { content, .. } => ServerFrame::Response {
                id: self.msg_id.clone(),
                event_id: self.event_id.clone().unwrap_or_default(),
                content: content.clone(),
                userid: self.userid.to_string(),
                timestamp: self.timestamp.clone(),
            },
            ResponseBody::Failed { reason } => ServerFrame::Error {
                code: ErrorCode::LlmFailed,
                message: reason.clone(),
                id: Some(self.msg_id.clone()),
                event_id: self.event_id.clone(),
                retry_after_ms: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(body: ResponseBody) -> Delivery {
        Delivery {
            event_id: Some("5-0".into()),
            msg_id: "m1".into(),
            userid: UserId::parse("alice").unwrap(),
            received_at_ms: 1,
            timestamp: "2026-01-01T00:00:00Z".into(),
            relayed_at_ms: 2,
            traceparent: None,
            body,
        }
    }

    #[test]
    fn final_becomes_a_response_frame_with_the_original_fields() {
        let d = delivery(ResponseBody::Final {
            content: "hi".into(),
            prompt_tokens: 1,
            completion_tokens: 1,
            whole: true,
        });
        let json = d.to_frame().to_json();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["type"], "response");
        assert_eq!(v["content"], "hi");
        assert_eq!(v["userid"], "alice");
        assert_eq!(v["event_id"], "5-0");
        assert!(v["timestamp"].is_string());
    }

    #[test]
    fn whole_is_omitted_when_false_and_absent_reads_as_false() {
        let body = |whole| ResponseBody::Final {
            content: "hi".into(),
            prompt_tokens: 1,
            completion_tokens: 1,
            whole,
        };
        let json = serde_json::to_string(&body(false)).unwrap();
        assert!(!json.contains("whole"), "{json}");
        let json = serde_json::to_string(&body(true)).unwrap();
        assert!(json.contains(r#""whole":true"#), "{json}");
        // A record written before the field existed (it may have followed deltas).
        let old = r#"{"kind":"final","content":"hi","prompt_tokens":1,"completion_tokens":1}"#;
        assert_eq!(
            serde_json::from_str::<ResponseBody>(old).unwrap(),
            body(false)
        );
        // The frame a client sees does not change.
        let frame = |whole| delivery(body(whole)).to_frame().to_json();
        assert_eq!(frame(true), frame(false));
    }

    #[test]
    fn failure_becomes_llm_failed() {
        let d = delivery(ResponseBody::Failed {
            reason: "quota".into(),
        });
        assert!(matches!(
            d.to_frame(),
            ServerFrame::Error {
                code: ErrorCode::LlmFailed,
                ..
            }
        ));
        assert!(d.body.is_durable());
    }

    #[test]
    fn event_id_prefix_keeps_valid_json() {
        // The relay's Lua script splices `{"event_id":"..",` in front of the stored payload.
        let mut d = delivery(ResponseBody::Delta {
            seq: 0,
            content: "x".into(),
        });
        d.event_id = None;
        let stored = serde_json::to_string(&d).unwrap();
        let spliced = format!("{{\"event_id\":\"9-9\",{}", &stored[1..]);
        let back: Delivery = serde_json::from_str(&spliced).unwrap();
        assert_eq!(back.event_id.as_deref(), Some("9-9"));
    }

    #[test]
    fn records_reject_invalid_userids() {
        let bad = r#"{"v":1,"msg_id":"m","userid":"a:b","content":"x","received_at_ms":0}"#;
        assert!(serde_json::from_str::<IncomingRecord>(bad).is_err());
    }
}
