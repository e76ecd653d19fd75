//! `ObjectMeta`: what `Storage.info` and `Storage.ls` report of one object
//! or directory, converted from the core's.

use feedline_core::store::{EntryKind, ObjectMeta as CoreMeta};
use pyo3::prelude::*;

/// An object or directory of a replica.
#[pyclass(module = "feedline._core", frozen, get_all)]
pub struct ObjectMeta {
    /// The key (relative to the replica root; absolute without replicas).
    key: String,
    /// ``"file"`` or ``"directory"``, as fsspec's ``type``.
    kind: &'static str,
    size: u64,
    /// Nanoseconds since the Unix epoch, where the backend says.
    modified_unix_ns: Option<i64>,
    created_unix_ns: Option<i64>,
    /// ETag / version id of an object; inode, mtime and size of a local file.
    version: Option<String>,
}

impl From<CoreMeta> for ObjectMeta {
    fn from(meta: CoreMeta) -> Self {
        ObjectMeta {
            key: meta.key,
            kind: match meta.kind {
                EntryKind::File => "file",
                EntryKind::Directory => "directory",
            },
            size: meta.size,
            modified_unix_ns: meta.modified_unix_ns,
            created_unix_ns: meta.created_unix_ns,
            version: meta.version,
        }
    }
}

#[pymethods]
impl ObjectMeta {
    fn __repr__(&self) -> String {
        format!(
            "ObjectMeta(key={:?}, kind={:?}, size={}, modified_unix_ns={:?}, version={:?})",
            self.key, self.kind, self.size, self.modified_unix_ns, self.version
        )
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ObjectMeta>()
}
