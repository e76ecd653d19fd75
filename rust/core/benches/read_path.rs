//! The per-read cost of small random reads: one 4 KiB `pread` from a page-cached file through
//! the bare `LocalStore`, through the replica router (one replica, as
//! `feedline.FileSystem()` builds it) one read at a time, and through the
//! router with a per-thread tally (what `cat_ranges` uses). The difference
//! between `store` and `router_*` is the router's bookkeeping per read.
//!
//! `*_2t`: the same reads split over two threads (the shape of a
//! `cat_ranges` on two cores), where shared cache lines cost the most.
//!
//! Timed in CPU time summed over the reading threads (each thread's
//! `CLOCK_THREAD_CPUTIME_ID`), so the figure is the CPU cost per read and
//! does not count time spent waiting for a core on a shared machine.
//!
//! `cargo bench -p feedline-core --bench read_path`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use feedline_core::route::{Router, RouterConfig};
use feedline_core::store::{LocalStore, ReadSession, Store};

const FILE_BYTES: usize = 64 << 20;
const READ_BYTES: usize = 4096;

fn offsets() -> Vec<u64> {
    // A fixed pseudo-random walk over the file, page-aligned like the Python
    // small-random-read bench's.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (FILE_BYTES - READ_BYTES) as u64) & !4095
        })
        .collect()
}

fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs `iters` reads split over `threads` threads, each with its own
/// state from `start` and its own buffer; returns the CPU time they used.
fn timed<S: Send>(
    threads: u64,
    iters: u64,
    offsets: &[u64],
    start: impl Fn() -> S + Sync,
    read: impl Fn(&mut S, u64, &mut [u8]) + Sync,
) -> Duration {
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (start, read) = (&start, &read);
                s.spawn(move || {
                    let mut state = start();
                    let mut buf = vec![0u8; READ_BYTES];
                    let begin = thread_cpu_time();
                    for i in (t..iters).step_by(threads as usize) {
                        read(&mut state, offsets[(i & 4095) as usize], &mut buf);
                        black_box(&buf);
                    }
                    // The state (a tally) flushes on drop: part of the cost.
                    drop(state);
                    thread_cpu_time() - begin
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    })
}

fn reads(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..FILE_BYTES).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.path().join("f"), &data).unwrap();
    drop(data);
    let store = Arc::new(LocalStore::rooted(dir.path()).unwrap());
    let router = Router::new(
        vec![dir.path().display().to_string()],
        vec![Arc::clone(&store) as Arc<dyn Store>],
        RouterConfig::default(),
    )
    .unwrap();
    let offsets = offsets();
    let mut group = c.benchmark_group("read_4k");
    for threads in [1u64, 2] {
        let suffix = if threads == 1 { "" } else { "_2t" };
        group.bench_function(format!("store{suffix}"), |b| {
            b.iter_custom(|iters| {
                timed(
                    threads,
                    iters,
                    &offsets,
                    || (),
                    |_, off, buf| store.read_into_blocking("f", off, buf).unwrap().unwrap(),
                )
            })
        });
        group.bench_function(format!("router_untallied{suffix}"), |b| {
            b.iter_custom(|iters| {
                timed(
                    threads,
                    iters,
                    &offsets,
                    || (),
                    |_, off, buf| router.read_into_blocking("f", off, buf).unwrap().unwrap(),
                )
            })
        });
        group.bench_function(format!("router_tallied{suffix}"), |b| {
            b.iter_custom(|iters| {
                timed(
                    threads,
                    iters,
                    &offsets,
                    || ReadSession::new(&router),
                    |session, off, buf| session.read_into_blocking("f", off, buf).unwrap().unwrap(),
                )
            })
        });
    }
    group.finish();
    let stats = router.stats(false);
    assert_eq!(
        stats.reads, stats.latency.count,
        "every read's latency recorded"
    );
}

criterion_group!(benches, reads);
criterion_main!(benches);
