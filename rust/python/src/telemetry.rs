//! The metrics model for `feedline.metrics`: the definitions table and the
//! process snapshot, as plain Python values.

use feedline_core::telemetry::{self, Kind, Value, DEFINITIONS, LATENCY_BUCKETS_SECONDS};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::IntoPyResult;
use crate::metrics::PyLatencyHistogram;

/// Every metric's name, kind, help, unit, labels, cross-process merge and
/// (histograms) bucket bounds in seconds.
#[pyfunction]
fn metric_definitions(py: Python<'_>) -> PyResult<Vec<Bound<'_, PyDict>>> {
    DEFINITIONS
        .iter()
        .map(|d| {
            let out = PyDict::new(py);
            out.set_item("name", d.name)?;
            out.set_item("kind", d.kind.as_str())?;
            out.set_item("help", d.help)?;
            out.set_item("unit", d.unit)?;
            out.set_item("labels", d.labels.to_vec())?;
            out.set_item("merge", d.merge.as_str())?;
            let buckets: &[f64] = match d.kind {
                Kind::Histogram => LATENCY_BUCKETS_SECONDS,
                _ => &[],
            };
            out.set_item("buckets", buckets.to_vec())?;
            Ok(out)
        })
        .collect()
}

/// One figure for Python: (name, label values, number or histogram).
type PySample = (String, Vec<String>, Py<PyAny>);

/// This process's figures.
#[pyfunction]
fn metrics_snapshot(py: Python<'_>) -> PyResult<Vec<PySample>> {
    let samples = py.detach(telemetry::snapshot);
    samples
        .into_iter()
        .map(|s| {
            let value = match s.value {
                Value::Number(v) => v.into_pyobject(py)?.into_any().unbind(),
                Value::Histogram(h) => Py::new(py, PyLatencyHistogram::from(h))?.into_any(),
            };
            Ok((s.name.to_owned(), s.labels, value))
        })
        .collect()
}

/// Sets a gauge that the data path does not count (the bench's fault
/// windows); only metrics defined as set from outside are accepted.
#[pyfunction]
fn metrics_set_gauge(name: &str, labels: Vec<String>, value: f64) -> PyResult<()> {
    telemetry::set_gauge(name, labels, value).py()
}

/// In the child: forgets the figures inherited from the parent.
#[pyfunction]
fn metrics_after_fork_in_child() {
    telemetry::forget_inherited();
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(metric_definitions, m)?)?;
    m.add_function(wrap_pyfunction!(metrics_snapshot, m)?)?;
    m.add_function(wrap_pyfunction!(metrics_set_gauge, m)?)?;
    m.add_function(wrap_pyfunction!(metrics_after_fork_in_child, m)?)
}
