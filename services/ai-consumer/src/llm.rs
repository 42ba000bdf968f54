//! The LLM client: one OpenAI-compatible chat completion, streamed, retried with backoff.
//!
//! Request and chunk types are async-openai's. The HTTP exchange is done here with reqwest
//! rather than async-openai's client, because retry policy is ours to own: we need the status
//! class of every attempt, the `Retry-After` header, and no hidden retries underneath.

use std::time::{Duration, Instant, SystemTime};

use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
    ChatCompletionStreamOptions, CreateChatCompletionRequest, CreateChatCompletionResponse,
    CreateChatCompletionStreamResponse,
};
use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use colloquy_core::backoff::{Backoff, MAX_HINT};
use colloquy_core::labels::{LlmErrorClass, LlmStatus, RetryReason};

use crate::events::{LlmAnswered, LlmAttempted, LlmRefused, LlmRetrying, TokensUsed};

/// One turn of the conversation, as kept in memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    pub role: Role,
    pub content: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

/// A complete answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub content: String,
    /// 0 when the API reported no usage (then `usage_reported` is false).
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub usage_reported: bool,
    pub attempts: u32,
}

/// A call that failed for good.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum LlmError {
    /// Not worth retrying (400/401/403/404, `insufficient_quota`, unreadable answer).
    #[error("LLM refused the request ({class}): {message}")]
    Fatal {
        class: LlmErrorClass,
        message: String,
    },
    /// Every attempt failed with a retryable error.
    #[error("LLM failed after {attempts} attempts; last error: {last}")]
    Exhausted { attempts: u32, last: String },
}

impl LlmError {
    /// The `class` label of `colloquy_llm_errors_total`.
    #[must_use]
    pub fn class(&self) -> LlmErrorClass {
        match self {
            Self::Fatal { class, .. } => *class,
            Self::Exhausted { .. } => LlmErrorClass::Exhausted,
        }
    }
}

/// What one attempt came to.
#[derive(Debug)]
enum Attempt {
    Done(Answer),
    Retry {
        reason: RetryReason,
        retry_after: Option<Duration>,
        detail: String,
    },
    Fatal {
        class: LlmErrorClass,
        message: String,
    },
}

/// Receives streamed text; `restart` is called when a retry begins after partial output.
pub trait DeltaSink: Send {
    fn text(&mut self, piece: &str);
    fn restart(&mut self);
}

/// Ignores deltas (used when streaming is off).
#[derive(Debug, Default)]
pub struct NoDeltas;

impl DeltaSink for NoDeltas {
    fn text(&mut self, _piece: &str) {}
    fn restart(&mut self) {}
}

/// Client for one OpenAI-compatible endpoint.
#[derive(Clone, Debug)]
pub struct LlmClient {
    http: reqwest::Client,
    url: String,
    api_key: Option<SecretString>,
    model: String,
    stream: bool,
    timeout: Duration,
    backoff: Backoff,
}

impl LlmClient {
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(
        base_url: &str,
        api_key: Option<SecretString>,
        model: String,
        stream: bool,
        timeout: Duration,
        backoff: Backoff,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        Ok(Self {
            http,
            url: format!("{}/chat/completions", base_url.trim_end_matches('/')),
            api_key,
            model,
            stream,
            timeout,
            backoff,
        })
    }

    /// Builds the request body for `turns`.
    #[must_use]
    pub fn request(&self, turns: &[Turn]) -> CreateChatCompletionRequest {
        let messages = turns
            .iter()
            .map(|t| match t.role {
                Role::System => ChatCompletionRequestMessage::from(
                    ChatCompletionRequestSystemMessage::from(t.content.as_str()),
                ),
                Role::User => ChatCompletionRequestMessage::from(
                    ChatCompletionRequestUserMessage::from(t.content.clone()),
                ),
                Role::Assistant => ChatCompletionRequestMessage::from(
                    ChatCompletionRequestAssistantMessage::from(t.content.as_str()),
                ),
            })
            .collect();
        CreateChatCompletionRequest {
            model: self.model.clone(),
            messages,
            stream: Some(self.stream),
            stream_options: self.stream.then(|| ChatCompletionStreamOptions {
                include_usage: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Answers `turns`, retrying 429, 5xx, timeouts and transport errors with backoff.
    ///
    /// # Errors
    /// [`LlmError`] when the call fails for good.
    pub async fn complete(
        &self,
        turns: &[Turn],
        deltas: &mut dyn DeltaSink,
    ) -> Result<Answer, LlmError> {
        let body = self.request(turns);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let started = Instant::now();
            let outcome =
                match tokio::time::timeout(self.timeout, self.attempt(&body, deltas)).await {
                    Ok(o) => o,
                    Err(_) => {
                        LlmAttempted {
                            status: LlmStatus::Timeout,
                        }
                        .emit();
                        Attempt::Retry {
                            reason: RetryReason::Timeout,
                            retry_after: None,
                            detail: format!("no answer within {:?}", self.timeout),
                        }
                    }
                };
            match outcome {
                Attempt::Done(mut answer) => {
                    LlmAnswered {
                        attempts,
                        latency: started.elapsed(),
                    }
                    .emit();
                    answer.attempts = attempts;
                    return Ok(answer);
                }
                Attempt::Fatal { class, message } => {
                    LlmRefused {
                        attempt: attempts,
                        class,
                        message: &message,
                    }
                    .emit();
                    return Err(LlmError::Fatal { class, message });
                }
                Attempt::Retry {
                    reason,
                    retry_after,
                    detail,
                } => {
                    let Some(delay) = self.backoff.delay(attempts, retry_after, &mut rand::rng())
                    else {
                        return Err(LlmError::Exhausted {
                            attempts,
                            last: detail,
                        });
                    };
                    LlmRetrying {
                        attempt: attempts,
                        reason,
                        detail: &detail,
                        delay,
                    }
                    .emit();
                    deltas.restart();
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn attempt(
        &self,
        body: &CreateChatCompletionRequest,
        deltas: &mut dyn DeltaSink,
    ) -> Attempt {
        let mut req = self.http.post(&self.url).json(body);
        if let Some(key) = &self.api_key {
            req = req.bearer_auth(key.expose_secret());
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                LlmAttempted {
                    status: LlmStatus::Transport,
                }
                .emit();
                return Attempt::Retry {
                    reason: RetryReason::Transport,
                    retry_after: None,
                    detail: e.to_string(),
                };
            }
        };
        let status = resp.status();
        LlmAttempted {
            status: LlmStatus::of(status.as_u16()),
        }
        .emit();
        if !status.is_success() {
            let retry_after = retry_after(resp.headers(), SystemTime::now());
            let text = resp.text().await.unwrap_or_default();
            return classify_failure(status, retry_after, &text);
        }
        if self.stream {
            read_stream(resp, deltas).await
        } else {
            match resp.json::<CreateChatCompletionResponse>().await {
                Ok(r) => {
                    // A completion without a choice is not an empty answer: nothing was said.
                    let Some(choice) = r.choices.first() else {
                        return Attempt::Retry {
                            reason: RetryReason::BadBody,
                            retry_after: None,
                            detail: "the completion has no choices".into(),
                        };
                    };
                    let content = choice.message.content.clone().unwrap_or_default();
                    let usage = r.usage.map(|u| (u.prompt_tokens, u.completion_tokens));
                    let (p, c) = usage.unwrap_or((0, 0));
                    deltas.text(&content);
                    record_tokens(p, c);
                    Attempt::Done(Answer {
                        content,
                        prompt_tokens: p,
                        completion_tokens: c,
                        usage_reported: usage.is_some(),
                        attempts: 0,
                    })
                }
                Err(e) => Attempt::Retry {
                    reason: RetryReason::BadBody,
                    retry_after: None,
                    detail: e.to_string(),
                },
            }
        }
    }
}

fn record_tokens(prompt: u32, completion: u32) {
    TokensUsed { prompt, completion }.emit();
}

/// The minimal chunk shape, for OpenAI-compatible servers whose chunks omit fields async-openai requires.
#[derive(Deserialize)]
struct LooseChunk {
    #[serde(default)]
    choices: Vec<LooseChoice>,
    usage: Option<LooseUsage>,
}
#[derive(Deserialize)]
struct LooseChoice {
    delta: Option<LooseDelta>,
}
#[derive(Deserialize)]
struct LooseDelta {
    content: Option<String>,
}
#[derive(Deserialize)]
struct LooseUsage {
    prompt_tokens: u32,
    completion_tokens: u32,
}

/// A chunk's text and, on the last chunk, its (prompt, completion) token usage.
type ChunkContent = (Option<String>, Option<(u32, u32)>);

fn parse_chunk(data: &str) -> Option<ChunkContent> {
    if let Ok(c) = serde_json::from_str::<CreateChatCompletionStreamResponse>(data) {
        let text = c
            .choices
            .into_iter()
            .filter_map(|ch| ch.delta.content)
            .reduce(|a, b| a + &b);
        return Some((
            text,
            c.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
        ));
    }
    let c = serde_json::from_str::<LooseChunk>(data).ok()?;
    let text = c
        .choices
        .into_iter()
        .filter_map(|ch| ch.delta.and_then(|d| d.content))
        .reduce(|a, b| a + &b);
    Some((
        text,
        c.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
    ))
}

async fn read_stream(resp: reqwest::Response, deltas: &mut dyn DeltaSink) -> Attempt {
    let mut body = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut content = String::new();
    let mut usage = None;
    // Chunks read, and `data:` lines that were neither a chunk nor an error: skipped one by one
    // (a stray keep-alive or an extension must not cost the answer), but a stream of nothing else
    // is a broken body, never an empty answer.
    let mut chunks = 0_usize;
    let mut unreadable = 0_usize;
    let mut first_unreadable = String::new();
    loop {
        // Handle every complete line in the buffer.
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let Ok(line) = std::str::from_utf8(&line) else {
                return Attempt::Retry {
                    reason: RetryReason::BadBody,
                    retry_after: None,
                    detail: "stream is not UTF-8".into(),
                };
            };
            let Some(data) = line.trim_end().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim_start();
            if data == "[DONE]" {
                if chunks == 0 {
                    return Attempt::Retry {
                        reason: RetryReason::BadBody,
                        retry_after: None,
                        detail: format!(
                            "the stream ended with no readable chunk ({unreadable} unreadable{}{first_unreadable})",
                            if unreadable > 0 { ", the first: " } else { "" }
                        ),
                    };
                }
                if unreadable > 0 {
                    tracing::warn!(
                        chunks,
                        unreadable,
                        first_unreadable,
                        "the model's stream held unreadable chunks; they were skipped"
                    );
                }
                let (p, c) = usage.unwrap_or((0, 0));
                record_tokens(p, c);
                return Attempt::Done(Answer {
                    content,
                    prompt_tokens: p,
                    completion_tokens: c,
                    usage_reported: usage.is_some(),
                    attempts: 0,
                });
            }
            match parse_chunk(data) {
                Some((text, u)) => {
                    chunks += 1;
                    if let Some(text) = text.filter(|t| !t.is_empty()) {
                        deltas.text(&text);
                        content.push_str(&text);
                    }
                    if u.is_some() {
                        usage = u;
                    }
                }
                None => {
                    if let Ok(err) = serde_json::from_str::<serde_json::Value>(data)
                        && err.get("error").is_some()
                    {
                        return Attempt::Retry {
                            reason: RetryReason::StreamError,
                            retry_after: None,
                            detail: data.chars().take(200).collect(),
                        };
                    }
                    unreadable += 1;
                    if unreadable == 1 {
                        first_unreadable = data.chars().take(200).collect();
                    }
                }
            }
        }
        match body.next().await {
            Some(Ok(bytes)) => buf.extend_from_slice(&bytes),
            Some(Err(e)) => {
                return Attempt::Retry {
                    reason: RetryReason::Stream,
                    retry_after: None,
                    detail: e.to_string(),
                };
            }
            None => {
                return Attempt::Retry {
                    reason: RetryReason::Stream,
                    retry_after: None,
                    detail: "stream ended before [DONE]".into(),
                };
            }
        }
    }
}

fn classify_failure(status: StatusCode, retry_after: Option<Duration>, body: &str) -> Attempt {
    let detail = format!(
        "HTTP {}: {}",
        status.as_u16(),
        body.chars().take(300).collect::<String>()
    );
    match status.as_u16() {
        429 if body.contains("insufficient_quota") => Attempt::Fatal {
            class: LlmErrorClass::InsufficientQuota,
            message: detail,
        },
        429 => Attempt::Retry {
            reason: RetryReason::TooManyRequests,
            retry_after,
            detail,
        },
        408 | 409 => Attempt::Retry {
            reason: RetryReason::RetryableClientError,
            retry_after,
            detail,
        },
        400 => Attempt::Fatal {
            class: LlmErrorClass::BadRequest,
            message: detail,
        },
        401 | 403 => Attempt::Fatal {
            class: LlmErrorClass::Auth,
            message: detail,
        },
        code if (400..500).contains(&code) => Attempt::Fatal {
            class: LlmErrorClass::ClientError,
            message: detail,
        },
        _ => Attempt::Retry {
            reason: RetryReason::ServerError,
            retry_after,
            detail,
        },
    }
}

/// The server's `Retry-After`, as delta-seconds or an HTTP date.
#[must_use]
///
/// Whatever the server says, the hint is at most [`MAX_HINT`]: a hostile or broken server
/// (`Retry-After: 1e20`, a date in the year 9999) must not stall a message, let alone panic.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(MAX_HINT.as_secs())));
    }
    if let Ok(secs) = value.parse::<f64>()
        && secs.is_finite()
        && secs >= 0.0
    {
        return Some(Duration::from_secs_f64(secs.min(MAX_HINT.as_secs_f64())));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(MAX_HINT),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(
            retry_after(&h, SystemTime::now()),
            Some(Duration::from_secs(3))
        );
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let later = httpdate::fmt_http_date(now + Duration::from_secs(7));
        h.insert(RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(7)));
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h, now), None);
    }

    #[test]
    fn hostile_retry_after_values_are_clamped_not_panics() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut h = HeaderMap::new();
        for v in [
            "1e20",
            "1.7976931348623157e308",
            "18446744073709551615",
            "99999999999",
        ] {
            h.insert(RETRY_AFTER, HeaderValue::from_static(v));
            assert_eq!(retry_after(&h, now), Some(MAX_HINT), "{v}");
        }
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Fri, 31 Dec 9999 23:59:59 GMT"),
        );
        assert_eq!(retry_after(&h, now), Some(MAX_HINT));
        for v in ["-1", "NaN", "inf", "-0.5"] {
            h.insert(RETRY_AFTER, HeaderValue::from_static(v));
            assert!(retry_after(&h, now).is_none_or(|d| d <= MAX_HINT), "{v}");
        }
    }

    #[test]
    fn failures_are_classified() {
        assert!(matches!(
            classify_failure(StatusCode::TOO_MANY_REQUESTS, None, "{}"),
            Attempt::Retry {
                reason: RetryReason::TooManyRequests,
                ..
            }
        ));
        assert!(matches!(
            classify_failure(
                StatusCode::TOO_MANY_REQUESTS,
                None,
                r#"{"error":{"code":"insufficient_quota"}}"#
            ),
            Attempt::Fatal {
                class: LlmErrorClass::InsufficientQuota,
                ..
            }
        ));
        assert!(matches!(
            classify_failure(StatusCode::BAD_REQUEST, None, ""),
            Attempt::Fatal {
                class: LlmErrorClass::BadRequest,
                ..
            }
        ));
        assert!(matches!(
            classify_failure(StatusCode::UNAUTHORIZED, None, ""),
            Attempt::Fatal {
                class: LlmErrorClass::Auth,
                ..
            }
        ));
        assert!(matches!(
            classify_failure(StatusCode::SERVICE_UNAVAILABLE, None, ""),
            Attempt::Retry {
                reason: RetryReason::ServerError,
                ..
            }
        ));
    }

    /// A client for `server` with fast retries: 3 attempts, 1–2 ms apart.
    fn client_for(server: &wiremock::MockServer, stream: bool) -> LlmClient {
        let backoff = Backoff {
            base: Duration::from_millis(1),
            cap: Duration::from_millis(2),
            max_attempts: 3,
        };
        let url = format!("{}/v1", server.uri());
        LlmClient::new(
            &url,
            None,
            "m".into(),
            stream,
            Duration::from_secs(5),
            backoff,
        )
        .unwrap()
    }

    async fn answer_with(body: &str, content_type: &str, stream: bool) -> Result<Answer, LlmError> {
        use wiremock::matchers::method;
        let server = wiremock::MockServer::start().await;
        wiremock::Mock::given(method("POST"))
            .respond_with(
                wiremock::ResponseTemplate::new(200)
                    .insert_header("content-type", content_type)
                    .set_body_string(body),
            )
            .mount(&server)
            .await;
        let turns = [Turn {
            role: Role::User,
            content: "hi".into(),
        }];
        client_for(&server, stream)
            .complete(&turns, &mut NoDeltas)
            .await
    }

    /// A hostile or broken model that answers 200 with nothing readable must not become an
    /// empty answer shown as if the model had said it: each such attempt is retried and the
    /// call fails as exhausted, with a detail that says what came.
    #[tokio::test]
    async fn a_200_with_nothing_readable_is_a_failed_attempt_not_an_empty_answer() {
        let garbage = "data: {not json at all\n\ndata: \u{0}\u{1}\n\ndata: [DONE]\n\n";
        match answer_with(garbage, "text/event-stream", true).await {
            Err(LlmError::Exhausted { attempts, last }) => {
                assert_eq!(attempts, 3);
                assert!(last.contains("no readable chunk (2 unreadable"), "{last}");
                assert!(last.contains("{not json at all"), "{last}");
            }
            other => panic!("a stream of garbage gave {other:?}"),
        }
        match answer_with("data: [DONE]\n\n", "text/event-stream", true).await {
            Err(LlmError::Exhausted { last, .. }) => {
                assert!(last.contains("no readable chunk"), "{last}")
            }
            other => panic!("a stream of nothing gave {other:?}"),
        }
        let no_choices =
            r#"{"id":"x","object":"chat.completion","created":1,"model":"m","choices":[]}"#;
        match answer_with(no_choices, "application/json", false).await {
            Err(LlmError::Exhausted { last, .. }) => assert!(last.contains("no choices"), "{last}"),
            other => panic!("a completion without choices gave {other:?}"),
        }
    }

    /// Unreadable lines among readable chunks are skipped: the answer is what was readable.
    #[tokio::test]
    async fn unreadable_lines_among_chunks_are_skipped() {
        let chunk = |t: &str| {
            format!(
                "data: {{\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{t}\"}},\"finish_reason\":null}}]}}\n\n"
            )
        };
        let body = format!(
            "{}data: ~keepalive~\n\n{}data: [DONE]\n\n",
            chunk("hel"),
            chunk("lo")
        );
        let answer = answer_with(&body, "text/event-stream", true).await.unwrap();
        assert_eq!(answer.content, "hello");
        // An answer that is legitimately empty (readable chunks, no text) stays an answer.
        let body = format!("{}data: [DONE]\n\n", chunk(""));
        assert_eq!(
            answer_with(&body, "text/event-stream", true)
                .await
                .unwrap()
                .content,
            ""
        );
    }

    #[test]
    fn chunks_parse_strictly_or_loosely() {
        let loose = r#"{"choices":[{"delta":{"content":"hi"}}]}"#;
        assert_eq!(parse_chunk(loose), Some((Some("hi".into()), None)));
        let usage =
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
        assert_eq!(parse_chunk(usage), Some((None, Some((3, 4)))));
    }
}
