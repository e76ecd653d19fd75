//! Router behaviour over real local replicas, with two small fault stores
//! (a slow one and one that fails on command) standing in for the chaos
//! wrapper where a test needs a replica to misbehave on cue.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::store::session::TALLY_BATCH;
use crate::store::{LocalStore, ReadSession};

/// Delays every read by `delay` (async: the delay can be cancelled), and
/// adds `spike` to every `spike_every`-th read.
#[derive(Debug)]
struct SlowStore {
    inner: Arc<dyn Store>,
    delay: Duration,
    spike: Duration,
    spike_every: u64,
    reads: AtomicU64,
}

impl SlowStore {
    fn new(inner: Arc<dyn Store>, delay: Duration) -> Self {
        SlowStore {
            inner,
            delay,
            spike: Duration::ZERO,
            spike_every: 0,
            reads: AtomicU64::new(0),
        }
    }
}

impl Store for SlowStore {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn size<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64>> {
        self.inner.size(key)
    }
    fn read_into<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let n = self.reads.fetch_add(1, Ordering::Relaxed) + 1;
            let mut delay = self.delay;
            if self.spike_every > 0 && n % self.spike_every == 0 {
                delay += self.spike;
            }
            // Write half the buffer first: a cancelled read leaves partial
            // bytes behind, which a hedge must never deliver.
            let half = buf.len() / 2;
            self.inner.read_into(key, offset, &mut buf[..half]).await?;
            tokio::time::sleep(delay).await;
            self.inner
                .read_into(key, offset + half as u64, &mut buf[half..])
                .await
        })
    }
}

/// Fails every read with an I/O error while `down` is set.
#[derive(Debug)]
struct SwitchStore {
    inner: Arc<dyn Store>,
    down: AtomicBool,
}

impl Store for SwitchStore {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn size<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64>> {
        self.inner.size(key)
    }
    fn read_into<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            match self.read_into_blocking(key, offset, buf) {
                Some(r) => r,
                None => unreachable!(),
            }
        })
    }
    fn read_into_blocking(&self, key: &str, offset: u64, buf: &mut [u8]) -> Option<Result<()>> {
        if self.down.load(Ordering::SeqCst) {
            return Some(Err(Error::Io {
                context: format!("reading {key:?}"),
                source: std::io::Error::from_raw_os_error(5),
            }));
        }
        self.inner.read_into_blocking(key, offset, buf)
    }
}

struct Replicas {
    dirs: Vec<tempfile::TempDir>,
}

impl Replicas {
    /// `n` replica roots; `fill(i)` gives replica i's bytes for key "obj".
    fn new(n: usize, fill: impl Fn(usize) -> Option<Vec<u8>>) -> Self {
        let dirs: Vec<_> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
        for (i, d) in dirs.iter().enumerate() {
            if let Some(bytes) = fill(i) {
                std::fs::write(d.path().join("obj"), bytes).unwrap();
            }
        }
        Replicas { dirs }
    }

    fn names(&self) -> Vec<String> {
        self.dirs
            .iter()
            .map(|d| d.path().display().to_string())
            .collect()
    }

    fn local(&self) -> Vec<Arc<dyn Store>> {
        self.dirs
            .iter()
            .map(|d| Arc::new(LocalStore::rooted(d.path()).unwrap()) as Arc<dyn Store>)
            .collect()
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn read(router: &Router, key: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    match router.read_into_blocking(key, offset, &mut buf) {
        Some(r) => r.map(|()| buf),
        None => runtime::block_on(router.read_into(key, offset, &mut buf)).map(|()| buf),
    }
}

fn read_async(router: &Router, key: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    runtime::block_on(router.read_into(key, offset, &mut buf)).map(|()| buf)
}

#[test]
fn fails_over_when_a_replica_lacks_the_file() {
    let data = pattern(1, 4096);
    // Only the last replica in "obj"'s preference list has it.
    let reps = Replicas::new(3, |_| None);
    let order_here: Vec<usize> = Rendezvous::new(&reps.names(), None)
        .unwrap()
        .preference_list("obj")
        .iter()
        .collect();
    let last = order_here[2];
    std::fs::write(reps.dirs[last].path().join("obj"), &data).unwrap();
    let router = Router::new(reps.names(), reps.local(), RouterConfig::default()).unwrap();
    assert_eq!(read(&router, "obj", 0, 4096).unwrap(), data);
    assert_eq!(read_async(&router, "obj", 0, 4096).unwrap(), data);
    let stats = router.stats(false);
    assert_eq!(stats.replicas[last].bytes, 2 * 4096);
    assert_eq!(stats.replicas[order_here[0]].not_found, 2);
    assert_eq!(router.size_blocking("obj").unwrap().unwrap(), 4096);
    // Missing everywhere: FileNotFound, not ReplicasUnavailable.
    for r in [
        read(&router, "nope", 0, 1),
        read_async(&router, "nope", 0, 1),
    ] {
        assert!(matches!(r, Err(Error::NotFound { .. })), "{r:?}");
    }
    assert!(matches!(
        router.size_blocking("nope").unwrap(),
        Err(Error::NotFound { .. })
    ));
}

#[test]
fn mixed_failures_name_every_replica() {
    // One replica holds a directory, one a short file, one nothing.
    let reps = Replicas::new(3, |_| None);
    std::fs::create_dir(reps.dirs[0].path().join("obj")).unwrap();
    std::fs::write(reps.dirs[1].path().join("obj"), b"short").unwrap();
    let router = Router::new(reps.names(), reps.local(), RouterConfig::default()).unwrap();
    for r in [
        read(&router, "obj", 0, 100),
        read_async(&router, "obj", 0, 100),
    ] {
        let err = r.unwrap_err();
        let Error::ReplicasUnavailable { failures, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(failures.len(), 3);
        let names = reps.names();
        for (f, name) in failures.iter().zip(&names) {
            assert_eq!(&f.replica, name);
        }
        assert!(failures[0].error.contains("directory"), "{err}");
        assert!(failures[1].error.contains("short read"), "{err}");
        assert!(failures[2].error.contains("no such file"), "{err}");
    }
    // Caller mistakes are not failed over.
    let err = read(&router, "../escape", 0, 1).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
}

#[test]
fn a_removed_root_fails_over_to_the_others() {
    let data = pattern(2, 1000);
    let reps = Replicas::new(3, |_| Some(data.clone()));
    let router = Router::new(reps.names(), reps.local(), RouterConfig::default()).unwrap();
    let keys: Vec<String> = (0..30).map(|i| format!("k{i}")).collect();
    for d in &reps.dirs {
        for k in &keys {
            std::fs::write(d.path().join(k), &data).unwrap();
        }
    }
    let victim = 0;
    std::fs::remove_dir_all(reps.dirs[victim].path()).unwrap();
    for k in &keys {
        assert_eq!(read(&router, k, 0, 1000).unwrap(), data);
    }
    let stats = router.stats(false);
    assert_eq!(stats.read_errors, 0);
    assert!(stats.replicas[victim].not_found > 0);
}

fn switchable(reps: &Replicas) -> (Vec<Arc<SwitchStore>>, Vec<Arc<dyn Store>>) {
    let switches: Vec<Arc<SwitchStore>> = reps
        .local()
        .into_iter()
        .map(|inner| {
            Arc::new(SwitchStore {
                inner,
                down: AtomicBool::new(false),
            })
        })
        .collect();
    let stores = switches
        .iter()
        .map(|s| Arc::clone(s) as Arc<dyn Store>)
        .collect();
    (switches, stores)
}

#[test]
fn ejects_after_consecutive_failures_and_readmits_through_a_probe() {
    let data = pattern(3, 512);
    let reps = Replicas::new(3, |_| Some(data.clone()));
    let (switches, stores) = switchable(&reps);
    let config = RouterConfig::from_options(&RoutingOptions {
        eject_after_failures: 3,
        base_ejection_ms: 100.0,
        backoff_base_ms: 0.0,
        ..Default::default()
    })
    .unwrap();
    let router = Router::new(reps.names(), stores, config).unwrap();
    let primary = router.placement().primary("obj");
    switches[primary].down.store(true, Ordering::SeqCst);
    for _ in 0..20 {
        assert_eq!(read(&router, "obj", 0, 512).unwrap(), data);
        if router.health(primary).is_ejected() {
            break;
        }
    }
    let s = router.stats(false).replicas[primary].clone();
    assert_eq!(s.errors, 3, "ejected after exactly 3 failures: {s:?}");
    assert_eq!(s.ejections, 1);
    assert!(s.ejected);
    // Still down when the ejection ends: the probe fails, out for longer.
    std::thread::sleep(Duration::from_millis(120));
    assert_eq!(read(&router, "obj", 0, 512).unwrap(), data);
    let s = router.stats(false).replicas[primary].clone();
    assert_eq!((s.errors, s.ejections), (4, 2), "{s:?}");
    // Back up: after the (doubled) ejection a probe readmits it.
    switches[primary].down.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    while router.health(primary).is_ejected() && Instant::now() < deadline {
        assert_eq!(read(&router, "obj", 0, 512).unwrap(), data);
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = router.stats(false).replicas[primary].clone();
    assert!(!s.ejected && s.readmissions == 1, "{s:?}");
    let before = s.bytes;
    assert_eq!(read(&router, "obj", 0, 512).unwrap(), data);
    assert_eq!(router.stats(false).replicas[primary].bytes, before + 512);
    assert_eq!(router.stats(false).read_errors, 0);
}

#[test]
fn never_ejects_the_last_healthy_replica() {
    let reps = Replicas::new(2, |_| Some(vec![7; 64]));
    let (switches, stores) = switchable(&reps);
    let config = RouterConfig::from_options(&RoutingOptions {
        eject_after_failures: 1,
        backoff_base_ms: 0.0,
        retry_budget_floor_per_s: 1000.0,
        ..Default::default()
    })
    .unwrap();
    let router = Router::new(reps.names(), stores, config).unwrap();
    for s in &switches {
        s.down.store(true, Ordering::SeqCst);
    }
    for _ in 0..10 {
        let err = read(&router, "obj", 0, 64).unwrap_err();
        assert!(matches!(err, Error::ReplicasUnavailable { .. }), "{err}");
    }
    let ejected = (0..2).filter(|&i| router.health(i).is_ejected()).count();
    assert_eq!(ejected, 1);
    // The survivor still serves once it recovers.
    for s in &switches {
        s.down.store(false, Ordering::SeqCst);
    }
    assert_eq!(read(&router, "obj", 0, 64).unwrap(), vec![7; 64]);
}

#[test]
fn all_slow_fails_within_the_deadline_naming_each_replica() {
    let reps = Replicas::new(3, |_| Some(vec![1; 64]));
    let stores: Vec<Arc<dyn Store>> = reps
        .local()
        .into_iter()
        .map(|s| Arc::new(SlowStore::new(s, Duration::from_secs(30))) as Arc<dyn Store>)
        .collect();
    let config = RouterConfig::from_options(&RoutingOptions {
        timeout_ms: Some(50.0),
        deadline_ms: 300.0,
        ..Default::default()
    })
    .unwrap();
    let router = Router::new(reps.names(), stores, config).unwrap();
    let t = Instant::now();
    let err = read(&router, "obj", 0, 64).unwrap_err();
    let elapsed = t.elapsed();
    let Error::ReplicasUnavailable { failures, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!(failures.len(), 3);
    assert!(
        failures.iter().all(|f| f.error.contains("timed out")),
        "{err}"
    );
    // Behaviour, not speed: the read gave up instead of waiting 30 s.
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    assert_eq!(router.stats(false).replicas[0].timeouts, 1);
}

/// Two replicas holding different bytes under one key, each 1 ms per read
/// with a 30 ms spike every third read, hedged after 5 ms: hedges win some
/// races and lose others.
fn spiky_pair(a: &[u8], b: &[u8]) -> (Replicas, Router) {
    let reps = Replicas::new(2, |i| Some(if i == 0 { a.to_vec() } else { b.to_vec() }));
    let stores: Vec<Arc<dyn Store>> = reps
        .local()
        .into_iter()
        .map(|s| {
            let mut slow = SlowStore::new(s, Duration::from_millis(1));
            slow.spike = Duration::from_millis(30);
            slow.spike_every = 3;
            Arc::new(slow) as Arc<dyn Store>
        })
        .collect();
    let config = RouterConfig::from_options(&RoutingOptions {
        hedge_after_ms: Some(HedgeAfterMs::Ms(5.0)),
        retry_budget_floor_per_s: 1000.0,
        ..Default::default()
    })
    .unwrap();
    let router = Router::new(reps.names(), stores, config).unwrap();
    (reps, router)
}

#[test]
fn a_hedged_chunk_comes_whole_from_one_replica() {
    // Two replicas with different bytes under one key; the primary is slow
    // on some reads, so hedges win some races and lose others.
    let a = pattern(0xAA, 64 * 1024);
    let b = pattern(0x55, 64 * 1024);
    let (_reps, router) = spiky_pair(&a, &b);
    let mut from = [0usize; 2];
    for i in 0..60u64 {
        let len = 8192;
        let offset = (i * 1000) % (64 * 1024 - len as u64);
        let got = read(&router, "obj", offset, len).unwrap();
        let o = offset as usize;
        if got == a[o..o + len] {
            from[0] += 1;
        } else if got == b[o..o + len] {
            from[1] += 1;
        } else {
            panic!("read {i} at {offset} is a mix of the two replicas");
        }
    }
    let stats = router.stats(false);
    let sent: u64 = stats.replicas.iter().map(|r| r.hedges_sent).sum();
    let won: u64 = stats.replicas.iter().map(|r| r.hedges_won).sum();
    assert!(sent > 0 && won > 0, "{stats:?}");
    assert!(from[0] > 0 && from[1] > 0, "{from:?}");
    assert!(stats.replicas.iter().map(|r| r.cancelled).sum::<u64>() > 0);
}

#[test]
fn adaptive_hedging_waits_for_samples_then_uses_the_percentile() {
    let reps = Replicas::new(2, |_| Some(vec![3; 256]));
    let stores: Vec<Arc<dyn Store>> = reps
        .local()
        .into_iter()
        .map(|s| {
            let mut slow = SlowStore::new(s, Duration::from_millis(1));
            slow.spike = Duration::from_millis(100);
            slow.spike_every = 25;
            Arc::new(slow) as Arc<dyn Store>
        })
        .collect();
    let config = RouterConfig::from_options(&RoutingOptions {
        hedge_after_ms: Some(HedgeAfterMs::Adaptive("p90".into())),
        retry_budget_floor_per_s: 1000.0,
        ..Default::default()
    })
    .unwrap();
    let router = Router::new(reps.names(), stores, config).unwrap();
    for _ in 0..100 {
        read(&router, "obj", 0, 256).unwrap();
    }
    let stats = router.stats(false);
    let sent: u64 = stats.replicas.iter().map(|r| r.hedges_sent).sum();
    assert!(sent > 0, "spikes after the warm-up were hedged: {stats:?}");
    assert!(stats.extra_request_ratio < 0.5, "{stats:?}");
    // A stats reset (monitoring) restarts the reported latencies but not
    // the hedge delay: it would otherwise go unhedged for the next samples.
    router.stats(true);
    assert_eq!(router.stats(false).latency.count, 0);
    let min = config::MIN_HEDGE_SAMPLES;
    let kept = |r: usize| router.replicas[r].health.latency_percentile(90.0, min);
    assert!(
        kept(0).is_some() || kept(1).is_some(),
        "the primary's p90 is kept"
    );
    let all = router.latency.lock().percentile(90.0, min);
    assert!(all.is_some(), "so is the p90 of all reads");
}

#[test]
fn the_retry_budget_stops_a_retry_storm() {
    let reps = Replicas::new(3, |_| Some(vec![9; 32]));
    let (switches, stores) = switchable(&reps);
    let config = RouterConfig::from_options(&RoutingOptions {
        // Never eject: every read fails on every replica.
        eject_after_failures: u32::MAX,
        retry_budget_ratio: 0.1,
        retry_budget_floor_per_s: 0.0,
        backoff_base_ms: 0.0,
        ..Default::default()
    })
    .unwrap();
    let router = Router::new(reps.names(), stores, config).unwrap();
    for s in &switches {
        s.down.store(true, Ordering::SeqCst);
    }
    let mut budget_errors = 0;
    for _ in 0..1000 {
        let err = read(&router, "obj", 0, 32).unwrap_err();
        budget_errors += err.to_string().contains("retry budget") as u32;
    }
    let stats = router.stats(false);
    let retries: u64 = stats.replicas.iter().map(|r| r.retries).sum();
    assert!(retries <= 110, "retries {retries} for 1000 reads");
    assert!(budget_errors > 800);
}

#[test]
fn p2c_prefers_the_faster_replica_and_affinity_sticks() {
    let reps = Replicas::new(2, |_| Some(vec![5; 128]));
    let mut stores = reps.local();
    stores[0] = Arc::new(SlowStore::new(
        Arc::clone(&stores[0]),
        Duration::from_millis(5),
    ));
    let p2c = RouterConfig::from_options(&RoutingOptions {
        policy: "p2c".into(),
        ..Default::default()
    })
    .unwrap();
    let router = Router::new(reps.names(), stores.clone(), p2c).unwrap();
    for _ in 0..200 {
        read_async(&router, "obj", 0, 0).unwrap();
    }
    let s = router.stats(false);
    assert!(
        s.replicas[1].requests > 4 * s.replicas[0].requests,
        "{:?}",
        s.replicas.iter().map(|r| r.requests).collect::<Vec<_>>()
    );
    let affinity = Router::new(reps.names(), stores, RouterConfig::default()).unwrap();
    for _ in 0..20 {
        read_async(&affinity, "obj", 0, 0).unwrap();
    }
    let s = affinity.stats(false);
    let p = affinity.placement().primary("obj");
    assert_eq!(s.replicas[p].requests, 20);
}

#[test]
fn bounded_load_overflows_a_busy_replica() {
    let reps = Replicas::new(4, |_| Some(vec![5; 128]));
    let stores: Vec<Arc<dyn Store>> = reps
        .local()
        .into_iter()
        .map(|s| Arc::new(SlowStore::new(s, Duration::from_millis(20))) as Arc<dyn Store>)
        .collect();
    let config = RouterConfig::from_options(&RoutingOptions {
        load_factor: Some(1.25),
        ..Default::default()
    })
    .unwrap();
    let router = Arc::new(Router::new(reps.names(), stores, config).unwrap());
    // 40 concurrent reads of one key: without bounded load all 40 hit its
    // primary; with it, the load spreads down the preference list.
    runtime::block_on(async {
        let tasks: Vec<_> = (0..40)
            .map(|_| {
                let router = Arc::clone(&router);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 128];
                    router.read_into("obj", 0, &mut buf).await
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    });
    let s = router.stats(false);
    let max = s.replicas.iter().map(|r| r.requests).max().unwrap();
    assert!(
        max < 40,
        "{:?}",
        s.replicas.iter().map(|r| r.requests).collect::<Vec<_>>()
    );
}

#[test]
fn stats_reset_and_serialise() {
    let reps = Replicas::new(2, |_| Some(vec![1; 10]));
    let router = Router::new(reps.names(), reps.local(), RouterConfig::default()).unwrap();
    read(&router, "obj", 0, 10).unwrap();
    let s = router.stats(true);
    assert_eq!((s.reads, s.bytes), (1, 10));
    let json = serde_json::to_string(&s).unwrap();
    assert!(json.contains("\"p99.9_ms\""), "{json}");
    assert_eq!(router.stats(false).reads, 0);
    assert_eq!(
        router
            .stats(false)
            .replicas
            .iter()
            .map(|r| r.requests)
            .sum::<u64>(),
        0
    );
}

#[test]
fn tallied_reads_fail_over_eject_and_count_exactly_like_untallied_ones() {
    let data = pattern(9, 4096);
    let reps = Replicas::new(3, |_| Some(data.clone()));
    let (switches, stores) = switchable(&reps);
    let config = RouterConfig::from_options(&RoutingOptions {
        eject_after_failures: 3,
        base_ejection_ms: 60_000.0,
        backoff_base_ms: 0.0,
        ..Default::default()
    })
    .unwrap();
    let router = Router::new(reps.names(), stores, config).unwrap();
    let primary = router.placement().primary("obj");
    let mut session = ReadSession::new(&router);
    let mut buf = vec![0u8; 100];
    // Healthy: samples wait in the tally, counters do not.
    for i in 0..10u64 {
        session
            .read_into_blocking("obj", i, &mut buf)
            .unwrap()
            .unwrap();
        assert_eq!(buf[..], data[i as usize..i as usize + 100]);
    }
    let s = router.stats(false);
    assert_eq!((s.reads, s.bytes), (10, 1000));
    assert_eq!(s.replicas[primary].requests, 10);
    assert!(s.latency.count <= 10);
    // The primary goes down: every read still succeeds (failover), the
    // failure streak ejects it after exactly 3, in the middle of a batch.
    switches[primary].down.store(true, Ordering::SeqCst);
    for i in 0..10u64 {
        session
            .read_into_blocking("obj", i, &mut buf)
            .unwrap()
            .unwrap();
        assert_eq!(buf[..], data[i as usize..i as usize + 100]);
    }
    assert!(router.health(primary).is_ejected());
    let s = router.stats(false);
    assert_eq!(s.replicas[primary].errors, 3);
    assert_eq!(s.replicas[primary].ejections, 1);
    let retries: u64 = s.replicas.iter().map(|r| r.retries).sum();
    assert_eq!(retries, 3, "one failover per failed first attempt");
    drop(session);
    // Flushed: every read and every completed attempt has its sample.
    let s = router.stats(false);
    assert_eq!((s.reads, s.read_errors), (20, 0));
    assert_eq!(s.latency.count, 20);
    let attempts: u64 = s.replicas.iter().map(|r| r.requests).sum();
    let sampled: u64 = s.replicas.iter().map(|r| r.latency.count).sum();
    assert_eq!((attempts, sampled), (23, 23));
    assert!(s.replicas.iter().all(|r| r.in_flight == 0));
}

#[test]
fn a_tally_flushes_by_count_and_on_a_peak() {
    let data = pattern(1, 8192);
    let reps = Replicas::new(1, |_| Some(data.clone()));
    let router = Router::new(reps.names(), reps.local(), RouterConfig::default()).unwrap();
    let mut session = ReadSession::new(&router);
    let mut buf = vec![0u8; 64];
    let n = TALLY_BATCH as u64 * 3 + 5;
    for i in 0..n {
        session
            .read_into_blocking("obj", i, &mut buf)
            .unwrap()
            .unwrap();
    }
    // Held: at most one batch (plus nothing else) is not yet in the figures.
    let s = router.stats(false);
    assert!(s.latency.count + TALLY_BATCH as u64 >= n, "{s:?}");
    // The first sample ever is a peak (above an estimate of 0): folded in
    // at once, so the estimate is never left at 0 by a batch.
    assert!(s.replicas[0].peak_ewma_ms > 0.0);
    drop(session);
    let s = router.stats(false);
    assert_eq!((s.latency.count, s.replicas[0].latency.count), (n, n));
}

fn read_object(router: &Router, key: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    runtime::block_on(router.read_object(key, &mut out)).map(|()| out)
}

#[test]
fn whole_object_reads_are_hedged_whole_from_one_replica() {
    // The same machinery as ranges: a slow primary is hedged, and the
    // object comes entirely from whichever replica won.
    let a = pattern(0xAA, 48 * 1024);
    let b = pattern(0x55, 48 * 1024);
    let (_reps, router) = spiky_pair(&a, &b);
    let mut from = [0usize; 2];
    for i in 0..40 {
        let got = read_object(&router, "obj").unwrap();
        if got == a {
            from[0] += 1;
        } else if got == b {
            from[1] += 1;
        } else {
            panic!(
                "object read {i} is a mix of the two replicas ({} bytes)",
                got.len()
            );
        }
    }
    let stats = router.stats(false);
    let won: u64 = stats.replicas.iter().map(|r| r.hedges_won).sum();
    assert!(won > 0 && from[0] > 0 && from[1] > 0, "{from:?} {stats:?}");
    assert_eq!(stats.reads, 40);
    assert_eq!(stats.bytes, 40 * 48 * 1024);
}

#[test]
fn whole_object_reads_fail_over_eject_and_spend_the_budget() {
    let data = pattern(7, 3000);
    let reps = Replicas::new(3, |_| Some(data.clone()));
    let (switches, stores) = switchable(&reps);
    let config = RouterConfig::from_options(&RoutingOptions {
        eject_after_failures: 3,
        backoff_base_ms: 0.0,
        retry_budget_ratio: 0.1,
        // An idle balance of a few tokens (floor x TTL) for the failovers.
        retry_budget_floor_per_s: 1.0,
        ..Default::default()
    })
    .unwrap();
    let router = Router::new(reps.names(), stores, config).unwrap();
    let primary = router.placement().primary("obj");
    switches[primary].down.store(true, Ordering::SeqCst);
    for _ in 0..10 {
        assert_eq!(read_object(&router, "obj").unwrap(), data);
    }
    let s = router.stats(false).replicas[primary].clone();
    assert_eq!((s.errors, s.ejections), (3, 1), "{s:?}");
    // Everyone down: the budget, not the replica count, bounds retries.
    for s in &switches {
        s.down.store(true, Ordering::SeqCst);
    }
    router.stats(true);
    for _ in 0..200 {
        assert!(read_object(&router, "obj").is_err());
    }
    let stats = router.stats(false);
    let retries: u64 = stats.replicas.iter().map(|r| r.retries).sum();
    assert!(retries <= 60, "retries {retries} for 200 failing reads");
    assert_eq!(stats.read_errors, 200);
}

/// The stores of `reps` with `key`'s primary stuck (a gray failure: it
/// accepts and never answers, never fails), and that primary's index.
fn stuck_primary(reps: &Replicas, key: &str) -> (usize, Vec<Arc<dyn Store>>) {
    let primary = Rendezvous::new(&reps.names(), None).unwrap().primary(key);
    let stores = reps
        .local()
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let delay = if i == primary { 3600 } else { 0 };
            Arc::new(SlowStore::new(s, Duration::from_secs(delay))) as Arc<dyn Store>
        })
        .collect();
    (primary, stores)
}

#[test]
fn a_replica_that_never_answers_is_ejected_after_losing_hedges() {
    // A gray failure: the primary accepts and never answers, never fails.
    // After `eject_after_failures` lost hedge races it is out, and reads go
    // straight to the others instead of each waiting the hedge delay.
    let data = pattern(5, 2048);
    let reps = Replicas::new(3, |_| Some(data.clone()));
    let (primary, stores) = stuck_primary(&reps, "obj");
    let config = RouterConfig::from_options(&RoutingOptions {
        hedge_after_ms: Some(HedgeAfterMs::Ms(5.0)),
        eject_after_failures: 3,
        base_ejection_ms: 60_000.0,
        ..Default::default()
    })
    .unwrap();
    let router = Router::new(reps.names(), stores, config).unwrap();
    for _ in 0..10 {
        assert_eq!(read_async(&router, "obj", 0, 2048).unwrap(), data);
        assert_eq!(read_object(&router, "obj").unwrap(), data);
    }
    let stats = router.stats(false);
    let won: u64 = stats.replicas.iter().map(|r| r.hedges_won).sum();
    let p = &stats.replicas[primary];
    assert!(p.ejected && p.ejections == 1, "{p:?}");
    assert_eq!(p.errors, 0, "losing a hedge is not an error: {p:?}");
    assert_eq!(won, 3, "hedged until ejected, then straight to the others");
    assert_eq!(stats.read_errors, 0);
}

#[test]
fn a_hedge_refused_by_the_budget_is_asked_again_not_never() {
    // The primary never answers and is never ejected; the budget starts
    // at 20 tokens (floor 2/s x TTL 10 s), so reads past the 20th find it
    // empty when their hedge is due. Each must wait for the floor to
    // refill it (about half a second), not for its deadline.
    let data = pattern(9, 1024);
    let reps = Replicas::new(2, |_| Some(data.clone()));
    let (primary, stores) = stuck_primary(&reps, "obj");
    let config = RouterConfig::from_options(&RoutingOptions {
        hedge_after_ms: Some(HedgeAfterMs::Ms(2.0)),
        eject_after_failures: u32::MAX,
        retry_budget_ratio: 0.001,
        retry_budget_floor_per_s: 2.0,
        deadline_ms: 20_000.0,
        ..Default::default()
    })
    .unwrap();
    let router = Router::new(reps.names(), stores, config).unwrap();
    for _ in 0..23 {
        assert_eq!(read_object(&router, "obj").unwrap(), data);
    }
    let stats = router.stats(false);
    assert_eq!(stats.read_errors, 0);
    assert!(!stats.replicas[primary].ejected);
    let won: u64 = stats.replicas.iter().map(|r| r.hedges_won).sum();
    assert_eq!(won, 23, "every read was served by a hedge: {stats:?}");
}

#[test]
fn a_lone_replica_hedges_within_itself_and_the_loser_is_cancelled() {
    // One endpoint, 1 ms per read with a 40 ms spike on every fourth read
    // it serves: the hedge (a second request to the same replica) is a
    // later read of the store, not a spike, and wins.
    let data = pattern(5, 4096);
    let reps = Replicas::new(1, |_| Some(data.clone()));
    let mut slow = SlowStore::new(reps.local().remove(0), Duration::from_millis(1));
    slow.spike = Duration::from_millis(40);
    slow.spike_every = 4;
    let config = RouterConfig::from_options(&RoutingOptions {
        hedge_after_ms: Some(HedgeAfterMs::Ms(5.0)),
        ..Default::default()
    })
    .unwrap();
    let router = Router::new(reps.names(), vec![Arc::new(slow) as Arc<dyn Store>], config).unwrap();
    let mut buf = vec![0u8; 1000];
    for i in 0..24u64 {
        runtime::block_on(router.read_into("obj", i, &mut buf)).unwrap();
        assert_eq!(buf[..], data[i as usize..i as usize + 1000]);
    }
    let s = router.stats(false);
    let r = &s.replicas[0];
    assert_eq!(s.read_errors, 0);
    assert!(r.hedges_sent >= 1 && r.hedges_won >= 1, "{r:?}");
    assert_eq!(
        r.cancelled, r.hedges_won,
        "each winning hedge cancelled its primary"
    );
    assert!(!r.ejected && r.consecutive_failures == 0, "{r:?}");
    assert!(r.hedges_sent <= 24 / 2, "the budget bounds hedges: {r:?}");
}

/// Says its reads wait on a network peer; otherwise `inner`.
#[derive(Debug)]
struct Networked(Arc<dyn Store>);

impl Store for Networked {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn size<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64>> {
        self.0.size(key)
    }
    fn read_into<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<()>> {
        self.0.read_into(key, offset, buf)
    }
    fn waits_on_network(&self) -> bool {
        true
    }
}

/// Accepts every request and never answers (within a test's life).
#[derive(Debug)]
struct Silent;

impl Store for Silent {
    fn name(&self) -> &str {
        "silent"
    }
    fn size<'a>(&'a self, _key: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(0)
        })
    }
    fn read_into<'a>(
        &'a self,
        _key: &'a str,
        _offset: u64,
        _buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        })
    }
}

#[test]
fn network_replicas_are_hedged_by_default_and_a_silent_one_is_ejected() {
    // No routing options. The key's first choice never answers, the other
    // replica does: every read and size succeeds after one (fallback)
    // hedge delay, and the silent one is ejected after the default number
    // of lost races.
    let data = pattern(8, 4096);
    let reps = Replicas::new(2, |_| Some(data.clone()));
    let names = reps.names();
    let silent = Rendezvous::new(&names, None).unwrap().primary("obj");
    let healthy = reps.local().remove(1 - silent);
    let mut stores: Vec<Arc<dyn Store>> = vec![Arc::new(Networked(healthy))];
    stores.insert(silent, Arc::new(Networked(Arc::new(Silent))));
    let router = Router::new(names, stores, RouterConfig::default()).unwrap();
    let mut buf = vec![0u8; 100];
    let reads = config::DEFAULT_EJECT_AFTER_FAILURES as u64 + 3;
    for i in 0..reads {
        runtime::block_on(router.read_into("obj", i, &mut buf)).unwrap();
        assert_eq!(buf[..], data[i as usize..i as usize + 100]);
    }
    assert_eq!(runtime::block_on(router.size("obj")).unwrap(), 4096);
    let s = router.stats(false);
    let (lost, won) = (&s.replicas[silent], &s.replicas[1 - silent]);
    assert!(lost.ejected && lost.errors == 0, "{lost:?}");
    assert_eq!(
        won.hedges_won,
        config::DEFAULT_EJECT_AFTER_FAILURES as u64,
        "hedged until ejected, then straight to the healthy one: {won:?}"
    );
    assert_eq!(s.read_errors, 0);
}

#[test]
fn a_lone_network_replica_is_hedged_within_itself_by_default() {
    // No routing options, one endpoint that waits on the network, a 60 ms
    // spike on every 25th read it serves (4%, under the p95): the default
    // (adaptive) delay
    // hedges the spikes to the same replica, and the trace says so. A lone
    // local replica under the same defaults is never hedged.
    let data = pattern(6, 4096);
    let reps = Replicas::new(1, |_| Some(data.clone()));
    let mut slow = SlowStore::new(reps.local().remove(0), Duration::from_millis(1));
    slow.spike = Duration::from_millis(60);
    slow.spike_every = 25;
    let store: Arc<dyn Store> = Arc::new(Networked(Arc::new(slow)));
    let router = Router::new(reps.names(), vec![store], RouterConfig::default()).unwrap();
    let reads = 5 * config::MIN_HEDGE_SAMPLES;
    router.trace_reads(reads as usize);
    let mut buf = vec![0u8; 1000];
    for i in 0..reads {
        runtime::block_on(router.read_into("obj", i, &mut buf)).unwrap();
        assert_eq!(buf[..], data[i as usize..i as usize + 1000]);
    }
    let s = router.stats(false);
    let r = &s.replicas[0];
    assert_eq!(s.read_errors, 0);
    assert!(
        r.hedges_won >= 1,
        "spikes were hedged within the replica: {r:?}"
    );
    assert!(
        r.cancelled >= r.hedges_won,
        "each winning hedge cancelled its primary: {r:?}"
    );
    let trace = router.take_trace();
    assert_eq!(trace.len(), reads as usize);
    let won: Vec<&ReadTrace> = trace.iter().filter(|t| t.winner == Winner::Hedge).collect();
    assert_eq!(won.len() as u64, r.hedges_won, "{trace:?}");
    for t in won {
        assert_eq!(
            (t.hedge, t.replica, t.hedge_replica),
            (HedgeNote::Sent, 0, Some(0))
        );
        let sent = t.hedge_sent_us.unwrap();
        assert!(t.start_us <= sent && sent <= t.end_us, "{t:?}");
    }

    let local = Router::new(reps.names(), reps.local(), RouterConfig::default()).unwrap();
    for i in 0..reads {
        runtime::block_on(local.read_into("obj", i, &mut buf)).unwrap();
    }
    assert_eq!(local.stats(false).replicas[0].hedges_sent, 0);
}

#[test]
fn the_trace_is_off_by_default_and_bounded() {
    let data = pattern(7, 4096);
    let reps = Replicas::new(2, |_| Some(data.clone()));
    let router = Router::new(reps.names(), reps.local(), RouterConfig::default()).unwrap();
    let mut buf = vec![0u8; 100];
    runtime::block_on(router.read_into("obj", 0, &mut buf)).unwrap();
    assert!(router.take_trace().is_empty(), "off until asked for");
    router.trace_reads(3);
    for i in 0..5 {
        runtime::block_on(router.read_into("obj", i, &mut buf)).unwrap();
    }
    assert_eq!(runtime::block_on(router.size("obj")).unwrap(), 4096);
    let trace = router.take_trace();
    assert_eq!(trace.len(), 3, "{trace:?}");
    let primary = router.preference_list("obj").iter().next().unwrap();
    for t in &trace {
        assert_eq!(
            (t.kind, t.replica, t.hedge),
            ("range", primary, HedgeNote::Off)
        );
        assert_eq!(t.winner, Winner::Primary);
        assert!(t.start_us <= t.end_us);
    }
    router.trace_reads(0);
    runtime::block_on(router.read_into("obj", 0, &mut buf)).unwrap();
    assert!(router.take_trace().is_empty());
}

/// Answers sizes after `delay`; reads as `inner`. Waits on the network.
#[derive(Debug)]
struct SlowSize {
    inner: Arc<dyn Store>,
    delay: Duration,
}

impl Store for SlowSize {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn size<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            self.inner.size(key).await
        })
    }
    fn read_into<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<()>> {
        self.inner.read_into(key, offset, buf)
    }
    fn waits_on_network(&self) -> bool {
        true
    }
}

#[test]
fn a_lone_replica_hedges_sizes_within_itself_only_when_asked() {
    // A plan stats its objects in a burst that queues at a lone server:
    // by default those sizes are not hedged to the same server; with
    // `hedge_after_ms` given they are.
    let data = pattern(9, 4096);
    let reps = Replicas::new(1, |_| Some(data.clone()));
    for (hedge_after_ms, hedges) in [(None, 0), (Some(HedgeAfterMs::Ms(5.0)), 1)] {
        let store: Arc<dyn Store> = Arc::new(SlowSize {
            inner: reps.local().remove(0),
            delay: Duration::from_millis(150),
        });
        let mut options = RoutingOptions::default();
        if hedge_after_ms.is_some() {
            options.hedge_after_ms = hedge_after_ms;
        }
        let config = RouterConfig::from_options(&options).unwrap();
        let router = Router::new(reps.names(), vec![store], config).unwrap();
        assert_eq!(runtime::block_on(router.size("obj")).unwrap(), 4096);
        assert_eq!(router.stats(false).replicas[0].hedges_sent, hedges);
    }
}

/// A network replica that reports `extra` more bytes than the object has:
/// in its metadata (`size`, `info`), and with `consistent` also in what a
/// read of its bytes says (`read_size`). Its bytes are true.
#[derive(Debug)]
struct LyingSize {
    inner: Arc<dyn Store>,
    extra: u64,
    consistent: bool,
}

impl Store for LyingSize {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn size<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move { Ok(self.inner.size(key).await? + self.extra) })
    }
    fn read_size<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64>> {
        match self.consistent {
            true => self.size(key),
            false => self.inner.size(key),
        }
    }
    fn read_into<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<()>> {
        self.inner.read_into(key, offset, buf)
    }
    fn waits_on_network(&self) -> bool {
        true
    }
}

/// `n` network replicas holding the same 4 KiB "obj"; the key's first
/// choice lies about its size. Returns the router and the liar's index.
fn with_a_liar(n: usize, consistent: bool) -> (Replicas, Router, usize) {
    let data = pattern(9, 4096);
    let reps = Replicas::new(n, |_| Some(data.clone()));
    let names = reps.names();
    let liar = Rendezvous::new(&names, None).unwrap().primary("obj");
    let stores = reps
        .local()
        .into_iter()
        .enumerate()
        .map(|(i, s)| match i == liar {
            true => Arc::new(LyingSize {
                inner: s,
                extra: 1000,
                consistent,
            }) as Arc<dyn Store>,
            false => Arc::new(Networked(s)) as Arc<dyn Store>,
        })
        .collect();
    let router = Router::new(names, stores, RouterConfig::default()).unwrap();
    (reps, router, liar)
}

#[test]
fn a_size_its_own_bytes_contradict_is_outvoted_and_its_replica_ejected() {
    let (_reps, router, liar) = with_a_liar(2, false);
    assert_eq!(runtime::block_on(router.size("obj")).unwrap(), 4096);
    let info = runtime::block_on(router.info("obj")).unwrap();
    assert_eq!(info.size, 4096);
    let s = router.stats(false);
    let (lying, honest) = (&s.replicas[liar], &s.replicas[1 - liar]);
    assert!(lying.size_disagreements == 1 && lying.ejected, "{lying:?}");
    assert_eq!(honest.size_disagreements, 0, "{honest:?}");
    // Ejected, it is no longer asked first: the next size is the honest
    // replica's alone, and nothing more is held against the liar.
    assert_eq!(runtime::block_on(router.size("obj")).unwrap(), 4096);
    assert_eq!(router.stats(false).replicas[liar].size_disagreements, 1);
}

#[test]
fn a_consistent_liar_fails_the_size_with_two_replicas_and_is_outvoted_by_three() {
    let (_reps, router, _) = with_a_liar(2, true);
    let err = runtime::block_on(router.size("obj")).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, Error::ReplicasUnavailable { .. }) && text.contains("disagree"),
        "{text}"
    );
    assert!(text.contains("4096") && text.contains("5096"), "{text}");
    let (_reps, router, liar) = with_a_liar(3, true);
    assert_eq!(runtime::block_on(router.size("obj")).unwrap(), 4096);
    let s = router.stats(false);
    assert_eq!(s.replicas[liar].size_disagreements, 1, "{s:?}");
    let others: u64 = s.replicas.iter().map(|r| r.size_disagreements).sum();
    assert_eq!(others, 1, "only the liar is counted: {s:?}");
}
