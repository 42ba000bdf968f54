//! The whole system as real processes: tansu (durable sqlite storage, or memory for throughput
//! runs), Redis (append-only file, fsync on every write), the fake LLM, two gateways, the
//! ai-consumer, the relay and, when installed, nginx in front of the gateways. Every process has
//! its own ports and its log in the stack's directory, and can be killed with SIGKILL and started
//! again on the same ports.
//!
//! Why Redis runs with `--appendonly yes --appendfsync always`: the inbox stream is the durable
//! copy of every answer once the relay has stored its Kafka offset, and the relay's and the
//! ai-consumer's de-duplication markers live next to it. A Redis that forgot its data on a
//! kill -9 would lose answers (and let redelivered records through twice) by construction, which
//! is a deployment choice, not a bug to find; with `appendfsync always` every write a client saw
//! succeed is on disk.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use colloquy_ai_consumer::config::ConsumerConfig;
use colloquy_core::config::{
    Assignment, KafkaConfig, RedisConfig, Secrets, TelemetryConfig, ToEnv, render_env,
};
use colloquy_core::names::Names;
use colloquy_gateway::config::GatewayConfig;
use colloquy_relay::config::RelayConfig;
use colloquy_testkit::fake_llm::{FakeLlmConfig, FakeLlmProcessConfig};
use colloquy_testkit::postgres::Cluster;
pub use colloquy_testkit::process::Storage;
use colloquy_testkit::process::{
    ManagedProcess, ProcessSpec, RedisPersistence, accepts, answers_ping, free_port, redis_args,
    tansu_args,
};

use crate::binaries::Binaries;

/// Partitions of every topic (as in `scripts/stack.sh`'s services: `KAFKA_PARTITIONS=4`).
pub const PARTITIONS: i32 = 4;

/// How long a process may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// One process of the stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    /// PostgreSQL, tansu's storage with `Storage::Postgres` (first, so it is stopped last).
    Database,
    /// tansu, the Kafka-protocol broker.
    Broker,
    Redis,
    FakeLlm,
    /// Gateway number `n` (0-based; shown as `gateway-{n+1}`).
    Gateway(u8),
    Consumer,
    Relay,
    Nginx,
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Database => f.write_str("postgres"),
            Self::Broker => f.write_str("broker"),
            Self::Redis => f.write_str("redis"),
            Self::FakeLlm => f.write_str("fake-llm"),
            Self::Gateway(n) => write!(f, "gateway-{}", u16::from(*n) + 1),
            Self::Consumer => f.write_str("ai-consumer"),
            Self::Relay => f.write_str("relay"),
            Self::Nginx => f.write_str("nginx"),
        }
    }
}

/// What a stack runs with, beyond the defaults. The services' settings are their typed
/// configurations, rendered into each process's environment by [`render_env`]; the stack sets
/// only what it owns (addresses, ports, instance names, Kafka's partitions and assignment).
#[derive(Clone, Debug)]
pub struct StackOptions {
    /// Short name, part of the stack directory's name.
    pub name: String,
    /// The broker's storage engine.
    pub storage: Storage,
    /// The consumers' `KAFKA_FETCH_WAIT_MAX_MS`; `None`: the services' default (500 ms). With
    /// Colloquy's fetch patch tansu answers as soon as records arrive, so it sets how often an
    /// idle consumer costs the engine a pass over its partitions (docs/storage.md).
    pub fetch_wait_ms: Option<u64>,
    /// Put nginx in front of the gateways when it is installed (clients then use only nginx).
    pub nginx: bool,
    /// The edge's per-address limits (the committed ones unless a load test raises them).
    pub edge: crate::nginx::EdgeLimits,
    /// How the fake LLM answers.
    pub fake_llm: FakeLlmConfig,
    /// Both gateways' settings, but for `listen` and `instance_id`.
    pub gateway: GatewayConfig,
    /// The ai-consumer's settings, but for `metrics_listen` and `base_url`.
    pub consumer: ConsumerConfig,
    /// The relay's settings, but for `metrics_listen`.
    pub relay: RelayConfig,
    /// Logs and traces of the gateways, the ai-consumer and the relay (e.g. an OTLP endpoint).
    pub telemetry: TelemetryConfig,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            name: "stack".into(),
            storage: Storage::Sqlite,
            fetch_wait_ms: None,
            nginx: true,
            edge: crate::nginx::EdgeLimits::default(),
            // An answer takes ~100 ms (50 ms to the first token, 8 tokens at 200/s), so a kill
            // always finds calls in flight and deltas streaming.
            fake_llm: FakeLlmConfig {
                latency_ms: 50,
                token_rate: 200.0,
                ..FakeLlmConfig::default()
            },
            gateway: GatewayConfig {
                // Load tests send far more than a person would.
                rate_limit_messages: 1_000_000,
                // A throwaway stack: dev mode (the built-in secret and an open POST /token).
                ..GatewayConfig::local(SocketAddr::from(([127, 0, 0, 1], 0)))
            },
            consumer: ConsumerConfig {
                backoff_base_ms: 20,
                backoff_cap_ms: 200,
                // A consumer killed mid-call leaves its lease behind; the restarted one waits
                // it out before answering. The fake LLM answers in ~100 ms, so a 4 s attempt
                // timeout and a 5 s lease keep the DESIGN's "lease about the request timeout"
                // without a 90 s wait.
                request_timeout_secs: 4,
                lease_secs: 5,
                ..ConsumerConfig::local(String::new())
            },
            relay: RelayConfig::local(),
            telemetry: TelemetryConfig::default(),
        }
    }
}

/// How to tell that a process serves.
#[derive(Clone, Debug)]
enum Probe {
    /// Something accepts connections on the port.
    Tcp(u16),
    /// Redis on the port answers `PING` (not while it reads its append-only file).
    Redis(u16),
    /// `GET url` answers 2xx.
    Http(String),
}

/// A process of the stack and how to tell that it serves.
#[derive(Debug)]
struct Member {
    process: ManagedProcess,
    probe: Probe,
}

impl Member {
    fn new(spec: ProcessSpec, probe: Probe) -> Self {
        Self {
            process: ManagedProcess::new(spec),
            probe,
        }
    }
}

/// The ports a stack's processes listen on, drawn before any starts.
#[derive(Debug)]
struct Ports {
    postgres: u16,
    kafka: u16,
    redis: u16,
    llm: u16,
    gateways: [u16; 2],
    consumer: u16,
    relay: u16,
    nginx: u16,
}

impl Ports {
    fn draw() -> std::io::Result<Self> {
        Ok(Self {
            postgres: free_port()?,
            kafka: free_port()?,
            redis: free_port()?,
            llm: free_port()?,
            gateways: [free_port()?, free_port()?],
            consumer: free_port()?,
            relay: free_port()?,
            nginx: free_port()?,
        })
    }
}

/// 127.0.0.1:`port`.
fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One tokio worker thread for a tokio process of the stack (the broker, the fake LLM, the
/// services), as `scripts/stack.sh` runs them: every process shares this machine's cores, and
/// one worker each wakes fewer threads per message than one per core each.
fn one_worker_thread() -> [(String, String); 1] {
    [("TOKIO_WORKER_THREADS".to_owned(), "1".to_owned())]
}

/// `/ready` of the process whose HTTP endpoint is on `port`.
fn ready_probe(port: u16) -> Probe {
    Probe::Http(format!("http://127.0.0.1:{port}/ready"))
}

/// A running stack. Dropping it kills every process; the directory (logs, data) is removed
/// unless [`Stack::keep_dir`] was called.
#[derive(Debug)]
pub struct Stack {
    procs: BTreeMap<Component, Member>,
    path: PathBuf,
    gateway_ports: Vec<u16>,
    /// `/metrics` of each service process: (service, URL).
    metrics_urls: Vec<(&'static str, String)>,
    nginx_port: Option<u16>,
    kafka_bootstrap: String,
    redis_url: String,
    /// tansu's PostgreSQL cluster, with `Storage::Postgres`.
    postgres: Option<Cluster>,
    /// `StackOptions::fetch_wait_ms`.
    fetch_wait_ms: Option<u64>,
    http: reqwest::Client,
    /// Last, so that it is removed only after every process was killed.
    dir: Option<tempfile::TempDir>,
}

impl Stack {
    /// Starts every process, creates the topics and waits until all are ready.
    ///
    /// # Errors
    /// When a program is missing or a process does not become ready (the message carries the
    /// end of its log).
    pub async fn launch(opts: StackOptions) -> anyhow::Result<Self> {
        let bins = Binaries::locate()?;
        tracing::info!(services = %bins.dir.display(), "starting a stack");
        let mut stack = Self::planned(&bins, &opts)?;
        if let Err(e) = stack.start_all().await {
            let dir = stack.keep_dir();
            return Err(e.context(format!(
                "the stack did not start; logs in {}",
                dir.display()
            )));
        }
        tracing::info!(dir = %stack.path.display(), entry = %stack.http_base(), "stack ready");
        Ok(stack)
    }

    /// A stack in a fresh directory with every process planned and none started.
    fn planned(bins: &Binaries, opts: &StackOptions) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("colloquy-chaos-{}-", opts.name))
            .tempdir()
            .context("stack directory")?;
        let mut stack = Self {
            procs: BTreeMap::new(),
            path: dir.path().to_owned(),
            gateway_ports: Vec::new(),
            metrics_urls: Vec::new(),
            nginx_port: None,
            kafka_bootstrap: String::new(),
            redis_url: String::new(),
            postgres: None,
            fetch_wait_ms: opts.fetch_wait_ms,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(3))
                .build()
                .context("HTTP client")?,
            dir: Some(dir),
        };
        stack.plan(bins, opts)?;
        Ok(stack)
    }

    /// Starts the infrastructure, creates the topics, then the services and nginx.
    async fn start_all(&mut self) -> anyhow::Result<()> {
        if let Some(cluster) = self.postgres.clone() {
            self.start(Component::Database)?;
            self.wait_ready(Component::Database).await?;
            cluster
                .apply_schema(READY_TIMEOUT)
                .await
                .context("tansu's schema")?;
        }
        let infra = [Component::Broker, Component::Redis, Component::FakeLlm];
        for c in infra {
            self.start(c)?;
        }
        for c in infra {
            self.wait_ready(c).await?;
        }
        self.create_topics().await?;
        let services: Vec<Component> = self
            .procs
            .keys()
            .copied()
            .filter(|c| {
                matches!(
                    c,
                    Component::Gateway(_) | Component::Consumer | Component::Relay
                )
            })
            .collect();
        for &c in &services {
            self.start(c)?;
        }
        for &c in &services {
            self.wait_ready(c).await?;
        }
        if self.procs.contains_key(&Component::Nginx) {
            self.start(Component::Nginx)?;
            self.wait_ready(Component::Nginx).await?;
        }
        Ok(())
    }

    /// Decides ports, arguments and environment of every process.
    fn plan(&mut self, bins: &Binaries, opts: &StackOptions) -> anyhow::Result<()> {
        let ports = Ports::draw()?;
        self.kafka_bootstrap = format!("127.0.0.1:{}", ports.kafka);
        self.redis_url = format!("redis://127.0.0.1:{}", ports.redis);
        self.gateway_ports = ports.gateways.to_vec();
        if opts.storage == Storage::Postgres {
            let database = self.database(ports.postgres)?;
            self.procs.insert(Component::Database, database);
        }
        let broker = self.broker(bins, opts, &ports)?;
        self.procs.insert(Component::Broker, broker);
        let redis = self.redis(bins, &ports)?;
        self.procs.insert(Component::Redis, redis);
        let llm = self.fake_llm(bins, opts, &ports);
        self.procs.insert(Component::FakeLlm, llm);
        for n in 0..2u8 {
            let gateway = self.gateway(bins, opts, n, ports.gateways[usize::from(n)]);
            self.procs.insert(Component::Gateway(n), gateway);
        }
        let consumer = self.consumer(bins, opts, &ports);
        self.procs.insert(Component::Consumer, consumer);
        let relay = self.relay(bins, opts, &ports);
        self.procs.insert(Component::Relay, relay);
        if opts.nginx {
            match &bins.nginx {
                Some(nginx) => {
                    let proc = self.nginx(nginx, opts, ports.nginx)?;
                    self.procs.insert(Component::Nginx, proc);
                }
                None => tracing::warn!(
                    "nginx is not installed: clients connect to both gateways directly"
                ),
            }
        }
        Ok(())
    }

    /// `<component>.log` in the stack's directory.
    fn log(&self, c: Component) -> PathBuf {
        self.path.join(format!("{c}.log"))
    }

    /// PostgreSQL in `postgres/` (a fresh cluster), for tansu's postgres engine. The stack's
    /// directory is opened to other users: the server runs as `postgres` when we are root.
    fn database(&mut self, port: u16) -> anyhow::Result<Member> {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o755))?;
        let cluster = Cluster::init(&self.path.join("postgres"), port)?;
        let spec = cluster.server(self.log(Component::Database));
        self.postgres = Some(cluster);
        Ok(Member::new(spec, Probe::Tcp(port)))
    }

    /// tansu in `broker/` (where its sqlite file goes).
    fn broker(
        &self,
        bins: &Binaries,
        opts: &StackOptions,
        ports: &Ports,
    ) -> anyhow::Result<Member> {
        let dir = self.path.join("broker");
        std::fs::create_dir_all(&dir)?;
        let log_filter = std::env::var("CHAOS_TANSU_LOG").unwrap_or_else(|_| "warn".into());
        let spec = ProcessSpec::new(&bins.tansu, &dir, self.log(Component::Broker))
            .args(tansu_args(
                ports.kafka,
                &opts.storage.engine_url(self.postgres.as_ref())?,
            ))
            .envs([("RUST_LOG".to_owned(), log_filter)])
            .envs(one_worker_thread())
            .envs(opts.storage.tansu_env());
        Ok(Member::new(spec, Probe::Tcp(ports.kafka)))
    }

    /// Redis with its append-only file in `redis/`, fsynced on every write (see the module's
    /// header).
    fn redis(&self, bins: &Binaries, ports: &Ports) -> anyhow::Result<Member> {
        let dir = self.path.join("redis");
        std::fs::create_dir_all(&dir)?;
        let persistence = RedisPersistence::AppendFsyncAlways(dir.clone());
        let spec = ProcessSpec::new(&bins.redis, &dir, self.log(Component::Redis))
            .args(redis_args(ports.redis, &persistence));
        Ok(Member::new(spec, Probe::Redis(ports.redis)))
    }

    fn fake_llm(&self, bins: &Binaries, opts: &StackOptions, ports: &Ports) -> Member {
        let config = FakeLlmProcessConfig {
            listen: local(ports.llm),
            llm: opts.fake_llm.clone(),
        };
        let spec = ProcessSpec::new(&bins.fake_llm, &self.path, self.log(Component::FakeLlm))
            .envs(one_worker_thread())
            .envs(render_env(&config, Secrets::Omit));
        Member::new(spec, Probe::Tcp(ports.llm))
    }

    /// What every service shares: Kafka (with the stack's partitions), Redis, the default
    /// names and the telemetry settings.
    fn shared_env(&self, opts: &StackOptions, kafka: &KafkaConfig) -> Vec<(String, String)> {
        [
            render_env(kafka, Secrets::Omit),
            render_env(&RedisConfig::local(self.redis_url.clone()), Secrets::Omit),
            render_env(&Names::default(), Secrets::Omit),
            render_env(&opts.telemetry, Secrets::Omit),
        ]
        .concat()
    }

    /// Kafka for a service; a consumer gets `consumer_instance` as its static identity and takes every
    /// partition by hand (tansu's group coordinator can leave a restarted member without any;
    /// the stable id also names the ai-consumer's claim leases, so a restarted process takes
    /// its predecessor's over at once).
    fn kafka(&self, consumer_instance: Option<&str>) -> KafkaConfig {
        let mut kafka = KafkaConfig::local(self.kafka_bootstrap.clone());
        kafka.partitions = PARTITIONS;
        if let Some(wait) = self.fetch_wait_ms {
            kafka.fetch_wait_max_ms = wait;
        }
        // Measurements: `KAFKA_LINGER_MS` in this process's environment sets every
        // producer's linger, as `TANSU_FETCH_MIN_WAIT_MS` sets the broker's hold.
        if let Some(ms) = std::env::var("KAFKA_LINGER_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            kafka.linger_ms = ms;
        }
        if let Some(instance) = consumer_instance {
            kafka.assignment = Assignment::All;
            kafka.group_instance_id = Some(instance.to_owned());
        }
        kafka
    }

    /// A service process: `program` with `service`'s environment and what all services share.
    fn service<C: ToEnv>(
        &self,
        program: &Path,
        c: Component,
        service: &C,
        shared: Vec<(String, String)>,
        port: u16,
    ) -> Member {
        let spec = ProcessSpec::new(program, &self.path, self.log(c))
            .envs(one_worker_thread())
            .envs(shared)
            .envs(render_env(service, Secrets::Omit));
        Member::new(spec, ready_probe(port))
    }

    /// Gateway `n` (0-based) on `port`, named `gw{n+1}`.
    fn gateway(&mut self, bins: &Binaries, opts: &StackOptions, n: u8, port: u16) -> Member {
        self.metrics_urls
            .push(("gateway", format!("http://127.0.0.1:{port}/metrics")));
        let config = GatewayConfig {
            listen: local(port),
            instance_id: format!("gw{}", n + 1),
            ..opts.gateway.clone()
        };
        let shared = self.shared_env(opts, &self.kafka(None));
        self.service(&bins.gateway, Component::Gateway(n), &config, shared, port)
    }

    fn consumer(&mut self, bins: &Binaries, opts: &StackOptions, ports: &Ports) -> Member {
        let port = ports.consumer;
        self.metrics_urls
            .push(("ai-consumer", format!("http://127.0.0.1:{port}/metrics")));
        let config = ConsumerConfig {
            metrics_listen: local(port),
            base_url: format!("http://127.0.0.1:{}/v1", ports.llm),
            ..opts.consumer.clone()
        };
        let shared = self.shared_env(opts, &self.kafka(Some("ai-consumer-1")));
        self.service(&bins.consumer, Component::Consumer, &config, shared, port)
    }

    fn relay(&mut self, bins: &Binaries, opts: &StackOptions, ports: &Ports) -> Member {
        let port = ports.relay;
        self.metrics_urls
            .push(("relay", format!("http://127.0.0.1:{port}/metrics")));
        let config = RelayConfig {
            metrics_listen: local(port),
            ..opts.relay.clone()
        };
        let shared = self.shared_env(opts, &self.kafka(Some("relay-1")));
        self.service(&bins.relay, Component::Relay, &config, shared, port)
    }

    /// nginx on `port` in front of both gateways, with the stack's directory as its prefix.
    fn nginx(&mut self, program: &Path, opts: &StackOptions, port: u16) -> anyhow::Result<Member> {
        let args = crate::nginx::prepare(&self.path, port, &self.gateway_ports, opts.edge)?;
        self.nginx_port = Some(port);
        let spec = ProcessSpec::new(program, &self.path, self.log(Component::Nginx)).args(args);
        Ok(Member::new(spec, Probe::Tcp(port)))
    }

    /// Creates the topics before any service starts, so that no two services race to.
    async fn create_topics(&self) -> anyhow::Result<()> {
        let kafka = self.kafka(None);
        let topics = Names::default().all_topics();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match colloquy_core::kafka::ensure_topics(&kafka, &topics).await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "topics not created yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e).context("cannot create the topics"),
            }
        }
    }

    fn member(&mut self, c: Component) -> anyhow::Result<&mut Member> {
        self.procs
            .get_mut(&c)
            .with_context(|| format!("this stack has no {c}"))
    }

    /// Starts `c` (again), on the same ports and with the same data directory.
    ///
    /// # Errors
    /// When it is already running or cannot be spawned.
    pub fn start(&mut self, c: Component) -> anyhow::Result<()> {
        tracing::info!(component = %c, "starting");
        self.member(c)?
            .process
            .start()
            .with_context(|| format!("cannot start {c}"))
    }

    /// The process of `c`, which must have been started.
    fn started(&mut self, c: Component) -> anyhow::Result<&mut ManagedProcess> {
        let process = &mut self.member(c)?.process;
        if !process.is_started() {
            bail!("{c} is not running");
        }
        Ok(process)
    }

    /// Kills `c` with SIGKILL (nothing is flushed, committed or closed politely) and reaps it.
    ///
    /// # Errors
    /// When it is not running or the signal fails.
    pub async fn kill9(&mut self, c: Component) -> anyhow::Result<()> {
        let process = self.started(c)?;
        tracing::info!(component = %c, pid = process.pid(), "kill -9");
        process
            .kill()
            .await
            .with_context(|| format!("cannot kill {c}"))
    }

    /// Stops `c` as an operator would (SIGTERM, then SIGKILL after 10 s) and reaps it.
    ///
    /// # Errors
    /// When it is not running or cannot be killed.
    pub async fn stop(&mut self, c: Component) -> anyhow::Result<()> {
        self.started(c)?
            .stop(Duration::from_secs(10))
            .await
            .with_context(|| format!("cannot stop {c}"))
    }

    /// `scripts/stack.sh down && scripts/stack.sh up`: stops every process (services first,
    /// the broker last), then starts them all in order and waits until each is ready (the
    /// consumers: until they hold partitions). Data directories are kept.
    ///
    /// # Errors
    /// When a process cannot be stopped or does not become ready again.
    pub async fn restart_all(&mut self) -> anyhow::Result<()> {
        let order: Vec<Component> = self.procs.keys().rev().copied().collect();
        for c in order {
            if self.member(c)?.process.is_started() {
                self.stop(c).await?;
            }
        }
        self.start_all().await
    }

    /// Waits until `c` serves: the gateway's `/ready` (Kafka and Redis reachable), the
    /// ai-consumer's and the relay's `/ready` (they hold partitions), a listening port for
    /// the others.
    ///
    /// # Errors
    /// When it exits or is not ready within 60 s; the message carries the end of its log.
    pub async fn wait_ready(&mut self, c: Component) -> anyhow::Result<()> {
        let http = self.http.clone();
        let member = self.member(c)?;
        let (process, probe) = (&mut member.process, &member.probe);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = process.exit_status() {
                bail!(
                    "{c} is not running ({status}); end of {}:\n{}",
                    process.spec().log.display(),
                    process.log_tail(30)
                );
            }
            let ready = match probe {
                Probe::Tcp(port) => accepts(*port).await,
                Probe::Redis(port) => answers_ping(*port).await,
                Probe::Http(url) => http
                    .get(url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success()),
            };
            if ready {
                tracing::info!(component = %c, "ready");
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{c} not ready after {READY_TIMEOUT:?}; end of {}:\n{}",
                    process.spec().log.display(),
                    process.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The process id of `c`, while it runs.
    #[must_use]
    pub fn pid(&self, c: Component) -> Option<u32> {
        self.procs.get(&c)?.process.pid()
    }

    /// Every process of this stack.
    #[must_use]
    pub fn components(&self) -> Vec<Component> {
        self.procs.keys().copied().collect()
    }

    /// Every process that is not running, with its exit status.
    pub fn not_running(&mut self) -> Vec<(Component, String)> {
        self.procs
            .iter_mut()
            .filter_map(|(c, m)| m.process.exit_status().map(|s| (*c, s)))
            .collect()
    }

    /// Whether nginx fronts the gateways.
    #[must_use]
    pub fn has_nginx(&self) -> bool {
        self.nginx_port.is_some()
    }

    /// Where clients get tokens: nginx, else the last gateway (the gateway scenario kills the first).
    #[must_use]
    pub fn http_base(&self) -> String {
        match (self.nginx_port, self.gateway_ports.last().copied()) {
            (Some(p), _) | (None, Some(p)) => format!("http://127.0.0.1:{p}"),
            (None, None) => String::new(),
        }
    }

    /// WebSocket bases for the load generator: nginx, else every gateway (comma separated; a
    /// client moves to the next one when a connect fails).
    #[must_use]
    pub fn ws_bases(&self) -> String {
        match self.nginx_port {
            Some(p) => format!("ws://127.0.0.1:{p}"),
            None => self
                .gateway_ports
                .iter()
                .map(|p| format!("ws://127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    /// `/metrics` URL of each service process, with the service's name.
    #[must_use]
    pub fn metrics_urls(&self) -> &[(&'static str, String)] {
        &self.metrics_urls
    }

    #[must_use]
    pub fn kafka_bootstrap(&self) -> &str {
        &self.kafka_bootstrap
    }

    #[must_use]
    pub fn redis_url(&self) -> &str {
        &self.redis_url
    }

    /// The stack's directory: one `<component>.log` per process, tansu's sqlite file, Redis's
    /// append-only file, nginx's configuration and logs.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// Keeps the directory after the stack is dropped (to read the logs); returns its path.
    pub fn keep_dir(&mut self) -> PathBuf {
        if let Some(dir) = self.dir.take() {
            let _ = dir.keep();
        }
        self.path.clone()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // nginx's workers outlive a SIGKILLed master (and keep the port): stop it politely first.
        if let Some(nginx) = self.procs.get_mut(&Component::Nginx) {
            nginx
                .process
                .signal_and_wait_blocking("TERM", Duration::from_secs(3));
        }
        // Every other child is killed as it is dropped.
    }
}

#[cfg(test)]
mod tests {
    use colloquy_core::config::parse_env;

    use super::*;

    fn planned(opts: &StackOptions) -> Stack {
        let bin = PathBuf::from("/nonexistent");
        let bins = Binaries {
            dir: bin.clone(),
            gateway: bin.clone(),
            consumer: bin.clone(),
            relay: bin.clone(),
            fake_llm: bin.clone(),
            tansu: bin.clone(),
            redis: bin.clone(),
            nginx: None,
        };
        Stack::planned(&bins, opts).unwrap()
    }

    fn env(stack: &Stack, c: Component) -> Vec<(String, String)> {
        stack.procs[&c].process.spec().env.clone()
    }

    #[test]
    fn each_service_reads_its_planned_configuration_back() {
        let mut opts = StackOptions::default();
        opts.consumer.max_in_flight = 200;
        opts.telemetry.otlp_endpoint = Some("http://127.0.0.1:4318".into());
        let stack = planned(&opts);

        let gateway = env(&stack, Component::Gateway(1));
        let gw: GatewayConfig = parse_env(&gateway).unwrap();
        assert_eq!(gw.listen.port(), stack.gateway_ports[1]);
        assert_eq!(gw.instance_id, "gw2");
        assert!(gw.dev);
        assert_eq!(gw.rate_limit_messages, 1_000_000);
        let kafka: KafkaConfig = parse_env(&gateway).unwrap();
        assert_eq!(kafka.bootstrap_servers, stack.kafka_bootstrap);
        assert_eq!(kafka.partitions, PARTITIONS);
        assert_eq!(kafka.assignment, Assignment::Group);
        let redis: RedisConfig = parse_env(&gateway).unwrap();
        assert_eq!(redis.url, stack.redis_url);
        let telemetry: TelemetryConfig = parse_env(&gateway).unwrap();
        assert_eq!(telemetry.otlp_endpoint, opts.telemetry.otlp_endpoint);

        let consumer = env(&stack, Component::Consumer);
        let c: ConsumerConfig = parse_env(&consumer).unwrap();
        assert_eq!(c.max_in_flight, 200);
        assert_eq!((c.request_timeout_secs, c.lease_secs), (4, 5));
        let llm: FakeLlmProcessConfig = parse_env(&env(&stack, Component::FakeLlm)).unwrap();
        assert_eq!(c.base_url, format!("http://{}/v1", llm.listen));
        assert_eq!(llm.llm.latency_ms, 50);
        let kafka: KafkaConfig = parse_env(&consumer).unwrap();
        assert_eq!(kafka.assignment, Assignment::All);
        assert_eq!(kafka.group_instance_id.as_deref(), Some("ai-consumer-1"));

        let relay = env(&stack, Component::Relay);
        let r: RelayConfig = parse_env(&relay).unwrap();
        assert_eq!(
            stack.metrics_urls.last().map(|(_, u)| u.clone()),
            Some(format!("http://{}/metrics", r.metrics_listen))
        );
        let kafka: KafkaConfig = parse_env(&relay).unwrap();
        assert_eq!(kafka.group_instance_id.as_deref(), Some("relay-1"));
    }

    #[test]
    fn no_secret_reaches_a_process() {
        let mut opts = StackOptions::default();
        opts.gateway.admin_token = Some("admin-token-for-the-test".into());
        let stack = planned(&opts);
        for c in stack.components() {
            let env = env(&stack, c);
            assert!(
                !env.iter().any(
                    |(k, v)| ["AUTH_SECRET", "AUTH_ADMIN_TOKEN", "OPENAI_API_KEY"]
                        .contains(&k.as_str())
                        || v.contains("admin-token-for-the-test")
                ),
                "{c}: {env:?}"
            );
        }
    }
}
