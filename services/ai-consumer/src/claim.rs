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
//! Outcomes are fsynced with every other write; leases are not written to the append-only file
//! at all (a Redis restart forgets them: see `CLAIM_LUA`).
//!
//! The nonce tells a Kafka redelivery of the same record (same nonce: skip it) from a
//! client's resend of the same message id (a new nonce): a resend after a failure is answered
//! anew, a resend after an answer gets the stored answer again. The nonce is the gateway's
//! receive time of that send (`received_at_ms`), which every copy of one record shares.
//!
//! The user's conversation memory (`crate::memory`) rides on the claim's two ends: acquiring
//! a claim reads it, completing one with an answer appends the exchange. A message costs the
//! ai-consumer two Redis round trips (claim, complete), plus a renewal per third of a lease
//! for a slow model.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::prelude::*;
use fred::types::MultipleKeys;
use fred::types::scripts::Script;

use colloquy_core::UserId;
use colloquy_core::names::Names;

use crate::llm::Turn;
use crate::memory::Memory;

/// The state of a message's claim, as seen by one consumer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// This consumer holds the lease: answer the message, with the user's recent turns (read
    /// by the same script; empty when memory is off).
    Acquired { history: Vec<Turn> },
    /// This very record was handled already (a redelivery): skip it.
    AlreadyDone,
    /// The message id was answered for an earlier send: deliver the stored answer again.
    AnsweredBefore,
    /// Another live consumer holds the lease: wait and try again.
    Leased,
}

/// How a message ended, recorded in its claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome<'a> {
    /// Answered; the exchange (question, answer) goes into the user's memory.
    Answered {
        question: &'a str,
        answer: &'a str,
    },
    Failed,
}

/// KEYS: claim, memory. ARGV: lease value, lease ms, nonce, take over own lease (0/1), memory
/// entries to read (0: none). Returns `{state}`, or `{'acquired', memory entries...}`.
///
/// Leases are taken and renewed without writing the append-only file (`REPL_NONE`): each
/// write there costs an fsync on the way to every answer, and a lease only keeps two consumers
/// from answering one message at once. A Redis restart forgets the leases (what the file held
/// before them comes back: a failed send's outcome, or nothing), so a message redelivered
/// meanwhile can be answered twice; the relay's delivered marker keeps the second answer from
/// the user. Releases (rare: an abandoned job), final outcomes and memory ([`COMPLETE_LUA`])
/// are written and fsynced, so a lease brought back by a rewritten file is still released.
const CLAIM_LUA: &str = r"
redis.set_repl(redis.REPL_NONE)
local v = redis.call('GET', KEYS[1])
-- Every path that does not acquire returns here; the rest fall through to the SET.
if v == ARGV[1] then
  if ARGV[4] ~= '1' then return {'leased'} end
elseif v then
  local kind = string.sub(v, 1, 2)
  if v == 'done' or (kind == 'D|' and string.sub(v, 3) == ARGV[3]) then
    return {'done'}
  end
  if kind == 'D|' then return {'answered'} end
  if kind ~= 'F|' then return {'leased'} end
  if string.sub(v, 3) == ARGV[3] then return {'done'} end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local out = {}
if ARGV[5] ~= '0' then
  out = redis.call('LRANGE', KEYS[2], -tonumber(ARGV[5]), -1)
end
table.insert(out, 1, 'acquired')
return out
";

/// KEYS: claim. ARGV: lease value, lease ms. Extends the lease only if this consumer holds it.
const RENEW_LUA: &str = r"
redis.set_repl(redis.REPL_NONE)
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

/// KEYS: claim, memory. ARGV: lease value, final value, ttl ms, memory entries kept (0: none),
/// memory ttl ms, then the exchange's two entries when answered. Writes the outcome (and the
/// exchange) unless another consumer holds the lease now (it took over an expired one; its
/// outcome will be written). A call retried after its reply was lost finds its own outcome
/// written and changes nothing, so the exchange is remembered once.
const COMPLETE_LUA: &str = r"
local v = redis.call('GET', KEYS[1])
if v == ARGV[2] then
  return 1
end
if v and v ~= ARGV[1] and string.sub(v, 1, 2) == 'L|' then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if ARGV[4] ~= '0' and #ARGV >= 7 then
  redis.call('RPUSH', KEYS[2], ARGV[6], ARGV[7])
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[4]), -1)
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
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
    memory: Memory,
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
        memory: Memory,
    ) -> Self {
        Self {
            redis,
            names,
            lease_value: format!("L|{owner}"),
            lease,
            done_ttl,
            working: Arc::default(),
            memory,
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
        keys: impl Into<MultipleKeys> + Send,
        args: Vec<String>,
    ) -> Result<R, Error> {
        let client = self.redis.next();
        self.scripts[script]
            .evalsha_with_reload(client, keys, args)
            .await
    }

    /// Tries to take the lease on `msg_id` for the send identified by `nonce`; an acquired
    /// claim carries the user's recent turns (one round trip for both).
    ///
    /// # Errors
    /// When Redis fails (the caller retries; a message is never skipped for that).
    pub async fn claim(&self, user: &UserId, msg_id: &str, nonce: i64) -> Result<Claim, Error> {
        let key = self.names.done_key(user, msg_id);
        let take_over = !self.working().contains(&key);
        let reply: Vec<String> = self
            .eval(
                0,
                vec![key.clone(), self.names.memory_key(user)],
                vec![
                    self.lease_value.clone(),
                    self.lease.as_millis().to_string(),
                    nonce.to_string(),
                    if take_over { "1" } else { "0" }.to_owned(),
                    self.memory.entries().to_string(),
                ],
            )
            .await?;
        Ok(match reply.split_first() {
            Some((state, history)) if state == "acquired" => {
                self.working().insert(key);
                Claim::Acquired {
                    history: Memory::decode(history),
                }
            }
            Some((state, _)) if state == "done" => Claim::AlreadyDone,
            Some((state, _)) if state == "answered" => Claim::AnsweredBefore,
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
    /// `responses`) and, for an answer, appends the exchange to the user's memory, in one
    /// script; `false` when another consumer had taken the lease over meanwhile (nothing is
    /// written then: that consumer records its own outcome and exchange).
    ///
    /// # Errors
    /// When Redis fails (retrying is safe: a retry finds its outcome written and adds nothing).
    pub async fn complete(
        &self,
        user: &UserId,
        msg_id: &str,
        nonce: i64,
        outcome: Outcome<'_>,
    ) -> Result<bool, Error> {
        let key = self.names.done_key(user, msg_id);
        let (value, exchange) = match outcome {
            Outcome::Answered { question, answer } => {
                (format!("D|{nonce}"), Some(Memory::encode(question, answer)))
            }
            Outcome::Failed => (format!("F|{nonce}"), None),
        };
        let mut args = vec![
            self.lease_value.clone(),
            value,
            self.done_ttl.as_millis().to_string(),
            self.memory.entries().to_string(),
            self.memory.ttl().as_millis().to_string(),
        ];
        args.extend(exchange.into_iter().flatten());
        let written: i64 = self
            .eval(3, vec![key.clone(), self.names.memory_key(user)], args)
            .await?;
        self.working().remove(&key);
        Ok(written == 1)
    }

    /// Forgets a claim this process stopped working on without an outcome.
    pub fn forget(&self, user: &UserId, msg_id: &str) {
        self.working().remove(&self.names.done_key(user, msg_id));
    }
}
