//! The one adapter from core errors to Python exceptions.

use feedline_core::Error;
use pyo3::exceptions::{
    PyFileNotFoundError, PyIsADirectoryError, PyNotImplementedError, PyOSError, PyPermissionError,
    PyTimeoutError, PyTypeError, PyValueError,
};
use pyo3::prelude::*;

pyo3::create_exception!(
    _core,
    ReplicasUnavailable,
    PyOSError,
    "No replica could serve a read; the message names each replica and its last error."
);
pyo3::create_exception!(
    _core,
    ChecksumMismatch,
    PyOSError,
    "Bytes read did not match the manifest's CRC32C."
);
pyo3::create_exception!(
    _core,
    ShortReadError,
    PyOSError,
    "The object ended before the requested range (it shrank, or a server sent too little)."
);

const ENOENT: i32 = 2;
const EACCES: i32 = 13;
const EISDIR: i32 = 21;

pub fn to_py(err: Error) -> PyErr {
    let msg = err.to_string();
    match err {
        Error::NotFound { path } => PyFileNotFoundError::new_err((ENOENT, msg, path)),
        Error::PermissionDenied { path } => PyPermissionError::new_err((EACCES, msg, path)),
        Error::IsADirectory { path } => PyIsADirectoryError::new_err((EISDIR, msg, path)),
        Error::InvalidArgument(_) | Error::Closed(_) => PyValueError::new_err(msg),
        Error::InvalidType(_) => PyTypeError::new_err(msg),
        Error::Unsupported(_) => PyNotImplementedError::new_err(msg),
        Error::ShortRead { .. } => ShortReadError::new_err(msg),
        Error::ChecksumMismatch { .. } => ChecksumMismatch::new_err(msg),
        Error::Timeout { .. } => PyTimeoutError::new_err(msg),
        Error::ReplicasUnavailable { .. } => ReplicasUnavailable::new_err(msg),
        Error::Io { source, .. } => match source.raw_os_error() {
            Some(errno) => PyOSError::new_err((errno, msg)),
            None => PyOSError::new_err(msg),
        },
        Error::Cancelled(_) | Error::Remote(_) => PyOSError::new_err(msg),
    }
}

/// `?`-friendly conversion for binding functions.
pub trait IntoPyResult<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for Result<T, Error> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("ReplicasUnavailable", py.get_type::<ReplicasUnavailable>())?;
    m.add("ChecksumMismatch", py.get_type::<ChecksumMismatch>())?;
    m.add("ShortReadError", py.get_type::<ShortReadError>())?;
    Ok(())
}
