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
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use colloquy_core::config::KafkaConfig;
use colloquy_core::names::Names;

use crate::binaries::Binaries;
use crate::ports::listen_port;

/// Partitions of every topic (as in `scripts/stack.sh`'s services: `KAFKA_PARTITIONS=4`).
pub const PARTITIONS: i32 = 4;

/// How long a process may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// One process of the stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
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

/// Where the broker keeps its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Storage {
    /// tansu's sqlite engine: survives a broker kill -9 (the default, and `scripts/stack.sh`'s).
    Sqlite,
    /// tansu's memory engine: fast, forgets everything when the broker stops
    /// (`KAFKA_STORAGE=memory`, what throughput runs use).
    Memory,
}

impl Storage {
    /// tansu's `--storage-engine` (sqlite paths are relative to the broker's directory).
    fn engine_url(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite://tansu.db",
            Self::Memory => "memory://tansu/",
        }
    }
}

impl fmt::Display for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Sqlite => "sqlite",
            Self::Memory => "memory",
        })
    }
}

/// What a stack runs with, beyond the defaults.
#[derive(Clone, Debug)]
pub struct StackOptions {
    /// Short name, part of the stack directory's name.
    pub name: String,
    /// The broker's storage engine.
    pub storage: Storage,
    /// Put nginx in front of the gateways when it is installed (clients then use only nginx).
    pub nginx: bool,
    /// The edge's per-address limits (the committed ones unless a load test raises them).
    pub edge: crate::nginx::EdgeLimits,
    /// Environment of the fake LLM (`FAKE_LLM_*`).
    pub fake_llm_env: Vec<(String, String)>,
    /// Extra environment of the ai-consumer.
    pub consumer_env: Vec<(String, String)>,
    /// Extra environment of the gateways, the ai-consumer and the relay (e.g. the OTLP endpoint).
    pub service_env: Vec<(String, String)>,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            name: "stack".into(),
            storage: Storage::Sqlite,
            nginx: true,
            edge: crate::nginx::EdgeLimits::default(),
            // An answer takes ~100 ms (50 ms to the first token, 8 tokens at 200/s), so a kill
            // always finds calls in flight and deltas streaming.
            fake_llm_env: vec![
                env("FAKE_LLM_LATENCY_MS", "50"),
                env("FAKE_LLM_TOKENS_PER_SEC", "200"),
            ],
            consumer_env: Vec::new(),
            service_env: Vec::new(),
        }
    }
}

/// A `(name, value)` environment pair.
#[must_use]
pub fn env(name: &str, value: &str) -> (String, String) {
    (name.to_owned(), value.to_owned())
}

/// How to tell that a process serves.
#[derive(Clone, Debug)]
enum Probe {
    /// Something accepts connections on the port.
    Tcp(u16),
    /// `GET url` answers 2xx.
    Http(String),
}

/// A process the stack can start, kill and start again.
#[derive(Debug)]
struct Process {
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    log: PathBuf,
    probe: Probe,
    child: Option<Child>,
    starts: u32,
}

impl Process {
    fn new(program: &Path, cwd: &Path, log: PathBuf, probe: Probe) -> Self {
        Self {
            program: program.to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: cwd.to_owned(),
            log,
            probe,
            child: None,
            starts: 0,
        }
    }

    fn args(mut self, args: &[&str]) -> Self {
        self.args = args.iter().map(|a| (*a).to_owned()).collect();
        self
    }

    fn envs(mut self, vars: impl IntoIterator<Item = (String, String)>) -> Self {
        self.env.extend(vars);
        self
    }

    /// Appends a marker line to the process's log, so its restarts can be found in it.
    fn mark(&self, what: &str) {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
        {
            let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            let _ = writeln!(f, "=== {now} colloquy-chaos: {what}");
        }
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("already running");
        }
        self.starts += 1;
        self.mark(&format!("start #{}", self.starts));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("open {}", self.log.display()))?;
        let mut cmd = Command::new(&self.program);
        // A clean environment: nothing of the caller's (an OPENAI_API_KEY, a topic prefix, an
        // OTLP endpoint) may change what the stack does.
        cmd.env_clear();
        for var in ["PATH", "HOME"] {
            if let Some(v) = std::env::var_os(var) {
                cmd.env(var, v);
            }
        }
        let child = cmd
            .env("RUST_BACKTRACE", "1")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .args(&self.args)
            .current_dir(&self.cwd)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot run {}", self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// The exit status if the process ended, without waiting.
    fn exit_status(&mut self) -> Option<String> {
        match self.child.as_mut().map(Child::try_wait) {
            None => Some("not running".into()),
            Some(Ok(Some(status))) => Some(status.to_string()),
            Some(Ok(None)) => None,
            Some(Err(e)) => Some(format!("unknown state: {e}")),
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// A running stack. Dropping it kills every process; the directory (logs, data) is removed
/// unless [`Stack::keep_dir`] was called.
#[derive(Debug)]
pub struct Stack {
    procs: BTreeMap<Component, Process>,
    path: PathBuf,
    gateway_ports: Vec<u16>,
    /// `/metrics` of each service process: (service, URL).
    metrics_urls: Vec<(&'static str, String)>,
    nginx_port: Option<u16>,
    kafka_bootstrap: String,
    redis_url: String,
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
        let dir = tempfile::Builder::new()
            .prefix(&format!("colloquy-chaos-{}-", opts.name))
            .tempdir()
            .context("stack directory")?;
        let path = dir.path().to_owned();
        let mut stack = Self {
            procs: BTreeMap::new(),
            path: path.clone(),
            gateway_ports: Vec::new(),
            metrics_urls: Vec::new(),
            nginx_port: None,
            kafka_bootstrap: String::new(),
            redis_url: String::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(3))
                .build()
                .context("HTTP client")?,
            dir: Some(dir),
        };
        stack.plan(&bins, &opts)?;
        if let Err(e) = stack.start_all().await {
            let dir = stack.keep_dir();
            return Err(e.context(format!(
                "the stack did not start; logs in {}",
                dir.display()
            )));
        }
        tracing::info!(dir = %path.display(), entry = %stack.http_base(), "stack ready");
        Ok(stack)
    }

    /// Starts the infrastructure, creates the topics, then the services and nginx.
    async fn start_all(&mut self) -> anyhow::Result<()> {
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
        let dir = self.path.clone();
        let log = |c: Component| dir.join(format!("{c}.log"));
        let kafka_port = listen_port()?;
        let redis_port = listen_port()?;
        let llm_port = listen_port()?;
        self.kafka_bootstrap = format!("127.0.0.1:{kafka_port}");
        self.redis_url = format!("redis://127.0.0.1:{redis_port}");

        // sqlite://NAME is relative to the working directory (see infra/images/README.md).
        let kafka_url = format!("tcp://{}", self.kafka_bootstrap);
        let broker_dir = dir.join("broker");
        std::fs::create_dir_all(&broker_dir)?;
        let broker = Process::new(
            &bins.tansu,
            &broker_dir,
            log(Component::Broker),
            Probe::Tcp(kafka_port),
        )
        .args(&[
            "broker",
            "--listener-url",
            &kafka_url,
            "--advertised-listener-url",
            &kafka_url,
            "--storage-engine",
            opts.storage.engine_url(),
        ])
        .envs([env(
            "RUST_LOG",
            &std::env::var("CHAOS_TANSU_LOG").unwrap_or_else(|_| "warn".into()),
        )]);
        self.procs.insert(Component::Broker, broker);

        let redis_dir = dir.join("redis");
        std::fs::create_dir_all(&redis_dir)?;
        let redis_dir_arg = redis_dir.display().to_string();
        let redis = Process::new(
            &bins.redis,
            &redis_dir,
            log(Component::Redis),
            Probe::Tcp(redis_port),
        )
        .args(&[
            "--port",
            &redis_port.to_string(),
            "--bind",
            "127.0.0.1",
            "--daemonize",
            "no",
            "--dir",
            &redis_dir_arg,
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--logfile",
            "",
        ]);
        self.procs.insert(Component::Redis, redis);

        let llm = Process::new(
            &bins.fake_llm,
            &dir,
            log(Component::FakeLlm),
            Probe::Tcp(llm_port),
        )
        .envs([
            env("FAKE_LLM_LISTEN", &format!("127.0.0.1:{llm_port}")),
            env("RUST_LOG", "info"),
        ])
        .envs(opts.fake_llm_env.iter().cloned());
        self.procs.insert(Component::FakeLlm, llm);

        let mut common = vec![
            env("KAFKA_BOOTSTRAP_SERVERS", &self.kafka_bootstrap),
            env("REDIS_URL", &self.redis_url),
            env("KAFKA_PARTITIONS", &PARTITIONS.to_string()),
            env("RUST_LOG", "info"),
        ];
        common.extend(opts.service_env.iter().cloned());
        for n in 0..2u8 {
            let port = listen_port()?;
            self.gateway_ports.push(port);
            self.metrics_urls
                .push(("gateway", format!("http://127.0.0.1:{port}/metrics")));
            let c = Component::Gateway(n);
            let gw = Process::new(
                &bins.gateway,
                &dir,
                log(c),
                Probe::Http(format!("http://127.0.0.1:{port}/ready")),
            )
            .envs(common.iter().cloned())
            .envs([
                env("GATEWAY_LISTEN", &format!("127.0.0.1:{port}")),
                env("GATEWAY_INSTANCE_ID", &format!("gw{}", n + 1)),
                env("RATE_LIMIT_MESSAGES", "1000000"),
                // A throwaway stack: the built-in secret and an open POST /token are fine.
                env("COLLOQUY_DEV", "1"),
            ]);
            self.procs.insert(c, gw);
        }

        let consumer_port = listen_port()?;
        self.metrics_urls.push((
            "ai-consumer",
            format!("http://127.0.0.1:{consumer_port}/metrics"),
        ));
        let consumer = Process::new(
            &bins.consumer,
            &dir,
            log(Component::Consumer),
            Probe::Http(format!("http://127.0.0.1:{consumer_port}/ready")),
        )
        .envs(common.iter().cloned())
        .envs([
            env("METRICS_LISTEN", &format!("127.0.0.1:{consumer_port}")),
            env(
                "OPENAI_BASE_URL",
                &format!("http://127.0.0.1:{llm_port}/v1"),
            ),
            env("LLM_BACKOFF_BASE_MS", "20"),
            env("LLM_BACKOFF_CAP_MS", "200"),
            // A consumer killed mid-call leaves its lease behind; the restarted one waits it
            // out before answering. The fake LLM answers in ~100 ms, so a 4 s attempt
            // timeout and a 5 s lease keep the DESIGN's "lease about the request timeout"
            // without a 90 s wait.
            env("LLM_REQUEST_TIMEOUT_SECS", "4"),
            env("CLAIM_LEASE_SECS", "5"),
            // One instance takes every partition by hand (tansu's group coordinator can
            // leave a restarted member without any); the stable id names its claim leases,
            // so the restarted process takes its predecessor's over at once.
            env("KAFKA_ASSIGNMENT", "all"),
            env("KAFKA_GROUP_INSTANCE_ID", "ai-consumer-1"),
        ])
        .envs(opts.consumer_env.iter().cloned());
        self.procs.insert(Component::Consumer, consumer);

        let relay_port = listen_port()?;
        self.metrics_urls
            .push(("relay", format!("http://127.0.0.1:{relay_port}/metrics")));
        let relay = Process::new(
            &bins.relay,
            &dir,
            log(Component::Relay),
            Probe::Http(format!("http://127.0.0.1:{relay_port}/ready")),
        )
        .envs(common.iter().cloned())
        .envs([
            env("METRICS_LISTEN", &format!("127.0.0.1:{relay_port}")),
            env("KAFKA_ASSIGNMENT", "all"),
            env("KAFKA_GROUP_INSTANCE_ID", "relay-1"),
        ]);
        self.procs.insert(Component::Relay, relay);

        if opts.nginx {
            match &bins.nginx {
                Some(nginx) => {
                    let port = listen_port()?;
                    self.nginx_port = Some(port);
                    for sub in crate::nginx::PREFIX_DIRS {
                        std::fs::create_dir_all(dir.join(sub))?;
                    }
                    let conf = dir.join("nginx").join("nginx.conf");
                    std::fs::write(
                        &conf,
                        crate::nginx::config(port, &self.gateway_ports, opts.edge),
                    )?;
                    let (prefix, conf, error_log) = (
                        format!("{}/", dir.display()),
                        conf.display().to_string(),
                        dir.join("nginx").join("error.log").display().to_string(),
                    );
                    let proc = Process::new(nginx, &dir, log(Component::Nginx), Probe::Tcp(port))
                        .args(&[
                            "-p",
                            &prefix,
                            "-c",
                            &conf,
                            "-e",
                            &error_log,
                            "-g",
                            "daemon off;",
                        ]);
                    self.procs.insert(Component::Nginx, proc);
                }
                None => tracing::warn!(
                    "nginx is not installed: clients connect to both gateways directly"
                ),
            }
        }
        Ok(())
    }

    /// Creates the topics before any service starts, so that no two services race to.
    async fn create_topics(&self) -> anyhow::Result<()> {
        let mut kafka = KafkaConfig::local(self.kafka_bootstrap.clone());
        kafka.partitions = PARTITIONS;
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

    fn process(&mut self, c: Component) -> anyhow::Result<&mut Process> {
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
        self.process(c)?
            .spawn()
            .with_context(|| format!("cannot start {c}"))
    }

    /// Kills `c` with SIGKILL (nothing is flushed, committed or closed politely) and reaps it.
    ///
    /// # Errors
    /// When it is not running or the signal fails.
    pub async fn kill9(&mut self, c: Component) -> anyhow::Result<()> {
        let proc = self.process(c)?;
        let mut child = proc
            .child
            .take()
            .with_context(|| format!("{c} is not running"))?;
        tracing::info!(component = %c, pid = child.id(), "kill -9");
        // tokio's kill sends SIGKILL on Unix, then waits for the exit.
        child
            .kill()
            .await
            .with_context(|| format!("cannot kill {c}"))?;
        proc.mark("killed with SIGKILL");
        Ok(())
    }

    /// Stops `c` as an operator would (SIGTERM, then SIGKILL after 10 s) and reaps it.
    ///
    /// # Errors
    /// When it is not running or cannot be signalled.
    pub async fn stop(&mut self, c: Component) -> anyhow::Result<()> {
        let proc = self.process(c)?;
        let mut child = proc
            .child
            .take()
            .with_context(|| format!("{c} is not running"))?;
        if let Some(pid) = child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_err()
        {
            tracing::warn!(component = %c, "did not stop within 10 s; SIGKILL");
            child
                .kill()
                .await
                .with_context(|| format!("cannot kill {c}"))?;
        }
        proc.mark("stopped with SIGTERM");
        Ok(())
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
            if self.process(c)?.child.is_some() {
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
        let proc = self.process(c)?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = proc.exit_status() {
                bail!(
                    "{c} is not running ({status}); end of {}:\n{}",
                    proc.log.display(),
                    proc.log_tail(30)
                );
            }
            let ready = match &proc.probe {
                Probe::Tcp(port) => tokio::net::TcpStream::connect(("127.0.0.1", *port))
                    .await
                    .is_ok(),
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
                    proc.log.display(),
                    proc.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The process id of `c`, while it runs.
    #[must_use]
    pub fn pid(&self, c: Component) -> Option<u32> {
        self.procs.get(&c)?.child.as_ref()?.id()
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
            .filter_map(|(c, p)| p.exit_status().map(|s| (*c, s)))
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
        if let Some(child) = self
            .procs
            .get_mut(&Component::Nginx)
            .and_then(|p| p.child.as_mut())
            && let Some(pid) = child.id()
        {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Every other child is killed as it is dropped (kill_on_drop).
    }
}
