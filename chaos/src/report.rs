//! What a scenario found, and its line in the results table.

use std::path::PathBuf;
use std::time::Duration;

use colloquy_testkit::checker::Report;
use colloquy_testkit::load::LoadReport;

/// The checker's verdict on one scenario, with the load's figures.
#[derive(Clone, Debug, PartialEq)]
pub struct ScenarioReport {
    pub name: &'static str,
    /// What was done to the stack, in words.
    pub fault: String,
    /// Messages sent (each counted once, however often it was resent).
    pub sent: u64,
    /// Messages the gateway acked (durably in Kafka).
    pub acked: u64,
    /// Messages answered at least once (a `response` or an `llm_failed` error).
    pub delivered: u64,
    /// Of those, answered with `llm_failed`.
    pub llm_failed: u64,
    /// Acked but never delivered: must be 0.
    pub lost: u64,
    /// Sent, never acked and never delivered (the client could still resend them).
    pub unacked_undelivered: u64,
    /// Seen twice by one connection: must be 0.
    pub duplicated: u64,
    /// Seen again by a later connection of the same user (allowed; clients de-duplicate by id).
    pub redelivered: u64,
    /// Delivered but never sent (or to the wrong user): must be 0.
    pub unexpected: u64,
    pub p50: Duration,
    pub p99: Duration,
    /// The longest a user waited for an answer.
    pub max_delay: Duration,
    /// Times a client's socket closed and it reconnected (unknown when the load was stopped).
    pub reconnects: Option<u64>,
    /// How long the load ran.
    pub elapsed: Duration,
    /// Set when the load was stopped because no answer came for this long although some were
    /// outstanding.
    pub stalled: Option<Duration>,
    /// Processes that were not running at the end (crashed, or not restarted), with their status.
    pub not_running: Vec<String>,
    /// The stack's directory when it was kept (always when the scenario failed).
    pub logs: Option<PathBuf>,
}

impl ScenarioReport {
    /// A report from the load generator's figures.
    #[must_use]
    pub fn new(name: &'static str, fault: String, load: &LoadReport) -> Self {
        Self::from_check(
            name,
            fault,
            &load.check,
            load.elapsed,
            Some(load.reconnects),
        )
    }

    /// A report from the checker alone (when the load had to be stopped).
    #[must_use]
    pub fn from_check(
        name: &'static str,
        fault: String,
        c: &Report,
        elapsed: Duration,
        reconnects: Option<u64>,
    ) -> Self {
        Self {
            name,
            fault,
            sent: c.sent,
            acked: c.acked,
            delivered: c.delivered,
            llm_failed: c.llm_failed,
            lost: c.lost,
            unacked_undelivered: c.unacked_undelivered,
            duplicated: c.duplicated,
            redelivered: c.redelivered,
            unexpected: c.unexpected,
            p50: c.p50,
            p99: c.p99,
            max_delay: c.max_delay,
            reconnects,
            elapsed,
            stalled: None,
            not_running: Vec::new(),
            logs: None,
        }
    }

    /// Every way the run broke the delivery promise or failed to test it. Empty when clean.
    ///
    /// Beyond lost, duplicated and unexpected messages, a run proves nothing when nothing was
    /// acked, when the load gave up before every message was answered (a stall is a failure
    /// too), or when a process other than the one killed died along the way.
    #[must_use]
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.lost > 0 {
            v.push(format!("{} acked messages lost", self.lost));
        }
        if self.duplicated > 0 {
            v.push(format!(
                "{} messages delivered twice to one connection",
                self.duplicated
            ));
        }
        if self.unexpected > 0 {
            v.push(format!("{} unexpected deliveries", self.unexpected));
        }
        if self.acked == 0 {
            v.push("nothing was acked".into());
        }
        if let Some(after) = self.stalled {
            v.push(format!(
                "stalled: no answer for {} s with {} of {} messages unanswered",
                after.as_secs(),
                self.sent - self.delivered.min(self.sent),
                self.sent
            ));
        } else if self.delivered < self.sent {
            v.push(format!(
                "incomplete: {} of {} messages answered before the load gave up",
                self.delivered, self.sent
            ));
        }
        for p in &self.not_running {
            v.push(format!("{p} at the end"));
        }
        v
    }

    /// Whether nothing was lost, duplicated or invented, and the run was complete.
    #[must_use]
    pub fn is_clean(&self) -> bool {
        self.violations().is_empty()
    }

    /// The header of the results table (Markdown).
    #[must_use]
    pub fn table_header() -> String {
        [
            "| scenario | sent | acked | delivered | llm_failed | lost | duplicated | unexpected | redelivered | reconnects | p50 | p99 | longest delay | verdict |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        .join("\n")
    }

    /// This scenario's row of the results table.
    #[must_use]
    pub fn table_row(&self) -> String {
        let verdict = if self.is_clean() {
            "ok".to_owned()
        } else {
            format!("FAIL: {}", self.violations().join("; "))
        };
        format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            self.name,
            self.sent,
            self.acked,
            self.delivered,
            self.llm_failed,
            self.lost,
            self.duplicated,
            self.unexpected,
            self.redelivered,
            self.reconnects
                .map_or_else(|| "?".to_owned(), |n| n.to_string()),
            ms(self.p50),
            ms(self.p99),
            ms(self.max_delay),
            verdict
        )
    }
}

impl std::fmt::Display for ScenarioReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): sent={} acked={} delivered={} llm_failed={} lost={} unacked_undelivered={} duplicated={} redelivered={} unexpected={} \
             reconnects={} p50={} p99={} max={} elapsed={:.1}s",
            self.name,
            self.fault,
            self.sent,
            self.acked,
            self.delivered,
            self.llm_failed,
            self.lost,
            self.unacked_undelivered,
            self.duplicated,
            self.redelivered,
            self.unexpected,
            self.reconnects
                .map_or_else(|| "?".to_owned(), |n| n.to_string()),
            ms(self.p50),
            ms(self.p99),
            ms(self.max_delay),
            self.elapsed.as_secs_f64()
        )?;
        for v in self.violations() {
            write!(f, "\n  VIOLATION: {v}")?;
        }
        if let Some(dir) = &self.logs {
            write!(f, "\n  logs: {}", dir.display())?;
        }
        Ok(())
    }
}

fn ms(d: Duration) -> String {
    if d >= Duration::from_secs(10) {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        format!("{} ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clean() -> ScenarioReport {
        ScenarioReport {
            name: "relay",
            fault: "kill -9 relay".into(),
            sent: 10,
            acked: 10,
            delivered: 10,
            llm_failed: 0,
            lost: 0,
            unacked_undelivered: 0,
            duplicated: 0,
            redelivered: 2,
            unexpected: 0,
            p50: Duration::from_millis(20),
            p99: Duration::from_millis(900),
            max_delay: Duration::from_millis(1200),
            reconnects: Some(0),
            elapsed: Duration::from_secs(5),
            stalled: None,
            not_running: Vec::new(),
            logs: None,
        }
    }

    #[test]
    fn redeliveries_to_a_later_connection_are_allowed() {
        assert!(clean().is_clean());
        assert!(clean().table_row().ends_with("| ok |"));
    }

    #[test]
    fn lost_duplicated_incomplete_and_dead_processes_fail() {
        let mut r = clean();
        r.lost = 1;
        r.duplicated = 2;
        r.delivered = 9;
        r.not_running = vec!["relay not running".into()];
        let v = r.violations();
        assert_eq!(v.len(), 4, "{v:?}");
        assert!(r.table_row().contains("FAIL: 1 acked messages lost"));
    }
}
