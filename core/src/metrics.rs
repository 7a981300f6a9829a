//! Every metric scoretap exports, defined in one place (the metrics in README): typed names,
//! descriptions, units, buckets, and handles registered once at start so the request path only
//! touches pre-registered atomics.
//!
//! Labels are bounded: methods fold into eight values, statuses into five classes, and every
//! other label takes values from a fixed list — never paths or ids.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use ::metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, Unit};
use http::{Method, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::ring::{CaptureStats, DropReason};

/// Metric names, as Prometheus shows them.
pub mod names {
    pub const BUILD_INFO: &str = "scoretap_build_info";
    pub const REQUESTS: &str = "scoretap_requests_total";
    pub const REQUEST_DURATION: &str = "scoretap_request_duration_seconds";
    pub const REQUEST_BODY_BYTES: &str = "scoretap_request_body_bytes";
    pub const RESPONSE_BODY_BYTES: &str = "scoretap_response_body_bytes";
    pub const UPSTREAM_REQUESTS: &str = "scoretap_upstream_requests_total";
    pub const UPSTREAM_DURATION: &str = "scoretap_upstream_duration_seconds";
    pub const PROXY_ERRORS: &str = "scoretap_proxy_errors_total";
    pub const CAPTURE_RECORDS: &str = "scoretap_capture_records_total";
    pub const CAPTURE_DROPPED: &str = "scoretap_capture_dropped_total";
    pub const RING_BYTES: &str = "scoretap_ring_bytes";
    pub const RING_CAPACITY_BYTES: &str = "scoretap_ring_capacity_bytes";
    pub const SPILL_BYTES: &str = "scoretap_spill_bytes_total";
    pub const STORAGE_REQUESTS: &str = "scoretap_storage_requests_total";
    pub const STORAGE_DURATION: &str = "scoretap_storage_duration_seconds";
    pub const SPOOL_BYTES: &str = "scoretap_spool_bytes";
    pub const SPOOL_CAPACITY_BYTES: &str = "scoretap_spool_capacity_bytes";
    pub const CONNECTIONS_DELAYED: &str = "scoretap_connections_delayed_total";
    pub const UPSTREAM_CONNECTIONS: &str = "scoretap_upstream_connections";
    pub const UPSTREAM_CONNECTION_WAITS: &str = "scoretap_upstream_connection_waits_total";
    pub const CONNECTIONS_ACTIVE: &str = "scoretap_connections_active";
    pub const REQUESTS_IN_FLIGHT: &str = "scoretap_requests_in_flight";
}

/// Latency buckets for scoring: sub-millisecond to a minute.
pub const DURATION_BUCKETS: [f64; 16] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// Body-size buckets: 1 KiB to 1 GiB.
pub const SIZE_BUCKETS: [f64; 11] = [
    1024.0,
    4096.0,
    16_384.0,
    65_536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
    268_435_456.0,
    1_073_741_824.0,
];

/// Methods as they appear in the `method` label.
const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "OTHER",
];
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// How an upstream call ended (`result` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamResult {
    Ok,
    ConnectError,
    Timeout,
    Error,
}

const UPSTREAM_RESULTS: [&str; 4] = ["ok", "connect_error", "timeout", "error"];
/// The proxy's error kinds (`kind` label), as [`crate::ProxyError::kind`] names them.
pub const PROXY_ERROR_KINDS: [&str; 8] = [
    "bad_request",
    "client_idle_timeout",
    "upstream_connect_failed",
    "upstream_connect_timeout",
    "upstream_timeout",
    "upstream_idle_timeout",
    "upstream_error",
    "proxy_error",
];
/// Record outcomes (`outcome` label), as the trace record names them.
pub const OUTCOMES: [&str; 5] = [
    "ok",
    "upstream_error",
    "upstream_timeout",
    "client_cancelled",
    "proxy_error",
];

/// The index of a method in the `method` label values (`METHODS`).
pub fn method_index(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::POST => 1,
        Method::PUT => 2,
        Method::DELETE => 3,
        Method::PATCH => 4,
        Method::HEAD => 5,
        Method::OPTIONS => 6,
        _ => 7,
    }
}

fn status_class_index(status: StatusCode) -> usize {
    usize::from(status.as_u16() / 100)
        .saturating_sub(1)
        .min(STATUS_CLASSES.len() - 1)
}

/// Sinks (`sink` label) and the operation each one's writes are counted as.
pub const STORAGE_SINKS: [(&str, &str); 3] = [("file", "write"), ("s3", "put"), ("azure", "put")];

/// The storage dependency a storage metric is about.
#[derive(Debug, Clone)]
pub struct StorageMetrics {
    pub write_ok: Counter,
    pub write_error: Counter,
    pub write_duration: Histogram,
}

/// The upstream connections under `--upstream-max-connections`.
#[derive(Debug, Clone)]
pub struct UpstreamConnectionMetrics {
    /// Upstream connections open now.
    pub open: Gauge,
    /// Requests that found no idle connection and the cap reached, and waited for a connection.
    pub waits: Counter,
}

/// Pre-registered handles for every series.
#[derive(Debug, Clone)]
pub struct Metrics {
    requests: Vec<Counter>,
    request_duration: Histogram,
    request_body_bytes: Histogram,
    response_body_bytes: Histogram,
    upstream_requests: Vec<Counter>,
    upstream_duration: Histogram,
    proxy_errors: Vec<Counter>,
    capture_records: Vec<Counter>,
    capture_dropped: Vec<Counter>,
    ring_bytes: Gauge,
    ring_capacity_bytes: Gauge,
    /// Per sink of [`STORAGE_SINKS`], in that order.
    storage: Vec<StorageMetrics>,
    spill_bytes: Vec<Counter>,
    spool_bytes: Gauge,
    spool_capacity_bytes: Gauge,
    connections_delayed: Counter,
    upstream_connections: UpstreamConnectionMetrics,
    connections_active: Gauge,
    requests_in_flight: Gauge,
}

/// One unit of a gauge, held while what it counts lasts: taken by [`Metrics::connection_opened`]
/// and [`Metrics::request_started`], given back when dropped.
#[derive(Debug)]
pub struct GaugeUnit(Gauge);

impl GaugeUnit {
    fn take(gauge: &Gauge) -> Self {
        gauge.increment(1.0);
        Self(gauge.clone())
    }
}

impl Drop for GaugeUnit {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), ::metrics::Level::INFO, Some(module_path!()));

fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
    Key::from_parts(
        name,
        labels
            .iter()
            .map(|(label, value)| Label::from_static_parts(label, value))
            .collect::<Vec<_>>(),
    )
}

impl Metrics {
    /// Handles that record nothing (metrics switched off).
    pub fn disabled() -> Arc<Self> {
        Arc::new(Self::register(&::metrics::NoopRecorder))
    }

    /// A Prometheus recorder with scoretap's buckets, its handles, and the handle that renders
    /// the exposition for `GET /metrics`.
    pub fn prometheus() -> Result<(Arc<Self>, PrometheusHandle), String> {
        let mut builder = PrometheusBuilder::new();
        for name in [
            names::REQUEST_DURATION,
            names::UPSTREAM_DURATION,
            names::STORAGE_DURATION,
        ] {
            builder = builder
                .set_buckets_for_metric(Matcher::Full(name.into()), &DURATION_BUCKETS)
                .map_err(|error| error.to_string())?;
        }
        for name in [names::REQUEST_BODY_BYTES, names::RESPONSE_BODY_BYTES] {
            builder = builder
                .set_buckets_for_metric(Matcher::Full(name.into()), &SIZE_BUCKETS)
                .map_err(|error| error.to_string())?;
        }
        let recorder = builder.build_recorder();
        describe(&recorder);
        let metrics = Self::register(&recorder);
        recorder
            .register_gauge(
                &key(names::BUILD_INFO, &[("version", env!("CARGO_PKG_VERSION"))]),
                &METADATA,
            )
            .set(1.0);
        Ok((Arc::new(metrics), recorder.handle()))
    }

    fn register(recorder: &dyn Recorder) -> Self {
        let counter = |name, labels: &[(&'static str, &'static str)]| {
            recorder.register_counter(&key(name, labels), &METADATA)
        };
        let histogram = |name, labels: &[(&'static str, &'static str)]| {
            recorder.register_histogram(&key(name, labels), &METADATA)
        };
        let gauge = |name| recorder.register_gauge(&key(name, &[]), &METADATA);
        let mut requests = Vec::with_capacity(METHODS.len() * STATUS_CLASSES.len());
        for method in METHODS {
            for class in STATUS_CLASSES {
                requests.push(counter(
                    names::REQUESTS,
                    &[("method", method), ("status_class", class)],
                ));
            }
        }
        let metrics = Self {
            requests,
            request_duration: histogram(names::REQUEST_DURATION, &[]),
            request_body_bytes: histogram(names::REQUEST_BODY_BYTES, &[]),
            response_body_bytes: histogram(names::RESPONSE_BODY_BYTES, &[]),
            upstream_requests: UPSTREAM_RESULTS
                .iter()
                .map(|result| counter(names::UPSTREAM_REQUESTS, &[("result", result)]))
                .collect(),
            upstream_duration: histogram(names::UPSTREAM_DURATION, &[]),
            proxy_errors: PROXY_ERROR_KINDS
                .iter()
                .map(|kind| counter(names::PROXY_ERRORS, &[("kind", kind)]))
                .collect(),
            capture_records: OUTCOMES
                .iter()
                .map(|outcome| counter(names::CAPTURE_RECORDS, &[("outcome", outcome)]))
                .collect(),
            capture_dropped: DropReason::ALL
                .iter()
                .map(|reason| counter(names::CAPTURE_DROPPED, &[("reason", reason.as_str())]))
                .collect(),
            ring_bytes: gauge(names::RING_BYTES),
            ring_capacity_bytes: gauge(names::RING_CAPACITY_BYTES),
            storage: STORAGE_SINKS
                .iter()
                .map(|(sink, operation)| StorageMetrics {
                    write_ok: counter(
                        names::STORAGE_REQUESTS,
                        &[("sink", sink), ("operation", operation), ("result", "ok")],
                    ),
                    write_error: counter(
                        names::STORAGE_REQUESTS,
                        &[
                            ("sink", sink),
                            ("operation", operation),
                            ("result", "error"),
                        ],
                    ),
                    write_duration: histogram(
                        names::STORAGE_DURATION,
                        &[("sink", sink), ("operation", operation)],
                    ),
                })
                .collect(),
            spill_bytes: STORAGE_SINKS
                .iter()
                .map(|(sink, _)| counter(names::SPILL_BYTES, &[("sink", sink)]))
                .collect(),
            spool_bytes: gauge(names::SPOOL_BYTES),
            spool_capacity_bytes: gauge(names::SPOOL_CAPACITY_BYTES),
            connections_delayed: counter(names::CONNECTIONS_DELAYED, &[]),
            upstream_connections: UpstreamConnectionMetrics {
                open: gauge(names::UPSTREAM_CONNECTIONS),
                waits: counter(names::UPSTREAM_CONNECTION_WAITS, &[]),
            },
            connections_active: gauge(names::CONNECTIONS_ACTIVE),
            requests_in_flight: gauge(names::REQUESTS_IN_FLIGHT),
        };
        // Series that only ever move later still show from the first scrape.
        for counter in &metrics.spill_bytes {
            counter.absolute(0);
        }
        metrics.spool_bytes.set(0.0);
        metrics.spool_capacity_bytes.set(0.0);
        metrics.connections_delayed.absolute(0);
        metrics.upstream_connections.open.set(0.0);
        metrics.upstream_connections.waits.absolute(0);
        metrics.connections_active.set(0.0);
        metrics.requests_in_flight.set(0.0);
        metrics
    }

    /// A client connection is being served, until the returned unit is dropped.
    pub fn connection_opened(&self) -> GaugeUnit {
        GaugeUnit::take(&self.connections_active)
    }

    /// A request is in flight, until the returned unit is dropped (with its response's end).
    pub fn request_started(&self) -> GaugeUnit {
        GaugeUnit::take(&self.requests_in_flight)
    }

    /// The storage metrics of a sink (`file`, `s3`, `azure`); the file sink's for others.
    pub fn storage(&self, sink: &str) -> StorageMetrics {
        let index = STORAGE_SINKS
            .iter()
            .position(|(name, _)| *name == sink)
            .unwrap_or(0);
        self.storage[index].clone()
    }

    /// The spilled-bytes counter of a sink (`file`, `s3`, `azure`).
    pub fn spill_bytes(&self, sink: &str) -> Counter {
        let index = STORAGE_SINKS
            .iter()
            .position(|(name, _)| *name == sink)
            .unwrap_or(0);
        self.spill_bytes[index].clone()
    }

    /// Bytes waiting in the spool, and its disk budget (set before each scrape).
    pub fn observe_spool(&self, bytes: u64, capacity: u64) {
        self.spool_bytes.set(bytes as f64);
        self.spool_capacity_bytes.set(capacity as f64);
    }

    /// An exchange ended: counts it and records its duration.
    pub fn exchange_finished(&self, method: usize, status: StatusCode, seconds: f64) {
        if let Some(counter) = self
            .requests
            .get(method * STATUS_CLASSES.len() + status_class_index(status))
        {
            counter.increment(1);
        }
        self.request_duration.record(seconds);
    }

    pub fn request_body(&self, bytes: u64) {
        self.request_body_bytes.record(bytes as f64);
    }

    pub fn response_body(&self, bytes: u64) {
        self.response_body_bytes.record(bytes as f64);
    }

    /// An upstream call ended with response headers or an error.
    pub fn upstream_finished(&self, result: UpstreamResult, seconds: f64) {
        self.upstream_requests[result as usize].increment(1);
        self.upstream_duration.record(seconds);
    }

    /// The upstream connections' gauge and waits counter.
    pub fn upstream_connections(&self) -> UpstreamConnectionMetrics {
        self.upstream_connections.clone()
    }

    /// A connection waited before it was served ([`crate::penalty`]).
    pub fn connection_delayed(&self) {
        self.connections_delayed.increment(1);
    }

    /// The proxy answered with an error of this kind.
    pub fn proxy_error(&self, kind: &str) {
        if let Some(index) = PROXY_ERROR_KINDS.iter().position(|known| *known == kind) {
            self.proxy_errors[index].increment(1);
        }
    }

    /// Copies the capture path's own counters into their series (called before each scrape, so
    /// the ring's hot path stays free of metric updates).
    pub fn observe_capture(&self, stats: &CaptureStats, ring_bytes: u64, ring_capacity: u64) {
        for (index, reason) in DropReason::ALL.iter().enumerate() {
            self.capture_dropped[index].absolute(stats.dropped(*reason));
        }
        for (index, counter) in self.capture_records.iter().enumerate() {
            counter.absolute(stats.records_by_outcome[index].load(Ordering::Relaxed));
        }
        self.ring_bytes.set(ring_bytes as f64);
        self.ring_capacity_bytes.set(ring_capacity as f64);
    }
}

fn describe(recorder: &dyn Recorder) {
    let counters: [(&'static str, &'static str, Option<Unit>); 9] = [
        (
            names::REQUESTS,
            "Exchanges answered, by method and status class (the proxy's own errors included).",
            None,
        ),
        (
            names::UPSTREAM_REQUESTS,
            "Calls to the scoring endpoint, by result.",
            None,
        ),
        (
            names::PROXY_ERRORS,
            "Errors the proxy answered with, by kind.",
            None,
        ),
        (
            names::CAPTURE_RECORDS,
            "Trace records written, by outcome.",
            None,
        ),
        (
            names::CAPTURE_DROPPED,
            "Capture events dropped because capture fell behind, by reason.",
            None,
        ),
        (
            names::SPILL_BYTES,
            "Body bytes spilled to storage, by sink.",
            Some(Unit::Bytes),
        ),
        (
            names::STORAGE_REQUESTS,
            "Storage operations, by sink, operation and result.",
            None,
        ),
        (
            names::CONNECTIONS_DELAYED,
            "Client connections made to wait before being served, their peer having been cut off for HTTP/2 abuse.",
            None,
        ),
        (
            names::UPSTREAM_CONNECTION_WAITS,
            "Requests that found no idle upstream connection and no room under --upstream-max-connections for a new one, and waited for a connection.",
            None,
        ),
    ];
    for (name, help, unit) in counters {
        recorder.describe_counter(KeyName::from_const_str(name), unit, help.into());
    }
    let histograms: [(&'static str, &'static str, Unit); 5] = [
        (
            names::REQUEST_DURATION,
            "From the request's arrival to the last response byte.",
            Unit::Seconds,
        ),
        (
            names::REQUEST_BODY_BYTES,
            "Request body sizes.",
            Unit::Bytes,
        ),
        (
            names::RESPONSE_BODY_BYTES,
            "Response body sizes.",
            Unit::Bytes,
        ),
        (
            names::UPSTREAM_DURATION,
            "From sending to the scoring endpoint to its response headers.",
            Unit::Seconds,
        ),
        (
            names::STORAGE_DURATION,
            "Storage operation latency, by sink and operation.",
            Unit::Seconds,
        ),
    ];
    for (name, help, unit) in histograms {
        recorder.describe_histogram(KeyName::from_const_str(name), Some(unit), help.into());
    }
    let gauges: [(&'static str, &'static str, Option<Unit>); 8] = [
        (
            names::BUILD_INFO,
            "Always 1; the version label says which build runs.",
            None,
        ),
        (
            names::RING_BYTES,
            "Bytes held by capture (ring and collector), counted against the byte budget.",
            Some(Unit::Bytes),
        ),
        (
            names::RING_CAPACITY_BYTES,
            "The capture byte budget.",
            Some(Unit::Bytes),
        ),
        (
            names::SPOOL_BYTES,
            "Bytes waiting in the local spool for upload.",
            Some(Unit::Bytes),
        ),
        (
            names::SPOOL_CAPACITY_BYTES,
            "The local spool's disk budget (--spool-max-bytes); 0 without a remote store.",
            Some(Unit::Bytes),
        ),
        (
            names::UPSTREAM_CONNECTIONS,
            "Connections to the scoring endpoint open now (at most --upstream-max-connections).",
            None,
        ),
        (
            names::CONNECTIONS_ACTIVE,
            "Client connections being served now (upgraded tunnels included).",
            None,
        ),
        (
            names::REQUESTS_IN_FLIGHT,
            "Requests received whose response has not ended yet.",
            None,
        ),
    ];
    for (name, help, unit) in gauges {
        recorder.describe_gauge(KeyName::from_const_str(name), unit, help.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_exported_from_the_start() {
        let (metrics, handle) = Metrics::prometheus().expect("recorder");
        metrics.exchange_finished(method_index(&Method::POST), StatusCode::BAD_GATEWAY, 0.002);
        metrics.proxy_error("upstream_connect_failed");
        let text = handle.render();
        for name in [
            names::BUILD_INFO,
            names::REQUESTS,
            names::REQUEST_DURATION,
            names::UPSTREAM_REQUESTS,
            names::CAPTURE_DROPPED,
            names::RING_CAPACITY_BYTES,
            names::SPILL_BYTES,
            names::STORAGE_REQUESTS,
            names::SPOOL_BYTES,
            names::UPSTREAM_CONNECTIONS,
            names::UPSTREAM_CONNECTION_WAITS,
            names::CONNECTIONS_ACTIVE,
            names::REQUESTS_IN_FLIGHT,
            names::SPOOL_CAPACITY_BYTES,
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        assert!(
            text.contains(r#"scoretap_requests_total{method="POST",status_class="5xx"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"scoretap_proxy_errors_total{kind="upstream_connect_failed"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"scoretap_request_duration_seconds_bucket{le="0.0025"} 1"#));
    }

    #[test]
    fn status_classes_fold() {
        assert_eq!(status_class_index(StatusCode::OK), 1);
        assert_eq!(status_class_index(StatusCode::SWITCHING_PROTOCOLS), 0);
        assert_eq!(status_class_index(StatusCode::GATEWAY_TIMEOUT), 4);
    }
}
