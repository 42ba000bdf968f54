//! The stack harness, in the spirit of `spawn_app()`: one call starts Kafka and Redis, an LLM
//! (the fake LLM, or a wiremock OpenAI for exact counting), gateways, the ai-consumer and the
//! relay in-process on port 0, with unique topic and key prefixes, and typed helpers.

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use colloquy_ai_consumer::config::ConsumerConfig;
use colloquy_core::config::{KafkaConfig, LogFormat, RedisConfig, TelemetryConfig};
use colloquy_core::names::Names;
use colloquy_core::telemetry::Telemetry;
use colloquy_gateway::config::GatewayConfig;
use colloquy_relay::config::RelayConfig;

use crate::client::{WsClient, fetch_token};
use crate::fake_llm::{FakeLlm, FakeLlmConfig};
use crate::infra::{Infra, InfraOptions};
use crate::openai_mock::OpenAiMock;
use crate::otlp;

/// Initialises tracing once per test binary; `TEST_LOG=1` prints logs. Spans are always traced
/// and exported over OTLP, to `TEST_OTLP_ENDPOINT` or else to this binary's
/// [`otlp::shared`] receiver, where tests read a message's trace.
pub fn init_tracing() {
    let _ = telemetry();
}

/// Exports the spans that ended so far (blocking: call it from `spawn_blocking`).
pub fn flush_spans() {
    if let Some(t) = telemetry() {
        t.flush();
    }
}

fn telemetry() -> Option<&'static Telemetry> {
    static TELEMETRY: OnceLock<Option<Telemetry>> = OnceLock::new();
    TELEMETRY
        .get_or_init(|| {
            let endpoint =
                std::env::var("TEST_OTLP_ENDPOINT").unwrap_or_else(|_| otlp::shared().endpoint());
            let cfg = TelemetryConfig {
                otlp_endpoint: Some(endpoint),
                log_filter: if std::env::var_os("TEST_LOG").is_some() {
                    "info,colloquy=debug".into()
                } else {
                    "off".into()
                },
                log_format: LogFormat::Text,
            };
            // Kept for the whole test binary.
            colloquy_core::telemetry::init("testkit", &cfg).ok()
        })
        .as_ref()
}

/// Which LLM the stack talks to.
#[derive(Clone, Debug)]
pub enum LlmChoice {
    /// The fake LLM server with these knobs.
    Fake(FakeLlmConfig),
    /// A wiremock OpenAI; the test scripts its answers through [`TestApp::mock`].
    Mock,
}

/// Builder for [`TestApp`].
#[derive(Debug)]
pub struct TestAppBuilder {
    gateways: usize,
    llm: LlmChoice,
    infra: InfraOptions,
    produce_timeout_ms: u64,
    gateway: Box<dyn FnMutCfg<GatewayConfig>>,
    consumer: Box<dyn FnMutCfg<ConsumerConfig>>,
}

/// A configuration tweak.
pub trait FnMutCfg<T>: Fn(&mut T) + Send + Sync {}
impl<T, F: Fn(&mut T) + Send + Sync> FnMutCfg<T> for F {}

impl<T> std::fmt::Debug for dyn FnMutCfg<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<tweak>")
    }
}

/// A service running in-process, stoppable gracefully or abruptly.
#[derive(Debug)]
pub struct Running {
    pub shutdown: CancellationToken,
    pub task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Graceful stop: signal and wait (bounded).
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(20), self.task).await;
    }
    /// Abrupt stop: the task is dropped mid-flight, nothing is flushed or committed by it.
    pub fn abort(self) {
        self.task.abort();
    }
}

/// A gateway running in-process.
#[derive(Debug)]
pub struct GatewayHandle {
    pub port: u16,
    pub running: Option<Running>,
}

/// A whole stack for one test.
#[derive(Debug)]
pub struct TestApp {
    pub infra: Infra,
    pub names: Names,
    pub gateways: Vec<GatewayHandle>,
    pub consumer: Option<Running>,
    pub relay: Option<Running>,
    pub fake_llm: Option<FakeLlm>,
    pub mock: Option<OpenAiMock>,
    pub http: reqwest::Client,
    llm_base_url: String,
    produce_timeout_ms: u64,
    gateway_cfg: GatewayConfig,
    consumer_cfg: ConsumerConfig,
}

impl Default for TestAppBuilder {
    fn default() -> Self {
        Self {
            gateways: 1,
            llm: LlmChoice::Fake(FakeLlmConfig::default()),
            infra: InfraOptions::default(),
            produce_timeout_ms: 10_000,
            gateway: Box::new(|_: &mut GatewayConfig| {}),
            consumer: Box::new(|_: &mut ConsumerConfig| {}),
        }
    }
}

impl TestAppBuilder {
    #[must_use]
    pub fn gateways(mut self, n: usize) -> Self {
        self.gateways = n.max(1);
        self
    }
    #[must_use]
    pub fn llm(mut self, llm: LlmChoice) -> Self {
        self.llm = llm;
        self
    }
    #[must_use]
    pub fn durable_kafka(mut self) -> Self {
        self.infra.durable_kafka = true;
        self
    }
    /// How long a produce may take before the client is told `unavailable`.
    #[must_use]
    pub fn produce_timeout_ms(mut self, ms: u64) -> Self {
        self.produce_timeout_ms = ms;
        self
    }
    #[must_use]
    pub fn gateway_config(
        mut self,
        f: impl Fn(&mut GatewayConfig) + Send + Sync + 'static,
    ) -> Self {
        self.gateway = Box::new(f);
        self
    }
    #[must_use]
    pub fn consumer_config(
        mut self,
        f: impl Fn(&mut ConsumerConfig) + Send + Sync + 'static,
    ) -> Self {
        self.consumer = Box::new(f);
        self
    }

    /// Starts everything and waits until the gateways are ready.
    ///
    /// # Errors
    /// When any part fails to start.
    pub async fn spawn(self) -> anyhow::Result<TestApp> {
        init_tracing();
        let infra = Infra::start_with(self.infra).await?;
        let tag = format!("t{:08x}", rand::random::<u32>());
        let names = Names::with_prefixes(&format!("{tag}."), &format!("{tag}:"));
        let (fake_llm, mock, llm_base_url) = match self.llm {
            LlmChoice::Fake(cfg) => {
                let fake = FakeLlm::start(cfg, "127.0.0.1:0".parse()?).await?;
                let url = fake.base_url();
                (Some(fake), None, url)
            }
            LlmChoice::Mock => {
                let mock = OpenAiMock::start().await;
                let url = mock.base_url();
                (None, Some(mock), url)
            }
        };
        let mut gateway_cfg = GatewayConfig::local("127.0.0.1:0".parse()?);
        gateway_cfg.rate_limit_messages = 1_000_000;
        gateway_cfg.shutdown_grace_secs = 5;
        (self.gateway)(&mut gateway_cfg);
        let mut consumer_cfg = ConsumerConfig::local(llm_base_url.clone());
        consumer_cfg.backoff_base_ms = 20;
        consumer_cfg.backoff_cap_ms = 200;
        consumer_cfg.delta_batch_ms = 5;
        (self.consumer)(&mut consumer_cfg);
        let mut app = TestApp {
            infra,
            names,
            gateways: Vec::new(),
            consumer: None,
            relay: None,
            fake_llm,
            mock,
            http: reqwest::Client::new(),
            llm_base_url,
            produce_timeout_ms: self.produce_timeout_ms,
            gateway_cfg,
            consumer_cfg,
        };
        colloquy_core::kafka::ensure_topics(&app.kafka(), &app.names.all_topics())
            .await
            .context("create topics")?;
        for _ in 0..self.gateways {
            let gw = app.start_gateway(0).await?;
            app.gateways.push(gw);
        }
        app.start_consumer().await?;
        app.start_relay().await?;
        for i in 0..app.gateways.len() {
            app.wait_ready(i).await?;
        }
        Ok(app)
    }
}

impl TestApp {
    /// A stack with one gateway and the fake LLM.
    ///
    /// # Errors
    /// When any part fails to start.
    pub async fn spawn() -> anyhow::Result<Self> {
        TestAppBuilder::default().spawn().await
    }

    #[must_use]
    pub fn builder() -> TestAppBuilder {
        TestAppBuilder::default()
    }

    /// Kafka settings for this stack.
    #[must_use]
    pub fn kafka(&self) -> KafkaConfig {
        let mut k = KafkaConfig::local(self.infra.kafka_bootstrap.clone());
        k.partitions = 4;
        k.produce_timeout_ms = self.produce_timeout_ms;
        k
    }

    /// Redis settings for this stack.
    #[must_use]
    pub fn redis(&self) -> RedisConfig {
        RedisConfig::local(self.infra.redis_url.clone())
    }

    /// The LLM base URL the consumer uses.
    #[must_use]
    pub fn llm_base_url(&self) -> &str {
        &self.llm_base_url
    }

    /// The wiremock OpenAI (panics when the stack runs the fake LLM instead).
    #[must_use]
    pub fn mock(&self) -> &OpenAiMock {
        self.mock
            .as_ref()
            .expect("stack built with LlmChoice::Mock")
    }

    /// Starts a gateway on `port` (0 = any) and returns its handle.
    ///
    /// # Errors
    /// When it cannot start.
    pub async fn start_gateway(&self, port: u16) -> anyhow::Result<GatewayHandle> {
        let mut cfg = self.gateway_cfg.clone();
        cfg.listen = format!("127.0.0.1:{port}").parse()?;
        let app = colloquy_gateway::Application::build(colloquy_gateway::Settings {
            gateway: cfg,
            kafka: self.kafka(),
            redis: self.redis(),
            names: self.names.clone(),
        })
        .await?;
        let port = app.port();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(app.run_until_stopped(shutdown.clone()));
        Ok(GatewayHandle {
            port,
            running: Some(Running { shutdown, task }),
        })
    }

    /// Starts (or restarts) the ai-consumer.
    ///
    /// # Errors
    /// When it cannot start.
    pub async fn start_consumer(&mut self) -> anyhow::Result<()> {
        let app = colloquy_ai_consumer::Application::build(colloquy_ai_consumer::Settings {
            consumer: self.consumer_cfg.clone(),
            kafka: self.kafka(),
            redis: self.redis(),
            names: self.names.clone(),
        })
        .await?;
        let shutdown = CancellationToken::new();
        self.consumer = Some(Running {
            task: tokio::spawn(app.run_until_stopped(shutdown.clone())),
            shutdown,
        });
        Ok(())
    }

    /// Starts (or restarts) the relay.
    ///
    /// # Errors
    /// When it cannot start.
    pub async fn start_relay(&mut self) -> anyhow::Result<()> {
        let app = colloquy_relay::Application::build(colloquy_relay::Settings {
            relay: RelayConfig::local(),
            kafka: self.kafka(),
            redis: self.redis(),
            names: self.names.clone(),
        })
        .await?;
        let shutdown = CancellationToken::new();
        self.relay = Some(Running {
            task: tokio::spawn(app.run_until_stopped(shutdown.clone())),
            shutdown,
        });
        Ok(())
    }

    /// Stops the relay gracefully: answers then wait in `responses` (acked messages are not
    /// lost) until [`TestApp::start_relay`] runs it again.
    pub async fn stop_relay(&mut self) {
        if let Some(r) = self.relay.take() {
            r.stop().await;
        }
    }

    /// Waits until gateway `i` reports ready.
    ///
    /// # Errors
    /// When it is not ready within 30 s.
    pub async fn wait_ready(&self, i: usize) -> anyhow::Result<()> {
        let url = format!("{}/ready", self.http_base(i));
        for _ in 0..300 {
            if let Ok(r) = self.http.get(&url).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("gateway {i} not ready")
    }

    #[must_use]
    pub fn http_base(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.gateways[i].port)
    }

    #[must_use]
    pub fn ws_base(&self, i: usize) -> String {
        format!("ws://127.0.0.1:{}", self.gateways[i].port)
    }

    /// A token for `user` from gateway 0.
    ///
    /// # Errors
    /// When the gateway refuses.
    pub async fn token(&self, user: &str) -> anyhow::Result<String> {
        fetch_token(&self.http, &self.http_base(0), user).await
    }

    /// Opens a socket for `user` on gateway `i`.
    ///
    /// # Errors
    /// When the upgrade fails.
    pub async fn connect(&self, i: usize, user: &str) -> anyhow::Result<WsClient> {
        let token = self.token(user).await?;
        WsClient::connect(&self.ws_base(i), user, &token, None).await
    }

    /// Reads up to `n` records of `topic` from the beginning (payload, headers), waiting at most `timeout`.
    ///
    /// # Errors
    /// When the consumer cannot be created.
    pub async fn read_topic(
        &self,
        topic: &str,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<(Vec<u8>, Vec<(String, String)>)>> {
        use rdkafka::Message;
        use rdkafka::consumer::{Consumer, StreamConsumer};
        use rdkafka::message::Headers;
        let consumer: StreamConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &self.infra.kafka_bootstrap)
            .set("group.id", format!("reader-{}", rand::random::<u32>()))
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "5")
            .create()?;
        consumer.subscribe(&[topic])?;
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while out.len() < n {
            let Ok(msg) = tokio::time::timeout_at(deadline, consumer.recv()).await else {
                break;
            };
            let msg = msg?;
            let headers = msg
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|x| {
                            (
                                x.key.to_owned(),
                                String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push((msg.payload().unwrap_or_default().to_vec(), headers));
        }
        Ok(out)
    }

    /// Stops everything gracefully.
    pub async fn shutdown(mut self) {
        for gw in &mut self.gateways {
            if let Some(r) = gw.running.take() {
                r.stop().await;
            }
        }
        if let Some(c) = self.consumer.take() {
            c.stop().await;
        }
        if let Some(r) = self.relay.take() {
            r.stop().await;
        }
    }
}
