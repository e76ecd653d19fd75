//! `_core.ChaosSampler`: the Rust chaos decision function, for the Python
//! fsspec wrapper that applies the same faults to baseline filesystems.

use feedline_core::chaos::{ChaosSampler, Fault};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::config::PyChaos;
use crate::errors::IntoPyResult;

#[pyclass(name = "ChaosSampler", module = "feedline._core", frozen)]
pub struct PyChaosSampler {
    inner: ChaosSampler,
}

#[pymethods]
impl PyChaosSampler {
    #[new]
    fn new(chaos: &PyChaos) -> PyResult<Self> {
        Ok(PyChaosSampler {
            inner: ChaosSampler::new(chaos.inner.clone()).py()?,
        })
    }

    /// The next request's fate: `(delay_ms, kind, corrupt_at)`; `kind` is
    /// "none", "corrupt", "error", "stall" or "outage", `corrupt_at` the
    /// index of the byte to flip (or `None`).
    fn next(&self, nbytes: usize) -> (f64, &'static str, Option<usize>) {
        let d = self.inner.next(nbytes);
        let corrupt_at = match d.fault {
            Fault::Corrupt { index } => Some(index),
            _ => None,
        };
        (d.delay.as_secs_f64() * 1000.0, d.fault.kind(), corrupt_at)
    }

    /// How many of each fault were injected so far.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        crate::manifest::chaos_stats_dict(py, &self.inner.stats())
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyChaosSampler>()
}
