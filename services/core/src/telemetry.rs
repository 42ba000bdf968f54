//! Telemetry set-up shared by the three services: JSON logs that carry `trace_id` and
//! `span_id`, OpenTelemetry spans (exported over OTLP/HTTP when an endpoint is configured),
//! and the Prometheus recorder.
//!
//! Spans are always created with real trace ids, exporter or not, because the trace id is the
//! correlation id in logs and in the `ack` frame.

use std::fmt;
use std::sync::OnceLock;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, TelemetryConfig};

/// Keeps the tracer provider alive; flushes spans when dropped.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans that ended so far now, instead of at the exporter's next batch
    /// (blocking until the exporter answered). Nothing to do without an exporter.
    pub fn flush(&self) {
        if let Some(p) = &self.provider {
            let _ = p.force_flush();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Errors setting up telemetry.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid OTLP endpoint {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
    #[error("invalid log filter {filter:?}: {reason}")]
    Filter { filter: String, reason: String },
}

/// Installs logging and tracing for `service` (once per process; later calls only return a guard)
/// and the Prometheus recorder. Each service's `Application::build` registers its own metrics.
///
/// # Errors
/// When the log filter or the OTLP endpoint is invalid.
pub fn init(service: &'static str, cfg: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    let _ = crate::metrics::recorder();
    if INSTALLED.get().is_some() {
        return Ok(Telemetry { provider: None });
    }
    let filter = EnvFilter::try_new(&cfg.log_filter).map_err(|e| TelemetryError::Filter {
        filter: cfg.log_filter.clone(),
        reason: e.to_string(),
    })?;
    let provider = tracer_provider(service, cfg.otlp_endpoint.as_deref())?;
    let tracer = provider.tracer(service);
    // Spans are traced at INFO whatever the log filter says: the trace id is the correlation
    // id, and turning logs down must not break traces.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_error_records_to_exceptions(true)
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    let fmt_layer = match cfg.log_format {
        LogFormat::Json => json_layer(service, std::io::stdout)
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    let installed = tracing_subscriber::registry()
        .with(otel)
        .with(fmt_layer)
        .try_init()
        .is_ok();
    let _ = INSTALLED.set(());
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    Ok(Telemetry {
        provider: installed.then_some(provider),
    })
}

fn tracer_provider(
    service: &'static str,
    endpoint: Option<&str>,
) -> Result<SdkTracerProvider, TelemetryError> {
    let resource = Resource::builder().with_service_name(service).build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    if let Some(endpoint) = endpoint {
        use opentelemetry_otlp::WithExportConfig;
        let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(url)
            .build()
            .map_err(|e| TelemetryError::Exporter {
                endpoint: endpoint.to_owned(),
                reason: e.to_string(),
            })?;
        builder = builder.with_batch_exporter(exporter);
    }
    Ok(builder.build())
}

/// The JSON log layer of `service`, writing to `writer`.
fn json_layer<S, W>(service: &'static str, writer: W) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer()
        .fmt_fields(JsonFields::new())
        .event_format(JsonLines { service })
        .with_writer(writer)
}

/// One JSON object per line: time, level, service, target, message, the event's fields, the
/// fields of enclosing spans (`userid`, `msg_id`, ...) and the current `trace_id` / `span_id`.
/// Each key appears once: an event's field wins over a span's (and over `service`).
struct JsonLines {
    service: &'static str,
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut map = Map::new();
        map.insert(
            "timestamp".into(),
            Value::String(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        map.insert(
            "level".into(),
            Value::String(event.metadata().level().to_string()),
        );
        map.insert("service".into(), Value::String(self.service.into()));
        map.insert(
            "target".into(),
            Value::String(event.metadata().target().into()),
        );
        event.record(&mut JsonVisitor(&mut map));

        let mut current = None;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>()
                    && let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(fields.as_str())
                {
                    for (k, v) in obj {
                        map.entry(k).or_insert(v);
                    }
                }
                current = Some(span.id());
            }
        }
        if let Some(id) = current {
            let cx = tracing::dispatcher::get_default(|d| {
                tracing_opentelemetry::get_otel_context(&id, d)
            });
            if let Some(cx) = cx {
                let sc = cx.span().span_context().clone();
                if sc.is_valid() {
                    map.insert("trace_id".into(), Value::String(sc.trace_id().to_string()));
                    map.insert("span_id".into(), Value::String(sc.span_id().to_string()));
                }
            }
        }
        let line = serde_json::to_string(&map).map_err(|_| fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().into(), Value::String(value.into()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // The whole cause chain, so an error is logged once, where handled, with its causes.
        let mut chain = value.to_string();
        let mut source = value.source();
        while let Some(s) = source {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            source = s.source();
        }
        self.0.insert(field.name().into(), Value::String(chain));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::String(format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("write refused")]
    struct Outer(#[source] io::Error);

    /// The keys of a JSON object in the order written, duplicates included (a `Map` would
    /// silently keep the last of two equal keys).
    fn keys_of(line: &str) -> Vec<String> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = Vec<String>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut keys = Vec::new();
                while let Some((k, _)) = map.next_entry::<String, serde::de::IgnoredAny>()? {
                    keys.push(k);
                }
                Ok(keys)
            }
        }
        let mut de = serde_json::Deserializer::from_str(line);
        serde::Deserializer::deserialize_map(&mut de, Keys).expect("a JSON object")
    }

    #[test]
    fn json_lines_keep_every_field_once_with_the_trace_context() {
        // Installed as the global default, as in the services: the formatter finds the trace
        // context through the global dispatcher (a scoped one is not reachable while an event
        // is being dispatched). Other tests' events land here too, so lines are picked by target.
        let provider = tracer_provider("gateway", None).expect("provider");
        let lines = Lines::default();
        let writer = lines.clone();
        tracing::subscriber::set_global_default(
            tracing_subscriber::registry()
                .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
                .with(json_layer("gateway", move || writer.clone())),
        )
        .expect("no other global subscriber in this test binary");
        let (trace_id, span_id) = {
            let outer = tracing::info_span!("outer", userid = "alice", msg_id = "m1");
            let _outer = outer.enter();
            let inner = tracing::info_span!("inner", attempt = 2_u64);
            let _inner = inner.enter();
            tracing::warn!(
                msg_id = "m2",
                service = "ai-consumer",
                ok = true,
                "produce failed"
            );
            let err = Outer(io::Error::other("broker gone"));
            tracing::error!(error = &err as &dyn std::error::Error, "gave up");
            let sc = tracing_opentelemetry::OpenTelemetrySpanExt::context(&inner)
                .span()
                .span_context()
                .clone();
            (sc.trace_id().to_string(), sc.span_id().to_string())
        };
        let text = String::from_utf8(lines.0.lock().expect("lines").clone()).expect("utf-8");
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(&format!("\"target\":\"{}\"", module_path!())))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        for line in &lines {
            let keys = keys_of(line);
            let mut unique = keys.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(keys.len(), unique.len(), "a key twice: {line}");
        }
        let warn: Value = serde_json::from_str(lines[0]).expect("json");
        let ts = warn["timestamp"].as_str().expect("timestamp");
        assert!(
            chrono::DateTime::parse_from_rfc3339(ts).is_ok() && ts.ends_with('Z'),
            "{ts}"
        );
        assert_eq!(
            ts.split('.').nth(1).map(str::len),
            Some(7),
            "microseconds: {ts}"
        );
        assert_eq!(warn["level"], "WARN");
        assert_eq!(warn["target"], module_path!());
        assert_eq!(warn["message"], "produce failed");
        // The event's own fields win over the process's and the spans'.
        assert_eq!(warn["service"], "ai-consumer");
        assert_eq!(warn["msg_id"], "m2");
        assert_eq!(warn["ok"], true);
        // The fields of every enclosing span.
        assert_eq!(warn["userid"], "alice");
        assert_eq!(warn["attempt"], 2);
        assert_eq!(warn["trace_id"], trace_id.as_str());
        assert_eq!(warn["span_id"], span_id.as_str());
        assert_eq!(trace_id.len(), 32);
        assert_eq!(span_id.len(), 16);

        let error: Value = serde_json::from_str(lines[1]).expect("json");
        assert_eq!(error["service"], "gateway");
        assert_eq!(error["level"], "ERROR");
        // An error is logged with its whole cause chain.
        assert_eq!(error["error"], "write refused: broker gone");
        assert_eq!(error["msg_id"], "m1");
    }
}
