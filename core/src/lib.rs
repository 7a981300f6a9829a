//! scoretap's library: a transparent reverse proxy for ML scoring endpoints.
//!
//! Modules, one job each:
//! - [`server`]: listeners, TLS termination, graceful drain;
//! - [`proxy`]: a request's life as named phases;
//! - [`upstream`]: the pooled client to the scoring endpoint;
//! - [`headers`]: hop-by-hop, forwarding, `via` and correlation-id rules;
//! - [`error`]: errors typed by origin and their one mapping to HTTP answers;
//! - [`body`]: the response body type;
//! - [`tls`]: certificates and trust;
//! - [`admin`]: `/healthz`, `/readyz`.

pub mod admin;
pub mod body;
pub mod error;
pub mod headers;
pub mod proxy;
pub mod server;
pub mod tls;
pub mod upstream;

pub use error::{ErrorOrigin, ProxyError};
pub use server::{BoundServer, ServerSettings, StartError};
