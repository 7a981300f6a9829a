//! Remote object stores: S3-compatible buckets and Azure Blob containers behind one type.
//!
//! [`RemoteStore::connect`] builds the client for a [`StoreLocation::S3`] or
//! [`StoreLocation::Azure`] without touching the network; every later call is one store operation
//! (or, for a large file, one multipart upload). Keys are always relative to the location's
//! prefix. Errors ([`StorageError`]) name the operation and the object, and never carry
//! credentials: messages from the SDKs go through [`sanitize`] first.
//!
//! Which environment variables and options each backend reads is documented at the top of its
//! module (`remote/s3.rs`, `remote/azure.rs`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::sink::StoreLocation;

mod azure;
mod s3;

/// Files larger than this go up as multipart uploads; it is also the size of each part (S3 may
/// use bigger parts for files over 10,000 parts).
pub const MULTIPART_PART_SIZE: u64 = 8 * 1024 * 1024;

/// Time allowed to open a TCP (and TLS) connection to a store.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Default per-request timeout of store calls.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Options for reaching remote stores (from flags / env).
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// S3 endpoint URL for S3-compatible stores (else `AWS_ENDPOINT_URL_S3` /
    /// `AWS_ENDPOINT_URL` env, else AWS).
    pub s3_endpoint: Option<String>,
    /// Region (else `AWS_REGION` / `AWS_DEFAULT_REGION` / profile, else `us-east-1`).
    pub s3_region: Option<String>,
    /// Path-style addressing (bucket in the path). The caller sets it true when an endpoint is
    /// given.
    pub s3_force_path_style: bool,
    /// Azure Blob endpoint including the account, e.g.
    /// `http://127.0.0.1:10000/devstoreaccount1` for Azurite (else from `AZURE_STORAGE_*` env /
    /// the account name).
    pub azure_endpoint: Option<String>,
    /// Per-request timeout for store calls.
    pub request_timeout: Duration,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        Self {
            s3_endpoint: None,
            s3_region: None,
            s3_force_path_style: false,
            azure_endpoint: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectEntry {
    /// The key, relative to the store prefix.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
}

/// A failed store operation. Messages are sanitized: no credentials, SAS tokens, signatures or
/// signed URLs.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The location is not a remote store (stdout or a local directory).
    #[error("connect {location}: not a remote store (expected s3://BUCKET[/PREFIX] or az://CONTAINER[/PREFIX])")]
    NotRemote {
        /// The location, as its URL.
        location: String,
    },
    /// The client could not be configured (missing account, invalid endpoint, ...).
    #[error("connect {store}: {message}")]
    Configuration {
        /// The store, as its URL.
        store: String,
        /// What is wrong (sanitized).
        message: String,
    },
    /// The object does not exist.
    #[error("{operation} {store}{key}: not found")]
    NotFound {
        /// `get`, `head`, ...
        operation: &'static str,
        /// The store, as its URL (ending in `/` when it has a prefix).
        store: String,
        /// The key, relative to the store prefix.
        key: String,
    },
    /// The store answered with an error, could not be reached, or did not answer in time.
    #[error("{operation} {store}{key}: {message}")]
    Request {
        /// `put`, `get`, `head`, `list` or `delete`.
        operation: &'static str,
        /// The store, as its URL.
        store: String,
        /// The key (or listed prefix), relative to the store prefix.
        key: String,
        /// What happened (sanitized).
        message: String,
    },
    /// Reading the file to upload, or writing the downloaded one, failed.
    #[error("{operation} {store}{key}: local file {path}: {source}")]
    LocalFile {
        /// `put` or `get`.
        operation: &'static str,
        /// The store, as its URL.
        store: String,
        /// The key, relative to the store prefix.
        key: String,
        /// The local file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl StorageError {
    /// Whether the object does not exist. A missing bucket or container is not "not found"
    /// (except for `content_type`, whose HEAD answer cannot tell them apart).
    pub fn is_not_found(&self) -> bool {
        matches!(self, StorageError::NotFound { .. })
    }

    /// The operation that failed: `connect`, `put`, `get`, `head`, `list` or `delete`.
    pub fn operation(&self) -> &'static str {
        match self {
            StorageError::NotRemote { .. } | StorageError::Configuration { .. } => "connect",
            StorageError::NotFound { operation, .. }
            | StorageError::Request { operation, .. }
            | StorageError::LocalFile { operation, .. } => operation,
        }
    }

    /// The key involved, relative to the store prefix (empty for `connect`).
    pub fn key(&self) -> &str {
        match self {
            StorageError::NotRemote { .. } | StorageError::Configuration { .. } => "",
            StorageError::NotFound { key, .. }
            | StorageError::Request { key, .. }
            | StorageError::LocalFile { key, .. } => key,
        }
    }
}

/// What every backend error is built from: the store's URL, to name objects in messages.
#[derive(Debug, Clone)]
struct ErrorContext {
    store: String,
}

impl ErrorContext {
    fn configuration(&self, message: impl std::fmt::Display) -> StorageError {
        StorageError::Configuration {
            store: self.store.clone(),
            message: sanitize(&message.to_string()),
        }
    }

    fn not_found(&self, operation: &'static str, key: &str) -> StorageError {
        StorageError::NotFound {
            operation,
            store: self.store.clone(),
            key: key.to_owned(),
        }
    }

    fn request(
        &self,
        operation: &'static str,
        key: &str,
        message: impl std::fmt::Display,
    ) -> StorageError {
        StorageError::Request {
            operation,
            store: self.store.clone(),
            key: key.to_owned(),
            message: sanitize(&message.to_string()),
        }
    }

    fn local_file(
        &self,
        operation: &'static str,
        key: &str,
        path: &Path,
        source: std::io::Error,
    ) -> StorageError {
        StorageError::LocalFile {
            operation,
            store: self.store.clone(),
            key: key.to_owned(),
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A connected S3-compatible bucket or Azure Blob container, with its key prefix. Cheap to
/// clone.
#[derive(Debug, Clone)]
pub struct RemoteStore {
    backend: Arc<Backend>,
}

#[derive(Debug)]
enum Backend {
    S3(s3::S3Store),
    Azure(azure::AzureStore),
}

impl RemoteStore {
    /// Builds the client for an S3 or Azure location (Err for Stdout/Directory). Does not need
    /// the network: credentials are resolved on the first request.
    pub async fn connect(
        location: &StoreLocation,
        options: &RemoteOptions,
    ) -> Result<Self, StorageError> {
        let context = ErrorContext {
            store: location.url(),
        };
        let backend = match location {
            StoreLocation::S3 { bucket, prefix } => {
                Backend::S3(s3::S3Store::connect(bucket, prefix, options, context).await?)
            }
            StoreLocation::Azure { container, prefix } => Backend::Azure(
                azure::AzureStore::connect(container, prefix, options, context)?,
            ),
            StoreLocation::Stdout | StoreLocation::Directory(_) => {
                return Err(StorageError::NotRemote {
                    location: location.url(),
                })
            }
        };
        Ok(Self {
            backend: Arc::new(backend),
        })
    }

    /// Uploads the local file at `path` as object `key` (relative to the prefix), with
    /// `content_type` when given. Streams from the file: files over [`MULTIPART_PART_SIZE`] go
    /// up as multipart uploads, part by part (at most two parts in flight), and a failed
    /// multipart upload is aborted. Uploading the same key again replaces the object. Returns
    /// the bytes uploaded.
    pub async fn put_file(
        &self,
        key: &str,
        path: &Path,
        content_type: Option<&str>,
    ) -> Result<u64, StorageError> {
        match &*self.backend {
            Backend::S3(store) => store.put_file(key, path, content_type).await,
            Backend::Azure(store) => store.put_file(key, path, content_type).await,
        }
    }

    /// Uploads `bytes` as object `key` in one request, with `content_type` when given.
    pub async fn put_bytes(
        &self,
        key: &str,
        bytes: Bytes,
        content_type: Option<&str>,
    ) -> Result<(), StorageError> {
        match &*self.backend {
            Backend::S3(store) => store.put_bytes(key, bytes, content_type).await,
            Backend::Azure(store) => store.put_bytes(key, bytes, content_type).await,
        }
    }

    /// The whole object, in memory.
    pub async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        match &*self.backend {
            Backend::S3(store) => store.get(key).await,
            Backend::Azure(store) => store.get(key).await,
        }
    }

    /// Streams an object into a local file (created or truncated); returns bytes written.
    pub async fn download_to(&self, key: &str, path: &Path) -> Result<u64, StorageError> {
        match &*self.backend {
            Backend::S3(store) => store.download_to(key, path).await,
            Backend::Azure(store) => store.download_to(key, path).await,
        }
    }

    /// All objects whose key starts with `prefix` (relative to the store prefix; a plain string
    /// prefix, not only whole path segments), paginated fully, keys relative to the store
    /// prefix.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectEntry>, StorageError> {
        match &*self.backend {
            Backend::S3(store) => store.list(prefix).await,
            Backend::Azure(store) => store.list(prefix).await,
        }
    }

    /// Deletes an object. Deleting an object that does not exist succeeds.
    pub async fn delete(&self, key: &str) -> Result<(), StorageError> {
        match &*self.backend {
            Backend::S3(store) => store.delete(key).await,
            Backend::Azure(store) => store.delete(key).await,
        }
    }

    /// The object's content type as stored (`None` when the store has none for it).
    pub async fn content_type(&self, key: &str) -> Result<Option<String>, StorageError> {
        match &*self.backend {
            Backend::S3(store) => store.content_type(key).await,
            Backend::Azure(store) => store.content_type(key).await,
        }
    }

    /// The sink label: `s3` or `azure`.
    pub fn sink_label(&self) -> &'static str {
        match &*self.backend {
            Backend::S3(_) => "s3",
            Backend::Azure(_) => "azure",
        }
    }
}

/// An error and its sources, joined with `: `, skipping a source whose text its parent already
/// shows.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !cause_text.is_empty() && !text.contains(&cause_text) {
            let _ = write!(text, ": {cause_text}");
        }
        source = cause.source();
    }
    text
}

/// How far a secret value reaches after its marker.
#[derive(Clone, Copy)]
enum SecretExtent {
    /// A query-string or `name=value` value: up to `&`, `,`, `;`, whitespace, a quote or a
    /// bracket.
    Value,
    /// A header value: up to the end of the line or a quote.
    Line,
}

/// Markers (lower case) after which a secret follows.
const SECRET_MARKERS: &[(&str, SecretExtent)] = &[
    ("authorization:", SecretExtent::Line),
    ("authorization=", SecretExtent::Value),
    ("x-amz-security-token:", SecretExtent::Line),
    ("x-amz-signature=", SecretExtent::Value),
    ("x-amz-credential=", SecretExtent::Value),
    ("x-amz-security-token=", SecretExtent::Value),
    ("signature=", SecretExtent::Value),
    ("credential=", SecretExtent::Value),
    ("sig=", SecretExtent::Value),
    ("accountkey=", SecretExtent::Value),
    ("sharedaccesssignature=", SecretExtent::Value),
    ("sharedkey ", SecretExtent::Value),
    ("bearer ", SecretExtent::Value),
];

/// Replaces signatures, SAS tokens, credentials, authorization values and the user
/// information of URLs (`https://user:password@host`) in `text` with `[redacted]`.
pub fn sanitize(text: &str) -> String {
    let text = crate::secret::redact_url_credentials(text);
    let text = text.as_str();
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut position = 0;
    while position < text.len() {
        let next = SECRET_MARKERS
            .iter()
            .filter_map(|(marker, extent)| {
                lower[position..]
                    .find(marker)
                    .map(|found| (position + found, marker.len(), *extent))
            })
            .min_by_key(|(start, length, _)| (*start, usize::MAX - length));
        let Some((start, marker_length, extent)) = next else {
            out.push_str(&text[position..]);
            break;
        };
        let value_start = start + marker_length;
        out.push_str(&text[position..value_start]);
        let rest = &text[value_start..];
        let value_length = match extent {
            SecretExtent::Value => rest
                .find(|character: char| {
                    character.is_whitespace()
                        || matches!(
                            character,
                            '&' | ',' | ';' | '"' | '\'' | '<' | '>' | '(' | ')' | '[' | ']'
                        )
                })
                .unwrap_or(rest.len()),
            SecretExtent::Line => rest.find(['\n', '\r', '"', '\'']).unwrap_or(rest.len()),
        };
        if value_length > 0 {
            out.push_str("[redacted]");
        }
        position = value_start + value_length;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_removes_sas_signatures_and_authorization() {
        let text =
            "GET https://account.blob.core.windows.net/c/k?sv=2021&sig=abc%2Fdef&se=1 failed";
        assert_eq!(
            sanitize(text),
            "GET https://account.blob.core.windows.net/c/k?sv=2021&sig=[redacted]&se=1 failed"
        );
        let text = "url ?X-Amz-Credential=AKIA%2F20240101&X-Amz-Signature=0123abcd&x=1";
        let cleaned = sanitize(text);
        assert!(!cleaned.contains("AKIA"), "{cleaned}");
        assert!(!cleaned.contains("0123abcd"), "{cleaned}");
        assert!(cleaned.ends_with("&x=1"), "{cleaned}");
        let text = "headers: Authorization: AWS4-HMAC-SHA256 Credential=AKIA/x, Signature=ff\nnext";
        assert_eq!(sanitize(text), "headers: Authorization:[redacted]\nnext");
        let text = "SharedKey devstoreaccount1:c2VjcmV0 rejected";
        assert_eq!(sanitize(text), "SharedKey [redacted] rejected");
        let text = "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=c2VjcmV0==;";
        assert_eq!(
            sanitize(text),
            "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=[redacted];"
        );
        let text = "dispatch failure: http://AKIAEXAMPLE:wJalrXUtnFEMI@minio:9000/bucket/k refused";
        assert_eq!(
            sanitize(text),
            "dispatch failure: http://[redacted]@minio:9000/bucket/k refused"
        );
    }

    #[test]
    fn sanitize_keeps_ordinary_text() {
        let text = "put s3://bucket/traces/a.jsonl: dispatch failure: io error: Connection refused";
        assert_eq!(sanitize(text), text);
        assert_eq!(sanitize(""), "");
        assert_eq!(sanitize("ünïcode sig"), "ünïcode sig");
    }

    #[tokio::test]
    async fn connect_refuses_local_locations() {
        let options = RemoteOptions::default();
        assert_eq!(options.request_timeout, DEFAULT_REQUEST_TIMEOUT);
        for location in [
            StoreLocation::Stdout,
            StoreLocation::Directory(PathBuf::from("/tmp/x")),
        ] {
            let error = RemoteStore::connect(&location, &options)
                .await
                .expect_err("local locations are not remote stores");
            assert_eq!(error.operation(), "connect");
            assert!(matches!(error, StorageError::NotRemote { .. }), "{error}");
        }
    }

    #[tokio::test]
    async fn connect_builds_clients_without_the_network() {
        let options = RemoteOptions {
            s3_endpoint: Some("http://127.0.0.1:9".into()),
            s3_region: Some("eu-west-1".into()),
            s3_force_path_style: true,
            azure_endpoint: Some("http://127.0.0.1:9/devstoreaccount1".into()),
            request_timeout: Duration::from_secs(1),
        };
        let location = StoreLocation::S3 {
            bucket: "bucket".into(),
            prefix: "p/".into(),
        };
        let store = RemoteStore::connect(&location, &options)
            .await
            .expect("an S3 client builds offline");
        assert_eq!(store.sink_label(), "s3");
    }

    #[test]
    fn error_display_names_operation_and_object() {
        let context = ErrorContext {
            store: "s3://bucket/prefix/".into(),
        };
        let error = context.request("put", "traces/a.jsonl", "boom ?sig=secret");
        assert_eq!(
            error.to_string(),
            "put s3://bucket/prefix/traces/a.jsonl: boom ?sig=[redacted]"
        );
        assert_eq!(error.key(), "traces/a.jsonl");
        assert!(!error.is_not_found());
        assert!(context.not_found("get", "k").is_not_found());
    }
}
