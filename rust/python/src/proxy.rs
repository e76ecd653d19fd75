//! `_core.FaultProxy` (re-exported as `feedline.testing.FaultProxy`): the
//! core's TCP fault proxy, converted to Python types.

use std::sync::Mutex;

use feedline_proxy::{FaultProxy, ProxyConfig, Toxic};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt};

use crate::errors::IntoPyResult;

#[pyclass(name = "FaultProxy", module = "feedline._core", frozen)]
pub struct PyFaultProxy {
    inner: Mutex<Option<FaultProxy>>,
    address: String,
    port: u16,
    upstream: String,
}

impl PyFaultProxy {
    fn with<T>(&self, f: impl FnOnce(&FaultProxy) -> PyResult<T>) -> PyResult<T> {
        let guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match guard.as_ref() {
            Some(proxy) => f(proxy),
            None => Err(PyValueError::new_err(format!(
                "FaultProxy on {} is closed",
                self.address
            ))),
        }
    }
}

/// A toxic parameter: a real number, not a bool or a string.
fn param_value(name: &str, key: &str, value: &Bound<'_, PyAny>) -> PyResult<f64> {
    let number = !value.is_instance_of::<PyBool>()
        && (value.is_instance_of::<PyInt>() || value.is_instance_of::<PyFloat>());
    if !number {
        return Err(PyValueError::new_err(format!(
            "toxic {name:?}: {key} must be a number, got {}",
            value.repr()?
        )));
    }
    value.extract::<f64>()
}

#[pymethods]
impl PyFaultProxy {
    #[new]
    #[pyo3(signature = (upstream, listen = "127.0.0.1:0", *, seed = 0, allow_non_loopback = false))]
    fn new(
        py: Python<'_>,
        upstream: &str,
        listen: &str,
        seed: i128,
        allow_non_loopback: bool,
    ) -> PyResult<Self> {
        // Taken wide so a negative or huge seed is a ValueError that names
        // it, not an OverflowError about "unsigned".
        let seed = u64::try_from(seed).map_err(|_| {
            PyValueError::new_err(format!("seed must be in [0, 2**64), got {seed}"))
        })?;
        let config = ProxyConfig {
            listen: listen.to_owned(),
            upstream: upstream.to_owned(),
            seed,
            allow_non_loopback,
        };
        let proxy = py.detach(|| FaultProxy::start(config)).py()?;
        let addr = proxy.local_addr();
        Ok(PyFaultProxy {
            address: addr.to_string(),
            port: addr.port(),
            upstream: upstream.to_owned(),
            inner: Mutex::new(Some(proxy)),
        })
    }

    /// `ip:port` the proxy listens on.
    #[getter]
    fn address(&self) -> &str {
        &self.address
    }

    #[getter]
    fn port(&self) -> u16 {
        self.port
    }

    /// `http://ip:port`, for HTTP upstreams.
    #[getter]
    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    #[getter]
    fn upstream(&self) -> &str {
        &self.upstream
    }

    #[pyo3(signature = (name, kind, direction = "downstream", **params))]
    fn add_toxic(
        &self,
        name: &str,
        kind: &str,
        direction: &str,
        params: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<()> {
        let mut values = Vec::new();
        if let Some(params) = params {
            for (key, value) in params.iter() {
                let key: String = key.extract()?;
                let number = param_value(name, &key, &value)?;
                values.push((key, number));
            }
        }
        let toxic = Toxic::from_params(name, kind, direction, &values).py()?;
        self.with(|proxy| proxy.add_toxic(toxic).py())
    }

    fn remove_toxic(&self, name: &str) -> PyResult<()> {
        self.with(|proxy| proxy.remove_toxic(name).py().map(drop))
    }

    /// Each toxic as a dict: name, kind, direction and its parameters.
    fn toxics<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let toxics = self.with(|proxy| Ok(proxy.toxics()))?;
        toxics
            .iter()
            .map(|t| {
                let d = PyDict::new(py);
                d.set_item("name", &t.name)?;
                d.set_item("kind", t.kind.name())?;
                d.set_item("direction", t.direction.as_str())?;
                for (key, value) in t.params() {
                    d.set_item(key, value)?;
                }
                Ok(d)
            })
            .collect()
    }

    /// Counters since start (connections, bytes each way, resets).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.with(|proxy| Ok(proxy.stats()))?;
        let d = PyDict::new(py);
        d.set_item("connections_accepted", s.connections_accepted)?;
        d.set_item("connections_open", s.connections_open)?;
        d.set_item("upstream_connect_failures", s.upstream_connect_failures)?;
        d.set_item("bytes_upstream", s.bytes_upstream)?;
        d.set_item("bytes_downstream", s.bytes_downstream)?;
        d.set_item("resets", s.resets)?;
        Ok(d)
    }

    /// Closes the listener and every open connection. Idempotent.
    fn close(&self, py: Python<'_>) {
        let proxy = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut proxy) = proxy {
            py.detach(|| proxy.stop());
        }
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        _exc_type: Option<&Bound<'_, PyAny>>,
        _exc: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) {
        self.close(py);
    }

    fn __repr__(&self) -> String {
        let state = if self.closed() { ", closed" } else { "" };
        format!(
            "FaultProxy(listen={:?}, upstream={:?}{state})",
            self.address, self.upstream
        )
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyFaultProxy>()
}
