//! One connection's protocol state, without I/O (sans-IO, like quinn-proto's `Connection`).
//!
//! [`Connection`] owns what decides correctness: the cursor in the user's stream, the replay in
//! progress and the live deliveries held while it runs, the event ids already written, the
//! messages waiting for their Kafka ack, the `resume` budget, token expiry and the ping clock.
//! Each method takes one event (a client frame, a live delivery, an inbox page, a gap, a
//! publish outcome, a tick) and returns the [`Action`]s the session loop performs; the loop
//! only moves bytes. The promises, tested here without sockets, Redis or Kafka:
//!
//! - a connection writes each event id at most once;
//! - it never skips an event the inbox held above its cursor: whatever arrives live while a
//!   replay runs is held and written after it, and any gap is followed by a replay;
//! - a `resume` is honoured whatever its age, even below what was already written.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::sync::Arc;

use colloquy_core::records::{Delivery, ResponseBody};
use colloquy_core::wire::{ClientFrame, ErrorCode, EventId, ServerFrame};

use crate::close;

/// The limits and clocks one connection works with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest message content, bytes.
    pub max_content_bytes: usize,
    /// Messages that may wait for their Kafka ack at once.
    pub max_in_flight: usize,
    /// Most inbox entries read in one page.
    pub replay_page: u64,
    /// Live deliveries held while a replay runs; beyond this they are dropped and the replay
    /// reads again instead.
    pub max_pending: usize,
    /// Event ids remembered to refuse duplicates after a `resume` lowers the cursor. Must be
    /// above the inbox length (`INBOX_MAXLEN`), so an id older than the memory is also trimmed.
    pub memory: usize,
    /// `resume` frames allowed in a burst.
    pub resume_burst: u32,
    /// One more `resume` is allowed every this many milliseconds.
    pub resume_refill_ms: u64,
    /// A WebSocket ping is sent after this long without one.
    pub ping_interval_ms: u64,
    /// The peer is given up after this long without any frame from it (pongs included).
    pub idle_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_content_bytes: 16_384,
            max_in_flight: 64,
            replay_page: 1_000,
            max_pending: 4_096,
            memory: 4_096,
            resume_burst: 5,
            resume_refill_ms: 1_000,
            ping_interval_ms: 25_000,
            idle_timeout_ms: 60_000,
        }
    }
}

/// What the session loop must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Write a frame the connection produced (welcome, ack, error, pong, resumed).
    Write(ServerFrame),
    /// Write an error frame refusing what the client sent; `Refusal` labels the count.
    Refuse(ServerFrame, Refusal),
    /// Write a delivery (a delta, an answer or a failure).
    Deliver(Arc<Delivery>),
    /// Read up to `limit` inbox entries after `after` (exclusive), waiting first when `attempt`
    /// is above 0 (a retry); `check_trim` asks whether entries above `after` were trimmed.
    /// Report the result with [`Connection::on_inbox`].
    ReadInbox {
        after: EventId,
        limit: u64,
        check_trim: bool,
        attempt: u32,
    },
    /// Check the user's rate limit and produce the message; report the outcome with
    /// [`Connection::on_published`].
    Publish { msg_id: String, content: String },
    /// Send a WebSocket ping.
    Ping,
    /// Send a close frame and end the session.
    Close { code: u16, reason: &'static str },
}

/// Why a client frame was refused (its `outcome` label: `events::MessageRefused`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Invalid,
    TooLarge,
    RateLimited,
    TooManyInFlight,
    TooManyResumes,
}

/// A page of the inbox, as read for an [`Action::ReadInbox`].
#[derive(Clone, Debug, Default)]
pub struct InboxPage {
    /// Entries after the cursor, oldest first, each with its `event_id`.
    pub entries: Vec<Arc<Delivery>>,
    /// The page was full: more may follow.
    pub more: bool,
    /// When asked: whether entries above the cursor were trimmed or the inbox expired.
    pub trimmed: Option<bool>,
}

/// How producing a message ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Published {
    /// The broker acknowledged it.
    Acked { trace_id: String },
    /// The user's rate limit refused it.
    RateLimited { retry_after_ms: u64 },
    /// Kafka did not take it.
    Unavailable,
}

#[derive(Debug)]
enum Replay {
    Idle,
    Reading(Reading),
}

#[derive(Debug)]
struct Reading {
    /// Where the read in flight started.
    after: EventId,
    /// Whether the read in flight asks if entries above `after` were trimmed.
    checking: bool,
    /// Live deliveries that arrived meanwhile.
    pending: Vec<Arc<Delivery>>,
    /// Something may have been missed while reading (a gap, or `pending` overflowed): read
    /// again from where the page ends before finishing.
    again: bool,
    /// A `resume` arrived while reading: read from this cursor too, next.
    resume: Option<EventId>,
    /// A `resume` is being answered: send `resumed` at the end.
    report: bool,
    /// Whether everything asked for was recovered, so far.
    recovered: bool,
    /// Failed reads in a row.
    failures: u32,
}

impl Reading {
    fn new(after: EventId, report: bool) -> Self {
        Self {
            after,
            checking: report,
            pending: Vec::new(),
            again: false,
            resume: None,
            report,
            recovered: true,
            failures: 0,
        }
    }
}

/// The event ids a connection wrote, bounded: ids at or below `forgotten` count as written.
#[derive(Debug, Default)]
struct Written {
    ids: BTreeSet<EventId>,
    forgotten: EventId,
}

impl Written {
    fn contains(&self, id: EventId) -> bool {
        id <= self.forgotten || self.ids.contains(&id)
    }

    fn insert(&mut self, id: EventId, memory: usize) {
        self.ids.insert(id);
        while self.ids.len() > memory.max(1) {
            if let Some(old) = self.ids.pop_first() {
                self.forgotten = self.forgotten.max(old);
            }
        }
    }
}

/// The message ids this connection showed an answer for, bounded. A second answer to the same
/// id is not shown: a message resent after a gateway died mid-ack (the client never saw its
/// ack) is answered twice in the inbox, once per send, and whether the replay of the first
/// answer or the resend reaches the gateway first is a race; the connection shows one answer.
/// (A resend of an answered id from a connection that has not shown it gets it again.)
#[derive(Debug, Default)]
struct Answered {
    ids: HashSet<String>,
    order: VecDeque<String>,
}

impl Answered {
    fn contains(&self, msg_id: &str) -> bool {
        self.ids.contains(msg_id)
    }

    fn insert(&mut self, msg_id: &str, memory: usize) {
        if self.ids.insert(msg_id.to_owned()) {
            self.order.push_back(msg_id.to_owned());
        }
        while self.order.len() > memory.max(1) {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
    }
}

/// One connection's state. Times are milliseconds on any clock that only moves forward
/// (the session uses Unix time, so a token's `exp` compares directly).
#[derive(Debug)]
pub struct Connection {
    limits: Limits,
    user: String,
    /// Every inbox entry at or below the cursor that this connection owes was written.
    cursor: EventId,
    replay: Replay,
    written: Written,
    answered: Answered,
    in_flight: usize,
    resume_tokens: u32,
    resume_refilled_ms: u64,
    token_expires_ms: Option<u64>,
    last_heard_ms: u64,
    next_ping_ms: u64,
    closed: bool,
    /// Deliveries not written because this connection wrote them already, not yet counted.
    duplicates: u64,
}

impl Connection {
    /// A connection for `user` whose inbox ends at `position`; `after` is the client's cursor
    /// from `?after=`. Returns the connection and its first actions: the `welcome` frame, and
    /// the replay when a cursor was given.
    #[must_use]
    pub fn open(
        limits: Limits,
        user: &str,
        position: EventId,
        after: Option<EventId>,
        token_expires_ms: Option<u64>,
        now_ms: u64,
    ) -> (Self, Vec<Action>) {
        let mut conn = Self {
            limits,
            user: user.to_owned(),
            cursor: after.unwrap_or(position),
            replay: Replay::Idle,
            written: Written::default(),
            answered: Answered::default(),
            in_flight: 0,
            resume_tokens: limits.resume_burst,
            resume_refilled_ms: now_ms,
            token_expires_ms,
            last_heard_ms: now_ms,
            next_ping_ms: now_ms.saturating_add(limits.ping_interval_ms),
            closed: false,
            duplicates: 0,
        };
        let mut actions = vec![Action::Write(ServerFrame::Welcome {
            position: position.to_string(),
        })];
        if let Some(after) = after {
            actions.push(conn.start_reading(after, true));
        }
        (conn, actions)
    }

    /// Brings the first ping `ahead_ms` closer (at most a whole interval: then it is due at
    /// once); later pings keep the interval. The session draws `ahead_ms` at random, so sockets
    /// opened together (a reconnect wave after a gateway restart, a load test) do not ping in the
    /// same second of every interval for as long as they stay.
    pub fn advance_first_ping(&mut self, ahead_ms: u64) {
        self.next_ping_ms = self
            .next_ping_ms
            .saturating_sub(ahead_ms.min(self.limits.ping_interval_ms));
    }

    /// The cursor: everything this connection owes at or below it was written.
    #[must_use]
    pub fn cursor(&self) -> EventId {
        self.cursor
    }

    /// Whether a replay is running.
    #[must_use]
    pub fn is_replaying(&self) -> bool {
        matches!(self.replay, Replay::Reading(_))
    }

    /// Messages waiting for their Kafka ack.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Deliveries skipped as already written since the last call (for the duplicates count).
    pub fn take_duplicates(&mut self) -> u64 {
        std::mem::take(&mut self.duplicates)
    }

    /// Whether the connection decided to close.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Any frame arrived from the peer (data, ping or pong): it is alive.
    pub fn on_heard(&mut self, now_ms: u64) {
        self.last_heard_ms = self.last_heard_ms.max(now_ms);
    }

    /// A text frame from the client.
    pub fn on_text(&mut self, text: &str, now_ms: u64) -> Vec<Action> {
        self.on_heard(now_ms);
        let frame = match ClientFrame::parse(text, self.limits.max_content_bytes) {
            Ok(f) => f,
            Err(e) => {
                let why = if e.code() == ErrorCode::TooLarge {
                    Refusal::TooLarge
                } else {
                    Refusal::Invalid
                };
                return vec![Action::Refuse(
                    ServerFrame::error(e.code(), e.to_string()),
                    why,
                )];
            }
        };
        match frame {
            ClientFrame::Ping => vec![Action::Write(ServerFrame::Pong)],
            ClientFrame::Resume { after } => match EventId::parse(&after) {
                Some(after) => self.on_resume(after, now_ms),
                None => vec![Action::Refuse(
                    ServerFrame::error(
                        ErrorCode::InvalidMessage,
                        "resume cursor is not an event id",
                    ),
                    Refusal::Invalid,
                )],
            },
            ClientFrame::Message {
                content,
                id,
                userid,
            } => {
                if userid.as_deref().is_some_and(|u| u != self.user) {
                    return vec![Action::Refuse(
                        error_for(
                            ErrorCode::InvalidMessage,
                            "userid does not match the connection",
                            id,
                            None,
                        ),
                        Refusal::Invalid,
                    )];
                }
                let msg_id = id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
                if self.in_flight >= self.limits.max_in_flight {
                    return vec![Action::Refuse(
                        error_for(
                            ErrorCode::RateLimited,
                            "too many messages waiting for their ack",
                            Some(msg_id),
                            Some(100),
                        ),
                        Refusal::TooManyInFlight,
                    )];
                }
                self.in_flight += 1;
                vec![Action::Publish { msg_id, content }]
            }
        }
    }

    /// A binary frame from the client: refused with an error, the socket stays open.
    pub fn on_binary(&mut self, now_ms: u64) -> Vec<Action> {
        self.on_heard(now_ms);
        vec![Action::Refuse(
            ServerFrame::error(
                ErrorCode::InvalidMessage,
                "binary frames are not supported; send JSON text",
            ),
            Refusal::Invalid,
        )]
    }

    /// How producing message `msg_id` ended: the one place an `ack` is produced.
    pub fn on_published(&mut self, msg_id: String, outcome: Published) -> Vec<Action> {
        self.in_flight = self.in_flight.saturating_sub(1);
        let action = match outcome {
            Published::Acked { trace_id } => Action::Write(ServerFrame::Ack {
                id: msg_id,
                trace_id,
            }),
            Published::RateLimited { retry_after_ms } => Action::Refuse(
                error_for(
                    ErrorCode::RateLimited,
                    "rate limit exceeded",
                    Some(msg_id),
                    Some(retry_after_ms),
                ),
                Refusal::RateLimited,
            ),
            Published::Unavailable => Action::Write(error_for(
                ErrorCode::Unavailable,
                "message not stored; resend it with the same id",
                Some(msg_id),
                Some(1_000),
            )),
        };
        vec![action]
    }

    fn on_resume(&mut self, after: EventId, now_ms: u64) -> Vec<Action> {
        self.refill_resumes(now_ms);
        if self.resume_tokens == 0 {
            let wait = self
                .limits
                .resume_refill_ms
                .saturating_sub(now_ms.saturating_sub(self.resume_refilled_ms))
                .max(1);
            return vec![Action::Refuse(
                error_for(
                    ErrorCode::RateLimited,
                    "too many resume frames",
                    None,
                    Some(wait),
                ),
                Refusal::TooManyResumes,
            )];
        }
        self.resume_tokens -= 1;
        match &mut self.replay {
            Replay::Reading(r) => {
                r.resume = Some(r.resume.map_or(after, |c| c.min(after)));
                r.report = true;
                Vec::new()
            }
            Replay::Idle => vec![self.start_reading(after, true)],
        }
    }

    fn refill_resumes(&mut self, now_ms: u64) {
        let every = self.limits.resume_refill_ms.max(1);
        let earned = now_ms.saturating_sub(self.resume_refilled_ms) / every;
        if earned > 0 {
            let tokens = u64::from(self.resume_tokens).saturating_add(earned);
            self.resume_tokens =
                u32::try_from(tokens.min(u64::from(self.limits.resume_burst))).unwrap_or(0);
            self.resume_refilled_ms += earned * every;
        }
        if self.resume_tokens == self.limits.resume_burst {
            self.resume_refilled_ms = now_ms;
        }
    }

    /// The connection may have missed live deliveries (the subscription broke, or its queue
    /// was full): replay from the cursor.
    pub fn on_gap(&mut self) -> Vec<Action> {
        match &mut self.replay {
            Replay::Reading(r) => {
                r.again = true;
                Vec::new()
            }
            Replay::Idle => vec![self.start_reading(self.cursor, false)],
        }
    }

    /// A delivery published on the user's channel.
    pub fn on_live(&mut self, d: Arc<Delivery>) -> Vec<Action> {
        let Some(id) = event_id(&d) else {
            // Deltas are ephemeral: written as they come.
            return vec![Action::Deliver(d)];
        };
        match &mut self.replay {
            Replay::Reading(r) => {
                if r.pending.len() < self.limits.max_pending {
                    r.pending.push(d);
                } else {
                    r.pending.clear();
                    r.again = true;
                }
                Vec::new()
            }
            Replay::Idle => {
                let mut out = Vec::new();
                self.write(d, id, &mut out);
                self.cursor = self.cursor.max(id);
                out
            }
        }
    }

    /// The result of the last [`Action::ReadInbox`]; `None` when reading failed.
    pub fn on_inbox(&mut self, page: Option<InboxPage>) -> Vec<Action> {
        let Replay::Reading(r) = &mut self.replay else {
            return Vec::new();
        };
        let Some(page) = page else {
            // Read the same page again, after a backoff the session applies.
            r.failures = r.failures.saturating_add(1);
            return vec![self.read_action()];
        };
        r.failures = 0;
        if let Some(trimmed) = page.trimmed {
            r.recovered &= !trimmed;
        }
        let mut end = r.after;
        let mut out = Vec::new();
        let mut to_write = Vec::with_capacity(page.entries.len());
        for d in page.entries {
            if let Some(id) = event_id(&d) {
                end = end.max(id);
                to_write.push((d, id));
            }
        }
        for (d, id) in to_write {
            self.write(d, id, &mut out);
        }
        let Replay::Reading(r) = &mut self.replay else {
            return out;
        };
        // More to read: the rest of this replay (`more`, or a gap while reading) from where the
        // page ends, and a `resume` that came meanwhile from its cursor; both from the lower.
        let unfinished = page.more || r.again;
        let resume = r.resume.take();
        let next = match (unfinished, resume) {
            (true, Some(c)) => Some(c.min(end)),
            (true, None) => Some(end),
            (false, resume) => resume,
        };
        if let Some(from) = next {
            r.after = from;
            r.checking = resume.is_some();
            r.again = false;
            out.push(self.read_action());
            return out;
        }
        let Replay::Reading(r) = std::mem::replace(&mut self.replay, Replay::Idle) else {
            return out;
        };
        self.cursor = self.cursor.max(end);
        let mut pending = r.pending;
        pending.sort_by_key(|d| event_id(d));
        for d in pending {
            if let Some(id) = event_id(&d) {
                self.write(d, id, &mut out);
                self.cursor = self.cursor.max(id);
            }
        }
        if r.report {
            out.push(Action::Write(ServerFrame::Resumed {
                recovered: r.recovered,
            }));
        }
        out
    }

    /// Time passes: pings, the idle timeout and token expiry.
    pub fn on_tick(&mut self, now_ms: u64) -> Vec<Action> {
        if self.closed {
            return Vec::new();
        }
        if self.token_expires_ms.is_some_and(|exp| now_ms >= exp) {
            self.closed = true;
            return vec![Action::Close {
                code: close::POLICY,
                reason: "token expired",
            }];
        }
        if now_ms.saturating_sub(self.last_heard_ms) >= self.limits.idle_timeout_ms {
            self.closed = true;
            return vec![Action::Close {
                code: close::GOING_AWAY,
                reason: "no answer to pings",
            }];
        }
        if now_ms >= self.next_ping_ms {
            self.next_ping_ms = now_ms.saturating_add(self.limits.ping_interval_ms);
            return vec![Action::Ping];
        }
        Vec::new()
    }

    fn start_reading(&mut self, after: EventId, report: bool) -> Action {
        self.replay = Replay::Reading(Reading::new(after, report));
        self.read_action()
    }

    fn read_action(&self) -> Action {
        let (after, check_trim, attempt) = match &self.replay {
            Replay::Reading(r) => (r.after, r.checking, r.failures),
            Replay::Idle => (self.cursor, false, 0),
        };
        Action::ReadInbox {
            after,
            limit: self.limits.replay_page,
            check_trim,
            attempt,
        }
    }

    fn write(&mut self, d: Arc<Delivery>, id: EventId, out: &mut Vec<Action>) {
        if self.written.contains(id) {
            self.duplicates += 1;
            return;
        }
        self.written.insert(id, self.limits.memory);
        // Only answers count: a failure followed by the answer to a retry shows both.
        if matches!(d.body, ResponseBody::Final { .. }) {
            if self.answered.contains(&d.msg_id) {
                // A second answer to a message this connection saw answered and did not ask
                // about again (a resend elsewhere, or after a gateway died mid-ack).
                self.duplicates += 1;
                return;
            }
            self.answered.insert(&d.msg_id, self.limits.memory);
        }
        out.push(Action::Deliver(d));
    }
}

fn event_id(d: &Delivery) -> Option<EventId> {
    d.event_id.as_deref().and_then(EventId::parse)
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

#[cfg(test)]
mod tests {
    use super::*;
    use colloquy_core::UserId;
    use proptest::prelude::*;

    const USER: &str = "alice";

    fn id(ms: u64) -> EventId {
        EventId { ms, seq: 0 }
    }

    fn answer(ms: u64) -> Arc<Delivery> {
        Arc::new(Delivery {
            event_id: Some(id(ms).to_string()),
            msg_id: format!("m{ms}"),
            userid: UserId::parse(USER).unwrap(),
            received_at_ms: 0,
            timestamp: String::new(),
            relayed_at_ms: 0,
            traceparent: None,
            body: ResponseBody::Final {
                content: format!("answer {ms}"),
                prompt_tokens: 1,
                completion_tokens: 1,
                whole: false,
            },
        })
    }

    fn delta(seq: u32) -> Arc<Delivery> {
        let mut d = (*answer(1)).clone();
        d.event_id = None;
        d.body = ResponseBody::Delta {
            seq,
            content: "tok".into(),
        };
        Arc::new(d)
    }

    fn page(ids: &[u64], more: bool, trimmed: Option<bool>) -> Option<InboxPage> {
        Some(InboxPage {
            entries: ids.iter().map(|&ms| answer(ms)).collect(),
            more,
            trimmed,
        })
    }

    fn delivered(actions: &[Action]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Deliver(d) => event_id(d).map(|e| e.ms),
                _ => None,
            })
            .collect()
    }

    fn reads(actions: &[Action]) -> Vec<(EventId, bool, u32)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::ReadInbox {
                    after,
                    check_trim,
                    attempt,
                    ..
                } => Some((*after, *check_trim, *attempt)),
                _ => None,
            })
            .collect()
    }

    fn resumed(actions: &[Action]) -> Option<bool> {
        actions.iter().find_map(|a| match a {
            Action::Write(ServerFrame::Resumed { recovered }) => Some(*recovered),
            _ => None,
        })
    }

    fn limits() -> Limits {
        Limits {
            replay_page: 3,
            max_pending: 4,
            ..Limits::default()
        }
    }

    fn open(position: u64, after: Option<u64>) -> (Connection, Vec<Action>) {
        Connection::open(limits(), USER, id(position), after.map(id), None, 0)
    }

    #[test]
    fn welcome_carries_the_position_and_no_replay_without_a_cursor() {
        let (conn, actions) = open(7, None);
        assert_eq!(
            actions,
            vec![Action::Write(ServerFrame::Welcome {
                position: "7-0".into()
            })]
        );
        assert_eq!(conn.cursor(), id(7));
        assert!(!conn.is_replaying());
    }

    #[test]
    fn a_cursor_in_the_url_replays_everything_after_it_then_says_resumed() {
        let (mut conn, actions) = open(9, Some(2));
        assert_eq!(reads(&actions), vec![(id(2), true, 0)]);
        // A live delivery during the replay waits for it.
        assert!(conn.on_live(answer(10)).is_empty());
        let out = conn.on_inbox(page(&[3, 4, 5], true, Some(false)));
        assert_eq!(delivered(&out), vec![3, 4, 5]);
        assert_eq!(reads(&out), vec![(id(5), false, 0)], "the next page");
        let out = conn.on_inbox(page(&[9, 10], false, None));
        assert_eq!(delivered(&out), vec![9, 10], "10 once, from the inbox");
        assert_eq!(resumed(&out), Some(true));
        assert_eq!(conn.cursor(), id(10));
        assert!(!conn.is_replaying());
    }

    #[test]
    fn a_trimmed_inbox_is_reported_as_not_recovered() {
        let (mut conn, _) = open(9, Some(2));
        let out = conn.on_inbox(page(&[8, 9], false, Some(true)));
        assert_eq!(delivered(&out), vec![8, 9]);
        assert_eq!(resumed(&out), Some(false));
    }

    #[test]
    fn a_resume_below_what_was_written_replays_the_rest_without_duplicates() {
        let (mut conn, _) = open(0, None);
        assert_eq!(delivered(&conn.on_live(answer(1))), vec![1]);
        assert_eq!(delivered(&conn.on_live(answer(3))), vec![3]);
        let out = conn.on_text(r#"{"type":"resume","after":"0-0"}"#, 1);
        assert_eq!(
            reads(&out),
            vec![(id(0), true, 0)],
            "a resume may lower the cursor"
        );
        let out = conn.on_inbox(page(&[1, 2, 3], false, Some(false)));
        assert_eq!(delivered(&out), vec![2], "1 and 3 were written already");
        assert_eq!(conn.take_duplicates(), 2);
        assert_eq!(conn.take_duplicates(), 0);
        assert_eq!(resumed(&out), Some(true));
        assert_eq!(conn.cursor(), id(3));
    }

    #[test]
    fn a_gap_replays_from_the_cursor_and_live_ones_wait_for_it() {
        let (mut conn, _) = open(4, None);
        assert_eq!(reads(&conn.on_gap()), vec![(id(4), false, 0)]);
        assert!(conn.on_gap().is_empty(), "one read at a time");
        assert!(conn.on_live(answer(7)).is_empty());
        // A second gap during the read: read again from where the page ends.
        let out = conn.on_inbox(page(&[5], false, None));
        assert_eq!(delivered(&out), vec![5]);
        assert_eq!(reads(&out), vec![(id(5), false, 0)]);
        let out = conn.on_inbox(page(&[6, 7], false, None));
        assert_eq!(delivered(&out), vec![6, 7]);
        assert_eq!(resumed(&out), None, "a resync is not a resume");
    }

    #[test]
    fn failed_reads_are_retried_with_growing_attempts() {
        let (mut conn, _) = open(4, Some(1));
        assert_eq!(reads(&conn.on_inbox(None)), vec![(id(1), true, 1)]);
        assert_eq!(reads(&conn.on_inbox(None)), vec![(id(1), true, 2)]);
        let out = conn.on_inbox(page(&[2], false, Some(false)));
        assert_eq!(delivered(&out), vec![2]);
        assert_eq!(resumed(&out), Some(true));
    }

    #[test]
    fn overflowing_live_deliveries_during_a_replay_read_again() {
        let (mut conn, _) = open(0, None);
        let _ = conn.on_gap();
        for ms in 1..=5 {
            assert!(conn.on_live(answer(ms)).is_empty());
        }
        let out = conn.on_inbox(page(&[1], false, None));
        assert_eq!(
            reads(&out),
            vec![(id(1), false, 0)],
            "read again after the overflow"
        );
        let out = conn.on_inbox(page(&[2, 3, 4, 5], false, None));
        assert_eq!(delivered(&out), vec![2, 3, 4, 5]);
    }

    #[test]
    fn deltas_are_written_at_once_even_during_a_replay() {
        let (mut conn, _) = open(0, Some(0));
        assert_eq!(conn.on_live(delta(0)).len(), 1);
    }

    #[test]
    fn resumes_are_rate_limited_per_connection() {
        let (mut conn, _) = open(5, None);
        let resume = r#"{"type":"resume","after":"1-0"}"#;
        let _ = conn.on_text(resume, 0);
        for _ in 1..limits().resume_burst {
            assert!(
                conn.on_text(resume, 0).is_empty(),
                "coalesced into the running replay"
            );
        }
        let refused = conn.on_text(resume, 0);
        assert!(
            matches!(
                &refused[..],
                [Action::Refuse(
                    ServerFrame::Error {
                        code: ErrorCode::RateLimited,
                        retry_after_ms: Some(_),
                        ..
                    },
                    Refusal::TooManyResumes
                )]
            ),
            "{refused:?}"
        );
        // The coalesced resumes finish the replay; a second later one more is allowed.
        let _ = conn.on_inbox(page(&[], false, Some(false)));
        let _ = conn.on_inbox(page(&[], false, Some(false)));
        assert!(!conn.is_replaying());
        assert_eq!(reads(&conn.on_text(resume, 1_000)).len(), 1);
    }

    #[test]
    fn messages_are_published_within_the_in_flight_limit_and_acked_once_each() {
        let mut l = limits();
        l.max_in_flight = 1;
        let (mut conn, _) = Connection::open(l, USER, id(0), None, None, 0);
        let out = conn.on_text(r#"{"type":"message","content":"hi","id":"a"}"#, 0);
        assert_eq!(
            out,
            vec![Action::Publish {
                msg_id: "a".into(),
                content: "hi".into()
            }]
        );
        let out = conn.on_text(r#"{"type":"message","content":"hi","id":"b"}"#, 0);
        assert!(matches!(
            &out[..],
            [Action::Refuse(_, Refusal::TooManyInFlight)]
        ));
        assert_eq!(conn.in_flight(), 1);
        let out = conn.on_published(
            "a".into(),
            Published::Acked {
                trace_id: "t".into(),
            },
        );
        assert_eq!(
            out,
            vec![Action::Write(ServerFrame::Ack {
                id: "a".into(),
                trace_id: "t".into()
            })]
        );
        assert_eq!(conn.in_flight(), 0);
        let out = conn.on_text(r#"{"type":"message","content":"hi","userid":"mallory"}"#, 0);
        assert!(matches!(&out[..], [Action::Refuse(_, Refusal::Invalid)]));
    }

    #[test]
    fn a_second_answer_to_one_message_is_not_shown_even_when_asked_again() {
        let (mut conn, _) = open(1, None);
        let first = answer(10);
        let mut again = (*answer(20)).clone();
        again.msg_id.clone_from(&first.msg_id);
        // The client resends the id (it never saw the ack) while the first answer replays.
        let text = format!(
            r#"{{"type":"message","content":"again","id":"{}"}}"#,
            first.msg_id
        );
        conn.on_text(&text, 2);
        assert_eq!(delivered(&conn.on_live(Arc::clone(&first))), vec![10]);
        assert!(delivered(&conn.on_live(Arc::new(again))).is_empty());
        assert_eq!(conn.take_duplicates(), 1);
        // A failure, then the answer to its retry: both are shown.
        let mut failed = (*answer(30)).clone();
        failed.msg_id = "retried".into();
        failed.body = ResponseBody::Failed {
            reason: "busy".into(),
        };
        let mut retried = (*answer(40)).clone();
        retried.msg_id = "retried".into();
        assert_eq!(delivered(&conn.on_live(Arc::new(failed))), vec![30]);
        assert_eq!(delivered(&conn.on_live(Arc::new(retried))), vec![40]);
    }

    #[test]
    fn bad_frames_get_errors_and_pings_get_pongs() {
        let (mut conn, _) = open(0, None);
        assert!(matches!(
            &conn.on_text("{", 0)[..],
            [Action::Refuse(_, Refusal::Invalid)]
        ));
        let big = format!(r#"{{"type":"message","content":"{}"}}"#, "x".repeat(20_000));
        assert!(matches!(
            &conn.on_text(&big, 0)[..],
            [Action::Refuse(_, Refusal::TooLarge)]
        ));
        assert_eq!(
            conn.on_text(r#"{"type":"ping"}"#, 0),
            vec![Action::Write(ServerFrame::Pong)]
        );
        assert!(matches!(
            &conn.on_binary(0)[..],
            [Action::Refuse(_, Refusal::Invalid)]
        ));
    }

    #[test]
    fn an_advanced_first_ping_comes_early_and_later_ones_keep_the_interval() {
        let l = limits();
        let (mut conn, _) = Connection::open(l, USER, id(0), None, None, 1_000);
        conn.advance_first_ping(l.ping_interval_ms - 3_000);
        assert!(conn.on_tick(3_999).is_empty());
        assert_eq!(conn.on_tick(4_000), vec![Action::Ping]);
        conn.on_heard(4_010);
        assert!(conn.on_tick(4_000 + l.ping_interval_ms - 1).is_empty());
        assert_eq!(conn.on_tick(4_000 + l.ping_interval_ms), vec![Action::Ping]);
        // More than an interval ahead is a ping at once, not one in the past forever.
        let (mut conn, _) = Connection::open(l, USER, id(0), None, None, 1_000);
        conn.advance_first_ping(10 * l.ping_interval_ms);
        assert_eq!(conn.on_tick(1_000), vec![Action::Ping]);
        assert!(conn.on_tick(1_001).is_empty());
    }

    #[test]
    fn ticks_ping_close_dead_peers_and_expired_tokens() {
        let l = limits();
        let (mut conn, _) = Connection::open(l, USER, id(0), None, Some(1_000_000), 0);
        assert!(conn.on_tick(1).is_empty());
        assert_eq!(conn.on_tick(l.ping_interval_ms), vec![Action::Ping]);
        conn.on_heard(l.ping_interval_ms + 10);
        assert!(conn.on_tick(l.ping_interval_ms + 20).is_empty());
        let silent = l.ping_interval_ms + 10 + l.idle_timeout_ms;
        assert_eq!(
            conn.on_tick(silent),
            vec![Action::Close {
                code: close::GOING_AWAY,
                reason: "no answer to pings"
            }]
        );
        assert!(conn.is_closed());
        let (mut conn, _) = Connection::open(l, USER, id(0), None, Some(5_000), 0);
        conn.on_heard(4_000);
        assert_eq!(
            conn.on_tick(5_000),
            vec![Action::Close {
                code: close::POLICY,
                reason: "token expired"
            }]
        );
    }

    /// One step of the world around a connection.
    #[derive(Clone, Debug)]
    enum Step {
        /// The relay stores and publishes an answer.
        Publish,
        /// The subscription breaks: live deliveries stop reaching the connection.
        Gap,
        /// The session picks up the resync request.
        PickUpGap,
        /// The session handles the next queued event.
        Process,
        /// The pending inbox read runs now (or fails).
        Read { fail: bool },
        /// The client resumes from one of the cursors it could hold (an index into them).
        Resume(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => Just(Step::Publish),
            1 => Just(Step::Gap),
            2 => Just(Step::PickUpGap),
            6 => Just(Step::Process),
            3 => Just(Step::Read { fail: false }),
            1 => Just(Step::Read { fail: true }),
            1 => (0usize..64).prop_map(Step::Resume),
        ]
    }

    enum Queued {
        Live(Arc<Delivery>),
        Inbox(Option<InboxPage>),
    }

    struct World {
        conn: Connection,
        inbox: Vec<u64>,
        next: u64,
        queue: VecDeque<Queued>,
        gap: bool,
        read: Option<(EventId, u64)>,
        written: Vec<u64>,
        position: EventId,
        lowest_cursor: EventId,
    }

    impl World {
        fn apply(&mut self, actions: Vec<Action>) {
            for a in actions {
                match a {
                    Action::Deliver(d) => {
                        let ms = event_id(&d).expect("answers have ids").ms;
                        assert!(
                            !self.written.contains(&ms),
                            "event {ms} written twice: {:?}",
                            self.written
                        );
                        self.written.push(ms);
                    }
                    Action::ReadInbox { after, limit, .. } => {
                        assert!(self.read.is_none(), "two inbox reads at once");
                        self.read = Some((after, limit));
                    }
                    _ => {}
                }
            }
        }

        fn step(&mut self, s: &Step) {
            match *s {
                Step::Publish => {
                    self.next += 1;
                    self.inbox.push(self.next);
                    if !self.gap {
                        self.queue.push_back(Queued::Live(answer(self.next)));
                    }
                }
                Step::Gap => self.gap = true,
                Step::PickUpGap => {
                    if self.gap {
                        self.gap = false;
                        let a = self.conn.on_gap();
                        self.apply(a);
                    }
                }
                Step::Process => {
                    let a = match self.queue.pop_front() {
                        Some(Queued::Live(d)) => self.conn.on_live(d),
                        Some(Queued::Inbox(p)) => self.conn.on_inbox(p),
                        None => Vec::new(),
                    };
                    self.apply(a);
                }
                Step::Read { fail } => {
                    if let Some((after, limit)) = self.read.take() {
                        let result = (!fail).then(|| {
                            let ids: Vec<u64> = self
                                .inbox
                                .iter()
                                .copied()
                                .filter(|&ms| id(ms) > after)
                                .collect();
                            // Like the real read: a full page says more may follow.
                            let taken: Vec<u64> = ids.into_iter().take(limit as usize).collect();
                            let more = taken.len() as u64 >= limit;
                            page(&taken, more, Some(false)).expect("page")
                        });
                        self.queue.push_back(Queued::Inbox(result));
                    }
                }
                Step::Resume(i) => {
                    // A client's cursor is always something it was given: `0-0`, the welcome
                    // position, or an event written to it.
                    let known: Vec<EventId> = [EventId::default(), self.position]
                        .into_iter()
                        .chain(self.written.iter().map(|&ms| id(ms)))
                        .collect();
                    let cursor = known[i % known.len()];
                    let text = format!(r#"{{"type":"resume","after":"{cursor}"}}"#);
                    let now = self.next * 1_000 + self.written.len() as u64;
                    let a = self.conn.on_text(&text, now);
                    // A refused resume (over its budget) promises nothing.
                    if !a.iter().any(|a| matches!(a, Action::Refuse(..))) {
                        self.lowest_cursor = self.lowest_cursor.min(cursor);
                    }
                    self.apply(a);
                }
            }
        }

        /// Lets everything in flight finish: every gap picked up, every queue drained, every
        /// read run (successfully).
        fn settle(&mut self) {
            for _ in 0..10_000 {
                if self.gap {
                    self.step(&Step::PickUpGap);
                } else if !self.queue.is_empty() {
                    self.step(&Step::Process);
                } else if self.read.is_some() {
                    self.step(&Step::Read { fail: false });
                } else {
                    return;
                }
            }
            panic!("the connection never settled");
        }
    }

    /// Any event, with arbitrary content: the stable stand-in for the cargo-fuzz target in
    /// `services/gateway/fuzz` (same events, same checks).
    #[derive(Clone, Debug)]
    enum Event {
        Text(String),
        Live(u64),
        Gap,
        Page(Vec<u64>, bool, Option<bool>),
        ReadFailed,
        Tick(u64),
        Published(u8),
    }

    fn event() -> impl Strategy<Value = Event> {
        let frame = prop_oneof![
            "\\PC{0,80}",
            (0u64..40, 0u64..3)
                .prop_map(|(ms, seq)| format!(r#"{{"type":"resume","after":"{ms}-{seq}"}}"#)),
            "\\PC{0,20}"
                .prop_map(|c| serde_json::json!({"type":"message","content":c}).to_string()),
            Just(r#"{"type":"ping"}"#.to_owned()),
        ];
        prop_oneof![
            frame.prop_map(Event::Text),
            (0u64..40).prop_map(Event::Live),
            Just(Event::Gap),
            (
                proptest::collection::vec(0u64..40, 0..6),
                any::<bool>(),
                proptest::option::of(any::<bool>())
            )
                .prop_map(|(ids, more, trimmed)| Event::Page(ids, more, trimmed)),
            Just(Event::ReadFailed),
            (0u64..100_000).prop_map(Event::Tick),
            any::<u8>().prop_map(Event::Published),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn any_events_never_panic_nor_write_an_id_twice(
            events in proptest::collection::vec(event(), 0..200),
        ) {
            let (mut conn, _) = Connection::open(limits(), USER, id(0), None, Some(u64::MAX), 0);
            let mut seen = HashSet::new();
            let mut now = 0;
            for e in events {
                let actions = match e {
                    Event::Text(t) => conn.on_text(&t, now),
                    Event::Live(ms) => conn.on_live(answer(ms)),
                    Event::Gap => conn.on_gap(),
                    Event::Page(ids, more, trimmed) => conn.on_inbox(page(&ids, more, trimmed)),
                    Event::ReadFailed => conn.on_inbox(None),
                    Event::Tick(dt) => { now += dt; conn.on_tick(now) }
                    Event::Published(n) => conn.on_published(format!("m{n}"), Published::Unavailable),
                };
                for ms in delivered(&actions) {
                    prop_assert!(seen.insert(ms), "event {} written twice", ms);
                }
                prop_assert!(conn.in_flight() <= limits().max_in_flight);
            }
        }

        #[test]
        fn each_event_is_written_once_and_none_the_inbox_held_is_skipped(
            history in 0u64..6,
            after in proptest::option::of(0u64..6),
            steps in proptest::collection::vec(step(), 0..120),
        ) {
            let inbox: Vec<u64> = (1..=history).collect();
            let position = history;
            let after = after.map(|a| a.min(history));
            let (conn, first) = Connection::open(limits(), USER, id(position), after.map(id), None, 0);
            let mut world = World {
                conn,
                inbox,
                next: history,
                queue: VecDeque::new(),
                gap: false,
                read: None,
                written: Vec::new(),
                position: id(position),
                lowest_cursor: id(after.unwrap_or(position)),
            };
            world.apply(first);
            for s in &steps {
                world.step(s);
            }
            world.settle();
            // Nothing twice (checked on every write), nothing the inbox held above the lowest
            // cursor the connection was given skipped.
            let owed: Vec<u64> = world.inbox.iter().copied().filter(|&ms| id(ms) > world.lowest_cursor).collect();
            for ms in &owed {
                prop_assert!(world.written.contains(ms), "event {} skipped; written {:?}", ms, world.written);
            }
            prop_assert!(!world.conn.is_replaying());
        }
    }
}
