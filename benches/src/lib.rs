//! Colloquy's performance measurements.
//!
//! The criterion benches of the hot path live in `benches/hot_path/`; the `conn-memory` binary
//! measures the resident memory a gateway spends per idle WebSocket. This library holds the
//! small pure pieces of that binary so they are unit-tested.

pub mod proc_status;
