//! Verified bytes: a manifest of per-block CRC32C checksums and
//! [`VerifyingStore`], which checks every block a read touches before the
//! bytes are delivered.
//!
//! The manifest is JSON:
//! `{"version": 1, "block_bytes": N, "objects": {key: {"size": S, "crc32c": [hex, ...]}}}`
//! with one 8-digit hex CRC32C per `block_bytes` block of the object (the last
//! block may be shorter). Per-block rather than per-object sums let a ranged
//! read or a stream chunk be verified on its own; when `chunk_bytes` is a
//! multiple of `block_bytes` a stream's chunks are verified in place, without
//! a copy.
//!
//! A mismatch is [`Error::ChecksumMismatch`], which is retryable: behind the
//! replica router it counts as that replica's error and the range is re-read
//! from the next replica (self-healing); when no replica has good bytes the
//! read fails loudly. Keys the manifest does not list are refused rather than
//! passed through: verification was asked for, so unverified bytes are never
//! delivered silently.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::runtime;
use crate::store::{BoxFuture, EntryKind, ObjectMeta, Store};

/// The file name `write_for_dir` uses inside the directory it describes.
pub const MANIFEST_FILE_NAME: &str = ".feedline-manifest.json";

/// Default block: a divisor of the default 4 MiB chunk, so streams verify in
/// place, and small enough that a random 4 KiB read checks at most 1 MiB.
pub const DEFAULT_BLOCK_BYTES: u64 = 1 << 20;

/// Where a manifest comes from: a path to its JSON file, or the JSON object
/// itself (Python passes a dict through as an object).
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
#[serde(untagged)]
pub enum ManifestSource {
    Path(String),
    Inline(Value),
}

impl ManifestSource {
    pub fn load(&self) -> Result<Manifest> {
        match self {
            ManifestSource::Path(p) => Manifest::load(Path::new(p)),
            ManifestSource::Inline(v) => Manifest::from_value(v),
        }
    }
}

/// One object's expected size and block checksums.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectSums {
    pub size: u64,
    pub crc32c: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub block_bytes: u64,
    pub objects: BTreeMap<String, ObjectSums>,
}

fn blocks_for(size: u64, block_bytes: u64) -> u64 {
    size.div_ceil(block_bytes)
}

impl Manifest {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::invalid(format!(
                "manifest {:?} does not exist",
                path.display().to_string()
            )),
            _ => Error::from_io(&path.display().to_string(), e),
        })?;
        Self::from_json(&text)
            .map_err(|e| Error::invalid(format!("manifest {:?}: {e}", path.display().to_string())))
    }

    pub fn from_json(json: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(json)
            .map_err(|e| Error::invalid(format!("manifest is not valid JSON: {e}")))?;
        Self::from_value(&value)
    }

    /// Parses and validates, naming the offending key and value.
    pub fn from_value(value: &Value) -> Result<Self> {
        let top = value.as_object().ok_or_else(|| {
            Error::invalid(format!("manifest must be a JSON object, got {value}"))
        })?;
        for field in top.keys() {
            if !matches!(field.as_str(), "version" | "block_bytes" | "objects") {
                return Err(Error::invalid(format!(
                    "manifest has unknown field {field:?}; expected version, block_bytes, objects"
                )));
            }
        }
        match top.get("version") {
            Some(v) if v.as_u64() == Some(1) => {}
            other => {
                return Err(Error::invalid(format!(
                    "manifest version must be 1, got {}",
                    other.map_or("nothing".to_string(), Value::to_string)
                )))
            }
        }
        let block_bytes = match top.get("block_bytes").and_then(Value::as_u64) {
            Some(b) if b > 0 => b,
            _ => {
                return Err(Error::invalid(format!(
                    "manifest block_bytes must be an integer >= 1, got {}",
                    top.get("block_bytes")
                        .map_or("nothing".to_string(), Value::to_string)
                )))
            }
        };
        let objects = top
            .get("objects")
            .and_then(Value::as_object)
            .ok_or_else(|| {
                Error::invalid("manifest objects must be a JSON object of key -> sums")
            })?;
        let mut out = BTreeMap::new();
        for (key, entry) in objects {
            out.insert(key.clone(), parse_object(key, entry, block_bytes)?);
        }
        Ok(Manifest {
            block_bytes,
            objects: out,
        })
    }

    pub fn to_json(&self) -> String {
        let objects: serde_json::Map<String, Value> = self
            .objects
            .iter()
            .map(|(k, o)| {
                let sums: Vec<Value> = o
                    .crc32c
                    .iter()
                    .map(|c| Value::String(format!("{c:08x}")))
                    .collect();
                (
                    k.clone(),
                    serde_json::json!({"size": o.size, "crc32c": sums}),
                )
            })
            .collect();
        serde_json::json!({
            "version": 1,
            "block_bytes": self.block_bytes,
            "objects": objects,
        })
        .to_string()
    }

    /// The sums for `key` (keys are relative to a replica root; a leading
    /// `/` is ignored as the stores ignore it).
    pub fn get(&self, key: &str) -> Option<&ObjectSums> {
        self.objects
            .get(key)
            .or_else(|| self.objects.get(key.trim_start_matches('/')))
    }

    /// Checksums every regular file under `root` (keys relative, `/`
    /// separated), in parallel over files. `skip` is left out (the manifest
    /// itself, when written inside `root`).
    pub fn for_dir(root: &Path, block_bytes: u64, skip: Option<&Path>) -> Result<Self> {
        if block_bytes == 0 {
            return Err(Error::invalid("block_bytes must be at least 1, got 0"));
        }
        crate::store::local::require_dir(root, "path")?;
        let mut files = Vec::new();
        walk(root, root, skip, &mut files)?;
        let next = AtomicUsize::new(0);
        let results: Mutex<Vec<(String, ObjectSums)>> = Mutex::new(Vec::with_capacity(files.len()));
        let first_error: Mutex<Option<Error>> = Mutex::new(None);
        let workers = runtime::threads_for(files.len(), 1);
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((key, path)) = files.get(i) else {
                        break;
                    };
                    match sum_file(path, key, block_bytes) {
                        Ok(sums) => results
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((key.clone(), sums)),
                        Err(e) => {
                            first_error
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .get_or_insert(e);
                            break;
                        }
                    }
                });
            }
        });
        if let Some(e) = first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e);
        }
        Ok(Manifest {
            block_bytes,
            objects: results
                .into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .into_iter()
                .collect(),
        })
    }

    /// Writes the manifest of `root` to `out` (default
    /// `<root>/.feedline-manifest.json`), atomically, and returns its path.
    pub fn write_for_dir(root: &Path, block_bytes: u64, out: Option<&Path>) -> Result<PathBuf> {
        let out = out.map_or_else(|| root.join(MANIFEST_FILE_NAME), Path::to_path_buf);
        let manifest = Self::for_dir(root, block_bytes, Some(&out))?;
        let tmp = out.with_extension("json.tmp");
        let out_name = out.display().to_string();
        std::fs::write(&tmp, manifest.to_json()).map_err(|e| Error::from_io(&out_name, e))?;
        std::fs::rename(&tmp, &out).map_err(|e| Error::from_io(&out_name, e))?;
        Ok(out)
    }

    /// Fails, naming them, when the manifest lists keys that none of the
    /// `replicas` holds (a replica may lag; all of them missing a key means
    /// the manifest describes other data).
    pub fn check_keys(&self, replicas: &[Arc<dyn Store>]) -> Result<()> {
        if replicas.is_empty() {
            return Ok(());
        }
        let missing: Vec<&str> = runtime::block_on(async {
            futures::stream::iter(self.objects.keys())
                .map(|key| async move {
                    for store in replicas {
                        let found = match store.size_blocking(key) {
                            Some(r) => r,
                            None => store.size(key).await,
                        };
                        if !matches!(found, Err(Error::NotFound { .. })) {
                            return None;
                        }
                    }
                    Some(key.as_str())
                })
                .buffer_unordered(64)
                .filter_map(|k| async move { k })
                .collect::<Vec<_>>()
                .await
        });
        if missing.is_empty() {
            return Ok(());
        }
        let mut missing = missing;
        missing.sort_unstable();
        let shown: Vec<String> = missing.iter().take(5).map(|k| format!("{k:?}")).collect();
        let more = if missing.len() > 5 {
            format!(" and {} more", missing.len() - 5)
        } else {
            String::new()
        };
        Err(Error::invalid(format!(
            "manifest names {} key(s) that no replica holds: {}{more}",
            missing.len(),
            shown.join(", ")
        )))
    }
}

fn parse_object(key: &str, entry: &Value, block_bytes: u64) -> Result<ObjectSums> {
    let obj = entry.as_object().ok_or_else(|| {
        Error::invalid(format!(
            "manifest entry for {key:?} must be an object with size and crc32c, got {entry}"
        ))
    })?;
    for field in obj.keys() {
        if !matches!(field.as_str(), "size" | "crc32c") {
            return Err(Error::invalid(format!(
                "manifest entry for {key:?} has unknown field {field:?}"
            )));
        }
    }
    let size = match obj.get("size") {
        Some(v) if v.as_u64().is_some() => v.as_u64().unwrap_or_default(),
        other => {
            return Err(Error::invalid(format!(
                "manifest size of {key:?} must be an integer >= 0, got {}",
                other.map_or("nothing".to_string(), Value::to_string)
            )))
        }
    };
    let sums = obj.get("crc32c").and_then(Value::as_array).ok_or_else(|| {
        Error::invalid(format!(
            "manifest crc32c of {key:?} must be a list of 8-digit hex strings"
        ))
    })?;
    let want = blocks_for(size, block_bytes);
    if sums.len() as u64 != want {
        return Err(Error::invalid(format!(
            "manifest crc32c of {key:?} has {} checksums; size {size} in blocks of {block_bytes} \
             needs {want}",
            sums.len()
        )));
    }
    let crc32c = sums
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str()
                .filter(|s| s.len() == 8)
                .and_then(|s| u32::from_str_radix(s, 16).ok())
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "manifest crc32c of {key:?}, block {i}: {v} is not an 8-digit hex checksum"
                    ))
                })
        })
        .collect::<Result<Vec<u32>>>()?;
    Ok(ObjectSums { size, crc32c })
}

fn walk(
    root: &Path,
    dir: &Path,
    skip: Option<&Path>,
    out: &mut Vec<(String, PathBuf)>,
) -> Result<()> {
    let name = |p: &Path| p.display().to_string();
    let entries = std::fs::read_dir(dir).map_err(|e| Error::from_io(&name(dir), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::from_io(&name(dir), e))?;
        let path = entry.path();
        if skip.is_some_and(|s| s == path) {
            continue;
        }
        // Directory symlinks are not followed (no cycles); file symlinks are.
        let file_type = entry
            .file_type()
            .map_err(|e| Error::from_io(&name(&path), e))?;
        if file_type.is_dir() {
            walk(root, &path, skip, out)?;
        } else if std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            let rel = path.strip_prefix(root).unwrap_or(&path);
            let key = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            out.push((key, path));
        }
    }
    Ok(())
}

fn sum_file(path: &Path, key: &str, block_bytes: u64) -> Result<ObjectSums> {
    let mut file = File::open(path).map_err(|e| Error::from_io(key, e))?;
    let mut buf = vec![0u8; block_bytes.min(16 << 20) as usize];
    let mut crc32c = Vec::new();
    let mut size = 0u64;
    let mut block_crc = 0u32;
    let mut in_block = 0u64;
    loop {
        let want = (block_bytes - in_block).min(buf.len() as u64) as usize;
        let n = match file.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::from_io(key, e)),
        };
        block_crc = crc32c::crc32c_append(block_crc, &buf[..n]);
        in_block += n as u64;
        size += n as u64;
        if in_block == block_bytes {
            crc32c.push(block_crc);
            block_crc = 0;
            in_block = 0;
        }
    }
    if in_block > 0 {
        crc32c.push(block_crc);
    }
    Ok(ObjectSums { size, crc32c })
}

/// Counts of verification work, for stats and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerifyStats {
    pub verified_bytes: u64,
    pub mismatches: u64,
}

/// Any store, with every read checked against a [`Manifest`].
#[derive(Debug)]
pub struct VerifyingStore {
    inner: Arc<dyn Store>,
    manifest: Arc<Manifest>,
    name: String,
    verified_bytes: AtomicU64,
    mismatches: AtomicU64,
}

/// The blocks a read touches: `[start, end)` in the object.
struct Span<'m> {
    sums: &'m ObjectSums,
    start: u64,
    end: u64,
}

impl VerifyingStore {
    pub fn new(inner: Arc<dyn Store>, manifest: Arc<Manifest>) -> Self {
        let name = inner.name().to_owned();
        VerifyingStore {
            inner,
            manifest,
            name,
            verified_bytes: AtomicU64::new(0),
            mismatches: AtomicU64::new(0),
        }
    }

    pub fn stats(&self) -> VerifyStats {
        VerifyStats {
            verified_bytes: self.verified_bytes.load(Ordering::Relaxed),
            mismatches: self.mismatches.load(Ordering::Relaxed),
        }
    }

    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    /// Widens `[offset, offset + len)` to whole blocks.
    fn span(&self, key: &str, offset: u64, len: usize) -> Result<Span<'_>> {
        let sums = self.manifest.get(key).ok_or_else(|| {
            Error::invalid(format!(
                "{key:?} is not in the manifest; verification was asked for, so its bytes \
                 cannot be delivered unverified"
            ))
        })?;
        let end = offset + len as u64;
        if end > sums.size {
            return Err(Error::ShortRead {
                path: key.into(),
                offset,
                wanted_bytes: len as u64,
                got_bytes: sums.size.saturating_sub(offset),
            });
        }
        let b = self.manifest.block_bytes;
        Ok(Span {
            sums,
            start: offset / b * b,
            end: end.div_ceil(b).saturating_mul(b).min(sums.size),
        })
    }

    /// Checks every block of `data`, which holds the object from `start`.
    fn verify(&self, key: &str, span: &Span<'_>, data: &[u8]) -> Result<()> {
        let b = self.manifest.block_bytes;
        let first = span.start / b;
        for (i, block) in data.chunks(b as usize).enumerate() {
            let index = first + i as u64;
            let expected = span.sums.crc32c[index as usize];
            let actual = crc32c::crc32c(block);
            if actual != expected {
                self.mismatches.fetch_add(1, Ordering::Relaxed);
                return Err(Error::ChecksumMismatch {
                    path: format!("{key} on replica {}", self.name),
                    offset: index * b,
                    expected,
                    actual,
                });
            }
        }
        self.verified_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn mismatched_size(&self, key: &str, actual: u64) -> Option<Error> {
        let sums = self.manifest.get(key)?;
        (sums.size != actual).then(|| {
            Error::Remote(format!(
                "replica {}: {key:?} has {actual} bytes, the manifest says {}",
                self.name, sums.size
            ))
        })
    }
}

impl Store for VerifyingStore {
    fn name(&self) -> &str {
        &self.name
    }

    fn waits_on_network(&self) -> bool {
        self.inner.waits_on_network()
    }

    fn size<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            let size = self.inner.size(key).await?;
            match self.mismatched_size(key, size) {
                Some(e) => Err(e),
                None => Ok(size),
            }
        })
    }

    fn read_size<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64>> {
        self.inner.read_size(key)
    }

    /// The replica's metadata, its size held to the manifest's like `size`.
    fn info<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ObjectMeta>> {
        Box::pin(async move {
            let meta = self.inner.info(key).await?;
            if meta.kind == EntryKind::File {
                if let Some(e) = self.mismatched_size(key, meta.size) {
                    return Err(e);
                }
            }
            Ok(meta)
        })
    }

    fn read_into<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if buf.is_empty() {
                return self.inner.read_into(key, offset, buf).await;
            }
            let span = self.span(key, offset, buf.len())?;
            if span.start == offset && span.end == offset + buf.len() as u64 {
                self.inner.read_into(key, offset, buf).await?;
                return self.verify(key, &span, buf);
            }
            let mut scratch = vec![0u8; (span.end - span.start) as usize];
            self.inner.read_into(key, span.start, &mut scratch).await?;
            self.verify(key, &span, &scratch)?;
            let from = (offset - span.start) as usize;
            buf.copy_from_slice(&scratch[from..from + buf.len()]);
            Ok(())
        })
    }

    /// The whole object in one request below; its size must be the
    /// manifest's (checked before the checksums, so a short or long copy is
    /// this replica's failure, never short data) and every block must match.
    fn read_object<'a>(&'a self, key: &'a str, out: &'a mut Vec<u8>) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            // Refuses a key the manifest does not name before any request.
            self.span(key, 0, 0)?;
            self.inner.read_object(key, out).await?;
            if let Some(e) = self.mismatched_size(key, out.len() as u64) {
                return Err(e);
            }
            let span = self.span(key, 0, out.len())?;
            self.verify(key, &span, out)
        })
    }

    fn read_into_blocking(&self, key: &str, offset: u64, buf: &mut [u8]) -> Option<Result<()>> {
        if buf.is_empty() {
            return self.inner.read_into_blocking(key, offset, buf);
        }
        let span = match self.span(key, offset, buf.len()) {
            Ok(s) => s,
            Err(e) => return Some(Err(e)),
        };
        if span.start == offset && span.end == offset + buf.len() as u64 {
            return Some(
                self.inner
                    .read_into_blocking(key, offset, buf)?
                    .and_then(|()| self.verify(key, &span, buf)),
            );
        }
        let mut scratch = vec![0u8; (span.end - span.start) as usize];
        let read = self
            .inner
            .read_into_blocking(key, span.start, &mut scratch)?;
        Some(read.and_then(|()| {
            self.verify(key, &span, &scratch)?;
            let from = (offset - span.start) as usize;
            buf.copy_from_slice(&scratch[from..from + buf.len()]);
            Ok(())
        }))
    }

    fn size_blocking(&self, key: &str) -> Option<Result<u64>> {
        Some(self.inner.size_blocking(key)?.and_then(
            |size| match self.mismatched_size(key, size) {
                Some(e) => Err(e),
                None => Ok(size),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::{ChaosSpec, ChaosStore};
    use crate::store::LocalStore;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn replica() -> (tempfile::TempDir, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let bytes = data(10_000);
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/a.bin"), &bytes).unwrap();
        std::fs::write(dir.path().join("empty"), b"").unwrap();
        (dir, bytes)
    }

    #[test]
    fn write_load_round_trip() {
        let (dir, bytes) = replica();
        let path = Manifest::write_for_dir(dir.path(), 4096, None).unwrap();
        assert_eq!(path, dir.path().join(MANIFEST_FILE_NAME));
        let m = Manifest::load(&path).unwrap();
        assert_eq!(m.block_bytes, 4096);
        assert_eq!(m.objects.len(), 2, "{:?}", m.objects.keys());
        let a = m.get("sub/a.bin").unwrap();
        assert_eq!(a.size, 10_000);
        assert_eq!(
            a.crc32c,
            vec![
                crc32c::crc32c(&bytes[..4096]),
                crc32c::crc32c(&bytes[4096..8192]),
                crc32c::crc32c(&bytes[8192..]),
            ]
        );
        assert!(m.get("/sub/a.bin").is_some());
        assert_eq!(m.get("empty").unwrap().crc32c, Vec::<u32>::new());
        assert_eq!(Manifest::from_json(&m.to_json()).unwrap(), m);
        // Rewriting does not checksum the manifest itself.
        Manifest::write_for_dir(dir.path(), 4096, None).unwrap();
        assert_eq!(Manifest::load(&path).unwrap(), m);
    }

    #[test]
    fn malformed_manifests_name_the_problem() {
        let cases = [
            ("[]", "JSON object"),
            (
                r#"{"version": 2, "block_bytes": 4, "objects": {}}"#,
                "version",
            ),
            (
                r#"{"version": 1, "block_bytes": 0, "objects": {}}"#,
                "block_bytes",
            ),
            (
                r#"{"version": 1, "block_bytes": 4, "objects": {}, "x": 1}"#,
                "\"x\"",
            ),
            (
                r#"{"version": 1, "block_bytes": 4, "objects": {"k": {"size": -1, "crc32c": []}}}"#,
                "size of \"k\"",
            ),
            (
                r#"{"version": 1, "block_bytes": 4, "objects": {"k": {"size": 4, "crc32c": ["xyz"]}}}"#,
                "\"xyz\" is not an 8-digit hex",
            ),
            (
                r#"{"version": 1, "block_bytes": 4, "objects": {"k": {"size": 4, "crc32c": ["0000000g"]}}}"#,
                "0000000g",
            ),
            (
                r#"{"version": 1, "block_bytes": 4, "objects": {"k": {"size": 9, "crc32c": ["00000000"]}}}"#,
                "needs 3",
            ),
            ("{", "not valid JSON"),
        ];
        for (json, needle) in cases {
            let err = Manifest::from_json(json).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{json}: {err}");
            assert!(err.to_string().contains(needle), "{json}: {err}");
        }
    }

    #[test]
    fn check_keys_names_keys_no_replica_holds() {
        let (dir, _) = replica();
        let mut m = Manifest::for_dir(dir.path(), 4096, None).unwrap();
        let store: Arc<dyn Store> = Arc::new(LocalStore::rooted(dir.path()).unwrap());
        m.check_keys(&[Arc::clone(&store)]).unwrap();
        m.objects.insert(
            "ghost.bin".into(),
            ObjectSums {
                size: 0,
                crc32c: vec![],
            },
        );
        let err = m.check_keys(&[store]).unwrap_err();
        assert!(err.to_string().contains("\"ghost.bin\""), "{err}");
    }

    #[test]
    fn verified_reads_aligned_and_unaligned() {
        let (dir, bytes) = replica();
        let m = Arc::new(Manifest::for_dir(dir.path(), 4096, None).unwrap());
        let store = VerifyingStore::new(Arc::new(LocalStore::rooted(dir.path()).unwrap()), m);
        // Aligned: straight into the buffer.
        let mut buf = vec![0u8; 8192];
        store
            .read_into_blocking("sub/a.bin", 0, &mut buf)
            .unwrap()
            .unwrap();
        assert_eq!(buf, bytes[..8192]);
        assert_eq!(store.stats().verified_bytes, 8192);
        // Unaligned, crossing a block: two whole blocks checked.
        let mut buf = vec![0u8; 100];
        store
            .read_into_blocking("sub/a.bin", 4050, &mut buf)
            .unwrap()
            .unwrap();
        assert_eq!(buf, bytes[4050..4150]);
        assert_eq!(store.stats().verified_bytes, 8192 * 2);
        // The short last block, async path.
        let mut buf = vec![0u8; 10_000 - 8192];
        runtime::block_on(store.read_into("sub/a.bin", 8192, &mut buf)).unwrap();
        assert_eq!(buf, bytes[8192..]);
        // Past the end, and unknown keys.
        let mut buf = vec![0u8; 10];
        let err = store
            .read_into_blocking("sub/a.bin", 9995, &mut buf)
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(err, Error::ShortRead { got_bytes: 5, .. }),
            "{err}"
        );
        let err = store
            .read_into_blocking("other", 0, &mut buf)
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("not in the manifest"), "{err}");
        assert_eq!(store.stats().mismatches, 0);
    }

    #[test]
    fn changed_bytes_are_a_retryable_mismatch_never_delivered() {
        let (dir, _) = replica();
        let m = Arc::new(Manifest::for_dir(dir.path(), 4096, None).unwrap());
        let chaos = ChaosSpec::from_json(r#"{"corrupt_rate": 1}"#).unwrap();
        let local: Arc<dyn Store> = Arc::new(LocalStore::rooted(dir.path()).unwrap());
        let corrupting = Arc::new(ChaosStore::new(local, chaos).unwrap());
        let store = VerifyingStore::new(corrupting.clone(), m);
        for (offset, len) in [(0u64, 4096usize), (100, 10), (0, 10_000), (8192, 1808)] {
            let mut buf = vec![0u8; len];
            let err = store
                .read_into_blocking("sub/a.bin", offset, &mut buf)
                .unwrap()
                .unwrap_err();
            assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
            assert!(err.is_retryable());
        }
        assert_eq!(store.stats().mismatches, 4);
        assert_eq!(corrupting.stats().corruptions, 4);
        // A file changed on disk after the manifest was written, too.
        std::fs::write(dir.path().join("sub/a.bin"), data(10_001)).unwrap();
        let fresh = VerifyingStore::new(
            Arc::new(LocalStore::rooted(dir.path()).unwrap()),
            Arc::clone(store.manifest()),
        );
        assert!(fresh.size_blocking("sub/a.bin").unwrap().is_err());
    }
}
