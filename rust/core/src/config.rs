//! The one typed configuration of a `FileSystem`: a few sections (routing,
//! prefetch, chaos per replica, ...) that users write as keyword arguments,
//! dicts or TOML tables. Every value is deserialized and checked here, once;
//! errors name the option as the user wrote it and, for a misspelt name,
//! suggest the nearest known one.
//!
//! Values arrive as a [`serde_json::Value`] tree (the bindings convert Python
//! objects straight into one; TOML tables convert the same way), so there is
//! one path from any front end into the same types.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{DeserializeOwned, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::chaos::ChaosSpec;
use crate::error::{Error, Result};
use crate::manifest::ManifestSource;
use crate::prefetch::{StreamConfig, DEFAULT_MEMORY_BUDGET_BYTES};
use crate::route::{RouterConfig, RoutingOptions};
use crate::store::secrets::{self, redacted_options, StorageOptions};

/// Largest duration any `*_ms` option takes: about 11.6 days. Far past any
/// sensible timeout, and small enough that `Instant + duration` never
/// overflows (a larger value used to panic).
pub const MAX_DURATION_MS: f64 = 1e9;

/// Prefetching: how streams and file objects read ahead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrefetchOptions {
    /// Largest chunk a stream hands out; the ring's slot size.
    #[serde(deserialize_with = "at_least_one")]
    pub chunk_bytes: u64,
    /// Reads in flight per stream or file object.
    #[serde(deserialize_with = "at_least_one")]
    pub depth: u64,
    /// A file read at least this large skips read-ahead and goes straight
    /// into the caller's buffer, in parallel.
    #[serde(deserialize_with = "at_least_one")]
    pub direct_bytes: u64,
    /// Upper bound on one stream's arena (slots × chunk_bytes).
    #[serde(deserialize_with = "at_least_one")]
    pub memory_budget_bytes: u64,
}

impl Default for PrefetchOptions {
    fn default() -> Self {
        PrefetchOptions {
            chunk_bytes: 4 << 20,
            depth: 8,
            direct_bytes: 16 << 20,
            memory_budget_bytes: DEFAULT_MEMORY_BUDGET_BYTES as u64,
        }
    }
}

impl PrefetchOptions {
    /// The stream configuration, checked (sizes above zero, the arena within
    /// the memory budget).
    pub fn stream_config(&self) -> Result<StreamConfig> {
        let size = |name: &str, v: u64| -> Result<usize> {
            if v == 0 {
                return Err(Error::invalid(format!("{name} must be at least 1, got 0")));
            }
            usize::try_from(v)
                .map_err(|_| Error::invalid(format!("{name} is too large for this machine: {v}")))
        };
        let mut config = StreamConfig::new(size("chunk_bytes", self.chunk_bytes)?, {
            size("depth", self.depth)?
        });
        config.memory_budget_bytes = size("memory_budget_bytes", self.memory_budget_bytes)?;
        size("direct_bytes", self.direct_bytes)?;
        config.validate()?;
        Ok(config)
    }

    /// `self` with the fields present in `overrides` replaced (a per-call
    /// `stream(depth=...)` over the filesystem's defaults).
    pub fn with(&self, overrides: Value) -> Result<Self> {
        let mut base = serde_json::to_value(self).expect("plain numbers serialize");
        if let (Value::Object(base), Value::Object(over)) = (&mut base, overrides) {
            base.extend(over.into_iter().filter(|(_, v)| !v.is_null()));
        }
        let merged: PrefetchOptions = section("prefetch", base)?;
        merged.stream_config()?;
        Ok(merged)
    }
}

/// The node cache: blocks of remote objects on a local disk, shared by every
/// process on the machine (see [`crate::cache`]). Off until `cache_dir` is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheOptions {
    /// Directory of the cache (created if missing); `None` turns it off.
    pub cache_dir: Option<String>,
    /// Hard bound on the bytes of cached blocks in `cache_dir`.
    #[serde(deserialize_with = "at_least_one")]
    pub cache_bytes: u64,
    /// Objects are cached in aligned blocks of this size (a smaller object
    /// is one block).
    #[serde(deserialize_with = "at_least_one")]
    pub cache_block_bytes: u64,
    /// Ask a replica for the object's version (one HEAD per object at most
    /// once a second per process) so a rewritten object is never served
    /// from stale blocks. `False` trusts the first version seen, for
    /// immutable datasets.
    pub check_version: bool,
    /// Eviction policy: `"s3fifo"` or `"lru"`.
    pub cache_policy: String,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            cache_dir: None,
            cache_bytes: 16 << 30,
            cache_block_bytes: 8 << 20,
            check_version: true,
            cache_policy: "s3fifo".into(),
        }
    }
}

impl CacheOptions {
    /// What deserializing cannot see.
    pub fn check(&self) -> Result<()> {
        crate::evict::Policy::parse(&self.cache_policy).map_err(|_| {
            Error::invalid(format!(
                "cache_policy must be one of {}, got {:?}",
                crate::evict::Policy::NAMES.join(", "),
                self.cache_policy
            ))
        })?;
        if self.cache_dir.as_deref() == Some("") {
            return Err(Error::invalid("cache_dir must be a directory, got ''"));
        }
        if self.cache_block_bytes > self.cache_bytes {
            return Err(Error::invalid(format!(
                "cache_block_bytes ({}) must not exceed cache_bytes ({})",
                self.cache_block_bytes, self.cache_bytes
            )));
        }
        if self.cache_block_bytes < 4096 {
            return Err(Error::invalid(format!(
                "cache_block_bytes must be at least 4096 (a page), got {}",
                self.cache_block_bytes
            )));
        }
        if self.cache_block_bytes > 1 << 30 {
            return Err(Error::invalid(format!(
                "cache_block_bytes must be at most 1 GiB, got {}",
                self.cache_block_bytes
            )));
        }
        Ok(())
    }

    /// Cache settings without `cache_dir` would be ignored (the cache is
    /// off): refused, so a forgotten `cache_dir` is not a silent cold read.
    fn check_enabled(&self) -> Result<()> {
        if self.cache_dir.is_some() {
            return Ok(());
        }
        let off = CacheOptions::default();
        let given: Vec<&str> = [
            ("cache_bytes", self.cache_bytes != off.cache_bytes),
            (
                "cache_block_bytes",
                self.cache_block_bytes != off.cache_block_bytes,
            ),
            ("check_version", self.check_version != off.check_version),
            ("cache_policy", self.cache_policy != off.cache_policy),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect();
        match given.is_empty() {
            true => Ok(()),
            false => Err(Error::invalid(format!(
                "{} given without cache_dir: the node cache is off until cache_dir is set",
                given.join(", ")
            ))),
        }
    }
}

/// A count or size that must be at least 1 (a depth, a byte size).
pub fn at_least_one<'de, D: Deserializer<'de>, T: TryFrom<u64>>(
    d: D,
) -> std::result::Result<T, D::Error> {
    struct One;
    impl Visitor<'_> for One {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a whole number of at least 1")
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<u64, E> {
            match v {
                0 => Err(E::invalid_value(serde::de::Unexpected::Unsigned(0), &self)),
                v => Ok(v),
            }
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<u64, E> {
            u64::try_from(v)
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
                .and_then(|v| self.visit_u64(v))
        }
    }
    let v = d.deserialize_u64(One)?;
    T::try_from(v).map_err(|_| {
        serde::de::Error::invalid_value(serde::de::Unexpected::Unsigned(v), &"a smaller number")
    })
}

/// One replica: where it is, and the options only it needs (its own
/// endpoint, region, credentials) over the shared `storage_options`.
#[derive(Clone, PartialEq, Serialize)]
pub struct ReplicaSpec {
    /// A local directory or a URL (`http://`, `s3://`, ...).
    #[serde(serialize_with = "serialize_root")]
    pub url: String,
    /// Options for this replica only; they override the shared ones.
    #[serde(serialize_with = "serialize_redacted")]
    pub storage_options: StorageOptions,
    /// Relative share of keys (default 1).
    pub weight: Option<f64>,
}

impl fmt::Debug for ReplicaSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicaSpec")
            .field("url", &secrets::display_root(&self.url))
            .field("storage_options", &redacted_options(&self.storage_options))
            .field("weight", &self.weight)
            .finish()
    }
}

impl From<&str> for ReplicaSpec {
    fn from(url: &str) -> Self {
        ReplicaSpec {
            url: url.to_owned(),
            storage_options: StorageOptions::new(),
            weight: None,
        }
    }
}

impl From<String> for ReplicaSpec {
    fn from(url: String) -> Self {
        ReplicaSpec::from(url.as_str())
    }
}

/// A replica as a table: `{url, storage_options, weight}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplicaTable {
    url: String,
    #[serde(default)]
    storage_options: StorageOptions,
    #[serde(default)]
    weight: Option<f64>,
}

impl<'de> Deserialize<'de> for ReplicaSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct ReplicaVisitor;
        impl<'de> Visitor<'de> for ReplicaVisitor {
            type Value = ReplicaSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a path, a URL or a feedline.Replica")
            }
            fn visit_str<E: serde::de::Error>(
                self,
                v: &str,
            ) -> std::result::Result<ReplicaSpec, E> {
                Ok(ReplicaSpec::from(v))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> std::result::Result<ReplicaSpec, A::Error> {
                let t =
                    ReplicaTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(ReplicaSpec {
                    url: t.url,
                    storage_options: t.storage_options,
                    weight: t.weight,
                })
            }
        }
        d.deserialize_any(ReplicaVisitor)
    }
}

fn serialize_root<S: serde::Serializer>(root: &str, s: S) -> std::result::Result<S::Ok, S::Error> {
    secrets::display_root(root).serialize(s)
}

fn serialize_redacted<S: serde::Serializer>(
    options: &StorageOptions,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    redacted_options(options).serialize(s)
}

/// Everything a `FileSystem` is built from.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Replica roots. Empty: the local filesystem, paths as given.
    pub replicas: Vec<ReplicaSpec>,
    /// Options for every URL replica (credentials, endpoint, ...); a
    /// replica's own options override them. Never shown unredacted.
    #[serde(serialize_with = "serialize_redacted")]
    pub storage_options: StorageOptions,
    /// Async reads in flight for `cat_ranges` on remote stores.
    pub concurrency: Option<usize>,
    pub routing: RoutingOptions,
    pub prefetch: PrefetchOptions,
    pub cache: CacheOptions,
    /// Faults to inject, by replica index (see [`crate::chaos`]).
    pub chaos: BTreeMap<usize, ChaosSpec>,
    /// Per-block CRC32C manifest; with it every read is verified.
    pub manifest: Option<ManifestSource>,
}

impl fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorageConfig")
            .field("replicas", &self.replicas)
            .field("storage_options", &redacted_options(&self.storage_options))
            .field("concurrency", &self.concurrency)
            .field("routing", &self.routing)
            .field("prefetch", &self.prefetch)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

/// The sections that flat keyword arguments are sorted into, in order.
const SECTIONS: [&str; 3] = ["routing", "prefetch", "cache"];

impl StorageConfig {
    /// From a tree: sections nested (`{"routing": {...}}`), or their options
    /// given flat beside the top-level ones (`{"hedge_after_ms": 20}`), as
    /// `FileSystem(...)` keyword arguments are. A name that is neither is an
    /// error suggesting the nearest known name; an option given both ways is
    /// an error too.
    pub fn from_value(value: Value) -> Result<Self> {
        let Value::Object(given) = value else {
            return Err(Error::invalid(format!(
                "a configuration is a table of options, got {}",
                py_repr(&value)
            )));
        };
        let top = field_names::<StorageConfig>();
        let mut tree = Map::new();
        let mut flat: BTreeMap<&str, Map<String, Value>> = BTreeMap::new();
        for (key, v) in given {
            if top.contains(&key.as_str()) {
                tree.insert(key, v);
                continue;
            }
            let Some(section) = SECTIONS
                .into_iter()
                .find(|s| section_fields(s).contains(&key.as_str()))
            else {
                return Err(unknown_option(&key, &all_option_names(), None));
            };
            flat.entry(section).or_default().insert(key, v);
        }
        for (section, options) in flat {
            let slot = tree
                .entry(section.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(nested) = slot else {
                return Err(Error::invalid(format!(
                    "{section} must be a table of options, got {}",
                    py_repr(slot)
                )));
            };
            for (key, v) in options {
                if nested.contains_key(&key) {
                    return Err(Error::invalid(format!(
                        "{key} is given twice: as {key}= and in {section}="
                    )));
                }
                nested.insert(key, v);
            }
        }
        let config: StorageConfig = section("configuration", Value::Object(tree))?;
        config.check()?;
        Ok(config)
    }

    /// What deserializing cannot see: values checked against each other.
    pub fn check(&self) -> Result<()> {
        self.router_config()?;
        self.prefetch.stream_config()?;
        self.cache.check()?;
        self.cache.check_enabled()?;
        for spec in self.chaos.values() {
            spec.validate()?;
        }
        let n = self.replicas.len().max(1);
        if let Some((&index, _)) = self.chaos.iter().find(|(&i, _)| i >= n) {
            return Err(Error::invalid(format!(
                "chaos names replica {index}, but there are {n} (indices 0..{})",
                n - 1
            )));
        }
        // The same URL with other options is another replica (one bucket
        // name on two endpoints); the same URL and options is a mistake.
        let mut seen: Vec<((String, &StorageOptions), &str)> = Vec::new();
        for r in &self.replicas {
            let same = (same_place(&r.url), &r.storage_options);
            if let Some((_, first)) = seen.iter().find(|(s, _)| *s == same) {
                return Err(Error::invalid(format!(
                    "replica {:?} is listed twice (same as {:?})",
                    secrets::display_root(&r.url),
                    secrets::display_root(first)
                )));
            }
            seen.push((same, &r.url));
        }
        if self.concurrency == Some(0) {
            return Err(Error::invalid("concurrency must be at least 1, got 0"));
        }
        Ok(())
    }

    /// The router's settings, validated. Weights come from the routing
    /// section or from each replica's `weight`, not both.
    pub fn router_config(&self) -> Result<RouterConfig> {
        let per_replica = self.replicas.iter().any(|r| r.weight.is_some());
        let mut routing = self.routing.clone();
        if per_replica {
            if routing.weights.is_some() {
                return Err(Error::invalid(
                    "weights are given twice: as weights= and as a replica's weight",
                ));
            }
            routing.weights = Some(
                self.replicas
                    .iter()
                    .map(|r| r.weight.unwrap_or(1.0))
                    .collect(),
            );
        }
        if let Some(w) = &routing.weights {
            for (r, w) in self.replicas.iter().zip(w) {
                if !(w.is_finite() && *w > 0.0) {
                    return Err(Error::invalid(format!(
                        "weight of replica {:?} must be a finite number above 0, got {w}",
                        secrets::display_root(&r.url)
                    )));
                }
            }
            if self.replicas.is_empty() {
                return Err(Error::invalid("weights given without replicas"));
            }
            if w.len() != self.replicas.len() {
                return Err(Error::invalid(format!(
                    "weights must have one entry per replica: {} weights for {} replicas",
                    w.len(),
                    self.replicas.len()
                )));
            }
        }
        RouterConfig::from_options(&routing)
    }

    /// The options replica `i` opens with: the shared ones, overridden by
    /// its own.
    pub fn replica_options(&self, i: usize) -> StorageOptions {
        let mut options = self.storage_options.clone();
        if let Some(r) = self.replicas.get(i) {
            options.extend(r.storage_options.clone());
        }
        options
    }

    /// The replica roots, in order.
    pub fn roots(&self) -> Vec<&str> {
        self.replicas.iter().map(|r| r.url.as_str()).collect()
    }
}

/// What makes two replica roots the same place: a URL as written (less a
/// trailing slash), a local directory by its canonical path.
fn same_place(root: &str) -> String {
    if root.contains("://") {
        return root.trim_end_matches('/').to_owned();
    }
    std::fs::canonicalize(root)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| root.trim_end_matches('/').to_owned())
}

/// Deserializes one section (or the whole configuration) from a tree, with
/// errors that name the option by its path and show the value as given.
pub fn section<T: DeserializeOwned>(name: &str, value: Value) -> Result<T> {
    let given = value.clone();
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        explain(name, &path, &given, &e.into_inner().to_string())
    })
}

/// The option names of a section (`"routing"`, `"prefetch"`, `"chaos"`, or
/// `"configuration"` for the top level).
pub fn section_fields(name: &str) -> &'static [&'static str] {
    match name {
        "routing" => field_names::<RoutingOptions>(),
        "prefetch" => field_names::<PrefetchOptions>(),
        "cache" => field_names::<CacheOptions>(),
        "chaos" => field_names::<ChaosSpec>(),
        "replica" => field_names::<ReplicaTable>(),
        _ => field_names::<StorageConfig>(),
    }
}

/// Every option name a `FileSystem` takes, flat or as a section.
pub fn all_option_names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = field_names::<StorageConfig>().to_vec();
    for s in SECTIONS {
        names.extend_from_slice(section_fields(s));
    }
    names
}

/// Turns a serde message into one that names the option and shows the
/// value as the user wrote it.
fn explain(section: &str, path: &str, given: &Value, message: &str) -> Error {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (unknown, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let known: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        let place = match path.rsplit_once('.') {
            Some((parent, _)) => parent.to_owned(),
            None => section.to_owned(),
        };
        return unknown_option(unknown, &known, Some(&place));
    }
    // Section options are named as users pass them: flat (`depth=`), not
    // by where they are stored (`prefetch.depth`).
    let name = match path {
        "" | "." => section.to_owned(),
        _ => SECTIONS
            .iter()
            .find_map(|s| path.strip_prefix(s).and_then(|p| p.strip_prefix('.')))
            .unwrap_or(path)
            .to_owned(),
    };
    let shown = lookup(given, path).map(py_repr);
    if let Some(expected) = message.rsplit_once(", expected ").map(|(_, e)| e) {
        let got = shown.unwrap_or_else(|| message.split(", expected").next().unwrap_or("").into());
        let text = format!("{name} must be {}, got {got}", humanize(expected));
        return match message.starts_with("invalid type") {
            true => Error::InvalidType(text),
            false => Error::invalid(text),
        };
    }
    match shown {
        Some(got) => Error::invalid(format!("{name}: {message} (got {got})")),
        None => Error::invalid(format!("{name}: {message}")),
    }
}

fn humanize(expected: &str) -> String {
    match expected {
        "f64" | "f32" => "a number".into(),
        "u8" | "u16" | "u32" => format!(
            "a whole number from 0 to {}",
            match expected {
                "u8" => u64::from(u8::MAX),
                "u16" => u64::from(u16::MAX),
                _ => u64::from(u32::MAX),
            }
        ),
        "u64" | "usize" => "a whole number of at least 0".into(),
        "i64" | "isize" => "a whole number".into(),
        "a boolean" => "True or False".into(),
        "internally tagged enum Latency" => {
            "a latency distribution (feedline.chaos.Fixed, Uniform, Normal, LogNormal or Pareto)"
                .into()
        }
        other => other.to_owned(),
    }
}

/// The value at a serde_path_to_error path (`routing.weights[1]`).
fn lookup<'v>(root: &'v Value, path: &str) -> Option<&'v Value> {
    if path.is_empty() || path == "." {
        return Some(root);
    }
    let mut at = root;
    for part in path.split('.') {
        let (field, indices) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !field.is_empty() {
            at = at.get(field)?;
        }
        for index in indices.split(['[', ']']).filter(|s| !s.is_empty()) {
            at = at.get(index.parse::<usize>().ok()?)?;
        }
    }
    Some(at)
}

/// A value as Python would print it, so errors show what the user typed.
pub fn py_repr(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        Value::Bool(b) => if *b { "True" } else { "False" }.into(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'")),
        Value::Array(items) => {
            format!(
                "[{}]",
                items.iter().map(py_repr).collect::<Vec<_>>().join(", ")
            )
        }
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("'{k}': {}", py_repr(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn unknown_option(name: &str, known: &[&str], place: Option<&str>) -> Error {
    let place = match place {
        Some(p) if p != "configuration" => format!(" in {p}"),
        _ => String::new(),
    };
    let hint = match nearest(name, known) {
        Some(best) => format!("; did you mean '{best}'?"),
        None => format!("; known options: {}", known.join(", ")),
    };
    Error::invalid(format!("unknown option '{name}'{place}{hint}"))
}

/// The known name closest to `name` by edit distance, if it is close enough
/// to be a typo (at most a third of the name's letters differ).
pub fn nearest<'k>(name: &str, known: &[&'k str]) -> Option<&'k str> {
    let limit = (name.chars().count() / 3).max(1);
    known
        .iter()
        .map(|k| (edit_distance(name, k), *k))
        .filter(|(d, _)| *d <= limit)
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// The field names serde derives for `T`, read off the derive itself (a
/// deserializer that records the fields it is asked for), so no list of
/// names is written twice.
pub fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    #[derive(Debug)]
    struct Found(&'static [&'static str]);
    impl fmt::Display for Found {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("field names")
        }
    }
    impl std::error::Error for Found {}
    impl serde::de::Error for Found {
        fn custom<M: fmt::Display>(_: M) -> Self {
            Found(&[])
        }
    }
    struct Names;
    impl<'de> Deserializer<'de> for Names {
        type Error = Found;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> std::result::Result<V::Value, Found> {
            Err(Found(&[]))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> std::result::Result<V::Value, Found> {
            Err(Found(fields))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
            enum identifier ignored_any
        }
    }
    match T::deserialize(Names) {
        Err(Found(fields)) => fields,
        Ok(_) => &[],
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn err(v: Value) -> String {
        StorageConfig::from_value(v).unwrap_err().to_string()
    }

    #[test]
    fn flat_options_land_in_their_sections() {
        let c = StorageConfig::from_value(json!({
            "hedge_after_ms": "p95", "depth": 3, "replicas": ["/a", {"url": "s3://b", "weight": 2}]
        }))
        .unwrap();
        assert_eq!(c.prefetch.depth, 3);
        assert_eq!(
            c.prefetch.chunk_bytes,
            PrefetchOptions::default().chunk_bytes
        );
        assert_eq!(c.replicas[1].url, "s3://b");
        assert_eq!(c.router_config().unwrap().weights, Some(vec![1.0, 2.0]));
    }

    #[test]
    fn unknown_names_suggest_the_nearest() {
        let e = err(json!({"hedge_afer_ms": 20}));
        assert_eq!(
            e,
            "unknown option 'hedge_afer_ms'; did you mean 'hedge_after_ms'?"
        );
        let e = err(json!({"routing": {"dedline_ms": 20}}));
        assert!(
            e.contains("in routing") && e.contains("'deadline_ms'"),
            "{e}"
        );
        let e = err(json!({"zzzzzzzzzz": 1}));
        assert!(e.contains("known options"), "{e}");
    }

    #[test]
    fn wrong_types_name_the_option_and_value() {
        let e = err(json!({"hedge_after_ms": "fast"}));
        assert!(e.contains("hedge_after_ms") && e.contains("'fast'"), "{e}");
        let e = err(json!({"timeout_ms": "1s"}));
        assert_eq!(e, "timeout_ms must be a number, got '1s'");
        let e = err(json!({"eject_after_failures": 1u64 << 40}));
        assert!(
            e.contains("eject_after_failures") && e.contains("1099511627776"),
            "{e}"
        );
        let e = err(json!({"depth": true}));
        assert!(e.starts_with("depth must be") && e.contains("True"), "{e}");
    }

    #[test]
    fn percentiles_are_plain_decimals() {
        for bad in [
            "p1e1", "p", "p100", "p0", "p-5", "p 95", "p95%", "pinf", "pnan",
        ] {
            let e = err(json!({"hedge_after_ms": bad}));
            assert!(e.contains("hedge_after_ms"), "{bad}: {e}");
        }
        for good in ["p95", "p99.9", "p50"] {
            StorageConfig::from_value(json!({"hedge_after_ms": good})).unwrap();
        }
    }

    #[test]
    fn huge_durations_are_refused_not_panicked_on() {
        for name in [
            "timeout_ms",
            "deadline_ms",
            "hedge_after_ms",
            "base_ejection_ms",
            "max_ejection_ms",
            "backoff_base_ms",
            "backoff_max_ms",
        ] {
            for v in [1e23, 1e300, f64::MAX] {
                let e = err(json!({ name: v }));
                assert!(e.contains(name), "{name}={v}: {e}");
            }
        }
    }

    #[test]
    fn an_option_given_twice_is_refused() {
        let e = err(json!({"depth": 2, "prefetch": {"depth": 3}}));
        assert!(e.contains("depth is given twice"), "{e}");
        let e = err(json!({"weights": [1, 2], "replicas": [{"url": "/a", "weight": 1}, "/b"]}));
        assert!(e.contains("weights are given twice"), "{e}");
    }

    #[test]
    fn the_arena_must_fit_the_budget() {
        let e = err(json!({"chunk_bytes": 1u64 << 30, "depth": 64}));
        assert!(e.contains("memory budget"), "{e}");
        let e = err(json!({"depth": 0}));
        assert_eq!(e, "depth must be a whole number of at least 1, got 0");
    }

    #[test]
    fn field_names_come_from_the_derive() {
        assert!(field_names::<RoutingOptions>().contains(&"hedge_after_ms"));
        assert_eq!(
            field_names::<PrefetchOptions>(),
            [
                "chunk_bytes",
                "depth",
                "direct_bytes",
                "memory_budget_bytes"
            ]
        );
    }

    #[test]
    fn secrets_stay_out_of_debug_and_serialized_forms() {
        let c = StorageConfig::from_value(json!({
            "replicas": [{"url": "s3://b", "storage_options": {"secret_access_key": "hunter2"}}],
            "storage_options": {"key": "hunter3"}
        }))
        .unwrap();
        let shown = format!("{c:?} {}", serde_json::to_string(&c).unwrap());
        assert!(
            !shown.contains("hunter2") && !shown.contains("hunter3"),
            "{shown}"
        );
        assert_eq!(c.replica_options(0)["secret_access_key"], "hunter2");
        assert_eq!(c.replica_options(0)["key"], "hunter3");
    }
}
