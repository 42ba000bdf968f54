//! Answering one message: claim it, call the LLM with the user's memory, stream deltas,
//! produce the final answer (or the failure and its dead letter), then mark it done.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use colloquy_core::records::{IncomingRecord, ResponseBody, ResponseRecord, SCHEMA_VERSION};
use colloquy_core::trace_context::{continue_from, traceparent_of};
use colloquy_core::{kafka, metrics as m, now_ms};

use crate::claim::{Claim, Claims};
use crate::llm::{DeltaSink, LlmClient, LlmError, NoDeltas, Role, Turn};
use crate::memory::Memory;

/// A consumed message waiting to be answered.
#[derive(Debug)]
pub struct Job {
    pub record: IncomingRecord,
    pub partition: i32,
    pub offset: i64,
    pub traceparent: Option<String>,
    pub enqueued_at_ms: i64,
}

/// How a job ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handled {
    Answered,
    Failed,
    Duplicate,
    /// Shutdown interrupted it; its offset must not be stored.
    Abandoned,
}

/// Everything needed to answer messages.
pub struct Worker {
    pub llm: LlmClient,
    pub claims: Claims,
    pub memory: Memory,
    pub producer: FutureProducer,
    pub responses_topic: String,
    pub dlq_topic: String,
    pub system_prompt: String,
    pub stream: bool,
    pub delta_batch_tokens: usize,
    pub delta_batch: Duration,
    pub produce_timeout: Duration,
    pub shutdown: CancellationToken,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("responses_topic", &self.responses_topic)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// Answers `job`; returns how it ended. Never gives up on Redis or Kafka errors: it retries
    /// until they succeed or shutdown abandons the job (which is then redelivered).
    pub async fn handle(self: &Arc<Self>, job: &Job) -> Handled {
        let r = &job.record;
        let span = tracing::info_span!(
            "ai_consumer.process",
            userid = %r.userid, msg_id = %r.msg_id,
            otel.kind = "consumer",
            messaging.system = "kafka",
            messaging.operation = "process",
            messaging.kafka.partition = job.partition,
            messaging.kafka.offset = job.offset,
        );
        continue_from(&span, job.traceparent.as_deref());
        metrics::histogram!(m::STAGE_LATENCY, "stage" => "queue_wait")
            .record((now_ms() - job.enqueued_at_ms).max(0) as f64 / 1000.0);
        let outcome = self.answer(job).instrument(span).await;
        let label = match outcome {
            Handled::Answered => "answered",
            Handled::Failed => "llm_failed",
            Handled::Duplicate => "duplicate",
            Handled::Abandoned => "abandoned",
        };
        metrics::counter!(m::MESSAGES, "service" => "ai-consumer", "outcome" => label).increment(1);
        outcome
    }

    async fn answer(self: &Arc<Self>, job: &Job) -> Handled {
        let r = &job.record;
        // 1. Claim, waiting out another consumer's lease; read the memory meanwhile.
        let history = self.memory.recent(&r.userid);
        let claimed = async {
            loop {
                let claim = self
                    .retry_redis("claim", || self.claims.claim(&r.userid, &r.msg_id))
                    .await;
                match claim {
                    None => return Err(Handled::Abandoned),
                    Some(Claim::Acquired) => return Ok(()),
                    Some(Claim::AlreadyDone) => {
                        metrics::counter!(m::DUPLICATES, "service" => "ai-consumer").increment(1);
                        tracing::debug!("message already answered; skipped");
                        return Err(Handled::Duplicate);
                    }
                    Some(Claim::Leased) => {
                        tracing::debug!("message leased by another consumer; waiting");
                        if self.sleep(Duration::from_millis(500)).await.is_err() {
                            return Err(Handled::Abandoned);
                        }
                    }
                }
            }
        };
        let (claimed, history) = tokio::join!(claimed, history);
        if let Err(handled) = claimed {
            return handled;
        }
        // 2. Memory (best effort: an answer without context beats no answer).
        let mut turns = vec![Turn {
            role: Role::System,
            content: self.system_prompt.clone(),
        }];
        match history {
            Ok(history) => turns.extend(history),
            Err(e) => {
                metrics::counter!(m::REDIS_ERRORS, "service" => "ai-consumer", "op" => "memory_read").increment(1);
                tracing::warn!(error = %e, "memory unavailable; answering without it");
            }
        }
        turns.push(Turn {
            role: Role::User,
            content: r.content.clone(),
        });

        // 3. The LLM call, with deltas streamed to `responses`.
        let call_span = tracing::info_span!("llm.chat", otel.kind = "client", gen_ai.system = "openai", gen_ai.request.model = %self.llm_model(), gen_ai.attempts = tracing::field::Empty);
        let mut batcher = DeltaBatcher::new(self, job);
        let mut none = NoDeltas;
        let deltas: &mut dyn DeltaSink = if self.stream { &mut batcher } else { &mut none };
        let call = self.llm.complete(&turns, deltas, |attempt| {
            let this = Arc::clone(self);
            let (u, mid) = (r.userid.clone(), r.msg_id.clone());
            async move {
                if attempt > 1
                    && let Err(e) = this.claims.renew(&u, &mid).await
                {
                    tracing::warn!(error = %e, "lease renewal failed");
                }
            }
        });
        let result = tokio::select! {
            res = call.instrument(call_span.clone()) => res,
            () = self.shutdown.cancelled() => return Handled::Abandoned,
        };
        // The trailing partial batch is not sent as a delta: the final record carries the whole
        // answer, and a fast model's answer then costs one record instead of two.
        drop(batcher);

        // 4. The outcome, durably in `responses` (and the DLQ on failure).
        let (body, handled, answer) = match result {
            Ok(a) => {
                call_span.record("gen_ai.attempts", a.attempts);
                let body = ResponseBody::Final {
                    content: a.content.clone(),
                    prompt_tokens: a.prompt_tokens,
                    completion_tokens: a.completion_tokens,
                };
                (body, Handled::Answered, Some(a.content))
            }
            Err(e) => {
                metrics::counter!(m::LLM_ERRORS, "class" => e.class()).increment(1);
                tracing::warn!(error = %e, "answer failed; user gets llm_failed, record goes to the DLQ");
                if !self.dead_letter(job, &e).await {
                    return Handled::Abandoned;
                }
                (
                    ResponseBody::Failed {
                        reason: user_reason(&e),
                    },
                    Handled::Failed,
                    None,
                )
            }
        };
        if !self.produce_response(job, body).await {
            return Handled::Abandoned;
        }
        // 5. Done: a redelivery from now on is skipped. Memory is written alongside.
        let complete = self.retry_redis("complete", || self.claims.complete(&r.userid, &r.msg_id));
        let remember = async {
            if let Some(answer) = &answer
                && let Err(e) = self.memory.append(&r.userid, &r.content, answer).await
            {
                metrics::counter!(m::REDIS_ERRORS, "service" => "ai-consumer", "op" => "memory_write").increment(1);
                tracing::warn!(error = %e, "memory not updated");
            }
        };
        let (completed, ()) = tokio::join!(complete, remember);
        if completed.is_none() {
            return Handled::Abandoned;
        }
        handled
    }

    fn llm_model(&self) -> String {
        self.llm.request(&[]).model
    }

    async fn sleep(&self, d: Duration) -> Result<(), ()> {
        tokio::select! {
            () = tokio::time::sleep(d) => Ok(()),
            () = self.shutdown.cancelled() => Err(()),
        }
    }

    /// Runs a Redis operation until it succeeds; `None` only when shutdown interrupts.
    async fn retry_redis<T, F, Fut>(&self, op: &'static str, mut f: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, fred::error::Error>>,
    {
        let mut delay = Duration::from_millis(50);
        loop {
            match f().await {
                Ok(v) => return Some(v),
                Err(e) => {
                    metrics::counter!(m::REDIS_ERRORS, "service" => "ai-consumer", "op" => op)
                        .increment(1);
                    tracing::warn!(op, error = %e, "Redis failed; retrying");
                    self.sleep(delay).await.ok()?;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn produce_response(&self, job: &Job, body: ResponseBody) -> bool {
        let r = &job.record;
        let record = ResponseRecord {
            v: SCHEMA_VERSION,
            msg_id: r.msg_id.clone(),
            userid: r.userid.clone(),
            received_at_ms: r.received_at_ms,
            body,
        };
        let Ok(payload) = serde_json::to_vec(&record) else {
            return false;
        };
        let span = tracing::info_span!("kafka.produce", otel.kind = "producer", messaging.system = "kafka", messaging.destination.name = %self.responses_topic);
        let tp = traceparent_of(&span);
        self.produce(
            &self.responses_topic,
            r.userid.as_str(),
            &payload,
            kafka::record_headers(tp.as_deref(), &r.msg_id, now_ms()),
        )
        .instrument(span)
        .await
    }

    async fn dead_letter(&self, job: &Job, e: &LlmError) -> bool {
        let r = &job.record;
        let Ok(payload) = serde_json::to_vec(r) else {
            return false;
        };
        let reason = e.to_string();
        let headers = kafka::record_headers(job.traceparent.as_deref(), &r.msg_id, now_ms())
            .insert(Header {
                key: "dlq_reason",
                value: Some(reason.as_str()),
            });
        let ok = self
            .produce(&self.dlq_topic, r.userid.as_str(), &payload, headers)
            .await;
        if ok {
            metrics::counter!(m::DLQ_WRITES, "service" => "ai-consumer", "topic" => self.dlq_topic.clone()).increment(1);
        }
        ok
    }

    /// Produces until the broker acknowledges; `false` only when shutdown interrupts.
    async fn produce(&self, topic: &str, key: &str, payload: &[u8], headers: OwnedHeaders) -> bool {
        let mut delay = Duration::from_millis(100);
        loop {
            let record = FutureRecord::to(topic)
                .key(key)
                .payload(payload)
                .headers(headers.clone());
            let started = Instant::now();
            let sent = tokio::select! {
                r = self.producer.send(record, Timeout::After(self.produce_timeout)) => r,
                () = self.shutdown.cancelled() => return false,
            };
            match sent {
                Ok(_) => {
                    tracing::trace!(
                        topic,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "produced"
                    );
                    return true;
                }
                Err((e, _)) => {
                    metrics::counter!(m::KAFKA_ERRORS, "service" => "ai-consumer", "op" => "produce").increment(1);
                    tracing::warn!(topic, error = %e, "produce failed; retrying");
                    if self.sleep(delay).await.is_err() {
                        return false;
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// What the user is told when the call failed for good.
fn user_reason(e: &LlmError) -> String {
    match e {
        LlmError::Fatal { class, .. } => format!("the model refused the request ({class})"),
        LlmError::Exhausted { attempts, .. } => {
            format!("the model is unavailable (gave up after {attempts} attempts)")
        }
    }
}

/// Batches streamed tokens into delta records: every `delta_batch_tokens` pieces or
/// `delta_batch` time, so a fast model cannot flood the pipeline.
struct DeltaBatcher<'a> {
    worker: &'a Worker,
    job: &'a Job,
    traceparent: Option<String>,
    seq: u32,
    buf: String,
    pieces: usize,
    last: Instant,
}

impl<'a> DeltaBatcher<'a> {
    fn new(worker: &'a Worker, job: &'a Job) -> Self {
        Self {
            worker,
            job,
            traceparent: traceparent_of(&tracing::Span::current()),
            seq: 0,
            buf: String::new(),
            pieces: 0,
            last: Instant::now(),
        }
    }

    fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let r = &self.job.record;
        let record = ResponseRecord {
            v: SCHEMA_VERSION,
            msg_id: r.msg_id.clone(),
            userid: r.userid.clone(),
            received_at_ms: r.received_at_ms,
            body: ResponseBody::Delta {
                seq: self.seq,
                content: std::mem::take(&mut self.buf),
            },
        };
        self.seq += 1;
        self.pieces = 0;
        self.last = Instant::now();
        let Ok(payload) = serde_json::to_vec(&record) else {
            return;
        };
        let headers = kafka::record_headers(self.traceparent.as_deref(), &r.msg_id, now_ms());
        let fr = FutureRecord::to(&self.worker.responses_topic)
            .key(r.userid.as_str())
            .payload(&payload)
            .headers(headers);
        // Deltas are a preview: the final record carries the whole answer, so a delta that
        // cannot be queued is counted and dropped rather than delaying the answer.
        if let Err((e, _)) = self.worker.producer.send_result(fr) {
            metrics::counter!(m::KAFKA_ERRORS, "service" => "ai-consumer", "op" => "produce_delta")
                .increment(1);
            tracing::debug!(error = %e, "delta not queued");
        }
    }
}

impl DeltaSink for DeltaBatcher<'_> {
    fn text(&mut self, piece: &str) {
        self.buf.push_str(piece);
        self.pieces += 1;
        if self.pieces >= self.worker.delta_batch_tokens
            || self.last.elapsed() >= self.worker.delta_batch
        {
            self.flush();
        }
    }

    fn restart(&mut self) {
        self.buf.clear();
        self.pieces = 0;
        self.seq = 0;
    }
}
