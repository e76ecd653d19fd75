//! `_core.LatencyHistogram`: the core's HDR latency histogram, so the bench
//! harness reports percentiles computed exactly like `fs.stats()`'s.

use std::sync::Mutex;

use feedline_core::metrics::LatencyHistogram;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::errors::IntoPyResult;

#[pyclass(name = "LatencyHistogram", module = "feedline._core", frozen)]
pub struct PyLatencyHistogram {
    // A mutex (not `&mut self`) so reader threads can record into one
    // histogram without PyO3's borrow checker raising on contention.
    inner: Mutex<LatencyHistogram>,
}

impl PyLatencyHistogram {
    fn lock(&self) -> std::sync::MutexGuard<'_, LatencyHistogram> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl From<LatencyHistogram> for PyLatencyHistogram {
    fn from(hist: LatencyHistogram) -> Self {
        PyLatencyHistogram {
            inner: Mutex::new(hist),
        }
    }
}

fn check_percentile(percentile: f64) -> PyResult<f64> {
    if percentile.is_finite() && percentile > 0.0 && percentile <= 100.0 {
        Ok(percentile)
    } else {
        Err(PyValueError::new_err(format!(
            "percentile must be in (0, 100], got {percentile}"
        )))
    }
}

#[pymethods]
impl PyLatencyHistogram {
    #[new]
    fn new() -> Self {
        PyLatencyHistogram {
            inner: Mutex::new(LatencyHistogram::new()),
        }
    }

    /// Records one latency in microseconds (clamped to [1 µs, 1 h]).
    fn record_us(&self, us: u64) {
        self.lock().record_us(us);
    }

    /// Records many latencies in microseconds under one lock.
    fn record_many_us(&self, values: Vec<u64>) {
        let mut hist = self.lock();
        for us in values {
            hist.record_us(us);
        }
    }

    #[getter]
    fn count(&self) -> u64 {
        self.lock().count()
    }

    fn __len__(&self) -> usize {
        self.lock().count() as usize
    }

    /// The latency at `percentile` (0 < p ≤ 100) in milliseconds; 0.0 when empty.
    fn percentile_ms(&self, percentile: f64) -> PyResult<f64> {
        let p = check_percentile(percentile)?;
        Ok(self.lock().percentile_ms(p))
    }

    /// count, mean_ms, p50_ms, p90_ms, p99_ms, p99.9_ms, max_ms.
    fn summary<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.lock().summary();
        let d = PyDict::new(py);
        d.set_item("count", s.count)?;
        d.set_item("mean_ms", s.mean_ms)?;
        d.set_item("p50_ms", s.p50_ms)?;
        d.set_item("p90_ms", s.p90_ms)?;
        d.set_item("p99_ms", s.p99_ms)?;
        d.set_item("p99.9_ms", s.p999_ms)?;
        d.set_item("max_ms", s.max_ms)?;
        Ok(d)
    }

    /// How many values are at or below each bound in seconds (ascending):
    /// Prometheus' cumulative classic buckets.
    fn cumulative_counts(&self, bounds_seconds: Vec<f64>) -> Vec<u64> {
        self.lock().cumulative_counts(&bounds_seconds)
    }

    /// The sum of recorded values in seconds.
    #[getter]
    fn sum_seconds(&self) -> f64 {
        self.lock().sum_seconds()
    }

    /// Adds every value recorded in `other` to this histogram.
    fn merge(&self, other: &PyLatencyHistogram) {
        if std::ptr::eq(self, other) {
            let copy = self.lock().clone();
            self.lock().merge(&copy);
            return;
        }
        let theirs = other.lock().clone();
        self.lock().merge(&theirs);
    }

    fn reset(&self) {
        self.lock().reset();
    }

    /// Every recorded bucket as bytes, for shipping to another process.
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.lock().to_bytes())
    }

    /// The histogram `to_bytes` wrote; merging such copies is exact.
    #[staticmethod]
    fn from_bytes(data: &[u8]) -> PyResult<Self> {
        Ok(LatencyHistogram::from_bytes(data).py()?.into())
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyLatencyHistogram>()
}
