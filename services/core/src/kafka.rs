//! Kafka set-up: producers, consumers, topics and headers, configured once for the whole system.
//!
//! Producers use `acks=all` and are idempotent unless `KAFKA_IDEMPOTENCE=false` (tansu). Consumers
//! never auto-store offsets: a service stores
//! an offset only after the side effect of that record succeeded (rust-rdkafka's at-least-once
//! recipe), and auto-commit then commits what was stored.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::Offset;
use tokio_util::sync::CancellationToken;

use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::future_producer::Delivery;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;

use crate::config::{Assignment, KafkaConfig};
use crate::events::{
    CommitFailed, ConsumeFailed, ConsumerLag, GapSeen, GroupRejoined, OffsetGap,
    PartitionsAssigned, ProduceFailed, RecordsLost,
};
use crate::labels::KafkaOp;
use crate::metrics as m;
use crate::offset_gaps::{FetchState, GapDetector, Verdict};
use crate::retry::{RetryError, RetryPolicy, kafka_class, retry};

/// Errors setting up Kafka clients.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    #[error("cannot create Kafka {what} for {servers}: {source}")]
    Client {
        what: &'static str,
        servers: String,
        source: KafkaError,
    },
    #[error("cannot create topic {topic}: {reason}")]
    Topic { topic: String, reason: String },
    #[error(
        "required Kafka topics missing on {servers}: {missing} (create them, or let the service create them: it needs the right to)"
    )]
    MissingTopics { servers: String, missing: String },
    #[error("Kafka at {servers} unreachable: {reason}")]
    Unreachable { servers: String, reason: String },
}

/// A client configuration with the bootstrap servers and the operator's extra properties
/// (`KAFKA_PROPERTY_*`: TLS, SASL, ...); callers set their own properties after these, so the
/// delivery settings cannot be overridden from the environment.
fn base_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (key, value) in &cfg.properties {
        config.set(key, value);
    }
    config.set("bootstrap.servers", &cfg.bootstrap_servers);
    config
}

/// A producer (`acks=all`) for `service`: idempotent, or, with `KAFKA_IDEMPOTENCE=false`, one
/// request in flight per broker so that a retry cannot reorder a partition.
///
/// # Errors
/// When librdkafka refuses the configuration.
pub fn producer(cfg: &KafkaConfig, service: &str) -> Result<FutureProducer, KafkaSetupError> {
    let mut config = base_config(cfg);
    if cfg.idempotence {
        config.set("enable.idempotence", "true");
    } else {
        config
            .set("enable.idempotence", "false")
            .set("max.in.flight.requests.per.connection", "1");
    }
    config
        .set("client.id", service)
        .set("acks", "all")
        .set("linger.ms", cfg.linger_ms.to_string())
        .set("message.timeout.ms", cfg.produce_timeout_ms.to_string())
        .set("compression.type", "none")
        .set("queue.buffering.max.messages", "200000")
        .create()
        .map_err(|source| KafkaSetupError::Client {
            what: "producer",
            servers: cfg.bootstrap_servers.clone(),
            source,
        })
}

/// A consumer in `group` with offsets stored by hand, reporting lag and rebalances through
/// [`ObservedContext`], reading `topics`: subscribed through the group protocol, or, with
/// [`Assignment::All`], every partition of them assigned by hand (no group membership, so no
/// coordinator can leave it without partitions; offsets are still committed to `group`).
/// Registers each topic's zero series of `colloquy_consumer_offset_gaps_total`.
///
/// # Errors
/// When librdkafka refuses the configuration or the subscription, or (with
/// [`Assignment::All`]) the topics' partitions cannot be read within `timeout`.
pub async fn consumer(
    cfg: &KafkaConfig,
    service: &'static str,
    group: &str,
    topics: &[&str],
) -> Result<StreamConsumer<ObservedContext>, KafkaSetupError> {
    for topic in topics {
        m::register_topic_series(m::OFFSET_GAPS, service, topic);
        m::register_topic_series(m::RECORDS_LOST, service, topic);
    }
    let mut config = base_config(cfg);
    if let (Some(id), Assignment::Group) = (&cfg.group_instance_id, cfg.assignment) {
        config.set("group.instance.id", id);
    }
    let consumer: StreamConsumer<ObservedContext> = config
        .set("group.id", group)
        .set("client.id", service)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "500")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", cfg.fetch_wait_max_ms.to_string())
        .set("fetch.min.bytes", "1")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("queued.max.messages.kbytes", "16384")
        .set("statistics.interval.ms", "5000")
        .create_with_context(ObservedContext {
            service,
            membership: Arc::new(Membership::new(service)),
        })
        .map_err(|source| KafkaSetupError::Client {
            what: "consumer",
            servers: cfg.bootstrap_servers.clone(),
            source,
        })?;
    match cfg.assignment {
        Assignment::Group => {
            consumer
                .subscribe(topics)
                .map_err(|source| KafkaSetupError::Client {
                    what: "subscription",
                    servers: cfg.bootstrap_servers.clone(),
                    source,
                })?;
            Ok(consumer)
        }
        Assignment::All => assign_all(consumer, cfg, topics).await,
    }
}

/// Assigns every partition of `topics` to `consumer` from its committed offsets.
async fn assign_all(
    consumer: StreamConsumer<ObservedContext>,
    cfg: &KafkaConfig,
    topics: &[&str],
) -> Result<StreamConsumer<ObservedContext>, KafkaSetupError> {
    let servers = cfg.bootstrap_servers.clone();
    let unreachable = |reason: String| KafkaSetupError::Unreachable {
        servers: servers.clone(),
        reason,
    };
    let wanted: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
    let timeout = METADATA_TIMEOUT;
    let (consumer, partitions) = tokio::task::spawn_blocking(move || {
        let md = consumer.fetch_metadata(None, timeout);
        let partitions = md.map(|md| {
            md.topics()
                .iter()
                .filter(|t| wanted.iter().any(|w| w == t.name()))
                .flat_map(|t| {
                    t.partitions()
                        .iter()
                        .map(|p| (t.name().to_owned(), p.id()))
                        .collect::<Vec<_>>()
                })
                .collect::<BTreeSet<_>>()
        });
        (consumer, partitions)
    })
    .await
    .map_err(|e| unreachable(e.to_string()))?;
    let partitions = partitions.map_err(|e| unreachable(e.to_string()))?;
    let missing: Vec<&str> = topics
        .iter()
        .copied()
        .filter(|t| !partitions.iter().any(|(name, _)| name == t))
        .collect();
    if !missing.is_empty() {
        return Err(KafkaSetupError::MissingTopics {
            servers: cfg.bootstrap_servers.clone(),
            missing: missing.join(", "),
        });
    }
    let mut tpl = rdkafka::TopicPartitionList::new();
    for (topic, partition) in &partitions {
        tpl.add_partition_offset(topic, *partition, Offset::Stored)
            .map_err(|source| KafkaSetupError::Client {
                what: "assignment",
                servers: cfg.bootstrap_servers.clone(),
                source,
            })?;
    }
    consumer
        .assign(&tpl)
        .map_err(|source| KafkaSetupError::Client {
            what: "assignment",
            servers: cfg.bootstrap_servers.clone(),
            source,
        })?;
    // Where reading starts: a committed offset can sit inside a record batch, and tansu's
    // memory engine answers such a fetch from the next batch; the gap detector is told.
    let (consumer, committed) = tokio::task::spawn_blocking(move || {
        let committed = consumer.committed_offsets(tpl, METADATA_TIMEOUT);
        (consumer, committed)
    })
    .await
    .map_err(|e| unreachable(e.to_string()))?;
    let starts = committed
        .map_err(|e| unreachable(format!("committed offsets: {e}")))?
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some(((e.topic().to_owned(), e.partition()), o)),
            _ => None,
        })
        .collect();
    let membership = consumer.context().membership();
    *membership.starts() = starts;
    membership.update(|a| a.extend(partitions));
    tracing::info!(
        service = membership.service,
        partitions = membership.partition_count(),
        "assigned every partition by hand (KAFKA_ASSIGNMENT=all)"
    );
    Ok(consumer)
}

/// How long a start-up metadata request may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(30);

/// Which partitions a consumer holds, kept up to date by its rebalance callbacks.
///
/// It answers readiness (a consumer that holds no partitions consumes nothing: tansu 0.6 has
/// left a restarted member with none, for minutes), tells the consume loop that a rebalance
/// happened (so per-partition state is forgotten), and times how long the consumer has held
/// nothing (so [`rejoin_when_idle`] can rejoin the group).
#[derive(Debug)]
pub struct Membership {
    service: &'static str,
    assigned: Mutex<BTreeSet<(String, i32)>>,
    empty_since: Mutex<Option<Instant>>,
    generation: AtomicU64,
    starts: Mutex<std::collections::BTreeMap<(String, i32), i64>>,
    fetch_states: Mutex<std::collections::BTreeMap<(String, i32), FetchState>>,
}

impl Membership {
    fn new(service: &'static str) -> Self {
        Self {
            service,
            assigned: Mutex::new(BTreeSet::new()),
            empty_since: Mutex::new(Some(Instant::now())),
            generation: AtomicU64::new(0),
            starts: Mutex::new(std::collections::BTreeMap::new()),
            fetch_states: Mutex::new(std::collections::BTreeMap::new()),
        }
    }

    fn assigned(&self) -> std::sync::MutexGuard<'_, BTreeSet<(String, i32)>> {
        self.assigned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn update(&self, f: impl FnOnce(&mut BTreeSet<(String, i32)>)) {
        let count = {
            let mut assigned = self.assigned();
            f(&mut assigned);
            assigned.len()
        };
        *self
            .empty_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = (count == 0).then(Instant::now);
        self.generation.fetch_add(1, Ordering::AcqRel);
        PartitionsAssigned {
            service: self.service,
            count,
        }
        .emit();
    }

    fn starts(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<(String, i32), i64>> {
        self.starts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The committed offsets reading of `topic` started from, where known (manual assignment).
    #[must_use]
    pub fn start_offsets(&self, topic: &str) -> Vec<(i32, i64)> {
        self.starts()
            .iter()
            .filter(|((t, _), _)| t == topic)
            .map(|((_, p), o)| (*p, *o))
            .collect()
    }

    /// What the client reported of each partition of `topic` in its last statistics.
    #[must_use]
    pub fn fetch_states(&self, topic: &str) -> std::collections::BTreeMap<i32, FetchState> {
        self.fetch_states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|((t, _), _)| t == topic)
            .map(|((_, p), f)| (*p, *f))
            .collect()
    }

    /// Partitions of `topic` held now.
    #[must_use]
    pub fn partitions(&self, topic: &str) -> std::collections::HashSet<i32> {
        self.assigned()
            .iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, p)| *p)
            .collect()
    }

    /// Partitions held now.
    #[must_use]
    pub fn partition_count(&self) -> usize {
        self.assigned().len()
    }

    /// Ready to consume: the consumer holds at least one partition.
    ///
    /// # Errors
    /// A reason to report on `/ready` when it holds none.
    pub fn readiness(&self) -> Result<(), String> {
        if self.partition_count() > 0 {
            Ok(())
        } else {
            Err(format!("{} holds no partitions", self.service))
        }
    }

    /// Increases with every rebalance; a consume loop compares it to forget revoked state.
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// How long the consumer has held no partitions (`None` while it holds some).
    #[must_use]
    pub fn empty_for(&self) -> Option<Duration> {
        self.empty_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .map(|t| t.elapsed())
    }
}

/// Consumer context that logs rebalances and commits, tracks the assignment and exports lag per partition.
#[derive(Clone, Debug)]
pub struct ObservedContext {
    service: &'static str,
    membership: Arc<Membership>,
}

impl ObservedContext {
    /// The consumer's partitions.
    #[must_use]
    pub fn membership(&self) -> Arc<Membership> {
        Arc::clone(&self.membership)
    }
}

impl ClientContext for ObservedContext {
    fn stats(&self, statistics: Statistics) {
        let mut fetch_states = self
            .membership
            .fetch_states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 && p.hi_offset >= 0 {
                    fetch_states.insert(
                        (topic.clone(), *partition),
                        FetchState {
                            high_watermark: p.hi_offset,
                            position: p.next_offset,
                            queued: p.fetchq_cnt,
                        },
                    );
                }
                if *partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                ConsumerLag {
                    service: self.service,
                    topic,
                    partition: *partition,
                    lag: p.consumer_lag,
                }
                .emit();
            }
        }
    }
}

impl ConsumerContext for ObservedContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        tracing::info!(service = self.service, rebalance = ?rebalance, "partition rebalance starting");
    }
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => self.membership.update(|a| {
                a.extend(
                    tpl.elements()
                        .iter()
                        .map(|e| (e.topic().to_owned(), e.partition())),
                );
            }),
            Rebalance::Revoke(tpl) => self.membership.update(|a| {
                for e in tpl.elements() {
                    a.remove(&(e.topic().to_owned(), e.partition()));
                }
            }),
            Rebalance::Error(_) => {}
        }
        tracing::info!(
            service = self.service,
            rebalance = ?rebalance,
            partitions = self.membership.partition_count(),
            "partition rebalance done"
        );
    }
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &rdkafka::TopicPartitionList) {
        match result {
            Ok(()) => tracing::trace!(service = self.service, ?offsets, "offsets committed"),
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => CommitFailed {
                service: self.service,
                error: &e,
            }
            .emit(),
        }
    }
}

/// Rejoins the group whenever `consumer` has held no partitions for `after` (doubling up to
/// ten times that while it stays empty), until `shutdown`. A healthy group assigns within
/// seconds; a member that sits unassigned longer was forgotten by the coordinator.
pub async fn rejoin_when_idle<C>(
    consumer: Arc<C>,
    topics: Vec<String>,
    after: Duration,
    shutdown: CancellationToken,
) where
    C: Consumer<ObservedContext> + Send + Sync + 'static,
{
    let membership = consumer.context().membership();
    let service = membership.service;
    let mut bound = after;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        match membership.empty_for() {
            None => bound = after,
            Some(empty) if empty >= bound => {
                GroupRejoined {
                    service,
                    empty_for: empty,
                }
                .emit();
                let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
                consumer.unsubscribe();
                if let Err(e) = consumer.subscribe(&topics) {
                    tracing::error!(service, error = %e, "re-subscribe failed");
                }
                // Restart the clock: the next rejoin waits a full (longer) bound.
                membership.update(|_| {});
                bound = (bound * 2).min(after * 10);
            }
            Some(_) => {}
        }
    }
}

/// What both consume loops (ai-consumer, relay) keep around `recv()` for one topic: offset-gap
/// state restarted at every rebalance, the periodic stall check, and a pause after a consume
/// error, so neither loop repeats them.
#[derive(Debug)]
pub struct TopicReader {
    topic: String,
    gaps: GapDetector,
    generation: Option<u64>,
    stall_check: tokio::time::Interval,
}

impl TopicReader {
    /// A reader of `topic`; its first [`TopicReader::rebalanced`] is `true`.
    #[must_use]
    pub fn new(topic: impl Into<String>) -> Self {
        Self {
            topic: topic.into(),
            gaps: GapDetector::default(),
            generation: None,
            stall_check: tokio::time::interval(STALL_CHECK),
        }
    }

    /// The topic read.
    #[must_use]
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Whether the assignment changed since the last call; if so, gap detection restarts from
    /// the new assignment's start offsets (a rewind, never a gap).
    pub fn rebalanced(&mut self, membership: &Membership) -> bool {
        let generation = membership.generation();
        if self.generation == Some(generation) {
            return false;
        }
        self.generation = Some(generation);
        reset_gaps(&mut self.gaps, membership, &self.topic);
        true
    }

    /// The next record, `None` at shutdown. While waiting, every [`STALL_CHECK`] it seeks back
    /// on partitions whose reading stalled (when `heal`: not while the loop holds the
    /// partitions paused); a consume error is logged and followed by a 100 ms pause.
    pub async fn next<'c>(
        &mut self,
        consumer: &'c StreamConsumer<ObservedContext>,
        heal: bool,
        shutdown: &CancellationToken,
    ) -> Option<BorrowedMessage<'c>> {
        let service = consumer.context().service;
        loop {
            let received = tokio::select! {
                () = shutdown.cancelled() => return None,
                _ = self.stall_check.tick(), if heal => {
                    let states = consumer.context().membership.fetch_states(&self.topic);
                    heal_stalled(service, consumer, &mut self.gaps, &self.topic, &states);
                    continue;
                }
                m = consumer.recv() => m,
            };
            match received {
                Ok(m) => return Some(m),
                Err(e) => {
                    ConsumeFailed { service, error: &e }.emit();
                    tokio::select! {
                        () = shutdown.cancelled() => return None,
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            }
        }
    }

    /// Whether to process the record at `partition`/`offset` ([`admit_offset`]).
    pub fn admit<C>(&mut self, consumer: &C, partition: i32, offset: i64) -> bool
    where
        C: Consumer<ObservedContext>,
    {
        admit_offset(consumer, &mut self.gaps, &self.topic, partition, offset)
    }
}

/// Judges a consumed record's offset with `gaps`; on a jump, counts and logs it and seeks
/// `consumer` back to the first missing offset. Returns whether to process the record.
pub fn admit_offset<C>(
    consumer: &C,
    gaps: &mut GapDetector,
    topic: &str,
    partition: i32,
    offset: i64,
) -> bool
where
    C: Consumer<ObservedContext>,
{
    admit_offset_for(
        consumer.context().service,
        consumer,
        gaps,
        topic,
        partition,
        offset,
    )
}

/// [`admit_offset`] for a consumer with any context, counted under `service`.
pub fn admit_offset_for<C, X>(
    service: &'static str,
    consumer: &C,
    gaps: &mut GapDetector,
    topic: &str,
    partition: i32,
    offset: i64,
) -> bool
where
    C: Consumer<X>,
    X: ConsumerContext,
{
    match gaps.observe(partition, offset) {
        Verdict::Process => true,
        Verdict::Skip => false,
        Verdict::Gap {
            expected,
            got,
            seek_to,
        } => {
            OffsetGap {
                service,
                topic,
                partition,
                expected,
                seen: GapSeen::Jumped { got },
                seek_to,
            }
            .emit();
            seek_back(service, consumer, gaps, topic, partition, seek_to);
            false
        }
        Verdict::GapAccepted { expected, missing } => {
            RecordsLost {
                service,
                topic,
                partition,
                expected,
                missing,
            }
            .emit();
            true
        }
    }
}

/// Every few seconds: seeks back on each partition whose reading has stalled below its high
/// watermark (see [`GapDetector::stalled`]), counted and logged as a gap.
/// `fetch_states` are the latest known per partition (from the client's statistics).
pub fn heal_stalled<C, X>(
    service: &'static str,
    consumer: &C,
    gaps: &mut GapDetector,
    topic: &str,
    fetch_states: &std::collections::BTreeMap<i32, FetchState>,
) where
    C: Consumer<X>,
    X: ConsumerContext,
{
    let partitions: Vec<i32> = gaps.partitions().collect();
    for partition in partitions {
        let Some(&fetch) = fetch_states.get(&partition) else {
            continue;
        };
        let Some((expected, seek_to)) = gaps.stalled(partition, fetch) else {
            continue;
        };
        OffsetGap {
            service,
            topic,
            partition,
            expected,
            seen: GapSeen::Stalled {
                high_watermark: fetch.high_watermark,
            },
            seek_to,
        }
        .emit();
        seek_back(service, consumer, gaps, topic, partition, seek_to);
    }
}

/// Seeks `partition` (whose gap was just emitted) to `seek_to`; when the seek fails the
/// partition's state is forgotten (it is read again from its committed offset after a rebalance).
fn seek_back<C, X>(
    service: &'static str,
    consumer: &C,
    gaps: &mut GapDetector,
    topic: &str,
    partition: i32,
    seek_to: i64,
) where
    C: Consumer<X>,
    X: ConsumerContext,
{
    if let Err(e) = consumer.seek(
        topic,
        partition,
        Offset::Offset(seek_to),
        Duration::from_secs(2),
    ) {
        tracing::error!(service, topic, partition, error = %e, "seek back failed; the partition will be re-read after a rebalance");
        gaps.forget(partition);
    }
}

/// After an assignment changed: forgets every partition's reading state, and tells `gaps`
/// where reading of `topic` starts where that is known (the committed offsets of a manual
/// assignment), so a first record further on is a gap too.
pub fn reset_gaps(gaps: &mut GapDetector, membership: &Membership, topic: &str) {
    gaps.clear();
    for (partition, offset) in membership.start_offsets(topic) {
        gaps.expect(partition, offset);
    }
}

/// How often consumers look for reading stalled below the high watermark.
pub const STALL_CHECK: Duration = Duration::from_secs(2);

/// Creates every topic in `topics` that does not exist yet.
///
/// # Errors
/// When the broker is unreachable or refuses a topic for any reason but "already exists".
pub async fn ensure_topics(cfg: &KafkaConfig, topics: &[String]) -> Result<(), KafkaSetupError> {
    let admin: AdminClient<DefaultClientContext> =
        base_config(cfg)
            .create()
            .map_err(|source| KafkaSetupError::Client {
                what: "admin client",
                servers: cfg.bootstrap_servers.clone(),
                source,
            })?;
    let min_insync = cfg.min_insync_replicas.map(|n| n.to_string());
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            let topic = NewTopic::new(
                t,
                cfg.partitions,
                TopicReplication::Fixed(cfg.replication_factor),
            );
            match &min_insync {
                Some(n) => topic.set("min.insync.replicas", n),
                None => topic,
            }
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(&new, &opts)
        .await
        .map_err(|e| KafkaSetupError::Topic {
            topic: topics.join(","),
            reason: e.to_string(),
        })?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaSetupError::Topic {
                    topic,
                    reason: code.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Fails unless every topic in `topics` exists with at least one partition, so a service
/// refuses to start (naming what is missing) rather than retrying produces forever.
///
/// # Errors
/// [`KafkaSetupError::MissingTopics`] naming them, or [`KafkaSetupError::Unreachable`] when
/// the broker does not answer within `timeout`.
pub async fn require_topics(
    producer: &FutureProducer,
    servers: &str,
    topics: &[String],
    timeout: Duration,
) -> Result<(), KafkaSetupError> {
    let producer = producer.clone();
    let wanted = topics.to_vec();
    let found = tokio::task::spawn_blocking(move || {
        producer.client().fetch_metadata(None, timeout).map(|md| {
            md.topics()
                .iter()
                .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                .map(|t| t.name().to_owned())
                .collect::<BTreeSet<_>>()
        })
    })
    .await
    .map_err(|e| KafkaSetupError::Unreachable {
        servers: servers.to_owned(),
        reason: e.to_string(),
    })?
    .map_err(|e| KafkaSetupError::Unreachable {
        servers: servers.to_owned(),
        reason: e.to_string(),
    })?;
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|t| !found.contains(t.as_str()))
        .map(String::as_str)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(KafkaSetupError::MissingTopics {
            servers: servers.to_owned(),
            missing: missing.join(", "),
        })
    }
}

/// Whether the broker behind `producer` answers a metadata request within `timeout` (readiness).
pub async fn is_reachable(producer: &FutureProducer, timeout: Duration) -> bool {
    let producer = producer.clone();
    // fetch_metadata blocks the calling thread; keep it off the async workers.
    tokio::task::spawn_blocking(move || producer.client().fetch_metadata(None, timeout).is_ok())
        .await
        .unwrap_or(false)
}

/// Headers carried by every record: W3C trace context, message id and enqueue time.
#[must_use]
pub fn record_headers(
    traceparent: Option<&str>,
    msg_id: &str,
    enqueued_at_ms: i64,
) -> OwnedHeaders {
    let enqueued = enqueued_at_ms.to_string();
    let mut h = OwnedHeaders::new_with_capacity(3).insert(Header {
        key: crate::records::headers::MSG_ID,
        value: Some(msg_id),
    });
    if let Some(tp) = traceparent {
        h = h.insert(Header {
            key: crate::records::headers::TRACEPARENT,
            value: Some(tp),
        });
    }
    h.insert(Header {
        key: crate::records::headers::ENQUEUED_AT_MS,
        value: Some(&enqueued),
    })
}

/// The UTF-8 value of header `name`, if present.
#[must_use]
pub fn header_str<'a, H: Headers>(headers: Option<&'a H>, name: &str) -> Option<&'a str> {
    let headers = headers?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// Produces one record, retrying transient failures until the broker acknowledges or
/// `shutdown` fires; permanent failures (topic missing, record too large, not authorised)
/// return at once. Every failure is counted as `colloquy_kafka_errors_total{service,op}`.
/// Returns where the broker stored the record.
///
/// # Errors
/// [`RetryError`] saying why the record is not in the topic.
#[allow(clippy::too_many_arguments)]
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    key: &[u8],
    payload: &[u8],
    headers: &OwnedHeaders,
    timeout: Duration,
    shutdown: &CancellationToken,
    (service, op): (&'static str, KafkaOp),
) -> Result<Delivery, RetryError<KafkaError>> {
    retry(
        RetryPolicy::UNTIL_SHUTDOWN,
        shutdown,
        kafka_class,
        |e, attempt, class| {
            ProduceFailed {
                service,
                topic,
                op,
                attempt,
                class,
                error: e,
            }
            .emit();
        },
        || async {
            let record = FutureRecord::to(topic)
                .key(key)
                .payload(payload)
                .headers(headers.clone());
            producer
                .send(record, Timeout::After(timeout))
                .await
                .map_err(|(e, _)| e)
        },
    )
    .await
}
