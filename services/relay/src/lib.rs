//! Colloquy's relay: `responses` → Redis.
//!
//! Each final answer or failure is appended to the user's inbox stream and published on the
//! user's channel by one Lua script ([`deliver`]), atomically and at most once per send of a
//! message (a marker key makes a redelivered record a no-op), and cleared from the
//! unanswered-message audit ([`audit`]). Deltas are only published. Records are handled in
//! batches, one pipelined round trip per batch; offsets are stored after Redis succeeded.
//! Redis outages are waited out with the partitions paused (polling goes on, so the group
//! keeps the relay); an unreadable record or one Redis refuses for good goes to
//! `responses.dlq` instead of stopping every user's deliveries.

pub mod audit;
pub mod config;
pub mod deliver;
pub mod events;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fred::prelude::*;
use fred::types::scripts::Script;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{FutureProducer, Producer};
use tokio_util::sync::CancellationToken;

use colloquy_core::config::{KafkaConfig, RedisConfig};
use colloquy_core::dead_letter::DeadLetters;
use colloquy_core::kafka::{Membership, ObservedContext, TopicReader};
use colloquy_core::names::Names;
use colloquy_core::records::headers;
use colloquy_core::retry::{RetryError, RetryPolicy, redis_class};
use colloquy_core::semconv::Consumed;
use colloquy_core::{kafka, now_ms};

use crate::config::RelayConfig;
use crate::deliver::{Decoded, InboxLimits, Written};
use crate::events::{BatchRelayed, DeliverFailed, RecordDeadLettered, Relayed};

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
    membership: Arc<Membership>,
    producer: FutureProducer,
    dead_letters: DeadLetters,
    redis: Pool,
    script: Script,
    limits: InboxLimits,
    topic: String,
    rejoin_after: Duration,
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

impl Application {
    /// Connects, creates topics if needed, subscribes and starts the metrics endpoint.
    ///
    /// # Errors
    /// When configuration is invalid, required topics are missing or the metrics address
    /// cannot be bound.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let Settings {
            relay: cfg,
            kafka: kcfg,
            redis,
            names,
        } = settings;
        colloquy_core::metrics::record_build_info(events::SERVICE);
        if let Err(e) = kafka::ensure_topics(&kcfg, &names.all_topics()).await {
            tracing::warn!(error = %e, "could not ensure topics at start");
        }
        let topic = names.responses_topic();
        let producer = kafka::producer(&kcfg, events::SERVICE).context("Kafka producer")?;
        kafka::require_topics(
            &producer,
            &kcfg.bootstrap_servers,
            &[topic.clone(), names.responses_dlq_topic()],
            Duration::from_secs(30),
        )
        .await
        .context("refusing to start")?;
        let consumer = kafka::consumer(&kcfg, events::SERVICE, &cfg.group, &[&topic])
            .await
            .context("Kafka consumer")?;
        let membership = consumer.context().membership();
        let redis = colloquy_core::redis::pool(&redis)
            .await
            .context("Redis pool")?;
        let stop = CancellationToken::new();
        let ready = Arc::clone(&membership);
        let metrics_addr = colloquy_core::admin::serve(
            cfg.metrics_listen,
            Arc::new(move || ready.readiness()),
            stop.clone(),
        )
        .await
        .with_context(|| format!("cannot listen on {}", cfg.metrics_listen))?;
        Ok(Self {
            limits: InboxLimits {
                maxlen: cfg.inbox_maxlen,
                ttl_ms: cfg.inbox_ttl_secs * 1000,
                marker_ttl_ms: cfg.delivered_ttl_secs * 1000,
            },
            dead_letters: DeadLetters::new(
                producer.clone(),
                names.responses_dlq_topic(),
                events::SERVICE,
                kcfg.produce_timeout(),
            ),
            rejoin_after: Duration::from_secs(kcfg.rejoin_after_secs.max(1)),
            cfg,
            names,
            consumer: Arc::new(consumer),
            membership,
            producer,
            redis,
            script: deliver::script(),
            topic,
            metrics_addr,
            stop,
        })
    }

    /// Where `/metrics`, `/health` and `/ready` are served.
    #[must_use]
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// Relays until `shutdown` fires; the batch in hand is finished within the grace period
    /// (or left unstored, to be redelivered), stored offsets are committed.
    ///
    /// # Errors
    /// Only on unrecoverable failures; per-record errors are handled inside.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        if let Err(e) = self.script.load(self.redis.next()).await {
            tracing::warn!(error = %e, "delivery script not loaded yet (Redis down?); will load on first use");
        }
        let rejoin = tokio::spawn(kafka::rejoin_when_idle(
            Arc::clone(&self.consumer),
            vec![self.topic.clone()],
            self.rejoin_after,
            self.stop.clone(),
        ));
        tokio::spawn(audit::report(
            self.redis.clone(),
            self.names.audit_key(),
            Duration::from_secs(self.cfg.audit_interval_secs.max(1)),
            self.stop.clone(),
        ));
        // The batch in hand may finish within the grace period after shutdown fires.
        let batch_stop = CancellationToken::new();
        let grace = Duration::from_secs(self.cfg.shutdown_grace_secs);
        {
            let (shutdown, batch_stop) = (shutdown.clone(), batch_stop.clone());
            tokio::spawn(async move {
                shutdown.cancelled().await;
                tokio::time::sleep(grace).await;
                batch_stop.cancel();
            });
        }
        tracing::info!(topic = %self.topic, "relay running");
        let mut reader = TopicReader::new(self.topic.clone());
        let mut held: Vec<BorrowedMessage<'_>> = Vec::new();
        loop {
            reader.rebalanced(&self.membership);
            let mut batch = std::mem::take(&mut held);
            if batch.is_empty() {
                let Some(first) = reader.next(&self.consumer, true, &shutdown).await else {
                    break;
                };
                self.admit(&mut reader, first, &mut batch);
            }
            // Take whatever else is already fetched, without waiting.
            while batch.len() < self.cfg.batch_max {
                match tokio::time::timeout(Duration::ZERO, self.consumer.recv()).await {
                    Ok(Ok(m)) => self.admit(&mut reader, m, &mut batch),
                    _ => break,
                }
            }
            if batch.is_empty() {
                continue;
            }
            if !self
                .relay_batch(&batch, &batch_stop, &mut reader, &mut held)
                .await
            {
                break;
            }
            self.store_offsets(&batch);
        }
        self.stop.cancel();
        // The rejoin task holds the consumer too: wait for it, so the consumer is closed here,
        // not by whichever task happens to drop it last (perhaps after the broker has gone, when
        // librdkafka's close can wait forever).
        let _ = rejoin.await;
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

    /// Adds `msg` to `batch` unless its offset jumped (then the partition is re-read).
    fn admit<'a>(
        &self,
        reader: &mut TopicReader,
        msg: BorrowedMessage<'a>,
        batch: &mut Vec<BorrowedMessage<'a>>,
    ) {
        if reader.admit(&*self.consumer, msg.partition(), msg.offset()) {
            batch.push(msg);
        }
    }

    /// Writes one batch to Redis; `false` when shutdown interrupts (nothing is stored then).
    /// While Redis is down the partitions are paused and polling goes on; records that still
    /// arrive are kept in `held` for the next batch.
    async fn relay_batch<'a>(
        &'a self,
        batch: &[BorrowedMessage<'a>],
        stop: &CancellationToken,
        reader: &mut TopicReader,
        held: &mut Vec<BorrowedMessage<'a>>,
    ) -> bool {
        let now = now_ms();
        let timestamp = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut decoded: Vec<(usize, Decoded, i64)> = Vec::with_capacity(batch.len());
        for (i, msg) in batch.iter().enumerate() {
            let traceparent = kafka::header_str(msg.headers(), headers::TRACEPARENT);
            let from = Consumed {
                topic: &self.topic,
                partition: msg.partition(),
                offset: msg.offset(),
                group: &self.cfg.group,
            };
            match deliver::decode(
                &self.names,
                msg.payload(),
                traceparent,
                &from,
                now,
                &timestamp,
            ) {
                Ok(d) => {
                    let enqueued = kafka::header_str(msg.headers(), headers::ENQUEUED_AT_MS)
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(now);
                    decoded.push((i, d, enqueued));
                }
                Err(reason) => {
                    if !self.dead_letter(msg, &reason, stop).await {
                        return false;
                    }
                }
            }
        }
        let items: Vec<&deliver::Item> = decoded.iter().map(|(_, d, _)| &d.item).collect();
        let mut retry = 0u32;
        let mut paused = false;
        let written = loop {
            match deliver::write(
                &self.redis,
                &self.script,
                &self.names.audit_key(),
                &self.limits,
                &items,
            )
            .await
            {
                Ok(w) => break w,
                Err(e) => {
                    DeliverFailed {
                        retry,
                        records: items.len(),
                        class: redis_class(&e),
                        error: &e,
                    }
                    .emit();
                    if e.details().contains("NOSCRIPT") {
                        let _ = self.script.load(self.redis.next()).await;
                    }
                    if !paused {
                        paused = self.pause(true);
                    }
                    let delay = RetryPolicy::UNTIL_SHUTDOWN.jittered(retry);
                    retry += 1;
                    let waited = tokio::time::sleep(delay);
                    tokio::pin!(waited);
                    // Keep polling while waiting, so the group does not evict the relay.
                    loop {
                        tokio::select! {
                            () = &mut waited => break,
                            () = stop.cancelled() => return false,
                            m = self.consumer.recv() => match m {
                                Ok(m) => self.admit(reader, m, held),
                                Err(e) => tracing::debug!(error = %e, "consume error while paused"),
                            },
                        }
                    }
                }
            }
        };
        if paused {
            self.pause(false);
        }
        let (mut new, mut dup, mut deltas) = (0u64, 0u64, 0u64);
        for ((i, d, enqueued), w) in decoded.into_iter().zip(written) {
            match w {
                Written::Ok { new: true } if d.item.is_durable() => new += 1,
                Written::Ok { new: false } => dup += 1,
                Written::Ok { .. } => deltas += 1,
                Written::Refused(e) => {
                    let reason = format!("Redis refused the delivery: {e}");
                    if !self.dead_letter(&batch[i], &reason, stop).await {
                        return false;
                    }
                }
            }
            if let Some(span) = d.span {
                let latency = u64::try_from(now_ms() - enqueued).unwrap_or(0);
                span.in_scope(|| {
                    Relayed {
                        latency: Duration::from_millis(latency),
                    }
                    .emit();
                });
                drop(span);
            }
        }
        BatchRelayed {
            delivered: new,
            deltas,
            duplicates: dup,
        }
        .emit();
        true
    }

    /// Dead-letters `msg`. `false` only when shutdown interrupts; when the dead letter cannot
    /// be written for good the record is skipped with an error naming its offset (it stays
    /// in `responses` until retention), so one bad record never stops every user.
    async fn dead_letter(
        &self,
        msg: &BorrowedMessage<'_>,
        reason: &str,
        stop: &CancellationToken,
    ) -> bool {
        RecordDeadLettered {
            partition: msg.partition(),
            offset: msg.offset(),
            reason,
        }
        .emit();
        let headers = msg.headers().map(|h| h.detach()).unwrap_or_default();
        match self
            .dead_letters
            .write(
                msg.payload().unwrap_or_default(),
                msg.key(),
                headers,
                reason,
                stop,
            )
            .await
        {
            Ok(()) => true,
            Err(RetryError::Cancelled) => false,
            Err(e) => {
                tracing::error!(partition = msg.partition(), offset = msg.offset(), %reason, error = %e, "record skipped without a dead letter");
                true
            }
        }
    }

    /// Pauses (or resumes) every partition held; returns whether it took effect.
    fn pause(&self, pause: bool) -> bool {
        let Ok(assignment) = self.consumer.assignment() else {
            return false;
        };
        let result = if pause {
            self.consumer.pause(&assignment)
        } else {
            self.consumer.resume(&assignment)
        };
        if let Err(e) = &result {
            tracing::warn!(pause, error = %e, "pause/resume failed");
        }
        result.is_ok()
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
