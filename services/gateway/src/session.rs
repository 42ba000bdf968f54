//! One WebSocket session: the I/O around a [`Connection`].
//!
//! The loop registers the socket with the fan-out, reads the user's stream position, then feeds
//! every event (a client frame, a live delivery, an inbox page, a publish outcome, a gap, a
//! tick) to the connection and performs the actions it returns: writing frames, reading the
//! inbox, checking the rate limit and producing to Kafka, pinging, closing. Every decision
//! about what is written lives in [`Connection`]; this file only moves bytes. It is generic over
//! a `Sink`/`Stream` of WebSocket messages so a unit test can drive it with channels.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::Message;
use futures::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::{TryAcquireError, mpsc};

use colloquy_core::backoff::Backoff;
use colloquy_core::labels::{RefusedReason, ReplayReason};
use colloquy_core::records::{Delivery, ResponseBody};
use colloquy_core::wire::{EventId, ServerFrame};
use colloquy_core::{UserId, now_ms};

use crate::close;
use crate::connection::{Action, Connection, InboxPage, Limits, Published};
use crate::events::{
    ConnectionRefused, DeliveryWritten, DuplicatesSkipped, InboxReplayed, MessageAnswered,
    MessageNotProduced, MessageProduced, MessageRefused, ReplayFailed, ReplayQueued, SessionClosed,
    SessionOpened,
};
use crate::fanout::{ConnHandle, RegisterError, Resync};
use crate::inbox;
use crate::publish;
use crate::rate_limit::Decision;
use crate::state::AppState;

/// What a session receives besides client frames.
///
/// Pointer-sized variants only: every socket's channel allocates its first block of slots up
/// front, so each byte here costs 32 bytes per idle socket (64-byte variants cost 1.5 KiB more
/// per socket than these 16; the test below holds the size).
#[derive(Debug)]
pub enum Outbound {
    /// A delivery published on the user's channel.
    Live(Arc<Delivery>),
    /// The inbox page a replay asked for; `None` when reading failed.
    Inbox(Option<Box<InboxPage>>),
    /// How producing a message ended (from the Kafka delivery report): its id and outcome.
    Published(Box<(String, Published)>),
}

/// Deliveries buffered for one socket before it is considered slow and told to replay.
const OUTBOUND_CAPACITY: usize = 256;
/// How often the connection's clock ticks (pings, idle timeout, token expiry).
const TICK: Duration = Duration::from_secs(1);
/// How long a socket is held open after our close frame, so the peer (or nginx) reads it
/// before the TCP connection goes away.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Backoff of a failed inbox read: full jitter, capped.
const REPLAY_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(100),
    cap: Duration::from_secs(10),
    max_attempts: u32::MAX,
};

/// An authenticated socket's parameters.
#[derive(Clone, Debug)]
pub struct Accepted {
    pub user: UserId,
    /// The client's cursor from `?after=`.
    pub after: Option<EventId>,
    /// When the token expires (Unix milliseconds).
    pub token_expires_ms: Option<u64>,
}

/// Runs a session for an authenticated user until the client leaves, the token expires or
/// the gateway stops.
pub async fn run<S, R>(mut sink: S, mut stream: R, state: Arc<AppState>, accepted: Accepted)
where
    S: Sink<Message> + Unpin + Send,
    R: Stream<Item = Result<Message, axum::Error>> + Unpin + Send,
{
    let Accepted {
        user,
        after,
        token_expires_ms,
    } = accepted;
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
            RegisterError::TooManyConnections => RefusedReason::TooManyConnections,
            RegisterError::Subscribe(_) => RefusedReason::DeliveriesUnavailable,
        };
        let detail = e.to_string();
        ConnectionRefused {
            userid: Some(user.as_str()),
            reason,
            detail: &detail,
        }
        .emit();
        close_and_linger(&mut sink, &mut stream, close::TRY_AGAIN, &detail).await;
        return;
    }
    // Subscribed first, position second: anything after the position arrives live.
    // Boxed: fred's XREVRANGE future is about 7 KiB, and inlined it would be reserved in every
    // idle session's future for the whole life of the socket (docs/performance.md).
    let position = tokio::time::timeout(
        Duration::from_secs(2),
        Box::pin(inbox::position(&state.redis, &state.names, &user)),
    )
    .await
    .map_err(|_| "timed out after 2 s".to_owned())
    .and_then(|read| read.map_err(|e| e.to_string()));
    let position = match position {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(userid = %user, error = %e, "cannot read the inbox position; refusing the socket with 1013");
            state.fanout.unregister(&user, conn_id);
            let detail = "deliveries unavailable: cannot read the stream position";
            ConnectionRefused {
                userid: Some(user.as_str()),
                reason: RefusedReason::DeliveriesUnavailable,
                detail,
            }
            .emit();
            close_and_linger(&mut sink, &mut stream, close::TRY_AGAIN, detail).await;
            return;
        }
    };
    SessionOpened {
        userid: user.as_str(),
        conn_id,
        position: &position,
    }
    .emit();

    let limits = limits(&state);
    let (mut conn, first) = Connection::open(
        limits,
        user.as_str(),
        position,
        after,
        token_expires_ms,
        unix_ms(),
    );
    // Sockets opened together would otherwise be pinged in the same second of every interval:
    // a thousand pings at once, each followed by a delivery that (before TCP_NODELAY, lib.rs)
    // waited for the ping's ack; answers in that second were ~80 ms late (docs/performance.md).
    conn.advance_first_ping(rand::random_range(0..limits.ping_interval_ms.max(1)));
    let io = Io {
        state: &state,
        user: &user,
        tx: &tx,
    };
    let mut ended = io.perform(&mut sink, &mut conn, first).await;
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let shutdown = state.shutdown.clone();
    while ended.is_none() {
        ended = tokio::select! {
            biased;
            () = shutdown.cancelled() => Some(io.drain(&mut sink, &mut conn, &mut rx).await),
            Some(out) = rx.recv() => {
                let mut actions = io.on_outbound(&mut conn, out);
                // Take what is already queued, then flush once.
                while actions.len() < 64 {
                    match rx.try_recv() {
                        Ok(out) => actions.extend(io.on_outbound(&mut conn, out)),
                        Err(_) => break,
                    }
                }
                io.perform(&mut sink, &mut conn, actions).await
            }
            () = resync.requested() => {
                let actions = conn.on_gap();
                io.perform(&mut sink, &mut conn, actions).await
            }
            _ = ticks.tick() => {
                let actions = conn.on_tick(unix_ms());
                io.perform(&mut sink, &mut conn, actions).await
            }
            incoming = stream.next() => match incoming {
                None | Some(Ok(Message::Close(_))) => Some(End::PeerLeft),
                Some(Ok(Message::Text(text))) => {
                    let actions = conn.on_text(text.as_str(), unix_ms());
                    io.perform(&mut sink, &mut conn, actions).await
                }
                Some(Ok(Message::Binary(_))) => {
                    let actions = conn.on_binary(unix_ms());
                    io.perform(&mut sink, &mut conn, actions).await
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                    conn.on_heard(unix_ms());
                    None
                }
                Some(Err(e)) => Some(read_failed(&user, &e)),
            },
        };
    }
    match ended {
        Some(End::Close(code, reason)) => {
            close_and_linger(&mut sink, &mut stream, code, &reason).await;
        }
        Some(End::TooBig) => {
            let reason = format!(
                "frame too large: the limit is {} bytes",
                state.config.max_frame_bytes
            );
            ConnectionRefused {
                userid: Some(user.as_str()),
                reason: RefusedReason::FrameTooLarge,
                detail: &reason,
            }
            .emit();
            // The rest of the oversized frame is unread: hold the socket without reading, so
            // the close frame is not destroyed by a reset before the peer (or nginx) reads it.
            let _ = sink.send(close::message(close::TOO_BIG, &reason)).await;
            tokio::time::sleep(CLOSE_LINGER).await;
        }
        Some(End::PeerLeft | End::Gone) | None => {}
    }
    state.fanout.unregister(&user, conn_id);
    SessionClosed {
        userid: user.as_str(),
        conn_id,
    }
    .emit();
}

/// Why the loop ended.
enum End {
    /// The client closed or the socket dropped.
    PeerLeft,
    /// Writing failed: nothing more can be sent.
    Gone,
    /// A frame above the size limit.
    TooBig,
    /// We close with this code and reason.
    Close(u16, String),
}

fn read_failed(user: &UserId, e: &axum::Error) -> End {
    let text = e.to_string();
    tracing::debug!(userid = %user, error = %text, "socket read failed");
    if text.contains("too long") || text.contains("Space limit") || text.contains("size") {
        End::TooBig
    } else {
        End::PeerLeft
    }
}

fn limits(state: &AppState) -> Limits {
    let c = &state.config;
    Limits {
        max_content_bytes: c.max_content_bytes,
        max_in_flight: c.max_in_flight_per_connection,
        replay_page: c.replay_limit.max(1),
        ping_interval_ms: c.ping_interval_secs.saturating_mul(1000),
        idle_timeout_ms: c.idle_timeout_secs.saturating_mul(1000),
        resume_burst: c.resume_burst,
        resume_refill_ms: c.resume_refill_ms,
        ..Limits::default()
    }
}

fn unix_ms() -> u64 {
    u64::try_from(now_ms()).unwrap_or(0)
}

/// Sends a close frame, then reads (and discards) until the peer answers with its own close or
/// goes away, at most `CLOSE_LINGER`: the close frame is always delivered before the TCP
/// connection ends.
pub async fn close_and_linger<S, R>(sink: &mut S, stream: &mut R, code: u16, reason: &str)
where
    S: Sink<Message> + Unpin,
    R: Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    if sink.send(close::message(code, reason)).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        while let Some(Ok(m)) = stream.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// The session's side effects.
struct Io<'a> {
    state: &'a Arc<AppState>,
    user: &'a UserId,
    tx: &'a mpsc::Sender<Outbound>,
}

impl Io<'_> {
    /// Counts how producing a message ended, as the client is told: an ack or an error.
    fn count_written(&self, frame: &ServerFrame) {
        let (acked, msg_id) = match frame {
            ServerFrame::Ack { id, .. } => (true, Some(id.as_str())),
            ServerFrame::Error { id, .. } => (false, id.as_deref()),
            _ => return,
        };
        MessageAnswered {
            userid: self.user.as_str(),
            msg_id,
            acked,
        }
        .emit();
    }

    fn on_outbound(&self, conn: &mut Connection, out: Outbound) -> Vec<Action> {
        match out {
            Outbound::Live(d) => conn.on_live(d),
            Outbound::Inbox(page) => conn.on_inbox(page.map(|p| *p)),
            Outbound::Published(published) => {
                let (msg_id, outcome) = *published;
                conn.on_published(msg_id, outcome)
            }
        }
    }

    /// Performs `actions` (and those they lead to) and flushes; `Some` when the session ends.
    async fn perform<S: Sink<Message> + Unpin>(
        &self,
        sink: &mut S,
        conn: &mut Connection,
        actions: Vec<Action>,
    ) -> Option<End> {
        let mut queue = std::collections::VecDeque::from(actions);
        let mut wrote = false;
        while let Some(action) = queue.pop_front() {
            let message = match action {
                Action::Write(frame) => {
                    self.count_written(&frame);
                    Message::Text(frame.to_json().into())
                }
                Action::Refuse(frame, refusal) => {
                    MessageRefused {
                        userid: self.user.as_str(),
                        msg_id: frame_msg_id(&frame),
                        refusal,
                    }
                    .emit();
                    Message::Text(frame.to_json().into())
                }
                Action::Deliver(d) => Message::Text(delivered_frame(&d).to_json().into()),
                Action::Ping => Message::Ping(Vec::new().into()),
                Action::ReadInbox {
                    after,
                    limit,
                    check_trim,
                    attempt,
                } => {
                    self.read_inbox(after, limit, check_trim, attempt);
                    continue;
                }
                Action::Publish { msg_id, content } => {
                    if let Some(outcome) = self.publish(msg_id.clone(), content).await {
                        queue.extend(conn.on_published(msg_id, outcome));
                    }
                    continue;
                }
                Action::Close { code, reason } => {
                    if wrote {
                        let _ = sink.flush().await;
                    }
                    return Some(End::Close(code, reason.to_owned()));
                }
            };
            if sink.feed(message).await.is_err() {
                return Some(End::Gone);
            }
            wrote = true;
        }
        let duplicates = conn.take_duplicates();
        if duplicates > 0 {
            DuplicatesSkipped {
                userid: self.user.as_str(),
                count: duplicates,
            }
            .emit();
        }
        if wrote && sink.flush().await.is_err() {
            return Some(End::Gone);
        }
        None
    }

    /// Shutdown: stop reading the client, write every ack still owed, then close with 1012.
    async fn drain<S: Sink<Message> + Unpin>(
        &self,
        sink: &mut S,
        conn: &mut Connection,
        rx: &mut mpsc::Receiver<Outbound>,
    ) -> End {
        let drain = async {
            while conn.in_flight() > 0 || !rx.is_empty() {
                let Some(out) = rx.recv().await else { break };
                let actions = self.on_outbound(conn, out);
                if self.perform(sink, conn, actions).await.is_some() {
                    break;
                }
            }
        };
        if tokio::time::timeout(self.state.config.shutdown_grace(), drain)
            .await
            .is_err()
        {
            tracing::warn!(userid = %self.user, in_flight = conn.in_flight(), "shutdown grace elapsed before every ack was written");
        }
        End::Close(
            close::RESTART,
            "server restarting; reconnect and resume".into(),
        )
    }

    /// Reads an inbox page in a task, bounded by the gateway-wide replay semaphore, after a
    /// jittered backoff when it is a retry; the page comes back as [`Outbound::Inbox`].
    fn read_inbox(&self, after: EventId, limit: u64, check_trim: bool, attempt: u32) {
        let state = Arc::clone(self.state);
        let user = self.user.clone();
        let tx = self.tx.clone();
        let reason = if check_trim {
            ReplayReason::Resume
        } else {
            ReplayReason::Resync
        };
        tokio::spawn(async move {
            if attempt > 0 {
                let delay = REPLAY_BACKOFF
                    .delay(attempt, None, &mut rand::rng())
                    .unwrap_or(REPLAY_BACKOFF.cap);
                tokio::time::sleep(delay).await;
            }
            let _permit = match state.replays.try_acquire() {
                Ok(permit) => permit,
                Err(TryAcquireError::Closed) => return,
                Err(TryAcquireError::NoPermits) => {
                    ReplayQueued {
                        userid: user.as_str(),
                    }
                    .emit();
                    let Ok(permit) = state.replays.acquire().await else {
                        return;
                    };
                    permit
                }
            };
            let page = match inbox::read(
                &state.redis,
                &state.names,
                &user,
                after,
                limit,
                check_trim,
            )
            .await
            {
                Ok(page) => {
                    InboxReplayed {
                        userid: user.as_str(),
                        reason,
                        entries: page.entries.len(),
                    }
                    .emit();
                    Some(Box::new(page))
                }
                Err(e) => {
                    ReplayFailed {
                        userid: user.as_str(),
                        attempt,
                        error: &e,
                    }
                    .emit();
                    None
                }
            };
            let _ = tx.send(Outbound::Inbox(page)).await;
        });
    }

    /// Checks the rate limit and enqueues the message to Kafka in arrival order; the outcome
    /// now when it is refused at once, else later from the delivery report.
    async fn publish(&self, msg_id: String, content: String) -> Option<Published> {
        let received_at_ms = now_ms();
        // Boxed: the Redis script's future is large, and inlined it would sit in every idle
        // session's future (17 → 12 KiB per connection, docs/performance.md).
        if let Decision::Limited { retry_after_ms } =
            Box::pin(self.state.limiter.check(self.user)).await
        {
            return Some(Published::RateLimited { retry_after_ms });
        }
        let span = tracing::info_span!(parent: None, "gateway.message", userid = %self.user, msg_id = %msg_id, otel.kind = "server");
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
                self.state.tasks.spawn(await_ack(
                    pending,
                    self.user.clone(),
                    msg_id,
                    tx,
                    Instant::now(),
                ));
                None
            }
            Err(e) => {
                MessageNotProduced {
                    userid: self.user.as_str(),
                    msg_id: &msg_id,
                    error: &e,
                }
                .emit();
                Some(Published::Unavailable)
            }
        }
    }
}

/// Waits for the Kafka delivery report of one message and hands the outcome to its session:
/// the one place where a message becomes acked.
async fn await_ack(
    pending: impl Future<Output = Result<String, publish::PublishError>>,
    user: UserId,
    msg_id: String,
    tx: mpsc::Sender<Outbound>,
    started: Instant,
) {
    let outcome = match pending.await {
        Ok(trace_id) => {
            MessageProduced {
                msg_id: &msg_id,
                latency: started.elapsed(),
            }
            .emit();
            Published::Acked { trace_id }
        }
        Err(e) => {
            MessageNotProduced {
                userid: user.as_str(),
                msg_id: &msg_id,
                error: &e,
            }
            .emit();
            Published::Unavailable
        }
    };
    let _ = tx
        .send(Outbound::Published(Box::new((msg_id, outcome))))
        .await;
}

/// The message id an error frame refers to, if any.
fn frame_msg_id(frame: &ServerFrame) -> Option<&str> {
    match frame {
        ServerFrame::Error { id, .. } => id.as_deref(),
        _ => None,
    }
}

/// The frame for a delivery, with its latency recorded at the moment it is handed to the socket.
fn delivered_frame(d: &Delivery) -> ServerFrame {
    let written = DeliveryWritten {
        delivery: d,
        now_ms: now_ms(),
    };
    if matches!(d.body, ResponseBody::Delta { .. }) {
        written.emit();
    } else {
        // The last hop of the message's trace: the answer handed to the socket.
        let span = tracing::info_span!("gateway.deliver", userid = %d.userid, msg_id = %d.msg_id, otel.kind = "consumer");
        colloquy_core::trace_context::continue_from(&span, d.traceparent.as_deref());
        span.in_scope(|| written.emit());
    }
    d.to_frame()
}

#[cfg(test)]
mod tests {
    use axum::extract::ws::{Message, WebSocket};
    use futures::stream::{SplitSink, SplitStream};

    use super::{Outbound, run};

    /// The size of the future `f` returns, without calling it.
    fn future_size<A, B, C, D, F: Future>(_f: fn(A, B, C, D) -> F) -> usize {
        size_of::<F>()
    }

    #[test]
    fn an_outbound_message_is_two_words() {
        // Each socket's channel allocates a block of 32 slots at once: at 16 bytes a slot that
        // is 512 bytes per idle socket (docs/performance.md, memory per connection).
        assert!(
            size_of::<Outbound>() <= 16,
            "Outbound grew to {} bytes: box the new variant's payload",
            size_of::<Outbound>()
        );
    }

    #[test]
    fn an_idle_session_reserves_little() {
        // The session future sits in its task for the whole life of the socket, and it is as
        // large as the largest future it awaits inline. fred's command futures are several KiB
        // (the inbox position read alone is 7 KiB): awaited inline, every idle socket reserves
        // them, so they are boxed. 1.7 KiB now, 8.1 KiB with the read inline. The bound allows
        // 0.8 KiB more, about the margin left under issue 13's 10 KiB per socket
        // (docs/performance.md, memory per connection).
        let size = future_size(run::<SplitSink<WebSocket, Message>, SplitStream<WebSocket>>);
        assert!(
            size <= 2 * 1024 + 512,
            "the session future grew to {size} bytes: box the large future it awaits"
        );
    }
}
