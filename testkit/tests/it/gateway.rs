//! The gateway's edge behaviour through real sockets: auth, limits, bad input, rate limits,
//! fan-out limits, graceful drain, readiness and the Redis fallback; resume (`welcome`,
//! `resume`, `resumed`), the original protocol, origins, token expiry and dead peers.

use std::time::Duration;

use colloquy_core::UserId;
use colloquy_core::wire::{ErrorCode, ServerFrame};
use colloquy_gateway::auth::TokenService;
use colloquy_gateway::config::BUILT_IN_SECRET;
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
        .unwrap()
        .issue(&alice)
        .unwrap();
    let expired = TokenService::new(&SecretString::from(BUILT_IN_SECRET), 60)
        .unwrap()
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
    // The session is open once its welcome (read from Redis) arrived.
    ws.welcome(T).await.unwrap();
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

/// The `response` frame to `id`, and its event id.
async fn answer_of(ws: &mut WsClient, id: &str) -> String {
    match ws.response_to(id, T).await.expect("response") {
        ServerFrame::Response { event_id, .. } => event_id,
        other => panic!("not a response: {other:?}"),
    }
}

async fn acked(ws: &mut WsClient, id: &str) {
    ws.recv_until(
        T,
        |f| matches!(f, ServerFrame::Ack { id: i, .. } if i == id),
    )
    .await
    .expect("ack");
}

async fn resumed(ws: &mut WsClient) -> bool {
    match ws
        .recv_until(T, |f| matches!(f, ServerFrame::Resumed { .. }))
        .await
        .expect("resumed")
    {
        ServerFrame::Resumed { recovered } => recovered,
        _ => unreachable!(),
    }
}

/// Waits until `user`'s inbox holds `n` entries (the relay wrote them).
async fn inbox_holds(app: &TestApp, user: &str, n: usize) {
    let pool = colloquy_core::redis::pool(&app.redis())
        .await
        .expect("Redis pool");
    let key = app
        .names
        .inbox_key(&UserId::parse(user).expect("a valid userid"));
    for _ in 0..300 {
        let len: usize = fred::prelude::StreamsInterface::xlen(&pool, &key)
            .await
            .expect("XLEN");
        if len >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the inbox of {user} never held {n} entries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcome_gives_the_position_and_resume_replays_whatever_its_age() {
    let mut app = TestApp::spawn().await.unwrap();
    let user = "resumer";
    let mut ws = app.connect(0, user).await.unwrap();
    assert_eq!(
        ws.welcome(T).await.unwrap(),
        "0-0",
        "an empty inbox is at 0-0"
    );
    ws.send_message("r1", "first question").await.unwrap();
    let e1 = answer_of(&mut ws, "r1").await;
    ws.close().await;

    // The relay pauses: the second answer is acked but not delivered while the client is away.
    app.stop_relay().await;
    let mut ws = app.connect(0, user).await.unwrap();
    assert_eq!(ws.welcome(T).await.unwrap(), e1);
    ws.send_message("r2", "second question").await.unwrap();
    acked(&mut ws, "r2").await;
    ws.close().await;
    app.start_relay().await.unwrap();
    inbox_holds(&app, user, 2).await;

    // Reconnect without a cursor: the welcome says where the stream is now...
    let mut ws = app.connect(0, user).await.unwrap();
    let e2 = ws.welcome(T).await.unwrap();
    assert_ne!(e2, e1);
    // ...and resuming from the cursor the client held replays the answer it missed.
    ws.resume(&e1).await.unwrap();
    assert_eq!(answer_of(&mut ws, "r2").await, e2);
    assert!(resumed(&mut ws).await);
    // A resume may go further back than what this socket wrote: the rest is replayed, and
    // nothing twice (r2 again would come before the `resumed`).
    ws.resume("0-0").await.unwrap();
    let mut seen = Vec::new();
    loop {
        match ws.recv(T).await.unwrap() {
            Received::Frame(ServerFrame::Response { id, .. }) => seen.push(id),
            Received::Frame(ServerFrame::Resumed { recovered }) => {
                assert!(recovered);
                break;
            }
            Received::Frame(_) => {}
            Received::Closed { code, reason } => panic!("closed {code}: {reason}"),
        }
    }
    assert_eq!(seen, ["r1"], "only what this socket had not written");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_had_an_answer_gets_its_first_after_reconnecting() {
    let mut app = TestApp::spawn().await.unwrap();
    let user = "newcomer";
    let mut ws = app.connect(0, user).await.unwrap();
    let cursor = ws.welcome(T).await.unwrap();
    app.stop_relay().await;
    ws.send_message("n1", "hello?").await.unwrap();
    acked(&mut ws, "n1").await;
    ws.close().await;
    app.start_relay().await.unwrap();
    inbox_holds(&app, user, 1).await;
    let token = app.token(user).await.unwrap();
    let mut ws = WsClient::connect(&app.ws_base(0), user, &token, Some(&cursor))
        .await
        .unwrap();
    answer_of(&mut ws, "n1").await;
    assert!(resumed(&mut ws).await);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trimmed_or_expired_inbox_is_reported_as_not_recovered() {
    use fred::prelude::*;
    let app = TestApp::spawn().await.unwrap();
    let user = UserId::parse("trimmed").unwrap();
    let pool = colloquy_core::redis::pool(&app.redis()).await.unwrap();
    let key = app.names.inbox_key(&user);
    let mut ids = Vec::new();
    for n in 0..3 {
        let d = colloquy_core::records::Delivery {
            event_id: None,
            msg_id: format!("t{n}"),
            userid: user.clone(),
            received_at_ms: 0,
            timestamp: "2026-01-01T00:00:00Z".into(),
            relayed_at_ms: 0,
            traceparent: None,
            body: colloquy_core::records::ResponseBody::Final {
                content: format!("answer {n}"),
                prompt_tokens: 1,
                completion_tokens: 1,
                whole: false,
            },
        };
        let id: String = pool
            .xadd(
                &key,
                false,
                None::<()>,
                "*",
                vec![(
                    colloquy_core::records::INBOX_FIELD,
                    serde_json::to_string(&d).unwrap(),
                )],
            )
            .await
            .unwrap();
        ids.push(id);
    }
    let _: i64 = pool.xtrim(&key, ("MAXLEN", "=", 1i64)).await.unwrap();
    let token = app.token("trimmed").await.unwrap();
    let connect = |after: &str| {
        let (base, token, after) = (app.ws_base(0), token.clone(), after.to_owned());
        async move {
            WsClient::connect(&base, "trimmed", &token, Some(&after))
                .await
                .unwrap()
        }
    };
    // The entry after the first cursor was trimmed: what is left comes, marked incomplete.
    let mut ws = connect(&ids[0]).await;
    answer_of(&mut ws, "t2").await;
    assert!(!resumed(&mut ws).await, "t1 is gone");
    // A cursor below the first entry kept cannot be told complete (Redis does not say which
    // ids trimming removed), so it is reported cautiously...
    let mut ws = connect(&ids[1]).await;
    answer_of(&mut ws, "t2").await;
    assert!(!resumed(&mut ws).await);
    // ...while a cursor at the first entry kept is complete.
    let mut ws = connect(&ids[2]).await;
    assert!(resumed(&mut ws).await);
    // An expired inbox cannot prove anything after a non-zero cursor.
    let _: i64 = pool.del(&key).await.unwrap();
    let mut ws = connect(&ids[2]).await;
    assert!(!resumed(&mut ws).await);
    let mut ws = connect("0-0").await;
    assert!(resumed(&mut ws).await, "nothing was ever there");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_original_protocol_client_that_reads_only_responses_keeps_working() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let app = TestApp::spawn().await.unwrap();
    let token = app.token("oldtimer").await.unwrap();
    let url = format!("{}/ws?userid=oldtimer&token={token}", app.ws_base(0));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(Message::Text(
        r#"{"type":"message","content":"hello from 2019","userid":"oldtimer"}"#.into(),
    ))
    .await
    .unwrap();
    // The original client: it knows `response` and ignores every other frame type.
    let mut ignored = Vec::new();
    let answer = tokio::time::timeout(T, async {
        while let Some(Ok(m)) = ws.next().await {
            let Message::Text(t) = m else { continue };
            let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
            if v["type"] == "response" {
                return v;
            }
            ignored.push(v["type"].as_str().unwrap_or_default().to_owned());
        }
        panic!("socket ended before the response");
    })
    .await
    .expect("a response in time");
    assert_eq!(answer["userid"], "oldtimer");
    assert!(
        answer["content"]
            .as_str()
            .unwrap()
            .contains("hello from 2019")
    );
    assert!(answer["timestamp"].is_string() && answer["event_id"].is_string());
    assert!(
        ignored.iter().any(|t| t == "welcome"),
        "the new frames were there, and ignored: {ignored:?}"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_frames_are_rate_limited_per_socket() {
    let app = TestApp::builder()
        .gateway_config(|g| {
            g.resume_burst = 2;
            g.resume_refill_ms = 60_000;
        })
        .spawn()
        .await
        .unwrap();
    let mut ws = app.connect(0, "replayer").await.unwrap();
    for _ in 0..3 {
        ws.resume("0-0").await.unwrap();
    }
    let ServerFrame::Error { message, .. } = expect_error(&mut ws, ErrorCode::RateLimited).await
    else {
        unreachable!()
    };
    assert!(message.contains("resume"), "{message}");
    still_open(&mut ws).await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_origins_must_be_allowed_outside_dev_mode() {
    const SECRET: &str = "an-integration-test-secret-of-32+bytes";
    let app = TestApp::builder()
        .gateway_config(|g| {
            g.dev = false;
            g.auth_secret = SecretString::from(SECRET);
            g.admin_token = Some(SecretString::from("admin"));
            g.allowed_origins = vec!["https://chat.example.com".into()];
        })
        .spawn()
        .await
        .unwrap();
    let token = TokenService::new(&SecretString::from(SECRET), 60)
        .unwrap()
        .issue(&UserId::parse("origin_user").unwrap())
        .unwrap();
    let base = app.ws_base(0);
    let open = |origin: Option<&'static str>| {
        let (base, token) = (base.clone(), token.clone());
        async move {
            WsClient::connect_with_origin(&base, "origin_user", &token, None, origin)
                .await
                .unwrap()
        }
    };
    for refused in ["https://evil.example", "http://localhost:3000", "null"] {
        let mut ws = open(Some(refused)).await;
        assert_eq!(
            expect_close(&mut ws, 1008).await,
            "origin not allowed",
            "{refused}"
        );
    }
    for allowed in [Some("https://chat.example.com"), None] {
        let mut ws = open(allowed).await;
        ws.welcome(T).await.expect("welcome");
        still_open(&mut ws).await;
    }
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_is_closed_with_1008_when_its_token_expires() {
    let app = TestApp::builder()
        .gateway_config(|g| g.token_ttl_secs = 2)
        .spawn()
        .await
        .unwrap();
    let mut ws = app.connect(0, "shortlived").await.unwrap();
    ws.welcome(T).await.unwrap();
    assert_eq!(expect_close(&mut ws, 1008).await, "token expired");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peers_are_pinged_then_closed_and_answering_ones_stay() {
    let app = TestApp::builder()
        .gateway_config(|g| {
            g.ping_interval_secs = 1;
            g.idle_timeout_secs = 3;
        })
        .spawn()
        .await
        .unwrap();
    let mut silent = app.connect(0, "sleeper").await.unwrap();
    let mut alive = app.connect(0, "awake").await.unwrap();
    // The live client reads (its WebSocket library answers each ping) for longer than the
    // idle timeout; the silent one reads nothing meanwhile, so it answers no ping.
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < until {
        match alive.recv(Duration::from_millis(200)).await {
            Ok(Received::Closed { code, reason }) => panic!("closed {code}: {reason}"),
            Ok(Received::Frame(_)) | Err(_) => {}
        }
    }
    still_open(&mut alive).await;
    // The gateway closed the silent one: its close frame (1001) is queued behind the pings, and
    // the client's late pongs may hit the closed socket first (then the library reports 1006).
    let ended = loop {
        match silent
            .recv(T)
            .await
            .expect("the gateway ends the silent socket")
        {
            Received::Closed { code, reason } => break (code, reason),
            Received::Frame(_) => {}
        }
    };
    assert!(
        ended == (1001, "no answer to pings".to_owned()) || ended.0 == 1006,
        "{ended:?}"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_opened_together_are_pinged_spread_over_the_interval() {
    const INTERVAL: Duration = Duration::from_secs(6);
    let app = TestApp::builder()
        .gateway_config(|g| {
            g.ping_interval_secs = INTERVAL.as_secs();
            g.idle_timeout_secs = 60;
        })
        .spawn()
        .await
        .unwrap();
    let mut sockets = Vec::new();
    for i in 0..16 {
        let mut ws = app.connect(0, &format!("herd-{i}")).await.unwrap();
        ws.welcome(T).await.unwrap();
        sockets.push(ws);
    }
    let opened = tokio::time::Instant::now();
    let pings =
        futures::future::join_all(sockets.iter_mut().map(|ws| ws.next_ping(INTERVAL + T))).await;
    let after: Vec<Duration> = pings
        .into_iter()
        .map(|p| p.unwrap().saturating_duration_since(opened))
        .collect();
    let (first, last) = (after.iter().min().unwrap(), after.iter().max().unwrap());
    // Without the spread all 16 first pings fall in the tick one interval after the opens
    // (within the few hundred milliseconds the opens took).
    assert!(
        *last - *first >= INTERVAL / 3,
        "first pings all within {:?} of each other: {after:?}",
        *last - *first
    );
    assert!(
        *last <= INTERVAL + Duration::from_secs(3),
        "a first ping came later than one interval: {after:?}"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_while_redis_is_down_fails_fast_with_1013() {
    let mut app = TestApp::spawn().await.unwrap();
    // Tokens need no Redis; take them first.
    let token = app.token("stranded").await.unwrap();
    app.infra.kill_redis().await.unwrap();
    // "Down" as the gateway knows it: until its subscriber has seen the connection drop (it
    // reports `deliveries: false` on /ready), a socket registers and waits for its subscribe,
    // holding one of the user's socket slots, and the twentieth would get "too many connections".
    let ready = format!("{}/ready", app.http_base(0));
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let body: serde_json::Value = app
            .http
            .get(&ready)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if body["deliveries"] == serde_json::Value::Bool(false) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway never saw Redis go: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Twenty sockets at once, each refused at once: none waits behind the others' Redis timeouts
    // (which, queued at 2 s each, would take 40 s: longer than T).
    let base = app.ws_base(0);
    let refused = futures::future::join_all((0..20).map(|_| {
        let (base, token) = (base.clone(), token.clone());
        async move {
            let mut ws = WsClient::connect(&base, "stranded", &token, None)
                .await
                .unwrap();
            expect_close(&mut ws, 1013).await
        }
    }));
    let reasons = tokio::time::timeout(T, refused)
        .await
        .expect("every refusal within T");
    assert!(
        reasons.iter().all(|r| r.contains("unavailable")),
        "{reasons:?}"
    );
    app.infra.start_redis().await.unwrap();
    app.shutdown().await;
}

/// The sum of every series of `name` in a Prometheus exposition.
fn metric_sum(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| matches!(l.as_bytes().get(name.len()), Some(b' ' | b'{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn replays_queued(app: &TestApp) -> f64 {
    let text = app
        .http
        .get(format!("{}/metrics", app.http_base(0)))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("the exposition");
    metric_sum(&text, colloquy_core::metrics::REPLAYS_QUEUED)
}

/// The gateway's subscriber connection drops while answers reach the inboxes but not the
/// channels: once it has re-subscribed, every socket replays what it missed, and the replays
/// queue for the gateway's replay slots (one here) instead of hitting Redis all at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_subscriber_makes_every_socket_replay_through_bounded_slots() {
    use colloquy_core::records::{Delivery, INBOX_FIELD, ResponseBody};
    use fred::prelude::*;

    const USERS: usize = 24;
    let app = TestApp::builder()
        .gateway_config(|c| c.max_concurrent_replays = 1)
        .spawn()
        .await
        .unwrap();
    let mut sockets = Vec::with_capacity(USERS);
    for i in 0..USERS {
        let user = format!("replayer-{i}");
        let mut ws = app.connect(0, &user).await.unwrap();
        ws.welcome(T).await.unwrap();
        sockets.push((user, ws));
    }
    let queued_before = replays_queued(&app).await;

    // Answers the channel never carried: in each inbox, as if the relay had published them while
    // the gateway's subscriber was away.
    let redis = colloquy_core::redis::pool(&app.redis()).await.unwrap();
    for (user, _) in &sockets {
        let userid = UserId::parse(user).unwrap();
        let delivery = Delivery {
            event_id: None,
            msg_id: format!("missed-{user}"),
            userid: userid.clone(),
            received_at_ms: colloquy_core::now_ms(),
            timestamp: "2026-12-06T00:00:00Z".into(),
            relayed_at_ms: colloquy_core::now_ms(),
            traceparent: None,
            body: ResponseBody::Final {
                content: format!("for {user}"),
                prompt_tokens: 1,
                completion_tokens: 1,
                whole: false,
            },
        };
        let _: String = redis
            .xadd(
                app.names.inbox_key(&userid),
                false,
                None,
                "*",
                vec![(INBOX_FIELD, serde_json::to_string(&delivery).unwrap())],
            )
            .await
            .unwrap();
    }
    let killed: i64 = redis
        .custom(
            fred::types::CustomCommand::new_static("CLIENT", None, false),
            vec!["KILL", "TYPE", "pubsub"],
        )
        .await
        .unwrap();
    assert_eq!(killed, 1, "the gateway holds one subscriber connection");

    for (user, ws) in &mut sockets {
        match ws.response_to(&format!("missed-{user}"), T).await.unwrap() {
            ServerFrame::Response { content, .. } => assert_eq!(content, format!("for {user}")),
            other => panic!("not a response: {other:?}"),
        }
    }
    let queued = replays_queued(&app).await - queued_before;
    assert!(
        queued >= 1.0,
        "{USERS} replays at once through one slot, and none waited for it"
    );
    app.shutdown().await;
}

/// A Redis of our own that answers `LOADING` for several seconds after it starts: a dump of
/// 20,000 keys loaded with a delay per key, serving clients between keys.
struct LoadingRedis {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl LoadingRedis {
    fn start() -> anyhow::Result<Self> {
        use anyhow::Context;
        use colloquy_testkit::process::{RedisPersistence, free_port, redis_args, redis_binary};
        use std::process::{Command, Stdio};
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let program = redis_binary()?;
        // No append-only file, but a dump written by SAVE and read at start.
        let redis = |extra: &[&str]| {
            Command::new(&program)
                .args(redis_args(port, &RedisPersistence::None))
                .args(["--dbfilename", "dump.rdb"])
                .arg("--dir")
                .arg(dir.path())
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("redis-server")
        };
        let cli = |args: &[&str]| {
            Command::new("redis-cli")
                .args(["-p", &port.to_string()])
                .args(args)
                .output()
                .context("redis-cli")
        };
        // Write the dump with a plain Redis.
        let mut writer = redis(&[])?;
        let mut written = false;
        for _ in 0..100 {
            let out = cli(&[
                "eval",
                "for i=1,20000 do redis.call('SET','k'..i,'v') end return 1",
                "0",
            ])?;
            if String::from_utf8_lossy(&out.stdout).trim() == "1" {
                written = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        anyhow::ensure!(written, "could not fill the seed Redis");
        cli(&["save"])?;
        cli(&["shutdown", "nosave"])?;
        let _ = writer.wait();
        // 20,000 keys at 400 µs each: about 8 s of LOADING, answering clients every 1 kB.
        let child = redis(&[
            "--key-load-delay",
            "400",
            "--loading-process-events-interval-bytes",
            "1024",
        ])?;
        Ok(Self {
            child,
            port,
            _dir: dir,
        })
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// What Redis answers to PING right now (`PONG`, or the `LOADING` error).
    fn ping(&self) -> String {
        std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "ping"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    }
}

impl Drop for LoadingRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// fred's first connection gets `LOADING` from Redis, the pool's and the subscriber's `init()`
// fail with it, and fred does not retry a failed initial connection: `core/src/redis.rs` keeps
// calling `init()` in the background until it succeeds, so the gateway becomes ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_started_while_redis_is_loading_becomes_ready_when_redis_does() {
    let app = TestApp::spawn().await.unwrap();
    let redis = LoadingRedis::start().unwrap();
    // Wait until the new Redis answers at all, and answers LOADING.
    let mut answer = String::new();
    for _ in 0..100 {
        answer = redis.ping();
        if !answer.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        answer.starts_with("LOADING"),
        "Redis is loading: {answer:?}"
    );
    let gw = colloquy_gateway::Application::build(colloquy_gateway::Settings {
        gateway: colloquy_gateway::config::GatewayConfig::local("127.0.0.1:0".parse().unwrap()),
        kafka: app.kafka(),
        redis: colloquy_core::config::RedisConfig::local(redis.url()),
        names: app.names.clone(),
    })
    .await
    .unwrap();
    let port = gw.port();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(gw.run_until_stopped(stop.clone()));
    let ready = format!("http://127.0.0.1:{port}/ready");
    let status = app.http.get(&ready).send().await.unwrap().status();
    if redis.ping().starts_with("LOADING") {
        assert_eq!(status, 503, "not ready while Redis loads");
    }
    // Ready once Redis is, well within a minute.
    let mut became_ready = false;
    for _ in 0..600 {
        if app.http.get(&ready).send().await.unwrap().status() == 200 {
            became_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(redis.ping(), "PONG");
    assert!(
        became_ready,
        "the gateway never became ready after Redis loaded"
    );
    // And it serves: a socket gets its welcome.
    let token = colloquy_testkit::client::fetch_token(
        &app.http,
        &format!("http://127.0.0.1:{port}"),
        "after_loading",
    )
    .await
    .unwrap();
    // A socket is told to try again (1013) when its first inbox read fails; on a loaded machine
    // the first read after the load can outlast its 2 s timeout, so a client may retry, as real
    // clients do, a few times.
    let mut welcomed = Err(anyhow::anyhow!("never tried"));
    for _ in 0..3 {
        let mut ws = WsClient::connect(
            &format!("ws://127.0.0.1:{port}"),
            "after_loading",
            &token,
            None,
        )
        .await
        .unwrap();
        welcomed = ws.welcome(T).await;
        match &welcomed {
            Err(e) if e.to_string().contains("1013") => {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            _ => break,
        }
    }
    welcomed.expect("a welcome after Redis loaded");
    stop.cancel();
    let _ = task.await;
    app.shutdown().await;
}

/// A vanished Redis costs a message at most the limiter's short budget, never the pool's
/// command timeout: with a 30 s timeout (and its retry) every message in flight used to wait
/// it out before the local limiter decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_redis_does_not_hold_messages_for_the_command_timeout() {
    use colloquy_core::names::Names;
    use colloquy_gateway::rate_limit::{Decision, Gcra, RateLimiter};

    let mut infra = colloquy_testkit::infra::Infra::start().await.unwrap();
    let mut cfg = colloquy_core::config::RedisConfig::local(infra.redis_url.clone());
    cfg.command_timeout_ms = 30_000;
    let pool = colloquy_core::redis::pool(&cfg).await.unwrap();
    let limiter = RateLimiter::new(
        Gcra::per_period(2, Duration::from_secs(60)),
        pool,
        Names::default(),
    );
    let user = UserId::parse("hasty").unwrap();
    infra.kill_redis().await.unwrap();
    // Far below the 30 s timeout, far above the budget: a liveness bound, not a speed test.
    let within = Duration::from_secs(10);
    for expected in [
        Decision::Allowed,
        Decision::Allowed,
        Decision::Limited {
            retry_after_ms: 30_000,
        },
    ] {
        let decided = tokio::time::timeout(within, limiter.check(&user))
            .await
            .expect("the local limiter decides while Redis is gone");
        match (decided, expected) {
            (Decision::Limited { .. }, Decision::Limited { .. }) => {}
            (d, e) => assert_eq!(d, e),
        }
    }
}
