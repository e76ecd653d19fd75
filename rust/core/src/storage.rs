//! `Storage`: what one `feedline.FileSystem` reads through. It owns the
//! store stack built from a [`StorageConfig`] (local roots today; the router,
//! chaos and remote backends plug in here) and offers the three read shapes
//! the Python API needs: one range into a buffer, many ranges in parallel,
//! and a prefetching stream.

use std::sync::Arc;

use crate::cache::{CacheStats, CachedStore, Heads};
pub use crate::config::StorageConfig;
use crate::error::{Error, ReplicaFailure, Result};
use crate::layers::{wrap_replicas, ReplicaFaultStats, ReplicaLayers};
use crate::plan::{build_plan_with, resolve_slice, PlanItem};
use crate::prefetch::{Stream, StreamConfig};
use crate::route::{Router, RouterConfig, RouterStats};
use crate::runtime;
use crate::store::secrets::{self as remote, StorageOptions};
use crate::store::{fallback, BoxFuture, Listing, LocalStore, ObjectMeta, ReadSession, Store};
use futures::StreamExt;

/// Ranges per thread below which `read_many` does not bother to split.
const MIN_RANGES_PER_THREAD: usize = 64;

/// Bytes a `read_many` thread takes from the shared queue at once.
const BATCH_BYTES: usize = 256 << 10;

/// How many async reads `read_many` keeps in flight on stores without a
/// blocking path (remote stores).
pub const DEFAULT_CONCURRENCY: usize = 64;

/// Ranges on one key closer than this are read as one request by
/// `read_many` on remote stores: a request costs far more than a few KiB.
pub const COALESCE_GAP_BYTES: u64 = 4 << 10;
/// Largest merged request, so merging never serialises a big read.
pub const MAX_COALESCED_BYTES: u64 = 4 << 20;

/// The URL scheme of a replica root (`"s3"` for `s3://b/x`), or None for a
/// plain local path.
pub fn replica_scheme(root: &str) -> Option<&str> {
    let (scheme, _) = root.split_once("://")?;
    let mut chars = scheme.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    ok.then_some(scheme)
}

/// Opens one replica root: a local directory, a URL with a native backend
/// (HTTP(S), S3, GCS, Azure), or any other protocol through the registered
/// fallback (fsspec, from the Python bindings).
pub fn open_replica(root: &str, options: &StorageOptions) -> Result<Arc<dyn Store>> {
    match replica_scheme(root) {
        None => Ok(Arc::new(LocalStore::rooted(root)?)),
        Some("file") => Ok(Arc::new(LocalStore::rooted(&root["file://".len()..])?)),
        #[cfg(not(loom))]
        Some(s) if remote::is_native_scheme(&s.to_ascii_lowercase()) => Ok(Arc::new(
            crate::store::RemoteStore::open(root, options)?,
        )),
        Some(scheme) => match fallback::opener() {
            Some(open) => open(root, options),
            None => Err(Error::invalid(format!(
                "unknown protocol {scheme:?} in replica {:?}: native ones are http, https, s3, gs, az (others need fsspec, through the Python package)",
                remote::collect_secrets(None, options).redact(root)
            ))),
        },
    }
}

/// How a whole-object read goes (see [`Storage::whole_read`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WholeRead {
    /// The size is known: read exactly this many bytes from offset 0.
    Sized(u64),
    /// One request brings the bytes and their size.
    OneRequest,
}

/// One request of `read_many`: fill `buf` from `offset` of `key`.
pub struct RangeRequest<'a> {
    pub key: &'a str,
    pub offset: u64,
    pub buf: &'a mut [u8],
}

#[derive(Debug)]
pub struct Storage {
    /// Every read goes through the router: failover, hedging and the
    /// figures, whatever the number of replicas.
    router: Arc<Router>,
    /// What reads go through: the node cache in front of the router when
    /// the cache is on, else the router itself.
    store: Arc<dyn Store>,
    cache: Option<Arc<CachedStore>>,
    /// Each replica's own store, under chaos and verification: listing
    /// asks these directly (there are no bytes to verify or hedge).
    replicas: Vec<Arc<dyn Store>>,
    config: StorageConfig,
    layers: ReplicaLayers,
    /// Keeps the router in the process's metrics while this lives.
    _metrics: crate::telemetry::RouterRegistration,
    /// Keeps the cache in them, and its counts once it is dropped.
    _cache_metrics: Option<crate::telemetry::CacheRegistration>,
}

impl Storage {
    /// Builds one store per replica root and a [`Router`] over them; every
    /// read goes through the router. No replicas: the local filesystem,
    /// paths as given (still through a one-replica router, for stats).
    pub fn new(config: StorageConfig) -> Result<Self> {
        config.check()?;
        let router_config = config.router_config()?;
        let (names, stores): (Vec<String>, Vec<Arc<dyn Store>>) = if config.replicas.is_empty() {
            let local: Arc<dyn Store> = Arc::new(LocalStore::unrooted());
            (vec![local.name().to_owned()], vec![local])
        } else {
            let stores = config
                .replicas
                .iter()
                .enumerate()
                .map(|(i, r)| open_replica(&r.url, &config.replica_options(i)))
                .collect::<Result<Vec<_>>>()?;
            // Names from the stores: URLs without credentials. One URL on
            // two endpoints is two replicas: the later ones get their index.
            let mut names: Vec<String> = Vec::with_capacity(stores.len());
            for (i, store) in stores.iter().enumerate() {
                let name = store.name().to_owned();
                match names.contains(&name) {
                    true => names.push(format!("{name}#{i}")),
                    false => names.push(name),
                }
            }
            (names, stores)
        };
        // Chaos and verification wrap each replica's store, under the
        // router: an injected fault or a checksum mismatch is that replica's
        // error, so the router fails over, hedges or ejects as for a real one.
        let replicas = stores.clone();
        let (stores, layers) = wrap_replicas(stores, &config.chaos, config.manifest.as_ref())?;
        let mut namespace = names.clone();
        namespace.sort();
        let router = Arc::new(Router::new(names, stores, router_config)?);
        let cache = match &config.cache.cache_dir {
            None => None,
            Some(_) => Some(Arc::new(CachedStore::new(
                Arc::clone(&router) as Arc<dyn Store>,
                Heads {
                    replicas: replicas.clone(),
                    router: Some(Arc::clone(&router)),
                },
                layers.manifest().cloned(),
                &config.cache,
                namespace.join("\n"),
            )?)),
        };
        let cache_metrics = cache.as_ref().map(|c| {
            let counters = Arc::clone(c) as Arc<dyn crate::telemetry::CacheCounters>;
            crate::telemetry::register_cache(&counters)
        });
        let store = match &cache {
            Some(c) => Arc::clone(c) as Arc<dyn Store>,
            None => Arc::clone(&router) as Arc<dyn Store>,
        };
        Ok(Storage {
            _metrics: crate::telemetry::register_router(&router),
            _cache_metrics: cache_metrics,
            router,
            store,
            cache,
            replicas,
            config,
            layers,
        })
    }

    /// A `Storage` over one store, routed with the default settings.
    pub fn from_store(store: Arc<dyn Store>) -> Self {
        let router = Router::new(
            vec![store.name().to_owned()],
            vec![Arc::clone(&store)],
            RouterConfig::default(),
        )
        .expect("one named replica with default settings is a valid router");
        let router = Arc::new(router);
        Storage {
            _metrics: crate::telemetry::register_router(&router),
            _cache_metrics: None,
            replicas: vec![store],
            store: Arc::clone(&router) as Arc<dyn Store>,
            cache: None,
            router,
            config: StorageConfig::default(),
            layers: ReplicaLayers::default(),
        }
    }

    /// Per-replica and end-to-end figures; `reset` clears them after
    /// reading.
    pub fn stats(&self, reset: bool) -> Option<RouterStats> {
        match reset {
            // Exported counters keep what the reset clears.
            true => Some(crate::telemetry::reset_router(&self.router)),
            false => Some(self.router.stats(false)),
        }
    }

    /// The end-to-end read latencies behind `stats`.
    pub fn latency_histogram(&self) -> Option<crate::metrics::LatencyHistogram> {
        Some(self.router.latency_histogram())
    }

    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// What chaos injected into and verification checked on each replica.
    pub fn fault_stats(&self) -> Vec<ReplicaFaultStats> {
        self.layers.fault_stats()
    }

    /// The store every read goes through (the node cache when it is on,
    /// else the router).
    pub fn store(&self) -> Arc<dyn Store> {
        Arc::clone(&self.store)
    }

    /// The node cache, when configured.
    pub fn cache(&self) -> Option<&Arc<CachedStore>> {
        self.cache.as_ref()
    }

    /// The node cache's figures; `None` when it is off.
    pub fn cache_stats(&self, reset: bool) -> Option<CacheStats> {
        Some(self.cache.as_ref()?.stats(reset))
    }

    pub fn config(&self) -> &StorageConfig {
        &self.config
    }

    /// The objects and common prefixes directly under `prefix`, from the
    /// first replica that answers (replicas hold the same keys; one that
    /// lags or fails is passed over). A replica that cannot list (HTTP) makes
    /// this an `Unsupported` error.
    pub fn list(&self, prefix: &str) -> Result<Listing> {
        self.first_answer(prefix, |store| store.list(prefix))
    }

    /// The metadata of `key` (an object or a directory): one request,
    /// routed like a read (hedged, failed over, counted towards ejection),
    /// its size confirmed by a second replica where a read's would be (see
    /// `route::agree`). "Not found" means no replica has it.
    pub fn info(&self, key: &str) -> Result<ObjectMeta> {
        runtime::block_on(self.router.info(key))
    }

    /// Asks the replicas' own stores, hedged: the first (in the key's
    /// preference order, ejected replicas last) at once, each next one when
    /// the one before has failed or after one more hedge delay, so a replica
    /// that accepts connections and never answers costs one delay, not the
    /// deadline. The first answer wins (the rest are dropped, which cancels
    /// them); a caller mistake or an unsupported call stops at once; "not
    /// found" only when every replica says so, else each failure is named.
    fn first_answer<'a, T>(
        &'a self,
        key: &str,
        ask: impl Fn(&'a dyn Store) -> BoxFuture<'a, Result<T>>,
    ) -> Result<T> {
        let router = &self.router;
        let mut order: Vec<usize> = (0..self.replicas.len()).collect();
        if order.len() == router.len() {
            let prefs: Vec<usize> = router.preference_list(key).iter().collect();
            order = prefs;
            order.sort_by_key(|&i| router.health(i).is_ejected());
        }
        let delay = crate::route::config::hedge_fallback();
        let deadline = router.config().deadline;
        let (failed_tx, failed_rx) = tokio::sync::watch::channel(0usize);
        let asks = order.iter().enumerate().map(|(rank, &i)| {
            let store = self.replicas[i].as_ref();
            let mut failed = failed_rx.clone();
            let ask = &ask;
            async move {
                if rank > 0 {
                    // Until every earlier replica failed, or `rank` delays.
                    let _ =
                        tokio::time::timeout(delay * rank as u32, failed.wait_for(|n| *n >= rank))
                            .await;
                }
                (i, ask(store).await)
            }
        });
        let mut pending: futures::stream::FuturesUnordered<_> = asks.collect();
        let mut failures = Vec::new();
        let mut all_not_found = true;
        let outcome: Result<Option<T>> = runtime::block_on(async {
            let first = tokio::time::timeout(deadline, async {
                while let Some((i, answer)) = pending.next().await {
                    match answer {
                        Ok(found) => return Some(Ok(found)),
                        Err(e @ (Error::InvalidArgument(_) | Error::Unsupported(_))) => {
                            return Some(Err(e))
                        }
                        Err(e) => {
                            all_not_found &= matches!(e, Error::NotFound { .. });
                            failures.push(ReplicaFailure {
                                replica: self.replicas[i].name().to_owned(),
                                error: e.to_string(),
                            });
                            failed_tx.send_modify(|n| *n += 1);
                        }
                    }
                }
                None
            })
            .await;
            match first {
                Ok(Some(answer)) => answer.map(Some),
                Ok(None) => Ok(None),
                Err(_) => Err(Error::Timeout {
                    what: format!("metadata of {key:?} from any replica"),
                    elapsed_ms: deadline.as_millis() as u64,
                }),
            }
        });
        if let Some(found) = outcome? {
            return Ok(found);
        }
        if all_not_found {
            return Err(Error::NotFound {
                path: key.to_owned(),
            });
        }
        Err(Error::ReplicasUnavailable {
            path: key.to_owned(),
            failures,
        })
    }

    pub fn size(&self, key: &str) -> Result<u64> {
        match self.store.size_blocking(key) {
            Some(r) => r,
            None => runtime::block_on(self.store.size(key)),
        }
    }

    /// The object's size in the manifest, when one is configured: it is
    /// authoritative (verification holds every replica's bytes to it), so
    /// nothing needs to ask a replica.
    pub fn manifest_size(&self, key: &str) -> Option<u64> {
        Some(self.layers.manifest()?.get(key)?.size)
    }

    /// How a whole-object read of `key` goes here: into a buffer of a size
    /// known without a request (the manifest's, or a local `stat`), or as
    /// one request whose response brings the size (remote stores without a
    /// manifest: no HEAD before the GET).
    pub fn whole_read(&self, key: &str) -> Result<WholeRead> {
        if let Some(size) = self.manifest_size(key) {
            return Ok(WholeRead::Sized(size));
        }
        match self.store.size_blocking(key) {
            Some(size) => Ok(WholeRead::Sized(size?)),
            None => Ok(WholeRead::OneRequest),
        }
    }

    /// The whole object, its size learned from the response (see
    /// [`Store::read_object`]); routed, hedged and retried like any read.
    pub fn read_object(&self, key: &str) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        runtime::block_on(self.store.read_object(key, &mut out))?;
        Ok(out)
    }

    /// `read_object` of each key, `concurrency` in flight; results in order.
    pub fn read_objects(&self, keys: &[&str]) -> Vec<Result<Vec<u8>>> {
        let concurrency = self
            .config
            .concurrency
            .unwrap_or(DEFAULT_CONCURRENCY)
            .max(1);
        let store = self.store.as_ref();
        runtime::block_on(
            futures::stream::iter(keys)
                .map(|key| async move {
                    let mut out = Vec::new();
                    store.read_object(key, &mut out).await.map(|()| out)
                })
                .buffered(concurrency)
                .collect(),
        )
    }

    /// Resolves `cat_file(key, start, end)` to `(offset, len)` with fsspec's
    /// slice semantics (see [`resolve_slice`]).
    pub fn resolve_slice(
        &self,
        key: &str,
        start: Option<i64>,
        end: Option<i64>,
    ) -> Result<(u64, u64)> {
        let size = match self.manifest_size(key) {
            Some(size) => size,
            None => self.size(key)?,
        };
        Ok(resolve_slice(size, start, end))
    }

    /// `resolve_slice` for many requests, statting each distinct key once.
    pub fn resolve_slices(
        &self,
        keys: &[String],
        starts: &[Option<i64>],
        ends: &[Option<i64>],
    ) -> Result<Vec<Result<(u64, u64)>>> {
        let mut distinct: Vec<&str> = Vec::new();
        let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        let index: Vec<usize> = keys
            .iter()
            .map(|k| {
                *seen.entry(k.as_str()).or_insert_with(|| {
                    distinct.push(k.as_str());
                    distinct.len() - 1
                })
            })
            .collect();
        self.resolve_slices_indexed(&distinct, &index, starts, ends)
    }

    /// `resolve_slices` with the keys given as `distinct` names and, per
    /// request, an index into them (a batch of 100,000 ranges usually names
    /// a few files: no string per range is hashed or compared).
    pub fn resolve_slices_indexed(
        &self,
        distinct: &[&str],
        index: &[usize],
        starts: &[Option<i64>],
        ends: &[Option<i64>],
    ) -> Result<Vec<Result<(u64, u64)>>> {
        if index.len() != starts.len() || index.len() != ends.len() {
            return Err(Error::invalid(format!(
                "paths, starts and ends must have one length; got {}, {} and {}",
                index.len(),
                starts.len(),
                ends.len()
            )));
        }
        if let Some(&bad) = index.iter().find(|&&i| i >= distinct.len()) {
            return Err(Error::invalid(format!(
                "key index {bad} out of range for {} distinct keys",
                distinct.len()
            )));
        }
        let sizes = self.sizes(distinct);
        let mut out = Vec::with_capacity(index.len());
        for ((&k, start), end) in index.iter().zip(starts).zip(ends) {
            out.push(match &sizes[k] {
                Ok(size) => Ok(resolve_slice(*size, *start, *end)),
                // Stat again for the typed error (the list keeps only text);
                // if the store has recovered meanwhile, use the fresh size.
                Err(_) => self
                    .size(distinct[k])
                    .map(|size| resolve_slice(size, *start, *end)),
            });
        }
        Ok(out)
    }

    /// The size of each of the `distinct` keys, in order: from the manifest
    /// where it has them (no request, see `manifest_size`), else on the
    /// calling thread where the store allows it, else `concurrency` stats
    /// in flight (a remote stat is a round trip; 1,000 of them in a row
    /// would dominate a `cat_ranges`).
    fn sizes(&self, distinct: &[&str]) -> Vec<Result<u64, String>> {
        let known: Vec<Option<u64>> = distinct.iter().map(|k| self.manifest_size(k)).collect();
        let asked: Vec<&str> = distinct
            .iter()
            .zip(&known)
            .filter(|(_, size)| size.is_none())
            .map(|(key, _)| *key)
            .collect();
        let mut asked_sizes = self.sizes_asked(&asked).into_iter();
        known
            .into_iter()
            .map(|size| match size {
                Some(size) => Ok(size),
                // An interrupted call returns no sizes (see
                // `runtime::Interruptible`): its caller discards them.
                None => asked_sizes
                    .next()
                    .unwrap_or_else(|| Err(runtime::INTERRUPTED.into())),
            })
            .collect()
    }

    fn sizes_asked(&self, distinct: &[&str]) -> Vec<Result<u64, String>> {
        let Some(first) = distinct.first() else {
            return Vec::new();
        };
        if let Some(r) = self.store.size_blocking(first) {
            let mut out = Vec::with_capacity(distinct.len());
            out.push(r.map_err(|e| e.to_string()));
            for key in &distinct[1..] {
                out.push(self.size(key).map_err(|e| e.to_string()));
            }
            return out;
        }
        let concurrency = self
            .config
            .concurrency
            .unwrap_or(DEFAULT_CONCURRENCY)
            .max(1);
        let store = self.store.as_ref();
        let mut found: Vec<(usize, Result<u64, String>)> = runtime::block_on(
            futures::stream::iter(distinct.iter().enumerate())
                .map(
                    |(i, key)| async move { (i, store.size(key).await.map_err(|e| e.to_string())) },
                )
                .buffer_unordered(concurrency)
                .collect(),
        );
        found.sort_unstable_by_key(|(i, _)| *i);
        found.into_iter().map(|(_, r)| r).collect()
    }

    /// Fills `buf` from `offset` of `key`, on the calling thread where the
    /// store allows it.
    pub fn read_into(&self, key: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self.store.read_into_blocking(key, offset, buf) {
            Some(r) => r,
            None => runtime::block_on(self.store.read_into(key, offset, buf)),
        }
    }

    /// Fills one large buffer with several threads at once: the buffer is
    /// cut into `parts` contiguous pieces read in parallel.
    pub fn read_into_parallel(
        &self,
        key: &str,
        offset: u64,
        buf: &mut [u8],
        part_bytes: usize,
    ) -> Result<()> {
        let part_bytes = part_bytes.max(1);
        let mut requests: Vec<RangeRequest<'_>> = buf
            .chunks_mut(part_bytes)
            .enumerate()
            .map(|(i, b)| RangeRequest {
                key,
                offset: offset + (i * part_bytes) as u64,
                buf: b,
            })
            .collect();
        let threads = runtime::threads_for(requests.len(), 1);
        self.read_many(&mut requests, threads).into_iter().collect()
    }

    /// Reads every request, in parallel; one result per request, in order.
    pub fn read_many(&self, requests: &mut [RangeRequest<'_>], threads: usize) -> Vec<Result<()>> {
        if requests.is_empty() {
            return Vec::new();
        }
        let blocking = {
            let first = &mut requests[0];
            self.store
                .read_into_blocking(first.key, first.offset, first.buf)
        };
        match blocking {
            Some(first) => {
                let mut results = vec![first];
                results.extend(self.read_many_blocking(&mut requests[1..], threads));
                results
            }
            None => self.read_many_async(requests),
        }
    }

    fn read_many_blocking(
        &self,
        requests: &mut [RangeRequest<'_>],
        threads: usize,
    ) -> Vec<Result<()>> {
        let n = requests.len();
        let threads = threads.clamp(1, n.max(1));
        let store: &dyn Store = self.store.as_ref();
        // Each thread reads in its own session (see `store::session`): the
        // latency bookkeeping of its reads is folded in per batch.
        let read_one = |r: &mut RangeRequest<'_>, session: &mut ReadSession<'_>| -> Result<()> {
            session
                .read_into_blocking(r.key, r.offset, r.buf)
                .unwrap_or_else(|| runtime::block_on(store.read_into(r.key, r.offset, r.buf)))
        };
        if threads == 1 {
            let mut session = ReadSession::new(store);
            return requests
                .iter_mut()
                .map(|r| read_one(r, &mut session))
                .collect();
        }
        // Threads take batches from a shared queue instead of a fixed share
        // each: on a busy machine one thread may get far less CPU than the
        // other, and a split made up front would make the call wait for it.
        // A batch is about `BATCH_BYTES`, so the lock is cheap next to the
        // reads it hands out.
        let total_bytes: usize = requests.iter().map(|r| r.buf.len()).sum();
        let batch = (BATCH_BYTES / (total_bytes / n).max(1)).clamp(1, 64);
        let queue = std::sync::Mutex::new(requests.iter_mut().enumerate());
        let work = || {
            let mut session = ReadSession::new(store);
            let mut done = Vec::new();
            loop {
                let taken: Vec<_> = queue
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .by_ref()
                    .take(batch)
                    .collect();
                if taken.is_empty() {
                    return done;
                }
                for (i, r) in taken {
                    done.push((i, read_one(r, &mut session)));
                }
            }
        };
        let mut results: Vec<Option<Result<()>>> = (0..n).map(|_| None).collect();
        std::thread::scope(|scope| {
            let helpers: Vec<_> = (1..threads).map(|_| scope.spawn(work)).collect();
            let mut place = |done: Vec<(usize, Result<()>)>| {
                for (i, r) in done {
                    results[i] = Some(r);
                }
            };
            place(work());
            for h in helpers {
                place(h.join().expect("read thread panicked"));
            }
        });
        results
            .into_iter()
            .map(|r| r.expect("every request is taken from the queue once"))
            .collect()
    }

    /// Remote reads: small ranges close together on one key are merged into
    /// one request (see [`coalesce`]); groups run `concurrency` at a time.
    fn read_many_async(&self, requests: &mut [RangeRequest<'_>]) -> Vec<Result<()>> {
        let concurrency = self
            .config
            .concurrency
            .unwrap_or(DEFAULT_CONCURRENCY)
            .max(1);
        let n = requests.len();
        let store = self.store.as_ref();
        let groups = coalesce(requests);
        let done: Vec<Vec<(usize, Result<()>)>> = runtime::block_on(
            futures::stream::iter(groups)
                .map(|group| read_group(store, group))
                .buffer_unordered(concurrency)
                .collect(),
        );
        let mut results: Vec<Option<Result<()>>> = (0..n).map(|_| None).collect();
        for (i, r) in done.into_iter().flatten() {
            results[i] = Some(r);
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::Closed("range was not read".into()))))
            .collect()
    }

    /// Starts a prefetching stream over `items`.
    pub fn stream(&self, items: &[PlanItem], config: &StreamConfig) -> Result<Stream> {
        config.validate()?;
        let known = |key: &str| self.manifest_size(key);
        let plan = runtime::block_on(build_plan_with(
            self.store.as_ref(),
            items,
            config.chunk_bytes,
            &known,
        ))?;
        Stream::start(self.store(), plan, config)
    }
}

/// One remote request's worth of `read_many` requests: indices into the
/// caller's list and their buffers, sorted by offset, all on one key.
type Group<'r, 'a> = Vec<(usize, &'r mut RangeRequest<'a>)>;

/// Groups requests for remote reads: same key, sorted by offset, each next
/// range starting at most [`COALESCE_GAP_BYTES`] after the group's end, the
/// group spanning at most [`MAX_COALESCED_BYTES`]. Overlaps are allowed.
pub fn coalesce<'r, 'a>(requests: &'r mut [RangeRequest<'a>]) -> Vec<Group<'r, 'a>> {
    let mut sorted: Vec<(usize, &'r mut RangeRequest<'a>)> =
        requests.iter_mut().enumerate().collect();
    sorted.sort_by(|a, b| (a.1.key, a.1.offset).cmp(&(b.1.key, b.1.offset)));
    let mut groups: Vec<Group<'r, 'a>> = Vec::new();
    let mut span: (u64, u64) = (0, 0);
    for (i, r) in sorted {
        let end = r.offset + r.buf.len() as u64;
        if let Some(g) = groups.last_mut() {
            let same_key = g[0].1.key == r.key;
            let merged_end = span.1.max(end);
            if same_key
                && r.offset <= span.1.saturating_add(COALESCE_GAP_BYTES)
                && merged_end - span.0 <= MAX_COALESCED_BYTES
            {
                span.1 = merged_end;
                g.push((i, r));
                continue;
            }
        }
        span = (r.offset, end);
        groups.push(vec![(i, r)]);
    }
    groups
}

/// Reads one group: a lone range straight into its buffer; several as one
/// request into a scratch buffer, then split (one extra copy of small
/// ranges, paid to save round trips). If the merged read fails, each range
/// is read on its own so each gets its own, exact result.
async fn read_group(store: &dyn Store, mut group: Group<'_, '_>) -> Vec<(usize, Result<()>)> {
    if group.len() == 1 {
        let (i, r) = group.pop().expect("one request");
        return vec![(i, store.read_into(r.key, r.offset, r.buf).await)];
    }
    let key = group[0].1.key;
    let start = group[0].1.offset;
    let end = group
        .iter()
        .map(|(_, r)| r.offset + r.buf.len() as u64)
        .max()
        .unwrap_or(start);
    let mut scratch = vec![0u8; (end - start) as usize];
    match store.read_into(key, start, &mut scratch).await {
        Ok(()) => group
            .into_iter()
            .map(|(i, r)| {
                let from = (r.offset - start) as usize;
                r.buf.copy_from_slice(&scratch[from..from + r.buf.len()]);
                (i, Ok(()))
            })
            .collect(),
        Err(_) => {
            futures::future::join_all(
                group.into_iter().map(|(i, r)| async move {
                    (i, store.read_into(r.key, r.offset, r.buf).await)
                }),
            )
            .await
        }
    }
}

/// Threads for `read_many` of `n` small ranges.
pub fn threads_for_ranges(n: usize) -> usize {
    runtime::threads_for(n, MIN_RANGES_PER_THREAD)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EntryKind;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An async-only store over one in-memory object that counts requests
    /// and fails reads that span more than `fail_over_bytes`.
    #[derive(Debug)]
    struct Counting {
        data: Vec<u8>,
        requests: AtomicUsize,
        fail_over_bytes: usize,
    }

    impl Store for Counting {
        fn name(&self) -> &str {
            "counting"
        }
        fn size<'a>(&'a self, _key: &'a str) -> BoxFuture<'a, Result<u64>> {
            Box::pin(async move { Ok(self.data.len() as u64) })
        }
        fn read_into<'a>(
            &'a self,
            key: &'a str,
            offset: u64,
            buf: &'a mut [u8],
        ) -> BoxFuture<'a, Result<()>> {
            Box::pin(async move {
                self.requests.fetch_add(1, Ordering::SeqCst);
                if buf.len() > self.fail_over_bytes {
                    return Err(Error::Remote("too big".into()));
                }
                let start = offset as usize;
                let src = self
                    .data
                    .get(start..start + buf.len())
                    .ok_or(Error::ShortRead {
                        path: key.into(),
                        offset,
                        wanted_bytes: buf.len() as u64,
                        got_bytes: 0,
                    })?;
                buf.copy_from_slice(src);
                Ok(())
            })
        }
    }

    fn run(store: &Arc<Counting>, spans: &[(&str, u64, usize)]) -> (Vec<Vec<u8>>, Vec<Result<()>>) {
        let storage = Storage::from_store(Arc::clone(store) as Arc<dyn Store>);
        let mut bufs: Vec<Vec<u8>> = spans.iter().map(|s| vec![0u8; s.2]).collect();
        let mut requests: Vec<RangeRequest<'_>> = spans
            .iter()
            .zip(bufs.iter_mut())
            .map(|(s, b)| RangeRequest {
                key: s.0,
                offset: s.1,
                buf: b,
            })
            .collect();
        let results = storage.read_many(&mut requests, 1);
        drop(requests);
        (bufs, results)
    }

    /// A replica that lists `keys`, or fails every listing: "not found"
    /// when `missing` (a bucket it lacks), else an HTTP 503.
    #[derive(Debug)]
    struct Lister {
        name: &'static str,
        keys: Option<Vec<&'static str>>,
        missing: bool,
    }

    impl Store for Lister {
        fn name(&self) -> &str {
            self.name
        }
        fn size<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64>> {
            Box::pin(async move { Err(Error::NotFound { path: key.into() }) })
        }
        fn read_into<'a>(
            &'a self,
            k: &'a str,
            _: u64,
            _: &'a mut [u8],
        ) -> BoxFuture<'a, Result<()>> {
            Box::pin(async move { Err(Error::NotFound { path: k.into() }) })
        }
        fn list<'a>(&'a self, _prefix: &'a str) -> BoxFuture<'a, Result<Listing>> {
            Box::pin(async move {
                let keys = self.keys.as_ref().ok_or_else(|| match self.missing {
                    true => Error::NotFound { path: "bkt".into() },
                    false => Error::Remote("HTTP 503".into()),
                })?;
                Ok(Listing {
                    objects: keys.iter().map(|k| ObjectMeta::file(k, 1)).collect(),
                    prefixes: Vec::new(),
                })
            })
        }
    }

    #[test]
    fn listing_passes_over_a_failing_replica_and_names_each_when_all_fail() {
        let lister = |name, keys, missing| -> Arc<dyn Store> {
            Arc::new(Lister {
                name,
                keys,
                missing,
            })
        };
        let down = lister("down", None, false);
        let up = lister("up", Some(vec!["a", "b"]), false);
        let storage = Storage {
            replicas: vec![Arc::clone(&down), up],
            ..Storage::from_store(Arc::clone(&down))
        };
        let keys: Vec<String> = storage
            .list("")
            .unwrap()
            .objects
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(keys, ["a", "b"]);
        let alone = Storage::from_store(Arc::clone(&down));
        let err = alone.list("train").unwrap_err().to_string();
        assert!(
            err.contains("\"train\"") && err.contains("down") && err.contains("503"),
            "{err}"
        );
        // "Not found" (no such bucket) only when every replica says so.
        let gone = lister("gone", None, true);
        let storage = Storage {
            replicas: vec![Arc::clone(&gone), Arc::clone(&gone)],
            ..Storage::from_store(Arc::clone(&gone))
        };
        assert!(matches!(storage.list("t"), Err(Error::NotFound { .. })));
        let storage = Storage {
            replicas: vec![Arc::clone(&gone), down],
            ..Storage::from_store(gone)
        };
        assert!(matches!(
            storage.list("t"),
            Err(Error::ReplicasUnavailable { .. })
        ));
    }

    #[test]
    fn local_replicas_list_and_info_from_the_first_that_has_the_key() {
        let lagging = tempfile::tempdir().unwrap();
        let full = tempfile::tempdir().unwrap();
        std::fs::create_dir(full.path().join("sub")).unwrap();
        std::fs::write(full.path().join("sub/new.bin"), b"abc").unwrap();
        std::fs::write(lagging.path().join("old.bin"), b"x").unwrap();
        let config = StorageConfig {
            replicas: vec![
                lagging.path().display().to_string().into(),
                full.path().display().to_string().into(),
            ],
            ..Default::default()
        };
        let storage = Storage::new(config).unwrap();
        // The lagging replica lacks the key: the next one answers.
        let info = storage.info("sub/new.bin").unwrap();
        assert_eq!((info.kind, info.size), (EntryKind::File, 3));
        assert!(info.modified_unix_ns.is_some() && info.version.is_some());
        let listed = storage.list("sub").unwrap();
        assert_eq!(listed.objects[0].key, "sub/new.bin");
        assert_eq!(storage.info("sub").unwrap().kind, EntryKind::Directory);
        // The first replica in the root's preference list answers for it
        // (the order hashes the temporary directories' names).
        let root = storage.list("").unwrap();
        let first = storage.router().preference_list("").iter().next().unwrap();
        match first {
            0 => assert_eq!(root.objects[0].key, "old.bin"),
            _ => assert_eq!(root.prefixes, ["sub"]),
        }
        let err = storage.info("missing").unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    }

    #[test]
    fn info_passes_over_a_failing_replica() {
        let down: Arc<dyn Store> = Arc::new(Lister {
            name: "down",
            keys: None,
            missing: false,
        });
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), b"12").unwrap();
        let up: Arc<dyn Store> = Arc::new(LocalStore::rooted(dir.path()).unwrap());
        let stores = vec![Arc::clone(&down), up];
        let names = stores.iter().map(|s| s.name().to_owned()).collect();
        let router = Router::new(names, stores.clone(), RouterConfig::default()).unwrap();
        let storage = Storage {
            router: Arc::new(router),
            replicas: stores,
            ..Storage::from_store(Arc::clone(&down))
        };
        assert_eq!(storage.info("k").unwrap().size, 2);
        // Lister's `info` is the default (its size, which says "not found"):
        // not found on one and missing on the other is not found.
        let alone = Storage::from_store(down);
        assert!(matches!(alone.info("k"), Err(Error::NotFound { .. })));
    }

    #[test]
    fn coalesces_close_ranges_and_splits_exactly() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let store = Arc::new(Counting {
            data: data.clone(),
            requests: AtomicUsize::new(0),
            fail_over_bytes: usize::MAX,
        });
        // 100 ranges of 1000 bytes with 500-byte gaps, out of order, one
        // overlap, one far away and one on another key.
        let mut spans: Vec<(&str, u64, usize)> =
            (0..100).rev().map(|i| ("k", i * 1500, 1000)).collect();
        spans.push(("k", 10, 3000));
        spans.push(("k", 190_000, 100));
        spans.push(("other", 0, 10));
        let (bufs, results) = run(&store, &spans);
        assert!(results.iter().all(|r| r.is_ok()));
        for ((_, offset, len), buf) in spans.iter().zip(&bufs) {
            assert_eq!(buf[..], data[*offset as usize..*offset as usize + len]);
        }
        // One merged request for the 101 close ranges, one far, one other key.
        assert_eq!(store.requests.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn failed_merged_read_falls_back_to_each_range() {
        let data = vec![7u8; 50_000];
        let store = Arc::new(Counting {
            data,
            requests: AtomicUsize::new(0),
            fail_over_bytes: 1_500,
        });
        let spans = [("k", 0, 1000), ("k", 1000, 1000), ("k", 49_990, 20)];
        let (bufs, results) = run(&store, &spans);
        assert!(results[0].is_ok() && results[1].is_ok());
        assert!(matches!(results[2], Err(Error::ShortRead { .. })));
        assert_eq!(bufs[1], vec![7u8; 1000]);
        // The merged read, then each of its two ranges, then the far one.
        assert_eq!(store.requests.load(Ordering::SeqCst), 4);
    }
}
