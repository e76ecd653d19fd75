//! `feedline._core`: PyO3 bindings only. Each module converts types for one
//! Python-facing concept, releases the GIL around core calls and maps errors
//! through `errors`; the work itself lives in `feedline-core`.

use pyo3::prelude::*;

mod chaos;
mod checksum;
mod config;
mod errors;
mod fsspec_store;
mod manifest;
mod metadata;
mod metrics;
mod proxy;
mod reader;
mod route;
mod signals;
mod storage;
mod stream;
mod telemetry;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    config::register(m)?;
    storage::register(m)?;
    stream::register(m)?;
    reader::register(m)?;
    metrics::register(m)?;
    checksum::register(m)?;
    proxy::register(m)?;
    route::register(m)?;
    chaos::register(m)?;
    manifest::register(m)?;
    metadata::register(m)?;
    fsspec_store::register(m)?;
    telemetry::register(m)?;
    Ok(())
}
