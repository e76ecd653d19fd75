//! A run of blocking reads by one thread, and the bookkeeping it defers.
//!
//! Each successful routed read feeds two HDR histograms (its replica's and
//! the router's) and its replica's peak-EWMA, each behind a mutex. For a
//! 4 KiB page-cache `pread` (about a microsecond) three lock round trips on
//! lines that the other reader thread also takes cost a good part of the
//! read. A [`ReadSession`], owned by one thread for one run of reads (a
//! `cat_ranges` worker, a prefetch driver), lets the store keep those
//! samples in a [`Tally`] and fold them in with one lock per histogram and
//! estimate per batch. Stores with nothing to defer ignore the tally.
//!
//! What the router does *not* defer, so routing decisions never wait on a
//! batch: counters and requests in flight (striped atomics, exact at once),
//! the failure streak, ejection and readmission, the retry budget, and any
//! sample that would raise a replica's peak-EWMA (a peak must steer load at
//! once; only decaying samples wait). A failed attempt flushes the batch
//! first, so the estimate sees samples in the order they happened. A batch
//! is at most [`TALLY_BATCH`] samples and [`TALLY_MAX_AGE`] old, and is
//! flushed when the session drops: stats may lag the reads in flight by
//! that much, and see every finished call in full.

use std::time::{Duration, Instant};

use super::Store;
use crate::error::Result;

/// Most samples held before a flush.
pub const TALLY_BATCH: usize = 64;

/// Oldest a held sample may get before the next one flushes the batch.
pub const TALLY_MAX_AGE: Duration = Duration::from_millis(2);

/// One successful attempt: its replica, how long it took, when it ended.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttemptSample {
    pub replica: usize,
    pub elapsed: Duration,
    pub end: Instant,
}

/// Latency samples of one session's successful reads, not yet folded into
/// the store's figures. Only a [`ReadSession`] makes one, so a tally is
/// always folded into the store that filled it.
#[derive(Debug)]
pub struct Tally {
    pub(crate) attempts: Vec<AttemptSample>,
    /// End-to-end latency of reads that succeeded.
    pub(crate) reads: Vec<Duration>,
}

impl Tally {
    fn new() -> Self {
        Tally {
            attempts: Vec::new(),
            reads: Vec::new(),
        }
    }

    /// Whether the held samples should be folded in before one more.
    pub(crate) fn due(&self, now: Instant) -> bool {
        self.attempts.len() >= TALLY_BATCH
            || self.reads.len() >= TALLY_BATCH
            || self
                .attempts
                .first()
                .is_some_and(|s| now.saturating_duration_since(s.end) >= TALLY_MAX_AGE)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.attempts.is_empty() && self.reads.is_empty()
    }
}

/// Blocking reads through one store by one thread; see the module docs.
/// Dropping it folds in whatever the tally still holds.
#[derive(Debug)]
pub struct ReadSession<'s> {
    store: &'s dyn Store,
    tally: Tally,
}

impl<'s> ReadSession<'s> {
    pub fn new(store: &'s dyn Store) -> Self {
        ReadSession {
            store,
            tally: Tally::new(),
        }
    }

    pub fn store(&self) -> &'s dyn Store {
        self.store
    }

    /// [`Store::read_into_blocking`], its bookkeeping deferred to the tally.
    pub fn read_into_blocking(
        &mut self,
        key: &str,
        offset: u64,
        buf: &mut [u8],
    ) -> Option<Result<()>> {
        self.store
            .read_into_blocking_tallied(key, offset, buf, &mut self.tally)
    }

    /// Folds the held samples in now (before the thread waits, say).
    pub fn flush(&mut self) {
        if !self.tally.is_empty() {
            self.store.fold_tally(&mut self.tally);
        }
    }
}

impl Drop for ReadSession<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}
