//! `_core.crc32c`: the checksum manifests use, for callers (the bench
//! harness) that verify bytes outside the read path.

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// A read-only view of a caller's buffer, used while the GIL is released.
struct Source(*const u8, usize);
// SAFETY: the PyBuffer keeps the memory alive and exported for the call.
unsafe impl Send for Source {}

/// CRC32C (Castagnoli) of `data`, continuing from `value` (0 to start).
#[pyfunction(name = "crc32c")]
#[pyo3(signature = (data, value = 0))]
fn py_crc32c(py: Python<'_>, data: PyBuffer<u8>, value: u32) -> PyResult<u32> {
    if !data.is_c_contiguous() {
        return Err(PyValueError::new_err(
            "crc32c() needs a C-contiguous buffer",
        ));
    }
    let src = Source(data.buf_ptr() as *const u8, data.len_bytes());
    Ok(py.detach(move || {
        let src = src;
        // SAFETY: see `Source`.
        let bytes = unsafe { std::slice::from_raw_parts(src.0, src.1) };
        ::crc32c::crc32c_append(value, bytes)
    }))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(py_crc32c, m)?)
}
