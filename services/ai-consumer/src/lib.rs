//! Colloquy's AI consumer: `incoming_messages` → LLM → `responses`.
//!
//! Up to `max_in_flight` messages are answered at once across all partitions; a user's
//! messages are answered in order (one lane per user); offsets are stored only up to the
//! lowest unfinished offset of each partition; when the limit is reached consumption pauses,
//! so memory stays bounded under any backlog.

pub mod claim;
pub mod config;
pub mod lanes;
pub mod llm;
pub mod memory;
pub mod offsets;
pub mod worker;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Message};
use rdkafka::producer::{FutureRecord, Producer};
use rdkafka::util::Timeout;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use colloquy_core::config::{KafkaConfig, RedisConfig};
use colloquy_core::kafka::ObservedContext;
use colloquy_core::names::Names;
use colloquy_core::records::{IncomingRecord, headers};
use colloquy_core::{kafka, metrics as m, now_ms};

use crate::claim::Claims;
use crate::config::ConsumerConfig;
use crate::lanes::Lanes;
use crate::llm::LlmClient;
use crate::memory::Memory;
use crate::offsets::OffsetTracker;
use crate::worker::{Handled, Job, Worker};

/// Everything the ai-consumer needs to start.
#[derive(Clone, Debug)]
pub struct Settings {
    pub consumer: ConsumerConfig,
    pub kafka: KafkaConfig,
    pub redis: RedisConfig,
    pub names: Names,
}

/// A built ai-consumer, subscribed, not yet consuming.
pub struct Application {
    consumer: Arc<StreamConsumer<ObservedContext>>,
    worker: Arc<Worker>,
    incoming_topic: String,
    max_in_flight: usize,
    grace: Duration,
    metrics_addr: SocketAddr,
    stop: CancellationToken,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("topic", &self.incoming_topic)
            .finish_non_exhaustive()
    }
}

impl Application {
    /// Connects, creates topics if needed, subscribes and starts the metrics endpoint.
    ///
    /// # Errors
    /// When configuration is invalid or the metrics address cannot be bound.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let Settings {
            consumer: cfg,
            kafka: kcfg,
            redis,
            names,
        } = settings;
        colloquy_core::metrics::record_build_info("ai-consumer");
        if let Err(e) = kafka::ensure_topics(&kcfg, &names.all_topics()).await {
            tracing::warn!(error = %e, "could not ensure topics at start");
        }
        let incoming_topic = names.incoming_topic();
        let consumer = kafka::consumer(&kcfg, "ai-consumer", &cfg.group, &[&incoming_topic])
            .context("Kafka consumer")?;
        let producer = kafka::producer(&kcfg, "ai-consumer").context("Kafka producer")?;
        let pool = colloquy_core::redis::pool(&redis)
            .await
            .context("Redis pool")?;
        let instance = uuid_like();
        let stop = CancellationToken::new();
        let metrics_addr = colloquy_core::admin::serve(cfg.metrics_listen, stop.clone())
            .await
            .with_context(|| format!("cannot listen on {}", cfg.metrics_listen))?;
        let llm = LlmClient::new(
            &cfg.base_url,
            cfg.api_key.clone(),
            cfg.model.clone(),
            cfg.stream,
            cfg.request_timeout(),
            cfg.backoff(),
        )
        .context("HTTP client")?;
        let worker = Arc::new(Worker {
            llm,
            claims: Claims::new(
                pool.clone(),
                names.clone(),
                &instance,
                Duration::from_secs(cfg.lease_secs),
                Duration::from_secs(cfg.done_ttl_secs),
            ),
            memory: Memory::new(
                pool,
                names.clone(),
                cfg.memory_turns,
                Duration::from_secs(cfg.memory_ttl_secs),
            ),
            producer,
            responses_topic: names.responses_topic(),
            dlq_topic: names.incoming_dlq_topic(),
            system_prompt: cfg.system_prompt.clone(),
            stream: cfg.stream,
            delta_batch_tokens: cfg.delta_batch_tokens.max(1),
            delta_batch: Duration::from_millis(cfg.delta_batch_ms),
            produce_timeout: kcfg.produce_timeout(),
            shutdown: stop.clone(),
        });
        Ok(Self {
            consumer: Arc::new(consumer),
            worker,
            incoming_topic,
            max_in_flight: cfg.max_in_flight.max(1),
            grace: Duration::from_secs(cfg.shutdown_grace_secs),
            metrics_addr,
            stop,
        })
    }

    /// Where `/metrics` and `/health` are served.
    #[must_use]
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// Consumes until `shutdown` fires. Unfinished work is then abandoned without storing its
    /// offsets (it is redelivered), stored offsets are committed and the producer flushed.
    ///
    /// # Errors
    /// Only on unrecoverable set-up failures; per-message errors are handled inside.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let permits = Arc::new(Semaphore::new(self.max_in_flight));
        let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
        let lanes: Arc<Lanes<(Job, tokio::sync::OwnedSemaphorePermit)>> =
            Arc::new(Lanes::default());
        let tasks = TaskTracker::new();
        tracing::info!(topic = %self.incoming_topic, max_in_flight = self.max_in_flight, "ai-consumer running");
        loop {
            // Backpressure: take a slot before reading, so at most max_in_flight records are held.
            let permit = tokio::select! {
                () = shutdown.cancelled() => break,
                p = Arc::clone(&permits).acquire_owned() => p.context("semaphore closed")?,
            };
            let msg = tokio::select! {
                () = shutdown.cancelled() => break,
                m = self.consumer.recv() => m,
            };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    metrics::counter!(m::KAFKA_ERRORS, "service" => "ai-consumer", "op" => "consume").increment(1);
                    tracing::warn!(error = %e, "consume error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (partition, offset) = (msg.partition(), msg.offset());
            lock(&tracker).start(partition, offset);
            let traceparent =
                kafka::header_str(msg.headers(), headers::TRACEPARENT).map(str::to_owned);
            let enqueued_at_ms = kafka::header_str(msg.headers(), headers::ENQUEUED_AT_MS)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(now_ms);
            let record = match msg.payload().map(serde_json::from_slice::<IncomingRecord>) {
                Some(Ok(r)) if r.v == colloquy_core::records::SCHEMA_VERSION => r,
                other => {
                    let reason = match other {
                        None => "empty payload".to_owned(),
                        Some(Ok(r)) => format!("unsupported schema version {}", r.v),
                        Some(Err(e)) => format!("unreadable record: {e}"),
                    };
                    self.dead_letter_raw(msg.payload().unwrap_or_default(), msg.key(), &reason)
                        .await;
                    self.finish(&tracker, partition, offset);
                    continue;
                }
            };
            drop(msg);
            let job = Job {
                record,
                partition,
                offset,
                traceparent,
                enqueued_at_ms,
            };
            let user = job.record.userid.clone();
            metrics::gauge!(m::LLM_IN_FLIGHT).increment(1.0);
            let Some(first) = lanes.push(&user, (job, permit)) else {
                continue;
            };
            // The user's lane was idle: run it until it drains.
            let (worker, lanes, tracker, consumer, topic) = (
                Arc::clone(&self.worker),
                Arc::clone(&lanes),
                Arc::clone(&tracker),
                Arc::clone(&self.consumer),
                self.incoming_topic.clone(),
            );
            tasks.spawn(async move {
                let mut next = Some(first);
                while let Some((job, permit)) = next {
                    let handled = worker.handle(&job).await;
                    metrics::gauge!(m::LLM_IN_FLIGHT).decrement(1.0);
                    drop(permit);
                    if handled == Handled::Abandoned {
                        // Shutdown: leave this and every later offset of the lane unstored.
                        while lanes.next(&user).is_some() {
                            metrics::gauge!(m::LLM_IN_FLIGHT).decrement(1.0);
                        }
                        return;
                    }
                    store(&consumer, &topic, &tracker, job.partition, job.offset);
                    next = lanes.next(&user);
                }
            });
        }
        tracing::info!("ai-consumer stopping: abandoning unfinished work");
        self.stop.cancel();
        tasks.close();
        if tokio::time::timeout(self.grace, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("workers did not stop within the grace period");
        }
        let consumer = Arc::clone(&self.consumer);
        let producer = self.worker.producer.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::debug!(error = %e, "final commit");
            }
            let _ = producer.flush(Duration::from_secs(5));
        })
        .await;
        tracing::info!("ai-consumer stopped");
        Ok(())
    }

    fn finish(&self, tracker: &Mutex<OffsetTracker>, partition: i32, offset: i64) {
        store(
            &self.consumer,
            &self.incoming_topic,
            tracker,
            partition,
            offset,
        );
    }

    async fn dead_letter_raw(&self, payload: &[u8], key: Option<&[u8]>, reason: &str) {
        tracing::warn!(%reason, "record dead-lettered");
        let headers = rdkafka::message::OwnedHeaders::new().insert(Header {
            key: "dlq_reason",
            value: Some(reason),
        });
        let mut record = FutureRecord::to(&self.worker.dlq_topic)
            .payload(payload)
            .headers(headers);
        if let Some(k) = key {
            record = record.key(k);
        }
        match self.worker.producer.send(record, Timeout::After(Duration::from_secs(30))).await {
            Ok(_) => metrics::counter!(m::DLQ_WRITES, "service" => "ai-consumer", "topic" => self.worker.dlq_topic.clone()).increment(1),
            Err((e, _)) => {
                metrics::counter!(m::KAFKA_ERRORS, "service" => "ai-consumer", "op" => "dlq").increment(1);
                tracing::error!(error = %e, %reason, "dead letter not written");
            }
        }
        metrics::counter!(m::MESSAGES, "service" => "ai-consumer", "outcome" => "dead_lettered")
            .increment(1);
    }
}

fn lock(t: &Mutex<OffsetTracker>) -> std::sync::MutexGuard<'_, OffsetTracker> {
    t.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn store(
    consumer: &StreamConsumer<ObservedContext>,
    topic: &str,
    tracker: &Mutex<OffsetTracker>,
    partition: i32,
    offset: i64,
) {
    let Some(next) = lock(tracker).finish(partition, offset) else {
        return;
    };
    // librdkafka stores `offset + 1`: pass the last finished offset.
    if let Err(e) = consumer.store_offset(topic, partition, next - 1) {
        // The partition was revoked meanwhile; its new owner will redo the unstored work.
        tracing::debug!(partition, error = %e, "offset not stored");
    }
}

fn uuid_like() -> String {
    format!("{:x}-{}", rand::random::<u64>(), std::process::id())
}
