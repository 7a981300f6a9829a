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
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::access_log::{AccessLogEntry, AccessLogFormat};
use crate::body::ResponseBody;
use crate::capture::Capture;
use crate::error::{ProxyError, RequestBodyError};
use crate::headers::{
    accepts_trailers, correlation_id, is_upgrade_request, remove_hop_by_hop,
    remove_overridden_content_length, Downstream, ForwardingPolicy, HeadViolation, X_REQUEST_ID,
};
use crate::host::is_valid_host;
use crate::metrics::{Metrics, UpstreamResult};
use crate::progress::{ClientStall, ExchangeProgress, IdleLimitedBody, ProgressBody};
use crate::returnable::ReturnableBody;
use crate::tee::{BodyMeter, TeeBody};
use crate::tunnel::ClientUpgrade;
use crate::upstream::{Upstream, UpstreamProtocol, UpstreamRequestBody};

/// The body of every response scoretap sends: the answer, teed to capture.
pub type DownstreamBody = TeeBody<IdleLimitedBody<ResponseBody>>;

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
    /// One line per exchange on stderr ([`crate::access_log`]).
    pub access_log: AccessLogFormat,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            service: String::new(),
            forwarding: ForwardingPolicy::default(),
            preserve_host: false,
            max_headers: DEFAULT_MAX_HEADERS,
            max_request_body_bytes: DEFAULT_MAX_REQUEST_BODY_BYTES,
            access_log: AccessLogFormat::Off,
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
    upgrade: Option<ClientUpgrade>,
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

    /// How long an exchange may go without a body byte either way.
    pub fn body_idle_timeout(&self) -> Duration {
        self.upstream.body_idle_timeout()
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
        let in_flight = self.metrics.request_started();
        let correlation_id = correlation_id(request.headers());
        let method = request.method().clone();
        let client_version = request.version();
        let client_stall = request.extensions().get::<ClientStall>().cloned();
        // RFC 9110 §10.1.1: "A server that receives a 100-continue expectation in an HTTP/1.1
        // request [...] MAY omit sending a 100 (Continue) response if it has already received
        // some or all of the content for the corresponding request, or if the framing indicates
        // that there is no content." The client waits for a 100 before it uploads: only the
        // upstream asks for the body (hyper sends the 100 when the body is first read).
        let expects_continue = request
            .headers()
            .get(header::EXPECT)
            .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        let exchange = self
            .capture
            .as_ref()
            .and_then(|capture| capture.begin(&request, &correlation_id));
        let request_meter = Some(BodyMeter::request(self.metrics.clone()));
        let body_limit = BodyLimit::new(self.settings.max_request_body_bytes);
        let progress = ExchangeProgress::new();
        let mut access_log = AccessLogEntry::begin(
            self.settings.access_log,
            &request,
            downstream.peer,
            &correlation_id,
            &progress,
        );
        let request = request.map(|body| LimitedBody::new(body, body_limit.clone()));
        let (request, returned_body) = match &exchange {
            Some(exchange) => {
                let tap = exchange.request_tap();
                let (parts, body) = request.into_parts();
                let (body, returned) =
                    ReturnableBody::returnable(TeeBody::new(body, Some(tap), request_meter));
                (
                    Request::from_parts(parts, ProgressBody::new(body, progress.clone())),
                    Some(returned),
                )
            }
            None => (
                request.map(|body| {
                    ProgressBody::new(
                        ReturnableBody::forwarded(TeeBody::new(body, None, request_meter)),
                        progress.clone(),
                    )
                }),
                None,
            ),
        };
        let result = self
            .forward(
                downstream,
                request,
                &correlation_id,
                client_version,
                &progress,
            )
            .await;
        let result = match result {
            // The upstream request failed because the proxy cut the body at the limit.
            Err(_) if body_limit.exceeded() => Err(ProxyError::PayloadTooLarge(body_limit.maximum)),
            result => result,
        };
        if let Err(error) = &result {
            if let Some(returned) =
                returned_body.filter(|_| error.reads_request_body() && !expects_continue)
            {
                // The upstream never read the body: read it for the record after the answer
                // is on its way (it goes through the tee, so within the capture budget).
                tokio::spawn(returned.drain());
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
        if let Some(entry) = access_log.as_mut() {
            entry.respond(response.status(), outcome);
        }
        let body_idle_timeout = self.body_idle_timeout();
        let response_tap = exchange.map(|exchange| {
            let tap = exchange.respond(&response, outcome, error);
            match client_stall {
                Some(stall) => tap.with_client_stall(stall, body_idle_timeout),
                None => tap,
            }
        });
        let response_meter =
            BodyMeter::response(self.metrics.clone(), &method, response.status(), started)
                .holding(in_flight)
                .logging(access_log);
        response.map(|body| {
            TeeBody::new(
                IdleLimitedBody::new(body, progress, body_idle_timeout),
                response_tap,
                Some(response_meter),
            )
            .lingering(IdleLimitedBody::linger)
        })
    }

    async fn forward(
        &self,
        downstream: Downstream,
        mut request: Request<UpstreamRequestBody>,
        correlation_id: &HeaderValue,
        client_version: Version,
        progress: &ExchangeProgress,
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
        let result = self.upstream.send(upstream_request, progress).await;
        progress.upstream_answered();
        let upstream_result = match &result {
            Ok(_) => Some(UpstreamResult::Ok),
            Err(ProxyError::UpstreamConnect(_)) => Some(UpstreamResult::ConnectError),
            Err(
                ProxyError::UpstreamConnectTimeout(_)
                | ProxyError::UpstreamTimeout(_)
                | ProxyError::UpstreamIdle(_),
            ) => Some(UpstreamResult::Timeout),
            // The client stopped sending: the upstream did nothing wrong.
            Err(ProxyError::ClientIdle(_)) => None,
            Err(_) => Some(UpstreamResult::Error),
        };
        if let Some(upstream_result) = upstream_result {
            self.metrics
                .upstream_finished(upstream_result, sent.elapsed().as_secs_f64());
        }
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
        if host
            .as_ref()
            .is_some_and(|host| !is_valid_host(host.as_bytes()))
        {
            // RFC 9112 §3.2, above: "... or a Host header field with an invalid field value."
            return Err(ProxyError::bad_request(
                "the Host header field is not a valid host",
            ));
        }
        // RFC 9112 §3.2.2: "When an origin server receives a request with an absolute-form of
        // request-target, the origin server MUST ignore the received Host header field (if any)
        // and instead use the host information of the request-target." HTTP/2's `:authority`
        // arrives the same way; both follow the `Host` grammar.
        let client_host = match request.uri().authority() {
            Some(authority) if !is_valid_host(authority.as_str().as_bytes()) => {
                return Err(ProxyError::bad_request(
                    "the request target's authority is not a valid host",
                ));
            }
            Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
            None => host,
        };
        if client_host.is_none() && request.version() == Version::HTTP_11 {
            return Err(ProxyError::bad_request(
                "an HTTP/1.1 request must carry a Host header field",
            ));
        }
        // Carried out when the client's connection can hold the tunnel (the server hands each
        // upgrade request a place for it); otherwise forwarded as a plain request.
        let upgrade = if self.upstream.protocol() == UpstreamProtocol::Http1
            && is_upgrade_request(request.version(), request.headers())
        {
            ClientUpgrade::of(request)
        } else {
            None
        };
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
                if is_of_unknown_length(&body) {
                    // RFC 9110 §9.3.1: "Although request message framing is independent of the
                    // method used, content received in a GET request has no generally defined
                    // semantics". hyper's client chunks a body of unknown length by itself,
                    // except for GET, HEAD and CONNECT, which it sends with no body at all (and
                    // fails on the first byte) unless the request says it is chunked.
                    headers.insert(
                        header::TRANSFER_ENCODING,
                        HeaderValue::from_static("chunked"),
                    );
                }
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
        client_upgrade: Option<ClientUpgrade>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        if switching {
            // RFC 9110 §15.2.2: a 101 is only valid as the answer to an Upgrade request.
            let Some(client_upgrade) = client_upgrade else {
                return Err(ProxyError::Upstream(
                    "the upstream switched protocols without being asked".into(),
                ));
            };
            client_upgrade.switched(hyper::upgrade::on(&mut response));
        }
        let upstream_version = response.version();
        let (mut parts, body) = response.into_parts();
        // hyper's client decoded the body by its transfer coding; the length must not frame it
        // toward the client.
        remove_overridden_content_length(&mut parts.headers);
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

/// Whether a body is still to come with no known length: chunked from an HTTP/1.1 client, or
/// DATA without `content-length` from an HTTP/2 client.
fn is_of_unknown_length(body: &impl Body) -> bool {
    !body.is_end_stream() && body.size_hint().exact().is_none()
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
