//! Replica lookup speed. Weighted rendezvous hashing over 16 replicas:
//! the primary alone and the full preference list, equal and unequal
//! weights. Goal: ≤ 100 ns per lookup. The Python comparison with
//! `uhashring` is in `benches/test_route_bench.py`.
//!
//! Each lookup is timed twice: wall clock (criterion's default) and the
//! thread's CPU time (`*_cpu`), which does not count the time this thread
//! waits for a core. The build machines run ~8 jobs on 2 cores; CPU time is
//! the figure that compares across runs there.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use feedline_core::route::Rendezvous;

fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn lookups(c: &mut Criterion) {
    let names: Vec<String> = (0..16).map(|i| format!("/data/replica-{i:02}")).collect();
    let keys: Vec<String> = (0..1024)
        .map(|i| format!("train/shard-{i:05}.parquet"))
        .collect();
    let weights: Vec<f64> = (0..16).map(|i| 1.0 + (i % 4) as f64).collect();
    let equal = Rendezvous::new(&names, None).unwrap();
    let weighted = Rendezvous::new(&names, Some(&weights)).unwrap();
    let mut group = c.benchmark_group("route_16_replicas");
    for (label, r) in [("equal", &equal), ("weighted", &weighted)] {
        group.bench_function(format!("primary_{label}"), |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + 1) & 1023;
                black_box(r.primary(black_box(&keys[i])))
            })
        });
        group.bench_function(format!("primary_{label}_cpu"), |b| {
            b.iter_custom(|iters| {
                let start = thread_cpu_time();
                for n in 0..iters {
                    black_box(r.primary(black_box(&keys[(n & 1023) as usize])));
                }
                thread_cpu_time() - start
            })
        });
        group.bench_function(format!("preference_list_{label}"), |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + 1) & 1023;
                black_box(r.preference_list(black_box(&keys[i])))
            })
        });
        group.bench_function(format!("preference_list_{label}_cpu"), |b| {
            b.iter_custom(|iters| {
                let start = thread_cpu_time();
                for n in 0..iters {
                    black_box(r.preference_list(black_box(&keys[(n & 1023) as usize])));
                }
                thread_cpu_time() - start
            })
        });
    }
    group.finish();
}

criterion_group!(benches, lookups);
criterion_main!(benches);
