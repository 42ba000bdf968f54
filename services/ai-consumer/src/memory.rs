//! Conversation memory: the last K turns of each user in a Redis list with a TTL.

use std::time::Duration;

use fred::prelude::*;

use colloquy_core::UserId;
use colloquy_core::names::Names;

use crate::llm::{Role, Turn};

/// Reads and appends a user's recent turns.
#[derive(Clone, Debug)]
pub struct Memory {
    redis: Pool,
    names: Names,
    turns: usize,
    ttl: Duration,
}

impl Memory {
    #[must_use]
    pub fn new(redis: Pool, names: Names, turns: usize, ttl: Duration) -> Self {
        Self {
            redis,
            names,
            turns,
            ttl,
        }
    }

    /// The last `turns` exchanges of `user`, oldest first. Unreadable entries are skipped.
    ///
    /// # Errors
    /// When Redis fails.
    pub async fn recent(&self, user: &UserId) -> Result<Vec<Turn>, Error> {
        if self.turns == 0 {
            return Ok(Vec::new());
        }
        let keep = (self.turns * 2) as i64;
        let raw: Vec<String> = self
            .redis
            .lrange(self.names.memory_key(user), -keep, -1)
            .await?;
        Ok(raw
            .iter()
            .filter_map(|s| serde_json::from_str(s).ok())
            .collect())
    }

    /// Appends one exchange and trims to the last `turns`.
    ///
    /// # Errors
    /// When Redis fails.
    pub async fn append(&self, user: &UserId, question: &str, answer: &str) -> Result<(), Error> {
        if self.turns == 0 {
            return Ok(());
        }
        let key = self.names.memory_key(user);
        let q = serde_json::to_string(&Turn {
            role: Role::User,
            content: question.to_owned(),
        })
        .unwrap_or_default();
        let a = serde_json::to_string(&Turn {
            role: Role::Assistant,
            content: answer.to_owned(),
        })
        .unwrap_or_default();
        let keep = (self.turns * 2) as i64;
        let pipe = self.redis.next().pipeline();
        let _: () = pipe.rpush(&key, vec![q, a]).await?;
        let _: () = pipe.ltrim(&key, -keep, -1).await?;
        let _: () = pipe.expire(&key, self.ttl.as_secs() as i64, None).await?;
        let _: Vec<Value> = pipe.all().await?;
        Ok(())
    }
}
