//! A request's life through the proxy, as named phases:
//!
//! 1. [`Proxy::check_request`] — refuse what must not be forwarded (ambiguous framing or an
//!    oversized head seen on the wire, RFC 9112 §3.2 `Host` rules, `CONNECT`, too many fields,
//!    a declared body over the limit);
//! 2. [`Proxy::upstream_request`] — translate the request for the upstream (hop-by-hop removal,
//!    forwarding headers, correlation id, `host`/`:authority`, version);
//! 3. [`Upstream::send`] — send it and wait for the response headers;
//! 4. [`Proxy::downstream_response`] — translate the response back (hop-by-hop removal, `via`,
//!    correlation id, protocol upgrade);
//! 5. [`Proxy::finish`] — the one place an exchange is logged (and, with capture, recorded).
//!
//! Errors of any phase become a client answer in one place: [`ProxyError::to_response`].

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::body::ResponseBody;
use crate::capture::Capture;
use crate::error::{ProxyError, RequestBodyError};
use crate::headers::{
    accepts_trailers, correlation_id, is_upgrade_request, remove_hop_by_hop, Downstream,
    ForwardingPolicy, HeadViolation, X_REQUEST_ID,
};
use crate::metrics::{Metrics, UpstreamResult};
use crate::returnable::ReturnableBody;
use crate::tee::{BodyMeter, TeeBody};
use crate::upstream::{Upstream, UpstreamProtocol, UpstreamRequestBody};

/// The body of every response scoretap sends: the answer, teed to capture.
pub type DownstreamBody = TeeBody<ResponseBody>;

/// The default `max_request_body_bytes`: 1 GiB. scoretap streams bodies and holds none of them,
/// so the limit protects the upstream (scoring servers commonly read a whole body into memory),
/// not scoretap; 1 GiB admits any realistic scoring batch (images, tensors) and matches capture's
/// own body limit. Lower it to what the model accepts.
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: u64 = 1 << 30;
/// The default `max_headers`: hyper's.
pub const DEFAULT_MAX_HEADERS: usize = 100;

/// How requests are rewritten on their way through, and what is refused.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// The service name recorded with every exchange.
    pub service: String,
    pub forwarding: ForwardingPolicy,
    /// Forward the client's host (`host`, or `:authority` to an HTTP/2 upstream) instead of the
    /// upstream's authority.
    pub preserve_host: bool,
    /// Header fields a request may carry; past it 431. (hyper enforces it on HTTP/1.1 before
    /// the proxy sees the request; the check phase on HTTP/2, which only bounds bytes.)
    pub max_headers: usize,
    /// The largest request body forwarded; a larger one gets 413 and never reaches the upstream
    /// past the limit.
    pub max_request_body_bytes: u64,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            service: String::new(),
            forwarding: ForwardingPolicy::default(),
            preserve_host: false,
            max_headers: DEFAULT_MAX_HEADERS,
            max_request_body_bytes: DEFAULT_MAX_REQUEST_BODY_BYTES,
        }
    }
}

/// The proxy: one upstream, the rewrite settings.
#[derive(Debug)]
pub struct Proxy {
    upstream: Upstream,
    settings: ProxySettings,
    capture: Option<Capture>,
    metrics: Arc<Metrics>,
}

/// What phase 1 learned about a request that phase 2 needs.
#[derive(Debug)]
struct CheckedRequest {
    /// The host the client addressed (absolute-form authority, `:authority`, or `Host`).
    client_host: Option<HeaderValue>,
    /// A protocol upgrade the proxy will carry out end to end.
    upgrade: Option<hyper::upgrade::OnUpgrade>,
}

impl Proxy {
    pub fn new(
        upstream: Upstream,
        settings: ProxySettings,
        capture: Option<Capture>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            upstream,
            settings,
            capture,
            metrics,
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn capture(&self) -> Option<&Capture> {
        self.capture.as_ref()
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Handles one request from start to finish. Never fails: errors become answers. When the
    /// exchange is captured, both bodies go through a tee and the exchange is recorded when the
    /// response body ends (or the client goes away).
    pub async fn handle(
        self: Arc<Self>,
        downstream: Downstream,
        request: Request<Incoming>,
    ) -> Response<DownstreamBody> {
        let started = Instant::now();
        let correlation_id = correlation_id(request.headers());
        let method = request.method().clone();
        let client_version = request.version();
        let exchange = self
            .capture
            .as_ref()
            .and_then(|capture| capture.begin(&request, &correlation_id));
        let request_meter = Some(BodyMeter::request(self.metrics.clone()));
        let body_limit = BodyLimit::new(self.settings.max_request_body_bytes);
        let request = request.map(|body| LimitedBody::new(body, body_limit.clone()));
        let (request, returned_body) = match &exchange {
            Some(exchange) => {
                let tap = exchange.request_tap();
                let (parts, body) = request.into_parts();
                let (body, returned) =
                    ReturnableBody::returnable(TeeBody::new(body, Some(tap), request_meter));
                (Request::from_parts(parts, body), Some(returned))
            }
            None => (
                request
                    .map(|body| ReturnableBody::forwarded(TeeBody::new(body, None, request_meter))),
                None,
            ),
        };
        let result = self
            .forward(downstream, request, &correlation_id, client_version)
            .await;
        let result = match result {
            // The upstream request failed because the proxy cut the body at the limit.
            Err(_) if body_limit.exceeded() => Err(ProxyError::PayloadTooLarge(body_limit.maximum)),
            result => result,
        };
        if let Err(error) = &result {
            if let Some(returned) = returned_body.filter(|_| error.reads_request_body()) {
                // The upstream never read the body: read it now so the record keeps the input.
                returned.drain().await;
            }
        }
        let (response, outcome, error) = match result {
            Ok(response) => (response, "ok", None),
            Err(error) => {
                self.metrics.proxy_error(error.kind());
                tracing::warn!(
                    correlation_id = correlation_id.to_str().unwrap_or_default(),
                    origin = ?error.origin(),
                    kind = error.kind(),
                    "{error}"
                );
                let mut response = error.to_response(&correlation_id);
                if error.closes_connection() && client_version < Version::HTTP_2 {
                    // HTTP/2 has no `connection` field; hyper ends an HTTP/1.x connection after a
                    // response that carries `close`.
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                (
                    response,
                    error.outcome(),
                    Some((error.kind(), error.to_string())),
                )
            }
        };
        self.finish(&method, &response, &correlation_id, started);
        let response_tap = exchange.map(|exchange| exchange.respond(&response, outcome, error));
        let response_meter =
            BodyMeter::response(self.metrics.clone(), &method, response.status(), started);
        response.map(|body| {
            TeeBody::new(body, response_tap, Some(response_meter)).lingering(ResponseBody::linger)
        })
    }

    async fn forward(
        &self,
        downstream: Downstream,
        mut request: Request<UpstreamRequestBody>,
        correlation_id: &HeaderValue,
        client_version: Version,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let checked = self.check_request(&mut request)?;
        let upstream_request = self.upstream_request(
            request,
            downstream,
            correlation_id,
            checked.client_host,
            checked.upgrade.is_some(),
        )?;
        let sent = Instant::now();
        let result = self.upstream.send(upstream_request).await;
        self.metrics.upstream_finished(
            match &result {
                Ok(_) => UpstreamResult::Ok,
                Err(ProxyError::UpstreamConnect(_)) => UpstreamResult::ConnectError,
                Err(ProxyError::UpstreamConnectTimeout(_) | ProxyError::UpstreamTimeout(_)) => {
                    UpstreamResult::Timeout
                }
                Err(_) => UpstreamResult::Error,
            },
            sent.elapsed().as_secs_f64(),
        );
        let response = result?;
        self.downstream_response(response, correlation_id, client_version, checked.upgrade)
    }

    /// Phase 1: refuse requests that must not be forwarded.
    fn check_request(
        &self,
        request: &mut Request<UpstreamRequestBody>,
    ) -> Result<CheckedRequest, ProxyError> {
        if let Some(violation) = request.extensions().get::<HeadViolation>() {
            return Err(ProxyError::MalformedHead(*violation));
        }
        if request.headers().len() > self.settings.max_headers {
            // RFC 6585 §5: "The 431 status code indicates that the server is unwilling to
            // process the request because its header fields are too large."
            return Err(ProxyError::BadRequest {
                status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                message: "the request has more header fields than allowed",
            });
        }
        if request.body().size_hint().lower() > self.settings.max_request_body_bytes {
            // The declared Content-Length is over the limit: answered before the upstream is
            // contacted, without reading the body (RFC 9110 §15.5.14: "The 413 (Content Too
            // Large) status code indicates that the server is refusing to process a request
            // because the request content is larger than the server is willing or able to
            // process.").
            return Err(ProxyError::PayloadTooLarge(
                self.settings.max_request_body_bytes,
            ));
        }
        if request.method() == Method::CONNECT {
            return Err(ProxyError::BadRequest {
                status: StatusCode::METHOD_NOT_ALLOWED,
                message: "CONNECT is not supported by a reverse proxy",
            });
        }
        let mut hosts = request.headers().get_all(header::HOST).iter();
        let host = hosts.next().cloned();
        if hosts.next().is_some() {
            // RFC 9112 §3.2: "A server MUST respond with a 400 (Bad Request) status code to any
            // HTTP/1.1 request message that lacks a Host header field and to any request message
            // that contains more than one Host header field line or a Host header field with an
            // invalid field value."
            return Err(ProxyError::bad_request("more than one Host header field"));
        }
        // RFC 9112 §3.2.2: "When an origin server receives a request with an absolute-form of
        // request-target, the origin server MUST ignore the received Host header field (if any)
        // and instead use the host information of the request-target."
        let client_host = match request.uri().authority() {
            Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
            None => host,
        };
        if client_host.is_none() && request.version() == Version::HTTP_11 {
            return Err(ProxyError::bad_request(
                "an HTTP/1.1 request must carry a Host header field",
            ));
        }
        let upgrade = (self.upstream.protocol() == UpstreamProtocol::Http1
            && is_upgrade_request(request.version(), request.headers()))
        .then(|| hyper::upgrade::on(&mut *request));
        Ok(CheckedRequest {
            client_host,
            upgrade,
        })
    }

    /// Phase 2: the request as the upstream will receive it.
    fn upstream_request(
        &self,
        request: Request<UpstreamRequestBody>,
        downstream: Downstream,
        correlation_id: &HeaderValue,
        client_host: Option<HeaderValue>,
        upgrading: bool,
    ) -> Result<Request<UpstreamRequestBody>, ProxyError> {
        let (mut parts, body) = request.into_parts();
        let client_accepts_trailers = accepts_trailers(&parts.headers);
        let headers = &mut parts.headers;
        remove_hop_by_hop(headers, upgrading);
        // The proxy answers `Expect: 100-continue` itself: hyper sends the interim 100 when the
        // body is first read, which happens when the upstream is ready to receive it — the body
        // is never buffered first (RFC 9110 §10.1.1).
        if headers
            .get(header::EXPECT)
            .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"))
        {
            headers.remove(header::EXPECT);
        }
        let policy = &self.settings.forwarding;
        policy.apply(headers, downstream, client_host.as_ref());
        policy.add_via(headers, parts.version);
        headers.insert(X_REQUEST_ID, correlation_id.clone());
        let preserved_host = client_host.filter(|_| self.settings.preserve_host);
        let mut authority = None;
        match self.upstream.protocol() {
            UpstreamProtocol::Http1 => {
                let host = preserved_host.unwrap_or_else(|| self.upstream.host_header().clone());
                headers.insert(header::HOST, host);
                if client_accepts_trailers {
                    headers.insert(header::TE, HeaderValue::from_static("trailers"));
                    if !upgrading {
                        headers.insert(header::CONNECTION, HeaderValue::from_static("te"));
                    }
                }
                parts.version = Version::HTTP_11;
            }
            UpstreamProtocol::Http2 => {
                // RFC 9113 §8.3.1: the target's authority travels as `:authority`, taken from the
                // URI; a `host` field that differed from it would be malformed.
                headers.remove(header::HOST);
                authority = preserved_host;
                if client_accepts_trailers {
                    // RFC 9113 §8.2.2: "The only exception to this is the TE header field, which
                    // MAY be present in an HTTP/2 request; when it is, it MUST NOT contain any
                    // value other than "trailers"."
                    headers.insert(header::TE, HeaderValue::from_static("trailers"));
                }
                parts.version = Version::HTTP_2;
            }
        }
        parts.uri = self
            .upstream
            .target_uri(parts.uri.path_and_query(), authority.as_ref())?;
        Ok(Request::from_parts(parts, body))
    }

    /// Phase 4: the response as the client will receive it.
    fn downstream_response(
        &self,
        mut response: Response<Incoming>,
        correlation_id: &HeaderValue,
        client_version: Version,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        if switching {
            // RFC 9110 §15.2.2: a 101 is only valid as the answer to an Upgrade request.
            let Some(client_upgrade) = client_upgrade else {
                return Err(ProxyError::Upstream(
                    "the upstream switched protocols without being asked".into(),
                ));
            };
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(tunnel(client_upgrade, upstream_upgrade));
        }
        let upstream_version = response.version();
        let (mut parts, body) = response.into_parts();
        remove_hop_by_hop(&mut parts.headers, switching);
        self.settings
            .forwarding
            .add_via(&mut parts.headers, upstream_version);
        parts.headers.insert(X_REQUEST_ID, correlation_id.clone());
        parts.version = client_version;
        Ok(Response::from_parts(parts, ResponseBody::from(body)))
    }

    /// Phase 5: the exchange's one finishing step.
    fn finish(
        &self,
        method: &Method,
        response: &Response<ResponseBody>,
        correlation_id: &HeaderValue,
        started: Instant,
    ) {
        tracing::debug!(
            correlation_id = correlation_id.to_str().unwrap_or_default(),
            %method,
            status = response.status().as_u16(),
            header_ms = started.elapsed().as_secs_f64() * 1000.0,
            "response headers sent"
        );
    }
}

/// Copies bytes both ways between an upgraded client connection and the upstream's.
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (client, upstream) = tokio::join!(client, upstream);
    match (client, upstream) {
        (Ok(client), Ok(upstream)) => {
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!("upgraded connection ended: {error}");
            }
        }
        (Err(error), _) | (_, Err(error)) => {
            tracing::debug!("protocol upgrade failed: {error}");
        }
    }
}

/// The request body limit of one exchange, and whether the body went past it.
#[derive(Debug, Clone)]
struct BodyLimit {
    maximum: u64,
    exceeded: Arc<AtomicBool>,
}

impl BodyLimit {
    fn new(maximum: u64) -> Self {
        Self {
            maximum,
            exceeded: Arc::new(AtomicBool::new(false)),
        }
    }

    fn exceeded(&self) -> bool {
        self.exceeded.load(Ordering::Relaxed)
    }
}

pin_project_lite::pin_project! {
    /// A request body cut at the limit: the frame that would cross it is never forwarded; the
    /// body fails instead, which aborts the upstream request (hyper drops the upstream
    /// connection, or resets the HTTP/2 stream).
    #[derive(Debug)]
    pub struct LimitedBody<B> {
        #[pin]
        inner: B,
        read: u64,
        limit: BodyLimit,
    }
}

impl<B> LimitedBody<B> {
    fn new(inner: B, limit: BodyLimit) -> Self {
        Self {
            inner,
            read: 0,
            limit,
        }
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes, Error = hyper::Error>,
{
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        let this = self.project();
        let frame = match std::task::ready!(this.inner.poll_frame(context)) {
            Some(Ok(frame)) => frame,
            Some(Err(error)) => return Poll::Ready(Some(Err(RequestBodyError::Client(error)))),
            None => return Poll::Ready(None),
        };
        if let Some(data) = frame.data_ref() {
            *this.read = this.read.saturating_add(data.len() as u64);
            if *this.read > this.limit.maximum {
                this.limit.exceeded.store(true, Ordering::Relaxed);
                return Poll::Ready(Some(Err(RequestBodyError::TooLarge(this.limit.maximum))));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
