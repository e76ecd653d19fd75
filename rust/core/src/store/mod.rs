//! The store boundary. Everything that can serve bytes by (key, offset) is a
//! [`Store`]: local files, object_store backends, a Python fsspec callback,
//! the chaos wrapper around any of them, and the replica router on top.
//! The ring and the prefetcher only ever see this trait.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;

use crate::error::Result;

pub mod fallback;
pub mod local;
// object_store's HTTP client needs tokio's `net`, which tokio leaves out when
// built with `--cfg loom` (the ring's model checks): no remote stores there.
#[cfg(not(loom))]
pub mod remote;
pub mod secrets;
pub mod session;

pub use local::LocalStore;
#[cfg(not(loom))]
pub use remote::RemoteStore;
pub use session::{ReadSession, Tally};

/// A boxed, sendable future: stores are used as `Arc<dyn Store>`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub trait Store: Send + Sync + Debug + 'static {
    /// How this store is named in errors, stats and reprs. Never contains
    /// credentials.
    fn name(&self) -> &str;

    /// The object's size in bytes.
    fn size<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64>>;

    /// Fills all of `buf` with the object's bytes from `offset`. Fewer bytes
    /// than `buf.len()` is an error (`ShortRead`), never a partial success.
    /// Dropping the future cancels the read; the store must then stop
    /// writing into `buf` (guaranteed by the borrow).
    fn read_into<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<()>>;

    /// Reads the whole object into `out` (cleared first), learning its size
    /// from the response itself: one request where the backend allows it
    /// (an HTTP `Range: bytes=0-` GET, whose `Content-Range` names the
    /// total) instead of a stat and then a read. A body shorter or longer
    /// than the size that came with it is an error, never short data.
    ///
    /// The default stats, then reads: two requests, which is what local
    /// files cost anyway (a `stat` and a `pread`).
    fn read_object<'a>(&'a self, key: &'a str, out: &'a mut Vec<u8>) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let size = self.size(key).await?;
            let len = usize::try_from(size).map_err(|_| {
                crate::error::Error::invalid(format!("{key:?} is too large ({size} bytes)"))
            })?;
            out.clear();
            out.resize(len, 0);
            self.read_into(key, 0, out).await
        })
    }

    /// The same read without an executor, for stores whose reads never wait
    /// on anything but the kernel (page-cache `pread`). `None` means "use
    /// the async path". The hot local paths (`cat_ranges` of small ranges,
    /// large `readinto`) use it to avoid per-read task overhead.
    fn read_into_blocking(&self, _key: &str, _offset: u64, _buf: &mut [u8]) -> Option<Result<()>> {
        None
    }

    /// `size` without an executor, where `read_into_blocking` is offered.
    fn size_blocking(&self, _key: &str) -> Option<Result<u64>> {
        None
    }

    /// `read_into_blocking` inside a [`ReadSession`]: a store may hold the
    /// read's bookkeeping in `tally` and fold it in per batch (see
    /// [`session`]). The default keeps nothing there.
    fn read_into_blocking_tallied(
        &self,
        key: &str,
        offset: u64,
        buf: &mut [u8],
        _tally: &mut Tally,
    ) -> Option<Result<()>> {
        self.read_into_blocking(key, offset, buf)
    }

    /// Folds in and clears what `read_into_blocking_tallied` held in `tally`.
    fn fold_tally(&self, _tally: &mut Tally) {}

    /// What the store knows about `key`: an object (size, modification
    /// time, version) or a directory (a local directory, or an object-store
    /// prefix with something under it). The default knows only the size.
    fn info<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ObjectMeta>> {
        Box::pin(async move { Ok(ObjectMeta::file(key, self.size(key).await?)) })
    }

    /// The object's size as a read of its bytes reports it (an HTTP ranged
    /// GET's `Content-Range` total), where that is another source than
    /// [`Store::size`] (a HEAD): the second opinion the router asks for
    /// when replicas disagree about a size. The default is `size`.
    fn read_size<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64>> {
        self.size(key)
    }

    /// Whether requests wait on a network peer that can fall silent (an
    /// HTTP or object-store endpoint) rather than on the local kernel. The
    /// router hedges such replicas by default.
    fn waits_on_network(&self) -> bool {
        false
    }

    /// The objects and the "directories" (common prefixes) directly under
    /// `prefix`, a key relative to the replica root (`""`: the root). A
    /// prefix that names an object, or nothing, lists empty on object stores
    /// (`info` tells which); a store that cannot list at all (HTTP) says so
    /// (`Unsupported`).
    fn list<'a>(&'a self, _prefix: &'a str) -> BoxFuture<'a, Result<Listing>> {
        Box::pin(async move {
            Err(crate::error::Error::Unsupported(format!(
                "replica {:?} cannot list its objects",
                self.name()
            )))
        })
    }
}

/// What [`Store::list`] found under a prefix; keys relative to the replica
/// root, sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub objects: Vec<ObjectMeta>,
    /// Keys of the common prefixes, without the trailing `/`.
    pub prefixes: Vec<String>,
}

/// An object or a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Directory,
}

/// Metadata of one object, as [`Store::info`] and [`Store::list`] give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Relative to the replica root (absolute for the unrooted local store).
    pub key: String,
    pub kind: EntryKind,
    /// Bytes; 0 for a directory.
    pub size: u64,
    /// Last modification, nanoseconds since the Unix epoch, where the
    /// backend says.
    pub modified_unix_ns: Option<i64>,
    /// Creation: the inode change time of a local file (what fsspec's local
    /// filesystem reports); an object's last modification on object stores,
    /// where every write creates the object anew.
    pub created_unix_ns: Option<i64>,
    /// Changes whenever the bytes may have changed: the ETag (or version id)
    /// of an object, inode + mtime + size of a local file. Caches key blocks
    /// by it.
    pub version: Option<String>,
}

impl ObjectMeta {
    /// A file known only by its size.
    pub fn file(key: &str, size: u64) -> Self {
        ObjectMeta {
            key: key.to_owned(),
            kind: EntryKind::File,
            size,
            modified_unix_ns: None,
            created_unix_ns: None,
            version: None,
        }
    }

    /// A directory (or object-store prefix).
    pub fn directory(key: &str) -> Self {
        ObjectMeta {
            kind: EntryKind::Directory,
            ..ObjectMeta::file(key, 0)
        }
    }
}
