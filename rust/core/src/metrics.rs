//! Latency histograms (HDR) and the percentile summary every report uses.
//! One type for per-replica stats, per-stage stats and the bench harness, so
//! a "p99" means the same everywhere.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency recorded exactly: one hour. Longer values are clamped
/// to it (and still counted), never dropped.
const MAX_TRACKABLE_US: u64 = 3_600_000_000;

/// The percentiles reported everywhere, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    #[serde(rename = "p99.9_ms")]
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// First bytes of [`LatencyHistogram::to_bytes`]: format 1, then a u64
/// bucket count and per bucket (highest equivalent value in µs, count), all
/// little-endian.
pub const HISTOGRAM_MAGIC: &[u8] = b"FLH1";

/// An HDR histogram of latencies in microseconds, 3 significant digits.
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    hist: Histogram<u64>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    pub fn new() -> Self {
        LatencyHistogram {
            hist: Histogram::new_with_bounds(1, MAX_TRACKABLE_US, 3)
                .expect("static bounds are valid"),
        }
    }

    pub fn record_us(&mut self, us: u64) {
        self.hist.saturating_record(us.clamp(1, MAX_TRACKABLE_US));
    }

    pub fn record(&mut self, elapsed: std::time::Duration) {
        self.record_us(elapsed.as_micros().min(u64::MAX as u128) as u64);
    }

    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// The latency at `percentile` (0 < p ≤ 100), in milliseconds.
    pub fn percentile_ms(&self, percentile: f64) -> f64 {
        if self.hist.is_empty() {
            return 0.0;
        }
        self.hist.value_at_percentile(percentile) as f64 / 1000.0
    }

    /// How many recorded values are at or below each bound (seconds,
    /// ascending): Prometheus' cumulative classic buckets. A value counts
    /// under a bound when its HDR bucket's highest equivalent value does,
    /// so counts are exact to the histogram's 3 significant digits.
    pub fn cumulative_counts(&self, bounds_seconds: &[f64]) -> Vec<u64> {
        bounds_seconds
            .iter()
            .map(|b| {
                let us = (b * 1e6).clamp(0.0, MAX_TRACKABLE_US as f64) as u64;
                self.hist
                    .iter_recorded()
                    .take_while(|v| v.value_iterated_to() <= us)
                    .map(|v| v.count_at_value())
                    .sum()
            })
            .collect()
    }

    /// The sum of recorded values in seconds (mean × count).
    pub fn sum_seconds(&self) -> f64 {
        if self.hist.is_empty() {
            return 0.0;
        }
        self.hist.mean() * self.hist.len() as f64 / 1e6
    }

    pub fn merge(&mut self, other: &LatencyHistogram) {
        // Same bounds by construction, so `add` cannot fail.
        let _ = self.hist.add(&other.hist);
    }

    pub fn reset(&mut self) {
        self.hist.reset();
    }

    /// Every recorded bucket as bytes (see [`HISTOGRAM_MAGIC`]): ranks ship
    /// these to one place, and [`LatencyHistogram::from_bytes`] rebuilds a
    /// histogram whose merge is exact (same buckets, same counts), so the
    /// job-wide p99.9 is that of all samples pooled.
    pub fn to_bytes(&self) -> Vec<u8> {
        let buckets: Vec<(u64, u64)> = self
            .hist
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect();
        let mut out = Vec::with_capacity(HISTOGRAM_MAGIC.len() + 8 + 16 * buckets.len());
        out.extend_from_slice(HISTOGRAM_MAGIC);
        out.extend_from_slice(&(buckets.len() as u64).to_le_bytes());
        for (value, count) in buckets {
            out.extend_from_slice(&value.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
        }
        out
    }

    /// The histogram [`LatencyHistogram::to_bytes`] wrote.
    pub fn from_bytes(bytes: &[u8]) -> crate::Result<LatencyHistogram> {
        let bad = |why: &str| {
            crate::Error::InvalidArgument(format!(
                "not a feedline latency histogram ({} bytes): {why}",
                bytes.len()
            ))
        };
        let body = bytes
            .strip_prefix(HISTOGRAM_MAGIC)
            .ok_or_else(|| bad("it does not start with FLH1"))?;
        let (len, pairs) = body.split_at_checked(8).ok_or_else(|| bad("truncated"))?;
        let n = u64::from_le_bytes(len.try_into().expect("8 bytes"));
        if pairs.len() as u64 != n.saturating_mul(16) {
            return Err(bad(&format!(
                "{n} buckets need {} bytes",
                n.saturating_mul(16)
            )));
        }
        let mut hist = LatencyHistogram::new();
        for pair in pairs.chunks_exact(16) {
            let value = u64::from_le_bytes(pair[..8].try_into().expect("8 bytes"));
            let count = u64::from_le_bytes(pair[8..].try_into().expect("8 bytes"));
            if !(1..=MAX_TRACKABLE_US).contains(&value) {
                return Err(bad(&format!("bucket value {value} µs is out of range")));
            }
            hist.hist.saturating_record_n(value, count);
        }
        Ok(hist)
    }

    pub fn summary(&self) -> LatencySummary {
        if self.hist.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: self.hist.len(),
            mean_ms: self.hist.mean() / 1000.0,
            p50_ms: self.percentile_ms(50.0),
            p90_ms: self.percentile_ms(90.0),
            p99_ms: self.percentile_ms(99.0),
            p999_ms: self.percentile_ms(99.9),
            max_ms: self.hist.max() as f64 / 1000.0,
        }
    }
}

/// Latencies that a stats reset restarts for reporting while decisions keep
/// the window before it: the adaptive hedge delay reads `percentile`, which
/// falls back on the previous window until the current one holds enough
/// samples, so `stats(reset=True)` (a monitoring call) never switches
/// hedging off.
#[derive(Debug, Clone, Default)]
pub struct LatencyWindow {
    current: LatencyHistogram,
    previous: LatencyHistogram,
}

impl LatencyWindow {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn record(&mut self, elapsed: std::time::Duration) {
        self.current.record(elapsed);
    }

    /// The current window (what stats report).
    pub fn current(&self) -> &LatencyHistogram {
        &self.current
    }

    /// Starts a new window; the old one is kept for `percentile`.
    pub fn restart(&mut self) {
        std::mem::swap(&mut self.current, &mut self.previous);
        self.current.reset();
    }

    /// The latency at `percentile` from the current window once it has
    /// `min_samples`, else from the previous one if that has them.
    pub fn percentile(&self, percentile: f64, min_samples: u64) -> Option<std::time::Duration> {
        [&self.current, &self.previous]
            .into_iter()
            .find(|h| h.count() >= min_samples.max(1))
            .map(|h| std::time::Duration::from_secs_f64(h.percentile_ms(percentile) / 1000.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_track_the_tail() {
        let mut h = LatencyHistogram::new();
        for _ in 0..990 {
            h.record_us(1_000);
        }
        for _ in 0..10 {
            h.record_us(200_000);
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        assert!((s.p50_ms - 1.0).abs() < 0.01, "{s:?}");
        assert!((s.p99_ms - 1.0).abs() < 0.01, "{s:?}");
        assert!((s.p999_ms - 200.0).abs() < 0.5, "{s:?}");
        assert!((s.max_ms - 200.0).abs() < 0.5, "{s:?}");
    }

    #[test]
    fn empty_and_huge_values_are_safe() {
        let mut h = LatencyHistogram::new();
        assert_eq!(h.summary(), LatencySummary::default());
        h.record_us(u64::MAX);
        h.record_us(0);
        assert_eq!(h.count(), 2);
        let mut g = LatencyHistogram::new();
        g.merge(&h);
        assert_eq!(g.count(), 2);
        g.reset();
        assert_eq!(g.count(), 0);
    }

    #[test]
    fn bytes_round_trip_merges_exactly() {
        let (mut a, mut b, mut pooled) = (
            LatencyHistogram::new(),
            LatencyHistogram::new(),
            LatencyHistogram::new(),
        );
        for i in 0..5_000u64 {
            let us = 1 + i * i % 900_001;
            if i % 3 == 0 {
                a.record_us(us)
            } else {
                b.record_us(us)
            }
            pooled.record_us(us);
        }
        let mut merged = LatencyHistogram::from_bytes(&a.to_bytes()).unwrap();
        merged.merge(&LatencyHistogram::from_bytes(&b.to_bytes()).unwrap());
        assert_eq!(merged.summary(), pooled.summary());
        for p in [50.0, 99.0, 99.9, 99.99] {
            assert_eq!(merged.percentile_ms(p), pooled.percentile_ms(p));
        }
        let empty = LatencyHistogram::from_bytes(&LatencyHistogram::new().to_bytes()).unwrap();
        assert_eq!(empty.count(), 0);
    }

    #[test]
    fn cumulative_counts_are_classic_buckets() {
        let mut h = LatencyHistogram::new();
        for us in [50, 900, 900, 20_000, 3_000_000] {
            h.record_us(us);
        }
        assert_eq!(
            h.cumulative_counts(&[0.0001, 0.001, 0.1, 10.0]),
            [1, 3, 4, 5]
        );
        assert!(
            (h.sum_seconds() - 3.02185).abs() < 0.01,
            "{}",
            h.sum_seconds()
        );
    }

    #[test]
    fn bad_histogram_bytes_are_refused() {
        let good = {
            let mut h = LatencyHistogram::new();
            h.record_us(5);
            h.to_bytes()
        };
        for bad in [&b"nope"[..], &good[..good.len() - 1], b"FLH1"] {
            let err = LatencyHistogram::from_bytes(bad).unwrap_err().to_string();
            assert!(err.contains("not a feedline latency histogram"), "{err}");
        }
        let mut zero = good.clone();
        zero[12..20].copy_from_slice(&0u64.to_le_bytes());
        assert!(LatencyHistogram::from_bytes(&zero).is_err());
    }

    #[test]
    fn a_restarted_window_answers_from_the_previous_one_until_it_fills() {
        let mut w = LatencyWindow::new();
        assert_eq!(w.percentile(95.0, 3), None);
        for ms in [10, 10, 10] {
            w.record(std::time::Duration::from_millis(ms));
        }
        let ten = w.percentile(95.0, 3).unwrap();
        assert!((ten.as_secs_f64() - 0.010).abs() < 1e-4, "{ten:?}");
        w.restart();
        assert_eq!(w.current().count(), 0, "stats start again");
        assert_eq!(
            w.percentile(95.0, 3),
            Some(ten),
            "decisions keep the old window"
        );
        for ms in [40, 40, 40] {
            w.record(std::time::Duration::from_millis(ms));
        }
        let forty = w.percentile(95.0, 3).unwrap();
        assert!((forty.as_secs_f64() - 0.040).abs() < 1e-4, "{forty:?}");
        w.restart();
        w.restart();
        assert_eq!(
            w.percentile(95.0, 3),
            None,
            "two restarts without reads forget"
        );
    }
}
