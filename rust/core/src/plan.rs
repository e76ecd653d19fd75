//! Plans: the ordered list of byte ranges a stream delivers.

use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};

use crate::error::{Error, Result};
use crate::store::Store;

/// One read: `len` bytes of object `key` from `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRange {
    pub key: Arc<str>,
    pub offset: u64,
    pub len: usize,
}

/// Splits `[offset, offset + len)` of `key` into ranges of at most
/// `chunk_bytes`, appended to `out`.
pub fn split_range(
    key: &Arc<str>,
    offset: u64,
    len: u64,
    chunk_bytes: usize,
    out: &mut Vec<ReadRange>,
) {
    let mut at = offset;
    let end = offset + len;
    while at < end {
        let n = (end - at).min(chunk_bytes as u64) as usize;
        out.push(ReadRange {
            key: Arc::clone(key),
            offset: at,
            len: n,
        });
        at += n as u64;
    }
}

/// Resolves fsspec's `cat_file(path, start, end)` arguments against an
/// object of `size` bytes, with Python slice semantics as fsspec's local
/// filesystem has them: negative values count from the end, `None` means
/// the start or the end, and a range past the end is clipped (possibly to
/// nothing). Returns `(offset, len)`.
pub fn resolve_slice(size: u64, start: Option<i64>, end: Option<i64>) -> (u64, u64) {
    let size_i = size as i128;
    let clamp = |v: i64| -> u64 {
        let v = v as i128;
        let v = if v < 0 { size_i + v } else { v };
        v.clamp(0, size_i) as u64
    };
    let s = start.map_or(0, clamp);
    let e = end.map_or(size, clamp);
    (s, e.saturating_sub(s))
}

/// Checks an explicit `(offset, len)` request against the object's size:
/// a plan names bytes that must exist, so nothing is clipped silently.
pub fn check_explicit_range(key: &str, size: u64, offset: i64, len: i64) -> Result<(u64, u64)> {
    if offset < 0 {
        return Err(Error::invalid(format!(
            "offset {offset} for {key:?} is negative"
        )));
    }
    if len < 0 {
        return Err(Error::invalid(format!(
            "length {len} for {key:?} is negative"
        )));
    }
    let (o, l) = (offset as u64, len as u64);
    if o.checked_add(l).is_none_or(|e| e > size) {
        return Err(Error::invalid(format!(
            "range offset {o} + length {l} is past the end of {key:?} ({size} bytes)"
        )));
    }
    Ok((o, l))
}

/// Stats in flight while a plan is built.
pub const STAT_CONCURRENCY: usize = 64;

/// A plan entry before sizes are known. Keys are shared (`Arc<str>`): a
/// plan of 100,000 ranges usually names a few objects, and the plan's
/// ranges share the same key without a copy each.
#[derive(Debug, Clone)]
pub enum PlanItem {
    /// The whole object.
    Object(Arc<str>),
    /// An explicit range, validated against the object's size.
    Range {
        key: Arc<str>,
        offset: i64,
        len: i64,
    },
}

/// Builds a plan: whole objects and explicit ranges split into chunks of
/// at most `chunk_bytes`. Sizes come from the store (one stat per object).
pub async fn build_plan(
    store: &dyn Store,
    items: &[PlanItem],
    chunk_bytes: usize,
) -> Result<Vec<ReadRange>> {
    build_plan_with(store, items, chunk_bytes, &|_: &str| None).await
}

/// `build_plan` where `known` already gives some sizes (a manifest's, which
/// verification then holds every read to): those objects are not statted.
pub async fn build_plan_with(
    store: &dyn Store,
    items: &[PlanItem],
    chunk_bytes: usize,
    known: &(dyn Fn(&str) -> Option<u64> + Sync),
) -> Result<Vec<ReadRange>> {
    if chunk_bytes == 0 {
        return Err(Error::invalid("chunk_bytes must be at least 1, got 0"));
    }
    // Stat each distinct object once, many at a time: on a remote store a
    // stat is a round trip, and a plan of 1,000 objects must not wait for
    // 1,000 of them in a row.
    let mut keys: Vec<&str> = items
        .iter()
        .map(|item| match item {
            PlanItem::Object(key) | PlanItem::Range { key, .. } => &**key,
        })
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let sizes: std::collections::HashMap<&str, u64> = futures::stream::iter(keys)
        .map(|key| async move {
            match known(key) {
                Some(size) => Ok((key, size)),
                None => store.size(key).await.map(|size| (key, size)),
            }
        })
        .buffer_unordered(STAT_CONCURRENCY)
        .try_collect()
        .await?;
    let mut out = Vec::with_capacity(items.len());
    // The previous item's key and size: consecutive ranges of one object
    // (the usual plan) skip the map lookup.
    let mut last: Option<(&Arc<str>, u64)> = None;
    for item in items {
        let key = match item {
            PlanItem::Object(key) | PlanItem::Range { key, .. } => key,
        };
        let size = match last {
            Some((k, size)) if Arc::ptr_eq(k, key) => size,
            _ => sizes[&**key],
        };
        last = Some((key, size));
        match item {
            PlanItem::Object(_) => split_range(key, 0, size, chunk_bytes, &mut out),
            PlanItem::Range { offset, len, .. } => {
                let (o, l) = check_explicit_range(key, size, *offset, *len)?;
                split_range(key, o, l, chunk_bytes, &mut out);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_like_python() {
        assert_eq!(resolve_slice(10, None, None), (0, 10));
        assert_eq!(resolve_slice(10, Some(-3), None), (7, 3));
        assert_eq!(resolve_slice(10, Some(2), Some(-2)), (2, 6));
        assert_eq!(resolve_slice(10, Some(20), None), (10, 0));
        assert_eq!(resolve_slice(10, Some(5), Some(3)), (5, 0));
        assert_eq!(resolve_slice(10, Some(-30), Some(30)), (0, 10));
    }

    #[test]
    fn splits_into_bounded_chunks() {
        let mut out = Vec::new();
        split_range(&Arc::from("k"), 3, 10, 4, &mut out);
        let got: Vec<_> = out.iter().map(|r| (r.offset, r.len)).collect();
        assert_eq!(got, vec![(3, 4), (7, 4), (11, 2)]);
    }

    #[test]
    fn explicit_ranges_are_checked() {
        assert!(check_explicit_range("k", 10, -1, 2).is_err());
        assert!(check_explicit_range("k", 10, 0, -2).is_err());
        assert!(check_explicit_range("k", 10, 5, 6).is_err());
        assert_eq!(check_explicit_range("k", 10, 5, 5).unwrap(), (5, 5));
    }
}
