//! A fake OpenAI-compatible chat completions server.
//!
//! It is the LLM of the local stack when no API key is set, and the backend of load and chaos
//! tests. Answers are deterministic: the answer to a conversation is `echo: <last user message>`
//! padded with filler words, so a test can match every answer to its question. Latency, token
//! pacing, 429s (with `Retry-After`) and 5xx are injectable, which is what the ai-consumer's
//! retry and streaming paths need to be exercised against.
//!
//! It must serve thousands of requests per second on two cores, so the hot path renders each
//! response into one buffer, streams zero-copy slices of it, and logs nothing per request.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::Listener as _;
use bytes::Bytes;
use colloquy_core::config::{Secrets, ToEnv};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The one model `GET /v1/models` lists. Requests may name any model; it is echoed back.
pub const MODEL: &str = "fake-llm";

/// Filler appended after the echoed prompt until the answer has its configured length.
const FILLER: [&str; 16] = [
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
    "sed",
    "do",
    "eiusmod",
    "tempor",
    "incididunt",
    "ut",
    "labore",
    "magna",
];

/// How long a stopping server may take to finish responses already in flight.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Behaviour of the fake: how fast it answers, how long answers are, and how often it fails.
#[derive(Clone, Debug, clap::Args)]
pub struct FakeLlmConfig {
    /// Time before the first byte of every chat completion response, in milliseconds.
    #[arg(long = "latency-ms", env = "FAKE_LLM_LATENCY_MS", default_value_t = 0)]
    pub latency_ms: u64,
    /// Streaming pace in tokens per second; 0 sends every token at once.
    #[arg(long = "tokens-per-sec", env = "FAKE_LLM_TOKENS_PER_SEC", default_value_t = 0.0, value_parser = parse_rate)]
    pub token_rate: f64,
    /// Pieces (tokens) in an answer; the echoed prompt is grouped or padded to this many.
    #[arg(long = "tokens", env = "FAKE_LLM_TOKENS", default_value_t = 8)]
    pub tokens: usize,
    /// Share of requests answered 429 with `Retry-After`, from 0.0 to 1.0.
    #[arg(long = "rate-limit-ratio", env = "FAKE_LLM_429_RATIO", default_value_t = 0.0, value_parser = parse_ratio)]
    pub rate_limit_ratio: f64,
    /// Seconds announced in the `Retry-After` header of a 429.
    #[arg(
        long = "retry-after-secs",
        env = "FAKE_LLM_RETRY_AFTER_SECS",
        default_value_t = 1
    )]
    pub retry_after_secs: u64,
    /// Share of requests answered 500 or 503, from 0.0 to 1.0.
    #[arg(long = "server-error-ratio", env = "FAKE_LLM_5XX_RATIO", default_value_t = 0.0, value_parser = parse_ratio)]
    pub server_error_ratio: f64,
}

impl Default for FakeLlmConfig {
    /// The clap defaults: answers at once, 8 tokens, no failures.
    fn default() -> Self {
        colloquy_core::config::defaults()
    }
}

impl ToEnv for FakeLlmConfig {
    fn flag_values(&self, _: Secrets) -> Vec<(&'static str, Option<String>)> {
        let Self {
            latency_ms,
            token_rate,
            tokens,
            rate_limit_ratio,
            retry_after_secs,
            server_error_ratio,
        } = self;
        vec![
            ("latency_ms", Some(latency_ms.to_string())),
            ("token_rate", Some(token_rate.to_string())),
            ("tokens", Some(tokens.to_string())),
            ("rate_limit_ratio", Some(rate_limit_ratio.to_string())),
            ("retry_after_secs", Some(retry_after_secs.to_string())),
            ("server_error_ratio", Some(server_error_ratio.to_string())),
        ]
    }
}

/// The `fake-llm` binary's flags: where it listens and how it behaves.
#[derive(Clone, Debug, clap::Args)]
pub struct FakeLlmProcessConfig {
    /// Address to listen on.
    #[arg(long, env = "FAKE_LLM_LISTEN", default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub llm: FakeLlmConfig,
}

impl ToEnv for FakeLlmProcessConfig {
    fn flag_values(&self, secrets: Secrets) -> Vec<(&'static str, Option<String>)> {
        let Self { listen, llm } = self;
        let mut values = vec![("listen", Some(listen.to_string()))];
        values.extend(llm.flag_values(secrets));
        values
    }
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("`{s}` is not a ratio between 0.0 and 1.0")),
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
        _ => Err(format!("`{s}` is not a non-negative rate")),
    }
}

/// Shared state of the fake: its configuration and the request counter.
#[derive(Clone, Debug)]
pub struct FakeLlmState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cfg: FakeLlmConfig,
    latency: Duration,
    /// Time between two streamed tokens; `None` sends them all at once.
    token_period: Option<Duration>,
    retry_after: HeaderValue,
    requests: AtomicU64,
}

impl FakeLlmState {
    #[must_use]
    pub fn new(cfg: FakeLlmConfig) -> Self {
        let token_period = (cfg.token_rate.is_finite() && cfg.token_rate > 0.0)
            .then(|| Duration::from_secs_f64(1.0 / cfg.token_rate));
        Self {
            inner: Arc::new(Inner {
                latency: Duration::from_millis(cfg.latency_ms),
                token_period,
                retry_after: HeaderValue::from(cfg.retry_after_secs),
                requests: AtomicU64::new(0),
                cfg,
            }),
        }
    }

    /// Chat completion requests received so far, whatever their outcome (400, 429, 5xx included).
    #[must_use]
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }
}

/// The HTTP routes of the fake, without a socket (tests drive it with `oneshot`).
pub fn router(state: FakeLlmState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { "ok" }))
        .fallback(not_found)
        .with_state(state)
}

/// A running fake server. Dropping it also shuts the server down, without waiting.
#[derive(Debug)]
pub struct FakeLlm {
    addr: SocketAddr,
    state: FakeLlmState,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl FakeLlm {
    /// Binds `addr` (port 0 picks a free port) and serves the fake on it.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn start(cfg: FakeLlmConfig, addr: SocketAddr) -> anyhow::Result<Self> {
        // A stream is many small writes: each goes out at once.
        let listener = colloquy_core::net::listen(addr)
            .await
            .with_context(|| format!("cannot bind the fake LLM to {addr}"))?;
        let addr = listener
            .local_addr()
            .context("cannot read the fake LLM's bound address")?;
        let state = FakeLlmState::new(cfg);
        let app = router(state.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    // A dropped sender stops the server too.
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Self {
            addr,
            state,
            stop,
            task,
        })
    }

    /// The bound address.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The OpenAI base URL of this server, such as `http://127.0.0.1:8090/v1`.
    #[must_use]
    pub fn base_url(&self) -> String {
        let mut addr = self.addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{addr}/v1")
    }

    /// Chat completion requests received so far, whatever their outcome.
    #[must_use]
    pub fn requests(&self) -> u64 {
        self.state.requests()
    }

    /// Stops accepting connections and waits (boundedly) for responses in flight.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let mut task = self.task;
        match tokio::time::timeout(STOP_GRACE, &mut task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "fake LLM server failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "fake LLM server task failed"),
            Err(_) => {
                tracing::warn!("fake LLM did not stop within {STOP_GRACE:?}; aborting it");
                task.abort();
            }
        }
    }
}

// ---- request -------------------------------------------------------------------------------

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: Role,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Role {
    User,
    #[serde(other)]
    Other,
}

/// OpenAI accepts either a string or a list of typed parts.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(default)]
    text: Option<String>,
}

impl Content {
    fn words(&self) -> usize {
        match self {
            Self::Text(t) => t.split_whitespace().count(),
            Self::Parts(parts) => parts
                .iter()
                .filter_map(|p| p.text.as_deref())
                .map(|t| t.split_whitespace().count())
                .sum(),
        }
    }

    fn into_text(self) -> String {
        match self {
            Self::Text(t) => t,
            Self::Parts(parts) => parts.into_iter().filter_map(|p| p.text).collect(),
        }
    }
}

// ---- response ------------------------------------------------------------------------------

#[derive(Serialize)]
struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [CompletionChoice<'a>; 1],
    usage: Usage,
}

#[derive(Serialize)]
struct CompletionChoice<'a> {
    index: u32,
    message: AssistantMessage<'a>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct AssistantMessage<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [ChunkChoice<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize, Default)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

#[derive(Serialize, Clone, Copy)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

// ---- the answer ----------------------------------------------------------------------------

/// An answer and where its pieces end: piece `i` is `text[ends[i - 1]..ends[i]]`.
#[derive(Debug)]
struct Answer {
    text: String,
    ends: Vec<usize>,
}

impl Answer {
    fn pieces(&self) -> impl Iterator<Item = &str> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let piece = &self.text[start..end];
            start = end;
            piece
        })
    }
}

/// Builds the answer to `prompt`: `echo: <prompt>` then filler, in exactly `max(tokens, 1)`
/// pieces. The prompt appears verbatim; its words are grouped when there are more of them
/// than pieces, and each piece after the first starts with the whitespace that precedes it.
fn compose(prompt: &str, tokens: usize) -> Answer {
    const HEAD: &str = "echo:";
    let tokens = tokens.max(1);
    let mut text = String::with_capacity(HEAD.len() + 1 + prompt.len() + 8 * tokens);
    let mut ends = Vec::with_capacity(tokens);
    text.push_str(HEAD);
    if !prompt.is_empty() {
        text.push(' ');
        text.push_str(prompt);
    }
    if tokens == 1 {
        ends.push(text.len());
        return Answer { text, ends };
    }
    ends.push(HEAD.len());

    // Word starts in the prompt: 0, then every whitespace run that follows a word.
    let mut starts = Vec::new();
    let mut prev_ws = true;
    for (i, c) in prompt.char_indices() {
        let ws = c.is_whitespace();
        if i == 0 || (ws && !prev_ws) {
            starts.push(i);
        }
        prev_ws = ws;
    }
    let slots = tokens - 1;
    let words = starts.len();
    let prompt_at = HEAD.len() + 1;
    if words > 0 {
        let groups = words.min(slots);
        // Group g covers words [g * words / groups, (g + 1) * words / groups).
        for g in 1..groups {
            ends.push(prompt_at + starts[g * words / groups]);
        }
        ends.push(text.len());
    }
    for i in 0..slots - words.min(slots) {
        text.push(' ');
        text.push_str(FILLER[i % FILLER.len()]);
        ends.push(text.len());
    }
    Answer { text, ends }
}

// ---- handlers ------------------------------------------------------------------------------

async fn chat_completions(State(state): State<FakeLlmState>, body: Bytes) -> Response {
    let inner = &*state.inner;
    let n = inner.requests.fetch_add(1, Ordering::Relaxed);

    let request: ChatRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                &format!("We could not parse the JSON body of your request: {e}"),
                "invalid_request_error",
                None,
            );
        }
    };
    if request.messages.is_empty() {
        return error_response(
            StatusCode::BAD_REQUEST,
            "'messages' must contain at least one message",
            "invalid_request_error",
            None,
        );
    }

    if !inner.latency.is_zero() {
        tokio::time::sleep(inner.latency).await;
    }
    if let Some(failure) = roll_failure(&inner.cfg) {
        return failure_response(failure, &inner.retry_after);
    }

    let prompt_tokens: usize = request
        .messages
        .iter()
        .filter_map(|m| m.content.as_ref())
        .map(Content::words)
        .sum();
    let include_usage = request.stream && request.stream_options.is_some_and(|o| o.include_usage);
    let prompt = request
        .messages
        .into_iter()
        .rev()
        .find(|m| m.role == Role::User)
        .and_then(|m| m.content)
        .map(Content::into_text)
        .unwrap_or_default();
    let answer = compose(&prompt, inner.cfg.tokens);
    let completion_tokens = answer.ends.len() as u64;
    let usage = Usage {
        prompt_tokens: prompt_tokens as u64,
        completion_tokens,
        total_tokens: prompt_tokens as u64 + completion_tokens,
    };
    let id = format!("chatcmpl-fake{n}");
    let created = unix_now();

    if !request.stream {
        let completion = Completion {
            id: &id,
            object: "chat.completion",
            created,
            model: &request.model,
            choices: [CompletionChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content: &answer.text,
                },
                finish_reason: "stop",
            }],
            usage,
        };
        return json_response(StatusCode::OK, &completion);
    }

    let (body, marks) = render_stream(
        &id,
        created,
        &request.model,
        &answer,
        include_usage.then_some(usage),
    );
    let body = Bytes::from(body);
    let mut response = match inner.token_period {
        None => Response::new(Body::from(body)),
        Some(period) => Response::new(Body::from_stream(paced(body, marks, period))),
    };
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Renders the whole event stream into one buffer. `marks[i]` is where the event carrying
/// token `i` ends; everything after the last mark (finish, usage, `[DONE]`) goes with it.
fn render_stream(
    id: &str,
    created: u64,
    model: &str,
    answer: &Answer,
    usage: Option<Usage>,
) -> (Vec<u8>, Vec<usize>) {
    let mut out =
        Vec::with_capacity(256 + answer.ends.len() * (160 + model.len()) + answer.text.len());
    let mut marks = Vec::with_capacity(answer.ends.len());
    let event = |out: &mut Vec<u8>, choices: &[ChunkChoice<'_>], usage: Option<Usage>| {
        let chunk = Chunk {
            id,
            object: "chat.completion.chunk",
            created,
            model,
            choices,
            usage,
        };
        out.extend_from_slice(b"data: ");
        // Serialising these borrowed structs into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, &chunk);
        out.extend_from_slice(b"\n\n");
    };
    event(
        &mut out,
        &[choice(
            Delta {
                role: Some("assistant"),
                content: Some(""),
            },
            None,
        )],
        None,
    );
    for piece in answer.pieces() {
        event(
            &mut out,
            &[choice(
                Delta {
                    role: None,
                    content: Some(piece),
                },
                None,
            )],
            None,
        );
        marks.push(out.len());
    }
    event(&mut out, &[choice(Delta::default(), Some("stop"))], None);
    if usage.is_some() {
        event(&mut out, &[], usage);
    }
    out.extend_from_slice(b"data: [DONE]\n\n");
    (out, marks)
}

fn choice<'a>(delta: Delta<'a>, finish_reason: Option<&'static str>) -> ChunkChoice<'a> {
    ChunkChoice {
        index: 0,
        delta,
        finish_reason,
    }
}

/// Streams `body` in slices cut at `marks`, one slice per `period`, the first at once.
fn paced(
    body: Bytes,
    marks: Vec<usize>,
    period: Duration,
) -> impl futures::Stream<Item = Result<Bytes, Infallible>> + Send {
    let start = tokio::time::Instant::now();
    futures::stream::unfold((0usize, 0usize), move |(i, from)| {
        let body = body.clone();
        let to = if i + 1 >= marks.len() {
            body.len()
        } else {
            marks[i]
        };
        async move {
            if from >= body.len() {
                return None;
            }
            if i > 0 {
                tokio::time::sleep_until(start + period.mul_f64(i as f64)).await;
            }
            Some((Ok(body.slice(from..to)), (i + 1, to)))
        }
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    RateLimited,
    Internal,
    Overloaded,
}

fn roll_failure(cfg: &FakeLlmConfig) -> Option<Failure> {
    let odds = cfg.rate_limit_ratio + cfg.server_error_ratio;
    if odds <= 0.0 {
        return None;
    }
    let roll: f64 = rand::random();
    if roll < cfg.rate_limit_ratio {
        Some(Failure::RateLimited)
    } else if roll < odds {
        // Half of the server errors are 503s, which clients treat like an overload.
        Some(if rand::random::<bool>() {
            Failure::Internal
        } else {
            Failure::Overloaded
        })
    } else {
        None
    }
}

fn failure_response(failure: Failure, retry_after: &HeaderValue) -> Response {
    match failure {
        Failure::RateLimited => {
            let mut response = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "Rate limit reached",
                "requests",
                Some("rate_limit_exceeded"),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, retry_after.clone());
            response
        }
        Failure::Internal => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The server had an error while processing your request",
            "server_error",
            None,
        ),
        Failure::Overloaded => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "The engine is currently overloaded, please try again later",
            "server_error",
            Some("overloaded"),
        ),
    }
}

async fn models() -> Response {
    #[derive(Serialize)]
    struct Model {
        id: &'static str,
        object: &'static str,
        created: u64,
        owned_by: &'static str,
    }
    #[derive(Serialize)]
    struct List {
        object: &'static str,
        data: [Model; 1],
    }
    json_response(
        StatusCode::OK,
        &List {
            object: "list",
            data: [Model {
                id: MODEL,
                object: "model",
                created: 0,
                owned_by: "colloquy-testkit",
            }],
        },
    )
}

async fn not_found(uri: axum::http::Uri) -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        &format!(
            "Unknown path {}: the fake serves /v1/chat/completions and /v1/models",
            uri.path()
        ),
        "invalid_request_error",
        Some("unknown_url"),
    )
}

/// An OpenAI-style error: `{"error":{"message","type","param","code"}}`.
fn error_response(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response {
    #[derive(Serialize)]
    struct Body<'a> {
        error: Detail<'a>,
    }
    #[derive(Serialize)]
    struct Detail<'a> {
        message: &'a str,
        #[serde(rename = "type")]
        kind: &'a str,
        param: Option<&'a str>,
        code: Option<&'a str>,
    }
    json_response(
        status,
        &Body {
            error: Detail {
                message,
                kind,
                param: None,
                code,
            },
        },
    )
}

fn json_response(status: StatusCode, value: &impl Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(bytes) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            bytes,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    #[test]
    fn the_process_config_round_trips_through_its_environment() {
        colloquy_core::config::assert_round_trip(&FakeLlmProcessConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 4321)),
            llm: FakeLlmConfig {
                latency_ms: 1,
                token_rate: 2.5,
                tokens: 3,
                rate_limit_ratio: 0.25,
                retry_after_secs: 4,
                server_error_ratio: 0.125,
            },
        });
        assert_eq!(FakeLlmConfig::default().tokens, 8);
    }

    async fn start(cfg: FakeLlmConfig) -> FakeLlm {
        FakeLlm::start(cfg, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .unwrap()
    }

    fn request(prompt: &str, stream: bool) -> Value {
        json!({
            "model": "gpt-test",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "an earlier question"},
                {"role": "assistant", "content": "an earlier answer"},
                {"role": "user", "content": prompt},
            ],
            "stream": stream,
            "stream_options": {"include_usage": true},
        })
    }

    async fn post(llm: &FakeLlm, body: impl Into<reqwest::Body>) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("{}/chat/completions", llm.base_url()))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// Parses an SSE body into its `data:` payloads.
    fn events(body: &str) -> Vec<&str> {
        body.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| e.strip_prefix("data: ").unwrap())
            .collect()
    }

    #[tokio::test]
    async fn answer_contains_the_last_user_message() {
        let llm = start(FakeLlmConfig::default()).await;
        let prompt = "what is  the\ncapital of France? (msg 42)";
        let response = post(&llm, request(prompt, false).to_string()).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["model"], "gpt-test");
        assert_eq!(body["choices"][0]["message"]["role"], "assistant");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        let content = body["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(content.starts_with(&format!("echo: {prompt}")), "{content}");
        assert_eq!(body["usage"]["completion_tokens"], 8);
        let usage = &body["usage"];
        assert_eq!(
            usage["total_tokens"].as_u64(),
            Some(usage["prompt_tokens"].as_u64().unwrap() + 8)
        );
        assert_eq!(llm.requests(), 1);
        llm.stop().await;
    }

    #[tokio::test]
    async fn stream_deltas_add_up_to_the_answer() {
        let cfg = FakeLlmConfig {
            tokens: 12,
            token_rate: 2000.0,
            ..FakeLlmConfig::default()
        };
        let llm = start(cfg).await;
        let prompt = "tell me about \"quotes\" and ünïcode";
        let full: Value = post(&llm, request(prompt, false).to_string())
            .await
            .json()
            .await
            .unwrap();
        let full = full["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned();

        let response = post(&llm, request(prompt, true).to_string()).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let body = response.text().await.unwrap();
        let events = events(&body);
        assert_eq!(events.last(), Some(&"[DONE]"));
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert!(
            chunks
                .iter()
                .all(|c| c["object"] == "chat.completion.chunk")
        );
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let usage = chunks.last().unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["completion_tokens"], 12);
        let finish = &chunks[chunks.len() - 2];
        assert_eq!(finish["choices"][0]["finish_reason"], "stop");
        let deltas: Vec<&str> = chunks[1..chunks.len() - 2]
            .iter()
            .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
            .collect();
        assert_eq!(deltas.len(), 12);
        assert_eq!(deltas.concat(), full);
        assert!(full.contains(prompt));
        llm.stop().await;
    }

    #[tokio::test]
    async fn rate_limit_ratio_one_always_answers_429() {
        let cfg = FakeLlmConfig {
            rate_limit_ratio: 1.0,
            retry_after_secs: 3,
            ..FakeLlmConfig::default()
        };
        let llm = start(cfg).await;
        for _ in 0..3 {
            let response = post(&llm, request("hi", true).to_string()).await;
            assert_eq!(response.status(), 429);
            assert_eq!(response.headers()["retry-after"], "3");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "rate_limit_exceeded");
            assert_eq!(body["error"]["type"], "requests");
        }
        assert_eq!(llm.requests(), 3);
        llm.stop().await;
    }

    #[tokio::test]
    async fn server_error_ratio_one_always_answers_5xx() {
        let cfg = FakeLlmConfig {
            server_error_ratio: 1.0,
            ..FakeLlmConfig::default()
        };
        let llm = start(cfg).await;
        for _ in 0..4 {
            let response = post(&llm, request("hi", false).to_string()).await;
            assert!([500, 503].contains(&response.status().as_u16()));
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["type"], "server_error");
        }
        llm.stop().await;
    }

    #[tokio::test]
    async fn bad_json_is_a_400_with_an_openai_error() {
        let llm = start(FakeLlmConfig::default()).await;
        for bad in [
            "{not json",
            r#"{"model":"m"}"#,
            r#"{"model":"m","messages":[]}"#,
        ] {
            let response = post(&llm, bad).await;
            assert_eq!(response.status(), 400, "{bad}");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["type"], "invalid_request_error", "{bad}");
        }
        llm.stop().await;
    }

    #[tokio::test]
    async fn models_health_and_unknown_paths() {
        let llm = start(FakeLlmConfig::default()).await;
        let client = reqwest::Client::new();
        let models: Value = client
            .get(format!("{}/models", llm.base_url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(models["data"][0]["id"], MODEL);
        let health = client
            .get(format!("http://{}/health", llm.addr()))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), 200);
        let missing = client
            .get(format!("http://{}/nope", llm.addr()))
            .send()
            .await
            .unwrap();
        assert_eq!(missing.status(), 404);
        llm.stop().await;
    }

    #[test]
    fn content_parts_are_joined() {
        let m: ChatMessage = serde_json::from_str(
            r#"{"role":"user","content":[{"type":"text","text":"a b"},{"type":"image_url"}]}"#,
        )
        .unwrap();
        assert_eq!(m.content.unwrap().into_text(), "a b");
    }

    proptest! {
        #[test]
        fn answers_echo_the_prompt_in_exactly_n_pieces(prompt in "\\PC{0,60}", tokens in 0usize..20) {
            let answer = compose(&prompt, tokens);
            let pieces: Vec<&str> = answer.pieces().collect();
            prop_assert_eq!(pieces.len(), tokens.max(1));
            prop_assert!(pieces.iter().all(|p| !p.is_empty()));
            prop_assert_eq!(pieces.concat(), answer.text.clone());
            let head = if prompt.is_empty() { "echo:".to_owned() } else { format!("echo: {prompt}") };
            prop_assert!(answer.text.starts_with(&head));
        }
    }
}
