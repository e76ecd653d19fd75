//! In-process fault injection: [`ChaosStore`] wraps any [`Store`] and makes it
//! slow, spiky, lossy, stalling, down or corrupting, deterministically from a
//! seed. This is the no-root, no-server way to stress the data path; the
//! Python `feedline.chaos` dataclasses build a [`ChaosSpec`] as JSON.
//!
//! Determinism: request `n` (a counter per store) draws its fate from
//! `hash(seed, n)` alone, always in the same order of draws, so concurrency
//! changes only *when* request `n` runs, never *what happens* to it, and
//! changing one rate does not reshuffle the others. [`ChaosSampler`] is that
//! decision function on its own, so a Python wrapper around a baseline
//! filesystem (`feedline.chaos.ChaosFileSystem`) sees the same fault sequence
//! for the same seed.
//!
//! Only reads draw a fate. `size` (a stat or HEAD) sees outages only: a dead
//! node answers nothing, but one latency draw per *read* keeps `cat_file`
//! (stat + read) comparable with a baseline that pays one round trip.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fork::ForkMutex;
use crate::rng::SplitMix64;
use crate::store::{BoxFuture, ObjectMeta, Store};

/// A single latency draw is capped so that a heavy-tailed distribution
/// (Pareto with shape ≤ 1 has no mean) cannot hang a run by accident; hanging
/// is what `stall_rate` is for.
pub const MAX_LATENCY_MS: f64 = 60_000.0;

/// Per-request latency distribution, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Latency {
    Fixed { ms: f64 },
    Uniform { low_ms: f64, high_ms: f64 },
    Normal { mean_ms: f64, stdev_ms: f64 },
    LogNormal { median_ms: f64, sigma: f64 },
    Pareto { scale_ms: f64, shape: f64 },
}

impl Latency {
    fn validate(&self) -> Result<()> {
        fn non_negative(field: &str, v: f64) -> Result<()> {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(Error::invalid(format!(
                    "chaos latency {field} must be a finite number >= 0, got {v}"
                )))
            }
        }
        fn positive(field: &str, v: f64) -> Result<()> {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(Error::invalid(format!(
                    "chaos latency {field} must be a finite number > 0, got {v}"
                )))
            }
        }
        match *self {
            Latency::Fixed { ms } => non_negative("fixed ms", ms),
            Latency::Uniform { low_ms, high_ms } => {
                non_negative("uniform low_ms", low_ms)?;
                non_negative("uniform high_ms", high_ms)?;
                if low_ms > high_ms {
                    return Err(Error::invalid(format!(
                        "chaos latency uniform low_ms ({low_ms}) must not exceed high_ms ({high_ms})"
                    )));
                }
                Ok(())
            }
            Latency::Normal { mean_ms, stdev_ms } => {
                non_negative("normal mean_ms", mean_ms)?;
                non_negative("normal stdev_ms", stdev_ms)
            }
            Latency::LogNormal { median_ms, sigma } => {
                positive("lognormal median_ms", median_ms)?;
                non_negative("lognormal sigma", sigma)
            }
            Latency::Pareto { scale_ms, shape } => {
                positive("pareto scale_ms", scale_ms)?;
                positive("pareto shape", shape)
            }
        }
    }

    /// One draw from two independent uniforms in (0, 1].
    fn sample_ms(&self, u1: f64, u2: f64) -> f64 {
        let ms = match *self {
            Latency::Fixed { ms } => ms,
            Latency::Uniform { low_ms, high_ms } => low_ms + (high_ms - low_ms) * (1.0 - u1),
            Latency::Normal { mean_ms, stdev_ms } => mean_ms + stdev_ms * standard_normal(u1, u2),
            Latency::LogNormal { median_ms, sigma } => {
                median_ms * (sigma * standard_normal(u1, u2)).exp()
            }
            // Inverse CDF: F(x) = 1 - (scale/x)^shape for x >= scale.
            Latency::Pareto { scale_ms, shape } => scale_ms / u1.powf(1.0 / shape),
        };
        // A normal draw can go below zero; time does not.
        ms.clamp(0.0, MAX_LATENCY_MS)
    }
}

/// Box-Muller: a standard normal from two uniforms in (0, 1].
fn standard_normal(u1: f64, u2: f64) -> f64 {
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// What to inject. Every field defaults to "no fault"; see the Python
/// `feedline.chaos.Chaos` for the user-facing documentation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChaosSpec {
    /// Base latency of every read.
    pub latency: Option<Latency>,
    /// Probability that a read is delayed by an extra `spike_ms`.
    pub spike_probability: f64,
    pub spike_ms: f64,
    /// Probability that a read fails with a retryable error.
    pub error_rate: f64,
    /// Probability that a read never completes (until cancelled).
    pub stall_rate: f64,
    /// `[start_s, end_s)` windows, from the store's creation, when the
    /// replica refuses every request.
    pub outages: Vec<(f64, f64)>,
    /// Reads numbered from this one on (0-based) are refused: the replica
    /// dies after serving this many.
    pub fail_after_requests: Option<u64>,
    /// A link shared by all reads of this replica: each read's bytes take
    /// `bytes / bandwidth` seconds, queued behind earlier reads.
    pub bandwidth_bytes_per_s: Option<f64>,
    /// Probability that a successful read has one byte flipped.
    pub corrupt_rate: f64,
    pub seed: u64,
}

impl ChaosSpec {
    pub fn from_json(json: &str) -> Result<Self> {
        let spec: ChaosSpec = serde_json::from_str(json)
            .map_err(|e| Error::invalid(format!("bad chaos specification: {e}")))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Refuses values that cannot mean anything, naming field and value.
    pub fn validate(&self) -> Result<()> {
        for (field, p) in [
            ("spike_probability", self.spike_probability),
            ("error_rate", self.error_rate),
            ("stall_rate", self.stall_rate),
            ("corrupt_rate", self.corrupt_rate),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(Error::invalid(format!(
                    "chaos {field} is a probability and must be within [0, 1], got {p}"
                )));
            }
        }
        if !(self.spike_ms.is_finite() && (0.0..=MAX_LATENCY_MS).contains(&self.spike_ms)) {
            return Err(Error::invalid(format!(
                "chaos spike_ms must be a number from 0 to {MAX_LATENCY_MS}, got {}",
                self.spike_ms
            )));
        }
        if self.spike_probability > 0.0 && self.spike_ms <= 0.0 {
            return Err(Error::invalid(format!(
                "chaos spike_ms must be above 0 when spike_probability is set (got spike_probability={} and spike_ms={})",
                self.spike_probability, self.spike_ms
            )));
        }
        if let Some(latency) = &self.latency {
            latency.validate()?;
        }
        for &(start_s, end_s) in &self.outages {
            if !(start_s.is_finite() && end_s.is_finite() && 0.0 <= start_s && start_s < end_s) {
                return Err(Error::invalid(format!(
                    "chaos outages entry ({start_s}, {end_s}) must satisfy 0 <= start_s < end_s"
                )));
            }
        }
        if let Some(bw) = self.bandwidth_bytes_per_s {
            // Below a byte a second one read would outlast any deadline
            // (and its duration would overflow).
            if !(bw.is_finite() && bw >= 1.0) {
                return Err(Error::invalid(format!(
                    "chaos bandwidth_bytes_per_s must be a finite number of at least 1, got {bw}"
                )));
            }
        }
        Ok(())
    }

    /// Whether any fault makes a read wait (so it needs the async path).
    pub fn has_timing_faults(&self) -> bool {
        self.latency.is_some()
            || (self.spike_probability > 0.0 && self.spike_ms > 0.0)
            || self.stall_rate > 0.0
            || self.bandwidth_bytes_per_s.is_some()
    }
}

/// What happens to one read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Served normally (after `delay`).
    None,
    /// Served, then the byte at this index of the buffer is flipped.
    Corrupt { index: usize },
    /// Fails with a retryable error after `delay` (a server's error reply
    /// still costs a round trip).
    Error,
    /// Never completes; only cancellation ends it.
    Stall,
    /// Refused at once: inside an outage window or past
    /// `fail_after_requests`.
    Outage,
}

impl Fault {
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::Corrupt { .. } => "corrupt",
            Fault::Error => "error",
            Fault::Stall => "stall",
            Fault::Outage => "outage",
        }
    }
}

/// The fate of request number `request`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub request: u64,
    pub delay: Duration,
    pub spiked: bool,
    pub fault: Fault,
}

/// One generator per request, seeded from `(seed, request)`.
fn for_request(seed: u64, request: u64) -> SplitMix64 {
    let mut s = SplitMix64::for_stream(seed, request);
    // Decorrelate neighbouring requests before the first draw.
    s.next_u64();
    s
}

/// Counts of what was injected, for stats and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChaosStats {
    pub requests: u64,
    pub spikes: u64,
    pub errors: u64,
    pub stalls: u64,
    pub corruptions: u64,
    pub outage_rejections: u64,
}

#[derive(Debug, Default)]
struct Counters {
    spikes: AtomicU64,
    errors: AtomicU64,
    stalls: AtomicU64,
    corruptions: AtomicU64,
    outage_rejections: AtomicU64,
}

/// The decision function: request counter, seeded draws, outage clock and
/// the shared bandwidth link. Used by [`ChaosStore`] and, through the Python
/// bindings, by the fsspec wrapper for baselines.
#[derive(Debug)]
pub struct ChaosSampler {
    spec: ChaosSpec,
    created: Instant,
    next_request: AtomicU64,
    /// When the bandwidth-capped link is next free, as seconds since
    /// `created`.
    link_free_at_s: ForkMutex<f64>,
    counters: Counters,
}

impl ChaosSampler {
    pub fn new(spec: ChaosSpec) -> Result<Self> {
        spec.validate()?;
        Ok(ChaosSampler {
            spec,
            created: Instant::now(),
            next_request: AtomicU64::new(0),
            link_free_at_s: ForkMutex::new(0.0),
            counters: Counters::default(),
        })
    }

    pub fn spec(&self) -> &ChaosSpec {
        &self.spec
    }

    /// Seconds since this sampler (its store) was created.
    pub fn elapsed_s(&self) -> f64 {
        self.created.elapsed().as_secs_f64()
    }

    /// Whether the replica is inside an outage window now.
    pub fn in_outage_window(&self) -> bool {
        if self.spec.outages.is_empty() {
            return false;
        }
        let now = self.elapsed_s();
        self.spec
            .outages
            .iter()
            .any(|&(start, end)| start <= now && now < end)
    }

    /// Whether the replica is down now for a request that draws no fate
    /// (a `size`): an outage window, or past `fail_after_requests`. A
    /// refusal is counted.
    pub fn down_now(&self) -> bool {
        let down = self.in_outage_window()
            || self
                .spec
                .fail_after_requests
                .is_some_and(|n| self.next_request.load(Ordering::Relaxed) >= n);
        if down {
            self.counters
                .outage_rejections
                .fetch_add(1, Ordering::Relaxed);
        }
        down
    }

    /// The pure part: what the seed says about request `request` moving
    /// `nbytes` (no clock, no counters).
    pub fn draw(&self, request: u64, nbytes: usize) -> (f64, bool, Fault) {
        let spec = &self.spec;
        let mut rng = for_request(spec.seed, request);
        // Always the same draws in the same order, used or not.
        let u_stall = rng.unit();
        let u_error = rng.unit();
        let u_spike = rng.unit();
        let u_lat1 = rng.unit();
        let u_lat2 = rng.unit();
        let u_corrupt = rng.unit();
        let u_index = rng.unit();

        let spiked = spec.spike_probability > 0.0 && u_spike <= spec.spike_probability;
        let mut delay_ms = spec
            .latency
            .as_ref()
            .map_or(0.0, |l| l.sample_ms(u_lat1, u_lat2));
        if spiked {
            delay_ms += spec.spike_ms;
        }
        let fault = if spec.stall_rate > 0.0 && u_stall <= spec.stall_rate {
            Fault::Stall
        } else if spec.error_rate > 0.0 && u_error <= spec.error_rate {
            Fault::Error
        } else if spec.corrupt_rate > 0.0 && u_corrupt <= spec.corrupt_rate && nbytes > 0 {
            let index = ((u_index * nbytes as f64) as usize).min(nbytes - 1);
            Fault::Corrupt { index }
        } else {
            Fault::None
        };
        (delay_ms, spiked, fault)
    }

    /// Numbers the next read, decides its fate and counts what it injects.
    pub fn next(&self, nbytes: usize) -> Decision {
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        let outage =
            self.in_outage_window() || self.spec.fail_after_requests.is_some_and(|n| request >= n);
        if outage {
            self.counters
                .outage_rejections
                .fetch_add(1, Ordering::Relaxed);
            return Decision {
                request,
                delay: Duration::ZERO,
                spiked: false,
                fault: Fault::Outage,
            };
        }
        let (mut delay_ms, spiked, fault) = self.draw(request, nbytes);
        let c = &self.counters;
        if spiked {
            c.spikes.fetch_add(1, Ordering::Relaxed);
        }
        match fault {
            Fault::Stall => {
                c.stalls.fetch_add(1, Ordering::Relaxed);
            }
            Fault::Error => {
                c.errors.fetch_add(1, Ordering::Relaxed);
            }
            Fault::Corrupt { .. } => {
                c.corruptions.fetch_add(1, Ordering::Relaxed);
            }
            Fault::None | Fault::Outage => {}
        }
        if matches!(fault, Fault::None | Fault::Corrupt { .. }) {
            delay_ms += self.link_wait_ms(nbytes);
        }
        Decision {
            request,
            delay: Duration::from_secs_f64(delay_ms / 1000.0),
            spiked,
            fault,
        }
    }

    /// Reserves the shared link for `nbytes` and returns how long, from now,
    /// until those bytes are through it.
    fn link_wait_ms(&self, nbytes: usize) -> f64 {
        let Some(bw) = self.spec.bandwidth_bytes_per_s else {
            return 0.0;
        };
        let now = self.elapsed_s();
        let mut free_at = self.link_free_at_s.lock();
        let start = free_at.max(now);
        *free_at = start + nbytes as f64 / bw;
        (*free_at - now) * 1000.0
    }

    pub fn stats(&self) -> ChaosStats {
        let c = &self.counters;
        ChaosStats {
            requests: self.next_request.load(Ordering::Relaxed),
            spikes: c.spikes.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            stalls: c.stalls.load(Ordering::Relaxed),
            corruptions: c.corruptions.load(Ordering::Relaxed),
            outage_rejections: c.outage_rejections.load(Ordering::Relaxed),
        }
    }
}

/// Flips every bit of one byte: always a change, whatever the byte was.
pub fn corrupt_byte(buf: &mut [u8], index: usize) {
    if let Some(b) = buf.get_mut(index) {
        *b ^= 0xFF;
    }
}

/// Any store, with faults injected per [`ChaosSpec`].
#[derive(Debug)]
pub struct ChaosStore {
    inner: Arc<dyn Store>,
    sampler: ChaosSampler,
    name: String,
    /// Whether `inner` reads without an executor, probed once (through
    /// `size_blocking`, which the trait ties to `read_into_blocking`) so a
    /// blocking attempt never draws a fate it then cannot apply.
    inner_blocking: OnceLock<bool>,
}

impl ChaosStore {
    pub fn new(inner: Arc<dyn Store>, spec: ChaosSpec) -> Result<Self> {
        let name = inner.name().to_owned();
        Ok(ChaosStore {
            inner,
            sampler: ChaosSampler::new(spec)?,
            name,
            inner_blocking: OnceLock::new(),
        })
    }

    pub fn spec(&self) -> &ChaosSpec {
        self.sampler.spec()
    }

    pub fn stats(&self) -> ChaosStats {
        self.sampler.stats()
    }

    pub fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }

    fn injected(&self, what: &str, key: &str, request: u64) -> Error {
        Error::Remote(format!(
            "replica {}: injected {what} reading {key:?} (chaos request #{request})",
            self.name
        ))
    }

    fn outage_error(&self, key: &str) -> Error {
        Error::Remote(format!(
            "replica {}: injected outage ({:.3} s after start) on {key:?}",
            self.name,
            self.sampler.elapsed_s()
        ))
    }

    /// Everything a fate does before the bytes count: an immediate failure,
    /// a stall (hangs until the caller drops the future: a hedge winner, a
    /// timeout, a closed stream), the delay, an injected error.
    async fn suffer(&self, d: &Decision, key: &str) -> Result<()> {
        if let Some(e) = self.immediate_failure(d, key) {
            return Err(e);
        }
        if d.fault == Fault::Stall {
            std::future::pending::<()>().await;
        }
        if !d.delay.is_zero() {
            tokio::time::sleep(d.delay).await;
        }
        if d.fault == Fault::Error {
            return Err(self.injected("error", key, d.request));
        }
        Ok(())
    }

    /// The outcome of a decision that needs no waiting, or `None` to go on.
    fn immediate_failure(&self, d: &Decision, key: &str) -> Option<Error> {
        match d.fault {
            Fault::Outage => Some(self.outage_error(key)),
            Fault::Error if d.delay.is_zero() => Some(self.injected("error", key, d.request)),
            _ => None,
        }
    }
}

impl Store for ChaosStore {
    fn name(&self) -> &str {
        &self.name
    }

    fn waits_on_network(&self) -> bool {
        self.inner.waits_on_network()
    }

    fn size<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            if self.sampler.down_now() {
                return Err(self.outage_error(key));
            }
            self.inner.size(key).await
        })
    }

    fn read_size<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            if self.sampler.down_now() {
                return Err(self.outage_error(key));
            }
            self.inner.read_size(key).await
        })
    }

    fn info<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ObjectMeta>> {
        Box::pin(async move {
            if self.sampler.down_now() {
                return Err(self.outage_error(key));
            }
            self.inner.info(key).await
        })
    }

    fn read_into<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let d = self.sampler.next(buf.len());
            self.suffer(&d, key).await?;
            self.inner.read_into(key, offset, buf).await?;
            if let Fault::Corrupt { index } = d.fault {
                corrupt_byte(buf, index);
            }
            Ok(())
        })
    }

    /// The same fates as `read_into`, drawn once per whole-object read. Its
    /// size is only known once the bytes are in, so the fate is drawn then
    /// (corruption needs an index, the link a byte count) and applied
    /// before the caller sees anything: the caller waits as long and gets
    /// the same error or corruption as if it had been applied first. An
    /// outage is decided up front: a down replica is not asked at all.
    fn read_object<'a>(&'a self, key: &'a str, out: &'a mut Vec<u8>) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let spec = self.sampler.spec();
            let past_limit = spec
                .fail_after_requests
                .is_some_and(|n| self.sampler.next_request.load(Ordering::Relaxed) >= n);
            if past_limit || self.sampler.in_outage_window() {
                let d = self.sampler.next(0);
                if let Some(e) = self.immediate_failure(&d, key) {
                    return Err(e);
                }
            }
            let read = self.inner.read_object(key, out).await;
            let d = self.sampler.next(out.len());
            // Read time plus the delay, as in `read_into` (delay, then read).
            self.suffer(&d, key).await?;
            read?;
            if let Fault::Corrupt { index } = d.fault {
                corrupt_byte(out, index);
            }
            Ok(())
        })
    }

    fn read_into_blocking(&self, key: &str, offset: u64, buf: &mut [u8]) -> Option<Result<()>> {
        if self.sampler.spec().has_timing_faults() {
            return None;
        }
        let blocking = *self
            .inner_blocking
            .get_or_init(|| self.inner.size_blocking(key).is_some());
        if !blocking {
            return None;
        }
        let d = self.sampler.next(buf.len());
        if let Some(e) = self.immediate_failure(&d, key) {
            return Some(Err(e));
        }
        let result = match self.inner.read_into_blocking(key, offset, buf) {
            Some(r) => r,
            // The probe said otherwise; honour the decision on the runtime.
            None => crate::runtime::block_on(self.inner.read_into(key, offset, buf)),
        };
        if result.is_ok() {
            if let Fault::Corrupt { index } = d.fault {
                corrupt_byte(buf, index);
            }
        }
        Some(result)
    }

    fn size_blocking(&self, key: &str) -> Option<Result<u64>> {
        if self.sampler.down_now() {
            return Some(Err(self.outage_error(key)));
        }
        self.inner.size_blocking(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    fn spec(json: &str) -> Result<ChaosSpec> {
        ChaosSpec::from_json(json)
    }

    fn local_with(bytes: &[u8]) -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("obj"), bytes).unwrap();
        let store = LocalStore::rooted(dir.path()).unwrap();
        (dir, Arc::new(store))
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn validation_names_field_and_value() {
        let cases = [
            (r#"{"error_rate": 1.5}"#, "error_rate"),
            (r#"{"spike_probability": -0.1}"#, "spike_probability"),
            (r#"{"stall_rate": 2}"#, "stall_rate"),
            (r#"{"corrupt_rate": 1.01}"#, "corrupt_rate"),
            (r#"{"spike_ms": -5}"#, "spike_ms"),
            (r#"{"latency": {"kind": "fixed", "ms": -1}}"#, "fixed ms"),
            (
                r#"{"latency": {"kind": "uniform", "low_ms": 5, "high_ms": 1}}"#,
                "low_ms",
            ),
            (
                r#"{"latency": {"kind": "normal", "mean_ms": -3, "stdev_ms": 1}}"#,
                "mean_ms",
            ),
            (
                r#"{"latency": {"kind": "lognormal", "median_ms": 0, "sigma": 1}}"#,
                "median_ms",
            ),
            (
                r#"{"latency": {"kind": "pareto", "scale_ms": 1, "shape": 0}}"#,
                "shape",
            ),
            (
                r#"{"latency": {"kind": "pareto", "scale_ms": 1, "shape": -2}}"#,
                "shape",
            ),
            (r#"{"outages": [[5, 2]]}"#, "outage"),
            (r#"{"outages": [[-1, 2]]}"#, "outage"),
            (r#"{"bandwidth_bytes_per_s": 0}"#, "bandwidth_bytes_per_s"),
            (r#"{"error_rte": 0.1}"#, "error_rte"),
            (r#"{"latency": {"kind": "gamma", "ms": 1}}"#, "gamma"),
            (r#"{"latency": {"kind": "fixed", "ms": 1, "x": 2}}"#, "x"),
        ];
        for (json, needle) in cases {
            let err = spec(json).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{json}: {err}");
            assert!(err.to_string().contains(needle), "{json}: {err}");
        }
        spec(r#"{"error_rate": 1, "latency": {"kind": "pareto", "scale_ms": 1, "shape": 0.5}}"#)
            .unwrap();
        assert!(!spec("{}").unwrap().has_timing_faults());
    }

    #[test]
    fn same_seed_same_faults_different_seed_different_faults() {
        let json = r#"{"error_rate": 0.2, "spike_probability": 0.1, "spike_ms": 7,
            "corrupt_rate": 0.1, "latency": {"kind": "lognormal", "median_ms": 2, "sigma": 1},
            "seed": 42}"#;
        let run = |json: &str| -> Vec<Decision> {
            let s = ChaosSampler::new(spec(json).unwrap()).unwrap();
            (0..500).map(|_| s.next(4096)).collect()
        };
        let a = run(json);
        assert_eq!(a, run(json));
        assert_ne!(a, run(&json.replace("42", "43")));
        // Raising one rate leaves the other draws of every request alone.
        let more_errors = run(&json.replace("0.2", "0.5"));
        for (x, y) in a.iter().zip(&more_errors) {
            assert_eq!(x.spiked, y.spiked);
            if x.fault == Fault::Error {
                assert_eq!(y.fault, Fault::Error);
            }
        }
    }

    #[test]
    fn concurrency_does_not_change_which_request_gets_which_fault() {
        let s = Arc::new(
            ChaosSampler::new(spec(r#"{"error_rate": 0.3, "seed": 9}"#).unwrap()).unwrap(),
        );
        let mut seen: Vec<Decision> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let s = Arc::clone(&s);
                    scope.spawn(move || (0..250).map(|_| s.next(1)).collect::<Vec<_>>())
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        seen.sort_by_key(|d| d.request);
        let serial = ChaosSampler::new(s.spec().clone()).unwrap();
        let expected: Vec<Decision> = (0..1000).map(|_| serial.next(1)).collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn rates_and_distributions_within_tolerance() {
        let n = 100_000;
        let s = ChaosSampler::new(
            spec(
                r#"{"error_rate": 0.05, "spike_probability": 0.1, "spike_ms": 100,
                "stall_rate": 0.01, "corrupt_rate": 0.02, "seed": 1}"#,
            )
            .unwrap(),
        )
        .unwrap();
        for _ in 0..n {
            s.next(100);
        }
        let c = s.stats();
        let near = |got: u64, p: f64| {
            let want = p * n as f64;
            // Five binomial standard deviations.
            let tol = 5.0 * (n as f64 * p * (1.0 - p)).sqrt();
            assert!((got as f64 - want).abs() < tol, "{got} vs {want} ± {tol}");
        };
        assert_eq!(c.requests, n);
        near(c.stalls, 0.01);
        near(c.errors, 0.05 * 0.99);
        near(c.corruptions, 0.02 * 0.99 * 0.95);
        near(c.spikes, 0.1);

        let median = |latency: &str| {
            let s =
                ChaosSampler::new(spec(&format!(r#"{{"latency": {latency}}}"#)).unwrap()).unwrap();
            let mut v: Vec<f64> = (0..20_001)
                .map(|_| s.next(0).delay.as_secs_f64() * 1000.0)
                .collect();
            v.sort_by(f64::total_cmp);
            (v[10_000], v[0], v[20_000])
        };
        let (m, lo, hi) = median(r#"{"kind": "uniform", "low_ms": 10, "high_ms": 20}"#);
        assert!(
            (m - 15.0).abs() < 0.3 && lo >= 10.0 && hi <= 20.0,
            "{m} {lo} {hi}"
        );
        let (m, lo, _) = median(r#"{"kind": "normal", "mean_ms": 50, "stdev_ms": 5}"#);
        assert!((m - 50.0).abs() < 0.3 && lo > 20.0, "{m}");
        let (m, lo, _) = median(r#"{"kind": "lognormal", "median_ms": 8, "sigma": 0.5}"#);
        assert!((m - 8.0).abs() < 0.3 && lo > 0.0, "{m}");
        // Pareto median = scale * 2^(1/shape).
        let (m, lo, _) = median(r#"{"kind": "pareto", "scale_ms": 2, "shape": 2}"#);
        assert!((m - 2.0 * 2f64.sqrt()).abs() < 0.1 && lo >= 2.0, "{m}");
        let (m, lo, hi) = median(r#"{"kind": "fixed", "ms": 3}"#);
        assert!(m == 3.0 && lo == 3.0 && hi == 3.0);
    }

    #[test]
    fn outage_window_and_fail_after_requests() {
        let (_d, local) = local_with(b"abcdef");
        let store = ChaosStore::new(
            Arc::clone(&local),
            spec(r#"{"outages": [[0.3, 1.3]]}"#).unwrap(),
        )
        .unwrap();
        let mut buf = [0u8; 3];
        // Wide windows: a loaded machine may pause this thread for a while.
        // No timing fault: the blocking path applies the outage itself.
        store
            .read_into_blocking("obj", 0, &mut buf)
            .unwrap()
            .unwrap();
        let t0 = Instant::now();
        while store.sampler.elapsed_s() < 0.35 {
            std::thread::sleep(Duration::from_millis(5));
            assert!(t0.elapsed() < Duration::from_secs(5));
        }
        let err = store
            .read_into_blocking("obj", 0, &mut buf)
            .unwrap()
            .unwrap_err();
        assert!(err.is_retryable());
        assert!(err.to_string().contains("injected outage"), "{err}");
        assert!(store.size_blocking("obj").unwrap().is_err());
        assert_eq!(store.stats().outage_rejections, 2);
        while store.sampler.elapsed_s() < 1.35 {
            std::thread::sleep(Duration::from_millis(5));
            assert!(t0.elapsed() < Duration::from_secs(5));
        }
        store
            .read_into_blocking("obj", 0, &mut buf)
            .unwrap()
            .unwrap();
        assert_eq!(store.size_blocking("obj").unwrap().unwrap(), 6);
        assert_eq!(store.stats().outage_rejections, 2);

        let store = ChaosStore::new(local, spec(r#"{"fail_after_requests": 2}"#).unwrap()).unwrap();
        for i in 0..5 {
            let r = store.read_into_blocking("obj", 0, &mut buf).unwrap();
            assert_eq!(r.is_ok(), i < 2, "request {i}: {r:?}");
        }
        assert!(store.size_blocking("obj").unwrap().is_err());
        assert_eq!(store.stats().outage_rejections, 4);
    }

    #[test]
    fn corruption_flips_bytes_and_is_counted() {
        let data: Vec<u8> = (0..=255).collect();
        let (_d, local) = local_with(&data);
        let store = ChaosStore::new(local, spec(r#"{"corrupt_rate": 1}"#).unwrap()).unwrap();
        let mut buf = vec![0u8; 256];
        store
            .read_into_blocking("obj", 0, &mut buf)
            .unwrap()
            .unwrap();
        let diff: Vec<usize> = (0..256).filter(|&i| buf[i] != data[i]).collect();
        assert_eq!(diff.len(), 1);
        assert_eq!(buf[diff[0]], data[diff[0]] ^ 0xFF);
        assert_eq!(store.stats().corruptions, 1);
    }

    #[test]
    fn latency_spikes_and_errors_on_the_async_path() {
        let (_d, local) = local_with(b"0123456789");
        let store = ChaosStore::new(
            local,
            spec(
                r#"{"latency": {"kind": "fixed", "ms": 1}, "spike_probability": 0.5,
                "spike_ms": 20, "error_rate": 0.2, "seed": 3}"#,
            )
            .unwrap(),
        )
        .unwrap();
        let mut buf = [0u8; 4];
        assert!(store.read_into_blocking("obj", 0, &mut buf).is_none());
        let rt = rt();
        let reference = ChaosSampler::new(store.spec().clone()).unwrap();
        for _ in 0..40 {
            let expected = reference.next(4);
            let t0 = Instant::now();
            let r = rt.block_on(store.read_into("obj", 2, &mut buf));
            // A sleep never ends early.
            assert!(t0.elapsed() >= expected.delay);
            match expected.fault {
                Fault::Error => assert!(r.unwrap_err().to_string().contains("injected error")),
                _ => assert_eq!(&buf, b"2345"),
            }
        }
        let c = store.stats();
        assert!(c.spikes > 5 && c.errors > 2, "{c:?}");
    }

    #[test]
    fn stall_hangs_until_dropped() {
        let (_d, local) = local_with(b"x");
        let store = ChaosStore::new(local, spec(r#"{"stall_rate": 1}"#).unwrap()).unwrap();
        let mut buf = [0u8; 1];
        let rt = rt();
        let r = rt.block_on(async {
            tokio::time::timeout(
                Duration::from_millis(200),
                store.read_into("obj", 0, &mut buf),
            )
            .await
        });
        assert!(r.is_err(), "a stalled read completed");
        assert_eq!(store.stats().stalls, 1);
    }

    #[test]
    fn bandwidth_queues_reads_on_a_shared_link() {
        let s = ChaosSampler::new(spec(r#"{"bandwidth_bytes_per_s": 1000}"#).unwrap()).unwrap();
        let a = s.next(100).delay.as_secs_f64();
        let b = s.next(100).delay.as_secs_f64();
        // 100 bytes at 1000 B/s: 0.1 s, and the second waits for the first.
        assert!((a - 0.1).abs() < 0.01, "{a}");
        assert!((b - 0.2).abs() < 0.02, "{b}");
    }
}
