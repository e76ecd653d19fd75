//! Credentials and names for remote replicas: collecting the secret values
//! in `storage_options` and URLs, and redacting them from every name, error
//! and `Debug`. No network code here (it builds in the loom configuration,
//! where `remote` does not).

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;
use url::Url;

use crate::error::Error;

/// fsspec-style storage options, as given by Python (a JSON object).
pub type StorageOptions = BTreeMap<String, Value>;

/// `options` as a JSON object (for handing them to Python's fsspec).
pub fn options_json(options: &StorageOptions) -> String {
    serde_json::to_string(options).unwrap_or_else(|_| "{}".into())
}

/// Values that must never appear in a name, `Debug` or error message.
#[derive(Clone, Default)]
pub struct Secrets(Vec<String>);

impl Secrets {
    fn add(&mut self, value: &str) {
        // Very short values would redact innocent text ("1", "a").
        if value.len() >= 3 && !self.0.iter().any(|s| s == value) {
            self.0.push(value.to_owned());
            // Longest first, so a secret containing another is fully hidden.
            self.0.sort_by_key(|s| std::cmp::Reverse(s.len()));
        }
    }

    /// `text` with every secret replaced by `***`.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for s in &self.0 {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "***");
            }
        }
        out
    }
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secrets({} redacted)", self.0.len())
    }
}

/// Option keys whose values are credentials, in every spelling we accept.
const SECRET_KEYS: &[&str] = &[
    "key",
    "secret",
    "token",
    "password",
    "access_key",
    "access_key_id",
    "aws_access_key_id",
    "secret_key",
    "secret_access_key",
    "aws_secret_access_key",
    "session_token",
    "aws_session_token",
    "account_key",
    "azure_storage_account_key",
    "sas_token",
    "azure_storage_sas_token",
    "client_secret",
    "azure_client_secret",
    "service_account_key",
    "google_service_account_key",
    "bearer_token",
    "azure_storage_token",
];

/// Whether an option (or header) named `key` carries a credential.
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    SECRET_KEYS.contains(&k.as_str())
        || k.contains("secret")
        || k.contains("password")
        || k.contains("token")
        || k == "authorization"
}

/// Collects every credential in `options` (also nested, e.g. `client_kwargs`,
/// `headers`) and in the URL's userinfo.
pub fn collect_secrets(url: Option<&Url>, options: &StorageOptions) -> Secrets {
    fn walk(secrets: &mut Secrets, key: &str, value: &Value) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    walk(secrets, k, v);
                }
            }
            Value::String(s) if is_secret_key(key) => secrets.add(s),
            _ => {}
        }
    }
    let mut secrets = Secrets::default();
    for (k, v) in options {
        walk(&mut secrets, k, v);
    }
    if let Some(url) = url {
        if let Some(p) = url.password() {
            secrets.add(p);
        }
        if !url.username().is_empty() {
            secrets.add(url.username());
        }
        // Presigned or SAS URLs carry credentials in the query string.
        if let Some(q) = url.query() {
            for (_, v) in url::form_urlencoded::parse(q.as_bytes()) {
                secrets.add(&v);
            }
        }
    }
    secrets
}

/// `url` as shown to users: no userinfo, no query string.
pub fn display_url(url: &Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_query(None);
    shown.set_fragment(None);
    shown.to_string().trim_end_matches('/').to_owned()
}

/// A replica root as shown to users: a URL without credentials or query,
/// a local path as it is.
pub fn display_root(root: &str) -> String {
    match Url::parse(root) {
        Ok(u) if root.contains("://") => display_url(&u),
        _ => strip_userinfo(root),
    }
}

/// The URL schemes served natively.
pub fn is_native_scheme(scheme: &str) -> bool {
    matches!(
        scheme,
        "http" | "https" | "s3" | "s3a" | "gs" | "gcs" | "az" | "azure" | "abfs" | "abfss"
    )
}

/// Option keys with credential values shown as `***`.
pub fn redacted_options(options: &StorageOptions) -> BTreeMap<String, String> {
    fn show(key: &str, v: &Value) -> String {
        match v {
            Value::Object(map) => {
                let inner: Vec<String> = map
                    .iter()
                    .map(|(k, v)| format!("{k:?}: {}", show(k, v)))
                    .collect();
                format!("{{{}}}", inner.join(", "))
            }
            _ if is_secret_key(key) => "***".into(),
            other => other.to_string(),
        }
    }
    options
        .iter()
        .map(|(k, v)| (k.clone(), show(k, v)))
        .collect()
}

/// Rewrites every message inside `err` through `secrets`.
pub fn redact_error(err: Error, secrets: &Secrets) -> Error {
    match err {
        Error::InvalidArgument(m) => Error::InvalidArgument(secrets.redact(&m)),
        Error::Remote(m) => Error::Remote(secrets.redact(&m)),
        Error::Timeout { what, elapsed_ms } => Error::Timeout {
            what: secrets.redact(&what),
            elapsed_ms,
        },
        Error::Io { context, source } => Error::Io {
            context: secrets.redact(&context),
            source: std::io::Error::new(source.kind(), secrets.redact(&source.to_string())),
        },
        other => other,
    }
}

/// `root` without `user:password@` (best effort, for strings that are not URLs).
pub fn strip_userinfo(root: &str) -> String {
    // Best effort for strings that do not even parse as URLs.
    match (root.find("://"), root.find('@')) {
        (Some(s), Some(at)) if at > s => format!("{}{}", &root[..s + 3], &root[at + 1..]),
        _ => root.to_owned(),
    }
}
