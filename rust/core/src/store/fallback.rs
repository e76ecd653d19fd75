//! The hook for protocols without a native backend. The core has no Python;
//! the bindings register an opener at import that serves any other protocol
//! (`memory://`, an fsspec filesystem instance, ...) through fsspec.

use std::sync::{Arc, OnceLock};

use super::secrets::StorageOptions;
use super::Store;
use crate::error::Result;

/// Opens a replica root that no native backend serves.
pub type FallbackOpener = dyn Fn(&str, &StorageOptions) -> Result<Arc<dyn Store>> + Send + Sync;

static OPENER: OnceLock<Box<FallbackOpener>> = OnceLock::new();

/// Registers the process's fallback opener; the first registration wins
/// (the bindings register once, at import).
pub fn set_opener(opener: Box<FallbackOpener>) {
    let _ = OPENER.set(opener);
}

/// The registered opener, if any.
pub fn opener() -> Option<&'static FallbackOpener> {
    OPENER.get().map(|b| b.as_ref())
}
