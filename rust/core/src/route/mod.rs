//! The replica router: a [`Store`] over a set of replica stores that hold
//! the same objects under the same keys.
//!
//! For each read: the key's preference list ([`hrw`]), the first healthy
//! choice under the policy ([`health`]), an attempt with a per-try timeout,
//! a hedge to the next healthy replica if the attempt is slow, failover on
//! error with jittered backoff, all under one deadline and a retry budget
//! ([`budget`]) shared by retries and hedges. The ring and the prefetcher
//! see only a `Store`.
//!
//! One engine (`Router::run`) serves ranges, whole objects and sizes. Reads
//! that a store can serve on the calling thread (page-cache `pread`) run the
//! same code in blocking mode, where nothing waits on the executor, so one
//! poll drives it to the end without a task or a wake-up.

mod agree;
pub mod budget;
pub mod config;
pub mod fleet;
pub mod health;
pub mod hrw;
pub mod trace;

use std::sync::Arc;

use crate::fork::ForkMutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::counter::StripedCounter;
use crate::error::{Error, ReplicaFailure, Result};
use crate::metrics::{LatencyHistogram, LatencySummary, LatencyWindow};
use crate::runtime;
use crate::store::session::{self, AttemptSample};
use crate::store::{BoxFuture, ObjectMeta, Store, Tally};

pub use budget::RetryBudget;
pub use config::{HedgeAfter, HedgeAfterMs, Policy, RouterConfig, RoutingOptions};
pub use health::{Availability, ReplicaHealth, ReplicaStats};
pub use hrw::{PreferenceList, Rendezvous, MAX_REPLICAS};
pub use trace::{HedgeNote, ReadTrace, Tracer, Winner};

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
    /// Hedged by default (see [`Store::waits_on_network`]).
    remote: bool,
    health: ReplicaHealth,
    hedge_delay: ForkMutex<Option<(Instant, Option<Duration>)>>,
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
    eject_lock: ForkMutex<()>,
    counters: ReadCounters,
    latency: ForkMutex<LatencyWindow>,
    tracer: Tracer,
}

/// What an attempt (with its hedge) came to.
enum Outcome {
    Done,
    /// Failed; the errors are in the failure list. Try another replica.
    Failed,
    /// A caller mistake: no replica will do better.
    Fatal(Error),
}

/// What one read asks and where the answer goes: a range into the caller's
/// buffer, a whole object whose size comes with the data (see
/// [`Store::read_object`]), the object's size, or its metadata. All go
/// through the same choice, timeouts, hedging, failover and budget.
pub enum Target<'b> {
    Range { offset: u64, buf: &'b mut [u8] },
    Object(&'b mut Vec<u8>),
    Size(u64),
    Info(Box<ObjectMeta>),
}

impl Target<'_> {
    /// Bytes delivered (a range's length; an object's bytes once read).
    fn len(&self) -> usize {
        match self {
            Target::Range { buf, .. } => buf.len(),
            Target::Object(out) => out.len(),
            Target::Size(_) | Target::Info(_) => 0,
        }
    }

    fn size(&self) -> u64 {
        match self {
            Target::Size(size) => *size,
            Target::Info(meta) => meta.size,
            _ => self.len() as u64,
        }
    }

    /// Whether the read counts as one in the figures and latency samples: a
    /// size (a HEAD, a `stat`) is far quicker than a read, and would pull
    /// the percentiles that adaptive hedging waits for down.
    fn sampled(&self) -> bool {
        !matches!(self, Target::Size(_) | Target::Info(_))
    }

    /// What the trace calls it.
    fn kind(&self) -> &'static str {
        match self {
            Target::Range { .. } => "range",
            Target::Object(_) => "object",
            Target::Size(_) => "size",
            Target::Info(_) => "info",
        }
    }

    /// How a timeout names the request.
    fn what(&self) -> &'static str {
        match self {
            Target::Size(_) => "size of",
            Target::Info(_) => "metadata of",
            _ => "read of",
        }
    }

    /// Reads into this target from `store`.
    fn read<'a>(&'a mut self, store: &'a dyn Store, key: &'a str) -> BoxFuture<'a, Result<()>> {
        match self {
            Target::Range { offset, buf } => store.read_into(key, *offset, buf),
            Target::Object(out) => store.read_object(key, out),
            Target::Size(size) => Box::pin(async move {
                *size = store.size(key).await?;
                Ok(())
            }),
            Target::Info(meta) => Box::pin(async move {
                **meta = store.info(key).await?;
                Ok(())
            }),
        }
    }

    /// The same through the store's blocking path; `None` if it has none.
    fn read_blocking(&mut self, store: &dyn Store, key: &str) -> Option<Result<()>> {
        match self {
            Target::Range { offset, buf } => store.read_into_blocking(key, *offset, buf),
            Target::Object(_) | Target::Info(_) => None,
            Target::Size(size) => Some(store.size_blocking(key)?.map(|s| *size = s)),
        }
    }

    /// A target of the same shape for a hedge, its bytes in `bytes`.
    fn scratch<'s>(&self, bytes: &'s mut Vec<u8>) -> Target<'s> {
        match self {
            Target::Range { offset, buf } => {
                bytes.resize(buf.len(), 0);
                Target::Range {
                    offset: *offset,
                    buf: bytes,
                }
            }
            Target::Object(_) => Target::Object(bytes),
            Target::Size(_) => Target::Size(0),
            Target::Info(meta) => Target::Info(Box::new(ObjectMeta::file(&meta.key, 0))),
        }
    }

    /// An empty target of the same shape, for a second opinion on a size or
    /// metadata answer.
    fn second_opinion(&self) -> Target<'static> {
        match self {
            Target::Info(meta) => Target::Info(Box::new(ObjectMeta::file(&meta.key, 0))),
            _ => Target::Size(0),
        }
    }

    /// Replaces a size or metadata answer's size with the agreed one.
    fn set_size(&mut self, agreed: u64) {
        match self {
            Target::Size(size) => *size = agreed,
            Target::Info(meta) => meta.size = agreed,
            _ => {}
        }
    }

    /// Takes the answer a hedge left in its `scratch` target.
    fn take_answer(&mut self, from: &mut Target<'_>) {
        match (self, from) {
            (Target::Range { buf, .. }, Target::Range { buf: src, .. }) => buf.copy_from_slice(src),
            // The hedge's object replaces whatever the primary left.
            (Target::Object(out), Target::Object(src)) => std::mem::swap(*out, *src),
            (Target::Size(size), Target::Size(src)) => *size = *src,
            (Target::Info(meta), Target::Info(src)) => std::mem::swap(meta, src),
            // A scratch target has its read's shape: nothing else occurs.
            _ => {}
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
    /// Whether its latency is a sample (see [`Target::sampled`]).
    sampled: bool,
    /// Not a hedge: a first try or a retry.
    primary: bool,
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
            let elapsed = now.saturating_duration_since(self.start);
            self.health.observe_latency(elapsed, now);
            // A primary that lost a hedge race goes into the histogram the
            // adaptive delay reads, at least this slow: left out, the
            // spikes that hedges cut off would vanish from the replica's
            // latencies, its p95 would sink to the p95 of its fast reads,
            // and ever more reads would be hedged (9% instead of 5% behind
            // one spiky endpoint). A losing hedge is left out: it was cut
            // short by the primary's answer, not by its own speed.
            if self.sampled && self.primary {
                self.health.record_latency(elapsed);
            }
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
                remote: store.waits_on_network(),
                store,
                health: ReplicaHealth::new(n),
                hedge_delay: ForkMutex::new(None),
            })
            .collect();
        Ok(Router {
            name,
            replicas,
            placement,
            budget: RetryBudget::new(config.retry_budget_ratio, config.retry_budget_floor_per_s),
            config,
            eject_lock: ForkMutex::new(()),
            counters: ReadCounters::default(),
            latency: ForkMutex::new(LatencyWindow::new()),
            tracer: Tracer::default(),
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

    /// Records the next `capacity` reads' routing decisions (0 stops);
    /// see [`trace`].
    pub fn trace_reads(&self, capacity: usize) {
        self.tracer.start(capacity);
    }

    /// The reads traced since `trace_reads` or the last call.
    pub fn take_trace(&self) -> Vec<ReadTrace> {
        self.tracer.take()
    }

    pub fn preference_list(&self, key: &str) -> PreferenceList {
        self.placement.preference_list(key)
    }

    /// The end-to-end read latencies `stats` summarises, as a histogram
    /// (ranks merge these exactly; percentiles do not merge).
    pub fn latency_histogram(&self) -> LatencyHistogram {
        let latency = self.latency.lock();
        latency.current().clone()
    }

    pub fn stats(&self, reset: bool) -> RouterStats {
        use std::sync::atomic::Ordering::Relaxed;
        let replicas: Vec<ReplicaStats> = self
            .replicas
            .iter()
            .map(|r| r.health.snapshot(reset))
            .collect();
        let mut latency = self.latency.lock();
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
        self.choose_at(prefs, tried, last_resort, Instant::now)
    }

    /// [`Router::choose`] reading time from `clock` (the fleet simulation
    /// drives the real choice with a virtual clock).
    fn choose_at(
        &self,
        prefs: &PreferenceList,
        tried: Tried,
        last_resort: bool,
        clock: impl Fn() -> Instant,
    ) -> Option<(usize, bool)> {
        // The clock is read only when health needs it (an ejected replica,
        // p2c's load): a healthy affinity read never asks.
        let mut read = None;
        let mut now = || *read.get_or_insert_with(&clock);
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

    /// How long the attempt on `r` runs before a hedge is sent; `None`:
    /// no hedge. With `hedge_after_ms="auto"` (the default) the router
    /// hedges network replicas at their p95 (see
    /// [`config::DEFAULT_HEDGE_AFTER`]); a percentile with too few samples
    /// yet waits [`config::HEDGE_FALLBACK_MS`]. `None` turns hedging off.
    fn hedge_delay(&self, r: usize) -> Option<Duration> {
        let hedge_after = match self.config.hedge_after {
            Some(h) => h,
            // By default only replicas that can fall silent or spike are
            // hedged (towards another replica, or within a lone one): no
            // timer per read otherwise.
            None if self.config.hedge_auto && self.replicas[r].remote => {
                config::DEFAULT_HEDGE_AFTER
            }
            None => return None,
        };
        match hedge_after {
            HedgeAfter::Fixed(d) => Some(d),
            HedgeAfter::Percentile(p) => {
                let replica = &self.replicas[r];
                let now = Instant::now();
                let mut cached = replica.hedge_delay.lock();
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
                        let all = self.latency.lock().percentile(p, config::MIN_HEDGE_SAMPLES);
                        let delay = match (own, all) {
                            (Some(a), Some(b)) => a.min(b),
                            (Some(a), None) | (None, Some(a)) => a,
                            // Too few samples to trust: a silent replica
                            // must still cost one bounded delay.
                            (None, None) => config::hedge_fallback(),
                        };
                        let median = replica
                            .health
                            .latency_percentile(50.0, config::MIN_HEDGE_SAMPLES);
                        let delay = match median {
                            Some(m) => delay.min(m.mul_f64(config::HEDGE_MAX_MEDIANS)),
                            None => delay,
                        };
                        *cached = Some((now, Some(delay)));
                        Some(delay)
                    }
                }
            }
        }
    }

    // -- recording -----------------------------------------------------------

    fn start_attempt(&self, a: Attempt, start: Instant, sampled: bool) -> AttemptGuard<'_> {
        use std::sync::atomic::Ordering::Relaxed;
        let health = &self.replicas[a.replica].health;
        health.start_attempt();
        match a.kind {
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
            probe: a.probe,
            sampled,
            primary: a.kind != AttemptKind::Hedge,
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
        tally: Option<&mut Tally>,
    ) -> Instant {
        use std::sync::atomic::Ordering::Relaxed;
        guard.finished = true;
        let health = &self.replicas[r].health;
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(guard.start);
        if let Some(tally) = tally {
            if result.is_ok() && guard.sampled && !health.is_peak(elapsed) {
                self.defer_attempt(tally, r, elapsed, now);
                health.counters.bytes.add(bytes as u64);
                health.on_success();
                return now;
            }
            self.fold_tally(tally);
        }
        match result {
            // A size answered says nothing about serving bytes: it must not
            // clear the streak of a replica whose reads keep failing (one
            // that ignores Range answers HEAD well).
            Ok(()) if !guard.sampled => {}
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
                if guard.sampled {
                    health.record_latency(elapsed);
                    health.observe_latency(elapsed, now);
                }
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
        let _lock = self.eject_lock.lock();
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

    fn attempt_timeout(&self, key: &str, target: &Target<'_>, r: usize, start: Instant) -> Error {
        Error::Timeout {
            what: format!(
                "{} {key:?} from replica {:?}",
                target.what(),
                self.replicas[r].health.name
            ),
            elapsed_ms: start.elapsed().as_millis() as u64,
        }
    }

    /// One attempt, limited by the per-try timeout and the read's deadline.
    async fn attempt(
        &self,
        a: Attempt,
        key: &str,
        target: &mut Target<'_>,
        deadline: Instant,
    ) -> Result<()> {
        let mut guard = self.start_attempt(a, Instant::now(), target.sampled());
        let limit = match self.config.timeout {
            Some(t) => deadline.min(guard.start + t),
            None => deadline,
        };
        let store = self.replicas[a.replica].store.as_ref();
        let result = match tokio::time::timeout_at(limit.into(), target.read(store, key)).await {
            Ok(result) => result,
            Err(_) => Err(self.attempt_timeout(key, target, a.replica, guard.start)),
        };
        let len = target.len();
        self.finish_attempt(a.replica, &mut guard, &result, len, None);
        result
    }

    /// An attempt through the store's blocking path; `None` if the store
    /// has none (nothing was sent). The first try is timed from the read's
    /// start, and the read's end is this attempt's: one clock read less
    /// per page-cache read.
    fn attempt_blocking(&self, a: Attempt, read: &mut Read<'_, '_>) -> Option<Result<()>> {
        let start = if a.kind == AttemptKind::First {
            read.start
        } else {
            Instant::now()
        };
        let mut guard = self.start_attempt(a, start, read.target.sampled());
        let store = self.replicas[a.replica].store.as_ref();
        let Some(result) = read.target.read_blocking(store, read.key) else {
            // Not sent: undo the count (the guard still frees the probe).
            guard.finished = true;
            guard.health.counters.requests.sub(1);
            return None;
        };
        let len = read.target.len();
        let end = self.finish_attempt(
            a.replica,
            &mut guard,
            &result,
            len,
            read.tally.as_deref_mut(),
        );
        read.end = Some(end);
        Some(result)
    }

    /// A try on the calling thread. `None` only for a first try whose
    /// replica has no blocking path: the read then goes async, from the
    /// start. A later try on such a replica runs its async attempt to the
    /// end on this thread when the caller is outside the executor.
    fn try_blocking(&self, a: Attempt, read: &mut Read<'_, '_>) -> Option<Result<()>> {
        let result = match self.attempt_blocking(a, read) {
            Some(result) => result,
            None if a.kind == AttemptKind::First => return None,
            None if tokio::runtime::Handle::try_current().is_err() => {
                runtime::block_on(self.attempt(a, read.key, &mut *read.target, read.deadline))
            }
            None => Err(Error::Remote(format!(
                "replica {:?} has no blocking read path",
                self.replicas[a.replica].health.name
            ))),
        };
        if a.kind == AttemptKind::First {
            // The async path deposits up front; here only once the read
            // is known to stay on this path.
            self.budget.deposit();
        }
        Some(result)
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

    /// A hedge for the attempt on `r`: the next healthy replica not yet
    /// tried, once a token is spared (hedges leave the failover reserve of
    /// the budget alone). Otherwise why not: nobody is left to hedge to, or
    /// no token came before the deadline.
    async fn hedge_choice(
        &self,
        r: usize,
        prefs: &PreferenceList,
        tried: Tried,
        deadline: Instant,
        delay: Duration,
        sampled: bool,
    ) -> std::result::Result<(usize, bool), HedgeNote> {
        loop {
            match self.choose(prefs, tried | bit(r), false) {
                Some(choice) if self.budget.try_withdraw_hedge() => return Ok(choice),
                Some((h, probe)) => {
                    if probe {
                        self.replicas[h].health.release_probe();
                    }
                }
                None if self.hedges_within(r, sampled) => {
                    if self.budget.try_withdraw_hedge() {
                        return Ok((r, false));
                    }
                }
                None => return Err(HedgeNote::NoReplica),
            }
            // No token now (a busy spell spent the hedges' share): ask
            // again one hedge delay later rather than never. The floor
            // refills the budget, so a primary that will not answer (a
            // stopped server) is hedged within about a second instead of
            // holding the read until its deadline.
            if Instant::now() + delay >= deadline {
                return Err(HedgeNote::Budget);
            }
            tokio::time::sleep(delay).await;
        }
    }

    /// Whether a hedge of an attempt on `r` may go to `r` itself: one
    /// endpoint (or the only one not ejected) is the common case, and a
    /// per-request spike there is what a second request on a fresh
    /// connection avoids (the primary's connection is busy, so the
    /// client's pool opens or takes another). The caller hedges `r` at all
    /// only where [`Router::hedge_delay`] says so: by default, replicas
    /// that wait on the network. By default sizes are not hedged within a
    /// replica: a plan stats its objects in a burst (64 at a time), the
    /// burst queues at the one server past the reads' hedge delay, and
    /// hedging it only doubled the queue (279 of 450 sizes hedged behind
    /// one endpoint, extra requests 13-16% instead of 6%).
    fn hedges_within(&self, r: usize, sampled: bool) -> bool {
        (sampled || self.config.hedge_after.is_some())
            && !self.replicas[r].health.is_ejected()
            && self
                .replicas
                .iter()
                .enumerate()
                .all(|(i, o)| i == r || o.health.is_ejected())
    }

    /// An attempt, hedged to the next healthy replica if it is still
    /// running after the hedge delay. The first complete answer wins and
    /// the other attempt is dropped (cancelled). The primary writes into
    /// the read's target, the hedge into its own scratch target, moved over
    /// only once the primary is gone, so a result is never a mix of the two.
    async fn attempt_hedged(&self, a: Attempt, read: &mut Read<'_, '_>) -> Outcome {
        let r = a.replica;
        let Some(delay) = self.hedge_delay(r) else {
            let result = self
                .attempt(a, read.key, &mut *read.target, read.deadline)
                .await;
            return Self::settle(r, result, &mut read.failures);
        };
        let mut note = match read.note.as_deref_mut() {
            Some(note) if a.kind == AttemptKind::First => {
                note.hedge = HedgeNote::DelayNotReached;
                note.hedge_delay = delay;
                Some(note)
            }
            _ => None,
        };
        let mut scratch = Vec::new();
        let mut hedge_target = read.target.scratch(&mut scratch);
        let (key, deadline, sampled) = (read.key, read.deadline, read.target.sampled());
        let mut primary = Box::pin(self.attempt(a, key, &mut *read.target, deadline));
        let fire_at = deadline.min(Instant::now() + delay);
        tokio::select! {
            biased;
            result = &mut primary => return Self::settle(r, result, &mut read.failures),
            _ = tokio::time::sleep_until(fire_at.into()) => {}
        }
        let due = Instant::now();
        let choice = {
            let hedge = self.hedge_choice(r, &read.prefs, read.tried, deadline, delay, sampled);
            tokio::pin!(hedge);
            tokio::select! {
                biased;
                result = &mut primary => {
                    // Only a wait for a token can outlast the primary.
                    if let Some(note) = note.as_deref_mut() {
                        note.hedge = HedgeNote::Budget;
                        note.budget_wait = due.elapsed();
                    }
                    return Self::settle(r, result, &mut read.failures);
                }
                choice = &mut hedge => choice,
            }
        };
        let (h, hedge_probe) = match choice {
            Ok(choice) => choice,
            Err(why) => {
                if let Some(note) = note.as_deref_mut() {
                    note.hedge = why;
                    note.budget_wait = due.elapsed();
                }
                // Nobody to hedge to: the primary is the only hope.
                let result = primary.await;
                return Self::settle(r, result, &mut read.failures);
            }
        };
        if let Some(note) = note.as_deref_mut() {
            let now = Instant::now();
            note.hedge = HedgeNote::Sent;
            note.hedge_sent = Some(now);
            note.hedge_replica = Some(h);
            note.budget_wait = now.saturating_duration_since(due);
        }
        read.tried |= bit(h);
        let failures = &mut read.failures;
        // A hedge within the replica goes on a connection of its own: the
        // primary's is busy, so the client's pool opens or takes another.
        let hedge_won = {
            let hedge_attempt = Attempt {
                replica: h,
                probe: hedge_probe,
                kind: AttemptKind::Hedge,
            };
            let mut hedge = Box::pin(self.attempt(hedge_attempt, key, &mut hedge_target, deadline));
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
        // The primary is dropped before its target is touched: a losing
        // primary is cancelled and cannot write into it any more.
        drop(primary);
        match hedge_won {
            Ok(true) => {
                if let Some(note) = note {
                    note.winner = Winner::Hedge;
                }
                read.target.take_answer(&mut hedge_target);
                read.answered = Some(h);
                self.replicas[h]
                    .health
                    .counters
                    .hedges_won
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if h != r {
                    self.primary_lost_hedge(r, a.probe);
                }
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

    /// A new read of `key` into `target`; see [`Read`].
    fn read<'a, 'b>(
        &self,
        key: &'a str,
        target: &'a mut Target<'b>,
        blocking: bool,
        tally: Option<&'a mut Tally>,
    ) -> Read<'a, 'b> {
        let start = Instant::now();
        Read {
            key,
            target,
            blocking,
            tally,
            prefs: self.placement.preference_list(key),
            start,
            end: None,
            deadline: start + self.config.deadline,
            failures: Vec::new(),
            tried: 0,
            tries: 0,
            note: self.tracer.is_on().then(Box::default),
            answered: None,
        }
    }

    /// Before each try: how long to back off first, or why to stop (every
    /// replica tried, the deadline, the retry budget). After a failure that
    /// costs a token, takes one.
    fn before_try(&self, f: &Read<'_, '_>) -> std::result::Result<Duration, Option<GiveUp>> {
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
    fn next_try(&self, f: &mut Read<'_, '_>) -> Option<Attempt> {
        let (replica, probe) = self.choose(&f.prefs, f.tried, true)?;
        f.tried |= bit(replica);
        let kind = if f.tries == 0 {
            AttemptKind::First
        } else {
            AttemptKind::Retry
        };
        f.tries += 1;
        if let (Some(note), AttemptKind::First) = (f.note.as_deref_mut(), kind) {
            note.replica = Some(replica);
            note.in_flight = self.replicas[replica].health.in_flight();
        }
        Some(Attempt {
            replica,
            probe,
            kind,
        })
    }

    /// The end of a read that no replica served.
    fn read_given_up(&self, f: &mut Read<'_, '_>, stop: Option<GiveUp>) -> Result<()> {
        let err = self.give_up(f.key, std::mem::take(&mut f.failures), f.tried, stop);
        self.read_failed(f, err)
    }

    /// The one read engine: choice, timeouts, hedging, failover and the
    /// budget for every kind of read, async or on the calling thread (see
    /// [`Read::blocking`]). `None` only in blocking mode, when the first
    /// replica chosen has no blocking path (nothing was sent).
    async fn run(&self, read: &mut Read<'_, '_>) -> Option<Result<()>> {
        if !read.blocking {
            self.budget.deposit();
        }
        loop {
            match self.before_try(read) {
                Ok(wait) if wait.is_zero() => {}
                Ok(wait) if read.blocking => std::thread::sleep(wait),
                Ok(wait) => tokio::time::sleep(wait).await,
                Err(stop) => return Some(self.read_given_up(read, stop)),
            }
            let Some(a) = self.next_try(read) else {
                return Some(self.read_given_up(read, None));
            };
            let outcome = if read.blocking {
                let result = self.try_blocking(a, read)?;
                Self::settle(a.replica, result, &mut read.failures)
            } else {
                self.attempt_hedged(a, read).await
            };
            match outcome {
                Outcome::Done => {
                    read.answered.get_or_insert(a.replica);
                    return Some(self.read_done(read));
                }
                Outcome::Fatal(e) => return Some(self.read_failed(read, e)),
                Outcome::Failed => {}
            }
        }
    }

    /// A read on the executor.
    async fn route(&self, key: &str, target: &mut Target<'_>) -> Result<()> {
        let mut read = self.read(key, target, false, None);
        self.run(&mut read)
            .await
            .unwrap_or_else(|| Err(Error::Remote(format!("no replica read {key:?}"))))
    }

    /// The same engine on the calling thread: in blocking mode nothing in
    /// it waits on the executor (no timers, no hedges; backoff sleeps the
    /// thread), so one poll runs it to the end.
    fn route_blocking(
        &self,
        key: &str,
        target: &mut Target<'_>,
        tally: Option<&mut Tally>,
    ) -> Option<Result<()>> {
        use std::future::Future;
        use std::task::{Context, Poll, Waker};
        let mut read = self.read(key, target, true, tally);
        let run = std::pin::pin!(self.run(&mut read));
        match run.poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(done) => done,
            // Unreachable by construction; if it ever were, the async path
            // still serves the read.
            Poll::Pending => None,
        }
    }

    fn read_done(&self, read: &mut Read<'_, '_>) -> Result<()> {
        if let Some(note) = read.note.as_deref_mut() {
            if note.winner == Winner::Failed {
                note.winner = if read.tries > 1 {
                    Winner::Retry
                } else {
                    Winner::Primary
                };
            }
        }
        self.trace(read);
        if !read.target.sampled() {
            return Ok(());
        }
        self.counters.reads.add(1);
        self.counters.bytes.add(read.target.len() as u64);
        let end = read.end.unwrap_or_else(Instant::now);
        let elapsed = end.saturating_duration_since(read.start);
        match read.tally.as_deref_mut() {
            Some(tally) => {
                if tally.reads.len() >= session::TALLY_BATCH {
                    self.fold_tally(tally);
                }
                tally.reads.push(elapsed);
            }
            None => self.record_read_latencies(&[elapsed]),
        }
        Ok(())
    }

    /// Folds end-to-end read latencies into the router's histogram.
    fn record_read_latencies(&self, elapsed: &[Duration]) {
        let mut h = self.latency.lock();
        for e in elapsed {
            h.record(*e);
        }
    }

    fn trace(&self, read: &Read<'_, '_>) {
        if let Some(note) = read.note.as_deref() {
            let end = read.end.unwrap_or_else(Instant::now);
            self.tracer
                .record(read.key, read.target.kind(), read.start, end, note);
        }
    }

    fn read_failed(&self, read: &Read<'_, '_>, err: Error) -> Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        self.trace(read);
        if read.target.sampled() {
            self.counters.reads.add(1);
            self.counters.read_errors.fetch_add(1, Relaxed);
            self.record_read_latencies(&[read.start.elapsed()]);
        }
        Err(err)
    }

    /// Holds a successful attempt's sample in `tally` (the caller checked
    /// it is not a peak).
    fn defer_attempt(&self, tally: &mut Tally, replica: usize, elapsed: Duration, end: Instant) {
        if tally.due(end) {
            self.fold_tally(tally);
        }
        tally.attempts.push(AttemptSample {
            replica,
            elapsed,
            end,
        });
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

    /// Whether reads may take the executor-free path: nothing the user set
    /// needs a timer. (The default hedging is for replicas that wait on the
    /// network; a store with a blocking path answers from the kernel.)
    fn blocking_allowed(&self) -> bool {
        self.config.hedge_after.is_none() && self.config.timeout.is_none()
    }
}

#[derive(Debug, Clone, Copy)]
enum GiveUp {
    Deadline,
    Budget,
}

/// One try on one replica.
#[derive(Debug, Clone, Copy)]
struct Attempt {
    replica: usize,
    /// Sent as the probe of an ejected replica (its slot is claimed).
    probe: bool,
    kind: AttemptKind,
}

/// One read through the engine: what it asks and where the answer goes,
/// how it waits, and its failover state (the key's preference list, which
/// replicas were tried and what they answered, the deadline).
struct Read<'a, 'b> {
    key: &'a str,
    target: &'a mut Target<'b>,
    /// On the calling thread through the stores' blocking paths: no hedges
    /// and no timers (the caller checked that none is configured).
    blocking: bool,
    /// Where a blocking read's latency samples wait (see [`session`]).
    tally: Option<&'a mut Tally>,
    prefs: PreferenceList,
    start: Instant,
    /// When the last attempt ended, where that was timed anyway.
    end: Option<Instant>,
    deadline: Instant,
    failures: Vec<(usize, Error)>,
    tried: Tried,
    tries: u32,
    /// What the trace records of this read, while tracing is on.
    note: Option<Box<trace::Note>>,
    /// The replica whose answer the read returned.
    answered: Option<usize>,
}

impl Store for Router {
    fn name(&self) -> &str {
        &self.name
    }

    /// Confirmed by a second replica (see [`agree`]).
    fn size<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            let mut target = Target::Size(0);
            self.route_agreed(key, &mut target).await?;
            Ok(target.size())
        })
    }

    /// One routed request (hedged and failed over like a read), its size
    /// confirmed as `size`'s is.
    fn info<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ObjectMeta>> {
        Box::pin(async move {
            let mut target = Target::Info(Box::new(ObjectMeta::file(key, 0)));
            self.route_agreed(key, &mut target).await?;
            match target {
                Target::Info(meta) => Ok(*meta),
                _ => Err(Error::Remote(format!("no metadata for {key:?}"))),
            }
        })
    }

    fn read_into<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { self.route(key, &mut Target::Range { offset, buf }).await })
    }

    fn read_object<'a>(&'a self, key: &'a str, out: &'a mut Vec<u8>) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { self.route(key, &mut Target::Object(out)).await })
    }

    fn read_into_blocking(&self, key: &str, offset: u64, buf: &mut [u8]) -> Option<Result<()>> {
        if !self.blocking_allowed() {
            return None;
        }
        self.route_blocking(key, &mut Target::Range { offset, buf }, None)
    }

    fn read_into_blocking_tallied(
        &self,
        key: &str,
        offset: u64,
        buf: &mut [u8],
        tally: &mut Tally,
    ) -> Option<Result<()>> {
        if !self.blocking_allowed() {
            return None;
        }
        self.route_blocking(key, &mut Target::Range { offset, buf }, Some(tally))
    }

    /// Per replica, one lock of its histogram and one of its estimate; one
    /// lock of the router's histogram.
    fn fold_tally(&self, tally: &mut Tally) {
        let mut seen: u64 = 0;
        for s in &tally.attempts {
            seen |= 1 << s.replica;
        }
        while seen != 0 {
            let r = seen.trailing_zeros() as usize;
            seen &= seen - 1;
            let samples = tally
                .attempts
                .iter()
                .filter(move |s| s.replica == r)
                .map(|s| (s.elapsed, s.end));
            self.replicas[r].health.record_successes(samples);
        }
        tally.attempts.clear();
        if !tally.reads.is_empty() {
            self.record_read_latencies(&tally.reads);
            tally.reads.clear();
        }
    }

    fn size_blocking(&self, key: &str) -> Option<Result<u64>> {
        // A hedge needs the executor but a local `stat` cannot be slow in
        // the way a hedge helps with: only a timeout sends sizes async.
        if self.config.timeout.is_some() {
            return None;
        }
        let mut target = Target::Size(0);
        let done = self.route_blocking(key, &mut target, None)?;
        Some(done.map(|()| target.size()))
    }
}

#[cfg(test)]
mod tests;
