//! A wiremock fake of the OpenAI chat completions API, for exact call counting and scripted
//! failures (429 with Retry-After, 5xx, slow answers, refusals).

use std::time::Duration;

use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

const COMPLETIONS: &str = "/v1/chat/completions";

/// A running mock of the OpenAI API.
#[derive(Debug)]
pub struct OpenAiMock {
    pub server: MockServer,
}

/// A plain (non-streamed) chat completion whose text is `content`.
#[must_use]
pub fn completion_body(content: &str) -> serde_json::Value {
    serde_json::json!({
        "id": "chatcmpl-mock", "object": "chat.completion", "created": 1_700_000_000, "model": "mock",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    })
}

/// An SSE body streaming `pieces`, then usage, then `[DONE]`.
#[must_use]
pub fn stream_body(pieces: &[&str]) -> String {
    let chunk = |delta: serde_json::Value, finish: serde_json::Value| {
        serde_json::json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": "mock",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut out = format!(
        "data: {}\n\n",
        chunk(
            serde_json::json!({"role": "assistant", "content": ""}),
            serde_json::Value::Null
        )
    );
    for p in pieces {
        out.push_str(&format!(
            "data: {}\n\n",
            chunk(serde_json::json!({"content": p}), serde_json::Value::Null)
        ));
    }
    out.push_str(&format!(
        "data: {}\n\n",
        chunk(serde_json::json!({}), serde_json::json!("stop"))
    ));
    let usage = serde_json::json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": "mock",
        "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": pieces.len(), "total_tokens": 5 + pieces.len()}});
    out.push_str(&format!("data: {usage}\n\ndata: [DONE]\n\n"));
    out
}

fn rate_limited(retry_after_secs: u64) -> ResponseTemplate {
    ResponseTemplate::new(429)
        .insert_header("retry-after", retry_after_secs.to_string())
        .set_body_json(serde_json::json!({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}))
}

impl OpenAiMock {
    pub async fn start() -> Self {
        Self {
            server: MockServer::start().await,
        }
    }

    /// The base URL to give the ai-consumer (`…/v1`).
    #[must_use]
    pub fn base_url(&self) -> String {
        format!("{}/v1", self.server.uri())
    }

    /// Every later request is answered with a stream of `pieces`.
    pub async fn answer_streamed(&self, pieces: &[&str]) {
        Mock::given(method("POST"))
            .and(path(COMPLETIONS))
            .respond_with(
                ResponseTemplate::new(200)
                    .insert_header("content-type", "text/event-stream")
                    .set_body_string(stream_body(pieces)),
            )
            .with_priority(10)
            .mount(&self.server)
            .await;
    }

    /// Every later request is answered by echoing its last user message, streamed in words.
    pub async fn echo(&self) {
        Mock::given(method("POST"))
            .and(path(COMPLETIONS))
            .respond_with(echo_answer)
            .with_priority(10)
            .mount(&self.server)
            .await;
    }

    /// Plain JSON answers (for clients configured without streaming).
    pub async fn answer_plain(&self, content: &str) {
        Mock::given(method("POST"))
            .and(path(COMPLETIONS))
            .respond_with(ResponseTemplate::new(200).set_body_json(completion_body(content)))
            .with_priority(10)
            .mount(&self.server)
            .await;
    }

    /// The next `n` requests get 429 with `Retry-After: retry_after_secs`.
    pub async fn rate_limit_next(&self, n: u64, retry_after_secs: u64) {
        Mock::given(method("POST"))
            .and(path(COMPLETIONS))
            .respond_with(rate_limited(retry_after_secs))
            .up_to_n_times(n)
            .with_priority(1)
            .mount(&self.server)
            .await;
    }

    /// Every request gets 429 (a storm).
    pub async fn rate_limit_always(&self, retry_after_secs: u64) {
        Mock::given(method("POST"))
            .and(path(COMPLETIONS))
            .respond_with(rate_limited(retry_after_secs))
            .with_priority(1)
            .mount(&self.server)
            .await;
    }

    /// The next `n` requests get HTTP `status` with an OpenAI-style error body.
    pub async fn fail_next(&self, n: u64, status: u16, code: &str) {
        Mock::given(method("POST"))
            .and(path(COMPLETIONS))
            .respond_with(ResponseTemplate::new(status).set_body_json(serde_json::json!({"error": {"message": "scripted failure", "type": "invalid_request_error", "code": code}})))
            .up_to_n_times(n)
            .with_priority(1)
            .mount(&self.server)
            .await;
    }

    /// Every later request is answered after `delay`.
    pub async fn slow(&self, delay: Duration, pieces: &[&str]) {
        Mock::given(method("POST"))
            .and(path(COMPLETIONS))
            .respond_with(
                ResponseTemplate::new(200)
                    .insert_header("content-type", "text/event-stream")
                    .set_body_string(stream_body(pieces))
                    .set_delay(delay),
            )
            .with_priority(5)
            .mount(&self.server)
            .await;
    }

    /// Requests received so far, in order.
    pub async fn requests(&self) -> Vec<Request> {
        self.server.received_requests().await.unwrap_or_default()
    }
}

/// What [`OpenAiMock::echo`] answers to `req`: `echo: <last user message>`, streamed word by
/// word (for tests that mount their own responder, e.g. with a delay).
#[must_use]
pub fn echo_answer(req: &Request) -> ResponseTemplate {
    let text = last_user_message(req).unwrap_or_default();
    let answer = format!("echo: {text}");
    let pieces: Vec<&str> = answer.split_inclusive(' ').collect();
    ResponseTemplate::new(200)
        .insert_header("content-type", "text/event-stream")
        .set_body_string(stream_body(&pieces))
}

/// The content of the last `user` message of a chat completion request.
#[must_use]
pub fn last_user_message(req: &Request) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(&req.body).ok()?;
    v["messages"]
        .as_array()?
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .and_then(|m| m["content"].as_str())
        .map(str::to_owned)
}
