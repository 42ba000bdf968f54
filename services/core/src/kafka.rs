//! Kafka set-up: producers, consumers, topics and headers, configured once for the whole system.
//!
//! Producers are idempotent with `acks=all`. Consumers never auto-store offsets: a service stores
//! an offset only after the side effect of that record succeeded (rust-rdkafka's at-least-once
//! recipe), and auto-commit then commits what was stored.

use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;
use crate::metrics as m;

/// Errors setting up Kafka clients.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    #[error("cannot create Kafka {what} for {servers}: {source}")]
    Client {
        what: &'static str,
        servers: String,
        source: rdkafka::error::KafkaError,
    },
    #[error("cannot create topic {topic}: {reason}")]
    Topic { topic: String, reason: String },
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

/// An idempotent producer (`acks=all`) for `service`.
///
/// # Errors
/// When librdkafka refuses the configuration.
pub fn producer(cfg: &KafkaConfig, service: &str) -> Result<FutureProducer, KafkaSetupError> {
    base_config(cfg)
        .set("client.id", service)
        .set("acks", "all")
        .set("enable.idempotence", "true")
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

/// A consumer in `group` with offsets stored by hand, reporting lag and rebalances through [`ObservedContext`].
///
/// # Errors
/// When librdkafka refuses the configuration or the subscription.
pub fn consumer(
    cfg: &KafkaConfig,
    service: &'static str,
    group: &str,
    topics: &[&str],
) -> Result<StreamConsumer<ObservedContext>, KafkaSetupError> {
    let mut config = base_config(cfg);
    if let Some(id) = &cfg.group_instance_id {
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
        .create_with_context(ObservedContext { service })
        .map_err(|source| KafkaSetupError::Client {
            what: "consumer",
            servers: cfg.bootstrap_servers.clone(),
            source,
        })?;
    consumer
        .subscribe(topics)
        .map_err(|source| KafkaSetupError::Client {
            what: "subscription",
            servers: cfg.bootstrap_servers.clone(),
            source,
        })?;
    Ok(consumer)
}

/// Consumer context that logs rebalances and commits and exports lag per partition.
#[derive(Clone, Copy, Debug)]
pub struct ObservedContext {
    service: &'static str,
}

impl ClientContext for ObservedContext {
    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                metrics::gauge!(m::CONSUMER_LAG, "service" => self.service, "topic" => topic.clone(), "partition" => partition.to_string())
                    .set(p.consumer_lag as f64);
            }
        }
    }
}

impl ConsumerContext for ObservedContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        tracing::info!(service = self.service, rebalance = ?rebalance, "partition rebalance starting");
    }
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        tracing::info!(service = self.service, rebalance = ?rebalance, "partition rebalance done");
    }
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &rdkafka::TopicPartitionList) {
        match result {
            Ok(()) => tracing::trace!(service = self.service, ?offsets, "offsets committed"),
            Err(rdkafka::error::KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                metrics::counter!(m::KAFKA_ERRORS, "service" => self.service, "op" => "commit")
                    .increment(1);
                tracing::warn!(service = self.service, error = %e, "offset commit failed");
            }
        }
    }
}

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
