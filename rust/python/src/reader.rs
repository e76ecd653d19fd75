//! `_core.Reader`: the engine behind `feedline.open(...)`'s file object.

use std::sync::Mutex;

use feedline_core::reader::Reader;
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::errors::IntoPyResult;
use crate::signals::detach_interruptible;

#[pyclass(name = "Reader", module = "feedline._core", frozen)]
pub struct PyReader {
    inner: Mutex<Option<Reader>>,
    size: u64,
}

/// A caller's writable buffer, filled while the GIL is released.
struct Target(*mut u8, usize);
// SAFETY: the PyBuffer keeps the memory alive and exported for the whole
// call; only this call writes into it.
unsafe impl Send for Target {}

impl PyReader {
    pub fn new(reader: Reader) -> Self {
        PyReader {
            size: reader.size(),
            inner: Mutex::new(Some(reader)),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Reader) -> feedline_core::Result<T>) -> PyResult<T> {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let reader = guard
            .as_mut()
            .ok_or_else(|| PyValueError::new_err("I/O operation on closed file"))?;
        f(reader).py()
    }
}

#[pymethods]
impl PyReader {
    #[getter]
    fn size(&self) -> u64 {
        self.size
    }

    fn tell(&self) -> PyResult<u64> {
        self.with(|r| Ok(r.tell()))
    }

    fn seek(&self, pos: u64) -> PyResult<u64> {
        self.with(|r| {
            r.seek(pos);
            Ok(pos)
        })
    }

    #[getter]
    fn reading_ahead(&self) -> PyResult<bool> {
        self.with(|r| Ok(r.is_reading_ahead()))
    }

    /// Fills the writable, C-contiguous `buffer`; returns bytes read.
    fn readinto(&self, py: Python<'_>, buffer: PyBuffer<u8>) -> PyResult<usize> {
        if buffer.readonly() {
            return Err(PyTypeError::new_err("readinto() needs a writable buffer"));
        }
        if !buffer.is_c_contiguous() {
            return Err(PyValueError::new_err(
                "readinto() needs a C-contiguous buffer",
            ));
        }
        let target = Target(buffer.buf_ptr() as *mut u8, buffer.len_bytes());
        detach_interruptible(py, move || {
            let target = target;
            // SAFETY: see `Target`.
            let buf = unsafe { std::slice::from_raw_parts_mut(target.0, target.1) };
            self.with(|r| r.read_into(buf))
        })?
    }

    /// Reads up to `size` bytes (all that is left when `size` < 0).
    #[pyo3(signature = (size = -1), text_signature = "(self, /, size=-1)")]
    fn read<'py>(&self, py: Python<'py>, size: i64) -> PyResult<Bound<'py, PyBytes>> {
        let left = self.with(|r| Ok(r.size().saturating_sub(r.tell())))?;
        let n = if size < 0 {
            left
        } else {
            (size as u64).min(left)
        };
        PyBytes::new_with(py, n as usize, |buf| {
            detach_interruptible(py, || self.with(|r| r.read_into(buf)))?.map(|_| ())
        })
    }

    fn close(&self, py: Python<'_>) {
        let reader = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        py.detach(|| drop(reader));
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyReader>()
}
