//! The prober's one event, logged and counted together.

use colloquy_core::metrics as m;

use crate::tracker::{Outcome, ProbeReport};

/// Registers every outcome's counter at zero, so `rate()` and `increase()` see the first failure.
pub fn register_zero_series() {
    for o in Outcome::ALL {
        metrics::counter!(m::PROBES, "outcome" => o.as_str()).increment(0);
    }
    metrics::gauge!(m::PROBE_SUCCESS).set(0.0);
}

/// A probe ended.
#[derive(Debug)]
pub struct ProbeFinished<'a> {
    pub userid: &'a str,
    pub report: &'a ProbeReport,
}

impl ProbeFinished<'_> {
    pub fn emit(&self) {
        let r = self.report;
        let ms = |d: Option<std::time::Duration>| {
            d.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        };
        if r.outcome == Outcome::Success {
            tracing::info!(
                userid = self.userid,
                outcome = r.outcome.as_str(),
                ack_ms = ms(r.ack),
                first_delta_ms = ms(r.first_delta),
                answer_ms = ms(r.answer),
                "probe succeeded"
            );
        } else {
            tracing::warn!(
                userid = self.userid,
                outcome = r.outcome.as_str(),
                ack_ms = ms(r.ack),
                first_delta_ms = ms(r.first_delta),
                detail = %r.detail,
                "probe failed"
            );
        }
        metrics::counter!(m::PROBES, "outcome" => r.outcome.as_str()).increment(1);
        metrics::gauge!(m::PROBE_SUCCESS).set(if r.outcome == Outcome::Success {
            1.0
        } else {
            0.0
        });
        for (stage, d) in r.latencies() {
            metrics::histogram!(m::PROBE_LATENCY, "stage" => stage.as_str())
                .record(d.as_secs_f64());
        }
    }
}
