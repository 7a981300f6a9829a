//! End-to-end test harness for scoretap: the binary under test ([`process`]), a real hyper test
//! upstream ([`upstream`]), a raw-socket upstream ([`raw_upstream`]), hyper clients
//! ([`client`]), raw HTTP/1 wire helpers ([`raw`]), a test PKI ([`tls`]), readers of capture
//! trace records ([`traces`]), hostile clients ([`hostile`]), a `/metrics` parser ([`metrics`]), a real Prometheus
//! ([`prometheus`]), real object stores (moto, Azurite: [`stores`]) and utilities.
#![allow(clippy::unwrap_used)]

pub mod client;
pub mod deploy;
pub mod harness;
pub mod hostile;
pub mod metrics;
pub mod process;
pub mod prometheus;
pub mod raw;
pub mod raw_upstream;
pub mod stores;
pub mod tls;
pub mod traces;
pub mod upstream;
pub mod util;

pub use client::{Client, Collected, Proto};
pub use process::{run_cli, Scoretap};
pub use raw::{RawConn, RawResponse};
pub use raw_upstream::{RawReply, RawUpstream};
pub use tls::Pki;
pub use upstream::{TestUpstream, UpstreamOptions, UpstreamProto};
pub use util::{within, STEP};
