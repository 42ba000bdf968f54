//! Delivery end to end: WebSocket → gateway → Kafka → ai-consumer → LLM → Kafka → relay →
//! Redis → gateway → WebSocket, through real Kafka and Redis.

use std::time::Duration;

use colloquy_core::wire::ServerFrame;
use colloquy_testkit::TestApp;
use colloquy_testkit::client::Received;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_acked_streamed_and_answered() {
    let app = TestApp::spawn().await.expect("stack");
    let mut ws = app.connect(0, "alice").await.unwrap();
    ws.send_message("m1", "hello there").await.unwrap();

    let mut acked = false;
    let mut deltas = String::new();
    let response = loop {
        match ws.recv(T).await.unwrap() {
            Received::Frame(ServerFrame::Ack { id, trace_id }) => {
                assert_eq!(id, "m1");
                assert_eq!(trace_id.len(), 32);
                assert_ne!(trace_id, "0".repeat(32));
                acked = true;
            }
            Received::Frame(ServerFrame::Delta { id, content, .. }) => {
                assert_eq!(id, "m1");
                deltas.push_str(&content);
            }
            Received::Frame(f @ ServerFrame::Response { .. }) => break f,
            // The welcome may still be in flight when `connect` returns.
            Received::Frame(ServerFrame::Welcome { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(acked, "ack must precede the response");
    let ServerFrame::Response {
        id,
        content,
        userid,
        event_id,
        timestamp,
    } = response
    else {
        unreachable!()
    };
    assert_eq!((id.as_str(), userid.as_str()), ("m1", "alice"));
    assert!(content.contains("hello there"), "{content}");
    assert!(
        content.starts_with(&deltas),
        "deltas are a prefix of the answer: {deltas:?} vs {content:?}"
    );
    assert!(colloquy_core::wire::EventId::parse(&event_id).is_some());
    assert!(chrono::DateTime::parse_from_rfc3339(&timestamp).is_ok());
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn original_protocol_client_works_unchanged() {
    let app = TestApp::spawn().await.expect("stack");
    let mut ws = app.connect(0, "legacy_user").await.unwrap();
    for i in 0..3 {
        ws.send_raw(&format!(
            r#"{{"type":"message","content":"old style {i}","userid":"legacy_user"}}"#
        ))
        .await
        .unwrap();
    }
    let mut answers = Vec::new();
    while answers.len() < 3 {
        if let ServerFrame::Response {
            content, userid, ..
        } = ws
            .recv_until(T, |f| matches!(f, ServerFrame::Response { .. }))
            .await
            .unwrap()
        {
            assert_eq!(userid, "legacy_user");
            answers.push(content);
        }
    }
    // One user's messages are answered in the order sent (the original answered them out of order).
    for (i, a) in answers.iter().enumerate() {
        assert!(
            a.contains(&format!("old style {i}")),
            "answer {i} out of order: {answers:?}"
        );
    }
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tab_of_a_user_gets_the_answer_across_gateways() {
    let app = TestApp::builder().gateways(2).spawn().await.expect("stack");
    let mut tab_a = app.connect(0, "multi_tab").await.unwrap();
    let mut tab_b = app.connect(1, "multi_tab").await.unwrap();
    tab_a.send_message("q1", "to both tabs").await.unwrap();
    let a = tab_a.response_to("q1", T).await.unwrap();
    let b = tab_b.response_to("q1", T).await.unwrap();
    assert_eq!(a, b);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_missed_while_away_are_replayed_on_resume_without_duplicates() {
    let app = TestApp::builder().gateways(2).spawn().await.expect("stack");
    let mut ws = app.connect(0, "roamer").await.unwrap();
    ws.send_message("r1", "first").await.unwrap();
    let ServerFrame::Response {
        event_id: cursor, ..
    } = ws.response_to("r1", T).await.unwrap()
    else {
        unreachable!()
    };
    ws.send_message("r2", "second").await.unwrap();
    ws.send_message("r3", "third").await.unwrap();
    ws.recv_until(
        T,
        |f| matches!(f, ServerFrame::Ack { id, .. } if id == "r3"),
    )
    .await
    .unwrap();
    ws.close().await;

    // Reconnect to the other gateway and resume after the first answer.
    let mut ws = app.connect(1, "roamer").await.unwrap();
    ws.send(&colloquy_core::wire::ClientFrame::Resume {
        after: cursor.clone(),
    })
    .await
    .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        if let ServerFrame::Response { id, event_id, .. } = ws
            .recv_until(T, |f| matches!(f, ServerFrame::Response { .. }))
            .await
            .unwrap()
        {
            assert!(
                colloquy_core::wire::EventId::parse(&event_id)
                    > colloquy_core::wire::EventId::parse(&cursor)
            );
            seen.push(id);
        }
    }
    assert_eq!(seen, vec!["r2".to_owned(), "r3".to_owned()]);
    // A second resume with the same cursor must not repeat anything on this connection.
    ws.send(&colloquy_core::wire::ClientFrame::Resume { after: cursor })
        .await
        .unwrap();
    ws.send(&colloquy_core::wire::ClientFrame::Ping)
        .await
        .unwrap();
    let next = ws
        .recv_until(T, |f| {
            matches!(f, ServerFrame::Response { .. } | ServerFrame::Pong)
        })
        .await
        .unwrap();
    assert_eq!(next, ServerFrame::Pong);
    tokio::time::sleep(Duration::from_millis(500)).await;
    ws.send(&colloquy_core::wire::ClientFrame::Ping)
        .await
        .unwrap();
    let next = ws
        .recv_until(T, |f| {
            matches!(f, ServerFrame::Response { .. } | ServerFrame::Pong)
        })
        .await
        .unwrap();
    assert_eq!(next, ServerFrame::Pong, "nothing replayed twice");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tab_that_stops_reading_loses_nothing_and_sees_nothing_twice() {
    use colloquy_testkit::fake_llm::FakeLlmConfig;
    // Long answers keep arriving while one tab does not read: its queue overflows, the gateway
    // drops live deliveries for it and must replay them from the inbox, while later answers
    // keep coming. Another tab of the same user sends, paced, and reads normally.
    let llm = FakeLlmConfig {
        tokens: 1500,
        ..FakeLlmConfig::default()
    };
    let app = TestApp::builder()
        .llm(colloquy_testkit::LlmChoice::Fake(llm))
        .consumer_config(|c| {
            c.memory_turns = 0;
            c.delta_batch_tokens = 100;
        })
        .spawn()
        .await
        .expect("stack");
    const N: usize = 600;
    let mut reader = app.connect(0, "slow_reader").await.unwrap();
    let mut sender = app.connect(0, "slow_reader").await.unwrap();
    let sending = tokio::spawn(async move {
        for i in 0..N {
            sender
                .send_message(&format!("s{i}"), &format!("long answer please {i}"))
                .await
                .unwrap();
            // Keep the sending tab's own socket drained.
            while let Ok(Ok(_)) = tokio::time::timeout(
                Duration::from_millis(1),
                sender.recv(Duration::from_millis(1)),
            )
            .await
            {}
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        sender
    });
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut seen = std::collections::HashSet::new();
    let mut events = std::collections::HashSet::new();
    while seen.len() < N {
        match reader.recv(Duration::from_secs(60)).await.unwrap() {
            Received::Frame(ServerFrame::Response { id, event_id, .. }) => {
                assert!(
                    events.insert(event_id.clone()),
                    "event {event_id} seen twice"
                );
                assert!(seen.insert(id.clone()), "answer to {id} seen twice");
            }
            Received::Frame(_) => {}
            other => panic!("unexpected {other:?} after {} answers", seen.len()),
        }
        // Read slowly at first, so the queue fills and drains while answers keep arriving.
        if seen.len() < N / 2 && seen.len() % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let _ = sending.await;
    app.shutdown().await;
}
