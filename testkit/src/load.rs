//! The load generator: simulated users that behave like real clients.
//!
//! Each user holds one socket and keeps up to `window` messages outstanding; on a close it
//! reconnects with backoff, resumes from the last event id it saw, and resends messages that
//! were never acked (same id: safe). Every send, ack and delivery goes to the [`Checker`].
//! With [`Protocol::Original`] the client speaks only the original protocol (`message` with a
//! `userid`, no id, no resume) and matches answers by the question they quote.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

use colloquy_core::wire::{ErrorCode, ServerFrame};

use crate::checker::{Checker, Report};
use crate::client::{Received, WsClient, fetch_token};

/// Which protocol the simulated clients speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
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
    #[arg(long, default_value_t = 10)]
    pub messages: usize,
    /// Messages each user keeps outstanding.
    #[arg(long, default_value_t = 1)]
    pub window: usize,
    /// Total offered rate (messages/s); 0 = as fast as the windows allow.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    #[arg(long, value_enum, default_value_t = Protocol::Full)]
    pub protocol: Protocol,
    /// Give up waiting for answers after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
    /// Prefix of simulated user ids.
    #[arg(long, default_value = "load")]
    pub user_prefix: String,
}

/// Throughput figures of a run.
#[derive(Clone, Debug)]
pub struct LoadReport {
    pub elapsed: Duration,
    pub throughput: f64,
    pub reconnects: u64,
    pub check: Report,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "elapsed={:.2}s throughput={:.0} msg/s reconnects={} {}",
            self.elapsed.as_secs_f64(),
            self.throughput,
            self.reconnects,
            self.check
        )
    }
}

static CONN_IDS: AtomicU64 = AtomicU64::new(1);

/// Runs the load to completion (or timeout) and reports.
pub async fn run(cfg: LoadConfig, checker: Arc<Checker>) -> LoadReport {
    let http = reqwest::Client::new();
    let reconnects = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(cfg.timeout_secs);
    let ws_bases: Vec<String> = cfg.ws.split(',').map(str::to_owned).collect();
    let per_user_interval =
        (cfg.rate > 0.0).then(|| Duration::from_secs_f64(cfg.users as f64 / cfg.rate));
    let mut tasks = Vec::with_capacity(cfg.users);
    let run_tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    for u in 0..cfg.users {
        let user = format!("{}-{run_tag}-{u}", cfg.user_prefix);
        let sim = UserSim {
            http: http.clone(),
            http_base: cfg.http.clone(),
            ws_bases: ws_bases.clone(),
            base_index: u,
            user,
            messages: cfg.messages,
            window: cfg.window.max(1),
            interval: per_user_interval,
            protocol: cfg.protocol,
            checker: Arc::clone(&checker),
            reconnects: Arc::clone(&reconnects),
            deadline,
        };
        tasks.push(tokio::spawn(async move { sim.run().await }));
        // Stagger connection set-up a little.
        if u % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = started.elapsed();
    let check = checker.report();
    LoadReport {
        elapsed,
        throughput: check.delivered as f64 / elapsed.as_secs_f64().max(1e-9),
        reconnects: reconnects.load(Ordering::Relaxed),
        check,
    }
}

enum Event {
    Answered(usize),
    Refused(usize, Duration),
}

struct UserSim {
    http: reqwest::Client,
    http_base: String,
    ws_bases: Vec<String>,
    base_index: usize,
    user: String,
    messages: usize,
    window: usize,
    interval: Option<Duration>,
    protocol: Protocol,
    checker: Arc<Checker>,
    reconnects: Arc<AtomicU64>,
    deadline: Instant,
}

impl UserSim {
    fn msg_id(&self, n: usize) -> String {
        format!("{}-m{n}", self.user)
    }

    fn content(&self, n: usize) -> String {
        format!("question {n} from {}", self.user)
    }

    async fn connect(&mut self, last_event: Option<&str>) -> anyhow::Result<WsClient> {
        let mut delay = Duration::from_millis(50);
        loop {
            let attempt = async {
                let token = fetch_token(&self.http, &self.http_base, &self.user).await?;
                let base = &self.ws_bases[self.base_index % self.ws_bases.len()];
                WsClient::connect(base, &self.user, &token, last_event).await
            };
            match attempt.await {
                Ok(c) => return Ok(c),
                Err(e) => {
                    if Instant::now() > self.deadline {
                        return Err(e).context("could not reconnect before the deadline");
                    }
                    // Try the next base (another gateway) as a real client behind a balancer would.
                    self.base_index += 1;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn run(mut self) {
        let mut next = 0usize;
        // Outstanding message number -> acked?
        let mut outstanding: BTreeMap<usize, bool> = BTreeMap::new();
        let mut answered: HashSet<usize> = HashSet::new();
        // Refused messages (rate limited, unavailable) to resend under the same id, not before a time.
        let mut retry: std::collections::VecDeque<(usize, Instant)> =
            std::collections::VecDeque::new();
        let mut last_event: Option<String> = None;
        let mut conn = match self.connect(None).await {
            Ok(c) => c,
            Err(_) => return,
        };
        let mut conn_id = CONN_IDS.fetch_add(1, Ordering::Relaxed);
        let mut next_send = Instant::now()
            + self
                .interval
                .map_or(Duration::ZERO, |i| i.mul_f64(rand::random::<f64>()));
        while answered.len() < self.messages && Instant::now() < self.deadline {
            // Resend refused messages whose wait is over.
            while outstanding.len() < self.window
                && retry.front().is_some_and(|(_, at)| *at <= Instant::now())
            {
                let Some((n, _)) = retry.pop_front() else {
                    break;
                };
                if self.send(&mut conn, n).await.is_err() {
                    retry.push_front((n, Instant::now()));
                    break;
                }
                outstanding.insert(n, false);
            }
            // Send while the window allows.
            while next < self.messages
                && outstanding.len() < self.window
                && Instant::now() >= next_send
            {
                if self.send(&mut conn, next).await.is_err() {
                    break;
                }
                self.checker.sent(&self.user, &self.msg_id(next));
                outstanding.insert(next, false);
                next += 1;
                if let Some(i) = self.interval {
                    next_send += i;
                }
            }
            let mut wait = if next < self.messages && outstanding.len() < self.window {
                next_send
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1))
            } else {
                self.deadline.saturating_duration_since(Instant::now())
            };
            if let Some((_, at)) = retry.front() {
                wait = wait.min(
                    at.saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(1)),
                );
            }
            let received = match conn.recv(wait).await {
                Ok(r) => r,
                Err(_) => continue, // timeout: time to send again
            };
            match received {
                Received::Frame(frame) => {
                    match self.on_frame(frame, conn_id, &mut outstanding, &mut last_event) {
                        Some(Event::Answered(n)) => {
                            answered.insert(n);
                        }
                        Some(Event::Refused(n, after)) => {
                            retry.push_back((n, Instant::now() + after))
                        }
                        None => {}
                    }
                }
                Received::Closed { .. } => {
                    self.reconnects.fetch_add(1, Ordering::Relaxed);
                    conn = match self.connect(last_event.as_deref()).await {
                        Ok(c) => c,
                        Err(_) => return,
                    };
                    conn_id = CONN_IDS.fetch_add(1, Ordering::Relaxed);
                    if self.protocol == Protocol::Full {
                        // Resend what was never acked; acked ones arrive through the resume.
                        let unacked: Vec<usize> = outstanding
                            .iter()
                            .filter(|(_, a)| !**a)
                            .map(|(n, _)| *n)
                            .collect();
                        for n in unacked {
                            let _ = self.send(&mut conn, n).await;
                        }
                    }
                }
            }
        }
        conn.close().await;
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

    /// What this frame means for the message it names, if anything.
    fn on_frame(
        &self,
        frame: ServerFrame,
        conn_id: u64,
        outstanding: &mut BTreeMap<usize, bool>,
        last_event: &mut Option<String>,
    ) -> Option<Event> {
        match frame {
            ServerFrame::Ack { id, .. } => {
                let n = self.number_of(&id)?;
                self.checker.acked(&id);
                if let Some(a) = outstanding.get_mut(&n) {
                    *a = true;
                }
                None
            }
            ServerFrame::Response {
                id,
                event_id,
                content,
                ..
            } => {
                *last_event = Some(event_id);
                let n = match self.protocol {
                    Protocol::Full => self.number_of(&id)?,
                    Protocol::Original => self.number_in_answer(&content)?,
                };
                let key = self.msg_id(n);
                if self.protocol == Protocol::Original {
                    // The original protocol has no acks: a response is the only receipt.
                    self.checker.acked(&key);
                }
                self.checker.delivered(&self.user, conn_id, &key, false);
                outstanding.remove(&n);
                Some(Event::Answered(n))
            }
            ServerFrame::Error {
                code: ErrorCode::LlmFailed,
                id: Some(id),
                event_id,
                ..
            } => {
                if let Some(e) = event_id {
                    *last_event = Some(e);
                }
                let n = self.number_of(&id)?;
                self.checker.delivered(&self.user, conn_id, &id, true);
                outstanding.remove(&n);
                Some(Event::Answered(n))
            }
            ServerFrame::Error {
                code: ErrorCode::RateLimited | ErrorCode::Unavailable,
                id: Some(id),
                retry_after_ms,
                ..
            } => {
                // Not stored: resend it later under the same id.
                let n = self.number_of(&id)?;
                outstanding.remove(&n);
                Some(Event::Refused(
                    n,
                    Duration::from_millis(retry_after_ms.unwrap_or(500)),
                ))
            }
            _ => None,
        }
    }

    fn number_of(&self, id: &str) -> Option<usize> {
        id.strip_prefix(&self.user)?
            .strip_prefix("-m")?
            .parse()
            .ok()
    }

    fn number_in_answer(&self, content: &str) -> Option<usize> {
        let at = content.find("question ")? + "question ".len();
        let digits: String = content[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    }
}
