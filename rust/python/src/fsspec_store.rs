//! The fsspec fallback store: any protocol without a native backend
//! (`memory://`, an fsspec filesystem instance, ...) read through Python.
//!
//! Slower than the native stores, by design of the GIL: each read takes the
//! GIL on a tokio blocking thread, calls `fs.cat_file(path, start, end)`, and
//! copies the returned `bytes` twice (into an owned buffer while the GIL is
//! held, then into the caller's slot once the future resumes; the slot may
//! not be written from a thread that outlives a cancelled read).
//! It is a `Store` like any other: the router, hedging and chaos wrap it.

use std::sync::Arc;

use feedline_core::store::remote::{
    collect_secrets, options_json, redact_error, Secrets, StorageOptions,
};
use feedline_core::store::{fallback, BoxFuture, EntryKind, Listing, ObjectMeta, Store};
use feedline_core::Error;
use pyo3::exceptions::{PyFileNotFoundError, PyIsADirectoryError, PyPermissionError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

pub struct FsspecStore {
    name: String,
    /// The fsspec filesystem; valid in a forked child (the object is in the
    /// copied heap) and taken only with the GIL held.
    fs: Arc<Py<PyAny>>,
    /// Path prefix inside `fs` (the replica root), without trailing slash.
    prefix: String,
    secrets: Secrets,
}

impl std::fmt::Debug for FsspecStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsspecStore")
            .field("name", &self.name)
            .finish()
    }
}

fn py_error(py: Python<'_>, key: &str, name: &str, err: PyErr) -> Error {
    if err.is_instance_of::<PyFileNotFoundError>(py) {
        Error::NotFound { path: key.into() }
    } else if err.is_instance_of::<PyPermissionError>(py) {
        Error::PermissionDenied { path: key.into() }
    } else if err.is_instance_of::<PyIsADirectoryError>(py) {
        Error::IsADirectory { path: key.into() }
    } else {
        Error::Remote(format!("{name}: {key:?}: {err}"))
    }
}

impl FsspecStore {
    fn full_path(&self, key: &str) -> String {
        let key = key.trim_start_matches('/');
        if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    /// Runs `f` with the GIL on a blocking thread of the core runtime.
    async fn call<T: Send + 'static>(
        &self,
        key: &str,
        f: impl FnOnce(Python<'_>, &Bound<'_, PyAny>, &str) -> PyResult<T> + Send + 'static,
    ) -> Result<T, Error> {
        let fs = Arc::clone(&self.fs);
        let path = self.full_path(key);
        let name = self.name.clone();
        let key_owned = key.to_owned();
        let joined = feedline_core::runtime::handle()
            .spawn_blocking(move || {
                Python::attach(|py| {
                    f(py, fs.bind(py), &path).map_err(|e| py_error(py, &key_owned, &name, e))
                })
            })
            .await;
        let result = joined.unwrap_or_else(|e| {
            Err(Error::Remote(format!(
                "{}: fsspec call for {key:?} failed: {e}",
                self.name
            )))
        });
        result.map_err(|e| redact_error(e, &self.secrets))
    }
}

/// `feedline._fsspec.Entry`: an fsspec info dict, flattened in Python.
type Entry = (String, bool, u64, Option<i64>, Option<i64>, Option<String>);

fn object_meta(key: String, entry: Entry) -> ObjectMeta {
    let (_, is_dir, size, modified_unix_ns, created_unix_ns, version) = entry;
    ObjectMeta {
        key,
        kind: if is_dir {
            EntryKind::Directory
        } else {
            EntryKind::File
        },
        size,
        modified_unix_ns,
        created_unix_ns,
        version,
    }
}

impl FsspecStore {
    /// A path inside `fs` as a key relative to the replica root.
    fn relative(&self, name: &str) -> String {
        let rest = match self.prefix.is_empty() {
            true => Some(name),
            false => name
                .strip_prefix(&self.prefix)
                .filter(|r| r.is_empty() || r.starts_with('/')),
        };
        rest.unwrap_or(name).trim_matches('/').to_owned()
    }
}

impl Store for FsspecStore {
    fn name(&self) -> &str {
        &self.name
    }

    /// Protocols without a native backend (gcsfs, sftp, ...) are remote.
    fn waits_on_network(&self) -> bool {
        true
    }

    fn size<'a>(&'a self, key: &'a str) -> BoxFuture<'a, feedline_core::Result<u64>> {
        Box::pin(self.call(key, |_py, fs, path| {
            let info = fs.call_method1("info", (path,))?;
            if info.get_item("type")?.extract::<String>()? == "directory" {
                return Err(PyIsADirectoryError::new_err(path.to_owned()));
            }
            info.get_item("size")?.extract::<u64>()
        }))
    }

    fn info<'a>(&'a self, key: &'a str) -> BoxFuture<'a, feedline_core::Result<ObjectMeta>> {
        Box::pin(async move {
            let entry: Entry = self
                .call(key, |py, fs, path| {
                    let info = fs.call_method1("info", (path,))?;
                    let module = py.import("feedline._fsspec")?;
                    module.call_method1("entry", (info,))?.extract()
                })
                .await?;
            Ok(object_meta(key.trim_matches('/').to_owned(), entry))
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, feedline_core::Result<Listing>> {
        Box::pin(async move {
            let entries: Vec<Entry> = self
                .call(prefix, |py, fs, path| {
                    let module = py.import("feedline._fsspec")?;
                    module.call_method1("listing", (fs, path))?.extract()
                })
                .await?;
            let mut listing = Listing::default();
            for entry in entries {
                let key = self.relative(&entry.0);
                match entry.1 {
                    true => listing.prefixes.push(key),
                    false => listing.objects.push(object_meta(key, entry)),
                }
            }
            listing.objects.sort_by(|a, b| a.key.cmp(&b.key));
            listing.prefixes.sort();
            Ok(listing)
        })
    }

    fn read_into<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, feedline_core::Result<()>> {
        Box::pin(async move {
            if buf.is_empty() {
                return Ok(());
            }
            let end = offset + buf.len() as u64;
            let data: Vec<u8> = self
                .call(key, move |_py, fs, path| {
                    let got = fs.call_method1("cat_file", (path, offset, end))?;
                    let bytes = got.cast::<PyBytes>()?;
                    Ok(bytes.as_bytes().to_vec())
                })
                .await?;
            if data.len() != buf.len() {
                return Err(Error::ShortRead {
                    path: key.into(),
                    offset,
                    wanted_bytes: buf.len() as u64,
                    got_bytes: data.len() as u64,
                });
            }
            buf.copy_from_slice(&data);
            Ok(())
        })
    }
}

/// Opens `root` through `feedline._fsspec.open_replica`, which returns the
/// filesystem, the path prefix and the name to show.
fn open(root: &str, options: &StorageOptions) -> feedline_core::Result<Arc<dyn Store>> {
    let secrets = collect_secrets(None, options);
    let options_json = options_json(options);
    Python::attach(|py| -> PyResult<Arc<dyn Store>> {
        let module = py.import("feedline._fsspec")?;
        let (fs, prefix, name): (Py<PyAny>, String, String) = module
            .call_method1("open_replica", (root, options_json))?
            .extract()?;
        Ok(Arc::new(FsspecStore {
            name,
            fs: Arc::new(fs),
            prefix: prefix.trim_end_matches('/').to_owned(),
            secrets: secrets.clone(),
        }))
    })
    .map_err(|e| {
        redact_error(
            Error::invalid(format!("cannot open replica {root:?} through fsspec: {e}")),
            &secrets,
        )
    })
}

pub fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    fallback::set_opener(Box::new(open));
    Ok(())
}
