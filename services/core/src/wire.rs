//! The WebSocket protocol: every frame a client may send and every frame the gateway sends.
//!
//! Frames are JSON text with a `type` tag. The original system's protocol (`message` in,
//! `response` out) is a subset, so an old client keeps working unchanged. Text is parsed once,
//! at the edge, by [`ClientFrame::parse`]; nothing further in sees raw JSON.

use serde::{Deserialize, Serialize};

/// Longest client-chosen message id accepted (it is used as an idempotency key end to end).
pub const MAX_MESSAGE_ID_LEN: usize = 128;

/// A frame sent by a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// A user message. `id` is an optional client idempotency key; `userid`, when present,
    /// must equal the connection's user (old clients send it).
    Message {
        content: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        userid: Option<String>,
    },
    /// Replay every delivery after this event id.
    Resume {
        after: String,
    },
    Ping,
}

/// Why a client frame was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame is not valid JSON for this protocol: {0}")]
    Invalid(String),
    #[error("content is {len} bytes, the limit is {max}")]
    ContentTooLarge { len: usize, max: usize },
    #[error("message id must be 1 to {MAX_MESSAGE_ID_LEN} printable ASCII characters")]
    BadMessageId,
    #[error("content must not be empty")]
    EmptyContent,
    #[error("resume cursor is not an event id")]
    BadCursor,
}

impl FrameError {
    /// The protocol error code this refusal is reported with.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::ContentTooLarge { .. } => ErrorCode::TooLarge,
            _ => ErrorCode::InvalidMessage,
        }
    }
}

impl ClientFrame {
    /// Parses one text frame and checks the limits a client controls.
    ///
    /// # Errors
    /// A [`FrameError`] naming what is wrong; never panics, whatever the input.
    pub fn parse(text: &str, max_content_bytes: usize) -> Result<Self, FrameError> {
        let frame: Self = serde_json::from_str(text).map_err(|e| {
            // Keep the reason short: serde's message can quote the input.
            FrameError::Invalid(e.classify_name().to_owned())
        })?;
        match &frame {
            Self::Message { content, id, .. } => {
                if content.len() > max_content_bytes {
                    return Err(FrameError::ContentTooLarge {
                        len: content.len(),
                        max: max_content_bytes,
                    });
                }
                if content.trim().is_empty() {
                    return Err(FrameError::EmptyContent);
                }
                if let Some(id) = id
                    && !valid_message_id(id)
                {
                    return Err(FrameError::BadMessageId);
                }
            }
            Self::Resume { after } => {
                if EventId::parse(after).is_none() {
                    return Err(FrameError::BadCursor);
                }
            }
            Self::Ping => {}
        }
        Ok(frame)
    }
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        use serde_json::error::Category;
        match self.classify() {
            Category::Io => "io error",
            Category::Syntax => "malformed JSON",
            Category::Data => "unknown type or missing/extra field",
            Category::Eof => "truncated JSON",
        }
    }
}

/// Whether a client-chosen message id is acceptable: printable ASCII, bounded length.
#[must_use]
pub fn valid_message_id(id: &str) -> bool {
    (1..=MAX_MESSAGE_ID_LEN).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

/// Error codes of the `error` frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidMessage,
    RateLimited,
    Unavailable,
    LlmFailed,
    TooLarge,
}

impl ErrorCode {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidMessage => "invalid_message",
            Self::RateLimited => "rate_limited",
            Self::Unavailable => "unavailable",
            Self::LlmFailed => "llm_failed",
            Self::TooLarge => "too_large",
        }
    }
}

/// A frame sent by the gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// Sent right after the upgrade: the user's current stream position (the last event id in
    /// the inbox, `0-0` when it is empty), so a client holds a cursor from its first moment.
    Welcome {
        position: String,
    },
    /// Sent after a replay asked for by `resume` or `?after=`: `recovered` is false when the
    /// cursor was older than what the inbox still holds (trimmed or expired).
    Resumed {
        recovered: bool,
    },
    /// The message is durably in Kafka.
    Ack {
        id: String,
        trace_id: String,
    },
    /// Streamed tokens of the answer to `id`, in order (`seq` restarts at 0 if the model call is retried).
    Delta {
        id: String,
        seq: u32,
        content: String,
    },
    /// The complete answer.
    Response {
        id: String,
        event_id: String,
        content: String,
        userid: String,
        timestamp: String,
    },
    Error {
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        event_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    Pong,
}

impl ServerFrame {
    /// An error frame without message id or retry hint.
    #[must_use]
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Error {
            code,
            message: message.into(),
            id: None,
            event_id: None,
            retry_after_ms: None,
        }
    }

    /// Serialises the frame. Serialising these types cannot fail (no maps with non-string keys).
    #[must_use]
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{\"type\":\"pong\"}"))
    }
}

/// A Redis stream entry id (`<ms>-<seq>`), the `event_id` of a delivery. Ordered like Redis orders them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EventId {
    pub ms: u64,
    pub seq: u64,
}

impl EventId {
    /// Parses `<ms>-<seq>`; `None` for anything else.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        let (ms, seq) = s.split_once('-')?;
        if ms.is_empty() || seq.is_empty() || ms.len() > 20 || seq.len() > 20 {
            return None;
        }
        Some(Self {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn original_protocol_message_parses() {
        let f = ClientFrame::parse(
            r#"{"type":"message","content":"hello","userid":"alice"}"#,
            100,
        )
        .unwrap();
        assert_eq!(
            f,
            ClientFrame::Message {
                content: "hello".into(),
                id: None,
                userid: Some("alice".into())
            }
        );
    }

    #[test]
    fn refusals_carry_their_codes() {
        let too_big = ClientFrame::parse(r#"{"type":"message","content":"abcdef"}"#, 3);
        assert_eq!(too_big.unwrap_err().code(), ErrorCode::TooLarge);
        for bad in [
            "not json",
            r#"{"type":"launch"}"#,
            r#"{"type":"message"}"#,
            r#"{"type":"message","content":"  "}"#,
            r#"{"type":"message","content":"x","id":""}"#,
            r#"{"type":"resume","after":"yesterday"}"#,
            r#"[1,2]"#,
        ] {
            let err = ClientFrame::parse(bad, 100).unwrap_err();
            assert_eq!(err.code(), ErrorCode::InvalidMessage, "{bad}");
        }
    }

    #[test]
    fn server_frames_use_the_documented_tags() {
        let json = ServerFrame::Ack {
            id: "m".into(),
            trace_id: "t".into(),
        }
        .to_json();
        assert_eq!(json, r#"{"type":"ack","id":"m","trace_id":"t"}"#);
        let welcome = ServerFrame::Welcome {
            position: "0-0".into(),
        }
        .to_json();
        assert_eq!(welcome, r#"{"type":"welcome","position":"0-0"}"#);
        let resumed = ServerFrame::Resumed { recovered: false }.to_json();
        assert_eq!(resumed, r#"{"type":"resumed","recovered":false}"#);
        let err = ServerFrame::error(ErrorCode::RateLimited, "slow down").to_json();
        assert_eq!(
            err,
            r#"{"type":"error","code":"rate_limited","message":"slow down"}"#
        );
    }

    #[test]
    fn event_ids_order_like_redis() {
        let a = EventId::parse("1700000000000-0").unwrap();
        let b = EventId::parse("1700000000000-1").unwrap();
        let c = EventId::parse("1700000000001-0").unwrap();
        assert!(a < b && b < c);
        assert_eq!(c.to_string(), "1700000000001-0");
        assert!(EventId::parse("12").is_none());
        assert!(EventId::parse("-1").is_none());
    }

    proptest! {
        #[test]
        fn any_text_gives_a_frame_or_a_clean_error(s in "\\PC{0,300}") {
            let _ = ClientFrame::parse(&s, 64);
        }

        #[test]
        fn any_bytes_give_a_frame_or_a_clean_error(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let s = String::from_utf8_lossy(&bytes);
            let _ = ClientFrame::parse(&s, 64);
        }

        #[test]
        fn accepted_messages_respect_limits(content in "\\PC{0,100}", id in proptest::option::of("\\PC{0,140}")) {
            let frame = serde_json::json!({"type":"message","content":content,"id":id}).to_string();
            if let Ok(ClientFrame::Message { content, id, .. }) = ClientFrame::parse(&frame, 64) {
                prop_assert!(content.len() <= 64);
                if let Some(id) = id { prop_assert!(valid_message_id(&id)); }
            }
        }

        #[test]
        fn event_id_roundtrips(ms in any::<u64>(), seq in any::<u64>()) {
            let id = EventId { ms, seq };
            prop_assert_eq!(EventId::parse(&id.to_string()), Some(id));
        }
    }
}
