//! The edge (`infra/nginx.conf`, rendered by `colloquy_chaos::nginx`) in front of a real stack:
//! each of its rules is checked through a running nginx. Skipped, with a notice, when nginx is
//! not installed. Kafka and Redis come from the testkit (`COLLOQUY_TESTKIT=processes` for local
//! processes).

use std::path::Path;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use colloquy_chaos::nginx;
use colloquy_core::wire::ServerFrame;
use colloquy_testkit::TestApp;
use colloquy_testkit::client::WsClient;
use colloquy_testkit::harness::TestAppBuilder;
use colloquy_testkit::process::{ManagedProcess, ProcessSpec, free_port, wait_port};

const T: Duration = Duration::from_secs(20);

/// nginx running the rendered edge configuration in a temporary prefix.
struct Edge {
    nginx: ManagedProcess,
    port: u16,
    prefix: tempfile::TempDir,
}

impl Edge {
    async fn start(bin: &Path, gateways: &[u16]) -> anyhow::Result<Self> {
        let prefix = tempfile::tempdir()?;
        let port = free_port()?;
        let args = nginx::prepare(prefix.path(), port, gateways, nginx::EdgeLimits::default())?;
        let log = prefix.path().join("nginx.out");
        let mut edge = Self {
            nginx: ManagedProcess::new(ProcessSpec::new(bin, prefix.path(), log).args(args)),
            port,
            prefix,
        };
        edge.nginx.start()?;
        if let Err(e) = wait_port(port, Duration::from_secs(5)).await {
            anyhow::bail!("nginx did not listen ({e}): {}", edge.error_log());
        }
        Ok(edge)
    }

    fn http(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn ws(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(self.prefix.path().join("logs/nginx-access.log"))
            .unwrap_or_default()
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.prefix.path().join(nginx::ERROR_LOG)).unwrap_or_default()
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        // SIGQUIT (graceful) lets the master take its workers down with it; the child is
        // killed as it is dropped when it has not exited by then.
        self.nginx
            .signal_and_wait_blocking("QUIT", Duration::from_secs(5));
    }
}

/// A stack of two gateways with nginx in front, or `None` (with a notice) without nginx.
async fn stack(
    test: &str,
    tweak: impl FnOnce(TestAppBuilder) -> TestAppBuilder,
) -> Option<(TestApp, Edge)> {
    let Some(bin) = nginx::binary() else {
        eprintln!("SKIPPED {test}: nginx is not installed");
        return None;
    };
    let app = tweak(TestApp::builder().gateways(2))
        .spawn()
        .await
        .expect("stack");
    let ports: Vec<u16> = app.gateways.iter().map(|g| g.port).collect();
    let edge = Edge::start(&bin, &ports).await.expect("nginx");
    Some((app, edge))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_gets_its_1009_close_through_the_edge() {
    let Some((app, edge)) = stack("oversized_frame", |b| {
        b.gateway_config(|g| g.max_frame_bytes = 65_536)
    })
    .await
    else {
        return;
    };
    let token = app.token("bigmouth").await.unwrap();
    // A message over the frame limit, and a 4 MiB frame (most of it still unread by the gateway
    // when it closes). Like a browser, the client reads while it sends.
    for size in [200_000, 4 * 1024 * 1024] {
        let url = format!("{}/ws?userid=bigmouth&token={token}", edge.ws());
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let (mut sink, mut stream) = ws.split();
        let frame = format!(r#"{{"type":"message","content":"{}"}}"#, "z".repeat(size));
        // The send may fail once the gateway has closed: the close frame is what counts.
        let sending = tokio::spawn(async move { sink.send(Message::Text(frame.into())).await });
        let close = tokio::time::timeout(T, async {
            while let Some(m) = stream.next().await {
                match m {
                    Ok(Message::Close(Some(f))) => {
                        return Some((u16::from(f.code), f.reason.to_string()));
                    }
                    Ok(Message::Close(None)) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
            None
        })
        .await
        .expect("the socket ends in time");
        sending.abort();
        let (code, reason) =
            close.unwrap_or_else(|| panic!("{size} bytes: no close frame reached the client"));
        assert_eq!(code, 1009, "{size} bytes: {reason}");
        assert!(reason.contains("too large"), "{reason}");
    }
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_ready_are_not_served_at_the_edge_and_logs_carry_no_query() {
    let Some((app, edge)) = stack("internal_endpoints", |b| b).await else {
        return;
    };
    let http = reqwest::Client::new();
    for path in ["/metrics", "/ready", "/metrics?x=1", "/ready/"] {
        let status = http
            .get(format!("{}{path}", edge.http()))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 404, "{path} at the edge");
    }
    // Still served on the gateways' own ports.
    let direct = http
        .get(format!("{}/metrics", app.http_base(0)))
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 200);
    // The chat page is public; a token in a query string never reaches the log.
    let page = http
        .get(format!("{}/?token=SECRET-IN-QUERY", edge.http()))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let token = app.token("logged").await.unwrap();
    let mut ws = WsClient::connect(&edge.ws(), "logged", &token, None)
        .await
        .unwrap();
    ws.welcome(T).await.unwrap();
    ws.close().await;
    let mut log = String::new();
    for _ in 0..50 {
        log = edge.access_log();
        if log.contains("GET /ws ") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(log.contains("GET / ") && log.contains("GET /ws "), "{log}");
    assert!(
        !log.contains("SECRET-IN-QUERY") && !log.contains(&token) && !log.contains("token="),
        "a query string in the access log:\n{log}"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_requests_and_sockets_per_address_are_limited() {
    let Some((app, edge)) = stack("edge_limits", |b| {
        b.gateway_config(|g| g.max_connections_per_user = 1_000)
    })
    .await
    else {
        return;
    };
    let http = reqwest::Client::new();
    // /token: a burst of 200 passes, then 20 a second; 300 at once must meet a 429.
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..300 {
        let request = http
            .post(format!("{}/token", edge.http()))
            .query(&[("userid", "burst")])
            .send();
        requests.spawn(request);
    }
    let statuses: Vec<_> = requests.join_all().await;
    let limited = statuses
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|r| r.status() == 429))
        .count();
    let ok = statuses
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|r| r.status() == 200))
        .count();
    assert!(ok >= 200, "the burst passes: {ok} ok");
    assert!(limited > 0, "no 429 after the burst ({ok} ok)");
    // /ws: 256 sockets per client address; the next upgrade is refused.
    let token = colloquy_testkit::client::fetch_token(&http, &app.http_base(0), "crowd")
        .await
        .unwrap();
    let mut open = Vec::new();
    for _ in 0..256 {
        let mut ws = WsClient::connect(&edge.ws(), "crowd", &token, None)
            .await
            .unwrap();
        ws.recv_until(T, |f| matches!(f, ServerFrame::Welcome { .. }))
            .await
            .unwrap();
        open.push(ws);
    }
    let refused = WsClient::connect(&edge.ws(), "crowd", &token, None).await;
    let err = refused.expect_err("socket 257 from one address");
    assert!(err.to_string().contains("429"), "{err:#}");
    drop(open);
    app.shutdown().await;
}
