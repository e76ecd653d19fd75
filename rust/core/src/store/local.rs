//! Local files through `pread`, straight into the caller's buffer.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::{BoxFuture, Store};
use crate::error::{Error, Result};

/// Open descriptors kept per path so a chunked read does not reopen the file
/// for every chunk. Bounded; cleared wholesale when full (cheap and simple:
/// reopening is the fallback, not an error).
const MAX_OPEN_FILES: usize = 1024;

/// A directory (a replica root) or, with no root, the whole local filesystem.
#[derive(Debug)]
pub struct LocalStore {
    root: Option<PathBuf>,
    name: String,
    /// Read-mostly: parallel `cat_ranges` threads look files up at once,
    /// and a read lock never puts one of them to sleep.
    files: RwLock<HashMap<String, Arc<File>>>,
}

impl LocalStore {
    /// Serves absolute (or cwd-relative) paths as given.
    pub fn unrooted() -> Self {
        LocalStore {
            root: None,
            name: "file://".into(),
            files: RwLock::new(HashMap::new()),
        }
    }

    /// Serves keys relative to `root`, which must be an existing directory.
    pub fn rooted(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        let meta = std::fs::metadata(root).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::invalid(format!(
                "replica root {:?} does not exist",
                root.display().to_string()
            )),
            _ => Error::from_io(&root.display().to_string(), e),
        })?;
        if !meta.is_dir() {
            return Err(Error::invalid(format!(
                "replica root {:?} is not a directory",
                root.display().to_string()
            )));
        }
        Ok(LocalStore {
            root: Some(root.to_path_buf()),
            name: root.display().to_string(),
            files: RwLock::new(HashMap::new()),
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

    fn file(&self, key: &str) -> Result<Arc<File>> {
        if let Some(f) = self
            .files
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
        {
            return Ok(Arc::clone(f));
        }
        let path = self.path_of(key)?;
        let file = File::open(&path).map_err(|e| Error::from_io(key, e))?;
        let meta = file.metadata().map_err(|e| Error::from_io(key, e))?;
        if meta.is_dir() {
            return Err(Error::IsADirectory { path: key.into() });
        }
        let file = Arc::new(file);
        let mut files = self.files.write().unwrap_or_else(|e| e.into_inner());
        if files.len() >= MAX_OPEN_FILES {
            files.clear();
        }
        files.insert(key.to_owned(), Arc::clone(&file));
        Ok(file)
    }

    fn pread_exact(&self, key: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let file = self.file(key)?;
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
    }

    fn stat(&self, key: &str) -> Result<u64> {
        let file = self.file(key)?;
        let meta = file.metadata().map_err(|e| Error::from_io(key, e))?;
        Ok(meta.len())
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
        assert!(LocalStore::rooted(dir.path().join("missing")).is_err());
    }
}
