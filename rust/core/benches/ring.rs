//! Slot hand-off through the ring against `crossbeam_queue::ArrayQueue`
//! and `rtrb`, moving the same number of 8-byte items with the same capacity.
//!
//! * `hand_off_spsc`: one producer thread, one consumer thread.
//! * `hand_off_2p1c`: two producers claiming disjoint seqs (even / odd) and
//!   one consumer taking them in order (`rtrb` is SPSC only, so it sits out).
//!
//! The ring goes through its real API: `claim` + `buf_mut` + `publish` on the
//! producer side, `consume` + `data` + drop (release) on the consumer side.
//! `ring` uses the blocking calls (spin, yield, then park: what the prefetcher
//! does); `ring_try` uses `try_claim` / `try_consume` with the same
//! spin-then-yield loop the queues get when full or empty, so it compares the
//! hand-off protocol alone. Each structure is built once and reused across
//! iterations (the ring keeps counting seqs), so only hand-offs are timed.
//!
//! `cargo bench -p feedline-core --bench ring`

use std::hint::black_box;
use std::sync::Arc;
use std::thread;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use crossbeam_queue::ArrayQueue;
use feedline_core::ring::Ring;

const ITEMS: u64 = 1 << 16;
const CAPACITY: usize = 64;
const PAYLOAD_BYTES: usize = 8;

/// Waiting for the baselines: spin a little, then give the core away (these
/// machines have 2 cores shared by other jobs).
struct Backoff(u32);

impl Backoff {
    fn snooze(&mut self) {
        if self.0 < 6 {
            for _ in 0..1u32 << self.0 {
                std::hint::spin_loop();
            }
            self.0 += 1;
        } else {
            thread::yield_now();
        }
    }
}

fn ring_produce(ring: &Arc<Ring>, seqs: impl Iterator<Item = u64>) {
    for seq in seqs {
        let mut writer = ring.claim(seq, None).expect("claim");
        writer.buf_mut()[..PAYLOAD_BYTES].copy_from_slice(&seq.to_le_bytes());
        writer.publish(PAYLOAD_BYTES);
    }
}

fn ring_try_produce(ring: &Arc<Ring>, seqs: impl Iterator<Item = u64>) {
    for seq in seqs {
        let mut backoff = Backoff(0);
        let mut writer = loop {
            match ring.try_claim(seq) {
                Some(writer) => break writer,
                None => backoff.snooze(),
            }
        };
        writer.buf_mut()[..PAYLOAD_BYTES].copy_from_slice(&seq.to_le_bytes());
        writer.publish(PAYLOAD_BYTES);
    }
}

fn ring_try_consume(ring: &Arc<Ring>, seqs: std::ops::Range<u64>) -> u64 {
    let mut sum = 0u64;
    for seq in seqs {
        let mut backoff = Backoff(0);
        let reader = loop {
            match ring.try_consume(seq) {
                Some(reader) => break reader.expect("consume"),
                None => backoff.snooze(),
            }
        };
        sum = sum.wrapping_add(u64::from_le_bytes(reader.data().try_into().unwrap()));
    }
    sum
}

fn ring_consume(ring: &Arc<Ring>, seqs: std::ops::Range<u64>) -> u64 {
    let mut sum = 0u64;
    for seq in seqs {
        let reader = ring.consume(seq, None).expect("consume");
        sum = sum.wrapping_add(u64::from_le_bytes(reader.data().try_into().unwrap()));
    }
    sum
}

fn queue_push(queue: &ArrayQueue<u64>, items: impl Iterator<Item = u64>) {
    for mut item in items {
        let mut backoff = Backoff(0);
        while let Err(back) = queue.push(item) {
            item = back;
            backoff.snooze();
        }
    }
}

fn queue_pop(queue: &ArrayQueue<u64>, count: u64) -> u64 {
    let mut sum = 0u64;
    for _ in 0..count {
        let mut backoff = Backoff(0);
        let item = loop {
            match queue.pop() {
                Some(item) => break item,
                None => backoff.snooze(),
            }
        };
        sum = sum.wrapping_add(item);
    }
    sum
}

fn spsc(c: &mut Criterion) {
    let mut group = c.benchmark_group("hand_off_spsc");
    group.throughput(Throughput::Elements(ITEMS));

    let ring = Ring::new(CAPACITY, PAYLOAD_BYTES).unwrap();
    let mut next_seq = 0u64;
    group.bench_function("ring", |b| {
        b.iter(|| {
            let seqs = next_seq..next_seq + ITEMS;
            next_seq += ITEMS;
            thread::scope(|s| {
                let producer_seqs = seqs.clone();
                s.spawn(|| ring_produce(&ring, producer_seqs));
                black_box(ring_consume(&ring, seqs))
            })
        })
    });

    let ring = Ring::new(CAPACITY, PAYLOAD_BYTES).unwrap();
    let mut next_seq = 0u64;
    group.bench_function("ring_try", |b| {
        b.iter(|| {
            let seqs = next_seq..next_seq + ITEMS;
            next_seq += ITEMS;
            thread::scope(|s| {
                let producer_seqs = seqs.clone();
                s.spawn(|| ring_try_produce(&ring, producer_seqs));
                black_box(ring_try_consume(&ring, seqs))
            })
        })
    });

    let queue = ArrayQueue::new(CAPACITY);
    group.bench_function("array_queue", |b| {
        b.iter(|| {
            thread::scope(|s| {
                s.spawn(|| queue_push(&queue, 0..ITEMS));
                black_box(queue_pop(&queue, ITEMS))
            })
        })
    });

    let (mut tx, mut rx) = rtrb::RingBuffer::<u64>::new(CAPACITY);
    group.bench_function("rtrb", |b| {
        b.iter(|| {
            thread::scope(|s| {
                let tx = &mut tx;
                s.spawn(move || {
                    for mut item in 0..ITEMS {
                        let mut backoff = Backoff(0);
                        while let Err(rtrb::PushError::Full(back)) = tx.push(item) {
                            item = back;
                            backoff.snooze();
                        }
                    }
                });
                let mut sum = 0u64;
                for _ in 0..ITEMS {
                    let mut backoff = Backoff(0);
                    let item = loop {
                        match rx.pop() {
                            Ok(item) => break item,
                            Err(_) => backoff.snooze(),
                        }
                    };
                    sum = sum.wrapping_add(item);
                }
                black_box(sum)
            })
        })
    });
    group.finish();
}

fn two_producers(c: &mut Criterion) {
    let mut group = c.benchmark_group("hand_off_2p1c");
    group.throughput(Throughput::Elements(ITEMS));

    let ring = Ring::new(CAPACITY, PAYLOAD_BYTES).unwrap();
    let mut next_seq = 0u64;
    group.bench_function("ring", |b| {
        b.iter(|| {
            let base = next_seq;
            next_seq += ITEMS;
            thread::scope(|s| {
                for parity in 0..2 {
                    let ring = &ring;
                    s.spawn(move || ring_produce(ring, (base + parity..base + ITEMS).step_by(2)));
                }
                black_box(ring_consume(&ring, base..base + ITEMS))
            })
        })
    });

    let ring = Ring::new(CAPACITY, PAYLOAD_BYTES).unwrap();
    let mut next_seq = 0u64;
    group.bench_function("ring_try", |b| {
        b.iter(|| {
            let base = next_seq;
            next_seq += ITEMS;
            thread::scope(|s| {
                for parity in 0..2 {
                    let ring = &ring;
                    s.spawn(move || {
                        ring_try_produce(ring, (base + parity..base + ITEMS).step_by(2))
                    });
                }
                black_box(ring_try_consume(&ring, base..base + ITEMS))
            })
        })
    });

    let queue = ArrayQueue::new(CAPACITY);
    group.bench_function("array_queue", |b| {
        b.iter(|| {
            thread::scope(|s| {
                for parity in 0..2 {
                    let queue = &queue;
                    s.spawn(move || queue_push(queue, (parity..ITEMS).step_by(2)));
                }
                black_box(queue_pop(&queue, ITEMS))
            })
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = spsc, two_producers
}
criterion_main!(benches);
