//! Names of topics, Redis keys and channels.
//!
//! Built in one place from validated parts ([`UserId`], message ids checked by
//! [`crate::wire::valid_message_id`]), with optional prefixes so that tests can share one
//! broker and one Redis without seeing each other's data.

use clap::Args;

use crate::UserId;

/// Topic names and the Redis key prefix.
#[derive(Clone, Debug, Args)]
pub struct Names {
    /// Prefix of every topic name (tests use a unique one each).
    #[arg(long, env = "KAFKA_TOPIC_PREFIX", default_value = "")]
    pub topic_prefix: String,
    /// Prefix of every Redis key and channel (tests use a unique one each).
    #[arg(long, env = "REDIS_KEY_PREFIX", default_value = "")]
    pub redis_prefix: String,
}

impl Default for Names {
    fn default() -> Self {
        Self::with_prefixes("", "")
    }
}

impl Names {
    #[must_use]
    pub fn with_prefixes(topic_prefix: &str, redis_prefix: &str) -> Self {
        Self {
            topic_prefix: topic_prefix.to_owned(),
            redis_prefix: redis_prefix.to_owned(),
        }
    }

    #[must_use]
    pub fn incoming_topic(&self) -> String {
        format!("{}incoming_messages", self.topic_prefix)
    }
    #[must_use]
    pub fn responses_topic(&self) -> String {
        format!("{}responses", self.topic_prefix)
    }
    #[must_use]
    pub fn incoming_dlq_topic(&self) -> String {
        format!("{}incoming_messages.dlq", self.topic_prefix)
    }
    #[must_use]
    pub fn responses_dlq_topic(&self) -> String {
        format!("{}responses.dlq", self.topic_prefix)
    }
    /// Every topic the system uses.
    #[must_use]
    pub fn all_topics(&self) -> Vec<String> {
        vec![
            self.incoming_topic(),
            self.responses_topic(),
            self.incoming_dlq_topic(),
            self.responses_dlq_topic(),
        ]
    }

    /// Stream of a user's durable deliveries.
    #[must_use]
    pub fn inbox_key(&self, user: &UserId) -> String {
        format!("{}inbox:{user}", self.redis_prefix)
    }
    /// Pub/sub channel that notifies the gateways holding the user's sockets.
    #[must_use]
    pub fn user_channel(&self, user: &UserId) -> String {
        format!("{}user:{user}", self.redis_prefix)
    }
    /// The user id behind a channel name made by [`Names::user_channel`].
    #[must_use]
    pub fn user_of_channel(&self, channel: &str) -> Option<UserId> {
        let rest = channel.strip_prefix(&self.redis_prefix)?;
        UserId::parse(rest.strip_prefix("user:")?).ok()
    }
    /// The ai-consumer's claim on a message (lease, then final). Scoped by user, because
    /// message ids may be chosen by clients and one user must not block another's.
    #[must_use]
    pub fn done_key(&self, user: &UserId, msg_id: &str) -> String {
        format!("{}done:{user}:{msg_id}", self.redis_prefix)
    }
    /// The relay's marker that the durable delivery of one send of a message is in the inbox;
    /// it holds the entry's event id. `nonce` tells sends of one message id apart (the gateway's
    /// receive time, shared by every Kafka copy of one send), so a redelivered record is a
    /// no-op while a client's resend is delivered again.
    #[must_use]
    pub fn delivered_key(&self, user: &UserId, msg_id: &str, nonce: i64) -> String {
        format!("{}delivered:{user}:{msg_id}:{nonce}", self.redis_prefix)
    }
    /// A user's conversation memory.
    #[must_use]
    pub fn memory_key(&self, user: &UserId) -> String {
        format!("{}memory:{user}", self.redis_prefix)
    }
    /// The unanswered-message audit: a sorted set of acked messages (score = ack time in ms)
    /// that the gateway adds to after each ack and the relay's delivery script removes from.
    #[must_use]
    pub fn audit_key(&self) -> String {
        format!("{}audit:unanswered", self.redis_prefix)
    }
    /// The audit set's member for one message. A userid never contains a space, so the first
    /// space separates it from the (client-chosen) message id.
    #[must_use]
    pub fn audit_member(user: &UserId, msg_id: &str) -> String {
        format!("{user} {msg_id}")
    }
    /// A user's GCRA state.
    #[must_use]
    pub fn rate_key(&self, user: &UserId) -> String {
        format!("{}ratelimit:{user}", self.redis_prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_roundtrip_through_the_prefix() {
        let names = Names::with_prefixes("t1.", "t1:");
        let alice = UserId::parse("alice").unwrap();
        assert_eq!(names.user_channel(&alice), "t1:user:alice");
        assert_eq!(names.user_of_channel("t1:user:alice"), Some(alice));
        assert_eq!(names.user_of_channel("user:alice"), None);
        assert_eq!(names.incoming_topic(), "t1.incoming_messages");
    }
}
