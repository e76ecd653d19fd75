//! Routing at fleet scale, simulated: many clients, each with its own
//! [`Router`], reading over one set of replicas, driven by a virtual clock.
//!
//! Nothing is sent: a read's service time is drawn (exponential), a dead
//! replica refuses an attempt after `refused_ms`. The choice of replica is
//! the router's own (`choose_at`: preference list, ejection and probes,
//! `policy`, bounded `load_factor`) with the virtual time; attempts raise
//! and lower the replica's in-flight count in the client's router, and
//! their outcome folds into its health by the rules `finish_attempt`
//! applies (a failure streak ejects through `maybe_eject`, a failed probe
//! ejects again for longer, a success readmits). Backoff, hedging and the
//! retry budget are left out: a failed attempt is retried at once.
//!
//! Service times do not depend on load, so clients do not interact and are
//! simulated one after another, each summing its replica busy time into
//! shared windows: the fleet's load is exact and memory stays one router.
//!
//! Affinity: a read keeps it when it is served by the first live replica
//! of its key's placement (the replica whose cache holds the key once the
//! fleet settles: with every replica up, the key's HRW primary).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{bit, PreferenceList, Router, RouterConfig, RoutingOptions, Tried};
use crate::error::{Error, Result};
use crate::rng::SplitMix64;
use crate::store::local::LocalStore;
use crate::store::Store;

/// Replicas that die and come back.
#[derive(Debug, Clone, Serialize)]
pub struct Outage {
    pub replicas: Vec<usize>,
    pub down_ms: u64,
    pub up_ms: u64,
}

/// Which objects clients read.
#[derive(Debug, Clone, Copy, Serialize)]
pub enum Popularity {
    /// Each client reads every object once per epoch in its own shuffled
    /// order (training).
    Shuffled,
    /// Objects drawn with probability ∝ 1 / rank^s: a few hot shards.
    Zipf(f64),
}

#[derive(Debug, Clone, Serialize)]
pub struct FleetSpec {
    pub clients: usize,
    pub replicas: usize,
    /// Reads each client keeps in flight (its prefetch depth).
    pub in_flight: usize,
    pub objects: usize,
    pub popularity: Popularity,
    /// Mean of the exponential service time of a read.
    pub mean_read_ms: f64,
    /// How long a dead replica takes to refuse an attempt.
    pub refused_ms: f64,
    pub duration_ms: u64,
    pub window_ms: u64,
    pub outage: Option<Outage>,
    pub seed: u64,
}

impl FleetSpec {
    /// Replica names (they seed placement; a ketama ring built elsewhere
    /// must use the same).
    pub fn replica_names(&self) -> Vec<String> {
        (0..self.replicas)
            .map(|i| format!("http://replica-{i:02}:8080"))
            .collect()
    }

    pub fn key(object: usize) -> String {
        format!("shard-{object:06}.tar")
    }

    fn validate(&self) -> Result<()> {
        if self.clients == 0 || self.in_flight == 0 || self.objects == 0 || self.replicas < 2 {
            return Err(Error::invalid(format!(
                "a fleet needs clients, in_flight and objects above 0 and 2 replicas or more, got {self:?}"
            )));
        }
        if self.window_ms == 0 || self.duration_ms < self.window_ms {
            return Err(Error::invalid(format!(
                "window_ms must be above 0 and at most duration_ms, got {} and {}",
                self.window_ms, self.duration_ms
            )));
        }
        if !(self.mean_read_ms > 0.0 && self.refused_ms > 0.0) {
            return Err(Error::invalid(format!(
                "mean_read_ms and refused_ms must be above 0, got {} and {}",
                self.mean_read_ms, self.refused_ms
            )));
        }
        if let Some(o) = &self.outage {
            if o.replicas.iter().any(|&r| r >= self.replicas) || o.replicas.len() >= self.replicas {
                return Err(Error::invalid(format!(
                    "outage replicas must be fewer than {} and each below it, got {:?}",
                    self.replicas, o.replicas
                )));
            }
        }
        Ok(())
    }

    fn is_down(&self, replica: usize, t_ns: u64) -> bool {
        self.outage.as_ref().is_some_and(|o| {
            o.replicas.contains(&replica) && t_ns >= o.down_ms * MS && t_ns < o.up_ms * MS
        })
    }

    fn outage_active(&self, t_ns: u64) -> bool {
        self.outage
            .as_ref()
            .is_some_and(|o| t_ns >= o.down_ms * MS && t_ns < o.up_ms * MS)
    }
}

const MS: u64 = 1_000_000;

/// How a variant routes.
#[derive(Debug, Clone)]
pub enum Routing {
    /// feedline's router with these options, one per client.
    Router(RoutingOptions),
    /// A fixed placement per object: `home` with every replica up,
    /// `degraded` while the outage lasts, applied the instant it starts and
    /// ends (a ring such as ketama, told of the outage by an oracle).
    Static {
        home: Vec<usize>,
        degraded: Vec<usize>,
    },
}

/// One time window of the whole fleet.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Window {
    /// Milliseconds of reads in flight on each replica (its busy time).
    pub busy_ms: Vec<f64>,
    /// Reads completed, and those served by their key's first live replica.
    pub reads: u64,
    pub kept: u64,
    /// Attempts refused by a dead replica.
    pub refused: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FleetRun {
    pub name: String,
    pub windows: Vec<Window>,
    /// Attempts sent to a replica at its bounded-load cap while another
    /// untried healthy replica had room (bounded load says: never).
    pub over_cap: u64,
    /// Reads that no replica served.
    pub failed_reads: u64,
}

/// A phase's figures.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Phase {
    /// Busiest live replica's busy time over the live replicas' mean.
    pub peak_to_mean: f64,
    /// Reads in flight on the busiest live replica, and on the mean one
    /// (over every replica, dead ones at 0), averaged over the phase.
    pub peak_in_flight: f64,
    pub mean_in_flight: f64,
    /// Share of reads that kept their affinity.
    pub affinity: f64,
    pub reads: u64,
    pub refused: u64,
}

impl FleetRun {
    fn range(&self, window_ms: u64, from_ms: u64, to_ms: u64) -> &[Window] {
        let a = ((from_ms / window_ms) as usize).min(self.windows.len());
        let b = ((to_ms / window_ms) as usize).clamp(a, self.windows.len());
        &self.windows[a..b]
    }

    /// Figures over `[from_ms, to_ms)`, load over the `live` replicas.
    pub fn phase(&self, spec: &FleetSpec, from_ms: u64, to_ms: u64, live: &[usize]) -> Phase {
        let windows = self.range(spec.window_ms, from_ms, to_ms);
        let mut busy = vec![0.0; spec.replicas];
        let (mut reads, mut kept, mut refused) = (0, 0, 0);
        for w in windows {
            for (b, x) in busy.iter_mut().zip(&w.busy_ms) {
                *b += x;
            }
            reads += w.reads;
            kept += w.kept;
            refused += w.refused;
        }
        let length_ms = (windows.len() as u64 * spec.window_ms).max(1) as f64;
        Phase {
            peak_to_mean: peak_to_mean(&busy, live),
            peak_in_flight: live.iter().map(|&r| busy[r]).fold(0.0, f64::max) / length_ms,
            mean_in_flight: busy.iter().sum::<f64>() / busy.len().max(1) as f64 / length_ms,
            affinity: if reads == 0 {
                0.0
            } else {
                kept as f64 / reads as f64
            },
            reads,
            refused,
        }
    }

    /// The worst peak/mean of any `span_ms` stretch in `[from_ms, to_ms)`.
    pub fn worst(&self, spec: &FleetSpec, from_ms: u64, to_ms: u64, span_ms: u64) -> f64 {
        let live = spec.live_during(from_ms);
        let mut worst: f64 = 0.0;
        let mut t = from_ms;
        while t + span_ms <= to_ms {
            worst = worst.max(self.phase(spec, t, t + span_ms, &live).peak_to_mean);
            t += spec.window_ms;
        }
        worst
    }

    /// Milliseconds from the outage's end until the returned replicas carry
    /// at least 90% of the share of busy time they carried before it, in
    /// every second from then on (one-second spans, so that the noise of a
    /// short window does not count as churn); `None` if they never do in
    /// the run.
    pub fn rebalance_ms(&self, spec: &FleetSpec) -> Option<u64> {
        let o = spec.outage.as_ref()?;
        let share = |windows: &[Window]| -> f64 {
            let (mut ours, mut all) = (0.0, 0.0);
            for w in windows {
                for (r, b) in w.busy_ms.iter().enumerate() {
                    all += b;
                    if o.replicas.contains(&r) {
                        ours += b;
                    }
                }
            }
            if all == 0.0 {
                0.0
            } else {
                ours / all
            }
        };
        let before = share(self.range(spec.window_ms, 0, o.down_ms));
        let span = 1000u64.max(spec.window_ms);
        let mut settled = None;
        let mut t = o.up_ms;
        while t + span <= spec.duration_ms {
            if share(self.range(spec.window_ms, t, t + span)) >= 0.9 * before {
                settled.get_or_insert(t - o.up_ms);
            } else {
                settled = None;
            }
            t += spec.window_ms;
        }
        settled
    }
}

impl FleetSpec {
    /// Replicas up at `t_ms`.
    pub fn live_during(&self, t_ms: u64) -> Vec<usize> {
        (0..self.replicas)
            .filter(|&r| !self.is_down(r, t_ms * MS))
            .collect()
    }
}

fn peak_to_mean(busy: &[f64], live: &[usize]) -> f64 {
    let loads: Vec<f64> = live.iter().map(|&r| busy[r]).collect();
    let mean = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
    if mean == 0.0 {
        return 0.0;
    }
    loads.iter().cloned().fold(0.0, f64::max) / mean
}

/// Draws a simulation needs beyond [`SplitMix64`]'s.
trait Draws {
    fn index_below(&mut self, n: usize) -> usize;
    fn exponential_ns(&mut self, mean_ms: f64) -> u64;
}

impl Draws for SplitMix64 {
    fn index_below(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    fn exponential_ns(&mut self, mean_ms: f64) -> u64 {
        ((-self.unit().ln() * mean_ms * 1e6) as u64).max(1)
    }
}

/// A client's stream of objects.
struct Objects<'a> {
    popularity: Popularity,
    zipf_cdf: &'a [f64],
    order: Vec<usize>,
    next: usize,
}

impl Objects<'_> {
    fn next(&mut self, rng: &mut SplitMix64) -> usize {
        match self.popularity {
            Popularity::Zipf(_) => {
                let u = rng.unit() * self.zipf_cdf.last().copied().unwrap_or(1.0);
                self.zipf_cdf
                    .partition_point(|&c| c < u)
                    .min(self.zipf_cdf.len() - 1)
            }
            Popularity::Shuffled => {
                if self.next == self.order.len() {
                    for i in (1..self.order.len()).rev() {
                        self.order.swap(i, rng.index_below(i + 1));
                    }
                    self.next = 0;
                }
                self.next += 1;
                self.order[self.next - 1]
            }
        }
    }
}

/// One read's current attempt.
#[derive(Debug, Clone, Copy, Default)]
struct Attempt {
    object: usize,
    replica: usize,
    probe: bool,
    /// The attempt failed (refused, or reset when its replica died).
    refused: bool,
    /// The replica was up when the attempt started (it was busy with it).
    worked: bool,
    tried: Tried,
    start_ns: u64,
    /// The replica the read keeps affinity with.
    target: usize,
}

/// Simulates every client under `routing`; `name` labels the run.
pub fn simulate(spec: &FleetSpec, routing: &Routing, name: &str) -> Result<FleetRun> {
    spec.validate()?;
    let names = spec.replica_names();
    let placement = super::Rendezvous::new(&names, None)?;
    let prefs: Vec<PreferenceList> = (0..spec.objects)
        .map(|o| placement.preference_list(&FleetSpec::key(o)))
        .collect();
    if let Routing::Static { home, degraded } = routing {
        let bad = home.iter().chain(degraded).find(|&&r| r >= spec.replicas);
        if home.len() != spec.objects || degraded.len() != spec.objects || bad.is_some() {
            return Err(Error::invalid(format!(
                "a static placement needs one replica below {} per object for {} objects, got {} and {}",
                spec.replicas,
                spec.objects,
                home.len(),
                degraded.len()
            )));
        }
    }
    let zipf_cdf: Vec<f64> = match spec.popularity {
        Popularity::Zipf(s) => (0..spec.objects)
            .scan(0.0, |acc, k| {
                *acc += 1.0 / ((k + 1) as f64).powf(s);
                Some(*acc)
            })
            .collect(),
        Popularity::Shuffled => Vec::new(),
    };
    let windows = spec.duration_ms.div_ceil(spec.window_ms) as usize;
    let mut run = FleetRun {
        name: name.to_string(),
        windows: vec![
            Window {
                busy_ms: vec![0.0; spec.replicas],
                ..Window::default()
            };
            windows
        ],
        over_cap: 0,
        failed_reads: 0,
    };
    let root: Arc<dyn Store> = Arc::new(LocalStore::rooted(std::env::temp_dir())?);
    for client in 0..spec.clients {
        let router = match routing {
            Routing::Router(options) => Some(Router::new(
                names.clone(),
                vec![root.clone(); spec.replicas],
                RouterConfig::from_options(options)?,
            )?),
            Routing::Static { .. } => None,
        };
        let mut sim = Client {
            spec,
            routing,
            router: router.as_ref(),
            prefs: &prefs,
            rng: SplitMix64::for_stream(spec.seed, client as u64 + 1),
            t0: Instant::now(),
            run: &mut run,
        };
        sim.run(&zipf_cdf);
    }
    Ok(run)
}

struct Client<'a> {
    spec: &'a FleetSpec,
    routing: &'a Routing,
    router: Option<&'a Router>,
    prefs: &'a [PreferenceList],
    rng: SplitMix64,
    t0: Instant,
    run: &'a mut FleetRun,
}

impl Client<'_> {
    fn run(&mut self, zipf_cdf: &[f64]) {
        let spec = self.spec;
        let end_ns = spec.duration_ms * MS;
        let mut objects = Objects {
            popularity: spec.popularity,
            zipf_cdf,
            order: (0..spec.objects).collect(),
            next: spec.objects,
        };
        let mut slots = vec![Attempt::default(); spec.in_flight];
        let mut events = BinaryHeap::new();
        for (slot, attempt) in slots.iter_mut().enumerate() {
            // Clients start spread over one service time, not in lockstep.
            let t = (self.rng.unit() * spec.mean_read_ms * 1e6) as u64;
            let object = objects.next(&mut self.rng);
            if let Some((a, done)) = self.dispatch(object, 0, t) {
                *attempt = a;
                events.push(Reverse((done, slot)));
            }
        }
        while let Some(Reverse((t, slot))) = events.pop() {
            let a = slots[slot];
            let end = t.min(end_ns);
            self.finish(&a, end);
            if t >= end_ns {
                continue;
            }
            let next = if a.refused {
                self.dispatch(a.object, a.tried, t)
            } else {
                let object = objects.next(&mut self.rng);
                self.dispatch(object, 0, t)
            };
            match next {
                Some((attempt, done)) => {
                    slots[slot] = attempt;
                    events.push(Reverse((done, slot)));
                }
                None => {
                    // Every replica refused: the read fails; the slot
                    // moves on to the next object.
                    self.run.failed_reads += 1;
                    let object = objects.next(&mut self.rng);
                    if let Some((attempt, done)) = self.dispatch(object, 0, t) {
                        slots[slot] = attempt;
                        events.push(Reverse((done, slot)));
                    }
                }
            }
        }
    }

    fn at(&self, t_ns: u64) -> Instant {
        self.t0 + Duration::from_nanos(t_ns)
    }

    /// The read's affinity: its placement's first live replica at `t`.
    fn target(&self, object: usize, t_ns: u64) -> usize {
        match self.routing {
            Routing::Static { home, degraded } => {
                if self.spec.outage_active(t_ns) {
                    degraded[object]
                } else {
                    home[object]
                }
            }
            Routing::Router(_) => self.prefs[object]
                .iter()
                .find(|&r| !self.spec.is_down(r, t_ns))
                .unwrap_or(0),
        }
    }

    /// Sends an attempt for `object` at `t_ns`; returns it and when it ends.
    fn dispatch(&mut self, object: usize, tried: Tried, t_ns: u64) -> Option<(Attempt, u64)> {
        let target = self.target(object, t_ns);
        let (replica, probe) = match self.router {
            None => (target, false),
            Some(router) => {
                let now = self.at(t_ns);
                let choice = router.choose_at(&self.prefs[object], tried, true, || now)?;
                if !choice.1 && over_cap(router, tried, choice.0) {
                    self.run.over_cap += 1;
                }
                router.health(choice.0).start_attempt();
                choice
            }
        };
        let refused_at_once = self.spec.is_down(replica, t_ns);
        let mut refused = refused_at_once;
        let mut service = if refused {
            (self.spec.refused_ms * 1e6) as u64
        } else {
            self.rng.exponential_ns(self.spec.mean_read_ms)
        };
        if let Some(o) = &self.spec.outage {
            // A replica that dies mid-read resets the connection then.
            let down = o.down_ms * MS;
            if !refused && o.replicas.contains(&replica) && t_ns < down && t_ns + service > down {
                refused = true;
                service = down - t_ns;
            }
        }
        let attempt = Attempt {
            object,
            replica,
            probe,
            refused,
            worked: !refused_at_once,
            tried: tried | bit(replica),
            start_ns: t_ns,
            target: if tried == 0 {
                target
            } else {
                self.target(object, t_ns)
            },
        };
        Some((attempt, t_ns + service))
    }

    /// Folds an attempt that ended at `t_ns` into the client's router (as
    /// `finish_attempt` does) and the fleet's windows.
    fn finish(&mut self, a: &Attempt, t_ns: u64) {
        if let Some(router) = self.router {
            let health = router.health(a.replica);
            let now = self.at(t_ns);
            health.end_attempt();
            if a.refused {
                let streak = health.on_failure();
                if a.probe {
                    let c = router.config();
                    health.eject(now, c.base_ejection, c.max_ejection);
                } else if streak >= router.config().eject_after_failures && !health.is_ejected() {
                    router.maybe_eject(a.replica, now);
                }
            } else {
                health.observe_latency(Duration::from_nanos(t_ns - a.start_ns), now);
                health.on_success();
            }
            if a.probe {
                health.release_probe();
            }
        }
        let window_ns = self.spec.window_ms * MS;
        let w = ((t_ns.saturating_sub(1)) / window_ns) as usize;
        if a.refused {
            let last = self.run.windows.len() - 1;
            self.run.windows[((t_ns / window_ns) as usize).min(last)].refused += 1;
        }
        if !a.worked {
            return;
        }
        // Busy time, split over the windows the attempt spans.
        let mut s = a.start_ns;
        while s < t_ns {
            let i = (s / window_ns) as usize;
            let e = t_ns.min((i as u64 + 1) * window_ns);
            if let Some(win) = self.run.windows.get_mut(i) {
                win.busy_ms[a.replica] += (e - s) as f64 / 1e6;
            }
            s = e;
        }
        // An attempt cut off by the end of the run is no completed read.
        if !a.refused && t_ns < self.spec.duration_ms * MS {
            if let Some(win) = self.run.windows.get_mut(w) {
                win.reads += 1;
                win.kept += u64::from(a.replica == a.target);
            }
        }
    }
}

/// Whether `chosen` was at the bounded-load cap while another untried,
/// healthy replica was under it (the cap as `choose` computes it).
fn over_cap(router: &Router, tried: Tried, chosen: usize) -> bool {
    let Some(factor) = router.config().load_factor else {
        return false;
    };
    let healthy: Vec<usize> = (0..router.len())
        .filter(|&r| !router.health(r).is_ejected())
        .collect();
    let total: u64 = healthy.iter().map(|&r| router.health(r).in_flight()).sum();
    let cap = (factor * (total + 1) as f64 / healthy.len().max(1) as f64).ceil() as u64;
    router.health(chosen).in_flight() >= cap
        && healthy
            .iter()
            .any(|&r| tried & bit(r) == 0 && router.health(r).in_flight() < cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(outage: bool) -> FleetSpec {
        FleetSpec {
            clients: 20,
            replicas: 8,
            in_flight: 6,
            objects: 500,
            popularity: Popularity::Shuffled,
            mean_read_ms: 20.0,
            refused_ms: 1.0,
            duration_ms: 8_000,
            window_ms: 250,
            outage: outage.then(|| Outage {
                replicas: vec![2, 5],
                down_ms: 1_500,
                up_ms: 3_500,
            }),
            seed: 7,
        }
    }

    fn router(policy: &str, load_factor: Option<f64>) -> Routing {
        Routing::Router(RoutingOptions {
            policy: policy.into(),
            load_factor,
            ..RoutingOptions::default()
        })
    }

    fn totals(run: &FleetRun) -> (u64, u64, u64) {
        run.windows.iter().fold((0, 0, 0), |(r, k, f), w| {
            (r + w.reads, k + w.kept, f + w.refused)
        })
    }

    #[test]
    fn plain_affinity_serves_every_read_from_its_primary() {
        for popularity in [Popularity::Shuffled, Popularity::Zipf(1.0)] {
            let spec = FleetSpec {
                popularity,
                ..spec(false)
            };
            let run = simulate(&spec, &router("affinity", None), "hrw").unwrap();
            let (reads, kept, refused) = totals(&run);
            assert!(reads > 0);
            assert_eq!(kept, reads, "{popularity:?}");
            assert_eq!(refused, 0);
            assert_eq!(run.failed_reads, 0);
            // Every replica carries reads (no placement left one idle).
            let busy: Vec<f64> = (0..spec.replicas)
                .map(|r| run.windows.iter().map(|w| w.busy_ms[r]).sum())
                .collect();
            assert!(busy.iter().all(|&b| b > 0.0), "{busy:?}");
        }
    }

    #[test]
    fn bounded_load_never_sends_to_a_full_replica_while_another_has_room() {
        for outage in [false, true] {
            for policy in ["affinity", "p2c"] {
                let spec = FleetSpec {
                    popularity: Popularity::Zipf(1.0),
                    ..spec(outage)
                };
                let run = simulate(&spec, &router(policy, Some(1.25)), policy).unwrap();
                assert_eq!(run.over_cap, 0, "{policy} outage={outage}");
                let (reads, kept, _) = totals(&run);
                assert!(reads > 0 && kept < reads, "the bound moved no read");
            }
        }
    }

    #[test]
    fn dead_replicas_serve_nothing_are_ejected_and_come_back() {
        let spec = spec(true);
        let o = spec.outage.clone().unwrap();
        for routing in [router("affinity", None), router("p2c", Some(1.25))] {
            let run = simulate(&spec, &routing, "outage").unwrap();
            let w = spec.window_ms;
            for (i, win) in run.windows.iter().enumerate() {
                let t = i as u64 * w;
                let inside = t >= o.down_ms && t + w <= o.up_ms;
                for &r in &o.replicas {
                    if inside {
                        assert_eq!(win.busy_ms[r], 0.0, "dead replica {r} busy at {t} ms");
                    }
                }
                if t + w <= o.down_ms || t >= o.up_ms {
                    assert_eq!(win.refused, 0, "refused at {t} ms");
                }
            }
            let during = run.phase(&spec, o.down_ms, o.up_ms, &spec.live_during(o.down_ms));
            assert!(during.refused > 0);
            // Ejection keeps refusals far below one per read.
            assert!(during.refused * 10 < during.reads, "{during:?}");
            assert_eq!(run.failed_reads, 0);
            assert!(
                run.rebalance_ms(&spec).is_some(),
                "returned replicas never rebalanced"
            );
        }
        let plain = simulate(&spec, &router("affinity", None), "hrw").unwrap();
        let all: Vec<usize> = (0..spec.replicas).collect();
        // Failover goes to the next live replica in the preference list:
        // affinity is kept through the outage; it is lost only while a
        // returned replica is still ejected, and whole again at the end.
        let until_return = plain.phase(&spec, 0, o.up_ms, &all);
        assert_eq!(until_return.affinity, 1.0);
        let returning = plain.phase(&spec, o.up_ms, o.up_ms + 1000, &all);
        assert!(returning.affinity < 1.0);
        let end = plain.phase(&spec, spec.duration_ms - 1000, spec.duration_ms, &all);
        assert_eq!(end.affinity, 1.0);
    }

    #[test]
    fn static_placement_is_followed_and_checked() {
        let spec = spec(true);
        let home: Vec<usize> = (0..spec.objects).map(|o| o % spec.replicas).collect();
        let degraded: Vec<usize> = home
            .iter()
            .map(|&r| if r == 2 || r == 5 { 0 } else { r })
            .collect();
        let run = simulate(
            &spec,
            &Routing::Static {
                home: home.clone(),
                degraded,
            },
            "static",
        )
        .unwrap();
        let (reads, kept, refused) = totals(&run);
        assert_eq!(kept, reads);
        // Only the reads in flight when the replicas died fail (then go to
        // the degraded placement).
        assert!(refused > 0 && refused <= (spec.clients * spec.in_flight) as u64);
        let short = Routing::Static {
            home: home[1..].to_vec(),
            degraded: home.clone(),
        };
        assert!(simulate(&spec, &short, "bad").is_err());
        let out_of_range = Routing::Static {
            home: vec![spec.replicas; spec.objects],
            degraded: home,
        };
        assert!(simulate(&spec, &out_of_range, "bad").is_err());
    }

    #[test]
    fn runs_repeat_and_bad_specs_are_refused() {
        let spec = spec(true);
        let a = simulate(&spec, &router("p2c", None), "a").unwrap();
        let b = simulate(&spec, &router("p2c", None), "b").unwrap();
        assert_eq!(totals(&a), totals(&b));
        for bad in [
            FleetSpec {
                clients: 0,
                ..spec.clone()
            },
            FleetSpec {
                window_ms: 0,
                ..spec.clone()
            },
            FleetSpec {
                outage: Some(Outage {
                    replicas: vec![8],
                    down_ms: 0,
                    up_ms: 1,
                }),
                ..spec.clone()
            },
        ] {
            assert!(simulate(&bad, &router("affinity", None), "bad").is_err());
        }
    }
}
