//! The prober's one event, logged and counted together.
//!
//! Every outcome's counter exists at zero from the start (`record_build_info` registers the
//! contract's zero series), so `rate()` and `increase()` see the first failure.

use colloquy_core::labels::{LabelValue, service};
use colloquy_core::metrics as m;

use crate::tracker::{Outcome, ProbeReport};

/// The `service` name of the prober.
pub const SERVICE: &str = service::PROBER;

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
                msg_id = r.msg_id.as_deref(),
                trace_id = r.trace_id.as_deref(),
                outcome = r.outcome.as_str(),
                ack_ms = ms(r.ack),
                first_delta_ms = ms(r.first_delta),
                answer_ms = ms(r.answer),
                "probe succeeded"
            );
        } else {
            tracing::warn!(
                userid = self.userid,
                msg_id = r.msg_id.as_deref(),
                trace_id = r.trace_id.as_deref(),
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
