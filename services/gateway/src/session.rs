//! One WebSocket session: reads client frames, produces messages, writes acks and deliveries.
//!
//! The loop is generic over a `Sink`/`Stream` of WebSocket messages so a unit test can drive
//! it with channels. All writes to the socket happen here, in one task, which makes the
//! per-connection promise easy to keep: a connection never sees the same `event_id` twice,
//! and after any gap it replays from the inbox before resuming live delivery.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use futures::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::{Semaphore, mpsc};

use colloquy_core::records::{Delivery, ResponseBody};
use colloquy_core::wire::{ClientFrame, ErrorCode, EventId, ServerFrame};
use colloquy_core::{UserId, metrics as m, now_ms};

use crate::fanout::{ConnHandle, Outbound, RegisterError, Resync, read_inbox};
use crate::publish::{self, PublishError};
use crate::rate_limit::Decision;
use crate::state::AppState;

/// Close codes the gateway uses.
pub mod close {
    /// Bad, expired or foreign token; invalid userid.
    pub const POLICY: u16 = 1008;
    /// A frame above the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// The gateway is restarting: reconnect (to another instance) and resume.
    pub const RESTART: u16 = 1012;
    /// Try again later: too many sockets for this user, or deliveries unavailable.
    pub const TRY_AGAIN: u16 = 1013;
}

/// Deliveries buffered for one socket before it is considered slow and told to replay.
const OUTBOUND_CAPACITY: usize = 256;
/// Live deliveries held while a replay runs; beyond this the replay simply runs again.
const MAX_PENDING: usize = 4_096;

/// Where a connection is in the stream of its user's deliveries.
#[derive(Debug)]
struct Cursor {
    /// Highest event id written to this socket.
    last_seen: Option<EventId>,
    /// Replay start when nothing was seen yet: the moment the socket connected (or the client's resume point).
    floor: EventId,
}

impl Cursor {
    fn position(&self) -> EventId {
        self.last_seen.unwrap_or(self.floor).max(self.floor)
    }
    fn is_new(&self, id: EventId) -> bool {
        id > self.position()
    }
}

enum Replay {
    Idle,
    Running {
        pending: Vec<Arc<Delivery>>,
        again: bool,
    },
}

/// Runs a session for an authenticated `user` until the client leaves or the gateway stops.
pub async fn run<S, R>(
    mut sink: S,
    mut stream: R,
    state: Arc<AppState>,
    user: UserId,
    resume_after: Option<EventId>,
) where
    S: Sink<Message> + Unpin + Send,
    R: Stream<Item = Result<Message, axum::Error>> + Unpin + Send,
{
    let conn_id = state.next_conn_id();
    let (tx, mut rx) = mpsc::channel(OUTBOUND_CAPACITY);
    let resync = Arc::new(Resync::default());
    let handle = ConnHandle {
        id: conn_id,
        tx: tx.clone(),
        resync: Arc::clone(&resync),
    };
    if let Err(e) = state.fanout.register(&user, handle).await {
        let reason = match e {
            RegisterError::TooManyConnections => "too_many_connections",
            RegisterError::Subscribe(_) => "deliveries_unavailable",
        };
        metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => reason).increment(1);
        let _ = sink
            .send(close_message(close::TRY_AGAIN, &e.to_string()))
            .await;
        return;
    }
    metrics::gauge!(m::CONNECTIONS).increment(1.0);
    tracing::debug!(userid = %user, conn_id, "session open");

    let connected = EventId {
        ms: now_ms().max(1) as u64 - 1,
        seq: u64::MAX,
    };
    let mut cursor = Cursor {
        last_seen: None,
        floor: resume_after.unwrap_or(connected),
    };
    let mut replay = Replay::Idle;
    let in_flight = Arc::new(Semaphore::new(state.config.max_in_flight_per_connection));
    let mut session = Session {
        state: &state,
        user: &user,
        tx: &tx,
        in_flight: &in_flight,
    };
    if resume_after.is_some() {
        session.start_replay(&mut replay, &cursor, "resume");
    }

    let shutdown = state.shutdown.clone();
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                // Drain: let in-flight produces finish and their acks reach the client, then close.
                let max = state.config.max_in_flight_per_connection;
                let drain = async {
                    while in_flight.available_permits() < max || !rx.is_empty() {
                        let Some(out) = rx.recv().await else { break };
                        let mut frames = Vec::new();
                        session.on_outbound(out, &mut cursor, &mut replay, &mut frames);
                        if write_frames(&mut sink, frames).await.is_err() {
                            break;
                        }
                    }
                };
                let _ = tokio::time::timeout(state.config.shutdown_grace(), drain).await;
                let _ = sink.send(close_message(close::RESTART, "server restarting; reconnect and resume")).await;
                break;
            }
            Some(out) = rx.recv() => {
                let mut frames = Vec::new();
                session.on_outbound(out, &mut cursor, &mut replay, &mut frames);
                // Drain what is already queued, then flush once.
                while frames.len() < 64 {
                    match rx.try_recv() {
                        Ok(out) => session.on_outbound(out, &mut cursor, &mut replay, &mut frames),
                        Err(_) => break,
                    }
                }
                if write_frames(&mut sink, frames).await.is_err() {
                    break;
                }
            }
            () = resync.requested() => {
                session.start_replay(&mut replay, &cursor, "resync");
            }
            incoming = stream.next() => {
                let Some(incoming) = incoming else { break };
                match incoming {
                    Ok(Message::Text(text)) => match session.on_text(text.as_str()).await {
                        Some(Action::Reply(frame)) => {
                            let sent = sink.send(Message::Text(frame.to_json().into())).await;
                            if sent.is_err() {
                                break;
                            }
                        }
                        Some(Action::Resume(after)) => {
                            // Never move backwards: a connection must not see an event twice.
                            cursor.floor = cursor.floor.max(after);
                            session.start_replay(&mut replay, &cursor, "resume");
                        }
                        None => {}
                    },
                    Ok(Message::Binary(_)) => {
                        metrics::counter!(m::MESSAGES, "service" => "gateway", "outcome" => "invalid").increment(1);
                        let frame = ServerFrame::error(ErrorCode::InvalidMessage, "binary frames are not supported; send JSON text");
                        if sink.send(Message::Text(frame.to_json().into())).await.is_err() {
                            break;
                        }
                    }
                    Ok(Message::Ping(_) | Message::Pong(_)) => {}
                    Ok(Message::Close(_)) => break,
                    Err(e) => {
                        let text = e.to_string();
                        if text.contains("too long") || text.contains("Space limit") || text.contains("size") {
                            metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => "frame_too_large").increment(1);
                            let _ = sink.send(close_message(close::TOO_BIG, "frame too large")).await;
                        }
                        tracing::debug!(userid = %user, error = %e, "socket read failed");
                        break;
                    }
                }
            }
        }
    }
    state.fanout.unregister(&user, conn_id);
    metrics::gauge!(m::CONNECTIONS).decrement(1.0);
    tracing::debug!(userid = %user, conn_id, "session closed");
}

/// What the reader asks the loop to do after a text frame.
enum Action {
    Reply(ServerFrame),
    Resume(EventId),
}

struct Session<'a> {
    state: &'a Arc<AppState>,
    user: &'a UserId,
    tx: &'a mpsc::Sender<Outbound>,
    in_flight: &'a Arc<Semaphore>,
}

impl Session<'_> {
    /// Handles one text frame; returns a frame to write at once (errors, pong) or a resume.
    async fn on_text(&mut self, text: &str) -> Option<Action> {
        let received_at_ms = now_ms();
        let frame = match ClientFrame::parse(text, self.state.config.max_content_bytes) {
            Ok(f) => f,
            Err(e) => {
                let outcome = if e.code() == ErrorCode::TooLarge {
                    "too_large"
                } else {
                    "invalid"
                };
                metrics::counter!(m::MESSAGES, "service" => "gateway", "outcome" => outcome)
                    .increment(1);
                return Some(Action::Reply(ServerFrame::error(e.code(), e.to_string())));
            }
        };
        match frame {
            ClientFrame::Ping => Some(Action::Reply(ServerFrame::Pong)),
            ClientFrame::Resume { after } => {
                Some(Action::Resume(EventId::parse(&after).unwrap_or_default()))
            }
            ClientFrame::Message {
                content,
                id,
                userid,
            } => {
                if userid.as_deref().is_some_and(|u| u != self.user.as_str()) {
                    metrics::counter!(m::MESSAGES, "service" => "gateway", "outcome" => "invalid")
                        .increment(1);
                    return Some(Action::Reply(error_for(
                        ErrorCode::InvalidMessage,
                        "userid does not match the connection",
                        id,
                        None,
                    )));
                }
                let msg_id = id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
                // Boxed: the Redis script's future is large, and inlined it would sit in every
                // idle session's future (17 → 12 KiB per connection, docs/performance.md).
                if let Decision::Limited { retry_after_ms } =
                    Box::pin(self.state.limiter.check(self.user)).await
                {
                    metrics::counter!(m::MESSAGES, "service" => "gateway", "outcome" => "rate_limited").increment(1);
                    return Some(Action::Reply(error_for(
                        ErrorCode::RateLimited,
                        "rate limit exceeded",
                        Some(msg_id),
                        Some(retry_after_ms),
                    )));
                }
                let Ok(permit) = Arc::clone(self.in_flight).try_acquire_owned() else {
                    metrics::counter!(m::MESSAGES, "service" => "gateway", "outcome" => "too_many_in_flight").increment(1);
                    return Some(Action::Reply(error_for(
                        ErrorCode::RateLimited,
                        "too many messages waiting for their ack",
                        Some(msg_id),
                        Some(100),
                    )));
                };
                self.publish(msg_id, content, received_at_ms, permit)
                    .map(Action::Reply)
            }
        }
    }

    /// Enqueues the message to Kafka in arrival order; the ack is sent from the delivery report.
    fn publish(
        &self,
        msg_id: String,
        content: String,
        received_at_ms: i64,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Option<ServerFrame> {
        let span = tracing::info_span!(parent: None, "gateway.message", userid = %self.user, msg_id = %msg_id, otel.kind = "producer");
        match publish::enqueue(
            self.state,
            self.user,
            &msg_id,
            content,
            received_at_ms,
            &span,
        ) {
            Ok(pending) => {
                let tx = self.tx.clone();
                self.state.tasks.spawn(async move {
                    let started = Instant::now();
                    let frame = match pending.await {
                        Ok(trace_id) => {
                            metrics::histogram!(m::STAGE_LATENCY, "stage" => "produce").record(started.elapsed().as_secs_f64());
                            metrics::counter!(m::MESSAGES, "service" => "gateway", "outcome" => "acked").increment(1);
                            ServerFrame::Ack { id: msg_id, trace_id }
                        }
                        Err(e) => unavailable(msg_id, &e),
                    };
                    // Queue the ack before releasing the slot: a draining session waits for
                    // every slot, and must find the ack queued when it gets them back.
                    let _ = tx.send(Outbound::Frame(frame)).await;
                    drop(permit);
                });
                None
            }
            Err(e) => Some(unavailable(msg_id, &e)),
        }
    }

    fn start_replay(&mut self, replay: &mut Replay, cursor: &Cursor, reason: &'static str) {
        if let Replay::Running { again, .. } = replay {
            *again = true;
            return;
        }
        *replay = Replay::Running {
            pending: Vec::new(),
            again: false,
        };
        let redis = self.state.redis.clone();
        let names = self.state.names.clone();
        let user = self.user.clone();
        let after = cursor.position();
        let limit = self.state.config.replay_limit;
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let out = match read_inbox(&redis, &names, &user, after, limit).await {
                Ok(deliveries) => {
                    metrics::counter!(m::REPLAYED, "reason" => reason)
                        .increment(deliveries.len() as u64);
                    let more = deliveries.len() as u64 >= limit;
                    Outbound::Replayed { deliveries, more }
                }
                Err(e) => {
                    metrics::counter!(m::REDIS_ERRORS, "service" => "gateway", "op" => "replay")
                        .increment(1);
                    tracing::warn!(userid = %user, error = %e, "inbox replay failed; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    Outbound::ReplayFailed
                }
            };
            let _ = tx.send(out).await;
        });
    }

    fn on_outbound(
        &mut self,
        out: Outbound,
        cursor: &mut Cursor,
        replay: &mut Replay,
        frames: &mut Vec<ServerFrame>,
    ) {
        match out {
            Outbound::Frame(f) => frames.push(f),
            Outbound::Live(d) => {
                let Some(id) = d.event_id.as_deref().and_then(EventId::parse) else {
                    // Deltas are ephemeral: write them as they come.
                    frames.push(delivered_frame(&d));
                    return;
                };
                match replay {
                    Replay::Running { pending, again } => {
                        if pending.len() < MAX_PENDING {
                            pending.push(d);
                        } else {
                            pending.clear();
                            *again = true;
                        }
                    }
                    Replay::Idle => write_durable(&d, id, cursor, frames),
                }
            }
            Outbound::Replayed { deliveries, more } => {
                for d in &deliveries {
                    if let Some(id) = d.event_id.as_deref().and_then(EventId::parse) {
                        write_durable(d, id, cursor, frames);
                    }
                }
                let Replay::Running { pending, again } = std::mem::replace(replay, Replay::Idle)
                else {
                    return;
                };
                if more || again {
                    self.start_replay(replay, cursor, "resync");
                    if let Replay::Running { pending: p, .. } = replay {
                        *p = pending;
                    }
                    return;
                }
                let mut pending = pending;
                pending.sort_by_key(|d| d.event_id.as_deref().and_then(EventId::parse));
                for d in pending {
                    if let Some(id) = d.event_id.as_deref().and_then(EventId::parse) {
                        write_durable(&d, id, cursor, frames);
                    }
                }
            }
            Outbound::ReplayFailed => {
                let Replay::Running { pending, .. } = std::mem::replace(replay, Replay::Idle)
                else {
                    return;
                };
                self.start_replay(replay, cursor, "retry");
                if let Replay::Running { pending: p, .. } = replay {
                    *p = pending;
                }
            }
        }
    }
}

fn write_durable(d: &Delivery, id: EventId, cursor: &mut Cursor, frames: &mut Vec<ServerFrame>) {
    if cursor.is_new(id) {
        cursor.last_seen = Some(id);
        frames.push(delivered_frame(d));
    } else {
        metrics::counter!(m::DUPLICATES, "service" => "gateway").increment(1);
    }
}

/// The frame for a delivery, with its latency recorded at the moment it is handed to the socket.
fn delivered_frame(d: &Delivery) -> ServerFrame {
    let now = now_ms();
    let since_receive = (now - d.received_at_ms).max(0) as f64 / 1000.0;
    match &d.body {
        ResponseBody::Delta { seq, .. } => {
            if *seq == 0 {
                metrics::histogram!(m::FIRST_DELTA_LATENCY).record(since_receive);
            }
        }
        ResponseBody::Final { .. } | ResponseBody::Failed { .. } => {
            // The last hop of the message's trace: the answer handed to the socket.
            let span = tracing::info_span!("gateway.deliver", userid = %d.userid, msg_id = %d.msg_id, otel.kind = "consumer");
            colloquy_core::trace_context::continue_from(&span, d.traceparent.as_deref());
            drop(span);
            let outcome = if matches!(d.body, ResponseBody::Final { .. }) {
                "response"
            } else {
                "llm_failed"
            };
            metrics::histogram!(m::E2E_LATENCY, "outcome" => outcome).record(since_receive);
            metrics::histogram!(m::STAGE_LATENCY, "stage" => "fanout")
                .record((now - d.relayed_at_ms).max(0) as f64 / 1000.0);
            metrics::counter!(m::MESSAGES, "service" => "gateway", "outcome" => "delivered")
                .increment(1);
        }
    }
    d.to_frame()
}

async fn write_frames<S: Sink<Message> + Unpin>(
    sink: &mut S,
    frames: Vec<ServerFrame>,
) -> Result<(), ()> {
    if frames.is_empty() {
        return Ok(());
    }
    for f in frames {
        sink.feed(Message::Text(f.to_json().into()))
            .await
            .map_err(|_| ())?;
    }
    sink.flush().await.map_err(|_| ())
}

fn error_for(
    code: ErrorCode,
    message: &str,
    id: Option<String>,
    retry_after_ms: Option<u64>,
) -> ServerFrame {
    ServerFrame::Error {
        code,
        message: message.to_owned(),
        id,
        event_id: None,
        retry_after_ms,
    }
}

fn unavailable(msg_id: String, e: &PublishError) -> ServerFrame {
    metrics::counter!(m::MESSAGES, "service" => "gateway", "outcome" => "unavailable").increment(1);
    metrics::counter!(m::KAFKA_ERRORS, "service" => "gateway", "op" => "produce").increment(1);
    tracing::warn!(msg_id = %msg_id, error = %e, "message not accepted by Kafka");
    error_for(
        ErrorCode::Unavailable,
        "message not stored; resend it with the same id",
        Some(msg_id),
        Some(1_000),
    )
}

/// A close frame with `code` and `reason` (truncated to the protocol's 123 bytes).
#[must_use]
pub fn close_message(code: u16, reason: &str) -> Message {
    let mut reason = reason.to_owned();
    while reason.len() > 123 {
        reason.pop();
    }
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(reason),
    }))
}
