//! Colloquy's relay: `responses` → Redis.
//!
//! Each final answer or failure is appended to the user's inbox stream and published on the
//! user's channel by one Lua script, atomically and at most once per message (a marker key
//! makes a redelivered record a no-op). Deltas are only published. Records are handled in
//! batches, one pipelined round trip per batch; offsets are stored after Redis succeeded, and
//! Redis errors are retried, never skipped.

pub mod config;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fred::prelude::*;
use fred::types::CustomCommand;
use fred::types::scripts::Script;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use tokio_util::sync::CancellationToken;

use colloquy_core::config::{KafkaConfig, RedisConfig};
use colloquy_core::kafka::ObservedContext;
use colloquy_core::names::Names;
use colloquy_core::records::{Delivery, ResponseRecord, SCHEMA_VERSION, headers};
use colloquy_core::trace_context::{continue_from, traceparent_of};
use colloquy_core::{kafka, metrics as m, now_ms};

use crate::config::RelayConfig;

/// Appends to the inbox and publishes, once per message.
/// KEYS: inbox, channel, delivered marker. ARGV: maxlen, payload, inbox TTL ms, marker TTL ms.
/// The payload is a JSON object without `event_id`; the published copy gets it spliced in front.
const DELIVER_LUA: &str = r#"
if not redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[4]) then
  return 0
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'd', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PUBLISH', KEYS[2], '{"event_id":"' .. id .. '",' .. string.sub(ARGV[2], 2))
return 1
"#;

/// Everything the relay needs to start.
#[derive(Clone, Debug)]
pub struct Settings {
    pub relay: RelayConfig,
    pub kafka: KafkaConfig,
    pub redis: RedisConfig,
    pub names: Names,
}

/// A built relay, subscribed, not yet consuming.
pub struct Application {
    cfg: RelayConfig,
    names: Names,
    consumer: Arc<StreamConsumer<ObservedContext>>,
    producer: FutureProducer,
    redis: Pool,
    script: Script,
    topic: String,
    metrics_addr: SocketAddr,
    stop: CancellationToken,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

/// One record of a batch, decoded.
enum Item {
    Durable {
        user_key: String,
        channel: String,
        marker: String,
        payload: String,
    },
    Delta {
        channel: String,
        payload: String,
    },
}

impl Application {
    /// Connects, creates topics if needed, subscribes and starts the metrics endpoint.
    ///
    /// # Errors
    /// When configuration is invalid or the metrics address cannot be bound.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let Settings {
            relay: cfg,
            kafka: kcfg,
            redis,
            names,
        } = settings;
        colloquy_core::metrics::record_build_info("relay");
        if let Err(e) = kafka::ensure_topics(&kcfg, &names.all_topics()).await {
            tracing::warn!(error = %e, "could not ensure topics at start");
        }
        let topic = names.responses_topic();
        let consumer =
            kafka::consumer(&kcfg, "relay", &cfg.group, &[&topic]).context("Kafka consumer")?;
        let producer = kafka::producer(&kcfg, "relay").context("Kafka producer")?;
        let redis = colloquy_core::redis::pool(&redis)
            .await
            .context("Redis pool")?;
        let stop = CancellationToken::new();
        let metrics_addr = colloquy_core::admin::serve(cfg.metrics_listen, stop.clone())
            .await
            .with_context(|| format!("cannot listen on {}", cfg.metrics_listen))?;
        Ok(Self {
            cfg,
            names,
            consumer: Arc::new(consumer),
            producer,
            redis,
            script: Script::from_lua(DELIVER_LUA),
            topic,
            metrics_addr,
            stop,
        })
    }

    /// Where `/metrics` and `/health` are served.
    #[must_use]
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// Relays until `shutdown` fires; the batch in hand is finished (or left unstored), stored
    /// offsets are committed.
    ///
    /// # Errors
    /// Only on unrecoverable failures; per-record errors are handled inside.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        if let Err(e) = self.script.load(self.redis.next()).await {
            tracing::warn!(error = %e, "delivery script not loaded yet (Redis down?); will load on first use");
        }
        tracing::info!(topic = %self.topic, "relay running");
        loop {
            let first = tokio::select! {
                () = shutdown.cancelled() => break,
                m = self.consumer.recv() => m,
            };
            let mut batch = Vec::with_capacity(64);
            match first {
                Ok(m) => batch.push(m),
                Err(e) => {
                    metrics::counter!(m::KAFKA_ERRORS, "service" => "relay", "op" => "consume")
                        .increment(1);
                    tracing::warn!(error = %e, "consume error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
            // Take whatever else is already fetched, without waiting.
            while batch.len() < self.cfg.batch_max {
                match tokio::time::timeout(Duration::from_millis(0), self.consumer.recv()).await {
                    Ok(Ok(m)) => batch.push(m),
                    _ => break,
                }
            }
            if !self.relay_batch(&batch, &shutdown).await {
                break;
            }
            self.store_offsets(&batch);
        }
        self.stop.cancel();
        let consumer = Arc::clone(&self.consumer);
        let producer = self.producer.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let _ = consumer.commit_consumer_state(CommitMode::Sync);
            let _ = producer.flush(Duration::from_secs(5));
        })
        .await;
        tracing::info!("relay stopped");
        Ok(())
    }

    /// Writes one batch to Redis, retrying until it succeeds. `false` when shutdown interrupts.
    async fn relay_batch(
        &self,
        batch: &[BorrowedMessage<'_>],
        shutdown: &CancellationToken,
    ) -> bool {
        let now = now_ms();
        let timestamp = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut items = Vec::with_capacity(batch.len());
        let mut spans = Vec::new();
        for msg in batch {
            match self.decode(msg, now, &timestamp) {
                Ok((item, span)) => {
                    items.push(item);
                    spans.extend(span);
                }
                Err(reason) => {
                    if !self.dead_letter(msg, &reason, shutdown).await {
                        return false;
                    }
                }
            }
        }
        let mut delay = Duration::from_millis(50);
        loop {
            match self.write(&items).await {
                Ok(written) => {
                    let durable = items
                        .iter()
                        .filter(|i| matches!(i, Item::Durable { .. }))
                        .count();
                    metrics::counter!(m::MESSAGES, "service" => "relay", "outcome" => "delivered")
                        .increment(written);
                    metrics::counter!(m::MESSAGES, "service" => "relay", "outcome" => "delta")
                        .increment((items.len() - durable) as u64);
                    let dup = durable as u64 - written;
                    if dup > 0 {
                        metrics::counter!(m::DUPLICATES, "service" => "relay").increment(dup);
                    }
                    for (span, enqueued) in spans {
                        metrics::histogram!(m::STAGE_LATENCY, "stage" => "relay")
                            .record((now_ms() - enqueued).max(0) as f64 / 1000.0);
                        drop(span);
                    }
                    return true;
                }
                Err(e) => {
                    metrics::counter!(m::REDIS_ERRORS, "service" => "relay", "op" => "deliver")
                        .increment(1);
                    tracing::warn!(error = %e, records = items.len(), "Redis write failed; retrying the batch");
                    if e.to_string().contains("NOSCRIPT") {
                        let _ = self.script.load(self.redis.next()).await;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.cancelled() => return false,
                    }
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    fn decode(
        &self,
        msg: &BorrowedMessage<'_>,
        now: i64,
        timestamp: &str,
    ) -> Result<(Item, Option<(tracing::Span, i64)>), String> {
        let payload = msg.payload().ok_or("empty payload")?;
        let record: ResponseRecord =
            serde_json::from_slice(payload).map_err(|e| format!("unreadable record: {e}"))?;
        if record.v != SCHEMA_VERSION {
            return Err(format!("unsupported schema version {}", record.v));
        }
        let durable = record.body.is_durable();
        let enqueued = kafka::header_str(msg.headers(), headers::ENQUEUED_AT_MS)
            .and_then(|v| v.parse().ok())
            .unwrap_or(now);
        let (span, traceparent) = if durable {
            let span = tracing::info_span!("relay.deliver", userid = %record.userid, msg_id = %record.msg_id, otel.kind = "consumer", messaging.system = "kafka", messaging.operation = "process");
            continue_from(
                &span,
                kafka::header_str(msg.headers(), headers::TRACEPARENT),
            );
            let tp = traceparent_of(&span);
            (Some(span), tp)
        } else {
            (None, None)
        };
        let channel = self.names.user_channel(&record.userid);
        let delivery = Delivery {
            event_id: None,
            msg_id: record.msg_id,
            userid: record.userid,
            received_at_ms: record.received_at_ms,
            timestamp: timestamp.to_owned(),
            relayed_at_ms: now,
            traceparent,
            body: record.body,
        };
        let payload = serde_json::to_string(&delivery).map_err(|e| e.to_string())?;
        let item = if durable {
            Item::Durable {
                user_key: self.names.inbox_key(&delivery.userid),
                channel,
                marker: self.names.delivered_key(&delivery.userid, &delivery.msg_id),
                payload,
            }
        } else {
            Item::Delta { channel, payload }
        };
        Ok((item, span.map(|s| (s, enqueued))))
    }

    /// One pipelined round trip; returns how many durable records were newly delivered.
    async fn write(&self, items: &[Item]) -> Result<u64, fred::error::Error> {
        if items.is_empty() {
            return Ok(0);
        }
        let client = self.redis.next();
        let pipe = client.pipeline();
        let maxlen = self.cfg.inbox_maxlen.to_string();
        let inbox_ttl = (self.cfg.inbox_ttl_secs * 1000).to_string();
        let marker_ttl = (self.cfg.delivered_ttl_secs * 1000).to_string();
        for item in items {
            match item {
                Item::Durable {
                    user_key,
                    channel,
                    marker,
                    payload,
                } => {
                    // Pipelines have no script interface in fred; EVALSHA goes as a plain command.
                    let args: Vec<&str> = vec![
                        self.script.sha1(),
                        "3",
                        user_key,
                        channel,
                        marker,
                        &maxlen,
                        payload,
                        &inbox_ttl,
                        &marker_ttl,
                    ];
                    let _: () = pipe
                        .custom(CustomCommand::new_static("EVALSHA", None, false), args)
                        .await?;
                }
                Item::Delta { channel, payload } => {
                    let _: () = pipe.publish(channel.as_str(), payload.as_str()).await?;
                }
            }
        }
        let results: Vec<Value> = pipe.all().await?;
        let mut written = 0;
        for (item, value) in items.iter().zip(results) {
            if matches!(item, Item::Durable { .. }) && value.as_i64() == Some(1) {
                written += 1;
            }
        }
        Ok(written)
    }

    async fn dead_letter(
        &self,
        msg: &BorrowedMessage<'_>,
        reason: &str,
        shutdown: &CancellationToken,
    ) -> bool {
        tracing::warn!(%reason, partition = msg.partition(), offset = msg.offset(), "response record dead-lettered");
        let dlq = self.names.responses_dlq_topic();
        loop {
            let headers = OwnedHeaders::new().insert(Header {
                key: "dlq_reason",
                value: Some(reason),
            });
            let mut record = FutureRecord::to(&dlq)
                .payload(msg.payload().unwrap_or_default())
                .headers(headers);
            if let Some(k) = msg.key() {
                record = record.key(k);
            }
            let sent = tokio::select! {
                r = self.producer.send(record, Timeout::After(Duration::from_secs(10))) => r,
                () = shutdown.cancelled() => return false,
            };
            match sent {
                Ok(_) => {
                    metrics::counter!(m::DLQ_WRITES, "service" => "relay", "topic" => dlq.clone())
                        .increment(1);
                    metrics::counter!(m::MESSAGES, "service" => "relay", "outcome" => "dead_lettered").increment(1);
                    return true;
                }
                Err((e, _)) => {
                    metrics::counter!(m::KAFKA_ERRORS, "service" => "relay", "op" => "dlq")
                        .increment(1);
                    tracing::warn!(error = %e, "dead letter failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    fn store_offsets(&self, batch: &[BorrowedMessage<'_>]) {
        let mut highest: HashMap<i32, i64> = HashMap::new();
        for m in batch {
            let e = highest.entry(m.partition()).or_insert(m.offset());
            *e = (*e).max(m.offset());
        }
        for (partition, offset) in highest {
            if let Err(e) = self.consumer.store_offset(&self.topic, partition, offset) {
                tracing::debug!(partition, error = %e, "offset not stored (partition revoked?)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_writes_the_field_the_gateway_reads() {
        let field = colloquy_core::records::INBOX_FIELD;
        assert!(DELIVER_LUA.contains(&format!("'*', '{field}', ARGV[2]")));
    }
}
