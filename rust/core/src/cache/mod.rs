//! The node cache: blocks of remote objects on a local disk, shared by
//! every process on the machine through the file system alone (no shared
//! memory to leak). [`CachedStore`] is a [`Store`] in front of the router:
//! Prefetcher → CachedStore → Router → backends.
//!
//! * Blocks: objects are cut into aligned blocks of `cache_block_bytes`
//!   (a smaller object is one block). A hit `pread`s the wanted pages of
//!   the block file straight into the caller's buffer and checks each
//!   page's CRC32C ([`block`]); a bad block is deleted, counted and fetched
//!   again, never delivered.
//! * Keys: a block's id hashes the replica set, the object key, the
//!   object's version (ETag or last-modified + size from a HEAD, inode +
//!   mtime + size for local files, the manifest's CRCs when there is one)
//!   and the block's index. A rewritten object gets new ids; its old blocks
//!   age out. With `check_version` off, the version first seen is trusted
//!   (kept in the cache directory, so no HEAD at all after the first run).
//! * Single flight across processes ([`flight`]): the process holding a
//!   block's lock fetches it; the others wait for the block file. A waiter
//!   whose filler died finds the lock free (the kernel dropped it) and
//!   fetches itself.
//! * Hard bound ([`ledger`]): a block is accounted and room made under the
//!   cache-wide lock before it is renamed into place. Files being written
//!   are outside the bound: the directory holds at most `cache_bytes` plus
//!   one block per fill in flight.
//! * Crash safety: a block is written to a temporary file (held under a
//!   `flock` while it is written) and renamed into place whole; a process
//!   killed mid-fill leaves a temporary file that no read ever looks at and
//!   that the next process to start removes (once it is [`flight::DEAD_AFTER`] old).
//! * Faults are not errors: when the cache directory cannot be used
//!   (disk full, read-only, deleted and not re-creatable) reads go to the
//!   replicas and `bypasses` counts it. When no replica answers, cached
//!   blocks are still served, under the object's last known version.

pub mod block;
pub mod flight;
pub mod ledger;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::hash::Hasher;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::CacheOptions;
use crate::error::{Error, Result};
use crate::fork::{ForkMutex, PerProcess};
use crate::manifest::Manifest;
use crate::route::Router;
use crate::store::{BoxFuture, Listing, ObjectMeta, Store, Tally};
use block::Found;
use flight::FlightLock;
use ledger::Pending;

pub use crate::evict::BlockId;

/// The policy a ledger falls back to.
pub const DEFAULT_POLICY: &str = "s3fifo";

/// How long a process trusts an object's version before asking again
/// (with `check_version` on): at most one HEAD per object per second.
pub const VERSION_TTL: Duration = Duration::from_secs(1);

/// First and longest pause between looks while another process fills a
/// block.
const WAIT_FIRST: Duration = Duration::from_micros(200);
const WAIT_MAX: Duration = Duration::from_millis(10);

/// The files of a cache directory.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Layout { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn blocks(&self) -> PathBuf {
        self.root.join("blocks")
    }
    pub fn block(&self, id: BlockId) -> PathBuf {
        let hex = format!("{id:016x}");
        self.blocks().join(&hex[..2]).join(hex)
    }
    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }
    pub fn objects(&self) -> PathBuf {
        self.root.join("objects")
    }
    pub fn ledger(&self) -> PathBuf {
        self.root.join("ledger.json")
    }
    pub fn journal(&self) -> PathBuf {
        self.root.join("ledger.journal")
    }
    pub fn ledger_lock(&self) -> PathBuf {
        self.root.join("ledger.lock")
    }
    pub fn flight_lock(&self) -> PathBuf {
        self.root.join("flight.lock")
    }
    /// A fresh temporary file name, unique across processes and threads.
    pub fn temp_path(&self, what: &str) -> PathBuf {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        self.tmp()
            .join(format!("{what}.{}.{n}", std::process::id()))
    }
    fn create(&self) -> io::Result<()> {
        for d in [self.blocks(), self.tmp(), self.objects()] {
            fs::create_dir_all(d)?;
        }
        Ok(())
    }
}

/// The cache's counters, per process (the metrics merge processes).
#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    hit_bytes: AtomicU64,
    fill_bytes: AtomicU64,
    fills: AtomicU64,
    waits: AtomicU64,
    evictions: AtomicU64,
    evicted_bytes: AtomicU64,
    corrupt_blocks: AtomicU64,
    bypasses: AtomicU64,
    stale_versions: AtomicU64,
    version_checks: AtomicU64,
    dead_fills_removed: AtomicU64,
}

/// The counters' values, in [`Counters::NAMES`] order.
#[derive(Debug, Clone, Copy, Default)]
struct CounterValues([u64; 13]);

impl CounterValues {
    fn minus(&self, earlier: &CounterValues) -> CounterValues {
        CounterValues(std::array::from_fn(|i| {
            self.0[i].saturating_sub(earlier.0[i])
        }))
    }
}

impl Counters {
    /// The names the metrics know them by (the keys of [`CacheStats`]).
    const NAMES: [&'static str; 13] = [
        "hits",
        "misses",
        "hit_bytes",
        "fill_bytes",
        "fills",
        "waits",
        "evictions",
        "evicted_bytes",
        "corrupt_blocks",
        "bypasses",
        "stale_versions",
        "version_checks",
        "dead_fills_removed",
    ];

    fn values(&self) -> CounterValues {
        let all = [
            &self.hits,
            &self.misses,
            &self.hit_bytes,
            &self.fill_bytes,
            &self.fills,
            &self.waits,
            &self.evictions,
            &self.evicted_bytes,
            &self.corrupt_blocks,
            &self.bypasses,
            &self.stale_versions,
            &self.version_checks,
            &self.dead_fills_removed,
        ];
        CounterValues(all.map(|a| a.load(Ordering::Relaxed)))
    }
}

impl crate::telemetry::CacheCounters for CachedStore {
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Counters::NAMES
            .into_iter()
            .zip(self.counts().values().0)
            .collect()
    }
}

/// What the cache did in this process, and what it holds on the node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheStats {
    /// Block reads served from the cache.
    pub hits: u64,
    /// Block reads that were not in the cache.
    pub misses: u64,
    /// Bytes delivered from the cache.
    pub hit_bytes: u64,
    /// Bytes this process fetched from the replicas for the cache.
    pub fill_bytes: u64,
    /// Blocks this process fetched and admitted.
    pub fills: u64,
    /// Misses that waited for another process (or read) filling the block.
    pub waits: u64,
    /// Blocks this process evicted to admit others, and their bytes.
    pub evictions: u64,
    pub evicted_bytes: u64,
    /// Cached blocks that failed their checksum: deleted, fetched again.
    pub corrupt_blocks: u64,
    /// Reads that went to the replicas because the cache directory could
    /// not be used (full, read-only, gone).
    pub bypasses: u64,
    /// Version checks that failed on every replica, answered with the last
    /// known version (cached blocks still served).
    pub stale_versions: u64,
    /// HEADs sent to learn an object's version.
    pub version_checks: u64,
    /// Temporary files of dead fillers removed by this process.
    pub dead_fills_removed: u64,
    /// On the node, as the ledger says: blocks held and their bytes.
    pub resident_blocks: u64,
    pub resident_bytes: u64,
    /// The bound.
    pub capacity_bytes: u64,
}

/// An object's size and version, as its blocks are keyed by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ObjectVersion {
    size: u64,
    version: String,
}

/// The blocks of an object: `(index, start, bytes)` covering a range.
fn blocks_of(size: u64, block_bytes: u64, offset: u64, len: u64) -> Vec<(u64, u64, u64)> {
    if len == 0 {
        return Vec::new();
    }
    let first = offset / block_bytes;
    let last = (offset + len - 1) / block_bytes;
    (first..=last)
        .map(|i| {
            let start = i * block_bytes;
            (i, start, (start + block_bytes).min(size) - start)
        })
        .collect()
}

/// A stable 64-bit hash (FNV-1a: the same in every process and release).
fn stable_hash(parts: &[&[u8]]) -> u64 {
    struct Fnv(u64);
    impl Hasher for Fnv {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for b in bytes {
                self.0 ^= u64::from(*b);
                self.0 = self.0.wrapping_mul(0x100_0000_01b3);
            }
        }
    }
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    for p in parts {
        h.write(&(p.len() as u64).to_le_bytes());
        h.write(p);
    }
    h.finish()
}

/// The node cache in front of a store (the router).
#[derive(Debug)]
pub struct CachedStore {
    inner: Arc<dyn Store>,
    /// Asked for versions, in the key's preference order (the router's
    /// stores sit under chaos and verification, which keep no versions).
    heads: Heads,
    manifest: Option<Arc<Manifest>>,
    layout: Layout,
    /// Names the replica set: two datasets under one key never share blocks.
    namespace: String,
    capacity_bytes: u64,
    block_bytes: u64,
    check_version: bool,
    policy: String,
    versions: ForkMutex<HashMap<String, (ObjectVersion, Instant)>>,
    /// This process's fills not yet in the ledger (a forked child has none).
    pending: ForkMutex<Pending>,
    /// This process's copy of the ledger.
    mirror: ledger::Mirror,
    /// Per process: a forked child counts from zero (what it reports is
    /// its own, never its parent's again).
    counters: PerProcess<Counters>,
    /// The counters as `stats(reset=True)` last took them: the counters
    /// themselves never go back, as the metrics' `_total`s must not.
    baseline: ForkMutex<CounterValues>,
    warned: AtomicBool,
    name: String,
}

/// Where versions come from: each replica's own store, in preference order.
#[derive(Debug)]
pub struct Heads {
    pub replicas: Vec<Arc<dyn Store>>,
    pub router: Option<Arc<Router>>,
}

impl Heads {
    /// How long one replica may take to say an object's version: the
    /// router's attempt timeout, else its deadline.
    fn attempt_limit(&self) -> Duration {
        match &self.router {
            Some(r) => r.config().timeout.unwrap_or(r.config().deadline),
            None => Duration::from_secs(30),
        }
    }

    fn wait_limit(&self) -> Duration {
        match &self.router {
            Some(r) => r.config().deadline,
            None => Duration::from_secs(30),
        }
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta> {
        let order: Vec<usize> = match &self.router {
            Some(r) if r.len() == self.replicas.len() => {
                let mut prefs: Vec<usize> = r.preference_list(key).iter().collect();
                prefs.sort_by_key(|&i| r.health(i).is_ejected());
                prefs
            }
            _ => (0..self.replicas.len()).collect(),
        };
        let mut failures = Vec::new();
        let mut all_not_found = true;
        for i in order {
            let store = &self.replicas[i];
            match tokio::time::timeout(self.attempt_limit(), store.info(key)).await {
                Ok(Ok(meta)) => return Ok(meta),
                Ok(Err(e @ Error::InvalidArgument(_))) => return Err(e),
                Ok(Err(e)) => {
                    all_not_found &= matches!(e, Error::NotFound { .. });
                    failures.push(crate::error::ReplicaFailure {
                        replica: store.name().to_owned(),
                        error: e.to_string(),
                    });
                }
                Err(_) => {
                    all_not_found = false;
                    failures.push(crate::error::ReplicaFailure {
                        replica: store.name().to_owned(),
                        error: "version check timed out".into(),
                    });
                }
            }
        }
        if all_not_found {
            return Err(Error::NotFound { path: key.into() });
        }
        Err(Error::ReplicasUnavailable {
            path: key.into(),
            failures,
        })
    }
}

impl CachedStore {
    /// A cache in `options.cache_dir` in front of `inner`. The directory
    /// is created; temporary files of dead fillers in it are removed. A
    /// directory that cannot be created is not an error: reads bypass.
    pub fn new(
        inner: Arc<dyn Store>,
        heads: Heads,
        manifest: Option<Arc<Manifest>>,
        options: &CacheOptions,
        namespace: String,
    ) -> Result<Self> {
        options.check()?;
        let dir = options
            .cache_dir
            .as_deref()
            .ok_or_else(|| Error::invalid("the cache needs a cache_dir"))?;
        let cache = CachedStore {
            name: inner.name().to_owned(),
            inner,
            heads,
            manifest,
            layout: Layout::new(dir),
            namespace,
            capacity_bytes: options.cache_bytes,
            block_bytes: options.cache_block_bytes,
            check_version: options.check_version,
            policy: options.cache_policy.clone(),
            versions: ForkMutex::per_process(HashMap::new),
            pending: ForkMutex::per_process(Pending::default),
            mirror: ledger::Mirror::default(),
            counters: PerProcess::with(Counters::default()),
            baseline: ForkMutex::per_process(CounterValues::default),
            warned: AtomicBool::new(false),
        };
        match cache.layout.create() {
            Ok(()) => {
                let removed = ledger::sweep_dead_fills(&cache.layout);
                cache
                    .counts()
                    .dead_fills_removed
                    .fetch_add(removed, Ordering::Relaxed);
            }
            Err(e) => cache.bypassed("create the cache directory", &e),
        }
        Ok(cache)
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn stats(&self, reset: bool) -> CacheStats {
        let now = self.counts().values();
        let since = {
            let mut baseline = self.baseline.lock();
            let since = now.minus(&baseline);
            if reset {
                *baseline = now;
            }
            since
        };
        let (resident_blocks, resident_bytes) = ledger::resident(&self.layout);
        CacheStats {
            hits: since.0[0],
            misses: since.0[1],
            hit_bytes: since.0[2],
            fill_bytes: since.0[3],
            fills: since.0[4],
            waits: since.0[5],
            evictions: since.0[6],
            evicted_bytes: since.0[7],
            corrupt_blocks: since.0[8],
            bypasses: since.0[9],
            stale_versions: since.0[10],
            version_checks: since.0[11],
            dead_fills_removed: since.0[12],
            resident_blocks,
            resident_bytes,
            capacity_bytes: self.capacity_bytes,
        }
    }

    /// Removes every cached block (of every process on the node) and
    /// forgets the versions this process learned.
    pub fn clear(&self) -> Result<()> {
        self.versions.lock().clear();
        *self.pending.lock() = Pending::default();
        self.mirror.forget();
        self.layout
            .create()
            .and_then(|()| ledger::clear(&self.layout))
            .map_err(|source| Error::Io {
                context: format!("clearing the cache in {:?}", self.layout.root()),
                source,
            })?;
        let _ = fs::remove_dir_all(self.layout.objects());
        let _ = fs::create_dir_all(self.layout.objects());
        Ok(())
    }

    /// Counts a read that could not use the cache; says why once per
    /// process (a warning on stderr: the read itself succeeds).
    fn bypassed(&self, what: &str, e: &io::Error) {
        self.counts().bypasses.fetch_add(1, Ordering::Relaxed);
        if !self.warned.swap(true, Ordering::Relaxed) {
            eprintln!(
                "feedline: the node cache in {:?} could not {what} ({e}); reads go to the replicas",
                self.layout.root()
            );
        }
    }

    fn object_id(&self, key: &str) -> u64 {
        stable_hash(&[self.namespace.as_bytes(), key.as_bytes()])
    }

    /// The block's identity as its file header carries it, and its id.
    fn block_ident(&self, key: &str, v: &ObjectVersion, index: u64) -> (Vec<u8>, BlockId) {
        let ident = format!(
            "{}\0{key}\0{}\0{}\0{}\0{index}",
            self.namespace, v.version, v.size, self.block_bytes
        )
        .into_bytes();
        let id = stable_hash(&[&ident]);
        (ident, id)
    }

    fn remembered(&self, key: &str) -> Option<ObjectVersion> {
        let versions = self.versions.lock();
        let (v, at) = versions.get(key)?;
        (!self.check_version || at.elapsed() < VERSION_TTL).then(|| v.clone())
    }

    fn remember(&self, key: &str, v: &ObjectVersion) {
        let mut versions = self.versions.lock();
        versions.insert(key.to_owned(), (v.clone(), Instant::now()));
    }

    fn object_file(&self, key: &str) -> PathBuf {
        self.layout
            .objects()
            .join(format!("{:016x}", self.object_id(key)))
    }

    /// The last version seen on this node (any process), kept in the cache
    /// directory; the key is stored too, so a hash collision is a miss.
    fn stored_version(&self, key: &str) -> Option<ObjectVersion> {
        #[derive(Deserialize)]
        struct Stored {
            key: String,
            size: u64,
            version: String,
        }
        let bytes = fs::read(self.object_file(key)).ok()?;
        let s: Stored = serde_json::from_slice(&bytes).ok()?;
        (s.key == key).then_some(ObjectVersion {
            size: s.size,
            version: s.version,
        })
    }

    fn store_version(&self, key: &str, v: &ObjectVersion) {
        let body = serde_json::json!({"key": key, "size": v.size, "version": v.version});
        let tmp = self.layout.temp_path("object");
        let written = File::create(&tmp)
            .and_then(|mut f| {
                let _alive = mark(&f)?;
                io::Write::write_all(&mut f, body.to_string().as_bytes())
            })
            .and_then(|()| fs::rename(&tmp, self.object_file(key)));
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
    }

    /// The object's size and version: from the manifest (no request),
    /// from memory while fresh, from the cache directory when versions are
    /// not checked, else from a HEAD. When no replica answers the HEAD, the
    /// last version seen on the node stands in.
    async fn version(&self, key: &str) -> Result<ObjectVersion> {
        if let Some(v) = self.manifest_version(key) {
            return Ok(v);
        }
        if let Some(v) = self.remembered(key) {
            return Ok(v);
        }
        if !self.check_version {
            if let Some(v) = self.stored_version(key) {
                self.remember(key, &v);
                return Ok(v);
            }
        }
        self.counts().version_checks.fetch_add(1, Ordering::Relaxed);
        match self.heads.head(key).await {
            Ok(meta) => {
                let version = meta.version.unwrap_or_else(|| match meta.modified_unix_ns {
                    Some(ns) => format!("{ns:x}-{:x}", meta.size),
                    None => format!("size-{:x}", meta.size),
                });
                let v = ObjectVersion {
                    size: meta.size,
                    version,
                };
                if self.stored_version(key).as_ref() != Some(&v) {
                    self.store_version(key, &v);
                    // Stores that keep files open (local replicas) look
                    // again when asked for the size.
                    let _ = self.inner.size(key).await;
                }
                self.remember(key, &v);
                Ok(v)
            }
            Err(e @ (Error::ReplicasUnavailable { .. } | Error::Timeout { .. })) => {
                match self.stored_version(key) {
                    Some(v) => {
                        self.counts().stale_versions.fetch_add(1, Ordering::Relaxed);
                        self.remember(key, &v);
                        Ok(v)
                    }
                    None => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    fn manifest_version(&self, key: &str) -> Option<ObjectVersion> {
        let sums = self.manifest.as_ref()?.get(key)?;
        let crcs: Vec<u8> = sums.crc32c.iter().flat_map(|c| c.to_le_bytes()).collect();
        Some(ObjectVersion {
            size: sums.size,
            version: format!("crc32c-{:08x}", crc32c::crc32c(&crcs)),
        })
    }

    /// Reads `dst` from the cached block, if it is there and intact. A
    /// corrupt block is deleted and counted.
    fn read_cached(&self, id: BlockId, ident: &[u8], block: u64, at: u64, dst: &mut [u8]) -> bool {
        let path = self.layout.block(id);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(_) => return false,
        };
        match block::read(&file, ident, block, at, dst) {
            Ok(Found::Hit) => true,
            Ok(Found::Missing) => false,
            Ok(Found::Corrupt(_)) | Err(_) => {
                // Deleted only if it is still the file we read: a filler
                // may have renamed a good one over it meanwhile.
                if same_file(&file, &path) {
                    let _ = fs::remove_file(&path);
                }
                self.counts().corrupt_blocks.fetch_add(1, Ordering::Relaxed);
                self.pending().removed.push(id);
                false
            }
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock()
    }

    fn counts(&self) -> &Counters {
        let Ok(counters) = self
            .counters
            .get(|_inherited| Ok::<_, std::convert::Infallible>(Counters::default()));
        counters
    }

    fn hit(&self, id: BlockId, bytes: usize) {
        let counts = self.counts();
        counts.hits.fetch_add(1, Ordering::Relaxed);
        counts.hit_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        let mut pending = self.pending();
        if pending.hits.len() >= ledger::MAX_PENDING_HITS {
            pending.hits.clear();
        }
        pending.hits.push(id);
    }

    /// One block's part of a read: from the cache, else filled once for
    /// the node (this read fetches it, or waits for whoever does).
    async fn read_block(
        &self,
        key: &str,
        v: &ObjectVersion,
        (index, start, bytes): (u64, u64, u64),
        at: u64,
        dst: &mut [u8],
    ) -> Result<()> {
        let (ident, id) = self.block_ident(key, v, index);
        if self.read_cached(id, &ident, bytes, at, dst) {
            self.hit(id, dst.len());
            return Ok(());
        }
        self.counts().misses.fetch_add(1, Ordering::Relaxed);
        let mut pause = WAIT_FIRST;
        let mut waited = false;
        // A filler that is alive but slow is waited for as long as one
        // read may take (the router's deadline); then this read fetches
        // for itself.
        let give_up = Instant::now() + self.heads.wait_limit();
        loop {
            let lock = match self.flight_lock(id) {
                Ok(lock) => lock,
                Err(e) => {
                    self.bypassed("lock a block", &e);
                    return self.inner.read_into(key, start + at, dst).await;
                }
            };
            if let Some(lock) = lock {
                // Filled between the first look and taking the lock?
                if self.read_cached(id, &ident, bytes, at, dst) {
                    self.hit(id, dst.len());
                    return Ok(());
                }
                return self
                    .fill(key, id, &ident, start, bytes, at, dst, lock)
                    .await;
            }
            if !waited {
                waited = true;
                self.counts().waits.fetch_add(1, Ordering::Relaxed);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(WAIT_MAX);
            if self.read_cached(id, &ident, bytes, at, dst) {
                self.hit(id, dst.len());
                return Ok(());
            }
            if Instant::now() > give_up {
                return self.inner.read_into(key, start + at, dst).await;
            }
        }
    }

    /// The block's flight lock; the directory is re-created once if it
    /// was deleted under the cache.
    fn flight_lock(&self, id: BlockId) -> io::Result<Option<FlightLock>> {
        match FlightLock::try_lock(&self.layout.flight_lock(), id) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.layout.create()?;
                FlightLock::try_lock(&self.layout.flight_lock(), id)
            }
            other => other,
        }
    }

    /// Fetches the whole block (straight into `dst` when the read wants
    /// all of it), hands the caller its part and admits the block.
    #[allow(clippy::too_many_arguments)]
    async fn fill(
        &self,
        key: &str,
        id: BlockId,
        ident: &[u8],
        start: u64,
        bytes: u64,
        at: u64,
        dst: &mut [u8],
        lock: FlightLock,
    ) -> Result<()> {
        let whole = at == 0 && dst.len() as u64 == bytes;
        let mut scratch = Vec::new();
        let payload: &[u8] = if whole {
            self.inner.read_into(key, start, dst).await?;
            dst
        } else {
            scratch.resize(bytes as usize, 0);
            self.inner.read_into(key, start, &mut scratch).await?;
            let from = at as usize;
            dst.copy_from_slice(&scratch[from..from + dst.len()]);
            &scratch
        };
        let counts = self.counts();
        counts.fills.fetch_add(1, Ordering::Relaxed);
        counts.fill_bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Err(e) = self.admit(id, ident, payload) {
            self.bypassed("store a block", &e);
        }
        drop(lock);
        Ok(())
    }

    fn admit(&self, id: BlockId, ident: &[u8], payload: &[u8]) -> io::Result<()> {
        let tmp = self.layout.temp_path(&format!("{id:016x}"));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .or_else(|e| match e.kind() {
                io::ErrorKind::NotFound => {
                    self.layout.create()?;
                    OpenOptions::new().write(true).create_new(true).open(&tmp)
                }
                _ => Err(e),
            });
        let result = file.and_then(|mut file| {
            let _alive = mark(&file)?;
            let bytes = block::write(&mut file, ident, payload)?;
            let pending = std::mem::take(&mut *self.pending());
            let done = ledger::admit(
                &self.layout,
                &self.policy,
                &self.mirror,
                self.capacity_bytes,
                id,
                &tmp,
                bytes,
                pending,
            )?;
            let counts = self.counts();
            counts
                .evictions
                .fetch_add(done.evicted_blocks, Ordering::Relaxed);
            counts
                .evicted_bytes
                .fetch_add(done.evicted_bytes, Ordering::Relaxed);
            Ok(())
        });
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// The whole read from the cache alone, on the calling thread: `None`
    /// unless the version is known and every block is cached.
    fn read_hits(&self, key: &str, offset: u64, buf: &mut [u8]) -> Option<()> {
        let v = self
            .manifest_version(key)
            .or_else(|| self.remembered(key))?;
        if offset + buf.len() as u64 > v.size {
            return None;
        }
        let end = offset + buf.len() as u64;
        let blocks = blocks_of(v.size, self.block_bytes, offset, buf.len() as u64);
        let mut found = Vec::with_capacity(blocks.len());
        let mut rest = buf;
        let mut pos = offset;
        for (index, start, bytes) in blocks {
            let take = ((start + bytes).min(end) - pos) as usize;
            let (dst, tail) = rest.split_at_mut(take);
            let (ident, id) = self.block_ident(key, &v, index);
            if !self.read_cached(id, &ident, bytes, pos - start, dst) {
                return None;
            }
            found.push((id, take));
            rest = tail;
            pos += take as u64;
        }
        for (id, bytes) in found {
            self.hit(id, bytes);
        }
        Some(())
    }

    async fn read(&self, key: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let v = self.version(key).await?;
        let end = offset + buf.len() as u64;
        if end > v.size {
            return Err(Error::ShortRead {
                path: key.into(),
                offset,
                wanted_bytes: buf.len() as u64,
                got_bytes: v.size.saturating_sub(offset),
            });
        }
        let mut parts = Vec::new();
        let mut rest = buf;
        for b @ (_, start, bytes) in blocks_of(v.size, self.block_bytes, offset, end - offset) {
            let from = offset.max(start);
            let take = ((start + bytes).min(end) - from) as usize;
            let (dst, tail) = rest.split_at_mut(take);
            rest = tail;
            parts.push(self.read_block(key, &v, b, from - start, dst));
        }
        futures::future::try_join_all(parts).await.map(|_| ())
    }
}

impl Drop for CachedStore {
    fn drop(&mut self) {
        let pending = std::mem::take(&mut *self.pending());
        let _ = ledger::flush(&self.layout, &self.policy, &self.mirror, pending);
    }
}

fn mark(file: &File) -> io::Result<flight::Alive> {
    flight::mark_alive(file)
}

/// Whether the open `file` is what `path` names now.
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    }
}

impl Store for CachedStore {
    fn name(&self) -> &str {
        &self.name
    }

    fn size<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move { Ok(self.version(key).await?.size) })
    }

    fn read_into<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.read(key, offset, buf))
    }

    fn read_into_blocking(&self, key: &str, offset: u64, buf: &mut [u8]) -> Option<Result<()>> {
        self.read_hits(key, offset, buf).map(Ok)
    }

    fn size_blocking(&self, key: &str) -> Option<Result<u64>> {
        let v = self
            .manifest_version(key)
            .or_else(|| self.remembered(key))?;
        Some(Ok(v.size))
    }

    fn fold_tally(&self, tally: &mut Tally) {
        self.inner.fold_tally(tally)
    }

    fn info<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ObjectMeta>> {
        self.inner.info(key)
    }

    fn waits_on_network(&self) -> bool {
        self.inner.waits_on_network()
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Listing>> {
        self.inner.list(prefix)
    }
}

#[cfg(test)]
mod tests;
