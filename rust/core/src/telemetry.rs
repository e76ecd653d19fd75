//! The metrics model: one table of definitions ([`DEFINITIONS`]) from which
//! every exporter (Prometheus, OpenTelemetry, the log snapshot) and the docs'
//! metric table are generated, and the process-wide [`snapshot`] of what the
//! router, the prefetcher and the ring count.
//!
//! Counters here are cumulative for the life of the process: figures that
//! `stats(reset=True)` clears, or that a dropped `Storage` takes with it, are
//! carried into process totals first, so a scrape never sees a counter go
//! back. Per-stream figures are process totals (a label per stream would be
//! unbounded cardinality); per-replica figures carry the replica's redacted
//! name.

use crate::counter::StripedCounter;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use crate::metrics::LatencyHistogram;
use crate::route::Router;

/// What a metric is, in Prometheus' terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// How the figures of several processes (DataLoader workers, ranks) combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    Sum,
    Max,
    Min,
}

impl Merge {
    pub fn as_str(self) -> &'static str {
        match self {
            Merge::Sum => "sum",
            Merge::Max => "max",
            Merge::Min => "min",
        }
    }
}

/// Where a metric's figure comes from. `Cache(key)` names a key of the node
/// cache's counters (see [`CacheCounters`]): a cache metric is one line in
/// [`DEFINITIONS`] and absent until a cache reports that key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Router,
    Replica,
    Stream,
    Cache(&'static str),
    /// Set from outside the data path with [`set_gauge`] (the bench's
    /// fault windows).
    External,
}

/// One metric: everything an exporter or the docs need to say about it.
#[derive(Debug, Clone, Copy)]
pub struct Definition {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    /// Base unit ("seconds", "bytes"), or "" for a count.
    pub unit: &'static str,
    pub labels: &'static [&'static str],
    pub merge: Merge,
    pub source: Source,
}

/// Classic histogram bucket bounds for latencies, in seconds: 100 µs to
/// 10 s, where object-store reads and their tails fall.
pub const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

const fn def(
    name: &'static str,
    kind: Kind,
    unit: &'static str,
    labels: &'static [&'static str],
    merge: Merge,
    source: Source,
    help: &'static str,
) -> Definition {
    Definition {
        name,
        kind,
        help,
        unit,
        labels,
        merge,
        source,
    }
}

use Kind::{Counter, Gauge, Histogram};
use Merge::{Max, Min, Sum};

const REPLICA: &[&str] = &["replica"];

/// Every metric feedline exports. Exporters and docs are generated from
/// this table; a sample whose name is not here is never produced.
pub const DEFINITIONS: &[Definition] = &[
    def("feedline_reads_total", Counter, "", &[], Sum, Source::Router,
        "Reads asked of the router (each may send several attempts)."),
    def("feedline_read_errors_total", Counter, "", &[], Sum, Source::Router,
        "Reads that failed after every replica was tried or the deadline passed."),
    def("feedline_read_bytes_total", Counter, "bytes", &[], Sum, Source::Router,
        "Bytes returned by reads through the router."),
    def("feedline_routed_read_seconds", Histogram, "seconds", &[], Sum, Source::Router,
        "End-to-end read latency, failover and hedging included."),
    def("feedline_retry_budget_balance", Gauge, "", &[], Min, Source::Router,
        "Retries and hedges the retry budget still allows (lowest over filesystems and processes)."),
    def("feedline_replica_requests_total", Counter, "", &["replica", "outcome"], Sum, Source::Replica,
        "Attempts sent to a replica by outcome: ok, error, timeout, checksum_mismatch, not_found, cancelled (lost a hedge race)."),
    def("feedline_read_seconds", Histogram, "seconds", REPLICA, Sum, Source::Replica,
        "Latency of attempts answered by a replica (success or error)."),
    def("feedline_replica_bytes_total", Counter, "bytes", REPLICA, Sum, Source::Replica,
        "Bytes delivered by a replica's successful attempts."),
    def("feedline_replica_retries_total", Counter, "", REPLICA, Sum, Source::Replica,
        "Attempts sent to a replica as a retry after another failed."),
    def("feedline_hedges_sent_total", Counter, "", REPLICA, Sum, Source::Replica,
        "Hedged attempts sent to a replica because the first was slow."),
    def("feedline_hedges_won_total", Counter, "", REPLICA, Sum, Source::Replica,
        "Hedged attempts to a replica that answered first."),
    def("feedline_replica_ejections_total", Counter, "", REPLICA, Sum, Source::Replica,
        "Times a replica was taken out of rotation."),
    def("feedline_replica_readmissions_total", Counter, "", REPLICA, Sum, Source::Replica,
        "Times an ejected replica passed its probe and came back."),
    def("feedline_replica_ejected", Gauge, "", REPLICA, Max, Source::Replica,
        "1 while a replica is ejected (in any process), else 0."),
    def("feedline_replica_in_flight", Gauge, "", REPLICA, Sum, Source::Replica,
        "Attempts to a replica in flight now."),
    def("feedline_replica_latency_ewma_seconds", Gauge, "seconds", REPLICA, Max, Source::Replica,
        "The router's peak-EWMA latency estimate of a replica."),
    def("feedline_stream_stall_seconds_total", Counter, "seconds", &[], Sum, Source::Stream,
        "Exposed stall: time consumers waited for a chunk that was not ready yet."),
    def("feedline_stream_stalls_total", Counter, "", &[], Sum, Source::Stream,
        "Times a consumer had to wait for its next chunk."),
    def("feedline_stream_bytes_total", Counter, "bytes", &[], Sum, Source::Stream,
        "Bytes delivered to consumers by prefetching streams."),
    def("feedline_stream_chunks_total", Counter, "", &[], Sum, Source::Stream,
        "Chunks delivered to consumers by prefetching streams."),
    def("feedline_streams", Gauge, "", &[], Sum, Source::Stream,
        "Prefetching streams running now."),
    def("feedline_ring_slots", Gauge, "", &[], Sum, Source::Stream,
        "Slots in the rings of running streams."),
    def("feedline_ring_slots_occupied", Gauge, "", &[], Sum, Source::Stream,
        "Ring slots being filled, ready, or held by the consumer."),
    def("feedline_prefetch_depth", Gauge, "", &[], Sum, Source::Stream,
        "Fetches running streams may keep in flight (their depth)."),
    def("feedline_prefetch_in_flight", Gauge, "", &[], Sum, Source::Stream,
        "Fetches running streams have in flight now (depth in use)."),
    def("feedline_fault_active", Gauge, "", &["fault"], Max, Source::External,
        "1 while an injected fault window (feedline bench's scenario) is open, else 0."),
    def("feedline_cache_hits_total", Counter, "", &[], Sum, Source::Cache("hits"),
        "Block reads served from the node cache."),
    def("feedline_cache_misses_total", Counter, "", &[], Sum, Source::Cache("misses"),
        "Block reads the node cache did not hold."),
    def("feedline_cache_served_bytes_total", Counter, "bytes", &[], Sum, Source::Cache("hit_bytes"),
        "Bytes served from the node cache."),
    def("feedline_cache_fetched_bytes_total", Counter, "bytes", &[], Sum, Source::Cache("fill_bytes"),
        "Bytes the node cache fetched from replicas."),
    def("feedline_cache_fills_total", Counter, "", &[], Sum, Source::Cache("fills"),
        "Blocks written into the node cache."),
    def("feedline_cache_single_flight_waits_total", Counter, "", &[], Sum, Source::Cache("waits"),
        "Reads that waited for another process to fill the same block."),
    def("feedline_cache_evictions_total", Counter, "", &[], Sum, Source::Cache("evictions"),
        "Blocks evicted from the node cache."),
    def("feedline_cache_evicted_bytes_total", Counter, "bytes", &[], Sum, Source::Cache("evicted_bytes"),
        "Bytes evicted from the node cache."),
    def("feedline_cache_stale_versions_total", Counter, "", &[], Sum, Source::Cache("stale_versions"),
        "Cached blocks found stale (the object changed) and fetched again."),
    def("feedline_cache_corrupt_blocks_total", Counter, "", &[], Sum, Source::Cache("corrupt_blocks"),
        "Cached blocks whose checksum failed (deleted and fetched again)."),
    def("feedline_cache_bypasses_total", Counter, "", &[], Sum, Source::Cache("bypasses"),
        "Reads that went past the cache (full or unwritable cache directory)."),
];

/// The definition named `name`.
pub fn definition(name: &str) -> Option<&'static Definition> {
    DEFINITIONS.iter().find(|d| d.name == name)
}

/// A figure: a number, or a latency histogram (µs buckets, see
/// [`LatencyHistogram::to_bytes`]).
#[derive(Debug, Clone)]
pub enum Value {
    Number(f64),
    Histogram(LatencyHistogram),
}

/// One labelled figure of one metric.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: &'static str,
    /// Label values, in the order of the definition's labels.
    pub labels: Vec<String>,
    pub value: Value,
}

/// The node cache's counters, keyed as in `fs.cache.stats()`. A cache
/// registers itself with [`register_cache`]; every key that a definition
/// names as `Source::Cache(key)` becomes a metric.
pub trait CacheCounters: Send + Sync {
    fn counters(&self) -> Vec<(&'static str, u64)>;
}

/// A stream's live gauges, read at snapshot time.
pub trait StreamGauges: Send + Sync {
    /// (slots, occupied slots, depth, fetches in flight).
    fn gauges(&self) -> (usize, usize, usize, usize);
}

/// Process totals every stream adds to, once per chunk or batch of chunks
/// from its consumer thread: striped, so consumers of several streams on
/// several cores do not share a cache line (see [`crate::counter`]).
#[derive(Debug, Default)]
pub struct StreamTotals {
    stall_ns: StripedCounter,
    stalls: StripedCounter,
    bytes: StripedCounter,
    chunks: StripedCounter,
}

impl StreamTotals {
    #[inline]
    pub fn delivered(&self, chunks: u64, bytes: u64) {
        self.chunks.add(chunks);
        self.bytes.add(bytes);
    }

    pub fn stalled(&self, waited: Duration) {
        self.stalls.add(1);
        self.stall_ns
            .add(waited.as_nanos().min(u64::MAX as u128) as u64);
    }

    fn reset(&self) {
        for c in [&self.stall_ns, &self.stalls, &self.bytes, &self.chunks] {
            c.take();
        }
    }
}

/// Every stream's totals.
pub static STREAMS: StreamTotals = StreamTotals {
    stall_ns: StripedCounter::new(),
    stalls: StripedCounter::new(),
    bytes: StripedCounter::new(),
    chunks: StripedCounter::new(),
};

/// The process's live routers, streams and caches and the totals carried
/// from dropped ones (opaque: reached through [`register`] and
/// [`snapshot`]).
pub struct Registry {
    next_id: u64,
    routers: Vec<(u64, Weak<Router>)>,
    streams: Vec<Weak<dyn StreamGauges>>,
    caches: Vec<(u64, Weak<dyn CacheCounters>)>,
    /// Counter and histogram figures of reset or dropped routers, by
    /// (name, labels).
    carried: BTreeMap<(&'static str, Vec<String>), Value>,
    /// Gauges set with [`set_gauge`].
    external: BTreeMap<(&'static str, Vec<String>), f64>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    next_id: 0,
    routers: Vec::new(),
    streams: Vec::new(),
    caches: Vec::new(),
    carried: BTreeMap::new(),
    external: BTreeMap::new(),
});

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

thread_local! {
    /// The registry, held by the thread that forks from [`before_fork`]
    /// until its `after_fork_*` hook (which runs on that same thread).
    static HELD_ACROSS_FORK: std::cell::RefCell<Option<MutexGuard<'static, Registry>>> =
        const { std::cell::RefCell::new(None) };
}

/// Right before `fork` (a `pthread_atfork` prepare handler, see
/// [`crate::fork`]): takes the registry, so that no other thread is inside
/// it when the child is made. Pair with [`after_fork_in_parent`] and
/// [`after_fork_in_child`] on the same thread.
///
/// It runs inside `fork()` itself, after Python's own before-fork hooks:
/// between this and the fork no Python code runs, so no thread can take
/// the GIL and then wait for the registry while the forking thread, holding
/// the registry, waits for the GIL (holding it across Python's hooks did
/// exactly that). It never waits for long: code holding the registry waits
/// on nothing but the CPU (no I/O, no router lock, no GIL).
pub fn before_fork() {
    let guard = registry();
    HELD_ACROSS_FORK.with(|h| *h.borrow_mut() = Some(guard));
}

/// In the parent after `fork`: gives back what [`before_fork`] took.
pub fn after_fork_in_parent() {
    HELD_ACROSS_FORK.with(|h| h.borrow_mut().take());
}

/// In the child after `fork` (single-threaded): gives back the registry
/// (a std mutex is one word: unlocking it leaves no trace of the parent's
/// waiters). The Python layer then calls [`forget_inherited`].
pub fn after_fork_in_child() {
    HELD_ACROSS_FORK.with(|h| h.borrow_mut().take());
}

/// What a [`Registration`] can keep in the process snapshot: a router or a
/// node cache.
pub trait Counted {
    /// Its figures now.
    fn samples(&self) -> Vec<Sample>;
    /// The registry's list of live ones of its kind.
    fn listed(reg: &mut Registry) -> &mut Vec<(u64, Weak<Self>)>;
}

impl Counted for Router {
    fn samples(&self) -> Vec<Sample> {
        router_samples(self)
    }
    fn listed(reg: &mut Registry) -> &mut Vec<(u64, Weak<Self>)> {
        &mut reg.routers
    }
}

impl Counted for dyn CacheCounters {
    fn samples(&self) -> Vec<Sample> {
        one_cache_samples(self)
    }
    fn listed(reg: &mut Registry) -> &mut Vec<(u64, Weak<Self>)> {
        &mut reg.caches
    }
}

/// Keeps a router or a node cache in the process snapshot; dropping it
/// carries the last counts into the process totals (exported `_total`s
/// never go back when a filesystem is dropped).
pub struct Registration<T: Counted + ?Sized> {
    id: u64,
    /// Strong: the last figures are read when this drops, whatever order
    /// its owner drops its fields in.
    source: Arc<T>,
}

pub type RouterRegistration = Registration<Router>;
pub type CacheRegistration = Registration<dyn CacheCounters>;

impl<T: Counted + ?Sized> std::fmt::Debug for Registration<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Adds `source` to the process snapshot until the registration drops.
pub fn register<T: Counted + ?Sized>(source: &Arc<T>) -> Registration<T> {
    let mut reg = registry();
    reg.next_id += 1;
    let id = reg.next_id;
    T::listed(&mut reg).push((id, Arc::downgrade(source)));
    Registration {
        id,
        source: Arc::clone(source),
    }
}

/// [`register`] for a router.
pub fn register_router(router: &Arc<Router>) -> RouterRegistration {
    register(router)
}

/// [`register`] for a node cache.
pub fn register_cache(cache: &Arc<dyn CacheCounters>) -> CacheRegistration {
    register(cache)
}

impl<T: Counted + ?Sized> Drop for Registration<T> {
    fn drop(&mut self) {
        let samples = self.source.samples();
        let mut reg = registry();
        T::listed(&mut reg).retain(|(id, _)| *id != self.id);
        carry(&mut reg, samples);
    }
}

/// `router.stats(true)` that first carries what the reset clears into the
/// process totals, so exported counters keep counting.
pub fn reset_router(router: &Router) -> crate::route::RouterStats {
    let samples = router_samples(router);
    let stats = router.stats(true);
    carry(&mut registry(), samples);
    stats
}

/// Sets a gauge whose definition's source is [`Source::External`].
pub fn set_gauge(name: &str, labels: Vec<String>, value: f64) -> crate::Result<()> {
    let d = definition(name)
        .filter(|d| d.source == Source::External)
        .ok_or_else(|| {
            crate::Error::invalid(format!(
                "{name:?} is not a metric that can be set from outside"
            ))
        })?;
    if labels.len() != d.labels.len() {
        return Err(crate::Error::invalid(format!(
            "{name} takes labels {:?}, got {} values",
            d.labels,
            labels.len()
        )));
    }
    registry().external.insert((d.name, labels), value);
    Ok(())
}

/// Adds a running stream's gauges to the process snapshot while it lives.
pub fn register_stream(stream: Weak<dyn StreamGauges>) {
    let mut reg = registry();
    reg.streams.retain(|s| s.strong_count() > 0);
    reg.streams.push(stream);
}

fn carry(reg: &mut Registry, samples: Vec<Sample>) {
    for s in samples {
        let kind = definition(s.name).map(|d| d.kind);
        if kind == Some(Kind::Gauge) {
            continue;
        }
        add_into(&mut reg.carried, s);
    }
}

fn add_into(into: &mut BTreeMap<(&'static str, Vec<String>), Value>, s: Sample) {
    match (into.get_mut(&(s.name, s.labels.clone())), s.value) {
        (Some(Value::Number(a)), Value::Number(b)) => *a += b,
        (Some(Value::Histogram(a)), Value::Histogram(b)) => a.merge(&b),
        (Some(_), _) => {}
        (None, value) => {
            into.insert((s.name, s.labels), value);
        }
    }
}

fn number(name: &'static str, labels: Vec<String>, value: f64) -> Sample {
    Sample {
        name,
        labels,
        value: Value::Number(value),
    }
}

fn router_samples(router: &Router) -> Vec<Sample> {
    let stats = router.stats(false);
    let mut out = vec![
        number("feedline_reads_total", vec![], stats.reads as f64),
        number(
            "feedline_read_errors_total",
            vec![],
            stats.read_errors as f64,
        ),
        number("feedline_read_bytes_total", vec![], stats.bytes as f64),
        Sample {
            name: "feedline_routed_read_seconds",
            labels: vec![],
            value: Value::Histogram(router.latency_histogram()),
        },
        number(
            "feedline_retry_budget_balance",
            vec![],
            stats.retry_budget_balance,
        ),
    ];
    for (i, r) in stats.replicas.iter().enumerate() {
        let l = || vec![r.name.clone()];
        let other = r
            .errors
            .saturating_sub(r.timeouts)
            .saturating_sub(r.checksum_mismatches);
        let ok = r
            .requests
            .saturating_sub(r.in_flight)
            .saturating_sub(r.errors)
            .saturating_sub(r.not_found)
            .saturating_sub(r.cancelled);
        for (outcome, n) in [
            ("ok", ok),
            ("error", other),
            ("timeout", r.timeouts),
            ("checksum_mismatch", r.checksum_mismatches),
            ("not_found", r.not_found),
            ("cancelled", r.cancelled),
        ] {
            out.push(number(
                "feedline_replica_requests_total",
                vec![r.name.clone(), outcome.to_owned()],
                n as f64,
            ));
        }
        out.extend([
            Sample {
                name: "feedline_read_seconds",
                labels: l(),
                value: Value::Histogram(router.health(i).latency_histogram()),
            },
            number("feedline_replica_bytes_total", l(), r.bytes as f64),
            number("feedline_replica_retries_total", l(), r.retries as f64),
            number("feedline_hedges_sent_total", l(), r.hedges_sent as f64),
            number("feedline_hedges_won_total", l(), r.hedges_won as f64),
            number("feedline_replica_ejections_total", l(), r.ejections as f64),
            number(
                "feedline_replica_readmissions_total",
                l(),
                r.readmissions as f64,
            ),
            number(
                "feedline_replica_ejected",
                l(),
                f64::from(u8::from(r.ejected)),
            ),
            number("feedline_replica_in_flight", l(), r.in_flight as f64),
            number(
                "feedline_replica_latency_ewma_seconds",
                l(),
                r.peak_ewma_ms / 1e3,
            ),
        ]);
    }
    out
}

fn stream_samples(streams: &[Weak<dyn StreamGauges>]) -> Vec<Sample> {
    let t = &STREAMS;
    let (mut live, mut slots, mut occupied, mut depth, mut in_flight) = (0, 0, 0, 0, 0);
    for g in streams.iter().filter_map(Weak::upgrade) {
        let (s, o, d, f) = g.gauges();
        live += 1;
        slots += s;
        occupied += o;
        depth += d;
        in_flight += f;
    }
    let load = |c: &StripedCounter| c.get() as f64;
    vec![
        number(
            "feedline_stream_stall_seconds_total",
            vec![],
            load(&t.stall_ns) / 1e9,
        ),
        number("feedline_stream_stalls_total", vec![], load(&t.stalls)),
        number("feedline_stream_bytes_total", vec![], load(&t.bytes)),
        number("feedline_stream_chunks_total", vec![], load(&t.chunks)),
        number("feedline_streams", vec![], live as f64),
        number("feedline_ring_slots", vec![], slots as f64),
        number("feedline_ring_slots_occupied", vec![], occupied as f64),
        number("feedline_prefetch_depth", vec![], depth as f64),
        number("feedline_prefetch_in_flight", vec![], in_flight as f64),
    ]
}

fn cache_samples(caches: &[(u64, Weak<dyn CacheCounters>)]) -> Vec<Sample> {
    caches
        .iter()
        .filter_map(|(_, c)| c.upgrade())
        .flat_map(|c| one_cache_samples(&*c))
        .collect()
}

fn one_cache_samples(cache: &dyn CacheCounters) -> Vec<Sample> {
    let mut out = Vec::new();
    for (key, n) in cache.counters() {
        let by_key = DEFINITIONS.iter().find(|d| d.source == Source::Cache(key));
        if let Some(d) = by_key {
            out.push(number(d.name, vec![], n as f64));
        }
    }
    out
}

/// Every figure of this process: live routers, streams and caches plus the
/// totals carried from reset or dropped routers. Samples of one metric and
/// label set are combined (summed; gauges by their definition's merge).
pub fn snapshot() -> Vec<Sample> {
    let (routers, streams, caches, carried, external) = {
        let reg = registry();
        let routers: Vec<Arc<Router>> = reg
            .routers
            .iter()
            .filter_map(|(_, r)| r.upgrade())
            .collect();
        (
            routers,
            reg.streams.clone(),
            reg.caches.clone(),
            reg.carried.clone(),
            reg.external.clone(),
        )
    };
    let mut all = carried;
    let mut gauges: BTreeMap<(&'static str, Vec<String>), f64> = BTreeMap::new();
    let live = routers
        .iter()
        .flat_map(|r| router_samples(r))
        .chain(stream_samples(&streams))
        .chain(cache_samples(&caches));
    for s in live {
        match (definition(s.name), &s.value) {
            (Some(d), Value::Number(v)) if d.kind == Kind::Gauge => {
                gauges
                    .entry((s.name, s.labels))
                    .and_modify(|a| *a = merge(d.merge, *a, *v))
                    .or_insert(*v);
            }
            _ => add_into(&mut all, s),
        }
    }
    let gauges = gauges
        .into_iter()
        .chain(external)
        .map(|((name, labels), v)| ((name, labels), Value::Number(v)));
    all.extend(gauges);
    all.into_iter()
        .map(|((name, labels), value)| Sample {
            name,
            labels,
            value,
        })
        .collect()
}

/// Two figures of one metric combined per `how`.
pub fn merge(how: Merge, a: f64, b: f64) -> f64 {
    match how {
        Merge::Sum => a + b,
        Merge::Max => a.max(b),
        Merge::Min => a.min(b),
    }
}

/// In a forked child: forgets the figures inherited from the parent (its
/// routers' counts, stream totals, carried totals), so that the child
/// reports only what it counts itself and nothing is counted twice. Call
/// it only while the child has a single thread (right after `fork`). The
/// routers' locks are [`crate::fork::ForkMutex`]es: one a parent thread
/// held at `fork` is not waited for here.
pub fn forget_inherited() {
    let mut reg = registry();
    reg.carried.clear();
    // The parent's streams have no prefetch threads here.
    reg.streams.clear();
    reg.routers.retain(|(_, r)| match r.upgrade() {
        Some(router) => {
            router.stats(true);
            true
        }
        None => false,
    });
    STREAMS.reset();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{LocalStore, Store};

    #[test]
    fn names_follow_prometheus_conventions_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for d in DEFINITIONS {
            assert!(seen.insert(d.name), "{} twice", d.name);
            assert!(d.name.starts_with("feedline_"), "{}", d.name);
            assert_eq!(
                d.kind == Kind::Counter,
                d.name.ends_with("_total"),
                "{}",
                d.name
            );
            if !d.unit.is_empty() {
                let base = d.name.trim_end_matches("_total");
                assert!(base.ends_with(d.unit), "{} must end with its unit", d.name);
            }
            assert!(!d.help.is_empty());
            assert!(d.labels.iter().all(|l| *l != "key" && *l != "path"));
        }
    }

    fn temp_router() -> (tempfile::TempDir, Arc<Router>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![7u8; 4096]).unwrap();
        let store: Arc<dyn Store> =
            Arc::new(LocalStore::rooted(dir.path().to_str().unwrap()).unwrap());
        let storage = crate::storage::Storage::from_store(store);
        (dir, Arc::clone(storage.router()))
    }

    fn total(samples: &[Sample], name: &str) -> f64 {
        samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| match &s.value {
                Value::Number(v) => *v,
                Value::Histogram(h) => h.count() as f64,
            })
            .sum()
    }

    #[test]
    fn every_sample_is_defined_with_its_labels_and_counts_survive_reset_and_drop() {
        let (_dir, router) = temp_router();
        let registration = register_router(&router);
        let weak = Arc::downgrade(&router);
        drop(router);
        let router = weak.upgrade().expect("the registration keeps the router");
        let mut buf = [0u8; 16];
        for _ in 0..3 {
            crate::runtime::block_on(router.read_into("a", 0, &mut buf)).unwrap();
        }
        let samples = snapshot();
        for s in &samples {
            let d = definition(s.name).unwrap_or_else(|| panic!("{} undefined", s.name));
            assert_eq!(s.labels.len(), d.labels.len(), "{}", s.name);
        }
        let before = total(&samples, "feedline_reads_total");
        assert!(before >= 3.0);
        reset_router(&router);
        assert!(total(&snapshot(), "feedline_reads_total") >= before);
        drop(router);
        drop(registration);
        assert!(weak.upgrade().is_none());
        assert!(total(&snapshot(), "feedline_reads_total") >= before);
        assert!(total(&snapshot(), "feedline_routed_read_seconds") >= 3.0);
    }

    #[test]
    fn only_external_gauges_can_be_set_and_with_their_labels() {
        set_gauge(
            "feedline_fault_active",
            vec!["replica 1 outage".into()],
            1.0,
        )
        .unwrap();
        let s = snapshot();
        assert!(s
            .iter()
            .any(|s| s.name == "feedline_fault_active" && s.labels == ["replica 1 outage"]));
        assert!(set_gauge("feedline_reads_total", vec![], 1.0).is_err());
        assert!(set_gauge("feedline_fault_active", vec![], 1.0).is_err());
    }

    #[test]
    fn the_registry_held_across_fork_is_given_back() {
        before_fork();
        assert!(REGISTRY.try_lock().is_err(), "held from before_fork");
        after_fork_in_parent();
        let (_dir, router) = temp_router();
        let _registration = register_router(&router);
        assert!(!snapshot().is_empty());
    }

    struct FakeCache;
    impl CacheCounters for FakeCache {
        fn counters(&self) -> Vec<(&'static str, u64)> {
            vec![("hits", 5), ("misses", 2), ("not_a_metric", 9)]
        }
    }

    #[test]
    fn cache_counters_become_metrics_by_their_keys_and_outlive_the_cache() {
        // Other tests' caches only ever add to these totals.
        let hits = |s: &[Sample]| total(s, "feedline_cache_hits_total");
        let before = snapshot();
        let cache: Arc<dyn CacheCounters> = Arc::new(FakeCache);
        let registration = register_cache(&cache);
        let s = snapshot();
        assert!(hits(&s) >= hits(&before) + 5.0);
        assert!(total(&s, "feedline_cache_misses_total") >= 2.0);
        drop(registration);
        drop(cache);
        assert!(
            hits(&snapshot()) >= hits(&before) + 5.0,
            "a dropped cache's counts are carried, not lost"
        );
    }
}
