//! Shared foundation of Colloquy's three services.
//!
//! Everything that two services must agree on lives here, so the contract exists once:
//! the WebSocket frames ([`wire`]), the Kafka records and Redis deliveries ([`records`]),
//! the naming of topics, keys and channels ([`names`]), configuration ([`config`]),
//! broker and Redis set-up ([`kafka`], [`redis`]), the metrics contract ([`metrics`], its
//! label values [`labels`], and the events core emits [`events`]),
//! telemetry ([`telemetry`], [`trace_context`], the conventional spans of [`semconv`]) and
//! shutdown plumbing ([`shutdown`]).

pub mod admin;
pub mod backoff;
pub mod config;
pub mod dead_letter;
pub mod events;
pub mod kafka;
pub mod labels;
pub mod metrics;
pub mod names;
pub mod net;
pub mod offset_gaps;
pub mod records;
pub mod redis;
pub mod retry;
pub mod semconv;
pub mod shutdown;
pub mod telemetry;
pub mod trace_context;
pub mod userid;
pub mod wire;

pub use userid::UserId;

/// Milliseconds since the Unix epoch, the time unit carried in records and headers.
#[must_use]
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
