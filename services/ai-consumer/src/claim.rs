//! Idempotency claims on messages in Redis, so a redelivered message is not charged twice.
//!
//! `done:{U}:{M}` first holds a lease (`lease:<instance>`, TTL about the request timeout,
//! renewed before each attempt), and becomes `done` only after the answer is in `responses`.
//! A consumer that dies mid-call leaves a lease that expires, so the redelivery is answered;
//! a redelivery after success finds `done` and is skipped.

use std::time::Duration;

use fred::prelude::*;
use fred::types::{Expiration, SetOptions};

use colloquy_core::UserId;
use colloquy_core::names::Names;

/// The state of a message's claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// This consumer holds the lease: answer the message.
    Acquired,
    /// Already answered: skip it.
    AlreadyDone,
    /// Another live consumer holds the lease: wait and try again.
    Leased,
}

const DONE: &str = "done";

/// Claims and completes messages.
#[derive(Clone, Debug)]
pub struct Claims {
    redis: Pool,
    names: Names,
    lease_value: String,
    lease: Duration,
    done_ttl: Duration,
}

impl Claims {
    #[must_use]
    pub fn new(
        redis: Pool,
        names: Names,
        instance: &str,
        lease: Duration,
        done_ttl: Duration,
    ) -> Self {
        Self {
            redis,
            names,
            lease_value: format!("lease:{instance}"),
            lease,
            done_ttl,
        }
    }

    /// Tries to take the lease on `msg_id`.
    ///
    /// # Errors
    /// When Redis fails (the caller retries; a message is never skipped for that).
    pub async fn claim(&self, user: &UserId, msg_id: &str) -> Result<Claim, fred::error::Error> {
        let key = self.names.done_key(user, msg_id);
        let set: Option<String> = self
            .redis
            .set(
                &key,
                self.lease_value.as_str(),
                Some(Expiration::PX(self.lease.as_millis() as i64)),
                Some(SetOptions::NX),
                false,
            )
            .await?;
        if set.is_some() {
            return Ok(Claim::Acquired);
        }
        let current: Option<String> = self.redis.get(&key).await?;
        Ok(match current.as_deref() {
            Some(DONE) => Claim::AlreadyDone,
            Some(_) => Claim::Leased,
            // The lease expired between the two commands: try again at once.
            None => Claim::Leased,
        })
    }

    /// Extends this consumer's lease before another attempt.
    ///
    /// # Errors
    /// When Redis fails.
    pub async fn renew(&self, user: &UserId, msg_id: &str) -> Result<(), fred::error::Error> {
        let key = self.names.done_key(user, msg_id);
        let _: Option<String> = self
            .redis
            .set(
                &key,
                self.lease_value.as_str(),
                Some(Expiration::PX(self.lease.as_millis() as i64)),
                Some(SetOptions::XX),
                false,
            )
            .await?;
        Ok(())
    }

    /// Marks `msg_id` answered for good (its answer or failure is in `responses`).
    ///
    /// # Errors
    /// When Redis fails.
    pub async fn complete(&self, user: &UserId, msg_id: &str) -> Result<(), fred::error::Error> {
        let key = self.names.done_key(user, msg_id);
        let _: Option<String> = self
            .redis
            .set(
                &key,
                DONE,
                Some(Expiration::PX(self.done_ttl.as_millis() as i64)),
                None,
                false,
            )
            .await?;
        Ok(())
    }
}
