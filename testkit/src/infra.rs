//! Kafka and Redis for a test: containers when a Docker engine is reachable, local processes
//! otherwise. Either way on random host ports, torn down when dropped, and restartable (the
//! chaos scenarios kill and restart them).
//!
//! `COLLOQUY_TESTKIT=containers|processes` forces a backend; image names come from
//! `COLLOQUY_TANSU_IMAGE` and `COLLOQUY_REDIS_IMAGE` (defaults name the locally built images;
//! a user who can pull may point them at `apache/kafka` and `redis`).

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, ContainerRequest, GenericImage, ImageExt};
use tokio::process::Command;

use crate::process::{
    ManagedProcess, ProcessSpec, RedisPersistence, Storage, free_port, redis_args,
    redis_args_bound, redis_binary, tansu_args, tansu_binary, wait_port, wait_redis,
};

/// Which way infrastructure runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Containers,
    Processes,
}

impl Backend {
    /// From `COLLOQUY_TESTKIT`, else containers when `docker info` answers.
    #[must_use]
    pub fn from_env() -> Self {
        match std::env::var("COLLOQUY_TESTKIT").as_deref() {
            Ok("processes") => Self::Processes,
            Ok("containers") => Self::Containers,
            _ => {
                let docker = std::process::Command::new("docker")
                    .args(["info", "--format", "{{.ServerVersion}}"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if docker {
                    Self::Containers
                } else {
                    Self::Processes
                }
            }
        }
    }
}

/// Options for [`Infra::start_with`].
#[derive(Clone, Copy, Debug, Default)]
pub struct InfraOptions {
    /// Keep Kafka data on disk (sqlite) so it survives a broker restart; slower fetches.
    pub durable_kafka: bool,
    /// Keep Redis data in an append-only file fsynced on every write, as production does, so
    /// what a client saw written survives [`Infra::kill_redis`].
    pub durable_redis: bool,
}

impl InfraOptions {
    fn storage(self) -> Storage {
        if self.durable_kafka {
            Storage::Sqlite
        } else {
            Storage::Memory
        }
    }
}

// Two nodes per test: their size does not matter.
#[allow(clippy::large_enum_variant)]
enum Node {
    Container(Box<ContainerAsync<GenericImage>>),
    Process(ManagedProcess),
}

/// A running Kafka-compatible broker and Redis.
pub struct Infra {
    pub backend: Backend,
    pub kafka_bootstrap: String,
    pub redis_url: String,
    kafka_port: u16,
    redis_port: u16,
    kafka: Node,
    redis: Node,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for Infra {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Infra")
            .field("backend", &self.backend)
            .field("kafka", &self.kafka_bootstrap)
            .field("redis", &self.redis_url)
            .finish()
    }
}

impl Infra {
    /// Starts in-memory Kafka and Redis on the backend chosen by the environment.
    ///
    /// # Errors
    /// When neither can be started (the message says what is missing).
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(InfraOptions::default()).await
    }

    /// Starts Kafka and Redis with `opts`.
    ///
    /// # Errors
    /// When neither can be started (the message says what is missing).
    pub async fn start_with(opts: InfraOptions) -> anyhow::Result<Self> {
        let backend = Backend::from_env();
        let dir = tempfile::tempdir().context("temp dir")?;
        let kafka_port = free_port()?;
        let redis_port = free_port()?;
        let (kafka, redis) = match backend {
            Backend::Containers => (
                start_tansu_container(kafka_port, opts, dir.path()).await?,
                start_redis_container(redis_port, opts.durable_redis).await?,
            ),
            Backend::Processes => {
                let dir = dir.path();
                let tansu = ProcessSpec::new(&tansu_binary()?, dir, dir.join("tansu.log"))
                    .args(tansu_args(kafka_port, &opts.storage().engine_url(None)?))
                    .envs(opts.storage().tansu_env());
                let persistence = if opts.durable_redis {
                    let data = dir.join("redis");
                    std::fs::create_dir_all(&data).context("Redis data dir")?;
                    RedisPersistence::AppendFsyncAlways(data)
                } else {
                    RedisPersistence::None
                };
                let redis = ProcessSpec::new(&redis_binary()?, dir, dir.join("redis.log"))
                    .args(redis_args(redis_port, &persistence));
                let mut kafka = Node::Process(ManagedProcess::new(tansu));
                let mut redis = Node::Process(ManagedProcess::new(redis));
                kafka.start().await?;
                redis.start().await?;
                (kafka, redis)
            }
        };
        let infra = Self {
            backend,
            kafka_bootstrap: format!("127.0.0.1:{kafka_port}"),
            redis_url: format!("redis://127.0.0.1:{redis_port}"),
            kafka_port,
            redis_port,
            kafka,
            redis,
            _dir: dir,
        };
        infra.wait_ready().await?;
        Ok(infra)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        wait_redis(self.redis_port, Duration::from_secs(30))
            .await
            .context("Redis did not come up")?;
        wait_port(self.kafka_port, Duration::from_secs(60))
            .await
            .context("Kafka did not come up")?;
        Ok(())
    }

    /// Kills the broker at once (SIGKILL).
    ///
    /// # Errors
    /// When the kill fails.
    pub async fn kill_kafka(&mut self) -> anyhow::Result<()> {
        self.kafka.kill().await
    }

    /// Starts the broker again on the same port.
    ///
    /// # Errors
    /// When it does not come back.
    pub async fn start_kafka(&mut self) -> anyhow::Result<()> {
        self.kafka.start().await?;
        wait_port(self.kafka_port, Duration::from_secs(60)).await
    }

    /// Kills Redis at once (SIGKILL).
    ///
    /// # Errors
    /// When the kill fails.
    pub async fn kill_redis(&mut self) -> anyhow::Result<()> {
        self.redis.kill().await
    }

    /// Starts Redis again on the same port: empty, unless started with
    /// [`InfraOptions::durable_redis`].
    ///
    /// # Errors
    /// When it does not come back.
    pub async fn start_redis(&mut self) -> anyhow::Result<()> {
        self.redis.start().await?;
        wait_redis(self.redis_port, Duration::from_secs(30)).await
    }
}

impl Node {
    async fn start(&mut self) -> anyhow::Result<()> {
        match self {
            Self::Container(c) => {
                c.start().await.context("restart container")?;
                Ok(())
            }
            Self::Process(p) => p.start(),
        }
    }

    async fn kill(&mut self) -> anyhow::Result<()> {
        match self {
            Self::Container(c) => {
                let status = Command::new("docker")
                    .args(["kill", "--signal", "KILL", c.id()])
                    .status()
                    .await?;
                if !status.success() {
                    bail!("docker kill failed");
                }
                Ok(())
            }
            Self::Process(p) => p.kill().await,
        }
    }
}

async fn start_tansu_container(
    port: u16,
    opts: InfraOptions,
    dir: &std::path::Path,
) -> anyhow::Result<Node> {
    let image =
        std::env::var("COLLOQUY_TANSU_IMAGE").unwrap_or_else(|_| "colloquy/tansu:local".into());
    let (name, tag) = image.rsplit_once(':').unwrap_or((image.as_str(), "latest"));
    let mut req = GenericImage::new(name, tag)
        .with_exposed_port(9092.tcp())
        .with_wait_for(WaitFor::message_on_stdout("ready in"))
        .with_env_var("ADVERTISED_LISTENER_URL", format!("tcp://127.0.0.1:{port}"))
        .with_mapped_port(port, 9092.tcp())
        .with_startup_timeout(Duration::from_secs(60));
    for (var, value) in opts.storage().tansu_env() {
        req = req.with_env_var(var, value);
    }
    if opts.durable_kafka {
        req = req
            .with_env_var("STORAGE_ENGINE", Storage::Sqlite.engine_url(None)?)
            .with_mount(testcontainers::core::Mount::bind_mount(
                dir.display().to_string(),
                "/data",
            ));
    }
    let c = req
        .start()
        .await
        .with_context(|| format!("cannot start {image} (build it: infra/images/build.sh)"))?;
    Ok(Node::Container(Box::new(c)))
}

async fn start_redis_container(port: u16, durable: bool) -> anyhow::Result<Node> {
    let image =
        std::env::var("COLLOQUY_REDIS_IMAGE").unwrap_or_else(|_| "colloquy/redis:local".into());
    let (name, tag) = image.rsplit_once(':').unwrap_or((image.as_str(), "latest"));
    let mut request = ContainerRequest::from(
        GenericImage::new(name, tag)
            .with_exposed_port(6379.tcp())
            .with_wait_for(WaitFor::message_on_stdout("Ready to accept connections")),
    );
    if durable {
        // The image's own command keeps nothing on disk; a restarted container keeps its /data.
        let persistence = RedisPersistence::AppendFsyncAlways("/data".into());
        let mut cmd = vec!["/usr/local/bin/redis-server".to_owned()];
        cmd.extend(redis_args_bound("0.0.0.0", 6379, &persistence));
        cmd.extend(["--protected-mode".to_owned(), "no".to_owned()]);
        request = request.with_cmd(cmd);
    }
    let c = request
        .with_mapped_port(port, 6379.tcp())
        .with_startup_timeout(Duration::from_secs(30))
        .start()
        .await
        .with_context(|| format!("cannot start {image} (build it: infra/images/build.sh)"))?;
    Ok(Node::Container(Box::new(c)))
}
