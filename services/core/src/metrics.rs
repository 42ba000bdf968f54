//! The metrics contract: every metric Colloquy emits, in one list.
//!
//! Dashboards and alert rules may use only names from [`CONTRACT`] (a test checks them), and
//! `docs/metrics.md` is rendered from it (a test fails when that file is stale). Label values
//! with a fixed set are the enums of [`crate::labels`]. Code emits a metric only through an
//! event type (`events.rs` of each crate), whose `emit()` logs and counts together.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::labels::service::{
    AI_CONSUMER, GATEWAY as GATEWAY_NAME, PROBER as PROBER_NAME, RELAY as RELAY_NAME,
};
use crate::labels::{
    KafkaOp, LlmErrorClass, LlmStatus, MessageOutcome, ProbeOutcome, RedisOp, RefusedReason,
    ReplayReason, RetryReason, TokenKind, zero_values,
};

/// How a metric aggregates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// One metric of the contract.
#[derive(Clone, Copy, Debug)]
pub struct MetricDef {
    pub name: &'static str,
    pub kind: Kind,
    pub unit: &'static str,
    pub labels: &'static [&'static str],
    /// Which services emit it.
    pub services: &'static [&'static str],
    /// The series each service registers at zero when it starts, so every counter and gauge
    /// is visible (and `increase()` sees its first event) before anything happened.
    pub zero: Zero,
    pub help: &'static str,
}

/// Which series of a metric exist before its first event.
#[derive(Clone, Copy, Debug)]
pub enum Zero {
    /// None: the metric exists once observed (histograms, per-partition lag, build info).
    Never,
    /// One series, labelled with `service` only (when the metric has that label).
    One,
    /// One series per value of the metric's one label besides `service` that the service
    /// emits: `labels::zero_values::<TheLabelEnum>`.
    Each(fn(&str) -> Vec<&'static str>),
    /// One series per topic, registered by whoever knows the topic (a consumer, a
    /// dead-letter writer) through [`register_topic_series`].
    PerTopic,
}

pub const BUILD_INFO: &str = "colloquy_build_info";
pub const E2E_LATENCY: &str = "colloquy_e2e_latency_seconds";
pub const FIRST_DELTA_LATENCY: &str = "colloquy_time_to_first_delta_seconds";
pub const STAGE_LATENCY: &str = "colloquy_stage_latency_seconds";
pub const MESSAGES: &str = "colloquy_messages_total";
pub const CONNECTIONS: &str = "colloquy_connections";
pub const CONNECTIONS_REFUSED: &str = "colloquy_connections_refused_total";
pub const LLM_REQUESTS: &str = "colloquy_llm_requests_total";
pub const LLM_RETRIES: &str = "colloquy_llm_retries_total";
pub const LLM_ERRORS: &str = "colloquy_llm_errors_total";
pub const LLM_TOKENS: &str = "colloquy_llm_tokens_total";
pub const LLM_IN_FLIGHT: &str = "colloquy_llm_in_flight";
pub const CONSUMER_LAG: &str = "colloquy_consumer_lag";
pub const DLQ_WRITES: &str = "colloquy_dlq_writes_total";
pub const REDIS_ERRORS: &str = "colloquy_redis_errors_total";
pub const KAFKA_ERRORS: &str = "colloquy_kafka_errors_total";
pub const REPLAYED: &str = "colloquy_replayed_deliveries_total";
pub const REPLAYS_QUEUED: &str = "colloquy_replays_queued_total";
pub const DUPLICATES: &str = "colloquy_duplicates_skipped_total";
pub const OFFSET_GAPS: &str = "colloquy_consumer_offset_gaps_total";
pub const RECORDS_LOST: &str = "colloquy_consumer_records_lost_total";
pub const ASSIGNED_PARTITIONS: &str = "colloquy_consumer_assigned_partitions";
pub const REJOINS: &str = "colloquy_consumer_rejoins_total";
pub const UNANSWERED: &str = "colloquy_unanswered_messages";
pub const UNANSWERED_OLDEST_AGE: &str = "colloquy_unanswered_oldest_age_seconds";
pub const PROBE_SUCCESS: &str = "colloquy_probe_success";
pub const PROBE_LATENCY: &str = "colloquy_probe_latency_seconds";
pub const PROBES: &str = "colloquy_probes_total";

const GATEWAY: &[&str] = &[GATEWAY_NAME];
const CONSUMER: &[&str] = &[AI_CONSUMER];
const ALL: &[&str] = &[GATEWAY_NAME, AI_CONSUMER, RELAY_NAME];
const KAFKA_CONSUMERS: &[&str] = &[AI_CONSUMER, RELAY_NAME];
const RELAY: &[&str] = &[RELAY_NAME];
const PROBER: &[&str] = &[PROBER_NAME];

/// Every metric Colloquy emits.
pub const CONTRACT: &[MetricDef] = &[
    MetricDef {
        name: BUILD_INFO,
        kind: Kind::Gauge,
        unit: "",
        labels: &["service", "version"],
        services: ALL,
        zero: Zero::Never,
        help: "Always 1; labels name the running service and version",
    },
    MetricDef {
        name: E2E_LATENCY,
        kind: Kind::Histogram,
        unit: "seconds",
        labels: &["outcome"],
        services: GATEWAY,
        zero: Zero::Never,
        help: "Gateway receive of a message to its response (or llm_failed) frame written to a socket",
    },
    MetricDef {
        name: FIRST_DELTA_LATENCY,
        kind: Kind::Histogram,
        unit: "seconds",
        labels: &[],
        services: GATEWAY,
        zero: Zero::Never,
        help: "Gateway receive of a message to its first text written: the first delta frame, or the response frame of an answer that came whole (no delta before it)",
    },
    MetricDef {
        name: STAGE_LATENCY,
        kind: Kind::Histogram,
        unit: "seconds",
        labels: &["stage"],
        services: ALL,
        zero: Zero::Never,
        help: "Latency of one hop: produce, queue_wait, llm, relay, fanout",
    },
    MetricDef {
        name: MESSAGES,
        kind: Kind::Counter,
        unit: "",
        labels: &["service", "outcome"],
        services: ALL,
        zero: Zero::Each(zero_values::<MessageOutcome>),
        help: "Messages handled, by service and outcome",
    },
    MetricDef {
        name: CONNECTIONS,
        kind: Kind::Gauge,
        unit: "",
        labels: &[],
        services: GATEWAY,
        zero: Zero::One,
        help: "WebSocket connections open on this gateway",
    },
    MetricDef {
        name: CONNECTIONS_REFUSED,
        kind: Kind::Counter,
        unit: "",
        labels: &["reason"],
        services: GATEWAY,
        zero: Zero::Each(zero_values::<RefusedReason>),
        help: "WebSocket upgrades or sessions refused or closed by policy, by reason",
    },
    MetricDef {
        name: LLM_REQUESTS,
        kind: Kind::Counter,
        unit: "",
        labels: &["status"],
        services: CONSUMER,
        zero: Zero::Each(zero_values::<LlmStatus>),
        help: "LLM HTTP attempts by status class (2xx, 4xx, 429, 5xx, timeout, transport)",
    },
    MetricDef {
        name: LLM_RETRIES,
        kind: Kind::Counter,
        unit: "",
        labels: &["reason"],
        services: CONSUMER,
        zero: Zero::Each(zero_values::<RetryReason>),
        help: "LLM attempts retried after backoff, by reason",
    },
    MetricDef {
        name: LLM_ERRORS,
        kind: Kind::Counter,
        unit: "",
        labels: &["class"],
        services: CONSUMER,
        zero: Zero::Each(zero_values::<LlmErrorClass>),
        help: "LLM calls that failed for good, by class",
    },
    MetricDef {
        name: LLM_TOKENS,
        kind: Kind::Counter,
        unit: "",
        labels: &["kind"],
        services: CONSUMER,
        zero: Zero::Each(zero_values::<TokenKind>),
        help: "Tokens reported by the LLM, prompt or completion",
    },
    MetricDef {
        name: LLM_IN_FLIGHT,
        kind: Kind::Gauge,
        unit: "",
        labels: &[],
        services: CONSUMER,
        zero: Zero::One,
        help: "LLM calls in flight now, retries included (bounded by MAX_IN_FLIGHT)",
    },
    MetricDef {
        name: CONSUMER_LAG,
        kind: Kind::Gauge,
        unit: "",
        labels: &["service", "topic", "partition"],
        services: KAFKA_CONSUMERS,
        zero: Zero::Never,
        help: "Consumer lag per partition in messages, from librdkafka statistics",
    },
    MetricDef {
        name: DLQ_WRITES,
        kind: Kind::Counter,
        unit: "",
        labels: &["service", "topic"],
        services: KAFKA_CONSUMERS,
        zero: Zero::PerTopic,
        help: "Records written to a dead-letter topic",
    },
    MetricDef {
        name: REDIS_ERRORS,
        kind: Kind::Counter,
        unit: "",
        labels: &["service", "op"],
        services: ALL,
        zero: Zero::Each(zero_values::<RedisOp>),
        help: "Redis commands that failed, by operation",
    },
    MetricDef {
        name: KAFKA_ERRORS,
        kind: Kind::Counter,
        unit: "",
        labels: &["service", "op"],
        services: ALL,
        zero: Zero::Each(zero_values::<KafkaOp>),
        help: "Kafka produce or consume errors, by operation",
    },
    MetricDef {
        name: REPLAYED,
        kind: Kind::Counter,
        unit: "",
        labels: &["reason"],
        services: GATEWAY,
        zero: Zero::Each(zero_values::<ReplayReason>),
        help: "Deliveries sent from the inbox stream during a replay, by what triggered it",
    },
    MetricDef {
        name: REPLAYS_QUEUED,
        kind: Kind::Counter,
        unit: "",
        labels: &[],
        services: GATEWAY,
        zero: Zero::One,
        help: "Inbox replays that waited for a free slot (MAX_CONCURRENT_REPLAYS); bursts after a Redis reconnect are expected, steady growth means too few slots",
    },
    MetricDef {
        name: DUPLICATES,
        kind: Kind::Counter,
        unit: "",
        labels: &["service"],
        services: ALL,
        zero: Zero::One,
        help: "Duplicates detected and skipped (redelivered messages, repeated deliveries)",
    },
    MetricDef {
        name: OFFSET_GAPS,
        kind: Kind::Counter,
        unit: "",
        labels: &["service", "topic"],
        services: KAFKA_CONSUMERS,
        zero: Zero::PerTopic,
        help: "Jumps in a partition's offsets seen by a consumer, each healed by seeking back (tansu 0.6.0's memory engine, unpatched, causes them under load)",
    },
    MetricDef {
        name: RECORDS_LOST,
        kind: Kind::Counter,
        unit: "",
        labels: &["service", "topic"],
        services: KAFKA_CONSUMERS,
        zero: Zero::PerTopic,
        help: "Records a consumer gave up on: an offset gap that repeated seeks did not heal (the broker no longer has them); any is data loss",
    },
    MetricDef {
        name: ASSIGNED_PARTITIONS,
        kind: Kind::Gauge,
        unit: "",
        labels: &["service"],
        services: KAFKA_CONSUMERS,
        zero: Zero::One,
        help: "Partitions this consumer holds now",
    },
    MetricDef {
        name: REJOINS,
        kind: Kind::Counter,
        unit: "",
        labels: &["service"],
        services: KAFKA_CONSUMERS,
        zero: Zero::One,
        help: "Times a consumer left with no partitions for too long rejoined its group",
    },
    MetricDef {
        name: UNANSWERED,
        kind: Kind::Gauge,
        unit: "",
        labels: &[],
        services: RELAY,
        zero: Zero::One,
        help: "Acked messages whose answer or failure is not yet durable in the inbox (audit)",
    },
    MetricDef {
        name: UNANSWERED_OLDEST_AGE,
        kind: Kind::Gauge,
        unit: "seconds",
        labels: &[],
        services: RELAY,
        zero: Zero::One,
        help: "Age of the oldest acked message with no durable answer or failure (audit)",
    },
    MetricDef {
        name: PROBE_SUCCESS,
        kind: Kind::Gauge,
        unit: "",
        labels: &[],
        services: PROBER,
        zero: Zero::One,
        help: "1 when the last synthetic probe through the edge got its answer in time, else 0",
    },
    MetricDef {
        name: PROBE_LATENCY,
        kind: Kind::Histogram,
        unit: "seconds",
        labels: &["stage"],
        services: PROBER,
        zero: Zero::Never,
        help: "Synthetic probe latency from send to ack, first_delta (first delta, or an answer that came whole) and answer",
    },
    MetricDef {
        name: PROBES,
        kind: Kind::Counter,
        unit: "",
        labels: &["outcome"],
        services: PROBER,
        zero: Zero::Each(zero_values::<ProbeOutcome>),
        help: "Synthetic probes by outcome (success, connect_failed, no_ack, no_answer, error)",
    },
];

/// Histogram buckets in seconds: fine enough for a p99 anywhere between 1 ms and 60 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0,
];

/// Installs the process-wide Prometheus recorder once and returns its handle.
///
/// Several services may share a process (the testkit runs all three in one), so the recorder
/// is global and idempotent; each service adds its own `service` label.
///
/// # Panics
/// Never in practice: the bucket list is non-empty and no other recorder is installed first.
#[must_use]
pub fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| b.install_recorder())
                .unwrap_or_else(|e| {
                    eprintln!("metrics recorder not installed ({e}); metrics will be empty");
                    PrometheusBuilder::new().build_recorder().handle()
                });
            describe();
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(std::time::Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .ok();
            handle
        })
        .clone()
}

fn describe() {
    for def in CONTRACT {
        let unit = match def.unit {
            "seconds" => Some(metrics::Unit::Seconds),
            _ => None,
        };
        match (def.kind, unit) {
            (Kind::Counter, _) => metrics::describe_counter!(def.name, def.help),
            (Kind::Gauge, _) => metrics::describe_gauge!(def.name, def.help),
            (Kind::Histogram, Some(u)) => metrics::describe_histogram!(def.name, u, def.help),
            (Kind::Histogram, None) => metrics::describe_histogram!(def.name, def.help),
        }
    }
}

/// Sets `colloquy_build_info{service,version} 1` and registers the zero series of every
/// counter and gauge `service` emits ([`MetricDef::zero`]), so dashboards and alerts see them
/// before the first event.
pub fn record_build_info(service: &'static str) {
    let _ = recorder();
    metrics::gauge!(BUILD_INFO, "service" => service, "version" => env!("CARGO_PKG_VERSION"))
        .set(1.0);
    for def in CONTRACT.iter().filter(|d| d.services.contains(&service)) {
        for labels in zero_series(def, service) {
            register_zero(def, labels);
        }
    }
}

/// Registers the zero series of each [`Zero::PerTopic`] metric named `name` for `topic`.
pub fn register_topic_series(name: &'static str, service: &'static str, topic: &str) {
    let _ = recorder();
    if let Some(def) = CONTRACT
        .iter()
        .find(|d| d.name == name && matches!(d.zero, Zero::PerTopic))
    {
        let labels = def
            .labels
            .iter()
            .map(|l| match *l {
                "service" => metrics::Label::new("service", service),
                other => metrics::Label::new(other, topic.to_owned()),
            })
            .collect();
        register_zero(def, labels);
    }
}

/// The label sets of the zero series `service` registers for `def` at start.
fn zero_series(def: &MetricDef, service: &'static str) -> Vec<Vec<metrics::Label>> {
    let with_service = |mut labels: Vec<metrics::Label>| {
        if def.labels.contains(&"service") {
            labels.insert(0, metrics::Label::new("service", service));
        }
        labels
    };
    match def.zero {
        Zero::Never | Zero::PerTopic => Vec::new(),
        Zero::One => vec![with_service(Vec::new())],
        Zero::Each(values) => {
            let Some(label) = def.labels.iter().find(|l| **l != "service") else {
                return Vec::new();
            };
            values(service)
                .into_iter()
                .map(|v| with_service(vec![metrics::Label::new(*label, v)]))
                .collect()
        }
    }
}

fn register_zero(def: &MetricDef, labels: Vec<metrics::Label>) {
    match def.kind {
        Kind::Counter => metrics::counter!(def.name, labels).increment(0),
        Kind::Gauge => metrics::gauge!(def.name, labels).increment(0.0),
        Kind::Histogram => {}
    }
}

/// Renders the contract as the markdown table in `docs/metrics.md`.
#[must_use]
pub fn contract_markdown() -> String {
    let mut out = String::from(
        "# Metrics contract\n\nGenerated from `services/core/src/metrics.rs` by its unit test; \
         do not edit by hand. Dashboards and alert rules may use only these names.\n\n\
         | name | type | unit | labels | services | help |\n|---|---|---|---|---|---|\n",
    );
    for d in CONTRACT {
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} | {} |\n",
            d.name,
            d.kind.as_str(),
            if d.unit.is_empty() { "-" } else { d.unit },
            if d.labels.is_empty() {
                "-".to_owned()
            } else {
                d.labels.join(", ")
            },
            d.services.join(", "),
            d.help
        ));
    }
    out
}

/// Whether a series name seen in Prometheus text (`x_bucket`, `x_sum`, `x_count`) belongs to the contract.
#[must_use]
pub fn is_contract_series(series: &str) -> bool {
    CONTRACT.iter().any(|d| {
        series == d.name
            || (d.kind == Kind::Histogram
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| series.strip_suffix(s) == Some(d.name)))
    })
}

/// Contract metrics that a Prometheus text exposition lacks, limited to those `service` emits
/// (all of them for `None`). Histograms count as present once a `_bucket` series exists.
#[must_use]
pub fn missing_from(exposition: &str, service: Option<&str>) -> Vec<&'static str> {
    CONTRACT
        .iter()
        .filter(|d| service.is_none_or(|s| d.services.contains(&s)))
        .filter(|d| {
            let series = if d.kind == Kind::Histogram {
                format!("{}_bucket", d.name)
            } else {
                d.name.to_owned()
            };
            !exposition.lines().any(|l| l.starts_with(&series))
        })
        .map(|d| d.name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::LabelValue;

    #[test]
    fn docs_metrics_md_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/metrics.md");
        let rendered = contract_markdown();
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        if on_disk != rendered {
            if std::env::var_os("UPDATE_DOCS").is_some() {
                std::fs::write(path, &rendered).expect("write docs/metrics.md");
            } else {
                panic!(
                    "docs/metrics.md is stale: run `UPDATE_DOCS=1 cargo test -p colloquy-core` and commit it"
                );
            }
        }
    }

    #[test]
    fn names_are_prefixed_and_unique() {
        let mut seen = std::collections::HashSet::new();
        for d in CONTRACT {
            assert!(d.name.starts_with("colloquy_"), "{}", d.name);
            assert!(seen.insert(d.name), "duplicate {}", d.name);
            if d.kind == Kind::Counter {
                assert!(d.name.ends_with("_total"), "{}", d.name);
            }
            if d.kind == Kind::Histogram {
                assert!(d.name.ends_with("_seconds"), "{}", d.name);
            }
        }
    }

    #[test]
    fn zero_series_are_of_values_the_service_emits() {
        for d in CONTRACT {
            match d.zero {
                Zero::Each(values) => {
                    let others: Vec<_> = d.labels.iter().filter(|l| **l != "service").collect();
                    assert_eq!(
                        others.len(),
                        1,
                        "{}: Each needs one label besides service",
                        d.name
                    );
                    for s in d.services {
                        assert!(!values(s).is_empty(), "{}: {s} emits no value", d.name);
                    }
                }
                Zero::PerTopic => assert!(d.labels.contains(&"topic"), "{}", d.name),
                Zero::One => assert!(
                    d.labels.iter().all(|l| *l == "service"),
                    "{}: One registers no label but service",
                    d.name
                ),
                Zero::Never => {}
            }
            if d.kind == Kind::Histogram {
                assert!(matches!(d.zero, Zero::Never), "{}", d.name);
            }
        }
        // A value is registered only for a service that emits it.
        let gateway_ops = zero_values::<KafkaOp>(GATEWAY_NAME);
        assert_eq!(gateway_ops, [KafkaOp::Produce.as_str()]);
    }

    #[test]
    fn help_names_every_value_it_lists() {
        // Help texts that enumerate a label's values must not fall behind the enum.
        let help = |name: &str| CONTRACT.iter().find(|d| d.name == name).unwrap().help;
        for v in crate::labels::all::<ProbeOutcome>() {
            assert!(help(PROBES).contains(v), "{v}");
        }
        for v in crate::labels::all::<crate::labels::Stage>() {
            assert!(help(STAGE_LATENCY).contains(v), "{v}");
        }
    }

    #[test]
    fn buckets_resolve_1ms_to_60s() {
        assert!(LATENCY_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        assert!(LATENCY_BUCKETS.contains(&0.001) && LATENCY_BUCKETS.contains(&60.0));
        // No neighbouring buckets further apart than 2x, so a p99 is never off by more than that.
        assert!(
            LATENCY_BUCKETS
                .windows(2)
                .all(|w| w[1] / w[0] <= 2.0 + f64::EPSILON)
        );
    }

    #[test]
    fn missing_from_reads_an_exposition() {
        let text = "colloquy_messages_total{service=\"relay\"} 1\ncolloquy_stage_latency_seconds_bucket{le=\"1\"} 1\n";
        let missing = missing_from(text, Some("relay"));
        assert!(!missing.contains(&MESSAGES) && !missing.contains(&STAGE_LATENCY));
        assert!(missing.contains(&BUILD_INFO));
        assert!(
            !missing.contains(&E2E_LATENCY),
            "a gateway-only metric is not the relay's"
        );
        assert!(missing_from(text, None).contains(&E2E_LATENCY));
    }

    #[test]
    fn series_suffixes_map_back_to_the_contract() {
        assert!(is_contract_series("colloquy_e2e_latency_seconds_bucket"));
        assert!(is_contract_series("colloquy_messages_total"));
        assert!(!is_contract_series("colloquy_messages_total_bucket"));
        assert!(!is_contract_series("colloquy_made_up"));
    }
}
