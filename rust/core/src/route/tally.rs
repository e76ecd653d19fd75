//! Deferred latency bookkeeping for a run of blocking reads.
//!
//! Each successful read feeds two HDR histograms (its replica's and the
//! router's) and its replica's peak-EWMA, each behind a mutex. For a 4 KiB
//! page-cache `pread` (about a microsecond) three lock round trips on lines
//! that the other reader thread also takes cost a good part of the read. A
//! [`ReadTally`], owned by one thread for one run of reads (a `cat_ranges`
//! worker), keeps the samples of successful attempts and folds them in with
//! one lock per histogram and estimate per batch.
//!
//! What is *not* deferred, so routing decisions never wait on a batch:
//! counters and requests in flight (striped atomics, exact at once), the
//! failure streak, ejection and readmission, the retry budget, and any
//! sample that would raise a replica's peak-EWMA (a peak must steer load at
//! once; only decaying samples wait). A failed attempt flushes the batch
//! first, so the estimate sees samples in the order they happened. A batch
//! is at most [`TALLY_BATCH`] samples and [`TALLY_MAX_AGE`] old, and is
//! flushed when the tally drops: `stats()` may lag the reads in flight by
//! that much, and sees every finished call in full.

use std::time::{Duration, Instant};

use super::Router;

/// Most samples held before a flush.
pub const TALLY_BATCH: usize = 64;

/// Oldest a held sample may get before the next one flushes the batch.
pub const TALLY_MAX_AGE: Duration = Duration::from_millis(2);

/// One successful attempt: its replica, how long it took, when it ended.
#[derive(Debug, Clone, Copy)]
struct AttemptSample {
    replica: usize,
    elapsed: Duration,
    end: Instant,
}

/// Latency samples of one thread's successful reads, not yet folded into
/// the router's histograms and peak-EWMA. See the module docs.
#[derive(Debug)]
pub struct ReadTally<'r> {
    router: &'r Router,
    attempts: Vec<AttemptSample>,
    /// End-to-end latency of reads that succeeded.
    reads: Vec<Duration>,
}

impl<'r> ReadTally<'r> {
    pub(super) fn new(router: &'r Router) -> Self {
        ReadTally {
            router,
            attempts: Vec::with_capacity(TALLY_BATCH),
            reads: Vec::with_capacity(TALLY_BATCH),
        }
    }

    pub(super) fn router(&self) -> &'r Router {
        self.router
    }

    fn due(&self, now: Instant) -> bool {
        self.attempts.len() >= TALLY_BATCH
            || self.reads.len() >= TALLY_BATCH
            || self
                .attempts
                .first()
                .is_some_and(|s| now.saturating_duration_since(s.end) >= TALLY_MAX_AGE)
    }

    /// Holds a successful attempt's sample (the caller checked it is not a
    /// peak).
    pub(super) fn defer_attempt(&mut self, replica: usize, elapsed: Duration, end: Instant) {
        if self.due(end) {
            self.flush();
        }
        self.attempts.push(AttemptSample {
            replica,
            elapsed,
            end,
        });
    }

    /// Holds a successful read's end-to-end latency.
    pub(super) fn defer_read(&mut self, elapsed: Duration) {
        if self.reads.len() >= TALLY_BATCH {
            self.flush();
        }
        self.reads.push(elapsed);
    }

    /// Folds every held sample in: per replica, one lock of its histogram
    /// and one of its estimate; one lock of the router's histogram.
    pub fn flush(&mut self) {
        let mut seen: u64 = 0;
        for s in &self.attempts {
            seen |= 1 << s.replica;
        }
        while seen != 0 {
            let r = seen.trailing_zeros() as usize;
            seen &= seen - 1;
            let samples = self
                .attempts
                .iter()
                .filter(move |s| s.replica == r)
                .map(|s| (s.elapsed, s.end));
            self.router.health(r).record_successes(samples);
        }
        self.attempts.clear();
        if !self.reads.is_empty() {
            self.router.record_read_latencies(&self.reads);
            self.reads.clear();
        }
    }
}

impl Drop for ReadTally<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}
