//! The sans-IO heart of a probe: it takes the server's frames and the passing time, and says
//! when the probe is over and how it ended. The socket loop in `probe.rs` only moves bytes.
//!
//! The tracker parses frames itself, with only the fields it needs, and ignores every frame
//! type it does not know (`welcome`, `resumed`, whatever comes next), as the protocol asks of
//! clients.

use std::time::Duration;

use serde::Deserialize;

/// How a probe ended (the `outcome` label of `colloquy_probes_total`) and its timed points
/// (the `stage` label of `colloquy_probe_latency_seconds`): label values of the contract.
pub use colloquy_core::labels::{ProbeOutcome as Outcome, ProbeStage as Stage};

/// What one probe measured. Latencies are from the send of the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeReport {
    pub outcome: Outcome,
    /// The probe message's id; `None` when the probe ended before sending it.
    pub msg_id: Option<String>,
    /// The trace id of the message, from its `ack`; `None` when it was not acked.
    pub trace_id: Option<String>,
    pub ack: Option<Duration>,
    /// The first text: the first delta, or the response of an answer that came whole.
    pub first_delta: Option<Duration>,
    pub answer: Option<Duration>,
    /// Why it failed, for the log line; empty on success.
    pub detail: String,
}

impl ProbeReport {
    /// A probe that ended before its message was sent.
    #[must_use]
    pub fn failed_before_send(outcome: Outcome, detail: impl Into<String>) -> Self {
        Self {
            outcome,
            msg_id: None,
            trace_id: None,
            ack: None,
            first_delta: None,
            answer: None,
            detail: detail.into(),
        }
    }

    /// The stages reached, with their latencies.
    #[must_use]
    pub fn latencies(&self) -> Vec<(Stage, Duration)> {
        [
            (Stage::Ack, self.ack),
            (Stage::FirstDelta, self.first_delta),
            (Stage::Answer, self.answer),
        ]
        .into_iter()
        .filter_map(|(s, d)| d.map(|d| (s, d)))
        .collect()
    }
}

/// Whether the probe goes on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    Pending,
    Finished(ProbeReport),
}

/// The server frames a probe looks at; anything else is `Other` and ignored.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Incoming {
    Ack {
        id: String,
        #[serde(default)]
        trace_id: Option<String>,
    },
    Delta {
        id: String,
    },
    Response {
        id: String,
    },
    Error {
        code: String,
        #[serde(default)]
        id: Option<String>,
        #[serde(default)]
        message: String,
    },
    #[serde(other)]
    Other,
}

/// One probe message's progress: sent at time zero, then fed frames and elapsed times.
#[derive(Debug)]
pub struct ProbeTracker {
    msg_id: String,
    trace_id: Option<String>,
    ack_timeout: Duration,
    answer_timeout: Duration,
    ack: Option<Duration>,
    first_delta: Option<Duration>,
}

impl ProbeTracker {
    #[must_use]
    pub fn new(msg_id: impl Into<String>, ack_timeout: Duration, answer_timeout: Duration) -> Self {
        Self {
            msg_id: msg_id.into(),
            trace_id: None,
            ack_timeout,
            answer_timeout,
            ack: None,
            first_delta: None,
        }
    }

    #[must_use]
    pub fn msg_id(&self) -> &str {
        &self.msg_id
    }

    /// How long, from the send, the socket may be read before [`Self::on_tick`] must be called.
    #[must_use]
    pub fn next_deadline(&self) -> Duration {
        if self.ack.is_some() {
            self.answer_timeout
        } else {
            self.ack_timeout.min(self.answer_timeout)
        }
    }

    fn finish(&self, outcome: Outcome, answer: Option<Duration>, detail: String) -> Progress {
        Progress::Finished(ProbeReport {
            outcome,
            msg_id: Some(self.msg_id.clone()),
            trace_id: self.trace_id.clone(),
            ack: self.ack,
            first_delta: self.first_delta,
            answer,
            detail,
        })
    }

    /// A text frame arrived `elapsed` after the send.
    pub fn on_text(&mut self, text: &str, elapsed: Duration) -> Progress {
        let frame: Incoming = match serde_json::from_str(text) {
            Ok(f) => f,
            Err(e) => {
                return self.finish(Outcome::Error, None, format!("unreadable frame ({e})"));
            }
        };
        match frame {
            Incoming::Ack { id, trace_id } if id == self.msg_id => {
                self.ack.get_or_insert(elapsed);
                if self.trace_id.is_none() {
                    self.trace_id = trace_id;
                }
            }
            Incoming::Delta { id } if id == self.msg_id => {
                self.first_delta.get_or_insert(elapsed);
            }
            Incoming::Response { id } if id == self.msg_id => {
                // An answer that came whole (no delta before it) is also the first text, as the
                // gateway's time to first text counts it.
                self.first_delta.get_or_insert(elapsed);
                return self.finish(Outcome::Success, Some(elapsed), String::new());
            }
            Incoming::Error { code, id, message } => {
                let ours = id.as_deref().is_none_or(|i| i == self.msg_id);
                if ours {
                    let outcome = match (self.ack.is_some(), id.is_some()) {
                        // A message error after the ack is a failed answer (llm_failed).
                        (true, true) => Outcome::NoAnswer,
                        // Refused before the ack: unavailable, rate_limited, too_large...
                        (false, true) => Outcome::NoAck,
                        // An error about the connection, not the message.
                        (_, false) => Outcome::Error,
                    };
                    return self.finish(outcome, None, format!("error frame {code}: {message}"));
                }
            }
            // Frames for other messages (earlier probes' late answers) and unknown types.
            Incoming::Ack { .. }
            | Incoming::Delta { .. }
            | Incoming::Response { .. }
            | Incoming::Other => {}
        }
        self.on_tick(elapsed)
    }

    /// Time passed with no frame: ends the probe once a deadline is behind it.
    pub fn on_tick(&mut self, elapsed: Duration) -> Progress {
        if self.ack.is_none() && elapsed >= self.ack_timeout {
            return self.finish(
                Outcome::NoAck,
                None,
                format!("no ack within {} ms", self.ack_timeout.as_millis()),
            );
        }
        if elapsed >= self.answer_timeout {
            let outcome = if self.ack.is_some() {
                Outcome::NoAnswer
            } else {
                Outcome::NoAck
            };
            return self.finish(
                outcome,
                None,
                format!("no answer within {} ms", self.answer_timeout.as_millis()),
            );
        }
        Progress::Pending
    }

    /// The server closed the socket (or it broke) before the probe ended.
    #[must_use]
    pub fn on_closed(&self, why: &str) -> Progress {
        self.finish(Outcome::Error, None, format!("socket closed: {why}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use colloquy_core::labels::LabelValue;

    const ACK: Duration = Duration::from_secs(5);
    const ANSWER: Duration = Duration::from_secs(30);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn tracker() -> ProbeTracker {
        ProbeTracker::new("p1", ACK, ANSWER)
    }

    fn finished(p: Progress) -> ProbeReport {
        match p {
            Progress::Finished(r) => r,
            Progress::Pending => panic!("probe still pending"),
        }
    }

    #[test]
    fn a_full_exchange_is_a_success_with_every_stage_timed() {
        let mut t = tracker();
        let frames = [
            (r#"{"type":"welcome","position":"0-0"}"#, 1),
            (r#"{"type":"ack","id":"p1","trace_id":"abc"}"#, 10),
            (r#"{"type":"delta","id":"p1","seq":0,"content":"hel"}"#, 50),
            (r#"{"type":"delta","id":"p1","seq":1,"content":"lo"}"#, 60),
        ];
        for (f, at) in frames {
            assert_eq!(t.on_text(f, ms(at)), Progress::Pending, "{f}");
        }
        let r = finished(t.on_text(
            r#"{"type":"response","id":"p1","event_id":"1-0","content":"hello","userid":"u","timestamp":"x"}"#,
            ms(70),
        ));
        assert_eq!(r.outcome, Outcome::Success);
        assert_eq!(r.msg_id.as_deref(), Some("p1"));
        assert_eq!(r.trace_id.as_deref(), Some("abc"));
        assert_eq!(r.ack, Some(ms(10)));
        assert_eq!(r.first_delta, Some(ms(50)));
        assert_eq!(r.answer, Some(ms(70)));
        assert_eq!(
            r.latencies()
                .iter()
                .map(|(s, _)| s.as_str())
                .collect::<Vec<_>>(),
            ["ack", "first_delta", "answer"]
        );
    }

    #[test]
    fn an_answer_that_came_whole_is_also_the_first_text() {
        let mut t = tracker();
        let ack = r#"{"type":"ack","id":"p1","trace_id":"abc"}"#;
        assert_eq!(t.on_text(ack, ms(10)), Progress::Pending);
        let r = finished(t.on_text(
            r#"{"type":"response","id":"p1","event_id":"1-0","content":"hello","userid":"u","timestamp":"x"}"#,
            ms(30),
        ));
        assert_eq!(r.outcome, Outcome::Success);
        assert_eq!((r.first_delta, r.answer), (Some(ms(30)), Some(ms(30))));
    }

    #[test]
    fn unknown_frame_types_and_other_messages_are_ignored() {
        let mut t = tracker();
        for f in [
            r#"{"type":"resumed","recovered":false}"#,
            r#"{"type":"pong"}"#,
            r#"{"type":"something_new","x":[1,2]}"#,
            r#"{"type":"response","id":"older-probe","event_id":"1-0","content":"late","userid":"u","timestamp":"x"}"#,
            r#"{"type":"error","code":"llm_failed","message":"x","id":"older-probe"}"#,
            r#"{"type":"ack","id":"older-probe","trace_id":"t"}"#,
        ] {
            assert_eq!(t.on_text(f, ms(1)), Progress::Pending, "{f}");
        }
        assert_eq!(t.on_tick(ms(2)), Progress::Pending);
    }

    #[test]
    fn no_ack_in_time_ends_as_no_ack() {
        let mut t = tracker();
        assert_eq!(t.next_deadline(), ACK);
        assert_eq!(t.on_tick(ms(4_999)), Progress::Pending);
        let r = finished(t.on_tick(ACK));
        assert_eq!(r.outcome, Outcome::NoAck);
        assert_eq!(
            r.msg_id.as_deref(),
            Some("p1"),
            "a failure names its message"
        );
        assert_eq!(r.trace_id, None);
        assert!(r.latencies().is_empty());
    }

    #[test]
    fn acked_but_unanswered_ends_as_no_answer_with_the_ack_timed() {
        let mut t = tracker();
        assert_eq!(
            t.on_text(r#"{"type":"ack","id":"p1","trace_id":"t"}"#, ms(8)),
            Progress::Pending
        );
        assert_eq!(t.next_deadline(), ANSWER);
        // The ack deadline no longer applies once acked.
        assert_eq!(t.on_tick(ms(10_000)), Progress::Pending);
        let r = finished(t.on_tick(ANSWER));
        assert_eq!(r.outcome, Outcome::NoAnswer);
        assert_eq!(
            r.trace_id.as_deref(),
            Some("t"),
            "a failure names its trace"
        );
        assert_eq!(r.ack, Some(ms(8)));
        assert_eq!(r.answer, None);
    }

    #[test]
    fn error_frames_map_to_the_stage_they_end() {
        let mut refused = tracker();
        let r = finished(refused.on_text(
            r#"{"type":"error","code":"unavailable","message":"kafka down","id":"p1"}"#,
            ms(3),
        ));
        assert_eq!(r.outcome, Outcome::NoAck);
        assert!(r.detail.contains("unavailable"), "{}", r.detail);

        let mut failed = tracker();
        let _ = failed.on_text(r#"{"type":"ack","id":"p1","trace_id":"t"}"#, ms(3));
        let r = finished(failed.on_text(
            r#"{"type":"error","code":"llm_failed","message":"gave up","id":"p1"}"#,
            ms(9),
        ));
        assert_eq!(r.outcome, Outcome::NoAnswer);

        let mut connection = tracker();
        let r = finished(connection.on_text(
            r#"{"type":"error","code":"invalid_message","message":"?"}"#,
            ms(1),
        ));
        assert_eq!(r.outcome, Outcome::Error);
    }

    #[test]
    fn malformed_frames_and_closes_are_errors() {
        let mut t = tracker();
        assert_eq!(
            finished(t.on_text("not json", ms(1))).outcome,
            Outcome::Error
        );
        let t = tracker();
        let r = finished(t.on_closed("1012 gateway restarting"));
        assert_eq!(r.outcome, Outcome::Error);
        assert!(r.detail.contains("1012"));
    }

    #[test]
    fn outcome_labels_match_the_metrics_contract() {
        let help = colloquy_core::metrics::CONTRACT
            .iter()
            .find(|d| d.name == colloquy_core::metrics::PROBES)
            .map(|d| d.help)
            .unwrap_or_default();
        for o in Outcome::ALL {
            assert!(help.contains(o.as_str()), "{} not in {help:?}", o.as_str());
        }
    }
}
