//! `_core.ChunkStream` and `_core.Chunk`: prefetched ranges handed to Python
//! as read-only buffers over their ring slots, without a copy.

use std::os::raw::{c_int, c_void};
use std::sync::Mutex;
use std::time::Duration;

use feedline_core::prefetch::{Chunk, Next, Stream};
use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::prelude::*;

use crate::errors::IntoPyResult;

/// How long one wait for a chunk lasts before Python signals are checked.
const SIGNAL_POLL: Duration = Duration::from_millis(100);

#[pyclass(name = "ChunkStream", module = "feedline._core", frozen)]
pub struct PyChunkStream {
    inner: Mutex<Option<Stream>>,
    len: usize,
}

impl PyChunkStream {
    pub fn new(stream: Stream) -> Self {
        let len = stream.len();
        PyChunkStream {
            inner: Mutex::new(Some(stream)),
            len,
        }
    }

    fn next_once(&self) -> feedline_core::Result<Next> {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(stream) = guard.as_mut() else {
            return Ok(Next::End);
        };
        let next = stream.next_chunk(SIGNAL_POLL);
        if matches!(next, Ok(Next::End)) || stream.is_closed() {
            // Done, or failed (the core closed it): join the driver now
            // rather than at GC. An error that leaves the stream open (all
            // slots held) lets the caller release a chunk and go on.
            guard.take();
        }
        next
    }

    fn close_inner(&self) {
        let stream = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(stream);
    }
}

#[pymethods]
impl PyChunkStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<PyChunk>> {
        loop {
            match py.detach(|| self.next_once()).py()? {
                Next::Chunk(chunk) => return Ok(Some(PyChunk::new(chunk))),
                Next::End => return Ok(None),
                Next::Pending => py.check_signals()?,
            }
        }
    }

    fn __len__(&self) -> usize {
        self.len
    }

    /// Stops the prefetch workers and joins them. Chunks already taken stay
    /// valid. Idempotent.
    fn close(&self, py: Python<'_>) {
        py.detach(|| self.close_inner());
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
}

#[pyclass(name = "Chunk", module = "feedline._core")]
pub struct PyChunk {
    chunk: Option<Chunk>,
    path: String,
    offset: u64,
    nbytes: usize,
    /// Live buffer views; the slot may not go back while any exists.
    exports: usize,
}

impl PyChunk {
    fn new(chunk: Chunk) -> Self {
        PyChunk {
            path: chunk.range.key.to_string(),
            offset: chunk.range.offset,
            nbytes: chunk.len(),
            chunk: Some(chunk),
            exports: 0,
        }
    }

    fn live(&self) -> PyResult<&Chunk> {
        self.chunk.as_ref().ok_or_else(|| {
            PyValueError::new_err(format!(
                "chunk of {:?} at offset {} was released",
                self.path, self.offset
            ))
        })
    }
}

#[pymethods]
impl PyChunk {
    #[getter]
    fn path(&self) -> &str {
        &self.path
    }

    #[getter]
    fn offset(&self) -> u64 {
        self.offset
    }

    #[getter]
    fn nbytes(&self) -> usize {
        self.nbytes
    }

    #[getter]
    fn released(&self) -> bool {
        self.chunk.is_none()
    }

    /// Address of the first byte in the slot (as `pyarrow.Buffer.address`).
    #[getter]
    fn address(&self) -> PyResult<usize> {
        Ok(self.live()?.as_ptr() as usize)
    }

    fn __len__(&self) -> usize {
        self.nbytes
    }

    fn __repr__(&self) -> String {
        let state = if self.chunk.is_some() {
            ""
        } else {
            ", released"
        };
        format!(
            "Chunk(path={:?}, offset={}, nbytes={}{})",
            self.path, self.offset, self.nbytes, state
        )
    }

    /// Returns the slot to the ring. Refused while buffer views (memoryview,
    /// numpy arrays, Arrow buffers) still point into it.
    fn release(&mut self) -> PyResult<()> {
        if self.exports > 0 {
            return Err(PyBufferError::new_err(format!(
                "cannot release chunk of {:?} at offset {}: {} buffer view(s) still exported",
                self.path, self.offset, self.exports
            )));
        }
        self.chunk = None;
        Ok(())
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __exit__(
        &mut self,
        _exc_type: Option<&Bound<'_, PyAny>>,
        _exc: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        self.release()
    }

    unsafe fn __getbuffer__(
        mut slf: PyRefMut<'_, Self>,
        view: *mut pyo3::ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let (ptr, len) = {
            let chunk = slf.live()?;
            (chunk.as_ptr(), chunk.len())
        };
        // SAFETY: `view` comes from CPython; FillInfo sets `view.obj` to this
        // chunk (a new reference), so the slot outlives every view of it.
        // readonly=1: a request for a writable buffer raises BufferError.
        let rc = unsafe {
            pyo3::ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                ptr as *mut c_void,
                len as pyo3::ffi::Py_ssize_t,
                1,
                flags,
            )
        };
        if rc != 0 {
            return Err(PyErr::fetch(slf.py()));
        }
        slf.exports += 1;
        Ok(())
    }

    unsafe fn __releasebuffer__(&mut self, _view: *mut pyo3::ffi::Py_buffer) {
        self.exports -= 1;
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyChunkStream>()?;
    m.add_class::<PyChunk>()
}
