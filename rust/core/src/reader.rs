//! A file-like reader over one object: reads ahead through the prefetcher
//! while access is sequential, reads exactly what is asked on random access,
//! and fills large buffers with parallel reads straight into them.

use std::sync::Arc;
use std::time::Duration;

use crate::config::PrefetchOptions;
use crate::error::{Error, Result};
use crate::plan::{split_range, ReadRange};
use crate::prefetch::{Chunk, Next, Stream, StreamConfig};
use crate::storage::Storage;

/// Chunks per readahead stream; a longer file gets a fresh stream when one
/// window is done, so the plan stays small for any file size.
const WINDOW_CHUNKS: u64 = 256;

#[derive(Debug, Clone)]
pub struct ReaderConfig {
    pub chunk_bytes: usize,
    pub depth: usize,
    /// Reads at least this large skip readahead and go straight into the
    /// caller's buffer, in parallel.
    pub direct_bytes: usize,
}

impl TryFrom<&PrefetchOptions> for ReaderConfig {
    type Error = Error;
    fn try_from(o: &PrefetchOptions) -> Result<Self> {
        let stream = o.stream_config()?;
        Ok(ReaderConfig {
            chunk_bytes: stream.chunk_bytes,
            depth: stream.depth,
            direct_bytes: usize::try_from(o.direct_bytes).unwrap_or(usize::MAX),
        })
    }
}

struct Readahead {
    stream: Stream,
    chunk: Option<Chunk>,
    /// Bytes of `chunk` already handed out.
    used: usize,
    /// Object offset of the next byte this readahead will hand out.
    next_offset: u64,
    /// Object offset where this window's plan ends.
    end_offset: u64,
    /// The process whose thread drives `stream` (see `Reader::stop_readahead`).
    pid: u32,
}

pub struct Reader {
    storage: Arc<Storage>,
    key: String,
    size: u64,
    pos: u64,
    /// Where the previous read ended; a read starting there is sequential.
    last_end: Option<u64>,
    readahead: Option<Readahead>,
    config: ReaderConfig,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("key", &self.key)
            .field("size", &self.size)
            .field("pos", &self.pos)
            .field("readahead", &self.readahead.is_some())
            .finish()
    }
}

impl Reader {
    pub fn open(storage: Arc<Storage>, key: &str, config: ReaderConfig) -> Result<Self> {
        StreamConfig::new(config.chunk_bytes, config.depth).validate()?;
        let size = storage.size(key)?;
        Ok(Reader {
            storage,
            key: key.to_owned(),
            size,
            pos: 0,
            last_end: None,
            readahead: None,
            config,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn tell(&self) -> u64 {
        self.pos
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// Whether a readahead stream is running (tests watch this).
    pub fn is_reading_ahead(&self) -> bool {
        self.readahead.is_some()
    }

    /// Moves to `pos` (past the end is allowed, as for files: reads return 0).
    pub fn seek(&mut self, pos: u64) {
        self.pos = pos;
    }

    /// Fills as much of `buf` as the object has from the current position.
    pub fn read_into(&mut self, buf: &mut [u8]) -> Result<usize> {
        let n = buf.len().min(self.size.saturating_sub(self.pos) as usize);
        if n == 0 {
            return Ok(0);
        }
        let buf = &mut buf[..n];
        let sequential = self.last_end == Some(self.pos);
        if !sequential || n >= self.config.direct_bytes {
            self.stop_readahead();
        }
        if n >= self.config.direct_bytes {
            self.storage
                .read_into_parallel(&self.key, self.pos, buf, self.config.chunk_bytes)?;
        } else if sequential {
            self.read_ahead_into(buf)?;
        } else {
            self.storage.read_into(&self.key, self.pos, buf)?;
        }
        self.pos += n as u64;
        self.last_end = Some(self.pos);
        Ok(n)
    }

    /// Ends the readahead. In a forked child (a DataLoader worker reading a
    /// file opened before the fork) its driver thread stayed in the parent:
    /// joining it would wait for ever, so it is left alone.
    fn stop_readahead(&mut self) {
        if let Some(ra) = self.readahead.take() {
            if ra.pid != std::process::id() {
                std::mem::forget(ra);
            }
        }
    }

    fn start_readahead(&mut self) -> Result<()> {
        self.stop_readahead();
        let window = WINDOW_CHUNKS * self.config.chunk_bytes as u64;
        let len = (self.size - self.pos).min(window);
        let mut plan: Vec<ReadRange> = Vec::new();
        split_range(
            &Arc::from(self.key.as_str()),
            self.pos,
            len,
            self.config.chunk_bytes,
            &mut plan,
        );
        let config = StreamConfig::new(self.config.chunk_bytes, self.config.depth);
        let stream = Stream::start(self.storage.store(), plan, &config)?;
        self.readahead = Some(Readahead {
            stream,
            chunk: None,
            used: 0,
            next_offset: self.pos,
            end_offset: self.pos + len,
            pid: std::process::id(),
        });
        Ok(())
    }

    fn read_ahead_into(&mut self, buf: &mut [u8]) -> Result<()> {
        let mut filled = 0;
        while filled < buf.len() {
            let fresh = match &self.readahead {
                Some(ra) => {
                    ra.next_offset != self.pos + filled as u64
                        || ra.next_offset >= ra.end_offset
                        || ra.pid != std::process::id()
                }
                None => true,
            };
            if fresh {
                self.pos += filled as u64;
                let result = self.start_readahead();
                self.pos -= filled as u64;
                result?;
            }
            let ra = self.readahead.as_mut().expect("readahead started above");
            filled += ra.copy_into(&mut buf[filled..])?;
        }
        Ok(())
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop_readahead();
    }
}

impl Readahead {
    /// Copies from the current chunk (fetching the next one if needed).
    fn copy_into(&mut self, out: &mut [u8]) -> Result<usize> {
        if self.chunk.as_ref().is_none_or(|c| self.used == c.len()) {
            self.chunk = None;
            self.chunk = Some(self.next_chunk()?);
            self.used = 0;
        }
        let chunk = self.chunk.as_ref().expect("chunk fetched above");
        let data = &chunk.data()[self.used..];
        let n = data.len().min(out.len());
        out[..n].copy_from_slice(&data[..n]);
        self.used += n;
        self.next_offset += n as u64;
        Ok(n)
    }

    fn next_chunk(&mut self) -> Result<Chunk> {
        loop {
            match self.stream.next_chunk(Duration::from_millis(100))? {
                Next::Chunk(c) => return Ok(c),
                Next::Pending => crate::runtime::check_interrupt()?,
                Next::End => return Err(Error::Closed("readahead ended early".into())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StorageConfig;

    fn reader(bytes: &[u8], config: ReaderConfig) -> (tempfile::TempDir, Reader) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), bytes).unwrap();
        let storage = Storage::new(StorageConfig {
            replicas: vec![dir.path().display().to_string().into()],
            ..Default::default()
        })
        .unwrap();
        let r = Reader::open(Arc::new(storage), "f", config).unwrap();
        (dir, r)
    }

    #[test]
    fn sequential_small_reads_use_readahead_and_match() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let cfg = ReaderConfig {
            chunk_bytes: 4096,
            depth: 2,
            direct_bytes: 1 << 20,
        };
        let (_d, mut r) = reader(&data, cfg);
        let mut out = Vec::new();
        let mut buf = [0u8; 1000];
        loop {
            let n = r.read_into(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if out.len() == 5000 {
                assert!(r.is_reading_ahead());
            }
        }
        assert_eq!(out, data);
    }

    #[test]
    fn random_access_does_not_read_ahead() {
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 13) as u8).collect();
        let (_d, mut r) = reader(
            &data,
            ReaderConfig {
                chunk_bytes: 4096,
                depth: 2,
                direct_bytes: 1 << 20,
            },
        );
        let mut buf = [0u8; 100];
        for pos in [40_000u64, 10, 30_000, 5] {
            r.seek(pos);
            r.read_into(&mut buf).unwrap();
            assert_eq!(&buf[..], &data[pos as usize..pos as usize + 100]);
            assert!(!r.is_reading_ahead());
        }
    }

    #[test]
    fn large_reads_go_direct_and_reads_past_the_end_return_zero() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 7) as u8).collect();
        let (_d, mut r) = reader(
            &data,
            ReaderConfig {
                chunk_bytes: 4096,
                depth: 2,
                direct_bytes: 8192,
            },
        );
        let mut buf = vec![0u8; 400_000];
        assert_eq!(r.read_into(&mut buf).unwrap(), 300_000);
        assert_eq!(&buf[..300_000], &data[..]);
        assert_eq!(r.read_into(&mut buf).unwrap(), 0);
    }
}
