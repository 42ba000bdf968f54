//! The delivery checker, after Jepsen's total-queue idea: every message a client was acked for
//! must reach its user exactly once as a `response` (or an `llm_failed` error).
//!
//! Clients record what they sent, what was acked and what each connection received; the report
//! counts lost (acked, never delivered), duplicated (one connection saw it twice), redelivered
//! (a later connection of the same user saw it again: allowed, clients de-duplicate by id) and
//! unexpected (delivered, never sent) messages, and the delivery latencies.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Sent {
    user: String,
    at: Instant,
    acked: bool,
}

#[derive(Debug, Default)]
struct State {
    sent: HashMap<String, Sent>,
    first_delivery: HashMap<String, Instant>,
    failed: HashSet<String>,
    seen: HashSet<(u64, String)>,
    delivered_conns: HashMap<String, u32>,
    duplicated: u64,
    redelivered: u64,
    unexpected: u64,
}

/// Thread-safe recorder shared by all simulated clients.
#[derive(Debug, Default)]
pub struct Checker {
    state: Mutex<State>,
}

/// What the checker found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    pub llm_failed: u64,
    /// Acked but never delivered: must be 0.
    pub lost: u64,
    /// Sent, never acked and never delivered (the client was told or can resend).
    pub unacked_undelivered: u64,
    /// Seen twice by one connection: must be 0.
    pub duplicated: u64,
    /// Seen again by a later connection of the same user (after a reconnect without cursor).
    pub redelivered: u64,
    /// Delivered but never sent: must be 0.
    pub unexpected: u64,
    pub p50: Duration,
    pub p99: Duration,
    pub max_delay: Duration,
    /// Up to ten lost message ids, to start an investigation from.
    pub lost_sample: Vec<String>,
}

impl Report {
    /// Whether the delivery promise held.
    #[must_use]
    pub fn is_clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.unexpected == 0
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sent={} acked={} delivered={} llm_failed={} lost={} unacked_undelivered={} duplicated={} redelivered={} unexpected={} p50={:.1}ms p99={:.1}ms max={:.1}ms",
            self.sent,
            self.acked,
            self.delivered,
            self.llm_failed,
            self.lost,
            self.unacked_undelivered,
            self.duplicated,
            self.redelivered,
            self.unexpected,
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.max_delay.as_secs_f64() * 1e3
        )?;
        if !self.lost_sample.is_empty() {
            write!(f, " lost_sample={:?}", self.lost_sample)?;
        }
        Ok(())
    }
}

impl Checker {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A client sent `msg_id` (first send only; resends keep the first time).
    pub fn sent(&self, user: &str, msg_id: &str) {
        self.lock()
            .sent
            .entry(msg_id.to_owned())
            .or_insert_with(|| Sent {
                user: user.to_owned(),
                at: Instant::now(),
                acked: false,
            });
    }

    /// The gateway acked `msg_id`.
    pub fn acked(&self, msg_id: &str) {
        if let Some(s) = self.lock().sent.get_mut(msg_id) {
            s.acked = true;
        }
    }

    /// Connection `conn` of `user` received the answer (or `llm_failed`) to `msg_id`.
    pub fn delivered(&self, user: &str, conn: u64, msg_id: &str, failed: bool) {
        let mut s = self.lock();
        match s.sent.get(msg_id) {
            Some(sent) if sent.user == user => {}
            _ => {
                s.unexpected += 1;
                return;
            }
        }
        if !s.seen.insert((conn, msg_id.to_owned())) {
            s.duplicated += 1;
            return;
        }
        let count = s.delivered_conns.entry(msg_id.to_owned()).or_insert(0);
        *count += 1;
        if *count > 1 {
            s.redelivered += 1;
            return;
        }
        s.first_delivery.insert(msg_id.to_owned(), Instant::now());
        if failed {
            s.failed.insert(msg_id.to_owned());
        }
    }

    /// Whether `msg_id` was delivered at least once.
    #[must_use]
    pub fn is_delivered(&self, msg_id: &str) -> bool {
        self.lock().first_delivery.contains_key(msg_id)
    }

    /// The report so far.
    #[must_use]
    pub fn report(&self) -> Report {
        let s = self.lock();
        let mut latencies: Vec<Duration> = s
            .first_delivery
            .iter()
            .filter_map(|(id, at)| {
                s.sent
                    .get(id)
                    .map(|sent| at.saturating_duration_since(sent.at))
            })
            .collect();
        latencies.sort();
        let pct = |p: f64| {
            latencies
                .get(((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1))
                .copied()
                .unwrap_or_default()
        };
        let acked = s.sent.values().filter(|x| x.acked).count() as u64;
        let lost_ids: Vec<&String> = s
            .sent
            .iter()
            .filter(|(id, x)| x.acked && !s.first_delivery.contains_key(*id))
            .map(|(id, _)| id)
            .collect();
        let lost = lost_ids.len() as u64;
        let lost_sample = lost_ids.iter().take(10).map(|s| (*s).clone()).collect();
        let unacked_undelivered = s
            .sent
            .iter()
            .filter(|(id, x)| !x.acked && !s.first_delivery.contains_key(*id))
            .count() as u64;
        Report {
            sent: s.sent.len() as u64,
            acked,
            delivered: s.first_delivery.len() as u64,
            llm_failed: s.failed.len() as u64,
            lost,
            unacked_undelivered,
            duplicated: s.duplicated,
            redelivered: s.redelivered,
            unexpected: s.unexpected,
            p50: pct(0.50),
            p99: pct(0.99),
            max_delay: latencies.last().copied().unwrap_or_default(),
            lost_sample,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_lost_duplicated_redelivered_and_unexpected() {
        let c = Checker::default();
        for id in ["a", "b", "c", "d"] {
            c.sent("u1", id);
        }
        c.acked("a");
        c.acked("b");
        c.acked("c");
        c.delivered("u1", 1, "a", false);
        c.delivered("u1", 1, "a", false); // same connection twice
        c.delivered("u1", 2, "a", false); // a later connection
        c.delivered("u1", 1, "c", true);
        c.delivered("u1", 1, "zzz", false); // never sent
        c.delivered("u2", 1, "b", false); // wrong user
        let r = c.report();
        assert_eq!((r.sent, r.acked, r.delivered, r.llm_failed), (4, 3, 2, 1));
        assert_eq!((r.lost, r.unacked_undelivered), (1, 1));
        assert_eq!((r.duplicated, r.redelivered, r.unexpected), (1, 1, 2));
        assert!(!r.is_clean());
    }
}
