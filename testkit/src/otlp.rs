//! An in-process OTLP/HTTP trace receiver: accepts `POST /v1/traces` (protobuf, as
//! opentelemetry-otlp's HTTP exporter sends it) and keeps every span, with its kind and
//! attributes, for assertions (semantic conventions are only tested if they survive the trip).
//!
//! [`shared`] is one receiver for a whole test binary: the in-process stacks export their spans
//! to it (the tracer is installed once per process, see `harness::init_tracing`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind as ProtoKind;
use prost::Message;

/// A span's kind, as OTLP carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SpanKind {
    Unspecified,
    Internal,
    Server,
    Client,
    Producer,
    Consumer,
}

impl From<ProtoKind> for SpanKind {
    fn from(k: ProtoKind) -> Self {
        match k {
            ProtoKind::Unspecified => Self::Unspecified,
            ProtoKind::Internal => Self::Internal,
            ProtoKind::Server => Self::Server,
            ProtoKind::Client => Self::Client,
            ProtoKind::Producer => Self::Producer,
            ProtoKind::Consumer => Self::Consumer,
        }
    }
}

/// An attribute value. Arrays, maps and bytes are kept as their debug text: no convention
/// Colloquy asserts uses them.
#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    Str(String),
    Bool(bool),
    Int(i64),
    Double(f64),
    Other(String),
}

impl AttrValue {
    /// The string, when the value is one.
    #[must_use]
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, when the value is one.
    #[must_use]
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Self::Int(i) => Some(*i),
            _ => None,
        }
    }

    fn from_proto(v: Option<&AnyValue>) -> Self {
        match v.and_then(|v| v.value.as_ref()) {
            Some(Value::StringValue(s)) => Self::Str(s.clone()),
            Some(Value::BoolValue(b)) => Self::Bool(*b),
            Some(Value::IntValue(i)) => Self::Int(*i),
            Some(Value::DoubleValue(d)) => Self::Double(*d),
            Some(other) => Self::Other(format!("{other:?}")),
            None => Self::Other(String::new()),
        }
    }
}

/// One received span.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedSpan {
    pub service: String,
    pub name: String,
    pub kind: SpanKind,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// The span's own attributes (not the resource's), by key.
    pub attributes: BTreeMap<String, AttrValue>,
}

impl ReceivedSpan {
    /// The attribute `key`, if the span has it.
    #[must_use]
    pub fn attr(&self, key: &str) -> Option<&AttrValue> {
        self.attributes.get(key)
    }
}

/// At most this many spans are kept (the oldest go first), so a long test binary that exports
/// every span does not grow without bound.
pub const KEPT_SPANS: usize = 200_000;

/// The receiver; spans accumulate until read (the last [`KEPT_SPANS`]).
#[derive(Clone, Debug, Default)]
pub struct OtlpReceiver {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    addr: Option<SocketAddr>,
}

impl OtlpReceiver {
    /// Starts listening on 127.0.0.1 (any port).
    ///
    /// # Errors
    /// When the port cannot be bound.
    pub async fn start() -> std::io::Result<Self> {
        let mut me = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        me.addr = Some(listener.local_addr()?);
        let app = Router::new()
            .route("/v1/traces", post(receive))
            .with_state(Arc::clone(&me.spans));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(me)
    }

    /// The endpoint to put in `OTEL_EXPORTER_OTLP_ENDPOINT`.
    #[must_use]
    pub fn endpoint(&self) -> String {
        self.addr.map(|a| format!("http://{a}")).unwrap_or_default()
    }

    /// Every span received so far.
    #[must_use]
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The spans received so far of trace `trace_id` (32 hex digits).
    #[must_use]
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

/// The receiver of this process, started on first use on a thread of its own: a test's
/// runtime ends with the test, this one lives as long as the test binary.
///
/// # Panics
/// When no port can be bound on 127.0.0.1 or the thread cannot be started.
pub fn shared() -> &'static OtlpReceiver {
    static SHARED: OnceLock<OtlpReceiver> = OnceLock::new();
    SHARED.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("otlp-receiver".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("OTLP receiver runtime");
                rt.block_on(async move {
                    let _ = tx.send(OtlpReceiver::start().await);
                    std::future::pending::<()>().await;
                });
            })
            .expect("OTLP receiver thread");
        rx.recv()
            .expect("OTLP receiver thread ended")
            .expect("OTLP receiver bind")
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, AttrValue> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), AttrValue::from_proto(kv.value.as_ref())))
        .collect()
}

/// The spans of one export request, each with its resource's `service.name`.
#[must_use]
pub fn spans_of(req: ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for rs in req.resource_spans {
        let service = rs
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
            .map(|kv| AttrValue::from_proto(kv.value.as_ref()))
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(ReceivedSpan {
                    service: service.clone(),
                    kind: SpanKind::from(s.kind()),
                    attributes: attributes(&s.attributes),
                    name: s.name,
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                });
            }
        }
    }
    out
}

async fn receive(State(spans): State<Arc<Mutex<Vec<ReceivedSpan>>>>, body: Bytes) -> StatusCode {
    let Ok(req) = ExportTraceServiceRequest::decode(body) else {
        return StatusCode::BAD_REQUEST;
    };
    let out = spans_of(req);
    let mut spans = spans
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    spans.extend(out);
    let over = spans.len().saturating_sub(KEPT_SPANS);
    spans.drain(..over);
    StatusCode::OK
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    use super::*;

    fn kv(key: &str, value: Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
            ..KeyValue::default()
        }
    }

    fn request() -> ExportTraceServiceRequest {
        let span = |name: &str, kind: ProtoKind, attrs: Vec<KeyValue>| Span {
            trace_id: vec![0xab; 16],
            span_id: vec![0x01; 8],
            parent_span_id: vec![],
            name: name.into(),
            kind: kind as i32,
            attributes: attrs,
            ..Span::default()
        };
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", Value::StringValue("gateway".into()))],
                    ..Resource::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: vec![
                        span(
                            "publish incoming_messages",
                            ProtoKind::Producer,
                            vec![
                                kv("messaging.system", Value::StringValue("kafka".into())),
                                kv(
                                    "messaging.destination.partition.id",
                                    Value::StringValue("3".into()),
                                ),
                            ],
                        ),
                        span(
                            "chat",
                            ProtoKind::Client,
                            vec![
                                kv("gen_ai.usage.input_tokens", Value::IntValue(12)),
                                kv("retried", Value::BoolValue(false)),
                                kv("ratio", Value::DoubleValue(0.5)),
                            ],
                        ),
                    ],
                    ..ScopeSpans::default()
                }],
                ..ResourceSpans::default()
            }],
        }
    }

    fn check(spans: &[ReceivedSpan]) {
        assert_eq!(spans.len(), 2, "{spans:#?}");
        let publish = &spans[0];
        assert_eq!(publish.service, "gateway");
        assert_eq!(publish.kind, SpanKind::Producer);
        assert_eq!(publish.trace_id, "ab".repeat(16));
        assert_eq!(publish.span_id, "01".repeat(8));
        assert_eq!(publish.parent_span_id, "");
        assert_eq!(
            publish.attr("messaging.system").and_then(AttrValue::as_str),
            Some("kafka")
        );
        assert_eq!(
            publish.attr("messaging.destination.partition.id"),
            Some(&AttrValue::Str("3".into()))
        );
        // Resource attributes are not span attributes.
        assert_eq!(publish.attr("service.name"), None);
        let chat = &spans[1];
        assert_eq!(chat.kind, SpanKind::Client);
        assert_eq!(
            chat.attr("gen_ai.usage.input_tokens")
                .and_then(AttrValue::as_i64),
            Some(12)
        );
        assert_eq!(chat.attr("retried"), Some(&AttrValue::Bool(false)));
        assert_eq!(chat.attr("ratio"), Some(&AttrValue::Double(0.5)));
    }

    #[test]
    fn spans_keep_their_kind_and_attributes() {
        check(&spans_of(request()));
    }

    #[tokio::test]
    async fn the_http_endpoint_keeps_them_too() {
        let receiver = OtlpReceiver::start().await.expect("bind");
        let resp = reqwest::Client::new()
            .post(format!("{}/v1/traces", receiver.endpoint()))
            .header("content-type", "application/x-protobuf")
            .body(request().encode_to_vec())
            .send()
            .await
            .expect("post");
        assert_eq!(resp.status(), 200);
        check(&receiver.spans());

        let bad = reqwest::Client::new()
            .post(format!("{}/v1/traces", receiver.endpoint()))
            .body("not protobuf at all")
            .send()
            .await
            .expect("post");
        assert_eq!(bad.status(), 400);
    }
}
