//! `_core.write_manifest` and the dicts that report injected faults and
//! verified bytes.

use std::path::PathBuf;

use feedline_core::chaos::ChaosStats;
use feedline_core::layers::ReplicaFaultStats;
use feedline_core::manifest::Manifest;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::IntoPyResult;

/// Writes the per-block CRC32C manifest of directory `root` and returns its
/// path (default `<root>/.feedline-manifest.json`).
#[pyfunction]
#[pyo3(signature = (root, block_bytes, path = None))]
fn write_manifest(
    py: Python<'_>,
    root: PathBuf,
    block_bytes: u64,
    path: Option<PathBuf>,
) -> PyResult<String> {
    py.detach(|| Manifest::write_for_dir(&root, block_bytes, path.as_deref()))
        .map(|p| p.display().to_string())
        .py()
}

pub fn chaos_stats_dict<'py>(py: Python<'py>, c: &ChaosStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("requests", c.requests)?;
    d.set_item("spikes", c.spikes)?;
    d.set_item("errors", c.errors)?;
    d.set_item("stalls", c.stalls)?;
    d.set_item("corruptions", c.corruptions)?;
    d.set_item("outage_rejections", c.outage_rejections)?;
    Ok(d)
}

pub fn fault_stats_dict<'py>(
    py: Python<'py>,
    s: &ReplicaFaultStats,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("index", s.index)?;
    d.set_item("replica", &s.replica)?;
    match &s.chaos {
        Some(c) => d.set_item("injected", chaos_stats_dict(py, c)?)?,
        None => d.set_item("injected", py.None())?,
    }
    match &s.verify {
        Some(v) => {
            d.set_item("verified_bytes", v.verified_bytes)?;
            d.set_item("checksum_mismatches", v.mismatches)?;
        }
        None => {
            d.set_item("verified_bytes", py.None())?;
            d.set_item("checksum_mismatches", py.None())?;
        }
    }
    Ok(d)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(write_manifest, m)?)
}
