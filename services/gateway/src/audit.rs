//! The unanswered-message audit, write side: every acked message is added to one Redis
//! sorted set (score: ack time), unless its answer is already stored; the relay's delivery
//! script removes it when its answer or failure is stored. The relay turns what stays into
//! gauges (count, oldest age) and an alert pages when an acked message goes unanswered.
//!
//! Recording never delays an ack: entries go through a bounded queue to one task that writes
//! them in pipelined batches (one round trip per batch, about one per 20 ms under load).
//! The audit watches delivery; it is not part of it, so when Redis is down or the queue is
//! full an entry is counted as lost to the audit and dropped.

use std::time::Duration;

use fred::prelude::*;
use fred::types::CustomCommand;
use fred::types::scripts::Script;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use colloquy_core::UserId;
use colloquy_core::names::Names;

use crate::events::AuditEntriesLost;

/// KEYS: audit set, delivered marker of this send. ARGV: ack time ms, member.
const AUDIT_ADD_LUA: &str = r"
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZADD', KEYS[1], 'NX', ARGV[1], ARGV[2])
end
return 1
";

/// Entries waiting for the writer before new ones are dropped.
const QUEUE: usize = 65_536;
/// Most entries per round trip.
const BATCH: usize = 512;

#[derive(Debug)]
struct Entry {
    marker: String,
    member: String,
    acked_at_ms: i64,
}

/// Records acked messages for the audit.
#[derive(Clone, Debug)]
pub struct Audit {
    tx: mpsc::Sender<Entry>,
    names: Names,
}

impl Audit {
    /// Starts the writer on `redis` until `shutdown`.
    #[must_use]
    pub fn start(redis: Pool, names: Names, shutdown: CancellationToken) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write(redis, names.audit_key(), rx, shutdown));
        Self { tx, names }
    }

    /// Records that the send `nonce` (its receive time) of `msg_id` was acked at `acked_at_ms`.
    pub fn acked(&self, user: &UserId, msg_id: &str, nonce: i64, acked_at_ms: i64) {
        let entry = Entry {
            marker: self.names.delivered_key(user, msg_id, nonce),
            member: Names::audit_member(user, msg_id),
            acked_at_ms,
        };
        if self.tx.try_send(entry).is_err() {
            AuditEntriesLost {
                entries: 1,
                error: None,
            }
            .emit();
        }
    }
}

async fn write(
    redis: Pool,
    key: String,
    mut rx: mpsc::Receiver<Entry>,
    shutdown: CancellationToken,
) {
    let script = Script::from_lua(AUDIT_ADD_LUA);
    let _ = script.load(redis.next()).await;
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let n = tokio::select! {
            () = shutdown.cancelled() => 0,
            n = rx.recv_many(&mut batch, BATCH) => n,
        };
        if n == 0 && batch.is_empty() {
            // Shutdown, or every sender gone: write what is left, then stop.
            while let Ok(e) = rx.try_recv() {
                batch.push(e);
            }
            if batch.is_empty() {
                return;
            }
        }
        let mut written = add(&redis, &script, &key, &batch).await;
        if let Err(e) = &written
            && e.details().contains("NOSCRIPT")
        {
            // Redis restarted and lost its script cache: load it and try once more.
            let _ = script.load(redis.next()).await;
            written = add(&redis, &script, &key, &batch).await;
        }
        if let Err(e) = written {
            AuditEntriesLost {
                entries: batch.len(),
                error: Some(&e),
            }
            .emit();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        batch.clear();
        if shutdown.is_cancelled() && rx.is_empty() {
            return;
        }
    }
}

async fn add(redis: &Pool, script: &Script, key: &str, batch: &[Entry]) -> Result<(), Error> {
    let client = redis.next();
    let pipe = client.pipeline();
    for e in batch {
        let score = e.acked_at_ms.to_string();
        let args: Vec<&str> = vec![script.sha1(), "2", key, &e.marker, &score, &e.member];
        let _: () = pipe
            .custom(CustomCommand::new_static("EVALSHA", None, false), args)
            .await?;
    }
    let _: Vec<Value> = pipe.all().await?;
    Ok(())
}
