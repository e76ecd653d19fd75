//! The cache over real files and real processes: helper processes are this
//! test binary run again on one ignored test (`helper_process`), told what
//! to do through the environment.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::Duration;

use super::*;
use crate::runtime;
use crate::store::LocalStore;

/// A local replica that logs every fetch (`key offset len` per line, one
/// `write` on an `O_APPEND` file, so processes never interleave a line)
/// and can be slowed down to widen races.
#[derive(Debug)]
struct Logged {
    inner: LocalStore,
    log: PathBuf,
    delay: Duration,
    fetches: AtomicUsize,
}

impl Store for Logged {
    fn name(&self) -> &str {
        "logged"
    }
    fn size<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64>> {
        self.inner.size(key)
    }
    fn info<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ObjectMeta>> {
        self.inner.info(key)
    }
    fn read_into<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            let line = format!("{key} {offset} {} {}\n", buf.len(), std::process::id());
            let mut f = OpenOptions::new()
                .append(true)
                .create(true)
                .open(&self.log)
                .unwrap();
            f.write_all(line.as_bytes()).unwrap();
            tokio::time::sleep(self.delay).await;
            self.inner.read_into(key, offset, buf).await
        })
    }
}

struct Rig {
    data: tempfile::TempDir,
    cache: tempfile::TempDir,
}

impl Rig {
    fn new() -> Rig {
        Rig {
            data: tempfile::tempdir().unwrap(),
            cache: tempfile::tempdir().unwrap(),
        }
    }

    fn write(&self, key: &str, len: usize, seed: u8) -> Vec<u8> {
        let bytes: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        // A new version is written aside and renamed over (a new inode).
        let tmp = self.data.path().join(format!(".{key}.tmp"));
        std::fs::write(&tmp, &bytes).unwrap();
        std::fs::rename(&tmp, self.data.path().join(key)).unwrap();
        bytes
    }

    fn log(&self) -> PathBuf {
        self.cache.path().join("fetches.log")
    }

    fn options(&self, capacity: u64, block: u64) -> CacheOptions {
        CacheOptions {
            cache_dir: Some(self.cache.path().join("c").display().to_string()),
            cache_bytes: capacity,
            cache_block_bytes: block,
            ..CacheOptions::default()
        }
    }

    fn store(&self, options: &CacheOptions, delay: Duration) -> (CachedStore, Arc<Logged>) {
        store_over(self.data.path(), &self.log(), options, delay)
    }
}

fn store_over(
    data: &Path,
    log: &Path,
    options: &CacheOptions,
    delay: Duration,
) -> (CachedStore, Arc<Logged>) {
    let logged = Arc::new(Logged {
        inner: LocalStore::rooted(data).unwrap(),
        log: log.to_owned(),
        delay,
        fetches: AtomicUsize::new(0),
    });
    let heads = Heads {
        replicas: vec![Arc::new(LocalStore::rooted(data).unwrap())],
        router: None,
    };
    let inner = Arc::clone(&logged) as Arc<dyn Store>;
    let cache = CachedStore::new(inner, heads, None, options, "test".into()).unwrap();
    (cache, logged)
}

fn read(cache: &CachedStore, key: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    runtime::block_on(cache.read_into(key, offset, &mut buf))?;
    Ok(buf)
}

const KIB: u64 = 1024;

#[test]
fn a_second_read_is_a_hit_with_the_same_bytes() {
    let rig = Rig::new();
    let data = rig.write("a", 300_000, 1);
    let (cache, origin) = rig.store(&rig.options(1 << 20, 128 * KIB), Duration::ZERO);
    for (off, len) in [(0, 300_000), (5, 4096), (131_000, 2000), (299_990, 10)] {
        assert_eq!(
            read(&cache, "a", off, len).unwrap(),
            data[off as usize..][..len]
        );
    }
    // Three blocks, each fetched once; every later read was a hit.
    assert_eq!(origin.fetches.load(Ordering::SeqCst), 3);
    let s = cache.stats(false);
    assert_eq!((s.fills, s.misses, s.hits), (3, 3, 4), "{s:?}");
    assert_eq!(s.fill_bytes, 300_000);
    assert!(
        s.resident_bytes > 300_000 && s.resident_blocks == 3,
        "{s:?}"
    );
    // The blocking path serves hits without the executor.
    let mut buf = vec![0u8; 1000];
    assert!(cache.read_into_blocking("a", 10, &mut buf).is_some());
    assert_eq!(buf, data[10..1010]);
    // Past the end: a short read, never truncated data.
    assert!(matches!(
        read(&cache, "a", 299_000, 2000),
        Err(Error::ShortRead { .. })
    ));
    // A new process (a new store over the same directory) starts warm.
    drop(cache);
    let (again, origin) = rig.store(&rig.options(1 << 20, 128 * KIB), Duration::ZERO);
    assert_eq!(read(&again, "a", 0, 300_000).unwrap(), data);
    assert_eq!(origin.fetches.load(Ordering::SeqCst), 0);
}

#[test]
fn the_directory_never_exceeds_the_bound() {
    let rig = Rig::new();
    let block = 64 * KIB;
    let objects: Vec<Vec<u8>> = (0..40)
        .map(|i| rig.write(&format!("o{i}"), 100_000, i))
        .collect();
    // Half of the data set (two blocks per object, headers included).
    let capacity = 40 * 2 * (block + 4096) / 2;
    let (cache, _) = rig.store(&rig.options(capacity, block), Duration::ZERO);
    let cache = Arc::new(cache);
    let root = cache.layout().root().to_owned();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, root) = (Arc::clone(&stop), root.clone());
        std::thread::spawn(move || {
            let mut worst = 0;
            let mut samples = 0;
            while !stop.load(Ordering::SeqCst) && samples < 100_000 {
                let on_disk =
                    ledger::dir_bytes(&root.join("blocks")) + ledger::dir_bytes(&root.join("tmp"));
                worst = worst.max(on_disk);
                samples += 1;
            }
            (worst, samples)
        })
    };
    // Eight reads in flight at a time, three epochs in a shuffled order.
    let concurrency = 8;
    for epoch in 0..3u64 {
        let mut order: Vec<usize> = (0..objects.len()).collect();
        order.sort_by_key(|i| stable_hash(&[&epoch.to_le_bytes(), &i.to_le_bytes()]));
        let reads = order.iter().map(|&i| {
            let cache = Arc::clone(&cache);
            async move {
                let key = format!("o{i}");
                let mut buf = vec![0u8; 100_000];
                cache.read_into(&key, 0, &mut buf).await.map(|()| (i, buf))
            }
        });
        let done: Vec<Result<(usize, Vec<u8>)>> = runtime::block_on(async {
            use futures::StreamExt;
            Ok::<_, Error>(
                futures::stream::iter(reads)
                    .buffer_unordered(concurrency)
                    .collect()
                    .await,
            )
        })
        .unwrap();
        for r in done {
            let (i, buf) = r.unwrap();
            assert_eq!(buf, objects[i]);
        }
    }
    stop.store(true, Ordering::SeqCst);
    let (worst, samples) = sampler.join().unwrap();
    // The stated bound: the capacity plus one block file per fill in
    // flight (each read here fills at most two blocks at once).
    let overshoot = 2 * concurrency as u64 * (block + 4096);
    assert!(samples > 0);
    assert!(
        worst <= capacity + overshoot,
        "{worst} > {capacity} + {overshoot}"
    );
    let s = cache.stats(false);
    assert!(s.resident_bytes <= capacity, "{s:?}");
    assert!(ledger::dir_bytes(&root.join("blocks")) <= capacity);
    assert!(s.evictions > 0 && s.hits > 0, "{s:?}");
}

#[test]
fn a_flipped_byte_is_detected_deleted_and_fetched_again() {
    let rig = Rig::new();
    let data = rig.write("a", 200_000, 3);
    let (cache, origin) = rig.store(&rig.options(1 << 20, 1 << 20), Duration::ZERO);
    assert_eq!(read(&cache, "a", 0, 200_000).unwrap(), data);
    let blocks = cache.layout().blocks();
    let shard = std::fs::read_dir(&blocks).unwrap().next().unwrap().unwrap();
    let file = std::fs::read_dir(shard.path())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() - 5;
    bytes[at] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    assert_eq!(read(&cache, "a", 0, 200_000).unwrap(), data);
    let s = cache.stats(false);
    assert_eq!((s.corrupt_blocks, s.fills), (1, 2), "{s:?}");
    assert_eq!(origin.fetches.load(Ordering::SeqCst), 2);
    // The fetched-again block is intact: a hit now.
    assert_eq!(read(&cache, "a", 199_000, 1000).unwrap(), data[199_000..]);
    assert_eq!(cache.stats(false).hits, 1);
}

#[test]
fn a_rewritten_object_is_served_new_unless_versions_go_unchecked() {
    let rig = Rig::new();
    let old = rig.write("a", 50_000, 1);
    let checked = rig.options(1 << 20, 1 << 20);
    let (cache, _) = rig.store(&checked, Duration::ZERO);
    assert_eq!(read(&cache, "a", 0, 50_000).unwrap(), old);
    let new = rig.write("a", 60_000, 2);
    std::thread::sleep(VERSION_TTL + Duration::from_millis(50));
    assert_eq!(read(&cache, "a", 0, 60_000).unwrap(), new);
    // Unchecked: the version first seen on the node stands, with no HEAD.
    let unchecked = CacheOptions {
        check_version: false,
        ..checked
    };
    let (trusting, _) = rig.store(&unchecked, Duration::ZERO);
    assert_eq!(read(&trusting, "a", 0, 60_000).unwrap(), new);
    assert_eq!(trusting.stats(false).version_checks, 0);
    rig.write("a", 60_000, 3);
    let (trusting, _) = rig.store(&unchecked, Duration::ZERO);
    assert_eq!(read(&trusting, "a", 0, 60_000).unwrap(), new);
}

#[test]
fn cached_blocks_are_served_when_no_replica_answers() {
    let rig = Rig::new();
    let data = rig.write("a", 70_000, 5);
    rig.write("b", 10, 5);
    let options = rig.options(1 << 20, 1 << 20);
    let (cache, _) = rig.store(&options, Duration::ZERO);
    assert_eq!(read(&cache, "a", 0, 70_000).unwrap(), data);
    drop(cache);
    // Every replica gone: a store whose replica root no longer exists.
    #[derive(Debug)]
    struct Dead;
    impl Store for Dead {
        fn name(&self) -> &str {
            "dead"
        }
        fn size<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64>> {
            Box::pin(async move { Err(dead(key)) })
        }
        fn read_into<'a>(
            &'a self,
            k: &'a str,
            _: u64,
            _: &'a mut [u8],
        ) -> BoxFuture<'a, Result<()>> {
            Box::pin(async move { Err(dead(k)) })
        }
    }
    fn dead(key: &str) -> Error {
        Error::ReplicasUnavailable {
            path: key.into(),
            failures: vec![],
        }
    }
    let heads = Heads {
        replicas: vec![Arc::new(Dead)],
        router: None,
    };
    let cache = CachedStore::new(Arc::new(Dead), heads, None, &options, "test".into()).unwrap();
    assert_eq!(read(&cache, "a", 0, 70_000).unwrap(), data);
    assert_eq!(cache.stats(false).stale_versions, 1);
    assert!(matches!(
        read(&cache, "b", 0, 10),
        Err(Error::ReplicasUnavailable { .. })
    ));
}

#[test]
fn a_deleted_or_unwritable_directory_bypasses_without_errors() {
    let rig = Rig::new();
    let data = rig.write("a", 70_000, 5);
    let (cache, _) = rig.store(&rig.options(1 << 20, 32 * KIB), Duration::ZERO);
    assert_eq!(read(&cache, "a", 0, 70_000).unwrap(), data);
    std::fs::remove_dir_all(cache.layout().root()).unwrap();
    // Deleted while running: re-created, and filled again.
    assert_eq!(read(&cache, "a", 0, 70_000).unwrap(), data);
    assert_eq!(read(&cache, "a", 0, 70_000).unwrap(), data);
    let s = cache.stats(false);
    assert_eq!((s.fills, s.hits), (6, 3), "{s:?}");
    // A file where the directory should be: nothing can be created; every
    // read goes to the replica and is counted.
    let blocked = rig.cache.path().join("file");
    std::fs::write(&blocked, b"x").unwrap();
    let options = CacheOptions {
        cache_dir: Some(blocked.join("sub").display().to_string()),
        ..rig.options(1 << 20, 32 * KIB)
    };
    let (cache, _) = rig.store(&options, Duration::ZERO);
    assert_eq!(read(&cache, "a", 0, 70_000).unwrap(), data);
    assert!(cache.stats(false).bypasses >= 1);
}

#[test]
fn clear_removes_every_block() {
    let rig = Rig::new();
    let data = rig.write("a", 70_000, 5);
    let (cache, origin) = rig.store(&rig.options(1 << 20, 32 * KIB), Duration::ZERO);
    read(&cache, "a", 0, 70_000).unwrap();
    cache.clear().unwrap();
    assert_eq!(cache.stats(false).resident_bytes, 0);
    assert_eq!(ledger::dir_bytes(&cache.layout().blocks()), 0);
    assert_eq!(read(&cache, "a", 0, 70_000).unwrap(), data);
    assert_eq!(origin.fetches.load(Ordering::SeqCst), 6);
}

// ---- processes ----------------------------------------------------------

const ROLE: &str = "FEEDLINE_CACHE_TEST_ROLE";

/// This test binary, run on `helper_process` only.
fn helper(rig: &Rig, role: &str, delay_ms: u64) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "cache::tests::helper_process",
            "--ignored",
            "--nocapture",
        ])
        .env(ROLE, role)
        .env("FEEDLINE_CACHE_TEST_DATA", rig.data.path())
        .env("FEEDLINE_CACHE_TEST_CACHE", rig.cache.path())
        .env("FEEDLINE_CACHE_TEST_DELAY_MS", delay_ms.to_string())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

const HELPER_BLOCK: u64 = 64 * KIB;

/// What a helper process does: `read` reads objects o0..o5 whole (each
/// three blocks) with all blocks in flight at once, checking every byte;
/// `litter` leaves a temporary block file as a filler killed mid-write
/// does, and kills itself.
#[test]
#[ignore = "run by the other tests as a separate process"]
fn helper_process() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let data = PathBuf::from(std::env::var("FEEDLINE_CACHE_TEST_DATA").unwrap());
    let root = PathBuf::from(std::env::var("FEEDLINE_CACHE_TEST_CACHE").unwrap());
    let delay: u64 = std::env::var("FEEDLINE_CACHE_TEST_DELAY_MS")
        .unwrap()
        .parse()
        .unwrap();
    let options = CacheOptions {
        cache_dir: Some(root.join("c").display().to_string()),
        cache_bytes: 1 << 30,
        cache_block_bytes: HELPER_BLOCK,
        ..CacheOptions::default()
    };
    let (cache, _) = store_over(
        &data,
        &root.join("fetches.log"),
        &options,
        Duration::from_millis(delay),
    );
    match role.as_str() {
        "read" => {
            let reads = (0..6).map(|i| {
                let (cache, data) = (&cache, &data);
                async move {
                    let key = format!("o{i}");
                    let mut buf = vec![0u8; 3 * HELPER_BLOCK as usize];
                    cache.read_into(&key, 0, &mut buf).await?;
                    let want = std::fs::read(data.join(&key)).unwrap();
                    assert!(buf == want, "{key} differs");
                    Ok::<_, Error>(())
                }
            });
            runtime::block_on(futures::future::try_join_all(reads)).unwrap();
            let s = cache.stats(false);
            std::fs::write(
                root.join(format!("stats.{}", std::process::id())),
                serde_json::to_string(&s).unwrap(),
            )
            .unwrap();
        }
        "litter" => {
            let layout = cache.layout();
            let tmp = layout.temp_path("0123456789abcdef");
            let mut f = File::create(&tmp).unwrap();
            let _alive = mark(&f).unwrap();
            f.write_all(b"FLBLOCK1 half a block").unwrap();
            // SAFETY: raising a signal at ourselves.
            unsafe { libc::raise(libc::SIGKILL) };
        }
        other => panic!("unknown role {other}"),
    }
}

fn helper_rig() -> (Rig, Vec<Vec<u8>>) {
    let rig = Rig::new();
    let objects = (0..6)
        .map(|i| rig.write(&format!("o{i}"), 3 * HELPER_BLOCK as usize, i))
        .collect();
    (rig, objects)
}

/// Each fetch in the log, as (key, offset), with how often it was made.
fn fetch_counts(rig: &Rig) -> HashMap<(String, u64), usize> {
    let log = std::fs::read_to_string(rig.log()).unwrap_or_default();
    let mut counts = HashMap::new();
    for line in log.lines() {
        let mut parts = line.split(' ');
        let key = parts.next().unwrap().to_owned();
        let offset: u64 = parts.next().unwrap().parse().unwrap();
        *counts.entry((key, offset)).or_insert(0) += 1;
    }
    counts
}

fn wait_ok(mut child: Child) {
    for _ in 0..600 {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "helper failed: {status}");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("helper did not finish in 30 s");
}

#[test]
fn processes_fetch_each_block_once_between_them() {
    let (rig, _) = helper_rig();
    // Slow fetches (50 ms) so the processes overlap on every block.
    let children: Vec<Child> = (0..4).map(|_| helper(&rig, "read", 50)).collect();
    for c in children {
        wait_ok(c);
    }
    let counts = fetch_counts(&rig);
    assert_eq!(counts.len(), 18, "{counts:?}");
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    // Someone waited for another's fill (the fetches overlapped).
    let mut waits = 0;
    for e in std::fs::read_dir(rig.cache.path()).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("stats.") {
            let s: CacheStats = serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
            waits += s.waits;
        }
    }
    assert!(waits > 0);
}

#[test]
fn a_filler_killed_mid_block_is_taken_over_and_nothing_torn_is_read() {
    let (rig, _) = helper_rig();
    // The first filler hangs in its fetches (60 s); kill it once it holds
    // the blocks' locks.
    let mut slow = helper(&rig, "read", 60_000);
    for _ in 0..400 {
        if fetch_counts(&rig).len() == 18 {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    assert_eq!(
        fetch_counts(&rig).len(),
        18,
        "the slow filler never started"
    );
    let waiter = helper(&rig, "read", 0);
    std::thread::sleep(Duration::from_millis(300));
    slow.kill().unwrap();
    slow.wait().unwrap();
    wait_ok(waiter);
    // Each block fetched twice: by the dead filler, then by its successor.
    let counts = fetch_counts(&rig);
    assert!(counts.values().all(|&n| n == 2), "{counts:?}");
    // A filler killed while writing leaves a temporary file; the next
    // process removes it, and it was never read as a block.
    let mut litter = helper(&rig, "litter", 0);
    litter.wait().unwrap();
    let tmp = rig.cache.path().join("c").join("tmp");
    let left: Vec<PathBuf> = std::fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(left.len(), 1);
    flight::age(&left[0], flight::DEAD_AFTER);
    let options = CacheOptions {
        cache_dir: Some(rig.cache.path().join("c").display().to_string()),
        cache_bytes: 1 << 30,
        cache_block_bytes: HELPER_BLOCK,
        ..CacheOptions::default()
    };
    let (cache, _) = rig.store(&options, Duration::ZERO);
    assert_eq!(cache.stats(false).dead_fills_removed, 1);
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
}

#[test]
fn the_policy_is_kept_in_the_ledger_and_chosen_by_name() {
    let rig = Rig::new();
    rig.write("a", 70_000, 5);
    for (name, tag) in [("lru", "\"Lru\""), ("s3fifo", "\"S3Fifo\"")] {
        let options = CacheOptions {
            cache_policy: name.into(),
            ..rig.options(1 << 20, 32 * KIB)
        };
        let (cache, _) = rig.store(&options, Duration::ZERO);
        read(&cache, "a", 0, 70_000).unwrap();
        read(&cache, "a", 0, 70_000).unwrap();
        drop(cache);
        let ledger = std::fs::read_to_string(Layout::new(options.cache_dir.unwrap()).ledger());
        let ledger = ledger.unwrap();
        assert!(ledger.contains(tag), "{name}: {ledger}");
        // The blocks stay accounted across the change of policy.
        assert!(ledger.contains("\"used_bytes\":"), "{ledger}");
    }
    let bad = CacheOptions {
        cache_policy: "fifo".into(),
        ..rig.options(1 << 20, 32 * KIB)
    };
    let e = bad.check().unwrap_err().to_string();
    assert!(e.contains("cache_policy") && e.contains("fifo"), "{e}");
}

/// Admissions per second with `resident` blocks already held (a
/// measurement, not a check: `cargo test --release -p feedline-core --lib
/// cache::tests::admission_rate -- --ignored --nocapture`).
#[test]
#[ignore]
fn admission_rate() {
    const TIMED: u64 = 2_000;
    for resident in [1_000u64, 10_000, 25_000] {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        layout.create().unwrap();
        let capacity = resident + TIMED / 2;
        let mirror = ledger::Mirror::default();
        let admit_one = |id: BlockId| {
            let tmp = layout.temp_path("bench");
            std::fs::write(&tmp, b"x").unwrap();
            let pending = ledger::Pending::default();
            ledger::admit(
                &layout,
                DEFAULT_POLICY,
                &mirror,
                capacity,
                id,
                &tmp,
                1,
                pending,
            )
            .unwrap();
        };
        for id in 0..resident {
            admit_one(id);
        }
        let started = std::time::Instant::now();
        for id in resident..resident + TIMED {
            admit_one(id);
        }
        let per_s = TIMED as f64 / started.elapsed().as_secs_f64();
        println!("resident_blocks={resident} admissions_per_s={per_s:.0}");
    }
}
