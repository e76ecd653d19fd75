//! One error type for the whole core. The Python bindings map each variant to
//! one Python exception in a single adapter (`rust/python/src/errors.rs`).

use std::fmt;
use std::io;

/// Result alias used across the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The last error seen on one replica, kept for `ReplicasUnavailable`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaFailure {
    pub replica: String,
    pub error: String,
}

/// Every way a read can fail, with the offending value named in the message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no such file: {path:?}")]
    NotFound { path: String },
    #[error("permission denied: {path:?}")]
    PermissionDenied { path: String },
    #[error("is a directory: {path:?}")]
    IsADirectory { path: String },
    /// Bad argument from the caller (range, size, name, configuration).
    #[error("{0}")]
    InvalidArgument(String),
    /// An option of the wrong type (a string where a number goes).
    #[error("{0}")]
    InvalidType(String),
    /// The object ended before the requested range did (it shrank, or a server
    /// sent fewer bytes than asked for). Never delivered as truncated data.
    #[error(
        "short read on {path:?}: wanted {wanted_bytes} bytes at offset {offset}, got {got_bytes}"
    )]
    ShortRead {
        path: String,
        offset: u64,
        wanted_bytes: u64,
        got_bytes: u64,
    },
    /// Bytes did not match the manifest's checksum.
    #[error("checksum mismatch on {path:?} at offset {offset}: expected crc32c {expected:#010x}, got {actual:#010x}")]
    ChecksumMismatch {
        path: String,
        offset: u64,
        expected: u32,
        actual: u32,
    },
    /// A single attempt ran past its timeout or the read's deadline passed.
    #[error("timed out after {elapsed_ms} ms: {what}")]
    Timeout { what: String, elapsed_ms: u64 },
    /// No replica could serve the read; each one's last error is named.
    #[error("no replica could serve {path:?}: {}", format_failures(.failures))]
    ReplicasUnavailable {
        path: String,
        failures: Vec<ReplicaFailure>,
    },
    /// The reader was closed or the attempt lost a hedge race.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// The slot, chunk or stream was already released or closed.
    #[error("{0}")]
    Closed(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The store cannot do this at all (listing over plain HTTP, writing to
    /// a read-only replica); no other replica of the same kind could either.
    #[error("{0}")]
    Unsupported(String),
    /// A remote store failed in a way that has no better mapping.
    #[error("{0}")]
    Remote(String),
}

fn format_failures(failures: &[ReplicaFailure]) -> String {
    let parts: Vec<String> = failures
        .iter()
        .map(|f| format!("{} ({})", f.replica, f.error))
        .collect();
    parts.join("; ")
}

impl Error {
    /// Wraps an `io::Error` from an operation on `path`, keeping the kinds
    /// that Python callers dispatch on.
    pub fn from_io(path: &str, source: io::Error) -> Self {
        match source.kind() {
            io::ErrorKind::NotFound => Error::NotFound { path: path.into() },
            io::ErrorKind::PermissionDenied => Error::PermissionDenied { path: path.into() },
            io::ErrorKind::IsADirectory => Error::IsADirectory { path: path.into() },
            _ if source.raw_os_error() == Some(21) => Error::IsADirectory { path: path.into() },
            _ => Error::Io {
                context: format!("reading {path:?}"),
                source,
            },
        }
    }

    pub fn invalid(msg: impl fmt::Display) -> Self {
        Error::InvalidArgument(msg.to_string())
    }

    /// Whether another replica might succeed where this one failed. Caller
    /// mistakes are not retried; everything the storage did wrong is.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            Error::InvalidArgument(_)
                | Error::InvalidType(_)
                | Error::Unsupported(_)
                | Error::Cancelled(_)
                | Error::Closed(_)
        )
    }
}
