//! Striped counters for figures that every read bumps from several threads.
//!
//! One `AtomicU64` bumped by two reader threads on two cores is one cache
//! line that moves between the cores on every read: each `fetch_add` then
//! costs a cache miss (tens to a hundred nanoseconds) instead of a few. A
//! [`StripedCounter`] gives each thread its own line (a stripe, chosen once
//! per thread) and sums the stripes when the figure is read, the way Java's
//! `LongAdder` does. Adds are exact and immediately visible to a reader;
//! only reading costs more (a few loads per stripe), and figures are read
//! far less often than they are bumped.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Stripes per counter. Threads beyond this share stripes (still correct,
/// just contended again); the machines this runs on have few cores.
const STRIPES: usize = 8;

/// One stripe on its own pair of cache lines (x86 prefetches lines in
/// pairs, so a single line of padding would still be shared).
#[repr(align(128))]
#[derive(Debug, Default)]
struct Stripe(AtomicU64);

/// Hands out stripe indices round-robin, so the first `STRIPES` threads
/// that bump counters get distinct stripes.
static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// This thread's stripe (assigned on first use).
#[inline]
fn stripe() -> usize {
    STRIPE.with(|s| {
        let i = s.get();
        if i != usize::MAX {
            return i;
        }
        let i = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES;
        s.set(i);
        i
    })
}

/// A counter that threads add to without sharing a cache line. Values wrap
/// (`sub` on one stripe of what was added on another still sums exactly),
/// so it also serves for gauges such as requests in flight.
#[derive(Debug, Default)]
pub struct StripedCounter {
    stripes: [Stripe; STRIPES],
}

impl StripedCounter {
    /// Const, so process-wide counters can be statics.
    pub const fn new() -> Self {
        StripedCounter {
            stripes: [const { Stripe(AtomicU64::new(0)) }; STRIPES],
        }
    }

    /// Relaxed: a counter orders nothing; readers want the total only.
    #[inline]
    pub fn add(&self, n: u64) {
        self.stripes[stripe()].0.fetch_add(n, Ordering::Relaxed);
    }

    #[inline]
    pub fn sub(&self, n: u64) {
        self.stripes[stripe()].0.fetch_sub(n, Ordering::Relaxed);
    }

    /// The sum of all stripes. Adds that run concurrently may or may not be
    /// included, exactly as with a single atomic read at some instant.
    pub fn get(&self) -> u64 {
        self.stripes
            .iter()
            .fold(0u64, |sum, s| sum.wrapping_add(s.0.load(Ordering::Relaxed)))
    }

    /// Sets the counter to zero; returns what it held. Each stripe is
    /// swapped, so an add racing with `take` lands either in the value
    /// returned or in the counter afterwards, never in neither.
    pub fn take(&self) -> u64 {
        self.stripes.iter().fold(0u64, |sum, s| {
            sum.wrapping_add(s.0.swap(0, Ordering::Relaxed))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_adds_from_many_threads_exactly() {
        let c = StripedCounter::new();
        std::thread::scope(|s| {
            for _ in 0..12 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        c.add(3);
                    }
                    c.sub(5);
                });
            }
        });
        assert_eq!(c.get(), 12 * (30_000 - 5));
        assert_eq!(c.take(), 12 * (30_000 - 5));
        assert_eq!(c.get(), 0);
    }

    #[test]
    fn a_gauge_raised_on_one_thread_and_lowered_on_another_sums_to_zero() {
        let c = StripedCounter::new();
        for _ in 0..STRIPES * 2 {
            std::thread::scope(|s| {
                s.spawn(|| c.add(1));
            });
            std::thread::scope(|s| {
                s.spawn(|| c.sub(1));
            });
        }
        assert_eq!(c.get(), 0);
    }
}
