//! The gateway's edge behaviour through real sockets: auth, limits, bad input, rate limits,
//! fan-out limits, graceful drain, readiness and the Redis fallback.

use std::time::Duration;

use colloquy_core::UserId;
use colloquy_core::wire::{ErrorCode, ServerFrame};
use colloquy_gateway::auth::TokenService;
use colloquy_testkit::TestApp;
use colloquy_testkit::client::{Received, WsClient};
use secrecy::SecretString;

const T: Duration = Duration::from_secs(20);

async fn expect_close(ws: &mut WsClient, code: u16) -> String {
    loop {
        match ws.recv(T).await.expect("a frame or close") {
            Received::Closed { code: c, reason } => {
                assert_eq!(c, code, "close reason: {reason}");
                return reason;
            }
            Received::Frame(_) => {}
        }
    }
}

async fn expect_error(ws: &mut WsClient, code: ErrorCode) -> ServerFrame {
    ws.recv_until(
        T,
        |f| matches!(f, ServerFrame::Error { code: c, .. } if *c == code),
    )
    .await
    .expect("error frame")
}

async fn still_open(ws: &mut WsClient) {
    ws.send_raw(r#"{"type":"ping"}"#).await.expect("send ping");
    ws.recv_until(T, |f| matches!(f, ServerFrame::Pong))
        .await
        .expect("pong: the socket stays open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_close_with_1008_and_a_reason() {
    let app = TestApp::spawn().await.unwrap();
    let ws = app.ws_base(0);
    let alice = UserId::parse("alice").unwrap();
    let forged = TokenService::new(&SecretString::from("not-the-secret"), 60)
        .issue(&alice)
        .unwrap();
    let expired = TokenService::new(&SecretString::from("colloquy-dev-secret-change-me"), 60)
        .issue_at(&alice, 1_000, 2_000)
        .unwrap();
    let bobs = app.token("bob").await.unwrap();
    for (token, reason) in [
        ("", "missing token"),
        (forged.as_str(), "invalid token"),
        (expired.as_str(), "token expired"),
        (bobs.as_str(), "token does not belong"),
    ] {
        let mut c = WsClient::connect(&ws, "alice", token, None).await.unwrap();
        let got = expect_close(&mut c, 1008).await;
        assert!(got.starts_with(reason), "{got:?} for {reason}");
    }
    let mut c = WsClient::connect(&ws, "a:b", &bobs, None).await.unwrap();
    assert_eq!(expect_close(&mut c, 1008).await, "invalid userid");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_validates_and_honours_the_admin_token() {
    let app = TestApp::builder()
        .gateway_config(|g| g.admin_token = Some(SecretString::from("s3cret")))
        .spawn()
        .await
        .unwrap();
    let url = format!("{}/token", app.http_base(0));
    let no_auth = app
        .http
        .post(&url)
        .query(&[("userid", "carol")])
        .send()
        .await
        .unwrap();
    assert_eq!(no_auth.status(), 401);
    let ok = app
        .http
        .post(&url)
        .query(&[("userid", "carol")])
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let body: serde_json::Value = ok.json().await.unwrap();
    assert_eq!(body["userid"], "carol");
    assert!(body["expires_in"].as_u64().unwrap() > 0);
    let bad = app
        .http
        .post(&url)
        .query(&[("userid", "x y")])
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_own_error_and_the_socket_stays_open() {
    let app = TestApp::builder()
        .gateway_config(|g| g.max_content_bytes = 100)
        .spawn()
        .await
        .unwrap();
    let mut ws = app.connect(0, "fuzzer").await.unwrap();
    ws.send_raw("{not json").await.unwrap();
    expect_error(&mut ws, ErrorCode::InvalidMessage).await;
    ws.send_raw(r#"{"type":"launch_missiles"}"#).await.unwrap();
    expect_error(&mut ws, ErrorCode::InvalidMessage).await;
    ws.send_raw(&format!(
        r#"{{"type":"message","content":"{}"}}"#,
        "x".repeat(101)
    ))
    .await
    .unwrap();
    expect_error(&mut ws, ErrorCode::TooLarge).await;
    ws.send_binary(vec![0, 159, 146, 150]).await.unwrap();
    expect_error(&mut ws, ErrorCode::InvalidMessage).await;
    ws.send_raw(r#"{"type":"message","content":"hi","userid":"someone_else"}"#)
        .await
        .unwrap();
    expect_error(&mut ws, ErrorCode::InvalidMessage).await;
    still_open(&mut ws).await;
    // And it still works.
    ws.send_message("ok1", "after all that").await.unwrap();
    ws.response_to("ok1", T).await.unwrap();
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_close_with_1009() {
    let app = TestApp::builder()
        .gateway_config(|g| g.max_frame_bytes = 1024)
        .spawn()
        .await
        .unwrap();
    let mut ws = app.connect(0, "big_sender").await.unwrap();
    ws.send_raw(&format!(
        r#"{{"type":"message","content":"{}"}}"#,
        "y".repeat(4096)
    ))
    .await
    .unwrap();
    expect_close(&mut ws, 1009).await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_answers_rate_limited_with_retry_after_and_keeps_the_socket() {
    let app = TestApp::builder()
        .gateway_config(|g| {
            g.rate_limit_messages = 3;
            g.rate_limit_period_secs = 60;
        })
        .spawn()
        .await
        .unwrap();
    let mut ws = app.connect(0, "chatty").await.unwrap();
    for i in 0..3 {
        ws.send_message(&format!("c{i}"), "hello").await.unwrap();
    }
    ws.send_message("c3", "one too many").await.unwrap();
    let ServerFrame::Error {
        id, retry_after_ms, ..
    } = expect_error(&mut ws, ErrorCode::RateLimited).await
    else {
        unreachable!()
    };
    assert_eq!(id.as_deref(), Some("c3"));
    let wait = retry_after_ms.expect("retry_after_ms");
    assert!(wait > 0 && wait <= 20_000, "{wait}");
    still_open(&mut ws).await;
    // The limit is shared: another gateway instance sees the same budget.
    let second = app.start_gateway(0).await.unwrap();
    let token = app.token("chatty").await.unwrap();
    let mut other = WsClient::connect(
        &format!("ws://127.0.0.1:{}", second.port),
        "chatty",
        &token,
        None,
    )
    .await
    .unwrap();
    other
        .send_message("c4", "from another instance")
        .await
        .unwrap();
    expect_error(&mut other, ErrorCode::RateLimited).await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_falls_back_to_the_local_limiter_and_ready_reports_it() {
    let mut app = TestApp::builder()
        .gateway_config(|g| {
            g.rate_limit_messages = 2;
            g.rate_limit_period_secs = 60;
        })
        .spawn()
        .await
        .unwrap();
    let ready = format!("{}/ready", app.http_base(0));
    assert_eq!(app.http.get(&ready).send().await.unwrap().status(), 200);
    let mut ws = app.connect(0, "offline_redis").await.unwrap();
    app.infra.kill_redis().await.unwrap();
    assert_eq!(app.http.get(&ready).send().await.unwrap().status(), 503);
    for i in 0..2 {
        ws.send_message(&format!("o{i}"), "while redis is down")
            .await
            .unwrap();
        ws.recv_until(T, |f| matches!(f, ServerFrame::Ack { .. }))
            .await
            .expect("acked from Kafka alone");
    }
    ws.send_message("o2", "third").await.unwrap();
    expect_error(&mut ws, ErrorCode::RateLimited).await;
    app.infra.start_redis().await.unwrap();
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_sockets_for_one_user_close_with_1013() {
    let app = TestApp::builder()
        .gateway_config(|g| g.max_connections_per_user = 2)
        .spawn()
        .await
        .unwrap();
    let _a = app.connect(0, "tabby").await.unwrap();
    let mut b = app.connect(0, "tabby").await.unwrap();
    still_open(&mut b).await;
    let mut c = app.connect(0, "tabby").await.unwrap();
    expect_close(&mut c, 1013).await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_outage_gets_unavailable_with_the_id_never_an_ack() {
    let mut app = TestApp::builder()
        .produce_timeout_ms(1_500)
        .spawn()
        .await
        .unwrap();
    let mut ws = app.connect(0, "unlucky").await.unwrap();
    app.infra.kill_kafka().await.unwrap();
    ws.send_message("k1", "into the void").await.unwrap();
    let frame = ws
        .recv_until(T, |f| {
            matches!(f, ServerFrame::Ack { .. } | ServerFrame::Error { .. })
        })
        .await
        .unwrap();
    let ServerFrame::Error {
        code: ErrorCode::Unavailable,
        id,
        ..
    } = frame
    else {
        panic!("expected unavailable, got {frame:?}")
    };
    assert_eq!(id.as_deref(), Some("k1"));
    still_open(&mut ws).await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_sockets_with_1012_and_acked_messages_survive_it() {
    let mut app = TestApp::spawn().await.unwrap();
    let mut ws = app.connect(0, "drained").await.unwrap();
    ws.send_message("d1", "acked before").await.unwrap();
    ws.recv_until(
        T,
        |f| matches!(f, ServerFrame::Ack { id, .. } if id == "d1"),
    )
    .await
    .unwrap();
    // A second message races the shutdown: it may or may not be read and acked first.
    ws.send_message("d2", "racing the shutdown").await.unwrap();
    let running = app.gateways[0].running.take().unwrap();
    running.shutdown.cancel();
    let mut acked = vec!["d1".to_owned()];
    loop {
        match ws.recv(T).await.unwrap() {
            Received::Frame(ServerFrame::Ack { id, .. }) => acked.push(id),
            Received::Frame(_) => {}
            Received::Closed { code, .. } => {
                assert_eq!(code, 1012);
                break;
            }
        }
    }
    let _ = tokio::time::timeout(T, running.task).await;
    // Acked means stored: another gateway delivers every acked answer after a resume.
    let gw = app.start_gateway(0).await.unwrap();
    let token = colloquy_testkit::client::fetch_token(
        &app.http,
        &format!("http://127.0.0.1:{}", gw.port),
        "drained",
    )
    .await
    .unwrap();
    let mut ws = WsClient::connect(
        &format!("ws://127.0.0.1:{}", gw.port),
        "drained",
        &token,
        Some("0-0"),
    )
    .await
    .unwrap();
    for id in &acked {
        ws.response_to(id, T).await.unwrap();
    }
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_waiting_for_their_ack_are_bounded_per_socket() {
    let mut app = TestApp::builder()
        .produce_timeout_ms(20_000)
        .gateway_config(|g| g.max_in_flight_per_connection = 2)
        .spawn()
        .await
        .unwrap();
    let mut ws = app.connect(0, "impatient").await.unwrap();
    // With the broker gone, produces wait for their delivery report and stay in flight.
    app.infra.kill_kafka().await.unwrap();
    for i in 0..3 {
        ws.send_message(&format!("f{i}"), "waiting").await.unwrap();
    }
    let ServerFrame::Error {
        id,
        message,
        retry_after_ms,
        ..
    } = expect_error(&mut ws, ErrorCode::RateLimited).await
    else {
        unreachable!()
    };
    assert_eq!(id.as_deref(), Some("f2"));
    assert!(message.contains("waiting for their ack"), "{message}");
    assert!(retry_after_ms.is_some());
    still_open(&mut ws).await;
}
