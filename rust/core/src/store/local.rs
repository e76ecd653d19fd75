//! Local files through `pread`, straight into the caller's buffer.

use std::collections::HashMap;
use std::fs::{File, FileType, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::fork::ForkRwLock;

use super::{BoxFuture, EntryKind, Listing, ObjectMeta, Store};
use crate::error::{Error, Result};

/// Open descriptors kept per path so a chunked read does not reopen the file
/// for every chunk. Bounded; cleared wholesale when full (cheap and simple:
/// reopening is the fallback, not an error).
const MAX_OPEN_FILES: usize = 1024;

/// Reads up to this size run under the cache's read lock (no reference
/// count taken on the descriptor: two atomic operations on a line that
/// every reader thread shares). Larger reads take a reference and drop the
/// lock, so opening a new file never waits behind a long read.
const READ_UNDER_LOCK_BYTES: usize = 64 << 10;

/// The most a file whose `stat` size is 0 but that has content (`/proc`,
/// `/sys` and other pseudo-files) is read to find its length; longer ones
/// (`/proc/self/pagemap` would go on for gigabytes) are refused.
const UNSIZED_MAX_BYTES: u64 = 64 << 20;

/// A cached descriptor and the identity of the file it was opened on.
#[derive(Debug)]
struct OpenFile {
    file: File,
    dev: u64,
    ino: u64,
}

/// A directory (a replica root) or, with no root, the whole local filesystem.
#[derive(Debug)]
pub struct LocalStore {
    root: Option<PathBuf>,
    name: String,
    /// Read-mostly: parallel `cat_ranges` threads look files up at once,
    /// and a read lock never puts one of them to sleep.
    ///
    /// A descriptor keeps reading the file it was opened on, even after the
    /// path is replaced (an atomic rename of a new version) or deleted. So
    /// every size lookup, which starts each `cat_file`, `cat_ranges`,
    /// stream plan and `open`, stats the path and reopens when it names
    /// another file (device and inode differ) or drops the entry when it is
    /// gone; reads in between use the descriptor as is.
    files: ForkRwLock<HashMap<String, Arc<OpenFile>>>,
}

impl LocalStore {
    /// Serves absolute (or cwd-relative) paths as given.
    pub fn unrooted() -> Self {
        LocalStore {
            root: None,
            name: "file://".into(),
            files: ForkRwLock::per_process(HashMap::new),
        }
    }

    /// Serves keys relative to `root`, which must be an existing directory.
    pub fn rooted(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        require_dir(root, "replica root")?;
        Ok(LocalStore {
            root: Some(root.to_path_buf()),
            name: root.display().to_string(),
            files: ForkRwLock::per_process(HashMap::new),
        })
    }

    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    fn path_of(&self, key: &str) -> Result<PathBuf> {
        let Some(root) = &self.root else {
            return Ok(PathBuf::from(key));
        };
        let rel = Path::new(key.trim_start_matches('/'));
        if rel
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::Prefix(_)))
        {
            return Err(Error::invalid(format!(
                "key {key:?} escapes the replica root"
            )));
        }
        Ok(root.join(rel))
    }

    /// Runs `f` on the cached descriptor of `key`, opening it if needed.
    fn with_file<R>(&self, key: &str, len: usize, f: impl FnOnce(&File) -> R) -> Result<R> {
        let cached = {
            let files = self.files.read();
            match files.get(key) {
                Some(open) if len <= READ_UNDER_LOCK_BYTES => return Ok(f(&open.file)),
                Some(open) => Some(Arc::clone(open)),
                None => None,
            }
        };
        let open = match cached {
            Some(open) => open,
            None => self.open(key)?,
        };
        Ok(f(&open.file))
    }

    /// Opens `key` and caches the descriptor (replacing any older one).
    fn open(&self, key: &str) -> Result<Arc<OpenFile>> {
        let path = self.path_of(key)?;
        // Non-blocking: opening a FIFO for reading would otherwise wait for
        // a writer for ever (regular files ignore the flag).
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| Error::from_io(key, e))?;
        let meta = file.metadata().map_err(|e| Error::from_io(key, e))?;
        if meta.is_dir() {
            return Err(Error::IsADirectory { path: key.into() });
        }
        if !meta.is_file() {
            return Err(Error::invalid(format!(
                "{key:?} is {}, not a regular file: feedline reads files whose bytes stay put",
                special_kind(meta.file_type())
            )));
        }
        let open = Arc::new(OpenFile {
            file,
            dev: meta.dev(),
            ino: meta.ino(),
        });
        let mut files = self.files.write();
        if files.len() >= MAX_OPEN_FILES {
            files.clear();
        }
        files.insert(key.to_owned(), Arc::clone(&open));
        Ok(open)
    }

    fn forget(&self, key: &str) {
        self.files.write().remove(key);
    }

    fn pread_exact(&self, key: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len();
        self.with_file(key, len, |file| {
            let mut done = 0usize;
            while done < buf.len() {
                match file.read_at(&mut buf[done..], offset + done as u64) {
                    Ok(0) => {
                        return Err(Error::ShortRead {
                            path: key.into(),
                            offset,
                            wanted_bytes: buf.len() as u64,
                            got_bytes: done as u64,
                        })
                    }
                    Ok(n) => done += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(Error::from_io(key, e)),
                }
            }
            Ok(())
        })?
    }

    /// The size of `key`, revalidating its cached descriptor (see `files`).
    fn stat(&self, key: &str) -> Result<u64> {
        let cached = self.files.read().get(key).map(|open| (open.dev, open.ino));
        let open = match cached {
            None => self.open(key)?,
            Some(identity) => {
                let path = self.path_of(key)?;
                let meta = match std::fs::metadata(&path) {
                    Ok(meta) => meta,
                    Err(e) => {
                        // Deleted (or no longer reachable): the old
                        // descriptor must not serve it any more.
                        self.forget(key);
                        return Err(Error::from_io(key, e));
                    }
                };
                if (meta.dev(), meta.ino()) == identity && meta.is_file() && meta.len() > 0 {
                    return Ok(meta.len());
                }
                // Replaced, or a length `stat` may not tell: open the file
                // the path names now.
                self.forget(key);
                self.open(key)?
            }
        };
        let meta = open.file.metadata().map_err(|e| Error::from_io(key, e))?;
        match meta.len() {
            0 => unsized_len(key, &open.file),
            len => Ok(len),
        }
    }
}

/// The length of a file whose `stat` says 0: 0 for an empty file; for a
/// pseudo-file with content (`/proc/cpuinfo`), the bytes read to its end.
fn unsized_len(key: &str, file: &File) -> Result<u64> {
    let mut buf = vec![0u8; 64 << 10];
    let mut len = 0u64;
    loop {
        match file.read_at(&mut buf, len) {
            Ok(0) => return Ok(len),
            Ok(n) => len += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::from_io(key, e)),
        }
        if len > UNSIZED_MAX_BYTES {
            return Err(Error::invalid(format!(
                "{key:?} reports size 0 but holds more than {UNSIZED_MAX_BYTES} bytes \
                 (a pseudo-file whose length stat does not tell): refused rather than \
                 read partly"
            )));
        }
    }
}

/// "a FIFO", "a character device", ... for errors about `kind`.
fn special_kind(kind: FileType) -> &'static str {
    if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

impl LocalStore {
    fn meta(&self, key: &str) -> Result<ObjectMeta> {
        let path = self.path_of(key)?;
        let meta = std::fs::metadata(&path).map_err(|e| Error::from_io(key, e))?;
        Ok(object_meta(key, &meta))
    }

    /// What lies directly under the directory `prefix`. A prefix that names
    /// a file lists empty, as on an object store (`info` tells which).
    fn list_dir(&self, prefix: &str) -> Result<Listing> {
        let dir = self.path_of(prefix)?;
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.raw_os_error() == Some(ENOTDIR) => return Ok(Listing::default()),
            Err(e) => return Err(Error::from_io(prefix, e)),
        };
        // Keys as the caller gave them: relative under a root, absolute
        // (joined to the path as given) without one.
        let base = match self.root {
            Some(_) => prefix.trim_matches('/'),
            None => prefix.trim_end_matches('/'),
        };
        let mut listing = Listing::default();
        for entry in entries {
            let entry = entry.map_err(|e| Error::from_io(prefix, e))?;
            let name = entry.file_name().into_string().map_err(|name| {
                Error::invalid(format!(
                    "a file name under {prefix:?} is not UTF-8: {name:?}"
                ))
            })?;
            let key = match (base.is_empty(), self.root.is_some()) {
                (true, true) => name,
                _ => format!("{base}/{name}"),
            };
            // Follows links, as reads do; a dangling link shows as itself.
            let meta = match std::fs::metadata(entry.path()) {
                Ok(meta) => meta,
                Err(_) => entry.metadata().map_err(|e| Error::from_io(&key, e))?,
            };
            if meta.is_dir() {
                listing.prefixes.push(key);
            } else {
                listing.objects.push(object_meta(&key, &meta));
            }
        }
        listing.objects.sort_by(|a, b| a.key.cmp(&b.key));
        listing.prefixes.sort();
        Ok(listing)
    }
}

const ENOTDIR: i32 = 20;

fn unix_ns(seconds: i64, nanos: i64) -> i64 {
    seconds.saturating_mul(1_000_000_000).saturating_add(nanos)
}

fn object_meta(key: &str, meta: &std::fs::Metadata) -> ObjectMeta {
    let modified = unix_ns(meta.mtime(), meta.mtime_nsec());
    let (kind, size) = match meta.is_dir() {
        true => (EntryKind::Directory, 0),
        false => (EntryKind::File, meta.len()),
    };
    ObjectMeta {
        key: key.to_owned(),
        kind,
        size,
        modified_unix_ns: Some(modified),
        created_unix_ns: Some(unix_ns(meta.ctime(), meta.ctime_nsec())),
        // A rename over the path changes the inode; a rewrite in place
        // changes mtime (and usually the size).
        version: Some(format!("{:x}-{:x}-{:x}", meta.ino(), modified, meta.len())),
    }
}

impl Store for LocalStore {
    fn name(&self) -> &str {
        &self.name
    }

    fn size<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move { self.stat(key) })
    }

    fn read_into<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<()>> {
        // A page-cache pread is shorter than a task switch; it runs inline.
        Box::pin(async move { self.pread_exact(key, offset, buf) })
    }

    fn read_into_blocking(&self, key: &str, offset: u64, buf: &mut [u8]) -> Option<Result<()>> {
        Some(self.pread_exact(key, offset, buf))
    }

    fn size_blocking(&self, key: &str) -> Option<Result<u64>> {
        Some(self.stat(key))
    }

    fn info<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ObjectMeta>> {
        Box::pin(async move { self.meta(key) })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Listing>> {
        Box::pin(async move { self.list_dir(prefix) })
    }
}

/// Fails with an error naming `root` (as `what`, e.g. "replica root") unless
/// it is an existing directory.
pub(crate) fn require_dir(root: &Path, what: &str) -> Result<()> {
    let name = root.display().to_string();
    let meta = std::fs::metadata(root).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::invalid(format!("{what} {name:?} does not exist")),
        _ => Error::from_io(&name, e),
    })?;
    if meta.is_dir() {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{what} {name:?} is not a directory"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn short_read_is_an_error_not_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::File::create(&p)
            .unwrap()
            .write_all(b"hello")
            .unwrap();
        let store = LocalStore::rooted(dir.path()).unwrap();
        let mut buf = [0u8; 8];
        let err = store
            .read_into_blocking("f", 0, &mut buf)
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(err, Error::ShortRead { got_bytes: 5, .. }),
            "{err}"
        );
        store
            .read_into_blocking("f", 1, &mut buf[..4])
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..4], b"ello");
    }

    #[test]
    fn a_file_replaced_by_rename_or_deleted_is_not_served_from_the_old_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"old contents").unwrap();
        let store = LocalStore::rooted(dir.path()).unwrap();
        let mut buf = [0u8; 3];
        assert_eq!(store.size_blocking("f").unwrap().unwrap(), 12);
        store.read_into_blocking("f", 0, &mut buf).unwrap().unwrap();
        assert_eq!(&buf, b"old");
        // The way writers publish a new version: write aside, rename over.
        let tmp = dir.path().join("f.tmp");
        std::fs::write(&tmp, b"new!").unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        assert_eq!(store.size_blocking("f").unwrap().unwrap(), 4);
        store.read_into_blocking("f", 0, &mut buf).unwrap().unwrap();
        assert_eq!(&buf, b"new");
        // The same inode rewritten in place: the size is the path's now.
        std::fs::write(&p, b"longer contents here").unwrap();
        assert_eq!(store.size_blocking("f").unwrap().unwrap(), 20);
        std::fs::remove_file(&p).unwrap();
        assert!(matches!(
            store.size_blocking("f").unwrap(),
            Err(Error::NotFound { .. })
        ));
        assert!(matches!(
            store.read_into_blocking("f", 0, &mut buf).unwrap(),
            Err(Error::NotFound { .. })
        ));
    }

    #[test]
    fn large_reads_and_small_reads_see_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(READ_UNDER_LOCK_BYTES * 3))
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(dir.path().join("f"), &data).unwrap();
        let store = LocalStore::rooted(dir.path()).unwrap();
        let mut big = vec![0u8; READ_UNDER_LOCK_BYTES * 2];
        store.read_into_blocking("f", 7, &mut big).unwrap().unwrap();
        assert_eq!(big[..], data[7..7 + big.len()]);
        let mut small = [0u8; 100];
        store
            .read_into_blocking("f", 1000, &mut small)
            .unwrap()
            .unwrap();
        assert_eq!(small[..], data[1000..1100]);
    }

    #[test]
    fn fifos_and_devices_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let store = LocalStore::rooted(dir.path()).unwrap();
        let err = store.stat("pipe").unwrap_err();
        assert!(err.to_string().contains("a FIFO"), "{err}");
        let err = LocalStore::unrooted().stat("/dev/zero").unwrap_err();
        assert!(err.to_string().contains("a character device"), "{err}");
    }

    #[test]
    fn a_pseudo_file_is_sized_by_reading_it_and_an_empty_file_is_empty() {
        let store = LocalStore::unrooted();
        let size = store.stat("/proc/self/status").unwrap();
        let mut buf = vec![0u8; size as usize];
        store.pread_exact("/proc/self/status", 0, &mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf).contains("Name:"));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("empty"), b"").unwrap();
        let rooted = LocalStore::rooted(dir.path()).unwrap();
        assert_eq!(rooted.stat("empty").unwrap(), 0);
    }

    #[test]
    fn rejects_escaping_keys_missing_roots_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let store = LocalStore::rooted(dir.path()).unwrap();
        let mut buf = [0u8; 1];
        assert!(matches!(
            store
                .read_into_blocking("../etc/passwd", 0, &mut buf)
                .unwrap(),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            store.read_into_blocking("sub", 0, &mut buf).unwrap(),
            Err(Error::IsADirectory { .. })
        ));
        assert!(matches!(
            store.read_into_blocking("nope", 0, &mut buf).unwrap(),
            Err(Error::NotFound { .. })
        ));
        let missing = LocalStore::rooted(dir.path().join("missing")).unwrap_err();
        assert!(
            missing.to_string().contains("replica root")
                && missing.to_string().contains("missing\" does not exist"),
            "{missing}"
        );
        std::fs::write(dir.path().join("file"), b"x").unwrap();
        let file = LocalStore::rooted(dir.path().join("file")).unwrap_err();
        assert!(file.to_string().contains("is not a directory"), "{file}");
    }

    #[test]
    fn info_and_list_see_files_and_directories_under_the_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sub/deeper")).unwrap();
        std::fs::write(dir.path().join("sub/b.bin"), b"12345").unwrap();
        std::fs::write(dir.path().join("a.bin"), b"1").unwrap();
        let store = LocalStore::rooted(dir.path()).unwrap();
        let info = crate::runtime::block_on(store.info("sub/b.bin")).unwrap();
        assert_eq!((info.kind, info.size), (EntryKind::File, 5));
        let mtime = std::fs::metadata(dir.path().join("sub/b.bin"))
            .unwrap()
            .modified()
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        assert_eq!(info.modified_unix_ns, Some(mtime.as_nanos() as i64));
        let before = info.version.clone().unwrap();
        std::fs::write(dir.path().join("sub/b.bin"), b"123456").unwrap();
        let after = crate::runtime::block_on(store.info("sub/b.bin")).unwrap();
        assert_ne!(
            after.version.unwrap(),
            before,
            "a rewrite changes the version"
        );
        let sub = crate::runtime::block_on(store.info("sub")).unwrap();
        assert_eq!((sub.kind, sub.size), (EntryKind::Directory, 0));

        let root = crate::runtime::block_on(store.list("")).unwrap();
        let keys: Vec<&str> = root.objects.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(
            (keys, root.prefixes),
            (vec!["a.bin"], vec!["sub".to_owned()])
        );
        let listed = crate::runtime::block_on(store.list("/sub/")).unwrap();
        assert_eq!(listed.objects[0].key, "sub/b.bin");
        assert_eq!(listed.objects[0].size, 6);
        assert_eq!(listed.prefixes, ["sub/deeper"]);
        // A file lists empty (info tells it is a file); nothing is not found.
        assert_eq!(
            crate::runtime::block_on(store.list("a.bin")).unwrap(),
            Listing::default()
        );
        assert!(matches!(
            crate::runtime::block_on(store.list("nope")),
            Err(Error::NotFound { .. })
        ));
        assert!(matches!(
            crate::runtime::block_on(store.info("../x")),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn unrooted_listing_keeps_absolute_keys() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"xy").unwrap();
        let store = LocalStore::unrooted();
        let base = dir.path().display().to_string();
        let listed = crate::runtime::block_on(store.list(&format!("{base}/"))).unwrap();
        assert_eq!(listed.objects[0].key, format!("{base}/f"));
        let info = crate::runtime::block_on(store.info(&listed.objects[0].key)).unwrap();
        assert_eq!(info.size, 2);
    }
}
