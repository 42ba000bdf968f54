//! The gateway's pure rate-limit decision (the same GCRA the Redis script runs).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput};

use colloquy_gateway::rate_limit::Gcra;

pub(crate) fn benches(c: &mut Criterion) {
    // The default: 10 messages per 60 s.
    let gcra = Gcra::per_period(10, Duration::from_secs(60));
    let mut g = c.benchmark_group("gateway");
    g.throughput(Throughput::Elements(1));
    g.bench_function("Gcra::check", |b| {
        // A user sending every 5 s: allowed and limited decisions alternate with the clock.
        let mut tat = None;
        let mut now = 1_767_225_600_000_i64;
        b.iter(|| {
            let (decision, new_tat) = black_box(gcra).check(tat, black_box(now));
            tat = Some(new_tat);
            now += 5_000;
            decision
        });
    });
    g.finish();
}
