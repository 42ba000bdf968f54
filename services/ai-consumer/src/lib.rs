//! Colloquy's AI consumer: `incoming_messages` → LLM → `responses`.
//!
//! Up to `max_active` messages are answered at once across all partitions, of which up to
//! `max_in_flight` are in an LLM call (the rest are claiming, or writing their answer); a user's
//! messages are answered in order (one lane per user, [`lanes`]); offsets are stored only up
//! to the lowest unfinished offset of each partition ([`offsets`]); every record's offset is
//! checked for gaps (a skipped record is fetched again, `colloquy_core::offset_gaps`); when
//! too many messages wait in lanes the partitions are paused (polling goes on, so the group
//! keeps the consumer), so memory stays bounded under any backlog.

pub mod claim;
pub mod config;
pub mod events;
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
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::producer::Producer;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use colloquy_core::config::{KafkaConfig, RedisConfig};
use colloquy_core::dead_letter::DeadLetters;
use colloquy_core::kafka::{Membership, ObservedContext, TopicReader};
use colloquy_core::names::Names;
use colloquy_core::records::{IncomingRecord, headers};
use colloquy_core::retry::RetryError;
use colloquy_core::{kafka, now_ms};

use crate::claim::Claims;
use crate::config::ConsumerConfig;
use crate::events::{AnswerPanicked, RecordUnreadable};
use crate::lanes::{Lanes, Pushed, Step, run_lane};
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
    membership: Arc<Membership>,
    worker: Arc<Worker>,
    incoming_topic: String,
    max_in_flight: usize,
    max_active: usize,
    max_queued: usize,
    max_queued_per_user: usize,
    rejoin_after: Duration,
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
        colloquy_core::metrics::record_build_info(events::SERVICE);
        if let Err(e) = kafka::ensure_topics(&kcfg, &names.all_topics()).await {
            tracing::warn!(error = %e, "could not ensure topics at start");
        }
        let incoming_topic = names.incoming_topic();
        let producer = kafka::producer(&kcfg, events::SERVICE).context("Kafka producer")?;
        let required = [
            incoming_topic.clone(),
            names.responses_topic(),
            names.incoming_dlq_topic(),
        ];
        kafka::require_topics(
            &producer,
            &kcfg.bootstrap_servers,
            &required,
            Duration::from_secs(30),
        )
        .await
        .context("refusing to start")?;
        let consumer = kafka::consumer(&kcfg, events::SERVICE, &cfg.group, &[&incoming_topic])
            .await
            .context("Kafka consumer")?;
        let membership = consumer.context().membership();
        let pool = colloquy_core::redis::pool(&redis)
            .await
            .context("Redis pool")?;
        // The lease owner: the static group instance id survives a restart, so a restarted
        // process takes over its predecessor's leases; otherwise a fresh id per process.
        let owner = kcfg
            .group_instance_id
            .clone()
            .unwrap_or_else(|| format!("{:x}-{}", rand::random::<u64>(), std::process::id()));
        let stop = CancellationToken::new();
        let ready = Arc::clone(&membership);
        let metrics_addr = colloquy_core::admin::serve(
            cfg.metrics_listen,
            Arc::new(move || ready.readiness()),
            stop.clone(),
        )
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
            llm_slots: Arc::new(Semaphore::new(cfg.max_in_flight.max(1))),
            claims: Claims::new(
                pool.clone(),
                names.clone(),
                &owner,
                Duration::from_secs(cfg.lease_secs.max(3)),
                Duration::from_secs(cfg.done_ttl_secs),
                Memory::new(cfg.memory_turns, Duration::from_secs(cfg.memory_ttl_secs)),
            ),
            redis: pool,
            dead_letters: DeadLetters::new(
                producer.clone(),
                names.incoming_dlq_topic(),
                events::SERVICE,
                kcfg.produce_timeout(),
            ),
            names: names.clone(),
            group: cfg.group.clone(),
            producer,
            responses_topic: names.responses_topic(),
            system_prompt: cfg.system_prompt.clone(),
            stream: cfg.stream,
            delta_batch_tokens: cfg.delta_batch_tokens.max(1),
            delta_batch: Duration::from_millis(cfg.delta_batch_ms),
            produce_timeout: kcfg.produce_timeout(),
            shutdown: stop.clone(),
            stored_answer: worker::stored_answer_script(),
        });
        Ok(Self {
            consumer: Arc::new(consumer),
            membership,
            worker,
            incoming_topic,
            max_in_flight: cfg.max_in_flight.max(1),
            max_active: cfg.max_active.max(cfg.max_in_flight).max(1),
            max_queued: cfg.max_queued.max(1),
            max_queued_per_user: cfg.max_queued_per_user.max(1),
            rejoin_after: Duration::from_secs(kcfg.rejoin_after_secs.max(1)),
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
    /// offsets (it is redelivered; its leases are released), stored offsets are committed and
    /// the producer flushed.
    ///
    /// # Errors
    /// Only on unrecoverable set-up failures; per-message errors are handled inside.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let permits = Arc::new(Semaphore::new(self.max_active));
        let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
        let lanes: Arc<Lanes<Job>> = Arc::new(Lanes::default());
        let progress = Arc::new(Notify::new());
        let tasks = TaskTracker::new();
        let mut reader = TopicReader::new(self.incoming_topic.clone());
        let mut paused = false;
        let rejoin = tokio::spawn(kafka::rejoin_when_idle(
            Arc::clone(&self.consumer),
            vec![self.incoming_topic.clone()],
            self.rejoin_after,
            self.stop.clone(),
        ));
        tracing::info!(topic = %self.incoming_topic, max_in_flight = self.max_in_flight, max_active = self.max_active, "ai-consumer running");
        loop {
            // A rebalance: per-partition state of what we no longer hold is forgotten, and
            // reading restarts from committed offsets (a rewind, never a gap).
            if reader.rebalanced(&self.membership) {
                let held = self.membership.partitions(&self.incoming_topic);
                lock(&tracker).retain(|p| held.contains(&p));
                paused = false;
            }
            // Backpressure: pause the partitions while lanes hold too much, resume at half.
            let queued = lanes.queued();
            if !paused && queued >= self.max_queued {
                paused = self.pause(true);
            } else if paused && queued <= self.max_queued / 2 {
                paused = !self.pause(false);
            }
            let msg = tokio::select! {
                () = progress.notified(), if paused => continue,
                m = reader.next(&self.consumer, !paused, &shutdown) => match m {
                    Some(m) => m,
                    None => break,
                },
            };
            let (partition, offset) = (msg.partition(), msg.offset());
            if !reader.admit(&*self.consumer, partition, offset) {
                continue;
            }
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
                    RecordUnreadable {
                        partition,
                        offset,
                        reason: &reason,
                    }
                    .emit();
                    let written = self
                        .worker
                        .dead_letters
                        .write(
                            msg.payload().unwrap_or_default(),
                            msg.key(),
                            OwnedHeaders::new(),
                            &reason,
                            &shutdown,
                        )
                        .await;
                    match written {
                        Ok(()) => self.finish(&tracker, partition, offset),
                        // The record stays the only copy: its offset is never stored, so the
                        // partition's commit point waits below it (lag shows it) and it is
                        // read again after a restart, when the DLQ may be writable.
                        Err(RetryError::Cancelled) => break,
                        Err(e) => {
                            tracing::error!(partition, offset, error = %e, "unreadable record kept unstored: its dead letter failed")
                        }
                    }
                    continue;
                }
            };
            drop(msg);
            let user = record.userid.clone();
            let job = Job {
                record,
                partition,
                offset,
                traceparent,
                enqueued_at_ms,
            };
            let first = match lanes.push(&user, job) {
                Pushed::Run(first) => first,
                Pushed::Queued(waiting) => {
                    if !paused && waiting >= self.max_queued_per_user {
                        tracing::info!(userid = %user, waiting, "one user's backlog is full; pausing");
                        paused = self.pause(true);
                    }
                    continue;
                }
            };
            // The user's lane was idle: run it until it drains.
            let (worker, lanes, tracker, consumer, topic, permits, stop, progress) = (
                Arc::clone(&self.worker),
                Arc::clone(&lanes),
                Arc::clone(&tracker),
                Arc::clone(&self.consumer),
                self.incoming_topic.clone(),
                Arc::clone(&permits),
                self.stop.clone(),
                Arc::clone(&progress),
            );
            tasks.spawn(async move {
                let recovery = Arc::clone(&worker);
                run_lane(
                    &lanes,
                    &user,
                    first,
                    &permits,
                    &stop,
                    |job| {
                        let worker = Arc::clone(&worker);
                        async move { step(worker.handle(&job).await) }
                    },
                    |job, panic| {
                        let worker = Arc::clone(&recovery);
                        async move {
                            AnswerPanicked {
                                userid: job.record.userid.as_str(),
                                msg_id: &job.record.msg_id,
                                partition: job.partition,
                                offset: job.offset,
                                panic: &panic,
                            }
                            .emit();
                            step(
                                worker
                                    .fail(&job, "internal error while answering; send it again")
                                    .await,
                            )
                        }
                    },
                    |job| {
                        store(&consumer, &topic, &tracker, job.partition, job.offset);
                        progress.notify_one();
                    },
                )
                .await;
            });
        }
        tracing::info!("ai-consumer stopping: abandoning unfinished work");
        self.stop.cancel();
        // The rejoin task holds the consumer too: wait for it, so the consumer is closed here,
        // not by whichever task happens to drop it last (perhaps after the broker has gone, when
        // librdkafka's close can wait forever).
        let _ = rejoin.await;
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

    /// Pauses (or resumes) every partition held; returns whether the call took effect.
    fn pause(&self, pause: bool) -> bool {
        let assignment = match self.consumer.assignment() {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "assignment unknown; backpressure not applied");
                return false;
            }
        };
        let result = if pause {
            self.consumer.pause(&assignment)
        } else {
            self.consumer.resume(&assignment)
        };
        match result {
            Ok(()) => {
                tracing::debug!(pause, partitions = assignment.count(), "backpressure");
                true
            }
            Err(e) => {
                tracing::warn!(pause, error = %e, "pause/resume failed");
                false
            }
        }
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
}

fn step(handled: Handled) -> Step {
    if handled == Handled::Abandoned {
        Step::Abandoned
    } else {
        Step::Done
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
