//! Colloquy's integration suites: one test binary, one module per area. Every test gets its own
//! Kafka and Redis (containers, or local processes with COLLOQUY_TESTKIT=processes).

mod backoff;
mod chat_page;
mod consumers;
mod delivery;
mod gateway;
mod slo;
mod telemetry;
