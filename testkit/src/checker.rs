//! The delivery checker, after Jepsen's total-queue idea: every message a client was acked for
//! must reach its user exactly once as a `response` (or an `llm_failed` error).
//!
//! Clients record what they sent, what was acked and what each connection received; the report
//! counts lost (acked, never delivered), duplicated (one connection saw it twice), redelivered
//! (a later connection of the same user saw it again: allowed, clients de-duplicate by id) and
//! unexpected (delivered, never sent) messages.
//!
//! Latency is measured from each message's *intended* send time (the open-loop schedule's), not
//! from when the client got round to sending it: a client that falls behind, waits for a
//! reconnect or resends after a refusal still charges that wait to the system. Measuring from
//! the actual send would hide exactly the delays a saturated system causes (coordinated
//! omission). Percentiles come from HDR histograms (3 significant digits, microseconds).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

#[derive(Debug)]
struct Sent {
    user: String,
    /// When the schedule meant it to be sent: latencies start here.
    intended: Instant,
    /// When it was first written to a socket.
    sent_at: Instant,
    /// When the first ack arrived.
    acked_at: Option<Instant>,
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

/// Latency percentiles of one kind of event, milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    /// How many events were measured.
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1e3;
        Self {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// A histogram of microseconds from 1 µs to one hour, 3 significant digits.
fn histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts; a failure here is a programming error.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|e| panic!("histogram: {e}"))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
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
    /// Intended send → ack.
    pub ack: Latency,
    /// Intended send → first delivery of the answer (or `llm_failed`).
    pub answer: Latency,
    /// The answer latency's median, 99th percentile and maximum (as in [`Report::answer`]).
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
            "sent={} acked={} delivered={} llm_failed={} lost={} unacked_undelivered={} duplicated={} redelivered={} unexpected={} \
             answer p50={:.1}ms p90={:.1}ms p99={:.1}ms p99.9={:.1}ms max={:.1}ms",
            self.sent,
            self.acked,
            self.delivered,
            self.llm_failed,
            self.lost,
            self.unacked_undelivered,
            self.duplicated,
            self.redelivered,
            self.unexpected,
            self.answer.p50_ms,
            self.answer.p90_ms,
            self.answer.p99_ms,
            self.answer.p999_ms,
            self.answer.max_ms,
        )?;
        if self.ack.count > 0 {
            write!(
                f,
                " ack p50={:.1}ms p99={:.1}ms max={:.1}ms",
                self.ack.p50_ms, self.ack.p99_ms, self.ack.max_ms
            )?;
        }
        if !self.lost_sample.is_empty() {
            write!(f, " lost_sample={:?}", self.lost_sample)?;
        }
        Ok(())
    }
}

/// One interval of a run's timeline: what happened in `[start_s, start_s + width)`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Interval {
    /// Start of the interval, seconds since the run's start.
    pub start_s: f64,
    /// Messages the schedule meant to send in the interval.
    pub offered: u64,
    /// Messages first written to a socket in the interval.
    pub sent: u64,
    /// First acks that arrived in the interval.
    pub acked: u64,
    /// First deliveries (answers or `llm_failed`) that arrived in the interval.
    pub answered: u64,
    /// 99th percentile of the answer latency (from the intended send time) of the answers that
    /// arrived in the interval; 0 when none did.
    pub answer_p99_ms: f64,
}

impl Checker {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A client sent `msg_id` now, and meant to send it now.
    pub fn sent(&self, user: &str, msg_id: &str) {
        self.sent_at(user, msg_id, Instant::now());
    }

    /// A client sent `msg_id` now, which its schedule meant to send at `intended` (first send
    /// only; resends keep the first times).
    pub fn sent_at(&self, user: &str, msg_id: &str, intended: Instant) {
        self.lock()
            .sent
            .entry(msg_id.to_owned())
            .or_insert_with(|| Sent {
                user: user.to_owned(),
                intended,
                sent_at: Instant::now(),
                acked_at: None,
            });
    }

    /// The gateway acked `msg_id` (the first ack's time counts).
    pub fn acked(&self, msg_id: &str) {
        if let Some(s) = self.lock().sent.get_mut(msg_id) {
            s.acked_at.get_or_insert_with(Instant::now);
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

    /// How many messages were delivered at least once (cheap: for progress checks).
    #[must_use]
    pub fn delivered_count(&self) -> u64 {
        self.lock().first_delivery.len() as u64
    }

    /// The report so far.
    #[must_use]
    pub fn report(&self) -> Report {
        let s = self.lock();
        let mut ack = histogram();
        let mut answer = histogram();
        let mut acked = 0;
        let mut lost_ids = Vec::new();
        let mut unacked_undelivered = 0;
        for (id, sent) in &s.sent {
            if let Some(at) = sent.acked_at {
                acked += 1;
                ack.saturating_record(micros(at.saturating_duration_since(sent.intended)));
            }
            match s.first_delivery.get(id) {
                Some(at) => {
                    answer.saturating_record(micros(at.saturating_duration_since(sent.intended)));
                }
                None if sent.acked_at.is_some() => lost_ids.push(id),
                None => unacked_undelivered += 1,
            }
        }
        lost_ids.sort();
        let answer = Latency::from_histogram(&answer);
        let dur = |ms: f64| Duration::from_secs_f64(ms / 1e3);
        Report {
            sent: s.sent.len() as u64,
            acked,
            delivered: s.first_delivery.len() as u64,
            llm_failed: s.failed.len() as u64,
            lost: lost_ids.len() as u64,
            unacked_undelivered,
            duplicated: s.duplicated,
            redelivered: s.redelivered,
            unexpected: s.unexpected,
            ack: Latency::from_histogram(&ack),
            answer,
            p50: dur(answer.p50_ms),
            p99: dur(answer.p99_ms),
            max_delay: dur(answer.max_ms),
            lost_sample: lost_ids.into_iter().take(10).cloned().collect(),
        }
    }

    /// The run so far cut into intervals of `width` from `start` (the last one may be partial).
    #[must_use]
    pub fn timeline(&self, start: Instant, width: Duration) -> Vec<Interval> {
        let s = self.lock();
        let width_s = width.as_secs_f64().max(1e-3);
        let slot =
            |at: Instant| (at.saturating_duration_since(start).as_secs_f64() / width_s) as usize;
        let mut rows: Vec<Interval> = Vec::new();
        let mut latencies: Vec<Vec<u64>> = Vec::new();
        let grow = |rows: &mut Vec<Interval>, latencies: &mut Vec<Vec<u64>>, i: usize| {
            while rows.len() <= i {
                rows.push(Interval {
                    start_s: rows.len() as f64 * width_s,
                    ..Interval::default()
                });
                latencies.push(Vec::new());
            }
        };
        for (id, sent) in &s.sent {
            let i = slot(sent.intended);
            grow(&mut rows, &mut latencies, i);
            rows[i].offered += 1;
            let i = slot(sent.sent_at);
            grow(&mut rows, &mut latencies, i);
            rows[i].sent += 1;
            if let Some(at) = sent.acked_at {
                let i = slot(at);
                grow(&mut rows, &mut latencies, i);
                rows[i].acked += 1;
            }
            if let Some(at) = s.first_delivery.get(id) {
                let i = slot(*at);
                grow(&mut rows, &mut latencies, i);
                rows[i].answered += 1;
                latencies[i].push(micros(at.saturating_duration_since(sent.intended)));
            }
        }
        for (row, mut l) in rows.iter_mut().zip(latencies) {
            if l.is_empty() {
                continue;
            }
            l.sort_unstable();
            let rank = ((l.len() as f64 * 0.99).ceil() as usize).clamp(1, l.len()) - 1;
            row.answer_p99_ms = l[rank] as f64 / 1e3;
        }
        rows
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
        assert_eq!(r.lost_sample, vec!["b".to_owned()]);
        assert_eq!((r.ack.count, r.answer.count), (3, 2));
        assert!(!r.is_clean());
    }

    #[test]
    fn latency_runs_from_the_intended_send_time_not_the_actual_one() {
        let c = Checker::default();
        // The schedule meant to send this two seconds ago; the client only now got to it.
        let intended = Instant::now() - Duration::from_secs(2);
        c.sent_at("u1", "late", intended);
        c.acked("late");
        c.delivered("u1", 1, "late", false);
        let r = c.report();
        assert!(r.answer.p50_ms >= 2_000.0, "{r}");
        assert!(r.ack.max_ms >= 2_000.0, "{r}");
        assert!(r.p99 >= Duration::from_secs(2), "{r}");
    }

    #[test]
    fn resends_and_repeated_acks_keep_the_first_times() {
        let c = Checker::default();
        let first = Instant::now() - Duration::from_secs(5);
        c.sent_at("u1", "m", first);
        c.acked("m");
        // A resend after a reconnect, with a later intended time, changes nothing.
        c.sent_at("u1", "m", Instant::now());
        c.acked("m");
        c.delivered("u1", 1, "m", false);
        let r = c.report();
        assert_eq!((r.sent, r.acked, r.delivered), (1, 1, 1));
        assert!(r.answer.p50_ms >= 5_000.0, "{r}");
    }

    #[test]
    fn timeline_puts_each_event_in_its_interval() {
        let c = Checker::default();
        let start = Instant::now() - Duration::from_secs(3);
        // Meant for second 0, sent, acked and answered now (second 3).
        c.sent_at("u1", "a", start);
        c.acked("a");
        c.delivered("u1", 1, "a", false);
        // Meant for second 1, sent now, never acked.
        c.sent_at("u1", "b", start + Duration::from_millis(1_500));
        let rows = c.timeline(start, Duration::from_secs(1));
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0].offered, 1);
        assert_eq!(rows[1].offered, 1);
        assert_eq!((rows[3].sent, rows[3].acked, rows[3].answered), (2, 1, 1));
        assert!(rows[3].answer_p99_ms >= 3_000.0);
        assert_eq!(rows[0].answer_p99_ms, 0.0);
        assert_eq!(rows.iter().map(|r| r.answered).sum::<u64>(), 1);
    }
}
