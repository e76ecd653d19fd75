//! Remote objects over the `object_store` crate: `http(s)://` (range GETs),
//! `s3://`, `gs://` and `az://`, configured from fsspec-style
//! `storage_options`.
//!
//! * One `object_store` client per replica, reused for every read, so its
//!   connection pool (reqwest/hyper) keeps connections alive across reads.
//! * The client is rebuilt in a forked child: its pooled connections and
//!   their tasks belong to the parent's runtime, whose threads the child does
//!   not have (see `runtime.rs`). The parent's client is leaked there, like
//!   the runtime, because dropping it could touch those dead tasks.
//! * Credentials never leave this module in clear: `name()`, `Debug` and every
//!   error message go through [`Secrets::redact`].
//! * object_store's own retries are off by default: a dead replica should
//!   fail fast so the router fails over, instead of backing off for minutes.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::http::HttpBuilder;
use object_store::path::Path as ObjectPath;
use object_store::{
    ClientConfigKey, ClientOptions, GetOptions, GetRange, ObjectStore, RetryConfig,
};
use serde_json::Value;
use url::Url;

use super::secrets::strip_userinfo;
pub use super::secrets::{
    collect_secrets, display_url, is_native_scheme, is_secret_key, options_json, redact_error,
    redacted_options, Secrets, StorageOptions,
};
use super::{BoxFuture, Listing, ObjectMeta, Store};
use crate::error::{Error, Result};
use crate::fork::PerProcess;

/// Default per-request timeout. Long enough for a 1 GiB range on a slow link;
/// the router's deadline and hedging cut slow replicas much sooner.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default TCP connect timeout: a replica that does not complete a handshake
/// in this long is treated as down.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How to (re)build one replica's client: kept so a forked child can build
/// its own.
#[derive(Clone)]
struct Spec {
    url: Url,
    options: StorageOptions,
}

/// One remote replica root.
pub struct RemoteStore {
    name: String,
    /// Key prefix inside the bucket/container (empty for HTTP, whose root
    /// URL path is kept by the client itself).
    prefix: String,
    spec: Spec,
    secrets: Secrets,
    /// This process's client: a forked child builds its own (the parent's
    /// pooled connections are shared sockets), without a lock a parent
    /// thread could have held at the fork.
    client: PerProcess<Arc<dyn ObjectStore>>,
}

impl fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteStore")
            .field("name", &self.name)
            .field("prefix", &self.prefix)
            .field("options", &redacted_options(&self.spec.options))
            .finish()
    }
}

impl RemoteStore {
    /// Opens the replica at `root` (a URL with a native scheme).
    pub fn open(root: &str, options: &StorageOptions) -> Result<Self> {
        let url = Url::parse(root).map_err(|e| {
            let secrets = collect_secrets(None, options);
            Error::invalid(format!(
                "malformed replica URL {:?}: {e}",
                secrets.redact(&strip_userinfo(root))
            ))
        })?;
        let secrets = collect_secrets(Some(&url), options);
        let name = display_url(&url);
        if !is_native_scheme(url.scheme()) {
            return Err(Error::invalid(format!(
                "no native backend for {:?} (scheme {:?})",
                name,
                url.scheme()
            )));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(Error::invalid(format!(
                "replica URL {name:?} names no host or bucket"
            )));
        }
        let prefix = match url.scheme() {
            "http" | "https" => String::new(),
            // abfs://container@account.dfs.core.windows.net/path and
            // s3://bucket/path: the path below the bucket is our prefix.
            _ => url.path().trim_matches('/').to_owned(),
        };
        let spec = Spec {
            url,
            options: options.clone(),
        };
        let client = build(&spec).map_err(|e| match e {
            Error::InvalidArgument(m) => Error::invalid(format!("replica {name:?}: {m}")),
            other => other,
        });
        let client = client.map_err(|e| redact_error(e, &secrets))?;
        Ok(RemoteStore {
            name,
            prefix,
            spec,
            secrets,
            client: PerProcess::with(client),
        })
    }

    /// This process's client; rebuilt once after a fork.
    fn client(&self) -> Result<Arc<dyn ObjectStore>> {
        self.client
            .get(|_inherited| build(&self.spec).map_err(|e| redact_error(e, &self.secrets)))
            .map(Arc::clone)
    }

    fn path(&self, key: &str) -> Result<ObjectPath> {
        let key = key.trim_start_matches('/');
        if key.is_empty() {
            return Err(Error::invalid(format!(
                "empty key on replica {:?}",
                self.name
            )));
        }
        let full = if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.prefix)
        };
        ObjectPath::parse(&full).map_err(|e| {
            Error::invalid(format!(
                "key {key:?} is not a valid object path on {:?}: {e}",
                self.name
            ))
        })
    }

    fn error(&self, key: &str, e: object_store::Error) -> Error {
        redact_error(map_object_store_error(&self.name, key, e), &self.secrets)
    }

    async fn read(&self, key: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let path = self.path(key)?;
        let client = self.client()?;
        let wanted = buf.len() as u64;
        let end = offset
            .checked_add(wanted)
            .ok_or_else(|| Error::invalid(format!("range end overflows for {key:?}")))?;
        let options = GetOptions {
            range: Some(GetRange::Bounded(offset..end)),
            ..Default::default()
        };
        let result = client.get_opts(&path, options).await.map_err(|e| match e {
            // A 200 with the whole object to a Range request: this server
            // ignores ranges. Its fault, not the caller's: another replica
            // may serve the range (retryable, and counted against it).
            object_store::Error::NotSupported { .. } => Error::Remote(format!(
                "{}: ignored the Range request for bytes {offset}-{} of {key:?} (answered with the whole object)",
                self.name,
                end - 1
            )),
            e => match self.error(key, e) {
                // HTTP 416: the copy ends before `offset`.
                Error::ShortRead { .. } => Error::ShortRead {
                    path: key.into(),
                    offset,
                    wanted_bytes: wanted,
                    got_bytes: 0,
                },
                other => other,
            },
        })?;
        // object_store has checked Content-Range against the ask, except that
        // it clips the ask to the object's size: a clipped range is a short
        // object on this replica.
        if result.range.start != offset || result.range.end > end {
            return Err(Error::ShortRead {
                path: key.into(),
                offset,
                wanted_bytes: wanted,
                got_bytes: result.range.end.saturating_sub(result.range.start),
            });
        }
        // One copy: object_store hands out the body as `Bytes` frames owned
        // by hyper; each frame is copied once into the caller's slot. There
        // is no API to have hyper read into our buffer directly.
        let mut stream = result.into_stream();
        let mut done = 0usize;
        while let Some(piece) = stream.next().await {
            let piece = piece.map_err(|e| self.error(key, e))?;
            let Some(dst) = buf.get_mut(done..done + piece.len()) else {
                return Err(Error::Remote(format!(
                    "{}: server sent more than the {wanted} bytes asked for at offset {offset} of {key:?}",
                    self.name
                )));
            };
            dst.copy_from_slice(&piece);
            done += piece.len();
        }
        if done != buf.len() {
            return Err(Error::ShortRead {
                path: key.into(),
                offset,
                wanted_bytes: wanted,
                got_bytes: done as u64,
            });
        }
        Ok(())
    }

    /// The whole object in one request: `Range: bytes=0-`. The server must
    /// answer 206 with a `Content-Range` of `0-(N-1)/N` (object_store checks
    /// the range against the ask and takes N, the total, from it); the body
    /// must then be exactly N bytes. A plain 200 or another range is an
    /// error (retryable: another replica may answer properly).
    async fn read_whole(&self, key: &str, out: &mut Vec<u8>) -> Result<()> {
        out.clear();
        let path = self.path(key)?;
        let client = self.client()?;
        let options = GetOptions {
            range: Some(GetRange::Offset(0)),
            ..Default::default()
        };
        let result = match client.get_opts(&path, options).await {
            Ok(result) => result,
            // A 200 to the range request: nginx does that for an empty
            // object, range-less servers always. Their full answer is the
            // object; ask for it plainly (its size is Content-Length).
            Err(object_store::Error::NotSupported { .. }) => client
                .get_opts(&path, GetOptions::default())
                .await
                .map_err(|e| self.error(key, e))?,
            Err(e) => {
                return match self.error(key, e) {
                    // 416 for `bytes=0-`: no byte 0, an empty object (or an
                    // unsatisfiable range on a broken server): ask its size.
                    Error::ShortRead { .. } => match self.head_size(key).await? {
                        0 => Ok(()),
                        size => Err(Error::ShortRead {
                            path: key.into(),
                            offset: 0,
                            wanted_bytes: size,
                            got_bytes: 0,
                        }),
                    },
                    other => Err(other),
                };
            }
        };
        let size = result.meta.size;
        if result.range != (0..size) {
            return Err(Error::ShortRead {
                path: key.into(),
                offset: 0,
                wanted_bytes: size,
                got_bytes: result.range.end.saturating_sub(result.range.start),
            });
        }
        let len = usize::try_from(size)
            .map_err(|_| Error::invalid(format!("{key:?} is too large ({size} bytes)")))?;
        // One copy, as in `read`: each hyper frame into `out`, which is
        // sized once from the announced total (no zero-fill, no regrowth).
        out.reserve_exact(len);
        let mut stream = result.into_stream();
        while let Some(piece) = stream.next().await {
            let piece = piece.map_err(|e| self.error(key, e))?;
            if out.len() + piece.len() > len {
                return Err(Error::Remote(format!(
                    "{}: server sent more than the {size} bytes it announced for {key:?}",
                    self.name
                )));
            }
            out.extend_from_slice(&piece);
        }
        if out.len() != len {
            return Err(Error::ShortRead {
                path: key.into(),
                offset: 0,
                wanted_bytes: size,
                got_bytes: out.len() as u64,
            });
        }
        Ok(())
    }

    /// Whether this is a plain HTTP(S) server: no listing, no directories.
    fn is_http(&self) -> bool {
        matches!(self.spec.url.scheme(), "http" | "https")
    }

    async fn list_prefix(&self, prefix: &str) -> Result<Listing> {
        if self.is_http() {
            return Err(Error::Unsupported(format!(
                "replica {:?} cannot list its objects (HTTP has no listing API); pass the object names (a manifest) instead",
                self.name
            )));
        }
        let prefix = prefix.trim_matches('/');
        let full = match (self.prefix.is_empty(), prefix.is_empty()) {
            (true, _) => prefix.to_owned(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}/{prefix}", self.prefix),
        };
        let path = if full.is_empty() {
            None
        } else {
            Some(ObjectPath::parse(&full).map_err(|e| {
                Error::invalid(format!(
                    "prefix {prefix:?} is not a valid object path on {:?}: {e}",
                    self.name
                ))
            })?)
        };
        let client = self.client()?;
        let found = client
            .list_with_delimiter(path.as_ref())
            .await
            .map_err(|e| self.error(prefix, e))?;
        let mut listing = Listing {
            objects: found
                .objects
                .iter()
                .map(|meta| self.object_meta(meta))
                .collect(),
            prefixes: found
                .common_prefixes
                .iter()
                .map(|p| self.relative(p))
                .collect(),
        };
        listing.objects.sort_by(|a, b| a.key.cmp(&b.key));
        listing.prefixes.sort();
        Ok(listing)
    }

    /// `location` as a key relative to the replica root.
    fn relative(&self, location: &ObjectPath) -> String {
        let full = location.as_ref();
        if self.prefix.is_empty() {
            return full.to_owned();
        }
        full.strip_prefix(&self.prefix)
            .and_then(|rest| rest.strip_prefix('/'))
            .unwrap_or(full)
            .to_owned()
    }

    fn object_meta(&self, meta: &object_store::ObjectMeta) -> ObjectMeta {
        let modified = meta.last_modified.timestamp_nanos_opt();
        ObjectMeta {
            modified_unix_ns: modified,
            // Objects are written whole: the last write created this one.
            created_unix_ns: modified,
            version: meta.e_tag.clone().or_else(|| meta.version.clone()),
            ..ObjectMeta::file(&self.relative(&meta.location), meta.size)
        }
    }

    /// An object's metadata (one HEAD); a key that is no object but has
    /// objects under it is a directory, as object stores have none.
    async fn head_info(&self, key: &str) -> Result<ObjectMeta> {
        let key = key.trim_matches('/');
        if key.is_empty() {
            return Ok(ObjectMeta::directory(""));
        }
        let client = self.client()?;
        match client.head(&self.path(key)?).await {
            Ok(meta) => Ok(ObjectMeta {
                key: key.to_owned(),
                ..self.object_meta(&meta)
            }),
            Err(e) => match self.error(key, e) {
                Error::NotFound { .. } if !self.is_http() => {
                    let under = self.list_prefix(key).await?;
                    match under.objects.is_empty() && under.prefixes.is_empty() {
                        true => Err(Error::NotFound { path: key.into() }),
                        false => Ok(ObjectMeta::directory(key)),
                    }
                }
                other => Err(other),
            },
        }
    }

    /// The object's size as a ranged GET of its first byte reports it: the
    /// total in `Content-Range` (object_store puts it in `meta.size`). No
    /// byte 0 (HTTP 416) is an empty object.
    async fn range_total(&self, key: &str) -> Result<u64> {
        let path = self.path(key)?;
        let client = self.client()?;
        let options = GetOptions {
            range: Some(GetRange::Bounded(0..1)),
            ..Default::default()
        };
        match client.get_opts(&path, options).await {
            Ok(result) => {
                let size = result.meta.size;
                // Read the one byte so the connection goes back to the pool.
                result.bytes().await.map_err(|e| self.error(key, e))?;
                Ok(size)
            }
            Err(e) => match self.error(key, e) {
                Error::ShortRead { .. } => Ok(0),
                other => Err(other),
            },
        }
    }

    async fn head_size(&self, key: &str) -> Result<u64> {
        let path = self.path(key)?;
        let client = self.client()?;
        let meta = client.head(&path).await.map_err(|e| self.error(key, e))?;
        Ok(meta.size)
    }
}

impl Store for RemoteStore {
    fn name(&self) -> &str {
        &self.name
    }

    fn waits_on_network(&self) -> bool {
        true
    }

    fn size<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(self.head_size(key))
    }

    fn read_size<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(self.range_total(key))
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Listing>> {
        Box::pin(self.list_prefix(prefix))
    }

    fn info<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ObjectMeta>> {
        Box::pin(self.head_info(key))
    }

    fn read_into<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.read(key, offset, buf))
    }

    fn read_object<'a>(&'a self, key: &'a str, out: &'a mut Vec<u8>) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.read_whole(key, out))
    }
}

/// The HTTP status inside an object_store error, if any. object_store keeps
/// its `RetryError` private, so the status is read from its message ("Server
/// returned non-2xx status code: 500 Internal Server Error").
fn status_of(err: &(dyn std::error::Error + 'static)) -> Option<u16> {
    const MARK: &str = "status code: ";
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        let text = e.to_string();
        if let Some(at) = text.find(MARK) {
            let digits: String = text[at + MARK.len()..].chars().take(3).collect();
            if let Ok(code) = digits.parse() {
                return Some(code);
            }
        }
        cur = e.source();
    }
    None
}

fn http_kind_of(
    err: &(dyn std::error::Error + 'static),
) -> Option<object_store::client::HttpErrorKind> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(h) = e.downcast_ref::<object_store::client::HttpError>() {
            return Some(h.kind());
        }
        cur = e.source();
    }
    None
}

/// Whether the chain ends in a refused or reset connection.
fn refused(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
            );
        }
        cur = e.source();
    }
    false
}

/// The innermost message of an error chain: the part that says what went
/// wrong, without object_store's wrapping.
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = err;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Maps an object_store error on `key` of replica `name` to ours.
pub fn map_object_store_error(name: &str, key: &str, err: object_store::Error) -> Error {
    use object_store::client::HttpErrorKind;
    use object_store::Error as E;
    match err {
        E::NotFound { .. } => Error::NotFound { path: key.into() },
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => {
            Error::PermissionDenied { path: key.into() }
        }
        E::InvalidPath { source } => Error::invalid(format!("bad key {key:?}: {source}")),
        E::NotSupported { source } => {
            Error::invalid(format!("{name}: not supported for {key:?}: {source}"))
        }
        E::NotImplemented => Error::invalid(format!("{name}: not implemented for {key:?}")),
        E::Generic { source, .. } => {
            let source: &(dyn std::error::Error + 'static) = source.as_ref();
            match status_of(source) {
                Some(404) => return Error::NotFound { path: key.into() },
                Some(401 | 403) => return Error::PermissionDenied { path: key.into() },
                // Past the end of this replica's copy: it is shorter than the
                // size we planned with (the object shrank, or this copy is
                // truncated). Retryable: another copy may be whole.
                Some(416) => {
                    return Error::ShortRead {
                        path: key.into(),
                        offset: 0,
                        wanted_bytes: 0,
                        got_bytes: 0,
                    }
                }
                Some(status) => {
                    return Error::Remote(format!("{name}: HTTP {status} for {key:?}"));
                }
                None => {}
            }
            let cause = root_cause(source);
            match http_kind_of(source) {
                Some(HttpErrorKind::Timeout) => Error::Timeout {
                    what: format!("{name}: request for {key:?}: {cause}"),
                    elapsed_ms: 0,
                },
                Some(HttpErrorKind::Connect) => {
                    Error::Remote(format!("{name}: cannot connect for {key:?}: {cause}"))
                }
                _ if refused(source) => {
                    Error::Remote(format!("{name}: cannot connect for {key:?}: {cause}"))
                }
                // Everything else, object_store's Content-Range checks
                // included (the server answered another range than asked).
                _ => Error::Remote(format!("{name}: request for {key:?} failed: {cause}")),
            }
        }
        other => Error::Remote(format!("{name}: {key:?}: {other}")),
    }
}

// ---------------------------------------------------------------------------
// Building clients from fsspec-style options.

fn as_string(key: &str, v: &Value) -> Result<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Number(n) => Ok(n.to_string()),
        _ => Err(Error::invalid(format!(
            "storage option {key:?} must be a string, number or bool"
        ))),
    }
}

/// An endpoint URL that requests can be built on: checked here, since the
/// HTTP client only finds out (with a panic) when the first request is made.
/// The message names the option and the fault, not the URL, which may carry
/// credentials.
fn as_endpoint(key: &str, v: &Value) -> Result<String> {
    let endpoint = as_string(key, v)?;
    let invalid = |why: String| Error::invalid(format!("storage option {key:?} {why}"));
    if let Some((i, c)) = endpoint
        .char_indices()
        .find(|(_, c)| c.is_whitespace() || c.is_control())
    {
        return Err(invalid(format!(
            "is not a valid URL: it holds {c:?} at byte {i}"
        )));
    }
    let url =
        url::Url::parse(&endpoint).map_err(|e| invalid(format!("is not a valid URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(invalid(format!(
            "must be an http:// or https:// URL with a host, got scheme {:?}",
            url.scheme()
        )));
    }
    http::Uri::try_from(endpoint.as_str())
        .map_err(|e| invalid(format!("is not a valid URL: {e}")))?;
    Ok(endpoint)
}

fn as_bool(key: &str, v: &Value) -> Result<bool> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if matches!(s.to_ascii_lowercase().as_str(), "true" | "1" | "yes") => {
            Ok(true)
        }
        Value::String(s) if matches!(s.to_ascii_lowercase().as_str(), "false" | "0" | "no") => {
            Ok(false)
        }
        Value::Number(n) => Ok(n.as_f64() != Some(0.0)),
        _ => Err(Error::invalid(format!(
            "storage option {key:?} must be a bool, got {v}"
        ))),
    }
}

fn as_seconds(key: &str, v: &Value) -> Result<Duration> {
    let secs = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim_end_matches('s').parse().ok(),
        _ => None,
    };
    match secs {
        Some(s) if s.is_finite() && s > 0.0 => Ok(Duration::from_secs_f64(s)),
        _ => Err(Error::invalid(format!(
            "storage option {key:?} must be a positive number of seconds, got {v}"
        ))),
    }
}

/// What the options mean once fsspec's spellings are unified.
#[derive(Default)]
struct Parsed {
    client: ClientOptions,
    retry: RetryConfig,
    endpoint: Option<String>,
    region: Option<String>,
    key_id: Option<String>,
    secret: Option<String>,
    token: Option<String>,
    anonymous: bool,
    /// Backend-specific keys passed through to the builder's `with_config`.
    passthrough: Vec<(String, String)>,
}

fn parse_options(url: &Url, options: &StorageOptions) -> Result<Parsed> {
    let mut p = Parsed {
        client: ClientOptions::new()
            .with_timeout(DEFAULT_TIMEOUT)
            .with_connect_timeout(DEFAULT_CONNECT_TIMEOUT),
        retry: RetryConfig {
            max_retries: 0,
            ..Default::default()
        },
        ..Default::default()
    };
    if url.scheme() == "http" {
        // The scheme itself asks for plain HTTP.
        p.client = p.client.with_allow_http(true).with_http1_only();
    }
    let mut flat: Vec<(String, Value)> = Vec::new();
    for (k, v) in options {
        match (k.as_str(), v) {
            // s3fs/gcsfs put client settings one level down.
            ("client_kwargs" | "config_kwargs", Value::Object(inner)) => {
                flat.extend(inner.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            _ => flat.push((k.clone(), v.clone())),
        }
    }
    for (k, v) in flat {
        match k.as_str() {
            "endpoint" | "endpoint_url" | "aws_endpoint" | "aws_endpoint_url" => {
                p.endpoint = Some(as_endpoint(&k, &v)?)
            }
            "region" | "region_name" | "aws_region" => p.region = Some(as_string(&k, &v)?),
            "key" | "access_key" | "access_key_id" | "aws_access_key_id" => {
                p.key_id = Some(as_string(&k, &v)?)
            }
            "secret"
            | "secret_key"
            | "secret_access_key"
            | "aws_secret_access_key"
            | "account_key" => p.secret = Some(as_string(&k, &v)?),
            "token" | "session_token" | "aws_session_token" => {
                let t = as_string(&k, &v)?;
                // gcsfs spells anonymous access token="anon".
                if t == "anon" {
                    p.anonymous = true;
                } else {
                    p.token = Some(t)
                }
            }
            "anon" | "anonymous" | "skip_signature" => p.anonymous = as_bool(&k, &v)?,
            "verify" | "ssl_verify" => {
                p.client = p.client.with_allow_invalid_certificates(!as_bool(&k, &v)?)
            }
            "allow_invalid_certificates" => {
                p.client = p.client.with_allow_invalid_certificates(as_bool(&k, &v)?)
            }
            "use_ssl" => p.client = p.client.with_allow_http(!as_bool(&k, &v)?),
            "allow_http" => p.client = p.client.with_allow_http(as_bool(&k, &v)?),
            "timeout" | "read_timeout" => p.client = p.client.with_timeout(as_seconds(&k, &v)?),
            "connect_timeout" => p.client = p.client.with_connect_timeout(as_seconds(&k, &v)?),
            "max_retries" => {
                p.retry.max_retries = v.as_u64().ok_or_else(|| {
                    Error::invalid(format!(
                        "storage option \"max_retries\" must be a non-negative int, got {v}"
                    ))
                })? as usize
            }
            "headers" => {
                let Value::Object(map) = &v else {
                    return Err(Error::invalid(
                        "storage option \"headers\" must be a dict of strings",
                    ));
                };
                let mut headers = object_store::HeaderMap::new();
                for (hk, hv) in map {
                    let name = http_header_name(hk)?;
                    let mut value = object_store::HeaderValue::from_str(&as_string(hk, hv)?)
                        .map_err(|_| {
                            Error::invalid(format!("header {hk:?} has an invalid value"))
                        })?;
                    value.set_sensitive(is_secret_key(hk));
                    headers.insert(name, value);
                }
                p.client = p.client.with_default_headers(headers);
            }
            _ => {
                // A setting object_store knows by its own name
                // (`pool_idle_timeout`, `aws_virtual_hosted_style_request`...).
                if let Ok(key) = k.parse::<ClientConfigKey>() {
                    p.client = p.client.with_config(key, as_string(&k, &v)?);
                } else {
                    p.passthrough.push((k.clone(), as_string(&k, &v)?));
                }
            }
        }
    }
    Ok(p)
}

fn http_header_name(name: &str) -> Result<http::HeaderName> {
    name.parse()
        .map_err(|_| Error::invalid(format!("invalid HTTP header name {name:?}")))
}

fn unknown_option(scheme: &str, key: &str) -> Error {
    Error::invalid(format!(
        "unknown storage option {key:?} for {scheme}:// (fsspec spellings like key/secret/token/endpoint_url/region/anon/client_kwargs, or object_store's own keys)"
    ))
}

fn build(spec: &Spec) -> Result<Arc<dyn ObjectStore>> {
    let url = &spec.url;
    let p = parse_options(url, &spec.options)?;
    let scheme = url.scheme();
    let built: std::result::Result<Arc<dyn ObjectStore>, object_store::Error> = match scheme {
        "http" | "https" => {
            if let Some((k, _)) = p.passthrough.first() {
                return Err(unknown_option(scheme, k));
            }
            let mut root = url.clone();
            // Credentials travel in headers (storage_options["headers"]),
            // not in the URL; reqwest would otherwise log the URL with them.
            let _ = root.set_username("");
            let _ = root.set_password(None);
            HttpBuilder::new()
                .with_url(root.to_string())
                .with_client_options(p.client)
                .with_retry(p.retry)
                .build()
                .map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
        }
        "s3" | "s3a" => {
            let mut b = AmazonS3Builder::from_env()
                .with_bucket_name(url.host_str().unwrap_or_default())
                .with_client_options(p.client)
                .with_retry(p.retry)
                .with_skip_signature(p.anonymous);
            if let Some(e) = p.endpoint {
                if e.starts_with("http://") {
                    b = b.with_allow_http(true);
                }
                b = b.with_endpoint(e);
            }
            if let Some(r) = p.region {
                b = b.with_region(r);
            }
            if let Some(k) = p.key_id {
                b = b.with_access_key_id(k);
            }
            if let Some(s) = p.secret {
                b = b.with_secret_access_key(s);
            }
            if let Some(t) = p.token {
                b = b.with_token(t);
            }
            for (k, v) in &p.passthrough {
                let key: AmazonS3ConfigKey = k.parse().map_err(|_| unknown_option(scheme, k))?;
                b = b.with_config(key, v);
            }
            b.build().map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
        }
        "gs" | "gcs" => {
            let mut b = GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(url.host_str().unwrap_or_default())
                .with_client_options(p.client)
                .with_retry(p.retry);
            if p.anonymous {
                b = b.with_config(GoogleConfigKey::SkipSignature, "true");
            }
            if let Some(t) = p.token {
                // gcsfs: token is a path to a service-account JSON file.
                b = b.with_service_account_path(t);
            }
            if p.endpoint.is_some() || p.region.is_some() || p.key_id.is_some() {
                return Err(Error::invalid(
                    "gs:// takes token (service-account file), anon, or google_* keys",
                ));
            }
            for (k, v) in &p.passthrough {
                let key: GoogleConfigKey = k.parse().map_err(|_| unknown_option(scheme, k))?;
                b = b.with_config(key, v);
            }
            b.build().map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
        }
        _ => {
            // az://container/path, azure://..., abfs[s]://container@account...
            let mut b = MicrosoftAzureBuilder::from_env()
                .with_client_options(p.client)
                .with_retry(p.retry)
                .with_skip_signature(p.anonymous);
            b = if matches!(scheme, "az" | "azure") {
                b.with_container_name(url.host_str().unwrap_or_default())
            } else {
                b.with_url(url.to_string())
            };
            if let Some(s) = p.secret {
                b = b.with_access_key(s);
            }
            if let Some(t) = p.token {
                b = b.with_config(AzureConfigKey::Token, t);
            }
            if let Some(e) = p.endpoint {
                b = b.with_endpoint(e);
            }
            if p.key_id.is_some() || p.region.is_some() {
                return Err(Error::invalid(
                    "az:// takes account_name, account_key, sas_token, anon, or azure_* keys",
                ));
            }
            for (k, v) in &p.passthrough {
                let key: AzureConfigKey = k.parse().map_err(|_| unknown_option(scheme, k))?;
                b = b.with_config(key, v);
            }
            b.build().map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
        }
    };
    built.map_err(|e| Error::invalid(format!("cannot configure {}: {e}", display_url(url))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(json: &str) -> StorageOptions {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn listed_keys_are_relative_to_the_replica_root() {
        let store = RemoteStore::open("s3://b/data", &opts(r#"{"anon": true}"#)).unwrap();
        let key = |p: &str| store.relative(&ObjectPath::from(p));
        assert_eq!(key("data/x/y.bin"), "x/y.bin");
        // A sibling whose name starts with the prefix is not inside it.
        assert_eq!(key("database/x"), "database/x");
        let root = RemoteStore::open("s3://b", &opts(r#"{"anon": true}"#)).unwrap();
        assert_eq!(root.relative(&ObjectPath::from("x/y")), "x/y");
    }

    #[test]
    fn secrets_never_appear_in_name_debug_or_errors() {
        let o = opts(
            r#"{"key": "AKIAEXAMPLEKEY", "secret": "s3cr3t-value", "endpoint_url": "http://127.0.0.1:1", "region": "us-east-1"}"#,
        );
        let store = RemoteStore::open("s3://bucket/prefix", &o).unwrap();
        let shown = format!("{} {:?}", store.name(), store);
        assert!(
            !shown.contains("s3cr3t-value") && !shown.contains("AKIAEXAMPLEKEY"),
            "{shown}"
        );
        let mut buf = [0u8; 4];
        let err = crate::runtime::block_on(store.read_into("k", 0, &mut buf)).unwrap_err();
        let text = format!("{err} {err:?}");
        assert!(!text.contains("s3cr3t-value"), "{text}");
        assert!(err.is_retryable(), "{err}");

        let store =
            RemoteStore::open("http://user:hunter2pw@127.0.0.1:1/data?sig=abcdef", &o).unwrap();
        assert_eq!(store.name(), "http://127.0.0.1:1/data");
        let err = crate::runtime::block_on(store.size("k")).unwrap_err();
        assert!(!format!("{err} {err:?} {store:?}").contains("hunter2pw"));
    }

    #[test]
    fn bad_urls_and_options_name_the_value() {
        let none = StorageOptions::new();
        let e = RemoteStore::open("http://", &none).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        let e = RemoteStore::open("ftp2://host/x", &none).unwrap_err();
        assert!(e.to_string().contains("ftp2"), "{e}");
        let e = RemoteStore::open("http://h:1/", &opts(r#"{"bogus_opt": 1}"#)).unwrap_err();
        assert!(e.to_string().contains("bogus_opt"), "{e}");
        let e = RemoteStore::open("s3://b/", &opts(r#"{"timeout": -1}"#)).unwrap_err();
        assert!(e.to_string().contains("timeout"), "{e}");
        let e = RemoteStore::open("http://pw:zzsecretzz@[::1", &opts("{}")).unwrap_err();
        assert!(!e.to_string().contains("zzsecretzz"), "{e}");
    }

    #[test]
    fn an_endpoint_requests_cannot_be_built_on_is_refused_at_open() {
        for (endpoint, why) in [
            ("http://local host:9000", "' ' at byte 12"),
            ("http://h:9000/a\tb", "'\\t' at byte 15"),
            ("ftp://h", "scheme \"ftp\""),
            ("not a url", "' '"),
            ("http://u:zzsecretzz@[::1", "not a valid URL"),
        ] {
            let json = serde_json::json!({ "endpoint_url": endpoint, "anon": true }).to_string();
            let e = RemoteStore::open("s3://b/", &opts(&json)).unwrap_err();
            let text = e.to_string();
            assert!(matches!(e, Error::InvalidArgument(_)), "{text}");
            assert!(
                text.contains("\"endpoint_url\"") && text.contains(why),
                "{text}"
            );
            assert!(!text.contains("zzsecretzz"), "{text}");
        }
    }

    #[test]
    fn cloud_schemes_build_with_fsspec_options() {
        let s3 = opts(
            r#"{"anon": true, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "eu-west-1"}}"#,
        );
        let store = RemoteStore::open("s3://bucket/a/b", &s3).unwrap();
        assert_eq!(store.prefix, "a/b");
        assert_eq!(store.path("c").unwrap().as_ref(), "a/b/c");
        RemoteStore::open("gs://bucket/x", &opts(r#"{"token": "anon"}"#)).unwrap();
        RemoteStore::open(
            "az://container/x",
            &opts(r#"{"account_name": "acct", "anon": true}"#),
        )
        .unwrap();
    }

    #[test]
    fn refused_connection_is_retryable_remote_error() {
        // Port 1 on loopback: nothing listens there.
        let store = RemoteStore::open("http://127.0.0.1:1", &StorageOptions::new()).unwrap();
        let mut buf = [0u8; 8];
        let err = crate::runtime::block_on(store.read_into("x", 0, &mut buf)).unwrap_err();
        assert!(matches!(err, Error::Remote(_)), "{err:?}");
        assert!(err.is_retryable());
    }

    #[test]
    fn http_says_it_cannot_list_and_its_root_is_a_directory() {
        // Neither needs a request: nothing listens on port 1.
        let store = RemoteStore::open("http://127.0.0.1:1/data", &StorageOptions::new()).unwrap();
        let err = crate::runtime::block_on(store.list("sub")).unwrap_err();
        assert!(matches!(err, Error::Unsupported(_)), "{err:?}");
        assert!(err.to_string().contains("HTTP has no listing API"), "{err}");
        assert!(!err.is_retryable());
        let root = crate::runtime::block_on(store.info("/")).unwrap();
        assert_eq!(root, ObjectMeta::directory(""));
        let err = crate::runtime::block_on(store.info("x")).unwrap_err();
        assert!(matches!(err, Error::Remote(_)), "{err:?}");
    }
}
