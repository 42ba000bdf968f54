//! The ai-consumer against a wiremock OpenAI: exact attempt counts, Retry-After, fail-fast,
//! the dead-letter queue, idempotency, conversation memory and per-user order.

use std::time::{Duration, Instant};

use colloquy_core::wire::{ErrorCode, ServerFrame};
use colloquy_testkit::openai_mock::{echo_answer, last_user_message};
use colloquy_testkit::{LlmChoice, TestApp};

const T: Duration = Duration::from_secs(30);

async fn mock_app() -> TestApp {
    TestApp::builder()
        .llm(LlmChoice::Mock)
        .spawn()
        .await
        .expect("stack")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_429s_then_success_is_exactly_four_attempts() {
    let app = mock_app().await;
    app.mock().rate_limit_next(3, 0).await;
    app.mock().answer_streamed(&["fine ", "now"]).await;
    let mut ws = app.connect(0, "patient").await.unwrap();
    ws.send_message("b1", "please").await.unwrap();
    let ServerFrame::Response { content, .. } = ws.response_to("b1", T).await.unwrap() else {
        unreachable!()
    };
    assert_eq!(content, "fine now");
    assert_eq!(app.mock().requests().await.len(), 4);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let app = mock_app().await;
    app.mock().rate_limit_next(1, 2).await;
    app.mock().answer_streamed(&["ok"]).await;
    let mut ws = app.connect(0, "waiter").await.unwrap();
    let started = Instant::now();
    ws.send_message("w1", "hi").await.unwrap();
    ws.response_to("w1", T).await.unwrap();
    // Backoff here is capped at 200 ms, so only the server's Retry-After: 2 explains a 2 s wait.
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "retried after {:?}",
        started.elapsed()
    );
    assert_eq!(app.mock().requests().await.len(), 2);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_fails_fast_to_the_user_and_the_dlq() {
    let app = mock_app().await;
    app.mock().fail_next(10, 400, "invalid_request").await;
    let mut ws = app.connect(0, "rejected").await.unwrap();
    ws.send_message("x1", "bad").await.unwrap();
    let f = ws
        .recv_until(T, |f| {
            matches!(
                f,
                ServerFrame::Error {
                    code: ErrorCode::LlmFailed,
                    ..
                }
            )
        })
        .await
        .unwrap();
    let ServerFrame::Error { id, event_id, .. } = f else {
        unreachable!()
    };
    assert_eq!(id.as_deref(), Some("x1"));
    assert!(event_id.is_some(), "failures are durable deliveries too");
    assert_eq!(app.mock().requests().await.len(), 1, "no retry on 400");
    let dlq = app
        .read_topic(&app.names.incoming_dlq_topic(), 1, T)
        .await
        .unwrap();
    assert_eq!(dlq.len(), 1);
    let reason = dlq[0]
        .1
        .iter()
        .find(|(k, _)| k == "dlq_reason")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    assert!(reason.contains("400"), "{reason}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insufficient_quota_fails_fast() {
    let app = mock_app().await;
    app.mock().fail_next(10, 429, "insufficient_quota").await;
    let mut ws = app.connect(0, "broke").await.unwrap();
    ws.send_message("q1", "hi").await.unwrap();
    ws.recv_until(T, |f| {
        matches!(
            f,
            ServerFrame::Error {
                code: ErrorCode::LlmFailed,
                ..
            }
        )
    })
    .await
    .unwrap();
    assert_eq!(app.mock().requests().await.len(), 1);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seven_failures_give_llm_failed_and_a_dead_letter() {
    let app = mock_app().await;
    app.mock().rate_limit_always(0).await;
    let mut ws = app.connect(0, "stormy").await.unwrap();
    ws.send_message("s1", "hello?").await.unwrap();
    ws.recv_until(T, |f| {
        matches!(
            f,
            ServerFrame::Error {
                code: ErrorCode::LlmFailed,
                ..
            }
        )
    })
    .await
    .unwrap();
    assert_eq!(
        app.mock().requests().await.len(),
        7,
        "at most 7 attempts in all"
    );
    let dlq = app
        .read_topic(&app.names.incoming_dlq_topic(), 1, T)
        .await
        .unwrap();
    let record: serde_json::Value = serde_json::from_slice(&dlq[0].0).unwrap();
    assert_eq!(record["msg_id"], "s1");
    assert_eq!(record["content"], "hello?");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_message_is_answered_once_and_charged_once() {
    let app = mock_app().await;
    app.mock().echo().await;
    let mut ws = app.connect(0, "resender").await.unwrap();
    ws.send_message("same", "only once").await.unwrap();
    let ServerFrame::Response { content, .. } = ws.response_to("same", T).await.unwrap() else {
        unreachable!()
    };
    // A resend of an answered id, from a connection that has not shown the answer, is acked
    // and gets the stored answer again (never silence), without a second LLM call.
    ws.close().await;
    let mut ws = app.connect(0, "resender").await.unwrap();
    ws.send_message("same", "only once").await.unwrap();
    ws.recv_until(
        T,
        |f| matches!(f, ServerFrame::Ack { id, .. } if id == "same"),
    )
    .await
    .unwrap();
    let ServerFrame::Response { content: again, .. } = ws.response_to("same", T).await.unwrap()
    else {
        unreachable!()
    };
    assert_eq!(again, content);
    ws.send_message("after", "next").await.unwrap();
    let next = ws
        .recv_until(T, |f| matches!(f, ServerFrame::Response { .. }))
        .await
        .unwrap();
    assert!(
        matches!(next, ServerFrame::Response { ref id, .. } if id == "after"),
        "{next:?}"
    );
    let prompts: Vec<String> = app
        .mock()
        .requests()
        .await
        .iter()
        .filter_map(last_user_message)
        .collect();
    assert_eq!(prompts, vec!["only once".to_owned(), "next".to_owned()]);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_system_prompt_go_with_each_request() {
    let app = mock_app().await;
    app.mock().echo().await;
    let mut ws = app.connect(0, "remembered").await.unwrap();
    ws.send_message("m1", "my name is Ada").await.unwrap();
    ws.response_to("m1", T).await.unwrap();
    ws.send_message("m2", "what is my name?").await.unwrap();
    ws.response_to("m2", T).await.unwrap();
    let requests = app.mock().requests().await;
    let body: serde_json::Value = serde_json::from_slice(&requests[1].body).unwrap();
    let roles: Vec<&str> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["role"].as_str())
        .collect();
    assert_eq!(roles, ["system", "user", "assistant", "user"]);
    assert_eq!(body["messages"][1]["content"], "my name is Ada");
    assert_eq!(body["messages"][2]["content"], "echo: my name is Ada");
    assert_eq!(body["stream"], true);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_users_answers_come_in_order_under_concurrency() {
    let app = TestApp::builder()
        .llm(LlmChoice::Mock)
        .consumer_config(|c| c.memory_turns = 0)
        .spawn()
        .await
        .unwrap();
    // Random per-request delays: unordered processing would reorder answers.
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(|req: &wiremock::Request| {
            let delay = Duration::from_millis(u64::from(rand::random::<u8>() % 60));
            echo_answer(req).set_delay(delay)
        })
        .mount(&app.mock().server)
        .await;
    let users = ["ord_a", "ord_b", "ord_c"];
    let mut sockets = Vec::new();
    for u in users {
        sockets.push(app.connect(0, u).await.unwrap());
    }
    for i in 0..8 {
        for (ws, u) in sockets.iter_mut().zip(users) {
            ws.send_message(&format!("{u}-{i}"), &format!("{u} #{i}"))
                .await
                .unwrap();
        }
    }
    for (ws, u) in sockets.iter_mut().zip(users) {
        let mut order = Vec::new();
        while order.len() < 8 {
            if let ServerFrame::Response { id, .. } = ws
                .recv_until(T, |f| matches!(f, ServerFrame::Response { .. }))
                .await
                .unwrap()
            {
                order.push(id);
            }
        }
        let expected: Vec<String> = (0..8).map(|i| format!("{u}-{i}")).collect();
        assert_eq!(order, expected);
    }
    app.shutdown().await;
}

/// `MAX_IN_FLIGHT` bounds LLM calls, not messages being answered: with 2 slots and 6 users'
/// messages active at once, no 3 requests ever reach the model within one call's duration (a
/// slot frees only when a call ends, at least `delay` after it began; a slow machine can only
/// spread the requests further apart), and every message is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_calls_in_flight_never_exceed_max_in_flight() {
    let app = TestApp::builder()
        .llm(LlmChoice::Mock)
        .consumer_config(|c| {
            c.max_in_flight = 2;
            c.max_active = 6;
            c.memory_turns = 0;
        })
        .spawn()
        .await
        .unwrap();
    let delay = Duration::from_millis(600);
    let arrivals = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let seen = std::sync::Arc::clone(&arrivals);
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(move |req: &wiremock::Request| {
            seen.lock().unwrap().push(Instant::now());
            echo_answer(req).set_delay(delay)
        })
        .mount(&app.mock().server)
        .await;
    let users = ["slot_a", "slot_b", "slot_c", "slot_d", "slot_e", "slot_f"];
    let mut sockets = Vec::new();
    for u in users {
        sockets.push(app.connect(0, u).await.unwrap());
    }
    for (ws, u) in sockets.iter_mut().zip(users) {
        ws.send_message(&format!("{u}-1"), "hold a slot")
            .await
            .unwrap();
    }
    for (ws, u) in sockets.iter_mut().zip(users) {
        ws.response_to(&format!("{u}-1"), T).await.unwrap();
    }
    let mut arrivals = arrivals.lock().unwrap().clone();
    arrivals.sort();
    assert_eq!(arrivals.len(), users.len(), "one call per message");
    for three in arrivals.windows(3) {
        assert!(
            three[2] - three[0] >= delay - Duration::from_millis(50),
            "3 calls began within {:?}, less than one call's {delay:?}: more than 2 in flight",
            three[2] - three[0]
        );
    }
    app.shutdown().await;
}

/// Collects one message's deltas until its response; returns (deltas' text, their count, the
/// response's content).
async fn deltas_and_answer(
    ws: &mut colloquy_testkit::client::WsClient,
    id: &str,
) -> (String, usize, String) {
    let (mut text, mut count) = (String::new(), 0);
    loop {
        match ws
            .recv_until(T, |f| {
                matches!(f, ServerFrame::Delta { .. } | ServerFrame::Response { .. })
            })
            .await
            .expect("a delta or the response")
        {
            ServerFrame::Delta {
                id: of, content, ..
            } if of == id => {
                text.push_str(&content);
                count += 1;
            }
            ServerFrame::Response {
                id: of, content, ..
            } if of == id => {
                return (text, count, content);
            }
            _ => {}
        }
    }
}

/// A stream slower than `DELTA_BATCH_MS` is previewed in deltas that are a prefix of the
/// answer (the end-to-end delta path: ai-consumer batcher, `responses`, relay publish, gateway).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_stream_is_previewed_in_deltas() {
    use colloquy_testkit::fake_llm::FakeLlmConfig;
    // 8 tokens at 20/s: a 400 ms stream, previewed every 2 tokens or 50 ms.
    let app = TestApp::builder()
        .llm(LlmChoice::Fake(FakeLlmConfig {
            token_rate: 20.0,
            ..FakeLlmConfig::default()
        }))
        .consumer_config(|c| {
            c.delta_batch_ms = 50;
            c.delta_batch_tokens = 2;
        })
        .spawn()
        .await
        .unwrap();
    let mut ws = app.connect(0, "slow_reader").await.unwrap();
    ws.send_message("s1", "one two three four").await.unwrap();
    let (deltas, count, answer) = deltas_and_answer(&mut ws, "s1").await;
    assert!(count >= 2, "{count} deltas for a 400 ms stream");
    assert!(
        !deltas.is_empty() && answer.starts_with(&deltas),
        "{deltas:?} vs {answer:?}"
    );
    assert!(answer.contains("one two three four"), "{answer}");
    app.shutdown().await;
}

/// An answer complete within the stream's first `DELTA_BATCH_MS` comes whole: its response
/// alone (one record, one relay write, one frame), no delta repeating it. The gateway counts
/// that response as the message's first text (`events::tests` in the gateway).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_answer_comes_whole() {
    // Every token at once, and a window far longer than the stream (20 s: a loaded machine
    // stalling the consumer mid-stream must not make it look slow).
    let app = TestApp::builder()
        .consumer_config(|c| c.delta_batch_ms = 20_000)
        .spawn()
        .await
        .unwrap();
    let mut ws = app.connect(0, "fast_reader").await.unwrap();
    ws.send_message("f1", "one two three four").await.unwrap();
    let (_, count, answer) = deltas_and_answer(&mut ws, "f1").await;
    assert_eq!(
        count, 0,
        "no delta for an answer complete at once: {answer:?}"
    );
    assert!(answer.contains("one two three four"), "{answer}");
    app.shutdown().await;
}
