//! WebSocket close codes the gateway sends, and the close frame that carries them.
//!
//! Every refusal after the upgrade is a close frame with one of these codes and a reason,
//! because a browser cannot read an HTTP status from a failed upgrade.

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};

/// The peer stopped answering pings.
pub const GOING_AWAY: u16 = 1001;
/// Bad, expired or foreign token; invalid userid; an origin that is not allowed.
pub const POLICY: u16 = 1008;
/// A frame above the size limit.
pub const TOO_BIG: u16 = 1009;
/// The gateway is restarting: reconnect (to another instance) and resume.
pub const RESTART: u16 = 1012;
/// Try again later: too many sockets for this user, or deliveries unavailable.
pub const TRY_AGAIN: u16 = 1013;

/// Longest close reason the protocol allows, bytes.
const MAX_REASON: usize = 123;

/// A close frame with `code` and `reason` (cut to the protocol's 123 bytes on a char boundary).
#[must_use]
pub fn message(code: u16, reason: &str) -> Message {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(&reason[..end]),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_reasons_are_cut_on_a_char_boundary() {
        let Message::Close(Some(f)) = message(POLICY, &"é".repeat(100)) else {
            panic!("not a close frame")
        };
        assert_eq!(f.code, POLICY);
        assert!(f.reason.len() <= MAX_REASON);
        assert_eq!(f.reason.len() % 2, 0, "no half character");
    }
}
