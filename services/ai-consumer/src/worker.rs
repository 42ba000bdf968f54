//! Answering one message: claim it, call the LLM with the user's memory, stream deltas,
//! produce the final answer (or the failure and its dead letter), then record the outcome.
//!
//! Whatever happens, the user hears back: an answer, or `llm_failed` with a reason (the model
//! refused or stayed unavailable, the answer was too large to deliver). Redis and Kafka
//! outages are waited out (nothing is lost by waiting: the offset is not stored); errors that
//! waiting cannot fix are not retried (`colloquy_core::retry`).

use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;
use fred::types::scripts::Script;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use colloquy_core::dead_letter::DeadLetters;
use colloquy_core::labels::{KafkaOp, RedisOp};
use colloquy_core::names::Names;
use colloquy_core::records::{
    Delivery, IncomingRecord, ResponseBody, ResponseRecord, SCHEMA_VERSION,
};
use colloquy_core::retry::{RetryError, RetryPolicy, redis_class, retry};
use colloquy_core::semconv::{self, Consumed};
use colloquy_core::trace_context::{continue_from, traceparent_of};
use colloquy_core::{kafka, now_ms};

use crate::claim::{Claim, Claims, Outcome};
use crate::events::{
    self, AnswerFailed, DeltaDropped, DuplicateSkipped, InFlight, LeaseRenewFailed,
    MessageDequeued, MessageHandled, RedisFailed,
};
use crate::llm::{DeltaSink, LlmClient, LlmError, NoDeltas, Role, Turn};

/// A consumed message waiting to be answered.
#[derive(Debug)]
pub struct Job {
    pub record: IncomingRecord,
    pub partition: i32,
    pub offset: i64,
    pub traceparent: Option<String>,
    pub enqueued_at_ms: i64,
}

/// How a job ended (its `outcome` label: `events::MessageHandled`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handled {
    Answered,
    Failed,
    /// A Kafka redelivery of a record already handled.
    Duplicate,
    /// A resend of an answered message id: the stored answer was delivered again.
    Repeated,
    /// Nothing could be written to `responses` for good (the topic is gone): logged as an
    /// error and left to the unanswered-message audit, which pages.
    Undeliverable,
    /// Shutdown interrupted it; its offset must not be stored.
    Abandoned,
}

/// KEYS: delivered marker, inbox. Returns the stored delivery JSON of that send, `pending`
/// when the relay has not stored it yet, or `gone` when it was trimmed or expired.
const STORED_ANSWER_LUA: &str = r"
local id = redis.call('GET', KEYS[1])
if not id then return 'pending' end
local entries = redis.call('XRANGE', KEYS[2], id, id)
if #entries == 0 then return 'gone' end
return entries[1][2][2]
";

/// How long a resend waits for the earlier send's answer to be stored by the relay.
const STORED_ANSWER_WAIT: Duration = Duration::from_secs(30);

/// What the inbox holds of an earlier send's answer.
enum Stored {
    Answer(ResponseBody),
    Pending,
    Gone,
}

/// Everything needed to answer messages.
pub struct Worker {
    pub llm: LlmClient,
    /// One permit per LLM call in flight (`MAX_IN_FLIGHT`), held for the call and its retries
    /// only: claiming before it and writing the answer after it take no slot.
    pub llm_slots: Arc<Semaphore>,
    pub claims: Claims,
    pub redis: Pool,
    pub names: Names,
    /// The consumer group, for the spans.
    pub group: String,
    pub producer: FutureProducer,
    pub dead_letters: DeadLetters,
    pub responses_topic: String,
    pub system_prompt: String,
    pub stream: bool,
    pub delta_batch_tokens: usize,
    pub delta_batch: Duration,
    pub produce_timeout: Duration,
    pub shutdown: CancellationToken,
    pub stored_answer: Script,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("responses_topic", &self.responses_topic)
            .finish_non_exhaustive()
    }
}

/// The script that reads a stored answer back (for `Worker::stored_answer`).
#[must_use]
pub fn stored_answer_script() -> Script {
    Script::from_lua(STORED_ANSWER_LUA)
}

impl Worker {
    /// Answers `job`; returns how it ended. Redis and Kafka outages are retried until they
    /// end or shutdown abandons the job (which is then redelivered).
    pub async fn handle(self: &Arc<Self>, job: &Job) -> Handled {
        let r = &job.record;
        let incoming_topic = self.names.incoming_topic();
        let from = Consumed {
            topic: &incoming_topic,
            partition: job.partition,
            offset: job.offset,
            group: &self.group,
        };
        let span = semconv::process_span(&from, &r.userid, &r.msg_id);
        continue_from(&span, job.traceparent.as_deref());
        let waited = u64::try_from(now_ms() - job.enqueued_at_ms).unwrap_or(0);
        span.in_scope(|| {
            MessageDequeued {
                waited: Duration::from_millis(waited),
            }
            .emit();
        });
        let outcome = self.answer(job).instrument(span.clone()).await;
        span.in_scope(|| {
            MessageHandled {
                userid: r.userid.as_str(),
                msg_id: &r.msg_id,
                handled: outcome,
            }
            .emit();
        });
        outcome
    }

    /// Tells the user their message failed, without calling the LLM (used when handling it
    /// crashed). Returns how the job ended.
    pub async fn fail(self: &Arc<Self>, job: &Job, reason: &str) -> Handled {
        let body = ResponseBody::Failed {
            reason: reason.to_owned(),
        };
        let handled = match self.produce_response(job, body).await {
            Ok(()) => Handled::Failed,
            Err(RetryError::Cancelled) => return Handled::Abandoned,
            Err(e) => {
                tracing::error!(error = %e, "failure notice not produced; the message is unanswered");
                Handled::Undeliverable
            }
        };
        let r = &job.record;
        let _ = self
            .redis_retrying(RedisOp::Complete, || {
                self.claims
                    .complete(&r.userid, &r.msg_id, r.received_at_ms, Outcome::Failed)
            })
            .await;
        handled
    }

    async fn answer(self: &Arc<Self>, job: &Job) -> Handled {
        let r = &job.record;
        // 1. Claim, waiting out another consumer's lease; the claim brings the user's memory.
        let claimed = async {
            loop {
                let claim = self
                    .redis_retrying(RedisOp::Claim, || {
                        self.claims.claim(&r.userid, &r.msg_id, r.received_at_ms)
                    })
                    .await;
                match claim {
                    Err(RetryError::Cancelled) => return Err(Handled::Abandoned),
                    Err(e) => {
                        // Redis refuses the claim for good: answering unclaimed risks a
                        // second charge on a redelivery, silence would lose the message.
                        tracing::error!(error = %e, "claim impossible; answering without it (and without memory)");
                        return Ok(Vec::new());
                    }
                    Ok(Claim::Acquired { history }) => return Ok(history),
                    Ok(Claim::AlreadyDone) => {
                        DuplicateSkipped {
                            userid: r.userid.as_str(),
                            msg_id: &r.msg_id,
                        }
                        .emit();
                        return Err(Handled::Duplicate);
                    }
                    Ok(Claim::AnsweredBefore) => return Err(self.repeat(job).await),
                    Ok(Claim::Leased) => {
                        tracing::debug!("message leased by another consumer; waiting");
                        if self.sleep(Duration::from_millis(500)).await.is_err() {
                            return Err(Handled::Abandoned);
                        }
                    }
                }
            }
        };
        let history = match claimed.await {
            Ok(history) => history,
            Err(handled) => return handled,
        };
        // 2. The prompt: the system prompt, the user's memory, the message.
        let mut turns = Vec::with_capacity(history.len() + 2);
        turns.push(Turn {
            role: Role::System,
            content: self.system_prompt.clone(),
        });
        turns.extend(history);
        turns.push(Turn {
            role: Role::User,
            content: r.content.clone(),
        });

        // 3. The LLM call, with deltas streamed to `responses`, the lease renewed meanwhile.
        let call_span = semconv::chat_span(&self.llm_model());
        let mut batcher = DeltaBatcher::new(self, job);
        let mut none = NoDeltas;
        let deltas: &mut dyn DeltaSink = if self.stream { &mut batcher } else { &mut none };
        let call = async {
            // The semaphore is never closed: `None` cannot happen, and would only mean
            // answering without a slot.
            let _slot = self.llm_slots.acquire().await.ok();
            let _in_flight = InFlight::enter();
            self.llm
                .complete(&turns, deltas)
                .instrument(call_span.clone())
                .await
        };
        let result = tokio::select! {
            res = call => res,
            never = self.keep_lease(job) => match never {},
            () = self.shutdown.cancelled() => {
                self.release(job).await;
                return Handled::Abandoned;
            }
        };
        // The trailing partial batch is not sent as a delta: the final record carries the whole
        // answer, and a fast model's answer then costs one record instead of two.
        let whole = !batcher.sent;
        drop(batcher);

        // 4. The outcome, durably in `responses` (and the DLQ on failure); `answer` is `None`
        // for a failure.
        let (body, answer) = match result {
            Ok(a) => {
                semconv::record_attempts(&call_span, a.attempts);
                if a.usage_reported {
                    semconv::record_usage(&call_span, a.prompt_tokens, a.completion_tokens);
                }
                let body = ResponseBody::Final {
                    content: a.content.clone(),
                    prompt_tokens: a.prompt_tokens,
                    completion_tokens: a.completion_tokens,
                    whole,
                };
                (body, Some(a.content))
            }
            Err(e) => {
                AnswerFailed {
                    userid: r.userid.as_str(),
                    msg_id: &r.msg_id,
                    error: &e,
                }
                .emit();
                if let Err(RetryError::Cancelled) = self.dead_letter(job, &e.to_string()).await {
                    self.release(job).await;
                    return Handled::Abandoned;
                }
                let body = ResponseBody::Failed {
                    reason: user_reason(&e),
                };
                (body, None)
            }
        };
        let answer = match self.produce_response(job, body).await {
            Ok(()) => answer,
            Err(RetryError::Cancelled) => {
                self.release(job).await;
                return Handled::Abandoned;
            }
            Err(e) => {
                // The answer cannot be written (too large, topic gone): tell the user why.
                tracing::error!(error = %e, "response not produced; telling the user");
                let reason = format!("the answer could not be delivered ({e}); try again");
                let _ = self.dead_letter(job, &reason).await;
                match self
                    .produce_response(job, ResponseBody::Failed { reason })
                    .await
                {
                    Ok(()) => None,
                    Err(RetryError::Cancelled) => {
                        self.release(job).await;
                        return Handled::Abandoned;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, partition = job.partition, offset = job.offset, "nothing can be written to responses; message unanswered");
                        self.release(job).await;
                        return Handled::Undeliverable;
                    }
                }
            }
        };
        // 5. Done: a redelivery from now on is skipped; an answer joins the user's memory.
        let outcome = match &answer {
            Some(answer) => Outcome::Answered {
                question: &r.content,
                answer,
            },
            None => Outcome::Failed,
        };
        let completed = self
            .redis_retrying(RedisOp::Complete, || {
                self.claims
                    .complete(&r.userid, &r.msg_id, r.received_at_ms, outcome)
            })
            .await;
        match completed {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!("lease was taken over meanwhile; the relay drops the second answer")
            }
            Err(RetryError::Cancelled) => return Handled::Abandoned,
            Err(e) => {
                tracing::error!(error = %e, "outcome not recorded; a redelivery would be answered again")
            }
        }
        match outcome {
            Outcome::Answered { .. } => Handled::Answered,
            Outcome::Failed => Handled::Failed,
        }
    }

    /// A resend of an answered message id: produce the stored answer again (the relay
    /// delivers it as a new event), or a clear failure when it is no longer stored.
    async fn repeat(&self, job: &Job) -> Handled {
        let r = &job.record;
        // The earlier send's answer is in `responses` but may not be in the inbox yet (the
        // client resent because it never saw its ack): wait for the relay, boundedly.
        let deadline = tokio::time::Instant::now() + STORED_ANSWER_WAIT;
        let stored = loop {
            let stored = self
                .redis_retrying(RedisOp::StoredAnswer, || self.stored_answer(r))
                .await;
            match stored {
                Ok(Stored::Pending) if tokio::time::Instant::now() < deadline => {
                    if self.sleep(Duration::from_millis(100)).await.is_err() {
                        return Handled::Abandoned;
                    }
                }
                Ok(Stored::Answer(body)) => break Ok(Some(body)),
                Ok(Stored::Pending | Stored::Gone) => break Ok(None),
                Err(e) => break Err(e),
            }
        };
        let body = match stored {
            Err(RetryError::Cancelled) => return Handled::Abandoned,
            // A resend gets the stored answer in one piece: its first text.
            Ok(Some(ResponseBody::Final {
                content,
                prompt_tokens,
                completion_tokens,
                ..
            })) => ResponseBody::Final {
                content,
                prompt_tokens,
                completion_tokens,
                whole: true,
            },
            Ok(_) | Err(_) => ResponseBody::Failed {
                reason: "this message id was answered before and that answer is no longer stored; send it with a new id".into(),
            },
        };
        match self.produce_response(job, body).await {
            Ok(()) => Handled::Repeated,
            Err(RetryError::Cancelled) => Handled::Abandoned,
            Err(e) => {
                tracing::error!(error = %e, "repeated answer not produced");
                Handled::Undeliverable
            }
        }
    }

    /// The durable body stored for the earlier send of `r`'s message id.
    async fn stored_answer(&self, r: &IncomingRecord) -> Result<Stored, Error> {
        let Some(nonce) = self.previous_nonce(r).await? else {
            return Ok(Stored::Gone);
        };
        let keys = vec![
            self.names.delivered_key(&r.userid, &r.msg_id, nonce),
            self.names.inbox_key(&r.userid),
        ];
        let json: String = self
            .stored_answer
            .evalsha_with_reload(self.redis.next(), keys, Vec::<String>::new())
            .await?;
        Ok(match json.as_str() {
            "pending" => Stored::Pending,
            "gone" => Stored::Gone,
            _ => serde_json::from_str::<Delivery>(&json)
                .map_or(Stored::Gone, |d| Stored::Answer(d.body)),
        })
    }

    async fn previous_nonce(&self, r: &IncomingRecord) -> Result<Option<i64>, Error> {
        let value: Option<String> = self
            .redis
            .get(self.names.done_key(&r.userid, &r.msg_id))
            .await?;
        Ok(value
            .as_deref()
            .and_then(|v| v.strip_prefix("D|"))
            .and_then(|n| n.parse().ok()))
    }

    /// Renews the lease every third of its length while the call runs; never returns.
    async fn keep_lease(&self, job: &Job) -> std::convert::Infallible {
        let r = &job.record;
        let every = self.claims.lease() / 3;
        loop {
            tokio::time::sleep(every).await;
            match self.claims.renew(&r.userid, &r.msg_id).await {
                Ok(true) => {}
                Ok(false) => tracing::warn!("lease lost while answering (taken over after expiry)"),
                Err(e) => LeaseRenewFailed {
                    userid: r.userid.as_str(),
                    msg_id: &r.msg_id,
                    error: &e,
                }
                .emit(),
            }
        }
    }

    /// Best effort: give the lease back so a redelivery is answered at once.
    async fn release(&self, job: &Job) {
        let r = &job.record;
        match tokio::time::timeout(
            Duration::from_secs(1),
            self.claims.release(&r.userid, &r.msg_id),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "lease not released; it will expire"),
            Err(_) => {
                self.claims.forget(&r.userid, &r.msg_id);
                tracing::debug!("lease release timed out; it will expire");
            }
        }
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

    /// Runs a Redis operation with the shared retry policy, counting every failure.
    async fn redis_retrying<T, F, Fut>(&self, op: RedisOp, f: F) -> Result<T, RetryError<Error>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        retry(
            RetryPolicy::UNTIL_SHUTDOWN,
            &self.shutdown,
            redis_class,
            |e, attempt, class| {
                RedisFailed {
                    op,
                    attempt,
                    class,
                    error: e,
                }
                .emit();
            },
            f,
        )
        .await
    }

    async fn produce_response(
        &self,
        job: &Job,
        body: ResponseBody,
    ) -> Result<(), RetryError<KafkaError>> {
        let r = &job.record;
        let record = ResponseRecord {
            v: SCHEMA_VERSION,
            msg_id: r.msg_id.clone(),
            userid: r.userid.clone(),
            received_at_ms: r.received_at_ms,
            body,
        };
        let payload = serde_json::to_vec(&record).unwrap_or_default();
        let span = semconv::send_span(&self.responses_topic, &r.userid, &r.msg_id);
        let tp = traceparent_of(&span);
        let headers = kafka::record_headers(tp.as_deref(), &r.msg_id, now_ms());
        let sent = kafka::produce(
            &self.producer,
            &self.responses_topic,
            r.userid.as_str().as_bytes(),
            &payload,
            &headers,
            self.produce_timeout,
            &self.shutdown,
            (events::SERVICE, KafkaOp::Produce),
        )
        .instrument(span.clone())
        .await;
        match &sent {
            Ok(delivered) => semconv::record_delivery(&span, delivered.partition, delivered.offset),
            // Shutdown interrupted it: not a failure of the send.
            Err(RetryError::Cancelled) => {}
            Err(_) => semconv::record_send_failed(&span),
        }
        sent.map(drop)
    }

    async fn dead_letter(&self, job: &Job, reason: &str) -> Result<(), RetryError<KafkaError>> {
        let r = &job.record;
        let payload = serde_json::to_vec(r).unwrap_or_default();
        let headers = kafka::record_headers(job.traceparent.as_deref(), &r.msg_id, now_ms());
        self.dead_letters
            .write(
                &payload,
                Some(r.userid.as_str().as_bytes()),
                headers,
                reason,
                &self.shutdown,
            )
            .await
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
    /// Whether any delta was sent for this message (in any attempt): if not, the final record
    /// says the answer came whole.
    sent: bool,
    /// When the stream's first piece arrived (of the current attempt).
    first: Option<std::time::Instant>,
    last: std::time::Instant,
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
            sent: false,
            first: None,
            last: std::time::Instant::now(),
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
        self.sent = true;
        self.pieces = 0;
        self.last = std::time::Instant::now();
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
            DeltaDropped {
                msg_id: &r.msg_id,
                seq: self.seq - 1,
                error: &e,
            }
            .emit();
        }
    }
}

impl DeltaSink for DeltaBatcher<'_> {
    fn text(&mut self, piece: &str) {
        self.buf.push_str(piece);
        self.pieces += 1;
        // No delta in a stream's first window: an answer complete within it is sent whole, as
        // its final record alone (a preview of an answer about to arrive costs a record, a relay
        // write and a frame, and shows nothing), and the gateway counts that answer as the
        // message's first text. A slower stream gets its first delta at the first piece after
        // the window, then one per batch of tokens or window.
        let first = *self.first.get_or_insert_with(std::time::Instant::now);
        if first.elapsed() < self.worker.delta_batch {
            return;
        }
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
        self.first = None;
    }
}
