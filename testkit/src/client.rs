//! A typed WebSocket client for tests and the load generator.
//!
//! It reads every server frame, including `welcome` (the stream position at connect, kept as
//! [`WsClient::welcome_position`]) and `resumed`; callers that only care about answers wait for
//! them with [`WsClient::recv_until`] or [`WsClient::response_to`] and skip the rest.

use std::time::Duration;

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use colloquy_core::wire::{ClientFrame, ServerFrame};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// The client's WebSocket settings. tungstenite's default read buffer is 128 KiB, and it
/// grows and zero-fills that much before every read: with a thousand simulated users that
/// memset was half of the load generator's CPU (perf, 2026-12-07), which then competed with
/// the stack it measures. Frames here are a few hundred bytes; larger ones take more reads.
fn client_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4 * 1024)
}

/// What the server sent: a frame, or the close (code and reason).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Received {
    Frame(ServerFrame),
    Closed { code: u16, reason: String },
}

/// Issues a token over HTTP.
///
/// # Errors
/// When the gateway refuses or is unreachable.
pub async fn fetch_token(http: &reqwest::Client, base: &str, user: &str) -> anyhow::Result<String> {
    let resp = http
        .post(format!("{base}/token"))
        .query(&[("userid", user)])
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!(
            "token refused: {} {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        );
    }
    let v: serde_json::Value = resp.json().await?;
    v["token"]
        .as_str()
        .map(str::to_owned)
        .context("no token in answer")
}

/// One WebSocket connection.
#[derive(Debug)]
pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    welcome: Option<String>,
}

impl WsClient {
    /// Connects to `ws_base` (e.g. `ws://127.0.0.1:8080`) as `user` with `token`.
    ///
    /// # Errors
    /// When the upgrade fails.
    pub async fn connect(
        ws_base: &str,
        user: &str,
        token: &str,
        after: Option<&str>,
    ) -> anyhow::Result<Self> {
        Self::connect_with_origin(ws_base, user, token, after, None).await
    }

    /// Like [`WsClient::connect`], sending an `Origin` header as a browser would.
    ///
    /// # Errors
    /// When the upgrade fails.
    pub async fn connect_with_origin(
        ws_base: &str,
        user: &str,
        token: &str,
        after: Option<&str>,
        origin: Option<&str>,
    ) -> anyhow::Result<Self> {
        let mut url = format!("{ws_base}/ws?userid={user}&token={token}");
        if let Some(a) = after {
            url.push_str(&format!("&after={a}"));
        }
        let mut request = url.into_client_request()?;
        if let Some(origin) = origin {
            request.headers_mut().insert("origin", origin.parse()?);
        }
        let (ws, _) = tokio::time::timeout(
            Duration::from_secs(10),
            // TCP_NODELAY, as browsers do: a message written right after a pong would
            // otherwise wait for the pong's ack.
            tokio_tungstenite::connect_async_with_config(request, Some(client_config()), true),
        )
        .await
        .context("WebSocket connect timed out")??;
        Ok(Self { ws, welcome: None })
    }

    /// The stream position from the `welcome` frame, once it was received.
    #[must_use]
    pub fn welcome_position(&self) -> Option<&str> {
        self.welcome.as_deref()
    }

    /// Waits for the `welcome` frame and returns its position.
    ///
    /// # Errors
    /// On timeout or close.
    pub async fn welcome(&mut self, timeout: Duration) -> anyhow::Result<String> {
        if let Some(p) = &self.welcome {
            return Ok(p.clone());
        }
        match self
            .recv_until(timeout, |f| matches!(f, ServerFrame::Welcome { .. }))
            .await?
        {
            ServerFrame::Welcome { position } => Ok(position),
            other => bail!("expected welcome, got {other:?}"),
        }
    }

    /// Sends `resume` with a cursor.
    ///
    /// # Errors
    /// When the socket is closed.
    pub async fn resume(&mut self, after: &str) -> anyhow::Result<()> {
        self.send(&ClientFrame::Resume {
            after: after.into(),
        })
        .await
    }

    /// Sends a client frame.
    ///
    /// # Errors
    /// When the socket is closed.
    pub async fn send(&mut self, frame: &ClientFrame) -> anyhow::Result<()> {
        self.send_raw(&serde_json::to_string(frame)?).await
    }

    /// Sends a `message` frame with a client id.
    ///
    /// # Errors
    /// When the socket is closed.
    pub async fn send_message(&mut self, id: &str, content: &str) -> anyhow::Result<()> {
        self.send(&ClientFrame::Message {
            content: content.into(),
            id: Some(id.into()),
            userid: None,
        })
        .await
    }

    /// Sends any text, valid or not.
    ///
    /// # Errors
    /// When the socket is closed.
    pub async fn send_raw(&mut self, text: &str) -> anyhow::Result<()> {
        self.ws.send(Message::Text(text.into())).await?;
        Ok(())
    }

    /// Sends a binary frame.
    ///
    /// # Errors
    /// When the socket is closed.
    pub async fn send_binary(&mut self, bytes: Vec<u8>) -> anyhow::Result<()> {
        self.ws.send(Message::Binary(bytes.into())).await?;
        Ok(())
    }

    /// The next frame or close, waiting at most `timeout`.
    ///
    /// # Errors
    /// On timeout, a transport error, or an unreadable frame.
    pub async fn recv(&mut self, timeout: Duration) -> anyhow::Result<Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .context("no frame in time")?;
            match next {
                None => {
                    return Ok(Received::Closed {
                        code: 1006,
                        reason: "connection dropped".into(),
                    });
                }
                Some(Err(e)) => {
                    return Ok(Received::Closed {
                        code: 1006,
                        reason: e.to_string(),
                    });
                }
                Some(Ok(Message::Text(t))) => {
                    let frame: ServerFrame = serde_json::from_str(t.as_str())
                        .with_context(|| format!("unreadable frame {t}"))?;
                    if let ServerFrame::Welcome { position } = &frame {
                        self.welcome = Some(position.clone());
                    }
                    return Ok(Received::Frame(frame));
                }
                Some(Ok(Message::Close(c))) => {
                    let (code, reason) = c
                        .map_or((1005, String::new()), |CloseFrame { code, reason }| {
                            (u16::from(code), reason.to_string())
                        });
                    return Ok(Received::Closed { code, reason });
                }
                Some(Ok(_)) => {}
            }
        }
    }

    /// Waits for the gateway's next WebSocket ping (answering it, as every client library
    /// does), skipping text frames; returns when it arrived.
    ///
    /// # Errors
    /// On timeout or when the socket closes first.
    pub async fn next_ping(&mut self, timeout: Duration) -> anyhow::Result<tokio::time::Instant> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .context("no ping in time")?
            {
                Some(Ok(Message::Ping(_))) => return Ok(tokio::time::Instant::now()),
                Some(Ok(Message::Close(_)) | Err(_)) | None => {
                    anyhow::bail!("the socket closed before a ping")
                }
                Some(Ok(_)) => {}
            }
        }
    }

    /// Waits for a frame matching `pred`, skipping others.
    ///
    /// # Errors
    /// On timeout or close.
    pub async fn recv_until(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&ServerFrame) -> bool,
    ) -> anyhow::Result<ServerFrame> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv(left).await? {
                Received::Frame(f) if pred(&f) => return Ok(f),
                Received::Frame(_) => {}
                Received::Closed { code, reason } => bail!("closed {code}: {reason}"),
            }
        }
    }

    /// Waits for the `response` to message `id`.
    ///
    /// # Errors
    /// On timeout or close.
    pub async fn response_to(
        &mut self,
        id: &str,
        timeout: Duration,
    ) -> anyhow::Result<ServerFrame> {
        self.recv_until(
            timeout,
            |f| matches!(f, ServerFrame::Response { id: i, .. } if i == id),
        )
        .await
    }

    /// Closes the socket politely.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}
