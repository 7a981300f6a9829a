//! Command-line flags, their `SCORETAP_*` environment variables, and the optional TOML file,
//! merged into the settings the core library runs with.
//!
//! Precedence: a flag (or its environment variable) over the file's key of the same name over the
//! built-in default. Every bad value is reported naming the flag or key and what it expects.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use http::Uri;
use ipnet::IpNet;
use scoretap_core::access_log::AccessLogFormat;
use scoretap_core::capture::{
    CaptureSelection, CaptureSettings, ContentTypePattern, PathPattern, StorageSettings,
};
use scoretap_core::headers::{ForwardedMode, ForwardingPolicy};
use scoretap_core::modeldata::ModeldataColumns;
use scoretap_core::proxy::{ProxySettings, DEFAULT_MAX_HEADERS, DEFAULT_MAX_REQUEST_BODY_BYTES};
use scoretap_core::redaction::Redaction;
use scoretap_core::secret::Secret;
use scoretap_core::server::{Limits, MINIMUM_HEADER_BYTES};
use scoretap_core::sink::StoreLocation;
use scoretap_core::storage::batch::BatchSettings;
use scoretap_core::storage::key::{KeyField, KeyTemplate};
use scoretap_core::storage::modeldata::ModeldataSettings;
use scoretap_core::storage::remote::{sanitize, RemoteOptions};
use scoretap_core::storage::uploader::UploaderSettings;
use scoretap_core::tls::ServerCertificateFiles;
use scoretap_core::upstream::{
    UpstreamProtocol, UpstreamSettings, DEFAULT_BODY_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS as DEFAULT_UPSTREAM_MAX_CONNECTIONS,
};
use scoretap_core::ServerSettings;
use serde::{Deserialize, Serialize};

/// A configuration problem; the process exits with status 2.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot read the config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
}

/// `scoretap run`'s flags.
#[derive(Debug, Clone, Default, Args)]
pub struct RunArgs {
    /// Address the proxy listens on (HTTP/1.1 and HTTP/2 on one port) [default: 127.0.0.1:8080]
    #[arg(long, env = "SCORETAP_LISTEN", value_name = "ADDR", value_parser = parse_address)]
    pub listen: Option<SocketAddr>,
    /// Base URL of the scoring endpoint, http:// or https://; a path in it prefixes every request
    #[arg(long, env = "SCORETAP_UPSTREAM", value_name = "URL", value_parser = parse_upstream_url)]
    pub upstream: Option<Uri>,
    /// Address of the admin listener: /healthz, /readyz, /metrics, /traces, /capture [default: 127.0.0.1:9901]
    #[arg(long, env = "SCORETAP_ADMIN_LISTEN", value_name = "ADDR", value_parser = parse_address)]
    pub admin_listen: Option<SocketAddr>,
    /// Allow --admin-listen on an address other than loopback, e.g. 0.0.0.0:9901 in a pod for probes and scraping (the admin switches capture and serves records) [default: false]
    #[arg(long, env = "SCORETAP_ADMIN_ALLOW_REMOTE", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", value_parser = parse_bool)]
    pub admin_allow_remote: Option<bool>,
    /// Service name recorded with every exchange [default: the upstream's host]
    #[arg(long, env = "SCORETAP_SERVICE", value_name = "NAME", value_parser = parse_service)]
    pub service: Option<String>,
    /// PEM certificate chain: serve TLS (ALPN h2, http/1.1) on --listen; needs --tls-key
    #[arg(long, env = "SCORETAP_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert
    #[arg(long, env = "SCORETAP_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Extra PEM CA bundle trusted for https:// upstreams, besides the system's roots
    #[arg(long, env = "SCORETAP_UPSTREAM_CA", value_name = "FILE")]
    pub upstream_ca: Option<PathBuf>,
    /// HTTP version spoken to the upstream: http1 or http2 (gRPC) [default: http1]
    #[arg(long, env = "SCORETAP_UPSTREAM_PROTOCOL", value_name = "PROTOCOL", value_parser = parse_protocol)]
    pub upstream_protocol: Option<UpstreamProtocol>,
    /// Timeout to connect to the upstream [default: 5s]
    #[arg(long, env = "SCORETAP_CONNECT_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub connect_timeout: Option<Duration>,
    /// Timeout for the upstream's response headers, from when the request body has been sent whole; past it the client gets a 504 [default: 60s]
    #[arg(long, env = "SCORETAP_UPSTREAM_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub upstream_timeout: Option<Duration>,
    /// No body byte either way on an exchange for this long ends it: a client that stops sending its body gets 408, an upstream that stops reading or sending makes a 504 or a cut response, a client that stops reading is disconnected [default: 60s]
    #[arg(long, env = "SCORETAP_BODY_IDLE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub body_idle_timeout: Option<Duration>,
    /// Idle pooled upstream connections close after this; below the keep-alive of common scoring servers (gunicorn: 2s) [default: 1500ms]
    #[arg(long, env = "SCORETAP_POOL_IDLE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub pool_idle_timeout: Option<Duration>,
    /// Most idle upstream connections kept [default: 64]
    #[arg(long, env = "SCORETAP_POOL_MAX_IDLE", value_name = "COUNT")]
    pub pool_max_idle: Option<usize>,
    /// Upstream connections open at once; past it a request waits for one, and the wait counts against --connect-timeout [default: 1024]
    #[arg(long, env = "SCORETAP_UPSTREAM_MAX_CONNECTIONS", value_name = "COUNT", value_parser = parse_count)]
    pub upstream_max_connections: Option<usize>,
    /// Peers (CIDRs, comma-separated) whose incoming forwarding headers are trusted and extended
    #[arg(long, env = "SCORETAP_TRUSTED_PROXIES", value_name = "CIDRS", value_parser = parse_networks)]
    pub trusted_proxies: Option<Networks>,
    /// Forwarding headers to add: x-forwarded, forwarded (RFC 7239) or none [default: x-forwarded]
    #[arg(long, env = "SCORETAP_FORWARDED", value_name = "MODE", value_parser = parse_forwarded_mode)]
    pub forwarded: Option<ForwardedMode>,
    /// Add `via: <version> NAME` to requests and responses
    #[arg(long, env = "SCORETAP_VIA", value_name = "NAME", value_parser = parse_service)]
    pub via: Option<String>,
    /// Send the client's Host (or HTTP/2 :authority) to the upstream instead of the upstream's own authority
    #[arg(long, env = "SCORETAP_PRESERVE_HOST", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", value_parser = parse_bool)]
    pub preserve_host: Option<bool>,
    /// After SIGTERM/SIGINT, how long in-flight requests may take to finish [default: 30s]
    #[arg(long, env = "SCORETAP_DRAIN_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// Largest request head (HTTP/1.1 request line and fields; HTTP/2 field list); past it 431; it also bounds an HTTP/1.1 connection's read buffer, so each upload's memory [default: 16KiB]
    #[arg(long, env = "SCORETAP_MAX_HEADER_BYTES", value_name = "SIZE", value_parser = parse_header_bytes)]
    pub max_header_bytes: Option<u64>,
    /// Header fields a request may carry; past it 431 [default: 100]
    #[arg(long, env = "SCORETAP_MAX_HEADERS", value_name = "COUNT", value_parser = parse_max_headers)]
    pub max_headers: Option<usize>,
    /// A client must send a whole request head within this of its first byte (or of connecting); else the connection is closed (slowloris) [default: 10s]
    #[arg(long, env = "SCORETAP_HEADER_READ_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub header_read_timeout: Option<Duration>,
    /// A client connection with no request in flight this long is closed (HTTP/2: GOAWAY) [default: 60s]
    #[arg(long, env = "SCORETAP_IDLE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// Client connections open at once; past it new ones are accepted and closed at once [default: 10000]
    #[arg(long, env = "SCORETAP_MAX_CONNECTIONS", value_name = "COUNT", value_parser = parse_count)]
    pub max_connections: Option<usize>,
    /// HTTP/2 streams a client connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS); cancelling twice this many started streams at once, refilled at this many a second, gets GOAWAY [default: 256]
    #[arg(long, env = "SCORETAP_MAX_CONCURRENT_STREAMS", value_name = "COUNT", value_parser = parse_streams)]
    pub max_concurrent_streams: Option<u32>,
    /// Largest request body forwarded; past it 413, and the upstream never receives more [default: 1GiB]
    #[arg(long, env = "SCORETAP_MAX_REQUEST_BODY_BYTES", value_name = "SIZE", value_parser = parse_size)]
    pub max_request_body_bytes: Option<u64>,
    /// HTTP/2 streams a client may open and reset before they are served; past it GOAWAY (rapid reset, CVE-2023-44487) [default: 20]
    #[arg(long, env = "SCORETAP_H2_MAX_PENDING_RESET_STREAMS", value_name = "COUNT", value_parser = parse_count)]
    pub h2_max_pending_reset_streams: Option<usize>,
    /// A peer cut off for HTTP/2 abuse (rapid reset) has its next connections wait this long before they are served, doubling per repeat up to 1s; 0s switches it off [default: 50ms]
    #[arg(long, env = "SCORETAP_ABUSE_DELAY", value_name = "DURATION", value_parser = parse_duration_or_zero)]
    pub abuse_delay: Option<Duration>,
    /// Log format: text or json [default: text]
    #[arg(long, env = "SCORETAP_LOG_FORMAT", value_name = "FORMAT", value_parser = parse_log_format)]
    pub log_format: Option<LogFormat>,
    /// One line per exchange on stderr: off, text or json (time, client, method, path with secrets redacted, status, sizes, duration, upstream time, correlation id, outcome) [default: off]
    #[arg(long, env = "SCORETAP_ACCESS_LOG", value_name = "FORMAT", value_parser = parse_access_log)]
    pub access_log: Option<AccessLogFormat>,
    /// Log filter, e.g. info or scoretap_core=debug; without it RUST_LOG is used when set [default: info]
    #[arg(long, env = "SCORETAP_LOG_LEVEL", value_name = "FILTER", value_parser = parse_log_filter)]
    pub log_level: Option<String>,
    /// Where records go: stdout, or file:///DIR for rotating JSONL files [default: file://./scoretap-data]
    #[arg(long, env = "SCORETAP_STORE", value_name = "URL", value_parser = parse_store)]
    pub store: Option<StoreLocation>,
    /// Capture exchanges (switchable at run time with PUT /capture) [default: true]
    #[arg(long, env = "SCORETAP_CAPTURE", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", value_parser = parse_bool)]
    pub capture: Option<bool>,
    /// Fraction of exchanges captured, 0.0 to 1.0 [default: 1.0]
    #[arg(long, env = "SCORETAP_SAMPLE_RATE", value_name = "RATE", value_parser = parse_rate)]
    pub sample_rate: Option<f64>,
    /// Only capture these paths (comma-separated patterns, * matches anything, e.g. /score*)
    #[arg(long, env = "SCORETAP_CAPTURE_INCLUDE", value_name = "PATTERNS", value_parser = parse_list)]
    pub capture_include: Option<List>,
    /// Never capture these paths (comma-separated patterns, e.g. /health*)
    #[arg(long, env = "SCORETAP_CAPTURE_EXCLUDE", value_name = "PATTERNS", value_parser = parse_list)]
    pub capture_exclude: Option<List>,
    /// Record these bodies without their bytes [default: audio/*,video/*,image/*]
    #[arg(long, env = "SCORETAP_CAPTURE_EXCLUDE_CONTENT_TYPES", value_name = "TYPES", value_parser = parse_list)]
    pub capture_exclude_content_types: Option<List>,
    /// Stop capturing a body past this size (complete: false) [default: 1GiB]
    #[arg(long, env = "SCORETAP_CAPTURE_MAX_BODY_BYTES", value_name = "SIZE", value_parser = parse_size)]
    pub capture_max_body_bytes: Option<u64>,
    /// Byte budget of the capture ring; when spent, capture drops and counts [default: 64MiB]
    #[arg(long, env = "SCORETAP_CAPTURE_BUFFER_BYTES", value_name = "SIZE", value_parser = parse_size)]
    pub capture_buffer_bytes: Option<u64>,
    /// Events the capture ring holds [default: 65536]
    #[arg(long, env = "SCORETAP_CAPTURE_BUFFER_SLOTS", value_name = "COUNT", value_parser = parse_count)]
    pub capture_buffer_slots: Option<usize>,
    /// Most exchanges captured at once; past it new ones are not captured (counted) [default: 100000]
    #[arg(long, env = "SCORETAP_CAPTURE_MAX_OPEN_EXCHANGES", value_name = "COUNT", value_parser = parse_count)]
    pub capture_max_open_exchanges: Option<usize>,
    /// Extra header names redacted in records and logs (authorization, cookies, API keys always are)
    #[arg(long, env = "SCORETAP_REDACT_HEADERS", value_name = "NAMES", value_parser = parse_list)]
    pub redact_headers: Option<List>,
    /// JSON fields redacted in recorded bodies, e.g. $.customer.email,$.data[*].ssn
    #[arg(long, env = "SCORETAP_REDACT_JSON", value_name = "PATHS", value_parser = parse_list)]
    pub redact_json: Option<List>,
    /// Bearer token required by the admin's mutating endpoints (PUT /capture)
    #[arg(
        long,
        env = "SCORETAP_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        value_parser = parse_secret
    )]
    pub admin_token: Option<Secret>,
    /// Names this process in trace file names [default: the host name]
    #[arg(long, env = "SCORETAP_INSTANCE", value_name = "NAME", value_parser = parse_service)]
    pub instance: Option<String>,
    /// Start a new trace file past this size [default: 64MiB]
    #[arg(long, env = "SCORETAP_TRACE_FILE_BYTES", value_name = "SIZE", value_parser = parse_size)]
    pub trace_file_bytes: Option<u64>,
    /// Seal a trace batch this long after its first record [default: 60s]
    #[arg(long, env = "SCORETAP_TRACE_BATCH_AGE", value_name = "DURATION", value_parser = parse_duration)]
    pub trace_batch_age: Option<Duration>,
    /// Compression of sealed trace batches: none or gzip (.jsonl.gz) [default: none]
    #[arg(long, env = "SCORETAP_TRACE_COMPRESSION", value_name = "none|gzip", value_parser = parse_compression)]
    pub trace_compression: Option<Compression>,
    /// Key of trace batches in the store; fields {service} {yyyy} {mm} {dd} {HH} {instance} {seq} [default: traces/{service}/{yyyy}/{mm}/{dd}/{HH}/{instance}-{seq}.jsonl]
    #[arg(long, env = "SCORETAP_TRACE_KEY_TEMPLATE", value_name = "TEMPLATE", value_parser = parse_trace_template)]
    pub trace_key_template: Option<KeyTemplate>,
    /// Key of spilled bodies; fields {service} {yyyy} {mm} {dd} {HH} {instance} {trace_id} {direction} [default: bodies/{service}/{yyyy}/{mm}/{dd}/{trace_id}/{direction}]
    #[arg(long, env = "SCORETAP_BODY_KEY_TEMPLATE", value_name = "TEMPLATE", value_parser = parse_body_template)]
    pub body_key_template: Option<KeyTemplate>,
    /// Store bodies larger than a record holds whole in the store (the record points at them); spilled bodies are stored as they crossed, unredacted [default: true, false with --redact-json]
    #[arg(long, env = "SCORETAP_SPILL", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", value_parser = parse_bool)]
    pub spill: Option<bool>,
    /// Local spool of a remote store: everything is written here first, then uploaded [default: ./scoretap-spool]
    #[arg(long, env = "SCORETAP_SPOOL_DIR", value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,
    /// Disk budget of the spool; past it new data is dropped and counted [default: 10GiB]
    #[arg(long, env = "SCORETAP_SPOOL_MAX_BYTES", value_name = "SIZE", value_parser = parse_size)]
    pub spool_max_bytes: Option<u64>,
    /// Uploads to a remote store in flight at once [default: 4]
    #[arg(long, env = "SCORETAP_UPLOAD_CONCURRENCY", value_name = "COUNT", value_parser = parse_count)]
    pub upload_concurrency: Option<usize>,
    /// Endpoint of an S3-compatible store, e.g. http://127.0.0.1:9000 (else AWS_ENDPOINT_URL, else AWS)
    #[arg(long, env = "SCORETAP_S3_ENDPOINT", value_name = "URL", value_parser = parse_endpoint)]
    pub s3_endpoint: Option<String>,
    /// S3 region (else AWS_REGION, the profile, or us-east-1)
    #[arg(long, env = "SCORETAP_S3_REGION", value_name = "REGION")]
    pub s3_region: Option<String>,
    /// Path-style S3 addressing (bucket in the path) [default: true when an endpoint is set]
    #[arg(long, env = "SCORETAP_S3_PATH_STYLE", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", value_parser = parse_bool)]
    pub s3_path_style: Option<bool>,
    /// Azure Blob endpoint, e.g. http://127.0.0.1:10000/devstoreaccount1 for Azurite (else from AZURE_STORAGE_* variables)
    #[arg(long, env = "SCORETAP_AZURE_ENDPOINT", value_name = "URL", value_parser = parse_endpoint)]
    pub azure_endpoint: Option<String>,
    /// Also write Azure ML v1 `modeldata` CSV parts for SUBSCRIPTION/RESOURCEGROUP/WORKSPACE/WEBSERVICE/MODEL/VERSION
    #[arg(long, env = "SCORETAP_MODELDATA", value_name = "PATH", value_parser = parse_modeldata_path)]
    pub modeldata: Option<String>,
    /// Column names of model inputs in the CSV (else from the JSON keys, or feature_0, feature_1, ...)
    #[arg(long, env = "SCORETAP_MODELDATA_FEATURES", value_name = "NAMES", value_parser = parse_list)]
    pub modeldata_features: Option<List>,
    /// Column names of predictions in the CSV (else prediction, or prediction_0, ...)
    #[arg(long, env = "SCORETAP_MODELDATA_PREDICTIONS", value_name = "NAMES", value_parser = parse_list)]
    pub modeldata_predictions: Option<List>,
    /// Export Prometheus metrics at the admin's /metrics [default: true]
    #[arg(long, env = "SCORETAP_METRICS", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", value_parser = parse_bool)]
    pub metrics: Option<bool>,
    /// /readyz also checks that the upstream accepts connections: right for a sidecar; false for replicas in front of one shared remote endpoint, so an upstream outage does not take every replica out of the load balancer [default: true]
    #[arg(long, env = "SCORETAP_READYZ_UPSTREAM", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", value_parser = parse_bool)]
    pub readyz_upstream: Option<bool>,
    /// TOML file with the same keys as these flags (kebab-case, e.g. upstream-timeout = "2s")
    #[arg(long, env = "SCORETAP_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Validate the configuration, print it as JSON and exit (a flag only: a variable left in a manifest would make every start exit)
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", value_parser = parse_bool)]
    pub check_config: Option<bool>,
}

/// A comma-separated list of values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct List(pub Vec<String>);

/// A list in the config file: an array of strings, or one comma-separated string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum FileList {
    Many(Vec<String>),
    One(String),
}

impl FileList {
    fn joined(self) -> String {
        match self {
            FileList::Many(items) => items.join(","),
            FileList::One(text) => text,
        }
    }
}

/// A list of networks, as given to `--trusted-proxies`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Networks(pub Vec<IpNet>);

/// The log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The TOML file: the same keys as the flags, all optional. Values are parsed by the same
/// functions as the flags so errors read alike.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct FileSettings {
    listen: Option<String>,
    upstream: Option<String>,
    admin_listen: Option<String>,
    admin_allow_remote: Option<bool>,
    service: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    upstream_ca: Option<PathBuf>,
    upstream_protocol: Option<String>,
    connect_timeout: Option<String>,
    upstream_timeout: Option<String>,
    body_idle_timeout: Option<String>,
    pool_idle_timeout: Option<String>,
    pool_max_idle: Option<usize>,
    upstream_max_connections: Option<usize>,
    trusted_proxies: Option<Vec<String>>,
    forwarded: Option<String>,
    via: Option<String>,
    preserve_host: Option<bool>,
    drain_timeout: Option<String>,
    max_header_bytes: Option<FileSize>,
    max_headers: Option<usize>,
    header_read_timeout: Option<String>,
    idle_timeout: Option<String>,
    max_connections: Option<usize>,
    max_concurrent_streams: Option<u32>,
    max_request_body_bytes: Option<FileSize>,
    h2_max_pending_reset_streams: Option<usize>,
    abuse_delay: Option<String>,
    log_format: Option<String>,
    access_log: Option<String>,
    log_level: Option<String>,
    store: Option<String>,
    capture: Option<bool>,
    sample_rate: Option<f64>,
    capture_include: Option<FileList>,
    capture_exclude: Option<FileList>,
    capture_exclude_content_types: Option<FileList>,
    capture_max_body_bytes: Option<FileSize>,
    capture_buffer_bytes: Option<FileSize>,
    capture_buffer_slots: Option<usize>,
    capture_max_open_exchanges: Option<usize>,
    redact_headers: Option<FileList>,
    redact_json: Option<FileList>,
    admin_token: Option<Secret>,
    instance: Option<String>,
    trace_file_bytes: Option<FileSize>,
    trace_batch_age: Option<String>,
    trace_compression: Option<String>,
    trace_key_template: Option<String>,
    body_key_template: Option<String>,
    spill: Option<bool>,
    spool_dir: Option<PathBuf>,
    spool_max_bytes: Option<FileSize>,
    upload_concurrency: Option<usize>,
    s3_endpoint: Option<String>,
    s3_region: Option<String>,
    s3_path_style: Option<bool>,
    azure_endpoint: Option<String>,
    modeldata: Option<String>,
    modeldata_features: Option<FileList>,
    modeldata_predictions: Option<FileList>,
    metrics: Option<bool>,
    readyz_upstream: Option<bool>,
}

/// A size in the config file: a number of bytes, or text such as "64MiB".
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum FileSize {
    Bytes(u64),
    Text(String),
}

impl FileSize {
    fn text(self) -> String {
        match self {
            FileSize::Bytes(bytes) => bytes.to_string(),
            FileSize::Text(text) => text,
        }
    }
}

/// The merged, validated configuration of `scoretap run`.
#[derive(Debug, Clone, Serialize)]
pub struct RunSettings {
    pub listen: SocketAddr,
    #[serde(serialize_with = "serialize_display")]
    pub upstream: Uri,
    pub admin_listen: SocketAddr,
    pub admin_allow_remote: bool,
    pub service: String,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub upstream_ca: Option<PathBuf>,
    pub upstream_protocol: UpstreamProtocol,
    #[serde(serialize_with = "serialize_duration")]
    pub connect_timeout: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub upstream_timeout: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub body_idle_timeout: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub pool_idle_timeout: Duration,
    pub pool_max_idle: usize,
    pub upstream_max_connections: usize,
    pub trusted_proxies: Vec<String>,
    pub forwarded: ForwardedMode,
    pub via: Option<String>,
    pub preserve_host: bool,
    #[serde(serialize_with = "serialize_duration")]
    pub drain_timeout: Duration,
    pub max_header_bytes: u64,
    pub max_headers: usize,
    #[serde(serialize_with = "serialize_duration")]
    pub header_read_timeout: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_concurrent_streams: u32,
    pub max_request_body_bytes: u64,
    pub h2_max_pending_reset_streams: usize,
    #[serde(serialize_with = "serialize_duration")]
    pub abuse_delay: Duration,
    pub log_format: LogFormat,
    pub access_log: AccessLogFormat,
    pub log_level: String,
    #[serde(serialize_with = "serialize_store")]
    pub store: StoreLocation,
    pub capture: bool,
    pub sample_rate: f64,
    pub capture_include: Vec<String>,
    pub capture_exclude: Vec<String>,
    pub capture_exclude_content_types: Vec<String>,
    pub capture_max_body_bytes: u64,
    pub capture_buffer_bytes: u64,
    pub capture_buffer_slots: usize,
    pub capture_max_open_exchanges: usize,
    pub redact_headers: Vec<String>,
    pub redact_json: Vec<String>,
    pub admin_token: Option<Secret>,
    pub instance: String,
    pub trace_file_bytes: u64,
    #[serde(serialize_with = "serialize_duration")]
    pub trace_batch_age: Duration,
    pub trace_compression: Compression,
    #[serde(serialize_with = "serialize_template")]
    pub trace_key_template: KeyTemplate,
    #[serde(serialize_with = "serialize_template")]
    pub body_key_template: KeyTemplate,
    pub spill: bool,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    pub upload_concurrency: usize,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub s3_path_style: bool,
    pub azure_endpoint: Option<String>,
    pub modeldata: Option<String>,
    pub modeldata_features: Option<Vec<String>>,
    pub modeldata_predictions: Option<Vec<String>>,
    pub metrics: bool,
    pub readyz_upstream: bool,
    #[serde(skip)]
    trusted_networks: Vec<IpNet>,
    #[serde(skip)]
    redaction: Redaction,
}

fn serialize_store<S: serde::Serializer>(
    value: &StoreLocation,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&value.url())
}

/// Secrets are never printed, only whether they are set.
/// A secret flag's value; it prints as `[redacted]` from here on.
fn parse_secret(value: &str) -> Result<Secret, String> {
    Ok(Secret::new(value))
}

fn serialize_display<S: serde::Serializer>(value: &Uri, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

fn serialize_duration<S: serde::Serializer>(
    value: &Duration,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&humantime::format_duration(*value))
}

/// Reads a file key's value with a flag's parser, naming the key on failure.
fn from_file<T>(
    path: &Path,
    key: &str,
    value: Option<String>,
    parse: fn(&str) -> Result<T, String>,
) -> Result<Option<T>, SettingsError> {
    value
        .map(|text| {
            parse(&text).map_err(|message| SettingsError::File {
                path: path.to_owned(),
                message: format!(
                    "invalid value '{}' for key '{key}': {message}",
                    sanitize(&text)
                ),
            })
        })
        .transpose()
}

impl RunArgs {
    /// Fills the flags not given with the config file's values.
    fn merge_file(mut self) -> Result<Self, SettingsError> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path).map_err(|source| SettingsError::Read {
            path: path.clone(),
            source,
        })?;
        // The message only, never toml's excerpt of the file: the line may hold a secret.
        let file: FileSettings = toml::from_str(&text).map_err(|error| SettingsError::File {
            path: path.clone(),
            message: match error.span() {
                Some(span) => format!(
                    "line {}: {}",
                    text.get(..span.start)
                        .unwrap_or_default()
                        .matches('\n')
                        .count()
                        + 1,
                    error.message()
                ),
                None => error.message().to_owned(),
            },
        })?;
        let p = path.as_path();
        self.listen = self
            .listen
            .or(from_file(p, "listen", file.listen, parse_address)?);
        self.upstream =
            self.upstream
                .or(from_file(p, "upstream", file.upstream, parse_upstream_url)?);
        self.admin_listen = self.admin_listen.or(from_file(
            p,
            "admin-listen",
            file.admin_listen,
            parse_address,
        )?);
        self.admin_allow_remote = self.admin_allow_remote.or(file.admin_allow_remote);
        self.service = self
            .service
            .or(from_file(p, "service", file.service, parse_service)?);
        self.tls_cert = self.tls_cert.or(file.tls_cert);
        self.tls_key = self.tls_key.or(file.tls_key);
        self.upstream_ca = self.upstream_ca.or(file.upstream_ca);
        self.upstream_protocol = self.upstream_protocol.or(from_file(
            p,
            "upstream-protocol",
            file.upstream_protocol,
            parse_protocol,
        )?);
        self.connect_timeout = self.connect_timeout.or(from_file(
            p,
            "connect-timeout",
            file.connect_timeout,
            parse_duration,
        )?);
        self.upstream_timeout = self.upstream_timeout.or(from_file(
            p,
            "upstream-timeout",
            file.upstream_timeout,
            parse_duration,
        )?);
        self.body_idle_timeout = self.body_idle_timeout.or(from_file(
            p,
            "body-idle-timeout",
            file.body_idle_timeout,
            parse_duration,
        )?);
        self.pool_idle_timeout = self.pool_idle_timeout.or(from_file(
            p,
            "pool-idle-timeout",
            file.pool_idle_timeout,
            parse_duration,
        )?);
        self.pool_max_idle = self.pool_max_idle.or(file.pool_max_idle);
        self.trusted_proxies = self.trusted_proxies.or(from_file(
            p,
            "trusted-proxies",
            file.trusted_proxies.map(|list| list.join(",")),
            parse_networks,
        )?);
        self.forwarded = self.forwarded.or(from_file(
            p,
            "forwarded",
            file.forwarded,
            parse_forwarded_mode,
        )?);
        self.via = self.via.or(from_file(p, "via", file.via, parse_service)?);
        self.preserve_host = self.preserve_host.or(file.preserve_host);
        self.drain_timeout = self.drain_timeout.or(from_file(
            p,
            "drain-timeout",
            file.drain_timeout,
            parse_duration,
        )?);
        self.header_read_timeout = self.header_read_timeout.or(from_file(
            p,
            "header-read-timeout",
            file.header_read_timeout,
            parse_duration,
        )?);
        self.idle_timeout = self.idle_timeout.or(from_file(
            p,
            "idle-timeout",
            file.idle_timeout,
            parse_duration,
        )?);
        self.abuse_delay = self.abuse_delay.or(from_file(
            p,
            "abuse-delay",
            file.abuse_delay,
            parse_duration_or_zero,
        )?);
        let count = |key: &str, value: Option<usize>, parse: fn(&str) -> Result<usize, String>| {
            from_file(p, key, value.map(|count| count.to_string()), parse)
        };
        self.max_headers =
            self.max_headers
                .or(count("max-headers", file.max_headers, parse_max_headers)?);
        self.max_connections =
            self.max_connections
                .or(count("max-connections", file.max_connections, parse_count)?);
        self.upstream_max_connections = self.upstream_max_connections.or(count(
            "upstream-max-connections",
            file.upstream_max_connections,
            parse_count,
        )?);
        self.h2_max_pending_reset_streams = self.h2_max_pending_reset_streams.or(count(
            "h2-max-pending-reset-streams",
            file.h2_max_pending_reset_streams,
            parse_count,
        )?);
        self.max_concurrent_streams = self.max_concurrent_streams.or(from_file(
            p,
            "max-concurrent-streams",
            file.max_concurrent_streams.map(|count| count.to_string()),
            parse_streams,
        )?);
        self.max_header_bytes = self.max_header_bytes.or(from_file(
            p,
            "max-header-bytes",
            file.max_header_bytes.map(FileSize::text),
            parse_header_bytes,
        )?);
        self.max_request_body_bytes = self.max_request_body_bytes.or(from_file(
            p,
            "max-request-body-bytes",
            file.max_request_body_bytes.map(FileSize::text),
            parse_size,
        )?);
        self.access_log = self.access_log.or(from_file(
            p,
            "access-log",
            file.access_log,
            parse_access_log,
        )?);
        self.log_format = self.log_format.or(from_file(
            p,
            "log-format",
            file.log_format,
            parse_log_format,
        )?);
        self.log_level =
            self.log_level
                .or(from_file(p, "log-level", file.log_level, parse_log_filter)?);
        self.store = self
            .store
            .or(from_file(p, "store", file.store, parse_store)?);
        self.capture = self.capture.or(file.capture);
        self.sample_rate = self.sample_rate.or(from_file(
            p,
            "sample-rate",
            file.sample_rate.map(|rate| rate.to_string()),
            parse_rate,
        )?);
        let list = |key: &str, value: Option<FileList>| {
            from_file(p, key, value.map(FileList::joined), parse_list)
        };
        self.capture_include = self
            .capture_include
            .or(list("capture-include", file.capture_include)?);
        self.capture_exclude = self
            .capture_exclude
            .or(list("capture-exclude", file.capture_exclude)?);
        self.capture_exclude_content_types = self.capture_exclude_content_types.or(list(
            "capture-exclude-content-types",
            file.capture_exclude_content_types,
        )?);
        let size = |key: &str, value: Option<FileSize>| {
            from_file(p, key, value.map(FileSize::text), parse_size)
        };
        self.capture_max_body_bytes = self
            .capture_max_body_bytes
            .or(size("capture-max-body-bytes", file.capture_max_body_bytes)?);
        self.capture_buffer_bytes = self
            .capture_buffer_bytes
            .or(size("capture-buffer-bytes", file.capture_buffer_bytes)?);
        self.capture_buffer_slots = self.capture_buffer_slots.or(from_file(
            p,
            "capture-buffer-slots",
            file.capture_buffer_slots.map(|slots| slots.to_string()),
            parse_count,
        )?);
        self.capture_max_open_exchanges = self.capture_max_open_exchanges.or(from_file(
            p,
            "capture-max-open-exchanges",
            file.capture_max_open_exchanges
                .map(|count| count.to_string()),
            parse_count,
        )?);
        self.redact_headers = self
            .redact_headers
            .or(list("redact-headers", file.redact_headers)?);
        self.redact_json = self.redact_json.or(list("redact-json", file.redact_json)?);
        self.admin_token = self.admin_token.or(file.admin_token);
        self.instance = self
            .instance
            .or(from_file(p, "instance", file.instance, parse_service)?);
        self.trace_file_bytes = self
            .trace_file_bytes
            .or(size("trace-file-bytes", file.trace_file_bytes)?);
        self.trace_batch_age = self.trace_batch_age.or(from_file(
            p,
            "trace-batch-age",
            file.trace_batch_age,
            parse_duration,
        )?);
        self.trace_compression = self.trace_compression.or(from_file(
            p,
            "trace-compression",
            file.trace_compression,
            parse_compression,
        )?);
        self.trace_key_template = self.trace_key_template.or(from_file(
            p,
            "trace-key-template",
            file.trace_key_template,
            parse_trace_template,
        )?);
        self.body_key_template = self.body_key_template.or(from_file(
            p,
            "body-key-template",
            file.body_key_template,
            parse_body_template,
        )?);
        self.spill = self.spill.or(file.spill);
        self.spool_dir = self.spool_dir.or(file.spool_dir);
        self.spool_max_bytes = self
            .spool_max_bytes
            .or(size("spool-max-bytes", file.spool_max_bytes)?);
        self.upload_concurrency = self.upload_concurrency.or(from_file(
            p,
            "upload-concurrency",
            file.upload_concurrency.map(|count| count.to_string()),
            parse_count,
        )?);
        self.s3_endpoint = self.s3_endpoint.or(from_file(
            p,
            "s3-endpoint",
            file.s3_endpoint,
            parse_endpoint,
        )?);
        self.s3_region = self.s3_region.or(file.s3_region);
        self.s3_path_style = self.s3_path_style.or(file.s3_path_style);
        self.azure_endpoint = self.azure_endpoint.or(from_file(
            p,
            "azure-endpoint",
            file.azure_endpoint,
            parse_endpoint,
        )?);
        self.modeldata = self.modeldata.or(from_file(
            p,
            "modeldata",
            file.modeldata,
            parse_modeldata_path,
        )?);
        self.modeldata_features = self
            .modeldata_features
            .or(list("modeldata-features", file.modeldata_features)?);
        self.modeldata_predictions = self
            .modeldata_predictions
            .or(list("modeldata-predictions", file.modeldata_predictions)?);
        self.metrics = self.metrics.or(file.metrics);
        self.readyz_upstream = self.readyz_upstream.or(file.readyz_upstream);
        Ok(self)
    }

    /// Merges flags, environment and file, applies defaults, and checks what belongs together.
    pub fn resolve(self) -> Result<RunSettings, SettingsError> {
        let args = self.merge_file()?;
        let upstream = args.upstream.ok_or_else(|| {
            SettingsError::Invalid(
                "the argument '--upstream <URL>' is required (or SCORETAP_UPSTREAM, or `upstream` in --config): the scoring endpoint's base URL, e.g. http://127.0.0.1:5001"
                    .into(),
            )
        })?;
        match (&args.tls_cert, &args.tls_key) {
            (Some(_), None) => {
                return Err(SettingsError::Invalid(
                    "'--tls-cert' needs '--tls-key <FILE>': the PEM private key of the certificate"
                        .into(),
                ))
            }
            (None, Some(_)) => {
                return Err(SettingsError::Invalid(
                    "'--tls-key' needs '--tls-cert <FILE>': the PEM certificate chain".into(),
                ))
            }
            _ => {}
        }
        for (flag, path) in [
            ("--tls-cert", &args.tls_cert),
            ("--tls-key", &args.tls_key),
            ("--upstream-ca", &args.upstream_ca),
        ] {
            if let Some(path) = path {
                if !path.is_file() {
                    return Err(SettingsError::Invalid(format!(
                        "invalid value '{}' for '{flag} <FILE>': expected a readable PEM file",
                        path.display()
                    )));
                }
            }
        }
        let service = args
            .service
            .or_else(|| upstream.host().map(str::to_owned))
            .unwrap_or_else(|| "scoring".into());
        let trusted_networks = args.trusted_proxies.unwrap_or_default().0;
        let redact_headers = args.redact_headers.unwrap_or_default().0;
        let redact_json = args.redact_json.unwrap_or_default().0;
        // Spilled bodies are stored exactly as they crossed (their sha256 must match), so
        // JSON-path redaction cannot apply to them: with --redact-json, spilling is off unless
        // asked for explicitly.
        let spill = args.spill.unwrap_or(redact_json.is_empty());
        let redaction = Redaction::new(&redact_headers, &redact_json).map_err(|error| {
            SettingsError::Invalid(format!(
                "invalid value for '--redact-json <PATHS>' or '--redact-headers <NAMES>': {error}"
            ))
        })?;
        if args
            .admin_token
            .as_ref()
            .is_some_and(|token| token.expose().len() < 8)
        {
            return Err(SettingsError::Invalid(
                "invalid value for '--admin-token <TOKEN>': expected at least 8 characters".into(),
            ));
        }
        let admin_listen = args
            .admin_listen
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9901)));
        let admin_allow_remote = args.admin_allow_remote.unwrap_or(false);
        if !admin_allow_remote && !admin_listen.ip().to_canonical().is_loopback() {
            return Err(SettingsError::Invalid(format!(
                "invalid value '{admin_listen}' for '--admin-listen <ADDR>': not a loopback \
                 address, and the admin switches capture and serves recorded model inputs; set \
                 '--admin-allow-remote true' (SCORETAP_ADMIN_ALLOW_REMOTE) to listen there anyway \
                 (in a pod, for probes and scraping), and '--admin-token' to protect it"
            )));
        }
        let capture_buffer_bytes = args.capture_buffer_bytes.unwrap_or(64 << 20);
        let limits = Limits::default();
        Ok(RunSettings {
            listen: args
                .listen
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080))),
            upstream,
            admin_listen,
            admin_allow_remote,
            service,
            tls_cert: args.tls_cert,
            tls_key: args.tls_key,
            upstream_ca: args.upstream_ca,
            upstream_protocol: args.upstream_protocol.unwrap_or_default(),
            connect_timeout: args.connect_timeout.unwrap_or(Duration::from_secs(5)),
            upstream_timeout: args.upstream_timeout.unwrap_or(Duration::from_secs(60)),
            body_idle_timeout: args.body_idle_timeout.unwrap_or(DEFAULT_BODY_IDLE_TIMEOUT),
            pool_idle_timeout: args
                .pool_idle_timeout
                .unwrap_or(Duration::from_millis(1500)),
            pool_max_idle: args.pool_max_idle.unwrap_or(64),
            upstream_max_connections: args
                .upstream_max_connections
                .unwrap_or(DEFAULT_UPSTREAM_MAX_CONNECTIONS),
            trusted_proxies: trusted_networks.iter().map(ToString::to_string).collect(),
            forwarded: args.forwarded.unwrap_or_default(),
            via: args.via,
            preserve_host: args.preserve_host.unwrap_or(false),
            drain_timeout: args.drain_timeout.unwrap_or(Duration::from_secs(30)),
            max_header_bytes: args
                .max_header_bytes
                .unwrap_or(limits.max_header_bytes as u64),
            max_headers: args.max_headers.unwrap_or(DEFAULT_MAX_HEADERS),
            header_read_timeout: args
                .header_read_timeout
                .unwrap_or(limits.header_read_timeout),
            idle_timeout: args.idle_timeout.unwrap_or(limits.idle_timeout),
            max_connections: args.max_connections.unwrap_or(limits.max_connections),
            max_concurrent_streams: args
                .max_concurrent_streams
                .unwrap_or(limits.max_concurrent_streams),
            max_request_body_bytes: args
                .max_request_body_bytes
                .unwrap_or(DEFAULT_MAX_REQUEST_BODY_BYTES),
            h2_max_pending_reset_streams: args
                .h2_max_pending_reset_streams
                .unwrap_or(limits.h2_max_pending_reset_streams),
            abuse_delay: args.abuse_delay.unwrap_or(limits.abuse_delay),
            log_format: args.log_format.unwrap_or_default(),
            access_log: args.access_log.unwrap_or_default(),
            log_level: match args.log_level {
                Some(filter) => filter,
                None => log_filter_from_environment()?,
            },
            store: args
                .store
                .unwrap_or_else(|| StoreLocation::Directory(PathBuf::from("./scoretap-data"))),
            capture: args.capture.unwrap_or(true),
            sample_rate: args.sample_rate.unwrap_or(1.0),
            capture_include: args.capture_include.unwrap_or_default().0,
            capture_exclude: args.capture_exclude.unwrap_or_default().0,
            capture_exclude_content_types: args.capture_exclude_content_types.map_or_else(
                || {
                    CaptureSelection::default()
                        .excluded_content_types
                        .iter()
                        .map(|pattern| pattern.as_str().to_owned())
                        .collect()
                },
                |list| list.0,
            ),
            capture_max_body_bytes: args.capture_max_body_bytes.unwrap_or(1 << 30),
            capture_buffer_bytes,
            capture_buffer_slots: args.capture_buffer_slots.unwrap_or(65_536),
            capture_max_open_exchanges: args
                .capture_max_open_exchanges
                .unwrap_or(scoretap_core::ring::DEFAULT_MAXIMUM_OPEN_EXCHANGES),
            redact_headers,
            redact_json,
            admin_token: args.admin_token,
            instance: args.instance.unwrap_or_else(default_instance),
            trace_file_bytes: args.trace_file_bytes.unwrap_or(64 << 20),
            trace_batch_age: args.trace_batch_age.unwrap_or(Duration::from_secs(60)),
            trace_compression: args.trace_compression.unwrap_or_default(),
            trace_key_template: args
                .trace_key_template
                .unwrap_or_else(|| StorageSettings::default().trace_template),
            body_key_template: args
                .body_key_template
                .unwrap_or_else(|| StorageSettings::default().body_template),
            spill,
            spool_dir: args
                .spool_dir
                .unwrap_or_else(|| PathBuf::from("./scoretap-spool")),
            spool_max_bytes: args.spool_max_bytes.unwrap_or(10 << 30),
            upload_concurrency: args.upload_concurrency.unwrap_or(4),
            s3_path_style: args.s3_path_style.unwrap_or(args.s3_endpoint.is_some()),
            s3_endpoint: args.s3_endpoint,
            s3_region: args.s3_region,
            azure_endpoint: args.azure_endpoint,
            modeldata: args.modeldata,
            modeldata_features: args.modeldata_features.map(|list| list.0),
            modeldata_predictions: args.modeldata_predictions.map(|list| list.0),
            metrics: args.metrics.unwrap_or(true),
            readyz_upstream: args.readyz_upstream.unwrap_or(true),
            trusted_networks,
            redaction,
        })
    }
}

impl RunSettings {
    /// The core library's settings.
    pub fn server_settings(&self) -> ServerSettings {
        ServerSettings {
            listen: self.listen,
            admin_listen: self.admin_listen,
            tls: match (&self.tls_cert, &self.tls_key) {
                (Some(certificate), Some(private_key)) => Some(ServerCertificateFiles {
                    certificate: certificate.clone(),
                    private_key: private_key.clone(),
                }),
                _ => None,
            },
            drain_timeout: self.drain_timeout,
            upstream: UpstreamSettings {
                url: self.upstream.clone(),
                protocol: self.upstream_protocol,
                ca_file: self.upstream_ca.clone(),
                connect_timeout: self.connect_timeout,
                response_header_timeout: self.upstream_timeout,
                pool_idle_timeout: self.pool_idle_timeout,
                pool_max_idle_per_host: self.pool_max_idle,
                body_idle_timeout: self.body_idle_timeout,
                max_connections: self.upstream_max_connections,
            },
            proxy: ProxySettings {
                service: self.service.clone(),
                forwarding: ForwardingPolicy {
                    mode: self.forwarded,
                    trusted_proxies: self.trusted_networks.clone(),
                    via: self.via.clone(),
                },
                preserve_host: self.preserve_host,
                max_headers: self.max_headers,
                max_request_body_bytes: self.max_request_body_bytes,
                access_log: self.access_log,
            },
            limits: Limits {
                // Bounded to 16 MiB by its parser.
                max_header_bytes: usize::try_from(self.max_header_bytes).unwrap_or(usize::MAX),
                header_read_timeout: self.header_read_timeout,
                idle_timeout: self.idle_timeout,
                max_connections: self.max_connections,
                max_concurrent_streams: self.max_concurrent_streams,
                h2_max_pending_reset_streams: self.h2_max_pending_reset_streams,
                abuse_delay: self.abuse_delay,
            },
            capture: Some(CaptureSettings {
                enabled: self.capture,
                sample_rate: self.sample_rate,
                selection: CaptureSelection {
                    include_paths: self
                        .capture_include
                        .iter()
                        .map(|p| PathPattern::new(p))
                        .collect(),
                    exclude_paths: self
                        .capture_exclude
                        .iter()
                        .map(|p| PathPattern::new(p))
                        .collect(),
                    excluded_content_types: self
                        .capture_exclude_content_types
                        .iter()
                        .map(|p| ContentTypePattern::new(p))
                        .collect(),
                    maximum_body_bytes: self.capture_max_body_bytes,
                },
                buffer_bytes: self.capture_buffer_bytes,
                buffer_slots: self.capture_buffer_slots,
                max_open_exchanges: self.capture_max_open_exchanges,
                store: self.store.clone(),
                instance: self.instance.clone(),
                redaction: self.redaction.clone(),
                flush_interval: Duration::from_millis(100),
                storage: StorageSettings {
                    batches: BatchSettings {
                        maximum_bytes: self.trace_file_bytes,
                        maximum_age: self.trace_batch_age,
                        gzip: self.trace_compression == Compression::Gzip,
                    },
                    trace_template: self.trace_key_template.clone(),
                    body_template: self.body_key_template.clone(),
                    spill: self.spill,
                    spool_directory: self.spool_dir.clone(),
                    spool_maximum_bytes: self.spool_max_bytes,
                    remote: RemoteOptions {
                        s3_endpoint: self.s3_endpoint.clone(),
                        s3_region: self.s3_region.clone(),
                        s3_force_path_style: self.s3_path_style,
                        azure_endpoint: self.azure_endpoint.clone(),
                        ..RemoteOptions::default()
                    },
                    uploader: UploaderSettings {
                        concurrency: self.upload_concurrency,
                        ..UploaderSettings::default()
                    },
                    modeldata: self.modeldata.as_ref().map(|path| ModeldataSettings {
                        path: path.clone(),
                        columns: ModeldataColumns {
                            features: self.modeldata_features.clone(),
                            predictions: self.modeldata_predictions.clone(),
                        },
                    }),
                },
            }),
            admin_token: self.admin_token.clone(),
            metrics: self.metrics,
            readyz_upstream: self.readyz_upstream,
        }
    }
}

/// This host's name, for trace file names.
fn default_instance() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| parse_service(name).is_ok())
        .unwrap_or_else(|| "scoretap".into())
}

// Value parsers, shared by flags, environment variables and the config file. Each message says
// what the value should look like; clap adds the flag's name.

pub fn parse_address(text: &str) -> Result<SocketAddr, String> {
    const EXPECTED: &str = "expected HOST:PORT such as 127.0.0.1:8080, 0.0.0.0:8080 or [::]:8080";
    if let Ok(address) = text.parse() {
        return Ok(address);
    }
    if !text.contains(':') {
        return Err(EXPECTED.into());
    }
    text.to_socket_addrs()
        .map_err(|_| EXPECTED.to_owned())?
        .next()
        .ok_or_else(|| EXPECTED.into())
}

pub fn parse_upstream_url(text: &str) -> Result<Uri, String> {
    const EXPECTED: &str =
        "expected an http:// or https:// URL with a host, such as http://127.0.0.1:5001";
    let uri: Uri = text.parse().map_err(|_| EXPECTED.to_owned())?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(host)) if !host.is_empty() => {}
        _ => return Err(EXPECTED.into()),
    }
    if uri.query().is_some() {
        return Err("expected a base URL without a query string".into());
    }
    if uri
        .authority()
        .is_some_and(|authority| authority.as_str().contains('@'))
    {
        return Err(
            "expected a URL without credentials (user:password@); clients' Authorization headers are forwarded as they are"
                .into(),
        );
    }
    Ok(uri)
}

/// A duration where zero means "off".
pub fn parse_duration_or_zero(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|_| "expected a duration such as 0s, 50ms or 1s".to_owned())
}

/// A `tracing` filter (`info`, `scoretap_core=debug,info`), as `--log-level` and `RUST_LOG` take.
pub fn parse_log_filter(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("expected a log filter such as info, debug or scoretap_core=debug,info".into());
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(text)
        .map(|_| text.to_owned())
        .map_err(|error| {
            format!(
                "expected a log filter such as info, debug or scoretap_core=debug,info ({error})"
            )
        })
}

/// The log filter when `--log-level` is not given: `RUST_LOG` when set (a bad one is refused,
/// naming it), else `info`.
fn log_filter_from_environment() -> Result<String, SettingsError> {
    match std::env::var("RUST_LOG") {
        Ok(filter) if !filter.trim().is_empty() => parse_log_filter(&filter).map_err(|message| {
            SettingsError::Invalid(format!(
                "invalid value '{}' for RUST_LOG: {message}",
                sanitize(&filter)
            ))
        }),
        _ => Ok("info".into()),
    }
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text.trim())
        .map_err(|_| "expected a duration such as 250ms, 5s or 2m".to_owned())?;
    if duration.is_zero() {
        return Err("expected a duration above zero, such as 250ms, 5s or 2m".into());
    }
    Ok(duration)
}

fn parse_service(text: &str) -> Result<String, String> {
    let valid = !text.is_empty()
        && text.len() <= 128
        && text
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"-_.".contains(&byte));
    if valid {
        Ok(text.to_owned())
    } else {
        Err("expected 1 to 128 letters, digits, '-', '_' or '.'".into())
    }
}

fn parse_protocol(text: &str) -> Result<UpstreamProtocol, String> {
    match text {
        "http1" | "http/1.1" => Ok(UpstreamProtocol::Http1),
        "http2" | "h2" => Ok(UpstreamProtocol::Http2),
        _ => Err("expected http1 or http2".into()),
    }
}

fn parse_forwarded_mode(text: &str) -> Result<ForwardedMode, String> {
    match text {
        "x-forwarded" => Ok(ForwardedMode::XForwarded),
        "forwarded" => Ok(ForwardedMode::Forwarded),
        "none" => Ok(ForwardedMode::None),
        _ => Err("expected x-forwarded, forwarded or none".into()),
    }
}

fn parse_networks(text: &str) -> Result<Networks, String> {
    parse_list(text)?
        .0
        .into_iter()
        .map(|part| {
            part.parse::<IpNet>()
                .or_else(|_| part.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    format!("expected comma-separated CIDRs or addresses such as 10.0.0.0/8,127.0.0.1; '{part}' is neither")
                })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Networks)
}

/// How sealed trace batches are stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    None,
    Gzip,
}

fn parse_compression(text: &str) -> Result<Compression, String> {
    match text.trim() {
        "none" => Ok(Compression::None),
        "gzip" => Ok(Compression::Gzip),
        _ => Err("expected none or gzip".into()),
    }
}

fn parse_trace_template(text: &str) -> Result<KeyTemplate, String> {
    KeyTemplate::parse(text, &[KeyField::Sequence, KeyField::Instance])
}

fn parse_body_template(text: &str) -> Result<KeyTemplate, String> {
    KeyTemplate::parse(text, &[KeyField::TraceId, KeyField::Direction])
}

/// A store endpoint: credentials never go in it (they come from the environment, where the
/// store's own client reads them), so it can be printed and logged as it is.
pub fn parse_endpoint(text: &str) -> Result<String, String> {
    let text = text.trim().trim_end_matches('/');
    match text.parse::<Uri>() {
        Ok(uri) if uri.authority().is_some_and(|authority| authority.as_str().contains('@')) => {
            Err("expected a URL without credentials (user:password@): keys and tokens are read from the environment (AWS_*, AZURE_STORAGE_*)".into())
        }
        Ok(uri) if uri.query().is_some() => {
            Err("expected a URL without a query string: a SAS token goes in AZURE_STORAGE_SAS_TOKEN".into())
        }
        Ok(uri) if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some() => {
            Ok(text.to_owned())
        }
        _ => Err("expected an http:// or https:// URL such as http://127.0.0.1:9000".into()),
    }
}

fn parse_modeldata_path(text: &str) -> Result<String, String> {
    ModeldataSettings::parse_path(text)
}

fn serialize_template<S: serde::Serializer>(
    value: &KeyTemplate,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(value.as_str())
}

pub fn parse_store(text: &str) -> Result<StoreLocation, String> {
    StoreLocation::parse(text).map_err(|error| error.to_string())
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(rate),
        _ => Err("expected a number from 0.0 to 1.0, such as 0.1".into()),
    }
}

fn parse_count(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(count) if count > 0 => Ok(count),
        _ => Err("expected a whole number above zero".into()),
    }
}

/// A request head limit: hyper's HTTP/1 read buffer cannot be smaller than 8 KiB, and HTTP/2
/// announces the limit as a 32-bit setting; 16 MiB is far past any sane head.
fn parse_header_bytes(text: &str) -> Result<u64, String> {
    const EXPECTED: &str = "expected a size from 8KiB to 16MiB, such as 64KiB";
    let size = parse_size(text).map_err(|_| EXPECTED.to_owned())?;
    if (MINIMUM_HEADER_BYTES as u64..=16 << 20).contains(&size) {
        Ok(size)
    } else {
        Err(EXPECTED.into())
    }
}

fn parse_max_headers(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(count) if (1..=10_000).contains(&count) => Ok(count),
        _ => Err("expected a whole number from 1 to 10000".into()),
    }
}

fn parse_streams(text: &str) -> Result<u32, String> {
    match text.trim().parse::<u32>() {
        Ok(count) if count > 0 => Ok(count),
        _ => Err("expected a whole number from 1 to 4294967295".into()),
    }
}

fn parse_list(text: &str) -> Result<List, String> {
    Ok(List(
        text.split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(str::to_owned)
            .collect(),
    ))
}

/// Parses a size: plain bytes, or with a unit (KB, MB, GB are powers of 1000; KiB, MiB, GiB of
/// 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    const EXPECTED: &str = "expected a size such as 65536, 512KiB, 64MiB or 1GiB";
    let text = text.trim();
    let split = text
        .find(|character: char| !character.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| EXPECTED.to_owned())?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" | "k" => 1 << 10,
        "mb" => 1_000_000,
        "mib" | "m" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1 << 30,
        _ => return Err(EXPECTED.into()),
    };
    match number.checked_mul(multiplier) {
        Some(size) if size > 0 => Ok(size),
        _ => Err(EXPECTED.into()),
    }
}

fn parse_bool(text: &str) -> Result<bool, String> {
    match text.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

fn parse_access_log(text: &str) -> Result<AccessLogFormat, String> {
    match text {
        "off" => Ok(AccessLogFormat::Off),
        "text" => Ok(AccessLogFormat::Text),
        "json" => Ok(AccessLogFormat::Json),
        _ => Err("expected off, text or json".into()),
    }
}

fn parse_log_format(text: &str) -> Result<LogFormat, String> {
    match text {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err("expected text or json".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("65536"), Ok(65_536));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn parsers_accept_good_and_explain_bad_values() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("soon")
            .expect_err("invalid")
            .contains("duration"));
        assert!(parse_duration("0s").is_err());
        assert!(parse_upstream_url("ftp://x").is_err());
        assert!(parse_upstream_url("http://127.0.0.1:5001/api").is_ok());
        assert!(parse_address("8080").is_err());
        assert_eq!(
            parse_address("127.0.0.1:0"),
            Ok(SocketAddr::from(([127, 0, 0, 1], 0)))
        );
        assert_eq!(
            parse_networks("10.0.0.0/8, 127.0.0.1").map(|n| n.0.len()),
            Ok(2)
        );
        assert!(parse_networks("10.0.0.0/33").is_err());
        assert_eq!(parse_header_bytes("64KiB"), Ok(64 << 10));
        for bad in ["4KiB", "32MiB", "lots"] {
            assert!(parse_header_bytes(bad)
                .expect_err("invalid")
                .contains("8KiB to 16MiB"));
        }
        assert_eq!(parse_max_headers("100"), Ok(100));
        assert!(parse_max_headers("0").is_err());
        assert!(parse_max_headers("10001").is_err());
        assert_eq!(parse_streams("256"), Ok(256));
        assert!(parse_streams("0").is_err());
        assert!(parse_streams("4294967296").is_err());
    }

    /// Every form the settings take (flags, resolved settings, the core's settings, the
    /// `--check-config` JSON) prints the admin token as `[redacted]`.
    #[test]
    fn settings_never_print_the_admin_token() {
        const TOKEN: &str = "admin-token-Zq81vXk3";
        let args = RunArgs {
            upstream: Some(Uri::from_static("http://127.0.0.1:5001")),
            admin_token: Some(Secret::new(TOKEN)),
            store: Some(StoreLocation::Azure {
                container: "scoring-data".into(),
                prefix: "model/".into(),
            }),
            azure_endpoint: Some("http://127.0.0.1:10000/devstoreaccount1".into()),
            ..RunArgs::default()
        };
        let arguments = format!("{args:?} {args:#?}");
        let settings = args.resolve().expect("valid");
        let server = settings.server_settings();
        assert_eq!(
            server.admin_token.as_ref().map(Secret::expose),
            Some(TOKEN),
            "the token reaches the admin"
        );
        for text in [
            arguments,
            format!("{settings:?} {settings:#?}"),
            format!("{server:?} {server:#?}"),
            serde_json::to_string(&settings).expect("serializes"),
        ] {
            assert!(!text.contains(TOKEN), "{text}");
            assert!(text.contains("[redacted]"), "{text}");
        }
    }

    /// The admin stays on loopback unless moved off it on purpose.
    #[test]
    fn a_remote_admin_address_needs_admin_allow_remote() {
        let args = |admin: &str, allow: Option<bool>| RunArgs {
            upstream: Some(Uri::from_static("http://127.0.0.1:5001")),
            admin_listen: Some(parse_address(admin).expect("an address")),
            admin_allow_remote: allow,
            ..RunArgs::default()
        };
        for loopback in [
            "127.0.0.1:9901",
            "127.8.9.10:9901",
            "[::1]:9901",
            "[::ffff:127.0.0.1]:9901",
        ] {
            let settings = args(loopback, None).resolve().expect(loopback);
            assert!(!settings.admin_allow_remote);
        }
        for remote in [
            "0.0.0.0:9901",
            "[::]:9901",
            "10.1.2.3:9901",
            "[::ffff:10.1.2.3]:9901",
        ] {
            let error = args(remote, None).resolve().expect_err(remote).to_string();
            assert!(
                error.contains("--admin-listen") && error.contains("--admin-allow-remote"),
                "{error}"
            );
            assert!(args(remote, Some(false)).resolve().is_err(), "{remote}");
            let settings = args(remote, Some(true)).resolve().expect(remote);
            assert!(settings.admin_allow_remote);
        }
    }

    /// Store endpoints are printed (`--check-config`) and logged, so they may hold no
    /// credentials; refusing one does not quote it.
    #[test]
    fn endpoints_with_credentials_are_refused() {
        assert_eq!(
            parse_endpoint("http://127.0.0.1:9000/"),
            Ok("http://127.0.0.1:9000".to_owned())
        );
        for endpoint in [
            "http://AKIAEXAMPLE:s3cr3tKey@127.0.0.1:9000",
            "https://scoretapaccount.blob.core.windows.net/?sv=2022-11-02&sig=s3cr3tKey",
        ] {
            let message = parse_endpoint(endpoint).expect_err(endpoint);
            assert!(!message.contains("s3cr3tKey"), "{message}");
            assert!(
                message.contains("environment") || message.contains("SAS"),
                "{message}"
            );
        }
    }

    /// A bad value in the config file is quoted in the error, except what may be a secret:
    /// a URL's password, a token of the wrong type.
    #[test]
    fn config_file_errors_quote_no_secret() {
        let directory =
            std::env::temp_dir().join(format!("scoretap-secret-file-{}", std::process::id()));
        std::fs::create_dir_all(&directory).expect("dir");
        for (contents, key) in [
            ("upstream = \"https://user:Pw0rd-in-file@host.example\"\n", "upstream"),
            ("upstream = \"http://h\"\nadmin-token = 918273645\n", "line 2"),
            (
                "upstream = \"http://h\"\ns3-endpoint = \"http://AKIA:Pw0rd-in-file@minio:9000\"\n",
                "s3-endpoint",
            ),
            (
                "upstream = \"http://h\"\nazure-endpoint = \"https://a.blob.core.windows.net/?sv=1&sig=Pw0rd-in-file\"\n",
                "azure-endpoint",
            ),
        ] {
            let path = directory.join("secret.toml");
            std::fs::write(&path, contents).expect("write");
            let error = RunArgs {
                config: Some(path),
                ..RunArgs::default()
            }
            .resolve()
            .expect_err(contents)
            .to_string();
            assert!(error.contains(key), "{error}");
            assert!(
                !error.contains("Pw0rd-in-file") && !error.contains("918273645"),
                "{error}"
            );
        }
        std::fs::remove_dir_all(&directory).ok();
    }

    #[test]
    fn limits_default_safely_and_come_from_the_file() {
        let directory =
            std::env::temp_dir().join(format!("scoretap-limits-{}", std::process::id()));
        std::fs::create_dir_all(&directory).expect("dir");
        let defaults = RunArgs {
            upstream: Some(Uri::from_static("http://127.0.0.1:5001")),
            ..RunArgs::default()
        }
        .resolve()
        .expect("valid")
        .server_settings();
        assert_eq!(defaults.limits.max_header_bytes, 16 << 10);
        assert_eq!(defaults.limits.header_read_timeout, Duration::from_secs(10));
        assert_eq!(defaults.limits.idle_timeout, Duration::from_secs(60));
        assert_eq!(defaults.limits.max_connections, 10_000);
        assert_eq!(defaults.limits.max_concurrent_streams, 256);
        assert_eq!(defaults.limits.h2_max_pending_reset_streams, 20);
        assert_eq!(defaults.limits.abuse_delay, Duration::from_millis(50));
        assert_eq!(defaults.proxy.max_headers, 100);
        assert_eq!(defaults.proxy.max_request_body_bytes, 1 << 30);

        let path = directory.join("limits.toml");
        std::fs::write(
            &path,
            "upstream = \"http://127.0.0.1:5001\"\nmax-header-bytes = \"16KiB\"\nmax-headers = 50\n\
             header-read-timeout = \"3s\"\nidle-timeout = \"2m\"\nmax-connections = 500\n\
             max-concurrent-streams = 64\nmax-request-body-bytes = 1048576\n\
             h2-max-pending-reset-streams = 5\nabuse-delay = \"0s\"\n",
        )
        .expect("write");
        let settings = RunArgs {
            config: Some(path),
            max_connections: Some(600),
            ..RunArgs::default()
        }
        .resolve()
        .expect("valid")
        .server_settings();
        assert_eq!(settings.limits.max_header_bytes, 16 << 10);
        assert_eq!(settings.limits.header_read_timeout, Duration::from_secs(3));
        assert_eq!(settings.limits.idle_timeout, Duration::from_secs(120));
        assert_eq!(settings.limits.max_connections, 600, "the flag wins");
        assert_eq!(settings.limits.max_concurrent_streams, 64);
        assert_eq!(settings.limits.h2_max_pending_reset_streams, 5);
        assert_eq!(
            settings.limits.abuse_delay,
            Duration::ZERO,
            "0s switches it off"
        );
        assert_eq!(settings.proxy.max_headers, 50);
        assert_eq!(settings.proxy.max_request_body_bytes, 1 << 20);

        let bad = directory.join("bad.toml");
        std::fs::write(
            &bad,
            "upstream = \"http://h\"\nmax-header-bytes = \"1KiB\"\n",
        )
        .expect("write");
        let error = RunArgs {
            config: Some(bad),
            ..RunArgs::default()
        }
        .resolve()
        .expect_err("invalid");
        assert!(error.to_string().contains("max-header-bytes"), "{error}");
        std::fs::remove_dir_all(&directory).ok();
    }

    #[test]
    fn file_values_fill_missing_flags_and_name_bad_keys() {
        let directory =
            std::env::temp_dir().join(format!("scoretap-settings-{}", std::process::id()));
        std::fs::create_dir_all(&directory).expect("dir");
        let path = directory.join("good.toml");
        std::fs::write(
            &path,
            "upstream = \"http://127.0.0.1:5001\"\nupstream-timeout = \"2s\"\nlisten = \"127.0.0.1:7000\"\n",
        )
        .expect("write");
        let args = RunArgs {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 7001))),
            config: Some(path),
            ..RunArgs::default()
        };
        let settings = args.resolve().expect("valid");
        assert_eq!(settings.upstream_timeout, Duration::from_secs(2));
        assert_eq!(settings.listen.port(), 7001, "the flag wins over the file");
        assert_eq!(settings.service, "127.0.0.1");

        let bad = directory.join("bad.toml");
        std::fs::write(
            &bad,
            "upstream = \"http://h\"\nconnect-timeout = \"later\"\n",
        )
        .expect("write");
        let error = RunArgs {
            config: Some(bad),
            ..RunArgs::default()
        }
        .resolve()
        .expect_err("invalid");
        assert!(error.to_string().contains("connect-timeout"), "{error}");
        std::fs::remove_dir_all(&directory).ok();
    }
}
