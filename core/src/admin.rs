//! The admin listener: liveness and readiness for orchestrators, the capture switch, and the
//! record query. Mutating endpoints need the bearer token (`--admin-token`). Records hold model
//! inputs: `GET /traces` needs the token once one is set, and without one it answers only a
//! client on the admin's own address (a shell on the host or in the pod).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::body::ResponseBody;
use crate::proxy::Proxy;
use crate::query::{query_directory, StatusFilter, TraceQuery};
use crate::ring::DropReason;
use crate::secret::Secret;
use crate::sink::StoreLocation;
use metrics_exporter_prometheus::PrometheusHandle;

/// The largest body accepted by `PUT /capture`.
const MAXIMUM_ADMIN_BODY: usize = 64 * 1024;
/// `GET /traces` returns at most this many records.
const MAXIMUM_TRACE_LIMIT: usize = 1_000;

/// What the admin endpoints look at.
#[derive(Debug, Clone)]
pub struct AdminState {
    proxy: Arc<Proxy>,
    draining: Arc<AtomicBool>,
    token: Option<Secret>,
    /// The store `GET /traces` reads, and the directory of its batches.
    store: Option<(StoreLocation, String)>,
    prometheus: Option<PrometheusHandle>,
    /// `/readyz` also checks that the upstream accepts connections.
    readiness_checks_upstream: bool,
}

impl AdminState {
    pub fn new(
        proxy: Arc<Proxy>,
        draining: Arc<AtomicBool>,
        token: Option<Secret>,
        store: Option<(StoreLocation, String)>,
        prometheus: Option<PrometheusHandle>,
    ) -> Self {
        Self {
            proxy,
            draining,
            token,
            store,
            prometheus,
            readiness_checks_upstream: true,
        }
    }

    /// Whether `/readyz` also checks that the upstream accepts connections (the default). Off
    /// for replicas in front of one shared remote endpoint: an outage of it would otherwise take
    /// every replica out of its load balancer at once.
    pub fn checking_upstream(mut self, checks: bool) -> Self {
        self.readiness_checks_upstream = checks;
        self
    }

    /// The Prometheus exposition, with the capture path's counters brought up to date.
    fn metrics(&self) -> Response<ResponseBody> {
        let Some(handle) = &self.prometheus else {
            return json(
                StatusCode::NOT_FOUND,
                r#"{"error":"not_found","message":"metrics are switched off (--metrics false)"}"#,
            );
        };
        if let Some(capture) = self.proxy.capture() {
            let budget = capture.ring().budget();
            let metrics = self.proxy.metrics();
            metrics.observe_capture(capture.stats(), budget.used(), budget.capacity());
            if let Some(spool) = &capture.storage().spool {
                metrics.observe_spool(spool.used(), spool.limit());
            }
        }
        let mut response = Response::new(ResponseBody::full(Bytes::from(handle.render())));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        response
    }

    async fn route(&self, request: Request<Incoming>, client: Client) -> Response<ResponseBody> {
        match (request.method(), request.uri().path()) {
            (&Method::GET | &Method::HEAD, "/healthz") => {
                json(StatusCode::OK, r#"{"status":"alive"}"#)
            }
            (&Method::GET | &Method::HEAD, "/readyz") => self.readiness().await,
            (&Method::GET | &Method::HEAD, "/metrics") => self.metrics(),
            (&Method::GET, "/capture") => self.capture_state(),
            (&Method::PUT, "/capture") => self.change_capture(request).await,
            (&Method::GET, "/traces") => {
                // Records hold model inputs: with a token configured, reading them needs it too;
                // without one, only from this host.
                if self.token.is_some() {
                    if let Some(refusal) = self.refusal(&request) {
                        return refusal;
                    }
                } else if client == Client::Remote {
                    return json(
                        StatusCode::FORBIDDEN,
                        r#"{"error":"forbidden","message":"records are served to other hosts only with --admin-token set"}"#,
                    );
                }
                self.traces(request.uri().query()).await
            }
            (_, "/healthz" | "/readyz" | "/metrics" | "/capture" | "/traces") => json(
                StatusCode::METHOD_NOT_ALLOWED,
                r#"{"error":"method_not_allowed"}"#,
            ),
            _ => json(StatusCode::NOT_FOUND, r#"{"error":"not_found"}"#),
        }
    }

    async fn readiness(&self) -> Response<ResponseBody> {
        if self.draining.load(Ordering::SeqCst) {
            json(StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"draining"}"#)
        } else if !self.readiness_checks_upstream || self.proxy.upstream().is_reachable().await {
            json(StatusCode::OK, r#"{"status":"ready"}"#)
        } else {
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                r#"{"status":"upstream_unreachable"}"#,
            )
        }
    }

    fn capture_state(&self) -> Response<ResponseBody> {
        let Some(capture) = self.proxy.capture() else {
            return json_value(
                StatusCode::OK,
                &serde_json::json!({"enabled": false, "configured": false}),
            );
        };
        let stats = capture.stats();
        let dropped: serde_json::Map<String, serde_json::Value> = DropReason::ALL
            .iter()
            .map(|reason| (reason.as_str().to_owned(), stats.dropped(*reason).into()))
            .collect();
        let control = capture.control();
        json_value(
            StatusCode::OK,
            &serde_json::json!({
                "enabled": control.enabled(),
                "sample_rate": control.sample_rate(),
                "configured": true,
                "stats": {
                    "records_written": stats.records_written.load(Ordering::Relaxed),
                    "record_write_failures": stats.record_write_failures.load(Ordering::Relaxed),
                    "dropped_events": stats.dropped_total(),
                    "dropped": dropped,
                    "ring_bytes": capture.ring().budget().used(),
                    "ring_capacity_bytes": capture.ring().budget().capacity(),
                },
                "storage": storage_status(capture.storage()),
            }),
        )
    }

    /// Checks `authorization: Bearer <token>` (the scheme in any case, RFC 9110 §11.1) in
    /// constant time; the refusal to send otherwise.
    fn refusal(&self, request: &Request<Incoming>) -> Option<Response<ResponseBody>> {
        let Some(token) = &self.token else {
            return Some(json(
                StatusCode::FORBIDDEN,
                r#"{"error":"forbidden","message":"set --admin-token to allow changes"}"#,
            ));
        };
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| {
                let (scheme, credentials) = value.split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then_some(credentials.trim_start())
            })
            .unwrap_or_default();
        if constant_time_equal(presented.as_bytes(), token.expose().as_bytes()) {
            None
        } else {
            let mut response = json(StatusCode::UNAUTHORIZED, r#"{"error":"unauthorized"}"#);
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"scoretap-admin\""),
            );
            Some(response)
        }
    }

    async fn change_capture(&self, request: Request<Incoming>) -> Response<ResponseBody> {
        if let Some(refusal) = self.refusal(&request) {
            return refusal;
        }
        let Some(capture) = self.proxy.capture() else {
            return json(
                StatusCode::CONFLICT,
                r#"{"error":"capture_not_configured"}"#,
            );
        };
        let body = match Limited::new(request.into_body(), MAXIMUM_ADMIN_BODY)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(_) => return bad_request("the body could not be read or is over 64 KiB"),
        };
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Change {
            enabled: Option<bool>,
            sample_rate: Option<f64>,
        }
        let change: Change = match serde_json::from_slice(&body) {
            Ok(change) => change,
            Err(error) => {
                return bad_request(&format!(
                    "expected {{\"enabled\": bool, \"sample_rate\": 0.0..1.0}}: {error}"
                ))
            }
        };
        if let Some(rate) = change.sample_rate {
            if !(0.0..=1.0).contains(&rate) {
                return bad_request("sample_rate must be between 0.0 and 1.0");
            }
        }
        let control = capture.control();
        if let Some(enabled) = change.enabled {
            control.set_enabled(enabled);
        }
        if let Some(rate) = change.sample_rate {
            control.set_sample_rate(rate);
        }
        tracing::info!(
            enabled = control.enabled(),
            sample_rate = control.sample_rate(),
            "capture changed by the admin endpoint"
        );
        self.capture_state()
    }

    async fn traces(&self, query: Option<&str>) -> Response<ResponseBody> {
        let (root, directory) = match &self.store {
            Some((StoreLocation::Directory(root), directory)) => (root.clone(), directory.clone()),
            Some((StoreLocation::Stdout, _)) => {
                return json(
                    StatusCode::CONFLICT,
                    r#"{"error":"not_queryable","message":"records go to stdout; use a file store to query them"}"#,
                )
            }
            Some((StoreLocation::S3 { .. } | StoreLocation::Azure { .. }, _)) => {
                return json(
                    StatusCode::CONFLICT,
                    r#"{"error":"not_queryable","message":"records go to a remote store; read them with `scoretap traces --store URL`"}"#,
                )
            }
            None => {
                return json(
                    StatusCode::CONFLICT,
                    r#"{"error":"capture_not_configured"}"#,
                )
            }
        };
        let mut trace_query = TraceQuery {
            limit: 10,
            ..TraceQuery::default()
        };
        for (name, value) in query_pairs(query.unwrap_or_default()) {
            match name.as_str() {
                "contains" => trace_query.contains = Some(value),
                "limit" => match value.parse::<usize>() {
                    Ok(limit) => trace_query.limit = limit.min(MAXIMUM_TRACE_LIMIT),
                    Err(_) => return bad_request("limit: expected a number"),
                },
                "since" => match humantime::parse_duration(&value) {
                    Ok(since) => trace_query.since = Some(since),
                    Err(_) => return bad_request("since: expected a duration such as 15m or 1h"),
                },
                "status" => match StatusFilter::parse(&value) {
                    Ok(status) => trace_query.status = Some(status),
                    Err(message) => return bad_request(&format!("status: {message}")),
                },
                "service" => trace_query.service = Some(value),
                _ => {
                    return bad_request(
                        "expected the parameters contains, limit, service, since, status",
                    )
                }
            }
        }
        let found =
            tokio::task::spawn_blocking(move || query_directory(&root, &directory, &trace_query))
                .await;
        match found {
            Ok(Ok(found)) => {
                let mut body = found.records.join("\n");
                if !body.is_empty() {
                    body.push('\n');
                }
                let mut response = Response::new(ResponseBody::full(Bytes::from(body)));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/x-ndjson"),
                );
                response
            }
            Ok(Err(error)) => json_value(
                StatusCode::INTERNAL_SERVER_ERROR,
                &serde_json::json!({"error": "store_unreadable", "message": error.to_string()}),
            ),
            Err(_) => json(StatusCode::INTERNAL_SERVER_ERROR, r#"{"error":"internal"}"#),
        }
    }
}

/// Whether two byte strings are equal, in a time that depends neither on where they differ nor
/// on whether their lengths do: both are hashed (SHA-256) and the digests compared whole, without
/// an early exit.
fn constant_time_equal(left: &[u8], right: &[u8]) -> bool {
    use aws_lc_rs::digest::{digest, SHA256};
    let left = digest(&SHA256, left);
    let right = digest(&SHA256, right);
    let difference = left
        .as_ref()
        .iter()
        .zip(right.as_ref())
        .fold(0u8, |difference, (a, b)| difference | (a ^ b));
    std::hint::black_box(difference) == 0
}

/// `application/x-www-form-urlencoded` pairs of a query string.
fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(name), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    String::from_utf8_lossy(&crate::redaction::decode_form_component(text)).into_owned()
}

fn bad_request(message: &str) -> Response<ResponseBody> {
    json_value(
        StatusCode::BAD_REQUEST,
        &serde_json::json!({"error": "bad_request", "message": message}),
    )
}

fn json(status: StatusCode, body: &'static str) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn json_value(status: StatusCode, value: &serde_json::Value) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Where an admin client connects from, as far as reading records without a token goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Client {
    /// From the address it connected to: a process on this host (or in this pod) talking to
    /// itself, as `curl 127.0.0.1:9901` or `kubectl port-forward` do.
    SameAddress,
    /// From any other address: another host, or the kubelet and Prometheus reaching a pod.
    Remote,
}

impl Client {
    fn of(stream: &tokio::net::TcpStream) -> Self {
        match (stream.peer_addr(), stream.local_addr()) {
            (Ok(peer), Ok(local)) if peer.ip().to_canonical() == local.ip().to_canonical() => {
                Self::SameAddress
            }
            _ => Self::Remote,
        }
    }
}

/// Serves the admin endpoints over HTTP/1.1 until the task is aborted.
pub async fn serve(listener: TcpListener, state: AdminState) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!("admin accept failed: {error}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        let client = Client::of(&stream);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(state.route(request, client).await) }
            });
            let result = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(error) = result {
                tracing::debug!("admin connection ended with an error: {error}");
            }
        });
    }
}

/// The spool and upload counters of a remote store (`null` for local stores).
fn storage_status(status: &crate::capture::StorageStatus) -> serde_json::Value {
    let (Some(spool), Some(uploads)) = (&status.spool, &status.uploads) else {
        return serde_json::Value::Null;
    };
    serde_json::json!({
        "spool_bytes": spool.used(),
        "spool_limit_bytes": spool.limit(),
        "uploads_queued": uploads.queued.load(Ordering::Relaxed),
        "uploads_done": uploads.uploaded.load(Ordering::Relaxed),
        "uploads_pending": uploads.pending(),
        "uploaded_bytes": uploads.uploaded_bytes.load(Ordering::Relaxed),
        "upload_failed_attempts": uploads.failed_attempts.load(Ordering::Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_decode() {
        assert_eq!(
            query_pairs("contains=a%20b+c&limit=5&x"),
            vec![
                ("contains".to_owned(), "a b c".to_owned()),
                ("limit".to_owned(), "5".to_owned()),
                ("x".to_owned(), String::new()),
            ]
        );
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_equal(b"secret", b"secret"));
        assert!(!constant_time_equal(b"secret", b"secreT"));
        assert!(!constant_time_equal(b"secret", b"Secret"));
        assert!(!constant_time_equal(b"secret", b"secret2"));
        assert!(!constant_time_equal(b"secret", b"secre"));
        assert!(!constant_time_equal(b"secret", b""));
        assert!(constant_time_equal(b"", b""));
    }
}
