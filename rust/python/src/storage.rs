//! `_core.Storage`: whole-object and ranged reads for `feedline.FileSystem`.

use std::collections::HashMap;
use std::sync::Arc;

use feedline_core::plan::PlanItem;
use feedline_core::prefetch::{Stream, StreamConfig};
use feedline_core::reader::{Reader, ReaderConfig};
use feedline_core::storage::{threads_for_ranges, RangeRequest, Storage, StorageConfig, WholeRead};
use pyo3::exceptions::{PyOverflowError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyIterator, PyString, PyTuple};

use crate::errors::{to_py, IntoPyResult};
use crate::metadata::ObjectMeta;
use crate::metrics::PyLatencyHistogram;
use crate::reader::PyReader;
use crate::signals::detach_interruptible;
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

/// The keys of a batch as distinct strings and one index per key. A batch
/// names a few files many times, usually as the very same `str` object (fs.py
/// resolves each path once): that object is recognised by identity and not
/// converted again, so no `String` is made per range.
fn distinct_keys(keys: &Bound<'_, PyAny>) -> PyResult<(Vec<String>, Vec<usize>)> {
    if keys.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(
            "keys must be a list of str, got one str",
        ));
    }
    let mut distinct: Vec<String> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut index: Vec<usize> = Vec::with_capacity(keys.len().unwrap_or(0));
    // The previous key object, held so its address cannot be reused by
    // another object while it is compared against.
    let mut last: Option<(Bound<'_, PyAny>, usize)> = None;
    for item in keys.try_iter()? {
        let item = item?;
        if let Some((prev, i)) = &last {
            if prev.is(&item) {
                index.push(*i);
                continue;
            }
        }
        let key = item.cast::<PyString>().map_err(|_| {
            PyTypeError::new_err(format!("keys must be str, got {}", describe(&item)))
        })?;
        let key = key.to_str()?;
        let i = match seen.get(key) {
            Some(&i) => i,
            None => {
                distinct.push(key.to_owned());
                seen.insert(key.to_owned(), distinct.len() - 1);
                distinct.len() - 1
            }
        };
        index.push(i);
        last = Some((item, i));
    }
    Ok((distinct, index))
}

/// A byte offset, end or length from Python: an int (or `__index__`),
/// never a float; one past `i64` is a `ValueError` naming it, not C-long
/// jargon.
struct Offset(i64);

impl<'a, 'py> FromPyObject<'a, 'py> for Offset {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        match obj.extract::<i64>() {
            Ok(v) => Ok(Offset(v)),
            Err(e) if e.is_instance_of::<PyOverflowError>(obj.py()) => {
                Err(PyValueError::new_err(format!(
                    "byte position {} is out of range: offsets and lengths must lie within \
                     ±2**63",
                    obj.as_any()
                )))
            }
            Err(e) => Err(e),
        }
    }
}

fn offsets(values: Vec<Option<Offset>>) -> Vec<Option<i64>> {
    values.into_iter().map(|v| v.map(|o| o.0)).collect()
}

/// Entries taken at a time from a plan that is an iterator (a generator,
/// `itertools.repeat`): the look-ahead of such a stream. Each window
/// starts a core stream of its own; the pause between two is one read's
/// latency per this many entries.
const PLAN_WINDOW: usize = 4096;

/// The part of a plan not yet taken from its iterator, and what reading it
/// needs.
pub struct LazyPlan {
    entries: Py<PyIterator>,
    key_of: Py<PyAny>,
    storage: Arc<Storage>,
    config: StreamConfig,
}

impl LazyPlan {
    /// A stream over the next window of entries; `None` once the iterator
    /// is exhausted.
    pub fn next_window(&self, py: Python<'_>) -> PyResult<Option<Stream>> {
        let items = plan_items(self.entries.bind(py), self.key_of.bind(py), PLAN_WINDOW)?;
        if items.is_empty() {
            return Ok(None);
        }
        let stream = detach_interruptible(py, || self.storage.stream(&items, &self.config))?;
        stream.py().map(Some)
    }
}

/// Converts up to `limit` entries of a Python plan to plan items. Plans run
/// to hundreds of thousands of entries naming a few files, so a path object
/// is recognised by identity (then by value) and `key_of` runs once per
/// distinct path.
fn plan_items<'py>(
    entries: &Bound<'py, PyIterator>,
    key_of: &Bound<'py, PyAny>,
    limit: usize,
) -> PyResult<Vec<PlanItem>> {
    let py = entries.py();
    let mut items = Vec::new();
    let mut keys: HashMap<String, Arc<str>> = HashMap::new();
    // The previous path object, held so its address is not reused by
    // another object while it is compared against.
    let mut last: Option<(Bound<'py, PyAny>, Arc<str>)> = None;
    let mut key_for = |path: Bound<'py, PyAny>| -> PyResult<Arc<str>> {
        if let Some((prev, key)) = &last {
            if prev.is(&path) {
                return Ok(Arc::clone(key));
            }
        }
        let fspath: String = match path.cast::<PyString>() {
            Ok(s) => s.to_str()?.to_owned(),
            Err(_) => py
                .import("os")?
                .call_method1("fspath", (&path,))?
                .extract()?,
        };
        let key = match keys.get(&fspath) {
            Some(key) => Arc::clone(key),
            None => {
                let key: String = key_of.call1((fspath.as_str(),))?.extract()?;
                let key: Arc<str> = key.into();
                keys.insert(fspath, Arc::clone(&key));
                key
            }
        };
        last = Some((path, Arc::clone(&key)));
        Ok(key)
    };
    // Ints (and anything with `__index__`) only: `int(1.9)` would read
    // from offset 1 without a word.
    let int = |entry: &Bound<'py, PyAny>, what: &str, v: Bound<'py, PyAny>| -> PyResult<i64> {
        v.extract::<Offset>().map(|o| o.0).map_err(|e| {
            let detail = match e.is_instance_of::<PyTypeError>(py) {
                true => format!("must be an int, got {}", describe(&v)),
                false => format!(
                    "{} is out of range: offsets and lengths must lie within ±2**63",
                    describe(&v)
                ),
            };
            let err = format!("plan entry {}: {what} {detail}", describe(entry));
            match e.is_instance_of::<PyTypeError>(py) {
                true => PyTypeError::new_err(err),
                false => PyValueError::new_err(err),
            }
        })
    };
    for entry in entries.clone().take(limit) {
        let entry = entry?;
        if let Ok(t) = entry.cast::<PyTuple>() {
            if t.len() == 3 {
                let key = key_for(t.get_item(0)?)?;
                let offset = int(&entry, "offset", t.get_item(1)?)?;
                let len = int(&entry, "length", t.get_item(2)?)?;
                items.push(PlanItem::Range { key, offset, len });
                continue;
            }
        } else if entry.is_instance_of::<PyString>() || entry.hasattr("__fspath__")? {
            items.push(PlanItem::Object(key_for(entry)?));
            continue;
        }
        return Err(PyTypeError::new_err(format!(
            "a plan entry is a path or a (path, offset, length) tuple, got {}",
            describe(&entry)
        )));
    }
    Ok(items)
}

fn describe(item: &Bound<'_, PyAny>) -> String {
    item.repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| "an unprintable object".into())
}

#[pymethods]
impl PyStorage {
    /// From the configuration's options, flat or in sections (see
    /// `feedline_core::config::StorageConfig::from_value`).
    #[new]
    #[pyo3(signature = (options = None))]
    fn new(py: Python<'_>, options: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let config = StorageConfig::from_value(crate::config::kwargs_value(options)?).py()?;
        let storage = py.detach(|| Storage::new(config)).py()?;
        Ok(PyStorage {
            inner: Arc::new(storage),
        })
    }

    /// The configuration in force, defaults filled in, credentials redacted.
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        crate::config::serialized(py, self.inner.config())
    }

    fn size(&self, py: Python<'_>, key: &str) -> PyResult<u64> {
        detach_interruptible(py, || self.inner.size(key))?.py()
    }

    /// `(objects, prefix keys)` directly under `prefix`, from the first
    /// replica that answers.
    fn ls(&self, py: Python<'_>, prefix: &str) -> PyResult<(Vec<ObjectMeta>, Vec<String>)> {
        let listing = detach_interruptible(py, || self.inner.list(prefix))?.py()?;
        let objects = listing.objects.into_iter().map(ObjectMeta::from).collect();
        Ok((objects, listing.prefixes))
    }

    /// The metadata of `key`: one routed request (see `Storage::info`).
    fn info(&self, py: Python<'_>, key: &str) -> PyResult<ObjectMeta> {
        detach_interruptible(py, || self.inner.info(key))?
            .py()
            .map(ObjectMeta::from)
    }

    #[pyo3(signature = (key, start = None, end = None))]
    fn cat_file<'py>(
        &self,
        py: Python<'py>,
        key: &str,
        start: Option<Offset>,
        end: Option<Offset>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let (start, end) = (start.map(|o| o.0), end.map(|o| o.0));
        let whole = is_whole(start, end);
        let plan = detach_interruptible(py, || match whole {
            true => self.inner.whole_read(key),
            false => Ok(WholeRead::OneRequest),
        })?
        .py()?;
        let (offset, len) = match (whole, plan) {
            (true, WholeRead::Sized(size)) => (0, size),
            (true, WholeRead::OneRequest) => {
                // The size comes with the bytes: one copy into `bytes`.
                let data = detach_interruptible(py, || self.inner.read_object(key))?.py()?;
                return Ok(PyBytes::new(py, &data));
            }
            (false, _) => {
                detach_interruptible(py, || self.inner.resolve_slice(key, start, end))?.py()?
            }
        };
        let (bytes, target) = new_bytes(py, len as usize)?;
        detach_interruptible(py, move || {
            // SAFETY: the only slice of this fresh bytes object.
            let buf = unsafe { target.slice() };
            self.inner.read_into(key, offset, buf)
        })?
        .py()?;
        Ok(bytes)
    }

    /// One `bytes` or exception instance per range, in order.
    fn cat_ranges(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        starts: Vec<Option<Offset>>,
        ends: Vec<Option<Offset>>,
    ) -> PyResult<Vec<Py<PyAny>>> {
        let (starts, ends) = (offsets(starts), offsets(ends));
        let (distinct, index) = distinct_keys(keys)?;
        let distinct: Vec<&str> = distinct.iter().map(String::as_str).collect();
        // Whole objects on a store where one request brings the size: no
        // stats first (see `Storage::whole_read`).
        let all_whole = !index.is_empty()
            && index.len() == starts.len()
            && index.len() == ends.len()
            && starts.iter().zip(&ends).all(|(s, e)| is_whole(*s, *e));
        if all_whole
            && detach_interruptible(py, || self.inner.whole_read(distinct[0]))?.ok()
                == Some(WholeRead::OneRequest)
        {
            let results = detach_interruptible(py, || {
                let refs: Vec<&str> = index.iter().map(|&k| distinct[k]).collect();
                self.inner.read_objects(&refs)
            })?;
            return Ok(results
                .into_iter()
                .map(|r| match r {
                    Ok(data) => PyBytes::new(py, &data).into_any().unbind(),
                    Err(e) => to_py(e).into_value(py).into_any(),
                })
                .collect());
        }
        let spans = detach_interruptible(py, || {
            self.inner
                .resolve_slices_indexed(&distinct, &index, &starts, &ends)
        })?
        .py()?;
        let mut out: Vec<Py<PyAny>> = Vec::with_capacity(index.len());
        let mut targets = Vec::with_capacity(index.len());
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
        let results = detach_interruptible(py, || {
            let mut requests: Vec<RangeRequest<'_>> = Vec::with_capacity(targets.len());
            let mut requested = Vec::with_capacity(targets.len());
            for (i, (&k, t)) in index.iter().zip(&targets).enumerate() {
                if let Some((offset, target)) = t {
                    // SAFETY: one request per fresh bytes object.
                    let buf = unsafe { target.slice() };
                    requests.push(RangeRequest {
                        key: distinct[k],
                        offset: *offset,
                        buf,
                    });
                    requested.push(i);
                }
            }
            let threads = threads_for_ranges(requests.len());
            let results = self.inner.read_many(&mut requests, threads);
            requested.into_iter().zip(results).collect::<Vec<_>>()
        })?;
        for (i, result) in results {
            if let Err(e) = result {
                out[i] = to_py(e).into_value(py).into_any();
            }
        }
        Ok(out)
    }

    /// Starts a prefetching stream over a plan: each entry a path (the
    /// whole object) or a `(path, offset, length)` tuple. `key_of` maps a
    /// path to its store key; it is called once per distinct path.
    /// `prefetch` overrides the filesystem's prefetch options for this
    /// stream (`None` values keep them).
    #[pyo3(signature = (entries, key_of, prefetch = None))]
    fn stream(
        &self,
        py: Python<'_>,
        entries: &Bound<'_, PyAny>,
        key_of: &Bound<'_, PyAny>,
        prefetch: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<PyChunkStream> {
        let options = self
            .inner
            .config()
            .prefetch
            .with(crate::config::kwargs_value(prefetch)?)
            .py()?;
        let config = options.stream_config().py()?;
        // A sized plan (a list) is planned whole; any other iterable is
        // taken a window at a time, so an endless one streams for ever in
        // bounded memory.
        let sized = entries.len().is_ok();
        let iter = entries.try_iter()?;
        let limit = if sized { usize::MAX } else { PLAN_WINDOW };
        let items = plan_items(&iter, key_of, limit)?;
        let stream = detach_interruptible(py, || self.inner.stream(&items, &config))?.py()?;
        if sized {
            return Ok(PyChunkStream::new(stream));
        }
        let rest = LazyPlan {
            entries: iter.unbind(),
            key_of: key_of.clone().unbind(),
            storage: Arc::clone(&self.inner),
            config,
        };
        Ok(PyChunkStream::lazy(stream, rest))
    }

    /// Per-replica and end-to-end read figures (see `RouterStats`); `reset`
    /// clears them after reading. `None` for a bare store.
    #[pyo3(signature = (reset = false))]
    fn stats<'py>(&self, py: Python<'py>, reset: bool) -> PyResult<Bound<'py, PyAny>> {
        let stats = py.detach(|| self.inner.stats(reset));
        crate::config::serialized(py, &stats)
    }

    /// The node cache's figures (see `CacheStats`); `None` when it is off.
    #[pyo3(signature = (reset = false))]
    fn cache_stats<'py>(&self, py: Python<'py>, reset: bool) -> PyResult<Bound<'py, PyAny>> {
        let stats = py.detach(|| self.inner.cache_stats(reset));
        crate::config::serialized(py, &stats)
    }

    /// Removes every block of the node cache (for every process using its
    /// directory); nothing when the cache is off.
    fn cache_clear(&self, py: Python<'_>) -> PyResult<()> {
        match self.inner.cache() {
            Some(cache) => py.detach(|| cache.clear()).py(),
            None => Ok(()),
        }
    }

    /// Records the routing decisions of the next `capacity` reads (0 stops).
    fn trace_reads(&self, capacity: usize) {
        self.inner.router().trace_reads(capacity);
    }

    /// The reads traced since `trace_reads` or the last call, as dicts.
    fn take_trace<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let reads = py.detach(|| self.inner.router().take_trace());
        crate::config::serialized(py, &reads)
    }

    /// The end-to-end read latencies behind `stats` (None for a bare store).
    fn latency_histogram(&self) -> Option<PyLatencyHistogram> {
        self.inner.latency_histogram().map(PyLatencyHistogram::from)
    }

    fn open_reader(&self, py: Python<'_>, key: &str) -> PyResult<PyReader> {
        let prefetch = &self.inner.config().prefetch;
        let config = ReaderConfig::try_from(prefetch).py()?;
        let reader =
            detach_interruptible(py, || Reader::open(Arc::clone(&self.inner), key, config))?
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
