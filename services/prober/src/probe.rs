//! One probe through the edge, as a real client does it: a token from `POST /token`, an
//! upgrade on `/ws`, one message, then frames until the answer or a deadline.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use secrecy::ExposeSecret;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::config::ProberConfig;
use crate::tracker::{Outcome, ProbeReport, ProbeTracker, Progress};

/// Runs probes against one edge.
#[derive(Clone, Debug)]
pub struct Prober {
    cfg: ProberConfig,
    http: reqwest::Client,
}

/// Why the token request failed, split by whose fault it is.
enum TokenError {
    /// Transport error, timeout or 5xx: the edge or the gateways behind it are unreachable.
    Unreachable(String),
    /// A 4xx or an unreadable answer: the prober's configuration (admin token) is wrong.
    Refused(String),
}

impl Prober {
    /// # Errors
    /// When the HTTP client cannot be built (no TLS backend).
    pub fn new(cfg: ProberConfig) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(cfg.ack_timeout())
            .build()?;
        Ok(Self { cfg, http })
    }

    #[must_use]
    pub fn config(&self) -> &ProberConfig {
        &self.cfg
    }

    async fn token(&self) -> Result<String, TokenError> {
        let mut req = self
            .http
            .post(format!("{}/token", self.cfg.http_base()))
            .query(&[("userid", self.cfg.userid.as_str())]);
        if let Some(admin) = &self.cfg.admin_token {
            req = req.bearer_auth(admin.expose_secret());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| TokenError::Unreachable(format!("POST /token: {e}")))?;
        let status = resp.status();
        if status.is_server_error() {
            return Err(TokenError::Unreachable(format!("POST /token: {status}")));
        }
        if !status.is_success() {
            return Err(TokenError::Refused(format!("POST /token: {status}")));
        }
        let body: serde_json::Value = resp
            .json()
            .await
            .map_err(|e| TokenError::Refused(format!("POST /token answer: {e}")))?;
        body.get("token")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| TokenError::Refused("POST /token answer has no token".into()))
    }

    /// Runs one probe to its end; never fails, every failure is an [`Outcome`].
    pub async fn probe_once(&self) -> ProbeReport {
        let token = match self.token().await {
            Ok(t) => t,
            Err(TokenError::Unreachable(d)) => {
                return ProbeReport::failed_before_send(Outcome::ConnectFailed, d);
            }
            Err(TokenError::Refused(d)) => {
                return ProbeReport::failed_before_send(Outcome::Error, d);
            }
        };
        let url = format!(
            "{}/ws?userid={}&token={token}",
            self.cfg.ws_base(),
            self.cfg.userid
        );
        let mut ws = match tokio::time::timeout(
            self.cfg.ack_timeout(),
            tokio_tungstenite::connect_async(url),
        )
        .await
        {
            Ok(Ok((ws, _))) => ws,
            Ok(Err(e)) => {
                return ProbeReport::failed_before_send(
                    Outcome::ConnectFailed,
                    format!("upgrade: {e}"),
                );
            }
            Err(_) => {
                return ProbeReport::failed_before_send(
                    Outcome::ConnectFailed,
                    format!("upgrade: no answer in {:?}", self.cfg.ack_timeout()),
                );
            }
        };
        let msg_id = format!("probe-{}", uuid::Uuid::now_v7());
        let mut tracker =
            ProbeTracker::new(&msg_id, self.cfg.ack_timeout(), self.cfg.answer_timeout());
        let frame =
            serde_json::json!({"type": "message", "id": msg_id, "content": self.cfg.message});
        let sent = Instant::now();
        if let Err(e) = ws.send(Message::Text(frame.to_string().into())).await {
            let mut report = ProbeReport::failed_before_send(Outcome::Error, format!("send: {e}"));
            report.msg_id = Some(msg_id);
            return report;
        }
        let report = loop {
            let deadline = sent + tracker.next_deadline();
            let progress = match tokio::time::timeout_at(deadline, ws.next()).await {
                Err(_) => tracker.on_tick(sent.elapsed()),
                Ok(None) => tracker.on_closed("end of stream"),
                Ok(Some(Err(e))) => tracker.on_closed(&e.to_string()),
                Ok(Some(Ok(Message::Text(text)))) => tracker.on_text(&text, sent.elapsed()),
                Ok(Some(Ok(Message::Close(frame)))) => tracker.on_closed(&close_reason(frame)),
                // Pings are answered by tungstenite; binary frames are not part of the protocol.
                Ok(Some(Ok(_))) => tracker.on_tick(sent.elapsed()),
            };
            if let Progress::Finished(report) = progress {
                break report;
            }
        };
        // Best effort: a polite close, not waited for long.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = ws
                .close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "probe done".into(),
                }))
                .await;
        })
        .await;
        report
    }
}

fn close_reason(frame: Option<CloseFrame>) -> String {
    frame.map_or_else(
        || "close without a frame".to_owned(),
        |f| format!("{} {}", u16::from(f.code), f.reason),
    )
}
