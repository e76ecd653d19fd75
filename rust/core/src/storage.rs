//! `Storage`: what one `feedline.FileSystem` reads through. It owns the
//! store stack built from a [`StorageConfig`] (local roots today; the router,
//! chaos and remote backends plug in here) and offers the three read shapes
//! the Python API needs: one range into a buffer, many ranges in parallel,
//! and a prefetching stream.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use serde::Deserialize;

use crate::chaos::ChaosSpec;
use crate::error::{Error, Result};
use crate::layers::{wrap_replicas, ReplicaFaultStats, ReplicaLayers};
use crate::manifest::ManifestSource;
use crate::plan::{build_plan, resolve_slice, PlanItem};
use crate::prefetch::{Stream, StreamConfig};
use crate::route::{HedgeAfterMs, Router, RouterConfig, RouterStats, RoutingOptions};
use crate::runtime;
use crate::store::{LocalStore, Store};

/// Ranges per thread below which `read_many` does not bother to split.
const MIN_RANGES_PER_THREAD: usize = 64;

/// How many async reads `read_many` keeps in flight on stores without a
/// blocking path (remote stores).
pub const DEFAULT_CONCURRENCY: usize = 64;

/// The configuration a `FileSystem` is built from. Python builds and
/// validates it, then hands it over as JSON; unknown keys are refused.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Replica roots. Empty: the local filesystem, paths as given.
    pub replicas: Vec<String>,
    /// Async reads in flight for `cat_ranges` on remote stores.
    pub concurrency: Option<usize>,
    // -- replica routing (see `route::config` for meanings and defaults) --
    /// Relative share of keys per replica (default: equal).
    pub weights: Option<Vec<f64>>,
    /// "affinity" (default) or "p2c".
    pub policy: Option<String>,
    /// Bounded-load factor (> 1); unset: off.
    pub load_factor: Option<f64>,
    /// Milliseconds, or "p95"-style: the replica's own latency percentile.
    pub hedge_after_ms: Option<HedgeAfterMs>,
    pub timeout_ms: Option<f64>,
    pub deadline_ms: Option<f64>,
    pub eject_after_failures: Option<u32>,
    pub base_ejection_ms: Option<f64>,
    pub max_ejection_ms: Option<f64>,
    pub retry_budget_ratio: Option<f64>,
    pub retry_budget_floor_per_s: Option<f64>,
    pub backoff_base_ms: Option<f64>,
    pub backoff_max_ms: Option<f64>,
    /// Faults to inject, by replica index (see [`crate::chaos`]).
    pub chaos: BTreeMap<usize, ChaosSpec>,
    /// Per-block CRC32C manifest; with it every read is verified.
    pub manifest: Option<ManifestSource>,
}

impl StorageConfig {
    pub fn from_json(json: &str) -> Result<Self> {
        serde_json::from_str(json)
            .map_err(|e| Error::invalid(format!("bad storage configuration: {e}")))
    }

    /// The router's settings, validated.
    pub fn router_config(&self) -> Result<RouterConfig> {
        RouterConfig::from_options(&RoutingOptions {
            weights: self.weights.clone(),
            policy: self.policy.clone(),
            load_factor: self.load_factor,
            hedge_after_ms: self.hedge_after_ms.clone(),
            timeout_ms: self.timeout_ms,
            deadline_ms: self.deadline_ms,
            eject_after_failures: self.eject_after_failures,
            base_ejection_ms: self.base_ejection_ms,
            max_ejection_ms: self.max_ejection_ms,
            retry_budget_ratio: self.retry_budget_ratio,
            retry_budget_floor_per_s: self.retry_budget_floor_per_s,
            backoff_base_ms: self.backoff_base_ms,
            backoff_max_ms: self.backoff_max_ms,
        })
    }
}

/// The store for one replica root. Local directories today; the remote
/// backends (URLs) and the per-replica wrappers (chaos, verification) are
/// added here.
pub fn open_replica(root: &str) -> Result<Arc<dyn Store>> {
    Ok(Arc::new(LocalStore::rooted(root)?))
}

/// One request of `read_many`: fill `buf` from `offset` of `key`.
pub struct RangeRequest<'a> {
    pub key: &'a str,
    pub offset: u64,
    pub buf: &'a mut [u8],
}

#[derive(Debug)]
pub struct Storage {
    store: Arc<dyn Store>,
    /// The same store as `store` when it is a router (always, from `new`).
    router: Option<Arc<Router>>,
    config: StorageConfig,
    layers: ReplicaLayers,
}

impl Storage {
    /// Builds one store per replica root and a [`Router`] over them; every
    /// read goes through the router. No replicas: the local filesystem,
    /// paths as given (still through a one-replica router, for stats).
    pub fn new(config: StorageConfig) -> Result<Self> {
        let router_config = config.router_config()?;
        let (names, stores): (Vec<String>, Vec<Arc<dyn Store>>) = if config.replicas.is_empty() {
            if config.weights.is_some() {
                return Err(Error::invalid("weights given without replicas"));
            }
            let local: Arc<dyn Store> = Arc::new(LocalStore::unrooted());
            (vec![local.name().to_owned()], vec![local])
        } else {
            let stores = config
                .replicas
                .iter()
                .map(|root| open_replica(root))
                .collect::<Result<Vec<_>>>()?;
            (config.replicas.clone(), stores)
        };
        // Chaos and verification wrap each replica's store, under the
        // router: an injected fault or a checksum mismatch is that replica's
        // error, so the router fails over, hedges or ejects as for a real one.
        let (stores, layers) = wrap_replicas(stores, &config.chaos, config.manifest.as_ref())?;
        let router = Arc::new(Router::new(names, stores, router_config)?);
        Ok(Storage {
            store: Arc::clone(&router) as Arc<dyn Store>,
            router: Some(router),
            config,
            layers,
        })
    }

    pub fn from_store(store: Arc<dyn Store>) -> Self {
        Storage {
            store,
            router: None,
            config: StorageConfig::default(),
            layers: ReplicaLayers::default(),
        }
    }

    /// Per-replica and end-to-end figures; `reset` clears them after
    /// reading. Empty replica list for a `Storage` built from a bare store.
    pub fn stats(&self, reset: bool) -> Option<RouterStats> {
        self.router.as_ref().map(|r| r.stats(reset))
    }

    /// `stats` as JSON (`null` for a bare store).
    pub fn stats_json(&self, reset: bool) -> String {
        // Plain numbers and strings: serialising cannot fail.
        serde_json::to_string(&self.stats(reset)).unwrap_or_else(|_| "null".into())
    }

    pub fn router(&self) -> Option<&Arc<Router>> {
        self.router.as_ref()
    }

    /// What chaos injected into and verification checked on each replica.
    pub fn fault_stats(&self) -> Vec<ReplicaFaultStats> {
        self.layers.fault_stats()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn config(&self) -> &StorageConfig {
        &self.config
    }

    pub fn size(&self, key: &str) -> Result<u64> {
        match self.store.size_blocking(key) {
            Some(r) => r,
            None => runtime::block_on(self.store.size(key)),
        }
    }

    /// Resolves `cat_file(key, start, end)` to `(offset, len)` with fsspec's
    /// slice semantics (see [`resolve_slice`]).
    pub fn resolve_slice(
        &self,
        key: &str,
        start: Option<i64>,
        end: Option<i64>,
    ) -> Result<(u64, u64)> {
        Ok(resolve_slice(self.size(key)?, start, end))
    }

    /// `resolve_slice` for many requests, statting each distinct key once.
    pub fn resolve_slices(
        &self,
        keys: &[String],
        starts: &[Option<i64>],
        ends: &[Option<i64>],
    ) -> Result<Vec<Result<(u64, u64)>>> {
        if keys.len() != starts.len() || keys.len() != ends.len() {
            return Err(Error::invalid(format!(
                "paths, starts and ends must have one length; got {}, {} and {}",
                keys.len(),
                starts.len(),
                ends.len()
            )));
        }
        let mut sizes: std::collections::HashMap<&str, Result<u64, String>> = Default::default();
        let mut out = Vec::with_capacity(keys.len());
        for ((key, start), end) in keys.iter().zip(starts).zip(ends) {
            let size = sizes
                .entry(key.as_str())
                .or_insert_with(|| self.size(key).map_err(|e| e.to_string()));
            out.push(match size {
                Ok(size) => Ok(resolve_slice(*size, *start, *end)),
                // Stat again for the typed error; the cache only saves work.
                Err(_) => self.size(key).map(|_| (0, 0)),
            });
        }
        Ok(out)
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
        let threads = threads_for(requests.len(), 1);
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
        let threads = threads.clamp(1, requests.len().max(1));
        let per_thread = requests.len().div_ceil(threads).max(1);
        let store = &self.store;
        let read = |reqs: &mut [RangeRequest<'_>]| -> Vec<Result<()>> {
            reqs.iter_mut()
                .map(|r| {
                    store
                        .read_into_blocking(r.key, r.offset, r.buf)
                        .unwrap_or_else(|| {
                            runtime::block_on(store.read_into(r.key, r.offset, r.buf))
                        })
                })
                .collect()
        };
        if threads == 1 {
            return read(requests);
        }
        std::thread::scope(|scope| {
            let mut parts = requests.chunks_mut(per_thread);
            let head = parts.next().unwrap_or_default();
            let handles: Vec<_> = parts.map(|p| scope.spawn(move || read(p))).collect();
            let mut results = read(head);
            for h in handles {
                results.extend(h.join().expect("read thread panicked"));
            }
            results
        })
    }

    fn read_many_async(&self, requests: &mut [RangeRequest<'_>]) -> Vec<Result<()>> {
        let concurrency = self
            .config
            .concurrency
            .unwrap_or(DEFAULT_CONCURRENCY)
            .max(1);
        let store = &self.store;
        runtime::block_on(
            futures::stream::iter(requests.iter_mut())
                .map(|r| store.read_into(r.key, r.offset, r.buf))
                .buffered(concurrency)
                .collect(),
        )
    }

    /// Starts a prefetching stream over `items`.
    pub fn stream(&self, items: &[PlanItem], config: &StreamConfig) -> Result<Stream> {
        config.validate()?;
        let plan = runtime::block_on(build_plan(self.store.as_ref(), items, config.chunk_bytes))?;
        Stream::start(Arc::clone(&self.store), plan, config)
    }
}

/// Threads worth using for `n` requests: the cores, but no more than the
/// work can keep busy.
pub fn threads_for(n: usize, min_per_thread: usize) -> usize {
    let cores = std::thread::available_parallelism()
        .map(|c| c.get())
        .unwrap_or(1);
    cores.min(n / min_per_thread.max(1)).max(1)
}

/// Threads for `read_many` of `n` small ranges.
pub fn threads_for_ranges(n: usize) -> usize {
    threads_for(n, MIN_RANGES_PER_THREAD)
}
