//! The load generator: simulated users that behave like real clients, driven open-loop.
//!
//! **Open loop.** The run has one schedule of intended send times at a fixed total rate,
//! independent of answers: message `j` of user `u` (of `U` users, at `R` msg/s) is due at
//! `t0 + (j·U + u) / R`, so users take turns evenly. A message is written to its user's socket at
//! its intended time whatever is still outstanding (unless a `window` is set: then it waits, and
//! the wait counts). Latency is measured by the [`Checker`] from the intended time, so a system
//! that falls behind is charged for the whole delay (no coordinated omission). `rate = 0` is a
//! closed-loop throughput probe instead: each user sends as soon as its window allows, and the
//! latency then starts at the actual send.
//!
//! **Clients.** Every user holds one socket (set up before the schedule starts, so connecting is
//! not measured). On a close it reconnects with backoff through the next WebSocket base, resumes
//! from the last event id it saw (`0-0` before the first: each run's users are new, so their
//! whole inbox is this run's), and resends the messages that were never acked under the same id
//! (safe: the id is the idempotency key). Refusals (`rate_limited`, `unavailable`) are resent
//! after their `retry_after_ms`. Frames this client does not know (a `welcome`, a `resumed`) are
//! skipped. With [`Protocol::Original`] the client speaks only the original protocol (`message`
//! with a `userid`, no id, no resume) and matches answers by the question they quote.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use colloquy_core::wire::{ErrorCode, ServerFrame};

use crate::checker::{Checker, Interval, Latency, Report};
use crate::client::{Received, WsClient, fetch_token};

/// Which protocol the simulated clients speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Ids, acks, resume.
    Full,
    /// The original system's: `message` in, `response` out.
    Original,
}

/// What to run.
#[derive(Clone, Debug, clap::Args)]
pub struct LoadConfig {
    /// HTTP base of a gateway or nginx.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub http: String,
    /// WebSocket base; more than one (comma separated) spreads users across them.
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    pub ws: String,
    #[arg(long, default_value_t = 100)]
    pub users: usize,
    /// Messages per user.
    #[arg(long, default_value_t = 10)]
    pub messages: usize,
    /// Most messages a user keeps unanswered; 0 = no limit (pure open loop). A message due while
    /// the window is full waits, and its latency still starts at its intended time.
    #[arg(long, default_value_t = 0)]
    pub window: usize,
    /// Total offered rate (messages/s) of the open-loop schedule; 0 = closed loop (each user
    /// sends as soon as its window allows; latency then starts at the actual send).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    #[arg(long, value_enum, default_value_t = Protocol::Full)]
    pub protocol: Protocol,
    /// After the last intended send, give up waiting for answers after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
    /// Prefix of simulated user ids.
    #[arg(long, default_value = "load")]
    pub user_prefix: String,
    /// Bearer token presented to `POST /token`: gateways outside dev mode require their
    /// `AUTH_ADMIN_TOKEN`. Read from the environment so that it stays off the command line.
    #[arg(long, env = "AUTH_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

impl LoadConfig {
    /// Total messages of the run.
    #[must_use]
    pub fn total(&self) -> usize {
        self.users * self.messages
    }

    /// Messages per user so that the schedule lasts `secs` at the configured rate (at least 1).
    #[must_use]
    pub fn messages_for(&self, secs: f64) -> usize {
        ((self.rate * secs / self.users.max(1) as f64).ceil() as usize).max(1)
    }

    /// How long the schedule lasts (zero for a closed loop).
    #[must_use]
    pub fn schedule(&self) -> Duration {
        if self.rate > 0.0 {
            Duration::from_secs_f64(self.total() as f64 / self.rate)
        } else {
            Duration::ZERO
        }
    }
}

/// Figures of a run.
#[derive(Clone, Debug)]
pub struct LoadReport {
    /// The schedule's rate (0 for a closed loop).
    pub offered_rate: f64,
    pub users: usize,
    pub protocol: Protocol,
    /// Schedule start to the last answer (or the give-up).
    pub elapsed: Duration,
    /// Schedule start to the last intended send.
    pub schedule: Duration,
    /// Answers per second over the whole run.
    pub throughput: f64,
    /// Answers per second while the schedule was running (the rate the system kept up with);
    /// equal to `throughput` for a closed loop.
    pub sustained: f64,
    pub reconnects: u64,
    pub check: Report,
    /// One interval per second from the schedule's start.
    pub timeline: Vec<Interval>,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "offered={:.0} msg/s elapsed={:.2}s throughput={:.0} msg/s sustained={:.0} msg/s reconnects={} {}",
            self.offered_rate,
            self.elapsed.as_secs_f64(),
            self.throughput,
            self.sustained,
            self.reconnects,
            self.check
        )
    }
}

/// The JSON form of a [`LoadReport`].
#[derive(Serialize)]
struct LoadJson<'a> {
    offered_rate: f64,
    users: usize,
    protocol: Protocol,
    elapsed_s: f64,
    schedule_s: f64,
    throughput: f64,
    sustained: f64,
    reconnects: u64,
    sent: u64,
    acked: u64,
    answered: u64,
    llm_failed: u64,
    lost: u64,
    unacked_unanswered: u64,
    duplicated: u64,
    redelivered: u64,
    unexpected: u64,
    lost_sample: &'a [String],
    ack: Latency,
    answer: Latency,
    timeline: &'a [Interval],
}

impl LoadReport {
    /// The report as JSON (latencies in milliseconds, the timeline per second).
    #[must_use]
    pub fn to_json(&self) -> serde_json::Value {
        let c = &self.check;
        serde_json::to_value(LoadJson {
            offered_rate: self.offered_rate,
            users: self.users,
            protocol: self.protocol,
            elapsed_s: self.elapsed.as_secs_f64(),
            schedule_s: self.schedule.as_secs_f64(),
            throughput: self.throughput,
            sustained: self.sustained,
            reconnects: self.reconnects,
            sent: c.sent,
            acked: c.acked,
            answered: c.delivered,
            llm_failed: c.llm_failed,
            lost: c.lost,
            unacked_unanswered: c.unacked_undelivered,
            duplicated: c.duplicated,
            redelivered: c.redelivered,
            unexpected: c.unexpected,
            lost_sample: &c.lost_sample,
            ack: c.ack,
            answer: c.answer,
            timeline: &self.timeline,
        })
        .unwrap_or_default()
    }

    /// The summary and the per-second timeline as Markdown tables.
    #[must_use]
    pub fn table(&self) -> String {
        let c = &self.check;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| offered | answered/s (run) | answered/s (during schedule) | sent | acked | answered | lost | duplicated | unexpected | reconnects |"
        );
        let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let _ = writeln!(
            out,
            "| {:.0}/s | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} | {} |\n",
            self.offered_rate,
            self.throughput,
            self.sustained,
            c.sent,
            c.acked,
            c.delivered,
            c.lost,
            c.duplicated,
            c.unexpected,
            self.reconnects
        );
        let _ = writeln!(
            out,
            "| latency from intended send | count | p50 | p90 | p99 | p99.9 | max |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
        for (name, l) in [("ack", &c.ack), ("answer", &c.answer)] {
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} | {} | {} | {} |",
                l.count,
                fmt_ms(l.p50_ms),
                fmt_ms(l.p90_ms),
                fmt_ms(l.p99_ms),
                fmt_ms(l.p999_ms),
                fmt_ms(l.max_ms)
            );
        }
        let _ = writeln!(out);
        out.push_str(&timeline_table(&self.timeline));
        out
    }
}

/// A timeline as a Markdown table.
#[must_use]
pub fn timeline_table(rows: &[Interval]) -> String {
    let mut out = String::from(
        "| t (s) | offered | sent | acked | answered | answer p99 |\n|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {:.0} | {} | {} | {} | {} | {} |",
            r.start_s,
            r.offered,
            r.sent,
            r.acked,
            r.answered,
            if r.answered > 0 {
                fmt_ms(r.answer_p99_ms)
            } else {
                "–".into()
            }
        );
    }
    out
}

/// Milliseconds as `12.3 ms`, or seconds from 10 s on.
#[must_use]
pub fn fmt_ms(ms: f64) -> String {
    if ms >= 10_000.0 {
        format!("{:.1} s", ms / 1e3)
    } else if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

static CONN_IDS: AtomicU64 = AtomicU64::new(1);

/// How many users connect at once before the schedule starts.
const CONNECT_CONCURRENCY: usize = 64;

/// Runs the load to completion (or give-up) and reports.
pub async fn run(cfg: LoadConfig, checker: Arc<Checker>) -> LoadReport {
    run_observed(cfg, checker, |_| {}).await
}

/// Like [`run`], and calls `on_start` with the schedule's start once every user is connected
/// (a soak uses it to place its faults and its timeline).
pub async fn run_observed(
    cfg: LoadConfig,
    checker: Arc<Checker>,
    on_start: impl FnOnce(Instant),
) -> LoadReport {
    let http = token_client(cfg.admin_token.as_deref());
    let reconnects = Arc::new(AtomicU64::new(0));
    let ws_bases: Arc<[String]> = cfg.ws.split(',').map(str::to_owned).collect();
    let run_tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let users: Vec<String> = (0..cfg.users)
        .map(|u| format!("{}-{run_tag}-{u}", cfg.user_prefix))
        .collect();

    // Connect everyone first: the schedule measures the system, not the set-up.
    let connect_deadline = Instant::now() + Duration::from_secs(cfg.timeout_secs.max(10));
    let conns: Vec<Option<WsClient>> = futures::stream::iter(users.clone().into_iter().enumerate())
        .map(|(u, user)| {
            let (http, bases, base) = (http.clone(), Arc::clone(&ws_bases), cfg.http.clone());
            async move {
                let mut index = u;
                connect(
                    &http,
                    &base,
                    &bases,
                    &mut index,
                    &user,
                    None,
                    connect_deadline,
                )
                .await
                .ok()
            }
        })
        .buffered(CONNECT_CONCURRENCY)
        .collect()
        .await;

    let t0 = Instant::now() + Duration::from_millis(100);
    on_start(t0);
    let schedule = cfg.schedule();
    let deadline = t0 + schedule + Duration::from_secs(cfg.timeout_secs);
    let playing = Arc::new(AtomicUsize::new(cfg.users));
    let all_done = CancellationToken::new();
    let mut tasks = Vec::with_capacity(cfg.users);
    for (u, (user, conn)) in users.into_iter().zip(conns).enumerate() {
        let timing = (cfg.rate > 0.0).then(|| Timing {
            t0,
            offset: Duration::from_secs_f64(u as f64 / cfg.rate),
            period: Duration::from_secs_f64(cfg.users as f64 / cfg.rate),
        });
        let sim = UserSim {
            http: http.clone(),
            http_base: cfg.http.clone(),
            ws_bases: Arc::clone(&ws_bases),
            base_index: u,
            outbox: Outbox::new(cfg.messages, cfg.window, timing),
            user,
            protocol: cfg.protocol,
            checker: Arc::clone(&checker),
            reconnects: Arc::clone(&reconnects),
            deadline,
            playing: Arc::clone(&playing),
            all_done: all_done.clone(),
        };
        tasks.push(tokio::spawn(sim.run(conn)));
    }
    let mut open = Vec::with_capacity(cfg.users);
    for t in tasks {
        if let Ok(Some(conn)) = t.await {
            open.push(conn);
        }
    }
    let elapsed = t0.elapsed();
    let check = checker.report();
    let timeline = checker.timeline(t0, Duration::from_secs(1));
    // Users hang up only once every user is done: a user who finished early stayed connected
    // like an idle one (`UserSim::linger`), so the schedule's last second is not also a storm
    // of disconnects.
    futures::stream::iter(open)
        .for_each_concurrent(CONNECT_CONCURRENCY, WsClient::close)
        .await;
    let throughput = check.delivered as f64 / elapsed.as_secs_f64().max(1e-9);
    let sustained = sustained_rate(&timeline, schedule).unwrap_or(throughput);
    LoadReport {
        offered_rate: cfg.rate,
        users: cfg.users,
        protocol: cfg.protocol,
        elapsed,
        schedule,
        throughput,
        sustained,
        reconnects: reconnects.load(Ordering::Relaxed),
        check,
        timeline,
    }
}

/// Answers per second over the whole seconds of the schedule (`None` when it is under a second).
fn sustained_rate(timeline: &[Interval], schedule: Duration) -> Option<f64> {
    let whole = schedule.as_secs() as usize;
    (whole > 0)
        .then(|| timeline.iter().take(whole).map(|r| r.answered).sum::<u64>() as f64 / whole as f64)
}

/// The HTTP client of `POST /token`: it presents `admin_token` as a bearer token on every request.
fn token_client(admin_token: Option<&str>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = admin_token.filter(|t| !t.is_empty()) {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .expect("the admin token is a valid header value");
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("a default HTTP client")
}

/// Gets a token and opens a socket, retrying with backoff (moving to the next base, as a client
/// behind a balancer would) until `deadline`.
async fn connect(
    http: &reqwest::Client,
    http_base: &str,
    ws_bases: &[String],
    base_index: &mut usize,
    user: &str,
    after: Option<&str>,
    deadline: Instant,
) -> anyhow::Result<WsClient> {
    let mut delay = Duration::from_millis(50);
    loop {
        let attempt = async {
            let token = fetch_token(http, http_base, user).await?;
            let base = &ws_bases[*base_index % ws_bases.len()];
            WsClient::connect(base, user, &token, after).await
        };
        match attempt.await {
            Ok(c) => return Ok(c),
            Err(e) => {
                if Instant::now() > deadline {
                    return Err(e).context("could not connect before the deadline");
                }
                *base_index += 1;
                // Full jitter, so that a thousand clients cut off at once do not come back at once.
                tokio::time::sleep(delay.mul_f64(0.5 + rand::random::<f64>() / 2.0)).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// When a user's messages are due: message `j` at `t0 + offset + j·period`.
#[derive(Clone, Copy, Debug)]
struct Timing {
    t0: Instant,
    offset: Duration,
    period: Duration,
}

impl Timing {
    fn intended(&self, j: usize) -> Instant {
        self.t0 + self.offset + self.period.mul_f64(j as f64)
    }
}

/// A message to write now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Due {
    n: usize,
    /// Its intended send time.
    intended: Instant,
    /// Never sent before (a resend keeps its first times).
    first: bool,
}

/// One user's messages: which are due, unanswered (acked or not), refused or answered. No I/O:
/// the user's task asks it what to send and tells it what the server said.
#[derive(Debug)]
struct Outbox {
    total: usize,
    /// 0 = no limit.
    window: usize,
    /// `None`: closed loop.
    timing: Option<Timing>,
    /// The next message never sent.
    next: usize,
    /// Sent and unanswered: acked?
    in_flight: BTreeMap<usize, bool>,
    /// To send again, not before a time, in order.
    resend: VecDeque<(usize, Instant)>,
    answered: HashSet<usize>,
}

impl Outbox {
    fn new(total: usize, window: usize, timing: Option<Timing>) -> Self {
        Self {
            total,
            window,
            timing,
            next: 0,
            in_flight: BTreeMap::new(),
            resend: VecDeque::new(),
            answered: HashSet::new(),
        }
    }

    fn window_open(&self) -> bool {
        self.window == 0 || self.in_flight.len() + self.resend.len() < self.window
    }

    /// The next message to write at `now`, if any: resends first, then the schedule.
    fn due(&self, now: Instant) -> Option<Due> {
        if let Some(&(n, at)) = self.resend.iter().find(|(_, at)| *at <= now) {
            return Some(Due {
                n,
                intended: at,
                first: false,
            });
        }
        if self.next >= self.total || !self.window_open() {
            return None;
        }
        let intended = self.timing.map_or(now, |t| t.intended(self.next));
        (intended <= now).then_some(Due {
            n: self.next,
            intended,
            first: true,
        })
    }

    /// `due` was written to the socket.
    fn sent(&mut self, due: Due) {
        if due.first {
            self.next += 1;
        } else {
            self.resend.retain(|(m, _)| *m != due.n);
        }
        self.in_flight.insert(due.n, false);
    }

    fn acked(&mut self, n: usize) {
        if let Some(acked) = self.in_flight.get_mut(&n) {
            *acked = true;
        }
    }

    /// Its answer arrived; `true` the first time.
    fn answered(&mut self, n: usize) -> bool {
        self.in_flight.remove(&n);
        self.resend.retain(|(m, _)| *m != n);
        n < self.total && self.answered.insert(n)
    }

    /// The server refused it (not stored): send it again at `at`.
    fn refused(&mut self, n: usize, at: Instant) {
        if self.in_flight.remove(&n).is_some() {
            self.resend.push_back((n, at));
        }
    }

    /// A new connection: what was never acked may not be in Kafka; send it again now (acked
    /// ones come back through the resume).
    fn reconnected(&mut self, now: Instant) {
        let unacked: Vec<usize> = self
            .in_flight
            .iter()
            .filter(|(_, acked)| !**acked)
            .map(|(n, _)| *n)
            .collect();
        for n in unacked {
            self.in_flight.remove(&n);
            self.resend.push_back((n, now));
        }
    }

    /// When something next becomes due (`None`: only answers are awaited).
    fn next_wake(&self) -> Option<Instant> {
        let resend = self.resend.iter().map(|(_, at)| *at).min();
        let scheduled = (self.next < self.total && self.window_open()).then(|| {
            self.timing
                .map_or_else(Instant::now, |t| t.intended(self.next))
        });
        resend.into_iter().chain(scheduled).min()
    }

    fn finished(&self) -> bool {
        self.answered.len() >= self.total
    }
}

struct UserSim {
    http: reqwest::Client,
    http_base: String,
    ws_bases: Arc<[String]>,
    base_index: usize,
    user: String,
    outbox: Outbox,
    protocol: Protocol,
    checker: Arc<Checker>,
    reconnects: Arc<AtomicU64>,
    deadline: Instant,
    /// Users still playing their schedule; the last one to finish cancels `all_done`.
    playing: Arc<AtomicUsize>,
    all_done: CancellationToken,
}

impl UserSim {
    fn msg_id(&self, n: usize) -> String {
        format!("{}-m{n}", self.user)
    }

    fn content(&self, n: usize) -> String {
        format!("question {n} from {}", self.user)
    }

    /// Plays this user's schedule, then stays connected until every user is done (see
    /// [`UserSim::linger`]); returns its connection, still open, when it has one.
    async fn run(mut self, first: Option<WsClient>) -> Option<WsClient> {
        let mut conn_id = CONN_IDS.fetch_add(1, Ordering::Relaxed);
        // The newest event id this user saw: where a new connection resumes.
        let mut cursor: Option<String> = None;
        let conn = self.play(first, &mut conn_id, &mut cursor).await;
        if self.playing.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.all_done.cancel();
        }
        self.linger(conn?, conn_id, &mut cursor).await
    }

    /// Done with its schedule, a user stays connected like an idle one, reading: its WebSocket
    /// library answers the gateway's pings (unread, they would go unanswered and the gateway
    /// would close the socket as silent), and a frame that still comes (a duplicate) is booked.
    /// Until every user is done, or the run's deadline; `None` when the gateway closed it.
    async fn linger(
        &mut self,
        mut conn: WsClient,
        conn_id: u64,
        cursor: &mut Option<String>,
    ) -> Option<WsClient> {
        let all_done = self.all_done.clone();
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            let received = tokio::select! {
                () = all_done.cancelled() => None,
                received = conn.recv(left) => Some(received),
            };
            match received {
                None => return Some(conn),
                Some(Ok(Received::Frame(frame))) => self.on_frame(frame, conn_id, cursor),
                Some(Ok(Received::Closed { .. })) => return None,
                Some(Err(_)) if Instant::now() >= self.deadline => return Some(conn),
                // A frame this client does not know: carry on.
                Some(Err(_)) => {}
            }
        }
    }

    /// Plays this user's schedule (until it is done or the run's deadline); returns the
    /// connection it ends with, if any.
    async fn play(
        &mut self,
        first: Option<WsClient>,
        conn_id: &mut u64,
        cursor: &mut Option<String>,
    ) -> Option<WsClient> {
        let mut conn = first;
        while !self.outbox.finished() && Instant::now() < self.deadline {
            let Some(c) = conn.as_mut() else {
                // Before any answer, everything in this fresh user's inbox is this run's.
                let after = cursor.clone().unwrap_or_else(|| "0-0".into());
                let resumed = match self.protocol {
                    Protocol::Full => Some(after.as_str()),
                    Protocol::Original => None,
                };
                match connect(
                    &self.http,
                    &self.http_base,
                    &self.ws_bases,
                    &mut self.base_index,
                    &self.user,
                    resumed,
                    self.deadline,
                )
                .await
                {
                    Ok(c) => {
                        conn = Some(c);
                        *conn_id = CONN_IDS.fetch_add(1, Ordering::Relaxed);
                        if self.protocol == Protocol::Full {
                            self.outbox.reconnected(Instant::now());
                        }
                    }
                    Err(_) => return None,
                }
                continue;
            };
            let mut broken = false;
            while let Some(due) = self.outbox.due(Instant::now()) {
                if self.send(c, due.n).await.is_err() {
                    broken = true;
                    break;
                }
                if due.first {
                    self.checker
                        .sent_at(&self.user, &self.msg_id(due.n), due.intended);
                }
                self.outbox.sent(due);
            }
            if broken {
                self.reconnects.fetch_add(1, Ordering::Relaxed);
                conn = None;
                continue;
            }
            let wake = self
                .outbox
                .next_wake()
                .map_or(self.deadline, |w| w.min(self.deadline));
            let wait = wake
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            match c.recv(wait).await {
                Ok(Received::Frame(frame)) => self.on_frame(frame, *conn_id, cursor),
                Ok(Received::Closed { .. }) => {
                    self.reconnects.fetch_add(1, Ordering::Relaxed);
                    conn = None;
                }
                // Time to send, or a frame this client does not know: carry on either way.
                Err(_) => {}
            }
        }
        conn
    }

    async fn send(&self, conn: &mut WsClient, n: usize) -> anyhow::Result<()> {
        match self.protocol {
            Protocol::Full => conn.send_message(&self.msg_id(n), &self.content(n)).await,
            Protocol::Original => {
                let frame = serde_json::json!({"type": "message", "content": self.content(n), "userid": self.user});
                conn.send_raw(&frame.to_string()).await
            }
        }
    }

    /// Books what this frame says about the message it names, if anything.
    fn on_frame(&mut self, frame: ServerFrame, conn_id: u64, cursor: &mut Option<String>) {
        match frame {
            ServerFrame::Ack { id, .. } => {
                if let Some(n) = self.number_of(&id) {
                    self.checker.acked(&id);
                    self.outbox.acked(n);
                }
            }
            ServerFrame::Response {
                id,
                event_id,
                content,
                ..
            } => {
                *cursor = Some(event_id);
                let n = match self.protocol {
                    Protocol::Full => self.number_of(&id),
                    Protocol::Original => number_in_answer(&content),
                };
                if let Some(n) = n {
                    let key = self.msg_id(n);
                    if self.protocol == Protocol::Original {
                        // The original protocol has no acks: a response is the only receipt.
                        self.checker.acked(&key);
                    }
                    self.checker.delivered(&self.user, conn_id, &key, false);
                    self.outbox.answered(n);
                }
            }
            ServerFrame::Error {
                code: ErrorCode::LlmFailed,
                id: Some(id),
                event_id,
                ..
            } => {
                if let Some(e) = event_id {
                    *cursor = Some(e);
                }
                if let Some(n) = self.number_of(&id) {
                    self.checker.delivered(&self.user, conn_id, &id, true);
                    self.outbox.answered(n);
                }
            }
            ServerFrame::Error {
                code: ErrorCode::RateLimited | ErrorCode::Unavailable,
                id: Some(id),
                retry_after_ms,
                ..
            } => {
                if let Some(n) = self.number_of(&id) {
                    let after = Duration::from_millis(retry_after_ms.unwrap_or(500));
                    self.outbox.refused(n, Instant::now() + after);
                }
            }
            _ => {}
        }
    }

    fn number_of(&self, id: &str) -> Option<usize> {
        id.strip_prefix(&self.user)?
            .strip_prefix("-m")?
            .parse()
            .ok()
    }
}

/// The message number an answer quotes (`question N from …`), for the original protocol.
fn number_in_answer(content: &str) -> Option<usize> {
    let at = content.find("question ")? + "question ".len();
    let digits: String = content[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// A ramp: the same load at rising rates, to find the knee.
#[derive(Clone, Debug)]
pub struct RampConfig {
    /// Offered rates to try, in order.
    pub rates: Vec<f64>,
    /// Length of each step's schedule.
    pub step: Duration,
    /// A step passes when its answer p99 stays at or under this (and nothing was lost or left
    /// unanswered).
    pub p99_bound_ms: f64,
}

/// What a ramp found.
#[derive(Clone, Debug)]
pub struct RampReport {
    pub steps: Vec<LoadReport>,
    pub p99_bound_ms: f64,
    /// The highest offered rate that passed before the first that did not.
    pub knee: Option<f64>,
}

impl RampReport {
    fn passes(step: &LoadReport, bound_ms: f64) -> bool {
        let c = &step.check;
        c.is_clean() && c.delivered == c.sent && c.answer.p99_ms <= bound_ms
    }

    /// One line per step, and the knee.
    #[must_use]
    pub fn table(&self) -> String {
        let mut out = String::from(
            "| offered | answered/s (during schedule) | answered | lost | ack p99 | answer p50 | p90 | p99 | p99.9 | max | p99 ≤ bound |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
        );
        for s in &self.steps {
            let c = &s.check;
            let _ = writeln!(
                out,
                "| {:.0}/s | {:.0} | {}/{} | {} | {} | {} | {} | {} | {} | {} | {} |",
                s.offered_rate,
                s.sustained,
                c.delivered,
                c.sent,
                c.lost,
                fmt_ms(c.ack.p99_ms),
                fmt_ms(c.answer.p50_ms),
                fmt_ms(c.answer.p90_ms),
                fmt_ms(c.answer.p99_ms),
                fmt_ms(c.answer.p999_ms),
                fmt_ms(c.answer.max_ms),
                if Self::passes(s, self.p99_bound_ms) {
                    "yes"
                } else {
                    "no"
                }
            );
        }
        let _ = writeln!(
            out,
            "\nknee (highest offered rate with answer p99 ≤ {}): {}",
            fmt_ms(self.p99_bound_ms),
            self.knee
                .map_or_else(|| "none".to_owned(), |k| format!("{k:.0} msg/s"))
        );
        out
    }

    #[must_use]
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "p99_bound_ms": self.p99_bound_ms,
            "knee": self.knee,
            "steps": self.steps.iter().map(LoadReport::to_json).collect::<Vec<_>>(),
        })
    }
}

/// Runs `base` at each of `ramp.rates` in turn (fresh users and checker each step, the same
/// users count, messages per user set by the step length) and stops at the first step that
/// misses the bound.
pub async fn ramp(base: &LoadConfig, ramp: &RampConfig) -> RampReport {
    let mut steps = Vec::new();
    let mut knee = None;
    for &rate in &ramp.rates {
        let mut cfg = base.clone();
        cfg.rate = rate;
        cfg.messages = cfg.messages_for(ramp.step.as_secs_f64());
        cfg.user_prefix = format!("{}-r{rate:.0}", base.user_prefix);
        let report = run(cfg, Arc::new(Checker::default())).await;
        tracing::info!(%report, "ramp step");
        let passed = RampReport::passes(&report, ramp.p99_bound_ms);
        steps.push(report);
        if !passed {
            break;
        }
        knee = Some(rate);
    }
    RampReport {
        steps,
        p99_bound_ms: ramp.p99_bound_ms,
        knee,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pongs that came back, and the server's socket, still open.
    type PingingServer = tokio::task::JoinHandle<(
        usize,
        tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    )>;

    /// A WebSocket server for one client: it pings every 50 ms for `for_how_long`, then returns
    /// how many pongs came back, and the socket, still open.
    async fn pinging_server(for_how_long: Duration) -> (u16, PingingServer) {
        use futures::SinkExt as _;
        use tokio_tungstenite::tungstenite::Message;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut ws = tokio_tungstenite::accept_async(tcp)
                .await
                .expect("handshake");
            let end = tokio::time::Instant::now() + for_how_long;
            let mut ping = tokio::time::interval(Duration::from_millis(50));
            let mut pongs = 0;
            loop {
                tokio::select! {
                    _ = ping.tick() => {
                        if tokio::time::Instant::now() >= end {
                            break;
                        }
                        ws.send(Message::Ping(Vec::new().into())).await.expect("ping");
                    }
                    m = ws.next() => match m {
                        Some(Ok(Message::Pong(_))) => pongs += 1,
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => break,
                    },
                }
            }
            (pongs, ws)
        });
        (port, server)
    }

    fn user(playing: usize, deadline: Instant) -> UserSim {
        UserSim {
            http: reqwest::Client::new(),
            http_base: String::new(),
            ws_bases: Arc::from(Vec::<String>::new()),
            base_index: 0,
            user: "early".into(),
            outbox: Outbox::new(0, 0, None),
            protocol: Protocol::Full,
            checker: Arc::new(Checker::default()),
            reconnects: Arc::new(AtomicU64::new(0)),
            deadline,
            playing: Arc::new(AtomicUsize::new(playing)),
            all_done: CancellationToken::new(),
        }
    }

    /// `user`'s socket to a [`pinging_server`] that pings it `for_how_long`.
    async fn connected_to_pinging_server(
        user: &str,
        for_how_long: Duration,
    ) -> (WsClient, PingingServer) {
        let (port, server) = pinging_server(for_how_long).await;
        let conn = WsClient::connect(&format!("ws://127.0.0.1:{port}"), user, "t", None)
            .await
            .expect("connect");
        (conn, server)
    }

    #[tokio::test]
    async fn a_user_done_early_answers_pings_until_every_user_is_done() {
        let (conn, server) = connected_to_pinging_server("early", Duration::from_millis(600)).await;
        // Another user is still playing: this one's schedule (empty) is done at once.
        let sim = user(2, Instant::now() + Duration::from_secs(30));
        let (playing, all_done) = (Arc::clone(&sim.playing), sim.all_done.clone());
        let lingering = tokio::spawn(sim.run(Some(conn)));
        let (pongs, _open) = server.await.expect("server");
        assert!(
            pongs >= 5,
            "only {pongs} of ~11 pings answered while waiting"
        );
        assert_eq!(playing.load(Ordering::Acquire), 1);
        assert!(
            !lingering.is_finished(),
            "hung up before the others were done"
        );
        // The last user finishes: everyone hangs up.
        all_done.cancel();
        let conn = tokio::time::timeout(Duration::from_secs(5), lingering)
            .await
            .expect("hangs up once all are done")
            .expect("no panic");
        assert!(conn.is_some(), "the connection comes back to be closed");
    }

    #[tokio::test]
    async fn the_last_user_to_finish_releases_everyone() {
        let (conn, server) = connected_to_pinging_server("last", Duration::from_millis(100)).await;
        let sim = user(1, Instant::now() + Duration::from_secs(30));
        let all_done = sim.all_done.clone();
        let conn = tokio::time::timeout(Duration::from_secs(5), sim.run(Some(conn)))
            .await
            .expect("the last user does not wait for itself");
        assert!(all_done.is_cancelled());
        assert!(conn.is_some());
        drop(server);
    }

    fn timing(t0: Instant) -> Timing {
        // 4 users at 40 msg/s: this user every 100 ms, 10 ms after t0.
        Timing {
            t0,
            offset: Duration::from_millis(10),
            period: Duration::from_millis(100),
        }
    }

    #[test]
    fn messages_fall_due_on_the_schedule_whatever_is_outstanding() {
        let t0 = Instant::now();
        let mut o = Outbox::new(3, 0, Some(timing(t0)));
        assert_eq!(o.due(t0), None);
        assert_eq!(o.next_wake(), Some(t0 + Duration::from_millis(10)));
        let late = t0 + Duration::from_millis(150);
        // Two are due by now: both go out, each with its own intended time, none answered.
        let a = o.due(late).unwrap();
        assert_eq!(
            (a.n, a.intended, a.first),
            (0, t0 + Duration::from_millis(10), true)
        );
        o.sent(a);
        let b = o.due(late).unwrap();
        assert_eq!((b.n, b.intended), (1, t0 + Duration::from_millis(110)));
        o.sent(b);
        assert_eq!(o.due(late), None);
        assert_eq!(o.next_wake(), Some(t0 + Duration::from_millis(210)));
    }

    #[test]
    fn a_full_window_holds_the_next_message_until_an_answer() {
        let t0 = Instant::now();
        let mut o = Outbox::new(3, 1, Some(timing(t0)));
        let late = t0 + Duration::from_secs(1);
        let a = o.due(late).unwrap();
        o.sent(a);
        assert_eq!(o.due(late), None);
        assert_eq!(o.next_wake(), None);
        assert!(o.answered(0));
        let b = o.due(late).unwrap();
        // Still charged from its intended time, not from when the window opened.
        assert_eq!((b.n, b.intended), (1, t0 + Duration::from_millis(110)));
    }

    #[test]
    fn a_reconnect_resends_only_unacked_messages_and_refusals_wait_their_turn() {
        let t0 = Instant::now();
        let mut o = Outbox::new(3, 0, Some(timing(t0)));
        let late = t0 + Duration::from_secs(1);
        for _ in 0..3 {
            let d = o.due(late).unwrap();
            o.sent(d);
        }
        o.acked(0);
        o.refused(2, late + Duration::from_millis(100));
        o.reconnected(late);
        // 1 was never acked: again now. 0 was acked: the resume brings its answer.
        let again = o.due(late).unwrap();
        assert_eq!((again.n, again.first), (1, false));
        o.sent(again);
        assert_eq!(o.due(late), None);
        assert_eq!(o.next_wake(), Some(late + Duration::from_millis(100)));
        assert!(o.answered(0) && o.answered(1) && !o.answered(1));
        assert!(!o.finished());
        let d = o.due(late + Duration::from_millis(100)).unwrap();
        assert_eq!((d.n, d.first), (2, false));
        o.sent(d);
        assert!(o.answered(2));
        assert!(o.finished());
    }

    #[test]
    fn closed_loop_sends_when_the_window_allows() {
        let mut o = Outbox::new(2, 1, None);
        let now = Instant::now();
        let d = o.due(now).unwrap();
        assert_eq!((d.n, d.intended), (0, now));
        o.sent(d);
        assert_eq!(o.due(now), None);
        o.answered(0);
        assert_eq!(o.due(now).map(|d| d.n), Some(1));
    }

    #[test]
    fn sustained_rate_counts_answers_during_the_schedule_only() {
        let rows: Vec<Interval> = [10, 20, 90]
            .iter()
            .enumerate()
            .map(|(i, n)| Interval {
                start_s: i as f64,
                answered: *n,
                ..Interval::default()
            })
            .collect();
        assert_eq!(sustained_rate(&rows, Duration::from_secs(2)), Some(15.0));
        assert_eq!(sustained_rate(&rows, Duration::from_millis(500)), None);
    }

    #[test]
    fn the_original_protocol_finds_the_question_an_answer_quotes() {
        assert_eq!(
            number_in_answer("You said: question 42 from load-1"),
            Some(42)
        );
        assert_eq!(number_in_answer("no number here"), None);
    }
}
