//! Conversation memory: the last K turns of each user in a Redis list with a TTL.
//!
//! The list is read and written inside the claim scripts (`crate::claim`): the claim that
//! acquires a message returns the user's recent turns, and the completion that records an
//! answer appends the exchange, so memory costs no round trip of its own. This module is the
//! memory's policy (how many entries, how long they live) and its encoding.

use std::time::Duration;

use crate::llm::{Role, Turn};

/// How much of a conversation is kept, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memory {
    turns: usize,
    ttl: Duration,
}

impl Memory {
    /// `turns` exchanges (question and answer) kept for `ttl` after a user's last answer;
    /// 0 turns keeps nothing.
    #[must_use]
    pub fn new(turns: usize, ttl: Duration) -> Self {
        Self { turns, ttl }
    }

    /// No memory at all.
    #[must_use]
    pub fn none() -> Self {
        Self::new(0, Duration::ZERO)
    }

    /// List entries kept (two per exchange); 0 when memory is off.
    #[must_use]
    pub fn entries(self) -> usize {
        self.turns * 2
    }

    /// How long a user's memory lives after their last answer.
    #[must_use]
    pub fn ttl(self) -> Duration {
        self.ttl
    }

    /// The stored entries as turns, oldest first; unreadable entries are skipped (an answer
    /// without a turn of context beats no answer).
    #[must_use]
    pub fn decode(raw: &[String]) -> Vec<Turn> {
        raw.iter()
            .filter_map(|s| serde_json::from_str(s).ok())
            .collect()
    }

    /// The two entries one exchange is stored as.
    #[must_use]
    pub fn encode(question: &str, answer: &str) -> [String; 2] {
        [(Role::User, question), (Role::Assistant, answer)].map(|(role, content)| {
            serde_json::to_string(&Turn {
                role,
                content: content.to_owned(),
            })
            .expect("a turn is plain strings: it always serialises")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exchange_decodes_to_its_turns_and_garbage_is_skipped() {
        let [q, a] = Memory::encode("who \"am\" I?", "Ada\n");
        let raw = vec![
            q,
            "not json".to_owned(),
            a,
            r#"{"role":"robot"}"#.to_owned(),
        ];
        assert_eq!(
            Memory::decode(&raw),
            vec![
                Turn {
                    role: Role::User,
                    content: "who \"am\" I?".into()
                },
                Turn {
                    role: Role::Assistant,
                    content: "Ada\n".into()
                },
            ]
        );
    }

    #[test]
    fn memory_off_keeps_no_entries() {
        assert_eq!(Memory::none().entries(), 0);
        assert_eq!(Memory::new(3, Duration::from_secs(1)).entries(), 6);
    }
}
