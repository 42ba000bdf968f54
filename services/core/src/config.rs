//! Configuration shared by the services: Kafka, Redis and telemetry, and the one way a parent
//! process hands a configuration to a child ([`ToEnv`], [`render_env`]).
//!
//! Every flag has an environment variable with the conventional name and a default that works
//! for a local run. Tests build these structs directly instead of touching the environment.

use std::time::Duration;

use clap::{Args, FromArgMatches, ValueEnum};
use secrecy::{ExposeSecret, SecretString};

use crate::names::Names;

/// A configuration's defaults, read from its clap attributes (the one place they are
/// written) and never from the environment, so tests see the same values everywhere.
///
/// # Panics
/// When `T` has a required flag without a default: a programming error, caught by the
/// unit test of every config that calls this.
#[must_use]
pub fn defaults<T: Args + FromArgMatches>() -> T {
    parse_env(&[]).unwrap_or_else(|e| panic!("configuration without defaults: {e}"))
}

/// `T` as its flags read the variables `vars` (and nothing of this process's environment): the
/// inverse of [`render_env`]. Each variable stands in for its flag exactly as clap reads an
/// environment variable (the same value parser, the same list delimiter), so a unit test can
/// prove a rendering round-trips without mutating the process environment.
///
/// # Errors
/// When a value does not parse, as clap would report it for the variable.
pub fn parse_env<T: Args + FromArgMatches>(vars: &[(String, String)]) -> Result<T, clap::Error> {
    let command = T::augment_args(clap::Command::new("env").no_binary_name(true)).mut_args(|arg| {
        let value = arg.get_env().and_then(|name| {
            vars.iter()
                .rev()
                .find(|(var, _)| name == var.as_str())
                .map(|(_, value)| value.clone())
        });
        // clap reads a variable's value when the flag is built; a default goes through the
        // same path as that value when the command line does not name the flag.
        let arg = arg.env(None::<&str>);
        match value {
            Some(value) => arg.default_value(value),
            None => arg,
        }
    });
    let matches = command.try_get_matches_from(Vec::<String>::new())?;
    T::from_arg_matches(&matches)
}

/// Whether a rendered environment carries secrets ([`SecretString`] values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Secrets {
    /// Leave every secret unset: the child falls back to the flag's default, or to none.
    Omit,
    /// Write secrets out, for a child that needs them (its environment is then a secret too).
    Include,
}

impl Secrets {
    /// `secret` written out when secrets are included, else `None` (the variable stays unset).
    #[must_use]
    pub fn reveal(self, secret: &SecretString) -> Option<String> {
        match self {
            Self::Include => Some(secret.expose_secret().to_owned()),
            Self::Omit => None,
        }
    }
}

/// A configuration a parent (the chaos stack, a script generator) hands to a child process as
/// the environment variables its flags read. The variable names come from the clap attributes,
/// so a renamed variable cannot leave a stale copy behind.
pub trait ToEnv: Args + FromArgMatches {
    /// Every flag's value by its clap id (the field's name), written as clap parses it;
    /// `None` leaves the variable unset. Implementations destructure `self`, so a new field
    /// does not compile until it is rendered; [`render_env`] checks that every flag is.
    fn flag_values(&self, secrets: Secrets) -> Vec<(&'static str, Option<String>)>;

    /// Variables that are not flags (`KAFKA_PROPERTY_*`).
    fn extra_env(&self, secrets: Secrets) -> Vec<(String, String)> {
        let _ = secrets;
        Vec::new()
    }

    /// Takes the values [`ToEnv::extra_env`] wrote from `vars` (for [`parse_env`]'s callers).
    fn read_extra_env(&mut self, vars: &[(String, String)]) {
        let _ = vars;
    }
}

/// The environment that makes a child process parse `config`: `(variable, value)` pairs, in
/// the order of [`ToEnv::flag_values`], then [`ToEnv::extra_env`].
///
/// # Panics
/// When `T`'s rendering names a flag that does not exist or has no variable, or leaves a flag
/// out: programming errors, caught by each config's round-trip test ([`assert_round_trip`]).
#[must_use]
pub fn render_env<T: ToEnv>(config: &T, secrets: Secrets) -> Vec<(String, String)> {
    let command = T::augment_args(clap::Command::new("env"));
    let values = config.flag_values(secrets);
    for arg in command.get_arguments() {
        let id = arg.get_id().as_str();
        assert!(
            values.iter().filter(|(v, _)| *v == id).count() == 1,
            "flag `{id}` must be rendered exactly once"
        );
    }
    let mut env: Vec<(String, String)> = values
        .into_iter()
        .filter_map(|(id, value)| {
            let arg = command
                .get_arguments()
                .find(|a| a.get_id().as_str() == id)
                .unwrap_or_else(|| panic!("no flag `{id}`"));
            let var = arg
                .get_env()
                .unwrap_or_else(|| panic!("flag `{id}` reads no environment variable"));
            value.map(|v| (var.to_string_lossy().into_owned(), v))
        })
        .collect();
    env.extend(config.extra_env(secrets));
    env
}

/// A [`clap::ValueEnum`] value as its flag reads it.
///
/// # Panics
/// When `value` is a skipped variant (it has no name a flag could read).
#[must_use]
pub fn enum_value<E: ValueEnum>(value: &E) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_else(|| panic!("a skipped ValueEnum variant cannot be rendered"))
}

/// A comma-delimited list flag's value (`value_delimiter = ','`).
///
/// # Panics
/// When an item holds the delimiter (it would come back as two).
#[must_use]
pub fn list_value(items: &[String]) -> String {
    assert!(
        items.iter().all(|i| !i.contains(',')),
        "a list item cannot hold a comma: {items:?}"
    );
    items.join(",")
}

/// Checks, for a unit test, that `config` survives [`render_env`] then [`parse_env`] (secrets
/// included) and that it sets every flag to something other than its default, so the test
/// covers every variable.
///
/// # Panics
/// When it does not.
pub fn assert_round_trip<T: ToEnv + std::fmt::Debug>(config: &T) {
    let env = render_env(config, Secrets::Include);
    let mut back: T =
        parse_env(&env).unwrap_or_else(|e| panic!("rendered environment does not parse: {e}"));
    back.read_extra_env(&env);
    assert_eq!(format!("{back:?}"), format!("{config:?}"));
    assert_eq!(render_env(&back, Secrets::Include), env);
    let default: Vec<(&str, Option<String>)> = defaults::<T>().flag_values(Secrets::Include);
    for ((id, value), (_, default)) in config.flag_values(Secrets::Include).iter().zip(&default) {
        assert_ne!(
            value, default,
            "`{id}` is its default: the round trip does not cover it"
        );
    }
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
    /// How long the producer holds a record to batch it (ms). 0: none; what arrives while a
    /// request is in flight still goes out together in the next one. At 1,000 msg/s on the
    /// local stack 2 ms batched nothing (about one record per partition per 2 ms) and cost
    /// 6 ms of median latency; 0 costs no more CPU (docs/performance.md, fifth session).
    #[arg(long = "kafka-linger-ms", env = "KAFKA_LINGER_MS", default_value_t = 0)]
    pub linger_ms: u64,
    /// Idempotent producers (`enable.idempotence`: no duplicate from a retry, order kept with
    /// five requests in flight). `false` sends one request at a time per broker instead, which
    /// keeps the order, and lets a retry duplicate a record (the claims and delivered markers
    /// absorb it). Set `false` on tansu 0.6: after a storage outage librdkafka bumps its
    /// producer epoch, which tansu's engines cannot follow (sqlite panics, postgres refuses every
    /// later produce; docs/storage.md).
    #[arg(
        long = "kafka-idempotence",
        env = "KAFKA_IDEMPOTENCE",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub idempotence: bool,
    /// Longest a consumer fetch waits for data (ms); a broker answers as soon as records arrive
    /// (Apache Kafka, and tansu with Colloquy's fetch patch), so this bounds only how often an
    /// idle consumer asks: librdkafka's own default.
    #[arg(
        long = "kafka-fetch-wait-max-ms",
        env = "KAFKA_FETCH_WAIT_MAX_MS",
        default_value_t = 500
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
    /// Defaults for a local tansu broker at `bootstrap` (tests, chaos, benchmarks): the
    /// production defaults but non-idempotent producers (see [`KafkaConfig::idempotence`]).
    #[must_use]
    pub fn local(bootstrap: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap.into(),
            idempotence: false,
            ..defaults()
        }
    }

    #[must_use]
    pub fn produce_timeout(&self) -> Duration {
        Duration::from_millis(self.produce_timeout_ms)
    }
}

impl ToEnv for KafkaConfig {
    fn flag_values(&self, _: Secrets) -> Vec<(&'static str, Option<String>)> {
        let Self {
            bootstrap_servers,
            partitions,
            produce_timeout_ms,
            linger_ms,
            idempotence,
            fetch_wait_max_ms,
            rejoin_after_secs,
            assignment,
            group_instance_id,
            replication_factor,
            min_insync_replicas,
            properties: _,
        } = self;
        vec![
            ("bootstrap_servers", Some(bootstrap_servers.clone())),
            ("partitions", Some(partitions.to_string())),
            ("produce_timeout_ms", Some(produce_timeout_ms.to_string())),
            ("linger_ms", Some(linger_ms.to_string())),
            ("idempotence", Some(idempotence.to_string())),
            ("fetch_wait_max_ms", Some(fetch_wait_max_ms.to_string())),
            ("rejoin_after_secs", Some(rejoin_after_secs.to_string())),
            ("assignment", Some(enum_value(assignment))),
            ("group_instance_id", group_instance_id.clone()),
            ("replication_factor", Some(replication_factor.to_string())),
            (
                "min_insync_replicas",
                min_insync_replicas.map(|n| n.to_string()),
            ),
        ]
    }

    /// `KAFKA_PROPERTY_<NAME>` per property (its name upper-cased, `.` written as `_`), only
    /// with [`Secrets::Include`]: a property may be a secret (a SASL password).
    fn extra_env(&self, secrets: Secrets) -> Vec<(String, String)> {
        if secrets == Secrets::Omit {
            return Vec::new();
        }
        self.properties
            .iter()
            .map(|(name, value)| {
                (
                    format!(
                        "{KAFKA_PROPERTY_PREFIX}{}",
                        name.to_ascii_uppercase().replace('.', "_")
                    ),
                    value.clone(),
                )
            })
            .collect()
    }

    fn read_extra_env(&mut self, vars: &[(String, String)]) {
        self.properties = kafka_properties(vars.iter().cloned());
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

impl ToEnv for RedisConfig {
    fn flag_values(&self, _: Secrets) -> Vec<(&'static str, Option<String>)> {
        let Self {
            url,
            pool_size,
            command_timeout_ms,
        } = self;
        vec![
            ("url", Some(url.clone())),
            ("pool_size", Some(pool_size.to_string())),
            ("command_timeout_ms", Some(command_timeout_ms.to_string())),
        ]
    }
}

/// Logs, traces and the metrics endpoint.
#[derive(Clone, Debug, Args)]
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

impl Default for TelemetryConfig {
    /// The clap defaults: no trace export, `info` logs as JSON lines.
    fn default() -> Self {
        defaults()
    }
}

impl ToEnv for TelemetryConfig {
    fn flag_values(&self, _: Secrets) -> Vec<(&'static str, Option<String>)> {
        let Self {
            otlp_endpoint,
            log_filter,
            log_format,
        } = self;
        vec![
            ("otlp_endpoint", otlp_endpoint.clone()),
            ("log_filter", Some(log_filter.clone())),
            ("log_format", Some(enum_value(log_format))),
        ]
    }
}

impl ToEnv for Names {
    fn flag_values(&self, _: Secrets) -> Vec<(&'static str, Option<String>)> {
        let Self {
            topic_prefix,
            redis_prefix,
        } = self;
        vec![
            ("topic_prefix", Some(topic_prefix.clone())),
            ("redis_prefix", Some(redis_prefix.clone())),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_come_from_the_clap_attributes() {
        let k = KafkaConfig::local("broker:9092");
        assert_eq!(k.bootstrap_servers, "broker:9092");
        assert_eq!(k.partitions, 8);
        assert_eq!(k.fetch_wait_max_ms, 500);
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

    #[test]
    fn shared_configs_round_trip_through_their_environment() {
        assert_round_trip(&KafkaConfig {
            bootstrap_servers: "k1:9092,k2:9092".into(),
            partitions: 3,
            produce_timeout_ms: 7,
            linger_ms: 9,
            idempotence: false,
            fetch_wait_max_ms: 11,
            rejoin_after_secs: 13,
            assignment: Assignment::All,
            group_instance_id: Some("relay-7".into()),
            replication_factor: 3,
            min_insync_replicas: Some(2),
            properties: vars(&[("sasl.password", "p=w;d"), ("security.protocol", "SSL")]),
        });
        assert_round_trip(&RedisConfig {
            url: "redis://r:1".into(),
            pool_size: 2,
            command_timeout_ms: 3,
        });
        assert_round_trip(&TelemetryConfig {
            otlp_endpoint: Some("http://otel:4318".into()),
            log_filter: "warn,colloquy=debug".into(),
            log_format: LogFormat::Text,
        });
        assert_round_trip(&Names::with_prefixes("t-", "r-"));
    }

    #[test]
    fn the_environment_uses_the_conventional_names() {
        let env = render_env(&KafkaConfig::local("k:1"), Secrets::Omit);
        assert!(
            env.contains(&("KAFKA_BOOTSTRAP_SERVERS".into(), "k:1".into())),
            "{env:?}"
        );
        assert!(
            env.contains(&("KAFKA_ASSIGNMENT".into(), "group".into())),
            "{env:?}"
        );
        // An unset option is left out, not written empty.
        assert!(
            !env.iter().any(|(k, _)| k == "KAFKA_GROUP_INSTANCE_ID"),
            "{env:?}"
        );
        let env = render_env(&TelemetryConfig::default(), Secrets::Omit);
        assert_eq!(env, vars(&[("RUST_LOG", "info"), ("LOG_FORMAT", "json")]));
    }

    #[test]
    fn parsing_an_environment_ignores_the_process_environment() {
        // Whatever this process's RUST_LOG or OTEL_EXPORTER_OTLP_ENDPOINT say, only `vars` count.
        let t: TelemetryConfig = parse_env(&vars(&[("RUST_LOG", "debug")])).unwrap();
        assert_eq!(t.log_filter, "debug");
        assert_eq!(t.otlp_endpoint, None);
    }
}
