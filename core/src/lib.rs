//! scoretap's library: a transparent reverse proxy for ML scoring endpoints.
//!
//! Modules, one job each:
//! - [`server`]: listeners, TLS termination, graceful drain;
//! - [`penalty`]: connections from peers that abused HTTP/2 wait before they are served;
//! - [`proxy`]: a request's life as named phases;
//! - [`progress`]: an exchange's progress, and the body idle timeout that ends a stalled one;
//! - [`upstream`]: the pooled client to the scoring endpoint;
//! - [`tunnel`]: upgraded connections (WebSocket), joined to the upstream's and timed out idle;
//! - [`headers`]: hop-by-hop, forwarding, `via` and correlation-id rules;
//! - [`host`]: the `Host` grammar;
//! - [`error`]: errors typed by origin and their one mapping to HTTP answers;
//! - [`body`]: the response body type;
//! - [`tls`]: certificates and trust;
//! - [`access_log`]: one line per exchange, for people and log pipelines;
//! - [`admin`]: `/healthz`, `/readyz`, `/capture`, `/traces`;
//! - [`capture`]: what is captured, and the per-exchange handle feeding the ring;
//! - [`tee`]: the body wrapper that hands frames to capture without delaying them;
//! - [`ring`]: the bounded queue to the collector, with its full policy and counters;
//! - [`collector`]: the thread that assembles exchanges into records;
//! - [`modeldata`]: model inputs and predictions as Azure ML v1 model data collector CSV rows;
//! - [`record`], [`redaction`]: the `scoretap.trace/1` record, cut to 64 KB, with secrets removed;
//! - [`sink`]: stdout and rotating local files;
//! - [`query`]: reading records back;
//! - [`metrics`]: every exported metric, defined once;
//! - [`secret`]: tokens and keys that print as `[redacted]`.

pub mod access_log;
pub mod admin;
pub mod body;
pub mod capture;
pub mod collector;
pub mod error;
pub mod headers;
pub mod host;
pub mod metrics;
pub mod modeldata;
pub mod penalty;
pub mod progress;
pub mod proxy;
pub mod query;
pub mod record;
pub mod redaction;
pub mod returnable;
pub mod ring;
pub mod secret;
pub mod server;
pub mod sink;
pub mod storage;
pub mod tee;
pub mod tls;
pub mod tunnel;
pub mod upstream;

pub use error::{ErrorOrigin, ProxyError};
pub use server::{BoundServer, ServerSettings, StartError};
