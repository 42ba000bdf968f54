//! An in-process OTLP/HTTP trace receiver: accepts `POST /v1/traces` (protobuf, as
//! opentelemetry-otlp's HTTP exporter sends it) and keeps every span for assertions.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;

/// One received span.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedSpan {
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
}

/// The receiver; spans accumulate until read.
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
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn receive(State(spans): State<Arc<Mutex<Vec<ReceivedSpan>>>>, body: Bytes) -> StatusCode {
    let Ok(req) = ExportTraceServiceRequest::decode(body) else {
        return StatusCode::BAD_REQUEST;
    };
    let mut out = Vec::new();
    for rs in req.resource_spans {
        let service = rs
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| match &v.value {
                Some(Value::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(ReceivedSpan {
                    service: service.clone(),
                    name: s.name,
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                });
            }
        }
    }
    spans
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .extend(out);
    StatusCode::OK
}
