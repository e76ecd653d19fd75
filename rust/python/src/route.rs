//! `_core.Rendezvous`: the router's placement function on its own, for
//! inspecting where keys go and for benchmarking against Python hashers.

use feedline_core::route::Rendezvous;
use pyo3::prelude::*;

use crate::errors::IntoPyResult;

#[pyclass(name = "Rendezvous", module = "feedline._core", frozen)]
pub struct PyRendezvous {
    inner: Rendezvous,
    names: Vec<String>,
}

#[pymethods]
impl PyRendezvous {
    #[new]
    #[pyo3(signature = (replicas, weights = None))]
    fn new(replicas: Vec<String>, weights: Option<Vec<f64>>) -> PyResult<Self> {
        let inner = Rendezvous::new(&replicas, weights.as_deref()).py()?;
        Ok(PyRendezvous {
            inner,
            names: replicas,
        })
    }

    /// Replica indices for `key`, best first.
    fn preference_list(&self, key: &str) -> Vec<usize> {
        self.inner.preference_list(key).iter().collect()
    }

    /// The name of `key`'s primary replica.
    fn replica_for(&self, key: &str) -> &str {
        &self.names[self.inner.primary(key)]
    }

    fn __len__(&self) -> usize {
        self.names.len()
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyRendezvous>()
}
