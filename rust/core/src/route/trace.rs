//! A per-read trace of the router's decisions, for finding where a tail
//! comes from: which replica served, when the hedge went out or why it did
//! not, who won. Off until asked for; then it records a bounded number of
//! reads and stops (the hot path pays one relaxed load when off).

use crate::fork::ForkMutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Why a read's first attempt went without a hedge, or that one went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HedgeNote {
    /// Hedging is off for this replica (local files by default, or `None`).
    Off,
    /// The attempt ended before the hedge delay.
    DelayNotReached,
    /// Sent (see `hedge_sent_us`).
    Sent,
    /// Nobody to hedge to: every other replica tried or ejected, and the
    /// replica does not hedge within itself.
    NoReplica,
    /// The retry budget had no token above the failover reserve before the
    /// attempt ended (or the deadline came).
    Budget,
}

/// Who answered a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Winner {
    Primary,
    Hedge,
    /// A retry after a failed attempt.
    Retry,
    Failed,
}

/// One read, times in microseconds since tracing started.
#[derive(Debug, Clone, Serialize)]
pub struct ReadTrace {
    pub key: String,
    /// `"range"`, `"object"` or `"size"`.
    pub kind: &'static str,
    /// The first attempt's replica (an index into `stats()["replicas"]`).
    pub replica: usize,
    pub start_us: u64,
    pub hedge: HedgeNote,
    /// The delay the hedge waited for (0 when hedging is off).
    pub hedge_delay_us: u64,
    pub hedge_sent_us: Option<u64>,
    pub hedge_replica: Option<usize>,
    /// Time spent after the hedge delay waiting for a budget token.
    pub budget_wait_us: u64,
    /// Attempts in flight on the primary's replica when the read began.
    pub in_flight: u64,
    pub winner: Winner,
    pub end_us: u64,
}

/// What a read notes while it runs; turned into a [`ReadTrace`] at its end.
#[derive(Debug)]
pub(super) struct Note {
    pub replica: Option<usize>,
    pub hedge: HedgeNote,
    pub hedge_delay: Duration,
    pub hedge_sent: Option<Instant>,
    pub hedge_replica: Option<usize>,
    pub budget_wait: Duration,
    pub in_flight: u64,
    pub winner: Winner,
}

impl Default for Note {
    fn default() -> Self {
        Note {
            replica: None,
            hedge: HedgeNote::Off,
            hedge_delay: Duration::ZERO,
            hedge_sent: None,
            hedge_replica: None,
            budget_wait: Duration::ZERO,
            in_flight: 0,
            winner: Winner::Failed,
        }
    }
}

#[derive(Debug, Clone)]
struct Log {
    epoch: Instant,
    capacity: usize,
    reads: Vec<ReadTrace>,
}

/// The router's trace: off, or recording up to a capacity.
#[derive(Debug, Default)]
pub struct Tracer {
    on: AtomicBool,
    log: ForkMutex<Option<Log>>,
}

impl Tracer {
    /// Records the next `capacity` reads (0 stops), dropping what was kept.
    pub fn start(&self, capacity: usize) {
        let mut log = self.log.lock();
        *log = (capacity > 0).then(|| Log {
            epoch: Instant::now(),
            capacity,
            reads: Vec::with_capacity(capacity.min(1 << 16)),
        });
        self.on.store(capacity > 0, Ordering::Relaxed);
    }

    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// The reads recorded since `start` or the last `take`; tracing goes on.
    pub fn take(&self) -> Vec<ReadTrace> {
        let mut log = self.log.lock();
        match log.as_mut() {
            Some(l) => {
                l.capacity = l.capacity.saturating_sub(l.reads.len());
                std::mem::take(&mut l.reads)
            }
            None => Vec::new(),
        }
    }

    pub(super) fn record(
        &self,
        key: &str,
        kind: &'static str,
        start: Instant,
        end: Instant,
        note: &Note,
    ) {
        let mut guard = self.log.lock();
        let Some(log) = guard.as_mut() else { return };
        if log.reads.len() >= log.capacity {
            self.on.store(false, Ordering::Relaxed);
            return;
        }
        let us = |t: Instant| t.saturating_duration_since(log.epoch).as_micros() as u64;
        log.reads.push(ReadTrace {
            key: key.to_string(),
            kind,
            replica: note.replica.unwrap_or(usize::MAX),
            start_us: us(start),
            hedge: note.hedge,
            hedge_delay_us: note.hedge_delay.as_micros() as u64,
            hedge_sent_us: note.hedge_sent.map(us),
            hedge_replica: note.hedge_replica,
            budget_wait_us: note.budget_wait.as_micros() as u64,
            in_flight: note.in_flight,
            winner: note.winner,
            end_us: us(end),
        });
    }
}
