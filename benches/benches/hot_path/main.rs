//! Criterion benches of Colloquy's hot path, on the real types and functions: what the
//! gateway does per client frame and per delivery, what the ai-consumer does per message, and
//! the pure pieces of rate limiting and retry scheduling.
//!
//! One bench binary with a module per area keeps link times down. Run with
//! `cargo bench -p colloquy-benches`; `docs/performance.md` has the figures and how they were taken.

use criterion::{criterion_group, criterion_main};

mod backoff;
mod consumer;
mod gateway;
mod records;
mod wire;

criterion_group!(
    hot_path,
    wire::benches,
    records::benches,
    gateway::benches,
    consumer::benches,
    backoff::benches
);
criterion_main!(hot_path);
