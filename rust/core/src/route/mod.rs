//! The replica router: a [`Store`] over a set of replica stores that hold
//! the same objects under the same keys.
//!
//! For each read: the key's preference list ([`hrw`]), the first healthy
//! choice under the policy ([`health`]), an attempt with a per-try timeout,
//! a hedge to the next healthy replica if the attempt is slow, failover on
//! error with jittered backoff, all under one deadline and a retry budget
//! ([`budget`]) shared by retries and hedges. The ring and the prefetcher
//! see only a `Store`.

pub mod budget;
pub mod config;
pub mod health;
pub mod hrw;
pub mod tally;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::counter::StripedCounter;
use crate::error::{Error, ReplicaFailure, Result};
use crate::metrics::{LatencyHistogram, LatencySummary, LatencyWindow};
use crate::runtime;
use crate::store::{BoxFuture, Store};

pub use budget::RetryBudget;
pub use config::{HedgeAfter, HedgeAfterMs, Policy, RouterConfig, RoutingOptions};
pub use health::{Availability, ReplicaHealth, ReplicaStats};
pub use hrw::{PreferenceList, Rendezvous, MAX_REPLICAS};
pub use tally::ReadTally;

/// How long an adaptive hedge delay is reused before the histogram is read
/// again (a percentile walk costs microseconds; reads cost less).
const HEDGE_DELAY_REFRESH: Duration = Duration::from_millis(50);

/// Why an attempt was sent, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AttemptKind {
    First,
    Retry,
    Hedge,
}

/// One replica: its store and what the router knows about it.
#[derive(Debug)]
struct Replica {
    store: Arc<dyn Store>,
    health: ReplicaHealth,
    hedge_delay: Mutex<Option<(Instant, Option<Duration>)>>,
}

/// A bitmask of replica indices (MAX_REPLICAS ≤ 64).
type Tried = u64;

fn bit(i: usize) -> Tried {
    1u64 << i
}

/// The router's own figures plus each replica's.
#[derive(Debug, Clone, Serialize)]
pub struct RouterStats {
    /// Reads asked of the router (each may send several attempts).
    pub reads: u64,
    /// Reads that failed after every replica was tried or the deadline hit.
    pub read_errors: u64,
    pub bytes: u64,
    /// Retries and hedges sent, per read: the load failover adds.
    pub extra_request_ratio: f64,
    pub retry_budget_balance: f64,
    /// End-to-end latency of reads, failover and hedging included.
    pub latency: LatencySummary,
    pub replicas: Vec<ReplicaStats>,
}

/// Every read bumps `reads` and `bytes`: striped (see [`crate::counter`]).
#[derive(Debug, Default)]
struct ReadCounters {
    reads: StripedCounter,
    read_errors: std::sync::atomic::AtomicU64,
    bytes: StripedCounter,
}

/// Routes reads over replicas; see the module docs.
#[derive(Debug)]
pub struct Router {
    name: String,
    replicas: Vec<Replica>,
    placement: Rendezvous,
    config: RouterConfig,
    budget: RetryBudget,
    /// Serialises ejection decisions so two failing replicas cannot both
    /// conclude that the other one is still healthy.
    eject_lock: Mutex<()>,
    counters: ReadCounters,
    latency: Mutex<LatencyWindow>,
}

/// What an attempt (with its hedge) came to.
enum Outcome {
    Done,
    /// Failed; the errors are in the failure list. Try another replica.
    Failed,
    /// A caller mistake: no replica will do better.
    Fatal(Error),
}

/// Where one read's bytes go: a range into the caller's buffer, or a whole
/// object whose size comes with the data (see [`Store::read_object`]). Both
/// go through the same choice, timeouts, hedging, failover and budget.
pub enum Target<'b> {
    Range { offset: u64, buf: &'b mut [u8] },
    Object(&'b mut Vec<u8>),
}

impl Target<'_> {
    /// Bytes delivered (a range's length; an object's bytes once read).
    fn len(&self) -> usize {
        match self {
            Target::Range { buf, .. } => buf.len(),
            Target::Object(out) => out.len(),
        }
    }

    /// Reads into this target from `store`.
    fn read<'a>(&'a mut self, store: &'a dyn Store, key: &'a str) -> BoxFuture<'a, Result<()>> {
        match self {
            Target::Range { offset, buf } => store.read_into(key, *offset, buf),
            Target::Object(out) => store.read_object(key, out),
        }
    }
}

/// Held while an attempt runs: counts it in flight and, if dropped before
/// `finish` (the loser of a hedge race, a read whose caller went away),
/// counts it cancelled and frees a probe slot.
struct AttemptGuard<'r> {
    health: &'r ReplicaHealth,
    start: Instant,
    probe: bool,
    finished: bool,
}

impl Drop for AttemptGuard<'_> {
    fn drop(&mut self) {
        self.health.end_attempt();
        if !self.finished {
            use std::sync::atomic::Ordering;
            self.health
                .counters
                .cancelled
                .fetch_add(1, Ordering::Relaxed);
            // A cancelled attempt was at least this slow: let p2c know.
            let now = Instant::now();
            self.health
                .observe_latency(now.saturating_duration_since(self.start), now);
        }
        if self.probe {
            self.health.release_probe();
        }
    }
}

impl Router {
    /// `names` identify the replicas in errors and stats (roots or URLs;
    /// they also seed placement, so the same names place keys the same way).
    pub fn new(
        names: Vec<String>,
        stores: Vec<Arc<dyn Store>>,
        config: RouterConfig,
    ) -> Result<Self> {
        if names.len() != stores.len() {
            return Err(Error::invalid(format!(
                "{} replica names for {} stores",
                names.len(),
                stores.len()
            )));
        }
        let placement = Rendezvous::new(&names, config.weights.as_deref())?;
        let name = if names.len() == 1 {
            names[0].clone()
        } else {
            format!("replicas[{}]", names.join(", "))
        };
        let replicas = names
            .into_iter()
            .zip(stores)
            .map(|(n, store)| Replica {
                store,
                health: ReplicaHealth::new(n),
                hedge_delay: Mutex::new(None),
            })
            .collect();
        Ok(Router {
            name,
            replicas,
            placement,
            budget: RetryBudget::new(config.retry_budget_ratio, config.retry_budget_floor_per_s),
            config,
            eject_lock: Mutex::new(()),
            counters: ReadCounters::default(),
            latency: Mutex::new(LatencyWindow::new()),
        })
    }

    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    pub fn placement(&self) -> &Rendezvous {
        &self.placement
    }

    pub fn health(&self, replica: usize) -> &ReplicaHealth {
        &self.replicas[replica].health
    }

    pub fn preference_list(&self, key: &str) -> PreferenceList {
        self.placement.preference_list(key)
    }

    /// The end-to-end read latencies `stats` summarises, as a histogram
    /// (ranks merge these exactly; percentiles do not merge).
    pub fn latency_histogram(&self) -> LatencyHistogram {
        let latency = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        latency.current().clone()
    }

    pub fn stats(&self, reset: bool) -> RouterStats {
        use std::sync::atomic::Ordering::Relaxed;
        let replicas: Vec<ReplicaStats> = self
            .replicas
            .iter()
            .map(|r| r.health.snapshot(reset))
            .collect();
        let mut latency = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let reads = self.counters.reads.get();
        let extra: u64 = replicas.iter().map(|r| r.retries + r.hedges_sent).sum();
        let stats = RouterStats {
            reads,
            read_errors: self.counters.read_errors.load(Relaxed),
            bytes: self.counters.bytes.get(),
            extra_request_ratio: if reads == 0 {
                0.0
            } else {
                extra as f64 / reads as f64
            },
            retry_budget_balance: self.budget.balance(),
            latency: latency.current().summary(),
            replicas,
        };
        if reset {
            latency.restart();
            self.counters.reads.take();
            self.counters.read_errors.store(0, Relaxed);
            self.counters.bytes.take();
        }
        stats
    }

    // -- choosing ------------------------------------------------------------

    /// The next replica for `key` among those not yet `tried`: a healthy one
    /// (or one due for its probe) under the policy and bounded load; with
    /// `last_resort`, an ejected one when nothing else is left. Returns the
    /// index and whether it goes as a probe (its slot is then claimed).
    fn choose(
        &self,
        prefs: &PreferenceList,
        tried: Tried,
        last_resort: bool,
    ) -> Option<(usize, bool)> {
        // The clock is read only when health needs it (an ejected replica,
        // p2c's load): a healthy affinity read never asks.
        let mut clock = None;
        let mut now = || *clock.get_or_insert_with(Instant::now);
        let mut candidates = [0u8; MAX_REPLICAS];
        let mut probes: Tried = 0;
        let mut n = 0;
        let mut fallback = None;
        for r in prefs.iter() {
            if tried & bit(r) != 0 {
                continue;
            }
            let health = &self.replicas[r].health;
            let availability = if health.is_ejected() {
                health.availability(now())
            } else {
                Availability::Healthy
            };
            match availability {
                Availability::Healthy => {}
                Availability::ProbeDue => probes |= bit(r),
                Availability::Ejected => {
                    fallback.get_or_insert(r);
                    continue;
                }
            }
            candidates[n] = r as u8;
            n += 1;
        }
        let mut candidates = &candidates[..n];
        let mut bounded = [0u8; MAX_REPLICAS];
        if let (Some(factor), true) = (self.config.load_factor, n > 1) {
            // Mirrokni et al.: no replica takes more than `factor` × the
            // mean in-flight load (counting this request); a full one
            // overflows to the next in the list.
            let (total, healthy) = self
                .replicas
                .iter()
                .filter(|r| !r.health.is_ejected())
                .fold((0u64, 0u64), |(t, h), r| (t + r.health.in_flight(), h + 1));
            let cap = (factor * (total + 1) as f64 / healthy.max(1) as f64).ceil() as u64;
            let mut m = 0;
            for &r in candidates {
                if self.replicas[r as usize].health.in_flight() < cap {
                    bounded[m] = r;
                    m += 1;
                }
            }
            if m > 0 {
                candidates = &bounded[..m];
            }
        }
        let mut pick = |candidates: &[u8]| -> Option<usize> {
            match (self.config.policy, candidates) {
                (_, []) => None,
                (Policy::P2c, [a, b, ..]) => {
                    let (a, b) = (*a as usize, *b as usize);
                    let now = now();
                    let la = self.replicas[a].health.load(now);
                    let lb = self.replicas[b].health.load(now);
                    Some(if lb < la { b } else { a })
                }
                (_, [a, ..]) => Some(*a as usize),
            }
        };
        // A probe slot can be taken by another read between the look and
        // the claim; then choose again without that replica.
        let mut skip: Tried = 0;
        for _ in 0..=n {
            let remaining: Vec<u8>;
            let view = if skip == 0 {
                candidates
            } else {
                remaining = candidates
                    .iter()
                    .copied()
                    .filter(|r| skip & bit(*r as usize) == 0)
                    .collect();
                &remaining[..]
            };
            let r = pick(view)?;
            if probes & bit(r) == 0 {
                return Some((r, false));
            }
            if self.replicas[r].health.try_claim_probe() {
                return Some((r, true));
            }
            skip |= bit(r);
        }
        if last_resort {
            fallback.map(|r| (r, false))
        } else {
            None
        }
    }

    fn hedge_delay(&self, r: usize) -> Option<Duration> {
        match self.config.hedge_after? {
            HedgeAfter::Fixed(d) => Some(d),
            HedgeAfter::Percentile(p) => {
                let replica = &self.replicas[r];
                let now = Instant::now();
                let mut cached = replica
                    .hedge_delay
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                match *cached {
                    Some((at, delay)) if now.duration_since(at) < HEDGE_DELAY_REFRESH => delay,
                    _ => {
                        // The replica's own percentile, bounded by the same
                        // percentile of all reads: a replica that spikes on
                        // more than 5% of reads has its spikes *in* its own
                        // p95, and would never be hedged on that alone.
                        let own = replica
                            .health
                            .latency_percentile(p, config::MIN_HEDGE_SAMPLES);
                        let all = self
                            .latency
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .percentile(p, config::MIN_HEDGE_SAMPLES);
                        let delay = match (own, all) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (a, b) => a.or(b),
                        };
                        *cached = Some((now, delay));
                        delay
                    }
                }
            }
        }
    }

    // -- recording -----------------------------------------------------------

    fn start_attempt(
        &self,
        r: usize,
        probe: bool,
        kind: AttemptKind,
        start: Instant,
    ) -> AttemptGuard<'_> {
        use std::sync::atomic::Ordering::Relaxed;
        let health = &self.replicas[r].health;
        health.start_attempt();
        match kind {
            AttemptKind::First => {}
            AttemptKind::Retry => {
                health.counters.retries.fetch_add(1, Relaxed);
            }
            AttemptKind::Hedge => {
                health.counters.hedges_sent.fetch_add(1, Relaxed);
            }
        }
        AttemptGuard {
            health,
            start,
            probe,
            finished: false,
        }
    }

    /// Folds an attempt's result into the replica's health and counters,
    /// ejecting it after too many failures in a row.
    /// With a `tally`, a success's latency sample waits in it (unless it is
    /// a peak), and anything else flushes it first.
    fn finish_attempt(
        &self,
        r: usize,
        guard: &mut AttemptGuard<'_>,
        result: &Result<()>,
        bytes: usize,
        tally: Option<&mut ReadTally<'_>>,
    ) -> Instant {
        use std::sync::atomic::Ordering::Relaxed;
        guard.finished = true;
        let health = &self.replicas[r].health;
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(guard.start);
        if let Some(tally) = tally {
            if result.is_ok() && !health.is_peak(elapsed) {
                tally.defer_attempt(r, elapsed, now);
                health.counters.bytes.add(bytes as u64);
                health.on_success();
                return now;
            }
            tally.flush();
        }
        match result {
            Ok(()) => {
                health.record_latency(elapsed);
                health.observe_latency(elapsed, now);
                health.counters.bytes.add(bytes as u64);
                health.on_success();
            }
            // The replica answered: it lags or the caller asked for a file
            // that is not there. Neither is a sign of ill health.
            Err(Error::NotFound { .. }) => {
                health.counters.not_found.fetch_add(1, Relaxed);
                health.observe_latency(elapsed, now);
                health.on_success();
            }
            Err(e) if !e.is_retryable() => {}
            Err(e) => {
                match e {
                    Error::Timeout { .. } => health.counters.timeouts.fetch_add(1, Relaxed),
                    Error::ChecksumMismatch { .. } => {
                        health.counters.checksum_mismatches.fetch_add(1, Relaxed)
                    }
                    _ => 0,
                };
                health.record_latency(elapsed);
                health.observe_latency(elapsed, now);
                let streak = health.on_failure();
                if guard.probe {
                    // A failed probe: out again, for longer.
                    health.eject(now, self.config.base_ejection, self.config.max_ejection);
                } else if streak >= self.config.eject_after_failures && !health.is_ejected() {
                    self.maybe_eject(r, now);
                }
            }
        }
        now
    }

    /// The primary `r` was still running when its hedge completed: a
    /// replica that keeps losing is ejected like one that keeps failing,
    /// so a gray failure (accepts, never answers) stops costing every
    /// read routed to it the hedge delay after a few reads.
    fn primary_lost_hedge(&self, r: usize, probe: bool) {
        let health = &self.replicas[r].health;
        let streak = health.on_hedge_lost();
        let now = Instant::now();
        if probe {
            health.eject(now, self.config.base_ejection, self.config.max_ejection);
        } else if streak >= self.config.eject_after_failures && !health.is_ejected() {
            self.maybe_eject(r, now);
        }
    }

    fn maybe_eject(&self, r: usize, now: Instant) {
        let _lock = self.eject_lock.lock().unwrap_or_else(|e| e.into_inner());
        let health = &self.replicas[r].health;
        if health.is_ejected() {
            return;
        }
        let others_healthy = self
            .replicas
            .iter()
            .enumerate()
            .any(|(i, o)| i != r && !o.health.is_ejected());
        // Never the last healthy replica: a degraded answer beats none.
        if others_healthy {
            health.eject(now, self.config.base_ejection, self.config.max_ejection);
        }
    }

    fn attempt_timeout(&self, key: &str, r: usize, start: Instant) -> Error {
        Error::Timeout {
            what: format!(
                "read of {key:?} from replica {:?}",
                self.replicas[r].health.name
            ),
            elapsed_ms: start.elapsed().as_millis() as u64,
        }
    }

    /// One attempt on replica `r`, limited by the per-try timeout and the
    /// read's deadline.
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        r: usize,
        probe: bool,
        kind: AttemptKind,
        key: &str,
        target: &mut Target<'_>,
        deadline: Instant,
    ) -> Result<()> {
        let mut guard = self.start_attempt(r, probe, kind, Instant::now());
        let limit = match self.config.timeout {
            Some(t) => deadline.min(guard.start + t),
            None => deadline,
        };
        let result = match tokio::time::timeout_at(
            limit.into(),
            target.read(self.replicas[r].store.as_ref(), key),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(self.attempt_timeout(key, r, guard.start)),
        };
        let len = target.len();
        self.finish_attempt(r, &mut guard, &result, len, None);
        result
    }

    /// An attempt through the store's blocking path, started at `start`;
    /// the result and when it ended, or `None` if the store has none.
    #[allow(clippy::too_many_arguments)]
    fn attempt_blocking(
        &self,
        r: usize,
        probe: bool,
        kind: AttemptKind,
        key: &str,
        offset: u64,
        buf: &mut [u8],
        start: Instant,
        tally: Option<&mut ReadTally<'_>>,
    ) -> Option<(Result<()>, Instant)> {
        let mut guard = self.start_attempt(r, probe, kind, start);
        let Some(result) = self.replicas[r].store.read_into_blocking(key, offset, buf) else {
            // Not sent: undo the count (the guard still frees the probe).
            guard.finished = true;
            guard.health.counters.requests.sub(1);
            return None;
        };
        let end = self.finish_attempt(r, &mut guard, &result, buf.len(), tally);
        Some((result, end))
    }

    // -- reading ---------------------------------------------------------------

    /// Outcome of one attempt, recording a failure in `failures`.
    fn settle(r: usize, result: Result<()>, failures: &mut Vec<(usize, Error)>) -> Outcome {
        match result {
            Ok(()) => Outcome::Done,
            Err(e) if !e.is_retryable() => Outcome::Fatal(e),
            Err(e) => {
                failures.push((r, e));
                Outcome::Failed
            }
        }
    }

    /// An attempt on `r`, hedged to the next healthy replica if it is still
    /// running after the hedge delay. The first complete response wins and
    /// the other attempt is dropped (cancelled). The primary writes into
    /// `target`, the hedge into its own scratch buffer, moved into `target`
    /// only once the primary is gone, so a result is never a mix of the two.
    #[allow(clippy::too_many_arguments)]
    async fn attempt_hedged(
        &self,
        r: usize,
        probe: bool,
        kind: AttemptKind,
        key: &str,
        target: &mut Target<'_>,
        prefs: &PreferenceList,
        tried: &mut Tried,
        deadline: Instant,
        failures: &mut Vec<(usize, Error)>,
    ) -> Outcome {
        let Some(delay) = self.hedge_delay(r) else {
            let result = self.attempt(r, probe, kind, key, target, deadline).await;
            return Self::settle(r, result, failures);
        };
        // The hedge's own buffer: a range's length, or an empty object.
        let (mut scratch, hedge_offset) = match target {
            Target::Range { offset, buf } => (vec![0u8; buf.len()], Some(*offset)),
            Target::Object(_) => (Vec::new(), None),
        };
        let mut primary = Box::pin(self.attempt(r, probe, kind, key, target, deadline));
        let mut fire_at = deadline.min(Instant::now() + delay);
        let (h, hedge_probe) = loop {
            tokio::select! {
                biased;
                result = &mut primary => return Self::settle(r, result, failures),
                _ = tokio::time::sleep_until(fire_at.into()) => {}
            }
            match self.choose(prefs, *tried | bit(r), false) {
                Some(choice) if self.budget.try_withdraw() => break choice,
                Some((h, probe)) => {
                    if probe {
                        self.replicas[h].health.release_probe();
                    }
                }
                // Nobody to hedge to: the primary is the only hope.
                None => {
                    let result = primary.await;
                    return Self::settle(r, result, failures);
                }
            }
            // No token now (a busy spell spent the budget): ask again one
            // hedge delay later rather than never. The floor refills the
            // budget, so a primary that will not answer (a stopped server)
            // is hedged within about a second instead of holding the read
            // until its deadline.
            if Instant::now() >= deadline {
                let result = primary.await;
                return Self::settle(r, result, failures);
            }
            fire_at = deadline.min(Instant::now() + delay);
        };
        *tried |= bit(h);
        let hedge_won = {
            let mut hedge_target = match hedge_offset {
                Some(offset) => Target::Range {
                    offset,
                    buf: &mut scratch,
                },
                None => Target::Object(&mut scratch),
            };
            let mut hedge = Box::pin(self.attempt(
                h,
                hedge_probe,
                AttemptKind::Hedge,
                key,
                &mut hedge_target,
                deadline,
            ));
            let (mut primary_done, mut hedge_done) = (false, false);
            loop {
                tokio::select! {
                    result = &mut primary, if !primary_done => {
                        primary_done = true;
                        match Self::settle(r, result, failures) {
                            Outcome::Done => break Ok(false),
                            Outcome::Fatal(e) => break Err(Outcome::Fatal(e)),
                            Outcome::Failed if hedge_done => break Err(Outcome::Failed),
                            Outcome::Failed => {}
                        }
                    }
                    result = &mut hedge, if !hedge_done => {
                        hedge_done = true;
                        match Self::settle(h, result, failures) {
                            Outcome::Done => break Ok(true),
                            Outcome::Fatal(e) => break Err(Outcome::Fatal(e)),
                            Outcome::Failed if primary_done => break Err(Outcome::Failed),
                            Outcome::Failed => {}
                        }
                    }
                }
            }
            // `hedge` is dropped here: a losing hedge is cancelled.
        };
        // The primary is dropped before its buffer is touched: a losing
        // primary is cancelled and cannot write into `buf` any more.
        drop(primary);
        match hedge_won {
            Ok(true) => {
                match target {
                    Target::Range { buf, .. } => buf.copy_from_slice(&scratch),
                    // The hedge's object replaces whatever the primary left.
                    Target::Object(out) => std::mem::swap(*out, &mut scratch),
                }
                self.replicas[h]
                    .health
                    .counters
                    .hedges_won
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.primary_lost_hedge(r, probe);
                Outcome::Done
            }
            Ok(false) => Outcome::Done,
            Err(outcome) => outcome,
        }
    }

    /// Whether the next try needs a retry token: failing over after "not
    /// found" is free (replicas lag; answering correctly needs the others).
    fn next_try_costs(failures: &[(usize, Error)]) -> bool {
        !matches!(failures.last(), Some((_, Error::NotFound { .. })))
    }

    /// A new read's failover state; see [`Failover`].
    fn failover<'k>(&self, key: &'k str) -> Failover<'k> {
        let start = Instant::now();
        Failover {
            key,
            prefs: self.placement.preference_list(key),
            start,
            deadline: start + self.config.deadline,
            failures: Vec::new(),
            tried: 0,
            tries: 0,
        }
    }

    /// Before each try: how long to back off first, or why to stop (every
    /// replica tried, the deadline, the retry budget). After a failure that
    /// costs a token, takes one.
    fn before_try(&self, f: &Failover<'_>) -> std::result::Result<Duration, Option<GiveUp>> {
        let everyone: Tried = if self.replicas.len() == 64 {
            u64::MAX
        } else {
            bit(self.replicas.len()) - 1
        };
        if f.tried == everyone {
            return Err(None);
        }
        if f.tries == 0 {
            return Ok(Duration::ZERO);
        }
        if Instant::now() >= f.deadline {
            return Err(Some(GiveUp::Deadline));
        }
        if !Self::next_try_costs(&f.failures) {
            return Ok(Duration::ZERO);
        }
        if !self.budget.try_withdraw() {
            return Err(Some(GiveUp::Budget));
        }
        let wait = budget::backoff(f.tries, self.config.backoff_base, self.config.backoff_max);
        if Instant::now() + wait >= f.deadline {
            return Err(Some(GiveUp::Deadline));
        }
        Ok(wait)
    }

    /// The replica for the next try (after any backoff, so health is
    /// current), marked as tried; `None` when none is left.
    fn next_try(&self, f: &mut Failover<'_>) -> Option<(usize, bool, AttemptKind)> {
        let (r, probe) = self.choose(&f.prefs, f.tried, true)?;
        f.tried |= bit(r);
        let kind = if f.tries == 0 {
            AttemptKind::First
        } else {
            AttemptKind::Retry
        };
        f.tries += 1;
        Some((r, probe, kind))
    }

    /// The end of a read that no replica served.
    fn read_given_up(&self, f: Failover<'_>, stop: Option<GiveUp>) -> Result<()> {
        let err = self.give_up(f.key, f.failures, f.tried, stop);
        self.read_failed(f.start, err)
    }

    async fn read_routed(&self, key: &str, target: &mut Target<'_>) -> Result<()> {
        let mut f = self.failover(key);
        self.budget.deposit();
        loop {
            match self.before_try(&f) {
                Ok(wait) if !wait.is_zero() => tokio::time::sleep(wait).await,
                Ok(_) => {}
                Err(stop) => return self.read_given_up(f, stop),
            }
            let Some((r, probe, kind)) = self.next_try(&mut f) else {
                return self.read_given_up(f, None);
            };
            match self
                .attempt_hedged(
                    r,
                    probe,
                    kind,
                    key,
                    target,
                    &f.prefs,
                    &mut f.tried,
                    f.deadline,
                    &mut f.failures,
                )
                .await
            {
                Outcome::Done => {
                    return self.read_done(f.start, Instant::now(), target.len(), None)
                }
                Outcome::Fatal(e) => return self.read_failed(f.start, e),
                Outcome::Failed => {}
            }
        }
    }

    /// The failover loop without an executor: no hedges or timeouts (the
    /// caller checked), backoff by sleeping the calling thread. `None` if
    /// the first chosen store has no blocking path (nothing was read).
    fn read_routed_blocking(
        &self,
        key: &str,
        offset: u64,
        buf: &mut [u8],
        mut tally: Option<&mut ReadTally<'_>>,
    ) -> Option<Result<()>> {
        let mut f = self.failover(key);
        loop {
            match self.before_try(&f) {
                Ok(wait) if !wait.is_zero() => std::thread::sleep(wait),
                Ok(_) => {}
                Err(stop) => return Some(self.read_given_up(f, stop)),
            }
            let Some((r, probe, kind)) = self.next_try(&mut f) else {
                return Some(self.read_given_up(f, None));
            };
            let first = kind == AttemptKind::First;
            let attempt_start = if first { f.start } else { Instant::now() };
            let attempt = self.attempt_blocking(
                r,
                probe,
                kind,
                key,
                offset,
                buf,
                attempt_start,
                tally.as_deref_mut(),
            );
            let (result, end) = match attempt {
                Some(done) => done,
                // Nothing read yet: the async path takes over.
                None if first => return None,
                None if tokio::runtime::Handle::try_current().is_err() => {
                    let mut target = Target::Range {
                        offset,
                        buf: &mut *buf,
                    };
                    let result = runtime::block_on(self.attempt(
                        r,
                        probe,
                        kind,
                        key,
                        &mut target,
                        f.deadline,
                    ));
                    (result, Instant::now())
                }
                None => (
                    Err(Error::Remote(format!(
                        "replica {:?} has no blocking read path",
                        self.replicas[r].health.name
                    ))),
                    Instant::now(),
                ),
            };
            if first {
                // The async path deposits up front; here only once the read
                // is known to stay on this path.
                self.budget.deposit();
            }
            match Self::settle(r, result, &mut f.failures) {
                Outcome::Done => return Some(self.read_done(f.start, end, buf.len(), tally)),
                Outcome::Fatal(e) => return Some(self.read_failed(f.start, e)),
                Outcome::Failed => {}
            }
        }
    }

    fn read_done(
        &self,
        start: Instant,
        end: Instant,
        bytes: usize,
        tally: Option<&mut ReadTally<'_>>,
    ) -> Result<()> {
        self.counters.reads.add(1);
        self.counters.bytes.add(bytes as u64);
        let elapsed = end.saturating_duration_since(start);
        match tally {
            Some(tally) => tally.defer_read(elapsed),
            None => self.record_read_latencies(&[elapsed]),
        }
        Ok(())
    }

    /// Folds end-to-end read latencies into the router's histogram.
    fn record_read_latencies(&self, elapsed: &[Duration]) {
        let mut h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        for e in elapsed {
            h.record(*e);
        }
    }

    fn read_failed(&self, start: Instant, err: Error) -> Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        self.counters.reads.add(1);
        self.counters.read_errors.fetch_add(1, Relaxed);
        self.record_read_latencies(&[start.elapsed()]);
        Err(err)
    }

    /// A deferred-bookkeeping tally for a run of blocking reads on this
    /// thread (see [`tally`]); pass it to [`Router::read_into_blocking_tallied`].
    pub fn tally(&self) -> ReadTally<'_> {
        ReadTally::new(self)
    }

    /// [`Store::read_into_blocking`] with the latency samples of a success
    /// held in `tally` (flushed in batches) instead of folded in one by one.
    /// Everything else (counters, health, failover, the budget) is as for
    /// an untallied read.
    pub fn read_into_blocking_tallied(
        &self,
        key: &str,
        offset: u64,
        buf: &mut [u8],
        tally: &mut ReadTally<'_>,
    ) -> Option<Result<()>> {
        assert!(
            std::ptr::eq(tally.router(), self),
            "a tally is used with the router that made it"
        );
        if !self.blocking_allowed() {
            return None;
        }
        self.read_routed_blocking(key, offset, buf, Some(tally))
    }

    /// The error for a read no replica could serve. When every replica gave
    /// the same definite answer (not found, a directory, no permission, too
    /// short) that answer is the error; otherwise `ReplicasUnavailable`
    /// names each replica with its last error, or why it was not asked.
    fn give_up(
        &self,
        key: &str,
        mut failures: Vec<(usize, Error)>,
        tried: Tried,
        stop: Option<GiveUp>,
    ) -> Error {
        let n = self.replicas.len();
        let all_tried = (0..n).all(|i| tried & bit(i) != 0);
        let same_answer = |f: fn(&Error) -> bool| {
            all_tried && failures.len() >= n && failures.iter().all(|(_, e)| f(e))
        };
        if same_answer(|e| matches!(e, Error::NotFound { .. })) {
            return Error::NotFound { path: key.into() };
        }
        if n == 1
            || same_answer(|e| matches!(e, Error::IsADirectory { .. }))
            || same_answer(|e| matches!(e, Error::PermissionDenied { .. }))
            || same_answer(|e| matches!(e, Error::ShortRead { .. }))
        {
            if let Some((_, e)) = failures.pop() {
                return e;
            }
        }
        let mut last: Vec<Option<String>> = vec![None; n];
        for (r, e) in failures {
            last[r] = Some(e.to_string());
        }
        let untried = match stop {
            Some(GiveUp::Deadline) => format!(
                "not tried: the deadline of {} ms passed",
                self.config.deadline.as_millis()
            ),
            Some(GiveUp::Budget) => "not tried: retry budget exhausted".to_string(),
            None => "not tried".to_string(),
        };
        Error::ReplicasUnavailable {
            path: key.into(),
            failures: last
                .into_iter()
                .enumerate()
                .map(|(i, e)| ReplicaFailure {
                    replica: self.replicas[i].health.name.clone(),
                    error: e.unwrap_or_else(|| untried.clone()),
                })
                .collect(),
        }
    }

    /// `size` in preference order (healthy first), failing over on error.
    async fn size_routed(&self, key: &str) -> Result<u64> {
        let deadline = Instant::now() + self.config.deadline;
        let prefs = self.placement.preference_list(key);
        let mut failures = Vec::new();
        let mut tried: Tried = 0;
        for r in self.size_order(&prefs) {
            tried |= bit(r);
            let limit = match self.config.timeout {
                Some(t) => deadline.min(Instant::now() + t),
                None => deadline,
            };
            let start = Instant::now();
            let result =
                match tokio::time::timeout_at(limit.into(), self.replicas[r].store.size(key)).await
                {
                    Ok(result) => result,
                    Err(_) => Err(self.attempt_timeout(key, r, start)),
                };
            match result {
                Ok(size) => return Ok(size),
                Err(e) if !e.is_retryable() => return Err(e),
                Err(e) => failures.push((r, e)),
            }
            if Instant::now() >= deadline {
                return Err(self.give_up(key, failures, tried, Some(GiveUp::Deadline)));
            }
        }
        Err(self.give_up(key, failures, tried, None))
    }

    fn size_routed_blocking(&self, key: &str) -> Option<Result<u64>> {
        let prefs = self.placement.preference_list(key);
        let mut failures = Vec::new();
        let mut tried: Tried = 0;
        for (i, r) in self.size_order(&prefs).into_iter().enumerate() {
            let result = match self.replicas[r].store.size_blocking(key) {
                Some(result) => result,
                None if i == 0 => return None,
                None if tokio::runtime::Handle::try_current().is_err() => {
                    runtime::block_on(self.replicas[r].store.size(key))
                }
                None => Err(Error::Remote(format!(
                    "replica {:?} has no blocking size path",
                    self.replicas[r].health.name
                ))),
            };
            tried |= bit(r);
            match result {
                Ok(size) => return Some(Ok(size)),
                Err(e) if !e.is_retryable() => return Some(Err(e)),
                Err(e) => failures.push((r, e)),
            }
        }
        Some(Err(self.give_up(key, failures, tried, None)))
    }

    /// Healthy replicas in preference order, then the ejected ones.
    fn size_order(&self, prefs: &PreferenceList) -> Vec<usize> {
        let (mut healthy, ejected): (Vec<usize>, Vec<usize>) = prefs
            .iter()
            .partition(|&r| !self.replicas[r].health.is_ejected());
        healthy.extend(ejected);
        healthy
    }

    /// Whether reads may take the executor-free path: nothing needs a timer.
    fn blocking_allowed(&self) -> bool {
        self.config.hedge_after.is_none() && self.config.timeout.is_none()
    }
}

#[derive(Debug, Clone, Copy)]
enum GiveUp {
    Deadline,
    Budget,
}

/// One read's failover state, shared by the async and the blocking loop:
/// the key's preference list, which replicas were tried and what they
/// answered, and the deadline.
struct Failover<'k> {
    key: &'k str,
    prefs: PreferenceList,
    start: Instant,
    deadline: Instant,
    failures: Vec<(usize, Error)>,
    tried: Tried,
    tries: u32,
}

impl Store for Router {
    fn name(&self) -> &str {
        &self.name
    }

    fn size<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(self.size_routed(key))
    }

    fn read_into<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.read_routed(key, &mut Target::Range { offset, buf })
                .await
        })
    }

    fn read_object<'a>(&'a self, key: &'a str, out: &'a mut Vec<u8>) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { self.read_routed(key, &mut Target::Object(out)).await })
    }

    fn read_into_blocking(&self, key: &str, offset: u64, buf: &mut [u8]) -> Option<Result<()>> {
        if !self.blocking_allowed() {
            return None;
        }
        self.read_routed_blocking(key, offset, buf, None)
    }

    fn size_blocking(&self, key: &str) -> Option<Result<u64>> {
        if self.config.timeout.is_some() {
            return None;
        }
        self.size_routed_blocking(key)
    }
}

#[cfg(test)]
mod tests;
