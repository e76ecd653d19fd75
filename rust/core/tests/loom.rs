//! Loom model checks of the slot ring's protocol (and of [`PerProcess`]'s
//! publication after a fork): every interleaving of the
//! threads below (up to `LOOM_MAX_PREEMPTIONS`) is explored, with the ring's
//! atomics, mutex and condition variable replaced by loom's.
//!
//! Run with `make loom` (the crate must be built with `--cfg loom`). The
//! waits are the blocking ones (`claim(seq, None)`, `consume(seq, None)`), so
//! a lost wake-up shows up as a deadlock, which loom reports.
#![cfg(loom)]

use std::sync::Arc;

use feedline_core::ring::Ring;
use feedline_core::Error;
use loom::sync::atomic::{AtomicBool, Ordering};
use loom::thread;

/// Claims `seq`, writes `value` into its first byte and publishes one byte.
fn produce(ring: &Arc<Ring>, seq: u64, value: u8) {
    let mut writer = ring.claim(seq, None).expect("claim");
    writer.buf_mut()[0] = value;
    writer.publish(1);
}

fn byte_for(seq: u64) -> u8 {
    0xA0 + seq as u8
}

#[test]
fn out_of_order_producers_deliver_in_plan_order() {
    loom::model(|| {
        let ring = Ring::new(2, 8).unwrap();
        // Two fetchers finishing in either order: one fills seq 1, the other
        // seq 0 and then seq 2, which lives in seq 0's slot and so also
        // waits for the consumer to release seq 0.
        let producers: Vec<_> = [vec![1u64], vec![0, 2]]
            .into_iter()
            .map(|seqs| {
                let ring = Arc::clone(&ring);
                thread::spawn(move || {
                    for seq in seqs {
                        produce(&ring, seq, byte_for(seq));
                    }
                })
            })
            .collect();
        for seq in 0..3 {
            let reader = ring.consume(seq, None).expect("consume");
            assert_eq!(reader.seq(), seq);
            assert_eq!(reader.data(), &[byte_for(seq)]);
        }
        for p in producers {
            p.join().unwrap();
        }
    });
}

#[test]
fn claim_waits_until_the_consumer_releases_the_previous_lap() {
    loom::model(|| {
        // One slot: seq 1 may only be claimed once seq 0 is released.
        let ring = Ring::new(1, 8).unwrap();
        let released = Arc::new(AtomicBool::new(false));
        let producer = {
            let ring = Arc::clone(&ring);
            let released = Arc::clone(&released);
            thread::spawn(move || {
                produce(&ring, 0, byte_for(0));
                let mut writer = ring.claim(1, None).expect("claim seq 1");
                // Relaxed is enough: the claim's Acquire synchronizes with
                // the release, which comes after the flag in the consumer.
                assert!(
                    released.load(Ordering::Relaxed),
                    "seq 1 claimed before seq 0 was released"
                );
                writer.buf_mut()[0] = byte_for(1);
                writer.publish(1);
            })
        };
        let first = ring.consume(0, None).expect("consume seq 0");
        assert_eq!(first.data(), &[byte_for(0)]);
        released.store(true, Ordering::Relaxed);
        drop(first);
        let second = ring.consume(1, None).expect("consume seq 1");
        assert_eq!(second.data(), &[byte_for(1)]);
        producer.join().unwrap();
    });
}

#[test]
fn releases_out_of_order_free_their_own_slots() {
    loom::model(|| {
        let ring = Ring::new(2, 8).unwrap();
        let producer = {
            let ring = Arc::clone(&ring);
            thread::spawn(move || {
                for seq in 0..3 {
                    produce(&ring, seq, byte_for(seq));
                }
            })
        };
        let r0 = ring.consume(0, None).expect("consume seq 0");
        let r1 = ring.consume(1, None).expect("consume seq 1");
        assert_eq!(r0.data(), &[byte_for(0)]);
        assert_eq!(r1.data(), &[byte_for(1)]);
        // Seq 1 goes back first; seq 2 lives in seq 0's slot, so it can only
        // be claimed once seq 0 goes back too.
        drop(r1);
        drop(r0);
        let r2 = ring.consume(2, None).expect("consume seq 2");
        assert_eq!(r2.data(), &[byte_for(2)]);
        drop(r2);
        producer.join().unwrap();
    });
}

#[test]
fn close_wakes_a_parked_consumer_and_a_parked_producer() {
    loom::model(|| {
        let ring = Ring::new(1, 8).unwrap();
        // Seq 0 is claimed and never published before close: the consumer
        // waits for it, and the producer waits for its slot (seq 1).
        let writer = ring.try_claim(0).expect("claim seq 0");
        let consumer = {
            let ring = Arc::clone(&ring);
            thread::spawn(move || ring.consume(0, None).map(|r| r.len()))
        };
        let producer = {
            let ring = Arc::clone(&ring);
            thread::spawn(move || ring.claim(1, None).map(|w| w.seq()))
        };
        ring.close();
        let consumed = consumer.join().unwrap();
        assert!(matches!(consumed, Err(Error::Closed(_))), "{consumed:?}");
        let claimed = producer.join().unwrap();
        assert!(matches!(claimed, Err(Error::Closed(_))), "{claimed:?}");
        drop(writer);
    });
}

#[test]
fn dropped_writer_hands_the_consumer_a_cancellation() {
    loom::model(|| {
        let ring = Ring::new(1, 8).unwrap();
        let producer = {
            let ring = Arc::clone(&ring);
            thread::spawn(move || {
                let writer = ring.claim(0, None).expect("claim seq 0");
                drop(writer); // abandoned fetch: never published
                produce(&ring, 1, byte_for(1));
            })
        };
        let cancelled = ring.consume(0, None);
        assert!(
            matches!(cancelled, Err(Error::Cancelled(_))),
            "{cancelled:?}"
        );
        // The cancelled slot went back to the ring: seq 1 arrives.
        let next = ring.consume(1, None).expect("consume seq 1");
        assert_eq!(next.data(), &[byte_for(1)]);
        drop(next);
        producer.join().unwrap();
    });
}

/// Two threads of a forked child (pid 2) meet the value its parent (pid 1)
/// built: both get the child's own value, the same one, and it stays.
#[test]
fn per_process_value_is_rebuilt_once_visible_to_every_thread_after_a_fork() {
    use feedline_core::fork::PerProcess;

    loom::model(|| {
        let slot = Arc::new(PerProcess::<Arc<u64>>::new());
        assert_eq!(**slot.get_in(1, |_| Ok::<_, ()>(Arc::new(1))).unwrap(), 1);
        let children: Vec<_> = [20u64, 21]
            .into_iter()
            .map(|v| {
                let slot = Arc::clone(&slot);
                thread::spawn(move || **slot.get_in(2, |_| Ok::<_, ()>(Arc::new(v))).unwrap())
            })
            .collect();
        let seen: Vec<u64> = children.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(seen[0], seen[1], "both threads see the one published value");
        assert!(seen[0] == 20 || seen[0] == 21);
        let kept = **slot.get_in(2, |_| Ok::<_, ()>(Arc::new(99))).unwrap();
        assert_eq!(kept, seen[0], "the winner stays; no third build");
    });
}
