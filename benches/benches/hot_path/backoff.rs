//! The retry delay of an LLM call, with the thread-local RNG the ai-consumer uses.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput};

use colloquy_core::backoff::Backoff;

pub(crate) fn benches(c: &mut Criterion) {
    // The ai-consumer's defaults: 500 ms base, 20 s cap, 7 attempts.
    let backoff = Backoff {
        base: Duration::from_millis(500),
        cap: Duration::from_secs(20),
        max_attempts: 7,
    };
    let mut g = c.benchmark_group("core/Backoff::delay");
    g.throughput(Throughput::Elements(1));
    g.bench_function("no_hint", |b| {
        let mut attempt = 0;
        b.iter(|| {
            attempt = attempt % 6 + 1;
            backoff.delay(black_box(attempt), None, &mut rand::rng())
        });
    });
    g.bench_function("retry_after", |b| {
        let mut attempt = 0;
        b.iter(|| {
            attempt = attempt % 6 + 1;
            backoff.delay(
                black_box(attempt),
                Some(Duration::from_secs(2)),
                &mut rand::rng(),
            )
        });
    });
    g.finish();
}
