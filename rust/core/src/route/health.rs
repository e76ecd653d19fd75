//! What the router knows about one replica: peak-EWMA latency, requests in
//! flight, consecutive failures and ejection; plus its counters and latency
//! histogram for `stats()`.
//!
//! Peak-EWMA (Finagle's load metric): a slower-than-average response raises
//! the estimate at once ("peak"), faster ones pull it down with an
//! exponential decay in *time* (not in samples), so a replica that turned
//! slow is avoided immediately and forgiven gradually.
//!
//! Ejection (Envoy's outlier detection, consecutive-failure flavour): after
//! `eject_after_failures` failures in a row the replica is taken out of
//! rotation for `base_ejection_ms × ejections` (capped). When the time is up
//! one request is let through as a probe; success readmits it, failure
//! ejects it again for longer.

use crate::fork::ForkMutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::counter::StripedCounter;
use crate::metrics::{LatencySummary, LatencyWindow};

/// Time constant of the latency decay: how long a latency peak keeps
/// steering load away from a replica.
pub const PEAK_EWMA_DECAY: Duration = Duration::from_secs(1);

/// Counters of one replica. The two that every attempt bumps are striped
/// (see [`crate::counter`]); the rest count rare events.
#[derive(Debug, Default)]
pub struct ReplicaCounters {
    pub requests: StripedCounter,
    pub bytes: StripedCounter,
    pub errors: AtomicU64,
    pub retries: AtomicU64,
    pub hedges_sent: AtomicU64,
    pub hedges_won: AtomicU64,
    pub cancelled: AtomicU64,
    pub ejections: AtomicU64,
    pub readmissions: AtomicU64,
    pub not_found: AtomicU64,
    pub timeouts: AtomicU64,
    pub checksum_mismatches: AtomicU64,
    pub size_disagreements: AtomicU64,
}

impl ReplicaCounters {
    fn reset(&self) {
        self.requests.take();
        self.bytes.take();
        for c in [
            &self.errors,
            &self.retries,
            &self.hedges_sent,
            &self.hedges_won,
            &self.cancelled,
            &self.ejections,
            &self.readmissions,
            &self.not_found,
            &self.timeouts,
            &self.checksum_mismatches,
            &self.size_disagreements,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }
}

#[derive(Debug, Clone)]
struct Ewma {
    /// Estimated latency in nanoseconds (0 = no sample yet).
    cost_ns: f64,
    stamp: Instant,
}

#[derive(Debug, Clone)]
struct Ejection {
    /// Set while out of rotation: when a probe may go through.
    until: Option<Instant>,
    /// How many times it has been ejected (the backoff multiplier).
    count: u32,
}

/// How the router may use a replica right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    Healthy,
    /// Ejected, and the ejection time is over: one probe may go through.
    ProbeDue,
    Ejected,
}

#[derive(Debug)]
pub struct ReplicaHealth {
    pub name: String,
    pub counters: ReplicaCounters,
    /// Striped: raised and lowered by every attempt, read only by p2c,
    /// bounded load and stats.
    in_flight: StripedCounter,
    consecutive_failures: AtomicU32,
    /// A fast check for the hot path; the details are in `ejection`.
    ejected: AtomicBool,
    probe_in_flight: AtomicBool,
    ewma: ForkMutex<Ewma>,
    /// `ewma.cost_ns` rounded down to whole nanoseconds, stored whenever it
    /// changes: lets a caller that defers its samples see without the lock
    /// whether a sample is a peak (which must raise the estimate at once).
    /// For a whole number of nanoseconds `n`, `n > floor(cost)` exactly
    /// when `n > cost`, so the test matches `fold_latency`'s.
    ewma_floor_ns: AtomicU64,
    ejection: ForkMutex<Ejection>,
    latency: ForkMutex<LatencyWindow>,
}

impl ReplicaHealth {
    pub fn new(name: impl Into<String>) -> Self {
        ReplicaHealth {
            name: name.into(),
            counters: ReplicaCounters::default(),
            in_flight: StripedCounter::new(),
            consecutive_failures: AtomicU32::new(0),
            ejected: AtomicBool::new(false),
            probe_in_flight: AtomicBool::new(false),
            ewma: ForkMutex::new(Ewma {
                cost_ns: 0.0,
                stamp: Instant::now(),
            }),
            ewma_floor_ns: AtomicU64::new(0),
            ejection: ForkMutex::new(Ejection {
                until: None,
                count: 0,
            }),
            latency: ForkMutex::new(LatencyWindow::new()),
        }
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.get()
    }

    /// The attempt latencies `snapshot` summarises, as a histogram (for
    /// metrics, which export buckets rather than percentiles).
    pub fn latency_histogram(&self) -> crate::metrics::LatencyHistogram {
        let latency = self.latency.lock();
        latency.current().clone()
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Acquire)
    }

    pub fn availability(&self, now: Instant) -> Availability {
        if !self.is_ejected() {
            return Availability::Healthy;
        }
        let ejection = self.ejection.lock();
        match ejection.until {
            None => Availability::Healthy,
            Some(until) if now >= until && !self.probe_in_flight.load(Ordering::Acquire) => {
                Availability::ProbeDue
            }
            Some(_) => Availability::Ejected,
        }
    }

    /// Claims the one probe slot of an ejected replica.
    pub fn try_claim_probe(&self) -> bool {
        self.probe_in_flight
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    pub fn release_probe(&self) {
        self.probe_in_flight.store(false, Ordering::Release);
    }

    /// Load for power-of-two-choices: latency estimate × (in flight + 1).
    pub fn load(&self, now: Instant) -> f64 {
        let cost = self.peak_ewma_ns(now).max(1.0);
        cost * (self.in_flight() + 1) as f64
    }

    /// The decayed latency estimate, in nanoseconds.
    pub fn peak_ewma_ns(&self, now: Instant) -> f64 {
        let e = self.ewma.lock();
        let dt = now.saturating_duration_since(e.stamp).as_secs_f64();
        e.cost_ns * (-dt / PEAK_EWMA_DECAY.as_secs_f64()).exp()
    }

    /// Folds one observed latency into the peak-EWMA.
    pub fn observe_latency(&self, elapsed: Duration, now: Instant) {
        let mut e = self.ewma.lock();
        Self::fold_latency(&mut e, elapsed, now);
        self.ewma_floor_ns
            .store(e.cost_ns as u64, Ordering::Relaxed);
    }

    fn fold_latency(e: &mut Ewma, elapsed: Duration, now: Instant) {
        let rtt = elapsed.as_nanos() as f64;
        let dt = now.saturating_duration_since(e.stamp).as_secs_f64();
        if rtt > e.cost_ns {
            e.cost_ns = rtt;
        } else {
            let w = (-dt / PEAK_EWMA_DECAY.as_secs_f64()).exp();
            e.cost_ns = e.cost_ns * w + rtt * (1.0 - w);
        }
        // Samples folded late (see `record_successes`) never move the
        // stamp back, so the decay of a later sample is not counted twice.
        e.stamp = e.stamp.max(now);
    }

    /// Whether a sample of `elapsed` would raise the peak-EWMA at once
    /// (it is above the current estimate): such a sample must not wait in
    /// a caller's batch. Relaxed: a stale answer only flushes a batch early
    /// or lets one decaying sample wait a little.
    pub fn is_peak(&self, elapsed: Duration) -> bool {
        // Integer nanoseconds: a u128 → f64 conversion is a library call.
        let nanos = elapsed
            .as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(elapsed.subsec_nanos() as u64);
        nanos > self.ewma_floor_ns.load(Ordering::Relaxed)
    }

    /// Successful attempts a caller batched: `(elapsed, ended at)` each, in
    /// the order they ended. One lock of the histogram and one of the
    /// estimate for the whole batch, where one attempt at a time takes both
    /// per attempt.
    pub fn record_successes(&self, samples: impl Iterator<Item = (Duration, Instant)> + Clone) {
        {
            let mut h = self.latency.lock();
            for (elapsed, _) in samples.clone() {
                h.record(elapsed);
            }
        }
        let mut e = self.ewma.lock();
        for (elapsed, end) in samples {
            Self::fold_latency(&mut e, elapsed, end);
        }
        self.ewma_floor_ns
            .store(e.cost_ns as u64, Ordering::Relaxed);
    }

    pub fn start_attempt(&self) {
        self.in_flight.add(1);
        self.counters.requests.add(1);
    }

    pub fn end_attempt(&self) {
        self.in_flight.sub(1);
    }

    pub fn record_latency(&self, elapsed: Duration) {
        self.latency.lock().record(elapsed);
    }

    /// This replica's own latency at `percentile`, once it has `min_samples`
    /// (the adaptive hedge delay).
    pub fn latency_percentile(&self, percentile: f64, min_samples: u64) -> Option<Duration> {
        self.latency.lock().percentile(percentile, min_samples)
    }

    /// A success: resets the failure streak; readmits after a probe.
    /// Returns whether this readmitted the replica.
    pub fn on_success(&self) -> bool {
        // Load first: on a healthy replica the streak is already 0, and a
        // load keeps the line shared between the cores where a store would
        // take it from the other one on every read.
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if !self.is_ejected() {
            return false;
        }
        let mut ejection = self.ejection.lock();
        if ejection.until.is_none() {
            return false;
        }
        ejection.until = None;
        self.ejected.store(false, Ordering::Release);
        self.counters.readmissions.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Counts a failure; returns the streak length.
    pub fn on_failure(&self) -> u32 {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A read that this replica did not answer before a hedge elsewhere
    /// did: no error, but one more in the streak that ejects (a stopped
    /// server answers nothing and fails nothing; without this it would
    /// keep every read it is asked for waiting the hedge delay forever).
    /// Not counted in `errors`; any success resets the streak.
    pub fn on_hedge_lost(&self) -> u32 {
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Takes the replica out of rotation for `base × ejections`, capped.
    /// The caller has checked that another replica stays healthy.
    pub fn eject(&self, now: Instant, base: Duration, max: Duration) {
        let mut ejection = self.ejection.lock();
        ejection.count = ejection.count.saturating_add(1);
        let time = base.saturating_mul(ejection.count).min(max);
        ejection.until = Some(now + time);
        self.ejected.store(true, Ordering::Release);
        self.counters.ejections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self, reset: bool) -> ReplicaStats {
        let c = &self.counters;
        let mut latency = self.latency.lock();
        let stats = ReplicaStats {
            name: self.name.clone(),
            requests: c.requests.get(),
            bytes: c.bytes.get(),
            errors: c.errors.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            hedges_sent: c.hedges_sent.load(Ordering::Relaxed),
            hedges_won: c.hedges_won.load(Ordering::Relaxed),
            cancelled: c.cancelled.load(Ordering::Relaxed),
            ejections: c.ejections.load(Ordering::Relaxed),
            readmissions: c.readmissions.load(Ordering::Relaxed),
            not_found: c.not_found.load(Ordering::Relaxed),
            timeouts: c.timeouts.load(Ordering::Relaxed),
            checksum_mismatches: c.checksum_mismatches.load(Ordering::Relaxed),
            size_disagreements: c.size_disagreements.load(Ordering::Relaxed),
            ejected: self.is_ejected(),
            in_flight: self.in_flight(),
            consecutive_failures: self.consecutive_failures(),
            peak_ewma_ms: self.peak_ewma_ns(Instant::now()) / 1e6,
            latency: latency.current().summary(),
        };
        if reset {
            c.reset();
            latency.restart();
        }
        stats
    }
}

/// One replica's figures, as `fs.stats()` reports them.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaStats {
    pub name: String,
    /// Attempts sent (first tries, retries and hedges).
    pub requests: u64,
    /// Bytes delivered by successful attempts.
    pub bytes: u64,
    pub errors: u64,
    pub retries: u64,
    pub hedges_sent: u64,
    pub hedges_won: u64,
    /// Attempts dropped because another attempt won the race.
    pub cancelled: u64,
    pub ejections: u64,
    pub readmissions: u64,
    pub not_found: u64,
    pub timeouts: u64,
    pub checksum_mismatches: u64,
    /// Sizes it gave that its own bytes or the other replicas contradicted
    /// (it was ejected for each).
    pub size_disagreements: u64,
    pub ejected: bool,
    pub in_flight: u64,
    pub consecutive_failures: u32,
    pub peak_ewma_ms: f64,
    /// Completed attempts' latency (success or error), and primaries that
    /// lost a hedge race, as long as they had run.
    pub latency: LatencySummary,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let h = ReplicaHealth::new("r");
        let t0 = Instant::now();
        h.observe_latency(Duration::from_millis(1), t0);
        h.observe_latency(Duration::from_millis(100), t0);
        let peak = h.peak_ewma_ns(t0);
        assert!((peak - 100e6).abs() < 1.0, "{peak}");
        // Fast responses pull it down gradually, by elapsed time.
        h.observe_latency(Duration::from_millis(1), t0 + Duration::from_millis(100));
        let after = h.peak_ewma_ns(t0 + Duration::from_millis(100));
        assert!(after < 100e6 && after > 50e6, "{after}");
        assert!(h.peak_ewma_ns(t0 + Duration::from_secs(10)) < 1e4);
    }

    #[test]
    fn ejection_probe_and_readmission() {
        let h = ReplicaHealth::new("r");
        let t0 = Instant::now();
        let base = Duration::from_millis(100);
        h.eject(t0, base, Duration::from_secs(1));
        assert_eq!(h.availability(t0), Availability::Ejected);
        let later = t0 + base;
        assert_eq!(h.availability(later), Availability::ProbeDue);
        assert!(h.try_claim_probe());
        assert!(!h.try_claim_probe(), "only one probe at a time");
        assert_eq!(h.availability(later), Availability::Ejected);
        h.release_probe();
        // A failed probe ejects for twice as long.
        h.eject(later, base, Duration::from_secs(1));
        assert_eq!(h.availability(later + base), Availability::Ejected);
        assert_eq!(h.availability(later + base * 2), Availability::ProbeDue);
        assert!(h.on_success());
        assert_eq!(h.availability(later), Availability::Healthy);
        assert_eq!(h.snapshot(false).ejections, 2);
        assert_eq!(h.snapshot(false).readmissions, 1);
    }

    #[test]
    fn ejection_time_is_capped() {
        let h = ReplicaHealth::new("r");
        let t0 = Instant::now();
        for _ in 0..50 {
            h.eject(t0, Duration::from_millis(100), Duration::from_millis(300));
        }
        assert_eq!(
            h.availability(t0 + Duration::from_millis(300)),
            Availability::ProbeDue
        );
    }
}
