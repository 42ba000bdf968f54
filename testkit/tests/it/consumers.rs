//! The consumers' defences, through real Kafka and Redis: offset-gap healing, readiness on
//! partitions and rejoining, compare-and-set claims and the memory they carry, resends of a
//! message id, the
//! unanswered-message audit, and answers that cannot be written.

use std::collections::BTreeSet;
use std::time::Duration;

use fred::prelude::*;
use rdkafka::Message;
use rdkafka::consumer::Consumer;
use rdkafka::producer::{FutureProducer, FutureRecord};

use colloquy_ai_consumer::claim::{Claim, Claims, Outcome};
use colloquy_ai_consumer::llm::{Role, Turn};
use colloquy_ai_consumer::memory::Memory;
use colloquy_core::config::KafkaConfig;
use colloquy_core::kafka::TopicReader;
use colloquy_core::names::Names;
use colloquy_core::offset_gaps::GapDetector;
use colloquy_core::wire::{ErrorCode, EventId, ServerFrame};
use colloquy_core::{UserId, kafka};
use colloquy_testkit::infra::{Infra, InfraOptions};
use colloquy_testkit::{LlmChoice, TestApp};

const T: Duration = Duration::from_secs(30);

fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

fn one_partition(infra: &Infra) -> KafkaConfig {
    let mut k = KafkaConfig::local(infra.kafka_bootstrap.clone());
    k.partitions = 1;
    k
}

/// The value of a counter series with `label` in this process's exposition.
fn counter_with(name: &str, label: &str) -> f64 {
    colloquy_core::metrics::recorder()
        .render()
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A new one-partition topic named after `prefix`, created, and the config that reaches it.
async fn one_partition_topic(infra: &Infra, prefix: &str) -> (KafkaConfig, String) {
    let k = one_partition(infra);
    let topic = unique(prefix);
    kafka::ensure_topics(&k, std::slice::from_ref(&topic))
        .await
        .expect("topic created");
    (k, topic)
}

async fn produce(k: &KafkaConfig, topic: &str, n: usize) {
    let producer: FutureProducer = kafka::producer(k, "test").expect("producer");
    for i in 0..n {
        producer
            .send(
                FutureRecord::to(topic).key("k").payload(&format!("{i}")),
                Duration::from_secs(10),
            )
            .await
            .expect("produced");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_offset_is_detected_and_fetched_again() {
    let infra = Infra::start().await.unwrap();
    let (k, topic) = one_partition_topic(&infra, "gaps").await;
    produce(&k, &topic, 12).await;
    let consumer = kafka::consumer(&k, "relay", &unique("g"), &[&topic])
        .await
        .unwrap();
    let label = format!("topic=\"{topic}\"");
    let mut gaps = GapDetector::default();
    let mut processed = BTreeSet::new();
    let mut skipped = false;
    while processed.len() < 12 {
        let msg = tokio::time::timeout(T, consumer.recv())
            .await
            .unwrap()
            .unwrap();
        let (p, o) = (msg.partition(), msg.offset());
        if !kafka::admit_offset(&consumer, &mut gaps, &topic, p, o) {
            continue;
        }
        processed.insert(o);
        if o == 3 && !skipped {
            // A short fetch, as tansu served under load: the next records handed out start
            // further on, and 4 and 5 would never be seen.
            skipped = true;
            consumer
                .seek(
                    &topic,
                    p,
                    rdkafka::Offset::Offset(6),
                    Duration::from_secs(5),
                )
                .unwrap();
        }
    }
    assert_eq!(processed, (0..12).collect::<BTreeSet<i64>>());
    assert!(
        counter_with("colloquy_consumer_offset_gaps_total", &label) >= 1.0,
        "the gap was counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_without_partitions_is_not_ready_and_rejoins() {
    let infra = Infra::start().await.unwrap();
    let (k, topic) = one_partition_topic(&infra, "rejoin").await;
    produce(&k, &topic, 1).await;
    let group = unique("g");
    let a = std::sync::Arc::new(
        kafka::consumer(&k, "relay", &group, &[&topic])
            .await
            .unwrap(),
    );
    let b = std::sync::Arc::new(
        kafka::consumer(&k, "relay", &group, &[&topic])
            .await
            .unwrap(),
    );
    let (ma, mb) = (a.context().membership(), b.context().membership());
    assert!(
        ma.readiness().is_err() && mb.readiness().is_err(),
        "nothing held before the first poll"
    );
    let stop = tokio_util::sync::CancellationToken::new();
    for c in [&a, &b] {
        let c = std::sync::Arc::clone(c);
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = c.recv() => {}
                }
            }
        });
    }
    let rejoins_before = counter_with("colloquy_consumer_rejoins_total", "relay");
    for c in [&a, &b] {
        tokio::spawn(kafka::rejoin_when_idle(
            std::sync::Arc::clone(c),
            vec![topic.clone()],
            Duration::from_secs(2),
            stop.clone(),
        ));
    }
    // One partition, two members: exactly one holds it and is ready.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let held = ma.partition_count() + mb.partition_count();
        if held == 1 && (ma.readiness().is_ok() != mb.readiness().is_ok()) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no assignment");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The idle member rejoins after its bound, and is counted doing so.
    let deadline = tokio::time::Instant::now() + T;
    while counter_with("colloquy_consumer_rejoins_total", "relay") <= rejoins_before {
        assert!(tokio::time::Instant::now() < deadline, "no rejoin counted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
}

/// `KAFKA_ASSIGNMENT=all`: no group membership, so nothing a coordinator does can leave the
/// consumer without partitions. It holds every partition (ready) as soon as it is created,
/// and a consumer restarted with the same group goes on from the offsets the first committed,
/// with no JoinGroup at all (tansu 0.6 left restarted group members with none: issue 11).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assign_all_holds_every_partition_at_once_and_resumes_from_committed_offsets() {
    let infra = Infra::start().await.unwrap();
    let mut k = KafkaConfig::local(infra.kafka_bootstrap.clone());
    k.partitions = 3;
    k.assignment = colloquy_core::config::Assignment::All;
    // A static id is ignored in this mode (no group membership to be static in).
    k.group_instance_id = Some(unique("static"));
    let topic = unique("all");
    kafka::ensure_topics(&k, std::slice::from_ref(&topic))
        .await
        .unwrap();
    let producer: FutureProducer = kafka::producer(&k, "test").expect("producer");
    for i in 0..30 {
        producer
            .send(
                FutureRecord::to(&topic)
                    .partition(i % 3)
                    .key("k")
                    .payload(&format!("{i}")),
                Duration::from_secs(10),
            )
            .await
            .expect("produced");
    }
    let group = unique("g");
    let read = |c: &rdkafka::consumer::StreamConsumer<kafka::ObservedContext>| {
        c.context().membership().readiness()
    };

    let first = kafka::consumer(&k, "relay", &group, &[&topic])
        .await
        .unwrap();
    assert!(read(&first).is_ok(), "ready before the first poll");
    assert_eq!(
        first.context().membership().partitions(&topic),
        [0, 1, 2].into_iter().collect(),
        "every partition held"
    );
    // Read and store the first 5 records of each partition, commit, and go away.
    let mut seen = BTreeSet::new();
    while seen.len() < 15 {
        let msg = tokio::time::timeout(T, first.recv())
            .await
            .expect("a record within 30 s")
            .unwrap();
        if msg.offset() < 5 {
            seen.insert((msg.partition(), msg.offset()));
            first
                .store_offset(&topic, msg.partition(), msg.offset())
                .unwrap();
        }
    }
    first
        .commit_consumer_state(rdkafka::consumer::CommitMode::Sync)
        .expect("offsets committed without group membership");
    drop(first);

    let second = kafka::consumer(&k, "relay", &group, &[&topic])
        .await
        .unwrap();
    assert!(read(&second).is_ok());
    let mut rest = BTreeSet::new();
    while rest.len() < 15 {
        let msg = tokio::time::timeout(T, second.recv())
            .await
            .expect("a record within 30 s")
            .unwrap();
        assert!(
            msg.offset() >= 5,
            "partition {} re-read offset {} below the committed 5",
            msg.partition(),
            msg.offset()
        );
        rest.insert((msg.partition(), msg.offset()));
    }
    let expected: BTreeSet<(i32, i64)> =
        (0..3).flat_map(|p| (5..10).map(move |o| (p, o))).collect();
    assert_eq!(rest, expected);
}

/// A topic that does not exist is named at start in `all` mode, not waited on forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assign_all_refuses_a_missing_topic_by_name() {
    let infra = Infra::start().await.unwrap();
    let mut k = KafkaConfig::local(infra.kafka_bootstrap.clone());
    k.assignment = colloquy_core::config::Assignment::All;
    let topic = unique("absent");
    let err = kafka::consumer(&k, "relay", &unique("g"), &[&topic])
        .await
        .err()
        .expect("a missing topic is an error");
    assert!(err.to_string().contains(&topic), "{err}");
}

async fn redis(infra: &Infra) -> Pool {
    colloquy_core::redis::pool(&colloquy_core::config::RedisConfig::local(
        infra.redis_url.clone(),
    ))
    .await
    .expect("Redis pool")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_are_compare_and_set_and_tell_resends_from_redeliveries() {
    let infra = Infra::start().await.unwrap();
    let pool = redis(&infra).await;
    let names = Names::with_prefixes("", &format!("{}:", unique("c")));
    let lease = Duration::from_secs(30);
    let day = Duration::from_secs(86_400);
    let a = Claims::new(pool.clone(), names.clone(), "a", lease, day, Memory::none());
    let b = Claims::new(pool.clone(), names.clone(), "b", lease, day, Memory::none());
    let user = UserId::parse("alice").unwrap();
    let acquired = || Claim::Acquired {
        history: Vec::new(),
    };

    assert_eq!(a.claim(&user, "m1", 100).await.unwrap(), acquired());
    assert_eq!(b.claim(&user, "m1", 100).await.unwrap(), Claim::Leased);
    assert!(
        !b.renew(&user, "m1").await.unwrap(),
        "b cannot renew a's lease"
    );
    assert!(
        !b.release(&user, "m1").await.unwrap(),
        "b cannot release a's lease"
    );
    assert!(
        !b.complete(&user, "m1", 100, ANSWERED).await.unwrap(),
        "nor complete it"
    );
    assert_eq!(
        a.claim(&user, "m1", 100).await.unwrap(),
        Claim::Leased,
        "a's own live job"
    );
    assert!(a.renew(&user, "m1").await.unwrap());
    assert!(a.complete(&user, "m1", 100, ANSWERED).await.unwrap());
    assert_eq!(
        b.claim(&user, "m1", 100).await.unwrap(),
        Claim::AlreadyDone,
        "a redelivery"
    );
    assert_eq!(
        b.claim(&user, "m1", 200).await.unwrap(),
        Claim::AnsweredBefore,
        "a resend"
    );

    // A failure is final for its redelivery, not for a resend.
    assert_eq!(a.claim(&user, "m2", 100).await.unwrap(), acquired());
    assert!(a.complete(&user, "m2", 100, Outcome::Failed).await.unwrap());
    assert_eq!(b.claim(&user, "m2", 100).await.unwrap(), Claim::AlreadyDone);
    assert_eq!(
        b.claim(&user, "m2", 300).await.unwrap(),
        acquired(),
        "a resend after llm_failed is answered anew"
    );

    // An abandoned job gives its lease back at once.
    assert_eq!(a.claim(&user, "m3", 1).await.unwrap(), acquired());
    assert!(a.release(&user, "m3").await.unwrap());
    assert_eq!(b.claim(&user, "m3", 1).await.unwrap(), acquired());

    // A restarted process with the same static owner takes over its predecessor's lease.
    let a_again = Claims::new(pool, names, "b", lease, day, Memory::none());
    assert_eq!(a_again.claim(&user, "m3", 1).await.unwrap(), acquired());
}

/// An answer as the claims test records it (memory is off there).
const ANSWERED: Outcome<'static> = Outcome::Answered {
    question: "q",
    answer: "a",
};

fn exchange(question: &str, answer: &str) -> [Turn; 2] {
    [
        Turn {
            role: Role::User,
            content: question.to_owned(),
        },
        Turn {
            role: Role::Assistant,
            content: answer.to_owned(),
        },
    ]
}

fn answered<'a>(question: &'a str, answer: &'a str) -> Outcome<'a> {
    Outcome::Answered { question, answer }
}

/// A whole number from the environment (a longer run by hand), `default` when unset or not one.
fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `claims` takes `msg_id` fresh and records `question` answered with `answer`.
async fn claim_and_answer(
    claims: &Claims,
    user: &UserId,
    msg_id: &str,
    nonce: i64,
    (question, answer): (&str, &str),
) {
    assert!(
        matches!(
            claims
                .claim(user, msg_id, nonce)
                .await
                .expect("claim reaches Redis"),
            Claim::Acquired { .. }
        ),
        "{msg_id} was not free to claim"
    );
    assert!(
        claims
            .complete(user, msg_id, nonce, answered(question, answer))
            .await
            .expect("completion reaches Redis"),
        "{msg_id}'s answer was not recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_read_the_memory_and_completions_append_each_answer_once() {
    let infra = Infra::start().await.unwrap();
    let pool = redis(&infra).await;
    let names = Names::with_prefixes("", &format!("{}:", unique("mem")));
    let memory = Memory::new(2, Duration::from_secs(60));
    let day = Duration::from_secs(86_400);
    let a = Claims::new(
        pool.clone(),
        names.clone(),
        "a",
        Duration::from_millis(300),
        day,
        memory,
    );
    let b = Claims::new(
        pool.clone(),
        names.clone(),
        "b",
        Duration::from_secs(30),
        day,
        memory,
    );
    let user = UserId::parse("ada").unwrap();
    let history = |claim: Claim| match claim {
        Claim::Acquired { history } => history,
        other => panic!("not acquired: {other:?}"),
    };

    assert_eq!(history(a.claim(&user, "m1", 1).await.unwrap()), vec![]);
    assert!(
        a.complete(&user, "m1", 1, answered("q1", "a1"))
            .await
            .unwrap()
    );
    assert!(
        a.complete(&user, "m1", 1, answered("q1", "a1"))
            .await
            .unwrap(),
        "a completion retried after a lost reply still reports success"
    );
    assert_eq!(
        history(a.claim(&user, "m2", 2).await.unwrap()),
        exchange("q1", "a1").to_vec(),
        "the retry did not remember the exchange twice"
    );
    assert!(a.complete(&user, "m2", 2, Outcome::Failed).await.unwrap());

    // a's lease on m3 runs out and b takes the message over: a's late answer is not
    // recorded, nor remembered; b's is.
    assert!(matches!(
        a.claim(&user, "m3", 3).await.unwrap(),
        Claim::Acquired { .. }
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        history(b.claim(&user, "m3", 3).await.unwrap()),
        exchange("q1", "a1").to_vec(),
        "a failure is not remembered"
    );
    assert!(
        !a.complete(&user, "m3", 3, answered("late", "late"))
            .await
            .unwrap()
    );
    assert!(
        b.complete(&user, "m3", 3, answered("q3", "a3"))
            .await
            .unwrap()
    );

    // Two turns are kept: the oldest goes.
    claim_and_answer(&b, &user, "m4", 4, ("q4", "a4")).await;
    let mut expected = exchange("q3", "a3").to_vec();
    expected.extend(exchange("q4", "a4"));
    assert_eq!(history(b.claim(&user, "m5", 5).await.unwrap()), expected);
    let ttl: i64 = pool.pttl(names.memory_key(&user)).await.unwrap();
    assert!((1..=60_000).contains(&ttl), "memory expires: pttl {ttl}");

    // Memory off: nothing is read or written.
    let off = Claims::new(
        pool.clone(),
        names.clone(),
        "c",
        Duration::from_secs(30),
        day,
        Memory::none(),
    );
    let other = UserId::parse("bob").unwrap();
    assert_eq!(history(off.claim(&other, "m1", 1).await.unwrap()), vec![]);
    assert!(
        off.complete(&other, "m1", 1, answered("q", "a"))
            .await
            .unwrap()
    );
    let kept: i64 = pool.exists(names.memory_key(&other)).await.unwrap();
    assert_eq!(kept, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_message_id_gets_its_answer_again_and_a_failed_one_is_answered_anew() {
    let app = TestApp::builder()
        .llm(LlmChoice::Mock)
        .spawn()
        .await
        .unwrap();
    app.mock().fail_next(1, 400, "invalid_request").await;
    app.mock().echo().await;
    let mut ws = app.connect(0, "resender").await.unwrap();

    // 1. Fails for good (400): llm_failed. A resend of the same id is answered anew.
    ws.send_message("x1", "first try").await.unwrap();
    let failed = ws
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
    assert!(matches!(failed, ServerFrame::Error { id: Some(ref id), .. } if id == "x1"));
    ws.send_message("x1", "second try").await.unwrap();
    let ServerFrame::Response {
        content,
        event_id: first_event,
        ..
    } = ws.response_to("x1", T).await.unwrap()
    else {
        unreachable!()
    };
    assert!(content.contains("second try"), "{content}");
    let calls = app.mock().requests().await.len();
    assert_eq!(calls, 2, "one failed call, one answered");

    // 2. A resend of an answered id from a client that does not have the answer (a new
    // connection, no resume): the stored answer again, as a new event, no LLM call. (The
    // connection that showed the answer does not show it twice.)
    ws.close().await;
    let mut ws = app.connect(0, "resender").await.unwrap();
    ws.send_message("x1", "second try").await.unwrap();
    let ServerFrame::Response {
        content: again,
        event_id: second_event,
        ..
    } = ws.response_to("x1", T).await.unwrap()
    else {
        unreachable!()
    };
    assert_eq!(again, content);
    assert!(EventId::parse(&second_event) > EventId::parse(&first_event));
    assert_eq!(app.mock().requests().await.len(), calls, "no second charge");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_are_audited_until_their_answer_is_stored() {
    let mut app = TestApp::spawn().await.unwrap();
    let pool = redis(&app.infra).await;
    let key = app.names.audit_key();
    let mut ws = app.connect(0, "audited").await.unwrap();
    ws.send_message("a1", "hello").await.unwrap();
    ws.response_to("a1", T).await.unwrap();
    let (count, _) = colloquy_relay::audit::read(&pool, &key, colloquy_core::now_ms())
        .await
        .unwrap();
    assert_eq!(count, 0, "an answered message leaves the audit");

    // Without a relay, acked messages stay in the audit, with their age.
    app.relay.take().unwrap().stop().await;
    for i in 0..3 {
        ws.send_message(&format!("b{i}"), "are you there")
            .await
            .unwrap();
        ws.recv_until(T, |f| matches!(f, ServerFrame::Ack { .. }))
            .await
            .unwrap();
    }
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let (count, age) =
            colloquy_relay::audit::read(&pool, &key, colloquy_core::now_ms() + 5_000)
                .await
                .unwrap();
        if count == 3 {
            assert!(age >= Duration::from_secs(5));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "audit holds {count}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.start_relay().await.unwrap();
    for i in 0..3 {
        ws.response_to(&format!("b{i}"), T).await.unwrap();
    }
    let (count, _) = colloquy_relay::audit::read(&pool, &key, colloquy_core::now_ms())
        .await
        .unwrap();
    assert_eq!(count, 0);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_too_large_to_deliver_becomes_a_clear_failure() {
    // A hostile model: a 3 MB answer, above what Kafka takes in one record.
    let app = TestApp::builder()
        .llm(LlmChoice::Mock)
        .consumer_config(|c| c.stream = false)
        .spawn()
        .await
        .unwrap();
    app.mock().answer_plain(&"x".repeat(3 * 1024 * 1024)).await;
    let mut ws = app.connect(0, "flooded").await.unwrap();
    ws.send_message("big", "tell me everything").await.unwrap();
    let frame = ws
        .recv_until(T, |f| {
            matches!(
                f,
                ServerFrame::Error {
                    code: ErrorCode::LlmFailed,
                    ..
                } | ServerFrame::Response { .. }
            )
        })
        .await
        .unwrap();
    let ServerFrame::Error { message, id, .. } = frame else {
        panic!("a 3 MB answer cannot be a record: {frame:?}");
    };
    assert_eq!(id.as_deref(), Some("big"));
    assert!(message.contains("could not be delivered"), "{message}");
    app.shutdown().await;
}

/// The conditions of the loss seen at 2,000 msg/s (two gateways producing to one partition
/// at the same instant), reproduced at the broker and read the way the services read: every
/// offset is read once, any record the broker's fetch skipped is fetched again, and reading
/// that stalls inside the last batch of the log is healed too (the numbers are printed).
///
/// With tansu 0.6.0 as published, about one run in three stopped receiving for good before the
/// last of the 40,000 records (the broker's fetch skipped batches, `docs/storage.md`); with
/// Colloquy's broker patch no gap is left to heal.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_producers_then_every_offset_is_read_once_healed() {
    const PRODUCERS: usize = 8;
    const PER_PRODUCER: usize = 5_000;
    let _ = colloquy_core::metrics::recorder();
    let infra = Infra::start().await.unwrap();
    let mut k = one_partition(&infra);
    // Many small batches from concurrent producers: the workload under which tansu 0.6.0's
    // memory engine handed out offsets past a batch still being stored (about two skips per
    // run, see `concurrent_producers_never_make_the_broker_skip_an_offset`).
    k.linger_ms = 0;
    // The services' consumer, assigned at once and fetching with a short wait: it reads at the
    // tail from the first record, where the skips happen. A plain consumer (no statistics)
    // stalled here for good once: a response cut short inside the last batch left it fetching
    // from the middle of that batch, which tansu answers with nothing until more is produced.
    k.assignment = colloquy_core::config::Assignment::All;
    k.fetch_wait_max_ms = 5;
    let topic = unique("race");
    kafka::ensure_topics(&k, std::slice::from_ref(&topic))
        .await
        .unwrap();
    let consumer = kafka::consumer(&k, "ai-consumer", &unique("g"), &[&topic])
        .await
        .unwrap();
    let membership = consumer.context().membership();
    let producers = produce_in_pairs(&k, &topic, PRODUCERS, PER_PRODUCER);
    let label = format!("topic=\"{topic}\"");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut reader = TopicReader::new(topic.clone());
    let mut seen = BTreeSet::new();
    while seen.len() < PRODUCERS * PER_PRODUCER {
        reader.rebalanced(&membership);
        // Longer than `T`: a stall inside a large batch at the tail is healed by seeking back
        // 16, 32, … records, one seek per stall check (2 s) on statistics up to 5 s old.
        let Ok(msg) = tokio::time::timeout(T * 4, reader.next(&consumer, true, &shutdown)).await
        else {
            surface_producer_failures(producers).await;
            panic!(
                "records stopped arriving: {} of {} read",
                seen.len(),
                PRODUCERS * PER_PRODUCER
            );
        };
        let msg = msg.expect("not shut down");
        if reader.admit(&consumer, msg.partition(), msg.offset()) {
            seen.insert(msg.offset());
        }
    }
    for p in producers {
        p.await.unwrap();
    }
    assert_eq!(
        seen,
        (0..(PRODUCERS * PER_PRODUCER) as i64).collect::<BTreeSet<_>>()
    );
    eprintln!(
        "concurrent producers: {} records read, {} offset gaps healed",
        seen.len(),
        counter_with("colloquy_consumer_offset_gaps_total", &label)
    );
}

/// Issue 11's two lost records, at the broker. tansu 0.6.0's memory engine (`tansu-storage`
/// `dynostore.rs`, `produce`) raises a partition's high watermark *before* it stores the batch;
/// a fetch that landed in between listed the batches already stored below the new watermark and
/// returned the one after the missing batch, and a consumer that trusts the fetch (librdkafka
/// does) moved past those records for good. Two gateways producing to one partition at the same
/// instant open that window. Colloquy's broker patch never answers past a batch not yet stored.
///
/// A plain librdkafka consumer (no gap healing) reads at the tail while eight producers write
/// two-record batches concurrently; every jump in the offsets it is handed is a skip. Against
/// tansu 0.6.0 as published five of seven runs saw one (e.g. `(930, 932)`); the window is
/// timing-dependent, so a pass proves less than a failure. Longer by hand:
/// `REPRO_PRODUCERS=4 REPRO_RECORDS=50000 cargo test -p colloquy-testkit --test it --
/// concurrent_producers_never --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_producers_never_make_the_broker_skip_an_offset() {
    let producers = env_usize("REPRO_PRODUCERS", 8);
    let per_producer = env_usize("REPRO_RECORDS", 5_000);
    let infra = Infra::start().await.unwrap();
    let mut k = one_partition(&infra);
    // Many small batches, as two gateways produce them: each one a window.
    k.linger_ms = 0;
    let topic = unique("skip");
    kafka::ensure_topics(&k, std::slice::from_ref(&topic))
        .await
        .unwrap();
    let consumer = plain_consumer(
        &k.bootstrap_servers,
        &topic,
        rdkafka::Offset::Beginning,
        Duration::from_millis(5),
    );
    let writers = produce_in_pairs(&k, &topic, producers, per_producer);
    let total = (producers * per_producer) as i64;
    let mut next = 0_i64;
    let mut skips = Vec::new();
    let mut payloads = std::collections::HashMap::new();
    while next < total {
        let msg = match tokio::time::timeout(Duration::from_secs(10), consumer.recv()).await {
            Ok(m) => m.unwrap(),
            // Stopped receiving: skipped records are behind it (it never asks for them
            // again), or it is stuck; both fail below.
            Err(_) => break,
        };
        if msg.offset() != next {
            skips.push((next, msg.offset()));
        }
        let payload = String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned();
        if let Some(before) = payloads.insert(msg.offset(), payload.clone()) {
            eprintln!(
                "offset {} handed out twice: first {before:?}, then {payload:?}",
                msg.offset()
            );
        }
        next = msg.offset() + 1;
    }
    for w in writers {
        w.await.unwrap();
    }
    eprintln!(
        "{total} records produced by {producers} concurrent producers; the consumer was handed \
         offsets up to {next}; skips (expected, got): {skips:?}"
    );
    assert!(
        skips.is_empty(),
        "the broker handed out offsets past records it had acked: {skips:?}"
    );
    assert_eq!(
        next, total,
        "the consumer stopped receiving (nothing for 10 s) with records left in the partition"
    );
}

/// A librdkafka consumer with its default settings, assigned partition 0 of `topic` from the
/// beginning.
fn plain_consumer(
    bootstrap: &str,
    topic: &str,
    from: rdkafka::Offset,
    fetch_wait: Duration,
) -> rdkafka::consumer::StreamConsumer {
    let consumer: rdkafka::consumer::StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("g"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", fetch_wait.as_millis().to_string())
        .create()
        .expect("consumer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, from).expect("partition");
    consumer.assign(&tpl).expect("assigned");
    consumer
}

/// Produces `n` records to partition 0 of `topic` as one batch (sent together, one linger).
async fn produce_one_batch(k: &KafkaConfig, topic: &str, n: usize) {
    let mut k = k.clone();
    k.linger_ms = 200;
    let producer: FutureProducer = kafka::producer(&k, "test").expect("producer");
    let sends = (0..n).map(|i| {
        let (producer, payload) = (producer.clone(), format!("{i}"));
        async move {
            producer
                .send(
                    FutureRecord::to(topic)
                        .partition(0)
                        .key("k")
                        .payload(&payload),
                    Duration::from_secs(10),
                )
                .await
                .map(|_| ())
                .map_err(|(e, _)| e)
        }
    });
    futures::future::try_join_all(sends)
        .await
        .expect("produced");
}

/// Colloquy's tansu patch (`infra/tansu/tansu-storage.patch`): a fetch waiting at the broker for
/// records is answered when they arrive, not when its `fetch.wait.max.ms` runs out. Unpatched
/// tansu 0.6 sleeps out the wait even after finding records (here it would answer ~13 s after
/// the produce), which made every consumer hop cost a whole fetch wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_answers_a_waiting_fetch_as_soon_as_records_arrive() {
    const FETCH_WAIT: Duration = Duration::from_secs(20);
    let infra = Infra::start().await.unwrap();
    let (k, topic) = one_partition_topic(&infra, "wakeup").await;
    let consumer = plain_consumer(
        &k.bootstrap_servers,
        &topic,
        rdkafka::Offset::Beginning,
        FETCH_WAIT,
    );
    // Nothing to read: let the consumer's first fetch reach the broker and wait there.
    assert!(
        tokio::time::timeout(Duration::from_secs(2), consumer.recv())
            .await
            .is_err()
    );
    let produced = std::time::Instant::now();
    produce(&k, &topic, 1).await;
    let msg = tokio::time::timeout(FETCH_WAIT * 2, consumer.recv())
        .await
        .expect("the record arrives")
        .unwrap();
    let waited = produced.elapsed();
    assert_eq!(msg.offset(), 0);
    assert!(
        waited < FETCH_WAIT / 4,
        "the record waited {waited:?} for a fetch that waits up to {FETCH_WAIT:?}: is tansu built \
         with infra/tansu/tansu-storage.patch (infra/tansu/build.sh)?"
    );
}

/// The broker behaviour behind most of the skipped records (issue 11), now mended at the broker:
/// tansu 0.6's memory engine answered a fetch that starts inside a record batch from the *next*
/// batch (`dynostore.rs` `fetch`: batches whose base offset is at or after the fetch offset),
/// where Kafka returns the batch holding the offset, so librdkafka skipped the rest of the batch
/// after a pause and resume, a restart from a committed offset or a seek. Colloquy's tansu
/// (`infra/tansu/tansu-storage.patch`) answers from the batch holding the offset; this fails
/// against tansu 0.6.0 as published (the first record it hands out is 10).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_inside_a_batch_is_answered_from_that_batch() {
    let infra = Infra::start().await.unwrap();
    let (k, topic) = one_partition_topic(&infra, "midbatch").await;
    produce_one_batch(&k, &topic, 10).await;
    produce_one_batch(&k, &topic, 10).await;
    // librdkafka's default fetch wait.
    let consumer = plain_consumer(
        &k.bootstrap_servers,
        &topic,
        rdkafka::Offset::Offset(5),
        Duration::from_millis(500),
    );
    let mut offsets = Vec::new();
    while offsets.len() < 15 {
        // Nothing more within `T`: the comparison below says what came.
        let Ok(msg) = tokio::time::timeout(T, consumer.recv()).await else {
            break;
        };
        offsets.push(msg.unwrap().offset());
    }
    assert_eq!(
        offsets,
        (5..20).collect::<Vec<_>>(),
        "asked for offset 5, inside the first batch (0..=9): the rest of that batch comes first \
         (tansu 0.6.0 unpatched answers from the next batch, 10)"
    );
}

/// ListOffsets: the earliest offset is the log start and the latest the high watermark.
/// tansu 0.6.0's memory engine answered with the batch stored first or last: "latest" after a
/// 10-record batch was 1 (its base + 1), so a consumer starting at the end was handed records
/// 1..=9 produced before it came; "earliest" under concurrent produces could be the batch at 2,
/// stored before the one at 0, and a consumer reset to the beginning skipped 0 and 1 (seen in CI
/// by `concurrent_producers_never_make_the_broker_skip_an_offset`). The patched broker answers
/// from the watermarks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_at_the_end_starts_at_the_high_watermark() {
    let infra = Infra::start().await.unwrap();
    let (k, topic) = one_partition_topic(&infra, "latest").await;
    produce_one_batch(&k, &topic, 10).await;
    let consumer = plain_consumer(
        &k.bootstrap_servers,
        &topic,
        rdkafka::Offset::End,
        Duration::from_millis(100),
    );
    // Let the consumer resolve "the end" before the next record exists.
    assert!(
        tokio::time::timeout(Duration::from_secs(2), consumer.recv())
            .await
            .is_err(),
        "nothing new yet, so nothing to hand out"
    );
    produce_one_batch(&k, &topic, 1).await;
    let first = tokio::time::timeout(T, consumer.recv())
        .await
        .expect("the new record")
        .unwrap();
    assert_eq!(
        first.offset(),
        10,
        "a consumer at the end must start at the high watermark (tansu 0.6.0 said 1)"
    );
}

/// The defence against it: a consumer restarted at a committed offset inside a batch (and so
/// handed the next batch first) sees the gap, seeks further back, skips what it had processed
/// and processes every record from the committed offset on, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_inside_a_batch_reads_every_record_from_the_committed_offset() {
    let infra = Infra::start().await.unwrap();
    let mut k = one_partition(&infra);
    k.assignment = colloquy_core::config::Assignment::All;
    let topic = unique("restart");
    kafka::ensure_topics(&k, std::slice::from_ref(&topic))
        .await
        .unwrap();
    produce_one_batch(&k, &topic, 10).await;
    produce_one_batch(&k, &topic, 10).await;
    let group = unique("g");
    // A previous process processed 0..=4 and committed 5.
    {
        let before = kafka::consumer(&k, "relay", &group, &[&topic])
            .await
            .unwrap();
        before.store_offset(&topic, 0, 4).unwrap();
        before
            .commit_consumer_state(rdkafka::consumer::CommitMode::Sync)
            .unwrap();
    }
    let consumer = kafka::consumer(&k, "relay", &group, &[&topic])
        .await
        .unwrap();
    let membership = consumer.context().membership();
    assert_eq!(membership.start_offsets(&topic), vec![(0, 5)]);
    let mut gaps = GapDetector::default();
    kafka::reset_gaps(&mut gaps, &membership, &topic);
    let mut processed = Vec::new();
    while processed.len() < 15 {
        let msg = tokio::time::timeout(T, consumer.recv())
            .await
            .expect("records stopped arriving")
            .unwrap();
        if kafka::admit_offset(&consumer, &mut gaps, &topic, 0, msg.offset()) {
            processed.push(msg.offset());
        }
    }
    assert_eq!(processed, (5..20).collect::<Vec<i64>>());
}

/// `producers` concurrent producers, each writing `per_producer` records to `topic` two at a
/// time (two-record batches, as two gateways write them at 2,000 msg/s).
/// Awaits the producer tasks that have finished, so a producer's panic is reported as itself
/// rather than as records that never arrive.
async fn surface_producer_failures(producers: Vec<tokio::task::JoinHandle<()>>) {
    for p in producers {
        if p.is_finished() {
            p.await.expect("a producer task failed");
        }
    }
}

fn produce_in_pairs(
    k: &KafkaConfig,
    topic: &str,
    producers: usize,
    per_producer: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..producers)
        .map(|p| {
            let (k, topic) = (k.clone(), topic.to_owned());
            tokio::spawn(async move {
                let producer: FutureProducer = kafka::producer(&k, "test").expect("producer");
                for chunk in (0..per_producer).collect::<Vec<_>>().chunks(2) {
                    let sends = chunk.iter().map(|i| {
                        let payload = format!("{p}-{i}");
                        let (producer, topic) = (producer.clone(), topic.clone());
                        async move {
                            producer
                                .send(
                                    FutureRecord::to(&topic).key("k").payload(&payload),
                                    Duration::from_secs(30),
                                )
                                .await
                                .map(|_| ())
                                .map_err(|(e, _)| e)
                        }
                    });
                    futures::future::try_join_all(sends)
                        .await
                        .expect("produced");
                }
            })
        })
        .collect()
}

/// What a Redis restart keeps of the consumers' and gateways' state (production's
/// `appendfsync always` file): final outcomes and memory survive; leases and the rate limiter's
/// arrival times, kept out of the file because each write there is an fsync in front of an
/// answer, are forgotten. A forgotten lease lets a redelivered message be answered again
/// (the relay keeps the second answer from the user); a forgotten arrival time is a fresh burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_keeps_outcomes_and_memory_and_forgets_leases_and_rate_state() {
    use colloquy_gateway::rate_limit::{Decision, Gcra, RateLimiter};

    let mut infra = Infra::start_with(InfraOptions {
        durable_redis: true,
        ..InfraOptions::default()
    })
    .await
    .unwrap();
    let names = Names::with_prefixes("", &format!("{}:", unique("aof")));
    let memory = Memory::new(2, Duration::from_secs(600));
    let day = Duration::from_secs(86_400);
    let user = UserId::parse("grace").unwrap();
    let gcra = Gcra::per_period(1, Duration::from_secs(3_600));
    {
        let pool = redis(&infra).await;
        let a = Claims::new(pool.clone(), names.clone(), "a", day, day, memory);
        claim_and_answer(&a, &user, "answered", 1, ("q", "a")).await;
        assert!(matches!(
            a.claim(&user, "in-flight", 2).await.unwrap(),
            Claim::Acquired { .. }
        ));
        let limiter = RateLimiter::new(gcra, pool.clone(), names.clone());
        assert_eq!(limiter.check(&user).await, Decision::Allowed);
        assert!(matches!(
            limiter.check(&user).await,
            Decision::Limited { .. }
        ));
        let rate: i64 = pool.exists(names.rate_key(&user)).await.unwrap();
        assert_eq!(rate, 1, "the limiter keeps its state in Redis");
    }

    infra.kill_redis().await.unwrap();
    infra.start_redis().await.unwrap();
    let pool = redis(&infra).await;
    let b = Claims::new(pool.clone(), names.clone(), "b", day, day, memory);

    assert_eq!(
        b.claim(&user, "answered", 1).await.unwrap(),
        Claim::AlreadyDone,
        "a final outcome is fsynced"
    );
    match b.claim(&user, "in-flight", 2).await.unwrap() {
        Claim::Acquired { history } => assert_eq!(
            history,
            exchange("q", "a").to_vec(),
            "a's lease is forgotten; the memory is kept"
        ),
        other => panic!("a's lease outlived the restart: {other:?}"),
    }
    let rate: i64 = pool.exists(names.rate_key(&user)).await.unwrap();
    assert_eq!(
        rate, 0,
        "the rate limiter's state is not in the append-only file"
    );
    let limiter = RateLimiter::new(gcra, pool, names);
    assert_eq!(
        limiter.check(&user).await,
        Decision::Allowed,
        "a fresh burst after the restart"
    );
}
