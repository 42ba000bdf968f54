//! The ai-consumer's bookkeeping per message: offset tracking with completions out of order,
//! and per-user lanes.

use std::hint::black_box;

use criterion::{Criterion, Throughput};

use colloquy_ai_consumer::lanes::{Lanes, Pushed};
use colloquy_ai_consumer::offsets::OffsetTracker;
use colloquy_core::UserId;

/// Messages in flight per batch: about the ai-consumer's default `MAX_IN_FLIGHT` (50).
const BATCH: i64 = 64;
/// Completion order within a batch: `i * 37 mod 64` visits every offset once, scrambled.
const STRIDE: i64 = 37;

fn offsets(c: &mut Criterion) {
    let mut g = c.benchmark_group("consumer/OffsetTracker");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("start+finish/64_out_of_order", |b| {
        let mut tracker = OffsetTracker::default();
        let mut base = 0_i64;
        b.iter(|| {
            for o in 0..BATCH {
                tracker.start(0, base + o);
            }
            let mut stored = None;
            for i in 0..BATCH {
                if let Some(s) = tracker.finish(0, base + (i * STRIDE) % BATCH) {
                    stored = Some(s);
                }
            }
            base += BATCH;
            black_box(stored)
        });
    });
    g.finish();
}

fn lanes(c: &mut Criterion) {
    let users: Vec<UserId> = (0..16)
        .map(|i| UserId::parse(&format!("user_{i:02}")).expect("a valid userid"))
        .collect();
    let mut g = c.benchmark_group("consumer/Lanes");
    // 16 users with 4 jobs each: 64 pushes, then every runner drains its lane (64 nexts:
    // 48 return a job, 16 find the lane empty and close it).
    g.throughput(Throughput::Elements(64));
    g.bench_function("push+next/16_users_x4", |b| {
        let lanes: Lanes<u64> = Lanes::default();
        b.iter(|| {
            let mut runners = Vec::with_capacity(users.len());
            for job in 0..64_u64 {
                let user = &users[(job % 16) as usize];
                if let Pushed::Run(first) = lanes.push(user, job) {
                    runners.push((user, first));
                }
            }
            let mut sum = 0;
            for (user, first) in runners {
                sum += first;
                while let Some(job) = lanes.next(user) {
                    sum += job;
                }
            }
            black_box(sum)
        });
    });
    g.finish();
}

pub(crate) fn benches(c: &mut Criterion) {
    offsets(c);
    lanes(c);
}
