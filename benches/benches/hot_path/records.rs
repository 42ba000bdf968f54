//! Kafka records and Redis deliveries: JSON encode and decode as the gateway, ai-consumer and
//! relay do them per message, and the conversion of a delivery into the client's frame.

use std::hint::black_box;

use criterion::{Criterion, Throughput};

use colloquy_core::UserId;
use colloquy_core::records::{
    Delivery, IncomingRecord, ResponseBody, ResponseRecord, SCHEMA_VERSION,
};

use crate::wire::answer;

fn user() -> UserId {
    UserId::parse("alice_01").expect("a valid userid")
}

fn incoming() -> IncomingRecord {
    IncomingRecord {
        v: SCHEMA_VERSION,
        msg_id: "web-7f3a9c2e-0042".into(),
        userid: user(),
        content: "Can you explain how Kafka consumer groups rebalance when a new consumer joins, \
                  and what happens to in-flight messages?"
            .into(),
        received_at_ms: 1_767_225_600_000,
    }
}

fn response(body: ResponseBody) -> ResponseRecord {
    ResponseRecord {
        v: SCHEMA_VERSION,
        msg_id: "web-7f3a9c2e-0042".into(),
        userid: user(),
        received_at_ms: 1_767_225_600_000,
        body,
    }
}

/// A streamed batch of a few tokens, the most frequent record on `responses`.
fn delta() -> ResponseBody {
    ResponseBody::Delta {
        seq: 7,
        content: " the group coordinator starts".into(),
    }
}

fn final_answer() -> ResponseBody {
    ResponseBody::Final {
        content: answer(),
        prompt_tokens: 31,
        completion_tokens: 172,
        whole: true,
    }
}

fn delivery() -> Delivery {
    Delivery {
        event_id: Some("1767225600123-0".into()),
        msg_id: "web-7f3a9c2e-0042".into(),
        userid: user(),
        received_at_ms: 1_767_225_600_000,
        timestamp: "2026-01-01T00:00:00.123Z".into(),
        relayed_at_ms: 1_767_225_600_123,
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        body: final_answer(),
    }
}

fn encode_decode<T>(c: &mut Criterion, name: &str, value: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let json = serde_json::to_vec(value).expect("records serialise");
    let mut g = c.benchmark_group(format!("records/{name}"));
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode", |b| {
        b.iter(|| serde_json::to_vec(black_box(value)).expect("records serialise"));
    });
    g.bench_function("decode", |b| {
        b.iter(|| serde_json::from_slice::<T>(black_box(&json)).expect("records parse"));
    });
    g.finish();
}

pub(crate) fn benches(c: &mut Criterion) {
    encode_decode(c, "IncomingRecord", &incoming());
    encode_decode(c, "ResponseRecord/delta", &response(delta()));
    encode_decode(c, "ResponseRecord/final", &response(final_answer()));
    let d = delivery();
    encode_decode(c, "Delivery/final", &d);

    let mut g = c.benchmark_group("records/Delivery/final");
    g.throughput(Throughput::Elements(1));
    g.bench_function("to_frame", |b| b.iter(|| black_box(&d).to_frame()));
    g.bench_function("to_frame+to_json", |b| {
        b.iter(|| black_box(&d).to_frame().to_json())
    });
    g.finish();
}
