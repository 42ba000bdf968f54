//! Configuration shared by the services: Kafka, Redis and telemetry.
//!
//! Every flag has an environment variable with the conventional name and a default that works
//! for a local run. Tests build these structs directly instead of touching the environment.

use std::time::Duration;

use clap::{Args, FromArgMatches};

/// A configuration's defaults, read from its clap attributes (the one place they are
/// written) and never from the environment, so tests see the same values everywhere.
///
/// # Panics
/// When `T` has a required flag without a default: a programming error, caught by the
/// unit test of every config that calls this.
#[must_use]
pub fn defaults<T: Args + FromArgMatches>() -> T {
    let command = T::augment_args(clap::Command::new("defaults").no_binary_name(true))
        .mut_args(|a| a.env(None::<&str>));
    let matches = command
        .try_get_matches_from(Vec::<String>::new())
        .unwrap_or_else(|e| panic!("configuration without defaults: {e}"));
    T::from_arg_matches(&matches).unwrap_or_else(|e| panic!("configuration without defaults: {e}"))
}

/// How to reach Kafka.
#[derive(Clone, Debug, Args)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated.
    #[arg(
        long = "kafka-bootstrap-servers",
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092"
    )]
    pub bootstrap_servers: String,
    /// Partitions of each topic when the service creates it.
    #[arg(
        long = "kafka-partitions",
        env = "KAFKA_PARTITIONS",
        default_value_t = 8
    )]
    pub partitions: i32,
    /// Longest a produce may take before the client is told `unavailable` (ms).
    #[arg(
        long = "kafka-produce-timeout-ms",
        env = "KAFKA_PRODUCE_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub produce_timeout_ms: u64,
    /// How long the producer waits to batch records (ms).
    #[arg(long = "kafka-linger-ms", env = "KAFKA_LINGER_MS", default_value_t = 2)]
    pub linger_ms: u64,
    /// Longest a consumer fetch waits for data (ms). Keep it low: tansu waits the full time on every fetch.
    #[arg(
        long = "kafka-fetch-wait-max-ms",
        env = "KAFKA_FETCH_WAIT_MAX_MS",
        default_value_t = 5
    )]
    pub fetch_wait_max_ms: u64,
    /// A consumer that holds no partitions for this long (seconds) rejoins its group (then
    /// waits twice as long before the next rejoin, up to ten times this).
    #[arg(
        long = "kafka-rejoin-after-secs",
        env = "KAFKA_REJOIN_AFTER_SECS",
        default_value_t = 20
    )]
    pub rejoin_after_secs: u64,
    /// How the consumers get their partitions: `group` (Kafka's group protocol; instances of a
    /// service share the partitions) or `all` (this instance takes every partition of its topic
    /// by manual assignment and still commits its offsets to the group). `all` is for one
    /// instance per service, and for brokers whose group coordinator loses members across
    /// restarts (tansu 0.6: see docs/storage.md); a second instance started by mistake reads
    /// the same records, and the claims and delivered markers keep that harmless.
    #[arg(
        long = "kafka-assignment",
        env = "KAFKA_ASSIGNMENT",
        value_enum,
        default_value_t = Assignment::Group
    )]
    pub assignment: Assignment,
    /// Static group membership (`group.instance.id`): a stable, unique name per consumer
    /// instance (e.g. `relay-1`). A process restarted after a crash then takes its old place in
    /// the group at once instead of waiting out the session timeout (and, on tansu 0.6, instead
    /// of being left with no partitions). Never give two live processes the same id. The
    /// ai-consumer also names its claim leases with it (with `KAFKA_ASSIGNMENT=all`, where no
    /// group membership is used, that is its only use).
    #[arg(long = "kafka-group-instance-id", env = "KAFKA_GROUP_INSTANCE_ID")]
    pub group_instance_id: Option<String>,
    /// Replication factor of each topic when the service creates it (1 locally, 3 in production).
    #[arg(
        long = "kafka-replication-factor",
        env = "KAFKA_REPLICATION_FACTOR",
        default_value_t = 1
    )]
    pub replication_factor: i32,
    /// `min.insync.replicas` of each topic when the service creates it (2 in production, with
    /// RF 3 and `acks=all`); the broker's default when unset.
    #[arg(long = "kafka-min-insync-replicas", env = "KAFKA_MIN_INSYNC_REPLICAS")]
    pub min_insync_replicas: Option<u32>,
    /// Extra librdkafka properties for every client (producer, consumer, admin), read from the
    /// environment variables `KAFKA_PROPERTY_<NAME>`, where NAME is the property name upper-cased
    /// with `.` written as `_`: `KAFKA_PROPERTY_SECURITY_PROTOCOL=SASL_SSL` sets
    /// `security.protocol`. This is how TLS and SASL are configured. Colloquy's own settings
    /// (acks, idempotence, offset storage) are applied after these and win.
    #[arg(skip = kafka_properties_from_env())]
    pub properties: Vec<(String, String)>,
}

/// How a consumer gets its partitions (see [`KafkaConfig::assignment`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Assignment {
    /// Kafka's consumer-group protocol: JoinGroup/SyncGroup, partitions shared by the instances.
    Group,
    /// Every partition of the topic, assigned by hand; offsets committed to the group.
    All,
}

/// Prefix of the environment variables that carry extra librdkafka properties.
pub const KAFKA_PROPERTY_PREFIX: &str = "KAFKA_PROPERTY_";

/// The librdkafka properties named by `KAFKA_PROPERTY_*` variables in this process's environment.
#[must_use]
pub fn kafka_properties_from_env() -> Vec<(String, String)> {
    kafka_properties(
        std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
    )
}

/// The librdkafka properties named by the `KAFKA_PROPERTY_*` entries of `vars`, sorted by name.
/// Other entries are ignored; an entry with nothing after the prefix too.
#[must_use]
pub fn kafka_properties(vars: impl IntoIterator<Item = (String, String)>) -> Vec<(String, String)> {
    let mut props: Vec<(String, String)> = vars
        .into_iter()
        .filter_map(|(k, v)| {
            let name = k.strip_prefix(KAFKA_PROPERTY_PREFIX)?;
            (!name.is_empty()).then(|| (name.to_ascii_lowercase().replace('_', "."), v))
        })
        .collect();
    props.sort();
    props
}

impl KafkaConfig {
    /// Defaults for a broker at `bootstrap`.
    #[must_use]
    pub fn local(bootstrap: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap.into(),
            ..defaults()
        }
    }

    #[must_use]
    pub fn produce_timeout(&self) -> Duration {
        Duration::from_millis(self.produce_timeout_ms)
    }
}

/// How to reach Redis.
#[derive(Clone, Debug, Args)]
pub struct RedisConfig {
    /// Redis URL.
    #[arg(
        long = "redis-url",
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub url: String,
    /// Connections in the command pool.
    #[arg(long = "redis-pool-size", env = "REDIS_POOL_SIZE", default_value_t = 4)]
    pub pool_size: usize,
    /// Longest a Redis command may take (ms) before it counts as failed.
    #[arg(
        long = "redis-command-timeout-ms",
        env = "REDIS_COMMAND_TIMEOUT_MS",
        default_value_t = 2_000
    )]
    pub command_timeout_ms: u64,
}

impl RedisConfig {
    /// Defaults for a Redis at `url`.
    #[must_use]
    pub fn local(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..defaults()
        }
    }
}

/// Logs, traces and the metrics endpoint.
#[derive(Clone, Debug, Args, Default)]
pub struct TelemetryConfig {
    /// OTLP/HTTP endpoint for traces (e.g. http://127.0.0.1:4318); traces are not exported when unset.
    #[arg(
        long = "otel-exporter-otlp-endpoint",
        env = "OTEL_EXPORTER_OTLP_ENDPOINT"
    )]
    pub otlp_endpoint: Option<String>,
    /// Log filter (tracing-subscriber EnvFilter syntax).
    #[arg(long = "log", env = "RUST_LOG", default_value = "info")]
    pub log_filter: String,
    /// Write logs as JSON lines (default) or human-readable text.
    #[arg(long = "log-format", env = "LOG_FORMAT", default_value = "json")]
    pub log_format: LogFormat,
}

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_come_from_the_clap_attributes() {
        let k = KafkaConfig::local("broker:9092");
        assert_eq!(k.bootstrap_servers, "broker:9092");
        assert_eq!(k.partitions, 8);
        assert_eq!(k.fetch_wait_max_ms, 5);
        assert_eq!(k.group_instance_id, None);
        assert_eq!(k.assignment, Assignment::Group);
        let r = RedisConfig::local("redis://h:1");
        assert_eq!(r.command_timeout_ms, 2_000);
        let t: TelemetryConfig = defaults();
        assert_eq!(t.log_format, LogFormat::Json);
    }

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn kafka_property_variables_become_dotted_lowercase_names() {
        let props = kafka_properties(vars(&[
            ("KAFKA_PROPERTY_SECURITY_PROTOCOL", "SASL_SSL"),
            ("KAFKA_PROPERTY_SASL_PASSWORD", "p=w;d,with=signs"),
            ("KAFKA_PROPERTY_SSL_CA_LOCATION", "/run/secrets/ca.pem"),
        ]));
        assert_eq!(
            props,
            vars(&[
                ("sasl.password", "p=w;d,with=signs"),
                ("security.protocol", "SASL_SSL"),
                ("ssl.ca.location", "/run/secrets/ca.pem"),
            ])
        );
    }

    #[test]
    fn other_variables_and_an_empty_name_are_ignored() {
        let props = kafka_properties(vars(&[
            ("KAFKA_BOOTSTRAP_SERVERS", "kafka:9092"),
            ("KAFKA_PROPERTY_", "x"),
            ("MY_KAFKA_PROPERTY_ACKS", "0"),
        ]));
        assert!(props.is_empty(), "{props:?}");
    }

    #[test]
    fn clap_reads_replication_settings_and_defaults_to_one_replica() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            kafka: KafkaConfig,
        }
        let cli = <Cli as clap::Parser>::try_parse_from([
            "x",
            "--kafka-replication-factor",
            "3",
            "--kafka-min-insync-replicas",
            "2",
        ])
        .expect("flags parse");
        assert_eq!(cli.kafka.replication_factor, 3);
        assert_eq!(cli.kafka.min_insync_replicas, Some(2));
        let defaults = <Cli as clap::Parser>::try_parse_from(["x"]).expect("defaults parse");
        assert_eq!(defaults.kafka.replication_factor, 1);
        assert_eq!(defaults.kafka.min_insync_replicas, None);
    }
}
