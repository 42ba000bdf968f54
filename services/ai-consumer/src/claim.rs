//! Idempotency claims on messages in Redis, so a redelivered message is not charged twice.
//!
//! `done:{U}:{M}` holds one of:
//! - `L|<owner>`: a lease, taken before the LLM call, renewed on a timer while the call runs
//!   and released if the job is abandoned. Only its holder may renew, release or complete it
//!   (compare-and-set, one Lua script each). A consumer that dies mid-call leaves a lease that
//!   expires, so the redelivery is answered. The owner is the consumer's static group
//!   instance id when it has one, so a process restarted after `kill -9` takes over its
//!   predecessor's leases at once instead of waiting them out.
//! - `D|<nonce>`: answered (the answer is in `responses`).
//! - `F|<nonce>`: failed for good (`llm_failed` is in `responses`).
//!
//! The nonce tells a Kafka redelivery of the same record (same nonce: skip it) from a
//! client's resend of the same message id (a new nonce): a resend after a failure is answered
//! anew, a resend after an answer gets the stored answer again. The nonce is the gateway's
//! receive time of that send (`received_at_ms`), which every copy of one record shares.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::prelude::*;
use fred::types::scripts::Script;

use colloquy_core::UserId;
use colloquy_core::names::Names;

/// The state of a message's claim, as seen by one consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// This consumer holds the lease: answer the message.
    Acquired,
    /// This very record was handled already (a redelivery): skip it.
    AlreadyDone,
    /// The message id was answered for an earlier send: deliver the stored answer again.
    AnsweredBefore,
    /// Another live consumer holds the lease: wait and try again.
    Leased,
}

/// How a message ended, recorded in its claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Answered,
    Failed,
}

/// KEYS: claim. ARGV: lease value, lease ms, nonce, take over own lease (0/1).
const CLAIM_LUA: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 'acquired'
end
if v == ARGV[1] then
  if ARGV[4] == '1' then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 'acquired'
  end
  return 'leased'
end
local kind = string.sub(v, 1, 2)
if v == 'done' or (kind == 'D|' and string.sub(v, 3) == ARGV[3]) then
  return 'done'
end
if kind == 'D|' then
  return 'answered'
end
if kind == 'F|' then
  if string.sub(v, 3) == ARGV[3] then
    return 'done'
  end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 'acquired'
end
return 'leased'
";

/// KEYS: claim. ARGV: lease value, lease ms. Extends the lease only if this consumer holds it.
const RENEW_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// KEYS: claim. ARGV: lease value. Deletes the lease only if this consumer holds it.
const RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
";

/// KEYS: claim. ARGV: lease value, final value, ttl ms. Writes the outcome unless another
/// consumer holds the lease now (it took over an expired one; its outcome will be written).
const COMPLETE_LUA: &str = r"
local v = redis.call('GET', KEYS[1])
if v and v ~= ARGV[1] and string.sub(v, 1, 2) == 'L|' then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
";

/// Claims, renews, releases and completes messages.
#[derive(Clone, Debug)]
pub struct Claims {
    redis: Pool,
    names: Names,
    lease_value: String,
    lease: Duration,
    done_ttl: Duration,
    /// Claims this process is working on now: a lease with our owner id that is not in
    /// here was left by an earlier incarnation (same static instance id) and is taken over.
    working: Arc<Mutex<HashSet<String>>>,
    scripts: Arc<[Script; 4]>,
}

impl Claims {
    #[must_use]
    pub fn new(
        redis: Pool,
        names: Names,
        owner: &str,
        lease: Duration,
        done_ttl: Duration,
    ) -> Self {
        Self {
            redis,
            names,
            lease_value: format!("L|{owner}"),
            lease,
            done_ttl,
            working: Arc::default(),
            scripts: Arc::new([
                Script::from_lua(CLAIM_LUA),
                Script::from_lua(RENEW_LUA),
                Script::from_lua(RELEASE_LUA),
                Script::from_lua(COMPLETE_LUA),
            ]),
        }
    }

    /// How long a lease lasts without renewal.
    #[must_use]
    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn working(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.working
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn eval<R: FromValue>(
        &self,
        script: usize,
        key: String,
        args: Vec<String>,
    ) -> Result<R, Error> {
        let client = self.redis.next();
        self.scripts[script]
            .evalsha_with_reload(client, key, args)
            .await
    }

    /// Tries to take the lease on `msg_id` for the send identified by `nonce`.
    ///
    /// # Errors
    /// When Redis fails (the caller retries; a message is never skipped for that).
    pub async fn claim(&self, user: &UserId, msg_id: &str, nonce: i64) -> Result<Claim, Error> {
        let key = self.names.done_key(user, msg_id);
        let take_over = !self.working().contains(&key);
        let state: String = self
            .eval(
                0,
                key.clone(),
                vec![
                    self.lease_value.clone(),
                    self.lease.as_millis().to_string(),
                    nonce.to_string(),
                    if take_over { "1" } else { "0" }.to_owned(),
                ],
            )
            .await?;
        Ok(match state.as_str() {
            "acquired" => {
                self.working().insert(key);
                Claim::Acquired
            }
            "done" => Claim::AlreadyDone,
            "answered" => Claim::AnsweredBefore,
            _ => Claim::Leased,
        })
    }

    /// Extends this consumer's lease; `false` when it no longer holds it.
    ///
    /// # Errors
    /// When Redis fails.
    pub async fn renew(&self, user: &UserId, msg_id: &str) -> Result<bool, Error> {
        let held: i64 = self
            .eval(
                1,
                self.names.done_key(user, msg_id),
                vec![self.lease_value.clone(), self.lease.as_millis().to_string()],
            )
            .await?;
        Ok(held == 1)
    }

    /// Gives up this consumer's lease (the job was abandoned), so a redelivery elsewhere is
    /// answered at once instead of after the lease runs out.
    ///
    /// # Errors
    /// When Redis fails (the lease then simply expires).
    pub async fn release(&self, user: &UserId, msg_id: &str) -> Result<bool, Error> {
        let key = self.names.done_key(user, msg_id);
        self.working().remove(&key);
        let held: i64 = self.eval(2, key, vec![self.lease_value.clone()]).await?;
        Ok(held == 1)
    }

    /// Records the outcome of the send `nonce` of `msg_id` (its answer or failure is in
    /// `responses`); `false` when another consumer had taken the lease over meanwhile.
    ///
    /// # Errors
    /// When Redis fails.
    pub async fn complete(
        &self,
        user: &UserId,
        msg_id: &str,
        nonce: i64,
        outcome: Outcome,
    ) -> Result<bool, Error> {
        let key = self.names.done_key(user, msg_id);
        let value = match outcome {
            Outcome::Answered => format!("D|{nonce}"),
            Outcome::Failed => format!("F|{nonce}"),
        };
        let written: i64 = self
            .eval(
                3,
                key.clone(),
                vec![
                    self.lease_value.clone(),
                    value,
                    self.done_ttl.as_millis().to_string(),
                ],
            )
            .await?;
        self.working().remove(&key);
        Ok(written == 1)
    }

    /// Forgets a claim this process stopped working on without an outcome.
    pub fn forget(&self, user: &UserId, msg_id: &str) {
        self.working().remove(&self.names.done_key(user, msg_id));
    }
}
