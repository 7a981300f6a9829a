//! The upstream client: one scoring endpoint, reached over HTTP/1.1 through a pool of
//! kept-alive connections, or over HTTP/2 through one shared connection ([`shared_http2`]),
//! plain or TLS, at most `--upstream-max-connections` of them open at once
//! ([`connection_limit`]).

mod connection_limit;
mod shared_http2;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use self::connection_limit::LimitedConnector;
use self::shared_http2::SharedHttp2;
use crate::error::{error_chain, is_timeout, ProxyError};
use crate::metrics::UpstreamConnectionMetrics;
use crate::progress::{ExchangeProgress, Side, WriteStall, WriteStalled};
use crate::tls::{upstream_client_config, TlsError};

/// The body type sent upstream: the client's body, cut at the body limit, forwarded as it
/// arrives through the tee, and handed back to the proxy if the upstream never reads it.
pub type UpstreamRequestBody = crate::progress::ProgressBody<
    crate::returnable::ReturnableBody<crate::tee::TeeBody<crate::proxy::LimitedBody<Incoming>>>,
>;

/// The HTTP version spoken to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 (the default; what scoring servers such as gunicorn speak).
    #[default]
    Http1,
    /// HTTP/2: prior knowledge on `http://`, ALPN `h2` on `https://` (gRPC needs it).
    Http2,
}

/// How to reach the upstream.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// `http://` or `https://` base URL; a path in it is prepended to every request path.
    pub url: Uri,
    pub protocol: UpstreamProtocol,
    /// An extra PEM CA bundle trusted besides the system's roots.
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// How long to wait for the upstream's response headers once the request body has been
    /// sent whole.
    pub response_header_timeout: Duration,
    /// Idle pooled connections are closed after this long (keep it below the upstream's own
    /// keep-alive timeout, so the proxy never reuses a connection the upstream is closing).
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// No body byte either way on an exchange for this long ends it, naming the side that
    /// stalled ([`crate::progress`]); a write to the upstream pending this long fails.
    pub body_idle_timeout: Duration,
    /// Upstream connections open at once (idle, busy or upgraded); past it a request waits for
    /// one, within `connect_timeout`.
    pub max_connections: usize,
}

/// The default `max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Errors building the upstream client.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the upstream URL {0} must start with http:// or https:// and name a host")]
    InvalidUrl(String),
    #[error("upstream TLS: {0}")]
    Tls(#[from] TlsError),
}

/// A connector that always dials the configured upstream, whatever authority a request's URI
/// names. The URI's authority only becomes `:authority` (and hyper-util's HTTP/1.1 pool key), so
/// a client's `Host` can be forwarded (`--preserve-host`) without ever choosing where the proxy
/// connects. Its connections fail a write the upstream leaves pending for the body idle timeout.
#[derive(Debug, Clone)]
struct FixedTarget<C> {
    inner: C,
    target: Uri,
    body_idle_timeout: Duration,
}

impl<C> tower_service::Service<Uri> for FixedTarget<C>
where
    C: tower_service::Service<Uri>,
    C::Future: Send + 'static,
{
    type Response = UpstreamIo<C::Response>;
    type Error = C::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, C::Error>> + Send>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, _requested: Uri) -> Self::Future {
        let connecting = self.inner.call(self.target.clone());
        let body_idle_timeout = self.body_idle_timeout;
        Box::pin(async move {
            let io = connecting.await?;
            Ok(UpstreamIo {
                inner: io,
                write_stall: WriteStall::new(body_idle_timeout, Side::Upstream),
            })
        })
    }
}

pin_project_lite::pin_project! {
    /// A connection to the upstream: unchanged, but a write the upstream leaves pending for the
    /// body idle timeout (it stopped reading the request body) fails, which closes the
    /// connection and ends the request body's capture.
    #[derive(Debug)]
    pub struct UpstreamIo<S> {
        #[pin]
        inner: S,
        write_stall: WriteStall,
    }
}

impl<S: Connection> Connection for UpstreamIo<S> {
    fn connected(&self) -> Connected {
        self.inner.connected()
    }
}

impl<S: hyper::rt::Read> hyper::rt::Read for UpstreamIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_read(context, buffer)
    }
}

impl<S: hyper::rt::Write> hyper::rt::Write for UpstreamIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write(context, data);
        this.write_stall.limit(polled, context)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write_vectored(context, buffers);
        this.write_stall.limit(polled, context)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let polled = this.inner.poll_flush(context);
        this.write_stall.limit(polled, context)
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(context)
    }
}

type Connector = FixedTarget<HttpsConnector<LimitedConnector<HttpConnector>>>;

/// The default body idle timeout: as long as the default wait for response headers.
pub const DEFAULT_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How requests reach the upstream.
#[derive(Debug, Clone)]
enum Transport {
    /// HTTP/1.1: hyper-util's pool, one connection per request in flight.
    Pooled(Box<Client<Connector, UpstreamRequestBody>>),
    /// HTTP/2: one connection for every request. (hyper-util's pool would key it by each
    /// request's authority, which `--preserve-host` makes the client's.)
    SharedHttp2(Arc<SharedHttp2>),
}

/// The most an upstream HTTP/1.1 connection buffers, each way (hyper's minimum is 8 KiB): the
/// request body frames queued for writing, and the response head (nginx's `proxy_buffer_size`
/// refuses upstream heads past 4 or 8 KiB by default; 16 KiB is more generous).
const UPSTREAM_BUFFER_BYTES: usize = 16 * 1024;

/// The upstream endpoint and its connection pool.
#[derive(Debug, Clone)]
pub struct Upstream {
    transport: Transport,
    scheme: Scheme,
    authority: Authority,
    /// The base URL's path without its trailing `/` (empty for none).
    path_prefix: String,
    /// `host` for HTTP/1.1 requests: the upstream's authority.
    host_header: HeaderValue,
    protocol: UpstreamProtocol,
    response_header_timeout: Duration,
    connect_timeout: Duration,
    body_idle_timeout: Duration,
}

impl Upstream {
    pub fn new(
        settings: &UpstreamSettings,
        metrics: UpstreamConnectionMetrics,
    ) -> Result<Self, UpstreamError> {
        let invalid = || UpstreamError::InvalidUrl(settings.url.to_string());
        let scheme = settings.url.scheme().cloned().ok_or_else(invalid)?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(invalid());
        }
        let authority = settings.url.authority().cloned().ok_or_else(invalid)?;
        let path_prefix = settings.url.path().trim_end_matches('/').to_owned();
        let host_header = HeaderValue::from_str(authority.as_str()).map_err(|_| invalid())?;

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(settings.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        // The cap is taken before dialing, under TLS: the wait and the TCP connect share the
        // connect timeout.
        let http = LimitedConnector::new(
            http,
            settings.max_connections,
            settings.connect_timeout,
            metrics,
        );
        let tls = upstream_client_config(settings.ca_file.as_deref())?;
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http();
        let target = Uri::from_parts({
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(scheme.clone());
            parts.authority = Some(authority.clone());
            parts.path_and_query = Some(PathAndQuery::from_static("/"));
            parts
        })
        .map_err(|_| invalid())?;
        let connector = FixedTarget {
            inner: match settings.protocol {
                UpstreamProtocol::Http1 => builder.enable_http1().wrap_connector(http),
                UpstreamProtocol::Http2 => builder.enable_http2().wrap_connector(http),
            },
            target: target.clone(),
            body_idle_timeout: settings.body_idle_timeout,
        };
        let transport = match settings.protocol {
            UpstreamProtocol::Http1 => {
                Transport::Pooled(Box::new(pooled_client(settings, connector)))
            }
            UpstreamProtocol::Http2 => Transport::SharedHttp2(Arc::new(SharedHttp2::new(
                connector,
                target,
                settings.pool_idle_timeout,
            ))),
        };
        Ok(Self {
            transport,
            scheme,
            authority,
            path_prefix,
            host_header,
            protocol: settings.protocol,
            response_header_timeout: settings.response_header_timeout,
            connect_timeout: settings.connect_timeout,
            body_idle_timeout: settings.body_idle_timeout,
        })
    }

    /// How long an exchange may go without a body byte either way ([`crate::progress`]).
    pub fn body_idle_timeout(&self) -> Duration {
        self.body_idle_timeout
    }

    /// The protocol spoken to the upstream.
    pub fn protocol(&self) -> UpstreamProtocol {
        self.protocol
    }

    /// The upstream's authority as a `host` header value.
    pub fn host_header(&self) -> &HeaderValue {
        &self.host_header
    }

    /// The absolute URI of a request's target at the upstream. `authority` replaces the
    /// upstream's own in the URI (it becomes HTTP/2's `:authority`); the connection still goes to
    /// the upstream.
    pub fn target_uri(
        &self,
        path_and_query: Option<&PathAndQuery>,
        authority: Option<&HeaderValue>,
    ) -> Result<Uri, ProxyError> {
        let authority = match authority {
            Some(value) => Authority::try_from(value.as_bytes())
                .map_err(|_| ProxyError::bad_request("the Host header is not a valid authority"))?,
            None => self.authority.clone(),
        };
        let path_and_query = match (self.path_prefix.is_empty(), path_and_query) {
            (true, Some(path_and_query)) => path_and_query.clone(),
            (true, None) => PathAndQuery::from_static("/"),
            (false, path_and_query) => {
                let rest = path_and_query.map_or("/", PathAndQuery::as_str);
                PathAndQuery::try_from(format!("{}{}", self.path_prefix, rest)).map_err(|_| {
                    ProxyError::bad_request("the request target is not a valid path")
                })?
            }
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(authority)
            .path_and_query(path_and_query)
            .build()
            .map_err(|error| ProxyError::Internal(error.to_string()))
    }

    /// Sends a request upstream and waits for the response headers.
    ///
    /// While the request body uploads, only the body idle timeout applies: a client that stops
    /// sending gets 408 ([`ProxyError::ClientIdle`]), an upstream that stops reading makes a 504
    /// ([`ProxyError::UpstreamIdle`]); however long a steady upload takes, it is never cut. The
    /// response-header timeout starts once the body has been sent whole, and an upstream that
    /// answers before that (an early error, a streaming answer) is answered at once.
    pub async fn send(
        &self,
        request: Request<UpstreamRequestBody>,
        progress: &ExchangeProgress,
    ) -> Result<Response<Incoming>, ProxyError> {
        let response = async {
            match &self.transport {
                Transport::Pooled(client) => client
                    .request(request)
                    .await
                    .map_err(|error| self.classify(&error, error.is_connect())),
                // Boxed: opening the shared connection is a large future, and every request's
                // future (moved by hyper as it is served) would otherwise be as large as it.
                Transport::SharedHttp2(shared) => Box::pin(shared.send(request))
                    .await
                    .map_err(|error| self.classify(&error, error.is_connect())),
            }
        };
        tokio::pin!(response);
        // One timer, moved only when it fires: nothing is done per body frame, and the task is
        // not woken when the upload ends.
        let timer = tokio::time::sleep_until(self.next_deadline(progress));
        tokio::pin!(timer);
        loop {
            tokio::select! {
                biased;
                result = &mut response => return result,
                () = &mut timer => {
                    let deadline = self.next_deadline(progress);
                    if deadline <= tokio::time::Instant::now() {
                        return Err(self.timed_out(progress));
                    }
                    timer.as_mut().reset(deadline);
                }
            }
        }
    }

    /// When [`Upstream::send`] must next look at the exchange: the response-header deadline once
    /// the body has been sent; before that, the body idle deadline, or sooner, when the header
    /// deadline could come first (it is at least the header timeout away).
    fn next_deadline(&self, progress: &ExchangeProgress) -> tokio::time::Instant {
        match progress.request_sent_at() {
            Some(sent_at) => sent_at + self.response_header_timeout,
            None => progress
                .idle_deadline(self.body_idle_timeout)
                .min(tokio::time::Instant::now() + self.response_header_timeout),
        }
    }

    /// The error of an exchange whose deadline has passed.
    fn timed_out(&self, progress: &ExchangeProgress) -> ProxyError {
        if progress.request_sent() {
            ProxyError::UpstreamTimeout(self.response_header_timeout)
        } else {
            match progress.stalled_side() {
                Side::Client => ProxyError::ClientIdle(self.body_idle_timeout),
                Side::Upstream => ProxyError::UpstreamIdle(self.body_idle_timeout),
            }
        }
    }

    fn classify(&self, error: &(dyn std::error::Error + 'static), is_connect: bool) -> ProxyError {
        let message = error_chain(error);
        if is_connect {
            if is_timeout(error) {
                ProxyError::UpstreamConnectTimeout(self.connect_timeout)
            } else {
                ProxyError::UpstreamConnect(message)
            }
        } else if let Some(stalled) = WriteStalled::find_in(error) {
            // The connection's write stall limit: the upstream stopped reading.
            ProxyError::UpstreamIdle(stalled.after)
        } else {
            ProxyError::Upstream(message)
        }
    }

    /// Whether a TCP connection to the upstream can be opened now (for `/readyz`).
    pub async fn is_reachable(&self) -> bool {
        let host = self
            .authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = self
            .authority
            .port_u16()
            .unwrap_or(if self.scheme == Scheme::HTTPS {
                443
            } else {
                80
            });
        let connect = tokio::net::TcpStream::connect((host, port));
        matches!(
            tokio::time::timeout(self.connect_timeout.min(Duration::from_secs(2)), connect).await,
            Ok(Ok(_))
        )
    }
}

/// hyper-util's pooled HTTP/1.1 client.
fn pooled_client(
    settings: &UpstreamSettings,
    connector: Connector,
) -> Client<Connector, UpstreamRequestBody> {
    let mut client = Client::builder(TokioExecutor::new());
    client
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(settings.pool_idle_timeout)
        .pool_max_idle_per_host(settings.pool_max_idle_per_host)
        // hyper queues request body frames for a connection until this many bytes wait
        // (400 KiB by default) before it stops reading the client's body: with many
        // concurrent uploads to a slower upstream that is most of the proxy's memory. Body
        // frames are at most the server's read buffer (`--max-header-bytes`, 16 KiB by
        // default), so this still lets a whole frame through while bounding each upload to
        // about twice that.
        .http1_max_buf_size(UPSTREAM_BUFFER_BYTES)
        .set_host(false);
    client.build(connector)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> UpstreamSettings {
        UpstreamSettings {
            url: url.parse().expect("uri"),
            protocol: UpstreamProtocol::Http1,
            ca_file: None,
            connect_timeout: Duration::from_secs(1),
            response_header_timeout: Duration::from_secs(1),
            pool_idle_timeout: Duration::from_secs(1),
            pool_max_idle_per_host: 8,
            body_idle_timeout: DEFAULT_BODY_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }

    fn upstream_for(url: &str) -> Result<Upstream, UpstreamError> {
        Upstream::new(
            &settings(url),
            crate::metrics::Metrics::disabled().upstream_connections(),
        )
    }

    #[tokio::test]
    async fn target_uri_joins_the_base_path() {
        let upstream = upstream_for("http://127.0.0.1:5001/api/").expect("upstream");
        let path = PathAndQuery::from_static("/score?x=1");
        let uri = upstream.target_uri(Some(&path), None).expect("uri");
        assert_eq!(uri.to_string(), "http://127.0.0.1:5001/api/score?x=1");
        let plain = upstream_for("http://127.0.0.1:5001").expect("upstream");
        assert_eq!(
            plain
                .target_uri(Some(&path), None)
                .expect("uri")
                .to_string(),
            "http://127.0.0.1:5001/score?x=1"
        );
        assert_eq!(plain.host_header(), "127.0.0.1:5001");
    }

    #[tokio::test]
    async fn rejects_other_schemes() {
        assert!(upstream_for("ftp://example.com/").is_err());
    }
}
