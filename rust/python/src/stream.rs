//! `_core.ChunkStream` and `_core.Chunk`: prefetched ranges handed to Python
//! as read-only buffers over their ring slots, without a copy.

use std::collections::VecDeque;
use std::os::raw::{c_int, c_void};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use feedline_core::prefetch::{Chunk, Next, Stream};
use pyo3::exceptions::{PyBufferError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::MutexExt;

use crate::errors::IntoPyResult;
use crate::storage::LazyPlan;

/// How long one wait for a chunk lasts before Python signals are checked.
const SIGNAL_POLL: Duration = Duration::from_millis(100);

/// Most chunks taken from the ring per crossing into Rust: each `__next__`
/// that finds none ready releases the GIL once, waits for one chunk, and
/// takes every chunk already published behind it (up to this many); the
/// next calls serve those without leaving Python's thread state.
const READY_BATCH: usize = 64;

#[pyclass(name = "ChunkStream", module = "feedline._core", frozen)]
pub struct PyChunkStream {
    inner: Mutex<Option<Stream>>,
    /// Chunks taken from the ring and not yet handed to Python, in plan
    /// order, and the error that ended the stream after them.
    ready: Mutex<Ready>,
    /// Chunks in the plan; `None` for a plan taken from an iterator.
    len: Option<usize>,
    /// The rest of a plan given as an iterator (see `LazyPlan`).
    more: Mutex<Option<LazyPlan>>,
    /// The process that started the prefetch threads: a forked child has
    /// none of them.
    pid: u32,
}

#[derive(Default)]
struct Ready {
    chunks: VecDeque<Chunk>,
    error: Option<feedline_core::Error>,
}

impl Ready {
    /// The next chunk, else the error that ended the stream, else nothing.
    fn pop(&mut self) -> Option<feedline_core::Result<Chunk>> {
        match self.chunks.pop_front() {
            Some(chunk) => Some(Ok(chunk)),
            None => self.error.take().map(Err),
        }
    }
}

impl PyChunkStream {
    pub fn new(stream: Stream) -> Self {
        PyChunkStream {
            len: Some(stream.len()),
            inner: Mutex::new(Some(stream)),
            ready: Mutex::new(Ready::default()),
            more: Mutex::new(None),
            pid: std::process::id(),
        }
    }

    /// A stream over `first`, then over each window of `rest` in turn.
    pub fn lazy(first: Stream, rest: LazyPlan) -> Self {
        PyChunkStream {
            inner: Mutex::new(Some(first)),
            ready: Mutex::new(Ready::default()),
            len: None,
            more: Mutex::new(Some(rest)),
            pid: std::process::id(),
        }
    }

    fn forked(&self) -> bool {
        self.pid != std::process::id()
    }

    fn check_process(&self) -> PyResult<()> {
        if self.forked() {
            return Err(PyRuntimeError::new_err(format!(
                "this stream was started in process {} and its prefetch threads stayed there; \
                 a forked child (a DataLoader worker) must start its own stream",
                self.pid
            )));
        }
        Ok(())
    }

    /// Starts the stream over the next window of a lazy plan; false when
    /// there is none (or the plan was given whole).
    fn next_window(&self, py: Python<'_>) -> PyResult<bool> {
        let mut more = self
            .more
            .lock_py_attached(py)
            .unwrap_or_else(|e| e.into_inner());
        let Some(plan) = more.as_ref() else {
            return Ok(false);
        };
        match plan.next_window(py) {
            Ok(Some(stream)) => {
                *self.inner.lock().unwrap_or_else(|e| e.into_inner()) = Some(stream);
                Ok(true)
            }
            Ok(None) => {
                *more = None;
                Ok(false)
            }
            Err(e) => {
                // A bad entry ends the stream, as it ends a whole plan.
                *more = None;
                Err(e)
            }
        }
    }

    fn pop_ready(&self) -> Option<feedline_core::Result<Chunk>> {
        self.ready.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    /// Waits (up to `SIGNAL_POLL`) for the next chunk and takes those ready
    /// behind it into `ready`. Runs without the GIL.
    fn next_batch(&self) -> feedline_core::Result<Next> {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        // Another thread may have filled `ready` while this one waited for
        // the lock: those chunks come first.
        if let Some(next) = self.pop_ready() {
            return next.map(Next::Chunk);
        }
        let Some(stream) = guard.as_mut() else {
            return Ok(Next::End);
        };
        let next = stream.next_chunk(SIGNAL_POLL);
        if matches!(next, Ok(Next::Chunk(_))) {
            let mut ready = self.ready.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = stream.take_ready(READY_BATCH, &mut ready.chunks) {
                ready.error = Some(e);
            }
        }
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
        match self.forked() {
            // Joining the parent's driver thread would wait for ever.
            true => std::mem::forget(stream),
            false => drop(stream),
        }
        // Chunks taken ahead but never handed out go back to the ring; as
        // before batching, a closed stream yields nothing more.
        let ready = std::mem::take(&mut *self.ready.lock().unwrap_or_else(|e| e.into_inner()));
        drop(ready);
    }
}

#[pymethods]
impl PyChunkStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<PyChunk>> {
        self.check_process()?;
        if let Some(next) = self.pop_ready() {
            return Ok(Some(PyChunk::new(next.py()?)));
        }
        loop {
            match py.detach(|| self.next_batch()).py()? {
                Next::Chunk(chunk) => return Ok(Some(PyChunk::new(chunk))),
                Next::End if self.next_window(py)? => {}
                Next::End => return Ok(None),
                Next::Pending => py.check_signals()?,
            }
        }
    }

    fn __len__(&self) -> PyResult<usize> {
        self.len.ok_or_else(|| {
            PyTypeError::new_err(
                "this stream's plan is an iterator, taken a window at a time: its length is \
                 not known",
            )
        })
    }

    /// Stops the prefetch workers and joins them. Chunks already taken stay
    /// valid. Idempotent.
    fn close(&self, py: Python<'_>) {
        let rest = self
            .more
            .lock_py_attached(py)
            .unwrap_or_else(|e| e.into_inner())
            .take();
        drop(rest);
        py.detach(|| self.close_inner());
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
            && self
                .more
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

impl Drop for PyChunkStream {
    fn drop(&mut self) {
        if self.forked() {
            // The driver thread is the parent's: joining it would wait for ever.
            let stream = self
                .inner
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            std::mem::forget(stream);
        }
    }
}

#[pyclass(name = "Chunk", module = "feedline._core")]
pub struct PyChunk {
    chunk: Option<Chunk>,
    /// Shared with the plan: no copy of the path per chunk.
    path: Arc<str>,
    offset: u64,
    nbytes: usize,
    /// Live buffer views; the slot may not go back while any exists.
    exports: usize,
}

impl PyChunk {
    fn new(chunk: Chunk) -> Self {
        PyChunk {
            path: Arc::clone(&chunk.range.key),
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
