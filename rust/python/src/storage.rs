//! `_core.Storage`: whole-object and ranged reads for `feedline.FileSystem`.

use std::sync::Arc;

use feedline_core::plan::PlanItem;
use feedline_core::prefetch::StreamConfig;
use feedline_core::reader::{Reader, ReaderConfig};
use feedline_core::storage::{threads_for_ranges, RangeRequest, Storage, StorageConfig, WholeRead};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::errors::{to_py, IntoPyResult};
use crate::reader::PyReader;
use crate::stream::PyChunkStream;

#[pyclass(name = "Storage", module = "feedline._core", frozen)]
pub struct PyStorage {
    inner: Arc<Storage>,
}

/// A fresh, unshared `bytes` object's buffer, written before Python sees it.
struct BytesTarget(*mut u8, usize);
// SAFETY: the bytes objects are created here and not shared until filled;
// each target is written by exactly one thread while the GIL is released.
unsafe impl Send for BytesTarget {}
// SAFETY: as above; shared references only hand out disjoint targets.
unsafe impl Sync for BytesTarget {}

impl BytesTarget {
    /// # Safety
    /// At most one live slice per target (see the impls above).
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.0, self.1) }
    }
}

/// A new `bytes` of `len` uninitialised bytes (CPython's documented idiom:
/// `PyBytes_FromStringAndSize(NULL, n)`, then fill before sharing).
fn new_bytes(py: Python<'_>, len: usize) -> PyResult<(Bound<'_, PyBytes>, BytesTarget)> {
    // SAFETY: NULL source asks CPython for an uninitialised buffer of `len`.
    let obj = unsafe {
        Bound::from_owned_ptr_or_err(
            py,
            pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), len as pyo3::ffi::Py_ssize_t),
        )?
    };
    let ptr = unsafe { pyo3::ffi::PyBytes_AsString(obj.as_ptr()) } as *mut u8;
    Ok((obj.cast_into::<PyBytes>()?, BytesTarget(ptr, len)))
}

#[pymethods]
impl PyStorage {
    #[new]
    #[pyo3(signature = (config_json = "{}"))]
    fn new(py: Python<'_>, config_json: &str) -> PyResult<Self> {
        let config = StorageConfig::from_json(config_json).py()?;
        let storage = py.detach(|| Storage::new(config)).py()?;
        Ok(PyStorage {
            inner: Arc::new(storage),
        })
    }

    fn size(&self, py: Python<'_>, key: &str) -> PyResult<u64> {
        py.detach(|| self.inner.size(key)).py()
    }

    #[pyo3(signature = (key, start = None, end = None))]
    fn cat_file<'py>(
        &self,
        py: Python<'py>,
        key: &str,
        start: Option<i64>,
        end: Option<i64>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let whole = is_whole(start, end);
        let plan = py
            .detach(|| match whole {
                true => self.inner.whole_read(key),
                false => Ok(WholeRead::OneRequest),
            })
            .py()?;
        let (offset, len) = match (whole, plan) {
            (true, WholeRead::Sized(size)) => (0, size),
            (true, WholeRead::OneRequest) => {
                // The size comes with the bytes: one copy into `bytes`.
                let data = py.detach(|| self.inner.read_object(key)).py()?;
                return Ok(PyBytes::new(py, &data));
            }
            (false, _) => py
                .detach(|| self.inner.resolve_slice(key, start, end))
                .py()?,
        };
        let (bytes, target) = new_bytes(py, len as usize)?;
        py.detach(move || {
            // SAFETY: the only slice of this fresh bytes object.
            let buf = unsafe { target.slice() };
            self.inner.read_into(key, offset, buf)
        })
        .py()?;
        Ok(bytes)
    }

    /// One `bytes` or exception instance per range, in order.
    fn cat_ranges(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        starts: Vec<Option<i64>>,
        ends: Vec<Option<i64>>,
    ) -> PyResult<Vec<Py<PyAny>>> {
        // Whole objects on a store where one request brings the size: no
        // stats first (see `Storage::whole_read`).
        let all_whole = !keys.is_empty()
            && keys.len() == starts.len()
            && keys.len() == ends.len()
            && starts.iter().zip(&ends).all(|(s, e)| is_whole(*s, *e));
        if all_whole
            && py.detach(|| self.inner.whole_read(&keys[0])).ok() == Some(WholeRead::OneRequest)
        {
            let results = py.detach(|| {
                let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
                self.inner.read_objects(&refs)
            });
            return Ok(results
                .into_iter()
                .map(|r| match r {
                    Ok(data) => PyBytes::new(py, &data).into_any().unbind(),
                    Err(e) => to_py(e).into_value(py).into_any(),
                })
                .collect());
        }
        let spans = py
            .detach(|| self.inner.resolve_slices(&keys, &starts, &ends))
            .py()?;
        let mut out: Vec<Py<PyAny>> = Vec::with_capacity(keys.len());
        let mut targets = Vec::with_capacity(keys.len());
        for span in spans {
            match span {
                Ok((offset, len)) => {
                    let (bytes, target) = new_bytes(py, len as usize)?;
                    out.push(bytes.into_any().unbind());
                    targets.push(Some((offset, target)));
                }
                Err(e) => {
                    out.push(to_py(e).into_value(py).into_any());
                    targets.push(None);
                }
            }
        }
        let results = py.detach(|| {
            let mut requests: Vec<RangeRequest<'_>> = Vec::with_capacity(targets.len());
            let mut index = Vec::with_capacity(targets.len());
            for (i, (key, t)) in keys.iter().zip(&targets).enumerate() {
                if let Some((offset, target)) = t {
                    // SAFETY: one request per fresh bytes object.
                    let buf = unsafe { target.slice() };
                    requests.push(RangeRequest {
                        key,
                        offset: *offset,
                        buf,
                    });
                    index.push(i);
                }
            }
            let threads = threads_for_ranges(requests.len());
            let results = self.inner.read_many(&mut requests, threads);
            index.into_iter().zip(results).collect::<Vec<_>>()
        });
        for (i, result) in results {
            if let Err(e) = result {
                out[i] = to_py(e).into_value(py).into_any();
            }
        }
        Ok(out)
    }

    /// Starts a prefetching stream. `items`: `(key, None)` for a whole
    /// object, `(key, (offset, length))` for a range.
    #[pyo3(signature = (items, chunk_bytes, depth, memory_budget_bytes = None))]
    fn stream(
        &self,
        py: Python<'_>,
        items: Vec<(String, Option<(i64, i64)>)>,
        chunk_bytes: usize,
        depth: usize,
        memory_budget_bytes: Option<usize>,
    ) -> PyResult<PyChunkStream> {
        let items: Vec<PlanItem> = items
            .into_iter()
            .map(|(key, range)| match range {
                None => PlanItem::Object(key),
                Some((offset, len)) => PlanItem::Range { key, offset, len },
            })
            .collect();
        let mut config = StreamConfig::new(chunk_bytes, depth);
        if let Some(budget) = memory_budget_bytes {
            config.memory_budget_bytes = budget;
        }
        let stream = py.detach(|| self.inner.stream(&items, &config)).py()?;
        Ok(PyChunkStream::new(stream))
    }

    /// Per-replica and end-to-end read figures as JSON; `reset` clears
    /// them after reading.
    #[pyo3(signature = (reset = false))]
    fn stats_json(&self, py: Python<'_>, reset: bool) -> String {
        py.detach(|| self.inner.stats_json(reset))
    }

    #[pyo3(signature = (key, chunk_bytes, depth, direct_bytes))]
    fn open_reader(
        &self,
        py: Python<'_>,
        key: &str,
        chunk_bytes: usize,
        depth: usize,
        direct_bytes: usize,
    ) -> PyResult<PyReader> {
        let config = ReaderConfig {
            chunk_bytes,
            depth,
            direct_bytes,
        };
        let reader = py
            .detach(|| Reader::open(Arc::clone(&self.inner), key, config))
            .py()?;
        Ok(PyReader::new(reader))
    }

    /// Per replica: faults injected by chaos and bytes verified against the
    /// manifest (`None` where that layer is off).
    fn fault_stats<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.inner
            .fault_stats()
            .iter()
            .map(|s| crate::manifest::fault_stats_dict(py, s))
            .collect()
    }
}

/// `cat_file(path, start, end)` asks for the whole object.
fn is_whole(start: Option<i64>, end: Option<i64>) -> bool {
    matches!(start, None | Some(0)) && end.is_none()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyStorage>()
}
